#!/usr/bin/env bash
# Where loopchat's time goes, measured from outside, beside ws-rs:
#
#  1. syscalls per churn cycle (connect -> welcome -> message -> close):
#     `strace -c -f` attached to the server for one churn run, calls ÷ cycles,
#     for loopchat and each server in STRACE_SERVERS (default: wsrs).
#  2. `perf record -g` (cpu-clock) of loopchat during churn and during the
#     saturated 1,000-member fan-out: top symbols (self time) and the
#     kernel/loopchat/libc split.
#  3. frames per write: syscall counts from the syscalls:sys_enter_* trace
#     points (`perf stat`, far lighter than strace, so the batching measured
#     is the batching of an untraced server), against deliveries, for the
#     saturated 100- and 1,000-member fan-outs and 500 msg/s; for loopchat
#     also its own /stats counters (frames_queued, flushes).
#
#   benches/compare/profile.sh          # about 3 minutes
#   WRITE_SERVERS="loopchat" benches/compare/profile.sh
#
# Server on core 0, load on core 1, loopback only. Every tool run is capped
# by --duration-s and `timeout`, every strace/perf by the run it watches, the
# whole script by TOTAL_CAP_S; everything it starts is killed on exit.
# Output: $OUT (default target/compare/profile-<stamp>/), report.md in it.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PORT=${PORT:-18191}
CHURN_CYCLES=${CHURN_CYCLES:-2000}
PERF_CHURN_CYCLES=${PERF_CHURN_CYCLES:-4000}
STRACE_SERVERS=${STRACE_SERVERS:-"wsrs"}
WRITE_SERVERS=${WRITE_SERVERS:-"loopchat wsrs tokio"}
RUN_CAP_S=${RUN_CAP_S:-60}
TOTAL_CAP_S=${TOTAL_CAP_S:-480}
OUT=${OUT:-$ROOT/target/compare/profile-$(date +%Y%m%d-%H%M%S)}
LOAD=$ROOT/target/release/loopchat-load
LC=$ROOT/target/release/loopchat
PEERS_TARGET=$ROOT/target/peers

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM
( trap 'kill $s 2>/dev/null; exit 0' TERM; sleep "$TOTAL_CAP_S" & s=$!; wait $s
  echo "profile.sh: TOTAL_CAP_S=$TOTAL_CAP_S reached, stopping" >&2; kill -TERM $$ ) >/dev/null 2>&1 &
PIDS+=($!)

for c in taskset strace perf python3 cargo curl; do
  command -v "$c" >/dev/null || { echo "profile.sh: needs $c" >&2; exit 2; }
done
mkdir -p "$OUT"
echo "== build" >&2
(cd "$ROOT" && cargo build --release --bins -q)
for peer in wsrs tokio; do
  case " $STRACE_SERVERS $WRITE_SERVERS " in *" $peer "*)
    (cd "$HERE/$peer" && CARGO_TARGET_DIR=$PEERS_TARGET timeout 900 cargo build --release --locked -q) ;;
  esac
done
if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then echo "profile.sh: port $PORT busy" >&2; exit 2; fi
URL=ws://127.0.0.1:$PORT/ws

