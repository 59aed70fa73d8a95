//! Fuzz target: vswitch's forwarding path on hostile rings and frames: its own chain
//! walker (`vswitch::wire::ring::Ring`, host pointers, indirect tables), the frame header parse,
//! VLAN ingress and egress, the one copy with a tag inserted or stripped
//! (`vswitch::wire::copy`), and the forwarding database. Every transmit chain that walks is
//! copied into receive buffers of another chain and must come out as the VLAN rules say,
//! byte for byte; the table must stay within its size.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vswitch::config::VlanMode;
use vswitch::policy::fdb::Fdb;
use vswitch::wire::copy::{copy, plan, Egress, Piece};
use vswitch::wire::frame::{self, Mac, MACS_LEN, PEEK_LEN, VLAN_HLEN};
use vswitch::wire::guest::HostRange;
use vswitch::wire::ring::Ring;

mod rings;

const NET_HDR: usize = 12;
const FDB_SIZE: usize = 8;

fn gather(ranges: &[HostRange]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in ranges {
        // SAFETY: the ring validated each range against the guest memory, which lives for
        // the whole input.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(r.ptr, r.len) });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(mut s) = rings::setup(data) else {
        return;
    };
    let ports = [
        VlanMode::Access(10),
        VlanMode::Trunk {
            allowed: vec![1, 10, 20],
            native: Some(1),
        },
        VlanMode::Trunk {
            allowed: vec![10, 20],
            native: None,
        },
    ];
    let mut fdb = Fdb::new(FDB_SIZE, Duration::from_secs(300), vec![None, Some(3), None]);
    let now = Instant::now();
    let Ok(ring) = Ring::new(&s.queue, &s.mem) else {
        return;
    };
    let Ok(posted) = ring.posted(0) else {
        return;
    };
    let mut rx: Vec<HostRange> = Vec::new();
    // Used entries go in after every copy, as the switch does: a buffer may overlap the
    // used ring, and the copies must read what was checked.
    let mut heads = Vec::new();
    for i in 0..posted.min(64) {
        let head = ring.head(i);
        heads.push(head);
        let mut tx = Vec::new();
        let Ok(taken) = ring.chain(head, false, &mut tx) else {
            continue;
        };
        let bytes = gather(&tx);
        assert_eq!(bytes.len(), taken.bytes);
        if taken.other > 0 {
            // A chain with writable buffers: next frame's receive buffers.
            rx.clear();
            let _ = ring.chain(head, true, &mut rx);
            continue;
        }
        let Some(frame_bytes) = bytes.get(NET_HDR..) else {
            continue;
        };
        let Ok(hdr) = frame::parse(&frame_bytes[..frame_bytes.len().min(PEEK_LEN)], frame_bytes.len()) else {
            continue;
        };
        let from = usize::from(i) % ports.len();
        let Ok(vlan) = ports[from].ingress(hdr.tag) else {
            continue;
        };
        if !hdr.src.is_multicast() && !hdr.src.is_zero() {
            fdb.learn(vlan, hdr.src, from, now);
            assert!(fdb.len() <= FDB_SIZE);
        }
        let _ = fdb.lookup(vlan, hdr.dst, now);
        let to = (from + 1) % ports.len();
        if !ports[to].carries(vlan) {
            continue;
        }
        let egress = ports[to].egress(vlan, hdr.tag.is_some());
        // What must come out: the frame with the egress edit, after a header.
        let mut want = vec![0xee; NET_HDR];
        match egress {
            Egress::AsIs => want.extend_from_slice(frame_bytes),
            Egress::Strip => {
                want.extend_from_slice(&frame_bytes[..MACS_LEN]);
                want.extend_from_slice(&frame_bytes[MACS_LEN + VLAN_HLEN..]);
            }
            Egress::Insert(vid) => {
                want.extend_from_slice(&frame_bytes[..MACS_LEN]);
                want.extend_from_slice(&frame::tag_bytes(vid));
                want.extend_from_slice(&frame_bytes[MACS_LEN..]);
            }
        }
        assert_eq!(want.len() - NET_HDR, egress.frame_len(frame_bytes.len()));
        // The frame's own ranges: the chain's, past the virtio-net header.
        let mut src = Vec::new();
        let mut skip = NET_HDR;
        for r in &tx {
            if skip >= r.len {
                skip -= r.len;
                continue;
            }
            // SAFETY: skip < r.len.
            src.push(HostRange { ptr: unsafe { r.ptr.add(skip) }, len: r.len - skip });
            skip = 0;
        }
        let mut pieces = Vec::new();
        let total = plan(
            &src,
            egress,
            Piece::Inline { bytes: [0xee; 12], len: NET_HDR },
            &mut pieces,
        );
        assert_eq!(total, want.len());
        // Into a buffer of ours, then into the guest's receive buffers when they hold it.
        let mut out = vec![0u8; total];
        let dest = [HostRange { ptr: out.as_mut_ptr(), len: out.len() }];
        // SAFETY: source ranges are guest memory validated by the ring; `dest` is `out`.
        unsafe { copy(&pieces, &dest) };
        assert!(out == want, "the copy differs from the VLAN rules");
        let room: usize = rx.iter().map(|r| r.len).sum();
        if room >= total {
            // SAFETY: receive ranges validated by the ring, in the same guest memory; the
            // copy tolerates overlap with the source.
            unsafe { copy(&pieces, &rx) };
        }
        let _: Mac = hdr.dst;
    }
    let mut batch = ring.used_batch(&s.queue);
    for head in heads {
        ring.add_used(&mut batch, head, 0);
    }
    let _ = ring.publish_batch(batch, &mut s.queue, false);
});
