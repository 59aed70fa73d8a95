//! The vhost-user-net device of one port: features, config space, and the transmit path
//! (guest → switch).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::copy::{self, HostRange};
use crate::frame::{self, PEEK_LEN};
use crate::ring::Ring;
use crate::switch::{Frame, Mem, Port, Scratch, Switch};
use common::counters::bump;

/// virtio_net_hdr_v1: 12 bytes whenever VERSION_1 is negotiated.
pub const NET_HDR_LEN: usize = 12;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;
/// Frames taken from a transmit ring per pass: what each pass costs (ring setup, locks,
/// the FDB, one notification check) is shared by that many frames.
const TX_BATCH: u16 = 64;
/// Frames' worth of tokens a rate-limited port waits for before it resumes.
const RATE_WAKEUP_FRAMES: u64 = 32;
/// The port's rate-limit timer in its worker's epoll set; ids up to NUM_QUEUES are the
/// library's (queues and the exit event).
pub const TIMER_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Host address range of `len` bytes at `addr`, if they lie in one memory region.
pub fn host_range<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<HostRange> {
    let ptr = common::memory::host_range(mem, addr, len as u64)?;
    Some(HostRange { ptr, len })
}

/// One switch port as a vhost-user-net backend.
#[derive(Clone)]
pub struct PortBackend {
    switch: Arc<Switch>,
    port: usize,
    acked: Arc<AtomicU64>,
    scratch: Arc<Mutex<TxScratch>>,
}

impl PortBackend {
    pub fn new(switch: Arc<Switch>, port: usize) -> PortBackend {
        PortBackend {
            switch,
            port,
            acked: Arc::new(AtomicU64::new(0)),
            scratch: Arc::new(Mutex::new(TxScratch::default())),
        }
    }

    fn mergeable(&self) -> bool {
        self.acked.load(Ordering::Relaxed) & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    fn current_mem(&self) -> Option<GuestMemoryAtomic<Mem>> {
        self.switch.ports[self.port]
            .mem
            .read()
            .ok()
            .and_then(|m| m.clone())
    }

    /// Take the frames the guest queued for transmission and forward them, as long as the
    /// port's TX rate allows. When it does not, the frame stays in the ring, guest
    /// notifications stay off, and the port's timer resumes the work when tokens are back:
    /// backpressure, nothing dropped.
    fn process_tx(&self, tx: &VringRwLock) {
        let Some(mem) = self.current_mem() else {
            return;
        };
        let port = &self.switch.ports[self.port];
        let mut guard = match self.scratch.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let s = &mut *guard;
        // Kicks are off from the first pass until the ring is found empty; turning them off
        // again on every pass would rewrite a word next to the used index the driver polls.
        let mut kicks_on = true;
        loop {
            let mut state = tx.get_mut();
            if !state.get_queue().ready() {
                // Stopped or reset under us (the frontend is going away).
                break;
            }
            if kicks_on {
                if let Err(e) = state.disable_notification() {
                    warn!(port = %port.spec.name, "cannot disable notifications: {e}");
                }
                kicks_on = false;
            }
            let event_idx = state.get_queue().event_idx_enabled();
            let queue = state.get_queue_mut();
            let view = mem.memory();
            let next = queue.next_avail();
            let (ring, posted) = match Ring::new(queue, &view)
                .and_then(|r| r.posted(next).map(|n| (r, n)))
            {
                Ok(r) => r,
                Err(e) => {
                    // Wait for the frontend to set the ring up again; a guest that
                    // scribbles on its ring gets here on every kick.
                    let n = bump(&port.stats.ring_errors, 1);
                    if let Some(suppressed) = port.stats.may_log(&port.stats.ring_errors) {
                        warn!(port = %port.spec.name, count = n, suppressed, "unusable transmit ring: {e}");
                    }
                    break;
                }
            };
            if !std::ptr::eq(&*view, &*mem.memory()) {
                // The guest's memory table changed while the index was read: start over
                // with the new one, which holds every buffer posted so far.
                continue;
            }
            s.take(&ring, next, posted, port);
            queue.set_next_avail(next.wrapping_add(s.heads.len() as u16));
            let throttled = s.police(queue, port);
            s.classify(port);
            self.switch
                .forward_batch(self.port, &s.frames, &s.ranges, &mut s.switch);
            let full = s.heads.len() == usize::from(TX_BATCH);
            let mut used = ring.used_batch(queue);
            for &head in &s.heads {
                ring.add_used(&mut used, head, 0);
            }
            if ring.publish_batch(used, queue, event_idx) {
                if let Err(e) = state.signal_used_queue() {
                    warn!(port = %port.spec.name, "cannot notify the guest: {e}");
                }
            }
            if throttled {
                // Notifications stay off; the rate-limit timer resumes transmission.
                break;
            }
            if full {
                // More may be waiting: take it before paying for a notification round.
                continue;
            }
            kicks_on = true;
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(port = %port.spec.name, "cannot enable notifications: {e}");
                    break;
                }
            }
        }
    }
}

