//! AVX-512 VNNI kernels for [`gemm`](crate::kernels::gemm()) on the quantized types.
//!
//! Both operands are repacked into [`Panel`]s of 16 scale groups side by side (sub-blocks of the
//! K-quants, blocks of Q8_0/Q4_0), transposed so that lane t of `q[v]` holds values 4v..4v+4 of
//! group t. One `vpdpbusd` then advances all 16 groups' integer dot products by 4 values, and the
//! sums come out one group per i32 lane, ready for a per-lane float scale: the inner loop has no
//! unpacking, no shuffles and no horizontal sums, only `V` `vpdpbusd`, a convert, a multiply of
//! the two panels' scales and an FMA (plus one for the mins of Q4_K/Q5_K) per pair of panels.
//! The activations are repacked once per call, each weight row once (in its tile).
//!
//! Integer sums stay within i32 (at most 32 products of 255 by 128 per lane) and match gemv's;
//! the float work differs in order only.

use std::arch::x86_64::*;

use half::f16;
use rayon::prelude::*;

use crate::kernels::blocks::*;
use crate::kernels::tiling::{tiles_par, SharedOut};

/// 16 scale groups of `4 * V` values, transposed (see the module docs), with per-group factors.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct Panel<const V: usize> {
    /// Lane t (bytes 4t..4t+4) of `q[v]`: values 4v..4v+4 of group t. Unsigned for the operand
    /// `vpdpbusd` takes unsigned (weights, or Q8_0's activations offset by 128), else i8.
    q: [[u8; 64]; V],
    /// The group's scale: weights' `d * sub-block scale` (or `d`), activations' `d`.
    scale: [f32; 16],
    /// Per type (see [`Kind`]): the f32 factors of the mins term, the i32 offset term to start
    /// the integer sums from, or unused (zero).
    extra: [u32; 16],
}

impl<const V: usize> Panel<V> {
    const ZERO: Self = Panel {
        q: [[0; 64]; V],
        scale: [0.0; 16],
        extra: [0; 16],
    };

    /// The sums of each group's values, taken as i8.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn sums(&self) -> __m512i {
        let ones = _mm512_set1_epi8(1);
        let mut s = _mm512_setzero_si512();
        for q in &self.q {
            s = _mm512_dpbusd_epi32(s, ones, load_q(q));
        }
        s
    }
}

/// Scale group `t` of a row of panels: (panel, lane).
fn lane<const V: usize>(panels: &mut [Panel<V>], t: usize) -> (&mut Panel<V>, usize) {
    (&mut panels[t / 16], t % 16)
}

/// Puts consecutive groups of `4 * V` values, from group `first` of a row of panels on.
fn put_groups<const V: usize>(panels: &mut [Panel<V>], first: usize, values: &[u8]) {
    for (k, group) in values.chunks_exact(4 * V).enumerate() {
        let (p, t) = lane(panels, first + k);
        for (q, word) in p.q.iter_mut().zip(group.chunks_exact(4)) {
            q[4 * t..4 * t + 4].copy_from_slice(word);
        }
    }
}

/// Clears the last panel of a row, the only one that can have lanes past the data (left at
/// zero, they add nothing); the others are written whole.
fn clear_tail<const V: usize>(panels: &mut [Panel<V>]) {
    if let Some(last) = panels.last_mut() {
        *last = Panel::ZERO;
    }
}

/// How a weight type maps onto panels of `V` vectors.
pub trait Kind<const V: usize> {
    type Block: Sync;
    /// Scale groups per block.
    const GROUPS: usize;
    /// Q8_0: the weights are signed, so the activations go in offset by 128 as the unsigned
    /// operand and the weight panels' `extra` holds `-128 * sum of the group's weights`.
    const SIGNED_W: bool;
    /// The activation panels' `extra` holds the offset term of unsigned weights (Q6_K's 32,
    /// Q4_0's 8): `-offset * sum of the group's activations`.
    const A_OFFSET: bool;
    /// Q4_K/Q5_K: both `extra`s hold f32 factors of the mins term, `-dmin * min` and
    /// `d * sum of the group's activations`.
    const MINS: bool;

    /// One weight row's panels (`out.len()` of them).
    fn pack_weights(w: &[Self::Block], out: &mut [Panel<V>]);

    /// One activation row, quantized as gemv does, into panels (`out.len()` of them).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI.
    unsafe fn pack_acts(x: &[f32], out: &mut [Panel<V>]);
}

