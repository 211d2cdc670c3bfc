//! The `churn` scenario: sessions that live one exchange each — connect,
//! wait for `welcome`, send one message, wait for our own copy of it, send a
//! close frame and wait for the server's close (or EOF). `--concurrency` of
//! them in flight, `--cycles` in all. What it exercises is the server's
//! accept/handshake/teardown path; with `--pid`, the server's CPU time per
//! completed cycle (its cost of one whole session), and server RSS that
//! keeps growing from the middle of the run to its end points at a leak.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::args::Options;
use crate::conn::{ConnEvent, Ended};
use crate::crew::{Crew, Note, RunError, Worker, STOP};
use crate::driver::Driver;
use crate::hist::Histogram;
use crate::probe::{Probe, Sample};
use crate::report::{self, Report};
use crate::wire::{self, Tally};

const MAX_WAIT: Duration = Duration::from_millis(100);
/// How often the main thread looks at the cycle count, to take the
/// mid-run RSS sample close to the halfway point.
const MID_CHECK: Duration = Duration::from_millis(100);

#[derive(PartialEq, Eq)]
enum Stage {
    Welcome,
    Echo,
    Closing,
}

struct Peer {
    name: String,
    content: String,
    stage: Stage,
}

#[derive(Default)]
struct Share {
    welcome: Histogram,
    cycle: Histogram,
    completed: u64,
    failures: Tally,
    errors: Tally,
}

