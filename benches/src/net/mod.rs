//! `benches net`: PVP-style loopback (no VM) through three vhost-user switches, in the same run.
//!
//! A generator `dpdk-testpmd` has two `net_virtio_user` ports, one on each of the switch's two
//! vhost-user sockets, and forwards in `mac` mode with crossed `--eth-peer`s: whatever arrives
//! on port 0 leaves on port 1 addressed to port 0's MAC, and the other way round, so the
//! frames it injects once (`start tx_first`) circulate through the switch for ever. The switch
//! is, in turn:
//! - vswitch: two access ports on VLAN 10 (MAC learning with a per-port MAC limit, QoS rate limits and storm control configured above the offered load, so charged per frame but never binding);
//! - ovs: Open vSwitch with DPDK, a netdev bridge with two `dpdkvhostuser` ports `tag=10`,
//!   default `actions=NORMAL` flow;
//! - vhost-pmd: a second testpmd with two `net_vhost` ports in `io` forwarding (no lookup at
//!   all: DPDK's own vhost-user backend, the floor of what forwarding can cost).
//!
//! The generator forwards on one core and the switch gets the other (OVS's PMD, the vhost
//! testpmd's forwarding lcore, vswitch's threads by affinity). What is reported per run: the
//! generator's per-port receive rate over the measured window (its RX-packets counters), the
//! switch's CPU time from /proc (utime+stime, all threads) per packet, its busy share
//! (OVS `dpif-netdev/pmd-stats-show`, testpmd `--record-core-cycles`), the generator's busy
//! share, and the CPU that other processes took meanwhile, from which the report says what
//! limited the run.

mod ovs;
pub mod tcp;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ovs::{Ovs, OvsLayout};
use testkit::testpmd::{self, PortStats, Testpmd};

use crate::blk::daemon::{self, cpu_time, DaemonProc};
use crate::{chart, signals};

/// The generator's two ports.
const GEN_MAC: [&str; 2] = ["02:00:00:00:00:10", "02:00:00:00:00:11"];
/// The access VLAN of both switch ports (vswitch and OVS).
const VLAN: u16 = 10;
/// vswitch's QoS in the benchmark: 400 Gbit/s each way and 1 M flooded frames/s.
const QOS: &str = "qos = { tx_rate_bps = 400_000_000_000, rx_rate_bps = 400_000_000_000, \
                   storm_pps = 1_000_000 }";
/// Mbufs per testpmd: rings, bursts in flight and caches, with room to spare.
const MBUFS: u32 = 16384;
/// Hugepage memory per testpmd (MiB).
const TESTPMD_MEM_MB: u32 = 128;
/// OVS's DPDK memory (MiB); also its limit, so its shared mempool shrinks to fit.
const OVS_MEM_MB: u32 = 256;
/// Tries per point when the loop does not start (each with a fresh switch and generator).
const ATTEMPTS: usize = 3;
/// A side at least this busy is taken as the bottleneck.
const SATURATED: f64 = 0.85;
/// A vswitch log larger than this means it is stuck logging in a loop.
const LOG_FLOOD: u64 = 64 << 20;

#[derive(clap::Args)]
pub struct Args {
    /// 1 s warm-up and 3 s measured per point instead of 2 s and 6 s, and one run instead of 3.
    #[arg(long)]
    quick: bool,
    /// Directory for net.md and net.png.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Switches to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "vswitch,ovs,vhost-pmd")]
    targets: Vec<Target>,
    /// Frame sizes in bytes (testpmd --txpkts: Ethernet header to end of payload, no FCS).
    #[arg(long, value_delimiter = ',', default_value = "64,1518")]
    sizes: Vec<usize>,
    /// Frames in flight in each direction of the loop, comma-separated: the generator
    /// injects them once per port, in bursts of up to 32 (testpmd `--burst`, also how many
    /// it takes per poll) with `start tx_first N`; above 32, a multiple of 32.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128,256")]
    in_flight: Vec<usize>,
    /// The vswitch binary [default: `vswitch` next to this runner, i.e. target/release/vswitch].
    #[arg(long)]
    vswitch: Option<PathBuf>,
    /// Core the generator forwards on.
    #[arg(long, default_value_t = 0)]
    gen_cpu: usize,
    /// Core the switch forwards on (OVS PMD, vhost testpmd lcore, vswitch affinity).
    #[arg(long, default_value_t = 1)]
    switch_cpu: usize,
    /// Let vswitch's threads run on any core instead of pinning them to --switch-cpu.
    #[arg(long)]
    vswitch_unpinned: bool,
    /// Seconds per measured window (overrides --quick's and the default).
    #[arg(long)]
    seconds: Option<f64>,
    /// Measure the whole matrix this many times (round robin) and report each point's median
    /// run by total Mpps [default: 3, 1 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// Keep the temp dir (configs, sockets dir, logs of every process) and print its path.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Vswitch,
    Ovs,
    VhostPmd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Vswitch => "vswitch",
            Target::Ovs => "ovs",
            Target::VhostPmd => "vhost-pmd",
        }
    }

    fn color(self) -> (u8, u8, u8) {
        match self {
            Target::Vswitch => (31, 119, 180),
            Target::Ovs => (255, 127, 14),
            Target::VhostPmd => (140, 140, 140),
        }
    }
}

/// What one target achieved at one frame size.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    pub port_mpps: Vec<f64>,
    pub total_mpps: f64,
    pub gbps: f64,
    /// The switch process's CPU time over the window, in cores (1.0 = one core all the time).
    pub switch_cores: f64,
    /// The switch process's CPU time per forwarded packet (polling included).
    pub cpu_ns_per_pkt: f64,
    /// Time the switch spent on packets per packet: OVS processing cycles, the vhost
    /// testpmd's busy cycles, vswitch's CPU time (it does not poll).
    pub busy_ns_per_pkt: Option<f64>,
    /// Share of the switch core spent on packets.
    pub switch_busy: Option<f64>,
    /// Share of the generator's forwarding core spent on packets.
    pub gen_busy: Option<f64>,
    /// CPU that processes other than the generator and the switch used meanwhile (cores).
    pub others_cores: f64,
    /// OVS only: processing cycles per packet, as pmd-stats-show prints it.
    pub ovs_cycles_per_pkt: Option<f64>,
    /// Total Mpps of each one-second sample.
    pub per_sec_mpps: Vec<f64>,
    /// The generator's counters once it stopped forwarding (None if they could not be read).
    pub settled: Option<Settled>,
    pub limit: String,
    pub notes: Vec<String>,
}

/// The generator's counters after `stop`, when they no longer move.
#[derive(Clone, Copy, Debug)]
pub struct Settled {
    /// TX-packets - RX-packets over both ports since the generator started.
    pub sent_minus_received: i64,
    /// Frames received in the window that the generator could not send on.
    pub gen_tx_dropped: Option<u64>,
}

/// One workload: a frame size and how many frames circulate per direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    size: usize,
    in_flight: usize,
}

impl Point {
    /// testpmd's burst size and the bursts `start tx_first` injects.
    fn bursts(self) -> (usize, usize) {
        let burst = self.in_flight.min(32);
        (burst, self.in_flight / burst)
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} B x{}", self.size, self.in_flight)
    }
}

struct Row {
    run: usize,
    target: Target,
    point: Point,
    result: Result<Measurement, String>,
}

