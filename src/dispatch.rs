//! The dispatcher: the single router from a member's command to the events
//! it causes. It replaces the Go original's `Room.Run` goroutine.
//!
//! It owns the room tables and the history, and does no socket I/O (the
//! history behind it may touch the disk; see `store/`): it is handed a
//! decoded frame and the time, and it appends `(connection, frame)` pairs to
//! an [`Effects`] the loop then delivers. Every event is encoded once; a
//! broadcast pushes the same shared [`Frame`] for each member. Because
//! nothing here touches a socket, every command and error is unit-tested
//! below without one.
//!
//! In cluster mode (`--redis`) the commands whose answer is shared across
//! nodes leave through the seam in `dispatch/shared.rs`: a request to the
//! engine, answered later by a completion; this file keeps the local
//! members' tables and the single-node path, which answers inline.

use std::borrow::Cow;
use std::rc::Rc;

use serde_json::value::RawValue;

use crate::protocol::{self, Command, ErrorCode, Frame, Limits};
use crate::rate::{Bucket, Rate, Verdict};
use crate::rooms::{self, ConnKey, Joined, Rooms};
use crate::store::{History, Kept};

mod shared;

/// Hard cap on `history.limit`, from the protocol.
pub const MAX_HISTORY_PAGE: usize = 500;

/// Most rooms listed in one `rooms` answer, so the answer stays far below
/// any outbox bound however many rooms exist.
pub const MAX_ROOMS_LISTED: usize = 1000;

/// Most member names in one `joined` or `members` answer (about 34 KiB at
/// the longest names), for the same reason.
pub const MAX_USERS_LISTED: usize = 1000;

/// What the dispatcher enforces (from [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// Most messages replayed for a `since` resume (what history keeps in
    /// memory per room).
    pub resume_max: usize,
    /// Refuse a message whose record could not be kept (`--fsync always`);
    /// otherwise deliver it and count the failure.
    pub refuse_unkept: bool,
    /// Most bytes of messages in one answer (`joined.history`, `history`):
    /// half the outbox bound, so that an answer never makes its own
    /// recipient a "slow consumer" and leaves room for live traffic.
    pub reply_bytes: usize,
}

impl Settings {
    fn rate(&self) -> Rate {
        Rate {
            per_s: self.limits.rate_per_s,
            burst: self.limits.rate_burst,
        }
    }
}

/// The two clocks a command needs: a monotonic one for rate limits and the
/// wall clock for `ts`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub mono_ms: u64,
    pub unix_ms: u64,
}

/// A connection the dispatcher wants closed, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    pub key: ConnKey,
    pub code: u16,
    pub reason: &'static str,
}

/// Everything one call produced, in order: frames for connections, closes
/// it asks for, and (in cluster mode) requests for the engine. Named apart
/// from a connection's `Outbox`, which is where the loop puts the frames.
/// Reused across calls so that a busy loop does not allocate per command.
#[derive(Debug, Default)]
pub struct Effects {
    pub sends: Vec<(ConnKey, Frame)>,
    pub closes: Vec<CloseRequest>,
}

impl Effects {
    fn to(&mut self, key: ConnKey, frame: Frame) {
        self.sends.push((key, frame));
    }
}

/// Query parameters of an upgrade that the dispatcher must check before
/// the 101 is sent.
#[derive(Debug, Default, Clone)]
pub struct SessionRequest {
    /// `None` asks for a `guest-<n>` name.
    pub username: Option<String>,
    pub room: Option<String>,
}

/// Why an upgrade is refused; the HTTP layer turns it into a status.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the username breaks the name rule.
    BadUsername,
    /// 400: the room name breaks the name rule.
    BadRoom,
    /// 409: someone connected holds this name.
    Taken,
    /// 503: cluster mode, and the name could not be claimed (Redis down).
    Unavailable,
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadUsername | Refusal::BadRoom => 400,
            Refusal::Taken => 409,
            Refusal::Unavailable => 503,
        }
    }

    pub fn explain(&self) -> String {
        match self {
            Refusal::BadUsername => format!("username must be {}", rooms::NAME_RULE),
            Refusal::BadRoom => format!("room must be {}", rooms::NAME_RULE),
            Refusal::Taken => "username is already connected".to_string(),
            Refusal::Unavailable => "cluster store (Redis) unreachable, retry later".to_string(),
        }
    }
}

/// Running totals for `/stats`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Room messages accepted.
    pub messages: u64,
    /// Room message deliveries queued (one per recipient).
    pub deliveries: u64,
    pub directs: u64,
    pub rate_limited: u64,
    pub floods: u64,
    /// Error events sent, all codes.
    pub errors: u64,
    /// Messages whose record the history could not keep.
    pub unkept: u64,
}

/// The router and the state it routes over.
pub struct Dispatcher {
    settings: Settings,
    tables: Rooms,
    history: Box<dyn History>,
    next_guest: u64,
    /// With `refuse_unkept`: messages appended since the last successful
    /// [`History::commit`], so that a failed commit can take them back.
    uncommitted: Vec<Uncommitted>,
    rooms_listing: Option<RoomsListing>,
    pub counters: Counters,
    /// Cluster mode: what waits on the shared engine (`dispatch/shared.rs`);
    /// `None` on a single node, where history answers inline.
    shared: Option<shared::Shared>,
}

/// The `rooms` answer as of one version of the tables.
struct RoomsListing {
    version: u64,
    rooms: Vec<(Rc<str>, usize)>,
    content: String,
    /// Encoded without `ref`, shared by every request that has none.
    frame: Frame,
}

/// A message whose record is appended but not yet durable.
struct Uncommitted {
    sender: ConnKey,
    room: Rc<str>,
    reference: Option<Box<str>>,
    /// The broadcast and, when the sender gave a `ref`, its own copy.
    frames: [Option<Frame>; 2],
}

impl Dispatcher {
    pub fn new(settings: Settings, history: Box<dyn History>) -> Self {
        Dispatcher {
            settings,
            tables: Rooms::new(),
            history,
            next_guest: 1,
            uncommitted: Vec::new(),
            rooms_listing: None,
            counters: Counters::default(),
            shared: None,
        }
    }

    /// Cluster mode: shared state is asked of the engine (requests and
    /// completions) instead of the local history and tables.
    pub fn clustered(mut self) -> Self {
        self.shared = Some(shared::Shared::default());
        self
    }

    pub fn is_clustered(&self) -> bool {
        self.shared.is_some()
    }