fn worker(w: &Worker, o: &Options) -> Result<Share, String> {
    let timeout = Duration::from_secs_f64(o.connect_timeout_s);
    let mut d = Driver::<Peer>::for_worker(w, &o.target, o.src_addrs, timeout)?;
    let c = &w.shared.counters;
    let slots = (o.concurrency / w.threads as u64
        + u64::from((w.index as u64) < o.concurrency % w.threads as u64)) as usize;
    let mut share = Share::default();
    let (mut exhausted, mut noted, mut stopping) = (false, false, false);
    let mut events = Vec::new();
    let mut actions = Vec::new();
    loop {
        let now = Instant::now();
        while !stopping && !exhausted && d.len() < slots {
            let n = w.shared.next_cycle.fetch_add(1, Relaxed);
            if n >= o.cycles {
                exhausted = true;
                break;
            }
            let name = format!("{}c{n}", o.user_prefix);
            let params = format!("username={name}&room={}", o.room);
            let peer = Peer {
                name,
                content: format!("c{n}"),
                stage: Stage::Welcome,
            };
            if let Err(e) = d.open(&params, peer, now) {
                wire::bump(&mut share.failures, e.label());
                c.failed.fetch_add(1, Relaxed);
            }
        }
        if exhausted && d.len() == 0 && !noted {
            noted = true;
            w.note(Note::Done);
        }
        if stopping && d.len() == 0 {
            return Ok(share);
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
                    let p = &mut conn.peer;
                    match ev.kind.as_ref() {
                        "welcome" if p.stage == Stage::Welcome => {
                            p.stage = Stage::Echo;
                            let cmd = wire::message_command(&o.room, &p.content);
                            share
                                .welcome
                                .record(now.duration_since(conn.started).as_micros() as u64);
                            conn.set_deadline(Some((now + timeout, "echo")));
                            actions.push((key, Some(cmd)));
                        }
                        "message"
                            if p.stage == Stage::Echo
                                && ev.user.as_deref() == Some(&p.name)
                                && ev.content.as_deref() == Some(&p.content) =>
                        {
                            p.stage = Stage::Closing;
                            actions.push((key, None));
                        }
                        "error" => wire::bump(
                            &mut share.errors,
                            ev.code.as_deref().unwrap_or("?").to_string(),
                        ),
                        _ => {}
                    }
                }
                ConnEvent::Ended(Ended::Clean) if conn.peer.stage == Stage::Closing => {
                    share.completed += 1;
                    share
                        .cycle
                        .record(now.duration_since(conn.started).as_micros() as u64);
                    c.cycles.fetch_add(1, Relaxed);
                }
                ConnEvent::Ended(how) => {
                    wire::bump(&mut share.failures, how.label());
                    c.failed.fetch_add(1, Relaxed);
                }
            }
        }
        for (key, action) in actions.drain(..) {
            match action {
                Some(cmd) => {
                    d.send_text(key, &cmd);
                }
                None => d.close(key, now),
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
    let mut mid: Option<Sample> = None;
    while crew.done < crew.threads && Instant::now() < deadline {
        let until = progress
            .next_due()
            .min(deadline)
            .min(Instant::now() + MID_CHECK);
        crew.wait(until)?;
        let finished = c.cycles.load(Relaxed) + c.failed.load(Relaxed);
        if mid.is_none() && finished * 2 >= o.cycles {
            mid = Some(probe.sample());
        }
        progress.tick(|t| {
            format!(
                "churn {t:5.1}s cycles {}/{} failed {}",
                c.cycles.load(Relaxed),
                o.cycles,
                c.failed.load(Relaxed)
            )
        });
    }
    let elapsed = started.elapsed().as_secs_f64();
    let timed_out = crew.done < crew.threads;
    let after = probe.sample();
    progress.clear();
    let mut t = Share::default();
    for share in crew.finish()? {
        let s = share.map_err(RunError::Worker)?;
        t.welcome.merge(&s.welcome);
        t.cycle.merge(&s.cycle);
        t.completed += s.completed;
        wire::merge(&mut t.failures, s.failures);
        wire::merge(&mut t.errors, s.errors);
    }
    let failures: u64 = t.failures.values().sum();
    let errors: u64 = t.errors.values().sum();
    let per_s = t.completed as f64 / elapsed.max(1e-9);
    let mid = mid.unwrap_or_default();
    let growth = after.rss_growth_kb(&before);
    // Server CPU over the whole run (user + system, from /proc) divided by
    // the cycles completed: what one connect-to-close session costs it.
    let cpu = after.cpu_since(&before);
    let cpu_us_per_cycle = cpu
        .filter(|_| t.completed > 0)
        .map(|s| s * 1e6 / t.completed as f64);
    let late_growth = after.rss_growth_kb(&mid);
    let json = json!({
        "scenario": "churn",
        "url": o.url,
        "room": o.room,
        "threads": o.threads,
        "cycles": o.cycles,
        "concurrency": o.concurrency,
        "completed": t.completed,
        "failures": failures,
        "failure_reasons": report::tally_json(&t.failures),
        "errors": report::tally_json(&t.errors),
        "timed_out": timed_out,
        "elapsed_s": report::round(elapsed, 3),
        "handshakes_per_s": report::round(per_s, 1),
        "welcome": report::latency_json(&t.welcome),
        "cycle": report::latency_json(&t.cycle),
        "server": {
            "pid": probe.pid(),
            "cpu_per_pid": after.cpu_each_since(&before),
            "rss_before_kb": before.rss_kb,
            "rss_mid_kb": mid.rss_kb,
            "rss_after_kb": after.rss_kb,
            "rss_growth_kb": growth,
            "rss_growth_second_half_kb": late_growth,
            "cpu_s": cpu.map(|x| report::round(x, 3)),
            "cpu_us_per_cycle": cpu_us_per_cycle.map(|x| report::round(x, 1)),
            "stats_connections_after": after.connections,
        },
    });
    let mut h = String::new();
    h += &format!(
        "churn: {} of {} cycles, {} at a time, in {elapsed:.2} s via {}\n",
        t.completed, o.cycles, o.concurrency, o.url
    );
    h += &format!("  handshakes/s: {per_s:.0}\n");
    h += &format!(
        "  welcome (socket to welcome): {}\n",
        report::latency_line(&t.welcome)
    );
    h += &format!(
        "  whole cycle (to close):      {}\n",
        report::latency_line(&t.cycle)
    );
    h += &format!(
        "  failures: {failures} ({})\n",
        report::tally_line(&t.failures)
    );
    if errors > 0 {
        h += &format!("  error events: {}\n", report::tally_line(&t.errors));
    }
    if timed_out {
        h += &format!(
            "  stopped by --duration-s {} before all cycles ran\n",
            o.duration_s
        );
    }
    h += &format!(
        "  server CPU per cycle: {}\n",
        report::or_na(
            cpu_us_per_cycle.map(|x| format!("{x:.1} us ({:.2} s in all)", cpu.unwrap_or(0.0)))
        )
    );
    h += &format!(
        "  server RSS growth: {}\n",
        report::or_na(growth.map(|g| {
            format!(
                "{g} kB over the run ({} kB in its second half); {} kB -> {} kB",
                late_growth
                    .map(|x| x.to_string())
                    .unwrap_or_else(|| "?".into()),
                before.rss_kb.unwrap_or(0),
                after.rss_kb.unwrap_or(0)
            )
        }))
    );
    if let Some(n) = after.connections {
        h += &format!("  server /stats connections after: {n}\n");
    }
    let ok = !timed_out && failures == 0 && errors == 0 && t.completed == o.cycles;
    Ok(Report { json, human: h, ok })
}
