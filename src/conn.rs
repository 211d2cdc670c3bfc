//! One socket's state machine, from the first byte of its HTTP request to
//! the last byte of its close.
//!
//! ```text
//!            plain request or refusal: answer queued
//!   Head ─────────────────────────────────────────────────▶ Linger
//!    │                                                        │  ▲
//!    │ upgrade accepted: 101 queued                           │  │ protocol error:
//!    ▼                                                        │  │ close frame queued
//!   Open ─────────────────────────────────────────────────────┼──┘
//!    │ │                                                      │ flushed, write side
//!    │ │ we close: close frame queued                         │ shut, EOF read
//!    │ └──────────────────▶ Closing                           ▼
//!    │                        │ the peer's close arrives     Gone ──▶ slot freed by
//!    │ the peer closes first  ▼                               ▲       reap, after
//!    └─────────────────────▶ Flushing ── flushed ─────────────┤       the batch
//!                                                             │
//!   any phase ── socket dead, deadline passed ────────────────┘
//! ```
//!
//! Every arrow out of `Open` (and into `Gone`) is taken by one function,
//! `Server::leave`: the way out is a transition of this machine, not a set
//! of flags. `Gone` holds no socket; the slab slot stays taken until the
//! event batch is over, so that no event still in the batch can reach a
//! slot that a new connection took over.
//!
//! There is no "handshake in progress" phase. loopchat reads the whole
//! request head itself before tungstenite sees it, and tungstenite's
//! writes land in the outbox, never on the socket, so tungstenite's server
//! handshake cannot be interrupted: it completes in the call that starts
//! it. The one phase that waits for something outside the socket sits
//! between `Head` and `Open`: `Claiming`, in cluster mode, holds an
//! accepted upgrade until Redis has granted its username across the
//! cluster (then `Open`, or back to an HTTP answer: 409 or 503 → `Linger`).
//! Its handshake deadline still runs.
//!
//! A connection knows sockets and frames, nothing about rooms: decoded text
//! goes to the dispatcher through the server. All output, including what
//! tungstenite writes itself (the 101, pongs, close replies), goes through
//! the connection's [`Outbox`], so there is exactly one writer per socket
//! and the loop decides when bytes leave.
//!
//! Read RFC 6455 §4 (handshake), §5.5 (control frames) and §7 (closing)
//! before editing.

use std::io::{self, Read, Write};

use mio::net::TcpStream;
use tungstenite::handshake::server::NoCallback;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Bytes, Message, Utf8Bytes, WebSocket};

use crate::outbox::Outbox;
use crate::protocol::Frame;

/// The stream tungstenite reads from and writes to.
///
/// Reads come first from `replay` (bytes loopchat already read while
/// parsing the request head), then from the socket. Writes never touch the
/// socket: they are queued in the outbox, so tungstenite's own frames
/// cannot interleave with a broadcast that is half written.
#[derive(Debug)]
pub struct Wire {
    pub sock: TcpStream,
    replay: Vec<u8>,
    replay_at: usize,
    /// Bytes that arrived right behind the request head (a client may send
    /// its first frame without waiting for the 101). They belong to the
    /// WebSocket stream, so they are replayed once the handshake is done.
    early: Vec<u8>,
    /// While true, reads see only `replay`: tungstenite must parse exactly
    /// the request head (anything more is `JunkAfterRequest`).
    handshaking: bool,
    pub outbox: Outbox,
    /// Bytes read from the socket since the server last collected them.
    pub read_bytes: u64,
}

impl Wire {
    pub fn new(sock: TcpStream) -> Self {
        Wire {
            sock,
            replay: Vec::new(),
            replay_at: 0,
            early: Vec::new(),
            handshaking: false,
            outbox: Outbox::new(),
            read_bytes: 0,
        }
    }

    /// Queue raw bytes (an HTTP answer, the 101) for the socket.
    pub fn queue(&mut self, bytes: Vec<u8>) {
        self.outbox.push(Frame::from_vec(bytes));
    }

