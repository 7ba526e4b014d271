//! x86_64 kernels. Every kernel here is `#[target_feature]` (or, for a whole product, `unsafe`):
//! call one only when [`super::hardware_level`] is at least its level.

pub mod avx2;
pub mod avx2_gemm;
pub mod avx512;
pub mod avx512_gemm;
pub mod avx512_rows;

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

/// How far ahead of the block in hand the weights are asked for.
const PREFETCH_BYTES: usize = 2048;

/// Asks for the `size_of::<T>()` bytes lying [`PREFETCH_BYTES`] after `block`. Rows lie back to
/// back, so near a row's end this fetches the next row's start; and unlike the hardware
/// prefetchers, it crosses 4 KiB page boundaries, at each of which a decode stream stalled.
#[inline]
#[target_feature(enable = "sse")]
pub(super) fn prefetch_ahead<T>(block: &T) {
    prefetch_slice_ahead(std::slice::from_ref(block));
}

/// [`prefetch_ahead`] for the bytes of `items`.
#[inline]
#[target_feature(enable = "sse")]
pub(super) fn prefetch_slice_ahead<T>(items: &[T]) {
    let at = items.as_ptr().cast::<i8>().wrapping_add(PREFETCH_BYTES);
    for line in (0..size_of_val(items)).step_by(64) {
        // A hint that never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line));
    }
}
