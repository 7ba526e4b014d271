//! Panels: the layout of the matrix products over many activation rows (prefill), shared by the
//! levels that have such kernels (`x86::avx512_gemm`, 16 lanes; `x86::avx2_gemm`, 8 lanes).
//!
//! A row of weights or activations is cut into scale groups (sub-blocks of the K-quants, blocks
//! of Q8_0/Q4_0), and `L` consecutive groups go side by side into a [`Panel`], transposed so that
//! lane t of `q[v]` holds values 4v..4v+4 of group t. An instruction that sums 4 byte products
//! into each 32-bit lane (`vpdpbusd`, or `vpmaddubsw` then `vpmaddwd`) then advances all `L`
//! groups' integer dot products at once, and the sums come out one group per lane, ready for a
//! per-lane float scale: the inner loop has no unpacking, no shuffles and no horizontal sums.
//!
//! [`gemm`] packs the activations once per call and each weight row once, in the task of its
//! tile; a level supplies the microkernel that multiplies a few rows of panels by a few others.

use rayon::prelude::*;

use super::blocks::*;
use super::tiling::{tiles_par, SharedOut};

/// `L` scale groups of `4 * V` values, transposed (see the module docs), with per-group factors.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Panel<const V: usize, const L: usize> {
    /// Lane t of `q[v]` (4 bytes, little-endian): values 4v..4v+4 of group t. Unsigned where the
    /// kernels take the operand as unsigned (weights, or for `vpdpbusd` Q8_0's activations
    /// offset by 128), else i8.
    pub q: [[u32; L]; V],
    /// The group's scale: weights' `d * sub-block scale` (or `d`), activations' `d`.
    pub scale: [f32; L],
    /// Per type (see [`Kind`]): the f32 factors of the mins term, the i32 offset term to start
    /// the integer sums from, or unused (zero).
    pub extra: [u32; L],
}

impl<const V: usize, const L: usize> Panel<V, L> {
    pub const ZERO: Self = Panel {
        q: [[0; L]; V],
        scale: [0.0; L],
        extra: [0; L],
    };

    /// The sum of lane `t`'s values, taken as i8.
    fn group_sum(&self, t: usize) -> i32 {
        self.q
            .iter()
            .flat_map(|q| q[t].to_le_bytes())
            .map(|b| b as i8 as i32)
            .sum()
    }
}

/// Scale group `t` of a row of panels: (panel, lane).
pub fn lane<const V: usize, const L: usize>(
    panels: &mut [Panel<V, L>],
    t: usize,
) -> (&mut Panel<V, L>, usize) {
    (&mut panels[t / L], t % L)
}

/// Puts consecutive groups of `4 * V` values, from group `first` of a row of panels on.
pub fn put_groups<const V: usize, const L: usize>(
    panels: &mut [Panel<V, L>],
    first: usize,
    values: &[u8],
) {
    for (k, group) in values.chunks_exact(4 * V).enumerate() {
        let (p, t) = lane(panels, first + k);
        for (q, word) in p.q.iter_mut().zip(group.chunks_exact(4)) {
            q[t] = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        }
    }
}

/// Clears the last panel of a row, the only one that can have lanes past the data (left at
/// zero, they add nothing); the others are written whole.
pub fn clear_tail<const V: usize, const L: usize>(panels: &mut [Panel<V, L>]) {
    if let Some(last) = panels.last_mut() {
        *last = Panel::ZERO;
    }
}

/// Panels per row of `blocks` blocks of `K`, `L` groups a panel.
pub fn panels<K: Kind<V>, const V: usize, const L: usize>(blocks: usize) -> usize {
    (blocks * K::GROUPS).div_ceil(L)
}

/// How a weight type maps onto panels of `V` vectors.
pub trait Kind<const V: usize> {
    type Block: Sync;
    /// Scale groups per block.
    const GROUPS: usize;
    /// Q8_0: the weights are signed. For `vpdpbusd` the activations go in offset by 128 as the
    /// unsigned operand, and the weight panels' `extra` holds `-128 * sum of the group's
    /// weights`; `vpmaddubsw` takes the weights' magnitudes and the activations' signs flipped
    /// to match, and no offset.
    const SIGNED_W: bool;
    /// The activation panels' `extra` holds the offset term of unsigned weights (Q6_K's 32,
    /// Q4_0's 8): `-offset * sum of the group's activations`.
    const A_OFFSET: bool;
    /// Q4_K/Q5_K: both `extra`s hold f32 factors of the mins term, `-dmin * min` and
    /// `d * sum of the group's activations`.
    const MINS: bool;
    /// The largest magnitude of a packed weight value: with activations within ±127, it bounds
    /// the 16-bit pair sums of `vpmaddubsw`.
    const W_MAX: i32;

