//! The HTTP side of the port: parsing a request head and writing plain
//! answers (everything that is not a WebSocket upgrade).
//!
//! Read RFC 9112 §2–3 (message and request line) and RFC 6455 §4.2.1 (the
//! upgrade request) before editing. Heads are parsed with `httparse` (the
//! parser tungstenite uses too) so that loopchat can answer `/healthz`,
//! `404`, `405`, `431` and the name checks itself, before tungstenite is
//! ever involved: tungstenite only understands valid upgrade requests and
//! writes no answer to anything else. `HEAD` gets the `GET` answer without
//! its body ([`without_body`]); `/name-check` ([`name_check`]) tells the
//! browser page why a name would be refused, which a browser's WebSocket
//! API never shows it.

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
    /// The client asks for a WebSocket (an `Upgrade` header names
    /// `websocket`). Whether the request is a *valid* upgrade is
    /// [`Head::upgrade_problem`]'s question.
    pub upgrade: bool,
    /// The request line says HTTP/1.1 (an upgrade needs at least that).
    pub http11: bool,
    /// The first `Upgrade` header is exactly `websocket`.
    pub upgrade_exact: bool,
    /// The first `Connection` header lists `upgrade`.
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
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
    head.http11 = req.version == Some(1);
    // Where a header may repeat, the first one counts, as in tungstenite's
    // own checks (`HeaderMap::get`), so both sides agree on every request.
    let (mut seen_upgrade, mut seen_connection) = (false, false);
    for h in req.headers.iter() {
        // tungstenite reads these headers with `HeaderValue::to_str`, which
        // takes visible ASCII and tab only and treats anything else as no
        // header at all; read them the same way, or an upgrade this check
        // lets through would be refused by tungstenite with no answer
        // (found by the http_head fuzz target).
        let visible = h
            .value
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
        let value = match visible {
            true => std::str::from_utf8(h.value).unwrap_or("").trim(),
            false => "",
        };
        if h.name.eq_ignore_ascii_case("upgrade") {
            head.upgrade |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
            if !seen_upgrade {
                seen_upgrade = true;
                head.upgrade_exact = value.eq_ignore_ascii_case("websocket");
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            if !seen_connection {
                seen_connection = true;
                head.connection_upgrade = value
                    .split([' ', ','])
                    .any(|t| t.eq_ignore_ascii_case("upgrade"));
            }
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key.get_or_insert_with(|| value.to_string());
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version.get_or_insert_with(|| value.to_string());
        } else if h.name.eq_ignore_ascii_case("origin") {
            head.origin.get_or_insert_with(|| value.to_string());
        }
    }
    Ok(Some(head))
}

/// Why an upgrade request is not one RFC 6455 §4.2.1 (and tungstenite)
/// accepts.
#[derive(Debug, PartialEq, Eq)]
pub enum UpgradeProblem {
    /// 426, with `Sec-WebSocket-Version: 13`.
    Version,
    /// 400, with the reason.
    Bad(&'static str),
}

impl Head {
    /// Check the upgrade the way tungstenite's handshake will, so that
    /// every request it would reject is answered here with a status (once
    /// tungstenite fails, it keeps the socket and no answer can be sent).
    pub fn upgrade_problem(&self) -> Option<UpgradeProblem> {
        if !self.http11 {
            return Some(UpgradeProblem::Bad("a WebSocket upgrade needs HTTP/1.1"));
        }
        if !self.connection_upgrade {
            return Some(UpgradeProblem::Bad("missing \"Connection: Upgrade\""));
        }
        if !self.upgrade_exact {
            return Some(UpgradeProblem::Bad(
                "the Upgrade header must be exactly \"websocket\"",
            ));
        }
        if self.ws_version.as_deref() != Some("13") {
            return Some(UpgradeProblem::Version);
        }
        match &self.ws_key {
            None => Some(UpgradeProblem::Bad("missing Sec-WebSocket-Key")),
            Some(key) if !valid_ws_key(key) => Some(UpgradeProblem::Bad(
                "Sec-WebSocket-Key must be 16 bytes in base64",
            )),
            Some(_) => None,
        }
    }
}

/// A `Sec-WebSocket-Key` is 16 bytes in canonical base64: 22 characters,
/// the last of which carries only 2 bits (so its low 4 bits are zero),
/// then `==`.
fn valid_ws_key(key: &str) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = key.as_bytes();
    b.len() == 24
        && b[..21].iter().all(|c| ALPHABET.contains(c))
        && b"AQgw".contains(&b[21])
        && &b[22..] == b"=="
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

/// The same answer with its body cut off, for `HEAD` (RFC 9110 §9.3.2):
/// status and headers, `Content-Length` included, exactly as for `GET`.
pub fn without_body(mut answer: Vec<u8>) -> Vec<u8> {
    if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
        answer.truncate(end + 4);
    }
    answer
}

