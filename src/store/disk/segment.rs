//! One segment file of a room's log: its name, its records, the sparse index
//! that makes paging into it bounded, and the tail check done at recovery.
//!
//! A segment is a file `<first id, 20 digits>.jsonl` holding JSON lines: each
//! record is exactly a `message` event's JSON (which carries `"id"`) followed
//! by `\n`, ids strictly increasing. This module reads segments; it never
//! appends (that is [`super::DiskHistory`]'s job) and only truncates a torn
//! tail at recovery.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::store::Kept;

/// File name suffix of a segment.
const SUFFIX: &str = ".jsonl";

/// Every `INDEX_STRIDE`-th valid record of a segment gets a sparse-index
/// entry. A read then scans at most about `limit + 2 * INDEX_STRIDE`
/// records, whatever the segment's size; 64 keeps the index of a full
/// 10,000-message segment at ~160 entries (2.5 KiB).
pub(crate) const INDEX_STRIDE: usize = 64;

/// Chunk size for reading a segment backwards (finding its last record).
const BACK_CHUNK: u64 = 64 * 1024;

/// The longest line read as a record. Longer lines (a corrupt region
/// without `\n`, a hand edit) are skipped and counted as corrupt, never read
/// into memory whole. Far above anything loopchat writes: a 64 KiB message
/// whose every byte is escaped 6× is under 400 KiB.
pub(crate) const MAX_RECORD_BYTES: usize = 1 << 20;

/// How [`read_line_capped`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LineRead {
    /// Bytes consumed from the reader (the whole line, `\n` included).
    pub consumed: u64,
    /// The line ended with `\n` (false: end of input first).
    pub complete: bool,
    /// Longer than the cap: `line` holds only its first `cap` bytes.
    pub overlong: bool,
}

/// Reads one line (through `\n`) into `line`, storing at most `cap` bytes
/// of it; the rest of an overlong line is consumed without being kept.
pub(crate) fn read_line_capped(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    cap: usize,
) -> io::Result<LineRead> {
    line.clear();
    let mut consumed = 0u64;
    let mut overlong = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(LineRead {
                consumed,
                complete: false,
                overlong,
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if !overlong {
            let room = cap - line.len();
            if take <= room {
                line.extend_from_slice(&buf[..take]);
            } else {
                line.extend_from_slice(&buf[..room]);
                overlong = true;
            }
        }
        reader.consume(take);
        consumed += take as u64;
        if done {
            return Ok(LineRead {
                consumed,
                complete: true,
                overlong,
            });
        }
    }
}

/// The file name of the segment whose first record has id `first_id`. Zero
/// padded so that `ls` sorts segments in log order.
pub(crate) fn file_name(first_id: u64) -> String {
    format!("{first_id:020}{SUFFIX}")
}

/// The first id of a segment file name, or `None` for any other file.
pub(crate) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Just the field recovery and paging need; serde ignores the rest.
#[derive(Deserialize)]
struct IdOnly {
    id: u64,
}

/// A record line (with or without its `\n`) as a [`Kept`], or `None` when it
/// is not a JSON object with a numeric `id`.
pub(crate) fn parse_record(line: &[u8]) -> Option<Kept> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let text = std::str::from_utf8(line).ok()?;
    let raw: Box<RawValue> = serde_json::from_str(text).ok()?;
    let IdOnly { id } = serde_json::from_str(raw.get()).ok()?;
    Some(Kept {
        id,
        json: Rc::from(raw),
    })
}

/// What recovery learned about a room's current (last) segment.
pub(crate) struct TailCheck {
    /// Length of the file after any torn tail was cut off.
    pub len: u64,
    /// Bytes of torn record removed (0 when the file ended cleanly).
    pub torn_bytes: u64,
    /// Id of the last valid record, if the segment has one.
    pub last_id: Option<u64>,
    /// Complete but unreadable lines met while looking for that record.
    pub corrupt: u64,
}

/// Checks the end of the current segment at `path` after a restart: a last
/// line without its `\n` is a record torn by a crash mid-write, so it is cut
/// off (and the cut synced) before anything is appended behind it. Only the
/// end of the file is read.
pub(crate) fn recover_tail(path: &Path) -> io::Result<TailCheck> {
    let file = File::options().read(true).write(true).open(path)?;
    let meta = file.metadata()?;
    let len = meta.len();
    if !meta.is_file() {
        // Not a regular file (an operator's symlink to a device): nothing to
        // read or cut; appends will report whatever it does.
        return Ok(TailCheck {
            len,
            torn_bytes: 0,
            last_id: None,
            corrupt: 0,
        });
    }
    let cut = match rfind_newline(&file, len)? {
        Some(pos) => pos + 1,
        None => 0,
    };
    let torn_bytes = len - cut;
    if torn_bytes > 0 {
        log::warn!(
            "{}: discarding a torn last record ({torn_bytes} bytes after byte {cut}), \
             left by a crash mid-write",
            path.display()
        );
        file.set_len(cut)?;
        file.sync_all()?;
    }
    let (last_id, corrupt) = last_valid_id(&file, cut, path)?;
    Ok(TailCheck {
        len: cut,
        torn_bytes,
        last_id,
        corrupt,
    })
}

