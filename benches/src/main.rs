//! Benchmark runner for the workspace's daemons against their peers.
//!
//! `cargo run --release -p benches -- blk [--quick] [--direct] [--out docs/bench]` measures
//! vdisk against qemu-storage-daemon (both driven by libblkio over vhost-user) and against fio
//! on the same image file, and writes a markdown table and a PNG chart.
//!
//! `cargo run --release -p benches -- qcow2 [--quick] [--out docs/bench]` measures vdisk against
//! qemu-storage-daemon on the same qcow2 image (allocated, empty, with a fresh snapshot), with
//! vdisk on the raw image as the reference, and writes docs/bench/qcow2.md and qcow2.png.
//!
//! `cargo run --release -p benches -- dedupe [--quick] [--out docs/bench]` measures vdisk's
//! inline dedupe on and off, and qemu-storage-daemon, on 4 KiB random writes of unique,
//! duplicate and mixed data, and the index memory per TiB; writes docs/bench/dedupe.md and
//! dedupe.png.
//!
//! `cargo run --release -p benches -- net [--quick] [--out docs/bench]` measures vswitch against
//! Open vSwitch with DPDK and DPDK's vhost PMD in a PVP-style loopback driven by dpdk-testpmd
//! (64- and 1518-byte frames), and writes docs/bench/net.md and net.png.
//!
//! `cargo run --release -p benches -- tcp [--quick] [--out docs/bench]` streams TCP between
//! two QEMU guests through vswitch and OVS-DPDK, offloads on and off, and writes
//! docs/bench/tcp.md and tcp.png.

mod blk;
mod chart;
mod net;
mod signals;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Benchmarks: vdisk vs qemu-storage-daemon vs fio (raw and qcow2); vswitch vs OVS-DPDK vs DPDK vhost PMD",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// vhost-user-blk: vdisk and qemu-storage-daemon through libblkio, fio as the ceiling.
    Blk(blk::Args),
    /// qcow2 over vhost-user-blk: vdisk and qemu-storage-daemon on the same image, vdisk raw
    /// as the reference.
    Qcow2(blk::qcow2::Args),
    /// Inline dedupe: vdisk with dedupe on and off, and qsd, on unique, duplicate and mixed
    /// writes; the index memory per TiB.
    Dedupe(blk::dedupe::Args),
    /// vhost-user-net: vswitch, OVS-DPDK and DPDK's vhost PMD in a testpmd PVP loopback.
    Net(net::Args),
    /// TCP between two QEMU guests through vswitch and OVS-DPDK, offloads on and off.
    Tcp(net::tcp::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    signals::install();
    let result = match cli.cmd {
        Cmd::Blk(args) => blk::run(&args),
        Cmd::Qcow2(args) => blk::qcow2::run(&args),
        Cmd::Dedupe(args) => blk::dedupe::run(&args),
        Cmd::Net(args) => net::run(&args),
        Cmd::Tcp(args) => net::tcp::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
