//! The vhost-user-net device of one port: features, config space, and the transmit path
//! (guest → switch).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::copy::{HostRange, Piece};
use crate::frame::{self, PEEK_LEN};
use crate::stats::bump;
use crate::switch::{Mem, Switch};

/// virtio_net_hdr_v1: 12 bytes whenever VERSION_1 is negotiated.
pub const NET_HDR_LEN: usize = 12;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;
/// Frames' worth of tokens a rate-limited port waits for before it resumes.
const TX_BATCH: u64 = 32;
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
}

impl PortBackend {
    pub fn new(switch: Arc<Switch>, port: usize) -> PortBackend {
        PortBackend {
            switch,
            port,
            acked: Arc::new(AtomicU64::new(0)),
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
        let mut ranges: Vec<HostRange> = Vec::new();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut touched: Vec<usize> = Vec::new();
        let mut used: Vec<u16> = Vec::new();
        let mut throttled = false;
        let mut unusable = false;
        loop {
            let mut state = tx.get_mut();
            if !state.get_queue().ready() {
                // Stopped or reset under us (the frontend is going away).
                break;
            }
            if let Err(e) = state.disable_notification() {
                warn!(port = %port.spec.name, "cannot disable notifications: {e}");
            }
            // Read the avail index before loading the memory view, so that the view holds
            // the regions of every buffer the guest has posted up to it (a driver adds a
            // region before it uses it).
            let target = match state
                .get_queue()
                .avail_idx(&*mem.memory(), std::sync::atomic::Ordering::Acquire)
            {
                Ok(idx) => idx.0,
                Err(e) => {
                    warn!(port = %port.spec.name, "cannot read the avail index: {e}");
                    break;
                }
            };
            let view = mem.memory();
            while state.get_queue().next_avail() != target {
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*view) else {
                    // A bogus avail index: looping on "more available" would never end.
                    unusable = true;
                    break;
                };
                let head = chain.head_index();
                ranges.clear();
                let mut total = 0usize;
                let mut bad = None;
                for d in chain {
                    if d.is_write_only() {
                        bad = Some("device-writable descriptor in a transmit chain");
                        break;
                    }
                    match host_range(&*view, d.addr(), d.len() as usize) {
                        Some(r) => {
                            total += r.len;
                            ranges.push(r);
                        }
                        None => {
                            bad = Some("transmit buffer outside guest memory");
                            break;
                        }
                    }
                }
                if let Some(what) = bad {
                    used.push(head);
                    port_drop(port, &port.stats.drop_malformed, what);
                    continue;
                }
                let frame_bytes = total.saturating_sub(NET_HDR_LEN) as u64;
                let mut qos = port.qos();
                if let Err(wait) = qos.tx.consume(frame_bytes, 1) {
                    // Put the frame back; it goes out when the bucket has refilled. Wait for
                    // a batch worth of tokens (or a full bucket, if smaller) rather than one
                    // frame's: a timer wakeup per frame would cost more than the frame.
                    let q = state.get_queue_mut();
                    q.set_next_avail(q.next_avail().wrapping_sub(1));
                    let batch = qos.tx.time_until(frame_bytes * TX_BATCH, TX_BATCH);
                    if let Err(e) = qos.timer.arm(wait.max(batch)) {
                        warn!(port = %port.spec.name, "cannot arm the rate-limit timer: {e}");
                    }
                    bump(&port.stats.tx_throttled, 1);
                    throttled = true;
                    break;
                }
                drop(qos);
                used.push(head);
                self.forward_one(&ranges, total, &mut pieces, &mut touched);
            }
            drop(view);
            for head in used.drain(..) {
                if let Err(e) = state.add_used(head, 0) {
                    warn!(port = %port.spec.name, "cannot add used entry: {e}");
                }
            }
            if let Err(e) = common::vring::notify_guest(&mut state) {
                warn!(port = %port.spec.name, "{e}");
            }
            if throttled || unusable {
                // Throttled: notifications stay off, the rate-limit timer resumes
                // transmission. Unusable: wait for the frontend to set the ring up again.
                break;
            }
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(port = %port.spec.name, "cannot enable notifications: {e}");
                    break;
                }
            }
        }
        self.switch.signal(&touched);
    }

    fn forward_one(
        &self,
        ranges: &[HostRange],
        total: usize,
        pieces: &mut Vec<Piece>,
        touched: &mut Vec<usize>,
    ) {
        let port = &self.switch.ports[self.port];
        if total < NET_HDR_LEN + frame::ETH_HLEN {
            port_drop(
                port,
                &port.stats.drop_malformed,
                "frame shorter than its headers",
            );
            return;
        }
        // Peek at the virtio-net header and the start of the frame (not a copy of the frame).
        let mut head = [0u8; NET_HDR_LEN + PEEK_LEN];
        let peek_len = gather(ranges, &mut head);
        let gso_type = head[1];
        if gso_type != 0 {
            port_drop(
                port,
                &port.stats.drop_malformed,
                "GSO frame, but no GSO was offered",
            );
            return;
        }
        let frame_len = total - NET_HDR_LEN;
        let hdr = match frame::parse(&head[NET_HDR_LEN..peek_len], frame_len) {
            Ok(h) => h,
            Err(e) => {
                port_drop(port, &port.stats.drop_malformed, &e.to_string());
                return;
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
            return;
        }
        // The frame's own bytes: the source ranges minus the virtio-net header.
        let mut frame_ranges: Vec<HostRange> = Vec::with_capacity(ranges.len());
        let mut skip = NET_HDR_LEN;
        for r in ranges {
            if skip >= r.len {
                skip -= r.len;
                continue;
            }
            frame_ranges.push(HostRange {
                // SAFETY: skip < r.len, so the pointer stays inside the range.
                ptr: unsafe { r.ptr.add(skip) },
                len: r.len - skip,
            });
            skip = 0;
        }
        self.switch
            .forward(self.port, &hdr, &frame_ranges, frame_len, pieces, touched);
    }
}

