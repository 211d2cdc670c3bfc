//! The data dir of the earlier JSON-lines store, read once to migrate it
//! into SQLite (`super::sqlite` calls [`read_dir`] at open). Nothing here
//! writes, and nothing else in loopchat reads this format.
//!
//! That store kept, under `<data dir>/rooms/`, one directory per room (its
//! name escaped: `a`–`z`, `0`–`9`, `_`, `-` as they are, every other byte as
//! `%` and two lower-case hex digits, so `Lobby` is `%4cobby`). In it, an
//! `ids` file held a number R, "ids below R may have been handed out", and
//! segments `<first id, 20 digits>.jsonl` held one `message` event's JSON per
//! line. A crash could leave the last line of the newest segment torn.
//!
//! [`parse_segment`] is the record reader: it takes any bytes, never panics,
//! and returns only records that are whole lines of its input with their own
//! id (nothing is guessed or repaired). It is `pub` so that it can be fuzzed.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

/// The directory of the old store inside the data dir.
pub const ROOMS_DIR: &str = "rooms";

/// The old store's per-room id reservation file.
const RESERVATION_FILE: &str = "ids";

/// File name suffix of a segment.
const SEGMENT_SUFFIX: &str = ".jsonl";

/// The old store never wrote a longer line (a 64 KiB message escaped 6× is
/// under 400 KiB) and never read one; a longer line is corrupt.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// One record of a segment: a whole line that is a JSON object with a
/// numeric `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    /// The line without its `\n`: exactly the JSON the room's members got.
    pub json: String,
}

/// What [`parse_segment`] found in one segment's bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Valid records, ids strictly increasing, in file order.
    pub records: Vec<Record>,
    /// Lines that were not records, were too long, or whose id did not
    /// increase (skipped; each counted once).
    pub corrupt: u64,
    /// Bytes of a last line without its `\n` that was not a whole record:
    /// a write torn by a crash, discarded as the old store did at recovery.
    pub torn_bytes: u64,
}

/// Just the field the migration needs; serde skips the rest.
#[derive(Deserialize)]
struct IdOnly {
    id: u64,
}

/// A line (without `\n`) as a record, or `None` when it is not a JSON object
/// with a numeric `id`.
fn parse_record(line: &[u8]) -> Option<Record> {
    if line.len() > MAX_RECORD_BYTES {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?;
    let raw: Box<RawValue> = serde_json::from_str(text).ok()?;
    if !raw.get().starts_with('{') {
        return None;
    }
    let IdOnly { id } = serde_json::from_str(raw.get()).ok()?;
    Some(Record {
        id,
        json: raw.get().to_string(),
    })
}

/// Reads one segment's bytes. Every returned record is a line of `bytes`
/// that parses on its own, with an id above the previous record's. A last
/// line without `\n` is kept only when it is such a whole record (the old
/// store lost those; a prefix of a JSON object is never a JSON object);
/// otherwise its bytes are counted as torn.
pub fn parse_segment(bytes: &[u8]) -> Segment {
    let mut out = Segment::default();
    let mut last: Option<u64> = None;
    let mut rest = bytes;
    while !rest.is_empty() {
        let (line, complete, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], true, &rest[i + 1..]),
            None => (rest, false, &rest[rest.len()..]),
        };
        rest = next;
        let record = parse_record(line).filter(|r| last.map_or(true, |l| r.id > l));
        match (record, complete) {
            (Some(r), _) => {
                last = Some(r.id);
                out.records.push(r);
            }
            (None, true) => out.corrupt += 1,
            (None, false) => out.torn_bytes = line.len() as u64,
        }
    }
    out
}

/// One room of an old data dir, read whole.
#[derive(Debug)]
pub struct Room {
    pub name: String,
    /// Every record of every segment, oldest first, ids strictly increasing.
    pub records: Vec<Record>,
    /// The highest id that may have been handed out: the greater of the
    /// newest record's id and the reservation minus one. The room's ids
    /// continue above it, so no id a client saw is ever given again.
    pub last_id: u64,
    pub corrupt: u64,
    pub torn_bytes: u64,
}

/// Why an old data dir could not be read. Never guessed around: a room
/// migrated wrongly could hand out an id twice.
#[derive(Debug)]
pub struct ReadError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot read old store {}: {}",
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for ReadError {}

