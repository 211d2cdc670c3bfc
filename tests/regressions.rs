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
