//! The wire types: client commands in, server events out, error codes.
//!
//! Pure: no sockets, no room tables. A command is decoded once from a text
//! frame; an event is encoded once into a complete WebSocket frame
//! ([`Frame`]) that can be handed, shared and unchanged, to every recipient.
//! `docs/protocol.md` is the reader's version of this file and the
//! contract clients rely on.
//!
//! Read RFC 6455 §5.2 (base framing) before editing [`encode_frame`].

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::rc::Rc;

/// A complete, encoded server-to-client WebSocket frame (header and
/// payload). Cloning it is a reference-count increment, so a broadcast to a
/// thousand members is one buffer shared a thousand times: an event is
/// encoded straight into its frame ([`encode_frame`]); a room message's
/// JSON, which is also its history record, is encoded once and copied once
/// into its frame ([`text_frame`]).
///
/// The count is an `Rc`'s, not atomic like `Bytes`': frames never leave
/// the loop's thread, and a saturated fan-out clones and drops one per
/// delivery (the two atomic operations were 3% of its CPU).
#[derive(Clone)]
pub struct Frame {
    buf: Rc<Vec<u8>>,
    /// Where the frame starts in `buf` (the header is written right before
    /// the payload, so a frame may start a few bytes in).
    start: usize,
}

impl Frame {
    pub fn from_vec(buf: Vec<u8>) -> Frame {
        Frame {
            buf: Rc::new(buf),
            start: 0,
        }
    }

    pub fn copy_from_slice(bytes: &[u8]) -> Frame {
        Frame::from_vec(bytes.to_vec())
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({} bytes)", self.len())
    }
}

/// Longest client-chosen `ref` that is echoed back; longer ones are refused
/// so a client cannot make the server echo arbitrary amounts of data.
pub const MAX_REF_CHARS: usize = 64;

/// Every recoverable mistake a client can make, as sent in `error.code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    MissingField,
    BadRoom,
    NotMember,
    TooLong,
    UnknownUser,
    TooManyRooms,
    RateLimited,
    BinaryUnsupported,
    HistoryUnavailable,
    /// Message or direct content that is empty or only whitespace.
    Empty,
    /// Cluster mode: Redis cannot be reached; nothing was done.
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::NotMember => "not_member",
            ErrorCode::TooLong => "too_long",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BinaryUnsupported => "binary_unsupported",
            ErrorCode::HistoryUnavailable => "history_unavailable",
            ErrorCode::Empty => "empty",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command the client may send, decoded and validated for shape (not yet
/// for meaning: whether the room exists or the sender is a member is the
/// dispatcher's business).
#[derive(Debug, PartialEq)]
pub enum Command<'a> {
    Message {
        content: Cow<'a, str>,
        room: Option<Cow<'a, str>>,
    },
    Join {
        room: Cow<'a, str>,
        since: Option<u64>,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Direct {
        to: Cow<'a, str>,
        content: Cow<'a, str>,
    },
    Rooms,
    Who {
        room: Cow<'a, str>,
    },
    History {
        room: Cow<'a, str>,
        before: Option<u64>,
        limit: Option<u64>,
    },
}

/// A command that could not be decoded: the code, what to tell the client,
/// and the `ref` if one could be read.
#[derive(Debug, PartialEq)]
pub struct Rejected<'a> {
    pub code: ErrorCode,
    pub reason: Cow<'static, str>,
    pub reference: Option<Cow<'a, str>>,
}

/// The flat shape every command shares on the wire.
///
/// Commands are decoded into this struct of optional fields first and then
/// checked, rather than straight into a `#[serde(tag = "type")]` enum,
/// because the protocol distinguishes a missing `type` (`missing_field`), an
/// unknown one (`unknown_type`), a missing field (`missing_field`) and broken
/// JSON (`bad_json`), and serde's tagged-enum errors only say "failed". Both
/// shapes parse the text once; this one keeps the error codes exact.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<Cow<'a, str>>,
    since: Option<u64>,
    before: Option<u64>,
    limit: Option<u64>,
}

const MESSAGE_SHAPE: &str = r#"{"type":"message","content":"…"}"#;

