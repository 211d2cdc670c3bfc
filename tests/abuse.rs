//! Staying up under load, faults and abuse: every defence the contract
//! promises (docs/protocol.md: endpoints, errors and close codes), each shown against a real server.
//!
//! Most tests run the server in this process ([`TestServer`]); the ones
//! about a process (file-descriptor exhaustion, signals, exit codes, the
//! debug log that names slab slots) run the built `loopchat` binary through
//! the [`Bin`] guard, which kills and reaps it when dropped, even after a
//! failed assertion.
//!
//! Every wait has a deadline: socket read timeouts, channel timeouts, or a
//! loop that asserts on elapsed time. Nothing sleeps to wait for something
//! that can be awaited; the two fixed intervals (the CPU observation window
//! and the spacing of two handshake deadlines) say why at the spot.

mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{
    client_frame, raw_connect, raw_session, read_frame, read_head, remaining, upgrade_request, Bin,
    Client, TestServer, DEADLINE,
};
use loopchat::Config;
use serde_json::{json, Value};
use tungstenite::Message;

// ---- helpers: raw sockets and frames -----------------------------------

/// Read server frames until a text frame; parse it as a JSON event.
fn read_event(s: &mut TcpStream) -> Value {
    loop {
        let (b0, payload) = read_frame(s).expect("read frame");
        if b0 & 0x0f == 0x1 {
            return serde_json::from_slice(&payload).expect("json event");
        }
    }
}

/// True for the ways a dropped connection shows up on a read (EOF or a
/// reset), as opposed to a read that merely timed out.
fn is_dropped(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// How a tungstenite client saw its connection end.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Close(Option<u16>),
    Dropped(String),
}

/// Read (skipping events) until the connection ends, however it ends.
fn ending(c: &mut Client) -> Ending {
    loop {
        match c.ws.read() {
            Ok(Message::Close(frame)) => return Ending::Close(frame.map(|f| f.code.into())),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("server did not end the connection within the deadline")
            }
            Err(e) => return Ending::Dropped(e.to_string()),
        }
    }
}

/// Raw HTTP exchange that keeps the whole answer (head included).
fn http_raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = raw_connect(addr);
    // The server may answer (and stop reading) before a long request is
    // all written; the answer is what matters.
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

fn has_header(answer: &str, name: &str) -> bool {
    let head = answer.split("\r\n\r\n").next().unwrap_or("");
    head.lines().skip(1).any(|l| {
        l.split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
    })
}

/// A config for tests that send many commands quickly.
fn unlimited_rate() -> Config {
    let mut c = Config::for_tests();
    c.rate_per_s = 100_000;
    c.rate_burst = 100_000;
    c
}

// ---- helpers: the binary -----------------------------------------------

/// A temporary file, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str, text: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("loopchat-abuse-{tag}-{}", std::process::id()));
        std::fs::write(&path, text).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---- handshake timeout ---------------------------------------------------

/// A client that sends half a request head and stalls, and one that
/// trickles a byte at a time (slowloris), are both dropped at the handshake
/// deadline; two other clients keep chatting the whole time.
#[test]
fn handshake_timeout_drops_stalled_heads() {
    let mut config = unlimited_rate();
    config.handshake_timeout_ms = 400;
    let server = TestServer::with(config);
    let mut alice = server.client("alice");
    alice.opening();
    let mut bob = server.client("bob");
    bob.opening();
    alice.expect("join");

    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    let mut stalled = raw_connect(server.addr);
    stalled
        .write_all(b"GET /ws?username=stall HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .expect("half a head");
    let mut trickler = raw_connect(server.addr);
    trickler
        .write_all(b"GET /ws?username=drip HTTP/1.1\r\n")
        .expect("request line");
    for (name, mut sock) in [
        ("stalled", stalled),
        ("trickler", trickler.try_clone().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let r = sock.read(&mut buf).map_err(|e| e.kind());
            let _ = tx.send((name, r, started.elapsed()));
        });
    }
    drop(tx);
    // The trickler: one header byte every 50 ms until the server hangs up.
    // (The sleep paces the sending; it waits for nothing.)
    std::thread::spawn(move || {
        for b in b"X-Slow: ".iter().cycle().take(200) {
            if trickler.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });

    let mut exchanges = 0;
    let mut dropped = Vec::new();
    while dropped.len() < 2 {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(d) => dropped.push(d),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => panic!("reader thread died"),
        }
        let text = format!("while stalled {exchanges}");
        alice.say(&text);
        bob.wait_for("alice's message", |v| v["content"] == text.as_str());
        exchanges += 1;
        assert!(
            started.elapsed() < DEADLINE,
            "stalled clients never dropped"
        );
    }
    for (name, result, after) in dropped {
        assert!(
            matches!(result, Ok(0)) || matches!(result, Err(k) if is_dropped(k)),
            "{name}: expected EOF, got {result:?}"
        );
        assert!(
            after >= Duration::from_millis(390),
            "{name} dropped before its deadline ({after:?})"
        );
        assert!(
            after < Duration::from_millis(3000),
            "{name} dropped far too late ({after:?})"
        );
    }
    assert!(exchanges >= 2, "chat went on while the heads stalled");
    let s = server.stats();
    assert_eq!(s["rejected"]["handshake_timeout"], 2, "{s}");
    assert_eq!(s["connections"], 2);
    bob.say("after");
    alice.wait_for("bob's message", |v| v["content"] == "after");
}

