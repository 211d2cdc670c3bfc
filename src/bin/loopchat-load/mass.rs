//! The `mass` scenario: many sessions arrive at once and leave at once,
//! while a few bystanders chat in a room of their own and time every
//! message. It shows what a mass event costs everyone else: the server's
//! slowest loop iterations during it (from `/stats`), and the bystanders'
//! latency, phase by phase.
//!
//! ```text
//! probes join ─┬─ connect: --conns sessions, --room-size to a room, at --rate
//!              ├─ hold --hold-s
//!              ├─ leave: every session closes at the same moment (--leave)
//!              └─ drained: /stats shows only the probes left
//! ```
//!
//! The probes run on a thread of their own (worker `--threads`), so the
//! mass sessions' traffic in the tool does not delay their reading. A probe
//! message's content is `p<probe>:<seq>:<µs>:<phase>`, stamped when it was
//! due on the crew's shared clock (no coordinated omission), and counted
//! in the phase it was sent in.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::args::{LeaveHow, Options};
use crate::conn::{ConnEvent, Ended};
use crate::crew::{Crew, Note, RunError, Worker, GO, LEAVE, STOP};
use crate::driver::Driver;
use crate::hist::Histogram;
use crate::probe::{self, Probe};
use crate::report::{self, Report};
use crate::wire::{self, Tally};

const OPEN_BATCH: usize = 256;
const MAX_WAIT: Duration = Duration::from_millis(20);
/// How often the main thread asks `/stats` whether the leave has drained.
const DRAIN_CHECK: Duration = Duration::from_millis(50);
/// Probes keep chatting this long after the drain, so the tail of the
/// leave shows in their latency.
const AFTER: Duration = Duration::from_millis(500);

/// The phases a probe message can be sent in (index into `Probes::phase`).
const PHASES: [&str; 4] = ["connect", "hold", "leave", "after"];

/// Thresholds of the server's `loop_iterations_over_ms` (`/stats`).
const OVER_MS: [&str; 7] = ["1", "2", "5", "10", "20", "50", "100"];

struct Probes {
    /// The phase probe messages are being sent in now (index into PHASES;
    /// `QUIET` once the probes should stop sending).
    phase: AtomicU8,
    /// Mass workers that have closed their sessions.
    closed: AtomicUsize,
    /// Probe messages sent, and probe deliveries received, so far.
    sent: AtomicU64,
    received: AtomicU64,
}

/// The probes stop sending, so that what they sent can all come back.
const QUIET: u8 = PHASES.len() as u8;

/// How long the end of a run waits for the last probe messages.
const LAST_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Share {
    opened: u64,
    failures: Tally,
    dropped: Tally,
    errors: Tally,
    /// Probe latency per phase.
    latency: [Histogram; 4],
    probe_sent: u64,
    probe_received: u64,
}

fn worker(w: &Worker, o: &Options, probes: &Probes) -> Result<Share, String> {
    if w.index == o.threads {
        probe_worker(w, o, probes)
    } else {
        mass_worker(w, o, probes)
    }
}

