//! One TCP connection to Redis, as a state machine on the server's poll.
//!
//! ```text
//!            retry_at reached                connect done, setup sent
//!  Backoff ───────────────────▶ Connecting ─────────────────────────▶ Setup
//!     ▲                             │                                   │ every setup
//!     │ broken: socket error,       │                                   │ reply OK
//!     │ EOF, bad RESP, a reply      │                                   ▼
//!     │ past its deadline           └─────────────────────────────────▶ Ready
//!     └──────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Setup is AUTH (with a password in the URL), SELECT (a DB other than 0,
//! command link only) and, for the subscription link, SUBSCRIBE. The
//! [`Machine`] holds the state and the back-off and knows no socket, so it
//! is unit-tested below; [`Link`] adds the socket, the two bounded buffers
//! and the replies awaited, matched in order (Redis answers a pipelined
//! connection strictly in order).
//!
//! A subscription's messages (every publication of every node) are handed
//! to the caller's sink as slices of the input buffer while it is decoded,
//! before the buffer moves on: nothing is copied or allocated per message
//! between the socket and the engine. Socket reads go straight into that
//! buffer (no intermediate chunk), and its bytes move only when a partial
//! reply must make room at the end.
//!
//! Owns one socket; what the replies mean is `engine.rs`'s.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::resp::{self, Reply, ReplyRef, RespError};
use super::url::RedisUrl;

/// No reply for this long while one is awaited (counted from the later of
/// the oldest awaited command's sending and the last reply) means Redis is
/// not serving us: the link is broken and commands answer `unavailable`
/// until it is back. Far above a healthy Redis's latency
/// (well under a millisecond on a LAN) and below a second, so that a Redis
/// stalled by `DEBUG SLEEP 1` or a long `KEYS` counts as down.
pub const REPLY_DEADLINE_MS: u64 = 750;

/// A TCP connect still pending after this long has failed.
pub const CONNECT_DEADLINE_MS: u64 = 1_000;

/// First back-off, doubled per failed attempt up to [`BACKOFF_CAP_MS`].
pub const BACKOFF_BASE_MS: u64 = 100;

/// The longest back-off: about 5 s, so that a node notices a returning
/// Redis within seconds while many nodes do not hammer one that is down.
pub const BACKOFF_CAP_MS: u64 = 5_000;

/// Most unsent command bytes. Beyond it a command is refused
/// (`unavailable`) rather than buffered without limit while Redis is slow.
pub const MAX_OUT_BYTES: usize = 8 << 20;

/// Most unparsed reply bytes: one largest bulk plus slack.
pub const MAX_IN_BYTES: usize = resp::MAX_BULK + (64 << 10);

/// Free room the input buffer has before each socket read (it grows to
/// make it, up to [`MAX_IN_BYTES`] plus this). A saturated subscription
/// brings tens of kilobytes per wake-up; a read this size takes most of
/// them in one syscall.
const READ_ROOM: usize = 32 << 10;

/// Most replies awaited at once on one link.
pub const MAX_PENDING: usize = 100_000;

/// Where a link is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No socket; the next attempt is at `retry_at` (ms on the loop's
    /// clock). `why` is the last failure, for the log and `/stats`.
    Backoff {
        retry_at: u64,
        why: String,
    },
    /// TCP connect in flight since `since`.
    Connecting {
        since: u64,
    },
    /// Connected; `left` setup replies are still awaited.
    Setup {
        left: usize,
    },
    Ready,
}

/// The state and the back-off, without a socket.
#[derive(Debug)]
pub struct Machine {
    pub state: State,
    attempt: u32,
    rng: u64,
}

impl Machine {
    /// A machine that tries its first connect at once.
    pub fn new(seed: u64) -> Self {
        Machine {
            state: State::Backoff {
                retry_at: 0,
                why: "not connected yet".into(),
            },
            attempt: 0,
            rng: seed | 1,
        }
    }

    /// Time to try a connect.
    pub fn due(&self, now: u64) -> bool {
        matches!(self.state, State::Backoff { retry_at, .. } if now >= retry_at)
    }

