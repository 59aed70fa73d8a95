//! `benches dedupe`: vdisk's inline dedupe, on and off, on the same workloads in the same
//! run, with qemu-storage-daemon (no dedupe) on the same qcow2 image as the peer, and the
//! index memory per TiB of unique data extrapolated from a run that fills a small index.
//!
//! Every point starts its daemon on a fresh copy of an empty 4 KiB-cluster image: made by
//! `vdisk image create --cluster-size 4K` (off, qsd) or `--dedupe` (on). The workloads are
//! 4 KiB random writes at QD32 of unique data, of 100% duplicate data (one of 1024 blocks)
//! and of a 50/50 mix, without flushes and with a flush every 256 writes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::daemon::{self, run_tool};
use super::qcow2::{allocated_bytes, cache, check_after, stop};
use super::{
    find, find_vdisk, launch, measure, progress, ratio, results_table, windows, write_report,
    ChartSpec, Data, Export, ImageFormat, Measurement, Op, Pattern, Row, Workload, DUP_POOL, GREY,
    QSD_COLOR, VDISK_COLOR,
};
use crate::signals;

#[derive(clap::Args)]
pub struct Args {
    /// About 1 s per measurement instead of about 3 s.
    #[arg(long)]
    quick: bool,
    /// Directory for dedupe.md and dedupe.png.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// The vdisk binary [default: `vdisk` next to this runner, i.e. target/release/vdisk].
    #[arg(long)]
    vdisk: Option<PathBuf>,
    /// Virtual size of the images the throughput points write to, MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Where to create the images [default: the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds per measured window (overrides --quick's and the default 3 s).
    #[arg(long)]
    seconds: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Off,
    On,
    Qsd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Off => "vdisk off",
            Target::On => "vdisk on",
            Target::Qsd => "qsd",
        }
    }

    fn stem(self) -> &'static str {
        match self {
            Target::Off => "off",
            Target::On => "on",
            Target::Qsd => "qsd",
        }
    }

    fn color(self) -> (u8, u8, u8) {
        match self {
            Target::Off => GREY,
            Target::On => VDISK_COLOR,
            Target::Qsd => QSD_COLOR,
        }
    }
}

const TARGETS: [Target; 3] = [Target::Off, Target::On, Target::Qsd];

/// Writes between flushes in the rows that flush.
const FLUSH_EVERY: u64 = 256;

fn workloads() -> Vec<Workload> {
    let w = |name: &str, data, flush_every| Workload {
        name: name.to_string(),
        op: Op::Write,
        pattern: Pattern::Random,
        bs: 4096,
        qd: 32,
        queues: 1,
        data,
        flush_every,
    };
    let f = FLUSH_EVERY;
    vec![
        w("unique", Data::Unique, 0),
        w("100% dup", Data::Duplicate, 0),
        w("50% dup", Data::Mixed(50), 0),
        w("unique, flushes", Data::Unique, f),
        w("100% dup, flushes", Data::Duplicate, f),
        w("50% dup, flushes", Data::Mixed(50), f),
    ]
}

/// What a point left behind besides its measurement.
#[derive(Default)]
struct Extra {
    /// Bytes the image file holds afterwards (st_blocks).
    stored: Option<u64>,
    /// `vdisk ctl stats` of a vdisk point, just before the daemon stopped.
    stats: Option<serde_json::Value>,
    /// The daemon's resident memory at the end, KiB.
    rss_kib: Option<u64>,
}

/// The run that fills a small index to measure its memory per entry.
struct IndexRun {
    budget_mib: u64,
    image_mib: u64,
    stats: serde_json::Value,
    writes: u64,
}

