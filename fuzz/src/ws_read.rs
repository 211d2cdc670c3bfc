//! Fuzz target `ws_read`: a connection's read path after a valid upgrade,
//! through the real `loopchat::conn` code (`Wire`, `start_handshake`,
//! `next_message`) and tungstenite, without the server.
//!
//! Input: one byte picks the message limit (125 B, 1 KiB or 64 KiB), one
//! how many of the bytes arrive as "early" bytes (read together with the
//! request head, handed over by the server), one whether the client then
//! shuts its side; the rest is the client's byte stream after the request
//! head. Each input gets a fresh loopback TCP pair: `Wire` needs a real
//! `mio::net::TcpStream`, and the socket path (partial reads, EOF) is part
//! of what is tested.
//!
//! Invariants: no panic; the read loop always ends (each step consumes
//! input); no message over the limit is delivered; what the connection
//! queues in reply (pongs, the close echo) stays within the input's size
//! plus a constant; every failure is a close code of the protocol's §5
//! for the reader (1002, 1007, 1009), or a clean end.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use loopchat::conn::{self, Inbound, Wire};
use loopchat::Config;

use crate::input::Input;

const HEAD: &[u8] = b"GET /ws?username=fuzz HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// The client's bytes must fit the loopback socket buffers, since nobody
/// reads while they are written.
const MAX_STREAM: usize = 32 * 1024;

/// A close frame with the longest reason a control frame allows.
const MAX_CLOSE_FRAME: usize = 2 + 125;

/// One listener for the whole run; a connection per input.
fn listener() -> &'static TcpListener {
    static LISTENER: OnceLock<TcpListener> = OnceLock::new();
    LISTENER.get_or_init(|| match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => panic!("cannot listen on 127.0.0.1: {e}"),
    })
}

/// A connected pair: (the server's side, the client's side).
fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = listener();
    let addr = match l.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("listener address: {e}"),
    };
    let client = match TcpStream::connect(addr) {
        Ok(c) => c,
        Err(e) => panic!("connect to the loopback listener: {e}"),
    };
    let server = match l.accept() {
        Ok((s, _)) => s,
        Err(e) => panic!("accept: {e}"),
    };
    (server, client)
}

/// Close with a reset instead of a FIN, so that hundreds of thousands of
/// inputs do not leave as many sockets in TIME_WAIT (which would run the
/// ephemeral ports out within minutes).
fn reset_on_close(fd: i32) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by the caller; the option value
    // is a properly sized `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Wait until `fd` is readable: bytes written on loopback may not all be
/// readable the instant the write returns.
fn wait_readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    unsafe { libc::poll(&mut p, 1, 2000) > 0 }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let max_message = [125usize, 1024, 64 * 1024][usize::from(input.byte() % 3)];
    let early_len = usize::from(input.byte()) * 8;
    let shut = input.byte() & 1 == 1;
    let stream = input.rest();
    let stream = &stream[..stream.len().min(MAX_STREAM)];
    let (early, sent) = stream.split_at(early_len.min(stream.len()));

    let (server, mut client) = loopback_pair();
    reset_on_close(server.as_raw_fd());
    reset_on_close(client.as_raw_fd());
    if let Err(e) = client.write_all(sent) {
        panic!("write to loopback: {e}");
    }
    if shut {
        let _ = client.shutdown(Shutdown::Write);
    }
    if let Err(e) = server.set_nonblocking(true) {
        panic!("set_nonblocking: {e}");
    }
    let sock = mio::net::TcpStream::from_std(server);
    let fd = sock.as_raw_fd();

    let config = Config {
        max_message_bytes: max_message,
        ..Config::default()
    };
    let mut ws = match conn::start_handshake(
        Wire::new(sock),
        HEAD.to_vec(),
        early.to_vec(),
        config.websocket(),
    ) {
        Ok(ws) => ws,
        Err(why) => panic!("a valid upgrade failed: {why}"),
    };
    let after_101 = ws.get_mut().outbox.queued();

    // Every step that does not block consumes at least a frame header (2
    // bytes), so more steps than this means the loop is stuck.
    let max_steps = stream.len() / 2 + 16;
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps <= max_steps, "read loop does not progress");
        match conn::next_message(&mut ws) {
            Inbound::Text(t) => assert!(t.len() <= max_message, "text over the limit"),
            Inbound::Binary(b) => assert!(b.len() <= max_message, "binary over the limit"),
            Inbound::Control => {}
            Inbound::WouldBlock => {
                let read = ws.get_ref().read_bytes;
                if read >= sent.len() as u64 && !shut {
                    break;
                }
                assert!(wait_readable(fd), "socket never became readable");
            }
            Inbound::Closed | Inbound::Gone => break,
            Inbound::Fail(code, reason) => {
                assert!(
                    matches!(code, 1002 | 1007 | 1009),
                    "close code {code} ({reason}) is not one §5 gives a reader"
                );
                conn::send_close(&mut ws, code, reason);
                break;
            }
        }
    }
    let queued = ws.get_mut().outbox.queued();
    assert!(
        queued <= after_101 + stream.len() + MAX_CLOSE_FRAME,
        "replies grew beyond the input: {queued} bytes queued for {} in",
        stream.len()
    );
}
