//! vdisk: a vhost-user-blk daemon serving disk images to QEMU and other VMMs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backend;
mod config;
mod device;
mod engine;
mod image;
mod queue;
mod request;
mod serve;
mod stats;

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
}

fn main() -> ExitCode {
    common::logging::init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => config::ServeConfig::try_from(args)
            .map_err(|e| e.to_string())
            .and_then(|cfg| serve::run(cfg).map_err(|e| e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vdisk: {e}");
            ExitCode::FAILURE
        }
    }
}
