//! Output held under saturation (`server::Output`): a pass that queues at
//! least 1,024 frames, and at least 16 per connection with output, does not
//! flush; the next pass flushes everything. Here one sender puts 64
//! messages into a single TCP segment, so one read hands the dispatcher all
//! of them and one pass queues 64 frames for each of 21 members (1,344).
//! The hold must end by itself (the loop polls again within 1 ms) and
//! every member must get every message, in order, once; a lone message
//! into the same room must not hold.

mod common;

use std::io::Write;

use common::{client_frame, raw_session, Client, TestServer};
use loopchat::Config;

const MEMBERS: usize = 20;
const BURST: usize = 64;

fn held_passes(server: &TestServer) -> u64 {
    server.stats()["held_passes"]
        .as_u64()
        .expect("/stats has held_passes")
}

/// The next `count` messages `c` receives, skipping join notices only.
fn messages(c: &mut Client, count: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < count {
        let v = c.next();
        match v["type"].as_str() {
            Some("message") => got.push(v["content"].as_str().unwrap_or("").to_string()),
            Some("join") => {}
            _ => panic!("unexpected event {v}"),
        }
    }
    got
}

#[test]
fn a_burst_holds_output_one_pass_and_everyone_gets_everything_in_order() {
    let mut config = Config::for_tests();
    config.rate_per_s = 10_000;
    config.rate_burst = 10_000;
    let server = TestServer::with(config);
    let mut members: Vec<Client> = (0..MEMBERS)
        .map(|i| {
            let mut c = server.client(&format!("m{i}"));
            c.opening();
            c
        })
        .collect();
    let mut sender = raw_session(server.addr, "/ws?username=sender");

    // A lone message: 21 frames in its pass, far under the threshold.
    let before = held_passes(&server);
    let lone = serde_json::json!({"type": "message", "content": "lone"}).to_string();
    sender
        .write_all(&client_frame(0x81, lone.as_bytes(), true))
        .expect("send lone message");
    for c in members.iter_mut() {
        assert_eq!(messages(c, 1), ["lone"]);
    }
    assert_eq!(held_passes(&server), before, "a lone message was held");

    // The burst, in one write: one read, one pass, 64 frames per member.
    let mut burst = Vec::new();
    for k in 0..BURST {
        let text = serde_json::json!({"type": "message", "content": format!("k{k}")});
        burst.extend(client_frame(0x81, text.to_string().as_bytes(), true));
    }
    sender.write_all(&burst).expect("send burst");
    let want: Vec<String> = (0..BURST).map(|k| format!("k{k}")).collect();
    for (i, c) in members.iter_mut().enumerate() {
        assert_eq!(messages(c, BURST), want, "messages of m{i}");
    }
    assert!(
        held_passes(&server) > before,
        "the burst's pass did not hold its output"
    );
}
