#!/usr/bin/env bash
# Two (or more) loopchat binaries side by side on one load: the saturated
# fan-out into 100 members (10 senders, window 16), each binary in turn per
# round, server alone on core 0 and loopchat-load on core 1. Prints one
# line per run: round, binary, server CPU per delivery (µs), latency p50 and
# p99 (ms), frames per write (/stats frames_queued / writes; "-" for a
# peer). Compare the
# per-round ratios, and run it a second time with the binaries in the
# other order (the second of a round can run on a warmer machine).
#
#   cp target/release/loopchat /tmp/before    # then change, rebuild
#   benches/compare/ab_fanout.sh /tmp/before target/release/loopchat
#   ROUNDS=5 MSGS=2000 benches/compare/ab_fanout.sh A B
#   RATE=500 MSGS=300 benches/compare/ab_fanout.sh A B   # paced, 500 msg/s
#   benches/compare/ab_fanout.sh A B tokio   # tokio: the tokio-tungstenite peer
#     (built into target/peers as benches/compare/run.sh builds it)
#
# Bounded: ROUNDS (default 3) x binaries runs of 10 x MSGS (default 2000)
# messages x 100 members, each capped at 90 s. Loopback only.
set -u
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: ab_fanout.sh BINARY [BINARY...]" >&2; exit 2; }
LOAD=${LOAD:-./target/release/loopchat-load}
[ -x "$LOAD" ] || cargo build --release --bin loopchat-load -q
port=${PORT:-18777}
dir=$(mktemp -d /tmp/ab-fanout.XXXX)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for round in $(seq "${ROUNDS:-3}"); do
  for bin in "$@"; do
    port=$((port + 1))
    if [ "$bin" = tokio ]; then
      taskset -c 0 ./target/peers/release/tokio-chat $port >/dev/null 2>&1 &
    else
      taskset -c 0 "$bin" --no-persist --listen 127.0.0.1:$port --log-level warn \
        --rate-per-s 100000 --rate-burst 100000 >/dev/null 2>&1 &
    fi
    pid=$!
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
    timeout 100 taskset -c 1 "$LOAD" fanout --receivers 100 --senders 10 \
      --messages "${MSGS:-2000}" --msg-rate "${RATE:-0}" --window 16 --url ws://127.0.0.1:$port/ws \
      --pid $pid --duration-s 90 --json --quiet >"$dir/fan.json" 2>/dev/null
    curl -s --max-time 5 127.0.0.1:$port/stats >"$dir/stats.json" || echo '{}' >"$dir/stats.json"
    kill $pid; wait $pid 2>/dev/null; pid=
    python3 - "$round" "$bin" "$dir" <<'PY'
import json, os, sys
round_, binary, d = sys.argv[1:]
try:
    fan = json.load(open(os.path.join(d, "fan.json")))
except (OSError, ValueError) as e:
    print(f"{round_} {binary} failed: {e}")
    sys.exit(0)
try:
    stats = json.load(open(os.path.join(d, "stats.json")))
    per_write = f"{stats['frames_queued'] / max(1, stats['writes']):.1f}"
except (OSError, ValueError, KeyError):
    per_write = "-"  # a peer: no /stats
lat = fan.get("latency") or {}
print(f"{round_} {binary} cpu_us/delivery {fan['server'].get('cpu_us_per_delivery')} "
      f"p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} frames/write {per_write}")
PY
  done
done