/// Decode one text frame into a command, with the optional `ref`.
pub fn decode(text: &str) -> Result<(Command<'_>, Option<Cow<'_, str>>), Rejected<'_>> {
    let fields: Fields = match serde_json::from_str(text) {
        Ok(wire) => wire,
        Err(e) => return Err(explain_bad_json(text, &e)),
    };
    let reference = fields.reference;
    if let Some(r) = &reference {
        if r.chars().count() > MAX_REF_CHARS {
            return Err(Rejected {
                code: ErrorCode::TooLong,
                reason: format!("ref must be a string of at most {MAX_REF_CHARS} characters")
                    .into(),
                reference: None,
            });
        }
    }
    let Some(kind) = fields.kind else {
        return Err(Rejected {
            code: ErrorCode::MissingField,
            reason: format!("field \"type\" is required, e.g. {MESSAGE_SHAPE}").into(),
            reference,
        });
    };
    let command = match &*kind {
        "message" => match fields.content {
            Some(content) => Command::Message {
                content,
                room: fields.room,
            },
            None => return Err(missing("content", reference)),
        },
        "join" => match fields.room {
            Some(room) => Command::Join {
                room,
                since: fields.since,
            },
            None => return Err(missing("room", reference)),
        },
        "leave" => match fields.room {
            Some(room) => Command::Leave { room },
            None => return Err(missing("room", reference)),
        },
        "direct" => match (fields.to, fields.content) {
            (Some(to), Some(content)) => Command::Direct { to, content },
            (None, _) => return Err(missing("to", reference)),
            (_, None) => return Err(missing("content", reference)),
        },
        "rooms" => Command::Rooms,
        "who" => match fields.room {
            Some(room) => Command::Who { room },
            None => return Err(missing("room", reference)),
        },
        "history" => match fields.room {
            Some(room) => Command::History {
                room,
                before: fields.before,
                limit: fields.limit,
            },
            None => return Err(missing("room", reference)),
        },
        other => {
            return Err(Rejected {
                code: ErrorCode::UnknownType,
                reason: format!(
                    "unknown type {:?}; expected one of message, join, leave, direct, rooms, who, history",
                    truncate(other, 32)
                )
                .into(),
                reference,
            })
        }
    };
    Ok((command, reference))
}

/// The fields a command may carry and the shape each must have, in the
/// words an error shows a chat user.
const FIELD_SHAPES: [(&str, Shape); 8] = [
    ("type", Shape::Text),
    ("content", Shape::Text),
    ("room", Shape::Text),
    ("to", Shape::Text),
    ("ref", Shape::Ref),
    ("since", Shape::Id),
    ("before", Shape::Id),
    ("limit", Shape::Id),
];

#[derive(Clone, Copy)]
enum Shape {
    Text,
    Ref,
    Id,
}

impl Shape {
    fn fits(self, v: &serde_json::Value) -> bool {
        match self {
            Shape::Text => v.is_string(),
            Shape::Ref => v
                .as_str()
                .is_some_and(|r| r.chars().count() <= MAX_REF_CHARS),
            Shape::Id => v.is_u64(),
        }
    }

    fn describe(self) -> String {
        match self {
            Shape::Text => "a string".into(),
            Shape::Ref => format!("a string of at most {MAX_REF_CHARS} characters"),
            Shape::Id => "a whole number (0 or more)".into(),
        }
    }
}

/// Why a frame did not decode, said the way a chat user can act on: which
/// field has the wrong shape (`content must be a string`), or that the
/// frame is not one JSON object. Only runs for frames that failed, so the
/// good path parses once; serde's own wording ("invalid type: integer `1`,
/// expected a string at line 1 column 2") is kept out of the answer.
fn explain_bad_json<'a>(text: &str, e: &serde_json::Error) -> Rejected<'a> {
    let bad_json = |reason: String, reference: Option<Cow<'a, str>>| Rejected {
        code: ErrorCode::BadJson,
        reason: reason.into(),
        reference,
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            let at = match e.classify() {
                serde_json::error::Category::Eof => "it ends too early".to_string(),
                _ => format!("line {} column {}", e.line(), e.column()),
            };
            return bad_json(
                format!("not JSON ({at}); send one JSON object such as {MESSAGE_SHAPE}"),
                None,
            );
        }
    };
    let Some(object) = value.as_object() else {
        let got = match value {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "true or false",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::Object(_) => "an object",
        };
        return bad_json(
            format!("got {got}; send one JSON object such as {MESSAGE_SHAPE}"),
            None,
        );
    };
    // A well-formed `ref` is echoed even when another field is wrong, so the
    // client can tell which of its sends this was.
    let reference = object
        .get("ref")
        .filter(|r| Shape::Ref.fits(r))
        .and_then(|r| r.as_str())
        .map(|r| Cow::Owned(r.to_string()));
    for (field, shape) in FIELD_SHAPES {
        match object.get(field) {
            None | Some(serde_json::Value::Null) => {}
            Some(v) if shape.fits(v) => {}
            Some(_) => {
                let reason = format!("{field} must be {}", shape.describe());
                return bad_json(reason, reference);
            }
        }
    }
    // Valid JSON, every field the right shape, yet serde refused it: a
    // field given twice.
    bad_json(
        format!(
            "could not read the command ({}); send one JSON object such as {MESSAGE_SHAPE}",
            truncate(&e.to_string(), 80)
        ),
        reference,
    )
}

