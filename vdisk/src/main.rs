//! vdisk: a vhost-user-blk daemon serving disk images to QEMU and other VMMs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vdisk::ctl::Request;
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
    /// Ask a serving vdisk about its image and counters, or snapshot its image online.
    Ctl {
        /// The daemon's control socket (`vdisk serve --control-socket`, by default the
        /// vhost-user socket's path with `.ctl` appended).
        #[arg(long)]
        socket: PathBuf,
        /// Print the raw JSON reply.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: CtlCmd,
    },
}

#[derive(Subcommand)]
enum CtlCmd {
    /// The image: format, virtual size, allocated size.
    Info,
    /// Requests, bytes and errors by reason; allocations for qcow2.
    Stats,
    /// Snapshots of the served qcow2 image.
    #[command(subcommand)]
    Snapshot(CtlSnapshot),
}

#[derive(Subcommand)]
enum CtlSnapshot {
    /// Take a snapshot now, consistent with every write completed before it.
    Create {
        name: String,
    },
    List,
}

fn ctl(socket: &Path, json: bool, what: CtlCmd) -> Result<ExitCode, String> {
    let req = match what {
        CtlCmd::Info => Request::Info,
        CtlCmd::Stats => Request::Stats,
        CtlCmd::Snapshot(CtlSnapshot::Create { name }) => Request::SnapshotCreate { name },
        CtlCmd::Snapshot(CtlSnapshot::List) => Request::SnapshotList,
    };
    let reply = common::control::request(socket, &req)?;
    if json {
        println!("{reply}");
    } else {
        print!("{}", vdisk::ctl::render(&req, &reply));
    }
    Ok(ExitCode::SUCCESS)
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
        Cmd::Ctl { socket, json, what } => ctl(&socket, json, what),
    };
    common::logging::exit_status("vdisk", result)
}
