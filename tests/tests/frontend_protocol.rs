//! The whole vhost-user-blk protocol against a real `vdisk serve` process, driven by
//! `vhost::vhost_user::Frontend` (the frontend code cloud-hypervisor uses): feature and
//! protocol-feature negotiation, the config space, guest memory in memfds (handed over with
//! SET_MEM_TABLE, or region by region with ADD_MEM_REG), a split virtqueue laid out by hand,
//! real virtio-blk requests (good ones and hostile ones), SET_CONFIG, GET_VRING_BASE, a second
//! frontend after a disconnect, and SIGTERM.
//!
//! The test plays the VMM and the guest driver: it owns the guest memory, writes descriptors,
//! the avail ring and request headers itself, kicks an eventfd and waits on the call eventfd.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use e2e::frontend::{
    ack_protocol_features, config_space, connect, get, guest_memory, le16, le32, le64, pattern,
    put, ro, send_memory, wo, Desc, MemSetup, Ring, MIB,
};
use e2e::Daemon;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_ZONE_REPORT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryMmap;

const SECTOR: u64 = 512;
/// 2048 sectors, sparse.
const IMAGE_SIZE: u64 = 1 << 20;
const CAPACITY: u64 = IMAGE_SIZE / SECTOR;
const NUM_QUEUES: u16 = 2;
const QUEUE_SIZE: u16 = 256;
/// Shorter than 20 bytes: GET_ID must pad it with NULs.
const SERIAL: &str = "vdisk-fp-serial";

/// Offsets into `struct virtio_blk_config`.
mod cfg {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const LEN: usize = 60;
}

// ---------------------------------------------------------------------------------------------
// Guest memory

/// Where things live in guest-physical memory.
struct Layout {
    /// Descriptor table, rings, indirect tables, request header and status byte.
    ring_base: u64,
    /// Data buffers (at least 1 MiB).
    data_base: u64,
    /// A guest-physical address no region covers.
    hole: u64,
    /// End of the highest region.
    mem_end: u64,
}

/// (guest-physical address, size) of each region `setup` uses, and the layout inside them:
/// one 4 MiB region, or two with a hole between them.
fn regions(setup: MemSetup) -> (Vec<(u64, u64)>, Layout) {
    match setup {
        MemSetup::MemTable => {
            let base = MIB;
            (
                vec![(base, 4 * MIB)],
                Layout {
                    ring_base: base,
                    data_base: base + MIB,
                    hole: base + 4 * MIB,
                    mem_end: base + 4 * MIB,
                },
            )
        }
        MemSetup::AddMemRegion | MemSetup::Mixed => {
            let rings = MIB;
            let data = 16 * MIB;
            (
                vec![(rings, MIB), (data, 2 * MIB)],
                Layout {
                    ring_base: rings,
                    data_base: data,
                    hole: 8 * MIB,
                    mem_end: data + 2 * MIB,
                },
            )
        }
    }
}

/// A completed request as the guest sees it.
#[derive(Debug)]
struct Done {
    status: u8,
    used_len: u32,
}

// ---------------------------------------------------------------------------------------------
// One frontend session

struct Session {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    layout: Layout,
    ring: Ring,
    /// The request header and, after it, the status byte.
    header: u64,
    status: u64,
}

fn blk_config(fe: &mut Frontend) -> Vec<u8> {
    config_space(fe, cfg::LEN)
}

