//! Python exceptions, one per kind of engine error, and the guard every long call goes through.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::{Culprit, Error};

pyo3::create_exception!(
    phi3,
    Phi3Error,
    PyRuntimeError,
    "Base class of phi3's errors: model and runtime failures."
);
pyo3::create_exception!(
    phi3,
    ModelFileError,
    Phi3Error,
    "The model file is not valid GGUF, or not a model phi3 can run; `key` or `tensor` names what is at fault, where one is."
);
pyo3::create_exception!(
    phi3,
    TokenizerError,
    Phi3Error,
    "The vocabulary could not be built or used."
);
pyo3::create_exception!(
    phi3,
    ChatTemplateError,
    Phi3Error,
    "The chat template failed to compile or render, or went over a sandbox limit."
);
pyo3::create_exception!(
    phi3,
    DownloadError,
    Phi3Error,
    "A model file could not be fetched from the hub or found in its cache."
);

static CONTEXT_LENGTH_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static GRAMMAR_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A `Phi3Error` that is also a `ValueError`: a runtime limit of the model and a bad argument
/// at once. Rust's exception macro takes one base, so the class is made the way Python makes
/// classes: by calling `type`.
fn value_error_class<'py>(
    py: Python<'py>,
    cell: &'py PyOnceLock<Py<PyType>>,
    name: &str,
    doc: &str,
) -> PyResult<&'py Bound<'py, PyType>> {
    cell.get_or_try_init(py, || {
        let bases = PyTuple::new(
            py,
            [py.get_type::<Phi3Error>(), py.get_type::<PyValueError>()],
        )?;
        let namespace = PyDict::new(py);
        namespace.set_item("__module__", "phi3")?;
        namespace.set_item("__doc__", doc)?;
        let class = py.get_type::<PyType>().call1((name, bases, namespace))?;
        Ok(class.cast_into::<PyType>()?.unbind())
    })
    .map(|t| t.bind(py))
}

/// `ContextLengthError(Phi3Error, ValueError)`.
fn context_length_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    value_error_class(
        py,
        &CONTEXT_LENGTH_ERROR,
        "ContextLengthError",
        "The prompt does not fit in the context (`prompt_tokens`, `context_length`).",
    )
}

/// `GrammarError(Phi3Error, ValueError)`.
fn grammar_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    value_error_class(
        py,
        &GRAMMAR_ERROR,
        "GrammarError",
        "A JSON schema, regular expression or grammar is invalid, unsupported or over a limit, \
         or went over its budget while generating; the message says which.",
    )
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Phi3Error", py.get_type::<Phi3Error>())?;
    m.add("ModelFileError", py.get_type::<ModelFileError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("ChatTemplateError", py.get_type::<ChatTemplateError>())?;
    m.add("DownloadError", py.get_type::<DownloadError>())?;
    m.add("ContextLengthError", context_length_error(py)?)?;
    m.add("GrammarError", grammar_error(py)?)?;
    Ok(())
}

pub fn to_py_err(py: Python<'_>, err: Error) -> PyErr {
    let msg = err.to_string();
    match &err {
        Error::FileNotFound(_) => PyFileNotFoundError::new_err(msg),
        // As polars maps them: a failed read is the OS's error, not the model's.
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, msg)),
            None => PyOSError::new_err(msg),
        },
        Error::InvalidGguf { .. } | Error::UnsupportedModel { .. } => {
            let (key, tensor) = match err.culprit() {
                Some(Culprit::Key(k)) => (Some(k.as_str()), None),
                Some(Culprit::Tensor(t)) => (None, Some(t.as_str())),
                None => (None, None),
            };
            with_attributes(
                py,
                ModelFileError::new_err(msg),
                &[("key", key), ("tensor", tensor)],
            )
        }
        Error::Tokenizer(_) => TokenizerError::new_err(msg),
        Error::ChatTemplate(_) => ChatTemplateError::new_err(msg),
        Error::ContextOverflow {
            prompt_tokens,
            context_length,
        } => match context_length_error(py) {
            Ok(class) => with_attributes(
                py,
                PyErr::from_type(class.clone(), msg),
                &[
                    ("prompt_tokens", Some(*prompt_tokens)),
                    ("context_length", Some(*context_length)),
                ],
            ),
            Err(e) => e,
        },
        Error::Grammar(_) => match grammar_error(py) {
            Ok(class) => PyErr::from_type(class.clone(), msg),
            Err(e) => e,
        },
        Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::Hub(_) => DownloadError::new_err(msg),
        Error::Compute(_) | Error::Internal(_) => Phi3Error::new_err(msg),
    }
}

/// `err` with `attributes` set on its instance (`None` as Python's `None`), so that callers
/// read what was at fault without parsing the message.
fn with_attributes<'py, T>(py: Python<'py>, err: PyErr, attributes: &[(&str, Option<T>)]) -> PyErr
where
    T: IntoPyObject<'py> + Copy,
{
    let value = err.value(py);
    for (name, v) in attributes {
        if let Err(e) = value.setattr(*name, *v) {
            return e;
        }
    }
    err
}

/// Runs `work` without the GIL, so other Python threads go on, and turns a panic into a
/// `Phi3Error` (PyO3's `PanicException` is a `BaseException` that `except Exception` misses).
pub fn detached<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    F: FnOnce() -> crate::Result<T> + Send,
    T: Send,
{
    match py.detach(|| catch_unwind(AssertUnwindSafe(work))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(to_py_err(py, err)),
        Err(panic) => Err(to_py_err(
            py,
            Error::Internal(crate::error::panic_message(panic.as_ref())),
        )),
    }
}
