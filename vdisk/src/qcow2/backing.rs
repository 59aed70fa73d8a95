//! The backing chain: raw or qcow2 files opened read-only, at most
//! [`MAX_BACKING_DEPTH`](super::MAX_BACKING_DEPTH) deep, loops detected by canonical path.

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
pub fn probe_format(image: &Path, name: &Path) -> Result<&'static str> {
    let path = resolve(image, name);
    let file =
        File::open(&path).map_err(|e| backing_err(image, format!("{}: {e}", path.display())))?;
    let mut magic = [0u8; 4];
    let is_qcow2 = file.read_exact_at(&mut magic, 0).is_ok() && magic == MAGIC;
    Ok(if is_qcow2 { "qcow2" } else { "raw" })
}

fn backing_err(image: &Path, what: String) -> Qcow2Error {
    Qcow2Error::Backing {
        path: image.to_path_buf(),
        what,
    }
}

/// Open the backing file `header` names, and its own chain. `seen` holds the canonical
/// paths of the images above it.
pub fn open(image: &Path, header: &Header, seen: &mut Vec<PathBuf>) -> Result<Option<Backing>> {
    // The image being created does not exist yet.
    let me = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    if seen.contains(&me) {
        return Err(backing_err(
            image,
            "the backing chain loops back to this image".into(),
        ));
    }
    seen.push(me);
    let Some(name) = &header.backing_file else {
        return Ok(None);
    };
    if seen.len() > MAX_BACKING_DEPTH {
        return Err(backing_err(
            image,
            format!("the backing chain is deeper than {MAX_BACKING_DEPTH} images"),
        ));
    }
    let path = resolve(image, Path::new(name));
    let format = match header.backing_format.as_deref() {
        Some("raw") => "raw",
        Some("qcow2") => "qcow2",
        Some(other) => {
            return Err(Qcow2Error::Unsupported {
                path: image.to_path_buf(),
                feature: format!("backing file format {other:?} (raw and qcow2 are supported)"),
            })
        }
        None => probe_format(image, Path::new(name))?,
    };
    let canonical = std::fs::canonicalize(&path)
        .map_err(|e| backing_err(image, format!("{}: {e}", path.display())))?;
    if seen.contains(&canonical) {
        return Err(backing_err(
            image,
            format!(
                "the backing chain loops: {} appears twice",
                canonical.display()
            ),
        ));
    }
    if format == "raw" {
        let file = File::open(&path)
            .map_err(|e| backing_err(image, format!("{}: {e}", path.display())))?;
        let size = file.metadata().map_err(|e| io_err(&path, "stat", e))?.len();
        return Ok(Some(Backing::Raw { file, path, size }));
    }
    let q = Qcow2::open_chain(&path, &OpenOptions::read_only(), seen)?;
    Ok(Some(Backing::Qcow2(Box::new(q))))
}
