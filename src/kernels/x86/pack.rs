//! Weights packed into [`Panel`]s with AVX2, for the panel kernels of every x86 level: 8 scale
//! groups of 32 values, one vector each as gemv unpacks them (a Q4_K/Q5_K block's sub-blocks, or
//! 8 Q8_0/Q4_0 blocks), become 8 lanes of a panel by an 8 x 8 transpose of 32-bit words, where
//! the scalar packing (`panel::Kind::pack_weights`, the reference the tests hold this to) moves
//! them a byte at a time. Q6_K (groups of 16) packs with the scalar code.

use std::arch::x86_64::*;

use super::avx2::{load256, q4_0_values, q4k_values, q5k_values};
use crate::kernels::blocks::*;
use crate::kernels::panel::{
    clear_tail, lane, pack_k32_scales, pack_q4_0_scales, pack_q8_0_factors, Kind, Panel, Q4K, Q4_0,
    Q5K, Q6K, Q8_0,
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
            // SAFETY: the caller guarantees AVX2.
            unsafe { put_block(out, k, q4k_values(b)) };
            pack_k32_scales(out, k, (b.d, b.dmin), unpack_scales_k4(&b.scales));
        }
    }
}

impl PackWeights<8> for Q5K {
    unsafe fn pack_weights_x86<const L: usize>(w: &[BlockQ5K], out: &mut [Panel<8, L>]) {
        clear_tail(out);
        for (k, b) in w.iter().enumerate() {
            // SAFETY: the caller guarantees AVX2.
            unsafe { put_block(out, k, q5k_values(b)) };
            pack_k32_scales(out, k, (b.d, b.dmin), unpack_scales_k4(&b.scales));
        }
    }
}

impl PackWeights<4> for Q6K {}

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
    use crate::kernels::tests::random_blocks;
    use crate::kernels::{hardware_level, CpuLevel};
    use candle_core::quantized::GgmlDType;

    fn same<K: PackWeights<8>, const L: usize>(w: &[K::Block]) {
        let panels = (w.len() * K::GROUPS).div_ceil(L);
        // Garbage first: every byte must be written.
        let mut want = vec![
            Panel::<8, L> {
                q: [[7; L]; 8],
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

    #[test]
    fn avx2_packing_matches_the_scalar_one() {
        if hardware_level() < CpuLevel::Avx2 {
            return;
        }
        let mut rng = StdRng::seed_from_u64(19);
        for blocks in [1, 2, 3, 12, 13] {
            let w = random_blocks(&mut rng, GgmlDType::Q4K, blocks);
            let w: &[BlockQ4K] = cast_slice(w.bytes(), "w").unwrap();
            same::<Q4K, 8>(w);
            same::<Q4K, 16>(w);
            let w = random_blocks(&mut rng, GgmlDType::Q5K, blocks);
            let w: &[BlockQ5K] = cast_slice(w.bytes(), "w").unwrap();
            same::<Q5K, 8>(w);
            same::<Q5K, 16>(w);
        }
        for blocks in [1, 7, 8, 9, 96, 100] {
            let w = random_blocks(&mut rng, GgmlDType::Q8_0, blocks);
            let w: &[BlockQ8_0] = cast_slice(w.bytes(), "w").unwrap();
            same::<Q8_0, 8>(w);
            same::<Q8_0, 16>(w);
            let w = random_blocks(&mut rng, GgmlDType::Q4_0, blocks);
            let w: &[BlockQ4_0] = cast_slice(w.bytes(), "w").unwrap();
            same::<Q4_0, 8>(w);
            same::<Q4_0, 16>(w);
        }
    }
}
