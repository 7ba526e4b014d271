use std::borrow::Cow;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[cfg(target_arch = "x86_64")]
use super::blocks::{quantize_q8_0, quantize_q8k, QK8_0, QK_K};
use super::tests::{
    assert_close_to_reference, gemm_at, gemv_at, levels, quantized, randn, random_blocks, Aligned,
    K_TYPES, SMALL_TYPES,
};
use super::*;
use crate::error::Error;
use crate::gguf::TensorType;
use crate::model::linear::candle_type;

fn all_types() -> impl Iterator<Item = TensorType> {
    K_TYPES.into_iter().chain(SMALL_TYPES)
}

fn gemm_vec(
    level: CpuLevel,
    dtype: TensorType,
    w: &[u8],
    rows: usize,
    x: &[f32],
    n: usize,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * rows];
    gemm_at(level, dtype, w, rows, x.len() / n, x, n, &mut out).unwrap();
    out
}

/// gemv on each row of `x` in turn.
fn gemv_rows(
    level: CpuLevel,
    dtype: TensorType,
    w: &[u8],
    rows: usize,
    x: &[f32],
    n: usize,
) -> Vec<f32> {
    let cols = x.len() / n;
    let mut out = vec![f32::NAN; n * rows];
    for (x, out) in x.chunks(cols).zip(out.chunks_mut(rows)) {
        gemv_at(level, dtype, w, rows, cols, x, out).unwrap();
    }
    out
}

/// Whether gemm runs gemv's own kernels at `level`, and so must agree bit for bit.
fn same_kernels(level: CpuLevel, dtype: TensorType, n: usize) -> bool {
    level == CpuLevel::Scalar
        || matches!(dtype, TensorType::F16 | TensorType::F32)
        || n < find(level, dtype).unwrap().packed_min_rows
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: output {k}: got {g}, gemv {w}"
        );
    }
}

/// gemm against gemv row by row at every level: bit for bit where gemm runs gemv's kernels,
/// else within float summation order.
fn check(dtype: TensorType, w: &[u8], rows: usize, x: &[f32], n: usize) {
    for level in levels() {
        let want = gemv_rows(level, dtype, w, rows, x, n);
        let got = gemm_vec(level, dtype, w, rows, x, n);
        let what = format!("{dtype:?} {level} rows {rows} cols {} n {n}", x.len() / n);
        if same_kernels(level, dtype, n) {
            assert_bits_eq(&what, &got, &want);
        } else {
            for (i, (g, w)) in got.chunks(rows).zip(want.chunks(rows)).enumerate() {
                assert_close_to_reference(&format!("{what} x row {i}"), g, w);
            }
        }
    }
}

fn cols_for(dtype: TensorType) -> &'static [usize] {
    match dtype {
        TensorType::Q4K | TensorType::Q5K | TensorType::Q6K => &[256, 3072 + 256],
        TensorType::Q8_0 | TensorType::Q4_0 => &[32, 96, 256, 3072 + 256],
        _ => &[7, 100, 256, 3072 + 256],
    }
}

/// (rows, n): n from 1 to past several activation groups, rows past one tile and odd.
const SHAPES: [(usize, usize); 8] = [
    (33, 1),
    (33, 2),
    (7, 3),
    (70, 5),
    (1, 4),
    (9, 11),
    (33, 17),
    (35, 67),
];

#[test]
fn gemm_matches_gemv_row_by_row() {
    let mut rng = StdRng::seed_from_u64(11);
    for dtype in all_types() {
        for &cols in cols_for(dtype) {
            for (rows, n) in SHAPES {
                let (w, _) = quantized(&mut rng, dtype, rows, cols);
                let x = randn(&mut rng, n * cols);
                check(dtype, w.bytes(), rows, &x, n);
            }
        }
    }
}

#[test]
fn gemm_matches_gemv_on_random_bits() {
    // Every quant bit pattern, not just the ones a quantizer produces; 8448 columns take
    // AVX-512 over K in chunks.
    let mut rng = StdRng::seed_from_u64(12);
    for dtype in all_types() {
        for (rows, cols, n) in [(19usize, 512usize, 5usize), (9, 3328, 18), (5, 8448, 6)] {
            let w = random_blocks(&mut rng, dtype, rows * cols / dtype.block_size());
            let x = randn(&mut rng, n * cols);
            check(dtype, w.bytes(), rows, &x, n);
        }
    }
}

