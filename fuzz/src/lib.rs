//! The bodies of loopchat's fuzz targets, one module per target.
//!
//! Each module exposes `run(&[u8])`, which drives one part of loopchat
//! through its public API only and panics when an invariant breaks. The
//! `fuzz_targets/*.rs` binaries hand libFuzzer's inputs to it; the root
//! crate's `tests/fuzz_replay.rs` includes the same files by path and
//! replays every committed corpus input on the stable toolchain, so what
//! the fuzzer found stays tested without nightly. Owns no loopchat code.

pub mod alloc_meter;
pub mod command;
pub mod dispatch;
pub mod http_head;
pub mod input;
pub mod legacy;
pub mod resp;
pub mod store;
pub mod ws_read;
