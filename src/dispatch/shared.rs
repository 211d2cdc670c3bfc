//! The dispatcher's cluster side: commands whose answer depends on shared
//! state become [`Request`]s with tickets, and the answers
//! ([`Completion`]s) and the cluster's events ([`Publication`]s) are
//! turned into frames for local members here.
//!
//! What waits on the engine is a visible state, one [`Waiting`] per
//! ticket: an upgrade waiting for its name claim, a join waiting for its
//! backlog, a message not yet acknowledged. A joiner's publications that
//! arrive while its backlog is on the way are held for it and released
//! after its `joined`, without those the backlog already has (`floor`),
//! so that it sees every message once, in order.
//!
//! Owns no socket and no Redis: the engine is behind `Effects::requests`.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use super::{clip, fit_newest, joined_frame, Dispatcher, Effects, Refusal, MAX_USERS_LISTED};
use crate::cluster::{Answer, Completion, Publication, Request, Ticket, Unavailable, Unnumbered};
use crate::protocol::{self, ErrorCode, Frame};
use crate::rate::Bucket;
use crate::rooms::ConnKey;

/// Most requests waiting for the engine at once; beyond it a command gets
/// `unavailable` at once (Redis is not keeping up).
pub const MAX_WAITING: usize = 100_000;

/// Messages whose link broke in flight are remembered this many at most
/// (they may still show up after recovery, with their `ref`).
const MAX_LOST: usize = 1_000;

/// Most frames held for one joiner while its backlog is on the way.
const MAX_HELD: usize = 4_096;

/// Guest names tried before an upgrade gives up (each try is a claim).
const GUEST_TRIES: u32 = 8;

/// What a ticket waits for.
#[derive(Debug)]
pub enum Waiting {
    /// An upgrade waits for its name (the connection is suspended).
    Claim {
        key: ConnKey,
        name: Rc<str>,
        guest: bool,
        tries: u32,
    },
    Join {
        key: ConnKey,
        name: Rc<str>,
        room: Rc<str>,
        since: Option<u64>,
        reference: Option<Box<str>>,
    },
    /// A message not yet seen back from the cluster.
    Publish {
        key: ConnKey,
        name: Rc<str>,
        reference: Option<Box<str>>,
    },
    Page {
        key: ConnKey,
        room: Rc<str>,
        reference: Option<Box<str>>,
    },
    Who {
        key: ConnKey,
        room: Rc<str>,
        reference: Option<Box<str>>,
    },
    Rooms {
        key: ConnKey,
        reference: Option<Box<str>>,
    },
    Direct {
        key: ConnKey,
        own: Frame,
        reference: Option<Box<str>>,
        to: String,
    },
}

/// A joiner whose backlog is on the way: what the room published
/// meanwhile (`None` id: a presence notice).
#[derive(Debug)]
struct Holding {
    key: ConnKey,
    held: Vec<(Option<u64>, Frame)>,
}

/// Cluster-side state of the dispatcher.
#[derive(Debug, Default)]
pub struct Shared {
    next_ticket: Ticket,
    waiting: HashMap<Ticket, Waiting>,
    lost: VecDeque<Ticket>,
    holding: HashMap<Rc<str>, Vec<Holding>>,
    /// Members that got a backlog up to an id: publications up to it are
    /// not delivered to them again.
    floors: HashMap<Rc<str>, Vec<(ConnKey, u64)>>,
    /// Requests for the engine, taken by the loop each pass.
    requests: Vec<(Ticket, Request)>,
    /// Upgrades whose claim was decided: go on, or refuse.
    admissions: Vec<(ConnKey, Result<(), Refusal>)>,
}

impl Shared {
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

impl Dispatcher {
    fn shared(&mut self) -> &mut Shared {
        self.shared.get_or_insert_with(Shared::default)
    }

    /// Ask the engine; false (after telling `key`) when too much waits.
    fn ask(&mut self, waiting: Option<Waiting>, request: Request) -> bool {
        let shared = self.shared();
        if shared.waiting.len() >= MAX_WAITING {
            return false;
        }
        shared.next_ticket += 1;
        let ticket = shared.next_ticket;
        if let Some(w) = waiting {
            shared.waiting.insert(ticket, w);
        }
        shared.requests.push((ticket, request));
        true
    }

    fn unavailable(
        &mut self,
        key: ConnKey,
        why: Unavailable,
        reference: Option<&str>,
        out: &mut Effects,
    ) {
        let text = why.to_string();
        self.error(key, ErrorCode::Unavailable, &text, reference, out);
    }

