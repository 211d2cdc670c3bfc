//! Shared helpers for the integration tests: a real server on
//! `127.0.0.1:0` in this process, WebSocket clients with deadlines, and raw
//! HTTP requests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

    pub fn with(mut config: Config) -> Self {
        config.shutdown_grace_ms = config.shutdown_grace_ms.min(1000);
        // The server is single-threaded by design (not Send): it is built
        // on the thread that runs it and reports where it listens.
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let server = Server::bind(config).expect("server binds");
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
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(t.as_str()).expect("json event")
                }
                Ok(Message::Close(c)) => panic!("closed by server: {c:?}"),
                Ok(_) => continue,
                Err(e) => panic!("read failed (deadline or error): {e}"),
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

/// A masked client text frame (payload under 126 bytes), built by hand for
/// tests that write raw bytes on the socket.
pub fn masked_text(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    assert!(payload.len() < 126);
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}
