#!/usr/bin/env python3
"""Summarize a benches/compare/run.sh output directory into Markdown tables:
median (min-max) per server and floor, then loopchat ÷ peer for each peer.

The ratios are paired: run k of loopchat against run k of the peer (the two
ran minutes apart in the same pass of run.sh), and the table gives the median
(min-max) of those per-run ratios, which cancels much of the machine's drift
between passes. Below 1: loopchat spends less (or, for latency, waits less)."""
import glob, json, os, re, statistics, sys

out = sys.argv[1]
KNOWN = ("loopchat", "node", "wsrs", "tokio")
NAMES = {"loopchat": "loopchat", "node": "Node `ws`", "wsrs": "ws-rs", "tokio": "tokio-tungstenite"}


def load_runs(pattern):
    """{run number: parsed JSON} for files named <...>.<run>.json."""
    runs = {}
    for f in glob.glob(os.path.join(out, pattern)):
        m = re.search(r"\.(\d+)\.json$", f)
        if not m:
            continue
        try:
            with open(f) as fh:
                runs[int(m.group(1))] = json.load(fh)
        except (OSError, ValueError):
            pass
    return runs


def per_run(srv, scen, fn):
    xs = {}
    for run, d in load_runs(f"{srv}.{scen}.*.json").items():
        try:
            v = fn(d)
        except (TypeError, ZeroDivisionError, KeyError, AttributeError):
            v = None
        if v is not None:
            xs[run] = float(v)
    return xs


def churn_us(srv):
    cpu = load_runs(f"{srv}.churncpu.*.json")
    xs = {}
    for run, d in load_runs(f"{srv}.churn.*.json").items():
        if d.get("completed") and run in cpu:
            xs[run] = cpu[run]["cpu_s"] * 1e6 / d["completed"]
    return xs


def runq_ms(srv):
    xs = {}
    for run, d in load_runs(f"{srv}.rate500sched.*.json").items():
        b, a = d["before"].split(), d["after"].split()
        xs[run] = (int(a[0]) - int(b[0])) / 1e6
    return xs


def fmt(xs, nd=2):
    xs = list(xs.values()) if isinstance(xs, dict) else xs
    if not xs:
        return "n/a"
    m = statistics.median(xs)
    return f"{m:,.{nd}f} ({min(xs):,.{nd}f}–{max(xs):,.{nd}f})"


def paired(lc, peer):
    rs = [lc[k] / peer[k] for k in lc if k in peer and peer[k]]
    if not rs:
        return "n/a"
    m = statistics.median(rs)
    nd = 1 if m >= 10 else 2
    return f"{m:.{nd}f}× ({min(rs):.{nd}f}–{max(rs):.{nd}f})"


def bad(srv, scen):
    n = 0
    for d in load_runs(f"{srv}.{scen}.*.json").values():
        n += (d.get("failures") or 0) + (d.get("missing") or 0) + (d.get("duplicates") or 0) \
            + (d.get("reordered") or 0) + (1 if d.get("timed_out") else 0)
    return n


