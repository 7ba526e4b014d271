//! AVX-512 (F/BW/VL) + VNNI kernels. `vpdpbusd` sums four u8 x i8 products into each i32 lane
//! with no i16 intermediate. For the K-quants, 64 values go through one 512-bit `vpdpbusd`;
//! two such results (4 i32 lanes per 16-value group, at most 4 * 63 * 127 = 32004) are packed to
//! i16 and multiplied by their sub-block scales with one `vpmaddwd`: a scale vector per 128
//! values, gathered from the block's scales with `vpermw`. This file unpacks the K-quant blocks
//! and makes those scaled sums; `avx512_rows.rs` runs them for one to four activation rows.

use std::arch::x86_64::*;

use half::f16;

use super::avx2::{hsum_ps, load128, load256};
use super::prefetch_ahead;
use crate::kernels::blocks::*;

#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn load512<T>(p: &[T], at: usize) -> __m512i {
    assert!((at + 64 / size_of::<T>()) <= p.len());
    // SAFETY: 64 bytes from `at` lie within `p` (asserted).
    unsafe { _mm512_loadu_si512(p.as_ptr().add(at).cast()) }
}

/// `vpermw` indices that lay sub-block scales (i16) over `packs(dp0, dp1)`: i16 lane t sits in
/// 128-bit lane t / 8, and its first 4 come from dp0, its last 4 from dp1. `sub(k, second)` is
/// the sub-block of 128-bit lane k of dp0 (`second` false) or dp1.
const fn pack_index(sub: [[i16; 2]; 4]) -> [i16; 32] {
    let mut idx = [0i16; 32];
    let mut t = 0;
    while t < 32 {
        idx[t] = sub[t / 8][((t % 8) >= 4) as usize];
        t += 1;
    }
    idx
}

/// Q4_K/Q5_K, 128 values `128p..`: dp0 holds chunk j = 2p (sub-blocks 4p in 128-bit lanes 0-1,
/// 4p+1 in lanes 2-3), dp1 chunk 2p+1 (4p+2, 4p+3).
const K4_IDX: [[i16; 32]; 2] = [
    pack_index([[0, 2], [0, 2], [1, 3], [1, 3]]),
    pack_index([[4, 6], [4, 6], [5, 7], [5, 7]]),
];

/// Q6_K, 128 values `128n..`: 128-bit lane k of dp0 is sub-block 8n+k, of dp1 8n+4+k.
const Q6_IDX: [[i16; 32]; 2] = [
    pack_index([[0, 4], [1, 5], [2, 6], [3, 7]]),
    pack_index([[8, 12], [9, 13], [10, 14], [11, 15]]),
];

#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn idx(i: &[i16; 32]) -> __m512i {
    load512(i, 0)
}

/// 256 u8 x i8 products of a K-quant block with activation block `a`, weighted by sub-block
/// scales, as 16 i32 lanes (their sum is the block's scaled sum). `values[j]` holds the 64
/// unsigned values pairing with activations `64j..64j+64`; `scales[p]` the scales of values
/// `128p..` laid over the lanes as [`pack_index`] describes.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) fn scaled_sum(values: &[__m512i; 4], scales: &[__m512i; 2], a: &BlockQ8K) -> __m512i {
    let zero = _mm512_setzero_si512();
    let mut sumi = _mm512_setzero_si512();
    for (p, scales) in scales.iter().enumerate() {
        let dp0 = _mm512_dpbusd_epi32(zero, values[2 * p], load512(&a.qs, 128 * p));
        let dp1 = _mm512_dpbusd_epi32(zero, values[2 * p + 1], load512(&a.qs, 128 * p + 64));
        let packed = _mm512_packs_epi32(dp0, dp1);
        // `vpmaddwd` and the add in one (no saturation: the same sum).
        sumi = _mm512_dpwssd_epi32(sumi, packed, *scales);
    }
    sumi
}

/// The i16 pairs `(v[2g], v[2g + 1])` of the eight i16 from `v[2 * FIRST]` on, for g = 0..4,
/// each repeated over the four i32 lanes of 128-bit lane g: the layout in which `avx512_rows`
/// keeps the activation rows' sub-block sums.
#[inline]
#[target_feature(enable = "avx512f")]
fn pairs_by_lane<const FIRST: i32>(v: __m512i) -> __m512i {
    let f = FIRST;
    #[rustfmt::skip]
    let index = _mm512_set_epi32(
        f + 3, f + 3, f + 3, f + 3, f + 2, f + 2, f + 2, f + 2,
        f + 1, f + 1, f + 1, f + 1, f, f, f, f,
    );
    _mm512_permutexvar_epi32(index, v)
}

/// Nibbles of 32 bytes: low ones in the lower 256 bits, high ones in the upper.
#[inline]
#[target_feature(enable = "avx2,avx512f")]
fn nibbles(q: __m256i) -> __m512i {
    let m4 = _mm256_set1_epi8(0x0F);
    let lo = _mm256_and_si256(q, m4);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// A Q4_K or Q5_K block unpacked for [`scaled_sum`]: its 256 unsigned values, 64 a vector
/// (vector j pairs with activations `64j..64j+64`), its sub-block scales laid over the lanes,
/// its mins as [`pairs_by_lane`] lays them, and its `d` and `dmin`.
pub(super) struct K4Block {
    pub values: [__m512i; 4],
    pub scales: [__m512i; 2],
    pub mins: __m512i,
    pub d: f32,
    pub dmin: f32,
}

#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw")]
fn k4_block(d: f16, dmin: f16, scales: &[u8; 12], values: [__m512i; 4]) -> K4Block {
    let (sc, mins) = unpack_scales_k4(scales);
    let widen = |b: [u8; 8]| {
        _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi64x(0, i64::from_le_bytes(b))))
    };
    let sc = widen(sc);
    K4Block {
        values,
        scales: K4_IDX.map(|i| _mm512_permutexvar_epi16(idx(&i), sc)),
        mins: pairs_by_lane::<0>(widen(mins)),
        d: d.to_f32(),
        dmin: dmin.to_f32(),
    }
}

