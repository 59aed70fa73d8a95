//! End-to-end tests of `vdisk serve` on raw images through libblkio, a real and independent
//! vhost-user-blk driver: data integrity (checked through the device and on the host file),
//! flush, discard and write-zeroes, read-only exports, multiqueue, reconnects, and the daemon's
//! life cycle (signals, a busy socket, a stale socket).
//!
//! `E2E_BLK_BACKEND=qsd` runs the data tests against qemu-storage-daemon instead, the reference
//! the suite was validated with; the life-cycle tests are vdisk's contract and skip then.
//! `E2E_SEED=N` replays a run (the seed is printed on failure via the test output).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use e2e::blk::{self, Backend, Blk, Options, ServeOpts};
use e2e::Daemon;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;

/// A temp dir holding a raw image filled with seeded random bytes, and the model of its content.
struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    model: Vec<u8>,
    rng: SmallRng,
    seed: u64,
}

impl Fixture {
    fn new(size: u64) -> Fixture {
        let seed = std::env::var("E2E_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("seed {seed} (E2E_SEED={seed} replays it)");
        let mut rng = SmallRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().expect("create temp dir");
        let image = dir.path().join("disk.raw");
        let socket = dir.path().join("vdisk.sock");
        let mut model = vec![0u8; size as usize];
        rng.fill_bytes(&mut model);
        std::fs::write(&image, &model).expect("write image");
        Fixture {
            _dir: dir,
            image,
            socket,
            model,
            rng,
            seed,
        }
    }

    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    fn serve(&self, backend: Backend, opts: &ServeOpts) -> Daemon {
        blk::serve(backend, &self.image, &self.socket, opts)
    }

    /// The image file on the host must equal the model.
    fn assert_file_matches(&self, what: &str) {
        let file = std::fs::read(&self.image).expect("read image file");
        assert_eq!(
            file.len(),
            self.model.len(),
            "{what}: image file size changed (seed {})",
            self.seed
        );
        if let Some(i) = first_diff(&file, &self.model) {
            panic!(
                "{what}: image file differs from the model at byte {i} (sector {}) (seed {})",
                i as u64 / SECTOR,
                self.seed
            );
        }
    }

    /// Everything read through the device must equal the model.
    fn assert_device_matches(&self, q: &mut blk::BlkQueue<'_>, what: &str) {
        let mut off = 0u64;
        while off < self.size() {
            let n = MIB.min(self.size() - off) as usize;
            let got = q.read(off, n).expect("read back through the device");
            let want = &self.model[off as usize..off as usize + n];
            if let Some(i) = first_diff(&got, want) {
                panic!(
                    "{what}: device data differs from the model at byte {} (seed {})",
                    off + i as u64,
                    self.seed
                );
            }
            off += n as u64;
        }
    }

    /// A random sector-aligned (offset, len) inside `[lo, hi)`, len at most `max_len`.
    fn random_extent(&mut self, lo: u64, hi: u64, max_len: u64) -> (u64, usize) {
        let max_sectors = (max_len / SECTOR).min((hi - lo) / SECTOR);
        let sectors = self.rng.random_range(1..=max_sectors);
        let len = sectors * SECTOR;
        let off = lo + self.rng.random_range(0..=(hi - lo - len) / SECTOR) * SECTOR;
        (off, len as usize)
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None; // memcmp: fast even in debug builds
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// The backend for this run, or None (test skipped) if it is not available.
fn backend() -> Option<Backend> {
    let b = Backend::from_env();
    b.available().then_some(b)
}

/// The life-cycle tests check vdisk's own contract: skip them for other backends.
fn vdisk_only() -> bool {
    if Backend::from_env() != Backend::Vdisk {
        eprintln!("SKIP: life-cycle test is for vdisk only");
        return false;
    }
    true
}

fn connect(socket: &Path) -> Blk {
    Blk::connect(socket, &Options::default()).expect("connect with libblkio")
}

fn wait_exit(d: &mut Daemon, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = d.child.try_wait().expect("wait for daemon") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(d: &Daemon, sig: libc::c_int) {
    // SAFETY: kill() with the pid of our own child and a valid signal has no memory effects.
    let rc = unsafe { libc::kill(d.child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", d.child.id());
}

/// True if `[offset, offset + len)` of `file` holds no data extents (reads as a hole).
fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on an open fd has no memory effects.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        // ENXIO: no data at or after offset.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    r as u64 >= offset + len
}

/// True if the filesystem holding `dir` punches holes and reports them via SEEK_DATA.
fn punch_hole_supported(dir: &Path) -> bool {
    let path = dir.join("punch-probe");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create probe file");
    std::fs::write(&path, vec![0xa5u8; 2 * MIB as usize]).expect("write probe file");
    // SAFETY: fallocate on an open fd has no memory effects.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            MIB as libc::off_t,
        )
    };
    let ok = rc == 0 && is_hole(&file, 0, MIB);
    let _ = std::fs::remove_file(&path);
    ok
}

/// Random writes of random sizes at random offsets, each read back at once; then the whole
/// device and the host file compared with the model, before and after a reconnect.
fn random_data(engine: Option<&'static str>, direct: bool) {
    let Some(backend) = backend() else { return };
    let mut fx = Fixture::new(32 * MIB);
    if direct && !o_direct_supported(&fx.image) {
        eprintln!("SKIP: the temp dir's filesystem does not support O_DIRECT");
        return;
    }
    let _d = fx.serve(
        backend,
        &ServeOpts {
            engine,
            direct,
            ..Default::default()
        },
    );
    let mut blk = connect(&fx.socket);
    assert_eq!(blk.capacity(), fx.size(), "capacity = image size");
    {
        let mut q = blk.queue(0);
        fx.assert_device_matches(&mut q, "initial content");
        for i in 0..300 {
            // Mostly small I/O, sometimes up to 1 MiB (split by the helper if the device limits
            // segments); a few at the very end of the device.
            let max_len = if i % 10 == 0 { MIB } else { 64 * 1024 };
            let (off, len) = if i % 50 == 7 {
                let len = 8 * SECTOR as usize;
                (fx.size() - len as u64, len)
            } else {
                fx.random_extent(0, fx.size(), max_len)
            };
            let mut data = vec![0u8; len];
            fx.rng.fill_bytes(&mut data);
            q.write(off, &data)
                .unwrap_or_else(|e| panic!("write {len} bytes at {off}: {e} (seed {})", fx.seed));
            fx.model[off as usize..off as usize + len].copy_from_slice(&data);

            // Read back the written extent and a random one.
            let got = q.read(off, len).expect("read back");
            assert!(
                got == data,
                "read-back of the write at {off} differs (seed {})",
                fx.seed
            );
            let (roff, rlen) = fx.random_extent(0, fx.size(), 128 * 1024);
            let got = q.read(roff, rlen).expect("random read");
            assert!(
                got[..] == fx.model[roff as usize..roff as usize + rlen],
                "random read of {rlen} bytes at {roff} differs (seed {})",
                fx.seed
            );
        }
        q.flush().expect("flush");
        fx.assert_device_matches(&mut q, "after random writes");
    }
    fx.assert_file_matches("after flush");

    // Requests past the end fail with an error instead of touching the file.
    let cap = blk.capacity();
    let e = blk
        .read(cap - SECTOR, 2 * SECTOR as usize)
        .expect_err("read across the end of the device must fail");
    assert_eq!(e.errno, libc::EIO, "read past the end: {e}");
    let e = blk
        .write(cap, &[0x5a; SECTOR as usize])
        .expect_err("write past the end of the device must fail");
    assert_eq!(e.errno, libc::EIO, "write past the end: {e}");
    // The device still works afterwards and nothing changed.
    let mut q = blk.queue(0);
    fx.assert_device_matches(&mut q, "after out-of-range requests");
    drop(blk);
    fx.assert_file_matches("after out-of-range requests");
}

#[test]
fn random_data_default_engine() {
    random_data(None, false);
}

#[test]
fn random_data_io_uring_engine() {
    random_data(Some("io_uring"), false);
}

#[test]
fn random_data_sync_engine() {
    random_data(Some("sync"), false);
}

/// O_DIRECT: every completion comes from the block layer, none inline at submission.
#[test]
fn random_data_io_uring_engine_direct() {
    random_data(Some("io_uring"), true);
}

#[test]
fn random_data_sync_engine_direct() {
    random_data(Some("sync"), true);
}

fn o_direct_supported(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let Some(backend) = backend() else { return };
    let mut fx = Fixture::new(16 * MIB);
    let holes = punch_hole_supported(fx.image.parent().expect("image dir"));
    if !holes {
        eprintln!("note: this filesystem does not punch holes: sparseness is not checked");
    }
    let _d = fx.serve(backend, &ServeOpts::default());
    let mut blk = connect(&fx.socket);
    assert!(
        blk.blkio()
            .get_u64("max-discard-len")
            .expect("max-discard-len")
            > 0,
        "device does not offer DISCARD"
    );
    assert!(
        blk.blkio()
            .get_u64("max-write-zeroes-len")
            .expect("max-write-zeroes-len")
            > 0,
        "device does not offer WRITE_ZEROES"
    );

    // (what, offset, len, op); op: 0 discard, 1 write-zeroes+unmap, 2 write-zeroes.
    let cases: &[(&str, u64, u64, u8)] = &[
        ("discard 1 MiB aligned", MIB, MIB, 0),
        ("discard 4 KiB", 2 * MIB + 8192, 4096, 0),
        ("write-zeroes unmap 1 MiB aligned", 3 * MIB, MIB, 1),
        ("write-zeroes 1 MiB aligned", 5 * MIB, MIB, 2),
        (
            "write-zeroes unmap unaligned",
            7 * MIB + 512,
            3 * 4096 + 1024,
            1,
        ),
        ("write-zeroes unaligned", 9 * MIB - 1536, 5 * 512, 2),
        ("write-zeroes unmap last sectors", 16 * MIB - 4096, 4096, 1),
    ];
    {
        let mut q = blk.queue(0);
        for &(what, off, len, op) in cases {
            let r = match op {
                0 => q.discard(off, len),
                1 => q.write_zeroes(off, len, true),
                _ => q.write_zeroes(off, len, false),
            };
            r.unwrap_or_else(|e| panic!("{what}: {e}"));
            fx.model[off as usize..(off + len) as usize].fill(0);
            let got = q.read(off, len as usize).expect("read back");
            assert!(
                got.iter().all(|&b| b == 0),
                "{what}: does not read back as zeros"
            );
            // The sectors on either side are untouched.
            let mut neighbours = vec![(off + len, "after")];
            if off >= SECTOR {
                neighbours.push((off - SECTOR, "before"));
            }
            for (noff, what_side) in neighbours {
                if noff + SECTOR > fx.size() {
                    continue;
                }
                let got = q.read(noff, SECTOR as usize).expect("read neighbour");
                assert!(
                    got[..] == fx.model[noff as usize..(noff + SECTOR) as usize],
                    "{what}: sector {what_side} the range changed"
                );
            }
        }
        q.flush().expect("flush");
        fx.assert_device_matches(&mut q, "after discard/write-zeroes");
    }
    fx.assert_file_matches("after discard/write-zeroes");

    if holes {
        let file = File::open(&fx.image).expect("open image");
        for &(what, off, len, op) in cases {
            // Sparseness is checked for whole aligned 1 MiB ranges that were unmapped.
            if op < 2 && len >= MIB {
                assert!(
                    is_hole(&file, off, len),
                    "{what}: the range is still allocated in the image file"
                );
            }
        }
        let allocated = std::fs::metadata(&fx.image).expect("stat").blocks() * 512;
        assert!(
            allocated <= fx.size() - 2 * MIB,
            "image still has {allocated} bytes allocated after unmapping 2 MiB"
        );
    }
}

#[test]
fn readonly_export() {
    let Some(backend) = backend() else { return };
    let fx = Fixture::new(8 * MIB);
    let before = std::fs::read(&fx.image).expect("read image");
    let _d = fx.serve(
        backend,
        &ServeOpts {
            readonly: true,
            ..Default::default()
        },
    );

    // The device offers VIRTIO_BLK_F_RO: libblkio refuses a read-write start with EROFS.
    let e = Blk::connect(&fx.socket, &Options::default())
        .err()
        .expect("a read-write connection to a --readonly export must be refused");
    assert_eq!(
        e.errno,
        libc::EROFS,
        "read-write start on a read-only device: {e}"
    );

    let mut blk = Blk::connect(
        &fx.socket,
        &Options {
            read_only: true,
            ..Default::default()
        },
    )
    .expect("read-only connection");
    assert_eq!(blk.capacity(), fx.size(), "capacity = image size");
    assert!(blk
        .blkio()
        .get_bool("read-only")
        .expect("read-only property"));
    {
        let mut q = blk.queue(0);
        fx.assert_device_matches(&mut q, "read-only export");
        let e = q.write(0, &[1u8; 4096]).expect_err("write must fail");
        assert_ne!(e.errno, 0);
        q.write_zeroes(MIB, MIB, true)
            .expect_err("write-zeroes must fail");
        q.discard(MIB, MIB).expect_err("discard must fail");
        // Reads keep working after the rejected writes.
        let got = q.read(4096, 8192).expect("read after rejected writes");
        assert!(got[..] == fx.model[4096..4096 + 8192]);
    }
    drop(blk);
    let after = std::fs::read(&fx.image).expect("read image");
    assert!(
        before == after,
        "the image changed under a --readonly export"
    );
}

#[test]
fn multiqueue_concurrent_io() {
    let Some(backend) = backend() else { return };
    let mut fx = Fixture::new(32 * MIB);
    let _d = fx.serve(
        backend,
        &ServeOpts {
            num_queues: Some(2),
            ..Default::default()
        },
    );
    let mut blk = Blk::connect(
        &fx.socket,
        &Options {
            num_queues: 2,
            ..Default::default()
        },
    )
    .expect("connect with 2 queues");
    assert_eq!(
        blk.blkio().get_i32("max-queues").expect("max-queues"),
        2,
        "--num-queues 2 must offer 2 queues"
    );
    assert_eq!(blk.num_queues(), 2);

    // Each queue writes and verifies its own half, both at the same time.
    let half = fx.size() / 2;
    let seeds: Vec<u64> = (0..2).map(|_| fx.rng.random()).collect();
    let mut queues = blk.queues();
    let results: Vec<Vec<(u64, Vec<u8>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(&seeds)
            .map(|(q, &seed)| {
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(seed);
                    let lo = q.index() as u64 * half;
                    let mut writes = Vec::new();
                    for _ in 0..400 {
                        let len = rng.random_range(1..=128) * SECTOR;
                        let off = lo + rng.random_range(0..=(half - len) / SECTOR) * SECTOR;
                        let mut data = vec![0u8; len as usize];
                        rng.fill_bytes(&mut data);
                        q.write(off, &data).expect("write on queue");
                        let got = q.read(off, len as usize).expect("read on queue");
                        assert!(got == data, "queue {}: read-back differs", q.index());
                        writes.push((off, data));
                    }
                    writes
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread panicked"))
            .collect()
    });
    for writes in results {
        for (off, data) in writes {
            fx.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    // Cross-check: each queue reads the whole device, including the other queue's half.
    for q in queues.iter_mut() {
        fx.assert_device_matches(q, &format!("read through queue {}", q.index()));
    }
    queues[1].flush().expect("flush");
    drop(queues);
    drop(blk);
    fx.assert_file_matches("after multiqueue writes");
}

#[test]
fn reconnect_keeps_data() {
    let Some(backend) = backend() else { return };
    let mut fx = Fixture::new(8 * MIB);
    let _d = fx.serve(backend, &ServeOpts::default());
    for round in 0..4u64 {
        let mut blk = connect(&fx.socket);
        let mut q = blk.queue(0);
        // Everything written in earlier rounds is still there.
        fx.assert_device_matches(&mut q, &format!("after reconnect {round}"));
        let off = round * MIB + 4096;
        let mut data = vec![0u8; 64 * 1024];
        fx.rng.fill_bytes(&mut data);
        q.write(off, &data).expect("write");
        fx.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        if round % 2 == 0 {
            q.flush().expect("flush");
        }
        // Disconnect without flushing on odd rounds.
    }
    // A plain socket connection that hangs up at once must not upset the daemon either.
    drop(std::os::unix::net::UnixStream::connect(&fx.socket).expect("raw connect"));
    let mut blk = connect(&fx.socket);
    fx.assert_device_matches(&mut blk.queue(0), "final reconnect");
    drop(blk);
    fx.assert_file_matches("after reconnects");
}

/// The very first request of a connection completes, on interrupt-driven and on polled
/// queues: a kick that arrives while the backend is still setting the queue up must not be lost.
#[test]
fn first_request_after_connect_completes() {
    let Some(backend) = backend() else { return };
    let mut fx = Fixture::new(4 * MIB);
    let _d = fx.serve(backend, &ServeOpts::default());
    for round in 0..40 {
        let poll = round % 2 == 1;
        let mut blk = Blk::connect(
            &fx.socket,
            &Options {
                poll,
                io_timeout: Duration::from_secs(3),
                ..Default::default()
            },
        )
        .expect("connect");
        let (off, len) = fx.random_extent(0, fx.size(), 8192);
        let got = blk.read(off, len).unwrap_or_else(|e| {
            panic!("round {round} (poll queues: {poll}): first read after connect: {e}")
        });
        assert!(got[..] == fx.model[off as usize..off as usize + len]);
    }
}

/// A long run of back-to-back single requests on a polled queue, over a large cached image.
/// The driver kicks only when the backend's avail_event asks for it (EVENT_IDX) and never
/// waits for a call, so a backend that misses one wakeup (a lost kick, or an I/O completion
/// it is not woken for) stalls for good; the helper's timeout turns that into a failure.
/// Such bugs are races: this catches them often, not always.
#[test]
fn polled_qd1_requests_never_stall() {
    let Some(backend) = backend() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("big.raw");
    let socket = dir.path().join("vdisk.sock");
    // 256 MiB of 4 KiB blocks, each tagged with its index; cheap to make and to check.
    const BLOCK: usize = 4096;
    const BLOCKS: u64 = 256 * MIB / BLOCK as u64;
    let mut rng = SmallRng::seed_from_u64(7);
    let mut chunk = vec![0u8; MIB as usize];
    rng.fill_bytes(&mut chunk);
    let expected = |b: u64| {
        let i = (b as usize % (MIB as usize / BLOCK)) * BLOCK;
        let mut block = chunk[i..i + BLOCK].to_vec();
        block[..8].copy_from_slice(&b.to_le_bytes());
        block
    };
    {
        let mut f = std::io::BufWriter::new(File::create(&image).expect("create image"));
        for b in 0..BLOCKS {
            std::io::Write::write_all(&mut f, &expected(b)).expect("write image");
        }
        f.into_inner()
            .expect("flush image")
            .sync_all()
            .expect("fsync image");
    }
    let _d = blk::serve(backend, &image, &socket, &ServeOpts::default());
    let mut blk = Blk::connect(
        &socket,
        &Options {
            poll: true,
            io_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .expect("connect");
    let mut q = blk.queue(0);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let b = rng.random_range(0..BLOCKS);
        let got = q
            .read(b * BLOCK as u64, BLOCK)
            .unwrap_or_else(|e| panic!("request {n} on a polled queue stalled or failed: {e}"));
        assert!(got == expected(b), "block {b} read back wrong");
        n += 1;
    }
    eprintln!("{n} polled requests");
}

#[test]
fn sigterm_and_sigint_exit_zero_and_remove_socket() {
    if !vdisk_only() {
        return;
    }
    let mut fx = Fixture::new(4 * MIB);

    // SIGTERM with a frontend connected and I/O done.
    let mut d = fx.serve(Backend::Vdisk, &ServeOpts::default());
    let mut blk = connect(&fx.socket);
    let mut data = vec![0u8; 8192];
    fx.rng.fill_bytes(&mut data);
    blk.write(0, &data).expect("write");
    blk.flush().expect("flush");
    fx.model[..8192].copy_from_slice(&data);
    signal(&d, libc::SIGTERM);
    let status = wait_exit(&mut d, Duration::from_secs(10));
    assert!(
        status.success(),
        "SIGTERM with a client connected: exit {status}"
    );
    assert!(!fx.socket.exists(), "socket file left behind after SIGTERM");
    drop(blk);
    fx.assert_file_matches("after SIGTERM");

    // SIGTERM when idle, and SIGINT.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut d = fx.serve(Backend::Vdisk, &ServeOpts::default());
        signal(&d, sig);
        let status = wait_exit(&mut d, Duration::from_secs(10));
        assert!(status.success(), "idle daemon, signal {sig}: exit {status}");
        assert!(
            !fx.socket.exists(),
            "socket file left behind after signal {sig}"
        );
    }
}

#[test]
fn second_daemon_on_a_live_socket_fails() {
    if !vdisk_only() {
        return;
    }
    let fx = Fixture::new(4 * MIB);
    let _first = fx.serve(Backend::Vdisk, &ServeOpts::default());
    let other_image = fx.image.with_file_name("other.raw");
    std::fs::write(&other_image, vec![0x77u8; 4 * MIB as usize]).expect("write other image");

    let mut second = Command::new(e2e::bin("vdisk"))
        .arg("serve")
        .arg("--image")
        .arg(&other_image)
        .arg("--socket")
        .arg(&fx.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn second vdisk");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = second.try_wait().expect("wait second vdisk") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second vdisk on a live socket kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .expect("stderr pipe")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "second daemon exited with {status}");
    let sock_name = fx
        .socket
        .file_name()
        .expect("socket name")
        .to_string_lossy()
        .into_owned();
    assert!(
        stderr.contains(&sock_name),
        "the error should name the socket {}; stderr was:\n{stderr}",
        fx.socket.display()
    );

    // The first daemon still owns the socket and serves its own image.
    assert!(
        fx.socket.exists(),
        "the second daemon removed the live socket"
    );
    let mut blk = connect(&fx.socket);
    fx.assert_device_matches(&mut blk.queue(0), "first daemon after the second failed");
}

#[test]
fn stale_socket_is_replaced() {
    if !vdisk_only() {
        return;
    }
    let fx = Fixture::new(4 * MIB);
    let mut d = fx.serve(Backend::Vdisk, &ServeOpts::default());
    d.child.kill().expect("SIGKILL vdisk");
    d.child.wait().expect("reap vdisk");
    drop(d);
    assert!(
        fx.socket.exists(),
        "a SIGKILLed daemon cannot remove its socket: the test needs the stale file"
    );
    let refused = std::os::unix::net::UnixStream::connect(&fx.socket)
        .expect_err("nobody listens on a stale socket");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    // Daemon::vdisk returns as soon as the path exists (it already does); Blk::connect retries
    // until the new daemon listens.
    let mut d = fx.serve(Backend::Vdisk, &ServeOpts::default());
    let mut blk = connect(&fx.socket);
    fx.assert_device_matches(&mut blk.queue(0), "new daemon on a stale socket");
    assert!(
        d.child.try_wait().expect("wait vdisk").is_none(),
        "new daemon exited"
    );
}