// ---- heartbeats -----------------------------------------------------------

/// A client that upgraded by hand but never answers pings is pinged, then
/// dropped, and its room is told it left; a tungstenite client that keeps
/// reading (and so answers every ping) stays through several intervals.
#[test]
fn heartbeat_drops_the_silent_and_keeps_the_ponging() {
    let mut config = Config::for_tests();
    config.heartbeat_ms = 300;
    let server = TestServer::with(config);
    let mut watcher = server.client("watcher");
    watcher.opening();

    let started = Instant::now();
    let mut mute = raw_session(server.addr, "/ws?username=mute");
    let silent = std::thread::spawn(move || {
        let mut pinged_at = None;
        loop {
            match read_frame(&mut mute) {
                Ok((b0, _)) if b0 & 0x0f == 0x9 => {
                    pinged_at.get_or_insert(started.elapsed());
                }
                Ok(_) => continue,
                Err(e) => return (pinged_at, e.kind(), started.elapsed()),
            }
        }
    });

    // The watcher reads (tungstenite answers each ping on its next read)
    // until it has been pinged three times and has seen mute leave.
    let mut pings = 0;
    let mut mute_left = false;
    while pings < 3 || !mute_left {
        assert!(
            started.elapsed() < DEADLINE,
            "pings {pings}, left {mute_left}"
        );
        match watcher.ws.read().expect("watcher stays connected") {
            Message::Ping(_) => pings += 1,
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("json");
                if v["type"] == "leave" && v["user"] == "mute" {
                    mute_left = true;
                }
            }
            Message::Close(c) => panic!("watcher closed: {c:?}"),
            _ => {}
        }
    }
    let (pinged_at, end, dropped_at) = silent.join().expect("silent reader");
    let pinged_at = pinged_at.expect("the silent client was pinged first");
    assert!(is_dropped(end), "silent client: expected EOF, got {end:?}");
    assert!(
        pinged_at >= Duration::from_millis(290),
        "pinged early: {pinged_at:?}"
    );
    assert!(
        dropped_at >= pinged_at + Duration::from_millis(250),
        "dropped without waiting a whole interval for the pong ({pinged_at:?} → {dropped_at:?})"
    );
    watcher.say("still here");
    let s = server.stats();
    assert_eq!(s["heartbeat_timeouts"], 1, "{s}");
    assert_eq!(s["connections"], 1, "{s}");
}

// ---- slow consumer --------------------------------------------------------

