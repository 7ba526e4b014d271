//! Single-vector kernels over the f16 KV cache, for decode attention: the scores are dot
//! products of the query with each cached key, the output a weighted sum of the cached values.
//! Chosen per call from [`super::level`] (a relaxed atomic load once initialised).

use half::f16;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
