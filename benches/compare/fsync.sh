#!/usr/bin/env bash
# Message throughput per durability mode (--no-persist, --fsync never,
# everysec, always), end to end: the same loopchat-load fan-out against a
# fresh server and data dir each time, server on core 0, tool on core 1.
# Bounded: 12 runs of 30,000 messages, each capped at 120 s. Loopback only.
set -u
cd "$(dirname "$0")/../.."
cargo build --release --bins >/dev/null
trap 'pkill -f "loopchat .*--listen 127.0.0.1:185" 2>/dev/null' EXIT
port=18500
for run in 1 2 3; do
  for mode in no-persist never everysec always; do
    port=$((port+1))
    dir=$(mktemp -d /tmp/lcbench.XXXX)
    if [ $mode = no-persist ]; then flags="--no-persist"; else flags="--data-dir $dir --fsync $mode"; fi
    taskset -c 0 ./target/release/loopchat $flags --listen 127.0.0.1:$port --log-level warn --rate-per-s 100000 --rate-burst 100000 2>/dev/null &
    pid=$!
    for i in $(seq 50); do ss -ltn | grep -q ":$port " && break; sleep 0.1; done
    timeout 120 taskset -c 1 ./target/release/loopchat-load fanout --url ws://127.0.0.1:$port/ws --receivers 10 --senders 10 --messages 3000 --msg-rate 0 --window 16 --json --quiet > target/fsync-fan.json 2>/dev/null
    curl -s --max-time 5 127.0.0.1:$port/stats > target/fsync-stats.json
    python3 benches/compare/fsync_summary.py "$run" "$mode"
    kill $pid; wait $pid 2>/dev/null; rm -rf $dir
  done
done
