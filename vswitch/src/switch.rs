//! The switch: its ports, the forwarding database, and the forwarding decision for each
//! frame a guest sends.

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
use crate::frame::{Header, Mac};
use crate::net::{self, NET_HDR_LEN};
use crate::qos::PortQos;
use crate::service::ServicePort;
use crate::stats::{bump, should_log, PortStats};
use crate::vlan::Egress;

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
    /// Frames were delivered since the guest was last notified.
    unsignalled: bool,
    dest: Vec<HostRange>,
    written: Vec<usize>,
    chains: Vec<(u16, usize)>,
}

// SAFETY: `dest` holds host pointers only during one `deliver` call, which fills it under
// the lock while it holds the memory view they point into, and empties it before returning.
unsafe impl Send for RxSide {}

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
        let n = bump(counter, 1);
        if should_log(n) {
            warn!(port = %self.spec.name, count = n, "dropped a frame: {what}");
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
        let mut fdb = self.fdb();
        fdb.age(now);
        fdb.entries(now)
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

    /// Forward one frame from port `src` with header `hdr`, whose bytes (after the
    /// virtio-net header) are `frame`. Returns the ports it was delivered to in `touched`.
    pub fn forward(
        &self,
        src: usize,
        hdr: &Header,
        frame: &[HostRange],
        frame_len: usize,
        scratch: &mut Vec<Piece>,
        touched: &mut Vec<usize>,
    ) {
        let sp = &self.ports[src];
        if sp.spec.anti_spoof && Some(hdr.src) != sp.spec.mac {
            sp.count_drop(&sp.stats.drop_spoof, "source MAC is not the port's");
            return;
        }
        let vlan = match sp.spec.vlan.ingress(hdr.tag) {
            Ok(v) => v,
            Err(e) => {
                sp.count_drop(&sp.stats.drop_vlan, &e.to_string());
                return;
            }
        };
        let now = Instant::now();
        let dest = {
            let mut fdb = self.fdb();
            if !hdr.src.is_multicast() && !hdr.src.is_zero() {
                match fdb.learn(vlan, hdr.src, src, now) {
                    Learned::TableFull => {
                        bump(&sp.stats.fdb_full, 1);
                    }
                    Learned::PortLimit => {
                        sp.count_drop(&sp.stats.drop_mac_limit, "the port's MAC limit is reached");
                        return;
                    }
                    Learned::Moved { from } => {
                        debug!(mac = %hdr.src, vlan, from = %self.ports[from].spec.name, to = %sp.spec.name, "MAC moved")
                    }
                    Learned::New | Learned::Refreshed => {}
                }
            }
            if hdr.dst.is_multicast() {
                None
            } else {
                fdb.lookup(vlan, hdr.dst, now)
            }
        };
        let to_service = hdr.dst == ServicePort::mac_for(vlan);
        if dest.is_none() && !to_service && sp.qos().storm.consume(0, 1).is_err() {
            sp.count_drop(&sp.stats.drop_storm, "storm control");
            return;
        }
        bump(&sp.stats.rx_packets, 1);
        bump(&sp.stats.rx_bytes, frame_len as u64);
        let tagged = hdr.tag.is_some();
        if to_service {
            self.to_service(vlan, tagged, frame, scratch, touched);
            return;
        }
        match dest {
            Some(d) if d == src => {}
            Some(d) => self.deliver(d, vlan, tagged, frame, scratch, touched),
            None => {
                for d in 0..self.ports.len() {
                    if d != src && self.ports[d].spec.vlan.carries(vlan) {
                        self.deliver(d, vlan, tagged, frame, scratch, touched);
                    }
                }
                if hdr.dst.is_multicast() {
                    self.to_service(vlan, tagged, frame, scratch, touched);
                }
            }
        }
    }

    /// Give a frame to the VLAN's service endpoint, if it has one, and send its answers.
    /// This is the slow path (ARP and ping), so the frame is copied into a buffer.
    fn to_service(
        &self,
        vlan: u16,
        tagged: bool,
        frame: &[HostRange],
        scratch: &mut Vec<Piece>,
        touched: &mut Vec<usize>,
    ) {
        let Some(service) = self.services.iter().find(|s| s.0 == vlan) else {
            return;
        };
        let egress = if tagged { Egress::Strip } else { Egress::AsIs };
        let total = copy::plan(
            frame,
            egress,
            Piece::Inline {
                bytes: [0; 12],
                len: 0,
            },
            scratch,
        );
        let mut buf = vec![0u8; total];
        let dest = [HostRange {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        let mut written = Vec::new();
        // SAFETY: the source ranges are the sender's validated guest memory, held by the
        // caller; the destination is `buf`, alive for the call.
        unsafe { copy::copy(scratch, &dest, &mut written) };
        let replies = match service.1.lock() {
            Ok(mut s) => s.input(buf),
            Err(p) => p.into_inner().input(buf),
        };
        for mut reply in replies {
            self.inject(vlan, &mut reply, scratch, touched);
        }
    }

    /// Send a frame the switch itself made (untagged) on `vlan`.
    fn inject(
        &self,
        vlan: u16,
        frame: &mut [u8],
        scratch: &mut Vec<Piece>,
        touched: &mut Vec<usize>,
    ) {
        let Ok(hdr) = crate::frame::parse(frame, frame.len()) else {
            return;
        };
        let range = [HostRange {
            ptr: frame.as_mut_ptr(),
            len: frame.len(),
        }];
        let known = if hdr.dst.is_multicast() {
            None
        } else {
            self.fdb().lookup(vlan, hdr.dst, Instant::now())
        };
        match known {
            Some(d) => self.deliver(d, vlan, false, &range, scratch, touched),
            None => {
                for d in 0..self.ports.len() {
                    if self.ports[d].spec.vlan.carries(vlan) {
                        self.deliver(d, vlan, false, &range, scratch, touched);
                    }
                }
            }
        }
    }

    fn deliver(
        &self,
        dst: usize,
        vlan: u16,
        tagged: bool,
        frame: &[HostRange],
        pieces: &mut Vec<Piece>,
        touched: &mut Vec<usize>,
    ) {
        let p = &self.ports[dst];
        if !p.spec.vlan.carries(vlan) {
            return;
        }
        let egress = p.spec.vlan.egress(vlan, tagged);
        let out_len: usize = frame.iter().map(|r| r.len).sum();
        if p.qos().rx.consume(out_len as u64, 1).is_err() {
            p.count_drop(&p.stats.drop_qos, "receive rate limit");
            return;
        }
        let mut rx = p.rx();
        let RxSide {
            vring,
            mem,
            mergeable,
            unsignalled,
            dest,
            written,
            chains,
        } = &mut *rx;
        let (Some(vring), Some(mem)) = (vring.as_ref(), mem.as_ref()) else {
            // No guest (yet) on that port.
            bump(&p.stats.drop_no_rx_buffer, 1);
            return;
        };
        let mut hdr = [0u8; 12];
        let total = copy::plan(
            frame,
            egress,
            Piece::Inline {
                bytes: hdr,
                len: NET_HDR_LEN,
            },
            pieces,
        );
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let saved = queue.next_avail();
        // Read the avail index before loading the memory view, so that the view holds the
        // regions of every buffer the guest has posted (it adds a region before using it).
        if queue
            .avail_idx(&*mem.memory(), std::sync::atomic::Ordering::Acquire)
            .is_err()
        {
            p.count_drop(&p.stats.drop_no_rx_buffer, "unreadable receive ring");
            return;
        }
        let view = mem.memory();
        dest.clear();
        chains.clear();
        let mut capacity = 0usize;
        while capacity < total {
            if !*mergeable && !chains.is_empty() {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(&*view) else {
                break;
            };
            let head = chain.head_index();
            let first = dest.len();
            for d in chain {
                if !d.is_write_only() {
                    continue;
                }
                match net::host_range(&*view, d.addr(), d.len() as usize) {
                    Some(r) => {
                        capacity += r.len;
                        dest.push(r);
                    }
                    None => {
                        p.count_drop(
                            &p.stats.drop_malformed,
                            "receive buffer outside guest memory",
                        );
                    }
                }
            }
            chains.push((head, dest.len() - first));
        }
        if capacity < total {
            dest.clear();
            queue.set_next_avail(saved);
            p.count_drop(&p.stats.drop_no_rx_buffer, "no receive buffer");
            return;
        }
        // num_buffers: how many chains the frame spans.
        let n = chains.len() as u16;
        hdr[10..12].copy_from_slice(&n.to_le_bytes());
        pieces[0] = Piece::Inline {
            bytes: hdr,
            len: NET_HDR_LEN,
        };
        // SAFETY: the source ranges were validated against the sender's memory, which its
        // caller holds; the destination ranges against `view`, held here.
        unsafe { copy::copy(pieces, dest, written) };
        let mut k = 0usize;
        for &(head, nseg) in chains.iter() {
            let len: usize = written[k..k + nseg].iter().sum();
            k += nseg;
            if let Err(e) = queue.add_used(&*view, head, len as u32) {
                warn!(port = %p.spec.name, "cannot add used entry: {e}");
            }
        }
        dest.clear();
        bump(&p.stats.tx_packets, 1);
        bump(&p.stats.tx_bytes, (total - NET_HDR_LEN) as u64);
        *unsignalled = true;
        if !touched.contains(&dst) {
            touched.push(dst);
        }
    }

    /// Notify the guests of `ports` about frames delivered to them.
    pub fn signal(&self, ports: &[usize]) {
        for &d in ports {
            let p = &self.ports[d];
            let mut rx = p.rx();
            if !rx.unsignalled {
                continue;
            }
            rx.unsignalled = false;
            if let Some(vring) = rx.vring.as_ref() {
                if let Err(e) = common::vring::notify_guest(&mut vring.get_mut()) {
                    warn!(port = %p.spec.name, "{e}");
                }
            }
        }
    }
}
