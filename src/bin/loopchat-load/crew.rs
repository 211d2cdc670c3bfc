//! The threads of a run and how the main thread steers them. Each worker
//! runs one event loop (`driver.rs`) over its share of the connections; the
//! main thread never touches a socket. It only moves the run through its
//! phases (setup → go → stop), waking every loop through its `Waker` — so a
//! phase change reaches a loop as a readiness event, like everything else —
//! and reads the shared counters for the progress line.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;

pub const SETUP: u8 = 0;
pub const GO: u8 = 1;
pub const STOP: u8 = 3;
/// `mass`: every session leaves at once (between `GO` and `STOP`).
pub const LEAVE: u8 = 2;

/// The server's limits as its `welcome` announced them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub rate_per_s: f64,
    pub rate_burst: f64,
}

/// Live totals across all threads, for the progress line. Exact results
/// come from each worker's own report at the end, not from these.
#[derive(Default)]
pub struct Counters {
    pub opened: AtomicU64,
    pub failed: AtomicU64,
    pub joined: AtomicU64,
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub cycles: AtomicU64,
}

pub struct Shared {
    phase: AtomicU8,
    /// Shared clock origin: timestamps in message contents are microseconds
    /// since this instant, so any thread can compute a message's latency.
    pub epoch: Instant,
    go_at_us: AtomicU64,
    pub counters: Counters,
    pub limits: OnceLock<Limits>,
    /// Fanout: which senders reached their room (set before `Settled`).
    pub sender_ok: Vec<AtomicBool>,
    /// Churn: the next cycle number to hand out, shared so threads balance.
    pub next_cycle: AtomicU64,
}

impl Shared {
    pub fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    /// When senders start (set before the phase turns to `GO`).
    pub fn go_at(&self) -> Instant {
        self.epoch + Duration::from_micros(self.go_at_us.load(Ordering::SeqCst))
    }

    pub fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }
}

pub enum Note {
    Ready(Arc<Waker>),
    /// Every connection of this worker is set up (or has failed).
    Settled,
    /// This worker has nothing more to do before `STOP`.
    Done,
    Fatal(String),
}

#[derive(Debug)]
pub enum RunError {
    Spawn(std::io::Error),
    /// A worker's loop failed (poll error) or panicked.
    Worker(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Spawn(e) => write!(f, "cannot start a worker thread: {e}"),
            RunError::Worker(why) => write!(f, "worker failed: {why}"),
        }
    }
}

/// What a worker thread gets: its index and the way back to the main thread.
pub struct Worker {
    pub index: usize,
    pub threads: usize,
    pub shared: Arc<Shared>,
    tx: Sender<Note>,
}

impl Worker {
    pub fn note(&self, note: Note) {
        // The main thread outlives every worker unless it panicked.
        let _ = self.tx.send(note);
    }

    /// The items `0..total` that belong to this worker (round-robin).
    pub fn share(&self, total: u64) -> impl Iterator<Item = u64> {
        (self.index as u64..total).step_by(self.threads)
    }
}

pub struct Crew<R> {
    pub shared: Arc<Shared>,
    wakers: Vec<Arc<Waker>>,
    rx: Receiver<Note>,
    handles: Vec<JoinHandle<R>>,
    /// Workers that reported Settled / Done.
    pub settled: usize,
    pub done: usize,
    pub threads: usize,
}

impl<S: Send + 'static> Crew<Result<S, String>> {
    /// [`Crew::spawn`] for a scenario: each worker runs `body` with its own
    /// copy of the options, and a worker that fails says so with
    /// [`Note::Fatal`] before it ends, so the run can stop early.
    pub fn spawn_scenario<O, F>(
        threads: usize,
        senders: usize,
        options: &O,
        body: F,
    ) -> Result<Self, RunError>
    where
        O: Clone + Send + Sync + 'static,
        F: Fn(&Worker, &O) -> Result<S, String> + Send + Sync + 'static,
    {
        let options = options.clone();
        Crew::spawn(threads, senders, move |w| {
            let r = body(w, &options);
            if let Err(why) = &r {
                w.note(Note::Fatal(why.clone()));
            }
            r
        })
    }
}

