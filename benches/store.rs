//! Throughput of the on-disk history (`src/store/disk.rs`) without sockets:
//! appends per second in each fsync mode with a group commit every `BATCH`
//! messages (one loop iteration's worth), and the cost of paging back
//! through a room that is mostly on disk.
//!
//! Run with `cargo bench --bench store` (plain `fn main`, `harness = false`).
//! Uses a data dir under the system temp dir, removed at the end.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use loopchat::store::disk::{DiskHistory, DiskOptions, Fsync};
use loopchat::store::{History, Kept};
use serde_json::value::RawValue;

/// Messages appended per mode.
const MESSAGES: u64 = 50_000;
/// Messages per commit: what one busy loop iteration might hold.
const BATCH: u64 = 64;

fn message(id: u64) -> Kept {
    let text = format!(
        r#"{{"type":"message","content":"benchmark message number {id} with some text","room":"bench","user":"bencher","id":{id},"ts":1735689600000}}"#
    );
    let raw = RawValue::from_string(text).unwrap_or_else(|e| panic!("bench json: {e}"));
    Kept {
        id,
        json: Rc::from(raw),
    }
}

fn main() {
    let base: PathBuf = std::env::temp_dir().join(format!("loopchat-bench-{}", std::process::id()));
    for fsync in [Fsync::Never, Fsync::Everysec, Fsync::Always] {
        let dir = base.join(fsync.to_string());
        let opts = DiskOptions {
            fsync,
            ..DiskOptions::new(&dir)
        };
        let mut h = DiskHistory::open(&opts).unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        for i in 0..MESSAGES {
            let id = h.reserve_id("bench").unwrap_or_else(|e| panic!("{e}"));
            h.append("bench", message(id))
                .unwrap_or_else(|e| panic!("{e}"));
            if i % BATCH == BATCH - 1 {
                h.commit().unwrap_or_else(|e| panic!("{e}"));
            }
        }
        h.commit().unwrap_or_else(|e| panic!("{e}"));
        let secs = start.elapsed().as_secs_f64();
        let counters = h.counters();
        let get = |name: &str| {
            counters
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, v)| *v)
        };
        println!(
            "append fsync={fsync:<8} {:>9.0} msg/s  ({MESSAGES} msgs, commit every {BATCH}, {} syncs, max sync {} us)",
            MESSAGES as f64 / secs,
            get("store_syncs"),
            get("store_sync_max_us"),
        );

        if fsync == Fsync::Never {
            // Page back through the whole room, 50 at a time, from disk.
            h.release("bench");
            let start = Instant::now();
            let mut before = None;
            let mut pages = 0;
            loop {
                let page = h
                    .before("bench", before, 50)
                    .unwrap_or_else(|e| panic!("{e}"));
                let Some(first) = page.first() else { break };
                before = Some(first.id);
                pages += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "page back: {pages} pages of 50 in {:.1} ms ({:.0} us/page)",
                secs * 1e3,
                secs * 1e6 / f64::from(pages.max(1))
            );
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}