struct Meta {
    quick: bool,
    runs: usize,
    /// --runs as given (the report repeats the command line).
    runs_arg: Option<usize>,
    warmup: Duration,
    window: Duration,
    gen_cpu: usize,
    switch_cpu: usize,
    vswitch_pinned: bool,
    kernel: String,
    cpu: String,
    versions: Vec<(String, String)>,
    exits: Vec<String>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let (warmup, mut window) = if args.quick {
        (Duration::from_secs(1), Duration::from_secs(3))
    } else {
        (Duration::from_secs(2), Duration::from_secs(6))
    };
    if let Some(s) = args.seconds {
        window = Duration::try_from_secs_f64(s).map_err(|e| format!("--seconds {s}: {e}"))?;
    }
    if window < Duration::from_secs(1) {
        return Err("the measured window must be at least 1 s".to_string());
    }
    let targets: Vec<Target> = [Target::Vswitch, Target::Ovs, Target::VhostPmd]
        .into_iter()
        .filter(|t| args.targets.contains(t))
        .collect();
    if targets.is_empty() || args.sizes.is_empty() {
        return Err("--targets and --sizes must not be empty".to_string());
    }
    for &s in &args.sizes {
        if !(60..=2000).contains(&s) {
            return Err(format!("frame size {s}: must be 60..=2000 bytes"));
        }
    }
    if args.gen_cpu == args.switch_cpu {
        return Err("--gen-cpu and --switch-cpu must differ".to_string());
    }
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 });
    if runs == 0 {
        return Err("--runs must be at least 1".to_string());
    }
    for &n in &args.in_flight {
        if n == 0 || (n > 32 && n % 32 != 0) || n > 32 * 32 {
            return Err(format!(
                "--in-flight {n}: must be 1..=32 or a multiple of 32 up to 1024"
            ));
        }
    }
    if args.in_flight.is_empty() {
        return Err("--in-flight must not be empty".to_string());
    }
    let points: Vec<Point> = args
        .sizes
        .iter()
        .flat_map(|&size| {
            args.in_flight
                .iter()
                .map(move |&in_flight| Point { size, in_flight })
        })
        .collect();
    let vswitch = preflight(args, &targets)?;

    let tmp = tempfile::Builder::new()
        .prefix("net-bench-")
        .tempdir()
        .map_err(|e| format!("create a temp dir: {e}"))?;
    let dir = tmp.path().to_path_buf();

    let mut meta = Meta {
        quick: args.quick,
        runs,
        runs_arg: args.runs,
        warmup,
        window,
        gen_cpu: args.gen_cpu,
        switch_cpu: args.switch_cpu,
        vswitch_pinned: !args.vswitch_unpinned,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu: crate::blk::cpu_model(),
        versions: Vec::new(),
        exits: Vec::new(),
    };
    meta.versions.push((
        "generator".to_string(),
        format!("dpdk-testpmd {}", dpdk_version()),
    ));
    for &t in &targets {
        let v = match t {
            Target::Vswitch => {
                let p = vswitch.as_deref().unwrap_or(Path::new("vswitch"));
                format!("{} ({})", daemon::version(p), p.display())
            }
            Target::Ovs => {
                let out = Command::new(ovs::VSWITCHD_DPDK)
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let v: Vec<&str> = out.lines().take(2).collect();
                v.join(", ")
            }
            Target::VhostPmd => format!("dpdk-testpmd {} (net_vhost, io)", dpdk_version()),
        };
        meta.versions.push((t.name().to_string(), v));
    }

    let mut rows = Vec::new();
    for run in 1..=runs {
        for &t in &targets {
            for &pt in &points {
                signals::check()?;
                if runs > 1 {
                    eprint!("run {run}: ");
                }
                eprint!("{:<9} {:>12}  ", t.name(), pt.to_string());
                let result = point(
                    t,
                    pt,
                    args,
                    vswitch.as_deref(),
                    &dir.join(format!("run{run}")),
                    warmup,
                    window,
                    &mut meta.exits,
                );
                match &result {
                    Ok(m) => eprintln!(
                    "{:>6.3} Mpps total ({}) {:>6.2} Gbit/s  switch {:>4.0}% CPU {:>6.1} ns/pkt, \
                     busy {}  -> {}",
                    m.total_mpps,
                    m.port_mpps
                        .iter()
                        .map(|p| format!("{p:.3}"))
                        .collect::<Vec<_>>()
                        .join(" + "),
                    m.gbps,
                    m.switch_cores * 100.0,
                    m.cpu_ns_per_pkt,
                    m.busy_ns_per_pkt
                        .map(|b| format!("{b:.1} ns/pkt"))
                        .unwrap_or_else(|| "?".to_string()),
                    m.limit
                ),
                    Err(e) => eprintln!("FAILED: {e}"),
                }
                rows.push(Row {
                    run,
                    target: t,
                    point: pt,
                    result,
                });
                signals::check()?;
            }
        }
    }
    if args.keep {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    }

    let md = markdown(&meta, &targets, &points, &rows);
    println!("{md}");
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("create {}: {e}", args.out.display()))?;
    let md_path = args.out.join("net.md");
    std::fs::write(&md_path, &md).map_err(|e| format!("write {}: {e}", md_path.display()))?;
    let png_path = args.out.join("net.png");
    draw(&png_path, &targets, &points, &rows)?;
    eprintln!("wrote {} and {}", md_path.display(), png_path.display());

    let failures = rows.iter().filter(|r| r.result.is_err()).count();
    if failures > 0 {
        return Err(format!("{failures} measurements failed (see the report)"));
    }
    Ok(())
}

/// Check the tools and the hugepages before spending a minute; returns the vswitch binary.
fn preflight(args: &Args, targets: &[Target]) -> Result<Option<PathBuf>, String> {
    if !daemon::on_path(testpmd::TESTPMD) {
        return Err("dpdk-testpmd not found on PATH: `apt-get install -y dpdk-dev`".to_string());
    }
    if !daemon::on_path("stdbuf") {
        return Err("stdbuf not found on PATH (Debian package coreutils)".to_string());
    }
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if args.gen_cpu.max(args.switch_cpu) >= ncpu {
        return Err(format!(
            "--gen-cpu {} / --switch-cpu {}: this machine has {ncpu} CPUs",
            args.gen_cpu, args.switch_cpu
        ));
    }
    let mut vswitch = None;
    if targets.contains(&Target::Vswitch) {
        vswitch = Some(vswitch_binary(
            args.vswitch.as_deref(),
            "--targets ovs,vhost-pmd",
        )?);
    }
    if targets.contains(&Target::Ovs) {
        ovs::available()?;
    }
    let need = TESTPMD_MEM_MB
        + if targets.contains(&Target::Ovs) {
            OVS_MEM_MB
        } else {
            TESTPMD_MEM_MB
        };
    let free = hugepages_free_mb();
    if free < u64::from(need) {
        return Err(format!(
            "{free} MiB of hugepages free, {need} MiB needed: reserve some with \
             `echo 1024 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages` \
             (scripts/setup-bench.sh does)"
        ));
    }
    Ok(vswitch)
}

