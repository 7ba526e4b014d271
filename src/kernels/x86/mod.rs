//! x86_64 kernels. Every kernel here is `#[target_feature]` (or, for a whole product, `unsafe`):
//! call one only when [`super::hardware_level`] is at least its level.

/// Calls `$kernel::<R>` for `R = $ys.len()` or `$count` (1 to [`GROUP`](crate::kernels::tiling::GROUP)): the
/// dispatch of the kernels for several activation rows (`avx2_rows`, `avx512_rows`).
macro_rules! by_rows {
    ($kernel:ident, $w:expr, $ys:expr, $out:expr) => {
        by_rows!($kernel, $w, $ys, $out, $ys.len())
    };
    ($kernel:ident, $w:expr, $ys:expr, $out:expr, $count:expr) => {
        match $count {
            1 => $kernel::<1>($w, $ys, $out),
            2 => $kernel::<2>($w, $ys, $out),
            3 => $kernel::<3>($w, $ys, $out),
            4 => $kernel::<4>($w, $ys, $out),
            r => panic!("{r} activation rows: 1 to 4 expected"),
        }
    };
    // Up to eight rows: for kernels whose work on the weights costs more than four rows'
    // share of the rest.
    (up_to_8 $kernel:ident, $w:expr, $ys:expr, $out:expr) => {
        match $ys.len() {
            5 => $kernel::<5>($w, $ys, $out),
            6 => $kernel::<6>($w, $ys, $out),
            7 => $kernel::<7>($w, $ys, $out),
            8 => $kernel::<8>($w, $ys, $out),
            _ => by_rows!($kernel, $w, $ys, $out),
        }
    };
}
const _: () = assert!(
    crate::kernels::tiling::GROUP == 4,
    "by_rows! covers 1 to 4 rows"
);

/// The `dots` closure of [`panel::gemm`](crate::kernels::panel::gemm) for a level's microkernel
/// `$panel_dots::<K, V, RW, RA>`: one arm per (weight rows, activation rows) shape listed, which
/// must cover every shape the level's blocking makes. Expands inside an `unsafe fn` whose caller
/// guarantees the microkernel's features.
macro_rules! panel_dots_by_shape {
    ($panel_dots:ident::<$k:ty, $v:ident>, $panel:ty, $(($rw:literal, $ra:literal)),+ $(,)?) => {
        |w: &[&[$panel]], a: &[&[$panel]], res: &mut [f32]| match (w.len(), a.len()) {
            $(($rw, $ra) => {
                let (w, a) = (std::array::from_fn(|r| w[r]), std::array::from_fn(|i| a[i]));
                // SAFETY: the caller of the enclosing gemm guarantees the features.
                let r = unsafe { $panel_dots::<$k, $v, $rw, $ra>(w, a) };
                for (res, v) in res.iter_mut().zip(r.iter().flatten()) {
                    *res = *v;
                }
            })+
            (rw, ra) => unreachable!("{rw} x {ra} rows: a shape the blocking does not make"),
        }
    };
}

pub mod avx2;
pub mod avx2_gemm;
pub mod avx2_rows;
pub mod avx512;
pub mod avx512_gemm;
pub mod avx512_rows;
pub mod avx512_x16;
pub mod pack;

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

/// The first `R` rows of `ys`, and `out` checked to have room for them.
#[inline]
fn rows<'a, Y, O, const R: usize>(ys: &[&'a [Y]], out: &[O], blocks: usize) -> [&'a [Y]; R] {
    assert!(ys.len() == R && out.len() == R);
    std::array::from_fn(|i| {
        assert_eq!(ys[i].len(), blocks);
        ys[i]
    })
}

/// How far ahead of the block in hand the weights are asked for.
const PREFETCH_BYTES: usize = 2048;

/// Asks for the `size_of::<T>()` bytes lying [`PREFETCH_BYTES`] after `block`. Rows lie back to
/// back, so near a row's end this fetches the next row's start; and unlike the hardware
/// prefetchers, it crosses 4 KiB page boundaries, at each of which a decode stream stalled.
#[inline]
#[target_feature(enable = "sse")]
pub(super) fn prefetch_ahead<T>(block: &T) {
    let start = std::ptr::from_ref(block).cast::<i8>();
    prefetch_bytes(start.wrapping_add(PREFETCH_BYTES), size_of::<T>());
}

/// Asks for the bytes of `items` themselves.
#[inline]
#[target_feature(enable = "sse")]
pub(crate) fn prefetch_slice<T>(items: &[T]) {
    prefetch_bytes(items.as_ptr().cast(), size_of_val(items));
}

/// Asks for the cache lines of the `len` bytes from `start`.
#[inline]
#[target_feature(enable = "sse")]
pub(super) fn prefetch_bytes(start: *const i8, len: usize) {
    for line in (0..len).step_by(64) {
        // A hint that never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line));
    }
}
