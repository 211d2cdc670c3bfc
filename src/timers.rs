//! Deadlines for connections, keyed by (slab key, generation).
//!
//! One indexed binary heap, no thread. The loop's poll timeout is the time
//! to the earliest deadline, and after each poll it pops what is due.
//!
//! **One deadline per connection.** What a connection waits for follows
//! from its phase (the request head, the next heartbeat check, the end of a
//! close), so it never needs two at once: arming a deadline replaces the
//! connection's previous one, and [`Timers::cancel`] takes it out when the
//! connection goes. The heap therefore holds at most one entry per live
//! connection, however fast connections come and go (a plain heap with
//! lazy deletion would keep every closed connection's heartbeat until its
//! deadline: megabytes under churn). `pos` maps a slab key to its entry's
//! place in the heap, which is what makes replace and cancel O(log n).
//!
//! **Why a generation as well.** Slab keys are reused the moment a
//! connection is removed. Removal cancels the deadline, but the generation
//! is checked again when a deadline fires, so that no path that forgot to
//! cancel can ever fire a deadline on whichever connection took the slot
//! next (dropping a healthy client for another's handshake timeout). Every
//! connection gets a fresh generation from a counter that never repeats.
//!
//! **Why deadlines are rounded up to [`RESOLUTION_MS`]:** with thousands of
//! connections each arming its own heartbeat, exact deadlines would wake the
//! loop thousands of times per interval; rounding batches them, so an idle
//! server wakes at most a few times per second and handles many timers per
//! wake-up. Heartbeat timers are re-armed lazily (see `server.rs`), so a
//! busy connection does not touch the heap per message.

use crate::rooms::ConnKey;

/// Granularity of every deadline.
pub const RESOLUTION_MS: u64 = 100;

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The HTTP request head and the upgrade must be done by now.
    Handshake,
    /// Time to check whether the connection has been silent too long.
    Heartbeat,
    /// A close we started (or an HTTP answer) must be done by now.
    Close,
}

/// A deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub at_ms: u64,
    pub key: ConnKey,
    pub generation: u64,
    pub kind: Kind,
}

/// No entry in the heap for this key.
const NONE: usize = usize::MAX;

/// The heap of deadlines, at most one per connection.
#[derive(Debug, Default)]
pub struct Timers {
    /// A binary min-heap ordered by `at_ms`.
    heap: Vec<Timer>,
    /// `pos[key]`: where `key`'s entry sits in `heap`, or [`NONE`].
    pos: Vec<usize>,
}

