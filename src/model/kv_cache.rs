//! Per-generation key/value cache. Allocated for the tokens a generation will need (never the
//! model's whole context up front) and written in place: no per-step concatenation. Stored in
//! f16, as llama.cpp stores it by default: half the memory of f32, and the same rounding.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// One layer's keys and values, `(kv_heads, capacity, head_dim)` each.
#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
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
        let layers = (0..layers)
            .map(|_| LayerCache::zeros(kv_heads, capacity, head_dim))
            .collect::<Result<_>>()?;
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

    pub fn capacity(&self) -> usize {
        self.capacity
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
        for layer in &mut self.layers {
            let grown = LayerCache::zeros(self.kv_heads, capacity, self.head_dim)?;
            if self.len > 0 {
                grown
                    .k
                    .slice_set(&layer.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                grown
                    .v
                    .slice_set(&layer.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            *layer = grown;
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `k` and `v`, `(kv_heads, seq, head_dim)` contiguous, at positions `len..len + seq`
    /// of `layer`. The length advances once every layer is written, by [`KvCache::advance`].
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let cache = &self.layers[layer];
        cache.k.slice_set(&k.to_dtype(DType::F16)?, 1, self.len)?;
        cache.v.slice_set(&v.to_dtype(DType::F16)?, 1, self.len)?;
        Ok(())
    }

    /// Keys and values (f16) for positions `start..end` of `layer`, `(kv_heads, end - start, head_dim)`.
    pub fn view(&self, layer: usize, start: usize, end: usize) -> Result<(Tensor, Tensor)> {
        let cache = &self.layers[layer];
        Ok((
            cache.k.narrow(1, start, end - start)?,
            cache.v.narrow(1, start, end - start)?,
        ))
    }

    pub fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}

impl LayerCache {
    fn zeros(kv_heads: usize, capacity: usize, head_dim: usize) -> Result<Self> {
        let shape = (kv_heads, capacity, head_dim);
        Ok(Self {
            k: Tensor::zeros(shape, DType::F16, &Device::Cpu)?,
            v: Tensor::zeros(shape, DType::F16, &Device::Cpu)?,
        })
    }
}
