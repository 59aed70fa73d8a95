//! The offloads done in software, for a receiver that did not negotiate them (and for the
//! switch's own service endpoint): finishing a checksum the sender left open, and cutting
//! a TCP segmentation request into frames that each fit the MTU. Works on the switch's own
//! copy of the frame, never on guest memory, so whatever the sender does to its buffer
//! meanwhile, the frames made are consistent with the copy.

use std::ops::Range;

use super::frame::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HLEN, TPID_8021Q, VLAN_HLEN};
use super::guest::HostRange;
use super::vnet::{Offload, GSO_ECN, GSO_TCPV6};

const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// The most L2, IP and TCP header bytes a segmentation request may have: Ethernet with a
/// tag, IPv4 with options (IPv6 is shorter), TCP with options.
pub const MAX_TCP_HEADERS: usize = ETH_HLEN + VLAN_HLEN + 60 + 60;

/// Why a frame could not be checksummed or segmented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    #[error("checksum field outside the frame")]
    CsumOutOfFrame,
    #[error("segmentation request for a frame that is not {0}")]
    NotTcp(&'static str),
    #[error("IP version {0} in a segmentation request for the other one")]
    IpVersion(u8),
    #[error("IPv4 header length {0}")]
    Ipv4HeaderLength(usize),
    #[error("segmentation request for an IPv4 fragment")]
    Fragment,
    #[error("TCP header of {0} bytes")]
    TcpHeaderLength(usize),
    #[error("headers cut short")]
    Truncated,
    #[error("TCP header at {found}, not at the checksum start {said}")]
    HeaderMoved { found: usize, said: usize },
    #[error("segment size 0")]
    ZeroSegmentSize,
    #[error("headers of {found} bytes where {said} were read before")]
    HeadersChanged { found: usize, said: usize },
}

/// Where a TCP frame's headers end: the L3 header at `l2`, TCP at `l4`, payload at `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpHeaders {
    pub l2: usize,
    pub l4: usize,
    pub end: usize,
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

/// Parse the headers of a TCP frame over IPv4, or IPv6 if `v6` (with one tag or none, no
/// IPv6 extension headers, no IPv4 fragment), from its first bytes.
pub fn tcp_headers(frame: &[u8], v6: bool) -> Result<TcpHeaders, GsoError> {
    let want = if v6 { "IPv6 TCP" } else { "IPv4 TCP" };
    let l2 = if frame.len() >= ETH_HLEN + VLAN_HLEN && be16(frame, 12) == TPID_8021Q {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    };
    if frame.len() < l2 + if v6 { 40 } else { 20 } {
        return Err(GsoError::Truncated);
    }
    let ip = &frame[l2..];
    let (ethertype, version) = (be16(frame, l2 - 2), ip[0] >> 4);
    if ethertype != if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 } {
        return Err(GsoError::NotTcp(want));
    }
    if version != if v6 { 6 } else { 4 } {
        return Err(GsoError::IpVersion(version));
    }
    let l4 = if v6 {
        // Extension headers are not followed: the TCP header must come right after.
        if ip[6] != IPPROTO_TCP {
            return Err(GsoError::NotTcp(want));
        }
        l2 + 40
    } else {
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ihl < 20 {
            return Err(GsoError::Ipv4HeaderLength(ihl));
        }
        if ip[9] != IPPROTO_TCP {
            return Err(GsoError::NotTcp(want));
        }
        if be16(ip, 6) & 0x3fff != 0 {
            return Err(GsoError::Fragment);
        }
        l2 + ihl
    };
    let doff = frame.get(l4 + 12).ok_or(GsoError::Truncated)?;
    let tcp_len = usize::from(doff >> 4) * 4;
    if tcp_len < 20 {
        return Err(GsoError::TcpHeaderLength(tcp_len));
    }
    let end = l4 + tcp_len;
    if end > frame.len() {
        return Err(GsoError::Truncated);
    }
    Ok(TcpHeaders { l2, l4, end })
}

/// The frames the switch makes, in one byte arena kept from batch to batch (and trimmed
/// back after a batch that needed a lot of it).
#[derive(Default)]
pub struct Pool {
    bytes: Vec<u8>,
    /// Each frame's offset and length in `bytes`.
    frames: Vec<(usize, usize)>,
}

