//! End-to-end tests of the SQLite history (`src/store/sqlite.rs`) through
//! the real `loopchat` binary: restarts, `kill -9` crashes in every fsync
//! mode, room names like `..`, a store whose writes fail, a second server
//! on the same data dir, a corrupt database file, and the migration of a
//! data dir written by the earlier JSON-lines store
//! (`tests/fixtures/legacy-v1`, see `tests/fixtures/README.md`).
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
    /// `None` for a server this file spawned itself.
    bin: Option<Bin>,
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
        Server {
            bin: Some(bin),
            port,
        }
    }

    /// `kill -9`: no shutdown code runs, as in a crash.
    fn kill9(self) {
        drop(self.bin);
    }

    /// SIGTERM, then wait until it has exited.
    fn stop(mut self, deadline: Instant) {
        let bin = self
            .bin
            .as_mut()
            .expect("a server started by Server::start");
        bin.signal(libc::SIGTERM);
        let (status, _) = bin.wait_exit(deadline);
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
    common::ids(&c.expect("history")["messages"])
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
    let page: Vec<u64> = common::ids(&page["messages"]);
    assert_eq!(page, sent[3..5]);
    b.send(json!({"type": "join", "room": "lobby2", "since": 0}));
    b.expect("joined");
    // A clean shutdown saved the exact next id: no gap.
    let next = say(&mut b, "lobby", "after restart");
    assert_eq!(next, sent[7] + 1, "ids continue after a clean restart");

    // A resume (`since`) after the restart gets exactly the newer messages.
    let mut c = server.connect("carol", &format!("lobby&since={}", sent[5]));
    let joined = c.expect("joined");
    let resumed: Vec<u64> = common::ids(&joined["history"]);
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

/// `kill -9` mid-stream in every fsync mode: every message a sender got its
/// echo for is in history (each iteration is committed before delivery, and
/// a process crash loses nothing committed, whatever `--fsync` says), ids
/// stay consecutive, and no id is ever handed out twice.
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
        let missing: Vec<_> = acked.iter().filter(|id| !kept.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "fsync {mode}: acked but lost in a crash: {missing:?}"
        );
        let consecutive: Vec<u64> = (1..=kept.len() as u64).collect();
        assert_eq!(
            kept, consecutive,
            "fsync {mode}: ids 1, 2, 3, … without gaps"
        );
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
        assert!(
            acked2.iter().all(|id| kept2.contains(id)),
            "fsync {mode}: acked but lost in the second crash"
        );
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

/// Rooms named `.`, `..` and names differing only in case are rows of the
/// one database inside the data dir, each with its own history.
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

    // Nothing beside the data dir; after a clean stop, only the database
    // and the lock inside it (SQLite removed its log).
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&tmp.0), vec!["data"]);
    assert_eq!(names(&tmp.data()), vec!["LOCK", "loopchat.db"]);
    // (`home` got no message, so it has no row.)
    let db = rusqlite::Connection::open(tmp.data().join("loopchat.db")).expect("open db");
    let mut stored: Vec<String> = db
        .prepare("SELECT name FROM rooms")
        .expect("query")
        .query_map([], |r| r.get(0))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("names");
    stored.sort();
    let mut want: Vec<String> = rooms.iter().map(|r| r.to_string()).collect();
    want.sort();
    assert_eq!(stored, want, "one row per room");
    drop(db);

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

/// The open-file size limit a server with a "full disk" runs with: room
/// for SQLite's 32 KiB shared-memory index and a database of a few pages,
/// but only for about 7 pages of write-ahead log, which a few commits fill.
const FULL_DISK_BYTES: u64 = 32 * 1024 + 1;