/// A port worker's transmit batch, kept from batch to batch so forwarding does not allocate.
struct TxScratch {
    /// Every chain taken, for the used ring (malformed ones too).
    heads: Vec<u16>,
    /// Chains that passed the memory checks: their index in `heads`, their ranges in
    /// `raw`, total bytes.
    chains: Vec<(usize, usize, usize, usize)>,
    raw: Vec<HostRange>,
    /// Well-formed frames, their bytes (after the virtio-net header) in `ranges`.
    frames: Vec<Frame>,
    ranges: Vec<HostRange>,
    /// Each frame's first bytes, read once from the guest: what classification decided on
    /// (MACs, tag) is what is forwarded, whatever the guest writes to its buffer
    /// meanwhile. A frame's first range points here, so this must not move while a batch
    /// is forwarded: boxed, and never resized.
    heads_snapshot: Box<[[u8; PEEK_LEN]; TX_BATCH as usize]>,
    switch: Scratch,
}

// SAFETY: the host pointers in `raw` and `ranges` are only dereferenced during the
// `process_tx` call that filled them, while it holds the memory view they point into (or,
// for the heads, the scratch itself).
unsafe impl Send for TxScratch {}

impl Default for TxScratch {
    fn default() -> Self {
        TxScratch {
            heads: Vec::new(),
            chains: Vec::new(),
            raw: Vec::new(),
            frames: Vec::new(),
            ranges: Vec::new(),
            heads_snapshot: Box::new([[0; PEEK_LEN]; TX_BATCH as usize]),
            switch: Scratch::default(),
        }
    }
}

impl TxScratch {
    /// Take up to a batch of the `posted` chains from avail position `next` on, and check
    /// that their buffers are device-readable and lie in guest memory.
    fn take(&mut self, ring: &Ring<'_>, next: u16, posted: u16, port: &Port) {
        self.heads.clear();
        self.chains.clear();
        self.raw.clear();
        let n = posted.min(TX_BATCH);
        ring.prefetch_chains(next, n);
        for i in 0..n {
            let taken = self.heads.len();
            let head = ring.head(next.wrapping_add(i));
            self.heads.push(head);
            let start = self.raw.len();
            let total = match ring.chain(head, false, &mut self.raw) {
                Ok(t) if t.other == 0 => t.bytes,
                bad => {
                    let what = match bad {
                        Err(e) => format!("transmit chain: {e}"),
                        Ok(_) => "device-writable descriptor in a transmit chain".to_string(),
                    };
                    self.raw.truncate(start);
                    port_drop(port, &port.stats.drop_malformed, &what);
                    continue;
                }
            };
            if let Some(r) = self.raw.get(start) {
                // The header and the frame's start: read by `classify` below.
                copy::prefetch(r.ptr);
                copy::prefetch(r.ptr.wrapping_add(64));
            }
            self.chains.push((taken, start, self.raw.len(), total));
        }
    }

    /// Apply the port's TX rate limit to the chains taken. The first chain it refuses and
    /// all after it go back to the ring. Returns true if it refused one.
    fn police(&mut self, queue: &mut Queue, port: &Port) -> bool {
        let mut qos = port.qos();
        if qos.tx.is_unlimited() {
            return false;
        }
        let now = qos.tx.now_ns();
        // Usually the whole batch fits: one charge. Otherwise frame by frame, to find the
        // first that does not.
        let bytes: usize = self
            .chains
            .iter()
            .map(|c| c.3.saturating_sub(NET_HDR_LEN))
            .sum();
        if qos
            .tx
            .consume_at(bytes as u64, self.chains.len() as u64, now)
            .is_ok()
        {
            return false;
        }
        for (k, &(_, _, _, total)) in self.chains.iter().enumerate() {
            let frame_bytes = total.saturating_sub(NET_HDR_LEN) as u64;
            let Err(wait) = qos.tx.consume_at(frame_bytes, 1, now) else {
                continue;
            };
            // Put this chain and the ones after it back (they were taken last, in ring
            // order); they go out when the bucket has refilled. Wait for a batch worth of
            // tokens (or a full bucket, if smaller) rather than one frame's: a timer wakeup
            // per frame would cost more than the frame.
            let taken = self.chains[k].0;
            let back = self.heads.len() - taken;
            queue.set_next_avail(queue.next_avail().wrapping_sub(back as u16));
            self.heads.truncate(taken);
            self.chains.truncate(k);
            let batch = qos
                .tx
                .time_until(frame_bytes * RATE_WAKEUP_FRAMES, RATE_WAKEUP_FRAMES);
            if let Err(e) = qos.timer.arm(wait.max(batch)) {
                warn!(port = %port.spec.name, "cannot arm the rate-limit timer: {e}");
            }
            bump(&port.stats.tx_throttled, 1);
            return true;
        }
        false
    }

