//! `vdisk image create|info|check` and `vdisk snapshot create|list|delete|revert`: offline
//! tools over [`crate::qcow2`]. Long operations show a progress bar on stderr when it is a
//! terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::qcow2::{self, Backing, OpenOptions, Qcow2, Qcow2Error};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Create a qcow2 image.
    Create(CreateArgs),
    /// Show an image's virtual size, allocation, cluster size, backing chain, snapshots.
    Info(InfoArgs),
    /// Check an image's refcounts and metadata; exit code 2 when corruption remains.
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    pub path: PathBuf,
    /// Virtual size, with an optional K, M, G or T suffix (powers of 1024). Defaults to
    /// the backing file's size.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Cluster size in bytes (suffixes allowed), a power of two from 4K to 2M.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub cluster_size: u64,
    /// Backing file (raw or qcow2, detected), read-only: the new image is a linked clone.
    #[arg(long)]
    pub backing: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    pub path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    pub path: PathBuf,
    /// Free leaked clusters, fix refcounts and COPIED flags, clear the dirty bit.
    #[arg(long)]
    pub repair: bool,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take an internal snapshot.
    Create { image: PathBuf, name: String },
    /// List the snapshots.
    List { image: PathBuf },
    /// Delete a snapshot (by name, else by id), freeing what only it referenced.
    Delete { image: PathBuf, name: String },
    /// Return the image to a snapshot's state; the current state is lost.
    Revert { image: PathBuf, name: String },
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
        ImageCmd::Create(a) => create(a).map_err(|e| e.to_string()),
        ImageCmd::Info(a) => info(&a).map_err(|e| e.to_string()),
        ImageCmd::Check(a) => check(&a).map_err(|e| e.to_string()),
    }
}

fn create(a: CreateArgs) -> Result<ExitCode, Qcow2Error> {
    let size = match (a.size, &a.backing) {
        (Some(s), _) => s,
        (None, Some(b)) => Qcow2::backing_size(&a.path, b)?,
        (None, None) => {
            return Err(Qcow2Error::Invalid {
                path: a.path.clone(),
                what: "give --size (or --backing to take its size)".into(),
            })
        }
    };
    let img = Qcow2::create(&a.path, size, a.cluster_size, a.backing.as_deref())?;
    let (vsize, cs) = (img.virtual_size(), img.cluster_size());
    img.close()?;
    println!(
        "Created {} (qcow2, virtual size {vsize}, cluster size {cs}{})",
        a.path.display(),
        a.backing
            .as_ref()
            .map(|b| format!(", backing file {}", b.display()))
            .unwrap_or_default()
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
}

fn info(a: &InfoArgs) -> Result<ExitCode, Qcow2Error> {
    let info = match Qcow2::open(&a.path, &OpenOptions::read_only()) {
        Ok(img) => {
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
    Ok(ExitCode::SUCCESS)
}

fn check(a: &CheckArgs) -> Result<ExitCode, Qcow2Error> {
    let opts = OpenOptions {
        read_only: !a.repair,
        ..Default::default()
    };
    let mut img = Qcow2::open(&a.path, &opts)?;
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
    img.close()?;
    if report.corruptions_remaining() {
        println!("corruption remains");
        return Ok(ExitCode::from(2));
    }
    println!("no corruption");
    Ok(ExitCode::SUCCESS)
}

fn open_rw(path: &Path) -> Result<Qcow2, Qcow2Error> {
    Qcow2::open(path, &OpenOptions::default())
}

pub fn run_snapshot(cmd: SnapshotCmd) -> Result<ExitCode, String> {
    let r: Result<(), Qcow2Error> = (|| match cmd {
        SnapshotCmd::Create { image, name } => {
            let mut img = open_rw(&image)?;
            img.create_snapshot(&name)?;
            img.close()
        }
        SnapshotCmd::List { image } => {
            let img = Qcow2::open(&image, &OpenOptions::read_only())?;
            list(img.list_snapshots());
            Ok(())
        }
        SnapshotCmd::Delete { image, name } => {
            let mut img = open_rw(&image)?;
            let mut p = Progress::new("deleting snapshot");
            img.delete_snapshot(&name, &mut |d, t| p.update(d, t))?;
            p.finish();
            img.close()
        }
        SnapshotCmd::Revert { image, name } => {
            let mut img = open_rw(&image)?;
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
