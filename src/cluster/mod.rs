//! Cluster mode: several loopchat nodes serving the same rooms through one
//! Redis (`--redis`). What it promises is in `docs/protocol.md` (cluster
//! mode); how it is built and run, in `docs/cluster.md`.
//!
//! The dispatcher does not learn Redis. It hands [`Request`]s, each with a
//! [`Ticket`], to the engine through its `Effects`, and gets back
//! [`Completion`]s (the answer to one request) and [`Publication`]s
//! (events from any node, its own included, in per-room id order with no
//! gap and no duplicate) to fan out to its local members. Without
//! `--redis` no request is ever made: the local history answers inline,
//! in the same pass, exactly as before cluster mode existed.
//!
//! Modules, in reading order:
//! - [`engine`]: the Redis engine: requests to commands and scripts,
//!   replies to completions, the subscription to publications, presence.
//! - [`gap`]: per-room id tracking; finds gaps and duplicates (pure).
//! - [`link`]: one Redis connection as a state machine on the poll.
//! - [`resp`]: the RESP2 codec (pure, bounded).
//! - [`url`]: the `--redis` URL.

pub mod engine;
pub mod gap;
pub mod link;
pub mod resp;
pub mod url;

use std::fmt;
use std::rc::Rc;

use crate::protocol::Frame;
use crate::store::Kept;

/// Names one request to the engine; its completion carries it back.
/// Counted up per node, never reused while the process lives.
pub type Ticket = u64;

/// What the dispatcher asks of the shared state.
#[derive(Debug, Clone)]
pub enum Request {
    /// Claim a username cluster-wide (the upgrade waits for this).
    Claim {
        name: Rc<str>,
    },
    /// Give a claimed name back (no completion).
    Release {
        name: Rc<str>,
    },
    /// `name` is in `room` now: tell every node, and answer with the
    /// room's last id, the backlog (`since`: the kept messages after it,
    /// at most `max`; else the newest `max`) and the member names.
    Enter {
        room: Rc<str>,
        name: Rc<str>,
        since: Option<u64>,
        max: usize,
        notice: String,
    },
    /// `name` left `room` (no completion).
    Part {
        room: Rc<str>,
        name: Rc<str>,
        notice: String,
    },
    /// Accept a message: the engine assigns the id and keeps and
    /// publishes the `message` event's JSON with it.
    Publish {
        room: Rc<str>,
        json: Unnumbered,
    },
    /// At most `limit` kept messages of `room` below `before`.
    Page {
        room: Rc<str>,
        before: Option<u64>,
        limit: usize,
    },
    Who {
        room: Rc<str>,
    },
    Rooms,
    /// Deliver a `direct` event to `to`, wherever it is connected.
    Direct {
        to: String,
        json: String,
    },
    /// After a reconnect: this node's members and memberships, so that
    /// Redis's presence is right again (no notices are sent).
    Resync {
        names: Vec<Rc<str>>,
        memberships: Vec<(Rc<str>, Rc<str>)>,
    },
}

/// A `message` event's JSON before the cluster gives it an id: the text as
/// serialized with a placeholder `0` for the id, and where that digit is.
/// One string holds both halves, so a message on its way to Redis costs
/// one allocation, not one per half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unnumbered {
    json: String,
    /// Byte offset of the placeholder digit.
    zero: usize,
}

impl Unnumbered {
    /// `json` with its id field's placeholder `0` at byte `zero`; `None`
    /// when that byte is not a `0`.
    pub fn new(json: String, zero: usize) -> Option<Unnumbered> {
        (json.as_bytes().get(zero) == Some(&b'0')).then_some(Unnumbered { json, zero })
    }

    /// The JSON before the id.
    pub fn prefix(&self) -> &str {
        &self.json[..self.zero]
    }

    /// The JSON after the id.
    pub fn suffix(&self) -> &str {
        &self.json[self.zero + 1..]
    }
}

/// The answer to a request.
#[derive(Debug)]
pub enum Answer {
    Claimed(bool),
    Entered {
        last_id: u64,
        backlog: Vec<Kept>,
        users: Vec<String>,
    },
    Published(u64),
    Page(Vec<Kept>),
    Users(Vec<String>),
    Rooms(Vec<(String, u64)>),
    /// `false`: nobody of that name is connected anywhere.
    Delivered(bool),
}

/// Why a request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Refused before anything was sent: nothing was done.
    NotSent,
    /// Sent, then the link broke or the reply was late: it may or may not
    /// have been carried out.
    Lost,
    /// Redis answered with an error.
    Refused,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unavailable::NotSent => {
                "the cluster store (Redis) cannot be reached; nothing was done, retry later"
            }
            Unavailable::Lost => {
                "the link to the cluster store (Redis) broke while this was in flight; retry later"
            }
            Unavailable::Refused => "the cluster store (Redis) refused the request",
        })
    }
}

#[derive(Debug)]
pub struct Completion {
    pub ticket: Ticket,
    pub result: Result<Answer, Unavailable>,
}

/// An event from the cluster for this node's members.
#[derive(Debug)]
pub enum Publication {
    /// A room message, in id order, as the text frame every member gets
    /// (built once from the publication's bytes; the `message` event's
    /// JSON is its payload). `ticket` is set when this node published it
    /// (the sender's own copy carries its `ref`).
    Message {
        room: Rc<str>,
        id: u64,
        ticket: Option<Ticket>,
        frame: Frame,
    },
    /// A `join`/`leave` notice for `room`.
    Presence { room: Rc<str>, json: String },
    /// A `direct` for the member called `to`.
    Direct { to: String, json: String },
    /// The link to Redis is back: the dispatcher answers with
    /// [`Request::Resync`].
    Reconnected,
}

#[cfg(test)]
mod tests {
    use super::Unnumbered;

    #[test]
    fn an_unnumbered_message_splits_around_its_placeholder_only() {
        let json = r#"{"user":"a","id":0,"ts":5}"#.to_string();
        let at = json.find(":0,").map(|i| i + 1);
        let m = at.and_then(|at| Unnumbered::new(json.clone(), at));
        let m = m.expect("the placeholder is a 0");
        assert_eq!(
            format!("{}7{}", m.prefix(), m.suffix()),
            r#"{"user":"a","id":7,"ts":5}"#
        );
        // Not a `0` there, or past the end: refused, not a panic later.
        assert_eq!(Unnumbered::new(json.clone(), 2), None);
        assert_eq!(Unnumbered::new(json.clone(), json.len()), None);
    }
}
