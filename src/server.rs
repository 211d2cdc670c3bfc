//! The loop: one `mio::Poll` that owns the listener and every connection.
//!
//! # One pass of [`Server::run`], in order
//!
//! redis's `aeProcessEvents` is the model. `docs/architecture.md` draws
//! this as a picture.
//!
//! 1. **Sleep.** `poll` waits for readiness or the poll timeout
//!    (`Server::poll_timeout`): zero when the last pass left work (`again`,
//!    `dirty`, an unfinished accept), else the nearest deadline (timers, a
//!    paused accept, the shutdown), else forever: an idle server uses no
//!    CPU.
//! 2. **What the last pass left, first** (`continue_reads`): sessions
//!    whose read budget ran out, and those a spent pass budget left
//!    unread; their readiness edge will not come back by itself.
//! 3. **Handle every event of the batch**, routed by token: the listener
//!    accepts until `WouldBlock` (`accept_all`); the signal pipe and the
//!    waker only set the stop flag; a connection token reads what its phase
//!    reads (`read_head` → `route` → an HTTP answer or `upgrade`;
//!    `read_frames` → the dispatcher; `drain_lingering`) and a WRITABLE
//!    edge marks it dirty. What the dispatcher produces collects in `out`;
//!    a huge burst delivers early (`relieve_outbound`) so `out` stays
//!    bounded. Once the pass has spent half its budget (`Budget`,
//!    `--pass-budget-us`), a ready connection is listed instead of read:
//!    an open session in `again`, an arrival or a departure (a request
//!    head, a hang-up) in `turnover`, which comes after `again`.
//!    Then the arrivals and departures left in `turnover` (at least
//!    `MIN_TURNOVER` a pass), and an accept the budget cut short.
//! 4. **`fire_timers`**: due deadlines (handshake, heartbeat, close), also
//!    within the budget; the rest stay due.
//! 5. **`settle`**: the history commits (the group-commit point for
//!    `--fsync always`: nothing of this pass is delivered before it), then
//!    `apply` hands `out` to the addressed outboxes and carries out the
//!    dispatcher's close requests, and `flush_dirty` writes every dirty
//!    outbox until it is empty or the socket is full, oldest first, until
//!    the whole budget is spent (the rest stays in `dirty`); that repeats while
//!    flushing produced more work (a failed write ends a session, whose
//!    `leave` notices must go out now). Last, `reap` frees the slots of
//!    connections that went during the pass.
//! 6. **Shutdown** starts here, between passes, when the stop flag is set,
//!    so everything the pass produced (stored, with ids) is delivered
//!    first; a paused accept is retried when due; the loop ends once
//!    shutting down and no connection is left (or the grace is over).
//!
//! # The lists a pass keeps, and why none can point at a reused slot
//!
//! A slab key is reused as soon as its slot is freed, and slots are freed
//! only by `reap`, at the end of `settle`. So a list that is emptied within
//! the pass, before `reap`, can hold bare keys; a list that lives across
//! passes, or a thing that can outlive its connection, carries the
//! generation too and checks it.
//!
//! | list | holds | filled by | emptied by | why it is safe |
//! |---|---|---|---|---|
//! | `out.sends`, `out.closes` | key + frame / close request | the dispatcher | `apply`, this pass | the dispatcher addresses members only, and a connection stops being a member in its first `leave`, before it can be `Gone`; `deliver` also checks the phase |
//! | `dirty` | key + generation (`Conn::dirty` keeps it once) | `mark_dirty` | `flush_dirty`, this pass or, with the budget spent, the next | crosses a `reap` when the budget is spent: the generation is checked |
//! | `gone` | key | `leave` (→ `Gone`) | `reap`, this pass | its slots are the ones being freed |
//! | uncommitted messages | sender key | the dispatcher | `Dispatcher::commit`, first step of `settle` | emptied before `reap` |
//! | `again`, `turnover` | key + generation (`Conn::read_later` keeps it in one of them, once) | `read_frames` (read budget spent), `on_ready` (pass budget spent) | `continue_reads`, next pass | crosses a `reap`: the generation is checked |
//! | timers | key + generation, one per key | every phase change | `pop_due`; `cancel` when `Gone` | cancelled at `Gone`; the generation is checked again when one fires |
//! | room tables | key ↔ name, rooms | `Dispatcher::admit`/`open` | `Dispatcher::disconnect`, from `leave` | removed in the first `leave`, long before the slot is freed |
//!
//! # The way out
//!
//! Every connection leaves through `Server::leave`, with an `Exit`
//! that names the phase it goes to (the diagram is in `conn.rs`). Failure
//! tiers, each decided in one place: a bad command is the dispatcher's (an
//! `error` event); a protocol or I/O failure ends that connection only
//! (`leave`); a failure of the poll itself ends [`Server::run`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::Message;

use crate::cluster::engine::{EngineConfig, RedisEngine};
use crate::config::Config;
use crate::conn::{self, Census, Conn, Endpoint, HandshakeFailed, Inbound, Phase, PhaseMut};
use crate::dispatch::{Clock, Dispatcher, Effects, Refusal, SessionRequest, Settings};
use crate::http::{self, Head, HeadError};
use crate::memory::{self, Account, Heaviest};
use crate::outbox::{self, Flushed};
use crate::protocol::{self, Frame, Limits};
use crate::stats::{LoopCounters, Reject, Snapshot};
use crate::store::{memory::MemoryHistory, History};
use crate::timers::{Kind, Timers};

/// Reserved tokens, counted down from the top so that slab keys (counted up
/// from zero) can be used as tokens directly.
const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);
/// Cluster mode: the pipelined command link and the subscription link to
/// Redis (`cluster/link.rs`).
const REDIS_COMMANDS: Token = Token(usize::MAX - 4);
const REDIS_SUBSCRIPTION: Token = Token(usize::MAX - 5);

/// Most frames (data and control alike: a ping costs as much to read as a
/// message) read from one connection per event. A client that sends
/// without pause would otherwise keep the loop on its socket forever; past
/// the budget the connection is queued in `again` to continue next
/// iteration (the edge-triggered event will not come again by itself).
const READ_BUDGET: usize = 128;

/// Deliveries produced by a pass's reads after which it reads no more:
/// applying and flushing them is the larger part of the pass.
const DELIVERY_SHARE: usize = 8_192;
/// Work every pass does whatever its budget, so that no list can starve
/// (and a pass that the scheduler preempted still moves on).
const MIN_READS: usize = 16;
const MIN_TURNOVER: usize = 16;
const MIN_TIMERS: usize = 64;
const MIN_FLUSHES: usize = 8;

/// The pass budget (`--pass-budget-us`). A pass stops taking on new work
/// (reading ready connections, accepting, firing timers) once it has run
/// half its budget or its reads have produced `DELIVERY_SHARE`
/// deliveries, and stops flushing once it has run all of it; what is left
/// waits in `again`, `dirty`, the accept queue and the timer heap for the
/// next pass, which polls with a zero timeout.
///
/// Why: a mass event (10,000 sessions leaving at once is a million leave
/// notices) would otherwise be one pass of hundreds of milliseconds in
/// which no one else is read or written. Work is never dropped, only
/// spread over passes, and each connection's frames keep their order: its
/// outbox is FIFO and every list is served first in, first out.
///
/// Why time and not counts alone: one read costs a microsecond or a
/// millisecond (a message into a room of 10,000), one flush one frame or
/// sixty-four; the clock (a vDSO call) is cheap beside either.
struct Budget {
    start: Instant,
    /// Connections read (and accepts made) in this pass.
    reads: usize,
    /// Of those, arrivals and departures (see `Queue`).
    turnover: usize,
    read_share: Duration,
    total: Duration,
}

impl Budget {
    fn new(total_us: u64) -> Budget {
        Budget {
            start: Instant::now(),
            reads: 0,
            turnover: 0,
            read_share: Duration::from_micros(total_us / 2),
            total: Duration::from_micros(total_us),
        }
    }

    /// A new pass starts now.
    fn restart(&mut self, now: Instant) {
        self.start = now;
        self.reads = 0;
        self.turnover = 0;
    }

    /// The pass has done its share of reading, with `pending` deliveries
    /// produced so far.
    fn reads_spent(&self, pending: usize) -> bool {
        self.reads >= MIN_READS
            && (pending >= DELIVERY_SHARE || self.start.elapsed() >= self.read_share)
    }

    /// One read (or accept) from `queue`'s connections.
    fn count(&mut self, queue: Queue) {
        self.reads += 1;
        if queue == Queue::Turnover {
            self.turnover += 1;
        }
    }

    /// The whole pass budget is spent.
    fn spent(&self) -> bool {
        self.start.elapsed() >= self.total
    }
}

/// Which list a connection waits in when a pass leaves it unread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    /// Open sessions: people chatting.
    Sessions,
    /// Arrivals (a request head) and departures (a hang-up, a close in
    /// progress): a crowd of these must not delay the sessions.
    Turnover,
}

impl Queue {
    fn of(conn: &Conn) -> Queue {
        match conn.is_open() && !conn.departing {
            true => Queue::Sessions,
            false => Queue::Turnover,
        }
    }
}

/// Pending deliveries after which a batch delivers early (about 2.5 MiB of
/// `(key, frame)` pairs) instead of waiting for the end of the batch.
const OUTBOUND_SOFT_CAP: usize = 1 << 16;

/// How long a close we started may take before the socket is dropped, and
/// how long an HTTP answer may linger for the peer to read it. During a
/// shutdown the configured `--shutdown-grace-ms` applies instead.
const CLOSE_GRACE_MS: u64 = 2_000;

