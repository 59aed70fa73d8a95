//! A vhost-user-blk client for tests, built on libblkio's `virtio-blk-vhost-user` driver
//! (a real, independent virtio-blk driver), plus a way to start the backend under test.
//!
//! [`Blk`] owns one connection: its queues and one shared memory region (a memfd the backend
//! maps). [`Blk::queue`] / [`Blk::queues`] hand out [`BlkQueue`]s, each with its own slice of
//! the region, whose synchronous helpers submit one request, wait for it (with a timeout, so a
//! hung backend fails the test instead of hanging it) and return the completion's result, so
//! tests can assert on errors as well as on data.
//!
//! [`serve`] starts the backend: `vdisk serve` by default, or qemu-storage-daemon when
//! `E2E_BLK_BACKEND=qsd`, the reference implementation the tests were validated against.

use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};

use crate::Daemon;

/// libblkio's driver name for a vhost-user-blk socket.
pub const DRIVER: &str = "virtio-blk-vhost-user";

/// Everything a request or a connection attempt can fail with: the errno and libblkio's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    /// Positive errno value (EIO for VIRTIO_BLK_S_IOERR, ENOTSUP for VIRTIO_BLK_S_UNSUPP, ...).
    pub errno: i32,
    pub message: String,
}

impl IoError {
    fn from_blkio(e: &blkio::Error) -> IoError {
        IoError {
            errno: e.errno().raw_os_error(),
            message: e.message().to_string(),
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (errno {}: {})",
            self.message,
            self.errno,
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for IoError {}

pub type IoResult<T> = Result<T, IoError>;

/// How to connect.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of virtqueues to start.
    pub num_queues: usize,
    /// Poll queues: used-buffer notifications off, completions found by busy-polling the used
    /// ring (as a polling guest driver or a benchmark client does) instead of the call eventfd.
    pub poll: bool,
    /// Connect read-only. libblkio refuses to start a device that offers VIRTIO_BLK_F_RO
    /// unless this is set, and then fails writes itself with EBADF.
    pub read_only: bool,
    /// Size of the shared buffer region, split evenly between the queues.
    pub region_len: usize,
    /// How long one request may take before the helper gives up with ETIME.
    pub io_timeout: Duration,
    /// How long to retry a connection that is refused (socket not listening yet).
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            num_queues: 1,
            poll: false,
            read_only: false,
            region_len: 8 << 20,
            io_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Device limits read from the virtio-blk config space at connect time.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Logical block size (request alignment), usually 512.
    pub block_size: u64,
    /// Largest single segment (VIRTIO_BLK_F_SIZE_MAX), 0 = no limit.
    pub max_segment_len: usize,
    /// Most data segments in one request (VIRTIO_BLK_F_SEG_MAX).
    pub max_segments: usize,
    /// Largest discard, 0 = not advertised.
    pub max_discard_len: u64,
    /// Largest write-zeroes, 0 = not advertised.
    pub max_write_zeroes_len: u64,
}

/// One connection to a vhost-user-blk backend. Dropping it disconnects.
pub struct Blk {
    // Field order is drop order: queues before the driver, the driver before the region
    // (libblkio frees allocated regions once the driver and all queues are gone).
    queues: Vec<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    limits: Limits,
    io_timeout: Duration,
}

fn blkio_err(what: &str, socket: &Path) -> impl Fn(blkio::Error) -> IoError {
    let what = what.to_string();
    let socket = socket.to_path_buf();
    move |e| {
        let mut err = IoError::from_blkio(&e);
        err.message = format!("{what} ({}): {}", socket.display(), err.message);
        err
    }
}

impl Blk {
    /// Connect to the vhost-user-blk socket at `socket` and start `opts.num_queues` queues.
    pub fn connect(socket: &Path, opts: &Options) -> IoResult<Blk> {
        let path = socket
            .to_str()
            .expect("socket path must be valid UTF-8 for libblkio");
        let deadline = Instant::now() + opts.connect_timeout;
        let mut blkio = loop {
            let mut b = Blkio::new(DRIVER).map_err(blkio_err("blkio new", socket))?;
            b.set_str("path", path)
                .map_err(blkio_err("set path", socket))?;
            b.set_bool("read-only", opts.read_only)
                .map_err(blkio_err("set read-only", socket))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if (e.errno() == Errno::CONNREFUSED || e.errno() == Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(blkio_err("connect", socket)(e)),
            }
        };
        let get_u64 = |b: &Blkio, name: &str| {
            b.get_u64(name)
                .map_err(blkio_err(&format!("get {name}"), socket))
        };
        let get_i32 = |b: &Blkio, name: &str| {
            b.get_i32(name)
                .map_err(blkio_err(&format!("get {name}"), socket))
        };
        let capacity = get_u64(&blkio, "capacity")?;
        let limits = Limits {
            block_size: get_i32(&blkio, "request-alignment")?.max(1) as u64,
            max_segment_len: get_i32(&blkio, "max-segment-len")?.max(0) as usize,
            max_segments: get_i32(&blkio, "max-segments")?.max(1) as usize,
            max_discard_len: get_u64(&blkio, "max-discard-len")?,
            max_write_zeroes_len: get_u64(&blkio, "max-write-zeroes-len")?,
        };
        let (nq, npq) = if opts.poll {
            (0, opts.num_queues)
        } else {
            (opts.num_queues, 0)
        };
        blkio
            .set_i32("num-queues", nq as i32)
            .map_err(blkio_err("set num-queues", socket))?;
        blkio
            .set_i32("num-poll-queues", npq as i32)
            .map_err(blkio_err("set num-poll-queues", socket))?;
        let started = blkio.start().map_err(blkio_err("start", socket))?;

        let align = get_u64(&blkio, "mem-region-alignment")?.max(4096) as usize;
        let per_queue = (opts.region_len / opts.num_queues.max(1)) / align * align;
        assert!(
            per_queue > 0,
            "region_len too small for {} queues",
            opts.num_queues
        );
        let region = blkio
            .alloc_mem_region(per_queue * opts.num_queues.max(1))
            .map_err(blkio_err("alloc_mem_region", socket))?;
        blkio
            .map_mem_region(&region)
            .map_err(blkio_err("map_mem_region", socket))?;
        Ok(Blk {
            queues: if opts.poll {
                started.poll_queues
            } else {
                started.queues
            },
            blkio,
            region,
            capacity,
            limits,
            io_timeout: opts.io_timeout,
        })
    }

    /// Device capacity in bytes, as the backend reports it in its config space.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The underlying libblkio instance, for property queries (`get_bool("read-only")`, ...).
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// All queues, each with its own disjoint part of the buffer region, e.g. to drive them
    /// from several threads at once.
    pub fn queues(&mut self) -> Vec<BlkQueue<'_>> {
        let n = self.queues.len();
        let per_queue = self.region.len / n;
        // SAFETY: the region is a live read-write mapping of `region.len` bytes owned by this
        // connection; it outlives the returned borrows of `self`, and the slices are disjoint.
        let whole =
            unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) };
        let limits = self.limits;
        let io_timeout = self.io_timeout;
        self.queues
            .iter_mut()
            .zip(whole.chunks_mut(per_queue))
            .enumerate()
            .map(|(index, (q, buf))| BlkQueue {
                q,
                buf,
                index,
                limits,
                io_timeout,
            })
            .collect()
    }

    /// Queue `index`.
    pub fn queue(&mut self, index: usize) -> BlkQueue<'_> {
        let n = self.queues.len();
        assert!(index < n, "queue {index} out of range ({n} queues)");
        self.queues().swap_remove(index)
    }

    /// Read `len` bytes at `offset` on queue 0.
    pub fn read(&mut self, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        self.queue(0).read(offset, len)
    }

    /// Write `data` at `offset` on queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.queue(0).write(offset, data)
    }

    /// FLUSH on queue 0.
    pub fn flush(&mut self) -> IoResult<()> {
        self.queue(0).flush()
    }

    /// DISCARD on queue 0.
    pub fn discard(&mut self, offset: u64, len: u64) -> IoResult<()> {
        self.queue(0).discard(offset, len)
    }

    /// WRITE_ZEROES on queue 0; `unmap` sets VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> IoResult<()> {
        self.queue(0).write_zeroes(offset, len, unmap)
    }
}