    /// The member at `key` is still the one called `name`.
    fn still(&self, key: ConnKey, name: &str) -> bool {
        self.tables.member(key).is_some_and(|m| &*m.name == name)
    }

    // ---- requests -------------------------------------------------------

    pub(super) fn claim_shared(&mut self, key: ConnKey, name: Rc<str>, guest: bool) {
        let waiting = Waiting::Claim {
            key,
            name: name.clone(),
            guest,
            tries: 1,
        };
        if !self.ask(Some(waiting), Request::Claim { name }) {
            self.tables.remove_member(key);
            self.shared()
                .admissions
                .push((key, Err(Refusal::Unavailable)));
        }
    }

    pub(super) fn enter_shared(
        &mut self,
        key: ConnKey,
        room: &str,
        since: Option<u64>,
        reference: Option<&str>,
        out: &mut Effects,
    ) {
        let Some(member) = self.tables.member(key) else {
            return;
        };
        let name = member.name.clone();
        let Some(room) = member.rooms.iter().find(|r| &***r == room).cloned() else {
            return;
        };
        let max = match since {
            Some(_) => self.settings.resume_max + 1,
            None => self.settings.limits.history_limit,
        };
        let notice = presence_json("join", &room, &name);
        let waiting = Waiting::Join {
            key,
            name: name.clone(),
            room: room.clone(),
            since,
            reference: reference.map(Into::into),
        };
        let request = Request::Enter {
            room: room.clone(),
            name,
            since,
            max,
            notice,
        };
        if self.ask(Some(waiting), request) {
            self.shared()
                .holding
                .entry(room)
                .or_default()
                .push(Holding {
                    key,
                    held: Vec::new(),
                });
        } else {
            self.tables.leave(key, &room);
            self.unavailable(key, Unavailable::NotSent, reference, out);
        }
    }

    pub(super) fn part_shared(&mut self, key: ConnKey, room: &Rc<str>, name: &Rc<str>) {
        self.forget_member(key, room);
        let notice = presence_json("leave", room, name);
        let request = Request::Part {
            room: room.clone(),
            name: name.clone(),
            notice,
        };
        self.ask(None, request);
    }

    /// Drop what was held or floored for `key` in `room`.
    pub(super) fn forget_member(&mut self, key: ConnKey, room: &str) {
        let shared = self.shared();
        if let Some(list) = shared.holding.get_mut(room) {
            list.retain(|h| h.key != key);
            if list.is_empty() {
                shared.holding.remove(room);
            }
        }
        if let Some(list) = shared.floors.get_mut(room) {
            list.retain(|(k, _)| *k != key);
            if list.is_empty() {
                shared.floors.remove(room);
            }
        }
    }

    pub(super) fn disconnect_shared(
        &mut self,
        key: ConnKey,
        name: &Rc<str>,
        rooms: &[Rc<str>],
        open: bool,
    ) {
        if open {
            for room in rooms {
                self.part_shared(key, room, name);
            }
        }
        // Even while the claim is still out: the release is pipelined
        // behind it, so Redis frees the name after granting it.
        self.ask(None, Request::Release { name: name.clone() });
    }

    pub(super) fn publish_shared(
        &mut self,
        key: ConnKey,
        content: &str,
        room: Rc<str>,
        reference: Option<&str>,
        ts: u64,
        out: &mut Effects,
    ) {
        let Some(user) = self.tables.member(key).map(|m| m.name.clone()) else {
            return;
        };
        let event = protocol::Message {
            kind: "message",
            content,
            room: &room,
            user: &user,
            id: 0,
            ts,
            reference: None,
        };
        // Sized for the usual message (its strings need no escaping, plus
        // the field names and numbers), so it is serialized without
        // regrowing: this is the one allocation of the message's JSON.
        let mut buf = Vec::with_capacity(content.len() + room.len() + user.len() + 96);
        if serde_json::to_writer(&mut buf, &event).is_err() {
            return;
        }
        let Ok(json) = String::from_utf8(buf) else {
            return;
        };
        // The id goes where the placeholder is. Quotes inside `content` are
        // escaped, so the last `,"id":0,` is the field, not user text.
        let Some(json) = json
            .rfind(",\"id\":0,")
            .and_then(|at| Unnumbered::new(json, at + 6))
        else {
            return;
        };
        let waiting = Waiting::Publish {
            key,
            name: user,
            reference: reference.map(Into::into),
        };
        let request = Request::Publish { room, json };
        if !self.ask(Some(waiting), request) {
            self.unavailable(key, Unavailable::NotSent, reference, out);
        }
    }

