//! The command line: `--help` lists every flag with its default, mistakes
//! exit 2 with one line, and the binary logs where it listens.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_loopchat");

#[test]
fn help_lists_flags_with_defaults() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for (flag, default) in [
        ("--listen", "127.0.0.1:8080"),
        ("--max-message-bytes", "65536"),
        ("--max-content-bytes", "4096"),
        ("--max-rooms-per-user", "32"),
        ("--max-outbox-bytes", "262144"),
        ("--rate-per-s", "20"),
        ("--rate-burst", "twice --rate-per-s: 40"),
        ("--handshake-timeout-ms", "10000"),
        ("--heartbeat-ms", "30000"),
        ("--shutdown-grace-ms", "5000"),
        ("--data-dir", "./loopchat-data"),
        ("--fsync", "everysec"),
        ("--retain-messages", "100000"),
        ("--history-limit", "50"),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} missing from --help"));
        assert!(line.contains(&format!("[{default}]")), "{flag}: {line}");
    }
    for flag in [
        "--echo",
        "--no-persist",
        "--auth-file",
        "--allowed-origins",
        "--max-connections",
        "--log-level",
        "--trace-loop",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn mistakes_exit_2_with_one_line() {
    for args in [
        &["--bogus"][..],
        &["--listen", "nowhere"],
        &["--rate-per-s", "zero"],
        &["--fsync", "sometimes"],
        &["--listen"],
        &["--max-content-bytes", "60000"],
        &["--max-outbox-bytes", "4096"],
        &["stray"],
    ] {
        let out = Command::new(BIN).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("loopchat: "), "{err}");
    }
}

/// An unknown flag is named once, in one clean line (lexopt's "invalid
/// option" wording is not repeated after ours).
#[test]
fn unknown_flag_is_one_clean_line() {
    let out = Command::new(BIN).arg("--bogus").output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err, "loopchat: unknown flag --bogus (see --help)\n");
}

/// Limits that cannot both hold exit 2 naming both flags, instead of
/// starting with a `welcome` that advertises what the server would refuse.
#[test]
fn conflicting_limits_exit_2_naming_both_flags() {
    for (args, first, second) in [
        (
            &["--max-content-bytes", "60000"][..],
            "--max-content-bytes",
            "--max-message-bytes",
        ),
        (
            &[
                "--max-message-bytes",
                "1048576",
                "--max-outbox-bytes",
                "65536",
            ],
            "--max-outbox-bytes",
            "--max-message-bytes",
        ),
        (
            &["--history-keep", "10", "--history-limit", "50"],
            "--history-keep",
            "--history-limit",
        ),
    ] {
        let out = Command::new(BIN).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(first) && err.contains(second), "{err}");
    }
}

/// The start-up line names the data directory as an absolute path, however
/// `--data-dir` was spelled.
#[test]
fn logs_the_absolute_data_dir() {
    let tmp = std::env::temp_dir().join(format!("loopchat-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir", "./rel-data"])
        .current_dir(&tmp)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let first = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("listening on"));
    let _ = child.kill();
    let _ = child.wait();
    let first = first.expect("a listening line");
    let abs = std::path::absolute(tmp.join("rel-data")).expect("absolute");
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(first.contains("listening on ws://127.0.0.1:"), "{first}");
    assert!(
        first.contains(&format!("history: {} (fsync", abs.display())),
        "{first}"
    );
}

/// Raising only `--rate-per-s` raises the burst with it (twice the rate):
/// `welcome` advertises the derived burst, and 100 commands arriving in one
/// TCP read (more than the old fixed burst of 40) are all answered, none
/// refused, the connection not closed as flooding.
#[test]
fn burst_follows_the_rate() {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let server = common::Bin::start(&["--no-persist", "--rate-per-s", "100000"], None, deadline);
    let mut s = common::raw_session(server.addr(), "/ws?username=r");
    let (_, welcome) = common::read_frame(&mut s).expect("welcome");
    let welcome: serde_json::Value = serde_json::from_slice(&welcome).expect("json");
    assert_eq!(welcome["limits"]["rate_per_s"], 100_000);
    assert_eq!(welcome["limits"]["rate_burst"], 200_000);
    let mut batch = Vec::new();
    for i in 0..100 {
        let cmd = format!(r#"{{"type":"who","room":"default","ref":"w{i}"}}"#);
        batch.extend(common::client_frame(0x81, cmd.as_bytes(), true));
    }
    s.write_all(&batch).expect("write the batch");
    let mut answered = 0;
    while answered < 100 {
        let (b0, payload) = common::read_frame(&mut s).expect("an answer");
        assert_eq!(b0 & 0x0f, 0x1, "not a text frame: {b0:#x} {payload:?}");
        let ev: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        assert_ne!(ev["type"], "error", "{ev}");
        if ev["type"] == "members" {
            assert_eq!(ev["ref"], format!("w{answered}"));
            answered += 1;
        }
    }
}

#[test]
fn unwritable_data_dir_exits_1() {
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/proc/loopchat-cannot-be-here",
        ])
        .output()
        .expect("run");
    // The flags are fine; the directory is not: a store failure.
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/proc/loopchat-cannot-be-here"), "{err}");
}

/// The binary logs one line saying where it listens, and SIGTERM with no
/// clients stops it with status 0.
#[test]
fn logs_where_it_listens_and_stops_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--no-persist"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    assert!(first.contains("listening on ws://127.0.0.1:"), "{first}");
    assert!(first.contains("/ws"), "{first}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(status) => assert!(status.expect("wait").success()),
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            panic!("did not stop on SIGTERM within 10 s");
        }
    }
}