pub fn run(args: &Args) -> Result<(), String> {
    let (warmup, window) = windows(args.quick, args.seconds)?;
    let vdisk = find_vdisk(args.vdisk.as_deref(), "there is no dedupe run without it")?;
    for tool in ["qemu-img", "qemu-storage-daemon"] {
        if !daemon::on_path(tool) {
            return Err(format!(
                "{tool} not found on PATH: `apt-get install -y qemu-utils`"
            ));
        }
    }
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("vdisk-bench-dedupe-")
        .tempdir_in(&base)
        .map_err(|e| format!("create a temp dir in {}: {e}", base.display()))?;
    let dir = tmp.path();
    let size = args.size_mib << 20;
    let plain = dir.join("empty.qcow2");
    let dedupe = dir.join("empty-dedupe.qcow2");
    create(&vdisk, &plain, size, false)?;
    create(&vdisk, &dedupe, size, true)?;

    let wls = workloads();
    let region = 32 * 4096;
    let mut rows: Vec<Row<Target>> = Vec::new();
    let mut extras: Vec<(usize, Target, Extra)> = Vec::new();
    let mut notes = Vec::new();
    for (i, wl) in wls.iter().enumerate() {
        for t in TARGETS {
            signals::check()?;
            eprint!("{:<28} {:<17} ", wl.name, t.name());
            let src = if t == Target::On { &dedupe } else { &plain };
            let (result, extra) = point(
                &vdisk,
                src,
                dir,
                wl,
                t,
                &[],
                region,
                warmup,
                window,
                &mut notes,
            );
            progress(&result);
            rows.push(Row {
                workload: i,
                target: t,
                result,
            });
            extras.push((i, t, extra));
        }
    }

    signals::check()?;
    let index = index_run(&vdisk, dir, warmup, window, &mut notes)?;

    let md = markdown(args, &wls, &rows, &extras, &index, &notes, warmup, window);
    let chart = ChartSpec {
        names: wls.iter().map(|w| w.name.clone()).collect(),
        series: TARGETS.iter().map(|&t| (t.name(), t.color(), t)).collect(),
        iops_title: "IOPS (thousands), 4 KiB clusters, page-cached".to_string(),
        cpu_title: "CPU µs per op (daemon)",
    };
    write_report(&args.out, "dedupe", &md, &chart, &rows)
}

fn create(vdisk: &Path, path: &Path, size: u64, dedupe: bool) -> Result<(), String> {
    let mut c = Command::new(vdisk);
    c.args(["image", "create"])
        .arg(path)
        .arg(format!("--size={size}"))
        .arg("--cluster-size=4K");
    if dedupe {
        c.arg("--dedupe");
    }
    run_tool(&mut c).map(|_| ())
}

