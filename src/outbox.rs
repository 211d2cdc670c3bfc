//! A connection's bounded queue of outgoing frames, and the slow-consumer
//! decision.
//!
//! Frames are shared ([`Frame`] is reference-counted), so queueing a
//! broadcast for a member costs a pointer, not a copy. Everything queued
//! for one connection during a loop iteration leaves in one system call
//! when the loop flushes before sleeping (small frames gathered into one
//! buffer, up to 64 KiB; larger ones as a vectored `write`); leftovers wait
//! for the socket to become writable again.
//!
//! The slow-consumer policy, written down once: a connection whose unsent
//! bytes would exceed the bound is not waited for. Its queue is dropped,
//! it gets a close frame (1008, "slow consumer") if the socket takes it, and
//! it is closed; everyone else in its rooms keeps receiving as before. The
//! decision is [`Outbox::admits`]; it is pure and tested here without a
//! socket.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::protocol::Frame;

/// Most frames handed to one `writev` when the front frame is too large
/// to gather (see [`Outbox::write_some`]). Linux accepts 1024 (`IOV_MAX`);
/// the slice array (4 KiB) stays on the stack.
const MAX_IOVECS: usize = 256;

/// Queue capacity (in frames, 16 bytes each) kept when the rest is given
/// back (see [`Outbox::write_to`]). 64 covers a busy room's per-pass burst
/// without reallocating, and costs an idle connection at most 1 KiB.
const SHRINK_ABOVE: usize = 64;

/// Most queue capacity (in frames: 16 KiB) an empty queue keeps after a
/// flush. A saturated room's member uses a few hundred a pass; a burst
/// beyond this (a mass event's notices) is given back at once.
const KEEP_AT_MOST: usize = 1024;

/// Most bytes gathered into one buffer for one `write` (see
/// [`Outbox::write_some`]); a front frame this large or larger goes out
/// as it is, without a copy.
const GATHER_AT_MOST: usize = 64 * 1024;

thread_local! {
    /// The buffer small frames are gathered in before a `write`: one per
    /// thread, reused by every connection, so it costs 64 KiB once.
    static GATHERED: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(GATHER_AT_MOST));

    /// Unsent bytes in every outbox of this thread: one server runs on one
    /// thread, so this is its `/stats` `outbox_bytes`, kept as bytes are
    /// queued and leave instead of summed over the slab per request.
    static QUEUED_HERE: Cell<u64> = const { Cell::new(0) };
}

/// Unsent bytes in all outboxes of the calling thread.
pub fn queued_on_this_thread() -> u64 {
    QUEUED_HERE.get()
}

fn account(added: usize, removed: usize) {
    QUEUED_HERE.set(QUEUED_HERE.get() + added as u64 - removed as u64);
}

/// Unsent frames of one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    frames: VecDeque<Frame>,
    /// Bytes of the front frame already written: a frame can leave in
    /// pieces when the socket buffer fills mid-frame.
    front_sent: usize,
    /// Unsent bytes in total (what the bound applies to).
    queued: usize,
    /// The socket said `WouldBlock` and has not reported being writable
    /// since: writing now would only be told the same, after gathering up
    /// to 64 KiB for nothing (a stalled reader in a busy room is flushed
    /// every pass).
    stalled: bool,
}

