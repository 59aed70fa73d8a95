//! Images: the file (a regular file or a block device) and its format, raw (addressed
//! byte for byte) or qcow2.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Open(#[from] crate::open::OpenError),
    #[error("cannot read image {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot share the descriptor of image {path}: {source}")]
    Dup { path: PathBuf, source: io::Error },
    #[error("cannot read the size of image {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("image {path} is smaller than one 512-byte sector")]
    TooSmall { path: PathBuf },
}

/// How guest offsets map to the image file.
pub enum Format {
    /// Guest offset = file offset.
    Raw,
    /// qcow2: its metadata, shared by the queue threads. Data moves between the file and
    /// guest memory through each queue's engine (reads) or inline (see `translate`).
    Qcow2(Box<std::sync::Mutex<crate::qcow2::Qcow2>>),
}

/// What `--format` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatKind {
    /// qcow2 if the file starts with the qcow2 magic, else raw.
    Auto,
    Raw,
    Qcow2,
}

/// Whether `file` (image `path`) starts with the qcow2 magic.
pub fn looks_like_qcow2(file: &File, path: &Path) -> Result<bool, ImageError> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == crate::qcow2::MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(source) => Err(ImageError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `file` shared: one more descriptor of the same open file description (same locks).
pub fn share(file: &File, path: &Path) -> Result<File, ImageError> {
    file.try_clone().map_err(|source| ImageError::Dup {
        path: path.to_path_buf(),
        source,
    })
}

#[derive(Debug)]
pub struct RawImage {
    /// What the engines read and write: a reopen of the image's descriptor (O_DIRECT with
    /// `--direct`), see [`crate::open::reopen`].
    file: File,
    /// The descriptor the image was opened and locked through: the locks last as long as
    /// its open file description.
    _opened: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    is_block_device: bool,
    /// Whether the kernel can take a buffered write without blocking (RWF_NOWAIT). Where
    /// it cannot (ext4 today), io_uring hands every buffered write to a worker thread.
    nowait_writes: bool,
}

impl RawImage {
    /// The image `opened` ([`crate::open::open_image`], and locked) holds, for the
    /// engines.
    pub fn new(
        opened: File,
        path: &Path,
        read_only: bool,
        direct: bool,
    ) -> Result<RawImage, ImageError> {
        let mut file = crate::open::reopen(&opened, path, !read_only, direct)?;
        let meta = file.metadata().map_err(|source| ImageError::Size {
            path: path.to_path_buf(),
            source,
        })?;
        let is_block_device = meta.file_type().is_block_device();
        // Seeking to the end gives the size of block devices as well as files.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| ImageError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if size < crate::request::SECTOR_SIZE {
            return Err(ImageError::TooSmall {
                path: path.to_path_buf(),
            });
        }
        let nowait_writes = direct || read_only || probe_nowait_write(&file);
        Ok(RawImage {
            file,
            _opened: opened,
            path: path.to_path_buf(),
            size,
            read_only,
            is_block_device,
            nowait_writes,
        })
    }

    pub fn nowait_writes(&self) -> bool {
        self.nowait_writes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes; a trailing partial sector is not exposed to the guest.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Make every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Zero `len` bytes at `offset` by writing zeros, for files whose filesystem does not
    /// support fallocate's zeroing modes.
    pub fn write_zeros_slow(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // Aligned so that O_DIRECT images accept it too.
        const CHUNK: usize = 1 << 20;
        let layout = std::alloc::Layout::from_size_align(CHUNK, 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size; the buffer is freed below on every path.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "zero buffer"));
        }
        // SAFETY: ptr is a live, zeroed allocation of CHUNK bytes owned by this function.
        let zeros = unsafe { std::slice::from_raw_parts(ptr, CHUNK) };
        let mut done = 0u64;
        let result = loop {
            if done >= len {
                break Ok(());
            }
            let n = (len - done).min(CHUNK as u64) as usize;
            if let Err(e) = self.file.write_all_at(&zeros[..n], offset + done) {
                break Err(e);
            }
            done += n as u64;
        };
        // SAFETY: allocated above with the same layout, and `zeros` is not used after this.
        unsafe { std::alloc::dealloc(ptr, layout) };
        result
    }

    #[cfg(test)]
    pub fn file_for_tests(&self) -> &File {
        &self.file
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// Rewrite the first sector with its own contents using RWF_NOWAIT: EOPNOTSUPP means the
/// filesystem has no non-blocking buffered write path. The rewrite changes no data.
fn probe_nowait_write(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut sector = [0u8; crate::request::SECTOR_SIZE as usize];
    if file.read_exact_at(&mut sector, 0).is_err() {
        return false;
    }
    let iov = libc::iovec {
        iov_base: sector.as_mut_ptr().cast(),
        iov_len: sector.len(),
    };
    // SAFETY: one iovec over a live stack buffer, valid for the duration of the call.
    let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
    if n >= 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
}
