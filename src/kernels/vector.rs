//! Kernels of decode attention over one run of cached rows (f16 values, or Q8_0 blocks): the
//! scores of a query against each key row, and the weighted sum of the value rows. The query,
//! scores and sums are f32. Chosen per call from [`super::level`] (a relaxed atomic load once
//! initialised). Also the softmax of both decode and prefill attention, in plain Rust the
//! compiler vectorizes.
//!
//! Both work on a whole run rather than a row at a time, so that a row costs no call, no
//! horizontal sum of its own (four keys' sums are reduced together) and no reload of the output
//! (a weighted sum keeps 32 output values in registers across every row of the run).

use half::f16;

use super::blocks::{BlockQ8_0, QK8_0};
#[cfg(target_arch = "x86_64")]
use super::{level, CpuLevel};

/// `scores[k] = sum_i keys[k * d + i] * q[i]` for the `scores.len()` rows of `d = q.len()`
/// values in `keys`.
pub fn scores_f16(keys: &[f16], q: &[f32], scores: &mut [f32]) {
    assert_eq!(keys.len(), scores.len() * q.len());
    #[cfg(target_arch = "x86_64")]
    if level() >= CpuLevel::Avx2 {
        // SAFETY: the level is at most the hardware's, which has AVX2, FMA and F16C.
        return unsafe { avx2::scores_f16(keys, q, scores) };
    }
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(q.len())) {
        *s = k.iter().zip(q).map(|(k, q)| k.to_f32() * q).sum();
    }
}

/// `out[i] += sum_k weights[k] * values[k * d + i]` for the `weights.len()` rows of
/// `d = out.len()` values in `values`.
pub fn weighted_sum_f16(weights: &[f32], values: &[f16], out: &mut [f32]) {
    assert_eq!(values.len(), weights.len() * out.len());
    #[cfg(target_arch = "x86_64")]
    if level() >= CpuLevel::Avx2 {
        // SAFETY: as in `scores_f16`.
        return unsafe { avx2::weighted_sum_f16(weights, values, out) };
    }
    for (&w, v) in weights.iter().zip(values.chunks_exact(out.len())) {
        for (o, v) in out.iter_mut().zip(v) {
            *o += w * v.to_f32();
        }
    }
}

/// Asks for `items`' bytes to be brought into cache: the next run of rows while this one is
/// worked on. Runs lie in different blocks, each start on a new page, where the hardware
/// prefetchers stop.
pub fn prefetch<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: every x86_64 CPU has SSE.
    unsafe {
        super::x86::prefetch_slice(items)
    };
}

/// [`scores_f16`] over rows of Q8_0 blocks (`q.len() / 32` a row): each block's products
/// summed, then times its `d`.
pub fn scores_q8_0(keys: &[BlockQ8_0], q: &[f32], scores: &mut [f32]) {
    assert!(q.len().is_multiple_of(QK8_0));
    assert_eq!(keys.len() * QK8_0, scores.len() * q.len());
    #[cfg(target_arch = "x86_64")]
    if level() >= CpuLevel::Avx2 {
        // SAFETY: as in `scores_f16`.
        return unsafe { avx2::scores_q8_0(keys, q, scores) };
    }
    let row = q.len() / QK8_0;
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(row)) {
        *s = k
            .iter()
            .zip(q.chunks_exact(QK8_0))
            .map(|(b, q)| {
                let sum: f32 = b.qs.iter().zip(q).map(|(&v, &q)| v as f32 * q).sum();
                b.d.to_f32() * sum
            })
            .sum();
    }
}