fn mass_worker(w: &Worker, o: &Options, probes: &Probes) -> Result<Share, String> {
    let timeout = Duration::from_secs_f64(o.connect_timeout_s);
    let mut d = Driver::<bool>::for_worker(w, &o.target, o.src_addrs, timeout)?;
    let mine: Vec<u64> = (w.index as u64..o.conns).step_by(o.threads).collect();
    let rate = o.rate / o.threads as f64;
    let mut share = Share::default();
    let (mut next, mut settled, mut noted) = (0usize, 0usize, false);
    let mut start: Option<Instant> = None;
    let mut left = false;
    let mut events = Vec::new();
    loop {
        let now = Instant::now();
        let phase = w.shared.phase();
        if phase >= GO && start.is_none() {
            start = Some(now);
        }
        if let (Some(start), false) = (start, left) {
            let due =
                ((now.duration_since(start).as_secs_f64() * rate) as usize + 1).min(mine.len());
            let mut budget = OPEN_BATCH;
            while next < due && budget > 0 {
                let n = mine[next];
                let params = format!(
                    "username={}{n}&room={}-{}",
                    o.user_prefix,
                    o.room,
                    n / o.room_size
                );
                if let Err(e) = d.open(&params, false, now) {
                    wire::bump(&mut share.failures, e.label());
                    w.shared.counters.failed.fetch_add(1, Relaxed);
                    settled += 1;
                }
                next += 1;
                budget -= 1;
            }
        }
        if !noted && start.is_some() && settled == mine.len() {
            noted = true;
            w.note(Note::Settled);
        }
        if phase >= LEAVE && !left {
            left = true;
            match o.leave {
                LeaveHow::Close => d.close_all(now),
                LeaveHow::Drop => d.drop_all(),
            }
            probes.closed.fetch_add(1, SeqCst);
        }
        if left && d.len() == 0 {
            if phase == STOP {
                return Ok(share);
            }
            // Wait for STOP without spinning.
            d.turn(Some(Duration::from_millis(100)), &mut events)
                .map_err(|e| format!("poll: {e}"))?;
            events.clear();
            continue;
        }
        d.flush();
        d.turn(Some(MAX_WAIT), &mut events)
            .map_err(|e| format!("poll: {e}"))?;
        let now = Instant::now();
        for (key, event) in events.drain(..) {
            let Some(conn) = d.get(key) else { continue };
            match event {
                ConnEvent::Open => conn.set_deadline(Some((now + timeout, "welcome"))),
                ConnEvent::Text(text) => {
                    let Some(ev) = wire::parse(&text) else {
                        continue;
                    };
                    if ev.kind == "welcome" && !conn.peer {
                        conn.peer = true;
                        conn.set_deadline(None);
                        share.opened += 1;
                        settled += 1;
                        w.shared.counters.opened.fetch_add(1, Relaxed);
                    } else if ev.kind == "error" {
                        wire::bump(
                            &mut share.errors,
                            ev.code.as_deref().unwrap_or("?").to_string(),
                        );
                    }
                }
                ConnEvent::Ended(how) => {
                    if !conn.peer {
                        wire::bump(&mut share.failures, how.label());
                        w.shared.counters.failed.fetch_add(1, Relaxed);
                        settled += 1;
                    } else if !left || !matches!(how, Ended::Clean) {
                        wire::bump(&mut share.dropped, how.label());
                    }
                }
            }
        }
        if phase == STOP && !left {
            // Stopped early (deadline): close what is open and finish.
            left = true;
            d.close_all(now);
        }
    }
}

fn probe_content(probe: u64, seq: u64, t_us: u64, phase: u8) -> String {
    format!("p{probe}:{seq}:{t_us}:{phase}")
}

fn parse_probe(c: &str) -> Option<(u64, u8)> {
    let mut it = c.strip_prefix('p')?.split(':');
    let _probe: u64 = it.next()?.parse().ok()?;
    let _seq: u64 = it.next()?.parse().ok()?;
    let t: u64 = it.next()?.parse().ok()?;
    let phase: u8 = it.next()?.parse().ok()?;
    (usize::from(phase) < PHASES.len()).then_some((t, phase))
}

