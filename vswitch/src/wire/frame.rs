//! Ethernet frame headers, as far as a switch needs them: addresses and the 802.1Q tag.

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const TPID_8021Q: u16 = 0x8100;
/// Destination + source MAC: where a tag is inserted or removed.
pub const MACS_LEN: usize = 12;
/// Enough of a frame to classify it: both MACs, a tag and the inner EtherType.
pub const PEEK_LEN: usize = ETH_HLEN + VLAN_HLEN;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Group addresses (broadcast included) have the I/G bit set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    /// `52:54:00:00:00:01` (or with `-`), each octet two hex digits.
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("\"{s}\" is not a MAC address like 52:54:00:12:34:56");
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(Mac(out))
    }
}

/// What the switch reads from the start of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub dst: Mac,
    pub src: Mac,
    /// The 802.1Q VLAN id, if the frame carries a tag.
    pub tag: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    TooShort(usize),
    #[error("802.1Q tag with VLAN id {0}, which is reserved")]
    ReservedVlan(u16),
}

/// Parse the header of a frame of `len` bytes whose first bytes are `peek`. The forwarding
/// path passes its snapshot of the sender's buffer, never the buffer itself, so what is
/// decided here is what is forwarded.
pub fn parse(peek: &[u8], len: usize) -> Result<Header, FrameError> {
    let avail = peek.len();
    if len < ETH_HLEN || avail < ETH_HLEN {
        return Err(FrameError::TooShort(len));
    }
    let mac = |o: usize| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&peek[o..o + 6]);
        Mac(m)
    };
    let be16 = |o: usize| u16::from_be_bytes([peek[o], peek[o + 1]]);
    let tag = if be16(12) == TPID_8021Q {
        if len < ETH_HLEN + VLAN_HLEN || avail < ETH_HLEN + VLAN_HLEN {
            return Err(FrameError::TooShort(len));
        }
        let vid = be16(14) & 0x0fff;
        if vid == 0 || vid == 4095 {
            return Err(FrameError::ReservedVlan(vid));
        }
        Some(vid)
    } else {
        None
    };
    Ok(Header {
        dst: mac(0),
        src: mac(6),
        tag,
    })
}

/// How much of a frame [`flow_hash`] reads: Ethernet, a tag, an IPv4 header with
/// options or an IPv6 header, and the ports.
pub const FLOW_PEEK: usize = ETH_HLEN + VLAN_HLEN + 60 + 4;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Protocols whose first four bytes are the source and destination ports.
const PORTED: [u8; 3] = [6, 17, 132];

/// A hash of the flow a frame belongs to, given its first bytes (up to [`FLOW_PEEK`]): the
/// IP addresses, protocol and TCP/UDP/SCTP ports where it has them, else its MACs. It only
/// picks one of a destination's receive queues, so the frames of a flow stay in order;
/// whatever the guest wrote, it is some queue.
pub fn flow_hash(b: &[u8]) -> u32 {
    let be16 = |o: usize| b.get(o..o + 2).map(|x| u16::from_be_bytes([x[0], x[1]]));
    let mut o = ETH_HLEN;
    let mut ethertype = be16(12);
    if ethertype == Some(TPID_8021Q) {
        o += VLAN_HLEN;
        ethertype = be16(16);
    }
    let key: Option<(&[u8], u8, usize)> = match ethertype {
        Some(ETHERTYPE_IPV4) => b.get(o..o + 20).map(|ip| {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 || ip[6] & 0x20 != 0;
            let ports = if fragment { 0 } else { o + ihl };
            (&ip[12..20], ip[9], ports)
        }),
        Some(ETHERTYPE_IPV6) => b.get(o..o + 40).map(|ip| (&ip[8..40], ip[6], o + 40)),
        _ => None,
    };
    let mut h: u64 = 0;
    let mut mix = |bytes: &[u8]| {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            h ^= h >> 29;
        }
    };
    match key {
        Some((addrs, proto, ports)) => {
            mix(addrs);
            mix(&[proto]);
            if PORTED.contains(&proto) && ports > 0 {
                if let Some(p) = b.get(ports..ports + 4) {
                    mix(p);
                }
            }
        }
        None => mix(b.get(..MACS_LEN).unwrap_or(b)),
    }
    (h >> 32) as u32
}

