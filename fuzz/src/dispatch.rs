//! Fuzz target `dispatch`: arbitrary sequences of admit, open, command,
//! binary frame, disconnect and clock steps for up to four connections,
//! against a `Dispatcher` with a `MemoryHistory`.
//!
//! Input: a program, one operation per few bytes (see [`step`]); names,
//! rooms and contents come from small pools so that operations collide
//! (the same room, the same name) instead of missing each other.
//!
//! The calls follow the server's contract: `admit` only for a free slot,
//! `open` once after a successful `admit`, a flood close is followed by the
//! disconnect the server's reaping does. Within that, anything goes.
//!
//! Invariants after every step: the room tables are consistent
//! (`Rooms::check_consistency`: every member's rooms list it, names map
//! back, empty rooms are gone); the tables hold exactly the connections
//! admitted and not disconnected; every event is addressed to an open
//! member and is a well-formed JSON object with a documented error code;
//! `message` ids per room strictly increase and are never reused, and
//! every history list is in id order and holds only ids handed out.

use std::collections::HashMap;

use loopchat::dispatch::{Clock, Dispatcher, Effects, Refusal, SessionRequest, Settings};
use loopchat::protocol::Limits;
use loopchat::rooms::{self, ConnKey};
use loopchat::store::memory::MemoryHistory;
use serde_json::{json, Value};

use crate::command::{well_formed, DOCUMENTED_CODES};
use crate::input::Input;

const SLOTS: usize = 4;
const MAX_STEPS: usize = 400;

const USERNAMES: [Option<&str>; 8] = [
    None,
    Some("ann"),
    Some("bob"),
    Some("guest-1"),
    Some("guest-2"),
    Some("x y"),
    Some(""),
    Some("abcdefghijklmnopqrstuvwxyz0123456"),
];
const ROOMS: [&str; 6] = ["default", "r1", "r2", "r3", "bad room", "é"];
const CONTENTS: [&str; 4] = ["hi", "", "  ", "a message longer than the content limit"];
const NAMES: [&str; 5] = ["ann", "bob", "guest-1", "nobody", "guest-3"];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    Free,
    Admitted,
    Open,
}

struct Harness {
    d: Dispatcher,
    out: Effects,
    slots: [Slot; SLOTS],
    now: Clock,
    /// Highest `message` id seen per room.
    last_id: HashMap<String, u64>,
}

pub fn run(data: &[u8]) {
    let settings = Settings {
        limits: Limits {
            max_message_bytes: 65536,
            max_content_bytes: 16,
            max_rooms_per_user: 3,
            rate_per_s: 5,
            rate_burst: 4,
            history_limit: 5,
        },
        resume_max: 6,
        refuse_unkept: false,
        reply_bytes: 600,
    };
    let mut h = Harness {
        d: Dispatcher::new(settings, Box::new(MemoryHistory::new(8))),
        out: Effects::default(),
        slots: [Slot::Free; SLOTS],
        now: Clock {
            mono_ms: 0,
            unix_ms: 1_700_000_000_000,
        },
        last_id: HashMap::new(),
    };
    let mut input = Input::new(data);
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_STEPS {
        steps += 1;
        step(&mut h, &mut input);
        h.d.commit(&mut h.out);
        h.check();
        // The server reaps a connection closed for flooding after the
        // batch, through the same disconnect as any other end.
        let closes = std::mem::take(&mut h.out.closes);
        h.out.sends.clear();
        for close in closes {
            assert_eq!(close.code, 1008, "unexpected close code {}", close.code);
            h.d.disconnect(close.key, &mut h.out);
            h.slots[close.key] = Slot::Free;
        }
        h.d.commit(&mut h.out);
        h.check();
        h.out.sends.clear();
    }
}

fn pick<T: Copy>(input: &mut Input<'_>, pool: &[T]) -> T {
    pool[usize::from(input.byte()) % pool.len()]
}

fn step(h: &mut Harness, input: &mut Input<'_>) {
    let op = input.byte();
    let key: ConnKey = usize::from(op >> 4) % SLOTS;
    match op % 16 {
        0 | 1 => {
            let username = pick(input, &USERNAMES);
            let room = pick(
                input,
                &[None, Some("default"), Some("r1"), Some("bad room")],
            );
            if h.slots[key] != Slot::Free {
                return;
            }
            let req = SessionRequest {
                username: username.map(str::to_string),
                room: room.map(str::to_string),
            };
            match h.d.admit(key, &req, h.now) {
                Ok(name) => {
                    assert!(rooms::valid_name(&name), "granted invalid name {name:?}");
                    assert!(username.map_or(true, |u| u == &*name));
                    assert!(room.map_or(true, rooms::valid_name));
                    h.slots[key] = Slot::Admitted;
                }
                Err(Refusal::BadRoom) => assert!(room.is_some_and(|r| !rooms::valid_name(r))),
                Err(Refusal::BadUsername) => {
                    assert!(username.is_some_and(|u| !rooms::valid_name(u)))
                }
                Err(Refusal::Taken) => {
                    let taken = username.and_then(|u| h.d.tables().by_name(u));
                    assert!(taken.is_some_and(|k| k != key), "refused a free name");
                }
                // Only a cluster engine refuses for want of Redis.
                Err(Refusal::Unavailable) => panic!("a single node refused for want of Redis"),
            }
        }
        2 => {
            let since = match input.byte() % 3 {
                0 => None,
                n => Some(u64::from(input.byte()) * u64::from(n)),
            };
            if h.slots[key] == Slot::Admitted {
                h.d.open(key, since, &mut h.out);
                h.slots[key] = Slot::Open;
            }
        }
        3 => {
            h.d.disconnect(key, &mut h.out);
            h.slots[key] = Slot::Free;
        }
        4 => h.d.handle_binary(key, h.now, &mut h.out),
        5 => {
            h.now.mono_ms += u64::from(input.byte()) * 10;
            h.now.unix_ms += 1;
        }
        6 => {
            let len = usize::from(input.byte() % 64);
            let raw = String::from_utf8_lossy(input.take(len)).into_owned();
            h.d.handle_text(key, &raw, h.now, &mut h.out);
        }
        _ => {
            let text = command(input).to_string();
            h.d.handle_text(key, &text, h.now, &mut h.out);
        }
    }
}

