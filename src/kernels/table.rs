//! The kernel table: for each weight type with kernels, and each level, the functions that
//! gemv, gemm and the embedding lookup run, resolved once (as ggml's type traits are). A matrix
//! looks up its entry when the model loads and calls through it from then on.
//!
//! A weight type is a [`WeightType`] (its block, the form its activations take, the scalar
//! reference dot, the dequantization), one [`LevelKernels`] impl per level (`levels.rs`), and a
//! row of [`TABLE`]. A level is a marker type in `levels.rs` with an impl for every weight type,
//! a column of [`TABLE`], and a [`CpuLevel`] with the features it needs.

use std::borrow::Cow;

use half::f16;
use rayon::prelude::*;

use super::blocks::*;
use super::interleaved::Interleaved;
#[cfg(target_arch = "x86_64")]
use super::interleaved::{self, BlockQ4Kx16, BlockQ6Kx16, InterleavedBlock};
use super::levels::Scalar;
#[cfg(target_arch = "x86_64")]
use super::levels::{Avx2, Avx512Vnni};
use super::tiling::{groups_par, rows_par, SharedOut};
use super::{dequantize, hardware_level, reference, CpuLevel};
use crate::error::{Error, Result};
use crate::gguf::TensorType;

/// A weight type our kernels compute with, named by its block (`f16` and `f32` for the float
/// types, whose "blocks" are single values).
pub(crate) trait WeightType: Pod {
    const TYPE: TensorType;
    /// What the activations become for the dot products: Q8_K or Q8_0 blocks, or f32 values.
    type Act: Send + Sync + Clone + 'static;

    /// Rows of `cols` values, in the form the dots take (a row's blocks never reach into the
    /// next row, so the rows may be quantized together or apart).
    fn quantize_rows(x: &[f32], cols: usize) -> Cow<'_, [Self::Act]>;

    /// The scalar reference dot of a weight row and an activation row.
    fn dot(w: &[Self], y: &[Self::Act]) -> f32;

    /// The values of a row's blocks, into `out` (as many values).
    fn dequantize(w: &[Self], out: &mut [f32]);
}

/// The rows of `x` quantized by `quantize`, in parallel, back to back.
fn quantized_rows<Y: Send + Clone>(
    x: &[f32],
    cols: usize,
    quantize: fn(&[f32]) -> Vec<Y>,
) -> Cow<'_, [Y]> {
    if x.len() <= cols {
        return Cow::Owned(quantize(x));
    }
    Cow::Owned(x.par_chunks(cols).flat_map_iter(quantize).collect())
}

/// A quantized type: its activations quantized to `$act` by `$quantize`, its reference dot,
/// its block's dequantization.
macro_rules! quantized_type {
    ($block:ty, $type:ident, $act:ty, $quantize:ident, $dot:ident, $dequantize:ident) => {
        impl WeightType for $block {
            const TYPE: TensorType = TensorType::$type;
            type Act = $act;
            fn quantize_rows(x: &[f32], cols: usize) -> Cow<'_, [$act]> {
                quantized_rows(x, cols, $quantize)
            }
            fn dot(w: &[Self], y: &[$act]) -> f32 {
                reference::$dot(w, y)
            }
            fn dequantize(w: &[Self], out: &mut [f32]) {
                dequantize::each_block(w, out, dequantize::$dequantize)
            }
        }
    };
}
quantized_type!(BlockQ4K, Q4K, BlockQ8K, quantize_q8k, dot_q4k, q4k);
quantized_type!(BlockQ5K, Q5K, BlockQ8K, quantize_q8k, dot_q5k, q5k);
quantized_type!(BlockQ6K, Q6K, BlockQ8K, quantize_q8k, dot_q6k, q6k);
quantized_type!(BlockQ8_0, Q8_0, BlockQ8_0, quantize_q8_0, dot_q8_0, q8_0);
quantized_type!(BlockQ4_0, Q4_0, BlockQ8_0, quantize_q8_0, dot_q4_0, q4_0);

