#![no_main]
//! libFuzzer entry for the `dispatch` target; the body is
//! `loopchat_fuzz::dispatch::run`, which `tests/fuzz_replay.rs` also replays.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| loopchat_fuzz::dispatch::run(data));
