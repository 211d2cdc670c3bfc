//! The event loop's seed behaviour (the Go chat's parity): greeting, rooms,
//! broadcast, names, plain HTTP, and a loop that no client can stall.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{upgrade_request, Client, TestServer, DEADLINE};
use serde_json::json;

/// welcome, then joined, then the join notice, in that order, with the
/// contract's fields.
#[test]
fn opening_sequence() {
    let server = TestServer::start();
    let mut alice = server.client("alice");
    let w = alice.next();
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["content"], "welcome, alice");
    assert_eq!(w["user"], "alice");
    assert_eq!(w["room"], "default");
    for limit in [
        "max_message_bytes",
        "max_content_bytes",
        "max_rooms_per_user",
        "rate_per_s",
        "rate_burst",
        "history_limit",
    ] {
        assert!(w["limits"][limit].is_u64(), "limits.{limit}");
    }
    let j = alice.next();
    assert_eq!(j["type"], "joined");
    assert_eq!(j["room"], "default");
    assert_eq!(j["users"], json!(["alice"]));
    assert_eq!(j["history"], json!([]));
    let n = alice.next();
    assert_eq!(n["type"], "join");
    assert_eq!(n["user"], "alice");
    assert_eq!(n["content"], "alice joined");
}

/// A message reaches every member, the sender included, with strictly
/// increasing ids and a timestamp; a disconnect tells the room.
#[test]
fn broadcast_ids_and_leave() {
    let server = TestServer::start();
    let mut alice = server.client("alice");
    alice.opening();
    let mut bob = server.client("bob");
    bob.opening();
    alice.expect("join");
    let mut last = 0;
    for i in 0..5 {
        let text = format!("hi {i}");
        alice.send(json!({"type":"message","content":text}));
        let a = alice.expect("message");
        let b = bob.expect("message");
        assert_eq!(a, b);
        assert_eq!(b["content"], text);
        assert_eq!(b["user"], "alice");
        assert_eq!(b["room"], "default");
        let id = b["id"].as_u64().unwrap();
        assert!(id > last);
        last = id;
        assert!(b["ts"].as_u64().unwrap() > 1_600_000_000_000);
    }
    drop(bob);
    let leave = alice.expect("leave");
    assert_eq!(leave["user"], "bob");
    assert_eq!(leave["content"], "bob left");
}

/// No username gives unique guest names; `?room=` picks the home room.
#[test]
fn guests_and_home_room() {
    let server = TestServer::start();
    let mut g1 = server.client_with("");
    let mut g2 = server.client_with("room=lobby");
    let (w1, _) = g1.opening();
    let (w2, j2) = g2.opening();
    let (n1, n2) = (w1["user"].as_str().unwrap(), w2["user"].as_str().unwrap());
    assert!(n1.starts_with("guest-") && n2.starts_with("guest-"));
    assert_ne!(n1, n2);
    assert_eq!(w2["room"], "lobby");
    assert_eq!(j2["room"], "lobby");
}

/// Two rooms never see each other's messages.
#[test]
fn rooms_are_separate() {
    let server = TestServer::start();
    let mut a = server.client_with("username=a&room=one");
    a.opening();
    let mut b = server.client_with("username=b&room=two");
    b.opening();
    a.say("for one");
    b.say("for two");
    a.say("one again");
    // b's next event is not a's message: b receives only its own room.
    b.send(json!({"type":"rooms"}));
    let next = b.next();
    assert_eq!(
        next["type"], "rooms",
        "b saw something from room one: {next}"
    );
}

/// Names are checked before any upgrade: 400 for a bad one, 409 for a
/// taken one, with a plain-text body that says why.
#[test]
fn names_checked_before_upgrade() {
    let server = TestServer::start();
    let mut alice = server.client("alice");
    alice.opening();
    let (status, body) = server.http(upgrade_request("/ws?username=al%20ice", "").as_bytes());
    assert_eq!(status, 400);
    assert!(body.contains("A-Z a-z 0-9 _ . -"), "{body}");
    let (status, _) =
        server.http(upgrade_request(&format!("/ws?username={}", "x".repeat(33)), "").as_bytes());
    assert_eq!(status, 400);
    let (status, body) = server.http(upgrade_request("/ws?username=alice", "").as_bytes());
    assert_eq!(status, 409);
    assert!(body.contains("already"), "{body}");
    let (status, _) = server.http(upgrade_request("/ws?username=b&room=..%2Fetc", "").as_bytes());
    assert_eq!(status, 400);
    // The name is free again once alice leaves.
    drop(alice);
    server.wait_stats("alice gone", |s| s["members"] == 0);
    let mut again = server.client("alice");
    again.opening();
}

