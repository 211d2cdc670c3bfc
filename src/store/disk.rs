//! The on-disk history: an append-only, segmented JSON-lines log per room,
//! behind the [`History`] trait, with the newest messages of live rooms kept
//! in memory.
//!
//! Read `docs/persistence.md` first: it describes the layout, the id
//! reservation, the fsync modes and recovery from the operator's side. This
//! file owns the per-room state and the trait implementation; the pieces
//! live in submodules:
//!
//! - `names`: room name → directory name (the one thing keeping a room
//!   inside the data dir);
//! - `segment`: one segment file: record parsing, the sparse index for
//!   paging, the torn-tail check at recovery;
//! - `syncer`: the periodic fsync thread of `--fsync everysec`, the one
//!   thread besides the loop.
//!
//! It does not own rooms' members, sockets, or the decision what to tell a
//! client when the store fails (the dispatcher answers `history_unavailable`).
//!
//! Everything here runs on the loop thread. The only blocking syncs on the
//! loop are: the group commit in [`History::commit`] with `--fsync always`
//! (the loop waits for durability by design there), creating a room (its
//! directory and reservation file, once per room), and extending a room's
//! id reservation when a burst used up a whole block before the syncer made
//! the next one durable (normally the next block is prepared half a block
//! ahead and synced off the loop).

mod names;
mod segment;
mod syncer;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{History, HistoryError, Kept};
use segment::Segment;
use syncer::{Job, Mark, SyncStats, Syncer};

/// Default data directory (`--data-dir`).
pub const DEFAULT_DIR: &str = "./loopchat-data";

/// Default messages kept on disk per room (`--retain-messages`): deep enough
/// for any realistic paging back, small enough (~20 MB for a busy room with
/// 200-byte messages) that disk use stays bounded by rooms × this.
pub const DEFAULT_RETAIN: u64 = 100_000;

/// Default newest messages per live room held in memory: covers `joined`
/// history and resumes after short disconnects without touching the disk.
pub const DEFAULT_KEEP: usize = 1_000;

/// Ids reserved per durable write of a room's reservation file. A crash can
/// skip at most this many ids (plus half a block prepared ahead); a clean
/// shutdown skips none. Larger means fewer syncs, bigger gaps after a crash.
const ID_BLOCK: u64 = 1_000;

/// A segment is closed after this many ids (or [`MAX_SEGMENT_BYTES`]), so
/// retention deletes whole files and one segment is the most a page-back
/// read or recovery ever scans.
const MAX_SEGMENT_MESSAGES: u64 = 10_000;

/// Segments never get smaller than this, whatever `retain` is, so a tiny
/// retention does not mean a file per message.
const MIN_SEGMENT_MESSAGES: u64 = 16;

/// Bytes after which a segment is closed even if it has fewer messages:
/// bounds the scan of one segment when messages are large.
const MAX_SEGMENT_BYTES: u64 = 64 << 20;

/// Directory under the data dir holding one directory per room.
const ROOMS_DIR: &str = "rooms";

/// Per-room reservation file: ids below the number it holds may have been
/// handed out; recovery starts there.
const RESERVATION_FILE: &str = "ids";

/// Held with `flock` while a process has the data dir open.
const LOCK_FILE: &str = "LOCK";

/// `--fsync`: when appended records are synced, i.e. whether the loop waits
/// for a message's record to reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fsync {
    /// `fdatasync` every appended file in [`History::commit`], before the
    /// loop releases the iteration's output: nothing acknowledged is lost.
    Always,
    /// A helper thread syncs once a second: a crash loses at most about the
    /// last second of messages; the loop never waits.
    #[default]
    Everysec,
    /// The OS writes back when it likes (typically within 30 s).
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

/// How to open the store.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// Data directory (created if missing).
    pub dir: PathBuf,
    pub fsync: Fsync,
    /// Messages kept on disk per room (at least 1). Counted in ids: the
    /// store keeps every record whose id is among the newest `retain` ids,
    /// and deletes whole segments older than that.
    pub retain: u64,
    /// Newest messages per live room held in memory (capped at `retain`).
    pub keep: usize,
}

impl DiskOptions {
    /// Options with the defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DiskOptions {
            dir: dir.into(),
            fsync: Fsync::default(),
            retain: DEFAULT_RETAIN,
            keep: DEFAULT_KEEP,
        }
    }
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions::new(DEFAULT_DIR)
    }
}

/// Why the store could not be opened. Each displays as one line naming the
/// path, for the server to print before exiting with status 2.
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
    /// A room's files could not be read back (never guessed around: a room
    /// recovered wrongly could hand out an id twice).
    Recover { path: PathBuf, source: io::Error },
    /// The `--fsync everysec` helper thread could not be started.
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
            OpenError::Recover { path, source } => {
                write!(f, "cannot recover {}: {source}", path.display())
            }
            OpenError::Thread(e) => write!(f, "cannot start the fsync thread: {e}"),
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::Create { source, .. }
            | OpenError::NotWritable { source, .. }
            | OpenError::Recover { source, .. } => Some(source),
            OpenError::Thread(e) => Some(e),
            OpenError::BadOption(_) | OpenError::Locked { .. } => None,
        }
    }
}

/// The settings every room operation needs, copied out of the store so a
/// room can be borrowed mutably beside them.
#[derive(Clone, Copy)]
struct Settings {
    fsync: Fsync,
    retain: u64,
    /// `keep`, capped at `retain`.
    keep: usize,
    segment_messages: u64,
}

/// Segment size for a retention: a tenth of it, so disk holds at most
/// `retain` plus one segment (~10% over), within
/// [`MIN_SEGMENT_MESSAGES`]..=[`MAX_SEGMENT_MESSAGES`].
fn segment_messages_for(retain: u64) -> u64 {
    (retain / 10).clamp(MIN_SEGMENT_MESSAGES, MAX_SEGMENT_MESSAGES)
}

/// A room's id reservation file and how far it is known to be durable.
/// The file is not kept open: it is opened, written (and synced, or handed
/// to the syncer) and closed once per reservation block of [`ID_BLOCK`] ids.
struct Reservation {
    /// The value last written to the file (maybe not yet synced). Shared
    /// with the syncer, which reads it right before syncing.
    written: Arc<AtomicU64>,
    /// Ids below this are covered by a synced reservation: only those may be
    /// handed out. Raised by the syncer or by [`History::commit`].
    durable: Arc<AtomicU64>,
    /// A descriptor of the file is queued on the syncer (see
    /// [`syncer::Job::queued`]).
    queued: Arc<AtomicBool>,
    /// `--fsync always`: the file is to be synced at the next commit.
    pending_commit: bool,
}

/// The open current segment.
struct Writer {
    /// Opened with `O_APPEND`: every record is one `write` at the end.
    file: File,
    /// The segment's [`Segment::sync_queued`].
    queued: Arc<AtomicBool>,
}

/// Records of a failed commit that are still in a segment file because it
/// could not be cut back yet: the file of segment `first_id` is cut to `len`
/// bytes before anything else is appended to the room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PendingCut {
    first_id: u64,
    len: u64,
}

/// Test-only fault injection: the next writes, syncs or cuts of a room (or
/// the store's directory syncs) fail while a flag is set. Empty otherwise.
#[derive(Clone, Copy, Default)]
struct Faults {
    #[cfg(test)]
    write: bool,
    #[cfg(test)]
    sync: bool,
    #[cfg(test)]
    cut: bool,
    #[cfg(test)]
    dir_sync: bool,
}

#[derive(Clone, Copy)]
enum Fault {
    Write,
    Sync,
    Cut,
    DirSync,
}

impl Faults {
    fn check(&self, which: Fault) -> io::Result<()> {
        #[cfg(test)]
        {
            let on = match which {
                Fault::Write => self.write,
                Fault::Sync => self.sync,
                Fault::Cut => self.cut,
                Fault::DirSync => self.dir_sync,
            };
            if on {
                return Err(io::Error::other("injected failure"));
            }
        }
        let _ = which;
        Ok(())
    }
}

/// The newest messages of a live room, a contiguous suffix of its log.
struct Tail {
    msgs: VecDeque<Kept>,
    /// The log holds nothing older than `msgs` (the room is small), so a
    /// miss here is a miss on disk too.
    complete: bool,
}

/// Where to cut back to if the next commit fails (`--fsync always`).
#[derive(Clone, Copy)]
struct Uncommitted {
    seg_len: u64,
    last_written: u64,
}

/// One room's log and ids.
struct Room {
    dir: PathBuf,
    /// The id the next `reserve_id` hands out.
    next_id: u64,
    res: Reservation,
    /// Oldest first; the last one is the current segment (appended to).
    segments: Vec<Segment>,
    /// Bytes of whole records in the current segment: what a reopened
    /// writer cuts the file back to after a failed write.
    seg_len: u64,
    /// `None` until the first append of this process, and after a failed
    /// write (the next append reopens and repairs).
    writer: Option<Writer>,
    /// Newest id in the log (0 when empty).
    last_written: u64,
    /// Loaded on the first read, dropped by [`History::release`].
    tail: Option<Tail>,
    /// `--fsync always`: appended since the last commit.
    uncommitted: Option<Uncommitted>,
    /// `--fsync always`: listed in [`DiskHistory::dirty`].
    in_dirty: bool,
    /// A failed commit could not cut its records off yet: the next append
    /// reopens that segment and cuts it first (and never rolls before).
    cut_to: Option<PendingCut>,
    /// The room directory is queued on the syncer (a new segment's entry).
    dir_queued: Arc<AtomicBool>,
    faults: Faults,
    /// Torn records cut since the last look (moved into the store counter).
    torn: u64,
    /// Released while it had uncommitted records: close its files after the
    /// commit that syncs them.
    close_after_commit: bool,
}

