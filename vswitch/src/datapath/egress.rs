//! The last step of a frame: into a destination port's receive ring. The port's rules
//! (its VLANs, MTU and receive rate) admit it; an offload the port's guest did not
//! negotiate is done in software (the frame checksummed or segmented in switch memory);
//! receive chains are taken for it, and it is copied there with its tag edited and its
//! offload request in the header, then the batch is published with one used-index store.

use std::ops::Range;

use tracing::warn;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use crate::port::Port;
use crate::wire::copy::{self, Egress, Piece};
use crate::wire::frame::{self, ETH_HLEN, FLOW_PEEK, PEEK_LEN, VLAN_HLEN};
use crate::wire::gso::{self, Pool};
use crate::wire::guest::HostRange;
use crate::wire::ring::Ring;
use crate::wire::vnet::{self, Offload, Offloads, NET_HDR_LEN};
use common::counters::bump;

/// A frame on its way to one destination port: its bytes are `ranges[start..end]` of its
/// batch's range list, `len` in all, the first range being the switch's snapshot of its
/// head. `off` is its sender's (checked) offload request.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    pub start: usize,
    pub end: usize,
    pub len: usize,
    pub vlan: u16,
    pub tagged: bool,
    pub off: Offload,
}

/// Where one frame goes in a destination's receive ring.
enum Plan {
    /// The usual case: a frame in one source buffer, leaving as it came with no offload,
    /// into one receive buffer that holds it. The header, the frame's head (the switch's
    /// snapshot of it, PEEK_LEN bytes) and one copy of the rest, nothing to walk.
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

/// A forwarding thread's delivery buffers, kept from batch to batch so delivery does not
/// allocate.
#[derive(Default)]
pub struct Scratch {
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
    /// A multiqueue destination's enabled receive queues, and the frames for each.
    active: Vec<usize>,
    by_queue: Vec<Vec<Out>>,
    /// When some frames need their offloads done here: the batch's ranges followed by
    /// those of the frames made, which live in `pool`.
    soft_ranges: Vec<HostRange>,
    soft: Vec<Out>,
    pool: Pool,
    /// The frames of `pool` each accepted frame became (None: it goes as it is).
    made: Vec<Option<Range<usize>>>,
    linear: Vec<u8>,
}

// SAFETY: the host pointers in `plans`, `pieces` and `dest` are only dereferenced during
// the `deliver` call that filled them, while it holds the memory views they point into; a
// scratch moved to another thread carries no live borrow.
unsafe impl Send for Scratch {}

/// Copy `items` (frames in `ranges`, in the sender's memory, which the caller holds) into
/// port `p`'s receive queues, in order; with several queues, each flow to one of them. A
/// frame that finds no room is dropped for this port only, with a counter. Unless
/// `offloaded` (some frame has an offload request), the plain path is taken throughout.
pub fn deliver(p: &Port, items: &[Out], ranges: &[HostRange], offloaded: bool, s: &mut Scratch) {
    admit(p, items, offloaded, s);
    if s.accepted.is_empty() {
        return;
    }
    if !offloaded {
        to_queues(p, ranges, s);
        return;
    }
    let guest = Offloads::guest(p.features());
    if s.accepted.iter().all(|o| guest.takes(&o.off)) {
        to_queues(p, ranges, s);
        return;
    }
    let mut soft_ranges = std::mem::take(&mut s.soft_ranges);
    soften(p, guest, ranges, &mut soft_ranges, s);
    to_queues(p, &soft_ranges, s);
    soft_ranges.clear();
    s.soft_ranges = soft_ranges;
}

/// Do in software the offloads port `p`'s guest did not negotiate (`guest` is what it
/// did) for the frames in `s.accepted`: each such frame is copied into switch memory,
/// checksummed or segmented there, and replaced by the frames made. `out` gets `ranges`
/// followed by the ranges of the frames made.
fn soften(
    p: &Port,
    guest: Offloads,
    ranges: &[HostRange],
    out: &mut Vec<HostRange>,
    s: &mut Scratch,
) {
    s.pool.reset();
    s.made.clear();
    for o in &s.accepted {
        if guest.takes(&o.off) {
            s.made.push(None);
            continue;
        }
        s.linear.resize(o.len, 0);
        copy::gather(&ranges[o.start..o.end], &mut s.linear);
        match gso::resolve(&s.linear, &o.off, &mut s.pool) {
            Ok(made) => {
                bump(&p.stats.tx_sw_offload, 1);
                s.made.push(Some(made));
            }
            Err(e) => {
                // Its headers were checked when it was taken: cannot happen.
                p.count_drop(&p.stats.drop_malformed, &e.to_string());
                s.made.push(Some(0..0));
            }
        }
    }
    // The pool is complete: its frames stay where they are until the next reset.
    out.clear();
    out.extend_from_slice(ranges);
    s.soft.clear();
    for (o, made) in s.accepted.iter().zip(&s.made) {
        let Some(made) = made else {
            s.soft.push(*o);
            continue;
        };
        for k in made.clone() {
            let r = s.pool.range(k);
            s.soft.push(Out {
                start: out.len(),
                end: out.len() + 1,
                len: r.len,
                off: Offload::default(),
                ..*o
            });
            out.push(r);
        }
    }
    std::mem::swap(&mut s.accepted, &mut s.soft);
}

/// Copy the frames in `s.accepted` into port `p`'s receive queues; with several queues,
/// each flow to one of them.
fn to_queues(p: &Port, ranges: &[HostRange], s: &mut Scratch) {
    if p.rx.len() == 1 {
        fill(p, 0, ranges, s);
        return;
    }
    s.active.clear();
    for q in 0..p.rx.len() {
        let enabled = p
            .rx(q)
            .vring
            .as_ref()
            .is_some_and(|v| v.get_ref().is_enabled());
        if enabled {
            s.active.push(q);
        }
    }
    if s.active.len() <= 1 {
        fill(p, s.active.first().copied().unwrap_or(0), ranges, s);
        return;
    }
    if s.by_queue.len() < p.rx.len() {
        s.by_queue.resize_with(p.rx.len(), Vec::new);
    }
    let mut head = [0u8; FLOW_PEEK];
    for o in &s.accepted {
        let n = copy::gather(&ranges[o.start..o.end], &mut head);
        let h = frame::flow_hash(&head[..n]) as usize;
        s.by_queue[s.active[h % s.active.len()]].push(*o);
    }
    for k in 0..s.active.len() {
        let q = s.active[k];
        if s.by_queue[q].is_empty() {
            continue;
        }
        std::mem::swap(&mut s.accepted, &mut s.by_queue[q]);
        fill(p, q, ranges, s);
        std::mem::swap(&mut s.accepted, &mut s.by_queue[q]);
        s.by_queue[q].clear();
    }
}

/// Copy the frames in `s.accepted` into receive queue `q` of port `p`.
fn fill(p: &Port, q: usize, ranges: &[HostRange], s: &mut Scratch) {
    let rx = p.rx(q);
    let mergeable = rx.mergeable;
    let (Some(vring), Some(mem)) = (rx.vring.as_ref(), rx.mem.as_ref()) else {
        // No guest (yet) on that port.
        bump(&p.stats.drop_no_rx_buffer, s.accepted.len() as u64);
        return;
    };
    let mut state = vring.get_mut();
    if !state.is_enabled() {
        p.count_drops(
            &p.stats.drop_no_rx_buffer,
            s.accepted.len() as u64,
            "receive queue not enabled",
        );
        return;
    }
    let event_idx = state.get_queue().event_idx_enabled();
    let queue = state.get_queue_mut();
    let view = mem.memory();
    let (ring, posted) = match Ring::open(queue, &view, mem) {
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
    let next = queue.next_avail();
    ring.prefetch_chains(next, posted.min(s.accepted.len() as u16));
    // First take buffers for every frame, then copy: the buffers' cache lines load while
    // the next frame's buffers are looked up.
    let planned = plan(p, &ring, next, posted, mergeable, ranges, s);
    queue.set_next_avail(next.wrapping_add(planned.taken));
    copy_planned(s);
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
    if planned.no_room > 0 {
        p.count_drops(
            &p.stats.drop_no_rx_buffer,
            planned.no_room as u64,
            "no receive buffer",
        );
    }
    bump(&p.stats.tx_packets, s.plans.len() as u64);
    bump(&p.stats.tx_bytes, planned.bytes);
    if planned.gso > 0 {
        bump(&p.stats.tx_gso, planned.gso);
    }
}

/// The frames of `items` that port `p`'s VLANs, MTU and receive rate let in, into
/// `s.accepted`.
fn admit(p: &Port, items: &[Out], offloaded: bool, s: &mut Scratch) {
    s.accepted.clear();
    for o in items {
        if !p.spec.vlan.carries(o.vlan) {
            continue;
        }
        // The tag never counts towards the MTU, whether it is kept, stripped or added. A
        // segmentation request is held to it by its segments.
        let l2 = ETH_HLEN + if o.tagged { VLAN_HLEN } else { 0 };
        let l3 = if o.off.is_gso() {
            usize::from(o.off.hdr_len).saturating_sub(l2) + usize::from(o.off.gso_size)
        } else {
            o.len.saturating_sub(l2)
        };
        if l3 > usize::from(p.spec.mtu) {
            p.count_drop(&p.stats.drop_mtu, "frame larger than the port's MTU");
            continue;
        }
        s.accepted.push(*o);
    }
    let mut qos = p.qos();
    if qos.rx.is_unlimited() {
        return;
    }
    // One charge when the whole batch fits, else frame by frame; a segmentation request
    // is charged for its segments as they go on the wire.
    let now = qos.rx.now_ns();
    let (n, bytes) = if offloaded {
        s.accepted
            .iter()
            .map(|o| o.off.wire(o.len))
            .fold((0, 0), |(n, b), (fn_, fb)| (n + fn_, b + fb))
    } else {
        let bytes: usize = s.accepted.iter().map(|o| o.len).sum();
        (s.accepted.len() as u64, bytes as u64)
    };
    if qos.rx.consume_at(bytes, n, now).is_err() {
        s.accepted.retain(|o| {
            let (n, bytes) = o.off.wire(o.len);
            let ok = qos.rx.consume_at(bytes, n, now).is_ok();
            if !ok {
                p.count_drop(&p.stats.drop_qos, "receive rate limit");
            }
            ok
        });
    }
}

/// What [`plan`] did with the ring.
struct Planned {
    /// Avail entries consumed.
    taken: u16,
    /// Accepted frames, the last ones, that found no room.
    no_room: usize,
    /// Frame bytes planned.
    bytes: u64,
    /// Segmentation requests among them, which the guest segments.
    gso: u64,
}

/// Take receive chains for each accepted frame, in order, and plan its copy into them.
fn plan(
    p: &Port,
    ring: &Ring<'_>,
    next: u16,
    posted: u16,
    mergeable: bool,
    ranges: &[HostRange],
    s: &mut Scratch,
) -> Planned {
    s.plans.clear();
    s.pieces.clear();
    s.dest.clear();
    s.used.clear();
    let mut out = Planned {
        taken: 0,
        no_room: 0,
        bytes: 0,
        gso: 0,
    };
    for k in 0..s.accepted.len() {
        let o = s.accepted[k];
        let egress = p.spec.vlan.egress(o.vlan, o.tagged);
        let total = NET_HDR_LEN + egress.frame_len(o.len);
        let dest = s.dest.len();
        if !take_chains(p, ring, next, posted, mergeable, total, &mut out.taken, s) {
            // The frames after it find no room either.
            out.no_room = s.accepted.len() - k;
            break;
        }
        plan_copy(&ranges[o.start..o.end], egress, o.off, total, dest, s);
        // The copy fills the chains in order: each holds its capacity, the last the rest.
        let mut left = total;
        for &c in &s.frame_chains {
            let len = (s.used[c].1 as usize).min(left);
            left -= len;
            s.used[c].1 = len as u32;
        }
        out.bytes += (total - NET_HDR_LEN) as u64;
        out.gso += u64::from(o.off.is_gso());
    }
    out
}

/// Take receive chains from avail position `next + *taken` on until they hold `total`
/// bytes (one chain unless `mergeable`), appending their ranges to `s.dest` and their
/// heads to `s.used`; `s.frame_chains` names the ones that hold the frame. False if the
/// frame does not fit in what is posted: then the chains taken for it are given back when
/// they can be, or returned empty.
#[allow(clippy::too_many_arguments)]
fn take_chains(
    p: &Port,
    ring: &Ring<'_>,
    next: u16,
    posted: u16,
    mergeable: bool,
    total: usize,
    taken: &mut u16,
    s: &mut Scratch,
) -> bool {
    let (dest, used, before) = (s.dest.len(), s.used.len(), *taken);
    s.frame_chains.clear();
    let mut capacity = 0usize;
    while capacity < total && *taken < posted {
        if !mergeable && !s.frame_chains.is_empty() {
            break;
        }
        let head = ring.head(next.wrapping_add(*taken));
        *taken += 1;
        let first = s.dest.len();
        let unusable = match ring.chain(head, true, &mut s.dest) {
            Err(e) => Some(format!("receive chain: {e}")),
            Ok(t) if t.bytes == 0 => Some("receive chain without a writable buffer".to_string()),
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
    if capacity >= total {
        return true;
    }
    if s.used.len() - used == s.frame_chains.len() {
        // Give this frame's buffers back for a later frame.
        *taken = before;
        s.used.truncate(used);
    } else {
        // Unusable chains were consumed among them, so the ring cannot be rewound: return
        // this frame's buffers empty as well.
        for &k in &s.frame_chains {
            s.used[k].1 = 0;
        }
    }
    s.dest.truncate(dest);
    false
}

/// Plan the copy of a frame (`src`, leaving by `egress` with offload request `off`,
/// `total` bytes with its header) into the receive ranges `s.dest[dest..]`.
fn plan_copy(
    src: &[HostRange],
    egress: Egress,
    off: Offload,
    total: usize,
    dest: usize,
    s: &mut Scratch,
) {
    let first = s.dest.get(dest).copied();
    if let Some(r) = first {
        // The lines the driver touched last (the virtio-net header and the Ethernet header
        // behind it): the first one or two.
        copy::prefetch_write(r.ptr);
        let first_line = 64 - (r.ptr as usize % 64);
        if r.len.min(total) > first_line {
            copy::prefetch_write(r.ptr.wrapping_add(first_line));
        }
    }
    match (src, first) {
        ([head, rest], Some(first))
            if egress == Egress::AsIs
                && first.len >= total
                && head.len == PEEK_LEN
                // A request always has NEEDS_CSUM.
                && off.flags == 0 =>
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
                    bytes: off
                        .shifted(egress.delta())
                        .header(s.frame_chains.len() as u16),
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
}

/// Carry out the planned copies.
fn copy_planned(s: &Scratch) {
    for plan in &s.plans {
        match plan {
            &Plan::Direct {
                head,
                src,
                dst,
                len,
            } => {
                let hdr = vnet::header(1);
                // SAFETY: `dst` is a receive buffer of at least NET_HDR_LEN + PEEK_LEN + len
                // bytes validated against the receiver's memory, which `deliver` holds;
                // `head` is the sender's PEEK_LEN-byte snapshot, in the caller's scratch;
                // `src` is `len` bytes of the sender's validated memory, which its caller
                // holds. `ptr::copy` tolerates a guest that made its TX and RX buffers
                // overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(hdr.as_ptr(), dst, NET_HDR_LEN);
                    std::ptr::copy_nonoverlapping(head, dst.add(NET_HDR_LEN), PEEK_LEN);
                    std::ptr::copy(src, dst.add(NET_HDR_LEN + PEEK_LEN), len);
                }
            }
            Plan::Pieces { pieces, dest } => {
                // SAFETY: the source ranges were validated against the sender's memory,
                // which its caller holds; the destination ranges against the receiver's,
                // which `deliver` holds.
                unsafe { copy::copy(&s.pieces[pieces.clone()], &s.dest[dest.clone()]) };
            }
        }
    }
}
