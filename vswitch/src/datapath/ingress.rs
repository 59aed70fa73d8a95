//! The first step of a frame: out of its guest's transmit ring. One pass takes up to a
//! batch of chains, checks their buffers lie in guest memory, reads each frame's
//! virtio-net header and first bytes once into switch memory and checks its offload
//! request, applies the port's transmit rate (to the bytes on the wire: a segmentation
//! request counts as its segments), hands the well-formed frames to the forwarding
//! decision, and returns every chain to the guest.

use tracing::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;

use super::forward::{self, Frame};
use crate::port::Port;
use crate::switch::Switch;
use crate::wire::copy;
use crate::wire::frame::{self, PEEK_LEN, TPID_8021Q};
use crate::wire::gso::{self, GsoError, MAX_TCP_HEADERS};
use crate::wire::guest::HostRange;
use crate::wire::ring::{OpenError, Ring};
use crate::wire::vnet::{
    Offload, OffloadError, Offloads, GSO_ECN, GSO_TCPV4, GSO_TCPV6, NET_HDR_LEN,
};
use common::counters::bump;

/// Frames taken from a transmit ring per pass: what each pass costs (ring setup, locks,
/// the FDB, one notification check) is shared by that many frames.
pub const TX_BATCH: u16 = 64;
/// Frames' worth of tokens a rate-limited port waits for before it resumes.
const RATE_WAKEUP_FRAMES: u64 = 32;

/// What one pass over a transmit ring found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// This many chains were taken (0: the ring was empty).
    Took(usize),
    /// The port's rate limit stopped the pass after this many chains; its timer resumes
    /// it.
    Throttled(usize),
    /// The ring cannot be used (not ready, disabled, or broken by its guest): wait for the
    /// next kick.
    Unusable,
}

/// Take what port `src`'s guest queued on `tx` (up to a batch), forward it, and return the
/// chains. When the port's transmit rate does not allow a frame, it and the ones after it
/// stay in the ring: backpressure, nothing dropped.
pub fn pass(switch: &Switch, src: usize, tx: &VringRwLock, s: &mut Scratch) -> Pass {
    let port = &switch.ports[src];
    let Some(mem) = port.current_mem() else {
        return Pass::Unusable;
    };
    let mut state = tx.get_mut();
    if !state.is_enabled() || !state.get_queue().ready() {
        // Stopped or reset under us (the frontend is going away or setting up again).
        return Pass::Unusable;
    }
    let event_idx = state.get_queue().event_idx_enabled();
    let queue = state.get_queue_mut();
    let view = mem.memory();
    let (ring, posted) = match Ring::open(queue, &view, &mem) {
        Ok(r) => r,
        // The memory table changed while the index was read: the next pass starts over
        // with the new one, which holds every buffer posted so far.
        Err(OpenError::MemoryChanged) => return Pass::Took(0),
        Err(OpenError::Ring(e)) => {
            // A guest that scribbles on its ring gets here on every kick.
            let n = bump(&port.stats.ring_errors, 1);
            if let Some(suppressed) = port.stats.may_log(&port.stats.ring_errors) {
                warn!(port = %port.spec.name, count = n, suppressed, "unusable transmit ring: {e}");
            }
            return Pass::Unusable;
        }
    };
    if posted == 0 {
        return Pass::Took(0);
    }
    let next = queue.next_avail();
    let host = Offloads::host(port.features());
    s.take(&ring, next, posted, port, host);
    queue.set_next_avail(next.wrapping_add(s.heads.len() as u16));
    let throttled = s.police(queue, port);
    let offloaded = s.offloaded();
    if offloaded {
        s.classify::<true>(port);
    } else {
        s.classify::<false>(port);
    }
    switch.forward_batch(src, &s.frames, &s.ranges, offloaded, &mut s.forward);
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
        Pass::Throttled(s.heads.len())
    } else {
        Pass::Took(s.heads.len())
    }
}