    /// One weight row's panels (`out.len()` of them).
    fn pack_weights<const L: usize>(w: &[Self::Block], out: &mut [Panel<V, L>]);

    /// One activation row, quantized as gemv does (Q8_K or Q8_0), into panels (`out.len()` of
    /// them), signed: the packing of the kernels that use `vpmaddubsw`.
    fn pack_acts<const L: usize>(x: &[f32], out: &mut [Panel<V, L>]);
}

/// Q4_K/Q5_K activations: Q8_K in groups of 32, the mins' factors `d * sums` in `extra`.
fn pack_acts_k32<const L: usize>(x: &[f32], out: &mut [Panel<8, L>]) {
    clear_tail(out);
    for (k, b) in quantize_q8k(x).iter().enumerate() {
        put_groups(out, 8 * k, &b.qs.map(|q| q as u8));
        for s in 0..8 {
            let (p, t) = lane(out, 8 * k + s);
            p.scale[t] = b.d;
            let sum = b.bsums[2 * s] as f32 + b.bsums[2 * s + 1] as f32;
            p.extra[t] = (b.d * sum).to_bits();
        }
    }
}

/// Q4_K/Q5_K weights: the scales (`d` times the sub-block's) and mins' factors of block `k`,
/// given its `d`, `dmin` and unpacked sub-block scales and mins.
fn pack_k32_scales<const L: usize>(
    out: &mut [Panel<8, L>],
    k: usize,
    (d, dmin): (half::f16, half::f16),
    (sc, mn): ([u8; 8], [u8; 8]),
) {
    for s in 0..8 {
        let (p, t) = lane(out, 8 * k + s);
        p.scale[t] = d.to_f32() * sc[s] as f32;
        p.extra[t] = (-dmin.to_f32() * mn[s] as f32).to_bits();
    }
}

pub struct Q4K;
impl Kind<8> for Q4K {
    type Block = BlockQ4K;
    const GROUPS: usize = 8;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = false;
    const MINS: bool = true;
    const W_MAX: i32 = 15;

    fn pack_weights<const L: usize>(w: &[BlockQ4K], out: &mut [Panel<8, L>]) {
        clear_tail(out);
        let mut values = [0u8; QK_K];
        for (k, b) in w.iter().enumerate() {
            // Values 64j.. are the low nibbles of qs[32j..32j + 32], 64j + 32.. the high ones.
            for (v, q) in values.chunks_exact_mut(64).zip(b.qs.chunks_exact(32)) {
                for l in 0..32 {
                    v[l] = q[l] & 0xF;
                    v[32 + l] = q[l] >> 4;
                }
            }
            put_groups(out, 8 * k, &values);
            pack_k32_scales(out, k, (b.d, b.dmin), unpack_scales_k4(&b.scales));
        }
    }

    fn pack_acts<const L: usize>(x: &[f32], out: &mut [Panel<8, L>]) {
        pack_acts_k32(x, out)
    }
}

pub struct Q5K;
impl Kind<8> for Q5K {
    type Block = BlockQ5K;
    const GROUPS: usize = 8;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = false;
    const MINS: bool = true;
    const W_MAX: i32 = 31;

    fn pack_weights<const L: usize>(w: &[BlockQ5K], out: &mut [Panel<8, L>]) {
        clear_tail(out);
        let mut values = [0u8; QK_K];
        for (k, b) in w.iter().enumerate() {
            // As Q4_K, plus bit 2j (low nibbles) or 2j + 1 (high) of qh[l] as bit 4.
            for (j, (v, q)) in values
                .chunks_exact_mut(64)
                .zip(b.qs.chunks_exact(32))
                .enumerate()
            {
                for l in 0..32 {
                    let h = b.qh[l] >> (2 * j);
                    v[l] = (q[l] & 0xF) | ((h & 1) << 4);
                    v[32 + l] = (q[l] >> 4) | ((h & 2) << 3);
                }
            }
            put_groups(out, 8 * k, &values);
            pack_k32_scales(out, k, (b.d, b.dmin), unpack_scales_k4(&b.scales));
        }
    }

    fn pack_acts<const L: usize>(x: &[f32], out: &mut [Panel<8, L>]) {
        pack_acts_k32(x, out)
    }
}

pub struct Q6K;
impl Kind<4> for Q6K {
    type Block = BlockQ6K;
    const GROUPS: usize = 16;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = true;
    const MINS: bool = false;
    const W_MAX: i32 = 63;