/// Starts the binary like [`Server::start`], but with `RLIMIT_FSIZE` at
/// [`FULL_DISK_BYTES`] and `SIGXFSZ` ignored, so that a write past the limit
/// fails with `EFBIG` as a write to a full disk fails with `ENOSPC`.
fn start_on_a_full_disk(data: &Path, args: &[&str], deadline: Instant) -> FullDisk {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loopchat"));
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(args)
        .env_remove("LOOPCHAT_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: runs in the forked child before exec and only calls
    // setrlimit and signal, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: FULL_DISK_BYTES as libc::rlim_t,
                rlim_max: FULL_DISK_BYTES as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut server = FullDisk {
        child: cmd.spawn().expect("spawn loopchat"),
        port: 0,
    };
    let stderr = server.child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("  [full] {line}");
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(remaining(deadline))
            .expect("the listening line");
        if let Some(rest) = line.split("listening on ws://127.0.0.1:").nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            server.port = digits.parse().expect("port");
            return server;
        }
    }
}

/// A server started by [`start_on_a_full_disk`]; killed and reaped when
/// dropped, if it has not exited.
struct FullDisk {
    child: std::process::Child,
    port: u16,
}

impl FullDisk {
    /// SIGTERM, then its exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait")
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A store whose writes fail keeps the server up: `--fsync everysec` still
/// delivers the message that could not be kept, `--fsync always` refuses it
/// with `history_unavailable`, `/healthz` answers 503, and the server stops
/// cleanly; with the disk back, every message that was kept is there.
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
        let mut kept = vec![say(&mut a, "r", "before")];
        drop(a);
        server.stop(deadline);

        let mut disk = start_on_a_full_disk(&tmp.data(), &args, deadline);
        let full = Server {
            bin: None,
            port: disk.port,
        };
        assert_eq!(full.http_status("/healthz", deadline), 200);
        let mut a = full.connect("alice", "r");
        let mut b = full.connect("bob", "r");
        let mut failed = None;
        for i in 0..20 {
            let r = format!("x{i}");
            a.send(json!({"type": "message", "room": "r", "content": r, "ref": r}));
            let ev = a.wait_for("the answer", |ev| ev["ref"] == r.as_str());
            if mode == "always" && ev["type"] == "error" {
                assert_eq!(ev["code"], "history_unavailable", "{ev}");
                failed = Some(i);
                break;
            }
            assert_eq!(ev["type"], "message", "{ev}");
            // Delivered to the room, kept or not.
            let seen = b.wait_for("the broadcast", |ev| ev["content"] == r.as_str());
            assert_eq!(seen["id"], ev["id"]);
            if full.http_status("/healthz", deadline) == 503 {
                failed = Some(i);
                break;
            }
            kept.push(ev["id"].as_u64().expect("id"));
        }
        assert!(failed.is_some(), "the disk never filled");
        assert_eq!(full.http_status("/healthz", deadline), 503);
        drop((a, b));
        let status = disk.stop();
        assert!(status.success(), "clean stop on a full disk: {status}");

        let server = Server::start(&tmp.data(), &args, deadline);
        assert_eq!(server.http_status("/healthz", deadline), 200);
        let mut c = server.connect("carol", "r");
        assert_eq!(history_ids(&mut c, "r"), kept);
        assert!(say(&mut c, "r", "disk back") > *kept.last().expect("kept"));
    }
}

/// Runs the binary on `data` expecting it not to start: its exit status
/// and its stderr.
fn refused_start(data: &Path) -> (Option<i32>, String) {
    refused_start_limited(data, None)
}

/// [`refused_start`], with files limited to `max_file_bytes` if given
/// (`RLIMIT_FSIZE`, `SIGXFSZ` ignored): writes past it fail as on a full
/// disk.
fn refused_start_limited(data: &Path, max_file_bytes: Option<u64>) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loopchat"));
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env_remove("LOOPCHAT_LOG")
        .stdin(std::process::Stdio::null());
    if let Some(max) = max_file_bytes {
        // SAFETY: runs in the forked child before exec and only calls
        // setrlimit and signal, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: max as libc::rlim_t,
                    rlim_max: max as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("run loopchat");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A second server on a data dir in use exits at once with one line saying
/// so; the first one goes on serving.
#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let deadline = Instant::now() + TEST_DEADLINE;
    let tmp = TempDir::new("locked");
    let server = Server::start(&tmp.data(), &FAST, deadline);
    let mut a = server.connect("alice", "r");
    let id = say(&mut a, "r", "first");
    let (code, err) = refused_start(&tmp.data());
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("in use by another loopchat process"), "{err}");
    assert_eq!(say(&mut a, "r", "second"), id + 1);
}