/// Panels per row of `blocks` blocks of `K`.
fn panels<K: Kind<V>, const V: usize>(blocks: usize) -> usize {
    (blocks * K::GROUPS).div_ceil(16)
}

/// [`quantize_q8k`] on one block of 256 values, bit for bit: the values into `q`, returns `d`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub fn quantize_q8k_block(x: &[f32], q: &mut [u8; QK_K]) -> f32 {
    assert_eq!(x.len(), QK_K);
    let mut m = _mm512_setzero_ps();
    for k in 0..16 {
        // With a NaN first, max returns the second operand: NaNs are skipped, as by the
        // reference's `>`.
        m = _mm512_max_ps(_mm512_abs_ps(load_ps(x, 16 * k)), m);
    }
    let amax = _mm512_reduce_max_ps(m);
    if amax == 0.0 {
        *q = [0; QK_K];
        return 0.0;
    }
    // The reference's `max`: the first value of the largest magnitude.
    let max = *x
        .iter()
        .find(|v| v.abs() == amax)
        .expect("amax is a magnitude in x");
    let iscale = -127.0 / max;
    quantize_16s(x, _mm512_set1_ps(iscale), q);
    1.0 / iscale
}

/// [`quantize_q8_0`] on one block of 32 values, bit for bit: the values into `q`, returns `d`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub fn quantize_q8_0_block(x: &[f32], q: &mut [u8; QK8_0]) -> f16 {
    assert_eq!(x.len(), QK8_0);
    let m = _mm512_max_ps(_mm512_abs_ps(load_ps(x, 0)), _mm512_setzero_ps());
    let m = _mm512_max_ps(_mm512_abs_ps(load_ps(x, 16)), m);
    let d = _mm512_reduce_max_ps(m) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    quantize_16s(x, _mm512_set1_ps(id), q);
    f16::from_f32(d)
}

/// `q[l] = clamp(round_ties_even(x[l] * scale), -127, 127)`, 0 where the product is NaN, as
/// the reference quantizers do (MXCSR rounds to nearest even: Rust never changes it).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_16s(x: &[f32], scale: __m512, q: &mut [u8]) {
    assert_eq!(x.len(), q.len());
    for (k, q) in q.chunks_exact_mut(16).enumerate() {
        let p = _mm512_mul_ps(load_ps(x, 16 * k), scale);
        let r = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p), p);
        let r = _mm512_min_epi32(
            _mm512_max_epi32(r, _mm512_set1_epi32(-127)),
            _mm512_set1_epi32(127),
        );
        let bytes = _mm512_cvtepi32_epi8(r);
        // SAFETY: `q` is a chunk of 16 bytes.
        unsafe { _mm_storeu_si128(q.as_mut_ptr().cast(), bytes) };
    }
}

/// 16 floats of `x` from `at`.
#[inline]
#[target_feature(enable = "avx512f")]
fn load_ps(x: &[f32], at: usize) -> __m512 {
    assert!(at + 16 <= x.len());
    // SAFETY: 16 floats from `at` lie within `x` (asserted).
    unsafe { _mm512_loadu_ps(x.as_ptr().add(at)) }
}

/// Q4_K/Q5_K activations: Q8_K in groups of 32, the mins' factors `d * sums` in `extra`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn pack_acts_k32(x: &[f32], out: &mut [Panel<8>]) {
    clear_tail(out);
    let mut q = [0u8; QK_K];
    for (k, x) in x.chunks_exact(QK_K).enumerate() {
        let d = quantize_q8k_block(x, &mut q);
        put_groups(out, 8 * k, &q);
        for s in 0..8 {
            let (p, t) = lane(out, 8 * k + s);
            p.scale[t] = d;
        }
    }
    for p in out {
        let sums = _mm512_mul_ps(
            _mm512_castsi512_ps(load(&p.scale)),
            _mm512_cvtepi32_ps(p.sums()),
        );
        store(&mut p.extra, _mm512_castps_si512(sums));
    }
}

