//! Rotary position embeddings: plain RoPE, LongRoPE (per-frequency factors and a cos/sin
//! scale) and partial rotary (only the first `rope_dim` dimensions of each head turn).

use super::config::Config;

/// Which LongRoPE factors a context length calls for. llama.cpp's rule, which we follow: the
/// short factors while the context in use fits the original training context, the long ones past it.
pub fn use_long_factors(config: &Config, context_in_use: usize) -> bool {
    context_in_use > config.original_context_length
}

/// cos/sin tables, `positions x rope_dim / 2` each, in the "NeoX" layout (dimension `i` pairs
/// with `i + rope_dim / 2`), as Phi models rotate.
#[derive(Debug, Clone)]
pub struct RopeTables {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTables {
    /// `factors`: LongRoPE's per-frequency divisors (`rope_dim / 2` of them), if the model has them.
    pub fn new(config: &Config, factors: Option<&[f32]>, positions: usize) -> Self {
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
        Self { half, cos, sin }
    }

    /// Rotates the first `rope_dim` dimensions of each `head_dim`-long head in `heads` (one
    /// position's heads, back to back) for position `pos`.
    pub fn apply(&self, heads: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.half;
        let cos = &self.cos[pos * half..][..half];
        let sin = &self.sin[pos * half..][..half];
        for head in heads.chunks_exact_mut(head_dim) {
            let (first, second) = head[..2 * half].split_at_mut(half);
            for i in 0..half {
                let (a, b) = (first[i], second[i]);
                first[i] = a * cos[i] - b * sin[i];
                second[i] = a * sin[i] + b * cos[i];
            }
        }
    }
}