/// Random quant bits with every `d` and `dmin` 1.
fn unit_scale_blocks(rng: &mut StdRng, dtype: TensorType, blocks: usize) -> Aligned {
    let bytes = (0..blocks * dtype.type_size())
        .map(|_| rng.random())
        .collect();
    with_unit_scales(dtype, bytes)
}

/// `bytes`, blocks of `dtype`, with every `d` and `dmin` set to 1.
fn with_unit_scales(dtype: TensorType, mut bytes: Vec<u8>) -> Aligned {
    let at: &[usize] = match dtype {
        TensorType::Q4K | TensorType::Q5K => &[0, 2],
        TensorType::Q6K => &[208],
        _ => &[0],
    };
    for blk in bytes.chunks_exact_mut(dtype.type_size()) {
        for &at in at {
            blk[at..at + 2].copy_from_slice(&f16::ONE.to_le_bytes());
        }
    }
    Aligned::new(&bytes)
}

#[test]
fn gemm_extreme_values_do_not_overflow() {
    // Every weight at its largest magnitude (all bits set; Q8_0 at -128) against activations
    // that all quantize to 127 or -127: the 16-bit sums of the AVX2 panel kernels (several
    // `vpmaddubsw` added before widening) at their bound.
    let (rows, cols, n) = (5, 512, 17);
    for dtype in all_types().filter(|t| t.block_size() > 1) {
        let fill = if dtype == TensorType::Q8_0 {
            0x80
        } else {
            0xFF
        };
        let blocks = rows * cols / dtype.block_size();
        let w = with_unit_scales(dtype, vec![fill; blocks * dtype.type_size()]);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| if (i / cols) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        check(dtype, w.bytes(), rows, &x, n);
    }
}

#[test]
fn gemm_exact_when_the_arithmetic_is() {
    // Unit weight scales, and activations of small integers with ±127 in every block of 32 so
    // that their scales are ±1 too: every float is then an integer well under 2^24, so every
    // summation order gives the same bits, and gemm must match gemv exactly at every level,
    // panel kernels (n >= packed_min_rows) included.
    let mut rng = StdRng::seed_from_u64(13);
    let (rows, cols, n) = (37, 512, 17);
    for dtype in all_types().filter(|t| t.block_size() > 1) {
        let w = unit_scale_blocks(&mut rng, dtype, rows * cols / dtype.block_size());
        let x: Vec<f32> = (0..n * cols)
            .map(|i| match i % 32 {
                0 => 127.0,
                1 => -127.0,
                _ => rng.random_range(-40..=40) as f32,
            })
            .collect();
        let want = gemv_rows(CpuLevel::Scalar, dtype, w.bytes(), rows, &x, n);
        for level in levels() {
            let got = gemm_vec(level, dtype, w.bytes(), rows, &x, n);
            assert_bits_eq(&format!("{dtype:?} {level}"), &got, &want);
        }
    }
}

