//! One thread's event loop machinery: a `mio::Poll`, a `Waker` through which
//! the main thread announces phase changes, and a `Slab` of client
//! connections whose keys are their tokens — the client-side twin of the
//! server's loop. The scenario owns the loop body (`turn`, react, `flush`),
//! so each scenario reads top to bottom as one loop.
//!
//! Rules kept here: drain readiness until `WouldBlock` (in `Conn`); slab
//! keys are reused, so an ended connection is only removed at the start of the
//! next `turn`, after the scenario has seen its `Ended` event.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::conn::{Conn, ConnError, ConnEvent};
use crate::crew::{Note, Worker};
use crate::net::{self, SourceAddrs, Target};

/// The main thread's doorbell; no connection can have this key.
pub const WAKER: Token = Token(usize::MAX);

/// Timers are checked at most this often: per-connection deadlines are
/// seconds long, so scanning the slab 20 times a second is precise enough
/// and cheap even at 20,000 connections.
const EXPIRY_SCAN: Duration = Duration::from_millis(50);

/// Readiness events handled per poll call.
const EVENTS_CAPACITY: usize = 1024;

pub struct Driver<P> {
    poll: Poll,
    events: Events,
    conns: Slab<Conn<P>>,
    scratch: Vec<u8>,
    tmp: Vec<ConnEvent>,
    dirty: Vec<usize>,
    reap: Vec<usize>,
    /// Events raised outside `turn` (a failed flush, a close of a connection
    /// that was not open yet), handed out by the next `turn`.
    pending: Vec<(usize, ConnEvent)>,
    target: Arc<Target>,
    sources: SourceAddrs,
    connect_timeout: Duration,
    serial: u32,
    next_scan: Instant,
}

impl<P> Driver<P> {
    pub fn new(
        target: Arc<Target>,
        source_addrs: u32,
        thread: usize,
        connect_timeout: Duration,
    ) -> io::Result<(Self, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let sources = SourceAddrs::new(source_addrs, &target, thread as u32);
        let driver = Driver {
            poll,
            events: Events::with_capacity(EVENTS_CAPACITY),
            conns: Slab::new(),
            scratch: vec![0; 64 << 10],
            tmp: Vec::new(),
            dirty: Vec::new(),
            reap: Vec::new(),
            pending: Vec::new(),
            target,
            sources,
            connect_timeout,
            serial: (thread as u32).wrapping_mul(0x9E37_79B9),
            next_scan: Instant::now(),
        };
        Ok((driver, waker))
    }

    /// Worker `w`'s loop towards `target`, its waker already handed to the
    /// main thread (which waits for every worker's before a run starts).
    pub fn for_worker(
        w: &Worker,
        target: &Target,
        source_addrs: u32,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let (driver, waker) = Driver::new(
            Arc::new(target.clone()),
            source_addrs,
            w.index,
            connect_timeout,
        )
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
        w.note(Note::Ready(waker));
        Ok(driver)
    }

    /// Starts a connection with `params` appended to the URL's query.
    pub fn open(&mut self, params: &str, peer: P, now: Instant) -> Result<usize, ConnError> {
        let mut stream = net::connect_from(self.sources.next_addr(), self.target.addr)
            .map_err(ConnError::Socket)?;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        // Both interests, edge-triggered: WRITABLE fires once when the
        // connect completes and again only after a full send buffer drains.
        self.poll
            .registry()
            .register(
                &mut stream,
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(ConnError::Socket)?;
        self.serial = self.serial.wrapping_add(0x6D2B_79F5);
        let target = self.target.request_target(params);
        entry.insert(Conn::new(
            stream,
            &self.target.host,
            &target,
            peer,
            now,
            self.connect_timeout,
            self.serial,
        ));
        Ok(key)
    }

    /// Removes what ended last time, waits for readiness (at most `timeout`),
    /// and appends what happened to `out`. Returns true when the main thread
    /// rang the waker (a phase change to look at).
    pub fn turn(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<(usize, ConnEvent)>,
    ) -> io::Result<bool> {
        for key in self.reap.drain(..) {
            if let Some(mut conn) = self.conns.try_remove(key) {
                let _ = self.poll.registry().deregister(conn.stream_mut());
            }
        }
        let timeout = if self.pending.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        if let Err(e) = self.poll.poll(&mut self.events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let mut woken = false;
        for event in self.events.iter() {
            if event.token() == WAKER {
                woken = true;
                continue;
            }
            let key = event.token().0;
            // An event for a slot reaped in this very call cannot happen (the
            // reap ran before the poll), but a spurious one costs nothing.
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.ready(&mut self.scratch, &mut self.tmp);
            collect(key, &mut self.tmp, out, &mut self.reap);
        }
        for (key, event) in self.pending.drain(..) {
            if matches!(event, ConnEvent::Ended(_)) {
                self.reap.push(key);
            }
            out.push((key, event));
        }
        let now = Instant::now();
        if now >= self.next_scan {
            self.next_scan = now + EXPIRY_SCAN;
            for (key, conn) in self.conns.iter_mut() {
                conn.expire(now, &mut self.tmp);
                collect(key, &mut self.tmp, out, &mut self.reap);
            }
        }
        Ok(woken)
    }

    pub fn get(&mut self, key: usize) -> Option<&mut Conn<P>> {
        self.conns.get_mut(key)
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Queues a text message; it is written by the next `flush`.
    pub fn send_text(&mut self, key: usize, text: &str) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        let queued = conn.send_text(text);
        if queued && !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
        queued
    }

    pub fn close(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.close(now, &mut self.tmp);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(key);
        }
        // Reaped only after the scenario sees the event, in the next turn.
        self.pending.extend(self.tmp.drain(..).map(|e| (key, e)));
    }

    pub fn close_all(&mut self, now: Instant) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, now);
        }
    }

    /// Closes every socket at once without a close frame (a client whose
    /// process or network died); nothing is reported for them.
    pub fn drop_all(&mut self) {
        for mut conn in self.conns.drain() {
            let _ = self.poll.registry().deregister(conn.stream_mut());
        }
        self.dirty.clear();
        self.pending.clear();
        self.reap.clear();
    }

    /// Writes everything queued since the last call: one flush per
    /// connection per turn, however many messages it was given.
    pub fn flush(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            conn.dirty = false;
            conn.flush(&mut self.tmp);
            self.pending.extend(self.tmp.drain(..).map(|e| (key, e)));
        }
    }
}

fn collect(
    key: usize,
    from: &mut Vec<ConnEvent>,
    out: &mut Vec<(usize, ConnEvent)>,
    reap: &mut Vec<usize>,
) {
    for event in from.drain(..) {
        if matches!(event, ConnEvent::Ended(_)) {
            reap.push(key);
        }
        out.push((key, event));
    }
}