/// The vswitch binary to measure: `given`, else `vswitch` next to this runner (the
/// release build). `leave_out` is the option that measures without it.
fn vswitch_binary(given: Option<&Path>, leave_out: &str) -> Result<PathBuf, String> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("current_exe: {e}"))?
            .with_file_name("vswitch"),
    };
    if !path.is_file() {
        return Err(format!(
            "vswitch binary not found at {}: build it with `cargo build --release -p vswitch` \
             (or pass --vswitch PATH, or leave it out with {leave_out})",
            path.display()
        ));
    }
    if !path.to_string_lossy().contains("/release/") {
        eprintln!(
            "warning: {} does not look like a release build",
            path.display()
        );
    }
    Ok(path)
}

fn hugepages_free_mb() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field("HugePages_Free:") * field("Hugepagesize:") / 1024
}

/// The switch under test, one at a time (the polling ones spin even when idle).
enum Switch {
    Vswitch {
        proc: DaemonProc,
        ctl: PathBuf,
        sockets: [PathBuf; 2],
        log: PathBuf,
    },
    Ovs(Box<Ovs>),
    VhostPmd {
        pmd: Box<Testpmd>,
        sockets: [PathBuf; 2],
    },
}

/// What the switch says about itself over a window.
#[derive(Default)]
struct SwitchSample {
    busy: Option<f64>,
    busy_ns_per_pkt: Option<f64>,
    ovs_cycles_per_pkt: Option<f64>,
    notes: Vec<String>,
}

fn lcores(a: usize, b: usize) -> String {
    format!("{},{}", a.min(b), a.max(b))
}

impl Switch {
    fn start(t: Target, args: &Args, vswitch: Option<&Path>, dir: &Path) -> Result<Switch, String> {
        match t {
            Target::Vswitch => {
                let bin = vswitch.ok_or("no vswitch binary")?;
                let sockets = [dir.join("p0.sock"), dir.join("p1.sock")];
                let ctl = dir.join("ctl.sock");
                let config = dir.join("vswitch.toml");
                let mut toml = format!(
                    "# Two access ports on VLAN {VLAN}, MAC learning with a per-port limit, and\n\
                     # QoS on: TX and RX rate limits and storm control, set above what the\n\
                     # loop reaches so that they are charged for every frame but never bind.\n\
                     [switch]\ncontrol_socket = \"{}\"\n",
                    ctl.display()
                );
                let mtu = vswitch_mtu(&args.sizes);
                for (i, s) in sockets.iter().enumerate() {
                    let _ = write!(
                        toml,
                        "\n[[port]]\nname = \"p{i}\"\nsocket = \"{}\"\nvlan = {VLAN}\n\
                         mtu = {mtu}\nmac_limit = 64\n{QOS}\n",
                        s.display()
                    );
                }
                std::fs::write(&config, toml)
                    .map_err(|e| format!("write {}: {e}", config.display()))?;
                let mut c = Command::new(bin);
                c.arg("serve").arg("--config").arg(&config);
                if std::env::var_os("RUST_LOG").is_none() {
                    c.env("RUST_LOG", "info");
                }
                if !args.vswitch_unpinned {
                    pin(&mut c, args.switch_cpu);
                }
                let log = dir.join("vswitch.log");
                let proc = DaemonProc::spawn("vswitch", c, &sockets[0], &log)?;
                let mut sw = Switch::Vswitch {
                    proc,
                    ctl: ctl.clone(),
                    sockets: sockets.clone(),
                    log,
                };
                wait_paths(&mut sw, &[&sockets[1], &ctl])?;
                Ok(sw)
            }
            Target::Ovs => {
                let layout = OvsLayout {
                    main_cpu: args.gen_cpu,
                    pmd_cpu: args.switch_cpu,
                    socket_mem_mb: OVS_MEM_MB,
                    file_prefix: format!("net-bench-ovs-{}", std::process::id()),
                    tso: false,
                };
                let o = Ovs::start(&dir.join("ovs"), &layout, &["vhu0", "vhu1"], VLAN)?;
                Ok(Switch::Ovs(Box::new(o)))
            }
            Target::VhostPmd => {
                let sockets = [dir.join("vhost0.sock"), dir.join("vhost1.sock")];
                let mut a: Vec<String> = vec![
                    "-l".into(),
                    lcores(args.gen_cpu, args.switch_cpu),
                    "--main-lcore".into(),
                    args.gen_cpu.to_string(),
                    "--no-pci".into(),
                    "--in-memory".into(),
                    format!("--file-prefix=net-bench-vhost-{}", std::process::id()),
                    format!("--socket-mem={TESTPMD_MEM_MB}"),
                ];
                for (i, s) in sockets.iter().enumerate() {
                    a.push("--vdev".into());
                    a.push(format!("net_vhost{i},iface={},queues=1", s.display()));
                }
                a.extend(
                    [
                        "--",
                        "--forward-mode=io",
                        "--auto-start",
                        "--nb-cores=1",
                        "--record-core-cycles",
                    ]
                    .map(String::from),
                );
                a.push(format!("--total-num-mbufs={MBUFS}"));
                let log = dir.join("vhost-pmd.log");
                let pmd = Testpmd::spawn("vhost-pmd", &a, Some(&log), &mut interrupted)?;
                let mut sw = Switch::VhostPmd {
                    pmd: Box::new(pmd),
                    sockets: sockets.clone(),
                };
                wait_paths(&mut sw, &[&sockets[0], &sockets[1]])?;
                Ok(sw)
            }
        }
    }

    fn sockets(&self) -> [PathBuf; 2] {
        match self {
            Switch::Vswitch { sockets, .. } | Switch::VhostPmd { sockets, .. } => sockets.clone(),
            Switch::Ovs(o) => [o.socket("vhu0"), o.socket("vhu1")],
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Switch::Vswitch { proc, .. } => Some(proc.pid()),
            Switch::Ovs(o) => o.vswitchd_pid(),
            Switch::VhostPmd { pmd, .. } => Some(pmd.pid()),
        }
    }

