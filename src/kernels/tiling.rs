//! How a matrix product's work is shared out: chunks of output rows (gemv) or tiles of weight
//! rows (gemm), one rayon task each, and the output the tiles write through. A leaf module: the
//! kernel table's drivers and the x86 kernels both use it.

use std::marker::PhantomData;
use std::ops::Range;

use rayon::prelude::*;

/// Weight rows per rayon task for the gemv-based kernels: 32 rows of a 3072-column Q4_K matrix
/// are 54 KiB, well inside L2 next to the activations streaming through.
pub const TILE_ROWS: usize = 32;

/// Output rows per rayon task for gemv.
pub const ROWS_PER_TASK: usize = 32;

/// Activation rows the gemv-based kernels take per weight block.
pub const GROUP: usize = 4;

/// Runs `f` on every tile of `tile_rows` weight rows in parallel, with scratch space from `init`
/// (made once per rayon job, reused across its tiles).
pub(crate) fn tiles_par<S>(
    out: &SharedOut,
    tile_rows: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, &mut Tile) + Sync + Send,
) {
    (0..out.rows.div_ceil(tile_rows))
        .into_par_iter()
        .for_each_init(init, |scratch, t| {
            let start = t * tile_rows;
            // The only Tile of these rows: `tiles_par` makes one per tile index.
            let mut tile = Tile {
                out,
                rows: start..out.rows.min(start + tile_rows),
            };
            f(scratch, &mut tile)
        });
}

/// The output of one call, shared by its tasks; each writes only through its [`Tile`].
pub(crate) struct SharedOut<'a> {
    ptr: *mut f32,
    rows: usize,
    n: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: the only writes through `ptr` are `Tile::set` and `Tile::set_run`, and the tiles alive
// at once cover disjoint weight rows (`tiles_par`), so no element is written by two threads.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(out: &'a mut [f32], rows: usize, n: usize) -> Self {
        assert_eq!(out.len(), rows * n);
        SharedOut {
            ptr: out.as_mut_ptr(),
            rows,
            n,
            _out: PhantomData,
        }
    }
}

/// Write access to the outputs of one tile of weight rows, for every activation row.
pub(crate) struct Tile<'a> {
    out: &'a SharedOut<'a>,
    rows: Range<usize>,
}

impl Tile<'_> {
    /// The weight rows of this tile.
    pub(crate) fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// `out[i * rows + r] = v`, for `r` in this tile.
    pub(crate) fn set(&mut self, i: usize, r: usize, v: f32) {
        assert!(i < self.out.n && self.rows.contains(&r));
        // SAFETY: `i < n` and `r < rows`, so the element lies within the `n * rows` of `out`
        // (asserted in `SharedOut::new`), which `SharedOut` borrows mutably for its lifetime;
        // only this tile writes row `r`'s outputs.
        unsafe { *self.out.ptr.add(i * self.out.rows + r) = v }
    }

    /// `out[i * rows + r] = values[r - first]` for the rows `r` from `first` on, as many as
    /// `values` holds, all in this tile.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn set_run(&mut self, i: usize, first: usize, values: &[f32]) {
        assert!(i < self.out.n);
        assert!(self.rows.start <= first && first + values.len() <= self.rows.end);
        // SAFETY: as in `set`, for each of the rows; `values` is not part of `out`, which
        // `SharedOut` borrows mutably.
        unsafe {
            let at = self.out.ptr.add(i * self.out.rows + first);
            std::ptr::copy_nonoverlapping(values.as_ptr(), at, values.len());
        }
    }
}

/// Runs `dot(row, y)` for every row of `w` (`per_row` elements each) into `out`, in parallel.
pub(crate) fn rows_par<B: Sync, Y: Sync>(
    w: &[B],
    per_row: usize,
    y: &[Y],
    out: &mut [f32],
    dot: impl Fn(&[B], &[Y]) -> f32 + Sync + Send,
) {
    out.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let first = c * ROWS_PER_TASK;
            for (i, o) in chunk.iter_mut().enumerate() {
                let r = first + i;
                *o = dot(&w[r * per_row..(r + 1) * per_row], y);
            }
        });
}

/// `dot(row r of w, [rows i..i + GROUP of y])` for every weight row and group of activation
/// rows, tile by tile in parallel. `w` has `per_row` elements per row, `y` as many per row (the
/// activations' blocks or values), `n` rows; `dot` fills one output per activation row given.
pub(crate) fn groups_par<B: Sync, Y: Sync>(
    w: &[B],
    per_row: usize,
    y: &[Y],
    n: usize,
    out: &SharedOut,
    dot: impl Fn(&[B], &[&[Y]], &mut [f32]) + Sync,
) {
    prepared_groups_par(w, per_row, y, n, out, <[&[Y]]>::to_vec, |w, ys, o| {
        dot(w, ys, o)
    });
}

/// [`groups_par`] with each group of activation rows made once by `prepare` (for the AVX-512
/// K-quant kernels, `x86::avx512_rows::Q8KRows`), not once per weight row.
pub(crate) fn prepared_groups_par<'y, B: Sync, Y: Sync, G: Sync>(
    w: &[B],
    per_row: usize,
    y: &'y [Y],
    n: usize,
    out: &SharedOut,
    prepare: impl Fn(&[&'y [Y]]) -> G,
    dot: impl Fn(&[B], &G, &mut [f32]) + Sync,
) {
    let groups: Vec<G> = (0..n)
        .step_by(GROUP)
        .map(|i0| {
            let rows: Vec<_> = (i0..n.min(i0 + GROUP))
                .map(|i| &y[i * per_row..(i + 1) * per_row])
                .collect();
            prepare(&rows)
        })
        .collect();
    tiles_par(
        out,
        TILE_ROWS,
        || (),
        |(), tile| {
            let mut res = [0f32; GROUP];
            for (g, group) in groups.iter().enumerate() {
                let i0 = g * GROUP;
                let m = GROUP.min(n - i0);
                for r in tile.rows() {
                    dot(&w[r * per_row..(r + 1) * per_row], group, &mut res[..m]);
                    for (k, &v) in res[..m].iter().enumerate() {
                        tile.set(i0 + k, r, v);
                    }
                }
            }
        },
    );
}
