#!/usr/bin/env python3
"""RSS over time under the stalled-readers abuse of tests/memory.rs, with
and without --memory-limit (issue 16's benchmark, docs/performance.md).

Builds nothing: run `nice cargo build --release` first. Starts
target/release/loopchat twice (pinned to CPU 0), once with
`--memory-limit 48M` and once without, and runs the load from this process
(pinned to CPU 1): 40 WebSocket readers that never read, one fast reader,
and one sender sending 24,000 messages of 3 KB, never more than 2,000
ahead of the fast reader and of its own echoes. `/stats` is sampled every
50 ms. Writes a CSV and a PNG (default docs/memory-rss.csv and
docs/memory-rss.png). Each run ends within 60 s.

    python3 benches/compare/memory.py [--out-png docs/memory-rss.png]
"""

import argparse
import csv
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

LIMIT = 48 << 20
ALLOWANCE = 16 << 20
SLOW_READERS = 40
CONTENT = 3000
MESSAGES = 24_000
WINDOW = 2000
BATCH = 100
RUN_S = 60.0
TAIL_S = 2.0  # sampling after the flood, with every socket closed
SAMPLE_S = 0.05

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def upgrade(addr, path):
    s = socket.create_connection(addr, timeout=RUN_S)
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = s.recv(1)
        if not b:
            raise RuntimeError(f"EOF in the upgrade of {path}")
        head += b
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"no 101 for {path}: {head[:80]!r}")
    return s


