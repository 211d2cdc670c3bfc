#!/usr/bin/env bash
# Side-by-side benchmark: loopchat vs three peers doing the same job, same
# loopchat-load scenarios, same run:
#   node   a ~40-line Node `ws` chat server (benches/compare/node/server.js)
#   wsrs   the `ws` crate 0.9, ws-rs, one mio thread (benches/compare/wsrs/)
#   tokio  tokio-tungstenite on tokio's multi-thread runtime (benches/compare/tokio/)
#
#   benches/compare/run.sh            # RUNS=3: loopchat, ws-rs, tokio; about 11 minutes
#   SERVERS="loopchat node wsrs tokio" TOTAL_CAP_S=1800 benches/compare/run.sh   # with Node, ~20 min
#   SERVERS="loopchat tokio" RUNS=5 benches/compare/run.sh
#
# Each run goes over the servers in turn, starting with a different one each
# run, so that no server always gets the same slot of a noisy machine.
# Server on core 0 (taskset -c 0), load tool on core 1; loopback only.
# Every tool run is capped by --duration-s and by `timeout`; the whole script
# by TOTAL_CAP_S. All processes it starts are killed on exit (trap).
# Raw JSON of every run goes to $OUT (default target/compare/<timestamp>/).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNS=${RUNS:-3}
SERVERS=${SERVERS:-"loopchat wsrs tokio"}  # node: +3 min a run
PORT_LC=${PORT_LC:-18181}
PORT_NODE=${PORT_NODE:-18182}
PORT_WSRS=${PORT_WSRS:-18183}
PORT_TOKIO=${PORT_TOKIO:-18184}
IDLE_CONNS=${IDLE_CONNS:-10000}   # needs ulimit -n above this for both sides
IDLE_RATE=${IDLE_RATE:-1000}     # Node and ws-rs time out handshakes at 3,000/s
IDLE_HOLD_S=${IDLE_HOLD_S:-5}
SAT_WINDOW=${SAT_WINDOW:-16}
SAT100_MSGS=${SAT100_MSGS:-500}   # 10 senders x 500 x 100 members = 500k deliveries
SAT1000_MSGS=${SAT1000_MSGS:-50}  # 10 senders x 50 x 1000 members = 500k deliveries
RATE_MSGS=${RATE_MSGS:-300}       # 10 senders x 300 at 500 msg/s = 6 s
CHURN_CYCLES=${CHURN_CYCLES:-2000}
RUN_CAP_S=${RUN_CAP_S:-90}        # per tool invocation
TOTAL_CAP_S=${TOTAL_CAP_S:-900}   # whole script (the defaults take about 11 min); raise it with node
OUT=${OUT:-$ROOT/target/compare/$(date +%Y%m%d-%H%M%S)}
LOAD=$ROOT/target/release/loopchat-load
LC=$ROOT/target/release/loopchat
PEERS_TARGET=$ROOT/target/peers    # the peers are standalone Cargo projects

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM
# Watchdog: its own sleep is killed with it, and it holds no output pipe open.
( trap 'kill $s 2>/dev/null; exit 0' TERM; sleep "$TOTAL_CAP_S" & s=$!; wait $s
  echo "run.sh: TOTAL_CAP_S=$TOTAL_CAP_S reached, stopping" >&2; kill -TERM $$ ) >/dev/null 2>&1 &
PIDS+=($!)

need() { command -v "$1" >/dev/null || { echo "run.sh: needs $1" >&2; exit 2; }; }
for c in taskset gcc python3 cargo; do need "$c"; done
case " $SERVERS " in *" node "*) need node; need npm ;; esac
[ "$(nproc)" -ge 2 ] || { echo "run.sh: needs 2 cores (server on 0, tool on 1)" >&2; exit 2; }
if [ "$(ulimit -n)" -le $((IDLE_CONNS + 100)) ]; then
  ulimit -n $((IDLE_CONNS + 1000)) 2>/dev/null || {
    IDLE_CONNS=$(( $(ulimit -n) - 1000 )); echo "run.sh: nofile too low, IDLE_CONNS=$IDLE_CONNS" >&2; }
fi

mkdir -p "$OUT"
echo "== build" >&2
(cd "$ROOT" && cargo build --release --bins -q)
case " $SERVERS " in *" node "*)
  if [ ! -d "$HERE/node/node_modules/ws" ]; then
    (cd "$HERE/node" && timeout 180 npm ci --no-audit --no-fund --loglevel=error)
  fi ;;
esac
for peer in wsrs tokio; do
  case " $SERVERS " in *" $peer "*)
    (cd "$HERE/$peer" && CARGO_TARGET_DIR=$PEERS_TARGET timeout 900 cargo build --release --locked -q) ;;
  esac
done
gcc -O2 -Wall -o "$OUT/floor_write" "$HERE/floor_write.c"

for port in $PORT_LC $PORT_NODE $PORT_WSRS $PORT_TOKIO; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then echo "run.sh: port $port busy" >&2; exit 2; fi
done

