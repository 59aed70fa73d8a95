//! What the ring targets share: a guest memory whose descriptor table, avail ring and
//! buffers come from the fuzz input, and a split queue set up over it.
//!
//! Input: byte 0 picks the queue size (2 to 32), byte 1 how many chains the driver says
//! it posted; then the descriptor table (16 bytes per entry), the avail ring entries (2
//! bytes each), and the rest of the input fills the buffer area. Descriptors name any
//! address: most point nowhere, which is half the point.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 64 << 10;
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
/// Where the rest of the input goes: the buffers descriptors usually point at.
pub const DATA: u64 = 0x3000;

pub struct Setup {
    pub mem: GuestMemoryMmap<()>,
    pub queue: Queue,
}

pub fn setup(data: &[u8]) -> Option<Setup> {
    let (&size_sel, rest) = data.split_first()?;
    let (&posted, rest) = rest.split_first()?;
    let size = 2u16 << (size_sel % 5);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let table = usize::from(size) * 16;
    let (descs, rest) = rest.split_at(table.min(rest.len()));
    mem.write_slice(descs, GuestAddress(DESC)).ok()?;
    let ring = usize::from(size) * 2;
    let (entries, rest) = rest.split_at(ring.min(rest.len()));
    mem.write_slice(entries, GuestAddress(AVAIL + 4)).ok()?;
    let posted = u16::from(posted) % (size * 2);
    mem.write_obj(posted.to_le(), GuestAddress(AVAIL + 2)).ok()?;
    let data_len = rest.len().min(MEM_SIZE - DATA as usize);
    mem.write_slice(&rest[..data_len], GuestAddress(DATA)).ok()?;
    let mut queue = Queue::new(size).ok()?;
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    Some(Setup { mem, queue })
}