lat = lambda k: (lambda d: d["latency"][k])
rows = [
    # label, per-server series, digits
    ("idle: RSS per open session (KiB)", lambda s: per_run(s, "idle", lambda d: d["server"]["rss_per_conn_kb"]), 2),
    ("idle: sessions opened (of IDLE_CONNS)", lambda s: per_run(s, "idle", lambda d: d["opened"]), 0),
    ("idle: server CPU over the hold (% of a core)", lambda s: per_run(s, "idle", lambda d: d["server"]["idle_cpu_percent"]), 2),
    ("fan-out saturated, 100 members: CPU µs/delivery", lambda s: per_run(s, "sat100", lambda d: d["server"]["cpu_us_per_delivery"]), 3),
    ("fan-out saturated, 100 members: deliveries/s", lambda s: per_run(s, "sat100", lambda d: d["deliveries_per_s"]), 0),
    ("fan-out saturated, 1,000 members: CPU µs/delivery", lambda s: per_run(s, "sat1000", lambda d: d["server"]["cpu_us_per_delivery"]), 3),
    ("fan-out saturated, 1,000 members: deliveries/s", lambda s: per_run(s, "sat1000", lambda d: d["deliveries_per_s"]), 0),
    ("fan-out saturated, 1,000 members: latency p50 (ms)", lambda s: per_run(s, "sat1000", lat("p50_ms")), 2),
    ("fan-out saturated, 1,000 members: latency p99 (ms)", lambda s: per_run(s, "sat1000", lat("p99_ms")), 2),
    ("fan-out 500 msg/s, 100 members: CPU µs/delivery", lambda s: per_run(s, "rate500", lambda d: d["server"]["cpu_us_per_delivery"]), 3),
    ("fan-out 500 msg/s: latency p50 (ms)", lambda s: per_run(s, "rate500", lat("p50_ms")), 2),
    ("fan-out 500 msg/s: latency p99 (ms)", lambda s: per_run(s, "rate500", lat("p99_ms")), 2),
    ("fan-out 500 msg/s: latency max (ms)", lambda s: per_run(s, "rate500", lat("max_ms")), 2),
    ("churn: server CPU µs per cycle (10 at a time)", churn_us, 1),
    ("churn: cycles/s", lambda s: per_run(s, "churn", lambda d: d["handshakes_per_s"]), 0),
    ("500 msg/s run: server run-queue wait (ms)", runq_ms, 1),
]
# rows where a ratio says something about the server (not about the tool)
RATIO_ROWS = {0, 3, 5, 7, 8, 9, 10, 11, 13}
floors = {
    3: ("w16", "cpu_us_per_frame", "16 frames/write"),
    5: ("w16", "cpu_us_per_frame", "16 frames/write"),
    9: ("w1", "cpu_us_per_write", "1 write/delivery"),
}

servers = [s for s in KNOWN if glob.glob(os.path.join(out, f"{s}.*.json"))]
peers = [s for s in servers if s != "loopchat"]
runs = {s: len(load_runs(f"{s}.idle.*.json")) for s in servers}
print(f"Results in {out}; runs: " + ", ".join(f"{NAMES[s]} {runs[s]}" for s in servers)
      + "; median (min–max)\n")

print("| metric | " + " | ".join(NAMES[s] for s in servers) + " | floor |")
print("|" + "---|" * (len(servers) + 2))
table = {}
for i, (label, series, nd) in enumerate(rows):
    per = {s: series(s) for s in servers}
    table[i] = per
    fl = "—"
    if i in floors:
        tag, key, what = floors[i]
        xs = [d[key] for d in load_runs(f"floor.{tag}.*.json").values() if d.get("reader_ok")]
        fl = f"{fmt(xs, 3)} ({what})" if xs else "—"
    print(f"| {label} | " + " | ".join(fmt(per[s], nd) for s in servers) + f" | {fl} |")

if "loopchat" in servers and peers:
    print("\nloopchat ÷ peer, paired by run (median of the per-run ratios, min–max); below 1: loopchat costs less\n")
    print("| metric | " + " | ".join(f"loopchat ÷ {NAMES[p]}" for p in peers) + " |")
    print("|" + "---|" * (len(peers) + 1))
    for i, (label, _, _) in enumerate(rows):
        if i in RATIO_ROWS:
            print(f"| {label} | " + " | ".join(paired(table[i]["loopchat"], table[i][p]) for p in peers) + " |")

print()
for s in servers:
    for scen in ("idle", "sat100", "sat1000", "rate500", "churn"):
        b = bad(s, scen)
        if b:
            print(f"WARNING: {s} {scen}: {b} failures/missing/duplicates/reordered/timeouts over the runs")
f1k = [d["cpu_us_per_write"] for d in load_runs("floor.w1k.*.json").values() if d.get("reader_ok")]
if f1k:
    print(f"floor, 1 write()/delivery to 1,000 sockets: {fmt(f1k, 3)} µs per write")
for s in servers:
    log = os.path.join(out, f"{s}.log")
    if s == "tokio" and os.path.exists(log):
        with open(log) as fh:
            first = fh.readline().strip()
        if first:
            print(f"tokio: {first}")
