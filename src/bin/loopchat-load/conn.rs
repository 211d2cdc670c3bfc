//! One client socket's state machine — the mirror image of the server's
//! `Conn`: `Connecting` (non-blocking connect in flight) → `Upgrading` (request
//! sent, waiting for the `101`) → `Open` → `Closing` (our close frame sent,
//! waiting for the server's) → `Ended`. It knows sockets, buffers and frames;
//! what the frames mean is the scenarios' business.
//!
//! Every way a connection stops is reported exactly once, as
//! [`ConnEvent::Ended`]; the driver reaps the slot after the scenario saw it.

use std::fmt;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::ws::{self, Decoder, Incoming, WsError};

/// How long we wait for the server's close frame (or EOF) after sending ours.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// After the close handshake, how long we wait for the server to close the
/// TCP connection first. RFC 6455 §7.1.1 wants the server to close first so
/// TIME_WAIT lands on its side, not on the client's ephemeral ports — which
/// churn would otherwise exhaust.
const FIN_WAIT: Duration = Duration::from_secs(1);

/// Write buffers above this are shrunk back once drained, so a burst (a big
/// history, a fast sender) does not pin memory in each of thousands of idle
/// connections.
const KEEP_BUFFER_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Upgrading,
    Open,
    Closing,
    Ended,
}

