//! The SQLite history (`src/store/sqlite.rs`) measured without the loop:
//!
//! - `cargo bench --bench store`: appends per fsync mode (a commit every
//!   `BATCH` messages, one busy iteration's worth); the cost of `history`
//!   pages on a room of 1,000,000 messages; disk and memory for 50,000 rooms
//!   of one message; the start-up time of a store of 10,000 rooms holding
//!   1,000,000 messages. Each part is bounded (about a minute in all) and
//!   uses a data dir under the system temp dir, removed at the end.
//! - `cargo bench --bench store -- fill DIR ROOMS PER_ROOM`: writes a data
//!   dir for the end-to-end runs in `docs/performance.md` (room `big` when
//!   ROOMS is 1, else `r0`, `r1`, …).
//! - `cargo bench --bench store -- attack URL ROOM PER_S SECS`: one client
//!   that asks `history limit 1` of ROOM PER_S times a second for SECS
//!   seconds (the issue's attack), and prints the answers' latency.
//!
//! Plain `fn main` (`harness = false`). Figures are medians of many calls
//! on a shared machine: compare runs side by side, not with other machines.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use loopchat::store::sqlite::{Options, SqliteHistory};
use loopchat::store::{Fsync, History, Kept};
use serde_json::value::RawValue;

/// Messages appended per mode.
const MESSAGES: u64 = 50_000;
/// Messages per commit: what one busy loop iteration might hold.
const BATCH: u64 = 64;

fn message(room: &str, id: u64) -> Kept {
    let text = format!(
        r#"{{"type":"message","content":"benchmark message number {id} with some text","room":"{room}","user":"bencher","id":{id},"ts":1735689600000}}"#
    );
    let raw = RawValue::from_string(text).unwrap_or_else(|e| panic!("bench json: {e}"));
    Kept {
        id,
        json: Rc::from(raw),
    }
}

fn open(dir: &Path, fsync: Fsync) -> SqliteHistory {
    let opts = Options {
        fsync,
        retain: 10_000_000,
        ..Options::new(dir)
    };
    SqliteHistory::open(&opts).unwrap_or_else(|e| panic!("{e}"))
}

fn send(h: &mut SqliteHistory, room: &str) -> usize {
    let id = h.reserve_id(room).unwrap_or_else(|e| panic!("{e}"));
    let m = message(room, id);
    let n = m.json.get().len();
    h.append(room, m).unwrap_or_else(|e| panic!("{e}"));
    n
}

fn get(h: &SqliteHistory, name: &str) -> u64 {
    h.counters()
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, v)| *v)
}

