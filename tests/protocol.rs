//! The whole wire protocol over real sockets: every command of
//! `docs/protocol.md` §3, every event of §4, every error code of §5 and
//! close code of §6, the `since` resume of §2 and §8, and what it promises
//! about empty rooms and ids.
//!
//! Each test's doc says what it demonstrates. Every wait has a deadline (the
//! `Client` helpers and [`read_frame`] use [`DEADLINE`]); the only sleep
//! waits for a rate-limit token to refill, which is a matter of the clock.
//!
//! `cargo test --test protocol -- --ignored --nocapture transcript` prints a
//! session transcript: the source of the examples in `docs/protocol.md`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{
    client_frame, raw_session, read_frame, upgrade_request, Client, TestServer, DEADLINE,
};
use loopchat::store::memory::MemoryHistory;
use loopchat::store::{History, HistoryError, Kept};
use loopchat::Config;
use serde_json::{json, Value};
use tungstenite::Message;

// ---- helpers ----------------------------------------------------------------

/// Test config whose rate limit never throttles a test that pipelines
/// commands.
fn roomy() -> Config {
    let mut c = Config::for_tests();
    c.rate_per_s = 100_000;
    c.rate_burst = 100_000;
    c
}

/// A client that has read its opening sequence (welcome, joined, own join).
fn ready(server: &TestServer, query: &str) -> Client {
    let mut c = server.client_with(query);
    c.opening();
    c
}

/// Send `rooms` tagged `tag` and require its answer as the very next event.
/// Used where nothing else is in flight to this client, it proves that no
/// stray event (a second error, a duplicate, a notice meant for others) came
/// before it and that the connection still serves commands.
fn barrier(c: &mut Client, tag: &str) {
    c.send(json!({"type":"rooms","ref":tag}));
    let v = c.next();
    assert_eq!(v["type"], "rooms", "expected the answer to {tag}, got {v}");
    assert_eq!(v["ref"], tag, "{v}");
}

/// Send `frame`; the next event must be exactly one `error` with `code`, a
/// non-empty `content` and `ref` echoed (or absent when `reference` is
/// `None`); then a successful command shows the connection stayed open.
fn refused(c: &mut Client, frame: Message, code: &str, reference: Option<&str>) -> Value {
    c.ws.send(frame).expect("send");
    let e = c.next();
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], code, "{e}");
    assert!(
        e["content"].as_str().is_some_and(|s| !s.is_empty()),
        "error content: {e}"
    );
    match reference {
        Some(r) => assert_eq!(e["ref"], r, "ref not echoed: {e}"),
        None => assert!(e.get("ref").is_none(), "unexpected ref: {e}"),
    }
    barrier(c, "still-open");
    e
}

/// `refused` for a JSON command.
fn refused_json(c: &mut Client, v: Value, code: &str) -> Value {
    let reference = v["ref"].as_str().map(String::from);
    refused(c, Message::text(v.to_string()), code, reference.as_deref())
}

/// Join `room` and read the `joined` answer and the own `join` notice.
fn join(c: &mut Client, room: &str) -> Value {
    c.send(json!({"type":"join","room":room}));
    let joined = c.expect("joined");
    c.wait_for("own join notice", |v| {
        v["type"] == "join" && v["room"] == room
    });
    joined
}

/// Send a message to `room` and return the sender's own copy.
fn say_in(c: &mut Client, room: &str, content: &str) -> Value {
    c.send(json!({"type":"message","room":room,"content":content}));
    c.wait_for("own message", |v| {
        v["type"] == "message" && v["room"] == room && v["content"] == content
    })
}

/// Send `n` messages to `room` in one write, read the own copies back and
/// return their ids.
fn say_many(c: &mut Client, room: &str, n: usize) -> Vec<u64> {
    for i in 0..n {
        let v = json!({"type":"message","room":room,"content":format!("m{i}")});
        c.ws.write(Message::text(v.to_string())).expect("queue");
    }
    c.ws.flush().expect("flush");
    (0..n)
        .map(|_| {
            let m = c.wait_for("own message", |v| {
                v["type"] == "message" && v["room"] == room
            });
            m["id"].as_u64().expect("id")
        })
        .collect()
}

/// The ids of an array of `message` events, checking each is one.
fn ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .expect("array of messages")
        .iter()
        .map(|m| {
            assert_eq!(m["type"], "message", "{m}");
            assert!(m.get("ref").is_none(), "kept messages carry no ref: {m}");
            m["id"].as_u64().expect("id")
        })
        .collect()
}