/// A damaged database file is refused at start with one line naming it,
/// never served from and never overwritten.
#[test]
fn a_corrupt_database_is_refused_at_start() {
    let deadline = Instant::now() + TEST_DEADLINE;
    let tmp = TempDir::new("corrupt");
    let server = Server::start(&tmp.data(), &FAST, deadline);
    let mut a = server.connect("alice", "r");
    for i in 0..50 {
        say(&mut a, "r", &format!("m{i}"));
    }
    drop(a);
    server.stop(deadline);
    let db = tmp.data().join("loopchat.db");

    // Pages past the header overwritten: SQLite's structure check fails.
    let mut bytes = std::fs::read(&db).expect("read db");
    let len = bytes.len();
    for b in &mut bytes[4096..len] {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).expect("damage db");
    let (code, err) = refused_start(&tmp.data());
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("loopchat.db") && err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&db).expect("read db"),
        bytes,
        "left as it was"
    );

    // Not a database at all.
    std::fs::write(&db, b"this is not a database, it is a text file\n").expect("write");
    let (code, err) = refused_start(&tmp.data());
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("loopchat.db"), "{err}");
}

/// A database that cannot be opened and a disk too full to create one stop
/// the start like a data dir in use or a corrupt file: exit 1 (2 is for a
/// bad command line) with one line naming the path.
#[test]
fn store_failures_at_start_exit_1_with_one_line() {
    let tmp = TempDir::new("startfail");
    // Unreadable: the database's name is taken by a directory.
    std::fs::create_dir_all(tmp.data().join("loopchat.db")).expect("mkdir");
    let (code, err) = refused_start(&tmp.data());
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("loopchat.db"), "{err}");

    // Full: room for the lock file's pid, not for the database's first page.
    let fresh = tmp.0.join("full");
    let (code, err) = refused_start_limited(&fresh, Some(64));
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("loopchat.db"), "{err}");

    // A bad flag is still 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopchat"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--retain-messages",
            "0",
            "--data-dir",
        ])
        .arg(&fresh)
        .output()
        .expect("run loopchat");
    assert_eq!(out.status.code(), Some(2));
}

/// The messages of `room` as `(id, content, ts)`, via the `history` command.
fn history_of(c: &mut Client, room: &str) -> Vec<(u64, String, u64)> {
    c.send(json!({"type": "history", "room": room, "limit": 500}));
    let ev = c.expect("history");
    ev["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().expect("id"),
                m["content"].as_str().expect("content").to_string(),
                m["ts"].as_u64().expect("ts"),
            )
        })
        .collect()
}

