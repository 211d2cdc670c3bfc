//! The operator's counters: `/stats` and `/metrics` move as connections and
//! messages do, and the Prometheus text parses.

mod common;

use common::TestServer;
use serde_json::json;

/// Counters follow sessions, rooms, messages and bytes.
#[test]
fn stats_move_with_traffic() {
    let server = TestServer::start();
    let before = server.stats();
    assert_eq!(before["connections"], 0);
    assert_eq!(before["rooms"], 0);
    assert_eq!(before["messages"], 0);

    let mut a = server.client_with("username=a&room=r1");
    a.opening();
    let mut b = server.client_with("username=b&room=r2");
    b.opening();
    a.say("one");
    a.say("two");
    b.say("three");

    let s = server.wait_stats("two sessions and three messages", |s| {
        s["connections"] == 2 && s["messages"] == 3
    });
    assert_eq!(s["rooms"], 2);
    assert_eq!(s["members"], 2);
    assert_eq!(s["sessions_opened"], 2);
    assert!(s["bytes_in"].as_u64().unwrap() > before["bytes_in"].as_u64().unwrap());
    assert!(s["bytes_out"].as_u64().unwrap() > before["bytes_out"].as_u64().unwrap());
    assert!(s["loop_iterations"].as_u64().unwrap() > 0);
    assert_eq!(s["connections_by_state"]["open"], 2);

    drop(a);
    let s = server.wait_stats("a gone", |s| s["connections"] == 1);
    assert_eq!(s["rooms"], 1);
    assert_eq!(s["sessions_closed"], 1);
}

/// Refusals are counted by reason.
#[test]
fn rejections_are_counted() {
    let server = TestServer::start();
    server.get("/nope");
    server.get("/nope");
    let mut a = server.client("taken");
    a.opening();
    let (status, _) = server.http(common::upgrade_request("/ws?username=taken", "").as_bytes());
    assert_eq!(status, 409);
    a.send(json!({"type":"message","content":"x".repeat(5000)}));
    assert_eq!(a.expect("error")["code"], "too_long");
    let s = server.stats();
    assert_eq!(s["rejected"]["not_found"], 2);
    assert_eq!(s["rejected"]["taken"], 1);
    assert_eq!(s["errors_sent"], 1);
}

/// `/metrics` is Prometheus text: HELP/TYPE lines, `loopchat_` names,
/// counters ending in `_total`, numeric values, and it tracks `/stats`.
#[test]
fn metrics_parse_and_track() {
    let server = TestServer::start();
    let mut a = server.client("alice");
    a.opening();
    for i in 0..4 {
        a.say(&format!("m{i}"));
    }
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    let mut seen = std::collections::HashMap::new();
    let mut types = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let name = series.split('{').next().unwrap();
        assert!(name.starts_with("loopchat_"), "{line}");
        // A histogram's series are its name with _bucket, _sum, _count.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(name);
        let kind = types
            .get(family)
            .unwrap_or_else(|| panic!("no TYPE for {name}"));
        if kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            );
        }
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        seen.insert(series.to_string(), value);
    }
    assert_eq!(seen["loopchat_connections"], 1.0);
    assert_eq!(seen["loopchat_messages_in_total"], 4.0);
    assert_eq!(seen["loopchat_messages_out_total"], 4.0);
    assert!(seen["loopchat_bytes_out_total"] > 0.0);
    for needed in [
        "loopchat_rooms",
        "loopchat_accepted_total",
        "loopchat_slow_consumer_drops_total",
        "loopchat_rate_limited_total",
        "loopchat_outbox_bytes",
        "loopchat_loop_iterations_total",
        "loopchat_loop_slowest_iteration_microseconds",
        "loopchat_uptime_seconds",
    ] {
        assert!(seen.contains_key(needed), "{needed} missing");
    }
    assert!(seen.contains_key("loopchat_rejected_total{reason=\"over_limit\"}"));
    assert!(seen.contains_key("loopchat_connections_by_state{state=\"open\"}"));
}

/// The per-phase counts and `outbox_bytes` are kept as connections move
/// rather than summed per request, so they must follow every phase and
/// come back to zero when everyone is gone: a count missed on one path
/// would show here as a phase or an outbox that never empties.
#[test]
fn phase_counts_and_outbox_bytes_return_to_zero() {
    use std::io::Write;
    let mut config = loopchat::Config::for_tests();
    // Room for the pongs below to pile up without the flooder being shed.
    config.max_outbox_bytes = 8 * 1024 * 1024;
    let server = TestServer::with(config);

    // Two request heads that never finish, and a 404 whose answer the
    // client never reads (the server lingers on it, up to its deadline:
    // too short to assert on a loaded machine, long enough to be counted
    // out on its own path).
    let mut heads: Vec<_> = (0..2)
        .map(|_| {
            let mut s = common::raw_connect(server.addr);
            s.write_all(b"GET /ws?username=x HTTP/1.1\r\n")
                .expect("write");
            s
        })
        .collect();
    let mut lingerer = common::raw_connect(server.addr);
    lingerer
        .write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    // The third head is the /stats request itself.
    server.wait_stats("two heads", |s| s["connections_by_state"]["head"] == 3);

    // A session that pings without reading: its pongs pile up in the
    // outbox once its socket buffers are full.
    let mut a = server.client("a");
    a.opening();
    let mut flooder = common::raw_session(server.addr, "/ws?username=flooder");
    common::shrink_receive_buffer(&flooder);
    let mut batch = Vec::new();
    for _ in 0..1000 {
        batch.extend_from_slice(&[0x89, 0x80 | 120, 0, 0, 0, 0]);
        batch.extend_from_slice(&[b'p'; 120]);
    }
    // Bounded: 40 batches are 4.9 MB of pongs, under the outbox bound and
    // far over what the kernel's buffers hold.
    let mut queued = 0;
    for _ in 0..40 {
        flooder.write_all(&batch).expect("write pings");
        queued = server.stats()["outbox_bytes"]
            .as_u64()
            .expect("outbox_bytes");
        if queued > 256 * 1024 {
            break;
        }
    }
    assert!(queued > 256 * 1024, "pongs never queued: {queued}");
    let s = server.stats();
    assert_eq!(s["connections_by_state"]["open"], 2, "{s}");
    assert_eq!(s["connections"], 2, "{s}");

    drop(flooder);
    drop(a);
    heads.clear();
    drop(lingerer);
    // Only the /stats request itself is left, still reading its head.
    let s = server.wait_stats("everyone gone", |s| {
        let by = s["connections_by_state"].as_object().expect("by state");
        let others: u64 = by.values().filter_map(serde_json::Value::as_u64).sum();
        by["head"] == 1 && others == 1 && s["outbox_bytes"] == 0
    });
    assert_eq!(s["connections"], 0, "{s}");
}
