#!/usr/bin/env python3
"""How the SQLite store scales, end to end over the wire (docs/persistence.md,
"Scale, measured"). Each part starts its own server on core 0 (taskset -c 0)
with its own data dir under /tmp, drives it from core 1, and prints one line
per figure:

  rooms     50,000 rooms with one message each (join, message, leave on 8
            connections): disk bytes against the messages' JSON, RSS at
            10k/25k/50k rooms, fsync/fdatasync calls per thread (strace -f),
            other users' echo p99 (loopchat-load fanout) idle and during it
  attack    a room of 1,000,000 messages: `history limit 1` and `join since`
            at 20/s from one client; other users' p99 without and with it
  startup   start-up time (exec to /healthz 200) and RSS with 1,000,000
            messages in 10 / 1,000 / 10,000 rooms, after a clean stop and
            after kill -9
  pages     `history` pages and `since` resumes in rooms of 10k/100k/1M
            messages: round trip p50/p99 and server CPU per request

Data dirs are filled without the wire by `cargo bench --bench store -- fill`
(the store's own code, one commit per 1,000 messages).

Usage: python3 benches/compare/store_scale.py [PART...] (default: all).
LOOPCHAT_BIN runs another build (e.g. an earlier commit's) side by side;
STORE_SCALE_DIR keeps the filled data dirs there for the next run.
Bounded: every wait has a timeout, every loop a count; about 5 minutes in
all. Loopback only. Needs `websockets` (Python) and `strace`.
"""
import asyncio
import glob
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("LOOPCHAT_BIN") or os.path.join(ROOT, "target/release/loopchat")
LOAD = os.path.join(ROOT, "target/release/loopchat-load")
FAST = ["--rate-per-s", "100000", "--rate-burst", "100000"]
# The filled rooms are bigger than the default --retain-messages (100,000):
# without this the server would trim them while they are measured.
KEEP_ALL = ["--retain-messages", "10000000"]
TICK = os.sysconf("SC_CLK_TCK")
PORT = [18900]


def store_bench():
    """The bench binary that has the `fill` helper (built by cargo bench)."""
    found = sorted(glob.glob(os.path.join(ROOT, "target/release/deps/store-*")), key=os.path.getmtime)
    found = [f for f in found if os.access(f, os.X_OK) and not f.endswith(".d")]
    if not found:
        sys.exit("build it first: cargo bench --bench store --no-run")
    return found[-1]


def fill(dirname, rooms, per_room):
    out = subprocess.run(["taskset", "-c", "1", store_bench(), "fill", dirname, str(rooms), str(per_room)],
                         capture_output=True, text=True, timeout=300, check=True)
    print("  " + out.stdout.strip())


class Server:
    def __init__(self, data, extra=()):
        PORT[0] += 1
        self.port = PORT[0]
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        args = ["taskset", "-c", "0", BIN, "--listen", f"127.0.0.1:{self.port}", "--log-level", "warn",
                "--data-dir", data, *(extra or FAST)]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/healthz", 0.5) is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.002)
        self.start_s = time.monotonic() - self.t0

    def get(self, path, timeout=5):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
            return r.read()

    def stats(self):
        return json.loads(self.get("/stats"))

    def rss_kb(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_s(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def stop(self, kill=False):
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def fanout_p99(url):
    """Other users: 10 members, 2 of them sending 100 msg/s each for 5 s."""
    out = subprocess.run(["taskset", "-c", "1", LOAD, "fanout", "--url", url, "--receivers", "10",
                          "--senders", "2", "--messages", "500", "--msg-rate", "100", "--json", "--quiet",
                          "--duration-s", "60"], capture_output=True, text=True, timeout=90)
    return latency(out.stdout)


def latency(text):
    """(p50, p99, missing) of a loopchat-load fanout --json result."""
    d = json.loads(text)
    lat = d.get("latency", {})
    return lat.get("p50_ms"), lat.get("p99_ms"), d.get("missing")


def disk_bytes(data):
    return sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)
               if f.startswith("loopchat.db"))


