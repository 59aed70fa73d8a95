//! vswitch: a vhost-user-net L2 switch for tenant VMs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vswitch::{config, serve};

#[derive(Parser)]
#[command(
    version,
    about = "vhost-user-net L2 switch: VLANs, MAC learning, one copy per frame"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the ports of a switch configuration.
    Serve {
        /// TOML file: a [switch] table and one [[port]] per guest NIC.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    common::logging::init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve { config } => config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| serve::run(cfg).map_err(|e| e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vswitch: {e}");
            ExitCode::FAILURE
        }
    }
}
