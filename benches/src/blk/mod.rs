//! `benches blk`: vdisk against qemu-storage-daemon on the same raw image, in the same run,
//! both driven through vhost-user by the same libblkio client, with fio (io_uring, straight on
//! the file) as the ceiling. Results go to a markdown table and a PNG chart.
//!
//! Absolute numbers drift between runs on shared cores; the ratios measured side by side, and
//! the daemons' CPU time per operation, are what to compare.

mod client;
pub(crate) mod daemon;
pub mod dedupe;
mod fio;
pub mod qcow2;

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use client::Client;
use daemon::DaemonProc;

use crate::{chart, signals};

#[derive(clap::Args)]
pub struct Args {
    /// About 1 s per measurement instead of about 3 s.
    #[arg(long)]
    quick: bool,
    /// Open the image with O_DIRECT everywhere (vdisk --direct, qsd cache.direct=on, fio --direct=1).
    #[arg(long)]
    direct: bool,
    /// Directory for blk.md and blk.png (blk-direct.* with --direct).
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// What to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "vdisk,qsd,fio")]
    targets: Vec<Target>,
    /// The vdisk binary [default: `vdisk` next to this runner, i.e. target/release/vdisk].
    #[arg(long)]
    vdisk: Option<PathBuf>,
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Where to create the image (not tmpfs with --direct) [default: the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Interrupt-driven client queues (completion eventfd) instead of busy-polling ones.
    #[arg(long)]
    irq: bool,
    /// Client threads driving the queues of the multiqueue row (busy-polling: each one takes
    /// a core; 1 leaves the other core of a 2-core machine to the daemon).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Seconds per measured window (overrides --quick's and the default 3 s).
    #[arg(long)]
    seconds: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Vdisk,
    Qsd,
    Fio,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Vdisk => "vdisk",
            Target::Qsd => "qsd",
            Target::Fio => "fio",
        }
    }

    fn color(self) -> (u8, u8, u8) {
        match self {
            Target::Vdisk => VDISK_COLOR,
            Target::Qsd => QSD_COLOR,
            Target::Fio => GREY,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Random,
    Sequential,
    /// One request in every `stride` bytes of the device, each stride visited once: at its
    /// start and in order, or, if `shuffle`, at a random block of it in a pseudo-random order. The window ends early when a queue
    /// has covered its share. With the cluster size as the stride, each write is the first
    /// to its qcow2 cluster.
    Stride {
        stride: u64,
        shuffle: bool,
    },
}

/// What the blocks a write workload writes hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    /// Whatever the buffers hold (they are never changed): the raw and qcow2 rows.
    AsIs,
    /// A block no other write wrote: a fixed non-zero pattern under a random 64-bit stamp.
    Unique,
    /// One of [`DUP_POOL`] blocks, at random: after the first few thousand writes every
    /// block is a copy of one written before.
    Duplicate,
    /// Each write [`Data::Duplicate`] with this probability in percent, else unique.
    Mixed(u8),
}

/// Distinct blocks [`Data::Duplicate`] draws from.
pub const DUP_POOL: u64 = 1024;

/// One point of the matrix: `queues` client queues, each keeping `qd` requests of `bs` bytes in
/// flight.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub op: Op,
    pub pattern: Pattern,
    pub bs: usize,
    pub qd: usize,
    pub queues: usize,
    pub data: Data,
    /// A write workload sends a flush after every this many writes per queue, as a guest
    /// filesystem's journal commits do (0: never).
    pub flush_every: u64,
}

fn workloads() -> Vec<Workload> {
    let w = |name: &str, op, pattern, bs, qd, queues| Workload {
        name: name.to_string(),
        op,
        pattern,
        bs,
        qd,
        queues,
        data: Data::AsIs,
        flush_every: 0,
    };
    use Op::*;
    use Pattern::*;
    vec![
        w("4k randread QD1", Read, Random, 4096, 1, 1),
        w("4k randread QD32", Read, Random, 4096, 32, 1),
        w("4k randwrite QD1", Write, Random, 4096, 1, 1),
        w("4k randwrite QD32", Write, Random, 4096, 32, 1),
        // 8 x 128 KiB = 1 MiB in flight: enough to stream; deeper only adds queueing.
        w("128k seqread QD8", Read, Sequential, 128 << 10, 8, 1),
        // Scaling: the same total depth as the QD32 row, spread over two queues and threads.
        w("4k randread 2 queues x QD16", Read, Random, 4096, 16, 2),
    ]
}