/// [`weighted_sum_f16`] over rows of Q8_0 blocks (`out.len() / 32` a row).
pub fn weighted_sum_q8_0(weights: &[f32], values: &[BlockQ8_0], out: &mut [f32]) {
    assert!(out.len().is_multiple_of(QK8_0));
    assert_eq!(values.len() * QK8_0, weights.len() * out.len());
    #[cfg(target_arch = "x86_64")]
    if level() >= CpuLevel::Avx2 {
        // SAFETY: as in `scores_f16`.
        return unsafe { avx2::weighted_sum_q8_0(weights, values, out) };
    }
    let row = out.len() / QK8_0;
    for (&w, v) in weights.iter().zip(values.chunks_exact(row)) {
        for (b, out) in v.iter().zip(out.chunks_exact_mut(QK8_0)) {
            let s = w * b.d.to_f32();
            for (o, &v) in out.iter_mut().zip(&b.qs) {
                *o += s * v as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use crate::kernels::blocks::{BlockQ8_0, QK8_0};
    use crate::kernels::x86::avx2::hsum_ps;

    /// Keys whose sums are reduced together.
    const KEYS: usize = 4;

    /// 8 floats from `p[at..]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load(p: &[f32], at: usize) -> __m256 {
        assert!(at + 8 <= p.len());
        // SAFETY: 8 floats from `at` lie within `p` (asserted).
        unsafe { _mm256_loadu_ps(p.as_ptr().add(at)) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn store(p: &mut [f32], at: usize, v: __m256) {
        assert!(at + 8 <= p.len());
        // SAFETY: as in `load`.
        unsafe { _mm256_storeu_ps(p.as_mut_ptr().add(at), v) }
    }

    /// 8 halves from `p[at..]` as floats.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn load_f16(p: &[f16], at: usize) -> __m256 {
        assert!(at + 8 <= p.len());
        // SAFETY: 8 halves (16 bytes) from `at` lie within `p` (asserted).
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.as_ptr().add(at).cast()) })
    }

    /// Values `8g..8g + 8` of a Q8_0 block as floats.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load_q8(b: &BlockQ8_0, g: usize) -> __m256 {
        assert!(g < QK8_0 / 8);
        // SAFETY: the 8 bytes from 8g lie within the block's 32 (asserted).
        let q = unsafe { _mm_loadl_epi64(b.qs.as_ptr().add(8 * g).cast()) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    }

    /// The sums of each of four vectors' lanes, in order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sums4(a: [__m256; KEYS]) -> __m128 {
        let s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    }

    /// `dot(row k, q)` into `scores[k]` for every row, four rows at a time: `dot8(row, c)` is
    /// the products of a row's values `c..c + 8` with `q`'s, `tail(row)` the sum of the values
    /// past the last whole 8.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scores_by_four<R: Copy>(
        rows: impl Fn(usize) -> R,
        n: usize,
        d8: usize,
        scores: &mut [f32],
        dot8: impl Fn(R, usize, __m256) -> __m256,
        tail: impl Fn(R) -> f32,
    ) {
        let mut k = 0;
        while k + KEYS <= n {
            let mut acc = [_mm256_setzero_ps(); KEYS];
            for c in (0..d8).step_by(8) {
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = dot8(rows(k + i), c, *acc);
                }
            }
            let mut four = [0f32; KEYS];
            // SAFETY: `four` holds the 4 floats written.
            unsafe { _mm_storeu_ps(four.as_mut_ptr(), sums4(acc)) };
            for (i, s) in four.iter().enumerate() {
                scores[k + i] = s + tail(rows(k + i));
            }
            k += KEYS;
        }
        for (k, score) in scores.iter_mut().enumerate().skip(k) {
            let mut acc = _mm256_setzero_ps();
            for c in (0..d8).step_by(8) {
                acc = dot8(rows(k), c, acc);
            }
            *score = hsum_ps(acc) + tail(rows(k));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scores_f16(keys: &[f16], q: &[f32], scores: &mut [f32]) {
        let d = q.len();
        let d8 = d / 8 * 8;
        scores_by_four(
            |k| &keys[k * d..(k + 1) * d],
            scores.len(),
            d8,
            scores,
            |row, c, acc| _mm256_fmadd_ps(load_f16(row, c), load(q, c), acc),
            |row| {
                row[d8..]
                    .iter()
                    .zip(&q[d8..])
                    .map(|(k, q)| k.to_f32() * q)
                    .sum()
            },
        );
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scores_q8_0(keys: &[BlockQ8_0], q: &[f32], scores: &mut [f32]) {
        let blocks = q.len() / QK8_0;
        // Each "8 values" step of `scores_by_four` takes a whole block here (c counts blocks
        // times 8), its products scaled by the block's `d`.
        scores_by_four(
            |k| &keys[k * blocks..(k + 1) * blocks],
            scores.len(),
            blocks * 8,
            scores,
            |row, c, acc| {
                let b = &row[c / 8];
                let q = &q[c / 8 * QK8_0..][..QK8_0];
                let mut sum = _mm256_mul_ps(load_q8(b, 0), load(q, 0));
                for g in 1..QK8_0 / 8 {
                    sum = _mm256_fmadd_ps(load_q8(b, g), load(q, 8 * g), sum);
                }
                _mm256_fmadd_ps(_mm256_set1_ps(b.d.to_f32()), sum, acc)
            },
            |_| 0.0,
        );
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn weighted_sum_f16(weights: &[f32], values: &[f16], out: &mut [f32]) {
        let d = out.len();
        let mut c = 0;
        // 32 outputs at a time, held in registers over every row.
        while c + 32 <= d {
            let mut acc: [__m256; 4] = std::array::from_fn(|j| load(out, c + 8 * j));
            for (k, &w) in weights.iter().enumerate() {
                let w = _mm256_set1_ps(w);
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(w, load_f16(values, k * d + c + 8 * j), *acc);
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                store(out, c + 8 * j, *acc);
            }
            c += 32;
        }
        while c + 8 <= d {
            let mut acc = load(out, c);
            for (k, &w) in weights.iter().enumerate() {
                acc = _mm256_fmadd_ps(_mm256_set1_ps(w), load_f16(values, k * d + c), acc);
            }
            store(out, c, acc);
            c += 8;
        }
        for (i, o) in out.iter_mut().enumerate().skip(c) {
            for (k, &w) in weights.iter().enumerate() {
                *o += w * values[k * d + i].to_f32();
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weighted_sum_q8_0(weights: &[f32], values: &[BlockQ8_0], out: &mut [f32]) {
        let blocks = out.len() / QK8_0;
        // A block's 32 outputs at a time, held in registers over every row.
        for b in 0..blocks {
            let mut acc: [__m256; 4] = std::array::from_fn(|j| load(out, b * QK8_0 + 8 * j));
            for (k, &w) in weights.iter().enumerate() {
                let block = &values[k * blocks + b];
                let s = _mm256_set1_ps(w * block.d.to_f32());
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(s, load_q8(block, j), *acc);
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                store(out, b * QK8_0 + 8 * j, *acc);
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

    /// Every row count around the four-key groups, and row lengths with and without a tail
    /// past the last whole 8 (f16) or several blocks (Q8_0), against plain loops.
    #[test]
    fn runs_match_plain_loops() {
        let value = |i: usize| (i as f32 * 0.37).sin() * (1.0 + (i % 50) as f32 / 25.0);
        for rows in [0, 1, 3, 4, 5, 9, 64] {
            for d in [8, 20, 32, 96, 128] {
                let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.11).cos()).collect();
                let weights: Vec<f32> = (0..rows).map(|k| 1.0 / (1.0 + k as f32)).collect();
                let values: Vec<f32> = (0..rows * d).map(value).collect();
                let f16s: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                let mut q8 = None;
                if d % QK8_0 == 0 {
                    q8 = Some(super::super::blocks::quantize_q8_0(&values));
                }
                let stored: Vec<f32> = match &q8 {
                    Some(blocks) => (0..values.len())
                        .map(|i| {
                            let b = &blocks[i / QK8_0];
                            b.d.to_f32() * b.qs[i % QK8_0] as f32
                        })
                        .collect(),
                    None => f16s.iter().map(|v| v.to_f32()).collect(),
                };
                let want_scores: Vec<f32> = stored
                    .chunks_exact(d.max(1))
                    .map(|row| row.iter().zip(&q).map(|(a, b)| a * b).sum())
                    .collect();
                let mut want_sum: Vec<f32> = q.clone();
                for (k, row) in stored.chunks_exact(d.max(1)).enumerate() {
                    for (o, v) in want_sum.iter_mut().zip(row) {
                        *o += weights[k] * v;
                    }
                }
                let mut scores = vec![f32::NAN; rows];
                let mut sum = q.clone();
                match &q8 {
                    Some(blocks) => {
                        scores_q8_0(blocks, &q, &mut scores);
                        weighted_sum_q8_0(&weights, blocks, &mut sum);
                    }
                    None => {
                        scores_f16(&f16s, &q, &mut scores);
                        weighted_sum_f16(&weights, &f16s, &mut sum);
                    }
                }
                let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
                for (k, (g, w)) in scores.iter().zip(&want_scores).enumerate() {
                    assert!(
                        close(*g, *w),
                        "scores, {rows} rows of {d}, row {k}: {g} {w}"
                    );
                }
                for (i, (g, w)) in sum.iter().zip(&want_sum).enumerate() {
                    assert!(close(*g, *w), "sum, {rows} rows of {d}, value {i}: {g} {w}");
                }
            }
        }
    }
}