fn set_receive_buffer(c: &Client, size: libc::c_int) {
    use std::os::fd::AsRawFd;
    let fd = c.ws.get_ref().as_raw_fd();
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The reader that fell behind, once dropped (and counted in
/// `slow_consumer_drops`), finds close 1008 at the end of what it had been
/// sent, or the connection simply ends if the close frame could not reach
/// its socket before the close deadline.
#[test]
fn slow_consumer_gets_1008() {
    let mut config = unlimited_rate();
    config.max_outbox_bytes = 64 * 1024;
    let server = TestServer::with(config);
    let mut stuck = server.client("stuck");
    stuck.opening();
    set_receive_buffer(&stuck, 4096);
    let mut alice = server.client("alice");
    alice.opening();
    let content = "x".repeat(4000);
    let mut sent = 0;
    loop {
        alice.send(json!({"type":"message","content":content}));
        alice.wait_for("own copy", |v| v["type"] == "message");
        sent += 1;
        if sent % 100 == 0 && server.stats()["slow_consumer_drops"] == 1 {
            break;
        }
        assert!(sent < 6000, "stuck reader never dropped");
    }
    // Read everything the server had sent before it gave up. The receive
    // buffer grows back first: with a 4 KiB window that has been shut for
    // a while, the kernel would trickle the backlog through zero-window
    // probes, slower than the server's close deadline.
    set_receive_buffer(&stuck, 4 << 20);
    let mut messages = 0;
    let end = loop {
        match stuck.ws.read() {
            Ok(Message::Text(_)) => messages += 1,
            Ok(Message::Close(frame)) => break Ending::Close(frame.map(|f| f.code.into())),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("stuck reader: nothing ended the connection")
            }
            Err(e) => break Ending::Dropped(e.to_string()),
        }
    };
    eprintln!("stuck reader read {messages} events, then {end:?}");
    assert!(
        end == Ending::Close(Some(1008)) || matches!(end, Ending::Dropped(_)),
        "slow consumer: expected close 1008 or EOF, got {end:?}"
    );
    assert!(messages < sent + 10, "it cannot have read everything");
    let s = server.wait_stats("stuck gone", |s| s["connections"] == 1);
    assert_eq!(s["slow_consumer_drops"], 1);
}

// ---- frames that break the rules ------------------------------------------

/// A frame larger than `max_message_bytes` closes with 1009: announced in
/// one header, spread over fragments, or sent in full.
#[test]
fn oversized_messages_close_1009() {
    let mut config = Config::for_tests();
    config.max_message_bytes = 1024;
    // Each abusive write fits one server read, so nothing is left unread
    // when the server closes.
    config.read_buffer_bytes = 8192;
    let server = TestServer::with(config);
    let mut watcher = server.client("watcher");
    watcher.opening();

    // One header announcing 2,000 bytes, followed by a little payload.
    let mut c = server.client("big");
    c.opening();
    let frame = client_frame(0x81, &[b'a'; 2000], true);
    c.ws.get_mut().write_all(&frame[..200]).unwrap();
    assert_eq!(c.close_code(), Some(1009), "announced frame over the limit");

    // Three fragments of 500 bytes: each frame is fine, the message is not.
    let mut c = server.client("fragments");
    c.opening();
    let mut bytes = client_frame(0x01, &[b'a'; 500], true);
    bytes.extend(client_frame(0x00, &[b'a'; 500], true));
    bytes.extend(client_frame(0x80, &[b'a'; 500], true));
    c.ws.get_mut().write_all(&bytes).unwrap();
    assert_eq!(
        c.close_code(),
        Some(1009),
        "fragmented message over the limit"
    );

    // Just under the limit is a normal (if long) message: too_long, open.
    let mut c = server.client("fits");
    c.opening();
    let text = json!({"type":"message","content":"a".repeat(900)}).to_string();
    c.send_text(&text);
    let echo = c.wait_for("own message", |v| v["type"] == "message");
    assert_eq!(echo["content"].as_str().map(str::len), Some(900));

    let s = server.stats();
    assert_eq!(s["protocol_closes"], 2, "{s}");
    watcher.say("unharmed");
}

/// The default limit (64 KiB), with an abuser that sends the whole
/// oversized frame at once: the server stops reading at the header, and the
/// client must still be told 1009 rather than reset.
#[test]
fn oversized_frame_sent_in_full_closes_1009() {
    let server = TestServer::start();
    let mut c = server.client("huge");
    c.opening();
    let frame = client_frame(0x82, &vec![7u8; 100 * 1024], true);
    // The server may close while this is still being written.
    let _ = c.ws.get_mut().write_all(&frame);
    assert_eq!(ending(&mut c), Ending::Close(Some(1009)));
    server.wait_stats("closed", |s| s["connections"] == 0);
}

/// Invalid UTF-8 in a text frame closes with 1007.
#[test]
fn invalid_utf8_closes_1007() {
    let server = TestServer::start();
    let mut watcher = server.client("watcher");
    watcher.opening();
    let mut c = server.client("mangled");
    c.opening();
    watcher.expect("join");
    let frame = client_frame(
        0x81,
        b"{\"type\":\"message\",\"content\":\"\xc3\x28\"}",
        true,
    );
    c.ws.get_mut().write_all(&frame).unwrap();
    assert_eq!(c.close_code(), Some(1007));
    let leave = watcher.expect("leave");
    assert_eq!(leave["user"], "mangled");
    watcher.say("unharmed");
}

/// Framing violations close with 1002: an unmasked client frame, reserved
/// bits set, an unknown opcode, a fragmented control frame.
#[test]
fn framing_violations_close_1002() {
    let server = TestServer::start();
    let mut watcher = server.client("watcher");
    watcher.opening();
    let hello = br#"{"type":"message","content":"hi"}"#;
    let cases: [(&str, Vec<u8>); 4] = [
        ("unmasked", client_frame(0x81, hello, false)),
        ("rsv1", client_frame(0xC1, hello, true)),
        ("rsv3", client_frame(0x91, hello, true)),
        ("opcode3", client_frame(0x83, hello, true)),
    ];
    for (name, bytes) in &cases {
        let mut c = server.client(name);
        c.opening();
        c.ws.get_mut().write_all(bytes).unwrap();
        assert_eq!(c.close_code(), Some(1002), "{name}");
    }
    let mut c = server.client("fragping");
    c.opening();
    c.ws.get_mut()
        .write_all(&client_frame(0x09, b"x", true))
        .unwrap();
    assert_eq!(c.close_code(), Some(1002), "fragmented ping");
    let s = server.wait_stats("all closed", |s| s["connections"] == 1);
    assert_eq!(s["protocol_closes"], 5, "{s}");
    watcher.say("unharmed");
}

// ---- request heads ----------------------------------------------------------

/// Heads over 8 KiB get 431, even when the client keeps streaming; too many
/// headers get 431; bytes that are not HTTP get 400. The loop keeps serving.
#[test]
fn bad_request_heads_get_431_and_400() {
    let server = TestServer::start();
    let mut alice = server.client("alice");
    alice.opening();

    // A head that never ends: 64 KiB of one header, no blank line.
    let mut endless = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    endless.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let answer = http_raw(server.addr, &endless);
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert!(answer.contains("8192"), "body names the limit: {answer}");

    // An upgrade request, complete, just over the limit.
    let big = upgrade_request(
        "/ws?username=big",
        &format!("X-Pad: {}\r\n", "b".repeat(8 * 1024)),
    );
    assert_eq!(status_of(&http_raw(server.addr, big.as_bytes())), 431);

    // A small head with too many headers.
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(status_of(&http_raw(server.addr, req.as_bytes())), 431);

    for (what, bytes) in [
        ("zeros", &b"\x00\x00\x00\x00\x00\x00\x00\x00\r\n\r\n"[..]),
        ("ssh", b"SSH-2.0-OpenSSH_9.6\r\n"),
        ("tls", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"),
        ("bad header", b"GET / HTTP/1.1\r\nNo Colon Here\r\n\r\n"),
        ("smtp", b"HELO example.org\r\n\r\n"),
    ] {
        let answer = http_raw(server.addr, bytes);
        assert_eq!(status_of(&answer), 400, "{what}: {answer}");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert!(!body.trim().is_empty(), "{what}: error answers say why");
    }
    let s = server.stats();
    assert_eq!(s["rejected"]["head_too_large"], 3, "{s}");
    assert_eq!(s["rejected"]["bad_request"], 5, "{s}");
    alice.say("still serving");
    assert_eq!(server.get("/healthz").0, 200);
}

// ---- rate limit --------------------------------------------------------------

/// A burst over `rate_burst` gets `rate_limited` errors and the connection
/// stays; a client that keeps flooding after them is closed with 1008; the
/// room is not disturbed.
#[test]
fn rate_limit_then_flood_close() {
    let mut config = Config::for_tests();
    config.rate_per_s = 1;
    config.rate_burst = 5;
    let server = TestServer::with(config);
    let mut watcher = server.client("watcher");
    watcher.opening();

    let mut burst = server.client("burst");
    burst.opening();
    for i in 0..8 {
        burst.send(json!({"type":"message","content":format!("b{i}")}));
    }
    let (mut accepted, mut limited) = (0, 0);
    while accepted + limited < 8 {
        let v = burst.next();
        match v["type"].as_str() {
            Some("message") => accepted += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited += 1;
            }
            _ => {}
        }
    }
    assert_eq!((accepted, limited), (5, 3), "burst of 5, then refusals");

    let mut flood = server.client("flood");
    flood.opening();
    let mut bytes = Vec::new();
    for i in 0..40 {
        let text = json!({"type":"message","content":format!("f{i}")}).to_string();
        bytes.extend(client_frame(0x81, text.as_bytes(), true));
    }
    flood.ws.get_mut().write_all(&bytes).unwrap();
    let mut errors = 0;
    let code = loop {
        match flood.ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "error" && v["code"] == "rate_limited" {
                    errors += 1;
                }
            }
            Ok(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(e) => panic!("flooder: expected close 1008, read failed: {e}"),
        }
    };
    assert_eq!(code, Some(1008));
    assert!(errors >= 1, "rate_limited errors came before the close");

    let s = server.wait_stats("flooder gone", |s| s["connections"] == 2);
    assert_eq!(s["flood_closes"], 1, "one close, counted once: {s}");
    // The burst client is still connected: it gets the flooder's leave.
    burst.wait_for("flood left", |v| {
        v["type"] == "leave" && v["user"] == "flood"
    });
    watcher.say("unharmed");
}

