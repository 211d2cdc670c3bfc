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
        batch.extend(common::client_frame(
            0x81,
            r#"{"type":"rooms"}"#.as_bytes(),
            true,
        ));
    }
    c.ws.get_mut().write_all(&batch).expect("write");
    assert_eq!(c.expect("rooms")["type"], "rooms");
    assert_eq!(c.expect("rooms")["type"], "rooms");
    assert_eq!(c.close_code(), Some(1008));
    let s = server.wait_stats("closed", |s| s["connections"] == 0);
    assert_eq!(s["flood_closes"], 1);
}

/// Bug: a new client whose `joined` backlog was larger than what fitted in
/// its outbox next to the queued 101 was dropped as a slow consumer before
/// it had read a byte: it received a bare close frame instead of the 101.
/// Answers are now capped at half the outbox bound (`more` says so).
#[test]
fn a_large_backlog_still_lets_newcomers_in() {
    let mut config = loopchat::Config::for_tests();
    config.max_outbox_bytes = 32 * 1024;
    config.rate_burst = 1000;
    let server = TestServer::with(config);
    let mut alice = server.client("alice");
    alice.opening();
    // Control characters are stored escaped (\u0001: 6 bytes each), so 12
    // messages of 2,000 of them make a ~140 KiB backlog.
    let heavy = "\u{1}".repeat(2000);
    for _ in 0..12 {
        alice.say(&heavy);
    }
    let mut bob = server.client("bob");
    let (_, joined) = bob.opening();
    let history = joined["history"].as_array().expect("history");
    assert!(
        !history.is_empty() && history.len() < 12,
        "{}",
        history.len()
    );
    assert_eq!(history.last().unwrap()["id"], 12, "the newest are kept");
    assert_eq!(joined["more"], true);
    let mut carol = server.client_with("username=carol&since=0");
    let (_, joined) = carol.opening();
    assert_eq!(
        joined["history"][0]["id"], 1,
        "a resume starts at the oldest"
    );
    assert_eq!(joined["more"], true);
    assert_eq!(server.stats()["slow_consumer_drops"], 0);
}

/// Bug: upgrade requests that loopchat's head checks let through but
/// tungstenite's handshake refuses (HTTP/1.0, a key that is not 16 bytes of
/// base64, `Upgrade: websocket, h2c`) were closed without any answer. Each
/// now gets a 400 that says why.
#[test]
fn upgrades_tungstenite_would_refuse_get_400() {
    let server = TestServer::start();
    let good = common::upgrade_request("/ws?username=x", "");
    for (raw, why) in [
        (good.replace("HTTP/1.1", "HTTP/1.0"), "HTTP/1.1"),
        (good.replace("dGhlIHNhbXBsZSBub25jZQ==", "abc"), "base64"),
        (
            good.replace("Upgrade: websocket", "Upgrade: websocket, h2c"),
            "websocket",
        ),
        (good.replace("/ws?username=x", "/ws?username=<x>"), "target"),
    ] {
        let (status, body) = server.http(raw.as_bytes());
        assert_eq!(status, 400, "{raw:?}");
        assert!(body.contains(why), "{body}");
    }
}

/// Bug: `--shutdown-grace-ms` above 2 s was ignored: the 1001 goodbyes of a
/// shutdown used the fixed 2 s close deadline, so with a grace of 5 s the
/// server dropped a client that answered after 3 s and exited at 2 s. Now
/// every goodbye of a shutdown waits for the configured grace.
///
/// The client here is a slow peer on purpose: it holds its close reply
/// for 2.5 s (a sleep that simulates that peer, not a wait for the server).
#[test]
fn shutdown_waits_for_the_configured_grace() {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut bin = common::Bin::start(
        &["--no-persist", "--shutdown-grace-ms", "6000"],
        None,
        deadline,
    );
    let mut slow = common::Client::connect(&bin.url("username=slow"));
    slow.opening();
    bin.signal(libc::SIGTERM);
    let close = slow.ws.read().expect("the server's goodbye");
    match close {
        tungstenite::Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(
        bin.child.try_wait().expect("child status").is_none(),
        "the server exited before the shutdown grace was over"
    );
    // The late reply still completes the close handshake: the server
    // removes the connection, has nothing left, and exits cleanly.
    slow.ws.close(None).expect("our close reply");
    let _ = slow.ws.flush();
    let (status, _) = bin.wait_exit(deadline);
    assert!(status.success(), "{status:?}");
}

/// Bug: deadlines of closed connections stayed in the timer heap until they
/// came due (a heartbeat 30 s out for every connection that ever came and
/// went), so the heap grew with churn, not with live connections. Now a
/// connection's one deadline is cancelled when it goes.
#[test]
fn timers_are_bounded_by_live_connections() {
    let server = TestServer::start();
    let mut stay = server.client("stays");
    stay.opening();
    for i in 0..300 {
        let mut c = server.client(&format!("churn{i}"));
        c.opening();
        let _ = c.ws.close(None);
        let _ = c.close_code();
    }
    let s = server.wait_stats("churners gone", |s| s["connections"] == 1);
    // The one session that stays, and the /stats request itself.
    assert!(s["timers"].as_u64().expect("timers") <= 2, "{s}");
}

/// Bug: the slow-consumer rule counted only loopchat's outbox, while the
/// kernel's send buffer autotuned up to megabytes: a reader that stopped
/// reading held about 1.4 MB before its outbox even met the bound. The
/// send buffer is now capped (`KERNEL_SEND_BUFFER`), so what a stalled
/// reader can hold in total is the outbox bound plus a small, fixed amount.
#[test]
fn a_stalled_reader_holds_little_beyond_its_outbox() {
    const OUTBOX: usize = 64 * 1024;
    let mut config = loopchat::Config::for_tests();
    config.max_outbox_bytes = OUTBOX;
    config.rate_per_s = 100_000;
    config.rate_burst = 100_000;
    let server = TestServer::with(config);
    let mut stalled = server.client("stalled");
    stalled.opening();
    common::shrink_receive_buffer(stalled.ws.get_ref());
    let mut sender = server.client("sender");
    sender.opening();
    let content = "x".repeat(3000);
    let mut sent = 0usize;
    // Bounded: 2,000 messages of 3 KB is 6 MB, far past any bound.
    while sent < 2000 {
        sender.say(&content);
        sent += 1;
        if sent % 8 == 0 && server.stats()["slow_consumer_drops"] == 1 {
            break;
        }
    }
    server.wait_stats("stalled reader dropped", |s| s["slow_consumer_drops"] == 1);
    let held = sent * (content.len() + 100);
    // Outbox bound + twice the capped send buffer + the 4 KiB receive
    // buffer and loopback slack; without the cap this was over 1.4 MB.
    let allowance = OUTBOX + 2 * loopchat::server::KERNEL_SEND_BUFFER + 64 * 1024;
    assert!(
        held <= allowance,
        "{sent} messages ({held} bytes) reached the stalled reader before it was dropped"
    );
}
