//! Weights packed into [`Panel`]s with AVX2, for the panel kernels of every x86 level: 8 scale
//! groups of 32 values, one vector each as gemv unpacks them (a Q4_K/Q5_K block's sub-blocks, or
//! 8 Q8_0/Q4_0 blocks), become 8 lanes of a panel by an 8 x 8 transpose of 32-bit words, where
//! the scalar packing (`panel::Kind::pack_weights`, the reference the tests hold this to) moves
//! them a byte at a time. Q6_K's 16 groups of 16 values become 16 lanes of 4 words by the same
//! transpose and an interleave.

use std::arch::x86_64::*;

use super::avx2::{load256, q4_0_values, q4k_values, q5k_values};
use crate::kernels::blocks::*;
use crate::kernels::panel::{
    clear_tail, lane, pack_q4_0_scales, pack_q8_0_factors, Kind, Panel, Q4K, Q4_0, Q5K, Q6K, Q8_0,
};

/// A kind's weight packing for the x86 panel kernels.
pub trait PackWeights<const V: usize>: Kind<V> {
    /// [`Kind::pack_weights`], bit for bit.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    unsafe fn pack_weights_x86<const L: usize>(w: &[Self::Block], out: &mut [Panel<V, L>]) {
        Self::pack_weights(w, out)
    }
}

impl PackWeights<8> for Q4K {
    unsafe fn pack_weights_x86<const L: usize>(w: &[BlockQ4K], out: &mut [Panel<8, L>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            // SAFETY: the caller guarantees AVX2 (and so SSE).
            unsafe {
                super::prefetch_ahead(b);
                put_block(out, k, q4k_values(b));
                put_k32_scales(out, k, (b.d, b.dmin), unpack_scales_k4(&b.scales));
            }
        }
    }
}

impl PackWeights<8> for Q5K {
    unsafe fn pack_weights_x86<const L: usize>(w: &[BlockQ5K], out: &mut [Panel<8, L>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            // SAFETY: the caller guarantees AVX2.
            unsafe {
                put_block(out, k, q5k_values(b));
                put_k32_scales(out, k, (b.d, b.dmin), unpack_scales_k4(&b.scales));
            }
        }
    }
}

impl PackWeights<4> for Q6K {
    unsafe fn pack_weights_x86<const L: usize>(w: &[BlockQ6K], out: &mut [Panel<4, L>]) {
        // SAFETY: the caller guarantees AVX2.
        unsafe { pack_q6k(w, out) }
    }
}

/// [`Q6K`]'s packing: each block's values transposed into words, its scales converted, 8
/// groups at a time.
#[target_feature(enable = "avx2")]
fn pack_q6k<const L: usize>(w: &[BlockQ6K], out: &mut [Panel<4, L>]) {
    const { assert!(L.is_multiple_of(8), "half a block fills 8 lanes") };
    for (k, b) in w.iter().enumerate() {
        super::prefetch_ahead(b);
        let values = transpose8(q6k_values(b));
        // values[v] holds word v of groups 0, 2, .. 14 (v < 4) or of 1, 3, .. 15 (v - 4):
        // interleaved, words v of groups 0-7 and of 8-15.
        let d = _mm256_set1_ps(b.d.to_f32());
        for half in 0..2 {
            let (p, t) = lane(out, 16 * k + 8 * half);
            for (v, q) in p.q.iter_mut().enumerate() {
                let (even, odd) = (values[v], values[v + 4]);
                let (lo, hi) = (
                    _mm256_unpacklo_epi32(even, odd),
                    _mm256_unpackhi_epi32(even, odd),
                );
                let words = if half == 0 {
                    _mm256_permute2x128_si256::<0x20>(lo, hi)
                } else {
                    _mm256_permute2x128_si256::<0x31>(lo, hi)
                };
                // SAFETY: 8 u32 lanes are 32 bytes.
                unsafe { _mm256_storeu_si256(q[t..t + 8].as_mut_ptr().cast(), words) };
            }
            // SAFETY: 8 bytes of the 16 scales.
            let scales = unsafe { _mm_loadl_epi64(b.scales[8 * half..].as_ptr().cast()) };
            let scales = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scales)));
            // SAFETY: 8 f32 lanes are 32 bytes.
            unsafe { _mm256_storeu_ps(p.scale[t..t + 8].as_mut_ptr(), scales) };
            p.extra[t..t + 8].fill(0);
        }
    }
}

