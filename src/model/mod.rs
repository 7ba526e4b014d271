//! The Phi-3 family's forward pass: hyper-parameters, weights, RoPE, KV cache, and the runner
//! that evaluates tokens on a thread pool.

pub mod attention;
pub mod config;
pub mod kv_cache;
pub mod linear;
pub mod phi3;
pub mod rope;
pub mod runner;
pub mod weights;

pub use kv_cache::KvCache;
pub use phi3::{Phi3Model, SeqInput, Workspace};
pub use runner::Runner;
