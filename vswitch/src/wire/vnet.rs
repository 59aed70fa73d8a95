//! The virtio-net header in front of every frame in both directions, and the offloads it
//! carries: a checksum left for the device to finish (`NEEDS_CSUM`) and TCP segmentation
//! (`gso_type`), each allowed in one direction only when that side negotiated it.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};

/// virtio_net_hdr_v1: 12 bytes whenever VERSION_1 is negotiated.
pub const NET_HDR_LEN: usize = 12;

/// `flags`: the checksum from `csum_start` to the end is left to the receiver.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type` values (the ECN bit may be or-ed into the TCP ones).
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

/// The offload fields of one frame's header, in switch memory: read once from the sender,
/// checked by [`Offload::check`], then what every later step uses. `hdr_len` is not the
/// sender's (a hint drivers fill loosely) but the switch's: `csum_start` plus the TCP
/// header's length, read from the frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offload {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Which offloads one side of a port negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
}

/// Every offload feature a port offers, both directions.
pub const OFFLOAD_FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN;

impl Offloads {
    /// What the switch may receive from a guest that acked `features`.
    pub fn host(features: u64) -> Offloads {
        Offloads::acked(
            features,
            [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
            ],
        )
    }

    /// What a guest that acked `features` takes in received frames.
    pub fn guest(features: u64) -> Offloads {
        Offloads::acked(
            features,
            [
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
            ],
        )
    }

    /// One direction's offloads from the feature bits of its checksum, TSO4, TSO6 and ECN.
    fn acked(features: u64, [csum, tso4, tso6, ecn]: [u32; 4]) -> Offloads {
        let has = |bit: u32| features & (1 << bit) != 0;
        // Segmentation needs the checksum offload as well (the spec makes the one depend
        // on the other).
        let csum = has(csum);
        Offloads {
            csum,
            tso4: csum && has(tso4),
            tso6: csum && has(tso6),
            ecn: csum && has(ecn),
        }
    }

    /// Whether a frame with `off` may be given to this side as it is; otherwise the switch
    /// finishes its checksum or segments it first.
    #[inline(always)]
    pub fn takes(&self, off: &Offload) -> bool {
        if off.flags == 0 {
            return true;
        }
        let tso = match off.gso_type & !GSO_ECN {
            GSO_NONE => true,
            GSO_TCPV4 => self.tso4,
            GSO_TCPV6 => self.tso6,
            _ => false,
        };
        self.csum && tso && (off.gso_type & GSO_ECN == 0 || self.ecn)
    }
}

/// Why a frame's offload request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("checksum offload requested, but not negotiated")]
    CsumNotNegotiated,
    #[error("segmentation type {0:#x} requested, but not negotiated")]
    GsoNotNegotiated(u8),
    #[error("segmentation without a checksum offload")]
    GsoWithoutCsum,
    #[error("checksum at {start}+{offset} outside the {len}-byte frame")]
    CsumOutOfFrame { start: u16, offset: u16, len: usize },
    #[error("checksum from byte {start}, inside the Ethernet header")]
    CsumInL2Header { start: u16 },
    #[error("TCP segmentation with the checksum at offset {0}, not 16")]
    GsoCsumOffset(u16),
    #[error("TCP segmentation with the TCP header at {start}, inside the L2/L3 headers")]
    GsoHeaderStart { start: u16 },
    #[error("TCP header of {0} bytes")]
    TcpHeaderLength(usize),
    #[error("segment size 0")]
    ZeroGsoSize,
    #[error("segments of {0} bytes exceed the MTU")]
    SegmentOverMtu(usize),
    #[error("a {0}-byte frame is larger than an IP packet can be")]
    TooLarge(usize),
    #[error("{0} segments in one request, more than {MAX_GSO_SEGMENTS}")]
    TooManySegments(usize),
}

