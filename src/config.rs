//! Every limit and timeout, with its default and the reason for it, and the
//! command line that sets them.
//!
//! The defaults are what `cargo run --release` runs with: they suit a small
//! host (a $5 VPS, a Raspberry Pi) and a load test alike. `docs/operations.md`
//! lists the same flags for operators; `--help` prints them from here.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use tungstenite::protocol::WebSocketConfig;

/// How durable a message must be before it is released (`--fsync`); owned
/// by the store, which is what it configures.
pub use crate::store::Fsync;

/// The whole configuration. `Config::default()` is the embedded default.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None`: derived from the open-file limit at start, minus a reserve.
    pub max_connections: Option<usize>,
    pub max_head_bytes: usize,
    pub max_message_bytes: usize,
    pub max_content_bytes: usize,
    pub max_rooms_per_user: usize,
    pub max_outbox_bytes: usize,
    pub read_buffer_bytes: usize,
    pub rate_per_s: u32,
    pub rate_burst: u32,
    pub history_limit: usize,
    pub history_keep: usize,
    pub handshake_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub shutdown_grace_ms: u64,
    /// `--pass-budget-us`: how long one pass of the loop may run before it
    /// leaves the rest of its work for the next pass (`server.rs`).
    pub pass_budget_us: u64,
    /// Empty: any origin.
    pub allowed_origins: Vec<String>,
    /// token → username, loaded from `--auth-file`.
    pub auth: Option<HashMap<String, String>>,
    pub echo: bool,
    pub persist: bool,
    pub data_dir: PathBuf,
    pub fsync: Fsync,
    pub retain_messages: u64,
    pub log_level: log::LevelFilter,
    pub trace_loop: bool,
    /// `--memory-limit`: the most heap the server may hold (see
    /// `memory.rs`); `None`: no limit.
    pub memory_limit: Option<u64>,
    /// Install SIGINT/SIGTERM handlers (the binary does; in-process tests
    /// stop the server through its handle instead).
    pub signals: bool,
    // Cluster mode (PROTOCOL §7; src/cluster/): `--redis`, `--node-id`,
    // `--node-ttl-ms`. Without `--redis` nothing else changes.
    pub redis: Option<crate::cluster::url::RedisUrl>,
    pub node_id: Option<String>,
    pub node_ttl_ms: u64,
}

/// Requests head larger than this get 431: 8 KiB is what common proxies
/// allow, and a chat upgrade needs a few hundred bytes.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 8 * 1024;

/// File descriptors kept back from `--max-connections` for the listener,
/// the poll, signals, log files, the history store (a fixed handful
/// whatever the number of rooms, `store::sqlite::DESCRIPTORS`) and the 503
/// answers to connections over the limit.
pub const FD_RESERVE: usize = 128;

// The store's share must leave most of the reserve to the rest.
const _: () = assert!(crate::store::sqlite::DESCRIPTORS <= FD_RESERVE / 8);

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: None,
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            // 64 KiB: ample for a chat line, small enough that a thousand
            // half-sent messages cannot exhaust a small host.
            max_message_bytes: 64 * 1024,
            max_content_bytes: 4096,
            max_rooms_per_user: 32,
            // 256 KiB of unsent output per connection: over a thousand
            // typical messages of slack before a reader counts as stuck.
            max_outbox_bytes: DEFAULT_MAX_OUTBOX_BYTES,
            // tungstenite allocates and zero-fills this per connection;
            // its 128 KiB default would dominate idle memory. Chat frames
            // are small; a larger message just takes several reads.
            read_buffer_bytes: 1024,
            rate_per_s: 20,
            // Two seconds' worth: a client that was briefly stalled (a
            // phone waking up) may send what it queued without refusals.
            rate_burst: 20 * BURST_SECONDS,
            history_limit: 50,
            history_keep: 1000,
            handshake_timeout_ms: 10_000,
            // Must be shorter than the idle timeouts of common proxies
            // (nginx: 60 s) so that pings keep proxied connections alive.
            heartbeat_ms: 30_000,
            shutdown_grace_ms: 5_000,
            // Keeps every pass under 10 ms of CPU with room to spare (the
            // last flush or read may overrun it a little), and long
            // enough that a busy pass still batches many frames per write:
            // a smaller budget costs more CPU in all (docs/performance.md,
            // "Mass events").
            pass_budget_us: 6_000,
            allowed_origins: Vec::new(),
            auth: None,
            echo: false,
            persist: true,
            data_dir: PathBuf::from("./loopchat-data"),
            fsync: Fsync::Everysec,
            retain_messages: 100_000,
            log_level: log::LevelFilter::Info,
            trace_loop: false,
            memory_limit: None,
            signals: true,
            redis: None,
            node_id: None,
            // Short enough that a dead node's users leave within seconds,
            // long enough for a refresh (every ttl/3) to survive a Redis
            // failover or a busy second.
            node_ttl_ms: 10_000,
        }
    }
}

