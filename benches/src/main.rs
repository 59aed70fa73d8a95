//! Benchmark runner for the workspace's daemons against their peers.
//!
//! `cargo run --release -p benches -- blk [--quick] [--direct] [--out docs/bench]` measures
//! vdisk against qemu-storage-daemon (both driven by libblkio over vhost-user) and against fio
//! on the same image file, and writes a markdown table and a PNG chart.

mod blk;
mod chart;
mod signals;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmarks: vdisk vs qemu-storage-daemon vs fio", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// vhost-user-blk: vdisk and qemu-storage-daemon through libblkio, fio as the ceiling.
    Blk(blk::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    signals::install();
    let result = match cli.cmd {
        Cmd::Blk(args) => blk::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
