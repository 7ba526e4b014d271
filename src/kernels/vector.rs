//! Single-vector kernels for attention: over the KV cache (f16, or Q8_0 blocks) for decode (the
//! scores are dot products of the query with each cached key, the output a weighted sum of the
//! cached values; the query and the sums stay f32),
//! chosen per call from [`super::level`] (a relaxed atomic load once initialised); and the
//! softmax of both decode and prefill attention, in plain Rust the compiler vectorizes.

use half::f16;

use super::blocks::{BlockQ8_0, QK8_0};
use super::reference;
#[cfg(target_arch = "x86_64")]
use super::{level, CpuLevel};

/// `sum_i w[i] * x[i]` over the shorter of the two.
#[inline]
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level() >= CpuLevel::Avx2 {
        // SAFETY: the level is at most the hardware's, which has AVX2, FMA and F16C (and SSE,
        // as every x86_64 does). Cached keys lie back to back: fetch those a few rows on.
        return unsafe {
            super::x86::prefetch_slice_ahead(w);
            super::x86::avx2::dot_f16(w, x)
        };
    }
    reference::dot_f16(w, x)
}

/// `out[i] += a * v[i]` over the shorter of the two.
#[inline]
pub fn axpy_f16(a: f32, v: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level() >= CpuLevel::Avx2 {
        // SAFETY: as in `dot_f16`.
        return unsafe {
            super::x86::prefetch_slice_ahead(v);
            axpy_f16_avx2(a, v, out)
        };
    }
    for (o, x) in out.iter_mut().zip(v) {
        *o += a * x.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn axpy_f16_avx2(a: f32, v: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = v.len().min(out.len());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within both slices.
        unsafe {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i).cast()));
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(av, x, _mm256_loadu_ps(o)));
        }
        i += 8;
    }
    for k in i..n {
        out[k] += a * v[k].to_f32();
    }
}

/// `sum_i k[i] * x[i]` over the values of the Q8_0 blocks `k` (`x` holds as many): each
/// block's products summed in f32, then times its `d`.
#[inline]
pub fn dot_q8_0_f32(k: &[BlockQ8_0], x: &[f32]) -> f32 {
    assert_eq!(k.len() * QK8_0, x.len());
    #[cfg(target_arch = "x86_64")]
    if level() >= CpuLevel::Avx2 {
        // SAFETY: as in `dot_f16`.
        return unsafe {
            super::x86::prefetch_slice_ahead(k);
            dot_q8_0_f32_avx2(k, x)
        };
    }
    k.iter()
        .zip(x.chunks_exact(QK8_0))
        .map(|(b, x)| {
            let sum: f32 = b.qs.iter().zip(x).map(|(&q, &x)| q as f32 * x).sum();
            b.d.to_f32() * sum
        })
        .sum()
}

/// `out[i] += a * v[i]` over the values of the Q8_0 blocks `v` (`out` holds as many).
#[inline]
pub fn axpy_q8_0(a: f32, v: &[BlockQ8_0], out: &mut [f32]) {
    assert_eq!(v.len() * QK8_0, out.len());
    #[cfg(target_arch = "x86_64")]
    if level() >= CpuLevel::Avx2 {
        // SAFETY: as in `dot_f16`.
        return unsafe {
            super::x86::prefetch_slice_ahead(v);
            axpy_q8_0_avx2(a, v, out)
        };
    }
    for (b, out) in v.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let s = a * b.d.to_f32();
        for (o, &q) in out.iter_mut().zip(&b.qs) {
            *o += s * q as f32;
        }
    }
}

/// Values `8g..8g + 8` of a Q8_0 block as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn q8_0_eight(b: &BlockQ8_0, g: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    assert!(g < QK8_0 / 8);
    // SAFETY: the 8 bytes from 8g lie within the block's 32 (asserted).
    let q = unsafe { _mm_loadl_epi64(b.qs.as_ptr().add(8 * g).cast()) };
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q8_0_f32_avx2(k: &[BlockQ8_0], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for (b, x) in k.iter().zip(x.chunks_exact(QK8_0)) {
        let mut sum = _mm256_setzero_ps();
        for g in 0..QK8_0 / 8 {
            // SAFETY: `x` is a chunk of 32 values; 8 from 8g lie within it.
            let xs = unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * g)) };
            sum = _mm256_fmadd_ps(q8_0_eight(b, g), xs, sum);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(b.d.to_f32()), sum, acc);
    }
    super::x86::avx2::hsum_ps(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn axpy_q8_0_avx2(a: f32, v: &[BlockQ8_0], out: &mut [f32]) {
    use std::arch::x86_64::*;
    for (b, out) in v.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let s = _mm256_set1_ps(a * b.d.to_f32());
        for g in 0..QK8_0 / 8 {
            // SAFETY: `out` is a chunk of 32 values; 8 from 8g lie within it.
            unsafe {
                let o = out.as_mut_ptr().add(8 * g);
                _mm256_storeu_ps(o, _mm256_fmadd_ps(s, q8_0_eight(b, g), _mm256_loadu_ps(o)));
            }
        }
    }
}

