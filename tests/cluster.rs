//! Cluster mode (PROTOCOL §7) against real `redis-server` processes: each
//! test starts its own Redis on a free port in a temp dir and its own
//! loopchat nodes (the binary), and ends them by pid. Every wait has a
//! deadline; nodes are awaited by their "connected to redis" log line.

mod common;
#[path = "common/redis.rs"]
mod redis;

use std::time::{Duration, Instant};

use common::{Bin, Client};
use redis::Redis;
use serde_json::{json, Value};

const TEST_TIME: Duration = Duration::from_secs(40);

/// A node on `redis`, awaited until both its links are up.
fn node(redis: &Redis, extra: &[&str], deadline: Instant) -> Bin {
    let url = redis.url();
    let mut args = vec![
        "--redis",
        url.as_str(),
        "--rate-per-s",
        "10000",
        "--rate-burst",
        "10000",
    ];
    args.extend_from_slice(extra);
    let mut bin = Bin::start(&args, None, deadline);
    bin.wait_line("redis connected", deadline, |l| {
        l.contains("connected to redis")
    });
    bin
}

/// Join `user` on `bin` in `room` and read the opening sequence.
fn member(bin: &Bin, user: &str, room: &str) -> Client {
    let mut c = Client::connect(&bin.url(&format!("username={user}&room={room}")));
    c.expect("welcome");
    c.expect("joined");
    c.wait_for("own join", |v| v["type"] == "join" && v["user"] == user);
    c
}

fn messages_until(c: &mut Client, content: &str) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = c.next();
        if v["type"] == "message" {
            let last = v["content"] == content;
            got.push(v);
            if last {
                return got;
            }
        }
    }
}

/// Two nodes serve one room: a message sent on either reaches both, with
/// one id sequence; `ref` only on the sender's copy.
#[test]
fn two_nodes_chat_in_one_room_with_one_id_sequence() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let a = node(&redis, &["--node-id", "a"], deadline);
    let b = node(&redis, &["--node-id", "b"], deadline);
    let mut alice = member(&a, "alice", "lobby");
    let mut bob = member(&b, "bob", "lobby");
    alice.wait_for("bob's join", |v| v["type"] == "join" && v["user"] == "bob");
    alice.send(json!({"type":"message","content":"hi","ref":"r1"}));
    let own = alice.wait_for("own copy", |v| v["type"] == "message");
    assert_eq!(own["ref"], "r1");
    let seen = bob.wait_for("alice's message", |v| v["type"] == "message");
    assert_eq!(seen["content"], "hi");
    assert_eq!(seen["id"], own["id"]);
    assert!(seen.get("ref").is_none(), "{seen}");
    bob.send(json!({"type":"message","content":"yo"}));
    let at_a = alice.wait_for("bob's message", |v| v["type"] == "message");
    let at_b = bob.wait_for("own copy", |v| v["type"] == "message");
    assert_eq!(at_a, at_b);
    assert_eq!(at_a["id"].as_u64(), own["id"].as_u64().map(|i| i + 1));
    assert_eq!(at_a["user"], "bob");
}

/// A username is unique across the cluster: 409 on the other node, and
/// free again once its holder left.
#[test]
fn a_name_held_on_one_node_is_409_on_another() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let a = node(&redis, &[], deadline);
    let b = node(&redis, &[], deadline);
    let alice = member(&a, "alice", "default");
    let (status, body) = common::http(
        b.addr(),
        common::upgrade_request("/ws?username=alice", "").as_bytes(),
    );
    assert_eq!(status, 409, "{body}");
    drop(alice);
    // The release travels through Redis: retry until the name is free,
    // bounded by the deadline (each try is a real upgrade).
    loop {
        common::remaining(deadline);
        if let Ok(mut c) = Client::try_connect(&b.url("username=alice")) {
            c.expect("welcome");
            break;
        }
    }
    // Guests get distinct names on every node.
    let mut g1 = Client::connect(&a.url(""));
    let mut g2 = Client::connect(&b.url(""));
    let n1 = g1.expect("welcome")["user"].clone();
    let n2 = g2.expect("welcome")["user"].clone();
    assert_ne!(n1, n2);
}