    pub fn tables(&self) -> &Rooms {
        &self.tables
    }

    pub fn history(&mut self) -> &mut dyn History {
        &mut *self.history
    }

    pub fn history_ref(&self) -> &dyn History {
        &*self.history
    }

    /// Check an upgrade and claim its username for `key`. Called before the
    /// 101 so that a refusal is an HTTP status, not a closed WebSocket.
    /// Returns the name granted.
    pub fn admit(
        &mut self,
        key: ConnKey,
        req: &SessionRequest,
        now: Clock,
    ) -> Result<Rc<str>, Refusal> {
        let room = req.room.as_deref().unwrap_or("default");
        if !rooms::valid_name(room) {
            return Err(Refusal::BadRoom);
        }
        let bucket = Bucket::new(self.settings.rate(), now.mono_ms);
        if let Some(name) = &req.username {
            if !rooms::valid_name(name) {
                return Err(Refusal::BadUsername);
            }
        }
        if self.shared.is_some() {
            // The upgrade waits for the cluster-wide claim.
            return self.admit_shared(key, req.username.as_deref(), room, bucket);
        }
        let name = match &req.username {
            Some(name) if !rooms::valid_name(name) => return Err(Refusal::BadUsername),
            Some(name) => {
                if !self.tables.add_member(key, name, room, bucket) {
                    return Err(Refusal::Taken);
                }
                name.clone()
            }
            None => loop {
                let name = format!("guest-{}", self.next_guest);
                self.next_guest += 1;
                if self.tables.add_member(key, &name, room, bucket.clone()) {
                    break name;
                }
            },
        };
        Ok(name.into())
    }

    /// The WebSocket is open: greet the member and join its home room, with
    /// `since` as the resume point when the URL had one.
    pub fn open(&mut self, key: ConnKey, since: Option<u64>, out: &mut Effects) {
        let Some(member) = self.tables.member_mut(key) else {
            return;
        };
        member.open = true;
        let (name, home) = (member.name.clone(), member.home.clone());
        let content = format!("welcome, {name}");
        out.to(
            key,
            protocol::encode_frame(&protocol::Welcome {
                kind: "welcome",
                content: &content,
                user: &name,
                room: &home,
                limits: &self.settings.limits,
            }),
        );
        self.join(key, &home, since, None, out);
    }

    /// Make the messages appended since the last call durable (the group
    /// commit; a no-op unless the store syncs on commit). Call before any
    /// of them is delivered: if the commit fails, the messages are taken
    /// back out of `out` and each sender gets `history_unavailable`
    /// instead, so that nobody sees a message the store does not have.
    pub fn commit(&mut self, out: &mut Effects) {
        let result = self.history.commit();
        let pending = std::mem::take(&mut self.uncommitted);
        let Err(e) = result else {
            return;
        };
        log::error!(
            "history commit failed, {} message(s) refused: {e}",
            pending.len()
        );
        let revoked: Vec<*const u8> = pending
            .iter()
            .flat_map(|u| u.frames.iter().flatten())
            .map(|f| f.as_ptr())
            .collect();
        out.sends
            .retain(|(_, frame)| !revoked.contains(&frame.as_ptr()));
        let text = format!("message not sent: it could not be stored ({e})");
        for u in pending {
            self.counters.messages -= 1;
            self.counters.unkept += 1;
            self.error(
                u.sender,
                ErrorCode::HistoryUnavailable,
                &text,
                u.reference.as_deref(),
                out,
            );
        }
    }

    /// Before serving stored messages of `room`: if some of them were
    /// appended in this iteration and are not yet durable (`--fsync
    /// always`), commit now, so that an answer never carries a message the
    /// store may still refuse. An extra sync, only in this case.
    fn commit_before_reading(&mut self, room: &str, out: &mut Effects) {
        if self.uncommitted.iter().any(|u| &*u.room == room) {
            self.commit(out);
        }
    }

    /// One text frame from `key`.
    pub fn handle_text(&mut self, key: ConnKey, text: &str, now: Clock, out: &mut Effects) {
        if !self.admit_command(key, now, Some(text), out) {
            return;
        }
        let (command, reference) = match protocol::decode(text) {
            Ok(decoded) => decoded,
            Err(rejected) => {
                let reference = rejected.reference.as_deref();
                self.error(key, rejected.code, &rejected.reason, reference, out);
                return;
            }
        };
        let reference = reference.as_deref();
        match command {
            Command::Message { content, room } => {
                self.message(key, content, room, reference, now, out)
            }
            Command::Join { room, since } => {
                if rooms::valid_name(&room) {
                    self.join(key, &room, since, reference, out);
                } else {
                    self.bad_room(key, reference, out);
                }
            }
            Command::Leave { room } => self.leave(key, &room, reference, out),
            Command::Direct { to, content } => self.direct(key, &to, &content, reference, now, out),
            Command::Rooms => self.list_rooms(key, reference, out),
            Command::Who { room } => self.who(key, &room, reference, out),
            Command::History {
                room,
                before,
                limit,
            } => self.page(key, &room, before, limit, reference, out),
        }
    }

    /// One binary frame from `key`: chat is text only.
    pub fn handle_binary(&mut self, key: ConnKey, now: Clock, out: &mut Effects) {
        if self.admit_command(key, now, None, out) {
            self.error(
                key,
                ErrorCode::BinaryUnsupported,
                "binary frames are not supported; send JSON text frames",
                None,
                out,
            );
        }
    }

    /// The connection is gone (however it ended): leave every room, telling
    /// each, and release the name. Safe to call for a key that never became
    /// a member or was already removed.
    pub fn disconnect(&mut self, key: ConnKey, out: &mut Effects) {
        let Some((member, rooms)) = self.tables.remove_member(key) else {
            return;
        };
        if self.shared.is_some() {
            let rooms: Vec<Rc<str>> = rooms.into_iter().map(|(room, _)| room).collect();
            for room in &rooms {
                self.forget_member(key, room);
            }
            return self.disconnect_shared(key, &member.name, &rooms, member.open);
        }
        if !member.open {
            return;
        }
        for (room, emptied) in rooms {
            if emptied {
                self.history.release(&room);
            } else {
                self.presence(&room, "leave", &member.name, out);
            }
        }
    }

    // ---- commands -------------------------------------------------------

