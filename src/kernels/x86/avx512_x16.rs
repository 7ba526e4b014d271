//! AVX-512 VNNI kernel for interleaved Q4_K ([`BlockQ4Kx16`]): 16 weight rows against one to
//! [`GROUP`] activation rows, each i32 lane of a vector a weight row's own sum.
//!
//! Per block, the work on the weights (splitting nibbles, the 16 rows' scales as floats, their
//! mins as i16 pairs) is done once for every activation row; per activation row it is 64
//! `vpdpbusd` (each four of its values, broadcast, against four values of all 16 rows), one
//! multiply-add per sub-block for the scales, four `vpdpwssd` for the mins. High nibbles are
//! kept in place (16 times their value, at most 240 x 127 x 32 in a sub-block's sum) and the
//! 1/16 goes into their sub-block's scale, which is exact. A lane's arithmetic depends only on
//! its own rows, so a row's result is the same bit for bit whatever rows share its pass.

use std::arch::x86_64::*;

use super::avx2::{load128, load256};
use super::avx512::load512;
use crate::kernels::blocks::BlockQ8K;
use crate::kernels::interleaved::{BlockQ4Kx16, ROWS};
use crate::kernels::tiling::{tiles_par, SharedOut, GROUP, TILE_ROWS};

/// Activation rows taken through a tile's weight groups at a time: 32 rows of Phi-3-mini's
/// widest input (8192 values) are 290 KiB of Q8_K blocks, which stay in L2 beside the tile.
const ACT_ROWS: usize = 32;

const _: () = assert!(TILE_ROWS.is_multiple_of(ROWS) && ACT_ROWS.is_multiple_of(GROUP));

/// `out[i * rows + r] = dot(weight row r, activation row i)` for the `n` rows of `y` (`bpr`
/// blocks each), tile by tile in parallel; `w` is the whole matrix's groups.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and VNNI.
pub unsafe fn gemm(w: &[BlockQ4Kx16], bpr: usize, y: &[BlockQ8K], n: usize, out: &SharedOut) {
    assert_eq!(y.len(), n * bpr);
    let ys: Vec<&[BlockQ8K]> = y.chunks(bpr).collect();
    tiles_par(
        out,
        TILE_ROWS,
        || (),
        |(), tile| {
            for (a, acts) in ys.chunks(ACT_ROWS).enumerate() {
                for first in tile.rows().step_by(ROWS) {
                    let group = &w[first / ROWS * bpr..][..bpr];
                    for (c, chunk) in acts.chunks(GROUP).enumerate() {
                        let mut res = [[0f32; ROWS]; GROUP];
                        let res = &mut res[..chunk.len()];
                        // SAFETY: the caller guarantees the features.
                        unsafe { dot_q4k_x16(group, chunk, res) };
                        for (p, values) in res.iter().enumerate() {
                            for (r, &v) in values.iter().enumerate() {
                                tile.set(a * ACT_ROWS + c * GROUP + p, first + r, v);
                            }
                        }
                    }
                }
            }
        },
    );
}

/// `out[p][r] = dot(row r of the group w, ys[p])`, for the `R` rows of `ys` (1 to [`GROUP`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q4k_x16(w: &[BlockQ4Kx16], ys: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    assert!(ys.len() == out.len() && ys.iter().all(|y| y.len() == w.len()));
    match ys.len() {
        1 => group::<1>(w, ys, out),
        2 => group::<2>(w, ys, out),
        3 => group::<3>(w, ys, out),
        4 => group::<4>(w, ys, out),
        r => panic!("{r} activation rows: 1 to {GROUP} expected"),
    }
}

/// Four activation values from `qs[at..]`, in every i32 lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn broadcast4(qs: &[i8; 256], at: usize) -> __m512i {
    assert!(at + 4 <= qs.len());
    // SAFETY: the 4 bytes from `at` lie within `qs` (asserted; the check folds away for the
    // constant offsets the kernel uses).
    _mm512_set1_epi32(unsafe { qs.as_ptr().add(at).cast::<i32>().read_unaligned() })
}

/// The 16 rows' scales of a sub-block, times `d`, as floats.
#[inline]
#[target_feature(enable = "avx512f")]
fn scales(s: &[u8; ROWS], d: __m512) -> __m512 {
    _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load128(s, 0))))
}

/// The i16 pair of 32-value sub-block sums `(2i, 2i + 1)` of `a`, as one i32.
#[inline]
fn sum_pair(a: &BlockQ8K, i: usize) -> i32 {
    let b = &a.bsums;
    let lo = b[4 * i].wrapping_add(b[4 * i + 1]) as u16 as u32;
    let hi = b[4 * i + 2].wrapping_add(b[4 * i + 3]) as u16 as u32;
    (lo | (hi << 16)) as i32
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn group<const R: usize>(w: &[BlockQ4Kx16], ys: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    let ys: [&[BlockQ8K]; R] = std::array::from_fn(|p| ys[p]);
    let low = _mm512_set1_epi8(0x0F);
    let high = _mm512_set1_epi8(0xF0u8 as i8);
    let mut acc = [_mm512_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        let d = _mm512_cvtph_ps(load256(&b.d, 0));
        let d_high = _mm512_mul_ps(d, _mm512_set1_ps(1.0 / 16.0));
        let mut block = [_mm512_setzero_ps(); R];
        for pair in 0..4 {
            let mut sum_low = [_mm512_setzero_si512(); R];
            let mut sum_high = [_mm512_setzero_si512(); R];
            for g in 0..8 {
                let q = load512(&b.qs[8 * pair + g], 0);
                let (ql, qh) = (_mm512_and_si512(q, low), _mm512_and_si512(q, high));
                for p in 0..R {
                    let a = &ys[p][k].qs;
                    let at = 64 * pair + 4 * g;
                    sum_low[p] = _mm512_dpbusd_epi32(sum_low[p], ql, broadcast4(a, at));
                    sum_high[p] = _mm512_dpbusd_epi32(sum_high[p], qh, broadcast4(a, at + 32));
                }
            }
            let s_low = scales(&b.scales[2 * pair], d);
            let s_high = scales(&b.scales[2 * pair + 1], d_high);
            for p in 0..R {
                block[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_low[p]), s_low, block[p]);
                block[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_high[p]), s_high, block[p]);
            }
        }
        let mut mins = [_mm512_setzero_si512(); 4];
        for (m, pairs) in mins.iter_mut().zip(&b.mins) {
            *m = _mm512_cvtepu8_epi16(load256(pairs, 0));
        }
        let dmin = _mm512_cvtph_ps(load256(&b.dmin, 0));
        for p in 0..R {
            let a = &ys[p][k];
            let mut m = _mm512_setzero_si512();
            for (i, mins) in mins.iter().enumerate() {
                m = _mm512_dpwssd_epi32(m, *mins, _mm512_set1_epi32(sum_pair(a, i)));
            }
            let x = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), dmin, block[p]);
            acc[p] = _mm512_fmadd_ps(_mm512_set1_ps(a.d), x, acc[p]);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` is 16 floats, the 64 bytes written.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
    }
}