fn range(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

/// Wait until `/stats` reports exactly `n` rooms.
fn wait_rooms(server: &TestServer, n: u64) {
    server.wait_stats(&format!("{n} rooms"), |s| s["rooms"] == n);
}

// ---- raw sockets, for what a well-behaved client cannot send ---------------

/// Read frames until the server's close frame; its status code.
fn raw_close_code(s: &mut TcpStream) -> u16 {
    loop {
        match read_frame(s) {
            Ok((b0, p)) if b0 & 0x0f == 0x8 => return u16::from_be_bytes([p[0], p[1]]),
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

// ---- a server with a history that fails on purpose -------------------------

/// In-memory history except for room `broken`, whose store "fails": no id
/// can be reserved and no page read.
struct Broken(MemoryHistory);

fn disk_full() -> HistoryError {
    HistoryError::Io(std::io::Error::other("disk full (simulated)"))
}

impl History for Broken {
    fn reserve_id(&mut self, room: &str) -> Result<u64, HistoryError> {
        if room == "broken" {
            return Err(disk_full());
        }
        self.0.reserve_id(room)
    }
    fn append(&mut self, room: &str, msg: Kept) -> Result<(), HistoryError> {
        self.0.append(room, msg)
    }
    fn last(&mut self, room: &str, n: usize) -> Result<Vec<Kept>, HistoryError> {
        self.0.last(room, n)
    }
    fn after(&mut self, room: &str, since: u64, max: usize) -> Result<Vec<Kept>, HistoryError> {
        self.0.after(room, since, max)
    }
    fn before(
        &mut self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Kept>, HistoryError> {
        if room == "broken" {
            return Err(disk_full());
        }
        self.0.before(room, before, limit)
    }
    fn release(&mut self, room: &str) {
        self.0.release(room)
    }
}

// ---- §3 commands and §4 events ----------------------------------------------

/// `message` with an explicit `room` goes to that room; without one it goes
/// to the home room. Every member gets the same event (`room`, `user`, `id`,
/// `ts`); only the sender's copy carries its `ref`; ids count per room; a
/// member of another room sees nothing.
#[test]
fn message_to_explicit_room_and_home_room() {
    let server = TestServer::with(roomy());
    let mut carol = ready(&server, "username=carol&room=home");
    let mut alice = ready(&server, "username=alice&room=home");
    let mut bob = ready(&server, "username=bob&room=home");
    join(&mut alice, "side");
    join(&mut bob, "side");

    alice.send(json!({"type":"message","room":"side","content":"to side","ref":"c1"}));
    let own = alice.expect("message");
    let seen = bob.expect("message");
    assert_eq!(own["room"], "side");
    assert_eq!(own["user"], "alice");
    assert_eq!(own["content"], "to side");
    assert_eq!(own["id"], 1);
    assert!(own["ts"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(own["ref"], "c1");
    assert!(seen.get("ref").is_none(), "{seen}");
    let mut without_ref = own.clone();
    without_ref.as_object_mut().unwrap().remove("ref");
    assert_eq!(without_ref, seen);

    alice.send(json!({"type":"message","content":"to home"}));
    let own = alice.expect("message");
    assert_eq!(own["room"], "home");
    assert_eq!(own["id"], 1, "ids are per room");
    assert!(own.get("ref").is_none(), "no ref sent, none echoed: {own}");
    assert_eq!(bob.expect("message"), own);

    let again = say_in(&mut alice, "side", "side again");
    assert_eq!(again["id"], 2);

    // carol (home only) gets the home message and nothing from side.
    let got = carol.wait_for("home message", |v| v["type"] == "message");
    assert_eq!(got["content"], "to home");
    barrier(&mut carol, "carol-sync");
}

/// `join` creates the room on first join; the joiner gets `joined` (room,
/// users with the joiner, the last `history_limit` messages oldest first,
/// its `ref`), then every member, the joiner included, gets `join`.
#[test]
fn join_creates_the_room_and_tells_every_member() {
    let mut config = roomy();
    config.history_limit = 3;
    let server = TestServer::with(config);
    let mut alice = ready(&server, "username=alice");
    let mut bob = ready(&server, "username=bob");
    alice.expect("join");

    alice.send(json!({"type":"rooms"}));
    let before = alice.expect("rooms");
    assert_eq!(before["rooms"], json!([{"room":"default","users":2}]));

    alice.send(json!({"type":"join","room":"fresh","ref":"j1"}));
    let joined = alice.next();
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["room"], "fresh");
    assert_eq!(joined["users"], json!(["alice"]));
    assert_eq!(joined["history"], json!([]));
    assert_eq!(joined["ref"], "j1");
    assert!(joined["content"].is_string());
    let notice = alice.next();
    assert_eq!(
        notice,
        json!({"type":"join","content":"alice joined","room":"fresh","user":"alice"})
    );

    assert_eq!(say_many(&mut alice, "fresh", 5), range(1, 5));

    bob.send(json!({"type":"join","room":"fresh","ref":"j2"}));
    let joined = bob.expect("joined");
    assert_eq!(joined["users"], json!(["alice", "bob"]));
    assert_eq!(joined["ref"], "j2");
    assert_eq!(
        ids(&joined["history"]),
        vec![3, 4, 5],
        "last 3, oldest first"
    );
    assert_eq!(joined["history"][0]["room"], "fresh");
    assert_eq!(joined["history"][0]["user"], "alice");
    let expected = json!({"type":"join","content":"bob joined","room":"fresh","user":"bob"});
    assert_eq!(bob.next(), expected);
    assert_eq!(
        alice.wait_for("bob's join", |v| v["type"] == "join"),
        expected
    );

    alice.send(json!({"type":"rooms"}));
    let mut list = alice.expect("rooms")["rooms"].as_array().unwrap().clone();
    list.sort_by_key(|r| r["room"].as_str().unwrap().to_string());
    assert_eq!(
        list,
        vec![
            json!({"room":"default","users":2}),
            json!({"room":"fresh","users":2})
        ]
    );
}

/// `join` with `since` replays exactly the kept messages with a greater id,
/// however many `history_limit` would show.
#[test]
fn join_with_since_replays_exactly_the_newer() {
    let mut config = roomy();
    config.history_limit = 2;
    let server = TestServer::with(config);
    let mut alice = ready(&server, "username=alice&room=r");
    assert_eq!(say_many(&mut alice, "r", 6), range(1, 6));
    let mut bob = ready(&server, "username=bob");
    for (since, want) in [
        (2, range(3, 6)),
        (0, range(1, 6)),
        (6, vec![]),
        (99, vec![]),
    ] {
        bob.send(json!({"type":"join","room":"r","since":since}));
        let joined = bob.expect("joined");
        assert_eq!(ids(&joined["history"]), want, "since {since}");
    }
}

/// `leave`: the leaver gets `left` (with its `ref`) and nothing else; the
/// remaining members get `leave`; the leaver can no longer post there.
#[test]
fn leave_tells_the_leaver_and_the_rest() {
    let server = TestServer::with(roomy());
    let mut alice = ready(&server, "username=alice&room=r");
    let mut bob = ready(&server, "username=bob&room=r");
    alice.expect("join");

    bob.send(json!({"type":"leave","room":"r","ref":"l1"}));
    assert_eq!(
        bob.next(),
        json!({"type":"left","content":"left r","room":"r","ref":"l1"})
    );
    barrier(&mut bob, "bob-sync");
    assert_eq!(
        alice.next(),
        json!({"type":"leave","content":"bob left","room":"r","user":"bob"})
    );
    refused_json(
        &mut bob,
        json!({"type":"message","room":"r","content":"x","ref":"m"}),
        "not_member",
    );
    alice.send(json!({"type":"who","room":"r"}));
    assert_eq!(alice.expect("members")["users"], json!(["alice"]));
}

/// A connection that closes leaves every room it was in: each room's
/// remaining members get one `leave`, and nobody else hears of it.
#[test]
fn closing_connection_leaves_every_room() {
    let server = TestServer::with(roomy());
    let mut alice = ready(&server, "username=alice");
    join(&mut alice, "r1");
    let mut carol = ready(&server, "username=carol&room=r2");
    let mut dave = ready(&server, "username=dave&room=elsewhere");
    let mut bob = ready(&server, "username=bob");
    join(&mut bob, "r1");
    join(&mut bob, "r2");
    let _ = alice.wait_for("bob in r1", |v| v["type"] == "join" && v["room"] == "r1");
    let _ = carol.wait_for("bob in r2", |v| v["type"] == "join" && v["user"] == "bob");

    bob.ws.close(None).expect("close");
    let _ = bob.close_code();

    let mut rooms: Vec<String> = (0..2)
        .map(|_| {
            let v = alice.next();
            assert_eq!(v["type"], "leave", "{v}");
            assert_eq!(v["user"], "bob");
            v["room"].as_str().unwrap().to_string()
        })
        .collect();
    rooms.sort();
    assert_eq!(rooms, ["default", "r1"]);
    assert_eq!(
        carol.next(),
        json!({"type":"leave","content":"bob left","room":"r2","user":"bob"})
    );
    barrier(&mut alice, "alice-sync");
    barrier(&mut carol, "carol-sync");
    barrier(&mut dave, "dave-sync");
}

/// `direct`: the recipient gets `direct` with `from`, `to`, `ts` (no
/// `ref`); the sender gets its own copy with its `ref`; nobody else gets
/// anything.
#[test]
fn direct_reaches_one_user_and_echoes_to_the_sender() {
    let server = TestServer::with(roomy());
    let mut alice = ready(&server, "username=alice");
    let mut bob = ready(&server, "username=bob&room=other");
    let mut carol = ready(&server, "username=carol");
    alice.expect("join");

    alice.send(json!({"type":"direct","to":"bob","content":"psst","ref":"d1"}));
    let got = bob.next();
    assert_eq!(got["type"], "direct", "{got}");
    assert_eq!(got["from"], "alice");
    assert_eq!(got["to"], "bob");
    assert_eq!(got["content"], "psst");
    assert!(got["ts"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(got.get("ref").is_none(), "{got}");
    let own = alice.next();
    assert_eq!(own["type"], "direct", "{own}");
    assert_eq!(own["ref"], "d1");
    let mut without_ref = own.clone();
    without_ref.as_object_mut().unwrap().remove("ref");
    assert_eq!(without_ref, got);
    barrier(&mut carol, "carol-sync");
    barrier(&mut bob, "bob-sync");
}

/// `rooms` lists every live room with its member count; `who` answers
/// `members` with the room's users in join order (none for a room that does
/// not exist).
#[test]
fn rooms_and_who() {
    let server = TestServer::with(roomy());
    let mut alice = ready(&server, "username=alice&room=a");
    let _bob = ready(&server, "username=bob&room=b");
    let _carol = ready(&server, "username=carol&room=b");
    join(&mut alice, "c");

    alice.send(json!({"type":"rooms","ref":"q"}));
    let answer = alice.next();
    assert_eq!(answer["type"], "rooms", "{answer}");
    assert_eq!(answer["ref"], "q");
    assert!(answer["content"].is_string());
    let mut list = answer["rooms"].as_array().unwrap().clone();
    list.sort_by_key(|r| r["room"].as_str().unwrap().to_string());
    assert_eq!(
        list,
        vec![
            json!({"room":"a","users":1}),
            json!({"room":"b","users":2}),
            json!({"room":"c","users":1}),
        ]
    );

    alice.send(json!({"type":"who","room":"b","ref":"w"}));
    assert_eq!(
        alice.next(),
        json!({"type":"members","content":"2 in b","room":"b","users":["bob","carol"],"ref":"w"})
    );
    alice.send(json!({"type":"who","room":"nowhere"}));
    let none = alice.next();
    assert_eq!(none["type"], "members");
    assert_eq!(none["users"], json!([]));
}

/// `history` pages backwards: without `before` the newest, with `before`
/// the ones below it; oldest first; `history_limit` by default, `limit` up
/// to 500 (more is capped at 500).
#[test]
fn history_pages_back_with_before_and_limit() {
    let mut config = roomy();
    config.history_limit = 5;
    let server = TestServer::with(config);
    let mut alice = ready(&server, "username=alice&room=r");
    assert_eq!(say_many(&mut alice, "r", 510), range(1, 510));

    let mut page = |q: Value| -> Value {
        alice.send(q.clone());
        let v = alice.next();
        assert_eq!(v["type"], "history", "{v}");
        assert_eq!(v["room"], q["room"]);
        assert!(v["content"].is_string());
        v
    };
    let p = page(json!({"type":"history","room":"r","ref":"h1"}));
    assert_eq!(p["ref"], "h1");
    assert_eq!(ids(&p["messages"]), range(506, 510), "default size");
    let p = page(json!({"type":"history","room":"r","before":100,"limit":10}));
    assert_eq!(ids(&p["messages"]), range(90, 99));
    let p = page(json!({"type":"history","room":"r","limit":1000}));
    assert_eq!(ids(&p["messages"]), range(11, 510), "capped at 500");
    let p = page(json!({"type":"history","room":"r","before":3,"limit":10}));
    assert_eq!(ids(&p["messages"]), vec![1, 2]);
    let p = page(json!({"type":"history","room":"r","before":1}));
    assert_eq!(ids(&p["messages"]), Vec::<u64>::new());
    let p = page(json!({"type":"history","room":"nowhere"}));
    assert_eq!(ids(&p["messages"]), Vec::<u64>::new());
}

/// With `history_keep` = 5, `history`, `joined.history` and a `since`
/// resume answer with what is kept (the newest 5), never an error.
#[test]
fn history_past_what_is_kept_answers_with_what_there_is() {
    let mut config = roomy();
    config.history_keep = 5;
    let server = TestServer::with(config);
    let mut alice = ready(&server, "username=alice&room=r");
    assert_eq!(say_many(&mut alice, "r", 8), range(1, 8));

    alice.send(json!({"type":"history","room":"r","limit":50}));
    assert_eq!(ids(&alice.expect("history")["messages"]), range(4, 8));
    alice.send(json!({"type":"history","room":"r","before":6,"limit":50}));
    assert_eq!(ids(&alice.expect("history")["messages"]), vec![4, 5]);
    alice.send(json!({"type":"history","room":"r","before":4}));
    assert_eq!(ids(&alice.expect("history")["messages"]), Vec::<u64>::new());

    let mut bob = ready(&server, "username=bob");
    bob.send(json!({"type":"join","room":"r","since":1}));
    assert_eq!(ids(&bob.expect("joined")["history"]), range(4, 8));
    let mut carol = server.client_with("username=carol&room=r&since=2");
    let (_, joined) = carol.opening();
    assert_eq!(ids(&joined["history"]), range(4, 8));
    let mut dave = server.client_with("username=dave&room=r");
    let (_, joined) = dave.opening();
    assert_eq!(ids(&joined["history"]), range(4, 8));
}

/// Resume: `?since=N` on the upgrade URL makes the home room's
/// `joined.history` exactly the messages with id > N, and the live messages
/// that follow continue it with no gap and no duplicate, even while another
/// member keeps posting during the reconnect.
#[test]
fn resume_with_since_has_no_gap_and_no_duplicate() {
    let server = TestServer::with(roomy());
    let mut writer = ready(&server, "username=writer&room=r");
    let mut reader = ready(&server, "username=reader&room=r");
    writer.expect("join");

    // First session: the reader sees ids 1..=3, then its connection ends.
    assert_eq!(say_many(&mut writer, "r", 3), range(1, 3));
    let seen: Vec<u64> = (0..3)
        .map(|_| reader.expect("message")["id"].as_u64().unwrap())
        .collect();
    assert_eq!(seen, range(1, 3));
    let last = seen[2];
    drop(reader);
    writer.wait_for("reader gone", |v| v["type"] == "leave");

    // Missed while away, then a stream that runs during the reconnect.
    assert_eq!(say_many(&mut writer, "r", 3), range(4, 6));
    const STREAM: u64 = 300;
    let stream = std::thread::spawn(move || {
        let ids = say_many(&mut writer, "r", STREAM as usize);
        (writer, ids)
    });

    let mut reader = server.client_with(&format!("username=reader&room=r&since={last}"));
    assert_eq!(reader.next()["type"], "welcome");
    let joined = reader.next();
    assert_eq!(joined["type"], "joined", "{joined}");
    let mut got = ids(&joined["history"]);
    assert_eq!(got.first(), Some(&(last + 1)), "history starts after since");
    let end = 6 + STREAM;
    while got.last().copied().unwrap_or(last) < end {
        let v = reader.next();
        if v["type"] == "message" {
            got.push(v["id"].as_u64().unwrap());
        }
    }
    assert_eq!(got, range(last + 1, end), "no gap, no duplicate");
    let (_writer, streamed) = stream.join().expect("writer");
    assert_eq!(streamed, range(7, end));
    barrier(&mut reader, "reader-sync");
}

/// `ref` of up to 64 characters (not bytes) is echoed on the event each
/// command causes for its sender, and on errors; a longer one is refused
/// with `too_long` (no ref) and the connection stays open.
#[test]
fn ref_is_echoed_and_a_longer_one_refused() {
    let server = TestServer::with(roomy());
    let mut alice = ready(&server, "username=alice");
    let _bob = ready(&server, "username=bob");
    alice.expect("join");
    let r = "é".repeat(64);
    let commands = [
        (json!({"type":"join","room":"x","ref":r}), "joined"),
        (
            json!({"type":"message","room":"x","content":"hi","ref":r}),
            "message",
        ),
        (json!({"type":"leave","room":"x","ref":r}), "left"),
        (
            json!({"type":"direct","to":"bob","content":"hi","ref":r}),
            "direct",
        ),
        (json!({"type":"rooms","ref":r}), "rooms"),
        (json!({"type":"who","room":"default","ref":r}), "members"),
        (
            json!({"type":"history","room":"default","ref":r}),
            "history",
        ),
        (json!({"type":"nope","ref":r}), "error"),
    ];
    for (command, answer) in commands {
        alice.send(command.clone());
        let v = alice.wait_for(answer, |v| v["type"] == answer);
        assert_eq!(v["ref"], r.as_str(), "{command} → {v}");
    }
    let long = "x".repeat(65);
    let e = refused(
        &mut alice,
        Message::text(json!({"type":"rooms","ref":long}).to_string()),
        "too_long",
        None,
    );
    assert!(e["content"].as_str().unwrap().contains("64"), "{e}");
}

// ---- §5 error codes -----------------------------------------------------------

/// `bad_json`: anything that is not one JSON object of the command shape;
/// a plain-text frame (a raw load tool) is shown the expected shape.
#[test]
fn error_bad_json() {
    let server = TestServer::start();
    let mut c = ready(&server, "username=alice");
    let e = refused(&mut c, Message::text("hello there"), "bad_json", None);
    assert!(
        e["content"]
            .as_str()
            .unwrap()
            .contains(r#"{"type":"message","content":"…"}"#),
        "{e}"
    );
    for text in [
        "[1,2]",
        r#"{"type":"message","content":5}"#,
        r#"{"type":"message","#,
        "",
    ] {
        refused(&mut c, Message::text(text), "bad_json", None);
    }
}

/// A field of the wrong JSON type is named with the shape it must have, in
/// words for a chat user (not serde's "invalid type: integer `5`,
/// expected a string at line 1 column 29"); a good `ref` beside it is
/// echoed; a `ref` that is not a string says what a `ref` must be.
#[test]
fn error_bad_json_names_the_field() {
    let server = TestServer::start();
    let mut c = ready(&server, "username=alice");
    for (command, reference, want) in [
        (
            json!({"type":"message","content":5,"ref":"b1"}),
            Some("b1"),
            "content must be a string",
        ),
        (
            json!({"type":"rooms","ref":5}),
            None,
            "ref must be a string of at most 64 characters",
        ),
        (
            json!({"type":"join","room":"r","since":"7"}),
            None,
            "since must be a whole number (0 or more)",
        ),
        (json!({"type":["message"]}), None, "type must be a string"),
    ] {
        let e = refused(
            &mut c,
            Message::text(command.to_string()),
            "bad_json",
            reference,
        );
        assert_eq!(e["content"], want, "{command}");
    }
    let e = refused(&mut c, Message::text("1"), "bad_json", None);
    let text = e["content"].as_str().unwrap();
    assert!(
        text.starts_with("got a number; send one JSON object"),
        "{e}"
    );
    assert!(!text.contains("invalid type"), "{e}");
}

/// `empty`: message or direct content that is empty or only Unicode
/// whitespace is refused with its `ref`; nothing reaches the room or the
/// recipient, nothing is kept, and no id is used up.
#[test]
fn error_empty() {
    let server = TestServer::start();
    let mut alice = ready(&server, "username=alice");
    let mut bob = ready(&server, "username=bob");
    alice.expect("join");
    let first = say_in(&mut alice, "default", "before")["id"]
        .as_u64()
        .unwrap();
    bob.expect("message");
    for content in ["", "   ", "\n\t\r", "\u{a0}\u{2003}\u{3000}"] {
        refused_json(
            &mut alice,
            json!({"type":"message","content":content,"ref":"e1"}),
            "empty",
        );
        refused_json(
            &mut alice,
            json!({"type":"direct","to":"bob","content":content,"ref":"e2"}),
            "empty",
        );
    }
    let next = say_in(&mut alice, "default", "after")["id"]
        .as_u64()
        .unwrap();
    assert_eq!(next, first + 1, "an empty message used up an id");
    // bob's very next event is the real message: nothing empty reached him.
    let m = bob.next();
    assert_eq!(
        (m["type"].as_str(), m["content"].as_str()),
        (Some("message"), Some("after"))
    );
    alice.send(json!({"type":"history","room":"default","ref":"h"}));
    let page = alice.expect("history");
    assert_eq!(ids(&page["messages"]), vec![first, next]);
}

/// `unknown_type`: a `type` that is no command; the content lists the
/// commands.
#[test]
fn error_unknown_type() {
    let server = TestServer::start();
    let mut c = ready(&server, "username=alice");
    let e = refused_json(&mut c, json!({"type":"dance","ref":"u1"}), "unknown_type");
    assert!(e["content"].as_str().unwrap().contains("history"), "{e}");
    refused_json(&mut c, json!({"type":"welcome"}), "unknown_type");
}

/// `missing_field`: a missing `type`, or a field the command requires.
#[test]
fn error_missing_field() {
    let server = TestServer::with(roomy());
    let mut c = ready(&server, "username=alice");
    for command in [
        json!({"content":"hi","ref":"m1"}),
        json!({"type":"message","ref":"m2"}),
        json!({"type":"join"}),
        json!({"type":"leave","ref":"m3"}),
        json!({"type":"direct","content":"hi"}),
        json!({"type":"direct","to":"alice"}),
        json!({"type":"who"}),
        json!({"type":"history"}),
    ] {
        refused_json(&mut c, command, "missing_field");
    }
}

/// `bad_room`: a room name that breaks the name rule, in every command that
/// takes one.
#[test]
fn error_bad_room() {
    let server = TestServer::with(roomy());
    let mut c = ready(&server, "username=alice");
    let too_long = "r".repeat(33);
    for command in [
        json!({"type":"join","room":"no spaces","ref":"b1"}),
        json!({"type":"join","room":too_long}),
        json!({"type":"join","room":""}),
        json!({"type":"leave","room":"a/b"}),
        json!({"type":"who","room":"é"}),
        json!({"type":"history","room":"../etc","ref":"b2"}),
        json!({"type":"message","room":"a b","content":"x","ref":"b3"}),
    ] {
        refused_json(&mut c, command, "bad_room");
    }
}

/// `not_member`: posting to, or leaving, a room one is not in (even one
/// that exists).
#[test]
fn error_not_member() {
    let server = TestServer::with(roomy());
    let mut c = ready(&server, "username=alice");
    let _bob = ready(&server, "username=bob&room=theirs");
    for command in [
        json!({"type":"message","room":"theirs","content":"x","ref":"n1"}),
        json!({"type":"message","room":"nowhere","content":"x"}),
        json!({"type":"leave","room":"theirs","ref":"n2"}),
    ] {
        refused_json(&mut c, command, "not_member");
    }
}

/// `too_long`: content over `max_content_bytes` (bytes, not characters), in
/// `message` and `direct`; exactly the limit is accepted.
#[test]
fn error_too_long() {
    let mut config = roomy();
    config.max_content_bytes = 100;
    let server = TestServer::with(config);
    let mut c = ready(&server, "username=alice");
    let e = refused_json(
        &mut c,
        json!({"type":"message","content":"x".repeat(101),"ref":"t1"}),
        "too_long",
    );
    assert!(e["content"].as_str().unwrap().contains("100"), "{e}");
    // 51 × 2 bytes = 102 bytes in 51 characters.
    refused_json(
        &mut c,
        json!({"type":"message","content":"é".repeat(51)}),
        "too_long",
    );
    refused_json(
        &mut c,
        json!({"type":"direct","to":"alice","content":"x".repeat(101),"ref":"t2"}),
        "too_long",
    );
    let exact = "x".repeat(100);
    assert_eq!(c.say(&exact)["content"], exact.as_str());
}

/// `unknown_user`: a direct message to a name nobody connected holds
/// (including one who just left).
#[test]
fn error_unknown_user() {
    let server = TestServer::with(roomy());
    let mut c = ready(&server, "username=alice");
    refused_json(
        &mut c,
        json!({"type":"direct","to":"nobody","content":"x","ref":"u"}),
        "unknown_user",
    );
    let mut bob = ready(&server, "username=bob");
    bob.ws.close(None).expect("close");
    let _ = bob.close_code();
    c.wait_for("bob left", |v| v["type"] == "leave");
    refused_json(
        &mut c,
        json!({"type":"direct","to":"bob","content":"x"}),
        "unknown_user",
    );
}

/// `too_many_rooms`: joining more than `max_rooms_per_user` rooms (the home
/// room counts); leaving one makes room again.
#[test]
fn error_too_many_rooms() {
    let mut config = roomy();
    config.max_rooms_per_user = 3;
    let server = TestServer::with(config);
    let mut c = ready(&server, "username=alice");
    join(&mut c, "r1");
    join(&mut c, "r2");
    let e = refused_json(
        &mut c,
        json!({"type":"join","room":"r3","ref":"j"}),
        "too_many_rooms",
    );
    assert!(e["content"].as_str().unwrap().contains('3'), "{e}");
    c.send(json!({"type":"leave","room":"r1"}));
    c.expect("left");
    join(&mut c, "r3");
}

/// `rate_limited`: a command over the token bucket (`rate_burst` at once,
/// then `rate_per_s`) is refused with its `ref`; once a token has refilled
/// the connection is served again.
#[test]
fn error_rate_limited() {
    let mut config = Config::for_tests();
    config.rate_per_s = 10;
    config.rate_burst = 3;
    let server = TestServer::with(config);
    let mut c = ready(&server, "username=alice");
    // One write, so the server reads all four in the same instant.
    for i in 0..4 {
        let v = json!({"type":"rooms","ref":format!("q{i}")});
        c.ws.write(Message::text(v.to_string())).expect("queue");
    }
    c.ws.flush().expect("flush");
    for i in 0..3 {
        let v = c.next();
        assert_eq!(v["type"], "rooms", "{v}");
        assert_eq!(v["ref"], format!("q{i}"));
    }
    let e = c.next();
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "rate_limited");
    assert!(e["content"].as_str().unwrap().contains("10"), "{e}");
    // Two refill periods (1 s / rate_per_s each): a wait on the clock.
    std::thread::sleep(Duration::from_millis(2 * 1000 / 10));
    barrier(&mut c, "after-refill");
    assert_eq!(e["ref"], "q3", "rate_limited must echo the ref: {e}");
}

/// `binary_unsupported`: a binary frame is answered, not fatal.
#[test]
fn error_binary_unsupported() {
    let server = TestServer::start();
    let mut c = ready(&server, "username=alice");
    refused(
        &mut c,
        Message::binary(vec![1u8, 2, 3]),
        "binary_unsupported",
        None,
    );
}

/// `history_unavailable`: when the store cannot assign an id or read a
/// page, the command is refused with its `ref` and the connection (and
/// other rooms) keep working.
#[test]
fn error_history_unavailable() {
    let server = TestServer::with_history(Config::for_tests(), |config| {
        Box::new(Broken(MemoryHistory::new(config.history_keep)))
    });
    let mut c = server.client("alice");
    c.opening();
    join(&mut c, "broken");
    refused_json(
        &mut c,
        json!({"type":"message","room":"broken","content":"x","ref":"h1"}),
        "history_unavailable",
    );
    refused_json(
        &mut c,
        json!({"type":"history","room":"broken","ref":"h2"}),
        "history_unavailable",
    );
    assert_eq!(c.say("elsewhere")["id"], 1);
}

// ---- rooms come and go ----------------------------------------------------------

/// A room with no members disappears from `rooms` (whether its last member
/// left or disconnected), and its ids never go backwards while the server
/// runs: a later message gets a greater id (ids are strictly increasing per
/// room, not necessarily consecutive).
#[test]
fn empty_rooms_disappear_and_ids_never_go_backwards() {
    let server = TestServer::with(roomy());
    let mut alice = ready(&server, "username=alice");
    join(&mut alice, "tmp");
    assert_eq!(say_many(&mut alice, "tmp", 3), range(1, 3));
    alice.send(json!({"type":"leave","room":"tmp"}));
    alice.expect("left");
    alice.send(json!({"type":"rooms"}));
    assert_eq!(
        alice.expect("rooms")["rooms"],
        json!([{"room":"default","users":1}])
    );
    join(&mut alice, "tmp");
    assert!(say_in(&mut alice, "tmp", "back")["id"].as_u64().unwrap() > 3);

    let mut bob = ready(&server, "username=bob&room=solo");
    let solo = say_many(&mut bob, "solo", 2);
    assert!(solo[0] < solo[1], "{solo:?}");
    drop(bob);
    wait_rooms(&server, 2);
    alice.send(json!({"type":"rooms"}));
    let listed = alice.expect("rooms")["rooms"].to_string();
    assert!(!listed.contains("solo"), "{listed}");
    join(&mut alice, "solo");
    assert!(say_in(&mut alice, "solo", "again")["id"].as_u64().unwrap() > solo[1]);
}

// ---- §2 opening --------------------------------------------------------------

/// `since` that is not a whole number is refused before the upgrade (400).
#[test]
fn since_must_be_a_number() {
    let server = TestServer::start();
    let (status, body) = server.http(upgrade_request("/ws?username=a&since=ten", "").as_bytes());
    assert_eq!(status, 400);
    assert!(body.contains("since"), "{body}");
}

// ---- §5 close codes --------------------------------------------------------------

/// A message over `max_message_bytes` closes the connection with 1009.
#[test]
fn close_1009_message_too_big() {
    let mut config = Config::for_tests();
    config.max_message_bytes = 1024;
    let server = TestServer::with(config);
    let mut c = ready(&server, "username=alice");
    let big = json!({"type":"message","content":"x".repeat(2000)});
    c.send(big);
    assert_eq!(c.close_code(), Some(1009));
}

/// Invalid UTF-8 in a text frame closes with 1007.
#[test]
fn close_1007_invalid_utf8() {
    let server = TestServer::start();
    let mut s = raw_session(server.addr, "/ws?username=alice");
    s.write_all(&client_frame(0x81, b"{\"type\":\"rooms\xff\"}", true))
        .unwrap();
    assert_eq!(raw_close_code(&mut s), 1007);
}

/// A framing violation (an unmasked client frame) closes with 1002.
#[test]
fn close_1002_unmasked_frame() {
    let server = TestServer::start();
    let mut s = raw_session(server.addr, "/ws?username=alice");
    s.write_all(&client_frame(0x81, br#"{"type":"rooms"}"#, false))
        .unwrap();
    assert_eq!(raw_close_code(&mut s), 1002);
}

/// Flooding on after `rate_limited` errors closes with 1008.
#[test]
fn close_1008_flooding() {
    let mut config = Config::for_tests();
    config.rate_per_s = 1;
    config.rate_burst = 2;
    let server = TestServer::with(config);
    let mut c = ready(&server, "username=alice");
    for _ in 0..10 {
        c.ws.write(Message::text(r#"{"type":"rooms"}"#))
            .expect("queue");
    }
    c.ws.flush().expect("flush");
    // Answers to the first frames, then the close; never a bare disconnect.
    let mut seen = Vec::new();
    let code = loop {
        match c.ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                let what = v["code"].as_str().or(v["type"].as_str()).unwrap_or("?");
                seen.push(what.to_string());
            }
            Ok(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(e) => panic!("ended without a close frame, after {seen:?}: {e}"),
        }
    };
    assert_eq!(seen, ["rooms", "rooms", "rate_limited", "rate_limited"]);
    assert_eq!(code, Some(1008));
}

/// Shutdown closes every session with 1001.
#[test]
fn close_1001_on_shutdown() {
    let mut server = TestServer::start();
    let mut c = ready(&server, "username=alice");
    server.shutdown();
    assert_eq!(c.close_code(), Some(1001));
}

/// A client that does not answer the heartbeat ping is dropped.
#[test]
fn missed_heartbeat_drops_the_connection() {
    let mut config = Config::for_tests();
    config.heartbeat_ms = 100;
    let server = TestServer::with(config);
    let mut s = raw_session(server.addr, "/ws?username=alice");
    let mut pinged = false;
    // Read until the server drops the connection (EOF or reset).
    while let Ok((b0, _)) = read_frame(&mut s) {
        pinged |= b0 & 0x0f == 0x9;
    }
    assert!(pinged, "dropped without a ping");
}

/// A client that never finishes its HTTP handshake is dropped after the
/// handshake timeout.
#[test]
fn unfinished_handshake_is_dropped() {
    let mut config = Config::for_tests();
    config.handshake_timeout_ms = 100;
    let server = TestServer::with(config);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(start.elapsed() < DEADLINE, "not dropped");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

// ---- the docs' examples --------------------------------------------------------------

/// The next text frame exactly as the server wrote it.
fn raw_text(c: &mut Client) -> String {
    loop {
        match c.ws.read().expect("read within the deadline") {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => continue,
        }
    }
}

/// Prints a session that uses every command and provokes most errors, in
/// the server's own field order: the source of the examples in
/// `docs/protocol.md`.
#[test]
#[ignore = "prints a transcript; run with --ignored --nocapture"]
fn transcript() {
    let mut config = Config::for_tests();
    config.max_rooms_per_user = 2;
    let server = TestServer::with(config);
    let mut alice = server.client("alice");
    let mut bob = server.client_with("username=bob&room=lobby");
    let show = |who: &str, c: &mut Client, n: usize| {
        for _ in 0..n {
            println!("{who} <- {}", raw_text(c));
        }
    };
    let send = |who: &str, c: &mut Client, text: &str| {
        println!("{who} -> {text}");
        c.ws.send(Message::text(text)).expect("send");
    };
    show("alice", &mut alice, 3);
    show("bob", &mut bob, 3);
    send(
        "alice",
        &mut alice,
        r#"{"type":"join","room":"lobby","ref":"c1"}"#,
    );
    show("alice", &mut alice, 2);
    show("bob", &mut bob, 1);
    send(
        "alice",
        &mut alice,
        r#"{"type":"message","room":"lobby","content":"hi","ref":"c2"}"#,
    );
    show("alice", &mut alice, 1);
    show("bob", &mut bob, 1);
    let big = format!(r#"{{"type":"message","content":"{}"}}"#, "x".repeat(4097));
    for text in [
        r#"{"type":"direct","to":"bob","content":"psst","ref":"c3"}"#,
        r#"{"type":"rooms"}"#,
        r#"{"type":"who","room":"lobby"}"#,
        r#"{"type":"history","room":"lobby","before":2,"limit":50}"#,
        "hello",
        r#"{"type":"message","content":5,"ref":"c6"}"#,
        r#"{"type":"rooms","ref":5}"#,
        r#"{"type":"message","content":"  ","ref":"c7"}"#,
        r#"{"type":"dance","ref":"c5"}"#,
        r#"{"content":"hi"}"#,
        r#"{"type":"join"}"#,
        r#"{"type":"join","room":"no spaces"}"#,
        r#"{"type":"join","room":"third"}"#,
        big.as_str(),
        r#"{"type":"direct","to":"nobody","content":"x"}"#,
        r#"{"type":"leave","room":"lobby"}"#,
        r#"{"type":"message","room":"lobby","content":"hi","ref":"c4"}"#,
    ] {
        let shown = if text.len() > 100 {
            "(a message with 4097 bytes of content)"
        } else {
            text
        };
        println!("alice -> {shown}");
        alice.ws.send(Message::text(text)).expect("send");
        show("alice", &mut alice, 1);
    }
    alice.ws.send(Message::binary(vec![1u8])).expect("send");
    println!("alice -> (a binary frame)");
    show("alice", &mut alice, 1);
    show("bob", &mut bob, 2);
    send("bob", &mut bob, r#"{"type":"history","room":"lobby"}"#);
    show("bob", &mut bob, 1);
    let mut carol = server.client_with("username=carol&room=lobby&since=0");
    show("carol", &mut carol, 3);
}
