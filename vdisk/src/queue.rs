//! One virtqueue's worker: pops chains, validates them, hands the I/O to the engine and
//! turns completions into status bytes and used-ring entries. It runs on the queue's own
//! thread; the mutex around it is taken by other threads only to drain it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::Device;
use crate::engine::{Completion, Engine, Op};
use crate::request::{self, Kind, Range, Rejected, Request, ID_BYTES};
use crate::stats::{should_log, Stats};

type Mem = GuestMemoryMmap<()>;

struct InFlight {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    /// Engine operations still outstanding.
    pending: u32,
    /// First failure, as a positive errno.
    error: Option<i32>,
    kind: Kind,
    iovecs: Vec<libc::iovec>,
    /// Keeps the guest mapping the iovecs point into alive until the I/O is done, even
    /// if the frontend replaces the memory table meanwhile.
    mem: Arc<Mem>,
}

// SAFETY: the raw iovec pointers refer into `mem`, which the slot owns an Arc of.
unsafe impl Send for InFlight {}

pub struct QueueWorker {
    index: usize,
    engine: Engine,
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    inflight: usize,
    /// Finished requests not yet in the used ring: (head, used length).
    done: Vec<(u16, u32)>,
    cqes: Vec<Completion>,
    /// The vring that in-flight requests came from.
    vring: Option<VringRwLock>,
}

