//! The switch: its ports, the forwarding database, and the forwarding decision for each
//! frame a guest sends.

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::VlanMode;
use crate::copy::{self, HostRange, Piece};
use crate::fdb::{Fdb, Learned};
use crate::frame::{Header, Mac, ETH_HLEN, PEEK_LEN, VLAN_HLEN};
use crate::net::NET_HDR_LEN;
use crate::qos::PortQos;
use crate::ring::Ring;
use crate::service::ServicePort;
use crate::stats::PortStats;
use crate::vlan::Egress;
use common::counters::bump;

pub type Mem = GuestMemoryMmap<()>;

/// How a port is set up.
#[derive(Clone, Debug)]
pub struct PortSpec {
    pub name: String,
    pub vlan: VlanMode,
    pub mac: Option<Mac>,
    /// Drop frames whose source is not `mac`.
    pub anti_spoof: bool,
    pub mtu: u16,
}

/// The guest-facing receive side of a port, fed by whichever port's thread has a frame
/// for it.
#[derive(Default)]
pub struct RxSide {
    pub vring: Option<VringRwLock>,
    mem: Option<GuestMemoryAtomic<Mem>>,
    mergeable: bool,
}

/// A frame taken from a transmit ring: its bytes (after the virtio-net header) are
/// `ranges[start..end]` of its batch's range list, `len` in all. The first range is the
/// switch's own copy of the frame's head, which `hdr` was parsed from; the others are the
/// rest of the frame in the sender's memory.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub hdr: Header,
    pub start: usize,
    pub end: usize,
    pub len: usize,
}

/// A frame on its way to one destination port.
#[derive(Clone, Copy, Debug)]
struct Out {
    start: usize,
    end: usize,
    len: usize,
    vlan: u16,
    tagged: bool,
}

/// Where one frame goes in a destination's receive ring.
enum Plan {
    /// The usual case: a frame in one source buffer, leaving as it came, into one receive
    /// buffer that holds it. The header, the frame's head (the switch's snapshot of it,
    /// PEEK_LEN bytes) and one copy of the rest, nothing to walk.
    Direct {
        head: *const u8,
        src: *const u8,
        dst: *mut u8,
        len: usize,
    },
    /// Anything else (a tag inserted or stripped, scattered buffers, a frame spanning
    /// several receive chains): index ranges into `Scratch`.
    Pieces {
        pieces: Range<usize>,
        dest: Range<usize>,
    },
}

/// A port worker's buffers, kept from batch to batch so forwarding does not allocate.
#[derive(Default)]
pub struct Scratch {
    /// Frames for each destination port, and the ports that have some, in order.
    outbox: Vec<Vec<Out>>,
    dests: Vec<usize>,
    service: Vec<Out>,
    accepted: Vec<Out>,
    plans: Vec<Plan>,
    pieces: Vec<Piece>,
    dest: Vec<HostRange>,
    /// Every receive chain taken, with its used length, in ring order: buffers are used in
    /// the order they were made available (VIRTIO_F_IN_ORDER), unusable ones included.
    used: Vec<(u16, u32)>,
    /// The entries of `used` that hold the frame being planned (their capacity until the
    /// frame fits).
    frame_chains: Vec<usize>,
}

// SAFETY: the host pointers in `pieces` and `dest` are only dereferenced during the
// `deliver` call that filled them, while it holds the memory views they point into; a
// scratch moved to another thread carries no live borrow.
unsafe impl Send for Scratch {}

impl Scratch {
    // Inlined so that `out` is stored from registers: passed by reference, it was
    // reloaded with 16-byte loads from the caller's 8- and 2-byte stores, and each such load
    // waited for those stores to retire.
    #[inline(always)]
    fn post(&mut self, port: usize, out: Out) {
        if self.outbox[port].is_empty() {
            self.dests.push(port);
        }
        self.outbox[port].push(out);
    }
}

/// The virtio-net header the switch writes before each frame it delivers: no offloads,
/// and `num_buffers`, how many receive chains the frame spans.
#[inline(always)]
fn net_header(num_buffers: u16) -> [u8; NET_HDR_LEN] {
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    hdr
}

pub struct Port {
    pub spec: PortSpec,
    pub qos: Mutex<PortQos>,
    pub stats: PortStats,
    pub rx: Mutex<RxSide>,
    pub mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
}

impl Port {
    pub fn qos(&self) -> MutexGuard<'_, PortQos> {
        match self.qos.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn rx(&self) -> MutexGuard<'_, RxSide> {
        match self.rx.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn count_drop(&self, counter: &AtomicU64, what: &str) {
        self.count_drops(counter, 1, what);
    }

