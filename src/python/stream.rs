//! The iterator `Phi3.stream()` returns, and the objects it yields.

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

use super::errors::detached;
use crate::generate::{Event, Generation, Stats};

/// One generated token (what `stream(..., details=True)` yields).
#[pyclass(name = "Token", module = "phi3", frozen, get_all)]
pub struct PyToken {
    /// Token id.
    pub id: u32,
    /// The text this token completes (whole characters; may be empty mid-character).
    pub text: String,
    /// Log-softmax of the raw logits at `id`.
    pub logprob: f32,
}

#[pymethods]
impl PyToken {
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
            "Stats(prompt_tokens={}, generated_tokens={}, finish_reason={}, \
             time_to_first_token_s={:.4}, prefill_tokens_per_s={:.2}, decode_tokens_per_s={:.2})",
            self.prompt_tokens,
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
    /// `None` once finished or closed: the KV cache is freed with it.
    generation: Option<Generation>,
    details: bool,
    stats: Stats,
}

impl PyStream {
    pub fn new(generation: Generation, details: bool) -> Self {
        let stats = generation.stats().clone();
        Self {
            generation: Some(generation),
            details,
            stats,
        }
    }

    /// The generation, to drive without yielding pieces one by one.
    pub fn into_generation(self) -> Option<Generation> {
        self.generation
    }
}

/// One step of work with the GIL released, then a look for Ctrl-C.
pub fn next_event(py: Python<'_>, generation: &mut Generation) -> PyResult<Event> {
    let event = detached(py, || generation.step());
    py.check_signals()?;
    event
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        loop {
            let Some(generation) = self.generation.as_mut() else {
                return Ok(None);
            };
            let event = next_event(py, generation);
            self.stats = generation.stats().clone();
            let event = match event {
                Ok(event) => event,
                Err(err) => {
                    // Interrupted or failed: the generation cannot go on; free its memory.
                    self.generation = None;
                    return Err(err);
                }
            };
            match event {
                Event::Prefilled => continue,
                Event::Token(piece) if self.details => {
                    let token = PyToken {
                        id: piece.id,
                        text: piece.token_text,
                        logprob: piece.logprob,
                    };
                    return Ok(Some(token.into_py_any(py)?));
                }
                Event::Token(piece) if !piece.text.is_empty() => {
                    return Ok(Some(piece.text.into_py_any(py)?));
                }
                Event::Token(_) => continue,
                Event::Finished { text } => {
                    self.generation = None;
                    if !self.details && !text.is_empty() {
                        return Ok(Some(text.into_py_any(py)?));
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Counts and speeds so far; complete once the iterator is exhausted.
    #[getter]
    fn stats(&self) -> PyStats {
        PyStats::from(&self.stats)
    }

    /// Ends the generation now and frees its memory.
    fn close(&mut self) {
        self.generation = None;
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(
        &mut self,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.close();
    }
}
