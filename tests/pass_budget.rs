//! The pass budget (`--pass-budget-us`, `server.rs`): when a pass leaves
//! reads and flushes for the next one, nothing is lost, duplicated or
//! reordered. The budget here is one microsecond, so every pass that has
//! more than a few connections to flush leaves the rest for the next: a
//! join into a room of 150 makes 149 outboxes dirty in one pass, far over
//! the few flushes a pass always does (`MIN_FLUSHES`).

mod common;

use std::collections::HashSet;

use common::{Client, TestServer};
use loopchat::Config;

const MEMBERS: usize = 150;
const LEAVERS: usize = 100;
const MESSAGES: usize = 20;

fn server() -> TestServer {
    let mut config = Config::for_tests();
    config.pass_budget_us = 1;
    config.rate_per_s = 1000;
    config.rate_burst = 1000;
    TestServer::with(config)
}

/// Events of `kind` until the `count`th, skipping nothing else silently:
/// every event on the way must be one of `allowed`.
fn collect(c: &mut Client, kind: &str, count: usize, allowed: &[&str]) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let v = c.next();
        let t = v["type"].as_str().unwrap_or("").to_string();
        if t == kind {
            got.push(v);
        } else {
            assert!(allowed.contains(&t.as_str()), "unexpected event {v}");
        }
    }
    got
}

#[test]
fn a_tiny_budget_spreads_work_over_passes_and_loses_or_reorders_nothing() {
    let server = server();
    let mut members: Vec<Client> = (0..MEMBERS)
        .map(|i| {
            let mut c = server.client(&format!("m{i}"));
            c.opening();
            c
        })
        .collect();
    // Every member sees the later joiners' notices, in the order they
    // joined.
    for (i, c) in members.iter_mut().enumerate() {
        let joins = collect(c, "join", MEMBERS - 1 - i, &[]);
        let names: Vec<&str> = joins.iter().map(|v| v["user"].as_str().unwrap()).collect();
        let want: Vec<String> = (i + 1..MEMBERS).map(|j| format!("m{j}")).collect();
        assert_eq!(names, want, "join notices of m{i}");
    }
    // Messages: every member gets every one, ids consecutive, in order.
    for k in 0..MESSAGES {
        members[0].send(serde_json::json!({"type":"message","content":format!("k{k}")}));
    }
    for (i, c) in members.iter_mut().enumerate() {
        let msgs = collect(c, "message", MESSAGES, &[]);
        let contents: Vec<&str> = msgs
            .iter()
            .map(|v| v["content"].as_str().unwrap())
            .collect();
        let want: Vec<String> = (0..MESSAGES).map(|k| format!("k{k}")).collect();
        assert_eq!(contents, want, "messages of m{i}");
        let ids: Vec<u64> = msgs.iter().map(|v| v["id"].as_u64().unwrap()).collect();
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "ids of m{i}: {ids:?}"
        );
    }
    // A mass leave: the last LEAVERS members drop their sockets at once
    // (no close frame); every other member hears each leave exactly once.
    for c in members.drain(MEMBERS - LEAVERS..) {
        drop(c);
    }
    for (i, c) in members.iter_mut().enumerate() {
        let leaves = collect(c, "leave", LEAVERS, &[]);
        let names: HashSet<String> = leaves
            .iter()
            .map(|v| v["user"].as_str().unwrap().to_string())
            .collect();
        let want: HashSet<String> = (MEMBERS - LEAVERS..MEMBERS)
            .map(|j| format!("m{j}"))
            .collect();
        assert_eq!(names.len(), LEAVERS, "a leave notice twice for m{i}");
        assert_eq!(names, want, "leave notices of m{i}");
    }
    // And the room is still fully usable afterwards.
    let own = members[1].say("after");
    let last = members[0].wait_for("after", |v| v["content"] == "after");
    assert_eq!(own["id"], last["id"]);
    let stats = server.stats();
    assert!(
        stats["loop_deferred"].as_u64().unwrap() > 0,
        "the budget never left work for a later pass: {stats}"
    );
    assert_eq!(stats["connections"], (MEMBERS - LEAVERS) as u64);
}
