#!/usr/bin/env python3
"""How loopchat's cost grows with the size of what it holds, at three sizes
each (the parts of the question that do not involve the store):

  rooms     the `rooms` command's answer time and server CPU with 1k/10k/50k
            rooms: asked again with nothing changed (the cached listing) and
            right after a membership change (the listing rebuilt)
  join      a `join` into a room of 100/1k/10k members: the joiner's time to
            `joined` and the server's CPU for the join and its notices; the
            `leave` out of it likewise
  stats     `GET /stats` and `GET /metrics` answer time and server CPU with
            1k/10k/19k open connections

    benches/compare/scaling.py              # about 3-4 minutes
    REPS=9 ROOM_SIZES=1000,10000 benches/compare/scaling.py
    LOOPCHAT=/tmp/loopchat-before ROOM_SIZES= MEMBER_SIZES= benches/compare/scaling.py

LOOPCHAT names another server binary (an earlier build, to compare); an
empty size list skips its part.

Server on core 0 (`taskset -c 0`, --no-persist), this script's client and
`loopchat-load` (which holds the members and connections) on core 1;
loopback only. Server CPU is the sum of sum_exec_runtime over the server's
threads (/proc/PID/task/*/schedstat, nanoseconds) read before the request
and after its answer has settled; answer time is the client's, from sending
the request to having the whole answer, so it includes this script's own
Python overhead (tens of µs). Every figure is the median of REPS
repetitions, with (min-max). Every wait is bounded, the whole script by
TOTAL_CAP_S; every process it starts is killed on exit. Raw figures go to
$OUT/scaling.json (default target/compare/scaling-<stamp>/).
"""
import asyncio, http.client, json, os, resource, signal, socket, statistics, subprocess, sys, time

from websockets.asyncio.client import connect

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
LC = os.environ.get("LOOPCHAT") or os.path.join(ROOT, "target", "release", "loopchat")
LOAD = os.path.join(ROOT, "target", "release", "loopchat-load")
PORT = int(os.environ.get("PORT", "18195"))
REPS = int(os.environ.get("REPS", "7"))
TOTAL_CAP_S = int(os.environ.get("TOTAL_CAP_S", "480"))
sizes = lambda name, default: [int(x) for x in os.environ.get(name, default).split(",") if x]
ROOM_SIZES = sizes("ROOM_SIZES", "1000,10000,50000")
MEMBER_SIZES = sizes("MEMBER_SIZES", "100,1000,10000")
CONN_SIZES = sizes("CONN_SIZES", "1000,10000,19000")
MAX_CONNECTIONS = 19_800  # the hard open-file limit is 20,000 per process
OUT = os.environ.get("OUT") or os.path.join(ROOT, "target", "compare", "scaling-" + time.strftime("%Y%m%d-%H%M%S"))
URL = f"ws://127.0.0.1:{PORT}/ws"
SETTLE_S = 0.15  # after an answer, for the server to finish the notices it queued
STEP_TIMEOUT_S = 120

children = []


def cleanup(*_):
    for p in children:
        if p.poll() is None:
            p.kill()
    for p in children:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_server():
    p = subprocess.Popen(
        ["taskset", "-c", "0", LC, "--no-persist", "--listen", f"127.0.0.1:{PORT}", "--log-level", "warn",
         "--rate-per-s", "1000000", "--rate-burst", "1000000", "--max-rooms-per-user", "60000",
         "--max-connections", str(MAX_CONNECTIONS), "--heartbeat-ms", "600000",
         # building a room of 10k sends 50M join notices; the tool on one
         # core may fall behind for a moment, which is not what is measured
         "--max-outbox-bytes", str(8 << 20)],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(OUT, "loopchat.log"), "a"), preexec_fn=raise_nofile)
    children.append(p)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.05)
    raise SystemExit("scaling.py: loopchat did not start")


def stop(p):
    p.kill()
    p.wait(timeout=10)


def cpu_ns(pid):
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def get(path):
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def stats():
    # while the server is busy building a big room an answer can fail; the
    # callers poll again
    try:
        status, body = get("/stats")
        return json.loads(body) if status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return {}