/// One virtqueue with its own buffer; every helper submits and waits synchronously.
pub struct BlkQueue<'a> {
    q: &'a mut Blkioq,
    buf: &'a mut [u8],
    index: usize,
    limits: Limits,
    io_timeout: Duration,
}

impl BlkQueue<'_> {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Largest data transfer done as one request: the buffer, limited by SIZE_MAX x SEG_MAX.
    fn max_transfer(&self) -> usize {
        let by_segments = if self.limits.max_segment_len > 0 {
            self.limits.max_segment_len * self.limits.max_segments
        } else {
            usize::MAX
        };
        let bs = self.limits.block_size as usize;
        (self.buf.len().min(by_segments) / bs * bs).max(bs)
    }

    /// The buffer's first `len` bytes as iovecs no longer than SIZE_MAX.
    fn iovecs(&mut self, len: usize) -> Vec<blkio::iovec> {
        let seg = if self.limits.max_segment_len > 0 {
            self.limits.max_segment_len
        } else {
            len.max(1)
        };
        self.buf[..len]
            .chunks_mut(seg)
            .map(|c| blkio::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: c.len(),
            })
            .collect()
    }

    /// Wait for the one request in flight and return its result.
    fn complete(&mut self) -> IoResult<()> {
        let mut completion = [MaybeUninit::<Completion>::uninit()];
        let mut timeout = self.io_timeout;
        let n = self
            .q
            .do_io(&mut completion, 1, Some(&mut timeout), None)
            .map_err(|e| IoError::from_blkio(&e))?;
        assert_eq!(n, 1, "do_io returned without the completion it waited for");
        // SAFETY: do_io initialised the first `n` (= 1) completions.
        let c = unsafe { completion[0].assume_init_read() };
        if c.ret == 0 {
            return Ok(());
        }
        let message = if c.error_msg.is_null() {
            "request failed".to_string()
        } else {
            // SAFETY: a non-null error_msg is a static NUL-terminated string from libblkio.
            unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                .to_string_lossy()
                .into_owned()
        };
        Err(IoError {
            errno: -c.ret,
            message,
        })
    }

    /// Read `len` bytes at `offset` (split into requests the device accepts).
    pub fn read(&mut self, offset: u64, len: usize) -> IoResult<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.read_into(offset, &mut out)?;
        Ok(out)
    }

    /// Read `out.len()` bytes at `offset` into `out`.
    pub fn read_into(&mut self, offset: u64, out: &mut [u8]) -> IoResult<()> {
        let step = self.max_transfer();
        for (i, chunk) in out.chunks_mut(step).enumerate() {
            let iov = self.iovecs(chunk.len());
            let start = offset + (i * step) as u64;
            self.q
                .readv(start, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
            self.complete()?;
            chunk.copy_from_slice(&self.buf[..chunk.len()]);
        }
        Ok(())
    }

    /// Write `data` at `offset` (split into requests the device accepts).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> IoResult<()> {
        let step = self.max_transfer();
        for (i, chunk) in data.chunks(step).enumerate() {
            self.buf[..chunk.len()].copy_from_slice(chunk);
            let iov = self.iovecs(chunk.len());
            let start = offset + (i * step) as u64;
            self.q
                .writev(start, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
            self.complete()?;
        }
        Ok(())
    }

    /// Submit `ops` together (one `do_io` for all of them, so the device sees them in one
    /// batch, in flight at once) and wait for every one. Returns each op's result, with
    /// the data of reads. Each read or write must fit in the queue's buffer share
    /// (`Options::region_len` / queues) divided by `ops.len()`.
    pub fn batch(&mut self, ops: &[BatchOp]) -> Vec<IoResult<Vec<u8>>> {
        let slot = self.buf.len() / ops.len().max(1);
        let base = self.buf.as_mut_ptr();
        let mut iovs = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let at = i * slot;
            let iov = |len: usize| blkio::iovec {
                // SAFETY: `at` is below `buf.len()` (one slot per op), and the iovec lives
                // in `iovs` until every completion is in; the asserts below keep `len`
                // within the slot.
                iov_base: unsafe { base.add(at) }.cast(),
                iov_len: len,
            };
            match op {
                BatchOp::Read { offset, len } => {
                    assert!(*len <= slot, "a {len}-byte read in a {slot}-byte slot");
                    iovs.push(iov(*len));
                    self.q.readv(*offset, &iovs[i], 1, i, ReqFlags::empty());
                }
                BatchOp::Write { offset, data } => {
                    assert!(
                        data.len() <= slot,
                        "a {}-byte write in a {slot}-byte slot",
                        data.len()
                    );
                    self.buf[at..at + data.len()].copy_from_slice(data);
                    iovs.push(iov(data.len()));
                    self.q.writev(*offset, &iovs[i], 1, i, ReqFlags::empty());
                }
                BatchOp::Discard { offset, len } => {
                    iovs.push(iov(0));
                    self.q.discard(*offset, *len, i, ReqFlags::empty());
                }
                BatchOp::Flush => {
                    iovs.push(iov(0));
                    self.q.flush(i, ReqFlags::empty());
                }
            }
        }
        let mut results: Vec<Option<IoResult<Vec<u8>>>> = (0..ops.len()).map(|_| None).collect();
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..ops.len()).map(|_| MaybeUninit::uninit()).collect();
        let mut left = ops.len();
        while left > 0 {
            let mut timeout = self.io_timeout;
            let n = match self.q.do_io(&mut completions, 1, Some(&mut timeout), None) {
                Ok(n) => n,
                Err(e) => {
                    let err = IoError::from_blkio(&e);
                    for r in results.iter_mut().filter(|r| r.is_none()) {
                        *r = Some(Err(err.clone()));
                    }
                    break;
                }
            };
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                let i = c.user_data;
                let r = if c.ret == 0 {
                    Ok(match &ops[i] {
                        BatchOp::Read { len, .. } => self.buf[i * slot..i * slot + len].to_vec(),
                        _ => Vec::new(),
                    })
                } else {
                    Err(IoError {
                        errno: -c.ret,
                        message: "request failed".into(),
                    })
                };
                results[i] = Some(r);
            }
            left -= n;
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(IoError {
                        errno: libc::ETIME,
                        message: "no completion".into(),
                    })
                })
            })
            .collect()
    }

    /// VIRTIO_BLK_T_FLUSH.
    pub fn flush(&mut self) -> IoResult<()> {
        self.q.flush(0, ReqFlags::empty());
        self.complete()
    }

    /// VIRTIO_BLK_T_DISCARD over `[offset, offset + len)`, split at max-discard-len.
    pub fn discard(&mut self, offset: u64, len: u64) -> IoResult<()> {
        let step = nonzero_or_max(self.limits.max_discard_len);
        for (start, n) in ranges(offset, len, step) {
            self.q.discard(start, n, 0, ReqFlags::empty());
            self.complete()?;
        }
        Ok(())
    }

    /// VIRTIO_BLK_T_WRITE_ZEROES over `[offset, offset + len)`, split at
    /// max-write-zeroes-len; `unmap` sets VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> IoResult<()> {
        let step = nonzero_or_max(self.limits.max_write_zeroes_len);
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        for (start, n) in ranges(offset, len, step) {
            self.q.write_zeroes(start, n, 0, flags);
            self.complete()?;
        }
        Ok(())
    }
}

