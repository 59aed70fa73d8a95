//! The VMM and guest-driver side of the whole-protocol tests (`frontend_protocol` for vdisk,
//! `vswitch_protocol` for vswitch), driven by `vhost::vhost_user::Frontend`: guest memory in
//! memfds handed over with SET_MEM_TABLE and/or ADD_MEM_REG, and split virtqueues laid out by
//! hand (descriptor table, avail and used rings, indirect tables), with kick and call
//! eventfds.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const MIB: u64 = 1 << 20;
/// Longest wait for one completion or notification; everything is local, so this only
/// bounds a hang.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(3);
/// Room for one indirect table per descriptor head: up to this many descriptors each.
const INDIRECT_MAX: u64 = 16;

// ---------------------------------------------------------------------------------------------
// Guest memory

/// How the guest memory regions reach the backend.
#[derive(Clone, Copy, Debug)]
pub enum MemSetup {
    /// All regions in one SET_MEM_TABLE.
    MemTable,
    /// Each region with its own ADD_MEM_REG.
    AddMemRegion,
    /// The first region with SET_MEM_TABLE, the others with ADD_MEM_REG.
    Mixed,
}

pub fn memfd(size: u64) -> File {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"e2e-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).expect("size the guest memory memfd");
    file
}

/// Guest memory of memfd-backed regions, each (guest-physical address, size).
pub fn guest_memory(regions: &[(u64, u64)]) -> GuestMemoryMmap<()> {
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

/// Hand the regions of `mem` to the backend as `setup` says.
pub fn send_memory(fe: &mut Frontend, mem: &GuestMemoryMmap<()>, setup: MemSetup) {
    let infos: Vec<VhostUserMemoryRegionInfo> = mem
        .iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("memfd-backed region"))
        .collect();
    let in_table = match setup {
        MemSetup::MemTable => infos.len(),
        MemSetup::AddMemRegion => 0,
        MemSetup::Mixed => 1,
    };
    if in_table > 0 {
        fe.set_mem_table(&infos[..in_table]).expect("SET_MEM_TABLE");
    }
    for info in &infos[in_table..] {
        fe.add_mem_region(info)
            .unwrap_or_else(|e| panic!("ADD_MEM_REG at {:#x}: {e}", info.guest_phys_addr));
    }
}

pub fn put(mem: &GuestMemoryMmap<()>, gpa: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(gpa))
        .unwrap_or_else(|e| panic!("test bug: write guest memory at {gpa:#x}: {e}"));
}

pub fn get(mem: &GuestMemoryMmap<()>, gpa: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(gpa))
        .unwrap_or_else(|e| panic!("test bug: read guest memory at {gpa:#x}: {e}"));
    buf
}

pub fn get_u16(mem: &GuestMemoryMmap<()>, gpa: u64) -> u16 {
    le16(&get(mem, gpa, 2), 0)
}

pub fn get_u32(mem: &GuestMemoryMmap<()>, gpa: u64) -> u32 {
    le32(&get(mem, gpa, 4), 0)
}

pub fn le16(c: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([c[off], c[off + 1]])
}

pub fn le32(c: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([c[off], c[off + 1], c[off + 2], c[off + 3]])
}

pub fn le64(c: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[off..off + 8]);
    u64::from_le_bytes(b)
}

/// The address the test process maps `gpa` at: what a VMM puts in vring addresses.
pub fn host_addr(mem: &GuestMemoryMmap<()>, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa))
        .expect("address inside guest memory") as u64
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The split virtqueue

