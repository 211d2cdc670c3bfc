//! End-to-end tests of the on-disk history (`src/store/disk.rs`) through
//! the real `loopchat` binary: restarts, `kill -9` crashes in every fsync
//! mode, room names like `..`, and a store whose writes fail.
//!
//! Every test runs servers on `127.0.0.1:0` with their own data dir under
//! the system temp dir, has a deadline (socket read timeouts and channel
//! timeouts, no fixed sleeps), and kills its servers when it ends, even on
//! a failed assertion (the [`Server`] guard).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{remaining, Bin, Client};
use serde_json::json;
use tungstenite::Message;

/// Longest any single test may take.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// Rate flags for tests that send bursts (the default would refuse them).
const FAST: [&str; 4] = ["--rate-per-s", "100000", "--rate-burst", "100000"];

/// A data dir under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("loopchat-persist-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn data(&self) -> PathBuf {
        self.0.join("data")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `loopchat` with a data dir; killed (SIGKILL) when dropped.
struct Server {
    bin: Bin,
    port: u16,
}

impl Server {
    /// Starts the binary on an ephemeral port with `data` as its data dir
    /// and waits for its "listening on" line.
    fn start(data: &Path, args: &[&str], deadline: Instant) -> Server {
        let data = data.to_str().expect("temp dir path is UTF-8");
        let mut all = vec!["--data-dir", data];
        all.extend_from_slice(args);
        let bin = Bin::start(&all, None, deadline);
        let port = bin.port;
        Server { bin, port }
    }

    /// `kill -9`: no shutdown code runs, as in a crash.
    fn kill9(self) {
        drop(self.bin);
    }

    /// SIGTERM, then wait until it has exited.
    fn stop(mut self, deadline: Instant) {
        self.bin.signal(libc::SIGTERM);
        let (status, _) = self.bin.wait_exit(deadline);
        assert!(status.success(), "clean shutdown exits 0, got {status}");
    }

    /// A client of `room`, past its `welcome`.
    fn connect(&self, user: &str, room: &str) -> Client {
        let mut c = Client::connect(&format!(
            "ws://127.0.0.1:{}/ws?username={user}&room={room}",
            self.port
        ));
        c.expect("welcome");
        c
    }

    /// Status code of `GET path`.
    fn http_status(&self, path: &str, deadline: Instant) -> u16 {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(remaining(deadline)))
            .expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .expect("write request");
        let mut head = [0u8; 12];
        s.read_exact(&mut head).expect("read status line");
        let text = String::from_utf8_lossy(&head);
        text[9..12].parse().expect("status code")
    }
}

/// Sends a message to `room` and returns the id the server gave it.
fn say(c: &mut Client, room: &str, content: &str) -> u64 {
    let r = format!("say-{content}");
    c.send(json!({"type": "message", "room": room, "content": content, "ref": r}));
    let ev = c.wait_for("the echo", |ev| ev["ref"] == r.as_str());
    assert_eq!(ev["type"], "message", "message refused: {ev}");
    ev["id"].as_u64().expect("message id")
}

