//! The tile kernels of prefill attention (`model::attention::attend_chunk`): the scores of a tile
//! of query rows against keys transposed in blocks of [`KEY_LANES`] (each block `head_dim` rows
//! of 16 keys' values, contiguous, so a tile walks memory in order), and the weighted sums of
//! values for a tile of rows. Plain Rust the compiler vectorizes, compiled
//! twice: for the build's baseline, and with AVX-512 (16 floats per vector, 32 registers) for
//! the avx512vnni level, chosen per call from [`super::level`].

use super::{level, CpuLevel};

/// Query rows per tile: each key vector loaded serves this many rows.
pub const TILE_ROWS: usize = 8;

/// Keys per score vector; the transposed keys are padded to a multiple of it (zeros).
pub const KEY_LANES: usize = 16;

/// Where value `c` of key `j` lies in keys transposed for [`score_tile`]: block `j / 16` of
/// `(head_dim, KEY_LANES)` values, row `c`, lane `j % 16`.
pub fn transposed_at(j: usize, c: usize, head_dim: usize) -> usize {
    (j / KEY_LANES * head_dim + c) * KEY_LANES + j % KEY_LANES
}

/// `scores[r * padded + j] = dot(queries[r], key j)` for `j` in `keys` rounded out to whole
/// vectors of [`KEY_LANES`] (`keys_t`: the keys transposed, `padded / KEY_LANES` blocks laid
/// out as [`transposed_at`] says).
pub fn score_tile(
    queries: &[&[f32]; TILE_ROWS],
    keys_t: &[f32],
    padded: usize,
    keys: std::ops::Range<usize>,
    scores: &mut [f32],
) {
    score_tile_at(level(), queries, keys_t, padded, keys, scores)
}

