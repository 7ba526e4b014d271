//! The iterator `Phi3.stream()` returns, and the objects it yields.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::IntoPyObjectExt;

use super::errors::{detached, to_py_err};
use crate::engine::Engine;
use crate::generate::{Event, Piece, Stats, StreamHandle};

/// How long a wait for the next event goes without a look for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// One generated token (what `stream(..., details=True)` yields).
#[pyclass(name = "Token", module = "phi3", frozen)]
pub struct PyToken {
    /// Token id.
    #[pyo3(get)]
    pub id: u32,
    /// The text this token completes (whole characters; may be empty mid-character).
    #[pyo3(get)]
    pub text: String,
    /// Log-softmax of the raw logits at `id`.
    #[pyo3(get)]
    pub logprob: f32,
    /// The most likely tokens at this step, most likely first: (text, logprob) pairs, as many
    /// as `top_logprobs` asked for.
    #[pyo3(get)]
    pub top_logprobs: Vec<(String, f32)>,
    raw_bytes: Vec<u8>,
}

impl PyToken {
    fn new(piece: Piece, engine: &Engine) -> Self {
        let tokenizer = engine.tokenizer();
        let bytes_of = |id| tokenizer.token_bytes(id).unwrap_or_default();
        Self {
            id: piece.id,
            raw_bytes: bytes_of(piece.id).to_vec(),
            top_logprobs: piece
                .top_logprobs
                .iter()
                .map(|&(id, lp)| (String::from_utf8_lossy(bytes_of(id)).into_owned(), lp))
                .collect(),
            text: piece.token_text,
            logprob: piece.logprob,
        }
    }
}

#[pymethods]
impl PyToken {
    /// The token's own bytes (part of a character for a byte-fallback token).
    #[getter]
    fn bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.raw_bytes)
    }

    fn __repr__(&self) -> String {
        format!(
            "Token(id={}, text={:?}, logprob={:.5})",
            self.id, self.text, self.logprob
        )
    }
}

/// Counts and speeds of one generation.
#[pyclass(name = "Stats", module = "phi3", frozen, get_all)]
#[derive(Clone)]
pub struct PyStats {
    pub prompt_tokens: usize,
    /// Prompt tokens that came from the prefix pool or the chat's own cache, not evaluated.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// "stop" (end-of-text token or stop string), "length" (max_tokens or context full), or
    /// None while the generation runs (or if it was closed early).
    pub finish_reason: Option<&'static str>,
    pub time_to_first_token_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

impl From<&Stats> for PyStats {
    fn from(s: &Stats) -> Self {
        Self {
            prompt_tokens: s.prompt_tokens,
            cached_tokens: s.cached_tokens,
            generated_tokens: s.generated_tokens,
            finish_reason: s.finish_reason.map(|r| r.as_str()),
            time_to_first_token_s: s.time_to_first_token_s,
            prefill_tokens_per_s: s.prefill_tokens_per_s,
            decode_tokens_per_s: s.decode_tokens_per_s,
        }
    }
}

#[pymethods]
impl PyStats {
    fn __repr__(&self) -> String {
        format!(
            "Stats(prompt_tokens={}, cached_tokens={}, generated_tokens={}, finish_reason={}, \
             time_to_first_token_s={:.4}, prefill_tokens_per_s={:.2}, decode_tokens_per_s={:.2})",
            self.prompt_tokens,
            self.cached_tokens,
            self.generated_tokens,
            self.finish_reason
                .map_or_else(|| "None".to_string(), |r| format!("'{r}'")),
            self.time_to_first_token_s,
            self.prefill_tokens_per_s,
            self.decode_tokens_per_s
        )
    }
}

/// What `Phi3.stream()` returns: iterate it for `str` pieces (or `Token`s with `details=True`).
#[pyclass(name = "Stream", module = "phi3")]
pub struct PyStream {
    /// `None` once finished or closed: dropping it ends the generation and frees its place.
    handle: Option<StreamHandle>,
    engine: Arc<Engine>,
    details: bool,
    stats: Stats,
    /// The answer released so far (with `details`, the tokens' texts less stop strings).
    text: String,
    /// (characters, bytes) of `text` up to where `text_since` last ended, so that reading the
    /// answer piece by piece costs O(answer), not O(answer²).
    since: (usize, usize),
}

impl PyStream {
    pub fn new(handle: StreamHandle, engine: Arc<Engine>, details: bool) -> Self {
        let stats = handle.stats();
        Self {
            handle: Some(handle),
            engine,
            details,
            stats,
            text: String::new(),
            since: (0, 0),
        }
    }

