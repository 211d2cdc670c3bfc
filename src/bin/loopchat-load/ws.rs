//! The client half of RFC 6455, as the load tool needs it: the upgrade
//! request, checking the server's `101`, masking outgoing frames and decoding
//! the server's unmasked ones (with reassembly of fragmented messages).
//!
//! Pure: bytes in, bytes and messages out; sockets live in `conn.rs`.
//! Read RFC 6455 §4.1–4.2.2 (handshake), §5.2 (framing), §5.3 (masking),
//! §5.4 (fragmentation) and §5.5 (control frames) before editing.

use std::fmt;

/// Largest message accepted from the server. The server's own cap on what it
/// accepts is 64 KiB, but a `joined` carrying a long history can be larger;
/// this only exists so a broken server cannot make the tool grow without end.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Largest HTTP answer head we wait for before giving up on it.
pub const MAX_HEAD_BYTES: usize = 16 << 10;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close code 1000, "normal closure" (§7.4.1).
pub const CLOSE_NORMAL: u16 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsError {
    /// The answer head is not HTTP.
    BadHead(String),
    /// The server answered, but not with `101` (e.g. 409 name taken, 503 full).
    Status(u16),
    /// `Sec-WebSocket-Accept` missing or not derived from our key.
    BadAccept,
    HeadTooLarge,
    /// A framing rule broken by the server (§5.2, §5.5).
    Framing(&'static str),
    TooLarge(u64),
    BadUtf8,
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WsError::BadHead(why) => write!(f, "bad HTTP answer: {why}"),
            WsError::Status(code) => write!(f, "http {code}"),
            WsError::BadAccept => f.write_str("bad Sec-WebSocket-Accept"),
            WsError::HeadTooLarge => f.write_str("HTTP answer head too large"),
            WsError::Framing(why) => write!(f, "framing: {why}"),
            WsError::TooLarge(n) => write!(f, "message of {n} bytes over the tool's cap"),
            WsError::BadUtf8 => f.write_str("invalid UTF-8 in a text message"),
        }
    }
}

/// A fresh `Sec-WebSocket-Key` (16 random bytes, base64).
pub fn new_key() -> String {
    tungstenite::handshake::client::generate_key()
}

/// The HTTP/1.1 upgrade request for `target` (path and query) on `host`.
pub fn upgrade_request(host: &str, target: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\nUser-Agent: loopchat-load\r\n\r\n"
    )
    .into_bytes()
}

/// Checks the server's answer to [`upgrade_request`]. `Ok(None)`: the head is
/// not complete yet; `Ok(Some(n))`: handshake done, the first `n` bytes were
/// the head and whatever follows already belongs to the WebSocket stream
/// (the server may send `welcome` in the same segment as the `101`).
pub fn parse_answer(buf: &[u8], key: &str) -> Result<Option<usize>, WsError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut answer = httparse::Response::new(&mut headers);
    let consumed = match answer.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(WsError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(WsError::BadHead(e.to_string())),
    };
    let code = answer.code.unwrap_or(0);
    if code != 101 {
        return Err(WsError::Status(code));
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let accept = answer
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept != Some(expected.as_bytes()) {
        return Err(WsError::BadAccept);
    }
    Ok(Some(consumed))
}

/// Appends one complete (FIN) client frame. Clients must mask every frame
/// (§5.3) — the server closes with 1002 otherwise — with a key the server
/// cannot predict; the caller supplies it.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// The close frame payload: code then reason (§5.5.1).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// One complete message or control frame from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    /// Binary messages are not part of the chat protocol; only counted.
    Binary(usize),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
}

/// Reassembles messages out of frames; holds the fragments of at most one
/// message, as §5.4 allows only one in flight (control frames may interleave).
#[derive(Default)]
pub struct Decoder {
    fragments: Vec<u8>,
    fragment_op: Option<u8>,
}