    pub(super) fn page_shared(
        &mut self,
        key: ConnKey,
        room: &str,
        before: Option<u64>,
        limit: usize,
        reference: Option<&str>,
        out: &mut Effects,
    ) {
        let room: Rc<str> = Rc::from(room);
        let waiting = Waiting::Page {
            key,
            room: room.clone(),
            reference: reference.map(Into::into),
        };
        if !self.ask(
            Some(waiting),
            Request::Page {
                room,
                before,
                limit,
            },
        ) {
            self.unavailable(key, Unavailable::NotSent, reference, out);
        }
    }

    pub(super) fn who_shared(
        &mut self,
        key: ConnKey,
        room: &str,
        reference: Option<&str>,
        out: &mut Effects,
    ) {
        let room: Rc<str> = Rc::from(room);
        let waiting = Waiting::Who {
            key,
            room: room.clone(),
            reference: reference.map(Into::into),
        };
        if !self.ask(Some(waiting), Request::Who { room }) {
            self.unavailable(key, Unavailable::NotSent, reference, out);
        }
    }

    pub(super) fn rooms_shared(
        &mut self,
        key: ConnKey,
        reference: Option<&str>,
        out: &mut Effects,
    ) {
        let waiting = Waiting::Rooms {
            key,
            reference: reference.map(Into::into),
        };
        if !self.ask(Some(waiting), Request::Rooms) {
            self.unavailable(key, Unavailable::NotSent, reference, out);
        }
    }

    pub(super) fn direct_shared(
        &mut self,
        key: ConnKey,
        to: &str,
        content: &str,
        reference: Option<&str>,
        ts: u64,
        out: &mut Effects,
    ) {
        let Some(from) = self.tables.member(key).map(|m| m.name.clone()) else {
            return;
        };
        let event = protocol::Direct {
            kind: "direct",
            content,
            from: &from,
            to,
            ts,
            reference: None,
        };
        let own = protocol::encode_frame(&protocol::Direct { reference, ..event });
        if &*from == to {
            self.counters.directs += 1;
            return out.to(key, own);
        }
        let Ok(json) = serde_json::to_string(&event) else {
            return;
        };
        let waiting = Waiting::Direct {
            key,
            own,
            reference: reference.map(Into::into),
            to: to.to_string(),
        };
        let request = Request::Direct {
            to: to.to_string(),
            json,
        };
        if !self.ask(Some(waiting), request) {
            self.unavailable(key, Unavailable::NotSent, reference, out);
        }
    }

    // ---- answers --------------------------------------------------------

