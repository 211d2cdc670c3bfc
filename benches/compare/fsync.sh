#!/usr/bin/env bash
# Message throughput and server CPU per message per durability mode, end to
# end: the same loopchat-load fan-out against a fresh server and data dir
# each time, server on core 0, tool on core 1. With OLD set to the loopchat
# binary of an earlier commit (e.g. the JSON-lines store of 4ed971d, built
# in its own worktree), each mode runs on both stores in turn, side by side:
#
#   git worktree add /tmp/old-store 4ed971d
#   (cd /tmp/old-store && cargo build --release --bins)
#   OLD=/tmp/old-store/target/release/loopchat benches/compare/fsync.sh
#
# BASE, likewise, names a second binary of this store (e.g. a copy of
# target/release/loopchat taken before a change): each mode then also runs
# on it, as the `base` column, so a change is measured against both.
#
# Bounded: 3 rounds (ROUNDS sets another number) of at most 10 runs of
# 10 × 6,000 messages (MESSAGES sets another number per sender, at most
# 100,000), each capped at 120 s. Loopback only. `cpu_seconds` has the
# kernel's 10 ms resolution: 60,000 messages are about 0.4 s of server CPU,
# so a run of 200,000 (MESSAGES=20000) measures to about 1 %.
# STORE_FLAGS adds flags to every persisting server (e.g.
# "--retain-messages 10000000": no retention during the run).
# MODES names the modes to run (default "no-persist never everysec always"),
# e.g. MODES=always to look at one.
set -u
cd "$(dirname "$0")/../.."
cargo build --release --bins >/dev/null
new=./target/release/loopchat
old=${OLD:-}
base=${BASE:-}
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null' EXIT
port=18500
messages=${MESSAGES:-6000}
[ "$messages" -ge 1 ] && [ "$messages" -le 100000 ] || { echo "MESSAGES must be 1..100000" >&2; exit 2; }
for run in $(seq ${ROUNDS:-3}); do
  for mode in ${MODES:-no-persist never everysec always}; do
    for store in new base old; do
      if [ $store = old ]; then
        [ -n "$old" ] || continue
        [ $mode = no-persist ] && continue
        bin=$old
      elif [ $store = base ]; then
        [ -n "$base" ] || continue
        [ $mode = no-persist ] && continue
        bin=$base
      else
        bin=$new
      fi
      port=$((port+1))
      dir=$(mktemp -d /tmp/lcbench.XXXX)
      if [ $mode = no-persist ]; then flags="--no-persist"; else flags="--data-dir $dir --fsync $mode ${STORE_FLAGS:-}"; fi
      taskset -c 0 $bin $flags --listen 127.0.0.1:$port --log-level warn --rate-per-s 100000 --rate-burst 100000 2>/dev/null &
      pid=$!
      for i in $(seq 50); do ss -ltn | grep -q ":$port " && break; sleep 0.1; done
      timeout 120 taskset -c 1 ./target/release/loopchat-load fanout --url ws://127.0.0.1:$port/ws --receivers 10 --senders 10 --messages $messages --msg-rate 0 --window 16 --json --quiet > target/fsync-fan.json 2>/dev/null
      curl -s --max-time 5 127.0.0.1:$port/stats > target/fsync-stats.json
      python3 benches/compare/fsync_summary.py "$run" "$mode" "$store"
      kill $pid; wait $pid 2>/dev/null; pid=
      rm -rf $dir
    done
  done
done
