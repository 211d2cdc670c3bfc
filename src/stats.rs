//! Live counters for operators: `/stats` (JSON) and `/metrics` (Prometheus
//! text format).
//!
//! Counters are plain integers bumped where things happen, so reading them
//! costs nothing; a request builds a [`Snapshot`] from them (the gauges
//! too are kept as things change: connections per phase by
//! `conn::Census`, queued bytes by the outboxes, so no request walks the
//! slab) and renders it. Pure rendering, tested without a server.

use std::fmt::Write as _;

/// Why a connection was refused or dropped before it became a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    OverLimit,
    BadRequest,
    HeadTooLarge,
    NotFound,
    Method,
    Origin,
    Auth,
    Username,
    Taken,
    HandshakeFailed,
    HandshakeTimeout,
    /// An upgrade near `--memory-limit`.
    Memory,
    /// Cluster mode: Redis unreachable (503).
    ClusterDown,
}

impl Reject {
    pub const ALL: [Reject; 13] = [
        Reject::OverLimit,
        Reject::BadRequest,
        Reject::HeadTooLarge,
        Reject::NotFound,
        Reject::Method,
        Reject::Origin,
        Reject::Auth,
        Reject::Username,
        Reject::Taken,
        Reject::HandshakeFailed,
        Reject::HandshakeTimeout,
        Reject::Memory,
        Reject::ClusterDown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reject::OverLimit => "over_limit",
            Reject::BadRequest => "bad_request",
            Reject::HeadTooLarge => "head_too_large",
            Reject::NotFound => "not_found",
            Reject::Method => "method",
            Reject::Origin => "origin",
            Reject::Auth => "auth",
            Reject::Username => "username",
            Reject::Taken => "taken",
            Reject::HandshakeFailed => "handshake_failed",
            Reject::HandshakeTimeout => "handshake_timeout",
            Reject::Memory => "memory",
            Reject::ClusterDown => "cluster_unavailable",
        }
    }
}

/// The numbers every `/stats` answer carries, whatever else it adds: the
/// protocol promises them to outside clients.
pub const CONTRACT_FIELDS: [&str; 6] = [
    "connections",
    "rooms",
    "messages",
    "bytes_in",
    "bytes_out",
    "uptime_s",
];

/// The thresholds of `loop_iterations_over_ms`, in milliseconds.
pub const ITERATION_OVER_MS: [u64; 7] = [1, 2, 5, 10, 20, 50, 100];

/// Counters the loop bumps.
#[derive(Debug, Default, Clone)]
pub struct LoopCounters {
    pub accepted: u64,
    pub rejected: [u64; Reject::ALL.len()],
    pub sessions_opened: u64,
    pub sessions_closed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub slow_consumer_drops: u64,
    pub heartbeat_timeouts: u64,
    pub protocol_closes: u64,
    pub accept_fd_exhausted: u64,
    pub iterations: u64,
    pub slowest_iteration_us: u64,
    /// The most CPU time one iteration took (the loop thread's own CPU
    /// clock: unlike the wall clock above, it leaves out the time another
    /// process on the same core took from us).
    pub slowest_iteration_cpu_us: u64,
    /// Iterations that took more CPU time than each of
    /// [`ITERATION_OVER_MS`], and the CPU time all iterations took: enough
    /// to see, over any window, whether a mass event made the loop slow
    /// (the slowest since start cannot show it).
    pub iterations_over: [u64; ITERATION_OVER_MS.len()],
    pub busy_us: u64,
    /// Work a pass left for the next one because its budget was spent
    /// (a connection's read, a flush, the accept queue).
    pub deferred: u64,
    pub http_answers: u64,
    /// WebSocket frames read (data and control).
    pub frames_in: u64,
    /// Frames queued in outboxes by `Server::deliver` (events of every
    /// kind; what tungstenite writes itself is not counted).
    pub frames_queued: u64,
    /// Outbox flushes (each one or more `write`/`writev` calls on one
    /// socket).
    pub flushes: u64,
    /// `write`/`writev` calls made by flushes: `frames_queued / writes` is how
    /// many frames share one system call.
    pub writes: u64,
    /// Passes whose flush waited for the next pass (`server::Output`):
    /// how often saturation made output wait for company.
    pub held_passes: u64,
    /// Slab slots freed by `reap`.
    pub removed: u64,
    /// Connections closed with 1013 to stay under `--memory-limit`.
    pub memory_sheds: u64,
    /// Times the server went over `--memory-limit` (shedding episodes).
    pub memory_episodes: u64,
}

impl LoopCounters {
    pub fn reject(&mut self, why: Reject) {
        self.rejected[why as usize] += 1;
    }