    /// Rate-limit one command (`text` is the frame, when it was text).
    /// False when it must not be handled.
    fn admit_command(
        &mut self,
        key: ConnKey,
        now: Clock,
        text: Option<&str>,
        out: &mut Effects,
    ) -> bool {
        let rate = self.settings.rate();
        let Some(member) = self.tables.member_mut(key) else {
            return false;
        };
        if !member.open || member.closing {
            return false;
        }
        let verdict = member.bucket.take(rate, now.mono_ms);
        if verdict == Verdict::Flooding {
            // Once is enough: the rest of this read batch is ignored while
            // the close takes effect.
            member.closing = true;
        }
        match verdict {
            Verdict::Allow => true,
            Verdict::Refuse => {
                self.counters.rate_limited += 1;
                let content = format!(
                    "too many commands: at most {} per second (bursts of {}); slow down",
                    rate.per_s, rate.burst
                );
                // Decoded only on refusal, so an allowed command is parsed
                // once; the refusal must still carry the command's `ref`.
                let decoded = text.map(protocol::decode);
                let reference = match &decoded {
                    Some(Ok((_, reference))) => reference.as_deref(),
                    Some(Err(rejected)) => rejected.reference.as_deref(),
                    None => None,
                };
                self.error(key, ErrorCode::RateLimited, &content, reference, out);
                false
            }
            Verdict::Flooding => {
                self.counters.floods += 1;
                out.closes.push(CloseRequest {
                    key,
                    code: 1008,
                    reason: "flooding after rate_limited",
                });
                false
            }
        }
    }

    fn message(
        &mut self,
        key: ConnKey,
        content: Cow<'_, str>,
        room: Option<Cow<'_, str>>,
        reference: Option<&str>,
        now: Clock,
        out: &mut Effects,
    ) {
        if !self.content_fits(key, &content, reference, out) {
            return;
        }
        let Some(member) = self.tables.member(key) else {
            return;
        };
        let wanted: &str = match &room {
            None => &member.home,
            Some(r) if !rooms::valid_name(r) => return self.bad_room(key, reference, out),
            Some(r) => r,
        };
        // The member's own copy of the name: no allocation per message.
        let Some(room) = member.rooms.iter().find(|r| &***r == wanted).cloned() else {
            let text = format!("you are not in room {wanted}; join it first");
            return self.error(key, ErrorCode::NotMember, &text, reference, out);
        };
        let user = member.name.clone();
        if self.shared.is_some() {
            return self.publish_shared(key, &content, room, reference, now.unix_ms, out);
        }
        let id = match self.history.reserve_id(&room) {
            Ok(id) => id,
            Err(e) => {
                let text = format!("message not sent: {e}");
                return self.error(key, ErrorCode::HistoryUnavailable, &text, reference, out);
            }
        };
        let event = protocol::Message {
            kind: "message",
            content: &content,
            room: &room,
            user: &user,
            id,
            ts: now.unix_ms,
            reference: None,
        };
        // The kept record and the broadcast are the same JSON text.
        let json: Box<RawValue> = match serde_json::value::to_raw_value(&event) {
            Ok(json) => json,
            Err(_) => return,
        };
        let shared = protocol::text_frame(json.get());
        let own = reference.map(|r| {
            protocol::encode_frame(&protocol::Message {
                reference: Some(r),
                ..event
            })
        });
        let kept = Kept {
            id,
            json: Rc::from(json),
        };
        if let Err(e) = self.history.append(&room, kept) {
            self.counters.unkept += 1;
            if self.settings.refuse_unkept {
                let text = format!("message not sent: it could not be stored ({e})");
                return self.error(key, ErrorCode::HistoryUnavailable, &text, reference, out);
            }
            log::warn!("room {room}: message {id} delivered but not stored: {e}");
        }
        self.counters.messages += 1;
        if self.settings.refuse_unkept {
            self.uncommitted.push(Uncommitted {
                sender: key,
                room: room.clone(),
                reference: reference.map(Into::into),
                frames: [Some(shared.clone()), own.clone()],
            });
        }
        let Some(r) = self.tables.room(&room) else {
            return;
        };
        self.counters.deliveries += r.members.len() as u64;
        for &to in &r.members {
            let frame = match (&own, to == key) {
                (Some(own), true) => own.clone(),
                _ => shared.clone(),
            };
            out.to(to, frame);
        }
    }

    fn join(
        &mut self,
        key: ConnKey,
        room: &str,
        since: Option<u64>,
        reference: Option<&str>,
        out: &mut Effects,
    ) {
        let max_rooms = self.settings.limits.max_rooms_per_user;
        let joined = self.tables.join(key, room, max_rooms);
        if joined == Joined::TooMany {
            let text = format!(
                "you are in {} already; leave one first",
                counted(max_rooms, "room", "rooms")
            );
            return self.error(key, ErrorCode::TooManyRooms, &text, reference, out);
        }
        if self.shared.is_some() {
            return self.enter_shared(key, room, since, reference, out);
        }
        self.commit_before_reading(room, out);
        // One more than the cap is asked for, to know whether there is more.
        let (backlog, failure) = match since {
            Some(since) => self
                .history
                .after(room, since, self.settings.resume_max + 1),
            None => self.history.last(room, self.settings.limits.history_limit),
        }
        .map_or_else(|e| (Vec::new(), Some(e)), |b| (b, None));
        let (history, more) = self.fit_backlog(&backlog, since);
        let (users, total) = self.tables.names_in_capped(room, MAX_USERS_LISTED);
        out.to(
            key,
            joined_frame(room, &users, total, &history, more, reference),
        );
        if let Some(e) = failure {
            let text = format!("history of {room} is unavailable: {e}");
            self.error(key, ErrorCode::HistoryUnavailable, &text, reference, out);
        }
        if joined == Joined::New {
            if let Some(name) = self.tables.member(key).map(|m| m.name.clone()) {
                self.presence(room, "join", &name, out);
            }
        }
    }

    fn leave(&mut self, key: ConnKey, room: &str, reference: Option<&str>, out: &mut Effects) {
        if !rooms::valid_name(room) {
            return self.bad_room(key, reference, out);
        }
        let Some(emptied) = self.tables.leave(key, room) else {
            let text = format!("you are not in room {room}");
            return self.error(key, ErrorCode::NotMember, &text, reference, out);
        };
        let content = format!("left {room}");
        out.to(
            key,
            protocol::encode_frame(&protocol::Left {
                kind: "left",
                content: &content,
                room,
                reference,
            }),
        );
        if self.shared.is_some() {
            let room: Rc<str> = Rc::from(room);
            if let Some(name) = self.tables.member(key).map(|m| m.name.clone()) {
                self.part_shared(key, &room, &name);
            }
            return;
        }
        if emptied {
            self.history.release(room);
        } else if let Some(name) = self.tables.member(key).map(|m| m.name.clone()) {
            self.presence(room, "leave", &name, out);
        }
    }

