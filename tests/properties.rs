//! Property tests for the pure parts of loopchat, where a property is easy
//! to state: outbox byte accounting and the slow-consumer rule, timers and
//! their generations, token buckets, the name rule, and history paging.
//!
//! Each property is checked on generated cases (proptest, 256 by default;
//! `PROPTEST_CASES` changes that) against a plain model: a byte vector, a
//! list of deadlines, a count of allowed commands, a character class, a
//! vector of ids. A failing case is shrunk and printed; proptest also keeps
//! it in `tests/properties.proptest-regressions` so it is replayed first
//! from then on (commit that file when it appears).

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::rc::Rc;

use loopchat::dispatch::{Clock, Dispatcher, Effects, Refusal, SessionRequest, Settings};
use loopchat::outbox::{Flushed, Outbox};
use loopchat::protocol::Frame;
use loopchat::protocol::{self, Limits};
use loopchat::rate::{Bucket, Rate, Verdict};
use loopchat::rooms::{self, ConnKey};
use loopchat::store::memory::MemoryHistory;
use loopchat::store::{History, Kept};
use loopchat::timers::{Kind, Timers, RESOLUTION_MS};
use proptest::prelude::*;
use serde_json::value::RawValue;

// ---- outbox -------------------------------------------------------------

/// A socket that takes at most `room` bytes per flush, then says
/// `WouldBlock`, and keeps everything it took.
struct Socket {
    got: Vec<u8>,
    room: usize,
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(self.room);
            self.got.extend_from_slice(&b[..take]);
            self.room -= take;
            n += take;
            if self.room == 0 {
                break;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum OutboxOp {
    Push(usize),
    Flush(usize),
    Discard,
}

fn outbox_op() -> impl Strategy<Value = OutboxOp> {
    prop_oneof![
        4 => (1usize..300).prop_map(OutboxOp::Push),
        3 => (0usize..700).prop_map(OutboxOp::Flush),
        1 => Just(OutboxOp::Discard),
    ]
}

/// Frame `n` of a run: its bytes say which frame and which offset they
/// are, so a reordered, repeated or dropped byte shows in the output.
fn numbered_frame(n: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (n * 31 + i) as u8).collect()
}

proptest! {
    /// `queued()` is always exactly the bytes pushed and neither written
    /// nor discarded; the socket receives the frames in order, each whole
    /// (a discard drops only frames not yet started, so the stream stays
    /// well-framed); a flush with room for everything empties the queue.
    #[test]
    fn outbox_accounts_for_every_byte(ops in prop::collection::vec(outbox_op(), 1..60)) {
        let mut outbox = Outbox::new();
        let mut socket = Socket { got: Vec::new(), room: 0 };
        // The model: frames not yet fully written, and how much of the
        // front one is.
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        let mut front_sent = 0;
        let mut expected: Vec<u8> = Vec::new();
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                OutboxOp::Push(len) => {
                    let frame = numbered_frame(n, len);
                    outbox.push(Frame::from_vec(frame.clone()));
                    model.push_back(frame);
                }
                OutboxOp::Flush(room) => {
                    let queued = outbox.queued();
                    // The peer read: a real socket reports WRITABLE, and
                    // only then does a stalled outbox write again.
                    socket.room = room;
                    outbox.socket_writable();
                    let before = socket.got.len();
                    let (written, flushed) = outbox.write_to(&mut socket).expect("in-memory socket");
                    prop_assert_eq!(written, socket.got.len() - before);
                    prop_assert_eq!(flushed == Flushed::All, room >= queued);
                    let mut left = written;
                    while left > 0 {
                        let front = model.front().expect("model has the written bytes");
                        let take = (front.len() - front_sent).min(left);
                        expected.extend_from_slice(&front[front_sent..front_sent + take]);
                        front_sent += take;
                        left -= take;
                        if front_sent == front.len() {
                            model.pop_front();
                            front_sent = 0;
                        }
                    }
                }
                OutboxOp::Discard => {
                    let queued = outbox.queued();
                    let keep = usize::from(front_sent > 0);
                    model.truncate(keep);
                    let released = outbox.discard_unstarted();
                    prop_assert_eq!(queued - released, outbox.queued());
                }
            }
            let model_queued: usize = model.iter().map(Vec::len).sum::<usize>() - front_sent;
            prop_assert_eq!(outbox.queued(), model_queued);
            prop_assert_eq!(outbox.is_empty(), model.is_empty());
            prop_assert_eq!(&socket.got, &expected);
        }
    }

    /// The slow-consumer rule as the server applies it (push only what
    /// `admits`, otherwise the reader is slow): an outbox never holds more
    /// than the bound, except one frame larger than the bound sent to an
    /// empty outbox; and a reader that drains everything between rounds is
    /// never called slow, whatever it is sent.
    #[test]
    fn slow_consumer_rule_bounds_the_queue(
        limit in 1usize..2000,
        rounds in prop::collection::vec(
            (prop::collection::vec(1usize..3000, 0..8), 0usize..4000), 1..30),
    ) {
        let mut slow = Outbox::new();
        let mut keeping_up = Outbox::new();
        let mut largest_alone = 0;
        for (frames, room) in rounds {
            for &len in &frames {
                let frame = Frame::from_vec(vec![b'x'; len]);
                if slow.admits(len, limit) {
                    if slow.is_empty() {
                        largest_alone = largest_alone.max(len);
                    }
                    slow.push(frame.clone());
                }
                prop_assert!(slow.queued() <= limit.max(largest_alone));
                // Never more than one round's frames: a reader that keeps
                // up. Each round's frames fit in the bound together.
                if frames.iter().sum::<usize>() <= limit {
                    prop_assert!(keeping_up.admits(len, limit), "a reader that keeps up was called slow");
                    keeping_up.push(frame);
                }
            }
            let mut socket = Socket { got: Vec::new(), room };
            slow.write_to(&mut socket).expect("in-memory socket");
            let mut drain = Socket { got: Vec::new(), room: usize::MAX };
            prop_assert_eq!(keeping_up.write_to(&mut drain).expect("in-memory socket").1, Flushed::All);
            prop_assert!(keeping_up.is_empty());
        }
    }
}

