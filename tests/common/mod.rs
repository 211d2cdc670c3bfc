//! Shared helpers for the integration tests: a real server on
//! `127.0.0.1:0` in this process, WebSocket clients with deadlines, and raw
//! HTTP requests.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use loopchat::store::memory::MemoryHistory;
use loopchat::store::History;
use loopchat::{Config, Server, ServerHandle};
use serde_json::Value;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// Every wait in a test ends by this deadline.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A server running on its own thread; shut down and joined on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> Self {
        Self::with(Config::for_tests())
    }

    pub fn with(config: Config) -> Self {
        Self::with_history(config, |config| {
            Box::new(MemoryHistory::new(config.history_keep)) as Box<dyn History>
        })
    }

    /// A server whose history `make` builds (on the server's thread: a
    /// history, like the server, is not `Send`).
    pub fn with_history<F>(mut config: Config, make: F) -> Self
    where
        F: FnOnce(&Config) -> Box<dyn History> + Send + 'static,
    {
        config.shutdown_grace_ms = config.shutdown_grace_ms.min(1000);
        // The server is single-threaded by design (not Send): it is built
        // on the thread that runs it and reports where it listens.
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let history = make(&config);
            let server = Server::with_history(config, history).expect("server binds");
            tx.send((server.local_addr(), server.handle()))
                .expect("report");
            server.run().expect("server loop");
        });
        let (addr, handle) = rx.recv_timeout(DEADLINE).expect("server started");
        TestServer {
            addr,
            handle,
            thread: Some(thread),
        }
    }

    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// Connect as `username` (home room `default`).
    pub fn client(&self, username: &str) -> Client {
        Client::connect(&self.url(&format!("username={username}")))
    }

    /// Connect with a raw query string.
    pub fn client_with(&self, query: &str) -> Client {
        Client::connect(&self.url(query))
    }

    /// Send a raw request, read the whole answer until the server closes.
    pub fn http(&self, raw: &[u8]) -> (u16, String) {
        http(self.addr, raw)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.http(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
    }

    /// `/stats` as JSON.
    pub fn stats(&self) -> Value {
        let (status, body) = self.get("/stats");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("stats json")
    }

    /// Poll `/stats` until `pred` holds (bounded by [`DEADLINE`]).
    pub fn wait_stats(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let s = self.stats();
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}: {s}"
            );
            std::thread::yield_now();
        }
    }

    pub fn shutdown(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A raw HTTP exchange: status and body.
pub fn http(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(raw).expect("write request");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    parse_answer(&answer)
}

pub fn parse_answer(answer: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(answer).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// An upgrade request for `path_and_query`.
pub fn upgrade_request(path_and_query: &str, extra: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A blocking WebSocket client whose every read has a deadline.
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    pub fn connect(url: &str) -> Self {
        Self::try_connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    pub fn try_connect(url: &str) -> Result<Self, tungstenite::Error> {
        let authority = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host in url");
        let stream = TcpStream::connect(authority)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        stream.set_write_timeout(Some(DEADLINE))?;
        let (ws, _) = tungstenite::client::client(url, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => {
                tungstenite::Error::Io(std::io::ErrorKind::WouldBlock.into())
            }
        })?;
        Ok(Client { ws })
    }

    pub fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    pub fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t)).expect("send");
    }

    /// The next JSON event (pings are answered by tungstenite).
    pub fn next(&mut self) -> Value {
        self.try_next()
            .unwrap_or_else(|| panic!("connection closed while waiting for an event"))
    }

    /// The next JSON event, or `None` once the connection is gone (closed
    /// or reset). Fails the test at the read deadline.
    pub fn try_next(&mut self) -> Option<Value> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return Some(serde_json::from_str(t.as_str()).expect("json event"))
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("no event within the deadline")
                }
                Err(_) => return None,
            }
        }
    }

    /// Skip events until one of `kind` arrives.
    pub fn expect(&mut self, kind: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.next();
            if v["type"] == kind {
                return v;
            }
            assert!(start.elapsed() < DEADLINE, "no {kind} event");
        }
    }

    /// Skip events until `pred` holds.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let v = self.next();
            if pred(&v) {
                return v;
            }
            assert!(start.elapsed() < DEADLINE, "no event matching {what}");
        }
    }

    /// Read the opening sequence: welcome, joined, own join notice.
    pub fn opening(&mut self) -> (Value, Value) {
        let welcome = self.expect("welcome");
        let joined = self.expect("joined");
        self.expect("join");
        (welcome, joined)
    }

    /// Read until the server closes; returns the close code.
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(frame))) => return Some(frame.code.into()),
                Ok(Message::Close(None)) => return None,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("server did not close within the deadline")
                }
                Err(_) => return None,
            }
        }
    }

    /// Send a message and return the sender's own copy.
    pub fn say(&mut self, content: &str) -> Value {
        self.send(serde_json::json!({"type":"message","content":content}));
        self.wait_for("own message", |v| {
            v["type"] == "message" && v["content"] == content
        })
    }
}

