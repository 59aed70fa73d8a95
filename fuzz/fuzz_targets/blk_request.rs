//! Fuzz target: vdisk's virtio-blk request parsing (`vdisk::request::parse`) of every
//! chain a hostile driver can post, through virtio-queue's own chain walking (loops,
//! indirect tables, lengths, directions). A parsed request's iovecs must lie inside guest
//! memory and add up to what the request says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk::request::{parse, Kind, Limits, Scratch};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

mod rings;

fuzz_target!(|data: &[u8]| {
    let Some(mut s) = rings::setup(data) else {
        return;
    };
    let limits = Limits {
        capacity_sectors: 2048,
        read_only: data.get(2).is_some_and(|b| b & 1 == 1),
        max_segments: 6,
        max_segment_len: 8192,
        max_discard_sectors: 1 << 22,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1 << 22,
        max_write_zeroes_seg: 4,
    };
    let region = s.mem.find_region(GuestAddress(0)).map(|r| {
        let p = r.get_host_address(vm_memory::MemoryRegionAddress(0)).unwrap_or(std::ptr::null_mut());
        (p as usize, rings::MEM_SIZE)
    });
    let Some((host, len)) = region else {
        return;
    };
    let mut scratch = Scratch::default();
    let Ok(iter) = s.queue.iter(&s.mem) else {
        return;
    };
    for chain in iter.take(64) {
        let Ok(req) = parse(chain, &s.mem, &limits, &mut scratch) else {
            continue;
        };
        let mut total = 0usize;
        for v in &req.iovecs {
            let at = v.iov_base as usize;
            assert!(at >= host && at + v.iov_len <= host + len, "an iovec outside guest memory");
            total += v.iov_len;
        }
        match req.kind {
            Kind::Read { offset, len } | Kind::Write { offset, len } => {
                assert_eq!(total as u64, len);
                assert!(offset + len <= 2048 * 512, "beyond capacity");
                assert!(req.iovecs.len() <= 6 * 2, "more iovecs than segments allow");
            }
            _ => {}
        }
        assert!(GuestMemoryBackend::check_range(&s.mem, req.status, 1));
    }
});
