#![no_main]
//! libFuzzer entry for the `ws_read` target; the body is
//! `loopchat_fuzz::ws_read::run`, which `tests/fuzz_replay.rs` also replays.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| loopchat_fuzz::ws_read::run(data));