    fn direct(
        &mut self,
        key: ConnKey,
        to: &str,
        content: &str,
        reference: Option<&str>,
        now: Clock,
        out: &mut Effects,
    ) {
        if !self.content_fits(key, content, reference, out) {
            return;
        }
        if self.shared.is_some() {
            return self.direct_shared(key, to, content, reference, now.unix_ms, out);
        }
        let recipient = self
            .tables
            .by_name(to)
            .filter(|&k| self.tables.member(k).is_some_and(|m| m.open));
        let (Some(recipient), Some(from)) = (recipient, self.tables.member(key)) else {
            let text = format!("no connected user is called {:?}", clip(to));
            return self.error(key, ErrorCode::UnknownUser, &text, reference, out);
        };
        let event = protocol::Direct {
            kind: "direct",
            content,
            from: &from.name,
            to,
            ts: now.unix_ms,
            reference: None,
        };
        if recipient != key {
            out.to(recipient, protocol::encode_frame(&event));
        }
        out.to(
            key,
            protocol::encode_frame(&protocol::Direct { reference, ..event }),
        );
        self.counters.directs += 1;
    }

    fn list_rooms(&mut self, key: ConnKey, reference: Option<&str>, out: &mut Effects) {
        if self.shared.is_some() {
            return self.rooms_shared(key, reference, out);
        }
        // The listing depends only on the tables: reuse it until a
        // membership changes, so that clients polling `rooms` on a server
        // with many rooms cost a lookup, not a walk over every room.
        let version = self.tables.version();
        if self.rooms_listing.as_ref().map(|l| l.version) != Some(version) {
            self.rooms_listing = Some(self.build_listing(version));
        }
        let Some(listing) = &self.rooms_listing else {
            return;
        };
        let frame = match reference {
            None => listing.frame.clone(),
            Some(_) => {
                let rooms: Vec<protocol::RoomCount> = listing
                    .rooms
                    .iter()
                    .map(|(room, users)| protocol::RoomCount {
                        room,
                        users: *users,
                    })
                    .collect();
                protocol::encode_frame(&protocol::Rooms {
                    kind: "rooms",
                    content: &listing.content,
                    rooms: &rooms,
                    reference,
                })
            }
        };
        out.to(key, frame);
    }

    /// The busiest [`MAX_ROOMS_LISTED`] rooms (ties by name), read from the
    /// front of the tables' ranking: the cost is the listing's, whatever
    /// the number of rooms.
    fn build_listing(&self, version: u64) -> RoomsListing {
        let all: Vec<(Rc<str>, usize)> = self
            .tables
            .busiest()
            .take(MAX_ROOMS_LISTED)
            .map(|(name, n)| (name.clone(), n))
            .collect();
        let total = self.tables.room_count();
        let content = if total > all.len() {
            format!("{} of {}", all.len(), counted(total, "room", "rooms"))
        } else {
            counted(total, "room", "rooms")
        };
        let counts: Vec<protocol::RoomCount> = all
            .iter()
            .map(|(room, users)| protocol::RoomCount {
                room,
                users: *users,
            })
            .collect();
        let frame = protocol::encode_frame(&protocol::Rooms {
            kind: "rooms",
            content: &content,
            rooms: &counts,
            reference: None,
        });
        RoomsListing {
            version,
            rooms: all,
            content,
            frame,
        }
    }

    fn who(&mut self, key: ConnKey, room: &str, reference: Option<&str>, out: &mut Effects) {
        if !rooms::valid_name(room) {
            return self.bad_room(key, reference, out);
        }
        if self.shared.is_some() {
            return self.who_shared(key, room, reference, out);
        }
        let (users, total) = self.tables.names_in_capped(room, MAX_USERS_LISTED);
        let content = if total > users.len() {
            format!("{total} in {room} ({} listed)", users.len())
        } else {
            format!("{total} in {room}")
        };
        let frame = protocol::encode_frame(&protocol::Members {
            kind: "members",
            content: &content,
            room,
            users: &users,
            reference,
        });
        out.to(key, frame);
    }

    fn page(
        &mut self,
        key: ConnKey,
        room: &str,
        before: Option<u64>,
        limit: Option<u64>,
        reference: Option<&str>,
        out: &mut Effects,
    ) {
        if !rooms::valid_name(room) {
            return self.bad_room(key, reference, out);
        }
        let limit = limit
            .map_or(self.settings.limits.history_limit as u64, |l| l)
            .min(MAX_HISTORY_PAGE as u64) as usize;
        if self.shared.is_some() {
            return self.page_shared(key, room, before, limit, reference, out);
        }
        self.commit_before_reading(room, out);
        let kept = match self.history.before(room, before, limit) {
            Ok(kept) => kept,
            Err(e) => {
                let text = format!("history of {room} is unavailable: {e}");
                return self.error(key, ErrorCode::HistoryUnavailable, &text, reference, out);
            }
        };
        // Within the reply budget, keep the newest: the client pages on
        // with `before` = the oldest id it got.
        let messages = fit_newest(&kept, self.settings.reply_bytes);
        if self.tables.room(room).is_none() {
            // Nobody is in the room: do not keep its tail cached for a
            // reader passing through.
            self.history.release(room);
        }
        let content = format!(
            "{} of {room}",
            counted(messages.len(), "message", "messages")
        );
        let frame = protocol::encode_frame(&protocol::HistoryPage {
            kind: "history",
            content: &content,
            room,
            messages: &messages,
            reference,
        });
        out.to(key, frame);
    }

    // ---- helpers --------------------------------------------------------

    /// False (after telling the sender) when `content` is empty or only
    /// whitespace, or over `max_content_bytes`.
    fn content_fits(
        &mut self,
        key: ConnKey,
        content: &str,
        reference: Option<&str>,
        out: &mut Effects,
    ) -> bool {
        // Checked before any id is reserved: an empty message is neither
        // stored nor numbered.
        if content.trim().is_empty() {
            let text = "content is empty; send some text that is not only whitespace";
            self.error(key, ErrorCode::Empty, text, reference, out);
            return false;
        }
        let max = self.settings.limits.max_content_bytes;
        if content.len() <= max {
            return true;
        }
        let text = format!(
            "content is {}; at most {max} are allowed",
            counted(content.len(), "byte", "bytes")
        );
        self.error(key, ErrorCode::TooLong, &text, reference, out);
        false
    }

