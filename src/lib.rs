//! phi3: Microsoft's Phi family of language models from GGUF files, on the CPU.
//!
//! The modules follow the pipeline: a GGUF file is read (`gguf`), its vocabulary becomes a
//! tokenizer (`tokenizer`), its tensors a model (`model`), whose logits are sampled (`sampling`)
//! in the generation loop (`generate`). `hub` fetches files; `python` is the PyO3 binding.

pub(crate) mod chat_template;
pub mod constraint;
pub mod engine;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod generate;
pub(crate) mod gguf;
pub mod hub;
pub(crate) mod kernels;
pub(crate) mod model;
pub(crate) mod sampling;
pub(crate) mod tokenizer;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
pub use kernels::cpu_info::{cpu_info, CpuInfo, Override, OverrideStatus};

#[cfg(test)]
mod test_support;