fn missing<'a>(field: &'static str, reference: Option<Cow<'a, str>>) -> Rejected<'a> {
    Rejected {
        code: ErrorCode::MissingField,
        reason: format!("field \"{field}\" is required").into(),
        reference,
    }
}

/// At most `max` characters of a client-supplied string, for error texts.
fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---- events -------------------------------------------------------------

/// `limits` in `welcome`: what this server enforces, so a client can stay
/// within it instead of learning by errors.
#[derive(Serialize, Clone, Debug)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_content_bytes: usize,
    pub max_rooms_per_user: usize,
    pub rate_per_s: u32,
    pub rate_burst: u32,
    pub history_limit: usize,
}

#[derive(Serialize)]
pub struct Welcome<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub user: &'a str,
    pub room: &'a str,
    pub limits: &'a Limits,
}

#[derive(Serialize)]
pub struct Joined<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub room: &'a str,
    pub users: &'a [&'a str],
    pub history: &'a [&'a RawValue],
    /// More messages follow the ones in `history` than fitted in one
    /// answer (with `since`: join again with the last id received).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
}

/// `join` and `leave` notices.
#[derive(Serialize)]
pub struct Presence<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub room: &'a str,
    pub user: &'a str,
}

#[derive(Serialize)]
pub struct Left<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub room: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
}

/// A room message. Without `ref` it is the shared broadcast and the kept
/// record; with `ref` it is the sender's own copy.
#[derive(Serialize)]
pub struct Message<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub room: &'a str,
    pub user: &'a str,
    pub id: u64,
    pub ts: u64,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
}

#[derive(Serialize)]
pub struct Direct<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub ts: u64,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
}

#[derive(Serialize)]
pub struct RoomCount<'a> {
    pub room: &'a str,
    pub users: usize,
}

#[derive(Serialize)]
pub struct Rooms<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub rooms: &'a [RoomCount<'a>],
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
}

#[derive(Serialize)]
pub struct Members<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub room: &'a str,
    pub users: &'a [&'a str],
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
}

#[derive(Serialize)]
pub struct HistoryPage<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub room: &'a str,
    pub messages: &'a [&'a RawValue],
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
}

#[derive(Serialize)]
pub struct ErrorEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub content: &'a str,
    pub code: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<&'a str>,
}

/// Room for the longest frame header (RFC 6455 §5.2: 2 bytes, plus 8 for a
/// 64-bit length; servers never mask).
const MAX_HEADER: usize = 10;

/// Encode an event as a complete text frame.
///
/// The JSON is written after a reserved header gap and the header is filled
/// in afterwards, so the payload is never copied: one buffer per event, then
/// shared by every recipient.
pub fn encode_frame<E: Serialize>(event: &E) -> Frame {
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(&[0; MAX_HEADER]);
    // Writing our own Serialize types into a Vec cannot fail: they hold only
    // strings, numbers and already-valid raw JSON.
    if serde_json::to_writer(&mut buf, event).is_err() {
        buf.truncate(MAX_HEADER);
        buf.extend_from_slice(
            b"{\"type\":\"error\",\"content\":\"internal encoding error\",\"code\":\"bad_json\"}",
        );
    }
    frame_from_payload_buf(buf, 0x1)
}

