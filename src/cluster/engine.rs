//! The Redis engine: what the dispatcher asks of the shared state, carried
//! out as Redis commands and scripts on two links (one pipelined command
//! link, one subscription link), and what Redis sends back, turned into
//! completions and publications.
//!
//! # Keys (prefix `lc:`; `docs/cluster.md` has sizes and expiry)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `lc:seq:{room}` | string | the room's last message id |
//! | `lc:history:{room}` | list | one entry per id, oldest first, the last one's id in `lc:seq:{room}`: `"{node} {ticket} {prefix}\x01{suffix}"` (the JSON is prefix, id, suffix), or `-` for an id skipped; trimmed to `--retain-messages` |
//! | `lc:user:{name}` | string | the node holding the name |
//! | `lc:names:{node}` | set | names a node holds |
//! | `lc:members:{room}` | hash | member name → node |
//! | `lc:node:{node}` | set | `"{room} {name}"` memberships of a node's members |
//! | `lc:rooms` | sorted set | room → member count, cluster-wide |
//! | `lc:nodes` | sorted set | node → last refresh (Redis's clock, ms) |
//! | channel `lc:{db}:events` | pub/sub | `B {room} {first id}` and one `"{node} {ticket} {prefix}\x01{suffix}"` a line, `P {room} {json}`, `D {to} {json}` |
//!
//! Every write that must be atomic is one Lua script (loaded with SCRIPT
//! LOAD, called with EVALSHA, resent as EVAL on NOSCRIPT). Message
//! acceptance is one script: id, history append, trim and publication, so
//! the id order, the stored order and the published order are the same.
//!
//! A publication is read where it lies: the subscription link lends each
//! payload from its input buffer, and every message in it becomes its
//! WebSocket frame with the id spliced in, one copy from the payload into
//! the frame ([`protocol::text_frame_of`]). A publish call's arguments are
//! encoded once, each message copied once into them ([`Args`]).
//!
//! Owns the two links and the id tracking; knows nothing about members or
//! sockets of clients.

use std::collections::HashMap;
use std::rc::Rc;

use mio::{Registry, Token};
use serde_json::value::RawValue;

use super::gap::{Entry, Fill, Sequences, FILL_BATCH};
use super::link::{Link, LinkEvent, Role};
use super::resp::{self, decimal, Args, Reply};
use super::url::RedisUrl;
use super::{Answer, Completion, Publication, Request, Ticket, Unavailable, Unnumbered};
use crate::protocol;
use crate::store::Kept;

/// Key prefix of everything loopchat writes.
pub const PREFIX: &str = "lc:";

/// Where the id goes in a stored or published message JSON: Redis does
/// not splice it in (that would be string work per message on Redis's one
/// core); the reader does. JSON never holds a raw control character.
const ID_MARK: char = '\u{1}';

/// Most messages in one publish script call (each is one argument, which
/// the script unpacks onto Lua's stack, which holds 8,000).
const MAX_BATCH: usize = 256;

/// How often the subscription link is pinged: a subscription that stopped
/// being served is noticed within this plus the reply deadline.
const PING_EVERY_MS: u64 = 1_000;

/// The engine's settings (from `--redis`, `--node-id`, `--node-ttl-ms`,
/// `--retain-messages`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub url: RedisUrl,
    pub node: String,
    pub ttl_ms: u64,
    pub retain: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Script {
    Publish,
    Enter,
    Part,
    Claim,
    Release,
    Direct,
    Refresh,
    Resync,
    Read,
}

impl Script {
    const ALL: [Script; 9] = [
        Script::Publish,
        Script::Enter,
        Script::Part,
        Script::Claim,
        Script::Release,
        Script::Direct,
        Script::Refresh,
        Script::Resync,
        Script::Read,
    ];

    fn body(self) -> &'static str {
        match self {
            Script::Publish => PUBLISH_LUA,
            Script::Enter => ENTER_LUA,
            Script::Part => PART_LUA,
            Script::Claim => CLAIM_LUA,
            Script::Release => RELEASE_LUA,
            Script::Direct => DIRECT_LUA,
            Script::Refresh => REFRESH_LUA,
            Script::Resync => RESYNC_LUA,
            Script::Read => READ_LUA,
        }
    }
}

/// Id, history append, trim and publication of a batch of messages of one
/// room (those a node accepted while its previous call for the room was
/// out), atomically. Each id is one above the previous; the first is one
/// above the larger of the stored counter and the node's high-water mark,
/// so that ids continue above every id served even when Redis came back
/// empty. Each message comes as one argument, `"{node} {ticket}
/// {prefix}\x01{suffix}"` (the message JSON with the id left out), and is
/// stored as it came: the history is a list whose last entry has the id in
/// the counter, one entry per id, so an entry's id is its position (see
/// [`READ_LUA`]). When ids jump (the counter is below the high-water mark:
/// Redis came back with less than the nodes served), the skipped ids get a
/// placeholder `-` each, or, if the jump is longer than the history kept,
/// the old entries go. One publication carries the whole batch: a header
/// line with the first id, then the arguments as they came, one a line
/// (JSON has no raw newline or \x01). Redis's work per message is taking
/// the argument in, the list push (a copy into the list's packed node) and
/// its line of the publication; the rest is per call, and at a low message
/// rate (one message a call) the call is the cost, so the common path is
/// three commands: `INCRBY` takes the ids (the high-water mark only
/// corrects it after a loss), `LTRIM` runs only when the push's length is
/// past `retain`, and no Lua number is turned into a command argument
/// (Redis formats those as floats). The publication is built by one
/// `table.concat`, the header put in the channel's slot of `ARGV` once the
/// channel is read: Redis's Lua hashes every byte of every string it
/// makes, so a second string of the whole batch (a `..` around the
/// concatenation) was a second pass over every message, about a tenth of
/// Redis's CPU at saturation by a profile.
const PUBLISH_LUA: &str = r#"
local n = #ARGV - 4
local last = redis.call('INCRBY', KEYS[1], n)
local id = last - n
local hwm = tonumber(ARGV[2])
local retain = tonumber(ARGV[3])
if hwm > id then
  local gap = hwm - id
  if gap >= retain then
    redis.call('DEL', KEYS[2])
  elseif redis.call('LLEN', KEYS[2]) > 0 then
    local holes = {}
    for i = 1, math.min(gap, 1000) do holes[i] = '-' end
    while gap > 0 do
      local k = math.min(gap, 1000)
      redis.call('RPUSH', KEYS[2], unpack(holes, 1, k))
      gap = gap - k
    end
  end
  id = hwm
  redis.call('SET', KEYS[1], string.format('%d', id + n))
