use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::blocks::*;
use super::*;
use crate::error::{Error, Result};
use crate::gguf::TensorType;
use crate::model::linear::candle_type;

/// `out[r] = dot(row r of W, x)`: [`Kernels::gemm`] of one row, through the entry for
/// `tensor_type` at `level`.
pub(super) fn gemv_at(
    level: CpuLevel,
    tensor_type: TensorType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    find(level, tensor_type)?.gemm(weights, rows, cols, x, 1, out)
}

/// [`Kernels::gemm`] of the entry for `tensor_type` at `level`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_at(
    level: CpuLevel,
    tensor_type: TensorType,
    weights: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    find(level, tensor_type)?.gemm(weights, rows, cols, x, n, out)
}

pub(super) const K_TYPES: [TensorType; 3] = [TensorType::Q4K, TensorType::Q5K, TensorType::Q6K];
pub(super) const SMALL_TYPES: [TensorType; 4] = [
    TensorType::Q8_0,
    TensorType::Q4_0,
    TensorType::F16,
    TensorType::F32,
];

pub(super) fn levels() -> Vec<CpuLevel> {
    let hw = hardware_level();
    CpuLevel::ALL.into_iter().filter(|&l| l <= hw).collect()
}

pub(super) fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    // Sum of uniforms: roughly normal, plus an occasional outlier as real activations have.
    (0..n)
        .map(|_| {
            let v: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum();
            if rng.random::<f32>() < 0.01 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

/// A 4-byte aligned copy of `bytes` (a Vec<u32>'s buffer), so tests never depend on the
/// allocator's alignment of a Vec<u8>.
pub(super) struct Aligned(Vec<u32>, usize);
impl Aligned {
    pub(super) fn new(bytes: &[u8]) -> Self {
        let mut v = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut v)[..bytes.len()].copy_from_slice(bytes);
        Aligned(v, bytes.len())
    }
    pub(super) fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u32, u8>(&self.0)[..self.1]
    }
}

/// The weights of a random (rows, cols) matrix in `dtype`, and their dequantized values.
pub(super) fn quantized(
    rng: &mut StdRng,
    dtype: TensorType,
    rows: usize,
    cols: usize,
) -> (Aligned, Vec<f32>) {
    let w = randn(rng, rows * cols);
    match dtype {
        TensorType::F32 => {
            let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            (Aligned::new(&bytes), w)
        }
        TensorType::F16 => {
            let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let bytes: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            (Aligned::new(&bytes), h.iter().map(|v| v.to_f32()).collect())
        }
        _ => {
            let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&t, candle_type(dtype)).unwrap();
            let bytes = q.data().unwrap();
            let deq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (Aligned::new(&bytes), deq)
        }
    }
}

/// Random bytes for `n` blocks of `dtype` with every scale field set to a modest finite f16:
/// all quant bit patterns occur, including the extremes.
pub(super) fn random_blocks(rng: &mut StdRng, dtype: TensorType, n: usize) -> Aligned {
    let size = dtype.type_size();
    let mut bytes: Vec<u8> = (0..n * size).map(|_| rng.random()).collect();
    let put = |rng: &mut StdRng, b: &mut [u8], at: usize| {
        let d = f16::from_f32(rng.random::<f32>() * 0.02 + 0.001);
        b[at..at + 2].copy_from_slice(&d.to_le_bytes());
    };
    for blk in bytes.chunks_exact_mut(size) {
        match dtype {
            TensorType::Q4K | TensorType::Q5K => {
                put(rng, blk, 0);
                put(rng, blk, 2);
            }
            TensorType::Q6K => put(rng, blk, 208),
            TensorType::Q8_0 | TensorType::Q4_0 => put(rng, blk, 0),
            TensorType::F16 => put(rng, blk, 0),
            TensorType::F32 => {
                let v = rng.random::<f32>() - 0.5;
                blk.copy_from_slice(&v.to_le_bytes());
            }
            _ => unreachable!(),
        }
    }
    Aligned::new(&bytes)
}

fn gemv_vec(level: CpuLevel, dtype: TensorType, w: &[u8], rows: usize, x: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows];
    gemv_at(level, dtype, w, rows, x.len(), x, &mut out).unwrap();
    out
}

/// SIMD against scalar: same integer sums, so only float summation order differs. Tolerance:
/// 1e-4 of |ref| plus 1e-4 of the output's mean magnitude (for outputs that cancel to ~0).
pub(super) fn assert_close_to_reference(what: &str, got: &[f32], want: &[f32]) {
    let mean = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 * (w.abs() + mean) + 1e-30;
        assert!(
            (g - w).abs() <= tol,
            "{what}: row {r}: got {g}, reference {w} (tol {tol})"
        );
    }
}

