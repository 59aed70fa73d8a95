//! A port as a vhost-user-net device: the features and config space its guest sees, its
//! guest memory, and its queues' events, which go to the port's forwarding thread.

use std::io;
use std::sync::Arc;

use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::pmd::Pmds;
use crate::switch::Switch;
use crate::wire::guest::Mem;
use crate::wire::vnet::OFFLOAD_FEATURES;

const QUEUE_SIZE: usize = 1024;

/// One switch port as a vhost-user-net backend.
#[derive(Clone)]
pub struct PortBackend {
    switch: Arc<Switch>,
    pmds: Arc<Pmds>,
    port: usize,
}

impl PortBackend {
    pub fn new(switch: Arc<Switch>, pmds: Arc<Pmds>, port: usize) -> PortBackend {
        PortBackend { switch, pmds, port }
    }

    fn queue_pairs(&self) -> u16 {
        self.switch.ports[self.port].spec.queues.max(1)
    }

    /// The port's rate-limit timer in its worker's epoll set: ids up to the number of
    /// queues are the library's (the queues, then its exit event).
    pub fn timer_event(&self) -> u16 {
        2 * self.queue_pairs() + 1
    }

    fn mergeable(&self) -> bool {
        self.switch.ports[self.port].features() & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }
}

impl VhostUserBackend for PortBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    /// Receive queue k is 2k, transmit queue k is 2k + 1.
    fn num_queues(&self) -> usize {
        2 * usize::from(self.queue_pairs())
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
        let spec = &self.switch.ports[self.port].spec;
        if spec.mac.is_some() {
            f |= 1 << VIRTIO_NET_F_MAC;
        }
        if spec.offloads {
            // Checksum and TCP segmentation both ways: a guest's 64 KiB TCP segment crosses
            // the switch as one frame, done in software only for a receiver without them.
            f |= OFFLOAD_FEATURES;
        }
        if self.queue_pairs() > 1 {
            // The control queue that sets how many pairs are in use is the frontend's
            // (QEMU, virtio-user): it enables each pair with SET_VRING_ENABLE.
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.switch.ports[self.port].set_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::MQ
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
        c[8..10].copy_from_slice(&self.queue_pairs().to_le_bytes());
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
        // One worker for all queues: it only wakes the forwarding threads.
        vec![(1u64 << self.num_queues()) - 1]
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
        let port = &self.switch.ports[self.port];
        let mergeable = self.mergeable();
        for (q, rx) in vrings.iter().step_by(2).enumerate() {
            self.switch.attach_rx(self.port, q, rx, mergeable);
        }
        let event = usize::from(device_event);
        if device_event == self.timer_event() {
            if let Err(e) = port.qos().timer.clear() {
                warn!(port = %port.spec.name, "cannot clear the rate-limit timer: {e}");
            }
            self.pmds.resume(self.port);
        } else if let Some(vring) = vrings.get(event) {
            if event % 2 == 0 {
                // Receive buffers are taken only when a frame arrives (a full ring drops
                // it), so the switch never waits for them: a kick per refill would cost the
                // driver a syscall and this worker a wake-up for nothing. The first kick
                // after the ring is set up turns them off (with EVENT_IDX the driver kicks
                // only when its index passes the avail event the switch never moves).
                if let Err(e) = vring.get_mut().disable_notification() {
                    warn!(port = %port.spec.name, "cannot disable receive kicks: {e}");
                }
            } else {
                self.pmds.kick(self.port, event / 2, vring);
            }
        } else {
            warn!(port = %port.spec.name, event, "unexpected event");
        }
        Ok(())
    }
}
