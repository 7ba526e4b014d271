//! Hyper-parameters of a phi3-architecture model, read from GGUF metadata and checked for
//! consistency before any tensor is touched.

use crate::error::{Error, Result};
use crate::gguf::names::{self, hparams};
use crate::gguf::Metadata;

/// Upper bounds on hyper-parameters: far above any Phi model, low enough that a hostile file
/// cannot turn them into absurd allocations.
const MAX_CONTEXT: usize = 1 << 20;
const MAX_EMBEDDING: usize = 1 << 16;
const MAX_FEED_FORWARD: usize = 1 << 18;
const MAX_LAYERS: usize = 1 << 10;
const MAX_HEADS: usize = 1 << 10;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Longest context the model was trained for (`phi3.context_length`).
    pub context_length: usize,
    pub embedding_length: usize,
    pub feed_forward_length: usize,
    pub block_count: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    /// Leading dimensions of each head that are rotated (all of them but on Phi-4-mini).
    pub rope_dim: usize,
    pub rope_freq_base: f32,
    /// LongRoPE's cos/sin scale (1 when the file has none).
    pub rope_attn_factor: f32,
    /// Context length the short LongRoPE factors were trained for.
    pub original_context_length: usize,
    /// Each position attends to at most this many positions (itself included); `None`: all.
    pub sliding_window: Option<usize>,
}

impl Config {
    pub fn from_metadata(md: &Metadata) -> Result<Self> {
        let arch = md.str(names::GENERAL_ARCHITECTURE)?;
        if arch != names::ARCH_PHI3 {
            return Err(Error::unsupported(format!(
                "general.architecture is '{arch}'; phi3 runs '{}' models only",
                names::ARCH_PHI3
            ))
            .at_key(names::GENERAL_ARCHITECTURE));
        }
        let key = |suffix: &str| hparams::key(arch, suffix);
        let positive = |suffix: &str, max: usize| -> Result<usize> {
            let v = md.usize_at_most(&key(suffix), max)?;
            if v == 0 {
                return Err(
                    Error::unsupported(format!("{} is 0", key(suffix))).at_key(&key(suffix))
                );
            }
            Ok(v)
        };

        let context_length = positive(hparams::CONTEXT_LENGTH, MAX_CONTEXT)?;
        let embedding_length = positive(hparams::EMBEDDING_LENGTH, MAX_EMBEDDING)?;
        let feed_forward_length = positive(hparams::FEED_FORWARD_LENGTH, MAX_FEED_FORWARD)?;
        let block_count = positive(hparams::BLOCK_COUNT, MAX_LAYERS)?;
        let head_count = positive(hparams::HEAD_COUNT, MAX_HEADS)?;
        let head_count_kv =
            match md.optional_usize_at_most(&key(hparams::HEAD_COUNT_KV), MAX_HEADS)? {
                None => head_count,
                Some(n) => n,
            };
        if head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(Error::unsupported(format!(
                "{} = {head_count_kv} does not divide {} = {head_count}",
                key(hparams::HEAD_COUNT_KV),
                key(hparams::HEAD_COUNT)
            ))
            .at_key(&key(hparams::HEAD_COUNT_KV)));
        }
        if embedding_length % head_count != 0 {
            return Err(Error::unsupported(format!(
                "{} = {embedding_length} is not a multiple of {} = {head_count}",
                key(hparams::EMBEDDING_LENGTH),
                key(hparams::HEAD_COUNT)
            ))
            .at_key(&key(hparams::EMBEDDING_LENGTH)));
        }
        let head_dim = embedding_length / head_count;
        let rope_dim = md
            .optional_usize_at_most(&key(hparams::ROPE_DIMENSION_COUNT), MAX_EMBEDDING)?
            .unwrap_or(head_dim);
        if rope_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(Error::unsupported(format!(
                "{} = {rope_dim} must be even and between 2 and the head size {head_dim}",
                key(hparams::ROPE_DIMENSION_COUNT)
            ))
            .at_key(&key(hparams::ROPE_DIMENSION_COUNT)));
        }
        let rms_eps = finite_positive(md, &key(hparams::RMS_EPSILON), None)?;
        let rope_freq_base = finite_positive(md, &key(hparams::ROPE_FREQ_BASE), Some(10_000.0))?;
        let rope_attn_factor = finite_positive(md, &key(hparams::ROPE_ATTN_FACTOR), Some(1.0))?;
        let original_context_length = md
            .optional_usize_at_most(&key(hparams::ROPE_ORIGINAL_CONTEXT), MAX_CONTEXT)?
            .filter(|&n| n > 0)
            .unwrap_or(context_length);
        let sliding_window = md
            .optional_u64(&key(hparams::SLIDING_WINDOW))?
            .filter(|&w| w > 0 && (w as usize) < context_length)
            .map(|w| w as usize);

        Ok(Self {
            context_length,
            embedding_length,
            feed_forward_length,
            block_count,
            head_count,
            head_count_kv,
            head_dim,
            rms_eps: rms_eps as f32,
            rope_dim,
            rope_freq_base: rope_freq_base as f32,
            rope_attn_factor: rope_attn_factor as f32,
            original_context_length,
            sliding_window,
        })
    }

    /// Width of the fused query/key/value projection's output.
    pub fn qkv_width(&self) -> usize {
        (self.head_count + 2 * self.head_count_kv) * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.head_count_kv * self.head_dim
    }
}

fn finite_positive(md: &Metadata, key: &str, default: Option<f64>) -> Result<f64> {
    let value = match (md.optional_f64(key)?, default) {
        (Some(v), _) => v,
        (None, Some(d)) => d,
        (None, None) => md.f64(key)?,
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(
            Error::unsupported(format!("{key} = {value} is not a positive finite number"))
                .at_key(key),
        );
    }
    // The model computes in f32: a value that overflows to inf or underflows to 0 there would
    // turn every activation into NaN.
    let single = value as f32;
    if !(single.is_finite() && single > 0.0) {
        return Err(Error::unsupported(format!(
            "{key} = {value} is out of the range of a positive f32"
        ))
        .at_key(key));
    }
    Ok(value)
}
