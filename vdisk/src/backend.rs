//! The vhost-user-blk backend: glue between `vhost-user-backend`'s event loop and the
//! per-queue workers.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tracing::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::Device;
use crate::engine::{Engine, EngineKind};
use crate::queue::QueueWorker;

/// Each worker thread serves one queue, so its vring is always index 0 of its set.
const KICK_EVENT: u16 = 0;

type Mem = GuestMemoryMmap<()>;

struct Inner {
    dev: Device,
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    workers: Vec<Mutex<QueueWorker>>,
    /// Set on shutdown: no new requests are taken from the rings.
    stopping: AtomicBool,
}

#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

impl BlkBackend {
    pub fn new(dev: Device, engine: EngineKind) -> BlkBackend {
        let workers = (0..dev.num_queues as usize)
            .map(|i| {
                Mutex::new(QueueWorker::new(
                    i,
                    Engine::new(engine, &dev.image, u32::from(dev.queue_size)),
                ))
            })
            .collect();
        BlkBackend {
            inner: Arc::new(Inner {
                dev,
                mem: RwLock::new(None),
                workers,
                stopping: AtomicBool::new(false),
            }),
        }
    }

    pub fn device(&self) -> &Device {
        &self.inner.dev
    }

    /// The engine the first queue actually uses (after any fallback).
    pub fn engine_kind(&self) -> EngineKind {
        self.worker(0).engine().kind()
    }

    fn worker(&self, q: usize) -> MutexGuard<'_, QueueWorker> {
        // A panic on a queue thread is a bug, but keep serving the other queues.
        match self.inner.workers[q].lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The completion event id for a worker's epoll set; ids up to num_queues are taken by
    /// the library for kicks and the exit event.
    fn completion_event(&self) -> u16 {
        self.inner.dev.num_queues + 1
    }

    /// Register each queue's completion fd with the thread that serves that queue.
    pub fn attach(&self, daemon: &VhostUserDaemon<BlkBackend>) -> Result<(), String> {
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = self.worker(q).engine().completion_fd() {
                handler
                    .register_listener(fd, EventSet::IN, u64::from(self.completion_event()))
                    .map_err(|e| format!("cannot watch completions of queue {q}: {e}"))?;
            }
        }
        Ok(())
    }

    /// The frontend is gone: wait out its I/O without touching its memory any more.
    pub fn detached(&self) {
        for q in 0..self.inner.workers.len() {
            let mut w = self.worker(q);
            w.drain(&self.inner.dev, false);
            w.reset();
        }
        if let Ok(mut mem) = self.inner.mem.write() {
            *mem = None;
        }
        self.log_stats();
    }

    /// Stop taking requests, complete everything in flight, make it durable.
    pub fn shutdown(&self) -> io::Result<()> {
        self.inner.stopping.store(true, Ordering::SeqCst);
        for q in 0..self.inner.workers.len() {
            self.worker(q).drain(&self.inner.dev, true);
        }
        self.log_stats();
        self.inner.dev.shutdown_flush().map_err(io::Error::other)
    }

    pub fn log_stats(&self) {
        let snapshot = self.inner.dev.stats.snapshot();
        info!("counters: {}", common::memory::nonzero_counters(&snapshot));
    }

    fn current_mem(&self) -> Option<GuestMemoryAtomic<Mem>> {
        let guard = self.inner.mem.read().ok()?;
        guard.clone()
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.dev.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.dev.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.dev.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.inner.dev.acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.dev.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.inner.dev.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.inner.dev.write_config(offset, buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        let mut slot = self
            .inner
            .mem
            .write()
            .map_err(|_| io::Error::other("memory lock poisoned"))?;
        *slot = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.dev.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        if q < self.inner.workers.len() {
            // GET_VRING_BASE: the frontend reads the ring state next, so finish in order.
            self.worker(q).drain(&self.inner.dev, true);
        }
        Ok(())
    }

    fn reset_device(&self) {
        for q in 0..self.inner.workers.len() {
            let mut w = self.worker(q);
            w.drain(&self.inner.dev, false);
            w.reset();
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(vring), true) = (vrings.first(), thread_id < self.inner.workers.len()) else {
            return Err(io::Error::other(format!(
                "event {device_event} on unknown worker thread {thread_id}"
            )));
        };
        if device_event == KICK_EVENT {
            if self.inner.stopping.load(Ordering::Relaxed) {
                return Ok(());
            }
            let Some(mem) = self.current_mem() else {
                warn!(queue = thread_id, "kick before the memory table was set");
                return Ok(());
            };
            self.worker(thread_id)
                .process_queue(vring, &mem, &self.inner.dev);
        } else if device_event == self.completion_event() {
            self.worker(thread_id)
                .process_completions(vring, &self.inner.dev);
        } else {
            warn!(queue = thread_id, device_event, "unexpected event");
        }
        Ok(())
    }
}