    pub fn connecting(&mut self, now: u64) {
        self.state = State::Connecting { since: now };
    }

    /// The TCP connect completed and `setup` commands were written.
    pub fn connected(&mut self, setup: usize) {
        self.state = if setup == 0 {
            self.attempt = 0;
            State::Ready
        } else {
            State::Setup { left: setup }
        };
    }

    /// One setup reply arrived and was good. True when this made the link
    /// ready.
    pub fn setup_done(&mut self) -> bool {
        if let State::Setup { left } = &mut self.state {
            *left -= 1;
            if *left == 0 {
                self.state = State::Ready;
                self.attempt = 0;
                return true;
            }
        }
        false
    }

    /// The link broke: wait a jittered, doubling back-off. Returns the
    /// time of the next attempt.
    pub fn broken(&mut self, now: u64, why: String) -> u64 {
        let full = BACKOFF_BASE_MS
            .saturating_mul(1 << self.attempt.min(16))
            .min(BACKOFF_CAP_MS);
        self.attempt = self.attempt.saturating_add(1);
        // Jitter over the upper half, so that nodes that lost Redis at the
        // same moment do not all come back at the same moment.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let wait = full / 2 + self.rng % (full / 2 + 1);
        let retry_at = now + wait;
        self.state = State::Backoff { retry_at, why };
        retry_at
    }

    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    pub fn name(&self) -> &'static str {
        match self.state {
            State::Backoff { .. } => "backoff",
            State::Connecting { .. } => "connecting",
            State::Setup { .. } => "setup",
            State::Ready => "ready",
        }
    }
}

/// What one link reported to the engine.
#[derive(Debug)]
pub enum LinkEvent<T> {
    /// Setup finished: commands may be sent.
    Up,
    /// The reply to the command sent with `T`.
    Reply(T, Reply),
    /// The link broke; these commands got no reply (they may or may not
    /// have been carried out).
    Down(Vec<T>),
}

/// What a link is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Pipelined commands, replies in order.
    Commands,
    /// A subscription to one channel; messages arrive as pushes.
    Subscriber { channel: String },
}

enum Awaited<T> {
    Setup,
    Caller(T),
    /// A liveness ping on the subscription link.
    Ping,
}

/// A link: the machine plus its socket and buffers.
pub struct Link<T> {
    pub machine: Machine,
    pub token: Token,
    role: Role,
    sock: Option<TcpStream>,
    out: Vec<u8>,
    out_at: usize,
    /// Bytes read: `inbuf[in_at..in_end]` is not decoded yet. Zeroed once
    /// as it grows (never before a read), kept across reads and failures.
    inbuf: Vec<u8>,
    in_at: usize,
    in_end: usize,
    awaited: VecDeque<(Awaited<T>, u64)>,
    /// When a reply last came. The deadline runs from the later of this
    /// and the oldest command's sending: a Redis that is answering a long
    /// pipeline in order (a burst of joins on a busy machine) is slow, not
    /// gone; one that answers nothing for the deadline is gone.
    answered_at: u64,
    /// A publication came in the current read (on the subscription link,
    /// that is Redis serving us too, whatever is queued before the pong).
    heard: bool,
}

