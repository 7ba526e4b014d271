//! Python arguments to engine types, checked before any work, with errors naming the argument.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyMapping, PyString, PyTuple};
use pyo3::IntoPyObjectExt;

use crate::chat_template::Message;
use crate::engine::Prompt;
use crate::gguf::Value;

pub fn prompt(obj: &Bound<'_, PyAny>, raw: bool) -> PyResult<Prompt> {
    if let Ok(text) = obj.cast::<PyString>() {
        let text: String = text.extract()?;
        return Ok(if raw {
            Prompt::Raw(text)
        } else {
            Prompt::Text(text)
        });
    }
    if raw {
        return Err(PyTypeError::new_err(format!(
            "prompt: raw=True needs a str, got {}",
            type_name(obj)
        )));
    }
    if !(obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(format!(
            "prompt must be a str, a list of messages or a list of token ids, got {}",
            type_name(obj)
        )));
    }
    let items: Vec<Bound<'_, PyAny>> = obj.try_iter()?.collect::<PyResult<_>>()?;
    if items.is_empty() {
        return Err(PyValueError::new_err("prompt: the list is empty"));
    }
    if items[0].cast::<PyMapping>().is_ok() {
        let messages = items
            .iter()
            .enumerate()
            .map(|(i, item)| message(item, i))
            .collect::<PyResult<_>>()?;
        return Ok(Prompt::Messages(messages));
    }
    let ids = items
        .iter()
        .enumerate()
        .map(|(i, item)| token_id(item, &format!("prompt[{i}]")))
        .collect::<PyResult<_>>()?;
    Ok(Prompt::Ids(ids))
}

pub fn token_id(item: &Bound<'_, PyAny>, what: &str) -> PyResult<u32> {
    if item.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be an int token id, got bool"
        )));
    }
    let value: i64 = item.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be an int token id or a message dict, got {}",
            type_name(item)
        ))
    })?;
    u32::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{what}: token id {value} is out of range")))
}

pub fn messages(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Message>> {
    if !(obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(format!(
            "messages must be a list of dicts, got {}",
            type_name(obj)
        )));
    }
    obj.try_iter()?
        .enumerate()
        .map(|(i, item)| message(&item?, i))
        .collect()
}

fn message(item: &Bound<'_, PyAny>, index: usize) -> PyResult<Message> {
    let mapping = item.cast::<PyMapping>().map_err(|_| {
        PyTypeError::new_err(format!(
            "messages[{index}] must be a dict with 'role' and 'content', got {}",
            type_name(item)
        ))
    })?;
    let field = |key: &str| -> PyResult<String> {
        let value = mapping
            .get_item(key)
            .map_err(|_| PyValueError::new_err(format!("messages[{index}] has no '{key}'")))?;
        value.extract::<String>().map_err(|_| {
            PyTypeError::new_err(format!(
                "messages[{index}]['{key}'] must be a str, got {}",
                type_name(&value)
            ))
        })
    };
    Ok(Message {
        role: field("role")?,
        content: field("content")?,
    })
}

pub fn stop_strings(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(vec![s.extract::<String>()?]);
    }
    if !(obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(format!(
            "stop must be a str or a list of str, got {}",
            type_name(obj)
        )));
    }
    obj.try_iter()?
        .enumerate()
        .map(|(i, item)| {
            let item = item?;
            let s: String = item.extract().map_err(|_| {
                PyTypeError::new_err(format!("stop[{i}] must be a str, got {}", type_name(&item)))
            })?;
            if s.is_empty() {
                return Err(PyValueError::new_err(format!("stop[{i}] is empty")));
            }
            Ok(s)
        })
        .collect()
}

pub fn metadata_value(py: Python<'_>, value: &Value) -> PyResult<Py<PyAny>> {
    match value {
        Value::U8(v) => v.into_py_any(py),
        Value::I8(v) => v.into_py_any(py),
        Value::U16(v) => v.into_py_any(py),
        Value::I16(v) => v.into_py_any(py),
        Value::U32(v) => v.into_py_any(py),
        Value::I32(v) => v.into_py_any(py),
        Value::U64(v) => v.into_py_any(py),
        Value::I64(v) => v.into_py_any(py),
        Value::F32(v) => v.into_py_any(py),
        Value::F64(v) => v.into_py_any(py),
        Value::Bool(v) => v.into_py_any(py),
        Value::String(v) => v.into_py_any(py),
        Value::Array(items) => items
            .iter()
            .map(|item| metadata_value(py, item))
            .collect::<PyResult<Vec<_>>>()?
            .into_py_any(py),
    }
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}