    /// Check each chain's virtio-net header and frame, and collect the well-formed frames.
    fn classify(&mut self, port: &Port) {
        self.frames.clear();
        self.ranges.clear();
        for &(_, start, end, total) in &self.chains {
            let raw = &self.raw[start..end];
            if total < NET_HDR_LEN + frame::ETH_HLEN {
                port_drop(
                    port,
                    &port.stats.drop_malformed,
                    "frame shorter than its headers",
                );
                continue;
            }
            let frame_len = total - NET_HDR_LEN;
            let peek_len = PEEK_LEN.min(frame_len);
            let Some(snapshot) = self.heads_snapshot.get_mut(self.frames.len()) else {
                // More frames than a batch takes: cannot happen (`take` stops at TX_BATCH).
                break;
            };
            // Every byte a decision depends on is read from the guest once, here, into our
            // memory; the guest may rewrite its buffer at any time after.
            let gso_type = match raw.first() {
                // Usually the header and the frame's start share the first buffer: one
                // fixed-size read.
                Some(r) if r.len >= NET_HDR_LEN + PEEK_LEN => {
                    // SAFETY: `r` is a validated range of the sender's guest memory, held
                    // by the caller, of at least NET_HDR_LEN + PEEK_LEN bytes; `snapshot`
                    // is ours and PEEK_LEN long.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            r.ptr.add(NET_HDR_LEN),
                            snapshot.as_mut_ptr(),
                            PEEK_LEN,
                        );
                        r.ptr.add(1).read()
                    }
                }
                _ => {
                    let mut head = [0u8; NET_HDR_LEN + PEEK_LEN];
                    let got = gather(raw, &mut head);
                    snapshot.copy_from_slice(&head[NET_HDR_LEN..]);
                    if got < NET_HDR_LEN + peek_len {
                        // `total` said otherwise: cannot happen.
                        port_drop(
                            port,
                            &port.stats.drop_malformed,
                            "chain shorter than it said",
                        );
                        continue;
                    }
                    head[1]
                }
            };
            let parsed = (gso_type, frame::parse(&snapshot[..peek_len], frame_len));
            let hdr = match parsed {
                (0, Ok(h)) => h,
                (0, Err(e)) => {
                    port_drop(port, &port.stats.drop_malformed, &e.to_string());
                    continue;
                }
                _ => {
                    port_drop(
                        port,
                        &port.stats.drop_malformed,
                        "GSO frame, but no GSO was offered",
                    );
                    continue;
                }
            };
            let limit = usize::from(port.spec.mtu)
                + frame::ETH_HLEN
                + if hdr.tag.is_some() {
                    frame::VLAN_HLEN
                } else {
                    0
                };
            if frame_len > limit {
                port_drop(port, &port.stats.drop_mtu, "frame larger than the MTU");
                continue;
            }
            // The frame's bytes: the snapshot of its head, then the chain's ranges past the
            // virtio-net header and the head.
            let first = self.ranges.len();
            self.ranges.push(HostRange {
                ptr: snapshot.as_mut_ptr(),
                len: peek_len,
            });
            let mut skip = NET_HDR_LEN + peek_len;
            for r in raw {
                if skip >= r.len {
                    skip -= r.len;
                    continue;
                }
                self.ranges.push(HostRange {
                    // SAFETY: skip < r.len, so the pointer stays inside the range.
                    ptr: unsafe { r.ptr.add(skip) },
                    len: r.len - skip,
                });
                skip = 0;
            }
            self.frames.push(Frame {
                hdr,
                start: first,
                end: self.ranges.len(),
                len: frame_len,
            });
        }
    }
}