    /// One iteration took `wall_us` microseconds, `cpu_us` of them on CPU.
    pub fn iteration(&mut self, wall_us: u64, cpu_us: u64) {
        self.iterations += 1;
        self.busy_us += cpu_us;
        self.slowest_iteration_us = self.slowest_iteration_us.max(wall_us);
        self.slowest_iteration_cpu_us = self.slowest_iteration_cpu_us.max(cpu_us);
        for (count, ms) in self.iterations_over.iter_mut().zip(ITERATION_OVER_MS) {
            if cpu_us > ms * 1000 {
                *count += 1;
            }
        }
    }
}

/// Everything `/stats` and `/metrics` show, gathered at request time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub uptime_s: u64,
    pub by_state: Vec<(&'static str, u64)>,
    /// Open WebSocket sessions.
    pub connections: u64,
    pub rooms: u64,
    pub members: u64,
    pub loops: LoopCounters,
    pub messages: u64,
    pub deliveries: u64,
    pub directs: u64,
    pub rate_limited: u64,
    pub floods: u64,
    pub errors_sent: u64,
    pub unkept: u64,
    pub outbox_bytes: u64,
    /// Deadlines pending in the timer heap (at most one per connection).
    pub timers: u64,
    pub store: Vec<(&'static str, u64)>,
    pub max_connections: u64,
    /// Resident memory of the process, bytes (from /proc; 0 elsewhere).
    pub rss_bytes: u64,
    /// CPU time of the process, user + system, milliseconds.
    pub cpu_ms: u64,
    /// `--memory-limit` (0: none).
    pub memory_limit_bytes: u64,
    /// What the memory account holds (the heap, see `memory.rs`).
    pub memory_used_bytes: u64,
    /// Cluster mode only (empty otherwise): `redis_connected`, `nodes`
    /// and the engine's counters, shown as top-level fields.
    pub cluster: Vec<(&'static str, u64)>,
}

/// This process's resident memory (bytes) and CPU time (ms), from
/// `/proc/self`. Both are small in-memory reads, cheap enough for a
/// `/stats` request; zeros where `/proc` is missing.
pub fn process_usage() -> (u64, u64) {
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    // Fields 14 and 15 (utime, stime) in clock ticks; the command name in
    // field 2 may hold spaces, so count from the closing parenthesis.
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (rss_kb * 1024, ticks * 1000 / hz)
}

impl Snapshot {
    /// The `/stats` body.
    pub fn to_json(&self) -> String {
        let by_state: serde_json::Map<String, serde_json::Value> = self
            .by_state
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        let rejected: serde_json::Map<String, serde_json::Value> = Reject::ALL
            .iter()
            .map(|r| {
                (
                    r.label().to_string(),
                    self.loops.rejected[*r as usize].into(),
                )
            })
            .collect();
        let store: serde_json::Map<String, serde_json::Value> = self
            .store
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        let l = &self.loops;
        let over: serde_json::Map<String, serde_json::Value> = ITERATION_OVER_MS
            .iter()
            .zip(l.iterations_over)
            .map(|(ms, n)| (ms.to_string(), n.into()))
            .collect();
        let mut body = serde_json::json!({
            "connections": self.connections,
            "rooms": self.rooms,
            "messages": self.messages,
            "bytes_in": l.bytes_in,
            "bytes_out": l.bytes_out,
            "uptime_s": self.uptime_s,
            "members": self.members,
            "max_connections": self.max_connections,
            "connections_by_state": by_state,
            "accepted": l.accepted,
            "rejected": rejected,
            "sessions_opened": l.sessions_opened,
            "sessions_closed": l.sessions_closed,
            "deliveries": self.deliveries,
            "directs": self.directs,
            "rate_limited": self.rate_limited,
            "flood_closes": self.floods,
            "errors_sent": self.errors_sent,
            "unkept_messages": self.unkept,
            "slow_consumer_drops": l.slow_consumer_drops,
            "heartbeat_timeouts": l.heartbeat_timeouts,
            "protocol_closes": l.protocol_closes,
            "accept_fd_exhausted": l.accept_fd_exhausted,
            "outbox_bytes": self.outbox_bytes,
            "timers": self.timers,
            "loop_iterations": l.iterations,
            "loop_slowest_us": l.slowest_iteration_us,
            "loop_slowest_cpu_us": l.slowest_iteration_cpu_us,
            "loop_iterations_over_ms": over,
            "loop_cpu_us": l.busy_us,
            "loop_deferred": l.deferred,
            "http_answers": l.http_answers,
            "store": store,
            "rss_bytes": self.rss_bytes,
            "cpu_seconds": self.cpu_ms as f64 / 1000.0,
            "memory_limit_bytes": self.memory_limit_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_sheds": l.memory_sheds,
            "memory_episodes": l.memory_episodes,
        });
        if let Some(fields) = body.as_object_mut() {
            // Outside the json! literal, which has a recursion limit.
            for (name, value) in [
                ("frames_in", l.frames_in),
                ("frames_queued", l.frames_queued),
                ("flushes", l.flushes),
                ("writes", l.writes),
                ("held_passes", l.held_passes),
            ] {
                fields.insert(name.to_string(), value.into());
            }
            for (name, value) in &self.cluster {
                fields.insert(name.to_string(), (*value).into());
            }
        }
        body.to_string()
    }

    /// The `/metrics` body (Prometheus text exposition format 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let l = &self.loops;
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP loopchat_{name} {help}");
            let _ = writeln!(out, "# TYPE loopchat_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "loopchat_{name}{labels} {value}");
            }
        };
        metric(
            "connections",
            "gauge",
            "Open WebSocket sessions.",
            &[("", self.connections)],
        );
        let by_state: Vec<(String, u64)> = self
            .by_state
            .iter()
            .map(|(s, v)| (format!("{{state=\"{s}\"}}"), *v))
            .collect();
        let by_state: Vec<(&str, u64)> = by_state.iter().map(|(s, v)| (s.as_str(), *v)).collect();
        metric(
            "connections_by_state",
            "gauge",
            "Connections per state.",
            &by_state,
        );
        metric(
            "max_connections",
            "gauge",
            "Connection limit.",
            &[("", self.max_connections)],
        );
        metric("rooms", "gauge", "Live rooms.", &[("", self.rooms)]);
        for (name, value) in &self.cluster {
            metric(
                name,
                "gauge",
                "Cluster mode (docs/cluster.md).",
                &[("", *value)],
            );
        }
        metric(
            "memory_limit_bytes",
            "gauge",
            "The --memory-limit (0: none).",
            &[("", self.memory_limit_bytes)],
        );
        metric(
            "memory_used_bytes",
            "gauge",
            "Heap the server holds (what the memory limit counts).",
            &[("", self.memory_used_bytes)],
        );
        metric(
            "memory_sheds_total",
            "counter",
            "Connections closed with 1013 to stay under the memory limit.",
            &[("", l.memory_sheds)],
        );
        metric(
            "memory_episodes_total",
            "counter",
            "Times the server went over the memory limit.",
            &[("", l.memory_episodes)],
        );
        metric(
            "timers",
            "gauge",
            "Deadlines pending (at most one per connection).",
            &[("", self.timers)],
        );
        metric(
            "accepted_total",
            "counter",
            "TCP connections accepted.",
            &[("", l.accepted)],
        );
        let rejected: Vec<(String, u64)> = Reject::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.label()),
                    l.rejected[*r as usize],
                )
            })
            .collect();
        let rejected: Vec<(&str, u64)> = rejected.iter().map(|(s, v)| (s.as_str(), *v)).collect();
        metric(
            "rejected_total",
            "counter",
            "Connections refused, by reason.",
            &rejected,
        );
        metric(
            "sessions_opened_total",
            "counter",
            "WebSocket sessions opened.",
            &[("", l.sessions_opened)],
        );
        metric(
            "sessions_closed_total",
            "counter",
            "WebSocket sessions closed.",
            &[("", l.sessions_closed)],
        );
        metric(
            "messages_in_total",
            "counter",
            "Room messages accepted.",
            &[("", self.messages)],
        );
        metric(
            "messages_out_total",
            "counter",
            "Room message deliveries queued.",
            &[("", self.deliveries)],
        );
        metric(
            "directs_total",
            "counter",
            "Direct messages sent.",
            &[("", self.directs)],
        );
        metric(
            "bytes_in_total",
            "counter",
            "Bytes read from sockets.",
            &[("", l.bytes_in)],
        );
        metric(
            "bytes_out_total",
            "counter",
            "Bytes written to sockets.",
            &[("", l.bytes_out)],
        );
        metric(
            "slow_consumer_drops_total",
            "counter",
            "Connections closed for not reading.",
            &[("", l.slow_consumer_drops)],
        );
        metric(
            "rate_limited_total",
            "counter",
            "Commands refused by the rate limit.",
            &[("", self.rate_limited)],
        );
        metric(
            "flood_closes_total",
            "counter",
            "Connections closed for flooding.",
            &[("", self.floods)],
        );
        metric(
            "heartbeat_timeouts_total",
            "counter",
            "Connections dropped for missed heartbeats.",
            &[("", l.heartbeat_timeouts)],
        );
        metric(
            "protocol_closes_total",
            "counter",
            "Connections closed for protocol violations.",
            &[("", l.protocol_closes)],
        );
        metric(
            "errors_sent_total",
            "counter",
            "error events sent.",
            &[("", self.errors_sent)],
        );
        metric(
            "accept_fd_exhausted_total",
            "counter",
            "accept() failures for lack of file descriptors.",
            &[("", l.accept_fd_exhausted)],
        );
        metric(
            "outbox_bytes",
            "gauge",
            "Unsent output bytes, all connections.",
            &[("", self.outbox_bytes)],
        );
        metric(
            "loop_iterations_total",
            "counter",
            "Poll loop iterations.",
            &[("", l.iterations)],
        );
        metric(
            "loop_slowest_iteration_microseconds",
            "gauge",
            "Longest loop iteration so far.",
            &[("", l.slowest_iteration_us)],
        );
        metric(
            "frames_queued_total",
            "counter",
            "Frames queued in outboxes.",
            &[("", l.frames_queued)],
        );
        metric(
            "writes_total",
            "counter",
            "write and writev calls made by outbox flushes.",
            &[("", l.writes)],
        );
        metric(
            "held_passes_total",
            "counter",
            "Passes whose flush waited one pass under saturation.",
            &[("", l.held_passes)],
        );
        metric(
            "loop_deferred_total",
            "counter",
            "Reads, flushes and accepts a pass left for the next (its budget spent).",
            &[("", l.deferred)],
        );
        for (name, value) in &self.store {
            let kind = if name.ends_with("_us") || name.ends_with("_bytes") {
                "gauge"
            } else {
                "counter"
            };
            let full = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            metric(&full, kind, "History store.", &[("", *value)]);
        }
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since start.",
            &[("", self.uptime_s)],
        );
        // A histogram in microseconds (integers), from the "over" counts.
        let name = "loopchat_loop_iteration_cpu_microseconds";
        let _ = writeln!(out, "# HELP {name} CPU time of each loop iteration.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (ms, over) in ITERATION_OVER_MS.iter().zip(l.iterations_over) {
            let le = ms * 1000;
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                l.iterations.saturating_sub(over)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", l.iterations);
        let _ = writeln!(out, "{name}_sum {}", l.busy_us);
        let _ = writeln!(out, "{name}_count {}", l.iterations);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_contract_fields() {
        let s = Snapshot {
            connections: 3,
            messages: 7,
            ..Snapshot::default()
        };
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        for field in CONTRACT_FIELDS {
            assert!(v[field].is_u64(), "{field} missing");
        }
        assert_eq!(v["connections"], 3);
    }

    #[test]
    fn process_usage_reads_proc() {
        let (rss, _cpu) = process_usage();
        assert!(rss > 0, "a running test process has resident memory");
    }

    #[test]
    fn prometheus_lines_parse() {
        let mut s = Snapshot {
            by_state: vec![("open", 2)],
            store: vec![("store_appends", 4), ("store_sync_max_us", 9)],
            ..Snapshot::default()
        };
        s.loops.reject(Reject::Taken);
        let text = s.to_prometheus();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            assert!(name.starts_with("loopchat_"), "{line}");
            value.parse::<f64>().expect("numeric value");
        }
        assert!(text.contains("loopchat_rejected_total{reason=\"taken\"} 1"));
        assert!(text.contains("loopchat_store_appends_total 4"));
        assert!(text.contains("loopchat_connections_by_state{state=\"open\"} 2"));
    }

    #[test]
    fn iteration_durations_are_counted_over_each_threshold() {
        let mut s = Snapshot::default();
        for us in [400, 1_500, 12_000, 250_000] {
            s.loops.iteration(us + 7, us);
        }
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["loop_iterations"], 4);
        assert_eq!(v["loop_slowest_us"], 250_007);
        assert_eq!(v["loop_slowest_cpu_us"], 250_000);
        assert_eq!(v["loop_cpu_us"], 263_900);
        let over = &v["loop_iterations_over_ms"];
        assert_eq!(
            ["1", "2", "5", "10", "20", "50", "100"].map(|k| over[k].as_u64().unwrap()),
            [3, 2, 2, 2, 1, 1, 1]
        );
        let text = s.to_prometheus();
        assert!(text.contains("loopchat_loop_iteration_cpu_microseconds_bucket{le=\"1000\"} 1"));
        assert!(text.contains("loopchat_loop_iteration_cpu_microseconds_bucket{le=\"10000\"} 2"));
        assert!(text.contains("loopchat_loop_iteration_cpu_microseconds_bucket{le=\"+Inf\"} 4"));
        assert!(text.contains("loopchat_loop_iteration_cpu_microseconds_count 4"));
    }
}
