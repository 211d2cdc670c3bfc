//! Fuzz target `store`: the SQLite store (`store::sqlite::SqliteHistory`)
//! against a plain in-memory model of what the `History` contract
//! promises, as in `tests/store_model.rs`.
//!
//! Input: one byte picks the retention (1–16 ids per room) and the
//! `--fsync` mode; then a program, one operation per byte or few (see
//! [`step`]): appends to four rooms (content from the input), `last`,
//! `after` and `before` pages with small bounds, releases, commits and
//! reopenings (drop, then open the same data dir). Each input gets a fresh
//! data dir (in `/dev/shm` when there is one), removed when the input is
//! done.
//!
//! The model: per room, ids 1, 2, 3, … in order of appends; a read shows
//! only the newest `retain` ids (the store deletes older ones at commits, a
//! chunk at a time, and never serves what it has let go).
//!
//! Invariants after every step: every id and every page equals the
//! model's, each room's whole content does too, and the store is healthy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use loopchat::store::sqlite::{Options, SqliteHistory};
use loopchat::store::{Fsync, History, Kept};
use serde_json::value::RawValue;

use crate::input::Input;

/// Room names of every shape the dispatcher lets through: short, mixed
/// case, dots only, and the longest (32 bytes).
const ROOMS: [&str; 4] = ["a", "B", "..", "abcdefghijklmnopqrstuvwxyz_-0123"];

/// Operations per input: each costs a few SQLite statements.
const MAX_STEPS: usize = 200;

/// Reopenings per input: each joins the helper thread and checkpoints.
const MAX_REOPENS: usize = 3;

/// Page bounds are drawn below these, so that pages end inside the rooms.
const MAX_PAGE: usize = 12;
const MAX_ID_BOUND: u64 = 40;

/// The kept messages of a room, `(id, json)`, oldest first.
type Msgs = Vec<(u64, String)>;

#[derive(Default)]
struct Model {
    /// Per room: the last id handed out, and what is kept.
    rooms: BTreeMap<&'static str, (u64, Msgs)>,
    /// Ids a read shows per room (`--retain-messages`).
    retain: u64,
}

impl Model {
    fn append(&mut self, room: &'static str, content: &str) -> (u64, String) {
        let entry = self.rooms.entry(room).or_default();
        entry.0 += 1;
        let id = entry.0;
        let event = serde_json::json!({
            "type": "message",
            "content": content,
            "room": room,
            "user": "u",
            "id": id,
            "ts": 1_700_000_000_000u64 + id,
        });
        let json = event.to_string();
        entry.1.push((id, json.clone()));
        (id, json)
    }

    /// What a read may show: the newest `retain` ids.
    fn msgs(&self, room: &str) -> &[(u64, String)] {
        self.rooms.get(room).map_or(&[], |(last, m)| {
            let cutoff = last.saturating_sub(self.retain);
            &m[m.partition_point(|(id, _)| *id <= cutoff)..]
        })
    }

    fn last(&self, room: &str, n: usize) -> Msgs {
        let m = self.msgs(room);
        m[m.len().saturating_sub(n)..].to_vec()
    }

    fn after(&self, room: &str, since: u64, max: usize) -> Msgs {
        let m = self.msgs(room).iter().filter(|(id, _)| *id > since);
        m.take(max).cloned().collect()
    }

    fn before(&self, room: &str, before: Option<u64>, limit: usize) -> Msgs {
        let below: Msgs = self
            .msgs(room)
            .iter()
            .filter(|(id, _)| before.map_or(true, |b| *id < b))
            .cloned()
            .collect();
        below[below.len().saturating_sub(limit)..].to_vec()
    }
}

fn got(page: Result<Vec<Kept>, impl std::fmt::Display>, what: &str) -> Msgs {
    match page {
        Ok(v) => v
            .into_iter()
            .map(|k| (k.id, k.json.get().to_string()))
            .collect(),
        Err(e) => panic!("{what} failed: {e}"),
    }
}

/// Where the inputs' data dirs go: in memory when the system has
/// `/dev/shm`, as fuzzing writes a database per input.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
}

/// An input's data dir, named after the process and the input's number
/// and removed when dropped (also when a check panics), so that a run
/// leaves nothing behind.
struct DataDir(PathBuf);

