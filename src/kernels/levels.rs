//! The levels' kernels for each weight type: a marker type per level, and per weight type the
//! [`LevelKernels`] impl that [`TABLE`](super::table) holds in that level's column.
//!
//! Where the panels start to pay ([`Panels::min_rows`]): below it, the kernels that unpack each
//! weight block once for up to [`GROUP`](super::tiling::GROUP) activation rows (`x86::avx512_rows`,
//! `x86::avx2_rows`) are faster than repacking the weights.
//!
//! - AVX-512, measured on 16384 x 3072 matrices streamed from memory, 2 threads (Xeon), ns per
//!   weight block, rows kernels against the panel kernel: Q4_K 8 rows 16.2 against 22.9, 12 rows
//!   24.9 against 26.0, 16 rows 33.4 against 29.3; Q6_K 8 rows 19.4 against 23.9, 12 rows 27.6
//!   against 27.1, 16 rows 36.0 against 30.9.
//! - AVX2, measured on Phi-3-mini's 4 matrices streamed from memory, 2 threads (Zen 3), ms for
//!   the qkv matrix (9216 x 3072), rows kernels against the panel kernel with its weights packed
//!   by `x86::pack`: Q4_K 4 rows 2.3 against 3.9, 6 rows 4.9 against 2.4; Q5_K 6 rows 4.9 against
//!   3.0; Q4_0 4 rows 4.1 against 3.5; Q8_0 12 rows 11.9 against 15.5, 16 rows 15.9 against 11.8.
//!   Q6_K (packed by the scalar code), ms for ffn_down (3072 x 8192): 12 rows 5.0-6.7 against
//!   6.9-7.3, 16 rows 9.1 against 7.8-8.2.

use super::table::{LevelKernels, WeightType};

/// The scalar level: every type's reference dot.
pub(crate) struct Scalar;

