#!/usr/bin/env bash
# The crash campaign of `make test` (tests/tests/crash.rs), run longer: kill -9 vdisk
# CYCLES times at random moments while a libblkio client writes and flushes, and check
# after every restart that no flushed write was lost and no block is torn.
#   scripts/crash-soak.sh [CYCLES] [TEST_FILTER]
# CRASH_SEED=N replays a run (each run prints its seed).
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-1000}"
filter="${2:-}"
cargo build --workspace --bins
CRASH_CYCLES="$cycles" cargo nextest run -p e2e --test crash --no-capture ${filter:+"$filter"}
