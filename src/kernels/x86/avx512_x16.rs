//! AVX-512 VNNI kernels for interleaved K-quants ([`BlockQ4Kx16`], [`BlockQ6Kx16`]): 16 weight
//! rows against one to [`X16_GROUP`] activation rows, each i32 lane of a vector a weight row's
//! own sum.
//!
//! Per block, the work on the weights (unpacking values, the 16 rows' scales as floats, their
//! mins or scales as i16 pairs) is done once for every activation row; per activation row it is
//! 64 `vpdpbusd` (each four of its values, broadcast, against four values of all 16 rows), one
//! multiply-add per sub-block for the scales, and `vpdpwssd` with the activations' sub-block
//! sums for Q4_K's mins and Q6_K's offset of 32. Q4_K's high nibbles are kept in place (16
//! times their value, at most 240 x 127 x 32 in a sub-block's sum) and the 1/16 goes into their
//! sub-block's scale, which is exact. A lane's arithmetic depends only on its own rows, so a
//! row's result is the same bit for bit whatever rows share its pass.

use std::arch::x86_64::*;

use super::avx2::{load128, load256};
use super::avx512::load512;
use super::{prefetch_bytes, rows};
use crate::kernels::blocks::BlockQ8K;
use crate::kernels::interleaved::{BlockQ4Kx16, BlockQ6Kx16, ROWS};
use crate::kernels::tiling::{tiles_par, SharedOut, TILE_ROWS};

/// How far ahead of the quant bytes in hand the weights are asked for, a cache line with each
/// line loaded: the hardware prefetchers stop at 4 KiB pages. Against the row-wise kernels, ns
/// per block, from memory (Zen 4, 2 threads), interleaved / row-wise at 1 row and at 4: none
/// 0.84-0.91 and 0.69-0.83, 2048 bytes 0.97-1.03 and 0.60-0.65, 4096 0.75-0.78 and 0.60-0.67,
/// 8192 0.82-0.83 and 0.63-0.65; the next block's 37 lines at once, 1.2-1.6 and 1.1-1.2.
const PREFETCH: usize = 4096;

/// Activation rows taken through a tile's weight groups at a time: 32 rows of Phi-3-mini's
/// widest input (8192 values) are 290 KiB of Q8_K blocks, which stay in L2 beside the tile.
const ACT_ROWS: usize = 32;

/// Activation rows per call of a group kernel: each unpacks a block's weights once for all its
/// rows. Q6_K's unpacking (about 300 vector operations a block) made 4 rows cost 1.43-1.57 ns
/// per weight block and row, 8 rows 1.18-1.34 (Q4_K: the same at 4 and 8); so Q6_K takes its
/// own kernel at every row count, where it took the stored layout's panels from 32 rows
/// (1.46-1.91 ns at 64 rows fed from interleaved rows, against 1.18-1.24 now).
const X16_GROUP: usize = 8;

const _: () = assert!(TILE_ROWS.is_multiple_of(ROWS) && ACT_ROWS.is_multiple_of(X16_GROUP));

/// A kernel for one group of 16 interleaved rows: `out[p][r] = dot(row r, ys[p])`.
pub type GroupDot<B> = unsafe fn(&[B], &[&[BlockQ8K]], &mut [[f32; ROWS]]);

/// `out[i * rows + r] = dot(weight row r, activation row i)` for the `n` rows of `y` (`bpr`
/// blocks each), tile by tile in parallel; `w` is the whole matrix's groups.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and VNNI.
pub unsafe fn gemm<B: Sync>(
    w: &[B],
    bpr: usize,
    y: &[BlockQ8K],
    n: usize,
    out: &SharedOut,
    dot: GroupDot<B>,
) {
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
                    for (c, chunk) in acts.chunks(X16_GROUP).enumerate() {
                        let mut res = [[0f32; ROWS]; X16_GROUP];
                        let res = &mut res[..chunk.len()];
                        // SAFETY: the caller guarantees the features.
                        unsafe { dot(group, chunk, res) };
                        for (p, values) in res.iter().enumerate() {
                            tile.set_run(a * ACT_ROWS + c * X16_GROUP + p, first, values);
                        }
                    }
                }
            }
        },
    );
}

/// `out[p][r] = dot(row r of the group w, ys[p])`, for the rows of `ys` (1 to [`X16_GROUP`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q4k_x16(w: &[BlockQ4Kx16], ys: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    by_rows!(up_to_8 q4k, w, ys, out)
}

/// As [`dot_q4k_x16`], for Q6_K.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q6k_x16(w: &[BlockQ6Kx16], ys: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    by_rows!(up_to_8 q6k, w, ys, out)
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
fn q4k<const R: usize>(w: &[BlockQ4Kx16], ys: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    let ys = rows::<_, _, R>(ys, out, w.len());
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
                let chunk = &b.qs[8 * pair + g];
                prefetch_bytes(chunk.as_ptr().cast::<i8>().wrapping_add(PREFETCH), 64);
                let q = load512(chunk, 0);
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
            acc[p] = finish_block(&mins, &ys[p][k], sum_pair, dmin, block[p], acc[p]);
        }
    }
    store(&acc, out);
}

