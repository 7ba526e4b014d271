//! AVX2 + FMA kernels for [`Kernels::gemm`](crate::kernels::Kernels::gemm) on the quantized types over many
//! activation rows (prefill), on [`panel`]s of 8 scale groups.
//!
//! AVX2 has no `vpdpbusd`: `vpmaddubsw` multiplies unsigned weight bytes by signed activation
//! bytes and adds pairs into 16-bit lanes, and `vpmaddwd` by ones adds those pairs into the
//! 32-bit lane of their group. While the 16-bit sums cannot overflow (activations are within
//! ±127, so `2 * 127 * W_MAX` per product pair), several `vpmaddubsw` results add up in 16 bits
//! first: 8 for Q4_K and Q4_0 (values up to 15), 4 for Q5_K, 2 for Q6_K, 1 for Q8_0. So a pair of
//! Q4_K panels costs 8 `vpmaddubsw` and one `vpmaddwd` for 256 values, where gemv's kernel (one
//! `vpmaddwd` with the scale per 32 values) costs 8 and 8: the scales are applied per lane in
//! float instead. Q8_0's signed weights go in as magnitudes, the activations' signs flipped to
//! match (`vpsignb`), as in gemv.
//!
//! Integer sums are exact and match gemv's; the float work differs in order only.

use std::arch::x86_64::*;

use super::avx2::hsum_ps;
use super::pack::PackWeights;
use crate::kernels::panel::{self, Blocking, Kind};
use crate::kernels::tiling::SharedOut;

/// A panel of 8 scale groups, one per 32-bit lane of a 256-bit vector.
type Panel<const V: usize> = panel::Panel<V, 8>;

/// Weight rows per tile: 64 rows of a 3072-column Q4_K matrix take 240 KiB as panels, within
/// the 512 KiB L2 of a Zen 3 core. One weight row by 6 activation rows per microkernel call:
/// the 6 pairs' 16-bit sums and float accumulators, the weight vector, an activation vector and
/// the ones of `vpmaddwd` fill the 16 registers without spilling for Q4_K. Measured on Zen 3 (2
/// threads, 512 rows, Phi-3-mini's matrices), Q4_K / Q6_K GOPS, best of 3 rounds: 1 x 6: 297 /
/// 186; 1 x 4: 263 / 166; 2 x 4: 228 / 131; 2 x 3: 215 / 144; 3 x 3: 186 / 124; 1 x 8: 265 / 169.
/// Activations: up to 32 KiB of them per call (one chunk of K for 3072 columns).
const BLOCKING: Blocking = Blocking {
    tile_rows: 64,
    call_w: 1,
    call_a: 6,
    chunk_bytes: 32 * 1024,
};
const _: () = assert!(
    BLOCKING.call_w == 1 && BLOCKING.call_a == 6,
    "gemm's dispatch covers 1x6 calls and smaller"
);

/// `out[i * rows + r] = dot(row r of w, row i of x)` for the `n` rows of `x` (`cols` values
/// each); `w` has `bpr` blocks per row.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
pub unsafe fn gemm<K: PackWeights<V>, const V: usize>(
    w: &[K::Block],
    bpr: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &SharedOut,
) {
    let pack_weights = |w: &[K::Block], p: &mut [Panel<V>]| {
        // SAFETY: the caller guarantees the features.
        unsafe { K::pack_weights_x86(w, p) }
    };
    let dots = panel_dots_by_shape!(
        panel_dots::<K, V>,
        Panel<V>,
        (1, 6),
        (1, 5),
        (1, 4),
        (1, 3),
        (1, 2),
        (1, 1),
    );
    panel::gemm::<K, V, 8>(
        w,
        bpr,
        x,
        cols,
        n,
        out,
        BLOCKING,
        pack_weights,
        K::pack_acts,
        dots,
    );
}

