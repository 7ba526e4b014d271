//! `phi3.Phi3`: a loaded model, shared by every stream made from it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::{PyFileNotFoundError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use super::chat::PyChat;
use super::convert::{self, type_name};
use super::errors::detached;
use super::options::{Caller, StreamOptions};
use super::stream::PyStream;
use crate::engine::{Engine, EngineOptions};
use crate::hub;
use crate::model::kv_cache::KvType;

/// Where the model file comes from.
enum ModelSource {
    Local(PathBuf),
    Hub {
        repo: String,
        filename: String,
        revision: String,
    },
}

/// A Phi-family model loaded from a GGUF file, ready to stream answers.
#[pyclass(name = "Phi3", module = "phi3", frozen)]
pub struct PyPhi3 {
    engine: Arc<Engine>,
    /// What it was loaded with, so that a pickled model re-opens the same way.
    options: EngineOptions,
}

/// `os.fspath(obj)` for str and path-like objects.
fn fspath(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let os = obj.py().import("os")?;
    os.call_method1("fspath", (obj,))
        .and_then(|p| p.extract::<String>())
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "{what} must be a str or a path, got {}",
                type_name(obj)
            ))
        })
}

/// "owner/name": what a hub repository id looks like (a local path would exist).
fn looks_like_repo(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty())
        && !s.ends_with(".gguf")
        && !s.starts_with('.')
}

fn model_source(
    model: Option<&Bound<'_, PyAny>>,
    filename: Option<String>,
    revision: Option<String>,
) -> PyResult<ModelSource> {
    let Some(model) = model.filter(|m| !m.is_none()) else {
        return Ok(ModelSource::Hub {
            repo: hub::DEFAULT_REPO.into(),
            filename: filename.unwrap_or_else(|| hub::DEFAULT_FILE.into()),
            revision: revision.unwrap_or_else(|| hub::DEFAULT_REVISION.into()),
        });
    };
    let model = fspath(model, "model")?;
    let path = PathBuf::from(&model);
    if path.exists() {
        if filename.is_some() || revision.is_some() {
            return Err(PyValueError::new_err(format!(
                "filename and revision apply to hub repositories, but model '{model}' is a local path"
            )));
        }
        return Ok(ModelSource::Local(path));
    }
    if !looks_like_repo(&model) {
        return Err(PyFileNotFoundError::new_err(format!(
            "no such file: {model}"
        )));
    }
    let filename = match filename {
        Some(f) => f,
        None if model == hub::DEFAULT_REPO => hub::DEFAULT_FILE.into(),
        None => {
            return Err(PyValueError::new_err(format!(
                "filename: which .gguf file of the hub repository '{model}' to load?"
            )))
        }
    };
    Ok(ModelSource::Hub {
        repo: model,
        filename,
        revision: revision.unwrap_or_else(|| hub::DEFAULT_REVISION.into()),
    })
}

fn tokenizer_path(
    py: Python<'_>,
    tokenizer: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<PathBuf>> {
    let Some(tokenizer) = tokenizer.filter(|t| !t.is_none()) else {
        return Ok(None);
    };
    let spec = fspath(tokenizer, "tokenizer")?;
    let path = PathBuf::from(&spec);
    if path.exists() {
        return Ok(Some(path));
    }
    if !looks_like_repo(&spec) {
        return Err(PyFileNotFoundError::new_err(format!(
            "no such file: {spec}"
        )));
    }
    let progress = std::io::stderr().is_terminal();
    detached(py, || {
        hub::fetch(&spec, "tokenizer.json", hub::DEFAULT_REVISION, progress)
    })
    .map(Some)
}

/// A count argument that is `None` (the default) or at least `min`.
fn at_least(value: Option<i64>, min: i64, name: &str) -> PyResult<Option<usize>> {
    value
        .map(|v| match usize::try_from(v) {
            Ok(n) if v >= min => Ok(n),
            _ => Err(PyValueError::new_err(format!(
                "{name} must be >= {min}, got {v}"
            ))),
        })
        .transpose()
}

/// The `kv_cache` argument: `None` (f16) or a [`KvType`]'s name.
fn kv_type(value: Option<&str>) -> PyResult<KvType> {
    match value {
        None => Ok(KvType::default()),
        Some(name) => KvType::parse(name).ok_or_else(|| {
            let names: Vec<_> = KvType::ALL
                .iter()
                .map(|t| format!("{:?}", t.name()))
                .collect();
            PyValueError::new_err(format!(
                "kv_cache must be one of {}, got {name:?}",
                names.join(", ")
            ))
        }),
    }
}

/// `phi3._openai.<function>(model, first, **fields)`: the OpenAI protocol is Python's.
fn openai<'py>(
    model: &Bound<'py, PyPhi3>,
    function: &str,
    first: &Bound<'py, PyAny>,
    fields: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    model
        .py()
        .import("phi3._openai")?
        .getattr(function)?
        .call((model, first), fields)
}

