//! Attention of a sequence's new positions over its own [`KvCache`]: one query position
//! (decode) on phi3's kernels over the cache's rows as they are stored (f16 or Q8_0), several
//! (a prompt chunk) in tiles of query rows by key vectors converted to f32. The queries, scores
//! and sums are f32 either way.
//!
//! Shapes: queries are rows of `heads * head_dim` values (rotated), query head `h` reading KV
//! head `h / group`; the output has the queries' shape.

use half::f16;
use rayon::prelude::*;

use super::kv_cache::{KvCache, KvElement, KvType};
use crate::kernels::attention::{
    score_tile, transposed_at, weighted_sum_tile, KEY_LANES, TILE_ROWS,
};
use crate::kernels::blocks::BlockQ8_0;
use crate::kernels::vector;

/// What every attention call of one model shares.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Each position attends to at most this many positions, itself included.
    pub sliding_window: Option<usize>,
}

impl AttentionShape {
    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// First cached position that position `pos` may attend to.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.sliding_window {
            Some(window) => (pos + 1).saturating_sub(window),
            None => 0,
        }
    }
}

/// Attention of the one query `q` at position `pos` (its key and value already written to the
/// cache) over the positions it may see, into `out`. Runs on the caller's rayon pool, one task
/// per KV head.
pub fn attend_one(
    shape: &AttentionShape,
    cache: &KvCache,
    layer: usize,
    pos: usize,
    q: &[f32],
    out: &mut [f32],
) {
    match cache.shape().kv_type {
        KvType::F16 => attend_one_as::<f16>(shape, cache, layer, pos, q, out),
        KvType::Q8_0 => attend_one_as::<BlockQ8_0>(shape, cache, layer, pos, q, out),
    }
}

fn attend_one_as<T: KvElement>(
    shape: &AttentionShape,
    cache: &KvCache,
    layer: usize,
    pos: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let row_len = cache.row_len();
    let (d, group, scale) = (shape.head_dim, shape.group(), shape.scale());
    let (first, end) = (shape.first_visible(pos), pos + 1);
    out.par_chunks_mut(group * d)
        .zip(q.par_chunks(group * d))
        .enumerate()
        .for_each(|(h, (out, q))| {
            let mut scores = vec![0f32; end - first];
            for (out, q) in out.chunks_exact_mut(d).zip(q.chunks_exact(d)) {
                let keys = cache.runs::<T>(layer, false, h, first, end);
                each_run(keys, row_len, |run, at| T::scores(run, q, &mut scores[at]));
                vector::softmax(&mut scores, scale);
                out.fill(0.0);
                let values = cache.runs::<T>(layer, true, h, first, end);
                each_run(values, row_len, |run, at| {
                    T::weighted_sum(&scores[at], run, out)
                });
            }
        });
}