def hold(conns, room_size, room, rate):
    """loopchat-load holding `conns` idle sessions, `room_size` to a room."""
    p = subprocess.Popen(
        ["taskset", "-c", "1", LOAD, "idle", "--url", URL, "--conns", str(conns), "--rate", str(rate),
         "--hold-s", "300", "--room-size", str(room_size), "--room", room, "--duration-s", "400",
         "--connect-timeout-s", "120",
         "--json", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(OUT, "load.log"), "a"), preexec_fn=raise_nofile)
    children.append(p)
    return p


def wait_for(cond, what, timeout=STEP_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stats()
        if cond(s):
            return s
        time.sleep(0.2)
    raise SystemExit(f"scaling.py: timed out waiting for {what}")


def settled(s, n):
    return s.get("connections") == n and s.get("outbox_bytes") == 0 \
        and s.get("connections_by_state", {}).get("open") == n


async def recv_until(ws, pred):
    while True:
        ev = json.loads(await ws.recv())
        if pred(ev):
            return ev


async def session(user, room=None):
    q = f"?username={user}" + (f"&room={room}" if room else "")
    ws = await connect(URL + q, max_size=1 << 26, compression=None, ping_interval=None)
    await recv_until(ws, lambda e: e["type"] == "joined")
    return ws


def med(xs, nd=2):
    return f"{statistics.median(xs):,.{nd}f} ({min(xs):,.{nd}f}–{max(xs):,.{nd}f})"


async def timed(pid, act):
    """(answer ms, server CPU µs) of the coroutine `act()`."""
    c0 = cpu_ns(pid)
    t0 = time.perf_counter()
    result = await act()
    t1 = time.perf_counter()
    await asyncio.sleep(SETTLE_S)
    c1 = cpu_ns(pid)
    return (t1 - t0) * 1e3, (c1 - c0) / 1e3, result


async def rooms_case(n):
    srv = start_server()
    maker = await session("maker", "r0")
    made = 1
    while made < n:
        batch = range(made, min(n, made + 1000))
        for i in batch:
            await maker.send(json.dumps({"type": "join", "room": f"r{i}"}))
        want = len(batch)
        while want:
            ev = json.loads(await maker.recv())
            want -= ev["type"] == "joined"
        made += len(batch)
    s = stats()
    q = await session("asker", "r0")
    toggler = await session("toggler", "r0")

    async def ask():
        await q.send('{"type":"rooms"}')
        ev = await recv_until(q, lambda e: e["type"] == "rooms")
        return ev

    res = {"rooms": s.get("rooms"), "cached": [], "rebuilt": []}
    ev = await ask()  # builds the listing once
    res["listed"], res["content"] = len(ev["rooms"]), ev["content"]
    for rep in range(REPS):
        ms, us, _ = await timed(srv.pid, ask)
        res["cached"].append((ms, us))
    for rep in range(REPS):
        # a membership change: the listing must be rebuilt for the next ask
        await toggler.send(json.dumps({"type": "join", "room": f"t{rep}"}))
        await recv_until(toggler, lambda e: e["type"] == "joined")
        ms, us, _ = await timed(srv.pid, ask)
        res["rebuilt"].append((ms, us))
    for ws in (maker, q, toggler):
        await ws.close()
    stop(srv)
    return res


async def join_case(n):
    srv = start_server()
    tool = hold(n, n, "big", 5000)
    # The tool opens n at once; a few may fail (listen backlog full while the
    # server sends the join notices), so the room is measured at the size it
    # reached once it stopped growing (reported).
    last, since = -1, time.monotonic()
    def grown(s):
        nonlocal last, since
        m = s.get("members", -1)
        if m != last:
            last, since = m, time.monotonic()
        return m == n or (m >= n // 2 and s.get("outbox_bytes") == 0 and time.monotonic() - since > 15)
    s = wait_for(grown, f"{n} members in one room", timeout=STEP_TIMEOUT_S + n / 50)
    joiner = await session("joiner", "lobby")
    res = {"members": s.get("members", n), "join": [], "leave": []}

    async def join():
        await joiner.send('{"type":"join","room":"big-0"}')
        ev = await recv_until(joiner, lambda e: e["type"] == "joined" and e.get("room") == "big-0")
        await recv_until(joiner, lambda e: e["type"] == "join" and e.get("user") == "joiner")
        return ev

    async def leave():
        await joiner.send('{"type":"leave","room":"big-0"}')
        return await recv_until(joiner, lambda e: e["type"] == "left")

    for rep in range(REPS):
        ms, us, ev = await timed(srv.pid, join)
        res["join"].append((ms, us))
        res["joined_users_listed"] = len(ev.get("users", []))
        ms, us, _ = await timed(srv.pid, leave)
        res["leave"].append((ms, us))
    s = stats()
    res["slow_consumer_drops"] = s.get("slow_consumer_drops")
    await joiner.close()
    # the server first: the tool's closing sessions would cost n leaves of n notices
    stop(srv)
    tool.kill()
    tool.wait(timeout=10)
    return res


async def stats_case(n):
    srv = start_server()
    tool = hold(n, 100, "st", 3000)
    wait_for(lambda s: settled(s, n), f"{n} connections", timeout=STEP_TIMEOUT_S)
    res = {"connections": n}
    loop = asyncio.get_running_loop()
    for path in ("/stats", "/metrics"):
        rows = []
        get(path)  # warm
        for rep in range(REPS):
            async def ask():
                return await loop.run_in_executor(None, get, path)
            ms, us, (status, body) = await timed(srv.pid, ask)
            rows.append((ms, us))
        res[path] = rows
        res[path + " bytes"] = len(body)
    stop(srv)
    tool.kill()
    tool.wait(timeout=10)
    return res


def report(results):
    lines = [f"loopchat, REPS={REPS}; median (min–max); answer time is the client's (ms), "
             "server CPU from schedstat (µs)\n",
             "| case | size | answer time (ms) | server CPU (µs) |", "|---|---|---|---|"]
    for r in results.get("rooms", []):
        for kind in ("cached", "rebuilt"):
            ms = [x[0] for x in r[kind]]
            us = [x[1] for x in r[kind]]
            what = "nothing changed since the last ask" if kind == "cached" else "after a membership change"
            lines.append(f"| `rooms`, {what} | {r['rooms']:,} rooms ({r['listed']} listed) | {med(ms)} | {med(us, 0)} |")
    for r in results.get("join", []):
        for kind in ("join", "leave"):
            ms = [x[0] for x in r[kind]]
            us = [x[1] for x in r[kind]]
            lines.append(f"| `{kind}` of a room (to {'`joined` and its own `join`' if kind == 'join' else '`left`'}) | "
                         f"{r['members']:,} members | {med(ms)} | {med(us, 0)} |")
    for r in results.get("stats", []):
        for path in ("/stats", "/metrics"):
            ms = [x[0] for x in r[path]]
            us = [x[1] for x in r[path]]
            lines.append(f"| `GET {path}` ({r[path + ' bytes']:,} bytes) | {r['connections']:,} connections | "
                         f"{med(ms)} | {med(us, 0)} |")
    return "\n".join(lines)


def save(results):
    with open(os.path.join(OUT, "scaling.json"), "w") as fh:
        json.dump(results, fh, indent=1)


async def main():
    os.makedirs(OUT, exist_ok=True)
    for b in (LC, LOAD):
        if not os.access(b, os.X_OK):
            raise SystemExit(f"scaling.py: build first: cargo build --release --bins ({b})")
    os.sched_setaffinity(0, {1})
    raise_nofile()
    results = {"rooms": [], "join": [], "stats": []}
    for n in ROOM_SIZES:
        print(f"== rooms: {n}", file=sys.stderr)
        results["rooms"].append(await asyncio.wait_for(rooms_case(n), STEP_TIMEOUT_S))
        save(results)
    for n in MEMBER_SIZES:
        print(f"== join: {n} members", file=sys.stderr)
        results["join"].append(await asyncio.wait_for(join_case(n), STEP_TIMEOUT_S + n / 50))
        save(results)
    for n in CONN_SIZES:
        print(f"== stats: {n} connections", file=sys.stderr)
        results["stats"].append(await asyncio.wait_for(stats_case(n), STEP_TIMEOUT_S))
    save(results)
    text = report(results)
    with open(os.path.join(OUT, "scaling.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    signal.signal(signal.SIGALRM, lambda *_: (print("scaling.py: TOTAL_CAP_S reached", file=sys.stderr), sys.exit(1)))
    signal.alarm(TOTAL_CAP_S)
    try:
        asyncio.run(main())
    finally:
        cleanup()
