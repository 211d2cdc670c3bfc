//! The plain-HTTP edges a new user and an operator meet: `HEAD` answers
//! exactly like `GET` without a body, other methods get 405 with `Allow`,
//! and `/name-check` tells the browser page why a name would be refused.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::{TestServer, DEADLINE};
use loopchat::store::memory::MemoryHistory;
use loopchat::store::{History, HistoryError, Kept};
use loopchat::Config;
use serde_json::Value;

/// Send `raw`, read the whole answer (the server closes after it).
fn exchange(addr: SocketAddr, raw: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s.write_all(raw.as_bytes()).expect("write");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).expect("read to EOF");
    answer
}

/// (status line and headers, body) of an answer.
fn split(answer: &[u8]) -> (String, Vec<u8>) {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head")
        + 4;
    (
        String::from_utf8_lossy(&answer[..end]).into_owned(),
        answer[end..].to_vec(),
    )
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// The header names of a head, in order (values of live counters differ).
fn header_names(head: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_string()))
        .collect()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

fn head_of(path: &str) -> String {
    format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

/// `HEAD` of every plain endpoint (the page, `/healthz`, `/stats`,
/// `/metrics`, `/name-check`, a 404, `/ws` without an upgrade) answers with
/// the `GET` answer's status line and headers, `Content-Length` included,
/// and no body.
#[test]
fn head_answers_like_get_without_a_body() {
    let server = TestServer::start();
    // Fixed answers: byte for byte the GET head.
    for path in ["/", "/healthz", "/nowhere", "/ws", "/name-check?username=x"] {
        let (get_head, get_body) = split(&exchange(server.addr, &get(path)));
        let answer = exchange(server.addr, &head_of(path));
        let (head, body) = split(&answer);
        assert_eq!(head, get_head, "HEAD {path}");
        assert!(body.is_empty(), "HEAD {path} sent a body: {body:?}");
        let length: usize = header(&head, "Content-Length")
            .expect("Content-Length")
            .parse()
            .expect("a number");
        assert_eq!(length, get_body.len(), "HEAD {path}");
    }
    // Live counters: same status and headers; the length is the body's
    // that GET would have sent then.
    for path in ["/stats", "/metrics"] {
        let (get_head, _) = split(&exchange(server.addr, &get(path)));
        let (head, body) = split(&exchange(server.addr, &head_of(path)));
        assert_eq!(head.lines().next(), get_head.lines().next(), "{path}");
        assert_eq!(header_names(&head), header_names(&get_head), "{path}");
        assert_eq!(
            header(&head, "Content-Type"),
            header(&get_head, "Content-Type")
        );
        assert!(body.is_empty(), "HEAD {path} sent a body");
        let length: usize = header(&head, "Content-Length").unwrap().parse().unwrap();
        assert!(length > 10, "{path}: Content-Length {length}");
    }
}

/// A HEAD with upgrade headers is not an upgrade: it gets the plain
/// answer's head (here the page's), never a 101.
#[test]
fn head_never_upgrades() {
    let server = TestServer::start();
    let raw = common::upgrade_request("/", "").replacen("GET", "HEAD", 1);
    let (head, body) = split(&exchange(server.addr, &raw));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(
        header(&head, "Content-Type"),
        Some("text/html; charset=utf-8")
    );
    assert!(body.is_empty());
}

/// Methods other than GET and HEAD get 405 with `Allow: GET, HEAD`.
#[test]
fn other_methods_get_405_with_allow() {
    let server = TestServer::start();
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let raw = format!("{method} /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        let (head, _) = split(&exchange(server.addr, &raw));
        assert!(head.starts_with("HTTP/1.1 405 "), "{method}: {head}");
        assert_eq!(header(&head, "Allow"), Some("GET, HEAD"), "{method}");
    }
}

/// Healthy but for `healthy()`: a store that says it is failing.
struct Failing(MemoryHistory);

impl History for Failing {
    fn reserve_id(&mut self, room: &str) -> Result<u64, HistoryError> {
        self.0.reserve_id(room)
    }
    fn append(&mut self, room: &str, msg: Kept) -> Result<(), HistoryError> {
        self.0.append(room, msg)
    }
    fn last(&mut self, room: &str, n: usize) -> Result<Vec<Kept>, HistoryError> {
        self.0.last(room, n)
    }
    fn after(&mut self, room: &str, since: u64, max: usize) -> Result<Vec<Kept>, HistoryError> {
        self.0.after(room, since, max)
    }
    fn before(
        &mut self,
        room: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Kept>, HistoryError> {
        self.0.before(room, before, limit)
    }
    fn release(&mut self, room: &str) {
        self.0.release(room)
    }
    fn healthy(&self) -> bool {
        false
    }
}

/// While the store is failing, `/healthz` answers 503 with the reason, and
/// `HEAD /healthz` the same status without the body.
#[test]
fn healthz_503_while_the_store_fails_and_head_says_so_too() {
    let server = TestServer::with_history(Config::for_tests(), |c| {
        Box::new(Failing(MemoryHistory::new(c.history_keep)))
    });
    let (head, body) = split(&exchange(server.addr, &get("/healthz")));
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert_eq!(body, b"history store is failing\n");
    let (head, body) = split(&exchange(server.addr, &head_of("/healthz")));
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert!(body.is_empty());
}

fn name_check(server: &TestServer, query: &str) -> Value {
    let (head, body) = split(&exchange(
        server.addr,
        &get(&format!("/name-check?{query}")),
    ));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "Content-Type"), Some("application/json"));
    serde_json::from_slice(&body).expect("JSON body")
}

/// `/name-check` answers whether an upgrade with that username (and room)
/// would be accepted and, if not, why: `taken` while a user holds the name
/// (free again once it left), `invalid` for a name breaking the rule,
/// `bad_room` for a bad room; no name is fine (a guest name is given).
#[test]
fn name_check_says_why_a_name_is_refused() {
    let server = TestServer::start();
    assert_eq!(name_check(&server, "username=alice")["ok"], true);
    let mut alice = server.client("alice");
    alice.opening();
    let taken = name_check(&server, "username=alice");
    assert_eq!(taken["ok"], false);
    assert_eq!(taken["reason"], "taken");
    assert_eq!(taken["content"], "alice is already connected");
    // The check agrees with the upgrade itself.
    assert!(common::Client::try_connect(&server.url("username=alice")).is_err());
    let invalid = name_check(&server, "username=no%20spaces");
    assert_eq!(
        (invalid["ok"].clone(), invalid["reason"].clone()),
        (false.into(), "invalid".into())
    );
    assert!(invalid["content"]
        .as_str()
        .unwrap()
        .contains("1-32 characters"));
    assert_eq!(
        name_check(&server, "username=bob&room=a%2Fb")["reason"],
        "bad_room"
    );
    assert_eq!(name_check(&server, "username=")["ok"], true);
    assert_eq!(name_check(&server, "")["ok"], true);
    drop(alice);
    server.wait_stats("alice gone", |s| s["members"] == 0);
    assert_eq!(name_check(&server, "username=alice")["ok"], true);
}