/// Connections over `--max-connections` that are still answered 503 (and
/// so briefly hold a slot and a descriptor); past that they are dropped.
const REJECT_SLOTS: usize = 64;

/// The kernel send buffer asked for on every accepted socket (`SO_SNDBUF`;
/// Linux doubles the number for its own bookkeeping and keeps about this
/// much payload).
///
/// Why cap it: the slow-consumer rule counts only the outbox, and Linux
/// autotunes a socket's send buffer up to `net.ipv4.tcp_wmem`'s maximum
/// (4 MiB by default), so a reader that stopped reading held megabytes
/// unseen before its outbox even started to grow (1.4 MB, and up to 3.9 MB
/// in `a_stalled_reader_holds_little_beyond_its_outbox` without the cap).
/// With the cap, what one stalled reader can hold in total is
/// `--max-outbox-bytes` plus at most twice this.
///
/// Why not smaller: a client that is busy sending and reads its own echoes
/// late (a load tool, a bot posting a burst) must not be mistaken for a
/// stalled one; the kernel's share is the slack that absorbs such a burst
/// without queueing in user space. 256 KiB, as much again as the default
/// outbox bound, keeps the throughput of a local or LAN peer and is a
/// sixteenth of the kernel's default maximum.
pub const KERNEL_SEND_BUFFER: usize = 256 * 1024;

/// After `accept` fails for lack of descriptors, wait this long before
/// trying again. Retrying at once would spin: the pending connection stays
/// in the backlog and the listener stays ready.
const ACCEPT_RETRY_MS: u64 = 100;

/// Near `--memory-limit`: above this share of it (in tenths), upgrades get
/// 503, so that the sessions already open keep the room they have.
const MEMORY_REFUSE_TENTHS: usize = 9;

/// A shedding episode ends (logged once, freed memory handed back to the
/// kernel) when the account is back under this share of the limit; the
/// gap to the refusal threshold keeps one burst from starting many
/// episodes.
const MEMORY_CALM_TENTHS: usize = 8;

/// The page served at `/`.
const PAGE: &str = include_str!("page.html");

/// Why the server could not start or could not go on.
#[derive(Debug)]
pub enum ServerError {
    Bind(SocketAddr, io::Error),
    Poll(io::Error),
    Signals(io::Error),
    Store(String),
    /// `--memory-limit` without the counting allocator installed.
    Memory,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            ServerError::Poll(e) => write!(f, "poll failed: {e}"),
            ServerError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            ServerError::Store(e) => write!(f, "{e}"),
            ServerError::Memory => write!(
                f,
                "--memory-limit needs loopchat::memory::Counting as the global allocator"
            ),
        }
    }
}

impl std::error::Error for ServerError {}

/// Stops a running server from another thread (tests, embedding). Signals
/// do the same for the binary.
#[derive(Clone)]
pub struct ServerHandle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl ServerHandle {
    /// Begin a graceful shutdown: close 1001 to every client, then exit.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// How a connection leaves: the argument of [`Server::leave`], the one way
/// out. Each names the phase it leads to (see the diagram in `conn.rs`).
enum Exit {
    /// Send a close frame and wait for the peer's reply (→ `Closing`).
    Goodbye(u16, &'static str),
    /// The peer broke the protocol: send a close frame, but do not wait for
    /// a reply it may never send (→ `Linger`).
    Reject(u16, &'static str),
    /// The peer completed the close handshake: flush what is queued, then
    /// go (→ `Flushing`, or `Gone` when nothing is queued).
    Finished,
    /// A plain HTTP answer from a connection still in `Head` (→ `Linger`).
    Answer(Vec<u8>),
    /// Nothing more can be said: the socket failed, a deadline passed, or
    /// the last bytes are out (→ `Gone`).
    Drop,
}

/// How reading an open connection ended.
enum End {
    Clean,
    Fail(u16, &'static str),
    Gone,
    /// Replies the peer does not read (pongs to a ping flood, echoes)
    /// pushed its outbox over the bound.
    Overflow,
}

/// Whether output waits one pass for company.
///
/// Under a saturated fan-out every member gets tens of frames each pass,
/// and the kernel's cost per `write` (the system call, the segment, the
/// reader's wake-up) is then the larger part of each delivery: twice the
/// frames per `write` is nearly half that cost. So a pass that queued many
/// frames per connection does not flush; the loop polls again for at most
/// [`HOLD_MS`], reads what arrived meanwhile, and the next pass flushes
/// everything together. A pass with a few frames per connection (any
/// paced load, an answer to one client) flushes at once, as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Every pass flushes what it queued.
    Flowing,
    /// Pass number `pass` queued enough to wait: the next pass flushes.
    Held { pass: u64 },
}

/// How long held output waits for more input at most (`poll` counts in
/// milliseconds).
const HOLD_MS: u64 = 1;

/// A pass holds its output only if it queued at least this many frames in
/// all ...
const HOLD_AT_FRAMES: u64 = 1024;

/// ... and at least this many per connection with output.
const HOLD_AT_PER_CONNECTION: u64 = 16;

/// The server: the poll, the slab of connections, the dispatcher.
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    config: Config,
    ws_config: tungstenite::protocol::WebSocketConfig,
    max_connections: usize,
    conns: Slab<Conn>,
    /// How many of `conns` are in each phase (for `/stats`).
    census: Census,
    next_generation: u64,
    dispatcher: Dispatcher,
    out: Effects,
    timers: Timers,
    /// Connections with output to flush: (key, generation), each at most
    /// once (`Conn::dirty`). Emptied by `flush_dirty`, or what the pass
    /// budget left of it is flushed first by the next pass.
    dirty: Vec<(usize, u64)>,
    /// Connections in `Phase::Gone`, whose slots `reap` frees after the
    /// batch. Emptied by `reap`.
    gone: Vec<usize>,
    /// Connections to read next pass: (key, generation). Those whose read
    /// budget ran out, and those a spent pass budget left unread.
    again: Vec<(usize, u64)>,
    /// Arrivals and departures to read next pass (request heads, sockets
    /// that hung up, closes): (key, generation). Served after `again`, but
    /// at least `MIN_TURNOVER` a pass, so that a crowd arriving or leaving
    /// at once waits behind the sessions already chatting, not the other
    /// way round.
    turnover: Vec<(usize, u64)>,
    accept_retry_at: Option<u64>,
    /// The pass budget ran out with the listener still ready.
    accept_again: bool,
    /// What the current pass may still spend.
    budget: Budget,
    /// Whether this pass's output goes out now or waits one pass for more.
    output: Output,
    /// `counters.frames_queued` when the current pass began.
    queued_at_pass_start: u64,
    shutdown_deadline: Option<u64>,
    /// `--memory-limit` and what counts against it.
    memory: Option<Account>,
    /// Open connections by queued output, kept only with a memory limit.
    heaviest: Heaviest,
    /// Over the memory limit since the last calm moment: how many
    /// connections this episode has shed.
    shedding: Option<u64>,
    started: Instant,
    pub counters: LoopCounters,
    /// Cluster mode: the Redis engine the dispatcher's requests go to.
    engine: Option<RedisEngine>,
}

impl Server {
    /// Bind the listener and set everything up; nothing runs until
    /// [`Server::run`].
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let history: Box<dyn History> = if config.redis.is_some() {
            // History lives in Redis; this one is never asked.
            Box::new(MemoryHistory::new(0))
        } else if config.persist {
            crate::store::open(&config).map_err(ServerError::Store)?
        } else {
            Box::new(MemoryHistory::new(config.history_keep))
        };
        Self::with_history(config, history)
    }

