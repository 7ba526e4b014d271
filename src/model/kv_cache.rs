//! Key/value cache of one sequence, in blocks of [`BLOCK_POSITIONS`] positions that several
//! caches may share: a cache taken from another's prefix holds the same blocks (reference
//! counted, nothing copied), and a block is copied only when a cache writes into one it shares
//! (the last, partly filled block of a shared prefix). Blocks are allocated as positions are
//! written, so a cache holds what its sequence used, never the model's whole context. Stored in
//! f16, as llama.cpp stores it by default: half the memory of f32, and the same rounding.

use std::sync::Arc;

use half::{f16, slice::HalfFloatSliceExt};

use crate::error::{Error, Result};

/// Positions per block: small enough that the copy on a shared block's first write stays small,
/// large enough that attention's inner loops run over long contiguous rows.
pub const BLOCK_POSITIONS: usize = 64;

/// What every block of one model's caches holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// f16 values of one block: `[layer][keys, values][kv_head][BLOCK_POSITIONS][head_dim]`.
    fn block_len(&self) -> usize {
        self.layers * 2 * self.kv_heads * BLOCK_POSITIONS * self.head_dim
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_len() * std::mem::size_of::<f16>()
    }

    /// Offset of the `BLOCK_POSITIONS * head_dim` keys (`values = false`) or values of one KV
    /// head of one layer within a block.
    fn head_at(&self, layer: usize, values: bool, kv_head: usize) -> usize {
        let head = BLOCK_POSITIONS * self.head_dim;
        ((layer * 2 + values as usize) * self.kv_heads + kv_head) * head
    }
}

#[derive(Debug, Clone)]
struct Block(Vec<f16>);

#[derive(Debug, Clone)]
pub struct KvCache {
    shape: KvShape,
    blocks: Vec<Arc<Block>>,
    /// Positions filled so far.
    len: usize,
    /// Never grows past this (the context in use).
    max_len: usize,
}

impl KvCache {
    pub fn new(shape: KvShape, max_len: usize) -> Self {
        Self {
            shape,
            blocks: Vec::new(),
            len: 0,
            max_len,
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// A cache of this one's first `len` positions, sharing its blocks.
    pub fn prefix(&self, len: usize) -> KvCache {
        let len = len.min(self.len);
        KvCache {
            shape: self.shape,
            blocks: self.blocks[..len.div_ceil(BLOCK_POSITIONS)].to_vec(),
            len,
            max_len: self.max_len,
        }
    }

    /// Forgets positions from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            self.blocks.truncate(len.div_ceil(BLOCK_POSITIONS));
        }
    }

