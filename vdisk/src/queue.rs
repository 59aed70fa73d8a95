//! One virtqueue's worker: pops chains, validates them, hands the I/O to the engine and
//! turns completions into status bytes and used-ring entries. It runs on the queue's own
//! thread; the mutex around it is taken by other threads only to drain it.

use std::sync::atomic::Ordering::{self, Acquire};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::Device;
use crate::engine::{Completion, Engine, Op};
use crate::image::Format;
use crate::qcow2::{Qcow2, ReadPins};
use crate::request::{self, Kind, Range, Rejected, Request, Scratch, ID_BYTES};
use crate::translate::{self, FileRead};
use common::counters::bump;

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
    /// qcow2 reads: the file reads of the data extents (the completion tag's high half
    /// indexes them) and their iovecs, slices of `iovecs`.
    reads: Vec<FileRead>,
    split: Vec<libc::iovec>,
    /// qcow2 reads: their clusters, kept from reuse until the slot is done with them.
    pins: Option<ReadPins>,
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
    /// No polling before this instant (the core was contended).
    poll_suspended_until: Instant,
    /// The adaptive poll window, up to the configured one (None: not adapted yet).
    poll_window: Option<Duration>,
    /// When this thread last went back to its event loop.
    asleep_since: Option<Instant>,
    scratch: Scratch,
    /// Empty file-read lists of finished qcow2 reads, for the next ones.
    read_pool: Vec<Vec<FileRead>>,
}