fn check_all_levels(dtype: TensorType, w: &[u8], rows: usize, x: &[f32]) -> Vec<f32> {
    let want = gemv_vec(CpuLevel::Scalar, dtype, w, rows, x);
    for level in levels() {
        let got = gemv_vec(level, dtype, w, rows, x);
        let what = format!("{dtype:?} {level} {rows}x{}", x.len());
        assert_close_to_reference(&what, &got, &want);
    }
    want
}

/// The activation quantization's error budget: per value at most one quantization step of its
/// block, d = max|x_block| / 127 (rounding gives d/2; Q8_0's f16 scale adds < 127 * d * 2^-11),
/// so |ref - exact| <= sum_i |w_i| * max|x_block(i)| / 127, plus float rounding.
fn assert_within_budget(what: &str, got: &[f32], deq: &[f32], x: &[f32], block: usize) {
    let cols = x.len();
    let step: Vec<f64> = x
        .chunks(block)
        .flat_map(|c| {
            let m = c.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
            std::iter::repeat_n(m, c.len())
        })
        .collect();
    for (r, &g) in got.iter().enumerate() {
        let row = &deq[r * cols..(r + 1) * cols];
        let exact: f64 = row.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64).sum();
        let abs: f64 = row
            .iter()
            .zip(x)
            .map(|(&w, &x)| (w as f64 * x as f64).abs())
            .sum();
        let budget: f64 = row
            .iter()
            .zip(&step)
            .map(|(&w, s)| w.abs() as f64 * s)
            .sum();
        let tol = budget + 1e-5 * abs + 1e-6;
        assert!(
            (g as f64 - exact).abs() <= tol,
            "{what}: row {r}: got {g}, exact {exact}, budget {tol}"
        );
    }
}

fn activation_block(dtype: TensorType) -> usize {
    match dtype {
        TensorType::Q4K | TensorType::Q5K | TensorType::Q6K => QK_K,
        TensorType::Q8_0 | TensorType::Q4_0 => QK8_0,
        _ => 1, // F16/F32: x is used as is, no quantization step
    }
}

fn shapes(dtype: TensorType) -> Vec<(usize, usize)> {
    let cols: &[usize] = if K_TYPES.contains(&dtype) {
        &[256, 512, 3072]
    } else {
        &[32, 96, 3072]
    };
    let mut v = vec![];
    for &r in &[1usize, 7, 33, 130] {
        for &c in cols {
            v.push((r, c));
        }
    }
    v
}

#[test]
fn levels_resolve_and_order() {
    assert!(CpuLevel::Scalar < CpuLevel::Avx2 && CpuLevel::Avx2 < CpuLevel::Avx512Vnni);
    assert_eq!(resolve(None, CpuLevel::Avx2).unwrap(), CpuLevel::Avx2);
    assert_eq!(resolve(Some(""), CpuLevel::Avx2).unwrap(), CpuLevel::Avx2);
    assert_eq!(
        resolve(Some("scalar"), CpuLevel::Avx512Vnni).unwrap(),
        CpuLevel::Scalar
    );
    assert_eq!(
        resolve(Some(" AVX2 "), CpuLevel::Avx512Vnni).unwrap(),
        CpuLevel::Avx2
    );
    // Clamped to the hardware.
    assert_eq!(
        resolve(Some("avx512vnni"), CpuLevel::Avx2).unwrap(),
        CpuLevel::Avx2
    );
    assert!(matches!(
        resolve(Some("sse9"), CpuLevel::Avx2),
        Err(Error::InvalidArgument(m)) if m.starts_with("PHI3_CPU")
    ));
    assert!(detect() <= hardware_level());
    assert_eq!(level(), level());
    for l in CpuLevel::ALL {
        assert_eq!(CpuLevel::parse(l.name()), Some(l));
    }
}

#[test]
fn simd_matches_reference_and_candle() {
    let mut rng = StdRng::seed_from_u64(1);
    for dtype in K_TYPES.into_iter().chain(SMALL_TYPES) {
        for (rows, cols) in shapes(dtype) {
            let (w, deq) = quantized(&mut rng, dtype, rows, cols);
            let x = randn(&mut rng, cols);
            let got = check_all_levels(dtype, w.bytes(), rows, &x);
            let what = format!("{dtype:?} {rows}x{cols}");
            assert_within_budget(&what, &got, &deq, &x, activation_block(dtype));
        }
    }
}