end
local first = id + 1
if redis.call('RPUSH', KEYS[2], unpack(ARGV, 5)) > retain then
  redis.call('LTRIM', KEYS[2], '-' .. ARGV[3], '-1')
end
local channel = ARGV[4]
ARGV[4] = 'B ' .. ARGV[1] .. ' ' .. string.format('%d', first)
redis.call('PUBLISH', channel, table.concat(ARGV, '\n', 4))
return first
"#;

/// The Lua function both history readers share: entries of `log` with ids
/// above `after` and below `before` (`''`: no bound), at most `limit`, the
/// newest of the range or the oldest. The list's last entry has the id in
/// the counter `seq` and every entry is one id (placeholders included), so
/// ids are positions: no id is stored. Returns `{first id, {entries}}`,
/// ascending.
macro_rules! read_fn {
    () => {
        r#"
local function read(seq, log, after, before, limit, newest)
  local last = tonumber(redis.call('GET', seq) or '0')
  local base = last - redis.call('LLEN', log) + 1
  local lo, hi = base, last
  if after ~= '' then lo = math.max(lo, tonumber(after) + 1) end
  if before ~= '' then hi = math.min(hi, tonumber(before) - 1) end
  if hi - lo + 1 > limit then
    if newest then lo = hi - limit + 1 else hi = lo + limit - 1 end
  end
  if hi < lo then return last, {lo, {}} end
  return last, {lo, redis.call('LRANGE', log, lo - base, hi - base)}
end
"#
    };
}

/// A history page or a fill: KEYS counter, history; ARGV after, before,
/// limit, `1` for the newest of the range.
const READ_LUA: &str = concat!(
    read_fn!(),
    r#"
local _, page = read(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1')
return page
"#
);

/// Membership, the join notice (once), and the joiner's view: last id,
/// backlog, members; one script so the backlog and the notice agree.
const ENTER_LUA: &str = concat!(
    read_fn!(),
    r#"
if redis.call('HGET', KEYS[1], ARGV[2]) ~= ARGV[3] then
  if redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) == 1 then
    redis.call('ZINCRBY', KEYS[3], 1, ARGV[1])
  end
  redis.call('SADD', KEYS[2], ARGV[1] .. ' ' .. ARGV[2])
  redis.call('PUBLISH', ARGV[6], 'P ' .. ARGV[1] .. ' ' .. ARGV[7])
end
local last, backlog = read(KEYS[4], KEYS[5], ARGV[4], '', tonumber(ARGV[5]), ARGV[4] == '')
return {last, backlog, redis.call('HKEYS', KEYS[1])}
"#
);

const PART_LUA: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[2]) == ARGV[3] then
  redis.call('HDEL', KEYS[1], ARGV[2])
  if tonumber(redis.call('ZINCRBY', KEYS[3], -1, ARGV[1])) <= 0 then
    redis.call('ZREM', KEYS[3], ARGV[1])
  end
  redis.call('PUBLISH', ARGV[4], 'P ' .. ARGV[1] .. ' ' .. ARGV[5])
end
redis.call('SREM', KEYS[2], ARGV[1] .. ' ' .. ARGV[2])
return 1
"#;

const CLAIM_LUA: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('SADD', KEYS[2], ARGV[2])
  return 1
end
return 0
"#;

const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"#;

const DIRECT_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('PUBLISH', ARGV[3], 'D ' .. ARGV[1] .. ' ' .. ARGV[2])
return 1
"#;

/// The node's liveness, and the sweep of nodes gone quiet for the ttl:
/// their members leave (one notice each) and their names are freed. One
/// script, so two surviving nodes never both announce the same leave.
const REFRESH_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1])
local p = ARGV[4]
local cut = string.format('%d', now - tonumber(ARGV[2]))
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cut)
for _, d in ipairs(dead) do
  for _, e in ipairs(redis.call('SMEMBERS', p .. 'node:' .. d)) do
    local sp = string.find(e, ' ', 1, true)
    if sp then
      local room = string.sub(e, 1, sp - 1)
      local name = string.sub(e, sp + 1)
      local mk = p .. 'members:' .. room
      if redis.call('HGET', mk, name) == d then
        redis.call('HDEL', mk, name)
        if tonumber(redis.call('ZINCRBY', p .. 'rooms', -1, room)) <= 0 then
          redis.call('ZREM', p .. 'rooms', room)
        end
        redis.call('PUBLISH', ARGV[3], 'P ' .. room .. ' {"type":"leave","content":"' .. name .. ' left","room":"' .. room .. '","user":"' .. name .. '"}')
      end
    end
  end
  for _, n in ipairs(redis.call('SMEMBERS', p .. 'names:' .. d)) do
    if redis.call('GET', p .. 'user:' .. n) == d then redis.call('DEL', p .. 'user:' .. n) end
  end
  redis.call('DEL', p .. 'node:' .. d, p .. 'names:' .. d)
  redis.call('ZREM', KEYS[1], d)
end
return redis.call('ZCARD', KEYS[1])
"#;

