#![no_main]
//! libFuzzer entry for the `http_head` target; the body is
//! `loopchat_fuzz::http_head::run`, which `tests/fuzz_replay.rs` also replays.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| loopchat_fuzz::http_head::run(data));