impl<T> Link<T> {
    pub fn new(token: Token, role: Role, seed: u64) -> Self {
        Link {
            machine: Machine::new(seed),
            token,
            role,
            sock: None,
            out: Vec::new(),
            out_at: 0,
            inbuf: Vec::new(),
            in_at: 0,
            in_end: 0,
            awaited: VecDeque::new(),
            answered_at: 0,
            heard: false,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.machine.is_ready()
    }

    /// Replies awaited (for `/stats`).
    pub fn in_flight(&self) -> usize {
        self.awaited.len()
    }

    /// The next time [`Link::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        match &self.machine.state {
            State::Backoff { retry_at, .. } => Some(*retry_at),
            State::Connecting { since } => Some(since + CONNECT_DEADLINE_MS),
            State::Setup { .. } | State::Ready => self
                .awaited
                .front()
                .map(|(_, at)| (*at).max(self.answered_at) + REPLY_DEADLINE_MS),
        }
    }

    /// Deadlines: start a due connect, fail a stuck one or a reply past
    /// its deadline. `sink` gets the subscription's messages read meanwhile
    /// (see [`Link::on_ready`]).
    pub fn tick(
        &mut self,
        now: u64,
        registry: &Registry,
        url: &RedisUrl,
        events: &mut Vec<LinkEvent<T>>,
        sink: &mut dyn FnMut(&[u8]),
    ) {
        if self.machine.due(now) {
            if let Err(e) = self.connect(now, registry, url) {
                self.fail(now, registry, format!("connect {}: {e}", url.addr), events);
            }
            return;
        }
        let overdue = |link: &Self| {
            link.awaited
                .front()
                .is_some_and(|(_, at)| now >= (*at).max(link.answered_at) + REPLY_DEADLINE_MS)
        };
        let mut late = match &self.machine.state {
            State::Connecting { since } => now >= since + CONNECT_DEADLINE_MS,
            _ => overdue(self),
        };
        if late && !matches!(self.machine.state, State::Connecting { .. }) {
            // The loop may have been busy past the deadline (a long pass of
            // fan-out) while the answer waited in the socket: read before
            // blaming Redis.
            if let Err(why) = self.read(now, events, sink) {
                return self.fail(now, registry, why, events);
            }
            late = overdue(self);
        }
        if late {
            let why = format!("no answer within {REPLY_DEADLINE_MS} ms");
            self.fail(now, registry, why, events);
        }
    }

    fn connect(&mut self, now: u64, registry: &Registry, url: &RedisUrl) -> io::Result<()> {
        // Resolved at every attempt (an IP literal costs nothing; a name
        // is looked up by the system resolver, on the loop: use an IP or a
        // name in /etc/hosts).
        let Some(addr) = url.addr.to_socket_addrs()?.next() else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no address"));
        };
        let mut sock = TcpStream::connect(addr)?;
        registry.register(
            &mut sock,
            self.token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.sock = Some(sock);
        self.machine.connecting(now);
        Ok(())
    }

    /// Readiness on this link's token. Replies become `events`; on a
    /// subscription link each message's payload (the third element of a
    /// `message` push) goes to `sink` at once, borrowed from the input
    /// buffer: the sink must take what it needs before it returns.
    pub fn on_ready(
        &mut self,
        now: u64,
        registry: &Registry,
        url: &RedisUrl,
        events: &mut Vec<LinkEvent<T>>,
        sink: &mut dyn FnMut(&[u8]),
    ) {
        if let State::Connecting { .. } = self.machine.state {
            let Some(sock) = &self.sock else { return };
            match sock.take_error() {
                Ok(Some(e)) | Err(e) => {
                    return self.fail(now, registry, format!("connect {}: {e}", url.addr), events)
                }
                Ok(None) => {}
            }
            match sock.peer_addr() {
                Ok(_) => self.start_setup(now, url, events),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    return self.fail(now, registry, format!("connect {}: {e}", url.addr), events)
                }
            }
        }
        if let Err(why) = self.read(now, events, sink) {
            return self.fail(now, registry, why, events);
        }
        if let Err(e) = self.flush() {
            self.fail(now, registry, format!("write: {e}"), events);
        }
    }

    fn start_setup(&mut self, now: u64, url: &RedisUrl, events: &mut Vec<LinkEvent<T>>) {
        let mut setup = 0;
        if let Some(password) = &url.password {
            match &url.username {
                Some(user) => self.write(&["AUTH", user, password]),
                None => self.write(&["AUTH", password]),
            }
            setup += 1;
        }
        match &self.role {
            Role::Commands if url.db != 0 => {
                self.write(&["SELECT", &url.db.to_string()]);
                setup += 1;
            }
            Role::Commands => {}
            Role::Subscriber { channel } => {
                let channel = channel.clone();
                self.write(&["SUBSCRIBE", &channel]);
                setup += 1;
            }
        }
        for _ in 0..setup {
            self.awaited.push_back((Awaited::Setup, now));
        }
        self.machine.connected(setup);
        if self.machine.is_ready() {
            events.push(LinkEvent::Up);
        }
    }

    fn write<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        resp::encode(&mut self.out, args);
    }

    /// A command may be queued: the link is ready and its buffers are
    /// not full.
    fn open(&self) -> bool {
        self.is_ready()
            && self.out.len() - self.out_at <= MAX_OUT_BYTES
            && self.awaited.len() < MAX_PENDING
    }

    /// Queue a command whose reply is reported with `tag`. Refused (the
    /// tag comes back) when the link is not ready or its buffers are full.
    pub fn send<A: AsRef<[u8]>>(&mut self, now: u64, tag: T, args: &[A]) -> Result<(), T> {
        if !self.open() {
            return Err(tag);
        }
        self.write(args);
        self.awaited.push_back((Awaited::Caller(tag), now));
        Ok(())
    }

    /// [`Link::send`] for a command that `write` appends to the output
    /// buffer (with [`resp::encode_with`]), from what `tag` holds: a
    /// caller that keeps a command's arguments in its tag sends them
    /// without a copy of its own.
    pub fn send_by(
        &mut self,
        now: u64,
        tag: T,
        write: impl FnOnce(&T, &mut Vec<u8>),
    ) -> Result<(), T> {
        if !self.open() {
            return Err(tag);
        }
        write(&tag, &mut self.out);
        self.awaited.push_back((Awaited::Caller(tag), now));
        Ok(())
    }

    /// A liveness ping on the subscription link (its reply proves the
    /// subscription is still served).
    pub fn ping(&mut self, now: u64) {
        if self.is_ready() && self.awaited.is_empty() {
            self.write(&["PING"]);
            self.awaited.push_back((Awaited::Ping, now));
        }
    }

    /// Write what is queued until done or `WouldBlock`. Call after sends.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(sock) = &mut self.sock else {
            return Ok(());
        };
        if matches!(self.machine.state, State::Connecting { .. }) {
            return Ok(());
        }
        while self.out_at < self.out.len() {
            match sock.write(&self.out[self.out_at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_at = 0;
        Ok(())
    }

    /// Flush, and break the link on a write error.
    pub fn flush_or_fail(&mut self, now: u64, registry: &Registry, events: &mut Vec<LinkEvent<T>>) {
        if let Err(e) = self.flush() {
            self.fail(now, registry, format!("write: {e}"), events);
        }
    }

    /// Read what the socket has, decoding every complete reply; note when
    /// a reply came.
    fn read(
        &mut self,
        now: u64,
        events: &mut Vec<LinkEvent<T>>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), String> {
        let awaited = self.awaited.len();
        self.heard = false;
        let read = self.read_socket(events, sink);
        if self.awaited.len() < awaited || self.heard {
            self.answered_at = now;
        }
        read
    }

    /// Read until a short read or `WouldBlock` (edge-triggered), decoding
    /// every complete reply after each read.
    fn read_socket(
        &mut self,
        events: &mut Vec<LinkEvent<T>>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), String> {
        loop {
            self.make_room();
            let Some(sock) = &mut self.sock else {
                return Ok(());
            };
            let room = self.inbuf.len() - self.in_end;
            match sock.read(&mut self.inbuf[self.in_end..]) {
                Ok(0) => return Err("Redis closed the connection".into()),
                Ok(n) => {
                    self.in_end += n;
                    self.decode(events, sink).map_err(|e| e.to_string())?;
                    // What is left is the start of one reply: bounded.
                    if self.in_end - self.in_at > MAX_IN_BYTES {
                        return Err(format!("reply larger than {MAX_IN_BYTES} bytes"));
                    }
                    // A short read emptied the socket's receive queue: what
                    // arrives later is a new readiness edge, so the read
                    // that would only say WouldBlock is one syscall per
                    // wake-up saved. (A close that raced the data is then
                    // seen at the next edge, or by the reply deadline.)
                    if n < room {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// At least [`READ_ROOM`] free bytes at the end of the input buffer:
    /// the undecoded rest (the start of one reply, usually a few bytes)
    /// moves to the front, and the buffer grows only when that rest is
    /// itself large. Growth zero-fills the new part, once.
    fn make_room(&mut self) {
        if self.in_at == self.in_end {
            self.in_at = 0;
            self.in_end = 0;
        }
        if self.inbuf.len() - self.in_end >= READ_ROOM {
            return;
        }
        if self.in_at > 0 {
            self.inbuf.copy_within(self.in_at..self.in_end, 0);
            self.in_end -= self.in_at;
            self.in_at = 0;
        }
        let want = self.in_end + READ_ROOM;
        if self.inbuf.len() < want {
            // Doubling: a large reply arriving in pieces is not grown (and
            // re-zeroed) a piece at a time. The read bound keeps it under
            // MAX_IN_BYTES + 2 * READ_ROOM.
            let grown = want
                .max(2 * self.inbuf.len())
                .min(MAX_IN_BYTES + 2 * READ_ROOM);
            self.inbuf.resize(grown, 0);
        }
    }

    fn decode(
        &mut self,
        events: &mut Vec<LinkEvent<T>>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RespError> {
        let subscriber = matches!(self.role, Role::Subscriber { .. });
        let mut failure = None;
        while let Some((reply, n)) = resp::decode_ref(&self.inbuf[self.in_at..self.in_end])? {
            self.in_at += n;
            if subscriber {
                if let Some(payload) = message(&reply) {
                    self.heard = true;
                    sink(payload);
                    continue;
                }
            }
            if let Err(why) = self.dispatch(reply.to_reply(), events) {
                failure = Some(why);
                break;
            }
        }
        match failure {
            Some(why) => Err(RespError::BadLength(why)),
            None => Ok(()),
        }
    }

    /// Match one reply with what awaited it.
    fn dispatch(&mut self, reply: Reply, events: &mut Vec<LinkEvent<T>>) -> Result<(), String> {
        let Some((awaited, _)) = self.awaited.pop_front() else {
            return Err("a reply nobody asked for".into());
        };
        match awaited {
            Awaited::Setup => {
                if let Reply::Error(e) = &reply {
                    return Err(format!("setup refused: {e}"));
                }
                if self.machine.setup_done() {
                    events.push(LinkEvent::Up);
                }
            }
            Awaited::Ping => {}
            Awaited::Caller(tag) => events.push(LinkEvent::Reply(tag, reply)),
        }
        Ok(())
    }

    /// Break the link: drop the socket and the buffers, report the
    /// commands that will get no reply, and start the back-off.
    pub fn fail(
        &mut self,
        now: u64,
        registry: &Registry,
        why: String,
        events: &mut Vec<LinkEvent<T>>,
    ) {
        if let Some(mut sock) = self.sock.take() {
            let _ = registry.deregister(&mut sock);
        }
        let was_up = matches!(self.machine.state, State::Ready | State::Setup { .. });
        let retry_at = self.machine.broken(now, why.clone());
        if was_up {
            log::warn!(
                "redis link {:?}: {why}; retrying in {} ms",
                self.role,
                retry_at - now
            );
        } else {
            log::debug!("redis link {:?}: {why}", self.role);
        }
        self.out.clear();
        self.out_at = 0;
        self.in_at = 0;
        self.in_end = 0;
        let lost = self
            .awaited
            .drain(..)
            .filter_map(|(a, _)| match a {
                Awaited::Caller(t) => Some(t),
                _ => None,
            })
            .collect();
        events.push(LinkEvent::Down(lost));
    }
}

/// The payload of a pub/sub `message` push (`["message", channel,
/// payload]`; one whose payload is not a bulk comes out empty, which the
/// engine ignores like any publication it cannot read); `None` for
/// anything else (a subscribe confirmation, a pong), which answers a
/// command.
fn message<'a>(reply: &ReplyRef<'a>) -> Option<&'a [u8]> {
    let ReplyRef::Array(mut items) = *reply else {
        return None;
    };
    if items.next()? != ReplyRef::Bulk(b"message") {
        return None;
    }
    match items.nth(1) {
        Some(ReplyRef::Bulk(payload)) => Some(payload),
        _ => Some(&[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut m = Machine::new(7);
        assert!(m.due(0));
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            m.connecting(now);
            let at = m.broken(now, "refused".into());
            waits.push(at - now);
            assert!(!m.due(at - 1));
            assert!(m.due(at));
            now = at;
        }
        // Each wait lies in the upper half of its doubling step.
        for (i, w) in waits.iter().enumerate() {
            let full = (BACKOFF_BASE_MS << i).min(BACKOFF_CAP_MS);
            assert!(*w >= full / 2 && *w <= full, "attempt {i}: {w} of {full}");
        }
        assert!(waits.iter().all(|w| *w <= BACKOFF_CAP_MS));
    }

    #[test]
    fn ready_after_every_setup_reply_and_backoff_resets() {
        let mut m = Machine::new(1);
        m.connecting(0);
        m.broken(0, "x".into());
        m.broken(0, "x".into());
        m.connecting(500);
        m.connected(2);
        assert_eq!(m.state, State::Setup { left: 2 });
        assert!(!m.setup_done());
        assert!(m.setup_done());
        assert!(m.is_ready());
        // A fresh failure after success starts from the base again.
        let at = m.broken(1000, "eof".into());
        assert!(at - 1000 <= BACKOFF_BASE_MS);
        m.connecting(at);
        m.connected(0);
        assert!(m.is_ready());
    }

    #[test]
    fn jitter_differs_between_seeds() {
        let waits = |seed| {
            let mut m = Machine::new(seed);
            (0..6)
                .map(|_| m.broken(0, String::new()))
                .collect::<Vec<_>>()
        };
        assert_ne!(waits(1), waits(2));
    }

    /// Waits (each wait at most 5 s) until the link's socket holds
    /// something to read, without reading it. Readiness alone is not
    /// enough: an acknowledgement of what the link sent also wakes the
    /// poll (writable).
    fn wait_readable(poll: &mut mio::Poll, link: &Link<u32>) {
        let mut ready = mio::Events::with_capacity(4);
        for _ in 0..20 {
            let mut peek = [0u8; 1];
            if link.sock.as_ref().and_then(|s| s.peek(&mut peek).ok()) == Some(1) {
                return;
            }
            poll.poll(&mut ready, Some(std::time::Duration::from_secs(5)))
                .expect("poll");
            assert!(!ready.is_empty(), "nothing to read within 5 s");
        }
        panic!("nothing to read after 20 wake-ups");
    }

    /// A listener standing in for Redis, and the URL that reaches it.
    fn fake_redis() -> (std::net::TcpListener, RedisUrl) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = RedisUrl {
            addr: listener.local_addr().expect("addr").to_string(),
            username: None,
            password: None,
            db: 0,
        };
        (listener, url)
    }

    #[test]
    fn the_deadline_runs_from_the_last_answer_and_reads_first() {
        use std::io::{Read as _, Write as _};
        let (listener, url) = fake_redis();
        let mut poll = mio::Poll::new().expect("poll");
        let mut link: Link<u32> = Link::new(Token(1), Role::Commands, 1);
        let mut events = Vec::new();
        link.tick(0, poll.registry(), &url, &mut events, &mut |_| {});
        let (mut redis, _) = listener.accept().expect("accept");
        redis
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut ready = mio::Events::with_capacity(4);
        poll.poll(&mut ready, Some(std::time::Duration::from_secs(5)))
            .expect("poll");
        link.on_ready(0, poll.registry(), &url, &mut events, &mut |_| {});
        assert!(link.is_ready(), "{:?}", link.machine.state);
        for tag in 0..3 {
            assert!(link.send(1_000, tag, &["PING"]).is_ok());
        }
        link.flush().expect("flush");
        let mut got = [0u8; 64];
        let mut read = 0;
        while read < 3 * 14 {
            read += redis.read(&mut got[read..]).expect("commands");
        }
        // The first answer comes at 1,500: the others may take until 2,250.
        redis.write_all(b"+PONG\r\n").expect("answer");
        wait_readable(&mut poll, &link);
        link.on_ready(1_500, poll.registry(), &url, &mut events, &mut |_| {});
        assert_eq!(link.in_flight(), 2);
        assert_eq!(link.next_deadline(), Some(1_500 + REPLY_DEADLINE_MS));
        link.tick(2_000, poll.registry(), &url, &mut events, &mut |_| {});
        assert!(link.is_ready());
        // The second answer is in the socket, unread, when the deadline is
        // checked: it is read first, so the link stays up.
        redis.write_all(b"+PONG\r\n").expect("answer");
        wait_readable(&mut poll, &link);
        link.tick(2_300, poll.registry(), &url, &mut events, &mut |_| {});
        assert!(link.is_ready(), "{:?}", link.machine.state);
        assert_eq!(link.in_flight(), 1);
        // Nothing more comes: the deadline from the last answer fails it.
        link.tick(
            2_300 + REPLY_DEADLINE_MS,
            poll.registry(),
            &url,
            &mut events,
            &mut |_| {},
        );
        assert!(!link.is_ready());
        assert!(matches!(events.last(), Some(LinkEvent::Down(lost)) if lost == &vec![2]));
    }

    /// A subscription's messages reach the sink as they were published
    /// however the bytes arrive, a large one too (it grows the input
    /// buffer past its read room); the subscribe confirmation and a pong
    /// answer what awaited them.
    #[test]
    fn messages_go_to_the_sink_whole_whatever_the_reads() {
        use std::io::{Read as _, Write as _};
        let (listener, url) = fake_redis();
        let mut poll = mio::Poll::new().expect("poll");
        let role = Role::Subscriber {
            channel: "ch".into(),
        };
        let mut link: Link<u32> = Link::new(Token(1), role, 1);
        let mut events = Vec::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        link.tick(0, poll.registry(), &url, &mut events, &mut |_| {});
        let (mut redis, _) = listener.accept().expect("accept");
        redis
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut ready = mio::Events::with_capacity(4);
        poll.poll(&mut ready, Some(std::time::Duration::from_secs(5)))
            .expect("poll");
        link.on_ready(0, poll.registry(), &url, &mut events, &mut |_| {});
        let mut subscribe = [0u8; 64];
        let n = redis.read(&mut subscribe).expect("SUBSCRIBE");
        assert!(subscribe[..n].ends_with(b"SUBSCRIBE\r\n$2\r\nch\r\n"));
        let big = vec![b'x'; 3 * READ_ROOM + 17];
        let mut stream = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n".to_vec();
        for payload in [&b"B r 1\nfirst"[..], &big, b""] {
            stream.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n");
            stream.extend_from_slice(format!("${}\r\n", payload.len()).as_bytes());
            stream.extend_from_slice(payload);
            stream.extend_from_slice(b"\r\n");
        }
        let mut at = 0;
        for piece in stream.chunks(7_001) {
            redis.write_all(piece).expect("publish");
            at += piece.len();
            wait_readable(&mut poll, &link);
            let mut sink = |payload: &[u8]| got.push(payload.to_vec());
            link.on_ready(at as u64, poll.registry(), &url, &mut events, &mut sink);
            assert!(
                !matches!(events.last(), Some(LinkEvent::Down(_))),
                "{events:?}"
            );
        }
        assert!(link.is_ready(), "{:?}", link.machine.state);
        assert!(matches!(events[..], [LinkEvent::Up]), "{events:?}");
        assert_eq!(got, [b"B r 1\nfirst".to_vec(), big, Vec::new()]);
        // All of it was decoded, and the buffer grew for the large one only.
        assert_eq!(link.in_at, link.in_end);
        assert!(link.inbuf.len() <= 8 * READ_ROOM, "{}", link.inbuf.len());
        // A pong is no message: it answers the ping.
        link.ping(1_000_000);
        link.flush().expect("flush");
        assert_eq!(link.in_flight(), 1);
        redis
            .write_all(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
            .expect("pong");
        wait_readable(&mut poll, &link);
        link.on_ready(1_000_001, poll.registry(), &url, &mut events, &mut |_| {
            panic!("a pong is not a message")
        });
        assert_eq!(link.in_flight(), 0);
        assert!(link.is_ready());
    }
}
