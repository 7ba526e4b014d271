//! The generation options of `stream()`, `generate()` and `Chat`, checked once and turned into
//! [`GenerationParams`]. `Phi3.stream` takes them as named parameters; a `Chat` keeps them as a
//! dict of defaults that each turn's keyword arguments override.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

use super::convert::{self, type_name};
use crate::generate::GenerationParams;
use crate::sampling::SamplingParams;

/// The options as Python passes them, with `stream()`'s defaults.
pub struct StreamOptions<'py> {
    pub max_tokens: i64,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<Bound<'py, PyAny>>,
    pub repeat_penalty: f64,
    pub repeat_last_n: i64,
    pub stop: Option<Bound<'py, PyAny>>,
    pub ignore_eos: bool,
    pub details: bool,
}

/// The keyword options a `Chat` takes (`stream()`'s, less `raw`: a chat is always templated).
pub const CHAT_OPTIONS: [&str; 10] = [
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repeat_penalty",
    "repeat_last_n",
    "stop",
    "ignore_eos",
    "details",
];

impl Default for StreamOptions<'_> {
    /// The engine's defaults, so that they are written down once.
    fn default() -> Self {
        let GenerationParams {
            max_tokens,
            sampling,
            stop: _,
            ignore_eos,
        } = GenerationParams::default();
        Self {
            max_tokens: max_tokens as i64,
            temperature: f64::from(sampling.temperature),
            top_p: sampling.top_p.map(f64::from),
            top_k: sampling.top_k.map(|k| k as i64),
            seed: None,
            repeat_penalty: f64::from(sampling.repeat_penalty),
            repeat_last_n: sampling.repeat_last_n as i64,
            stop: None,
            ignore_eos,
            details: false,
        }
    }
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

impl<'py> StreamOptions<'py> {
    /// `stream()`'s defaults overridden by each dict in turn; a key that is not an option is a
    /// `TypeError` naming it, as for a function's keyword arguments.
    pub fn from_dicts(dicts: &[&Bound<'py, PyDict>]) -> PyResult<Self> {
        let mut options = Self::default();
        for dict in dicts {
            for (key, value) in dict.iter() {
                let key = key
                    .cast_into::<PyString>()
                    .map_err(|_| PyTypeError::new_err("keyword argument names must be strings"))?;
                let name: String = key.extract()?;
                let name = name.as_str();
                let none = value.is_none();
                match name {
                    "max_tokens" => options.max_tokens = int(&value, name)?,
                    "temperature" => options.temperature = float(&value, name)?,
                    "top_p" => options.top_p = (!none).then(|| float(&value, name)).transpose()?,
                    "top_k" => options.top_k = (!none).then(|| int(&value, name)).transpose()?,
                    "seed" => options.seed = (!none).then_some(value),
                    "repeat_penalty" => options.repeat_penalty = float(&value, name)?,
                    "repeat_last_n" => options.repeat_last_n = int(&value, name)?,
                    "stop" => options.stop = (!none).then_some(value),
                    "ignore_eos" => options.ignore_eos = boolean(&value, name)?,
                    "details" => options.details = boolean(&value, name)?,
                    other => {
                        return Err(PyTypeError::new_err(format!(
                            "unexpected keyword argument '{other}' (options are: {})",
                            CHAT_OPTIONS.join(", ")
                        )))
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
                seed,
                repeat_penalty: self.repeat_penalty as f32,
                repeat_last_n: non_negative(self.repeat_last_n, "repeat_last_n")?,
            },
            stop: convert::stop_strings(self.stop.as_ref())?,
            ignore_eos: self.ignore_eos,
        };
        params
            .validate()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(params)
    }
}