/// What one target achieved on one workload.
#[derive(Clone, Copy, Debug)]
pub struct Measurement {
    pub iops: f64,
    pub mib_s: f64,
    pub lat_mean_us: f64,
    pub lat_p99_us: f64,
    /// The daemon's CPU time (fio's own for fio) per completed operation.
    pub cpu_us_per_op: f64,
    /// Operations completed in the whole run, warm-up and drain included (fio: its window).
    pub ops_all: u64,
    /// The measured window, if it ended early because a [`Pattern::Stride`] ran out (s).
    pub cut_short: Option<f64>,
}

/// One measured point: workload index, target, result. `T` is the report's target type.
pub(crate) struct Row<T> {
    pub workload: usize,
    pub target: T,
    pub result: Result<Measurement, String>,
}

/// Everything about the run the report states.
struct Meta {
    direct: bool,
    poll: bool,
    client_threads: usize,
    warmup: Duration,
    window: Duration,
    size_mib: u64,
    dir: PathBuf,
    fs: String,
    kernel: String,
    cpu: String,
    versions: Vec<(Target, String)>,
    exits: Vec<String>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let (warmup, window) = windows(args.quick, args.seconds)?;
    let mut targets = Vec::new();
    for t in [Target::Vdisk, Target::Qsd, Target::Fio] {
        if args.targets.contains(&t) {
            targets.push(t);
        }
    }
    if targets.is_empty() {
        return Err("--targets is empty".to_string());
    }
    let vdisk = preflight(args, &targets)?;

    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("vdisk-bench-")
        .tempdir_in(&base)
        .map_err(|e| format!("create a temp dir in {}: {e}", base.display()))?;
    let image = tmp.path().join("disk.raw");
    let size = args.size_mib << 20;
    eprintln!(
        "creating {} MiB image {} ...",
        args.size_mib,
        image.display()
    );
    create_image(&image, size)?;
    if args.direct {
        File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&image)
            .map_err(|e| {
                format!(
                    "O_DIRECT open of {} failed ({e}): --direct needs a filesystem that \
                     supports it (not tmpfs); pick one with --dir",
                    image.display()
                )
            })?;
    }

    let mut meta = Meta {
        direct: args.direct,
        poll: !args.irq,
        client_threads: args.client_threads,
        warmup,
        window,
        size_mib: args.size_mib,
        dir: base.clone(),
        fs: fs_type(&base),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu: cpu_model(),
        versions: Vec::new(),
        exits: Vec::new(),
    };
    for &t in &targets {
        let v = match t {
            Target::Vdisk => format!(
                "{} ({})",
                daemon::version(vdisk.as_deref().unwrap_or(Path::new("vdisk"))),
                vdisk.as_deref().unwrap_or(Path::new("")).display()
            ),
            Target::Qsd => daemon::version(Path::new("qemu-storage-daemon")),
            Target::Fio => daemon::version(Path::new("fio")),
        };
        meta.versions.push((t, v));
    }

    let wls = workloads();
    let mut rows = Vec::new();
    for nq in [1usize, 2] {
        let idx: Vec<usize> = (0..wls.len()).filter(|&i| wls[i].queues == nq).collect();
        if idx.is_empty() {
            continue;
        }
        let region = idx
            .iter()
            .map(|&i| wls[i].queues * wls[i].qd * wls[i].bs)
            .max()
            .unwrap_or(1 << 20);
        // Start both daemons for this queue count; they idle while the other is measured.
        let mut live: Vec<(Target, DaemonProc, Option<Client>)> = Vec::new();
        let mut failed: Vec<(Target, String)> = Vec::new();
        for &t in &targets {
            if t == Target::Fio {
                continue;
            }
            match start(
                t,
                vdisk.as_deref(),
                &image,
                tmp.path(),
                nq,
                args.direct,
                !args.irq,
                region,
            ) {
                Ok((d, c)) => live.push((t, d, Some(c))),
                Err(e) => {
                    eprintln!("{}: {e}", t.name());
                    failed.push((t, e));
                }
            }
        }
        for &i in &idx {
            let wl = &wls[i];
            for &t in &targets {
                signals::check()?;
                eprint!("{:<28} {:<6} ", wl.name, t.name());
                let result = if t == Target::Fio {
                    fio::run(&image, wl, args.direct, warmup, window)
                } else if let Some((_, d, c)) = live.iter_mut().find(|(lt, _, _)| *lt == t) {
                    match c.take() {
                        None => Err(
                            "no connection (reconnecting after an earlier failure failed)"
                                .to_string(),
                        ),
                        Some(mut client) => {
                            let r =
                                measure(d, &mut client, wl, args.client_threads, warmup, window);
                            if r.is_err() && d.exited().is_none() {
                                // Requests of the failed window may still be in flight: go on
                                // with a fresh connection.
                                match client.reconnect() {
                                    Ok(fresh) => *c = Some(fresh),
                                    Err(e) => eprintln!("{}: reconnect failed: {e}", t.name()),
                                }
                            } else {
                                *c = Some(client);
                            }
                            r
                        }
                    }
                } else {
                    let why = failed
                        .iter()
                        .find(|(ft, _)| *ft == t)
                        .map(|(_, e)| e.clone())
                        .unwrap_or_default();
                    Err(format!("not started: {why}"))
                };
                progress(&result);
                rows.push(Row {
                    workload: i,
                    target: t,
                    result,
                });
            }
        }
        for (t, d, c) in live {
            drop(c);
            let name = t.name();
            let exit = match d.stop() {
                Ok(s) if s.success() => format!("{name} (--num-queues {nq}) exited 0 on SIGTERM"),
                Ok(s) => format!("{name} (--num-queues {nq}) exited with {s} on SIGTERM"),
                Err(e) => format!("{name} (--num-queues {nq}): {e}"),
            };
            meta.exits.push(exit);
        }
    }

    let md = markdown(&meta, &wls, &targets, &rows);
    let mode = if meta.direct { "O_DIRECT" } else { "buffered" };
    let chart = ChartSpec {
        names: wls.iter().map(|w| w.name.clone()).collect(),
        series: targets.iter().map(|&t| (t.name(), t.color(), t)).collect(),
        iops_title: format!("IOPS (thousands), {mode}"),
        cpu_title: "CPU µs per op (daemon; fio: its own)",
    };
    let stem = if args.direct { "blk-direct" } else { "blk" };
    write_report(&args.out, stem, &md, &chart, &rows)
}

