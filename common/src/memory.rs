//! Guest-memory helpers shared by the daemons' hot paths.

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Host address of `len` bytes at `addr` when they lie in one memory region (the common
/// case), with one region lookup instead of vm-memory's general slice iterator. `None` if
/// the range is outside guest memory or crosses a region boundary.
pub fn host_range<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, len: u64) -> Option<*mut u8> {
    let (region, offset) = mem.to_region_addr(addr)?;
    let end = offset.raw_value().checked_add(len)?;
    if end > region.len() {
        return None;
    }
    region.get_host_address(offset).ok()
}

/// "name=value" for every non-zero counter, for a log line ("none" if all are zero).
pub fn nonzero_counters(snapshot: &[(&str, u64)]) -> String {
    let parts: Vec<String> = snapshot
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(" ")
    }
}
