//! RESP2, the Redis wire format: commands encoded as arrays of bulk
//! strings, replies decoded from a byte buffer that may end anywhere.
//!
//! Hand-written rather than taken from `redis-protocol`: loopchat sends a
//! fixed handful of commands and reads five reply types, and what it needs
//! from a decoder is narrower than a general codec gives: every length
//! prefix and every array count is checked against a bound *before* any
//! byte of the body is awaited or allocated, nesting is capped, and a
//! partial reply costs nothing but a later retry. That is about two
//! hundred lines with no dependency (the crate pulls in `nom`,
//! `cookie-factory` and `bytes-utils` even with its default features off).
//! The tests below split every sample at every byte and feed garbage.
//!
//! There is one parser, [`decode_ref`], and it allocates nothing: a reply
//! borrows its strings from the buffer ([`ReplyRef`]) and an array is the
//! checked bytes of its elements, decoded again as they are iterated. A
//! node decodes every publication of every node, so this is per message
//! work (the owned decoder it replaces was most of a node's `malloc`).
//! [`decode`] copies a reply out ([`Reply`]) for the command link, whose
//! replies are kept past the read that brought them.
//!
//! Encoding is allocation-free too: [`Args`] holds a command's arguments
//! encoded once, so a script call can be sent under either head
//! (`EVALSHA sha`, or `EVAL body` after `NOSCRIPT`) without encoding or
//! copying its messages again.
//!
//! Owns the bytes only; which command a reply answers is `link.rs`'s.

use std::fmt;

/// Largest bulk string accepted in a reply. A history page is an array of
/// small bulks; nothing loopchat reads comes near this.
pub const MAX_BULK: usize = 4 << 20;

/// Most elements in one reply array (a history page holds at most
/// `MAX_HISTORY_PAGE` plus the fill batch; member lists are capped too).
pub const MAX_ARRAY: usize = 64 * 1024;

/// Deepest nesting of arrays (loopchat's replies nest at most twice).
pub const MAX_DEPTH: usize = 4;

/// Longest simple line (`+OK`, `-ERR …`, `:123`) before its CRLF.
pub const MAX_LINE: usize = 64 * 1024;

/// One decoded reply, owning its strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
}

