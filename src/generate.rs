//! The generation loop: batched prefill, sampling, stop tokens and stop strings, incremental
//! UTF-8-safe text, timings. Driven one step at a time so that a caller (the Python iterator)
//! can check for interruption between steps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::KvCache;
use crate::sampling::{log_prob, Sampler, SamplingParams};
use crate::tokenizer::DecodeStream;

/// Prompt tokens per forward pass while prefilling.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are not part of the answer.
    pub stop: Vec<String>,
    /// Keep going past end-of-text tokens (until `max_tokens` or the context is full).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 512,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::invalid_argument("stop strings must not be empty"));
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
    engine: Arc<Engine>,
    params: GenerationParams,
    prompt: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    decoder: DecodeStream,
    stop_ids: Vec<u32>,
    /// Prompt and generated tokens, for the repeat penalty.
    history: Vec<u32>,
    /// Logits for the next token, once the prompt is in.
    logits: Option<Vec<f32>>,
    /// Released answer text not yet passed on (a possible stop-string start).
    held: String,
    stats: Stats,
    started: Option<Instant>,
    first_token_at: Option<Instant>,
    prefill_time: Duration,
    finished: bool,
}

impl Generation {
    pub(crate) fn new(
        engine: Arc<Engine>,
        prompt: Vec<u32>,
        params: GenerationParams,
    ) -> Result<Self> {
        params.validate()?;
        let context = engine.context_length();
        if prompt.is_empty() {
            return Err(Error::invalid_argument("prompt: no tokens to start from"));
        }
        if prompt.len() > context {
            return Err(Error::ContextOverflow {
                prompt_tokens: prompt.len(),
                context_length: context,
            });
        }
        engine.check_token_ids(&prompt)?;
        let cache = engine.model().new_cache();
        let decoder = DecodeStream::new(engine.tokenizer().clone(), true);
        let stop_ids = if params.ignore_eos {
            Vec::new()
        } else {
            engine.tokenizer().stop_ids()
        };
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone()),
            stats: Stats {
                prompt_tokens: prompt.len(),
                ..Stats::default()
            },
            history: prompt.clone(),
            engine,
            params,
            prompt,
            cache,
            decoder,
            stop_ids,
            logits: None,
            held: String::new(),
            started: None,
            first_token_at: None,
            prefill_time: Duration::ZERO,
            finished: false,
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Does one unit of work: a chunk of the prompt, or one token.
    pub fn step(&mut self) -> Result<Event> {
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
            let done = self.cache.len();
            let chunk = &self.prompt[done..(done + PREFILL_CHUNK).min(self.prompt.len())];
            let logits = self.engine.forward(chunk, &mut self.cache)?;
            if self.cache.len() == self.prompt.len() {
                self.logits = Some(logits);
                self.prefill_time = started.elapsed();
            }
            return Ok(Event::Prefilled);
        };

        let logprob_source = logits.clone();
        let id = self.sampler.sample(&mut logits, &self.history);
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
            logprob: log_prob(&logprob_source, id),
            token_text: token_text.clone(),
            text,
        };

        if let Some(at) = find_stop(&self.held, &self.params.stop) {
            let text = self.held[..at].to_string();
            // What follows the stop string is not part of the answer.
            self.held.clear();
            self.decoder = DecodeStream::new(self.engine.tokenizer().clone(), false);
            self.finish(FinishReason::Stop);
            return Ok(Event::Token(piece(text)));
        }
        let keep = longest_stop_prefix(&self.held, &self.params.stop);
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);

        if self.stats.generated_tokens >= self.params.max_tokens
            || self.cache.len() >= self.engine.context_length()
        {
            let tail = self.finish(FinishReason::Length);
            return Ok(Event::Token(piece(text + &tail)));
        }
        self.logits = Some(self.engine.forward(&[id], &mut self.cache)?);
        Ok(Event::Token(piece(text)))
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
            self.stats.prefill_tokens_per_s = self.prompt.len() as f64 / prefill;
        }
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&self.decoder.finish().unwrap_or_default());
        text
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
