//! A chat server on `tokio-tungstenite` (tokio's multi-thread runtime, one
//! task per connection, an unbounded channel per member, rooms behind one
//! mutex: the shape of tokio-tungstenite's own chat example), speaking the
//! same subset of loopchat's protocol as `benches/compare/node/server.js`:
//! `?username=&room=`, `welcome`, `joined` (empty history), `join`, `message`
//! fan-out with a per-room increasing `id`, `leave`, and `GET /stats` with the
//! number of open sessions. It exists only to be measured beside loopchat.
//!
//! Usage: tokio-chat [port]   (listens on 127.0.0.1 only)
//!
//! The runtime has tokio's default worker count: one per CPU the process may
//! run on, so one under `taskset -c 0`; `TOKIO_WORKER_THREADS` overrides it.
//! The count is printed on stderr at start.
//!
//! tungstenite 0.30's default read buffer is 128 KiB per connection, touched
//! on the first read: 146 KiB of RSS per idle session and a 128 KiB `mmap`
//! per connect. Anyone holding thousands of sessions lowers it, so this
//! server uses 4 KiB (loopchat's own default is 1 KiB);
//! `TUNGSTENITE_READ_BUFFER=131072` gives the library default back.

// The large error types are the library's own (its handler and callback
// signatures return them).
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{future, pin_mut, StreamExt, TryStreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Tx = UnboundedSender<Message>;

#[derive(Default)]
struct Room {
    id: u64,
    members: HashMap<u64, (Tx, Arc<str>)>,
}

impl Room {
    fn send(&self, text: String) {
        let text = Utf8Bytes::from(text);
        for (tx, _) in self.members.values() {
            // A failed send is a connection already going away.
            let _ = tx.send(Message::Text(text.clone()));
        }
    }
}

#[derive(Default)]
struct Chat {
    rooms: HashMap<String, Room>,
    guests: u64,
}

struct Shared {
    config: WebSocketConfig,
    chat: Mutex<Chat>,
    sessions: AtomicU64,
    next_id: AtomicU64,
}

impl Shared {
    fn chat(&self) -> MutexGuard<'_, Chat> {
        // No code panics while holding the lock; a poisoned one is still usable.
        self.chat.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `key`'s value in `query` ("username=a&room=r"); loadgen names need no
/// percent-decoding.
fn param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, v)| *k == key && !v.is_empty())
        .map(|(_, v)| v)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn stats(mut stream: TcpStream, shared: &Shared) {
    let body = json!({ "connections": shared.sessions.load(Relaxed) }).to_string();
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn session(stream: TcpStream, shared: Arc<Shared>) {
    // `GET /stats` is plain HTTP on the same port, as in the other servers.
    let mut head = [0u8; 10];
    if let Ok(n) = stream.peek(&mut head).await {
        if &head[..n] == b"GET /stats" {
            return stats(stream, &shared).await;
        }
    }
    let mut query = String::new();
    let callback = |req: &Request, res: Response| {
        query = req.uri().query().unwrap_or("").to_string();
        Ok(res)
    };
    let accept =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(shared.config));
    let Ok(ws) = accept.await else {
        return;
    };
    let me = shared.next_id.fetch_add(1, Relaxed);
    let (tx, rx) = unbounded_channel();
    let (user, name): (Arc<str>, String) = {
        let mut chat = shared.chat();
        let user: Arc<str> = match param(&query, "username") {
            Some(u) => u.into(),
            None => {
                chat.guests += 1;
                format!("guest-{}", chat.guests).into()
            }
        };
        let name = param(&query, "room").unwrap_or("default").to_string();
        shared.sessions.fetch_add(1, Relaxed);
        let welcome = json!({ "type": "welcome", "content": format!("welcome, {user}"),
                              "user": &*user, "room": &name });
        let _ = tx.send(Message::text(welcome.to_string()));
        let room = chat.rooms.entry(name.clone()).or_default();
        room.members.insert(me, (tx.clone(), user.clone()));
        let users: Vec<&str> = room.members.values().map(|(_, u)| &**u).collect();
        let joined = json!({ "type": "joined", "content": format!("joined {name}"),
                             "room": &name, "users": users, "history": [] });
        let _ = tx.send(Message::text(joined.to_string()));
        let join = json!({ "type": "join", "content": format!("{user} joined"),
                           "room": &name, "user": &*user });
        room.send(join.to_string());
        (user, name)
    };
    drop(tx);

    let (outgoing, incoming) = ws.split();
    let from_client = incoming.try_for_each(|msg| {
        if let Message::Text(text) = msg {
            on_text(&shared, me, &user, &name, &text);
        }
        future::ok(())
    });
    let to_client = tokio_stream_of(rx).map(Ok).forward(outgoing);
    pin_mut!(from_client, to_client);
    future::select(from_client, to_client).await;

    shared.sessions.fetch_sub(1, Relaxed);
    let mut chat = shared.chat();
    if let Some(room) = chat.rooms.get_mut(&name) {
        room.members.remove(&me);
        if room.members.is_empty() {
            chat.rooms.remove(&name);
        } else {
            let leave = json!({ "type": "leave", "content": format!("{user} left"),
                                "room": &name, "user": &*user });
            room.send(leave.to_string());
        }
    }
}

fn on_text(shared: &Shared, me: u64, user: &str, name: &str, text: &str) {
    let Ok(m) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let (Some("message"), Some(content)) = (m["type"].as_str(), m["content"].as_str()) else {
        return;
    };
    let target = m["room"].as_str().unwrap_or(name);
    let mut chat = shared.chat();
    let Some(room) = chat.rooms.get_mut(target) else {
        return;
    };
    if !room.members.contains_key(&me) {
        return;
    }
    room.id += 1;
    let event = json!({ "type": "message", "content": content, "room": target,
                        "user": user, "id": room.id, "ts": now_ms() });
    room.send(event.to_string());
}

/// The receiving end of a member's channel as a `Stream`, so `forward` can
/// feed the socket and flush only when the channel is empty.
fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Message>,
) -> impl futures_util::Stream<Item = Message> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(8092);
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tokio-chat: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "tokio-chat: listening on 127.0.0.1:{port}, {} worker thread(s)",
        tokio::runtime::Handle::current().metrics().num_workers()
    );
    let read_buffer = std::env::var("TUNGSTENITE_READ_BUFFER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    eprintln!("tokio-chat: read buffer {read_buffer} bytes");
    let shared = Arc::new(Shared {
        config: WebSocketConfig::default().read_buffer_size(read_buffer),
        chat: Mutex::new(Chat::default()),
        sessions: AtomicU64::new(0),
        next_id: AtomicU64::new(0),
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(session(stream, shared.clone()));
            }
            // Out of descriptors or similar: keep serving the open sessions.
            Err(_) => tokio::task::yield_now().await,
        }
    }
}