fn probe_worker(w: &Worker, o: &Options, probes: &Probes) -> Result<Share, String> {
    let timeout = Duration::from_secs_f64(o.connect_timeout_s);
    let mut d = Driver::<Option<u64>>::for_worker(w, &o.target, o.src_addrs, timeout)?;
    let room = format!("{}-probe", o.room);
    let now = Instant::now();
    let mut share = Share::default();
    let mut keys = Vec::new();
    for p in 0..o.probes {
        let params = format!("username={}p{p}&room={room}", o.user_prefix);
        match d.open(&params, None, now) {
            Ok(key) => keys.push((p, key)),
            Err(e) => return Err(format!("probe {p} cannot connect: {e}")),
        }
    }
    let interval = Duration::from_secs_f64(1.0 / o.probe_rate);
    let (mut welcomed, mut noted, mut stopping) = (0u64, false, false);
    let mut next_due: Option<Instant> = None;
    let mut seq = 0u64;
    let mut events = Vec::new();
    loop {
        let now = Instant::now();
        let phase = w.shared.phase();
        if phase == STOP && !stopping {
            stopping = true;
            d.close_all(now);
        }
        if stopping && d.len() == 0 {
            return Ok(share);
        }
        let mut wait = MAX_WAIT;
        let sending = probes.phase.load(SeqCst) < QUIET;
        if let (Some(due), false, true) = (next_due, stopping, sending) {
            let mut due = due;
            // Every probe sends once per interval; a late turn sends what
            // was due, stamped with when it was due.
            while due <= now {
                let stamp = probes.phase.load(SeqCst);
                for &(p, key) in &keys {
                    let text = wire::message_command(
                        &room,
                        &probe_content(p, seq, w.shared.micros(due), stamp),
                    );
                    if d.send_text(key, &text) {
                        share.probe_sent += 1;
                        probes.sent.fetch_add(1, SeqCst);
                    }
                }
                seq += 1;
                due += interval;
            }
            next_due = Some(due);
            wait = wait.min(due.saturating_duration_since(now));
        }
        d.flush();
        d.turn(Some(wait), &mut events)
            .map_err(|e| format!("poll: {e}"))?;
        let now = Instant::now();
        for (key, event) in events.drain(..) {
            let Some(conn) = d.get(key) else { continue };
            match event {
                ConnEvent::Open => conn.set_deadline(Some((now + timeout, "welcome"))),
                ConnEvent::Text(text) => {
                    let Some(ev) = wire::parse(&text) else {
                        continue;
                    };
                    match ev.kind.as_ref() {
                        "welcome" if conn.peer.is_none() => {
                            conn.peer = Some(0);
                            conn.set_deadline(None);
                            welcomed += 1;
                        }
                        "message" => {
                            let Some((t, ph)) = ev.content.as_deref().and_then(parse_probe) else {
                                continue;
                            };
                            let lat = w.shared.micros(now).saturating_sub(t);
                            share.latency[usize::from(ph)].record(lat);
                            share.probe_received += 1;
                            probes.received.fetch_add(1, SeqCst);
                        }
                        "error" => wire::bump(
                            &mut share.errors,
                            format!("probe {}", ev.code.as_deref().unwrap_or("?")),
                        ),
                        _ => {}
                    }
                }
                ConnEvent::Ended(how) => {
                    if !stopping {
                        // The run goes on without it; the report says so.
                        wire::bump(&mut share.dropped, format!("probe: {}", how.label()));
                        keys.retain(|&(_, k)| k != key);
                    }
                }
            }
        }
        if !noted && welcomed == o.probes {
            noted = true;
            next_due = Some(Instant::now());
            w.note(Note::Settled);
        }
    }
}

/// The server's counters the report compares across phases.
#[derive(Clone, Default)]
struct StatsPoint {
    connections: Option<u64>,
    iterations: Option<u64>,
    slowest_us: Option<u64>,
    slowest_wall_us: Option<u64>,
    over: Vec<Option<u64>>,
    deferred: Option<u64>,
    cpu_s: Option<f64>,
    at: Option<Instant>,
}

fn stats_point(o: &Options, p: &Probe) -> StatsPoint {
    let stats = probe::fetch_stats(&o.target);
    let field = |name: &str| stats.as_ref()?.get(name)?.as_u64();
    let over = OVER_MS
        .iter()
        .map(|ms| {
            stats
                .as_ref()?
                .get("loop_iterations_over_ms")?
                .get(*ms)?
                .as_u64()
        })
        .collect();
    StatsPoint {
        connections: field("connections"),
        iterations: field("loop_iterations"),
        slowest_us: field("loop_slowest_cpu_us"),
        slowest_wall_us: field("loop_slowest_us"),
        over,
        deferred: field("loop_deferred"),
        cpu_s: p.sample().cpu_s,
        at: Some(Instant::now()),
    }
}