/// The id of the last valid record in the first `end` bytes of a segment
/// (which end with `\n`), reading backwards one line at a time; unreadable
/// lines on the way are counted and skipped.
pub(crate) fn last_valid_id(file: &File, end: u64, path: &Path) -> io::Result<(Option<u64>, u64)> {
    let mut end = end;
    let mut corrupt = 0;
    while end > 0 {
        let start = match rfind_newline(file, end - 1)? {
            Some(pos) => pos + 1,
            None => 0,
        };
        // An overlong line is corrupt without reading it.
        if end - start <= MAX_RECORD_BYTES as u64 {
            let mut line = vec![0; usize_len(end - start)?];
            file.read_exact_at(&mut line, start)?;
            if let Some(k) = parse_record(&line) {
                return Ok((Some(k.id), corrupt));
            }
        }
        log::warn!(
            "{}: skipping a corrupt record at byte {start}",
            path.display()
        );
        corrupt += 1;
        end = start;
    }
    Ok((None, corrupt))
}

/// Position of the last `\n` in the first `end` bytes of `file`.
fn rfind_newline(file: &File, end: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0; usize_len(BACK_CHUNK)?];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(BACK_CHUNK);
        let chunk = &mut buf[..usize_len(hi - lo)?];
        file.read_exact_at(chunk, lo)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

fn usize_len(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "record too large"))
}

/// A segment of a room's log, oldest first in [`super::Room::segments`].
pub(crate) struct Segment {
    /// Id of its first record (from the file name): every id in it is at
    /// least this and below the next segment's `first_id`.
    pub first_id: u64,
    pub path: PathBuf,
    /// Built on the first read that needs it, extended as the file grows.
    index: Option<SparseIndex>,
    /// A duplicate of this file's descriptor is queued on the syncer (see
    /// `syncer::Job::queued`). Per segment, not per open writer, so closing
    /// and reopening the writer never queues a second duplicate.
    pub sync_queued: Arc<AtomicBool>,
    /// Bytes past this are not part of the log (records of a failed commit
    /// that could not be cut off yet): reads stop here.
    pub read_cap: Option<u64>,
}

/// `(id, byte offset)` of every [`INDEX_STRIDE`]-th valid record, over the
/// first `scanned` bytes of the segment.
#[derive(Default)]
struct SparseIndex {
    entries: Vec<(u64, u64)>,
    scanned: u64,
    /// Valid records since the last entry.
    since_entry: usize,
}

impl Segment {
    pub(crate) fn new(first_id: u64, path: PathBuf) -> Self {
        Segment {
            first_id,
            path,
            index: None,
            sync_queued: Arc::new(AtomicBool::new(false)),
            read_cap: None,
        }
    }

    /// Forget the index (after the file was cut back at a failed commit, or
    /// when the room is released: it is rebuilt on the next read).
    pub(crate) fn drop_index(&mut self) {
        self.index = None;
    }

    /// Whether the sparse index is in memory.
    #[cfg(test)]
    pub(crate) fn has_index(&self) -> bool {
        self.index.is_some()
    }

    /// Brings the index up to the end of the file (only whole lines) and
    /// returns how many corrupt records the newly scanned part held; those
    /// are logged here, once per process, and skipped by every read.
    fn refresh_index(&mut self) -> io::Result<u64> {
        let index = self.index.get_or_insert_with(SparseIndex::default);
        let mut file = File::open(&self.path)?;
        if !file.metadata()?.is_file() {
            return Ok(0);
        }
        file.seek(SeekFrom::Start(index.scanned))?;
        let end = self.read_cap.unwrap_or(u64::MAX);
        let mut reader = BufReader::new(file.take(end.saturating_sub(index.scanned)));
        let mut line = Vec::new();
        let mut corrupt = 0;
        loop {
            let got = read_line_capped(&mut reader, &mut line, MAX_RECORD_BYTES)?;
            if !got.complete {
                // End of file, or a record still being written: the next
                // refresh picks it up from `scanned`.
                break;
            }
            let n = got.consumed;
            let offset = index.scanned;
            let record = if got.overlong {
                None
            } else {
                parse_record(&line)
            };
            match record {
                Some(k) => {
                    if index.since_entry == 0 {
                        index.entries.push((k.id, offset));
                    }
                    index.since_entry = (index.since_entry + 1) % INDEX_STRIDE;
                }
                None => {
                    log::warn!(
                        "{}: skipping a corrupt record at byte {offset}",
                        self.path.display()
                    );
                    corrupt += 1;
                }
            }
            index.scanned += n;
        }
        Ok(corrupt)
    }