/// What recovering one room found (for warnings and counters).
#[derive(Default)]
struct Recovered {
    torn: u64,
    corrupt: u64,
    deleted: u64,
}

/// Side effects of a room operation that the store applies: what to sync
/// and which counters move.
struct Effects<'a> {
    syncer: Option<&'a Syncer>,
    /// Directories whose entries changed (`--fsync always`: synced at commit).
    dir_syncs: &'a mut Vec<PathBuf>,
    deleted: u64,
}

impl Room {
    /// A new, empty room at `dir`; its directory and reservation file are
    /// created and their entries synced, so that the reservation written
    /// next can be trusted after a crash.
    fn create(dir: PathBuf, rooms_dir: &Path) -> io::Result<Room> {
        match fs::create_dir(&dir) {
            Ok(()) => {}
            // A directory left without any file (a crash right after mkdir):
            // it is empty of ids, so starting at 1 is safe.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(RESERVATION_FILE))?;
        sync_dir(&dir)?;
        sync_dir(rooms_dir)?;
        Ok(Room {
            dir,
            next_id: 1,
            res: Reservation {
                written: Arc::new(AtomicU64::new(0)),
                durable: Arc::new(AtomicU64::new(0)),
                queued: Arc::new(AtomicBool::new(false)),
                pending_commit: false,
            },
            segments: Vec::new(),
            seg_len: 0,
            writer: None,
            last_written: 0,
            tail: None,
            uncommitted: None,
            in_dirty: false,
            cut_to: None,
            dir_queued: Arc::new(AtomicBool::new(false)),
            faults: Faults::default(),
            torn: 0,
            close_after_commit: false,
        })
    }

    /// Reads back a room after a restart: its reservation, its segment
    /// names and the end of its current segment (cutting a torn record),
    /// nothing else.
    fn recover(dir: PathBuf, retain: u64) -> io::Result<(Room, Recovered)> {
        let mut segments = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if let Some(first) = entry
                .file_name()
                .to_str()
                .and_then(segment::parse_file_name)
            {
                segments.push(Segment::new(first, entry.path()));
            }
        }
        segments.sort_by_key(|s| s.first_id);

        let mut found = Recovered::default();
        let mut seg_len = 0;
        let mut last_id = None;
        if let Some(current) = segments.last() {
            let check = segment::recover_tail(&current.path)?;
            seg_len = check.len;
            last_id = check.last_id;
            found.torn += u64::from(check.torn_bytes > 0);
            found.corrupt += check.corrupt;
        }
        // An empty (or wholly corrupt) current segment: the newest record is
        // in an earlier one. Earlier segments were complete when closed.
        for seg in segments.iter().rev().skip(1) {
            if last_id.is_some() {
                break;
            }
            let file = File::open(&seg.path)?;
            let len = file.metadata()?.len();
            let (id, corrupt) = segment::last_valid_id(&file, len, &seg.path)?;
            last_id = id;
            found.corrupt += corrupt;
        }
        let last = last_id.unwrap_or(0);

        let reserved = read_reservation(&dir.join(RESERVATION_FILE))?;
        let next_id = match reserved {
            Some(r) if r > last => r,
            Some(r) => {
                log::warn!(
                    "{}: id reservation {r} is behind the log's last id {last}; \
                     skipping a block of ids to be safe",
                    dir.display()
                );
                last.saturating_add(1 + ID_BLOCK)
            }
            None if !segments.is_empty() => {
                log::warn!(
                    "{}: id reservation missing or unreadable; \
                     continuing a block past the log's last id {last}",
                    dir.display()
                );
                last.saturating_add(1 + ID_BLOCK)
            }
            // No reservation was ever synced, so no id was handed out.
            None => 1,
        };

        let mut room = Room {
            dir,
            next_id,
            res: Reservation {
                // Recovery read `next_id` from the file but cannot know it
                // was synced: the first id handed out syncs a new block.
                written: Arc::new(AtomicU64::new(next_id)),
                durable: Arc::new(AtomicU64::new(next_id)),
                queued: Arc::new(AtomicBool::new(false)),
                pending_commit: false,
            },
            segments,
            seg_len,
            writer: None,
            last_written: last,
            tail: None,
            uncommitted: None,
            in_dirty: false,
            cut_to: None,
            dir_queued: Arc::new(AtomicBool::new(false)),
            faults: Faults::default(),
            torn: 0,
            close_after_commit: false,
        };
        found.deleted = room.apply_retention(retain);
        Ok((room, found))
    }

