//! AVX-512 VNNI kernels for a few activation rows (decoding streams batched together): gemv's
//! AVX-512 kernels (`avx512.rs`) with each weight block unpacked once and used for up to
//! [`GROUP`](crate::kernels::gemm::GROUP) activation rows, so that the weights are read from
//! memory once per pass. Each row runs gemv's own block step, so every output is bit for bit
//! gemv's. The types without such a kernel run gemv's once per row (the weight row is in cache
//! after the first).
//!
//! `fn(w, ys, out)`: `out[i] = dot(w, ys[i])` for 1 to `GROUP` activation rows.

use std::arch::x86_64::*;

use super::avx2::{hsum_ps, hsum_ps128};
use super::avx512::{
    self, k4_block_dot, k4_index, q4k_block, q5k_block, q6k_block, q6k_block_dot, q6k_index,
    K4Block,
};
use super::{prefetch_ahead, rows};
use crate::kernels::blocks::*;

/// The Q4_K and Q5_K kernel: `unpack` makes a weight block ready for every row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn k4<B, const R: usize>(
    w: &[B],
    ys: &[&[BlockQ8K]],
    out: &mut [f32],
    unpack: impl Fn(&B) -> K4Block,
) {
    let ys = rows::<_, R>(ys, out, w.len());
    let index = k4_index();
    let mut acc = [(_mm256_setzero_ps(), _mm_setzero_ps()); R];
    for (k, b) in w.iter().enumerate() {
        prefetch_ahead(b);
        let block = unpack(b);
        for (y, acc) in ys.iter().zip(&mut acc) {
            k4_block_dot(&block, &y[k], &index, acc);
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = hsum_ps(acc.0) + hsum_ps128(acc.1);
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q4k_rows(w: &[BlockQ4K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q4k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4k<const R: usize>(w: &[BlockQ4K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    k4::<_, R>(w, ys, out, |b| q4k_block(b))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q5k_rows(w: &[BlockQ5K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q5k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q5k<const R: usize>(w: &[BlockQ5K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    k4::<_, R>(w, ys, out, |b| q5k_block(b))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q6k_rows(w: &[BlockQ6K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    by_rows!(q6k, w, ys, out)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6k<const R: usize>(w: &[BlockQ6K], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let ys = rows::<_, R>(ys, out, w.len());
    let index = q6k_index();
    let mut acc = [_mm256_setzero_ps(); R];
    for (k, b) in w.iter().enumerate() {
        prefetch_ahead(b);
        let block = q6k_block(b);
        for (y, acc) in ys.iter().zip(&mut acc) {
            q6k_block_dot(&block, b, &y[k], &index, acc);
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = hsum_ps(acc);
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
