//! `loopchat-load`: a load generator for the loopchat server, built as the
//! client-side companion of the server's own design — one `mio` poll loop per
//! thread, a slab of connection state machines, non-blocking everything.
//!
//! It only ever connects to loopback addresses, and every scenario is bounded
//! in count and in time (`--duration-s`) and stops by itself.
//!
//! Reading order and what each module owns:
//! - `args.rs`    flags, defaults, usage errors (exit 2)
//! - `net.rs`     the loopback-only target, source addresses, bind-then-connect, rlimit
//! - `ws.rs`      client-side RFC 6455: upgrade request, 101 check, masking, frame decoding (pure)
//! - `conn.rs`    one client socket's state machine (read/flush until WouldBlock)
//! - `driver.rs`  one thread's poll loop machinery: Poll, Waker, Slab, reaping
//! - `crew.rs`    the worker threads, run phases, shared counters, progress line
//! - `wire.rs`    the chat events and commands the tool reads and writes
//! - `idle.rs`, `fanout.rs`, `churn.rs`, `mass.rs`   the scenarios, each one loop body
//! - `hist.rs`    the log-bucketed latency histogram
//! - `probe.rs`   the server seen from outside: /proc/PID and GET /stats
//! - `report.rs`  human text and `--json` from the same numbers
//!
//! Exit codes: 0 all good; 1 the run found a problem (failures, missing,
//! duplicate or reordered deliveries) or could not run; 2 bad flags.

mod args;
mod churn;
mod conn;
mod crew;
mod driver;
mod fanout;
mod hist;
mod idle;
mod mass;
mod net;
mod probe;
mod report;
mod wire;
mod ws;

use std::process::ExitCode;

use args::{ArgsError, Options, PidChoice, Scenario};

/// Descriptors kept for things other than sessions (stdio, epoll, wakers,
/// the /stats request).
const SPARE_FDS: u64 = 64;

fn progress(o: &Options) -> crew::Progress {
    crew::Progress::new(!o.quiet)
}

/// A short tag making this run's room and usernames unique, so two runs
/// against one server do not collide (409) or see each other's messages.
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:06x}",
        (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) & 0xFF_FFFF
    )
}

fn main() -> ExitCode {
    let opts = match args::parse(std::env::args_os().skip(1), &run_tag()) {
        Ok(o) => o,
        Err(ArgsError::Help) => {
            print!("{}", args::HELP);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loopchat-load: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(report) => {
            if opts.json {
                println!("{}", report.json);
            } else {
                print!("{}", report.human);
                println!(
                    "  verdict: {}",
                    if report.ok { "ok" } else { "PROBLEMS FOUND" }
                );
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(why) => {
            eprintln!("loopchat-load: {why}");
            ExitCode::from(1)
        }
    }
}

fn run(o: &Options) -> Result<report::Report, String> {
    let limit =
        net::raise_nofile_limit().map_err(|e| format!("cannot raise the open-file limit: {e}"))?;
    let sessions = match o.scenario {
        Scenario::Idle => o.conns,
        Scenario::Fanout => o.receivers,
        Scenario::Churn => o.concurrency,
        Scenario::Mass => o.conns + o.probes,
    };
    if sessions + SPARE_FDS > limit {
        return Err(format!(
            "{sessions} sessions need more descriptors than the open-file limit {limit} allows (keep {SPARE_FDS} spare)"
        ));
    }
    let pid = match o.pid {
        PidChoice::None => None,
        PidChoice::Pid(p) => Some(p),
        PidChoice::Auto => Some(probe::find_listener(&o.target).map_err(|e| e.to_string())?),
    };
    let probe =
        probe::Probe::new(pid, &o.more_pids, o.target.clone()).map_err(|e| e.to_string())?;
    let result = match o.scenario {
        Scenario::Idle => idle::run(o, &probe),
        Scenario::Fanout => fanout::run(o, &probe),
        Scenario::Churn => churn::run(o, &probe),
        Scenario::Mass => mass::run(o, &probe),
    };
    result.map_err(|e| e.to_string())
}
