#!/usr/bin/env python3
"""Summarize a benches/compare/run.sh output directory into a Markdown table:
median (min-max) per server, ratio node/loopchat, floor, budget."""
import glob, json, os, statistics, sys

out = sys.argv[1]

def load(pattern):
    vals = []
    for f in sorted(glob.glob(os.path.join(out, pattern))):
        try:
            with open(f) as fh:
                vals.append(json.load(fh))
        except (OSError, ValueError):
            pass
    return vals

def get(d, path):
    for k in path.split('.'):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d

def series(srv, scen, fn):
    xs = []
    for d in load(f"{srv}.{scen}.*.json"):
        try:
            v = fn(d)
        except (TypeError, ZeroDivisionError, KeyError):
            v = None
        if v is not None:
            xs.append(float(v))
    return xs

def churn_us(srv):
    xs = []
    for d, c in zip(load(f"{srv}.churn.*.json"), load(f"{srv}.churncpu.*.json")):
        if d.get("completed"):
            xs.append(c["cpu_s"] * 1e6 / d["completed"])
    return xs

def runq_ms(srv):
    xs = []
    for d in load(f"{srv}.rate500sched.*.json"):
        b, a = d["before"].split(), d["after"].split()
        xs.append((int(a[0]) - int(b[0])) / 1e6)
    return xs

def fmt(xs, nd=2):
    if not xs:
        return "n/a"
    m = statistics.median(xs)
    return f"{m:.{nd}f} ({min(xs):.{nd}f}–{max(xs):.{nd}f})"

def ok(srv, scen):
    bad = 0
    for d in load(f"{srv}.{scen}.*.json"):
        bad += (d.get("failures") or 0) + (d.get("missing") or 0) + (d.get("duplicates") or 0) \
             + (d.get("reordered") or 0) + (1 if d.get("timed_out") else 0)
    return bad

rows = [
    # label, scenario, extractor, digits, budget
    ("idle: RSS per open session (KiB)", "idle", lambda d: d["server"]["rss_per_conn_kb"], 2, "≤ 4 (stretch 2)"),
    ("idle: server CPU over the hold (% of a core)", "idle", lambda d: d["server"]["idle_cpu_percent"], 2, "~0"),
    ("idle: sessions opened per s", "idle", lambda d: d["open_rate_per_s"], 0, "—"),
    ("fan-out saturated, 100 members: CPU µs/delivery", "sat100", lambda d: d["server"]["cpu_us_per_delivery"], 3, "≤ 0.5"),
    ("fan-out saturated, 100 members: deliveries/s", "sat100", lambda d: d["deliveries_per_s"], 0, "—"),
    ("fan-out saturated, 1,000 members: CPU µs/delivery", "sat1000", lambda d: d["server"]["cpu_us_per_delivery"], 3, "≤ 0.5"),
    ("fan-out saturated, 1,000 members: deliveries/s", "sat1000", lambda d: d["deliveries_per_s"], 0, "—"),
    ("fan-out 500 msg/s, 100 members: CPU µs/delivery", "rate500", lambda d: d["server"]["cpu_us_per_delivery"], 3, "≤ 7.5"),
    ("fan-out 500 msg/s: latency p50 (ms)", "rate500", lambda d: d["latency"]["p50_ms"], 2, "—"),
    ("fan-out 500 msg/s: latency p99 (ms)", "rate500", lambda d: d["latency"]["p99_ms"], 2, "≤ 5"),
    ("fan-out 500 msg/s: latency max (ms)", "rate500", lambda d: d["latency"]["max_ms"], 2, "—"),
]
servers = [s for s in ("loopchat", "node") if glob.glob(os.path.join(out, f"{s}.*.json"))]
floors = {
    "fan-out saturated, 100 members: CPU µs/delivery": ("w16", "cpu_us_per_frame", "16 frames/write"),
    "fan-out saturated, 1,000 members: CPU µs/delivery": ("w16", "cpu_us_per_frame", "16 frames/write"),
    "fan-out 500 msg/s, 100 members: CPU µs/delivery": ("w1", "cpu_us_per_write", "1 write/delivery"),
}

def ratio(a, b):
    if not a or not b:
        return "n/a"
    ma, mb = statistics.median(a), statistics.median(b)
    if not ma:
        return "n/a"
    r = mb / ma
    return f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"

print(f"Results in {out} ({len(load('loopchat.idle.*.json'))} runs of loopchat, "
      f"{len(load('node.idle.*.json'))} of node); median (min–max)\n")
hdr = "| metric | " + " | ".join(servers) + " | node ÷ loopchat | floor | budget |"
print(hdr)
print("|" + "---|" * (len(servers) + 4))
def line(label, per, digits, budget, floor="—"):
    cells = [fmt(per.get(s, []), digits) for s in servers]
    r = ratio(per.get("loopchat"), per.get("node")) if "node" in per else "—"
    print(f"| {label} | " + " | ".join(cells) + f" | {r} | {floor} | {budget} |")
for label, scen, fn, nd, budget in rows:
    per = {s: series(s, scen, fn) for s in servers}
    fl = "—"
    if label in floors:
        tag, key, what = floors[label]
        xs = [d[key] for d in load(f"floor.{tag}.*.json") if d.get("reader_ok")]
        fl = f"{fmt(xs, 3)} ({what})" if xs else "—"
    line(label, per, nd, budget, fl)
line("churn: server CPU µs per cycle (10 at a time)", {s: churn_us(s) for s in servers}, 1, "≤ 120")
line("churn: cycles/s", {s: series(s, "churn", lambda d: d["handshakes_per_s"]) for s in servers}, 0, "—")
line("500 msg/s run: server run-queue wait (ms)", {s: runq_ms(s) for s in servers}, 1, "—")
print()
for s in servers:
    for scen in ("idle", "sat100", "sat1000", "rate500", "churn"):
        b = ok(s, scen)
        if b:
            print(f"WARNING: {s} {scen}: {b} failures/missing/duplicates/reordered/timeouts over the runs")
f1k = [d["cpu_us_per_write"] for d in load("floor.w1k.*.json") if d.get("reader_ok")]
if f1k:
    print(f"floor, 1 write()/delivery to 1,000 sockets: {fmt(f1k, 3)} µs per write")