// ---- timers -------------------------------------------------------------

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Handshake),
        Just(Kind::Heartbeat),
        Just(Kind::Close)
    ]
}

proptest! {
    /// Due timers come out in deadline order, only when due, only for the
    /// generation that now holds the slot, each exactly once, one per
    /// connection (arming again replaces its deadline); deadlines are
    /// rounded up to the resolution (never early, less than one step late);
    /// a stale generation never fires, and everything armed is gone from
    /// the heap once the clock has passed it.
    #[test]
    fn timers_fire_in_order_and_never_stale(
        armed in prop::collection::vec((0u64..5000, 0usize..4, 0u64..3, kind()), 0..40),
        current in prop::collection::vec(prop::option::of(0u64..3), 4),
        sweeps in prop::collection::vec(0u64..600, 1..20),
    ) {
        let mut timers = Timers::new();
        for &(at, key, generation, kind) in &armed {
            timers.arm(at, key, generation, kind);
        }
        let generation_of = |key: ConnKey| current[key];
        let mut fired = Vec::new();
        let (mut now, mut last_at) = (0, 0);
        for step in sweeps.iter().chain([&10_000]) {
            now += step;
            while let Some(t) = timers.pop_due(now, generation_of) {
                prop_assert!(t.at_ms <= now, "fired before its deadline");
                prop_assert!(t.at_ms >= last_at, "fired out of order");
                prop_assert_eq!(current[t.key], Some(t.generation), "a stale timer fired");
                prop_assert_eq!(t.at_ms % RESOLUTION_MS, 0);
                last_at = t.at_ms;
                fired.push((t.at_ms, t.key, t.generation, t.kind));
            }
            if let Some(next) = timers.next_deadline() {
                prop_assert!(next > now, "a due timer was left in the heap");
            }
        }
        prop_assert!(timers.is_empty());
        // One deadline per connection: the last one armed for a key is the
        // one it has.
        let mut last_armed = std::collections::BTreeMap::new();
        for &(at, key, generation, kind) in &armed {
            last_armed.insert(key, (at, key, generation, kind));
        }
        let mut expected: Vec<_> = last_armed
            .values()
            .filter(|(_, key, generation, _)| current[*key] == Some(*generation))
            .map(|&(at, key, generation, kind)| {
                let rounded = at.div_ceil(RESOLUTION_MS) * RESOLUTION_MS;
                assert!(rounded >= at && rounded < at + RESOLUTION_MS);
                (rounded, key, generation, kind)
            })
            .collect();
        expected.sort();
        fired.sort();
        prop_assert_eq!(fired, expected);
    }
}