#[derive(Debug)]
pub enum ConnError {
    /// socket(), bind() or connect() refused at once (e.g. EMFILE).
    Socket(io::Error),
    /// The asynchronous connect failed (e.g. ECONNREFUSED).
    Connect(io::Error),
    Io(io::Error),
    Handshake(WsError),
    Protocol(WsError),
    /// The server closed the TCP connection without a close frame.
    Eof(&'static str),
    Timeout(&'static str),
}

impl ConnError {
    /// A short class for tallying failures ("http 409", "timeout joined", …).
    pub fn label(&self) -> String {
        fn io_label(prefix: &str, e: &io::Error) -> String {
            match e.raw_os_error() {
                Some(libc::ECONNREFUSED) => format!("{prefix} refused"),
                Some(libc::ECONNRESET) => format!("{prefix} reset"),
                Some(libc::EMFILE) | Some(libc::ENFILE) => format!("{prefix} out of descriptors"),
                Some(libc::EADDRNOTAVAIL) => format!("{prefix} out of ports"),
                Some(libc::EPIPE) => format!("{prefix} broken pipe"),
                _ => format!("{prefix} {}", e.kind()),
            }
        }
        match self {
            ConnError::Socket(e) => io_label("socket", e),
            ConnError::Connect(e) => io_label("connect", e),
            ConnError::Io(e) => io_label("io", e),
            ConnError::Handshake(e) | ConnError::Protocol(e) => e.to_string(),
            ConnError::Eof(when) => format!("eof {when}"),
            ConnError::Timeout(what) => format!("timeout {what}"),
        }
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Socket(e) => write!(f, "socket: {e}"),
            ConnError::Connect(e) => write!(f, "connect: {e}"),
            ConnError::Io(e) => write!(f, "i/o: {e}"),
            ConnError::Handshake(e) => write!(f, "handshake: {e}"),
            ConnError::Protocol(e) => write!(f, "protocol: {e}"),
            ConnError::Eof(when) => write!(f, "server closed the socket {when}"),
            ConnError::Timeout(what) => write!(f, "timed out waiting for {what}"),
        }
    }
}

/// How a connection stopped.
#[derive(Debug)]
pub enum Ended {
    /// We sent a close frame and the server answered with its own or with EOF.
    Clean,
    /// The server sent a close frame first (shutdown 1001, slow consumer 1008, …).
    ServerClosed(Option<u16>),
    /// Dropped by us before it was open (the run was stopping).
    Abandoned,
    Failed(ConnError),
}

impl Ended {
    pub fn label(&self) -> String {
        match self {
            Ended::Clean => "closed".into(),
            Ended::ServerClosed(Some(code)) => format!("server close {code}"),
            Ended::ServerClosed(None) => "server close".into(),
            Ended::Abandoned => "abandoned".into(),
            Ended::Failed(e) => e.label(),
        }
    }
}

#[derive(Debug)]
pub enum ConnEvent {
    /// The `101` arrived; frames may follow in the same read.
    Open,
    Text(String),
    Ended(Ended),
}

pub struct Conn<P> {
    /// The scenario's per-connection state.
    pub peer: P,
    stream: TcpStream,
    phase: Phase,
    key: String,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    decoder: Decoder,
    /// When `socket()` was called; connect times are measured from here.
    pub started: Instant,
    deadline: Option<(Instant, &'static str)>,
    /// The close handshake is complete; only the server's FIN is awaited.
    close_done: bool,
    mask_state: u32,
    pub(crate) dirty: bool,
}

impl<P> Conn<P> {
    /// Wraps a socket whose connect is in flight; the upgrade request waits
    /// in the write buffer until the connect completes.
    pub fn new(
        stream: TcpStream,
        host: &str,
        target: &str,
        peer: P,
        now: Instant,
        timeout: Duration,
        seed: u32,
    ) -> Self {
        let key = ws::new_key();
        let wbuf = ws::upgrade_request(host, target, &key);
        Conn {
            peer,
            stream,
            phase: Phase::Connecting,
            key,
            rbuf: Vec::new(),
            wbuf,
            wpos: 0,
            decoder: Decoder::default(),
            started: now,
            deadline: Some((now + timeout, "connect")),
            close_done: false,
            mask_state: seed | 1,
            dirty: false,
        }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Arms (or with `None` clears) the one timer of this connection; on
    /// expiry the connection fails with "timeout `what`".
    pub fn set_deadline(&mut self, deadline: Option<(Instant, &'static str)>) {
        self.deadline = deadline;
    }

    /// Handles a readiness event of any kind. Events are hints (they may be
    /// spurious or merged), so this checks the socket state rather than
    /// trusting the event's flags.
    pub fn ready(&mut self, scratch: &mut [u8], out: &mut Vec<ConnEvent>) {
        if self.phase == Phase::Connecting {
            match self.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return self.fail(ConnError::Connect(e), out),
            }
            match self.stream.peer_addr() {
                Ok(_) => {
                    self.phase = Phase::Upgrading;
                    if let Some((at, _)) = self.deadline {
                        self.deadline = Some((at, "handshake"));
                    }
                }
                // Still in flight: a later event will tell.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(ConnError::Connect(e), out),
            }
        }
        self.read(scratch, out);
        self.flush(out);
    }

    /// Reads until `WouldBlock`: with edge-triggered readiness, stopping
    /// early would leave bytes that no further event announces.
    fn read(&mut self, scratch: &mut [u8], out: &mut Vec<ConnEvent>) {
        loop {
            if self.phase == Phase::Ended {
                return;
            }
            match self.stream.read(scratch) {
                Ok(0) => return self.eof(out),
                Ok(n) => {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    self.parse(out);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(ConnError::Io(e), out),
            }
        }
    }

    fn parse(&mut self, out: &mut Vec<ConnEvent>) {
        let mut at = 0;
        if self.phase == Phase::Upgrading {
            match ws::parse_answer(&self.rbuf, &self.key) {
                Ok(None) => return,
                Ok(Some(head)) => {
                    at = head;
                    self.phase = Phase::Open;
                    self.deadline = None;
                    out.push(ConnEvent::Open);
                }
                Err(e) => return self.fail(ConnError::Handshake(e), out),
            }
        }
        while matches!(self.phase, Phase::Open | Phase::Closing) {
            match self.decoder.decode(&self.rbuf[at..]) {
                Ok(None) => break,
                Ok(Some((used, message))) => {
                    at += used;
                    match message {
                        None | Some(Incoming::Pong) | Some(Incoming::Binary(_)) => {}
                        Some(Incoming::Text(text)) => out.push(ConnEvent::Text(text)),
                        // Heartbeats: a missed pong gets us dropped (PROTOCOL §5).
                        Some(Incoming::Ping(payload)) => self.queue(ws::OP_PONG, &payload),
                        Some(Incoming::Close(code)) => {
                            if self.phase == Phase::Closing {
                                self.close_done = true;
                                self.deadline = Some((Instant::now() + FIN_WAIT, "server FIN"));
                            } else {
                                // Echo the code as §5.5.1 asks, best effort.
                                self.queue(
                                    ws::OP_CLOSE,
                                    &ws::close_payload(code.unwrap_or(ws::CLOSE_NORMAL), ""),
                                );
                                let _ = self.try_write();
                                self.end(Ended::ServerClosed(code), out);
                            }
                        }
                    }
                }
                Err(e) => return self.fail(ConnError::Protocol(e), out),
            }
        }
        self.rbuf.drain(..at);
    }

    fn eof(&mut self, out: &mut Vec<ConnEvent>) {
        match self.phase {
            Phase::Closing => self.end(Ended::Clean, out),
            Phase::Connecting | Phase::Upgrading => {
                self.fail(ConnError::Eof("during the handshake"), out)
            }
            Phase::Open => self.fail(ConnError::Eof("without a close frame"), out),
            Phase::Ended => {}
        }
    }

    /// Queues one text message; false when the connection is not open.
    pub fn send_text(&mut self, text: &str) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        self.queue(ws::OP_TEXT, text.as_bytes());
        true
    }

    /// Starts the closing handshake; a connection not yet open is dropped.
    pub fn close(&mut self, now: Instant, out: &mut Vec<ConnEvent>) {
        match self.phase {
            Phase::Open => {
                self.queue(ws::OP_CLOSE, &ws::close_payload(ws::CLOSE_NORMAL, ""));
                self.phase = Phase::Closing;
                self.deadline = Some((now + CLOSE_GRACE, "close"));
            }
            Phase::Connecting | Phase::Upgrading => self.end(Ended::Abandoned, out),
            Phase::Closing | Phase::Ended => {}
        }
    }

    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        // xorshift32: masking only has to be unpredictable to intermediaries
        // (RFC 6455 §10.3), and there are none on loopback.
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        ws::encode_frame(&mut self.wbuf, opcode, payload, x.to_ne_bytes());
    }

