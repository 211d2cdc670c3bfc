//! The `idle` scenario: open `--conns` sessions at `--rate` per second, hold
//! them for `--hold-s`, close them. Measures connect time (socket() to
//! `welcome`) on the client, and on the server (via `--pid` or `/stats`) the
//! memory each idle session costs and the CPU the server burns while nothing
//! happens (heartbeats, timers). Sessions are grouped `--room-size` to a room,
//! as one giant room would measure join-notice fan-out instead of idleness.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::args::Options;
use crate::conn::{ConnEvent, Ended};
use crate::crew::{Crew, Note, RunError, Worker, STOP};
use crate::driver::Driver;
use crate::hist::Histogram;
use crate::probe::Probe;
use crate::report::{self, Report};
use crate::wire::{self, Tally};

/// Connections opened per loop turn at most, so a high `--rate` cannot
/// starve the reading of the connections already open.
const OPEN_BATCH: usize = 256;

/// Upper bound on one poll wait, so timers are checked even when idle.
const MAX_WAIT: Duration = Duration::from_millis(100);

struct Peer {
    n: u64,
    welcomed: bool,
}

#[derive(Default)]
struct Share {
    connect: Histogram,
    opened: u64,
    failures: Tally,
    /// Sessions the server ended while we held them.
    dropped: Tally,
    errors: Tally,
}

fn worker(w: &Worker, o: &Options) -> Result<Share, String> {
    let timeout = Duration::from_secs_f64(o.connect_timeout_s);
    let mut d = Driver::<Peer>::for_worker(w, &o.target, o.src_addrs, timeout)?;
    let mine: Vec<u64> = w.share(o.conns).collect();
    let rate = o.rate / w.threads as f64;
    let start = Instant::now();
    let mut share = Share::default();
    let (mut next, mut settled, mut noted, mut stopping) = (0usize, 0usize, false, false);
    let mut events = Vec::new();
    loop {
        let now = Instant::now();
        if !stopping {
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
                if let Err(e) = d.open(&params, Peer { n, welcomed: false }, now) {
                    wire::bump(&mut share.failures, e.label());
                    w.shared.counters.failed.fetch_add(1, Relaxed);
                    settled += 1;
                }
                next += 1;
                budget -= 1;
            }
        }
        if !noted && settled == mine.len() {
            noted = true;
            w.note(Note::Settled);
        }
        if stopping && d.len() == 0 {
            return Ok(share);
        }
        d.flush();
        let wait = if !stopping && next < mine.len() {
            let due_at = start + Duration::from_secs_f64(next as f64 / rate);
            due_at.saturating_duration_since(now).min(MAX_WAIT)
        } else {
            MAX_WAIT
        };
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
                    if ev.kind == "welcome" && !conn.peer.welcomed {
                        conn.peer.welcomed = true;
                        conn.set_deadline(None);
                        share
                            .connect
                            .record(now.duration_since(conn.started).as_micros() as u64);
                        share.opened += 1;
                        settled += 1;
                        w.shared.counters.opened.fetch_add(1, Relaxed);
                        if let Some(l) = ev.limits.as_ref().and_then(|l| l.limits()) {
                            let _ = w.shared.limits.set(l);
                        }
                    } else if ev.kind == "error" {
                        wire::bump(
                            &mut share.errors,
                            ev.code.as_deref().unwrap_or("?").to_string(),
                        );
                    }
                }
                ConnEvent::Ended(how) => {
                    if !conn.peer.welcomed {
                        let why = if stopping {
                            "stopped before welcome".to_string()
                        } else {
                            how.label()
                        };
                        log::debug!("session {} failed: {why}", conn.peer.n);
                        wire::bump(&mut share.failures, why);
                        w.shared.counters.failed.fetch_add(1, Relaxed);
                        settled += 1;
                    } else if !stopping || !matches!(how, Ended::Clean) {
                        wire::bump(&mut share.dropped, how.label());
                    }
                }
            }
        }
        if !stopping && w.shared.phase() == STOP {
            stopping = true;
            d.close_all(now);
        }
    }
}