    /// One answer from the engine.
    pub fn complete(&mut self, done: Completion, out: &mut Effects) {
        let shared = self.shared();
        let Some(waiting) = shared.waiting.remove(&done.ticket) else {
            if let Ok(Answer::Published(_)) = done.result {
                // Its publication came back first and was delivered.
                self.counters.messages += 1;
            }
            return;
        };
        match (waiting, done.result) {
            (
                Waiting::Claim {
                    key,
                    name,
                    guest,
                    tries,
                },
                result,
            ) => self.claimed(key, name, guest, tries, result),
            (
                Waiting::Join {
                    key,
                    name,
                    room,
                    since,
                    reference,
                },
                result,
            ) => self.entered(key, &name, room, since, reference.as_deref(), result, out),
            (w @ Waiting::Publish { .. }, Ok(_)) => {
                // Acknowledged; the sender's copy goes out when the
                // publication comes back, in the room's order.
                self.counters.messages += 1;
                self.shared().waiting.insert(done.ticket, w);
            }
            (w @ Waiting::Publish { .. }, Err(Unavailable::Lost)) => {
                // It may have been stored: if it reaches the room after
                // recovery, the sender's copy still carries its `ref`.
                let shared = self.shared();
                shared.waiting.insert(done.ticket, w);
                shared.lost.push_back(done.ticket);
                if shared.lost.len() > MAX_LOST {
                    if let Some(old) = shared.lost.pop_front() {
                        shared.waiting.remove(&old);
                    }
                }
            }
            (
                Waiting::Publish {
                    key,
                    name,
                    reference,
                    ..
                },
                Err(why),
            ) => {
                if self.still(key, &name) {
                    self.unavailable(key, why, reference.as_deref(), out);
                }
            }
            (
                Waiting::Page {
                    key,
                    room,
                    reference,
                },
                Ok(Answer::Page(kept)),
            ) => {
                let messages = fit_newest(&kept, self.settings.reply_bytes);
                let content = format!("{} messages of {room}", messages.len());
                let frame = protocol::encode_frame(&protocol::HistoryPage {
                    kind: "history",
                    content: &content,
                    room: &room,
                    messages: &messages,
                    reference: reference.as_deref(),
                });
                out.to(key, frame);
            }
            (
                Waiting::Who {
                    key,
                    room,
                    reference,
                },
                Ok(Answer::Users(mut users)),
            ) => {
                users.sort_unstable();
                let total = users.len();
                users.truncate(MAX_USERS_LISTED);
                let content = if total > users.len() {
                    format!("{total} in {room} ({} listed)", users.len())
                } else {
                    format!("{total} in {room}")
                };
                let names: Vec<&str> = users.iter().map(String::as_str).collect();
                out.to(
                    key,
                    protocol::encode_frame(&protocol::Members {
                        kind: "members",
                        content: &content,
                        room: &room,
                        users: &names,
                        reference: reference.as_deref(),
                    }),
                );
            }
            (Waiting::Rooms { key, reference }, Ok(Answer::Rooms(mut rooms))) => {
                rooms.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                let content = format!("{} rooms", rooms.len());
                let counts: Vec<protocol::RoomCount> = rooms
                    .iter()
                    .map(|(room, users)| protocol::RoomCount {
                        room,
                        users: *users as usize,
                    })
                    .collect();
                out.to(
                    key,
                    protocol::encode_frame(&protocol::Rooms {
                        kind: "rooms",
                        content: &content,
                        rooms: &counts,
                        reference: reference.as_deref(),
                    }),
                );
            }
            (Waiting::Direct { key, own, .. }, Ok(Answer::Delivered(true))) => {
                self.counters.directs += 1;
                out.to(key, own);
            }
            (
                Waiting::Direct {
                    key, reference, to, ..
                },
                Ok(Answer::Delivered(false)),
            ) => {
                let text = format!("no connected user is called {:?}", clip(&to));
                self.error(
                    key,
                    ErrorCode::UnknownUser,
                    &text,
                    reference.as_deref(),
                    out,
                );
            }
            (
                Waiting::Page { key, reference, .. }
                | Waiting::Who { key, reference, .. }
                | Waiting::Rooms { key, reference }
                | Waiting::Direct { key, reference, .. },
                Err(why),
            ) => self.unavailable(key, why, reference.as_deref(), out),
            (w, Ok(answer)) => log::warn!("engine answer {answer:?} does not fit {w:?}"),
        }
    }

