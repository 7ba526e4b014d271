//! Quantized matrix-vector products (decode) working directly on GGUF blocks, e.g. in the memory
//! map: `out[r] = dot(row r of W, x)`.
//!
//! As in ggml, the activations `x` are quantized once per call (to Q8_K for Q4_K/Q5_K/Q6_K, to
//! Q8_0 for Q8_0/Q4_0) and the dot products run on integers; F16 and F32 weights take `x` as is.
//! Each type has a scalar reference (`reference.rs`) and x86_64 kernels for AVX2 (+FMA, F16C)
//! and AVX-512 VNNI (F/BW/VL/VNNI), chosen at run time ([`level`]).
//!
//! Rows are split over the current rayon pool in chunks of [`ROWS_PER_TASK`], so the caller's
//! `ThreadPool::install` decides the threads.

pub mod attention;
pub mod blocks;
pub mod cpu_info;
pub mod dequantize;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod panel;
pub mod reference;
mod tiling;
pub mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod gemm_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use blocks::*;
pub use gemm::gemm;

/// Rows per rayon task.
pub const ROWS_PER_TASK: usize = 32;

/// The instruction sets a kernel may use, in increasing order.
///
/// All variants exist on every target so that code naming them compiles everywhere; off x86_64
/// only `Scalar` is ever detected and the others are refused by [`gemv_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuLevel {
    Scalar,
    /// AVX2, FMA and F16C.
    Avx2,
    /// The above plus AVX-512 F, BW, VL and VNNI.
    Avx512Vnni,
}

impl CpuLevel {
    pub const ALL: [CpuLevel; 3] = [CpuLevel::Scalar, CpuLevel::Avx2, CpuLevel::Avx512Vnni];

    /// The name `PHI3_CPU` accepts.
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Scalar => "scalar",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512Vnni => "avx512vnni",
        }
    }

    pub fn parse(s: &str) -> Option<CpuLevel> {
        let s = s.trim().to_ascii_lowercase();
        CpuLevel::ALL.into_iter().find(|l| l.name() == s)
    }
}

impl fmt::Display for CpuLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The best level this CPU supports, ignoring `PHI3_CPU`.
pub fn hardware_level() -> CpuLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if avx2 && avx512 {
            return CpuLevel::Avx512Vnni;
        }
        if avx2 {
            return CpuLevel::Avx2;
        }
    }
    CpuLevel::Scalar
}

/// The level to use given the value of `PHI3_CPU` (if set) and the hardware's level.
///
/// A request above what the hardware has is clamped down to it (asking for AVX-512 on an AVX2
/// machine gets AVX2); an unrecognised value is an error, which [`detect`] answers with the
/// hardware level.
pub fn resolve(requested: Option<&str>, hardware: CpuLevel) -> Result<CpuLevel> {
    match requested.map(str::trim) {
        None | Some("") => Ok(hardware),
        Some(s) => match CpuLevel::parse(s) {
            Some(l) => Ok(l.min(hardware)),
            None => Err(Error::invalid_argument(format!(
                "PHI3_CPU: unknown level {s:?} (expected scalar, avx2 or avx512vnni)"
            ))),
        },
    }
}

/// The level to use: the hardware's, lowered by `PHI3_CPU=scalar|avx2|avx512vnni` if set
/// (never raised above the hardware; an unrecognised value is ignored).
pub fn detect() -> CpuLevel {
    let hw = hardware_level();
    let var = std::env::var("PHI3_CPU").ok();
    resolve(var.as_deref(), hw).unwrap_or(hw)
}