/// Arena bytes kept across a reset.
const POOL_KEEP: usize = 1 << 20;

impl Pool {
    pub fn reset(&mut self) {
        self.frames.clear();
        self.bytes.clear();
        self.bytes.shrink_to(POOL_KEEP);
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frame `i` as a range: valid until the pool next changes.
    pub fn range(&mut self, i: usize) -> HostRange {
        let (at, len) = self.frames[i];
        HostRange {
            ptr: self.bytes[at..].as_mut_ptr(),
            len,
        }
    }

    pub fn frame(&self, i: usize) -> &[u8] {
        let (at, len) = self.frames[i];
        &self.bytes[at..at + len]
    }

    /// Append a frame made of `parts`; returns it to be finished in place.
    fn push(&mut self, parts: &[&[u8]]) -> &mut [u8] {
        let at = self.bytes.len();
        for p in parts {
            self.bytes.extend_from_slice(p);
        }
        self.frames.push((at, self.bytes.len() - at));
        &mut self.bytes[at..]
    }

    /// Forget the frames from `first` on.
    fn truncate(&mut self, first: usize) {
        if let Some(&(at, _)) = self.frames.get(first) {
            self.bytes.truncate(at);
            self.frames.truncate(first);
        }
    }
}

/// Make the frames that `frame` (the switch's copy, `off` its checked request) stands for,
/// with every checksum done, into `pool`; returns their indices there. On an error, what
/// was made for it is taken back.
pub fn resolve(frame: &[u8], off: &Offload, pool: &mut Pool) -> Result<Range<usize>, GsoError> {
    let first = pool.len();
    let made = if off.is_gso() {
        segment(frame, off, pool)
    } else {
        finish_csum(pool.push(&[frame]), off)
    };
    match made {
        Ok(()) => Ok(first..pool.len()),
        Err(e) => {
            pool.truncate(first);
            Err(e)
        }
    }
}

/// Store the checksum a sender left open: the one's complement sum from `csum_start` to
/// the end (the field holds the pseudo-header's sum), at `csum_start + csum_offset`.
fn finish_csum(frame: &mut [u8], off: &Offload) -> Result<(), GsoError> {
    let start = usize::from(off.csum_start);
    let at = start + usize::from(off.csum_offset);
    if at + 2 > frame.len() {
        return Err(GsoError::CsumOutOfFrame);
    }
    let mut sum = !fold(sum(&frame[start..], 0));
    // UDP (the field 6 bytes in) gives 0 the meaning "no checksum": send all ones, which
    // is the same one's complement value.
    if sum == 0 && off.csum_offset == 6 {
        sum = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The one's complement sum of `b` as big-endian 16-bit words (an odd last byte padded),
/// added to `acc`, unfolded: 32-bit words at a time, which folds to the same.
fn sum(b: &[u8], mut acc: u64) -> u64 {
    let mut words = b.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Cut a TCP segmentation request into frames of at most `gso_size` payload bytes each,
/// as the sender's NIC would: the headers copied to each, IP lengths and IDs, TCP sequence
/// numbers, FIN/PSH on the last only, CWR on the first only, every checksum computed.
fn segment(frame: &[u8], off: &Offload, pool: &mut Pool) -> Result<(), GsoError> {
    let v6 = off.gso_type & !GSO_ECN == GSO_TCPV6;
    let TcpHeaders { l2, l4, end } = tcp_headers(frame, v6)?;
    if l4 != usize::from(off.csum_start) {
        return Err(GsoError::HeaderMoved {
            found: l4,
            said: off.csum_start.into(),
        });
    }
    if end != usize::from(off.hdr_len) {
        return Err(GsoError::HeadersChanged {
            found: end,
            said: off.hdr_len.into(),
        });
    }
    let (headers, payload) = frame.split_at(end);
    let seq = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
    let ip_id = be16(frame, l2 + 4);
    let tcp_flags = frame[l4 + 13];
    let mss = usize::from(off.gso_size);
    if mss == 0 {
        return Err(GsoError::ZeroSegmentSize);
    }
    let count = payload.len().div_ceil(mss);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let b = pool.push(&[headers, chunk]);
        let ip = l2;
        if v6 {
            let plen = (b.len() - ip - 40) as u16;
            b[ip + 4..ip + 6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let tot = (b.len() - ip) as u16;
            b[ip + 2..ip + 4].copy_from_slice(&tot.to_be_bytes());
            b[ip + 4..ip + 6].copy_from_slice(&ip_id.wrapping_add(i as u16).to_be_bytes());
            b[ip + 10..ip + 12].fill(0);
            let c = !fold(sum(&b[ip..l4], 0));
            b[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
        }
        let s = seq.wrapping_add((i * mss) as u32);
        b[l4 + 4..l4 + 8].copy_from_slice(&s.to_be_bytes());
        let mut flags = tcp_flags;
        if i + 1 < count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        b[l4 + 13] = flags;
        // The pseudo-header: addresses, protocol, TCP length.
        let tcp_len = b.len() - l4;
        let addrs = if v6 {
            &b[ip + 8..ip + 40]
        } else {
            &b[ip + 12..ip + 20]
        };
        let pseudo = sum(addrs, u64::from(IPPROTO_TCP) + tcp_len as u64);
        b[l4 + 16..l4 + 18].fill(0);
        let c = !fold(sum(&b[l4..], pseudo));
        b[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    }
    Ok(())
}

/// Frames as guests' kernels hand them over, and a checksum check, for tests here and in
/// the datapath.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::wire::vnet::{F_NEEDS_CSUM, GSO_TCPV4};

    /// Whether a TCP frame's IP and TCP checksums are right.
    pub fn tcp_checksum_ok(frame: &[u8]) -> bool {
        let l2 = if be16(frame, 12) == TPID_8021Q {
            18
        } else {
            14
        };
        let (l4, addrs) = if be16(frame, l2 - 2) == ETHERTYPE_IPV4 {
            let ihl = usize::from(frame[l2] & 0x0f) * 4;
            if fold(sum(&frame[l2..l2 + ihl], 0)) != 0xffff {
                return false;
            }
            (l2 + ihl, &frame[l2 + 12..l2 + 20])
        } else {
            (l2 + 40, &frame[l2 + 8..l2 + 40])
        };
        let pseudo = sum(addrs, u64::from(IPPROTO_TCP) + (frame.len() - l4) as u64);
        fold(sum(&frame[l4..], pseudo)) == 0xffff
    }

    const MAC: [u8; 12] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];

    /// A TCP frame as a guest's kernel hands it over for offload: the checksum field holds
    /// the pseudo-header's sum (folded, not complemented), lengths cover the whole payload.
    pub fn tcp_frame(v6: bool, tagged: bool, payload: usize, flags: u8) -> (Vec<u8>, Offload) {
        let mut f = MAC.to_vec();
        if tagged {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 10]);
        }
        let l2 = f.len() + 2;
        let tcp_hlen = 32; // with 12 bytes of options, as Linux sends (timestamps)
        if v6 {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&((tcp_hlen + payload) as u16).to_be_bytes());
            ip.extend_from_slice(&[IPPROTO_TCP, 64]);
            ip.extend((0..32).map(|i| i as u8));
            f.extend_from_slice(&ip);
        } else {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let tot = (20 + tcp_hlen + payload) as u16;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&tot.to_be_bytes());
            ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
            ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
            let c = !fold(sum(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        let l4 = f.len();
        let mut tcp = vec![0x9c, 0x40, 0x13, 0x89, 0, 0, 0x10, 0, 0, 0, 0, 1];
        tcp.push(((tcp_hlen / 4) as u8) << 4);
        tcp.push(flags);
        tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        f.extend_from_slice(&tcp);
        f.extend((0..payload).map(|i| (i * 7) as u8));
        let addrs = if v6 {
            &f[l2 + 8..l2 + 40]
        } else {
            &f[l2 + 12..l2 + 20]
        };
        let pseudo = fold(sum(addrs, 6 + (tcp_hlen + payload) as u64));
        f[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        let off = Offload {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: 0,
            gso_size: 1000,
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        (f, off)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{tcp_checksum_ok, tcp_frame};
    use super::*;
    use crate::wire::vnet::{Offloads, GSO_NONE};

    const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };

    #[test]
    fn segments_carry_the_stream_with_valid_headers() {
        for (v6, tagged) in [(false, false), (true, false), (false, true), (true, true)] {
            let payload = 2500;
            let (f, off) = tcp_frame(v6, tagged, payload, TCP_PSH | TCP_FIN | TCP_CWR | 0x10);
            let l2 = if tagged { 18 } else { 14 };
            let off = off.check(ALL, f.len(), l2, 1500, 32).expect("request");
            let mut pool = Pool::default();
            let segs = resolve(&f, &off, &mut pool).expect("segmented");
            assert_eq!(segs.len(), 3, "1000 + 1000 + 500");
            let hdr = usize::from(off.hdr_len);
            let mut stream = Vec::new();
            for (i, k) in segs.clone().enumerate() {
                let s = pool.frame(k);
                assert!(tcp_checksum_ok(s), "v6 {v6} tagged {tagged} segment {i}");
                assert_eq!(s[..l2], f[..l2]);
                let l4 = usize::from(off.csum_start);
                let seq = u32::from_be_bytes([s[l4 + 4], s[l4 + 5], s[l4 + 6], s[l4 + 7]]);
                assert_eq!(seq, 0x1000 + 1000 * i as u32);
                let flags = s[l4 + 13];
                assert_eq!(flags & TCP_CWR != 0, i == 0);
                assert_eq!(flags & (TCP_FIN | TCP_PSH) != 0, i == 2);
                if v6 {
                    assert_eq!(usize::from(be16(s, l2 + 4)), s.len() - l2 - 40);
                } else {
                    assert_eq!(usize::from(be16(s, l2 + 2)), s.len() - l2);
                    assert_eq!(be16(s, l2 + 4), 0x1234 + i as u16);
                }
                stream.extend_from_slice(&s[hdr..]);
            }
            assert_eq!(stream, f[hdr..], "payload in order, nothing lost");
        }
    }

    #[test]
    fn checksum_only_requests_are_finished() {
        let (f, off) = tcp_frame(false, false, 300, 0x18);
        let off = Offload {
            gso_type: GSO_NONE,
            gso_size: 0,
            ..off
        };
        assert!(!tcp_checksum_ok(&f), "left open by the sender");
        let mut pool = Pool::default();
        let made = resolve(&f, &off, &mut pool).expect("finished");
        assert_eq!(made, 0..1);
        assert!(tcp_checksum_ok(pool.frame(0)));
        assert_eq!(pool.frame(0)[..50], f[..50]);
    }

    #[test]
    fn frames_that_disagree_with_their_request_are_refused() {
        let (f, off) = tcp_frame(false, false, 2500, 0x10);
        let off = off.check(ALL, f.len(), 14, 1500, 32).expect("request");
        let mut pool = Pool::default();
        let cases: Vec<(Vec<u8>, Offload, GsoError)> = vec![
            {
                // The TCP header grew after the switch read its length.
                let mut g = f.clone();
                g[usize::from(off.csum_start) + 12] = 0x50;
                (
                    g,
                    off,
                    GsoError::HeadersChanged {
                        found: 54,
                        said: 66,
                    },
                )
            },
            (
                f.clone(),
                Offload {
                    csum_start: 38,
                    ..off
                },
                GsoError::HeaderMoved {
                    found: 34,
                    said: 38,
                },
            ),
            {
                let mut g = f.clone();
                g[14] = 0x65;
                (g, off, GsoError::IpVersion(6))
            },
            {
                let mut g = f.clone();
                g[14 + 9] = 17;
                (g, off, GsoError::NotTcp("IPv4 TCP"))
            },
            {
                let mut g = f.clone();
                g[14 + 6] = 0x20; // more fragments
                (g, off, GsoError::Fragment)
            },
            (
                f.clone(),
                Offload {
                    gso_type: GSO_TCPV6,
                    ..off
                },
                GsoError::NotTcp("IPv6 TCP"),
            ),
            (f[..30].to_vec(), off, GsoError::Truncated),
            (f[..60].to_vec(), off, GsoError::Truncated),
        ];
        for (g, o, want) in cases {
            assert_eq!(resolve(&g, &o, &mut pool), Err(want));
            assert!(pool.is_empty(), "nothing left behind");
        }
    }
}