fn nonzero_or_max(v: u64) -> u64 {
    if v == 0 {
        u64::MAX
    } else {
        v
    }
}

/// `[offset, offset + len)` cut into pieces of at most `step` bytes (one piece if len is 0).
fn ranges(offset: u64, len: u64, step: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut done = 0;
    loop {
        let n = (len - done).min(step);
        out.push((offset + done, n));
        done += n;
        if done >= len {
            return out;
        }
    }
}

/// One request of [`BlkQueue::batch`].
#[derive(Debug, Clone)]
pub enum BatchOp {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Discard { offset: u64, len: u64 },
    Flush,
}

/// Which vhost-user-blk backend [`serve`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `vdisk serve`, the backend under test.
    Vdisk,
    /// qemu-storage-daemon, the reference (`E2E_BLK_BACKEND=qsd`).
    Qsd,
}

impl Backend {
    /// The backend chosen by `E2E_BLK_BACKEND` (`vdisk`, the default, or `qsd`).
    pub fn from_env() -> Backend {
        match std::env::var("E2E_BLK_BACKEND").as_deref() {
            Ok("qsd") | Ok("qemu-storage-daemon") => Backend::Qsd,
            Ok("vdisk") | Ok("") | Err(_) => Backend::Vdisk,
            Ok(other) => panic!("E2E_BLK_BACKEND={other}: expected vdisk or qsd"),
        }
    }