/// Contract §3: `ref` is echoed "on the resulting event or error", so a
/// `rate_limited` refusal carries the refused command's `ref`.
#[test]
fn rate_limited_error_echoes_ref() {
    let mut config = Config::for_tests();
    config.rate_per_s = 1;
    config.rate_burst = 2;
    let server = TestServer::with(config);
    let mut c = server.client("refs");
    c.opening();
    for i in 0..3 {
        c.send(json!({"type":"message","content":"x","ref":format!("r{i}")}));
    }
    let err = c.expect("error");
    assert_eq!(err["code"], "rate_limited");
    assert_eq!(
        err["ref"], "r2",
        "rate_limited error without its ref: {err}"
    );
}

// ---- connection limits -----------------------------------------------------------

/// Over `max_connections`, a new connection is answered 503 with
/// `Retry-After` and closed, whether or not it sent anything; the limit
/// frees up when a client leaves.
#[test]
fn over_the_connection_limit_gets_503() {
    let mut config = Config::for_tests();
    config.max_connections = Some(3);
    let server = TestServer::with(config);
    let mut clients: Vec<Client> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let mut c = server.client(name);
            c.opening();
            c
        })
        .collect();

    let answer = http_raw(
        server.addr,
        upgrade_request("/ws?username=d", "").as_bytes(),
    );
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(has_header(&answer, "Retry-After"), "{answer}");

    // A connection that says nothing is answered at once, then closed.
    let mut silent = raw_connect(server.addr);
    let mut answer = Vec::new();
    silent.read_to_end(&mut answer).expect("answer, then EOF");
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(has_header(&answer, "Retry-After"));
    drop(silent);

    // One client leaves cleanly; a newcomer gets in. The 503'd sockets may
    // hold their slots a moment longer (until the server reads their EOF),
    // so a 503 here is retried, bounded by the deadline.
    let mut c = clients.pop().unwrap();
    c.ws.close(None).unwrap();
    assert_eq!(c.close_code(), None);
    let start = Instant::now();
    let mut d = loop {
        match Client::try_connect(&server.url("username=d")) {
            Ok(c) => break c,
            Err(tungstenite::Error::Http(r)) if r.status() == 503 => {
                assert!(start.elapsed() < DEADLINE, "the limit never freed up");
                std::thread::yield_now();
            }
            Err(e) => panic!("newcomer: {e}"),
        }
    };
    d.opening();
    d.say("made it");
    drop(clients);
    let s = stats_when_free(&server);
    assert!(s["rejected"]["over_limit"].as_u64().unwrap() >= 2, "{s}");
}