/// Q4_K/Q5_K weights: the scales (`d` times the sub-block's) and mins' factors of block `k`,
/// given its `d`, `dmin` and unpacked sub-block scales and mins.
fn pack_k32_scales(
    out: &mut [Panel<8>],
    k: usize,
    (d, dmin): (f16, f16),
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

    fn pack_weights(w: &[BlockQ4K], out: &mut [Panel<8>]) {
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

    unsafe fn pack_acts(x: &[f32], out: &mut [Panel<8>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_k32(x, out) }
    }
}

pub struct Q5K;
impl Kind<8> for Q5K {
    type Block = BlockQ5K;
    const GROUPS: usize = 8;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = false;
    const MINS: bool = true;

    fn pack_weights(w: &[BlockQ5K], out: &mut [Panel<8>]) {
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

    unsafe fn pack_acts(x: &[f32], out: &mut [Panel<8>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_k32(x, out) }
    }
}

pub struct Q6K;
impl Kind<4> for Q6K {
    type Block = BlockQ6K;
    const GROUPS: usize = 16;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = true;
    const MINS: bool = false;

    fn pack_weights(w: &[BlockQ6K], out: &mut [Panel<4>]) {
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
            for (scale, &s) in out[k].scale.iter_mut().zip(&b.scales) {
                *scale = d * s as f32;
            }
        }
    }

    unsafe fn pack_acts(x: &[f32], out: &mut [Panel<4>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_q6k(x, out) }
    }
}

/// Q6_K activations: Q8_K in groups of 16, the offset term `-32 * sums` in `extra`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn pack_acts_q6k(x: &[f32], out: &mut [Panel<4>]) {
    let mut q = [0u8; QK_K];
    for (x, p) in x.chunks_exact(QK_K).zip(out) {
        let d = quantize_q8k_block(x, &mut q);
        put_groups(std::slice::from_mut(p), 0, &q);
        p.scale = [d; 16];
        let offset = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<5>(p.sums()));
        store(&mut p.extra, offset);
    }
}

pub struct Q8_0;
impl Kind<8> for Q8_0 {
    type Block = BlockQ8_0;
    const GROUPS: usize = 1;
    const SIGNED_W: bool = true;
    const A_OFFSET: bool = false;
    const MINS: bool = false;

    fn pack_weights(w: &[BlockQ8_0], out: &mut [Panel<8>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            put_groups(out, k, &b.qs.map(|q| q as u8));
            let (p, t) = lane(out, k);
            p.scale[t] = b.d.to_f32();
            let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
            p.extra[t] = (-128 * sum) as u32;
        }
    }

    unsafe fn pack_acts(x: &[f32], out: &mut [Panel<8>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_q8_0::<true>(x, out) }
    }
}

/// Q8_0 activations for Q8_0 (`OFFSET`: plus 128, the unsigned operand) or Q4_0 weights
/// (`-8 * sums` in `extra`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn pack_acts_q8_0<const OFFSET: bool>(x: &[f32], out: &mut [Panel<8>]) {
    clear_tail(out);
    let mut q = [0u8; QK8_0];
    for (k, x) in x.chunks_exact(QK8_0).enumerate() {
        let d = quantize_q8_0_block(x, &mut q);
        if OFFSET {
            q = q.map(|q| q.wrapping_add(128));
        }
        put_groups(out, k, &q);
        let (p, t) = lane(out, k);
        p.scale[t] = d.to_f32();
    }
    if !OFFSET {
        for p in out {
            let offset = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<3>(p.sums()));
            store(&mut p.extra, offset);
        }
    }
}

pub struct Q4_0;
impl Kind<8> for Q4_0 {
    type Block = BlockQ4_0;
    const GROUPS: usize = 1;
    const SIGNED_W: bool = false;
    const A_OFFSET: bool = true;
    const MINS: bool = false;

    fn pack_weights(w: &[BlockQ4_0], out: &mut [Panel<8>]) {
        clear_tail(out);
        let mut values = [0u8; QK4_0];
        for (k, b) in w.iter().enumerate() {
            // 0..=15: the offset of 8 is the activations' `extra`.
            for l in 0..16 {
                values[l] = b.qs[l] & 0xF;
                values[16 + l] = b.qs[l] >> 4;
            }
            put_groups(out, k, &values);
            let (p, t) = lane(out, k);
            p.scale[t] = b.d.to_f32();
        }
    }

    unsafe fn pack_acts(x: &[f32], out: &mut [Panel<8>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_q8_0::<false>(x, out) }
    }
}

/// Weight and activation rows per microkernel call: 12 pairs keep 12 integer and 12 float
/// accumulators in registers, and each vector loaded serves 3 or 4 `vpdpbusd`.
const RW: usize = 3;
const RA: usize = 4;
const _: () = assert!(
    RW == 3 && RA == 4,
    "gemm's dispatch covers 3x4 calls and smaller"
);

