//! Scalar dot products, written for clarity: one weight row (a slice of blocks) against the
//! quantized activations. The SIMD kernels must agree with these up to float summation order.

use half::f16;

use super::blocks::*;

pub fn dot_q4k(w: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in w.iter().zip(y) {
        let (mut qsum, mut msum) = (0i32, 0i32);
        // Four chunks of 64 values: low nibbles are the first 32, high nibbles the next 32.
        for j in 0..4 {
            let q = &b.qs[32 * j..32 * j + 32];
            let ys = &a.qs[64 * j..64 * j + 64];
            for (half, shift) in [(0usize, 0u32), (1, 4)] {
                let (sc, m) = scale_min_k4(2 * j + half, &b.scales);
                let ys = &ys[32 * half..32 * half + 32];
                let dot: i32 = q
                    .iter()
                    .zip(ys)
                    .map(|(&q, &y)| ((q >> shift) & 0xF) as i32 * y as i32)
                    .sum();
                let ysum: i32 = ys.iter().map(|&y| y as i32).sum();
                qsum += sc as i32 * dot;
                msum += m as i32 * ysum;
            }
        }
        sum += a.d * (b.d.to_f32() * qsum as f32 - b.dmin.to_f32() * msum as f32);
    }
    sum
}

pub fn dot_q5k(w: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in w.iter().zip(y) {
        let (mut qsum, mut msum) = (0i32, 0i32);
        for j in 0..4 {
            let q = &b.qs[32 * j..32 * j + 32];
            let ys = &a.qs[64 * j..64 * j + 64];
            for (half, shift) in [(0usize, 0u32), (1, 4)] {
                let sub = 2 * j + half;
                let (sc, m) = scale_min_k4(sub, &b.scales);
                let ys = &ys[32 * half..32 * half + 32];
                let dot: i32 = (0..32)
                    .map(|l| {
                        let lo = (q[l] >> shift) & 0xF;
                        let hi = (b.qh[l] >> sub) & 1;
                        (lo | (hi << 4)) as i32 * ys[l] as i32
                    })
                    .sum();
                let ysum: i32 = ys.iter().map(|&y| y as i32).sum();
                qsum += sc as i32 * dot;
                msum += m as i32 * ysum;
            }
        }
        sum += a.d * (b.d.to_f32() * qsum as f32 - b.dmin.to_f32() * msum as f32);
    }
    sum
}

/// The 6-bit value `i` (0..256) of a Q6_K block, offset removed: -32..=31.
#[inline]
pub fn q6k_value(b: &BlockQ6K, i: usize) -> i32 {
    let (n, r) = (i / 128, i % 128);
    let (quarter, l) = (r / 32, r % 32);
    let ql = &b.ql[64 * n..64 * n + 64];
    let qh = b.qh[32 * n + l];
    let lo = match quarter {
        0 => ql[l] & 0xF,
        1 => ql[l + 32] & 0xF,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    let hi = (qh >> (2 * quarter)) & 3;
    (lo | (hi << 4)) as i32 - 32
}

pub fn dot_q6k(w: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in w.iter().zip(y) {
        let isum: i32 = (0..QK_K)
            .map(|i| b.scales[i / 16] as i32 * q6k_value(b, i) * a.qs[i] as i32)
            .sum();
        sum += a.d * b.d.to_f32() * isum as f32;
    }
    sum
}

pub fn dot_q8_0(w: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in w.iter().zip(y) {
        let isum: i32 =
            b.qs.iter()
                .zip(&a.qs)
                .map(|(&q, &y)| q as i32 * y as i32)
                .sum();
        sum += b.d.to_f32() * a.d.to_f32() * isum as f32;
    }
    sum
}

pub fn dot_q4_0(w: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in w.iter().zip(y) {
        let isum: i32 = (0..16)
            .map(|l| {
                let lo = (b.qs[l] & 0xF) as i32 - 8;
                let hi = (b.qs[l] >> 4) as i32 - 8;
                lo * a.qs[l] as i32 + hi * a.qs[l + 16] as i32
            })
            .sum();
        sum += b.d.to_f32() * a.d.to_f32() * isum as f32;
    }
    sum
}

pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
}

pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(w, x)| w * x).sum()
}