/// After a (re)connect: make Redis's view of this node's members what the
/// node holds. Memberships and names Redis has for this node id but the
/// node does not (left during an outage, or a previous process with the
/// same `--node-id`) go, with one `leave` notice each; what the node holds
/// is put back without notices (presence in an outage is not replayed).
const RESYNC_LUA: &str = r#"
local node = ARGV[1]
local p = ARGV[2]
local n = tonumber(ARGV[3])
local ch = ARGV[4]
local names = {}
for i = 5, 4 + n do names[ARGV[i]] = true end
local want = {}
for i = 5 + n, #ARGV do want[ARGV[i]] = true end
for _, e in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not want[e] then
    local sp = string.find(e, ' ', 1, true)
    if sp then
      local room = string.sub(e, 1, sp - 1)
      local name = string.sub(e, sp + 1)
      local mk = p .. 'members:' .. room
      if redis.call('HGET', mk, name) == node then
        redis.call('HDEL', mk, name)
        if tonumber(redis.call('ZINCRBY', p .. 'rooms', -1, room)) <= 0 then
          redis.call('ZREM', p .. 'rooms', room)
        end
        redis.call('PUBLISH', ch, 'P ' .. room .. ' {"type":"leave","content":"' .. name .. ' left","room":"' .. room .. '","user":"' .. name .. '"}')
      end
    end
    redis.call('SREM', KEYS[1], e)
  end
end
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not names[name] then
    if redis.call('GET', p .. 'user:' .. name) == node then redis.call('DEL', p .. 'user:' .. name) end
    redis.call('SREM', KEYS[2], name)
  end
end
for name, _ in pairs(names) do
  redis.call('SET', p .. 'user:' .. name, node, 'NX')
  redis.call('SADD', KEYS[2], name)
end
for e, _ in pairs(want) do
  local sp = string.find(e, ' ', 1, true)
  if sp then
    local room = string.sub(e, 1, sp - 1)
    local name = string.sub(e, sp + 1)
    local mk = p .. 'members:' .. room
    if redis.call('HGET', mk, name) ~= node then
      if redis.call('HSET', mk, name, node) == 1 then
        redis.call('ZINCRBY', p .. 'rooms', 1, room)
      end
    end
    redis.call('SADD', KEYS[1], e)
  end
end
return 1
"#;

/// A message waiting for its room's batch.
type Unsent = (Ticket, Unnumbered);

/// What a reply on the command link answers.
#[derive(Debug)]
enum Tag {
    /// A dispatcher request; `eval` is kept for a NOSCRIPT resend.
    Req {
        ticket: Ticket,
        op: Op,
        eval: Option<Eval>,
    },
    Load(Script),
    Fill(Fill),
    Refresh,
}

#[derive(Debug)]
struct Eval {
    script: Script,
    /// numkeys, keys, then arguments.
    args: Args,
}

#[derive(Debug, Clone)]
enum Op {
    Claim,
    Enter {
        room: Rc<str>,
    },
    /// A batch of messages of `room`, in submission order.
    Publish {
        room: Rc<str>,
        tickets: Vec<Ticket>,
    },
    Page,
    Who,
    Rooms,
    Direct,
    /// No completion is wanted (release, part, resync).
    Quiet,
}

/// Running totals for `/stats`.
#[derive(Debug, Default, Clone)]
pub struct EngineCounters {
    pub commands: u64,
    pub publications: u64,
    pub fills: u64,
    pub filled: u64,
    pub link_failures: u64,
    pub noscript: u64,
}

/// The engine.
pub struct RedisEngine {
    cfg: EngineConfig,
    channel: String,
    cmd: Link<Tag>,
    sub: Link<()>,
    shas: Vec<Option<String>>,
    seqs: Sequences,
    /// Messages submitted and not sent yet: sent per room at the flush,
    /// or, while a publish call of their room is in flight, when it is
    /// answered.
    batch: Vec<(Ticket, Rc<str>, Unnumbered)>,
    /// Publish calls in flight per room. A room has at most one flush's
    /// worth of calls out: what arrives meanwhile waits for the answer and
    /// goes as one call, so that under load a call carries many messages
    /// (Redis's cost is mostly per call, not per message) and when idle a
    /// message goes at once.
    publishing: HashMap<Rc<str>, usize>,
    completions: Vec<Completion>,
    publications: Vec<Publication>,
    /// Room messages read from the subscription, in order, not handed over
    /// yet (the link fills this while it decodes; [`RedisEngine::absorb`]
    /// empties it).
    deliver: Vec<(Rc<str>, Entry)>,
    /// Fills the subscription's messages asked for, not issued yet.
    fills: Vec<Fill>,
    events: Vec<LinkEvent<Tag>>,
    sub_events: Vec<LinkEvent<()>>,
    next_refresh: u64,
    next_ping: u64,
    nodes: u64,
    /// Both links were ready after the last events (for the log line).
    was_healthy: bool,
    pub counters: EngineCounters,
}

impl RedisEngine {
    pub fn new(cfg: EngineConfig, cmd_token: Token, sub_token: Token, seed: u64) -> Self {
        let channel = format!("{PREFIX}{}:events", cfg.url.db);
        RedisEngine {
            cmd: Link::new(cmd_token, Role::Commands, seed),
            sub: Link::new(
                sub_token,
                Role::Subscriber {
                    channel: channel.clone(),
                },
                seed.rotate_left(17),
            ),
            channel,
            shas: vec![None; Script::ALL.len()],
            seqs: Sequences::new(),
            batch: Vec::new(),
            publishing: HashMap::new(),
            completions: Vec::new(),
            publications: Vec::new(),
            deliver: Vec::new(),
            fills: Vec::new(),
            events: Vec::new(),
            sub_events: Vec::new(),
            next_refresh: 0,
            next_ping: 0,
            nodes: 0,
            was_healthy: false,
            counters: EngineCounters::default(),
            cfg,
        }
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    /// Both links are ready: requests can be served.
    pub fn healthy(&self) -> bool {
        self.cmd.is_ready() && self.sub.is_ready()
    }

    /// Live nodes as of the last refresh (this one included).
    pub fn nodes(&self) -> u64 {
        if self.healthy() {
            self.nodes
        } else {
            0
        }
    }

    pub fn link_states(&self) -> (&'static str, &'static str) {
        (self.cmd.machine.name(), self.sub.machine.name())
    }

    pub fn in_flight(&self) -> usize {
        self.cmd.in_flight()
    }

    /// Whether `token` is one of the engine's links.
    pub fn owns(&self, token: Token) -> bool {
        token == self.cmd.token || token == self.sub.token
    }

    /// The nearest time [`RedisEngine::tick`] must run.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut next = [self.cmd.next_deadline(), self.sub.next_deadline()]
            .into_iter()
            .flatten()
            .min();
        if self.cmd.is_ready() {
            next = Some(next.map_or(self.next_refresh, |n| n.min(self.next_refresh)));
        }
        if self.sub.is_ready() {
            next = Some(next.map_or(self.next_ping, |n| n.min(self.next_ping)));
        }
        next
    }

