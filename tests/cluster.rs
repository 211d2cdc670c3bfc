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

/// Two nodes of one Redis, alice on the first and bob on the second, both
/// in `room`, once alice has seen bob arrive.
struct Pair {
    a: Bin,
    b: Bin,
    alice: Client,
    bob: Client,
}

fn pair(redis: &Redis, room: &str, deadline: Instant) -> Pair {
    let a = node(redis, &[], deadline);
    let b = node(redis, &[], deadline);
    let mut alice = member(&a, "alice", room);
    let bob = member(&b, "bob", room);
    alice.wait_for("bob's join", |v| v["type"] == "join" && v["user"] == "bob");
    Pair { a, b, alice, bob }
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

/// Three nodes, three concurrent senders: every node sees the same
/// messages in the same order, ids consecutive.
#[test]
fn three_nodes_three_senders_one_order() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let nodes: Vec<Bin> = (0..3).map(|_| node(&redis, &[], deadline)).collect();
    let mut clients: Vec<Client> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| member(n, &format!("u{i}"), "busy"))
        .collect();
    // Everyone sees the later joins before anyone sends.
    for (i, c) in clients.iter_mut().enumerate() {
        for j in (i + 1)..3 {
            let name = format!("u{j}");
            c.wait_for("later joins", |v| {
                v["type"] == "join" && v["user"] == name.as_str()
            });
        }
    }
    const EACH: usize = 40;
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                for k in 0..EACH {
                    c.send(json!({"type":"message","content":format!("{i}-{k}")}));
                }
                let mut got = Vec::new();
                while got.len() < 3 * EACH {
                    let v = c.next();
                    if v["type"] == "message" {
                        got.push((v["id"].as_u64().unwrap_or(0), v["content"].to_string()));
                    }
                }
                got
            })
        })
        .collect();
    let seqs: Vec<Vec<(u64, String)>> = handles
        .into_iter()
        .map(|h| h.join().expect("client"))
        .collect();
    assert_eq!(seqs[0], seqs[1]);
    assert_eq!(seqs[1], seqs[2]);
    let ids: Vec<u64> = seqs[0].iter().map(|(id, _)| *id).collect();
    let first = ids[0];
    assert_eq!(ids, (first..first + 3 * EACH as u64).collect::<Vec<_>>());
    // Each sender's own messages keep their sending order.
    for i in 0..3 {
        let mine: Vec<&String> = seqs[0]
            .iter()
            .map(|(_, c)| c)
            .filter(|c| c.starts_with(&format!("\"{i}-")))
            .collect();
        let want: Vec<String> = (0..EACH).map(|k| format!("\"{i}-{k}\"")).collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>());
    }
}

/// `direct` reaches a user on another node; `unknown_user` only when the
/// name is connected nowhere.
#[test]
fn direct_reaches_another_node() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let a = node(&redis, &[], deadline);
    let b = node(&redis, &[], deadline);
    let mut alice = member(&a, "alice", "one");
    let mut bob = member(&b, "bob", "two");
    alice.send(json!({"type":"direct","to":"bob","content":"psst","ref":"d1"}));
    let own = alice.wait_for("own direct", |v| v["type"] == "direct");
    assert_eq!(
        (own["ref"].as_str(), own["to"].as_str()),
        (Some("d1"), Some("bob"))
    );
    let got = bob.wait_for("the direct", |v| v["type"] == "direct");
    assert_eq!(
        (got["from"].as_str(), got["content"].as_str()),
        (Some("alice"), Some("psst"))
    );
    assert!(got.get("ref").is_none());
    alice.send(json!({"type":"direct","to":"nobody","content":"x","ref":"d2"}));
    let err = alice.expect("error");
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("unknown_user"), Some("d2"))
    );
}