    /// This stream for `async for` (`phi3._aio.AsyncStream`).
    pub fn into_async(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        py.import("phi3._aio")?.call_method1("AsyncStream", (self,))
    }

    /// A coroutine of the whole answer (`phi3._aio.collect`).
    pub fn into_coroutine(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        py.import("phi3._aio")?.call_method1("collect", (self,))
    }

    /// The whole answer, read without making a Python object per piece.
    pub fn collect(mut self, py: Python<'_>) -> PyResult<String> {
        let Some(mut handle) = self.handle.take() else {
            return Ok(String::new());
        };
        let mut answer = String::new();
        loop {
            match next_event(py, &mut handle)? {
                Event::Prefilled => {}
                Event::Token(piece) => answer.push_str(&piece.text),
                Event::Finished { text } => {
                    answer.push_str(&text);
                    return Ok(answer);
                }
            }
        }
    }
}

/// Waits for the next event with the GIL released, looking for Ctrl-C every [`SIGNAL_POLL`].
fn next_event(py: Python<'_>, handle: &mut StreamHandle) -> PyResult<Event> {
    loop {
        let event = detached(py, || Ok(handle.next_timeout(SIGNAL_POLL)))?;
        py.check_signals()?;
        if let Some(event) = event {
            return event.map_err(|e| to_py_err(py, e));
        }
    }
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        loop {
            let Some(handle) = self.handle.as_mut() else {
                return Ok(None);
            };
            let event = next_event(py, handle);
            self.stats = handle.stats();
            let event = match event {
                Ok(event) => event,
                Err(err) => {
                    // Interrupted or failed: the generation cannot go on; free its memory.
                    self.handle = None;
                    return Err(err);
                }
            };
            match event {
                Event::Prefilled => continue,
                Event::Token(piece) if self.details => {
                    self.text.push_str(&piece.text);
                    let token = PyToken::new(piece, &self.engine);
                    return Ok(Some(token.into_py_any(py)?));
                }
                Event::Token(piece) if !piece.text.is_empty() => {
                    self.text.push_str(&piece.text);
                    return Ok(Some(piece.text.into_py_any(py)?));
                }
                Event::Token(_) => continue,
                Event::Finished { text } => {
                    self.handle = None;
                    self.text.push_str(&text);
                    if !self.details && !text.is_empty() {
                        return Ok(Some(text.into_py_any(py)?));
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// The answer so far: every piece released, stop strings left out (also with `details`,
    /// where the tokens' own texts include them).
    #[getter]
    fn text(&self) -> &str {
        &self.text
    }

    /// The answer from its `start`-th character on: what was released since a reader that has
    /// `start` characters of it. O(what is returned) when `start` only grows.
    fn text_since(&mut self, start: usize) -> &str {
        let (mut chars, mut byte) = self.since;
        if start < chars {
            (chars, byte) = (0, 0);
        }
        match self.text[byte..].char_indices().nth(start - chars) {
            Some((i, _)) => {
                let tail = &self.text[byte + i..];
                self.since = (start + tail.chars().count(), self.text.len());
                tail
            }
            // The reader has it all (or claims more than there is).
            None => {
                self.since = (chars + self.text[byte..].chars().count(), self.text.len());
                ""
            }
        }
    }

    /// Counts and speeds so far; complete once the iterator is exhausted.
    #[getter]
    fn stats(&self) -> PyStats {
        match &self.handle {
            Some(handle) => PyStats::from(&handle.stats()),
            None => PyStats::from(&self.stats),
        }
    }

    /// Ends the generation now and frees its memory.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(handle) = self.handle.take() {
            detached(py, || {
                handle.close();
                Ok(())
            })?;
        }
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(
        &mut self,
        py: Python<'_>,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.close(py)
    }
}
