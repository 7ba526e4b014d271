//! The Phi-3 family's forward pass: hyper-parameters, weights, RoPE, KV cache.

pub mod attention;
pub mod config;
pub mod kv_cache;
pub mod linear;
pub mod phi3;
pub mod rope;
pub mod weights;

pub use kv_cache::KvCache;
pub use phi3::{Phi3Model, SeqInput, Workspace};
