//! K-quant weights of 16 rows interleaved, made when a model loads (as ik_llama.cpp's
//! `_R4`/`_R8` types are): block k of rows `16g..16g + 16` becomes one [`BlockQ4Kx16`] or
//! [`BlockQ6Kx16`]. A 512-bit vector then holds four quant bytes of each of the 16 rows, so
//! `vpdpbusd` with one activation's four values broadcast adds into each row's own lane, and the
//! sub-block scales apply to 16 rows with one multiply-add: no per-row folding of lanes, and no
//! per-row scale work, whatever the number of activation rows (`x86::avx512_x16`). Lossless:
//! `row(r)` gives back each row's block, byte for byte.

use std::mem::MaybeUninit;

use half::f16;
use rayon::prelude::*;

use super::blocks::{cast_slice, scale_min_k4, BlockQ4K, BlockQ6K, Pod, QK_K};
use super::table::WeightType;
use crate::error::Result;

/// Weight rows per interleaved group.
pub const ROWS: usize = 16;

/// An interleaved block: block k of 16 rows of the stored type `Stored`.
pub trait InterleavedBlock: Pod {
    type Stored: WeightType;
    /// Block k of the 16 rows `rows[r]` (each that row's blocks).
    fn new(rows: &[&[Self::Stored]; ROWS], k: usize) -> Self;
    /// Row r's block, as it was.
    fn row(&self, r: usize) -> Self::Stored;
}

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

impl InterleavedBlock for BlockQ4Kx16 {
    type Stored = BlockQ4K;