/// History lives in Redis: `joined.history`, `history` and a `since`
/// resume on another node give the messages sent on the first, exactly.
#[test]
fn history_and_since_resume_on_another_node() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let a = node(&redis, &[], deadline);
    let b = node(&redis, &[], deadline);
    let mut alice = member(&a, "alice", "log");
    let ids: Vec<u64> = (0..5)
        .map(|i| alice.say(&format!("m{i}"))["id"].as_u64().expect("id"))
        .collect();
    let mut carol = Client::connect(&b.url("username=carol&room=log"));
    carol.expect("welcome");
    let joined = carol.expect("joined");
    let history: Vec<u64> = common::ids(&joined["history"]);
    assert_eq!(history, ids);
    carol.send(json!({"type":"history","room":"log","before":ids[3],"limit":2}));
    let page = carol.expect("history");
    let paged: Vec<u64> = common::ids(&page["messages"]);
    assert_eq!(paged, ids[1..3]);
    drop(carol);
    let mut again = Client::connect(&b.url(&format!("username=dave&room=log&since={}", ids[1])));
    again.expect("welcome");
    let joined = again.expect("joined");
    let resumed: Vec<u64> = common::ids(&joined["history"]);
    assert_eq!(resumed, ids[2..]);
}

/// `--retain-messages` bounds each room's history in Redis: after more
/// messages than that (one at a time and a burst that goes as one publish
/// call), the list holds the newest ones only, and every node reads them
/// at their ids.
#[test]
fn retain_messages_bounds_the_history_in_redis() {
    use loopchat::cluster::resp::Reply;
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let a = node(&redis, &["--retain-messages", "4"], deadline);
    let b = node(&redis, &["--retain-messages", "4"], deadline);
    let mut alice = member(&a, "alice", "kept");
    let mut ids: Vec<u64> = (0..3)
        .map(|i| alice.say(&format!("m{i}"))["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(redis.cmd(&["LLEN", "lc:history:kept"]), Reply::Int(3));
    let refs: Vec<String> = (0..6).map(|k| format!("burst{k}")).collect();
    for r in &refs {
        alice.send(json!({"type":"message","content":r,"ref":r}));
    }
    for r in &refs {
        let v = alice.wait_for("ack", |v| v["ref"] == r.as_str());
        ids.push(v["id"].as_u64().expect("id"));
    }
    assert_eq!(redis.cmd(&["LLEN", "lc:history:kept"]), Reply::Int(4));
    let last = ids[ids.len() - 1].to_string();
    assert_eq!(
        redis.cmd(&["GET", "lc:seq:kept"]),
        Reply::Bulk(last.into_bytes())
    );
    let mut carol = Client::connect(&b.url("username=carol&room=kept"));
    carol.expect("welcome");
    let joined = carol.expect("joined");
    assert_eq!(common::ids(&joined["history"]), ids[ids.len() - 4..]);
    let contents: Vec<&str> = joined["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents, ["burst2", "burst3", "burst4", "burst5"]);
}

/// `who` and `rooms` count members on every node.
#[test]
fn who_and_rooms_count_every_node() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let a = node(&redis, &[], deadline);
    let b = node(&redis, &[], deadline);
    let mut alice = member(&a, "alice", "shared");
    let _bob = member(&b, "bob", "shared");
    let _eve = member(&b, "eve", "other");
    alice.wait_for("bob's join", |v| v["type"] == "join" && v["user"] == "bob");
    alice.send(json!({"type":"who","room":"shared"}));
    let who = alice.expect("members");
    assert_eq!(who["users"], json!(["alice", "bob"]));
    alice.send(json!({"type":"rooms"}));
    let rooms = alice.expect("rooms");
    assert_eq!(
        rooms["rooms"],
        json!([{"room":"shared","users":2},{"room":"other","users":1}])
    );
}

/// A node that is SIGKILLed: within `--node-ttl-ms` plus a second its
/// users leave on the other nodes (one notice each) and their names are
/// free again.
#[test]
fn a_killed_nodes_users_leave_within_the_ttl() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let ttl = ["--node-ttl-ms", "1000"];
    let a = node(&redis, &ttl, deadline);
    let c = node(&redis, &ttl, deadline);
    let b = node(&redis, &ttl, deadline);
    let mut alice = member(&a, "alice", "room");
    let mut carol = member(&c, "carol", "room");
    let _bob = member(&b, "bob", "room");
    alice.wait_for("bob's join", |v| v["type"] == "join" && v["user"] == "bob");
    carol.wait_for("bob's join", |v| v["type"] == "join" && v["user"] == "bob");
    b.signal(libc::SIGKILL);
    let killed = Instant::now();
    alice.wait_for("bob's leave", |v| {
        v["type"] == "leave" && v["user"] == "bob"
    });
    carol.wait_for("bob's leave", |v| {
        v["type"] == "leave" && v["user"] == "bob"
    });
    // The contract: within the ttl plus a second (the sweep runs with each
    // survivor's refresh, every ttl/3); half a second more for a test
    // machine running every test at once.
    assert!(
        killed.elapsed() < Duration::from_millis(1000 + 1000 + 500),
        "{:?}",
        killed.elapsed()
    );
    // One notice each: the next event after a message is the message.
    alice.say("after");
    let next = carol.wait_for("not bob", |v| v["type"] != "join");
    assert_eq!(next["type"], "message", "{next}");
    let mut again = Client::connect(&a.url("username=bob&room=room"));
    again.expect("welcome");
    alice.send(json!({"type":"who","room":"room"}));
    let who = alice.expect("members");
    assert_eq!(who["users"], json!(["alice", "bob", "carol"]));
}

fn healthz(bin: &Bin) -> u16 {
    common::http(bin.addr(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").0
}

fn upgrade_status(bin: &Bin, query: &str) -> u16 {
    let req = common::upgrade_request(&format!("/ws?{query}"), "");
    common::http(bin.addr(), req.as_bytes()).0
}

/// `/stats` in cluster mode: `redis_connected` and `nodes`.
#[test]
fn stats_show_the_link_and_the_nodes() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let a = node(&redis, &[], deadline);
    let _b = node(&redis, &[], deadline);
    // The node count comes with the next liveness refresh of `a`.
    let ttl_wait = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = common::http(a.addr(), b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, 200);
        let s: Value = serde_json::from_str(&body).expect("stats json");
        assert_eq!(s["redis_connected"], 1, "{s}");
        if s["nodes"] == 2 {
            break;
        }
        assert!(Instant::now() < ttl_wait, "nodes never reached 2: {s}");
        common::remaining(deadline);
    }
    assert_eq!(healthz(&a), 200);
}

/// Redis SIGKILLed mid-chat and restarted with its AOF: sessions stay up;
/// meanwhile commands get `unavailable`, upgrades and `/healthz` 503;
/// afterwards the nodes reconnect by themselves and ids continue.
#[test]
fn redis_killed_and_restarted_with_aof() {
    let deadline = Instant::now() + TEST_TIME;
    let mut redis = Redis::start(true, deadline);
    let Pair {
        mut a,
        mut b,
        mut alice,
        mut bob,
    } = pair(&redis, "r", deadline);
    let before = alice.say("before")["id"].as_u64().expect("id");
    bob.wait_for("before", |v| v["content"] == "before");
    redis.kill();
    a.wait_line("redis lost", deadline, |l| l.contains("lost redis"));
    b.wait_line("redis lost", deadline, |l| l.contains("lost redis"));
    alice.send(json!({"type":"message","content":"during","ref":"d"}));
    let err = alice.expect("error");
    assert_eq!(
        (err["code"].as_str(), err["ref"].as_str()),
        (Some("unavailable"), Some("d"))
    );
    assert_eq!(healthz(&a), 503);
    assert_eq!(upgrade_status(&b, "username=carol"), 503);
    redis.restart(deadline);
    a.wait_line("redis back", deadline, |l| l.contains("connected to redis"));
    b.wait_line("redis back", deadline, |l| l.contains("connected to redis"));
    assert_eq!(healthz(&a), 200);
    let after = alice.say("after")["id"].as_u64().expect("id");
    assert_eq!(after, before + 1);
    let next = bob.wait_for("a message", |v| v["type"] == "message");
    assert_eq!(
        (next["content"].as_str(), next["id"].as_u64()),
        (Some("after"), Some(after))
    );
    let mut carol = Client::connect(&b.url("username=carol&room=r"));
    carol.expect("welcome");
    let joined = carol.expect("joined");
    let kept: Vec<&str> = joined["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(kept, ["before", "after"]);
}

/// Redis comes back empty (FLUSHALL): ids continue above every id served.
#[test]
fn flushall_ids_continue_above_what_was_served() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let Pair {
        a: _a,
        b: _b,
        mut alice,
        mut bob,
    } = pair(&redis, "f", deadline);
    let mut last = 0;
    for i in 0..3 {
        last = alice.say(&format!("m{i}"))["id"].as_u64().expect("id");
    }
    bob.wait_for("m2", |v| v["content"] == "m2");
    assert_eq!(
        redis.cmd(&["FLUSHALL"]),
        loopchat::cluster::resp::Reply::Simple("OK".into())
    );
    let from_b = bob.say("after-flush")["id"].as_u64().expect("id");
    assert_eq!(from_b, last + 1);
    let seen = alice.wait_for("after-flush", |v| v["type"] == "message");
    assert_eq!(seen["id"].as_u64(), Some(from_b));
    assert_eq!(alice.say("again")["id"].as_u64(), Some(from_b + 1));
}

/// Redis comes back with less than was served but not empty (an AOF that
/// lost its last second): ids continue above what was served, and the
/// history, a list indexed by id, keeps its entries at their ids, the
/// skipped ids left out.
#[test]
fn ids_jump_over_what_redis_lost_and_history_keeps_its_ids() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let Pair {
        a,
        b: _b,
        mut alice,
        mut bob,
    } = pair(&redis, "j", deadline);
    let ids: Vec<u64> = (0..3)
        .map(|i| alice.say(&format!("m{i}"))["id"].as_u64().expect("id"))
        .collect();
    bob.wait_for("m2", |v| v["content"] == "m2");
    // What an AOF missing the last two messages would hold.
    let kept = ids[0].to_string();
    redis.cmd(&["SET", "lc:seq:j", &kept]);
    redis.cmd(&["LTRIM", "lc:history:j", "0", "0"]);
    let next = bob.say("after")["id"].as_u64().expect("id");
    assert_eq!(next, ids[2] + 1);
    let mut carol = Client::connect(&a.url("username=carol&room=j"));
    carol.expect("welcome");
    let joined = carol.expect("joined");
    assert_eq!(common::ids(&joined["history"]), [ids[0], next]);
    carol.send(json!({"type":"history","room":"j","before":next,"limit":5}));
    let page = carol.expect("history");
    assert_eq!(common::ids(&page["messages"]), [ids[0]]);
    let contents: Vec<&str> = joined["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents, ["m0", "after"]);
}

/// A Redis that stops answering (`DEBUG SLEEP`) is down once the reply
/// deadline passes: `unavailable`, then recovery by itself.
#[test]
fn a_stalled_redis_is_down_then_recovers() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let mut a = node(&redis, &[], deadline);
    let mut alice = member(&a, "alice", "s");
    let port = redis.port;
    let sleeper = std::thread::spawn(move || {
        redis::command_on(port, &["DEBUG", "SLEEP", "3"]);
    });
    // The subscription's ping (every second) goes unanswered: after the
    // reply deadline the node counts Redis as down, by itself.
    a.wait_line("redis lost", deadline, |l| l.contains("lost redis"));
    alice.send(json!({"type":"message","content":"x","ref":"x"}));
    let err = alice.wait_for("message error", |v| v["type"] == "error" && v["ref"] == "x");
    assert_eq!(err["code"], "unavailable");
    alice.send(json!({"type":"who","room":"s","ref":"w"}));
    let err = alice.wait_for("who's error", |v| v["type"] == "error" && v["ref"] == "w");
    assert_eq!(err["code"], "unavailable");
    assert_eq!(healthz(&a), 503);
    sleeper.join().expect("sleeper");
    a.wait_line("redis back", deadline, |l| l.contains("connected to redis"));
    let back = alice.say("back");
    assert_eq!(back["user"], "alice");
    drop(redis);
}