    fn count_drops(&self, counter: &AtomicU64, frames: u64, what: &str) {
        let n = bump(counter, frames);
        if let Some(suppressed) = self.stats.may_log(counter) {
            warn!(port = %self.spec.name, count = n, suppressed, "dropped a frame: {what}");
        }
    }
}

pub struct Switch {
    pub ports: Vec<Arc<Port>>,
    fdb: Mutex<Fdb>,
    /// The VLANs' service endpoints, by VLAN id.
    services: Vec<(u16, Mutex<ServicePort>)>,
}

impl Switch {
    pub fn new(
        specs: Vec<(PortSpec, PortQos)>,
        services: Vec<ServicePort>,
        mac_table_size: usize,
        aging: Duration,
        limits: Vec<Option<u32>>,
    ) -> Switch {
        let ports = specs
            .into_iter()
            .map(|(spec, qos)| {
                Arc::new(Port {
                    spec,
                    qos: Mutex::new(qos),
                    stats: PortStats::default(),
                    rx: Mutex::new(RxSide::default()),
                    mem: RwLock::new(None),
                })
            })
            .collect();
        Switch {
            ports,
            fdb: Mutex::new(Fdb::new(mac_table_size, aging, limits)),
            services: services
                .into_iter()
                .map(|s| (s.vlan, Mutex::new(s)))
                .collect(),
        }
    }

    fn fdb(&self) -> MutexGuard<'_, Fdb> {
        match self.fdb.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The learned addresses, for `vswitch ctl fdb`.
    pub fn fdb_entries(&self) -> Vec<(u16, Mac, usize, Duration)> {
        let now = Instant::now();
        // Sorted after the lock is released: the forwarding threads wait on it.
        let mut entries = self.fdb().entries(now);
        entries.sort_by_key(|&(vlan, mac, _, _)| (vlan, mac));
        entries
    }

    /// A port's guest went away: forget its addresses and its receive ring.
    pub fn port_detached(&self, port: usize) {
        self.fdb().flush_port(port);
        let p = &self.ports[port];
        *p.rx() = RxSide::default();
        if let Ok(mut m) = p.mem.write() {
            *m = None;
        }
    }

    /// The port's guest set or changed its memory table.
    pub fn set_mem(&self, port: usize, mem: GuestMemoryAtomic<Mem>) {
        let p = &self.ports[port];
        if let Ok(mut m) = p.mem.write() {
            *m = Some(mem.clone());
        }
        p.rx().mem = Some(mem);
    }

    /// The port's worker saw its queues: senders may fill its receive ring from now on.
    pub fn attach_rx(&self, port: usize, vring: &VringRwLock, mergeable: bool) {
        let mut rx = self.ports[port].rx();
        if rx.vring.is_none() {
            rx.vring = Some(vring.clone());
        }
        rx.mergeable = mergeable;
    }

