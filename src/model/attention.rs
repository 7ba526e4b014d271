//! Attention of a sequence's new positions over its own [`KvCache`]: one query position
//! (decode) on phi3's f16 kernels, several (a prompt chunk) as batched matmuls.
//!
//! Shapes: queries are rows of `heads * head_dim` values (rotated), query head `h` reading KV
//! head `h / group`; the output has the queries' shape.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::kv_cache::KvCache;
use crate::error::Result;
use crate::kernels::vector;

/// What every attention call of one model shares.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Each position attends to at most this many positions, itself included.
    pub sliding_window: Option<usize>,
}

impl AttentionShape {
    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// First cached position that position `pos` may attend to.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.sliding_window {
            Some(window) => (pos + 1).saturating_sub(window),
            None => 0,
        }
    }
}

/// The additive mask of a chunk of `seq` positions from `start`, `(seq, keys)`: causal, and
/// within the sliding window. Built once per forward call and used by every layer.
pub struct ChunkMask {
    start: usize,
    seq: usize,
    /// First key position the chunk's first query may see.
    first: usize,
    mask: Tensor,
}

impl ChunkMask {
    pub fn new(shape: &AttentionShape, start: usize, seq: usize) -> Result<Self> {
        let first = shape.first_visible(start);
        let keys = start + seq - first;
        let window = shape.sliding_window.unwrap_or(usize::MAX);
        let mut mask = vec![0f32; seq * keys];
        for (row, values) in mask.chunks_exact_mut(keys).enumerate() {
            let pos = start + row;
            for (col, m) in values.iter_mut().enumerate() {
                let key_pos = first + col;
                if key_pos > pos || pos - key_pos >= window {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (seq, keys), &Device::Cpu)?;
        Ok(Self {
            start,
            seq,
            first,
            mask,
        })
    }
}

/// Attention of the one query `q` at position `pos` (its key and value already written to the
/// cache) over the positions it may see, into `out`. Runs on the caller's rayon pool, one task
/// per KV head.
pub fn attend_one(
    shape: &AttentionShape,
    cache: &KvCache,
    layer: usize,
    pos: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let (d, group, scale) = (shape.head_dim, shape.group(), shape.scale());
    let (first, end) = (shape.first_visible(pos), pos + 1);
    out.par_chunks_mut(group * d)
        .zip(q.par_chunks(group * d))
        .enumerate()
        .for_each(|(h, (out, q))| {
            let mut scores = vec![0f32; end - first];
            for (out, q) in out.chunks_exact_mut(d).zip(q.chunks_exact(d)) {
                let keys = cache
                    .runs(layer, false, h, first, end)
                    .flat_map(|run| run.chunks_exact(d));
                for (s, k) in scores.iter_mut().zip(keys) {
                    *s = scale * vector::dot_f16(k, q);
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0;
                for s in &mut scores {
                    *s = (*s - max).exp();
                    total += *s;
                }
                out.fill(0.0);
                let values = cache
                    .runs(layer, true, h, first, end)
                    .flat_map(|run| run.chunks_exact(d));
                for (p, v) in scores.iter().zip(values) {
                    vector::axpy_f16(p / total, v, out);
                }
            }
        });
}

/// Causal attention of the chunk `mask` describes (its queries `q`, `seq` rows of `stride`
/// values whose first `heads * head_dim` are the queries, already written to the cache) into
/// `out` (`seq` rows of `heads * head_dim`), as batched matmuls: the `group` query heads
/// sharing one KV head become rows of one product with it.
pub fn attend_chunk(
    shape: &AttentionShape,
    cache: &KvCache,
    layer: usize,
    mask: &ChunkMask,
    q: &[f32],
    stride: usize,
    out: &mut [f32],
) -> Result<()> {
    let (d, heads, kv_heads, group) = (shape.head_dim, shape.heads, shape.kv_heads, shape.group());
    let seq = mask.seq;
    let n_keys = mask.start + seq - mask.first;
    // (kv_heads, group * seq, d): row g * seq + s of KV head h is query head h * group + g at
    // position s.
    let mut rows = vec![0f32; heads * seq * d];
    for (s, row) in q.chunks_exact(stride).enumerate() {
        for head in 0..heads {
            rows[(head * seq + s) * d..][..d].copy_from_slice(&row[head * d..][..d]);
        }
    }
    let q = Tensor::from_vec(rows, (kv_heads, group * seq, d), &Device::Cpu)?;
    let (keys, values) = cache.view(layer, mask.first, mask.start + seq)?;
    let scores = (q.matmul(&keys.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = scores
        .reshape((kv_heads, group, seq, n_keys))?
        .broadcast_add(&mask.mask)?
        .reshape((kv_heads, group * seq, n_keys))?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let result = probs.matmul(&values)?.flatten_all()?.to_vec1::<f32>()?;
    for (head, rows) in result.chunks_exact(seq * d).enumerate() {
        for (s, r) in rows.chunks_exact(d).enumerate() {
            out[(s * heads + head) * d..][..d].copy_from_slice(r);
        }
    }
    Ok(())
}