/// `/stats`, retried while the server is full (a 503).
fn stats_when_free(server: &TestServer) -> Value {
    let start = Instant::now();
    loop {
        let (status, body) = server.get("/stats");
        if status == 200 {
            return serde_json::from_str(&body).expect("stats json");
        }
        assert_eq!(status, 503);
        assert!(start.elapsed() < DEADLINE, "stats never answered");
        std::thread::yield_now();
    }
}

/// Out of file descriptors in `accept` (EMFILE): the server does not spin,
/// keeps its connections, and accepts again once some close.
#[test]
fn fd_exhaustion_does_not_spin_and_recovers() {
    let deadline = Instant::now() + Duration::from_secs(30);
    let bin = Bin::start(
        &[
            "--no-persist",
            "--max-connections",
            "1000",
            "--log-level",
            "info",
        ],
        Some(64),
        deadline,
    );
    // Open sessions until the server stops answering (it logs when accept
    // first fails for lack of descriptors).
    let mut open = Vec::new();
    let mut exhausted = false;
    let mut pending = None;
    for i in 0..100 {
        let mut s = raw_connect(bin.addr());
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        s.write_all(upgrade_request(&format!("/ws?username=u{i}&room=r{i}"), "").as_bytes())
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                Ok(_) => panic!("u{i}: closed during the handshake"),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // Unanswered so far: is the server out of descriptors?
                    if let Some(line) = bin.try_line(Duration::ZERO) {
                        if line.contains("accept") && line.contains("pausing accepts") {
                            exhausted = true;
                            break;
                        }
                    }
                    remaining(deadline);
                }
                Err(e) => panic!("u{i}: {e}"),
            }
        }
        if exhausted {
            pending = Some(s);
            break;
        }
        assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        open.push(s);
    }
    assert!(exhausted, "never ran out of descriptors");
    assert!(
        open.len() >= 20 && open.len() < 64,
        "{} sessions under a limit of 64 descriptors",
        open.len()
    );

    // A fixed observation window is the point here: over ~1 s while a
    // connection waits in the backlog, the server must mostly sleep.
    let (cpu0, t0) = (bin.cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_millis(1000));
    let (cpu1, wall) = (bin.cpu_time(), t0.elapsed());
    let used = cpu1.saturating_sub(cpu0);
    eprintln!(
        "{} sessions open, out of descriptors: {used:?} CPU in {wall:?}",
        open.len()
    );
    assert!(
        used.as_secs_f64() < 0.3 * wall.as_secs_f64(),
        "server spins while out of descriptors: {used:?} CPU in {wall:?}"
    );

    // Close a few sessions: the server accepts again, the waiting
    // connection included, and a newcomer chats with an old client.
    open.truncate(open.len() - 5);
    let mut waiting = pending.expect("pending connection");
    waiting.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = read_head(&mut waiting);
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "the waiting client: {head}"
    );
    let mut late = Client::connect(&bin.url("username=late&room=lobby"));
    late.opening();
    let old = &mut open[0];
    old.write_all(&client_frame(
        0x81,
        br#"{"type":"join","room":"lobby"}"#,
        true,
    ))
    .unwrap();
    loop {
        let v = read_event(old);
        if v["type"] == "joined" {
            break;
        }
    }
    late.say("recovered");
    loop {
        let v = read_event(old);
        if v["type"] == "message" {
            assert_eq!(v["content"], "recovered");
            break;
        }
    }
    let (status, body) = common::http(bin.addr(), b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    let s: Value = serde_json::from_str(&body).unwrap();
    assert!(s["accept_fd_exhausted"].as_u64().unwrap() >= 1, "{s}");
}

