//! Fuzz target `resp`: the RESP2 codec of cluster mode
//! (`cluster::resp::decode_ref`, the borrowing decoder every reply and
//! publication goes through; `decode`, its owned copy; `encode` and
//! `encode_with`), on the bytes a Redis server (or anything listening
//! where one should be) could send.
//!
//! Input: the first byte picks how the rest is cut into reads (one byte at
//! a time, or pieces of pseudo-random sizes); the rest is the reply stream.
//! The same input is also read as a program that builds replies (see
//! [`gen_reply`]) and as the arguments of one command.
//!
//! Invariants:
//! - every decode call gives what [`model::decode`] gives (the owned
//!   decoder as it was before the borrowing one, kept here as the
//!   reference): the same reply, the same bytes used, the same error; and
//!   the borrowing decoder allocates nothing when it succeeds, and every
//!   string it returns lies inside the buffer it was given;
//! - no panic; every decoded reply used at least one byte and no more than
//!   the buffer held; decoded replies respect the bounds (`MAX_BULK`,
//!   `MAX_ARRAY`, `MAX_DEPTH`, `MAX_LINE`) and every error names a bound
//!   actually exceeded;
//! - the stream decoded in one buffer and the same stream arriving in
//!   pieces (the reader's loop: append, decode until it wants more) give
//!   the same replies and end the same way (the same error, or the same
//!   bytes left waiting); only a too long line may report a shorter length
//!   when it is cut before its CR;
//! - no decode call has more on the heap at once than a constant times the
//!   bytes it was given: a length prefix or an array count is never
//!   allocated on the peer's word (measured with [`crate::alloc_meter`]);
//! - replies built from the input, encoded the way Redis does, decode to
//!   themselves whole and in pieces; a command from `encode` decodes to the
//!   array of its arguments as bulks, and every strict prefix of it is
//!   "incomplete".

use loopchat::cluster::resp::{
    self, Args, Reply, ReplyRef, RespError, MAX_ARRAY, MAX_BULK, MAX_DEPTH, MAX_LINE,
};

use crate::alloc_meter;
use crate::input::Input;

/// Heap bytes one decode may hold at once per byte of its buffer: a
/// `Reply` is 32 bytes, an array's vector at most twice its length, and the
/// smallest element (`+\r\n`) takes 3 bytes of input; nested one-element
/// arrays (4 bytes, a 4-element vector each) are the worst case.
const HEAP_PER_BYTE: usize = 64;
const HEAP_SLACK: usize = 4096;

/// Most replies the generator builds from one input.
const MAX_GENERATED: usize = 64;

pub fn run(data: &[u8]) {
    assert!(
        alloc_meter::installed(),
        "the resp target needs alloc_meter::Meter as the global allocator"
    );
    let mut input = Input::new(data);
    let cuts = input.byte();
    let stream = input.rest();
    check_stream(stream, cuts);

    let mut input = Input::new(data);
    let mut encoded = Vec::new();
    let mut want = Vec::new();
    while !input.is_empty() && want.len() < MAX_GENERATED {
        want.push(gen_reply(&mut input, 0, &mut encoded));
    }
    let got = check_stream(&encoded, cuts);
    assert_eq!(
        got,
        (want, End::Waiting(Vec::new())),
        "encoded replies did not decode to themselves"
    );

    check_command(data);
}

/// How decoding a stream stopped.
#[derive(Debug, PartialEq)]
enum End {
    /// Everything decoded but these bytes, the start of a reply.
    Waiting(Vec<u8>),
    /// The decoder refused the stream (normalised, see [`normalise`]).
    Failed(RespError),
}

/// A too long line is reported with the length seen so far when its CR has
/// not arrived yet, so the reported length depends on where reads end.
fn normalise(e: RespError) -> RespError {
    match e {
        RespError::TooLong { what: "line", .. } => RespError::TooLong {
            what: "line",
            len: 0,
        },
        other => other,
    }
}