    /// True if the backend can be started here; skips (or fails in CI) via [`crate::require`].
    pub fn available(self) -> bool {
        match self {
            Backend::Vdisk => true, // bin() explains how to build it if it is missing
            Backend::Qsd => crate::require(
                "qemu-storage-daemon (package qemu-utils)",
                crate::have_program("qemu-storage-daemon"),
            ),
        }
    }
}

/// The backend's options, in vdisk's terms.
#[derive(Debug, Clone, Default)]
pub struct ServeOpts {
    pub readonly: bool,
    /// `--num-queues`; None = the daemon's default.
    pub num_queues: Option<usize>,
    /// `--engine io_uring|sync`; None = the daemon's default.
    pub engine: Option<&'static str>,
    /// `--direct` (O_DIRECT).
    pub direct: bool,
}

impl ServeOpts {
    /// The `vdisk serve` arguments after `--image/--socket`.
    pub fn vdisk_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.readonly {
            a.push("--readonly".to_string());
        }
        if let Some(n) = self.num_queues {
            a.push("--num-queues".to_string());
            a.push(n.to_string());
        }
        if let Some(e) = self.engine {
            a.push("--engine".to_string());
            a.push(e.to_string());
        }
        if self.direct {
            a.push("--direct".to_string());
        }
        a
    }
}