fn at(path: &Path) -> impl FnOnce(io::Error) -> ReadError + '_ {
    move |source| ReadError {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `data_dir` holds an old store.
pub fn present(data_dir: &Path) -> bool {
    data_dir.join(ROOMS_DIR).is_dir()
}

/// The room directory names of the old store under `data_dir`, each with
/// its room name, sorted by name. Entries that are not the canonical
/// encoding of a room name are skipped with a warning, as the old store did.
pub fn room_dirs(data_dir: &Path) -> Result<Vec<(String, PathBuf)>, ReadError> {
    let rooms = data_dir.join(ROOMS_DIR);
    let mut out = Vec::new();
    for entry in fs::read_dir(&rooms).map_err(at(&rooms))? {
        let entry = entry.map_err(at(&rooms))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().and_then(decode_name) else {
            if !entry.file_name().to_string_lossy().starts_with('.') {
                log::warn!("{}: not a room directory; not migrated", path.display());
            }
            continue;
        };
        if !entry.file_type().map_err(at(&path))?.is_dir() {
            log::warn!("{}: not a directory; not migrated", path.display());
            continue;
        }
        out.push((name, path));
    }
    out.sort();
    Ok(out)
}

/// Reads one room directory: its segments in id order and its reservation.
pub fn read_room(name: &str, dir: &Path) -> Result<Room, ReadError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(at(dir))? {
        let entry = entry.map_err(at(dir))?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            segments.push((first, entry.path()));
        }
    }
    segments.sort();
    let mut room = Room {
        name: name.to_string(),
        records: Vec::new(),
        last_id: 0,
        corrupt: 0,
        torn_bytes: 0,
    };
    for (_, path) in &segments {
        let bytes = fs::read(path).map_err(at(path))?;
        let seg = parse_segment(&bytes);
        room.corrupt += seg.corrupt;
        room.torn_bytes += seg.torn_bytes;
        if seg.corrupt > 0 || seg.torn_bytes > 0 {
            log::warn!(
                "{}: {} corrupt line(s) and {} torn byte(s) not migrated",
                path.display(),
                seg.corrupt,
                seg.torn_bytes
            );
        }
        for r in seg.records {
            // Ids increase across segments too; a record that does not is
            // not trusted (an edited or misplaced file).
            if room.records.last().is_some_and(|l| r.id <= l.id) {
                room.corrupt += 1;
                continue;
            }
            room.records.push(r);
        }
    }
    let newest = room.records.last().map_or(0, |r| r.id);
    let reserved = read_reservation(&dir.join(RESERVATION_FILE))?;
    room.last_id = match reserved {
        Some(r) => newest.max(r.saturating_sub(1)),
        // The old store continued a block of 1,000 past the newest record
        // when its reservation was unreadable; so does the migration.
        None if !segments.is_empty() => newest.saturating_add(1000),
        None => 0,
    };
    Ok(room)
}

/// The number in a reservation file; `None` when there is none or it is
/// unreadable.
fn read_reservation(path: &Path) -> Result<Option<u64>, ReadError> {
    match fs::read(path) {
        Ok(bytes) => Ok(std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| t.lines().next())
            .and_then(|l| l.trim().parse().ok())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(at(path)(e)),
    }
}

/// The first id of a segment file name, or `None` for any other file.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Bytes that stood for themselves in a room directory name.
fn kept_as_is(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// The room whose old directory name is `dir`; `None` unless `dir` is the
/// one canonical encoding of a name (`%61` is not another spelling of `a`).
fn decode_name(dir: &str) -> Option<String> {
    let bytes = dir.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if kept_as_is(b) {
            out.push(b);
            i += 1;
        } else if b == b'%' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            let v = (hi << 4) | lo;
            if kept_as_is(v) {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            return None;
        }
    }
    if out.is_empty() {
        return None;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(seg: &Segment) -> Vec<u64> {
        seg.records.iter().map(|r| r.id).collect()
    }

    #[test]
    fn whole_lines_with_increasing_ids_are_records() {
        let seg = parse_segment(b"{\"id\":1,\"c\":\"a\"}\n{\"id\":2}\n");
        assert_eq!(ids(&seg), vec![1, 2]);
        assert_eq!(seg.records[0].json, "{\"id\":1,\"c\":\"a\"}");
        assert_eq!((seg.corrupt, seg.torn_bytes), (0, 0));
    }

    #[test]
    fn a_torn_tail_is_discarded_and_a_whole_last_record_kept() {
        let torn = b"{\"id\":2,\"content\":\"to";
        let seg = parse_segment(&[&b"{\"id\":1}\n"[..], torn].concat());
        assert_eq!(ids(&seg), vec![1]);
        assert_eq!(seg.torn_bytes, torn.len() as u64);
        let seg = parse_segment(b"{\"id\":1}\n{\"id\":2}");
        assert_eq!(ids(&seg), vec![1, 2]);
        assert_eq!(seg.torn_bytes, 0);
    }

    #[test]
    fn bad_lines_are_counted_and_never_move_ids() {
        let input =
            b"{\"id\":5}\n{\"id\":\"7\"}\n[1]\n\0\0\n{\"id\":5000000\n{\"id\":3}\n{\"id\":6}\n\n";
        let seg = parse_segment(input);
        // The 5000000 line is not JSON; 3 does not increase; "" is no record.
        assert_eq!(ids(&seg), vec![5, 6]);
        assert_eq!(seg.corrupt, 6);
    }

    #[test]
    fn an_overlong_line_is_corrupt() {
        let mut input = format!("{{\"id\":1,\"p\":\"{}\"}}\n", "x".repeat(MAX_RECORD_BYTES));
        input.push_str("{\"id\":2}\n");
        let seg = parse_segment(input.as_bytes());
        assert_eq!(ids(&seg), vec![2]);
        assert_eq!(seg.corrupt, 1);
    }

    #[test]
    fn only_canonical_room_names_decode() {
        assert_eq!(decode_name("%4cobby").as_deref(), Some("Lobby"));
        assert_eq!(decode_name("%2e%2e").as_deref(), Some(".."));
        assert_eq!(decode_name("lobby").as_deref(), Some("lobby"));
        for bad in ["%61", "%2E", "%2", "a%", "LOCK", "x.tmp", ""] {
            assert_eq!(decode_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn segment_names_are_twenty_digits() {
        assert_eq!(parse_segment_name("00000000000000000042.jsonl"), Some(42));
        assert_eq!(parse_segment_name("42.jsonl"), None);
        assert_eq!(parse_segment_name("ids"), None);
    }
}
