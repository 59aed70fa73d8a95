//! The one copy: from the source guest's TX buffers straight into a destination guest's RX
//! buffers, with the 802.1Q tag inserted or stripped on the way.

use super::frame::{tag_bytes, MACS_LEN, VLAN_HLEN};
use super::guest::HostRange;

/// Ask the CPU to start loading the cache line at `p`. Issued for a whole batch before it
/// is processed, so the lines of all its frames and buffers arrive together instead of one
/// miss after the other.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and reads nothing, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p.cast::<i8>(), core::arch::x86_64::_MM_HINT_T0)
    };
}

/// Like [`prefetch`], for a line about to be written: `prefetchw` fetches it exclusive, so
/// the copy's stores into a buffer the other side last touched do not each wait for the
/// line's ownership to move. CPUs without PREFETCHW execute the opcode as a no-op.
#[inline(always)]
pub fn prefetch_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and reads nothing, whatever the address;
    // it touches no register but its address operand, and no flags.
    unsafe {
        core::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
    };
}

/// How a frame is written to an egress port, relative to how it arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Bytes as they came.
    AsIs,
    /// Remove the 802.1Q tag.
    Strip,
    /// Insert a tag for this VLAN.
    Insert(u16),
}

impl Egress {
    /// The length on the wire of a frame of `len` bytes leaving this way (a tagged frame
    /// is at least a tag longer than the MACs).
    pub fn frame_len(self, len: usize) -> usize {
        match self {
            Egress::AsIs => len,
            Egress::Strip => len.saturating_sub(VLAN_HLEN),
            Egress::Insert(_) => len + VLAN_HLEN,
        }
    }

    /// Bytes the edit adds before the frame's L3 header (a tag's worth, either way): what
    /// an offload request's offsets move by.
    pub fn delta(self) -> isize {
        match self {
            Egress::AsIs => 0,
            Egress::Strip => -(VLAN_HLEN as isize),
            Egress::Insert(_) => VLAN_HLEN as isize,
        }
    }
}

/// One piece of the byte stream written to the destination.
#[derive(Clone, Copy, Debug)]
pub enum Piece {
    Guest(HostRange),
    Inline { bytes: [u8; 12], len: usize },
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Guest(r) => r.len,
            Piece::Inline { len, .. } => *len,
        }
    }
}

/// Append to `out` the pieces of `frame` (the source ranges) for `egress`, after `prefix`
/// (the virtio-net header written to the destination). Returns the length of what was
/// appended.
///
/// Inlined so that `prefix` is stored straight into `out`: passed in memory, it was built
/// with narrow stores and reloaded with 16-byte loads, which wait for such stores to
/// retire.
#[inline(always)]
pub fn plan(frame: &[HostRange], egress: Egress, prefix: Piece, out: &mut Vec<Piece>) -> usize {
    let first = out.len();
    out.push(prefix);
    // Byte offsets in the source frame where the edit happens.
    let (cut_from, cut_to, insert) = match egress {
        Egress::AsIs => (usize::MAX, usize::MAX, None),
        Egress::Strip => (MACS_LEN, MACS_LEN + VLAN_HLEN, None),
        Egress::Insert(vid) => (MACS_LEN, MACS_LEN, Some(tag_bytes(vid))),
    };
    let mut pos = 0usize;
    let mut inserted = false;
    for r in frame {
        let (start, end) = (pos, pos + r.len);
        pos = end;
        let piece_at = |from: usize, to: usize, out: &mut Vec<Piece>| {
            if to > from {
                out.push(Piece::Guest(HostRange {
                    // SAFETY: from..to lies within this range (start <= from <= to <= end).
                    ptr: unsafe { r.ptr.add(from - start) },
                    len: to - from,
                }));
            }
        };
        if end <= cut_from || start >= cut_to && (inserted || insert.is_none()) {
            piece_at(start, end, out);
            continue;
        }
        // This range contains the edit point.
        piece_at(start, cut_from.max(start).min(end), out);
        if let (Some(tag), false) = (insert, inserted) {
            if cut_from <= end {
                let mut bytes = [0u8; 12];
                bytes[..VLAN_HLEN].copy_from_slice(&tag);
                out.push(Piece::Inline {
                    bytes,
                    len: VLAN_HLEN,
                });
                inserted = true;
            }
        }
        piece_at(cut_to.max(start).min(end), end, out);
    }
    out[first..].iter().map(Piece::len).sum()
}