    fn exited(&mut self) -> Option<String> {
        match self {
            Switch::Vswitch { proc, log, .. } => {
                if let Some(why) = proc.exited() {
                    return Some(why);
                }
                // A worker stuck in a loop that logs an error per iteration fills the disk at
                // gigabytes a minute: treat that as a failure, and stop the switch in time.
                let len = std::fs::metadata(&*log).map(|m| m.len()).unwrap_or(0);
                (len > LOG_FLOOD).then(|| {
                    format!(
                        "vswitch is flooding its log ({} MiB so far), stopped; its last lines:\n{}",
                        len >> 20,
                        file_tail(log, 6)
                    )
                })
            }
            Switch::Ovs(o) => o.exited(),
            Switch::VhostPmd { pmd, .. } => {
                let pid = pmd.pid();
                // SAFETY: kill with signal 0 only checks that the process exists.
                let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
                    && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|s| s.contains(") Z"))
                        .unwrap_or(true);
                (!alive).then(|| format!("vhost-pmd testpmd ended; log:\n{}", pmd.tail(15)))
            }
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Switch::Vswitch { log, .. } => file_tail(log, 20),
            Switch::Ovs(o) => o.log_tail(),
            Switch::VhostPmd { pmd, .. } => pmd.tail(15),
        }
    }

    /// Reset the switch's own counters at the start of the window.
    fn window_start(&mut self) -> Result<(), String> {
        match self {
            Switch::Vswitch { .. } => Ok(()),
            Switch::Ovs(o) => o.pmd_stats_clear(),
            Switch::VhostPmd { pmd, .. } => pmd.cmd("clear fwd stats all").map(|_| ()),
        }
    }

    /// The switch's view of the window: busy share and cycles, drops.
    fn window_end(
        &mut self,
        wall: Duration,
        cpu: Duration,
        packets: u64,
        mhz: Option<u64>,
    ) -> Result<SwitchSample, String> {
        let mut s = SwitchSample::default();
        match self {
            Switch::Vswitch { ctl, .. } => {
                // No polling: all its CPU time is work.
                s.busy = Some(cpu.as_secs_f64() / wall.as_secs_f64());
                if packets > 0 {
                    s.busy_ns_per_pkt = Some(cpu.as_nanos() as f64 / packets as f64);
                }
                match vswitch_drops(ctl) {
                    Ok(d) if d.is_empty() => {}
                    Ok(d) => s
                        .notes
                        .push(format!("vswitch drop counters: {}", d.join(", "))),
                    Err(e) => s.notes.push(format!("vswitch stats: {e}")),
                }
            }
            Switch::Ovs(o) => {
                let (st, _) = o.pmd_stats()?;
                s.busy = st.busy_fraction();
                s.ovs_cycles_per_pkt = st.processing_cycles_per_packet();
                if let (Some(c), Some(mhz)) = (s.ovs_cycles_per_pkt, mhz) {
                    s.busy_ns_per_pkt = Some(c * 1000.0 / mhz as f64);
                }
                let d = o.drops(&["vhu0", "vhu1"]);
                if !d.is_empty() {
                    s.notes
                        .push(format!("OVS interface counters: {}", d.join(", ")));
                }
            }
            Switch::VhostPmd { pmd, .. } => {
                if let Some(f) = pmd.fwd_cycles()? {
                    if f.packets > 0 && f.mhz > 0 {
                        s.busy_ns_per_pkt =
                            Some(f.busy_cycles as f64 / f.packets as f64 * 1000.0 / f.mhz as f64);
                        s.busy =
                            Some(f.busy_cycles as f64 / (wall.as_secs_f64() * f.mhz as f64 * 1e6));
                    }
                }
            }
        }
        Ok(s)
    }

    fn stop(self) -> Vec<String> {
        match self {
            Switch::Vswitch { proc, .. } => vec![match proc.stop() {
                Ok(s) if s.success() => "vswitch exited 0 on SIGTERM".to_string(),
                Ok(s) => format!("vswitch exited with {s} on SIGTERM"),
                Err(e) => format!("vswitch: {e}"),
            }],
            Switch::Ovs(o) => o.stop(),
            Switch::VhostPmd { mut pmd, .. } => vec![match pmd.quit() {
                Ok(s) if s.success() => "vhost-pmd testpmd quit with status 0".to_string(),
                Ok(s) => format!("vhost-pmd testpmd quit with {s}"),
                Err(e) => e,
            }],
        }
    }
}

/// vswitch drops untagged frames longer than MTU + 14 (no FCS in virtio buffers), so a
/// 1518-byte test frame needs an MTU of 1504; OVS and the vhost PMD do not check.
fn vswitch_mtu(sizes: &[usize]) -> usize {
    sizes
        .iter()
        .map(|s| s.saturating_sub(14))
        .max()
        .unwrap_or(0)
        .max(1500)
}

/// The last `lines` lines of a file that may be huge (reads at most its last 64 KiB).
fn file_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Wait (up to 20 s) for `paths` to appear while the switch runs.
fn wait_paths(sw: &mut Switch, paths: &[&Path]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in paths {
        while !p.exists() {
            signals::check()?;
            if let Some(why) = sw.exited() {
                return Err(why);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not appear within 20 s; log:\n{}",
                    p.display(),
                    sw.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Run `cmd` on core `cpu` only (all its threads inherit the mask).
fn pin(cmd: &mut Command, cpu: usize) {
    // SAFETY: the closure runs between fork and exec and only calls sched_setaffinity on a
    // cpu_set_t on its own stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Non-zero `drop_*` counters of every port, from vswitch's control socket.
fn vswitch_drops(ctl: &Path) -> Result<Vec<String>, String> {
    let mut s = UnixStream::connect(ctl).map_err(|e| format!("connect {}: {e}", ctl.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"{\"cmd\":\"stats\"}\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("reply: {e}"))?;
    let mut out = Vec::new();
    for p in v["stats"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("?");
        for (k, n) in p["counters"].as_object().into_iter().flatten() {
            let n = n.as_u64().unwrap_or(0);
            if (k.starts_with("drop_") || k == "fdb_full") && n > 0 {
                out.push(format!("{name} {k}={n}"));
            }
        }
    }
    Ok(out)
}

/// Busy jiffies of all CPUs (user, nice, system, irq, softirq, steal) from /proc/stat.
fn machine_busy() -> Duration {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return Duration::ZERO;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is included in user).
    let busy: u64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(busy * 1_000_000_000 / hz)
}

fn gen_args(sockets: &[PathBuf; 2], pt: Point, args: &Args) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-l".into(),
        lcores(args.gen_cpu, args.switch_cpu),
        // The main lcore only reads commands; it sits on the switch's core and sleeps.
        "--main-lcore".into(),
        args.switch_cpu.to_string(),
        "--no-pci".into(),
        "--in-memory".into(),
        "--single-file-segments".into(),
        format!("--file-prefix=net-bench-gen-{}", std::process::id()),
        format!("--socket-mem={TESTPMD_MEM_MB}"),
    ];
    for (i, s) in sockets.iter().enumerate() {
        a.push("--vdev".into());
        a.push(format!(
            "net_virtio_user{i},path={},queues=1,mac={}",
            s.display(),
            GEN_MAC[i]
        ));
    }
    a.extend(
        [
            "--",
            "--forward-mode=mac",
            "--nb-cores=1",
            "--record-core-cycles",
        ]
        .map(String::from),
    );
    a.push(format!("--eth-peer=0,{}", GEN_MAC[1]));
    a.push(format!("--eth-peer=1,{}", GEN_MAC[0]));
    a.push(format!("--txpkts={}", pt.size));
    a.push(format!("--burst={}", pt.bursts().0));
    a.push(format!("--total-num-mbufs={MBUFS}"));
    a
}

/// For [`Testpmd::spawn`]'s watch: SIGINT or SIGTERM arrived.
fn interrupted() -> Option<String> {
    signals::stopped().then(|| "interrupted".to_string())
}

fn sleep_checked(d: Duration) -> Result<(), String> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        signals::check()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(100)));
    }
    Ok(())
}

fn sum_rx(p: &[PortStats]) -> u64 {
    p.iter().map(|s| s.rx_packets).sum()
}

fn sum_tx(p: &[PortStats]) -> u64 {
    p.iter().map(|s| s.tx_packets).sum()
}