/// The AVX-512 path's own activation quantizers against the ones gemv uses: bit for bit, on
/// random blocks and on ties, NaN, infinities, zeros and a largest magnitude of both signs.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_quantizers_match_gemvs() {
    use super::x86::avx512_gemm::{quantize_q8_0_block, quantize_q8k_block, quantize_q8k_row};
    if hardware_level() < CpuLevel::Avx512Vnni {
        return;
    }
    let mut rng = StdRng::seed_from_u64(18);
    let mut blocks: Vec<Vec<f32>> = (0..200).map(|_| randn(&mut rng, QK_K)).collect();
    let special = [
        0.5,
        -0.5,
        1.5,
        2.5,
        -2.5,
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        -f32::INFINITY,
    ];
    for k in 0..40 {
        // Ties: integers and halves against a largest magnitude of 127 (scale -1 or 1).
        let mut b: Vec<f32> = (0..QK_K)
            .map(|_| rng.random_range(-254..=254) as f32 / 2.0)
            .collect();
        b[rng.random_range(0..QK_K)] = if k % 2 == 0 { 127.0 } else { -127.0 };
        blocks.push(b);
        // A few special values in a random block.
        let mut b = randn(&mut rng, QK_K);
        for _ in 0..3 {
            b[rng.random_range(0..QK_K)] = special[rng.random_range(0..special.len())];
        }
        blocks.push(b);
    }
    // Both signs of the largest magnitude: the first one decides the sign of the scale.
    let mut b = vec![0.25f32; QK_K];
    (b[3], b[9]) = (-2.0, 2.0);
    blocks.push(b);
    blocks.push(vec![0.0; QK_K]);
    blocks.push(vec![f32::NAN; QK_K]);
    let row = blocks.concat();
    // SAFETY: the CPU has AVX-512 (checked above).
    let got = unsafe { quantize_q8k_row(&row) };
    for (got, want) in got.iter().zip(quantize_q8k(&row)) {
        assert_eq!(got.d.to_bits(), want.d.to_bits());
        assert_eq!((got.qs, got.bsums), (want.qs, want.bsums));
    }
    for x in &blocks {
        let want = &quantize_q8k(x)[0];
        let mut q = [0u8; QK_K];
        // SAFETY: the CPU has AVX-512 (checked above).
        let d = unsafe { quantize_q8k_block(x, &mut q) };
        assert_eq!(d.to_bits(), want.d.to_bits(), "{x:?}");
        assert!(q.iter().zip(&want.qs).all(|(&a, &b)| a as i8 == b), "{x:?}");
        for (x, want) in x.chunks(QK8_0).zip(quantize_q8_0(x)) {
            let mut q = [0u8; QK8_0];
            // SAFETY: as above.
            let d = unsafe { quantize_q8_0_block(x, &mut q) };
            assert_eq!(d.to_bits(), want.d.to_bits(), "{x:?}");
            assert!(q.iter().zip(&want.qs).all(|(&a, &b)| a as i8 == b), "{x:?}");
        }
    }
}

#[test]
fn gemm_zero_and_extreme_activations() {
    let mut rng = StdRng::seed_from_u64(14);
    for dtype in all_types() {
        let (rows, cols, n) = (5, 512, 6);
        let (w, _) = quantized(&mut rng, dtype, rows, cols);
        for level in levels() {
            let out = gemm_vec(level, dtype, w.bytes(), rows, &vec![0.0; n * cols], n);
            assert!(out.iter().all(|&v| v == 0.0), "{dtype:?} {level}: {out:?}");
        }
        // One spike per block, the rest tiny: quantizes to ±127 and zeros.
        let x: Vec<f32> = (0..n * cols)
            .map(|i| if i % 32 == 5 { -1e3 } else { 1e-6 })
            .collect();
        check(dtype, w.bytes(), rows, &x, n);
    }
}

#[test]
fn gemm_fixture_tensors() {
    let path = crate::test_support::fixture("tiny-phi3-haiku-q4_k_m.gguf");
    let file = crate::gguf::GgufFile::open(&path).unwrap();
    let mut rng = StdRng::seed_from_u64(15);
    let mut seen = std::collections::HashSet::new();
    for info in file.tensors() {
        if info.dims.len() != 2 || !types().any(|t| t == info.dtype) || info.dims[1] > 4096 {
            continue;
        }
        let (cols, rows) = (info.dims[0], info.dims[1]);
        let n = 7;
        let x = randn(&mut rng, n * cols);
        check(info.dtype, file.tensor_data(info), rows, &x, n);
        seen.insert(info.dtype);
    }
    assert!(
        seen.contains(&TensorType::Q4K) && seen.contains(&TensorType::Q6K),
        "{seen:?}"
    );
}

