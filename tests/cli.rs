//! The command line: `--help` lists every flag with its default, mistakes
//! exit 2 with one line, and the binary logs where it listens.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

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
        ("--rate-burst", "40"),
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
    ] {
        let out = Command::new(BIN).args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("loopchat: "), "{err}");
    }
}

#[test]
fn unwritable_data_dir_exits_2() {
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/proc/loopchat-cannot-be-here",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
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