/// Weight rows per tile: 48 rows of a 3072-column Q4_K matrix take 180 KiB as panels, in L2.
const TILE_ROWS: usize = 48;

/// Most bytes of activation panels per microkernel call: `RA` rows of a K-chunk stay in L1
/// (48 KiB) while the tile's weight rows stream past them.
const CHUNK_BYTES: usize = 24 * 1024;

/// `out[i * rows + r] = dot(row r of w, row i of x)` for the `n` rows of `x` (`cols` values
/// each); `w` has `bpr` blocks per row.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI.
pub unsafe fn gemm<K: Kind<V>, const V: usize>(
    w: &[K::Block],
    bpr: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &SharedOut,
) {
    let np = panels::<K, V>(bpr);
    let mut acts = vec![Panel::<V>::ZERO; n * np];
    acts.par_chunks_mut(np)
        .zip(x.par_chunks(cols))
        // SAFETY: the caller guarantees the features.
        .for_each(|(p, x)| unsafe { K::pack_acts(x, p) });
    // K in even chunks of at most CHUNK_BYTES per call's activations.
    let chunks = (np * RA * size_of::<Panel<V>>()).div_ceil(CHUNK_BYTES);
    let kc = np.div_ceil(chunks);
    tiles_par(out, TILE_ROWS, Vec::new, |wp, tile| {
        let rows = tile.rows();
        wp.resize(rows.len() * np, Panel::ZERO);
        for (p, r) in wp.chunks_mut(np).zip(rows.clone()) {
            K::pack_weights(&w[r * bpr..(r + 1) * bpr], p);
        }
        for i0 in (0..n).step_by(RA) {
            let ra = RA.min(n - i0);
            for c0 in (0..np).step_by(kc) {
                let c = c0..np.min(c0 + kc);
                for r0 in (0..rows.len()).step_by(RW) {
                    let rw = RW.min(rows.len() - r0);
                    macro_rules! call {
                        ($rw:literal, $ra:literal) => {{
                            let wr = std::array::from_fn(|r| &wp[(r0 + r) * np..][c.clone()]);
                            let ar = std::array::from_fn(|i| &acts[(i0 + i) * np..][c.clone()]);
                            // SAFETY: the caller guarantees the features.
                            let res = unsafe { panel_dots::<K, V, $rw, $ra>(wr, ar) };
                            for (r, res) in res.iter().enumerate() {
                                for (i, &v) in res.iter().enumerate() {
                                    let (i, r) = (i0 + i, rows.start + r0 + r);
                                    if c0 == 0 {
                                        tile.set(i, r, v);
                                    } else {
                                        tile.add(i, r, v);
                                    }
                                }
                            }
                        }};
                    }
                    match (rw, ra) {
                        (3, 4) => call!(3, 4),
                        (3, 3) => call!(3, 3),
                        (3, 2) => call!(3, 2),
                        (3, 1) => call!(3, 1),
                        (2, 4) => call!(2, 4),
                        (2, 3) => call!(2, 3),
                        (2, 2) => call!(2, 2),
                        (2, 1) => call!(2, 1),
                        (1, 4) => call!(1, 4),
                        (1, 3) => call!(1, 3),
                        (1, 2) => call!(1, 2),
                        _ => call!(1, 1),
                    }
                }
            }
        }
    });
}

/// A 64-byte field of a [`Panel`] as a vector.
#[inline]
#[target_feature(enable = "avx512f")]
fn load<T: Copy>(field: &[T; 16]) -> __m512i {
    const { assert!(size_of::<T>() == 4) };
    // SAFETY: 64 bytes (asserted), at a multiple of 64 within a `Panel`, which is 64-aligned.
    unsafe { _mm512_load_si512(field.as_ptr().cast()) }
}

/// Stores a vector into a 64-byte field of a [`Panel`].
#[inline]
#[target_feature(enable = "avx512f")]
fn store(field: &mut [u32; 16], v: __m512i) {
    // SAFETY: 64 bytes, at a multiple of 64 within a `Panel`, which is 64-aligned.
    unsafe { _mm512_store_si512(field.as_mut_ptr().cast(), v) }
}

/// `q[v]` of a panel as a vector.
#[inline]
#[target_feature(enable = "avx512f")]
fn load_q(q: &[u8; 64]) -> __m512i {
    // SAFETY: 64 bytes, at a multiple of 64 within a `Panel`, which is 64-aligned.
    unsafe { _mm512_load_si512(q.as_ptr().cast()) }
}

