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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use e2e::Daemon;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_ZONE_REPORT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const SECTOR: u64 = 512;
/// 2048 sectors, sparse.
const IMAGE_SIZE: u64 = 1 << 20;
const CAPACITY: u64 = IMAGE_SIZE / SECTOR;
const NUM_QUEUES: u16 = 2;
const QUEUE_SIZE: u16 = 256;
/// Shorter than 20 bytes: GET_ID must pad it with NULs.
const SERIAL: &str = "vdisk-fp-serial";
/// Longest wait for one completion; everything is local, so this only bounds a hang.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(3);
const MIB: u64 = 1 << 20;

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

/// How the guest memory reaches the backend.
#[derive(Clone, Copy, Debug)]
enum MemSetup {
    /// One 4 MiB memfd region, sent with SET_MEM_TABLE.
    MemTable,
    /// Two memfd regions with a hole between them, each sent with ADD_MEM_REG.
    AddMemRegion,
}

/// Where things live in guest-physical memory.
struct Layout {
    /// Descriptor table, rings, indirect table, request header and status byte.
    ring_base: u64,
    /// Data buffers (at least 1 MiB).
    data_base: u64,
    /// A guest-physical address no region covers.
    hole: u64,
    /// End of the highest region.
    mem_end: u64,
}

impl MemSetup {
    /// (guest-physical address, size) of each region, and the layout inside them.
    fn regions(self) -> (Vec<(u64, u64)>, Layout) {
        match self {
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
            MemSetup::AddMemRegion => {
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
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"vdisk-e2e-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).expect("size the guest memory memfd");
    file
}

fn guest_memory(regions: &[(u64, u64)]) -> GuestMemoryMmap<()> {
    let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = regions
        .iter()
        .map(|&(gpa, size)| {
            (
                GuestAddress(gpa),
                size as usize,
                Some(FileOffset::new(memfd(size), 0)),
            )
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).expect("map guest memory")
}

fn put(mem: &GuestMemoryMmap<()>, gpa: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(gpa))
        .unwrap_or_else(|e| panic!("test bug: write guest memory at {gpa:#x}: {e}"));
}

fn get(mem: &GuestMemoryMmap<()>, gpa: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(gpa))
        .unwrap_or_else(|e| panic!("test bug: read guest memory at {gpa:#x}: {e}"));
    buf
}

fn get_u16(mem: &GuestMemoryMmap<()>, gpa: u64) -> u16 {
    let b = get(mem, gpa, 2);
    u16::from_le_bytes([b[0], b[1]])
}

fn get_u32(mem: &GuestMemoryMmap<()>, gpa: u64) -> u32 {
    let b = get(mem, gpa, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The address the test process maps `gpa` at: what a VMM puts in vring addresses.
fn host_addr(mem: &GuestMemoryMmap<()>, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa))
        .expect("address inside guest memory") as u64
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The split virtqueue

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    /// Device-writable.
    write: bool,
}

fn ro(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

fn wo(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// A completed request as the guest sees it.
#[derive(Debug)]
struct Done {
    status: u8,
    used_len: u32,
}

/// The one queue a session uses, laid out at `Layout::ring_base`.
struct Ring {
    queue: usize,
    desc: u64,
    avail: u64,
    used: u64,
    indirect: u64,
    header: u64,
    status: u64,
    next_avail: u16,
    next_desc: u16,
    used_seen: u16,
    kick: EventFd,
    call: EventFd,
}

impl Ring {
    fn new(queue: usize, base: u64) -> Ring {
        Ring {
            queue,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            indirect: base + 0x3000,
            header: base + 0x4000,
            status: base + 0x4100,
            next_avail: 0,
            next_desc: 0,
            used_seen: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    fn write_desc(mem: &GuestMemoryMmap<()>, table: u64, index: u16, d: Desc, next: Option<u16>) {
        let mut flags = 0u16;
        if d.write {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
        put(mem, table + 16 * u64::from(index), &raw);
    }

    /// Publish `chain` (directly, or through an indirect table), kick, and wait for its used
    /// entry and the call notification.
    fn submit(&mut self, mem: &GuestMemoryMmap<()>, chain: &[Desc], indirect: bool) -> u32 {
        let n = chain.len() as u16;
        let head = self.next_desc;
        if indirect {
            for (i, d) in chain.iter().enumerate() {
                let i = i as u16;
                Ring::write_desc(mem, self.indirect, i, *d, (i + 1 < n).then_some(i + 1));
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&self.indirect.to_le_bytes());
            raw[8..12].copy_from_slice(&(16 * u32::from(n)).to_le_bytes());
            raw[12..14].copy_from_slice(&(VRING_DESC_F_INDIRECT as u16).to_le_bytes());
            put(mem, self.desc + 16 * u64::from(head), &raw);
            self.next_desc = (head + 1) % QUEUE_SIZE;
        } else {
            for (i, d) in chain.iter().enumerate() {
                let i = i as u16;
                let index = (head + i) % QUEUE_SIZE;
                let next = (i + 1 < n).then_some((head + i + 1) % QUEUE_SIZE);
                Ring::write_desc(mem, self.desc, index, *d, next);
            }
            self.next_desc = (head + n) % QUEUE_SIZE;
        }

        let slot = u64::from(self.next_avail % QUEUE_SIZE);
        put(mem, self.avail + 4 + 2 * slot, &head.to_le_bytes());
        // used_event (EVENT_IDX): ask to be notified for this very request.
        put(
            mem,
            self.avail + 4 + 2 * u64::from(QUEUE_SIZE),
            &self.used_seen.to_le_bytes(),
        );
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        put(mem, self.avail + 2, &self.next_avail.to_le_bytes());
        fence(Ordering::SeqCst);
        self.kick.write(1).expect("kick the queue");

        self.wait_call();
        fence(Ordering::SeqCst);
        let used_idx = get_u16(mem, self.used + 2);
        let expected = self.used_seen.wrapping_add(1);
        assert_eq!(
            used_idx, expected,
            "used.idx after one request (head {head}) must advance by exactly one"
        );
        let elem = self.used + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
        let id = get_u32(mem, elem);
        let len = get_u32(mem, elem + 4);
        self.used_seen = expected;
        // EVENT_IDX is negotiated: the device re-enables kicks by publishing avail_event,
        // at the latest when its poll window (if any) after the last request has ended.
        let avail_event_at = self.used + 4 + 8 * u64::from(QUEUE_SIZE);
        let deadline = Instant::now() + Duration::from_secs(2);
        while get_u16(mem, avail_event_at) != self.next_avail && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        assert_eq!(
            get_u16(mem, avail_event_at),
            self.next_avail,
            "used ring avail_event must ask for a kick at the next avail index (EVENT_IDX)"
        );
        assert_eq!(
            id,
            u32::from(head),
            "used ring entry must name the head of the chain just submitted"
        );
        len
    }

    fn wait_call(&self) {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // SAFETY: pfd is a valid pollfd for the duration of the call; nfds is 1.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
            if r > 0 {
                break;
            }
            if r < 0 {
                let err = std::io::Error::last_os_error();
                assert!(
                    err.kind() == std::io::ErrorKind::Interrupted,
                    "poll on the call eventfd: {err}"
                );
            }
            assert!(
                r < 0 || Instant::now() < deadline,
                "no call notification within {COMPLETION_TIMEOUT:?}: the daemon did not \
                 complete the request (or did not signal it)"
            );
        }
        self.call.read().expect("consume the call eventfd");
    }
}

// ---------------------------------------------------------------------------------------------
// One frontend session

struct Session {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    layout: Layout,
    ring: Ring,
}

fn connect(socket: &Path) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Frontend::connect(socket, u64::from(NUM_QUEUES)) {
            Ok(fe) => return fe,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {}: {e}; retrying", socket.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect a frontend to {}: {e}", socket.display()),
        }
    }
}

fn config_space(fe: &mut Frontend) -> Vec<u8> {
    let (reply, data) = fe
        .get_config(
            0,
            cfg::LEN as u32,
            VhostUserConfigFlags::empty(),
            &[0u8; cfg::LEN],
        )
        .expect("GET_CONFIG of the whole virtio_blk_config");
    assert_eq!(reply.size as usize, cfg::LEN, "GET_CONFIG reply size");
    assert_eq!(data.len(), cfg::LEN, "GET_CONFIG payload size");
    data
}

fn le16(c: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([c[off], c[off + 1]])
}

fn le32(c: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([c[off], c[off + 1], c[off + 2], c[off + 3]])
}

fn le64(c: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[off..off + 8]);
    u64::from_le_bytes(b)
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

    let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    for (flag, name) in [
        (VhostUserProtocolFeatures::CONFIG, "CONFIG"),
        (VhostUserProtocolFeatures::MQ, "MQ"),
        (VhostUserProtocolFeatures::REPLY_ACK, "REPLY_ACK"),
        (
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            "CONFIGURE_MEM_SLOTS",
        ),
    ] {
        assert!(
            proto.contains(flag),
            "backend must offer protocol feature {name}; offered {proto:?}"
        );
    }
    fe.set_protocol_features(wanted)
        .expect("SET_PROTOCOL_FEATURES");
    // From here on every request asks for an ack, so a refusal is an error at the call site.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);

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

    let c = config_space(fe);
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

    let c = config_space(fe);
    assert_eq!(
        c[cfg::WRITEBACK],
        1,
        "with FLUSH negotiated the cache starts in write-back mode"
    );
}

impl Session {
    /// Connect, negotiate, hand over the guest memory and start `queue`.
    fn start(socket: &Path, setup: MemSetup, queue: usize) -> Session {
        let mut fe = connect(socket);
        negotiate(&mut fe);

        // Step 2: guest memory.
        let (regions, layout) = setup.regions();
        let mem = guest_memory(&regions);
        let infos: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("memfd-backed region"))
            .collect();
        match setup {
            MemSetup::MemTable => {
                fe.set_mem_table(&infos).expect("SET_MEM_TABLE");
            }
            MemSetup::AddMemRegion => {
                for info in &infos {
                    fe.add_mem_region(info).unwrap_or_else(|e| {
                        panic!("ADD_MEM_REG at {:#x}: {e}", info.guest_phys_addr)
                    });
                }
            }
        }

        // Step 3: the queue.
        let ring = Ring::new(queue, layout.ring_base);
        fe.set_vring_num(queue, QUEUE_SIZE).expect("SET_VRING_NUM");
        let addrs = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: host_addr(&mem, ring.desc),
            used_ring_addr: host_addr(&mem, ring.used),
            avail_ring_addr: host_addr(&mem, ring.avail),
            log_addr: None,
        };
        fe.set_vring_addr(queue, &addrs).expect("SET_VRING_ADDR");
        fe.set_vring_base(queue, 0).expect("SET_VRING_BASE");
        fe.set_vring_call(queue, &ring.call)
            .expect("SET_VRING_CALL");
        fe.set_vring_kick(queue, &ring.kick)
            .expect("SET_VRING_KICK");
        fe.set_vring_enable(queue, true).expect("SET_VRING_ENABLE");

        Session {
            fe,
            mem,
            layout,
            ring,
        }
    }

    /// One virtio-blk request: header, `data`, status byte.
    fn request(&mut self, req_type: u32, sector: u64, data: &[Desc], indirect: bool) -> Done {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req_type.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        put(&self.mem, self.ring.header, &hdr);
        // A value no device writes, so a missing status write shows.
        put(&self.mem, self.ring.status, &[0xa5]);
        let mut chain = vec![ro(self.ring.header, 16)];
        chain.extend_from_slice(data);
        chain.push(wo(self.ring.status, 1));
        let used_len = self.ring.submit(&self.mem, &chain, indirect);
        let status = get(&self.mem, self.ring.status, 1)[0];
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

    // Step 4: the writeback byte is the one writable config field.
    s.fe.set_config(cfg::WRITEBACK as u32, VhostUserConfigFlags::WRITABLE, &[0])
        .expect("SET_CONFIG of writeback=0 must be accepted");
    assert_eq!(
        config_space(&mut s.fe)[cfg::WRITEBACK],
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
    let submitted = s.ring.next_avail;
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