    /// Like [`Server::bind`], with a history of the caller's choosing.
    pub fn with_history(config: Config, history: Box<dyn History>) -> Result<Server, ServerError> {
        if config.memory_limit.is_some() {
            if !memory::counting() {
                return Err(ServerError::Memory);
            }
            memory::tune_for_limit();
        }
        let fd_limit = raise_fd_limit();
        let max_connections = config.connection_limit(fd_limit);
        let poll = Poll::new().map_err(ServerError::Poll)?;
        let mut listener =
            TcpListener::bind(config.listen).map_err(|e| ServerError::Bind(config.listen, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| ServerError::Bind(config.listen, e))?;
        widen_backlog(&listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(ServerError::Poll)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ServerError::Poll)?);
        let signals = if config.signals {
            let mut s = signal_hook_mio::v1_0::Signals::new([
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
            ])
            .map_err(ServerError::Signals)?;
            poll.registry()
                .register(&mut s, SIGNALS, Interest::READABLE)
                .map_err(ServerError::Signals)?;
            Some(s)
        } else {
            None
        };
        let settings = Settings {
            limits: Limits {
                max_message_bytes: config.max_message_bytes,
                max_content_bytes: config.max_content_bytes,
                max_rooms_per_user: config.max_rooms_per_user,
                rate_per_s: config.rate_per_s,
                rate_burst: config.rate_burst,
                history_limit: config.history_limit,
            },
            resume_max: config.history_keep.max(config.history_limit),
            refuse_unkept: config.persist && config.fsync == crate::config::Fsync::Always,
            reply_bytes: config.max_outbox_bytes / 2,
        };
        let mut dispatcher = Dispatcher::new(settings, history);
        if config.redis.is_some() {
            dispatcher = dispatcher.clustered();
        }
        let engine = config.redis.as_ref().map(|url| {
            let node = config.node_id.clone().unwrap_or_else(generated_node_id);
            log::info!(
                "cluster mode: node {node}, redis {} (db {}); history lives in Redis, \
                 --data-dir and --fsync are ignored",
                url.addr,
                url.db
            );
            let seed = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id());
            RedisEngine::new(
                EngineConfig {
                    url: url.clone(),
                    node,
                    ttl_ms: config.node_ttl_ms,
                    retain: config.retain_messages,
                },
                REDIS_COMMANDS,
                REDIS_SUBSCRIPTION,
                seed,
            )
        });
        Ok(Server {
            poll,
            listener: Some(listener),
            local_addr,
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            signals,
            ws_config: config.websocket(),
            max_connections,
            conns: Slab::new(),
            census: Census::default(),
            next_generation: 1,
            dispatcher,
            engine,
            out: Effects::default(),
            timers: Timers::new(),
            dirty: Vec::new(),
            gone: Vec::new(),
            again: Vec::new(),
            turnover: Vec::new(),
            accept_retry_at: None,
            accept_again: false,
            budget: Budget::new(config.pass_budget_us),
            output: Output::Flowing,
            queued_at_pass_start: 0,
            shutdown_deadline: None,
            memory: config.memory_limit.map(|b| Account::new(b as usize)),
            heaviest: Heaviest::new(),
            shedding: None,
            started: Instant::now(),
            counters: LoopCounters::default(),
            config,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            waker: self.waker.clone(),
            stop: self.stop.clone(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn clock(&self) -> Clock {
        Clock {
            mono_ms: self.now_ms(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Run until shut down. Returns an error only when polling itself fails.
    pub fn run(mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(1024);
        // The loop thread's CPU clock at the end of the last pass: a pass's
        // CPU time is the difference (it includes the `poll` call, a few
        // microseconds), one clock read per pass rather than two.
        let mut cpu_mark = thread_cpu_us();
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Poll(e));
            }
            let iteration_start = Instant::now();
            self.budget.restart(iteration_start);
            self.queued_at_pass_start = self.counters.frames_queued;
            let before = self.config.trace_loop.then(|| {
                self.trace(&events, timeout);
                self.trace_marks()
            });
            // Sessions the last pass left unread come first, oldest first.
            self.continue_reads(Queue::Sessions);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    // The handle set `stop`; acted on after the batch.
                    WAKER => {}
                    REDIS_COMMANDS | REDIS_SUBSCRIPTION => self.on_engine_ready(event.token()),
                    SIGNALS => {
                        if self.on_signal() {
                            log::warn!("second signal: exiting without waiting");
                            return self.finish();
                        }
                    }
                    Token(key) => {
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        // Both directions closed, or an error (a reset):
                        // unlike a half-close, nothing written can arrive.
                        if let Some(conn) = self.conns.get_mut(key) {
                            if event.is_write_closed() || event.is_error() {
                                conn.hung_up = true;
                            }
                            if event.is_read_closed() || conn.hung_up {
                                conn.departing = true;
                            }
                        }
                        self.on_ready(key, readable, event.is_writable());
                    }
                }
            }
            // Then arrivals and departures, at least a few every pass.
            self.continue_reads(Queue::Turnover);
            if std::mem::take(&mut self.accept_again) {
                self.accept_all();
            }
            self.fire_timers();
            self.tick_engine();
            self.settle();
            // Shutdown starts between batches, so that everything the batch
            // produced (already stored, with ids) is delivered first.
            if self.stop.load(Ordering::SeqCst) && self.shutdown_deadline.is_none() {
                self.begin_shutdown();
            }
            if self.accept_retry_at.is_some_and(|at| at <= self.now_ms()) {
                self.accept_all();
                self.settle();
            }
            let spent = iteration_start.elapsed().as_micros() as u64;
            let cpu_now = thread_cpu_us();
            let cpu = cpu_now.saturating_sub(cpu_mark);
            cpu_mark = cpu_now;
            if let Some(before) = before {
                self.trace_done(before, spent, cpu);
            }
            self.counters.iteration(spent, cpu);
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || self.now_ms() >= deadline {
                    return self.finish();
                }
            }
        }
    }

    /// The poll timeout: zero when work is pending, at most [`HOLD_MS`]
    /// while output is held, else the time to the nearest deadline, else
    /// forever (an idle server uses no CPU).
    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() || !self.turnover.is_empty() || self.accept_again {
            return Some(Duration::ZERO);
        }
        if !self.dirty.is_empty() {
            return Some(match self.output {
                Output::Held { .. } => Duration::from_millis(HOLD_MS),
                Output::Flowing => Duration::ZERO,
            });
        }
        let deadlines = [
            self.timers.next_deadline(),
            self.accept_retry_at,
            self.shutdown_deadline,
            self.engine.as_ref().and_then(RedisEngine::next_deadline),
        ];
        let next = deadlines.into_iter().flatten().min()?;
        Some(Duration::from_millis(next.saturating_sub(self.now_ms())))
    }

    /// The counters `trace_done` reports the change of.
    fn trace_marks(&self) -> [u64; 5] {
        let l = &self.counters;
        [
            l.frames_in,
            l.frames_queued,
            l.flushes,
            l.bytes_out,
            l.removed,
        ]
    }

    /// `--trace-loop`: what one pass did, after it did it.
    fn trace_done(&self, before: [u64; 5], spent_us: u64, cpu_us: u64) {
        let now = self.trace_marks();
        let d: Vec<u64> = now.iter().zip(before).map(|(a, b)| a - b).collect();
        log::info!(
            target: "loopchat::loop",
            "iteration {} done in {spent_us} us ({cpu_us} us CPU): {} frame(s) read, {} frame(s) queued, \
             {} flush(es) wrote {} byte(s), {} slot(s) freed; {} deadline(s) pending",
            self.counters.iterations + 1,
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
            self.timers.len(),
        );
    }

    fn trace(&self, events: &Events, timeout: Option<Duration>) {
        let mut line = format!(
            "iteration {}: woke with {} event(s) (timeout {:?}):",
            self.counters.iterations + 1,
            events.iter().count(),
            timeout
        );
        for e in events.iter() {
            let who = match e.token() {
                LISTENER => "listener".to_string(),
                WAKER => "waker".to_string(),
                SIGNALS => "signals".to_string(),
                Token(k) => match self.conns.get(k) {
                    Some(c) => format!("conn #{k} ({})", c.phase().name()),
                    None => format!("conn #{k} (gone)"),
                },
            };
            let flags = [
                (e.is_readable(), "R"),
                (e.is_writable(), "W"),
                (e.is_read_closed(), "rclosed"),
                (e.is_error(), "err"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| *f)
            .collect::<Vec<_>>()
            .join("|");
            line.push_str(&format!(" [{who} {flags}]"));
        }
        log::info!(target: "loopchat::loop", "{line}");
    }

    /// After handling events: deliver what the dispatcher produced, commit
    /// history, flush, and reap. Repeats while flushing itself produced
    /// work (a write failure that ends a session sends `leave` notices,
    /// which must not wait for some later wake-up).
    fn settle(&mut self) {
        // The group-commit point: before anything of this iteration is
        // delivered, so that with `--fsync always` no message leaves before
        // its record is durable (and one that cannot be made durable is
        // refused instead).
        loop {
            // Cluster mode: requests out to Redis, what came back in, before
            // the commit and the delivery (a no-op on a single node).
            self.pump_engine();
            self.dispatcher.commit(&mut self.out);
            loop {
                self.apply();
                // Before the flush: a connection shed here has its goodbye
                // queued, and it must go out in this pass like any output.
                self.check_memory();
                if self.dirty.is_empty() {
                    // Nothing left to hold (every held connection closed).
                    self.output = Output::Flowing;
                    break;
                }
                if self.hold_output() || !self.flush_dirty() {
                    break;
                }
            }
            // Sessions that ended while flushing asked the engine to part
            // and release: those requests must leave in this pass too.
            if !self.dispatcher.has_requests() {
                break;
            }
        }
        self.reap();
    }

    // ---- the cluster engine ---------------------------------------------

    /// Readiness on a Redis link.
    fn on_engine_ready(&mut self, token: Token) {
        let now = self.now_ms();
        let Server {
            engine: Some(engine),
            dispatcher,
            poll,
            ..
        } = self
        else {
            return;
        };
        let wanted = |room: &str| dispatcher.tables().room(room).is_some();
        engine.on_ready(token, now, poll.registry(), &wanted);
    }

    /// The engine's deadlines: reconnects, reply deadlines, refreshes.
    fn tick_engine(&mut self) {
        let now = self.now_ms();
        let Server {
            engine: Some(engine),
            dispatcher,
            poll,
            ..
        } = self
        else {
            return;
        };
        if engine.next_deadline().is_some_and(|at| at <= now) {
            let wanted = |room: &str| dispatcher.tables().room(room).is_some();
            engine.tick(now, poll.registry(), &wanted);
        }
    }

    /// Hand the dispatcher's requests to the engine and its completions and
    /// publications to the dispatcher, until neither side has more (each
    /// round is bounded: what the engine answers at once is what it had).
    fn pump_engine(&mut self) {
        let now = self.now_ms();
        loop {
            let requests = self.dispatcher.take_requests();
            let Server {
                engine: Some(engine),
                dispatcher,
                poll,
                out,
                ..
            } = self
            else {
                return;
            };
            let sent = !requests.is_empty();
            for (ticket, request) in requests {
                engine.submit(now, ticket, request);
            }
            let wanted = |room: &str| dispatcher.tables().room(room).is_some();
            if sent {
                engine.flush(now, poll.registry(), &wanted);
            }
            let (done, publications) = engine.take();
            if done.is_empty() && publications.is_empty() {
                break;
            }
            for publication in publications {
                dispatcher.publication(publication, out);
            }
            for completion in done {
                dispatcher.complete(completion, out);
            }
            for (key, result) in self.dispatcher.take_admissions() {
                self.admitted(key, result);
            }
            self.relieve_outbound();
        }
    }

    /// A suspended upgrade's name claim was decided: open the session, or
    /// answer 409 / 503.
    fn admitted(&mut self, key: usize, result: Result<(), Refusal>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let (wire, buf, head_len) = match conn.take_phase() {
            Phase::Claiming {
                wire,
                buf,
                head_len,
            } => (wire, buf, head_len),
            other => return conn.enter(other, &mut self.census),
        };
        conn.enter(Phase::Head { wire, buf }, &mut self.census);
        match result {
            Ok(()) => self.upgrade(key, head_len, Endpoint::Chat),
            Err(refusal) => {
                let why = match refusal {
                    Refusal::Taken => Reject::Taken,
                    Refusal::Unavailable => Reject::ClusterDown,
                    Refusal::BadUsername | Refusal::BadRoom => Reject::Username,
                };
                self.counters.reject(why);
                self.answer(key, refusal_answer(&refusal));
            }
        }
    }

    /// Deliver early when one batch has produced a great many deliveries
    /// (bursts into a huge room), so the pending list stays bounded; the
    /// commit comes first, as in [`Server::settle`].
    fn relieve_outbound(&mut self) {
        if self.out.sends.len() >= OUTBOUND_SOFT_CAP {
            self.dispatcher.commit(&mut self.out);
            self.apply();
        }
    }

    // ---- accepting ------------------------------------------------------

    /// Accept until `WouldBlock`: the listener is edge-triggered, so a
    /// connection left in the backlog would get no further event.
    fn accept_all(&mut self) {
        self.accept_retry_at = None;
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            // The rest of the backlog waits for the next pass (the edge
            // will not come again by itself: `accept_again` remembers it).
            if self.queue_spent(Queue::Turnover) {
                self.accept_again = true;
                self.counters.deferred += 1;
                return;
            }
            self.budget.count(Queue::Turnover);
            match listener.accept() {
                Ok((sock, peer)) => self.admit_socket(sock, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of descriptors. Retrying now would spin at 100%
                    // CPU; retry on a timer or when a connection closes.
                    if self.counters.accept_fd_exhausted == 0 {
                        log::warn!("accept: {e}; pausing accepts until descriptors free up");
                    }
                    self.counters.accept_fd_exhausted += 1;
                    self.accept_retry_at = Some(self.now_ms() + ACCEPT_RETRY_MS);
                    return;
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    self.accept_retry_at = Some(self.now_ms() + ACCEPT_RETRY_MS);
                    return;
                }
            }
        }
    }