fn port_drop(port: &crate::switch::Port, counter: &AtomicU64, what: &str) {
    let n = bump(counter, 1);
    if let Some(suppressed) = port.stats.may_log(counter) {
        warn!(port = %port.spec.name, count = n, suppressed, "dropped a frame: {what}");
    }
}

/// Copy the first `out.len()` bytes of `ranges` into `out`; returns how many there were.
fn gather(ranges: &[HostRange], out: &mut [u8]) -> usize {
    let mut done = 0;
    for r in ranges {
        if done == out.len() {
            break;
        }
        let n = r.len.min(out.len() - done);
        // SAFETY: `r` is a validated range of the sender's guest memory, held by the caller;
        // `out` has room for n more bytes.
        unsafe { std::ptr::copy(r.ptr.cast_const(), out[done..].as_mut_ptr(), n) };
        done += n;
    }
    done
}

impl VhostUserBackend for PortBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // IN_ORDER: every ring's buffers are used in the order they were made available
        // (the transmit path takes chains in ring order and returns them so, and delivery
        // records each receive chain's used entry as it takes it). A driver that knows it,
        // as DPDK's does, then frees and refills its descriptors in runs.
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_IN_ORDER
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MTU
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.switch.ports[self.port].spec.mac.is_some() {
            f |= 1 << VIRTIO_NET_F_MAC;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    /// Nothing to keep: the vring applies EVENT_IDX itself, and the enable/disable
    /// notification calls work in both modes.
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu.
        let spec = &self.switch.ports[self.port].spec;
        let mut c = [0u8; 12];
        if let Some(mac) = spec.mac {
            c[..6].copy_from_slice(&mac.0);
        }
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&spec.mtu.to_le_bytes());
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(c.len());
        let end = (offset as usize).saturating_add(size as usize).min(c.len());
        out[..end - start].copy_from_slice(&c[start..end]);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        self.switch.set_mem(self.port, mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b11]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE as usize), vrings.get(TX_QUEUE as usize))
        else {
            return Err(io::Error::other("port worker without its two queues"));
        };
        self.switch.attach_rx(self.port, rx, self.mergeable());
        match device_event {
            RX_QUEUE => {
                // Receive buffers are taken only when a frame arrives (a full ring drops
                // it), so the switch never waits for them: a kick per refill would cost the
                // driver a syscall and this worker a wake-up for nothing. The first kick
                // after the ring is set up turns them off (with EVENT_IDX the driver kicks
                // only when its index passes the avail event the switch never moves).
                if let Err(e) = rx.get_mut().disable_notification() {
                    warn!(port = %self.switch.ports[self.port].spec.name, "cannot disable receive kicks: {e}");
                }
            }
            TX_QUEUE => self.process_tx(tx),
            TIMER_EVENT => {
                if let Err(e) = self.switch.ports[self.port].qos().timer.clear() {
                    warn!(port = %self.switch.ports[self.port].spec.name, "cannot clear the rate-limit timer: {e}");
                }
                self.process_tx(tx);
            }
            other => {
                warn!(port = %self.switch.ports[self.port].spec.name, event = other, "unexpected event")
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;
    use crate::config::{QosConfig, VlanMode};
    use crate::qos::PortQos;
    use crate::switch::PortSpec;

    const QSIZE: u16 = 16;

    fn port(name: &str, vlan: VlanMode) -> (PortSpec, PortQos) {
        let spec = PortSpec {
            name: name.into(),
            vlan,
            mac: None,
            anti_spoof: false,
            mtu: 1500,
        };
        (spec, PortQos::new(&QosConfig::default()).expect("qos"))
    }

    fn vring(mem: &GuestMemoryAtomic<Mem>, vq: &MockSplitQueue<'_, Mem>) -> VringRwLock {
        let v = VringRwLock::new(mem.clone(), QSIZE).expect("vring");
        {
            let mut st = v.get_mut();
            let q = st.get_queue_mut();
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(vq.desc_table_addr().0 as u32), Some(0));
            q.set_avail_ring_address(Some(vq.avail_addr().0 as u32), Some(0));
            q.set_used_ring_address(Some(vq.used_addr().0 as u32), Some(0));
            q.set_ready(true);
        }
        v.set_enabled(true);
        v
    }

    fn chain(descs: &[(u64, u32, bool)], first: u16) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1))
            })
            .collect()
    }

    /// A frame from an access port reaches a trunk port tagged, through mock rings; hostile
    /// transmit chains are dropped and counted, and the ring keeps working after them.
    #[test]
    fn tx_to_rx_with_hostile_chains() {
        let trunk = VlanMode::Trunk {
            allowed: vec![10, 20],
            native: None,
        };
        let switch = Arc::new(Switch::new(
            vec![port("a", VlanMode::Access(10)), port("b", trunk)],
            vec![],
            64,
            std::time::Duration::from_secs(300),
            vec![None, None],
        ));
        let range = |base: u64| -> GuestMemoryAtomic<Mem> {
            GuestMemoryAtomic::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(base), 0x10_0000)]).expect("mem"),
            )
        };
        let (mem_a, mem_b) = (range(0), range(0));
        switch.set_mem(0, mem_a.clone());
        switch.set_mem(1, mem_b.clone());
        let (ma, mb) = (mem_a.memory(), mem_b.memory());
        let txq = MockSplitQueue::new(&*ma, QSIZE);
        let rxq = MockSplitQueue::new(&*mb, QSIZE);
        let (tx, rx) = (vring(&mem_a, &txq), vring(&mem_b, &rxq));
        switch.attach_rx(1, &rx, true);

        // Port b's guest posted two 2 KiB receive buffers.
        rxq.add_desc_chains(&chain(&[(0x4_0000, 2048, true)], 0), 0)
            .expect("rx chain");
        rxq.add_desc_chains(&chain(&[(0x5_0000, 2048, true)], 1), 1)
            .expect("rx chain");

        // Port a's guest: a 12-byte virtio-net header, then a broadcast frame.
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        frame.extend((0..46).map(|i| i as u8));
        ma.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x1_0000))
            .expect("hdr");
        ma.write_slice(&frame, GuestAddress(0x2_0000))
            .expect("frame");
        // The same frame behind its header in one buffer (read in place), and once more
        // with a GSO type in the header.
        let one = [&[0u8; NET_HDR_LEN][..], &frame].concat();
        ma.write_slice(&one, GuestAddress(0x3_0000)).expect("one");
        let mut gso = one.clone();
        gso[1] = 1;
        ma.write_slice(&gso, GuestAddress(0x3_1000)).expect("gso");
        let chains: Vec<Vec<(u64, u32, bool)>> = vec![
            // Outside guest memory.
            vec![(0x1_0000, 12, false), (0x900_0000, 60, false)],
            // A device-writable descriptor in a transmit chain.
            vec![(0x1_0000, 12, false), (0x2_0000, 60, true)],
            // Shorter than an Ethernet header.
            vec![(0x1_0000, 12, false), (0x2_0000, 10, false)],
            // The good one, header and frame in separate descriptors.
            vec![(0x1_0000, 12, false), (0x2_0000, frame.len() as u32, false)],
            // GSO, never offered.
            vec![(0x3_1000, gso.len() as u32, false)],
            // The good one in a single descriptor.
            vec![(0x3_0000, one.len() as u32, false)],
        ];
        let mut index = 0;
        for c in &chains {
            txq.add_desc_chains(&chain(c, index), index)
                .expect("tx chain");
            index += c.len() as u16;
        }
        let backend = PortBackend::new(switch.clone(), 0);
        backend.process_tx(&tx);

        assert_eq!(
            txq.used().idx().load(),
            chains.len() as u16,
            "every chain returned"
        );
        let a = &switch.ports[0].stats;
        assert_eq!(a.drop_malformed.load(Ordering::Relaxed), 4);
        assert_eq!(a.rx_packets.load(Ordering::Relaxed), 2);
        assert_eq!(rxq.used().idx().load(), 2, "two frames delivered");
        for (k, addr) in [0x4_0000, 0x5_0000].into_iter().enumerate() {
            let used = rxq.used().ring().ref_at(k).expect("used").load();
            assert_eq!(
                used.len() as usize,
                NET_HDR_LEN + frame.len() + 4,
                "tag inserted"
            );
            let mut got = vec![0u8; used.len() as usize];
            mb.read_slice(&mut got, GuestAddress(addr)).expect("read");
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
            let out = &got[NET_HDR_LEN..];
            assert_eq!(&out[..12], &frame[..12]);
            assert_eq!(&out[12..16], &crate::frame::tag_bytes(10));
            assert!(out[16..] == frame[12..], "payload after the tag");
        }
    }
}