/// Warm-up and measured window: about 3 s a point, 1 s with `quick`; `seconds` sets the window.
pub(crate) fn windows(quick: bool, seconds: Option<f64>) -> Result<(Duration, Duration), String> {
    let (warmup, mut window) = if quick {
        (Duration::from_millis(200), Duration::from_secs(1))
    } else {
        (Duration::from_millis(500), Duration::from_secs(3))
    };
    if let Some(s) = seconds {
        window = Duration::try_from_secs_f64(s).map_err(|e| format!("--seconds {s}: {e}"))?;
    }
    Ok((warmup, window))
}

/// The chart of a blk report: workload names, one series per `(name, color, target)`, and the
/// titles of the IOPS and CPU panels.
pub(crate) struct ChartSpec<'a, T> {
    pub names: Vec<String>,
    pub series: Vec<(&'a str, (u8, u8, u8), T)>,
    pub iops_title: String,
    pub cpu_title: &'a str,
}

/// Print the markdown report, write it to `out/stem.md` and the chart to `out/stem.png`; an
/// error afterwards if any measurement failed.
pub(crate) fn write_report<T: PartialEq + Copy>(
    out: &Path,
    stem: &str,
    md: &str,
    chart: &ChartSpec<'_, T>,
    rows: &[Row<T>],
) -> Result<(), String> {
    println!("{md}");
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let md_path = out.join(format!("{stem}.md"));
    std::fs::write(&md_path, md).map_err(|e| format!("write {}: {e}", md_path.display()))?;
    let png_path = out.join(format!("{stem}.png"));
    let panels = panels(
        &chart.series,
        chart.names.len(),
        rows,
        &chart.iops_title,
        chart.cpu_title,
    );
    chart::draw(&png_path, &chart.names, &panels)?;
    eprintln!("wrote {} and {}", md_path.display(), png_path.display());
    let failures = rows.iter().filter(|r| r.result.is_err()).count();
    if failures > 0 {
        return Err(format!("{failures} measurements failed (see the report)"));
    }
    Ok(())
}

