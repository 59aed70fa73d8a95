//! Turning a descriptor chain into a checked block request.
//!
//! Everything here is hostile input: addresses, lengths, directions and the header are
//! validated before any I/O is issued. The chain is treated as a byte stream (the spec
//! forbids the device from assuming a framing): the device-readable part is the 16-byte
//! header followed by data-out, the device-writable part is data-in followed by the status
//! byte, which is the last writable byte of the chain.

use std::sync::atomic::AtomicU64;

use common::memory::host_range;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use crate::stats::Stats;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// virtio-blk request header: type (le32), reserved/ioprio (le32), sector (le64).
pub const HEADER_LEN: usize = 16;
/// A discard / write-zeroes segment: sector (le64), num_sectors (le32), flags (le32).
pub const DISCARD_SEGMENT_LEN: usize = 16;
/// GET_ID returns a 20-byte serial string.
pub const ID_BYTES: usize = 20;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Largest iovec array the kernel accepts in one readv/writev.
pub const MAX_IOVECS: usize = 1024;

/// Limits the device advertises and enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// SEG_MAX: the most data descriptors a request may have (the header and the status
    /// may have one each besides).
    pub max_segments: u32,
    /// SIZE_MAX: the largest data descriptor (one that also holds the header or the
    /// status may be that much longer).
    pub max_segment_len: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// A byte range of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64 },
    Flush,
    GetId,
    Discard(Vec<Range>),
    WriteZeroes { ranges: Vec<Range>, unmap: bool },
}

/// A validated request. `iovecs` are host addresses inside the guest memory mapping the
/// chain was parsed against; the caller keeps that mapping alive until the request
/// completes.
#[derive(Debug)]
pub struct Request {
    pub head: u16,
    pub kind: Kind,
    pub iovecs: Vec<libc::iovec>,
    pub status: GuestAddress,
    /// What goes into the used ring: data-in bytes plus the status byte.
    pub used_len: u32,
}

// SAFETY: the raw pointers in `iovecs` point into guest memory mappings that the request's
// owner keeps alive (an `Arc` of the mapping travels with the request); no thread-local
// state is involved.
unsafe impl Send for Request {}

/// Why a chain was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    DescOutOfBounds { addr: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    WrongDirection,
    #[error("request header needs {HEADER_LEN} readable bytes, chain has {0}")]
    ShortHeader(u64),
    #[error("no writable byte for the status")]
    MissingStatus,
    #[error("sectors {sector}+{sectors} beyond capacity {capacity} sectors")]
    BeyondCapacity {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("bad length: {0}")]
    BadLength(&'static str),
    #[error(
        "{n} descriptors, over the {max} data segments advertised (SEG_MAX) and header and status"
    )]
    TooManySegments { n: usize, max: u32 },
    #[error("a {len}-byte descriptor, over the {max} bytes advertised (SIZE_MAX)")]
    SegmentTooLarge { len: u64, max: u32 },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The virtio status the guest sees.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// The counter this reason bumps.
    pub fn counter<'a>(&self, s: &'a Stats) -> &'a AtomicU64 {
        match self {
            RequestError::DescOutOfBounds { .. } => &s.err_desc_out_of_bounds,
            RequestError::WrongDirection => &s.err_wrong_direction,
            RequestError::ShortHeader(_) => &s.err_short_header,
            RequestError::MissingStatus => &s.err_missing_status,
            RequestError::BeyondCapacity { .. } => &s.err_beyond_capacity,
            RequestError::BadLength(_)
            | RequestError::TooManySegments { .. }
            | RequestError::SegmentTooLarge { .. } => &s.err_bad_length,
            RequestError::ReadOnly => &s.err_read_only,
            RequestError::Unsupported(_) => &s.err_unsupported,
        }
    }
}

/// A rejected chain: the error, and where its status byte goes if it has one.
#[derive(Debug)]
pub struct Rejected {
    pub head: u16,
    pub status: Option<GuestAddress>,
    pub error: RequestError,
}

