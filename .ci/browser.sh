#!/usr/bin/env bash
# Real-browser test of the chat page: Debian's Chromium driven by
# playwright-core (tests/browser/chat.test.mjs) against the release server.
#
# Run from the repo root: bash .ci/browser.sh
# Idempotent; needs root only the first time (to apt-get install chromium).
# Screenshots land in target/browser-screenshots/.
set -euo pipefail

cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  echo "browser.sh: installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y chromium
fi
/usr/bin/chromium --version 2>/dev/null || true

# playwright-core only: it never downloads a browser.
(
  cd tests/browser
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund
  else
    npm install --no-audit --no-fund
  fi
)

cargo build --release --bin loopchat

mkdir -p target/browser-screenshots
cd tests/browser
# node's test runner prints its summary (tests/pass/fail) at the end.
node --test --test-concurrency=1 chat.test.mjs