impl DataDir {
    fn new() -> DataDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("loopchat-fuzz-store-{}-{n}", std::process::id());
        let dir = scratch().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        DataDir(dir)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(opts: &Options) -> SqliteHistory {
    match SqliteHistory::open(opts) {
        Ok(store) => store,
        Err(e) => panic!("open failed: {e}"),
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let setup = input.byte();
    let dir = DataDir::new();
    let opts = Options {
        dir: dir.0.clone(),
        fsync: match (setup >> 4) % 3 {
            0 => Fsync::Never,
            1 => Fsync::Everysec,
            _ => Fsync::Always,
        },
        retain: 1 + u64::from(setup % 16),
    };
    let mut store = open(&opts);
    let mut model = Model {
        retain: opts.retain,
        ..Model::default()
    };
    let mut reopens = 0;
    for step_no in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let may_reopen = reopens < MAX_REOPENS;
        let what = match step(&mut input, &mut store, &mut model, may_reopen) {
            Step::Did(what) => what,
            Step::Reopen => {
                reopens += 1;
                // A clean stop commits what is open; the lock is released
                // before the second open takes it.
                drop(store);
                store = open(&opts);
                Did {
                    text: "reopen".to_string(),
                    room: None,
                }
            }
        };
        assert!(store.healthy(), "step {step_no} ({}): unhealthy", what.text);
        // The room the step named, and after a commit or a reopening (when
        // retention runs) every room; every room again at the end.
        let rooms: &[&str] = match what.room {
            Some(room) => &[room],
            None => &ROOMS,
        };
        check_rooms(&mut store, &model, rooms, step_no, &what.text);
    }
    check_rooms(&mut store, &model, &ROOMS, MAX_STEPS, "end");
    // Dropped before `dir`, which then removes the store's files.
    drop(store);
}

/// Each of `rooms`' whole content equals the model's.
fn check_rooms(
    store: &mut SqliteHistory,
    model: &Model,
    rooms: &[&str],
    step_no: usize,
    what: &str,
) {
    for &room in rooms {
        let all = got(store.after(room, 0, 1000), "after");
        assert_eq!(
            all,
            model.msgs(room),
            "step {step_no} ({what}): room {room} differs"
        );
    }
}

/// What a step did: its text for messages, and the one room it can have
/// changed (`None`: any room).
struct Did {
    text: String,
    room: Option<&'static str>,
}

/// What [`step`] did, or that the caller is to reopen the store.
enum Step {
    Did(Did),
    Reopen,
}

/// Decodes and runs one operation (a reopening only while `may_reopen`).
fn step(input: &mut Input, s: &mut SqliteHistory, model: &mut Model, may_reopen: bool) -> Step {
    let op = input.byte();
    let room = ROOMS[usize::from(op >> 5) % ROOMS.len()];
    let bound = |input: &mut Input| u64::from(input.byte()) % MAX_ID_BOUND;
    let limit = |input: &mut Input| usize::from(input.byte()) % MAX_PAGE;
    let did = match op % 8 {
        0..=2 => {
            // The content: up to 7 bytes of the input, so that it can
            // hold quotes, escapes and `"ts":` look-alikes.
            let n = usize::from(op % 8);
            let content = String::from_utf8_lossy(input.take(n)).into_owned();
            let (want, json) = model.append(room, &content);
            let id = match s.reserve_id(room) {
                Ok(id) => id,
                Err(e) => panic!("reserve_id({room}) failed: {e}"),
            };
            assert_eq!(id, want, "id for {room}");
            let raw = match RawValue::from_string(json) {
                Ok(raw) => raw,
                Err(e) => panic!("the model's JSON: {e}"),
            };
            let msg = Kept {
                id,
                json: Rc::from(raw),
            };
            if let Err(e) = s.append(room, msg) {
                panic!("append({room}, {id}) failed: {e}");
            }
            format!("append {room} {id}")
        }
        3 => {
            let n = limit(input);
            let page = got(s.last(room, n), "last");
            assert_eq!(page, model.last(room, n), "last({room}, {n})");
            format!("last {room} {n}")
        }
        4 => {
            let (since, max) = (bound(input), limit(input));
            let page = got(s.after(room, since, max), "after");
            assert_eq!(
                page,
                model.after(room, since, max),
                "after({room}, {since}, {max})"
            );
            format!("after {room} {since} {max}")
        }
        5 => {
            let b = input.byte();
            let before = (b & 0x80 != 0).then(|| u64::from(b) % MAX_ID_BOUND);
            let n = limit(input);
            let page = got(s.before(room, before, n), "before");
            assert_eq!(
                page,
                model.before(room, before, n),
                "before({room}, {before:?}, {n})"
            );
            format!("before {room} {before:?} {n}")
        }
        6 if op & 0x10 != 0 => {
            s.release(room);
            format!("release {room}")
        }
        6 => {
            if let Err(e) = s.commit() {
                panic!("commit failed: {e}");
            }
            "commit".to_string()
        }
        _ if may_reopen => return Step::Reopen,
        _ => {
            if let Err(e) = s.commit() {
                panic!("commit failed: {e}");
            }
            "commit".to_string()
        }
    };
    let room = (!did.starts_with("commit")).then_some(room);
    Step::Did(Did { text: did, room })
}
