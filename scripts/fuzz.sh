#!/usr/bin/env bash
# Build the qcow2 fuzz target (fuzz/, libFuzzer through the libfuzzer-sys crate) and run it
# for SECONDS (default 60) over the committed seed corpus.
#
#   scripts/fuzz.sh [SECONDS] [extra libFuzzer flags...]
#
# Works on stable Rust: no cargo-fuzz CLI and no nightly. It does what `cargo fuzz build
# --sanitizer none` does: a release build with SanitizerCoverage instrumentation
# (-Cpasses=sancov-module and the -sanitizer-coverage-* LLVM flags, all stable rustc
# options), debug assertions and overflow checks on, `--cfg fuzzing`, for the host target
# given explicitly so that build scripts and proc macros are not instrumented. libFuzzer
# itself is compiled from C++ by the libfuzzer-sys crate (needs g++). There is no
# AddressSanitizer (that needs nightly's -Zsanitizer); the code under test is safe Rust, so
# an out-of-bounds access is a panic, which libFuzzer reports as a crash.
#
# New inputs go to a scratch corpus ($FUZZ_SCRATCH, default fuzz/scratch/qcow2_open), never
# into the committed fuzz/corpus/qcow2_open; crashing inputs go to fuzz/artifacts/. Exits
# non-zero on a crash, leak-free OOM (-rss_limit_mb / -malloc_limit_mb) or timeout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_TO_RUN="${1:-60}"
shift || true
TARGET=qcow2_open
FUZZ="$ROOT/fuzz"
SEEDS="$FUZZ/corpus/$TARGET"
SCRATCH="${FUZZ_SCRATCH:-$FUZZ/scratch/$TARGET}"
ARTIFACTS="$FUZZ/artifacts/$TARGET"

command -v cargo >/dev/null || { echo "fuzz.sh: cargo not found" >&2; exit 1; }
command -v c++ >/dev/null || command -v g++ >/dev/null ||
    { echo "fuzz.sh: a C++ compiler is needed to build libFuzzer (apt-get install g++)" >&2; exit 1; }
[ -d "$SEEDS" ] || { echo "fuzz.sh: no seed corpus at $SEEDS" >&2; exit 1; }

HOST="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="${RUSTFLAGS:-} --cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cforce-frame-pointers=yes"
# A target dir of its own: the instrumented build must not share artifacts with the
# workspace's.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$FUZZ/target}"

echo "== fuzz: building $TARGET ($HOST, $(rustc --version)) =="
build_start=$(date +%s)
cargo build --release --locked --manifest-path "$FUZZ/Cargo.toml" --target "$HOST" --bin "$TARGET"
echo "fuzz: build took $(($(date +%s) - build_start)) s"
BIN="$CARGO_TARGET_DIR/$HOST/release/$TARGET"

mkdir -p "$SCRATCH" "$ARTIFACTS"
LOG="$(mktemp -d)"
# The images the target writes (sparse files that may be large): on tmpfs when there is one.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export VDISK_FUZZ_DIR="$(mktemp -d -p /dev/shm vdisk-fuzz.XXXXXX)"
else
    export VDISK_FUZZ_DIR="$(mktemp -d)"
fi
trap 'rm -rf "$LOG" "$VDISK_FUZZ_DIR"' EXIT

echo "== fuzz: running $TARGET for ${SECONDS_TO_RUN}s (seeds: $(find "$SEEDS" -type f | wc -l), scratch: $SCRATCH) =="
# Corpus dirs: the first one receives new inputs. -timeout: one input running longer
# than 10 s is a hang. -rss_limit_mb/-malloc_limit_mb: an image must not make us allocate
# gigabytes whatever its header claims.
FLAGS=(
    -max_total_time="$SECONDS_TO_RUN"
    -timeout=10
    -rss_limit_mb=2048
    -malloc_limit_mb=1024
    -max_len=1048576
    -dict="$FUZZ/qcow2.dict"
    -artifact_prefix="$ARTIFACTS/"
    -print_final_stats=1
)
status=0
(cd "$LOG" && "$BIN" "${FLAGS[@]}" "$@" "$SCRATCH" "$SEEDS") 2>"$LOG/out" || status=$?
# The progress lines (#N ...) and the dictionary statistics ("..." # Uses: N) are many.
grep -v -e '^#' -e '^INFO: ' -e '^"' -e '^	NEW_FUNC' "$LOG/out" | tail -n 60 || true
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG/out" | tail -n 1)
last=$(grep -E '^#[0-9]+' "$LOG/out" | tail -n 1 || true)
echo "== fuzz: last status: ${last:-none}"
echo "fuzz: executions: ${execs:-unknown}; corpus: $(find "$SCRATCH" -type f | wc -l) new inputs in $SCRATCH, $(find "$SEEDS" -type f | wc -l) seeds"
if [ "$status" -ne 0 ]; then
    echo "fuzz: FAILED (libFuzzer exit $status); crashing inputs in $ARTIFACTS:" >&2
    ls -l "$ARTIFACTS" >&2 || true
    tail -n 80 "$LOG/out" >&2
    exit "$status"
fi
echo "fuzz: ok"
