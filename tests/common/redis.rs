//! A real `redis-server` for the cluster tests: its own free port and temp
//! dir, started and awaited by its "Ready to accept connections" line,
//! ended by pid. `.ci/run` installs Debian's redis-server; without it the
//! tests fail and say so (nothing is skipped silently).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use loopchat::cluster::resp::{self, Reply};

static DIRS: AtomicU32 = AtomicU32::new(0);

/// One redis-server process.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    aof: bool,
    /// `--requirepass`, when set before [`Redis::restart`].
    pub password: Option<String>,
    lines: Option<Receiver<String>>,
}

/// The address the test Redis servers listen on: not the nodes' 127.0.0.1, so
/// that a node's own `127.0.0.1:0` listener can never be given the port a
/// stopped Redis is waiting to take (a node started before its Redis once
/// got that port and connected to itself).
pub const HOST: &str = "127.0.0.2";

/// A port nobody listens on right now (on [`HOST`]).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((HOST, 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl Redis {
    /// Start on a free port; `aof`: `--appendonly yes` (for restarts).
    pub fn start(aof: bool, deadline: Instant) -> Redis {
        Self::start_on(free_port(), aof, deadline)
    }

    /// A server that is not running yet on `port` (start it with
    /// [`Redis::restart`]).
    pub fn stopped(port: u16, aof: bool) -> Redis {
        let n = DIRS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("loopchat-redis-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Redis {
            child: None,
            port,
            dir,
            aof,
            password: None,
            lines: None,
        }
    }

    pub fn start_on(port: u16, aof: bool, deadline: Instant) -> Redis {
        let mut r = Self::stopped(port, aof);
        r.restart(deadline);
        r
    }

    pub fn url(&self) -> String {
        format!("redis://{HOST}:{}", self.port)
    }

    /// (Re)start the process on the same port and dir (with AOF, the data
    /// comes back).
    pub fn restart(&mut self, deadline: Instant) {
        assert!(self.child.is_none(), "redis already running");
        let spawned = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", HOST])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--logfile", "", "--daemonize", "no"])
            .args(["--appendonly", if self.aof { "yes" } else { "no" }])
            .args(["--enable-debug-command", "yes"])
            .args(match &self.password {
                Some(pw) => vec!["--requirepass".to_string(), pw.clone()],
                None => Vec::new(),
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start redis-server ({e}): the cluster tests need it; \
                 .ci/run installs it (apt-get update && apt-get install -y redis-server)"
            ),
        };
        let out = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "redis-server did not get ready in time");
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("Ready to accept connections") => break,
                Ok(_) => continue,
                Err(_) => panic!(
                    "redis-server exited before it was ready: {:?}",
                    child.try_wait()
                ),
            }
        }
        self.child = Some(child);
        self.lines = Some(rx);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.lines = None;
    }

    /// One command on a fresh connection; the reply.
    pub fn cmd(&self, args: &[&str]) -> Reply {
        command_on(self.port, args)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One command to the Redis on `port`, on a fresh connection (usable from
/// another thread); the reply.
pub fn command_on(port: u16, args: &[&str]) -> Reply {
    let mut s = TcpStream::connect((HOST, port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    resp::encode(&mut out, args);
    s.write_all(&out).expect("write to redis");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((reply, _)) = resp::decode(&buf).expect("RESP from redis") {
            return reply;
        }
        let n = s.read(&mut chunk).expect("read from redis");
        assert!(n > 0, "redis closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Several commands on one connection (AUTH, SELECT, then the question);
/// every reply, in order.
pub fn pipeline_on(port: u16, commands: &[&[&str]]) -> Vec<Reply> {
    let mut s = TcpStream::connect((HOST, port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    for args in commands {
        resp::encode(&mut out, args);
    }
    s.write_all(&out).expect("write to redis");
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    let mut chunk = [0u8; 4096];
    while replies.len() < commands.len() {
        while let Some((reply, used)) = resp::decode(&buf).expect("RESP from redis") {
            replies.push(reply);
            buf.drain(..used);
        }
        if replies.len() == commands.len() {
            break;
        }
        let n = s.read(&mut chunk).expect("read from redis");
        assert!(n > 0, "redis closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    replies
}