/// Step 1: everything a VMM does before it touches memory or rings.
fn negotiate(fe: &mut Frontend) {
    fe.set_owner().expect("SET_OWNER");

    let features = fe.get_features().expect("GET_FEATURES");
    let must_offer = [
        (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
        (VIRTIO_RING_F_EVENT_IDX, "VIRTIO_RING_F_EVENT_IDX"),
        (VIRTIO_RING_F_INDIRECT_DESC, "VIRTIO_RING_F_INDIRECT_DESC"),
        (VIRTIO_BLK_F_FLUSH, "VIRTIO_BLK_F_FLUSH"),
        (VIRTIO_BLK_F_DISCARD, "VIRTIO_BLK_F_DISCARD"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "VIRTIO_BLK_F_WRITE_ZEROES"),
        (VIRTIO_BLK_F_MQ, "VIRTIO_BLK_F_MQ"),
        (VIRTIO_BLK_F_CONFIG_WCE, "VIRTIO_BLK_F_CONFIG_WCE"),
        (VIRTIO_BLK_F_BLK_SIZE, "VIRTIO_BLK_F_BLK_SIZE"),
        (VIRTIO_BLK_F_SEG_MAX, "VIRTIO_BLK_F_SEG_MAX"),
        (VIRTIO_BLK_F_SIZE_MAX, "VIRTIO_BLK_F_SIZE_MAX"),
    ];
    for (bit, name) in must_offer {
        assert!(
            features & (1 << bit) != 0,
            "device must offer {name} (bit {bit}); offered {features:#x}"
        );
    }
    assert!(
        features & (1 << VIRTIO_BLK_F_RO) == 0,
        "a read-write export must not offer VIRTIO_BLK_F_RO; offered {features:#x}"
    );
    assert!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0,
        "backend must offer VHOST_USER_F_PROTOCOL_FEATURES; offered {features:#x}"
    );

    ack_protocol_features(
        fe,
        &[
            (VhostUserProtocolFeatures::CONFIG, "CONFIG"),
            (VhostUserProtocolFeatures::MQ, "MQ"),
            (VhostUserProtocolFeatures::REPLY_ACK, "REPLY_ACK"),
            (
                VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                "CONFIGURE_MEM_SLOTS",
            ),
        ],
    );

    let queues = fe.get_queue_num().expect("GET_QUEUE_NUM");
    assert_eq!(
        queues,
        u64::from(NUM_QUEUES),
        "GET_QUEUE_NUM must equal --num-queues"
    );
    let slots = fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
    assert!(
        slots >= 2,
        "GET_MAX_MEM_SLOTS must allow at least the two regions this test adds, got {slots}"
    );

    let c = blk_config(fe);
    assert_eq!(
        le64(&c, cfg::CAPACITY),
        CAPACITY,
        "config capacity must be the image size / 512"
    );
    assert_eq!(
        le16(&c, cfg::NUM_QUEUES),
        NUM_QUEUES,
        "config num_queues must equal --num-queues"
    );
    assert_eq!(
        le32(&c, cfg::SEG_MAX),
        u32::from(QUEUE_SIZE) - 2,
        "config seg_max must leave room for header and status in a full queue"
    );
    assert_eq!(le32(&c, cfg::BLK_SIZE), 512, "config blk_size");
    assert!(
        le32(&c, cfg::SIZE_MAX) >= 4096,
        "config size_max must allow at least a page, got {}",
        le32(&c, cfg::SIZE_MAX)
    );
    assert!(
        le32(&c, cfg::MAX_DISCARD_SECTORS) > 0 && le32(&c, cfg::MAX_WRITE_ZEROES_SECTORS) > 0,
        "DISCARD / WRITE_ZEROES are offered, so their limits must be non-zero"
    );

    // Accept everything offered: this frontend knows all of it.
    fe.set_features(features).expect("SET_FEATURES");

    let c = blk_config(fe);
    assert_eq!(
        c[cfg::WRITEBACK],
        1,
        "with FLUSH negotiated the cache starts in write-back mode"
    );
}

impl Session {
    /// Connect, negotiate, hand over the guest memory and start `queue`.
    fn start(socket: &Path, setup: MemSetup, queue: usize) -> Session {
        let mut fe = connect(socket, u64::from(NUM_QUEUES));
        negotiate(&mut fe);

        // Step 2: guest memory.
        let (regions, layout) = regions(setup);
        let mem = guest_memory(&regions);
        send_memory(&mut fe, &mem, setup);

        // Step 3: the queue.
        let ring = Ring::new(queue, QUEUE_SIZE, layout.ring_base, true);
        ring.start(&mut fe, &mem);
        let header = ring.end();
        Session {
            fe,
            mem,
            layout,
            ring,
            header,
            status: header + 0x100,
        }
    }