/// The dot products of `RW` weight rows with `RA` activation rows, all as panels (the same
/// number of each).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn panel_dots<K: Kind<V>, const V: usize, const RW: usize, const RA: usize>(
    w: [&[Panel<V>]; RW],
    a: [&[Panel<V>]; RA],
) -> [[f32; RA]; RW] {
    const { assert!(RW * RA <= 16, "hsum16 takes 16 accumulators") };
    let np = a[0].len();
    assert!(w.iter().all(|w| w.len() == np) && a.iter().all(|a| a.len() == np));
    let mut acc = [[_mm512_setzero_ps(); RA]; RW];
    for g in 0..np {
        let mut wp = [&w[0][g]; RW];
        for r in 1..RW {
            wp[r] = &w[r][g];
        }
        let mut ap = [&a[0][g]; RA];
        for i in 1..RA {
            ap[i] = &a[i][g];
        }
        // The integer sums of every pair, V steps of 4 values, each loaded vector used for a
        // whole row or column of pairs.
        let mut s = [[_mm512_setzero_si512(); RA]; RW];
        if K::A_OFFSET {
            for i in 0..RA {
                let e = load(&ap[i].extra);
                for s in s.iter_mut() {
                    s[i] = e;
                }
            }
        } else if K::SIGNED_W {
            for (s, wp) in s.iter_mut().zip(&wp) {
                *s = [load(&wp.extra); RA];
            }
        }
        for v in 0..V {
            let mut wq = [_mm512_setzero_si512(); RW];
            for r in 0..RW {
                wq[r] = load_q(&wp[r].q[v]);
            }
            for i in 0..RA {
                let aq = load_q(&ap[i].q[v]);
                for r in 0..RW {
                    s[r][i] = if K::SIGNED_W {
                        _mm512_dpbusd_epi32(s[r][i], aq, wq[r])
                    } else {
                        _mm512_dpbusd_epi32(s[r][i], wq[r], aq)
                    };
                }
            }
        }
        for i in 0..RA {
            let a_scale = _mm512_castsi512_ps(load(&ap[i].scale));
            for r in 0..RW {
                let scale = _mm512_mul_ps(_mm512_castsi512_ps(load(&wp[r].scale)), a_scale);
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][i]), scale, acc[r][i]);
                if K::MINS {
                    acc[r][i] = _mm512_fmadd_ps(
                        _mm512_castsi512_ps(load(&wp[r].extra)),
                        _mm512_castsi512_ps(load(&ap[i].extra)),
                        acc[r][i],
                    );
                }
            }
        }
    }
    let mut flat = [_mm512_setzero_ps(); 16];
    for r in 0..RW {
        for i in 0..RA {
            flat[r * RA + i] = acc[r][i];
        }
    }
    let sums = hsum16(flat);
    let mut res = [[0f32; RA]; RW];
    for r in 0..RW {
        for i in 0..RA {
            res[r][i] = sums[r * RA + i];
        }
    }
    res
}

/// The horizontal sums of 16 vectors, in 45 shuffles and adds rather than 16 reductions.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum16(a: [__m512; 16]) -> [f32; 16] {
    // Each step halves the vectors and the lanes per input: b[j] holds a[2j]'s 256-bit halves
    // summed in its lower half, a[2j + 1]'s in its upper; c[m] one input per 128-bit lane; then
    // pairs and quads of lanes within each 128-bit lane.
    let mut b = [_mm512_setzero_ps(); 8];
    for j in 0..8 {
        let (x, y) = (a[2 * j], a[2 * j + 1]);
        b[j] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        );
    }
    let mut c = [_mm512_setzero_ps(); 4];
    for m in 0..4 {
        let (x, y) = (b[2 * m], b[2 * m + 1]);
        c[m] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xDD>(x, y),
        );
    }
    let mut d = [_mm512_setzero_ps(); 2];
    for k in 0..2 {
        let (x, y) = (c[2 * k], c[2 * k + 1]);
        d[k] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    let (x, y) = (_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]));
    let e = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
    );
    // Lane 4k + j of e is the sum of c[j]'s 128-bit lane k, which is a[4j + k].
    let mut lanes = [0f32; 16];
    // SAFETY: 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), e) };
    let mut sums = [0f32; 16];
    for (f, sum) in sums.iter_mut().enumerate() {
        *sum = lanes[4 * (f % 4) + f / 4];
    }
    sums
}