/// A forwarding thread's transmit batch, kept from batch to batch so forwarding does not
/// allocate.
pub struct Scratch {
    /// Every chain taken, for the used ring (malformed ones too).
    heads: Vec<u16>,
    /// Chains that passed the memory checks.
    chains: Vec<Chain>,
    /// Each chain's offload request, when some chain makes one; else empty, and every later
    /// step takes its plain path (the usual batch).
    requests: Vec<Request>,
    raw: Vec<HostRange>,
    /// Well-formed frames, their bytes (after the virtio-net header) in `ranges`.
    frames: Vec<Frame>,
    ranges: Vec<HostRange>,
    /// Each chain's first frame bytes, read once from the guest: what classification
    /// decided on (MACs, tag) is what is forwarded, whatever the guest writes to its buffer
    /// meanwhile. A frame's first range points here, so this must not move while a batch
    /// is forwarded: boxed, and never resized.
    heads_snapshot: Box<[[u8; PEEK_LEN]; TX_BATCH as usize]>,
    /// For a segmentation request, all its headers (up to the TCP payload), read once:
    /// what its checks were made on, and what a receiver that segments it gets.
    gso_heads: Box<[[u8; MAX_TCP_HEADERS]; TX_BATCH as usize]>,
    forward: forward::Scratch,
}

/// Why a chain's offload request is refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Request(#[from] OffloadError),
    #[error(transparent)]
    Headers(#[from] GsoError),
}

/// Read a chain's virtio-net header and first frame bytes (`raw`, `total` bytes) into
/// switch memory, once, and check its offload request against `host` (None: it makes
/// none): the snapshot gets the frame's first bytes, `heads` a segmentation request's
/// headers. Every byte a decision depends on is read here; the guest may rewrite its
/// buffer at any time after.
#[inline(always)]
fn read_head(
    raw: &[HostRange],
    total: usize,
    snapshot: &mut [u8; PEEK_LEN],
    heads: &mut [u8; MAX_TCP_HEADERS],
    port: &Port,
    host: Offloads,
) -> Option<Result<Offload, Box<Refused>>> {
    let mut hdr = [0u8; NET_HDR_LEN];
    match raw.first() {
        // Usually the header and the frame's start share the first buffer: fixed-size
        // reads.
        Some(r) if r.len >= NET_HDR_LEN + PEEK_LEN => {
            // SAFETY: `r` is a validated range of the sender's guest memory, held by the
            // caller, of at least NET_HDR_LEN + PEEK_LEN bytes; `hdr` and `snapshot` are
            // ours, NET_HDR_LEN and PEEK_LEN long.
            unsafe {
                std::ptr::copy_nonoverlapping(r.ptr, hdr.as_mut_ptr(), NET_HDR_LEN);
                std::ptr::copy_nonoverlapping(
                    r.ptr.add(NET_HDR_LEN),
                    snapshot.as_mut_ptr(),
                    PEEK_LEN,
                );
            }
        }
        // Shorter chains are refused by `classify`, whatever this read.
        _ => {
            let mut head = [0u8; NET_HDR_LEN + PEEK_LEN];
            copy::gather(raw, &mut head);
            hdr.copy_from_slice(&head[..NET_HDR_LEN]);
            snapshot.copy_from_slice(&head[NET_HDR_LEN..]);
        }
    }
    if hdr[0] | hdr[1] == 0 {
        // No checksum and no segmentation request: the rest of the header means nothing.
        return None;
    }
    Some(check_request(&hdr, raw, total, snapshot, heads, port, host).map_err(Box::new))
}

/// The rest of [`read_head`] for a frame with an offload request.
#[inline(never)]
fn check_request(
    hdr: &[u8; NET_HDR_LEN],
    raw: &[HostRange],
    total: usize,
    snapshot: &mut [u8; PEEK_LEN],
    heads: &mut [u8; MAX_TCP_HEADERS],
    port: &Port,
    host: Offloads,
) -> Result<Offload, Refused> {
    let off = Offload::from_header(hdr);
    let len = total.saturating_sub(NET_HDR_LEN);
    let v6 = match off.gso_type & !GSO_ECN {
        GSO_TCPV4 => Some(false),
        GSO_TCPV6 => Some(true),
        // No segmentation, or a kind `check` refuses.
        _ => None,
    };
    let mut tcp_hlen = 0;
    if let Some(v6) = v6 {
        // All the headers, in one read that the classification's snapshot is also taken
        // from.
        let got = copy::gather_at(raw, NET_HDR_LEN, heads);
        snapshot.copy_from_slice(&heads[..PEEK_LEN]);
        let h = gso::tcp_headers(&heads[..got.min(len)], v6)?;
        if h.l4 != usize::from(off.csum_start) {
            return Err(GsoError::HeaderMoved {
                found: h.l4,
                said: off.csum_start.into(),
            }
            .into());
        }
        tcp_hlen = h.end - h.l4;
    }
    let tagged = u16::from_be_bytes([snapshot[12], snapshot[13]]) == TPID_8021Q;
    let l2 = frame::ETH_HLEN + if tagged { frame::VLAN_HLEN } else { 0 };
    Ok(off.check(host, len, l2, port.spec.mtu, tcp_hlen)?)
}