SERVER_PID=
start_server() { # $1 = loopchat|wsrs|tokio
  case $1 in
    loopchat) taskset -c 0 "$LC" --no-persist --listen 127.0.0.1:$PORT --log-level warn \
                --rate-per-s 100000 --rate-burst 100000 >"$OUT/$1.log" 2>&1 & ;;
    wsrs)     taskset -c 0 "$PEERS_TARGET/release/wsrs-chat" $PORT >"$OUT/$1.log" 2>&1 & ;;
    tokio)    taskset -c 0 "$PEERS_TARGET/release/tokio-chat" $PORT >"$OUT/$1.log" 2>&1 & ;;
    *)        echo "profile.sh: unknown server $1" >&2; exit 2 ;;
  esac
  SERVER_PID=$!; PIDS+=($SERVER_PID)
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0; sleep 0.1
  done
  echo "profile.sh: $1 did not start" >&2; exit 1
}
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
load() { # $1 = result name; rest = loopchat-load args
  local name=$1; shift
  timeout $((RUN_CAP_S + 15)) taskset -c 1 "$LOAD" "$@" --url "$URL" --pid "$SERVER_PID" \
    --duration-s "$RUN_CAP_S" --json --quiet >"$OUT/$name.json" 2>"$OUT/$name.err" \
    || echo "profile.sh: $name exited $? (see $OUT/$name.err)" >&2
}
# A watcher ($@) attached to the server for the length of one load run, then
# stopped with SIGINT so it writes its summary.
watch() { # $1 = result name, $2 = watcher output file; then the watcher command, "--", load args
  local name=$1 file=$2; shift 2
  local cmd=()
  while [ "$1" != "--" ]; do cmd+=("$1"); shift; done; shift
  "${cmd[@]}" >"$file.stdout" 2>"$file.stderr" & local w=$!; PIDS+=($w)
  sleep 1  # attached before the load starts (strace/perf print nothing to wait on)
  load "$name" "$@"
  kill -INT "$w" 2>/dev/null || true; wait "$w" 2>/dev/null || true
}
stats() { curl -s --max-time 5 "http://127.0.0.1:$PORT/stats" || echo '{}'; }
WRITES=syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read

# 1. syscalls per churn cycle
for srv in loopchat $STRACE_SERVERS; do
  echo "== strace churn: $srv" >&2
  start_server "$srv"
  load "$srv.warm" churn --cycles 200 --concurrency 10
  watch "$srv.strace_churn" "$OUT/$srv.strace" strace -c -f -q -o "$OUT/$srv.strace" -p "$SERVER_PID" -- \
    churn --cycles "$CHURN_CYCLES" --concurrency 10
  stop_server
done

# 2. perf record of loopchat: churn, saturated 1,000-member fan-out
echo "== perf record: loopchat" >&2
start_server loopchat
load warm churn --cycles 200 --concurrency 10
watch perf_churn "$OUT/perf_churn" perf record -q -e cpu-clock -g -p "$SERVER_PID" -o "$OUT/perf_churn.data" -- \
  churn --cycles "$PERF_CHURN_CYCLES" --concurrency 10
watch perf_sat1000 "$OUT/perf_sat1000" perf record -q -e cpu-clock -g -p "$SERVER_PID" -o "$OUT/perf_sat1000.data" -- \
  fanout --receivers 1000 --senders 10 --messages 200 --msg-rate 0 --window 16 --rate 2000
stop_server
for p in perf_churn perf_sat1000; do
  perf report -i "$OUT/$p.data" --no-children --sort symbol --stdio -g none --percent-limit 0.7 \
    2>/dev/null >"$OUT/$p.symbols.txt" || true
  perf report -i "$OUT/$p.data" --no-children --sort dso --stdio -g none 2>/dev/null >"$OUT/$p.dso.txt" || true
  perf report -i "$OUT/$p.data" --children --sort symbol --stdio -g none --percent-limit 2 \
    2>/dev/null >"$OUT/$p.children.txt" || true
done

# 3. writes per delivery
for srv in $WRITE_SERVERS; do
  echo "== write counts: $srv" >&2
  start_server "$srv"
  for scen in sat100 sat1000 rate500; do
    case $scen in
      sat100)  args=(fanout --receivers 100 --senders 10 --messages 1000 --msg-rate 0 --window 16) ;;
      sat1000) args=(fanout --receivers 1000 --senders 10 --messages 100 --msg-rate 0 --window 16 --rate 2000) ;;
      rate500) args=(fanout --receivers 100 --senders 10 --messages 300 --msg-rate 500) ;;
    esac
    stats >"$OUT/$srv.$scen.stats0.json"
    watch "$srv.$scen" "$OUT/$srv.$scen.perfstat" perf stat -x, -e "$WRITES" -p "$SERVER_PID" -o "$OUT/$srv.$scen.perfstat" -- \
      "${args[@]}"
    stats >"$OUT/$srv.$scen.stats1.json"
  done
  stop_server
done

python3 "$HERE/profile_summary.py" "$OUT" | tee "$OUT/report.md"