/// Wrap `payload` (already a JSON text) as a complete text frame.
pub fn text_frame(payload: &str) -> Frame {
    let mut buf = Vec::with_capacity(MAX_HEADER + payload.len());
    buf.extend_from_slice(&[0; MAX_HEADER]);
    buf.extend_from_slice(payload.as_bytes());
    frame_from_payload_buf(buf, 0x1)
}

/// [`text_frame`] for a payload in pieces (a JSON text with something
/// spliced in): the pieces are copied once, in order, into the frame.
pub fn text_frame_of(parts: &[&str]) -> Frame {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut buf = Vec::with_capacity(MAX_HEADER + len);
    buf.extend_from_slice(&[0; MAX_HEADER]);
    for part in parts {
        buf.extend_from_slice(part.as_bytes());
    }
    frame_from_payload_buf(buf, 0x1)
}

thread_local! {
    /// One ping for every heartbeat of the thread's server, shared like a
    /// broadcast.
    static PING: Frame = Frame::copy_from_slice(&[0x89, 0x00]);
}

/// A ping frame with an empty payload (heartbeats).
pub fn ping_frame() -> Frame {
    PING.with(Frame::clone)
}

/// `buf` holds `MAX_HEADER` unused bytes, then the payload. Writes the
/// header right before the payload and returns the frame starting there.
fn frame_from_payload_buf(mut buf: Vec<u8>, opcode: u8) -> Frame {
    let len = buf.len() - MAX_HEADER;
    let first = 0x80 | opcode; // FIN + opcode
    let start = if len < 126 {
        buf[MAX_HEADER - 2] = first;
        buf[MAX_HEADER - 1] = len as u8;
        MAX_HEADER - 2
    } else if len <= u16::MAX as usize {
        buf[MAX_HEADER - 4] = first;
        buf[MAX_HEADER - 3] = 126;
        buf[MAX_HEADER - 2..MAX_HEADER].copy_from_slice(&(len as u16).to_be_bytes());
        MAX_HEADER - 4
    } else {
        buf[0] = first;
        buf[1] = 127;
        buf[2..MAX_HEADER].copy_from_slice(&(len as u64).to_be_bytes());
        0
    };
    // The frame starts where its header does: the payload is not copied.
    Frame {
        buf: Rc::new(buf),
        start,
    }
}