/// A chain that passed the memory checks.
struct Chain {
    /// Its index in `heads`.
    taken: usize,
    /// Its ranges in `raw`.
    start: usize,
    end: usize,
    /// Its bytes, the virtio-net header included.
    total: usize,
}

/// A chain's offload request, as read and checked (refusals, rare, boxed).
type Request = Result<Offload, Box<Refused>>;

impl Chain {
    /// The frames and bytes on the wire the chain's frame stands for, given its request
    /// (None: it made none).
    fn wire(&self, request: Option<&Request>) -> (u64, u64) {
        let len = self.total.saturating_sub(NET_HDR_LEN);
        match request {
            Some(Ok(off)) => off.wire(len),
            _ => (1, len as u64),
        }
    }
}

// SAFETY: the host pointers in `raw` and `ranges` are only dereferenced during the
// `pass` call that filled them, while it holds the memory view they point into (or,
// for the heads, the scratch itself).
unsafe impl Send for Scratch {}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            heads: Vec::new(),
            chains: Vec::new(),
            requests: Vec::new(),
            raw: Vec::new(),
            frames: Vec::new(),
            ranges: Vec::new(),
            heads_snapshot: Box::new([[0; PEEK_LEN]; TX_BATCH as usize]),
            gso_heads: Box::new([[0; MAX_TCP_HEADERS]; TX_BATCH as usize]),
            forward: forward::Scratch::default(),
        }
    }
}