/// A 32-byte field of a [`Panel`] as a vector.
#[inline]
#[target_feature(enable = "avx2")]
fn load<T: Copy>(field: &[T; 8]) -> __m256i {
    const { assert!(size_of::<T>() == 4) };
    // SAFETY: 32 bytes (asserted), at a multiple of 32 within a `Panel`, which is 64-aligned.
    unsafe { _mm256_load_si256(field.as_ptr().cast()) }
}

/// `vpmaddubsw` results that add up in 16-bit lanes without overflow for kind `K`.
const fn steps_in_i16<K: Kind<V>, const V: usize>() -> usize {
    // At least 1: `panel_dots` asserts that one product pair fits in 16 bits.
    let steps = (i16::MAX as i32 / (2 * 127 * K::W_MAX)) as usize;
    if steps > V {
        V
    } else {
        steps
    }
}

/// The dot products of `RW` weight rows with `RA` activation rows, all as panels (the same
/// number of each).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn panel_dots<K: Kind<V>, const V: usize, const RW: usize, const RA: usize>(
    w: [&[Panel<V>]; RW],
    a: [&[Panel<V>]; RA],
) -> [[f32; RA]; RW] {
    let steps = const { steps_in_i16::<K, V>() };
    const { assert!(2 * 127 * K::W_MAX <= i16::MAX as i32 && V.is_multiple_of(steps_in_i16::<K, V>())) };
    let np = a[0].len();
    assert!(w.iter().all(|w| w.len() == np) && a.iter().all(|a| a.len() == np));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); RA]; RW];
    for g in 0..np {
        let mut wp = [&w[0][g]; RW];
        for r in 1..RW {
            wp[r] = &w[r][g];
        }
        let mut ap = [&a[0][g]; RA];
        for i in 1..RA {
            ap[i] = &a[i][g];
        }
        let mut s = [[_mm256_setzero_si256(); RA]; RW];
        if K::A_OFFSET {
            for i in 0..RA {
                let e = load(&ap[i].extra);
                for s in s.iter_mut() {
                    s[i] = e;
                }
            }
        }
        for v0 in (0..V).step_by(steps) {
            // 16-bit sums of `steps` steps of 4 values, each loaded vector used for a whole row
            // or column of pairs.
            let mut p = [[_mm256_setzero_si256(); RA]; RW];
            for v in v0..v0 + steps {
                let mut wq = [_mm256_setzero_si256(); RW];
                for r in 0..RW {
                    wq[r] = load(&wp[r].q[v]);
                }
                let mut wu = wq;
                if K::SIGNED_W {
                    for r in 0..RW {
                        wu[r] = _mm256_sign_epi8(wq[r], wq[r]);
                    }
                }
                for i in 0..RA {
                    let aq = load(&ap[i].q[v]);
                    for r in 0..RW {
                        let aq = if K::SIGNED_W {
                            _mm256_sign_epi8(aq, wq[r])
                        } else {
                            aq
                        };
                        p[r][i] = _mm256_add_epi16(p[r][i], _mm256_maddubs_epi16(wu[r], aq));
                    }
                }
            }
            for r in 0..RW {
                for i in 0..RA {
                    s[r][i] = _mm256_add_epi32(s[r][i], _mm256_madd_epi16(p[r][i], ones));
                }
            }
        }
        for i in 0..RA {
            let a_scale = _mm256_castsi256_ps(load(&ap[i].scale));
            for r in 0..RW {
                let scale = _mm256_mul_ps(_mm256_castsi256_ps(load(&wp[r].scale)), a_scale);
                acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][i]), scale, acc[r][i]);
                if K::MINS {
                    acc[r][i] = _mm256_fmadd_ps(
                        _mm256_castsi256_ps(load(&wp[r].extra)),
                        _mm256_castsi256_ps(load(&ap[i].extra)),
                        acc[r][i],
                    );
                }
            }
        }
    }
    let mut res = [[0f32; RA]; RW];
    for r in 0..RW {
        for i in 0..RA {
            res[r][i] = hsum_ps(acc[r][i]);
        }
    }
    res
}