impl<T: WeightType> LevelKernels<T> for Scalar {
    unsafe fn dot(w: &[T], y: &[T::Act]) -> f32 {
        T::dot(w, y)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86_levels::{Avx2, Avx512Vnni};

#[cfg(target_arch = "x86_64")]
mod x86_levels {
    use half::f16;

    use crate::kernels::blocks::*;
    use crate::kernels::interleaved::{BlockQ4Kx16, BlockQ6Kx16};
    use crate::kernels::panel;
    use crate::kernels::table::{interleaving, Interleaving, LevelKernels, Panels};
    use crate::kernels::tiling::{groups_par, prepared_groups_par, rows_par, SharedOut};
    use crate::kernels::x86::avx512_rows::Q8KRows;
    use crate::kernels::x86::{avx2, avx2_gemm, avx2_rows, avx512, avx512_gemm, avx512_rows};

    /// AVX2, FMA and F16C.
    pub(crate) struct Avx2;

    /// The avx2 level's kernels for a quantized type: its dot, its few-rows kernel, and its
    /// panels from `min_rows` on.
    macro_rules! avx2_quantized {
        ($block:ty, $act:ty, $dot:ident, $rows_dot:ident, $kind:ident, $v:literal, $min_rows:literal) => {
            impl LevelKernels<$block> for Avx2 {
                const PANELS: Option<Panels<$block>> = Some(Panels {
                    min_rows: $min_rows,
                    run: avx2_gemm::gemm::<panel::$kind, $v>,
                });
                unsafe fn dot(w: &[$block], y: &[$act]) -> f32 {
                    // SAFETY: the caller guarantees the features.
                    unsafe { avx2::$dot(w, y) }
                }
                unsafe fn few_rows(
                    w: &[$block],
                    bpr: usize,
                    y: &[$act],
                    n: usize,
                    out: &SharedOut,
                ) {
                    // SAFETY: as above.
                    groups_par(w, bpr, y, n, out, |w, ys, o| unsafe {
                        avx2_rows::$rows_dot(w, ys, o)
                    })
                }
            }
        };
    }
    avx2_quantized!(BlockQ4K, BlockQ8K, dot_q4k, dot_q4k_rows, Q4K, 8, 6);
    avx2_quantized!(BlockQ5K, BlockQ8K, dot_q5k, dot_q5k_rows, Q5K, 8, 6);
    avx2_quantized!(BlockQ6K, BlockQ8K, dot_q6k, dot_q6k_rows, Q6K, 4, 16);
    avx2_quantized!(BlockQ8_0, BlockQ8_0, dot_q8_0, dot_q8_0_rows, Q8_0, 8, 16);
    avx2_quantized!(BlockQ4_0, BlockQ8_0, dot_q4_0, dot_q4_0_rows, Q4_0, 8, 4);

    impl LevelKernels<f16> for Avx2 {
        unsafe fn dot(w: &[f16], x: &[f32]) -> f32 {
            // SAFETY: the caller guarantees the features.
            unsafe { avx2::dot_f16(w, x) }
        }
    }

    impl LevelKernels<f32> for Avx2 {
        unsafe fn dot(w: &[f32], x: &[f32]) -> f32 {
            // SAFETY: the caller guarantees the features.
            unsafe { avx2::dot_f32(w, x) }
        }
    }

    /// The above plus AVX-512 F, BW, VL and VNNI.
    pub(crate) struct Avx512Vnni;

    /// The fewest activation rows the AVX-512 panels pay for, every type.
    const AVX512_PANELS_MIN_ROWS: usize = 12;

    /// The K-quants at the avx512vnni level: each group of activation rows is prepared once
    /// ([`Q8KRows`]), and one row goes through the same kernel as a few, so that a stream's
    /// logits do not depend on whether other streams shared its pass.
    macro_rules! avx512_k_quant {
        ($block:ty, $rows_dot:ident, $prepare:ident, $kind:ident, $v:literal, $interleaved:expr) => {
            impl LevelKernels<$block> for Avx512Vnni {
                const PANELS: Option<Panels<$block>> = Some(Panels {
                    min_rows: AVX512_PANELS_MIN_ROWS,
                    run: avx512_gemm::gemm::<panel::$kind, $v>,
                });
                const INTERLEAVED: Option<&'static Interleaving> = $interleaved;
                unsafe fn dot(w: &[$block], y: &[BlockQ8K]) -> f32 {
                    let mut out = [0f32];
                    // SAFETY: the caller guarantees the features.
                    unsafe { avx512_rows::$rows_dot(w, &Q8KRows::$prepare(&[y]), &mut out) };
                    out[0]
                }
                unsafe fn gemv(w: &[$block], bpr: usize, y: &[BlockQ8K], out: &mut [f32]) {
                    let y = [Q8KRows::$prepare(&[y])];
                    rows_par(w, bpr, &y, out, |w, y| {
                        let mut o = [0f32];
                        // SAFETY: as above.
                        unsafe { avx512_rows::$rows_dot(w, &y[0], &mut o) };
                        o[0]
                    })
                }
                unsafe fn few_rows(
                    w: &[$block],
                    bpr: usize,
                    y: &[BlockQ8K],
                    n: usize,
                    out: &SharedOut,
                ) {
                    prepared_groups_par(w, bpr, y, n, out, Q8KRows::$prepare, |w, y, o| {
                        // SAFETY: as above.
                        unsafe { avx512_rows::$rows_dot(w, y, o) }
                    })
                }
            }
        };
    }
    avx512_k_quant!(
        BlockQ4K,
        dot_q4k_rows,
        for_k4,
        Q4K,
        8,
        Some(&interleaving::<BlockQ4Kx16>())
    );
    avx512_k_quant!(BlockQ5K, dot_q5k_rows, for_k4, Q5K, 8, None);
    avx512_k_quant!(
        BlockQ6K,
        dot_q6k_rows,
        for_q6k,
        Q6K,
        4,
        Some(&interleaving::<BlockQ6Kx16>())
    );

    /// The 32-value types at the avx512vnni level: gemv's dot for a few rows, panels for more.
    macro_rules! avx512_q32 {
        ($block:ty, $dot:ident, $kind:ident) => {
            impl LevelKernels<$block> for Avx512Vnni {
                const PANELS: Option<Panels<$block>> = Some(Panels {
                    min_rows: AVX512_PANELS_MIN_ROWS,
                    run: avx512_gemm::gemm::<panel::$kind, 8>,
                });
                unsafe fn dot(w: &[$block], y: &[BlockQ8_0]) -> f32 {
                    // SAFETY: the caller guarantees the features.
                    unsafe { avx512::$dot(w, y) }
                }
            }
        };
    }
    avx512_q32!(BlockQ8_0, dot_q8_0, Q8_0);
    avx512_q32!(BlockQ4_0, dot_q4_0, Q4_0);

    impl LevelKernels<f16> for Avx512Vnni {
        unsafe fn dot(w: &[f16], x: &[f32]) -> f32 {
            // SAFETY: the caller guarantees the features.
            unsafe { avx512::dot_f16(w, x) }
        }
    }

    impl LevelKernels<f32> for Avx512Vnni {
        unsafe fn dot(w: &[f32], x: &[f32]) -> f32 {
            // SAFETY: the caller guarantees the features.
            unsafe { avx512::dot_f32(w, x) }
        }
    }
}