    /// One virtio-blk request: header, `data`, status byte.
    fn request(&mut self, req_type: u32, sector: u64, data: &[Desc], indirect: bool) -> Done {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req_type.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        put(&self.mem, self.header, &hdr);
        // A value no device writes, so a missing status write shows.
        put(&self.mem, self.status, &[0xa5]);
        let mut chain = vec![ro(self.header, 16)];
        chain.extend_from_slice(data);
        chain.push(wo(self.status, 1));
        let used_len = self.ring.submit(&self.mem, &chain, indirect);
        let status = get(&self.mem, self.status, 1)[0];
        Done { status, used_len }
    }

    /// WRITE `bytes` at `sector`, from the data area, split into two descriptors.
    fn write(&mut self, sector: u64, bytes: &[u8], indirect: bool) -> Done {
        let base = self.layout.data_base;
        put(&self.mem, base, bytes);
        let half = (bytes.len() / 2) as u32 & !511;
        let rest = bytes.len() as u32 - half;
        let descs = [ro(base, half), ro(base + u64::from(half), rest)];
        self.request(VIRTIO_BLK_T_OUT, sector, &descs, indirect)
    }

    /// READ `len` bytes at `sector` into a scrubbed buffer, split into two descriptors.
    fn read(&mut self, sector: u64, len: usize, indirect: bool) -> (Done, Vec<u8>) {
        let base = self.layout.data_base + 512 * 1024;
        put(&self.mem, base, &vec![0xee; len]);
        let half = (len / 2) as u32 & !511;
        let rest = len as u32 - half;
        let descs = [wo(base, half), wo(base + u64::from(half), rest)];
        let done = self.request(VIRTIO_BLK_T_IN, sector, &descs, indirect);
        (done, get(&self.mem, base, len))
    }
}

#[track_caller]
fn assert_ok(what: &str, done: &Done, used_len: u32) {
    assert_eq!(
        done.status, VIRTIO_BLK_S_OK as u8,
        "{what}: status must be VIRTIO_BLK_S_OK ({done:?})"
    );
    assert_eq!(
        done.used_len, used_len,
        "{what}: used length must count the data-in bytes plus the status byte"
    );
}

#[track_caller]
fn assert_status(what: &str, done: &Done, status: u32) {
    assert_eq!(
        done.status, status as u8,
        "{what}: status must be {status} ({done:?})"
    );
    assert_eq!(
        done.used_len, 1,
        "{what}: a failed request writes only the status byte"
    );
}

fn file_bytes(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(image).expect("open the image on the host");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .expect("read the image on the host");
    buf
}