async def expect(ws, kind, timeout=10):
    while True:
        ev = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if ev.get("type") == kind:
            return ev
        if ev.get("type") == "error":
            raise RuntimeError(f"error: {ev}")


async def connect(url, user):
    ws = await websockets.connect(f"{url}?username={user}&room=home-{user}", max_size=None,
                                  open_timeout=10, ping_interval=None)
    await expect(ws, "welcome")
    await expect(ws, "joined")
    return ws


# ---- rooms ------------------------------------------------------------------

async def room_cycles(url, worker, first, count):
    ws = await connect(url, f"w{worker}")
    for i in range(first, first + count):
        room = f"once-{i}"
        await ws.send(json.dumps({"type": "join", "room": room}))
        await expect(ws, "joined")
        await ws.send(json.dumps({"type": "message", "room": room, "content": f"the one message of room {i}",
                                  "ref": "m"}))
        await expect(ws, "message")
        await ws.send(json.dumps({"type": "leave", "room": room}))
        await expect(ws, "left")
    await ws.close()


async def make_rooms(url, first, count, workers=8):
    per = count // workers
    await asyncio.gather(*(room_cycles(url, w, first + w * per, per) for w in range(workers)))


def part_rooms():
    print("== rooms: 50,000 rooms with one message each (--fsync everysec)")
    data = tempfile.mkdtemp(prefix="lcscale-rooms.")
    srv = Server(data)
    try:
        idle = [fanout_p99(srv.url) for _ in range(2)]
        rss0 = srv.rss_kb()
        trace = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", data + ".strace",
                                  "-p", str(srv.pid)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        probe = []
        t0 = time.monotonic()
        cpu0 = srv.cpu_s()
        rss = {}
        done = 0
        for upto in (10_000, 25_000, 50_000):
            with subprocess.Popen(["taskset", "-c", "1", LOAD, "fanout", "--url", srv.url, "--receivers", "10",
                                   "--senders", "2", "--messages", "500", "--msg-rate", "100", "--json",
                                   "--quiet", "--duration-s", "60"], stdout=subprocess.PIPE, text=True) as p:
                asyncio.run(make_rooms(srv.url, done, upto - done))
                out, _ = p.communicate(timeout=90)
            probe.append(latency(out)[1])
            done = upto
            rss[upto] = srv.rss_kb()
        secs = time.monotonic() - t0
        cpu = srv.cpu_s() - cpu0
        trace.send_signal(signal.SIGINT)
        trace.wait(timeout=10)
        st = srv.stats()
        store = st.get("store", {})
        disk_open = disk_bytes(data)
    finally:
        srv.stop()
    calls = {}
    with open(data + ".strace") as f:
        for line in f:
            parts = line.split(None, 1)
            if len(parts) == 2 and ("fsync(" in parts[1] or "fdatasync(" in parts[1]):
                tid = int(parts[0])
                who = "loop" if tid == srv.pid else "helper"
                calls[who] = calls.get(who, 0) + 1
    db = sqlite3.connect(os.path.join(data, "loopchat.db"))
    msgs, json_bytes = db.execute("SELECT count(*), sum(length(json)) FROM messages "
                                  "WHERE room IN (SELECT rid FROM rooms WHERE name LIKE 'once-%')").fetchone()
    rooms = db.execute("SELECT count(*) FROM rooms").fetchone()[0]
    db.close()
    disk = disk_bytes(data)
    print(f"  {done} rooms in {secs:.1f} s ({done / secs:.0f} rooms/s, {cpu * 1e6 / done:.0f} us server CPU per room "
          f"with its join, message and leave); store_rooms {store.get('store_rooms')}, rows {rooms}")
    print(f"  disk: {disk_open} B while running, {disk} B after a clean stop, for {json_bytes} B of JSON in "
          f"{msgs} messages ({disk / json_bytes:.2f}x, {(disk - json_bytes) / done:.0f} B per room beyond its JSON)")
    print(f"  RSS: {rss0} kB before, " + ", ".join(f"{rss[k]} kB at {k}" for k in sorted(rss)))
    print(f"  fsync+fdatasync calls during it: loop thread {calls.get('loop', 0)}, helper thread "
          f"{calls.get('helper', 0)} (store_syncs {store.get('store_syncs')}, "
          f"store_wal_restarts {store.get('store_wal_restarts')}, store_checkpoints {store.get('store_checkpoints')}, "
          f"store_loop_checkpoints {store.get('store_loop_checkpoints')})")
    print(f"  other users' echo p99: idle {[round(x[1], 2) for x in idle]} ms; during it "
          f"{[round(x, 2) for x in probe]} ms")
    shutil.rmtree(data, ignore_errors=True)
    os.unlink(data + ".strace")


