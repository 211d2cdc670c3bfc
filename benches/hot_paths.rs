//! Benchmarks of the hot pure paths: dispatching one broadcast into a
//! room, encoding an event, and queueing/flushing an outbox.
//!
//! A plain `main` (no harness dependency): each case runs for a fixed
//! number of iterations, several rounds, and prints the median, min and max
//! nanoseconds per operation. Run with `cargo bench`; compare figures only
//! within one run (the machine is shared and noisy).

use std::hint::black_box;
use std::io::{self, IoSlice, Write};
use std::time::Instant;

use loopchat::dispatch::{Clock, Dispatcher, Effects, SessionRequest, Settings};
use loopchat::outbox::Outbox;
use loopchat::protocol::{self, Limits};
use loopchat::store::memory::MemoryHistory;

const ROUNDS: usize = 7;

fn measure(name: &str, ops_per_round: u64, mut round: impl FnMut()) {
    let mut per_op: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            round();
            t.elapsed().as_nanos() as f64 / ops_per_round as f64
        })
        .collect();
    per_op.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name:<44} median {:>9.1} ns/op   min {:>9.1}   max {:>9.1}",
        per_op[ROUNDS / 2],
        per_op[0],
        per_op[ROUNDS - 1]
    );
}

fn settings() -> Settings {
    Settings {
        limits: Limits {
            max_message_bytes: 65536,
            max_content_bytes: 4096,
            max_rooms_per_user: 32,
            rate_per_s: u32::MAX / 2000,
            rate_burst: u32::MAX / 2000,
            history_limit: 50,
        },
        resume_max: 1000,
        refuse_unkept: false,
        reply_bytes: 128 * 1024,
    }
}

/// A dispatcher with `members` open members in room "r".
fn room_of(members: usize) -> Dispatcher {
    let mut d = Dispatcher::new(settings(), Box::new(MemoryHistory::new(1000)));
    let mut out = Effects::default();
    let now = Clock {
        mono_ms: 0,
        unix_ms: 1_700_000_000_000,
    };
    for key in 0..members {
        let req = SessionRequest {
            username: Some(format!("user{key}")),
            room: Some("r".into()),
        };
        d.admit(key, &req, now).expect("admit");
        d.open(key, None, &mut out);
        out.sends.clear();
    }
    d
}

/// A sink that accepts everything (a socket that is never full).
struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        self.0 += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn main() {
    let content = "x".repeat(60);
    let text = format!(r#"{{"type":"message","content":"{content}"}}"#);

    for members in [100usize, 1000] {
        let mut d = room_of(members);
        let mut out = Effects::default();
        let mut mono = 0;
        let n = 2000u64;
        // Counted per delivery (one broadcast reaches `members` outboxes);
        // multiply by the room size for the cost per message.
        let name = format!("dispatch broadcast, {members} members (per delivery)");
        measure(&name, n * members as u64, || {
            for _ in 0..n {
                mono += 1;
                let now = Clock {
                    mono_ms: mono,
                    unix_ms: 1_700_000_000_000 + mono,
                };
                d.handle_text(0, &text, now, &mut out);
                black_box(&out.sends);
                out.sends.clear();
            }
        });
    }

    let n = 100_000u64;
    measure("encode a message event", n, || {
        for id in 0..n {
            let frame = protocol::encode_frame(&protocol::Message {
                kind: "message",
                content: &content,
                room: "r",
                user: "alice",
                id,
                ts: 1_700_000_000_000,
                reference: None,
            });
            black_box(frame);
        }
    });
    measure("decode a message command", n, || {
        for _ in 0..n {
            black_box(protocol::decode(black_box(&text)).is_ok());
        }
    });

    let frame = protocol::text_frame(&format!(r#"{{"type":"message","content":"{content}"}}"#));
    let mut sink = Sink(0);
    let batch = 16u64;
    let rounds = 20_000u64;
    measure(
        "outbox: queue 16 frames + one writev (per frame)",
        batch * rounds,
        || {
            let mut o = Outbox::new();
            for _ in 0..rounds {
                for _ in 0..batch {
                    o.push(frame.clone());
                }
                o.write_to(&mut sink).expect("sink");
            }
        },
    );
    black_box(sink.0);
}