fn phase_json(name: &str, from: &StatsPoint, to: &StatsPoint, latency: &Histogram) -> Value {
    let diff = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    let over: serde_json::Map<String, Value> = OVER_MS
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let d = diff(
                from.over.get(i).copied().flatten(),
                to.over.get(i).copied().flatten(),
            );
            (ms.to_string(), json!(d))
        })
        .collect();
    let wall = to
        .at
        .zip(from.at)
        .map(|(b, a)| b.saturating_duration_since(a).as_secs_f64());
    json!({
        "phase": name,
        "wall_s": wall.map(|x| report::round(x, 3)),
        "server_cpu_s": to.cpu_s.zip(from.cpu_s).map(|(b, a)| report::round(b - a, 3)),
        "iterations": diff(from.iterations, to.iterations),
        "iterations_over_ms": over,
        "deferred": diff(from.deferred, to.deferred),
        "probe_latency": report::latency_json(latency),
    })
}

fn phase_line(name: &str, v: &Value) -> String {
    let over = &v["iterations_over_ms"];
    let worst = OVER_MS
        .iter()
        .rev()
        .find(|ms| over[**ms].as_u64().is_some_and(|n| n > 0))
        .map_or("none over 1 ms".to_string(), |ms| {
            format!("some over {ms} ms")
        });
    format!(
        "  {name:<8} {:>7} s wall, server CPU {} s, {} iterations ({worst}; over 10 ms: {}), \
         deferred {}\n           probe latency {}\n",
        v["wall_s"],
        v["server_cpu_s"],
        v["iterations"],
        over["10"],
        v["deferred"],
        v["probe_latency_line"].as_str().unwrap_or("")
    )
}