# ---- attack -----------------------------------------------------------------

async def attacker(url, room, per_s, secs, newest):
    ws = await connect(url, "attacker")
    lat = {"history": [], "since": []}
    n = int(per_s * secs)
    start = time.monotonic()
    for i in range(n):
        due = start + i / per_s
        await asyncio.sleep(max(0, due - time.monotonic()))
        t = time.monotonic()
        if i % 2 == 0:
            await ws.send(json.dumps({"type": "history", "room": room, "limit": 1}))
            ev = await expect(ws, "history")
            assert len(ev["messages"]) == 1
            lat["history"].append((time.monotonic() - t) * 1e3)
        else:
            await ws.send(json.dumps({"type": "join", "room": room, "since": newest - 10}))
            ev = await expect(ws, "joined")
            assert len(ev["history"]) >= 10, len(ev["history"])
            lat["since"].append((time.monotonic() - t) * 1e3)
            await ws.send(json.dumps({"type": "leave", "room": room}))
            await expect(ws, "left")
    await ws.close()
    return lat


def part_attack(base):
    print("== attack: a room of 1,000,000 messages, history limit 1 and join since at 20/s (default rate limit)")
    data = os.path.join(base, "big1m")
    if not os.path.exists(data):
        fill(data, 1, 1_000_000)
    srv = Server(data, ["--rate-per-s", "1000", "--rate-burst", "1000", *KEEP_ALL])
    rows = []
    try:
        for rnd in range(3):
            without = fanout_p99(srv.url)
            loop = asyncio.new_event_loop()
            with subprocess.Popen(["taskset", "-c", "1", LOAD, "fanout", "--url", srv.url, "--receivers", "10",
                                   "--senders", "2", "--messages", "500", "--msg-rate", "100", "--json",
                                   "--quiet", "--duration-s", "60"], stdout=subprocess.PIPE, text=True) as p:
                lat = loop.run_until_complete(attacker(srv.url, "big", 20, 6, 1_000_000))
                out, _ = p.communicate(timeout=90)
            loop.close()
            with_ = latency(out)
            rows.append((without[1], with_[1], pct(lat["history"], 50), pct(lat["history"], 99),
                         pct(lat["since"], 50), pct(lat["since"], 99)))
            print(f"  round {rnd + 1}: other users' p99 {without[1]:.2f} ms without, {with_[1]:.2f} ms with; "
                  f"attacker history p50/p99 {rows[-1][2]:.2f}/{rows[-1][3]:.2f} ms, "
                  f"since p50/p99 {rows[-1][4]:.2f}/{rows[-1][5]:.2f} ms")
        print(f"  median of rounds: p99 without {statistics.median(r[0] for r in rows):.2f} ms, "
              f"with {statistics.median(r[1] for r in rows):.2f} ms; RSS {srv.rss_kb()} kB")
    finally:
        srv.stop()


# ---- startup ----------------------------------------------------------------