/// `vdisk ctl --json stats` on a serving daemon: its counters.
fn ctl_stats(vdisk: &Path, socket: &Path) -> Result<serde_json::Value, String> {
    let mut ctl = socket.as_os_str().to_owned();
    ctl.push(".ctl");
    let out = run_tool(
        Command::new(vdisk)
            .args(["ctl", "--socket"])
            .arg(&ctl)
            .args(["--json", "stats"]),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("vdisk ctl stats JSON: {e}: {out}"))?;
    Ok(v["counters"].clone())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One point: a fresh copy of `src`, the daemon on it (`extra_args` for vdisk), one measured
/// window, the counters and memory read, the daemon stopped, the image checked and removed.
#[allow(clippy::too_many_arguments)]
fn point(
    vdisk: &Path,
    src: &Path,
    dir: &Path,
    wl: &Workload,
    t: Target,
    extra_args: &[&str],
    region: usize,
    warmup: Duration,
    window: Duration,
    notes: &mut Vec<String>,
) -> (Result<Measurement, String>, Extra) {
    let mut extra = Extra::default();
    let image = dir.join(format!("point-{}.qcow2", t.stem()));
    let r = (|| {
        std::fs::copy(src, &image)
            .map_err(|e| format!("copy {} to {}: {e}", src.display(), image.display()))?;
        cache(&image)?;
        let socket = dir.join(format!("{}.sock", t.stem()));
        let log = dir.join(format!("{}.log", t.stem()));
        let export = Export {
            image: &image,
            format: ImageFormat::Qcow2,
            socket: &socket,
            nq: wl.queues,
            direct: false,
        };
        let cmd = match t {
            Target::Off | Target::On => {
                let mut c = export.vdisk(vdisk);
                c.args(extra_args);
                c
            }
            Target::Qsd => export.qsd(),
        };
        let (mut d, mut c) = launch(t.name(), cmd, &socket, &log, wl.queues, true, region)?;
        let m = measure(&mut d, &mut c, wl, 1, warmup, window);
        drop(c);
        extra.rss_kib = rss_kib(d.pid());
        if t != Target::Qsd {
            extra.stats = ctl_stats(vdisk, &socket).ok();
        }
        stop(d, &wl.name, notes);
        let m = m?;
        extra.stored = allocated_bytes(&image).ok();
        check_after(&image, &wl.name, t.name(), notes);
        Ok(m)
    })();
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(dir.join(format!("point-{}.qcow2.dedupe", t.stem())));
    (r, extra)
}

/// Fill a 1 MiB index (262,144 entries) with unique 4 KiB blocks, each written once in a
/// shuffled order, twice as many as it holds, so that nearly every bucket is full: its
/// bytes per entry at that fill are what a TiB of unique blocks would cost.
fn index_run(
    vdisk: &Path,
    dir: &Path,
    warmup: Duration,
    window: Duration,
    notes: &mut Vec<String>,
) -> Result<IndexRun, String> {
    const BUDGET_MIB: u64 = 1;
    let entries = (BUDGET_MIB << 20) / 4;
    let size = 2 * entries * 4096;
    let image = dir.join("index-fill.qcow2");
    create(vdisk, &image, size, true)?;
    let wl = Workload {
        name: "index fill (unique, each cluster once)".to_string(),
        op: Op::Write,
        pattern: Pattern::Stride {
            stride: 4096,
            shuffle: true,
        },
        bs: 4096,
        qd: 32,
        queues: 1,
        data: Data::Unique,
        flush_every: 0,
    };
    let socket = dir.join("fill.sock");
    let log = dir.join("fill.log");
    let export = Export {
        image: &image,
        format: ImageFormat::Qcow2,
        socket: &socket,
        nq: 1,
        direct: false,
    };
    let mut cmd = export.vdisk(vdisk);
    cmd.arg(format!("--dedupe-index-mib={BUDGET_MIB}"));
    eprint!("{:<46} ", wl.name);
    let (mut d, mut c) = launch("vdisk", cmd, &socket, &log, 1, true, 32 * 4096)?;
    // Long enough to write every cluster at a few tens of thousands of writes a second;
    // the window ends when they are all written.
    let m = measure(
        &mut d,
        &mut c,
        &wl,
        1,
        warmup.min(Duration::from_millis(100)),
        window.max(Duration::from_secs(60)),
    );
    progress(&m);
    drop(c);
    let stats = ctl_stats(vdisk, &socket);
    stop(d, &wl.name, notes);
    let m = m?;
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(dir.join("index-fill.qcow2.dedupe"));
    Ok(IndexRun {
        budget_mib: BUDGET_MIB,
        image_mib: size >> 20,
        stats: stats?,
        writes: m.ops_all,
    })
}

fn num(v: &serde_json::Value, k: &str) -> Option<f64> {
    v.get(k).and_then(serde_json::Value::as_f64)
}

#[allow(clippy::too_many_arguments)]
fn markdown(
    args: &Args,
    wls: &[Workload],
    rows: &[Row<Target>],
    extras: &[(usize, Target, Extra)],
    index: &IndexRun,
    notes: &[String],
    warmup: Duration,
    window: Duration,
) -> String {
    let mut s = String::new();
    let extra = |i: usize, t: Target| extras.iter().find(|(w, et, _)| *w == i && *et == t);
    let _ = writeln!(
        s,
        "# Inline dedupe: vdisk with dedupe on and off, and qemu-storage-daemon\n"
    );
    let _ = writeln!(
        s,
        "Generated by `cargo run --release -p benches -- dedupe{}`. Empty qcow2 images of {} \
         MiB with 4 KiB clusters made by `vdisk image create --cluster-size 4K` (dedupe off, \
         qsd) and `vdisk image create --dedupe` (on), a fresh copy per point, page-cached, on \
         {} ({}). Kernel {}, {}. Each point: {:.1} s warm-up, then {:.1} s measured; all \
         targets in the same run, one after the other per workload.\n",
        std::env::args()
            .skip_while(|a| a != "dedupe")
            .skip(1)
            .map(|a| format!(" {a}"))
            .collect::<String>(),
        args.size_mib,
        args.dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .display(),
        super::fs_type(&args.dir.clone().unwrap_or_else(std::env::temp_dir)),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        super::cpu_model(),
        warmup.as_secs_f64(),
        window.as_secs_f64(),
    );
    let _ = writeln!(
        s,
        "- Client: libblkio (`virtio-blk-vhost-user`), one busy-polling queue, 32 writes of \
         4 KiB in flight at random 4 KiB-aligned offsets. Unique: every block differs (a \
         random 64-bit stamp over a fixed pattern). 100% dup: every block is one of {DUP_POOL} \
         blocks, so after the first {DUP_POOL} every write repeats one already stored. 50% \
         dup: each write one or the other at random. The `flushes` rows send a flush after \
         every {FLUSH_EVERY} writes, as a guest filesystem's journal commits would (counted \
         as operations: {FLUSH_EVERY} writes and a flush are {} operations). Without \
         flushes vdisk with dedupe off never syncs: its writes stay in the page cache.\n\
         - vdisk: `vdisk serve --format qcow2`, its defaults (dedupe index 64 MiB). qsd: \
         `driver=file,aio=io_uring` + `driver=qcow2` exported as vhost-user-blk (no dedupe).\n\
         - CPU µs/op: the daemon's utime+stime over the window per completed write. Stored: \
         the image file's allocated bytes after the point. Ratio: vdisk's logical over \
         physical bytes of the image (`vdisk ctl stats`). RSS: the daemon's resident memory \
         at the end of the point. fdatasyncs: vdisk's syncs over the point.",
        FLUSH_EVERY + 1
    );
    let names: Vec<&str> = wls.iter().map(|w| w.name.as_str()).collect();
    let targets: Vec<(&str, Target)> = TARGETS.iter().map(|&t| (t.name(), t)).collect();
    results_table(
        &mut s,
        &names,
        &targets,
        rows,
        "stored MiB · ratio · RSS MiB · fdatasyncs",
        &|i, t| {
            let Some((_, _, e)) = extra(i, t) else {
                return String::new();
            };
            let stored = e
                .stored
                .map(|b| format!("{:.0}", b as f64 / 1048576.0))
                .unwrap_or_else(|| "–".into());
            let r = e
                .stats
                .as_ref()
                .and_then(|v| num(v, "dedupe_ratio"))
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "–".into());
            let rss = e
                .rss_kib
                .map(|k| format!("{:.0}", k as f64 / 1024.0))
                .unwrap_or_else(|| "–".into());
            let syncs = e
                .stats
                .as_ref()
                .and_then(|v| num(v, "metadata_syncs"))
                .map(|n| format!("{n:.0}"))
                .unwrap_or_else(|| "–".into());
            format!("{stored} · {r} · {rss} · {syncs}")
        },
    );

    let get = |i: usize, t: Target, f: fn(&Measurement) -> f64| find(rows, i, t).map(f);
    let iops = |m: &Measurement| m.iops;
    let cpu = |m: &Measurement| m.cpu_us_per_op;
    let _ = writeln!(s, "\n## Ratios\n");
    let _ = writeln!(
        s,
        "| workload | IOPS on/off | CPU/op on/off | IOPS on/qsd | CPU/op on/qsd | hits · misses · verify mismatches (on) |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
    for (i, w) in wls.iter().enumerate() {
        let (on, off, q) = (Target::On, Target::Off, Target::Qsd);
        let counts = extra(i, on)
            .and_then(|(_, _, e)| e.stats.as_ref())
            .map(|v| {
                let n = |k: &str| num(v, k).unwrap_or(0.0) as u64;
                format!(
                    "{} · {} · {}",
                    n("dedupe_hits"),
                    n("dedupe_misses"),
                    n("dedupe_verify_mismatches")
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {counts} |",
            w.name,
            ratio(get(i, on, iops), get(i, off, iops)),
            ratio(get(i, on, cpu), get(i, off, cpu)),
            ratio(get(i, on, iops), get(i, q, iops)),
            ratio(get(i, on, cpu), get(i, q, cpu)),
        );
    }

    let st = &index.stats;
    let entries = num(st, "dedupe_index_entries").unwrap_or(0.0);
    let capacity = num(st, "dedupe_index_capacity").unwrap_or(0.0);
    let bytes = num(st, "dedupe_index_bytes").unwrap_or(0.0);
    let per_entry = if entries > 0.0 { bytes / entries } else { 0.0 };
    let per_slot = if capacity > 0.0 {
        bytes / capacity
    } else {
        0.0
    };
    // A TiB of unique 4 KiB blocks is 2^28 entries: an index that holds them all has 2^28
    // slots.
    let gib = |per: f64| per * (1u64 << 28) as f64 / (1u64 << 30) as f64;
    let gib_per_tib = gib(per_slot);
    let fill = if capacity > 0.0 {
        100.0 * entries / capacity
    } else {
        0.0
    };
    let _ = writeln!(s, "\n## Index memory\n");
    let _ = writeln!(
        s,
        "`vdisk serve --dedupe-index-mib {}` on an empty dedupe image of {} MiB, every cluster \
         written once with unique data in a shuffled order ({} writes, twice what the index \
         holds): {:.0} bytes of index in {:.0} slots, {:.2} bytes a slot; {:.0} slots in use \
         at the end ({fill:.1}%, the buckets' oldest entries making room for new ones), \
         {:.2} bytes per entry in use. Extrapolated: an index holding the 2^28 blocks of a \
         TiB of unique 4 KiB data takes **{:.2} GiB** ({:.2} GiB at this run's {fill:.1}% \
         fill); VDO's dense index takes about 1 GB per TB. The shared-cluster map (clusters \
         referenced twice or more) holds {} clusters in {} bytes here.\n",
        index.budget_mib,
        index.image_mib,
        index.writes,
        bytes,
        capacity,
        per_slot,
        entries,
        per_entry,
        gib_per_tib,
        gib(per_entry),
        num(st, "dedupe_shared_clusters").unwrap_or(0.0),
        num(st, "dedupe_shared_map_bytes").unwrap_or(0.0),
    );

    let q = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let vs_off = |i: usize| q(get(i, Target::On, iops), get(i, Target::Off, iops));
    let mut goals: Vec<(String, Option<f64>, Option<bool>)> = Vec::new();
    for (i, w) in wls.iter().enumerate() {
        let v = vs_off(i);
        match w.data {
            Data::Unique => goals.push((
                format!("{}: dedupe on/off IOPS ≥ 0.7", w.name),
                v,
                v.map(|v| v >= 0.7),
            )),
            Data::Duplicate => goals.push((
                format!("{}: dedupe on/off IOPS > 1", w.name),
                v,
                v.map(|v| v > 1.0),
            )),
            _ => {}
        }
    }
    goals.push((
        "index GiB per TiB of unique 4 KiB blocks ≤ 1".to_string(),
        (capacity > 0.0).then_some(gib_per_tib),
        (capacity > 0.0).then_some(gib_per_tib <= 1.0),
    ));
    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(s, "| target | measured | met |");
    let _ = writeln!(s, "|---|---:|---|");
    for (what, v, met) in goals {
        let _ = writeln!(
            s,
            "| {what} | {} | {} |",
            v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into()),
            match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "not measured",
            }
        );
    }
    if !notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(s, "- {}", n.lines().next().unwrap_or(""));
        }
    }
    s
}
