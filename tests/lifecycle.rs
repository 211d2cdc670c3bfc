//! A connection's life as the state machine in `src/conn.rs` draws it:
//! the upgrade completes in the pass that reads the last byte of the head
//! (there is no suspended-handshake phase), and each way out ends in
//! `Gone` with nothing left behind.

mod common;

use std::io::{Read, Write};

use common::{client_frame, raw_connect, upgrade_request, TestServer};

/// The request head arrives in three reads, and a first frame is glued to
/// its last piece. The server keeps the pieces in `Head`, completes the
/// handshake in the pass that reads the final piece, and replays the glued
/// frame into the new session without waiting for another readiness event:
/// the client sends nothing after that last write, yet its message is
/// broadcast.
#[test]
fn upgrade_completes_in_the_pass_that_reads_the_head() {
    let server = TestServer::start();
    let mut watcher = server.client("watcher");
    watcher.opening();
    let request = upgrade_request("/ws?username=piecemeal", "").into_bytes();
    let (one, rest) = request.split_at(10);
    let (two, three) = rest.split_at(rest.len() / 2);
    let mut s = raw_connect(server.addr);
    let mut sent = 0u64;
    let base = server.stats()["bytes_in"].as_u64().expect("bytes_in");
    for piece in [one, two] {
        s.write_all(piece).expect("write a piece");
        sent += piece.len() as u64;
        // Awaited, not slept: the server has read this piece when its
        // byte counter shows it (the /stats requests add their own bytes,
        // so at least).
        let s = server.wait_stats("piece read", |s| {
            s["bytes_in"].as_u64().is_some_and(|n| n >= base + sent)
        });
        assert_eq!(s["connections_by_state"]["head"].as_u64(), Some(2), "{s}");
        assert_eq!(s["connections_by_state"]["open"], 1, "{s}");
    }
    let mut last = three.to_vec();
    last.extend(client_frame(
        0x81,
        br#"{"type":"message","content":"glued"}"#,
        true,
    ));
    s.write_all(&last).expect("write the last piece");
    let m = watcher.wait_for("the glued message", |v| v["type"] == "message");
    assert_eq!(
        (m["user"].as_str(), m["content"].as_str()),
        (Some("piecemeal"), Some("glued"))
    );
    let mut status = [0u8; 12];
    s.read_exact(&mut status).expect("the 101");
    assert_eq!(&status, b"HTTP/1.1 101");
    let st = server.stats();
    assert_eq!(st["connections_by_state"]["open"], 2, "{st}");
    assert_eq!(st["connections_by_state"]["handshake"], 0, "{st}");
}

/// Every way out ends with the slot freed: a clean close from the client
/// (`Flushing`), a goodbye from the server the client answers (`Closing`),
/// a protocol error (`Linger`), a reset (`Gone` at once) and a plain HTTP
/// answer (`Linger`). Afterwards no connection, member, room or deadline
/// is left but the `/stats` request's own.
#[test]
fn every_way_out_frees_the_slot() {
    let mut config = loopchat::Config::for_tests();
    config.rate_per_s = 1;
    config.rate_burst = 1;
    let server = TestServer::with(config);

    // Client closes first.
    let mut polite = server.client("polite");
    polite.opening();
    polite.ws.close(None).expect("close");
    assert_eq!(polite.close_code(), None);

    // Server closes first (a flood gets 1008), the client answers.
    let mut flooder = server.client("flooder");
    flooder.opening();
    for _ in 0..20 {
        flooder.send(serde_json::json!({"type": "rooms"}));
    }
    assert_eq!(flooder.close_code(), Some(1008));
    // tungstenite queued our reply to the server's close; send it.
    let _ = flooder.ws.flush();

    // A protocol error: an unmasked client frame gets 1002.
    let mut rude = common::raw_session(server.addr, "/ws?username=rude");
    rude.write_all(&client_frame(0x81, b"{}", false))
        .expect("unmasked frame");
    let mut seen = Vec::new();
    let _ = rude.read_to_end(&mut seen);
    assert!(
        seen.windows(2).any(|w| w == [0x03, 0xea]),
        "a close frame with 1002 reached the client"
    );
    drop(rude);

    // A reset in the middle of a session.
    let reset = common::raw_session(server.addr, "/ws?username=reset");
    drop(reset);

    // A plain HTTP answer.
    assert_eq!(server.get("/nowhere").0, 404);

    const LEAVING: [&str; 5] = ["open", "closing", "flushing", "linger", "gone"];
    let s = server.wait_stats("all gone", |s| {
        s["members"] == 0
            && s["rooms"] == 0
            && LEAVING.iter().all(|p| s["connections_by_state"][p] == 0)
    });
    // Only the /stats request itself is left, still reading its head.
    assert_eq!(s["connections_by_state"]["head"], 1, "{s}");
    assert_eq!(s["sessions_opened"], s["sessions_closed"], "{s}");
    // The /stats request itself is the one connection left, with its one
    // deadline.
    assert!(s["timers"].as_u64().expect("timers") <= 1, "{s}");
}
