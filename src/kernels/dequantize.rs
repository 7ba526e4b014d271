//! One row of a matrix as f32 values: the embedding lookup, once per token. Scalar (a row is
//! nothing next to a matrix product), in ggml's order of operations, so that the values are
//! the ones llama.cpp (and candle) compute.

use super::blocks::*;
use super::reference::q6k_value;

/// Each block of `w` dequantized by `f` into its share of `out` (as many values as `w` holds).
pub(super) fn each_block<B>(w: &[B], out: &mut [f32], f: fn(&B, &mut [f32])) {
    let per_block = out.len() / w.len().max(1);
    for (b, out) in w.iter().zip(out.chunks_exact_mut(per_block)) {
        f(b, out);
    }
}

pub(super) fn q4k(b: &BlockQ4K, out: &mut [f32]) {
    let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
    for j in 0..4 {
        let q = &b.qs[32 * j..32 * j + 32];
        for (half, shift) in [(0usize, 0u32), (1, 4)] {
            let (sc, m) = scale_min_k4(2 * j + half, &b.scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let out = &mut out[64 * j + 32 * half..][..32];
            for (o, &q) in out.iter_mut().zip(q) {
                *o = d1 * ((q >> shift) & 0xF) as f32 - m1;
            }
        }
    }
}

pub(super) fn q5k(b: &BlockQ5K, out: &mut [f32]) {
    let (d, min) = (b.d.to_f32(), b.dmin.to_f32());
    for j in 0..4 {
        let q = &b.qs[32 * j..32 * j + 32];
        for (half, shift) in [(0usize, 0u32), (1, 4)] {
            let sub = 2 * j + half;
            let (sc, m) = scale_min_k4(sub, &b.scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let out = &mut out[64 * j + 32 * half..][..32];
            for (l, o) in out.iter_mut().enumerate() {
                let value = ((q[l] >> shift) & 0xF) | (((b.qh[l] >> sub) & 1) << 4);
                *o = d1 * value as f32 - m1;
            }
        }
    }
}

pub(super) fn q6k(b: &BlockQ6K, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * b.scales[i / 16] as f32 * q6k_value(b, i) as f32;
    }
}

pub(super) fn q8_0(b: &BlockQ8_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (o, &q) in out.iter_mut().zip(&b.qs) {
        *o = q as f32 * d;
    }
}

pub(super) fn q4_0(b: &BlockQ4_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (l, &q) in b.qs.iter().enumerate() {
        out[l] = ((q & 0xF) as i32 - 8) as f32 * d;
        out[l + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use candle_core::quantized::{QStorage, QTensor};
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use crate::gguf::TensorType;
    use crate::kernels::tests::{quantized, random_blocks};
    use crate::kernels::{find, types, CpuLevel};
    use crate::model::linear::candle_type;

    fn candle_row(dtype: TensorType, bytes: &[u8], cols: usize) -> Vec<f32> {
        let data =
            QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, candle_type(dtype)).unwrap();
        let tensor = QTensor::new(data, cols).unwrap().dequantize(&Device::Cpu);
        tensor.unwrap().to_vec1::<f32>().unwrap()
    }

    /// Equal to candle's dequantization (ggml's), bit for bit, on quantized rows and on random
    /// block bits.
    #[test]
    fn rows_equal_candles() {
        let mut rng = StdRng::seed_from_u64(5);
        for dtype in types() {
            let kernels = find(CpuLevel::Scalar, dtype).unwrap();
            let cols = 3 * 256;
            let (quantized, _) = quantized(&mut rng, dtype, 1, cols);
            let random = random_blocks(&mut rng, dtype, cols / dtype.block_size());
            for bytes in [quantized.bytes(), random.bytes()] {
                let mut got = vec![0f32; cols];
                kernels.dequantize_row(bytes, 1, 0, &mut got).unwrap();
                let want = candle_row(dtype, bytes, cols);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{dtype:?} value {i}: {g} against candle's {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_and_types_are_errors() {
        let mut out = vec![0f32; 256];
        let kernels = |t| find(CpuLevel::Scalar, t).unwrap();
        let q4k = kernels(TensorType::Q4K);
        assert!(q4k.dequantize_row(&[0u8; 100], 1, 0, &mut out).is_err());
        assert!(q4k.dequantize_row(&[0u8; 144], 1, 1, &mut out).is_err());
        let q8_0 = kernels(TensorType::Q8_0);
        assert!(q8_0
            .dequantize_row(&[0u8; 34], 1, 0, &mut out[..33])
            .is_err());
        // A type without kernels has no entry to dequantize through.
        assert!(find(CpuLevel::Scalar, TensorType::Q2K).is_err());
    }
}