/// The 4 tag bytes for `vid` (priority 0).
pub fn tag_bytes(vid: u16) -> [u8; VLAN_HLEN] {
    let tci = vid & 0x0fff;
    let [t0, t1] = TPID_8021Q.to_be_bytes();
    let [c0, c1] = tci.to_be_bytes();
    [t0, t1, c0, c1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6], tag: Option<u16>) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        if let Some(v) = tag {
            f.extend_from_slice(&tag_bytes(v));
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.resize(64, 0);
        f
    }

    #[test]
    fn untagged_and_tagged() {
        let f = frame([0xff; 6], [2, 0, 0, 0, 0, 1], None);
        let h = parse(&f[..PEEK_LEN], f.len()).expect("valid");
        assert!(h.dst.is_multicast());
        assert_eq!(h.src, Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(h.tag, None);
        let f = frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], Some(10));
        let h = parse(&f[..PEEK_LEN], f.len()).expect("valid");
        assert_eq!(h.tag, Some(10));
        assert!(!h.dst.is_multicast());
    }

    #[test]
    fn short_and_reserved() {
        assert_eq!(parse(&[0; 10], 10), Err(FrameError::TooShort(10)));
        let mut f = frame([1; 6], [2; 6], Some(10));
        f.truncate(15);
        assert_eq!(parse(&f, 15), Err(FrameError::TooShort(15)));
        let f = frame([1; 6], [2; 6], Some(4095));
        assert_eq!(parse(&f, f.len()), Err(FrameError::ReservedVlan(4095)));
    }

    /// An IPv4 UDP frame from 10.0.0.`host` port `sport`, tagged or not.
    fn udp(host: u8, sport: u16, tag: Option<u16>) -> Vec<u8> {
        let mut f = frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], tag);
        let o = ETH_HLEN + if tag.is_some() { VLAN_HLEN } else { 0 };
        f[o] = 0x45;
        f[o + 9] = 17;
        f[o + 12..o + 16].copy_from_slice(&[10, 0, 0, host]);
        f[o + 16..o + 20].copy_from_slice(&[10, 0, 0, 99]);
        f[o + 20..o + 22].copy_from_slice(&sport.to_be_bytes());
        f[o + 22..o + 24].copy_from_slice(&53u16.to_be_bytes());
        f
    }

    #[test]
    fn flow_hash_follows_the_flow() {
        let a = flow_hash(&udp(1, 1000, None));
        assert_eq!(a, flow_hash(&udp(1, 1000, None)), "same flow, same hash");
        assert_eq!(
            a,
            flow_hash(&udp(1, 1000, Some(10))),
            "the tag is not the flow"
        );
        // Over many flows, every one of 4 queues gets some.
        let mut queues = [0u32; 4];
        for host in 0..64 {
            queues[(flow_hash(&udp(host, 1000, None)) % 4) as usize] += 1;
        }
        assert!(queues.iter().all(|&n| n >= 8), "{queues:?}");
        assert_ne!(a, flow_hash(&udp(1, 1001, None)), "the ports are the flow");
        // Whatever the guest wrote (an IHL pointing past the bytes, truncation), a hash.
        let mut bad = udp(1, 1000, None);
        bad[ETH_HLEN] = 0x4f;
        flow_hash(&bad);
        for n in 0..bad.len() {
            flow_hash(&bad[..n]);
        }
    }

    #[test]
    fn mac_display() {
        assert_eq!(
            Mac([0x52, 0x54, 0, 0xab, 1, 2]).to_string(),
            "52:54:00:ab:01:02"
        );
    }
}