impl WeightType for f16 {
    const TYPE: TensorType = TensorType::F16;
    type Act = f32;
    fn quantize_rows(x: &[f32], _cols: usize) -> Cow<'_, [f32]> {
        Cow::Borrowed(x)
    }
    fn dot(w: &[Self], x: &[f32]) -> f32 {
        reference::dot_f16(w, x)
    }
    fn dequantize(w: &[Self], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(w) {
            *o = v.to_f32();
        }
    }
}

impl WeightType for f32 {
    const TYPE: TensorType = TensorType::F32;
    type Act = f32;
    fn quantize_rows(x: &[f32], _cols: usize) -> Cow<'_, [f32]> {
        Cow::Borrowed(x)
    }
    fn dot(w: &[Self], x: &[f32]) -> f32 {
        reference::dot_f32(w, x)
    }
    fn dequantize(w: &[Self], out: &mut [f32]) {
        out.copy_from_slice(w);
    }
}

/// A panel GEMM for weight type `T` (`x86::avx512_gemm::gemm`, `x86::avx2_gemm::gemm`), and the
/// fewest activation rows worth repacking the weights into its panels for.
pub(crate) struct Panels<T> {
    pub min_rows: usize,
    /// `(w, blocks per row, x, cols, n, out)`, as [`Kernels::gemm`] takes them.
    ///
    /// # Safety
    /// The CPU has the level's features.
    pub run: unsafe fn(&[T], usize, &[f32], usize, usize, &SharedOut),
}

/// One level's kernels for weight type `T`, checked against `T`'s reference by the tests.
///
/// # Safety
/// Every method may be called only when the CPU has the level's features.
pub(crate) trait LevelKernels<T: WeightType> {
    /// The panel GEMM for many activation rows; without one, every row count takes
    /// [`few_rows`](Self::few_rows).
    const PANELS: Option<Panels<T>> = None;

    /// A layout of the weights this level's kernels run faster on, made at load.
    const INTERLEAVED: Option<&'static Interleaving> = None;

    /// One weight row against one activation row.
    ///
    /// # Safety
    /// The CPU has the level's features.
    unsafe fn dot(w: &[T], y: &[T::Act]) -> f32;

    /// `out[r] = dot(row r of w, y)`, rows of `bpr` blocks, in parallel.
    ///
    /// # Safety
    /// The CPU has the level's features.
    unsafe fn gemv(w: &[T], bpr: usize, y: &[T::Act], out: &mut [f32]) {
        // SAFETY: the caller guarantees the features.
        rows_par(w, bpr, y, out, |w, y| unsafe { Self::dot(w, y) });
    }

    /// The `n` activation rows of `y` against every weight row, into `out`, tile by tile: the
    /// product below [`PANELS`](Self::PANELS)' row count.
    ///
    /// # Safety
    /// The CPU has the level's features.
    unsafe fn few_rows(w: &[T], bpr: usize, y: &[T::Act], n: usize, out: &SharedOut) {
        groups_par(w, bpr, y, n, out, |w, ys, out| {
            for (o, y) in out.iter_mut().zip(ys) {
                // SAFETY: as above.
                *o = unsafe { Self::dot(w, y) };
            }
        });
    }
}

/// One weight type's kernels at one level: an entry of [`TABLE`], found by [`find`].
pub struct Kernels {
    pub tensor_type: TensorType,
    pub level: CpuLevel,
    /// The fewest activation rows for which [`Kernels::gemm`] packs the weights into panels
    /// (`usize::MAX`: never); the tests' tolerances depend on it.
    #[cfg(test)]
    pub packed_min_rows: usize,
    /// The alignment the weights' bytes need (their block's).
    pub align: usize,
    /// How the weights' bytes are laid out: as the GGUF file stores them, or interleaved.
    pub layout: Layout,
    /// Where the weights run faster interleaved: the entry that takes them so, once
    /// [`Interleaving::make`] has laid them out.
    pub interleaved: Option<&'static Interleaving>,
    gemv: GemvFn,
    gemm: GemmFn,
    /// `(weights, blocks per row, row, out)`, shapes checked.
    dequantize: fn(&[u8], usize, usize, &mut [f32]) -> Result<()>,
}

