#!/usr/bin/env python3
"""Cluster mode against a single node, side by side in one run
(docs/performance.md, "Cluster mode"). Every server process (each node and
redis-server) is pinned to core 0, loopchat-load to core 1; loopback only.
CPU is what loopchat-load reports for every --pid (each node and
redis-server): time on CPU from /proc/PID/task/*/schedstat (ns), from the
start of the message phase to the last delivery. Redis's command counts
come from INFO commandstats before and after each run. Bounded: every tool
run has --duration-s 90 and a 120 s timeout; everything started is killed
on exit.

Usage: cargo build --release --bins && RUNS=3 python3 benches/cluster.py
  PARTS=pair,members   which measurements (pair: single node against two
                       nodes, 100 members; members: 3 nodes, room sizes)
  MEMBERS=99,1000,2000 room sizes of the members part
  SAT_MESSAGES=N       messages of the members part's saturated runs
  PACED=0              leave out the members part's paced runs
  LOOPCHAT=PATH        another server binary, to compare builds
  COMPARE=PATH         also run the cluster rows with this server binary,
                       in the same run (its rows are labelled "base")
  MSG_RATE=500         the pair part's paced rate (6 s of messages)
Prints one JSON line per measurement."""
import json, os, re, shutil, socket, subprocess, tempfile, threading, time

REL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release")
RUNS = int(os.environ.get("RUNS", "3"))
# Another server binary (e.g. an older build, to compare) instead of target/release's.
SERVER = os.environ.get("LOOPCHAT", f"{REL}/loopchat")
LOAD = os.environ.get("LOAD", f"{REL}/loopchat-load")
procs = []
dirs = []

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

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