/// One point: a fresh switch and a fresh generator (again, up to [`ATTEMPTS`] times, if the
/// loop does not start), a warm-up, the measured window, then both are stopped.
#[allow(clippy::too_many_arguments)]
fn point(
    t: Target,
    pt: Point,
    args: &Args,
    vswitch: Option<&Path>,
    dir: &Path,
    warmup: Duration,
    window: Duration,
    exits: &mut Vec<String>,
) -> Result<Measurement, String> {
    let mut notes = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let pdir = dir.join(format!(
            "{}-{}-{}-{attempt}",
            t.name(),
            pt.size,
            pt.in_flight
        ));
        std::fs::create_dir_all(&pdir).map_err(|e| format!("create {}: {e}", pdir.display()))?;
        let mut sw = Switch::start(t, args, vswitch, &pdir)?;
        let r = start_loop(&mut sw, pt, args, &pdir, warmup);
        let r = match r {
            Ok(Ok(gen)) => {
                if attempt > 1 {
                    notes.push(format!("measured on attempt {attempt}"));
                }
                measure(&mut sw, gen, pt, window, std::mem::take(&mut notes))
            }
            Ok(Err(dead)) => {
                eprint!("[attempt {attempt}: {dead}] ");
                notes.push(format!("attempt {attempt}: {dead}"));
                Err(format!(
                    "the loop does not run through the switch: {}; switch log:\n{}",
                    notes.join("; "),
                    sw.log_tail()
                ))
            }
            Err(e) => Err(e),
        };
        let failed_start = r.is_err() && !notes.is_empty();
        for e in sw.stop() {
            exits.push(format!("{} {pt} (attempt {attempt}): {e}", t.name()));
        }
        if failed_start && attempt < ATTEMPTS {
            continue;
        }
        return r;
    }
    Err("no attempt left".to_string())
}

/// Start a generator on the switch and inject the frames; after the warm-up, the generator if
/// frames come back on both ports, else what was seen.
fn start_loop(
    sw: &mut Switch,
    pt: Point,
    args: &Args,
    dir: &Path,
    warmup: Duration,
) -> Result<Result<Testpmd, String>, String> {
    let sockets = sw.sockets();
    let log = dir.join(format!("gen-{}-{}.log", pt.size, pt.in_flight));
    let mut gen = Testpmd::spawn(
        "gen",
        &gen_args(&sockets, pt, args),
        Some(&log),
        &mut || interrupted().or_else(|| sw.exited()),
    )?;
    // The switch enables the queues a little after the driver is set up (OVS reloads its
    // PMD): frames sent before that are lost, and a direction whose frames are all lost stays
    // empty for ever. Give it a moment, then check that both directions move.
    sleep_checked(Duration::from_millis(1500))?;
    gen.cmd(&format!("start tx_first {}", pt.bursts().1))?;
    sleep_checked(warmup)?;
    if let Some(why) = sw.exited() {
        return Err(why);
    }
    // Both ports must receive. A busy machine can starve the pollers for a while (everything
    // stays in flight then), so a port only counts as dead after a few seconds without a frame.
    let a = gen.port_stats()?;
    let mut b = a.clone();
    let mut dead: Vec<usize> = vec![0, 1];
    for _ in 0..8 {
        sleep_checked(Duration::from_millis(500))?;
        b = gen.port_stats()?;
        dead = (0..2)
            .filter(|&i| match (a.get(i), b.get(i)) {
                (Some(x), Some(y)) => y.rx_packets == x.rx_packets,
                _ => true,
            })
            .collect();
        if dead.is_empty() {
            return Ok(Ok(gen));
        }
    }
    let _ = gen.quit();
    Ok(Err(format!(
        "nothing arrived on generator port(s) {dead:?} for 4 s after the warm-up (RX-packets {} \
         -> {}, TX-packets {} -> {})",
        sum_rx(&a),
        sum_rx(&b),
        sum_tx(&a),
        sum_tx(&b)
    )))
}

/// The measured window on a running loop; quits the generator.
fn measure(
    sw: &mut Switch,
    mut gen: Testpmd,
    pt: Point,
    window: Duration,
    mut notes: Vec<String>,
) -> Result<Measurement, String> {
    let sw_pid = sw.pid().ok_or("the switch has no process")?;
    let gen_pid = gen.pid();
    gen.cmd("clear fwd stats all")?;
    sw.window_start()?;
    let p0 = gen.port_stats()?;
    let t0 = Instant::now();
    let cpu0 = cpu_time(sw_pid)?;
    let gcpu0 = cpu_time(gen_pid)?;
    let m0 = machine_busy();
    let mut per_sec = Vec::new();
    let mut last = p0.clone();
    let mut tlast = t0;
    let mut tick = t0;
    let (p1, t1) = loop {
        tick += Duration::from_secs(1);
        let now = Instant::now();
        if tick > now {
            sleep_checked(tick - now)?;
        }
        if let Some(why) = sw.exited() {
            return Err(format!("the switch failed during the window: {why}"));
        }
        let p = gen.port_stats()?;
        let t = Instant::now();
        let dt = (t - tlast).as_secs_f64();
        per_sec.push((sum_rx(&p) - sum_rx(&last)) as f64 / dt / 1e6);
        last = p;
        tlast = t;
        if t - t0 >= window {
            break (last.clone(), t);
        }
    };
    let wall = t1 - t0;
    let cpu1 = cpu_time(sw_pid)?;
    let gcpu1 = cpu_time(gen_pid)?;
    let m1 = machine_busy();
    let gen_fwd = gen.fwd_cycles()?;
    let packets = sum_rx(&p1) - sum_rx(&p0);
    let mhz = gen_fwd.map(|f| f.mhz).filter(|&m| m > 0);
    let cpu = cpu1.saturating_sub(cpu0);
    let swp = sw.window_end(wall, cpu, packets, mhz)?;
    // Read while frames move, TX - RX is skewed: `show port stats all` reads the ports one
    // after the other, and the loop is two circuits (a frame received on port 0 leaves by
    // port 1 and comes back on port 0) that may run at different speeds, so the sum is off
    // by the speed difference times the read's duration: thousands of frames at 10 Mpps.
    // Stopped, the counters hold still. Every frame the generator sent once more than it
    // received (its injection), whether it still circulates, waits in a ring or was dropped
    // by the switch; so TX - RX is exactly the injected frames, less the frames the generator
    // itself failed to send on (TX-dropped), less any it received twice.
    let settled = gen.cmd("stop").and_then(|reply| {
        let ps = gen.port_stats()?;
        Ok(Settled {
            sent_minus_received: sum_tx(&ps) as i64 - sum_rx(&ps) as i64,
            gen_tx_dropped: testpmd::parse_fwd_tx_dropped(&reply),
        })
    });
    if let Err(e) = gen.quit() {
        notes.push(e);
    }

    let secs = wall.as_secs_f64();
    let port_mpps: Vec<f64> = p0
        .iter()
        .zip(&p1)
        .map(|(a, b)| (b.rx_packets - a.rx_packets) as f64 / secs / 1e6)
        .collect();
    let total_mpps: f64 = port_mpps.iter().sum();
    let gen_busy = gen_fwd
        .filter(|f| f.mhz > 0)
        .map(|f| f.busy_cycles as f64 / (secs * f.mhz as f64 * 1e6));
    let others = (m1.saturating_sub(m0).as_secs_f64()
        - cpu.as_secs_f64()
        - gcpu1.saturating_sub(gcpu0).as_secs_f64())
    .max(0.0)
        / secs;
    if packets == 0 {
        return Err(format!(
            "no frame came back through the switch in the window; switch log:\n{}",
            sw.log_tail()
        ));
    }
    let stalled = per_sec.iter().filter(|&&r| r == 0.0).count();
    if stalled > 0 {
        notes.push(format!(
            "nothing came back in {stalled} of the {} one-second samples",
            per_sec.len()
        ));
    }
    let injected = (2 * pt.in_flight) as i64;
    match &settled {
        Ok(st) if st.sent_minus_received < injected => {
            let missing = injected - st.sent_minus_received;
            let dropped = st.gen_tx_dropped.unwrap_or(0) as i64;
            if missing > dropped {
                notes.push(format!(
                    "stopped, the generator had received {} frames more than it sent (TX - RX \
                     = {} of {injected} injected, {dropped} TX-dropped in the window): frames \
                     were duplicated",
                    missing - dropped,
                    st.sent_minus_received
                ));
            } else {
                notes.push(format!(
                    "the generator failed to send {dropped} received frames on (TX-dropped)"
                ));
            }
        }
        Ok(st) if st.sent_minus_received > injected => notes.push(format!(
            "stopped, TX - RX is {} with {injected} injected: the generator's counters are \
             inconsistent",
            st.sent_minus_received
        )),
        Ok(_) => {}
        Err(e) => notes.push(format!("stop the generator: {e}")),
    }
    let (lo, hi) = per_sec
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    if per_sec.len() > 1 && hi > 0.0 && (hi - lo) / hi > 0.15 {
        notes.push(format!(
            "one-second samples ranged {lo:.2}..{hi:.2} Mpps (noisy)"
        ));
    }
    let (ra, rb) = (port_mpps[0], port_mpps.get(1).copied().unwrap_or(0.0));
    if ra.max(rb) > 0.0 && (ra - rb).abs() / ra.max(rb) > 0.2 {
        notes.push("the two directions are unbalanced".to_string());
    }
    notes.extend(swp.notes);
    let limit = limit(swp.busy, gen_busy, others);
    Ok(Measurement {
        gbps: total_mpps * 1e6 * pt.size as f64 * 8.0 / 1e9,
        port_mpps,
        total_mpps,
        switch_cores: cpu.as_secs_f64() / secs,
        cpu_ns_per_pkt: cpu.as_nanos() as f64 / packets as f64,
        busy_ns_per_pkt: swp.busy_ns_per_pkt,
        switch_busy: swp.busy,
        gen_busy,
        others_cores: others,
        ovs_cycles_per_pkt: swp.ovs_cycles_per_pkt,
        per_sec_mpps: per_sec,
        settled: settled.ok(),
        limit,
        notes,
    })
}

