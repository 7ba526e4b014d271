//! AVX2 + FMA kernels for [`Kernels::gemm`](crate::kernels::Kernels::gemm): gemv's AVX2 kernels (`avx2.rs`) with
//! the weight block unpacked once and used for up to [`GROUP`](crate::kernels::tiling::GROUP) activation rows. Each row's integer
//! and float operations are exactly gemv's, in the same order, so every output is bit for bit
//! gemv's.
//!
//! `fn(w, ys, out)`: `out[i] = dot(w, ys[i])` for 1 to [`GROUP`](crate::kernels::tiling::GROUP) activation rows.

use std::arch::x86_64::*;

use half::f16;

use super::avx2::{
    hsum_ps, hsum_ps128, k4_block_dot, load256, q4_0_values, q4k_values, q5k_values, q6k_offset,
};
use super::rows;
use crate::kernels::blocks::*;

#[target_feature(enable = "avx2,fma")]
pub fn dot_q4k_rows(w: &[BlockQ4K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q4k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn q4k<const R: usize>(w: &[BlockQ4K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    k4::<_, R>(w, ys, out, |b| {
        (q4k_values(b), (b.d, b.dmin), unpack_scales_k4(&b.scales))
    })
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q5k_rows(w: &[BlockQ5K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q5k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn q5k<const R: usize>(w: &[BlockQ5K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    k4::<_, R>(w, ys, out, |b| {
        (q5k_values(b), (b.d, b.dmin), unpack_scales_k4(&b.scales))
    })
}

/// Q4_K/Q5_K for `R` activation rows: `unpack` gives a block's values, `(d, dmin)` and
/// `(scales, mins)`, once for all rows.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::type_complexity)]
fn k4<B, const R: usize>(
    w: &[B],
    ys: &[&[BlockQ8K]],
    out: &mut [f32],
    unpack: impl Fn(&B) -> ([__m256i; 8], (f16, f16), ([u8; 8], [u8; 8])),
) {
    let ys = rows::<_, _, R>(ys, out, w.len());
    let mut acc = [(_mm256_setzero_ps(), _mm_setzero_ps()); R];
    for (k, b) in w.iter().enumerate() {
        let (q, d, scales) = unpack(b);
        for (y, acc) in ys.iter().zip(&mut acc) {
            k4_block_dot(&q, d, &scales, &y[k], acc);
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = hsum_ps(acc.0) + hsum_ps128(acc.1);
    }
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q6k_rows(w: &[BlockQ6K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q6k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn q6k<const R: usize>(w: &[BlockQ6K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let ys = rows::<_, _, R>(ys, out, w.len());
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        // As gemv's dot_q6k: values 128n + 32k'.. for k' = 0..4, and their scale pairs.
        let mut q = [_mm256_setzero_si256(); 8];
        let mut scale = [_mm256_setzero_si256(); 8];
        for n in 0..2 {
            let ql1 = load256(&b.ql, 64 * n);
            let ql2 = load256(&b.ql, 64 * n + 32);
            let qh = load256(&b.qh, 32 * n);
            let h = |s: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(s, m2));
            q[4 * n] = _mm256_or_si256(_mm256_and_si256(ql1, m4), h(qh));
            q[4 * n + 1] =
                _mm256_or_si256(_mm256_and_si256(ql2, m4), h(_mm256_srli_epi16::<2>(qh)));
            q[4 * n + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                h(_mm256_srli_epi16::<4>(qh)),
            );
            q[4 * n + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql2), m4),
                h(_mm256_srli_epi16::<6>(qh)),
            );
            for kk in 0..4 {
                let s = 8 * n + 2 * kk;
                scale[4 * n + kk] = _mm256_set_m128i(
                    _mm_set1_epi16(b.scales[s + 1] as i16),
                    _mm_set1_epi16(b.scales[s] as i16),
                );
            }
        }
        for (i, y) in ys.iter().enumerate() {
            let a = &y[k];
            let d = a.d * b.d.to_f32();
            let mut sumi = _mm256_setzero_si256();
            for (c, (&q, &scale)) in q.iter().zip(&scale).enumerate() {
                let p = _mm256_maddubs_epi16(q, load256(&a.qs, 32 * c));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale, p));
            }
            sumi = _mm256_sub_epi32(sumi, q6k_offset(b, a));
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[i]);
        }
    }
    for i in 0..R {
        out[i] = hsum_ps(acc[i]);
    }
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q8_0_rows(w: &[BlockQ8_0], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
    by_rows!(q8_0, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn q8_0<const R: usize>(w: &[BlockQ8_0], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
    let ys = rows::<_, _, R>(ys, out, w.len());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        let qx = load256(&b.qs, 0);
        let ax = _mm256_sign_epi8(qx, qx);
        for (i, y) in ys.iter().enumerate() {
            let a = &y[k];
            let p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(load256(&a.qs, 0), qx));
            let s = _mm256_madd_epi16(p, ones);
            let d = b.d.to_f32() * a.d.to_f32();
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc[i]);
        }
    }
    for i in 0..R {
        out[i] = hsum_ps(acc[i]);
    }
}

#[target_feature(enable = "avx2,fma")]
pub fn dot_q4_0_rows(w: &[BlockQ4_0], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
    by_rows!(q4_0, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn q4_0<const R: usize>(w: &[BlockQ4_0], ys: &[&[BlockQ8_0]], out: &mut [f32]) {
    let ys = rows::<_, _, R>(ys, out, w.len());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        let qx = q4_0_values(b);
        let ax = _mm256_sign_epi8(qx, qx);
        for (i, y) in ys.iter().enumerate() {
            let a = &y[k];
            let p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(load256(&a.qs, 0), qx));
            let s = _mm256_madd_epi16(p, ones);
            let d = b.d.to_f32() * a.d.to_f32();
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc[i]);
        }
    }
    for i in 0..R {
        out[i] = hsum_ps(acc[i]);
    }
}
