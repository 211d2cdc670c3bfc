#!/bin/sh
# Server CPU per delivery on the saturated fan-out, with and without
# --memory-limit 1G, interleaved (the first of each pair alternating),
# RUNS runs each (docs/performance.md,
# "Memory limit"). Builds nothing: `nice cargo build --release` first.
# A fresh server per run (CPU 0), the load tool on CPU 1. Server CPU is read
# two ways: the tool's --pid figure (utime+stime, 10 ms ticks) and the
# scheduler's on-CPU time from /proc/PID/schedstat (ns) around the run.
set -eu
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
PORT=${PORT:-18931}
B=${B:-target/release}
echo "mode,run,deliveries,tool_cpu_s,schedstat_cpu_s,ns_per_delivery,deliveries_per_s"
for i in $(seq 1 "$RUNS"); do
  # alternate which goes first, so neither always runs on a warmer machine
  if [ $((i % 2)) = 1 ]; then order="without with"; else order="with without"; fi
  for mode in $order; do
    if [ $mode = with ]; then extra="--memory-limit 1G"; else extra=""; fi
    # shellcheck disable=SC2086
    taskset -c 0 $B/loopchat --no-persist --listen 127.0.0.1:$PORT \
      --rate-per-s 1000000 --rate-burst 1000000 $extra 2>/dev/null &
    pid=$!
    sleep 0.5
    before=$(cut -d' ' -f1 /proc/$pid/schedstat)
    out=$(taskset -c 1 $B/loopchat-load fanout --url ws://127.0.0.1:$PORT/ws \
      --receivers 100 --senders 10 --messages 2000 --msg-rate 0 --window 16 \
      --pid $pid --json --quiet --duration-s 60)
    after=$(cut -d' ' -f1 /proc/$pid/schedstat)
    kill $pid; wait $pid 2>/dev/null || true
    echo "$out" | python3 -c '
import json, sys
o = json.load(sys.stdin); mode, i, b, a = sys.argv[1:]
assert o["failures"] == 0 and o["missing"] == 0, o
d = o["deliveries"]; s = (int(a) - int(b)) / 1e9
tool = o["server"]["cpu_s"]; rate = o["deliveries_per_s"]
print(f"{mode},{i},{d},{tool},{s:.4f},{s * 1e9 / d:.1f},{rate:.0f}")
' $mode "$i" "$before" "$after"
  done
done
