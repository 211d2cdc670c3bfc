//! Per-room id tracking for publications: no gap, no duplicate, in order.
//!
//! Ids per room are consecutive (the publish script assigns them), so a
//! publication whose id is more than one above the last one delivered
//! reveals lost publications; the engine fetches them from the stored
//! history (a *fill*) and holds the room's later publications until the
//! fill is back. After the subscription was re-established every room with
//! local members is filled from its last delivered id, since anything may
//! have been published while it was down. An id at or below the last one
//! delivered is a duplicate (a fill and the live stream overlapping).
//!
//! Pure: the engine feeds arrivals and fill results and carries out the
//! fills asked for. Unit-tested below without sockets.

use std::collections::HashMap;
use std::rc::Rc;

use super::Ticket;
use crate::protocol::Frame;

/// Most messages asked for in one fill; a longer gap is filled in several.
pub const FILL_BATCH: usize = 1000;

/// Most publications held for one room while its fill is out. Beyond it
/// later ones are not held: they show up as a gap again after the fill.
pub const MAX_HELD: usize = 10_000;

/// One publication of a room message, as the frame its members get.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: u64,
    pub ticket: Option<Ticket>,
    pub frame: Frame,
}

/// A fill to carry out: the stored messages of `room` with ids above
/// `after` and below `upto` (no upper bound when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    pub room: Rc<str>,
    pub after: u64,
    pub upto: Option<u64>,
}

#[derive(Debug, Default)]
struct Seq {
    /// Last id delivered to local members (or skipped as known).
    seen: u64,
    /// `seen` is a real delivery point (a join's backlog ended there, or a
    /// publication was delivered): only then can a gap be told. A fresh
    /// room's point is 0, and known.
    known: bool,
    /// Highest id this node knows of in the room (delivered, published,
    /// read): what the publish script must stay above if Redis lost its
    /// counter.
    high: u64,
    filling: Option<Filling>,
}

#[derive(Debug)]
struct Filling {
    upto: Option<u64>,
    held: Vec<Entry>,
    /// The fill is out on the link (false: it failed and waits for the
    /// link to come back).
    sent: bool,
}

/// The tracker for every room this node has heard of.
#[derive(Debug, Default)]
pub struct Sequences {
    rooms: HashMap<Rc<str>, Seq>,
}

impl Sequences {
    pub fn new() -> Self {
        Self::default()
    }

    /// `room` as the tracker holds it (a count increment), or a new name
    /// for a room it has not seen: a publication names its room, and this
    /// spares an allocation per publication.
    pub fn name(&self, room: &str) -> Rc<str> {
        match self.rooms.get_key_value(room) {
            Some((name, _)) => name.clone(),
            None => Rc::from(room),
        }
    }

    /// The id the next message of `room` must be above.
    pub fn high(&self, room: &str) -> u64 {
        self.rooms.get(room).map_or(0, |s| s.high)
    }

    /// This node learnt that `id` exists in `room` (an acknowledgement, a
    /// read).
    pub fn note(&mut self, room: &Rc<str>, id: u64) {
        let seq = self.rooms.entry(room.clone()).or_default();
        seq.high = seq.high.max(id);
    }

    /// A member joined `room` and got its backlog up to `last_id`. When the
    /// room was not tracked yet, that is where delivery starts.
    pub fn entered(&mut self, room: &Rc<str>, last_id: u64) {
        let seq = self.rooms.entry(room.clone()).or_default();
        if !seq.known && seq.filling.is_none() {
            seq.seen = last_id;
            seq.known = true;
        }
        seq.high = seq.high.max(last_id);
    }

    /// A publication arrived. `wanted`: the room has local members (gaps
    /// in other rooms do not matter: nobody here would see them).
    /// Deliverable entries are pushed to `deliver`, fills to `fills`.
    pub fn arrive(
        &mut self,
        room: &Rc<str>,
        entry: Entry,
        wanted: bool,
        deliver: &mut Vec<(Rc<str>, Entry)>,
        fills: &mut Vec<Fill>,
    ) {
        let seq = self.rooms.entry(room.clone()).or_default();
        seq.high = seq.high.max(entry.id);
        if let Some(filling) = &mut seq.filling {
            if filling.held.len() < MAX_HELD {
                filling.held.push(entry);
            }
            return;
        }
        if entry.id <= seq.seen {
            return;
        }
        if !wanted || !seq.known || entry.id == seq.seen + 1 {
            seq.seen = entry.id;
            seq.known = true;
            deliver.push((room.clone(), entry));
            return;
        }
        fills.push(Fill {
            room: room.clone(),
            after: seq.seen,
            upto: Some(entry.id),
        });
        seq.filling = Some(Filling {
            upto: Some(entry.id),
            held: vec![entry],
            sent: true,
        });
    }

