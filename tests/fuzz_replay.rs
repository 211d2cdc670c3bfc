//! Every committed fuzz input, replayed through its target on the stable
//! toolchain, so CI keeps what the fuzzers found without nightly.
//!
//! The target bodies are the very files the `fuzz/` crate builds into
//! libFuzzer binaries (included here by path); each panics when one of its
//! invariants breaks. The inputs are the minimised corpora in
//! `fuzz/corpus/<target>/` and the reproducers of fixed crashes in
//! `fuzz/regressions/<target>/`. See `docs/testing.md`.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

#[path = "../fuzz/src/alloc_meter.rs"]
mod alloc_meter;
#[path = "../fuzz/src/command.rs"]
mod command;
#[path = "../fuzz/src/dispatch.rs"]
mod dispatch;
#[path = "../fuzz/src/http_head.rs"]
mod http_head;
#[path = "../fuzz/src/input.rs"]
mod input;
#[path = "../fuzz/src/legacy.rs"]
mod legacy;
#[path = "../fuzz/src/resp.rs"]
mod resp;
#[path = "../fuzz/src/store.rs"]
mod store;
#[path = "../fuzz/src/ws_read.rs"]
mod ws_read;

/// The `resp` target bounds the heap each decode holds, which needs the
/// counting allocator (it counts per thread, so the other tests do not
/// disturb it).
#[global_allocator]
static HEAP: alloc_meter::Meter = alloc_meter::Meter;

/// A whole corpus replays in well under a second; this only catches a
/// target that hangs.
const DEADLINE: Duration = Duration::from_secs(120);

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    files.sort();
    files
}

/// Run `target` over every input of its corpus, on a thread with a
/// deadline; fail naming the first input that breaks an invariant.
fn replay(name: &'static str, target: fn(&[u8])) {
    let files = inputs(name);
    assert!(
        !files.is_empty(),
        "no corpus for {name} in fuzz/corpus/{name}"
    );
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let mut failed = None;
        for file in &files {
            let data = match fs::read(file) {
                Ok(data) => data,
                Err(e) => {
                    failed = Some(format!("{}: {e}", file.display()));
                    break;
                }
            };
            if panic::catch_unwind(|| target(&data)).is_err() {
                failed = Some(format!("{} breaks an invariant", file.display()));
                break;
            }
        }
        let _ = done.send((files.len(), failed));
    });
    match finished.recv_timeout(DEADLINE) {
        Ok((_, None)) => {}
        Ok((_, Some(failure))) => panic!("{name}: {failure}"),
        Err(_) => panic!("{name}: corpus replay did not finish within {DEADLINE:?}"),
    }
}

#[test]
fn fuzz_replay_http_head() {
    replay("http_head", http_head::run);
}

#[test]
fn fuzz_replay_command() {
    replay("command", command::run);
}

#[test]
fn fuzz_replay_dispatch() {
    replay("dispatch", dispatch::run);
}

#[test]
fn fuzz_replay_ws_read() {
    replay("ws_read", ws_read::run);
}

#[test]
fn fuzz_replay_store() {
    replay("store", store::run);
}

#[test]
fn fuzz_replay_legacy() {
    replay("legacy", legacy::run);
}

#[test]
fn fuzz_replay_resp() {
    replay("resp", resp::run);
}
