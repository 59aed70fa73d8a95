//! Turning a descriptor chain into a checked block request.
//!
//! Everything here is hostile input: addresses, lengths, directions and the header are
//! validated before any I/O is issued. The chain is treated as a byte stream (the spec
//! forbids the device from assuming a framing): the device-readable part is the 16-byte
//! header followed by data-out, the device-writable part is data-in followed by the status
//! byte, which is the last writable byte of the chain.

use std::sync::atomic::AtomicU64;

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
            RequestError::BadLength(_) => &s.err_bad_length,
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
        skip = 0;
        len -= take;
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

/// Validate one chain against `mem` (the memory it was popped from) and the device limits.
pub fn parse<M>(chain: DescriptorChain<&M>, mem: &M, limits: &Limits) -> Result<Request, Rejected>
where
    M: GuestMemoryBackend + GuestMemory,
{
    let head = chain.head_index();
    let mut readable: Vec<Seg> = Vec::new();
    let mut writable: Vec<Seg> = Vec::new();
    let mut read_bytes = 0u64;
    let mut write_bytes = 0u64;
    let mut wrong_direction = false;

    for desc in chain {
        let seg = Seg {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        };
        if seg.len == 0 {
            continue;
        }
        if desc.is_write_only() {
            write_bytes += seg.len;
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                wrong_direction = true;
            }
            read_bytes += seg.len;
            readable.push(seg);
        }
    }

    // The status byte: the last writable byte, if it lies in guest memory.
    let status = writable.last().and_then(|s| {
        let addr = s.addr.checked_add(s.len - 1)?;
        GuestMemoryBackend::check_range(mem, addr, 1).then_some(addr)
    });
    let Some(status) = status else {
        let error = match writable.last() {
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
    if read_bytes < HEADER_LEN as u64 {
        return Err(reject(RequestError::ShortHeader(read_bytes)));
    }

    let mut hdr = [0u8; HEADER_LEN];
    gather(mem, &readable, 0, &mut hdr).map_err(reject)?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let data_out = read_bytes - HEADER_LEN as u64;
    let data_in = write_bytes - 1;
    let mut iovecs = Vec::new();

    let (kind, used_len) = match req_type {
        VIRTIO_BLK_T_IN => {
            if !data_in.is_multiple_of(SECTOR_SIZE) {
                return Err(reject(RequestError::BadLength(
                    "read is not a whole number of sectors",
                )));
            }
            let offset = check_range(limits, sector, data_in).map_err(reject)?;
            host_iovecs(mem, &writable, 0, data_in, &mut iovecs).map_err(reject)?;
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
            host_iovecs(mem, &readable, HEADER_LEN as u64, data_out, &mut iovecs)
                .map_err(reject)?;
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
            host_iovecs(mem, &writable, 0, n, &mut iovecs).map_err(reject)?;
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
                &readable,
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
