#![no_main]
//! libFuzzer entry for the `resp` target; the body is
//! `loopchat_fuzz::resp::run`, which `tests/fuzz_replay.rs` also replays.
//! The target bounds each decode's heap use, so it counts allocations.

use libfuzzer_sys::fuzz_target;
use loopchat_fuzz::alloc_meter::Meter;

#[global_allocator]
static HEAP: Meter = Meter;

fuzz_target!(|data: &[u8]| loopchat_fuzz::resp::run(data));
