#!/usr/bin/env python3
"""Medians of benches/compare/mass.sh output (JSON lines on stdin): one
row per server variant and shape, for the connect and leave phases. The
slowest iterations are the server's since start (one figure per run, so
the same on both phase rows); an older build reports wall time only."""
import json, statistics, sys
from collections import defaultdict

rows = defaultdict(list)
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    d = json.loads(line)
    rows[(d["server"], d["room_size"], d["leave"])].append(d)

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

print("| server | room | leave | phase | server CPU s | iterations > 10 ms CPU | slowest iteration, CPU ms | slowest iteration, wall ms | probe p50 ms | probe p99 ms | runs ok |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (server, room, leave), runs in sorted(rows.items()):
    ok = sum(1 for r in runs if r.get("failures") == 0 and r.get("drained"))
    slow = med([r.get("slowest_iteration_cpu_us") for r in runs])
    wall = med([r.get("slowest_iteration_wall_us") for r in runs])
    for phase in ("connect", "leave"):
        ps = [next(p for p in r["phases"] if p["phase"] == phase) for r in runs]
        cpu = med([p["server_cpu_s"] for p in ps])
        over = med([p["iterations_over_ms"].get("10") for p in ps])
        p50 = med([p["probe_latency"]["p50_ms"] for p in ps])
        p99 = med([p["probe_latency"]["p99_ms"] for p in ps])
        slowest = f"{slow/1000:.1f}" if slow is not None else "n/a"
        walls = f"{wall/1000:.1f}" if wall is not None else "n/a"
        print(f"| {server} | {room} | {leave} | {phase} | {cpu} | {over if over is not None else 'n/a'} | {slowest} | {walls} | {p50} | {p99} | {ok}/{len(runs)} |")
