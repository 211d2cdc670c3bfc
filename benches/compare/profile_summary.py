#!/usr/bin/env python3
"""Summarize a benches/compare/profile.sh output directory as Markdown:
syscalls per churn cycle by server, perf's top symbols for loopchat, and
writes per delivery (frames per write) by server and load."""
import glob, json, os, re, sys

out = sys.argv[1]
NAMES = {"loopchat": "loopchat", "wsrs": "ws-rs", "tokio": "tokio-tungstenite", "node": "Node `ws`"}


def jload(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def strace_counts(path):
    """{syscall: calls} from an `strace -c` summary."""
    counts = {}
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return counts
    for line in lines:
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(f) in (5, 6) and re.match(r"^\d+\.\d+$", f[0]) and f[-1] != "total":
            try:
                counts[f[-1]] = int(f[3])
            except ValueError:
                pass
    return counts


# 1. syscalls per churn cycle
servers = sorted({os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(out, "*.strace"))},
                 key=lambda s: (s != "loopchat", s))
if servers:
    per = {}
    for s in servers:
        cycles = jload(os.path.join(out, f"{s}.strace_churn.json")).get("completed") or 0
        per[s] = (cycles, strace_counts(os.path.join(out, f"{s}.strace")))
    print("## Syscalls per churn cycle (`strace -c -f`, calls ÷ completed cycles)\n")
    print("cycles: " + ", ".join(f"{NAMES.get(s, s)} {per[s][0]}" for s in servers) + "\n")
    print("| syscall | " + " | ".join(NAMES.get(s, s) for s in servers) + " |")
    print("|" + "---|" * (len(servers) + 1))
    names = set()
    for s in servers:
        names |= set(per[s][1])
    lead = servers[0]
    total = {s: 0.0 for s in servers}
    rows = []
    for n in names:
        vals = {s: (per[s][1].get(n, 0) / per[s][0] if per[s][0] else 0) for s in servers}
        for s in servers:
            total[s] += vals[s]
        rows.append((n, vals))
    rows.sort(key=lambda r: (-r[1][lead], -max(r[1].values()), r[0]))
    for n, vals in rows:
        if max(vals.values()) >= 0.05:
            print(f"| `{n}` | " + " | ".join(f"{vals[s]:.2f}" for s in servers) + " |")
    print("| **all** | " + " | ".join(f"**{total[s]:.1f}**" for s in servers) + " |")
    print()

# 2. perf record top symbols
for p, what in (("perf_churn", "churn"), ("perf_sat1000", "saturated fan-out, 1,000 members")):
    path = os.path.join(out, f"{p}.symbols.txt")
    if not os.path.exists(path):
        continue
    print(f"## perf record, loopchat, {what}: top symbols (self)\n")
    dso = []
    for line in open(os.path.join(out, f"{p}.dso.txt")):
        m = re.match(r"^\s+(\d+\.\d+)%\s+(\S+)", line)
        if m:
            dso.append(f"{m.group(2)} {m.group(1)} %")
    samples = ""
    for line in open(path):
        m = re.match(r"^# Samples: (\S+)", line)
        if m:
            samples = m.group(1)
    print(f"samples: {samples}; by object: " + ", ".join(dso[:5]) + "\n")
    print("| % | symbol |")
    print("|---|---|")
    n = 0
    for line in open(path):
        m = re.match(r"^\s+(\d+\.\d+)%\s+\[([k.])\]\s+(.*\S)", line)
        if m and n < 30:
            print(f"| {m.group(1)} | `{m.group(3)[:110]}` {'(kernel)' if m.group(2) == 'k' else ''} |")
            n += 1
    print()
    ch = os.path.join(out, f"{p}.children.txt")
    if os.path.exists(ch):
        print(f"inclusive (children), loopchat's own functions ≥ 2 %:\n")
        print("| % incl. | symbol |")
        print("|---|---|")
        n = 0
        for line in open(ch):
            m = re.match(r"^\s+(\d+\.\d+)%\s+(\d+\.\d+)%\s+\[\.\]\s+(.*\S)", line)
            if m and ("loopchat" in m.group(3) or "tungstenite" in m.group(3)) and n < 25:
                print(f"| {m.group(1)} | `{m.group(3)[:110]}` |")
                n += 1
        print()


# 3. writes per delivery
def perfstat(path):
    counts = {}
    try:
        for line in open(path):
            f = line.strip().split(",")
            if len(f) >= 3 and f[2].startswith("syscalls:sys_enter_"):
                try:
                    counts[f[2].replace("syscalls:sys_enter_", "")] = int(f[0])
                except ValueError:
                    pass
    except OSError:
        pass
    return counts


wsrv = sorted({os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(out, "*.sat100.perfstat"))},
              key=lambda s: (s != "loopchat", s))
if wsrv:
    print("## Frames per write (syscall trace points counted by `perf stat`; frames = deliveries of the run)\n")
    print("| server | load | deliveries | writev | write | sendto/sendmsg | deliveries per write call | epoll_wait | server CPU µs/delivery |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in wsrv:
        for scen, label in (("sat100", "saturated, 100 members"), ("sat1000", "saturated, 1,000 members"),
                            ("rate500", "500 msg/s, 100 members")):
            c = perfstat(os.path.join(out, f"{s}.{scen}.perfstat"))
            d = jload(os.path.join(out, f"{s}.{scen}.json"))
            dl = d.get("deliveries") or 0
            wv, w, sm = c.get("writev", 0), c.get("write", 0), c.get("sendto", 0) + c.get("sendmsg", 0)
            calls = wv + w + sm
            cpu = (d.get("server") or {}).get("cpu_us_per_delivery")
            print(f"| {NAMES.get(s, s)} | {label} | {dl:,} | {wv:,} | {w:,} | {sm:,} | "
                  f"{(dl / calls) if calls else 0:.1f} | {c.get('epoll_wait', 0):,} | {cpu} |")
    print()
