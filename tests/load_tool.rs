//! The load tool (`loopchat-load`) against the real server: each test starts
//! `loopchat` on 127.0.0.1:0 (memory only, rate limits raised so the load is
//! not refused), runs one small scenario with `--json`, and checks the
//! tool's verdict and counts. Together they show the tool's own client side
//! (handshake, masking, close) and its delivery accounting are right, so its
//! numbers can be trusted at scale.
//!
//! Every child process is killed if a test fails or overruns its deadline
//! (the guard's Drop), and nothing sleeps: waits are on pipes with timeouts.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Bin;
use serde_json::Value;

/// Upper bound for any one step; the tool's own --duration-s is lower.
const DEADLINE: Duration = Duration::from_secs(60);

/// Kills and reaps the child when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server on an ephemeral port: its guard, WebSocket URL and pid.
fn start_server() -> (Bin, String, u32) {
    let bin = Bin::start(
        &[
            "--no-persist",
            "--rate-per-s",
            "100000",
            "--rate-burst",
            "100000",
        ],
        None,
        Instant::now() + DEADLINE,
    );
    let url = format!("ws://{}/ws", bin.addr());
    let pid = bin.child.id();
    (bin, url, pid)
}

/// Runs the load tool to completion (or kills it at the deadline) and
/// returns its exit code, stdout and stderr.
fn run_load(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loopchat-load"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start loopchat-load");
    let mut stdout = child.stdout.take().expect("tool stdout");
    let mut stderr = child.stderr.take().expect("tool stderr");
    let mut guard = Reaped(child);
    let (tx, rx) = mpsc::channel();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // stdout reaches EOF when the tool exits.
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let out = match rx.recv_timeout(DEADLINE) {
        Ok(out) => out,
        Err(_) => panic!("loopchat-load {args:?} did not finish within {DEADLINE:?}"),
    };
    let status = guard.0.wait().expect("wait for loopchat-load");
    let err = err_reader.join().unwrap_or_default();
    (status.code(), out, err)
}

fn json_report(out: &str, err: &str) -> Value {
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {out:?}; stderr: {err}"))
}

/// Twenty receivers, four of them sending fifty messages each as fast as a
/// window of eight allows: every receiver gets all 200 messages, once each,
/// in each sender's order.
#[test]
fn fanout_delivers_every_message_exactly_once_in_order() {
    let (_server, url, pid) = start_server();
    let pid = pid.to_string();
    let (code, out, err) = run_load(&[
        "fanout",
        "--url",
        &url,
        "--receivers",
        "20",
        "--senders",
        "4",
        "--messages",
        "50",
        "--msg-rate",
        "0",
        "--window",
        "8",
        "--pid",
        &pid,
        "--duration-s",
        "40",
        "--json",
        "--quiet",
    ]);
    let r = json_report(&out, &err);
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(r["joined"], 20, "{r}");
    assert_eq!(r["expected"], 20 * 4 * 50, "{r}");
    assert_eq!(r["deliveries"], 20 * 4 * 50, "{r}");
    for zero in ["missing", "duplicates", "reordered", "failures", "foreign"] {
        assert_eq!(r[zero], 0, "{zero}: {r}");
    }
    assert_eq!(r["latency"]["count"], 4000, "{r}");
    assert!(r["server"]["cpu_us_per_delivery"].is_number(), "{r}");
}

/// The same check with the load split over two event-loop threads and
/// paced by a total message rate: receivers on one thread see senders on
/// the other, and the senders wait until every receiver has joined.
#[test]
fn fanout_over_two_threads_at_a_paced_rate() {
    let (_server, url, _pid) = start_server();
    let (code, out, err) = run_load(&[
        "fanout",
        "--url",
        &url,
        "--threads",
        "2",
        "--receivers",
        "30",
        "--senders",
        "6",
        "--messages",
        "40",
        "--msg-rate",
        "600",
        "--duration-s",
        "40",
        "--json",
        "--quiet",
    ]);
    let r = json_report(&out, &err);
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(r["deliveries"], 30 * 6 * 40, "{r}");
    for zero in ["missing", "duplicates", "reordered", "failures"] {
        assert_eq!(r[zero], 0, "{zero}: {r}");
    }
}

