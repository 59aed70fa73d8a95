//! A split virtqueue read and written straight through host pointers, for the forwarding
//! fast path.
//!
//! `virtio_queue::Queue` translates a guest address for every descriptor, avail entry and
//! used element it touches, and publishes the used index after each element. Forwarding
//! small frames, that bookkeeping cost more than the frame itself. A `Ring` translates the
//! three ring areas once per batch, walks chains through those pointers (indirect tables
//! included), and publishes a whole batch of used elements with one index store. The
//! `Queue` stays the owner of the ring's state (`next_avail`, `next_used`, notification
//! suppression): callers read it before and write it back after.
//!
//! Everything here is guest-controlled: each index, address, length and chain length is
//! checked, and a bad one is an error naming what was wrong, never an access outside the
//! guest's memory.

use std::cell::Cell;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion, MemoryRegionAddress,
};

use super::guest::{host_range, HostRange, Mem};

const DESC_SIZE: usize = 16;
/// Room for `size` entries of `entry` bytes after the 4-byte flags and index, plus the
/// trailing event word.
fn area_len(size: u16, entry: usize) -> usize {
    4 + usize::from(size) * entry + 2
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the queue is not ready")]
    NotReady,
    #[error("a queue size of {0}, not a power of two")]
    Size(u16),
    #[error("the {0} lies outside guest memory or is misaligned")]
    Area(&'static str),
    #[error("the avail index is {ahead} entries ahead of the device, on a ring of {size}")]
    AvailIndex { ahead: u16, size: u16 },
    #[error("descriptor index {index} is past the end of a table of {len}")]
    DescIndex { index: u16, len: u16 },
    #[error("the chain is longer than its table: a loop")]
    Loop,
    #[error("an indirect descriptor table is {0} bytes, not a non-zero multiple of 16")]
    IndirectLen(u32),
    #[error("an indirect descriptor inside an indirect table, or chained with NEXT")]
    NestedIndirect,
    #[error("a buffer of {len} bytes at {addr:#x} lies outside guest memory")]
    Buffer { addr: u64, len: u32 },
}

/// Why [`Ring::open`] gave no ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The guest's memory table changed while the avail index was read: the buffers it
    /// names may lie in regions the view does not have.
    #[error("guest memory changing")]
    MemoryChanged,
}

/// What [`Ring::chain`] appended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// Bytes in the buffers appended.
    pub bytes: usize,
    /// Buffers of the other direction, left out.
    pub other: usize,
}

/// Used elements written since `start` and not yet visible to the driver.
pub struct UsedBatch {
    start: u16,
    next: u16,
}

/// The three areas of a split virtqueue, translated, for as long as `mem` is held.
pub struct Ring<'m> {
    mem: &'m Mem,
    /// The memory region the last buffer was found in (guest start, length, host start):
    /// a batch's buffers are almost always in one region, and this spares the region
    /// lookup for each.
    last_region: Cell<(u64, u64, *mut u8)>,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
    /// size - 1: split ring sizes are powers of two (the queue refuses others), so a
    /// free-running index wraps with a mask instead of a division.
    mask: u16,
}