impl Reply {
    /// The reply as text, for bulk and simple strings.
    pub fn text(&self) -> Option<&str> {
        match self {
            Reply::Bulk(b) => std::str::from_utf8(b).ok(),
            Reply::Simple(s) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Reply::Int(n) => Some(*n),
            Reply::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

/// One decoded reply, borrowing from the buffer it was decoded from.
/// Simple and error lines are their raw bytes (without CRLF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyRef<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Int(i64),
    Bulk(&'a [u8]),
    Nil,
    Array(Items<'a>),
}

impl<'a> ReplyRef<'a> {
    /// The reply as text, for bulk and simple strings that are UTF-8.
    pub fn text(&self) -> Option<&'a str> {
        match self {
            ReplyRef::Bulk(b) | ReplyRef::Simple(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// An owned copy (simple and error lines made UTF-8, lossily, as
    /// they are only ever logged or compared with ASCII).
    pub fn to_reply(&self) -> Reply {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match *self {
            ReplyRef::Simple(b) => Reply::Simple(text(b)),
            ReplyRef::Error(b) => Reply::Error(text(b)),
            ReplyRef::Int(n) => Reply::Int(n),
            ReplyRef::Bulk(b) => Reply::Bulk(b.to_vec()),
            ReplyRef::Nil => Reply::Nil,
            // The count is no longer the peer's word here: every element
            // was decoded before the array was returned, so collecting
            // with its exact size reserves only what is there.
            ReplyRef::Array(items) => Reply::Array(items.map(|r| r.to_reply()).collect()),
        }
    }
}

/// The elements of an array reply. The array was checked whole when it
/// was decoded (every bound, every CRLF, every element complete); the
/// elements are decoded again, one by one, as they are iterated, so that
/// an array borrows its bytes and allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Items<'a> {
    bytes: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Items<'a> {
    type Item = ReplyRef<'a>;

    fn next(&mut self) -> Option<ReplyRef<'a>> {
        if self.left == 0 {
            return None;
        }
        let mut at = 0;
        // Cannot fail or come up short (the array was decoded from these
        // very bytes); if it did, the array just ends early. Depth 0: the
        // nesting was checked from the array's own depth.
        let item = parse(self.bytes, &mut at, 0).ok().flatten()?;
        self.bytes = &self.bytes[at..];
        self.left -= 1;
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Items<'_> {}

/// The peer sent something that is not RESP2 within the bounds above:
/// the link must be dropped (there is no way to find the next reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    BadType(u8),
    BadLength(String),
    TooLong { what: &'static str, len: usize },
    TooDeep,
    BadLine,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::BadType(b) => write!(f, "unknown RESP type byte 0x{b:02x}"),
            RespError::BadLength(s) => write!(f, "bad RESP length {s:?}"),
            RespError::TooLong { what, len } => write!(f, "RESP {what} of {len} is over the bound"),
            RespError::TooDeep => write!(f, "RESP arrays nested deeper than {MAX_DEPTH}"),
            RespError::BadLine => write!(f, "RESP line without CRLF"),
        }
    }
}

impl std::error::Error for RespError {}

/// `n` in decimal, written into `buf`: lengths, counts and ids are
/// formatted per argument and per message, so without `to_string`'s
/// allocation.
pub fn decimal(n: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits only: this cannot fail.
    std::str::from_utf8(&buf[at..]).unwrap_or_default()
}

/// `kind`, `n` and CRLF (an array or bulk header).
fn header(out: &mut Vec<u8>, kind: u8, n: usize) {
    let mut digits = [0; 20];
    out.push(kind);
    out.extend_from_slice(decimal(n as u64, &mut digits).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Append one command (an array of bulk strings) to `out`.
pub fn encode<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    header(out, b'*', args.len());
    for arg in args {
        let arg = arg.as_ref();
        header(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// A command's arguments, encoded as bulks once; [`encode_with`] puts a
/// head in front. Kept by the engine for a script call that may have to
/// be sent again with another head.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    bytes: Vec<u8>,
    count: usize,
}

impl Args {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `bytes` of encoded arguments.
    pub fn with_capacity(bytes: usize) -> Self {
        Args {
            bytes: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    pub fn push(&mut self, arg: impl AsRef<[u8]>) {
        self.push_parts(&[arg.as_ref()]);
    }

    /// One argument made of `parts`, one after the other: an argument
    /// assembled from pieces is copied once, here.
    pub fn push_parts(&mut self, parts: &[&[u8]]) {
        let len = parts.iter().map(|p| p.len()).sum();
        header(&mut self.bytes, b'$', len);
        for part in parts {
            self.bytes.extend_from_slice(part);
        }
        self.bytes.extend_from_slice(b"\r\n");
        self.count += 1;
    }

    /// How many arguments.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Append one command to `out`: the bulks of `head`, then `args`.
pub fn encode_with<A: AsRef<[u8]>>(out: &mut Vec<u8>, head: &[A], args: &Args) {
    header(out, b'*', head.len() + args.count);
    for arg in head {
        let arg = arg.as_ref();
        header(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&args.bytes);
}

/// Decode one reply from the front of `buf`, as an owned copy:
/// `Ok(None)` when the buffer holds only part of one (call again with
/// more), else the reply and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    Ok(decode_ref(buf)?.map(|(reply, used)| (reply.to_reply(), used)))
}

/// [`decode`] without the copy: the reply borrows from `buf`. Allocates
/// nothing (but an error's text).
pub fn decode_ref(buf: &[u8]) -> Result<Option<(ReplyRef<'_>, usize)>, RespError> {
    let mut at = 0;
    match parse(buf, &mut at, 0)? {
        Some(reply) => Ok(Some((reply, at))),
        None => Ok(None),
    }
}

/// The line starting at `*at` (without its CRLF); `None` when incomplete.
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

fn bad_length(text: &[u8]) -> RespError {
    RespError::BadLength(String::from_utf8_lossy(text).into_owned())
}

fn number(text: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| bad_length(text))
}

fn parse<'a>(
    buf: &'a [u8],
    at: &mut usize,
    depth: usize,
) -> Result<Option<ReplyRef<'a>>, RespError> {
    let start = *at;
    let Some(&kind) = buf.get(start) else {
        return Ok(None);
    };
    *at += 1;
    let Some(body) = line(buf, at)? else {
        *at = start;
        return Ok(None);
    };
    let reply = match kind {
        b'+' => ReplyRef::Simple(body),
        b'-' => ReplyRef::Error(body),
        b':' => ReplyRef::Int(number(body)?),
        b'$' => {
            let len = number(body)?;
            if len == -1 {
                return Ok(Some(ReplyRef::Nil));
            }
            // The bound is checked on the prefix, before waiting for a
            // body the peer only announced.
            let len = usize::try_from(len).map_err(|_| bad_length(body))?;
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
            let bulk = &buf[*at..*at + len];
            *at += len + 2;
            ReplyRef::Bulk(bulk)
        }
        b'*' => {
            let count = number(body)?;
            if count == -1 {
                return Ok(Some(ReplyRef::Nil));
            }
            let count = usize::try_from(count).map_err(|_| bad_length(body))?;
            if count > MAX_ARRAY {
                return Err(RespError::TooLong {
                    what: "array",
                    len: count,
                });
            }
            if depth >= MAX_DEPTH {
                return Err(RespError::TooDeep);
            }
            // Every element is checked now (so that an array is complete
            // and well-formed once returned) and kept as bytes: nothing
            // is reserved on the peer's count.
            let first = *at;
            for _ in 0..count {
                if parse(buf, at, depth + 1)?.is_none() {
                    *at = start;
                    return Ok(None);
                }
            }
            ReplyRef::Array(Items {
                bytes: &buf[first..*at],
                left: count,
            })
        }
        other => return Err(RespError::BadType(other)),
    };
    Ok(Some(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<(&'static [u8], Reply)> {
        vec![
            (b"+OK\r\n", Reply::Simple("OK".into())),
            (b"-NOSCRIPT no\r\n", Reply::Error("NOSCRIPT no".into())),
            (b":-42\r\n", Reply::Int(-42)),
            (b"$5\r\nhe\r\no\r\n", Reply::Bulk(b"he\r\no".to_vec())),
            (b"$0\r\n\r\n", Reply::Bulk(Vec::new())),
            (b"$-1\r\n", Reply::Nil),
            (b"*-1\r\n", Reply::Nil),
            (
                b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n*2\r\n:1\r\n$1\r\nx\r\n",
                Reply::Array(vec![
                    Reply::Bulk(b"message".to_vec()),
                    Reply::Bulk(b"ch".to_vec()),
                    Reply::Array(vec![Reply::Int(1), Reply::Bulk(b"x".to_vec())]),
                ]),
            ),
        ]
    }

    #[test]
    fn every_split_of_every_sample() {
        for (bytes, want) in samples() {
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), Ok(None), "{bytes:?} cut at {cut}");
            }
            assert_eq!(decode(bytes), Ok(Some((want, bytes.len()))));
        }
    }

    #[test]
    fn a_stream_of_replies_cut_anywhere() {
        let all: Vec<u8> = samples().iter().flat_map(|(b, _)| b.to_vec()).collect();
        let want: Vec<Reply> = samples().into_iter().map(|(_, r)| r).collect();
        // Feed the stream in chunks of every size from 1 to 17 bytes, the
        // way reads from a socket arrive.
        for chunk in 1..18 {
            let mut buf = Vec::new();
            let mut got = Vec::new();
            for piece in all.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some((reply, used)) = decode(&buf).unwrap() {
                    got.push(reply);
                    buf.drain(..used);
                }
            }
            assert_eq!(got, want, "chunk size {chunk}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn length_prefixes_are_bounded_before_the_body() {
        let huge = format!("${}\r\n", MAX_BULK + 1);
        assert!(matches!(
            decode(huge.as_bytes()),
            Err(RespError::TooLong { what: "bulk", .. })
        ));
        let many = format!("*{}\r\n", MAX_ARRAY + 1);
        assert!(matches!(
            decode(many.as_bytes()),
            Err(RespError::TooLong { what: "array", .. })
        ));
        assert!(matches!(decode(b"$-2\r\n"), Err(RespError::BadLength(_))));
        assert!(matches!(decode(b"*x\r\n"), Err(RespError::BadLength(_))));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        assert_eq!(decode(deep.as_bytes()), Err(RespError::TooDeep));
        let endless = vec![b'+'; MAX_LINE + 2];
        assert!(matches!(decode(&endless), Err(RespError::TooLong { .. })));
        assert_eq!(decode(b"$1\r\nab\r\n"), Err(RespError::BadLine));
        assert_eq!(decode(b"?\r\n"), Err(RespError::BadType(b'?')));
    }

    #[test]
    fn garbage_never_panics() {
        // A small xorshift: deterministic, and every byte value shows up.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let alphabet = b"+-:$*\r\n0123456789-abc";
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = if x % 4 == 0 {
                    (x >> 8) as u8
                } else {
                    alphabet[(x >> 8) as usize % alphabet.len()]
                };
                buf.push(b);
            }
            if let Ok(Some((_, used))) = decode(&buf) {
                assert!(used <= buf.len());
            }
        }
    }

    #[test]
    fn the_borrowing_decoder_gives_the_same_replies_and_lends_its_input() {
        for (bytes, want) in samples() {
            for cut in 0..bytes.len() {
                assert_eq!(
                    decode_ref(&bytes[..cut]),
                    Ok(None),
                    "{bytes:?} cut at {cut}"
                );
            }
            let (reply, used) = decode_ref(bytes).unwrap().unwrap();
            assert_eq!((reply.to_reply(), used), (want, bytes.len()));
        }
        let push = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n";
        let Some((ReplyRef::Array(items), _)) = decode_ref(push).unwrap() else {
            panic!("not an array");
        };
        assert_eq!(items.len(), 3);
        let got: Vec<ReplyRef> = items.collect();
        assert_eq!(
            got,
            [
                ReplyRef::Bulk(b"message"),
                ReplyRef::Bulk(b"ch"),
                ReplyRef::Bulk(b"hello")
            ]
        );
        // The payload is the input's own bytes, not a copy.
        let ReplyRef::Bulk(payload) = got[2] else {
            panic!("not a bulk");
        };
        assert!(std::ptr::eq(
            payload.as_ptr(),
            push[push.len() - 7..].as_ptr()
        ));
    }

    #[test]
    fn arguments_encoded_once_go_under_any_head() {
        let mut args = Args::new();
        args.push("k");
        args.push_parts(&[b"node", b" ", b"12", b" ", b"{\"a\":1}"]);
        args.push(b"");
        assert_eq!(args.len(), 3);
        for head in [&["EVALSHA", "abc"][..], &["EVAL", "return 1", "x"][..]] {
            let mut got = Vec::new();
            encode_with(&mut got, head, &args);
            let mut want = Vec::new();
            let all: Vec<&[u8]> = head
                .iter()
                .map(|h| h.as_bytes())
                .chain([&b"k"[..], b"node 12 {\"a\":1}", b""])
                .collect();
            encode(&mut want, &all);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn decimal_at_every_width() {
        let mut buf = [0; 20];
        for n in [0, 7, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string());
        }
    }

    #[test]
    fn commands_round_trip_as_arrays_of_bulks() {
        let mut out = Vec::new();
        encode(&mut out, &["SET", "k", "v\r\n"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n");
        let (reply, used) = decode(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(
            reply,
            Reply::Array(vec![
                Reply::Bulk(b"SET".to_vec()),
                Reply::Bulk(b"k".to_vec()),
                Reply::Bulk(b"v\r\n".to_vec()),
            ])
        );
    }
}
