//! The image file: positional reads and writes, fdatasync and hole punching, with errors
//! that name the file and the operation. Tracks the file length so metadata offsets can
//! be checked against it without a syscall.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::error::{Qcow2Error, Result};

#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    len: u64,
    /// fdatasync calls made, for tests of the write ordering.
    syncs: u64,
    punch_supported: bool,
    /// Tests of crash consistency record every change made to the file here.
    #[cfg(test)]
    pub(crate) journal: Option<Vec<Journaled>>,
}

/// One change to the image file, as the crash simulator of the tests replays it.
#[cfg(test)]
#[derive(Clone, Debug)]
pub(crate) enum Journaled {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
    Sync,
}

impl ImageFile {
    pub fn new(file: File, path: &Path) -> Result<ImageFile> {
        let len = file
            .metadata()
            .map_err(|source| io_err(path, "stat", source))?
            .len();
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            len,
            syncs: 0,
            punch_supported: true,
            #[cfg(test)]
            journal: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Read exactly `buf.len()` bytes of metadata; a short read means the image is
    /// truncated, which is corruption.
    pub fn read_meta(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| self.corrupt(format!("{what} at {offset:#x}: offset overflows")))?;
        if end > self.len {
            return Err(self.corrupt(format!(
                "{what} at {offset:#x}+{} lies past the end of the file ({} bytes)",
                buf.len(),
                self.len
            )));
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io_err(&self.path, &format!("read {what} at {offset:#x}"), e))
    }

    /// Read data; whatever lies past the end of the file reads as zeros.
    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&self.path, &format!("read at {pos:#x}"), e)),
            }
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, buf: &[u8], what: &str) -> Result<()> {
        #[cfg(test)]
        if let Some(j) = &mut self.journal {
            j.push(Journaled::Write {
                offset,
                data: buf.to_vec(),
            });
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io_err(&self.path, &format!("write {what} at {offset:#x}"), e))?;
        self.len = self.len.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Note that someone else (an io_uring write of guest data) extended the file.
    pub fn note_written(&mut self, end: u64) {
        self.len = self.len.max(end);
    }

    pub fn sync(&mut self) -> Result<()> {
        self.syncs += 1;
        #[cfg(test)]
        if let Some(j) = &mut self.journal {
            j.push(Journaled::Sync);
        }
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "fdatasync", e))
    }

    /// Give the blocks of a freed range back to the filesystem. Best effort: filesystems
    /// without hole punching keep the blocks, which only costs space.
    pub fn punch_hole(&mut self, offset: u64, len: u64) {
        if !self.punch_supported || offset >= self.len {
            return;
        }
        #[cfg(test)]
        if let Some(j) = &mut self.journal {
            j.push(Journaled::Punch { offset, len });
        }
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: fallocate on a descriptor we own; no memory is passed to the kernel.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                self.punch_supported = false;
            }
            tracing::debug!("{}: punch hole {offset:#x}+{len}: {e}", self.path.display());
        }
    }

    /// Bytes of storage the file occupies (st_blocks * 512).
    pub fn allocated_bytes(&self) -> Result<u64> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "stat", e))?;
        Ok(meta.blocks().saturating_mul(512))
    }

    pub fn corrupt(&self, what: String) -> Qcow2Error {
        Qcow2Error::Corrupt {
            path: self.path.clone(),
            what,
        }
    }
}

pub fn io_err(path: &Path, op: &str, source: io::Error) -> Qcow2Error {
    Qcow2Error::Io {
        path: path.to_path_buf(),
        op: op.to_string(),
        source,
    }
}