#[test]
fn gemm_argument_errors() {
    let mut rng = StdRng::seed_from_u64(16);
    let (w, _) = quantized(&mut rng, TensorType::Q4K, 4, 256);
    let w = w.bytes();
    let x = vec![0.5f32; 3 * 256];
    let mut out = vec![0f32; 3 * 4];
    let inv = |r: crate::Result<()>, start: &str| match r {
        Err(Error::InvalidArgument(m)) => assert!(m.starts_with(start), "{m}"),
        other => panic!("expected InvalidArgument({start}...), got {other:?}"),
    };
    let q4k = TensorType::Q4K;
    for level in levels() {
        assert!(gemm_at(level, q4k, w, 4, 256, &x, 3, &mut out).is_ok());
        inv(gemm_at(level, q4k, w, 4, 256, &x[..767], 3, &mut out), "x");
        inv(gemm_at(level, q4k, w, 4, 256, &x, 2, &mut out), "x");
        inv(gemm_at(level, q4k, w, 4, 256, &x, 3, &mut out[..11]), "out");
        inv(
            gemm_at(level, q4k, w, 3, 256, &x, 3, &mut out[..9]),
            "weights",
        );
        inv(
            gemm_at(level, q4k, &w[..w.len() - 1], 4, 256, &x, 3, &mut out),
            "weights",
        );
        let x100 = vec![0f32; 300];
        inv(gemm_at(level, q4k, w, 4, 100, &x100, 3, &mut out), "cols");
        // Misaligned data: an error, not UB.
        let mut buf = vec![0u8; w.len() + 1];
        let off = usize::from((buf.as_ptr() as usize).is_multiple_of(2));
        buf[off..off + w.len()].copy_from_slice(w);
        inv(
            gemm_at(
                level,
                q4k,
                &buf[off..off + w.len()],
                4,
                256,
                &x,
                3,
                &mut out,
            ),
            "weights",
        );
        // Overflowing sizes.
        inv(
            gemm_at(level, q4k, w, 4, 256, &x, usize::MAX, &mut out),
            "x",
        );
        inv(
            gemm_at(level, q4k, w, usize::MAX, 256, &x, 3, &mut out),
            "out",
        );
        // Unsupported types.
        for dtype in [TensorType::Q8K, TensorType::Q2K, TensorType::BF16] {
            assert!(matches!(
                gemm_at(level, dtype, w, 4, 256, &x, 3, &mut out),
                Err(Error::UnsupportedModel { .. })
            ));
        }
        // Empty products.
        assert!(gemm_at(level, q4k, w, 4, 256, &[], 0, &mut []).is_ok());
        assert!(gemm_at(level, q4k, &[], 0, 256, &x, 3, &mut []).is_ok());
        let mut o = vec![1f32; 6];
        assert!(gemm_at(level, q4k, &[], 3, 0, &[], 2, &mut o).is_ok());
        assert_eq!(o, vec![0.0; 6]);
    }
    if hardware_level() < CpuLevel::Avx512Vnni {
        inv(
            gemm_at(CpuLevel::Avx512Vnni, q4k, w, 4, 256, &x, 3, &mut out),
            "level",
        );
    }
    // gemm at the detected level works.
    gemm_at(level(), q4k, w, 4, 256, &x, 3, &mut out).unwrap();
}