/// The plain HTTP side of the port.
#[test]
fn plain_http_answers() {
    let server = TestServer::start();
    assert_eq!(server.get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(server.get("/nowhere").0, 404);
    assert_eq!(server.get("/ws").0, 400);
    let (status, page) = server.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<html") || page.contains("<!doctype") || page.contains("<!DOCTYPE"));
    assert_eq!(
        server
            .http(b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            .0,
        405
    );
    assert_eq!(
        server
            .http(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
            .0,
        400
    );
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(server.http(big.as_bytes()).0, 431);
    let stats = server.stats();
    for field in loopchat::stats::CONTRACT_FIELDS {
        assert!(stats[field].is_u64(), "{field}");
    }
}

/// A first frame sent right behind the request head (before the 101 was
/// read) is not lost.
#[test]
fn frame_right_behind_the_request() {
    let server = TestServer::start();
    let mut watcher = server.client("watcher");
    watcher.opening();
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut bytes = upgrade_request("/ws?username=eager", "").into_bytes();
    bytes.extend(common::client_frame(
        0x81,
        r#"{"type":"message","content":"early bird"}"#.as_bytes(),
        true,
    ));
    s.write_all(&bytes).unwrap();
    let m = watcher.wait_for("early message", |v| v["type"] == "message");
    assert_eq!(m["content"], "early bird");
    assert_eq!(m["user"], "eager");
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
}

/// A client that disconnects in the middle of a broadcast does not disturb
/// the others.
#[test]
fn disconnect_mid_broadcast() {
    let server = TestServer::start();
    let mut alice = server.client("alice");
    alice.opening();
    let mut bob = server.client("bob");
    bob.opening();
    let mut quitters: Vec<Client> = (0..20)
        .map(|i| {
            let mut c = server.client(&format!("q{i}"));
            c.opening();
            c
        })
        .collect();
    for i in 0..10 {
        alice.send(json!({"type":"message","content":format!("m{i}")}));
        if i == 3 {
            quitters.clear();
        }
    }
    for i in 0..10 {
        let m = bob.wait_for("message", |v| v["type"] == "message");
        assert_eq!(m["content"], format!("m{i}"));
    }
}

/// A client that never reads, in a busy room, does not slow anyone else:
/// the others get every message and the loop keeps serving.
#[test]
fn a_client_that_never_reads() {
    let mut config = loopchat::Config::for_tests();
    config.max_outbox_bytes = 64 * 1024;
    config.rate_per_s = 100_000;
    config.rate_burst = 100_000;
    let server = TestServer::with(config);
    let _stuck = {
        let mut c = server.client("stuck");
        c.opening();
        common::shrink_receive_buffer(c.ws.get_ref());
        c
    };
    let mut alice = server.client("alice");
    alice.opening();
    let mut bob = server.client("bob");
    bob.opening();
    // Kernel buffers absorb a few MiB before the outbox grows, so keep
    // chatting (bounded) until the server gives up on the stuck reader.
    let content = "x".repeat(4000);
    let mut sent = 0;
    while sent < 6000 {
        // Alice reads her own copies: the kernel's share of a socket is
        // capped now, so a sender that never reads would be a stalled
        // reader too.
        alice.say(&content);
        let m = bob.wait_for("message", |v| v["type"] == "message");
        assert_eq!(m["content"].as_str().map(str::len), Some(4000));
        sent += 1;
        if sent % 200 == 0 && server.stats()["slow_consumer_drops"] == 1 {
            break;
        }
    }
    let s = server.wait_stats("slow consumer dropped", |s| s["slow_consumer_drops"] == 1);
    assert_eq!(s["messages"], sent);
    // The room goes on without it.
    alice.say("still here");
    bob.wait_for("after the drop", |v| v["content"] == "still here");
}

/// 1,000 connect/disconnect cycles leave no slab entry, member, name or
/// room behind.
#[test]
fn churn_leaves_nothing_behind() {
    let server = TestServer::start();
    for i in 0..1000 {
        let mut c = server.client_with(&format!("username=c{}&room=r{}", i % 50, i % 7));
        c.expect("welcome");
        if i % 3 == 0 {
            c.say("bye");
        }
        if i % 2 == 0 {
            let _ = c.ws.close(None);
            let _ = c.close_code();
        }
    }
    let s = server.wait_stats("everything released", |s| {
        s["connections"] == 0 && s["members"] == 0 && s["rooms"] == 0
    });
    assert_eq!(s["sessions_opened"], 1000);
    let by_state = &s["connections_by_state"];
    // Only the /stats request itself is still in the slab.
    assert_eq!(by_state["open"], 0);
    assert_eq!(by_state["closing"], 0);
    assert_eq!(by_state["handshake"], 0);
}
