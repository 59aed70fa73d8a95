#!/usr/bin/env bash
# Build the fuzz targets (fuzz/, libFuzzer through the libfuzzer-sys crate) and run each for
# SECONDS (default 60) over its committed seed corpus:
#   qcow2_open      the qcow2 open and metadata paths on a hostile image
#   blk_request     vdisk's virtio-blk request parsing of hostile descriptor chains
#   vswitch_frames  vswitch's ring walker, frame parse, VLAN rules, copy and FDB
#   vswitch_offload vswitch's checks of offload requests, checksum and TCP segmentation
#
#   scripts/fuzz.sh [SECONDS] [extra libFuzzer flags...]
#   FUZZ_TARGETS="blk_request" scripts/fuzz.sh 30     # some of them
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
# New inputs go to a scratch corpus (fuzz/scratch/TARGET), never into the committed
# fuzz/corpus/TARGET; crashing inputs go to fuzz/artifacts/TARGET. Exits non-zero on a
# crash, leak-free OOM (-rss_limit_mb / -malloc_limit_mb) or timeout in any target.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_TO_RUN="${1:-60}"
shift || true
TARGETS="${FUZZ_TARGETS:-qcow2_open blk_request vswitch_frames vswitch_offload}"
FUZZ="$ROOT/fuzz"

command -v cargo >/dev/null || { echo "fuzz.sh: cargo not found" >&2; exit 1; }
command -v c++ >/dev/null || command -v g++ >/dev/null ||
    { echo "fuzz.sh: a C++ compiler is needed to build libFuzzer (apt-get install g++)" >&2; exit 1; }
for t in $TARGETS; do
    [ -d "$FUZZ/corpus/$t" ] || { echo "fuzz.sh: no seed corpus at $FUZZ/corpus/$t" >&2; exit 1; }
done

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

echo "== fuzz: building $TARGETS ($HOST, $(rustc --version)) =="
build_start=$(date +%s)
BINS=()
for t in $TARGETS; do BINS+=(--bin "$t"); done
cargo build --release --locked --manifest-path "$FUZZ/Cargo.toml" --target "$HOST" "${BINS[@]}"
echo "fuzz: build took $(($(date +%s) - build_start)) s"

LOG="$(mktemp -d)"
# The images qcow2_open writes (sparse files that may be large): on tmpfs when there is one.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export VDISK_FUZZ_DIR="$(mktemp -d -p /dev/shm vdisk-fuzz.XXXXXX)"
else
    export VDISK_FUZZ_DIR="$(mktemp -d)"
fi
trap 'rm -rf "$LOG" "$VDISK_FUZZ_DIR"' EXIT

failed=0
for TARGET in $TARGETS; do
    BIN="$CARGO_TARGET_DIR/$HOST/release/$TARGET"
    SEEDS="$FUZZ/corpus/$TARGET"
    SCRATCH="$FUZZ/scratch/$TARGET"
    ARTIFACTS="$FUZZ/artifacts/$TARGET"
    mkdir -p "$SCRATCH" "$ARTIFACTS"
    echo "== fuzz: running $TARGET for ${SECONDS_TO_RUN}s (seeds: $(find "$SEEDS" -type f | wc -l), scratch: $SCRATCH) =="
    # Corpus dirs: the first one receives new inputs. -timeout: one input running longer
    # than 10 s is a hang. -rss_limit_mb/-malloc_limit_mb: hostile input must not make us
    # allocate gigabytes whatever it claims.
    FLAGS=(
        -max_total_time="$SECONDS_TO_RUN"
        -timeout=10
        -rss_limit_mb=2048
        -malloc_limit_mb=1024
        -max_len=1048576
        -artifact_prefix="$ARTIFACTS/"
        -print_final_stats=1
    )
    [ -f "$FUZZ/$TARGET.dict" ] && FLAGS+=(-dict="$FUZZ/$TARGET.dict")
    [ "$TARGET" = qcow2_open ] && [ -f "$FUZZ/qcow2.dict" ] && FLAGS+=(-dict="$FUZZ/qcow2.dict")
    status=0
    (cd "$LOG" && "$BIN" "${FLAGS[@]}" "$@" "$SCRATCH" "$SEEDS") 2>"$LOG/out" || status=$?
    # The progress lines (#N ...) and the dictionary statistics ("..." # Uses: N) are many.
    grep -v -e '^#' -e '^INFO: ' -e '^"' -e '^	NEW_FUNC' "$LOG/out" | tail -n 60 || true
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG/out" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$LOG/out" | tail -n 1 || true)
    echo "== fuzz: $TARGET: last status: ${last:-none}"
    echo "fuzz: $TARGET: executions: ${execs:-unknown}; corpus: $(find "$SCRATCH" -type f | wc -l) new inputs in $SCRATCH, $(find "$SEEDS" -type f | wc -l) seeds"
    if [ "$status" -ne 0 ]; then
        echo "fuzz: $TARGET FAILED (libFuzzer exit $status); crashing inputs in $ARTIFACTS:" >&2
        ls -l "$ARTIFACTS" >&2 || true
        tail -n 80 "$LOG/out" >&2
        failed=1
    fi
done
[ "$failed" -eq 0 ] || exit 1
echo "fuzz: ok"