/// A Q6_K block's 256 values (0..=63, the offset of 32 left to the activations), 32 per vector
/// in order, as `Q6K::pack_weights` reads them from `ql` and `qh`.
#[inline]
#[target_feature(enable = "avx2")]
fn q6k_values(b: &BlockQ6K) -> [__m256i; 8] {
    let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let mut q = [_mm256_setzero_si256(); 8];
    for n in 0..2 {
        let qh = load256(&b.qh, 32 * n);
        for c in 0..4 {
            let ql = load256(&b.ql, 64 * n + 32 * (c % 2));
            let low = if c < 2 {
                _mm256_and_si256(ql, m4)
            } else {
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql), m4)
            };
            // Bits 2c..2c + 2 of qh, as bits 4-5: shifted in 16-bit lanes, then masked.
            let high = match c {
                0 => _mm256_and_si256(qh, m2),
                1 => _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                2 => _mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2),
                _ => _mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2),
            };
            q[4 * n + c] = _mm256_or_si256(low, _mm256_slli_epi16::<4>(high));
        }
    }
    q
}

/// Q4_K/Q5_K: block `k`'s scales (`d` times the sub-block's) and mins' factors (`-dmin` times
/// the sub-block's min) into lanes 8k.., as `panel::pack_k32_scales` computes them.
#[inline]
#[target_feature(enable = "avx2")]
fn put_k32_scales<const L: usize>(
    out: &mut [Panel<8, L>],
    k: usize,
    (d, dmin): (half::f16, half::f16),
    (sc, mn): ([u8; 8], [u8; 8]),
) {
    let as_f32 = |bytes: [u8; 8]| {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi64x(
            0,
            i64::from_le_bytes(bytes),
        )))
    };
    let scales = _mm256_mul_ps(_mm256_set1_ps(d.to_f32()), as_f32(sc));
    let mins = _mm256_mul_ps(_mm256_set1_ps(-dmin.to_f32()), as_f32(mn));
    let (p, t) = lane(out, 8 * k);
    // SAFETY: 8 f32 or u32 lanes are 32 bytes.
    unsafe {
        _mm256_storeu_ps(p.scale[t..t + 8].as_mut_ptr(), scales);
        _mm256_storeu_ps(p.extra[t..t + 8].as_mut_ptr().cast(), mins);
    }
}

impl PackWeights<8> for Q8_0 {
    unsafe fn pack_weights_x86<const L: usize>(w: &[BlockQ8_0], out: &mut [Panel<8, L>]) {
        let values = |b: &BlockQ8_0| {
            // SAFETY: the caller guarantees AVX2.
            unsafe { load256(&b.qs, 0) }
        };
        // SAFETY: the caller guarantees AVX2.
        unsafe { pack_by_8_blocks(w, out, values) };
        pack_q8_0_factors(w, out);
    }
}

impl PackWeights<8> for Q4_0 {
    unsafe fn pack_weights_x86<const L: usize>(w: &[BlockQ4_0], out: &mut [Panel<8, L>]) {
        let values = |b: &BlockQ4_0| {
            // SAFETY: the caller guarantees AVX2.
            unsafe { _mm256_add_epi8(q4_0_values(b), _mm256_set1_epi8(8)) }
        };
        // SAFETY: the caller guarantees AVX2.
        unsafe { pack_by_8_blocks(w, out, values) };
        pack_q4_0_scales(w, out);
    }
}

/// Q8_0/Q4_0: blocks of one scale group each, 8 blocks at a time (`values`: a block's 32
/// values, as the panels hold them) into lanes 8c.. of a row of panels; a last partial 8 leaves
/// zeros in the lanes past the data.
#[inline]
#[target_feature(enable = "avx2")]
fn pack_by_8_blocks<B, const L: usize>(
    w: &[B],
    out: &mut [Panel<8, L>],
    values: impl Fn(&B) -> __m256i,
) {
    clear_tail(out);
    for (c, blocks) in w.chunks(8).enumerate() {
        let mut v = [_mm256_setzero_si256(); 8];
        for (v, b) in v.iter_mut().zip(blocks) {
            *v = values(b);
        }
        put_block(out, c, v);
    }
}

