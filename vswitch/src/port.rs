//! A switch port: how it is set up, its counters, its QoS state, and the guest it serves
//! (memory and receive ring), which any forwarding thread may deliver to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use tracing::warn;
use vhost_user_backend::VringRwLock;
use vm_memory::GuestMemoryAtomic;

use crate::config::VlanMode;
use crate::policy::qos::PortQos;
use crate::wire::frame::Mac;
use crate::wire::guest::Mem;
use common::counters::bump;

/// How a port is set up.
#[derive(Clone, Debug)]
pub struct PortSpec {
    pub name: String,
    pub vlan: VlanMode,
    pub mac: Option<Mac>,
    /// Drop frames whose source is not `mac`.
    pub anti_spoof: bool,
    pub mtu: u16,
    /// Queue pairs the guest may use.
    pub queues: u16,
    /// Offer the checksum and TCP segmentation offloads.
    pub offloads: bool,
}

// Per-port counters, named from the switch's side as OVS does: `rx` is what the port's
// guest sent into the switch, `tx` what the switch delivered to the guest. `fdb_full`
// counts the addresses of this port's guest learned into a full table (each took another
// entry's place), `fdb_evicted` this port's entries that made that room. `rx_gso` counts
// the segmentation requests the guest sent, `tx_gso` those delivered to it whole, and
// `tx_sw_offload` the frames the switch checksummed or segmented for it because it did not
// negotiate the offload their sender used.

common::counters!(PortStats {
    rx_packets,
    rx_bytes,
    tx_packets,
    tx_bytes,
    drop_no_rx_buffer,
    drop_qos,
    drop_storm,
    tx_throttled,
    drop_vlan,
    drop_spoof,
    drop_mtu,
    drop_malformed,
    drop_mac_limit,
    fdb_full,
    fdb_evicted,
    ring_errors,
    rx_gso,
    tx_gso,
    tx_sw_offload,
});

/// One of a port's receive queues, fed by whichever thread has a frame for it. Each has
/// its own lock, so threads delivering to different queues of a port do not wait for each
/// other; a session ending takes every one of them before the port forgets its rings.
#[derive(Default)]
pub struct RxQueue {
    pub vring: Option<VringRwLock>,
    pub mem: Option<GuestMemoryAtomic<Mem>>,
    pub mergeable: bool,
}

pub struct Port {
    pub spec: PortSpec,
    pub qos: Mutex<PortQos>,
    pub stats: PortStats,
    pub rx: Vec<Mutex<RxQueue>>,
    pub mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    /// The virtio features the guest acked in its current session.
    acked: AtomicU64,
}

impl Port {
    pub fn new(spec: PortSpec, qos: PortQos) -> Port {
        Port {
            qos: Mutex::new(qos),
            stats: PortStats::default(),
            rx: (0..spec.queues.max(1))
                .map(|_| Mutex::new(RxQueue::default()))
                .collect(),
            mem: RwLock::new(None),
            acked: AtomicU64::new(0),
            spec,
        }
    }

    pub fn qos(&self) -> MutexGuard<'_, PortQos> {
        match self.qos.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Receive queue `q`; the port has at least one.
    pub fn rx(&self, q: usize) -> MutexGuard<'_, RxQueue> {
        let m = self.rx.get(q).unwrap_or(&self.rx[0]);
        match m.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Whether a guest has set up a receive queue.
    pub fn connected(&self) -> bool {
        (0..self.rx.len()).any(|q| self.rx(q).vring.is_some())
    }

    /// The virtio features the guest acked (none before it does).
    pub fn features(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    pub fn set_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
    }

    /// The guest's memory, while it has a session.
    pub fn current_mem(&self) -> Option<GuestMemoryAtomic<Mem>> {
        self.mem.read().ok().and_then(|m| m.clone())
    }

    /// Count `frames` dropped for `what`, and log it (rate-limited per counter).
    pub fn count_drops(&self, counter: &AtomicU64, frames: u64, what: &str) {
        let n = bump(counter, frames);
        if let Some(suppressed) = self.stats.may_log(counter) {
            warn!(port = %self.spec.name, count = n, suppressed, "dropped a frame: {what}");
        }
    }

    pub fn count_drop(&self, counter: &AtomicU64, what: &str) {
        self.count_drops(counter, 1, what);
    }
}