impl QueueWorker {
    pub fn new(index: usize, engine: Engine) -> QueueWorker {
        QueueWorker {
            index,
            engine,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            done: Vec::new(),
            cqes: Vec::new(),
            vring: None,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The guest kicked the queue: take everything available, submit it in one batch.
    pub fn process_queue(&mut self, vring: &VringRwLock, mem: &Arc<Mem>, dev: &Device) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        let event_idx = dev.event_idx.load(Ordering::Relaxed);
        {
            let mut state = vring.get_mut();
            loop {
                if event_idx {
                    if let Err(e) = state.disable_notification() {
                        warn!(queue = self.index, "cannot disable notifications: {e}");
                    }
                }
                while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&**mem) {
                    match request::parse(chain, &**mem, &dev.limits) {
                        Ok(req) => self.start(req, mem, dev),
                        Err(rejected) => self.reject(rejected, mem, dev),
                    }
                }
                if !event_idx {
                    break;
                }
                match state.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        warn!(queue = self.index, "cannot enable notifications: {e}");
                        break;
                    }
                }
            }
        }
        if let Err(e) = self.engine.submit() {
            warn!(queue = self.index, "io submission failed: {e}");
        }
        self.reap(dev);
        self.publish(vring);
    }

    /// The engine's completion fd fired.
    pub fn process_completions(&mut self, vring: &VringRwLock, dev: &Device) {
        self.engine.clear_completion_fd();
        self.reap(dev);
        // A full completion queue may have held back submissions.
        if let Err(e) = self.engine.submit() {
            warn!(queue = self.index, "io submission failed: {e}");
        }
        self.publish(vring);
    }

    /// Wait for every in-flight request. With `publish`, their completions go to the
    /// guest (the ring is being stopped in order); without, the frontend is gone and the
    /// guest memory must not be written any more.
    pub fn drain(&mut self, dev: &Device, publish: bool) {
        while self.inflight > 0 {
            if let Err(e) = self.engine.wait() {
                warn!(queue = self.index, "waiting for in-flight I/O failed: {e}");
                break;
            }
            self.reap_inner(dev, publish);
        }
        if publish {
            if let Some(vring) = self.vring.clone() {
                self.publish(&vring);
            }
        } else {
            self.done.clear();
        }
    }

    /// Forget the vring of a finished session.
    pub fn reset(&mut self) {
        self.vring = None;
        self.done.clear();
    }

    fn alloc_slot(&mut self, slot: InFlight) -> u32 {
        self.inflight += 1;
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Some(slot);
            i
        } else {
            self.slots.push(Some(slot));
            (self.slots.len() - 1) as u32
        }
    }

    fn reject(&mut self, r: Rejected, mem: &Mem, dev: &Device) {
        let n = Stats::add(r.error.counter(&dev.stats), 1);
        if should_log(n) {
            warn!(
                queue = self.index,
                head = r.head,
                count = n,
                "rejected request: {}",
                r.error
            );
        }
        match r.status {
            Some(addr) => {
                if mem.write_obj(r.error.status(), addr).is_ok() {
                    self.done.push((r.head, 1));
                } else {
                    self.done.push((r.head, 0));
                }
            }
            // Nowhere to put a status: return the chain so the ring does not leak it.
            None => self.done.push((r.head, 0)),
        }
    }

    fn start(&mut self, req: Request, mem: &Arc<Mem>, dev: &Device) {
        let s = &dev.stats;
        match &req.kind {
            Kind::Read { len, .. } => {
                Stats::add(&s.reads, 1);
                Stats::add(&s.bytes_read, *len);
            }
            Kind::Write { len, .. } => {
                Stats::add(&s.writes, 1);
                Stats::add(&s.bytes_written, *len);
            }
            Kind::Flush => {
                Stats::add(&s.flushes, 1);
            }
            Kind::GetId => {
                Stats::add(&s.get_ids, 1);
                self.complete_get_id(req, dev);
                return;
            }
            Kind::Discard(_) => {
                Stats::add(&s.discards, 1);
            }
            Kind::WriteZeroes { .. } => {
                Stats::add(&s.write_zeroes, 1);
            }
        }
        let Request {
            head,
            kind,
            iovecs,
            status,
            used_len,
        } = req;
        let tag = self.alloc_slot(InFlight {
            head,
            status,
            used_len,
            pending: 0,
            error: None,
            kind,
            iovecs,
            mem: mem.clone(),
        });
        let dsync = !dev.writeback.load(Ordering::Relaxed);
        let Some(slot) = self.slots[tag as usize].as_mut() else {
            return;
        };
        let mut ops: [Option<Op<'_>>; 1] = [None];
        let ranges: &[Range] = match &slot.kind {
            Kind::Read { offset, .. } => {
                ops[0] = Some(Op::Read {
                    offset: *offset,
                    iovecs: &slot.iovecs,
                });
                &[]
            }
            Kind::Write { offset, .. } => {
                ops[0] = Some(Op::Write {
                    offset: *offset,
                    iovecs: &slot.iovecs,
                    dsync,
                });
                &[]
            }
            Kind::Flush => {
                ops[0] = Some(Op::Flush);
                &[]
            }
            Kind::Discard(ranges) | Kind::WriteZeroes { ranges, .. } => ranges,
            Kind::GetId => &[],
        };
        let mode = match &slot.kind {
            Kind::WriteZeroes { unmap: false, .. } => {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            }
            _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        };
        let all_ops = ops
            .into_iter()
            .flatten()
            .chain(ranges.iter().map(|r| Op::Fallocate {
                offset: r.offset,
                len: r.len,
                mode,
            }));
        let mut queued = 0u32;
        let mut failure = None;
        for op in all_ops {
            // SAFETY: the iovecs live in the slot, which stays allocated (and its Vec
            // unmodified) until the last completion for this tag is reaped, and the slot
            // holds an Arc of the guest mapping they point into.
            match unsafe { self.engine.queue(u64::from(tag), op) } {
                Ok(()) => queued += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        slot.pending = queued;
        if let Some(e) = failure {
            warn!(queue = self.index, "cannot queue I/O: {e}");
            slot.error = Some(e.raw_os_error().unwrap_or(libc::EIO));
        }
        if queued == 0 {
            // Nothing outstanding (zero-length discard list cannot happen, but a queueing
            // failure can): finish now.
            self.finish(tag, dev, true);
        }
    }

    fn complete_get_id(&mut self, req: Request, dev: &Device) {
        let mut src: &[u8] = &dev.serial[..ID_BYTES];
        for v in &req.iovecs {
            let n = v.iov_len.min(src.len());
            // SAFETY: the iovec was produced by `request::parse` from a guest range checked
            // against the mapping the caller holds for the duration of this call.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.iov_base.cast::<u8>(), n) };
            src = &src[n..];
        }
        self.done.push((req.head, req.used_len));
    }

    fn reap(&mut self, dev: &Device) {
        self.reap_inner(dev, true);
    }

    fn reap_inner(&mut self, dev: &Device, write_status: bool) {
        self.engine.reap(&mut self.cqes);
        let mut cqes = std::mem::take(&mut self.cqes);
        for c in cqes.drain(..) {
            self.on_completion(c, dev, write_status);
        }
        self.cqes = cqes;
    }

    fn on_completion(&mut self, c: Completion, dev: &Device, write_status: bool) {
        let Some(Some(slot)) = self.slots.get_mut(c.tag as usize) else {
            warn!(
                queue = self.index,
                tag = c.tag,
                "completion for an unknown request"
            );
            return;
        };
        slot.pending = slot.pending.saturating_sub(1);
        if c.result < 0 {
            slot.error.get_or_insert(-c.result);
        } else if let Kind::Read { offset, len } | Kind::Write { offset, len } = slot.kind {
            // A short transfer (the kernel may stop early): finish it synchronously.
            if (c.result as u64) < len {
                let done = c.result as usize;
                let rest = crate::engine::advance(&slot.iovecs, done);
                let write = matches!(slot.kind, Kind::Write { .. });
                let r = crate::engine::blocking_rw(
                    dev.image.raw_fd(),
                    write,
                    offset + done as u64,
                    &rest,
                    !dev.writeback.load(Ordering::Relaxed),
                );
                if r < 0 {
                    slot.error.get_or_insert(-r);
                }
            }
        }
        if slot.pending == 0 {
            self.finish(c.tag as u32, dev, write_status);
        }
    }

    fn finish(&mut self, tag: u32, dev: &Device, write_status: bool) {
        let Some(slot) = self.slots.get_mut(tag as usize).and_then(Option::take) else {
            return;
        };
        self.free.push(tag);
        self.inflight -= 1;
        let mut error = slot.error;
        match (&slot.kind, error) {
            (Kind::Discard(_), Some(libc::EOPNOTSUPP)) => {
                // Discard is a hint; a filesystem without hole punching just keeps the data.
                error = None;
            }
            (Kind::WriteZeroes { ranges, .. }, Some(libc::EOPNOTSUPP)) => {
                error = None;
                for r in ranges {
                    if let Err(e) = dev.image.write_zeros_slow(r.offset, r.len) {
                        error = Some(e.raw_os_error().unwrap_or(libc::EIO));
                        break;
                    }
                }
            }
            _ => {}
        }
        let status = match error {
            None => VIRTIO_BLK_S_OK,
            Some(errno) => {
                let n = Stats::add(&dev.stats.err_io, 1);
                if should_log(n) {
                    warn!(
                        queue = self.index,
                        image = %dev.image.path().display(),
                        count = n,
                        "{:?} failed: {}",
                        slot.kind,
                        std::io::Error::from_raw_os_error(errno)
                    );
                }
                VIRTIO_BLK_S_IOERR
            }
        } as u8;
        if !write_status {
            debug!(
                queue = self.index,
                head = slot.head,
                "dropped completion of a closed session"
            );
            return;
        }
        let used_len = if status == VIRTIO_BLK_S_OK as u8 {
            slot.used_len
        } else {
            1
        };
        if let Err(e) = slot.mem.write_obj(status, slot.status) {
            warn!(queue = self.index, "cannot write status: {e}");
        }
        self.done.push((slot.head, used_len));
    }

    fn publish(&mut self, vring: &VringRwLock) {
        if self.done.is_empty() {
            return;
        }
        let mut state = vring.get_mut();
        for (head, len) in self.done.drain(..) {
            if let Err(e) = state.add_used(head, len) {
                warn!(queue = self.index, head, "cannot add used entry: {e}");
            }
        }
        match state.needs_notification() {
            Ok(true) => {
                if let Err(e) = state.signal_used_queue() {
                    warn!(queue = self.index, "cannot notify the guest: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => warn!(queue = self.index, "cannot read used event: {e}"),
        }
    }
}