/// Block `k`'s 8 sub-blocks of 32 values, one vector each, into lanes 8k.. of a row of panels.
#[inline]
#[target_feature(enable = "avx2")]
fn put_block<const L: usize>(out: &mut [Panel<8, L>], k: usize, values: [__m256i; 8]) {
    const { assert!(L.is_multiple_of(8), "a block fills 8 lanes") };
    let (p, t) = lane(out, 8 * k);
    for (q, word) in p.q.iter_mut().zip(transpose8(values)) {
        let lanes = &mut q[t..t + 8];
        // SAFETY: 8 u32 lanes are 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), word) };
    }
}

/// The 8 x 8 transpose of 32-bit words: word j of vector i becomes word i of vector j.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = [
        _mm256_unpacklo_epi32(v[0], v[1]),
        _mm256_unpackhi_epi32(v[0], v[1]),
        _mm256_unpacklo_epi32(v[2], v[3]),
        _mm256_unpackhi_epi32(v[2], v[3]),
        _mm256_unpacklo_epi32(v[4], v[5]),
        _mm256_unpackhi_epi32(v[4], v[5]),
        _mm256_unpacklo_epi32(v[6], v[7]),
        _mm256_unpackhi_epi32(v[6], v[7]),
    ];
    // u[j] holds words j and j + 4 (one per 128-bit half) of vectors 0-3 (u[j]) or 4-7 (u[4 + j]).
    let u: [__m256i; 8] = [
        _mm256_unpacklo_epi64(t[0], t[2]),
        _mm256_unpackhi_epi64(t[0], t[2]),
        _mm256_unpacklo_epi64(t[1], t[3]),
        _mm256_unpackhi_epi64(t[1], t[3]),
        _mm256_unpacklo_epi64(t[4], t[6]),
        _mm256_unpackhi_epi64(t[4], t[6]),
        _mm256_unpacklo_epi64(t[5], t[7]),
        _mm256_unpackhi_epi64(t[5], t[7]),
    ];
    [
        _mm256_permute2x128_si256::<0x20>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x20>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x20>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x20>(u[3], u[7]),
        _mm256_permute2x128_si256::<0x31>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x31>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x31>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x31>(u[3], u[7]),
    ]
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::gguf::TensorType;
    use crate::kernels::tests::random_blocks;
    use crate::kernels::{hardware_level, CpuLevel};

    fn same<K: PackWeights<V>, const V: usize, const L: usize>(w: &[K::Block]) {
        let panels = (w.len() * K::GROUPS).div_ceil(L);
        // Garbage first: every byte must be written.
        let mut want = vec![
            Panel::<V, L> {
                q: [[7; L]; V],
                scale: [3.0; L],
                extra: [5; L]
            };
            panels
        ];
        let mut got = want.clone();
        K::pack_weights(w, &mut want);
        // SAFETY: the CPU has AVX2 (checked by the caller).
        unsafe { K::pack_weights_x86(w, &mut got) };
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.q, w.q);
            assert_eq!(g.scale.map(f32::to_bits), w.scale.map(f32::to_bits));
            assert_eq!(g.extra, w.extra);
        }
    }

    /// Random blocks of `dtype` packed both ways, into panels of 8 and of 16 lanes.
    fn same_random<K: PackWeights<V>, const V: usize>(
        rng: &mut StdRng,
        dtype: TensorType,
        blocks: usize,
    ) where
        K::Block: Pod,
    {
        let w = random_blocks(rng, dtype, blocks);
        let w: &[K::Block] = cast_slice(w.bytes(), "w").unwrap();
        same::<K, V, 8>(w);
        same::<K, V, 16>(w);
    }

    #[test]
    fn avx2_packing_matches_the_scalar_one() {
        if hardware_level() < CpuLevel::Avx2 {
            return;
        }
        let mut rng = StdRng::seed_from_u64(19);
        for blocks in [1, 2, 3, 12, 13] {
            same_random::<Q4K, 8>(&mut rng, TensorType::Q4K, blocks);
            same_random::<Q5K, 8>(&mut rng, TensorType::Q5K, blocks);
            same_random::<Q6K, 4>(&mut rng, TensorType::Q6K, blocks);
        }
        for blocks in [1, 7, 8, 9, 96, 100] {
            same_random::<Q8_0, 8>(&mut rng, TensorType::Q8_0, blocks);
            same_random::<Q4_0, 8>(&mut rng, TensorType::Q4_0, blocks);
        }
    }
}