    /// Deadlines and periodic work: reconnects, reply deadlines, the
    /// liveness refresh, the subscription ping.
    pub fn tick(&mut self, now: u64, registry: &Registry, wanted: &dyn Fn(&str) -> bool) {
        let mut events = std::mem::take(&mut self.events);
        self.cmd
            .tick(now, registry, &self.cfg.url, &mut events, &mut |_| {});
        let mut sub_events = std::mem::take(&mut self.sub_events);
        self.with_sub(wanted, |sub, url, sink| {
            sub.tick(now, registry, url, &mut sub_events, sink)
        });
        if self.sub.is_ready() && now >= self.next_ping {
            self.sub.ping(now);
            self.next_ping = now + PING_EVERY_MS;
            self.sub.flush_or_fail(now, registry, &mut sub_events);
        }
        if self.cmd.is_ready() && now >= self.next_refresh {
            self.refresh(now);
        }
        self.cmd.flush_or_fail(now, registry, &mut events);
        self.absorb(now, registry, events, sub_events, wanted);
    }

    /// Readiness on one of the engine's tokens.
    pub fn on_ready(
        &mut self,
        token: Token,
        now: u64,
        registry: &Registry,
        wanted: &dyn Fn(&str) -> bool,
    ) {
        let mut events = std::mem::take(&mut self.events);
        let mut sub_events = std::mem::take(&mut self.sub_events);
        if token == self.cmd.token {
            self.cmd
                .on_ready(now, registry, &self.cfg.url, &mut events, &mut |_| {});
        } else if token == self.sub.token {
            self.with_sub(wanted, |sub, url, sink| {
                sub.on_ready(now, registry, url, &mut sub_events, sink)
            });
        }
        self.absorb(now, registry, events, sub_events, wanted);
    }

    /// Run `io` on the subscription link with the sink its messages go
    /// to: a [`Receiver`] over the engine's id tracking and queues, so a
    /// message is taken from the link's buffer while the link holds it.
    fn with_sub(
        &mut self,
        wanted: &dyn Fn(&str) -> bool,
        io: impl FnOnce(&mut Link<()>, &RedisUrl, &mut dyn FnMut(&[u8])),
    ) {
        let mut rx = Receiver {
            node: &self.cfg.node,
            seqs: &mut self.seqs,
            publications: &mut self.publications,
            deliver: &mut self.deliver,
            fills: &mut self.fills,
            wanted,
        };
        io(&mut self.sub, &self.cfg.url, &mut |payload| {
            rx.message(payload)
        });
    }

    /// Write what requests queued. Call once per pass after submitting.
    pub fn flush(&mut self, now: u64, registry: &Registry, wanted: &dyn Fn(&str) -> bool) {
        self.send_batches(now);
        let mut events = std::mem::take(&mut self.events);
        self.cmd.flush_or_fail(now, registry, &mut events);
        let sub_events = std::mem::take(&mut self.sub_events);
        self.absorb(now, registry, events, sub_events, wanted);
    }

    /// Completions and publications gathered since the last call.
    pub fn take(&mut self) -> (Vec<Completion>, Vec<Publication>) {
        (
            std::mem::take(&mut self.completions),
            std::mem::take(&mut self.publications),
        )
    }

