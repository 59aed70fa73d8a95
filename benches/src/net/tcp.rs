//! `benches tcp`: TCP between two QEMU guests through a switch, with the checksum and
//! segmentation offloads on and off, for vswitch and for Open vSwitch with DPDK, in the
//! same run.
//!
//! The guests are the test guest (`scripts/build-guest.sh`: Debian's kernel, busybox, and
//! `tcpblast` from tests/guest-tools) under TCG, each with one virtio-net-pci NIC on a
//! vhost-user port of the switch, both access ports of VLAN 10. One streams `--mib` MiB to
//! the other; the receiver times the stream from its first byte to its last. vswitch's
//! offloads are its per-port `offloads` setting; OVS's are `userspace-tso-enable`, which
//! makes its vhost-user ports keep TSO and checksum offload (without it, OVS turns them off
//! for the guest). OVS 3.1 does that on `dpdkvhostuserclient` ports only (on
//! `dpdkvhostuser` ones it turns host TSO off and drops the guests' checksum-offloaded
//! frames), so its ports here are client ports: QEMU listens, OVS connects. What each
//! guest's NIC negotiated is read from sysfs and reported.
//!
//! The guests' vCPUs (TCG: one host thread each) and the switch share the machine's two
//! cores: each switch's forwarding thread is pinned to core 1 (OVS `pmd-cpu-mask`, vswitch
//! `pmd_cores`), where OVS's polls all the time and vswitch's while frames flow. The rates
//! are what guests get on such a machine, not what the switches can forward (`benches
//! net` is that); they vary by a quarter from run to run, hence several runs, interleaved.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::guest::{self, Guest, GuestImage, GuestOutput};

use super::ovs::{self, Ovs, OvsLayout};
use crate::blk::daemon::{self, DaemonProc};
use crate::{chart, signals};

const VLAN: u16 = 10;
const PORT: u16 = 5001;
const MACS: [&str; 2] = ["02:00:00:00:10:01", "02:00:00:00:10:02"];
const IPS: [&str; 2] = ["10.0.10.1", "10.0.10.2"];
/// The core of the switch's forwarding thread (OVS's PMD, vswitch's `pmd_cores`).
const SWITCH_CPU: usize = 1;
/// OVS's DPDK memory (MiB).
const OVS_MEM_MB: u32 = 256;

#[derive(clap::Args)]
pub struct Args {
    /// One run per case instead of 5, and 64 MiB per stream.
    #[arg(long)]
    quick: bool,
    /// Directory for tcp.md and tcp.png.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Switches to measure, comma-separated: vswitch, ovs.
    #[arg(long, value_delimiter = ',', default_value = "vswitch,ovs")]
    targets: Vec<String>,
    /// MiB per stream [default: 256, or 64 with --quick].
    #[arg(long)]
    mib: Option<u32>,
    /// Runs per case [default: 5, or 1 with --quick]; the table shows the median.
    #[arg(long)]
    runs: Option<usize>,
    /// The vswitch binary [default: `vswitch` next to this runner].
    #[arg(long)]
    vswitch: Option<PathBuf>,
    /// Keep the temp dir (configs, logs) and print its path.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Vswitch,
    Ovs,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Vswitch => "vswitch",
            Target::Ovs => "ovs",
        }
    }
}

/// One stream's result.
struct Sample {
    mbit: f64,
    /// What the receiver's NIC negotiated (CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4).
    features: String,
}

enum Switch {
    Vswitch(DaemonProc),
    Ovs(Box<Ovs>),
}

