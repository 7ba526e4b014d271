//! Quantized matrix-matrix products (prompt prefill) on GGUF blocks: for `n` activation rows at
//! once, `out[i * rows + r] = dot(row r of W, row i of x)`.
//!
//! The activation rows are quantized once, in parallel, as [`gemv`](super::gemv) quantizes its
//! one row. Then each rayon task takes a tile of weight rows and sweeps every activation row past
//! it a few at a time, so that the tile's weights stay in cache while the activations stream,
//! and each weight block is unpacked once for several activation rows:
//!
//! - AVX-512 VNNI and AVX2, quantized types: the tile and the activations are repacked into
//!   panels on which one `vpdpbusd` (AVX2: `vpmaddubsw` then `vpmaddwd`) works on 16 (AVX2: 8)
//!   scale groups at once, and a microkernel takes 3 weight rows by 4 activation rows (AVX2: 1
//!   by 6) (`panel`, `x86::avx512_gemm`, `x86::avx2_gemm`).
//! - The same, fewer than [`packed_min_rows`] rows (decoding streams): the kernels gemv runs for
//!   one row, taking up to [`GROUP`] activation rows per weight block (`x86::avx512_rows`,
//!   `x86::avx2_rows`), bit for bit gemv's row by row.
//! - Scalar, and F16/F32 at every level: gemv's dot per (weight row, activation row) pair.
//!
//! Results equal gemv's row by row up to float summation order; where the kernels are gemv's own
//! (scalar, AVX2, F16/F32) they are bit for bit the same.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::blocks::*;
use super::tiling::{tiles_par, SharedOut, GROUP, TILE_ROWS};
use super::{check_kernel, check_weights, gemv_at, level, reference, CpuLevel};
use crate::error::{Error, Result};

#[cfg(target_arch = "x86_64")]
use super::panel;
#[cfg(target_arch = "x86_64")]
use super::x86;
#[cfg(target_arch = "x86_64")]
use super::x86::avx512_rows::Q8KRows;

/// The fewest activation rows worth repacking the weights of `dtype` into panels for, at
/// `level`: below this, the kernels with each weight block unpacked once for every row
/// (`x86::avx512_rows`, `x86::avx2_rows`) are faster.
///
/// AVX-512, measured on 16384 x 3072 matrices streamed from memory, 2 threads (Xeon), ns per
/// weight block, rows kernels against the panel kernel: Q4_K 8 rows 16.2 against 22.9, 12 rows
/// 24.9 against 26.0, 16 rows 33.4 against 29.3; Q6_K 8 rows 19.4 against 23.9, 12 rows 27.6
/// against 27.1, 16 rows 36.0 against 30.9.
///
/// AVX2, measured on Phi-3-mini's 4 matrices streamed from memory, 2 threads (Zen 3), ms for
/// the qkv matrix (9216 x 3072), rows kernels against the panel kernel with its weights packed
/// by `x86::pack`: Q4_K 4 rows 2.3 against 3.9, 6 rows 4.9 against 2.4; Q5_K 6 rows 4.9 against
/// 3.0; Q4_0 4 rows 4.1 against 3.5; Q8_0 12 rows 11.9 against 15.5, 16 rows 15.9 against 11.8.
/// Q6_K (packed by the scalar code), ms for ffn_down (3072 x 8192): 12 rows 5.0-6.7 against
/// 6.9-7.3, 16 rows 9.1 against 7.8-8.2.
pub(super) fn packed_min_rows(level: CpuLevel, dtype: GgmlDType) -> usize {
    match (level, dtype) {
        (CpuLevel::Avx2, GgmlDType::Q4_0) => 4,
        (CpuLevel::Avx2, GgmlDType::Q4K | GgmlDType::Q5K) => 6,
        (CpuLevel::Avx2, GgmlDType::Q6K | GgmlDType::Q8_0) => 16,
        _ => 12,
    }
}

/// `out[i * rows + r] = dot(row r of W, row i of x)` for `i in 0..n`, `r in 0..rows`, at
/// [`level`].
///
/// `weights`: as for [`gemv`](super::gemv); `x`: `n` rows of `cols` values; `out`: `n` rows of
/// `rows` values.
pub fn gemm(
    dtype: GgmlDType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    gemm_at(level(), dtype, weights, rows, cols, x, n, out)
}