/// Start `backend` serving the raw `image` on `socket` and wait until the socket exists.
pub fn serve(backend: Backend, image: &Path, socket: &Path, opts: &ServeOpts) -> Daemon {
    match backend {
        Backend::Vdisk => {
            let args = opts.vdisk_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Daemon::vdisk(image, socket, &args)
        }
        Backend::Qsd => qsd(image, socket, opts),
    }
}

/// Start qemu-storage-daemon exporting the raw `image` as vhost-user-blk on `socket`.
pub fn qsd(image: &Path, socket: &Path, opts: &ServeOpts) -> Daemon {
    let aio = match opts.engine {
        Some("sync") => "threads",
        _ => "io_uring",
    };
    let mut blockdev = format!(
        "driver=file,node-name=f0,filename={},aio={aio},discard=unmap,locking=off",
        image.display()
    );
    if opts.direct {
        blockdev.push_str(",cache.direct=on");
    }
    if opts.readonly {
        blockdev.push_str(",read-only=on");
    }
    let mut export = format!(
        "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable={}",
        socket.display(),
        if opts.readonly { "off" } else { "on" }
    );
    if let Some(n) = opts.num_queues {
        export.push_str(&format!(",num-queues={n}"));
    }
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(blockdev)
        .arg("--export")
        .arg(export)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let mut d = Daemon {
        child,
        socket: socket.to_path_buf(),
    };
    d.wait_ready();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split() {
        assert_eq!(ranges(0, 0, 10), vec![(0, 0)]);
        assert_eq!(ranges(5, 10, 10), vec![(5, 10)]);
        assert_eq!(ranges(5, 25, 10), vec![(5, 10), (15, 10), (25, 5)]);
        assert_eq!(ranges(0, 7, u64::MAX), vec![(0, 7)]);
    }

    #[test]
    fn vdisk_args() {
        let o = ServeOpts {
            readonly: true,
            num_queues: Some(2),
            engine: Some("sync"),
            direct: true,
        };
        assert_eq!(
            o.vdisk_args(),
            [
                "--readonly",
                "--num-queues",
                "2",
                "--engine",
                "sync",
                "--direct"
            ]
        );
    }
}