// ---- access control ---------------------------------------------------------------

/// With an allow-list, an upgrade from another `Origin` gets 403; an
/// allowed one and none at all (non-browser clients) get in.
#[test]
fn origin_allow_list() {
    use tungstenite::client::IntoClientRequest;
    let mut config = Config::for_tests();
    config.allowed_origins = vec!["https://chat.example".into()];
    let server = TestServer::with(config);

    for origin in ["https://evil.example", "null", "https://chat.example.evil"] {
        let req = upgrade_request("/ws?username=x", &format!("Origin: {origin}\r\n"));
        let (status, body) = server.http(req.as_bytes());
        assert_eq!(status, 403, "{origin}: {body}");
        assert!(body.contains("origin"), "{body}");
    }

    let mut req = server
        .url("username=browser")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Origin",
        tungstenite::http::HeaderValue::from_static("https://chat.example"),
    );
    let stream = raw_connect(server.addr);
    let (ws, _) = tungstenite::client::client(req, stream).expect("allowed origin upgrades");
    let mut browser = Client { ws };
    assert_eq!(browser.opening().0["user"], "browser");

    let mut tool = server.client("tool");
    assert_eq!(tool.opening().0["user"], "tool");
    assert_eq!(server.stats()["rejected"]["origin"], 3);
}