#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw")]
pub(super) fn q4k_block(b: &BlockQ4K) -> K4Block {
    let values = std::array::from_fn(|j| nibbles(load256(&b.qs, 32 * j)));
    k4_block(b.d, b.dmin, &b.scales, values)
}

#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw")]
pub(super) fn q5k_block(b: &BlockQ5K) -> K4Block {
    let m1 = _mm512_set1_epi8(1);
    // Lower half: bit 2j of qh (high bits of the low nibbles of chunk j); upper half: bit
    // 2j+1. Each chunk shifts both by 2; 16-bit shifts only bring bits into the top.
    let qh = load256(&b.qh, 0);
    let mut hb = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<1>(qh));
    let values = std::array::from_fn(|j| {
        let h = _mm512_slli_epi16::<4>(_mm512_and_si512(hb, m1));
        hb = _mm512_srli_epi16::<2>(hb);
        _mm512_or_si512(nibbles(load256(&b.qs, 32 * j)), h)
    });
    k4_block(b.d, b.dmin, &b.scales, values)
}

/// A Q6_K block unpacked for [`scaled_sum`]: its 256 values (`ql[64n..]`'s low nibbles are
/// values l and l+32 of half n, its high ones l+64 and l+96), its sub-block scales laid over the
/// lanes, the same scales as [`pairs_by_lane`] lays them (sub-blocks 0-7, then 8-15), and `d`.
pub(super) struct Q6Block {
    pub values: [__m512i; 4],
    pub scales: [__m512i; 2],
    pub scale_pairs: [__m512i; 2],
    pub d: f32,
}

#[inline]
#[target_feature(enable = "avx2,f16c,avx512f,avx512bw")]
pub(super) fn q6k_block(b: &BlockQ6K) -> Q6Block {
    let m4 = _mm512_set1_epi8(0x0F);
    let m3 = _mm512_set1_epi8(3);
    let halves: [[__m512i; 2]; 2] = std::array::from_fn(|n| {
        let ql = load512(&b.ql, 64 * n);
        let qh = load256(&b.qh, 32 * n);
        let hh = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
        let h = |s: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(s, m3));
        let va = _mm512_or_si512(_mm512_and_si512(ql, m4), h(hh));
        let vb = _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
            h(_mm512_srli_epi16::<4>(hh)),
        );
        [va, vb]
    });
    let sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(load128(&b.scales, 0)));
    Q6Block {
        values: [halves[0][0], halves[0][1], halves[1][0], halves[1][1]],
        scales: Q6_IDX.map(|i| _mm512_permutexvar_epi16(idx(&i), sc)),
        scale_pairs: [pairs_by_lane::<0>(sc), pairs_by_lane::<4>(sc)],
        d: b.d.to_f32(),
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q8_0(w: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let zero = _mm256_setzero_si256();
    let mut acc = _mm256_setzero_ps();
    for (b, a) in w.iter().zip(y) {
        prefetch_ahead(b);
        let qx = load256(&b.qs, 0);
        let qy = load256(&a.qs, 0);
        // |qx| as u8 (128 for -128) times qy with qx's sign.
        let s = _mm256_dpbusd_epi32(zero, _mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
        let d = b.d.to_f32() * a.d.to_f32();
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q4_0(w: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let zero = _mm256_setzero_si256();
    let ones = _mm256_set1_epi8(1);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    for (b, a) in w.iter().zip(y) {
        prefetch_ahead(b);
        let raw = load128(&b.qs, 0);
        let qx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw), m4);
        let qy = load256(&a.qs, 0);
        // sum (qx - 8) * qy = sum qx * qy - 8 * sum qy.
        let p = _mm256_dpbusd_epi32(zero, qx, qy);
        let sy = _mm256_dpbusd_epi32(zero, ones, qy);
        let s = _mm256_sub_epi32(p, _mm256_slli_epi32::<3>(sy));
        let d = b.d.to_f32() * a.d.to_f32();
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let at = i + 16 * k;
            // SAFETY: at + 16 <= n <= both lengths.
            let (wv, xv) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(at).cast())),
                    _mm512_loadu_ps(x.as_ptr().add(at)),
                )
            };
            *acc = _mm512_fmadd_ps(wv, xv, *acc);
        }
        i += 32;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    for k in i..n {
        sum += w[k].to_f32() * x[k];
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let at = i + 16 * k;
            // SAFETY: at + 16 <= n <= both lengths.
            let (wv, xv) = unsafe {
                (
                    _mm512_loadu_ps(w.as_ptr().add(at)),
                    _mm512_loadu_ps(x.as_ptr().add(at)),
                )
            };
            *acc = _mm512_fmadd_ps(wv, xv, *acc);
        }
        i += 32;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    for k in i..n {
        sum += w[k] * x[k];
    }
    sum
}
