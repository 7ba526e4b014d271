//! The generation loop: batched prefill, sampling, stop tokens and stop strings, incremental
//! UTF-8-safe text, timings. Driven one step at a time so that a caller (the Python iterator)
//! can check for interruption between steps. A generation starts from the longest prefix of
//! its prompt that the model's [`PrefixPool`] (or its conversation) holds, and leaves its own
//! cache there when it ends.

pub mod conversation;
pub mod prefix_pool;
pub mod runtime;
pub mod scheduler;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::constraint::{Constraint, ConstraintState};
use crate::error::{Error, Result};
use crate::model::{KvCache, SeqInput};
use crate::sampling::{LogSoftmax, Sampler, SamplingParams};
use crate::tokenizer::DecodeStream;
use conversation::Conversation;
pub use prefix_pool::PrefixPool;
pub use runtime::Runtime;
pub use scheduler::{Scheduler, StreamHandle};

/// Prompt tokens per forward pass while prefilling.
pub const PREFILL_CHUNK: usize = 512;

/// The most alternatives a token can report (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are not part of the answer.
    pub stop: Vec<String>,
    /// Keep going past end-of-text tokens (until `max_tokens` or the context is full).
    pub ignore_eos: bool,
    /// How many of the most likely tokens each [`Piece`] reports, with their log-probabilities.
    pub top_logprobs: usize,
    /// What the answer must match. The generation ends when nothing more can follow, and
    /// `ignore_eos` does not apply: the constraint says where the text ends.
    pub constraint: Option<Constraint>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 512,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
            constraint: None,
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::invalid_argument("stop strings must not be empty"));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(Error::invalid_argument(format!(
                "top_logprobs must be in 0..={MAX_TOP_LOGPROBS}, got {}",
                self.top_logprobs
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-text token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix pool or the conversation.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: Option<FinishReason>,
    pub time_to_first_token_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct Piece {
    pub id: u32,
    /// `log_softmax(logits)[id]` of the raw logits (before penalty and temperature).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens at this step and their log-probabilities (as
    /// `logprob`), most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
    /// The text this token completes (whole UTF-8 characters only).
    pub token_text: String,
    /// The answer text released at this step: `token_text` minus what may still turn out to
    /// start a stop string, plus what earlier steps held back and is now decided.
    pub text: String,
}

#[derive(Debug)]
pub enum Event {
    /// Part of the prompt went through the model; nothing to show yet.
    Prefilled,
    Token(Piece),
    /// The generation is over; `text` is what was still held back, if anything.
    Finished {
        text: String,
    },
}

pub struct Generation {
    runtime: Arc<Runtime>,
    params: GenerationParams,
    prompt: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    constraint: Option<ConstraintState>,
    decoder: DecodeStream,
    stop_ids: Vec<u32>,
    /// Prompt and generated tokens, for the repeat penalty.
    history: Vec<u32>,
    /// Logits for the next token, once the prompt is in.
    logits: Option<Vec<f32>>,
    /// Released answer text not yet passed on (a possible stop-string start).
    held: String,
    /// The answer so far: every text passed on.
    answer: String,
    /// The conversation this generation is a turn of, which gets its answer and cache.
    conversation: Option<Arc<Conversation>>,
    stats: Stats,
    started: Option<Instant>,
    first_token_at: Option<Instant>,
    prefill_time: Duration,
    finished: bool,
}

impl Generation {
    /// A generation of `prompt` (checked token ids), starting from `cache` when given (which
    /// holds a prefix of the prompt), else from what the prefix pool holds.
    pub(crate) fn new(
        runtime: Arc<Runtime>,
        prompt: Vec<u32>,
        params: GenerationParams,
        cache: Option<KvCache>,
        conversation: Option<Arc<Conversation>>,
    ) -> Result<Self> {
        params.validate()?;
        let runner = &runtime.runner;
        let context = runner.context_length();
        if prompt.is_empty() {
            return Err(Error::invalid_argument("prompt: no tokens to start from"));
        }
        if prompt.len() > context {
            return Err(Error::ContextOverflow {
                prompt_tokens: prompt.len(),
                context_length: context,
            });
        }
        // Checked here, not only where the prompt was encoded: a scheduler pass refuses a batch
        // with a bad id in it.
        runner.check_token_ids("prompt", &prompt)?;
        let vocab = runner.vocab_size();
        if let Some(&(id, _)) = params
            .sampling
            .logit_bias
            .iter()
            .find(|b| b.0 as usize >= vocab)
        {
            return Err(Error::invalid_argument(format!(
                "logit_bias: token id {id} is out of range (vocabulary of {vocab})"
            )));
        }
        // At least the last prompt token is evaluated, for fresh logits.
        let reusable = prompt.len() - 1;
        let cache = cache
            .filter(|c| !c.is_empty())
            .map(|mut c| {
                c.truncate(reusable);
                c
            })
            .or_else(|| runtime.prefix_pool.lookup(&prompt, reusable))
            .unwrap_or_else(|| runner.new_cache());
        let constraint = params
            .constraint
            .as_ref()
            .map(|c| runtime.grammars.start(c))
            .transpose()?;
        let mut decoder = DecodeStream::new(runtime.tokenizer.clone(), true);
        if constraint.is_some() {
            // The constraint saw the dummy prefix's space; so does the caller.
            decoder = decoder.keeping_leading_space();
        }
        let stop_ids = if params.ignore_eos && constraint.is_none() {
            Vec::new()
        } else {
            runtime.tokenizer.stop_ids()
        };
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone()),
            constraint,
            stats: Stats {
                prompt_tokens: prompt.len(),
                cached_tokens: cache.len(),
                ..Stats::default()
            },
            history: prompt.clone(),
            runtime,
            params,
            prompt,
            cache,
            decoder,
            stop_ids,
            logits: None,
            held: String::new(),
            answer: String::new(),
            conversation,
            started: None,
            first_token_at: None,
            prefill_time: Duration::ZERO,
            finished: false,
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The prompt is in the cache: each pass from now on evaluates one sampled token.
    pub(crate) fn is_decoding(&self) -> bool {
        self.cache.len() >= self.prompt.len()
    }

    /// Does one unit of work: a chunk of the prompt, or one token, through the model alone.
    /// (The [`Scheduler`] does the same for many generations, batching their model work.)
    pub fn step(&mut self) -> Result<Event> {
        let runtime = self.runtime.clone();
        if let Some(input) = self.input(PREFILL_CHUNK) {
            let logits = runtime.runner.forward(input.tokens, input.cache)?;
            self.evaluated(logits);
        }
        self.produce()
    }

    /// What must go through the model before the next event: the next chunk of the prompt
    /// (at most `max_prompt_tokens`, at least one) or the last sampled token. `None` when the
    /// next event needs no model work.
    pub(crate) fn input(&mut self, max_prompt_tokens: usize) -> Option<SeqInput<'_>> {
        if self.finished || self.logits.is_some() || self.params.max_tokens == 0 {
            return None;
        }
        self.started.get_or_insert_with(Instant::now);
        let done = self.cache.len();
        let tokens = if done < self.prompt.len() {
            let end = (done + max_prompt_tokens.max(1)).min(self.prompt.len());
            &self.prompt[done..end]
        } else {
            // The last sampled token, which is in the history but not yet in the cache.
            std::slice::from_ref(self.history.last()?)
        };
        Some(SeqInput {
            tokens,
            cache: &mut self.cache,
        })
    }

    /// The model ran [`input`](Self::input): `logits` are those of its last token.
    pub(crate) fn evaluated(&mut self, logits: Vec<f32>) {
        if self.cache.len() < self.prompt.len() {
            return;
        }
        if self.logits.is_none() && self.first_token_at.is_none() {
            self.prefill_time = self.started.map(|s| s.elapsed()).unwrap_or_default();
        }
        self.logits = Some(logits);
    }

    /// The next event, once the model has evaluated what [`input`](Self::input) asked for.
    pub(crate) fn produce(&mut self) -> Result<Event> {
        let event = self.next_event()?;
        match &event {
            Event::Token(piece) => self.answer.push_str(&piece.text),
            Event::Finished { text } => self.answer.push_str(text),
            Event::Prefilled => {}
        }
        Ok(event)
    }

    fn next_event(&mut self) -> Result<Event> {
        if self.finished {
            return Ok(Event::Finished {
                text: String::new(),
            });
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.params.max_tokens == 0 {
            let text = self.finish(FinishReason::Length);
            return Ok(Event::Finished { text });
        }
        let Some(mut logits) = self.logits.take() else {
            return Ok(Event::Prefilled);
        };

        let id = self.sample(&mut logits)?;
        let softmax = LogSoftmax::of(&logits);
        let logprob = softmax.at(&logits, id);
        let top_logprobs = softmax.top(&logits, self.params.top_logprobs);
        let now = Instant::now();
        if self.first_token_at.is_none() {
            self.first_token_at = Some(now);
            self.stats.time_to_first_token_s = (now - started).as_secs_f64();
        }
        if self.stop_ids.contains(&id) {
            let text = self.finish(FinishReason::Stop);
            return Ok(Event::Finished { text });
        }
        self.stats.generated_tokens += 1;
        self.history.push(id);
        let token_text = self.decoder.push(id).unwrap_or_default();
        self.held.push_str(&token_text);
        let piece = |text| Piece {
            id,
            logprob,
            top_logprobs: top_logprobs.clone(),
            token_text: token_text.clone(),
            text,
        };

        if let Some(at) = find_stop(&self.held, &self.params.stop) {
            let text = self.held[..at].to_string();
            // What follows the stop string is not part of the answer.
            self.held.clear();
            self.decoder = DecodeStream::new(self.runtime.tokenizer.clone(), false);
            self.finish(FinishReason::Stop);
            return Ok(Event::Token(piece(text)));
        }
        let keep = longest_stop_prefix(&self.held, &self.params.stop);
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);

        if self
            .constraint
            .as_ref()
            .is_some_and(ConstraintState::is_complete)
        {
            let tail = self.finish(FinishReason::Stop);
            return Ok(Event::Token(piece(text + &tail)));
        }
        if self.stats.generated_tokens >= self.params.max_tokens
            || self.cache.len() >= self.runtime.runner.context_length()
        {
            let tail = self.finish(FinishReason::Length);
            return Ok(Event::Token(piece(text + &tail)));
        }
        Ok(Event::Token(piece(text)))
    }

    /// The next token. Under a constraint the sampler's pick is checked first, which costs a
    /// walk of one token's bytes; only a refused pick pays for the whole mask and a second
    /// draw among the allowed tokens. Without top-k, top-p or min-p that is the distribution
    /// of masking first; with them, the first draw's cut-off is taken over every token.
    fn sample(&mut self, logits: &mut [f32]) -> Result<u32> {
        let Some(constraint) = &mut self.constraint else {
            return Ok(self.sampler.sample(logits, &self.history));
        };
        let mut id = self.sampler.propose(logits, &self.history, None);
        if !matches!(id, Some(first) if constraint.allows(first)?) {
            let mask = constraint.mask()?;
            id = self
                .sampler
                .propose(logits, &self.history, Some(&|t| mask.allows(t)));
        }
        let id = id.ok_or_else(|| Error::Grammar("the constraint allows no token here".into()))?;
        self.sampler.accept(id);
        constraint.advance(id)?;
        Ok(id)
    }

    /// Ends the generation and returns the text still held back: a possible stop-string start
    /// that never completed, and bytes that never completed a character.
    fn finish(&mut self, reason: FinishReason) -> String {
        self.finished = true;
        self.stats.finish_reason = Some(reason);
        if let Some(first) = self.first_token_at {
            let decode_time = first.elapsed().as_secs_f64();
            let decoded = self.stats.generated_tokens.saturating_sub(1);
            if decoded > 0 && decode_time > 0.0 {
                self.stats.decode_tokens_per_s = decoded as f64 / decode_time;
            }
        }
        let prefill = self.prefill_time.as_secs_f64();
        if prefill > 0.0 {
            let evaluated = self.prompt.len() - self.stats.cached_tokens;
            self.stats.prefill_tokens_per_s = evaluated as f64 / prefill;
        }
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&self.decoder.finish().unwrap_or_default());
        text
    }
}

impl Drop for Generation {
    /// Whether it finished or was abandoned, what the cache holds is valid for its tokens: it
    /// goes to the pool, and to the conversation with the answer so far.
    fn drop(&mut self) {
        let cache = std::mem::replace(&mut self.cache, self.runtime.runner.new_cache());
        let tokens = &self.history[..cache.len().min(self.history.len())];
        if let Some(conversation) = &self.conversation {
            let answer = std::mem::take(&mut self.answer);
            conversation.end_turn(answer, tokens.to_vec(), cache.clone());
        }
        self.runtime.prefix_pool.insert(tokens, cache);
    }
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string: text that
/// must be held back until the next tokens decide.
fn longest_stop_prefix(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|stop| {
            stop.char_indices()
                .skip(1)
                .map(|(i, _)| i)
                .filter(|&len| text.ends_with(&stop[..len]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat_template::Message;
    use crate::engine::{Engine, EngineOptions, Prompt};
    use crate::test_support::fixture;

    fn engine(cache_bytes: usize) -> Arc<Engine> {
        let options = EngineOptions {
            cache_bytes: Some(cache_bytes),
            ..EngineOptions::default()
        };
        Arc::new(Engine::load(&fixture("tiny-phi3-haiku-q4_k_m.gguf"), &options).unwrap())
    }

    /// The answer, the first token's log-probability and the stats of a greedy run.
    fn greedy(engine: &Arc<Engine>, prompt: &Prompt) -> (String, f32, Stats) {
        let params = GenerationParams {
            max_tokens: 40,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            ..GenerationParams::default()
        };
        let mut generation = engine.generate(prompt, params).unwrap();
        let (mut text, mut first) = (String::new(), None);
        loop {
            match generation.step().unwrap() {
                Event::Token(piece) => {
                    first.get_or_insert(piece.logprob);
                    text.push_str(&piece.text);
                }
                Event::Finished { text: tail } => {
                    text.push_str(&tail);
                    return (text, first.unwrap(), generation.stats().clone());
                }
                Event::Prefilled => {}
            }
        }
    }

    /// A conversation sent whole every turn, as chat clients do: with the pool, each turn
    /// evaluates only what the last one did not, and answers exactly as without it.
    #[test]
    fn prefix_reuse_is_exact() {
        let (pooled, plain) = (engine(1 << 30), engine(0));
        let mut messages = vec![Message::new("system", "You write haiku.")];
        for (turn, topic) in ["ice hockey", "autumn rain", "a lighthouse", "snow"]
            .iter()
            .enumerate()
        {
            messages.push(Message::new("user", format!("Write a haiku about {topic}")));
            let prompt = Prompt::Messages(messages.clone());
            let (text, logprob, stats) = greedy(&pooled, &prompt);
            let (want, want_logprob, want_stats) = greedy(&plain, &prompt);
            assert_eq!(text, want, "turn {turn}");
            assert!(
                (logprob - want_logprob).abs() < 1e-4,
                "{logprob} vs {want_logprob}"
            );
            assert_eq!(want_stats.cached_tokens, 0);
            if turn == 0 {
                assert_eq!(stats.cached_tokens, 0);
            } else {
                // The previous prompt and answer up to where the template's rendering of the
                // answer differs from the tokens generated (at most the end marker).
                let previous = pooled
                    .encode_prompt(&Prompt::Messages(messages[..messages.len() - 2].to_vec()))
                    .unwrap();
                assert!(stats.cached_tokens > previous.len(), "{stats:?}");
                assert!(stats.cached_tokens < stats.prompt_tokens);
            }
            messages.push(Message::new("assistant", text));
        }
        // The same prompt again: everything but its last token comes from the pool.
        let (_, _, stats) = greedy(&pooled, &Prompt::Text("Write a haiku about snow".into()));
        let (_, _, again) = greedy(&pooled, &Prompt::Text("Write a haiku about snow".into()));
        assert_eq!(again.cached_tokens, stats.prompt_tokens - 1);
        assert!(plain.prefix_pool().is_empty());
        assert!(pooled.prefix_pool().bytes() <= 1 << 30);
    }

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_the_earliest_stop_string() {
        assert_eq!(find_stop("a\n\nb END", &stops(&["END", "\n\n"])), Some(1));
        assert_eq!(find_stop("abc", &stops(&["x"])), None);
    }

    #[test]
    fn holds_back_a_possible_stop_start() {
        assert_eq!(longest_stop_prefix("hello E", &stops(&["END"])), 1);
        assert_eq!(longest_stop_prefix("hello EN", &stops(&["END"])), 2);
        assert_eq!(longest_stop_prefix("hello", &stops(&["END"])), 0);
        // Multi-byte characters: lengths stay on character boundaries.
        assert_eq!(longest_stop_prefix("x é", &stops(&["éa"])), "é".len());
    }
}
