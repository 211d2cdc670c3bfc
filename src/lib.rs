//! loopchat: a WebSocket chat server on one thread and one `mio` poll loop.
//!
//! It keeps the behaviour and wire format of a Go chat built on
//! gorilla/websocket (a hub with Register/Unregister/Broadcast channels,
//! ReadPump/WritePump goroutines per client) and replaces its goroutines
//! and channels with one loop: readiness events instead of pumps, room
//! tables instead of channels, one dispatcher instead of `Room.Run`.
//!
//! # Reading order
//!
//! 1. [`server`]: the loop. Poll, accept, route events by token, deliver,
//!    flush, reap, timers, shutdown; one pass in order, and the lists a
//!    pass keeps, head the file. Start here.
//! 2. [`conn`]: one socket's state machine (request head → open WebSocket
//!    → closing, flushing or lingering → gone), and the `Wire` through
//!    which tungstenite reads and writes.
//! 3. [`dispatch`]: the single router from commands to events; no socket
//!    I/O (the history behind it may touch the disk).
//! 4. [`rooms`]: the room tables, indexed both ways; no I/O.
//! 5. [`outbox`]: the bounded per-connection queue and the slow-consumer
//!    policy.
//! 6. [`timers`]: one cancelable deadline per connection, keyed by slab
//!    key and generation.
//! 7. [`protocol`], [`http`]: the wire formats.
//! 8. [`store`]: where message ids and history come from.
//! 9. [`cluster`]: cluster mode, several nodes through one Redis (the
//!    engine behind `dispatch/shared.rs`, its links on the same poll).
//!
//! # Tokens
//!
//! A connection's `mio::Token` is its slab key, counted up from zero. The
//! listener, the waker and the signal pipe use fixed tokens counted down
//! from `usize::MAX` (see `server.rs`), so the two ranges never meet.

pub mod cluster;
pub mod config;
pub mod conn;
pub mod dispatch;
pub mod http;
pub mod logger;
pub mod memory;
pub mod outbox;
pub mod protocol;
pub mod rate;
pub mod rooms;
pub mod server;
pub mod stats;
pub mod store;
pub mod timers;

pub use config::Config;
pub use server::{Server, ServerError, ServerHandle};
