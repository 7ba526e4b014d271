//! ggml's quantized block layouts, byte for byte (`ggml/src/ggml-common.h`), and a checked view of
//! raw GGUF bytes as slices of them.
//!
//! GGUF is little-endian; so are the targets this crate builds for (x86_64, aarch64).

use half::f16;

use crate::error::{Error, Result};

/// Values per K-quant super-block.
pub const QK_K: usize = 256;
/// Values per Q8_0 / Q4_0 block.
pub const QK8_0: usize = 32;
pub const QK4_0: usize = 32;

/// 4.5 bits per weight: 8 sub-blocks of 32, 6-bit scales and mins, 4-bit quants.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// 5.5 bits per weight: as Q4_K plus one high bit per value in `qh`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 6.5625 bits per weight: 16 sub-blocks of 16, 8-bit signed scales, 6-bit quants (offset 32).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// The activations' side of the K-quant dot products.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    /// Sums of `qs` in groups of 16.
    pub bsums: [i16; QK_K / 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK8_0],
}

/// Value `l` is `qs[l] & 15` (l < 16) or `qs[l - 16] >> 4`, minus 8.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK4_0 / 2],
}

const _: () = {
    use std::mem::size_of;
    assert!(size_of::<BlockQ4K>() == 144);
    assert!(size_of::<BlockQ5K>() == 176);
    assert!(size_of::<BlockQ6K>() == 210);
    assert!(size_of::<BlockQ8K>() == 292);
    assert!(size_of::<BlockQ8_0>() == 34);
    assert!(size_of::<BlockQ4_0>() == 18);
};

/// Types every bit pattern of which is a valid value, with no padding.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}
/// Integers, f16 and f32 accept every bit pattern; the block structs are repr(C) over them with
/// no padding (their sizes, asserted above, are the sums of their fields).
macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: see the macro's comment.
        unsafe impl Pod for $t {}
    )*};
}
pod!(BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ4_0, f16, f32);

/// Views `bytes` as a slice of `T`. Errors (never panics) when the length is not a multiple of
/// `T`'s size or the address not a multiple of its alignment (2 for the blocks and f16, 4 for
/// f32; GGUF aligns tensor data to 32 bytes, so a memory map always passes).
pub fn cast_slice<'a, T: Pod>(bytes: &'a [u8], what: &str) -> Result<&'a [T]> {
    let size = std::mem::size_of::<T>();
    let align = std::mem::align_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::invalid_argument(format!(
            "{what}: {} bytes is not a whole number of {size}-byte elements",
            bytes.len()
        )));
    }
    if !(bytes.as_ptr() as usize).is_multiple_of(align) {
        return Err(Error::invalid_argument(format!(
            "{what}: data at {:p} is not aligned to {align} bytes",
            bytes.as_ptr()
        )));
    }
    // SAFETY: length and alignment checked above; T is Pod, so any bytes are a valid T; the
    // lifetime is that of `bytes`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block: 6 bits each, packed in 12 bytes.
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All 8 scales and 8 mins of a Q4_K/Q5_K block at once (word-wise, for the SIMD kernels).
#[inline]
pub fn unpack_scales_k4(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let scales_lo = u0 & KMASK1;
    let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mins_lo = u1 & KMASK1;
    let mins_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    sc[..4].copy_from_slice(&scales_lo.to_le_bytes());
    sc[4..].copy_from_slice(&scales_hi.to_le_bytes());
    mn[..4].copy_from_slice(&mins_lo.to_le_bytes());
    mn[4..].copy_from_slice(&mins_hi.to_le_bytes());
    (sc, mn)
}

/// ggml's `quantize_row_q8_K`: per 256 values, scale so that the value of largest magnitude maps
/// to -127, round to nearest (ties to even), and keep sums of 16.
pub fn quantize_q8k(x: &[f32]) -> Vec<BlockQ8K> {
    debug_assert!(x.len().is_multiple_of(QK_K));
    x.chunks_exact(QK_K)
        .map(|xs| {
            let mut b = BlockQ8K {
                d: 0.0,
                qs: [0; QK_K],
                bsums: [0; QK_K / 16],
            };
            let mut amax = 0f32;
            let mut max = 0f32;
            for &v in xs {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                return b;
            }
            let iscale = -127.0 / max;
            for (q, &v) in b.qs.iter_mut().zip(xs) {
                *q = (iscale * v).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
            for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                *s = qs.iter().map(|&q| q as i16).sum();
            }
            b.d = 1.0 / iscale;
            b
        })
        .collect()
}

/// ggml's `quantize_row_q8_0`: per 32 values, d = max|x| / 127 (stored as f16), q = round(x / d).
pub fn quantize_q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
    debug_assert!(x.len().is_multiple_of(QK8_0));
    let mut out = vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; QK8_0],
        };
        x.len() / QK8_0
    ];
    quantize_q8_0_into(x, &mut out);
    out
}

/// [`quantize_q8_0`] into `out` (one block per 32 values of `x`).
pub fn quantize_q8_0_into(x: &[f32], out: &mut [BlockQ8_0]) {
    debug_assert_eq!(x.len(), out.len() * QK8_0);
    for (xs, block) in x.chunks_exact(QK8_0).zip(out) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in block.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        block.d = f16::from_f32(d);
    }
}
