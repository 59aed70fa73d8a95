//! `vdisk image create|info|check|convert` and `vdisk snapshot create|list|delete|revert`: offline
//! tools over [`crate::qcow2`]. Long operations show a progress bar on stderr when it is a
//! terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::open::Access;
use crate::qcow2::{self, Backing, OpenOptions, Qcow2, Qcow2Error};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Create a qcow2 image.
    Create(CreateArgs),
    /// Show an image's virtual size, allocation, cluster size, backing chain, snapshots.
    Info(InfoArgs),
    /// Check an image's refcounts and metadata; exit code 2 when corruption remains.
    Check(CheckArgs),
    /// Copy an image (raw or qcow2, backing chain flattened) into a new raw or qcow2 one;
    /// zero ranges stay unallocated.
    Convert(ConvertArgs),
}

/// Where backing files may live, for the commands that open a backing chain.
#[derive(Args, Debug, Default)]
pub struct ChainArgs {
    /// A directory besides the image's own where its backing files may live (the chain's
    /// files must be regular files inside one of them); repeat for more.
    #[arg(long = "backing-dir", value_name = "DIR")]
    pub backing_dirs: Vec<PathBuf>,
}

impl ChainArgs {
    fn opts(&self, read_only: bool) -> OpenOptions {
        OpenOptions {
            read_only,
            backing_dirs: self.backing_dirs.clone(),
            ..OpenOptions::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvertTo {
    Qcow2,
    Raw,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The source image, raw or qcow2.
    pub source: PathBuf,
    /// The source's format. `auto` reads its first bytes, and refuses a qcow2 source that
    /// names a backing file (a guest can write such a header into its raw disk): pin
    /// `qcow2` for a linked clone you made, `raw` for a raw disk [default: auto].
    #[arg(long = "format", value_enum, default_value = "auto")]
    pub source_format: crate::image::FormatKind,
    /// The new image; it must not exist.
    pub target: PathBuf,
    /// The new image's format.
    #[arg(long, value_enum, default_value = "qcow2")]
    pub to: ConvertTo,
    /// Cluster size of a qcow2 target.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub cluster_size: u64,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    pub path: PathBuf,
    /// Virtual size, with an optional K, M, G or T suffix (powers of 1024). Defaults to
    /// the backing file's size.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Cluster size in bytes (suffixes allowed), a power of two from 4K to 2M
    /// [default: 64K, or 4K with --dedupe].
    #[arg(long, value_parser = parse_size)]
    pub cluster_size: Option<u64>,
    /// Backing file (raw or qcow2, detected), read-only: the new image is a linked clone.
    #[arg(long)]
    pub backing: Option<PathBuf>,
    /// Deduplicate whole-cluster writes inline (marked in the image, so every `vdisk
    /// serve` of it does). 4 KiB clusters find the most duplicates.
    #[arg(long)]
    pub dedupe: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    pub path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Read the image even while another process writes it (a serving vdisk, QEMU), as
    /// `qemu-img info -U` does: what it shows may be out of date or inconsistent.
    #[arg(short = 'U', long)]
    pub force_share: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    pub path: PathBuf,
    /// Free leaked clusters, fix refcounts and COPIED flags, clear the dirty bit.
    #[arg(long)]
    pub repair: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take an internal snapshot.
    Create {
        image: PathBuf,
        name: String,
        #[command(flatten)]
        chain: ChainArgs,
    },
    /// List the snapshots.
    List {
        image: PathBuf,
        #[command(flatten)]
        chain: ChainArgs,
    },
    /// Delete a snapshot (by name, else by id), freeing what only it referenced.
    Delete {
        image: PathBuf,
        name: String,
        #[command(flatten)]
        chain: ChainArgs,
    },
    /// Return the image to a snapshot's state; the current state is lost.
    Revert {
        image: PathBuf,
        name: String,
        #[command(flatten)]
        chain: ChainArgs,
    },
}

/// "10G", "512m", "4096", "64K": bytes, binary multiples.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown size suffix {c:?} (K, M, G, T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (a number with an optional K/M/G/T)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {} ({n} bytes)", UNITS[u])
    }
}

/// A progress callback: a bar on stderr when it is a terminal, nothing otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(what: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {percent}% {elapsed_precise}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(what.to_string());
            bar
        });
        Progress { bar }
    }

    fn update(&mut self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

pub fn run_image(cmd: ImageCmd) -> Result<ExitCode, String> {
    match cmd {
        ImageCmd::Convert(a) => convert(&a),
        ImageCmd::Create(a) => create(a).map_err(|e| e.to_string()),
        ImageCmd::Info(a) => info(&a).map_err(|e| e.to_string()),
        ImageCmd::Check(a) => check(&a).map_err(|e| e.to_string()),
    }
}

fn create(a: CreateArgs) -> Result<ExitCode, Qcow2Error> {
    let size = match (a.size, &a.backing) {
        (Some(s), _) => s,
        (None, Some(b)) => Qcow2::backing_size(&a.path, b, &a.chain.backing_dirs)?,
        (None, None) => {
            return Err(Qcow2Error::Invalid {
                path: a.path.clone(),
                what: "give --size (or --backing to take its size)".into(),
            })
        }
    };
    let default_cs = if a.dedupe {
        qcow2::MIN_CLUSTER_SIZE
    } else {
        qcow2::DEFAULT_CLUSTER_SIZE
    };
    let cs = a.cluster_size.unwrap_or(default_cs);
    let mut img = Qcow2::create_with(
        &a.path,
        size,
        cs,
        a.backing.as_deref(),
        &a.chain.backing_dirs,
    )?;
    if a.dedupe {
        if let Err(e) = img.enable_dedupe(qcow2::DEFAULT_INDEX_BYTES) {
            drop(img);
            let _ = std::fs::remove_file(&a.path);
            return Err(e);
        }
    }
    let (vsize, cs) = (img.virtual_size(), img.cluster_size());
    img.close()?;
    println!(
        "Created {} (qcow2, virtual size {vsize}, cluster size {cs}{}{})",
        a.path.display(),
        a.backing
            .as_ref()
            .map(|b| format!(", backing file {}", b.display()))
            .unwrap_or_default(),
        if a.dedupe { ", dedupe on" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct ChainEntry {
    filename: String,
    format: &'static str,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

#[derive(serde::Serialize)]
struct Info {
    filename: String,
    format: &'static str,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "allocated-size")]
    allocated_size: u64,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    #[serde(rename = "backing-chain")]
    backing_chain: Vec<ChainEntry>,
    snapshots: usize,
    dirty: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    dedupe: Option<DedupeInfo>,
}

/// The dedupe state of an image at rest: sharing from a walk of its active tree; the
/// index and the running totals from the side file its last clean close wrote.
#[derive(serde::Serialize)]
struct DedupeInfo {
    #[serde(rename = "logical-bytes")]
    logical_bytes: u64,
    #[serde(rename = "physical-bytes")]
    physical_bytes: u64,
    ratio: f64,
    #[serde(rename = "index-entries")]
    index_entries: Option<u64>,
    #[serde(rename = "index-bytes")]
    index_bytes: Option<u64>,
    #[serde(rename = "logical-bytes-written")]
    logical_bytes_written: Option<u64>,
    #[serde(rename = "physical-bytes-written")]
    physical_bytes_written: Option<u64>,
    hits: Option<u64>,
    misses: Option<u64>,
    #[serde(rename = "zero-clusters")]
    zero_clusters: Option<u64>,
}

fn dedupe_info(img: &mut Qcow2) -> Result<Option<DedupeInfo>, Qcow2Error> {
    if !img.dedupe_marked() {
        return Ok(None);
    }
    let (logical, physical) = img.scan_sharing()?;
    let side = qcow2::side_header(img.path());
    Ok(Some(DedupeInfo {
        logical_bytes: logical,
        physical_bytes: physical,
        ratio: if physical == 0 {
            1.0
        } else {
            logical as f64 / physical as f64
        },
        index_entries: side.map(|h| h.entries),
        index_bytes: side.map(|h| h.slots * 4),
        logical_bytes_written: side.map(|h| h.logical_bytes_written),
        physical_bytes_written: side.map(|h| h.physical_bytes_written),
        hits: side.map(|h| h.hits),
        misses: side.map(|h| h.misses),
        zero_clusters: side.map(|h| h.zero_clusters),
    }))
}

fn info(a: &InfoArgs) -> Result<ExitCode, Qcow2Error> {
    let opts = OpenOptions {
        force_share: a.force_share,
        ..a.chain.opts(true)
    };
    let info = match Qcow2::open(&a.path, &opts) {
        Ok(mut img) => {
            let dedupe = dedupe_info(&mut img)?;
            let mut chain = Vec::new();
            let mut b: Option<&Backing> = img.backing();
            while let Some(x) = b {
                chain.push(ChainEntry {
                    filename: x.path().display().to_string(),
                    format: x.format(),
                    virtual_size: x.size(),
                });
                b = x.next();
            }
            Info {
                filename: a.path.display().to_string(),
                format: "qcow2",
                virtual_size: img.virtual_size(),
                allocated_size: img.allocated_bytes()?,
                cluster_size: Some(img.cluster_size()),
                backing_chain: chain,
                snapshots: img.list_snapshots().len(),
                dirty: img.is_dirty(),
                dedupe,
            }
        }
        Err(Qcow2Error::NotQcow2 { .. }) => {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&a.path).map_err(|source| Qcow2Error::Io {
                path: a.path.clone(),
                op: "stat".into(),
                source,
            })?;
            Info {
                filename: a.path.display().to_string(),
                format: "raw",
                virtual_size: meta.len(),
                allocated_size: meta.blocks() * 512,
                cluster_size: None,
                backing_chain: Vec::new(),
                snapshots: 0,
                dirty: false,
                dedupe: None,
            }
        }
        Err(e) => return Err(e),
    };
    if a.json {
        let text = serde_json::to_string_pretty(&info).unwrap_or_default();
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("image: {}", info.filename);
    println!("file format: {}", info.format);
    println!("virtual size: {}", human(info.virtual_size));
    println!("allocated size: {}", human(info.allocated_size));
    if let Some(cs) = info.cluster_size {
        println!("cluster size: {cs}");
    }
    for (i, b) in info.backing_chain.iter().enumerate() {
        println!("backing file [{i}]: {} (format {})", b.filename, b.format);
    }
    println!("snapshots: {}", info.snapshots);
    if info.dirty {
        println!("dirty: yes (refcounts may be stale: run `vdisk image check --repair`)");
    } else {
        println!("dirty: no");
    }
    if let Some(d) = &info.dedupe {
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        println!("dedupe: on");
        println!("  logical bytes: {}", human(d.logical_bytes));
        println!("  physical bytes: {}", human(d.physical_bytes));
        println!("  dedupe ratio: {:.2}", d.ratio);
        if d.index_entries.is_none() {
            println!("  index: none saved (the image was not closed cleanly, or never served)");
        }
        println!(
            "  index entries: {} ({} bytes of memory)",
            opt(d.index_entries),
            opt(d.index_bytes)
        );
        println!(
            "  written (logical/physical bytes): {} / {}",
            opt(d.logical_bytes_written),
            opt(d.physical_bytes_written)
        );
        println!(
            "  hits / misses / zero clusters: {} / {} / {}",
            opt(d.hits),
            opt(d.misses),
            opt(d.zero_clusters)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn check(a: &CheckArgs) -> Result<ExitCode, Qcow2Error> {
    let mut img = Qcow2::open(&a.path, &a.chain.opts(!a.repair))?;
    let mut p = Progress::new(if a.repair { "repairing" } else { "checking" });
    let report = img.check(a.repair, &mut |d, t| p.update(d, t))?;
    p.finish();
    for c in &report.corruptions {
        println!("ERROR: {c}");
    }
    println!(
        "{}: {} clusters in the file, {} referenced",
        a.path.display(),
        report.total_clusters,
        report.referenced_clusters
    );
    println!("{}", report.summary());
    if report.leaks > 0 && !a.repair {
        println!("leaked clusters waste space only; `--repair` frees them");
    }
    if report.copied_errors > report.copied_shared && !a.repair {
        println!(
            "stale COPIED flags on unshared clusters (a crash between a refcount and a flag \
             update leaves them) are harmless; `--repair` fixes them"
        );
    }
    img.close()?;
    if report.corruptions_remaining() {
        println!("corruption remains");
        return Ok(ExitCode::from(2));
    }
    println!("no corruption");
    Ok(ExitCode::SUCCESS)
}

/// Where convert reads: the guest view of a qcow2 image, or a raw file.
enum Source {
    Qcow2(Box<Qcow2>),
    Raw(std::fs::File),
}

impl Source {
    /// How many bytes from `offset` on (at most `len`) read as zeros without reading
    /// them (unallocated without a backing file, or zero clusters), else 0.
    fn known_zeros(&mut self, offset: u64, len: u64) -> Result<u64, Qcow2Error> {
        let Source::Qcow2(img) = self else {
            return Ok(0);
        };
        let ext = img.map(offset, len)?;
        let zeros = match ext.kind {
            qcow2::ExtentKind::Zero => true,
            qcow2::ExtentKind::Unallocated => img.backing().is_none(),
            qcow2::ExtentKind::Data { .. } => false,
        };
        Ok(if zeros { ext.len } else { 0 })
    }

    fn read(&mut self, offset: u64, buf: &mut [u8], path: &Path) -> Result<(), Qcow2Error> {
        match self {
            Source::Qcow2(img) => img.read(offset, buf),
            Source::Raw(f) => {
                use std::os::unix::fs::FileExt;
                f.read_exact_at(buf, offset)
                    .map_err(|source| Qcow2Error::Io {
                        path: path.to_path_buf(),
                        op: format!("read at {offset}"),
                        source,
                    })
            }
        }
    }
}

fn convert(a: &ConvertArgs) -> Result<ExitCode, String> {
    let io_err = |path: &Path, op: &str, source: std::io::Error| Qcow2Error::Io {
        path: path.to_path_buf(),
        op: op.to_string(),
        source,
    };
    let r: Result<(), Qcow2Error> = (|| {
        use crate::image::FormatKind;
        let opened = match a.source_format {
            FormatKind::Raw => Err(Qcow2Error::NotQcow2 {
                path: a.source.clone(),
            }),
            kind => Qcow2::open(
                &a.source,
                &OpenOptions {
                    // A probed image must not name a backing file: its bytes may be a
                    // guest's, pointing at another tenant's disk.
                    format_probed: kind == FormatKind::Auto,
                    ..a.chain.opts(true)
                },
            ),
        };
        let (mut src, size) = match opened {
            Ok(img) => {
                let size = img.virtual_size();
                (Source::Qcow2(Box::new(img)), size)
            }
            Err(Qcow2Error::NotQcow2 { .. }) if a.source_format != FormatKind::Qcow2 => {
                let f = crate::open::open_image(&a.source, false)?;
                crate::open::lock(&f, &a.source, Access::Read)?;
                let size = f
                    .metadata()
                    .map_err(|e| io_err(&a.source, "stat", e))?
                    .len();
                (Source::Raw(f), size)
            }
            Err(e) => return Err(e),
        };
        if a.target.exists() {
            return Err(Qcow2Error::Invalid {
                path: a.target.clone(),
                what: "already exists; convert writes a new image".to_string(),
            });
        }
        enum Target {
            Qcow2(Box<Qcow2>),
            Raw(std::fs::File),
        }
        let mut dst = match a.to {
            ConvertTo::Qcow2 => Target::Qcow2(Box::new(Qcow2::create(
                &a.target,
                size,
                a.cluster_size,
                None,
            )?)),
            ConvertTo::Raw => {
                let f = std::fs::File::create_new(&a.target)
                    .map_err(|e| io_err(&a.target, "create", e))?;
                crate::open::lock(&f, &a.target, Access::Write)?;
                f.set_len(size)
                    .map_err(|e| io_err(&a.target, "set size", e))?;
                Target::Raw(f)
            }
        };
        // Copy in steps of whole clusters, so that a qcow2 target allocates only what
        // holds data.
        let step = a.cluster_size.max(64 << 10).min(size.max(1));
        let mut buf = vec![0u8; step as usize];
        let mut p = Progress::new("converting");
        let mut pos = 0u64;
        while pos < size {
            let n = step.min(size - pos);
            let zeros = src.known_zeros(pos, n)?;
            if zeros > 0 {
                pos += zeros;
                p.update(pos, size);
                continue;
            }
            let chunk = &mut buf[..n as usize];
            src.read(pos, chunk, &a.source)?;
            if chunk.iter().any(|&b| b != 0) {
                match &mut dst {
                    Target::Qcow2(img) => img.write(pos, chunk)?,
                    Target::Raw(f) => {
                        use std::os::unix::fs::FileExt;
                        f.write_all_at(chunk, pos)
                            .map_err(|e| io_err(&a.target, "write", e))?;
                    }
                }
            }
            pos += n;
            p.update(pos, size);
        }
        p.finish();
        match dst {
            Target::Qcow2(img) => img.close(),
            Target::Raw(f) => f.sync_all().map_err(|e| io_err(&a.target, "fsync", e)),
        }
    })();
    r.map(|()| ExitCode::SUCCESS).map_err(|e| e.to_string())
}

pub fn run_snapshot(cmd: SnapshotCmd) -> Result<ExitCode, String> {
    let r: Result<(), Qcow2Error> = (|| match cmd {
        SnapshotCmd::Create { image, name, chain } => {
            let mut img = Qcow2::open(&image, &chain.opts(false))?;
            img.create_snapshot(&name)?;
            img.close()
        }
        SnapshotCmd::List { image, chain } => {
            let img = Qcow2::open(&image, &chain.opts(true))?;
            list(img.list_snapshots());
            Ok(())
        }
        SnapshotCmd::Delete { image, name, chain } => {
            let mut img = Qcow2::open(&image, &chain.opts(false))?;
            let mut p = Progress::new("deleting snapshot");
            img.delete_snapshot(&name, &mut |d, t| p.update(d, t))?;
            p.finish();
            img.close()
        }
        SnapshotCmd::Revert { image, name, chain } => {
            let mut img = Qcow2::open(&image, &chain.opts(false))?;
            img.revert_snapshot(&name)?;
            img.close()
        }
    })();
    r.map(|()| ExitCode::SUCCESS).map_err(|e| e.to_string())
}

fn list(snaps: &[qcow2::Snapshot]) {
    println!(
        "{:<6} {:<24} {:>20} {:>12}",
        "ID", "NAME", "DISK SIZE", "DATE (s)"
    );
    for s in snaps {
        println!(
            "{:<6} {:<24} {:>20} {:>12}",
            s.id, s.name, s.disk_size, s.date_sec
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