/// A node started while Redis is down starts, answers 503, and joins when
/// Redis appears.
#[test]
fn a_node_started_before_redis_joins_when_it_appears() {
    let deadline = Instant::now() + TEST_TIME;
    let port = redis::free_port();
    let mut redis = Redis::stopped(port, false);
    let url = redis.url();
    let mut a = Bin::start(&["--redis", &url], None, deadline);
    assert_eq!(healthz(&a), 503);
    assert_eq!(upgrade_status(&a, "username=alice"), 503);
    redis.restart(deadline);
    a.wait_line("redis connected", deadline, |l| {
        l.contains("connected to redis")
    });
    assert_eq!(healthz(&a), 200);
    let mut alice = member(&a, "alice", "late");
    assert_eq!(alice.say("hello")["id"], 1);
}

/// The subscription link cut again and again (`CLIENT KILL TYPE pubsub`)
/// while 600 messages flow: the receiver on the other node gets every
/// acknowledged id exactly once, in order (gaps filled from history).
#[test]
fn pubsub_cut_in_a_loop_loses_and_duplicates_nothing() {
    let deadline = Instant::now() + Duration::from_secs(90);
    let redis = Redis::start(false, deadline);
    let Pair {
        a: _a,
        b: _b,
        mut alice,
        mut bob,
    } = pair(&redis, "flow", deadline);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = redis.port;
    let killer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut kills = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                redis::command_on(port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
                kills += 1;
                // Pacing of the fault, not a wait for anything.
                std::thread::sleep(Duration::from_millis(40));
            }
            kills
        })
    };
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        loop {
            let v = bob.next();
            if v["type"] == "message" {
                let done = v["content"] == "end";
                got.push(v["id"].as_u64().expect("id"));
                if done {
                    return got;
                }
            }
        }
    });
    let mut acked = Vec::new();
    let mut i = 0;
    while acked.len() < 601 {
        common::remaining(deadline);
        let content = if acked.len() == 600 {
            "end".to_string()
        } else {
            format!("k{i}")
        };
        let reference = format!("r{i}");
        i += 1;
        alice.send(json!({"type":"message","content":content,"ref":reference}));
        let v = alice.wait_for("ack or refusal", |v| v["ref"] == reference.as_str());
        if v["type"] == "message" {
            acked.push(v["id"].as_u64().expect("id"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills = killer.join().expect("killer");
    let got = receiver.join().expect("receiver");
    assert!(kills > 5, "only {kills} cuts");
    assert_eq!(got, acked, "receiver saw a different sequence");
    let mut sorted = got.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), got.len());
    assert!(got.windows(2).all(|w| w[0] < w[1]));
}

/// Bad cluster flags are a one-line usage error (exit 2), not a panic;
/// `--data-dir` and `--fsync` are accepted beside `--redis` and ignored.
#[test]
fn cluster_flags_are_checked_and_disk_flags_ignored() {
    for (flag, value) in [
        ("--redis", "http://127.0.0.1:1"),
        ("--redis", "rediss://127.0.0.1:1"),
        ("--redis", "redis://127.0.0.1"),
        ("--node-id", "has space"),
        ("--node-ttl-ms", "10"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopchat"))
            .args([flag, value])
            .output()
            .expect("run loopchat");
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(flag.trim_start_matches('-')), "{err}");
    }
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let dir = redis.dir.join("never-created");
    let dir = dir.to_string_lossy().into_owned();
    let a = node(&redis, &["--data-dir", &dir, "--fsync", "always"], deadline);
    let mut alice = member(&a, "alice", "r");
    assert_eq!(alice.say("x")["id"], 1);
    assert!(
        !std::path::Path::new(&dir).exists(),
        "the data dir was used"
    );
}

/// A node restarted with the same `--node-id` before the ttl ran out:
/// the members its previous process had leave at once (one notice each)
/// and their names are free.
#[test]
fn a_node_restarted_under_its_id_clears_its_previous_members() {
    let deadline = Instant::now() + TEST_TIME;
    let redis = Redis::start(false, deadline);
    let a = node(&redis, &[], deadline);
    let b = node(
        &redis,
        &["--node-id", "b", "--node-ttl-ms", "60000"],
        deadline,
    );
    let mut alice = member(&a, "alice", "room");
    let _bob = member(&b, "bob", "room");
    alice.wait_for("bob's join", |v| v["type"] == "join" && v["user"] == "bob");
    b.signal(libc::SIGKILL);
    drop(b);
    let b = node(
        &redis,
        &["--node-id", "b", "--node-ttl-ms", "60000"],
        deadline,
    );
    alice.wait_for("bob's leave", |v| {
        v["type"] == "leave" && v["user"] == "bob"
    });
    let mut again = Client::connect(&b.url("username=bob&room=room"));
    again.expect("welcome");
    alice.wait_for("bob's join again", |v| {
        v["type"] == "join" && v["user"] == "bob"
    });
    alice.send(json!({"type":"who","room":"room"}));
    let who = alice.expect("members");
    assert_eq!(who["users"], json!(["alice", "bob"]));
}

/// AUTH and the database come from the URL: a Redis with a password, DB 3.
#[test]
fn password_and_database_from_the_url() {
    let deadline = Instant::now() + TEST_TIME;
    let mut redis = Redis::stopped(redis::free_port(), false);
    redis.password = Some("s3cret".into());
    redis.restart(deadline);
    let url = format!("redis://:s3cret@{}:{}/3", redis::HOST, redis.port);
    let mut a = Bin::start(&["--redis", &url], None, deadline);
    a.wait_line("redis connected", deadline, |l| {
        l.contains("connected to redis")
    });
    let mut alice = member(&a, "alice", "vault");
    assert_eq!(alice.say("x")["id"], 1);
    // The keys are in database 3, behind the password.
    use loopchat::cluster::resp::Reply;
    let pipeline = redis::pipeline_on(
        redis.port,
        &[
            &["AUTH", "s3cret"],
            &["SELECT", "3"],
            &["GET", "lc:seq:vault"],
        ],
    );
    assert_eq!(pipeline.last(), Some(&Reply::Bulk(b"1".to_vec())));
    // A wrong password is a link that never gets ready: 503.
    let wrong = format!("redis://:nope@{}:{}/3", redis::HOST, redis.port);
    let b = Bin::start(&["--redis", &wrong], None, deadline);
    assert_eq!(upgrade_status(&b, "username=bob"), 503);
}

/// Redis drops a subscriber whose output buffer passes its limit
/// (`client-output-buffer-limit pubsub`): here every batch of large
/// messages does. Every acknowledged message still reaches the other
/// node's member once, in order, from the stored history.
#[test]
fn a_subscriber_dropped_for_its_output_buffer_misses_nothing() {
    let deadline = Instant::now() + Duration::from_secs(60);
    let redis = Redis::start(false, deadline);
    let Pair {
        a: _a,
        b,
        mut alice,
        mut bob,
    } = pair(&redis, "big", deadline);
    // Redis's 16 KiB reply buffer is not counted; a publication larger
    // than that is, and 1000 bytes of it is over the limit.
    let limit = redis.cmd(&[
        "CONFIG",
        "SET",
        "client-output-buffer-limit",
        "pubsub 1000 0 0",
    ]);
    assert_eq!(limit, loopchat::cluster::resp::Reply::Simple("OK".into()));
    let body = "y".repeat(4000);
    let mut acked = Vec::new();
    let mut i = 0;
    while acked.len() < 24 {
        common::remaining(deadline);
        // Eight at once, so that they leave in one batch of ~33 KB.
        let refs: Vec<String> = (0..8).map(|k| format!("b{i}-{k}")).collect();
        i += 1;
        for r in &refs {
            alice.send(json!({"type":"message","content":body,"ref":r}));
        }
        for r in &refs {
            let v = alice.wait_for("ack or refusal", |v| v["ref"] == r.as_str());
            if v["type"] == "message" {
                acked.push(v["id"].as_u64().expect("id"));
            }
        }
    }
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let v = bob.next();
        if v["type"] == "message" {
            got.push(v["id"].as_u64().expect("id"));
        }
    }
    assert_eq!(got, acked);
    let (_, body) = common::http(b.addr(), b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    let stats: Value = serde_json::from_str(&body).expect("stats");
    assert!(
        stats["redis_link_failures"].as_u64() > Some(0),
        "never dropped: {stats}"
    );
}
