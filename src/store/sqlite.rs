//! The on-disk history: one SQLite database in the data dir (WAL mode),
//! behind the [`History`] trait.
//!
//! Read `docs/persistence.md` first: it gives the schema, what each `--fsync`
//! mode guarantees and why, recovery, retention, migration and failures from
//! the operator's side. This file owns the connection the loop uses, the
//! schema, the per-iteration transaction and the migration of an old
//! JSON-lines data dir ([`super::legacy`] reads it). `checkpointer` is the
//! helper thread that syncs and checkpoints the write-ahead log off the loop.
//!
//! Everything here runs on the loop thread and is bounded: an append joins
//! the iteration's list, which the commit (or a read before it) inserts in
//! a few multi-row statements, B-tree writes into the page cache; a read is
//! one indexed range query (O(log n + page)); retention deletes at most a
//! fixed batch per commit.
//! The loop waits for the disk in [`History::commit`] with `--fsync
//! always` (by design); otherwise (unless `never`) only around the log
//! starting over: the header sync of the commit that starts it, and the
//! checkpoint of the short rest (at most `TAIL_FRAMES` pages) the helper's
//! checkpoint left (`finish_checkpoint`), and when a log that grew past
//! [`WAL_HARD_FRAMES`] under a load that never let the helper catch up is
//! checkpointed here.
//!
//! It does not own rooms' members, sockets, or the decision what to tell a
//! client when the store fails (the dispatcher answers `history_unavailable`).

mod checkpointer;

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{legacy, Fsync, History, HistoryError, Kept};
use checkpointer::{checkpoint_frames, Checkpointer, Shared, TAIL_FRAMES};

/// The database file in the data dir; SQLite adds `-wal` and `-shm` beside it.
pub const DB_FILE: &str = "loopchat.db";

/// Held with `flock` while a server has the data dir open: SQLite itself
/// would let a second server write to the same file.
const LOCK_FILE: &str = "LOCK";

/// Where a migrated old store's `rooms/` is moved once the migration committed.
pub const MIGRATED_DIR: &str = "rooms.migrated";

/// The schema this code writes (`meta.schema`). A newer one is refused.
/// Schema 3 has the tables of schema 2; what changed is what
/// `rooms.last_id` means (a floor, see `last_id!`), so that a build of
/// schema 2, which took it for the last id, refuses the file instead of
/// handing out ids that are stored already.
const SCHEMA_VERSION: i64 = 3;

/// Descriptors the store holds whatever the number of rooms: the lock, the
/// loop's database and log, the helper's database and log plus its own
/// log descriptor for syncing, and the shared-memory index. Counted in
/// `config::FD_RESERVE`.
pub const DESCRIPTORS: usize = 7;

/// Rows retention may delete per commit, besides one per message appended
/// in it (so a steady room keeps up): bounds the loop's work per iteration
/// while a backlog (a lowered `--retain-messages`) is worked off.
pub const RETENTION_BATCH: u64 = 1000;

/// A room's oldest messages are deleted once at least this share of its
/// retention (1 in 100, at least 1 and at most [`RETENTION_BATCH`] rows)
/// is past it, in one range: a delete changes the same few pages whatever
/// it deletes (the oldest leaf, its parent, the free-list trunk, the
/// header page), so deleting as many rows as each commit appended, every
/// commit, wrote about five pages more per commit to the log, most of the
/// difference in CPU per message to the JSON-lines store under `--fsync
/// always` (`docs/performance.md`). A room so holds at least N messages
/// on disk and fewer than N + chunk (the JSON-lines store: up to a
/// segment, N/10, more); reads never serve the ones past N
/// (`SqliteHistory::retained_floor`).
fn retention_chunk(retain: u64) -> u64 {
    (retain / 100).clamp(1, RETENTION_BATCH)
}

/// Rooms retention looks at every [`SWEEP_EVERY`] commits besides those
/// written in them, in turn, so that rooms nobody writes to any more are
/// trimmed too (after `--retain-messages` was lowered).
const SWEEP_ROOMS: usize = 8;

/// Commits between two looks at [`SWEEP_ROOMS`] rooms.
const SWEEP_EVERY: u32 = 16;

/// A log this long means the helper's checkpoints could not finish under a
/// load without pauses (each needs a moment with no commit in between): the
/// loop checkpoints it itself, between two transactions (~64 MiB of log).
pub const WAL_HARD_FRAMES: u64 = 16_000;

/// After a checkpoint the log file is cut back to this size: without it,
/// the file stays as large as it ever grew.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// SQLite's page cache for the loop's connection: the hot top of every
/// B-tree and the newest pages of busy rooms; other pages are read from
/// the kernel's cache. Not larger: once retention deletes rows, every
/// commit walks the whole hash table of this cache (SQLite's
/// `pcache1TruncateUnsafe`, from the end of each transaction), which with
/// 16 MiB cost 4–5 % of the server's CPU under a steady load, with 2 MiB
/// about 1 % (see `docs/performance.md`).
const CACHE_KIB: i64 = 2 * 1024;

/// Rows per multi-row `INSERT`, largest first: the iteration's messages
/// go to SQLite at commit (or before a read) in as few statements as these
/// sizes allow, so that one statement's set-up and one descent of the
/// B-tree serve many rows (see `SqliteHistory::flush`).
const INSERT_SIZES: [usize; 3] = [32, 8, 1];

/// Prepared statements kept by the loop's connection: more than the
/// store's distinct statements (about 16).
const STATEMENT_CACHE: usize = 48;

/// Room names are 1–32 bytes (the protocol's rule; checked by the
/// dispatcher, bounded here again because this is what goes to disk).
const MAX_ROOM_NAME: usize = 32;

/// The number of bits of a message's key that hold its per-room id; the
/// bits above them hold the room's `rid` (see [`key`]). A macro, so that the
/// SQL below spells the same number as the Rust code.
macro_rules! id_bits {
    () => {
        40
    };
}

/// Bits of the key for the per-room id: 2^40 - 1 (about 1.1e12) ids per
/// room, which is this server's whole measured peak (about 22,000 messages
/// a second, `docs/performance.md`) into one room for a year and a half, or
/// a room of 1,000 messages a second for 35 years.
pub const ID_BITS: u32 = id_bits!();

/// The largest id a room can have: its next message is refused
/// ([`HistoryError::Full`]), never written under another room's key.
pub const MAX_ID: u64 = (1 << ID_BITS) - 1;

/// The largest `rooms.rid` (2^23 - 1, about 8.4 million rooms ever
/// written to; rooms are never removed from `rooms`, since their ids must
/// not go back): the key is a signed 64-bit integer kept positive, so
/// 63 - [`ID_BITS`] bits are left for the room. A room past it is refused
/// ([`HistoryError::Full`]); the rooms below keep working.
pub const MAX_RID: i64 = (1 << (63 - ID_BITS)) - 1;

/// The key of message `id` of room `rid`: `rid << ID_BITS | id`, so that one
/// room's messages are one contiguous range of keys, in id order. `None`
/// past either cap, where packing would give another room's key.
pub fn key(rid: i64, id: u64) -> Option<i64> {
    if !(1..=MAX_RID).contains(&rid) || id > MAX_ID {
        return None;
    }
    // Both fit: at most 23 bits shifted by 40, or'ed with at most 40 bits.
    Some(rid << ID_BITS | id as i64)
}

/// The `(rid, id)` a key packs (the inverse of [`key`]).
pub fn unpack(key: i64) -> (i64, u64) {
    (key >> ID_BITS, (key as u64) & MAX_ID)
}

/// The keys of room `rid`'s messages with ids in `lo..=hi` (clamped to the
/// ids a room can have).
fn key_range(rid: i64, lo: u64, hi: u64) -> (i64, i64) {
    let base = rid << ID_BITS;
    (base | lo.min(MAX_ID) as i64, base | hi.min(MAX_ID) as i64)
}