impl Decoder {
    /// Decodes the first frame in `buf`. `Ok(None)`: incomplete, read more.
    /// `Ok(Some((n, msg)))`: `n` bytes consumed; `msg` is `None` when the frame
    /// was a non-final fragment.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(usize, Option<Incoming>)>, WsError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return Err(WsError::Framing("reserved bits set"));
        }
        let opcode = b0 & 0x0F;
        if b1 & 0x80 != 0 {
            return Err(WsError::Framing("masked server frame"));
        }
        let (len, mut at) = match b1 & 0x7F {
            126 if buf.len() < 4 => return Ok(None),
            126 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
            127 if buf.len() < 10 => return Ok(None),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (n as u64, 2),
        };
        let is_control = opcode & 0x8 != 0;
        if is_control && (!fin || len > 125) {
            return Err(WsError::Framing("fragmented or long control frame"));
        }
        if len + self.fragments.len() as u64 > MAX_MESSAGE_BYTES as u64 {
            return Err(WsError::TooLarge(len + self.fragments.len() as u64));
        }
        let len = len as usize;
        if buf.len() - at < len {
            return Ok(None);
        }
        let payload = &buf[at..at + len];
        at += len;
        let message = match opcode {
            OP_PING => Some(Incoming::Ping(payload.to_vec())),
            OP_PONG => Some(Incoming::Pong),
            OP_CLOSE => Some(Incoming::Close(match payload.len() {
                0 => None,
                1 => return Err(WsError::Framing("one-byte close payload")),
                _ => Some(u16::from_be_bytes([payload[0], payload[1]])),
            })),
            OP_TEXT | OP_BINARY if self.fragment_op.is_some() => {
                return Err(WsError::Framing("new message inside a fragmented one"))
            }
            OP_TEXT | OP_BINARY if fin => Some(finish(opcode, payload.to_vec())?),
            OP_TEXT | OP_BINARY => {
                self.fragment_op = Some(opcode);
                self.fragments.extend_from_slice(payload);
                None
            }
            OP_CONTINUATION => {
                let Some(op) = self.fragment_op else {
                    return Err(WsError::Framing("continuation without a first fragment"));
                };
                self.fragments.extend_from_slice(payload);
                if fin {
                    self.fragment_op = None;
                    Some(finish(op, std::mem::take(&mut self.fragments))?)
                } else {
                    None
                }
            }
            _ => return Err(WsError::Framing("unknown opcode")),
        };
        Ok(Some((at, message)))
    }
}

fn finish(opcode: u8, payload: Vec<u8>) -> Result<Incoming, WsError> {
    if opcode == OP_BINARY {
        return Ok(Incoming::Binary(payload.len()));
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| WsError::BadUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        if payload.len() < 126 {
            f.push(payload.len() as u8);
        } else {
            f.push(126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn masked_frame_unmasks_to_the_payload() {
        let mut out = Vec::new();
        let payload = vec![b'a'; 300];
        encode_frame(&mut out, OP_TEXT, &payload, [1, 2, 3, 4]);
        assert_eq!(&out[..4], &[0x81, 0x80 | 126, 1, 44]);
        assert_eq!(&out[4..8], &[1, 2, 3, 4]);
        let unmasked: Vec<u8> = out[8..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i & 3])
            .collect();
        assert_eq!(unmasked, payload);
    }

    #[test]
    fn decodes_text_ping_close_and_waits_for_partial_frames() {
        let mut d = Decoder::default();
        let text = server_frame(0x81, b"{\"type\":\"welcome\"}");
        assert_eq!(d.decode(&text[..5]).unwrap(), None);
        let (n, m) = d.decode(&text).unwrap().unwrap();
        assert_eq!(n, text.len());
        assert_eq!(m, Some(Incoming::Text("{\"type\":\"welcome\"}".into())));
        let ping = server_frame(0x89, b"hb");
        assert_eq!(
            d.decode(&ping).unwrap().unwrap().1,
            Some(Incoming::Ping(b"hb".to_vec()))
        );
        let close = server_frame(0x88, &close_payload(1001, "bye"));
        assert_eq!(
            d.decode(&close).unwrap().unwrap().1,
            Some(Incoming::Close(Some(1001)))
        );
    }

    #[test]
    fn reassembles_fragments_around_a_control_frame() {
        let mut d = Decoder::default();
        assert_eq!(
            d.decode(&server_frame(0x01, b"hel")).unwrap().unwrap().1,
            None
        );
        assert_eq!(
            d.decode(&server_frame(0x89, b"")).unwrap().unwrap().1,
            Some(Incoming::Ping(vec![]))
        );
        let last = d.decode(&server_frame(0x80, b"lo")).unwrap().unwrap().1;
        assert_eq!(last, Some(Incoming::Text("hello".into())));
    }

    #[test]
    fn rejects_what_a_server_must_not_send() {
        let mut d = Decoder::default();
        assert!(matches!(
            d.decode(&[0x81, 0x81, 0, 0, 0, 0, b'x']),
            Err(WsError::Framing(_))
        ));
        assert!(matches!(d.decode(&[0xC1, 0x00]), Err(WsError::Framing(_))));
        assert!(matches!(
            d.decode(&server_frame(0x81, &[0xff, 0xfe])),
            Err(WsError::BadUtf8)
        ));
        assert!(matches!(
            d.decode(&server_frame(0x80, b"x")),
            Err(WsError::Framing(_))
        ));
    }

    #[test]
    fn answer_must_be_101_with_the_derived_accept() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let good =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(parse_answer(&good[..20], key), Ok(None));
        assert_eq!(parse_answer(good, key), Ok(Some(good.len() - 2)));
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\nfull";
        assert_eq!(parse_answer(busy, key), Err(WsError::Status(503)));
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(parse_answer(wrong, key), Err(WsError::BadAccept));
    }
}