/// Copy `pieces` into `dest` in order, filling each destination range before the next
/// (the caller sized `dest` to hold everything).
///
/// # Safety
/// Every range in `pieces` and `dest` must be valid host memory for its length for the
/// duration of the call.
pub unsafe fn copy(pieces: &[Piece], dest: &[HostRange]) {
    let mut d = 0usize;
    let mut d_off = 0usize;
    for p in pieces {
        let (mut src, mut left) = match p {
            Piece::Guest(r) => (r.ptr.cast_const(), r.len),
            Piece::Inline { bytes, len } => (bytes.as_ptr(), *len),
        };
        while left > 0 && d < dest.len() {
            let room = dest[d].len - d_off;
            let n = room.min(left);
            // SAFETY: the caller guarantees both ranges; `ptr::copy` tolerates a guest that
            // made its TX and RX buffers overlap.
            unsafe { std::ptr::copy(src, dest[d].ptr.add(d_off), n) };
            // SAFETY: n <= left, so the pointer stays within (or one past) the source.
            src = unsafe { src.add(n) };
            left -= n;
            d_off += n;
            if d_off == dest[d].len {
                d += 1;
                d_off = 0;
            }
        }
    }
}

/// Copy the first `out.len()` bytes of `ranges` into `out`; returns how many there were.
pub fn gather(ranges: &[HostRange], out: &mut [u8]) -> usize {
    gather_at(ranges, 0, out)
}

/// Copy `out.len()` bytes of `ranges` from byte `offset` on into `out`; returns how many
/// there were.
pub fn gather_at(ranges: &[HostRange], mut offset: usize, out: &mut [u8]) -> usize {
    let mut done = 0;
    for r in ranges {
        if done == out.len() {
            break;
        }
        if offset >= r.len {
            offset -= r.len;
            continue;
        }
        let n = (r.len - offset).min(out.len() - done);
        // SAFETY: `r` is a validated range of guest memory (or switch memory), held by the
        // caller, and offset + n <= r.len; `out` has room for n more bytes.
        unsafe { std::ptr::copy(r.ptr.add(offset).cast_const(), out[done..].as_mut_ptr(), n) };
        offset = 0;
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(frame: &mut [Vec<u8>], egress: Egress, dest_sizes: &[usize]) -> Vec<u8> {
        let ranges: Vec<HostRange> = frame
            .iter_mut()
            .map(|v| HostRange {
                ptr: v.as_mut_ptr(),
                len: v.len(),
            })
            .collect();
        let mut hdr = [0u8; 12];
        hdr[10] = 1;
        let prefix = Piece::Inline {
            bytes: hdr,
            len: 12,
        };
        let mut pieces = Vec::new();
        let total = plan(&ranges, egress, prefix, &mut pieces);
        let mut bufs: Vec<Vec<u8>> = dest_sizes.iter().map(|&n| vec![0xaa; n]).collect();
        let dest: Vec<HostRange> = bufs
            .iter_mut()
            .map(|v| HostRange {
                ptr: v.as_mut_ptr(),
                len: v.len(),
            })
            .collect();
        // SAFETY: all ranges are live Vecs owned by this test.
        unsafe { copy(&pieces, &dest) };
        let out: Vec<u8> = bufs.concat();
        assert!(
            out[total..].iter().all(|&b| b == 0xaa),
            "nothing past the frame"
        );
        out[..total].to_vec()
    }

    fn frame(tag: Option<u16>) -> Vec<u8> {
        let mut f: Vec<u8> = (0..12).collect();
        if let Some(v) = tag {
            f.extend_from_slice(&tag_bytes(v));
        }
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend((0..50).map(|i| 100 + i as u8));
        f
    }

    fn split(f: Vec<u8>, at: &[usize]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut prev = 0;
        for &a in at.iter().chain(std::iter::once(&f.len())) {
            out.push(f[prev..a].to_vec());
            prev = a;
        }
        out
    }

    #[test]
    fn as_is_insert_strip_any_split() {
        for cuts in [
            vec![],
            vec![5],
            vec![12],
            vec![13],
            vec![14, 15],
            vec![3, 12, 16, 20],
        ] {
            let mut src = split(frame(None), &cuts);
            let out = run(&mut src, Egress::AsIs, &[2000]);
            assert_eq!(&out[12..], &frame(None)[..], "as-is, cuts {cuts:?}");
            assert_eq!(out[10], 1, "header first");

            let mut src = split(frame(None), &cuts);
            let out = run(&mut src, Egress::Insert(10), &[40, 40]);
            assert_eq!(&out[12..], &frame(Some(10))[..], "insert, cuts {cuts:?}");

            let mut src = split(frame(Some(10)), &cuts);
            let out = run(&mut src, Egress::Strip, &[7, 100]);
            assert_eq!(&out[12..], &frame(None)[..], "strip, cuts {cuts:?}");
        }
    }
}