def start_node(extra, server=None):
    port = free_port()
    p = subprocess.Popen(["taskset", "-c", "0", server or SERVER, "--listen", f"127.0.0.1:{port}",
                          "--log-level", "info", "--rate-per-s", "100000", "--rate-burst", "100000"] + extra,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    wait_line(p, "listening on")
    if "--redis" in extra:
        wait_line(p, "connected to redis")
    # Keep reading its log: a full pipe would block the node's loop.
    threading.Thread(target=drain, args=(p,), daemon=True).start()
    return p, port

link_losses = []

def drain(proc):
    for line in proc.stderr:
        if "lost redis" in line:
            link_losses.append(line.strip())

def tool(args, urls):
    cmd = ["taskset", "-c", "1", LOAD] + args + ["--json", "--quiet", "--duration-s", "90"]
    for u in urls:
        cmd += ["--url", f"ws://127.0.0.1:{u}/ws"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(out.stdout)
    except Exception:
        raise SystemExit(f"tool failed: {out.stdout} {out.stderr}")

def info(port, section):
    # INFO <section> over a plain RESP socket, as text.
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"*2\r\n$4\r\nINFO\r\n${len(section)}\r\n{section}\r\n".encode())
    buf = b""
    while b"\r\n" not in buf:
        buf += sock.recv(65536)
    head, rest = buf.split(b"\r\n", 1)
    want = int(head[1:]) + 2
    while len(rest) < want:
        rest += sock.recv(65536)
    sock.close()
    return rest.decode()

def commandstats(port):
    # {command: calls}
    out = {}
    for line in info(port, "commandstats").splitlines():
        m = re.match(r"cmdstat_([a-z|_-]+):calls=(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out

def net_bytes(port):
    # Redis's own count of bytes read from and written to clients.
    out = {}
    for line in info(port, "stats").splitlines():
        k, _, v = line.partition(":")
        if k in ("total_net_input_bytes", "total_net_output_bytes"):
            out[k] = int(v)
    return out

def syscalls(pid):
    # Read and write syscalls (/proc/PID/io): how many pieces a process
    # reads and writes its bytes in.
    out = {}
    for line in open(f"/proc/{pid}/io"):
        k, _, v = line.partition(":")
        if k in ("syscr", "syscw"):
            out[k] = int(v)
    return out

def wakeups(pid):
    # Voluntary context switches: each is the process going to sleep in
    # epoll_wait (or a blocking read) and being woken again.
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0

def measure(label, args, ports, pids, redis_pid, redis_port=None):
    # The tool reads every --pid's CPU (schedstat, ns) from "go" to the
    # last delivery, summed and per pid.
    allp = pids + ([redis_pid] if redis_pid else [])
    pid_args = [a for p in allp for a in ("--pid", str(p))]
    before = commandstats(redis_port) if redis_port else {}
    net0 = net_bytes(redis_port) if redis_port else {}
    woke = {p: wakeups(p) for p in allp}
    sys0 = {p: syscalls(p) for p in allp}
    r = tool(args + pid_args, ports)
    woke = {p: wakeups(p) - w for p, w in woke.items()}
    sysd = {p: {k: v - sys0[p][k] for k, v in syscalls(p).items()} for p in allp}
    after = commandstats(redis_port) if redis_port else {}
    net1 = net_bytes(redis_port) if redis_port else {}
    calls = {k: v - before.get(k, 0) for k, v in after.items() if k != "info"}
    server = r.get("server") or {}
    each = {e["pid"]: e["cpu_s"] or 0.0 for e in server.get("cpu_per_pid", [])}
    total = server.get("cpu_s") or 0.0
    red = each.get(redis_pid, 0.0) if redis_pid else 0.0
    msgs = r["senders"] * r["messages"]
    lat = r.get("latency") or {}
    losses = len(link_losses); link_losses.clear()
    row = {"label": label, "deliveries": r["deliveries"], "joined": r["joined"],
           "failures": r["failures"], "redis_link_losses": losses,
           "ok": r["missing"] == 0 and r["duplicates"] == 0 and r["reordered"] == 0
                 and r["failures"] == 0 and r["joined"] == r["receivers"],
           "cpu_us_per_delivery": total * 1e6 / max(r["deliveries"], 1),
           "nodes_cpu_us_per_delivery": (total - red) * 1e6 / max(r["deliveries"], 1),
           "redis_us_per_message": red * 1e6 / max(msgs, 1),
           "cpu_s_per_pid": each,
           # Over the whole run (joins included), per message.
           "wakeups_per_message": {p: round(w / max(msgs, 1), 2) for p, w in woke.items()},
           # Over the whole run too: read and write syscalls per message.
           "syscalls_per_message": {p: {k: round(v / max(msgs, 1), 2) for k, v in d.items()}
                                    for p, d in sysd.items()},
           "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"), "per_s": r["deliveries_per_s"]}
    if redis_port:
        # Publish script calls: its RPUSH (or, in a build with the sorted
        # set, its ZADD less the refresh script's, one TIME each). Over the
        # whole run, joins included: these are counts.
        publish_calls = calls.get("rpush", 0) or calls.get("zadd", 0) - calls.get("time", 0)
        row["messages_per_publish_call"] = msgs / max(publish_calls, 1)
        row["redis_publish_per_message"] = calls.get("publish", 0) / max(msgs, 1)
        row["redis_commands"] = {k: v for k, v in calls.items() if v}
        row["redis_bytes_per_message"] = {k.split("_")[2]: round((net1[k] - net0[k]) / max(msgs, 1), 1)
                                          for k in net1}
    print(json.dumps(row), flush=True)
    return row

SAT = ["fanout", "--receivers", "100", "--senders", "10", "--messages", "1000", "--msg-rate", "0", "--window", "16", "--threads", "2"]
# MSG_RATE: the paced rows' rate (default 500 msg/s), 6 s of messages.
MSG_RATE = int(os.environ.get("MSG_RATE", "500"))
RATE = ["fanout", "--receivers", "100", "--senders", "10", "--messages", str(MSG_RATE * 6 // 10),
        "--msg-rate", str(MSG_RATE), "--threads", "2"]

def members_load(n, paced):
    # One sender in a room of n members over 3 nodes; saturated (window 16:
    # 16 messages a publish call at every size), or paced at 30 msg/s for
    # 10 s, where every message is its own call and every size runs as long
    # (Redis also has work per second: its cron, the nodes' pings and
    # refreshes), and even 3,000 members leave the nodes' core idle.
    load = ["fanout", "--receivers", str(n), "--senders", "1", "--threads", "3", "--rate", "500"]
    if paced:
        return load + ["--messages", "300", "--msg-rate", "30"]
    count = SAT_MESSAGES or (2000 if n <= 1000 else 700)
    return load + ["--messages", str(count), "--msg-rate", "0", "--window", "16"]

def cpu_s(pid):
    return sum(int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
               for t in os.listdir(f"/proc/{pid}/task")) / 1e9

def idle(label, redis_pid, seconds=5.0):
    # Redis's CPU per second with the nodes connected and nothing to do.
    a = cpu_s(redis_pid); time.sleep(seconds); b = cpu_s(redis_pid)
    print(json.dumps({"label": label, "redis_idle_us_per_s": (b - a) * 1e6 / seconds}), flush=True)

PARTS = os.environ.get("PARTS", "pair,members").split(",")
COMPARE = os.environ.get("COMPARE")
MEMBERS = [int(m) for m in os.environ.get("MEMBERS", "99,1000,2000").split(",")]
# Messages of the members part's saturated runs, instead of 2000 (700 over
# 1,000 members); two runs with different counts give the per-message
# share of the whole-run counts (syscalls, bytes) without the joins'.
SAT_MESSAGES = int(os.environ.get("SAT_MESSAGES", "0"))
PACED = os.environ.get("PACED", "1") == "1"

def kill_all():
    for p in procs:
        try: p.kill(); p.wait(timeout=5)
        except Exception: pass
    procs.clear()
    # Nodes that saw Redis die first are not a measurement's link losses.
    time.sleep(0.2); link_losses.clear()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    dirs.clear()

try:
    for run in range(RUNS):
        if "pair" in PARTS:
            # single node, then two nodes + redis, same loads
            s, sp = start_node(["--no-persist"])
            measure("single sat", SAT, [sp], [s.pid], None)
            measure(f"single {MSG_RATE}/s", RATE, [sp], [s.pid], None)
            kill_all()
            # This build and COMPARE take turns going first, so that neither
            # always gets the same slot of a run while the shared machine's
            # load drifts.
            builds = [("", None)] + ([("base ", COMPARE)] if COMPARE else [])
            for name, server in builds if run % 2 == 0 else builds[::-1]:
                red, rp = start_redis()
                a, ap = start_node(["--redis", f"redis://127.0.0.1:{rp}"], server)
                b, bp = start_node(["--redis", f"redis://127.0.0.1:{rp}"], server)
                measure(f"{name}2 nodes sat", SAT + ["--room", f"sat{run}"], [ap, bp], [a.pid, b.pid], red.pid, rp)
                measure(f"{name}2 nodes {MSG_RATE}/s", RATE + ["--room", f"rate{run}"], [ap, bp], [a.pid, b.pid], red.pid, rp)
                kill_all()
        if "members" in PARTS:
            red, rp = start_redis()
            nodes = [start_node(["--redis", f"redis://127.0.0.1:{rp}"]) for _ in range(3)]
            ports, pids = [p for _, p in nodes], [n.pid for n, _ in nodes]
            idle("3 nodes idle", red.pid)
            for n in MEMBERS:
                for paced in (False, True) if PACED else (False,):
                    label = f"3 nodes {n} members {'30/s' if paced else 'sat'}"
                    measure(label, members_load(n, paced) + ["--room", f"m{n}{paced}{run}"], ports, pids, red.pid, rp)
            kill_all()
finally:
    kill_all()