    /// Tell every member of `room` that `user` joined or left.
    fn presence(&mut self, room: &str, kind: &'static str, user: &str, out: &mut Effects) {
        let Some(r) = self.tables.room(room) else {
            return;
        };
        let content = format!("{user} {}", if kind == "join" { "joined" } else { "left" });
        let frame = protocol::encode_frame(&protocol::Presence {
            kind,
            content: &content,
            room,
            user,
        });
        for &to in &r.members {
            out.to(to, frame.clone());
        }
    }

    fn bad_room(&mut self, key: ConnKey, reference: Option<&str>, out: &mut Effects) {
        let text = format!("room names are {}", rooms::NAME_RULE);
        self.error(key, ErrorCode::BadRoom, &text, reference, out);
    }

    fn error(
        &mut self,
        key: ConnKey,
        code: ErrorCode,
        text: &str,
        reference: Option<&str>,
        out: &mut Effects,
    ) {
        self.counters.errors += 1;
        out.to(
            key,
            protocol::encode_frame(&protocol::ErrorEvent {
                kind: "error",
                content: text,
                code: code.as_str(),
                reference,
            }),
        );
    }
}

/// The oldest messages of `list` whose JSON fits in `budget` bytes.
impl Dispatcher {
    /// What of a `joined` backlog fits in one answer (half the outbox
    /// bound, `Settings::reply_bytes`), and whether some was left out. A
    /// resume (`since`) keeps the oldest: the client continues from the
    /// last id it got, so nothing is skipped. A plain backlog keeps the
    /// newest: older ones are a `history` away. Shared by the local and
    /// the cluster join.
    pub(crate) fn fit_backlog<'a>(
        &self,
        backlog: &'a [Kept],
        since: Option<u64>,
    ) -> (Vec<&'a RawValue>, bool) {
        let budget = self.settings.reply_bytes;
        match since {
            Some(_) => {
                let mut list = fit_oldest(backlog, budget);
                let more = list.len() < backlog.len();
                list.truncate(self.settings.resume_max);
                (list, more)
            }
            None => {
                let list = fit_newest(backlog, budget);
                let more = list.len() < backlog.len();
                (list, more)
            }
        }
    }
}

/// The `joined` answer: `users` is the (capped) member list out of
/// `total`, `history` what of the backlog fits. Shared by the local and the
/// cluster join.
pub(crate) fn joined_frame(
    room: &str,
    users: &[&str],
    total: usize,
    history: &[&RawValue],
    more: bool,
    reference: Option<&str>,
) -> Frame {
    let content = if total > users.len() {
        format!("joined {room} ({} of {total} members listed)", users.len())
    } else {
        format!("joined {room}")
    };
    protocol::encode_frame(&protocol::Joined {
        kind: "joined",
        content: &content,
        room,
        users,
        history,
        more,
        reference,
    })
}

fn fit_oldest(list: &[Kept], budget: usize) -> Vec<&RawValue> {
    let mut used = 0;
    list.iter()
        .map(|k| &*k.json)
        .take_while(|j| {
            used += j.get().len() + 1;
            used <= budget
        })
        .collect()
}

/// The newest messages of `list` whose JSON fits in `budget` bytes, oldest
/// first.
fn fit_newest(list: &[Kept], budget: usize) -> Vec<&RawValue> {
    let mut used = 0;
    let keep = list
        .iter()
        .rev()
        .take_while(|k| {
            used += k.json.get().len() + 1;
            used <= budget
        })
        .count();
    list[list.len() - keep..].iter().map(|k| &*k.json).collect()
}

