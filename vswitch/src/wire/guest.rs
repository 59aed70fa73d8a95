//! A guest's memory as the switch sees it: the mapping the frontend handed over, and host
//! ranges inside it that the fast path reads and writes through raw pointers.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;

/// A host memory range inside a guest mapping that the caller keeps alive.
#[derive(Clone, Copy, Debug)]
pub struct HostRange {
    pub ptr: *mut u8,
    pub len: usize,
}

/// Host address range of `len` bytes at `addr`, if they lie in one memory region.
pub fn host_range<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<HostRange> {
    let ptr = common::memory::host_range(mem, addr, len as u64)?;
    Some(HostRange { ptr, len })
}