    /// The subscription is (re)established: every wanted room with a
    /// delivery point is filled from it. Returns the fills.
    pub fn resume(&mut self, wanted: &dyn Fn(&str) -> bool) -> Vec<Fill> {
        let mut fills = Vec::new();
        for (room, seq) in self.rooms.iter_mut() {
            if !wanted(room) || !seq.known {
                continue;
            }
            match &mut seq.filling {
                Some(f) => {
                    // One already out asked for a bounded range; what came
                    // after it is unknown now too.
                    f.upto = None;
                    f.sent = true;
                }
                None => {
                    seq.filling = Some(Filling {
                        upto: None,
                        held: Vec::new(),
                        sent: true,
                    })
                }
            }
            fills.push(Fill {
                room: room.clone(),
                after: seq.seen,
                upto: None,
            });
        }
        fills
    }

    /// A fill could not be carried out (the link is down): it is asked
    /// again by [`Sequences::resume`] when the link is back.
    pub fn fill_failed(&mut self, room: &str) {
        if let Some(f) = self.rooms.get_mut(room).and_then(|s| s.filling.as_mut()) {
            f.sent = false;
        }
    }

    /// A fill came back with `entries` (ascending ids); `full` says the
    /// store had more in the range than one batch ([`FILL_BATCH`] stored
    /// slots, placeholders of skipped ids included, so `entries` may be
    /// fewer). Delivers them and then what was held; may ask for the next
    /// batch or a new fill.
    pub fn filled(
        &mut self,
        room: &Rc<str>,
        entries: Vec<Entry>,
        full: bool,
        wanted: bool,
        deliver: &mut Vec<(Rc<str>, Entry)>,
        fills: &mut Vec<Fill>,
    ) {
        let not_filling = self.rooms.get(room).map_or(true, |s| s.filling.is_none());
        if not_filling {
            // A second fill that was out when the first one completed the
            // room (the subscription dropped again meanwhile): what it
            // brings may be newer than anything live, so it counts like
            // arrivals (duplicates drop, a gap asks again).
            for entry in entries {
                self.arrive(room, entry, wanted, deliver, fills);
            }
            return;
        }
        let Some(seq) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(filling) = seq.filling.as_mut() else {
            return;
        };
        for entry in entries {
            seq.high = seq.high.max(entry.id);
            if entry.id > seq.seen && filling.upto.map_or(true, |u| entry.id < u) {
                seq.seen = entry.id;
                deliver.push((room.clone(), entry));
            }
        }
        if full {
            fills.push(Fill {
                room: room.clone(),
                after: seq.seen,
                upto: filling.upto,
            });
            return;
        }
        let Some(filling) = seq.filling.take() else {
            return;
        };
        // What the store no longer has (trimmed, or lost with a Redis that
        // came back empty) cannot be delivered: continue after the gap.
        if let Some(upto) = filling.upto {
            seq.seen = seq.seen.max(upto - 1);
        }
        for entry in filling.held {
            self.arrive(room, entry, wanted, deliver, fills);
        }
    }

    /// Rooms whose fill failed and must be asked again.
    pub fn stalled(&self) -> usize {
        self.rooms
            .values()
            .filter(|s| s.filling.as_ref().is_some_and(|f| !f.sent))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: u64) -> Entry {
        Entry {
            id,
            ticket: None,
            frame: crate::protocol::text_frame(&format!("m{id}")),
        }
    }

    struct T {
        seqs: Sequences,
        room: Rc<str>,
        got: Vec<u64>,
        fills: Vec<Fill>,
    }

    impl T {
        fn new() -> Self {
            T {
                seqs: Sequences::new(),
                room: Rc::from("r"),
                got: Vec::new(),
                fills: Vec::new(),
            }
        }
        fn arrive(&mut self, id: u64) {
            let mut d = Vec::new();
            let room = self.room.clone();
            self.seqs
                .arrive(&room, e(id), true, &mut d, &mut self.fills);
            self.got.extend(d.into_iter().map(|(_, e)| e.id));
        }
        fn filled(&mut self, ids: impl IntoIterator<Item = u64>) {
            let mut d = Vec::new();
            let room = self.room.clone();
            let entries: Vec<Entry> = ids.into_iter().map(e).collect();
            let full = entries.len() >= FILL_BATCH;
            self.seqs
                .filled(&room, entries, full, true, &mut d, &mut self.fills);
            self.got.extend(d.into_iter().map(|(_, e)| e.id));
        }
    }