/// How long polling stays off after the poller was preempted.
const POLL_BACKOFF: Duration = Duration::from_millis(50);
/// Shorter poll windows than this are not worth starting.
const POLL_MIN: Duration = Duration::from_micros(1);
/// A pause between two poll checks this long means the scheduler ran someone else here.
const PREEMPTED: Duration = Duration::from_micros(200);

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
            poll_suspended_until: Instant::now(),
            poll_window: None,
            asleep_since: None,
            scratch: Scratch::default(),
            read_pool: Vec::new(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The guest kicked the queue: take everything available, submit it in one batch, and
    /// with a poll window keep taking new requests and completions for that long after the
    /// last activity before sleeping again. While polling, guest notifications stay off, so
    /// a busy guest does not pay for kicks and this thread does not pay for wakeups.
    pub fn process_queue(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<Mem>,
        dev: &Device,
    ) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        self.adapt_poll(dev.poll);
        let poll = if Instant::now() < self.poll_suspended_until {
            Duration::ZERO
        } else {
            self.poll_window.unwrap_or(dev.poll)
        };
        let mut deadline = Instant::now() + poll;
        loop {
            let Some(taken) = self.take_available(vring, mem, dev) else {
                // Finish what is in flight; the next kick (after a reset) starts afresh.
                self.submit_and_complete(vring, dev);
                self.asleep_since = Some(Instant::now());
                break;
            };
            let polling = !poll.is_zero() && (taken > 0 || Instant::now() < deadline);
            if !polling {
                // Re-arm notifications before the guest sees these completions; anything
                // that slipped in meanwhile is taken first.
                let more = vring.get_mut().enable_notification();
                match more {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => warn!(queue = self.index, "cannot enable notifications: {e}"),
                }
                self.submit_and_complete(vring, dev);
                self.asleep_since = Some(Instant::now());
                break;
            }
            let completed = self.submit_and_complete(vring, dev);
            if taken + completed > 0 {
                deadline = Instant::now() + poll;
            }
            if !self.spin_until(deadline, vring, mem) {
                // Spinning while another runnable thread waits for this core delays that
                // thread (often the guest or the client) by a whole time slice.
                self.poll_suspended_until = Instant::now() + POLL_BACKOFF;
                debug!(
                    queue = self.index,
                    "polling suspended: the core is contended"
                );
                deadline = Instant::now();
            }
        }
    }

    /// Spin until work shows up or `deadline` passes. Returns false if this thread was
    /// descheduled meanwhile: a gap between two checks far longer than a check takes.
    fn spin_until(
        &mut self,
        deadline: Instant,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<Mem>,
    ) -> bool {
        let view = mem.memory();
        let state = vring.get_ref();
        let queue = state.get_queue();
        let mut last = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.engine.has_completions() {
                return true;
            }
            match queue.avail_idx(&*view, Acquire) {
                Ok(idx) if idx.0 != queue.next_avail() => return true,
                Ok(_) => {}
                Err(_) => return true,
            }
            spins = spins.wrapping_add(1);
            // Reading the clock costs more than a check: do it every few rounds.
            if spins.is_multiple_of(16) {
                let now = Instant::now();
                if now.duration_since(last) > PREEMPTED {
                    return false;
                }
                if now >= deadline {
                    return true;
                }
                last = now;
            }
            std::hint::spin_loop();
        }
    }

    /// Pop, validate and queue every available chain; returns how many, or None when the
    /// queue cannot be used (stopped or reset under us, or a bogus avail index): then the
    /// caller must not loop on "more available", which would never drain.
    ///
    /// The memory view is loaded after reading the avail index, never before: the driver
    /// adds a memory region (and waits for the ack) before it publishes a request that
    /// uses it, so a view loaded afterwards holds every region those requests refer to.
    fn take_available(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<Mem>,
        dev: &Device,
    ) -> Option<usize> {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() {
            return None;
        }
        if let Err(e) = state.disable_notification() {
            warn!(queue = self.index, "cannot disable notifications: {e}");
        }
        let mut n = 0;
        loop {
            let target = match state.get_queue().avail_idx(&*mem.memory(), Acquire) {
                Ok(idx) => idx.0,
                Err(e) => {
                    ring_error(dev, self.index, &e);
                    return None;
                }
            };
            if target == state.get_queue().next_avail() {
                return Some(n);
            }
            let view = mem.memory().into_inner();
            while state.get_queue().next_avail() != target {
                // None: the driver's avail index is bogus; the queue reports it.
                let chain = state.get_queue_mut().pop_descriptor_chain(&*view)?;
                n += 1;
                match request::parse(chain, &*view, &dev.limits, &mut self.scratch) {
                    Ok(req) => self.start(req, &view, dev),
                    Err(rejected) => self.reject(rejected, &view, dev),
                }
            }
        }
    }

    /// Submit what was queued, then publish whatever has completed; returns how many
    /// requests completed.
    fn submit_and_complete(&mut self, vring: &VringRwLock, dev: &Device) -> usize {
        if let Err(e) = self.engine.submit() {
            warn!(queue = self.index, "io submission failed: {e}");
        }
        self.reap(dev);
        let n = self.done.len();
        self.publish(vring);
        n
    }

    /// Adapt the poll window to how long this thread slept before the current event, as
    /// QEMU's adaptive polling does: a sleep longer than the largest window means polling
    /// would not have caught the event (a slow disk), so poll less; a sleep that a longer
    /// window would have covered means poll more.
    fn adapt_poll(&mut self, max: Duration) {
        let Some(since) = self.asleep_since.take() else {
            return;
        };
        let slept = since.elapsed();
        let window = self.poll_window.unwrap_or(max);
        let next = if slept > max {
            window / 2
        } else if slept > window {
            (window * 2).max(POLL_MIN)
        } else {
            window
        };
        self.poll_window = Some(if next < POLL_MIN {
            Duration::ZERO
        } else {
            next.min(max)
        });
    }

    /// The engine's completion fd fired.
    pub fn process_completions(&mut self, vring: &VringRwLock, dev: &Device) {
        self.adapt_poll(dev.poll);
        self.engine.clear_completion_fd();
        self.reap(dev);
        // A full completion queue may have held back submissions.
        if let Err(e) = self.engine.submit() {
            warn!(queue = self.index, "io submission failed: {e}");
        }
        self.publish(vring);
        self.asleep_since = Some(Instant::now());
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
        let counter = r.error.counter(&dev.stats);
        let n = bump(counter, 1);
        if let Some(suppressed) = dev.stats.may_log(counter) {
            warn!(
                queue = self.index,
                head = r.head,
                count = n,
                suppressed,
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
                bump(&s.reads, 1);
                bump(&s.bytes_read, *len);
            }
            Kind::Write { len, .. } => {
                bump(&s.writes, 1);
                bump(&s.bytes_written, *len);
            }
            Kind::Flush => {
                bump(&s.flushes, 1);
            }
            Kind::GetId => {
                bump(&s.get_ids, 1);
                self.complete_get_id(req, mem, dev);
                return;
            }
            Kind::Discard(_) => {
                bump(&s.discards, 1);
            }
            Kind::WriteZeroes { .. } => {
                bump(&s.write_zeroes, 1);
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
            reads: Vec::new(),
            split: Vec::new(),
            pins: None,
            mem: mem.clone(),
        });
        if let Format::Qcow2(image) = &dev.format {
            self.start_qcow2(tag, image, dev);
            return;
        }
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

    /// A request on a qcow2 image: reads go to the engine extent by extent, the rest runs
    /// inline (see `translate`).
    fn start_qcow2(&mut self, tag: u32, image: &std::sync::Mutex<Qcow2>, dev: &Device) {
        let (split, reads) = (
            self.scratch.iovec_buffer(),
            self.read_pool.pop().unwrap_or_default(),
        );
        let Some(slot) = self.slots[tag as usize].as_mut() else {
            return;
        };
        (slot.split, slot.reads) = (split, reads);
        let dsync = !dev.writeback.load(Ordering::Relaxed);
        let result = match &slot.kind {
            Kind::Read { offset, .. } => translate::plan_read(
                image,
                *offset,
                &slot.iovecs,
                &mut slot.split,
                &mut slot.reads,
                &mut slot.pins,
            ),
            Kind::Write { offset, .. } => translate::write(image, *offset, &slot.iovecs, dsync),
            Kind::Flush => translate::flush(image),
            Kind::Discard(ranges) => translate::zero_ranges(image, ranges, false, false),
            Kind::WriteZeroes { ranges, unmap } => {
                translate::zero_ranges(image, ranges, true, *unmap)
            }
            Kind::GetId => Ok(()),
        };
        if let Err(e) = result {
            let n = bump(&dev.stats.err_image, 1);
            if let Some(suppressed) = dev.stats.may_log(&dev.stats.err_image) {
                warn!(
                    queue = self.index,
                    count = n,
                    suppressed,
                    "{:?} failed: {e}",
                    slot.kind
                );
            }
            slot.error = Some(e.errno());
        }
        let mut queued = 0u32;
        if slot.error.is_none() {
            for (i, r) in slot.reads.iter().enumerate() {
                let op = Op::Read {
                    offset: r.host_offset,
                    iovecs: &slot.split[r.iov.clone()],
                };
                // SAFETY: as in `start`: `split` lives in the slot, unmodified, until the
                // last completion for this tag, and the slot holds the guest mapping.
                match unsafe { self.engine.queue(u64::from(tag) | (i as u64) << 32, op) } {
                    Ok(()) => queued += 1,
                    Err(e) => {
                        warn!(queue = self.index, "cannot queue I/O: {e}");
                        slot.error = Some(e.raw_os_error().unwrap_or(libc::EIO));
                        break;
                    }
                }
            }
        }
        slot.pending = queued;
        if queued == 0 {
            self.finish(tag, dev, true);
        }
    }

    fn complete_get_id(&mut self, req: Request, mem: &Mem, dev: &Device) {
        let mut src: &[u8] = &dev.serial[..ID_BYTES];
        for v in &req.iovecs {
            let n = v.iov_len.min(src.len());
            // SAFETY: the iovec was produced by `request::parse` from a guest range checked
            // against the mapping the caller holds for the duration of this call.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.iov_base.cast::<u8>(), n) };
            src = &src[n..];
        }
        match mem.write_obj(VIRTIO_BLK_S_OK as u8, req.status) {
            Ok(()) => self.done.push((req.head, req.used_len)),
            Err(e) => {
                ring_error(dev, self.index, &e);
                self.done.push((req.head, 0));
            }
        }
        self.scratch.recycle(req.iovecs);
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
        // The low half is the slot; the high half the file read of a qcow2 request.
        let (tag, part) = (c.tag as u32, (c.tag >> 32) as usize);
        let Some(Some(slot)) = self.slots.get_mut(tag as usize) else {
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
        } else if let Some(read) = slot.reads.get(part) {
            if (c.result as u64) < read.len {
                let r = translate::finish_short_read(
                    dev.image.raw_fd(),
                    read,
                    &slot.split,
                    c.result as usize,
                );
                if r < 0 {
                    slot.error.get_or_insert(-r);
                }
            }
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
            self.finish(tag, dev, write_status);
        }
    }

    fn finish(&mut self, tag: u32, dev: &Device, write_status: bool) {
        let Some(mut slot) = self.slots.get_mut(tag as usize).and_then(Option::take) else {
            return;
        };
        self.scratch.recycle(std::mem::take(&mut slot.iovecs));
        if slot.split.capacity() > 0 {
            self.scratch.recycle(std::mem::take(&mut slot.split));
        }
        if slot.reads.capacity() > 0 && self.read_pool.len() < 1024 {
            let mut reads = std::mem::take(&mut slot.reads);
            reads.clear();
            self.read_pool.push(reads);
        }
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
                let n = bump(&dev.stats.err_io, 1);
                if let Some(suppressed) = dev.stats.may_log(&dev.stats.err_io) {
                    warn!(
                        queue = self.index,
                        image = %dev.image.path().display(),
                        count = n,
                        suppressed,
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
            ring_error(dev, self.index, &e);
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
        if let Err(e) = common::vring::notify_guest(&mut state) {
            warn!(queue = self.index, "{e}");
        }
    }
}

/// The guest's rings or status bytes are where it said they would not be: counted, and
/// logged at most once a second, since a guest that scribbles on its ring meets this on
/// every kick.
fn ring_error(dev: &Device, queue: usize, e: &dyn std::fmt::Display) {
    let n = bump(&dev.stats.err_ring, 1);
    if let Some(suppressed) = dev.stats.may_log(&dev.stats.err_ring) {
        warn!(queue, count = n, suppressed, "unusable ring: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::engine::EngineKind;
    use crate::image::RawImage;

    const QSIZE: u16 = 32;
    const IMAGE_SIZE: usize = 1 << 20;

    struct Fixture {
        mem: GuestMemoryAtomic<Mem>,
        vring: VringRwLock,
        dev: Device,
        _file: tempfile::NamedTempFile,
    }

    fn fixture(read_only: bool) -> Fixture {
        let mut file = tempfile::NamedTempFile::new().expect("temp image");
        file.write_all(&vec![0u8; IMAGE_SIZE]).expect("fill image");
        let opened = crate::open::open_image(file.path(), !read_only).expect("open image");
        let image = RawImage::new(opened, file.path(), read_only, false).expect("image");
        let dev = Device::new(
            Arc::new(image),
            Format::Raw,
            1,
            QSIZE,
            "unit-serial",
            std::time::Duration::ZERO,
        );
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory"),
        );
        let vring = VringRwLock::new(mem.clone(), QSIZE).expect("vring");
        Fixture {
            mem,
            vring,
            dev,
            _file: file,
        }
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Chain `descs` together starting at table index `first`.
    fn chain(descs: &[RawDescriptor], first: u16) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = SplitDescriptor::from(*d);
                let last = i == descs.len() - 1;
                let flags = if last {
                    d.flags()
                } else {
                    d.flags() | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(SplitDescriptor::new(
                    d.addr().0,
                    d.len(),
                    flags,
                    first + i as u16 + 1,
                ))
            })
            .collect()
    }

    fn header(mem: &Mem, addr: u64, ty: u32, sector: u64) {
        mem.write_obj(ty, GuestAddress(addr)).expect("hdr");
        mem.write_obj(0u32, GuestAddress(addr + 4)).expect("hdr");
        mem.write_obj(sector, GuestAddress(addr + 8)).expect("hdr");
    }

    fn run_batch(engine: EngineKind) {
        let f = fixture(false);
        let m = f.mem.memory();
        let vq = MockSplitQueue::new(&*m, QSIZE);
        {
            let mut st = f.vring.get_mut();
            let q = st.get_queue_mut();
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(vq.desc_table_addr().0 as u32), Some(0));
            q.set_avail_ring_address(Some(vq.avail_addr().0 as u32), Some(0));
            q.set_used_ring_address(Some(vq.used_addr().0 as u32), Some(0));
            q.set_ready(true);
        }
        f.vring.set_enabled(true);

        // Status bytes start as garbage, so a missing status write shows.
        m.write_slice(&[0xa5; 8], GuestAddress(0x5_0000))
            .expect("poison");
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0x2_0000))
            .expect("pattern");
        // 0: write the pattern at sector 8.
        header(&m, 0x1_0000, VIRTIO_BLK_T_OUT, 8);
        // 1: data descriptor outside guest memory.
        header(&m, 0x1_0100, VIRTIO_BLK_T_IN, 0);
        // 2: unknown request type.
        header(&m, 0x1_0200, 99, 0);
        // 3: read the pattern back.
        header(&m, 0x1_0300, VIRTIO_BLK_T_IN, 8);
        // 4: no status descriptor at all.
        header(&m, 0x1_0400, VIRTIO_BLK_T_FLUSH, 0);
        // 5: GET_ID.
        header(&m, 0x1_0500, VIRTIO_BLK_T_GET_ID, 0);
        // 6: flush, after the hostile ones: the queue keeps working.
        header(&m, 0x1_0600, VIRTIO_BLK_T_FLUSH, 0);
        let chains: Vec<Vec<RawDescriptor>> = vec![
            vec![
                desc(0x1_0000, 16, false),
                desc(0x2_0000, 4096, false),
                desc(0x5_0000, 1, true),
            ],
            vec![
                desc(0x1_0100, 16, false),
                desc(0x900_0000, 512, true),
                desc(0x5_0001, 1, true),
            ],
            vec![desc(0x1_0200, 16, false), desc(0x5_0002, 1, true)],
            vec![
                desc(0x1_0300, 16, false),
                desc(0x3_0000, 4096, true),
                desc(0x5_0003, 1, true),
            ],
            vec![desc(0x1_0400, 16, false)],
            vec![
                desc(0x1_0500, 16, false),
                desc(0x4_0000, 20, true),
                desc(0x5_0005, 1, true),
            ],
            vec![desc(0x1_0600, 16, false), desc(0x5_0006, 1, true)],
        ];
        // Requests in one batch may run in any order (as on real hardware), so the
        // read-back goes in a second batch after the first has completed.
        let read_back = 3;
        let mut heads = Vec::new();
        let mut index = 0u16;
        let mut worker = QueueWorker::new(0, Engine::new(engine, &f.dev.image, 32));
        for batch in [&[0usize, 1, 2, 4, 5, 6][..], &[read_back][..]] {
            for &i in batch {
                let c = &chains[i];
                vq.add_desc_chains(&chain(c, index), index)
                    .expect("add chain");
                heads.push((i, index));
                index += c.len() as u16;
            }
            worker.process_queue(&f.vring, &f.mem, &f.dev);
            // io_uring may complete some of the I/O asynchronously.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while vq.used().idx().load() < heads.len() as u16 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "requests never completed"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
                worker.process_completions(&f.vring, &f.dev);
            }
        }
        assert_eq!(vq.used().idx().load(), chains.len() as u16);
        let head_of = |i: usize| heads.iter().find(|h| h.0 == i).map(|h| u32::from(h.1));

        let status = |a: u64| m.read_obj::<u8>(GuestAddress(a)).expect("status");
        assert_eq!(status(0x5_0000), VIRTIO_BLK_S_OK as u8, "write");
        assert_eq!(status(0x5_0001), VIRTIO_BLK_S_IOERR as u8, "out of bounds");
        assert_eq!(status(0x5_0002), VIRTIO_BLK_S_UNSUPP as u8, "unknown type");
        assert_eq!(status(0x5_0003), VIRTIO_BLK_S_OK as u8, "read");
        assert_eq!(status(0x5_0005), VIRTIO_BLK_S_OK as u8, "get id");
        assert_eq!(status(0x5_0006), VIRTIO_BLK_S_OK as u8, "flush");

        let mut back = vec![0u8; 4096];
        m.read_slice(&mut back, GuestAddress(0x3_0000))
            .expect("read back");
        assert!(back == pattern, "read returns what was written");
        let mut on_disk = vec![0u8; 4096];
        f.dev
            .image
            .file_for_tests()
            .read_exact_at(&mut on_disk, 8 * 512)
            .expect("image");
        assert!(on_disk == pattern, "the image file holds the write");
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(0x4_0000)).expect("id");
        assert_eq!(&id[..11], b"unit-serial");

        let s = &f.dev.stats;
        assert_eq!(s.err_desc_out_of_bounds.load(Ordering::Relaxed), 1);
        assert_eq!(s.err_unsupported.load(Ordering::Relaxed), 1);
        assert_eq!(s.err_missing_status.load(Ordering::Relaxed), 1);
        assert_eq!(s.writes.load(Ordering::Relaxed), 1);
        assert_eq!(s.reads.load(Ordering::Relaxed), 1);

        // Every chain, hostile ones included, went back to the guest.
        let used: Vec<(u32, u32)> = (0..chains.len())
            .map(|i| {
                let e = vq.used().ring().ref_at(i).expect("used").load();
                (e.id(), e.len())
            })
            .collect();
        let used_len = |i: usize| {
            let id = head_of(i).expect("submitted");
            used.iter().find(|u| u.0 == id).map(|u| u.1)
        };
        assert_eq!(used_len(0), Some(1), "write: {used:?}");
        assert_eq!(used_len(read_back), Some(4097), "read: {used:?}");
        assert_eq!(used_len(4), Some(0), "no-status chain: {used:?}");
        assert_eq!(used_len(5), Some(21), "get id: {used:?}");
    }

    #[test]
    fn batch_with_hostile_chains_sync() {
        run_batch(EngineKind::Sync);
    }

    #[test]
    fn batch_with_hostile_chains_io_uring() {
        run_batch(EngineKind::IoUring);
    }
}
