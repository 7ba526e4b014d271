//! The generation options of `stream()`, `generate()` and `Chat`, checked once and turned into
//! [`GenerationParams`]. `Phi3.stream` takes them as named parameters; a `Chat` keeps them as a
//! dict of defaults that each turn's keyword arguments override.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

use super::convert::{self, type_name};
use super::errors::to_py_err;
use crate::constraint::Constraint;
use crate::error::Error;
use crate::generate::GenerationParams;
use crate::sampling::SamplingParams;

/// The options as Python passes them, with `stream()`'s defaults.
pub struct StreamOptions<'py> {
    pub max_tokens: i64,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<Bound<'py, PyAny>>,
    pub repeat_penalty: f64,
    pub repeat_last_n: i64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub logit_bias: Option<Bound<'py, PyAny>>,
    pub stop: Option<Bound<'py, PyAny>>,
    pub ignore_eos: bool,
    pub details: bool,
    pub top_logprobs: i64,
    pub json_schema: Option<Bound<'py, PyAny>>,
    pub regex: Option<Bound<'py, PyAny>>,
    pub grammar: Option<Bound<'py, PyAny>>,
    /// `stream()` only: the prompt string goes to the model as it is, without the chat template.
    pub raw: bool,
}

/// The keyword options a `Chat` takes (`stream()`'s, less `raw`: a chat is always templated).
pub const CHAT_OPTIONS: [&str; 18] = [
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stop",
    "ignore_eos",
    "details",
    "top_logprobs",
    "json_schema",
    "regex",
    "grammar",
];

impl Default for StreamOptions<'_> {
    /// The engine's defaults, so that they are written down once.
    fn default() -> Self {
        let GenerationParams {
            max_tokens,
            sampling,
            stop: _,
            ignore_eos,
            top_logprobs,
            constraint: _,
        } = GenerationParams::default();
        Self {
            max_tokens: max_tokens as i64,
            temperature: f64::from(sampling.temperature),
            top_p: sampling.top_p.map(f64::from),
            top_k: sampling.top_k.map(|k| k as i64),
            min_p: sampling.min_p.map(f64::from),
            seed: None,
            repeat_penalty: f64::from(sampling.repeat_penalty),
            repeat_last_n: sampling.repeat_last_n as i64,
            presence_penalty: f64::from(sampling.presence_penalty),
            frequency_penalty: f64::from(sampling.frequency_penalty),
            logit_bias: None,
            stop: None,
            ignore_eos,
            details: false,
            top_logprobs: top_logprobs as i64,
            json_schema: None,
            regex: None,
            grammar: None,
            raw: false,
        }
    }
}

/// Which call the options are for: a chat's turns take no `raw`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Stream,
    Chat,
}

fn non_negative(value: i64, name: &str) -> PyResult<usize> {
    usize::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {value}")))
}

fn int(value: &Bound<'_, PyAny>, name: &str) -> PyResult<i64> {
    if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int, got {}",
            type_name(value)
        )));
    }
    value
        .extract()
        .map_err(|_| PyValueError::new_err(format!("{name} is out of range: {value}")))
}

fn float(value: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    if value.is_instance_of::<PyBool>()
        || !(value.is_instance_of::<PyFloat>() || value.is_instance_of::<PyInt>())
    {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a number, got {}",
            type_name(value)
        )));
    }
    value.extract()
}

fn boolean(value: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    value.extract().map_err(|_| {
        PyTypeError::new_err(format!("{name} must be a bool, got {}", type_name(value)))
    })
}