/// The JSON around a command's `content` (type, room, `to`, a `ref` of
/// 64 characters even if every one is escaped) stays under this many bytes.
pub const COMMAND_ENVELOPE_BYTES: usize = 1024;

/// A byte of content takes at most this many bytes in a JSON string (a
/// control character escaped as `\u0001`).
pub const JSON_ESCAPE_FACTOR: usize = 6;

/// The default `--max-outbox-bytes`, unless `--max-message-bytes` needs more.
pub const DEFAULT_MAX_OUTBOX_BYTES: usize = 256 * 1024;

/// The default `--rate-burst` is this many seconds of `--rate-per-s`.
pub const BURST_SECONDS: u32 = 2;

/// A command line that cannot be used.
#[derive(Debug)]
pub enum ConfigError {
    /// A flag loopchat does not have (`--bogus`, `-x`).
    UnknownFlag(String),
    /// A word that is not a flag, or a value given to a flag that takes none.
    Unexpected(String),
    BadValue {
        flag: &'static str,
        why: String,
    },
    MissingValue(&'static str),
    /// Two limits that cannot both hold: `flag`'s value breaks `other`'s.
    Conflict {
        flag: &'static str,
        other: &'static str,
        why: String,
    },
    AuthFile {
        path: PathBuf,
        why: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownFlag(flag) => write!(f, "unknown flag {flag} (see --help)"),
            ConfigError::Unexpected(why) => write!(f, "{why} (see --help)"),
            ConfigError::BadValue { flag, why } => write!(f, "bad value for --{flag}: {why}"),
            ConfigError::MissingValue(flag) => write!(f, "--{flag} needs a value"),
            ConfigError::Conflict { flag, other, why } => {
                write!(f, "--{flag} conflicts with --{other}: {why}")
            }
            ConfigError::AuthFile { path, why } => {
                write!(f, "auth file {}: {why}", path.display())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed {
    Run(Box<Config>),
    Help,
    Version,
}

/// `--help` text. Every flag, with its default.
pub fn help() -> String {
    let d = Config::default();
    format!(
        "loopchat {version}: a WebSocket chat server on one thread and one poll loop

USAGE: loopchat [FLAGS]

Network
  --listen ADDR              address to listen on [{listen}]
  --max-connections N        open connections before 503 [open-file limit - {reserve}]
  --allowed-origins A,B      Origin values allowed to upgrade (403 otherwise) [any]
  --auth-file PATH           lines \"TOKEN USERNAME\"; ?token= becomes required [none]
  --echo                     serve /echo, an echo endpoint for conformance tests [off]

Limits
  --max-head-bytes N         request head size before 431 [{head}]
  --max-message-bytes N      frame or message size before close 1009 [{msg}]
  --max-content-bytes N      message content size before error too_long [{content}]
                             (at most (--max-message-bytes - {envelope}) / {escape}, so an
                             escaped content always fits; lowered to that unless given)
  --max-rooms-per-user N     rooms one user may be in [{rooms}]
  --max-outbox-bytes N       unsent output before close 1008 (slow consumer) [{outbox}]
                             (at least --max-message-bytes; twice it unless given)
  --read-buffer-bytes N      per-connection read buffer [{readbuf}]
  --rate-per-s N             commands per second per connection [{rate}]
  --rate-burst N             burst of commands allowed at once [twice --rate-per-s: {burst}]
  --memory-limit BYTES       most memory the server holds (K, M, G suffixes): near it
                             upgrades get 503, over it the largest outboxes close 1013 [none]

History
  --history-limit N          messages sent on join and per history page [{hlimit}]
  --history-keep N           messages kept in memory per room [{hkeep}]
                             (at least --history-limit; raised to it unless given)
  --data-dir DIR             where the history database is kept [{dir}]
  --no-persist               keep history in memory only
  --fsync MODE               always | everysec | never [{fsync}]
  --retain-messages N        messages kept on disk per room [{retain}]

Cluster (several nodes through one Redis; see docs/cluster.md)
  --redis URL                redis://[:PASSWORD@]HOST:PORT[/DB]; history then lives in Redis
  --node-id NAME             this node's name [generated, unique per process]
  --node-ttl-ms N            a node silent in Redis this long is gone [{ttl}]

Timers
  --handshake-timeout-ms N   drop a client that has not finished its handshake [{hs}]
  --heartbeat-ms N           ping a silent client after N ms, drop it after 2N [{hb}]
  --shutdown-grace-ms N      wait for close replies on SIGINT/SIGTERM [{grace}]
  --pass-budget-us N         one loop pass's work before the rest waits for the
                             next pass (mass connects and leaves) [{budget}]

Logging
  --log-level LEVEL          error | warn | info | debug | trace [{level}] (or LOOPCHAT_LOG)
  --trace-loop               print every poll iteration's events (teaching aid)

  -h, --help                 this text
  -V, --version              the version
",
        version = env!("CARGO_PKG_VERSION"),
        listen = d.listen,
        reserve = FD_RESERVE,
        head = d.max_head_bytes,
        msg = d.max_message_bytes,
        content = d.max_content_bytes,
        rooms = d.max_rooms_per_user,
        outbox = d.max_outbox_bytes,
        envelope = COMMAND_ENVELOPE_BYTES,
        escape = JSON_ESCAPE_FACTOR,
        readbuf = d.read_buffer_bytes,
        rate = d.rate_per_s,
        burst = d.rate_burst,
        hlimit = d.history_limit,
        hkeep = d.history_keep,
        dir = d.data_dir.display(),
        fsync = d.fsync,
        retain = d.retain_messages,
        hs = d.handshake_timeout_ms,
        hb = d.heartbeat_ms,
        grace = d.shutdown_grace_ms,
        budget = d.pass_budget_us,
        level = d.log_level.as_str().to_lowercase(),
        ttl = d.node_ttl_ms,
    )
}

impl Config {
    /// A configuration for tests: an ephemeral port, history in memory, no
    /// signal handlers.
    pub fn for_tests() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            persist: false,
            signals: false,
            log_level: log::LevelFilter::Warn,
            ..Config::default()
        }
    }

    /// Parse a command line (without the program name). `LOOPCHAT_LOG`
    /// sets the log level unless `--log-level` does.
    pub fn from_args<I>(args: I) -> Result<Parsed, ConfigError>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        use lexopt::prelude::*;
        let mut c = Config::default();
        if let Ok(level) = std::env::var("LOOPCHAT_LOG") {
            c.log_level = parse_level(&level).map_err(|why| ConfigError::BadValue {
                flag: "log-level",
                why: format!("LOOPCHAT_LOG: {why}"),
            })?;
        }
        let mut auth_file = None;
        let mut given = Given::default();
        let mut p = lexopt::Parser::from_args(args);
        loop {
            let arg = match p.next() {
                Ok(Some(arg)) => arg,
                Ok(None) => break,
                // lexopt's own wording ("unexpected argument for option
                // '--echo': ...") is already one clean sentence.
                Err(e) => return Err(ConfigError::Unexpected(e.to_string())),
            };
            match arg {
                Short('h') | Long("help") => return Ok(Parsed::Help),
                Short('V') | Long("version") => return Ok(Parsed::Version),
                Long("listen") => c.listen = value(&mut p, "listen")?,
                Long("max-connections") => {
                    c.max_connections = Some(positive(&mut p, "max-connections")?)
                }
                Long("max-head-bytes") => {
                    c.max_head_bytes = at_least(&mut p, "max-head-bytes", 256)?
                }
                Long("max-message-bytes") => {
                    c.max_message_bytes = at_least(&mut p, "max-message-bytes", MIN_MESSAGE_BYTES)?
                }
                Long("max-content-bytes") => {
                    c.max_content_bytes = at_least(&mut p, "max-content-bytes", 1)?;
                    given.content = true;
                }
                Long("max-rooms-per-user") => {
                    c.max_rooms_per_user = positive(&mut p, "max-rooms-per-user")?
                }
                Long("max-outbox-bytes") => {
                    c.max_outbox_bytes = at_least(&mut p, "max-outbox-bytes", 1024)?;
                    given.outbox = true;
                }
                Long("read-buffer-bytes") => {
                    c.read_buffer_bytes = at_least(&mut p, "read-buffer-bytes", 64)?
                }
                Long("rate-per-s") => c.rate_per_s = positive(&mut p, "rate-per-s")?,
                Long("rate-burst") => {
                    c.rate_burst = positive(&mut p, "rate-burst")?;
                    given.burst = true;
                }
                Long("history-limit") => c.history_limit = value(&mut p, "history-limit")?,
                Long("history-keep") => {
                    c.history_keep = value(&mut p, "history-keep")?;
                    given.keep = true;
                }
                Long("handshake-timeout-ms") => {
                    c.handshake_timeout_ms = positive(&mut p, "handshake-timeout-ms")?
                }
                Long("heartbeat-ms") => c.heartbeat_ms = positive(&mut p, "heartbeat-ms")?,
                Long("pass-budget-us") => {
                    c.pass_budget_us = positive(&mut p, "pass-budget-us")?;
                    if c.pass_budget_us > 1_000_000 {
                        return Err(ConfigError::BadValue {
                            flag: "pass-budget-us",
                            why: "must be at most 1000000 (one second)".into(),
                        });
                    }
                }
                Long("shutdown-grace-ms") => {
                    c.shutdown_grace_ms = value(&mut p, "shutdown-grace-ms")?
                }
                Long("allowed-origins") => {
                    let list: String = value(&mut p, "allowed-origins")?;
                    c.allowed_origins = list
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect();
                }
                Long("auth-file") => auth_file = Some(value::<PathBuf>(&mut p, "auth-file")?),
                Long("echo") => c.echo = true,
                Long("no-persist") => c.persist = false,
                Long("data-dir") => c.data_dir = value(&mut p, "data-dir")?,
                Long("fsync") => c.fsync = value(&mut p, "fsync")?,
                Long("retain-messages") => c.retain_messages = positive(&mut p, "retain-messages")?,
                Long("log-level") => {
                    let level: String = value(&mut p, "log-level")?;
                    c.log_level = parse_level(&level).map_err(|why| ConfigError::BadValue {
                        flag: "log-level",
                        why,
                    })?;
                }
                Long("trace-loop") => c.trace_loop = true,
                Long("memory-limit") => {
                    let text: String = value(&mut p, "memory-limit")?;
                    c.memory_limit = Some(crate::memory::parse_bytes(&text).ok_or_else(|| {
                        ConfigError::BadValue {
                            flag: "memory-limit",
                            why: format!("{text:?} is not a byte count like 64M, 512K or 1G"),
                        }
                    })?);
                }
                Long("redis") => {
                    let url: String = value(&mut p, "redis")?;
                    c.redis = Some(crate::cluster::url::RedisUrl::parse(&url).map_err(|e| {
                        ConfigError::BadValue {
                            flag: "redis",
                            why: e.0,
                        }
                    })?);
                }
                Long("node-id") => {
                    let id: String = value(&mut p, "node-id")?;
                    if !crate::rooms::valid_name(&id) {
                        return Err(ConfigError::BadValue {
                            flag: "node-id",
                            why: format!("must be {}", crate::rooms::NAME_RULE),
                        });
                    }
                    c.node_id = Some(id);
                }
                Long("node-ttl-ms") => {
                    let ms: u64 = value(&mut p, "node-ttl-ms")?;
                    if ms < 300 {
                        return Err(ConfigError::BadValue {
                            flag: "node-ttl-ms",
                            why: "must be at least 300".into(),
                        });
                    }
                    c.node_ttl_ms = ms;
                }
                Short(flag) => return Err(ConfigError::UnknownFlag(format!("-{flag}"))),
                Long(flag) => return Err(ConfigError::UnknownFlag(format!("--{flag}"))),
                Value(word) => {
                    return Err(ConfigError::Unexpected(format!(
                        "unexpected argument {:?}: loopchat takes only flags",
                        word.to_string_lossy()
                    )))
                }
            }
        }
        c.settle(given)?;
        if let Some(path) = auth_file {
            c.auth = Some(load_auth(&path)?);
        }
        Ok(Parsed::Run(Box::new(c)))
    }

    /// Derive the limits that depend on others and were not given, then
    /// refuse pairs that cannot both hold, so that what `welcome`
    /// advertises is what the server enforces: a content of
    /// `max_content_bytes` (even escaped) fits in one message, and one
    /// message of `max_message_bytes` fits in an outbox.
    fn settle(&mut self, given: Given) -> Result<(), ConfigError> {
        if !given.burst {
            self.rate_burst = self.rate_per_s.saturating_mul(BURST_SECONDS);
        }
        let content_room = self
            .max_message_bytes
            .saturating_sub(COMMAND_ENVELOPE_BYTES)
            / JSON_ESCAPE_FACTOR;
        if !given.content {
            self.max_content_bytes = self.max_content_bytes.min(content_room);
        } else if self.max_content_bytes > content_room {
            return Err(ConfigError::Conflict {
                flag: "max-content-bytes",
                other: "max-message-bytes",
                why: format!(
                    "a content of {} bytes may not fit in a message of {} bytes \
                     (content may be at most (message - {COMMAND_ENVELOPE_BYTES}) / \
                     {JSON_ESCAPE_FACTOR} = {content_room}); raise --max-message-bytes \
                     to at least {} or lower --max-content-bytes",
                    self.max_content_bytes,
                    self.max_message_bytes,
                    self.max_content_bytes * JSON_ESCAPE_FACTOR + COMMAND_ENVELOPE_BYTES,
                ),
            });
        }
        // `joined` promises the last `history_limit` messages; without the
        // disk store only the `history_keep` kept in memory exist.
        if !given.keep {
            self.history_keep = self.history_keep.max(self.history_limit);
        } else if self.history_keep < self.history_limit {
            return Err(ConfigError::Conflict {
                flag: "history-keep",
                other: "history-limit",
                why: format!(
                    "keeping {} messages per room in memory cannot fill a join's backlog of {}; \
                     raise --history-keep or lower --history-limit",
                    self.history_keep, self.history_limit
                ),
            });
        }
        if !given.outbox {
            self.max_outbox_bytes = self
                .max_outbox_bytes
                .max(self.max_message_bytes.saturating_mul(2));
        } else if self.max_outbox_bytes < self.max_message_bytes {
            return Err(ConfigError::Conflict {
                flag: "max-outbox-bytes",
                other: "max-message-bytes",
                why: format!(
                    "an outbox of {} bytes cannot hold one message of {} bytes, so every \
                     reader of a large message would be closed as a slow consumer; \
                     raise --max-outbox-bytes or lower --max-message-bytes",
                    self.max_outbox_bytes, self.max_message_bytes
                ),
            });
        }
        Ok(())
    }

    /// tungstenite's settings, derived from ours.
    pub fn websocket(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_bytes)
            // Writes go to loopchat's own outbox, never to tungstenite's
            // buffer for long, so flush every frame straight through.
            .write_buffer_size(0)
            .max_write_buffer_size(self.max_outbox_bytes.max(self.max_message_bytes) * 2)
            .max_message_size(Some(self.max_message_bytes))
            .max_frame_size(Some(self.max_message_bytes))
    }

