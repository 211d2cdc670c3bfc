//! Fuzz target `http_head`: the request-head reader and
//! `loopchat::http::parse_head`, with the bytes arriving in arbitrary
//! pieces.
//!
//! Input: one byte picks the head limit (64 to 8224 bytes), one byte how
//! many cuts, one byte per cut its piece length; the rest is what the
//! client sends. The reader below mirrors `Server::read_head` in
//! `src/server.rs` step by step (reads capped at what is left under the
//! limit, a parse after the first read and then only when a read brought a
//! newline, 431 at the limit), because that loop is private to the server.
//!
//! Invariants: no panic; whatever the split, the verdict is the one a
//! single read of the same bytes gets; a head is never accepted past the
//! limit; a request loopchat would hand to tungstenite as a valid upgrade
//! is one tungstenite accepts (otherwise the client would get no answer).

use std::io::{self, Read, Write};

use loopchat::http::{self, Head, HeadError};

use crate::input::Input;

/// What the reader decided about a connection's first bytes.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// A complete head within the limit.
    Head(Head),
    /// 400.
    Malformed,
    /// 431.
    TooLarge,
    /// The client stopped sending before a verdict (the server keeps
    /// waiting, then the handshake timeout drops it).
    Pending,
}

/// The client's bytes, delivered piece by piece; a read never crosses into
/// the next piece (between pieces the socket would say `WouldBlock` and
/// the server would wait for the next readiness event).
struct Pieces<'a> {
    rest: &'a [u8],
    sizes: Vec<usize>,
    /// Bytes left of the current piece.
    left: usize,
}

impl<'a> Pieces<'a> {
    fn new(data: &'a [u8], sizes: Vec<usize>) -> Self {
        let mut p = Pieces {
            rest: data,
            sizes,
            left: 0,
        };
        p.next_piece();
        p
    }

    fn next_piece(&mut self) {
        self.left = if self.sizes.is_empty() {
            self.rest.len()
        } else {
            self.sizes.remove(0).min(self.rest.len())
        };
    }

    /// One `read`: 0 only at the end of the stream.
    fn read(&mut self, buf: &mut [u8]) -> usize {
        if self.left == 0 {
            self.next_piece();
        }
        let n = self.left.min(buf.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        self.left -= n;
        n
    }
}

/// `Server::read_head`, without the socket: the same loop over reads.
fn read_head(pieces: &mut Pieces<'_>, limit: usize) -> Verdict {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let room = (limit - buf.len()).min(chunk.len());
        // A read into an empty buffer would return 0 and look like EOF:
        // the loop must have reached a verdict before the buffer is full.
        assert!(room > 0, "reader asked for bytes with a full head buffer");
        let n = pieces.read(&mut chunk[..room]);
        if n == 0 {
            return Verdict::Pending;
        }
        buf.extend_from_slice(&chunk[..n]);
        assert!(buf.len() <= limit, "head buffer grew past the limit");
        let first = buf.len() == n;
        if !first && !chunk[..n].contains(&b'\n') && buf.len() < limit {
            continue;
        }
        match http::parse_head(&buf) {
            Ok(Some(head)) => return Verdict::Head(head),
            Ok(None) if buf.len() >= limit => return Verdict::TooLarge,
            Ok(None) => continue,
            Err(HeadError::TooLarge) => return Verdict::TooLarge,
            Err(HeadError::Malformed(_)) => return Verdict::Malformed,
        }
    }
}

/// The verdict for the same bytes read at once (up to the limit).
fn one_read(data: &[u8], limit: usize) -> Verdict {
    let seen = &data[..data.len().min(limit)];
    match http::parse_head(seen) {
        Ok(Some(head)) => Verdict::Head(head),
        Ok(None) if seen.len() >= limit => Verdict::TooLarge,
        Ok(None) => Verdict::Pending,
        Err(HeadError::TooLarge) => Verdict::TooLarge,
        Err(HeadError::Malformed(_)) => Verdict::Malformed,
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let limit = 64 + usize::from(input.byte()) * 32;
    let cuts = usize::from(input.byte() % 16);
    let sizes: Vec<usize> = (0..cuts).map(|_| 1 + usize::from(input.byte())).collect();
    let stream = input.rest();

    let whole = one_read(stream, limit);
    let split = read_head(&mut Pieces::new(stream, sizes), limit);
    match &split {
        // Bytes that are not HTTP but arrived after the first read, in
        // pieces without a newline, are not parsed until a newline comes
        // (that is the point of the newline rule): a client that stops
        // there is left to the handshake timeout.
        Verdict::Pending => assert!(
            matches!(whole, Verdict::Pending | Verdict::Malformed),
            "split reads waited where one read decided {whole:?}"
        ),
        _ => assert_eq!(split, whole, "the split changed the verdict"),
    }
    if let Verdict::Head(head) = &split {
        assert!(head.len <= limit && head.len <= stream.len());
        check_head(head, &stream[..head.len]);
    }
}

/// What the server does next with a complete head must not panic, and a
/// head it would pass to tungstenite as a valid upgrade must be accepted
/// there. "Would pass" mirrors `Server::route` and `check_upgrade`: GET,
/// an upgrade of `/ws` or `/`, no [`Head::upgrade_problem`], a request
/// target that `http::Uri` parses.
fn check_head(head: &Head, raw: &[u8]) {
    for name in ["username", "room", "token", "since"] {
        let _ = http::query_param(head.query.as_deref(), name);
    }
    let target = match &head.query {
        Some(q) => format!("{}?{q}", head.path),
        None => head.path.clone(),
    };
    let handed_over = head.method == "GET"
        && head.upgrade
        && matches!(head.path.as_str(), "/ws" | "/")
        && head.upgrade_problem().is_none()
        && tungstenite::http::Uri::try_from(target.as_str()).is_ok();
    if handed_over {
        let stream = Replay {
            input: raw,
            output: Vec::new(),
        };
        if let Err(e) = tungstenite::accept(stream) {
            panic!("upgrade passed loopchat's checks but tungstenite refused it: {e}");
        }
    }
}

/// A stream that yields `input`, then `WouldBlock`, and keeps what is
/// written (the 101).
struct Replay<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.input.len().min(buf.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
