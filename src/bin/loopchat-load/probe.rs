//! What the tool can learn about the server from outside: its resident
//! memory and CPU time from /proc/PID (with `--pid`; with several, e.g. the
//! nodes of a cluster and `redis-server`, summed and kept per pid), and its
//! live counters from `GET /stats`. Called from the main thread only, between phases —
//! never from an event loop, as the `/stats` request blocks (briefly, with
//! timeouts).

use std::fmt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::net::Target;

/// Bound on each step of the `/stats` request.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub rss_kb: Option<u64>,
    /// Time on CPU, seconds, summed over every `--pid`.
    pub cpu_s: Option<f64>,
    /// `(pid, time on CPU)` of each `--pid`, in the order given.
    pub cpu_each: Vec<(u32, Option<f64>)>,
    /// Open WebSocket sessions, from `/stats`.
    pub connections: Option<u64>,
    pub at: Option<Instant>,
}

impl Sample {
    /// CPU seconds used between `self` and a later sample.
    pub fn cpu_since(&self, earlier: &Sample) -> Option<f64> {
        Some(self.cpu_s? - earlier.cpu_s?)
    }

    pub fn wall_since(&self, earlier: &Sample) -> Option<f64> {
        Some(
            self.at?
                .saturating_duration_since(earlier.at?)
                .as_secs_f64(),
        )
    }

    /// `[{"pid", "cpu_s"}, …]`: CPU seconds of each `--pid` between
    /// `earlier` and `self`.
    pub fn cpu_each_since(&self, earlier: &Sample) -> serde_json::Value {
        let each = self.cpu_each.iter().zip(&earlier.cpu_each);
        serde_json::Value::Array(
            each.map(|(&(pid, now), &(_, then))| {
                let cpu = now.zip(then).map(|(a, b)| (a - b) * 1e3).map(f64::round);
                serde_json::json!({ "pid": pid, "cpu_s": cpu.map(|ms| ms / 1e3) })
            })
            .collect(),
        )
    }

    pub fn rss_growth_kb(&self, earlier: &Sample) -> Option<i64> {
        Some(self.rss_kb? as i64 - earlier.rss_kb? as i64)
    }
}

#[derive(Debug)]
pub enum ProbeError {
    NoProcess(u32),
    /// `--pid auto` found no process listening on the target port.
    NotFound(u16),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::NoProcess(pid) => write!(
                f,
                "--pid {pid}: no such process (or /proc/{pid}/stat unreadable)"
            ),
            ProbeError::NotFound(port) => {
                write!(f, "--pid auto: no process of ours listens on port {port}")
            }
        }
    }
}

pub struct Probe {
    /// The first `--pid`, then the others.
    pids: Vec<u32>,
    target: Target,
    ticks_per_s: f64,
    /// `/stats` is asked until it fails once; a server without it is not
    /// asked again.
    stats: std::cell::Cell<bool>,
}

impl Probe {
    pub fn new(pid: Option<u32>, more: &[u32], target: Target) -> Result<Probe, ProbeError> {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let probe = Probe {
            pids: pid.into_iter().chain(more.iter().copied()).collect(),
            target,
            ticks_per_s: if ticks > 0 { ticks as f64 } else { 100.0 },
            stats: true.into(),
        };
        for &pid in &probe.pids {
            if probe.proc_cpu(pid).is_none() {
                return Err(ProbeError::NoProcess(pid));
            }
        }
        Ok(probe)
    }

    pub fn pid(&self) -> Option<u32> {
        self.pids.first().copied()
    }

    pub fn sample(&self) -> Sample {
        let mut s = Sample {
            at: Some(Instant::now()),
            ..Sample::default()
        };
        if !self.pids.is_empty() {
            s.cpu_each = self.pids.iter().map(|&p| (p, self.proc_cpu(p))).collect();
            s.cpu_s = s.cpu_each.iter().map(|&(_, c)| c).sum();
            s.rss_kb = self.pids.iter().map(|&p| proc_rss_kb(p)).sum();
        }
        if self.stats.get() {
            match fetch_stats(&self.target) {
                Some(stats) => {
                    s.connections = stats.get("connections").and_then(|v| v.as_u64());
                    // A server may report its own memory and CPU; /proc wins.
                    let rss = stats
                        .get("rss_bytes")
                        .and_then(|v| v.as_u64())
                        .map(|b| b / 1024);
                    s.rss_kb = s.rss_kb.or(rss);
                    s.cpu_s = s
                        .cpu_s
                        .or(stats.get("cpu_seconds").and_then(|v| v.as_f64()));
                }
                None => self.stats.set(false),
            }
        }
        s
    }

    /// Time on CPU of every thread of `pid`: nanoseconds from
    /// `/proc/PID/task/*/schedstat` where the kernel has it, else utime +
    /// stime from `/proc/PID/stat` (10 ms ticks).
    fn proc_cpu(&self, pid: u32) -> Option<f64> {
        if let Some(ns) = schedstat_ns(pid) {
            return Some(ns as f64 / 1e9);
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may contain spaces and parentheses;
        // fields after the last ')' are fixed: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) as f64 / self.ticks_per_s)
    }
}

fn schedstat_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn proc_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `GET /stats` on the target's host, as a JSON object; `None` on any failure.
pub fn fetch_stats(target: &Target) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut stream = TcpStream::connect_timeout(&target.addr, STATS_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(STATS_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(STATS_TIMEOUT)).ok()?;
    let request = format!(
        "GET /stats HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        target.http_host()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.take(1 << 20).read_to_end(&mut answer).ok()?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(body_at) = head.parse(&answer).ok()? else {
        return None;
    };
    if head.code != Some(200) {
        return None;
    }
    match serde_json::from_slice(&answer[body_at..]).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Finds the process listening on `target`'s port: the socket's inode from
/// /proc/net/tcp{,6}, then the process holding that inode among /proc/*/fd.
pub fn find_listener(target: &Target) -> Result<u32, ProbeError> {
    let port = target.addr.port();
    let not_found = ProbeError::NotFound(port);
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let Some((_, p)) = local.rsplit_once(':') else {
                continue;
            };
            if *state == "0A" && u16::from_str_radix(p, 16) == Ok(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return Err(not_found);
    }
    let procs = std::fs::read_dir("/proc").map_err(|_| ProbeError::NotFound(port))?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                    return Ok(pid);
                }
            }
        }
    }
    Err(not_found)
}
