//! AVX2 + FMA + F16C kernels: ggml's scheme, `maddubs` (u8 x i8 -> i16 pairs) then `madd` with
//! the sub-block scales. No i16 saturation is reachable: activations are within ±127 and the
//! unsigned operand at most 128 (|q8_0|), 63 (Q6_K) or 31 (Q5_K).

use std::arch::x86_64::*;

use half::f16;

use super::prefetch_ahead;
use crate::kernels::blocks::*;

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    hsum_ps128(s)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum_ps128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load256<T>(p: &[T], at: usize) -> __m256i {
    assert!((at + 32 / size_of::<T>()) <= p.len());
    // SAFETY: 32 bytes from `at` lie within `p` (asserted; the check folds away for the constant
    // offsets used here).
    unsafe { _mm256_loadu_si256(p.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load128<T>(p: &[T], at: usize) -> __m128i {
    assert!((at + 16 / size_of::<T>()) <= p.len());
    // SAFETY: as in load256.
    unsafe { _mm_loadu_si128(p.as_ptr().add(at).cast()) }
}

/// `sum_k mins[k] * (sum of the 32 activations of sub-block k)`, as 4 i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn mins_dot_bsums(mins: &[u8; 8], a: &BlockQ8K) -> __m128i {
    let mins = _mm_cvtepu8_epi16(_mm_set_epi64x(0, i64::from_le_bytes(*mins)));
    let bsums = load256(&a.bsums, 0);
    let sums32 = _mm_hadd_epi16(
        _mm256_castsi256_si128(bsums),
        _mm256_extracti128_si256::<1>(bsums),
    );
    _mm_madd_epi16(mins, sums32)
}

/// The 256 unsigned values of a Q4_K block, 32 a vector: vector 2j holds values 64j.. (the low
/// nibbles of `qs[32j..]`), vector 2j+1 values 64j+32.. (the high ones).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q4k_values(b: &BlockQ4K) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut q = [_mm256_setzero_si256(); 8];
    for j in 0..4 {
        let q4 = load256(&b.qs, 32 * j);
        q[2 * j] = _mm256_and_si256(q4, m4);
        q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
    }
    q
}

/// [`q4k_values`] for a Q5_K block, with each value's fifth bit from `qh`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q5k_values(b: &BlockQ5K) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m1 = _mm256_set1_epi8(1);
    // Bit 2j of qh[l] is the high bit of value 64j + l, bit 2j+1 that of 64j + 32 + l.
    // Shifting 16-bit lanes lets bits of the next byte into the top, never into bits 0-1.
    let mut hb = load256(&b.qh, 0);
    let mut q = [_mm256_setzero_si256(); 8];
    for j in 0..4 {
        let q5 = load256(&b.qs, 32 * j);
        let hl = _mm256_slli_epi16::<4>(_mm256_and_si256(hb, m1));
        let hh = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(hb), m1));
        hb = _mm256_srli_epi16::<2>(hb);
        q[2 * j] = _mm256_or_si256(_mm256_and_si256(q5, m4), hl);
        q[2 * j + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q5), m4), hh);
    }
    q
}

