//! Fuzz target `legacy`: the record reader of the old JSON-lines data dir
//! (`store::legacy::parse_segment`), which the migration runs on whatever
//! an old data dir holds, torn or edited files included.
//!
//! Input: the bytes of one segment file.
//!
//! Invariants: no panic; the result is exactly what a plain model of the
//! format reads from the same bytes: lines split at `\n`, a record is a
//! line (at most `MAX_RECORD_BYTES`, UTF-8) that is one JSON object with
//! exactly one `id` key holding an unsigned 64-bit integer, whose id is
//! above the previous record's; the record's text is the line without the
//! white space JSON allows around it; every other complete line is counted
//! corrupt once, and an unterminated last line that is not a record counts
//! as torn bytes. So nothing is invented, reordered or repaired, and the
//! output is never larger than the input.

use std::fmt;

use loopchat::store::legacy::{self, Record, Segment, MAX_RECORD_BYTES};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

pub fn run(data: &[u8]) {
    let got = legacy::parse_segment(data);
    let want = model(data);
    assert_eq!(got, want, "parse_segment differs from the model");
    let kept: usize = got.records.iter().map(|r| r.json.len()).sum();
    assert!(
        kept <= data.len(),
        "{kept} bytes of records from {}",
        data.len()
    );
}

/// The format as the module doc of `store::legacy` states it.
fn model(data: &[u8]) -> Segment {
    let mut out = Segment::default();
    let mut last: Option<u64> = None;
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    // `split` yields an empty piece after a final `\n` (or for empty input):
    // that is no line.
    let unterminated = match lines.pop() {
        Some(tail) if !tail.is_empty() => Some(tail),
        _ => None,
    };
    let record = |line: &[u8], last: &mut Option<u64>| {
        let r = model_record(line).filter(|r| last.map_or(true, |l| r.id > l));
        if let Some(r) = &r {
            *last = Some(r.id);
        }
        r
    };
    for line in lines {
        match record(line, &mut last) {
            Some(r) => out.records.push(r),
            None => out.corrupt += 1,
        }
    }
    if let Some(tail) = unterminated {
        match record(tail, &mut last) {
            Some(r) => out.records.push(r),
            None => out.torn_bytes = tail.len() as u64,
        }
    }
    out
}

fn model_record(line: &[u8]) -> Option<Record> {
    if line.len() > MAX_RECORD_BYTES {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?;
    // JSON's white space; `\n` cannot be inside a line.
    let json = text.trim_matches([' ', '\t', '\r']);
    if !json.starts_with('{') {
        return None;
    }
    let id = serde_json::Deserializer::from_str(json)
        .deserialize_map(IdField)
        .ok()??;
    // The object must be the whole line: nothing after it.
    serde_json::from_str::<IgnoredAny>(json).ok()?;
    Some(Record {
        id,
        json: json.to_string(),
    })
}

/// Reads an object's `id`: `Some` when it has exactly one, an unsigned
/// integer; an `id` of any other type fails the object.
struct IdField;

impl<'de> Visitor<'de> for IdField {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
        let mut id = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "id" {
                if id.is_some() {
                    return Err(de::Error::duplicate_field("id"));
                }
                id = Some(map.next_value::<u64>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(id)
    }
}
