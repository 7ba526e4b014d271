//! Rotary position embeddings: plain RoPE, LongRoPE (per-frequency factors and a cos/sin
//! scale) and partial rotary (only the first `rope_dim` dimensions of each head turn).

use candle_core::{Device, Tensor};

use super::config::Config;
use crate::error::Result;

/// Which LongRoPE factors a context length calls for. llama.cpp's rule, which we follow: the
/// short factors while the context in use fits the original training context, the long ones past it.
pub fn use_long_factors(config: &Config, context_in_use: usize) -> bool {
    context_in_use > config.original_context_length
}

/// cos/sin tables, `(positions, rope_dim / 2)` each, in the "NeoX" layout (dimension `i` pairs
/// with `i + rope_dim / 2`), as Phi models rotate.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    /// `factors`: LongRoPE's per-frequency divisors (`rope_dim / 2` of them), if the model has them.
    pub fn new(config: &Config, factors: Option<&[f32]>, positions: usize) -> Result<Self> {
        let half = config.rope_dim / 2;
        let base = f64::from(config.rope_freq_base);
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let freq = base.powf(-2.0 * i as f64 / config.rope_dim as f64);
                freq / factors.map_or(1.0, |f| f64::from(f[i]))
            })
            .collect();
        let scale = f64::from(config.rope_attn_factor);
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for pos in 0..positions {
            for &f in &inv_freq {
                let theta = pos as f64 * f;
                cos.push((theta.cos() * scale) as f32);
                sin.push((theta.sin() * scale) as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (positions, half), &Device::Cpu)?,
        })
    }

    /// Rotates `x` of shape `(1, seq, heads, head_dim)` for positions `start..start + seq`.
    pub fn apply(&self, x: &Tensor, start: usize, rope_dim: usize) -> Result<Tensor> {
        let (_, seq, _, head_dim) = x.dims4()?;
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        if rope_dim == head_dim {
            return Ok(candle_nn::rotary_emb::rope_thd(
                &x.contiguous()?,
                &cos,
                &sin,
            )?);
        }
        let rotated = x.narrow(3, 0, rope_dim)?.contiguous()?;
        let rotated = candle_nn::rotary_emb::rope_thd(&rotated, &cos, &sin)?;
        let passed = x.narrow(3, rope_dim, head_dim - rope_dim)?;
        Ok(Tensor::cat(&[&rotated, &passed], 3)?)
    }
}
