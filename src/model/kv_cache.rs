//! Per-generation key/value cache. Allocated for the tokens a generation will need (never the
//! model's whole context up front) and written in place: no per-step concatenation. Stored in
//! f16, as llama.cpp stores it by default: half the memory of f32, and the same rounding.

use candle_core::{Device, Tensor};
use half::{f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::vector;

/// One layer's keys and values, each `[kv_heads][capacity][head_dim]`.
#[derive(Debug)]
struct LayerCache {
    k: Vec<f16>,
    v: Vec<f16>,
}

#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    kv_heads: usize,
    head_dim: usize,
    /// Positions filled so far.
    len: usize,
    capacity: usize,
    /// Never grows past this (the context in use).
    max_capacity: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        max_capacity: usize,
    ) -> Result<Self> {
        let capacity = capacity.clamp(1, max_capacity.max(1));
        let size = kv_heads * capacity * head_dim;
        let layers = (0..layers)
            .map(|_| LayerCache {
                k: vec![f16::ZERO; size],
                v: vec![f16::ZERO; size],
            })
            .collect();
        Ok(Self {
            layers,
            kv_heads,
            head_dim,
            len: 0,
            capacity,
            max_capacity,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `extra` more positions, growing geometrically so appends stay amortized O(1).
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = needed
            .max(self.capacity * 2)
            .min(self.max_capacity.max(needed));
        let (old, d, len) = (self.capacity, self.head_dim, self.len);
        let grow = |buf: &Vec<f16>| {
            let mut grown = vec![f16::ZERO; self.kv_heads * capacity * d];
            for h in 0..self.kv_heads {
                grown[h * capacity * d..][..len * d]
                    .copy_from_slice(&buf[h * old * d..][..len * d]);
            }
            grown
        };
        for layer in &mut self.layers {
            layer.k = grow(&layer.k);
            layer.v = grow(&layer.v);
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes keys and values of positions `len..len + seq` of `layer`: position `s` has its
    /// `kv_heads * head_dim` keys at `rows[s * stride + k_at..]` and values at `.. + v_at..`.
    /// The length advances once every layer is written, by [`KvCache::advance`].
    pub fn write(&mut self, layer: usize, rows: &[f32], stride: usize, k_at: usize, v_at: usize) {
        let (d, cap, len) = (self.head_dim, self.capacity, self.len);
        let cache = &mut self.layers[layer];
        for (s, row) in rows.chunks_exact(stride).enumerate() {
            for h in 0..self.kv_heads {
                let at = (h * cap + len + s) * d;
                for (dst, src) in [(&mut cache.k, k_at), (&mut cache.v, v_at)] {
                    dst[at..at + d].convert_from_f32_slice(&row[src + h * d..][..d]);
                }
            }
        }
    }

    /// Keys and values for positions `start..end` of `layer`, as f32 tensors
    /// `(kv_heads, end - start, head_dim)`.
    pub fn view(&self, layer: usize, start: usize, end: usize) -> Result<(Tensor, Tensor)> {
        let (d, cap, n) = (self.head_dim, self.capacity, end - start);
        let cache = &self.layers[layer];
        let gather = |buf: &[f16]| -> Result<Tensor> {
            let mut out = vec![0f32; self.kv_heads * n * d];
            for (h, head) in out.chunks_exact_mut(n * d).enumerate() {
                buf[(h * cap + start) * d..][..n * d].convert_to_f32_slice(head);
            }
            Ok(Tensor::from_vec(out, (self.kv_heads, n, d), &Device::Cpu)?)
        };
        Ok((gather(&cache.k)?, gather(&cache.v)?))
    }

    /// Attention of one query position over cached positions `start..end` of `layer`.
    /// `q`: `heads * head_dim` values (rotated), query head `h` reading KV head `h / group`;
    /// `out`: the same shape. Runs on the caller's rayon pool, one task per KV head.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_one(
        &self,
        layer: usize,
        q: &[f32],
        start: usize,
        end: usize,
        group: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let (d, cap) = (self.head_dim, self.capacity);
        let cache = &self.layers[layer];
        out.par_chunks_mut(group * d)
            .zip(q.par_chunks(group * d))
            .enumerate()
            .for_each(|(h, (out, q))| {
                let keys = &cache.k[(h * cap + start) * d..(h * cap + end) * d];
                let values = &cache.v[(h * cap + start) * d..(h * cap + end) * d];
                let mut scores = vec![0f32; end - start];
                for (out, q) in out.chunks_exact_mut(d).zip(q.chunks_exact(d)) {
                    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(d)) {
                        *s = scale * vector::dot_f16(k, q);
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0.0;
                    for s in &mut scores {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    out.fill(0.0);
                    for (p, v) in scores.iter().zip(values.chunks_exact(d)) {
                        vector::axpy_f16(p / total, v, out);
                    }
                }
            });
    }

    pub fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}