    fn pack_weights<const L: usize>(w: &[BlockQ6K], out: &mut [Panel<4, L>]) {
        clear_tail(out);
        let mut values = [0u8; QK_K];
        for (k, b) in w.iter().enumerate() {
            // 0..=63 (the offset of 32 is the activations' `extra`), as `q6k_value`: value
            // 128n + 32c + l is the low (c < 2) or high nibble of ql[64n + 32(c % 2) + l], and
            // bits 2c..2c + 2 of qh[32n + l] above it.
            for n in 0..2 {
                let (ql, qh) = (&b.ql[64 * n..][..64], &b.qh[32 * n..][..32]);
                let v = &mut values[128 * n..][..128];
                for l in 0..32 {
                    v[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    v[32 + l] = (ql[32 + l] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    v[64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    v[96 + l] = (ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            put_groups(out, 16 * k, &values);
            let d = b.d.to_f32();
            for (s, &scale) in b.scales.iter().enumerate() {
                let (p, t) = lane(out, 16 * k + s);
                p.scale[t] = d * scale as f32;
                p.extra[t] = 0;
            }
        }
    }

    fn pack_acts<const L: usize>(x: &[f32], out: &mut [Panel<4, L>]) {
        // Q8_K in groups of 16, the offset term `-32 * sums` in `extra`.
        clear_tail(out);
        for (k, b) in quantize_q8k(x).iter().enumerate() {
            put_groups(out, 16 * k, &b.qs.map(|q| q as u8));
            for (s, &sum) in b.bsums.iter().enumerate() {
                let (p, t) = lane(out, 16 * k + s);
                p.scale[t] = b.d;
                p.extra[t] = (-32 * sum as i32) as u32;
            }
        }
    }
}

/// Q8_0 activations for Q8_0 or Q4_0 weights (`OFFSET`: the offset term of Q4_0's unsigned
/// values, `-8 * sums`, in `extra`).
fn pack_acts_q8_0<const OFFSET: bool, const L: usize>(x: &[f32], out: &mut [Panel<8, L>]) {
    clear_tail(out);
    for (k, b) in quantize_q8_0(x).iter().enumerate() {
        put_groups(out, k, &b.qs.map(|q| q as u8));
        let (p, t) = lane(out, k);
        p.scale[t] = b.d.to_f32();
        if OFFSET {
            p.extra[t] = (-8 * p.group_sum(t)) as u32;
        }
    }
}

/// Q8_0 weights, their values in place: each block's scale, and the offset term `vpdpbusd`
/// needs (`-128 * sum of the block's values`).
pub fn pack_q8_0_factors<const L: usize>(w: &[BlockQ8_0], out: &mut [Panel<8, L>]) {
    for (k, b) in w.iter().enumerate() {
        let (p, t) = lane(out, k);
        p.scale[t] = b.d.to_f32();
        p.extra[t] = (-128 * p.group_sum(t)) as u32;
    }
}

/// Q4_0 weights: each block's scale.
pub fn pack_q4_0_scales<const L: usize>(w: &[BlockQ4_0], out: &mut [Panel<8, L>]) {
    for (k, b) in w.iter().enumerate() {
        let (p, t) = lane(out, k);
        p.scale[t] = b.d.to_f32();
    }
}

pub struct Q8_0;
impl Kind<8> for Q8_0 {
    type Block = BlockQ8_0;
    const GROUPS: usize = 1;
    const SIGNED_W: bool = true;
    const A_OFFSET: bool = false;
    const MINS: bool = false;
    const W_MAX: i32 = 128;

    fn pack_weights<const L: usize>(w: &[BlockQ8_0], out: &mut [Panel<8, L>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            put_groups(out, k, &b.qs.map(|q| q as u8));
        }
        pack_q8_0_factors(w, out);
    }

    fn pack_acts<const L: usize>(x: &[f32], out: &mut [Panel<8, L>]) {
        pack_acts_q8_0::<false, L>(x, out)
    }
}

pub struct Q4_0;
impl Kind<8> for Q4_0 {
    type Block = BlockQ4_0;
    const GROUPS: usize = 1;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = true;
    const MINS: bool = false;
    const W_MAX: i32 = 15;

    fn pack_weights<const L: usize>(w: &[BlockQ4_0], out: &mut [Panel<8, L>]) {
        clear_tail(out);
        let mut values = [0u8; QK4_0];
        for (k, b) in w.iter().enumerate() {
            // 0..=15: the offset of 8 is the activations' `extra`.
            for l in 0..16 {
                values[l] = b.qs[l] & 0xF;
                values[16 + l] = b.qs[l] >> 4;
            }
            put_groups(out, k, &values);
        }
        pack_q4_0_scales(w, out);
    }

    fn pack_acts<const L: usize>(x: &[f32], out: &mut [Panel<8, L>]) {
        pack_acts_q8_0::<true, L>(x, out)
    }
}

/// Most weight or activation rows per microkernel call.
pub const MAX_CALL_ROWS: usize = 6;

/// How a level's [`gemm`] cuts the work.
#[derive(Clone, Copy)]
pub struct Blocking {
    /// Weight rows per tile (one rayon task): their panels stay in L2.
    pub tile_rows: usize,
    /// Weight and activation rows per microkernel call (at most [`MAX_CALL_ROWS`] each).
    pub call_w: usize,
    pub call_a: usize,
    /// Most bytes of activation panels per microkernel call: `call_a` rows of a K-chunk stay in
    /// L1 while the tile's weight rows stream past them.
    pub chunk_bytes: usize,
}

/// `out[i * rows + r] = dot(row r of w, row i of x)` for the `n` rows of `x` (`cols` values
/// each); `w`'s rows have `bpr` blocks.
///
/// `pack_weights` packs one weight row (as [`Kind::pack_weights`]), `pack_acts` one activation
/// row; `dots(w, a, res)` sets `res[r * a.len() + i]` to the
/// dot product of the panels `w[r]` and `a[i]` (as many of each, one to `blocking.call_w` or
/// `call_a` rows).
#[allow(clippy::too_many_arguments)]
pub fn gemm<K: Kind<V>, const V: usize, const L: usize>(
    w: &[K::Block],
    bpr: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &SharedOut,
    blocking: Blocking,
    pack_weights: impl Fn(&[K::Block], &mut [Panel<V, L>]) + Sync,
    pack_acts: impl Fn(&[f32], &mut [Panel<V, L>]) + Sync,
    dots: impl Fn(&[&[Panel<V, L>]], &[&[Panel<V, L>]], &mut [f32]) + Sync,
) {
    let Blocking {
        tile_rows,
        call_w,
        call_a,
        chunk_bytes,
    } = blocking;
    assert!((1..=MAX_CALL_ROWS).contains(&call_w) && (1..=MAX_CALL_ROWS).contains(&call_a));
    let np = panels::<K, V, L>(bpr);
    let mut acts = vec![Panel::<V, L>::ZERO; n * np];
    acts.par_chunks_mut(np)
        .zip(x.par_chunks(cols))
        .for_each(|(p, x)| pack_acts(x, p));
    // K in even chunks of at most `chunk_bytes` per call's activations.
    let chunks = (np * call_a * size_of::<Panel<V, L>>()).div_ceil(chunk_bytes);
    let kc = np.div_ceil(chunks);
    let scratch = <(Vec<Panel<V, L>>, Vec<f32>)>::default;
    tiles_par(out, tile_rows, scratch, |(wp, sums), tile| {
        let rows = tile.rows();
        wp.resize(rows.len() * np, Panel::ZERO);
        // The tile's outputs, `(n, rows)`, written out a whole row at a time at the end: one
        // by one, each would land in its own cache line of the (much larger) output.
        sums.clear();
        sums.resize(n * rows.len(), 0.0);
        for (p, r) in wp.chunks_mut(np).zip(rows.clone()) {
            pack_weights(&w[r * bpr..][..bpr], p);
        }
        let mut res = [0f32; MAX_CALL_ROWS * MAX_CALL_ROWS];
        for i0 in (0..n).step_by(call_a) {
            let ra = call_a.min(n - i0);
            for c0 in (0..np).step_by(kc) {
                let c = c0..np.min(c0 + kc);
                let ar: [&[Panel<V, L>]; MAX_CALL_ROWS] =
                    std::array::from_fn(|i| &acts[(i0 + i.min(ra - 1)) * np..][c.clone()]);
                for r0 in (0..rows.len()).step_by(call_w) {
                    let rw = call_w.min(rows.len() - r0);
                    let wr: [&[Panel<V, L>]; MAX_CALL_ROWS] =
                        std::array::from_fn(|r| &wp[(r0 + r.min(rw - 1)) * np..][c.clone()]);
                    dots(&wr[..rw], &ar[..ra], &mut res[..rw * ra]);
                    for r in 0..rw {
                        for i in 0..ra {
                            sums[(i0 + i) * rows.len() + r0 + r] += res[r * ra + i];
                        }
                    }
                }
            }
        }
        for (i, row) in sums.chunks_exact(rows.len()).enumerate() {
            tile.set_run(i, rows.start, row);
        }
    });
}
