//! The store's helper thread, `loopchat-fsync`: the one thread loopchat runs
//! besides the loop. It does the disk work that must not stall the loop:
//!
//! - with `--fsync everysec`, an `fdatasync` of the write-ahead log about
//!   once a second when something was committed since the last one, so a
//!   power cut loses at most about a second (the loop's commits under
//!   `synchronous=NORMAL` only write to the page cache);
//! - in every mode, checkpoints: copying committed pages from the log into
//!   the database file (and, unless `never`, syncing both), through its own
//!   SQLite connection, once the log holds [`CHECKPOINT_FRAMES`] pages.
//!   The loop's connection has automatic checkpoints off (its WAL hook
//!   replaces them), so it never runs one on its own.
//!
//! It shares only atomics with the loop ([`Shared`]), never takes a lock the
//! loop waits for (a `PASSIVE` checkpoint neither blocks nor is blocked by
//! the writer), and the loop never waits for it.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::store::Fsync;

/// How often the thread looks at the log: the "everysec" of `--fsync
/// everysec` (a sync every `SYNC_TICKS` ticks) and how soon a log past
/// [`CHECKPOINT_FRAMES`] is checkpointed.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// Ticks between two syncs of the log with `everysec`: 4 × 250 ms = 1 s.
const SYNC_TICKS: u32 = 4;

/// Pages in the log before the thread checkpoints (about 16 MiB with 4 KiB
/// pages; SQLite's own automatic checkpoints come at 1,000). Each
/// checkpoint lets the log start over, and a log that starts over has its
/// header synced by the next commit, on the loop: the longer the log, the
/// rarer that sync (and the more there is to replay after a crash, which
/// costs milliseconds per MiB).
pub(crate) const CHECKPOINT_FRAMES: u64 = 4000;

/// What the loop and the thread share. The loop writes `frames` and
/// `commits`; the thread writes the rest.
#[derive(Default)]
pub(crate) struct Shared {
    /// Pages in the write-ahead log after the last commit (from the loop
    /// connection's WAL hook).
    pub frames: AtomicU64,
    /// Commits that started the log over (from the same hook).
    pub restarts: AtomicU64,
    /// Commits so far: the thread syncs only when this moved.
    pub commits: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub sync_last_us: AtomicU64,
    pub sync_max_us: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_errors: AtomicU64,
    pub checkpoint_max_us: AtomicU64,
    /// The last sync or checkpoint failed (cleared by the next that works):
    /// the store is unhealthy meanwhile.
    pub failing: AtomicBool,
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Handle to the thread; dropping it makes a last sync and checkpoint, then
/// joins it.
pub(crate) struct Checkpointer {
    stop: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread with its own connection `conn` to the database
    /// whose log is `wal`.
    pub(crate) fn spawn(
        conn: Connection,
        wal: PathBuf,
        fsync: Fsync,
        shared: Arc<Shared>,
    ) -> std::io::Result<Checkpointer> {
        let (stop, rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("loopchat-fsync".into())
            .spawn(move || run(&conn, &wal, fsync, &shared, &rx))?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread (disconnected).
        self.stop = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, wal: &PathBuf, fsync: Fsync, shared: &Shared, rx: &Receiver<()>) {
    let mut log: Option<File> = None;
    let mut synced_commits = shared.commits.load(Ordering::SeqCst);
    let mut ticks = 0u32;
    // A log already checkpointed stays this long until the loop's next
    // write starts it over: do not checkpoint it again meanwhile.
    let mut checkpointed_at = 0;
    loop {
        let stopping = match rx.recv_timeout(TICK) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        ticks += 1;
        if fsync == Fsync::Everysec && (ticks >= SYNC_TICKS || stopping) {
            ticks = 0;
            let commits = shared.commits.load(Ordering::SeqCst);
            if commits != synced_commits {
                sync_log(&mut log, wal, shared);
                synced_commits = commits;
            }
        }
        if stopping {
            return;
        }
        let frames = shared.frames.load(Ordering::SeqCst);
        if frames >= CHECKPOINT_FRAMES && frames != checkpointed_at {
            checkpoint(conn, shared);
            checkpointed_at = frames;
        }
    }
}

/// `fdatasync` of the write-ahead log through a descriptor of our own (any
/// descriptor of a file flushes its pages). The log keeps its inode while
/// the loop's connection is open, so the descriptor is opened once.
fn sync_log(log: &mut Option<File>, wal: &PathBuf, shared: &Shared) {
    let start = Instant::now();
    let result = match log {
        Some(file) => file.sync_data(),
        None => match File::open(wal) {
            Ok(file) => {
                let synced = file.sync_data();
                *log = Some(file);
                synced
            }
            Err(e) => Err(e),
        },
    };
    let us = micros(start);
    shared.syncs.fetch_add(1, Ordering::Relaxed);
    shared.sync_last_us.store(us, Ordering::Relaxed);
    shared.sync_max_us.fetch_max(us, Ordering::Relaxed);
    match result {
        Ok(()) => shared.failing.store(false, Ordering::SeqCst),
        Err(e) => {
            log::warn!("periodic sync of {} failed: {e}", wal.display());
            shared.sync_errors.fetch_add(1, Ordering::Relaxed);
            shared.failing.store(true, Ordering::SeqCst);
            // Reopen next time: the descriptor may be what broke.
            *log = None;
        }
    }
}

/// A `PASSIVE` checkpoint: copies what it can without waiting for anyone.
fn checkpoint(conn: &Connection, shared: &Shared) {
    let start = Instant::now();
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        row.get::<_, i64>(0)
    });
    shared
        .checkpoint_max_us
        .fetch_max(micros(start), Ordering::Relaxed);
    match result {
        Ok(_) => {
            shared.checkpoints.fetch_add(1, Ordering::Relaxed);
            shared.failing.store(false, Ordering::SeqCst);
        }
        Err(e) => {
            log::warn!("checkpoint failed: {e}");
            shared.checkpoint_errors.fetch_add(1, Ordering::Relaxed);
            shared.failing.store(true, Ordering::SeqCst);
        }
    }
}