    /// Carry out one request. A request that cannot even be sent completes
    /// at once with [`Unavailable::NotSent`].
    pub fn submit(&mut self, now: u64, ticket: Ticket, request: Request) {
        let quiet = matches!(
            request,
            Request::Release { .. } | Request::Part { .. } | Request::Resync { .. }
        );
        if !quiet && !self.healthy() {
            // Either link down is "Redis unreachable" for the client (the
            // same rule as /healthz): nothing is sent, so nothing was done.
            // What expects no answer still goes when the command link is
            // up, so that presence stays right.
            self.completions.push(Completion {
                ticket,
                result: Err(Unavailable::NotSent),
            });
            return;
        }
        let request = match request {
            Request::Publish { room, json } => {
                // Sent at the next flush, with the other messages of the
                // room from this pass (and before the clones below: this
                // is the one request made per message).
                self.batch.push((ticket, room, json));
                return;
            }
            other => other,
        };
        let p = PREFIX;
        let node = self.cfg.node.clone();
        let ch = self.channel.clone();
        let (op, script, keys, argv): (Op, Option<Script>, Vec<String>, Vec<Vec<u8>>) =
            match request {
                Request::Claim { name } => (
                    Op::Claim,
                    Some(Script::Claim),
                    vec![format!("{p}user:{name}"), format!("{p}names:{node}")],
                    vec![node.into(), name.as_bytes().to_vec()],
                ),
                Request::Release { name } => (
                    Op::Quiet,
                    Some(Script::Release),
                    vec![format!("{p}user:{name}"), format!("{p}names:{node}")],
                    vec![node.into(), name.as_bytes().to_vec()],
                ),
                Request::Enter {
                    room,
                    name,
                    since,
                    max,
                    notice,
                } => (
                    Op::Enter { room: room.clone() },
                    Some(Script::Enter),
                    vec![
                        format!("{p}members:{room}"),
                        format!("{p}node:{node}"),
                        format!("{p}rooms"),
                        format!("{p}seq:{room}"),
                        format!("{p}history:{room}"),
                    ],
                    vec![
                        room.as_bytes().to_vec(),
                        name.as_bytes().to_vec(),
                        node.into(),
                        since.map_or_else(Vec::new, |s| s.to_string().into_bytes()),
                        max.to_string().into_bytes(),
                        ch.into(),
                        notice.into(),
                    ],
                ),
                Request::Part { room, name, notice } => (
                    Op::Quiet,
                    Some(Script::Part),
                    vec![
                        format!("{p}members:{room}"),
                        format!("{p}node:{node}"),
                        format!("{p}rooms"),
                    ],
                    vec![
                        room.as_bytes().to_vec(),
                        name.as_bytes().to_vec(),
                        node.into(),
                        ch.into(),
                        notice.into(),
                    ],
                ),
                Request::Publish { .. } => return,
                Request::Direct { to, json } => (
                    Op::Direct,
                    Some(Script::Direct),
                    vec![format!("{p}user:{to}")],
                    vec![to.into_bytes(), json.into(), ch.into()],
                ),
                Request::Resync { names, memberships } => {
                    let mut argv: Vec<Vec<u8>> = vec![
                        node.clone().into(),
                        p.into(),
                        names.len().to_string().into_bytes(),
                        ch.clone().into(),
                    ];
                    argv.extend(names.iter().map(|n| n.as_bytes().to_vec()));
                    argv.extend(
                        memberships
                            .iter()
                            .map(|(room, name)| format!("{room} {name}").into_bytes()),
                    );
                    (
                        Op::Quiet,
                        Some(Script::Resync),
                        vec![format!("{p}node:{node}"), format!("{p}names:{node}")],
                        argv,
                    )
                }
                Request::Page {
                    room,
                    before,
                    limit,
                } => (
                    Op::Page,
                    Some(Script::Read),
                    vec![format!("{p}seq:{room}"), format!("{p}history:{room}")],
                    vec![
                        Vec::new(),
                        before.map_or_else(Vec::new, |b| b.to_string().into_bytes()),
                        limit.to_string().into_bytes(),
                        b"1".to_vec(),
                    ],
                ),
                Request::Who { room } => {
                    let args = [b"HKEYS".to_vec(), format!("{p}members:{room}").into()];
                    return self.plain(now, ticket, Op::Who, &args);
                }
                Request::Rooms => {
                    let args: Vec<Vec<u8>> = vec![
                        b"ZREVRANGE".to_vec(),
                        format!("{p}rooms").into(),
                        b"0".to_vec(),
                        b"999".to_vec(),
                        b"WITHSCORES".to_vec(),
                    ];
                    return self.plain(now, ticket, Op::Rooms, &args);
                }
            };
        let Some(script) = script else {
            return;
        };
        let mut args = Args::new();
        args.push(decimal(keys.len() as u64, &mut [0; 20]));
        for key in &keys {
            args.push(key);
        }
        for arg in &argv {
            args.push(arg);
        }
        let eval = Eval { script, args };
        self.eval(now, ticket, op, eval);
    }

    /// One publish script call per room (at most [`MAX_BATCH`] messages
    /// each) for the messages waiting, except in rooms whose previous call
    /// is still out: theirs wait for its answer.
    fn send_batches(&mut self, now: u64) {
        if self.batch.is_empty() {
            return;
        }
        let mut rooms: Vec<(Rc<str>, Vec<Unsent>)> = Vec::new();
        let mut index: HashMap<Rc<str>, usize> = HashMap::new();
        let mut held = Vec::new();
        for (ticket, room, json) in std::mem::take(&mut self.batch) {
            if self.publishing.contains_key(&room) {
                held.push((ticket, room, json));
                continue;
            }
            let at = *index.entry(room.clone()).or_insert_with(|| {
                rooms.push((room.clone(), Vec::new()));
                rooms.len() - 1
            });
            rooms[at].1.push((ticket, json));
        }
        self.batch = held;
        let p = PREFIX.as_bytes();
        let mark = [ID_MARK as u8];
        let mut digits = [0; 20];
        for (room, messages) in rooms {
            for chunk in messages.chunks(MAX_BATCH) {
                let hwm = self.seqs.high(&room);
                // Each argument is written once, straight into the
                // command's encoding: a message is copied once on its way
                // to the link's output buffer (and once more into it).
                let r = room.as_bytes();
                // What the arguments take (each message with its node,
                // ticket, separators and bulk header: 40 bytes cover the
                // last four), so that a call of many messages is encoded
                // without regrowing.
                let node = self.cfg.node.len();
                let size: usize = chunk
                    .iter()
                    .map(|(_, json)| json.prefix().len() + json.suffix().len() + node + 40)
                    .sum();
                let mut args = Args::with_capacity(size + 4 * r.len() + 256);
                args.push("2");
                args.push_parts(&[p, b"seq:", r]);
                args.push_parts(&[p, b"history:", r]);
                args.push(r);
                args.push(decimal(hwm, &mut digits));
                args.push(decimal(self.cfg.retain, &mut digits));
                args.push(&self.channel);
                for (ticket, json) in chunk {
                    args.push_parts(&[
                        self.cfg.node.as_bytes(),
                        b" ",
                        decimal(*ticket, &mut digits).as_bytes(),
                        b" ",
                        json.prefix().as_bytes(),
                        &mark,
                        json.suffix().as_bytes(),
                    ]);
                }
                let tickets: Vec<Ticket> = chunk.iter().map(|(t, _)| *t).collect();
                let op = Op::Publish {
                    room: room.clone(),
                    tickets,
                };
                let eval = Eval {
                    script: Script::Publish,
                    args,
                };
                *self.publishing.entry(room.clone()).or_insert(0) += 1;
                self.eval(now, chunk[0].0, op, eval);
            }
        }
    }

