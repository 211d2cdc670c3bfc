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

/// One decoded reply.
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

/// Append one command (an array of bulk strings) to `out`.
pub fn encode<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        let arg = arg.as_ref();
        out.push(b'$');
        out.extend_from_slice(arg.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Decode one reply from the front of `buf`: `Ok(None)` when the buffer
/// holds only part of one (call again with more), else the reply and the
/// bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
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
            // The bound is checked on the prefix, before waiting for (or
            // reserving room for) a body the peer only announced.
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
            // Not `with_capacity(count)`: the count is the peer's word.
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
