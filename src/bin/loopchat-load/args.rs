//! Command line: every flag, its default, which scenarios it applies to, and
//! the checks that turn a bad value into a one-line usage error (exit 2)
//! before any socket is opened.

use std::fmt;
use std::str::FromStr;

use crate::net::{Target, TargetError};
use crate::wire;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Idle,
    Fanout,
    Churn,
    Mass,
}

/// How the `mass` scenario's sessions leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaveHow {
    /// A close frame each, as a polite client does.
    Close,
    /// The socket closed without a close frame, as when a client's process
    /// or network dies.
    Drop,
}

impl LeaveHow {
    pub fn name(self) -> &'static str {
        match self {
            LeaveHow::Close => "close",
            LeaveHow::Drop => "drop",
        }
    }
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Churn => "churn",
            Scenario::Mass => "mass",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PidChoice {
    None,
    Pid(u32),
    /// Find the process listening on the target port.
    Auto,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub scenario: Scenario,
    pub target: Target,
    pub url: String,
    /// Every `--url` (it may repeat: fanout worker `i` uses the `i % n`th,
    /// so `--threads` a multiple of n spreads members over cluster nodes).
    pub targets: Vec<Target>,
    pub threads: usize,
    pub src_addrs: u32,
    pub duration_s: f64,
    pub connect_timeout_s: f64,
    pub rate: f64,
    pub json: bool,
    pub quiet: bool,
    pub pid: PidChoice,
    /// Every `--pid` after the first (cluster nodes, `redis-server`): their
    /// CPU and RSS are added to the first one's and reported per pid too.
    pub more_pids: Vec<u32>,
    pub room: String,
    pub user_prefix: String,
    // idle
    pub conns: u64,
    pub hold_s: f64,
    pub room_size: u64,
    // fanout
    pub receivers: u64,
    pub senders: u64,
    pub messages: u64,
    pub msg_rate: f64,
    pub window: u64,
    pub payload: usize,
    // churn
    pub cycles: u64,
    pub concurrency: u64,
    // mass
    pub probes: u64,
    pub probe_rate: f64,
    pub leave: LeaveHow,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ArgsError {
    Help,
    Usage(String),
}

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgsError::Help => f.write_str("help requested"),
            ArgsError::Usage(why) => write!(f, "{why} (try --help)"),
        }
    }
}

impl From<TargetError> for ArgsError {
    fn from(e: TargetError) -> Self {
        ArgsError::Usage(e.to_string())
    }
}

impl From<lexopt::Error> for ArgsError {
    fn from(e: lexopt::Error) -> Self {
        ArgsError::Usage(e.to_string())
    }
}

pub const HELP: &str = "\
loopchat-load: load generator for the loopchat server (loopback only)

USAGE: loopchat-load <idle|fanout|churn|mass> [FLAGS]

SCENARIOS
  idle     open --conns sessions at --rate/s, hold them --hold-s; connect times,
           server RSS per connection and idle CPU (with --pid)
  fanout   --receivers in one room, --senders of them send --messages each;
           checks exactly-once in-order delivery, reports deliveries/s and latency
  churn    connect, welcome, one message, close; --concurrency at a time,
           --cycles in all; handshakes/s, server CPU per cycle and RSS growth
           (with --pid)
  mass     --conns sessions arrive at once (--rate) and, after --hold-s, all
           leave at once; --probes bystanders chat meanwhile in a room of their
           own; per phase: the server's slowest iterations (/stats), CPU (with
           --pid) and the probes' latency