#[pymethods]
impl PyPhi3 {
    #[new]
    #[pyo3(signature = (model=None, *, filename=None, revision=None, tokenizer=None, threads=None, context_length=None, cache_bytes=None, max_batch=None, kv_cache=None, mapped_weights=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: Option<&Bound<'_, PyAny>>,
        filename: Option<String>,
        revision: Option<String>,
        tokenizer: Option<&Bound<'_, PyAny>>,
        threads: Option<i64>,
        context_length: Option<i64>,
        cache_bytes: Option<i64>,
        max_batch: Option<i64>,
        kv_cache: Option<&str>,
        mapped_weights: bool,
    ) -> PyResult<Self> {
        let options = EngineOptions {
            threads: at_least(threads, 1, "threads")?,
            context_length: at_least(context_length, 1, "context_length")?,
            cache_bytes: at_least(cache_bytes, 0, "cache_bytes")?,
            max_batch: at_least(max_batch, 1, "max_batch")?,
            kv_cache: kv_type(kv_cache)?,
            mapped_weights,
            tokenizer: None,
        };
        let source = model_source(model, filename, revision)?;
        let options = EngineOptions {
            tokenizer: tokenizer_path(py, tokenizer)?,
            ..options
        };
        let progress = std::io::stderr().is_terminal();
        let engine = detached(py, || {
            let path = match &source {
                ModelSource::Local(path) => path.clone(),
                ModelSource::Hub {
                    repo,
                    filename,
                    revision,
                } => hub::fetch(repo, filename, revision, progress)?,
            };
            Engine::load(&path, &options)
        })?;
        Ok(Self {
            engine: Arc::new(engine),
            options,
        })
    }

    /// Pickling: the model re-opens from its file (a hub download is its cached file) with the
    /// options it was loaded with, in the process that unpickles it. Nothing else is carried.
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let kwargs = PyDict::new(py);
        let o = &self.options;
        kwargs.set_item("threads", o.threads)?;
        kwargs.set_item("context_length", o.context_length)?;
        kwargs.set_item("cache_bytes", o.cache_bytes)?;
        kwargs.set_item("max_batch", o.max_batch)?;
        kwargs.set_item("kv_cache", o.kv_cache.name())?;
        kwargs.set_item("mapped_weights", o.mapped_weights)?;
        let tokenizer = o.tokenizer.as_ref().map(|t| t.display().to_string());
        kwargs.set_item("tokenizer", tokenizer)?;
        let class = py.get_type::<Self>();
        let reopen = py
            .import("functools")?
            .getattr("partial")?
            .call((class,), Some(&kwargs))?;
        Ok((reopen, (self.engine.path().display().to_string(),)))
    }

    /// Starts generating an answer to `prompt`; iterate the result for text pieces. The
    /// options are keyword arguments (see the stubs for their defaults).
    #[pyo3(signature = (prompt, **options))]
    fn stream<'py>(
        &self,
        py: Python<'py>,
        prompt: &Bound<'py, PyAny>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<PyStream> {
        let options = StreamOptions::from_dicts(options.as_slice(), Caller::Stream)?;
        let prompt = convert::prompt(prompt, options.raw)?;
        let params = options.params()?;
        let engine = &self.engine;
        let handle = detached(py, || {
            let generation = engine.generate(&prompt, params)?;
            Ok(engine.submit(generation))
        })?;
        Ok(PyStream::new(handle, engine.clone(), options.details))
    }

    /// The whole answer to `prompt` as one string (same options as `stream`).
    #[pyo3(signature = (prompt, **options))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: &Bound<'py, PyAny>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<String> {
        self.stream(py, prompt, options)?.collect(py)
    }

    /// `stream()` as an async iterator that waits for each piece in a worker thread, so that
    /// the event loop never blocks (see `phi3._aio`).
    #[pyo3(signature = (prompt, **options))]
    fn astream<'py>(
        &self,
        py: Python<'py>,
        prompt: &Bound<'py, PyAny>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let stream = self.stream(py, prompt, options)?;
        py.import("phi3._aio")?
            .call_method1("AsyncStream", (stream,))
    }

    /// `generate()` as a coroutine.
    #[pyo3(signature = (prompt, **options))]
    fn agenerate<'py>(
        &self,
        py: Python<'py>,
        prompt: &Bound<'py, PyAny>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.stream(py, prompt, options)?.into_coroutine(py)
    }

    /// An OpenAI chat completion (a dict, or an iterator of chunk dicts with `stream=True`), as
    /// phi3's server answers it; the protocol lives in `phi3._openai`.
    #[pyo3(signature = (messages, **fields))]
    fn create_chat_completion<'py>(
        slf: &Bound<'py, Self>,
        messages: &Bound<'py, PyAny>,
        fields: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        openai(slf, "create_chat_completion", messages, fields)
    }

    /// An OpenAI (legacy) text completion of `prompt`, without the chat template.
    #[pyo3(signature = (prompt, **fields))]
    fn create_completion<'py>(
        slf: &Bound<'py, Self>,
        prompt: &Bound<'py, PyAny>,
        fields: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        openai(slf, "create_completion", prompt, fields)
    }

    /// How many streams share one pass over the weights.
    #[getter]
    fn max_batch(&self) -> usize {
        self.engine.scheduler().max_batch()
    }

    /// How the KV caches store keys and values: "f16" or "q8_0".
    #[getter]
    fn kv_cache(&self) -> &'static str {
        self.engine.model().kv_type().name()
    }

    /// Whether the weights were left in the file's memory map (not repacked).
    #[getter]
    fn mapped_weights(&self) -> bool {
        self.options.mapped_weights
    }

    /// Streams in the running batch now.
    #[getter]
    fn active_streams(&self) -> usize {
        self.engine.scheduler().active()
    }

    /// Streams waiting for a place in the batch now.
    #[getter]
    fn queued_streams(&self) -> usize {
        self.engine.scheduler().queued()
    }

    /// A conversation with this model; `options` are the defaults of its turns (those of
    /// `stream`, less `raw`).
    #[pyo3(signature = (system=None, **options))]
    fn chat(
        &self,
        py: Python<'_>,
        system: Option<&Bound<'_, PyAny>>,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyChat> {
        let system = match system.filter(|s| !s.is_none()) {
            None => None,
            Some(s) => Some(s.extract::<String>().map_err(|_| {
                PyTypeError::new_err(format!("system must be a str, got {}", type_name(s)))
            })?),
        };
        let defaults = match options {
            Some(options) => options.copy()?,
            None => PyDict::new(py),
        };
        // Checked now, so that a bad option fails here and not at the first turn.
        StreamOptions::from_dicts(&[&defaults], Caller::Chat)?.params()?;
        Ok(PyChat::new(self.engine.clone(), system, defaults.unbind()))
    }

    /// Token ids of `text` (`special`: recognise special tokens such as `<|user|>`).
    #[pyo3(signature = (text, add_bos=true, special=true))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: &str,
        add_bos: bool,
        special: bool,
    ) -> PyResult<Vec<u32>> {
        let engine = &self.engine;
        detached(py, || engine.tokenize(text, add_bos, special))
    }

    /// The text of token ids.
    fn detokenize(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<String> {
        if ids.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err("ids must be a list of int, got str"));
        }
        let ids: Vec<u32> = ids
            .try_iter()
            .map_err(|_| {
                PyTypeError::new_err(format!("ids must be a list of int, got {}", type_name(ids)))
            })?
            .enumerate()
            .map(|(i, item)| convert::token_id(&item?, &format!("ids[{i}]")))
            .collect::<PyResult<_>>()?;
        let engine = &self.engine;
        detached(py, || engine.detokenize(&ids))
    }

    /// The prompt text the chat template makes of `messages`.
    #[pyo3(signature = (messages, add_generation_prompt=true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let messages = convert::messages(messages)?;
        let engine = &self.engine;
        detached(py, || {
            engine.apply_chat_template(&messages, add_generation_prompt)
        })
    }

    /// Positions the model serves (prompt and answer together).
    #[getter]
    fn context_length(&self) -> usize {
        self.engine.context_length()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.engine.vocab_size()
    }

    /// Worker threads the model runs on.
    #[getter]
    fn threads(&self) -> usize {
        self.engine.threads()
    }

    /// The GGUF key/values that are not arrays (a fresh dict on each access).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (key, value) in self.engine.metadata() {
            dict.set_item(key, convert::metadata_value(py, value)?)?;
        }
        Ok(dict)
    }

    /// The model file's path.
    #[getter]
    fn path(&self) -> String {
        self.engine.path().display().to_string()
    }

    fn __repr__(&self) -> String {
        format!(
            "Phi3({:?}, context_length={}, threads={})",
            self.engine.path().display().to_string(),
            self.engine.context_length(),
            self.engine.threads()
        )
    }
}
