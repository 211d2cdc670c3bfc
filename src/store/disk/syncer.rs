//! The periodic syncer: the one helper thread loopchat runs besides the loop.
//!
//! With `--fsync everysec` the loop must never wait for a disk flush, yet at
//! most about a second of messages may be lost. So the loop only appends (to
//! the page cache) and, the first time a file is written after its last
//! sync, hands this thread a duplicate of the file's descriptor
//! (`File::try_clone`, i.e. `dup`) over a channel. Once a second the thread
//! `fdatasync`s every file it was handed. It shares no data structure with
//! the loop except atomics: counters, a "failing" flag, a per-file "queued"
//! flag, and for reservation files the highest id reservation made durable.
//! It owns nothing else, takes no lock the loop takes, and the loop never
//! waits for it (sending on an unbounded channel does not block).
//!
//! With `--fsync never` it runs too, but is only handed the small id
//! reservation files (ids must never be reused, whatever the fsync mode).

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often queued files are synced: the "everysec" of `--fsync everysec`.
pub(crate) const PERIOD: Duration = Duration::from_secs(1);

/// Sync counters, shared by the loop (which syncs itself in `always` mode
/// and at shutdown) and the syncer thread.
#[derive(Default)]
pub(crate) struct SyncStats {
    pub syncs: AtomicU64,
    pub errors: AtomicU64,
    /// Duration of the last / longest sync round (all files of one commit or
    /// one tick), in microseconds.
    pub last_us: AtomicU64,
    pub max_us: AtomicU64,
    /// Set when a sync failed, cleared when a later sync succeeds.
    pub failing: AtomicBool,
}

impl SyncStats {
    /// Accounts one sync round that started at `start` and synced `files`
    /// files, `failed` of which failed.
    pub(crate) fn round(&self, start: Instant, files: u64, failed: u64) {
        if files == 0 {
            return;
        }
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.syncs.fetch_add(files, Ordering::Relaxed);
        self.errors.fetch_add(failed, Ordering::Relaxed);
        self.last_us.store(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        self.failing.store(failed > 0, Ordering::Relaxed);
    }
}

/// For an id reservation file: after a successful sync, `durable` is raised
/// to the value `written` held before the sync started.
pub(crate) struct Mark {
    pub written: Arc<AtomicU64>,
    pub durable: Arc<AtomicU64>,
}

/// One file to sync at the next tick.
pub(crate) struct Job {
    /// A duplicate descriptor: the loop may close or replace its own.
    pub file: File,
    /// Set by the loop when it queues the file, cleared here right before
    /// the sync, so a write after the clear queues the file again and a
    /// write before it is covered by this sync.
    pub queued: Arc<AtomicBool>,
    pub mark: Option<Mark>,
}

enum Msg {
    Sync(Job),
    Stop,
}

/// Handle to the syncer thread; dropping it syncs what is queued and joins.
pub(crate) struct Syncer {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    pub(crate) fn spawn(stats: Arc<SyncStats>) -> std::io::Result<Syncer> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("loopchat-fsync".into())
            .spawn(move || run(rx, &stats))?;
        Ok(Syncer {
            tx,
            thread: Some(thread),
        })
    }

    /// Queues a file for the next tick. Never blocks.
    pub(crate) fn queue(&self, job: Job) {
        // A send only fails once the thread is gone (it panicked); the file
        // is then left to the OS, which is what `never` does anyway.
        if self.tx.send(Msg::Sync(job)).is_err() {
            log::warn!("fsync thread is gone; data is left to the OS to flush");
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(rx: Receiver<Msg>, stats: &SyncStats) {
    let mut pending: Vec<Job> = Vec::new();
    let mut tick = Instant::now() + PERIOD;
    loop {
        let now = Instant::now();
        if now >= tick {
            sync_all(&mut pending, stats);
            tick = now + PERIOD;
            continue;
        }
        match rx.recv_timeout(tick - now) {
            Ok(Msg::Sync(job)) => pending.push(job),
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                sync_all(&mut pending, stats);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

fn sync_all(pending: &mut Vec<Job>, stats: &SyncStats) {
    let start = Instant::now();
    let files = pending.len() as u64;
    let mut failed = 0;
    for job in pending.drain(..) {
        job.queued.store(false, Ordering::SeqCst);
        let written = job.mark.as_ref().map(|m| m.written.load(Ordering::SeqCst));
        match job.file.sync_data() {
            Ok(()) => {
                if let (Some(mark), Some(v)) = (&job.mark, written) {
                    mark.durable.fetch_max(v, Ordering::SeqCst);
                }
            }
            Err(e) => {
                log::warn!("periodic fsync failed: {e}");
                failed += 1;
            }
        }
    }
    stats.round(start, files, failed);
}