/// Prefill speed on Phi-3-mini's matrices: for n = 512 activation rows (or `GEMM_TIMING_N`) on 2 threads, per level,
/// the time and GOPS of each layer matrix for gemm and for gemv row by row (timed on at most 64
/// rows and scaled), and the tokens/s of 32 layers of the four; then the same for candle's `QMatMul`
/// (today's prefill; its own thread pool, one thread per core). Random blocks (valid scales).
/// Run in release: `cargo test --release --lib kernels::gemm_tests::gemm_timing -- --ignored
/// --nocapture` (`GEMM_TIMING_TYPE`: all four of one weight type).
#[test]
#[ignore]
fn gemm_timing() {
    // GEMM_TIMING_N: the activation rows (decoding streams' batches are a few).
    let n = std::env::var("GEMM_TIMING_N").map_or(512, |v| v.parse().unwrap());
    // GEMM_TIMING_TYPE (q4_0, q8_0, q4_k, q5_k, q6_k): every matrix of that type, instead of
    // Q4_K_M's mix.
    let only = std::env::var("GEMM_TIMING_TYPE")
        .ok()
        .map(|t| match t.as_str() {
            "q4_0" => TensorType::Q4_0,
            "q8_0" => TensorType::Q8_0,
            "q4_k" => TensorType::Q4K,
            "q5_k" => TensorType::Q5K,
            "q6_k" => TensorType::Q6K,
            other => panic!("GEMM_TIMING_TYPE: {other:?} is not q4_0, q8_0, q4_k, q5_k or q6_k"),
        });
    let layers = 32.0;
    let mats = [
        ("qkv", TensorType::Q4K, 9216, 3072),
        ("attn_output", TensorType::Q4K, 3072, 3072),
        ("ffn_up", TensorType::Q4K, 16384, 3072),
        ("ffn_down", TensorType::Q6K, 3072, 8192),
    ]
    .map(|(name, dtype, rows, cols)| (name, only.unwrap_or(dtype), rows, cols));
    let mut rng = StdRng::seed_from_u64(17);
    let data: Vec<_> = mats
        .iter()
        .map(|&(_, dtype, rows, cols)| {
            let w = random_blocks(&mut rng, dtype, rows * cols / dtype.block_size());
            (w, randn(&mut rng, n * cols))
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let best = |runs: usize, f: &mut (dyn FnMut() + Send)| {
        (0..runs)
            .map(|_| {
                let t = std::time::Instant::now();
                pool.install(&mut *f);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    println!("n = {n}, 2 threads; best of 3 (gemv: of 2, on at most 64 rows, scaled to {n})");
    for level in levels().into_iter().filter(|&l| l > CpuLevel::Scalar) {
        let (mut sum_gemm, mut sum_gemv) = (0.0, 0.0);
        for ((name, dtype, rows, cols), (w, x)) in mats.iter().zip(&data) {
            let (w, (rows, cols)) = (w.bytes(), (*rows, *cols));
            let mut out = vec![0f32; n * rows];
            let t_gemm = best(3, &mut || {
                gemm_at(level, *dtype, w, rows, cols, x, n, &mut out).unwrap()
            });
            let t_gemv = best(2, &mut || {
                for (x, out) in x.chunks(cols).zip(out.chunks_mut(rows)).take(64) {
                    gemv_at(level, *dtype, w, rows, cols, x, out).unwrap();
                }
            }) * n as f64
                / n.min(64) as f64;
            let gops = |t: f64| 2.0 * (rows * cols * n) as f64 / t / 1e9;
            println!(
                "{level:>10} {name:>11} {dtype:?} {rows}x{cols}: gemm {:7.1} ms {:6.1} GOPS | \
                 gemv {:7.1} ms {:6.1} GOPS",
                t_gemm * 1e3,
                gops(t_gemm),
                t_gemv * 1e3,
                gops(t_gemv)
            );
            sum_gemm += t_gemm;
            sum_gemv += t_gemv;
        }
        println!(
            "{level:>10} 32 layers: gemm {:.1} tokens/s, gemv {:.1} tokens/s",
            n as f64 / (layers * sum_gemm),
            n as f64 / (layers * sum_gemv)
        );
    }
    let mut sum = 0.0;
    for ((name, dtype, rows, cols), (w, x)) in mats.iter().zip(&data) {
        let (rows, cols) = (*rows, *cols);
        let storage =
            QStorage::from_data(Cow::Borrowed(w.bytes()), &Device::Cpu, candle_type(*dtype))
                .unwrap();
        let mm = QMatMul::from_qtensor(QTensor::new(storage, (rows, cols)).unwrap()).unwrap();
        let x = Tensor::from_slice(x, (n, cols), &Device::Cpu).unwrap();
        let t = best(3, &mut || {
            mm.forward(&x).unwrap();
        });
        let gops = 2.0 * (rows * cols * n) as f64 / t / 1e9;
        println!(
            "{:>10} {name:>11} {dtype:?} {rows}x{cols}: QMatMul {:7.1} ms {gops:6.1} GOPS",
            "candle",
            t * 1e3
        );
        sum += t;
    }
    println!(
        "{:>10} 32 layers: QMatMul {:.1} tokens/s",
        "candle",
        n as f64 / (layers * sum)
    );
}
