//! The few chat-protocol shapes the load tool speaks (docs/protocol.md: commands and events):
//! reading the `type` and a handful of fields of a server event, and writing
//! the `message` command. Everything else in an event is skipped unread.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::crew::Limits;

#[derive(Deserialize)]
pub struct Event<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub user: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub room: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default)]
    pub limits: Option<WireLimits>,
}

#[derive(Deserialize)]
pub struct WireLimits {
    #[serde(default)]
    pub rate_per_s: Option<f64>,
    #[serde(default)]
    pub rate_burst: Option<f64>,
}

impl WireLimits {
    pub fn limits(&self) -> Option<Limits> {
        Some(Limits {
            rate_per_s: self.rate_per_s?,
            rate_burst: self.rate_burst?,
        })
    }
}

/// `None` when the frame is not a JSON object with a string `type`.
pub fn parse(text: &str) -> Option<Event<'_>> {
    serde_json::from_str(text).ok()
}

/// The `message` command. `room` and `content` come from this tool and are
/// restricted to characters that need no JSON escaping (checked in args.rs
/// and by construction of the contents).
pub fn message_command(room: &str, content: &str) -> String {
    format!(r#"{{"type":"message","content":"{content}","room":"{room}"}}"#)
}

/// The username/room rule of docs/protocol.md: 1–32 of `[A-Za-z0-9_.-]`.
pub fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Counts per reason ("http 409": 3, "timeout joined": 1, …).
pub type Tally = BTreeMap<String, u64>;

pub fn bump(tally: &mut Tally, reason: String) {
    *tally.entry(reason).or_default() += 1;
}

pub fn merge(into: &mut Tally, from: Tally) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_it_needs_and_skips_the_rest() {
        let e = parse(r#"{"type":"welcome","content":"welcome, a","user":"a","room":"r","limits":{"rate_per_s":20,"rate_burst":40,"history_limit":100}}"#).unwrap();
        assert_eq!(e.kind, "welcome");
        let l = e.limits.unwrap().limits().unwrap();
        assert_eq!((l.rate_per_s, l.rate_burst), (20.0, 40.0));
        let e = parse(r#"{"type":"joined","room":"r","users":["a"],"history":[{"type":"message","content":"x"}],"content":""}"#).unwrap();
        assert_eq!((e.kind.as_ref(), e.room.as_deref()), ("joined", Some("r")));
        assert!(parse("not json").is_none());
        assert!(parse(r#"{"content":"no type"}"#).is_none());
    }

    #[test]
    fn the_message_command_is_valid_json() {
        let v: serde_json::Value =
            serde_json::from_str(&message_command("r-1", "s1:2:3:xx")).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["content"], "s1:2:3:xx");
        assert!(
            valid_name("ld-ab12-3")
                && !valid_name("")
                && !valid_name("a b")
                && !valid_name(&"x".repeat(33))
        );
    }
}
