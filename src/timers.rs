//! Deadlines for connections, keyed by (slab key, generation).
//!
//! One binary heap, no thread. The loop's poll timeout is the time to the
//! earliest deadline, and after each poll it pops what is due.
//!
//! Why a generation: slab keys are reused the moment a connection is
//! removed, but a deadline armed for it stays in the heap. Without the
//! generation, the stale deadline would fire on whichever connection took
//! the slot next (dropping a healthy client for another's handshake
//! timeout). Every connection gets a fresh generation from a counter that
//! never repeats; a due timer whose generation does not match the slot's
//! current occupant is discarded unseen.
//!
//! Why deadlines are rounded up to [`RESOLUTION_MS`]: with thousands of
//! connections each arming its own heartbeat, exact deadlines would wake the
//! loop thousands of times per interval; rounding batches them, so an idle
//! server wakes at most a few times per second and handles many timers per
//! wake-up. Heartbeat timers are re-armed lazily (see `server.rs`), so a
//! busy connection does not touch the heap per message.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

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

/// A due deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    pub at_ms: u64,
    pub key: ConnKey,
    pub generation: u64,
    pub kind: Kind,
}

/// The heap of deadlines.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<Timer>>,
}

impl Timers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Arm a deadline at `at_ms` (rounded up to the resolution).
    pub fn arm(&mut self, at_ms: u64, key: ConnKey, generation: u64, kind: Kind) {
        let at_ms = at_ms.div_ceil(RESOLUTION_MS) * RESOLUTION_MS;
        self.heap.push(Reverse(Timer {
            at_ms,
            key,
            generation,
            kind,
        }));
    }

    /// The earliest deadline, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(t)| t.at_ms)
    }

    /// Pop the next deadline due at `now_ms` whose connection is still the
    /// one it was armed for (`current_generation(key)`); stale ones are
    /// dropped on the way.
    pub fn pop_due(
        &mut self,
        now_ms: u64,
        current_generation: impl Fn(ConnKey) -> Option<u64>,
    ) -> Option<Timer> {
        while let Some(Reverse(t)) = self.heap.peek() {
            if t.at_ms > now_ms {
                return None;
            }
            let t = *t;
            self.heap.pop();
            if current_generation(t.key) == Some(t.generation) {
                return Some(t);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
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
        // closed; generation 2 took the slot.
        let mut slots: HashMap<ConnKey, u64> = HashMap::new();
        let mut t = Timers::new();
        slots.insert(7, 1);
        t.arm(100, 7, 1, Kind::Handshake);
        slots.insert(7, 2);
        t.arm(500, 7, 2, Kind::Heartbeat);
        let current = |k: ConnKey| slots.get(&k).copied();
        assert!(
            t.pop_due(100, current).is_none(),
            "stale timer must be dropped"
        );
        assert_eq!(t.len(), 1);
        let due = t.pop_due(500, current).expect("the new owner's timer");
        assert_eq!((due.generation, due.kind), (2, Kind::Heartbeat));
    }

    #[test]
    fn removed_connection_timers_vanish() {
        let mut t = Timers::new();
        t.arm(100, 3, 9, Kind::Close);
        assert!(t.pop_due(1000, |_| None).is_none());
        assert!(t.is_empty());
    }
}
