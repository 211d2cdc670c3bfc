//! The in-memory history: a bounded ring of messages per room.
//!
//! Used with `--no-persist`, and as the model the on-disk store follows. A
//! room's ring is dropped when its last member leaves ([`History::release`]),
//! and so is its id counter: ids stay above a single high-water mark of
//! every released room instead, so they never go backwards for any room
//! while the process runs, and memory does not grow with the number of
//! room names ever used. Nothing here survives a restart.

use std::collections::{HashMap, VecDeque};

use super::{History, HistoryError, Kept};

/// Per-room rings of at most `keep` messages.
pub struct MemoryHistory {
    keep: usize,
    rings: HashMap<Box<str>, VecDeque<Kept>>,
    /// Last id handed out, per room that has not been released.
    last_id: HashMap<Box<str>, u64>,
    /// The highest id of any released room: a room seen again (or for the
    /// first time) continues above it.
    floor: u64,
}

impl MemoryHistory {
    /// A history that keeps the newest `keep` messages of every live room.
    pub fn new(keep: usize) -> Self {
        MemoryHistory {
            keep,
            rings: HashMap::new(),
            last_id: HashMap::new(),
            floor: 0,
        }
    }
}

impl History for MemoryHistory {
    fn reserve_id(&mut self, room: &str) -> Result<u64, HistoryError> {
        let last = match self.last_id.get_mut(room) {
            Some(last) => last,
            None => self.last_id.entry(room.into()).or_insert(self.floor),
        };
        *last += 1;
        Ok(*last)
    }

    fn append(&mut self, room: &str, msg: Kept) -> Result<(), HistoryError> {
        if self.keep == 0 {
            return Ok(());
        }
        let ring = match self.rings.get_mut(room) {
            Some(ring) => ring,
            None => self.rings.entry(room.into()).or_default(),
        };
        if ring.len() == self.keep {
            ring.pop_front();
        }
        ring.push_back(msg);
        Ok(())
    }

    fn last(&mut self, room: &str, n: usize) -> Result<Vec<Kept>, HistoryError> {
        let Some(ring) = self.rings.get(room) else {
            return Ok(Vec::new());
        };
        let skip = ring.len().saturating_sub(n);
        Ok(ring.iter().skip(skip).cloned().collect())
    }

    fn after(&mut self, room: &str, since: u64, max: usize) -> Result<Vec<Kept>, HistoryError> {
        let Some(ring) = self.rings.get(room) else {
            return Ok(Vec::new());
        };
        // Ids in a ring are increasing, so a binary search finds the start.
        let start = ring.partition_point(|m| m.id <= since);
        Ok(ring.range(start..).take(max).cloned().collect())
    }

    fn before(
        &mut self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Kept>, HistoryError> {
        let Some(ring) = self.rings.get(room) else {
            return Ok(Vec::new());
        };
        let end = match before {
            Some(before) => ring.partition_point(|m| m.id < before),
            None => ring.len(),
        };
        let start = end.saturating_sub(limit);
        Ok(ring.range(start..end).cloned().collect())
    }

    fn release(&mut self, room: &str) {
        self.rings.remove(room);
        if let Some(last) = self.last_id.remove(room) {
            self.floor = self.floor.max(last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use std::rc::Rc;

    fn kept(id: u64) -> Kept {
        let raw = RawValue::from_string(format!("{{\"id\":{id}}}")).expect("valid json");
        Kept {
            id,
            json: Rc::from(raw),
        }
    }

    fn ids(v: &[Kept]) -> Vec<u64> {
        v.iter().map(|k| k.id).collect()
    }

    fn filled(keep: usize, n: u64) -> MemoryHistory {
        let mut h = MemoryHistory::new(keep);
        for _ in 0..n {
            let id = h.reserve_id("r").expect("id");
            h.append("r", kept(id)).expect("append");
        }
        h
    }

    #[test]
    fn ring_keeps_the_newest() {
        let mut h = filled(3, 5);
        assert_eq!(ids(&h.last("r", 10).unwrap()), vec![3, 4, 5]);
        assert_eq!(ids(&h.last("r", 2).unwrap()), vec![4, 5]);
    }

    #[test]
    fn after_and_before_page_through_the_ring() {
        let mut h = filled(10, 8);
        assert_eq!(ids(&h.after("r", 5, 100).unwrap()), vec![6, 7, 8]);
        assert_eq!(ids(&h.after("r", 2, 2).unwrap()), vec![3, 4]);
        assert_eq!(ids(&h.before("r", Some(6), 2).unwrap()), vec![4, 5]);
        assert_eq!(ids(&h.before("r", None, 3).unwrap()), vec![6, 7, 8]);
        assert!(h.before("r", Some(1), 5).unwrap().is_empty());
    }

    #[test]
    fn ids_survive_release() {
        let mut h = filled(10, 3);
        h.release("r");
        assert!(h.last("r", 10).unwrap().is_empty());
        assert_eq!(h.reserve_id("r").unwrap(), 4);
        assert!(h.last_id.len() == 1 && h.rings.is_empty());
    }

    #[test]
    fn released_rooms_leave_only_a_floor() {
        let mut h = MemoryHistory::new(10);
        for i in 0..100 {
            let room = format!("r{i}");
            h.reserve_id(&room).unwrap();
            h.release(&room);
        }
        assert!(h.last_id.is_empty(), "no per-room state left behind");
        assert_eq!(
            h.reserve_id("r0").unwrap(),
            101,
            "above every id handed out"
        );
    }
}
