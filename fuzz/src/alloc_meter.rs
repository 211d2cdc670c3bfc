//! A global allocator that counts, per thread, the bytes live on the heap
//! and their peak, so that a target can bound what one call allocated.
//!
//! The binary (a `fuzz_targets/*.rs` file, or `tests/fuzz_replay.rs`)
//! installs [`Meter`] with `#[global_allocator]`; [`peak_during`] then says
//! how far the heap grew while a closure ran on the calling thread. The
//! counters are thread-local, so the test harness's other threads do not
//! disturb a measurement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// [`System`], counting.
pub struct Meter;

thread_local! {
    // `const` and without `Drop`: reading them never allocates and works
    // during thread teardown, which an allocator needs.
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(n);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrank(n: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are
// added, and they never allocate.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old block is counted until the new one exists: a copy
            // briefly holds both.
            grew(new_size);
            shrank(layout.size());
        }
        p
    }
}

/// `f`'s result and the most bytes it had on the heap at once (beyond what
/// was live when it started), on this thread.
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, peak.saturating_sub(base))
}

/// Whether [`Meter`] is the global allocator (a target relying on it
/// asserts this, so that a binary without it fails instead of passing
/// vacuously).
pub fn installed() -> bool {
    let (_, peak) = peak_during(|| std::hint::black_box(vec![0u8; 4096]));
    peak >= 4096
}
