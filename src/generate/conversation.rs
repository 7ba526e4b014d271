//! A conversation: its messages and the KV cache of its last turn, so that each turn evaluates
//! only what is new whatever the prefix pool has evicted meanwhile.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{Generation, GenerationParams, Runtime};
use crate::chat_template::Message;
use crate::error::{Error, Result};
use crate::model::KvCache;

#[derive(Default)]
struct State {
    messages: Vec<Message>,
    /// The tokens of the last turn (prompt and answer) and their cache.
    cached: Option<(Vec<u32>, KvCache)>,
    /// A turn is being generated: its answer is not in `messages` yet.
    in_turn: bool,
}

#[derive(Default)]
pub struct Conversation {
    state: Mutex<State>,
}

impl Conversation {
    pub fn new(system: Option<String>) -> Self {
        let messages = system
            .map(|s| Message::new("system", &s))
            .into_iter()
            .collect();
        Self {
            state: Mutex::new(State {
                messages,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state whole, so a panic elsewhere need not poison it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn messages(&self) -> Vec<Message> {
        self.lock().messages.clone()
    }

    /// Forgets the turns (a system message stays) and the cache.
    pub fn reset(&self) -> Result<()> {
        let mut state = self.lock();
        if state.in_turn {
            return Err(Error::invalid_argument(
                "reset: a turn is being generated; close its stream first",
            ));
        }
        state.messages.retain(|m| m.role == "system");
        state.cached = None;
        Ok(())
    }

    /// Appends the user message `text` and starts generating the answer, from this
    /// conversation's own cache of its previous turn. `encode` gives the prompt of the
    /// messages (the chat template's work, which lives above the generation loop).
    pub fn turn(
        self: &Arc<Self>,
        runtime: &Arc<Runtime>,
        text: &str,
        params: GenerationParams,
        encode: impl FnOnce(&[Message]) -> Result<Vec<u32>>,
    ) -> Result<Generation> {
        params.validate()?;
        let mut state = self.lock();
        if state.in_turn {
            return Err(Error::invalid_argument(
                "a turn of this chat is being generated; finish or close its stream first",
            ));
        }
        state.messages.push(Message::new("user", text));
        let prompt = match encode(&state.messages) {
            Ok(prompt) => prompt,
            Err(e) => {
                state.messages.pop();
                return Err(e);
            }
        };
        let cache = state.cached.as_ref().map(|(tokens, cache)| {
            cache.prefix(super::prefix_pool::common_prefix(tokens, &prompt))
        });
        match Generation::new(runtime.clone(), prompt, params, cache, Some(self.clone())) {
            Ok(generation) => {
                state.in_turn = true;
                Ok(generation)
            }
            Err(e) => {
                state.messages.pop();
                Err(e)
            }
        }
    }

    /// Called by the turn's generation as it ends (finished or abandoned).
    pub(super) fn end_turn(&self, answer: String, tokens: Vec<u32>, cache: KvCache) {
        let mut state = self.lock();
        state.messages.push(Message::new("assistant", &answer));
        state.cached = Some((tokens, cache));
        state.in_turn = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineOptions, Prompt};
    use crate::generate::Event;
    use crate::sampling::SamplingParams;
    use crate::test_support::fixture;

    fn greedy(max_tokens: usize) -> GenerationParams {
        GenerationParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            ..GenerationParams::default()
        }
    }

    fn run(mut generation: Generation) -> (String, crate::generate::Stats) {
        let mut text = String::new();
        loop {
            match generation.step().unwrap() {
                Event::Token(piece) => text.push_str(&piece.text),
                Event::Finished { text: tail } => {
                    text.push_str(&tail);
                    return (text, generation.stats().clone());
                }
                Event::Prefilled => {}
            }
        }
    }

    fn engine(cache_bytes: usize) -> Arc<Engine> {
        let options = EngineOptions {
            cache_bytes: Some(cache_bytes),
            ..EngineOptions::default()
        };
        Arc::new(Engine::load(&fixture("tiny-phi3-haiku-q4_k_m.gguf"), &options).unwrap())
    }

    /// Each turn starts from the previous turn's cache, with the pool off, and answers what
    /// the whole conversation sent afresh answers.
    #[test]
    fn turns_reuse_their_own_cache_and_match_a_fresh_run() {
        let engine = engine(0);
        let chat = Arc::new(Conversation::new(None));
        let topics = ["ice hockey", "autumn rain", "a lighthouse"];
        for (i, topic) in topics.iter().enumerate() {
            let text = format!("Write a haiku about {topic}");
            let (answer, stats) = run(engine.turn(&chat, &text, greedy(40)).unwrap());
            let messages = chat.messages();
            assert_eq!(messages.len(), 2 * (i + 1));
            assert_eq!(messages.last().unwrap().content, answer);
            if i > 0 {
                // All but the new user message and the tokens after the last answer's text.
                assert!(stats.cached_tokens > stats.prompt_tokens - 30, "{stats:?}");
            }
            let fresh = engine
                .generate(
                    &Prompt::Messages(messages[..messages.len() - 1].to_vec()),
                    greedy(40),
                )
                .unwrap();
            let (fresh_answer, fresh_stats) = run(fresh);
            assert_eq!(fresh_stats.cached_tokens, 0);
            assert_eq!(fresh_answer, answer, "turn {i}");
        }
        chat.reset().unwrap();
        assert!(chat.messages().is_empty());
    }

    #[test]
    fn one_turn_at_a_time() {
        let engine = engine(0);
        let chat = Arc::new(Conversation::new(Some("Be brief.".into())));
        let first = engine
            .turn(&chat, "Write a haiku about snow", greedy(5))
            .unwrap();
        assert!(engine.turn(&chat, "again", greedy(5)).is_err());
        assert!(chat.reset().is_err());
        drop(first);
        // An abandoned turn keeps its (empty) answer; the chat goes on.
        assert_eq!(chat.messages().len(), 3);
        run(engine
            .turn(&chat, "Write a haiku about rain", greedy(5))
            .unwrap());
        chat.reset().unwrap();
        assert_eq!(chat.messages().len(), 1);
    }
}