// ---- token buckets ------------------------------------------------------

fn rate() -> impl Strategy<Value = Rate> {
    (1u32..50, 1u32..50).prop_map(|(per_s, burst)| Rate { per_s, burst })
}

proptest! {
    /// However commands arrive, a bucket never allows more than its burst
    /// plus what the elapsed time refills.
    #[test]
    fn bucket_never_allows_more_than_burst_plus_refill(
        rate in rate(),
        gaps in prop::collection::vec(0u64..200, 1..300),
    ) {
        let mut bucket = Bucket::new(rate, 0);
        let (mut now, mut allowed) = (0u64, 0u64);
        for gap in gaps {
            now += gap;
            if bucket.take(rate, now) == Verdict::Allow {
                allowed += 1;
            }
            let refill = now * u64::from(rate.per_s) / 1000;
            prop_assert!(allowed <= u64::from(rate.burst) + refill,
                "{allowed} allowed by {now} ms at {rate:?}");
        }
    }

    /// A client that stays at or under the rate is always allowed.
    #[test]
    fn bucket_allows_a_client_within_the_rate(rate in rate(), n in 1usize..300, slack in 0u64..50) {
        let spacing = 1000u64.div_ceil(u64::from(rate.per_s)) + slack;
        let mut bucket = Bucket::new(rate, 0);
        for i in 0..n as u64 {
            prop_assert_eq!(bucket.take(rate, i * spacing), Verdict::Allow);
        }
    }

    /// Flooding is exactly "refused again after more than a burst of
    /// refusals in a row"; one allowed command forgives.
    #[test]
    fn flooding_follows_a_run_of_refusals(
        rate in rate(),
        gaps in prop::collection::vec(prop_oneof![3 => Just(0u64), 1 => 0u64..400], 1..300),
    ) {
        let mut bucket = Bucket::new(rate, 0);
        let (mut now, mut refused_in_a_row) = (0u64, 0u32);
        for gap in gaps {
            now += gap;
            let verdict = bucket.take(rate, now);
            if verdict == Verdict::Allow {
                refused_in_a_row = 0;
                continue;
            }
            refused_in_a_row += 1;
            let flooding = refused_in_a_row > rate.burst.max(1);
            prop_assert_eq!(verdict == Verdict::Flooding, flooding);
        }
    }

    /// A clock that goes backwards refills nothing: the bucket answers as
    /// if time had stood still.
    #[test]
    fn bucket_ignores_a_clock_going_backwards(
        rate in rate(),
        times in prop::collection::vec(0u64..5000, 1..200),
    ) {
        let mut raw = Bucket::new(rate, 0);
        let mut clamped = Bucket::new(rate, 0);
        let mut latest = 0;
        for t in times {
            latest = latest.max(t);
            prop_assert_eq!(raw.take(rate, t), clamped.take(rate, latest));
        }
    }
}

// ---- names --------------------------------------------------------------

