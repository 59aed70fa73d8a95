//! The forwarding decision for each frame a port's guest sent: anti-spoofing, the VLAN it
//! belongs to, learning its source, looking up its destination (or flooding it, within
//! storm control), and handing it to each destination's egress in one batch per port.

use std::time::Instant;

use tracing::debug;

use super::egress::{self, Out};
use crate::policy::fdb::Learned;
use crate::policy::service::ServicePort;
use crate::switch::Switch;
use crate::wire::copy::{self, Egress, Piece};
use crate::wire::frame::{self, Header, Mac};
use crate::wire::gso::{self, Pool};
use crate::wire::guest::HostRange;
use crate::wire::vnet::Offload;
use common::counters::bump;

/// A frame taken from a transmit ring: its bytes (after the virtio-net header) are
/// `ranges[start..end]` of its batch's range list, `len` in all. The first range is the
/// switch's own copy of the frame's head, which `hdr` was parsed from; the others are the
/// rest of the frame in the sender's memory. `off` is its checked offload request.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub hdr: Header,
    pub off: Offload,
    pub start: usize,
    pub end: usize,
    pub len: usize,
}

/// A forwarding thread's buffers, kept from batch to batch so forwarding does not allocate.
#[derive(Default)]
pub struct Scratch {
    /// Frames for each destination port, and the ports that have some, in order.
    outbox: Vec<Vec<Out>>,
    dests: Vec<usize>,
    service: Vec<Out>,
    egress: egress::Scratch,
}

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

impl Switch {
    /// Forward a batch of frames that port `src`'s guest sent. Each frame's bytes (after
    /// the virtio-net header) are `ranges[frame.start..frame.end]`, in the sender's memory,
    /// which the caller holds; `offloaded` says whether any has an offload request.
    pub fn forward_batch(
        &self,
        src: usize,
        frames: &[Frame],
        ranges: &[HostRange],
        offloaded: bool,
        s: &mut Scratch,
    ) {
        if s.outbox.len() < self.ports.len() {
            s.outbox.resize_with(self.ports.len(), Vec::new);
        }
        s.service.clear();
        self.decide(src, frames, s);
        // Each destination's frames in one go: one ring lock and one avail index read.
        for k in 0..s.dests.len() {
            let d = s.dests[k];
            let mut items = std::mem::take(&mut s.outbox[d]);
            egress::deliver(&self.ports[d], &items, ranges, offloaded, &mut s.egress);
            items.clear();
            s.outbox[d] = items;
        }
        s.dests.clear();
        let service = std::mem::take(&mut s.service);
        for o in &service {
            self.to_service(src, o, ranges, s);
        }
        s.service = service;
    }

    /// Sort each frame into the outboxes of the ports it goes to.
    fn decide(&self, src: usize, frames: &[Frame], s: &mut Scratch) {
        let sp = &self.ports[src];
        // One clock read and one FDB lock for the whole batch.
        let now = Instant::now();
        let (mut packets, mut bytes) = (0u64, 0u64);
        let mut fdb = self.fdb();
        let mut qos = None;
        // Consecutive frames of a flow share their addresses: the previous frame's learning
        // and lookup stand for theirs (same clock reading; a learn that changes the table
        // forgets the lookup).
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
            if !hdr.src.is_multicast() && !hdr.src.is_zero() && learned != Some((vlan, hdr.src)) {
                learned = Some((vlan, hdr.src));
                match fdb.learn(vlan, hdr.src, src, now) {
                    Learned::Refreshed => {}
                    Learned::New => looked_up = None,
                    Learned::Evicted { victim } => {
                        looked_up = None;
                        bump(&sp.stats.fdb_full, 1);
                        bump(&self.ports[victim].stats.fdb_evicted, 1);
                    }
                    Learned::PortLimit => {
                        learned = None;
                        sp.count_drop(&sp.stats.drop_mac_limit, "the port's MAC limit is reached");
                        continue;
                    }
                    Learned::Moved { from } => {
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
                // A segmentation request floods as the frames it stands for.
                let (frames, _) = f.off.wire(f.len);
                if q.storm.consume_at(0, frames, *now).is_err() {
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
                off: f.off,
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
        bump(&sp.stats.rx_packets, packets);
        bump(&sp.stats.rx_bytes, bytes);
    }

    /// Give a frame to the VLAN's service endpoint, if it has one, and send its answers.
    /// This is the slow path (ARP and ping), so the frame is copied into a buffer, and
    /// whatever checksum or segmentation its sender left to the switch is done there.
    fn to_service(&self, src: usize, o: &Out, ranges: &[HostRange], s: &mut Scratch) {
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
        let mut frames = vec![buf];
        if o.off != Offload::default() {
            let mut pool = Pool::default();
            match gso::resolve(&frames[0], &o.off.shifted(egress.delta()), &mut pool) {
                Ok(made) => frames = made.map(|k| pool.frame(k).to_vec()).collect(),
                Err(e) => {
                    let sp = &self.ports[src];
                    sp.count_drop(&sp.stats.drop_malformed, &e.to_string());
                    return;
                }
            }
        }
        let mut sv = match service.1.lock() {
            Ok(sv) => sv,
            Err(p) => p.into_inner(),
        };
        let replies: Vec<Vec<u8>> = frames.into_iter().flat_map(|f| sv.input(f)).collect();
        drop(sv);
        for mut reply in replies {
            self.inject(o.vlan, &mut reply, s);
        }
    }

    /// Send a frame the switch itself made (untagged) on `vlan`.
    fn inject(&self, vlan: u16, frame: &mut [u8], s: &mut Scratch) {
        let Ok(hdr) = frame::parse(frame, frame.len()) else {
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
            off: Offload::default(),
        }];
        let known = if hdr.dst.is_multicast() {
            None
        } else {
            self.fdb().lookup(vlan, hdr.dst, Instant::now())
        };
        match known {
            Some(d) => egress::deliver(&self.ports[d], &out, &range, false, &mut s.egress),
            None => {
                for p in &self.ports {
                    if p.spec.vlan.carries(vlan) {
                        egress::deliver(p, &out, &range, false, &mut s.egress);
                    }
                }
            }
        }
    }
}