/// A client-chosen name cut short enough to quote in an error.
/// `n` and the noun that goes with it: "1 room", "2 rooms", "0 rooms".
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryHistory;
    use serde_json::Value;

    const NOW: Clock = Clock {
        mono_ms: 0,
        unix_ms: 1_700_000_000_000,
    };

    fn settings() -> Settings {
        Settings {
            limits: Limits {
                max_message_bytes: 65536,
                max_content_bytes: 16,
                max_rooms_per_user: 3,
                rate_per_s: 20,
                rate_burst: 40,
                history_limit: 50,
            },
            resume_max: 1000,
            refuse_unkept: false,
            reply_bytes: 4096,
        }
    }

    /// A dispatcher and the events it produced, decoded for assertions.
    struct Harness {
        d: Dispatcher,
        out: Effects,
    }

    impl Harness {
        fn new() -> Self {
            Harness {
                d: Dispatcher::new(settings(), Box::new(MemoryHistory::new(100))),
                out: Effects::default(),
            }
        }

        fn connect(&mut self, key: ConnKey, name: &str, room: &str) -> Vec<(ConnKey, Value)> {
            let req = SessionRequest {
                username: Some(name.into()),
                room: Some(room.into()),
            };
            self.d.admit(key, &req, NOW).expect("admitted");
            self.d.open(key, None, &mut self.out);
            self.take()
        }

        fn send(&mut self, key: ConnKey, text: &str) -> Vec<(ConnKey, Value)> {
            self.d.handle_text(key, text, NOW, &mut self.out);
            self.take()
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
    }

    fn types(events: &[(ConnKey, Value)]) -> Vec<(ConnKey, String)> {
        events
            .iter()
            .map(|(k, v)| (*k, v["type"].as_str().unwrap_or("").to_string()))
            .collect()
    }

    fn error_code(events: &[(ConnKey, Value)]) -> String {
        assert_eq!(events.len(), 1, "one error expected: {events:?}");
        assert_eq!(events[0].1["type"], "error");
        events[0].1["code"].as_str().unwrap().to_string()
    }

    #[test]
    fn open_sends_welcome_joined_join() {
        let mut h = Harness::new();
        let ev = h.connect(0, "alice", "default");
        assert_eq!(
            types(&ev),
            vec![
                (0, "welcome".into()),
                (0, "joined".into()),
                (0, "join".into())
            ]
        );
        assert_eq!(ev[0].1["user"], "alice");
        assert_eq!(ev[0].1["limits"]["max_content_bytes"], 16);
        assert_eq!(ev[1].1["users"], serde_json::json!(["alice"]));
        assert_eq!(ev[2].1["content"], "alice joined");
        let ev = h.connect(1, "bob", "default");
        assert_eq!(
            types(&ev),
            vec![
                (1, "welcome".into()),
                (1, "joined".into()),
                (0, "join".into()),
                (1, "join".into())
            ]
        );
    }

    #[test]
    fn admission_checks_names() {
        let mut h = Harness::new();
        h.connect(0, "alice", "default");
        let req = |u: Option<&str>, r: Option<&str>| SessionRequest {
            username: u.map(Into::into),
            room: r.map(Into::into),
        };
        assert_eq!(
            h.d.admit(1, &req(Some("alice"), None), NOW),
            Err(Refusal::Taken)
        );
        assert_eq!(
            h.d.admit(1, &req(Some("a b"), None), NOW),
            Err(Refusal::BadUsername)
        );
        assert_eq!(
            h.d.admit(1, &req(None, Some("../x")), NOW),
            Err(Refusal::BadRoom)
        );
        let g1 = h.d.admit(1, &req(None, None), NOW).unwrap();
        let g2 = h.d.admit(2, &req(None, None), NOW).unwrap();
        assert!(g1.starts_with("guest-") && g2.starts_with("guest-") && g1 != g2);
    }

    #[test]
    fn message_reaches_the_room_with_ids() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        h.connect(1, "bob", "r");
        h.connect(2, "carol", "other");
        let ev = h.send(0, r#"{"type":"message","content":"hi","ref":"c1"}"#);
        assert_eq!(
            types(&ev),
            vec![(0, "message".into()), (1, "message".into())]
        );
        assert_eq!(ev[0].1["ref"], "c1");
        assert!(ev[1].1.get("ref").is_none());
        assert_eq!(ev[1].1["id"], 1);
        assert_eq!(ev[1].1["user"], "alice");
        assert_eq!(ev[1].1["room"], "r");
        assert_eq!(ev[1].1["ts"], NOW.unix_ms);
        let ev = h.send(1, r#"{"type":"message","content":"yo","room":"r"}"#);
        assert_eq!(ev[0].1["id"], 2);
    }

    #[test]
    fn message_errors() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        let long = format!(
            r#"{{"type":"message","content":"{}","ref":"x"}}"#,
            "a".repeat(17)
        );
        let ev = h.send(0, &long);
        assert_eq!(error_code(&ev), "too_long");
        assert_eq!(ev[0].1["ref"], "x");
        let ev = h.send(0, r#"{"type":"message","content":"hi","room":"elsewhere"}"#);
        assert_eq!(error_code(&ev), "not_member");
        let ev = h.send(0, r#"{"type":"message","content":"hi","room":"no/slash"}"#);
        assert_eq!(error_code(&ev), "bad_room");
        assert_eq!(error_code(&h.send(0, "plain text")), "bad_json");
        assert_eq!(error_code(&h.send(0, r#"{"type":"x"}"#)), "unknown_type");
        assert_eq!(
            error_code(&h.send(0, r#"{"content":"x"}"#)),
            "missing_field"
        );
    }

    #[test]
    fn join_leave_and_history() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        for i in 0..3 {
            h.send(0, &format!(r#"{{"type":"message","content":"m{i}"}}"#));
        }
        h.connect(1, "bob", "home");
        let ev = h.send(1, r#"{"type":"join","room":"r","ref":"j"}"#);
        assert_eq!(
            types(&ev),
            vec![(1, "joined".into()), (0, "join".into()), (1, "join".into())]
        );
        assert_eq!(ev[0].1["users"], serde_json::json!(["alice", "bob"]));
        assert_eq!(ev[0].1["history"].as_array().unwrap().len(), 3);
        assert_eq!(ev[0].1["history"][0]["content"], "m0");
        assert_eq!(ev[0].1["ref"], "j");
        let ev = h.send(1, r#"{"type":"leave","room":"r"}"#);
        assert_eq!(types(&ev), vec![(1, "left".into()), (0, "leave".into())]);
        assert_eq!(ev[1].1["content"], "bob left");
        assert_eq!(
            error_code(&h.send(1, r#"{"type":"leave","room":"r"}"#)),
            "not_member"
        );
        assert_eq!(
            error_code(&h.send(1, r#"{"type":"join","room":"a b"}"#)),
            "bad_room"
        );
        assert_eq!(
            error_code(&h.send(1, r#"{"type":"join"}"#)),
            "missing_field"
        );
    }

    #[test]
    fn join_with_since_replays_exactly_the_newer() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        for i in 0..5 {
            h.send(0, &format!(r#"{{"type":"message","content":"m{i}"}}"#));
        }
        h.connect(1, "bob", "home");
        let ev = h.send(1, r#"{"type":"join","room":"r","since":3}"#);
        let ids: Vec<u64> = ev[0].1["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![4, 5]);
    }

    #[test]
    fn answers_fit_the_reply_budget() {
        let mut roomy = settings();
        roomy.limits.rate_burst = 1000;
        let mut h = Harness {
            d: Dispatcher::new(roomy, Box::new(MemoryHistory::new(1000))),
            out: Effects::default(),
        };
        h.connect(0, "alice", "r");
        // Each kept message is ~110 bytes of JSON; 4096 bytes hold ~36.
        for i in 0..100 {
            h.send(0, &format!(r#"{{"type":"message","content":"m{i:03}"}}"#));
        }
        h.connect(1, "bob", "home");
        let ev = h.send(1, r#"{"type":"join","room":"r","since":10}"#);
        let ids: Vec<u64> = ev[0].1["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        assert!(ids.len() > 10 && ids.len() < 90, "{}", ids.len());
        assert_eq!(ids[0], 11, "a resume keeps the oldest");
        assert_eq!(ev[0].1["more"], true);
        // Joining again from the last id continues without a gap.
        let last = *ids.last().unwrap();
        let ev = h.send(
            1,
            &format!(r#"{{"type":"join","room":"r","since":{last}}}"#),
        );
        assert_eq!(ev[0].1["history"][0]["id"], last + 1);
        // A history page keeps the newest within the budget.
        let ev = h.send(1, r#"{"type":"history","room":"r","limit":500}"#);
        let page = ev[0].1["messages"].as_array().unwrap();
        assert!(page.len() < 100);
        assert_eq!(page.last().unwrap()["id"], 100);
        // A small backlog has no `more`.
        let ev = h.send(1, r#"{"type":"join","room":"r","since":95}"#);
        assert!(ev[0].1.get("more").is_none());
    }

    #[test]
    fn too_many_rooms() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r0");
        h.send(0, r#"{"type":"join","room":"r1"}"#);
        h.send(0, r#"{"type":"join","room":"r2"}"#);
        assert_eq!(
            error_code(&h.send(0, r#"{"type":"join","room":"r3"}"#)),
            "too_many_rooms"
        );
    }

    #[test]
    fn direct_messages() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        h.connect(1, "bob", "s");
        let ev = h.send(
            0,
            r#"{"type":"direct","to":"bob","content":"psst","ref":"d1"}"#,
        );
        assert_eq!(types(&ev), vec![(1, "direct".into()), (0, "direct".into())]);
        assert_eq!(ev[0].1["from"], "alice");
        assert_eq!(ev[0].1["to"], "bob");
        assert!(ev[0].1.get("ref").is_none());
        assert_eq!(ev[1].1["ref"], "d1");
        let ev = h.send(0, r#"{"type":"direct","to":"nobody","content":"x"}"#);
        assert_eq!(error_code(&ev), "unknown_user");
        let long = format!(
            r#"{{"type":"direct","to":"bob","content":"{}"}}"#,
            "a".repeat(17)
        );
        assert_eq!(error_code(&h.send(0, &long)), "too_long");
    }

    #[test]
    fn empty_content_is_refused_unstored_and_unnumbered() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        h.connect(1, "bob", "r");
        for content in ["", " ", "\n\t", "\u{a0}\u{3000}\u{2028}"] {
            let msg = serde_json::json!({"type":"message","content":content,"ref":"e1"});
            let ev = h.send(0, &msg.to_string());
            assert_eq!(types(&ev), vec![(0, "error".into())], "{content:?}");
            assert_eq!(ev[0].1["code"], "empty");
            assert_eq!(ev[0].1["ref"], "e1");
            let dm = serde_json::json!({"type":"direct","to":"bob","content":content,"ref":"e2"});
            let ev = h.send(0, &dm.to_string());
            assert_eq!(types(&ev), vec![(0, "error".into())], "{content:?}");
            assert_eq!(ev[0].1["code"], "empty");
            assert_eq!(ev[0].1["ref"], "e2");
        }
        // No id was used up, nothing was kept.
        let ev = h.send(0, r#"{"type":"message","content":" x "}"#);
        assert_eq!(ev[0].1["id"], 1);
        let ev = h.send(0, r#"{"type":"history","room":"r"}"#);
        assert_eq!(ev[0].1["messages"].as_array().map(Vec::len), Some(1));
        assert_eq!(ev[0].1["content"], "1 message of r");
    }

    #[test]
    fn counts_are_worded_right() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        assert_eq!(h.send(0, r#"{"type":"rooms"}"#)[0].1["content"], "1 room");
        h.connect(1, "bob", "s");
        assert_eq!(h.send(0, r#"{"type":"rooms"}"#)[0].1["content"], "2 rooms");
        let ev = h.send(0, r#"{"type":"history","room":"r"}"#);
        assert_eq!(ev[0].1["content"], "0 messages of r");
        h.send(0, r#"{"type":"message","content":"a"}"#);
        h.send(0, r#"{"type":"message","content":"b"}"#);
        let ev = h.send(0, r#"{"type":"history","room":"r"}"#);
        assert_eq!(ev[0].1["content"], "2 messages of r");
    }

    #[test]
    fn listings() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        h.connect(1, "bob", "r");
        h.connect(2, "carol", "s");
        let ev = h.send(2, r#"{"type":"rooms","ref":"q"}"#);
        assert_eq!(
            ev[0].1["rooms"],
            serde_json::json!([{"room":"r","users":2},{"room":"s","users":1}])
        );
        assert_eq!(ev[0].1["ref"], "q");
        // The cached listing follows membership changes.
        h.send(2, r#"{"type":"join","room":"r"}"#);
        let ev = h.send(2, r#"{"type":"rooms"}"#);
        assert_eq!(
            ev[0].1["rooms"],
            serde_json::json!([{"room":"r","users":3},{"room":"s","users":1}])
        );
        assert!(ev[0].1.get("ref").is_none());
        let ev = h.send(2, r#"{"type":"who","room":"r"}"#);
        assert_eq!(ev[0].1["type"], "members");
        assert_eq!(
            ev[0].1["users"],
            serde_json::json!(["alice", "bob", "carol"])
        );
        assert_eq!(
            error_code(&h.send(2, r#"{"type":"who","room":""}"#)),
            "bad_room"
        );
    }

    #[test]
    fn history_pages_back() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        for i in 0..10 {
            h.send(0, &format!(r#"{{"type":"message","content":"m{i}"}}"#));
        }
        let ev = h.send(0, r#"{"type":"history","room":"r","before":8,"limit":3}"#);
        let ids: Vec<u64> = ev[0].1["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, vec![5, 6, 7]);
        let ev = h.send(0, r#"{"type":"history","room":"r","before":1}"#);
        assert_eq!(ev[0].1["messages"], serde_json::json!([]));
        let ev = h.send(0, r#"{"type":"history","room":"r","limit":100000}"#);
        assert_eq!(ev[0].1["messages"].as_array().unwrap().len(), 10);
    }

    #[test]
    fn binary_is_refused() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        h.d.handle_binary(0, NOW, &mut h.out);
        assert_eq!(error_code(&h.take()), "binary_unsupported");
    }

    #[test]
    fn rate_limit_then_flood_close() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        for _ in 0..40 {
            h.send(0, r#"{"type":"rooms"}"#);
        }
        assert_eq!(
            error_code(&h.send(0, r#"{"type":"rooms"}"#)),
            "rate_limited"
        );
        for _ in 0..39 {
            h.send(0, r#"{"type":"rooms"}"#);
        }
        assert!(h.out.closes.is_empty());
        h.send(0, r#"{"type":"rooms"}"#);
        assert_eq!(
            h.out.closes,
            vec![CloseRequest {
                key: 0,
                code: 1008,
                reason: "flooding after rate_limited"
            }]
        );
        assert_eq!(h.d.counters.rate_limited, 40);
        // The close is requested once; later frames of the batch are ignored.
        assert!(h.send(0, r#"{"type":"rooms"}"#).is_empty());
        assert_eq!(h.out.closes.len(), 1);
        assert_eq!(h.d.counters.floods, 1);
    }

    #[test]
    fn rate_limited_keeps_the_ref() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        for _ in 0..40 {
            h.send(0, r#"{"type":"rooms"}"#);
        }
        let ev = h.send(0, r#"{"type":"rooms","ref":"q9"}"#);
        assert_eq!(error_code(&ev), "rate_limited");
        assert_eq!(ev[0].1["ref"], "q9");
    }

    #[test]
    fn disconnect_tells_every_room_and_frees_the_name() {
        let mut h = Harness::new();
        h.connect(0, "alice", "r");
        h.send(0, r#"{"type":"join","room":"s"}"#);
        h.send(0, r#"{"type":"message","content":"first"}"#);
        h.connect(1, "bob", "r");
        h.send(1, r#"{"type":"join","room":"s"}"#);
        h.d.disconnect(0, &mut h.out);
        let ev = h.take();
        assert_eq!(types(&ev), vec![(1, "leave".into()), (1, "leave".into())]);
        assert!(h.d.tables().by_name("alice").is_none());
        h.d.disconnect(1, &mut h.out);
        assert!(h.take().is_empty());
        assert_eq!(h.d.tables().room_count(), 0);
        assert_eq!(h.d.tables().member_count(), 0);
        // Ids continue after the room emptied and came back.
        h.connect(2, "carol", "r");
        let ev = h.send(2, r#"{"type":"message","content":"again"}"#);
        assert_eq!(ev[0].1["id"], 2);
    }

    #[test]
    fn a_member_not_yet_open_gets_nothing() {
        let mut h = Harness::new();
        h.connect(0, "alice", "default");
        let req = SessionRequest {
            username: Some("bob".into()),
            room: None,
        };
        h.d.admit(1, &req, NOW).unwrap();
        h.d.disconnect(1, &mut h.out);
        assert!(
            h.take().is_empty(),
            "no leave for a member that never joined"
        );
    }

    /// A memory history that fails where told to: appends, the group
    /// commit, or reads of older pages.
    #[derive(Default)]
    struct Faulty {
        inner: Option<MemoryHistory>,
        fail_append: bool,
        fail_commit: bool,
        fail_before: bool,
    }

    type Res<T> = Result<T, crate::store::HistoryError>;

    impl Faulty {
        fn inner(&mut self) -> &mut MemoryHistory {
            self.inner.get_or_insert_with(|| MemoryHistory::new(10))
        }
        fn fail<T>(what: &str) -> Res<T> {
            Err(std::io::Error::other(what.to_string()).into())
        }
    }

    impl History for Faulty {
        fn reserve_id(&mut self, room: &str) -> Res<u64> {
            self.inner().reserve_id(room)
        }
        fn append(&mut self, room: &str, m: Kept) -> Res<()> {
            if self.fail_append {
                return Self::fail("disk full");
            }
            self.inner().append(room, m)
        }
        fn last(&mut self, room: &str, n: usize) -> Res<Vec<Kept>> {
            self.inner().last(room, n)
        }
        fn after(&mut self, room: &str, since: u64, n: usize) -> Res<Vec<Kept>> {
            self.inner().after(room, since, n)
        }
        fn before(&mut self, room: &str, before: Option<u64>, n: usize) -> Res<Vec<Kept>> {
            if self.fail_before {
                return Self::fail("unreadable");
            }
            self.inner().before(room, before, n)
        }
        fn release(&mut self, room: &str) {
            self.inner().release(room)
        }
        fn commit(&mut self) -> Res<()> {
            if self.fail_commit {
                return Self::fail("fdatasync failed");
            }
            Ok(())
        }
    }

    /// `--fsync always` over a store whose group commit fails.
    fn strict_with_failing_commit() -> Harness {
        let mut strict = settings();
        strict.refuse_unkept = true;
        let history = Faulty {
            fail_commit: true,
            ..Faulty::default()
        };
        Harness {
            d: Dispatcher::new(strict, Box::new(history)),
            out: Effects::default(),
        }
    }

    #[test]
    fn a_failed_commit_takes_the_messages_back() {
        let mut h = strict_with_failing_commit();
        h.connect(0, "alice", "r");
        h.connect(1, "bob", "r");
        h.d.handle_text(
            0,
            r#"{"type":"message","content":"lost","ref":"m1"}"#,
            NOW,
            &mut h.out,
        );
        h.d.handle_text(1, r#"{"type":"rooms"}"#, NOW, &mut h.out);
        assert_eq!(
            h.out.sends.len(),
            3,
            "two message copies and a rooms answer"
        );
        h.d.commit(&mut h.out);
        let ev = h.take();
        assert_eq!(types(&ev), vec![(1, "rooms".into()), (0, "error".into())]);
        assert_eq!(ev[1].1["code"], "history_unavailable");
        assert_eq!(ev[1].1["ref"], "m1");
        assert_eq!(h.d.counters.messages, 0);
    }

    #[test]
    fn reading_a_room_commits_its_pending_messages_first() {
        let mut h = strict_with_failing_commit();
        h.connect(0, "alice", "r");
        // A message and a history read in one batch: the read commits
        // first, so the refusal comes before the answer.
        h.d.handle_text(
            0,
            r#"{"type":"message","content":"x","ref":"m"}"#,
            NOW,
            &mut h.out,
        );
        h.d.handle_text(0, r#"{"type":"history","room":"r"}"#, NOW, &mut h.out);
        let ev = h.take();
        assert_eq!(types(&ev), vec![(0, "error".into()), (0, "history".into())]);
        assert_eq!(ev[0].1["ref"], "m");
        assert_eq!(h.d.counters.messages, 0);
    }

    #[test]
    fn store_failures_follow_the_durability_setting() {
        let mut strict = settings();
        strict.refuse_unkept = true;
        for (settings, refused) in [(settings(), false), (strict, true)] {
            let mut h = Harness {
                d: Dispatcher::new(
                    settings,
                    Box::new(Faulty {
                        fail_append: true,
                        fail_before: true,
                        ..Faulty::default()
                    }),
                ),
                out: Effects::default(),
            };
            h.connect(0, "alice", "r");
            let ev = h.send(0, r#"{"type":"message","content":"hi","ref":"m"}"#);
            if refused {
                assert_eq!(error_code(&ev), "history_unavailable");
                assert_eq!(ev[0].1["ref"], "m");
            } else {
                assert_eq!(types(&ev), vec![(0, "message".into())]);
            }
            assert_eq!(h.d.counters.unkept, 1);
            let ev = h.send(0, r#"{"type":"history","room":"r"}"#);
            assert_eq!(error_code(&ev), "history_unavailable");
        }
    }
}