    /// Writes `value` over the reservation file (fixed width, one sector:
    /// a crash leaves the old or the new number) and, when `sync`, makes it
    /// durable before returning. Returns the descriptor it opened, for the
    /// caller to hand to the syncer or to close.
    fn write_reservation(&mut self, value: u64, sync: bool) -> io::Result<File> {
        let text = format!("{value:020}\n");
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(RESERVATION_FILE))?;
        file.write_all_at(text.as_bytes(), 0)?;
        if sync {
            file.sync_data()?;
        }
        self.res.written.store(value, Ordering::SeqCst);
        if sync {
            self.res.durable.fetch_max(value, Ordering::SeqCst);
        }
        Ok(file)
    }

    /// `--fsync always`: syncs the reservation file at commit (by path: a
    /// sync on any descriptor flushes the file).
    fn sync_reservation(&self) -> io::Result<()> {
        File::open(self.dir.join(RESERVATION_FILE))?.sync_data()
    }

    fn reserve_id(&mut self, fx: &mut Effects<'_>, s: Settings) -> io::Result<u64> {
        let id = self.next_id;
        if id == u64::MAX {
            return Err(io::Error::other("room ran out of ids"));
        }
        if id >= self.res.durable.load(Ordering::SeqCst) {
            // No durable reservation covers `id`: wait for one here (the
            // only sync on the loop outside commit; see the module doc).
            let target = id
                .saturating_add(ID_BLOCK)
                .max(self.res.written.load(Ordering::SeqCst));
            drop(self.write_reservation(target, true)?);
        }
        self.next_id = id + 1;

        // Half a block left: write the next block now and let it become
        // durable off the loop, so a steady room never waits above.
        let durable = self.res.durable.load(Ordering::SeqCst);
        let written = self.res.written.load(Ordering::SeqCst);
        if durable.saturating_sub(self.next_id) < ID_BLOCK / 2 && written <= durable {
            let target = durable.saturating_add(ID_BLOCK);
            match self.write_reservation(target, false) {
                Ok(file) => self.queue_reservation_sync(file, fx, s),
                // Not fatal: the id above is covered; the next exhaustion
                // retries synchronously and reports.
                Err(e) => log::warn!("{}: cannot extend id reservation: {e}", self.dir.display()),
            }
        }
        Ok(id)
    }

    /// Makes the reservation just written through `file` durable off the
    /// loop: at the next commit (`always`), or by the syncer, which is handed
    /// `file` and closes it after the sync. Otherwise `file` is closed here.
    fn queue_reservation_sync(&mut self, file: File, fx: &mut Effects<'_>, s: Settings) {
        if s.fsync == Fsync::Always {
            self.res.pending_commit = true;
            return;
        }
        let Some(syncer) = fx.syncer else { return };
        // Already queued: that sync reads `written` when it runs, so it
        // covers this write too.
        if self.res.queued.swap(true, Ordering::SeqCst) {
            return;
        }
        syncer.queue(Job {
            file,
            queued: Arc::clone(&self.res.queued),
            mark: Some(Mark {
                written: Arc::clone(&self.res.written),
                durable: Arc::clone(&self.res.durable),
            }),
        });
    }

    /// Appends `msg` as one record to the current segment (starting a new
    /// segment when this one is full). On error nothing is kept: the writer
    /// is dropped and the next append cuts the file back to its last whole
    /// record before writing.
    fn append(&mut self, msg: Kept, fx: &mut Effects<'_>, s: Settings) -> io::Result<()> {
        if self.cut_to.is_some() {
            // A failed commit's records are still in the file: cut them off
            // first, in the segment they are in; until that works nothing
            // is appended (and no new segment started past them).
            self.reopen_writer()?;
        }
        let full = match self.segments.last() {
            None => true,
            Some(seg) => {
                self.seg_len > 0
                    // `always`: a room's uncommitted records stay in one
                    // file, so a failed commit has one file to cut back.
                    && self.uncommitted.is_none()
                    && (msg.id.saturating_sub(seg.first_id) >= s.segment_messages
                        || self.seg_len >= MAX_SEGMENT_BYTES)
            }
        };
        let rolled = full;
        if full {
            self.roll(msg.id, fx, s)?;
        }
        if self.writer.is_none() {
            self.reopen_writer()?;
        }
        let Some(writer) = self.writer.as_mut() else {
            return Err(io::Error::other("segment not open"));
        };

        // The record is the message JSON as is. Valid JSON can only hold a
        // raw newline as whitespace, which a space replaces safely; the
        // dispatcher's compact encoding never has one.
        let json = msg.json.get();
        let mut line = Vec::with_capacity(json.len() + 1);
        if json.contains('\n') {
            line.extend(json.bytes().map(|b| if b == b'\n' { b' ' } else { b }));
        } else {
            line.extend_from_slice(json.as_bytes());
        }
        line.push(b'\n');
        let written = self
            .faults
            .check(Fault::Write)
            .and_then(|()| writer.file.write_all(&line));
        if let Err(e) = written {
            self.writer = None;
            return Err(e);
        }

        if s.fsync == Fsync::Always && self.uncommitted.is_none() {
            self.uncommitted = Some(Uncommitted {
                seg_len: self.seg_len,
                last_written: self.last_written,
            });
        }
        if s.fsync == Fsync::Everysec {
            queue_sync(fx.syncer, &writer.file, &writer.queued, &self.dir);
        }
        self.seg_len += line.len() as u64;
        self.last_written = msg.id;
        if let Some(tail) = self.tail.as_mut() {
            if s.keep > 0 {
                if tail.msgs.len() >= s.keep {
                    tail.msgs.pop_front();
                    tail.complete = false;
                }
                tail.msgs.push_back(msg);
            }
        }
        if rolled {
            fx.deleted += self.apply_retention(s.retain);
        }
        Ok(())
    }

    /// Starts the segment whose first record will be `first_id`.
    fn roll(&mut self, first_id: u64, fx: &mut Effects<'_>, s: Settings) -> io::Result<()> {
        let path = self.dir.join(segment::file_name(first_id));
        let file = File::options().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        let seg = Segment::new(first_id, path);
        let queued = Arc::clone(&seg.sync_queued);
        self.segments.push(seg);
        self.seg_len = len;
        self.writer = Some(Writer { file, queued });
        // The new file's directory entry must be durable too, or a crash can
        // lose the whole file although its data was synced. One pending
        // directory sync per room covers every entry made before it runs.
        match s.fsync {
            Fsync::Always => {
                if !fx.dir_syncs.contains(&self.dir) {
                    fx.dir_syncs.push(self.dir.clone());
                }
            }
            Fsync::Everysec => {
                if let Some(syncer) = fx.syncer {
                    if !self.dir_queued.swap(true, Ordering::SeqCst) {
                        match File::open(&self.dir) {
                            Ok(dir) => syncer.queue(Job {
                                file: dir,
                                queued: Arc::clone(&self.dir_queued),
                                mark: None,
                            }),
                            Err(e) => {
                                log::warn!("{}: cannot queue a sync: {e}", self.dir.display());
                                self.dir_queued.store(false, Ordering::SeqCst);
                            }
                        }
                    }
                }
            }
            Fsync::Never => {}
        }
        Ok(())
    }

    /// Opens the current segment for appending after a restart or a failed
    /// write. A failed commit may have left `cut_to`: records to cut off
    /// first, in the segment they were written to (checked by its first
    /// id; it is the current one, as nothing rolls while a cut is pending).
    /// Then the file's end is checked as at recovery (the file, not our
    /// bookkeeping, is the truth: an operator may have replaced it): a
    /// partial record left by a write that failed midway is cut off.
    fn reopen_writer(&mut self) -> io::Result<()> {
        if let Some(cut) = self.cut_to {
            match self
                .segments
                .iter_mut()
                .find(|s| s.first_id == cut.first_id)
            {
                Some(seg) => {
                    self.faults.check(Fault::Cut)?;
                    let file = File::options().write(true).open(&seg.path)?;
                    cut_back(&file, cut.len, &seg.path)?;
                    seg.read_cap = None;
                    seg.drop_index();
                }
                None => log::warn!(
                    "{}: segment {} to cut back is gone",
                    self.dir.display(),
                    cut.first_id
                ),
            }
            self.cut_to = None;
        }
        let Some(seg) = self.segments.last_mut() else {
            return Err(io::Error::other("room has no segment"));
        };
        let file = File::options().create(true).append(true).open(&seg.path)?;
        let check = segment::recover_tail(&seg.path)?;
        self.torn += u64::from(check.torn_bytes > 0);
        self.seg_len = check.len;
        // The file may not be what was indexed any more.
        seg.drop_index();
        self.writer = Some(Writer {
            file,
            queued: Arc::clone(&seg.sync_queued),
        });
        Ok(())
    }

    /// Deletes the oldest segments holding only ids older than the newest
    /// `retain` ids. The current segment is never deleted.
    fn apply_retention(&mut self, retain: u64) -> u64 {
        let cutoff = self.last_written.saturating_add(1).saturating_sub(retain);
        let mut deleted = 0;
        while self.segments.len() > 1 && self.segments[1].first_id <= cutoff {
            match fs::remove_file(&self.segments[0].path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    log::warn!(
                        "{}: cannot delete old segment: {e}",
                        self.segments[0].path.display()
                    );
                    break;
                }
            }
            self.segments.remove(0);
            deleted += 1;
        }
        // Ids can have gaps (a crash skips up to a block and a half), so the
        // newest `keep` messages in memory may reach into a deleted segment:
        // forget those too, so memory answers what the disk holds.
        if let (Some(first), Some(tail)) = (self.segments.first(), self.tail.as_mut()) {
            while tail.msgs.front().is_some_and(|m| m.id < first.first_id) {
                tail.msgs.pop_front();
            }
        }
        deleted
    }

    /// `--fsync always`, after a failed commit: forget the records appended
    /// since the last commit (the loop will refuse them) and cut them from
    /// the file now (through the writer, or by path when the last append
    /// dropped it), else before the next append (and hide them from reads
    /// meanwhile). They are all in the current segment: a room with
    /// uncommitted records never rolls.
    fn rollback(&mut self) {
        let Some(u) = self.uncommitted.take() else {
            return;
        };
        let writer = self.writer.take();
        if let Some(seg) = self.segments.last_mut() {
            let cut = self.faults.check(Fault::Cut).and_then(|()| match &writer {
                Some(w) => cut_back(&w.file, u.seg_len, &seg.path),
                None => File::options()
                    .write(true)
                    .open(&seg.path)
                    .and_then(|f| cut_back(&f, u.seg_len, &seg.path)),
            });
            if let Err(e) = cut {
                log::warn!(
                    "{}: cannot cut back uncommitted records yet: {e}",
                    seg.path.display()
                );
                self.cut_to = Some(PendingCut {
                    first_id: seg.first_id,
                    len: u.seg_len,
                });
                seg.read_cap = Some(u.seg_len);
            }
            seg.drop_index();
        }
        self.seg_len = u.seg_len;
        self.last_written = u.last_written;
        if let Some(tail) = self.tail.as_mut() {
            while tail.msgs.back().is_some_and(|m| m.id > u.last_written) {
                tail.msgs.pop_back();
            }
        }
    }

    /// Syncs the current segment (through the writer, or by path when the
    /// writer was dropped: a sync on any descriptor flushes the file).
    fn sync_current(&self) -> io::Result<()> {
        self.faults.check(Fault::Sync)?;
        match (&self.writer, self.segments.last()) {
            (Some(w), _) => w.file.sync_data(),
            (None, Some(seg)) => File::open(&seg.path)?.sync_data(),
            (None, None) => Ok(()),
        }
    }

    /// Loads the in-memory tail if needed; returns corrupt records met.
    fn ensure_tail(&mut self, keep: usize) -> io::Result<u64> {
        if self.tail.is_some() {
            return Ok(0);
        }
        let (msgs, corrupt) = self.disk_before(u64::MAX, keep)?;
        self.tail = Some(Tail {
            complete: msgs.len() < keep,
            msgs: msgs.into(),
        });
        Ok(corrupt)
    }

    fn before(&mut self, bound: u64, limit: usize, keep: usize) -> io::Result<(Vec<Kept>, u64)> {
        let corrupt = self.ensure_tail(keep)?;
        if let Some(tail) = self.tail.as_ref() {
            let end = tail.msgs.partition_point(|m| m.id < bound);
            if end >= limit || tail.complete {
                let start = end.saturating_sub(limit);
                return Ok((tail.msgs.range(start..end).cloned().collect(), corrupt));
            }
        }
        let (msgs, more) = self.disk_before(bound, limit)?;
        Ok((msgs, corrupt + more))
    }

    fn after(&mut self, since: u64, max: usize, keep: usize) -> io::Result<(Vec<Kept>, u64)> {
        let corrupt = self.ensure_tail(keep)?;
        if let Some(tail) = self.tail.as_ref() {
            // The tail is the newest contiguous part of the log: it answers
            // when it starts at or before the first id wanted.
            let covers = tail
                .msgs
                .front()
                .is_some_and(|m| m.id <= since.saturating_add(1));
            if covers || tail.complete {
                let start = tail.msgs.partition_point(|m| m.id <= since);
                return Ok((
                    tail.msgs.range(start..).take(max).cloned().collect(),
                    corrupt,
                ));
            }
        }
        let (msgs, more) = self.disk_after(since, max)?;
        Ok((msgs, corrupt + more))
    }

    /// The newest `limit` records below `bound`, from the segments, newest
    /// segment first until enough are found.
    fn disk_before(&mut self, bound: u64, limit: usize) -> io::Result<(Vec<Kept>, u64)> {
        let mut chunks = Vec::new();
        let mut remaining = limit;
        let mut bound = bound;
        let mut corrupt = 0;
        for seg in self.segments.iter_mut().rev() {
            if remaining == 0 {
                break;
            }
            if seg.first_id >= bound {
                continue;
            }
            let (got, c) = seg.read_before(bound, remaining)?;
            corrupt += c;
            remaining -= got.len().min(remaining);
            bound = seg.first_id;
            chunks.push(got);
        }
        Ok((chunks.into_iter().rev().flatten().collect(), corrupt))
    }

    /// The oldest `max` records above `since`, from the segment holding
    /// `since + 1` onwards.
    fn disk_after(&mut self, since: u64, max: usize) -> io::Result<(Vec<Kept>, u64)> {
        let want = since.saturating_add(1);
        let start = self
            .segments
            .partition_point(|s| s.first_id <= want)
            .saturating_sub(1);
        let mut out = Vec::new();
        let mut corrupt = 0;
        for seg in self.segments[start..].iter_mut() {
            if out.len() >= max {
                break;
            }
            let (got, c) = seg.read_after(since, max - out.len())?;
            corrupt += c;
            out.extend(got);
        }
        Ok((out, corrupt))
    }
}