/// One Q4_K/Q5_K block, its values `q` (from [`q4k_values`] / [`q5k_values`]) and scales and
/// mins unpacked, against one activation block: adds the scaled sums to `acc.0` and the mins'
/// share to `acc.1` (gemv and gemm both, so that their results agree bit for bit).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn k4_block_dot(
    q: &[__m256i; 8],
    (d, dmin): (f16, f16),
    (sc, mn): &([u8; 8], [u8; 8]),
    a: &BlockQ8K,
    acc: &mut (__m256, __m128),
) {
    let d = a.d * d.to_f32();
    let dmin = -a.d * dmin.to_f32();
    let prod = mins_dot_bsums(mn, a);
    acc.1 = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc.1);
    let mut sumi = _mm256_setzero_si256();
    for j in 0..4 {
        let pl = _mm256_maddubs_epi16(q[2 * j], load256(&a.qs, 64 * j));
        let ph = _mm256_maddubs_epi16(q[2 * j + 1], load256(&a.qs, 64 * j + 32));
        let pl = _mm256_madd_epi16(_mm256_set1_epi16(sc[2 * j] as i16), pl);
        let ph = _mm256_madd_epi16(_mm256_set1_epi16(sc[2 * j + 1] as i16), ph);
        sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
    }
    acc.0 = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc.0);
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q4k(w: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    let mut acc = (_mm256_setzero_ps(), _mm_setzero_ps());
    for (b, a) in w.iter().zip(y) {
        prefetch_ahead(b);
        let scales = unpack_scales_k4(&b.scales);
        k4_block_dot(&q4k_values(b), (b.d, b.dmin), &scales, a, &mut acc);
    }
    hsum_ps(acc.0) + hsum_ps128(acc.1)
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q5k(w: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let mut acc = (_mm256_setzero_ps(), _mm_setzero_ps());
    for (b, a) in w.iter().zip(y) {
        prefetch_ahead(b);
        let scales = unpack_scales_k4(&b.scales);
        k4_block_dot(&q5k_values(b), (b.d, b.dmin), &scales, a, &mut acc);
    }
    hsum_ps(acc.0) + hsum_ps128(acc.1)
}

/// `32 * sum_k scales[k] * bsums[k]`: the Q6_K offset, taken out of the unsigned products.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q6k_offset(b: &BlockQ6K, a: &BlockQ8K) -> __m256i {
    let sc = _mm256_cvtepi8_epi16(load128(&b.scales, 0));
    _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc, load256(&a.bsums, 0)))
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q6k(w: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_ps();
    for (b, a) in w.iter().zip(y) {
        prefetch_ahead(b);
        let d = a.d * b.d.to_f32();
        let mut sumi = _mm256_setzero_si256();
        for n in 0..2 {
            let ql1 = load256(&b.ql, 64 * n);
            let ql2 = load256(&b.ql, 64 * n + 32);
            let qh = load256(&b.qh, 32 * n);
            let h = |s: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(s, m2));
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql1, m4), h(qh)),
                _mm256_or_si256(_mm256_and_si256(ql2, m4), h(_mm256_srli_epi16::<2>(qh))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    h(_mm256_srli_epi16::<4>(qh)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql2), m4),
                    h(_mm256_srli_epi16::<6>(qh)),
                ),
            ];
            for (k, q) in q.into_iter().enumerate() {
                let p = _mm256_maddubs_epi16(q, load256(&a.qs, 128 * n + 32 * k));
                let s = 8 * n + 2 * k;
                let scale = _mm256_set_m128i(
                    _mm_set1_epi16(b.scales[s + 1] as i16),
                    _mm_set1_epi16(b.scales[s] as i16),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale, p));
            }
        }
        sumi = _mm256_sub_epi32(sumi, q6k_offset(b, a));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q8_0(w: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (b, a) in w.iter().zip(y) {
        prefetch_ahead(b);
        let qx = load256(&b.qs, 0);
        let qy = load256(&a.qs, 0);
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
        let s = _mm256_madd_epi16(p, ones);
        let d = b.d.to_f32() * a.d.to_f32();
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum_ps(acc)
}

/// The 32 values of a Q4_0 block as signed bytes in -8..=7.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q4_0_values(b: &BlockQ4_0) -> __m256i {
    let raw = load128(&b.qs, 0);
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw);
    _mm256_sub_epi8(
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F)),
        _mm256_set1_epi8(8),
    )
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q4_0(w: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for (b, a) in w.iter().zip(y) {
        prefetch_ahead(b);
        let qx = q4_0_values(b);
        let qy = load256(&a.qs, 0);
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
        let s = _mm256_madd_epi16(p, ones);
        let d = b.d.to_f32() * a.d.to_f32();
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let at = i + 8 * k;
            // SAFETY: at + 8 <= n <= both lengths.
            let (wv, xv) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(at).cast())),
                    _mm256_loadu_ps(x.as_ptr().add(at)),
                )
            };
            *acc = _mm256_fmadd_ps(wv, xv, *acc);
        }
        i += 16;
    }
    let mut sum = hsum_ps(_mm256_add_ps(acc[0], acc[1]));
    for k in i..n {
        sum += w[k].to_f32() * x[k];
    }
    sum
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let at = i + 8 * k;
            // SAFETY: at + 8 <= n <= both lengths.
            let (wv, xv) = unsafe {
                (
                    _mm256_loadu_ps(w.as_ptr().add(at)),
                    _mm256_loadu_ps(x.as_ptr().add(at)),
                )
            };
            *acc = _mm256_fmadd_ps(wv, xv, *acc);
        }
        i += 16;
    }
    let mut sum = hsum_ps(_mm256_add_ps(acc[0], acc[1]));
    for k in i..n {
        sum += w[k] * x[k];
    }
    sum
}