    /// `--max-connections`, or what the open-file limit allows.
    pub fn connection_limit(&self, fd_limit: u64) -> usize {
        self.max_connections
            .unwrap_or_else(|| (fd_limit as usize).saturating_sub(FD_RESERVE).max(16))
    }
}

/// Smallest `--max-message-bytes`: room for the command envelope and a
/// content of a few hundred bytes.
pub const MIN_MESSAGE_BYTES: usize = 2048;

/// Which dependent limits the command line set itself (the others are
/// derived in [`Config::settle`]).
#[derive(Default)]
struct Given {
    content: bool,
    outbox: bool,
    burst: bool,
    keep: bool,
}

fn value<T>(p: &mut lexopt::Parser, flag: &'static str) -> Result<T, ConfigError>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    let raw = p.value().map_err(|_| ConfigError::MissingValue(flag))?;
    let text = raw.into_string().map_err(|_| ConfigError::BadValue {
        flag,
        why: "not valid UTF-8".into(),
    })?;
    text.parse().map_err(|e: T::Err| ConfigError::BadValue {
        flag,
        why: format!("{text:?}: {e}"),
    })
}

fn positive<T>(p: &mut lexopt::Parser, flag: &'static str) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + Default,
    T::Err: fmt::Display,
{
    let v: T = value(p, flag)?;
    if v <= T::default() {
        return Err(ConfigError::BadValue {
            flag,
            why: "must be greater than 0".into(),
        });
    }
    Ok(v)
}

/// A byte count of at least `min`, with an optional `K`, `M` or `G` suffix
/// (`--max-outbox-bytes 96M`).
fn at_least(p: &mut lexopt::Parser, flag: &'static str, min: usize) -> Result<usize, ConfigError> {
    let text: String = value(p, flag)?;
    let v = crate::memory::parse_bytes(&text)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| ConfigError::BadValue {
            flag,
            why: format!("{text:?} is not a byte count like 65536, 64K or 16M"),
        })?;
    if v < min {
        return Err(ConfigError::BadValue {
            flag,
            why: format!("must be at least {min}"),
        });
    }
    Ok(v)
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("expected error, warn, info, debug or trace, got {s:?}"))
}

