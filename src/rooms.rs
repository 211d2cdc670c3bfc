//! The room tables: room → members, member → rooms, username → connection.
//!
//! Pure data, indexed both ways so that every operation costs time in
//! proportion to what it touches (one room's members, one member's rooms),
//! never to the number of connections or rooms. This replaces the Go
//! original's `Room` hub and its Register/Unregister channels: there is one
//! thread, so a table is enough. No I/O and no protocol here; the dispatcher
//! decides what to say about each change.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use crate::rate::Bucket;

/// A connection's slab key. The tables only hold keys of connections that
/// are alive: the server's single removal path calls [`Rooms::remove_member`]
/// before a slab slot can be reused, so keys here never go stale.
pub type ConnKey = usize;

/// Names (of users and rooms) are 1–32 characters of `[A-Za-z0-9_.-]`.
pub const NAME_RULE: &str = "1-32 characters of A-Z a-z 0-9 _ . -";

/// True when `name` follows [`NAME_RULE`].
pub fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// One connected user.
#[derive(Debug)]
pub struct Member {
    pub name: Rc<str>,
    /// The room joined on connect; the default target of `message`.
    pub home: Rc<str>,
    /// Rooms this member is in, in join order. Small (bounded by
    /// `max_rooms_per_user`), so a Vec beats a set.
    pub rooms: Vec<Rc<str>>,
    /// False between the name check (before the 101) and the first events.
    pub open: bool,
    /// A close was requested (flooding): ignore further commands.
    pub closing: bool,
    pub bucket: Bucket,
}

/// One live room: its members in join order. A room exists exactly while it
/// has members.
#[derive(Debug, Default)]
pub struct Room {
    pub members: Vec<ConnKey>,
}

/// The rooms a removed member was in, each with whether it is now gone.
pub type LeftRooms = Vec<(Rc<str>, bool)>;

/// The tables.
#[derive(Debug, Default)]
pub struct Rooms {
    rooms: HashMap<Rc<str>, Room>,
    /// Indexed by slab key: keys are dense, so a Vec is the cheapest map.
    members: Vec<Option<Member>>,
    names: HashMap<Rc<str>, ConnKey>,
    /// Every room by member count, busiest first, ties by name: kept at
    /// each join and leave (two O(log n) steps), so that the `rooms`
    /// listing reads its first entries instead of selecting them from all
    /// rooms after every change (6 ms with 50,000 rooms).
    ranking: BTreeSet<(Reverse<usize>, Rc<str>)>,
    /// Bumped whenever a room's membership changes, so that answers derived
    /// from all rooms (the `rooms` listing) can be cached until then.
    version: u64,
}

/// What [`Rooms::join`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// Newly a member (the room was created if it did not exist).
    New,
    /// Was already a member; nothing changed.
    Already,
    /// Refused: the member is in as many rooms as allowed.
    TooMany,
}

impl Rooms {
    pub fn new() -> Self {
        Self::default()
    }

    /// The member at `key`, if any.
    pub fn member(&self, key: ConnKey) -> Option<&Member> {
        self.members.get(key).and_then(Option::as_ref)
    }

    pub fn member_mut(&mut self, key: ConnKey) -> Option<&mut Member> {
        self.members.get_mut(key).and_then(Option::as_mut)
    }

    /// The connection that holds `name`.
    pub fn by_name(&self, name: &str) -> Option<ConnKey> {
        self.names.get(name).copied()
    }

    /// A live room.
    pub fn room(&self, name: &str) -> Option<&Room> {
        self.rooms.get(name)
    }

    /// Every live room (for listings).
    pub fn iter_rooms(&self) -> impl Iterator<Item = (&Rc<str>, &Room)> {
        self.rooms.iter()
    }

    /// Every live room with its member count, busiest first (ties by
    /// name).
    pub fn busiest(&self) -> impl Iterator<Item = (&Rc<str>, usize)> {
        self.ranking.iter().map(|(Reverse(n), room)| (room, *n))
    }

