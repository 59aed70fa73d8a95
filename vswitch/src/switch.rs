//! The switch's shared state: its ports, the forwarding database, and the VLANs' service
//! endpoints. The forwarding threads read it; sessions coming and going update it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost_user_backend::VringRwLock;
use vm_memory::GuestMemoryAtomic;

use crate::policy::fdb::Fdb;
use crate::policy::qos::PortQos;
use crate::policy::service::ServicePort;
use crate::port::{Port, PortSpec, RxQueue};
use crate::wire::frame::Mac;
use crate::wire::guest::Mem;

pub struct Switch {
    pub ports: Vec<Arc<Port>>,
    fdb: Mutex<Fdb>,
    /// The VLANs' service endpoints, by VLAN id.
    pub services: Vec<(u16, Mutex<ServicePort>)>,
}

impl Switch {
    pub fn new(
        specs: Vec<(PortSpec, PortQos)>,
        services: Vec<ServicePort>,
        mac_table_size: usize,
        aging: Duration,
        limits: Vec<Option<u32>>,
    ) -> Switch {
        Switch {
            ports: specs
                .into_iter()
                .map(|(spec, qos)| Arc::new(Port::new(spec, qos)))
                .collect(),
            fdb: Mutex::new(Fdb::new(mac_table_size, aging, limits)),
            services: services
                .into_iter()
                .map(|s| (s.vlan, Mutex::new(s)))
                .collect(),
        }
    }

    pub fn fdb(&self) -> MutexGuard<'_, Fdb> {
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
        for q in 0..p.rx.len() {
            *p.rx(q) = RxQueue::default();
        }
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
        for q in 0..p.rx.len() {
            p.rx(q).mem = Some(mem.clone());
        }
    }

    /// The port's worker saw its queues: senders may fill receive queue `queue` from now
    /// on.
    pub fn attach_rx(&self, port: usize, queue: usize, vring: &VringRwLock, mergeable: bool) {
        let mut rx = self.ports[port].rx(queue);
        if rx.vring.is_none() {
            rx.vring = Some(vring.clone());
        }
        rx.mergeable = mergeable;
    }
}
