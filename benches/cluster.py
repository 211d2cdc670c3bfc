#!/usr/bin/env python3
"""Cluster mode against a single node, side by side in one run
(docs/performance.md, "Cluster mode"). Every server process (each node and
redis-server) is pinned to core 0, loopchat-load to core 1; loopback only.
CPU is each process's time on CPU from /proc/PID/task/*/schedstat (ns),
sampled every 5 ms, over the message phase only (from "all joined" to the
last delivery, as loopchat-load reports them). Bounded: every tool run has
--duration-s 90 and a 120 s timeout; everything started is killed on exit.

Usage: cargo build --release --bins && RUNS=3 python3 benches/cluster.py
Prints one JSON line per measurement."""
import json, os, shutil, socket, subprocess, tempfile, threading, time

REL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release")
RUNS = int(os.environ.get("RUNS", "3"))
procs = []
dirs = []

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def cpu(pid):
    # Time on CPU in ns, all threads of the process (schedstat has ns
    # resolution; /proc/PID/stat counts 10 ms ticks).
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        total += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
    return total / 1e9

def wait_line(proc, needle, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"process exited waiting for {needle!r}")
        if needle in line:
            return line
    raise SystemExit(f"timeout waiting for {needle!r}")

def start_redis():
    port = free_port(); d = tempfile.mkdtemp(prefix="clbench-redis-"); dirs.append(d)
    p = subprocess.Popen(["taskset", "-c", "0", "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--dir", d, "--save", "", "--appendonly", "no", "--logfile", ""],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    end = time.time() + 20
    while time.time() < end:
        if "Ready to accept connections" in p.stdout.readline():
            return p, port
    raise SystemExit("redis did not start")

def start_node(extra):
    port = free_port()
    p = subprocess.Popen(["taskset", "-c", "0", f"{REL}/loopchat", "--listen", f"127.0.0.1:{port}",
                          "--log-level", "info", "--rate-per-s", "100000", "--rate-burst", "100000"] + extra,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    wait_line(p, "listening on")
    if "--redis" in extra:
        wait_line(p, "connected to redis")
    return p, port

def tool(args, urls):
    cmd = ["taskset", "-c", "1", f"{REL}/loopchat-load"] + args + ["--json", "--quiet", "--duration-s", "90"]
    for u in urls:
        cmd += ["--url", f"ws://127.0.0.1:{u}/ws"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(out.stdout)
    except Exception:
        raise SystemExit(f"tool failed: {out.stdout} {out.stderr}")

def sampler(pids, stop, out):
    while not stop.is_set():
        out.append((time.monotonic(), {p: cpu(p) for p in pids}))
        time.sleep(0.005)

def at(samples, t, pid):
    best = min(samples, key=lambda s: abs(s[0] - t))
    return best[1][pid]

def measure(label, args, ports, pids, redis_pid):
    allp = pids + ([redis_pid] if redis_pid else [])
    samples, stop = [], threading.Event()
    th = threading.Thread(target=sampler, args=(allp, stop, samples)); th.start()
    t0 = time.monotonic()
    r = tool(args, ports)
    stop.set(); th.join()
    # The message phase only: from all joined to the last delivery.
    w0 = t0 + r["setup_s"]; w1 = w0 + r["delivery_s"]
    d = {p: at(samples, w1, p) - at(samples, w0, p) for p in allp}
    total = sum(d.values())
    red = d[redis_pid] if redis_pid else 0.0
    msgs = r["senders"] * r["messages"]
    lat = r.get("latency") or {}
    row = {"label": label, "deliveries": r["deliveries"], "ok": r["missing"] == 0 and r["duplicates"] == 0 and r["reordered"] == 0,
           "cpu_us_per_delivery": total * 1e6 / max(r["deliveries"], 1),
           "tool_cpu_us_per_delivery": (r.get("server") or {}).get("cpu_us_per_delivery"),
           "redis_us_per_message": red * 1e6 / max(msgs, 1),
           "redis_cpu_s": red, "server_cpu_s": total,
           "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"), "per_s": r["deliveries_per_s"]}
    print(json.dumps(row), flush=True)
    return row

SAT = ["fanout", "--receivers", "100", "--senders", "10", "--messages", "1000", "--msg-rate", "0", "--window", "16", "--threads", "2"]
RATE = ["fanout", "--receivers", "100", "--senders", "10", "--messages", "300", "--msg-rate", "500", "--threads", "2"]
BIG = ["fanout", "--receivers", "1000", "--senders", "1", "--messages", "2000", "--msg-rate", "0", "--window", "16", "--threads", "3", "--rate", "2000"]
SMALL3 = ["fanout", "--receivers", "99", "--senders", "1", "--messages", "2000", "--msg-rate", "0", "--window", "16", "--threads", "3"]

def kill_all():
    for p in procs:
        try: p.kill(); p.wait(timeout=5)
        except Exception: pass
    procs.clear()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    dirs.clear()

try:
    for run in range(RUNS):
        # single node
        s, sp = start_node(["--no-persist"])
        measure("single sat", SAT, [sp], [s.pid], None)
        measure("single 500/s", RATE, [sp], [s.pid], None)
        kill_all()
        # two nodes + redis
        red, rp = start_redis()
        a, ap = start_node(["--redis", f"redis://127.0.0.1:{rp}"])
        b, bp = start_node(["--redis", f"redis://127.0.0.1:{rp}"])
        measure("2 nodes sat", SAT + ["--room", f"sat{run}"], [ap, bp], [a.pid, b.pid], red.pid)
        measure("2 nodes 500/s", RATE + ["--room", f"rate{run}"], [ap, bp], [a.pid, b.pid], red.pid)
        c, cp = start_node(["--redis", f"redis://127.0.0.1:{rp}"])
        measure("3 nodes 99 members", SMALL3 + ["--room", f"small{run}"], [ap, bp, cp], [a.pid, b.pid, c.pid], red.pid)
        measure("3 nodes 1000 members", BIG + ["--room", f"big{run}"], [ap, bp, cp], [a.pid, b.pid, c.pid], red.pid)
        kill_all()
finally:
    kill_all()