/// [`score_tile`] with the kernels of `level` (at most the hardware's).
fn score_tile_at(
    level: CpuLevel,
    queries: &[&[f32]; TILE_ROWS],
    keys_t: &[f32],
    padded: usize,
    keys: std::ops::Range<usize>,
    scores: &mut [f32],
) {
    let d = queries[0].len();
    assert!(queries.iter().all(|q| q.len() == d));
    assert!(padded.is_multiple_of(KEY_LANES) && keys.end <= padded && keys_t.len() >= d * padded);
    assert!(scores.len() >= TILE_ROWS * padded);
    assert!(level <= super::hardware_level());
    #[cfg(target_arch = "x86_64")]
    if level >= CpuLevel::Avx512Vnni {
        // SAFETY: the level is at most the hardware's (asserted), which has AVX-512 F and VL.
        return unsafe { score_tile_avx512(queries, keys_t, padded, keys, scores) };
    }
    // Two halves of one key block a step: 8 rows of 16-key accumulators would not fit AVX2's
    // 16 registers.
    for half in 0..2 {
        let rows: [&[f32]; 4] = std::array::from_fn(|r| queries[4 * half + r]);
        score_rows::<4, 1>(
            &rows,
            keys_t,
            padded,
            keys.clone(),
            &mut scores[4 * half * padded..],
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
fn score_tile_avx512(
    queries: &[&[f32]; TILE_ROWS],
    keys_t: &[f32],
    padded: usize,
    keys: std::ops::Range<usize>,
    scores: &mut [f32],
) {
    // Two key blocks a step: each query value broadcast serves 32 keys (16 of the 32
    // registers hold the sums).
    score_rows::<TILE_ROWS, 2>(queries, keys_t, padded, keys, scores)
}

/// The scores of `R` query rows, `B` blocks of keys a step, then the blocks left one by one.
#[inline(always)]
fn score_rows<const R: usize, const B: usize>(
    queries: &[&[f32]; R],
    keys_t: &[f32],
    padded: usize,
    keys: std::ops::Range<usize>,
    scores: &mut [f32],
) {
    let first = keys.start / KEY_LANES * KEY_LANES;
    let blocks = (keys.end - first).div_ceil(KEY_LANES);
    let steps_end = first + blocks / B * B * KEY_LANES;
    for j in (first..steps_end).step_by(B * KEY_LANES) {
        score_blocks::<R, B>(queries, keys_t, padded, j, scores);
    }
    for j in (steps_end..first + blocks * KEY_LANES).step_by(KEY_LANES) {
        score_blocks::<R, 1>(queries, keys_t, padded, j, scores);
    }
}

/// The scores of `B` blocks of keys from key `j` (a multiple of [`KEY_LANES`]).
#[inline(always)]
fn score_blocks<const R: usize, const B: usize>(
    queries: &[&[f32]; R],
    keys_t: &[f32],
    padded: usize,
    j: usize,
    scores: &mut [f32],
) {
    let d = queries[0].len();
    let mut acc = [[[0f32; KEY_LANES]; B]; R];
    for c in 0..d {
        let k: [&[f32; KEY_LANES]; B] = std::array::from_fn(|b| {
            keys_t[(j + b * KEY_LANES) * d + c * KEY_LANES..][..KEY_LANES]
                .try_into()
                .expect("padded to whole vectors")
        });
        for (acc, q) in acc.iter_mut().zip(queries) {
            let q = q[c];
            for (acc, k) in acc.iter_mut().zip(k) {
                for (a, &k) in acc.iter_mut().zip(k) {
                    *a = q.mul_add(k, *a);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (b, acc) in acc.iter().enumerate() {
            scores[r * padded + j + b * KEY_LANES..][..KEY_LANES].copy_from_slice(acc);
        }
    }
}

/// `out[r] = sum_j p[r][j] * values[j]` for the rows of a tile (up to [`TILE_ROWS`]), all over
/// the same keys (`values`: `p[r].len()` rows of `out[r].len()` values; a key a row does not see
/// has weight 0).
pub fn weighted_sum_tile(p: &[&[f32]], values: &[f32], out: &mut [&mut [f32]]) {
    weighted_sum_tile_at(level(), p, values, out)
}

/// [`weighted_sum_tile`] with the kernels of `level` (at most the hardware's).
fn weighted_sum_tile_at(level: CpuLevel, p: &[&[f32]], values: &[f32], out: &mut [&mut [f32]]) {
    assert!(level <= super::hardware_level());
    assert!(p.len() == out.len() && p.len() <= TILE_ROWS);
    let Some(d) = out.first().map(|o| o.len()) else {
        return;
    };
    let n = values.len() / d;
    assert!(p.iter().all(|p| p.len() == n) && out.iter().all(|o| o.len() == d));
    #[cfg(target_arch = "x86_64")]
    if level >= CpuLevel::Avx512Vnni {
        // SAFETY: as in `score_tile_at`.
        return unsafe { weighted_sum_avx512(p, values, out) };
    }
    for (p, out) in p.iter().zip(out.iter_mut()) {
        weighted_sum_by_head_dim::<1>(&[p], values, &mut [out]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
fn weighted_sum_avx512(p: &[&[f32]], values: &[f32], out: &mut [&mut [f32]]) {
    // Each value vector loaded serves several rows: four rows' sums (24 registers for 96
    // values a row) halve the passes over the values against two.
    if out[0].len() <= 96 {
        weighted_sum_by_rows::<4>(p, values, out)
    } else {
        weighted_sum_by_rows::<2>(p, values, out)
    }
}

/// [`weighted_sum_by_head_dim`] over `R` rows at a time, then the rest one by one.
#[inline(always)]
fn weighted_sum_by_rows<const R: usize>(p: &[&[f32]], values: &[f32], out: &mut [&mut [f32]]) {
    let whole = p.len() / R * R;
    for (p, out) in p[..whole].chunks_exact(R).zip(out.chunks_exact_mut(R)) {
        let p: &[&[f32]; R] = p.try_into().expect("chunks of R");
        weighted_sum_by_head_dim::<R>(p, values, out);
    }
    for (p, out) in p[whole..].iter().zip(&mut out[whole..]) {
        weighted_sum_by_head_dim::<1>(&[p], values, std::slice::from_mut(out));
    }
}

/// [`weighted_rows`] for the common head sizes (sums held in registers), else a loop over
/// memory.
#[inline(always)]
fn weighted_sum_by_head_dim<const R: usize>(
    p: &[&[f32]; R],
    values: &[f32],
    out: &mut [&mut [f32]],
) {
    match out[0].len() {
        64 => weighted_rows::<R, 64>(p, values, out),
        96 => weighted_rows::<R, 96>(p, values, out),
        128 => weighted_rows::<R, 128>(p, values, out),
        d => {
            for (p, out) in p.iter().zip(out.iter_mut()) {
                out.fill(0.0);
                for (&p, v) in p.iter().zip(values.chunks_exact(d)) {
                    for (o, &v) in out.iter_mut().zip(v) {
                        *o = p.mul_add(v, *o);
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn weighted_rows<const R: usize, const D: usize>(
    p: &[&[f32]; R],
    values: &[f32],
    out: &mut [&mut [f32]],
) {
    let mut acc = [[0f32; D]; R];
    for (j, v) in values.chunks_exact(D).enumerate() {
        for (acc, p) in acc.iter_mut().zip(p) {
            let p = p[j];
            for (a, &v) in acc.iter_mut().zip(v) {
                *a = p.mul_add(v, *a);
            }
        }
    }
    for (out, acc) in out.iter_mut().zip(&acc) {
        out.copy_from_slice(acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every level's build against plain loops.
    #[test]
    fn tiles_match_plain_loops() {
        for level in CpuLevel::ALL
            .into_iter()
            .filter(|&l| l <= super::super::hardware_level())
        {
            tiles_match_plain_loops_at(level);
        }
    }

    fn tiles_match_plain_loops_at(level: CpuLevel) {
        let (d, n) = (96usize, 45usize);
        let padded = n.next_multiple_of(KEY_LANES);
        let q: Vec<Vec<f32>> = (0..TILE_ROWS)
            .map(|r| {
                (0..d)
                    .map(|c| ((r * 7 + c) % 13) as f32 * 0.1 - 0.6)
                    .collect()
            })
            .collect();
        let keys: Vec<Vec<f32>> = (0..n)
            .map(|j| {
                (0..d)
                    .map(|c| ((j * 5 + c * 3) % 17) as f32 * 0.05 - 0.4)
                    .collect()
            })
            .collect();
        let mut keys_t = vec![0f32; d * padded];
        for (j, k) in keys.iter().enumerate() {
            for (c, &v) in k.iter().enumerate() {
                keys_t[transposed_at(j, c, d)] = v;
            }
        }
        let queries: [&[f32]; TILE_ROWS] = std::array::from_fn(|r| q[r].as_slice());
        let mut scores = vec![f32::NAN; TILE_ROWS * padded];
        score_tile_at(level, &queries, &keys_t, padded, 3..n, &mut scores);
        for r in 0..TILE_ROWS {
            for j in 3..n {
                let want: f32 = q[r].iter().zip(&keys[j]).map(|(a, b)| a * b).sum();
                let got = scores[r * padded + j];
                assert!(
                    (got - want).abs() < 1e-4,
                    "{level} row {r} key {j}: {got} {want}"
                );
            }
        }

        for rows in [1, 2, 3, 5, 6, 7, TILE_ROWS] {
            for d in [96, 128, 20] {
                let values: Vec<f32> = (0..n * d)
                    .map(|i| ((i * 7) % 19) as f32 * 0.05 - 0.45)
                    .collect();
                let p: Vec<Vec<f32>> = (0..rows)
                    .map(|r| (0..n).map(|j| ((r + j) % 4) as f32 * 0.25).collect())
                    .collect();
                let mut out = vec![vec![f32::NAN; d]; rows];
                let p_rows: Vec<&[f32]> = p.iter().map(|p| p.as_slice()).collect();
                let mut out_rows: Vec<&mut [f32]> =
                    out.iter_mut().map(|o| o.as_mut_slice()).collect();
                weighted_sum_tile_at(level, &p_rows, &values, &mut out_rows);
                for (r, out) in out.iter().enumerate() {
                    for (c, &got) in out.iter().enumerate() {
                        let want: f32 = (0..n).map(|j| p[r][j] * values[j * d + c]).sum();
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{level} {rows} rows, d {d}: {got}"
                        );
                    }
                }
            }
        }
    }
}
