#!/usr/bin/env bash
# Runs every codec fuzz target for SECONDS each (default 60) with cargo-fuzz (libFuzzer).
# Works on the stable toolchain: RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags, and the
# codecs forbid `unsafe`, so no sanitizer is needed to find panics.
#   cargo install cargo-fuzz --locked   # once
#   scripts/fuzz.sh 60
set -euo pipefail
cd "$(dirname "$0")/../codecs/fuzz"
secs="${1:-60}"
for t in cjt188 milesight dragino wmbus layout; do
  echo "== $t (${secs}s)"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none -O "$t" -- -max_total_time="$secs" 2>&1 | grep -E "DONE|crash|panicked" || true
done