/// The ids of a list of `message` events (`joined.history`,
/// `history.messages`), in order.
pub fn ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .expect("a list of messages")
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect()
}

/// Make the kernel keep at most ~4 KiB for this client's unread input, so a
/// client that does not read fills up quickly (slow-consumer tests).
pub fn shrink_receive_buffer(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt on a valid descriptor with a c_int option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

// ---- raw sockets, for tests that write or read frames by hand ------------

/// A raw TCP connection whose reads and writes give up at [`DEADLINE`].
pub fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    s.set_write_timeout(Some(DEADLINE)).expect("write timeout");
    s
}

/// Read an HTTP response head byte by byte (so that no WebSocket frame
/// behind it is consumed) and return it as text.
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Upgrade by hand: send the request, read the 101. The socket is then a
/// WebSocket on which this test writes whatever frames it likes.
pub fn raw_session(addr: SocketAddr, path_and_query: &str) -> TcpStream {
    let mut s = raw_connect(addr);
    s.write_all(upgrade_request(path_and_query, "").as_bytes())
        .expect("write upgrade");
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head:?}");
    s
}

/// A client frame: first byte `b0` (FIN, RSV bits, opcode), payload masked
/// unless `masked` is false.
pub fn client_frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut f = vec![b0];
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// One server frame: (first byte, payload). Server frames are never
/// masked.
pub fn read_frame(s: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    assert_eq!(h[1] & 0x80, 0, "server frames must not be masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).expect("frame length")];
    s.read_exact(&mut payload)?;
    Ok((h[0], payload))
}

/// Time left until `deadline`; fails the test once it has passed.
pub fn remaining(deadline: Instant) -> Duration {
    let left = deadline.saturating_duration_since(Instant::now());
    assert!(!left.is_zero(), "test deadline passed");
    left
}

// ---- the binary ------------------------------------------------------------

/// A running `loopchat` binary; SIGKILLed and reaped when dropped.
pub struct Bin {
    pub child: Child,
    pub port: u16,
    /// Its stderr, line by line; disconnects when the process has exited.
    lines: Receiver<String>,
}

impl Bin {
    /// Start the binary on an ephemeral port with `args` and wait for its
    /// "listening on" line. With `nofile`, both the soft and the hard
    /// open-file limit are set to it in the child before exec (the server
    /// raises its soft limit to the hard one, so both must be low).
    pub fn start(args: &[&str], nofile: Option<u64>, deadline: Instant) -> Bin {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loopchat"));
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("LOOPCHAT_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n as libc::rlim_t,
                rlim_max: n as libc::rlim_t,
            };
            // SAFETY: runs in the forked child before exec and only calls
            // setrlimit, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn loopchat");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("  [server] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut bin = Bin {
            child,
            port: 0,
            lines,
        };
        let line = bin.wait_line("listening line", deadline, |l| {
            l.contains("listening on ws://127.0.0.1:")
        });
        let rest = line
            .split("listening on ws://127.0.0.1:")
            .nth(1)
            .expect("port");
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        bin.port = digits.parse().expect("port in the listening line");
        bin
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?{query}", self.port)
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child by its pid.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Skip stderr lines until one satisfies `pred`.
    pub fn wait_line(
        &mut self,
        what: &str,
        deadline: Instant,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        loop {
            match self.lines.recv_timeout(remaining(deadline)) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "server exited waiting for {what}: {:?}",
                        self.child.try_wait()
                    )
                }
                Err(RecvTimeoutError::Timeout) => panic!("deadline passed waiting for {what}"),
            }
        }
    }

    /// The next stderr line, if one arrives within `wait`.
    pub fn try_line(&self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// Wait for the process to exit (its stderr closes), collecting the
    /// remaining lines.
    pub fn wait_exit(&mut self, deadline: Instant) -> (ExitStatus, Vec<String>) {
        let mut rest = Vec::new();
        loop {
            match self.lines.recv_timeout(remaining(deadline)) {
                Ok(line) => rest.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("server did not exit by the deadline"),
            }
        }
        (self.child.wait().expect("wait"), rest)
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        // Fields after the command name (which may hold spaces) start at
        // field 3; utime and stime are fields 14 and 15.
        let after = stat.rsplit_once(')').expect("stat format").1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
