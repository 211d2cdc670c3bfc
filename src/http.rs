//! The HTTP side of the port: parsing a request head and writing plain
//! answers (everything that is not a WebSocket upgrade).
//!
//! Read RFC 9112 §2–3 (message and request line) and RFC 6455 §4.2.1 (the
//! upgrade request) before editing. Heads are parsed with `httparse` (the
//! parser tungstenite uses too) so that loopchat can answer `/healthz`,
//! `404`, `405`, `431` and the name checks itself, before tungstenite is
//! ever involved: tungstenite only understands valid upgrade requests and
//! writes no answer to anything else.

use std::fmt;

/// Most headers a request may carry; more is answered 431.
const MAX_HEADERS: usize = 64;

/// The parts of a request head loopchat routes on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The raw query string (after `?`), if any.
    pub query: Option<String>,
    /// `Upgrade: websocket` and `Connection: upgrade` are both present.
    pub upgrade: bool,
    pub ws_key: bool,
    pub ws_version: Option<String>,
    pub origin: Option<String>,
    /// Length of the head in bytes (bytes after it belong to the
    /// WebSocket stream).
    pub len: usize,
}

/// Why a head could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP (400).
    Malformed(String),
    /// Larger than the limit, or too many headers (431).
    TooLarge,
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::Malformed(why) => write!(f, "malformed request: {why}"),
            HeadError::TooLarge => f.write_str("request head too large"),
        }
    }
}

/// Try to parse a head from the bytes read so far. `Ok(None)`: incomplete,
/// read more (the caller enforces the size limit).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let mut head = Head {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query,
        len,
        ..Head::default()
    };
    let (mut upgrade_ws, mut connection_upgrade) = (false, false);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = !value.is_empty();
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("origin") {
            head.origin = Some(value.to_string());
        }
    }
    head.upgrade = upgrade_ws && connection_upgrade;
    Ok(Some(head))
}

/// The value of `name` in a query string, percent-decoded. `None` when
/// absent; `Some(Err)` when present but not decodable to UTF-8.
pub fn query_param(query: Option<&str>, name: &str) -> Option<Result<String, ()>> {
    let query = query?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k).ok()? == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(())?;
                let hex = std::str::from_utf8(hex).map_err(|_| ())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// The reason phrase for the statuses loopchat sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A complete HTTP/1.1 answer that closes the connection.
pub fn answer(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            reason(status),
            body.len()
        )
        .as_bytes(),
    );
    for (name, value) in extra_headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A short plain-text answer (every error answer is one).
pub fn text(status: u16, body: &str) -> Vec<u8> {
    let mut body = body.to_string();
    body.push('\n');
    answer(status, "text/plain; charset=utf-8", body.as_bytes(), &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_upgrade() {
        let raw = b"GET /ws?username=al%69ce&room=r HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\nOrigin: http://o\r\n\r\nEXTRA";
        let h = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.path, "/ws");
        assert!(h.upgrade && h.ws_key);
        assert_eq!(h.ws_version.as_deref(), Some("13"));
        assert_eq!(h.origin.as_deref(), Some("http://o"));
        assert_eq!(&raw[h.len..], b"EXTRA");
        assert_eq!(
            query_param(h.query.as_deref(), "username"),
            Some(Ok("alice".into()))
        );
        assert_eq!(
            query_param(h.query.as_deref(), "room"),
            Some(Ok("r".into()))
        );
        assert_eq!(query_param(h.query.as_deref(), "since"), None);
    }

    #[test]
    fn partial_and_broken_heads() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
        assert!(matches!(
            parse_head(b"\x16\x03\x01 hello"),
            Err(HeadError::Malformed(_))
        ));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many), Err(HeadError::TooLarge));
    }

    #[test]
    fn plain_get_is_not_an_upgrade() {
        let h = parse_head(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.upgrade);
        assert_eq!(h.method, "GET");
    }

    #[test]
    fn bad_percent_encoding_is_an_error() {
        assert_eq!(query_param(Some("username=%zz"), "username"), Some(Err(())));
        assert_eq!(query_param(Some("username=%ff"), "username"), Some(Err(())));
    }

    #[test]
    fn answers_are_complete() {
        let a = text(404, "no such path");
        let s = String::from_utf8(a).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(s.contains("Content-Length: 13\r\n"));
        assert!(s.ends_with("\r\n\r\nno such path\n"));
    }
}