/// vswitch's total Mpps over `peer`'s, round by round, where both points were measured.
fn round_ratios(rows: &[Row], pt: Point, peer: Target) -> Vec<f64> {
    let mpps = |t: Target, run: usize| {
        rows.iter()
            .find(|r| r.target == t && r.point == pt && r.run == run)
            .and_then(|r| r.result.as_ref().ok())
            .map(|m| m.total_mpps)
    };
    let mut runs: Vec<usize> = rows.iter().map(|r| r.run).collect();
    runs.sort_unstable();
    runs.dedup();
    runs.into_iter()
        .filter_map(|run| match (mpps(Target::Vswitch, run), mpps(peer, run)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        })
        .collect()
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// What held the run back, from the busy shares of both sides and the CPU others took.
fn limit(switch: Option<f64>, gen: Option<f64>, others: f64) -> String {
    let pct = |v: Option<f64>| {
        v.map(|v| format!("{:.0}%", v * 100.0))
            .unwrap_or_else(|| "?".to_string())
    };
    let sw_full = switch.is_some_and(|b| b >= SATURATED);
    let gen_full = gen.is_some_and(|b| b >= SATURATED);
    let mut s = match (sw_full, gen_full) {
        (true, true) => format!(
            "both saturated (switch {}, generator {} busy)",
            pct(switch),
            pct(gen)
        ),
        (true, false) => format!("switch-bound (switch {} busy)", pct(switch)),
        (false, true) => format!(
            "generator-bound (generator {} busy, switch {})",
            pct(gen),
            pct(switch)
        ),
        (false, false) if others >= 0.25 => format!(
            "CPU contention: other processes took {:.2} cores (switch {}, generator {} busy)",
            others,
            pct(switch),
            pct(gen)
        ),
        (false, false) => format!(
            "neither side saturated (switch {}, generator {}): latency/in-flight bound",
            pct(switch),
            pct(gen)
        ),
    };
    if others >= 0.25 && (sw_full || gen_full) {
        let _ = write!(s, "; other processes took {:.2} cores", others);
    }
    s
}

/// The row reported for a point: the median successful run by total Mpps, else a failure.
fn pick(rows: &[Row], t: Target, pt: Point) -> Option<&Row> {
    let mut ok: Vec<&Row> = rows
        .iter()
        .filter(|r| r.target == t && r.point == pt && r.result.is_ok())
        .collect();
    ok.sort_by(|a, b| {
        let m = |r: &Row| r.result.as_ref().map(|m| m.total_mpps).unwrap_or(0.0);
        m(a).total_cmp(&m(b))
    });
    ok.get(ok.len().saturating_sub(1) / 2)
        .copied()
        .or_else(|| rows.iter().find(|r| r.target == t && r.point == pt))
}

fn find(rows: &[Row], t: Target, pt: Point) -> Option<&Measurement> {
    pick(rows, t, pt).and_then(|r| r.result.as_ref().ok())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_string(),
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "–".to_string())
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.0}%", v * 100.0))
        .unwrap_or_else(|| "–".to_string())
}

