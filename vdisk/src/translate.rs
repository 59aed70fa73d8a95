//! Requests on a qcow2 image: guest ranges translated into ranges of the image file.
//!
//! Reads are mapped under the image's metadata lock and then go through the queue's
//! engine like raw reads (io_uring straight into guest memory), one file read per
//! contiguous extent; zero and unallocated extents are filled here, from zeros or the
//! backing chain. Writes, flushes, discards and write-zeroes run inline under the lock:
//! allocation, copy-on-write and the L2 update must not interleave with another
//! request's, and ext4 makes buffered writes synchronous anyway (see `image.rs`).
//!
//! A write's data reaches the file before its mapping is installed (`prepare_write`,
//! pwritev from guest memory, `commit_write`), which is the ordering `qcow2` relies on.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};

use crate::qcow2::{ExtentKind, Qcow2, Qcow2Error, ReadPins};
use crate::request;

/// A read the engine does: `len` bytes at `host_offset` of the file into `iovecs[iov]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRead {
    pub host_offset: u64,
    pub iov: Range<usize>,
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error(transparent)]
    Image(#[from] Qcow2Error),
    #[error("{op} at file offset {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        source: std::io::Error,
    },
}

impl TranslateError {
    /// The errno the request fails with.
    pub fn errno(&self) -> i32 {
        match self {
            TranslateError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            TranslateError::Image(Qcow2Error::ReadOnly { .. }) => libc::EROFS,
            TranslateError::Image(_) => libc::EIO,
        }
    }
}

pub fn lock(q: &Mutex<Qcow2>) -> MutexGuard<'_, Qcow2> {
    match q.lock() {
        Ok(g) => g,
        // A panic elsewhere cannot leave the metadata half-updated in a way the next
        // flush would make worse than refusing to serve: keep going, as a crash would.
        Err(p) => p.into_inner(),
    }
}

/// Append to `out` the iovecs covering bytes `from..from + len` of `iovecs`.
fn slice_iovecs(iovecs: &[libc::iovec], from: usize, len: usize, out: &mut Vec<libc::iovec>) {
    let mut skip = from;
    let mut left = len;
    for v in iovecs {
        if left == 0 {
            break;
        }
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - skip).min(left);
        out.push(libc::iovec {
            // SAFETY: skip < iov_len, so the pointer stays inside the same buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(skip).cast() },
            iov_len: n,
        });
        left -= n;
        skip = 0;
    }
}

/// Copy `data` into `iovecs` (guest memory), from their start.
fn fill_iovecs(iovecs: &[libc::iovec], data: Option<&[u8]>) {
    let mut done = 0usize;
    for v in iovecs {
        // SAFETY: the iovecs come from `request::parse`, checked against the guest mapping
        // the caller holds for the duration of the request.
        unsafe {
            match data {
                Some(d) => std::ptr::copy_nonoverlapping(
                    d[done..done + v.iov_len].as_ptr(),
                    v.iov_base.cast::<u8>(),
                    v.iov_len,
                ),
                None => std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len),
            }
        }
        done += v.iov_len;
    }
}

/// The most a request copies through a buffer of ours at once (a dedupe write's bytes,
/// a read from the backing chain): a request may carry SEG_MAX x SIZE_MAX bytes, and the
/// buffer must not grow with what a guest sends.
const CHUNK: u64 = 1 << 20;

thread_local! {
    static GATHER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copy `iovecs` (guest memory) into `out`, which is as long as they are together.
fn gather_iovecs(iovecs: &[libc::iovec], out: &mut [u8]) {
    let mut done = 0usize;
    for v in iovecs {
        // SAFETY: as in `fill_iovecs`: the iovecs were checked against the guest mapping
        // the caller holds, and `out` holds their total length.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.iov_base.cast::<u8>(),
                out[done..done + v.iov_len].as_mut_ptr(),
                v.iov_len,
            );
        }
        done += v.iov_len;
    }
}

/// Make everything durable and keep what a clean close keeps (the dedupe index).
pub fn shutdown(q: &Mutex<Qcow2>) -> Result<(), TranslateError> {
    let mut image = lock(q);
    image.flush()?;
    image.save_dedupe_index();
    Ok(())
}

