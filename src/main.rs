//! The `loopchat` binary: command line → [`Config`] → [`Server::bind`] →
//! [`Server::run`]. Exit codes: 0 after a clean shutdown, 1 when the store
//! cannot be opened or the loop fails, 2 for a bad command line or a server
//! that cannot start otherwise.

use std::process::ExitCode;

use loopchat::config::{self, Parsed};
use loopchat::{Config, Server, ServerError};

/// The heap, counted: what `--memory-limit` and `/stats`'
/// `memory_used_bytes` measure (see `src/memory.rs`).
#[global_allocator]
static HEAP: loopchat::memory::Counting = loopchat::memory::Counting;

fn main() -> ExitCode {
    let mut config = match Config::from_args(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(config)) => *config,
        Ok(Parsed::Help) => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("loopchat {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loopchat: {e}");
            return ExitCode::from(2);
        }
    };
    loopchat::logger::init(config.log_level);
    // `--data-dir` is relative to wherever the server was started: from
    // here on, every log line names the directory it really uses.
    if let Ok(dir) = std::path::absolute(&config.data_dir) {
        config.data_dir = dir;
    }
    let history = if let Some(url) = &config.redis {
        format!("redis {} (cluster mode)", url.addr)
    } else if config.persist {
        format!("{} (fsync {})", config.data_dir.display(), config.fsync)
    } else {
        "memory only".to_string()
    };
    let server = match Server::bind(config.clone()) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("loopchat: {e}");
            // The flags were fine; the data dir or its database is not.
            let store = matches!(e, ServerError::Store(_));
            return ExitCode::from(if store { 1 } else { 2 });
        }
    };
    log::info!(
        "listening on ws://{}/ws (history: {history}; max {} connections, {} B messages, {} B outbox)",
        server.local_addr(),
        server.max_connections(),
        config.max_message_bytes,
        config.max_outbox_bytes,
    );
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}