/// A hundred short sessions, ten at a time over two threads: each gets its
/// welcome, has its message echoed and completes the closing handshake.
#[test]
fn churn_completes_every_cycle() {
    let (_server, url, pid) = start_server();
    let pid = pid.to_string();
    let (code, out, err) = run_load(&[
        "churn",
        "--url",
        &url,
        "--threads",
        "2",
        "--cycles",
        "100",
        "--concurrency",
        "10",
        "--pid",
        &pid,
        "--duration-s",
        "40",
        "--json",
        "--quiet",
    ]);
    let r = json_report(&out, &err);
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(r["completed"], 100, "{r}");
    assert_eq!(r["failures"], 0, "{r}");
    assert_eq!(r["welcome"]["count"], 100, "{r}");
    assert!(r["server"]["rss_growth_kb"].is_number(), "{r}");
    assert!(r["server"]["cpu_us_per_cycle"].is_number(), "{r}");
}

/// Idle sessions against a port nobody listens on: each counts as a
/// failure with its reason, and the run exits 1 rather than reporting success.
/// The address is one no test server uses (they are all on 127.0.0.1), so
/// a server started meanwhile by another test cannot take the port.
#[test]
fn failures_are_counted_and_fail_the_run() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.11:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("ws://127.0.0.11:{port}/ws");
    let (code, out, err) = run_load(&[
        "idle", "--url", &url, "--conns", "5", "--hold-s", "0", "--json", "--quiet",
    ]);
    let r = json_report(&out, &err);
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(r["opened"], 0, "{r}");
    assert_eq!(r["failures"], 5, "{r}");
    assert_eq!(r["failure_reasons"]["connect refused"], 5, "{r}");
}

/// A small mass event: 300 sessions in rooms of 100 arrive and drop at
/// once while two probes chat; every session opens, the leave drains, no
/// probe message is lost, and each phase carries the server's iteration
/// counters.
#[test]
fn mass_arrives_and_leaves_and_the_probes_lose_nothing() {
    let (_server, url, pid) = start_server();
    let pid = pid.to_string();
    let (code, out, err) = run_load(&[
        "mass",
        "--url",
        &url,
        "--conns",
        "300",
        "--room-size",
        "100",
        "--probes",
        "2",
        "--hold-s",
        "0.2",
        "--pid",
        &pid,
        "--duration-s",
        "40",
        "--json",
        "--quiet",
    ]);
    let r = json_report(&out, &err);
    assert_eq!(code, Some(0), "{r}\n{err}");
    assert_eq!(r["opened"], 300);
    assert_eq!(r["drained"], true);
    assert_eq!(r["probe_received"], r["probe_expected"]);
    assert!(r["probe_sent"].as_u64().unwrap() > 0, "{r}");
    let phases = r["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["connect", "hold", "leave", "after"]);
    for p in phases {
        assert!(p["iterations"].as_u64().is_some(), "{p}");
        assert!(p["iterations_over_ms"]["10"].as_u64().is_some(), "{p}");
    }
    assert!(r["slowest_iteration_cpu_us"].as_u64().unwrap() > 0, "{r}");
}

/// Flags are checked before any connection: a non-loopback target or an
/// unknown flag is a one-line error and exit 2; --help lists the flags.
#[test]
fn bad_flags_and_non_loopback_targets_exit_2() {
    for args in [
        &["idle", "--url", "ws://10.1.2.3:8080/ws"][..],
        &["fanout", "--senders", "5", "--receivers", "4"],
        &["churn", "--no-such-flag"],
        &["idle", "--cycles", "3"],
        &["mass", "--leave", "slowly"],
    ] {
        let (code, out, err) = run_load(args);
        assert_eq!(code, Some(2), "{args:?}: {out} {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    let (code, out, _) = run_load(&["--help"]);
    assert_eq!(code, Some(0));
    for flag in [
        "--url",
        "--threads",
        "--src-addrs",
        "--duration-s",
        "--conns",
        "--receivers",
        "--window",
        "--cycles",
        "--pid",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
    }
}
