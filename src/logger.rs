//! A small logger for the `log` facade: one line per record on stderr,
//! `LEVEL target: message`, with a timestamp relative to start.
//!
//! Small on purpose (no dependency, no formatting machinery): a server on a
//! Raspberry Pi logs to journald, which adds wall-clock time itself.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

struct Stderr {
    started: Instant,
}

static LOGGER: OnceLock<Stderr> = OnceLock::new();

impl log::Log for Stderr {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.started.elapsed();
        // One write per line so lines from the sync thread never interleave.
        let line = format!(
            "{:>6}.{:03} {:<5} {}: {}\n",
            t.as_secs(),
            t.subsec_millis(),
            record.level(),
            record.target(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Install the logger at `level`. Calling it again only changes the level.
pub fn init(level: log::LevelFilter) {
    let logger = LOGGER.get_or_init(|| Stderr {
        started: Instant::now(),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}