#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A device-readable buffer.
pub fn ro(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

/// A device-writable buffer.
pub fn wo(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// Write one raw descriptor: `index` of the table at `table`.
pub fn write_raw_desc(
    mem: &GuestMemoryMmap<()>,
    table: u64,
    index: u16,
    (addr, len, flags, next): (u64, u32, u16, u16),
) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    put(mem, table + 16 * u64::from(index), &raw);
}

fn write_desc(mem: &GuestMemoryMmap<()>, table: u64, index: u16, d: Desc, next: Option<u16>) {
    let mut flags = 0u16;
    if d.write {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    if next.is_some() {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    write_raw_desc(mem, table, index, (d.addr, d.len, flags, next.unwrap_or(0)));
}

fn align_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// One split virtqueue laid out at a base address: descriptor table, avail ring, used ring
/// (each page-aligned), then one indirect table slot per descriptor head.
pub struct Ring {
    pub queue: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub indirect: u64,
    /// Whether VIRTIO_RING_F_EVENT_IDX is negotiated for this ring.
    pub event_idx: bool,
    next_avail: u16,
    next_desc: u16,
    used_seen: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Ring {
    pub fn new(queue: usize, size: u16, base: u64, event_idx: bool) -> Ring {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = align_up(avail + 6 + 2 * n, 0x1000);
        let indirect = align_up(used + 6 + 8 * n, 0x1000);
        Ring {
            queue,
            size,
            desc: base,
            avail,
            used,
            indirect,
            event_idx,
            next_avail: 0,
            next_desc: 0,
            used_seen: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    /// First guest-physical address after the ring and its indirect tables.
    pub fn end(&self) -> u64 {
        self.indirect + u64::from(self.size) * 16 * INDIRECT_MAX
    }

    /// The next avail index the driver will fill: every chain posted so far.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The used index up to which the driver has taken the used elements.
    pub fn used_seen(&self) -> u16 {
        self.used_seen
    }

    /// SET_VRING_NUM, _ADDR, _BASE (0), _CALL, _KICK and _ENABLE for this ring.
    pub fn start(&self, fe: &mut Frontend, mem: &GuestMemoryMmap<()>) {
        let q = self.queue;
        fe.set_vring_num(q, self.size).expect("SET_VRING_NUM");
        let addrs = VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: host_addr(mem, self.desc),
            used_ring_addr: host_addr(mem, self.used),
            avail_ring_addr: host_addr(mem, self.avail),
            log_addr: None,
        };
        fe.set_vring_addr(q, &addrs).expect("SET_VRING_ADDR");
        fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
        fe.set_vring_call(q, &self.call).expect("SET_VRING_CALL");
        fe.set_vring_kick(q, &self.kick).expect("SET_VRING_KICK");
        fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    }

    /// Reserve `n` consecutive descriptor slots (wrapping); returns the first.
    pub fn alloc_descs(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        self.next_desc = (first + n) % self.size;
        first
    }

    /// Write `chain` into the descriptor table (directly, or through an indirect table);
    /// returns its head. Not yet made available.
    pub fn write_chain(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        chain: &[Desc],
        indirect: bool,
    ) -> u16 {
        let n = chain.len() as u16;
        if indirect {
            assert!(
                u64::from(n) <= INDIRECT_MAX,
                "test bug: indirect table too long"
            );
            let head = self.alloc_descs(1);
            let table = self.indirect_table(head);
            for (i, d) in chain.iter().enumerate() {
                let i = i as u16;
                write_desc(mem, table, i, *d, (i + 1 < n).then_some(i + 1));
            }
            let flags = VRING_DESC_F_INDIRECT as u16;
            write_raw_desc(mem, self.desc, head, (table, 16 * u32::from(n), flags, 0));
            head
        } else {
            let head = self.alloc_descs(n);
            for (i, d) in chain.iter().enumerate() {
                let i = i as u16;
                let index = (head + i) % self.size;
                let next = (i + 1 < n).then_some((head + i + 1) % self.size);
                write_desc(mem, self.desc, index, *d, next);
            }
            head
        }
    }

    /// Where the indirect table of the chain with head `head` goes.
    pub fn indirect_table(&self, head: u16) -> u64 {
        self.indirect + u64::from(head) * 16 * INDIRECT_MAX
    }

    /// Put `head` in the avail ring and publish the new avail index (no kick).
    pub fn make_available(&mut self, mem: &GuestMemoryMmap<()>, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        put(mem, self.avail + 4 + 2 * slot, &head.to_le_bytes());
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.set_avail_idx(mem, self.next_avail);
    }

    /// Write `chain` and make it available (no kick); returns its head.
    pub fn post(&mut self, mem: &GuestMemoryMmap<()>, chain: &[Desc], indirect: bool) -> u16 {
        let head = self.write_chain(mem, chain, indirect);
        self.make_available(mem, head);
        head
    }

    /// Store `idx` as the avail index (a bogus one too); the driver's own count is kept.
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap<()>, idx: u16) {
        put(mem, self.avail + 2, &idx.to_le_bytes());
        fence(Ordering::SeqCst);
    }

    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap<()>, flags: u16) {
        put(mem, self.avail, &flags.to_le_bytes());
        fence(Ordering::SeqCst);
    }

    /// used_event (EVENT_IDX): ask for a call once the used index passes `idx`.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap<()>, idx: u16) {
        put(
            mem,
            self.avail + 4 + 2 * u64::from(self.size),
            &idx.to_le_bytes(),
        );
        fence(Ordering::SeqCst);
    }

    pub fn kick(&self) {
        self.kick.write(1).expect("kick the queue");
    }

    /// The device's used ring flags (VRING_USED_F_NO_NOTIFY: no kicks wanted).
    pub fn used_flags(&self, mem: &GuestMemoryMmap<()>) -> u16 {
        fence(Ordering::SeqCst);
        get_u16(mem, self.used)
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap<()>) -> u16 {
        fence(Ordering::SeqCst);
        get_u16(mem, self.used + 2)
    }

    /// The used elements (id, len) the device published since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap<()>) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let ahead = idx.wrapping_sub(self.used_seen);
        assert!(
            ahead <= self.size,
            "used.idx {idx} is {ahead} entries ahead of the driver's {}, on a ring of {}",
            self.used_seen,
            self.size
        );
        let mut out = Vec::new();
        while self.used_seen != idx {
            let elem = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            out.push((get_u32(mem, elem), get_u32(mem, elem + 4)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Wait (bounded) until the device has used `n` more chains, and take exactly those.
    pub fn wait_used(&mut self, mem: &GuestMemoryMmap<()>, n: u16) -> Vec<(u32, u32)> {
        let want = self.used_seen.wrapping_add(n);
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        while self.used_idx(mem).wrapping_sub(self.used_seen) < n {
            assert!(
                Instant::now() < deadline,
                "queue {}: the device used {} of {n} chains within {COMPLETION_TIMEOUT:?}",
                self.queue,
                self.used_idx(mem).wrapping_sub(self.used_seen)
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let used = self.take_used(mem);
        assert_eq!(
            self.used_seen, want,
            "queue {}: used.idx must advance by exactly {n}, got {used:?}",
            self.queue
        );
        used
    }

    /// Wait (bounded) until the device has re-enabled kicks after its last batch: with
    /// EVENT_IDX it publishes avail_event = the next avail index, without it clears
    /// VRING_USED_F_NO_NOTIFY. Anything the device did before, such as calling the driver,
    /// has happened once this returns.
    pub fn wait_rearmed(&self, mem: &GuestMemoryMmap<()>) {
        let avail_event_at = self.used + 4 + 8 * u64::from(self.size);
        let rearmed = || {
            fence(Ordering::SeqCst);
            if self.event_idx {
                get_u16(mem, avail_event_at) == self.next_avail
            } else {
                get_u16(mem, self.used) & VRING_USED_F_NO_NOTIFY as u16 == 0
            }
        };
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        while !rearmed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(
            rearmed(),
            "queue {}: the device must re-enable kicks after its batch ({})",
            self.queue,
            if self.event_idx {
                "used ring avail_event = the next avail index"
            } else {
                "VRING_USED_F_NO_NOTIFY cleared"
            }
        );
    }

    /// Publish `chain` (directly, or through an indirect table), ask for a call for it,
    /// kick, and wait for its used entry (the only one), the call notification and the
    /// device re-enabling kicks. Returns the used length.
    pub fn submit(&mut self, mem: &GuestMemoryMmap<()>, chain: &[Desc], indirect: bool) -> u32 {
        let head = self.write_chain(mem, chain, indirect);
        self.submit_head(mem, head)
    }

    /// [`Ring::submit`] of a chain already in the descriptor table at `head`.
    pub fn submit_head(&mut self, mem: &GuestMemoryMmap<()>, head: u16) -> u32 {
        // used_event (EVENT_IDX): ask to be notified for this very chain.
        self.set_used_event(mem, self.used_seen);
        self.make_available(mem, head);
        self.kick();
        self.wait_call();
        let used = self.wait_used(mem, 1);
        self.wait_rearmed(mem);
        let (id, len) = used[0];
        assert_eq!(
            id,
            u32::from(head),
            "used ring entry must name the head of the chain just submitted"
        );
        len
    }

    /// Wait (bounded) for a call notification and consume it.
    pub fn wait_call(&self) {
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
                "queue {}: no call notification within {COMPLETION_TIMEOUT:?}: the device did \
                 not use the chain (or did not signal it)",
                self.queue
            );
        }
        self.call.read().expect("consume the call eventfd");
    }

    /// Whether a call notification is pending (consumes it), without waiting.
    pub fn called(&self) -> bool {
        self.call.read().is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// The vhost-user session

/// Connect a frontend to `socket`, retrying for a few seconds while the daemon comes up.
pub fn connect(socket: &Path, num_queues: u64) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Frontend::connect(socket, num_queues) {
            Ok(fe) => return fe,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {}: {e}; retrying", socket.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect a frontend to {}: {e}", socket.display()),
        }
    }
}

/// GET_CONFIG of the first `len` bytes of the device's config space.
pub fn config_space(fe: &mut Frontend, len: usize) -> Vec<u8> {
    let (reply, data) = fe
        .get_config(
            0,
            len as u32,
            VhostUserConfigFlags::empty(),
            &vec![0u8; len],
        )
        .expect("GET_CONFIG of the whole config space");
    assert_eq!(reply.size as usize, len, "GET_CONFIG reply size");
    assert_eq!(data.len(), len, "GET_CONFIG payload size");
    data
}

/// GET_PROTOCOL_FEATURES, check that each of `wanted` is offered, SET_PROTOCOL_FEATURES
/// with them, and ask for an ack of every later request (so a refusal is an error at its
/// call site). Returns what the backend offered.
pub fn ack_protocol_features(
    fe: &mut Frontend,
    wanted: &[(VhostUserProtocolFeatures, &str)],
) -> VhostUserProtocolFeatures {
    let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    let mut ack = VhostUserProtocolFeatures::empty();
    for &(flag, name) in wanted {
        assert!(
            proto.contains(flag),
            "backend must offer protocol feature {name}; offered {proto:?}"
        );
        ack |= flag;
    }
    fe.set_protocol_features(ack)
        .expect("SET_PROTOCOL_FEATURES");
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    proto
}