/// [`gemm`] at an explicit level; errors if this CPU lacks it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_at(
    level: CpuLevel,
    dtype: GgmlDType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    check_kernel(level, dtype)?;
    let too_big = || "more than usize::MAX".to_string();
    let x_len = n.checked_mul(cols);
    if x_len != Some(x.len()) {
        return Err(Error::invalid_argument(format!(
            "x: length {} but {n} rows of {cols} columns take {}",
            x.len(),
            x_len.map_or_else(too_big, |l| l.to_string())
        )));
    }
    let out_len = n.checked_mul(rows);
    if out_len != Some(out.len()) {
        return Err(Error::invalid_argument(format!(
            "out: length {} but {n} rows of {rows} outputs take {}",
            out.len(),
            out_len.map_or_else(too_big, |l| l.to_string())
        )));
    }
    check_weights(dtype, weights, rows, cols)?;
    let bpr = cols / dtype.block_size();
    if rows == 0 || n == 0 {
        return Ok(());
    }
    if cols == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // One activation row is gemv's job.
    if n == 1 {
        return gemv_at(level, dtype, weights, rows, cols, x, out);
    }

    let out = SharedOut::new(out, rows, n);
    // AVX-512, a few rows: the K-quants' kernels take each group of rows prepared once; the
    // other types', the rows as they are.
    #[cfg(target_arch = "x86_64")]
    macro_rules! few_rows {
        ($w:expr, $y:expr, $rows_dot:ident, none) => {
            // SAFETY: `level <= hardware_level()` (checked above), so the CPU has AVX-512
            // F/BW/VL/VNNI.
            groups_par($w, bpr, $y, n, &out, |w, ys, o| unsafe {
                x86::avx512_rows::$rows_dot(w, ys, o)
            })
        };
        ($w:expr, $y:expr, $rows_dot:ident, $prepare:ident) => {
            // SAFETY: as above.
            prepared_groups_par($w, bpr, $y, n, &out, Q8KRows::$prepare, |w, y, o| unsafe {
                x86::avx512_rows::$rows_dot(w, y, o)
            })
        };
    }
    // Each arm: the weights as blocks, then the level's kernels. The quantized types at the lower
    // levels take their activations quantized once, as gemv does.
    macro_rules! quantized {
        ($block:ty, $quantize:ident, $dot:ident, $rows_dot:ident, $prepare:tt, $kind:ident, $v:literal) => {{
            let w = cast_slice::<$block>(weights, "weights")?;
            match level {
                // A few rows (decoding streams): the kernels of `avx512_rows`, which gemv runs
                // for one row, with each weight block unpacked once for every activation row,
                // the weights read from memory once. Repacking the weights for the panel kernel
                // costs about as much as 3 gemv calls.
                #[cfg(target_arch = "x86_64")]
                CpuLevel::Avx512Vnni if n < packed_min_rows(level, dtype) => {
                    let y = quantize_rows(x, cols, $quantize);
                    few_rows!(w, &y, $rows_dot, $prepare)
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                CpuLevel::Avx512Vnni => unsafe {
                    x86::avx512_gemm::gemm::<panel::$kind, $v>(w, bpr, x, cols, n, &out)
                },
                #[cfg(target_arch = "x86_64")]
                CpuLevel::Avx2 if n < packed_min_rows(level, dtype) => {
                    let y = quantize_rows(x, cols, $quantize);
                    // SAFETY: as above, the CPU has AVX2 and FMA.
                    groups_par(w, bpr, &y, n, &out, |w, ys, o| unsafe {
                        x86::avx2_rows::$rows_dot(w, ys, o)
                    })
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                CpuLevel::Avx2 => unsafe {
                    x86::avx2_gemm::gemm::<panel::$kind, $v>(w, bpr, x, cols, n, &out)
                },
                _ => {
                    let y = quantize_rows(x, cols, $quantize);
                    groups_par(w, bpr, &y, n, &out, pairwise(reference::$dot))
                }
            }
        }};
    }
    macro_rules! plain {
        ($elem:ty, $dot:ident) => {{
            let w = cast_slice::<$elem>(weights, "weights")?;
            match level {
                #[cfg(target_arch = "x86_64")]
                CpuLevel::Avx512Vnni => groups_par(
                    w,
                    cols,
                    x,
                    n,
                    &out,
                    // SAFETY: `level <= hardware_level()` (checked above), so the CPU has every
                    // feature the kernel is compiled for.
                    pairwise(|w, x| unsafe { x86::avx512::$dot(w, x) }),
                ),
                #[cfg(target_arch = "x86_64")]
                CpuLevel::Avx2 => groups_par(
                    w,
                    cols,
                    x,
                    n,
                    &out,
                    // SAFETY: as above.
                    pairwise(|w, x| unsafe { x86::avx2::$dot(w, x) }),
                ),
                _ => groups_par(w, cols, x, n, &out, pairwise(reference::$dot)),
            }
        }};
    }
    match dtype {
        GgmlDType::Q4K => {
            quantized!(
                BlockQ4K,
                quantize_q8k,
                dot_q4k,
                dot_q4k_rows,
                for_k4,
                Q4K,
                8
            )
        }
        GgmlDType::Q5K => {
            quantized!(
                BlockQ5K,
                quantize_q8k,
                dot_q5k,
                dot_q5k_rows,
                for_k4,
                Q5K,
                8
            )
        }
        GgmlDType::Q6K => {
            quantized!(
                BlockQ6K,
                quantize_q8k,
                dot_q6k,
                dot_q6k_rows,
                for_q6k,
                Q6K,
                4
            )
        }
        GgmlDType::Q8_0 => {
            quantized!(
                BlockQ8_0,
                quantize_q8_0,
                dot_q8_0,
                dot_q8_0_rows,
                none,
                Q8_0,
                8
            )
        }
        GgmlDType::Q4_0 => {
            quantized!(
                BlockQ4_0,
                quantize_q8_0,
                dot_q4_0,
                dot_q4_0_rows,
                none,
                Q4_0,
                8
            )
        }
        GgmlDType::F16 => plain!(f16, dot_f16),
        GgmlDType::F32 => plain!(f32, dot_f32),
        // Refused above; an error rather than a panic should the two lists ever disagree.
        _ => return Err(unsupported(dtype)),
    }
    Ok(())
}

fn unsupported(dtype: GgmlDType) -> Error {
    Error::unsupported(format!("gemm: weight type {dtype:?} is not supported"))
}

/// The `n` rows of `x` (`cols` values each) quantized by `quantize`, back to back.
fn quantize_rows<Y: Send>(x: &[f32], cols: usize, quantize: fn(&[f32]) -> Vec<Y>) -> Vec<Y> {
    x.par_chunks(cols).flat_map_iter(quantize).collect()
}

/// A single-row dot as a group kernel: one call per activation row.
fn pairwise<B, Y>(
    dot: impl Fn(&[B], &[Y]) -> f32 + Sync,
) -> impl Fn(&[B], &[&[Y]], &mut [f32]) + Sync {
    move |w, ys, out| {
        for (o, y) in out.iter_mut().zip(ys) {
            *o = dot(w, y);
        }
    }
}

/// `dot(row r of w, [rows i..i + GROUP of y])` for every weight row and group of activation
/// rows, tile by tile in parallel. `w` has `per_row` elements per row, `y` as many per row (the
/// activations' blocks or values), `n` rows; `dot` fills one output per activation row given.
fn groups_par<B: Sync, Y: Sync>(
    w: &[B],
    per_row: usize,
    y: &[Y],
    n: usize,
    out: &SharedOut,
    dot: impl Fn(&[B], &[&[Y]], &mut [f32]) + Sync,
) {
    prepared_groups_par(w, per_row, y, n, out, <[&[Y]]>::to_vec, |w, ys, o| {
        dot(w, ys, o)
    });
}

/// [`groups_par`] with each group of activation rows made once by `prepare` (for the AVX-512
/// K-quant kernels, [`Q8KRows`](x86::avx512_rows::Q8KRows)), not once per weight row.
fn prepared_groups_par<'y, B: Sync, Y: Sync, G: Sync>(
    w: &[B],
    per_row: usize,
    y: &'y [Y],
    n: usize,
    out: &SharedOut,
    prepare: impl Fn(&[&'y [Y]]) -> G,
    dot: impl Fn(&[B], &G, &mut [f32]) + Sync,
) {
    let groups: Vec<G> = (0..n)
        .step_by(GROUP)
        .map(|i0| {
            let rows: Vec<_> = (i0..n.min(i0 + GROUP))
                .map(|i| &y[i * per_row..(i + 1) * per_row])
                .collect();
            prepare(&rows)
        })
        .collect();
    tiles_par(
        out,
        TILE_ROWS,
        || (),
        |(), tile| {
            let mut res = [0f32; GROUP];
            for (g, group) in groups.iter().enumerate() {
                let i0 = g * GROUP;
                let m = GROUP.min(n - i0);
                for r in tile.rows() {
                    dot(&w[r * per_row..(r + 1) * per_row], group, &mut res[..m]);
                    for (k, &v) in res[..m].iter().enumerate() {
                        tile.set(i0 + k, r, v);
                    }
                }
            }
        },
    );
}