pub fn run(o: &Options, probe: &Probe) -> Result<Report, RunError> {
    let before = probe.sample();
    let mut crew = Crew::spawn_scenario(o.threads, 0, o, worker)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(o.duration_s);
    let mut progress = crate::progress(o);
    let shared = crew.shared.clone();
    let c = &shared.counters;
    let line = |phase: &str, t: f64| {
        format!(
            "idle {t:5.1}s {phase}: open {}/{} failed {}",
            c.opened.load(Relaxed),
            o.conns,
            c.failed.load(Relaxed)
        )
    };
    while crew.settled < crew.threads && Instant::now() < deadline {
        crew.wait(progress.next_due().min(deadline))?;
        progress.tick(|t| line("opening", t));
    }
    let open_elapsed = started.elapsed().as_secs_f64();
    let at_open = probe.sample();
    let hold_end = (Instant::now() + Duration::from_secs_f64(o.hold_s)).min(deadline);
    while Instant::now() < hold_end {
        crew.wait(progress.next_due().min(hold_end))?;
        progress.tick(|t| line("holding", t));
    }
    let after = probe.sample();
    progress.clear();
    let mut total = Share::default();
    for share in crew.finish()? {
        let share = share.map_err(RunError::Worker)?;
        total.connect.merge(&share.connect);
        total.opened += share.opened;
        wire::merge(&mut total.failures, share.failures);
        wire::merge(&mut total.dropped, share.dropped);
        wire::merge(&mut total.errors, share.errors);
    }
    let failures: u64 = total.failures.values().sum();
    let dropped: u64 = total.dropped.values().sum();
    let rss_per_conn = after
        .rss_growth_kb(&before)
        .filter(|_| total.opened > 0)
        .map(|kb| kb as f64 / total.opened as f64);
    let hold_cpu = after
        .cpu_since(&at_open)
        .zip(after.wall_since(&at_open))
        .filter(|(_, w)| *w > 0.0);
    let cpu_pct = hold_cpu.map(|(cpu, wall)| cpu / wall * 100.0);
    let json = json!({
        "scenario": "idle",
        "url": o.url,
        "threads": o.threads,
        "conns": o.conns,
        "opened": total.opened,
        "failures": failures,
        "failure_reasons": report::tally_json(&total.failures),
        "dropped_during_hold": dropped,
        "dropped_reasons": report::tally_json(&total.dropped),
        "errors": report::tally_json(&total.errors),
        "open_s": report::round(open_elapsed, 3),
        "open_rate_per_s": report::round(total.opened as f64 / open_elapsed.max(1e-9), 1),
        "connect": report::latency_json(&total.connect),
        "hold_s": report::round(after.wall_since(&at_open).unwrap_or(0.0), 3),
        "server": {
            "pid": probe.pid(),
            "cpu_per_pid": after.cpu_each_since(&at_open),
            "rss_before_kb": before.rss_kb,
            "rss_open_kb": at_open.rss_kb,
            "rss_after_kb": after.rss_kb,
            "rss_per_conn_kb": rss_per_conn.map(|x| report::round(x, 2)),
            "idle_cpu_percent": cpu_pct.map(|x| report::round(x, 2)),
            "stats_connections_at_open": at_open.connections,
        },
    });
    let mut human = String::new();
    human += &format!(
        "idle: {} of {} sessions opened in {open_elapsed:.2} s via {}\n",
        total.opened, o.conns, o.url
    );
    human += &format!(
        "  connect (socket to welcome): {}\n",
        report::latency_line(&total.connect)
    );
    human += &format!(
        "  failures: {failures} ({})\n",
        report::tally_line(&total.failures)
    );
    human += &format!(
        "  dropped while held: {dropped} ({})\n",
        report::tally_line(&total.dropped)
    );
    if !total.errors.is_empty() {
        human += &format!("  error events: {}\n", report::tally_line(&total.errors));
    }
    if let Some(n) = at_open.connections {
        human += &format!("  server /stats connections once open: {n}\n");
    }
    if before.rss_kb.is_some() {
        human += &format!(
            "  server RSS: before {} kB, all open {} kB, end of hold {} kB\n",
            fmt_opt(before.rss_kb),
            fmt_opt(at_open.rss_kb),
            fmt_opt(after.rss_kb)
        );
    }
    human += &format!(
        "  server RSS per session: {}\n",
        report::or_na(rss_per_conn.map(|x| format!("{x:.2} kB")))
    );
    human += &format!(
        "  server CPU while idle: {}\n",
        report::or_na(cpu_pct.map(|x| format!("{x:.2} % of one core over the hold")))
    );
    Ok(Report {
        json,
        human,
        ok: failures == 0 && dropped == 0 && total.opened == o.conns,
    })
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "?".into())
}
