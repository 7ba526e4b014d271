//! Q4_K weights of 16 rows interleaved, made when a model loads (as ik_llama.cpp's `_R4`/`_R8`
//! types are): block k of rows `16g..16g + 16` becomes one [`BlockQ4Kx16`]. A 512-bit vector
//! then holds four quant bytes of each of the 16 rows, so `vpdpbusd` with one activation's four
//! values broadcast adds into each row's own lane, and the sub-block scales apply to 16 rows with
//! one multiply-add: no per-row folding of lanes, and no per-row scale work, whatever the number
//! of activation rows (`x86::avx512_x16`). Lossless: [`BlockQ4Kx16::row`] gives back each row's
//! block, byte for byte.

use half::f16;
use rayon::prelude::*;

use super::blocks::{cast_slice, scale_min_k4, BlockQ4K, Pod, QK_K};
use super::dequantize;
use crate::error::Result;

/// Weight rows per interleaved group.
pub const ROWS: usize = 16;

/// Block k of 16 Q4_K rows. 2368 bytes against 16 x 144 = 2304: the scales and mins are kept a
/// byte each (not 6 bits), so that a row group's are read with one zero-extension each.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4Kx16 {
    pub d: [f16; ROWS],
    pub dmin: [f16; ROWS],
    /// `scales[j][r]`: sub-block j's scale in row r.
    pub scales: [[u8; ROWS]; 8],
    /// `mins[i][r]`: row r's mins of sub-blocks 2i and 2i+1, side by side (an i16 pair once
    /// zero-extended).
    pub mins: [[[u8; 2]; ROWS]; 4],
    /// `qs[c][r]`: bytes `4c..4c + 4` of row r's `qs`; their low nibbles are values `64(c / 8)
    /// + 4(c % 8)..` (sub-block `2(c / 8)`), their high nibbles the 32 after them.
    pub qs: [[[u8; 4]; ROWS]; QK_K / 8],
}

const _: () = assert!(size_of::<BlockQ4Kx16>() == 2368);

// SAFETY: integers and f16 accept every bit pattern; the fields' sizes add up to the struct's
// (asserted above), so there is no padding.
unsafe impl Pod for BlockQ4Kx16 {}

impl BlockQ4Kx16 {
    /// Block k of the 16 rows `rows[r]` (each that row's blocks).
    pub fn new(rows: &[&[BlockQ4K]; ROWS], k: usize) -> Self {
        let mut b = Self {
            d: [f16::ZERO; ROWS],
            dmin: [f16::ZERO; ROWS],
            scales: [[0; ROWS]; 8],
            mins: [[[0; 2]; ROWS]; 4],
            qs: [[[0; 4]; ROWS]; QK_K / 8],
        };
        for (r, row) in rows.iter().enumerate() {
            let src = &row[k];
            b.d[r] = src.d;
            b.dmin[r] = src.dmin;
            for j in 0..8 {
                let (scale, min) = scale_min_k4(j, &src.scales);
                b.scales[j][r] = scale;
                b.mins[j / 2][r][j % 2] = min;
            }
            for (c, chunk) in src.qs.chunks_exact(4).enumerate() {
                b.qs[c][r].copy_from_slice(chunk);
            }
        }
        b
    }

    /// Row r's Q4_K block, as it was.
    pub fn row(&self, r: usize) -> BlockQ4K {
        let sc: [u8; 8] = std::array::from_fn(|j| self.scales[j][r]);
        let mn: [u8; 8] = std::array::from_fn(|j| self.mins[j / 2][r][j % 2]);
        // The inverse of `scale_min_k4`: sub-blocks 0-3 in the low 6 bits of bytes 0-7, the
        // low nibbles of 4-7 in bytes 8-11, their high 2 bits in the top of bytes 0-7.
        let mut scales = [0u8; 12];
        for j in 0..4 {
            scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            scales[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            scales[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
        }
        let mut qs = [0u8; QK_K / 2];
        for (c, chunk) in qs.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&self.qs[c][r]);
        }
        BlockQ4K {
            d: self.d[r],
            dmin: self.dmin[r],
            scales,
            qs,
        }
    }
}