/// Check that every tool is there before spending minutes; returns the vdisk binary.
fn preflight(args: &Args, targets: &[Target]) -> Result<Option<PathBuf>, String> {
    let mut vdisk = None;
    if targets.contains(&Target::Vdisk) {
        vdisk = Some(find_vdisk(
            args.vdisk.as_deref(),
            "leave it out with --targets qsd,fio",
        )?);
    }
    if targets.contains(&Target::Qsd) && !daemon::on_path("qemu-storage-daemon") {
        return Err(
            "qemu-storage-daemon not found on PATH: `apt-get install -y qemu-utils` \
                    (or leave it out with --targets)"
                .to_string(),
        );
    }
    if targets.contains(&Target::Fio) && !daemon::on_path("fio") {
        return Err(
            "fio not found on PATH: `apt-get install -y fio` (or leave it out with --targets)"
                .to_string(),
        );
    }
    Ok(vdisk)
}

/// The vdisk binary to measure: `arg`, else `vdisk` next to this runner; checked to serve.
/// `leave_out` tells how to run without it.
pub(crate) fn find_vdisk(arg: Option<&Path>, leave_out: &str) -> Result<PathBuf, String> {
    let path = match arg {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("current_exe: {e}"))?
            .with_file_name("vdisk"),
    };
    if !path.is_file() {
        return Err(format!(
            "vdisk binary not found at {}: build it with `cargo build --release -p vdisk` \
             (or pass --vdisk PATH, or {leave_out})",
            path.display()
        ));
    }
    let ok = Command::new(&path)
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!(
            "`{} serve --help` failed: this vdisk cannot serve yet ({leave_out})",
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

/// Write `size` bytes of non-zero, non-repeating data (so nothing is sparse or compressible),
/// fsync it, and read it once so the buffered runs start page-cached.
fn create_image(path: &Path, size: u64) -> Result<(), String> {
    let e = |what: &str, err: std::io::Error| format!("{what} {}: {err}", path.display());
    let mut f = File::create(path).map_err(|err| e("create", err))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x0123_4567_89ab_cdefu64;
    let mut done = 0;
    while done < size {
        signals::check()?;
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = (size - done).min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).map_err(|err| e("write", err))?;
        done += n as u64;
    }
    f.sync_all().map_err(|err| e("fsync", err))?;
    drop(f);
    let mut f = File::open(path).map_err(|err| e("open", err))?;
    std::io::copy(&mut f, &mut std::io::sink()).map_err(|err| e("read", err))?;
    Ok(())
}

/// Start daemon `t` on `image` with `nq` queues and connect a client to it.
#[allow(clippy::too_many_arguments)]
fn start(
    t: Target,
    vdisk: Option<&Path>,
    image: &Path,
    dir: &Path,
    nq: usize,
    direct: bool,
    poll: bool,
    region: usize,
) -> Result<(DaemonProc, Client), String> {
    let socket = dir.join(format!("{}-{nq}.sock", t.name()));
    let log = dir.join(format!("{}-{nq}.log", t.name()));
    let export = Export {
        image,
        format: ImageFormat::Raw,
        socket: &socket,
        nq,
        direct,
    };
    let cmd = match t {
        Target::Vdisk => export.vdisk(vdisk.ok_or("no vdisk binary")?),
        Target::Qsd => export.qsd(),
        Target::Fio => return Err("fio is not a daemon".to_string()),
    };
    launch(t.name(), cmd, &socket, &log, nq, poll, region)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ImageFormat {
    Raw,
    Qcow2,
}

/// What a daemon exports: `image` in `format` on `socket` with `nq` queues.
pub(crate) struct Export<'a> {
    pub image: &'a Path,
    pub format: ImageFormat,
    pub socket: &'a Path,
    pub nq: usize,
    pub direct: bool,
}

impl Export<'_> {
    /// `vdisk serve` for this export.
    pub fn vdisk(&self, vdisk: &Path) -> Command {
        let mut c = Command::new(vdisk);
        c.arg("serve")
            .arg("--image")
            .arg(self.image)
            .arg("--format")
            .arg(match self.format {
                ImageFormat::Raw => "raw",
                ImageFormat::Qcow2 => "qcow2",
            })
            .arg("--socket")
            .arg(self.socket)
            .arg("--num-queues")
            .arg(self.nq.to_string());
        if self.direct {
            c.arg("--direct");
        }
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "warn");
        }
        c
    }

    /// qemu-storage-daemon for this export: the file node (io_uring), a qcow2 node on it
    /// for qcow2, exported as vhost-user-blk.
    pub fn qsd(&self) -> Command {
        let mut c = Command::new("qemu-storage-daemon");
        c.arg("--blockdev").arg(format!(
            "driver=file,node-name=f0,filename={},aio=io_uring,locking=off{}",
            self.image.display(),
            if self.direct { ",cache.direct=on" } else { "" }
        ));
        let node = match self.format {
            ImageFormat::Raw => "f0",
            ImageFormat::Qcow2 => {
                c.arg("--blockdev").arg("driver=qcow2,node-name=q0,file=f0");
                "q0"
            }
        };
        c.arg("--export").arg(format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},\
             writable=on,num-queues={}",
            self.socket.display(),
            self.nq
        ));
        c
    }
}