/// Map a read of `iovecs` at guest `offset`: zero and unallocated extents are filled now;
/// data extents are returned as file reads over `split` (which receives their iovecs),
/// their clusters pinned in `pins` until it drops, after the reads.
pub fn plan_read(
    q: &Mutex<Qcow2>,
    offset: u64,
    iovecs: &[libc::iovec],
    split: &mut Vec<libc::iovec>,
    reads: &mut Vec<FileRead>,
    pins: &mut Option<ReadPins>,
) -> Result<(), TranslateError> {
    let total: usize = iovecs.iter().map(|v| v.iov_len).sum();
    let mut image = lock(q);
    let mut done = 0usize;
    let mut piece = Vec::new();
    while done < total {
        let ext = image.map(offset + done as u64, (total - done) as u64)?;
        let n = ext.len as usize;
        match ext.kind {
            ExtentKind::Data { host_offset, .. } => {
                image.pin_read(host_offset, ext.len, pins);
                let first = split.len();
                slice_iovecs(iovecs, done, n, split);
                reads.push(FileRead {
                    host_offset,
                    iov: first..split.len(),
                    len: ext.len,
                });
            }
            ExtentKind::Zero => {
                piece.clear();
                slice_iovecs(iovecs, done, n, &mut piece);
                fill_iovecs(&piece, None);
            }
            ExtentKind::Unallocated if image.backing().is_some() => {
                let mut buf = Vec::new();
                let mut at = 0usize;
                while at < n {
                    let len = (n - at).min(CHUNK as usize);
                    buf.resize(len, 0);
                    image.read_backing(offset + (done + at) as u64, &mut buf)?;
                    piece.clear();
                    slice_iovecs(iovecs, done + at, len, &mut piece);
                    fill_iovecs(&piece, Some(&buf));
                    at += len;
                }
            }
            ExtentKind::Unallocated => {
                piece.clear();
                slice_iovecs(iovecs, done, n, &mut piece);
                fill_iovecs(&piece, None);
            }
        }
        done += n;
    }
    Ok(())
}

/// Finish a file read the engine cut short after `got` bytes: read on, and zero what
/// lies past the end of the file (the tail of a cluster allocated at the end).
pub fn finish_short_read(fd: i32, read: &FileRead, iovecs: &[libc::iovec], got: usize) -> i32 {
    let rest = crate::engine::advance(&iovecs[read.iov.clone()], got);
    let r = crate::engine::blocking_read_zeros_past_eof(fd, read.host_offset + got as u64, &rest);
    r.min(0)
}

/// Write `iovecs` at guest `offset`: allocate (with copy-on-write) what needs it, write the
/// data into the file, install the mapping; with `dsync` (write-through) make it durable.
pub fn write(
    q: &Mutex<Qcow2>,
    offset: u64,
    iovecs: &[libc::iovec],
    dsync: bool,
) -> Result<(), TranslateError> {
    let total: usize = iovecs.iter().map(|v| v.iov_len).sum();
    let mut image = lock(q);
    if image.dedupe_on() {
        // Dedupe decides where each cluster goes from its bytes: gather them first (into
        // this thread's buffer, kept between requests), a bounded chunk of whole
        // clusters at a time.
        let cs = image.cluster_size();
        let step = CHUNK.max(cs) / cs * cs;
        let end = offset + total as u64;
        let mut at = offset;
        let mut piece = Vec::new();
        while at < end {
            let next = (at / cs * cs + step).min(end);
            let len = (next - at) as usize;
            piece.clear();
            slice_iovecs(iovecs, (at - offset) as usize, len, &mut piece);
            GATHER.with_borrow_mut(|data| {
                data.resize(len, 0);
                gather_iovecs(&piece, data);
                image.write(at, data)
            })?;
            at = next;
        }
        if dsync {
            image.flush()?;
        }
        return Ok(());
    }
    let plan = image.prepare_write(offset, total as u64)?;
    let fd = image.file().as_raw_fd();
    let mut piece = Vec::new();
    for s in plan.segments() {
        piece.clear();
        slice_iovecs(
            iovecs,
            (s.guest_offset - offset) as usize,
            s.len as usize,
            &mut piece,
        );
        let r = crate::engine::blocking_rw(fd, true, s.host_offset, &piece, false);
        if r < 0 {
            return Err(TranslateError::Io {
                op: "write",
                offset: s.host_offset,
                source: std::io::Error::from_raw_os_error(-r),
            });
        }
    }
    image.commit_write(plan)?;
    if dsync {
        image.flush()?;
    }
    Ok(())
}

pub fn flush(q: &Mutex<Qcow2>) -> Result<(), TranslateError> {
    Ok(lock(q).flush()?)
}