fn port_drop(port: &crate::switch::Port, counter: &AtomicU64, what: &str) {
    let n = bump(counter, 1);
    if crate::stats::should_log(n) {
        warn!(port = %port.spec.name, count = n, "dropped a frame: {what}");
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
        let mut f = 1 << VIRTIO_F_VERSION_1
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
            RX_QUEUE => {}
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

        // Port b's guest posted one 2 KiB receive buffer.
        rxq.add_desc_chains(&chain(&[(0x4_0000, 2048, true)], 0), 0)
            .expect("rx chain");

        // Port a's guest: a 12-byte virtio-net header, then a broadcast frame.
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        frame.extend((0..46).map(|i| i as u8));
        ma.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(0x1_0000))
            .expect("hdr");
        ma.write_slice(&frame, GuestAddress(0x2_0000))
            .expect("frame");
        let chains: Vec<Vec<(u64, u32, bool)>> = vec![
            // Outside guest memory.
            vec![(0x1_0000, 12, false), (0x900_0000, 60, false)],
            // A device-writable descriptor in a transmit chain.
            vec![(0x1_0000, 12, false), (0x2_0000, 60, true)],
            // Shorter than an Ethernet header.
            vec![(0x1_0000, 12, false), (0x2_0000, 10, false)],
            // The good one, header and frame in separate descriptors.
            vec![(0x1_0000, 12, false), (0x2_0000, frame.len() as u32, false)],
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
        assert_eq!(a.drop_malformed.load(Ordering::Relaxed), 3);
        assert_eq!(a.rx_packets.load(Ordering::Relaxed), 1);
        assert_eq!(rxq.used().idx().load(), 1, "one frame delivered");
        let used = rxq.used().ring().ref_at(0).expect("used").load();
        assert_eq!(
            used.len() as usize,
            NET_HDR_LEN + frame.len() + 4,
            "tag inserted"
        );
        let mut got = vec![0u8; used.len() as usize];
        mb.read_slice(&mut got, GuestAddress(0x4_0000))
            .expect("read");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        let out = &got[NET_HDR_LEN..];
        assert_eq!(&out[..12], &frame[..12]);
        assert_eq!(&out[12..16], &crate::frame::tag_bytes(10));
        assert!(out[16..] == frame[12..], "payload after the tag");
    }
}
