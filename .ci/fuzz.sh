#!/usr/bin/env bash
# Live fuzzing: every target of fuzz/ for FUZZ_SECONDS (default 30) each,
# starting from its committed corpus. Needs a nightly toolchain (libFuzzer
# and the sanitizers are nightly-only); without one this says so and exits
# 0, because `cargo test` has already replayed every corpus on stable
# (tests/fuzz_replay.rs). A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/; docs/testing.md says what to do with it.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${FUZZ_SECONDS:-30}"
echo "== fuzz (${secs} s per target)"

skip() {
  echo "fuzz: $1, skipped live fuzzing (corpus replay ran in cargo test)"
  exit 0
}

command -v cargo >/dev/null || skip "no cargo"
cargo +nightly --version >/dev/null 2>&1 || skip "no nightly toolchain"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo +nightly install cargo-fuzz --locked || skip "cargo-fuzz could not be installed"
fi

# New inputs go to a scratch copy, so a CI run never edits the committed
# corpus; `cargo fuzz cmin` is how the corpus grows (docs/testing.md).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The machine may be shared: fuzzing takes only idle CPU.
nice=()
command -v nice >/dev/null && nice=(nice -n 19)

"${nice[@]}" cargo +nightly fuzz build
for target in $(cargo +nightly fuzz list); do
  echo "-- $target"
  mkdir -p "$work/$target"
  set +e
  "${nice[@]}" cargo +nightly fuzz run "$target" "$work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
    >"$work/$target.log" 2>&1
  status=$?
  set -e
  grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::average_exec_per_sec)' \
    "$work/$target.log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$work/$target.log" >&2
    echo "fuzz: $target failed (exit $status); the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
echo "fuzz: every target ran ${secs} s without a crash"