    fn admit_socket(&mut self, mut sock: TcpStream, peer: SocketAddr) {
        self.counters.accepted += 1;
        let over_limit = self.conns.len() >= self.max_connections;
        if over_limit && self.conns.len() >= self.max_connections + REJECT_SLOTS {
            // Not even room to say 503: drop it.
            self.counters.reject(Reject::OverLimit);
            return;
        }
        let _ = sock.set_nodelay(true);
        cap_send_buffer(&sock);
        let generation = self.next_generation;
        self.next_generation += 1;
        let now = self.now_ms();
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        // READABLE only: most connections never fill their socket buffer,
        // and a WRITABLE interest would wake the loop once for every new
        // socket. WRITABLE is added the first time a flush leaves bytes
        // behind (see flush_dirty).
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, Token(key), Interest::READABLE)
        {
            log::warn!("register {peer}: {e}");
            return;
        }
        entry.insert(Conn::new(sock, generation, now, &mut self.census));
        log::debug!("conn #{key} from {peer}");
        if over_limit {
            self.counters.reject(Reject::OverLimit);
            let body = http::answer(
                503,
                "text/plain; charset=utf-8",
                b"server full: too many connections, retry later\n",
                &[("Retry-After", "5")],
            );
            self.answer(key, body);
        } else {
            let deadline = now + self.config.handshake_timeout_ms;
            self.timers.arm(deadline, key, generation, Kind::Handshake);
        }
    }

    // ---- readiness ------------------------------------------------------

    fn on_ready(&mut self, key: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        // Gone during this batch: the event is stale.
        if conn.is_gone() {
            return;
        }
        if writable {
            if let Some(wire) = conn.wire() {
                wire.outbox.socket_writable();
            }
            self.mark_dirty(key);
        }
        if !readable {
            return;
        }
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let queue = Queue::of(conn);
        // Arrivals and departures queue behind those already waiting, so
        // they are read in the order they came.
        let behind = queue == Queue::Turnover && !self.turnover.is_empty();
        if !behind && !self.queue_spent(queue) {
            self.budget.count(queue);
            return self.read(key);
        }
        self.counters.deferred += 1;
        self.read_later(key, queue);
    }

    /// The pass has done its share of reading (see [`Budget`]).
    fn reads_spent(&self) -> bool {
        self.budget.reads_spent(self.out.sends.len())
    }

    /// The pass has done its share of reading from `queue`: sessions
    /// until the share is spent, arrivals and departures too but never
    /// fewer than `MIN_TURNOVER`.
    fn queue_spent(&self, queue: Queue) -> bool {
        match queue {
            Queue::Sessions => self.reads_spent(),
            Queue::Turnover => self.budget.turnover >= MIN_TURNOVER && self.reads_spent(),
        }
    }

    /// List the connection to be read next pass (once: `read_later`).
    fn read_later(&mut self, key: usize, queue: Queue) {
        let Some(conn) = self.conns.get_mut(key).filter(|c| !c.read_later) else {
            return;
        };
        conn.read_later = true;
        let entry = (key, conn.generation);
        self.waiting(queue).push(entry);
    }

    /// The list `queue`'s connections wait in.
    fn waiting(&mut self, queue: Queue) -> &mut Vec<(usize, u64)> {
        match queue {
            Queue::Sessions => &mut self.again,
            Queue::Turnover => &mut self.turnover,
        }
    }

    /// Read whatever the connection's phase reads.
    fn read(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.phase() {
            Phase::Head { .. } => self.read_head(key),
            // The claim decides; the client's bytes wait in the socket and
            // are read when the session opens.
            Phase::Claiming { .. } => {}
            Phase::Open(_) | Phase::Closing(_) => self.read_frames(key),
            Phase::Linger { .. } => self.drain_lingering(key),
            // Both close frames are out: nothing more is read, the
            // connection goes when its reply is flushed.
            Phase::Flushing(_) | Phase::Gone | Phase::Taken => {}
        }
    }

    /// Connections a previous pass left to read in `queue` (read budget
    /// or pass budget spent), oldest first; what this pass cannot take
    /// stays ahead of what it adds.
    fn continue_reads(&mut self, queue: Queue) {
        let mut backlog = std::mem::take(self.waiting(queue)).into_iter();
        while let Some((key, generation)) = backlog.next() {
            if self.queue_spent(queue) {
                let rest = std::iter::once((key, generation)).chain(backlog).collect();
                let list = self.waiting(queue);
                let added = std::mem::replace(list, rest);
                list.extend(added);
                return;
            }
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.generation == generation && !conn.is_gone() {
                conn.read_later = false;
                self.budget.count(queue);
                self.read(key);
            }
        }
    }

    fn read_head(&mut self, key: usize) {
        let limit = self.config.max_head_bytes;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let PhaseMut::Head { wire, buf } = conn.phase_mut() else {
            return;
        };
        let mut chunk = [0u8; 2048];
        let result = loop {
            let room = (limit - buf.len()).min(chunk.len());
            match wire.read_raw(&mut chunk[..room]) {
                Ok(0) => break Err(None),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    // A head ends with a newline: after the first read
                    // (which catches bytes that are not HTTP at all), parse
                    // only when one arrived, so a client sending a byte at
                    // a time cannot make each byte cost a parse of the
                    // whole buffer.
                    let first = buf.len() == n;
                    if !first && !chunk[..n].contains(&b'\n') && buf.len() < limit {
                        continue;
                    }
                    match http::parse_head(buf) {
                        Ok(Some(head)) => break Ok(Some(head)),
                        Ok(None) if buf.len() >= limit => break Err(Some(HeadError::TooLarge)),
                        Ok(None) => continue,
                        Err(e) => break Err(Some(e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Err(None),
            }
        };
        self.counters.bytes_in += std::mem::take(&mut wire.read_bytes);
        match result {
            Ok(None) => {}
            Ok(Some(head)) => self.route(key, head),
            Err(None) => self.leave(key, Exit::Drop),
            Err(Some(HeadError::TooLarge)) => {
                self.counters.reject(Reject::HeadTooLarge);
                let body = http::text(431, &format!("request head larger than {limit} bytes"));
                self.answer(key, body);
            }
            Err(Some(e)) => {
                self.counters.reject(Reject::BadRequest);
                self.answer(key, http::text(400, &e.to_string()));
            }
        }
    }

    /// Decide what a complete request head gets. `HEAD` of a plain
    /// endpoint gets exactly the `GET` answer's status and headers, without
    /// the body (uptime checkers use it); it never upgrades.
    fn route(&mut self, key: usize, head: Head) {
        let head_only = head.method == "HEAD";
        if head.method != "GET" && !head_only {
            self.counters.reject(Reject::Method);
            let body = http::answer(
                405,
                "text/plain; charset=utf-8",
                b"only GET and HEAD are supported\n",
                &[("Allow", "GET, HEAD")],
            );
            return self.answer(key, body);
        }
        let upgrade = head.upgrade && !head_only;
        let plain = match (head.path.as_str(), upgrade) {
            ("/ws" | "/", true) => Ok(Endpoint::Chat),
            ("/echo", true) if self.config.echo => Ok(Endpoint::Echo),
            ("/healthz", _) => Err(if self.engine.as_ref().is_some_and(|e| !e.healthy()) {
                http::text(503, "cluster store (Redis) unreachable")
            } else if self.dispatcher.history_ref().healthy() {
                http::text(200, "ok")
            } else {
                http::text(503, "history store is failing")
            }),
            ("/stats", _) => {
                let body = self.snapshot().to_json();
                Err(http::answer(200, "application/json", body.as_bytes(), &[]))
            }
            ("/metrics", _) => {
                let body = self.snapshot().to_prometheus();
                Err(http::answer(
                    200,
                    "text/plain; version=0.0.4",
                    body.as_bytes(),
                    &[],
                ))
            }
            ("/name-check", _) => {
                let tables = self.dispatcher.tables();
                Err(http::name_check(head.query.as_deref(), |name| {
                    tables.by_name(name).is_some()
                }))
            }
            ("/", false) => Err(http::answer(
                200,
                "text/html; charset=utf-8",
                PAGE.as_bytes(),
                &[],
            )),
            ("/ws", false) | ("/echo", false) if head.path == "/ws" || self.config.echo => {
                self.counters.reject(Reject::BadRequest);
                Err(http::text(400, "this endpoint needs a WebSocket upgrade"))
            }
            _ => {
                self.counters.reject(Reject::NotFound);
                Err(http::text(404, "no such path"))
            }
        };
        let endpoint = match plain {
            Ok(endpoint) => endpoint,
            Err(body) if head_only => return self.answer(key, http::without_body(body)),
            Err(body) => return self.answer(key, body),
        };
        let wait = match self.check_upgrade(key, &head, endpoint) {
            Ok(wait) => wait,
            Err((why, status, text)) => {
                self.counters.reject(why);
                let body = match status {
                    426 => http::answer(
                        426,
                        "text/plain; charset=utf-8",
                        format!("{text}\n").as_bytes(),
                        &[("Sec-WebSocket-Version", "13")],
                    ),
                    503 => http::answer(
                        503,
                        "text/plain; charset=utf-8",
                        format!("{text}\n").as_bytes(),
                        &[("Retry-After", "2")],
                    ),
                    _ => http::text(status, &text),
                };
                return self.answer(key, body);
            }
        };
        if wait {
            // The suspended handshake: the name is being claimed across
            // the cluster; `admitted` resumes it.
            if let Some(conn) = self.conns.get_mut(key) {
                let next = match conn.take_phase() {
                    Phase::Head { wire, buf } => Phase::Claiming {
                        wire,
                        buf,
                        head_len: head.len,
                    },
                    other => other,
                };
                conn.enter(next, &mut self.census);
            }
            return;
        }
        self.upgrade(key, head.len, endpoint);
    }

    /// The checks an upgrade must pass before any 101: version, origin,
    /// token, username. On success a chat connection holds its name; true
    /// when it must first wait for the cluster-wide claim of that name.
    fn check_upgrade(
        &mut self,
        key: usize,
        head: &Head,
        endpoint: Endpoint,
    ) -> Result<bool, (Reject, u16, String)> {
        match head.upgrade_problem() {
            None => {}
            Some(http::UpgradeProblem::Version) => {
                return Err((
                    Reject::BadRequest,
                    426,
                    "only WebSocket version 13 is supported".into(),
                ))
            }
            Some(http::UpgradeProblem::Bad(why)) => {
                return Err((Reject::BadRequest, 400, why.into()))
            }
        }
        // tungstenite parses the request target as a URI; refuse here what
        // it would refuse there.
        let target = match &head.query {
            Some(q) => format!("{}?{q}", head.path),
            None => head.path.clone(),
        };
        if tungstenite::http::Uri::try_from(target.as_str()).is_err() {
            return Err((Reject::BadRequest, 400, "malformed request target".into()));
        }
        if !self.config.allowed_origins.is_empty() {
            if let Some(origin) = &head.origin {
                if !self.config.allowed_origins.iter().any(|o| o == origin) {
                    return Err((Reject::Origin, 403, "origin not allowed".into()));
                }
            }
        }
        if endpoint == Endpoint::Echo {
            return Ok(false);
        }
        if self.engine.as_ref().is_some_and(|e| !e.healthy()) {
            return Err((
                Reject::ClusterDown,
                503,
                "cluster store (Redis) unreachable, retry later".into(),
            ));
        }
        let query = head.query.as_deref();
        let param = |name: &str| -> Result<Option<String>, (Reject, u16, String)> {
            match http::query_param(query, name) {
                None => Ok(None),
                Some(Ok(v)) => Ok(Some(v)),
                Some(Err(())) => Err((
                    Reject::BadRequest,
                    400,
                    format!("{name} is not valid percent-encoded UTF-8"),
                )),
            }
        };
        let mut username = param("username")?;
        let room = param("room")?;
        let since = match param("since")? {
            None => None,
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                (
                    Reject::BadRequest,
                    400,
                    "since must be a message id (a whole number)".to_string(),
                )
            })?),
        };
        if let Some(tokens) = &self.config.auth {
            let token = param("token")?.unwrap_or_default();
            let Some(user) = lookup_token(tokens, &token) else {
                return Err((Reject::Auth, 401, "missing or invalid token".into()));
            };
            if username.as_deref().is_some_and(|u| u != user) {
                return Err((
                    Reject::Auth,
                    401,
                    "token does not belong to that username".into(),
                ));
            }
            username = Some(user.to_string());
        }
        let req = SessionRequest { username, room };
        let now = self.clock();
        match self.dispatcher.admit(key, &req, now) {
            Ok(_) => {}
            Err(refusal) => {
                let why = match refusal {
                    Refusal::Taken => Reject::Taken,
                    Refusal::Unavailable => Reject::ClusterDown,
                    Refusal::BadUsername | Refusal::BadRoom => Reject::Username,
                };
                return Err((why, refusal.status(), refusal.explain()));
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            conn.since = since;
        }
        Ok(self.dispatcher.is_clustered())
    }

    /// Hand the head to tungstenite and open the session: the 101 is queued
    /// and the dispatcher greets the member.
    fn upgrade(&mut self, key: usize, head_len: usize, endpoint: Endpoint) {
        if self.memory_tight() {
            // As cheap as the 503 for --max-connections: nothing of the
            // session is built. `leave` releases the name `admit` claimed.
            self.counters.reject(Reject::Memory);
            let body = http::answer(
                503,
                "text/plain; charset=utf-8",
                b"server near its memory limit, retry later\n",
                &[("Retry-After", "5")],
            );
            return self.answer(key, body);
        }
        let now = self.now_ms();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let (wire, mut buf) = match conn.take_phase() {
            Phase::Head { wire, buf } => (wire, buf),
            other => return conn.enter(other, &mut self.census),
        };
        conn.endpoint = endpoint;
        let early = buf.split_off(head_len);
        match conn::start_handshake(wire, buf, early, self.ws_config) {
            Ok(ws) => {
                conn.enter(Phase::Open(ws), &mut self.census);
                let (generation, since) = (conn.generation, conn.since);
                self.counters.sessions_opened += 1;
                conn.last_seen_ms = now;
                // Replaces the handshake deadline.
                self.timers.arm(
                    now + self.config.heartbeat_ms,
                    key,
                    generation,
                    Kind::Heartbeat,
                );
                if endpoint == Endpoint::Chat {
                    self.dispatcher.open(key, since, &mut self.out);
                }
                self.mark_dirty(key);
                // Frames may already be waiting (sent right behind the
                // request): read now, the readiness edge has passed.
                self.read_frames(key);
            }
            Err(HandshakeFailed(why)) => {
                // tungstenite took the socket with it, so no answer can be
                // written; loopchat's own checks answer the common cases.
                log::debug!("conn #{key}: handshake failed: {why}");
                self.counters.reject(Reject::HandshakeFailed);
                // The phase is `Taken`: `leave` only finishes the removal
                // (the name claimed by `admit` is released there).
                self.leave(key, Exit::Drop);
            }
        }
    }

    /// Read frames from an open or closing connection until `WouldBlock`
    /// (or the budget), handing each to the dispatcher or the echo.
    fn read_frames(&mut self, key: usize) {
        let clock = self.clock();
        let Server {
            conns,
            dispatcher,
            out,
            counters,
            ..
        } = self;
        let Some(conn) = conns.get_mut(key) else {
            return;
        };
        let endpoint = conn.endpoint;
        let (ws, closing) = match conn.phase_mut() {
            PhaseMut::Open(ws) => (ws, false),
            PhaseMut::Closing(ws) => (ws, true),
            _ => return,
        };
        let limit = self.config.max_outbox_bytes;
        let mut end = None;
        // Any frame shows the peer is alive (recorded after the reads).
        let mut heard = false;
        // The read budget ran out with frames left: read on next pass.
        let mut more = false;
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                more = true;
                break;
            }
            budget -= 1;
            // What tungstenite writes itself (pongs, close replies, echoes)
            // lands in the outbox without passing `deliver`, so the bound
            // is checked here too: a client that pings without reading is
            // a slow consumer like any other.
            if ws.get_ref().outbox.queued() > limit {
                end = Some(End::Overflow);
                break;
            }
            let inbound = conn::next_message(ws);
            if matches!(
                inbound,
                Inbound::Text(_) | Inbound::Binary(_) | Inbound::Control
            ) {
                counters.frames_in += 1;
            }
            match inbound {
                Inbound::Text(text) => {
                    heard = true;
                    if closing {
                        continue;
                    }
                    match endpoint {
                        Endpoint::Chat => dispatcher.handle_text(key, text.as_str(), clock, out),
                        Endpoint::Echo => {
                            let _ = ws.send(Message::Text(text));
                        }
                    }
                }
                Inbound::Binary(data) => {
                    heard = true;
                    if closing {
                        continue;
                    }
                    match endpoint {
                        Endpoint::Chat => dispatcher.handle_binary(key, clock, out),
                        Endpoint::Echo => {
                            let _ = ws.send(Message::Binary(data));
                        }
                    }
                }
                Inbound::Control => heard = true,
                Inbound::WouldBlock => break,
                Inbound::Closed => {
                    end = Some(End::Clean);
                    break;
                }
                Inbound::Fail(code, reason) => {
                    end = Some(End::Fail(code, reason));
                    break;
                }
                Inbound::Gone => {
                    end = Some(End::Gone);
                    break;
                }
            }
        }
        // Replies tungstenite queued while reading (pongs, the close echo)
        // are in the outbox already; make sure they go out this iteration.
        let wire = ws.get_mut();
        counters.bytes_in += std::mem::take(&mut wire.read_bytes);
        let (has_output, queued) = (!wire.outbox.is_empty(), wire.outbox.queued());
        if heard {
            conn.last_seen_ms = clock.mono_ms;
            conn.pinged = false;
        }
        if has_output {
            self.mark_dirty(key);
        }
        if more {
            self.read_later(key, Queue::Sessions);
        }
        if self.memory.is_some() && !closing {
            self.heaviest.update(key, queued);
        }
        match end {
            None => {}
            Some(End::Clean) => self.leave(key, Exit::Finished),
            Some(End::Fail(code, reason)) => {
                log::debug!("conn #{key}: closing with {code}: {reason}");
                self.counters.protocol_closes += 1;
                self.leave(key, Exit::Reject(code, reason));
            }
            Some(End::Gone) => self.leave(key, Exit::Drop),
            Some(End::Overflow) => self.shed_slow_consumer(key),
        }
        self.relieve_outbound();
    }

    /// A lingering connection: read and discard until EOF.
    fn drain_lingering(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let PhaseMut::Linger { wire, .. } = conn.phase_mut() else {
            return;
        };
        let mut sink = [0u8; 1024];
        loop {
            match wire.read_raw(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if let Some(Phase::Linger { shut: true, .. }) = self.conns.get(key).map(Conn::phase) {
            self.leave(key, Exit::Drop);
        }
    }

    // ---- output ---------------------------------------------------------

    /// Whether the flush waits for the next pass (see [`Output`]). A pass
    /// that holds keeps holding through the rest of its `settle` rounds;
    /// the pass after it always flushes.
    fn hold_output(&mut self) -> bool {
        let pass = self.counters.iterations;
        match self.output {
            Output::Held { pass: held } if held == pass => true,
            Output::Held { .. } => {
                self.output = Output::Flowing;
                false
            }
            Output::Flowing => {
                let queued = self.counters.frames_queued - self.queued_at_pass_start;
                let busy = queued >= HOLD_AT_FRAMES
                    && queued >= HOLD_AT_PER_CONNECTION * self.dirty.len() as u64;
                if busy && self.shutdown_deadline.is_none() {
                    self.output = Output::Held { pass };
                    self.counters.held_passes += 1;
                }
                busy
            }
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push((key, conn.generation));
            }
        }
    }

    /// Deliver what the dispatcher produced into the addressed outboxes,
    /// then carry out its close requests (which may produce more).
    fn apply(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        loop {
            // What delivering causes (a slow consumer's leave notices)
            // lands in self.out, behind these.
            for (to, frame) in out.sends.drain(..) {
                self.deliver(to, frame);
            }
            // Closes end sessions, whose leave notices land in self.out.
            let more = std::mem::take(&mut self.out);
            out.sends.extend(more.sends);
            out.closes.extend(more.closes);
            if !out.sends.is_empty() {
                continue;
            }
            match out.closes.pop() {
                Some(req) => {
                    log::debug!(
                        "conn #{}: closing with {}: {}",
                        req.key,
                        req.code,
                        req.reason
                    );
                    self.leave(req.key, Exit::Goodbye(req.code, req.reason));
                }
                None => break,
            }
        }
        out.sends.clear();
        self.out = out;
    }

    /// Queue one frame for one connection, or drop the connection if it is
    /// not keeping up (the slow-consumer policy in `outbox.rs`).
    fn deliver(&mut self, to: usize, frame: Frame) {
        let limit = self.config.max_outbox_bytes;
        let Some(conn) = self.conns.get_mut(to) else {
            return;
        };
        if !conn.is_open() || conn.hung_up {
            return;
        }
        let Some(wire) = conn.wire() else {
            return;
        };
        if !wire.outbox.admits(frame.len(), limit) {
            return self.shed_slow_consumer(to);
        }
        wire.outbox.push(frame);
        let queued = wire.outbox.queued();
        self.counters.frames_queued += 1;
        self.mark_dirty(to);
        if let Some(m) = &self.memory {
            // One load and compare per delivery; the shedding itself runs
            // only when the account is over.
            let over = m.over();
            self.heaviest.update(to, queued);
            if over {
                self.shed_for_memory();
            }
        }
    }

    /// The slow-consumer policy (see `outbox.rs`): free the unsent
    /// output, then say goodbye with 1008 (which the peer sees if it ever
    /// reads again).
    fn shed_slow_consumer(&mut self, key: usize) {
        let Some(wire) = self.conns.get_mut(key).and_then(Conn::wire) else {
            return;
        };
        let freed = wire.outbox.discard_unstarted();
        log::info!("conn #{key}: slow consumer ({freed} bytes unsent), closing with 1008");
        self.counters.slow_consumer_drops += 1;
        self.leave(key, Exit::Goodbye(1008, "slow consumer"));
    }

    /// Write every dirty connection's outbox until it is empty or the
    /// socket is full (`Outbox::write_to` gathers small frames into one
    /// `write`, up to 64 KiB), oldest first, until the pass budget is
    /// spent. Returns
    /// false when it stopped for the budget: the rest is flushed first by
    /// the next pass.
    fn flush_dirty(&mut self) -> bool {
        let mut list = std::mem::take(&mut self.dirty).into_iter();
        let mut done = 0;
        while let Some((key, generation)) = list.next() {
            if done >= MIN_FLUSHES && self.budget.spent() {
                let rest: Vec<_> = std::iter::once((key, generation)).chain(list).collect();
                self.counters.deferred += rest.len() as u64;
                // Marked while flushing (a failed write's leave notices):
                // after the older ones.
                let added = std::mem::replace(&mut self.dirty, rest);
                self.dirty.extend(added);
                return false;
            }
            done += 1;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            // A slot freed and reused since it was marked: the new
            // connection marks itself when it has output.
            if conn.generation != generation {
                continue;
            }
            conn.dirty = false;
            let Some(wire) = conn.wire() else {
                continue;
            };
            let mut sock = Counted {
                inner: &mut wire.sock,
                calls: 0,
            };
            let result = wire.outbox.write_to(&mut sock);
            self.counters.writes += sock.calls;
            if self.memory.is_some() {
                // Under a memory limit no queue keeps spare capacity: the
                // shedding ranks connections by queued bytes, and would
                // not see memory held by empty queues.
                wire.outbox.release_spare();
                let queued = wire.outbox.queued();
                // Only sessions are shed; one saying goodbye holds little.
                match conn.is_open() {
                    true => self.heaviest.update(key, queued),
                    false => self.heaviest.remove(key),
                }
            }
            self.counters.flushes += 1;
            match result {
                Ok((n, Flushed::All)) => {
                    self.counters.bytes_out += n as u64;
                    match conn.phase_mut() {
                        PhaseMut::Linger { wire, shut } if !*shut => {
                            // Last bytes sent: half-close and let the peer
                            // read them; drain_lingering reaps at EOF.
                            let _ = wire.sock.shutdown(std::net::Shutdown::Write);
                            *shut = true;
                            // The peer may have finished (or closed) already,
                            // and that edge has passed: look now.
                            self.drain_lingering(key);
                        }
                        PhaseMut::Flushing(_) => self.leave(key, Exit::Drop),
                        _ => {}
                    }
                }
                Ok((n, Flushed::Partly)) => {
                    self.counters.bytes_out += n as u64;
                    // Leftovers: ask to hear when the socket drains. Kept
                    // afterwards: edge-triggered WRITABLE fires only after
                    // a write hit WouldBlock, so it costs nothing while the
                    // peer keeps up.
                    if !conn.want_write {
                        conn.want_write = true;
                        if let Some(wire) = conn.wire() {
                            let interest = Interest::READABLE | Interest::WRITABLE;
                            if let Err(e) = self.poll.registry().reregister(
                                &mut wire.sock,
                                Token(key),
                                interest,
                            ) {
                                log::debug!("conn #{key}: reregister failed: {e}");
                                self.leave(key, Exit::Drop);
                            }
                        }
                    }
                }
                Err(e) => {
                    log::debug!("conn #{key}: write failed: {e}");
                    self.leave(key, Exit::Drop);
                }
            }
        }
        true
    }

    // ---- the memory limit -----------------------------------------------

    /// Near the memory limit: new sessions are refused.
    fn memory_tight(&self) -> bool {
        self.memory
            .as_ref()
            .is_some_and(|m| m.above(MEMORY_REFUSE_TENTHS))
    }

    /// Once per pass: sample the resident size (at most every
    /// `memory::SAMPLE_MS`), shed if over the limit (memory can grow
    /// without a delivery: half-received messages, joins), and end an
    /// episode once the account is calm again.
    fn check_memory(&mut self) {
        if self.memory.is_none() {
            return;
        }
        let now = self.now_ms();
        let Some(m) = &mut self.memory else {
            return;
        };
        m.sample(now);
        if m.over() {
            return self.shed_for_memory();
        }
        if let Some(shed) = self.shedding {
            if m.settled() && !m.above(MEMORY_CALM_TENTHS) {
                self.shedding = None;
                log::warn!(
                    "memory: back to {} bytes (limit {}) after closing {shed} connection(s)",
                    m.used(),
                    m.limit
                );
            }
        }
    }

    /// Over `--memory-limit`: close the connections holding the most queued
    /// output with 1013 until the account is under the limit again (or
    /// nobody holds any). Their unsent frames are freed at once; a frame
    /// also queued for others is freed when its last holder lets go.
    fn shed_for_memory(&mut self) {
        let now = self.now_ms();
        let Some(m) = &mut self.memory else {
            return;
        };
        if !m.heap_over() {
            // Over only by what malloc keeps resident beside the heap,
            // as of the last sample: look again first (which hands back
            // what shedding freed), and at most every SAMPLE_MS, so that
            // nobody is shed for memory that is already free.
            if !m.sample(now) || !m.over() {
                return;
            }
        }
        if self.shedding.is_none() {
            self.shedding = Some(0);
            self.counters.memory_episodes += 1;
            log::warn!(
                "memory: {} bytes held, over the limit of {}: closing the connections \
                 with the most queued output (1013) until under, refusing upgrades (503)",
                m.used(),
                m.limit
            );
        }
        while self.memory.as_ref().is_some_and(Account::over) {
            let Some(key) = self.heaviest.heaviest() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(key) else {
                self.heaviest.remove(key);
                continue;
            };
            if !conn.is_open() {
                // Already saying goodbye: what it still holds is at most a
                // frame in flight and its close frame, which it must be
                // given the chance to read.
                self.heaviest.remove(key);
                continue;
            }
            let Some(wire) = conn.wire() else {
                self.heaviest.remove(key);
                continue;
            };
            let freed = wire.outbox.discard_unstarted();
            log::debug!("conn #{key}: shed for memory ({freed} bytes unsent), closing with 1013");
            if let Some(m) = &mut self.memory {
                m.freed();
            }
            self.counters.memory_sheds += 1;
            if let Some(shed) = &mut self.shedding {
                *shed += 1;
            }
            self.leave(key, Exit::Goodbye(1013, "memory limit, try again later"));
            self.heaviest.remove(key);
        }
    }

    // ---- the way out ----------------------------------------------------

    /// Answer a connection still reading its request head with a plain
    /// HTTP response, then close it (through [`Server::leave`]).
    fn answer(&mut self, key: usize, bytes: Vec<u8>) {
        self.leave(key, Exit::Answer(bytes));
    }

    /// The one way out of a connection: every end, polite or not, is a
    /// call to this function, and each [`Exit`] is one transition of the
    /// state machine in `conn.rs`.
    ///
    /// 1. The first goodbye stands: a connection already saying goodbye
    ///    (`Closing`, `Flushing`, `Linger`) ignores another one, and only
    ///    [`Exit::Drop`] (or the peer's close reply, [`Exit::Finished`])
    ///    cuts it short. A `Gone` connection ignores everything.
    /// 2. The session ends the moment the connection starts to leave, not
    ///    when its socket finally goes: [`Server::end_session`] takes the
    ///    member out of every room (the others get `leave` now) and
    ///    releases its name.
    /// 3. The new phase is entered: a close frame or an HTTP answer is
    ///    queued and the close deadline armed; or, for `Gone`, the socket
    ///    is deregistered and dropped, its deadline cancelled, and the slot
    ///    listed for [`Server::reap`] after the batch.
    fn leave(&mut self, key: usize, exit: Exit) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let saying_goodbye = matches!(
            conn.phase(),
            Phase::Closing(_) | Phase::Flushing(_) | Phase::Linger { .. }
        );
        match exit {
            _ if conn.is_gone() => return,
            Exit::Goodbye(..) | Exit::Reject(..) | Exit::Answer(_) if saying_goodbye => return,
            _ => {}
        }
        self.end_session(key);
        let deadline = self.close_deadline();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let was = conn.phase().name();
        let next = match (conn.take_phase(), exit) {
            (Phase::Open(mut ws), Exit::Goodbye(code, reason)) => {
                match conn::send_close(&mut ws, code, reason) {
                    true => Phase::Closing(ws),
                    false => Phase::Gone,
                }
            }
            (Phase::Open(mut ws), Exit::Reject(code, reason)) => {
                match conn::send_close(&mut ws, code, reason) {
                    true => Phase::Linger {
                        wire: ws.into_inner(),
                        shut: false,
                    },
                    false => Phase::Gone,
                }
            }
            (Phase::Open(ws) | Phase::Closing(ws), Exit::Finished) => {
                let wire = ws.into_inner();
                match wire.outbox.is_empty() {
                    true => Phase::Gone,
                    false => Phase::Flushing(wire),
                }
            }
            (Phase::Head { mut wire, .. }, Exit::Answer(bytes)) => {
                wire.queue(bytes);
                self.counters.http_answers += 1;
                Phase::Linger { wire, shut: false }
            }
            // Drop, or a goodbye that this phase cannot say (a connection
            // still in `Head` at shutdown): the socket goes now.
            (mut old, _) => {
                if let Some(wire) = old.wire() {
                    let _ = self.poll.registry().deregister(&mut wire.sock);
                }
                Phase::Gone
            }
        };
        let generation = conn.generation;
        conn.enter(next, &mut self.census);
        if conn.is_gone() {
            // Dropping the old phase closed the socket (if the goodbye
            // above could not even be queued, it is dropped here).
            self.timers.cancel(key);
            self.heaviest.remove(key);
            self.gone.push(key);
            log::debug!("conn #{key} removed ({was})");
        } else {
            // Replaces the heartbeat or handshake deadline.
            self.timers.arm(deadline, key, generation, Kind::Close);
            self.mark_dirty(key);
        }
    }

    /// When a goodbye started now must be over: the close grace, or the
    /// configured shutdown grace while shutting down.
    fn close_deadline(&self) -> u64 {
        self.shutdown_deadline
            .unwrap_or_else(|| self.now_ms() + CLOSE_GRACE_MS)
    }

    /// The dispatcher's side of leaving: out of every room (telling each)
    /// and the name released. Called by [`Server::leave`] only; harmless
    /// for a connection that never became a member.
    fn end_session(&mut self, key: usize) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        // A session is open exactly while the phase is `Open`, and `leave`
        // moves every connection out of `Open` the first time it runs.
        if conn.is_open() {
            self.counters.sessions_closed += 1;
        }
        // The room tables hold only the slot's current occupant (the slot
        // is not freed before `reap`), and `disconnect` ignores a key that
        // holds no name.
        if self.shutdown_deadline.is_none() {
            self.dispatcher.disconnect(key, &mut self.out);
        } else {
            // Everyone is leaving: no leave notices, just release.
            self.dispatcher.disconnect(key, &mut Effects::default());
        }
    }

    /// Free the slots of connections that went during this batch. Their
    /// sockets are already closed; a freed slot may be reused by the next
    /// accept, hence generations on everything that names a connection
    /// later.
    fn reap(&mut self) {
        if self.gone.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.gone) {
            if self.conns.get(key).is_some_and(Conn::is_gone) {
                self.conns.remove(key).freed(&mut self.census);
                self.counters.removed += 1;
            }
        }
        // Descriptors were freed: if accepts were paused for lack of them,
        // try again now rather than at the retry deadline.
        if self.accept_retry_at.is_some() {
            self.accept_retry_at = Some(0);
        }
    }

    // ---- timers ---------------------------------------------------------

    fn fire_timers(&mut self) {
        let now = self.now_ms();
        let mut fired = 0;
        loop {
            // Due deadlines left by a spent budget stay due: the next poll
            // has a zero timeout.
            if fired >= MIN_TIMERS && self.reads_spent() {
                break;
            }
            fired += 1;
            let Server { timers, conns, .. } = self;
            let Some(timer) = timers.pop_due(now, |k| conns.get(k).map(|c| c.generation)) else {
                break;
            };
            let key = timer.key;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            // Each phase arms the one deadline it waits for, replacing the
            // previous one, so the kind and the phase agree; the checks
            // keep it so if a future change forgets to re-arm.
            match timer.kind {
                Kind::Handshake => {
                    if matches!(conn.phase(), Phase::Head { .. } | Phase::Claiming { .. }) {
                        log::debug!("conn #{key}: handshake timeout");
                        self.counters.reject(Reject::HandshakeTimeout);
                        self.leave(key, Exit::Drop);
                    }
                }
                Kind::Heartbeat => self.heartbeat(key, now),
                Kind::Close => {
                    if matches!(
                        conn.phase(),
                        Phase::Closing(_) | Phase::Flushing(_) | Phase::Linger { .. }
                    ) {
                        self.leave(key, Exit::Drop);
                    }
                }
            }
        }
    }

    /// A heartbeat deadline: re-armed lazily from the last activity, so a
    /// busy connection costs one heap entry per interval, not one per
    /// message.
    fn heartbeat(&mut self, key: usize, now: u64) {
        let interval = self.config.heartbeat_ms;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.is_open() {
            return;
        }
        let generation = conn.generation;
        let quiet_since = conn.last_seen_ms;
        if let Some(wire) = conn.wire() {
            wire.outbox.release_spare();
        }
        if now < quiet_since + interval {
            self.timers
                .arm(quiet_since + interval, key, generation, Kind::Heartbeat);
        } else if !conn.pinged {
            conn.pinged = true;
            if let Some(wire) = conn.wire() {
                wire.outbox.push(protocol::ping_frame());
            }
            self.mark_dirty(key);
            self.timers
                .arm(now + interval, key, generation, Kind::Heartbeat);
        } else {
            log::debug!("conn #{key}: no pong within {interval} ms, dropping");
            self.counters.heartbeat_timeouts += 1;
            self.leave(key, Exit::Drop);
        }
    }

    // ---- shutdown -------------------------------------------------------

    /// Drain pending signals. Returns true when the loop must end at once
    /// (a second signal).
    fn on_signal(&mut self) -> bool {
        let Some(signals) = &mut self.signals else {
            return false;
        };
        let count = signals.pending().count();
        if count == 0 {
            return false;
        }
        if self.shutdown_deadline.is_some() || count > 1 {
            return true;
        }
        self.stop.store(true, Ordering::SeqCst);
        false
    }

    /// Stop accepting, send every client close 1001 and wait (bounded by
    /// `--shutdown-grace-ms`, which `close_deadline` gives every goodbye
    /// from now on) for their replies. Goodbyes already under way go on.
    fn begin_shutdown(&mut self) {
        log::info!(
            "shutting down: closing {} connection(s), waiting up to {} ms",
            self.conns.len(),
            self.config.shutdown_grace_ms
        );
        self.shutdown_deadline = Some(self.now_ms() + self.config.shutdown_grace_ms);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            match self.conns.get(key).map(Conn::phase) {
                Some(Phase::Open(_)) => {
                    self.leave(key, Exit::Goodbye(1001, "server shutting down"))
                }
                Some(Phase::Head { .. } | Phase::Claiming { .. }) => self.leave(key, Exit::Drop),
                _ => {}
            }
        }
        self.settle();
    }

    fn finish(mut self) -> Result<(), ServerError> {
        self.settle();

        log::info!(
            "stopped after {} s (sessions: {}, messages: {})",
            self.started.elapsed().as_secs(),
            self.counters.sessions_opened,
            self.dispatcher.counters.messages
        );
        Ok(())
    }

    // ---- counters -------------------------------------------------------

    /// Gather `/stats`.
    pub fn snapshot(&mut self) -> Snapshot {
        let now = self.now_ms();
        if let Some(m) = &mut self.memory {
            // The figure /stats shows is the one the checks use, as fresh
            // as the sampling allows.
            m.sample(now);
        }
        // "handshake" is always 0 (the handshake completes in the call that
        // starts it, see conn.rs) and stays for dashboards that chart it.
        let by_state: Vec<(&'static str, u64)> = std::iter::once(("handshake", 0))
            .chain(self.census.by_phase())
            .collect();
        let open = self.census.count("open");
        let (rss_bytes, cpu_ms) = crate::stats::process_usage();
        let d = &self.dispatcher.counters;
        Snapshot {
            uptime_s: self.started.elapsed().as_secs(),
            by_state,
            connections: open,
            rooms: self.dispatcher.tables().room_count() as u64,
            members: self.dispatcher.tables().member_count() as u64,
            loops: self.counters.clone(),
            messages: d.messages,
            deliveries: d.deliveries,
            directs: d.directs,
            rate_limited: d.rate_limited,
            floods: d.floods,
            errors_sent: d.errors,
            unkept: d.unkept,
            outbox_bytes: outbox::queued_on_this_thread(),
            timers: self.timers.len() as u64,
            store: self.dispatcher.history_ref().counters(),
            max_connections: self.max_connections as u64,
            rss_bytes,
            cpu_ms,
            memory_limit_bytes: self.memory.as_ref().map_or(0, |m| m.limit) as u64,
            memory_used_bytes: self.memory.as_ref().map_or(memory::held(), Account::used) as u64,
            cluster: self.cluster_fields(),
        }
    }

    /// `/stats` fields of cluster mode (none on a single node).
    fn cluster_fields(&self) -> Vec<(&'static str, u64)> {
        let Some(engine) = &self.engine else {
            return Vec::new();
        };
        let c = &engine.counters;
        vec![
            ("redis_connected", u64::from(engine.healthy())),
            ("nodes", engine.nodes()),
            ("cluster_waiting", self.dispatcher.waiting() as u64),
            ("redis_in_flight", engine.in_flight() as u64),
            ("redis_commands", c.commands),
            ("redis_publications", c.publications),
            ("redis_fills", c.fills),
            ("redis_filled_messages", c.filled),
            ("redis_link_failures", c.link_failures),
        ]
    }
}

