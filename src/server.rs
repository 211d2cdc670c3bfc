//! The loop: one `mio::Poll` that owns the listener and every connection.
//!
//! One iteration, start to finish (redis's `aeProcessEvents` is the model):
//!
//! 1. `poll` sleeps until a socket is ready or the nearest timer is due.
//! 2. Every event is handled: the listener accepts until `WouldBlock`; a
//!    connection reads until `WouldBlock` and hands decoded commands to the
//!    dispatcher, whose outbound frames are queued in the addressed
//!    connections' outboxes ([`Server::apply`]).
//! 3. Due timers fire (handshake deadlines, heartbeats, close deadlines).
//! 4. The history commits (the group-commit point), then every connection
//!    with output is flushed once ([`Server::flush_dirty`]): all frames
//!    queued for it this iteration leave in one `writev`.
//! 5. Connections marked for removal are reaped ([`Server::reap`]): the one
//!    removal path, after the batch, so that no event of this batch can
//!    reach a freed (and maybe reused) slab slot.
//!
//! Failure tiers, each decided in one place: a bad command is the
//! dispatcher's (an `error` event); a protocol or I/O failure closes that
//! connection only ([`Server::close_with`], [`Server::abort`]); a failure of
//! the poll itself ends [`Server::run`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::Message;

use crate::config::Config;
use crate::conn::{self, Conn, Endpoint, Inbound, Phase, Upgrade};
use crate::dispatch::{Clock, Dispatcher, Outbound, Refusal, SessionRequest, Settings};
use crate::http::{self, Head, HeadError};
use crate::outbox::Flushed;
use crate::protocol::{self, Frame, Limits};
use crate::stats::{LoopCounters, Reject, Snapshot};
use crate::store::{memory::MemoryHistory, History};
use crate::timers::{Kind, Timers};

/// Reserved tokens, counted down from the top so that slab keys (counted up
/// from zero) can be used as tokens directly.
const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Most messages read from one connection per event. A client that sends
/// without pause would otherwise keep the loop on its socket forever; past
/// the budget the connection is queued to continue next iteration (the
/// edge-triggered event will not come again by itself).
const READ_BUDGET: usize = 128;

/// Pending deliveries after which a batch delivers early (about 2.5 MiB of
/// `(key, frame)` pairs) instead of waiting for the end of the batch.
const OUTBOUND_SOFT_CAP: usize = 1 << 16;

/// How long a close we started may take before the socket is dropped, and
/// how long an HTTP answer may linger for the peer to read it.
const CLOSE_GRACE_MS: u64 = 2_000;

/// Connections over `--max-connections` that are still answered 503 (and
/// so briefly hold a slot and a descriptor); past that they are dropped.
const REJECT_SLOTS: usize = 64;

/// After `accept` fails for lack of descriptors, wait this long before
/// trying again. Retrying at once would spin: the pending connection stays
/// in the backlog and the listener stays ready.
const ACCEPT_RETRY_MS: u64 = 100;

/// The page served at `/`.
const PAGE: &str = include_str!("page.html");

/// Why the server could not start or could not go on.
#[derive(Debug)]
pub enum ServerError {
    Bind(SocketAddr, io::Error),
    Poll(io::Error),
    Signals(io::Error),
    Store(String),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            ServerError::Poll(e) => write!(f, "poll failed: {e}"),
            ServerError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            ServerError::Store(e) => write!(f, "{e}"),
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

/// How reading an open connection ended.
enum End {
    Clean,
    Fail(u16, &'static str),
    Gone,
    /// Replies the peer does not read (pongs to a ping flood, echoes)
    /// pushed its outbox over the bound.
    Overflow,
}

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
    next_generation: u64,
    dispatcher: Dispatcher,
    out: Outbound,
    timers: Timers,
    /// Connections with output to flush this iteration.
    dirty: Vec<usize>,
    /// Connections to remove after this iteration's batch.
    doomed: Vec<usize>,
    /// Connections whose read budget ran out: (key, generation).
    again: Vec<(usize, u64)>,
    accept_retry_at: Option<u64>,
    shutdown_deadline: Option<u64>,
    started: Instant,
    pub counters: LoopCounters,
}

impl Server {
    /// Bind the listener and set everything up; nothing runs until
    /// [`Server::run`].
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let history: Box<dyn History> = if config.persist {
            crate::store::open(&config).map_err(ServerError::Store)?
        } else {
            Box::new(MemoryHistory::new(config.history_keep))
        };
        Self::with_history(config, history)
    }