/// Spawn a daemon (output in `log`), wait for `socket`, and connect a client with `nq` queues
/// and a buffer region of `region` bytes.
pub(crate) fn launch(
    name: &str,
    cmd: Command,
    socket: &Path,
    log: &Path,
    nq: usize,
    poll: bool,
    region: usize,
) -> Result<(DaemonProc, Client), String> {
    let d = DaemonProc::spawn(name, cmd, socket, log)?;
    let c =
        Client::connect(socket, nq, poll, region).map_err(|e| format!("{e}\n{}", d.log_tail()))?;
    Ok((d, c))
}

/// One measured window against a daemon, with its CPU time sampled at both ends.
pub(crate) fn measure(
    d: &mut DaemonProc,
    c: &mut Client,
    wl: &Workload,
    threads: usize,
    warmup: Duration,
    window: Duration,
) -> Result<Measurement, String> {
    if let Some(why) = d.exited() {
        return Err(why);
    }
    let (mut cpu0, mut cpu1) = (Duration::ZERO, Duration::ZERO);
    let load = c.run(
        wl,
        threads,
        warmup,
        window,
        &mut || {
            cpu0 = d.cpu_time()?;
            Ok(())
        },
        &mut || {
            cpu1 = d.cpu_time()?;
            Ok(())
        },
    );
    let load = match load {
        Ok(l) => l,
        Err(e) => {
            return Err(match d.exited() {
                Some(why) => format!("{e}; {why}"),
                None => e,
            })
        }
    };
    if load.ops == 0 {
        return Err("no operation completed in the window".to_string());
    }
    let secs = load.elapsed.as_secs_f64();
    let ops = load.ops as f64;
    let mean = load.lat_ns.iter().map(|&l| l as f64).sum::<f64>() / ops;
    let p99 = load.lat_ns[((load.lat_ns.len() - 1) as f64 * 0.99) as usize] as f64;
    Ok(Measurement {
        iops: ops / secs,
        mib_s: load.bytes as f64 / secs / (1024.0 * 1024.0),
        lat_mean_us: mean / 1000.0,
        lat_p99_us: p99 / 1000.0,
        cpu_us_per_op: (cpu1.saturating_sub(cpu0)).as_secs_f64() * 1e6 / ops,
        ops_all: load.total_ops,
        cut_short: load.exhausted.then_some(secs),
    })
}

pub(crate) fn find<T: PartialEq>(rows: &[Row<T>], wl: usize, t: T) -> Option<&Measurement> {
    rows.iter()
        .find(|r| r.workload == wl && r.target == t)
        .and_then(|r| r.result.as_ref().ok())
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_string(),
    }
}