    /// Read from the socket into `buf` (which is `len` bytes full).
    pub fn read_raw(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.read_bytes += n as u64;
        Ok(n)
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.replay_at < self.replay.len() {
            let n = (self.replay.len() - self.replay_at).min(buf.len());
            buf[..n].copy_from_slice(&self.replay[self.replay_at..self.replay_at + n]);
            self.replay_at += n;
            if self.replay_at == self.replay.len() {
                self.replay = Vec::new();
                self.replay_at = 0;
            }
            return Ok(n);
        }
        if self.handshaking {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.read_raw(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbox.push(Frame::copy_from_slice(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The loop flushes the outbox before it sleeps; see server.rs.
        Ok(())
    }
}

/// Where the connection is in its life (the diagram at the top of this
/// file).
pub enum Phase {
    /// Reading the HTTP request head into `buf`.
    Head { wire: Wire, buf: Vec<u8> },
    /// Cluster mode: the head (`buf`, whose first `head_len` bytes are
    /// the request head) passed every check and waits for the name claim.
    /// Nothing is read meanwhile; what the client sends waits in the socket.
    Claiming {
        wire: Wire,
        buf: Vec<u8>,
        head_len: usize,
    },
    /// A WebSocket session: text frames go to the dispatcher.
    Open(Box<WebSocket<Wire>>),
    /// We sent a close frame and wait for the peer's (or the deadline).
    /// Data frames that still arrive are read and ignored.
    Closing(Box<WebSocket<Wire>>),
    /// The close handshake is complete (both close frames were sent or
    /// queued): once the outbox is flushed, the connection is gone.
    Flushing(Wire),
    /// Last bytes are queued (a plain HTTP answer, or a close frame after
    /// a protocol failure); after they are flushed the write side is shut
    /// and input is read and discarded until EOF (or the deadline), so
    /// that unread input does not make the kernel reset the connection
    /// before the peer has read those bytes.
    Linger { wire: Wire, shut: bool },
    /// Closed: the socket is deregistered and dropped. The slot is freed
    /// after the current event batch (`Server::reap`).
    Gone,
    /// Transient, while a phase is being replaced.
    Taken,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        self.slot().map_or("taken", |i| Phase::NAMES[i])
    }

    /// The wire, in every phase that still has a socket.
    pub fn wire(&mut self) -> Option<&mut Wire> {
        match self {
            Phase::Head { wire, .. }
            | Phase::Claiming { wire, .. }
            | Phase::Linger { wire, .. }
            | Phase::Flushing(wire) => Some(wire),
            Phase::Open(ws) | Phase::Closing(ws) => Some(ws.get_mut()),
            Phase::Gone | Phase::Taken => None,
        }
    }

    /// Every phase name, in the order of the diagram (for `/stats`).
    pub const NAMES: [&'static str; 7] = [
        "head", "claiming", "open", "closing", "flushing", "linger", "gone",
    ];

    /// Where the phase is counted in [`Census`], and its name: its place in
    /// [`Phase::NAMES`]. `Taken` has none, since it only exists inside one
    /// transition.
    fn slot(&self) -> Option<usize> {
        match self {
            Phase::Head { .. } => Some(0),
            Phase::Claiming { .. } => Some(1),
            Phase::Open(_) => Some(2),
            Phase::Closing(_) => Some(3),
            Phase::Flushing(_) => Some(4),
            Phase::Linger { .. } => Some(5),
            Phase::Gone => Some(6),
            Phase::Taken => None,
        }
    }
}

/// Mutable access to what a [`Phase`] holds, phase by phase, without the
/// power to replace the phase (a `&mut Phase` would let a caller assign a
/// new one and skip the [`Census`]).
pub enum PhaseMut<'a> {
    Head {
        wire: &'a mut Wire,
        buf: &'a mut Vec<u8>,
    },
    /// Nothing of a waiting upgrade changes until its claim is decided.
    Claiming,
    Open(&'a mut WebSocket<Wire>),
    Closing(&'a mut WebSocket<Wire>),
    Flushing(&'a mut Wire),
    Linger {
        wire: &'a mut Wire,
        shut: &'a mut bool,
    },
    /// `Gone`, or `Taken` inside a transition: nothing left to change.
    Gone,
}

/// How many connections are in each phase, kept as they change phase
/// ([`Conn::enter`]), arrive ([`Conn::new`]) and are freed
/// ([`Conn::freed`]): `/stats` reads it instead of walking the slab, which
/// at 19,000 connections took 2 ms of the loop per request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Census {
    in_phase: [u64; Phase::NAMES.len()],
}

impl Census {
    /// Each phase's name and count, in [`Phase::NAMES`] order.
    pub fn by_phase(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Phase::NAMES.into_iter().zip(self.in_phase.iter().copied())
    }

    /// Connections in the phase called `name` (0 for an unknown name).
    pub fn count(&self, name: &str) -> u64 {
        self.by_phase()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, c)| c)
    }
}

/// What the upgrade leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Echo,
}

/// One connection in the slab.
pub struct Conn {
    /// Distinguishes this connection from earlier occupants of its slab slot.
    pub generation: u64,
    /// Private so that every change of phase goes through [`Conn::enter`],
    /// which keeps the [`Census`].
    phase: Phase,
    /// The phase this connection is counted in (its [`Phase::slot`]); it
    /// differs from `phase` only while the phase is `Taken`.
    counted: usize,
    pub endpoint: Endpoint,
    /// The `since` of the upgrade URL, used once when the session opens.
    pub since: Option<u64>,
    /// Last time anything arrived (any frame, or request bytes).
    pub last_seen_ms: u64,
    /// A heartbeat ping is out and unanswered.
    pub pinged: bool,
    /// Queued in the server's flush list (`Server::dirty`).
    pub dirty: bool,
    /// Queued in the server's list of connections to read next pass
    /// (`Server::again`), so it is there at most once.
    pub read_later: bool,
    /// Registered for WRITABLE too (after a flush left bytes behind).
    pub want_write: bool,
    /// The socket reported a hang-up or an error: our writes can only
    /// fail now, so nothing more is queued for it while its last bytes
    /// wait to be read (a mass disconnect would otherwise queue each
    /// leave notice for every member whose own hang-up is still unread).
    pub hung_up: bool,
    /// The peer closed its sending side (`EPOLLRDHUP`, or more): it is
    /// leaving, so its last bytes queue with the other departures.
    pub departing: bool,
}

impl Conn {
    /// A connection just accepted, in `Head`, counted in `census`.
    pub fn new(sock: TcpStream, generation: u64, now_ms: u64, census: &mut Census) -> Self {
        let phase = Phase::Head {
            wire: Wire::new(sock),
            buf: Vec::new(),
        };
        let counted = phase.slot().unwrap_or(0);
        census.in_phase[counted] += 1;
        Conn {
            generation,
            phase,
            counted,
            endpoint: Endpoint::Chat,
            since: None,
            last_seen_ms: now_ms,
            pinged: false,
            dirty: false,
            read_later: false,
            want_write: false,
            hung_up: false,
            departing: false,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// What the phase holds, to change in place (read into, write to,
    /// set `Linger`'s flag); the phase itself can only be replaced by
    /// [`Conn::enter`].
    pub fn phase_mut(&mut self) -> PhaseMut<'_> {
        match &mut self.phase {
            Phase::Head { wire, buf } => PhaseMut::Head { wire, buf },
            Phase::Claiming { .. } => PhaseMut::Claiming,
            Phase::Open(ws) => PhaseMut::Open(ws),
            Phase::Closing(ws) => PhaseMut::Closing(ws),
            Phase::Flushing(wire) => PhaseMut::Flushing(wire),
            Phase::Linger { wire, shut } => PhaseMut::Linger { wire, shut },
            Phase::Gone | Phase::Taken => PhaseMut::Gone,
        }
    }

    /// Take the phase out to build the next one from its parts, leaving
    /// `Taken` until [`Conn::enter`] (the census still counts the old one).
    pub fn take_phase(&mut self) -> Phase {
        std::mem::replace(&mut self.phase, Phase::Taken)
    }

    /// Enter `next`, moving this connection's count in `census`.
    pub fn enter(&mut self, next: Phase, census: &mut Census) {
        if let Some(slot) = next.slot() {
            census.in_phase[self.counted] -= 1;
            census.in_phase[slot] += 1;
            self.counted = slot;
        }
        self.phase = next;
    }

    /// The slab slot was freed: this connection no longer counts.
    pub fn freed(&self, census: &mut Census) {
        census.in_phase[self.counted] -= 1;
    }

    /// The connection's wire, whatever the phase.
    pub fn wire(&mut self) -> Option<&mut Wire> {
        self.phase.wire()
    }

    /// Unsent output bytes.
    pub fn queued(&mut self) -> usize {
        self.wire().map_or(0, |w| w.outbox.queued())
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// Closed, waiting for the end of the batch to free its slot.
    pub fn is_gone(&self) -> bool {
        matches!(self.phase, Phase::Gone)
    }
}

/// Why tungstenite refused an upgrade that loopchat's own checks let
/// through (loopchat answers the common refusals itself, before this).
#[derive(Debug)]
pub struct HandshakeFailed(pub String);

impl std::fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hand the request head to tungstenite, which checks it and queues the
/// 101 in the outbox. `head` is exactly the request head; `early` the bytes
/// that followed it, replayed once the session is open.
///
/// On failure tungstenite has consumed the `Wire` (the socket with it), so
/// no answer can be written any more: the caller can only drop the
/// connection, which is why loopchat checks upgrades itself first.
pub fn start_handshake(
    mut wire: Wire,
    head: Vec<u8>,
    early: Vec<u8>,
    config: WebSocketConfig,
) -> Result<Box<WebSocket<Wire>>, HandshakeFailed> {
    wire.replay = head;
    wire.replay_at = 0;
    wire.early = early;
    wire.handshaking = true;
    match tungstenite::accept_hdr_with_config(wire, NoCallback, Some(config)) {
        Ok(mut ws) => {
            let wire = ws.get_mut();
            wire.handshaking = false;
            wire.replay = std::mem::take(&mut wire.early);
            wire.replay_at = 0;
            Ok(Box::new(ws))
        }
        // Cannot happen while the head is complete and writes go to the
        // outbox (see the module doc); if the Wire ever changes so that it
        // can, it must become a phase, not a silent hang.
        Err(HandshakeError::Interrupted(_)) => Err(HandshakeFailed(
            "handshake did not complete on a complete request head".into(),
        )),
        Err(HandshakeError::Failure(e)) => Err(HandshakeFailed(e.to_string())),
    }
}

/// One step of reading an open (or closing) WebSocket.
pub enum Inbound {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// A ping, pong or close frame arrived (tungstenite queued any reply).
    Control,
    /// Nothing more to read until the next readiness event.
    WouldBlock,
    /// The close handshake is complete (our reply, if any, is queued).
    Closed,
    /// The peer broke the protocol: close with this code.
    Fail(u16, &'static str),
    /// The socket is dead (reset, EOF without a close frame, I/O error).
    Gone,
}

/// Read the next message. Call until `WouldBlock`: readiness is
/// edge-triggered, so bytes left in the socket after an early stop would
/// produce no further event.
pub fn next_message(ws: &mut WebSocket<Wire>) -> Inbound {
    use tungstenite::error::{Error, ProtocolError};
    match ws.read() {
        Ok(Message::Text(t)) => Inbound::Text(t),
        Ok(Message::Binary(b)) => Inbound::Binary(b),
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_)) => {
            Inbound::Control
        }
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Inbound::WouldBlock,
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => Inbound::Control,
        Err(Error::ConnectionClosed | Error::AlreadyClosed) => Inbound::Closed,
        Err(Error::Capacity(_)) => Inbound::Fail(1009, "message too big"),
        Err(Error::Utf8(_)) => Inbound::Fail(1007, "invalid UTF-8 in text frame"),
        Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => Inbound::Gone,
        Err(Error::Protocol(ProtocolError::InvalidCloseSequence)) => {
            Inbound::Fail(1002, "invalid close frame")
        }
        Err(Error::Protocol(_)) => Inbound::Fail(1002, "protocol error"),
        Err(_) => Inbound::Gone,
    }
}

/// Queue a close frame with `code`. Returns false when the socket is
/// already past closing.
pub fn send_close(ws: &mut WebSocket<Wire>, code: u16, reason: &'static str) -> bool {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    };
    match ws.close(Some(frame)) {
        Ok(()) => true,
        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => true,
        Err(_) => false,
    }
}
