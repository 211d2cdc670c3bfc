//! Where room messages are kept and where their ids come from.
//!
//! The dispatcher talks to history only through the [`History`] trait, so that
//! the in-memory ring ([`memory::MemoryHistory`]), the SQLite store
//! ([`sqlite::SqliteHistory`]) and, later, a shared broker can be swapped
//! without touching the loop or the room tables. The trait is synchronous and
//! called on the loop thread: it is the local engine, whose answers arrive in
//! the same iteration. An implementation may write to the page cache and run
//! indexed queries, but must never wait on the periodic sync; the syncs on
//! the loop are the group commit in [`History::commit`] with `--fsync
//! always` and the few, bounded ones around the write-ahead log starting
//! over (see `docs/persistence.md`).
//!
//! This module owns the message record ([`Kept`]), the durability setting
//! ([`Fsync`]) and the contract; it does not own rooms, members or sockets.
//! [`legacy`] reads the data dirs of the earlier JSON-lines store, only to
//! migrate them.

pub mod legacy;
pub mod memory;
pub mod sqlite;

use std::fmt;
use std::rc::Rc;
use std::str::FromStr;

use serde_json::value::RawValue;

/// One kept chat message: its id and its `message` event, already encoded as
/// JSON (without `ref`, which only the sender's live copy carries).
///
/// The JSON is encoded once, when the message is accepted, and shared from
/// then on: in `joined.history`, in `history` answers and in the log on disk.
#[derive(Clone, Debug)]
pub struct Kept {
    pub id: u64,
    pub json: Rc<RawValue>,
}

/// Why history could not serve or keep a message. The dispatcher answers
/// these with the `history_unavailable` error code.
#[derive(Debug)]
pub enum HistoryError {
    /// Reading or writing the backing store failed.
    Io(std::io::Error),
    /// A record on disk could not be understood.
    Corrupt(String),
    /// The database refused or failed an operation.
    Sqlite(rusqlite::Error),
    /// The transaction holding the iteration's messages was rolled back
    /// before the commit (a failed write ahead of a read): none is kept.
    RolledBack(String),
    /// A bound of the store's keys was reached (a room out of ids, or no
    /// room for another room): the message is refused, never stored under
    /// a wrong key.
    Full(String),
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryError::Io(e) => write!(f, "history i/o failed: {e}"),
            HistoryError::Corrupt(what) => write!(f, "history record corrupt: {what}"),
            HistoryError::Sqlite(e) => write!(f, "history database failed: {e}"),
            HistoryError::RolledBack(why) => write!(f, "history not kept: {why}"),
            HistoryError::Full(what) => write!(f, "history full: {what}"),
        }
    }
}

impl std::error::Error for HistoryError {}

impl From<std::io::Error> for HistoryError {
    fn from(e: std::io::Error) -> Self {
        HistoryError::Io(e)
    }
}

/// Message ids and kept messages, per room.
///
/// Ids are per room, start at 1, strictly increase and are never handed out
/// twice (an implementation that survives restarts must also never reuse an
/// id across them). All lists are oldest first.
pub trait History {
    /// The id for the next message of `room`. Called once per accepted
    /// message, right before [`History::append`].
    fn reserve_id(&mut self, room: &str) -> Result<u64, HistoryError>;

    /// Keep a message whose id came from [`History::reserve_id`].
    fn append(&mut self, room: &str, msg: Kept) -> Result<(), HistoryError>;

    /// The newest `n` kept messages of `room`.
    fn last(&mut self, room: &str, n: usize) -> Result<Vec<Kept>, HistoryError>;

    /// Every kept message of `room` with an id greater than `since`, at most
    /// `max` of them (the oldest ones, so that a resuming client has no gap
    /// before what it receives).
    fn after(&mut self, room: &str, since: u64, max: usize) -> Result<Vec<Kept>, HistoryError>;

    /// At most `limit` messages of `room` with an id below `before` (all ids
    /// when `None`): the newest such, returned oldest first.
    fn before(
        &mut self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Kept>, HistoryError>;

    /// `room` has no members any more: memory held for it may be released.
    /// Its ids must still never go backwards.
    fn release(&mut self, room: &str);

    /// Called by the loop once per iteration, after all commands of the
    /// iteration were handled and before any output is written to sockets:
    /// the group-commit point for a store that must be durable before
    /// messages are released.
    fn commit(&mut self) -> Result<(), HistoryError> {
        Ok(())
    }

    /// False while the store is failing (the `/healthz` check answers 503).
    fn healthy(&self) -> bool {
        true
    }

    /// Counters for `/stats` and `/metrics`, as `(name, value)` pairs.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// `--fsync`: how durable a committed iteration is before its messages are
/// delivered. Every mode commits one transaction per loop iteration before
/// delivery, so a crash of the process never loses an acknowledged message;
/// the modes differ in what a power cut or an OS crash can cost (see
/// `docs/persistence.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fsync {
    /// SQLite `synchronous=FULL`: the commit syncs the write-ahead log before
    /// the loop releases the iteration's output: nothing acknowledged is lost.
    Always,
    /// `synchronous=NORMAL`, and the helper thread syncs the write-ahead log
    /// about once a second: a power cut loses at most about the last second.
    #[default]
    Everysec,
    /// `synchronous=OFF`: the OS writes back when it likes.
    Never,
}

impl fmt::Display for Fsync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fsync::Always => "always",
            Fsync::Everysec => "everysec",
            Fsync::Never => "never",
        })
    }
}

/// A `--fsync` value that is not `always`, `everysec` or `never`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsyncParseError(pub String);

impl fmt::Display for FsyncParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fsync must be always, everysec or never, not {:?}",
            self.0
        )
    }
}

impl std::error::Error for FsyncParseError {}

impl FromStr for Fsync {
    type Err = FsyncParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Fsync::Always),
            "everysec" => Ok(Fsync::Everysec),
            "never" => Ok(Fsync::Never),
            other => Err(FsyncParseError(other.to_string())),
        }
    }
}

/// Open the on-disk history the configuration asks for (`--data-dir`,
/// `--fsync`, `--retain-messages`), migrating a data dir of the earlier
/// JSON-lines store first; `--no-persist` is the caller's
/// [`memory::MemoryHistory`]. The error is one line for the operator.
pub fn open(config: &crate::config::Config) -> Result<Box<dyn History>, String> {
    let opts = sqlite::Options {
        dir: config.data_dir.clone(),
        fsync: config.fsync,
        retain: config.retain_messages,
    };
    match sqlite::SqliteHistory::open(&opts) {
        Ok(history) => Ok(Box::new(history)),
        Err(e) => Err(e.to_string()),
    }
}