fn markdown(meta: &Meta, wls: &[Workload], targets: &[Target], rows: &[Row<Target>]) -> String {
    let mut s = String::new();
    let mode = if meta.direct {
        "O_DIRECT"
    } else {
        "buffered, page-cached"
    };
    let _ = writeln!(
        s,
        "# vhost-user-blk: vdisk vs qemu-storage-daemon vs fio ({mode})\n"
    );
    let _ = writeln!(
        s,
        "Generated by `cargo run --release -p benches -- blk{}{}`. Raw image of {} MiB on {} ({}), \
         {}. Kernel {}, {} ({} CPUs). Each point: {:.1} s warm-up, then {:.1} s measured; all \
         targets measured in the same run, one after the other per workload.\n",
        if meta.direct { " --direct" } else { "" },
        if meta.window < Duration::from_secs(2) { " --quick" } else { "" },
        meta.size_mib,
        meta.dir.display(),
        meta.fs,
        if meta.direct {
            "opened with O_DIRECT by every target (vdisk --direct, qsd cache.direct=on, fio --direct=1)"
        } else {
            "read once beforehand so it is in the page cache"
        },
        meta.kernel,
        meta.cpu,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        meta.warmup.as_secs_f64(),
        meta.window.as_secs_f64(),
    );
    let _ =
        writeln!(
        s,
        "- vdisk and qsd are driven by the same client: libblkio 0.5.1 (`virtio-blk-vhost-user`), \
         {} queues, `QD` requests in flight per queue, {}.",
        if meta.poll { "busy-polling" } else { "interrupt-driven (eventfd)" },
        if meta.poll {
            format!("{} load thread(s) for all queues", meta.client_threads)
        } else {
            "one load thread per queue".to_string()
        }
    );
    let _ = writeln!(
        s,
        "- qsd: `--blockdev driver=file,aio=io_uring{}` exported as vhost-user-blk with the same \
         `num-queues`. fio: `--ioengine=io_uring --invalidate=0 --direct={}` on the image file, \
         one job per queue at the same QD: the ceiling without any vhost-user hop.",
        if meta.direct { ",cache.direct=on" } else { "" },
        u8::from(meta.direct)
    );
    let _ = writeln!(
        s,
        "- CPU µs/op: the daemon's utime+stime (from /proc/PID/stat, all threads) over the \
         measured window divided by the operations completed in it; for fio, the same sampling \
         of the fio process (all its threads, io_uring workers included), since fio generates \
         the load and does the I/O in one process. The client's polling CPU is not counted. \
         Latency: submission to completion as the client sees it (fio: its total latency).",
    );
    for (t, v) in &meta.versions {
        let _ = writeln!(s, "- {}: {}", t.name(), v);
    }
    let names: Vec<&str> = wls.iter().map(|w| w.name.as_str()).collect();
    let targets: Vec<(&str, Target)> = targets.iter().map(|&t| (t.name(), t)).collect();
    results_table(&mut s, &names, &targets, rows, "", &|_, _| String::new());
    let _ = writeln!(s, "\n## Ratios\n");
    let _ = writeln!(
        s,
        "Above 1 means vdisk does more IOPS (or has more latency / spends more CPU per op) than the peer.\n"
    );
    let _ = writeln!(
        s,
        "| workload | IOPS vdisk/qsd | IOPS vdisk/fio | IOPS qsd/fio | mean lat vdisk/qsd | CPU/op vdisk/qsd | CPU/op vdisk/fio |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for (i, wl) in wls.iter().enumerate() {
        let get = |t: Target, f: fn(&Measurement) -> f64| find(rows, i, t).map(f);
        let iops = |m: &Measurement| m.iops;
        let lat = |m: &Measurement| m.lat_mean_us;
        let cpu = |m: &Measurement| m.cpu_us_per_op;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            wl.name,
            ratio(get(Target::Vdisk, iops), get(Target::Qsd, iops)),
            ratio(get(Target::Vdisk, iops), get(Target::Fio, iops)),
            ratio(get(Target::Qsd, iops), get(Target::Fio, iops)),
            ratio(get(Target::Vdisk, lat), get(Target::Qsd, lat)),
            ratio(get(Target::Vdisk, cpu), get(Target::Qsd, cpu)),
            ratio(get(Target::Vdisk, cpu), get(Target::Fio, cpu)),
        );
    }
    if !meta.exits.is_empty() {
        let _ = writeln!(s, "\n## Shutdown\n");
        for e in &meta.exits {
            let _ = writeln!(s, "- {}", e.lines().next().unwrap_or(""));
        }
    }
    s
}

pub(crate) const VDISK_COLOR: (u8, u8, u8) = (31, 119, 180);
pub(crate) const QSD_COLOR: (u8, u8, u8) = (255, 127, 14);
pub(crate) const GREY: (u8, u8, u8) = (140, 140, 140);

/// The panels of a blk chart: IOPS, CPU per op and mean latency over `n` workloads, one
/// series per `(name, color, target)`.
pub(crate) fn panels<T: PartialEq + Copy>(
    series: &[(&str, (u8, u8, u8), T)],
    n: usize,
    rows: &[Row<T>],
    iops_title: &str,
    cpu_title: &str,
) -> Vec<chart::Panel> {
    let make = |f: fn(&Measurement) -> f64| -> Vec<chart::Series> {
        series
            .iter()
            .map(|&(name, color, t)| chart::Series {
                name: name.to_string(),
                color,
                values: (0..n).map(|i| find(rows, i, t).map(f)).collect(),
            })
            .collect()
    };
    vec![
        chart::Panel {
            title: iops_title.to_string(),
            series: make(|m| m.iops / 1000.0),
        },
        chart::Panel {
            title: cpu_title.to_string(),
            series: make(|m| m.cpu_us_per_op),
        },
        chart::Panel {
            title: "mean latency (µs)".to_string(),
            series: make(|m| m.lat_mean_us),
        },
    ]
}