/// A matrix of Q4_K rows of `bpr` blocks (a multiple of [`ROWS`] rows) interleaved, group by
/// group in parallel: group g's blocks lie back to back from `g * bpr`.
pub fn interleave(w: &[BlockQ4K], bpr: usize) -> Vec<BlockQ4Kx16> {
    assert!(bpr > 0 && w.len().is_multiple_of(bpr * ROWS));
    let blocks = w.len() / ROWS;
    let mut out = Vec::with_capacity(blocks);
    huge_pages(out.spare_capacity_mut());
    out.spare_capacity_mut()
        .par_chunks_mut(bpr)
        .zip(w.par_chunks_exact(bpr * ROWS))
        .for_each(|(out, group)| {
            let rows: [&[BlockQ4K]; ROWS] = std::array::from_fn(|r| &group[r * bpr..][..bpr]);
            for (k, block) in out.iter_mut().enumerate() {
                block.write(BlockQ4Kx16::new(&rows, k));
            }
        });
    // SAFETY: the chunks of `bpr` cover all `blocks` slots (`w` holds `blocks * ROWS` blocks,
    // asserted), and each was written above.
    unsafe { out.set_len(blocks) };
    out
}

/// Asks for transparent huge pages under `buffer` before it is first written: fewer page
/// faults while interleaving, fewer TLB misses while streaming the weights. A hint.
fn huge_pages<T>(buffer: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (buffer.as_mut_ptr() as usize).next_multiple_of(HUGE);
        let end = (buffer.as_mut_ptr() as usize + size_of_val(buffer)) / HUGE * HUGE;
        if start < end {
            // SAFETY: the range lies within `buffer`, memory this process owns; the advice
            // changes how it is backed, not its contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

/// A whole matrix interleaved, as the kernel table's entry for it takes it.
pub struct Interleaved(Vec<BlockQ4Kx16>);

impl Interleaved {
    /// `weights`: the bytes of a matrix of `rows` Q4_K rows of `bpr` blocks, `rows` a
    /// multiple of [`ROWS`] (checked by the caller).
    pub fn new(weights: &[u8], bpr: usize) -> Result<Self> {
        Ok(Self(interleave(cast_slice(weights, "weights")?, bpr)))
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the blocks are Pod (no padding), so their memory is initialized bytes, and
        // the slice covers exactly the Vec's elements.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), size_of_val(&self.0[..])) }
    }
}

/// Row `row` of an interleaved matrix of `bpr` blocks a row, dequantized into `out`.
pub fn dequantize_row(w: &[BlockQ4Kx16], bpr: usize, row: usize, out: &mut [f32]) {
    let group = &w[row / ROWS * bpr..][..bpr];
    let blocks: Vec<BlockQ4K> = group.iter().map(|b| b.row(row % ROWS)).collect();
    dequantize::each_block(&blocks, out, dequantize::q4k);
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::gguf::TensorType;
    use crate::kernels::blocks::cast_slice;
    use crate::kernels::tests::random_blocks;

    #[test]
    fn interleaving_keeps_every_byte() {
        let bpr = 3;
        let bytes = random_blocks(
            &mut StdRng::seed_from_u64(7),
            TensorType::Q4K,
            2 * ROWS * bpr,
        );
        let w: &[BlockQ4K] = cast_slice(bytes.bytes(), "test").unwrap();
        let x = interleave(w, bpr);
        assert_eq!(x.len(), 2 * bpr);
        for (i, original) in w.iter().enumerate() {
            let (row, k) = (i / bpr, i % bpr);
            let back = x[(row / ROWS) * bpr + k].row(row % ROWS);
            assert_eq!(back.d, original.d);
            assert_eq!(back.dmin, original.dmin);
            assert_eq!(back.scales, original.scales, "block {i}");
            assert_eq!(back.qs, original.qs);
        }
    }

    /// The AVX-512 kernel against the scalar reference on each row, for 1 to 4 activation rows;
    /// and a row's result the same bit for bit whatever rows share its pass.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_kernel_matches_the_reference() {
        use crate::kernels::blocks::{quantize_q8k, BlockQ8K};
        use crate::kernels::tests::{assert_close_to_reference, randn};
        use crate::kernels::{hardware_level, reference, CpuLevel};
        if hardware_level() < CpuLevel::Avx512Vnni {
            eprintln!("skipped: this CPU has no avx512vnni");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        let bpr = 12;
        let bytes = random_blocks(&mut rng, TensorType::Q4K, ROWS * bpr);
        let w: &[BlockQ4K] = cast_slice(bytes.bytes(), "test").unwrap();
        let x = interleave(w, bpr);
        let acts: Vec<Vec<BlockQ8K>> = (0..4)
            .map(|_| quantize_q8k(&randn(&mut rng, 256 * bpr)))
            .collect();
        let alone: Vec<[f32; ROWS]> = acts
            .iter()
            .map(|a| {
                let mut out = [[0f32; ROWS]];
                // SAFETY: the CPU has avx512vnni (checked above).
                unsafe { crate::kernels::x86::avx512_x16::dot_q4k_x16(&x, &[a], &mut out) };
                out[0]
            })
            .collect();
        for n in 1..=4 {
            let ys: Vec<&[BlockQ8K]> = acts[..n].iter().map(|a| a.as_slice()).collect();
            let mut out = vec![[0f32; ROWS]; n];
            // SAFETY: as above.
            unsafe { crate::kernels::x86::avx512_x16::dot_q4k_x16(&x, &ys, &mut out) };
            for (p, row) in out.iter().enumerate() {
                let want: Vec<f32> = (0..ROWS)
                    .map(|r| reference::dot_q4k(&w[r * bpr..(r + 1) * bpr], ys[p]))
                    .collect();
                assert_close_to_reference(&format!("{n} rows, row {p}"), row, &want);
                assert_eq!(row.map(f32::to_bits), alone[p].map(f32::to_bits));
            }
        }
    }

    /// The interleaved entry of the kernel table: every row count against the scalar entry on
    /// the stored matrix, each activation row the same bit for bit in a batch as alone, the
    /// embedding lookup the stored one's bit for bit, and shapes it cannot take refused.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn interleaved_entry_matches_the_stored_one() {
        use crate::kernels::table::Q4K_X16;
        use crate::kernels::tests::{assert_close_to_reference, randn};
        use crate::kernels::{find, hardware_level, CpuLevel};
        if hardware_level() < CpuLevel::Avx512Vnni {
            eprintln!("skipped: this CPU has no avx512vnni");
            return;
        }
        let mut rng = StdRng::seed_from_u64(12);
        let (rows, cols) = (3 * ROWS, 2 * QK_K);
        let stored = random_blocks(&mut rng, TensorType::Q4K, rows * cols / QK_K);
        let scalar = find(CpuLevel::Scalar, TensorType::Q4K).unwrap();
        let x16 = &Q4K_X16.kernels;
        let bpr = scalar.blocks_per_row(stored.bytes(), rows, cols).unwrap();
        let weights = (Q4K_X16.make)(stored.bytes(), bpr).unwrap();
        let w = weights.bytes();
        for n in [1, 2, 3, 4, 5, 7, 13, 33, 40] {
            let x = randn(&mut rng, n * cols);
            let (mut got, mut want) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
            x16.gemm(w, rows, cols, &x, n, &mut got).unwrap();
            scalar
                .gemm(stored.bytes(), rows, cols, &x, n, &mut want)
                .unwrap();
            assert_close_to_reference(&format!("n {n}"), &got, &want);
            for (i, (x, got)) in x.chunks(cols).zip(got.chunks(rows)).enumerate() {
                let mut alone = vec![f32::NAN; rows];
                x16.gemm(w, rows, cols, x, 1, &mut alone).unwrap();
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "n {n} row {i}"
                );
            }
        }
        for row in [0, 17, rows - 1] {
            let (mut got, mut want) = (vec![0f32; cols], vec![0f32; cols]);
            x16.dequantize_row(w, rows, row, &mut got).unwrap();
            scalar
                .dequantize_row(stored.bytes(), rows, row, &mut want)
                .unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "row {row}"
            );
        }
        let mut out = vec![0f32; rows - 1];
        let x = randn(&mut rng, cols);
        assert!(x16
            .gemm(&w[..w.len() - 64], rows, cols, &x, 1, &mut out[..rows - 1])
            .is_err());
        assert!(x16.gemm(w, rows - 1, cols, &x, 1, &mut out).is_err());
        assert!(x16
            .dequantize_row(w, rows, rows, &mut vec![0f32; cols])
            .is_err());
    }

    /// Interleaved against the row-wise AVX-512 kernels, 1 to 4 activation rows, 2 threads: a
    /// set of Phi-3-mini-sized matrices streamed from memory, and one resident in L3.
    /// `cargo test --release --lib interleaved::tests::timing -- --ignored --nocapture`
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn timing() {
        use rayon::prelude::*;

        use crate::kernels::blocks::{quantize_q8k, BlockQ8K};
        use crate::kernels::tests::randn;
        use crate::kernels::{find, hardware_level, CpuLevel};
        if hardware_level() < CpuLevel::Avx512Vnni {
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let cols = 3072;
        let bpr = cols / QK_K;
        for (what, rows, reps) in [("memory", 16384 * 4, 5), ("L3", 8192, 40)] {
            let bytes = random_blocks(&mut rng, TensorType::Q4K, rows * bpr);
            let w: &[BlockQ4K] = cast_slice(bytes.bytes(), "test").unwrap();
            let x = interleave(w, bpr);
            let kernels = find(CpuLevel::Avx512Vnni, TensorType::Q4K).unwrap();
            for n in [1, 2, 3, 4, 8, 16, 64] {
                let xs = randn(&mut rng, n * cols);
                let mut out = vec![0f32; n * rows];
                let time = |f: &mut (dyn FnMut() + Send)| {
                    (0..3)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            pool.install(|| (0..reps).for_each(|_| f()));
                            t.elapsed().as_secs_f64() / (reps * rows * bpr / ROWS * ROWS) as f64
                        })
                        .fold(f64::MAX, f64::min)
                };
                let rowwise = time(&mut || {
                    kernels
                        .gemm(bytes.bytes(), rows, cols, &xs, n, &mut out)
                        .unwrap()
                });
                let mut out16 = vec![[0f32; ROWS]; n * rows / ROWS];
                let interleaved = time(&mut || {
                    let acts: Vec<Vec<BlockQ8K>> = xs.chunks(cols).map(quantize_q8k).collect();
                    let ys: Vec<&[BlockQ8K]> = acts.iter().map(|a| a.as_slice()).collect();
                    out16
                        .par_chunks_mut(2 * n)
                        .zip(x.par_chunks(2 * bpr))
                        .for_each(|(o, g)| {
                            for (o, g) in o.chunks_mut(n).zip(g.chunks(bpr)) {
                                for (o, ys) in o.chunks_mut(4).zip(ys.chunks(4)) {
                                    // SAFETY: the CPU has avx512vnni (checked above).
                                    unsafe {
                                        crate::kernels::x86::avx512_x16::dot_q4k_x16(g, ys, o)
                                    };
                                }
                            }
                        });
                });
                println!(
                    "{what}: {n} rows: row-wise {:.2} ns, interleaved {:.2} ns per weight block and row",
                    rowwise * 1e9 / n as f64,
                    interleaved * 1e9 / n as f64
                );
            }
        }
    }
}
