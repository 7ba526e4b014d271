//! AVX-512 VNNI kernels for a few activation rows (decoding streams batched together): gemv's
//! AVX-512 kernels (`avx512.rs`) with each weight block unpacked once and used for up to
//! [`GROUP`] activation rows, so that the weights are read from memory once per pass. Each row's
//! integer and float operations are exactly gemv's, in the same order, so every output is bit
//! for bit gemv's. The types without such a kernel run gemv's once per row (the weight row is in
//! cache after the first).
//!
//! `fn(w, ys, out)`: `out[i] = dot(w, ys[i])` for 1 to [`GROUP`] activation rows.

use std::arch::x86_64::*;

use super::avx2::{hsum_ps, hsum_ps128, load256, mins_dot_bsums, q6k_offset};
use super::avx512::{self, idx, k4_scaled_sum, load512, nibbles, K4_IDX, Q6_IDX};
use super::prefetch_ahead;
use crate::kernels::blocks::*;
use crate::kernels::gemm::GROUP;

/// Calls `$kernel::<R>` for `R = $ys.len()` (1 to 4).
macro_rules! by_rows {
    ($kernel:ident, $w:expr, $ys:expr, $out:expr) => {
        match $ys.len() {
            1 => $kernel::<1>($w, $ys, $out),
            2 => $kernel::<2>($w, $ys, $out),
            3 => $kernel::<3>($w, $ys, $out),
            4 => $kernel::<4>($w, $ys, $out),
            r => panic!("{r} activation rows: 1 to 4 expected"),
        }
    };
}
const _: () = assert!(GROUP == 4, "by_rows! covers 1 to 4 rows");

/// The first `R` rows of `ys`, and `out` checked to have room for them.
#[inline]
fn rows<'a, Y, const R: usize>(ys: &[&'a [Y]], out: &[f32], blocks: usize) -> [&'a [Y]; R] {
    assert!(ys.len() == R && out.len() == R);
    std::array::from_fn(|i| {
        assert_eq!(ys[i].len(), blocks);
        ys[i]
    })
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q4k_rows(w: &[BlockQ4K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q4k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4k<const R: usize>(w: &[BlockQ4K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let ys = rows::<_, R>(ys, out, w.len());
    let index = [idx(&K4_IDX[0]), idx(&K4_IDX[1])];
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        prefetch_ahead(b);
        let (d_w, dmin_w) = (b.d.to_f32(), b.dmin.to_f32());
        let (sc, mn) = unpack_scales_k4(&b.scales);
        let sc =
            _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi64x(0, i64::from_le_bytes(sc))));
        let values: [__m512i; 4] = std::array::from_fn(|j| nibbles(load256(&b.qs, 32 * j)));
        for r in 0..R {
            let a = &ys[r][k];
            let d = a.d * d_w;
            let dmin = -a.d * dmin_w;
            let prod = mins_dot_bsums(&mn, a);
            acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r]);
            let sumi = k4_scaled_sum(sc, a, &index, |j| values[j]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_ps(acc[r]) + hsum_ps128(acc_m[r]);
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q6k_rows(w: &[BlockQ6K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q6k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6k<const R: usize>(w: &[BlockQ6K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let ys = rows::<_, R>(ys, out, w.len());
    let index = [idx(&Q6_IDX[0]), idx(&Q6_IDX[1])];
    let m4 = _mm512_set1_epi8(0x0F);
    let m3 = _mm512_set1_epi8(3);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm256_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        prefetch_ahead(b);
        let d_w = b.d.to_f32();
        let scales =
            _mm512_castsi256_si512(_mm256_cvtepi8_epi16(super::avx2::load128(&b.scales, 0)));
        // The values of each half (gemv's va, vb), unpacked once for every row.
        let values: [[__m512i; 2]; 2] = std::array::from_fn(|n| {
            let ql = load512(&b.ql, 64 * n);
            let qh = load256(&b.qh, 32 * n);
            let hh =
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
            let h = |s: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(s, m3));
            let va = _mm512_or_si512(_mm512_and_si512(ql, m4), h(hh));
            let vb = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                h(_mm512_srli_epi16::<4>(hh)),
            );
            [va, vb]
        });
        for r in 0..R {
            let a = &ys[r][k];
            let d = a.d * d_w;
            let mut sumi = _mm512_setzero_si512();
            for (n, index) in index.iter().enumerate() {
                let dp0 = _mm512_dpbusd_epi32(zero, values[n][0], load512(&a.qs, 128 * n));
                let dp1 = _mm512_dpbusd_epi32(zero, values[n][1], load512(&a.qs, 128 * n + 64));
                let packed = _mm512_packs_epi32(dp0, dp1);
                let sc = _mm512_permutexvar_epi16(*index, scales);
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(packed, sc));
            }
            let sumi = _mm256_add_epi32(
                _mm512_castsi512_si256(sumi),
                _mm512_extracti64x4_epi64::<1>(sumi),
            );
            let sumi = _mm256_sub_epi32(sumi, q6k_offset(b, a));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_ps(acc[r]);
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q5k_rows(w: &[BlockQ5K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q5k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q5k<const R: usize>(w: &[BlockQ5K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let ys = rows::<_, R>(ys, out, w.len());
    let index = [idx(&K4_IDX[0]), idx(&K4_IDX[1])];
    let m1 = _mm512_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        prefetch_ahead(b);
        let (d_w, dmin_w) = (b.d.to_f32(), b.dmin.to_f32());
        let (sc, mn) = unpack_scales_k4(&b.scales);
        let sc =
            _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi64x(0, i64::from_le_bytes(sc))));
        // As gemv's: the fifth bits from qh, chunk by chunk.
        let qh = load256(&b.qh, 0);
        let mut hb =
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<1>(qh));
        let values: [__m512i; 4] = std::array::from_fn(|j| {
            let h = _mm512_slli_epi16::<4>(_mm512_and_si512(hb, m1));
            hb = _mm512_srli_epi16::<2>(hb);
            _mm512_or_si512(nibbles(load256(&b.qs, 32 * j)), h)
        });
        for r in 0..R {
            let a = &ys[r][k];
            let d = a.d * d_w;
            let dmin = -a.d * dmin_w;
            let prod = mins_dot_bsums(&mn, a);
            acc_m[r] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[r]);
            let sumi = k4_scaled_sum(sc, a, &index, |j| values[j]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum_ps(acc[r]) + hsum_ps128(acc_m[r]);
    }
}

/// gemv's kernel once per activation row: for the types without a kernel above.
macro_rules! per_row {
    ($name:ident, $block:ty, $act:ty, $dot:ident) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub fn $name(w: &[$block], ys: &[&[$act]], out: &mut [f32]) {
            for (o, y) in out.iter_mut().zip(ys) {
                *o = avx512::$dot(w, y);
            }
        }
    };
}
per_row!(dot_q8_0_rows, BlockQ8_0, BlockQ8_0, dot_q8_0);
per_row!(dot_q4_0_rows, BlockQ4_0, BlockQ8_0, dot_q4_0);