impl Switch {
    fn start(
        t: Target,
        offloads: bool,
        vswitch: Option<&Path>,
        dir: &Path,
    ) -> Result<(Switch, [PathBuf; 2]), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        match t {
            Target::Vswitch => {
                let bin = vswitch.ok_or("no vswitch binary")?;
                let sockets = [dir.join("vm1.sock"), dir.join("vm2.sock")];
                // Its forwarding thread on the core OVS's PMD gets.
                let mut toml = format!(
                    "[switch]\ncontrol_socket = \"{}\"\npmd_cores = [{SWITCH_CPU}]\n",
                    dir.join("ctl.sock").display()
                );
                for (i, s) in sockets.iter().enumerate() {
                    let _ = write!(
                        toml,
                        "\n[[port]]\nname = \"vm{}\"\nsocket = \"{}\"\nvlan = {VLAN}\n\
                         offloads = {offloads}\n",
                        i + 1,
                        s.display()
                    );
                }
                let config = dir.join("vswitch.toml");
                std::fs::write(&config, toml)
                    .map_err(|e| format!("write {}: {e}", config.display()))?;
                let mut c = Command::new(bin);
                c.arg("serve").arg("--config").arg(&config);
                let log = dir.join("vswitch.log");
                let proc = DaemonProc::spawn("vswitch", c, &sockets[1], &log)?;
                Ok((Switch::Vswitch(proc), sockets))
            }
            Target::Ovs => {
                let layout = OvsLayout {
                    main_cpu: 0,
                    pmd_cpu: SWITCH_CPU,
                    socket_mem_mb: OVS_MEM_MB,
                    file_prefix: format!("tcp-bench-ovs-{}", std::process::id()),
                    tso: offloads,
                };
                // Client ports: QEMU listens, OVS connects.
                let o = Ovs::start(&dir.join("ovs"), &layout, &[], VLAN)?;
                let sockets = [dir.join("vm1.sock"), dir.join("vm2.sock")];
                for (i, s) in sockets.iter().enumerate() {
                    o.add_vhost_client(&format!("vm{}", i + 1), s, VLAN)?;
                }
                Ok((Switch::Ovs(Box::new(o)), sockets))
            }
        }
    }

    fn stop(self) {
        match self {
            Switch::Vswitch(p) => {
                let _ = p.stop();
            }
            Switch::Ovs(o) => {
                o.stop();
            }
        }
    }
}

/// Boot the two guests on `sockets` (QEMU listening on them if `listen`), stream, and
/// return the receiver's rate.
fn stream(sockets: &[PathBuf; 2], listen: bool, mib: u32) -> Result<Sample, String> {
    let nic = move |g: Guest, socket: &Path, mac: &str| {
        if listen {
            g.net_server(socket, mac)
        } else {
            g.net(socket, mac)
        }
    };
    let rx_socket = sockets[1].clone();
    let receiver = std::thread::spawn(move || -> Result<GuestOutput, String> {
        nic(
            Guest::new(guest::tcp_receiver_script(IPS[1], PORT)),
            &rx_socket,
            MACS[1],
        )
        .timeout(Duration::from_secs(180))
        .try_run()
    });
    let tx = nic(
        Guest::new(guest::tcp_sender_script(IPS[0], IPS[1], PORT, mib)),
        &sockets[0],
        MACS[0],
    )
    .timeout(Duration::from_secs(180))
    .try_run();
    let rx = receiver
        .join()
        .map_err(|_| "the receiving guest's thread panicked".to_string())?
        .map_err(|e| format!("receiver: {e}"))?;
    let tx = tx.map_err(|e| format!("sender: {e}"))?;
    tx.ok().map_err(|e| format!("sender: {e}"))?;
    rx.ok().map_err(|e| format!("receiver: {e}"))?;
    let bytes: u64 = rx
        .result("bytes")
        .and_then(|b| b.parse().ok())
        .ok_or_else(|| format!("the receiver reported no byte count; {}", rx.describe()))?;
    if bytes != u64::from(mib) << 20 {
        return Err(format!(
            "the receiver got {bytes} bytes of {} MiB; {}",
            mib,
            rx.describe()
        ));
    }
    let seconds: f64 = rx
        .result("seconds")
        .and_then(|s| s.parse().ok())
        .filter(|&s: &f64| s > 0.0)
        .ok_or_else(|| format!("the receiver reported no time; {}", rx.describe()))?;
    Ok(Sample {
        mbit: bytes as f64 * 8.0 / seconds / 1e6,
        features: rx.result("features").unwrap_or("?").to_string(),
    })
}