    /// Valid records read forward from byte `from`, up to the indexed end,
    /// handed to `visit` until it returns false.
    fn scan_from(&self, from: u64, mut visit: impl FnMut(Kept) -> bool) -> io::Result<()> {
        let end = self.index.as_ref().map_or(0, |i| i.scanned);
        if from >= end {
            return Ok(());
        }
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(from))?;
        let mut reader = BufReader::new(file.take(end - from));
        let mut line = Vec::new();
        loop {
            let got = read_line_capped(&mut reader, &mut line, MAX_RECORD_BYTES)?;
            if got.consumed == 0 {
                return Ok(());
            }
            // Corrupt lines were counted when indexed; here they are skipped.
            if got.overlong {
                continue;
            }
            if let Some(k) = parse_record(&line) {
                if !visit(k) {
                    return Ok(());
                }
            }
        }
    }

    /// The newest `limit` records with an id below `before`, oldest first.
    /// Reads at most about `limit + 2 * INDEX_STRIDE` records. Returns the
    /// records and the corrupt count found while indexing.
    pub(crate) fn read_before(
        &mut self,
        before: u64,
        limit: usize,
    ) -> io::Result<(Vec<Kept>, u64)> {
        let corrupt = self.refresh_index()?;
        let Some(index) = self.index.as_ref() else {
            return Ok((Vec::new(), corrupt));
        };
        // Entries whose record is below `before`; the stride just before the
        // first one that is not may hold more of them.
        let k = index.entries.partition_point(|&(id, _)| id < before);
        if k == 0 || limit == 0 {
            return Ok((Vec::new(), corrupt));
        }
        let back = limit.div_ceil(INDEX_STRIDE) + 1;
        let from = index.entries[k.saturating_sub(back)].1;
        let mut ring = std::collections::VecDeque::with_capacity(limit.min(4096));
        self.scan_from(from, |m| {
            if m.id >= before {
                return false;
            }
            if ring.len() == limit {
                ring.pop_front();
            }
            ring.push_back(m);
            true
        })?;
        Ok((ring.into(), corrupt))
    }

    /// The oldest `max` records with an id above `since`, oldest first.
    pub(crate) fn read_after(&mut self, since: u64, max: usize) -> io::Result<(Vec<Kept>, u64)> {
        let corrupt = self.refresh_index()?;
        let Some(index) = self.index.as_ref() else {
            return Ok((Vec::new(), corrupt));
        };
        if index.entries.is_empty() || max == 0 {
            return Ok((Vec::new(), corrupt));
        }
        let k = index.entries.partition_point(|&(id, _)| id <= since);
        let from = index.entries[k.saturating_sub(1)].1;
        let mut out = Vec::new();
        self.scan_from(from, |m| {
            if m.id > since {
                out.push(m);
            }
            out.len() < max
        })?;
        Ok((out, corrupt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_sort() {
        assert_eq!(file_name(42), "00000000000000000042.jsonl");
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("42.jsonl"), None);
        assert_eq!(parse_file_name("ids"), None);
        assert!(file_name(9) < file_name(10));
    }

    #[test]
    fn records_need_an_object_with_an_id() {
        let k = parse_record(b"{\"type\":\"message\",\"id\":7,\"content\":\"hi\"}\n");
        assert_eq!(k.map(|k| k.id), Some(7));
        assert!(parse_record(b"{\"id\":\"7\"}").is_none());
        assert!(parse_record(b"{\"id\":7").is_none());
        assert!(parse_record(b"\0\0\0\n").is_none());
        assert!(parse_record(b"").is_none());
    }

    #[test]
    fn an_overlong_line_is_consumed_but_not_kept() {
        let mut input = vec![b'x'; 10_000];
        input.push(b'\n');
        input.extend_from_slice(b"{\"id\":1}\ntail");
        let mut reader = BufReader::with_capacity(64, &input[..]);
        let mut line = Vec::new();
        let got = read_line_capped(&mut reader, &mut line, 100).unwrap();
        assert_eq!(
            got,
            LineRead {
                consumed: 10_001,
                complete: true,
                overlong: true
            }
        );
        assert!(
            line.len() <= 100 && line.capacity() < 1000,
            "{}",
            line.capacity()
        );
        let got = read_line_capped(&mut reader, &mut line, 100).unwrap();
        assert!(got.complete && !got.overlong);
        assert_eq!(parse_record(&line).map(|k| k.id), Some(1));
        let got = read_line_capped(&mut reader, &mut line, 100).unwrap();
        assert_eq!((got.consumed, got.complete), (4, false));
        assert_eq!(line, b"tail");
        let got = read_line_capped(&mut reader, &mut line, 100).unwrap();
        assert_eq!(got.consumed, 0);
    }
}