/// Hands `file` to the syncer unless it is already queued.
fn queue_sync(syncer: Option<&Syncer>, file: &File, queued: &Arc<AtomicBool>, dir: &Path) {
    let Some(syncer) = syncer else { return };
    if queued.swap(true, Ordering::SeqCst) {
        return;
    }
    match file.try_clone() {
        Ok(file) => syncer.queue(Job {
            file,
            queued: Arc::clone(queued),
            mark: None,
        }),
        Err(e) => {
            log::warn!("{}: cannot queue a sync: {e}", dir.display());
            queued.store(false, Ordering::SeqCst);
        }
    }
}

/// Cuts the segment at `path` (open as `file`) back to `len` bytes and
/// syncs the cut, best effort (a failed sync is only logged: the records are
/// gone from the file as the process sees it). Not a regular file (an
/// operator's symlink to a device): nothing to cut.
fn cut_back(file: &File, len: u64, path: &Path) -> io::Result<()> {
    if !file.metadata()?.is_file() {
        return Ok(());
    }
    file.set_len(len)?;
    if let Err(e) = file.sync_data() {
        log::warn!("{}: cannot sync a cut: {e}", path.display());
    }
    Ok(())
}

/// The number in a reservation file; `None` when there is none or it is
/// unreadable (recovery then skips ahead, see [`Room::recover`]).
fn read_reservation(path: &Path) -> io::Result<Option<u64>> {
    let mut text = String::new();
    match File::open(path) {
        Ok(mut f) => {
            if f.read_to_string(&mut text).is_err() {
                return Ok(None);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok(text.lines().next().and_then(|l| l.trim().parse().ok()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, and syncs the parent of each one
/// created, so that a power cut soon after cannot lose the new entries.
/// Returns the directories synced.
fn create_dir_durable(dir: &Path) -> io::Result<Vec<PathBuf>> {
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
    let mut synced = Vec::new();
    for d in missing.iter().rev() {
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        sync_dir(parent)?;
        synced.push(parent.to_path_buf());
    }
    Ok(synced)
}

/// The on-disk [`History`]: see the module doc and `docs/persistence.md`.
pub struct DiskHistory {
    dir: PathBuf,
    rooms_dir: PathBuf,
    settings: Settings,
    rooms: HashMap<Box<str>, Room>,
    /// `--fsync always`: rooms appended to (or with a reservation to sync)
    /// since the last commit.
    dirty: Vec<Box<str>>,
    /// `--fsync always`: directories to sync at the next commit.
    dir_syncs: Vec<PathBuf>,
    /// The periodic syncer (`everysec` and `never`; see `syncer`).
    syncer: Option<Syncer>,
    sync_stats: Arc<SyncStats>,
    appends: u64,
    append_errors: u64,
    corrupt: u64,
    torn: u64,
    segments_deleted: u64,
    /// The last append, reservation or commit failed.
    failing: bool,
    /// Test-only fault injection for directory syncs in `commit`.
    faults: Faults,
    /// Tests: the directories `open` synced.
    #[cfg(test)]
    opened_syncs: Vec<PathBuf>,
    /// Holds the `flock` on `LOCK` for as long as the store is open.
    _lock: File,
    /// Tests: skip the clean-shutdown work in `Drop`, like `kill -9`.
    #[cfg(test)]
    crashed: bool,
}

impl DiskHistory {
    /// Opens (creating if needed) the data dir, takes its lock and recovers
    /// every room's next id and current segment. Blocks: call it before the
    /// loop starts.
    pub fn open(opts: &DiskOptions) -> Result<DiskHistory, OpenError> {
        Self::open_with(opts, segment_messages_for(opts.retain))
    }

    fn open_with(opts: &DiskOptions, segment_messages: u64) -> Result<DiskHistory, OpenError> {
        if opts.retain == 0 {
            return Err(OpenError::BadOption("--retain-messages must be at least 1"));
        }
        let dir = opts.dir.clone();
        let not_writable = |source| OpenError::NotWritable {
            dir: dir.clone(),
            source,
        };
        let mut opened_syncs = create_dir_durable(&dir).map_err(|source| OpenError::Create {
            dir: dir.clone(),
            source,
        })?;
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
                OpenError::Locked { dir }
            } else {
                not_writable(e)
            });
        }
        // The pid in LOCK tells an operator who holds it; writing it also
        // proves the directory's files are writable.
        lock.set_len(0)
            .and_then(|()| lock.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0))
            .map_err(not_writable)?;
        let rooms_dir = dir.join(ROOMS_DIR);
        // The data dir is synced whether `rooms/` is new or not (once per
        // start): a room's files are only as durable as this entry.
        fs::create_dir_all(&rooms_dir)
            .and_then(|()| sync_dir(&dir))
            .map_err(not_writable)?;
        opened_syncs.push(dir.clone());
        let probe = rooms_dir.join(".probe");
        File::create(&probe)
            .and_then(|mut f| f.write_all(b"probe\n"))
            .and_then(|()| fs::remove_file(&probe))
            .map_err(not_writable)?;

        let settings = Settings {
            fsync: opts.fsync,
            retain: opts.retain,
            keep: opts
                .keep
                .min(usize::try_from(opts.retain).unwrap_or(usize::MAX)),
            segment_messages: segment_messages.max(1),
        };
        let mut store = DiskHistory {
            dir,
            rooms_dir: rooms_dir.clone(),
            settings,
            rooms: HashMap::new(),
            dirty: Vec::new(),
            dir_syncs: Vec::new(),
            syncer: None,
            sync_stats: Arc::new(SyncStats::default()),
            appends: 0,
            append_errors: 0,
            corrupt: 0,
            torn: 0,
            segments_deleted: 0,
            failing: false,
            faults: Faults::default(),
            #[cfg(test)]
            opened_syncs,
            _lock: lock,
            #[cfg(test)]
            crashed: false,
        };
        let recover_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Recover { path, source }
        };
        let entries = fs::read_dir(&rooms_dir).map_err(recover_err(&rooms_dir))?;
        for entry in entries {
            let entry = entry.map_err(recover_err(&rooms_dir))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().and_then(names::decode) else {
                if !entry.file_name().to_string_lossy().starts_with('.') {
                    log::warn!("{}: not a room directory; ignored", path.display());
                }
                continue;
            };
            if !entry.file_type().map_err(recover_err(&path))?.is_dir() {
                log::warn!("{}: not a directory; ignored", path.display());
                continue;
            }
            let (room, found) =
                Room::recover(path.clone(), settings.retain).map_err(recover_err(&path))?;
            store.torn += found.torn;
            store.corrupt += found.corrupt;
            store.segments_deleted += found.deleted;
            store.rooms.insert(name.into(), room);
        }
        if settings.fsync != Fsync::Always {
            let syncer = Syncer::spawn(Arc::clone(&store.sync_stats)).map_err(OpenError::Thread)?;
            store.syncer = Some(syncer);
        }
        log::info!(
            "history: {} rooms recovered from {} (fsync {}, retain {} per room)",
            store.rooms.len(),
            store.dir.display(),
            settings.fsync,
            settings.retain
        );
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn mark_dirty(dirty: &mut Vec<Box<str>>, name: &str, room: &mut Room) {
        if !room.in_dirty {
            room.in_dirty = true;
            dirty.push(name.into());
        }
    }

    /// Simulates `kill -9` for tests: the store is dropped without the
    /// clean-shutdown work (final syncs, exact reservations).
    #[cfg(test)]
    fn crash(mut self) {
        self.crashed = true;
    }
}

/// The longest room name, in bytes: the protocol's limit (32 chars of
/// `[A-Za-z0-9_.-]`).
const MAX_ROOM_NAME: usize = 32;

/// Room names the store accepts: the protocol's rule is checked by the
/// dispatcher; this only guards the file system (bounded as the protocol
/// bounds it, non-empty; the encoding keeps any byte inside the data dir).
fn check_room_name(room: &str) -> io::Result<()> {
    if room.is_empty() || room.len() > MAX_ROOM_NAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("room name of {} bytes", room.len()),
        ));
    }
    Ok(())
}