/// `messages` holds one row per message, keyed by the pair (room, id)
/// packed into one integer ([`key`]), the table's rowid: an append at the
/// end of a room's range is an insert into a rowid B-tree, which SQLite
/// does with less rebalancing than a `WITHOUT ROWID` table of a composite
/// key (`docs/performance.md`), and every read is a range of the rowid.
/// `room` and `id` are virtual columns (computed when read, not stored),
/// for inspection with `sqlite3`; the store's queries use `key`.
const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS rooms(
    rid INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages(
    key INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    json TEXT NOT NULL,
    room INTEGER GENERATED ALWAYS AS (key >> ",
    id_bits!(),
    ") VIRTUAL,
    id INTEGER GENERATED ALWAYS AS (key & ((1 << ",
    id_bits!(),
    ") - 1)) VIRTUAL
);
CREATE TABLE IF NOT EXISTS quarantine(
    room INTEGER NOT NULL,
    id INTEGER NOT NULL,
    json BLOB,
    found_ms INTEGER NOT NULL,
    PRIMARY KEY(room, id)
) WITHOUT ROWID;
"
);

/// Created first, on its own: it says which schema the rest has.
const META: &str = "CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY,
    value ANY
) WITHOUT ROWID;";

/// The last id stored in the room of the `rooms` row in scope: the greater
/// of `rooms.last_id` and the id of the room's newest message (one descent
/// of the rowid B-tree, from the end of the room's range). Commits do not
/// write `rooms.last_id`: the newest message is the last id, and no commit
/// has to change a second page (the `rooms` row) besides the messages' own.
/// The column is only raised where the newest message alone would say too
/// little: ids of a failed transaction (`carry`), a newest row quarantined,
/// and an old store's reservation at migration. Retention never deletes a
/// room's newest message (it keeps at least one id), so the rule holds
/// whatever it deleted, and whatever a crash left (a message and its id are
/// one row, committed or not together).
macro_rules! last_id {
    () => {
        concat!(
            "max(rooms.last_id, coalesce((SELECT key FROM messages
                 WHERE key > (rooms.rid << ",
            id_bits!(),
            ") AND key <= ((rooms.rid << ",
            id_bits!(),
            ") | ((1 << ",
            id_bits!(),
            ") - 1)) ORDER BY key DESC LIMIT 1) & ((1 << ",
            id_bits!(),
            ") - 1), 0))"
        )
    };
}

const SELECT_ROOM: &str = concat!("SELECT rid, ", last_id!(), " FROM rooms WHERE name = ?1");
const INSERT_ROOM: &str = "INSERT INTO rooms(name, last_id) VALUES (?1, 0)";
const UNDO_ROOM: &str = "DELETE FROM rooms WHERE rid = ?1";
const INSERT_MESSAGE: &str = "INSERT INTO messages(key, ts, json) VALUES (?1, ?2, ?3)";
/// Raises `rooms.last_id` of room `?1` to its last id, before a row that
/// may be its newest is deleted (quarantine): without it, that id would be
/// handed out again (see `last_id!`).
const FREEZE_LAST_ID: &str = concat!(
    "UPDATE rooms SET last_id = ",
    last_id!(),
    " WHERE name = ?1"
);
const SAVE_LAST_ID: &str = "INSERT INTO rooms(name, last_id) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET last_id = max(last_id, excluded.last_id)";
/// Room `?1`'s messages with ids up to `?2` (`-1..=MAX_ID`), newest first.
/// The bounds are the room's key range (`rid << 40` is its id 0, which no
/// message has); a room without a row gives NULL bounds and no rows. No
/// bound is above `i64::MAX`, even for the last `rid`.
const BEFORE: &str = concat!(
    "SELECT key, json FROM messages
     WHERE key > (SELECT rid << ",
    id_bits!(),
    " FROM rooms WHERE name = ?1)
       AND key <= (SELECT rid << ",
    id_bits!(),
    " FROM rooms WHERE name = ?1) + ?2
     ORDER BY key DESC LIMIT ?3"
);
/// Room `?1`'s messages with ids above `?2` (`0..MAX_ID`), oldest first.
const AFTER: &str = concat!(
    "SELECT key, json FROM messages
     WHERE key > (SELECT rid << ",
    id_bits!(),
    " FROM rooms WHERE name = ?1) + ?2
       AND key <= (SELECT (rid << ",
    id_bits!(),
    ") | ((1 << ",
    id_bits!(),
    ") - 1) FROM rooms WHERE name = ?1)
     ORDER BY key LIMIT ?3"
);
/// The oldest key in a room's range `?1..=?2`.
const OLDEST: &str = "SELECT key FROM messages WHERE key BETWEEN ?1 AND ?2 ORDER BY key LIMIT 1";
const DELETE_RANGE: &str = "DELETE FROM messages WHERE key BETWEEN ?1 AND ?2";
const SWEEP: &str = concat!(
    "SELECT rid, ",
    last_id!(),
    " FROM rooms WHERE rid > ?1 ORDER BY rid LIMIT ?2"
);
const QUARANTINE: &str = concat!(
    "INSERT OR REPLACE INTO quarantine(room, id, json, found_ms)
     SELECT key >> ",
    id_bits!(),
    ", key & ((1 << ",
    id_bits!(),
    ") - 1), CAST(json AS BLOB), ?2 FROM messages WHERE key = ?1"
);
const DELETE_ONE: &str = "DELETE FROM messages WHERE key = ?1";

/// How to open the store.
#[derive(Clone, Debug)]
pub struct Options {
    /// Data directory (created if missing).
    pub dir: PathBuf,
    pub fsync: Fsync,
    /// Messages kept per room (at least 1), counted in ids: reads serve the
    /// messages among a room's newest `retain` ids (`retained_floor`); on
    /// disk it also holds up to a chunk (`retention_chunk`, a hundredth) of
    /// older ones until retention deletes them together.
    pub retain: u64,
}

impl Options {
    /// Options with the defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Options {
            dir: dir.into(),
            fsync: Fsync::default(),
            retain: 100_000,
        }
    }
}

/// Why the store could not be opened. Each displays as one line naming the
/// path, for the server to print before exiting with status 1.
#[derive(Debug)]
pub enum OpenError {
    /// An option is out of range.
    BadOption(&'static str),
    /// The data dir does not exist and could not be created.
    Create { dir: PathBuf, source: io::Error },
    /// The data dir exists but files cannot be created or written in it.
    NotWritable { dir: PathBuf, source: io::Error },
    /// Another process has the data dir open.
    Locked { dir: PathBuf },
    /// SQLite could not open or set up the database.
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The database file is damaged (`PRAGMA quick_check` or SQLite said so).
    Corrupt { path: PathBuf, detail: String },
    /// The database was written by a newer loopchat.
    NewerSchema { path: PathBuf, version: i64 },
    /// An old JSON-lines data dir could not be migrated (nothing was changed).
    Migrate { dir: PathBuf, detail: String },
    /// A database of an earlier schema could not be rewritten into this
    /// one (nothing was changed).
    Upgrade { path: PathBuf, detail: String },
    /// The helper thread could not be started.
    Thread(io::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::BadOption(what) => f.write_str(what),
            OpenError::Create { dir, source } => {
                write!(f, "cannot create data dir {}: {source}", dir.display())
            }
            OpenError::NotWritable { dir, source } => {
                write!(f, "data dir {} is not writable: {source}", dir.display())
            }
            OpenError::Locked { dir } => write!(
                f,
                "data dir {} is in use by another loopchat process ({LOCK_FILE} is locked)",
                dir.display()
            ),
            OpenError::Database { path, source } => {
                write!(f, "cannot open database {}: {source}", path.display())
            }
            OpenError::Corrupt { path, detail } => write!(
                f,
                "database {} is corrupt ({detail}); restore a backup or move it aside",
                path.display()
            ),
            OpenError::NewerSchema { path, version } => write!(
                f,
                "database {} has schema {version}, newer than this loopchat's {SCHEMA_VERSION}",
                path.display()
            ),
            OpenError::Migrate { dir, detail } => write!(
                f,
                "cannot migrate the old store in {}: {detail} (nothing was changed)",
                dir.display()
            ),
            OpenError::Upgrade { path, detail } => write!(
                f,
                "cannot upgrade database {} to schema {SCHEMA_VERSION}: {detail} (nothing was changed)",
                path.display()
            ),
            OpenError::Thread(e) => write!(f, "cannot start the store's helper thread: {e}"),
        }
    }
}

impl std::error::Error for OpenError {}

/// A room written to in this process and not released since.
struct Live {
    rid: i64,
    /// The last id handed out (maybe not yet stored).
    last_id: u64,
    /// The last id stored: an append must be above it.
    stored: u64,
    /// No message of the room is older than this (learned by retention).
    oldest: Option<u64>,
    /// The room is in `txn_rooms` (written in the open transaction).
    written: bool,
}

/// A message appended in the open transaction and not yet handed to SQLite.
struct Pending {
    /// The message's [`key`].
    key: i64,
    json: Rc<RawValue>,
}

/// The multi-row `INSERT` of `rows` messages.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT INTO messages(key, ts, json) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?)");
    }
    sql
}

/// A room retention looks at: `(rid, last stored id, oldest id if known,
/// name when it is live)`.
type TrimTarget = (i64, u64, Option<u64>, Option<Box<str>>);

/// Just the field a read checks against the row's key.
#[derive(Deserialize)]
struct IdOnly {
    id: u64,
}

/// The on-disk [`History`]: see the module doc and `docs/persistence.md`.
pub struct SqliteHistory {
    /// Declared first: dropped (closed) before `shared`, which its WAL hook
    /// points to.
    conn: Connection,
    checkpointer: Option<Checkpointer>,
    shared: Arc<Shared>,
    db_path: PathBuf,
    retain: u64,
    live: HashMap<Box<str>, Live>,
    /// A transaction is open (begun by the first write of the iteration).
    in_txn: bool,
    /// Rooms written in the open transaction: `(name, rid)`.
    txn_rooms: Vec<(Box<str>, i64)>,
    /// Messages appended in the open transaction.
    txn_appends: u64,
    /// Rooms the open transaction created (counted in `rooms` once it
    /// commits: a rolled-back row never existed).
    txn_new_rooms: u64,
    /// Messages appended but not yet inserted (see [`SqliteHistory::flush`]).
    pending: Vec<Pending>,
    /// The statements of [`INSERT_SIZES`], in that order.
    insert_sql: [String; INSERT_SIZES.len()],
    /// A transaction holding appended messages was rolled back outside
    /// [`History::commit`] (a failed insert before a read, or SQLite rolling
    /// back on its own): the next commit reports it, so that the dispatcher
    /// refuses those messages.
    lost: Option<String>,
    /// Rooms released while written in the open transaction.
    released: Vec<Box<str>>,
    /// Last ids of a transaction that failed: written again by the next
    /// one, so that no id handed out is handed out again.
    carry: Vec<(Box<str>, u64)>,
    /// Retention's turn through the rooms table (`rid` of the last looked at).
    sweep_after: i64,
    /// Commits until retention looks at the next rooms in turn.
    sweep_countdown: u32,
    rooms: u64,
    appends: u64,
    append_errors: u64,
    commits: u64,
    commit_errors: u64,
    commit_last_us: u64,
    commit_max_us: u64,
    loop_checkpoints: u64,
    /// The loop's checkpoints of the short rest a helper's checkpoint left.
    tail_checkpoints: u64,
    /// The log (counted by its restarts) for which the helper was woken.
    woke_at: Option<u64>,
    /// Log length at the loop's last checkpoint.
    loop_checkpoint_at: u64,
    /// Log length at which the helper is woken (`checkpoint_frames`).
    checkpoint_frames: u64,
    corrupt_rows: u64,
    retention_deleted: u64,
    migrated: u64,
    /// The last write or commit failed.
    failing: bool,
    /// SQLite reported the file damaged at run time: unhealthy until restart.
    broken: bool,
    /// Holds the `flock` on `LOCK` for as long as the store is open.
    _lock: File,
}

/// Records the log's length after every commit of the loop's connection;
/// installing it also turns SQLite's automatic checkpoints off.
unsafe extern "C" fn wal_hook(
    ctx: *mut c_void,
    _db: *mut rusqlite::ffi::sqlite3,
    _name: *const c_char,
    frames: c_int,
) -> c_int {
    // SAFETY: `ctx` is the `Shared` of the store owning this connection,
    // which outlives it (see `SqliteHistory::conn`).
    let shared = unsafe { &*(ctx as *const Shared) };
    let frames = u64::try_from(frames).unwrap_or(0);
    // Shorter than after the last commit: this commit started the log over,
    // which (unless `never`) synced its header on the loop.
    if frames < shared.frames.swap(frames, Ordering::SeqCst) {
        shared.restarts.fetch_add(1, Ordering::Relaxed);
    }
    rusqlite::ffi::SQLITE_OK
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The `ts` of a message event's JSON (0 without one), for the `ts` column.
/// The dispatcher writes `ts` after `content`, and a `"ts":` inside a
/// string is escaped (`\"ts\":`), so the last unescaped one is the field;
/// this scan is what keeps a second JSON parse off every append.
fn ts_of(json: &str) -> i64 {
    // The dispatcher's events end with it (`…,"ts":1735689600000}`): digits
    // right before the closing brace cannot be inside a string.
    if let Some(body) = json.strip_suffix('}') {
        let digits = body.bytes().rev().take_while(u8::is_ascii_digit).count();
        let (head, tail) = body.split_at(body.len() - digits);
        if digits > 0 && head.ends_with("\"ts\":") && !head.ends_with("\\\"ts\":") {
            return tail.parse().unwrap_or(0);
        }
    }
    let bytes = json.as_bytes();
    let mut end = bytes.len();
    while let Some(at) = json[..end].rfind("\"ts\":") {
        if at == 0 || bytes[at - 1] != b'\\' {
            let digits = &json[at + 5..];
            let n = digits.bytes().take_while(u8::is_ascii_digit).count();
            return digits[..n].parse().unwrap_or(0);
        }
        end = at;
    }
    0
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Creates `dir` and its missing parents, and syncs the parent of each one
/// created, so that a power cut soon after cannot lose the new entries.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.as_os_str().is_empty() || fs::symlink_metadata(d).is_ok() {
            break;
        }
        missing.push(d);
        at = d.parent();
    }
    fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Takes the data dir's lock, or says who has it.
fn lock_dir(dir: &Path) -> Result<File, OpenError> {
    let not_writable = |source| OpenError::NotWritable {
        dir: dir.to_path_buf(),
        source,
    };
    let lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(not_writable)?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::WouldBlock {
            OpenError::Locked {
                dir: dir.to_path_buf(),
            }
        } else {
            not_writable(e)
        });
    }
    // The pid tells an operator who holds it; writing it also proves the
    // directory's files are writable.
    lock.set_len(0)
        .and_then(|()| lock.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0))
        .and_then(|()| lock.sync_data())
        .map_err(not_writable)?;
    Ok(lock)
}

/// The `synchronous` setting of a mode (see `docs/persistence.md`).
fn synchronous(fsync: Fsync) -> &'static str {
    match fsync {
        Fsync::Always => "FULL",
        Fsync::Everysec => "NORMAL",
        Fsync::Never => "OFF",
    }
}

/// SQLite's process-wide settings, set once before its first connection:
/// memory statistics off, since with them every one of SQLite's
/// allocations (several per commit and per statement) takes a global mutex,
/// and nothing in loopchat reads them. After SQLite was initialised (a
/// connection opened elsewhere first) the call changes nothing.
fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sqlite3_config` takes an int for this option; before
        // `sqlite3_initialize` it sets it, after it returns SQLITE_MISUSE.
        // The server opens its store before any other SQLite use.
        let _ = unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int)
        };
    });
}

/// Opens a connection to `path` with the settings both of ours share.
fn connect(path: &Path, fsync: Fsync) -> rusqlite::Result<Connection> {
    configure_sqlite();
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!("journal mode is {mode}, not wal")),
        ));
    }
    // Without the planner's stability guarantee, SQLite marks a statement
    // whose plan could depend on a bound value (a `LIMIT ?` is enough) to
    // be compiled again after each new binding: every page read would
    // parse its SQL anew (tens of µs). The plans here are key searches
    // whatever the values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {};
         PRAGMA temp_store = MEMORY;
         PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};",
        synchronous(fsync)
    ))?;
    Ok(conn)
}

impl SqliteHistory {
    /// Opens (creating if needed) the data dir and its database, takes the
    /// dir's lock, checks the file, and migrates an old JSON-lines store
    /// found there. Blocks: call it before the loop starts.
    pub fn open(opts: &Options) -> Result<SqliteHistory, OpenError> {
        if opts.retain == 0 {
            return Err(OpenError::BadOption("--retain-messages must be at least 1"));
        }
        let dir = opts.dir.clone();
        create_dir_durable(&dir).map_err(|source| OpenError::Create {
            dir: dir.clone(),
            source,
        })?;
        let lock = lock_dir(&dir)?;
        let db_path = dir.join(DB_FILE);
        let db_err = |source: rusqlite::Error| {
            if is_corruption(&source) {
                OpenError::Corrupt {
                    path: db_path.clone(),
                    detail: source.to_string(),
                }
            } else {
                OpenError::Database {
                    path: db_path.clone(),
                    source,
                }
            }
        };
        let conn = connect(&db_path, opts.fsync).map_err(db_err)?;
        // Room for every statement the loop runs (rusqlite keeps 16): one
        // evicted is parsed again on its next use.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.execute_batch(&format!("PRAGMA cache_size = -{CACHE_KIB};"))
            .map_err(db_err)?;
        conn.execute_batch(META).map_err(db_err)?;
        // `meta.open` is set while a server has the file open and removed
        // by a clean stop. Left set, the last run ended in a crash (or a
        // power cut): check the pages' structure (not every row's content)
        // before serving. It reads the whole file (about 0.5 s per 250 MB
        // from the page cache), so a clean restart skips it.
        let unclean: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'open'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)?;
        if unclean.is_some() {
            let check: String = conn
                .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
                .map_err(db_err)?;
            if check != "ok" {
                // Its report spans lines; the operator gets one.
                let mut detail = check.split_whitespace().collect::<Vec<_>>().join(" ");
                if let Some((cut, _)) = detail.char_indices().nth(200) {
                    detail.truncate(cut);
                }
                return Err(OpenError::Corrupt {
                    path: db_path,
                    detail,
                });
            }
            log::info!(
                "{}: not closed cleanly last time; quick_check ok",
                db_path.display()
            );
        }
        let version: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)?;
        match version {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(OpenError::NewerSchema {
                    path: db_path,
                    version: v,
                })
            }
            Some(1) => upgrade_from_1(&conn, &db_path, opts.fsync)?,
            // Same tables; `rooms.last_id` holds every room's last id, a
            // valid floor (`last_id!`).
            Some(2) => conn
                .execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema'",
                    [SCHEMA_VERSION],
                )
                .map(|_| ())
                .map_err(db_err)?,
            Some(_) => conn.execute_batch(SCHEMA).map_err(db_err)?,
            None => {
                conn.execute_batch(SCHEMA).map_err(db_err)?;
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(db_err)?;
            }
        }
        let migrated = migrate(&conn, &dir, opts.fsync)?;
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('open', ?1)",
            [now_ms()],
        )
        .map_err(db_err)?;
        let rooms: i64 = conn
            .query_row("SELECT count(*) FROM rooms", [], |r| r.get(0))
            .map_err(db_err)?;
        let rooms = u64::try_from(rooms).unwrap_or(0);

        let shared = Arc::new(Shared::default());
        // SAFETY: the hook's context is `shared`, kept alive by the store
        // for longer than `conn` (field order), and only read as `Shared`.
        unsafe {
            rusqlite::ffi::sqlite3_wal_hook(
                conn.handle(),
                Some(wal_hook),
                Arc::as_ptr(&shared) as *mut c_void,
            );
        }
        let helper = connect(&db_path, opts.fsync).map_err(db_err)?;
        let wal = dir.join(format!("{DB_FILE}-wal"));
        let checkpointer = Checkpointer::spawn(helper, wal, opts.fsync, Arc::clone(&shared))
            .map_err(OpenError::Thread)?;
        log::info!(
            "history: {} in {} ({rooms} rooms; fsync {}, retain {} per room)",
            DB_FILE,
            dir.display(),
            opts.fsync,
            opts.retain
        );
        Ok(SqliteHistory {
            conn,
            checkpointer: Some(checkpointer),
            shared,
            db_path,
            retain: opts.retain,
            live: HashMap::new(),
            in_txn: false,
            txn_rooms: Vec::new(),
            txn_appends: 0,
            txn_new_rooms: 0,
            pending: Vec::new(),
            insert_sql: INSERT_SIZES.map(insert_sql),
            lost: None,
            released: Vec::new(),
            carry: Vec::new(),
            sweep_after: 0,
            sweep_countdown: 1,
            rooms,
            appends: 0,
            append_errors: 0,
            commits: 0,
            commit_errors: 0,
            commit_last_us: 0,
            commit_max_us: 0,
            loop_checkpoints: 0,
            tail_checkpoints: 0,
            woke_at: None,
            loop_checkpoint_at: 0,
            checkpoint_frames: checkpoint_frames(opts.fsync),
            corrupt_rows: 0,
            retention_deleted: 0,
            migrated,
            failing: false,
            broken: false,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db_path
    }

    /// Notes a failed SQLite call: corruption makes the store unhealthy for
    /// good; a transaction SQLite rolled back on its own (disk full, I/O
    /// error) is handled as a failed commit.
    fn failed(&mut self, e: rusqlite::Error) -> HistoryError {
        if is_corruption(&e) && !self.broken {
            log::error!("database {} is corrupt: {e}", self.db_path.display());
            self.broken = true;
        }
        if self.in_txn && self.conn.is_autocommit() {
            self.abandon_txn();
        }
        HistoryError::Sqlite(e)
    }

    /// Opens the iteration's transaction if it is not open yet. A failed
    /// transaction's last ids are written first.
    fn begin(&mut self) -> Result<(), HistoryError> {
        if self.in_txn {
            return Ok(());
        }
        let begun = self
            .conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut begin| begin.execute([]));
        if let Err(e) = begun {
            return Err(self.failed(e));
        }
        self.in_txn = true;
        let carried: rusqlite::Result<u64> = (|| {
            let mut find = self.conn.prepare_cached(SELECT_ROOM)?;
            let mut save = self.conn.prepare_cached(SAVE_LAST_ID)?;
            let mut created = 0;
            for (name, last) in &self.carry {
                // The room's row may have been rolled back with the rest.
                if find.query_row([&**name], |_| Ok(())).optional()?.is_none() {
                    created += 1;
                }
                save.execute(params![&**name, i64::try_from(*last).unwrap_or(i64::MAX)])?;
            }
            Ok(created)
        })();
        match carried {
            Ok(created) => {
                self.txn_new_rooms += created;
                Ok(())
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// The transaction is gone without committing (rolled back by us or by
    /// SQLite): remember the last ids of its rooms for the next one, and
    /// forget their cached state, which may name rows that never were.
    fn abandon_txn(&mut self) {
        for (name, _) in std::mem::take(&mut self.txn_rooms) {
            if let Some(live) = self.live.remove(&name) {
                match self.carry.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, last)) => *last = (*last).max(live.last_id),
                    None => self.carry.push((name, live.last_id)),
                }
            }
        }
        // Rooms only reserved from (no row written) hold ids too.
        for (name, live) in self.live.drain() {
            if live.last_id > live.stored {
                self.carry.push((name, live.last_id));
            }
        }
        self.released.clear();
        self.in_txn = false;
        if self.txn_appends > 0 && self.lost.is_none() {
            self.lost = Some("the transaction holding them was rolled back".into());
        }
        self.txn_appends = 0;
        self.txn_new_rooms = 0;
        self.pending.clear();
    }

    /// The live state of `room`, loaded (or the room created) if needed.
    fn live(&mut self, room: &str) -> Result<&mut Live, HistoryError> {
        if !self.live.contains_key(room) {
            self.begin()?;
            let carried = self
                .carry
                .iter()
                .find(|(n, _)| &**n == room)
                .map_or(0, |(_, l)| *l);
            let found: rusqlite::Result<(i64, u64, bool)> = (|| {
                let row = self
                    .conn
                    .prepare_cached(SELECT_ROOM)?
                    .query_row([room], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                    .optional()?;
                Ok(match row {
                    Some((rid, last)) => (rid, u64::try_from(last).unwrap_or(0), false),
                    None => {
                        self.conn.prepare_cached(INSERT_ROOM)?.execute([room])?;
                        (self.conn.last_insert_rowid(), 0, true)
                    }
                })
            })();
            let (rid, last, created) = match found {
                Ok(f) => f,
                Err(e) => return Err(self.failed(e)),
            };
            if rid > MAX_RID {
                // Its messages' keys would collide with no room's but lie
                // outside the positive keys: refused. A row just made is
                // taken back, so that the next room tried gets the same
                // rid and is refused too (rids are the largest plus one).
                if created {
                    let undone = self
                        .conn
                        .prepare_cached(UNDO_ROOM)
                        .and_then(|mut undo| undo.execute([rid]));
                    if let Err(e) = undone {
                        return Err(self.failed(e));
                    }
                }
                return Err(HistoryError::Full(format!(
                    "room {room:?} cannot be stored: {MAX_RID} rooms exist"
                )));
            }
            if created {
                self.txn_new_rooms += 1;
            }
            self.live.insert(
                room.into(),
                Live {
                    rid,
                    last_id: last.max(carried),
                    stored: last,
                    oldest: None,
                    written: false,
                },
            );
        }
        self.live
            .get_mut(room)
            .ok_or_else(|| HistoryError::Corrupt("room state vanished".into()))
    }

    /// The highest id of `room` that retention has let go: its last stored
    /// id less `--retain-messages`. Retention deletes a chunk at a time
    /// (`retention_chunk`), so up to a chunk of rows at or below this may
    /// still be on disk; reads do not serve them, so a client sees at most
    /// the newest `retain` messages, as it did when every commit trimmed.
    fn retained_floor(&mut self, room: &str) -> Result<u64, HistoryError> {
        if let Some(live) = self.live.get(room) {
            return Ok(live.stored.saturating_sub(self.retain));
        }
        let last: rusqlite::Result<Option<i64>> = self
            .conn
            .prepare_cached(SELECT_ROOM)
            .and_then(|mut find| find.query_row([room], |r| r.get(1)).optional());
        match last {
            Ok(last) => Ok(last
                .and_then(|l| u64::try_from(l).ok())
                .unwrap_or(0)
                .saturating_sub(self.retain)),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Rows of one page query, oldest first when `newest_first` is false.
    /// Rows whose JSON does not parse, or names another id than the row's
    /// key, are moved to `quarantine` (reported once, never served).
    fn page(
        &mut self,
        sql: &str,
        room: &str,
        bound: i64,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Kept>, HistoryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.insert_before_reading()?;
        // Keys of unreadable rows.
        let mut bad: Vec<i64> = Vec::new();
        let result: rusqlite::Result<Vec<Kept>> = (|| {
            let mut stmt = self.conn.prepare_cached(sql)?;
            let mut rows = stmt.query(params![
                room,
                bound,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut out = Vec::with_capacity(limit.min(512));
            while let Some(row) = rows.next()? {
                let key: i64 = row.get(0)?;
                let (_, id) = unpack(key);
                let json = row.get_ref(1)?.as_str().ok();
                let kept = json.and_then(|text| {
                    let raw: Box<RawValue> = serde_json::from_str(text).ok()?;
                    let IdOnly { id: named } = serde_json::from_str(raw.get()).ok()?;
                    (id == named).then(|| Kept {
                        id,
                        json: Rc::from(raw),
                    })
                });
                match kept {
                    Some(k) => out.push(k),
                    None => bad.push(key),
                }
            }
            Ok(out)
        })();
        let mut out = match result {
            Ok(out) => out,
            Err(e) => return Err(self.failed(e)),
        };
        if !bad.is_empty() {
            self.quarantine(room, &bad);
        }
        if newest_first {
            out.reverse();
        }
        Ok(out)
    }

    /// Moves unreadable rows out of `messages`, in the iteration's
    /// transaction. Best effort: if that fails they are skipped again (and
    /// reported again) by the next read.
    fn quarantine(&mut self, room: &str, bad: &[i64]) {
        for &key in bad {
            let (_, id) = unpack(key);
            log::warn!(
                "room {room:?}: message {id} in {} is unreadable; moved to table quarantine",
                self.db_path.display()
            );
        }
        self.corrupt_rows += bad.len() as u64;
        if self.begin().is_err() {
            return;
        }
        let moved: rusqlite::Result<()> = (|| {
            // In the same transaction as the deletes: the room's last id
            // must not go down with its newest row.
            self.conn.prepare_cached(FREEZE_LAST_ID)?.execute([room])?;
            let mut copy = self.conn.prepare_cached(QUARANTINE)?;
            let mut delete = self.conn.prepare_cached(DELETE_ONE)?;
            for &key in bad {
                copy.execute(params![key, now_ms()])?;
                delete.execute(params![key])?;
            }
            Ok(())
        })();
        if let Err(e) = moved {
            log::warn!("cannot quarantine unreadable rows: {e}");
            let _ = self.failed(e);
        }
    }

    /// Hands the messages appended since the last call to SQLite, in the
    /// open transaction: in multi-row `INSERT`s of [`INSERT_SIZES`] rows,
    /// so that a busy iteration costs a few statements, not one per
    /// message. Called by the commit and before every read (which must see
    /// the iteration's messages). On an error some rows may be in the
    /// transaction and others not: the caller rolls it back.
    fn insert_pending(&mut self) -> rusqlite::Result<()> {
        // SQLite may roll a transaction back by itself after an error (disk
        // full, I/O): what follows would then run outside any transaction.
        if self.in_txn && self.conn.is_autocommit() {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("the transaction was rolled back".into()),
            ));
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending);
        let inserted = (|| {
            let mut rest = &pending[..];
            for (sql, size) in self.insert_sql.iter().zip(INSERT_SIZES) {
                if rest.len() < size {
                    continue;
                }
                let mut insert = self.conn.prepare_cached(sql)?;
                while rest.len() >= size {
                    let (now, later) = rest.split_at(size);
                    for (i, row) in now.iter().enumerate() {
                        let at = 3 * i + 1;
                        insert.raw_bind_parameter(at, row.key)?;
                        insert.raw_bind_parameter(at + 1, ts_of(row.json.get()))?;
                        insert.raw_bind_parameter(at + 2, row.json.get())?;
                    }
                    insert.raw_execute()?;
                    rest = later;
                }
            }
            Ok(())
        })();
        // Keeps the buffer's capacity for the next iteration.
        pending.clear();
        self.pending = pending;
        inserted
    }

    /// [`SqliteHistory::insert_pending`] before a read, which must see the
    /// iteration's messages. If it fails, the transaction is rolled back and
    /// the next commit reports its messages lost.
    fn insert_before_reading(&mut self) -> Result<(), HistoryError> {
        match self.insert_pending() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.append_errors += 1;
                Err(self.roll_back(e))
            }
        }
    }

    /// Rolls the open transaction back after `e` (if SQLite has not done so
    /// already) and forgets its state (`abandon_txn`).
    fn roll_back(&mut self, e: rusqlite::Error) -> HistoryError {
        log::warn!("history transaction failed, rolled back: {e}");
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.abandon_txn();
        self.failing = true;
        self.failed(e)
    }

    /// Retention for this commit: first the rooms written in it, then a few
    /// others in turn, deleting at most a budget of rows in all.
    fn trim(&mut self) -> rusqlite::Result<()> {
        let mut budget = RETENTION_BATCH + self.txn_appends;
        let chunk = retention_chunk(self.retain);
        let mut targets: Vec<TrimTarget> = Vec::new();
        for (name, rid) in &self.txn_rooms {
            if let Some(live) = self.live.get(name) {
                // Known to hold less than a chunk past its retention: no
                // query at all (the common case, nearly every commit).
                if live.oldest.is_some_and(|o| {
                    o.saturating_add(self.retain).saturating_add(chunk - 1) > live.stored
                }) {
                    continue;
                }
                targets.push((*rid, live.stored, live.oldest, Some(name.clone())));
            }
        }
        self.sweep_countdown = self.sweep_countdown.saturating_sub(1);
        if self.sweep_countdown == 0 {
            self.sweep_countdown = SWEEP_EVERY;
            let mut sweep = self.conn.prepare_cached(SWEEP)?;
            let mut rows = sweep.query(params![self.sweep_after, SWEEP_ROOMS as i64])?;
            let mut last = None;
            while let Some(row) = rows.next()? {
                let rid: i64 = row.get(0)?;
                let last_id: i64 = row.get(1)?;
                targets.push((rid, u64::try_from(last_id).unwrap_or(0), None, None));
                last = Some(rid);
            }
            // At the end of the table, start over.
            self.sweep_after = last.unwrap_or(0);
        }
        let mut oldest = self.conn.prepare_cached(OLDEST)?;
        let mut delete = self.conn.prepare_cached(DELETE_RANGE)?;
        for (rid, last, known, name) in targets {
            if budget == 0 {
                break;
            }
            let lo = match known {
                Some(lo) => lo,
                None => {
                    let (first, last) = key_range(rid, 1, MAX_ID);
                    match oldest
                        .query_row([first, last], |r| r.get::<_, i64>(0))
                        .optional()?
                    {
                        Some(key) => unpack(key).1,
                        None => continue,
                    }
                }
            };
            let Some(cutoff) = last.checked_sub(self.retain) else {
                if let Some(live) = name.as_deref().and_then(|n| self.live.get_mut(n)) {
                    live.oldest = Some(lo);
                }
                continue;
            };
            let mut next_oldest = lo;
            if lo <= cutoff && cutoff - lo + 1 >= chunk {
                // Ids are unique, so this range holds at most `budget` rows.
                let hi = cutoff.min(lo.saturating_add(budget - 1));
                let (first, last) = key_range(rid, lo, hi);
                let n = delete.execute(params![first, last])? as u64;
                self.retention_deleted += n;
                budget = budget.saturating_sub(n.max(1));
                next_oldest = hi + 1;
            }
            // A lower bound of the oldest id: exact unless ids have gaps.
            if let Some(live) = name.as_deref().and_then(|n| self.live.get_mut(n)) {
                live.oldest = Some(next_oldest);
            }
        }
        Ok(())
    }

    /// Copies the rest of the log the helper's last checkpoint left, if it
    /// is short ([`TAIL_FRAMES`] pages): with nothing left to copy, the next
    /// commit starts the log over and writes to pages of the file the
    /// kernel already holds, instead of growing it by a page per page
    /// written (see `checkpointer`). Between two transactions, so nothing
    /// is committed meanwhile and the checkpoint reaches the log's end.
    fn finish_checkpoint(&mut self) {
        let s = &self.shared;
        let frames = s.frames.load(Ordering::SeqCst);
        let done = s.backfilled.load(Ordering::SeqCst);
        if done == 0 {
            // Once per log: the commit that took it past the threshold.
            if frames >= self.checkpoint_frames
                && self.woke_at != Some(s.restarts.load(Ordering::SeqCst))
            {
                self.woke_at = Some(s.restarts.load(Ordering::SeqCst));
                if let Some(helper) = &self.checkpointer {
                    helper.wake();
                }
            }
            return;
        }
        // Taken either way. If the log started over since (its pages are
        // counted anew) or grew too far since the helper's checkpoint, the
        // helper's next one is cheaper than a long pause here.
        s.backfilled.store(0, Ordering::SeqCst);
        if s.backfilled_restarts.load(Ordering::SeqCst) != s.restarts.load(Ordering::SeqCst)
            || frames < done
            || frames - done > TAIL_FRAMES
        {
            return;
        }
        self.tail_checkpoints += 1;
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0))
        {
            log::warn!("checkpoint on the loop failed: {e}");
        }
    }

    /// The loop's own checkpoint of a log the helper could not keep short.
    fn checkpoint_if_huge(&mut self) {
        let frames = self.shared.frames.load(Ordering::SeqCst);
        // Not again while a reader (an operator's `sqlite3`) keeps the log
        // from starting over: only once it grew by another hard limit.
        if frames < WAL_HARD_FRAMES || frames < self.loop_checkpoint_at + WAL_HARD_FRAMES / 2 {
            if frames < self.loop_checkpoint_at {
                self.loop_checkpoint_at = 0;
            }
            return;
        }
        self.loop_checkpoint_at = frames;
        self.loop_checkpoints += 1;
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0))
        {
            log::warn!("checkpoint on the loop failed: {e}");
        }
        // Whatever it did, the helper looks again at the next commit.
    }
}

/// Rewrites a database of schema 1, whose `messages` was a `WITHOUT ROWID`
/// table keyed by the columns `(room, id)`, into this schema (the pair
/// packed into one integer key, [`key`]), in one transaction: a crash or
/// an error before its commit leaves schema 1 as it was, and the next start
/// tries again. Blocks (it copies every message once); run at start only.
fn upgrade_from_1(conn: &Connection, path: &Path, fsync: Fsync) -> Result<(), OpenError> {
    let fail = |detail: String| OpenError::Upgrade {
        path: path.to_path_buf(),
        detail,
    };
    let start = Instant::now();
    // Durable before anything is served from it, whatever `--fsync` says.
    conn.execute_batch("PRAGMA synchronous = FULL")
        .map_err(|e| fail(e.to_string()))?;
    let copy = || -> Result<u64, String> {
        let sql = |e: rusqlite::Error| e.to_string();
        conn.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
        // A row past the key's caps has no key: refuse rather than guess.
        let (rows, beyond): (i64, i64) = conn
            .query_row(
                "SELECT count(*), count(*) FILTER (WHERE room NOT BETWEEN 1 AND ?1
                                                   OR id NOT BETWEEN 1 AND ?2)
                 FROM messages",
                params![MAX_RID, MAX_ID as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql)?;
        if beyond > 0 {
            return Err(format!(
                "{beyond} messages have a room past {MAX_RID} or an id past {MAX_ID}"
            ));
        }
        conn.execute_batch(&format!(
            "ALTER TABLE messages RENAME TO messages_schema_1;
             {SCHEMA}"
        ))
        .map_err(sql)?;
        // In key order, so that every row is appended at the table's end.
        let copied = conn
            .execute(
                &format!(
                    "INSERT INTO messages(key, ts, json)
                     SELECT room << {ID_BITS} | id, ts, json FROM messages_schema_1
                     ORDER BY room, id"
                ),
                [],
            )
            .map_err(sql)?;
        if copied as i64 != rows {
            return Err(format!("copied {copied} of {rows} messages"));
        }
        conn.execute_batch(&format!(
            "DROP TABLE messages_schema_1;
             UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema';
             COMMIT;"
        ))
        .map_err(sql)?;
        Ok(copied as u64)
    };
    let copied = match copy() {
        Ok(n) => n,
        Err(detail) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(fail(detail));
        }
    };
    // The old table's pages are free now (as many as the new table's): give
    // them back, or the file stays twice its size until rows reuse them.
    // Only space is at stake, so a failure (a disk too full for the copy
    // VACUUM makes) is logged, not fatal: the upgrade is committed.
    if let Err(e) = conn.execute_batch("VACUUM") {
        log::warn!("{}: VACUUM after the upgrade failed: {e}", path.display());
    }
    // Committed and synced already: the checkpoint only keeps the log of
    // the copy from lingering at its full size.
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        log::warn!(
            "{}: checkpoint after the upgrade failed: {e}",
            path.display()
        );
    }
    conn.execute_batch(&format!("PRAGMA synchronous = {}", synchronous(fsync)))
        .map_err(|source| OpenError::Database {
            path: path.to_path_buf(),
            source,
        })?;
    log::info!(
        "{}: {copied} messages rewritten from schema 1 to {SCHEMA_VERSION} in {:.1} s",
        path.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Copies an old JSON-lines store under `dir` into the database in one
/// transaction, then moves its `rooms/` aside. Returns the messages copied.
/// A crash before the commit leaves the old store as it was (the next start
/// migrates again); one after it leaves `meta.migrated` set, and the next
/// start only moves the old files aside.
fn migrate(conn: &Connection, dir: &Path, fsync: Fsync) -> Result<u64, OpenError> {
    if !legacy::present(dir) {
        return Ok(0);
    }
    let fail = |detail: String| OpenError::Migrate {
        dir: dir.to_path_buf(),
        detail,
    };
    let done: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'migrated'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(|e| fail(e.to_string()))?;
    let mut copied = 0;
    if done.is_none() {
        let start = Instant::now();
        let rooms = legacy::room_dirs(dir).map_err(|e| fail(e.to_string()))?;
        // Durable before the old files move, whatever `--fsync` says: the
        // commit syncs the log, the checkpoint below the database.
        conn.execute_batch("PRAGMA synchronous = FULL")
            .map_err(|e| fail(e.to_string()))?;
        let copy = || -> Result<u64, String> {
            conn.execute_batch("BEGIN IMMEDIATE")
                .map_err(|e| e.to_string())?;
            let mut copied = 0u64;
            let mut insert = conn.prepare(INSERT_MESSAGE).map_err(|e| e.to_string())?;
            for (name, path) in &rooms {
                let room = legacy::read_room(name, path).map_err(|e| e.to_string())?;
                let last = i64::try_from(room.last_id).map_err(|e| e.to_string())?;
                conn.execute(SAVE_LAST_ID, params![name, last])
                    .map_err(|e| e.to_string())?;
                let rid: i64 = conn
                    .query_row("SELECT rid FROM rooms WHERE name = ?1", [name], |r| {
                        r.get(0)
                    })
                    .map_err(|e| e.to_string())?;
                for r in &room.records {
                    let key = key(rid, r.id).ok_or_else(|| {
                        format!(
                            "room {name:?}, id {}: past the store's caps ({MAX_RID} rooms, \
                             ids up to {MAX_ID})",
                            r.id
                        )
                    })?;
                    insert
                        .execute(params![key, ts_of(&r.json), r.json])
                        .map_err(|e| format!("room {name:?}, id {}: {e}", r.id))?;
                    copied += 1;
                }
            }
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('migrated', ?1)",
                [now_ms()],
            )
            .map_err(|e| e.to_string())?;
            conn.execute_batch("COMMIT").map_err(|e| e.to_string())?;
            Ok(copied)
        };
        copied = match copy() {
            Ok(n) => n,
            Err(detail) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(fail(detail));
            }
        };
        conn.query_row("PRAGMA wal_checkpoint(FULL)", [], |r| r.get::<_, i64>(0))
            .map_err(|e| fail(e.to_string()))?;
        conn.execute_batch(&format!("PRAGMA synchronous = {}", synchronous(fsync)))
            .map_err(|e| fail(e.to_string()))?;
        log::info!(
            "migrated {copied} messages in {} rooms from {} in {:.1} s",
            rooms.len(),
            dir.join(legacy::ROOMS_DIR).display(),
            start.elapsed().as_secs_f64()
        );
    }
    let mut aside = dir.join(MIGRATED_DIR);
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = dir.join(format!("{MIGRATED_DIR}.{n}"));
    }
    fs::rename(dir.join(legacy::ROOMS_DIR), &aside)
        .and_then(|()| File::open(dir)?.sync_all())
        .map_err(|e| fail(format!("migrated, but cannot move rooms/ aside: {e}")))?;
    log::info!("the old store's files are kept in {}", aside.display());
    Ok(copied)
}

/// Room names the store accepts (the dispatcher checks the protocol's rule).
fn check_room_name(room: &str) -> Result<(), HistoryError> {
    if room.is_empty() || room.len() > MAX_ROOM_NAME {
        return Err(HistoryError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("room name of {} bytes", room.len()),
        )));
    }
    Ok(())
}

impl History for SqliteHistory {
    fn reserve_id(&mut self, room: &str) -> Result<u64, HistoryError> {
        check_room_name(room)?;
        let live = match self.live(room) {
            Ok(live) => live,
            Err(e) => {
                self.append_errors += 1;
                // No room left for a new room is that room's refusal, not a
                // failing store.
                if !matches!(e, HistoryError::Full(_)) {
                    self.failing = true;
                }
                return Err(e);
            }
        };
        if live.last_id >= MAX_ID {
            return Err(HistoryError::Full(format!(
                "room {room:?} ran out of ids (the last is {MAX_ID})"
            )));
        }
        live.last_id += 1;
        Ok(live.last_id)
    }

    fn append(&mut self, room: &str, msg: Kept) -> Result<(), HistoryError> {
        let Some(live) = self.live.get(room) else {
            return Err(HistoryError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "append before reserve_id",
            )));
        };
        if msg.id <= live.stored || msg.id > live.last_id {
            return Err(HistoryError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "id {} was not reserved or is not above the last kept",
                    msg.id
                ),
            )));
        }
        let rid = live.rid;
        // `reserve_id` and `live` keep both below their caps.
        let key = key(rid, msg.id).ok_or_else(|| {
            HistoryError::Full(format!("room {room:?}: id {} cannot be stored", msg.id))
        })?;
        if let Err(e) = self.begin() {
            self.append_errors += 1;
            self.failing = true;
            return Err(e);
        }
        // Inserted with the iteration's others by `insert_pending`; the row
        // is the room's last id too (`last_id!`), no `rooms` write.
        self.pending.push(Pending {
            key,
            json: msg.json,
        });
        if let Some(live) = self.live.get_mut(room) {
            live.stored = msg.id;
            if !live.written {
                live.written = true;
                self.txn_rooms.push((room.into(), rid));
            }
        }
        self.txn_appends += 1;
        self.appends += 1;
        Ok(())
    }

    fn last(&mut self, room: &str, n: usize) -> Result<Vec<Kept>, HistoryError> {
        self.before(room, None, n)
    }

    fn after(&mut self, room: &str, since: u64, max: usize) -> Result<Vec<Kept>, HistoryError> {
        // No room has an id past `MAX_ID`.
        if since >= MAX_ID {
            return Ok(Vec::new());
        }
        let floor = self.retained_floor(room)?;
        self.page(AFTER, room, since.max(floor) as i64, max, false)
    }

    fn before(
        &mut self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Kept>, HistoryError> {
        // The last id wanted, -1 for none (`before` 0); both caps fit in
        // an i64 with room to spare.
        let last = before.map_or(MAX_ID as i64, |b| b.min(MAX_ID + 1) as i64 - 1);
        let floor = self.retained_floor(room)?;
        let mut page = self.page(BEFORE, room, last, limit, true)?;
        // Oldest first: what is under the floor is at the front, and a
        // page short for it has nothing older to show anyway.
        page.retain(|k| k.id > floor);
        Ok(page)
    }

    fn release(&mut self, room: &str) {
        // Written in the open transaction: its state is still needed if the
        // commit fails (`abandon_txn`); the commit drops it.
        match self.live.get(room) {
            Some(live) if !live.written => {
                self.live.remove(room);
            }
            Some(_) if !self.released.iter().any(|n| &**n == room) => {
                self.released.push(room.into());
            }
            _ => {}
        }
    }

    fn commit(&mut self) -> Result<(), HistoryError> {
        if !self.in_txn {
            // Messages whose transaction was rolled back since the last
            // commit (before a read): the dispatcher must not deliver them.
            return match self.lost.take() {
                Some(why) => {
                    self.commit_errors += 1;
                    Err(HistoryError::RolledBack(why))
                }
                None => Ok(()),
            };
        }
        let start = Instant::now();
        // The rooms' last ids are their newest messages (`last_id!`):
        // nothing else to write.
        if let Err(e) = self.insert_pending() {
            let e = self.roll_back(e);
            // Reported by this error, not again by the next commit.
            self.lost = None;
            self.commit_errors += 1;
            return Err(e);
        }
        if let Err(e) = self.trim() {
            log::warn!("retention failed: {e}");
            let e = self.failed(e);
            if !self.in_txn {
                self.commit_errors += 1;
                self.failing = true;
                return Err(e);
            }
        }
        let result = self
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut commit| commit.execute([]))
            .map(|_| ());
        let us = micros(start);
        self.commit_last_us = us;
        self.commit_max_us = self.commit_max_us.max(us);
        match result {
            Ok(()) => {
                self.in_txn = false;
                self.commits += 1;
                self.shared.commits.fetch_add(1, Ordering::SeqCst);
                self.carry.clear();
                self.txn_appends = 0;
                self.rooms += std::mem::take(&mut self.txn_new_rooms);
                for (name, _) in self.txn_rooms.drain(..) {
                    if let Some(live) = self.live.get_mut(&name) {
                        live.written = false;
                    }
                }
                for name in std::mem::take(&mut self.released) {
                    self.live.remove(&name);
                }
                self.lost = None;
                self.failing = false;
                self.finish_checkpoint();
                self.checkpoint_if_huge();
                Ok(())
            }
            Err(e) => {
                let e = self.roll_back(e);
                self.lost = None;
                self.commit_errors += 1;
                Err(e)
            }
        }
    }

    fn healthy(&self) -> bool {
        !self.failing && !self.broken && !self.shared.failing.load(Ordering::SeqCst)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.shared;
        let wal_bytes = s.frames.load(Ordering::Relaxed) * 4096;
        vec![
            ("store_rooms", self.rooms),
            ("store_appends", self.appends),
            ("store_append_errors", self.append_errors),
            ("store_commits", self.commits),
            ("store_commit_errors", self.commit_errors),
            ("store_commit_last_us", self.commit_last_us),
            ("store_commit_max_us", self.commit_max_us),
            ("store_syncs", s.syncs.load(Ordering::Relaxed)),
            ("store_sync_errors", s.sync_errors.load(Ordering::Relaxed)),
            ("store_sync_last_us", s.sync_last_us.load(Ordering::Relaxed)),
            ("store_sync_max_us", s.sync_max_us.load(Ordering::Relaxed)),
            ("store_checkpoints", s.checkpoints.load(Ordering::Relaxed)),
            (
                "store_checkpoint_errors",
                s.checkpoint_errors.load(Ordering::Relaxed),
            ),
            (
                "store_checkpoint_max_us",
                s.checkpoint_max_us.load(Ordering::Relaxed),
            ),
            ("store_loop_checkpoints", self.loop_checkpoints),
            ("store_tail_checkpoints", self.tail_checkpoints),
            ("store_wal_bytes", wal_bytes),
            ("store_wal_restarts", s.restarts.load(Ordering::Relaxed)),
            ("store_corrupt_rows", self.corrupt_rows),
            ("store_retention_deleted", self.retention_deleted),
            ("store_migrated_messages", self.migrated),
        ]
    }
}

impl Drop for SqliteHistory {
    /// Clean shutdown: commit what is open, mark the file closed (unless the
    /// store is failing: the next start then checks it), stop the helper
    /// (its last sync), then close the loop's connection, which as the last
    /// one checkpoints the log into the database and removes it.
    fn drop(&mut self) {
        if self.in_txn {
            if let Err(e) = self.commit() {
                log::warn!("final commit failed: {e}");
            }
        }
        // Only after everything else is committed: the next start trusts it.
        if self.healthy() {
            if let Err(e) = self.conn.execute("DELETE FROM meta WHERE key = 'open'", []) {
                log::warn!("cannot mark the database closed: {e}");
            }
        }
        self.checkpointer = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::SeqCst);
            let path = std::env::temp_dir()
                .join(format!("loopchat-sqlite-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn kept(room: &str, id: u64) -> Kept {
        let text = format!(
            r#"{{"type":"message","content":"m{id}","room":"{room}","user":"u","id":{id},"ts":{id}}}"#
        );
        Kept {
            id,
            json: Rc::from(RawValue::from_string(text).expect("json")),
        }
    }

    fn send(h: &mut SqliteHistory, room: &str, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let id = h.reserve_id(room).expect("id");
                h.append(room, kept(room, id)).expect("append");
                id
            })
            .collect()
    }

    fn ids(v: &[Kept]) -> Vec<u64> {
        v.iter().map(|k| k.id).collect()
    }

    fn counter(h: &SqliteHistory, name: &str) -> u64 {
        h.counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| v)
    }

    fn opts(dir: &Path, retain: u64) -> Options {
        Options {
            dir: dir.to_path_buf(),
            fsync: Fsync::Never,
            retain,
        }
    }

    /// Every read is a search of the primary key, never a scan of a table.
    #[test]
    fn reads_are_range_searches_of_the_primary_key() {
        let tmp = TempDir::new("plan");
        let h = SqliteHistory::open(&opts(&tmp.0, 10)).expect("open");
        for sql in [
            BEFORE,
            AFTER,
            OLDEST,
            DELETE_RANGE,
            SELECT_ROOM,
            SWEEP,
            FREEZE_LAST_ID,
        ] {
            let mut stmt = h
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("plan");
            let args = vec![1i64; stmt.parameter_count()];
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .expect("rows")
                .collect::<Result<_, _>>()
                .expect("plan rows");
            assert!(
                plan.iter().all(|step| !step.starts_with("SCAN")),
                "{sql}: {plan:?}"
            );
            assert!(
                plan.iter().any(|step| step.starts_with("SEARCH")),
                "{plan:?}"
            );
        }
    }

    /// With `everysec` the log is four times longer before the helper
    /// checkpoints it: there the syncs of its starting over are the loop's
    /// only ones.
    #[test]
    fn everysec_lets_the_log_grow_longer_before_a_checkpoint() {
        for (fsync, frames) in [
            (Fsync::Always, 1000),
            (Fsync::Everysec, 4000),
            (Fsync::Never, 1000),
        ] {
            let tmp = TempDir::new("threshold");
            let h = SqliteHistory::open(&Options {
                fsync,
                ..opts(&tmp.0, 100)
            })
            .expect("open");
            assert_eq!(h.checkpoint_frames, frames, "{fsync}");
        }
    }

    /// The loop copies the short rest a helper's checkpoint left, so that
    /// the next commit starts the log over (under a load without pauses a
    /// passive checkpoint never reaches the log's end by itself); a rest
    /// longer than `TAIL_FRAMES` it leaves to the helper.
    #[test]
    fn the_loop_finishes_a_checkpoint_with_a_short_rest() {
        let tmp = TempDir::new("tail");
        let mut h = SqliteHistory::open(&opts(&tmp.0, 1_000_000)).expect("open");
        // Below the helper's threshold: it stays out of the way.
        for _ in 0..5 {
            send(&mut h, "busy", 20);
            h.commit().expect("commit");
        }
        let frames = h.shared.frames.load(Ordering::SeqCst);
        assert!(frames > 2 && frames < h.checkpoint_frames, "{frames}");
        let restarts = counter(&h, "store_wal_restarts");
        let as_if_the_helper_copied = |h: &SqliteHistory, done: u64| {
            let s = &h.shared;
            s.backfilled_restarts
                .store(s.restarts.load(Ordering::SeqCst), Ordering::SeqCst);
            s.backfilled.store(done, Ordering::SeqCst);
        };

        // Copied by a helper's checkpoint of a log since started over:
        // nothing for the loop.
        send(&mut h, "busy", 20);
        as_if_the_helper_copied(&h, 1);
        h.shared.backfilled_restarts.fetch_add(1, Ordering::SeqCst);
        h.commit().expect("commit");
        // Too far behind: left to the helper's next round.
        while h.shared.frames.load(Ordering::SeqCst) <= TAIL_FRAMES + 1 {
            send(&mut h, "busy", 20);
            h.commit().expect("commit");
        }
        send(&mut h, "busy", 20);
        as_if_the_helper_copied(&h, 1);
        h.commit().expect("commit");
        assert_eq!(counter(&h, "store_tail_checkpoints"), 0);
        assert_eq!(counter(&h, "store_wal_restarts"), restarts);
        let frames = h.shared.frames.load(Ordering::SeqCst);
        assert!(frames < h.checkpoint_frames, "{frames}");

        // A short rest: copied by the loop, then the log starts over.
        send(&mut h, "busy", 20);
        let now = h.shared.frames.load(Ordering::SeqCst);
        as_if_the_helper_copied(&h, now.saturating_sub(2).max(1));
        h.commit().expect("commit");
        assert_eq!(counter(&h, "store_tail_checkpoints"), 1);
        send(&mut h, "busy", 1);
        h.commit().expect("commit");
        assert_eq!(counter(&h, "store_wal_restarts"), restarts + 1);
        assert!(h.shared.frames.load(Ordering::SeqCst) < frames);
        let last = h.last("busy", 1).expect("last");
        assert_eq!(ids(&last), vec![counter(&h, "store_appends")]);
    }

    /// A log past the helper's threshold is checkpointed by the helper, and
    /// the next commit starts it over, in every mode.
    #[test]
    fn a_log_past_the_threshold_is_checkpointed_and_starts_over() {
        for fsync in [Fsync::Never, Fsync::Everysec, Fsync::Always] {
            let tmp = TempDir::new("restart");
            let mut h = SqliteHistory::open(&Options {
                fsync,
                ..opts(&tmp.0, 1_000_000)
            })
            .expect("open");
            while h.shared.frames.load(Ordering::SeqCst) < h.checkpoint_frames {
                send(&mut h, "busy", 50);
                h.commit().expect("commit");
            }
            // The helper's thread tells nobody when it is done: look.
            let deadline = Instant::now() + std::time::Duration::from_secs(20);
            while h.shared.backfilled.load(Ordering::SeqCst) == 0 {
                assert!(Instant::now() < deadline, "{fsync}: no checkpoint");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // No commit came in between, so the helper copied all of it:
            // the next commit starts the log over, and it stays short.
            for _ in 0..2 {
                send(&mut h, "busy", 1);
                h.commit().expect("commit");
            }
            assert_eq!(counter(&h, "store_wal_restarts"), 1, "{fsync}");
            assert!(h.shared.frames.load(Ordering::SeqCst) < 10, "{fsync}");
        }
    }

    #[test]
    fn ids_continue_after_reopen_and_a_failed_commit_reuses_none() {
        let tmp = TempDir::new("ids");
        let o = opts(&tmp.0, 100);
        let mut h = SqliteHistory::open(&o).expect("open");
        assert_eq!(send(&mut h, "r", 3), vec![1, 2, 3]);
        h.commit().expect("commit");
        // A transaction that is rolled back: its ids are not given again.
        assert_eq!(send(&mut h, "r", 2), vec![4, 5]);
        h.conn.execute_batch("ROLLBACK").expect("rollback");
        assert!(h.commit().is_err(), "the transaction is gone");
        assert!(!h.healthy());
        h.release("r");
        assert_eq!(send(&mut h, "r", 1), vec![6]);
        h.commit().expect("commit");
        drop(h);
        let mut h = SqliteHistory::open(&o).expect("reopen");
        assert_eq!(ids(&h.last("r", 10).expect("last")), vec![1, 2, 3, 6]);
        assert_eq!(h.reserve_id("r").expect("id"), 7);
    }

    /// A commit writes the messages and nothing else: `rooms.last_id`
    /// stays as it was, and the room's last id, after a reopen, is its
    /// newest message's, also once retention deleted the older ones.
    #[test]
    fn a_commit_leaves_the_rooms_row_alone_and_ids_come_from_the_newest_message() {
        let tmp = TempDir::new("lastid");
        let o = opts(&tmp.0, 3);
        let mut h = SqliteHistory::open(&o).expect("open");
        for _ in 0..4 {
            send(&mut h, "r", 5);
            h.commit().expect("commit");
        }
        let floor: i64 = h
            .conn
            .query_row("SELECT last_id FROM rooms WHERE name = 'r'", [], |r| {
                r.get(0)
            })
            .expect("row");
        assert_eq!(floor, 0, "no commit wrote the rooms row");
        assert_eq!(ids(&h.last("r", 10).expect("last")), vec![18, 19, 20]);
        drop(h);
        let mut h = SqliteHistory::open(&o).expect("reopen");
        assert_eq!(h.reserve_id("r").expect("id"), 21);
        // A floor above the newest message wins (a failed transaction's
        // ids, an old store's reservation).
        h.conn
            .execute("UPDATE rooms SET last_id = 40 WHERE name = 'r'", [])
            .expect("floor");
        h.release("r");
        assert_eq!(h.reserve_id("r").expect("id"), 41);
    }

    /// A database of schema 2 (whose commits kept `rooms.last_id` at the
    /// last stored id) opens as schema 3 with its ids going on from there,
    /// messages deleted or not.
    #[test]
    fn a_schema_2_database_opens_as_3_and_keeps_its_last_ids() {
        let tmp = TempDir::new("schema2");
        let o = opts(&tmp.0, 100);
        let mut h = SqliteHistory::open(&o).expect("open");
        send(&mut h, "r", 7);
        h.commit().expect("commit");
        h.conn
            .execute_batch(
                "UPDATE rooms SET last_id = 9 WHERE name = 'r';
                 DELETE FROM messages WHERE id > 5;
                 UPDATE meta SET value = 2 WHERE key = 'schema';",
            )
            .expect("as schema 2 left it");
        drop(h);
        let mut h = SqliteHistory::open(&o).expect("reopen");
        let schema: i64 = h
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .expect("schema");
        assert_eq!(schema, 3);
        assert_eq!(h.reserve_id("r").expect("id"), 10);
    }

    /// `store_rooms` counts rows of `rooms`: a room created by a
    /// transaction that was rolled back is not counted; one that the next
    /// transaction writes again (its carried last id) is.
    #[test]
    fn store_rooms_counts_only_committed_rooms() {
        let tmp = TempDir::new("roomcount");
        let mut h = SqliteHistory::open(&opts(&tmp.0, 100)).expect("open");
        let rows = |h: &SqliteHistory| {
            h.conn
                .query_row("SELECT count(*) FROM rooms", [], |r| r.get::<_, i64>(0))
                .expect("count")
        };
        send(&mut h, "a", 1);
        h.commit().expect("commit");
        assert_eq!((counter(&h, "store_rooms"), rows(&h)), (1, 1));
        // "b" written to, "c" only given an id, then the transaction is gone.
        send(&mut h, "b", 1);
        h.reserve_id("c").expect("id");
        assert_eq!(counter(&h, "store_rooms"), 1, "not before the commit");
        h.conn.execute_batch("ROLLBACK").expect("rollback");
        assert!(h.commit().is_err());
        assert_eq!((counter(&h, "store_rooms"), rows(&h)), (1, 1));
        // The next transaction writes their last ids: the rows exist again.
        send(&mut h, "a", 1);
        h.commit().expect("commit");
        assert_eq!((counter(&h, "store_rooms"), rows(&h)), (3, 3));
        assert_eq!(h.reserve_id("b").expect("id"), 2);
        h.commit().expect("commit");
        drop(h);
        let h = SqliteHistory::open(&opts(&tmp.0, 100)).expect("reopen");
        assert_eq!(counter(&h, "store_rooms"), 3);
    }

    /// The iteration's messages reach SQLite before a read (which sees
    /// them); if that insert fails, the transaction is rolled back and the
    /// commit says so, so that no message is delivered as kept.
    #[test]
    fn a_failed_insert_before_a_read_fails_the_commit() {
        let tmp = TempDir::new("readfail");
        let mut h = SqliteHistory::open(&opts(&tmp.0, 100)).expect("open");
        send(&mut h, "r", 1);
        assert_eq!(
            ids(&h.last("r", 10).expect("last")),
            vec![1],
            "seen before the commit"
        );
        h.commit().expect("commit");
        // A row in the way of the next id: its insert fails.
        h.conn
            .execute(
                "INSERT INTO messages(key, ts, json) VALUES ((1 << 40) | 3, 0, '{}')",
                [],
            )
            .expect("plant");
        send(&mut h, "r", 2);
        assert!(h.last("r", 10).is_err());
        assert!(!h.healthy());
        match h.commit() {
            Err(HistoryError::RolledBack(_)) => {}
            other => panic!("expected RolledBack, got {other:?}"),
        }
        assert!(h.commit().is_ok(), "reported once");
        h.conn
            .execute("DELETE FROM messages WHERE id = 3", [])
            .expect("unplant");
        assert_eq!(
            send(&mut h, "r", 1),
            vec![4],
            "ids 2 and 3 are not given again"
        );
        h.commit().expect("commit");
        assert!(h.healthy());
        assert_eq!(ids(&h.after("r", 0, 10).expect("after")), vec![1, 4]);
    }

    #[test]
    fn ts_is_read_from_the_end_of_the_event() {
        assert_eq!(ts_of(r#"{"type":"message","content":"x","ts":17}"#), 17);
        // Not the last field, or inside a string: the scan.
        assert_eq!(ts_of(r#"{"ts":5,"id":1}"#), 5);
        assert_eq!(ts_of(r#"{"content":"\"ts\":9","ts":3,"id":1}"#), 3);
        assert_eq!(ts_of(r#"{"a\"ts":9}"#), 0);
        assert_eq!(ts_of("{}"), 0);
    }

    #[test]
    fn retention_trims_in_bounded_batches() {
        let tmp = TempDir::new("retain");
        let mut h = SqliteHistory::open(&opts(&tmp.0, 5000)).expect("open");
        send(&mut h, "r", 3000);
        h.commit().expect("commit");
        drop(h);
        // Lowered to 10: the backlog goes a batch per commit, not at once.
        let mut h = SqliteHistory::open(&opts(&tmp.0, 10)).expect("open");
        send(&mut h, "r", 1);
        h.commit().expect("commit");
        let deleted = counter(&h, "store_retention_deleted");
        assert!(deleted > 0 && deleted <= RETENTION_BATCH + 1, "{deleted}");
        for _ in 0..4 {
            send(&mut h, "r", 1);
            h.commit().expect("commit");
        }
        assert_eq!(
            ids(&h.after("r", 0, 100).expect("after")),
            (2996..=3005).collect::<Vec<_>>()
        );
    }

    /// A room's oldest messages go once a hundredth of its retention is
    /// past it, in one delete, not a few rows every commit.
    #[test]
    fn retention_deletes_a_chunk_at_a_time() {
        let tmp = TempDir::new("chunk");
        let mut h = SqliteHistory::open(&opts(&tmp.0, 1000)).expect("open");
        assert_eq!(retention_chunk(1000), 10);
        send(&mut h, "r", 1000);
        h.commit().expect("commit");
        // Nine past the retention: kept.
        for _ in 0..9 {
            send(&mut h, "r", 1);
            h.commit().expect("commit");
        }
        assert_eq!(counter(&h, "store_retention_deleted"), 0);
        let on_disk = |h: &SqliteHistory| -> i64 {
            h.conn
                .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
                .expect("count")
        };
        assert_eq!(on_disk(&h), 1009);
        // Still on disk, but reads serve only the newest 1,000.
        assert_eq!(h.after("r", 0, 1).expect("after")[0].id, 10);
        let page = h.before("r", Some(12), 5).expect("before");
        assert_eq!(ids(&page), vec![10, 11]);
        // The tenth: all ten go, the newest 1,000 stay.
        send(&mut h, "r", 1);
        h.commit().expect("commit");
        assert_eq!(counter(&h, "store_retention_deleted"), 10);
        assert_eq!(on_disk(&h), 1000);
        assert_eq!(h.after("r", 0, 1).expect("after")[0].id, 11);
        // The same floor for a room read after its state was dropped (a
        // fresh open reads the last id from the database).
        send(&mut h, "r", 5);
        h.commit().expect("commit");
        drop(h);
        let mut h = SqliteHistory::open(&opts(&tmp.0, 1000)).expect("reopen");
        assert_eq!(on_disk(&h), 1005);
        assert_eq!(h.after("r", 0, 1).expect("after")[0].id, 16);
        assert_eq!(ids(&h.before("r", Some(17), 3).expect("before")), vec![16]);
        assert_eq!(retention_chunk(10), 1);
        assert_eq!(retention_chunk(100_000_000), RETENTION_BATCH);
    }

    #[test]
    fn an_unreadable_row_is_reported_once_and_never_served() {
        let tmp = TempDir::new("corruptrow");
        let mut h = SqliteHistory::open(&opts(&tmp.0, 100)).expect("open");
        send(&mut h, "r", 3);
        h.commit().expect("commit");
        h.conn
            .execute(
                "UPDATE messages SET json = '{\"id\":5000000' WHERE id = 2",
                [],
            )
            .expect("damage");
        h.conn
            .execute(
                "UPDATE messages SET json = '{\"id\":5000000}' WHERE id = 3",
                [],
            )
            .expect("damage");
        assert_eq!(ids(&h.last("r", 10).expect("last")), vec![1]);
        h.commit().expect("commit");
        assert_eq!(ids(&h.after("r", 0, 10).expect("after")), vec![1]);
        assert_eq!(counter(&h, "store_corrupt_rows"), 2);
        assert_eq!(h.reserve_id("r").expect("id"), 4, "ids are not moved");
        let quarantined: i64 = h
            .conn
            .query_row("SELECT count(*) FROM quarantine", [], |r| r.get(0))
            .expect("count");
        assert_eq!(quarantined, 2);
    }

    /// Quarantining a room's newest row does not lower its last id: the
    /// next message, after the room's state was dropped or a restart, gets
    /// the id after it, not the quarantined row's id again.
    #[test]
    fn a_quarantined_newest_row_keeps_its_id_taken() {
        let tmp = TempDir::new("quarantinelast");
        let o = opts(&tmp.0, 100);
        let mut h = SqliteHistory::open(&o).expect("open");
        send(&mut h, "r", 3);
        h.commit().expect("commit");
        h.conn
            .execute("UPDATE messages SET json = 'not json' WHERE id = 3", [])
            .expect("damage");
        assert_eq!(ids(&h.last("r", 10).expect("last")), vec![1, 2]);
        h.commit().expect("commit");
        h.release("r");
        assert_eq!(h.reserve_id("r").expect("id"), 4);
        drop(h);
        let mut h = SqliteHistory::open(&o).expect("reopen");
        assert_eq!(h.reserve_id("r").expect("id"), 4);
    }

    #[test]
    fn descriptors_do_not_grow_with_rooms() {
        let tmp = TempDir::new("fds");
        let count = |dir: &Path| {
            let dir = fs::canonicalize(dir).expect("canonical");
            fs::read_dir("/proc/self/fd")
                .expect("fds")
                .filter_map(Result::ok)
                .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&dir)))
                .count()
        };
        let mut h = SqliteHistory::open(&opts(&tmp.0, 100)).expect("open");
        send(&mut h, "r0", 1);
        h.commit().expect("commit");
        let few = count(&tmp.0);
        for i in 0..500 {
            send(&mut h, &format!("r{i}"), 1);
        }
        h.commit().expect("commit");
        let many = count(&tmp.0);
        assert_eq!(few, many);
        assert!(many <= DESCRIPTORS, "{many} descriptors");
    }

    /// A damaged page is found at start after an unclean stop (`quick_check`),
    /// and otherwise by the first read that meets it, which fails and makes
    /// the store unhealthy: it is never served from.
    #[test]
    fn damage_is_found_at_start_after_a_crash_and_by_reads_otherwise() {
        let tmp = TempDir::new("damage");
        let o = opts(&tmp.0, 100_000);
        let mut h = SqliteHistory::open(&o).expect("open");
        send(&mut h, "r", 3000);
        h.commit().expect("commit");
        drop(h);
        let db = tmp.0.join(DB_FILE);
        let page: i64 = Connection::open(&db)
            .expect("open")
            .query_row(
                "SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf' LIMIT 1 OFFSET 5",
                [],
                |r| r.get(0),
            )
            .expect("a leaf page");
        let file = File::options().write(true).open(&db).expect("db");
        file.write_all_at(&[0xff; 16], (page as u64 - 1) * 4096)
            .expect("damage");
        drop(file);

        // Closed cleanly: no check at start; the damaged page is met by reads.
        let mut h = SqliteHistory::open(&o).expect("open without a check");
        assert!(h.after("r", 0, 3000).is_err());
        assert!(!h.healthy());
        drop(h);

        // As after a crash: the check refuses the file.
        Connection::open(&db)
            .expect("open")
            .execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('open', 1)",
                [],
            )
            .expect("mark open");
        match SqliteHistory::open(&o) {
            Err(OpenError::Corrupt { detail, .. }) => assert!(!detail.contains('\n'), "{detail}"),
            other => panic!("expected Corrupt, got {:?}", other.err()),
        }
    }

    #[test]
    fn keys_pack_room_and_id_in_order_and_none_past_the_caps() {
        assert_eq!(MAX_RID, 8_388_607);
        assert_eq!(MAX_ID, 1_099_511_627_775);
        assert_eq!(key(1, 1), Some((1 << 40) | 1));
        assert_eq!(key(MAX_RID, MAX_ID), Some(i64::MAX));
        for (rid, id) in [
            (0, 1),
            (-1, 1),
            (MAX_RID + 1, 1),
            (1, MAX_ID + 1),
            (1, u64::MAX),
        ] {
            assert_eq!(key(rid, id), None, "({rid}, {id})");
        }
        for (rid, id) in [
            (1, 1),
            (7, 12_345),
            (MAX_RID, 1),
            (1, MAX_ID),
            (MAX_RID, MAX_ID),
        ] {
            assert_eq!(key(rid, id).map(unpack), Some((rid, id)));
        }
        // Ordered by room, then id: a room's last id is below the next
        // room's first, so a room's messages are one range of keys.
        assert!(key(5, MAX_ID) < key(6, 1));
        assert!(key(5, 9) < key(5, 10));
        assert_eq!(
            key_range(3, 0, u64::MAX),
            (3 << 40, (3 << 40) | MAX_ID as i64)
        );
    }

    /// A room at its last id refuses the next message, the room with the
    /// last rid works up to it (its reads stay in its own range), a room
    /// past the last rid is refused without leaving a row, and none of it
    /// makes the store unhealthy.
    #[test]
    fn a_room_past_its_last_id_or_past_the_last_room_is_refused() {
        let tmp = TempDir::new("caps");
        let mut h = SqliteHistory::open(&opts(&tmp.0, 1_000_000)).expect("open");
        send(&mut h, "a", 1);
        h.commit().expect("commit");
        h.conn
            .execute(
                "INSERT INTO rooms(rid, name, last_id) VALUES (?1, 'last', ?2)",
                params![MAX_RID, MAX_ID as i64 - 2],
            )
            .expect("plant");
        assert_eq!(send(&mut h, "last", 2), vec![MAX_ID - 1, MAX_ID]);
        assert!(matches!(h.reserve_id("last"), Err(HistoryError::Full(_))));
        h.commit().expect("commit");
        assert!(h.healthy());
        let both = vec![MAX_ID - 1, MAX_ID];
        assert_eq!(ids(&h.last("last", 10).expect("last")), both);
        assert_eq!(ids(&h.after("last", 0, 10).expect("after")), both);
        assert_eq!(
            ids(&h.after("last", MAX_ID - 1, 10).expect("after")),
            vec![MAX_ID]
        );
        assert!(h.after("last", MAX_ID, 10).expect("after").is_empty());
        assert!(h.after("last", u64::MAX, 10).expect("after").is_empty());
        assert_eq!(
            ids(&h.before("last", Some(MAX_ID), 10).expect("before")),
            vec![MAX_ID - 1]
        );
        assert_eq!(
            ids(&h.before("last", Some(u64::MAX), 10).expect("before")),
            both
        );
        assert!(h.before("last", Some(0), 10).expect("before").is_empty());
        assert_eq!(ids(&h.last("a", 10).expect("last")), vec![1]);
        // `sqlite3` reads the pair back through the virtual columns.
        let pair: (i64, i64) = h
            .conn
            .query_row(
                "SELECT room, id FROM messages ORDER BY key DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("pair");
        assert_eq!(pair, (MAX_RID, MAX_ID as i64));

        // No rid left: a new room is refused, and leaves no row.
        assert!(matches!(h.reserve_id("new"), Err(HistoryError::Full(_))));
        assert!(matches!(h.reserve_id("new"), Err(HistoryError::Full(_))));
        assert_eq!(send(&mut h, "a", 1), vec![2], "the others keep working");
        h.commit().expect("commit");
        assert!(h.healthy());
        let rooms: i64 = h
            .conn
            .query_row("SELECT count(*) FROM rooms", [], |r| r.get(0))
            .expect("count");
        assert_eq!((rooms, counter(&h, "store_rooms")), (2, 1));
    }

    /// The tables as schema 1 wrote them (the build before this one).
    const SCHEMA_1: &str = "
        PRAGMA journal_mode = WAL;
        CREATE TABLE meta(key TEXT PRIMARY KEY, value ANY) WITHOUT ROWID;
        CREATE TABLE rooms(rid INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                           last_id INTEGER NOT NULL);
        CREATE TABLE messages(room INTEGER NOT NULL, id INTEGER NOT NULL,
                              ts INTEGER NOT NULL, json TEXT NOT NULL,
                              PRIMARY KEY(room, id)) WITHOUT ROWID;
        CREATE TABLE quarantine(room INTEGER NOT NULL, id INTEGER NOT NULL,
                                json BLOB, found_ms INTEGER NOT NULL,
                                PRIMARY KEY(room, id)) WITHOUT ROWID;
        INSERT INTO meta(key, value) VALUES ('schema', 1);
    ";

    /// A schema-1 database with rooms `a` (ids 301..=1200 kept, 1500
    /// handed out), `b` (1..=3), `c` (none kept, 7 handed out), one
    /// quarantined row, and `extra` planted on top.
    fn schema_1_db(dir: &Path, extra: &str) {
        fs::create_dir_all(dir).expect("mkdir");
        let db = Connection::open(dir.join(DB_FILE)).expect("open");
        db.execute_batch(SCHEMA_1).expect("schema 1");
        db.execute_batch(
            "INSERT INTO rooms(rid, name, last_id) VALUES (1, 'a', 1500), (2, 'b', 3), (3, 'c', 7);
             INSERT INTO quarantine VALUES (2, 9, x'00', 1);",
        )
        .expect("rooms");
        let mut insert = db
            .prepare("INSERT INTO messages(room, id, ts, json) VALUES (?1, ?2, ?3, ?4)")
            .expect("insert");
        for (rid, room, ids) in [(1, "a", 301..=1200), (2, "b", 1..=3)] {
            for id in ids {
                let k = kept(room, id);
                insert
                    .execute(params![rid, id as i64, id as i64, k.json.get()])
                    .expect("row");
            }
        }
        drop(insert);
        db.execute_batch(extra).expect("extra");
    }

    /// A data dir of the schema before opens with every message, its id
    /// and `ts`, every room's last id and the quarantine kept, rewritten
    /// once.
    #[test]
    fn a_schema_1_database_is_upgraded_keeping_every_message_and_id() {
        let tmp = TempDir::new("upgrade");
        schema_1_db(&tmp.0, "");
        for _ in 0..2 {
            let mut h = SqliteHistory::open(&opts(&tmp.0, 1_000_000)).expect("open");
            let schema: i64 = h
                .conn
                .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                    r.get(0)
                })
                .expect("schema");
            assert_eq!(schema, SCHEMA_VERSION);
            let a = h.after("a", 0, 2000).expect("after");
            assert_eq!(ids(&a), (301..=1200).collect::<Vec<_>>());
            assert!(a.iter().all(|k| k.json.get() == kept("a", k.id).json.get()));
            assert_eq!(ids(&h.last("b", 10).expect("last")), vec![1, 2, 3]);
            assert!(h.last("c", 10).expect("last").is_empty());
            let (rows, ts_ok, quarantined, old_tables, free): (i64, bool, i64, i64, i64) = h
                .conn
                .query_row(
                    "SELECT (SELECT count(*) FROM messages),
                            (SELECT count(*) = 0 FROM messages WHERE ts != id),
                            (SELECT count(*) FROM quarantine),
                            (SELECT count(*) FROM sqlite_schema WHERE name LIKE '%schema_1%'),
                            (SELECT freelist_count FROM pragma_freelist_count())",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .expect("counts");
            // No pages of the old table left behind (the VACUUM).
            assert_eq!(
                (rows, ts_ok, quarantined, old_tables, free),
                (903, true, 1, 0, 0)
            );
            h.release("a");
            h.release("b");
        }
        let mut h = SqliteHistory::open(&opts(&tmp.0, 1_000_000)).expect("open");
        assert_eq!(h.reserve_id("a").expect("id"), 1501);
        assert_eq!(h.reserve_id("b").expect("id"), 4);
        assert_eq!(h.reserve_id("c").expect("id"), 8);
    }

    /// A schema-1 row that has no key (past a cap) refuses the upgrade with
    /// one line, and the file stays as it was.
    #[test]
    fn a_schema_1_row_past_the_caps_refuses_the_upgrade_and_changes_nothing() {
        let tmp = TempDir::new("upgradecap");
        schema_1_db(
            &tmp.0,
            &format!(
                "INSERT INTO messages VALUES (2, {}, 0, '{{}}');",
                MAX_ID + 1
            ),
        );
        match SqliteHistory::open(&opts(&tmp.0, 100)) {
            Err(e @ OpenError::Upgrade { .. }) => {
                let line = e.to_string();
                assert!(
                    line.contains("nothing was changed") && !line.contains('\n'),
                    "{line}"
                );
            }
            other => panic!("expected Upgrade, got {:?}", other.err()),
        }
        let db = Connection::open(tmp.0.join(DB_FILE)).expect("open");
        let (schema, rows): (i64, i64) = db
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'schema'),
                        (SELECT count(*) FROM messages WHERE room IN (1, 2))",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("as before");
        assert_eq!((schema, rows), (1, 904));
    }

    #[test]
    fn a_second_store_on_the_same_dir_is_refused() {
        let tmp = TempDir::new("lock");
        let _h = SqliteHistory::open(&opts(&tmp.0, 100)).expect("open");
        match SqliteHistory::open(&opts(&tmp.0, 100)) {
            Err(OpenError::Locked { .. }) => {}
            other => panic!("expected Locked, got {:?}", other.err()),
        }
    }
}
