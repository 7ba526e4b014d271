//! AVX-512 VNNI kernels for [`Kernels::gemm`](crate::kernels::Kernels::gemm) on the quantized types, over
//! [`panel`]s of 16 scale groups.
//!
//! One `vpdpbusd` advances all 16 groups' integer dot products of a pair of panels by 4 values:
//! the inner loop is `V` `vpdpbusd`, a convert, a multiply of the two panels' scales and an FMA
//! (plus one for the mins of Q4_K/Q5_K) per pair of panels. The activations are quantized and
//! packed here with AVX-512, bit for bit as gemv quantizes them.
//!
//! Integer sums stay within i32 (at most 32 products of 255 by 128 per lane) and match gemv's;
//! the float work differs in order only.

use std::arch::x86_64::*;

use half::f16;

use super::pack::PackWeights;
use crate::kernels::blocks::*;
use crate::kernels::panel::{self, clear_tail, lane, put_groups, Blocking, Kind};
use crate::kernels::tiling::SharedOut;

/// A panel of 16 scale groups, one per 32-bit lane of a 512-bit vector.
type Panel<const V: usize> = panel::Panel<V, 16>;

/// The sums of each group's values, taken as i8.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn group_sums<const V: usize>(p: &Panel<V>) -> __m512i {
    let ones = _mm512_set1_epi8(1);
    let mut s = _mm512_setzero_si512();
    for q in &p.q {
        s = _mm512_dpbusd_epi32(s, ones, load(q));
    }
    s
}

/// A kind's activations packed for `vpdpbusd`.
pub trait Acts<const V: usize>: PackWeights<V> {
    /// One activation row, quantized as gemv does, into panels (`out.len()` of them).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI.
    unsafe fn pack_acts_vnni(x: &[f32], out: &mut [Panel<V>]);
}

impl Acts<8> for panel::Q4K {
    unsafe fn pack_acts_vnni(x: &[f32], out: &mut [Panel<8>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_k32(x, out) }
    }
}

impl Acts<8> for panel::Q5K {
    unsafe fn pack_acts_vnni(x: &[f32], out: &mut [Panel<8>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_k32(x, out) }
    }
}

impl Acts<4> for panel::Q6K {
    unsafe fn pack_acts_vnni(x: &[f32], out: &mut [Panel<4>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_q6k(x, out) }
    }
}

impl Acts<8> for panel::Q8_0 {
    unsafe fn pack_acts_vnni(x: &[f32], out: &mut [Panel<8>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_q8_0::<true>(x, out) }
    }
}

impl Acts<8> for panel::Q4_0 {
    unsafe fn pack_acts_vnni(x: &[f32], out: &mut [Panel<8>]) {
        // SAFETY: the caller guarantees the features.
        unsafe { pack_acts_q8_0::<false>(x, out) }
    }
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

/// [`quantize_q8k`] on a row, bit for bit, sub-block sums included: the interleaved kernels'
/// activations (the reference, a scalar loop, took 2.5 % of a 512-token prefill).
#[target_feature(enable = "avx512f,avx512bw")]
pub fn quantize_q8k_row(x: &[f32]) -> Vec<BlockQ8K> {
    let block = |x: &[f32]| {
        let mut q = [0u8; QK_K];
        let d = quantize_q8k_block(x, &mut q);
        let qs = q.map(|q| q as i8);
        let mut bsums = [0i16; QK_K / 16];
        for (s, qs) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| i16::from(q)).sum();
        }
        BlockQ8K { d, qs, bsums }
    };
    x.chunks_exact(QK_K).map(block).collect()
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
            _mm512_cvtepi32_ps(group_sums(p)),
        );
        store(&mut p.extra, _mm512_castps_si512(sums));
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
        let offset = _mm512_sub_epi32(
            _mm512_setzero_si512(),
            _mm512_slli_epi32::<5>(group_sums(p)),
        );
        store(&mut p.extra, offset);
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
            let offset = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_slli_epi32::<3>(group_sums(p)),
            );
            store(&mut p.extra, offset);
        }
    }
}

/// Weight rows per tile: 48 rows of a 3072-column Q4_K matrix take 180 KiB as panels, in L2.
/// Weight and activation rows per microkernel call: 12 pairs keep 12 integer and 12 float
/// accumulators in registers, and each vector loaded serves 3 or 4 `vpdpbusd`. `RA` rows of a
/// K-chunk of activations stay in L1 (48 KiB) while the tile's weight rows stream past them.
const BLOCKING: Blocking = Blocking {
    tile_rows: 48,
    call_w: 3,
    call_a: 4,
    chunk_bytes: 24 * 1024,
};
const _: () = assert!(
    BLOCKING.call_w == 3 && BLOCKING.call_a == 4,
    "gemm's dispatch covers 3x4 calls and smaller"
);

/// `out[i * rows + r] = dot(row r of w, row i of x)` for the `n` rows of `x` (`cols` values
/// each); `w` has `bpr` blocks per row.
///
/// # Safety
/// The CPU must have AVX2 and AVX-512 F, BW, VL and VNNI (the avx512vnni level).
pub unsafe fn gemm<K: Acts<V>, const V: usize>(
    w: &[K::Block],
    bpr: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &SharedOut,
) {
    let pack_weights = |w: &[K::Block], p: &mut [Panel<V>]| {
        // SAFETY: the caller guarantees the features.
        unsafe { K::pack_weights_x86(w, p) }
    };
    let pack_acts = |x: &[f32], p: &mut [Panel<V>]| {
        // SAFETY: the caller guarantees the features.
        unsafe { K::pack_acts_vnni(x, p) }
    };
    let dots = panel_dots_by_shape!(
        panel_dots::<K, V>,
        Panel<V>,
        (3, 4),
        (3, 3),
        (3, 2),
        (3, 1),
        (2, 4),
        (2, 3),
        (2, 2),
        (2, 1),
        (1, 4),
        (1, 3),
        (1, 2),
        (1, 1),
    );
    panel::gemm::<K, V, 16>(
        w,
        bpr,
        x,
        cols,
        n,
        out,
        BLOCKING,
        pack_weights,
        pack_acts,
        dots,
    );
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
                wq[r] = load(&wp[r].q[v]);
            }
            for i in 0..RA {
                let aq = load(&ap[i].q[v]);
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