/// The most segments one request may stand for. Linux sends at most 45 at a 1500-byte MTU
/// (64 KiB), 122 at 576; the bound keeps the software segmentation a sender can ask for
/// per frame near the cost of the frame's own bytes.
pub const MAX_GSO_SEGMENTS: usize = 256;

impl Offload {
    /// The offload fields of a header a sender wrote (`num_buffers` is the receiver's).
    /// Flags other than NEEDS_CSUM mean nothing on transmit and are ignored; without that
    /// flag the checksum fields are ignored, and `hdr_len` always is (see [`Offload`]).
    #[inline(always)]
    pub fn from_header(h: &[u8; NET_HDR_LEN]) -> Offload {
        let le = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
        let flags = h[0] & F_NEEDS_CSUM;
        let gso_type = h[1];
        if flags == 0 && gso_type == GSO_NONE {
            return Offload::default();
        }
        Offload {
            flags,
            gso_type,
            hdr_len: 0,
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }

    /// Check a request against what the sender negotiated (`host`), the frame's `len` and
    /// its L2 header length (`l2`, with a tag if it has one), and the port's `mtu`.
    /// `tcp_hlen` is the length of the TCP header the caller found at `csum_start`, for a
    /// segmentation request.
    /// Returns the request as the switch keeps it: a segmentation request whose payload
    /// fits in one segment becomes a checksum request (receivers refuse such "GSO"
    /// frames).
    pub fn check(
        mut self,
        host: Offloads,
        len: usize,
        l2: usize,
        mtu: u16,
        tcp_hlen: usize,
    ) -> Result<Offload, OffloadError> {
        if self.flags == 0 && !self.is_gso() {
            return Ok(self);
        }
        if self.flags & F_NEEDS_CSUM != 0 {
            if !host.csum {
                return Err(OffloadError::CsumNotNegotiated);
            }
            let (start, offset) = (self.csum_start, self.csum_offset);
            if usize::from(start) + usize::from(offset) + 2 > len {
                return Err(OffloadError::CsumOutOfFrame { start, offset, len });
            }
            // Inside the L2 header, a tag edit would move the checksummed bytes.
            if usize::from(start) < l2 {
                return Err(OffloadError::CsumInL2Header { start });
            }
        }
        if !self.is_gso() {
            return Ok(self);
        }
        let negotiated = match self.gso_type & !GSO_ECN {
            GSO_TCPV4 => host.tso4,
            GSO_TCPV6 => host.tso6,
            _ => false,
        };
        if !negotiated || self.gso_type & GSO_ECN != 0 && !host.ecn {
            return Err(OffloadError::GsoNotNegotiated(self.gso_type));
        }
        if self.flags & F_NEEDS_CSUM == 0 {
            return Err(OffloadError::GsoWithoutCsum);
        }
        if self.csum_offset != 16 {
            return Err(OffloadError::GsoCsumOffset(self.csum_offset));
        }
        let v6 = self.gso_type & !GSO_ECN == GSO_TCPV6;
        // The smallest IP header (the caller matched it to the frame's).
        if usize::from(self.csum_start) < l2 + if v6 { 40 } else { 20 } {
            return Err(OffloadError::GsoHeaderStart {
                start: self.csum_start,
            });
        }
        if !(20..=60).contains(&tcp_hlen) {
            return Err(OffloadError::TcpHeaderLength(tcp_hlen));
        }
        if self.gso_size == 0 {
            return Err(OffloadError::ZeroGsoSize);
        }
        let hdr_len = usize::from(self.csum_start) + tcp_hlen;
        let segment = hdr_len - l2 + usize::from(self.gso_size);
        if segment > usize::from(mtu) {
            return Err(OffloadError::SegmentOverMtu(segment));
        }
        // IPv4's total length covers its header; IPv6's payload length does not.
        if len > l2 + 65535 + if v6 { 40 } else { 0 } {
            return Err(OffloadError::TooLarge(len));
        }
        if len <= hdr_len + usize::from(self.gso_size) {
            // One segment: what is left is the checksum.
            self.gso_type = GSO_NONE;
            self.gso_size = 0;
            return Ok(self);
        }
        let segments = (len - hdr_len).div_ceil(usize::from(self.gso_size));
        if segments > MAX_GSO_SEGMENTS {
            return Err(OffloadError::TooManySegments(segments));
        }
        self.hdr_len = hdr_len as u16;
        Ok(self)
    }

    /// The frames on the wire a frame of `len` bytes stands for, and their bytes: one, or
    /// each segment with its own copy of the headers.
    #[inline(always)]
    pub fn wire(&self, len: usize) -> (u64, u64) {
        let (hdr, mss) = (usize::from(self.hdr_len), usize::from(self.gso_size));
        if !self.is_gso() || mss == 0 || len <= hdr {
            return (1, len as u64);
        }
        let segments = (len - hdr).div_ceil(mss);
        (segments as u64, (len + (segments - 1) * hdr) as u64)
    }

    /// The same request for the frame with `delta` bytes inserted (+4) or removed (-4)
    /// before its L3 header: a tag edit.
    pub fn shifted(mut self, delta: isize) -> Offload {
        if self.flags != 0 {
            self.csum_start = self.csum_start.wrapping_add_signed(delta as i16);
        }
        if self.is_gso() {
            self.hdr_len = self.hdr_len.wrapping_add_signed(delta as i16);
        }
        self
    }

    /// The header the switch writes before a frame it delivers with this request (none,
    /// for most), spanning `num_buffers` receive chains.
    #[inline(always)]
    pub fn header(&self, num_buffers: u16) -> [u8; NET_HDR_LEN] {
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[0] = self.flags;
        hdr[1] = self.gso_type;
        hdr[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        hdr[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        hdr[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        hdr[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        hdr
    }
}

/// The header the switch writes before each frame it delivers with no offload, spanning
/// `num_buffers` receive chains.
#[inline(always)]
pub fn header(num_buffers: u16) -> [u8; NET_HDR_LEN] {
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    hdr
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };

    fn tso4(gso_size: u16) -> Offload {
        Offload {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 0,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    #[test]
    fn header_round_trip_and_ignored_fields() {
        let off = Offload {
            hdr_len: 54,
            ..tso4(1448)
        };
        let h = off.header(3);
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 3);
        // hdr_len is the switch's own, never the sender's.
        assert_eq!(Offload::from_header(&h), Offload { hdr_len: 0, ..off });
        let mut plain = header(1);
        plain[6] = 99; // checksum fields without the flag mean nothing
        plain[0] = 2; // DATA_VALID on transmit means nothing
        assert_eq!(Offload::from_header(&plain), Offload::default());
    }

    #[test]
    fn requests_are_checked_against_the_negotiation_and_the_frame() {
        let len = 14 + 20 + 20 + 4000;
        let ok = tso4(1448).check(ALL, len, 14, 1500, 20).expect("valid");
        assert_eq!(ok.hdr_len, 54);
        assert_eq!(ok.wire(len), (3, (len + 2 * 54) as u64));
        // A payload that fits one segment is only a checksum request.
        let one = tso4(4000).check(ALL, len, 14, 9000, 20).expect("valid");
        assert_eq!((one.gso_type, one.flags), (GSO_NONE, F_NEEDS_CSUM));
        assert_eq!(one.wire(len), (1, len as u64));

        let cases: Vec<(Offload, Offloads, u16, usize, OffloadError)> = vec![
            (
                tso4(1448),
                Offloads { tso4: false, ..ALL },
                1500,
                20,
                OffloadError::GsoNotNegotiated(GSO_TCPV4),
            ),
            (
                Offload {
                    gso_type: GSO_TCPV4 | GSO_ECN,
                    ..tso4(1448)
                },
                Offloads { ecn: false, ..ALL },
                1500,
                20,
                OffloadError::GsoNotNegotiated(GSO_TCPV4 | GSO_ECN),
            ),
            (
                Offload {
                    gso_type: 3, // UDP fragmentation (UFO): never offered
                    ..tso4(1448)
                },
                ALL,
                1500,
                20,
                OffloadError::GsoNotNegotiated(3),
            ),
            (
                tso4(1448),
                Offloads::default(),
                1500,
                20,
                OffloadError::CsumNotNegotiated,
            ),
            (
                Offload {
                    flags: 0,
                    ..tso4(1448)
                },
                ALL,
                1500,
                20,
                OffloadError::GsoWithoutCsum,
            ),
            (
                Offload {
                    csum_start: u16::MAX,
                    ..tso4(1448)
                },
                ALL,
                1500,
                20,
                OffloadError::CsumOutOfFrame {
                    start: u16::MAX,
                    offset: 16,
                    len,
                },
            ),
            (
                Offload {
                    csum_offset: 6,
                    ..tso4(1448)
                },
                ALL,
                1500,
                20,
                OffloadError::GsoCsumOffset(6),
            ),
            (
                Offload {
                    csum_start: 20,
                    ..tso4(1448)
                },
                ALL,
                1500,
                20,
                OffloadError::GsoHeaderStart { start: 20 },
            ),
            (tso4(1448), ALL, 1500, 4, OffloadError::TcpHeaderLength(4)),
            (
                Offload {
                    gso_type: GSO_NONE,
                    csum_start: 13,
                    ..tso4(0)
                },
                ALL,
                1500,
                20,
                OffloadError::CsumInL2Header { start: 13 },
            ),
            (tso4(0), ALL, 1500, 20, OffloadError::ZeroGsoSize),
            (
                tso4(1461),
                ALL,
                1500,
                20,
                OffloadError::SegmentOverMtu(1501),
            ),
        ];
        for (off, host, mtu, tcp, want) in cases {
            assert_eq!(off.check(host, len, 14, mtu, tcp), Err(want), "{off:?}");
        }
        let huge = 14 + 65535 + 1;
        assert_eq!(
            tso4(1448).check(ALL, huge, 14, 1500, 20),
            Err(OffloadError::TooLarge(huge))
        );
        let v6 = Offload {
            gso_type: GSO_TCPV6,
            csum_start: 54,
            ..tso4(1428)
        };
        assert!(
            v6.check(ALL, huge, 14, 1500, 20).is_ok(),
            "IPv6's header is extra"
        );
        assert_eq!(
            Offload {
                csum_start: 34,
                ..v6
            }
            .check(ALL, len, 14, 1500, 20),
            Err(OffloadError::GsoHeaderStart { start: 34 })
        );
        // 4000 bytes in 16-byte segments: 250 is allowed, 267 is not.
        assert!(tso4(16).check(ALL, len, 14, 1500, 20).is_ok());
        assert_eq!(
            tso4(15).check(ALL, len, 14, 1500, 20),
            Err(OffloadError::TooManySegments(267))
        );
    }

    #[test]
    fn receivers_take_what_they_negotiated() {
        let plain = Offload::default();
        let csum = Offload {
            gso_type: GSO_NONE,
            gso_size: 0,
            ..tso4(0)
        };
        let tso = tso4(1448);
        let none = Offloads::default();
        assert!(none.takes(&plain));
        assert!(!none.takes(&csum));
        let csum_only = Offloads { csum: true, ..none };
        assert!(csum_only.takes(&csum) && !csum_only.takes(&tso));
        assert!(ALL.takes(&tso));
        let ecn = Offload {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..tso
        };
        assert!(!Offloads { ecn: false, ..ALL }.takes(&ecn));
        // GUEST_TSO4 without GUEST_CSUM is not a valid negotiation: treated as neither.
        let f = 1 << VIRTIO_NET_F_GUEST_TSO4;
        assert_eq!(Offloads::guest(f), none);
        assert_eq!(
            Offload { hdr_len: 54, ..tso }.shifted(4),
            Offload {
                hdr_len: 58,
                csum_start: 38,
                ..tso
            }
        );
    }
}