    fn new(rows: &[&[BlockQ4K]; ROWS], k: usize) -> Self {
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

    fn row(&self, r: usize) -> BlockQ4K {
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

/// Block k of 16 Q6_K rows: 16 x 210 bytes and 32 of padding (a whole number of lines).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6Kx16 {
    pub d: [f16; ROWS],
    /// `scales[j][r]`: sub-block j's scale (16 values) in row r.
    pub scales: [[i8; ROWS]; QK_K / 16],
    /// `quants[8 h + l / 4][..][r]`, for l = 0, 4, .., 28: row r's `ql[64h + l..]`,
    /// `ql[64h + 32 + l..]` and `qh[32h + l..]`, four bytes each: the bytes that values l,
    /// 32 + l, 64 + l and 96 + l of half h (and the three after each) are made of, in the order
    /// the kernel reads them.
    pub quants: [[[[u8; 4]; ROWS]; 3]; QK_K / 16],
    padding: [u8; 32],
}

/// Where `quants[t][i]` of a [`BlockQ6Kx16`] comes from: (`ql` or not, the byte offset).
const fn q6k_source(t: usize, i: usize) -> (bool, usize) {
    let (h, l) = (t / 8, 4 * (t % 8));
    match i {
        0 => (true, 64 * h + l),
        1 => (true, 64 * h + 32 + l),
        _ => (false, 32 * h + l),
    }
}

const _: () = assert!(size_of::<BlockQ6Kx16>() == 3392);

// SAFETY: as for BlockQ4Kx16 (the padding is a field of its own).
unsafe impl Pod for BlockQ6Kx16 {}

impl InterleavedBlock for BlockQ6Kx16 {
    type Stored = BlockQ6K;

    fn new(rows: &[&[BlockQ6K]; ROWS], k: usize) -> Self {
        let mut b = Self {
            d: [f16::ZERO; ROWS],
            scales: [[0; ROWS]; QK_K / 16],
            quants: [[[[0; 4]; ROWS]; 3]; QK_K / 16],
            padding: [0; 32],
        };
        for (r, row) in rows.iter().enumerate() {
            let src = &row[k];
            b.d[r] = src.d;
            for (j, &scale) in src.scales.iter().enumerate() {
                b.scales[j][r] = scale;
            }
            for (t, step) in b.quants.iter_mut().enumerate() {
                for (i, chunk) in step.iter_mut().enumerate() {
                    let (ql, at) = q6k_source(t, i);
                    let bytes = if ql { &src.ql[at..] } else { &src.qh[at..] };
                    chunk[r].copy_from_slice(&bytes[..4]);
                }
            }
        }
        b
    }

    fn row(&self, r: usize) -> BlockQ6K {
        let mut b = BlockQ6K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: std::array::from_fn(|j| self.scales[j][r]),
            d: self.d[r],
        };
        for (t, step) in self.quants.iter().enumerate() {
            for (i, chunk) in step.iter().enumerate() {
                let (ql, at) = q6k_source(t, i);
                let bytes = if ql { &mut b.ql[at..] } else { &mut b.qh[at..] };
                bytes[..4].copy_from_slice(&chunk[r]);
            }
        }
        b
    }
}

/// A 64-byte line: the unit an [`Interleaved`] matrix is allocated in, so that its blocks
/// (a whole number of lines each) are aligned for the kernels' loads.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// A whole matrix interleaved, as the kernel table's entry for it takes it: group g's blocks
/// lie back to back from `g * bpr`.
pub struct Interleaved(Vec<Line>);

impl Interleaved {
    /// `weights`: the bytes of a matrix of `X::Stored` rows of `bpr` blocks, a multiple of
    /// [`ROWS`] rows, interleaved group by group in parallel, into memory asked to be on huge
    /// pages before it is first written.
    pub fn new<X: InterleavedBlock>(weights: &[u8], bpr: usize) -> Result<Self> {
        const { assert!(size_of::<X>().is_multiple_of(64) && align_of::<X>() <= 64) };
        let w: &[X::Stored] = cast_slice(weights, "weights")?;
        assert!(bpr > 0 && w.len().is_multiple_of(bpr * ROWS));
        let blocks = w.len() / ROWS;
        let lines = blocks * size_of::<X>() / 64;
        let mut out: Vec<Line> = Vec::with_capacity(lines);
        huge_pages(out.spare_capacity_mut());
        // SAFETY: the first `lines` lines of spare capacity hold exactly `blocks` X's: X is a
        // whole number of lines and needs no more than a line's alignment (asserted above).
        let slots: &mut [MaybeUninit<X>] = unsafe {
            std::slice::from_raw_parts_mut(out.spare_capacity_mut().as_mut_ptr().cast(), blocks)
        };
        slots
            .par_chunks_mut(bpr)
            .zip(w.par_chunks_exact(bpr * ROWS))
            .for_each(|(out, group)| {
                let rows: [&[X::Stored]; ROWS] = std::array::from_fn(|r| &group[r * bpr..][..bpr]);
                for (k, slot) in out.iter_mut().enumerate() {
                    slot.write(X::new(&rows, k));
                }
            });
        // SAFETY: every one of the `blocks` slots, all `lines` lines, was written above.
        unsafe { out.set_len(lines) };
        Ok(Self(out))
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the lines are initialized bytes, and the slice covers exactly the Vec's.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), size_of_val(&self.0[..])) }
    }
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

/// Row `row` of an interleaved matrix of `bpr` blocks a row, dequantized into `out`.
pub fn dequantize_row<X: InterleavedBlock>(w: &[X], bpr: usize, row: usize, out: &mut [f32]) {
    let group = &w[row / ROWS * bpr..][..bpr];
    let blocks: Vec<X::Stored> = group.iter().map(|b| b.row(row % ROWS)).collect();
    X::Stored::dequantize(&blocks, out);
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::gguf::TensorType;
    use crate::kernels::tests::random_blocks;

    #[test]
    fn interleaving_keeps_every_byte() {
        let bpr = 3;
        let mut rng = StdRng::seed_from_u64(7);
        let q4k = random_blocks(&mut rng, TensorType::Q4K, 2 * ROWS * bpr);
        let x = Interleaved::new::<BlockQ4Kx16>(q4k.bytes(), bpr).unwrap();
        let x: &[BlockQ4Kx16] = cast_slice(x.bytes(), "test").unwrap();
        let w: &[BlockQ4K] = cast_slice(q4k.bytes(), "test").unwrap();
        assert_eq!(x.len(), 2 * bpr);
        for (i, original) in w.iter().enumerate() {
            let back = x[i / bpr / ROWS * bpr + i % bpr].row(i / bpr % ROWS);
            assert_eq!(
                (back.d, back.dmin, back.scales, back.qs),
                (original.d, original.dmin, original.scales, original.qs),
                "Q4_K block {i}"
            );
        }
        let q6k = random_blocks(&mut rng, TensorType::Q6K, 2 * ROWS * bpr);
        let x = Interleaved::new::<BlockQ6Kx16>(q6k.bytes(), bpr).unwrap();
        let x: &[BlockQ6Kx16] = cast_slice(x.bytes(), "test").unwrap();
        let w: &[BlockQ6K] = cast_slice(q6k.bytes(), "test").unwrap();
        for (i, original) in w.iter().enumerate() {
            let back = x[i / bpr / ROWS * bpr + i % bpr].row(i / bpr % ROWS);
            assert_eq!(
                (back.d, back.scales, back.ql, back.qh),
                (original.d, original.scales, original.ql, original.qh),
                "Q6_K block {i}"
            );
        }
    }

    /// The interleaved entries of the kernel table: every row count against the scalar entry on
    /// the stored matrix, each activation row the same bit for bit in a batch as alone (so a
    /// stream's tokens do not depend on its company), the embedding lookup the stored one's bit
    /// for bit, and shapes they cannot take refused.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn interleaved_entries_match_the_stored_ones() {
        use crate::kernels::tests::{assert_close_to_reference, randn};
        use crate::kernels::{find, hardware_level, CpuLevel};
        if hardware_level() < CpuLevel::Avx512Vnni {
            eprintln!("skipped: this CPU has no avx512vnni");
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut rng = StdRng::seed_from_u64(12);
        for dtype in [TensorType::Q4K, TensorType::Q6K] {
            let (rows, cols) = (3 * ROWS, 2 * QK_K);
            let stored = random_blocks(&mut rng, dtype, rows * cols / QK_K);
            let scalar = find(CpuLevel::Scalar, dtype).unwrap();
            let interleaving = find(CpuLevel::Avx512Vnni, dtype)
                .unwrap()
                .interleaved
                .unwrap();
            let x16 = &interleaving.kernels;
            let bpr = scalar.blocks_per_row(stored.bytes(), rows, cols).unwrap();
            let weights = (interleaving.make)(stored.bytes(), bpr).unwrap();
            let w = weights.bytes();
            for n in [1, 2, 3, 4, 5, 6, 7, 8, 13, 33, 40] {
                let x = randn(&mut rng, n * cols);
                let (mut got, mut want) = (vec![f32::NAN; n * rows], vec![f32::NAN; n * rows]);
                x16.gemm(w, rows, cols, &x, n, &mut got).unwrap();
                scalar
                    .gemm(stored.bytes(), rows, cols, &x, n, &mut want)
                    .unwrap();
                assert_close_to_reference(&format!("{dtype:?} n {n}"), &got, &want);
                for (i, (x, got)) in x.chunks(cols).zip(got.chunks(rows)).enumerate() {
                    let mut alone = vec![f32::NAN; rows];
                    x16.gemm(w, rows, cols, x, 1, &mut alone).unwrap();
                    assert_eq!(bits(got), bits(&alone), "{dtype:?} n {n} row {i}");
                }
            }
            for row in [0, 17, rows - 1] {
                let (mut got, mut want) = (vec![0f32; cols], vec![0f32; cols]);
                x16.dequantize_row(w, rows, row, &mut got).unwrap();
                scalar
                    .dequantize_row(stored.bytes(), rows, row, &mut want)
                    .unwrap();
                assert_eq!(bits(&got), bits(&want), "{dtype:?} row {row}");
            }
            let x = randn(&mut rng, cols);
            let mut out = vec![0f32; rows];
            assert!(x16
                .gemm(&w[..w.len() - 64], rows, cols, &x, 1, &mut out)
                .is_err());
            assert!(x16.gemm(w, rows - 1, cols, &x, 1, &mut out[1..]).is_err());
            assert!(x16
                .dequantize_row(w, rows, rows, &mut vec![0f32; cols])
                .is_err());
        }
    }

    /// The interleaved entries against the stored ones at the avx512vnni level (row-wise
    /// kernels below 12 rows, panels from 12), 2 threads: Phi-3-mini-sized matrices streamed
    /// from memory, and one resident in L3. ns per weight block and activation row.
    /// `cargo test --release --lib interleaved::tests::timing -- --ignored --nocapture`
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn timing() {
        use crate::kernels::tests::randn;
        use crate::kernels::{find, hardware_level, CpuLevel, Kernels};
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
        for dtype in [TensorType::Q4K, TensorType::Q6K] {
            let stored_entry = find(CpuLevel::Avx512Vnni, dtype).unwrap();
            let interleaving = stored_entry.interleaved.unwrap();
            for (what, rows, reps) in [("memory", 16384 * 4, 5), ("L3", 4096, 40)] {
                let stored = random_blocks(&mut rng, dtype, rows * bpr);
                let weights = (interleaving.make)(stored.bytes(), bpr).unwrap();
                for n in [1, 2, 3, 4, 8, 16, 64, 256] {
                    let xs = randn(&mut rng, n * cols);
                    let mut out = vec![0f32; n * rows];
                    let mut time = |kernels: &Kernels, w: &[u8]| {
                        (0..3)
                            .map(|_| {
                                let t = std::time::Instant::now();
                                pool.install(|| {
                                    for _ in 0..reps {
                                        kernels.gemm(w, rows, cols, &xs, n, &mut out).unwrap();
                                    }
                                });
                                t.elapsed().as_secs_f64() * 1e9 / (reps * rows * bpr * n) as f64
                            })
                            .fold(f64::MAX, f64::min)
                    };
                    let before = time(stored_entry, stored.bytes());
                    let after = time(&interleaving.kernels, weights.bytes());
                    println!(
                        "{dtype:?} {what}: {n} rows: stored {before:.2} ns, interleaved {after:.2} ns"
                    );
                }
            }
        }
    }
}