/// Bytes of the database and its log.
fn disk_bytes(dir: &Path) -> u64 {
    ["loopchat.db", "loopchat.db-wal", "loopchat.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Median of `f`'s duration over `n` calls, µs.
fn median_us(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut times: Vec<f64> = (0..n)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[n / 2]
}

/// Fills `rooms` rooms with `per_room` messages each, committing every
/// 1,000, round robin so that rooms interleave as in real traffic.
fn fill(
    h: &mut SqliteHistory,
    rooms: usize,
    per_room: usize,
    name: impl Fn(usize) -> String,
) -> u64 {
    let names: Vec<String> = (0..rooms).map(name).collect();
    let mut bytes = 0u64;
    let mut n = 0u64;
    for _ in 0..per_room {
        for room in &names {
            bytes += send(h, room) as u64;
            // One message per room: a user who joins, says one thing and
            // leaves, so the room has no members right after it.
            if per_room == 1 {
                h.release(room);
            }
            n += 1;
            if n % 1000 == 0 {
                h.commit().unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    h.commit().unwrap_or_else(|e| panic!("{e}"));
    for room in &names {
        h.release(room);
    }
    bytes
}

fn appends(base: &Path) {
    for fsync in [Fsync::Never, Fsync::Everysec, Fsync::Always] {
        let dir = base.join(format!("append-{fsync}"));
        let mut h = open(&dir, fsync);
        let start = Instant::now();
        for i in 0..MESSAGES {
            send(&mut h, "bench");
            if i % BATCH == BATCH - 1 {
                h.commit().unwrap_or_else(|e| panic!("{e}"));
            }
        }
        h.commit().unwrap_or_else(|e| panic!("{e}"));
        let secs = start.elapsed().as_secs_f64();
        println!(
            "append fsync={fsync:<8} {:>8.0} msg/s  {:>5.2} us/msg  ({MESSAGES} msgs, commit every {BATCH}, max commit {} us, {} log syncs)",
            MESSAGES as f64 / secs,
            secs * 1e6 / MESSAGES as f64,
            get(&h, "store_commit_max_us"),
            get(&h, "store_syncs"),
        );
    }
}

fn big_room(base: &Path) {
    let dir = base.join("big");
    let mut h = open(&dir, Fsync::Never);
    let n = 1_000_000usize;
    let start = Instant::now();
    let bytes = fill(&mut h, 1, n, |_| "big".to_string());
    println!(
        "1 room x {n} messages: written in {:.1} s; {} MB on disk (database and log) for {} MB of messages ({:.2}x)",
        start.elapsed().as_secs_f64(),
        disk_bytes(&dir) / 1_000_000,
        bytes / 1_000_000,
        disk_bytes(&dir) as f64 / bytes as f64
    );
    let calls = 2000;
    let last1 = median_us(calls, |_| {
        assert_eq!(h.before("big", None, 1).map(|v| v.len()).ok(), Some(1));
    });
    let last50 = median_us(calls, |_| {
        assert_eq!(h.last("big", 50).map(|v| v.len()).ok(), Some(50));
    });
    let mut seed = 12345u64;
    let mut random_id = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        100 + seed % (n as u64 - 200)
    };
    let before50 = median_us(calls, |_| {
        let b = random_id();
        assert_eq!(h.before("big", Some(b), 50).map(|v| v.len()).ok(), Some(50));
    });
    let after50 = median_us(calls, |_| {
        let s = random_id();
        assert_eq!(h.after("big", s, 50).map(|v| v.len()).ok(), Some(50));
    });
    println!(
        "1M-message room, median of {calls} calls: history limit 1 {last1:.1} us; last 50 {last50:.1} us; before random id, 50 {before50:.1} us; after random id, 50 {after50:.1} us"
    );
    drop(h);
    println!(
        "1M-message room after a clean close (log checkpointed and removed): {} MB on disk for {} MB of messages ({:.2}x)",
        disk_bytes(&dir) / 1_000_000,
        bytes / 1_000_000,
        disk_bytes(&dir) as f64 / bytes as f64
    );
}

fn many_rooms(base: &Path) {
    let dir = base.join("rooms50k");
    let rss0 = rss_kb();
    let mut h = open(&dir, Fsync::Everysec);
    let rss1 = rss_kb();
    let start = Instant::now();
    let bytes = fill(&mut h, 50_000, 1, |i| format!("room-{i}"));
    let secs = start.elapsed().as_secs_f64();
    let rss2 = rss_kb();
    let syncs = get(&h, "store_syncs");
    drop(h);
    println!(
        "50000 rooms x 1 message: {:.1} s, {} log syncs; after a clean close {} kB on disk for {} kB of messages ({:.2}x); RSS {rss0} kB before open, {rss1} kB open, {rss2} kB after ({} B per room ever created)",
        secs,
        syncs,
        disk_bytes(&dir) / 1000,
        bytes / 1000,
        disk_bytes(&dir) as f64 / bytes as f64,
        (rss2.saturating_sub(rss1) * 1024) / 50_000,
    );
    // Three times the rooms: RSS stays put once SQLite's page cache (capped
    // at 16 MiB) is full, since nothing is kept per room.
    let mut h = open(&dir, Fsync::Everysec);
    for round in 1..=3 {
        fill(&mut h, 100_000, 1, |i| format!("more-{round}-{i}"));
        println!(
            "{} rooms x 1 message: RSS {} kB",
            50_000 + round * 100_000,
            rss_kb()
        );
    }
}

fn start_up(base: &Path) {
    let dir = base.join("startup");
    let mut h = open(&dir, Fsync::Never);
    let start = Instant::now();
    let bytes = fill(&mut h, 10_000, 100, |i| format!("room-{i}"));
    println!(
        "10000 rooms x 100 messages: written in {:.1} s, {} MB on disk for {} MB of messages",
        start.elapsed().as_secs_f64(),
        disk_bytes(&dir) / 1_000_000,
        bytes / 1_000_000
    );
    drop(h);
    for run in 1..=4 {
        // Runs 3 and 4 as after a crash: `meta.open` left set.
        let crashed = run > 2;
        if crashed {
            rusqlite::Connection::open(dir.join("loopchat.db"))
                .and_then(|c| {
                    c.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('open', 1)",
                        [],
                    )
                })
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let start = Instant::now();
        let mut h = open(&dir, Fsync::Everysec);
        let opened = start.elapsed();
        let first = Instant::now();
        let page = h.last("room-5000", 50).map(|v| v.len()).ok();
        println!(
            "start-up {run} ({}): open {:.0} ms, then a first page of 50 in {:.0} us ({page:?})",
            if crashed {
                "after a crash: quick_check"
            } else {
                "after a clean stop"
            },
            opened.as_secs_f64() * 1e3,
            first.elapsed().as_secs_f64() * 1e6
        );
    }
}

fn fill_dir(args: &[String]) {
    let [dir, rooms, per_room] = args else {
        panic!("fill DIR ROOMS PER_ROOM");
    };
    let rooms: usize = rooms.parse().unwrap_or_else(|e| panic!("ROOMS: {e}"));
    let per_room: usize = per_room.parse().unwrap_or_else(|e| panic!("PER_ROOM: {e}"));
    let mut h = open(Path::new(dir), Fsync::Never);
    let start = Instant::now();
    let bytes = fill(&mut h, rooms, per_room, |i| {
        if rooms == 1 {
            "big".to_string()
        } else {
            format!("r{i}")
        }
    });
    drop(h);
    println!(
        "filled {dir}: {rooms} rooms x {per_room} messages ({} MB) in {:.1} s; {} MB on disk",
        bytes / 1_000_000,
        start.elapsed().as_secs_f64(),
        disk_bytes(Path::new(dir)) / 1_000_000
    );
}

fn attack(args: &[String]) {
    let [url, room, per_s, secs] = args else {
        panic!("attack URL ROOM PER_S SECS");
    };
    assert!(url.starts_with("ws://127.0.0.1:"), "loopback only: {url}");
    let per_s: u64 = per_s.parse().unwrap_or_else(|e| panic!("PER_S: {e}"));
    let secs: u64 = secs.parse().unwrap_or_else(|e| panic!("SECS: {e}"));
    let (mut ws, _) = tungstenite::connect(format!("{url}?username=attacker&room=attack"))
        .unwrap_or_else(|e| panic!("connect: {e}"));
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let ask = format!(r#"{{"type":"history","room":"{room}","limit":1}}"#);
    let period = Duration::from_secs_f64(1.0 / per_s as f64);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut times = Vec::new();
    let mut next = Instant::now();
    while Instant::now() < end {
        let sent = Instant::now();
        ws.send(tungstenite::Message::text(ask.clone()))
            .unwrap_or_else(|e| panic!("send: {e}"));
        loop {
            let msg = ws.read().unwrap_or_else(|e| panic!("read: {e}"));
            if msg
                .to_text()
                .is_ok_and(|t| t.contains(r#""type":"history""#))
            {
                break;
            }
        }
        times.push(sent.elapsed().as_secs_f64() * 1e3);
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    times.sort_by(f64::total_cmp);
    let p = |q: f64| times[((times.len() as f64 - 1.0) * q) as usize];
    println!(
        "attack: {} answers to history limit 1 of {room}: p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        times.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("fill") => return fill_dir(&args[1..]),
        Some("attack") => return attack(&args[1..]),
        _ => {}
    }
    let base: PathBuf = std::env::temp_dir().join(format!("loopchat-bench-{}", std::process::id()));
    // One part only: `cargo bench --bench store -- rooms`.
    let only = args.first().map(String::as_str);
    let run = |part: &str| only.map_or(true, |o| o == part);
    if run("appends") {
        appends(&base);
    }
    if run("big") {
        big_room(&base);
    }
    if run("rooms") {
        many_rooms(&base);
    }
    if run("startup") {
        start_up(&base);
    }
    let _ = std::fs::remove_dir_all(&base);
}