/// The HTTP answer to a refused upgrade.
fn refusal_answer(refusal: &Refusal) -> Vec<u8> {
    let text = format!("{}\n", refusal.explain());
    match refusal {
        Refusal::Unavailable => http::answer(
            503,
            "text/plain; charset=utf-8",
            text.as_bytes(),
            &[("Retry-After", "2")],
        ),
        _ => http::text(refusal.status(), &refusal.explain()),
    }
}

/// A socket that counts the `write`/`writev` calls made on it (`/stats`
/// `writes`: how many frames share one system call).
struct Counted<'a, W> {
    inner: &'a mut W,
    calls: u64,
}

impl<W: io::Write> io::Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        self.inner.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.calls += 1;
        self.inner.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The loop thread's CPU time in microseconds (`CLOCK_THREAD_CPUTIME_ID`):
/// what an iteration cost us, without the time the scheduler gave others.
fn thread_cpu_us() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

fn generated_node_id() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    format!("n{}-{:x}", std::process::id(), t & 0xff_ffff)
}

/// Find the username for `token`, comparing against every token in
/// constant time per byte, so that response timing reveals nothing about
/// how much of a guess was right.
fn lookup_token<'a>(
    tokens: &'a std::collections::HashMap<String, String>,
    token: &str,
) -> Option<&'a str> {
    let mut found = None;
    for (candidate, user) in tokens {
        if constant_time_eq(candidate.as_bytes(), token.as_bytes()) {
            found = Some(user.as_str());
        }
    }
    found
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Connections the kernel may queue before `accept`. mio listens with
/// std's 128, which a burst of 200 simultaneous connects overflows (the
/// extra SYNs are dropped and retried a second later). The kernel caps it
/// at `net.core.somaxconn`.
const LISTEN_BACKLOG: libc::c_int = 4096;