impl History for DiskHistory {
    fn reserve_id(&mut self, room: &str) -> Result<u64, HistoryError> {
        let s = self.settings;
        if !self.rooms.contains_key(room) {
            check_room_name(room)?;
            let dir = self.rooms_dir.join(names::encode(room));
            match Room::create(dir, &self.rooms_dir) {
                Ok(r) => {
                    self.rooms.insert(room.into(), r);
                }
                Err(e) => {
                    self.append_errors += 1;
                    self.failing = true;
                    return Err(e.into());
                }
            }
        }
        let Some(r) = self.rooms.get_mut(room) else {
            return Err(io::Error::other("room vanished").into());
        };
        let mut fx = Effects {
            syncer: self.syncer.as_ref(),
            dir_syncs: &mut self.dir_syncs,
            deleted: 0,
        };
        match r.reserve_id(&mut fx, s) {
            Ok(id) => {
                if r.res.pending_commit {
                    Self::mark_dirty(&mut self.dirty, room, r);
                }
                Ok(id)
            }
            Err(e) => {
                self.append_errors += 1;
                self.failing = true;
                Err(e.into())
            }
        }
    }

    fn append(&mut self, room: &str, msg: Kept) -> Result<(), HistoryError> {
        let s = self.settings;
        let Some(r) = self.rooms.get_mut(room) else {
            return Err(
                io::Error::new(io::ErrorKind::InvalidInput, "append before reserve_id").into(),
            );
        };
        if msg.id <= r.last_written || msg.id >= r.next_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "id {} was not reserved or is not above the last kept",
                    msg.id
                ),
            )
            .into());
        }
        let mut fx = Effects {
            syncer: self.syncer.as_ref(),
            dir_syncs: &mut self.dir_syncs,
            deleted: 0,
        };
        let result = r.append(msg, &mut fx, s);
        self.segments_deleted += fx.deleted;
        self.torn += std::mem::take(&mut r.torn);
        match result {
            Ok(()) => {
                self.appends += 1;
                self.failing = false;
                if r.uncommitted.is_some() {
                    Self::mark_dirty(&mut self.dirty, room, r);
                }
                Ok(())
            }
            Err(e) => {
                self.append_errors += 1;
                if !self.failing {
                    log::warn!("history append to room {room:?} failed: {e}");
                }
                self.failing = true;
                Err(e.into())
            }
        }
    }

    fn last(&mut self, room: &str, n: usize) -> Result<Vec<Kept>, HistoryError> {
        self.before(room, None, n)
    }

    fn after(&mut self, room: &str, since: u64, max: usize) -> Result<Vec<Kept>, HistoryError> {
        let keep = self.settings.keep;
        let Some(r) = self.rooms.get_mut(room) else {
            return Ok(Vec::new());
        };
        let (msgs, corrupt) = r.after(since, max, keep)?;
        self.corrupt += corrupt;
        Ok(msgs)
    }

    fn before(
        &mut self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Kept>, HistoryError> {
        let keep = self.settings.keep;
        let Some(r) = self.rooms.get_mut(room) else {
            return Ok(Vec::new());
        };
        let (msgs, corrupt) = r.before(before.unwrap_or(u64::MAX), limit, keep)?;
        self.corrupt += corrupt;
        Ok(msgs)
    }

    fn release(&mut self, room: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.tail = None;
        // The sparse indexes go too: they are rebuilt by the next read.
        for seg in &mut r.segments {
            seg.drop_index();
        }
        // Close its segment too, so descriptors stay bounded by live rooms;
        // unless a commit still has to sync it.
        if r.uncommitted.is_some() {
            r.close_after_commit = true;
        } else {
            r.writer = None;
        }
    }

    fn commit(&mut self) -> Result<(), HistoryError> {
        if self.dirty.is_empty() && self.dir_syncs.is_empty() {
            return Ok(());
        }
        // Group commit: one fdatasync per file appended to in this
        // iteration, however many records it got.
        let start = Instant::now();
        let mut files = 0;
        let mut failed = 0;
        let mut first_err = None;
        let mut batch = std::mem::take(&mut self.dirty);
        for name in &batch {
            let Some(r) = self.rooms.get_mut(name) else {
                continue;
            };
            r.in_dirty = false;
            if r.uncommitted.is_some() {
                files += 1;
                if let Err(e) = r.sync_current() {
                    log::warn!("history sync of room {name:?} failed: {e}");
                    failed += 1;
                    first_err.get_or_insert(e);
                }
            }
            if r.res.pending_commit {
                r.res.pending_commit = false;
                files += 1;
                let written = r.res.written.load(Ordering::SeqCst);
                match r.sync_reservation() {
                    Ok(()) => {
                        r.res.durable.fetch_max(written, Ordering::SeqCst);
                    }
                    // The ids already handed out are covered; the next
                    // exhaustion syncs on the spot and reports.
                    Err(e) => {
                        log::warn!("history reservation sync of room {name:?} failed: {e}");
                        failed += 1;
                    }
                }
            }
        }
        for dir in self.dir_syncs.drain(..) {
            files += 1;
            let synced = self
                .faults
                .check(Fault::DirSync)
                .and_then(|()| sync_dir(&dir));
            if let Err(e) = synced {
                log::warn!("history sync of {} failed: {e}", dir.display());
                failed += 1;
                first_err.get_or_insert(e);
            }
        }
        // All or nothing: an error makes the loop refuse every message of
        // the batch, so none of them may stay in the log, not even those of
        // rooms whose own sync worked.
        for name in &batch {
            let Some(r) = self.rooms.get_mut(name) else {
                continue;
            };
            if first_err.is_some() {
                r.rollback();
            } else {
                r.uncommitted = None;
            }
            if r.close_after_commit {
                r.close_after_commit = false;
                r.writer = None;
            }
        }
        batch.clear();
        self.dirty = batch;
        self.sync_stats.round(start, files, failed);
        match first_err {
            Some(e) => {
                self.failing = true;
                Err(e.into())
            }
            None => Ok(()),
        }
    }

    fn healthy(&self) -> bool {
        !self.failing && !self.sync_stats.failing.load(Ordering::Relaxed)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.sync_stats;
        vec![
            ("store_rooms", self.rooms.len() as u64),
            ("store_appends", self.appends),
            ("store_append_errors", self.append_errors),
            ("store_syncs", s.syncs.load(Ordering::Relaxed)),
            ("store_sync_errors", s.errors.load(Ordering::Relaxed)),
            ("store_sync_last_us", s.last_us.load(Ordering::Relaxed)),
            ("store_sync_max_us", s.max_us.load(Ordering::Relaxed)),
            ("store_corrupt_records", self.corrupt),
            ("store_torn_records", self.torn),
            ("store_segments_deleted", self.segments_deleted),
        ]
    }
}

