//! vswitch: a vhost-user-net L2 switch for tenant VMs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vswitch::ctl::Request;
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
    /// Ask a running switch about its ports, FDB and counters, or change a port's QoS.
    Ctl {
        /// The switch's control socket [default: the one in --config, else /run/vswitch/ctl.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Read the control socket path from this switch configuration.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the raw JSON reply.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: CtlCmd,
    },
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Ports, their VLANs, MACs, QoS settings and whether a guest is connected.
    Ports,
    /// Learned MAC addresses.
    Fdb,
    /// Per-port counters, drops by reason.
    Stats,
    /// The forwarding threads: their cores and queues, busy/idle/asleep time and batch
    /// sizes (as `ovs-appctl dpif-netdev/pmd-rxq-show` and `pmd-stats-show`).
    Pmd,
    /// Change a port's QoS at runtime: `set-qos vm1 tx_rate_bps=100M storm_pps=1000` (0 removes a limit).
    SetQos {
        port: String,
        #[arg(required = true)]
        settings: Vec<String>,
    },
}

fn ctl(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    json: bool,
    what: CtlCmd,
) -> Result<(), String> {
    let socket = match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => {
            config::load(&c)
                .map_err(|e| e.to_string())?
                .switch
                .control_socket
        }
        (None, None) => PathBuf::from(config::DEFAULT_CONTROL_SOCKET),
    };
    let req = match what {
        CtlCmd::Ports => Request::Ports,
        CtlCmd::Fdb => Request::Fdb,
        CtlCmd::Stats => Request::Stats,
        CtlCmd::Pmd => Request::Pmd,
        CtlCmd::SetQos { port, settings } => {
            let mut kv = Vec::new();
            for s in settings {
                let (k, v) = s
                    .split_once('=')
                    .ok_or_else(|| format!("{s}: expected key=value"))?;
                kv.push((k.to_string(), v.to_string()));
            }
            Request::SetQos { port, settings: kv }
        }
    };
    let reply = common::control::request(&socket, &req)?;
    if json {
        println!("{reply}");
    } else {
        print!("{}", vswitch::ctl::render(&req, &reply));
    }
    Ok(())
}

fn main() -> ExitCode {
    common::logging::init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve { config } => config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| serve::run(cfg).map_err(|e| e.to_string())),
        Cmd::Ctl {
            socket,
            config,
            json,
            what,
        } => ctl(socket, config, json, what),
    };
    common::logging::exit_status("vswitch", result.map(|()| ExitCode::SUCCESS))
}
