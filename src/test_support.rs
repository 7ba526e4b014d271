//! Fixture access shared by the unit tests: `../shared/fixtures` beside the repository.

use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(name)
}

/// A `*.llamacpp.json` reference file.
pub fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("reference fixture is readable");
    serde_json::from_str(&text).expect("reference fixture is JSON")
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array of ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// Log-softmax of `logits`, computed in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&l| l as f64 - log_sum).collect()
}

/// The test binary's allocator: the system's, counting on each thread the largest single
/// allocation, the bytes allocated and the bytes live, so tests can prove that hostile input
/// allocates nothing big ([`allocations`]) and holds little at once ([`peak_allocation`]).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

struct CountingAllocator;

thread_local! {
    static LARGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static TOTAL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    // Signed: a thread may free what another allocated.
    static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    static PEAK: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

fn note_allocation(size: usize) {
    // `try_with`: allocations made while the thread's locals are torn down are not counted.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    let _ = TOTAL.try_with(|t| t.set(t.get().saturating_add(size)));
    note_live(size as isize);
}

fn note_live(change: isize) {
    let _ = LIVE.try_with(|live| {
        live.set(live.get().saturating_add(change));
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; counting allocates nothing.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        note_live(-(layout.size() as isize));
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        note_live(-(layout.size() as isize));
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

/// What `f` allocated on this thread: `(result, largest single allocation, total bytes)`.
pub fn allocations<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LARGEST.with(|l| l.set(0));
    let total_before = TOTAL.with(|t| t.get());
    let result = f();
    let largest = LARGEST.with(|l| l.get());
    let total = TOTAL.with(|t| t.get()) - total_before;
    (result, largest, total)
}

/// What `f` returns, and the most bytes it held allocated at once on this thread.
pub fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(start));
    let result = f();
    let peak = PEAK.with(|p| p.get()) - start;
    (result, peak.max(0) as usize)
}