#[derive(Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// Host iovecs for `len` bytes starting `skip` bytes into `segs`.
fn host_iovecs<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    mut skip: u64,
    mut len: u64,
    out: &mut Vec<libc::iovec>,
) -> Result<(), RequestError> {
    for seg in segs {
        if len == 0 {
            break;
        }
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        let take = (seg.len - skip).min(len);
        let start = seg.addr.unchecked_add(skip);
        skip = 0;
        len -= take;
        if out.len() == MAX_IOVECS {
            return Err(RequestError::BadLength("more than 1024 data segments"));
        }
        if let Some(host) = host_range(mem, start, take) {
            out.push(libc::iovec {
                iov_base: host.cast(),
                iov_len: take as usize,
            });
            continue;
        }
        // A descriptor may span several memory regions: one iovec per piece.
        for slice in mem.get_slices(start, take as usize) {
            let slice = slice.map_err(|_| RequestError::DescOutOfBounds {
                addr: seg.addr.raw_value(),
                len: seg.len as u32,
            })?;
            if out.len() == MAX_IOVECS {
                return Err(RequestError::BadLength("more than 1024 data segments"));
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Gather `buf.len()` bytes starting `skip` bytes into `segs`.
fn gather<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        if skip >= seg.len {
            skip -= seg.len;
            continue;
        }
        let take = ((seg.len - skip) as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + take], seg.addr.unchecked_add(skip))
            .map_err(|_| RequestError::DescOutOfBounds {
                addr: seg.addr.raw_value(),
                len: seg.len as u32,
            })?;
        done += take;
        skip = 0;
    }
    Ok(())
}

fn check_range(limits: &Limits, sector: u64, bytes: u64) -> Result<u64, RequestError> {
    let sectors = bytes >> SECTOR_SHIFT;
    let beyond = || RequestError::BeyondCapacity {
        sector,
        sectors,
        capacity: limits.capacity_sectors,
    };
    let end = sector.checked_add(sectors).ok_or_else(beyond)?;
    if end > limits.capacity_sectors {
        return Err(beyond());
    }
    // Cannot overflow: end <= capacity_sectors, which came from a byte size.
    Ok(sector << SECTOR_SHIFT)
}

fn parse_segments<M: GuestMemoryBackend>(
    mem: &M,
    readable: &[Seg],
    data_out: u64,
    limits: &Limits,
    max_seg: u32,
    max_sectors: u32,
    discard: bool,
) -> Result<(Vec<Range>, bool), RequestError> {
    if data_out == 0 || !data_out.is_multiple_of(DISCARD_SEGMENT_LEN as u64) {
        return Err(RequestError::BadLength(
            "discard/write-zeroes payload is not a whole number of segments",
        ));
    }
    let count = data_out / DISCARD_SEGMENT_LEN as u64;
    if count > u64::from(max_seg) {
        return Err(RequestError::BadLength(
            "too many discard/write-zeroes segments",
        ));
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut unmap = true;
    for i in 0..count {
        let mut raw = [0u8; DISCARD_SEGMENT_LEN];
        gather(
            mem,
            readable,
            HEADER_LEN as u64 + i * DISCARD_SEGMENT_LEN as u64,
            &mut raw,
        )?;
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&raw[0..8]);
        let sector = u64::from_le_bytes(sector_bytes);
        let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        if num_sectors > max_sectors {
            return Err(RequestError::BadLength(
                "segment larger than the advertised maximum",
            ));
        }
        if discard && flags != 0 {
            // The spec: a discard with the unmap flag (or any unknown flag) is unsupported.
            return Err(RequestError::Unsupported(VIRTIO_BLK_T_DISCARD));
        }
        if !discard && flags & !WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(RequestError::Unsupported(VIRTIO_BLK_T_WRITE_ZEROES));
        }
        unmap &= flags & WRITE_ZEROES_FLAG_UNMAP != 0;
        let len = u64::from(num_sectors) << SECTOR_SHIFT;
        let offset = check_range(limits, sector, len)?;
        ranges.push(Range { offset, len });
    }
    Ok((ranges, unmap))
}