pub fn run(o: &Options, probe: &Probe) -> Result<Report, RunError> {
    let probes = Arc::new(Probes {
        phase: AtomicU8::new(0),
        closed: AtomicUsize::new(0),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
    let shared_probes = probes.clone();
    let mut crew = Crew::spawn_scenario(o.threads + 1, 0, o, move |w, o| {
        worker(w, o, &shared_probes)
    })?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(o.duration_s);
    let mut progress = crate::progress(o);
    let shared = crew.shared.clone();
    let c = &shared.counters;
    let line = |phase: &str, t: f64| {
        format!(
            "mass {t:5.1}s {phase}: open {}/{} failed {}",
            c.opened.load(Relaxed),
            o.conns,
            c.failed.load(Relaxed)
        )
    };
    // The probes first.
    while crew.settled < 1 && Instant::now() < deadline {
        crew.wait(progress.next_due().min(deadline))?;
        progress.tick(|t| line("probes joining", t));
    }
    let mut points = vec![stats_point(o, probe)];
    crew.go(Instant::now());
    while crew.settled < o.threads + 1 && Instant::now() < deadline {
        crew.wait(progress.next_due().min(deadline))?;
        progress.tick(|t| line("connecting", t));
    }
    points.push(stats_point(o, probe));
    probes.phase.store(1, SeqCst);
    let hold_end = (Instant::now() + Duration::from_secs_f64(o.hold_s)).min(deadline);
    while Instant::now() < hold_end {
        crew.wait(progress.next_due().min(hold_end))?;
        progress.tick(|t| line("holding", t));
    }
    points.push(stats_point(o, probe));
    probes.phase.store(2, SeqCst);
    crew.set_phase(LEAVE);
    // Drained when only the probes are left.
    let mut drained = false;
    while Instant::now() < deadline {
        let p = stats_point(o, probe);
        if probes.closed.load(SeqCst) == o.threads && p.connections == Some(o.probes) {
            drained = true;
            break;
        }
        progress.tick(|t| line("leaving", t));
        std::thread::sleep(DRAIN_CHECK);
    }
    points.push(stats_point(o, probe));
    probes.phase.store(3, SeqCst);
    let after_end = (Instant::now() + AFTER).min(deadline);
    while Instant::now() < after_end {
        crew.wait(after_end)?;
    }
    points.push(stats_point(o, probe));
    // Let the last probe messages come back before STOP.
    probes.phase.store(QUIET, SeqCst);
    let last_end = Instant::now() + LAST_WAIT;
    while Instant::now() < last_end.min(deadline)
        && probes.received.load(SeqCst) < probes.sent.load(SeqCst) * o.probes
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    progress.clear();
    let mut total = Share::default();
    for s in crew.finish()? {
        let s = s.map_err(RunError::Worker)?;
        total.opened += s.opened;
        wire::merge(&mut total.failures, s.failures);
        wire::merge(&mut total.dropped, s.dropped);
        wire::merge(&mut total.errors, s.errors);
        for (t, h) in total.latency.iter_mut().zip(s.latency.iter()) {
            t.merge(h);
        }
        total.probe_sent += s.probe_sent;
        total.probe_received += s.probe_received;
    }
    let failures: u64 = total.failures.values().sum();
    let dropped: u64 = total.dropped.values().sum();
    // Every probe message reaches every probe (its sender included).
    let expected = total.probe_sent * o.probes;
    let mut phases = Vec::new();
    let mut human = format!(
        "mass: {} of {} sessions ({} to a room) via {}, {} probe(s) at {}/s, leave by {}\n",
        total.opened,
        o.conns,
        o.room_size,
        o.url,
        o.probes,
        o.probe_rate,
        o.leave.name()
    );
    for (i, name) in PHASES.iter().enumerate() {
        let mut v = phase_json(name, &points[i], &points[i + 1], &total.latency[i]);
        let text = report::latency_line(&total.latency[i]);
        v["probe_latency_line"] = json!(text);
        human += &phase_line(name, &v);
        if let Some(obj) = v.as_object_mut() {
            obj.remove("probe_latency_line");
        }
        phases.push(v);
    }
    let last = points.last().cloned().unwrap_or_default();
    human += &format!(
        "  server's slowest iteration since start: {} us of CPU, {} us of wall time; \
         drained: {drained}\n",
        last.slowest_us.map_or("?".into(), |x| x.to_string()),
        last.slowest_wall_us.map_or("?".into(), |x| x.to_string())
    );
    human += &format!(
        "  probe messages: {} sent, {} of {expected} deliveries received\n",
        total.probe_sent, total.probe_received
    );
    human += &format!(
        "  failures: {failures} ({}); dropped while held: {dropped} ({})\n",
        report::tally_line(&total.failures),
        report::tally_line(&total.dropped)
    );
    if !total.errors.is_empty() {
        human += &format!("  error events: {}\n", report::tally_line(&total.errors));
    }
    let json = json!({
        "scenario": "mass",
        "url": o.url,
        "conns": o.conns,
        "room_size": o.room_size,
        "opened": total.opened,
        "leave": o.leave.name(),
        "probes": o.probes,
        "probe_rate": o.probe_rate,
        "probe_sent": total.probe_sent,
        "probe_received": total.probe_received,
        "probe_expected": expected,
        "drained": drained,
        "failures": failures,
        "failure_reasons": report::tally_json(&total.failures),
        "dropped_during_hold": dropped,
        "dropped_reasons": report::tally_json(&total.dropped),
        "errors": report::tally_json(&total.errors),
        "slowest_iteration_cpu_us": last.slowest_us,
        "slowest_iteration_wall_us": last.slowest_wall_us,
        "phases": phases,
        "server": { "pid": probe.pid() },
    });
    Ok(Report {
        json,
        human,
        ok: failures == 0
            && dropped == 0
            && total.opened == o.conns
            && drained
            && total.probe_received == expected
            && total.errors.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_contents_round_trip() {
        assert_eq!(
            parse_probe(&probe_content(3, 9, 12345, 2)),
            Some((12345, 2))
        );
        assert_eq!(parse_probe("p1:2:3:9"), None);
        assert_eq!(parse_probe("s1:2:3:0"), None);
        assert_eq!(parse_probe("p1:2:x:0"), None);
    }
}
