//! Key/value cache of one sequence, in blocks of [`BLOCK_POSITIONS`] positions that several
//! caches may share: a cache taken from another's prefix holds the same blocks (reference
//! counted, nothing copied), and a block is copied only when a cache writes into one it shares
//! (the last, partly filled block of a shared prefix). Blocks are allocated as positions are
//! written, so a cache holds what its sequence used, never the model's whole context.
//!
//! Stored in f16 by default, as llama.cpp stores it: half the memory of f32, and the same
//! rounding. Or in Q8_0 blocks ([`KvType::Q8_0`], llama.cpp's `-ctk q8_0 -ctv q8_0`): 34 bytes
//! per 32 values, 53 % of f16's, for longer contexts and more cached prefixes in the same memory.

use std::sync::Arc;

use half::{f16, slice::HalfFloatSliceExt};

use crate::error::{Error, Result};
use crate::kernels::blocks::{quantize_q8_0_into, BlockQ8_0, QK8_0};
use crate::kernels::vector;

/// Positions per block: small enough that the copy on a shared block's first write stays small,
/// large enough that attention's inner loops run over long contiguous rows.
pub const BLOCK_POSITIONS: usize = 64;

/// How a cache stores its keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F16,
    /// Each head's row of keys or values in blocks of 32: an f16 scale and 32 i8.
    Q8_0,
}

impl KvType {
    pub const ALL: [KvType; 2] = [KvType::F16, KvType::Q8_0];

    /// The name `Phi3(kv_cache=...)` takes.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    pub fn parse(s: &str) -> Option<KvType> {
        KvType::ALL.into_iter().find(|t| t.name() == s)
    }
}

/// What every block of one model's caches holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub kv_type: KvType,
}

impl KvShape {
    /// Elements (f16 values or Q8_0 blocks) of one head's row of keys or values.
    fn row_len(&self) -> usize {
        match self.kv_type {
            KvType::F16 => self.head_dim,
            KvType::Q8_0 => self.head_dim / QK8_0,
        }
    }

    /// Elements of one block: `[layer][keys, values][kv_head][BLOCK_POSITIONS][row]`.
    fn block_len(&self) -> usize {
        self.layers * 2 * self.kv_heads * BLOCK_POSITIONS * self.row_len()
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_len()
            * match self.kv_type {
                KvType::F16 => size_of::<f16>(),
                KvType::Q8_0 => size_of::<BlockQ8_0>(),
            }
    }

    /// Offset of the `BLOCK_POSITIONS` rows of keys (`values = false`) or values of one KV
    /// head of one layer within a block.
    fn head_at(&self, layer: usize, values: bool, kv_head: usize) -> usize {
        let head = BLOCK_POSITIONS * self.row_len();
        ((layer * 2 + values as usize) * self.kv_heads + kv_head) * head
    }
}

/// One block's storage, of the cache's [`KvType`].
#[derive(Debug, Clone)]
pub enum Block {
    F16(Vec<f16>),
    Q8_0(Vec<BlockQ8_0>),
}

/// An element of a cache's rows, and what attention does with a row of them. A cache of
/// [`KvShape::kv_type`] `T::TYPE` hands out rows of `T` only.
pub trait KvElement: Copy + Send + Sync + 'static {
    const TYPE: KvType;
    fn elements(block: &Block) -> &[Self];
    fn elements_mut(block: &mut Block) -> &mut [Self];
    /// `values` (a head's row) into `row`.
    fn store(values: &[f32], row: &mut [Self]);
    /// Rows back to back, as f32 values into `out` (as many).
    fn load(rows: &[Self], out: &mut [f32]);
    /// `scores[k]` = the dot product of row k of `rows` with `q`.
    fn scores(rows: &[Self], q: &[f32], scores: &mut [f32]);
    /// `out += sum_k weights[k] * row k of rows`.
    fn weighted_sum(weights: &[f32], rows: &[Self], out: &mut [f32]);
}