/// One decode call, with its heap use and its answer checked, and the
/// borrowing decoder's answer checked against it and the model's.
fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    let (borrowed, peak) = alloc_meter::peak_during(|| resp::decode_ref(buf));
    if let Ok(found) = &borrowed {
        assert_eq!(peak, 0, "the borrowing decoder allocated {peak} bytes");
        if let Some((reply, _)) = found {
            check_lent(reply, buf);
        }
    }
    let lent = borrowed.map(|found| found.map(|(reply, used)| (reply.to_reply(), used)));
    let (result, peak) = alloc_meter::peak_during(|| resp::decode(buf));
    assert_eq!(lent, result, "borrowed and owned decoding differ");
    assert_eq!(
        result,
        model::decode(buf),
        "the decoder and its model differ"
    );
    let bound = HEAP_PER_BYTE * buf.len() + HEAP_SLACK;
    assert!(
        peak <= bound,
        "decoding {} bytes held {peak} bytes of heap (bound {bound})",
        buf.len()
    );
    match &result {
        Ok(Some((reply, used))) => {
            assert!(
                (1..=buf.len()).contains(used),
                "used {used} of {}",
                buf.len()
            );
            check_bounds(reply, 0);
        }
        Ok(None) => {}
        Err(e) => check_error(e),
    }
    result
}

/// Every string of `reply` is a slice of `buf`, and every array yields as
/// many elements as it says.
fn check_lent(reply: &ReplyRef, buf: &[u8]) {
    let range = buf.as_ptr_range();
    match reply {
        ReplyRef::Simple(b) | ReplyRef::Error(b) | ReplyRef::Bulk(b) => {
            let inside = range.start <= b.as_ptr() && b.as_ptr_range().end <= range.end;
            assert!(inside, "a string not lent from the buffer");
        }
        ReplyRef::Int(_) | ReplyRef::Nil => {}
        ReplyRef::Array(items) => {
            let len = items.len();
            let mut n = 0;
            for item in *items {
                check_lent(&item, buf);
                n += 1;
            }
            assert_eq!(n, len, "an array yielded {n} of its {len} elements");
        }
    }
}

fn check_bounds(reply: &Reply, depth: usize) {
    match reply {
        Reply::Simple(s) | Reply::Error(s) => {
            assert!(!s.contains('\r'), "a simple line holds a CR: {s:?}");
            // Lossy UTF-8 turns a byte into at most 3.
            assert!(s.len() <= 3 * MAX_LINE, "line of {} bytes", s.len());
        }
        Reply::Bulk(b) => assert!(b.len() <= MAX_BULK, "bulk of {}", b.len()),
        Reply::Int(_) | Reply::Nil => {}
        Reply::Array(items) => {
            assert!(depth < MAX_DEPTH, "arrays nested deeper than {MAX_DEPTH}");
            assert!(items.len() <= MAX_ARRAY, "array of {}", items.len());
            for item in items {
                check_bounds(item, depth + 1);
            }
        }
    }
}

fn check_error(e: &RespError) {
    match e {
        RespError::TooLong { what: "bulk", len } => assert!(*len > MAX_BULK, "{e}"),
        RespError::TooLong { what: "array", len } => assert!(*len > MAX_ARRAY, "{e}"),
        RespError::TooLong { what: "line", len } => assert!(*len > MAX_LINE, "{e}"),
        RespError::TooLong { what, .. } => panic!("unknown bound {what}"),
        RespError::BadType(b) => assert!(!b"+-:$*".contains(b), "{e}"),
        RespError::BadLength(_) | RespError::TooDeep | RespError::BadLine => {}
    }
    // Its text is for a log line.
    assert!(!e.to_string().is_empty());
}