def part_startup(base):
    print("== startup: 1,000,000 messages on disk")
    for rooms in (10, 1_000, 10_000):
        data = os.path.join(base, f"start-{rooms}")
        if not os.path.exists(data):
            fill(data, rooms, 1_000_000 // rooms)
        room = "r0"
        clean, crashed = [], []
        rss = None
        # Not measured: leaves the dir closed cleanly whatever ended the
        # last run (this part itself ends on a kill -9).
        Server(data, [*FAST, *KEEP_ALL]).stop()
        for run in range(4):
            kill = run >= 2
            srv = Server(data, [*FAST, *KEEP_ALL])
            (crashed if run >= 3 else clean).append(srv.start_s * 1e3)
            if rss is None:
                rss = srv.rss_kb()

                async def first_page():
                    ws = await connect(srv.url, "reader")
                    await ws.send(json.dumps({"type": "history", "room": room, "limit": 50}))
                    await expect(ws, "history")
                    await ws.close()
                asyncio.run(first_page())
                rss_after = srv.rss_kb()
            srv.stop(kill=kill)
        print(f"  {rooms} rooms x {1_000_000 // rooms} messages, {disk_bytes(data) // 1_000_000} MB: start-up "
              f"{', '.join(f'{x:.0f}' for x in clean)} ms after a clean stop, "
              f"{', '.join(f'{x:.0f}' for x in crashed)} ms after kill -9 (quick_check); RSS {rss} kB at start, "
              f"{rss_after} kB after a first page of 50")


# ---- pages ------------------------------------------------------------------

async def page_costs(srv, room, newest, n=300):
    ws = await connect(srv.url, "pager")
    rng = random.Random(7)
    out = {}
    for kind in ("limit 1", "newest 50", "before random, 50", "since newest-50", "since random"):
        lat = []
        got = []
        cpu0 = srv.cpu_s()
        # Enough calls for the 10 ms ticks of /proc to resolve a few µs.
        calls = 3000 if kind == "limit 1" else n
        for _ in range(calls):
            t = time.monotonic()
            if kind == "limit 1":
                await ws.send(json.dumps({"type": "history", "room": room, "limit": 1}))
                ev = await expect(ws, "history")
                assert len(ev["messages"]) == 1
            elif kind == "newest 50":
                await ws.send(json.dumps({"type": "history", "room": room, "limit": 50}))
                ev = await expect(ws, "history")
                assert len(ev["messages"]) == 50
            elif kind.startswith("before"):
                b = rng.randrange(100, newest - 100)
                await ws.send(json.dumps({"type": "history", "room": room, "before": b, "limit": 50}))
                ev = await expect(ws, "history")
                assert len(ev["messages"]) == 50
            else:
                s = newest - 50 if kind == "since newest-50" else rng.randrange(100, newest - 100)
                await ws.send(json.dumps({"type": "join", "room": room, "since": s}))
                ev = await expect(ws, "joined")
                lat.append((time.monotonic() - t) * 1e3)
                assert ev["history"][0]["id"] == s + 1
                got.append(len(ev["history"]))
                await ws.send(json.dumps({"type": "leave", "room": room}))
                await expect(ws, "left")
                continue
            lat.append((time.monotonic() - t) * 1e3)
        cpu = srv.cpu_s() - cpu0
        label = f"{kind} ({statistics.median(got):.0f} msgs)" if got else kind
        out[label] = (pct(lat, 50), pct(lat, 99), cpu * 1e6 / calls)
    await ws.close()
    return out


def part_pages(base):
    print("== pages: history and since in one room of N messages (round trip; server CPU per request)")
    for n in (10_000, 100_000, 1_000_000):
        data = os.path.join(base, "big1m" if n == 1_000_000 else f"big{n}")
        if not os.path.exists(data):
            fill(data, 1, n)
        srv = Server(data, [*FAST, *KEEP_ALL])
        try:
            res = asyncio.run(page_costs(srv, "big", n))
        finally:
            srv.stop()
        print(f"  {n} messages: " + "; ".join(
            f"{k} p50 {v[0]:.2f} ms p99 {v[1]:.2f} ms cpu {v[2]:.0f} us" for k, v in res.items()))


def main():
    parts = sys.argv[1:] or ["rooms", "attack", "startup", "pages"]
    base = os.environ.get("STORE_SCALE_DIR") or tempfile.mkdtemp(prefix="lcscale.")
    keep = "STORE_SCALE_DIR" in os.environ
    try:
        for part in parts:
            if part == "rooms":
                part_rooms()
            elif part == "attack":
                part_attack(base)
            elif part == "startup":
                part_startup(base)
            elif part == "pages":
                part_pages(base)
            else:
                sys.exit(f"unknown part {part}")
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