    /// Forward a batch of frames that port `src`'s guest sent. Each frame's bytes (after
    /// the virtio-net header) are `ranges[frame.start..frame.end]`, in the sender's memory,
    /// which the caller holds.
    pub fn forward_batch(
        &self,
        src: usize,
        frames: &[Frame],
        ranges: &[HostRange],
        s: &mut Scratch,
    ) {
        let sp = &self.ports[src];
        if s.outbox.len() < self.ports.len() {
            s.outbox.resize_with(self.ports.len(), Vec::new);
        }
        s.service.clear();
        // One clock read and one FDB lock for the whole batch.
        let now = Instant::now();
        let (mut packets, mut bytes) = (0u64, 0u64);
        {
            let mut fdb = self.fdb();
            let mut qos = None;
            // Consecutive frames of a flow share their addresses: the previous frame's
            // learning and lookup stand for theirs (same clock reading; a learn that
            // changes the table forgets the lookup).
            let mut learned: Option<(u16, Mac)> = None;
            let mut looked_up: Option<(u16, Mac, Option<usize>)> = None;
            for f in frames {
                let hdr = &f.hdr;
                if sp.spec.anti_spoof && Some(hdr.src) != sp.spec.mac {
                    sp.count_drop(&sp.stats.drop_spoof, "source MAC is not the port's");
                    continue;
                }
                let vlan = match sp.spec.vlan.ingress(hdr.tag) {
                    Ok(v) => v,
                    Err(e) => {
                        sp.count_drop(&sp.stats.drop_vlan, &e.to_string());
                        continue;
                    }
                };
                if !hdr.src.is_multicast() && !hdr.src.is_zero() && learned != Some((vlan, hdr.src))
                {
                    learned = None;
                    match fdb.learn(vlan, hdr.src, src, now) {
                        Learned::Refreshed => learned = Some((vlan, hdr.src)),
                        Learned::New => {
                            learned = Some((vlan, hdr.src));
                            looked_up = None;
                        }
                        Learned::Evicted { victim } => {
                            learned = Some((vlan, hdr.src));
                            looked_up = None;
                            bump(&sp.stats.fdb_full, 1);
                            bump(&self.ports[victim].stats.fdb_evicted, 1);
                        }
                        Learned::PortLimit => {
                            sp.count_drop(
                                &sp.stats.drop_mac_limit,
                                "the port's MAC limit is reached",
                            );
                            continue;
                        }
                        Learned::Moved { from } => {
                            learned = Some((vlan, hdr.src));
                            looked_up = None;
                            debug!(mac = %hdr.src, vlan, from = %self.ports[from].spec.name, to = %sp.spec.name, "MAC moved")
                        }
                    }
                }
                let dest = if hdr.dst.is_multicast() {
                    None
                } else {
                    match looked_up {
                        Some((v, m, d)) if v == vlan && m == hdr.dst => d,
                        _ => {
                            let d = fdb.lookup(vlan, hdr.dst, now);
                            looked_up = Some((vlan, hdr.dst, d));
                            d
                        }
                    }
                };
                let to_service = hdr.dst == ServicePort::mac_for(vlan);
                if dest.is_none() && !to_service {
                    let (q, now) = qos.get_or_insert_with(|| {
                        let q = sp.qos();
                        let now = q.storm.now_ns();
                        (q, now)
                    });
                    if q.storm.consume_at(0, 1, *now).is_err() {
                        sp.count_drop(&sp.stats.drop_storm, "storm control");
                        continue;
                    }
                }
                packets += 1;
                bytes += f.len as u64;
                let out = Out {
                    start: f.start,
                    end: f.end,
                    len: f.len,
                    vlan,
                    tagged: hdr.tag.is_some(),
                };
                if to_service {
                    s.service.push(out);
                    continue;
                }
                match dest {
                    Some(d) if d == src => {}
                    Some(d) => s.post(d, out),
                    None => {
                        for d in 0..self.ports.len() {
                            if d != src && self.ports[d].spec.vlan.carries(vlan) {
                                s.post(d, out);
                            }
                        }
                        if hdr.dst.is_multicast() {
                            s.service.push(out);
                        }
                    }
                }
            }
        }
        bump(&sp.stats.rx_packets, packets);
        bump(&sp.stats.rx_bytes, bytes);
        // Each destination's frames in one go: one ring lock and one avail index read.
        for k in 0..s.dests.len() {
            let d = s.dests[k];
            let items = std::mem::take(&mut s.outbox[d]);
            self.deliver(d, &items, ranges, s);
            let mut items = items;
            items.clear();
            s.outbox[d] = items;
        }
        s.dests.clear();
        let service = std::mem::take(&mut s.service);
        for o in &service {
            self.to_service(o, ranges, s);
        }
        s.service = service;
    }