/// Why `/name-check` would refuse an upgrade with this query, as the JSON
/// answer `{"ok":true}` or `{"ok":false,"reason":…,"content":…}`. `taken`
/// says whether a name is held by a connection. Tokens are not checked:
/// with `--auth-file` the token, not the name, decides.
pub fn name_check(query: Option<&str>, taken: impl Fn(&str) -> bool) -> Vec<u8> {
    let verdict = |reason: &str, content: String| serde_json::json!({"ok": false, "reason": reason, "content": content});
    let rule = crate::rooms::NAME_RULE;
    let username = query_param(query, "username");
    let room = query_param(query, "room");
    let body = match (username, room) {
        (Some(Err(())), _) | (_, Some(Err(()))) => verdict(
            "bad_encoding",
            "the query is not valid percent-encoded UTF-8".into(),
        ),
        (_, Some(Ok(room))) if !crate::rooms::valid_name(&room) => {
            verdict("bad_room", format!("room must be {rule}"))
        }
        // No name (or an empty one): the server picks a free guest-<n>.
        (None, _) => serde_json::json!({"ok": true}),
        (Some(Ok(name)), _) if name.is_empty() => serde_json::json!({"ok": true}),
        (Some(Ok(name)), _) if !crate::rooms::valid_name(&name) => {
            verdict("invalid", format!("username must be {rule}"))
        }
        (Some(Ok(name)), _) if taken(&name) => {
            verdict("taken", format!("{name} is already connected"))
        }
        (Some(Ok(_)), _) => serde_json::json!({"ok": true}),
    };
    answer(200, "application/json", body.to_string().as_bytes(), &[])
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
        assert!(h.upgrade && h.ws_key.is_some());
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

    fn head(raw: &str) -> Head {
        parse_head(raw.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn upgrade_checks_match_tungstenite() {
        let good = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert_eq!(head(good).upgrade_problem(), None);
        let cases = [
            (good.replace("HTTP/1.1", "HTTP/1.0"), "HTTP/1.1"),
            (
                good.replace("Upgrade: websocket", "Upgrade: websocket, h2c"),
                "exactly",
            ),
            (
                good.replace("Connection: Upgrade", "Connection: keep-alive"),
                "Connection",
            ),
            (good.replace("dGhlIHNhbXBsZSBub25jZQ==", "abc"), "16 bytes"),
            (
                good.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZR=="),
                "16 bytes",
            ),
            (
                good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                "missing",
            ),
        ];
        for (raw, why) in cases {
            match head(&raw).upgrade_problem() {
                Some(UpgradeProblem::Bad(text)) => assert!(text.contains(why), "{text}"),
                other => panic!("{raw:?}: {other:?}"),
            }
        }
        let v12 = good.replace("Version: 13", "Version: 12");
        assert_eq!(head(&v12).upgrade_problem(), Some(UpgradeProblem::Version));
        // "Connection: keep-alive, Upgrade" and lower case are fine.
        let mixed = good.replace("Connection: Upgrade", "Connection: keep-alive, upgrade");
        assert_eq!(head(&mixed).upgrade_problem(), None);
    }

    /// Found by the http_head fuzz target
    /// (`fuzz/regressions/http_head/connection_header_not_visible_ascii`):
    /// a `Connection` value with a non-ASCII byte passed loopchat's check,
    /// tungstenite then refused the handshake, and the client got no
    /// answer. Now such a value counts as no header, so the client gets a
    /// 400 that names it.
    #[test]
    fn fuzz_http_head_connection_header_not_visible_ascii() {
        let raw = "GET / HTTP/1.1\nUpgrade:websocket\nConnection:\u{13c} Upgrade\nSec-WebSocket-Key:dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version:13\n\n";
        match head(raw).upgrade_problem() {
            Some(UpgradeProblem::Bad(text)) => assert!(text.contains("Connection"), "{text}"),
            other => panic!("{other:?}"),
        }
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

    fn check(query: &str) -> serde_json::Value {
        let a = name_check(Some(query), |n| n == "alice");
        let a = String::from_utf8(a).unwrap();
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        let body = a.split("\r\n\r\n").nth(1).unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn name_check_says_why() {
        assert_eq!(check("username=bob"), serde_json::json!({"ok": true}));
        assert_eq!(check("username="), serde_json::json!({"ok": true}));
        assert_eq!(check(""), serde_json::json!({"ok": true}));
        assert_eq!(check("username=alice")["reason"], "taken");
        assert_eq!(check("username=al%20ice")["reason"], "invalid");
        assert_eq!(check("username=bob&room=a/b")["reason"], "bad_room");
        assert_eq!(check("username=%ff")["reason"], "bad_encoding");
        assert!(check("username=alice")["content"]
            .as_str()
            .unwrap()
            .contains("already connected"));
    }

    #[test]
    fn head_answers_keep_the_headers() {
        let get = text(404, "no such path");
        let head = without_body(get.clone());
        assert!(get.starts_with(&head));
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.ends_with(
                "Content-Length: 13\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
            ),
            "{head}"
        );
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
