//! One row of a matrix as f32 values: the embedding lookup, once per token. Scalar (a row is
//! nothing next to a matrix product), in ggml's order of operations, so that the values are
//! the ones llama.cpp (and candle) compute.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::blocks::*;
use super::reference::q6k_value;
use super::{unsupported, SUPPORTED};
use crate::error::{Error, Result};

/// `out` = the values of the blocks in `bytes` (one row of a `dtype` matrix, `out.len()`
/// values).
pub fn dequantize_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    if !SUPPORTED.contains(&dtype) {
        return Err(unsupported(dtype));
    }
    let block = dtype.block_size();
    let expected = (out.len() / block) * dtype.type_size();
    if !out.len().is_multiple_of(block) || bytes.len() != expected {
        return Err(Error::invalid_argument(format!(
            "dequantize: {} bytes for {} {dtype:?} values (expected {expected})",
            bytes.len(),
            out.len()
        )));
    }
    match dtype {
        GgmlDType::Q4K => each_block::<BlockQ4K>(bytes, out, q4k)?,
        GgmlDType::Q5K => each_block::<BlockQ5K>(bytes, out, q5k)?,
        GgmlDType::Q6K => each_block::<BlockQ6K>(bytes, out, q6k)?,
        GgmlDType::Q8_0 => each_block::<BlockQ8_0>(bytes, out, q8_0)?,
        GgmlDType::Q4_0 => each_block::<BlockQ4_0>(bytes, out, q4_0)?,
        GgmlDType::F16 => {
            let values = cast_slice::<f16>(bytes, "row")?;
            for (o, v) in out.iter_mut().zip(values) {
                *o = v.to_f32();
            }
        }
        GgmlDType::F32 => out.copy_from_slice(cast_slice::<f32>(bytes, "row")?),
        _ => return Err(unsupported(dtype)),
    }
    Ok(())
}

fn each_block<B: Pod>(bytes: &[u8], out: &mut [f32], f: fn(&B, &mut [f32])) -> Result<()> {
    let blocks = cast_slice::<B>(bytes, "row")?;
    let per_block = out.len() / blocks.len().max(1);
    for (b, out) in blocks.iter().zip(out.chunks_exact_mut(per_block)) {
        f(b, out);
    }
    Ok(())
}

fn q4k(b: &BlockQ4K, out: &mut [f32]) {
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

fn q5k(b: &BlockQ5K, out: &mut [f32]) {
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

fn q6k(b: &BlockQ6K, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (i, o) in out.iter_mut().enumerate() {
        *o = d * b.scales[i / 16] as f32 * q6k_value(b, i) as f32;
    }
}

fn q8_0(b: &BlockQ8_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (o, &q) in out.iter_mut().zip(&b.qs) {
        *o = q as f32 * d;
    }
}

fn q4_0(b: &BlockQ4_0, out: &mut [f32]) {
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

    use super::*;
    use crate::kernels::tests::{quantized, random_blocks};

    fn candle_row(dtype: GgmlDType, bytes: &[u8], cols: usize) -> Vec<f32> {
        let data = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype).unwrap();
        let tensor = QTensor::new(data, cols).unwrap().dequantize(&Device::Cpu);
        tensor.unwrap().to_vec1::<f32>().unwrap()
    }

    /// Equal to candle's dequantization (ggml's), bit for bit, on quantized rows and on random
    /// block bits.
    #[test]
    fn rows_equal_candles() {
        let mut rng = StdRng::seed_from_u64(5);
        for dtype in SUPPORTED {
            let cols = 3 * 256;
            let (quantized, _) = quantized(&mut rng, dtype, 1, cols);
            let random = random_blocks(&mut rng, dtype, cols / dtype.block_size());
            for bytes in [quantized.bytes(), random.bytes()] {
                let mut got = vec![0f32; cols];
                dequantize_row(dtype, bytes, &mut got).unwrap();
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
        assert!(dequantize_row(GgmlDType::Q4K, &[0u8; 100], &mut out).is_err());
        assert!(dequantize_row(GgmlDType::Q8_0, &[0u8; 34], &mut out[..33]).is_err());
        assert!(dequantize_row(GgmlDType::Q2K, &[0u8; 84], &mut out).is_err());
    }
}