/// The rule as the protocol states it, character by character.
fn follows_rule(s: &str) -> bool {
    let n = s.chars().count();
    (1..=32).contains(&n)
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn settings() -> Settings {
    Settings {
        limits: Limits {
            max_message_bytes: 65536,
            max_content_bytes: 4096,
            max_rooms_per_user: 32,
            rate_per_s: 1000,
            rate_burst: 1000,
            history_limit: 50,
        },
        resume_max: 100,
        refuse_unkept: false,
        reply_bytes: 128 * 1024,
    }
}

const NOW: Clock = Clock {
    mono_ms: 0,
    unix_ms: 1_700_000_000_000,
};

/// Any string, biased towards ones close to the rule: valid names, names
/// one character too long, names with one forbidden character.
fn name_candidate() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_.-]{1,32}",
        "[A-Za-z0-9_.-]{33,40}",
        (
            "[A-Za-z0-9_.-]{0,16}",
            any::<char>(),
            "[A-Za-z0-9_.-]{0,16}"
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
        ".{0,40}",
    ]
}

proptest! {
    /// `valid_name` accepts exactly 1–32 characters of `[A-Za-z0-9_.-]`.
    #[test]
    fn name_rule_is_the_documented_one(name in name_candidate()) {
        prop_assert_eq!(rooms::valid_name(&name), follows_rule(&name), "{:?}", name);
    }

    /// An upgrade's username and room, and a `join`'s room, are accepted
    /// iff they follow the rule.
    #[test]
    fn usernames_and_rooms_accepted_iff_they_follow_the_rule(
        username in name_candidate(),
        room in name_candidate(),
    ) {
        let mut d = Dispatcher::new(settings(), Box::new(MemoryHistory::new(10)));
        let mut out = Effects::default();
        let as_username = d.admit(0, &SessionRequest { username: Some(username.clone()), room: None }, NOW);
        prop_assert_eq!(as_username.is_ok(), follows_rule(&username));
        if as_username.is_err() {
            prop_assert_eq!(as_username.unwrap_err(), Refusal::BadUsername);
        }
        // A fresh dispatcher, so the room's test cannot trip on the name.
        let mut d = Dispatcher::new(settings(), Box::new(MemoryHistory::new(10)));
        let as_room = d.admit(1, &SessionRequest { username: None, room: Some(room.clone()) }, NOW);
        prop_assert_eq!(as_room.is_ok(), follows_rule(&room));
        if as_room.is_err() {
            prop_assert_eq!(as_room.unwrap_err(), Refusal::BadRoom);
            let home = SessionRequest { username: None, room: None };
            prop_assert!(d.admit(1, &home, NOW).is_ok());
        }
        d.open(1, None, &mut out);
        out.sends.clear();
        let join = serde_json::json!({"type": "join", "room": room}).to_string();
        d.handle_text(1, &join, NOW, &mut out);
        let first = out.sends.first().expect("an answer to join");
        let event: serde_json::Value =
            serde_json::from_slice(protocol::frame_payload(&first.1)).expect("JSON event");
        if follows_rule(&room) {
            prop_assert_eq!(&event["type"], "joined");
        } else {
            prop_assert_eq!(&event["code"], "bad_room");
        }
        prop_assert!(d.tables().check_consistency().is_ok());
    }
}

// ---- history paging -----------------------------------------------------

#[derive(Debug, Clone)]
enum HistoryOp {
    Append(usize),
    Release(usize),
    Last(usize, usize),
    After(usize, u64, usize),
    Before(usize, Option<u64>, usize),
}

fn history_op() -> impl Strategy<Value = HistoryOp> {
    let room = 0usize..3;
    prop_oneof![
        6 => room.clone().prop_map(HistoryOp::Append),
        1 => room.clone().prop_map(HistoryOp::Release),
        2 => (room.clone(), 0usize..15).prop_map(|(r, n)| HistoryOp::Last(r, n)),
        2 => (room.clone(), 0u64..40, 0usize..15).prop_map(|(r, s, m)| HistoryOp::After(r, s, m)),
        2 => (room, prop::option::of(0u64..40), 0usize..15)
            .prop_map(|(r, b, l)| HistoryOp::Before(r, b, l)),
    ]
}