SERVER_PID=
start_server() { # $1 = loopchat|node|wsrs|tokio; sets SERVER_PID and URL
  case $1 in
    loopchat) taskset -c 0 "$LC" --no-persist --listen 127.0.0.1:$PORT_LC --log-level warn \
                --rate-per-s 100000 --rate-burst 100000 >"$OUT/$1.log" 2>&1 &
              URL=ws://127.0.0.1:$PORT_LC/ws; port=$PORT_LC ;;
    node)     taskset -c 0 node "$HERE/node/server.js" $PORT_NODE >"$OUT/$1.log" 2>&1 &
              URL=ws://127.0.0.1:$PORT_NODE/ws; port=$PORT_NODE ;;
    wsrs)     taskset -c 0 "$PEERS_TARGET/release/wsrs-chat" $PORT_WSRS >"$OUT/$1.log" 2>&1 &
              URL=ws://127.0.0.1:$PORT_WSRS/ws; port=$PORT_WSRS ;;
    tokio)    taskset -c 0 "$PEERS_TARGET/release/tokio-chat" $PORT_TOKIO >"$OUT/$1.log" 2>&1 &
              URL=ws://127.0.0.1:$PORT_TOKIO/ws; port=$PORT_TOKIO ;;
    *)        echo "run.sh: unknown server $1 (loopchat, node, wsrs, tokio)" >&2; exit 2 ;;
  esac
  SERVER_PID=$!; PIDS+=($SERVER_PID)
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return 0; sleep 0.1
  done
  echo "run.sh: $1 did not start" >&2; exit 1
}
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# run-queue wait (ns) and involuntary context switches: was core 0 shared?
# Summed over the server's threads (tokio's workers are not its main thread).
sched() { echo "$(cat /proc/$1/task/*/schedstat | awk '{s += $2} END {printf "%.0f", s}') $(awk '/nonvoluntary/{print $2}' /proc/$1/status)"; }

load() { # $1 = result name; rest = loopchat-load args
  local name=$1; shift
  timeout $((RUN_CAP_S + 15)) taskset -c 1 "$LOAD" "$@" --url "$URL" --pid "$SERVER_PID" \
    --duration-s "$RUN_CAP_S" --json --quiet >"$OUT/$name.json" 2>"$OUT/$name.err" \
    || echo "run.sh: $name exited $? (see $OUT/$name.err)" >&2
}

TCK=$(getconf CLK_TCK)
read -r -a ORDER <<<"$SERVERS"
for run in $(seq "$RUNS"); do
  # rotate the order: run 1 starts with the first server, run 2 with the second, ...
  n=${#ORDER[@]}; k=$(( (run - 1) % n ))
  for srv in "${ORDER[@]:k}" "${ORDER[@]:0:k}"; do
    echo "== run $run/$RUNS: $srv" >&2
    start_server "$srv"
    load "$srv.idle.$run" idle --conns "$IDLE_CONNS" --rate "$IDLE_RATE" --hold-s "$IDLE_HOLD_S" --room-size 100 --connect-timeout-s 30
    sleep 1
    load "$srv.sat100.$run" fanout --receivers 100 --senders 10 --messages "$SAT100_MSGS" --msg-rate 0 --window "$SAT_WINDOW"
    load "$srv.sat1000.$run" fanout --receivers 1000 --senders 10 --messages "$SAT1000_MSGS" --msg-rate 0 --window "$SAT_WINDOW" --rate 2000 --connect-timeout-s 30
    s0=$(sched "$SERVER_PID")
    load "$srv.rate500.$run" fanout --receivers 100 --senders 10 --messages "$RATE_MSGS" --msg-rate 500
    s1=$(sched "$SERVER_PID")
    echo "{\"before\":\"$s0\",\"after\":\"$s1\",\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >"$OUT/$srv.rate500sched.$run.json"
    c0=$(cpu_ticks "$SERVER_PID")
    load "$srv.churn.$run" churn --cycles "$CHURN_CYCLES" --concurrency 10
    c1=$(cpu_ticks "$SERVER_PID")
    awk -v a="$c0" -v b="$c1" -v t="$TCK" 'BEGIN{printf "{\"cpu_s\":%.4f}\n", (b-a)/t}' >"$OUT/$srv.churncpu.$run.json"
    stop_server
  done
  # floors: one write() per delivery, and frames batched 16 per write()
  taskset -c 0 "$OUT/floor_write" 100 3000 190 1 0 1 >"$OUT/floor.w1.$run.json" || true
  taskset -c 0 "$OUT/floor_write" 100 300 190 16 0 1 >"$OUT/floor.w16.$run.json" || true
  taskset -c 0 "$OUT/floor_write" 1000 300 190 1 0 1 >"$OUT/floor.w1k.$run.json" || true
done

python3 "$HERE/summarize.py" "$OUT" | tee "$OUT/table.md"
