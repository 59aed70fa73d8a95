# Entry points for developers and CI. `make test` is the README's (and .ci/run's) test command.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all setup build test fuzz demo bench guest

all: build

## Install system packages (apt, as root) and build the QEMU test guest. Idempotent.
setup:
	scripts/setup.sh

## Only (re)build the QEMU test guest in target/guest (FORCE=1 to rebuild).
guest:
	scripts/build-guest.sh

## Build the daemons the end-to-end tests run (target/debug/vdisk, target/debug/vswitch).
build:
	$(CARGO) build --workspace --bins

## Everything: setup, build, then the whole test suite (nextest if present).
test: setup build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace --no-fail-fast"; \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		echo "cargo-nextest not found; falling back to cargo test"; \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## Build and run the fuzz targets (qcow2_open, blk_request, vswitch_frames, vswitch_offload) for FUZZ_SECONDS
## each (default 60) on stable Rust (scripts/fuzz.sh; docs/qcow2.md, "Fuzzing";
## docs/security.md). CI runs them before `make test`.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

## Boot a guest on a vdisk-served disk and show what happened (configs/vdisk-demo.toml).
demo:
	scripts/demo.sh

## Benchmarks against peers (the benches crate): docs/bench/blk.{md,png}, blk-direct.{md,png},
## qcow2.{md,png}, dedupe.{md,png}, net.{md,png}, tcp.{md,png}. scripts/setup-bench.sh adds what only the benchmarks need
## (OVS-DPDK, DPDK).
bench: setup
	scripts/setup-bench.sh
	$(CARGO) build --release -p vdisk -p vswitch -p benches
	$(CARGO) run --release -p benches -- blk
	$(CARGO) run --release -p benches -- blk --direct
	$(CARGO) run --release -p benches -- qcow2
	$(CARGO) run --release -p benches -- dedupe
	$(CARGO) run --release -p benches -- net
	$(CARGO) run --release -p benches -- tcp