COMMON FLAGS (default in brackets)
  --url URL               server WebSocket URL, loopback only [ws://127.0.0.1:8080/ws];
                          fanout: may repeat, worker i uses the (i mod n)th
  --threads N             event-loop threads, connections split round-robin [1]
  --src-addrs N           spread connections over source addresses 127.0.0.2..
                          127.0.0.(N+1); 0 = let the kernel pick [8]
  --duration-s S          hard cap on the whole run; it stops by itself [120]
  --connect-timeout-s S   per connection: TCP connect + handshake, and each wait
                          for welcome/joined/echo [10]
  --rate R                new connections per second (idle, fanout, mass)
                          [500; mass: 100000]
  --pid PID|auto          server process for RSS/CPU from /proc (auto: the one
                          listening on the URL's port) [none]; may repeat
                          (cluster nodes, redis-server): summed, and per pid
  --room NAME             room name (idle: prefix of NAME-0, NAME-1, ...) [ld-<tag>]
  --user-prefix P         usernames are P<n> (churn: P c<n>) [ld-<tag>-]
  --json                  print one JSON object on stdout instead of text [off]
  --quiet                 no progress line on stderr [off]
  -h, --help              this text

IDLE, MASS
  --conns N               sessions to open [1000]
  --hold-s S              how long to hold them once all are open [10; mass: 2]
  --room-size N           sessions per room (join notices grow as N^2) [100]

MASS
  --probes N              bystander sessions timing their own messages [4]
  --probe-rate X          messages/s each probe sends (the server's default
                          rate limit is 20/s) [10]
  --leave close|drop      how the sessions leave: a close frame each, or the
                          socket closed without one [drop]

FANOUT
  --receivers R           sessions in the room [100]
  --senders S             how many of the receivers also send (S <= R) [10]
  --messages M            messages per sender [100]
  --msg-rate X            total messages/s over all senders; 0 = as fast as
                          --window allows [150]
  --window W              with --msg-rate 0: unacknowledged messages per sender
                          (a sender's own copy is its acknowledgement) [8]
  --payload-bytes B       content length of each message, 40..4000 [100]

CHURN
  --cycles N              connect/message/close cycles in all [1000]
  --concurrency K         cycles in flight at once [50]

The server rate-limits each session (default 20 commands/s, burst 40). For a
fanout above that per sender, start it with --rate-per-s and --rate-burst.

EXIT: 0 all good; 1 failures, missing/duplicate/reordered deliveries, or a
run error; 2 bad flags.
";

/// Which scenarios each scenario-specific flag applies to.
const ONLY: &[(&str, &[Scenario])] = &[
    ("rate", &[Scenario::Idle, Scenario::Fanout, Scenario::Mass]),
    ("conns", &[Scenario::Idle, Scenario::Mass]),
    ("hold-s", &[Scenario::Idle, Scenario::Mass]),
    ("room-size", &[Scenario::Idle, Scenario::Mass]),
    ("probes", &[Scenario::Mass]),
    ("probe-rate", &[Scenario::Mass]),
    ("leave", &[Scenario::Mass]),
    ("receivers", &[Scenario::Fanout]),
    ("senders", &[Scenario::Fanout]),
    ("messages", &[Scenario::Fanout]),
    ("msg-rate", &[Scenario::Fanout]),
    ("window", &[Scenario::Fanout]),
    ("payload-bytes", &[Scenario::Fanout]),
    ("cycles", &[Scenario::Churn]),
    ("concurrency", &[Scenario::Churn]),
];

fn value<T: FromStr>(parser: &mut lexopt::Parser, flag: &str) -> Result<T, ArgsError> {
    let raw = parser.value()?;
    let text = raw.to_string_lossy().into_owned();
    text.parse()
        .map_err(|_| ArgsError::Usage(format!("--{flag}: bad value {text:?}")))
}

/// Parses the arguments after the program name.
pub fn parse(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    tag: &str,
) -> Result<Options, ArgsError> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut scenario = None;
    let mut seen: Vec<String> = Vec::new();
    let mut url = "ws://127.0.0.1:8080/ws".to_string();
    let mut o = Options {
        scenario: Scenario::Idle,
        target: Target::parse(&url)?,
        url: String::new(),
        targets: Vec::new(),
        threads: 1,
        src_addrs: 8,
        duration_s: 120.0,
        connect_timeout_s: 10.0,
        rate: 500.0,
        json: false,
        quiet: false,
        pid: PidChoice::None,
        more_pids: Vec::new(),
        room: format!("ld-{tag}"),
        user_prefix: format!("ld-{tag}-"),
        conns: 1000,
        hold_s: 10.0,
        room_size: 100,
        receivers: 100,
        senders: 10,
        messages: 100,
        msg_rate: 150.0,
        window: 8,
        payload: 100,
        cycles: 1000,
        concurrency: 50,
        probes: 4,
        probe_rate: 10.0,
        leave: LeaveHow::Drop,
    };
    while let Some(arg) = parser.next()? {
        let flag = match &arg {
            Long(name) => name.to_string(),
            Short('h') => return Err(ArgsError::Help),
            Short(c) => return Err(ArgsError::Usage(format!("unknown flag -{c}"))),
            Value(v) if scenario.is_none() => {
                scenario = Some(match v.to_str() {
                    Some("idle") => Scenario::Idle,
                    Some("fanout") => Scenario::Fanout,
                    Some("churn") => Scenario::Churn,
                    Some("mass") => Scenario::Mass,
                    _ => {
                        return Err(ArgsError::Usage(format!(
                            "unknown scenario {v:?}: use idle, fanout, churn or mass"
                        )))
                    }
                });
                continue;
            }
            Value(v) => return Err(ArgsError::Usage(format!("unexpected argument {v:?}"))),
        };
        match flag.as_str() {
            "help" => return Err(ArgsError::Help),
            "url" => {
                url = value(&mut parser, &flag)?;
                o.targets.push(Target::parse(&url)?);
            }
            "threads" => o.threads = value(&mut parser, &flag)?,
            "src-addrs" => o.src_addrs = value(&mut parser, &flag)?,
            "duration-s" => o.duration_s = value(&mut parser, &flag)?,
            "connect-timeout-s" => o.connect_timeout_s = value(&mut parser, &flag)?,
            "rate" => o.rate = value(&mut parser, &flag)?,
            "json" => o.json = true,
            "quiet" => o.quiet = true,
            "pid" if o.pid != PidChoice::None => {
                let v: String = value(&mut parser, &flag)?;
                let pid = v.parse().map_err(|_| {
                    ArgsError::Usage(format!(
                        "--pid: bad value {v:?} (auto only as the only --pid)"
                    ))
                })?;
                if o.pid == PidChoice::Auto {
                    return Err(ArgsError::Usage("--pid auto only as the only --pid".into()));
                }
                o.more_pids.push(pid);
            }
            "pid" => {
                let v: String = value(&mut parser, &flag)?;
                o.pid = if v == "auto" {
                    PidChoice::Auto
                } else {
                    PidChoice::Pid(
                        v.parse()
                            .map_err(|_| ArgsError::Usage(format!("--pid: bad value {v:?}")))?,
                    )
                };
            }
            "room" => o.room = value(&mut parser, &flag)?,
            "user-prefix" => o.user_prefix = value(&mut parser, &flag)?,
            "conns" => o.conns = value(&mut parser, &flag)?,
            "hold-s" => o.hold_s = value(&mut parser, &flag)?,
            "room-size" => o.room_size = value(&mut parser, &flag)?,
            "receivers" => o.receivers = value(&mut parser, &flag)?,
            "senders" => o.senders = value(&mut parser, &flag)?,
            "messages" => o.messages = value(&mut parser, &flag)?,
            "msg-rate" => o.msg_rate = value(&mut parser, &flag)?,
            "window" => o.window = value(&mut parser, &flag)?,
            "payload-bytes" => o.payload = value(&mut parser, &flag)?,
            "cycles" => o.cycles = value(&mut parser, &flag)?,
            "concurrency" => o.concurrency = value(&mut parser, &flag)?,
            "probes" => o.probes = value(&mut parser, &flag)?,
            "probe-rate" => o.probe_rate = value(&mut parser, &flag)?,
            "leave" => {
                let v: String = value(&mut parser, &flag)?;
                o.leave = match v.as_str() {
                    "close" => LeaveHow::Close,
                    "drop" => LeaveHow::Drop,
                    _ => {
                        return Err(ArgsError::Usage(format!(
                            "--leave: bad value {v:?}: use close or drop"
                        )))
                    }
                };
            }
            _ => return Err(ArgsError::Usage(format!("unknown flag --{flag}"))),
        }
        seen.push(flag);
    }
    o.scenario = scenario
        .ok_or_else(|| ArgsError::Usage("missing scenario: idle, fanout, churn or mass".into()))?;
    if o.scenario == Scenario::Mass {
        // A mass event: as fast as the tool can open, a short hold.
        if !seen.iter().any(|f| f == "rate") {
            o.rate = 100_000.0;
        }
        if !seen.iter().any(|f| f == "hold-s") {
            o.hold_s = 2.0;
        }
    }
    for flag in &seen {
        if let Some((_, allowed)) = ONLY.iter().find(|(f, _)| f == flag) {
            if !allowed.contains(&o.scenario) {
                return Err(ArgsError::Usage(format!(
                    "--{flag} does not apply to {}",
                    o.scenario.name()
                )));
            }
        }
    }
    o.target = match o.targets.first() {
        Some(first) => first.clone(),
        None => Target::parse(&url)?,
    };
    o.url = url;
    check(&o)?;
    Ok(o)
}

impl Options {
    /// The target of fanout worker `index`.
    pub fn target_for(&self, index: usize) -> &Target {
        match self.targets.len() {
            0 => &self.target,
            n => &self.targets[index % n],
        }
    }
}

fn check(o: &Options) -> Result<(), ArgsError> {
    let fail = |why: &str| Err(ArgsError::Usage(why.to_string()));
    let finite_pos = |x: f64| x.is_finite() && x > 0.0;
    if !(1..=64).contains(&o.threads) {
        return fail("--threads must be 1..64");
    }
    if o.src_addrs > 65_000 {
        return fail("--src-addrs must be at most 65000");
    }
    if !finite_pos(o.duration_s) || !finite_pos(o.connect_timeout_s) || !finite_pos(o.rate) {
        return fail("--duration-s, --connect-timeout-s and --rate must be positive");
    }
    let finite_non_neg = |x: f64| x.is_finite() && x >= 0.0;
    if !finite_non_neg(o.hold_s) || !finite_non_neg(o.msg_rate) {
        return fail("--hold-s and --msg-rate must be zero or positive");
    }
    // Room suffixes (idle's "-<n>") and user numbers must fit the 32-char rule.
    if !wire::valid_name(&o.room) || o.room.len() > 24 {
        return fail("--room: 1-24 chars of A-Z a-z 0-9 _ . -");
    }
    if !wire::valid_name(&o.user_prefix) || o.user_prefix.len() > 20 {
        return fail("--user-prefix: 1-20 chars of A-Z a-z 0-9 _ . -");
    }
    match o.scenario {
        Scenario::Idle if o.conns == 0 || o.room_size == 0 => {
            fail("--conns and --room-size must be at least 1")
        }
        Scenario::Fanout if o.receivers == 0 || o.senders == 0 || o.messages == 0 => {
            fail("--receivers, --senders and --messages must be at least 1")
        }
        Scenario::Fanout if o.senders > o.receivers => fail("--senders cannot exceed --receivers"),
        Scenario::Fanout if o.msg_rate == 0.0 && o.window == 0 => {
            fail("--window must be at least 1 with --msg-rate 0")
        }
        Scenario::Fanout if !(40..=4000).contains(&o.payload) => {
            fail("--payload-bytes must be 40..4000")
        }
        Scenario::Fanout if o.messages > u32::MAX as u64 || o.senders > u32::MAX as u64 => {
            fail("--messages too large")
        }
        Scenario::Churn if o.cycles == 0 || o.concurrency == 0 => {
            fail("--cycles and --concurrency must be at least 1")
        }
        Scenario::Mass if o.conns == 0 || o.room_size == 0 || o.probes == 0 => {
            fail("--conns, --room-size and --probes must be at least 1")
        }
        Scenario::Mass
            if !(o.probe_rate.is_finite() && o.probe_rate > 0.0 && o.probe_rate <= 1000.0) =>
        {
            fail("--probe-rate must be above 0 and at most 1000")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &str) -> Result<Options, ArgsError> {
        parse(args.split_whitespace().map(Into::into), "t1")
    }

    #[test]
    fn defaults_and_flags() {
        let o = p("fanout --receivers 20 --senders 4 --threads 2 --json").unwrap();
        assert_eq!(
            (o.scenario, o.receivers, o.senders, o.threads, o.json),
            (Scenario::Fanout, 20, 4, 2, true)
        );
        assert_eq!(o.room, "ld-t1");
        assert_eq!(o.target.addr.port(), 8080);
        assert_eq!(p("churn --pid auto").unwrap().pid, PidChoice::Auto);
        let o = p("fanout --pid 7 --pid 8 --pid 9").unwrap();
        assert_eq!((o.pid, o.more_pids), (PidChoice::Pid(7), vec![8, 9]));
        assert!(matches!(p("--help"), Err(ArgsError::Help)));
        let m = p("mass --conns 50 --leave close").unwrap();
        assert_eq!(
            (m.conns, m.leave, m.rate, m.hold_s),
            (50, LeaveHow::Close, 100_000.0, 2.0)
        );
        assert_eq!(p("mass --rate 300").unwrap().rate, 300.0);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            "",
            "fanout --bogus 1",
            "idle --receivers 3",
            "fanout --senders 5 --receivers 4",
            "churn --cycles x",
            "idle --url ws://192.168.1.1:80/ws",
            "idle --room a/b",
            "fanout extra",
            "mass --leave sometimes",
            "mass --probes 0",
            "mass --probe-rate 0",
            "fanout --probes 2",
            "fanout --pid auto --pid 3",
            "fanout --pid 3 --pid auto",
        ] {
            assert!(matches!(p(bad), Err(ArgsError::Usage(_))), "{bad:?}");
        }
    }
}
