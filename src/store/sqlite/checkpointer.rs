//! The store's helper thread, `loopchat-fsync`: the one thread loopchat runs
//! besides the loop. It does the disk work that must not stall the loop:
//!
//! - with `--fsync everysec`, an `fdatasync` of the write-ahead log about
//!   once a second when something was committed since the last one, so a
//!   power cut loses at most about a second (the loop's commits under
//!   `synchronous=NORMAL` only write to the page cache);
//! - in every mode, checkpoints: copying committed pages from the log into
//!   the database file (and, unless `never`, syncing both), through its own
//!   SQLite connection, once the log holds [`checkpoint_frames`] pages.
//!   The loop's connection has automatic checkpoints off (its WAL hook
//!   replaces them). Under a load without pauses a passive checkpoint never
//!   copies all of the log (the loop commits while it runs), and a log
//!   that is never copied to its end never starts over: every commit then
//!   writes to new pages of the file, and the kernel allocating those
//!   pages was the largest single cost per message (see
//!   `docs/performance.md`). So the thread repeats its checkpoint while
//!   the part left behind shrinks, then leaves the last
//!   [`TAIL_FRAMES`] or fewer to the loop ([`Shared::backfilled`]), whose
//!   short checkpoint between two transactions lets the log start over.
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

/// How often the thread looks at the log when nothing wakes it: the
/// granularity of the "everysec" of `--fsync everysec`.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// Time between two syncs of the log with `everysec`.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Pages in the log before the thread checkpoints: 1,000 (about 4 MiB with
/// 4 KiB pages; SQLite's own automatic checkpoints come at 1,000), 4,000
/// (16 MiB) with `everysec`. The loop wakes the thread when the log passes
/// it. Each checkpoint lets the log start over, so that commits write to
/// pages of the file the kernel already holds (a log that only grows costs
/// a new page of the page cache per page written, which was the largest
/// single cost per message). A log that starts over has its header synced
/// by the next commit, on the loop, and the rest the thread's checkpoint
/// left is copied and synced on the loop too (unless `never`): the shorter
/// the log, the more often the loop waits for those syncs. With `always`
/// the loop syncs every commit anyway; with `everysec` those are its only
/// syncs, so there the log is longer: a quarter as many restarts (measured
/// in `docs/persistence.md`, "50,000 rooms with one message each").
pub(crate) fn checkpoint_frames(fsync: Fsync) -> u64 {
    match fsync {
        Fsync::Everysec => 4000,
        Fsync::Always | Fsync::Never => 1000,
    }
}

/// The most pages a checkpoint may leave behind for the loop to copy
/// itself (about 1 MiB): small enough that the loop's checkpoint is a
/// short pause, large enough that the thread's passes get there.
pub(crate) const TAIL_FRAMES: u64 = 256;

/// Checkpoints the thread runs in a row, each copying what the loop
/// committed during the one before, to bring what is left below
/// [`TAIL_FRAMES`].
const PASSES: u32 = 4;

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
    /// Where the thread's last checkpoint stopped (pages of the log copied;
    /// 0 when there is nothing for the loop to finish), valid while
    /// `restarts` still equals `backfilled_restarts`: the loop checkpoints
    /// the rest itself if it is at most [`TAIL_FRAMES`] and sets this to 0.
    pub backfilled: AtomicU64,
    pub backfilled_restarts: AtomicU64,
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
    wake: Option<SyncSender<()>>,
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
        let (wake, rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("loopchat-fsync".into())
            .spawn(move || run(&conn, &wal, fsync, &shared, &rx))?;
        Ok(Checkpointer {
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Asks the thread to look at the log now rather than at its next
    /// tick. Never blocks: a wake-up already queued is enough.
    pub(crate) fn wake(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread (disconnected).
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, wal: &PathBuf, fsync: Fsync, shared: &Shared, rx: &Receiver<()>) {
    let mut log: Option<File> = None;
    let mut synced_commits = shared.commits.load(Ordering::SeqCst);
    let mut last_sync = Instant::now();
    // A log already checkpointed stays this long until the loop's next
    // write starts it over: do not checkpoint it again meanwhile.
    let mut checkpointed_at = 0;
    let threshold = checkpoint_frames(fsync);
    loop {
        let stopping = match rx.recv_timeout(TICK) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if fsync == Fsync::Everysec && (last_sync.elapsed() >= SYNC_EVERY || stopping) {
            last_sync = Instant::now();
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
        if frames >= threshold && frames != checkpointed_at {
            let restarts = shared.restarts.load(Ordering::SeqCst);
            let mut copied = 0;
            for _ in 0..PASSES {
                // SQLite's answer counts the log as it was when the pass
                // began: what the loop committed since is left too.
                match checkpoint(conn, shared) {
                    Some((_, done)) => copied = done,
                    None => break,
                }
                if shared.frames.load(Ordering::SeqCst) <= copied + TAIL_FRAMES {
                    break;
                }
            }
            if copied > 0 {
                shared.backfilled_restarts.store(restarts, Ordering::SeqCst);
                shared.backfilled.store(copied, Ordering::SeqCst);
            }
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
/// Returns the pages in the log and how many of them are copied, when
/// SQLite says (it answers -1 for both when another checkpoint runs).
fn checkpoint(conn: &Connection, shared: &Shared) -> Option<(u64, u64)> {
    let start = Instant::now();
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    shared
        .checkpoint_max_us
        .fetch_max(micros(start), Ordering::Relaxed);
    match result {
        Ok((log, done)) => {
            shared.checkpoints.fetch_add(1, Ordering::Relaxed);
            shared.failing.store(false, Ordering::SeqCst);
            Some((u64::try_from(log).ok()?, u64::try_from(done).ok()?))
        }
        Err(e) => {
            log::warn!("checkpoint failed: {e}");
            shared.checkpoint_errors.fetch_add(1, Ordering::Relaxed);
            shared.failing.store(true, Ordering::SeqCst);
            None
        }
    }
}