    fn claimed(
        &mut self,
        key: ConnKey,
        name: Rc<str>,
        guest: bool,
        tries: u32,
        result: Result<Answer, Unavailable>,
    ) {
        if !self.still(key, &name) {
            // The connection went while its claim was out; its release is
            // already queued behind the claim.
            return;
        }
        match result {
            Ok(Answer::Claimed(true)) => self.shared().admissions.push((key, Ok(()))),
            Ok(Answer::Claimed(false)) if guest && tries < GUEST_TRIES => {
                // Another node's guest has this number. Every node counts
                // from 1, so the next numbers are likely taken too: jump
                // ahead, further at each try.
                let Some((member, _)) = self.tables.remove_member(key) else {
                    return;
                };
                self.next_guest += 1000 * u64::from(tries);
                let name = loop {
                    let name = format!("guest-{}", self.next_guest);
                    self.next_guest += 1;
                    if self
                        .tables
                        .add_member(key, &name, &member.home, member.bucket.clone())
                    {
                        break Rc::<str>::from(name);
                    }
                };
                let waiting = Waiting::Claim {
                    key,
                    name: name.clone(),
                    guest,
                    tries: tries + 1,
                };
                if !self.ask(Some(waiting), Request::Claim { name }) {
                    self.tables.remove_member(key);
                    self.shared()
                        .admissions
                        .push((key, Err(Refusal::Unavailable)));
                }
            }
            Ok(_) => {
                self.tables.remove_member(key);
                self.shared().admissions.push((key, Err(Refusal::Taken)));
            }
            Err(_) => {
                self.tables.remove_member(key);
                self.shared()
                    .admissions
                    .push((key, Err(Refusal::Unavailable)));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entered(
        &mut self,
        key: ConnKey,
        name: &str,
        room: Rc<str>,
        since: Option<u64>,
        reference: Option<&str>,
        result: Result<Answer, Unavailable>,
        out: &mut Effects,
    ) {
        let held = {
            let shared = self.shared();
            let mut held = Vec::new();
            if let Some(list) = shared.holding.get_mut(&room) {
                if let Some(at) = list.iter().position(|h| h.key == key) {
                    held = list.remove(at).held;
                }
                if list.is_empty() {
                    shared.holding.remove(&room);
                }
            }
            held
        };
        // Gone, or left the room again while the backlog was on the way.
        let inside = self
            .tables
            .member(key)
            .is_some_and(|m| &*m.name == name && m.rooms.contains(&room));
        if !inside {
            return;
        }
        let (last_id, backlog, users) = match result {
            Ok(Answer::Entered {
                last_id,
                backlog,
                users,
            }) => (last_id, backlog, users),
            Ok(_) | Err(_) => {
                self.tables.leave(key, &room);
                let why = match result {
                    Err(why) => why,
                    Ok(_) => Unavailable::Refused,
                };
                return self.unavailable(key, why, reference, out);
            }
        };
        let (history, more) = self.fit_backlog(&backlog, since);
        let mut users = users;
        users.sort_unstable();
        let total = users.len();
        users.truncate(MAX_USERS_LISTED);
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        out.to(
            key,
            joined_frame(&room, &names, total, &history, more, reference),
        );
        for (id, frame) in held {
            if id.map_or(true, |id| id > last_id) {
                out.to(key, frame);
            }
        }
        self.shared()
            .floors
            .entry(room)
            .or_default()
            .push((key, last_id));
    }

    /// One event from the cluster, for local members.
    pub fn publication(&mut self, event: Publication, out: &mut Effects) {
        match event {
            Publication::Message {
                room,
                id,
                ticket,
                frame,
            } => self.fan_out(&room, id, ticket, frame, out),
            Publication::Presence { room, json } => {
                let frame = protocol::text_frame(&json);
                let Some(r) = self.tables.room(&room) else {
                    return;
                };
                let members = r.members.clone();
                for to in members {
                    if !self.hold(&room, to, None, &frame) {
                        out.to(to, frame.clone());
                    }
                }
            }
            Publication::Direct { to, json } => {
                let Some(key) = self.tables.by_name(&to) else {
                    return;
                };
                if self.tables.member(key).is_some_and(|m| m.open) {
                    out.to(key, protocol::text_frame(&json));
                }
            }
            Publication::Reconnected => {
                let mut names = Vec::new();
                let mut memberships = Vec::new();
                for (room, r) in self.tables.iter_rooms() {
                    for &k in &r.members {
                        if let Some(m) = self.tables.member(k) {
                            memberships.push((room.clone(), m.name.clone()));
                        }
                    }
                }
                for (_, r) in self.tables.iter_rooms() {
                    for &k in &r.members {
                        if let Some(m) = self.tables.member(k) {
                            if !names.contains(&m.name) {
                                names.push(m.name.clone());
                            }
                        }
                    }
                }
                self.ask(None, Request::Resync { names, memberships });
            }
        }
    }

    /// Hold `frame` for `to` when its join is still waiting; true if held.
    fn hold(&mut self, room: &str, to: ConnKey, id: Option<u64>, frame: &Frame) -> bool {
        let Some(shared) = self.shared.as_mut() else {
            return false;
        };
        let Some(list) = shared.holding.get_mut(room) else {
            return false;
        };
        let Some(h) = list.iter_mut().find(|h| h.key == to) else {
            return false;
        };
        if h.held.len() < MAX_HELD {
            h.held.push((id, frame.clone()));
        }
        true
    }

    fn fan_out(
        &mut self,
        room: &Rc<str>,
        id: u64,
        ticket: Option<Ticket>,
        shared_frame: Frame,
        out: &mut Effects,
    ) {
        // The sender's own copy, when this node published it.
        let mut own: Option<(ConnKey, Frame)> = None;
        if let Some(t) = ticket {
            let shared = self.shared();
            if let Some(Waiting::Publish {
                key,
                name,
                reference,
            }) = shared.waiting.remove(&t)
            {
                if self.still(key, &name) {
                    let frame = match reference {
                        Some(r) => {
                            // The shared frame's payload is the message's
                            // JSON object (the engine built it from text).
                            let json =
                                String::from_utf8_lossy(protocol::frame_payload(&shared_frame));
                            let open = json.strip_suffix('}').unwrap_or(&json);
                            let r = serde_json::to_string(&*r).unwrap_or_default();
                            protocol::text_frame_of(&[open, ",\"ref\":", &r, "}"])
                        }
                        None => shared_frame.clone(),
                    };
                    own = Some((key, frame));
                }
            }
        }
        let floors = self
            .shared
            .as_mut()
            .and_then(|s| s.floors.get_mut(&**room).map(std::mem::take));
        let holding = self.shared.as_mut().and_then(|s| s.holding.remove(&**room));
        let Some(r) = self.tables.room(room) else {
            return;
        };
        // Usually nobody in the room is joining or catching up: then this
        // is the plain loop of the single-node broadcast.
        let mut delivered = 0;
        let mut holding = holding;
        for &to in &r.members {
            let frame = match &own {
                Some((k, f)) if *k == to => f.clone(),
                _ => shared_frame.clone(),
            };
            if let Some(h) = holding
                .as_mut()
                .and_then(|l| l.iter_mut().find(|h| h.key == to))
            {
                if h.held.len() < MAX_HELD {
                    h.held.push((Some(id), frame));
                }
                continue;
            }
            if floors
                .as_ref()
                .is_some_and(|f| f.iter().any(|&(k, floor)| k == to && id <= floor))
            {
                continue;
            }
            delivered += 1;
            out.to(to, frame);
        }
        if let (Some(h), Some(shared)) = (holding, self.shared.as_mut()) {
            shared.holding.insert(room.clone(), h);
        }
        self.counters.deliveries += delivered;
        // Floors at or below this id are passed: only higher ones stay.
        if let Some(mut f) = floors {
            f.retain(|&(_, floor)| floor > id);
            if !f.is_empty() {
                self.shared().floors.insert(room.clone(), f);
            }
        }
    }

    /// Requests wait to be handed to the engine.
    pub fn has_requests(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| !s.requests.is_empty())
    }

    /// Requests made since the last call, for the engine.
    pub fn take_requests(&mut self) -> Vec<(Ticket, Request)> {
        self.shared
            .as_mut()
            .map_or_else(Vec::new, |s| std::mem::take(&mut s.requests))
    }

    /// Upgrades whose name claim was decided since the last call.
    pub fn take_admissions(&mut self) -> Vec<(ConnKey, Result<(), Refusal>)> {
        self.shared
            .as_mut()
            .map_or_else(Vec::new, |s| std::mem::take(&mut s.admissions))
    }

    /// Requests waiting for the engine (for `/stats`).
    pub fn waiting(&self) -> usize {
        self.shared.as_ref().map_or(0, Shared::waiting)
    }

    pub(super) fn admit_shared(
        &mut self,
        key: ConnKey,
        name: Option<&str>,
        room: &str,
        bucket: Bucket,
    ) -> Result<Rc<str>, Refusal> {
        let (name, guest) = match name {
            Some(name) => {
                if !self.tables.add_member(key, name, room, bucket) {
                    return Err(Refusal::Taken);
                }
                (Rc::<str>::from(name), false)
            }
            None => loop {
                let name = format!("guest-{}", self.next_guest);
                self.next_guest += 1;
                if self.tables.add_member(key, &name, room, bucket.clone()) {
                    break (Rc::<str>::from(name), true);
                }
            },
        };
        self.claim_shared(key, name.clone(), guest);
        Ok(name)
    }
}

/// A `join`/`leave` notice's JSON (no frame header: it travels through
/// Redis and is framed by each node).
fn presence_json(kind: &'static str, room: &str, user: &str) -> String {
    let content = format!("{user} {}", if kind == "join" { "joined" } else { "left" });
    serde_json::to_string(&protocol::Presence {
        kind,
        content: &content,
        room,
        user,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    //! The cluster side driven without Redis: the test plays the engine,
    //! answering requests with completions and publications.
    use super::*;
    use crate::dispatch::{Clock, SessionRequest, Settings};
    use crate::protocol::Limits;
    use crate::store::memory::MemoryHistory;
    use crate::store::Kept;
    use serde_json::Value;

    const NOW: Clock = Clock {
        mono_ms: 0,
        unix_ms: 1_700_000_000_000,
    };

    struct Node {
        d: Dispatcher,
        out: Effects,
        pending_enter: Option<(Ticket, Request)>,
    }

    fn kept(room: &str, id: u64) -> Kept {
        let json = format!(
            r#"{{"type":"message","content":"m{id}","room":"{room}","user":"x","id":{id},"ts":1}}"#
        );
        Kept {
            id,
            json: Rc::from(serde_json::value::RawValue::from_string(json).expect("json")),
        }
    }

    impl Node {
        fn new() -> Self {
            let settings = Settings {
                limits: Limits {
                    max_message_bytes: 65536,
                    max_content_bytes: 100,
                    max_rooms_per_user: 3,
                    rate_per_s: 100,
                    rate_burst: 100,
                    history_limit: 50,
                },
                resume_max: 1000,
                refuse_unkept: false,
                reply_bytes: 1 << 20,
            };
            Node {
                d: Dispatcher::new(settings, Box::new(MemoryHistory::new(0))).clustered(),
                out: Effects::default(),
                pending_enter: None,
            }
        }

        fn take(&mut self) -> Vec<(ConnKey, Value)> {
            self.out
                .sends
                .drain(..)
                .map(|(k, f)| {
                    let v = serde_json::from_slice(protocol::frame_payload(&f)).expect("json");
                    (k, v)
                })
                .collect()
        }

        fn requests(&mut self) -> Vec<(Ticket, Request)> {
            self.d.take_requests()
        }

        fn complete(&mut self, ticket: Ticket, result: Result<Answer, Unavailable>) {
            self.d
                .complete(Completion { ticket, result }, &mut self.out);
        }

        /// Admit, grant the claim, open, and answer the home join with
        /// `last_id` and no backlog.
        fn member(&mut self, key: ConnKey, name: &str, room: &str, last_id: u64) {
            let req = SessionRequest {
                username: Some(name.into()),
                room: Some(room.into()),
            };
            self.d.admit(key, &req, NOW).expect("admitted");
            let (t, _) = self.requests().pop().expect("claim");
            self.complete(t, Ok(Answer::Claimed(true)));
            assert_eq!(self.d.take_admissions(), vec![(key, Ok(()))]);
            self.d.open(key, None, &mut self.out);
            let (t, r) = self.requests().pop().expect("enter");
            assert!(matches!(r, Request::Enter { .. }), "{r:?}");
            self.complete(
                t,
                Ok(Answer::Entered {
                    last_id,
                    backlog: Vec::new(),
                    users: vec![name.into()],
                }),
            );
            self.take();
        }

        /// Like [`Node::member`], leaving the home join's answer out.
        fn member_waiting(&mut self, key: ConnKey, name: &str, room: &str) {
            let req = SessionRequest {
                username: Some(name.into()),
                room: Some(room.into()),
            };
            self.d.admit(key, &req, NOW).expect("admitted");
            let (t, _) = self.requests().pop().expect("claim");
            self.complete(t, Ok(Answer::Claimed(true)));
            self.d.take_admissions();
            self.d.open(key, None, &mut self.out);
            self.pending_enter = self.requests().pop();
        }

        fn publish(&mut self, room: &str, id: u64, ticket: Option<Ticket>) {
            let json = kept(room, id).json.get().to_string();
            self.d.publication(
                Publication::Message {
                    room: Rc::from(room),
                    id,
                    ticket,
                    frame: protocol::text_frame(&json),
                },
                &mut self.out,
            );
        }
    }

    fn ids_for(events: &[(ConnKey, Value)], key: ConnKey) -> Vec<u64> {
        events
            .iter()
            .filter(|(k, v)| *k == key && v["type"] == "message")
            .filter_map(|(_, v)| v["id"].as_u64())
            .collect()
    }

    #[test]
    fn an_upgrade_waits_for_its_claim() {
        let mut n = Node::new();
        let req = SessionRequest {
            username: Some("alice".into()),
            room: None,
        };
        n.d.admit(1, &req, NOW).expect("admitted");
        let reqs = n.requests();
        assert!(matches!(&reqs[..], [(_, Request::Claim { name })] if &**name == "alice"));
        assert!(
            n.d.take_admissions().is_empty(),
            "decided before the claim came back"
        );
        // Held elsewhere in the cluster: 409, and the name is free here.
        n.complete(reqs[0].0, Ok(Answer::Claimed(false)));
        assert_eq!(n.d.take_admissions(), vec![(1, Err(Refusal::Taken))]);
        assert!(n.d.tables().by_name("alice").is_none());
        // Redis unreachable: 503.
        n.d.admit(2, &req, NOW).expect("admitted");
        let (t, _) = n.requests().pop().expect("claim");
        n.complete(t, Err(Unavailable::NotSent));
        assert_eq!(n.d.take_admissions(), vec![(2, Err(Refusal::Unavailable))]);
    }

    #[test]
    fn a_guest_number_taken_elsewhere_is_retried() {
        let mut n = Node::new();
        n.d.admit(1, &SessionRequest::default(), NOW)
            .expect("admitted");
        let (t, _) = n.requests().pop().expect("claim");
        n.complete(t, Ok(Answer::Claimed(false)));
        let reqs = n.requests();
        let [(t, Request::Claim { name })] = &reqs[..] else {
            panic!("{reqs:?}")
        };
        assert!(name.starts_with("guest-") && &**name != "guest-1", "{name}");
        let t = *t;
        n.complete(t, Ok(Answer::Claimed(true)));
        assert_eq!(n.d.take_admissions(), vec![(1, Ok(()))]);
    }

    #[test]
    fn a_joiner_sees_every_message_once_around_its_backlog() {
        let mut n = Node::new();
        n.member(1, "alice", "r", 5);
        // Bob's join goes out; message 6 arrives before its answer.
        n.member_waiting(2, "bob", "r");
        n.publish("r", 6, None);
        let got = n.take();
        assert_eq!(ids_for(&got, 1), [6]);
        assert!(ids_for(&got, 2).is_empty(), "held while the backlog is out");
        // The backlog already holds 6 (and 7, published before the script
        // ran): neither is delivered to bob again.
        let (t, _) = n.pending_enter.take().expect("enter");
        n.complete(
            t,
            Ok(Answer::Entered {
                last_id: 7,
                backlog: vec![kept("r", 6), kept("r", 7)],
                users: vec!["alice".into(), "bob".into()],
            }),
        );
        n.publish("r", 7, None);
        n.publish("r", 8, None);
        let got = n.take();
        let joined = got
            .iter()
            .find(|(k, v)| *k == 2 && v["type"] == "joined")
            .expect("joined");
        let history: Vec<u64> = joined.1["history"]
            .as_array()
            .expect("history")
            .iter()
            .filter_map(|m| m["id"].as_u64())
            .collect();
        assert_eq!(history, [6, 7]);
        assert_eq!(ids_for(&got, 2), [8]);
        assert_eq!(ids_for(&got, 1), [7, 8]);
    }

    #[test]
    fn the_senders_copy_has_its_ref_and_comes_in_room_order() {
        let mut n = Node::new();
        n.member(1, "alice", "r", 0);
        n.member(2, "bob", "r", 0);
        n.d.handle_text(
            1,
            r#"{"type":"message","content":"hi","ref":"c1"}"#,
            NOW,
            &mut n.out,
        );
        let reqs = n.requests();
        let [(t, Request::Publish { json, .. })] = &reqs[..] else {
            panic!("{reqs:?}")
        };
        assert!(n.take().is_empty(), "nothing before the cluster has it");
        let json = format!("{}1{}", json.prefix(), json.suffix());
        let v: Value = serde_json::from_str(&json).expect("the halves make JSON");
        assert_eq!(
            (v["id"].as_u64(), v["content"].as_str()),
            (Some(1), Some("hi"))
        );
        n.d.publication(
            Publication::Message {
                room: Rc::from("r"),
                id: 1,
                ticket: Some(*t),
                frame: protocol::text_frame(&json),
            },
            &mut n.out,
        );
        let got = n.take();
        let own = got.iter().find(|(k, _)| *k == 1).expect("own copy");
        let other = got.iter().find(|(k, _)| *k == 2).expect("bob's copy");
        assert_eq!(own.1["ref"], "c1");
        assert!(other.1.get("ref").is_none());
        n.complete(*t, Ok(Answer::Published(1)));
        assert_eq!(n.d.counters.messages, 1);
        assert!(n.take().is_empty());
    }

    #[test]
    fn a_request_the_engine_cannot_send_is_unavailable() {
        let mut n = Node::new();
        n.member(1, "alice", "r", 0);
        n.d.handle_text(1, r#"{"type":"who","room":"r","ref":"w"}"#, NOW, &mut n.out);
        let (t, _) = n.requests().pop().expect("who");
        n.complete(t, Err(Unavailable::NotSent));
        let got = n.take();
        assert_eq!(got[0].1["code"], "unavailable");
        assert_eq!(got[0].1["ref"], "w");
        assert_eq!(n.d.waiting(), 0);
    }
}
