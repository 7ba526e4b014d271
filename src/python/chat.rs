//! `phi3.Chat`: a conversation with a model, which keeps its KV cache between turns.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use super::convert::type_name;
use super::errors::detached;
use super::options::{Caller, StreamOptions};
use super::stream::PyStream;
use crate::engine::Engine;
use crate::generate::conversation::Conversation;

/// A conversation: each turn appends the user's message and the answer, and evaluates only the
/// tokens that are new since the last turn.
#[pyclass(name = "Chat", module = "phi3", frozen)]
pub struct PyChat {
    engine: Arc<Engine>,
    conversation: Arc<Conversation>,
    /// The options given to `Phi3.chat()`, which each turn's keyword arguments override.
    defaults: Py<PyDict>,
}

impl PyChat {
    pub fn new(engine: Arc<Engine>, system: Option<String>, defaults: Py<PyDict>) -> Self {
        Self {
            engine,
            conversation: Arc::new(Conversation::new(system)),
            defaults,
        }
    }
}

fn user_text(text: &Bound<'_, PyAny>) -> PyResult<String> {
    if !text.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "text must be a str, got {}",
            type_name(text)
        )));
    }
    text.extract()
}

#[pymethods]
impl PyChat {
    /// Appends the user message `text` and streams the answer, which is appended as it ends
    /// (also when the stream is closed early: then with the text generated so far).
    #[pyo3(signature = (text, **overrides))]
    fn stream(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyAny>,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyStream> {
        let text = user_text(text)?;
        let defaults = self.defaults.bind(py);
        let dicts: Vec<&Bound<'_, PyDict>> = std::iter::once(defaults).chain(overrides).collect();
        let options = StreamOptions::from_dicts(&dicts, Caller::Chat)?;
        let params = options.params()?;
        let (engine, conversation) = (&self.engine, &self.conversation);
        let handle = detached(py, || {
            let generation = engine.turn(conversation, &text, params)?;
            Ok(engine.submit(generation))
        })?;
        Ok(PyStream::new(handle, engine.clone(), options.details))
    }

    /// The whole answer to `text` as one string (same options as `stream`).
    #[pyo3(signature = (text, **overrides))]
    fn generate(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyAny>,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        self.stream(py, text, overrides)?.collect(py)
    }

    /// `stream()` as an async iterator that never blocks the event loop.
    #[pyo3(signature = (text, **overrides))]
    fn astream<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
        overrides: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let stream = self.stream(py, text, overrides)?;
        py.import("phi3._aio")?
            .call_method1("AsyncStream", (stream,))
    }

    /// `generate()` as a coroutine.
    #[pyo3(signature = (text, **overrides))]
    fn agenerate<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
        overrides: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.stream(py, text, overrides)?.into_coroutine(py)
    }

    /// The conversation so far: `{"role", "content"}` dicts (a fresh list on each access).
    #[getter]
    fn messages<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for message in self.conversation.messages() {
            let dict = PyDict::new(py);
            dict.set_item("role", &message.role)?;
            dict.set_item("content", &message.content)?;
            list.append(dict)?;
        }
        Ok(list)
    }

    /// Forgets the turns (the system message stays) and their cache.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        let conversation = &self.conversation;
        detached(py, || conversation.reset())
    }

    fn __repr__(&self) -> String {
        format!("Chat(messages={})", self.conversation.messages().len())
    }
}