/// `f(run, rows)` for each run of `runs` (rows of `row_len` elements; `rows`: the run's rows
/// counted from the first run's first), the next run's bytes asked for first.
fn each_run<'a, T: 'a>(
    runs: impl Iterator<Item = &'a [T]>,
    row_len: usize,
    mut f: impl FnMut(&'a [T], std::ops::Range<usize>),
) {
    let mut runs = runs.peekable();
    let mut j = 0;
    while let Some(run) = runs.next() {
        if let Some(next) = runs.peek() {
            vector::prefetch(next);
        }
        let n = run.len() / row_len;
        f(run, j..j + n);
        j += n;
    }
}

/// Causal attention of a chunk of `seq` positions from `start` (their queries `q`, `seq` rows of
/// `stride` values whose first `heads * head_dim` are the queries, keys and values already
/// written to the cache) into `out` (`seq` rows of `heads * head_dim`).
///
/// One task per (KV head, block of positions): it converts the cached keys its positions see
/// into f32, transposed so that a tile of query rows meets 16 keys per vector, and the values
/// as they are; then each query row's scores, softmax and weighted sum of values. The `group`
/// query heads sharing the KV head are rows of the same tiles.
pub fn attend_chunk(
    shape: &AttentionShape,
    cache: &KvCache,
    layer: usize,
    start: usize,
    q: &[f32],
    stride: usize,
    out: &mut [f32],
) {
    let (d, heads, kv_heads) = (shape.head_dim, shape.heads, shape.kv_heads);
    let seq = q.len() / stride;
    assert_eq!(out.len(), seq * heads * d);
    let block = query_block(seq, kv_heads, rayon::current_num_threads());
    let blocks = seq.div_ceil(block);
    let tasks: Vec<(usize, usize)> = (0..kv_heads)
        .flat_map(|h| (0..blocks).map(move |b| (h, b)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Scratch::default, |scratch, &(h, b)| {
            let positions = b * block..seq.min((b + 1) * block);
            let task = Task {
                cache,
                layer,
                start,
                h,
                positions,
            };
            match cache.shape().kv_type {
                KvType::F16 => attend_block::<f16>(shape, &task, q, stride, scratch),
                KvType::Q8_0 => attend_block::<BlockQ8_0>(shape, &task, q, stride, scratch),
            }
        })
        .collect();
    let group = shape.group();
    for (&(h, b), result) in tasks.iter().zip(&results) {
        // Row (s - first, g) of the result is query head h * group + g at chunk position s.
        for (k, row) in result.chunks_exact(group * d).enumerate() {
            let s = b * block + k;
            out[(s * heads + h * group) * d..][..group * d].copy_from_slice(row);
        }
    }
}

/// Query positions per task of [`attend_chunk`]: a task converts the keys and values its
/// positions see, so the fewer blocks a head's positions make, the less is converted again
/// (turn 8 of a chat, 160 positions over 1,600 cached: blocks of 64 spent a fifth of
/// attention's time converting). Enough blocks that every thread has four tasks to balance with
/// (later positions see more keys).
fn query_block(seq: usize, kv_heads: usize, threads: usize) -> usize {
    let blocks_per_head = (4 * threads).div_ceil(kv_heads.max(1));
    seq.div_ceil(blocks_per_head)
        .next_multiple_of(TILE_ROWS)
        .max(TILE_ROWS)
}

/// A task's buffers, kept across the tasks a thread runs.
#[derive(Default)]
struct Scratch {
    /// The keys transposed in blocks of [`KEY_LANES`] ([`transposed_at`]), padded with zeros.
    keys: Vec<f32>,
    /// `(keys, head_dim)`
    values: Vec<f32>,
    /// `(TILE_ROWS, keys padded)`
    scores: Vec<f32>,
    /// One block's keys, converted before they are transposed.
    run: Vec<f32>,
}

/// One task of [`attend_chunk`]: KV head `h` of `layer`, for chunk positions `positions` (the
/// chunk starting at position `start`).
struct Task<'a> {
    cache: &'a KvCache,
    layer: usize,
    start: usize,
    h: usize,
    positions: std::ops::Range<usize>,
}

/// [`attend_chunk`]'s `task`: `(positions, group, head_dim)` values.
fn attend_block<T: KvElement>(
    shape: &AttentionShape,
    task: &Task,
    q: &[f32],
    stride: usize,
    scratch: &mut Scratch,
) -> Vec<f32> {
    let Task {
        cache,
        layer,
        start,
        h,
        ref positions,
    } = *task;
    let (d, group) = (shape.head_dim, shape.group());
    let row_len = cache.row_len();
    // Keys first..end: what the block's first position sees, through its last position.
    let first = shape.first_visible(start + positions.start);
    let end = start + positions.end;
    let n = end - first;
    let padded = n.next_multiple_of(KEY_LANES);
    scratch.keys.clear();
    scratch.keys.resize(d * padded, 0.0);
    scratch.values.resize(n * d, 0.0);
    scratch.scores.resize(TILE_ROWS * padded, 0.0);
    let mut j = 0;
    for (k_run, v_run) in cache
        .runs::<T>(layer, false, h, first, end)
        .zip(cache.runs::<T>(layer, true, h, first, end))
    {
        let run_positions = k_run.len() / row_len;
        scratch.run.resize(run_positions * d, 0.0);
        T::load(k_run, &mut scratch.run);
        // Each key's values go down one column of its block of 16 (6 KiB for 96 values each,
        // in L1 while the block's keys are written).
        for (t, key) in scratch.run.chunks_exact(d).enumerate() {
            let column = scratch.keys[transposed_at(j + t, 0, d)..].iter_mut();
            for (to, &v) in column.step_by(KEY_LANES).zip(key) {
                *to = v;
            }
        }
        T::load(v_run, &mut scratch.values[j * d..][..run_positions * d]);
        j += run_positions;
    }

    // Rows (s, g) in order; row r's visible keys are first_visible(pos)..=pos, less `first`.
    let rows: Vec<(usize, &[f32])> = positions
        .clone()
        .flat_map(|s| {
            (0..group).map(move |g| {
                let head = h * group + g;
                (s, &q[s * stride + head * d..][..d])
            })
        })
        .collect();
    let mut result = vec![0f32; rows.len() * d];
    let scale = shape.scale();
    let visible = |s: usize| {
        let pos = start + s;
        shape.first_visible(pos) - first..pos + 1 - first
    };
    for (tile, out) in rows.chunks(TILE_ROWS).zip(result.chunks_mut(TILE_ROWS * d)) {
        // The keys any row of the tile sees; each row's weights are 0 outside its own.
        let keys = visible(tile[0].0).start..visible(tile[tile.len() - 1].0).end;
        let queries: [&[f32]; TILE_ROWS] = std::array::from_fn(|r| tile[r.min(tile.len() - 1)].1);
        score_tile(
            &queries,
            &scratch.keys,
            padded,
            keys.clone(),
            &mut scratch.scores,
        );
        let mut weights: Vec<&[f32]> = Vec::with_capacity(tile.len());
        for (row, &(s, _)) in scratch.scores.chunks_exact_mut(padded).zip(tile) {
            let seen = visible(s);
            vector::softmax(&mut row[seen.clone()], scale);
            row[keys.start..seen.start].fill(0.0);
            row[seen.end..keys.end].fill(0.0);
            weights.push(&row[keys.clone()]);
        }
        let mut outs: Vec<&mut [f32]> = out.chunks_exact_mut(d).collect();
        let values = &scratch.values[keys.start * d..keys.end * d];
        weighted_sum_tile(&weights, values, &mut outs);
    }
    result
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::model::kv_cache::KvShape;

    /// One block a head where the heads keep every thread busy (turn 8 of a chat on
    /// Phi-3-mini, 2 threads), more where they do not, and never an empty block.
    #[test]
    fn query_blocks_follow_heads_and_threads() {
        assert_eq!(query_block(160, 32, 2), 160);
        assert_eq!(query_block(160, 8, 16), 24);
        assert_eq!(query_block(1, 32, 2), TILE_ROWS);
        assert_eq!(query_block(0, 32, 2), TILE_ROWS);
    }

    /// A chunk's attention against decode attention of each of its positions in turn (which
    /// reads only the keys up to its own position): the same up to float summation order,
    /// across cache blocks, query blocks, sliding windows and query heads sharing a KV head,
    /// for each way the cache stores its rows (Q8_0 where the head size is whole blocks).
    #[test]
    fn a_chunk_attends_as_its_positions_one_by_one() {
        let mut rng = StdRng::seed_from_u64(21);
        let pools: Vec<rayon::ThreadPool> = [16, 1, 5]
            .map(|n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap()
            })
            .into();
        for (case, (heads, kv_heads, head_dim, window, cached, seq)) in [
            (4, 4, 96, None, 0, 70),
            (6, 2, 128, None, 37, 41),
            (3, 1, 8, Some(20), 10, 100),
            (2, 2, 64, Some(64), 130, 3),
            (2, 1, 20, None, 0, 2),
        ]
        .into_iter()
        .enumerate()
        {
            for kv_type in KvType::ALL {
                if kv_type == KvType::Q8_0 && head_dim % 32 != 0 {
                    continue;
                }
                let shape = AttentionShape {
                    heads,
                    kv_heads,
                    head_dim,
                    sliding_window: window,
                };
                let kv = KvShape {
                    layers: 1,
                    kv_heads,
                    head_dim,
                    kv_type,
                };
                let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
                let stride = q_width + 2 * kv_width;
                let mut cache = KvCache::new(kv, 1000);
                let mut rows = |n: usize| -> Vec<f32> {
                    (0..n * stride)
                        .map(|_| rng.random::<f32>() * 4.0 - 2.0)
                        .collect()
                };
                let old = rows(cached);
                cache.reserve(cached).unwrap();
                cache.write(0, &old, stride, q_width, q_width + kv_width);
                cache.advance(cached);
                let qkv = rows(seq);
                cache.reserve(seq).unwrap();
                cache.write(0, &qkv, stride, q_width, q_width + kv_width);

                let mut chunk = vec![f32::NAN; seq * q_width];
                // The threads choose the query blocks: the more threads, the more blocks a head.
                pools[case % pools.len()]
                    .install(|| attend_chunk(&shape, &cache, 0, cached, &qkv, stride, &mut chunk));
                let mut one = vec![f32::NAN; q_width];
                for (s, got) in chunk.chunks_exact(q_width).enumerate() {
                    let q = &qkv[s * stride..][..q_width];
                    attend_one(&shape, &cache, 0, cached + s, q, &mut one);
                    for (k, (g, w)) in got.iter().zip(&one).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{kv_type:?}, {heads}/{kv_heads} heads of {head_dim}, window \
                             {window:?}, position {s} of {seq} after {cached}, value {k}: {g} \
                             against {w}"
                        );
                    }
                }
            }
        }
    }
}