/// The layout of a matrix's bytes that an entry takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row after row of blocks, as in the file.
    Stored,
    /// Groups of `rows` rows, block k of every row of a group in one `block_bytes` block.
    Interleaved { rows: usize, block_bytes: usize },
}

impl Layout {
    /// Whether a matrix of `rows` rows can be laid out so (in whole groups).
    pub fn takes(self, rows: usize) -> bool {
        match self {
            Layout::Stored => true,
            Layout::Interleaved { rows: group, .. } => rows.is_multiple_of(group),
        }
    }
}

/// A faster layout for a weight type at a level, made when a model loads.
pub struct Interleaving {
    /// The entry that takes the interleaved bytes.
    pub kernels: Kernels,
    /// `(weights as stored, blocks per row)` -> the same matrix interleaved. The caller checks
    /// the shape first ([`Kernels::blocks_per_row`] of the stored entry), and that the rows are
    /// a multiple of the layout's group.
    pub make: fn(&[u8], usize) -> Result<Interleaved>,
}

/// `(weights, blocks per row, x, out)`, shapes checked; the CPU must have the entry's level.
type GemvFn = unsafe fn(&[u8], usize, &[f32], &mut [f32]) -> Result<()>;

/// `(weights, blocks per row, x, cols, n, out)`, shapes checked, `n >= 2`; the CPU must have
/// the entry's level.
type GemmFn = unsafe fn(&[u8], usize, &[f32], usize, usize, &SharedOut) -> Result<()>;

const fn entry<T: WeightType, L: LevelKernels<T>>(level: CpuLevel) -> Kernels {
    Kernels {
        tensor_type: T::TYPE,
        level,
        #[cfg(test)]
        packed_min_rows: match L::PANELS {
            Some(panels) => panels.min_rows,
            None => usize::MAX,
        },
        align: align_of::<T>(),
        layout: Layout::Stored,
        interleaved: L::INTERLEAVED,
        gemv: gemv::<T, L>,
        gemm: gemm::<T, L>,
        dequantize: dequantize_row::<T>,
    }
}

/// The levels this target has kernels for: [`TABLE`]'s columns.
#[cfg(target_arch = "x86_64")]
const LEVELS: usize = 3;
#[cfg(not(target_arch = "x86_64"))]
const LEVELS: usize = 1;

/// One weight type's row of [`TABLE`]: its entry at every level.
#[cfg(target_arch = "x86_64")]
const fn row<T: WeightType>() -> [Kernels; LEVELS]
where
    Scalar: LevelKernels<T>,
    Avx2: LevelKernels<T>,
    Avx512Vnni: LevelKernels<T>,
{
    [
        entry::<T, Scalar>(CpuLevel::Scalar),
        entry::<T, Avx2>(CpuLevel::Avx2),
        entry::<T, Avx512Vnni>(CpuLevel::Avx512Vnni),
    ]
}
#[cfg(not(target_arch = "x86_64"))]
const fn row<T: WeightType>() -> [Kernels; LEVELS] {
    [entry::<T, Scalar>(CpuLevel::Scalar)]
}

/// Every weight type with kernels, a row each.
static TABLE: [[Kernels; LEVELS]; 7] = [
    row::<BlockQ4K>(),
    row::<BlockQ5K>(),
    row::<BlockQ6K>(),
    row::<BlockQ8_0>(),
    row::<BlockQ4_0>(),
    row::<f16>(),
    row::<f32>(),
];

/// The weight types with kernels.
pub fn types() -> impl Iterator<Item = TensorType> {
    TABLE.iter().map(|row| row[0].tensor_type)
}