/// [`detect`], once per process.
pub fn level() -> CpuLevel {
    static LEVEL: OnceLock<CpuLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

/// The weight types [`gemv`] takes.
pub const SUPPORTED: [GgmlDType; 7] = [
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::F16,
    GgmlDType::F32,
];

/// `out[r] = dot(row r of W, x)` for `r in 0..rows`, at [`level`].
///
/// `weights`: the raw GGUF bytes of a `(rows, cols)` matrix of `dtype` (ggml dims `[cols, rows]`),
/// aligned to 2 bytes (4 for F32; GGUF data always is). (The model calls [`gemm`], which takes
/// this path for one row.)
#[cfg(test)]
pub fn gemv(
    dtype: GgmlDType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    gemv_at(level(), dtype, weights, rows, cols, x, out)
}

/// [`gemv`] at an explicit level; errors if this CPU lacks it.
pub fn gemv_at(
    level: CpuLevel,
    dtype: GgmlDType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    check_kernel(level, dtype)?;
    if x.len() != cols {
        return Err(Error::invalid_argument(format!(
            "x: length {} but the matrix has {cols} columns",
            x.len()
        )));
    }
    if out.len() != rows {
        return Err(Error::invalid_argument(format!(
            "out: length {} but the matrix has {rows} rows",
            out.len()
        )));
    }
    check_weights(dtype, weights, rows, cols)?;
    let bpr = cols / dtype.block_size();
    if rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        out.fill(0.0);
        return Ok(());
    }

    // Each arm: the weights as blocks, the activations quantized once, then per row the kernel
    // of `level`.
    macro_rules! run {
        ($block:ty, $y:expr, $kernel:ident) => {{
            let w = cast_slice::<$block>(weights, "weights")?;
            let y = $y;
            match level {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `level <= hardware_level()` (checked above), so the CPU has every
                // feature the kernel is compiled for.
                CpuLevel::Avx512Vnni => rows_par(w, bpr, &y[..], out, |w, y| unsafe {
                    x86::avx512::$kernel(w, y)
                }),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                CpuLevel::Avx2 => rows_par(w, bpr, &y[..], out, |w, y| unsafe {
                    x86::avx2::$kernel(w, y)
                }),
                _ => rows_par(w, bpr, &y[..], out, reference::$kernel),
            }
        }};
    }
    // The K-quants: at AVX-512, the kernels batched decode runs on a few rows, for one row, so
    // that a stream's logits do not depend on whether other streams shared its pass.
    macro_rules! k_quant {
        ($block:ty, $kernel:ident, $prepare:ident, $rows_kernel:ident) => {{
            let w = cast_slice::<$block>(weights, "weights")?;
            let y = quantize_q8k(x);
            match level {
                #[cfg(target_arch = "x86_64")]
                CpuLevel::Avx512Vnni => {
                    let y = [x86::avx512_rows::Q8KRows::$prepare(&[&y[..]])];
                    rows_par(w, bpr, &y, out, |w, y| {
                        let mut o = [0f32];
                        // SAFETY: `level <= hardware_level()` (checked above), so the CPU has
                        // every feature the kernel is compiled for.
                        unsafe { x86::avx512_rows::$rows_kernel(w, &y[0], &mut o) };
                        o[0]
                    })
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                CpuLevel::Avx2 => rows_par(w, bpr, &y[..], out, |w, y| unsafe {
                    x86::avx2::$kernel(w, y)
                }),
                _ => rows_par(w, bpr, &y[..], out, reference::$kernel),
            }
        }};
    }
    match dtype {
        GgmlDType::Q4K => k_quant!(BlockQ4K, dot_q4k, for_k4, dot_q4k_rows),
        GgmlDType::Q5K => k_quant!(BlockQ5K, dot_q5k, for_k4, dot_q5k_rows),
        GgmlDType::Q6K => k_quant!(BlockQ6K, dot_q6k, for_q6k, dot_q6k_rows),
        GgmlDType::Q8_0 => run!(BlockQ8_0, quantize_q8_0(x), dot_q8_0),
        GgmlDType::Q4_0 => run!(BlockQ4_0, quantize_q8_0(x), dot_q4_0),
        GgmlDType::F16 => run!(f16, x, dot_f16),
        GgmlDType::F32 => run!(f32, x, dot_f32),
        // Refused above; an error rather than a panic should the two lists ever disagree.
        _ => return Err(unsupported(dtype)),
    }
    Ok(())
}

/// [`gemv_at`]'s and [`gemm_at`]'s first check: this CPU has `level`, and there are kernels for
/// `dtype`.
fn check_kernel(level: CpuLevel, dtype: GgmlDType) -> Result<()> {
    let hw = hardware_level();
    if level > hw {
        return Err(Error::invalid_argument(format!(
            "level: {level} is not available on this CPU (it has {hw})"
        )));
    }
    if !SUPPORTED.contains(&dtype) {
        return Err(unsupported(dtype));
    }
    Ok(())
}

/// [`gemv_at`]'s and [`gemm_at`]'s last check: `weights` holds a `rows` x `cols` matrix of
/// `dtype`.
fn check_weights(dtype: GgmlDType, weights: &[u8], rows: usize, cols: usize) -> Result<()> {
    let block = dtype.block_size();
    if !cols.is_multiple_of(block) {
        return Err(Error::invalid_argument(format!(
            "cols: {cols} is not a multiple of {dtype:?}'s block size {block}"
        )));
    }
    let expected = rows
        .checked_mul(cols / block)
        .and_then(|n| n.checked_mul(dtype.type_size()));
    if expected != Some(weights.len()) {
        return Err(Error::invalid_argument(format!(
            "weights: {} bytes but a {rows}x{cols} {dtype:?} matrix takes {}",
            weights.len(),
            expected.map_or("more than usize::MAX".to_string(), |n| n.to_string())
        )));
    }
    Ok(())
}

/// Runs `dot(row, y)` for every row of `w` (`per_row` elements each) into `out`, in parallel.
fn rows_par<B: Sync, Y: Sync>(
    w: &[B],
    per_row: usize,
    y: &[Y],
    out: &mut [f32],
    dot: impl Fn(&[B], &[Y]) -> f32 + Sync + Send,
) {
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let first = c * ROWS_PER_TASK;
            for (i, o) in chunk.iter_mut().enumerate() {
                let r = first + i;
                *o = dot(&w[r * per_row..(r + 1) * per_row], y);
            }
        });
}

fn unsupported(dtype: GgmlDType) -> Error {
    Error::unsupported(format!("gemv: weight type {dtype:?} is not supported"))
}