impl KvElement for f16 {
    const TYPE: KvType = KvType::F16;
    fn elements(block: &Block) -> &[Self] {
        match block {
            Block::F16(v) => v,
            Block::Q8_0(_) => unreachable!("an f16 cache holds f16 blocks"),
        }
    }
    fn elements_mut(block: &mut Block) -> &mut [Self] {
        match block {
            Block::F16(v) => v,
            Block::Q8_0(_) => unreachable!("an f16 cache holds f16 blocks"),
        }
    }
    fn store(values: &[f32], row: &mut [Self]) {
        row.convert_from_f32_slice(values);
    }
    fn load(rows: &[Self], out: &mut [f32]) {
        rows.convert_to_f32_slice(out);
    }
    fn scores(rows: &[Self], q: &[f32], scores: &mut [f32]) {
        vector::scores_f16(rows, q, scores);
    }
    fn weighted_sum(weights: &[f32], rows: &[Self], out: &mut [f32]) {
        vector::weighted_sum_f16(weights, rows, out);
    }
}

impl KvElement for BlockQ8_0 {
    const TYPE: KvType = KvType::Q8_0;
    fn elements(block: &Block) -> &[Self] {
        match block {
            Block::Q8_0(v) => v,
            Block::F16(_) => unreachable!("a q8_0 cache holds q8_0 blocks"),
        }
    }
    fn elements_mut(block: &mut Block) -> &mut [Self] {
        match block {
            Block::Q8_0(v) => v,
            Block::F16(_) => unreachable!("a q8_0 cache holds q8_0 blocks"),
        }
    }
    fn store(values: &[f32], row: &mut [Self]) {
        quantize_q8_0_into(values, row);
    }
    fn load(rows: &[Self], out: &mut [f32]) {
        for (b, out) in rows.iter().zip(out.chunks_exact_mut(QK8_0)) {
            let d = b.d.to_f32();
            for (o, &q) in out.iter_mut().zip(&b.qs) {
                *o = d * q as f32;
            }
        }
    }
    fn scores(rows: &[Self], q: &[f32], scores: &mut [f32]) {
        vector::scores_q8_0(rows, q, scores);
    }
    fn weighted_sum(weights: &[f32], rows: &[Self], out: &mut [f32]) {
        vector::weighted_sum_q8_0(weights, rows, out);
    }
}

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
    /// An empty cache. A Q8_0 cache needs `head_dim` to be a multiple of 32 (checked where the
    /// type is chosen, [`Phi3Model::with_kv_type`](super::Phi3Model::with_kv_type)).
    pub fn new(shape: KvShape, max_len: usize) -> Self {
        assert!(shape.kv_type == KvType::F16 || shape.head_dim.is_multiple_of(QK8_0));
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
        let len = self.shape.block_len();
        while self.blocks.len() * BLOCK_POSITIONS < needed {
            let block = match self.shape.kv_type {
                KvType::F16 => Block::F16(vec![f16::ZERO; len]),
                KvType::Q8_0 => Block::Q8_0(vec![
                    BlockQ8_0 {
                        d: f16::ZERO,
                        qs: [0; QK8_0],
                    };
                    len
                ]),
            };
            self.blocks.push(Arc::new(block));
        }
        Ok(())
    }

    /// Writes keys and values of positions `len..len + seq` of `layer`: position `s` has its
    /// `kv_heads * head_dim` keys at `rows[s * stride + k_at..]` and values at `.. + v_at..`.
    /// Room must have been made by [`KvCache::reserve`]; the length advances once every layer is
    /// written, by [`KvCache::advance`].
    pub fn write(&mut self, layer: usize, rows: &[f32], stride: usize, k_at: usize, v_at: usize) {
        match self.shape.kv_type {
            KvType::F16 => self.write_as::<f16>(layer, rows, stride, k_at, v_at),
            KvType::Q8_0 => self.write_as::<BlockQ8_0>(layer, rows, stride, k_at, v_at),
        }
    }

    fn write_as<T: KvElement>(
        &mut self,
        layer: usize,
        rows: &[f32],
        stride: usize,
        k_at: usize,
        v_at: usize,
    ) {
        let (shape, d, row_len) = (self.shape, self.shape.head_dim, self.shape.row_len());
        for (s, row) in rows.chunks_exact(stride).enumerate() {
            let pos = self.len + s;
            let block = Arc::get_mut(&mut self.blocks[pos / BLOCK_POSITIONS])
                .expect("reserve() made the blocks written to unshared");
            let elements = T::elements_mut(block);
            let offset = (pos % BLOCK_POSITIONS) * row_len;
            for h in 0..shape.kv_heads {
                for (values, src) in [(false, k_at), (true, v_at)] {
                    let at = shape.head_at(layer, values, h) + offset;
                    T::store(&row[src + h * d..][..d], &mut elements[at..at + row_len]);
                }
            }
        }
    }

    pub fn advance(&mut self, positions: usize) {
        self.len += positions;
    }

    /// The keys (`values = false`) or values of KV head `kv_head` of `layer` for positions
    /// `start..end`, as contiguous runs of rows (`head_dim` values each), one run per block.
    /// `T` is the cache's element type ([`KvShape::kv_type`]).
    pub fn runs<T: KvElement>(
        &self,
        layer: usize,
        values: bool,
        kv_head: usize,
        start: usize,
        end: usize,
    ) -> impl Iterator<Item = &[T]> + '_ {
        assert_eq!(T::TYPE, self.shape.kv_type);
        let row_len = self.shape.row_len();
        let at = self.shape.head_at(layer, values, kv_head);
        let first_block = start / BLOCK_POSITIONS;
        self.blocks[first_block..end.div_ceil(BLOCK_POSITIONS)]
            .iter()
            .enumerate()
            .map(move |(i, block)| {
                let base = (first_block + i) * BLOCK_POSITIONS;
                let from = start.max(base) - base;
                let to = end.min(base + BLOCK_POSITIONS) - base;
                &T::elements(block)[at + from * row_len..at + to * row_len]
            })
    }

    /// Elements of one head's row of keys or values in this cache.
    pub fn row_len(&self) -> usize {
        self.shape.row_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 4,
        kv_type: KvType::F16,
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
            .runs::<f16>(layer, values, 1, start, end)
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

    /// A Q8_0 cache reads back every value within half a quantization step of its row's
    /// largest magnitude, and its blocks take 34 bytes per 32 values.
    #[test]
    fn a_q8_0_cache_reads_back_within_its_rounding() {
        let shape = KvShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 64,
            kv_type: KvType::Q8_0,
        };
        let f16_shape = KvShape {
            kv_type: KvType::F16,
            ..shape
        };
        assert_eq!(shape.block_bytes() * 64, f16_shape.block_bytes() * 34);
        let width = 2 * shape.kv_heads * shape.head_dim;
        let value = |pos: usize, i: usize| ((pos * 31 + i * 7) % 97) as f32 / 13.0 - 3.5;
        let mut cache = KvCache::new(shape, 1000);
        for n in [70, 1, 60] {
            let rows: Vec<f32> = (0..n)
                .flat_map(|s| (0..width).map(move |i| (s, i)))
                .map(|(s, i)| value(cache.len() + s, i))
                .collect();
            cache.reserve(n).unwrap();
            for layer in 0..shape.layers {
                cache.write(layer, &rows, width, 0, width / 2);
            }
            cache.advance(n);
        }
        assert_eq!(cache.bytes(), 3 * shape.block_bytes());
        for (values, at) in [(false, 0), (true, width / 2)] {
            let mut got = vec![0f32; 131 * shape.head_dim];
            let mut j = 0;
            for run in cache.runs::<BlockQ8_0>(1, values, 1, 0, 131) {
                let n = run.len() * QK8_0;
                BlockQ8_0::load(run, &mut got[j..j + n]);
                j += n;
            }
            assert_eq!(j, got.len());
            for (pos, row) in got.chunks_exact(shape.head_dim).enumerate() {
                for (c, &g) in row.iter().enumerate() {
                    let want = value(pos, at + shape.head_dim + c);
                    // Largest magnitude under 3.96: half a step of 3.96 / 127, and the f16
                    // scale's own rounding (2^-11 relative) over 127 steps.
                    let bound = 0.5 * 3.96 / 127.0 + 3.96 / 1024.0;
                    assert!((g - want).abs() <= bound, "{pos} {c}: {g} against {want}");
                }
            }
        }
    }
}