impl Timers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the deadline of `key` to `at_ms` (rounded up to the
    /// resolution), replacing any deadline it had.
    pub fn arm(&mut self, at_ms: u64, key: ConnKey, generation: u64, kind: Kind) {
        let timer = Timer {
            at_ms: at_ms.div_ceil(RESOLUTION_MS) * RESOLUTION_MS,
            key,
            generation,
            kind,
        };
        if key >= self.pos.len() {
            self.pos.resize(key + 1, NONE);
        }
        match self.pos[key] {
            NONE => {
                self.heap.push(timer);
                let at = self.heap.len() - 1;
                self.pos[key] = at;
                self.sift_up(at);
            }
            at => {
                self.heap[at] = timer;
                let at = self.sift_up(at);
                self.sift_down(at);
            }
        }
    }

    /// Take out the deadline of `key`, if it has one (the connection is
    /// gone).
    pub fn cancel(&mut self, key: ConnKey) {
        if let Some(at) = self.pos.get(key).copied().filter(|&at| at != NONE) {
            self.remove_at(at);
        }
    }

    /// The earliest deadline, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.heap.first().map(|t| t.at_ms)
    }

    /// Pop the next deadline due at `now_ms` whose connection is still the
    /// one it was armed for (`current_generation(key)`); stale ones are
    /// dropped on the way.
    pub fn pop_due(
        &mut self,
        now_ms: u64,
        current_generation: impl Fn(ConnKey) -> Option<u64>,
    ) -> Option<Timer> {
        while let Some(&t) = self.heap.first() {
            if t.at_ms > now_ms {
                return None;
            }
            self.remove_at(0);
            if current_generation(t.key) == Some(t.generation) {
                return Some(t);
            }
        }
        None
    }

    /// Deadlines in the heap (at most one per live connection).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    fn remove_at(&mut self, at: usize) {
        let last = self.heap.len() - 1;
        self.swap(at, last);
        if let Some(gone) = self.heap.pop() {
            self.pos[gone.key] = NONE;
        }
        if at < self.heap.len() {
            let at = self.sift_up(at);
            self.sift_down(at);
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a].key] = a;
        self.pos[self.heap[b].key] = b;
    }

    fn sift_up(&mut self, mut at: usize) -> usize {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.heap[parent].at_ms <= self.heap[at].at_ms {
                break;
            }
            self.swap(at, parent);
            at = parent;
        }
        at
    }

    fn sift_down(&mut self, mut at: usize) {
        loop {
            let (left, right) = (2 * at + 1, 2 * at + 2);
            let mut least = at;
            if left < self.heap.len() && self.heap[left].at_ms < self.heap[least].at_ms {
                least = left;
            }
            if right < self.heap.len() && self.heap[right].at_ms < self.heap[least].at_ms {
                least = right;
            }
            if least == at {
                return;
            }
            self.swap(at, least);
            at = least;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn deadlines_pop_in_order_when_due() {
        let mut t = Timers::new();
        let live = |_k: ConnKey| Some(1);
        t.arm(350, 1, 1, Kind::Heartbeat);
        t.arm(120, 2, 1, Kind::Handshake);
        assert_eq!(t.next_deadline(), Some(200));
        assert!(t.pop_due(199, live).is_none());
        assert_eq!(t.pop_due(200, live).map(|x| x.key), Some(2));
        assert!(t.pop_due(399, live).is_none());
        assert_eq!(t.pop_due(400, live).map(|x| x.kind), Some(Kind::Heartbeat));
        assert!(t.is_empty());
    }

    #[test]
    fn stale_timer_never_hits_the_slot_reuser() {
        // Slot 7 held generation 1, which armed a handshake deadline, then
        // closed without cancelling it; generation 2 took the slot and has
        // not armed one yet.
        let mut slots: HashMap<ConnKey, u64> = HashMap::new();
        let mut t = Timers::new();
        slots.insert(7, 1);
        t.arm(100, 7, 1, Kind::Handshake);
        slots.insert(7, 2);
        let current = |k: ConnKey| slots.get(&k).copied();
        assert!(
            t.pop_due(100, current).is_none(),
            "stale timer must be dropped"
        );
        assert!(t.is_empty());
    }

    #[test]
    fn arming_replaces_the_connections_deadline() {
        let mut t = Timers::new();
        let live = |_k: ConnKey| Some(1);
        t.arm(100, 4, 1, Kind::Handshake);
        t.arm(900, 4, 1, Kind::Heartbeat);
        assert_eq!(t.len(), 1);
        assert!(
            t.pop_due(500, live).is_none(),
            "the handshake deadline is gone"
        );
        assert_eq!(t.pop_due(900, live).map(|x| x.kind), Some(Kind::Heartbeat));
        // And earlier again.
        t.arm(900, 4, 1, Kind::Heartbeat);
        t.arm(200, 4, 1, Kind::Close);
        assert_eq!(t.next_deadline(), Some(200));
    }

    #[test]
    fn cancel_bounds_the_heap_by_live_connections() {
        // Churn: 10,000 connections arrive, arm a heartbeat 30 s out, and
        // leave. Nothing of them may stay behind.
        let mut t = Timers::new();
        for i in 0..10_000u64 {
            let key = (i % 8) as ConnKey;
            t.arm(30_000 + i, key, i + 1, Kind::Heartbeat);
            t.cancel(key);
        }
        assert!(t.is_empty());
        t.cancel(3); // cancelling twice, or a key never armed, is harmless
        t.cancel(1_000_000);
        assert!(t.is_empty());
    }

    #[test]
    fn heap_order_survives_arbitrary_replace_and_cancel() {
        // A small deterministic shuffle of operations against a model.
        let mut t = Timers::new();
        let mut model: HashMap<ConnKey, u64> = HashMap::new();
        let mut x: u64 = 12345;
        for _ in 0..5_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = ((x >> 33) % 32) as ConnKey;
            let at = ((x >> 13) % 10_000) * RESOLUTION_MS;
            if (x >> 60) % 3 == 0 {
                t.cancel(key);
                model.remove(&key);
            } else {
                t.arm(at, key, 1, Kind::Heartbeat);
                model.insert(key, at);
            }
            assert_eq!(t.len(), model.len());
            assert_eq!(t.next_deadline(), model.values().min().copied());
        }
        let mut last = 0;
        while let Some(due) = t.pop_due(u64::MAX, |_| Some(1)) {
            assert!(due.at_ms >= last);
            assert_eq!(model.remove(&due.key), Some(due.at_ms));
            last = due.at_ms;
        }
        assert!(model.is_empty());
    }
}