/// A well-shaped command with fields from the pools, sometimes with a
/// `ref`, sometimes missing a field.
fn command(input: &mut Input<'_>) -> Value {
    let room = pick(input, &ROOMS);
    let mut cmd = match input.byte() % 9 {
        0 | 1 => json!({"type": "message", "content": pick(input, &CONTENTS)}),
        2 => json!({"type": "message", "content": pick(input, &CONTENTS), "room": room}),
        3 => match input.byte() % 3 {
            0 => json!({"type": "join", "room": room}),
            _ => json!({"type": "join", "room": room, "since": input.byte()}),
        },
        4 => json!({"type": "leave", "room": room}),
        5 => {
            json!({"type": "direct", "to": pick(input, &NAMES), "content": pick(input, &CONTENTS)})
        }
        6 => json!({"type": "rooms"}),
        7 => json!({"type": "who", "room": room}),
        _ => {
            let mut c = json!({"type": "history", "room": room});
            match input.byte() % 4 {
                0 => {}
                1 => c["before"] = json!(input.byte()),
                2 => c["limit"] = json!(input.u16()),
                _ => {
                    c["before"] = json!(input.byte());
                    c["limit"] = json!(input.byte() % 8);
                }
            }
            c
        }
    };
    match input.byte() % 8 {
        0 => cmd["ref"] = json!("c1"),
        1 => {
            if let Some(obj) = cmd.as_object_mut() {
                let field = ["room", "content", "to", "type"][usize::from(input.byte() % 4)];
                obj.remove(field);
            }
        }
        _ => {}
    }
    cmd
}

impl Harness {
    fn check(&mut self) {
        let tables = self.d.tables();
        if let Err(why) = tables.check_consistency() {
            panic!("room tables inconsistent: {why}");
        }
        for (key, slot) in self.slots.iter().enumerate() {
            let member = tables.member(key);
            match slot {
                Slot::Free => assert!(member.is_none(), "slot {key} is free but a member"),
                Slot::Admitted => assert!(member.is_some_and(|m| !m.open)),
                Slot::Open => assert!(member.is_some_and(|m| m.open)),
            }
        }
        let admitted = self.slots.iter().filter(|s| **s != Slot::Free).count();
        assert_eq!(tables.member_count(), admitted);

        // The same broadcast goes to every member, so an id repeats within
        // a step; it must never go back or repeat across steps.
        let mut this_step: HashMap<String, u64> = HashMap::new();
        for (to, frame) in &self.out.sends {
            assert!(
                self.slots.get(*to) == Some(&Slot::Open),
                "event addressed to {to}, which is not an open member"
            );
            let event = well_formed(frame);
            match event["type"].as_str().unwrap_or("") {
                "error" => {
                    let code = event["code"].as_str().unwrap_or("");
                    assert!(DOCUMENTED_CODES.contains(&code), "undocumented code {code}");
                }
                "message" => {
                    let room = event["room"].as_str().unwrap_or("").to_string();
                    let Some(id) = event["id"].as_u64() else {
                        panic!("message without id: {event}");
                    };
                    let before = self.last_id.get(&room).copied().unwrap_or(0);
                    match this_step.get(&room) {
                        Some(&seen) if seen == id => {}
                        Some(&seen) => {
                            assert!(id > seen, "ids in {room} went back: {seen} then {id}")
                        }
                        None => assert!(id > before, "id {id} in {room} not above {before}"),
                    }
                    this_step.insert(room, id);
                }
                "joined" => self.check_list(&event, "history"),
                "history" => self.check_list(&event, "messages"),
                _ => {}
            }
        }
        for (room, id) in this_step {
            self.last_id.insert(room, id);
        }
    }

    /// A list of kept messages: oldest first, only ids handed out before.
    fn check_list(&self, event: &Value, field: &str) {
        let room = event["room"].as_str().unwrap_or("");
        let handed_out = self.last_id.get(room).copied().unwrap_or(0);
        let Some(list) = event[field].as_array() else {
            panic!("{} without {field}: {event}", event["type"]);
        };
        let mut previous = 0;
        for m in list {
            let id = m["id"].as_u64().unwrap_or(0);
            assert!(id > previous, "{field} of {room} out of order: {event}");
            assert!(id <= handed_out, "{field} of {room} has id {id} never sent");
            assert_eq!(m["room"].as_str(), Some(room), "a message of another room");
            previous = id;
        }
    }
}