impl<'m> Ring<'m> {
    /// Translate `queue`'s areas in `mem`. The areas must each lie in one region and be
    /// aligned as the virtio spec requires.
    pub fn new(queue: &Queue, mem: &'m Mem) -> Result<Ring<'m>, RingError> {
        if !queue.ready() {
            return Err(RingError::NotReady);
        }
        let size = queue.size();
        if !size.is_power_of_two() {
            return Err(RingError::Size(size));
        }
        let area = |addr: u64, len: usize, align: usize, what| {
            host_range(mem, GuestAddress(addr), len)
                .filter(|r| (r.ptr as usize).is_multiple_of(align))
                .map(|r| r.ptr)
                .ok_or(RingError::Area(what))
        };
        Ok(Ring {
            mem,
            last_region: Cell::new((0, 0, std::ptr::null_mut())),
            desc: area(
                queue.desc_table(),
                usize::from(size) * DESC_SIZE,
                16,
                "descriptor table",
            )?,
            avail: area(queue.avail_ring(), area_len(size, 2), 2, "avail ring")?,
            used: area(queue.used_ring(), area_len(size, 8), 4, "used ring")?,
            size,
            mask: size - 1,
        })
    }

    /// The ring of `queue` over `view`, and how many chains the driver posted from the
    /// queue's next avail position on. `current` is the guest's memory as it is now: the
    /// answer holds only if `view` still is it.
    pub fn open(
        queue: &Queue,
        view: &'m Mem,
        current: &GuestMemoryAtomic<Mem>,
    ) -> Result<(Ring<'m>, u16), OpenError> {
        let ring = Ring::new(queue, view)?;
        let posted = ring.posted(queue.next_avail())?;
        if !std::ptr::eq(view, &*current.memory()) {
            return Err(OpenError::MemoryChanged);
        }
        Ok((ring, posted))
    }

    fn avail_u16(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: every caller's offset is below area_len(size, 2) and even; the avail
        // area is that long, 2-aligned and mapped while `mem` is borrowed. AtomicU16 has
        // the layout of u16, and the guest writes it concurrently, hence atomic.
        unsafe { &*self.avail.add(offset).cast::<AtomicU16>() }
    }

    /// The driver's avail index, and with it every entry and descriptor before it.
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.avail_u16(2).load(Ordering::Acquire))
    }

    /// How many chains the driver has posted past `next_avail`, checked against the size.
    pub fn posted(&self, next_avail: u16) -> Result<u16, RingError> {
        let ahead = self.avail_idx().wrapping_sub(next_avail);
        if ahead > self.size {
            return Err(RingError::AvailIndex {
                ahead,
                size: self.size,
            });
        }
        Ok(ahead)
    }

    /// The head of the chain at avail position `at` (free-running).
    pub fn head(&self, at: u16) -> u16 {
        let slot = usize::from(at & self.mask);
        u16::from_le(self.avail_u16(4 + 2 * slot).load(Ordering::Relaxed))
    }

    /// Start loading the descriptors of the chains at avail positions `from..from + n`, so
    /// that walking them does not wait for each one in turn.
    pub fn prefetch_chains(&self, from: u16, n: u16) {
        for i in 0..n {
            let head = self.head(from.wrapping_add(i));
            if head < self.size {
                // wrapping_add: a prefetch address needs no provenance, and head < size
                // keeps it inside the table anyway.
                super::copy::prefetch(self.desc.wrapping_add(usize::from(head) * DESC_SIZE));
            }
        }
    }

    /// Append to `out` the buffers of the chain starting at `head` that are
    /// device-writable (`writable`, receive buffers) or device-readable (transmit buffers),
    /// and count the others. On an error, `out` may hold some of the chain's buffers.
    ///
    /// Ranges go straight into the caller's list: staging them in a second vector and
    /// copying them over made each copy's 16-byte load wait for two 8-byte stores to
    /// retire (a failed store-to-load forward), once per buffer.
    #[inline(always)]
    pub fn chain(
        &self,
        head: u16,
        writable: bool,
        out: &mut Vec<HostRange>,
    ) -> Result<Taken, RingError> {
        let mut taken = Taken::default();
        let mut table = self.desc;
        let mut len = self.size;
        let mut index = head;
        let mut seen = 0u16;
        let mut indirect = false;
        loop {
            if index >= len {
                return Err(RingError::DescIndex { index, len });
            }
            if seen == len {
                return Err(RingError::Loop);
            }
            seen += 1;
            let mut raw = [0u8; DESC_SIZE];
            // SAFETY: index < len, and `table` holds `len` descriptors mapped while `mem`
            // is borrowed (the ring's table, or an indirect table checked below). The
            // guest may be writing it: a torn read only yields values checked below.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    table.add(usize::from(index) * DESC_SIZE),
                    raw.as_mut_ptr(),
                    DESC_SIZE,
                )
            };
            let addr = u64::from_le_bytes([
                raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
            ]);
            let dlen = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                if indirect || flags & VRING_DESC_F_NEXT as u16 != 0 {
                    return Err(RingError::NestedIndirect);
                }
                let n = dlen as usize / DESC_SIZE;
                if dlen == 0
                    || !(dlen as usize).is_multiple_of(DESC_SIZE)
                    || n > usize::from(u16::MAX)
                {
                    return Err(RingError::IndirectLen(dlen));
                }
                let r = self
                    .buffer(addr, dlen as usize)
                    .ok_or(RingError::Buffer { addr, len: dlen })?;
                table = r.ptr;
                len = n as u16;
                index = 0;
                seen = 0;
                indirect = true;
                continue;
            }
            if dlen > 0 {
                let range = self
                    .buffer(addr, dlen as usize)
                    .ok_or(RingError::Buffer { addr, len: dlen })?;
                if (flags & VRING_DESC_F_WRITE as u16 != 0) == writable {
                    taken.bytes += range.len;
                    out.push(range);
                } else {
                    taken.other += 1;
                }
            }
            if flags & VRING_DESC_F_NEXT as u16 == 0 {
                return Ok(taken);
            }
            index = next;
        }
    }

    /// Host address of the guest buffer of `len` bytes at `addr`, if it lies in one memory
    /// region.
    #[inline(always)]
    fn buffer(&self, addr: u64, len: usize) -> Option<HostRange> {
        let (mut start, mut size, mut base) = self.last_region.get();
        if addr.wrapping_sub(start) >= size {
            let region = self.mem.find_region(GuestAddress(addr))?;
            start = region.start_addr().raw_value();
            size = region.len();
            base = region.get_host_address(MemoryRegionAddress(0)).ok()?;
            self.last_region.set((start, size, base));
        }
        let offset = addr - start;
        if len as u64 > size - offset {
            return None;
        }
        // wrapping_add: offset < size, so this stays inside the region's mapping.
        Some(HostRange {
            ptr: base.wrapping_add(offset as usize),
            len,
        })
    }

    /// Start a batch of used elements at the queue's next used position.
    pub fn used_batch(&self, queue: &Queue) -> UsedBatch {
        let n = queue.next_used();
        UsedBatch { start: n, next: n }
    }

    /// Return the chain at `head` with `len` bytes written. A head past the table (from
    /// a bogus avail entry) names no chain and is not returned.
    pub fn add_used(&self, batch: &mut UsedBatch, head: u16, len: u32) {
        if head < self.size {
            self.put_used(batch.next, head, len);
            batch.next = batch.next.wrapping_add(1);
        }
    }

    /// Make the batch visible to the driver with one index store, and record it in
    /// `queue`. Returns whether the driver asked to be interrupted for it.
    pub fn publish_batch(&self, batch: UsedBatch, queue: &mut Queue, event_idx: bool) -> bool {
        if batch.next == batch.start {
            return false;
        }
        self.publish(batch.next);
        queue.set_next_used(batch.next);
        self.wants_interrupt(event_idx, batch.start, batch.next)
    }

    /// Write a used element at used position `at` (free-running). The driver sees it only
    /// once `publish` moves the used index past it.
    fn put_used(&self, at: u16, head: u16, len: u32) {
        let slot = usize::from(at & self.mask);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        // SAFETY: slot < size, so the 8 bytes lie in the used area, mapped while `mem` is
        // borrowed.
        unsafe { std::ptr::copy_nonoverlapping(elem.as_ptr(), self.used.add(4 + 8 * slot), 8) };
    }

    /// Make the used elements before `idx` (and the buffers they name) visible to the
    /// driver.
    fn publish(&self, idx: u16) {
        // SAFETY: offset 2 of the used area, which is 4-aligned and mapped while `mem` is
        // borrowed; the driver reads it concurrently, hence atomic.
        let used_idx = unsafe { &*self.used.add(2).cast::<AtomicU16>() };
        used_idx.store(idx.to_le(), Ordering::Release);
    }

    /// Whether the driver wants an interrupt now that the used index moved from `old` to
    /// `new`: the used event with EVENT_IDX, the NO_INTERRUPT flag without.
    fn wants_interrupt(&self, event_idx: bool, old: u16, new: u16) -> bool {
        // The used index store must be visible before the driver's event is read, or both
        // sides may wait for each other.
        fence(Ordering::SeqCst);
        if event_idx {
            let offset = 4 + 2 * usize::from(self.size);
            let event = u16::from_le(self.avail_u16(offset).load(Ordering::Relaxed));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags = u16::from_le(self.avail_u16(0).load(Ordering::Relaxed));
            flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    const QSIZE: u16 = 16;

    fn setup() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem")
    }

    fn queue(vq: &MockSplitQueue<'_, Mem>) -> Queue {
        let mut q: Queue = vq.create_queue().expect("queue");
        q.set_ready(true);
        q
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn direct_and_indirect_chains_and_used() {
        let mem = setup();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        // Chain 0: two direct descriptors; chain 1: one indirect table of two.
        vq.add_desc_chains(
            &[
                desc(0x1000, 12, VRING_DESC_F_NEXT, 1),
                desc(0x2000, 60, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .expect("chain 0");
        let table = [
            desc(0x3000, 100, VRING_DESC_F_NEXT, 1),
            desc(0x4000, 200, 0, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(0x8000 + 16 * i as u64))
                .expect("indirect");
        }
        vq.add_desc_chains(&[desc(0x8000, 32, VRING_DESC_F_INDIRECT, 0)], 2)
            .expect("chain 1");
        let q = queue(&vq);
        let ring = Ring::new(&q, &mem).expect("ring");
        assert_eq!(ring.posted(0), Ok(2));
        let mut ranges = Vec::new();
        let taken = ring
            .chain(ring.head(0), true, &mut ranges)
            .expect("chain 0");
        assert_eq!(
            taken,
            Taken {
                bytes: 60,
                other: 1
            }
        );
        assert_eq!(ranges.len(), 1);
        assert_eq!(ranges[0].len, 60);
        ranges.clear();
        let taken = ring
            .chain(ring.head(0), false, &mut ranges)
            .expect("chain 0");
        assert_eq!(
            taken,
            Taken {
                bytes: 12,
                other: 1
            }
        );
        ranges.clear();
        let taken = ring
            .chain(ring.head(1), false, &mut ranges)
            .expect("chain 1");
        assert_eq!(
            taken,
            Taken {
                bytes: 300,
                other: 0
            }
        );
        assert_eq!(
            ranges.iter().map(|r| r.len).collect::<Vec<_>>(),
            vec![100, 200]
        );
        ring.put_used(0, 2, 300);
        ring.put_used(1, 0, 60);
        assert_eq!(vq.used().idx().load(), 0, "not published yet");
        ring.publish(2);
        assert_eq!(vq.used().idx().load(), 2);
        let e = vq.used().ring().ref_at(0).expect("used").load();
        assert_eq!((e.id(), e.len()), (2, 300));
    }

    #[test]
    fn hostile_chains_are_errors() {
        let mem = setup();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let q = queue(&vq);
        let write_desc = |i: u16, d: RawDescriptor| {
            mem.write_obj(d, GuestAddress(vq.desc_table_addr().0 + 16 * u64::from(i)))
                .expect("desc");
        };
        let ring = Ring::new(&q, &mem).expect("ring");
        let mut segs = Vec::new();
        // A loop: 0 -> 1 -> 0.
        write_desc(0, desc(0x1000, 8, VRING_DESC_F_NEXT, 1));
        write_desc(1, desc(0x1000, 8, VRING_DESC_F_NEXT, 0));
        assert_eq!(ring.chain(0, false, &mut segs), Err(RingError::Loop));
        assert!(segs.len() <= usize::from(QSIZE), "bounded by the table");
        // Next index past the table.
        write_desc(2, desc(0x1000, 8, VRING_DESC_F_NEXT, QSIZE));
        assert!(matches!(
            ring.chain(2, false, &mut segs),
            Err(RingError::DescIndex { .. })
        ));
        assert!(matches!(
            ring.chain(QSIZE, false, &mut segs),
            Err(RingError::DescIndex { .. })
        ));
        // A buffer outside guest memory, and one running off its end.
        write_desc(3, desc(0x900_0000, 8, 0, 0));
        assert!(matches!(
            ring.chain(3, false, &mut segs),
            Err(RingError::Buffer { .. })
        ));
        write_desc(4, desc(0x10_0000 - 4, 8, 0, 0));
        assert!(matches!(
            ring.chain(4, false, &mut segs),
            Err(RingError::Buffer { .. })
        ));
        // Indirect: bad length, chained with NEXT, nested, and a loop inside.
        write_desc(5, desc(0x8000, 20, VRING_DESC_F_INDIRECT, 0));
        assert_eq!(
            ring.chain(5, false, &mut segs),
            Err(RingError::IndirectLen(20))
        );
        write_desc(
            6,
            desc(0x8000, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 7),
        );
        assert_eq!(
            ring.chain(6, false, &mut segs),
            Err(RingError::NestedIndirect)
        );
        mem.write_obj(
            desc(0x9000, 32, VRING_DESC_F_INDIRECT, 0),
            GuestAddress(0x8000),
        )
        .expect("nested");
        write_desc(7, desc(0x8000, 16, VRING_DESC_F_INDIRECT, 0));
        assert_eq!(
            ring.chain(7, false, &mut segs),
            Err(RingError::NestedIndirect)
        );
        mem.write_obj(desc(0x1000, 8, VRING_DESC_F_NEXT, 0), GuestAddress(0x8000))
            .expect("self loop");
        segs.clear();
        assert_eq!(ring.chain(7, false, &mut segs), Err(RingError::Loop));
        assert_eq!(segs.len(), 1, "bounded by the indirect table");
    }

    #[test]
    fn avail_index_too_far_ahead() {
        let mem = setup();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let q = queue(&vq);
        vq.avail().idx().store(QSIZE + 1);
        let ring = Ring::new(&q, &mem).expect("ring");
        assert_eq!(
            ring.posted(0),
            Err(RingError::AvailIndex {
                ahead: QSIZE + 1,
                size: QSIZE
            })
        );
    }

    #[test]
    fn interrupt_suppression() {
        let mem = setup();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        let q = queue(&vq);
        let ring = Ring::new(&q, &mem).expect("ring");
        // Without EVENT_IDX: the NO_INTERRUPT flag.
        let avail = vq.avail_addr().0;
        assert!(ring.wants_interrupt(false, 0, 1));
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(avail))
            .expect("flags");
        assert!(!ring.wants_interrupt(false, 0, 1));
        // With EVENT_IDX: only when the batch crosses the used event.
        mem.write_obj(5u16, GuestAddress(avail + 4 + 2 * u64::from(QSIZE)))
            .expect("used event");
        assert!(!ring.wants_interrupt(true, 0, 5));
        assert!(ring.wants_interrupt(true, 0, 6));
        assert!(ring.wants_interrupt(true, 5, 8));
        assert!(!ring.wants_interrupt(true, 6, 8));
    }
}