/// `scores` times `scale` (positive), then softmax in place: `e^(s - max) / sum`.
pub fn softmax(scores: &mut [f32], scale: f32) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for s in scores.iter_mut() {
        *s = exp_non_positive((*s - max) * scale);
    }
    // 16 partial sums in a fixed order: the compiler may vectorize them without changing the
    // result, where one running sum must stay scalar.
    let mut partial = [0f32; 16];
    let mut chunks = scores.chunks_exact(16);
    for chunk in &mut chunks {
        for (p, &s) in partial.iter_mut().zip(chunk) {
            *p += s;
        }
    }
    let total: f32 = partial.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / total;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// `e^x` for `x <= 0` within 2 ulp (below -87, `e^-87`, about 1.6e-38, at the bottom of f32's
/// normals; NaN stays NaN), branch-free so that a loop of it vectorizes, where `f32::exp` is a libm call
/// per value. Cephes' `expf`: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7 polynomial
/// in `r`, and `2^n` put together from its bits.
#[inline]
fn exp_non_positive(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer (to nearest even) held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let e = p.mul_add(r * r, r + 1.0);
    // n in -126..=0: 2^n is the float of exponent field n + 127.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e * f32::from_bits(((n_bits + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2_ulp_of_libm() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let (got, want) = (exp_non_positive(x), x.exp());
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "e^{x}: {got} against {want}");
            x -= 0.001_7;
        }
        assert_eq!(exp_non_positive(0.0), 1.0);
        assert!(exp_non_positive(-200.0) < 1e-37);
        assert!(exp_non_positive(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_the_order() {
        for n in [1, 5, 16, 17, 100] {
            let mut s: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 3.0).collect();
            let raw = s.clone();
            softmax(&mut s, 0.5);
            let total: f32 = raw.iter().map(|v| ((v - 7.0) * 0.5).exp()).sum();
            for (p, v) in s.iter().zip(&raw) {
                let want = ((v - 7.0) * 0.5).exp() / total;
                assert!(
                    (p - want).abs() <= 1e-6 * want.max(1e-3),
                    "n = {n}: {p} against {want}"
                );
            }
        }
    }

    #[test]
    fn match_the_scalar_loops_on_odd_lengths() {
        for n in [0, 1, 7, 8, 9, 33, 96, 128, 131] {
            let v: Vec<f16> = (0..n)
                .map(|i| f16::from_f32((i as f32 * 0.37).sin()))
                .collect();
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let expected: f32 = v.iter().zip(&x).map(|(a, b)| a.to_f32() * b).sum();
            assert!((dot_f16(&v, &x) - expected).abs() < 1e-4, "dot, n = {n}");

            let mut out = x.clone();
            axpy_f16(0.5, &v, &mut out);
            for (i, o) in out.iter().enumerate() {
                let expected = x[i] + 0.5 * v[i].to_f32();
                assert!((o - expected).abs() < 1e-6, "axpy, n = {n}, i = {i}");
            }
        }
    }

    #[test]
    fn q8_0_rows_match_the_scalar_loops() {
        for blocks in [1, 3, 4] {
            let values: Vec<f32> = (0..blocks * QK8_0)
                .map(|i| (i as f32 * 0.37).sin() * (1.0 + i as f32 / 50.0))
                .collect();
            let v = super::super::blocks::quantize_q8_0(&values);
            let x: Vec<f32> = (0..blocks * QK8_0)
                .map(|i| (i as f32 * 0.11).cos())
                .collect();
            let value = |i: usize| v[i / QK8_0].d.to_f32() * v[i / QK8_0].qs[i % QK8_0] as f32;
            let expected: f32 = (0..x.len()).map(|i| value(i) * x[i]).sum();
            let got = dot_q8_0_f32(&v, &x);
            assert!(
                (got - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                "dot, {blocks}"
            );

            let mut out = x.clone();
            axpy_q8_0(0.5, &v, &mut out);
            for (i, o) in out.iter().enumerate() {
                let expected = x[i] + 0.5 * value(i);
                assert!(
                    (o - expected).abs() < 1e-6,
                    "axpy, {blocks} blocks, i = {i}"
                );
            }
        }
    }
}