/// The ids of `room`'s history (`history` command, newest 500).
fn history_ids(c: &mut Client, room: &str) -> Vec<u64> {
    c.send(json!({"type": "history", "room": room, "limit": 500}));
    let ev = c.expect("history");
    ev["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect()
}

fn assert_increasing(ids: &[u64], what: &str) {
    for w in ids.windows(2) {
        assert!(w[0] < w[1], "{what}: ids not strictly increasing: {ids:?}");
    }
}

/// A clean restart keeps each room's history (join backlog, `history`
/// paging, `since` resume) and ids continue upward.
#[test]
fn restart_keeps_history_and_ids() {
    let deadline = Instant::now() + TEST_DEADLINE;
    let tmp = TempDir::new("restart");
    let server = Server::start(&tmp.data(), &FAST, deadline);
    let mut a = server.connect("alice", "lobby");
    let sent: Vec<u64> = (0..8)
        .map(|i| say(&mut a, "lobby", &format!("m{i}")))
        .collect();
    assert_increasing(&sent, "first run");
    drop(a);
    server.stop(deadline);

    let server = Server::start(&tmp.data(), &FAST, deadline);
    let mut b = server.connect("bob", "lobby");
    assert_eq!(history_ids(&mut b, "lobby"), sent);
    b.send(json!({"type": "history", "room": "lobby", "before": sent[5], "limit": 2}));
    let page = b.expect("history");
    let page: Vec<u64> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(page, sent[3..5]);
    b.send(json!({"type": "join", "room": "lobby2", "since": 0}));
    b.expect("joined");
    // A clean shutdown saved the exact next id: no gap.
    let next = say(&mut b, "lobby", "after restart");
    assert_eq!(next, sent[7] + 1, "ids continue after a clean restart");

    // A resume (`since`) after the restart gets exactly the newer messages.
    let mut c = server.connect("carol", &format!("lobby&since={}", sent[5]));
    let joined = c.expect("joined");
    let resumed: Vec<u64> = joined["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(resumed, vec![sent[6], sent[7], next]);
}

/// Sends `n` messages pipelined, `kill -9`s the server once `kill_after`
/// acks (the sender's own copies) arrived, and returns every acked id.
fn send_and_crash(server: Server, room: &str, n: usize, kill_after: usize) -> Vec<u64> {
    let mut a = server.connect("writer", room);
    for i in 0..n {
        // Queued without flushing, to pipeline them all in one write.
        let m = json!({"type": "message", "room": room, "content": format!("c{i}"), "ref": format!("r{i}")});
        a.ws.write(Message::text(m.to_string()))
            .expect("queue frame");
    }
    a.ws.flush().expect("flush");
    let mut acked = Vec::new();
    while acked.len() < kill_after {
        let ev = a.try_next().expect("server closed before the crash");
        if ev["type"] == "message" && ev.get("ref").is_some() {
            acked.push(ev["id"].as_u64().expect("id"));
        }
    }
    server.kill9();
    // Acks the server released before it died still count.
    while let Some(ev) = a.try_next() {
        if ev["type"] == "message" && ev.get("ref").is_some() {
            acked.push(ev["id"].as_u64().expect("id"));
        }
    }
    acked
}

/// `kill -9` mid-stream in every fsync mode: no id is ever handed out twice
/// (ids after the restart are above every id seen before, even ids whose
/// message was lost), the room is never lost, and with `--fsync always`
/// every message a sender got its echo for is in history.
#[test]
fn kill_9_never_reuses_ids_and_always_keeps_acked_messages() {
    for mode in ["always", "everysec", "never"] {
        eprintln!("fsync {mode}");
        let deadline = Instant::now() + TEST_DEADLINE;
        let tmp = TempDir::new(&format!("crash-{mode}"));
        let mut args = vec!["--fsync", mode];
        args.extend(FAST);

        let server = Server::start(&tmp.data(), &args, deadline);
        let acked = send_and_crash(server, "r", 400, 100);
        assert_increasing(&acked, "acked before the crash");

        let server = Server::start(&tmp.data(), &args, deadline);
        let mut b = server.connect("reader", "r");
        let kept = history_ids(&mut b, "r");
        assert_increasing(&kept, "history after the crash");
        if mode == "always" {
            let missing: Vec<_> = acked.iter().filter(|id| !kept.contains(id)).collect();
            assert!(
                missing.is_empty(),
                "acked but lost with fsync always: {missing:?}"
            );
        }
        // No reuse: a new id is above anything handed out before the crash,
        // whether its message survived or not.
        let seen_max = acked.iter().chain(&kept).max().copied().unwrap_or(0);
        let next = say(&mut b, "r", "after the crash");
        assert!(
            next > seen_max,
            "fsync {mode}: id {next} not above {seen_max}"
        );

        // And a second crash right away: still no reuse.
        let acked2 = send_and_crash(server, "r", 50, 10);
        assert!(
            acked2.iter().all(|&id| id > next),
            "fsync {mode}: {acked2:?} vs {next}"
        );
        let server = Server::start(&tmp.data(), &args, deadline);
        let mut c = server.connect("reader2", "r");
        let kept2 = history_ids(&mut c, "r");
        assert_increasing(&kept2, "history after the second crash");
        let next2 = say(&mut c, "r", "after the second crash");
        let seen_max = acked2.iter().chain(&kept2).max().copied().unwrap_or(0);
        assert!(
            next2 > seen_max,
            "fsync {mode}: id {next2} not above {seen_max}"
        );
        eprintln!(
            "fsync {mode}: acked {} then {}, kept {} after the first crash, next ids {next} and {next2}",
            acked.len(),
            acked2.len(),
            kept.len()
        );
    }
}

/// Rooms named `.`, `..` and names differing only in case each get their
/// own directory inside the data dir, and keep their own history.
#[test]
fn dot_and_case_room_names_stay_inside_the_data_dir() {
    let deadline = Instant::now() + TEST_DEADLINE;
    let tmp = TempDir::new("names");
    let rooms = ["..", ".", "...", "Lobby", "lobby", "a.b"];
    let server = Server::start(&tmp.data(), &FAST, deadline);
    let mut a = server.connect("alice", "home");
    for room in rooms {
        a.send(json!({"type": "join", "room": room}));
        a.expect("joined");
        say(&mut a, room, &format!("in {room}"));
    }
    drop(a);
    server.stop(deadline);

    // Nothing beside the data dir; one directory per room inside it.
    let beside: Vec<_> = std::fs::read_dir(&tmp.0)
        .expect("temp dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(beside, vec![std::ffi::OsString::from("data")]);
    let dirs = std::fs::read_dir(tmp.data().join("rooms"))
        .expect("rooms dir")
        .count();
    // (`home` got no message, so it has no log.)
    assert_eq!(dirs, rooms.len(), "one directory per room");

    let server = Server::start(&tmp.data(), &FAST, deadline);
    let mut b = server.connect("bob", "home");
    for room in rooms {
        b.send(json!({"type": "history", "room": room, "limit": 500}));
        let ev = b.expect("history");
        let contents: Vec<&str> = ev["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["content"].as_str().expect("content"))
            .collect();
        assert_eq!(contents, vec![format!("in {room}")], "room {room}");
    }
}

/// Replaces room `r`'s current segment by a symlink to `/dev/full`, so every
/// append to it fails with ENOSPC.
fn break_room_log(data: &Path, encoded_room: &str) {
    let dir = data.join("rooms").join(encoded_room);
    let seg = std::fs::read_dir(&dir)
        .expect("room dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .max()
        .expect("a segment");
    std::fs::remove_file(&seg).expect("remove segment");
    std::os::unix::fs::symlink("/dev/full", &seg).expect("symlink to /dev/full");
}

/// A store whose writes fail keeps the server up: `--fsync everysec` still
/// delivers the message, `--fsync always` refuses it with
/// `history_unavailable`, and `/healthz` answers 503 until a write succeeds.
#[test]
fn failing_writes_keep_the_server_up() {
    for mode in ["everysec", "always"] {
        eprintln!("fsync {mode}");
        let deadline = Instant::now() + TEST_DEADLINE;
        let tmp = TempDir::new(&format!("full-{mode}"));
        let mut args = vec!["--fsync", mode];
        args.extend(FAST);
        let server = Server::start(&tmp.data(), &args, deadline);
        let mut a = server.connect("alice", "r");
        let first = say(&mut a, "r", "before");
        drop(a);
        server.stop(deadline);
        break_room_log(&tmp.data(), "r");

        let server = Server::start(&tmp.data(), &args, deadline);
        assert_eq!(server.http_status("/healthz", deadline), 200);
        let mut a = server.connect("alice", "r");
        let mut b = server.connect("bob", "r");
        a.send(json!({"type": "message", "room": "r", "content": "on a full disk", "ref": "x"}));
        let ev = loop {
            let ev = a.next();
            if ev["ref"] == "x" {
                break ev;
            }
        };
        if mode == "always" {
            assert_eq!(ev["type"], "error", "{ev}");
            assert_eq!(ev["code"], "history_unavailable", "{ev}");
        } else {
            assert_eq!(ev["type"], "message", "{ev}");
            assert!(ev["id"].as_u64().expect("id") > first);
            let seen = b.expect("message");
            assert_eq!(seen["content"], "on a full disk");
        }
        assert_eq!(server.http_status("/healthz", deadline), 503);

        // Another room's write succeeds: the store is healthy again.
        a.send(json!({"type": "join", "room": "other"}));
        a.expect("joined");
        say(&mut a, "other", "fine here");
        assert_eq!(server.http_status("/healthz", deadline), 200);
    }
}
