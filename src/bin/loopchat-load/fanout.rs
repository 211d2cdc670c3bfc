//! The `fanout` scenario: `--receivers` sessions in one room, the first
//! `--senders` of them also sending `--messages` each, paced by `--msg-rate`
//! (or, at rate 0, by a `--window` of unacknowledged messages per sender).
//! Every receiver checks that it got every sender's messages exactly once and
//! in order, and timestamps each delivery.
//!
//! A message's content is `s<sender>:<seq>:<µs>:xxx…` padded to
//! `--payload-bytes`; `<µs>` is when it was due (rate mode) or sent (window
//! mode) on the crew's shared clock, so latency is measured without clock
//! skew and includes any lateness of the sender (no coordinated omission).
//! Senders start only after every receiver has its `joined`.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::args::Options;
use crate::conn::ConnEvent;
use crate::crew::{Crew, Note, RunError, Worker, GO, STOP};
use crate::driver::Driver;
use crate::hist::Histogram;
use crate::probe::Probe;
use crate::report::{self, Report};
use crate::wire::{self, Tally};

const OPEN_BATCH: usize = 256;
const MAX_WAIT: Duration = Duration::from_millis(100);
/// Delay between the main thread's go and the first due message, so every
/// loop sees the phase change before its first message is late.
const GO_LEAD: Duration = Duration::from_millis(5);
/// A run in which nothing is sent, delivered or lost for this long (or five
/// message intervals, if longer) has stalled: what is missing will not come.
const STALL_AFTER: Duration = Duration::from_secs(5);
/// How often the main thread looks for progress while messages flow.
const STALL_CHECK: Duration = Duration::from_millis(250);

fn patience_note(o: &Options) -> f64 {
    let paced = if o.msg_rate > 0.0 {
        5.0 / o.msg_rate
    } else {
        0.0
    };
    STALL_AFTER.as_secs_f64().max(paced)
}

/// One receiver's view of one sender's stream.
#[derive(Clone, Default)]
struct Track {
    /// Every sequence number below this has arrived.
    next: u64,
    /// Arrived ahead of a gap (only non-empty after a reordering).
    ahead: BTreeSet<u64>,
    max_seen: Option<u64>,
}

enum Verdict {
    New,
    Duplicate,
    /// New, but after a higher sequence number from the same sender.
    Reordered,
}

impl Track {
    fn accept(&mut self, seq: u64) -> Verdict {
        if seq < self.next || self.ahead.contains(&seq) {
            return Verdict::Duplicate;
        }
        let late = self.max_seen.is_some_and(|m| seq < m);
        self.max_seen = Some(self.max_seen.map_or(seq, |m| m.max(seq)));
        if seq == self.next {
            self.next += 1;
            while self.ahead.remove(&self.next) {
                self.next += 1;
            }
        } else {
            self.ahead.insert(seq);
        }
        if late {
            Verdict::Reordered
        } else {
            Verdict::New
        }
    }
}

/// One local session, receiver and maybe sender.
struct Member {
    r: u64,
    key: Option<usize>,
    joined: bool,
    ended: bool,
    tracks: Vec<Track>,
    unique: u64,
    sent: u64,
    /// This sender's own messages seen coming back: its acknowledgements.
    echoed: u64,
}

#[derive(Default)]
struct Share {
    latency: Histogram,
    deliveries: u64,
    duplicates: u64,
    reordered: u64,
    missing: u64,
    sent: u64,
    joined: u64,
    foreign: u64,
    failures: Tally,
    errors: Tally,
    last_delivery: Option<Instant>,
}

fn content(sender: u64, seq: u64, t_us: u64, len: usize) -> String {
    let mut c = format!("s{sender}:{seq}:{t_us}:");
    let pad = len.saturating_sub(c.len());
    c.extend(std::iter::repeat('x').take(pad));
    c
}

