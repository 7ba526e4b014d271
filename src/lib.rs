//! phi3: Microsoft's Phi family of language models from GGUF files, on the CPU.
//!
//! The modules follow the pipeline: a GGUF file is read (`gguf`), its vocabulary becomes a
//! tokenizer (`tokenizer`), its tensors a model (`model`), whose logits are sampled (`sampling`)
//! in the generation loop (`generate`). `hub` fetches files; `python` is the PyO3 binding.

pub mod chat_template;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod sampling;
pub mod tokenizer;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};

#[cfg(test)]
mod test_support;