/// The JSON payload of an encoded frame (for tests and the history record).
pub fn frame_payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(header..).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        match decode(text) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(r) => r.code,
        }
    }

    #[test]
    fn decodes_every_command() {
        let (c, r) = decode(r#"{"type":"message","content":"hi","ref":"c1"}"#).unwrap();
        assert_eq!(
            c,
            Command::Message {
                content: "hi".into(),
                room: None
            }
        );
        assert_eq!(r.as_deref(), Some("c1"));
        let (c, _) = decode(r#"{"type":"join","room":"r","since":42}"#).unwrap();
        assert_eq!(
            c,
            Command::Join {
                room: "r".into(),
                since: Some(42)
            }
        );
        assert!(matches!(
            decode(r#"{"type":"leave","room":"r"}"#).unwrap().0,
            Command::Leave { .. }
        ));
        assert!(matches!(
            decode(r#"{"type":"direct","to":"bob","content":"x"}"#)
                .unwrap()
                .0,
            Command::Direct { .. }
        ));
        assert_eq!(decode(r#"{"type":"rooms"}"#).unwrap().0, Command::Rooms);
        assert!(matches!(
            decode(r#"{"type":"who","room":"r"}"#).unwrap().0,
            Command::Who { .. }
        ));
        assert_eq!(
            decode(r#"{"type":"history","room":"r","before":9,"limit":5}"#)
                .unwrap()
                .0,
            Command::History {
                room: "r".into(),
                before: Some(9),
                limit: Some(5)
            }
        );
    }

    #[test]
    fn escaped_strings_decode() {
        let (c, _) = decode(r#"{"type":"message","content":"a\"b\u00e9"}"#).unwrap();
        assert_eq!(
            c,
            Command::Message {
                content: "a\"bé".into(),
                room: None
            }
        );
    }

    #[test]
    fn error_codes_are_exact() {
        assert_eq!(code("hello"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(
            code(r#"{"type":"message","content":5}"#),
            ErrorCode::BadJson
        );
        assert_eq!(code(r#"{"content":"hi"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"message"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::MissingField);
        assert_eq!(
            code(r#"{"type":"direct","to":"x"}"#),
            ErrorCode::MissingField
        );
        let long_ref = format!(r#"{{"type":"rooms","ref":"{}"}}"#, "x".repeat(65));
        assert_eq!(code(&long_ref), ErrorCode::TooLong);
    }

    fn reason(text: &str) -> (ErrorCode, String, Option<String>) {
        let r = decode(text).unwrap_err();
        (
            r.code,
            r.reason.into_owned(),
            r.reference.map(Cow::into_owned),
        )
    }

    #[test]
    fn a_wrong_type_names_the_field_and_the_shape() {
        for (text, want) in [
            (
                r#"{"type":"message","content":5}"#,
                "content must be a string",
            ),
            (r#"{"type":1}"#, "type must be a string"),
            (r#"{"type":"join","room":["r"]}"#, "room must be a string"),
            (
                r#"{"type":"direct","to":7,"content":"x"}"#,
                "to must be a string",
            ),
            (
                r#"{"type":"rooms","ref":5}"#,
                "ref must be a string of at most 64 characters",
            ),
            (
                r#"{"type":"join","room":"r","since":-1}"#,
                "since must be a whole number (0 or more)",
            ),
            (
                r#"{"type":"history","room":"r","limit":"5"}"#,
                "limit must be a whole number (0 or more)",
            ),
        ] {
            let (code, text_out, _) = reason(text);
            assert_eq!(code, ErrorCode::BadJson, "{text}");
            assert_eq!(text_out, want, "{text}");
        }
        // A good ref beside a bad field is echoed.
        let (_, _, r) = reason(r#"{"type":"message","content":false,"ref":"c7"}"#);
        assert_eq!(r.as_deref(), Some("c7"));
        let long_ref = format!(r#"{{"type":"rooms","ref":"{}"}}"#, "x".repeat(65));
        let (code, text_out, _) = reason(&long_ref);
        assert_eq!(code, ErrorCode::TooLong);
        assert_eq!(text_out, "ref must be a string of at most 64 characters");
    }

    #[test]
    fn serde_wording_stays_out_of_answers() {
        for text in [
            "1",
            "[1,2]",
            "\"hi\"",
            "{\"type\":",
            "just text",
            r#"{"type":"message","content":5}"#,
        ] {
            let (code, why, _) = reason(text);
            assert_eq!(code, ErrorCode::BadJson);
            assert!(!why.contains("invalid type"), "{text}: {why}");
            assert!(!why.contains("expected struct"), "{text}: {why}");
        }
        assert!(reason("[1,2]")
            .1
            .starts_with("got an array; send one JSON object"));
        assert!(reason("1").1.starts_with("got a number;"));
        assert!(reason("{\"type\":")
            .1
            .starts_with("not JSON (it ends too early)"));
    }

    #[test]
    fn bad_json_shows_the_expected_shape() {
        let r = decode("just text").unwrap_err();
        assert!(r.reason.contains(r#"{"type":"message","content":"…"}"#));
    }

    #[test]
    fn errors_keep_the_ref() {
        let r = decode(r#"{"type":"nope","ref":"c9"}"#).unwrap_err();
        assert_eq!(r.reference.as_deref(), Some("c9"));
    }

    #[test]
    fn frames_have_the_right_header() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = "x".repeat(len);
            let frame = text_frame(&payload);
            assert_eq!(frame[0], 0x81);
            assert_eq!(frame_payload(&frame), payload.as_bytes());
            let header = frame.len() - len;
            assert_eq!(
                header,
                match len {
                    0..=125 => 2,
                    126..=65535 => 4,
                    _ => 10,
                }
            );
        }
    }

    #[test]
    fn events_encode_type_and_content() {
        let frame = encode_frame(&Left {
            kind: "left",
            content: "left r",
            room: "r",
            reference: None,
        });
        let v: serde_json::Value = serde_json::from_slice(frame_payload(&frame)).unwrap();
        assert_eq!(v["type"], "left");
        assert_eq!(v["content"], "left r");
        assert_eq!(v["room"], "r");
    }
}
