//! I/O engines: how a validated request reaches the image file.
//!
//! Both engines take operations tagged with a request slot and hand back completions
//! carrying the same tag, so every request completes exactly once whatever happens to
//! its I/O. `uring` batches a whole ring's worth of operations per `io_uring_enter` and
//! reads/writes straight between the file and guest memory; `sync` performs each
//! operation with a blocking syscall and is the fallback where io_uring is unavailable.

use std::io;
use std::os::fd::RawFd;

use crate::image::RawImage;

mod sync;
mod uring;

pub use self::sync::SyncEngine;
pub use self::uring::UringEngine;

/// One operation on the image. Results follow the kernel's convention: bytes transferred,
/// or a negative errno.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    Read {
        offset: u64,
        iovecs: &'a [libc::iovec],
    },
    Write {
        offset: u64,
        iovecs: &'a [libc::iovec],
        /// Write-through: durable before it completes (the guest turned the cache off).
        dsync: bool,
    },
    /// fdatasync.
    Flush,
    /// fallocate(2) with `mode` (punch hole or zero range, always KEEP_SIZE).
    Fallocate { offset: u64, len: u64, mode: i32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub result: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    #[value(name = "io_uring")]
    #[serde(rename = "io_uring")]
    IoUring,
    Sync,
}

pub enum Engine {
    Uring(Box<UringEngine>),
    Sync(SyncEngine),
}

impl Engine {
    /// Build the engine asked for; io_uring falls back to sync when the kernel refuses it.
    pub fn new(kind: EngineKind, image: &RawImage, entries: u32) -> Engine {
        let fd = image.raw_fd();
        match kind {
            EngineKind::Sync => Engine::Sync(SyncEngine::new(fd)),
            EngineKind::IoUring => match UringEngine::new(fd, entries, !image.nowait_writes()) {
                Ok(e) => Engine::Uring(Box::new(e)),
                Err(e) => {
                    tracing::warn!("io_uring is not available ({e}); using the sync engine");
                    Engine::Sync(SyncEngine::new(fd))
                }
            },
        }
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::IoUring,
            Engine::Sync(_) => EngineKind::Sync,
        }
    }

    /// Queue `op`; its completion will carry `tag`.
    ///
    /// # Safety
    /// The iovecs in `op`, and the memory they describe, must stay valid until the
    /// completion for `tag` has been reaped.
    pub unsafe fn queue(&mut self, tag: u64, op: Op<'_>) -> io::Result<()> {
        match self {
            // SAFETY: forwarded contract.
            Engine::Uring(e) => unsafe { e.queue(tag, op) },
            Engine::Sync(e) => {
                e.run(tag, op);
                Ok(())
            }
        }
    }

    /// Hand everything queued to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.submit(),
            Engine::Sync(_) => Ok(()),
        }
    }

    /// Block until at least one completion is ready (used only when draining).
    pub fn wait(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.wait(),
            Engine::Sync(_) => Ok(()),
        }
    }

    /// Move every ready completion into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        match self {
            Engine::Uring(e) => e.reap(out),
            Engine::Sync(e) => e.reap(out),
        }
    }

    /// Whether completions are waiting to be reaped (cheap: no syscall).
    pub fn has_completions(&mut self) -> bool {
        match self {
            Engine::Uring(e) => e.has_completions(),
            Engine::Sync(_) => false,
        }
    }

    /// The fd that becomes readable when completions arrive asynchronously.
    pub fn completion_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(e) => Some(e.completion_fd()),
            Engine::Sync(_) => None,
        }
    }

    /// Reset the completion fd after it fired.
    pub fn clear_completion_fd(&self) {
        if let Engine::Uring(e) = self {
            e.clear_completion_fd();
        }
    }
}

/// Blocking transfer of `len` bytes at `offset`, resuming after short transfers. Shared
/// by the sync engine and the io_uring engine's short-completion path.
pub(crate) fn blocking_rw(
    fd: RawFd,
    write: bool,
    offset: u64,
    iovecs: &[libc::iovec],
    dsync: bool,
) -> i32 {
    transfer(fd, write, offset, iovecs, dsync, false)
}

/// Blocking read of `iovecs` at `offset` where the file may end early: what lies past its
/// end reads as zeros (the tail of a qcow2 cluster allocated at the end of the file).
pub(crate) fn blocking_read_zeros_past_eof(fd: RawFd, offset: u64, iovecs: &[libc::iovec]) -> i32 {
    transfer(fd, false, offset, iovecs, false, true)
}

fn transfer(
    fd: RawFd,
    write: bool,
    offset: u64,
    iovecs: &[libc::iovec],
    dsync: bool,
    zeros_past_eof: bool,
) -> i32 {
    let total: usize = iovecs.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    let mut iov: Vec<libc::iovec> = iovecs.to_vec();
    while done < total {
        let pos = offset + done as u64;
        // SAFETY: `iov` describes memory the caller guarantees is valid for the duration
        // of this call; the kernel only accesses it during the syscall.
        let n = unsafe {
            if write {
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                libc::pwritev2(
                    fd,
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    pos as libc::off_t,
                    flags,
                )
            } else {
                libc::preadv(
                    fd,
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    pos as libc::off_t,
                )
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return -err.raw_os_error().unwrap_or(libc::EIO);
        }
        if n == 0 {
            if !zeros_past_eof || write {
                // End of file before the request was satisfied: the image shrank under us.
                return -libc::EIO;
            }
            for v in &iov {
                // SAFETY: as for the read above: memory the caller guarantees is valid.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            done = total;
            break;
        }
        done += n as usize;
        iov = advance(&iov, n as usize);
    }
    done.min(i32::MAX as usize) as i32
}

/// Blocking execution of any operation; the sync engine's body.
pub(crate) fn blocking_op(fd: RawFd, op: Op<'_>) -> i32 {
    let ret = match op {
        Op::Read { offset, iovecs } => return blocking_rw(fd, false, offset, iovecs, false),
        Op::Write {
            offset,
            iovecs,
            dsync,
        } => return blocking_rw(fd, true, offset, iovecs, dsync),
        // SAFETY: fdatasync on an fd we own.
        Op::Flush => unsafe { libc::fdatasync(fd) },
        // SAFETY: fallocate on an fd we own with plain integer arguments.
        Op::Fallocate { offset, len, mode } => unsafe {
            libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t)
        },
    };
    if ret < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        0
    }
}

/// The iovecs that remain after `n` bytes were transferred.
pub(crate) fn advance(iovecs: &[libc::iovec], mut n: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iovecs.len());
    for v in iovecs {
        if n >= v.iov_len {
            n -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // SAFETY: n < iov_len, so the pointer stays inside the same buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(n).cast() },
            iov_len: v.iov_len - n,
        });
        n = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn reads_past_the_end_of_the_file() {
        let mut f = tempfile::tempfile().expect("temp file");
        std::io::Write::write_all(&mut f, &[7u8; 100]).expect("fill");
        let mut a = vec![0xaau8; 30];
        let mut b = vec![0xaau8; 270];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        assert_eq!(
            blocking_rw(f.as_raw_fd(), false, 50, &iov, false),
            -libc::EIO
        );
        assert_eq!(blocking_read_zeros_past_eof(f.as_raw_fd(), 50, &iov), 300);
        assert!(a.iter().all(|&x| x == 7));
        assert!(b[..20].iter().all(|&x| x == 7));
        assert!(b[20..].iter().all(|&x| x == 0));
    }
}