/// What a flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Everything was written.
    All,
    /// The socket is full (`WouldBlock`); the rest waits for WRITABLE.
    Partly,
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Unsent bytes.
    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether `extra` more bytes fit under `limit`. Always true for an
    /// empty outbox, so that one frame larger than the bound still goes to
    /// a reader that keeps up. The dispatcher keeps every answer under half
    /// the bound (`Settings::reply_bytes`), so a new connection's 101,
    /// greeting and backlog fit together.
    pub fn admits(&self, extra: usize, limit: usize) -> bool {
        self.queued == 0 || self.queued + extra <= limit
    }

    /// Queue a frame (the bound is the caller's check, via [`Self::admits`]).
    pub fn push(&mut self, frame: Frame) {
        account(frame.len(), 0);
        self.queued += frame.len();
        self.frames.push_back(frame);
    }

    /// Drop every frame not yet started, keeping a partly written one so
    /// the byte stream stays well-framed. Returns the bytes released.
    pub fn discard_unstarted(&mut self) -> usize {
        let keep = usize::from(self.front_sent > 0);
        let before = self.queued;
        while self.frames.len() > keep {
            if let Some(f) = self.frames.pop_back() {
                self.queued -= f.len();
            }
        }
        if self.frames.capacity() > SHRINK_ABOVE {
            self.frames.shrink_to_fit();
        }
        account(0, before - self.queued);
        before - self.queued
    }

    /// Write as much as the socket takes, one [`Self::write_some`] at a
    /// time. Returns the bytes written and whether all went.
    ///
    /// Drains until `WouldBlock` (or empty): with edge-triggered readiness a
    /// WRITABLE event only comes after the socket was full, so stopping
    /// early with room left would strand the rest until some unrelated
    /// event.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<(usize, Flushed)> {
        if self.stalled {
            return Ok((0, Flushed::Partly));
        }
        let mut total = 0;
        let mut frames_sent = 0;
        while !self.frames.is_empty() {
            let written = match self.write_some(w) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stalled = true;
                    return Ok((total, Flushed::Partly));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += written;
            frames_sent += self.consume(written);
        }
        // Capacity a burst grew is kept while the flushes use it: a member
        // of a saturated room gets a hundred frames or more every pass, and
        // giving the memory back after each flush made every pass grow the
        // queue again (about 10% of the CPU per delivery, in reallocations
        // and page faults). A flush that used under a quarter of it shows
        // the burst is over; a connection that went quiet right after one
        // gives it back at its heartbeat ([`Outbox::release_spare`]); and
        // never more than KEEP_AT_MOST is kept.
        let capacity = self.frames.capacity();
        if capacity > SHRINK_ABOVE && (frames_sent < capacity / 4 || capacity > KEEP_AT_MOST) {
            self.frames.shrink_to(SHRINK_ABOVE);
        }
        Ok((total, Flushed::All))
    }

    /// The socket reported WRITABLE: the next flush writes again.
    pub fn socket_writable(&mut self) {
        self.stalled = false;
    }

    /// One system call's worth: the front frames, gathered into one buffer
    /// when there are several small ones, else as a vectored write.
    ///
    /// Why gather: a chat frame is about a hundred bytes, and the kernel's
    /// copy of an `iovec` costs about as much per segment as per kilobyte
    /// (each segment opens and closes user access and restarts the copy).
    /// One `memcpy` here of the frames a member got this pass, then one
    /// segment for the kernel, is cheaper than a hundred segments.
    fn write_some<W: Write>(&self, w: &mut W) -> io::Result<usize> {
        let front = match self.frames.front() {
            Some(f) => &f[self.front_sent..],
            None => return Ok(0),
        };
        if self.frames.len() > 1 && front.len() < GATHER_AT_MOST {
            return GATHERED.with_borrow_mut(|buf| {
                buf.clear();
                buf.extend_from_slice(front);
                for f in self.frames.iter().skip(1) {
                    if buf.len() + f.len() > GATHER_AT_MOST {
                        break;
                    }
                    buf.extend_from_slice(f);
                }
                w.write(buf)
            });
        }
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for (i, f) in self.frames.iter().take(MAX_IOVECS).enumerate() {
            slices[i] = IoSlice::new(if i == 0 { front } else { f });
            n += 1;
        }
        w.write_vectored(&slices[..n])
    }

    /// Give back queue capacity above [`SHRINK_ABOVE`] if nothing is
    /// queued (at each heartbeat, so a burst's memory is held at most one
    /// heartbeat interval by a connection that then goes quiet; and after
    /// every flush under `--memory-limit`).
    pub fn release_spare(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > SHRINK_ABOVE {
            self.frames.shrink_to(SHRINK_ABOVE);
        }
    }

    /// Queue capacity, in frames (for tests of the release rule).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.frames.capacity()
    }

    /// Account for `n` bytes having left, front first. Returns the frames
    /// that left whole.
    fn consume(&mut self, mut n: usize) -> usize {
        account(0, n);
        self.queued -= n;
        let mut done = 0;
        while n > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let rest = front.len() - self.front_sent;
            if n >= rest {
                n -= rest;
                self.front_sent = 0;
                self.frames.pop_front();
                done += 1;
            } else {
                self.front_sent += n;
                n = 0;
            }
        }
        done
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        account(0, self.queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `room` bytes, then says WouldBlock.
    struct Socket {
        got: Vec<u8>,
        room: usize,
        calls: usize,
    }

    impl Write for Socket {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
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

    fn frame(s: &str) -> Frame {
        Frame::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn busy_queues_keep_their_capacity_quiet_ones_give_it_back() {
        let mut o = Outbox::new();
        let mut s = Socket {
            got: vec![],
            room: usize::MAX,
            calls: 0,
        };
        // Saturated: every flush carries 200 frames; the queue is not
        // shrunk and grown again each time.
        for _ in 0..3 {
            for _ in 0..200 {
                o.push(frame("abc"));
            }
            o.write_to(&mut s).unwrap();
            assert!(o.capacity() >= 200, "{}", o.capacity());
        }
        // The burst is over: a flush of a few frames gives it back.
        o.push(frame("abc"));
        o.write_to(&mut s).unwrap();
        assert!(o.capacity() <= SHRINK_ABOVE, "{}", o.capacity());
        // Quiet right after a burst: the heartbeat gives it back.
        for _ in 0..200 {
            o.push(frame("abc"));
        }
        o.write_to(&mut s).unwrap();
        assert!(o.capacity() >= 200);
        o.release_spare();
        assert!(o.capacity() <= SHRINK_ABOVE, "{}", o.capacity());
        // A burst beyond KEEP_AT_MOST is given back at once.
        for _ in 0..KEEP_AT_MOST * 2 {
            o.push(frame("abc"));
        }
        o.write_to(&mut s).unwrap();
        assert!(o.capacity() <= SHRINK_ABOVE, "{}", o.capacity());
        // Never while frames wait.
        for _ in 0..200 {
            o.push(frame("abc"));
        }
        o.release_spare();
        assert_eq!(o.queued(), 600);
    }

    #[test]
    fn many_frames_leave_in_one_write() {
        let mut o = Outbox::new();
        for _ in 0..10 {
            o.push(frame("abc"));
        }
        let mut s = Socket {
            got: vec![],
            room: 1000,
            calls: 0,
        };
        assert_eq!(o.write_to(&mut s).unwrap(), (30, Flushed::All));
        assert_eq!(s.calls, 1);
        assert_eq!(o.queued(), 0);
    }

    #[test]
    fn partial_writes_resume_mid_frame() {
        let mut o = Outbox::new();
        o.push(frame("hello"));
        o.push(frame("world"));
        let mut s = Socket {
            got: vec![],
            room: 7,
            calls: 0,
        };
        assert_eq!(o.write_to(&mut s).unwrap(), (7, Flushed::Partly));
        assert_eq!(o.queued(), 3);
        // Until the socket reports WRITABLE, a flush does not call it.
        s.room = 100;
        let calls = s.calls;
        assert_eq!(o.write_to(&mut s).unwrap(), (0, Flushed::Partly));
        assert_eq!(s.calls, calls);
        o.socket_writable();
        assert_eq!(o.write_to(&mut s).unwrap(), (3, Flushed::All));
        assert_eq!(s.got, b"helloworld");
    }

    /// A socket that takes `room[i]` bytes at its i-th call and records
    /// how many segments each call was given.
    struct Recorder {
        got: Vec<u8>,
        room: Vec<usize>,
        segments: Vec<usize>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let Some(mut room) = self.room.get(self.segments.len()).copied() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            self.segments.push(bufs.len());
            let before = self.got.len();
            for b in bufs {
                let take = b.len().min(room);
                self.got.extend_from_slice(&b[..take]);
                room -= take;
            }
            Ok(self.got.len() - before)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn small_frames_are_gathered_into_one_segment_large_ones_go_as_they_are() {
        let mut o = Outbox::new();
        let mut want = Vec::new();
        // 1,000 chat-sized frames (100 KB), then one frame over the
        // gathering bound, then three small ones.
        for i in 0..1000u32 {
            let f = format!("{i:0100}");
            want.extend_from_slice(f.as_bytes());
            o.push(frame(&f));
        }
        let big = "b".repeat(GATHER_AT_MOST + 1);
        o.push(frame(&big));
        want.extend_from_slice(big.as_bytes());
        for f in ["x", "yy", "zzz"] {
            o.push(frame(f));
            want.extend_from_slice(f.as_bytes());
        }
        // The socket cuts the first write mid-frame: the next one starts
        // with the rest of that frame.
        let mut s = Recorder {
            got: vec![],
            room: vec![150, usize::MAX, usize::MAX, usize::MAX, usize::MAX],
            segments: vec![],
        };
        assert_eq!(o.write_to(&mut s).unwrap(), (want.len(), Flushed::All));
        assert_eq!(s.got, want);
        assert_eq!(o.queued(), 0);
        // 1: 64 KiB gathered, 150 bytes taken; 2: the rest of frame 1 and
        // as many whole frames as fit, gathered; 3: the remainder of the
        // small ones, gathered; 4: the large frame and the three after
        // it, as they are.
        assert_eq!(s.segments, vec![1, 1, 1, 4]);
    }

    #[test]
    fn slow_consumer_bound() {
        let mut o = Outbox::new();
        assert!(o.admits(500, 100), "an empty outbox takes any one frame");
        o.push(frame(&"x".repeat(60)));
        assert!(o.admits(40, 100));
        assert!(!o.admits(41, 100));
    }

    #[test]
    fn discard_keeps_a_started_frame() {
        let mut o = Outbox::new();
        o.push(frame("hello"));
        o.push(frame("world"));
        let mut s = Socket {
            got: vec![],
            room: 2,
            calls: 0,
        };
        o.write_to(&mut s).unwrap();
        assert_eq!(o.discard_unstarted(), 5);
        assert_eq!(o.queued(), 3);
        s.room = 100;
        o.socket_writable();
        o.write_to(&mut s).unwrap();
        assert_eq!(s.got, b"hello");
        let mut fresh = Outbox::new();
        fresh.push(frame("abc"));
        assert_eq!(fresh.discard_unstarted(), 3);
        assert!(fresh.is_empty());
    }
}