/// Decodes `buf` whole, then as reads cut by `cuts`, and checks both give
/// the same; returns that.
fn check_stream(buf: &[u8], cuts: u8) -> (Vec<Reply>, End) {
    let whole = {
        let mut replies = Vec::new();
        let mut at = 0;
        let end = loop {
            match decode(&buf[at..]) {
                Ok(Some((reply, used))) => {
                    replies.push(reply);
                    at += used;
                }
                Ok(None) => break End::Waiting(buf[at..].to_vec()),
                Err(e) => break End::Failed(normalise(e)),
            }
        };
        (replies, end)
    };
    let pieces = {
        let mut replies = Vec::new();
        let mut pending = Vec::new();
        let mut failed = None;
        let mut sizes = Sizes::new(cuts);
        let mut rest = buf;
        'reads: while !rest.is_empty() {
            let (piece, next) = rest.split_at(sizes.next().min(rest.len()));
            rest = next;
            pending.extend_from_slice(piece);
            loop {
                match decode(&pending) {
                    Ok(Some((reply, used))) => {
                        replies.push(reply);
                        pending.drain(..used);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(normalise(e));
                        break 'reads;
                    }
                }
            }
        }
        let end = match failed {
            Some(e) => End::Failed(e),
            None => End::Waiting(pending),
        };
        (replies, end)
    };
    assert_eq!(whole, pieces, "one read and many reads decode differently");
    whole
}

/// The sizes of successive reads: 1 byte each for 0, else pseudo-random
/// sizes up to a maximum that the byte also picks.
struct Sizes {
    x: u64,
    max: usize,
}

impl Sizes {
    fn new(cuts: u8) -> Sizes {
        Sizes {
            x: u64::from(cuts).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            max: if cuts == 0 {
                1
            } else {
                1 + usize::from(cuts % 64)
            },
        }
    }

    fn next(&mut self) -> usize {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        1 + (self.x % self.max as u64) as usize
    }
}

/// A reply built from the input, appended to `out` as Redis encodes it.
/// Each reply takes at least its kind's byte while input lasts; once it is
/// used up every reply is an empty simple string.
fn gen_reply(input: &mut Input, depth: usize, out: &mut Vec<u8>) -> Reply {
    let kind = input.byte();
    match kind % 6 {
        0 | 1 => {
            let n = usize::from(input.byte() % 24);
            let text = String::from_utf8_lossy(input.take(n)).replace('\r', " ");
            out.push(if kind % 6 == 0 { b'+' } else { b'-' });
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b"\r\n");
            if kind % 6 == 0 {
                Reply::Simple(text)
            } else {
                Reply::Error(text)
            }
        }
        2 => {
            let n = match input.byte() % 4 {
                0 => i64::MIN,
                1 => i64::MAX,
                _ => i64::from(input.u16()) - 32768,
            };
            out.extend_from_slice(format!(":{n}\r\n").as_bytes());
            Reply::Int(n)
        }
        3 => {
            let n = usize::from(input.byte() % 40);
            let bulk = input.take(n).to_vec();
            out.extend_from_slice(format!("${}\r\n", bulk.len()).as_bytes());
            out.extend_from_slice(&bulk);
            out.extend_from_slice(b"\r\n");
            Reply::Bulk(bulk)
        }
        4 => {
            // Redis writes a missing value either way.
            out.extend_from_slice(if kind & 0x80 == 0 {
                b"$-1\r\n"
            } else {
                b"*-1\r\n"
            });
            Reply::Nil
        }
        _ if depth + 1 >= MAX_DEPTH => {
            out.extend_from_slice(b"*0\r\n");
            Reply::Array(Vec::new())
        }
        _ => {
            let n = usize::from(input.byte() % 5);
            out.extend_from_slice(format!("*{n}\r\n").as_bytes());
            let items = (0..n).map(|_| gen_reply(input, depth + 1, out)).collect();
            Reply::Array(items)
        }
    }
}

/// The input as the arguments of one command (split at each 0x00), the
/// first two as its head (for `encode_with`; each later argument split
/// again at 0x01 into the parts of one argument).
fn check_command(data: &[u8]) {
    let args: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let mut out = Vec::new();
    resp::encode(&mut out, &args);
    let head = &args[..args.len().min(2)];
    let mut rest = Args::new();
    for arg in &args[head.len()..] {
        // The pieces between 0x01 bytes and the 0x01s themselves, given
        // as the parts of one argument: that argument again.
        let parts: Vec<&[u8]> = arg.split(|&b| b == 1).collect();
        let mut with_marks: Vec<&[u8]> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                with_marks.push(&[1]);
            }
            with_marks.push(part);
        }
        rest.push_parts(&with_marks);
    }
    assert_eq!(rest.len(), args.len() - head.len());
    let mut with = Vec::new();
    resp::encode_with(&mut with, head, &rest);
    assert_eq!(with, out, "encode_with and encode differ");
    let want = Reply::Array(args.iter().map(|a| Reply::Bulk(a.to_vec())).collect());
    assert_eq!(
        decode(&out),
        Ok(Some((want, out.len()))),
        "a command did not decode to its arguments"
    );
    // Every strict prefix is incomplete; near both ends all of them, in
    // between a sample (all of them would be quadratic).
    let n = out.len();
    for cut in (0..n).filter(|&c| c < 64 || n - c <= 64 || c % 61 == 0) {
        assert_eq!(decode(&out[..cut]), Ok(None), "prefix of {cut} of {n}");
    }
}