impl<R: Send + 'static> Crew<R> {
    /// Starts `threads` workers running `body` and waits until each has its
    /// loop (and waker) ready.
    pub fn spawn<F>(threads: usize, senders: usize, body: F) -> Result<Crew<R>, RunError>
    where
        F: Fn(&Worker) -> R + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(SETUP),
            epoch: Instant::now(),
            go_at_us: AtomicU64::new(0),
            counters: Counters::default(),
            limits: OnceLock::new(),
            sender_ok: (0..senders).map(|_| AtomicBool::new(false)).collect(),
            next_cycle: AtomicU64::new(0),
        });
        let body = Arc::new(body);
        let (tx, rx) = mpsc::channel();
        let mut crew = Crew {
            shared,
            wakers: Vec::new(),
            rx,
            handles: Vec::new(),
            settled: 0,
            done: 0,
            threads,
        };
        for index in 0..threads {
            let worker = Worker {
                index,
                threads,
                shared: crew.shared.clone(),
                tx: tx.clone(),
            };
            let body = body.clone();
            let handle = std::thread::Builder::new()
                .name(format!("load-{index}"))
                .spawn(move || body(&worker))
                .map_err(RunError::Spawn)?;
            crew.handles.push(handle);
        }
        while crew.wakers.len() < threads {
            match crew.rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Note::Ready(waker)) => crew.wakers.push(waker),
                Ok(Note::Fatal(why)) => return Err(crew.abort(why)),
                Ok(_) => {}
                Err(_) => return Err(crew.abort("a worker did not start".into())),
            }
        }
        Ok(crew)
    }

    fn abort(self, why: String) -> RunError {
        self.set_phase(STOP);
        RunError::Worker(why)
    }

    pub fn set_phase(&self, phase: u8) {
        self.shared.phase.store(phase, Ordering::SeqCst);
        for waker in &self.wakers {
            let _ = waker.wake();
        }
    }

    /// Sets the senders' start time and opens the `GO` phase.
    pub fn go(&self, at: Instant) {
        self.shared
            .go_at_us
            .store(self.shared.micros(at), Ordering::SeqCst);
        self.set_phase(GO);
    }

    /// Waits for the next note until `until`; counts Settled/Done. A fatal
    /// worker error is returned as an error.
    pub fn wait(&mut self, until: Instant) -> Result<(), RunError> {
        let timeout = until.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(timeout) {
            Ok(Note::Settled) => self.settled += 1,
            Ok(Note::Done) => self.done += 1,
            Ok(Note::Fatal(why)) => {
                self.set_phase(STOP);
                return Err(RunError::Worker(why));
            }
            Ok(Note::Ready(_)) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(RunError::Worker("all workers exited".into()))
            }
        }
        Ok(())
    }

    /// Stops the run and collects every worker's report.
    pub fn finish(self) -> Result<Vec<R>, RunError> {
        self.set_phase(STOP);
        let mut out = Vec::new();
        for handle in self.handles {
            out.push(
                handle
                    .join()
                    .map_err(|_| RunError::Worker("a worker panicked".into()))?,
            );
        }
        Ok(out)
    }
}

/// The live progress line on stderr: silent for the first second, then
/// refreshed once a second (in place on a terminal, one line each otherwise).
pub struct Progress {
    start: Instant,
    next: Instant,
    enabled: bool,
    tty: bool,
    printed: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        let start = Instant::now();
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        Progress {
            start,
            next: start + Duration::from_secs(1),
            enabled,
            tty,
            printed: false,
        }
    }

    /// When the next line is due (a wait bound for the main loop).
    pub fn next_due(&self) -> Instant {
        if self.enabled {
            self.next
        } else {
            self.start + Duration::from_secs(3600)
        }
    }

    pub fn tick(&mut self, line: impl FnOnce(f64) -> String) {
        let now = Instant::now();
        if !self.enabled || now < self.next {
            return;
        }
        self.next = now + Duration::from_secs(1);
        let text = line(now.duration_since(self.start).as_secs_f64());
        if self.tty {
            eprint!("\r\x1b[K{text}");
        } else {
            eprintln!("{text}");
        }
        self.printed = true;
    }

    pub fn clear(&mut self) {
        if self.printed && self.tty {
            eprint!("\r\x1b[K");
        }
        self.printed = false;
    }
}