fn kept(id: u64) -> Kept {
    let raw = RawValue::from_string(format!("{{\"id\":{id}}}")).expect("valid JSON");
    Kept {
        id,
        json: Rc::from(raw),
    }
}

fn ids(list: &[Kept]) -> Vec<u64> {
    list.iter().map(|k| k.id).collect()
}

const ROOMS: [&str; 3] = ["a", "b", "c"];

proptest! {
    /// `last`, `after` and `before` of the in-memory history answer what a
    /// plain vector of the kept ids answers; ids per room strictly increase
    /// and never come back, release included.
    #[test]
    fn memory_history_pages_like_a_vector(
        keep in 0usize..10,
        ops in prop::collection::vec(history_op(), 1..120),
    ) {
        let mut h = MemoryHistory::new(keep);
        let mut kept_ids: HashMap<usize, Vec<u64>> = HashMap::new();
        let mut highest: HashMap<usize, u64> = HashMap::new();
        for op in ops {
            match op {
                HistoryOp::Append(r) => {
                    let id = h.reserve_id(ROOMS[r]).expect("memory never fails");
                    let previous = highest.get(&r).copied().unwrap_or(0);
                    prop_assert!(id > previous, "id {} after {} in {}", id, previous, ROOMS[r]);
                    highest.insert(r, id);
                    h.append(ROOMS[r], kept(id)).expect("memory never fails");
                    let list = kept_ids.entry(r).or_default();
                    list.push(id);
                    if list.len() > keep {
                        list.remove(0);
                    }
                }
                HistoryOp::Release(r) => {
                    h.release(ROOMS[r]);
                    kept_ids.remove(&r);
                }
                HistoryOp::Last(r, n) => {
                    let model = kept_ids.get(&r).cloned().unwrap_or_default();
                    let expect = model[model.len().saturating_sub(n)..].to_vec();
                    prop_assert_eq!(ids(&h.last(ROOMS[r], n).expect("memory")), expect);
                }
                HistoryOp::After(r, since, max) => {
                    let model = kept_ids.get(&r).cloned().unwrap_or_default();
                    let expect: Vec<u64> = model.into_iter().filter(|&id| id > since).take(max).collect();
                    prop_assert_eq!(ids(&h.after(ROOMS[r], since, max).expect("memory")), expect);
                }
                HistoryOp::Before(r, before, limit) => {
                    let model = kept_ids.get(&r).cloned().unwrap_or_default();
                    let older: Vec<u64> = model
                        .into_iter()
                        .filter(|&id| before.map_or(true, |b| id < b))
                        .collect();
                    let expect = older[older.len().saturating_sub(limit)..].to_vec();
                    prop_assert_eq!(ids(&h.before(ROOMS[r], before, limit).expect("memory")), expect);
                }
            }
        }
    }

    /// Paging backwards with `before` = the oldest id received visits every
    /// kept message exactly once, newest page first, with no gap.
    #[test]
    fn paging_backwards_visits_everything_once(
        keep in 1usize..50,
        count in 0u64..80,
        limit in 1usize..12,
    ) {
        let mut h = MemoryHistory::new(keep);
        for _ in 0..count {
            let id = h.reserve_id("r").expect("memory");
            h.append("r", kept(id)).expect("memory");
        }
        let mut seen: Vec<u64> = Vec::new();
        let mut before = None;
        loop {
            let page = ids(&h.before("r", before, limit).expect("memory"));
            prop_assert!(page.len() <= limit);
            let Some(&oldest) = page.first() else { break };
            prop_assert!(page.windows(2).all(|w| w[0] < w[1]), "page out of order");
            seen.splice(0..0, page);
            before = Some(oldest);
        }
        let expect: Vec<u64> = (count.saturating_sub(keep as u64) + 1..=count).collect();
        prop_assert_eq!(seen, expect);
    }
}