    #[test]
    fn in_order_passes_and_duplicates_drop() {
        let mut t = T::new();
        t.seqs.entered(&t.room.clone(), 3);
        for id in [4, 5, 5, 3, 6] {
            t.arrive(id);
        }
        assert_eq!(t.got, [4, 5, 6]);
        assert!(t.fills.is_empty());
        assert_eq!(t.seqs.high("r"), 6);
    }

    #[test]
    fn a_gap_is_filled_and_what_was_held_follows() {
        let mut t = T::new();
        t.seqs.entered(&t.room.clone(), 1);
        t.arrive(2);
        t.arrive(5);
        t.arrive(6);
        assert_eq!(t.got, [2]);
        assert_eq!(
            t.fills,
            [Fill {
                room: t.room.clone(),
                after: 2,
                upto: Some(5)
            }]
        );
        t.filled(3..=4);
        t.arrive(7);
        assert_eq!(t.got, [2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn what_the_store_lost_is_skipped_once() {
        let mut t = T::new();
        t.seqs.entered(&t.room.clone(), 10);
        t.arrive(14);
        // Redis came back empty: the fill finds nothing.
        t.filled([]);
        t.arrive(15);
        assert_eq!(t.got, [14, 15]);
        assert_eq!(t.fills.len(), 1);
    }

    #[test]
    fn a_resumed_subscription_fills_from_the_last_delivered() {
        let mut t = T::new();
        t.seqs.entered(&t.room.clone(), 0);
        t.arrive(1);
        t.arrive(2);
        let fills = t.seqs.resume(&|_| true);
        assert_eq!(fills[0].after, 2);
        assert_eq!(fills[0].upto, None);
        // Live publications arrive while the fill is out; the fill overlaps.
        t.arrive(5);
        t.arrive(6);
        t.filled(3..=5);
        assert_eq!(t.got, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_second_fill_after_the_room_was_completed_still_counts() {
        let mut t = T::new();
        t.seqs.entered(&t.room.clone(), 2);
        // The subscription dropped twice: two resumes, two fills out.
        t.seqs.resume(&|_| true);
        t.seqs.resume(&|_| true);
        t.filled([3]);
        // The second fill, sent later, saw more.
        t.filled([3, 4, 5]);
        t.arrive(6);
        assert_eq!(t.got, [3, 4, 5, 6]);
    }

    #[test]
    fn a_fresh_room_is_filled_from_zero() {
        let mut t = T::new();
        // Joined an empty room; the subscription dropped before message 1.
        t.seqs.entered(&t.room.clone(), 0);
        let fills = t.seqs.resume(&|_| true);
        assert_eq!(fills[0].after, 0);
        t.arrive(3);
        t.filled([1, 2, 3]);
        assert_eq!(t.got, [1, 2, 3]);
    }

    #[test]
    fn long_gaps_are_filled_in_batches() {
        let mut t = T::new();
        t.seqs.entered(&t.room.clone(), 0);
        t.arrive(1);
        let last = FILL_BATCH as u64 + 500;
        t.arrive(last);
        t.filled(2..=(FILL_BATCH as u64 + 1));
        assert_eq!(t.fills.len(), 2);
        assert_eq!(t.fills[1].after, FILL_BATCH as u64 + 1);
        t.filled((FILL_BATCH as u64 + 2)..=(last - 1));
        let want: Vec<u64> = (1..=last).collect();
        assert_eq!(t.got, want);
    }

    #[test]
    fn rooms_without_local_members_are_not_filled() {
        let mut s = Sequences::new();
        let room: Rc<str> = Rc::from("elsewhere");
        let (mut d, mut f) = (Vec::new(), Vec::new());
        s.arrive(&room, e(1), false, &mut d, &mut f);
        s.arrive(&room, e(9), false, &mut d, &mut f);
        assert!(f.is_empty());
        assert_eq!(s.high("elsewhere"), 9);
        assert!(s.resume(&|_| false).is_empty());
    }

    #[test]
    fn a_failed_fill_is_counted_until_resumed() {
        let mut t = T::new();
        t.seqs.entered(&t.room.clone(), 1);
        t.arrive(3);
        t.seqs.fill_failed("r");
        assert_eq!(t.seqs.stalled(), 1);
        let fills = t.seqs.resume(&|_| true);
        assert_eq!(fills.len(), 1);
        assert_eq!(t.seqs.stalled(), 0);
        t.filled(2..=2);
        assert_eq!(t.got, [2, 3]);
    }
}
