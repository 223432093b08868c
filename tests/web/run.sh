#!/usr/bin/env bash
# run.sh — runs the web client's end-to-end tests (tests/web/*.test.js) in headless
# Chromium. Needs Debian's chromium (apt-get install -y chromium), node >= 20 and a built
# Pigeon binary ($PIGEON_BIN, default ../../target/release/pigeon relative to this dir).
set -euo pipefail
cd "$(dirname "$0")"

CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM_PATH" ]; then
  echo "################################################################" >&2
  echo "## ERROR: Chromium not found at $CHROMIUM_PATH" >&2
  echo "## The web client tests need it: apt-get update && apt-get install -y chromium" >&2
  echo "## (optional, for emoji in screenshots: fonts-noto-color-emoji)" >&2
  echo "################################################################" >&2
  exit 1
fi
export CHROMIUM_PATH

export PIGEON_BIN="${PIGEON_BIN:-../../target/release/pigeon}"
if [ ! -x "$PIGEON_BIN" ]; then
  echo "ERROR: Pigeon binary not found at $PIGEON_BIN (build it, or set PIGEON_BIN)" >&2
  exit 1
fi

if [ ! -d node_modules/playwright-core ]; then
  npm ci --no-audit --no-fund
fi

mkdir -p test-results
exec node --test --test-concurrency=1 --test-reporter=spec --test-reporter-destination=stdout *.test.js