#[test]
fn simd_matches_reference_on_random_bits() {
    // Every quant bit pattern, not just the ones a quantizer produces.
    let mut rng = StdRng::seed_from_u64(2);
    for dtype in K_TYPES.into_iter().chain(SMALL_TYPES) {
        for (rows, cols) in [(5usize, 512usize), (37, 1024)] {
            let n = rows * cols / dtype.block_size();
            let w = random_blocks(&mut rng, dtype, n);
            let x = randn(&mut rng, cols);
            check_all_levels(dtype, w.bytes(), rows, &x);
        }
    }
}

#[test]
fn odd_lengths_for_plain_types() {
    // F16/F32 have no blocks: any column count, including ones no vector width divides.
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in [TensorType::F16, TensorType::F32] {
        for cols in [1usize, 7, 15, 17, 31, 33, 63, 65, 100] {
            let (w, deq) = quantized(&mut rng, dtype, 9, cols);
            let x = randn(&mut rng, cols);
            let got = check_all_levels(dtype, w.bytes(), 9, &x);
            assert_within_budget(&format!("{dtype:?} cols {cols}"), &got, &deq, &x, 1);
        }
    }
}

#[test]
fn zero_and_extreme_activations() {
    let mut rng = StdRng::seed_from_u64(4);
    for dtype in K_TYPES.into_iter().chain(SMALL_TYPES) {
        let cols = 512;
        let rows = 3;
        let (w, _) = quantized(&mut rng, dtype, rows, cols);
        // All zeros: exactly zero out.
        let out = check_all_levels(dtype, w.bytes(), rows, &vec![0.0; cols]);
        assert!(out.iter().all(|&v| v == 0.0), "{dtype:?}: {out:?}");
        // One spike per block, the rest tiny: quantizes to ±127 and zeros.
        let x: Vec<f32> = (0..cols)
            .map(|i| if i % 32 == 5 { -1e3 } else { 1e-6 })
            .collect();
        check_all_levels(dtype, w.bytes(), rows, &x);
    }
}

#[test]
fn q8_activation_quantizers() {
    let mut rng = StdRng::seed_from_u64(5);
    let x = randn(&mut rng, 512);
    let q = quantize_q8k(&x);
    for (b, xs) in q.iter().zip(x.chunks(QK_K)) {
        for (k, s) in b.bsums.iter().enumerate() {
            let want: i16 = b.qs[16 * k..16 * k + 16].iter().map(|&v| v as i16).sum();
            assert_eq!(*s, want);
        }
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(b.qs.iter().any(|&v| v.unsigned_abs() == 127));
        for (&v, &q) in xs.iter().zip(&b.qs) {
            assert!((v - q as f32 * b.d).abs() <= amax / 127.0 * 0.5001);
        }
    }
    let q = quantize_q8_0(&x);
    for (b, xs) in q.iter().zip(x.chunks(QK8_0)) {
        let d = b.d.to_f32();
        for (&v, &q) in xs.iter().zip(&b.qs) {
            assert!((v - q as f32 * d).abs() <= d * 0.6);
        }
    }
}

#[test]
fn scale_unpacking_agrees() {
    let mut rng = StdRng::seed_from_u64(6);
    for _ in 0..1000 {
        let q: [u8; 12] = rng.random();
        let (sc, mn) = unpack_scales_k4(&q);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], mn[j]));
        }
    }
}