    /// Every ticket `op` answers for, failed with `why`.
    fn fail_op(&mut self, ticket: Ticket, op: Op, why: Unavailable) {
        match op {
            Op::Quiet => {}
            Op::Publish { room, tickets } => {
                self.published(&room);
                for ticket in tickets {
                    self.completions.push(Completion {
                        ticket,
                        result: Err(why),
                    });
                }
            }
            _ => self.completions.push(Completion {
                ticket,
                result: Err(why),
            }),
        }
    }

    /// A publish call of `room` was answered (or failed).
    fn published(&mut self, room: &Rc<str>) {
        if let Some(n) = self.publishing.get_mut(room) {
            *n -= 1;
            if *n == 0 {
                self.publishing.remove(room);
            }
        }
    }

    fn plain(&mut self, now: u64, ticket: Ticket, op: Op, args: &[Vec<u8>]) {
        let tag = Tag::Req {
            ticket,
            op,
            eval: None,
        };
        self.counters.commands += 1;
        if let Err(tag) = self.cmd.send(now, tag, args) {
            self.refuse(tag);
        }
    }

    /// EVALSHA when the script is loaded, else EVAL.
    fn eval(&mut self, now: u64, ticket: Ticket, op: Op, eval: Eval) {
        self.counters.commands += 1;
        let script = eval.script;
        let sha = self.shas[script as usize].as_deref();
        // The encoded arguments go along in the tag, moved (not copied),
        // for a NOSCRIPT resend; the command is written from them there.
        let tag = Tag::Req {
            ticket,
            op,
            eval: Some(eval),
        };
        let sent = self.cmd.send_by(now, tag, |tag, out| {
            let Tag::Req {
                eval: Some(eval), ..
            } = tag
            else {
                return;
            };
            match sha {
                Some(sha) => resp::encode_with(out, &[b"EVALSHA", sha.as_bytes()], &eval.args),
                None => resp::encode_with(out, &[b"EVAL", script.body().as_bytes()], &eval.args),
            }
        });
        if let Err(tag) = sent {
            self.refuse(tag);
        }
    }

    fn refuse(&mut self, tag: Tag) {
        if let Tag::Req { ticket, op, .. } = tag {
            self.fail_op(ticket, op, Unavailable::NotSent);
        }
    }

    fn refresh(&mut self, now: u64) {
        self.next_refresh = now + (self.cfg.ttl_ms / 3).max(1);
        let sha = &self.shas[Script::Refresh as usize];
        let mut args: Vec<Vec<u8>> = match sha {
            Some(sha) => vec![b"EVALSHA".to_vec(), sha.clone().into_bytes()],
            None => vec![b"EVAL".to_vec(), REFRESH_LUA.as_bytes().to_vec()],
        };
        args.extend([
            b"1".to_vec(),
            format!("{PREFIX}nodes").into_bytes(),
            self.cfg.node.clone().into_bytes(),
            self.cfg.ttl_ms.to_string().into_bytes(),
            self.channel.clone().into_bytes(),
            PREFIX.as_bytes().to_vec(),
        ]);
        let _ = self.cmd.send(now, Tag::Refresh, &args);
    }

    fn issue_fills(&mut self, now: u64, fills: Vec<Fill>) {
        for fill in fills {
            self.counters.fills += 1;
            let args = self.fill_args(&fill);
            if let Err(Tag::Fill(fill)) = self.cmd.send(now, Tag::Fill(fill), &args) {
                self.seqs.fill_failed(&fill.room);
            }
        }
    }

    /// The read script's call for a fill (EVALSHA, or EVAL while the
    /// script is not loaded).
    fn fill_args(&self, fill: &Fill) -> Vec<Vec<u8>> {
        let mut args: Vec<Vec<u8>> = match &self.shas[Script::Read as usize] {
            Some(sha) => vec![b"EVALSHA".to_vec(), sha.clone().into_bytes()],
            None => vec![b"EVAL".to_vec(), READ_LUA.as_bytes().to_vec()],
        };
        args.extend([
            b"2".to_vec(),
            format!("{PREFIX}seq:{}", fill.room).into_bytes(),
            format!("{PREFIX}history:{}", fill.room).into_bytes(),
            fill.after.to_string().into_bytes(),
            fill.upto
                .map_or_else(Vec::new, |u| u.to_string().into_bytes()),
            FILL_BATCH.to_string().into_bytes(),
            b"0".to_vec(),
        ]);
        args
    }