    /// Give a frame to the VLAN's service endpoint, if it has one, and send its answers.
    /// This is the slow path (ARP and ping), so the frame is copied into a buffer.
    fn to_service(&self, o: &Out, ranges: &[HostRange], s: &mut Scratch) {
        let Some(service) = self.services.iter().find(|sv| sv.0 == o.vlan) else {
            return;
        };
        let egress = if o.tagged {
            Egress::Strip
        } else {
            Egress::AsIs
        };
        let mut pieces = Vec::new();
        let total = copy::plan(
            &ranges[o.start..o.end],
            egress,
            Piece::Inline {
                bytes: [0; 12],
                len: 0,
            },
            &mut pieces,
        );
        let mut buf = vec![0u8; total];
        let dest = [HostRange {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        // SAFETY: the source ranges are the sender's validated guest memory, held by the
        // caller; the destination is `buf`, alive for the call.
        unsafe { copy::copy(&pieces, &dest) };
        let replies = match service.1.lock() {
            Ok(mut sv) => sv.input(buf),
            Err(p) => p.into_inner().input(buf),
        };
        for mut reply in replies {
            self.inject(o.vlan, &mut reply, s);
        }
    }

    /// Send a frame the switch itself made (untagged) on `vlan`.
    fn inject(&self, vlan: u16, frame: &mut [u8], s: &mut Scratch) {
        let Ok(hdr) = crate::frame::parse(frame, frame.len()) else {
            return;
        };
        let range = [HostRange {
            ptr: frame.as_mut_ptr(),
            len: frame.len(),
        }];
        let out = [Out {
            start: 0,
            end: 1,
            len: frame.len(),
            vlan,
            tagged: false,
        }];
        let known = if hdr.dst.is_multicast() {
            None
        } else {
            self.fdb().lookup(vlan, hdr.dst, Instant::now())
        };
        match known {
            Some(d) => self.deliver(d, &out, &range, s),
            None => {
                for d in 0..self.ports.len() {
                    if self.ports[d].spec.vlan.carries(vlan) {
                        self.deliver(d, &out, &range, s);
                    }
                }
            }
        }
    }

    /// Copy `items` (frames in `ranges`) into port `dst`'s receive ring, in order. A frame
    /// that finds no room is dropped for this port only, with a counter.
    fn deliver(&self, dst: usize, items: &[Out], ranges: &[HostRange], s: &mut Scratch) {
        let p = &self.ports[dst];
        s.accepted.clear();
        for o in items {
            if !p.spec.vlan.carries(o.vlan) {
                continue;
            }
            // The tag never counts towards the MTU, whether it is kept, stripped or added.
            let tag = if o.tagged { VLAN_HLEN } else { 0 };
            if o.len.saturating_sub(ETH_HLEN + tag) > usize::from(p.spec.mtu) {
                p.count_drop(&p.stats.drop_mtu, "frame larger than the port's MTU");
                continue;
            }
            s.accepted.push(*o);
        }
        {
            let mut qos = p.qos();
            if !qos.rx.is_unlimited() {
                // One charge when the whole batch fits, else frame by frame.
                let now = qos.rx.now_ns();
                let bytes: usize = s.accepted.iter().map(|o| o.len).sum();
                let n = s.accepted.len() as u64;
                if qos.rx.consume_at(bytes as u64, n, now).is_err() {
                    s.accepted.retain(|o| {
                        let ok = qos.rx.consume_at(o.len as u64, 1, now).is_ok();
                        if !ok {
                            p.count_drop(&p.stats.drop_qos, "receive rate limit");
                        }
                        ok
                    });
                }
            }
        }
        if s.accepted.is_empty() {
            return;
        }
        let mut rx = p.rx();
        let RxSide {
            vring,
            mem,
            mergeable,
        } = &mut *rx;
        let (Some(vring), Some(mem)) = (vring.as_ref(), mem.as_ref()) else {
            // No guest (yet) on that port.
            bump(&p.stats.drop_no_rx_buffer, s.accepted.len() as u64);
            return;
        };
        let mut state = vring.get_mut();
        let event_idx = state.get_queue().event_idx_enabled();
        let queue = state.get_queue_mut();
        let view = mem.memory();
        let (ring, posted) = match Ring::new(queue, &view)
            .and_then(|ring| ring.posted(queue.next_avail()).map(|n| (ring, n)))
        {
            Ok(r) => r,
            Err(e) => {
                p.count_drops(
                    &p.stats.drop_no_rx_buffer,
                    s.accepted.len() as u64,
                    &format!("unusable receive ring: {e}"),
                );
                return;
            }
        };
        if !std::ptr::eq(&*view, &*mem.memory()) {
            // The guest's memory table changed while the index was read: the buffers it
            // names may lie in regions `view` does not have.
            p.count_drops(
                &p.stats.drop_no_rx_buffer,
                s.accepted.len() as u64,
                "guest memory changing",
            );
            return;
        }
        let next = queue.next_avail();
        ring.prefetch_chains(next, posted.min(s.accepted.len() as u16));
        // First take buffers for every frame, then copy: the buffers' cache lines load
        // while the next frame's buffers are looked up.
        s.plans.clear();
        s.pieces.clear();
        s.dest.clear();
        s.used.clear();
        let mut taken = 0u16;
        let mut no_room = 0;
        let mut bytes = 0u64;
        for (k, o) in s.accepted.iter().enumerate() {
            let egress = p.spec.vlan.egress(o.vlan, o.tagged);
            let total = NET_HDR_LEN + egress.frame_len(o.len);
            let (dest, used, before) = (s.dest.len(), s.used.len(), taken);
            s.frame_chains.clear();
            let mut capacity = 0usize;
            while capacity < total && taken < posted {
                if !*mergeable && !s.frame_chains.is_empty() {
                    break;
                }
                let head = ring.head(next.wrapping_add(taken));
                taken += 1;
                let first = s.dest.len();
                let unusable = match ring.chain(head, true, &mut s.dest) {
                    Err(e) => Some(format!("receive chain: {e}")),
                    Ok(t) if t.bytes == 0 => {
                        Some("receive chain without a writable buffer".to_string())
                    }
                    Ok(t) => {
                        capacity += t.bytes;
                        s.frame_chains.push(s.used.len());
                        s.used.push((head, t.bytes.min(u32::MAX as usize) as u32));
                        None
                    }
                };
                if let Some(what) = unusable {
                    // Returned on its own, empty; never part of a frame.
                    s.dest.truncate(first);
                    p.count_drop(&p.stats.drop_malformed, &what);
                    s.used.push((head, 0));
                }
            }
            if capacity < total {
                if s.used.len() - used == s.frame_chains.len() {
                    // Give this frame's buffers back for a later frame.
                    taken = before;
                    s.used.truncate(used);
                } else {
                    // Unusable chains were consumed among them, so the ring cannot be
                    // rewound: return this frame's buffers empty as well.
                    for &k in &s.frame_chains {
                        s.used[k].1 = 0;
                    }
                }
                s.dest.truncate(dest);
                // The frames after it find no room either.
                no_room = s.accepted.len() - k;
                break;
            }
            let src = &ranges[o.start..o.end];
            let first = s.dest.get(dest).copied();
            if let Some(r) = first {
                // The lines the driver touched last (the virtio-net header and the Ethernet
                // header behind it): the first one or two.
                copy::prefetch_write(r.ptr);
                let first_line = 64 - (r.ptr as usize % 64);
                if r.len.min(total) > first_line {
                    copy::prefetch_write(r.ptr.wrapping_add(first_line));
                }
            }
            match (src, first) {
                ([head, rest], Some(first))
                    if egress == Egress::AsIs && first.len >= total && head.len == PEEK_LEN =>
                {
                    s.plans.push(Plan::Direct {
                        head: head.ptr.cast_const(),
                        src: rest.ptr.cast_const(),
                        dst: first.ptr,
                        len: rest.len,
                    });
                    s.dest.truncate(dest);
                }
                _ => {
                    let pieces = s.pieces.len();
                    let planned = copy::plan(
                        src,
                        egress,
                        Piece::Inline {
                            bytes: net_header(s.frame_chains.len() as u16),
                            len: NET_HDR_LEN,
                        },
                        &mut s.pieces,
                    );
                    debug_assert_eq!(planned, total);
                    s.plans.push(Plan::Pieces {
                        pieces: pieces..s.pieces.len(),
                        dest: dest..s.dest.len(),
                    });
                }
            }
            // The copy fills the chains in order: each holds its capacity, the last the rest.
            let mut left = total;
            for &k in &s.frame_chains {
                let len = (s.used[k].1 as usize).min(left);
                left -= len;
                s.used[k].1 = len as u32;
            }
            bytes += (total - NET_HDR_LEN) as u64;
        }
        queue.set_next_avail(next.wrapping_add(taken));
        for plan in &s.plans {
            match plan {
                &Plan::Direct {
                    head,
                    src,
                    dst,
                    len,
                } => {
                    let hdr = net_header(1);
                    // SAFETY: `dst` is a receive buffer of at least NET_HDR_LEN + PEEK_LEN +
                    // len bytes validated against `view`, held here; `head` is the sender's
                    // PEEK_LEN-byte snapshot, in the caller's scratch; `src` is `len` bytes
                    // of the sender's validated memory, which its caller holds. `ptr::copy`
                    // tolerates a guest that made its TX and RX buffers overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(hdr.as_ptr(), dst, NET_HDR_LEN);
                        std::ptr::copy_nonoverlapping(head, dst.add(NET_HDR_LEN), PEEK_LEN);
                        std::ptr::copy(src, dst.add(NET_HDR_LEN + PEEK_LEN), len);
                    }
                }
                Plan::Pieces { pieces, dest } => {
                    // SAFETY: the source ranges were validated against the sender's memory,
                    // which its caller holds; the destination ranges against `view`, held
                    // here.
                    unsafe { copy::copy(&s.pieces[pieces.clone()], &s.dest[dest.clone()]) };
                }
            }
        }
        let mut used = ring.used_batch(queue);
        for &(head, len) in &s.used {
            ring.add_used(&mut used, head, len);
        }
        s.dest.clear();
        if ring.publish_batch(used, queue, event_idx) {
            if let Err(e) = state.signal_used_queue() {
                warn!(port = %p.spec.name, "cannot notify the guest: {e}");
            }
        }
        if no_room > 0 {
            p.count_drops(
                &p.stats.drop_no_rx_buffer,
                no_room as u64,
                "no receive buffer",
            );
        }
        bump(&p.stats.tx_packets, s.plans.len() as u64);
        bump(&p.stats.tx_bytes, bytes);
    }
}