#[test]
fn argument_errors() {
    let mut rng = StdRng::seed_from_u64(7);
    let (w, _) = quantized(&mut rng, TensorType::Q4K, 4, 256);
    let w = w.bytes();
    let x = vec![0.5f32; 256];
    let mut out = vec![0f32; 4];
    let inv = |r: crate::Result<()>, start: &str| match r {
        Err(Error::InvalidArgument(m)) => assert!(m.starts_with(start), "{m}"),
        other => panic!("expected InvalidArgument({start}...), got {other:?}"),
    };
    let q4k = TensorType::Q4K;
    for level in levels() {
        assert!(gemv_at(level, q4k, w, 4, 256, &x, &mut out).is_ok());
        inv(gemv_at(level, q4k, w, 4, 256, &x[..255], &mut out), "x");
        inv(gemv_at(level, q4k, w, 4, 256, &x, &mut out[..3]), "out");
        inv(gemv_at(level, q4k, w, 3, 256, &x, &mut out[..3]), "weights");
        inv(
            gemv_at(level, q4k, &w[..w.len() - 1], 4, 256, &x, &mut out),
            "weights",
        );
        let x100 = vec![0f32; 100];
        inv(gemv_at(level, q4k, w, 4, 100, &x100, &mut out), "cols");
        // Misaligned data: an error, not UB.
        let mut buf = vec![0u8; w.len() + 1];
        let off = if (buf.as_ptr() as usize).is_multiple_of(2) {
            1
        } else {
            0
        };
        buf[off..off + w.len()].copy_from_slice(w);
        inv(
            gemv_at(level, q4k, &buf[off..off + w.len()], 4, 256, &x, &mut out),
            "weights",
        );
        // Overflowing sizes.
        inv(gemv_at(level, q4k, w, usize::MAX, 256, &x, &mut []), "out");
        let mut big = vec![0f32; 1 << 20];
        inv(
            gemv_at(level, q4k, w, 1 << 20, 256, &x, &mut big),
            "weights",
        );
        // Unsupported types.
        for dtype in [
            TensorType::Q8K,
            TensorType::Q2K,
            TensorType::Q3K,
            TensorType::BF16,
        ] {
            assert!(matches!(
                gemv_at(level, dtype, w, 4, 256, &x, &mut out),
                Err(Error::UnsupportedModel { .. })
            ));
        }
        // Empty matrices.
        assert!(gemv_at(level, q4k, &[], 0, 256, &x, &mut []).is_ok());
        let mut o = vec![1f32; 3];
        assert!(gemv_at(level, q4k, &[], 3, 0, &[], &mut o).is_ok());
        assert_eq!(o, vec![0.0; 3]);
    }
    if hardware_level() < CpuLevel::Avx512Vnni {
        inv(
            gemv_at(CpuLevel::Avx512Vnni, q4k, w, 4, 256, &x, &mut out),
            "level",
        );
    }
    // gemv at the detected level works.
    gemv_at(level(), q4k, w, 4, 256, &x, &mut out).unwrap();
}

#[test]
fn fixture_tensors() {
    let path = crate::test_support::fixture("tiny-phi3-haiku-q4_k_m.gguf");
    let file = crate::gguf::GgufFile::open(&path).unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    let mut seen = std::collections::HashSet::new();
    for info in file.tensors() {
        if info.dims.len() != 2 || !types().any(|t| t == info.dtype) {
            continue;
        }
        let (cols, rows) = (info.dims[0], info.dims[1]);
        let data = file.tensor_data(info);
        let x = randn(&mut rng, cols);
        let got = check_all_levels(info.dtype, data, rows, &x);
        // Against candle's dequantization of the same bytes.
        let q = candle_core::quantized::QTensor::new(
            candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(data),
                &Device::Cpu,
                candle_type(info.dtype),
            )
            .unwrap(),
            (rows, cols),
        )
        .unwrap();
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_within_budget(&info.name, &got, &deq, &x, activation_block(info.dtype));
        seen.insert(info.dtype);
    }
    assert!(
        seen.contains(&TensorType::Q4K) && seen.contains(&TensorType::Q6K),
        "{seen:?}"
    );
}

/// GB/s of weights streamed per type and level for a 3072x8192 matrix (out of 8192-long x),
/// single-threaded and on the global rayon pool. Run in release:
/// `cargo test --release --lib kernels::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing() {
    let (rows, cols) = (3072usize, 8192usize);
    let mut rng = StdRng::seed_from_u64(9);
    let x = randn(&mut rng, cols);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    println!(
        "{rows}x{cols}, {} rayon threads; GB/s of weights (best of 5)",
        rayon::current_num_threads()
    );
    for dtype in K_TYPES.into_iter().chain(SMALL_TYPES) {
        let w = random_blocks(&mut rng, dtype, rows * cols / dtype.block_size());
        let w = w.bytes();
        let mut line = format!("{:>5}", format!("{dtype:?}"));
        for level in levels() {
            let mut out = vec![0f32; rows];
            let mut best = |threads_one: bool| {
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    if threads_one {
                        one.install(|| gemv_at(level, dtype, w, rows, cols, &x, &mut out))
                            .unwrap();
                    } else {
                        gemv_at(level, dtype, w, rows, cols, &x, &mut out).unwrap();
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                w.len() as f64 / best / 1e9
            };
            let (st, mt) = (best(true), best(false));
            line += &format!("  {level}: {st:6.2} (1t) {mt:6.2} (all)");
        }
        println!("{line}");
    }
}