/// `acc + a.d * (block - factor * sum_i pairs[i] . pair(a, i))`: a block's correction (Q4_K's
/// mins, Q6_K's offset) by the activations' sub-block sums, then the activations' scale.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn finish_block(
    pairs: &[__m512i],
    a: &BlockQ8K,
    pair: fn(&BlockQ8K, usize) -> i32,
    factor: __m512,
    block: __m512,
    acc: __m512,
) -> __m512 {
    let mut sum = _mm512_setzero_si512();
    for (i, p) in pairs.iter().enumerate() {
        sum = _mm512_dpwssd_epi32(sum, *p, _mm512_set1_epi32(pair(a, i)));
    }
    let x = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(sum), factor, block);
    _mm512_fmadd_ps(_mm512_set1_ps(a.d), x, acc)
}

/// Each activation row's 16 sums into its `out` row.
#[inline]
#[target_feature(enable = "avx512f")]
fn store(acc: &[__m512], out: &mut [[f32; ROWS]]) {
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: `o` is 16 floats, the 64 bytes written.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *a) };
    }
}

/// The i16 pair of 16-value sub-block sums `(2i, 2i + 1)` of `a`, as one i32.
#[inline]
fn bsum_pair(a: &BlockQ8K, i: usize) -> i32 {
    (a.bsums[2 * i] as u16 as u32 | ((a.bsums[2 * i + 1] as u16 as u32) << 16)) as i32
}

/// Q6_K: per half of 128 values and chunk of four positions l, the bytes `ql[l..]`,
/// `ql[32 + l..]` and `qh[l..]` of the 16 rows make the values at l, 32 + l, 64 + l and 96 + l
/// (0 to 63, stored plus 32). Each sub-block of 16 takes four chunks; the 32 comes off as 32
/// times the scaled sum of the activations' sub-block sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6k<const R: usize>(w: &[BlockQ6Kx16], ys: &[&[BlockQ8K]], out: &mut [[f32; ROWS]]) {
    let ys = rows::<_, _, R>(ys, out, w.len());
    let m4 = _mm512_set1_epi8(0x0F);
    let m2 = _mm512_set1_epi8(0x03);
    let m2_high = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        let d = _mm512_cvtph_ps(load256(&b.d, 0));
        let mut block = [_mm512_setzero_ps(); R];
        for half in 0..2 {
            for sub in 0..2 {
                // Values l and 64 + l come from `ql[l..]`, 32 + l and 96 + l from
                // `ql[32 + l..]`: one source at a time, so that 2 sums a row are live, not 4.
                for source in 0..2 {
                    let mut sums = [[_mm512_setzero_si512(); R]; 2];
                    for q in 0..4 {
                        let l = 16 * sub + 4 * q;
                        let step = &b.quants[8 * half + l / 4];
                        if source == 0 {
                            for line in step {
                                prefetch_bytes(
                                    line.as_ptr().cast::<i8>().wrapping_add(PREFETCH),
                                    64,
                                );
                            }
                        }
                        let (low, h) = (load512(&step[source], 0), load512(&step[2], 0));
                        let h = if source == 0 {
                            h
                        } else {
                            _mm512_srli_epi16::<2>(h)
                        };
                        let values = [
                            _mm512_or_si512(
                                _mm512_and_si512(low, m4),
                                _mm512_slli_epi16::<4>(_mm512_and_si512(h, m2)),
                            ),
                            _mm512_or_si512(
                                _mm512_and_si512(_mm512_srli_epi16::<4>(low), m4),
                                _mm512_and_si512(h, m2_high),
                            ),
                        ];
                        for (i, v) in values.iter().enumerate() {
                            let at = 128 * half + 32 * (source + 2 * i) + l;
                            for p in 0..R {
                                sums[i][p] = _mm512_dpbusd_epi32(
                                    sums[i][p],
                                    *v,
                                    broadcast4(&ys[p][k].qs, at),
                                );
                            }
                        }
                    }
                    for (i, sums) in sums.iter().enumerate() {
                        let j = source + 2 * i;
                        let scale = scales_i8(&b.scales[8 * half + 2 * j + sub], d);
                        for p in 0..R {
                            block[p] =
                                _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[p]), scale, block[p]);
                        }
                    }
                }
            }
        }
        let mut pairs = [_mm512_setzero_si512(); 8];
        for (i, pair) in pairs.iter_mut().enumerate() {
            let (even, odd) = (
                load128(&b.scales[2 * i], 0),
                load128(&b.scales[2 * i + 1], 0),
            );
            let bytes =
                _mm256_set_m128i(_mm_unpackhi_epi8(even, odd), _mm_unpacklo_epi8(even, odd));
            *pair = _mm512_cvtepi8_epi16(bytes);
        }
        let d32 = _mm512_mul_ps(d, _mm512_set1_ps(32.0));
        for p in 0..R {
            acc[p] = finish_block(&pairs, &ys[p][k], bsum_pair, d32, block[p], acc[p]);
        }
    }
    store(&acc, out);
}

/// The 16 rows' signed scales of a sub-block, times `d`, as floats.
#[inline]
#[target_feature(enable = "avx512f")]
fn scales_i8(s: &[i8; ROWS], d: __m512) -> __m512 {
    _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(s, 0))))
}