    /// Like [`Server::bind`], with a history of the caller's choosing.
    pub fn with_history(config: Config, history: Box<dyn History>) -> Result<Server, ServerError> {
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
            next_generation: 1,
            dispatcher: Dispatcher::new(settings, history),
            out: Outbound::default(),
            timers: Timers::new(),
            dirty: Vec::new(),
            doomed: Vec::new(),
            again: Vec::new(),
            accept_retry_at: None,
            shutdown_deadline: None,
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
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Poll(e));
            }
            let iteration_start = Instant::now();
            self.counters.iterations += 1;
            if self.config.trace_loop {
                self.trace(&events, timeout);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    // The handle set `stop`; acted on after the batch.
                    WAKER => {}
                    SIGNALS => {
                        if self.on_signal() {
                            log::warn!("second signal: exiting without waiting");
                            return self.finish();
                        }
                    }
                    Token(key) => {
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        self.on_ready(key, readable, event.is_writable());
                    }
                }
            }
            self.continue_reads();
            self.fire_timers();
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
            self.counters.slowest_iteration_us = self.counters.slowest_iteration_us.max(spent);
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || self.now_ms() >= deadline {
                    return self.finish();
                }
            }
        }
    }

    /// The poll timeout: zero when work is pending, else the time to the
    /// nearest deadline, else forever (an idle server uses no CPU).
    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadlines = [
            self.timers.next_deadline(),
            self.accept_retry_at,
            self.shutdown_deadline,
        ];
        let next = deadlines.into_iter().flatten().min()?;
        Some(Duration::from_millis(next.saturating_sub(self.now_ms())))
    }

    fn trace(&self, events: &Events, timeout: Option<Duration>) {
        let mut line = format!(
            "iteration {}: woke with {} event(s) (timeout {:?}):",
            self.counters.iterations,
            events.iter().count(),
            timeout
        );
        for e in events.iter() {
            let who = match e.token() {
                LISTENER => "listener".to_string(),
                WAKER => "waker".to_string(),
                SIGNALS => "signals".to_string(),
                Token(k) => match self.conns.get(k) {
                    Some(c) => format!("conn #{k} ({})", c.phase.name()),
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
        self.dispatcher.commit(&mut self.out);
        loop {
            self.apply();
            if self.dirty.is_empty() {
                break;
            }
            self.flush_dirty();
        }
        self.reap();
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
        entry.insert(Conn::new(sock, generation, now));
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
        if conn.doomed {
            return;
        }
        if writable {
            self.mark_dirty(key);
        }
        if readable {
            self.read(key);
        }
    }

    /// Read whatever the connection's phase reads.
    fn read(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.phase {
            Phase::Head { .. } => self.read_head(key),
            Phase::Handshake(_) => self.resume_handshake(key),
            Phase::Open(_) | Phase::Closing(_) => self.read_frames(key),
            Phase::Linger { .. } => self.drain_lingering(key),
            Phase::Taken => {}
        }
    }

    /// Connections whose read budget ran out last iteration.
    fn continue_reads(&mut self) {
        for (key, generation) in std::mem::take(&mut self.again) {
            if self
                .conns
                .get(key)
                .is_some_and(|c| c.generation == generation && !c.doomed)
            {
                self.read(key);
            }
        }
    }

    fn read_head(&mut self, key: usize) {
        let limit = self.config.max_head_bytes;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Head { wire, buf } = &mut conn.phase else {
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
            Err(None) => self.abort(key),
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
            ("/healthz", _) => Err(if self.dispatcher.history_ref().healthy() {
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
        if let Err((why, status, text)) = self.check_upgrade(key, &head, endpoint) {
            self.counters.reject(why);
            let body = if status == 426 {
                http::answer(
                    426,
                    "text/plain; charset=utf-8",
                    format!("{text}\n").as_bytes(),
                    &[("Sec-WebSocket-Version", "13")],
                )
            } else {
                http::text(status, &text)
            };
            return self.answer(key, body);
        }
        self.upgrade(key, head, endpoint);
    }

    /// The checks an upgrade must pass before any 101: version, origin,
    /// token, username. On success a chat connection holds its name.
    fn check_upgrade(
        &mut self,
        key: usize,
        head: &Head,
        endpoint: Endpoint,
    ) -> Result<(), (Reject, u16, String)> {
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
            return Ok(());
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
                    Refusal::BadUsername | Refusal::BadRoom => Reject::Username,
                };
                return Err((why, refusal.status(), refusal.explain()));
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            conn.since = since;
        }
        Ok(())
    }

    /// Hand the head to tungstenite and, if it completes, open the session.
    fn upgrade(&mut self, key: usize, head: Head, endpoint: Endpoint) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Head { wire, mut buf } = std::mem::replace(&mut conn.phase, Phase::Taken) else {
            return;
        };
        conn.endpoint = endpoint;
        let early = buf.split_off(head.len);
        let result = conn::start_handshake(wire, buf, early, self.ws_config);
        self.after_handshake(key, result);
    }

    fn resume_handshake(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Handshake(mid) = std::mem::replace(&mut conn.phase, Phase::Taken) else {
            return;
        };
        let result = conn::resume_handshake(*mid);
        self.after_handshake(key, result);
    }

    fn after_handshake(&mut self, key: usize, result: Upgrade) {
        let now = self.now_ms();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match result {
            Upgrade::Done(ws) => {
                conn.phase = Phase::Open(ws);
                conn.session_open = true;
                let (generation, since, endpoint) = (conn.generation, conn.since, conn.endpoint);
                self.counters.sessions_opened += 1;
                conn.last_seen_ms = now;
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
            Upgrade::Suspended(mid) => conn.phase = Phase::Handshake(mid),
            Upgrade::Failed(why) => {
                // tungstenite keeps the stream on failure, so no answer can
                // be written; loopchat's own checks answer the common cases.
                log::debug!("conn #{key}: handshake failed: {why}");
                self.counters.reject(Reject::HandshakeFailed);
                self.abort(key);
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
            again,
            ..
        } = self;
        let Some(conn) = conns.get_mut(key) else {
            return;
        };
        let (ws, closing) = match &mut conn.phase {
            Phase::Open(ws) => (ws, false),
            Phase::Closing(ws) => (ws, true),
            _ => return,
        };
        let limit = self.config.max_outbox_bytes;
        let mut end = None;
        let mut budget = READ_BUDGET;
        loop {
            if budget == 0 {
                again.push((key, conn.generation));
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
            match conn::next_message(ws) {
                Inbound::Text(text) => {
                    conn.last_seen_ms = clock.mono_ms;
                    conn.pinged = false;
                    if closing {
                        continue;
                    }
                    match conn.endpoint {
                        Endpoint::Chat => dispatcher.handle_text(key, text.as_str(), clock, out),
                        Endpoint::Echo => {
                            let _ = ws.send(Message::Text(text));
                        }
                    }
                }
                Inbound::Binary(data) => {
                    conn.last_seen_ms = clock.mono_ms;
                    conn.pinged = false;
                    if closing {
                        continue;
                    }
                    match conn.endpoint {
                        Endpoint::Chat => dispatcher.handle_binary(key, clock, out),
                        Endpoint::Echo => {
                            let _ = ws.send(Message::Binary(data));
                        }
                    }
                }
                Inbound::Control => {
                    conn.last_seen_ms = clock.mono_ms;
                    conn.pinged = false;
                }
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
        let has_output = !wire.outbox.is_empty();
        if has_output {
            self.mark_dirty(key);
        }
        match end {
            None => {}
            Some(End::Clean) => {
                // The peer closed and our reply is queued: the connection is
                // closing, goes once the reply is flushed, and at the latest
                // at the close deadline if the peer stops reading.
                self.end_session(key);
                let deadline = self.now_ms() + CLOSE_GRACE_MS;
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.phase = match std::mem::replace(&mut conn.phase, Phase::Taken) {
                        Phase::Open(ws) => Phase::Closing(ws),
                        other => other,
                    };
                    conn.close_when_flushed = true;
                    let generation = conn.generation;
                    self.timers.arm(deadline, key, generation, Kind::Close);
                    if !has_output {
                        self.abort(key);
                    }
                }
            }
            Some(End::Fail(code, reason)) => {
                log::debug!("conn #{key}: closing with {code}: {reason}");
                self.counters.protocol_closes += 1;
                self.close_with(key, code, reason, false);
            }
            Some(End::Gone) => self.abort(key),
            Some(End::Overflow) => self.drop_slow_consumer(key),
        }
        self.relieve_outbound();
    }

    /// A lingering connection: read and discard until EOF.
    fn drain_lingering(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Phase::Linger { wire, .. } = &mut conn.phase else {
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
        if let Some(Phase::Linger { shut: true, .. }) = self.conns.get(key).map(|c| &c.phase) {
            self.abort(key);
        }
    }

    // ---- output ---------------------------------------------------------

    fn mark_dirty(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Deliver what the dispatcher produced into the addressed outboxes,
    /// then carry out its close requests (which may produce more).
    fn apply(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        let mut next = 0;
        loop {
            while next < out.sends.len() {
                let (to, frame) = &mut out.sends[next];
                let (to, frame) = (*to, std::mem::take(frame));
                next += 1;
                self.deliver(to, frame);
            }
            // Closes end sessions, whose leave notices land in self.out.
            let more = std::mem::take(&mut self.out);
            out.sends.extend(more.sends);
            out.closes.extend(more.closes);
            if next < out.sends.len() {
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
                    self.close_with(req.key, req.code, req.reason, true);
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
        if conn.doomed || !conn.is_open() {
            return;
        }
        let Some(wire) = conn.wire() else {
            return;
        };
        if !wire.outbox.admits(frame.len(), limit) {
            return self.drop_slow_consumer(to);
        }
        wire.outbox.push(frame);
        self.mark_dirty(to);
    }

    /// The slow-consumer policy (see `outbox.rs`): free the unsent
    /// output, say 1008 if the socket takes it, and close.
    fn drop_slow_consumer(&mut self, key: usize) {
        let Some(wire) = self.conns.get_mut(key).and_then(Conn::wire) else {
            return;
        };
        let freed = wire.outbox.discard_unstarted();
        log::info!("conn #{key}: slow consumer ({freed} bytes unsent), closing with 1008");
        self.counters.slow_consumer_drops += 1;
        self.close_with(key, 1008, "slow consumer", true);
    }

    /// Write every dirty connection's outbox once, until it is empty or the
    /// socket is full.
    fn flush_dirty(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            if conn.doomed {
                continue;
            }
            let close_when_flushed = conn.close_when_flushed;
            let Some(wire) = conn.wire() else {
                continue;
            };
            let result = wire.outbox.write_to(&mut wire.sock);
            match result {
                Ok((n, Flushed::All)) => {
                    self.counters.bytes_out += n as u64;
                    if let Phase::Linger { wire, shut } = &mut conn.phase {
                        if !*shut {
                            // Last bytes sent: half-close and let the peer
                            // read them; drain_lingering reaps at EOF.
                            let _ = wire.sock.shutdown(std::net::Shutdown::Write);
                            *shut = true;
                            // The peer may have finished (or closed) already,
                            // and that edge has passed: look now.
                            self.drain_lingering(key);
                        }
                    } else if close_when_flushed {
                        self.abort(key);
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
                                self.abort(key);
                            }
                        }
                    }
                }
                Err(e) => {
                    log::debug!("conn #{key}: write failed: {e}");
                    self.abort(key);
                }
            }
        }
    }

    // ---- closing --------------------------------------------------------

    /// Replace the connection's phase with a plain HTTP answer.
    fn answer(&mut self, key: usize, bytes: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let wire = match std::mem::replace(&mut conn.phase, Phase::Taken) {
            Phase::Head { wire, .. } => wire,
            other => {
                conn.phase = other;
                return self.abort(key);
            }
        };
        let mut wire = wire;
        wire.queue(bytes);
        conn.phase = Phase::Linger { wire, shut: false };
        self.counters.http_answers += 1;
        let generation = conn.generation;
        self.timers
            .arm(self.now_ms() + CLOSE_GRACE_MS, key, generation, Kind::Close);
        self.mark_dirty(key);
    }

    /// The session is over for the dispatcher: leave every room (telling
    /// them) and release the name. Idempotent.
    fn end_session(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let was_open = std::mem::take(&mut conn.session_open);
        // The room tables hold only the slot's current occupant (this
        // removal path runs before a slot is freed), and `disconnect`
        // ignores a key that holds no name, so no flag is needed here.
        if self.shutdown_deadline.is_none() {
            self.dispatcher.disconnect(key, &mut self.out);
        } else {
            // Everyone is leaving: no leave notices, just release.
            self.dispatcher.disconnect(key, &mut Outbound::default());
        }
        if was_open {
            self.counters.sessions_closed += 1;
        }
    }

    /// Start a WebSocket close with `code`. With `wait_for_reply`, the
    /// socket stays until the peer answers or the grace period ends.
    /// Without (the peer broke the protocol and is not trusted to answer),
    /// the connection lingers: close frame flushed, write side shut, input
    /// discarded until EOF, so that unread input does not turn the close
    /// into a reset that could destroy the close frame in flight.
    fn close_with(&mut self, key: usize, code: u16, reason: &'static str, wait_for_reply: bool) {
        self.end_session(key);
        let grace = self.now_ms() + CLOSE_GRACE_MS;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let ws = match std::mem::replace(&mut conn.phase, Phase::Taken) {
            Phase::Open(ws) => ws,
            // Already closing: the first close stands.
            Phase::Closing(ws) => {
                conn.phase = Phase::Closing(ws);
                return;
            }
            other => {
                conn.phase = other;
                return self.abort(key);
            }
        };
        let mut ws = ws;
        if !conn::send_close(&mut ws, code, reason) {
            conn.phase = Phase::Closing(ws);
            return self.abort(key);
        }
        conn.phase = if wait_for_reply {
            Phase::Closing(ws)
        } else {
            Phase::Linger {
                wire: ws.into_inner(),
                shut: false,
            }
        };
        let generation = conn.generation;
        self.timers.arm(grace, key, generation, Kind::Close);
        self.mark_dirty(key);
    }

    /// Mark a connection for removal after this batch; its session ends
    /// now. The single way every connection ends.
    fn abort(&mut self, key: usize) {
        self.end_session(key);
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.doomed {
                conn.doomed = true;
                self.doomed.push(key);
            }
        }
    }

    /// Remove the marked connections: deregister, free the slot. A freed
    /// slot may be reused by the next accept, hence generations on timers.
    fn reap(&mut self) {
        if self.doomed.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.doomed) {
            if !self.conns.contains(key) {
                continue;
            }
            let mut conn = self.conns.remove(key);
            if let Some(wire) = conn.wire() {
                let _ = self.poll.registry().deregister(&mut wire.sock);
            }
            log::debug!("conn #{key} removed ({})", conn.phase.name());
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
        loop {
            let Server { timers, conns, .. } = self;
            let Some(timer) = timers.pop_due(now, |k| conns.get(k).map(|c| c.generation)) else {
                break;
            };
            let key = timer.key;
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.doomed {
                continue;
            }
            match timer.kind {
                Kind::Handshake => {
                    if matches!(conn.phase, Phase::Head { .. } | Phase::Handshake(_)) {
                        log::debug!("conn #{key}: handshake timeout");
                        self.counters.reject(Reject::HandshakeTimeout);
                        self.abort(key);
                    }
                }
                Kind::Heartbeat => self.heartbeat(key, now),
                Kind::Close => {
                    if matches!(conn.phase, Phase::Closing(_) | Phase::Linger { .. }) {
                        self.abort(key);
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
            self.abort(key);
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
    /// the grace period) for their replies.
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
            match self.conns.get(key).map(|c| c.is_open()) {
                Some(true) => self.close_with(key, 1001, "server shutting down", true),
                Some(false) => self.abort(key),
                None => {}
            }
        }
        self.settle();
    }

    fn finish(mut self) -> Result<(), ServerError> {
        self.settle();

        log::info!(
            "stopped after {} s: {} sessions, {} messages",
            self.started.elapsed().as_secs(),
            self.counters.sessions_opened,
            self.dispatcher.counters.messages
        );
        Ok(())
    }

    // ---- counters -------------------------------------------------------

    /// Gather `/stats`.
    pub fn snapshot(&mut self) -> Snapshot {
        let mut by_state: Vec<(&'static str, u64)> =
            ["head", "handshake", "open", "closing", "linger"]
                .iter()
                .map(|s| (*s, 0))
                .collect();
        let mut outbox_bytes = 0u64;
        for (_, conn) in self.conns.iter_mut() {
            let name = conn.phase.name();
            if let Some(slot) = by_state.iter_mut().find(|(s, _)| *s == name) {
                slot.1 += 1;
            }
            outbox_bytes += conn.queued() as u64;
        }
        let open = by_state
            .iter()
            .find(|(s, _)| *s == "open")
            .map_or(0, |s| s.1);
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
            outbox_bytes,
            store: self.dispatcher.history_ref().counters(),
            max_connections: self.max_connections as u64,
            rss_bytes,
            cpu_ms,
        }
    }
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
}