    /// Writes until the buffer is empty or `WouldBlock`; leftovers go out on
    /// the next WRITABLE edge (the socket is registered for both).
    pub fn flush(&mut self, out: &mut Vec<ConnEvent>) {
        if matches!(self.phase, Phase::Connecting | Phase::Ended) {
            return;
        }
        if let Err(e) = self.try_write() {
            self.fail(ConnError::Io(e), out);
        }
    }

    fn try_write(&mut self) -> io::Result<()> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > KEEP_BUFFER_BYTES {
            self.wbuf.shrink_to(KEEP_BUFFER_BYTES);
        }
        Ok(())
    }

    /// Fails the connection if its timer ran out.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<ConnEvent>) {
        match self.deadline {
            Some((at, _)) if at <= now && self.close_done => self.end(Ended::Clean, out),
            Some((at, what)) if at <= now && self.phase != Phase::Ended => {
                self.fail(ConnError::Timeout(what), out)
            }
            _ => {}
        }
    }

    fn fail(&mut self, e: ConnError, out: &mut Vec<ConnEvent>) {
        self.end(Ended::Failed(e), out)
    }

    fn end(&mut self, how: Ended, out: &mut Vec<ConnEvent>) {
        if self.phase != Phase::Ended {
            self.phase = Phase::Ended;
            self.deadline = None;
            out.push(ConnEvent::Ended(how));
        }
    }
}