/// Discard (`zeroes` false) or write-zeroes over `ranges`.
pub fn zero_ranges(
    q: &Mutex<Qcow2>,
    ranges: &[request::Range],
    zeroes: bool,
    unmap: bool,
) -> Result<(), TranslateError> {
    let mut image = lock(q);
    for r in ranges {
        if zeroes {
            image.write_zeroes(r.offset, r.len, unmap)?;
        } else {
            image.discard(r.offset, r.len)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    fn image(dir: &std::path::Path, backing: Option<&std::path::Path>) -> Mutex<Qcow2> {
        let q = Qcow2::create(&dir.join("t.qcow2"), 1 << 20, 4096, backing).expect("create");
        Mutex::new(q)
    }

    /// Reads through plan_read + the file reads it returns, as the engine would do them.
    fn read(q: &Mutex<Qcow2>, offset: u64, bufs: &mut [Vec<u8>]) {
        let iovecs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
        let (mut split, mut reads, mut pins) = (Vec::new(), Vec::new(), None);
        plan_read(q, offset, &iovecs, &mut split, &mut reads, &mut pins).expect("plan");
        let fd = lock(q).file().as_raw_fd();
        for r in &reads {
            assert_eq!(finish_short_read(fd, r, &split, 0), 0);
        }
    }

    #[test]
    fn write_and_read_across_clusters_and_iovecs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = image(dir.path(), None);
        // 10 KiB from 3 KiB on: a partial cluster, a whole one, a partial one, in two
        // iovecs that split inside a cluster.
        let mut a: Vec<u8> = (0..6000).map(|i| (i % 251) as u8).collect();
        let mut b: Vec<u8> = (0..4240).map(|i| (i % 13) as u8).collect();
        write(&q, 3072, &[iov(&mut a), iov(&mut b)], false).expect("write");
        let mut out = vec![vec![0xaau8; 1000], vec![0xaau8; 13_000]];
        read(&q, 2072, &mut out);
        let got: Vec<u8> = out.concat();
        assert!(
            got[..1000].iter().all(|&x| x == 0),
            "unallocated reads as zeros"
        );
        assert_eq!(&got[1000..7000], &a[..]);
        assert_eq!(&got[7000..11_240], &b[..]);
        assert!(got[11_240..].iter().all(|&x| x == 0));
        // Zeroing and discarding whole clusters.
        zero_ranges(
            &q,
            &[request::Range {
                offset: 4096,
                len: 4096,
            }],
            true,
            true,
        )
        .expect("zeroes");
        let mut out = vec![vec![0xaau8; 4096]];
        read(&q, 4096, &mut out);
        assert!(out[0].iter().all(|&x| x == 0));
        flush(&q).expect("flush");
    }

    #[test]
    fn unallocated_reads_come_from_the_backing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).expect("base");
        let q = image(dir.path(), Some(&base));
        let mut data = vec![1u8; 512];
        write(&q, 8192, &[iov(&mut data)], true).expect("write");
        let mut out = vec![vec![0u8; 3 * 4096]];
        read(&q, 4096, &mut out);
        assert!(out[0][..4096].iter().all(|&x| x == 7), "from the base");
        assert!(out[0][4096..4608].iter().all(|&x| x == 1), "written");
        assert!(
            out[0][4608..].iter().all(|&x| x == 7),
            "copy-on-write kept the base"
        );
    }

    /// Before: a dedupe write gathered the whole request into one buffer, and a read from
    /// the backing chain read a whole extent into one: a guest sending SEG_MAX x SIZE_MAX
    /// bytes made the daemon allocate that much. Now a chunk at a time, same bytes.
    #[test]
    fn large_requests_go_through_bounded_buffers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        let base_bytes: Vec<u8> = (0..8u64 << 20).map(|i| (i / 4096) as u8 | 1).collect();
        std::fs::write(&base, &base_bytes).expect("base");
        let mut img =
            Qcow2::create(&dir.path().join("t.qcow2"), 8 << 20, 4096, Some(&base)).expect("create");
        img.enable_dedupe(1 << 16).expect("dedupe");
        let q = Mutex::new(img);
        // 3 MiB + 8 KiB at 4 KiB, duplicated clusters among them, in two iovecs.
        let len = (3 << 20) + 8192;
        let mut data: Vec<u8> = (0..len).map(|i| ((i / 4096) % 7) as u8 + 2).collect();
        let (a, b) = data.split_at_mut(len / 3);
        write(&q, 4096, &[iov(a), iov(b)], false).expect("write");
        let gathered = GATHER.with_borrow(|g| g.capacity());
        assert!(
            gathered <= (CHUNK + 4096) as usize,
            "gather buffer {gathered}"
        );
        let mut out = vec![vec![0u8; 6 << 20]];
        read(&q, 0, &mut out);
        let want: Vec<u8> = base_bytes[..4096]
            .iter()
            .chain(data.iter())
            .chain(&base_bytes[4096 + len..6 << 20])
            .copied()
            .collect();
        assert!(out[0] == want, "read back differs");
        let s = lock(&q).dedupe_stats().expect("dedupe stats");
        assert!(s.hits > 700, "{s:?}");
    }
}