/// Buffers `parse` reuses from one request to the next, so validating a request does not
/// allocate in the steady state.
#[derive(Default)]
pub struct Scratch {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    iovec_pool: Vec<Vec<libc::iovec>>,
}

// SAFETY: the pooled iovec buffers are always empty (cleared on recycle); the segment
// lists hold guest addresses, not pointers. Nothing in here points anywhere.
unsafe impl Send for Scratch {}

impl Scratch {
    /// An empty iovec buffer, from the pool when it has one.
    pub fn iovec_buffer(&mut self) -> Vec<libc::iovec> {
        self.iovec_pool.pop().unwrap_or_default()
    }

    /// Give back a finished request's iovec buffer.
    pub fn recycle(&mut self, mut iovecs: Vec<libc::iovec>) {
        // Bounded: one buffer per request a queue can hold is all that is ever needed.
        if self.iovec_pool.len() < 1024 {
            iovecs.clear();
            self.iovec_pool.push(iovecs);
        }
    }
}

/// Validate one chain against `mem` (the memory it was popped from) and the device limits.
pub fn parse<M>(
    chain: DescriptorChain<&M>,
    mem: &M,
    limits: &Limits,
    scratch: &mut Scratch,
) -> Result<Request, Rejected>
where
    M: GuestMemoryBackend + GuestMemory,
{
    let Scratch {
        readable,
        writable,
        iovec_pool,
    } = scratch;
    readable.clear();
    writable.clear();
    let iovecs = iovec_pool.pop().unwrap_or_default();
    parse_into(chain, mem, limits, readable, writable, iovecs)
}

