//! Per-generation key/value cache. Allocated for the tokens a generation will need (never the
//! model's whole context up front) and written in place: no per-step concatenation. Stored in
//! f16, as llama.cpp stores it by default: half the memory of f32, and the same rounding.

use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::Result;

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

    /// Writes `k` and `v`, `(kv_heads, seq, head_dim)`, at positions `len..len + seq` of `layer`.
    /// The length advances once every layer is written, by [`KvCache::advance`].
    pub fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (d, cap, len) = (self.head_dim, self.capacity, self.len);
        let seq = k.dim(1)?;
        let cache = &mut self.layers[layer];
        for (src, dst) in [(k, &mut cache.k), (v, &mut cache.v)] {
            let src = src.flatten_all()?.to_vec1::<f32>()?;
            for (h, head) in src.chunks_exact(seq * d).enumerate() {
                let row = &mut dst[(h * cap + len) * d..][..seq * d];
                for (o, &x) in row.iter_mut().zip(head) {
                    *o = f16::from_f32(x);
                }
            }
        }
        Ok(())
    }

    /// Keys and values for positions `start..end` of `layer`, as f32 tensors
    /// `(kv_heads, end - start, head_dim)`.
    pub fn view(&self, layer: usize, start: usize, end: usize) -> Result<(Tensor, Tensor)> {
        let (d, cap, n) = (self.head_dim, self.capacity, end - start);
        let cache = &self.layers[layer];
        let gather = |buf: &[f16]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(self.kv_heads * n * d);
            for h in 0..self.kv_heads {
                out.extend(
                    buf[(h * cap + start) * d..][..n * d]
                        .iter()
                        .map(|x| x.to_f32()),
                );
            }
            Ok(Tensor::from_vec(out, (self.kv_heads, n, d), &Device::Cpu)?)
        };
        Ok((gather(&cache.k)?, gather(&cache.v)?))
    }

    /// Attention of one query position over cached positions `start..end` of `layer`.
    /// `q`: `heads * head_dim` values (rotated), query head `h` reading KV head `h / group`;
    /// `out`: the same shape. Runs on the caller's rayon pool, one task per query head.
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
        out.par_chunks_mut(d)
            .zip(q.par_chunks(d))
            .enumerate()
            .for_each(|(h, (out, q))| {
                let base = (h / group) * cap;
                let keys = &cache.k[(base + start) * d..(base + end) * d];
                let values = &cache.v[(base + start) * d..(base + end) * d];
                let mut scores: Vec<f32> = keys
                    .chunks_exact(d)
                    .map(|k| scale * q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum::<f32>())
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut total = 0.0;
                for s in &mut scores {
                    *s = (*s - max).exp();
                    total += *s;
                }
                out.fill(0.0);
                for (p, v) in scores.iter().zip(values.chunks_exact(d)) {
                    let w = p / total;
                    for (o, x) in out.iter_mut().zip(v) {
                        *o += w * x.to_f32();
                    }
                }
            });
    }

    pub fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}
