//! The SQLite store (`src/store/sqlite.rs`) against a plain in-memory model
//! of what the `History` contract promises: arbitrary sequences of appends
//! to a few rooms, `last` / `after` / `before` pages with limits, releases,
//! commits (with retention) and reopenings, compared after every step.
//!
//! The model: per room, ids 1, 2, 3, … in order of appends; a read shows
//! only the newest `retain` ids of a room (retention deletes the older ones
//! from disk at commits, a chunk at a time, and reads never serve what it
//! has let go but not yet deleted).
//! A second property checks the old store's record reader on arbitrary
//! bytes. Every case uses its own data dir under the system temp dir, removed at
//! the end; proptest bounds the number of cases and steps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use loopchat::store::sqlite::{Options, SqliteHistory};
use loopchat::store::{Fsync, History, Kept};
use proptest::prelude::*;
use serde_json::value::RawValue;

const ROOMS: [&str; 3] = ["a", "B", ".."];

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Last(usize, usize),
    After(usize, u64, usize),
    Before(usize, Option<u64>, usize),
    Release(usize),
    Commit,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let room = 0..ROOMS.len();
    prop_oneof![
        6 => room.clone().prop_map(Op::Append),
        2 => (room.clone(), 0..12usize).prop_map(|(r, n)| Op::Last(r, n)),
        2 => (room.clone(), 0..40u64, 0..12usize).prop_map(|(r, s, m)| Op::After(r, s, m)),
        2 => (room.clone(), proptest::option::of(0..40u64), 0..12usize)
            .prop_map(|(r, b, l)| Op::Before(r, b, l)),
        1 => room.prop_map(Op::Release),
        2 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

/// A room of the model: the last id handed out, and the kept messages
/// `(id, json)`, oldest first.
type ModelRoom = (u64, Vec<(u64, String)>);

/// What the contract says the store holds.
struct Model {
    rooms: BTreeMap<&'static str, ModelRoom>,
    retain: u64,
}

impl Model {
    fn append(&mut self, room: &'static str) -> (u64, String) {
        let entry = self.rooms.entry(room).or_default();
        entry.0 += 1;
        let id = entry.0;
        let json = format!(
            r#"{{"type":"message","content":"m{id} in {room}","room":"{room}","user":"u","id":{id},"ts":{id}}}"#
        );
        entry.1.push((id, json.clone()));
        (id, json)
    }

    /// The messages a read may show: the newest `retain` ids.
    fn msgs(&self, room: &str) -> &[(u64, String)] {
        self.rooms.get(room).map_or(&[], |(last, m)| {
            let cutoff = last.saturating_sub(self.retain);
            &m[m.partition_point(|(id, _)| *id <= cutoff)..]
        })
    }

    fn last(&self, room: &str, n: usize) -> Vec<(u64, String)> {
        let m = self.msgs(room);
        m[m.len().saturating_sub(n)..].to_vec()
    }

    fn after(&self, room: &str, since: u64, max: usize) -> Vec<(u64, String)> {
        self.msgs(room)
            .iter()
            .filter(|(id, _)| *id > since)
            .take(max)
            .cloned()
            .collect()
    }

    fn before(&self, room: &str, before: Option<u64>, limit: usize) -> Vec<(u64, String)> {
        let below: Vec<_> = self
            .msgs(room)
            .iter()
            .filter(|(id, _)| before.map_or(true, |b| *id < b))
            .cloned()
            .collect();
        below[below.len().saturating_sub(limit)..].to_vec()
    }
}

fn got(v: Vec<Kept>) -> Vec<(u64, String)> {
    v.into_iter()
        .map(|k| (k.id, k.json.get().to_string()))
        .collect()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("loopchat-model-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every read of the store equals the model's, after every step, and
    /// every room's whole content does too.
    #[test]
    fn the_store_behaves_like_the_model(
        ops in proptest::collection::vec(op(), 1..80),
        retain in 1..30u64,
        everysec in any::<bool>(),
    ) {
        let tmp = TempDir::new();
        let opts = Options {
            dir: tmp.0.clone(),
            fsync: if everysec { Fsync::Everysec } else { Fsync::Never },
            retain,
        };
        let mut store = SqliteHistory::open(&opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut model = Model { rooms: BTreeMap::new(), retain };
        for (step, op) in ops.iter().enumerate() {
            match *op {
                Op::Append(r) => {
                    let room = ROOMS[r];
                    let (want, json) = model.append(room);
                    let id = store.reserve_id(room).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(id, want, "step {}: id", step);
                    let raw = RawValue::from_string(json).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    store.append(room, Kept { id, json: Rc::from(raw) })
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                Op::Last(r, n) => {
                    let room = ROOMS[r];
                    let a = got(store.last(room, n).map_err(|e| TestCaseError::fail(e.to_string()))?);
                    prop_assert_eq!(a, model.last(room, n), "step {}: {:?}", step, op);
                }
                Op::After(r, since, max) => {
                    let room = ROOMS[r];
                    let a = got(store.after(room, since, max).map_err(|e| TestCaseError::fail(e.to_string()))?);
                    prop_assert_eq!(a, model.after(room, since, max), "step {}: {:?}", step, op);
                }
                Op::Before(r, before, limit) => {
                    let room = ROOMS[r];
                    let a = got(store.before(room, before, limit).map_err(|e| TestCaseError::fail(e.to_string()))?);
                    prop_assert_eq!(a, model.before(room, before, limit), "step {}: {:?}", step, op);
                }
                Op::Release(r) => store.release(ROOMS[r]),
                Op::Commit => {
                    store.commit().map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
                Op::Reopen => {
                    // A clean shutdown commits what is open.
                    drop(store);
                    store = SqliteHistory::open(&opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
            prop_assert!(store.healthy(), "step {}: unhealthy", step);
            for room in ROOMS {
                let all = got(store.after(room, 0, 1000).map_err(|e| TestCaseError::fail(e.to_string()))?);
                prop_assert_eq!(&all, model.msgs(room), "step {}: room {} after {:?}", step, room, op);
            }
        }
    }
}

/// A piece of an old JSON-lines segment: a record, a broken one, junk.
fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0..50u64).prop_map(|id| format!("{{\"type\":\"message\",\"id\":{id}}}\n").into_bytes()),
        (0..50u64).prop_map(|id| format!("{{\"id\":{id}").into_bytes()),
        Just(b"\n".to_vec()),
        Just(b"{\"id\":\"7\"}\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..24),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The old store's record reader (`legacy::parse_segment`) on arbitrary
    /// bytes: it returns, and every record it gives is a whole line of the
    /// input (or its unterminated last line) with that line's own id, ids
    /// strictly increasing: nothing invented, nothing reordered.
    #[test]
    fn the_legacy_reader_invents_nothing(parts in proptest::collection::vec(fragment(), 0..40)) {
        let bytes: Vec<u8> = parts.concat();
        let seg = loopchat::store::legacy::parse_segment(&bytes);
        let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        let mut last = None;
        for r in &seg.records {
            // A record is its line's JSON, without the white space JSON
            // allows around it.
            prop_assert!(
                lines.iter().any(|l| l.trim_ascii() == r.json.as_bytes()),
                "not a line of the input: {:?}",
                r.json
            );
            let v: serde_json::Value = serde_json::from_str(&r.json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(v["id"].as_u64(), Some(r.id));
            prop_assert!(last.map_or(true, |l| r.id > l), "ids not increasing");
            last = Some(r.id);
        }
        let complete = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        let counted = seg.records.len() as u64 + seg.corrupt;
        prop_assert!(counted == complete || counted == complete + 1, "{} lines, {} counted", complete, counted);
    }
}