impl Drop for DiskHistory {
    /// Clean shutdown: sync what was appended (unless `--fsync never`) and
    /// write each used room's exact next id as its reservation, so a clean
    /// restart continues without a gap. Failures are only logged.
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crashed {
            return;
        }
        for r in self.rooms.values_mut() {
            if self.settings.fsync != Fsync::Never && r.writer.is_some() {
                if let Err(e) = r.sync_current() {
                    log::warn!("{}: final sync failed: {e}", r.dir.display());
                }
            }
            // Every id handed out is below `next_id`, so lowering the
            // reservation to it is safe; untouched rooms already hold it.
            if r.res.written.load(Ordering::SeqCst) != r.next_id {
                if let Err(e) = r.write_reservation(r.next_id, true) {
                    log::warn!("{}: cannot save next id: {e}", r.dir.display());
                }
            }
        }
        // Dropping the syncer syncs whatever it still holds, then joins it.
        self.syncer = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryHistory;
    use serde_json::value::RawValue;
    use std::rc::Rc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::SeqCst);
            let path = std::env::temp_dir()
                .join(format!("loopchat-disk-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("temp dir");
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn opts(dir: &Path, fsync: Fsync, keep: usize, retain: u64) -> DiskOptions {
        DiskOptions {
            dir: dir.to_path_buf(),
            fsync,
            retain,
            keep,
        }
    }

    fn open(o: &DiskOptions) -> DiskHistory {
        DiskHistory::open(o).expect("open")
    }

    fn kept(room: &str, id: u64) -> Kept {
        let text = format!(
            r#"{{"type":"message","content":"m{id}","room":"{room}","user":"u","id":{id},"ts":1}}"#
        );
        Kept {
            id,
            json: Rc::from(RawValue::from_string(text).expect("json")),
        }
    }

    /// Reserves and appends `n` messages; returns their ids.
    fn send(h: &mut dyn History, room: &str, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let id = h.reserve_id(room).expect("reserve");
                h.append(room, kept(room, id)).expect("append");
                id
            })
            .collect()
    }

    fn ids(v: &[Kept]) -> Vec<u64> {
        v.iter().map(|k| k.id).collect()
    }

    fn counter(h: &DiskHistory, name: &str) -> u64 {
        h.counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .expect("counter")
    }

    fn room_dir(base: &Path, room: &str) -> PathBuf {
        base.join(ROOMS_DIR).join(names::encode(room))
    }

    fn segment_files(base: &Path, room: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(room_dir(base, room))
            .expect("room dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn fsync_parses_and_displays() {
        for m in [Fsync::Always, Fsync::Everysec, Fsync::Never] {
            assert_eq!(m.to_string().parse::<Fsync>(), Ok(m));
        }
        let err = "sometimes".parse::<Fsync>().unwrap_err();
        assert!(err.to_string().contains("always, everysec or never"));
    }

    #[test]
    fn restart_keeps_history_and_ids() {
        let tmp = TempDir::new("restart");
        let o = opts(&tmp.0, Fsync::Everysec, 100, 1000);
        let mut h = open(&o);
        assert_eq!(send(&mut h, "r", 5), vec![1, 2, 3, 4, 5]);
        assert_eq!(send(&mut h, "other", 2), vec![1, 2]);
        drop(h);

        let mut h = open(&o);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 3, 4, 5]);
        assert_eq!(ids(&h.before("r", Some(4), 2).unwrap()), vec![2, 3]);
        assert_eq!(ids(&h.after("r", 3, 10).unwrap()), vec![4, 5]);
        // A clean shutdown saved the exact next id: no gap.
        assert_eq!(send(&mut h, "r", 1), vec![6]);
        assert_eq!(send(&mut h, "other", 1), vec![3]);
        // The record on disk is the message JSON, one per line.
        let text = fs::read_to_string(&segment_files(&tmp.0, "r")[0]).unwrap();
        assert_eq!(text.lines().count(), 6);
        assert!(text.starts_with(r#"{"type":"message","content":"m1""#));
    }

    #[test]
    fn ids_are_not_reused_after_a_crash() {
        let tmp = TempDir::new("crash");
        let o = opts(&tmp.0, Fsync::Never, 100, 1000);
        let mut h = open(&o);
        send(&mut h, "r", 3);
        // Id 4 is handed out but its message never reaches the log.
        assert_eq!(h.reserve_id("r").unwrap(), 4);
        h.crash();

        let mut h = open(&o);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 3]);
        let next = h.reserve_id("r").unwrap();
        assert!(next > 4, "id {next} reused after a crash");
        h.append("r", kept("r", next)).unwrap();
        h.crash();

        // A crash that also tore the last record: still no reuse.
        // (The jump in ids started a new segment.)
        let seg = segment_files(&tmp.0, "r").last().unwrap().clone();
        let len = fs::metadata(&seg).unwrap().len();
        File::options()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let mut h = open(&o);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 3]);
        assert!(h.reserve_id("r").unwrap() > next);
    }

    #[test]
    fn a_torn_last_record_is_cut_and_the_room_kept() {
        let tmp = TempDir::new("torn");
        let o = opts(&tmp.0, Fsync::Always, 100, 1000);
        let mut h = open(&o);
        send(&mut h, "r", 3);
        h.commit().unwrap();
        drop(h);
        let seg = segment_files(&tmp.0, "r")[0].clone();
        let clean = fs::metadata(&seg).unwrap().len();
        let mut f = File::options().append(true).open(&seg).unwrap();
        f.write_all(br#"{"type":"message","content":"half a rec"#)
            .unwrap();
        drop(f);

        let mut h = open(&o);
        assert_eq!(fs::metadata(&seg).unwrap().len(), clean, "torn record cut");
        assert_eq!(counter(&h, "store_torn_records"), 1);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 3]);
        assert_eq!(send(&mut h, "r", 1), vec![4]);
        h.commit().unwrap();
        drop(h);
        let mut h = open(&o);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 3, 4]);
        assert_eq!(counter(&h, "store_corrupt_records"), 0);
    }

    #[test]
    fn a_corrupt_middle_record_is_skipped_and_counted() {
        let tmp = TempDir::new("corrupt");
        let o = opts(&tmp.0, Fsync::Everysec, 100, 1000);
        let mut h = open(&o);
        send(&mut h, "r", 5);
        drop(h);
        let seg = segment_files(&tmp.0, "r")[0].clone();
        let text = fs::read_to_string(&seg).unwrap();
        let mangled: Vec<String> = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i == 2 {
                    l.replace('{', "\u{0}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        fs::write(&seg, mangled.join("\n") + "\n").unwrap();

        let mut h = open(&o);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 4, 5]);
        assert_eq!(ids(&h.after("r", 1, 10).unwrap()), vec![2, 4, 5]);
        assert_eq!(counter(&h, "store_corrupt_records"), 1);
        assert_eq!(send(&mut h, "r", 1), vec![6]);
    }

    #[test]
    fn retention_deletes_old_segments_and_paging_still_works() {
        let tmp = TempDir::new("retain");
        // retain 50 → 16 messages per segment; keep 10 in memory.
        let o = opts(&tmp.0, Fsync::Never, 10, 50);
        let mut h = open(&o);
        send(&mut h, "r", 200);
        let files = segment_files(&tmp.0, "r");
        assert!(files.len() <= 5, "{} segments kept", files.len());
        assert!(counter(&h, "store_segments_deleted") > 0);

        drop(h);
        let mut h = open(&o);
        // Page back from the newest message until nothing is left.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = h.before("r", before, 7).unwrap();
            if page.is_empty() {
                break;
            }
            before = Some(page[0].id);
            let mut page = ids(&page);
            page.append(&mut seen);
            seen = page;
        }
        let oldest = seen[0];
        assert!(oldest <= 151, "retained only from {oldest}");
        assert_eq!(seen, (oldest..=200).collect::<Vec<_>>());
        assert_eq!(
            ids(&h.after("r", 160, 5).unwrap()),
            vec![161, 162, 163, 164, 165]
        );
        assert_eq!(ids(&h.after("r", 0, 2).unwrap()), vec![oldest, oldest + 1]);
    }

    #[test]
    fn room_names_stay_inside_the_data_dir() {
        let tmp = TempDir::new("names");
        let data = tmp.0.join("data");
        let o = opts(&data, Fsync::Never, 100, 1000);
        let mut h = open(&o);
        let rooms = ["..", ".", "...", "A", "a", "a.B", "A.b", "-x_"];
        for (i, room) in rooms.iter().enumerate() {
            assert_eq!(send(&mut h, room, i + 1).len(), i + 1);
        }
        drop(h);
        // Nothing was created beside the data dir.
        let outside: Vec<_> = fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside, vec![std::ffi::OsString::from("data")]);
        let dirs: Vec<String> = fs::read_dir(data.join(ROOMS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(dirs.len(), rooms.len());
        let folded: std::collections::HashSet<_> = dirs.iter().map(|d| d.to_lowercase()).collect();
        assert_eq!(
            folded.len(),
            rooms.len(),
            "case-insensitive collision in {dirs:?}"
        );
        let mut h = open(&o);
        for (i, room) in rooms.iter().enumerate() {
            assert_eq!(h.last(room, 100).unwrap().len(), i + 1, "room {room}");
        }
    }

    #[test]
    fn a_failing_disk_is_reported_not_fatal() {
        let tmp = TempDir::new("full");
        let o = opts(&tmp.0, Fsync::Always, 100, 1000);
        let mut h = open(&o);
        send(&mut h, "r", 2);
        h.commit().unwrap();
        drop(h);
        // The current segment now points at /dev/full: writes get ENOSPC.
        let seg = segment_files(&tmp.0, "r")[0].clone();
        let saved = fs::read(&seg).unwrap();
        fs::remove_file(&seg).unwrap();
        std::os::unix::fs::symlink("/dev/full", &seg).unwrap();

        let mut h = open(&o);
        assert!(h.healthy());
        let id = h.reserve_id("r").unwrap();
        match h.append("r", kept("r", id)) {
            Err(HistoryError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC)),
            other => panic!("expected ENOSPC, got {other:?}"),
        }
        assert!(!h.healthy());
        assert_eq!(counter(&h, "store_append_errors"), 1);
        // Other rooms are on a healthy file and still work.
        assert_eq!(send(&mut h, "ok", 1), vec![1]);
        h.commit().unwrap();
        assert!(h.healthy(), "recovers after a later write succeeds");

        // The disk comes back: the room's next message is kept.
        fs::remove_file(&seg).unwrap();
        fs::write(&seg, &saved).unwrap();
        let id2 = h.reserve_id("r").unwrap();
        assert!(id2 > id);
        h.append("r", kept("r", id2)).unwrap();
        h.commit().unwrap();
        assert!(h.healthy());
        drop(h);
        let mut h = open(&o);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, id2]);
    }

    #[test]
    fn open_reports_an_unusable_dir_in_one_line() {
        let tmp = TempDir::new("open");
        let file = tmp.0.join("plain-file");
        fs::write(&file, b"x").unwrap();
        let err = DiskHistory::open(&opts(&file.join("data"), Fsync::Never, 1, 1))
            .err()
            .expect("open must fail");
        let line = err.to_string();
        assert!(line.starts_with("cannot create data dir "), "{line}");
        assert!(
            line.contains("plain-file/data") && !line.contains('\n'),
            "{line}"
        );

        let o = opts(&tmp.0.join("d"), Fsync::Never, 1, 1);
        let _held = open(&o);
        let err = DiskHistory::open(&o).err().expect("second open must fail");
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");

        let err = DiskHistory::open(&opts(&tmp.0, Fsync::Never, 1, 0))
            .err()
            .expect("bad retain");
        assert!(matches!(err, OpenError::BadOption(_)));
    }

    #[test]
    fn always_commits_with_one_sync_per_file() {
        let tmp = TempDir::new("always");
        let o = opts(&tmp.0, Fsync::Always, 100, 1000);
        let mut h = open(&o);
        h.commit().unwrap();
        let base = counter(&h, "store_syncs");
        // Room creation syncs its own entries; the commit syncs the rest.
        send(&mut h, "a", 10);
        send(&mut h, "b", 10);
        h.commit().unwrap();
        let after_first = counter(&h, "store_syncs");
        send(&mut h, "a", 10);
        send(&mut h, "b", 10);
        h.commit().unwrap();
        // Twenty records in two rooms: two data syncs, not twenty.
        assert_eq!(counter(&h, "store_syncs") - after_first, 2);
        assert!(after_first > base);
        assert!(h.healthy());
    }

    #[test]
    fn everysec_syncs_off_the_loop() {
        let tmp = TempDir::new("everysec");
        let o = opts(&tmp.0, Fsync::Everysec, 100, 1000);
        let mut h = open(&o);
        send(&mut h, "r", 3);
        assert_eq!(
            counter(&h, "store_syncs"),
            0,
            "the loop itself never syncs data"
        );
        // The syncer ticks once a second; wait for it with a deadline.
        let deadline = Instant::now() + Duration::from_secs(5);
        while counter(&h, "store_syncs") == 0 {
            assert!(Instant::now() < deadline, "no periodic sync within 5 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(h.healthy());
    }

    #[test]
    fn release_drops_memory_but_not_ids_or_history() {
        let tmp = TempDir::new("release");
        let o = opts(&tmp.0, Fsync::Always, 4, 1000);
        let mut h = open(&o);
        send(&mut h, "r", 10);
        h.release("r");
        h.commit().unwrap();
        assert_eq!(ids(&h.last("r", 3).unwrap()), vec![8, 9, 10]);
        assert_eq!(ids(&h.last("r", 6).unwrap()), vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(send(&mut h, "r", 1), vec![11]);
    }

    #[test]
    fn reservation_blocks_roll_over_without_gaps() {
        let tmp = TempDir::new("blocks");
        let o = opts(&tmp.0, Fsync::Always, 10, 100_000);
        let mut h = open(&o);
        let n = (ID_BLOCK * 3) as usize;
        let got = send(&mut h, "r", n);
        assert_eq!(got, (1..=n as u64).collect::<Vec<_>>());
        h.commit().unwrap();
        h.crash();
        let mut h = open(&o);
        let next = h.reserve_id("r").unwrap();
        assert!(
            next > n as u64 && next <= n as u64 + 2 * ID_BLOCK + 1,
            "next {next}"
        );
    }

    /// The disk store answers like the in-memory model (which never forgets
    /// anything here), whatever is in memory and whichever segment is read.
    #[test]
    fn matches_the_memory_model() {
        let tmp = TempDir::new("model");
        let o = opts(&tmp.0, Fsync::Never, 7, 1_000_000);
        let mut disk = DiskHistory::open_with(&o, 10).unwrap();
        let mut model = MemoryHistory::new(usize::MAX);
        let rooms = ["r", "s"];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..3000 {
            let room = rooms[rand(2) as usize];
            match rand(10) {
                0..=4 => {
                    let a = disk.reserve_id(room).unwrap();
                    let b = model.reserve_id(room).unwrap();
                    assert_eq!(a, b);
                    disk.append(room, kept(room, a)).unwrap();
                    model.append(room, kept(room, b)).unwrap();
                }
                5 => {
                    let since = rand(400);
                    let max = rand(40) as usize;
                    let a = ids(&disk.after(room, since, max).unwrap());
                    let b = ids(&model.after(room, since, max).unwrap());
                    assert_eq!(a, b, "step {step}: after({since}, {max})");
                }
                6 | 7 => {
                    let before = if rand(4) == 0 { None } else { Some(rand(400)) };
                    let limit = rand(40) as usize;
                    let a = ids(&disk.before(room, before, limit).unwrap());
                    let b = ids(&model.before(room, before, limit).unwrap());
                    assert_eq!(a, b, "step {step}: before({before:?}, {limit})");
                }
                8 => disk.release(room),
                _ => {
                    if rand(50) == 0 {
                        drop(disk);
                        disk = DiskHistory::open_with(&o, 10).unwrap();
                    }
                }
            }
        }
    }

    fn room<'a>(h: &'a mut DiskHistory, name: &str) -> &'a mut Room {
        h.rooms.get_mut(name).expect("room")
    }

    /// Descriptors of this process open on exactly `path`.
    fn fds_on(path: &Path) -> usize {
        let path = fs::canonicalize(path).expect("canonical path");
        fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(Result::ok)
            .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
            .count()
    }

    /// Bug 1: one room's failed sync must not leave another room's records
    /// of the same batch in the log (the loop refuses them all).
    #[test]
    fn a_failed_commit_keeps_nothing_of_its_batch() {
        let tmp = TempDir::new("allornothing");
        let o = opts(&tmp.0, Fsync::Always, 100, 1000);
        let mut h = open(&o);
        send(&mut h, "a", 2);
        send(&mut h, "b", 2);
        h.commit().unwrap();
        let a_len = fs::metadata(&segment_files(&tmp.0, "a")[0]).unwrap().len();

        // "a" syncs first and fine; "b" fails.
        send(&mut h, "a", 1);
        send(&mut h, "b", 1);
        room(&mut h, "b").faults.sync = true;
        assert!(h.commit().is_err());
        assert!(!h.healthy());
        assert_eq!(ids(&h.last("a", 10).unwrap()), vec![1, 2]);
        assert_eq!(ids(&h.last("b", 10).unwrap()), vec![1, 2]);
        let a_seg = segment_files(&tmp.0, "a")[0].clone();
        assert_eq!(fs::metadata(&a_seg).unwrap().len(), a_len);
        h.release("a");
        assert_eq!(ids(&h.last("a", 10).unwrap()), vec![1, 2]);

        // The disk is back: ids go on upward (3 was refused, not reused).
        room(&mut h, "b").faults.sync = false;
        assert_eq!(send(&mut h, "a", 1), vec![4]);
        h.commit().unwrap();
        assert!(h.healthy());
        drop(h);
        let mut h = open(&o);
        assert_eq!(ids(&h.last("a", 10).unwrap()), vec![1, 2, 4]);
        assert_eq!(ids(&h.last("b", 10).unwrap()), vec![1, 2]);
    }

    /// Bug 1, directory syncs: a failed sync of a new segment's entry
    /// refuses the batch, so every room of it is cut back.
    #[test]
    fn a_failed_directory_sync_keeps_nothing_of_its_batch() {
        let tmp = TempDir::new("dirsync");
        let o = opts(&tmp.0, Fsync::Always, 100, 1000);
        let mut h = DiskHistory::open_with(&o, 2).unwrap();
        send(&mut h, "a", 2);
        send(&mut h, "b", 1);
        h.commit().unwrap();
        // "a" starts a new segment (id 3), "b" does not.
        send(&mut h, "a", 1);
        send(&mut h, "b", 1);
        h.faults.dir_sync = true;
        assert!(h.commit().is_err());
        h.faults.dir_sync = false;
        h.release("a");
        h.release("b");
        assert_eq!(ids(&h.last("a", 10).unwrap()), vec![1, 2]);
        assert_eq!(ids(&h.last("b", 10).unwrap()), vec![1]);
        drop(h);
        let mut h = DiskHistory::open_with(&o, 2).unwrap();
        assert_eq!(ids(&h.last("a", 10).unwrap()), vec![1, 2]);
        assert_eq!(ids(&h.last("b", 10).unwrap()), vec![1]);
    }

    /// Bug 2: a rollback after a failed append (no writer) cuts the file by
    /// path at once.
    #[test]
    fn a_rollback_without_a_writer_cuts_by_path() {
        let tmp = TempDir::new("cutbypath");
        let o = opts(&tmp.0, Fsync::Always, 100, 1000);
        let mut h = open(&o);
        send(&mut h, "r", 3);
        h.commit().unwrap();
        let seg = segment_files(&tmp.0, "r")[0].clone();
        let len = fs::metadata(&seg).unwrap().len();
        send(&mut h, "r", 1);
        room(&mut h, "r").faults.write = true;
        let id = h.reserve_id("r").unwrap();
        assert!(h.append("r", kept("r", id)).is_err());
        assert!(room(&mut h, "r").writer.is_none());
        room(&mut h, "r").faults = Faults::default();
        room(&mut h, "r").faults.sync = true;
        assert!(h.commit().is_err());
        assert_eq!(fs::metadata(&seg).unwrap().len(), len, "cut at once");
        assert_eq!(room(&mut h, "r").cut_to, None);
        room(&mut h, "r").faults = Faults::default();
        h.release("r");
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 3]);
    }

    /// Bug 2: a cut that cannot be made at once is kept as (segment, len),
    /// hides the refused records from reads, and is made in that segment
    /// before the next append, which must not start a new segment first.
    #[test]
    fn a_pending_cut_is_made_in_its_own_segment_before_any_roll() {
        let tmp = TempDir::new("pendingcut");
        let o = opts(&tmp.0, Fsync::Always, 100, 1000);
        // Four ids per segment.
        let mut h = DiskHistory::open_with(&o, 4).unwrap();
        send(&mut h, "r", 3);
        h.commit().unwrap();
        let seg1 = segment_files(&tmp.0, "r")[0].clone();
        let len = fs::metadata(&seg1).unwrap().len();

        assert_eq!(send(&mut h, "r", 1), vec![4]);
        room(&mut h, "r").faults.write = true;
        let id5 = h.reserve_id("r").unwrap();
        assert!(h.append("r", kept("r", id5)).is_err());
        room(&mut h, "r").faults.write = false;
        room(&mut h, "r").faults.sync = true;
        room(&mut h, "r").faults.cut = true;
        assert!(h.commit().is_err());
        assert_eq!(
            room(&mut h, "r").cut_to,
            Some(PendingCut { first_id: 1, len })
        );
        // Refused record 4 is still in the file but not served.
        h.release("r");
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 3]);

        // The cut still fails: the append fails, nothing rolls.
        room(&mut h, "r").faults.sync = false;
        let id6 = h.reserve_id("r").unwrap();
        assert!(h.append("r", kept("r", id6)).is_err());
        assert_eq!(
            segment_files(&tmp.0, "r").len(),
            1,
            "no roll past a pending cut"
        );

        // It works now: cut first, then the new segment.
        room(&mut h, "r").faults.cut = false;
        let id7 = h.reserve_id("r").unwrap();
        h.append("r", kept("r", id7)).unwrap();
        h.commit().unwrap();
        assert_eq!(fs::metadata(&seg1).unwrap().len(), len);
        let files = segment_files(&tmp.0, "r");
        assert_eq!(files.len(), 2);

        // A later failed write reopens the new segment without cutting it.
        room(&mut h, "r").faults.write = true;
        let id8 = h.reserve_id("r").unwrap();
        assert!(h.append("r", kept("r", id8)).is_err());
        room(&mut h, "r").faults.write = false;
        let id9 = h.reserve_id("r").unwrap();
        h.append("r", kept("r", id9)).unwrap();
        h.commit().unwrap();
        let text = fs::read(&files[1]).unwrap();
        assert!(!text.contains(&0), "no NUL padding");
        drop(h);
        let mut h = DiskHistory::open_with(&o, 4).unwrap();
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 2, 3, id7, id9]);
        assert_eq!(counter(&h, "store_corrupt_records"), 0);
    }

    /// Bug 3: the entries created at open (the data dir's parents, `rooms/`)
    /// are synced. (A power cut itself cannot be simulated here; this pins
    /// which directories are synced.)
    #[test]
    fn open_syncs_the_entries_it_creates() {
        let tmp = TempDir::new("opensync");
        let data = tmp.0.join("x").join("data");
        let h = open(&opts(&data, Fsync::Never, 10, 100));
        assert_eq!(
            h.opened_syncs,
            vec![tmp.0.clone(), tmp.0.join("x"), data.clone()]
        );
        drop(h);
        // Existing dirs: only the data dir (parent of `rooms/`) again.
        let h = open(&opts(&data, Fsync::Never, 10, 100));
        assert_eq!(h.opened_syncs, vec![data]);
    }

    /// Bug 4: the `ids` file is not held open between reservation blocks.
    #[test]
    fn the_ids_file_is_not_kept_open() {
        let tmp = TempDir::new("idsfd");
        let o = opts(&tmp.0, Fsync::Always, 10, 100_000);
        let mut h = open(&o);
        send(&mut h, "r", 1200);
        h.commit().unwrap();
        let ids_file = room_dir(&tmp.0, "r").join(RESERVATION_FILE);
        assert_eq!(fds_on(&ids_file), 0);
        // The reservation is still made durable ahead of use.
        h.crash();
        let mut h = open(&o);
        assert!(h.reserve_id("r").unwrap() > 1200);
    }

    /// Bug 4: release/reopen cycles and segment rolls do not pile up
    /// duplicate descriptors on the syncer's queue.
    #[test]
    fn syncer_jobs_are_one_per_file() {
        let tmp = TempDir::new("dupfd");
        let a = tmp.0.join("a");
        let mut h = open(&opts(&a, Fsync::Everysec, 10, 100_000));
        send(&mut h, "s", 1);
        let seg = segment_files(&a, "s")[0].clone();
        // Release/reopen cycles on one segment file, well within one tick
        // of the syncer.
        for _ in 0..50 {
            h.release("s");
            send(&mut h, "s", 1);
        }
        // The writer and the syncer's one duplicate (two while the syncer
        // swaps them), not fifty.
        let n = fds_on(&seg);
        assert!(n <= 3, "{n} descriptors on the segment");

        // Fifty new segments: one queued directory sync, not fifty.
        let b = tmp.0.join("b");
        let mut h = DiskHistory::open_with(&opts(&b, Fsync::Everysec, 10, 100_000), 1).unwrap();
        send(&mut h, "t", 50);
        let n = fds_on(&room_dir(&b, "t"));
        assert!(n <= 2, "{n} descriptors on the room directory");
    }

    /// Bug 5: `release` drops the segments' sparse indexes too.
    #[test]
    fn release_drops_segment_indexes() {
        let tmp = TempDir::new("relidx");
        let o = opts(&tmp.0, Fsync::Never, 5, 1000);
        let mut h = DiskHistory::open_with(&o, 16).unwrap();
        send(&mut h, "r", 100);
        assert_eq!(ids(&h.before("r", Some(10), 3).unwrap()), vec![7, 8, 9]);
        assert!(room(&mut h, "r").segments.iter().any(Segment::has_index));
        h.release("r");
        let r = room(&mut h, "r");
        assert!(r.tail.is_none());
        assert!(!r.segments.iter().any(Segment::has_index));
        assert_eq!(ids(&h.before("r", Some(10), 3).unwrap()), vec![7, 8, 9]);
    }

    /// Bug 6: a line longer than the record bound is skipped and counted,
    /// in the middle of a segment and as its last line.
    #[test]
    fn an_overlong_line_is_skipped_as_corrupt() {
        let tmp = TempDir::new("overlong");
        let o = opts(&tmp.0, Fsync::Never, 100, 1000);
        let mut h = open(&o);
        send(&mut h, "r", 1);
        send(&mut h, "s", 1);
        drop(h);
        let huge = |id: u64| {
            let pad = "x".repeat(segment::MAX_RECORD_BYTES + 10);
            format!(r#"{{"type":"message","content":"{pad}","id":{id}}}"#) + "\n"
        };
        let r_seg = segment_files(&tmp.0, "r")[0].clone();
        let mut f = File::options().append(true).open(&r_seg).unwrap();
        f.write_all(huge(2).as_bytes()).unwrap();
        f.write_all((kept("r", 3).json.get().to_string() + "\n").as_bytes())
            .unwrap();
        drop(f);
        let s_seg = segment_files(&tmp.0, "s")[0].clone();
        let mut f = File::options().append(true).open(&s_seg).unwrap();
        f.write_all(huge(2).as_bytes()).unwrap();
        drop(f);

        let mut h = open(&o);
        // Recovery read "s" backwards and skipped the huge last line.
        assert_eq!(counter(&h, "store_corrupt_records"), 1);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![1, 3]);
        assert_eq!(ids(&h.after("r", 0, 10).unwrap()), vec![1, 3]);
        assert_eq!(ids(&h.last("s", 10).unwrap()), vec![1]);
        assert_eq!(counter(&h, "store_corrupt_records"), 3);
    }

    /// Bug 7: retention also drops in-memory messages of deleted segments
    /// (possible when crashes left gaps in the ids).
    #[test]
    fn retention_drops_deleted_messages_from_memory() {
        let tmp = TempDir::new("retaintail");
        // retain 50 → 16 ids per segment; keep 50 in memory.
        let o = opts(&tmp.0, Fsync::Never, 50, 50);
        let mut h = open(&o);
        send(&mut h, "r", 20);
        h.crash();
        let mut h = open(&o);
        let gap = send(&mut h, "r", 5);
        assert!(gap[0] > 20);
        h.crash();
        let mut h = open(&o);
        // Ids 17..=20 (segment 1..16 went when the gap started a segment)
        // and the five after the gap, all in memory.
        assert_eq!(h.last("r", 100).unwrap().len(), 9);
        assert_eq!(h.last("r", 100).unwrap()[0].id, 17);
        let newest = send(&mut h, "r", 1)[0];
        let mut want = gap.clone();
        want.push(newest);
        assert_eq!(ids(&h.last("r", 100).unwrap()), want);
        assert_eq!(ids(&h.after("r", 0, 100).unwrap()), want);
        drop(h);
        let mut h = open(&o);
        assert_eq!(ids(&h.last("r", 100).unwrap()), want);
    }

    /// Bug 8: room names are bounded as the protocol bounds them.
    #[test]
    fn room_names_are_at_most_32_bytes() {
        let tmp = TempDir::new("namelen");
        let mut h = open(&opts(&tmp.0, Fsync::Never, 10, 100));
        assert_eq!(h.reserve_id(&"a".repeat(32)).unwrap(), 1);
        match h.reserve_id(&"a".repeat(33)) {
            Err(HistoryError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
}