    /// Turn link events into completions and publications.
    fn absorb(
        &mut self,
        now: u64,
        registry: &Registry,
        mut events: Vec<LinkEvent<Tag>>,
        mut sub_events: Vec<LinkEvent<()>>,
        wanted: &dyn Fn(&str) -> bool,
    ) {
        // Handling an event may produce more (a resend fails the link).
        // The subscription's messages were taken in as the link read them
        // (into `deliver` and `fills`, in order): their work is here too.
        while !events.is_empty()
            || !sub_events.is_empty()
            || !self.deliver.is_empty()
            || !self.fills.is_empty()
        {
            let mut deliver = std::mem::take(&mut self.deliver);
            let mut fills = std::mem::take(&mut self.fills);
            let mut resume = false;
            for event in sub_events.drain(..) {
                match event {
                    LinkEvent::Up => resume = true,
                    LinkEvent::Down(_) => self.counters.link_failures += 1,
                    LinkEvent::Reply(..) => {}
                }
            }
            for event in std::mem::take(&mut events) {
                match event {
                    LinkEvent::Up => {
                        log::info!("redis: command link ready ({})", self.cfg.url.addr);
                        for script in Script::ALL {
                            let args = [b"SCRIPT".as_slice(), b"LOAD", script.body().as_bytes()];
                            let _ = self.cmd.send(now, Tag::Load(script), &args);
                        }
                        self.refresh(now);
                        self.publications.push(Publication::Reconnected);
                        resume = true;
                    }
                    LinkEvent::Reply(tag, reply) => {
                        self.on_reply(now, tag, reply, wanted, &mut deliver, &mut fills)
                    }
                    LinkEvent::Down(lost) => {
                        self.counters.link_failures += 1;
                        for tag in lost {
                            match tag {
                                Tag::Req { ticket, op, .. } => {
                                    self.fail_op(ticket, op, Unavailable::Lost)
                                }
                                Tag::Fill(fill) => self.seqs.fill_failed(&fill.room),
                                _ => {}
                            }
                        }
                        // Messages held behind a call that is lost now were
                        // never sent.
                        for (ticket, ..) in std::mem::take(&mut self.batch) {
                            self.completions.push(Completion {
                                ticket,
                                result: Err(Unavailable::NotSent),
                            });
                        }
                        self.publishing.clear();
                    }
                }
            }
            if resume && self.healthy() {
                log::info!("redis: subscribed; filling rooms from their last ids");
                let more = self.seqs.resume(wanted);
                fills.extend(more);
            }
            self.hand_over(&mut deliver);
            // The queue keeps its capacity for the next read (nothing in
            // this loop reads the subscription).
            if self.deliver.is_empty() {
                self.deliver = deliver;
            }
            self.issue_fills(now, fills);
            // Messages held behind a call answered just now go out.
            self.send_batches(now);
            self.cmd.flush_or_fail(now, registry, &mut events);
        }
        self.events = events;
        self.sub_events = sub_events;
        let healthy = self.healthy();
        if healthy != self.was_healthy {
            self.was_healthy = healthy;
            match healthy {
                true => log::info!(
                    "cluster: node {} connected to redis {}",
                    self.cfg.node,
                    self.cfg.url.addr
                ),
                false => log::warn!(
                    "cluster: node {} lost redis {}; commands answer unavailable",
                    self.cfg.node,
                    self.cfg.url.addr
                ),
            }
        }
    }

    fn hand_over(&mut self, deliver: &mut Vec<(Rc<str>, Entry)>) {
        // The server takes the queue away whole at each round: one
        // reservation rather than a doubling per burst.
        self.publications.reserve(deliver.len());
        for (room, entry) in deliver.drain(..) {
            self.counters.publications += 1;
            self.publications.push(Publication::Message {
                room,
                id: entry.id,
                ticket: entry.ticket,
                frame: entry.frame,
            });
        }
    }

    /// The read script's `{first id, {entries}}`: the first id and the
    /// stored slots (placeholders of skipped ids included).
    fn slots(reply: &Reply) -> Option<(u64, &[Reply])> {
        let Reply::Array(parts) = reply else {
            return None;
        };
        let (Some(first), Some(Reply::Array(items))) =
            (parts.first().and_then(Reply::int), parts.get(1))
        else {
            return None;
        };
        Some((first.max(0) as u64, items))
    }

    /// The read script's reply as entries with their frames (ascending;
    /// placeholders left out), for a fill, and the number of stored slots
    /// it covered.
    fn entries(&self, reply: &Reply) -> (Vec<Entry>, usize) {
        let Some((first, items)) = Self::slots(reply) else {
            return (Vec::new(), 0);
        };
        let entries = (first..)
            .zip(items)
            .filter_map(|(id, item)| {
                let line = Line::parse(item.text()?, &self.cfg.node)?;
                Some(line.entry(id))
            })
            .collect();
        (entries, items.len())
    }

    /// The read script's reply as kept messages (a history page, a
    /// joiner's backlog): JSON, not frames.
    fn kept(&self, reply: &Reply) -> Vec<Kept> {
        let Some((first, items)) = Self::slots(reply) else {
            return Vec::new();
        };
        (first..)
            .zip(items)
            .filter_map(|(id, item)| {
                let line = Line::parse(item.text()?, &self.cfg.node)?;
                let raw = RawValue::from_string(line.json(id)).ok()?;
                Some(Kept {
                    id,
                    json: Rc::from(raw),
                })
            })
            .collect()
    }