/// Read `--auth-file`: one `TOKEN USERNAME` per line, `#` comments allowed.
fn load_auth(path: &std::path::Path) -> Result<HashMap<String, String>, ConfigError> {
    let err = |why: String| ConfigError::AuthFile {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut tokens = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(token), Some(user), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(err(format!("line {}: expected \"TOKEN USERNAME\"", n + 1)));
        };
        if !crate::rooms::valid_name(user) {
            return Err(err(format!(
                "line {}: username must be {}",
                n + 1,
                crate::rooms::NAME_RULE
            )));
        }
        tokens.insert(token.to_string(), user.to_string());
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, ConfigError> {
        Config::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_without_flags() {
        let Parsed::Run(c) = parse(&[]).unwrap() else {
            panic!("expected run")
        };
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_message_bytes, 65536);
        assert!(c.persist);
    }

    #[test]
    fn flags_set_values() {
        let Parsed::Run(c) = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--rate-per-s",
            "5",
            "--allowed-origins",
            "http://a, http://b",
            "--fsync",
            "always",
            "--no-persist",
            "--echo",
        ])
        .unwrap() else {
            panic!("expected run")
        };
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.rate_per_s, 5);
        assert_eq!(c.allowed_origins, vec!["http://a", "http://b"]);
        assert_eq!(c.fsync, Fsync::Always);
        assert!(!c.persist && c.echo);
    }

    #[test]
    fn mistakes_are_reported() {
        assert!(matches!(
            parse(&["--nope"]),
            Err(ConfigError::UnknownFlag(_))
        ));
        assert!(matches!(
            parse(&["--rate-per-s", "0"]),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["--listen", "nowhere"]),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["--listen"]),
            Err(ConfigError::MissingValue(_))
        ));
        assert!(matches!(parse(&["--help"]), Ok(Parsed::Help)));
    }

    fn run(args: &[&str]) -> Config {
        match parse(args) {
            Ok(Parsed::Run(c)) => *c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn burst_follows_the_rate_unless_given() {
        assert_eq!(run(&[]).rate_burst, 40);
        assert_eq!(run(&["--rate-per-s", "100000"]).rate_burst, 200_000);
        let c = run(&["--rate-per-s", "100000", "--rate-burst", "7"]);
        assert_eq!((c.rate_per_s, c.rate_burst), (100_000, 7));
        // Order does not matter.
        assert_eq!(
            run(&["--rate-burst", "7", "--rate-per-s", "9"]).rate_burst,
            7
        );
    }

    #[test]
    fn dependent_limits_are_derived_unless_given() {
        let d = run(&[]);
        assert_eq!(
            (d.max_content_bytes, d.max_outbox_bytes),
            (4096, 256 * 1024)
        );
        let small = run(&["--max-message-bytes", "4096"]);
        assert_eq!(small.max_content_bytes, (4096 - COMMAND_ENVELOPE_BYTES) / 6);
        assert_eq!(run(&["--history-limit", "5000"]).history_keep, 5000);
        assert_eq!(run(&["--history-limit", "10"]).history_keep, 1000);
        let err = parse(&["--history-keep", "10", "--history-limit", "20"])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--history-keep conflicts with --history-limit"),
            "{err}"
        );
        let big = run(&["--max-message-bytes", "16777216"]);
        assert_eq!(big.max_outbox_bytes, 2 * 16_777_216);
        assert_eq!(big.max_content_bytes, 4096);
    }

    #[test]
    fn conflicting_limits_name_both_flags() {
        for (args, flag) in [
            (&["--max-content-bytes", "20000"][..], "--max-content-bytes"),
            (
                &["--max-message-bytes", "4096", "--max-content-bytes", "4096"],
                "--max-content-bytes",
            ),
            (&["--max-outbox-bytes", "4096"], "--max-outbox-bytes"),
            (
                &[
                    "--max-message-bytes",
                    "1000000",
                    "--max-outbox-bytes",
                    "999999",
                ],
                "--max-outbox-bytes",
            ),
        ] {
            let err = match parse(args) {
                Err(e @ ConfigError::Conflict { .. }) => e.to_string(),
                other => panic!("{args:?}: {other:?}"),
            };
            assert!(err.starts_with(&format!("{flag} conflicts with --max-message-bytes")));
            assert!(!err.contains('\n'), "{err}");
        }
        // The largest content the rule allows is accepted.
        let room = (65536 - COMMAND_ENVELOPE_BYTES) / JSON_ESCAPE_FACTOR;
        assert_eq!(
            run(&["--max-content-bytes", &room.to_string()]).max_content_bytes,
            room
        );
    }

    #[test]
    fn unknown_flags_are_named_once() {
        let text = parse(&["--bogus"]).unwrap_err().to_string();
        assert_eq!(text, "unknown flag --bogus (see --help)");
        let text = parse(&["-x"]).unwrap_err().to_string();
        assert_eq!(text, "unknown flag -x (see --help)");
        let text = parse(&["stray"]).unwrap_err().to_string();
        assert!(text.starts_with("unexpected argument \"stray\""), "{text}");
        let text = parse(&["--echo=yes"]).unwrap_err().to_string();
        assert!(
            text.contains("--echo") && !text.contains("invalid option"),
            "{text}"
        );
    }

    #[test]
    fn help_lists_every_flag() {
        let h = help();
        for flag in [
            "--listen",
            "--max-connections",
            "--allowed-origins",
            "--auth-file",
            "--echo",
            "--max-head-bytes",
            "--max-message-bytes",
            "--max-content-bytes",
            "--max-rooms-per-user",
            "--max-outbox-bytes",
            "--rate-per-s",
            "--rate-burst",
            "--history-limit",
            "--data-dir",
            "--no-persist",
            "--fsync",
            "--retain-messages",
            "--handshake-timeout-ms",
            "--heartbeat-ms",
            "--shutdown-grace-ms",
            "--pass-budget-us",
            "--log-level",
            "--trace-loop",
        ] {
            assert!(h.contains(flag), "{flag} missing from --help");
        }
    }
}
