//! The backing chain: raw or qcow2 files opened read-only, at most
//! [`MAX_BACKING_DEPTH`](super::MAX_BACKING_DEPTH) deep, loops detected by canonical path.
//! A backing file must be a regular file inside the top image's directory or one of the
//! extra directories allowed ([`OpenOptions::backing_dirs`]): the names come from image
//! headers, which whoever writes the image (a guest, for a disk it was given raw) chooses.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{Qcow2Error, Result};
use super::header::{Header, MAGIC};
use super::io::io_err;
use super::{OpenOptions, Qcow2, MAX_BACKING_DEPTH};

#[derive(Debug)]
pub enum Backing {
    Raw {
        file: File,
        path: PathBuf,
        size: u64,
    },
    Qcow2(Box<Qcow2>),
}

impl Backing {
    pub fn path(&self) -> &Path {
        match self {
            Backing::Raw { path, .. } => path,
            Backing::Qcow2(q) => q.path(),
        }
    }

    pub fn format(&self) -> &'static str {
        match self {
            Backing::Raw { .. } => "raw",
            Backing::Qcow2(_) => "qcow2",
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2(q) => q.virtual_size(),
        }
    }

    /// The next file of the chain, if any.
    pub fn next(&self) -> Option<&Backing> {
        match self {
            Backing::Raw { .. } => None,
            Backing::Qcow2(q) => q.backing(),
        }
    }

    /// Read at a guest offset; past the end of the backing file reads zeros.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Raw { file, path, .. } => {
                let mut done = 0;
                while done < head.len() {
                    match file.read_at(&mut head[done..], offset + done as u64) {
                        Ok(0) => {
                            head[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_err(path, "read", e)),
                    }
                }
                Ok(())
            }
            Backing::Qcow2(q) => q.read(offset, head),
        }
    }
}

/// Where a backing file name points: relative names are relative to the image's
/// directory.
pub fn resolve(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_path_buf();
    }
    image
        .parent()
        .map_or_else(|| name.to_path_buf(), |d| d.join(name))
}

/// "qcow2" when the file starts with the qcow2 magic, else "raw".
fn probe_format(file: &File) -> &'static str {
    let mut magic = [0u8; 4];
    let is_qcow2 = file.read_exact_at(&mut magic, 0).is_ok() && magic == MAGIC;
    if is_qcow2 {
        "qcow2"
    } else {
        "raw"
    }
}

fn backing_err(image: &Path, what: String) -> Qcow2Error {
    Qcow2Error::Backing {
        path: image.to_path_buf(),
        what,
    }
}

/// What the opening of one chain shares: where its backing files may live and which
/// images it holds already.
#[derive(Debug)]
pub struct Chain {
    /// Canonical directories: the top image's and the extra ones allowed.
    allowed: Vec<PathBuf>,
    /// Canonical paths of the images opened so far, top first.
    seen: Vec<PathBuf>,
}

impl Chain {
    /// The chain below `top`; backing files may live in `top`'s directory and in
    /// `extra_dirs`.
    pub fn new(top: &Path, extra_dirs: &[PathBuf]) -> Result<Chain> {
        let allowed =
            crate::open::allowed_dirs(top, extra_dirs).map_err(|e| Qcow2Error::Invalid {
                path: top.to_path_buf(),
                what: e.to_string(),
            })?;
        // The image being created does not exist yet.
        let me = std::fs::canonicalize(top).unwrap_or_else(|_| top.to_path_buf());
        Ok(Chain {
            allowed,
            seen: vec![me],
        })
    }
}

/// Open the backing file `header` names, and its own chain, in `chain`.
pub fn open(image: &Path, header: &Header, chain: &mut Chain) -> Result<Option<Backing>> {
    let Some(name) = &header.backing_file else {
        return Ok(None);
    };
    open_named(image, name, header.backing_format.as_deref(), chain).map(Some)
}

/// Open the backing file `image` names `name` (its format `format`, else probed), and its
/// own chain.
pub fn open_named(
    image: &Path,
    name: &str,
    format: Option<&str>,
    chain: &mut Chain,
) -> Result<Backing> {
    if chain.seen.len() > MAX_BACKING_DEPTH {
        return Err(backing_err(
            image,
            format!("the backing chain is deeper than {MAX_BACKING_DEPTH} images"),
        ));
    }
    let path = resolve(image, Path::new(name));
    let (file, canonical) = crate::open::open_confined(&path, &chain.allowed)
        .map_err(|e| backing_err(image, e.to_string()))?;
    if chain.seen.contains(&canonical) {
        return Err(backing_err(
            image,
            format!(
                "the backing chain loops: {} appears twice",
                canonical.display()
            ),
        ));
    }
    // Read and relied on: nobody may write it meanwhile (QEMU's rule for backing files).
    crate::open::lock(&file, &path, crate::open::Access::Read)
        .map_err(|e| backing_err(image, e.to_string()))?;
    let format = match format {
        Some("raw") => "raw",
        Some("qcow2") => "qcow2",
        Some(other) => {
            return Err(Qcow2Error::Unsupported {
                path: image.to_path_buf(),
                feature: format!("backing file format {other:?} (raw and qcow2 are supported)"),
            })
        }
        None => probe_format(&file),
    };
    if format == "raw" {
        let size = file.metadata().map_err(|e| io_err(&path, "stat", e))?.len();
        return Ok(Backing::Raw { file, path, size });
    }
    chain.seen.push(canonical);
    let q = Qcow2::open_in_chain(file, &path, &OpenOptions::read_only(), chain)?;
    Ok(Backing::Qcow2(Box::new(q)))
}
