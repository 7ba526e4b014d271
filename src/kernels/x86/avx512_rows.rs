//! AVX-512 VNNI kernels for one to [`GROUP`] activation rows: gemv (one row) and the decoding
//! streams that a batch puts together (a few). Each weight block is unpacked once for every row,
//! so the weights are read from memory once per pass.
//!
//! For the K-quants, the work per weight block that is not a product of that row's values is
//! done once for all rows, and the work on the rows' own data once per call ([`Q8KRows`]): each
//! row's 16 lanes of scaled sums are folded with the other rows' into one vector whose 128-bit
//! lane g holds, in i32 lane p, a quarter of row p's sum; the activations' sub-block sums (for
//! the mins of Q4_K/Q5_K and the offset of Q6_K) and scales are laid out in that layout when the
//! rows are prepared. Then the float work of a block is a few operations for all rows together.
//! Every lane's arithmetic depends on its own row alone and is the same whatever the number of
//! rows, so one row's result is bit for bit the same alone or beside others.
//!
//! `fn(w, y, out)`: `out[p] = dot(w, row p of y)`.

use std::arch::x86_64::*;

use super::avx512::{load512, q4k_block, q5k_block, q6k_block, scaled_sum, K4Block};
use super::{prefetch_ahead, rows};
use crate::kernels::blocks::*;
use crate::kernels::tiling::GROUP;

/// One to [`GROUP`] activation rows quantized to Q8_K, prepared for the K-quant kernels.
pub struct Q8KRows<'a> {
    rows: [&'a [BlockQ8K]; GROUP],
    count: usize,
    /// Per block: row p's `d` in lane p (0 past `count`).
    d: Vec<[f32; GROUP]>,
    /// Per block, `vectors` of them: 32 i16 where the i16 pair at i32 lane `4g + p` is a pair
    /// of row p's sub-block sums, the pair that meets the weights' pair in 128-bit lane g.
    sums: Vec<[i16; 32]>,
    vectors: usize,
}

impl<'a> Q8KRows<'a> {
    /// For Q4_K and Q5_K: the sums of the eight 32-value sub-blocks (which meet the mins).
    pub fn for_k4(rows: &[&'a [BlockQ8K]]) -> Self {
        Self::new(rows, 1, |a, _, j| a.bsums[2 * j] + a.bsums[2 * j + 1])
    }

    /// For Q6_K: the sums of the sixteen 16-value sub-blocks (which meet the scales, for the
    /// offset of 32 the values carry), 0-7 in the first vector and 8-15 in the second.
    pub fn for_q6k(rows: &[&'a [BlockQ8K]]) -> Self {
        Self::new(rows, 2, |a, v, j| a.bsums[8 * v + j])
    }

    /// `sum(a, v, j)`: sub-block sum j (0..8) of vector v.
    fn new(
        rows: &[&'a [BlockQ8K]],
        vectors: usize,
        sum: impl Fn(&BlockQ8K, usize, usize) -> i16,
    ) -> Self {
        assert!((1..=GROUP).contains(&rows.len()));
        let blocks = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == blocks));
        let mut d = vec![[0f32; GROUP]; blocks];
        let mut sums = vec![[0i16; 32]; blocks * vectors];
        for (p, row) in rows.iter().enumerate() {
            for (k, a) in row.iter().enumerate() {
                d[k][p] = a.d;
                for v in 0..vectors {
                    let lanes = &mut sums[k * vectors + v];
                    for g in 0..4 {
                        lanes[2 * (4 * g + p)] = sum(a, v, 2 * g);
                        lanes[2 * (4 * g + p) + 1] = sum(a, v, 2 * g + 1);
                    }
                }
            }
        }
        Self {
            rows: std::array::from_fn(|p| rows[p.min(rows.len() - 1)]),
            count: rows.len(),
            d,
            sums,
            vectors,
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The rows' `d` of block k, in lane p of every 128-bit lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn d(&self, k: usize) -> __m512 {
        let d = &self.d[k];
        // SAFETY: `d` is GROUP = 4 floats, the 16 bytes read.
        _mm512_broadcast_f32x4(unsafe { _mm_loadu_ps(d.as_ptr()) })
    }

    /// Vector `v` of block k's sub-block sums.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sums(&self, k: usize, v: usize) -> __m512i {
        load512(&self.sums[k * self.vectors + v], 0)
    }
}
const _: () = assert!(GROUP == 4, "the lane layout holds 4 rows");

/// Folds each row's 16 lanes of i32 into one vector: i32 lane `4g + p` is the sum of row p's
/// 128-bit lane g. Rows past `R` count as zero. Exact (integers).
#[inline]
#[target_feature(enable = "avx512f")]
fn by_lanes<const R: usize>(s: [__m512i; R]) -> __m512i {
    let row = |p: usize| if p < R { s[p] } else { _mm512_setzero_si512() };
    let pair = |a: __m512i, b: __m512i| {
        _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
    };
    let (a01, a23) = (pair(row(0), row(1)), pair(row(2), row(3)));
    _mm512_add_epi32(
        _mm512_unpacklo_epi64(a01, a23),
        _mm512_unpackhi_epi64(a01, a23),
    )
}

/// [`scaled_sum`] of block k of each row. (A loop, not `array::map`: its closure would not be
/// compiled with this function's target features, and so not inlined.)
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
fn row_sums<const R: usize>(
    ys: &[&[BlockQ8K]; R],
    k: usize,
    values: &[__m512i; 4],
    scales: &[__m512i; 2],
) -> [__m512i; R] {
    let mut sums = [_mm512_setzero_si512(); R];
    for (sum, y) in sums.iter_mut().zip(ys) {
        *sum = scaled_sum(values, scales, &y[k]);
    }
    sums
}

/// `out[p]` = the sum of lane p over the four 128-bit lanes of `acc`.
#[inline]
#[target_feature(enable = "avx2,avx512f")]
fn store<const R: usize>(acc: __m512, out: &mut [f32]) {
    let halves = _mm256_add_ps(
        _mm512_castps512_ps256(acc),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
    );
    let sums = _mm_add_ps(
        _mm256_castps256_ps128(halves),
        _mm256_extractf128_ps::<1>(halves),
    );
    let mut lanes = [0f32; GROUP];
    // SAFETY: `lanes` is 4 floats, the 16 bytes written.
    unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), sums) };
    out[..R].copy_from_slice(&lanes[..R]);
}