def client_frame(opcode_byte, payload):
    """A masked client frame, as tests/common/mod.rs builds them."""
    n = len(payload)
    if n < 126:
        head = bytes([opcode_byte, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([opcode_byte, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([opcode_byte, 0x80 | 127]) + struct.pack(">Q", n)
    mask = bytes([0x37, 0xFA, 0x21, 0x3D])
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def read_exact(f, n):
    b = f.read(n)
    if b is None or len(b) < n:
        raise EOFError
    return b


def read_frame(f):
    h = read_exact(f, 2)
    n = h[1] & 0x7F
    if n == 126:
        n = struct.unpack(">H", read_exact(f, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", read_exact(f, 8))[0]
    return h[0], read_exact(f, n)


def reader(sock, progress, key):
    """Read until the last message, a close or EOF; progress[key] is the
    last id of the sender's messages seen."""
    f = sock.makefile("rb", buffering=1 << 16)
    try:
        while True:
            op, payload = read_frame(f)
            if op == 0x88:
                progress[key + "_close"] = payload[:2]
                return
            if op != 0x81 or b'"sender"' not in payload:
                continue
            v = json.loads(payload)
            if v.get("type") == "message" and v.get("user") == "sender":
                progress[key] = v["id"]
                if v["id"] >= MESSAGES:
                    return
    except (EOFError, OSError, ValueError):
        return


def stats(addr):
    c = http.client.HTTPConnection(addr[0], addr[1], timeout=5)
    try:
        c.request("GET", "/stats")
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def run(binary, limit_args, label):
    cmd = [
        "taskset", "-c", "0", binary,
        "--no-persist", "--listen", "127.0.0.1:0",
        "--max-outbox-bytes", "96M",
        "--rate-per-s", "1000000", "--rate-burst", "1000000",
    ] + limit_args
    env = dict(os.environ)
    env.pop("LOOPCHAT_LOG", None)
    srv = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=env)
    t_start = time.monotonic()
    port = None
    for line in srv.stderr:
        if "listening on ws://127.0.0.1:" in line:
            port = int(re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line).group(1))
            break
        if time.monotonic() - t_start > 10:
            break
    if port is None:
        srv.kill()
        raise RuntimeError("no listening line")
    # Drain the rest of the log so the server never blocks on it.
    log = []
    threading.Thread(target=lambda: log.extend(srv.stderr), daemon=True).start()
    addr = ("127.0.0.1", port)
    samples = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler():
        while not stop.is_set():
            try:
                s = stats(addr)
                samples.append((time.monotonic() - t0, s["rss_bytes"],
                                s["memory_used_bytes"], s.get("memory_sheds", 0),
                                s.get("connections", 0)))
            except Exception:
                pass
            stop.wait(SAMPLE_S)

    threading.Thread(target=sampler, daemon=True).start()
    progress = {"fast": 0, "echo": 0}
    socks = []
    try:
        fast = upgrade(addr, "/ws?username=fast")
        socks.append(fast)
        threads = [threading.Thread(target=reader, args=(fast, progress, "fast"), daemon=True)]
        for i in range(SLOW_READERS):
            socks.append(upgrade(addr, f"/ws?username=slow{i}"))  # never read
        sender = upgrade(addr, "/ws?username=sender")
        echo = sender.dup()
        socks += [sender, echo]
        threads.append(threading.Thread(target=reader, args=(echo, progress, "echo"),
                                        daemon=True))
        for t in threads:
            t.start()
        frame = client_frame(0x81, json.dumps(
            {"type": "message", "content": "m" * CONTENT}).encode())
        batch = frame * BATCH
        sent = 0
        deadline = t0 + RUN_S - TAIL_S - 1
        t_flood = time.monotonic() - t0
        while sent < MESSAGES and time.monotonic() < deadline:
            while min(progress["fast"], progress["echo"]) + WINDOW < sent:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
            sender.sendall(batch)
            sent += BATCH
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
        t_done = time.monotonic() - t0
        complete = progress["fast"] >= MESSAGES
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
    time.sleep(TAIL_S)
    stop.set()
    time.sleep(SAMPLE_S * 2)
    final = stats(addr)
    srv.kill()
    srv.wait()
    peak_rss = max(s[1] for s in samples)
    peak_used = max(s[2] for s in samples)
    summary = {
        "label": label, "sent": sent, "fast_got": progress["fast"], "complete": complete,
        "flood_s": round(t_done - t_flood, 2), "peak_rss_mib": round(peak_rss / 2**20, 1),
        "peak_used_mib": round(peak_used / 2**20, 1),
        "memory_sheds": final.get("memory_sheds"),
        "rejected_memory": (final.get("rejected") or {}).get("memory"),
        "samples": len(samples),
    }
    print(json.dumps(summary), flush=True)
    return samples, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/loopchat"))
    ap.add_argument("--out-csv", default=os.path.join(ROOT, "docs/memory-rss.csv"))
    ap.add_argument("--out-png", default=os.path.join(ROOT, "docs/memory-rss.png"))
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} missing: nice cargo build --release first")
    try:
        os.sched_setaffinity(0, {1})  # the load on CPU 1, the server on CPU 0
    except (AttributeError, OSError):
        pass
    runs = [("with --memory-limit 48M", ["--memory-limit", "48M"]),
            ("without a limit", [])]
    results = []
    for label, extra in runs:
        results.append((label,) + run(a.bin, extra, label))

    with open(a.out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "t_s", "rss_bytes", "memory_used_bytes", "memory_sheds", "connections"])
        for label, samples, _ in results:
            for s in samples:
                w.writerow([label, f"{s[0]:.3f}"] + list(s[1:]))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=90)
    for (label, samples, _), color in zip(results, ["tab:blue", "tab:red"]):
        ax.plot([s[0] for s in samples], [s[1] / 2**20 for s in samples],
                color=color, label=f"RSS, {label}")
        if "limit" in label and "without" not in label:
            ax.plot([s[0] for s in samples], [s[2] / 2**20 for s in samples],
                    color=color, linestyle=":", label="memory_used_bytes (account), with the limit")
    ax.axhline(LIMIT / 2**20, color="gray", linestyle="--", label="limit 48 MiB")
    ax.axhline((LIMIT + ALLOWANCE) / 2**20, color="black", linestyle="--",
               label="limit + 16 MiB allowance")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("MiB")
    ax.set_title("loopchat: 40 stalled readers, 24,000 × 3 KB messages")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out_png)
    print(f"wrote {a.out_csv} and {a.out_png}")


if __name__ == "__main__":
    main()