/// The owned decoder as it was before the borrowing one (loopchat commit
/// 47e5ed8): a straightforward recursive parser that builds each reply as
/// it goes. Kept unchanged as the reference the borrowing decoder is
/// compared with; it is not used by loopchat.
mod model {
    use loopchat::cluster::resp::{Reply, RespError, MAX_ARRAY, MAX_BULK, MAX_DEPTH, MAX_LINE};

    pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
        let mut at = 0;
        match parse(buf, &mut at, 0)? {
            Some(reply) => Ok(Some((reply, at))),
            None => Ok(None),
        }
    }

    fn line<'a>(buf: &'a [u8], at: &mut usize) -> Result<Option<&'a [u8]>, RespError> {
        let rest = &buf[*at..];
        let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
            if rest.len() > MAX_LINE {
                return Err(RespError::TooLong {
                    what: "line",
                    len: rest.len(),
                });
            }
            return Ok(None);
        };
        if cr > MAX_LINE {
            return Err(RespError::TooLong {
                what: "line",
                len: cr,
            });
        }
        match rest.get(cr + 1) {
            None => Ok(None),
            Some(b'\n') => {
                *at += cr + 2;
                Ok(Some(&rest[..cr]))
            }
            Some(_) => Err(RespError::BadLine),
        }
    }

    fn number(text: &[u8]) -> Result<i64, RespError> {
        std::str::from_utf8(text)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| RespError::BadLength(String::from_utf8_lossy(text).into_owned()))
    }

    fn parse(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Reply>, RespError> {
        let start = *at;
        let Some(&kind) = buf.get(start) else {
            return Ok(None);
        };
        *at += 1;
        let Some(body) = line(buf, at)? else {
            *at = start;
            return Ok(None);
        };
        let text = || String::from_utf8_lossy(body).into_owned();
        let reply = match kind {
            b'+' => Reply::Simple(text()),
            b'-' => Reply::Error(text()),
            b':' => Reply::Int(number(body)?),
            b'$' => {
                let len = number(body)?;
                if len == -1 {
                    return Ok(Some(Reply::Nil));
                }
                let len = usize::try_from(len).map_err(|_| RespError::BadLength(text()))?;
                if len > MAX_BULK {
                    return Err(RespError::TooLong { what: "bulk", len });
                }
                if buf.len() < *at + len + 2 {
                    *at = start;
                    return Ok(None);
                }
                if &buf[*at + len..*at + len + 2] != b"\r\n" {
                    return Err(RespError::BadLine);
                }
                let bulk = buf[*at..*at + len].to_vec();
                *at += len + 2;
                Reply::Bulk(bulk)
            }
            b'*' => {
                let count = number(body)?;
                if count == -1 {
                    return Ok(Some(Reply::Nil));
                }
                let count = usize::try_from(count).map_err(|_| RespError::BadLength(text()))?;
                if count > MAX_ARRAY {
                    return Err(RespError::TooLong {
                        what: "array",
                        len: count,
                    });
                }
                if depth >= MAX_DEPTH {
                    return Err(RespError::TooDeep);
                }
                let mut items = Vec::new();
                for _ in 0..count {
                    match parse(buf, at, depth + 1)? {
                        Some(item) => items.push(item),
                        None => {
                            *at = start;
                            return Ok(None);
                        }
                    }
                }
                Reply::Array(items)
            }
            other => return Err(RespError::BadType(other)),
        };
        Ok(Some(reply))
    }
}
