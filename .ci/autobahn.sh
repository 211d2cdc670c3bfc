#!/usr/bin/env bash
# Autobahn TestSuite conformance run against loopchat's echo endpoint.
#
# What it does (see docs/conformance.md):
#   1. a venv at target/autobahn-venv with kosoku (the Python-3/Rust runner of
#      the Autobahn case files) at a pinned version; reused when it matches;
#   2. cargo build --release --bin loopchat;
#   3. starts `loopchat --echo` on 127.0.0.1:0 with limits raised so that the
#      rate limiter, heartbeats and the slow-consumer rule stay out of the way,
#      and waits (with a deadline) for its "listening on ws://..." line;
#   4. runs the fuzzing client for the cases named in
#      .ci/autobahn/fuzzingclient.json against ws://127.0.0.1:PORT/echo;
#   5. .ci/autobahn/check.py reads target/autobahn/report/index.json, prints a
#      table per case group and every failing case, and ends with
#      "N passed, M failed"; the script exits non-zero unless every case is
#      OK, NON-STRICT or INFORMATIONAL (behavior and closing behavior).
#
# Run from anywhere: `bash .ci/autobahn.sh`. Idempotent; traffic stays on
# 127.0.0.1. Knobs (environment):
#   AUTOBAHN_SERVER_BIN      use this server binary instead of building
#                            loopchat (for testing the harness itself; it must
#                            accept the same flags and print the same line)
#   AUTOBAHN_START_TIMEOUT_S deadline for the listening line (default 60)
#   AUTOBAHN_RUN_TIMEOUT_S   deadline for the whole fuzzing run (default 900)
#   AUTOBAHN_CASES           space-separated case patterns replacing the
#                            spec's "cases" for a quick local run, e.g.
#                            AUTOBAHN_CASES='7.* 9.1.*' (exclusions still apply)
#   AUTOBAHN_PARALLELISM     kosoku -p, cases run at once (default 1: the
#                            timing cases of group 9 are meaningful only alone)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# kosoku 0.1.0: the first release; its case files are autobahn-testsuite's.
# Bump deliberately: a new runner version can change verdicts.
KOSOKU_VERSION=0.1.0
VENV=target/autobahn-venv
OUT=target/autobahn
SPEC=.ci/autobahn/fuzzingclient.json
CHECK=.ci/autobahn/check.py
START_TIMEOUT_S=${AUTOBAHN_START_TIMEOUT_S:-60}
RUN_TIMEOUT_S=${AUTOBAHN_RUN_TIMEOUT_S:-900}
PARALLELISM=${AUTOBAHN_PARALLELISM:-1}

# The server's flags. Each raised limit has its reason:
#   --max-message-bytes 16 MiB: group 9 echoes messages of up to 16 MiB
#     (9.1.6/9.2.6 are exactly 16 * 2**20 bytes), the default is 64 KiB;
#   --max-outbox-bytes 64 MiB: a 16 MiB echo must not be dropped as a slow
#     consumer while the fuzzer is still sending;
#   --rate-per-s/--rate-burst 100000: 9.7.x/9.8.x send 1000 messages
#     back to back; /echo bypasses the dispatcher and its rate limiter
#     today, and these values keep the run independent of that choice;
#   --heartbeat-ms 600000: the fuzzer answers pings, but a ping the case
#     did not expect would show up in its received events;
#   --no-persist: /echo stores nothing, and CI should leave no data dir.
SERVER_FLAGS=(
  --listen 127.0.0.1:0
  --echo
  --no-persist
  --max-message-bytes 16777216
  --max-outbox-bytes 67108864
  --rate-per-s 100000 --rate-burst 100000
  --heartbeat-ms 600000
)

log() { printf 'autobahn: %s\n' "$*"; }
script_start=$(date +%s)

mkdir -p "$OUT"
rm -rf "$OUT/report" "$OUT/server.log" "$OUT/kosoku.log" "$OUT/summary.txt"

# --- 1. kosoku in a venv -----------------------------------------------------
venv_version() {
  "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kosoku"))' 2>/dev/null || true
}
if [[ -x "$VENV/bin/kosoku" && "$(venv_version)" == "$KOSOKU_VERSION" ]]; then
  log "kosoku $KOSOKU_VERSION already in $VENV"
