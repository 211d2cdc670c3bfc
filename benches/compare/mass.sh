#!/usr/bin/env bash
# Mass events (issue "steady under mass events"): 10,000 sessions arrive
# at once and leave at once, in rooms of 100 and of 1,000, while four
# probes chat in a room of their own; `loopchat-load mass` reports per
# phase the server's CPU, its iterations over 1..100 ms of CPU, and the
# probes' latency. One server per run, pinned to core 0, the load tool to
# core 1; loopback only; every run capped by --duration-s and `timeout`.
#
#   benches/compare/mass.sh                      # RUNS=3, about 6 minutes
#   BUDGETS="1000 6000" RUNS=1 benches/compare/mass.sh
#   BASE=/path/to/older/loopchat benches/compare/mass.sh   # and a baseline
#
# Prints one JSON object per run (the load tool's, plus "server" and
# "budget_us"); benches/compare/mass_summary.py turns them into medians.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNS=${RUNS:-3}
CONNS=${CONNS:-10000}
BUDGETS=${BUDGETS:-6000}
SHAPES=${SHAPES:-"100:drop 100:close 1000:drop"}
LC=${LC:-$ROOT/target/release/loopchat}
LOAD=${LOAD:-$ROOT/target/release/loopchat-load}
BASE=${BASE:-}
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null || true' EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

one() { # label binary budget-args room leave
  local label=$1 bin=$2 budget=$3 room=$4 leave=$5 port
  port=$(free_port)
  # shellcheck disable=SC2086
  taskset -c 0 "$bin" --listen "127.0.0.1:$port" --no-persist --log-level warn $budget &
  pid=$!
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  local out
  out=$(timeout 150 taskset -c 1 "$LOAD" mass --url "ws://127.0.0.1:$port/ws" --conns "$CONNS" \
    --room-size "$room" --leave "$leave" --pid "$pid" --duration-s 120 \
    --connect-timeout-s "${CONNECT_TIMEOUT_S:-60}" --json --quiet || true)
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["server"]=sys.argv[2]; print(json.dumps(d))' "$out" "$label"
}

for run in $(seq "$RUNS"); do
  for shape in $SHAPES; do
    room=${shape%%:*}; leave=${shape##*:}
    if [ -n "$BASE" ]; then one base "$BASE" "" "$room" "$leave"; fi
    for b in $BUDGETS; do one "budget-$b" "$LC" "--pass-budget-us $b" "$room" "$leave"; done
  done
done
