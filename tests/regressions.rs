//! Regression tests, one per distinct bug found outside the main suites
//! (by the Autobahn harness, reviews and load runs). Each test's doc names
//! the bug it pins down.

mod common;

use std::io::Write;

use common::TestServer;

/// Bug: bytes tungstenite writes by itself (pongs, echoes) went into the
/// outbox without the slow-consumer check, so a client that sent pings and
/// never read made the server's memory grow without bound. Now the bound
/// applies to them too: the flooder is dropped, its memory freed.
#[test]
fn ping_flood_without_reading_is_a_slow_consumer() {
    let mut config = loopchat::Config::for_tests();
    config.max_outbox_bytes = 16 * 1024;
    let server = TestServer::with(config);
    let mut flooder = server.client("flooder");
    flooder.opening();
    let sock = flooder.ws.get_mut();
    common::shrink_receive_buffer(sock);
    // 1,000 masked pings with 120-byte payloads, written again and again.
    let mut batch = Vec::new();
    for _ in 0..1000 {
        batch.extend_from_slice(&[0x89, 0x80 | 120, 0, 0, 0, 0]);
        batch.extend_from_slice(&[b'p'; 120]);
    }
    let mut writes = 0;
    // Bounded: 300 batches is ~38 MiB of pings, far beyond what kernel
    // buffers absorb; the server must give up on this reader before that.
    while writes < 300 {
        if sock.write_all(&batch).is_err() {
            break;
        }
        writes += 1;
        if writes % 20 == 0 && server.stats()["slow_consumer_drops"] == 1 {
            break;
        }
    }
    let s = server.wait_stats("flooder dropped", |s| s["slow_consumer_drops"] == 1);
    assert!(s["outbox_bytes"].as_u64().unwrap() <= 64 * 1024, "{s}");
    // Everyone else is fine.
    let mut other = server.client("other");
    other.opening();
    other.say("still serving");
}

/// Bug: a session that ended with a clean close handshake was counted
/// twice in `sessions_closed` (once when the close arrived, again when the
/// socket was reaped).
#[test]
fn a_clean_close_counts_one_session() {
    let server = TestServer::start();
    let mut c = server.client("once");
    c.opening();
    c.ws.close(None).expect("close");
    assert_eq!(c.close_code(), None, "the server echoes an empty close");
    let s = server.wait_stats("session closed", |s| s["connections"] == 0);
    assert_eq!(s["sessions_opened"], 1);
    assert_eq!(s["sessions_closed"], 1);
}

/// Bug: a flooding client was closed several times over (every refused
/// frame of one read batch asked again); the second close found the
/// connection already closing and dropped it without its close frame.
/// Now the first close stands and the client reads 1008.
#[test]
fn a_flood_in_one_write_gets_one_1008() {
    let mut config = loopchat::Config::for_tests();
    config.rate_per_s = 1;
    config.rate_burst = 2;
    let server = TestServer::with(config);
    let mut c = server.client("flood");
    c.opening();
    let mut batch = Vec::new();
    for _ in 0..10 {
        batch.extend(common::masked_text(r#"{"type":"rooms"}"#));
    }
    c.ws.get_mut().write_all(&batch).expect("write");
    assert_eq!(c.expect("rooms")["type"], "rooms");
    assert_eq!(c.expect("rooms")["type"], "rooms");
    assert_eq!(c.close_code(), Some(1008));
    let s = server.wait_stats("closed", |s| s["connections"] == 0);
    assert_eq!(s["flood_closes"], 1);
}