/// With auth, the token decides the username: no token, a wrong one, or a
/// right one with someone else's `username` get 401; the right token gets
/// the token's name.
#[test]
fn auth_tokens_decide_the_username() {
    let mut config = Config::for_tests();
    config.auth = Some(HashMap::from([
        ("tok-alice-1234".to_string(), "alice".to_string()),
        ("tok-bob-5678".to_string(), "bob".to_string()),
    ]));
    let server = TestServer::with(config);
    for (query, why) in [
        ("username=alice", "no token"),
        ("token=", "empty token"),
        ("token=tok-alice-123", "a prefix of a token"),
        ("token=nope&username=alice", "wrong token"),
        ("token=tok-alice-1234&username=bob", "someone else's name"),
    ] {
        let req = upgrade_request(&format!("/ws?{query}"), "");
        let (status, body) = server.http(req.as_bytes());
        assert_eq!(status, 401, "{why}: {body}");
        assert!(!body.trim().is_empty());
    }
    let mut alice = server.client_with("token=tok-alice-1234");
    assert_eq!(alice.opening().0["user"], "alice");
    let mut bob = server.client_with("token=tok-bob-5678&username=bob");
    assert_eq!(bob.opening().0["user"], "bob");
    alice.expect("join");
    bob.say("authenticated");
    alice.wait_for("bob's message", |v| v["content"] == "authenticated");
    assert_eq!(server.stats()["rejected"]["auth"], 5);
}

/// `--auth-file` in the binary: lines `TOKEN USERNAME`, comments allowed.
#[test]
fn auth_file_in_the_binary() {
    let deadline = Instant::now() + Duration::from_secs(10);
    let file = TempFile::new("auth", "# tokens\ns3cret-carol carol\n\nother-dave dave\n");
    let path = file.0.to_str().expect("utf-8 temp path");
    let bin = Bin::start(&["--no-persist", "--auth-file", path], None, deadline);
    let (status, _) = common::http(bin.addr(), upgrade_request("/ws", "").as_bytes());
    assert_eq!(status, 401);
    let (status, _) = common::http(
        bin.addr(),
        upgrade_request("/ws?token=s3cret-carol&username=dave", "").as_bytes(),
    );
    assert_eq!(status, 401);
    let mut carol = Client::connect(&bin.url("token=s3cret-carol"));
    assert_eq!(carol.opening().0["user"], "carol");
}

// ---- shutdown ---------------------------------------------------------------------

/// Read each client's close code on its own thread (so that each can
/// answer the close while the server waits).
fn watch_closes(clients: Vec<Client>) -> Vec<std::thread::JoinHandle<Option<u16>>> {
    clients
        .into_iter()
        .map(|mut c| std::thread::spawn(move || c.close_code()))
        .collect()
}

/// `ServerHandle::shutdown` sends every client close 1001 and the server
/// stops listening.
#[test]
fn shutdown_sends_1001_to_everyone() {
    let mut server = TestServer::start();
    let mut clients = Vec::new();
    for (name, room) in [("a", "one"), ("b", "one"), ("c", "two")] {
        let mut c = server.client_with(&format!("username={name}&room={room}"));
        c.opening();
        clients.push(c);
    }
    clients[0].say("last words");
    let watchers = watch_closes(clients);
    server.shutdown();
    for w in watchers {
        assert_eq!(w.join().expect("watcher"), Some(1001));
    }
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "still accepting after shutdown"
    );
}

/// SIGTERM to the binary: clients get 1001, the process exits 0 well
/// within the grace period once they have answered.
#[test]
fn sigterm_closes_1001_and_exits_0() {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut bin = Bin::start(
        &["--no-persist", "--shutdown-grace-ms", "5000"],
        None,
        deadline,
    );
    let clients: Vec<Client> = (0..3)
        .map(|i| {
            let mut c = Client::connect(&bin.url(&format!("username=s{i}")));
            c.opening();
            c
        })
        .collect();
    let watchers = watch_closes(clients);
    let signalled = Instant::now();
    bin.signal(libc::SIGTERM);
    for w in watchers {
        assert_eq!(w.join().expect("watcher"), Some(1001));
    }
    let (status, _) = bin.wait_exit(deadline);
    assert!(status.success(), "clean shutdown exits 0, got {status}");
    assert!(
        signalled.elapsed() < Duration::from_millis(4000),
        "exit took {:?}, the clients had all answered",
        signalled.elapsed()
    );
}