/// The Q4_K and Q5_K kernel: `unpack` makes a weight block ready for every row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn k4<B, const R: usize>(w: &[B], y: &Q8KRows, out: &mut [f32], unpack: impl Fn(&B) -> K4Block) {
    let ys = rows::<_, _, R>(&y.rows[..y.count], out, w.len());
    let mut acc = _mm512_setzero_ps();
    for (k, b) in w.iter().enumerate() {
        prefetch_ahead(b);
        let block = unpack(b);
        let sums = by_lanes(row_sums(&ys, k, &block.values, &block.scales));
        let mins = _mm512_madd_epi16(block.mins, y.sums(k, 0));
        let scaled = _mm512_mul_ps(_mm512_set1_ps(block.d), _mm512_cvtepi32_ps(sums));
        let x = _mm512_fnmadd_ps(_mm512_set1_ps(block.dmin), _mm512_cvtepi32_ps(mins), scaled);
        acc = _mm512_fmadd_ps(y.d(k), x, acc);
    }
    store::<R>(acc, out);
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q4k_rows(w: &[BlockQ4K], y: &Q8KRows, out: &mut [f32]) {
    by_rows!(q4k, w, y, out, y.count())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4k<const R: usize>(w: &[BlockQ4K], y: &Q8KRows, out: &mut [f32]) {
    k4::<_, R>(w, y, out, |b| q4k_block(b))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q5k_rows(w: &[BlockQ5K], y: &Q8KRows, out: &mut [f32]) {
    by_rows!(q5k, w, y, out, y.count())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q5k<const R: usize>(w: &[BlockQ5K], y: &Q8KRows, out: &mut [f32]) {
    k4::<_, R>(w, y, out, |b| q5k_block(b))
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub fn dot_q6k_rows(w: &[BlockQ6K], y: &Q8KRows, out: &mut [f32]) {
    by_rows!(q6k, w, y, out, y.count())
}

/// Q6_K: values are stored plus 32, so each sub-block's sum, times its scale, comes off 32
/// times (as an integer, before the one conversion per block).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6k<const R: usize>(w: &[BlockQ6K], y: &Q8KRows, out: &mut [f32]) {
    let ys = rows::<_, _, R>(&y.rows[..y.count], out, w.len());
    let mut acc = _mm512_setzero_ps();
    for (k, b) in w.iter().enumerate() {
        prefetch_ahead(b);
        let block = q6k_block(b);
        let sums = by_lanes(row_sums(&ys, k, &block.values, &block.scales));
        let offset = _mm512_add_epi32(
            _mm512_madd_epi16(block.scale_pairs[0], y.sums(k, 0)),
            _mm512_madd_epi16(block.scale_pairs[1], y.sums(k, 1)),
        );
        let sums = _mm512_sub_epi32(sums, _mm512_slli_epi32::<5>(offset));
        let d = _mm512_mul_ps(y.d(k), _mm512_set1_ps(block.d));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sums), acc);
    }
    store::<R>(acc, out);
}