#[track_caller]
fn assert_alive(daemon: &mut Daemon, after: &str) {
    if let Ok(Some(status)) = daemon.child.try_wait() {
        panic!("vdisk exited with {status} after {after}");
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario

struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("create temp dir");
    let image = dir.path().join("disk.raw");
    let socket = dir.path().join("vdisk.sock");
    File::create(&image)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("create the image");
    Fixture {
        _dir: dir,
        image,
        socket,
    }
}

const SECTOR_A: u64 = 8;
const SECTOR_B: u64 = 400;
const SECTOR_WT: u64 = 1000;
const SECTOR_BAD: u64 = 300;

fn run(setup: MemSetup, engine: &str) {
    let fx = fixture();
    let num_queues = NUM_QUEUES.to_string();
    let queue_size = QUEUE_SIZE.to_string();
    let mut daemon = Daemon::vdisk(
        &fx.image,
        &fx.socket,
        &[
            "--num-queues",
            &num_queues,
            "--queue-size",
            &queue_size,
            "--serial",
            SERIAL,
            "--engine",
            engine,
        ],
    );
    let started = Instant::now();

    // ---- Session 1, on queue 0 -------------------------------------------------------------
    let mut s = Session::start(&fx.socket, setup, 0);
    let data_base = s.layout.data_base;

    // WRITE a pattern, then find it in the image file on the host.
    let a = pattern(1, 4096);
    let done = s.write(SECTOR_A, &a, false);
    assert_ok("WRITE of 8 sectors", &done, 1);
    assert!(
        file_bytes(&fx.image, SECTOR_A * SECTOR, a.len()) == a,
        "WRITE completed OK but the image file does not hold the pattern at sector {SECTOR_A}"
    );

    // READ it back into guest memory.
    let (done, got) = s.read(SECTOR_A, a.len(), false);
    assert_ok("READ of 8 sectors", &done, a.len() as u32 + 1);
    assert!(got == a, "READ returned other data than the WRITE stored");

    // GET_ID returns the serial, NUL-padded to 20 bytes.
    put(&s.mem, data_base, &[0xff; VIRTIO_BLK_ID_BYTES as usize]);
    let done = s.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[wo(data_base, VIRTIO_BLK_ID_BYTES)],
        false,
    );
    let mut want_id = SERIAL.as_bytes().to_vec();
    want_id.resize(VIRTIO_BLK_ID_BYTES as usize, 0);
    assert_eq!(
        get(&s.mem, data_base, VIRTIO_BLK_ID_BYTES as usize),
        want_id,
        "GET_ID must return --serial padded with NULs"
    );
    assert_ok("GET_ID", &done, VIRTIO_BLK_ID_BYTES + 1);

    // FLUSH.
    let done = s.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_ok("FLUSH", &done, 1);

    // WRITE_ZEROES and DISCARD over part of a second pattern.
    let b = pattern(2, 8192);
    assert_ok("WRITE at sector B", &s.write(SECTOR_B, &b, false), 1);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&SECTOR_B.to_le_bytes());
    seg[8..12].copy_from_slice(&4u32.to_le_bytes());
    put(&s.mem, data_base, &seg);
    let done = s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[ro(data_base, 16)], false);
    assert_ok("WRITE_ZEROES of 4 sectors", &done, 1);
    let mut b_zeroed = b.clone();
    b_zeroed[..2048].fill(0);
    assert!(
        file_bytes(&fx.image, SECTOR_B * SECTOR, b.len()) == b_zeroed,
        "WRITE_ZEROES of sectors {SECTOR_B}+4 must zero exactly those sectors in the image"
    );
    seg[0..8].copy_from_slice(&(SECTOR_B + 12).to_le_bytes());
    put(&s.mem, data_base, &seg);
    let done = s.request(VIRTIO_BLK_T_DISCARD, 0, &[ro(data_base, 16)], false);
    assert_ok("DISCARD of 4 sectors", &done, 1);
    assert!(
        file_bytes(&fx.image, (SECTOR_B + 4) * SECTOR, 4096) == b_zeroed[2048..6144],
        "DISCARD must leave sectors outside its range alone"
    );

    // Unsupported request types.
    for (req_type, what) in [
        (VIRTIO_BLK_T_ZONE_REPORT, "ZONE_REPORT (zoned not offered)"),
        (0x7777, "undefined type 0x7777"),
    ] {
        let done = s.request(req_type, 0, &[wo(data_base, 512)], false);
        assert_status(what, &done, VIRTIO_BLK_S_UNSUPP);
    }

    // Sectors beyond the capacity.
    let (done, _) = s.read(CAPACITY, 512, false);
    assert_status(
        "READ of the sector just past the end",
        &done,
        VIRTIO_BLK_S_IOERR,
    );
    let (done, _) = s.read(CAPACITY - 1, 1024, false);
    assert_status("READ straddling the end", &done, VIRTIO_BLK_S_IOERR);
    let done = s.write(u64::MAX / 2, &pattern(3, 1024), false);
    assert_status("WRITE at an absurd sector", &done, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        std::fs::metadata(&fx.image).expect("stat image").len(),
        IMAGE_SIZE,
        "a refused WRITE past the end must not grow the image"
    );

    // Data descriptors outside guest memory: IOERR, nothing written, and the daemon goes on.
    let hole = s.layout.hole;
    let straddle = s.layout.mem_end - 256;
    let done = s.request(VIRTIO_BLK_T_OUT, SECTOR_BAD, &[ro(hole, 512)], false);
    assert_status(
        "WRITE from a data descriptor in a memory hole",
        &done,
        VIRTIO_BLK_S_IOERR,
    );
    let done = s.request(VIRTIO_BLK_T_OUT, SECTOR_BAD, &[ro(straddle, 512)], false);
    assert_status(
        "WRITE from a data descriptor running off the end of memory",
        &done,
        VIRTIO_BLK_S_IOERR,
    );
    let done = s.request(VIRTIO_BLK_T_IN, SECTOR_A, &[wo(hole, 512)], false);
    assert_status(
        "READ into a data descriptor in a memory hole",
        &done,
        VIRTIO_BLK_S_IOERR,
    );
    assert!(
        file_bytes(&fx.image, SECTOR_BAD * SECTOR, 512)
            .iter()
            .all(|&x| x == 0),
        "a WRITE with an out-of-memory data descriptor must not touch the image"
    );
    assert_alive(&mut daemon, "out-of-memory descriptors");
    let (done, got) = s.read(SECTOR_A, a.len(), false);
    assert_ok("READ after the hostile requests", &done, a.len() as u32 + 1);
    assert!(
        got == a,
        "READ after the hostile requests returned wrong data"
    );

    // Indirect descriptor tables.
    let c = pattern(4, 8192);
    let done = s.write(SECTOR_B, &c, true);
    assert_ok("indirect WRITE", &done, 1);
    assert!(
        file_bytes(&fx.image, SECTOR_B * SECTOR, c.len()) == c,
        "indirect WRITE completed OK but the image does not hold its data"
    );
    let (done, got) = s.read(SECTOR_B, c.len(), true);
    assert_ok("indirect READ", &done, c.len() as u32 + 1);
    assert!(got == c, "indirect READ returned other data than stored");

    // SIZE_MAX, as advertised, is enforced: one data descriptor of exactly size_max is
    // served, one sector more is refused.
    let size_max = le32(&blk_config(&mut s.fe), cfg::SIZE_MAX);
    let base = s.layout.data_base;
    let done = s.request(VIRTIO_BLK_T_IN, 0, &[wo(base, size_max)], false);
    assert_ok("READ of one size_max descriptor", &done, size_max + 1);
    let bad_length = |socket: &Path| {
        e2e::vdisk_stats(socket)["err_bad_length"]
            .as_u64()
            .expect("err_bad_length")
    };
    let before = bad_length(&fx.socket);
    // Half of it at the disk's start (capacity is 1 MiB): refused for its descriptor's
    // size, not for the range.
    let done = s.request(VIRTIO_BLK_T_IN, 0, &[wo(base, size_max / 2 + 512)], false);
    assert_ok("READ of half size_max", &done, size_max / 2 + 512 + 1);
    let done = s.request(VIRTIO_BLK_T_IN, 0, &[wo(base, size_max + 512)], false);
    assert_status(
        "READ of a descriptor over size_max",
        &done,
        VIRTIO_BLK_S_IOERR,
    );
    assert_eq!(
        bad_length(&fx.socket),
        before + 1,
        "a descriptor over size_max is refused as a bad length"
    );
    assert_alive(&mut daemon, "a descriptor over size_max");

    // Step 4: the writeback byte is the one writable config field.
    s.fe.set_config(cfg::WRITEBACK as u32, VhostUserConfigFlags::WRITABLE, &[0])
        .expect("SET_CONFIG of writeback=0 must be accepted");
    assert_eq!(
        blk_config(&mut s.fe)[cfg::WRITEBACK],
        0,
        "GET_CONFIG must reflect writeback=0 (write-through)"
    );
    let wt = pattern(5, 2048);
    assert_ok(
        "WRITE in write-through mode",
        &s.write(SECTOR_WT, &wt, false),
        1,
    );
    assert!(
        file_bytes(&fx.image, SECTOR_WT * SECTOR, wt.len()) == wt,
        "write-through WRITE did not reach the image"
    );
    s.fe.set_config(cfg::WRITEBACK as u32, VhostUserConfigFlags::WRITABLE, &[1])
        .expect("SET_CONFIG of writeback=1 must be accepted");
    let (_, byte) =
        s.fe.get_config(
            cfg::WRITEBACK as u32,
            1,
            VhostUserConfigFlags::empty(),
            &[0],
        )
        .expect("GET_CONFIG of the writeback byte alone");
    assert_eq!(
        byte,
        [1],
        "GET_CONFIG must reflect writeback=1 (write-back)"
    );
    // Leave write-through behind: the next frontend must start from the default again.
    s.fe.set_config(cfg::WRITEBACK as u32, VhostUserConfigFlags::WRITABLE, &[0])
        .expect("SET_CONFIG of writeback=0 must be accepted");

    // Step 5: GET_VRING_BASE stops the ring and reports where the device got to.
    let submitted = s.ring.next_avail();
    let base = s.fe.get_vring_base(s.ring.queue).expect("GET_VRING_BASE");
    assert_eq!(
        base,
        u32::from(submitted),
        "GET_VRING_BASE must return the next avail index = the {submitted} requests submitted"
    );

    // A write to any other config field is ignored, as QEMU's virtio-blk does: the session
    // goes on and the field keeps its value.
    s.fe.set_config(
        cfg::CAPACITY as u32,
        VhostUserConfigFlags::WRITABLE,
        &[0xff; 8],
    )
    .expect("SET_CONFIG of a read-only field is acknowledged and ignored");
    let (_, capacity) =
        s.fe.get_config(
            cfg::CAPACITY as u32,
            8,
            VhostUserConfigFlags::WRITABLE,
            &[0; 8],
        )
        .expect("GET_CONFIG after an ignored write: the session must survive");
    assert_eq!(
        capacity,
        CAPACITY.to_le_bytes(),
        "an ignored SET_CONFIG must not change the capacity"
    );
    assert_alive(&mut daemon, "an ignored SET_CONFIG");
    drop(s);

    // ---- Session 2: a new frontend on the same daemon process, on queue 1 -------------------
    // negotiate() checks the config space again: capacity untouched by the refused write,
    // and writeback back to 1 for the new driver.
    let mut s = Session::start(&fx.socket, setup, 1);
    let (done, got) = s.read(SECTOR_A, a.len(), false);
    assert_ok("READ in the second session", &done, a.len() as u32 + 1);
    assert!(
        got == a,
        "the second frontend must read the data the first one wrote"
    );
    let (done, got) = s.read(SECTOR_WT, wt.len(), true);
    assert_ok(
        "indirect READ in the second session",
        &done,
        wt.len() as u32 + 1,
    );
    assert!(got == wt, "second session: write-through data lost");

    // Step 6: SIGTERM with the second frontend still attached.
    let socket = fx.socket.clone();
    let status = daemon.terminate();
    assert!(
        status.success(),
        "vdisk must exit 0 on SIGTERM, got {status}"
    );
    assert!(
        !socket.exists(),
        "vdisk must remove its socket {} on SIGTERM",
        socket.display()
    );
    drop(s);
    eprintln!(
        "{setup:?} / {engine}: whole protocol in {:?}",
        started.elapsed()
    );
}

#[test]
fn whole_protocol_mem_table_io_uring() {
    run(MemSetup::MemTable, "io_uring");
}

#[test]
fn whole_protocol_add_mem_region_sync() {
    run(MemSetup::AddMemRegion, "sync");
}