fn parse_content(c: &str) -> Option<(u64, u64, u64)> {
    let mut it = c.strip_prefix('s')?.splitn(4, ':');
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

fn worker(w: &Worker, o: &Options) -> Result<Share, String> {
    let timeout = Duration::from_secs_f64(o.connect_timeout_s);
    let mut d = Driver::<usize>::for_worker(w, o.target_for(w.index), o.src_addrs, timeout)?;
    let c = &w.shared.counters;
    let mut members: Vec<Member> = w
        .share(o.receivers)
        .map(|r| Member {
            r,
            key: None,
            joined: false,
            ended: false,
            tracks: Vec::new(),
            unique: 0,
            sent: 0,
            echoed: 0,
        })
        .collect();
    let senders: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].r < o.senders)
        .collect();
    let rate = o.rate / w.threads as f64;
    let start = Instant::now();
    let mut share = Share::default();
    let (mut next_open, mut settled, mut noted_settled, mut noted_done, mut stopping) =
        (0, 0, false, false, false);
    let mut go: Option<Instant> = None;
    let mut expected = 0u64;
    let mut events = Vec::new();
    loop {
        let now = Instant::now();
        let mut wake = now + MAX_WAIT;
        if !stopping && next_open < members.len() {
            let due =
                ((now.duration_since(start).as_secs_f64() * rate) as usize + 1).min(members.len());
            let mut budget = OPEN_BATCH;
            while next_open < due && budget > 0 {
                let m = &mut members[next_open];
                let params = format!("username={}{}&room={}", o.user_prefix, m.r, o.room);
                match d.open(&params, next_open, now) {
                    Ok(key) => m.key = Some(key),
                    Err(e) => {
                        m.ended = true;
                        wire::bump(&mut share.failures, e.label());
                        c.failed.fetch_add(1, Relaxed);
                        settled += 1;
                    }
                }
                next_open += 1;
                budget -= 1;
            }
            wake = wake.min(start + Duration::from_secs_f64(next_open as f64 / rate));
        }
        if !noted_settled && settled == members.len() {
            noted_settled = true;
            w.note(Note::Settled);
        }
        if let (Some(go_at), false) = (go, stopping) {
            // Window mode waits for go_at too: deliveries/s is measured from it.
            let senders_now: &[usize] = if now >= go_at { &senders } else { &[] };
            if now < go_at {
                wake = wake.min(go_at);
            }
            for &i in senders_now {
                let m = &mut members[i];
                let Some(key) = m.key.filter(|_| m.joined && !m.ended) else {
                    continue;
                };
                while m.sent < o.messages {
                    let t = if o.msg_rate > 0.0 {
                        // Sender s's k-th message is due at (k*S + s)/rate:
                        // the senders take turns, evenly spaced.
                        let slot = (m.sent * o.senders + m.r) as f64 / o.msg_rate;
                        let due = go_at + Duration::from_secs_f64(slot);
                        if due > now {
                            wake = wake.min(due);
                            break;
                        }
                        due
                    } else if m.sent - m.echoed >= o.window {
                        break;
                    } else {
                        now
                    };
                    let text = wire::message_command(
                        &o.room,
                        &content(m.r, m.sent, w.shared.micros(t), o.payload),
                    );
                    if !d.send_text(key, &text) {
                        break;
                    }
                    m.sent += 1;
                    c.sent.fetch_add(1, Relaxed);
                }
            }
            if !noted_done {
                let receivers_done = members
                    .iter()
                    .all(|m| m.ended || !m.joined || m.unique >= expected);
                let senders_done = senders.iter().all(|&i| {
                    let m = &members[i];
                    m.ended || !m.joined || m.sent >= o.messages
                });
                if receivers_done && senders_done {
                    noted_done = true;
                    w.note(Note::Done);
                }
            }
        }
        if stopping && d.len() == 0 {
            break;
        }
        d.flush();
        let wait = wake.saturating_duration_since(Instant::now());
        d.turn(Some(wait), &mut events)
            .map_err(|e| format!("poll: {e}"))?;
        let now = Instant::now();
        let now_us = w.shared.micros(now);
        for (key, event) in events.drain(..) {
            let Some(conn) = d.get(key) else { continue };
            let m = &mut members[conn.peer];
            match event {
                ConnEvent::Open => conn.set_deadline(Some((now + timeout, "welcome"))),
                ConnEvent::Text(text) => {
                    let Some(ev) = wire::parse(&text) else {
                        continue;
                    };
                    match ev.kind.as_ref() {
                        "welcome" => {
                            conn.set_deadline(Some((now + timeout, "joined")));
                            c.opened.fetch_add(1, Relaxed);
                            if let Some(l) = ev.limits.as_ref().and_then(|l| l.limits()) {
                                let _ = w.shared.limits.set(l);
                            }
                        }
                        "joined" if ev.room.as_deref() == Some(&o.room) && !m.joined => {
                            conn.set_deadline(None);
                            m.joined = true;
                            m.tracks = vec![Track::default(); o.senders as usize];
                            settled += 1;
                            share.joined += 1;
                            c.joined.fetch_add(1, Relaxed);
                            if m.r < o.senders {
                                w.shared.sender_ok[m.r as usize].store(true, SeqCst);
                            }
                        }
                        "message" if ev.room.as_deref() == Some(&o.room) => {
                            let parsed = ev.content.as_deref().and_then(parse_content);
                            let Some((sid, seq, t)) =
                                parsed.filter(|&(s, q, _)| s < o.senders && q < o.messages)
                            else {
                                share.foreign += 1;
                                continue;
                            };
                            let Some(track) = m.tracks.get_mut(sid as usize) else {
                                continue;
                            };
                            match track.accept(seq) {
                                Verdict::Duplicate => {
                                    share.duplicates += 1;
                                    continue;
                                }
                                Verdict::Reordered => share.reordered += 1,
                                Verdict::New => {}
                            }
                            m.unique += 1;
                            if sid == m.r {
                                m.echoed += 1;
                            }
                            share.latency.record(now_us.saturating_sub(t));
                            share.last_delivery = Some(now);
                            c.delivered.fetch_add(1, Relaxed);
                        }
                        "error" => {
                            wire::bump(
                                &mut share.errors,
                                ev.code.as_deref().unwrap_or("?").to_string(),
                            );
                            // A refused message never comes back: count the
                            // refusal as its acknowledgement, or the window
                            // would stay full until --duration-s.
                            if m.r < o.senders {
                                m.echoed += 1;
                            }
                        }
                        _ => {}
                    }
                }
                ConnEvent::Ended(how) => {
                    m.ended = true;
                    m.key = None;
                    if !m.joined {
                        settled += 1;
                    }
                    if !m.joined || !stopping {
                        log::debug!("session {} ended: {}", m.r, how.label());
                        wire::bump(&mut share.failures, how.label());
                        c.failed.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        match w.shared.phase() {
            GO if go.is_none() => {
                go = Some(w.shared.go_at());
                let active = w
                    .shared
                    .sender_ok
                    .iter()
                    .filter(|ok| ok.load(SeqCst))
                    .count() as u64;
                expected = active * o.messages;
            }
            STOP if !stopping => {
                stopping = true;
                d.close_all(Instant::now());
            }
            _ => {}
        }
    }
    for m in &members {
        share.deliveries += m.unique;
        share.sent += m.sent;
        if m.joined {
            share.missing += expected.saturating_sub(m.unique);
        }
    }
    Ok(share)
}

pub fn run(o: &Options, probe: &Probe) -> Result<Report, RunError> {
    let before = probe.sample();
    let mut crew = Crew::spawn_scenario(o.threads, o.senders as usize, o, worker)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(o.duration_s);
    let mut progress = crate::progress(o);
    let shared = crew.shared.clone();
    let c = &shared.counters;
    let expected_total = o.receivers * o.senders * o.messages;
    let line = |t: f64| {
        format!(
            "fanout {t:5.1}s joined {}/{} sent {}/{} delivered {}/{} failed {}",
            c.joined.load(Relaxed),
            o.receivers,
            c.sent.load(Relaxed),
            o.senders * o.messages,
            c.delivered.load(Relaxed),
            expected_total,
            c.failed.load(Relaxed)
        )
    };
    while crew.settled < crew.threads && Instant::now() < deadline {
        crew.wait(progress.next_due().min(deadline))?;
        progress.tick(line);
    }
    let setup_s = started.elapsed().as_secs_f64();
    let mut warning = None;
    if let Some(l) = shared.limits.get() {
        let per_sender = if o.msg_rate > 0.0 {
            o.msg_rate / o.senders as f64
        } else {
            f64::INFINITY
        };
        if per_sender > l.rate_per_s && o.messages as f64 > l.rate_burst {
            let pace = if per_sender.is_finite() {
                format!("{per_sender:.1} msg/s")
            } else {
                "as fast as its window allows".into()
            };
            let w = format!(
                "each sender sends {pace} but the server allows {}/s (burst {}): expect \
                 rate_limited errors; raise the server's --rate-per-s and --rate-burst",
                l.rate_per_s, l.rate_burst
            );
            progress.clear();
            eprintln!("loopchat-load: warning: {w}");
            warning = Some(w);
        }
    }
    let at_go = probe.sample();
    let go_at = Instant::now() + GO_LEAD;
    let (mut ran, mut stalled) = (false, false);
    if crew.settled == crew.threads && Instant::now() < deadline {
        ran = true;
        crew.go(go_at);
        // Messages refused or lost with a dropped sender never arrive;
        // rather than wait for --duration-s, stop once nothing has moved
        // for longer than the pacing could explain.
        let patience = Duration::from_secs_f64(patience_note(o));
        let mut moved = (0, Instant::now());
        while crew.done < crew.threads && Instant::now() < deadline {
            let until = progress
                .next_due()
                .min(deadline)
                .min(Instant::now() + STALL_CHECK);
            crew.wait(until)?;
            progress.tick(line);
            let now = Instant::now();
            let count = c.sent.load(Relaxed) + c.delivered.load(Relaxed) + c.failed.load(Relaxed);
            if count != moved.0 {
                moved = (count, now);
            } else if now >= moved.1 + patience {
                stalled = true;
                break;
            }
        }
    }
    let timed_out = crew.done < crew.threads && !stalled;
    let at_done = probe.sample();
    progress.clear();
    let mut t = Share::default();
    for share in crew.finish()? {
        let s = share.map_err(RunError::Worker)?;
        t.latency.merge(&s.latency);
        t.deliveries += s.deliveries;
        t.duplicates += s.duplicates;
        t.reordered += s.reordered;
        t.missing += s.missing;
        t.sent += s.sent;
        t.joined += s.joined;
        t.foreign += s.foreign;
        wire::merge(&mut t.failures, s.failures);
        wire::merge(&mut t.errors, s.errors);
        t.last_delivery = t.last_delivery.max(s.last_delivery);
    }
    let active_senders = shared.sender_ok.iter().filter(|ok| ok.load(SeqCst)).count() as u64;
    let expected = if ran {
        t.joined * active_senders * o.messages
    } else {
        0
    };
    let failures: u64 = t.failures.values().sum();
    let errors: u64 = t.errors.values().sum();
    let delivery_s = t
        .last_delivery
        .map(|l| l.saturating_duration_since(go_at).as_secs_f64())
        .unwrap_or(0.0);
    let per_s = if delivery_s > 0.0 {
        t.deliveries as f64 / delivery_s
    } else {
        0.0
    };
    let cpu = at_done.cpu_since(&at_go);
    let cpu_us_per_delivery = cpu
        .filter(|_| t.deliveries > 0)
        .map(|s| s * 1e6 / t.deliveries as f64);
    let ok = ran
        && !timed_out
        && !stalled
        && failures == 0
        && errors == 0
        && t.missing == 0
        && t.duplicates == 0
        && t.reordered == 0;
    let json = json!({
        "scenario": "fanout",
        "url": o.url,
        "room": o.room,
        "threads": o.threads,
        "receivers": o.receivers,
        "senders": o.senders,
        "messages": o.messages,
        "msg_rate": o.msg_rate,
        "window": if o.msg_rate == 0.0 { Some(o.window) } else { None },
        "payload_bytes": o.payload,
        "joined": t.joined,
        "sent": t.sent,
        "expected": expected,
        "deliveries": t.deliveries,
        "missing": t.missing,
        "duplicates": t.duplicates,
        "reordered": t.reordered,
        "foreign": t.foreign,
        "failures": failures,
        "failure_reasons": report::tally_json(&t.failures),
        "errors": report::tally_json(&t.errors),
        "timed_out": timed_out,
        "stalled": stalled,
        "setup_s": report::round(setup_s, 3),
        "delivery_s": report::round(delivery_s, 3),
        "deliveries_per_s": report::round(per_s, 1),
        "latency": report::latency_json(&t.latency),
        "warning": warning,
        "server": {
            "pid": probe.pid(),
            "cpu_per_pid": at_done.cpu_each_since(&at_go),
            "rss_before_kb": before.rss_kb,
            "rss_after_kb": at_done.rss_kb,
            "cpu_s": cpu.map(|x| report::round(x, 3)),
            "cpu_us_per_delivery": cpu_us_per_delivery.map(|x| report::round(x, 3)),
        },
    });
    let mut h = String::new();
    h += &format!(
        "fanout: {} receivers in room {}, {} senders x {} messages ({}) via {}\n",
        o.receivers,
        o.room,
        o.senders,
        o.messages,
        if o.msg_rate > 0.0 {
            format!("{} msg/s", o.msg_rate)
        } else {
            format!("window {}", o.window)
        },
        o.url
    );
    h += &format!("  joined {} in {setup_s:.2} s; sent {}\n", t.joined, t.sent);
    h += &format!(
        "  deliveries {} of {expected} in {delivery_s:.2} s: {per_s:.0}/s\n",
        t.deliveries
    );
    h += &format!("  latency: {}\n", report::latency_line(&t.latency));
    h += &format!(
        "  missing {}  duplicates {}  reordered {}  foreign {}\n",
        t.missing, t.duplicates, t.reordered, t.foreign
    );
    h += &format!(
        "  failures: {failures} ({})\n",
        report::tally_line(&t.failures)
    );
    if errors > 0 {
        h += &format!("  error events: {}\n", report::tally_line(&t.errors));
    }
    if stalled {
        h += &format!(
            "  stopped: nothing sent or delivered for {:.1} s\n",
            patience_note(o)
        );
    }
    if timed_out {
        h += &format!(
            "  stopped by --duration-s {} before every delivery arrived\n",
            o.duration_s
        );
    }
    h += &format!(
        "  server CPU per delivery: {}\n",
        report::or_na(
            cpu_us_per_delivery.map(|x| format!("{x:.2} us ({:.2} s in all)", cpu.unwrap_or(0.0)))
        )
    );
    if at_done.cpu_each.len() > 1 {
        let each: Vec<String> = at_done
            .cpu_each
            .iter()
            .zip(&at_go.cpu_each)
            .map(|(&(pid, now), &(_, then))| match now.zip(then) {
                Some((a, b)) => format!("{pid} {:.3} s", a - b),
                None => format!("{pid} n/a"),
            })
            .collect();
        h += &format!("  CPU per pid: {}\n", each.join(", "));
    }
    Ok(Report { json, human: h, ok })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trips_at_the_requested_length() {
        let c = content(3, 17, 123_456, 100);
        assert_eq!(c.len(), 100);
        assert!(c.starts_with("s3:17:123456:x"));
        assert_eq!(parse_content(&c), Some((3, 17, 123_456)));
        assert_eq!(parse_content("hello"), None);
    }

    #[test]
    fn track_tells_new_duplicate_and_reordered() {
        let mut t = Track::default();
        assert!(matches!(t.accept(0), Verdict::New));
        assert!(matches!(t.accept(2), Verdict::New));
        assert!(matches!(t.accept(1), Verdict::Reordered));
        assert_eq!(t.next, 3);
        assert!(matches!(t.accept(1), Verdict::Duplicate));
        assert!(matches!(t.accept(5), Verdict::New));
        assert!(matches!(t.accept(5), Verdict::Duplicate));
        assert_eq!(t.next + t.ahead.len() as u64, 4);
    }
}