pub fn run(args: &Args) -> Result<(), String> {
    let mut targets = Vec::new();
    for t in &args.targets {
        targets.push(match t.as_str() {
            "vswitch" => Target::Vswitch,
            "ovs" => Target::Ovs,
            other => {
                return Err(format!(
                    "--targets: unknown switch {other:?} (vswitch, ovs)"
                ))
            }
        });
    }
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 5 });
    let mib = args.mib.unwrap_or(if args.quick { 64 } else { 256 });
    if runs == 0 || mib == 0 {
        return Err("--runs and --mib must be at least 1".to_string());
    }
    if !daemon::on_path(guest::QEMU) || GuestImage::locate().is_none() {
        return Err(format!(
            "needs {} and the test guest in {} (scripts/setup.sh builds it)",
            guest::QEMU,
            guest::guest_dir().display()
        ));
    }
    let vswitch = if targets.contains(&Target::Vswitch) {
        Some(super::vswitch_binary(
            args.vswitch.as_deref(),
            "--targets ovs",
        )?)
    } else {
        None
    };
    if targets.contains(&Target::Ovs) {
        ovs::available()?;
    }
    let tmp = tempfile::Builder::new()
        .prefix("tcp-bench-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;

    // (target, offloads) -> samples; runs interleave the cases, so a slow spell of the
    // machine hits them all alike.
    let cases: Vec<(Target, bool)> = targets
        .iter()
        .flat_map(|&t| [(t, true), (t, false)])
        .collect();
    let mut samples: Vec<Vec<Sample>> = cases.iter().map(|_| Vec::new()).collect();
    for r in 0..runs {
        for (k, &(t, offloads)) in cases.iter().enumerate() {
            signals::check()?;
            let dir = tmp.path().join(format!("{}-{offloads}-{r}", t.name()));
            let (sw, sockets) = Switch::start(t, offloads, vswitch.as_deref(), &dir)?;
            let got = stream(&sockets, t == Target::Ovs, mib);
            sw.stop();
            let s = match got {
                Ok(s) => s,
                Err(e) => {
                    if args.keep {
                        eprintln!("kept {}", tmp.keep().display());
                    }
                    return Err(format!("{} offloads={offloads}: {e}", t.name()));
                }
            };
            eprintln!(
                "{:8} offloads {:3}  run {}: {:7.0} Mbit/s (receiver negotiated {})",
                t.name(),
                if offloads { "on" } else { "off" },
                r + 1,
                s.mbit,
                s.features
            );
            samples[k].push(s);
        }
    }

    let rate = |t: Target, offloads: bool| -> Option<f64> {
        let k = cases.iter().position(|&c| c == (t, offloads))?;
        super::median(&samples[k].iter().map(|s| s.mbit).collect::<Vec<_>>())
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Guest-to-guest TCP: vswitch and OVS-DPDK, offloads on and off\n\n\
         Generated by `cargo run --release -p benches -- tcp{}` (median of {runs} run(s) of \
         {mib} MiB per case, cases interleaved). Two QEMU {} guests (TCG, one vCPU each) \
         on two access ports; `tcpblast` streams from one to the other, timed at the \
         receiver from the first byte to the last. The guests and the switch share the \
         machine's {} cores (both switches' forwarding threads are pinned to core {SWITCH_CPU}). `features` is what the \
         receiver's NIC negotiated: CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4.\n",
        if args.quick { " --quick" } else { "" },
        qemu_version(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    md.push_str("| switch | offloads | Mbit/s (median) | runs | features |\n");
    md.push_str("|---|---|---:|---|---|\n");
    for (k, &(t, offloads)) in cases.iter().enumerate() {
        let all: Vec<String> = samples[k]
            .iter()
            .map(|s| format!("{:.0}", s.mbit))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            t.name(),
            if offloads { "on" } else { "off" },
            rate(t, offloads).map_or("–".into(), |v| format!("{v:.0}")),
            all.join(", "),
            samples[k].first().map_or("?", |s| s.features.as_str())
        );
    }
    md.push('\n');
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_string(),
    };
    for &t in &targets {
        let _ = writeln!(
            md,
            "- {} with offloads / without: **{}**",
            t.name(),
            ratio(rate(t, true), rate(t, false))
        );
    }
    if targets.len() == 2 {
        for offloads in [true, false] {
            let _ = writeln!(
                md,
                "- vswitch / OVS-DPDK, offloads {}: **{}**",
                if offloads { "on" } else { "off" },
                ratio(rate(Target::Vswitch, offloads), rate(Target::Ovs, offloads))
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("create {}: {e}", args.out.display()))?;
    let md_path = args.out.join("tcp.md");
    std::fs::write(&md_path, &md).map_err(|e| format!("write {}: {e}", md_path.display()))?;
    let png = args.out.join("tcp.png");
    let colors = [(31, 119, 180), (255, 127, 14)];
    let panel = chart::Panel {
        title: "guest-to-guest TCP, Mbit/s (median)".to_string(),
        series: targets
            .iter()
            .enumerate()
            .map(|(i, &t)| chart::Series {
                name: t.name().to_string(),
                color: colors[i % colors.len()],
                values: vec![rate(t, true), rate(t, false)],
            })
            .collect(),
    };
    chart::draw(
        &png,
        &["offloads on".to_string(), "offloads off".to_string()],
        &[panel],
    )?;
    print!("{md}");
    eprintln!("wrote {} and {}", md_path.display(), png.display());
    Ok(())
}

fn qemu_version() -> String {
    Command::new(guest::QEMU)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.replace("QEMU emulator version ", ""))
        })
        .unwrap_or_else(|| "?".to_string())
}
