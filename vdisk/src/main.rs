//! vdisk: a vhost-user-blk daemon serving disk images to QEMU and other VMMs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vdisk::{cli, config, serve};

#[derive(Parser)]
#[command(version, about = "vhost-user-blk daemon: serves disk images to VMs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve an image as a vhost-user-blk device on a unix socket.
    Serve(config::ServeArgs),
    /// Create, inspect and check qcow2 images (offline).
    #[command(subcommand)]
    Image(cli::image::ImageCmd),
    /// Internal snapshots of a qcow2 image (offline).
    #[command(subcommand)]
    Snapshot(cli::image::SnapshotCmd),
}

fn main() -> ExitCode {
    common::logging::init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => config::ServeConfig::try_from(args)
            .map_err(|e| e.to_string())
            .and_then(|cfg| serve::run(cfg).map_err(|e| e.to_string()))
            .map(|()| ExitCode::SUCCESS),
        Cmd::Image(cmd) => cli::image::run_image(cmd),
        Cmd::Snapshot(cmd) => cli::image::run_snapshot(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vdisk: {e}");
            ExitCode::FAILURE
        }
    }
}