/// Copies a directory tree (the fixture) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A data dir written by the JSON-lines store of release 4ed971d is
/// migrated on first start: every room with its ids, order and content, the
/// torn last record discarded, ids continuing above every id that store may
/// have handed out (its reservation included), and the old files kept aside.
/// A second start does not migrate again.
#[test]
fn a_data_dir_of_the_old_store_is_migrated() {
    let deadline = Instant::now() + TEST_DEADLINE;
    let tmp = TempDir::new("migrate");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy-v1");
    copy_tree(&fixture, &tmp.data());

    // What tests/fixtures/README.md says the generator wrote, in order.
    let base = 1_735_689_600_000u64;
    let mut n = 0;
    let mut want = Vec::new();
    for (room, count) in [("lobby", 40u64), ("Lobby", 3), ("..", 2), ("crashed", 5)] {
        let msgs: Vec<(u64, String, u64)> = (0..count)
            .map(|i| {
                n += 1;
                (
                    i + 1,
                    format!("message {i} in {room} \u{e9}\u{1F600} \"quoted\""),
                    base + 1000 * n,
                )
            })
            .collect();
        want.push((room, msgs));
    }

    let server = Server::start(&tmp.data(), &FAST, deadline);
    let mut a = server.connect("alice", "home");
    for (room, msgs) in &want {
        assert_eq!(&history_of(&mut a, room), msgs, "room {room}");
    }
    let stats = server_stats(&server, deadline);
    assert_eq!(stats["store"]["store_migrated_messages"], 50, "{stats}");
    // Ids continue: after the last record, or above the reservation the
    // old store had synced ("crashed" was left with 1001 by a crash).
    for (room, next) in [("lobby", 41), ("Lobby", 4), ("..", 3), ("crashed", 1001)] {
        a.send(json!({"type": "join", "room": room}));
        a.expect("joined");
        assert_eq!(
            say(&mut a, room, "after the migration"),
            next,
            "room {room}"
        );
    }
    drop(a);
    server.stop(deadline);

    // The old files are kept aside, unchanged.
    let aside = tmp.data().join("rooms.migrated");
    assert!(!tmp.data().join("rooms").exists());
    for seg in ["lobby/00000000000000000033.jsonl", "crashed/ids"] {
        assert_eq!(
            std::fs::read(aside.join(seg)).expect("kept"),
            std::fs::read(fixture.join("rooms").join(seg)).expect("fixture"),
            "{seg}"
        );
    }

    // A restart finds nothing to migrate and keeps everything.
    let server = Server::start(&tmp.data(), &FAST, deadline);
    let mut b = server.connect("bob", "home");
    let lobby = history_of(&mut b, "lobby");
    assert_eq!(lobby.len(), 41);
    assert_eq!(lobby[..40], want[0].1[..]);
    let stats = server_stats(&server, deadline);
    assert_eq!(stats["store"]["store_migrated_messages"], 0, "{stats}");
}

/// `GET /stats` as JSON.
fn server_stats(server: &Server, deadline: Instant) -> serde_json::Value {
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    s.set_read_timeout(Some(remaining(deadline)))
        .expect("timeout");
    write!(
        s,
        "GET /stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read answer");
    let body = answer.split("\r\n\r\n").nth(1).expect("body");
    serde_json::from_str(body).expect("stats json")
}

/// The issue's descriptor case: with an open-file limit of 256, eight users
/// in 32 rooms each write to every room, and every message is kept (the
/// JSON-lines store refused 168 of 248 with "Too many open files"). The
/// store holds a fixed handful of descriptors, whatever the number of rooms.
#[test]
fn many_rooms_do_not_use_up_descriptors() {
    let deadline = Instant::now() + TEST_DEADLINE;
    let tmp = TempDir::new("fds");
    let data = tmp.data();
    let mut args = vec!["--data-dir", data.to_str().expect("utf-8 path")];
    args.extend(FAST);
    let bin = Bin::start(&args, Some(256), deadline);
    let server = Server {
        port: bin.port,
        bin: None,
    };
    let store_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", bin.pid()))
            .expect("fds")
            .filter_map(Result::ok)
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&data)))
            .count()
    };
    let mut users: Vec<Client> = (0..8)
        .map(|u| server.connect(&format!("u{u}"), &format!("u{u}-r0")))
        .collect();
    for (u, c) in users.iter_mut().enumerate() {
        for r in 1..32 {
            c.send(json!({"type": "join", "room": format!("u{u}-r{r}")}));
            c.expect("joined");
        }
    }
    let mut kept = 0;
    for (u, c) in users.iter_mut().enumerate() {
        for r in 0..32 {
            let room = format!("u{u}-r{r}");
            assert_eq!(say(c, &room, "hello"), 1, "room {room}");
            kept += 1;
        }
    }
    assert_eq!(kept, 256);
    assert_eq!(server.http_status("/healthz", deadline), 200);
    let fds = store_fds();
    assert!(
        fds <= loopchat::store::sqlite::DESCRIPTORS,
        "{fds} descriptors in the data dir"
    );
    for c in &mut users {
        assert_eq!(history_ids(c, "u0-r5"), vec![1]);
    }
    drop(bin);
}