/// A second signal during the grace period exits at once, without waiting
/// for clients that never answer the close.
#[test]
fn second_signal_exits_at_once() {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut bin = Bin::start(
        &["--no-persist", "--shutdown-grace-ms", "60000"],
        None,
        deadline,
    );
    // Upgraded by hand and never read: it will not answer the close.
    let _deaf = raw_session(bin.addr(), "/ws?username=deaf");
    let mut ok = Client::connect(&bin.url("username=ok"));
    ok.opening();
    bin.signal(libc::SIGTERM);
    bin.wait_line("shutdown begins", deadline, |l| l.contains("shutting down"));
    assert_eq!(ok.close_code(), Some(1001));
    let second = Instant::now();
    bin.signal(libc::SIGTERM);
    let (status, rest) = bin.wait_exit(deadline);
    assert!(
        second.elapsed() < Duration::from_secs(3),
        "second signal took {:?}",
        second.elapsed()
    );
    assert!(status.success(), "exit status {status}");
    assert!(rest.iter().any(|l| l.contains("second signal")), "{rest:?}");
}

// ---- stale timers -------------------------------------------------------------------

/// Slab slots are reused, deadlines stay in the heap: a connection whose
/// handshake deadline is pending closes, another takes its slot (the debug
/// log names slots), and the old deadline passes without touching it.
///
/// Connection C is the clock: it arrived just after A, so its deadline is
/// no earlier than A's, and once C has been dropped for its handshake
/// timeout, A's deadline has been popped too.
#[test]
fn stale_handshake_deadline_spares_the_slot_reuser() {
    const TIMEOUT_MS: u64 = 2000;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut bin = Bin::start(
        &[
            "--no-persist",
            "--handshake-timeout-ms",
            &TIMEOUT_MS.to_string(),
            "--log-level",
            "debug",
        ],
        None,
        deadline,
    );
    let half = b"GET /ws?username=b HTTP/1.1\r\nHost: x\r\n";
    let a = raw_connect(bin.addr());
    let a_started = Instant::now();
    (&a).write_all(half).unwrap();
    let a_from = format!("conn #0 from {}", a.local_addr().unwrap());
    bin.wait_line("A in slot 0", deadline, |l| l.contains(&a_from));
    let mut c = raw_connect(bin.addr());
    c.write_all(half).unwrap();
    let c_from = format!("conn #1 from {}", c.local_addr().unwrap());
    bin.wait_line("C in slot 1", deadline, |l| l.contains(&c_from));

    // Spacing, not waiting: B's deadline must fall a few timer ticks
    // (100 ms each) after A's, or both would fire in the same batch.
    std::thread::sleep(Duration::from_millis(500));
    drop(a);
    bin.wait_line("A removed", deadline, |l| l.contains("conn #0 removed"));
    let mut b = raw_connect(bin.addr());
    b.write_all(half).unwrap();
    let b_from = format!("conn #0 from {}", b.local_addr().unwrap());
    let line = bin.wait_line("B in slot 0", deadline, |l| {
        l.contains(&b_from) || l.contains("handshake timeout")
    });
    assert!(
        line.contains(&b_from),
        "a handshake deadline fired before B took the slot: {line}"
    );
    assert!(
        a_started.elapsed() < Duration::from_millis(TIMEOUT_MS),
        "B arrived after A's deadline; the test proves nothing (machine too slow?)"
    );

    let line = bin.wait_line("C's timeout", deadline, |l| l.contains("handshake timeout"));
    assert!(
        line.contains("conn #1:"),
        "wrong connection timed out: {line}"
    );
    let mut buf = [0u8; 16];
    assert_eq!(c.read(&mut buf).unwrap_or(0), 0, "C dropped");

    // A's deadline is gone; B, in A's old slot, finishes its handshake.
    b.write_all(
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let head = read_head(&mut b);
    assert!(head.starts_with("HTTP/1.1 101"), "B was dropped: {head}");
    let welcome = read_event(&mut b);
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "b");
}