fn parse_into<M>(
    chain: DescriptorChain<&M>,
    mem: &M,
    limits: &Limits,
    readable: &mut Vec<Seg>,
    writable: &mut Vec<Seg>,
    mut iovecs: Vec<libc::iovec>,
) -> Result<Request, Rejected>
where
    M: GuestMemoryBackend + GuestMemory,
{
    let head = chain.head_index();
    let mut read_bytes = 0u64;
    let mut write_bytes = 0u64;
    let mut wrong_direction = false;
    // What we keep of a chain is bounded by what was advertised; past that only the
    // count goes on, and the last writable descriptor (for the status byte).
    let max_descs = limits.max_segments as usize + 2;
    let max_len = u64::from(limits.max_segment_len) + HEADER_LEN as u64;
    let (mut descs, mut oversized) = (0usize, None);
    let mut last_writable: Option<Seg> = None;

    for desc in chain {
        let seg = Seg {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        };
        if seg.len == 0 {
            continue;
        }
        descs += 1;
        if seg.len > max_len {
            oversized.get_or_insert(seg.len);
        }
        let keep = descs <= max_descs;
        if desc.is_write_only() {
            write_bytes += seg.len;
            last_writable = Some(seg);
            if keep {
                writable.push(seg);
            }
        } else {
            if last_writable.is_some() {
                wrong_direction = true;
            }
            read_bytes += seg.len;
            if keep {
                readable.push(seg);
            }
        }
    }

    // The status byte: the last writable byte, if it lies in guest memory.
    let status = last_writable.and_then(|s| {
        let addr = s.addr.checked_add(s.len - 1)?;
        GuestMemoryBackend::check_range(mem, addr, 1).then_some(addr)
    });
    let Some(status) = status else {
        let error = match last_writable {
            None => RequestError::MissingStatus,
            Some(last) => RequestError::DescOutOfBounds {
                addr: last.addr.raw_value(),
                len: last.len as u32,
            },
        };
        return Err(Rejected {
            head,
            status: None,
            error,
        });
    };
    let reject = |error: RequestError| Rejected {
        head,
        status: Some(status),
        error,
    };
    if wrong_direction {
        return Err(reject(RequestError::WrongDirection));
    }
    if descs > max_descs {
        return Err(reject(RequestError::TooManySegments {
            n: descs,
            max: limits.max_segments,
        }));
    }
    if let Some(len) = oversized {
        return Err(reject(RequestError::SegmentTooLarge {
            len,
            max: limits.max_segment_len,
        }));
    }
    if read_bytes < HEADER_LEN as u64 {
        return Err(reject(RequestError::ShortHeader(read_bytes)));
    }

    let mut hdr = [0u8; HEADER_LEN];
    match host_range(mem, readable[0].addr, HEADER_LEN as u64) {
        Some(p) if readable[0].len >= HEADER_LEN as u64 => {
            // SAFETY: the 16 bytes lie inside one mapped region of guest memory; a volatile
            // read because the guest may be writing them concurrently.
            hdr = unsafe { std::ptr::read_volatile(p.cast::<[u8; HEADER_LEN]>()) }
        }
        _ => gather(mem, readable, 0, &mut hdr).map_err(reject)?,
    }
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let data_out = read_bytes - HEADER_LEN as u64;
    let data_in = write_bytes - 1;

    let (kind, used_len) = match req_type {
        VIRTIO_BLK_T_IN => {
            if !data_in.is_multiple_of(SECTOR_SIZE) {
                return Err(reject(RequestError::BadLength(
                    "read is not a whole number of sectors",
                )));
            }
            let offset = check_range(limits, sector, data_in).map_err(reject)?;
            host_iovecs(mem, writable, 0, data_in, &mut iovecs).map_err(reject)?;
            // data_in < 2^32: virtio-queue stops a chain at 4 GiB.
            (
                Kind::Read {
                    offset,
                    len: data_in,
                },
                data_in as u32 + 1,
            )
        }
        VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            if !data_out.is_multiple_of(SECTOR_SIZE) {
                return Err(reject(RequestError::BadLength(
                    "write is not a whole number of sectors",
                )));
            }
            let offset = check_range(limits, sector, data_out).map_err(reject)?;
            host_iovecs(mem, readable, HEADER_LEN as u64, data_out, &mut iovecs).map_err(reject)?;
            (
                Kind::Write {
                    offset,
                    len: data_out,
                },
                1,
            )
        }
        VIRTIO_BLK_T_FLUSH => (Kind::Flush, 1),
        VIRTIO_BLK_T_GET_ID => {
            let n = data_in.min(ID_BYTES as u64);
            host_iovecs(mem, writable, 0, n, &mut iovecs).map_err(reject)?;
            (Kind::GetId, n as u32 + 1)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if limits.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let (ranges, unmap) = parse_segments(
                mem,
                readable,
                data_out,
                limits,
                max_seg,
                max_sectors,
                discard,
            )
            .map_err(reject)?;
            let kind = if discard {
                Kind::Discard(ranges)
            } else {
                Kind::WriteZeroes { ranges, unmap }
            };
            (kind, 1)
        }
        other => return Err(reject(RequestError::Unsupported(other))),
    };

    Ok(Request {
        head,
        kind,
        iovecs,
        status,
        used_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;
    /// Two adjacent regions, so a buffer can straddle them.
    const REGION: u64 = 0x10000;
    const CAPACITY: u64 = 1024;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .expect("guest memory")
    }

    fn limits(read_only: bool) -> Limits {
        Limits {
            capacity_sectors: CAPACITY,
            read_only,
            max_segments: 4,
            max_segment_len: 8192,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 4,
        }
    }

    fn rd(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    fn wr(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    fn header(mem: &GuestMemoryMmap<()>, addr: u64, ty: u32, sector: u64) {
        mem.write_obj(ty.to_le(), GuestAddress(addr)).expect("type");
        mem.write_obj(0u32, GuestAddress(addr + 4)).expect("ioprio");
        mem.write_obj(sector.to_le(), GuestAddress(addr + 8))
            .expect("sector");
    }

    fn run(
        mem: &GuestMemoryMmap<()>,
        descs: &[RawDescriptor],
        read_only: bool,
    ) -> Result<Request, Rejected> {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(descs).expect("chain");
        parse(chain, mem, &limits(read_only), &mut Scratch::default())
    }

    fn rejected(r: Result<Request, Rejected>) -> Rejected {
        match r {
            Ok(req) => panic!("expected a rejection, got {req:?}"),
            Err(r) => r,
        }
    }

    #[test]
    fn read_request() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 8);
        let req = run(&m, &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)], false).expect("valid");
        assert_eq!(
            req.kind,
            Kind::Read {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(req.used_len, 4097);
        assert_eq!(req.status, GuestAddress(STATUS));
        assert_eq!(req.iovecs.len(), 1);
        assert_eq!(req.iovecs[0].iov_len, 4096);
    }

    #[test]
    fn write_request_with_header_split_and_data_across_regions() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_OUT, 2);
        // Header in two 8-byte pieces; data straddles the region boundary.
        let req = run(
            &m,
            &[
                rd(HDR, 8),
                rd(HDR + 8, 8),
                rd(REGION - 512, 1024),
                wr(STATUS, 1),
            ],
            false,
        )
        .expect("valid");
        assert_eq!(
            req.kind,
            Kind::Write {
                offset: 1024,
                len: 1024
            }
        );
        assert_eq!(req.iovecs.len(), 2, "one iovec per memory region");
        assert_eq!(req.used_len, 1);
    }

    /// Before: SEG_MAX and SIZE_MAX were advertised but not enforced, so a guest could
    /// make every request carry thousands of segments of any size.
    #[test]
    fn seg_max_and_size_max_are_enforced() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        // 4 data segments (the limit): fine.
        let four: Vec<RawDescriptor> = std::iter::once(rd(HDR, 16))
            .chain((0..4).map(|i| wr(DATA + i * 512, 512)))
            .chain(std::iter::once(wr(STATUS, 1)))
            .collect();
        assert!(run(&m, &four, false).is_ok());
        // 5: refused, with the status byte still found and written.
        let five: Vec<RawDescriptor> = std::iter::once(rd(HDR, 16))
            .chain((0..5).map(|i| wr(DATA + i * 512, 512)))
            .chain(std::iter::once(wr(STATUS, 1)))
            .collect();
        let r = rejected(run(&m, &five, false));
        assert_eq!(r.error, RequestError::TooManySegments { n: 7, max: 4 });
        assert_eq!(r.status, Some(GuestAddress(STATUS)));
        // One segment over SIZE_MAX (8 KiB here); a header or status byte on top is not.
        let r = rejected(run(
            &m,
            &[rd(HDR, 16), wr(DATA, 8192 + 512), wr(STATUS, 1)],
            false,
        ));
        assert_eq!(
            r.error,
            RequestError::SegmentTooLarge {
                len: 8704,
                max: 8192
            }
        );
        assert!(run(&m, &[rd(HDR, 16), wr(DATA, 8192 + 1)], false).is_ok());
    }

    #[test]
    fn data_and_status_in_one_descriptor() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let req = run(&m, &[rd(HDR, 16), wr(DATA, 513)], false).expect("valid");
        assert_eq!(
            req.kind,
            Kind::Read {
                offset: 0,
                len: 512
            }
        );
        assert_eq!(req.status, GuestAddress(DATA + 512));
    }

    #[test]
    fn descriptor_outside_guest_memory() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let r = rejected(run(
            &m,
            &[rd(HDR, 16), wr(0x100_0000, 512), wr(STATUS, 1)],
            false,
        ));
        assert!(
            matches!(r.error, RequestError::DescOutOfBounds { .. }),
            "{r:?}"
        );
        assert_eq!(r.status, Some(GuestAddress(STATUS)));
        assert_eq!(r.error.status(), VIRTIO_BLK_S_IOERR as u8);

        // A buffer that starts inside memory and runs off its end.
        let r = rejected(run(
            &m,
            &[rd(HDR, 16), wr(2 * REGION - 512, 1024), wr(STATUS, 1)],
            false,
        ));
        assert!(
            matches!(r.error, RequestError::DescOutOfBounds { .. }),
            "{r:?}"
        );
    }

    #[test]
    fn header_outside_guest_memory() {
        let m = mem();
        let r = rejected(run(&m, &[rd(0x100_0000, 16), wr(STATUS, 1)], false));
        assert!(
            matches!(r.error, RequestError::DescOutOfBounds { .. }),
            "{r:?}"
        );
    }

    #[test]
    fn status_outside_guest_memory_has_no_status() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let r = rejected(run(&m, &[rd(HDR, 16), wr(0x100_0000, 1)], false));
        assert!(
            matches!(r.error, RequestError::DescOutOfBounds { .. }),
            "{r:?}"
        );
        assert_eq!(r.status, None);
    }

    #[test]
    fn readable_after_writable_is_wrong_direction() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let r = rejected(run(
            &m,
            &[rd(HDR, 16), wr(DATA, 512), rd(DATA, 512), wr(STATUS, 1)],
            false,
        ));
        assert_eq!(r.error, RequestError::WrongDirection);
    }

    #[test]
    fn write_data_in_writable_descriptor_is_not_written() {
        // A WRITE whose data sits in a device-writable buffer has no data-out: it is a
        // zero-length write and the buffer is never read as data.
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let req = run(&m, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], false).expect("valid");
        assert_eq!(req.kind, Kind::Write { offset: 0, len: 0 });
        assert!(req.iovecs.is_empty());
    }

    #[test]
    fn short_header() {
        let m = mem();
        let r = rejected(run(&m, &[rd(HDR, 8), wr(STATUS, 1)], false));
        assert_eq!(r.error, RequestError::ShortHeader(8));
        assert_eq!(r.status, Some(GuestAddress(STATUS)));
    }

    #[test]
    fn missing_status() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let r = rejected(run(&m, &[rd(HDR, 16)], false));
        assert_eq!(r.error, RequestError::MissingStatus);
        assert_eq!(r.status, None);
        // A zero-length writable descriptor is no status either.
        let r = rejected(run(&m, &[rd(HDR, 16), wr(STATUS, 0)], false));
        assert_eq!(r.error, RequestError::MissingStatus);
    }

    #[test]
    fn beyond_capacity() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, CAPACITY - 1);
        let r = rejected(run(
            &m,
            &[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)],
            false,
        ));
        assert!(
            matches!(r.error, RequestError::BeyondCapacity { .. }),
            "{r:?}"
        );
        // The last sector itself is fine.
        let req = run(&m, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], false).expect("valid");
        assert_eq!(
            req.kind,
            Kind::Read {
                offset: (CAPACITY - 1) * 512,
                len: 512
            }
        );
    }

    #[test]
    fn sector_overflow() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_OUT, u64::MAX - 1);
        let r = rejected(run(
            &m,
            &[rd(HDR, 16), rd(DATA, 4096), wr(STATUS, 1)],
            false,
        ));
        assert!(
            matches!(r.error, RequestError::BeyondCapacity { .. }),
            "{r:?}"
        );
    }

    #[test]
    fn partial_sector_length() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        let r = rejected(run(&m, &[rd(HDR, 16), wr(DATA, 100), wr(STATUS, 1)], false));
        assert!(matches!(r.error, RequestError::BadLength(_)), "{r:?}");
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let r = rejected(run(
            &m,
            &[rd(HDR, 16), rd(DATA, 1000), wr(STATUS, 1)],
            false,
        ));
        assert!(matches!(r.error, RequestError::BadLength(_)), "{r:?}");
    }

    #[test]
    fn write_to_read_only_device() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
        let r = rejected(run(&m, &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)], true));
        assert_eq!(r.error, RequestError::ReadOnly);
        assert_eq!(r.error.status(), VIRTIO_BLK_S_IOERR as u8);
        for ty in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            header(&m, HDR, ty, 0);
            let r = rejected(run(&m, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], true));
            assert_eq!(r.error, RequestError::ReadOnly);
        }
        // Reads still work.
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        run(&m, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], true).expect("read on RO");
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let m = mem();
        header(&m, HDR, 0xdead, 0);
        let r = rejected(run(&m, &[rd(HDR, 16), wr(STATUS, 1)], false));
        assert_eq!(r.error, RequestError::Unsupported(0xdead));
        assert_eq!(r.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn get_id_is_capped_at_20_bytes() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let req = run(&m, &[rd(HDR, 16), wr(DATA, 64), wr(STATUS, 1)], false).expect("valid");
        assert_eq!(req.kind, Kind::GetId);
        assert_eq!(req.used_len, 21);
    }

    fn segment(mem: &GuestMemoryMmap<()>, addr: u64, sector: u64, n: u32, flags: u32) {
        mem.write_obj(sector.to_le(), GuestAddress(addr))
            .expect("seg");
        mem.write_obj(n.to_le(), GuestAddress(addr + 8))
            .expect("seg");
        mem.write_obj(flags.to_le(), GuestAddress(addr + 12))
            .expect("seg");
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        segment(&m, DATA, 8, 16, 0);
        segment(&m, DATA + 16, 100, 1, 0);
        let req = run(&m, &[rd(HDR, 16), rd(DATA, 32), wr(STATUS, 1)], false).expect("valid");
        assert_eq!(
            req.kind,
            Kind::Discard(vec![
                Range {
                    offset: 4096,
                    len: 8192
                },
                Range {
                    offset: 51200,
                    len: 512
                }
            ])
        );

        header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&m, DATA, 0, 8, WRITE_ZEROES_FLAG_UNMAP);
        let req = run(&m, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], false).expect("valid");
        assert_eq!(
            req.kind,
            Kind::WriteZeroes {
                ranges: vec![Range {
                    offset: 0,
                    len: 4096
                }],
                unmap: true
            }
        );
    }

    #[test]
    fn bad_discard_segments() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        // The unmap flag is not allowed on discard.
        segment(&m, DATA, 0, 8, WRITE_ZEROES_FLAG_UNMAP);
        let r = rejected(run(&m, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], false));
        assert!(matches!(r.error, RequestError::Unsupported(_)), "{r:?}");
        // Beyond capacity.
        segment(&m, DATA, CAPACITY, 1, 0);
        let r = rejected(run(&m, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], false));
        assert!(
            matches!(r.error, RequestError::BeyondCapacity { .. }),
            "{r:?}"
        );
        // Not a whole segment, and more segments than advertised.
        let r = rejected(run(&m, &[rd(HDR, 16), rd(DATA, 15), wr(STATUS, 1)], false));
        assert!(matches!(r.error, RequestError::BadLength(_)), "{r:?}");
        let r = rejected(run(
            &m,
            &[rd(HDR, 16), rd(DATA, 16 * 5), wr(STATUS, 1)],
            false,
        ));
        assert!(matches!(r.error, RequestError::BadLength(_)), "{r:?}");
        // No segment at all.
        let r = rejected(run(&m, &[rd(HDR, 16), wr(STATUS, 1)], false));
        assert!(matches!(r.error, RequestError::BadLength(_)), "{r:?}");
    }

    #[test]
    fn too_many_iovecs() {
        // readv takes at most 1024 pieces; a chain that needs more is refused, not split.
        let m = mem();
        let segs: Vec<Seg> = (0..1025)
            .map(|i| Seg {
                addr: GuestAddress(DATA + i * 16),
                len: 16,
            })
            .collect();
        let mut out = Vec::new();
        let err = host_iovecs(&m, &segs, 0, 1025 * 16, &mut out).expect_err("too many");
        assert!(matches!(err, RequestError::BadLength(_)), "{err:?}");
        out.clear();
        host_iovecs(&m, &segs[..1024], 0, 1024 * 16, &mut out).expect("1024 is fine");
        assert_eq!(out.len(), 1024);
    }
}
