//! Fuzz target `command`: the command decoder (`protocol::decode`) and the
//! checks the dispatcher applies to what it decoded (names, refs, content
//! size).
//!
//! Input: one text frame (invalid UTF-8 is replaced, as a text frame that
//! reaches the decoder is always UTF-8).
//!
//! Invariants: no panic; every rejection carries an error code documented
//! in the protocol (§5) and a bounded explanation; an accepted command is
//! exactly what a generic JSON parser reads from the same text; text that
//! is not JSON by the grammar is always `bad_json`; handled by a dispatcher, the frame
//! produces only well-formed events (`type` and `content` strings), errors
//! with documented codes, and messages within the content limit in rooms
//! whose names follow the rule.

use loopchat::dispatch::{Clock, Dispatcher, Effects, SessionRequest, Settings};
use loopchat::protocol::{self, Command, Limits, MAX_REF_CHARS};
use loopchat::rooms;
use loopchat::store::memory::MemoryHistory;
use serde_json::Value;

/// Error codes listed in the protocol's §5.
pub const DOCUMENTED_CODES: [&str; 13] = [
    "bad_json",
    "unknown_type",
    "missing_field",
    "bad_room",
    "not_member",
    "too_long",
    "unknown_user",
    "too_many_rooms",
    "rate_limited",
    "binary_unsupported",
    "history_unavailable",
    "empty",
    "unavailable",
];

/// Longest explanation a rejection may carry: the decoder quotes at most
/// 160 characters of serde's message or 32 of an unknown type.
const MAX_REASON_CHARS: usize = 400;

const MAX_CONTENT_BYTES: usize = 64;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_decode(&text);
    check_dispatch(&text);
}

fn check_decode(text: &str) {
    let generic: Option<Value> = serde_json::from_str(text).ok();
    // JSON by the grammar: what serde_json accepts when it only skips the
    // values. It differs from `generic` for a string with a lone surrogate
    // escape (`"\ud834"`): grammatical JSON (RFC 8259 §8.2) that no Rust
    // string can hold, so `Value` refuses the whole text, while the decoder
    // skips it in a field no command reads.
    let grammatical = serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
    match protocol::decode(text) {
        Ok((command, reference)) => {
            if let Some(r) = &reference {
                assert!(r.chars().count() <= MAX_REF_CHARS, "ref over the limit");
            }
            let obj = match generic {
                Some(Value::Object(obj)) => obj,
                // Every field a command reads is a Rust string or number,
                // which a lone surrogate cannot become: such a text decodes
                // only with the surrogate in an ignored field.
                None if grammatical && text.trim_start().starts_with('{') => return,
                _ => panic!("decoded {command:?} from text that is not a JSON object"),
            };
            let field = |name: &str| obj.get(name).and_then(Value::as_str);
            let number = |name: &str| obj.get(name).and_then(Value::as_u64);
            assert_eq!(reference.as_deref(), field("ref"));
            let (kind, same) = match &command {
                Command::Message { content, room } => (
                    "message",
                    Some(&**content) == field("content") && room.as_deref() == field("room"),
                ),
                Command::Join { room, since } => (
                    "join",
                    Some(&**room) == field("room") && *since == number("since"),
                ),
                Command::Leave { room } => ("leave", Some(&**room) == field("room")),
                Command::Direct { to, content } => (
                    "direct",
                    Some(&**to) == field("to") && Some(&**content) == field("content"),
                ),
                Command::Rooms => ("rooms", true),
                Command::Who { room } => ("who", Some(&**room) == field("room")),
                Command::History {
                    room,
                    before,
                    limit,
                } => (
                    "history",
                    Some(&**room) == field("room")
                        && *before == number("before")
                        && *limit == number("limit"),
                ),
            };
            assert_eq!(field("type"), Some(kind), "decoded the wrong type");
            assert!(same, "decoded fields differ from the JSON: {command:?}");
        }
        Err(rejected) => {
            let code = rejected.code.as_str();
            assert!(DOCUMENTED_CODES.contains(&code), "undocumented code {code}");
            assert!(!rejected.reason.is_empty());
            assert!(
                rejected.reason.chars().count() <= MAX_REASON_CHARS,
                "unbounded explanation ({} chars)",
                rejected.reason.chars().count()
            );
            if let Some(r) = &rejected.reference {
                assert!(
                    r.chars().count() <= MAX_REF_CHARS,
                    "echoed ref over the limit"
                );
            }
            if !grammatical {
                assert_eq!(code, "bad_json", "text that is not JSON got {code}");
            }
        }
    }
}

/// One member, in its home room and one more, sends the frame.
fn check_dispatch(text: &str) {
    let settings = Settings {
        limits: Limits {
            max_message_bytes: 65536,
            max_content_bytes: MAX_CONTENT_BYTES,
            max_rooms_per_user: 3,
            rate_per_s: 20,
            rate_burst: 40,
            history_limit: 50,
        },
        resume_max: 100,
        refuse_unkept: false,
        reply_bytes: 128 * 1024,
    };
    let now = Clock {
        mono_ms: 0,
        unix_ms: 1_700_000_000_000,
    };
    let mut d = Dispatcher::new(settings, Box::new(MemoryHistory::new(16)));
    let mut out = Effects::default();
    for (key, name) in [(0, "alice"), (1, "bob")] {
        let req = SessionRequest {
            username: Some(name.to_string()),
            room: Some("r".to_string()),
        };
        assert!(d.admit(key, &req, now).is_ok());
        d.open(key, None, &mut out);
    }
    d.handle_text(0, r#"{"type":"join","room":"s"}"#, now, &mut out);
    out.sends.clear();
    d.handle_text(0, text, now, &mut out);
    d.commit(&mut out);
    assert!(out.closes.is_empty(), "one frame closed the connection");
    for (to, frame) in &out.sends {
        assert!(*to <= 1, "event for a connection that does not exist");
        let event = well_formed(frame);
        match event["type"].as_str() {
            Some("error") => {
                let code = event["code"].as_str().unwrap_or("");
                assert!(DOCUMENTED_CODES.contains(&code), "undocumented code {code}");
            }
            Some("message") => {
                let content = event["content"].as_str().unwrap_or("");
                assert!(content.len() <= MAX_CONTENT_BYTES, "content over the limit");
                let room = event["room"].as_str().unwrap_or("");
                assert!(rooms::valid_name(room), "message in room {room:?}");
            }
            Some("joined") => {
                let room = event["room"].as_str().unwrap_or("");
                assert!(rooms::valid_name(room), "joined room {room:?}");
            }
            _ => {}
        }
        if let Some(r) = event.get("ref").and_then(Value::as_str) {
            assert!(
                r.chars().count() <= MAX_REF_CHARS,
                "echoed ref over the limit"
            );
        }
    }
}

/// A frame as the client reads it: one JSON object with string `type` and
/// `content` (the compatibility rule of the protocol).
pub fn well_formed(frame: &[u8]) -> Value {
    let payload = protocol::frame_payload(frame);
    let event: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => panic!(
            "event is not JSON ({e}): {:?}",
            String::from_utf8_lossy(payload)
        ),
    };
    assert!(event["type"].is_string(), "event without type: {event}");
    assert!(
        event["content"].is_string(),
        "event without content: {event}"
    );
    event
}
