//! Fuzz target: vswitch's offload requests as a guest writes them: the virtio-net header's
//! checks against the negotiation, the frame and the MTU (`vswitch::wire::vnet`), the TCP
//! header parse, and the software checksum and segmentation (`vswitch::wire::gso`). A
//! request the checks let through must be done in software without an error, into frames
//! that each fit the MTU and together are what QoS charged for.
//!
//! Input: one byte choosing what was negotiated and the MTU, the 12-byte header, the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vswitch::wire::frame::{ETH_HLEN, TPID_8021Q, VLAN_HLEN};
use vswitch::wire::gso::{self, Pool, MAX_TCP_HEADERS};
use vswitch::wire::vnet::{
    Offload, Offloads, GSO_ECN, GSO_TCPV4, GSO_TCPV6, MAX_GSO_SEGMENTS, NET_HDR_LEN,
};

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let Some((hdr, frame)) = rest.split_at_checked(NET_HDR_LEN) else {
        return;
    };
    if frame.len() < ETH_HLEN {
        return;
    }
    let host = Offloads {
        csum: choice & 1 != 0,
        tso4: choice & 2 != 0,
        tso6: choice & 4 != 0,
        ecn: choice & 8 != 0,
    };
    let mtu = [1500u16, 9000, 576, 68][usize::from(choice >> 4) & 3];
    let hdr: [u8; NET_HDR_LEN] = hdr.try_into().expect("12 bytes");
    let off = Offload::from_header(&hdr);
    let len = frame.len();
    // What ingress does: the headers of a TCP segmentation request, from its first bytes.
    let mut tcp_hlen = 0;
    let v6 = match off.gso_type & !GSO_ECN {
        GSO_TCPV4 => Some(false),
        GSO_TCPV6 => Some(true),
        _ => None,
    };
    if let Some(v6) = v6 {
        let heads = &frame[..len.min(MAX_TCP_HEADERS)];
        let Ok(h) = gso::tcp_headers(heads, v6) else {
            return;
        };
        if h.l4 != usize::from(off.csum_start) {
            return;
        }
        tcp_hlen = h.end - h.l4;
    }
    let tagged = u16::from_be_bytes([frame[12], frame[13]]) == TPID_8021Q;
    let l2 = ETH_HLEN + if tagged { VLAN_HLEN } else { 0 };
    let Ok(checked) = off.check(host, len, l2, mtu, tcp_hlen) else {
        return;
    };
    let (segments, wire_bytes) = checked.wire(len);
    assert!((1..=MAX_GSO_SEGMENTS as u64).contains(&segments));
    // Tag edits move the offsets without wrapping.
    let moved = checked.shifted(if tagged { -4 } else { 4 });
    if checked.flags != 0 {
        assert!(usize::from(moved.csum_start) >= ETH_HLEN);
    }
    if checked == Offload::default() {
        return;
    }
    let mut pool = Pool::default();
    let made = gso::resolve(frame, &checked, &mut pool).expect("a checked request is done");
    assert_eq!(made.len() as u64, segments);
    let total: usize = made.clone().map(|k| pool.frame(k).len()).sum();
    assert_eq!(total as u64, wire_bytes, "what QoS charged is what goes out");
    if checked.is_gso() {
        for k in made {
            assert!(pool.frame(k).len() - l2 <= usize::from(mtu), "segment over the MTU");
        }
    }
});