/// `{token id: bias}` as (id, bias) pairs; the ids are checked against the vocabulary later.
fn logit_bias(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(u32, f32)>> {
    let Some(obj) = obj else {
        return Ok(Vec::new());
    };
    let dict = obj.cast::<PyDict>().map_err(|_| {
        PyTypeError::new_err(format!(
            "logit_bias must be a dict of token id to bias, got {}",
            type_name(obj)
        ))
    })?;
    dict.iter()
        .map(|(id, bias)| {
            let id = int(&id, "logit_bias keys")?;
            let id = u32::try_from(id).map_err(|_| {
                PyValueError::new_err(format!("logit_bias: token id {id} is out of range"))
            })?;
            Ok((id, float(&bias, &format!("logit_bias[{id}]"))? as f32))
        })
        .collect()
}

impl<'py> StreamOptions<'py> {
    /// `stream()`'s defaults overridden by each dict in turn; a key that is not an option is a
    /// `TypeError` naming it, as for a function's keyword arguments.
    pub fn from_dicts(dicts: &[&Bound<'py, PyDict>], caller: Caller) -> PyResult<Self> {
        let mut options = Self::default();
        for dict in dicts {
            for (key, value) in dict.iter() {
                let key = key
                    .cast_into::<PyString>()
                    .map_err(|_| PyTypeError::new_err("keyword argument names must be strings"))?;
                let name: String = key.extract()?;
                let name = name.as_str();
                let some = (!value.is_none()).then_some(&value);
                match name {
                    "max_tokens" => options.max_tokens = int(&value, name)?,
                    "temperature" => options.temperature = float(&value, name)?,
                    "top_p" => options.top_p = some.map(|v| float(v, name)).transpose()?,
                    "top_k" => options.top_k = some.map(|v| int(v, name)).transpose()?,
                    "min_p" => options.min_p = some.map(|v| float(v, name)).transpose()?,
                    "seed" => options.seed = some.cloned(),
                    "repeat_penalty" => options.repeat_penalty = float(&value, name)?,
                    "repeat_last_n" => options.repeat_last_n = int(&value, name)?,
                    "presence_penalty" => options.presence_penalty = float(&value, name)?,
                    "frequency_penalty" => options.frequency_penalty = float(&value, name)?,
                    "logit_bias" => options.logit_bias = some.cloned(),
                    "stop" => options.stop = some.cloned(),
                    "ignore_eos" => options.ignore_eos = boolean(&value, name)?,
                    "details" => options.details = boolean(&value, name)?,
                    "top_logprobs" => options.top_logprobs = int(&value, name)?,
                    "json_schema" => options.json_schema = some.cloned(),
                    "regex" => options.regex = some.cloned(),
                    "grammar" => options.grammar = some.cloned(),
                    "raw" if caller == Caller::Stream => options.raw = boolean(&value, name)?,
                    other => {
                        let extra = if caller == Caller::Stream {
                            ", raw"
                        } else {
                            ""
                        };
                        return Err(PyTypeError::new_err(format!(
                            "unexpected keyword argument '{other}' (options are: {}{extra})",
                            CHAT_OPTIONS.join(", ")
                        )));
                    }
                }
            }
        }
        Ok(options)
    }

    /// The checked parameters; errors name the option.
    pub fn params(&self) -> PyResult<GenerationParams> {
        let seed = match &self.seed {
            None => None,
            Some(s) => {
                let value: i128 = s.extract().map_err(|_| {
                    PyTypeError::new_err(format!("seed must be an int, got {}", type_name(s)))
                })?;
                Some(u64::try_from(value).map_err(|_| {
                    PyValueError::new_err(format!("seed must be in 0..2**64, got {value}"))
                })?)
            }
        };
        let params = GenerationParams {
            max_tokens: non_negative(self.max_tokens, "max_tokens")?,
            sampling: SamplingParams {
                temperature: self.temperature as f32,
                top_p: self.top_p.map(|p| p as f32),
                top_k: self.top_k.map(|k| non_negative(k, "top_k")).transpose()?,
                min_p: self.min_p.map(|p| p as f32),
                seed,
                repeat_penalty: self.repeat_penalty as f32,
                repeat_last_n: non_negative(self.repeat_last_n, "repeat_last_n")?,
                presence_penalty: self.presence_penalty as f32,
                frequency_penalty: self.frequency_penalty as f32,
                logit_bias: logit_bias(self.logit_bias.as_ref())?,
            },
            stop: convert::stop_strings(self.stop.as_ref())?,
            ignore_eos: self.ignore_eos,
            top_logprobs: non_negative(self.top_logprobs, "top_logprobs")?,
            constraint: self.constraint()?,
        };
        params
            .validate()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(params)
    }

    /// The one constraint among `json_schema`, `regex` and `grammar`, if any.
    fn constraint(&self) -> PyResult<Option<Constraint>> {
        let given: Vec<&str> = [
            ("json_schema", &self.json_schema),
            ("regex", &self.regex),
            ("grammar", &self.grammar),
        ]
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(name, _)| *name)
        .collect();
        if given.len() > 1 {
            return Err(PyValueError::new_err(format!(
                "{} are exclusive: give one constraint",
                given.join(" and ")
            )));
        }
        if let Some(schema) = &self.json_schema {
            return json_schema(schema).map(Some);
        }
        let text = |obj: &Bound<'_, PyAny>, name: &str| -> PyResult<String> {
            obj.extract().map_err(|_| {
                PyTypeError::new_err(format!("{name} must be a str, got {}", type_name(obj)))
            })
        };
        if let Some(regex) = &self.regex {
            return Ok(Some(Constraint::Regex(text(regex, "regex")?)));
        }
        if let Some(grammar) = &self.grammar {
            return Ok(Some(Constraint::Lark(text(grammar, "grammar")?)));
        }
        Ok(None)
    }
}

/// `json_schema=`: `True` (any object), a JSON string, a dict, or anything with a
/// `model_json_schema()` method (a pydantic model class), turned into JSON text by Python's
/// `json`. A schema `json` cannot write (too deep, not JSON data) is a `GrammarError`.
fn json_schema(obj: &Bound<'_, PyAny>) -> PyResult<Constraint> {
    let py = obj.py();
    let grammar_error = |message: String| to_py_err(py, Error::Grammar(message));
    if obj.is_instance_of::<PyBool>() {
        return if obj.extract::<bool>()? {
            Ok(Constraint::json_object())
        } else {
            Err(PyValueError::new_err(
                "json_schema=False constrains nothing; leave it out (or None)",
            ))
        };
    }
    if let Ok(text) = obj.cast::<PyString>() {
        return Ok(Constraint::JsonSchema(text.extract()?));
    }
    let schema = if obj.hasattr("model_json_schema")? {
        obj.call_method0("model_json_schema")?
    } else {
        obj.clone()
    };
    if !schema.is_instance_of::<PyDict>() {
        return Err(PyTypeError::new_err(format!(
            "json_schema must be True, a str, a dict or a class with model_json_schema(), got {}",
            type_name(obj)
        )));
    }
    let text = py
        .import("json")?
        .call_method1("dumps", (schema,))
        .map_err(|e| grammar_error(format!("json_schema cannot be written as JSON: {e}")))?;
    Ok(Constraint::JsonSchema(text.extract()?))
}