/// The kernels for `tensor_type` at `level`: an error if this CPU lacks the level or there are
/// none for the type.
pub fn find(level: CpuLevel, tensor_type: TensorType) -> Result<&'static Kernels> {
    let hw = hardware_level();
    if level > hw {
        return Err(Error::invalid_argument(format!(
            "level: {level} is not available on this CPU (it has {hw})"
        )));
    }
    TABLE
        .iter()
        .flatten()
        .find(|k| k.tensor_type == tensor_type && k.level == level)
        .ok_or_else(|| {
            Error::unsupported(format!(
                "weight type {tensor_type:?} has no kernels (phi3's kernels take {})",
                types()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

impl Kernels {
    /// `out[i * rows + r] = dot(row r of W, row i of x)` for `i in 0..n`, `r in 0..rows`
    /// (for one row, the gemv kernels).
    ///
    /// `weights`: the raw GGUF bytes of a `(rows, cols)` matrix of this type (ggml dims
    /// `[cols, rows]`), aligned to [`align`](Self::align) (GGUF data always is); `x`: `n` rows of
    /// `cols` values; `out`: `n` rows of `rows` values.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        weights: &[u8],
        rows: usize,
        cols: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<()> {
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
        let bpr = self.blocks_per_row(weights, rows, cols)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if cols == 0 {
            out.fill(0.0);
            return Ok(());
        }
        // One activation row is gemv's job.
        if n == 1 {
            // SAFETY: `find` hands out entries only for levels this CPU has.
            return unsafe { (self.gemv)(weights, bpr, x, out) };
        }
        let out = SharedOut::new(out, rows, n);
        // SAFETY: as above.
        unsafe { (self.gemm)(weights, bpr, x, cols, n, &out) }
    }

    /// `out` = the values of row `row` of `weights`, a matrix of `rows` rows of `out.len()`
    /// values in this entry's layout: the embedding lookup. The same at every level (scalar,
    /// in ggml's order of operations, so the values are llama.cpp's).
    pub fn dequantize_row(
        &self,
        weights: &[u8],
        rows: usize,
        row: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let bpr = self.blocks_per_row(weights, rows, out.len())?;
        if row >= rows {
            return Err(Error::invalid_argument(format!(
                "row {row} of a matrix of {rows}"
            )));
        }
        (self.dequantize)(weights, bpr, row, out)
    }

    /// Checks that `weights` holds a `rows` x `cols` matrix of this type in this entry's
    /// layout; its blocks per row.
    pub fn blocks_per_row(&self, weights: &[u8], rows: usize, cols: usize) -> Result<usize> {
        let t = self.tensor_type;
        let block = t.block_size();
        if !cols.is_multiple_of(block) {
            return Err(Error::invalid_argument(format!(
                "cols: {cols} is not a multiple of {t:?}'s block size {block}"
            )));
        }
        let (groups, group_bytes) = match self.layout {
            Layout::Stored => (rows, t.type_size()),
            Layout::Interleaved {
                rows: group,
                block_bytes,
            } => {
                if !rows.is_multiple_of(group) {
                    return Err(Error::invalid_argument(format!(
                        "rows: {rows} is not a multiple of the {group} rows interleaved"
                    )));
                }
                (rows / group, block_bytes)
            }
        };
        let expected = groups
            .checked_mul(cols / block)
            .and_then(|n| n.checked_mul(group_bytes));
        if expected != Some(weights.len()) {
            return Err(Error::invalid_argument(format!(
                "weights: {} bytes but a {rows}x{cols} {t:?} matrix takes {}",
                weights.len(),
                expected.map_or("more than usize::MAX".to_string(), |n| n.to_string())
            )));
        }
        Ok(cols / block)
    }
}

/// [`Kernels::gemm`] after its checks, for one row.
///
/// # Safety
/// The CPU has `L`'s features.
unsafe fn gemv<T: WeightType, L: LevelKernels<T>>(
    weights: &[u8],
    bpr: usize,
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let w = cast_slice::<T>(weights, "weights")?;
    let y = T::quantize_rows(x, x.len());
    // SAFETY: the caller guarantees the features.
    unsafe { L::gemv(w, bpr, &y, out) };
    Ok(())
}

/// [`Kernels::gemm`] after its checks, for `n >= 2` rows.
///
/// # Safety
/// The CPU has `L`'s features.
unsafe fn gemm<T: WeightType, L: LevelKernels<T>>(
    weights: &[u8],
    bpr: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &SharedOut,
) -> Result<()> {
    let w = cast_slice::<T>(weights, "weights")?;
    match L::PANELS {
        // SAFETY: the caller guarantees the features.
        Some(panels) if n >= panels.min_rows => unsafe { (panels.run)(w, bpr, x, cols, n, out) },
        // SAFETY: as above.
        _ => unsafe { L::few_rows(w, bpr, &T::quantize_rows(x, cols), n, out) },
    }
    Ok(())
}

/// A weight type's blocks 16 rows interleaved, with its AVX-512 VNNI kernel: what an
/// [`Interleaving`] is made of ([`interleaving`]).
#[cfg(target_arch = "x86_64")]
pub(crate) trait Interleaved16:
    InterleavedBlock<Stored: WeightType<Act = BlockQ8K>>
{
    /// `out[p][r] = dot(row r of the group w, ys[p])`, 1 to 8 activation rows.
    ///
    /// # Safety
    /// The CPU has the avx512vnni level.
    unsafe fn dot(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [[f32; interleaved::ROWS]]);
}

#[cfg(target_arch = "x86_64")]
impl Interleaved16 for BlockQ4Kx16 {
    unsafe fn dot(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [[f32; interleaved::ROWS]]) {
        // SAFETY: the caller guarantees the features.
        unsafe { super::x86::avx512_x16::dot_q4k_x16(w, ys, out) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Interleaved16 for BlockQ6Kx16 {
    unsafe fn dot(w: &[Self], ys: &[&[BlockQ8K]], out: &mut [[f32; interleaved::ROWS]]) {
        // SAFETY: the caller guarantees the features.
        unsafe { super::x86::avx512_x16::dot_q6k_x16(w, ys, out) }
    }
}

/// The avx512vnni entry for `X`'s interleaved matrices: one kernel for every number of
/// activation rows. Against the stored layout's kernels (row-wise below 12 rows, panels from
/// 12) on Phi-3-mini-sized matrices streamed from memory (Zen 4, 2 threads,
/// `interleaved::tests::timing`), ns per weight block and activation row: see BENCHMARKS.md.
#[cfg(target_arch = "x86_64")]
pub(crate) const fn interleaving<X: Interleaved16>() -> Interleaving {
    Interleaving {
        kernels: Kernels {
            tensor_type: X::Stored::TYPE,
            level: CpuLevel::Avx512Vnni,
            #[cfg(test)]
            packed_min_rows: usize::MAX,
            align: align_of::<X>(),
            layout: Layout::Interleaved {
                rows: interleaved::ROWS,
                block_bytes: size_of::<X>(),
            },
            interleaved: None,
            gemv: x16_gemv::<X>,
            gemm: x16_gemm::<X>,
            dequantize: x16_row::<X>,
        },
        make: Interleaved::new::<X>,
    }
}

/// # Safety
/// The CPU has the avx512vnni level.
#[cfg(target_arch = "x86_64")]
unsafe fn x16_gemv<X: Interleaved16>(
    weights: &[u8],
    bpr: usize,
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let rows = out.len();
    // SAFETY: the caller guarantees the features.
    unsafe { x16_gemm::<X>(weights, bpr, x, x.len(), 1, &SharedOut::new(out, rows, 1)) }
}

/// # Safety
/// The CPU has the avx512vnni level.
#[cfg(target_arch = "x86_64")]
unsafe fn x16_gemm<X: Interleaved16>(
    weights: &[u8],
    bpr: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &SharedOut,
) -> Result<()> {
    let w = cast_slice::<X>(weights, "weights")?;
    let y = quantized_rows(x, cols, |x| {
        // SAFETY: the caller guarantees the features.
        unsafe { super::x86::avx512_gemm::quantize_q8k_row(x) }
    });
    // SAFETY: as above.
    unsafe { super::x86::avx512_x16::gemm(w, bpr, &y, n, out, X::dot) };
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn x16_row<X: Interleaved16>(
    weights: &[u8],
    bpr: usize,
    row: usize,
    out: &mut [f32],
) -> Result<()> {
    interleaved::dequantize_row::<X>(cast_slice(weights, "weights")?, bpr, row, out);
    Ok(())
}

fn dequantize_row<T: WeightType>(
    weights: &[u8],
    bpr: usize,
    row: usize,
    out: &mut [f32],
) -> Result<()> {
    let w = cast_slice::<T>(weights, "weights")?;
    T::dequantize(&w[row * bpr..(row + 1) * bpr], out);
    Ok(())
}