    /// Changes whenever any room's membership does.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn member_count(&self) -> usize {
        self.names.len()
    }

    /// Claim `name` for `key`. Fails when the name is taken.
    pub fn add_member(&mut self, key: ConnKey, name: &str, home: &str, bucket: Bucket) -> bool {
        if self.names.contains_key(name) {
            return false;
        }
        let name: Rc<str> = name.into();
        self.names.insert(name.clone(), key);
        if self.members.len() <= key {
            self.members.resize_with(key + 1, || None);
        }
        self.members[key] = Some(Member {
            name,
            home: home.into(),
            rooms: Vec::new(),
            open: false,
            closing: false,
            bucket,
        });
        true
    }

    /// Put `key` into `room`, creating the room if needed.
    pub fn join(&mut self, key: ConnKey, room: &str, max_rooms: usize) -> Joined {
        let Some(member) = self.members.get_mut(key).and_then(Option::as_mut) else {
            return Joined::Already;
        };
        if member.rooms.iter().any(|r| &**r == room) {
            return Joined::Already;
        }
        if member.rooms.len() >= max_rooms {
            return Joined::TooMany;
        }
        let name: Rc<str> = match self.rooms.get_key_value(room) {
            Some((name, _)) => name.clone(),
            None => room.into(),
        };
        member.rooms.push(name.clone());
        let members = &mut self.rooms.entry(name.clone()).or_default().members;
        members.push(key);
        let now = members.len();
        self.ranking.remove(&(Reverse(now - 1), name.clone()));
        self.ranking.insert((Reverse(now), name));
        self.version += 1;
        Joined::New
    }

    /// Take `key` out of `room`. Returns `None` if it was not a member,
    /// otherwise whether the room is now gone (it had no other member).
    pub fn leave(&mut self, key: ConnKey, room: &str) -> Option<bool> {
        let member = self.members.get_mut(key).and_then(Option::as_mut)?;
        let at = member.rooms.iter().position(|r| &**r == room)?;
        let room = member.rooms.remove(at);
        Some(self.detach(key, &room))
    }

    /// Remove `key` from the room's member list; drop the room if empty.
    fn detach(&mut self, key: ConnKey, room: &Rc<str>) -> bool {
        self.version += 1;
        let Some(r) = self.rooms.get_mut(room) else {
            return false;
        };
        let was = r.members.len();
        if let Some(at) = r.members.iter().position(|&k| k == key) {
            // Keep join order for member listings; rooms are small enough
            // that the shift costs less than the broadcast that follows.
            r.members.remove(at);
        }
        if r.members.len() != was {
            self.ranking.remove(&(Reverse(was), room.clone()));
            if !r.members.is_empty() {
                self.ranking
                    .insert((Reverse(r.members.len()), room.clone()));
            }
        }
        if r.members.is_empty() {
            self.rooms.remove(&**room);
            true
        } else {
            false
        }
    }

    /// Forget `key` entirely: out of every room, name released. Returns the
    /// member (with the rooms it was in) so the caller can tell those rooms.
    pub fn remove_member(&mut self, key: ConnKey) -> Option<(Member, LeftRooms)> {
        let mut member = self.members.get_mut(key).and_then(Option::take)?;
        self.names.remove(&member.name);
        let rooms = std::mem::take(&mut member.rooms);
        let gone = rooms
            .into_iter()
            .map(|room| {
                let emptied = self.detach(key, &room);
                (room, emptied)
            })
            .collect();
        Some((member, gone))
    }

    /// Check that the indexes agree: every member's rooms list it exactly
    /// once, every room lists only members that list it back, names map
    /// to their members and back, and no room is empty. `Err` says the
    /// first disagreement found. For tests and fuzzing: it walks every
    /// table, so it is never called on the loop.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut live = 0;
        for (key, member) in self.members.iter().enumerate() {
            let Some(member) = member else { continue };
            live += 1;
            if self.names.get(&member.name) != Some(&key) {
                return Err(format!("member {key} ({}) is not its name's", member.name));
            }
            for (i, room) in member.rooms.iter().enumerate() {
                if member.rooms[..i].contains(room) {
                    return Err(format!("member {key} lists room {room} twice"));
                }
                let Some(r) = self.rooms.get(room) else {
                    return Err(format!("member {key} is in room {room}, which is gone"));
                };
                if r.members.iter().filter(|&&k| k == key).count() != 1 {
                    return Err(format!("room {room} does not list member {key} once"));
                }
            }
        }
        if live != self.names.len() {
            return Err(format!("{live} members but {} names", self.names.len()));
        }
        for (name, &key) in &self.names {
            if self.member(key).map(|m| &m.name) != Some(name) {
                return Err(format!("name {name} maps to {key}, which is not it"));
            }
        }
        for (room, r) in &self.rooms {
            if r.members.is_empty() {
                return Err(format!("room {room} is empty but still listed"));
            }
            if !self
                .ranking
                .contains(&(Reverse(r.members.len()), room.clone()))
            {
                return Err(format!(
                    "room {room} is not ranked by its {} members",
                    r.members.len()
                ));
            }
            for &key in &r.members {
                let listed = self
                    .member(key)
                    .is_some_and(|m| m.rooms.iter().any(|x| x == room));
                if !listed {
                    return Err(format!("room {room} lists {key}, which is not in it"));
                }
            }
        }
        // Every room is ranked once (above), so anything more is stale.
        if self.ranking.len() != self.rooms.len() {
            return Err(format!(
                "{} rooms but {} ranked",
                self.rooms.len(),
                self.ranking.len()
            ));
        }
        Ok(())
    }

    /// The first `max` member names of `room` in join order, and how many
    /// members it has.
    pub fn names_in_capped(&self, room: &str, max: usize) -> (Vec<&str>, usize) {
        match self.rooms.get(room) {
            Some(r) => (
                r.members
                    .iter()
                    .take(max)
                    .filter_map(|&k| self.member(k).map(|m| &*m.name))
                    .collect(),
                r.members.len(),
            ),
            None => (Vec::new(), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::{Bucket, Rate};

    fn bucket() -> Bucket {
        Bucket::new(Rate { per_s: 1, burst: 1 }, 0)
    }

    fn tables(names: &[&str]) -> Rooms {
        let mut t = Rooms::new();
        for (k, n) in names.iter().enumerate() {
            assert!(t.add_member(k, n, "default", bucket()));
        }
        t
    }

    #[test]
    fn names_follow_the_rule() {
        assert!(valid_name("alice"));
        assert!(valid_name("a.b-c_D9"));
        assert!(valid_name(&"x".repeat(32)));
        assert!(!valid_name(""));
        assert!(!valid_name(&"x".repeat(33)));
        assert!(!valid_name("al ice"));
        assert!(!valid_name("bob!"));
        assert!(!valid_name("é"));
    }

    #[test]
    fn names_are_unique() {
        let mut t = tables(&["alice"]);
        assert!(!t.add_member(1, "alice", "default", bucket()));
        assert_eq!(t.by_name("alice"), Some(0));
    }

    #[test]
    fn both_indexes_agree() {
        let mut t = tables(&["a", "b"]);
        assert_eq!(t.join(0, "r", 8), Joined::New);
        assert_eq!(t.join(1, "r", 8), Joined::New);
        assert_eq!(t.join(0, "r", 8), Joined::Already);
        assert_eq!(t.names_in_capped("r", 10).0, vec!["a", "b"]);
        assert_eq!(t.names_in_capped("r", 1), (vec!["a"], 2));
        assert_eq!(t.member(0).unwrap().rooms.len(), 1);
        assert_eq!(t.leave(0, "r"), Some(false));
        assert_eq!(t.leave(0, "r"), None);
        assert_eq!(t.leave(1, "r"), Some(true));
        assert!(t.room("r").is_none());
        assert_eq!(t.room_count(), 0);
    }

    #[test]
    fn room_limit_per_member() {
        let mut t = tables(&["a"]);
        assert_eq!(t.join(0, "r1", 2), Joined::New);
        assert_eq!(t.join(0, "r2", 2), Joined::New);
        assert_eq!(t.join(0, "r3", 2), Joined::TooMany);
    }

    #[test]
    fn consistency_check_sees_a_broken_index() {
        let mut t = tables(&["a", "b"]);
        t.join(0, "r", 8);
        t.join(1, "r", 8);
        assert_eq!(t.check_consistency(), Ok(()));
        // A room left listed after its last member went.
        t.rooms.entry(Rc::from("ghost")).or_default();
        assert!(t.check_consistency().unwrap_err().contains("ghost"));
        t.rooms.remove("ghost");
        // A member whose room forgot it.
        t.rooms.get_mut("r").unwrap().members.retain(|&k| k != 1);
        assert!(t.check_consistency().is_err());
        t.rooms.get_mut("r").unwrap().members.push(1);
        assert_eq!(t.check_consistency(), Ok(()));
        // A ranking entry left behind by a count that changed.
        t.ranking.insert((Reverse(1), Rc::from("r")));
        assert!(t.check_consistency().unwrap_err().contains("ranked"));
        t.ranking.remove(&(Reverse(1), Rc::from("r")));
        assert_eq!(t.check_consistency(), Ok(()));
        // A name pointing at the wrong slot.
        t.names.insert(Rc::from("a"), 1);
        assert!(t.check_consistency().is_err());
    }

    #[test]
    fn busiest_follows_joins_and_leaves() {
        let mut t = tables(&["a", "b", "c"]);
        let order = |t: &Rooms| -> Vec<(String, usize)> {
            t.busiest().map(|(r, n)| (r.to_string(), n)).collect()
        };
        t.join(0, "x", 8);
        t.join(0, "y", 8);
        t.join(1, "y", 8);
        t.join(2, "z", 8);
        assert_eq!(
            order(&t),
            [("y".into(), 2), ("x".into(), 1), ("z".into(), 1)]
        );
        t.leave(1, "y");
        t.join(1, "z", 8);
        t.join(2, "x", 8);
        assert_eq!(
            order(&t),
            [("x".into(), 2), ("z".into(), 2), ("y".into(), 1)]
        );
        t.remove_member(0);
        assert_eq!(order(&t), [("z".into(), 2), ("x".into(), 1)]);
        assert_eq!(t.check_consistency(), Ok(()));
    }

    #[test]
    fn removal_leaves_nothing_behind() {
        let mut t = tables(&["a", "b"]);
        t.join(0, "r1", 8);
        t.join(0, "r2", 8);
        t.join(1, "r2", 8);
        let (m, rooms) = t.remove_member(0).unwrap();
        assert_eq!(&*m.name, "a");
        assert_eq!(rooms, vec![(Rc::from("r1"), true), (Rc::from("r2"), false)]);
        assert!(t.by_name("a").is_none());
        assert_eq!(t.names_in_capped("r2", 10).0, vec!["b"]);
        assert_eq!(t.member_count(), 1);
        assert_eq!(t.room_count(), 1);
        assert!(t.remove_member(0).is_none());
    }
}