impl Scratch {
    /// Whether some chain of the batch made an offload request.
    fn offloaded(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Take up to a batch of the `posted` chains from avail position `next` on, check
    /// that their buffers are device-readable and lie in guest memory, and read each one's
    /// header and first frame bytes (checking its offload request against `host`).
    fn take(&mut self, ring: &Ring<'_>, next: u16, posted: u16, port: &Port, host: Offloads) {
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
                    port.count_drop(&port.stats.drop_malformed, &what);
                    continue;
                }
            };
            if let Some(r) = self.raw.get(start) {
                // The header and the frame's start, read below once every chain is found.
                copy::prefetch(r.ptr);
                copy::prefetch(r.ptr.wrapping_add(64));
            }
            self.chains.push(Chain {
                taken,
                start,
                end: self.raw.len(),
                total,
            });
        }
        let (raw, snapshots, heads) = (&self.raw, &mut self.heads_snapshot, &mut self.gso_heads);
        let requests = &mut self.requests;
        requests.clear();
        for (k, c) in self.chains.iter().enumerate() {
            let raw = &raw[c.start..c.end];
            match read_head(raw, c.total, &mut snapshots[k], &mut heads[k], port, host) {
                Some(r) => {
                    // The chains before the first request made none.
                    requests.resize_with(k, || Ok(Offload::default()));
                    requests.push(r);
                }
                None if !requests.is_empty() => requests.push(Ok(Offload::default())),
                None => {}
            }
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
        let (packets, bytes) = self
            .chains
            .iter()
            .enumerate()
            .map(|(k, c)| c.wire(self.requests.get(k)))
            .fold((0, 0), |(p, b), (cp, cb)| (p + cp, b + cb));
        if qos.tx.consume_at(bytes, packets, now).is_ok() {
            return false;
        }
        for (k, c) in self.chains.iter().enumerate() {
            let (packets, bytes) = c.wire(self.requests.get(k));
            let Err(wait) = qos.tx.consume_at(bytes, packets, now) else {
                continue;
            };
            // Put this chain and the ones after it back (they were taken last, in ring
            // order); they go out when the bucket has refilled. Wait for a batch worth of
            // tokens (or a full bucket, if smaller) rather than one frame's: a timer wakeup
            // per frame would cost more than the frame.
            let taken = c.taken;
            let back = self.heads.len() - taken;
            queue.set_next_avail(queue.next_avail().wrapping_sub(back as u16));
            self.heads.truncate(taken);
            self.chains.truncate(k);
            self.requests.truncate(k);
            let batch = qos
                .tx
                .time_until(bytes * RATE_WAKEUP_FRAMES, packets * RATE_WAKEUP_FRAMES);
            if let Err(e) = qos.timer.arm(wait.max(batch)) {
                warn!(port = %port.spec.name, "cannot arm the rate-limit timer: {e}");
            }
            bump(&port.stats.tx_throttled, 1);
            return true;
        }
        false
    }

    /// Check each chain's frame and offload request, and collect the well-formed frames.
    /// Without `OFFLOADED` (no chain made a request: the usual batch) every offload branch
    /// is compiled out.
    fn classify<const OFFLOADED: bool>(&mut self, port: &Port) {
        self.frames.clear();
        self.ranges.clear();
        for (k, c) in self.chains.iter().enumerate() {
            let raw = &self.raw[c.start..c.end];
            if c.total < NET_HDR_LEN + frame::ETH_HLEN {
                port.count_drop(&port.stats.drop_malformed, "frame shorter than its headers");
                continue;
            }
            let frame_len = c.total - NET_HDR_LEN;
            let peek_len = PEEK_LEN.min(frame_len);
            let snapshot = &mut self.heads_snapshot[k];
            let off = match self.requests.get(k) {
                Some(Ok(off)) if OFFLOADED => *off,
                Some(Err(e)) if OFFLOADED => {
                    port.count_drop(&port.stats.drop_malformed, &e.to_string());
                    continue;
                }
                _ => Offload::default(),
            };
            let hdr = match frame::parse(&snapshot[..peek_len], frame_len) {
                Ok(h) => h,
                Err(e) => {
                    port.count_drop(&port.stats.drop_malformed, &e.to_string());
                    continue;
                }
            };
            // A segmentation request's segments were held to the MTU when it was checked.
            let limit = usize::from(port.spec.mtu)
                + frame::ETH_HLEN
                + if hdr.tag.is_some() {
                    frame::VLAN_HLEN
                } else {
                    0
                };
            if frame_len > limit && !off.is_gso() {
                port.count_drop(&port.stats.drop_mtu, "frame larger than the MTU");
                continue;
            }
            if off.is_gso() {
                bump(&port.stats.rx_gso, 1);
            }
            // The frame's bytes: the snapshot of its head (of all its headers, for a
            // segmentation request), then the chain's ranges past the virtio-net header and
            // the head.
            let first = self.ranges.len();
            let head = if off.is_gso() {
                HostRange {
                    ptr: self.gso_heads[k].as_mut_ptr(),
                    len: usize::from(off.hdr_len),
                }
            } else {
                HostRange {
                    ptr: snapshot.as_mut_ptr(),
                    len: peek_len,
                }
            };
            self.ranges.push(head);
            let mut skip = NET_HDR_LEN + head.len;
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
                off,
                start: first,
                end: self.ranges.len(),
                len: frame_len,
            });
        }
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
    use std::sync::Arc;

    use vm_memory::{GuestAddress, GuestMemoryAtomic};

    use crate::config::{QosConfig, VlanMode};
    use crate::policy::qos::PortQos;
    use crate::port::PortSpec;
    use crate::wire::guest::Mem;
    use crate::wire::vnet;

    const QSIZE: u16 = 16;

    fn port(name: &str, vlan: VlanMode) -> (PortSpec, PortQos) {
        let spec = PortSpec {
            name: name.into(),
            vlan,
            mac: None,
            anti_spoof: false,
            mtu: 1500,
            queues: 1,
            offloads: true,
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

    /// What receive queue `q`, whose chain `i` is one buffer at 0x4_0000 + 0x1000 * i,
    /// got in its used entry `k`.
    fn received(q: &MockSplitQueue<'_, Mem>, mem: &Mem, k: usize) -> Vec<u8> {
        let used = q.used().ring().ref_at(k).expect("used").load();
        let mut buf = vec![0u8; used.len() as usize];
        mem.read_slice(
            &mut buf,
            GuestAddress(0x4_0000 + 0x1000 * u64::from(used.id())),
        )
        .expect("read");
        buf
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
        switch.attach_rx(1, 0, &rx, true);

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
        let pass = super::pass(&switch, 0, &tx, &mut Scratch::default());
        assert_eq!(pass, Pass::Took(chains.len()));

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
            assert_eq!(&out[12..16], &crate::wire::frame::tag_bytes(10));
            assert!(out[16..] == frame[12..], "payload after the tag");
        }
    }

    /// A TCP segmentation request crosses the switch whole to a port whose guest takes
    /// it (with the tag inserted and the header's offsets moved by it), and is cut into
    /// checksummed segments for a port whose guest does not.
    #[test]
    fn segmentation_carried_or_done_per_receiver() {
        use crate::wire::gso::testing::{tcp_checksum_ok, tcp_frame};
        use virtio_bindings::virtio_net::*;

        let trunk = VlanMode::Trunk {
            allowed: vec![10],
            native: None,
        };
        let switch = Arc::new(Switch::new(
            vec![
                port("a", VlanMode::Access(10)),
                port("b", trunk),
                port("c", VlanMode::Access(10)),
            ],
            vec![],
            64,
            std::time::Duration::from_secs(300),
            vec![None, None, None],
        ));
        let mrg = 1u64 << VIRTIO_NET_F_MRG_RXBUF;
        switch.ports[0].set_features(mrg | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4);
        switch.ports[1]
            .set_features(mrg | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4);
        switch.ports[2].set_features(mrg);
        let mems: Vec<GuestMemoryAtomic<Mem>> = (0..3)
            .map(|_| {
                GuestMemoryAtomic::new(
                    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem"),
                )
            })
            .collect();
        for (k, m) in mems.iter().enumerate() {
            switch.set_mem(k, m.clone());
        }
        let views: Vec<_> = mems.iter().map(|m| m.memory()).collect();
        let txq = MockSplitQueue::new(&*views[0], QSIZE);
        let rxb = MockSplitQueue::new(&*views[1], QSIZE);
        let rxc = MockSplitQueue::new(&*views[2], QSIZE);
        let tx = vring(&mems[0], &txq);
        let (vb, vc) = (vring(&mems[1], &rxb), vring(&mems[2], &rxc));
        switch.attach_rx(1, 0, &vb, true);
        switch.attach_rx(2, 0, &vc, true);
        for (q, n) in [(&rxb, 2u16), (&rxc, 3)] {
            for i in 0..n {
                let addr = 0x4_0000 + u64::from(i) * 0x1000;
                q.add_desc_chains(&chain(&[(addr, 2048, true)], i), i)
                    .expect("rx chain");
            }
        }

        let (frame, off) = tcp_frame(false, false, 2500, 0x18);
        let mut sent = off.header(0).to_vec();
        sent.extend_from_slice(&frame);
        views[0]
            .write_slice(&sent, GuestAddress(0x1_0000))
            .expect("frame");
        txq.add_desc_chains(&chain(&[(0x1_0000, sent.len() as u32, false)], 0), 0)
            .expect("tx chain");
        let pass = super::pass(&switch, 0, &tx, &mut Scratch::default());
        assert_eq!(pass, Pass::Took(1));

        let stat = |p: usize, f: fn(&crate::port::PortStats) -> &std::sync::atomic::AtomicU64| {
            f(&switch.ports[p].stats).load(Ordering::Relaxed)
        };
        assert_eq!(stat(0, |s| &s.rx_gso), 1);
        assert_eq!(stat(0, |s| &s.drop_malformed), 0);
        // b: one frame in two receive buffers, the request in its header, the tag in.
        assert_eq!(rxb.used().idx().load(), 2);
        let got = [received(&rxb, &views[1], 0), received(&rxb, &views[1], 1)].concat();
        let hdr: [u8; NET_HDR_LEN] = got[..NET_HDR_LEN].try_into().expect("header");
        let carried = Offload::from_header(&hdr);
        assert_eq!(
            (carried.gso_type, carried.gso_size, carried.csum_start),
            (off.gso_type, 1000, off.csum_start + 4)
        );
        assert_eq!(u16::from_le_bytes([hdr[2], hdr[3]]), 14 + 4 + 20 + 32);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 2, "num_buffers");
        let tagged = [
            &frame[..12],
            &crate::wire::frame::tag_bytes(10),
            &frame[12..],
        ]
        .concat();
        assert!(
            got[NET_HDR_LEN..] == tagged[..],
            "the frame, one copy, tag inserted"
        );
        assert_eq!(stat(1, |s| &s.tx_gso), 1);

        // c: three segments of at most 1000 payload bytes, each with good checksums.
        assert_eq!(rxc.used().idx().load(), 3);
        let mut payload = Vec::new();
        for k in 0..3 {
            let buf = received(&rxc, &views[2], k);
            assert_eq!(buf[..NET_HDR_LEN], vnet::header(1), "no offload left");
            let seg = &buf[NET_HDR_LEN..];
            assert!(tcp_checksum_ok(seg), "segment {k}");
            payload.extend_from_slice(&seg[14 + 20 + 32..]);
        }
        assert!(payload == frame[14 + 20 + 32..], "the stream, in order");
        assert_eq!(stat(2, |s| &s.tx_sw_offload), 1);
        assert_eq!(stat(2, |s| &s.tx_packets), 3);
    }

    /// A guest that leaves its ping's checksum to the switch (NEEDS_CSUM) is answered by the
    /// VLAN's service endpoint, which checks checksums: the switch finished it first. The
    /// same ping with the checksum left open but no request goes unanswered.
    #[test]
    fn service_endpoint_gets_checksums_finished() {
        use crate::policy::service::ServicePort;
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{
            ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
            EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr,
        };
        use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MRG_RXBUF};

        let service = ServicePort::new(10, "10.0.10.254".parse().expect("ip"), 24);
        let svc_mac = ServicePort::mac_for(10).0;
        let switch = Arc::new(Switch::new(
            vec![port("a", VlanMode::Access(10))],
            vec![service],
            64,
            std::time::Duration::from_secs(300),
            vec![None],
        ));
        switch.ports[0].set_features(1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_MRG_RXBUF);
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem"),
        );
        switch.set_mem(0, mem.clone());
        let view = mem.memory();
        // One guest's two rings, apart in its memory.
        let txq = MockSplitQueue::new(&*view, QSIZE);
        let rxq = MockSplitQueue::create(&*view, GuestAddress(0x8_0000), QSIZE);
        let (tx, rx) = (vring(&mem, &txq), vring(&mem, &rxq));
        switch.attach_rx(0, 0, &rx, true);
        for i in 0..4u16 {
            let addr = 0x4_0000 + u64::from(i) * 0x1000;
            rxq.add_desc_chains(&chain(&[(addr, 2048, true)], i), i)
                .expect("rx chain");
        }

        let guest = [2u8, 0, 0, 0, 0, 1];
        let (guest_ip, svc_ip) = (
            Ipv4Address::new(10, 0, 10, 1),
            Ipv4Address::new(10, 0, 10, 254),
        );
        let eth = |dst: [u8; 6], proto, payload: usize| {
            let repr = EthernetRepr {
                src_addr: EthernetAddress(guest),
                dst_addr: EthernetAddress(dst),
                ethertype: proto,
            };
            let mut buf = vec![0u8; repr.buffer_len() + payload];
            repr.emit(&mut EthernetFrame::new_unchecked(&mut buf));
            buf
        };
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(guest),
            source_protocol_addr: guest_ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: svc_ip,
        };
        let mut arp_frame = eth([0xff; 6], EthernetProtocol::Arp, arp.buffer_len());
        arp.emit(&mut ArpPacket::new_unchecked(&mut arp_frame[14..]));
        let icmp = Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: 1,
            data: b"ping",
        };
        let ip = Ipv4Repr {
            src_addr: guest_ip,
            dst_addr: svc_ip,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let mut ping = eth(
            svc_mac,
            EthernetProtocol::Ipv4,
            ip.buffer_len() + icmp.buffer_len(),
        );
        let caps = ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(&mut ping[14..]);
        ip.emit(&mut p, &caps);
        icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
        // The ICMP checksum (no pseudo-header) left for the device: the field starts at 0.
        ping[34 + 2..34 + 4].fill(0);
        let request = Offload {
            flags: vnet::F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 2,
            ..Offload::default()
        };

        let frames: [(Offload, &[u8]); 3] = [
            (Offload::default(), &arp_frame),
            (Offload::default(), &ping),
            (request, &ping),
        ];
        for (k, (off, frame)) in frames.iter().enumerate() {
            let addr = 0x1_0000 + k as u64 * 0x1000;
            let bytes = [&off.header(0)[..], frame].concat();
            view.write_slice(&bytes, GuestAddress(addr)).expect("frame");
            txq.add_desc_chains(
                &chain(&[(addr, bytes.len() as u32, false)], k as u16),
                k as u16,
            )
            .expect("tx chain");
        }
        assert_eq!(
            super::pass(&switch, 0, &tx, &mut Scratch::default()),
            Pass::Took(3)
        );
        // The ARP reply, then one echo reply: for the ping whose checksum was finished.
        assert_eq!(rxq.used().idx().load(), 2, "ARP reply and one echo reply");
        let got = received(&rxq, &view, 1);
        let f = EthernetFrame::new_checked(&got[NET_HDR_LEN..]).expect("frame");
        let p = Ipv4Packet::new_checked(f.payload()).expect("ip");
        let reply = Icmpv4Repr::parse(
            &Icmpv4Packet::new_checked(p.payload()).expect("icmp"),
            &caps,
        )
        .expect("icmp");
        assert!(matches!(
            reply,
            Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 1,
                ..
            }
        ));
    }
}
