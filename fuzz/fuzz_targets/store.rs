#![no_main]
//! libFuzzer entry for the `store` target; the body is
//! `loopchat_fuzz::store::run`, which `tests/fuzz_replay.rs` also replays.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| loopchat_fuzz::store::run(data));