    fn names(reply: &Reply) -> Vec<String> {
        match reply {
            Reply::Array(items) => items
                .iter()
                .filter_map(|r| r.text().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn on_reply(
        &mut self,
        now: u64,
        tag: Tag,
        reply: Reply,
        wanted: &dyn Fn(&str) -> bool,
        deliver: &mut Vec<(Rc<str>, Entry)>,
        fills: &mut Vec<Fill>,
    ) {
        match tag {
            Tag::Load(script) => match reply.text() {
                Some(sha) => self.shas[script as usize] = Some(sha.to_string()),
                None => log::warn!("redis: SCRIPT LOAD {script:?} failed: {reply:?}"),
            },
            Tag::Refresh => match reply {
                Reply::Int(n) => self.nodes = n.max(0) as u64,
                Reply::Error(e) if e.starts_with("NOSCRIPT") => {
                    self.shas[Script::Refresh as usize] = None
                }
                other => log::warn!("redis: refresh failed: {other:?}"),
            },
            Tag::Fill(fill) => {
                if let Reply::Error(e) = &reply {
                    if e.starts_with("NOSCRIPT") {
                        // Redis lost its script cache: this fill goes again
                        // with the body, and the script is loaded again.
                        self.shas[Script::Read as usize] = None;
                        let args = [b"SCRIPT".as_slice(), b"LOAD", READ_LUA.as_bytes()];
                        let _ = self.cmd.send(now, Tag::Load(Script::Read), &args);
                        return self.issue_fills(now, vec![fill]);
                    }
                    log::warn!("redis: fill of {} refused: {e}", fill.room);
                }
                let (entries, slots) = self.entries(&reply);
                self.counters.filled += entries.len() as u64;
                let want = wanted(&fill.room);
                let full = slots >= FILL_BATCH;
                self.seqs
                    .filled(&fill.room, entries, full, want, deliver, fills);
            }
            Tag::Req { ticket, op, eval } => {
                if let Reply::Error(e) = &reply {
                    if e.starts_with("NOSCRIPT") {
                        if let Some(eval) = eval {
                            // Redis lost its script cache (restart, SCRIPT
                            // FLUSH): send the body this once, load again.
                            self.counters.noscript += 1;
                            let script = eval.script;
                            self.shas[script as usize] = None;
                            let args = [b"SCRIPT".as_slice(), b"LOAD", script.body().as_bytes()];
                            let _ = self.cmd.send(now, Tag::Load(script), &args);
                            return self.eval(now, ticket, op, eval);
                        }
                    }
                    log::warn!("redis: {op:?} refused: {e}");
                    return self.fail_op(ticket, op, Unavailable::Refused);
                }
                let answer = match op {
                    Op::Quiet => return,
                    Op::Claim => Answer::Claimed(reply.int() == Some(1)),
                    Op::Direct => Answer::Delivered(reply.int() == Some(1)),
                    Op::Publish { room, tickets } => {
                        self.published(&room);
                        let first = reply.int().and_then(|f| u64::try_from(f).ok());
                        self.completions.reserve(tickets.len());
                        for (i, ticket) in tickets.into_iter().enumerate() {
                            let id = first.map_or(0, |f| f + i as u64);
                            self.seqs.note(&room, id);
                            self.completions.push(Completion {
                                ticket,
                                result: Ok(Answer::Published(id)),
                            });
                        }
                        return;
                    }
                    Op::Page => Answer::Page(self.kept(&reply)),
                    Op::Who => Answer::Users(Self::names(&reply)),
                    Op::Rooms => {
                        let Reply::Array(items) = &reply else {
                            return;
                        };
                        let rooms = items
                            .chunks(2)
                            .filter_map(|pair| {
                                let room = pair.first()?.text()?.to_string();
                                let n = pair.get(1)?.text()?.parse::<f64>().ok()?;
                                (n >= 1.0).then_some((room, n as u64))
                            })
                            .collect();
                        Answer::Rooms(rooms)
                    }
                    Op::Enter { room } => {
                        let Reply::Array(parts) = &reply else {
                            return;
                        };
                        let last_id = parts.first().and_then(Reply::int).unwrap_or(0).max(0) as u64;
                        let backlog = parts.get(1).map(|r| self.kept(r)).unwrap_or_default();
                        let users = parts.get(2).map(Self::names).unwrap_or_default();
                        let last_id = backlog.last().map_or(last_id, |e| e.id.max(last_id));
                        self.seqs.entered(&room, last_id);
                        Answer::Entered {
                            last_id,
                            backlog,
                            users,
                        }
                    }
                };
                self.completions.push(Completion {
                    ticket,
                    result: Ok(answer),
                });
            }
        }
    }
}

/// A message as stored and published, `"{node} {ticket} {prefix}\x01{suffix}"`,
/// split where it lies: the id goes between prefix and suffix.
struct Line<'a> {
    /// Set when this node published it (the sender's copy carries its
    /// `ref`).
    ticket: Option<Ticket>,
    prefix: &'a str,
    suffix: &'a str,
}

impl<'a> Line<'a> {
    /// `node`: this node's name.
    fn parse(text: &'a str, node: &str) -> Option<Line<'a>> {
        let mut parts = text.splitn(3, ' ');
        let (from, ticket, json) = (parts.next()?, parts.next()?, parts.next()?);
        let ticket = match from == node {
            true => ticket.parse().ok(),
            false => None,
        };
        let (prefix, suffix) = json.split_once(ID_MARK)?;
        Some(Line {
            ticket,
            prefix,
            suffix,
        })
    }

    /// The message with id `id`, as its frame: the one copy of its bytes
    /// between the subscription's buffer and the members' outboxes.
    fn entry(&self, id: u64) -> Entry {
        let mut digits = [0; 20];
        Entry {
            id,
            ticket: self.ticket,
            frame: protocol::text_frame_of(&[self.prefix, decimal(id, &mut digits), self.suffix]),
        }
    }

    /// The message with id `id`, as JSON text (a history page).
    fn json(&self, id: u64) -> String {
        format!("{}{id}{}", self.prefix, self.suffix)
    }
}

/// What taking in a subscription message needs of the engine, borrowed
/// field by field while the subscription link lends the message (see
/// [`RedisEngine::with_sub`]).
struct Receiver<'e> {
    node: &'e str,
    seqs: &'e mut Sequences,
    publications: &'e mut Vec<Publication>,
    deliver: &'e mut Vec<(Rc<str>, Entry)>,
    fills: &'e mut Vec<Fill>,
    wanted: &'e dyn Fn(&str) -> bool,
}

impl Receiver<'_> {
    /// One publication on the channel.
    fn message(&mut self, payload: &[u8]) {
        let Ok(payload) = std::str::from_utf8(payload) else {
            return;
        };
        if let Some(batch) = payload.strip_prefix("B ") {
            return self.batch(batch);
        }
        let (kind, rest) = payload.split_once(' ').unwrap_or((payload, ""));
        match kind {
            "P" => {
                if let Some((room, json)) = rest.split_once(' ') {
                    self.publications.push(Publication::Presence {
                        room: Rc::from(room),
                        json: json.to_string(),
                    });
                }
            }
            "D" => {
                if let Some((to, json)) = rest.split_once(' ') {
                    self.publications.push(Publication::Direct {
                        to: to.to_string(),
                        json: json.to_string(),
                    });
                }
            }
            _ => log::debug!("redis: unknown publication {kind:?}"),
        }
    }

    /// A batch of room messages: `{room} {first id}`, then one entry a
    /// line, ids counting up from the first.
    fn batch(&mut self, batch: &str) {
        let mut lines = batch.split('\n');
        let Some((room, first)) = lines.next().and_then(|h| h.split_once(' ')) else {
            return;
        };
        let Ok(first) = first.parse::<u64>() else {
            return;
        };
        let room = self.seqs.name(room);
        let want = (self.wanted)(&room);
        for (id, line) in (first..).zip(lines) {
            if let Some(line) = Line::parse(line, self.node) {
                self.seqs
                    .arrive(&room, line.entry(id), want, self.deliver, self.fills);
            }
        }
    }
}
