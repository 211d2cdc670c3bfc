//! A chat server on the `ws` crate 0.9 (ws-rs: one mio 0.6 thread), speaking
//! the same subset of loopchat's protocol as `benches/compare/node/server.js`:
//! `?username=&room=`, `welcome`, `joined` (empty history), `join`, `message`
//! fan-out with a per-room increasing `id`, `leave`, and `GET /stats` with the
//! number of open sessions. It exists only to be measured beside loopchat.
//!
//! Usage: wsrs-chat [port]   (listens on 127.0.0.1 only)
//!
//! ws-rs queues every `Sender::send` as a command on one bounded channel that
//! the event loop drains; the bound is `max_connections * queue_size`, and a
//! full queue blocks `send` (a std `sync_channel`), which on the loop's own
//! thread is a deadlock: the process sleeps in `futex` for ever. One poll
//! turn handles up to 1,024 events, and each join or message into a room of
//! 1,000 queues 1,000 sends, so the queue must hold millions: 16,000 × 200
//! slots, allocated and touched at start (part of the RSS before any session,
//! not of the RSS per session). With 25 per connection the saturated
//! 1,000-member fan-out deadlocked it.

// The large error types are the library's own (its handler and callback
// signatures return them).
#![allow(clippy::result_large_err)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use ws::{Handshake, Message, Request, Response, Sender};

const MAX_CONNECTIONS: usize = 16_000;
const QUEUE_PER_CONNECTION: usize = 200;

#[derive(Default)]
struct Room {
    id: u64,
    members: HashMap<u32, (Sender, Rc<str>)>,
}

#[derive(Default)]
struct Chat {
    rooms: HashMap<String, Room>,
    guests: u64,
    sessions: u64,
}

impl Room {
    fn send(&self, text: &str) {
        for (out, _) in self.members.values() {
            // A failed send is a connection already going away.
            let _ = out.send(text);
        }
    }
}

struct Session {
    out: Sender,
    chat: Rc<RefCell<Chat>>,
    /// (user, room) once open.
    joined: Option<(Rc<str>, String)>,
}

/// `key`'s value in the query of `resource` ("/ws?username=a&room=r");
/// loadgen names need no percent-decoding.
fn query<'a>(resource: &'a str, key: &str) -> Option<&'a str> {
    let (_, q) = resource.split_once('?')?;
    q.split('&')
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

impl ws::Handler for Session {
    fn on_request(&mut self, req: &Request) -> ws::Result<Response> {
        if req.resource().starts_with("/stats") {
            let body = json!({ "connections": self.chat.borrow().sessions }).to_string();
            let mut res = Response::new(200, "OK", body.into_bytes());
            res.headers_mut()
                .push(("Connection".into(), b"close".to_vec()));
            return Ok(res);
        }
        Response::from_request(req)
    }

    fn on_open(&mut self, shake: Handshake) -> ws::Result<()> {
        let resource = shake.request.resource();
        let mut chat = self.chat.borrow_mut();
        let user: Rc<str> = match query(resource, "username") {
            Some(u) => u.into(),
            None => {
                chat.guests += 1;
                format!("guest-{}", chat.guests).into()
            }
        };
        let name = query(resource, "room").unwrap_or("default").to_string();
        chat.sessions += 1;
        let welcome = json!({ "type": "welcome", "content": format!("welcome, {user}"),
                              "user": &*user, "room": &name });
        let _ = self.out.send(welcome.to_string());
        let room = chat.rooms.entry(name.clone()).or_default();
        room.members
            .insert(self.out.connection_id(), (self.out.clone(), user.clone()));
        let users: Vec<&str> = room.members.values().map(|(_, u)| &**u).collect();
        let joined = json!({ "type": "joined", "content": format!("joined {name}"),
                             "room": &name, "users": users, "history": [] });
        let _ = self.out.send(joined.to_string());
        let join = json!({ "type": "join", "content": format!("{user} joined"),
                           "room": &name, "user": &*user });
        room.send(&join.to_string());
        self.joined = Some((user, name));
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> ws::Result<()> {
        let Some((user, name)) = &self.joined else {
            return Ok(());
        };
        let Message::Text(text) = msg else {
            return Ok(());
        };
        let Ok(m) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Ok(());
        };
        let (Some("message"), Some(content)) = (m["type"].as_str(), m["content"].as_str()) else {
            return Ok(());
        };
        let target = m["room"].as_str().unwrap_or(name);
        let mut chat = self.chat.borrow_mut();
        let Some(room) = chat.rooms.get_mut(target) else {
            return Ok(());
        };
        if !room.members.contains_key(&self.out.connection_id()) {
            return Ok(());
        }
        room.id += 1;
        let event = json!({ "type": "message", "content": content, "room": target,
                            "user": &**user, "id": room.id, "ts": now_ms() });
        room.send(&event.to_string());
        Ok(())
    }

    fn on_close(&mut self, _code: ws::CloseCode, _reason: &str) {
        let Some((user, name)) = self.joined.take() else {
            return;
        };
        let mut chat = self.chat.borrow_mut();
        chat.sessions -= 1;
        let Some(room) = chat.rooms.get_mut(&name) else {
            return;
        };
        room.members.remove(&self.out.connection_id());
        if room.members.is_empty() {
            chat.rooms.remove(&name);
        } else {
            let leave = json!({ "type": "leave", "content": format!("{user} left"),
                                "room": &name, "user": &*user });
            room.send(&leave.to_string());
        }
    }
}

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(8091);
    let chat = Rc::new(RefCell::new(Chat::default()));
    let settings = ws::Settings {
        max_connections: MAX_CONNECTIONS,
        queue_size: QUEUE_PER_CONNECTION,
        // As loopchat, Node `ws` and the tokio peer do: no Nagle delay on
        // small frames.
        tcp_nodelay: true,
        ..ws::Settings::default()
    };
    let server = ws::Builder::new()
        .with_settings(settings)
        .build(|out| Session {
            out,
            chat: chat.clone(),
            joined: None,
        });
    match server.and_then(|s| s.listen(("127.0.0.1", port))) {
        Ok(_) => {}
        Err(e) => {
            eprintln!("wsrs-chat: {e}");
            std::process::exit(1);
        }
    }
}