/// The end of a progress line (the point's name is already printed).
pub(crate) fn progress(result: &Result<Measurement, String>) {
    match result {
        Ok(m) => eprintln!(
            "{:>9.0} IOPS {:>8.1} MiB/s {:>8.1} us {:>7.2} CPU us/op",
            m.iops, m.mib_s, m.lat_mean_us, m.cpu_us_per_op
        ),
        Err(e) => eprintln!("FAILED: {}", e.lines().next().unwrap_or("")),
    }
}

/// The results table, after a blank line: a row per workload and measured `(name, target)`
/// with IOPS, MiB/s, latencies and CPU µs/op, then a column `extra` (none if empty) whose
/// cell for (workload index, target) `cell` gives.
pub(crate) fn results_table<T: PartialEq + Copy>(
    s: &mut String,
    workloads: &[&str],
    targets: &[(&str, T)],
    rows: &[Row<T>],
    extra: &str,
    cell: &dyn Fn(usize, T) -> String,
) {
    let (head, rule) = if extra.is_empty() {
        (String::new(), "")
    } else {
        (format!(" {extra} |"), "---:|")
    };
    let _ = writeln!(
        s,
        "\n| workload | target | IOPS | MiB/s | mean lat (µs) | p99 lat (µs) | CPU µs/op |{head}"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|{rule}");
    for (i, workload) in workloads.iter().enumerate() {
        for &(target, t) in targets {
            let Some(r) = rows.iter().find(|r| r.workload == i && r.target == t) else {
                continue;
            };
            let _ = match &r.result {
                Ok(m) => write!(
                    s,
                    "| {workload} | {target} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} |",
                    m.iops, m.mib_s, m.lat_mean_us, m.lat_p99_us, m.cpu_us_per_op
                ),
                Err(e) => {
                    let e = e.lines().next().unwrap_or("").replace('|', "/");
                    write!(s, "| {workload} | {target} | failed: {e} | | | | |")
                }
            };
            if !extra.is_empty() {
                let _ = write!(s, " {} |", cell(i, t));
            }
            let _ = writeln!(s);
        }
    }
}

pub(crate) fn fs_type(dir: &Path) -> String {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return "unknown fs".to_string();
    };
    // SAFETY: statfs writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown fs".to_string();
    }
    match st.f_type {
        0xEF53 => "ext4".to_string(),
        0x5846_5342 => "xfs".to_string(),
        0x9123_683E => "btrfs".to_string(),
        0x0102_1994 => "tmpfs".to_string(),
        0x794c_7630 => "overlayfs".to_string(),
        other => format!("fs magic {other:#x}"),
    }
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_sums_jobs() {
        let wl = &workloads()[5];
        let job = |iops: f64, ios: u64, lat: f64| {
            format!(
                r#"{{"error":0,"usr_cpu":10.0,"sys_cpu":40.0,
                "read":{{"iops":{iops},"bw_bytes":{},"total_ios":{ios},"runtime":2000,
                "lat_ns":{{"mean":{lat},"percentile":{{"99.000000":9000}}}}}}}}"#,
                iops * 4096.0
            )
        };
        let json = format!(
            "fio: some warning\n{{\"jobs\":[{},{}]}}",
            job(1000.0, 2000, 1000.0),
            job(3000.0, 6000, 3000.0)
        );
        let m = fio::parse(&json, wl).expect("parse");
        assert_eq!(m.iops, 4000.0);
        assert!((m.mib_s - 4000.0 * 4096.0 / 1048576.0).abs() < 1e-9);
        // (1000*2000 + 3000*6000) / 8000 ns = 2.5 us
        assert!((m.lat_mean_us - 2.5).abs() < 1e-9);
        assert!((m.lat_p99_us - 9.0).abs() < 1e-9);
        // 2 jobs x 50% of 2 s = 2 s CPU over 8000 ops = 250 us/op
        assert!((m.cpu_us_per_op - 250.0).abs() < 1e-9);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50");
        assert_eq!(ratio(None, Some(2.0)), "–");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "–");
    }
}