/// Calling `listen` again on a listening socket only changes its backlog
/// (Linux and the BSDs), so mio's bind can be kept.
fn widen_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    // SAFETY: listen(2) on a descriptor we own; failure leaves the old
    // backlog in place, which is harmless.
    unsafe {
        libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG);
    }
}

/// Ask for a [`KERNEL_SEND_BUFFER`]-sized send buffer. Failure only leaves
/// the kernel's default in place.
fn cap_send_buffer(sock: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size = KERNEL_SEND_BUFFER as libc::c_int;
    // SAFETY: setsockopt on a descriptor we own, with a c_int option value
    // and its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Raise the soft open-file limit to the hard limit (each connection is a
/// descriptor) and return the limit in force.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        let mut tokens = std::collections::HashMap::new();
        tokens.insert("s3cret".to_string(), "alice".to_string());
        assert_eq!(lookup_token(&tokens, "s3cret"), Some("alice"));
        assert_eq!(lookup_token(&tokens, "s3cre"), None);
        assert_eq!(lookup_token(&tokens, ""), None);
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b"b"));
    }

    #[test]
    fn a_pass_always_reads_its_minimum_then_stops_at_its_share() {
        // A spent clock (a zero share) still lets MIN_READS through.
        let mut spent_clock = Budget::new(1);
        spent_clock.read_share = Duration::ZERO;
        spent_clock.total = Duration::ZERO;
        for _ in 0..MIN_READS {
            assert!(!spent_clock.reads_spent(0));
            spent_clock.reads += 1;
        }
        assert!(spent_clock.reads_spent(0));
        assert!(spent_clock.spent());
        // A fresh clock: only the deliveries produced stop the reads.
        let mut fresh = Budget::new(1_000_000);
        fresh.reads = MIN_READS;
        assert!(!fresh.reads_spent(DELIVERY_SHARE - 1));
        assert!(fresh.reads_spent(DELIVERY_SHARE));
        assert!(!fresh.spent());
        // A new pass starts from nothing.
        spent_clock.restart(Instant::now() + Duration::from_secs(60));
        assert_eq!(spent_clock.reads, 0);
        assert!(!spent_clock.reads_spent(DELIVERY_SHARE));
    }
}