    /// The blocks this cache holds, to count memory shared between caches once.
    pub fn block_ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks.iter().map(|b| Arc::as_ptr(b) as usize)
    }

    /// Bytes of the blocks this cache holds (shared ones included).
    pub fn bytes(&self) -> usize {
        self.blocks.len() * self.shape.block_bytes()
    }

    /// Makes room for `extra` more positions: allocates the blocks they need, and takes a copy
    /// of the last block if it is shared and the new positions go into it.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len.checked_add(extra).filter(|&n| n <= self.max_len);
        let Some(needed) = needed else {
            return Err(Error::ContextOverflow {
                prompt_tokens: self.len.saturating_add(extra),
                context_length: self.max_len,
            });
        };
        if extra > 0 && !self.len.is_multiple_of(BLOCK_POSITIONS) {
            let last = self.blocks.last_mut().expect("a partly filled block");
            Arc::make_mut(last);
        }
        while self.blocks.len() * BLOCK_POSITIONS < needed {
            self.blocks
                .push(Arc::new(Block(vec![f16::ZERO; self.shape.block_len()])));
        }
        Ok(())
    }

    /// Writes keys and values of positions `len..len + seq` of `layer`: position `s` has its
    /// `kv_heads * head_dim` keys at `rows[s * stride + k_at..]` and values at `.. + v_at..`.
    /// Room must have been made by [`KvCache::reserve`]; the length advances once every layer is
    /// written, by [`KvCache::advance`].
    pub fn write(&mut self, layer: usize, rows: &[f32], stride: usize, k_at: usize, v_at: usize) {
        let (shape, d) = (self.shape, self.shape.head_dim);
        for (s, row) in rows.chunks_exact(stride).enumerate() {
            let pos = self.len + s;
            let block = Arc::get_mut(&mut self.blocks[pos / BLOCK_POSITIONS])
                .expect("reserve() made the blocks written to unshared");
            let offset = (pos % BLOCK_POSITIONS) * d;
            for h in 0..shape.kv_heads {
                for (values, src) in [(false, k_at), (true, v_at)] {
                    let at = shape.head_at(layer, values, h) + offset;
                    block.0[at..at + d].convert_from_f32_slice(&row[src + h * d..][..d]);
                }
            }
        }
    }

    pub fn advance(&mut self, positions: usize) {
        self.len += positions;
    }

    /// The keys (`values = false`) or values of KV head `kv_head` of `layer` for positions
    /// `start..end`, as contiguous runs of `head_dim`-long rows, one run per block.
    pub fn runs(
        &self,
        layer: usize,
        values: bool,
        kv_head: usize,
        start: usize,
        end: usize,
    ) -> impl Iterator<Item = &[f16]> + '_ {
        let d = self.shape.head_dim;
        let at = self.shape.head_at(layer, values, kv_head);
        let first_block = start / BLOCK_POSITIONS;
        self.blocks[first_block..end.div_ceil(BLOCK_POSITIONS)]
            .iter()
            .enumerate()
            .map(move |(i, block)| {
                let base = (first_block + i) * BLOCK_POSITIONS;
                let from = start.max(base) - base;
                let to = end.min(base + BLOCK_POSITIONS) - base;
                &block.0[at + from * d..at + to * d]
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 4,
    };

    /// Appends `n` positions whose keys are `base + position` and values their negation.
    fn append(cache: &mut KvCache, n: usize, base: f32) {
        cache.reserve(n).unwrap();
        let width = 2 * SHAPE.kv_heads * SHAPE.head_dim;
        let rows: Vec<f32> = (0..n)
            .flat_map(|s| {
                let p = base + (cache.len() + s) as f32;
                (0..width).map(move |i| if i < width / 2 { p } else { -p })
            })
            .collect();
        for layer in 0..SHAPE.layers {
            cache.write(layer, &rows, width, 0, width / 2);
        }
        cache.advance(n);
    }

    /// The first value of KV head 1's keys (or `values`) at each position `start..end`.
    fn read(cache: &KvCache, layer: usize, values: bool, start: usize, end: usize) -> Vec<f32> {
        cache
            .runs(layer, values, 1, start, end)
            .flat_map(|run| run.iter().step_by(SHAPE.head_dim).map(|v| v.to_f32()))
            .collect()
    }

    #[test]
    fn positions_read_back_across_blocks() {
        let mut cache = KvCache::new(SHAPE, 1000);
        append(&mut cache, 100, 0.0);
        append(&mut cache, 1, 0.0);
        append(&mut cache, 60, 0.0);
        assert_eq!(cache.len(), 161);
        assert_eq!(cache.bytes(), 3 * SHAPE.block_bytes());
        let expected: Vec<f32> = (10..150).map(|p| p as f32).collect();
        assert_eq!(read(&cache, 1, false, 10, 150), expected);
        let negated: Vec<f32> = (60..70).map(|p| -p as f32).collect();
        assert_eq!(read(&cache, 0, true, 60, 70), negated);
    }

    #[test]
    fn a_shared_prefix_is_not_changed_by_either_cache() {
        let mut original = KvCache::new(SHAPE, 1000);
        append(&mut original, 70, 0.0);
        let mut a = original.prefix(66);
        let mut b = original.prefix(66);
        // The first block is shared by all three; the partly used second block is copied on
        // the first write into it.
        append(&mut a, 10, 1000.0);
        append(&mut b, 3, 500.0);
        assert_eq!(a.block_ids().next(), original.block_ids().next());
        assert_ne!(a.block_ids().nth(1), original.block_ids().nth(1));
        assert_eq!(
            read(&original, 0, false, 64, 70),
            [64.0, 65.0, 66.0, 67.0, 68.0, 69.0]
        );
        assert_eq!(read(&a, 0, false, 64, 68), [64.0, 65.0, 1066.0, 1067.0]);
        assert_eq!(
            read(&b, 0, false, 64, 69),
            [64.0, 65.0, 566.0, 567.0, 568.0]
        );
    }

    #[test]
    fn truncate_then_append_rewrites_the_tail() {
        let mut cache = KvCache::new(SHAPE, 1000);
        append(&mut cache, 130, 0.0);
        cache.truncate(20);
        assert_eq!(cache.bytes(), SHAPE.block_bytes());
        append(&mut cache, 2, 500.0);
        assert_eq!(read(&cache, 1, false, 18, 22), [18.0, 19.0, 520.0, 521.0]);
    }

    #[test]
    fn the_context_bounds_the_cache() {
        let mut cache = KvCache::new(SHAPE, 10);
        append(&mut cache, 10, 0.0);
        assert!(matches!(
            cache.reserve(1),
            Err(Error::ContextOverflow {
                prompt_tokens: 11,
                context_length: 10
            })
        ));
    }
}