else
  log "creating $VENV with kosoku==$KOSOKU_VERSION"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q "kosoku==$KOSOKU_VERSION"
  [[ "$(venv_version)" == "$KOSOKU_VERSION" ]] || { log "kosoku install failed"; exit 1; }
fi
PY="$VENV/bin/python"

# --- 2. the server binary ----------------------------------------------------
if [[ -n "${AUTOBAHN_SERVER_BIN:-}" ]]; then
  SERVER_BIN=$AUTOBAHN_SERVER_BIN
  log "using AUTOBAHN_SERVER_BIN=$SERVER_BIN (no cargo build)"
else
  log "cargo build --release --bin loopchat"
  cargo build --release --bin loopchat
  SERVER_BIN="${CARGO_TARGET_DIR:-target}/release/loopchat"
fi
[[ -x "$SERVER_BIN" ]] || { log "no server binary at $SERVER_BIN"; exit 1; }

# --- 3. start it, stop it on every exit path ----------------------------------
SERVER_PID=
stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      log "server did not exit within 5 s of SIGTERM; killing it"
      kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting $SERVER_BIN ${SERVER_FLAGS[*]}"
"$SERVER_BIN" "${SERVER_FLAGS[@]}" </dev/null >"$OUT/server.log" 2>&1 &
SERVER_PID=$!

PORT=
deadline=$(( $(date +%s) + START_TIMEOUT_S ))
while [[ -z "$PORT" ]]; do
  PORT=$(sed -n 's#.*listening on ws://127\.0\.0\.1:\([0-9][0-9]*\)/ws.*#\1#p' "$OUT/server.log" | head -n 1)
  [[ -n "$PORT" ]] && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "server exited before listening; its log:"
    tail -n 30 "$OUT/server.log" || true
    exit 1
  fi
  if (( $(date +%s) >= deadline )); then
    log "no 'listening on ws://127.0.0.1:PORT/ws' line within ${START_TIMEOUT_S}s; server log:"
    tail -n 30 "$OUT/server.log" || true
    exit 1
  fi
  sleep 0.1
done
log "server pid $SERVER_PID listening on 127.0.0.1:$PORT"

# --- 4. the fuzzing client ----------------------------------------------------
CASES=${AUTOBAHN_CASES:-}
args_text=$("$PY" "$CHECK" args --spec "$SPEC" --cases "$CASES" --port "$PORT" --outdir "$OUT/report")
mapfile -t KOSOKU_ARGS <<<"$args_text"
log "kosoku -p $PARALLELISM ${KOSOKU_ARGS[*]}"
run_start=$(date +%s)
set +e
timeout --kill-after=10 "$RUN_TIMEOUT_S" "$VENV/bin/kosoku" -p "$PARALLELISM" "${KOSOKU_ARGS[@]}" \
  </dev/null >"$OUT/kosoku.log" 2>&1
kosoku_rc=$?
set -e
run_s=$(( $(date +%s) - run_start ))
# kosoku exits 1 when a case failed; the checker below is the judge. Its own
# last lines say how many cases it wrote, or why it crashed.
tail -n 2 "$OUT/kosoku.log" | sed 's/^/kosoku: /'

problems=()
if (( kosoku_rc == 124 || kosoku_rc == 137 )); then
  problems+=(--problem "kosoku did not finish within ${RUN_TIMEOUT_S}s (AUTOBAHN_RUN_TIMEOUT_S)")
elif (( kosoku_rc != 0 && kosoku_rc != 1 )); then
  problems+=(--problem "kosoku exited with status $kosoku_rc (see $OUT/kosoku.log)")
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  set +e; wait "$SERVER_PID"; server_rc=$?; set -e
  SERVER_PID=
  problems+=(--problem "the server died during the run (exit status $server_rc); see $OUT/server.log")
  tail -n 30 "$OUT/server.log" | sed 's/^/server: /'
fi
stop_server

log "fuzzing run took ${run_s}s, whole script $(( $(date +%s) - script_start ))s; report: $OUT/report/index.html"

# --- 5. the verdict (its last line is "N passed, M failed") -------------------
"$PY" "$CHECK" check --spec "$SPEC" --cases "$CASES" "${problems[@]}" "$OUT/report" | tee "$OUT/summary.txt"