fn markdown(meta: &Meta, targets: &[Target], points: &[Point], rows: &[Row]) -> String {
    let mut sizes: Vec<usize> = points.iter().map(|p| p.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let sizes = &sizes[..];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# vhost-user-net PVP loopback: vswitch vs Open vSwitch with DPDK vs DPDK vhost PMD\n"
    );
    let _ = writeln!(
        s,
        "Generated by `cargo run --release -p benches -- net{}{}`{}. Kernel {}, {} ({} CPUs). \
         Each point: a fresh switch and a fresh generator, which injects its frames, {:.0} s \
         warm-up, then {:.0} s measured; the points run one after the other, one switch \
         process at a time{}.\n",
        if meta.quick { " --quick" } else { "" },
        meta.runs_arg
            .map(|r| format!(" --runs {r}"))
            .unwrap_or_default(),
        String::new(),
        meta.kernel,
        meta.cpu,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        meta.warmup.as_secs_f64(),
        meta.window.as_secs_f64(),
        if meta.runs > 1 {
            format!(
                ", the whole matrix {} times round robin; each point's median run (by total \
                 Mpps) is shown",
                meta.runs
            )
        } else {
            String::new()
        },
    );
    let _ = writeln!(
        s,
        "- Generator: `dpdk-testpmd` with two `net_virtio_user` ports (one per switch port), \
         `--forward-mode=mac` with crossed `--eth-peer`s, so each frame that comes back on one \
         port is sent out of the other towards the first. For N frames in flight per direction \
         (`B x N` in the tables) it runs with `--burst=min(N,32)` (how many frames it sends and \
         receives per call) and `start tx_first N/burst` injects them once per port. It \
         forwards on core {g}; its main lcore (which only reads commands) sits on core {w}.",
        g = meta.gen_cpu,
        w = meta.switch_cpu
    );
    let _ = writeln!(
        s,
        "- vswitch: two access ports on VLAN {VLAN} (MAC learning on with `mac_limit = 64`; QoS on: `tx_rate_bps` and `rx_rate_bps` 400 Gbit/s, `storm_pps` 1 M, charged per frame but never binding), `mtu = {mtu}` \
         (the largest test frame minus its 14-byte Ethernet header, at least 1500: vswitch \
         drops longer frames, while OVS and the vhost PMD do not check), {}. ovs: \
         ovs-vswitchd-dpdk, netdev bridge, two `dpdkvhostuser` ports `tag={VLAN}`, default \
         NORMAL flow, one PMD on core {w} (`pmd-cpu-mask`), main thread on core {g}. vhost-pmd: \
         `dpdk-testpmd` with two `net_vhost` ports, `--forward-mode=io`, forwarding lcore on \
         core {w}.",
        if meta.vswitch_pinned {
            format!("all threads pinned to core {}", meta.switch_cpu)
        } else {
            "threads unpinned".to_string()
        },
        w = meta.switch_cpu,
        g = meta.gen_cpu,
        mtu = vswitch_mtu(sizes),
    );
    let _ = writeln!(
        s,
        "- Mpps: frames the generator received per port over the window (its RX-packets \
         counters), i.e. frames the switch forwarded. Gbit/s: total Mpps x frame size x 8 \
         (frame without FCS, as `--txpkts` counts it; no preamble or gap)."
    );
    let _ = writeln!(
        s,
        "- switch CPU: the switch process's utime+stime (/proc/PID/stat, all threads) over the \
         window, in cores and per forwarded frame; a polling switch (ovs, vhost-pmd) burns its \
         core whether busy or not, so this is 1/throughput for them. busy ns/pkt: time spent on \
         frames only: OVS's `avg processing cycles per packet` (`dpif-netdev/pmd-stats-show`), \
         vhost-pmd's testpmd `--record-core-cycles` busy cycles per frame, and for vswitch, \
         which does not poll, its CPU time per frame. busy %: the same share of the switch \
         core (for vswitch: CPU time / wall time). gen busy %: the generator's busy cycles \
         share. Cycles are converted with the TSC rate testpmd reports."
    );
    let _ = writeln!(
        s,
        "- limited by: a side is saturated at >= {:.0}% busy; 'other processes' is the CPU that \
         processes other than the generator and the switch took in the window (from \
         /proc/stat): on 2 cores, anything there slows the run. Busy cycles are TSC (wall \
         clock) cycles, so they also count time a busy iteration lost to other processes.",
        SATURATED * 100.0
    );
    for (n, v) in &meta.versions {
        let _ = writeln!(s, "- {n}: {v}");
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "| frame | target | Mpps port 0 | Mpps port 1 | Mpps total | Gbit/s | switch CPU (cores) \
         | switch CPU ns/pkt | busy ns/pkt | switch busy | gen busy | limited by |"
    );
    let _ = writeln!(
        s,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for &pt in points {
        for &t in targets {
            let Some(r) = pick(rows, t, pt) else {
                continue;
            };
            match &r.result {
                Ok(m) => {
                    let _ = writeln!(
                        s,
                        "| {pt} | {} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.1} | {} | {} \
                         | {} | {} |",
                        t.name(),
                        m.port_mpps.first().copied().unwrap_or(0.0),
                        m.port_mpps.get(1).copied().unwrap_or(0.0),
                        m.total_mpps,
                        m.gbps,
                        m.switch_cores,
                        m.cpu_ns_per_pkt,
                        opt(m.busy_ns_per_pkt, 1),
                        pct(m.switch_busy),
                        pct(m.gen_busy),
                        m.limit
                    );
                }
                Err(e) => {
                    let e = e.lines().next().unwrap_or("").replace('|', "/");
                    let _ = writeln!(s, "| {pt} | {} | failed: {e} | | | | | | | | | |", t.name());
                }
            }
        }
    }
    let _ = writeln!(s, "\n## Ratios\n");
    let _ = writeln!(
        s,
        "Throughput above 1: vswitch forwards more. CPU above 1: vswitch spends more per frame.\n"
    );
    let _ = writeln!(
        s,
        "| frame | Mpps vswitch/ovs | Mpps vswitch/vhost-pmd | busy ns/pkt vswitch/ovs | busy \
         ns/pkt vswitch/vhost-pmd | CPU ns/pkt vswitch/ovs | OVS processing cycles/pkt |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|");
    for &pt in points {
        let get = |t: Target, f: fn(&Measurement) -> Option<f64>| find(rows, t, pt).and_then(f);
        let mpps = |m: &Measurement| Some(m.total_mpps);
        let busy = |m: &Measurement| m.busy_ns_per_pkt;
        let cpu = |m: &Measurement| Some(m.cpu_ns_per_pkt);
        let _ = writeln!(
            s,
            "| {pt} | {} | {} | {} | {} | {} | {} |",
            ratio(get(Target::Vswitch, mpps), get(Target::Ovs, mpps)),
            ratio(get(Target::Vswitch, mpps), get(Target::VhostPmd, mpps)),
            ratio(get(Target::Vswitch, busy), get(Target::Ovs, busy)),
            ratio(get(Target::Vswitch, busy), get(Target::VhostPmd, busy)),
            ratio(get(Target::Vswitch, cpu), get(Target::Ovs, cpu)),
            opt(get(Target::Ovs, |m| m.ovs_cycles_per_pkt), 0),
        );
    }
    let _ = writeln!(
        s,
        "\nThe worst point of each frame size (the target holds only if it holds there):\n"
    );
    for &size in sizes {
        for peer in [Target::Ovs, Target::VhostPmd] {
            let worst = points
                .iter()
                .filter(|p| p.size == size)
                .filter_map(|&p| {
                    let v = find(rows, Target::Vswitch, p)?.total_mpps;
                    let o = find(rows, peer, p)?.total_mpps;
                    (o > 0.0).then_some((v / o, p))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((r, p)) = worst {
                let _ = writeln!(s, "- {size} B, Mpps vswitch/{}: {r:.2} at {p}", peer.name());
            }
        }
    }
    if meta.runs > 1 {
        let _ = writeln!(s, "\n## Every run\n");
        let _ = writeln!(
            s,
            "Total Mpps of each run, in order; the tables show each point's median run.\n"
        );
        for &pt in points {
            for &t in targets {
                let all: Vec<String> = rows
                    .iter()
                    .filter(|r| r.target == t && r.point == pt)
                    .map(|r| match &r.result {
                        Ok(m) => format!("{:.3}", m.total_mpps),
                        Err(_) => "failed".to_string(),
                    })
                    .collect();
                let _ = writeln!(s, "- {} {pt}: {}", t.name(), all.join(", "));
            }
        }
        let _ = writeln!(
            s,
            "\nvswitch's throughput over each peer's in the same round (the two points run \
             seconds apart, so both see the machine as it was then), and the median \
             of those:\n"
        );
        for &pt in points {
            for peer in [Target::Ovs, Target::VhostPmd] {
                let r = round_ratios(rows, pt, peer);
                if r.is_empty() {
                    continue;
                }
                let list: Vec<String> = r.iter().map(|v| format!("{v:.2}")).collect();
                let _ = writeln!(
                    s,
                    "- {pt} vswitch/{}: {}; median {}",
                    peer.name(),
                    list.join(", "),
                    opt(median(&r), 2)
                );
            }
        }
    }
    let mut notes = String::new();
    for r in rows {
        let Ok(m) = &r.result else { continue };
        let mut n = m.notes.clone();
        n.push(format!(
            "one-second samples (Mpps total): {}",
            m.per_sec_mpps
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if let Some(st) = m.settled {
            n.push(format!(
                "stopped: TX - RX {} with {} injected",
                st.sent_minus_received,
                2 * r.point.in_flight
            ));
        }
        n.push(format!("other processes: {:.2} cores", m.others_cores));
        let run = if meta.runs > 1 {
            format!(" (run {})", r.run)
        } else {
            String::new()
        };
        let _ = writeln!(
            notes,
            "- {} {}{run}: {}",
            r.target.name(),
            r.point,
            n.join("; ")
        );
    }
    if !notes.is_empty() {
        let _ = writeln!(s, "\n## Notes per run\n\n{notes}");
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| r.result.is_err()).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\n## Failures\n");
        for r in failed {
            if let Err(e) = &r.result {
                let _ = writeln!(
                    s,
                    "### {} {} (run {})\n\n```\n{}\n```\n",
                    r.target.name(),
                    r.point,
                    r.run,
                    e.trim()
                );
            }
        }
    }
    if !meta.exits.is_empty() {
        let _ = writeln!(s, "\n## Shutdown\n");
        for e in &meta.exits {
            let _ = writeln!(s, "- {}", e.lines().next().unwrap_or(""));
        }
    }
    s
}

fn draw(path: &Path, targets: &[Target], points: &[Point], rows: &[Row]) -> Result<(), String> {
    let names: Vec<String> = points.iter().map(Point::to_string).collect();
    let series = |f: fn(&Measurement) -> Option<f64>| -> Vec<chart::Series> {
        targets
            .iter()
            .map(|&t| chart::Series {
                name: t.name().to_string(),
                color: t.color(),
                values: points
                    .iter()
                    .map(|&pt| find(rows, t, pt).and_then(f))
                    .collect(),
            })
            .collect()
    };
    let panels = [
        chart::Panel {
            title: "Mpps forwarded (both directions)".to_string(),
            series: series(|m| Some(m.total_mpps)),
        },
        chart::Panel {
            title: "Gbit/s forwarded".to_string(),
            series: series(|m| Some(m.gbps)),
        },
        chart::Panel {
            title: "switch busy ns per packet (OVS processing cycles, vhost-pmd busy cycles, \
                    vswitch CPU time)"
                .to_string(),
            series: series(|m| m.busy_ns_per_pkt),
        },
    ];
    chart::draw(path, &names, &panels)
}

fn dpdk_version() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "dpdk"])
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .map(|v| format!("(Debian dpdk {v})"))
        .unwrap_or_else(|| "(version unknown)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert!(limit(Some(0.95), Some(0.5), 0.0).starts_with("switch-bound"));
        assert!(limit(Some(0.3), Some(0.99), 0.0).starts_with("generator-bound"));
        assert!(limit(Some(0.3), Some(0.5), 0.0).starts_with("neither"));
        assert!(limit(Some(0.95), Some(0.95), 0.5).contains("other processes took 0.50"));
        assert!(limit(Some(0.5), Some(0.5), 0.9).starts_with("CPU contention"));
    }

    fn meas(mpps: f64) -> Measurement {
        Measurement {
            port_mpps: vec![mpps / 2.0, mpps / 2.0],
            total_mpps: mpps,
            busy_ns_per_pkt: Some(100.0),
            limit: "switch-bound".to_string(),
            ..Measurement::default()
        }
    }

    const P64: Point = Point {
        size: 64,
        in_flight: 128,
    };

    #[test]
    fn in_flight_in_bursts() {
        let b = |in_flight| {
            Point {
                size: 64,
                in_flight,
            }
            .bursts()
        };
        assert_eq!(b(1), (1, 1));
        assert_eq!(b(8), (8, 1));
        assert_eq!(b(32), (32, 1));
        assert_eq!(b(256), (32, 8));
    }

    #[test]
    fn median_run_and_report() {
        let row = |run, target, mpps: Option<f64>| Row {
            run,
            target,
            point: P64,
            result: mpps.map(meas).ok_or_else(|| "boom".to_string()),
        };
        let rows = vec![
            row(1, Target::Vswitch, Some(3.0)),
            row(1, Target::Ovs, Some(2.0)),
            row(2, Target::Vswitch, Some(1.0)),
            row(2, Target::Ovs, None),
            row(3, Target::Vswitch, Some(2.0)),
            row(3, Target::Ovs, Some(4.0)),
        ];
        assert_eq!(pick(&rows, Target::Vswitch, P64).map(|r| r.run), Some(3));
        // Two successful runs: the lower one.
        assert_eq!(pick(&rows, Target::Ovs, P64).map(|r| r.run), Some(1));
        assert!(pick(&rows, Target::VhostPmd, P64).is_none());
        let meta = Meta {
            quick: true,
            runs: 3,
            runs_arg: Some(3),
            warmup: Duration::from_secs(1),
            window: Duration::from_secs(3),
            gen_cpu: 0,
            switch_cpu: 1,
            vswitch_pinned: true,
            kernel: "k".into(),
            cpu: "c".into(),
            versions: Vec::new(),
            exits: Vec::new(),
        };
        let md = markdown(&meta, &[Target::Vswitch, Target::Ovs], &[P64], &rows);
        assert!(md.contains("-- net --quick --runs 3"), "{md}");
        assert!(
            md.contains("| 64 B x128 | vswitch | 1.000 | 1.000 | 2.000 |"),
            "{md}"
        );
        assert!(md.contains("| 64 B x128 | 1.00 |"), "{md}");
        assert!(md.contains("- ovs 64 B x128: 2.000, failed, 4.000"), "{md}");
        // Round 2 has no OVS figure: only rounds 1 and 3 pair up.
        assert!(
            md.contains("- 64 B x128 vswitch/ovs: 1.50, 0.50; median 1.00"),
            "{md}"
        );
        assert!(!md.contains("vswitch/vhost-pmd:"), "{md}");
        assert!(md.contains("### ovs 64 B x128 (run 2)"), "{md}");
    }

    #[test]
    fn generator_command_line() {
        let args = <crate::Cli as clap::Parser>::parse_from(["benches", "net"]);
        let crate::Cmd::Net(args) = args.cmd else {
            panic!("not net");
        };
        let a = gen_args(&[PathBuf::from("/s0"), PathBuf::from("/s1")], P64, &args);
        let line = a.join(" ");
        assert!(line.contains("-l 0,1 --main-lcore 1"), "{line}");
        assert!(
            line.contains("path=/s0,queues=1,mac=02:00:00:00:00:10"),
            "{line}"
        );
        assert!(line.contains("--eth-peer=0,02:00:00:00:00:11"), "{line}");
        assert!(line.contains("--eth-peer=1,02:00:00:00:00:10"), "{line}");
        assert!(line.contains("--txpkts=64"), "{line}");
        assert!(line.contains("--burst=32"), "{line}");
    }
}
