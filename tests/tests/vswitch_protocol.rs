//! The whole vhost-user-net protocol against a real `vswitch serve` process, driven by
//! `vhost::vhost_user::Frontend` (the frontend code cloud-hypervisor uses), one frontend per
//! port: feature and protocol-feature negotiation, the config space, guest memory in memfds
//! (a different layout per port, handed over with SET_MEM_TABLE and/or ADD_MEM_REG), split
//! virtqueues laid out by hand, frames through the switch's own ring walker (direct and
//! indirect chains, mergeable receive buffers, VLAN tags), hostile transmit chains, receive
//! rings without buffers, interrupt suppression with and without EVENT_IDX, and a port's
//! frontend going away and coming back.
//!
//! The test plays the VMMs and the guest drivers: it owns each port's guest memory, writes
//! descriptors and avail rings itself, kicks eventfds and reads call eventfds. A frame is
//! forwarded (or dropped) before the switch returns its transmit chain, so once a sender's
//! used ring has moved, every receive ring and counter can be checked at once: no check
//! depends on timing, and waits are bounded polls that only catch a hang.
//!
//! The ports: a and b on access VLAN 10, c a trunk of VLANs 10 and 20 (no native VLAN, no
//! MAC), d on access VLAN 20 with MTU 1400, whose frontend acks neither EVENT_IDX nor
//! MRG_RXBUF.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use e2e::frontend::{
    ack_protocol_features, config_space, connect, get, guest_memory, host_addr, le16, pattern, put,
    ro, send_memory, wo, write_raw_desc, Desc, MemSetup, Ring, MIB,
};
use e2e::vswitch::{get as counter, Counters, Switch};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY,
};
use vm_memory::GuestMemoryMmap;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// virtio_net_hdr_v1: VERSION_1 is negotiated.
const NET_HDR: usize = 12;
/// struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;
const BROADCAST: [u8; 6] = [0xff; 6];
/// An EtherType for local experiments (IEEE 802 "Local Experimental 1").
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// One port: its `[[port]]` keys and how its guest is set up.
struct PortDef {
    name: &'static str,
    keys: &'static str,
    /// The port's configured MAC (the guest sends from it); the trunk's guest has none
    /// configured but sends from `mac` all the same.
    configured_mac: bool,
    mac: [u8; 6],
    mtu: u16,
    /// Features the frontend does not ack.
    refuse: u64,
    /// Size of each receive buffer the guest posts.
    rx_buf: u32,
}

const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];
const MAC_C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0c];
const MAC_D: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0d];

const PORTS: [PortDef; 4] = [
    PortDef {
        name: "a",
        keys: "vlan = 10\nmac = \"52:54:00:00:00:0a\"",
        configured_mac: true,
        mac: MAC_A,
        mtu: 1500,
        refuse: 0,
        // Small: a full-size frame spans several buffers (MRG_RXBUF).
        rx_buf: 512,
    },
    PortDef {
        name: "b",
        keys: "vlan = 10\nmac = \"52:54:00:00:00:0b\"",
        configured_mac: true,
        mac: MAC_B,
        mtu: 1500,
        refuse: 0,
        rx_buf: 2048,
    },
    PortDef {
        name: "c",
        keys: "vlan = { trunk = [10, 20] }\nmtu = 9000",
        configured_mac: false,
        mac: MAC_C,
        mtu: 9000,
        refuse: 0,
        rx_buf: 2048,
    },
    PortDef {
        name: "d",
        keys: "vlan = 20\nmac = \"52:54:00:00:00:0d\"\nmtu = 1400",
        configured_mac: true,
        mac: MAC_D,
        mtu: 1400,
        refuse: 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_NET_F_MRG_RXBUF,
        rx_buf: 2048,
    },
];

/// Where a guest's things live in guest-physical memory.
#[derive(Clone, Copy, Debug)]
struct Layout {
    regions: &'static [(u64, u64)],
    setup: MemSetup,
    /// The receive ring, and the transmit ring 128 KiB above it.
    rings: u64,
    /// Receive buffers (256 of them at most), then 512 KiB above the transmit area.
    data: u64,
    /// A guest-physical address no region covers.
    hole: u64,
    /// End of the data region.
    data_end: u64,
}

/// A different memory layout for each port.
const LAYOUTS: [Layout; 4] = [
    // a: one 4 MiB region in one SET_MEM_TABLE.
    Layout {
        regions: &[(MIB, 4 * MIB)],
        setup: MemSetup::MemTable,
        rings: MIB,
        data: 2 * MIB,
        hole: 5 * MIB,
        data_end: 5 * MIB,
    },
    // b: rings and data in two regions with a hole between, each with ADD_MEM_REG.
    Layout {
        regions: &[(MIB, MIB), (16 * MIB, 2 * MIB)],
        setup: MemSetup::AddMemRegion,
        rings: MIB,
        data: 16 * MIB,
        hole: 8 * MIB,
        data_end: 18 * MIB,
    },
    // c: data at guest-physical 0 (SET_MEM_TABLE), rings high up (ADD_MEM_REG).
    Layout {
        regions: &[(0, 2 * MIB), (64 * MIB, MIB)],
        setup: MemSetup::Mixed,
        rings: 64 * MIB,
        data: 0x1_0000,
        hole: 32 * MIB,
        data_end: 2 * MIB,
    },
    // d: one region far up, with ADD_MEM_REG.
    Layout {
        regions: &[(256 * MIB, 2 * MIB)],
        setup: MemSetup::AddMemRegion,
        rings: 256 * MIB,
        data: 257 * MIB,
        hole: 258 * MIB,
        data_end: 258 * MIB,
    },
];

/// b's layout for its second frontend, after the reconnect.
const B_AGAIN: Layout = Layout {
    regions: &[(0, MIB), (4 * MIB, 2 * MIB)],
    setup: MemSetup::Mixed,
    rings: 0,
    data: 4 * MIB,
    hole: 2 * MIB,
    data_end: 6 * MIB,
};

/// Everything a port offers: and nothing else (no checksum or segmentation offloads).
fn expected_features(def: &PortDef) -> u64 {
    let mut f = 1 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_F_IN_ORDER
        | 1 << VIRTIO_NET_F_MTU
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        | 1 << VIRTIO_NET_F_STATUS
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
        ]
        .iter()
        .fold(0, |f, bit| f | 1 << bit);
    if def.configured_mac {
        f |= 1 << VIRTIO_NET_F_MAC;
    }
    f
}

// ---------------------------------------------------------------------------------------------
// Frames

/// A frame of `len` bytes from `src` to `dst`, with an 802.1Q tag if `tag`.
fn eth(dst: [u8; 6], src: [u8; 6], tag: Option<u16>, len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(v) = tag {
        f.extend_from_slice(&[0x81, 0x00, (v >> 8) as u8, v as u8]);
    }
    f.extend_from_slice(&ETHERTYPE);
    let rest = len - f.len();
    f.extend(pattern(seed, rest));
    f
}

/// `frame` with a tag for `vid` inserted after the MACs.
fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00, (vid >> 8) as u8, vid as u8]);
    f.extend_from_slice(&frame[12..]);
    f
}

/// `frame` without its tag.
fn untagged(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&frame[16..]);
    f
}

/// How a transmit chain carries the header and the frame.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Header in its own descriptor, the frame in two more.
    Split,
    /// Header and frame in one descriptor.
    Joined,
    /// `Split`, through an indirect table.
    Indirect,
}

/// A frame as a guest received it.
#[derive(Debug)]
struct Received {
    hdr: Vec<u8>,
    frame: Vec<u8>,
    /// Used entries (receive chains) it took.
    chains: usize,
}

impl Received {
    fn num_buffers(&self) -> u16 {
        le16(&self.hdr, 10)
    }
}

// ---------------------------------------------------------------------------------------------
// One port's guest

struct Guest {
    name: &'static str,
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    layout: Layout,
    rx: Ring,
    tx: Ring,
    rx_buf: u32,
    /// The buffer address of each receive chain posted, by head.
    rx_bufs: HashMap<u16, u64>,
    rx_slot: u64,
}

impl Guest {
    /// Connect a frontend to `def`'s port, check what it offers, negotiate, hand over the
    /// memory, start both rings and post `rx_posted` receive buffers.
    fn connect(sw: &Switch, def: &PortDef, layout: Layout, rx_posted: u16) -> Guest {
        let mut fe = connect(&sw.socket(def.name), 2);
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        let want = expected_features(def);
        for (bit, name) in [
            (VIRTIO_NET_F_HOST_UFO, "HOST_UFO"),
            (VIRTIO_NET_F_GUEST_UFO, "GUEST_UFO"),
            (VIRTIO_NET_F_MQ, "MQ"),
        ] {
            assert!(
                offered & (1 << bit) == 0,
                "port {}: {name} must not be offered; offered {offered:#x}",
                def.name
            );
        }
        assert_eq!(
            offered,
            want,
            "port {}: GET_FEATURES must offer exactly VERSION_1, IN_ORDER, {}MTU, MRG_RXBUF, \
             STATUS, EVENT_IDX, INDIRECT_DESC, PROTOCOL_FEATURES and the checksum and TSO \
             offloads (extra {:#x}, missing {:#x})",
            def.name,
            if def.configured_mac { "MAC, " } else { "" },
            offered & !want,
            want & !offered
        );
        ack_protocol_features(
            &mut fe,
            &[
                (VhostUserProtocolFeatures::CONFIG, "CONFIG"),
                (VhostUserProtocolFeatures::REPLY_ACK, "REPLY_ACK"),
                (
                    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    "CONFIGURE_MEM_SLOTS",
                ),
            ],
        );
        let slots = fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
        assert!(
            slots >= 2,
            "GET_MAX_MEM_SLOTS must allow the two regions this test adds, got {slots}"
        );
        check_config(&mut fe, def);
        let acked = offered & !def.refuse;
        fe.set_features(acked).expect("SET_FEATURES");
        check_config(&mut fe, def);

        let mem = guest_memory(layout.regions);
        send_memory(&mut fe, &mem, layout.setup);
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let rx = Ring::new(RX, QUEUE_SIZE, layout.rings, event_idx);
        let tx = Ring::new(TX, QUEUE_SIZE, layout.rings + 0x2_0000, event_idx);
        assert!(tx.end() <= layout.rings + MIB, "test bug: rings overflow");
        rx.start(&mut fe, &mem);
        tx.start(&mut fe, &mem);
        let mut g = Guest {
            name: def.name,
            fe,
            mem,
            layout,
            rx,
            tx,
            rx_buf: def.rx_buf,
            rx_bufs: HashMap::new(),
            rx_slot: 0,
        };
        g.post_rx(rx_posted);
        // The kick that tells the switch the receive ring is there, buffers or not.
        g.rx.kick();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sw.guest_connected(def.name) {
            assert!(
                Instant::now() < deadline,
                "port {}: the switch did not attach the receive ring after a kick",
                def.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        g
    }

    fn tx_area(&self) -> u64 {
        self.layout.data + 0x8_0000
    }

    /// Post `n` receive buffers of `rx_buf` bytes, scrubbed (no kick).
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let addr = self.layout.data + self.rx_slot * u64::from(self.rx_buf);
            self.rx_slot = (self.rx_slot + 1) % u64::from(QUEUE_SIZE);
            put(&self.mem, addr, &vec![0xee; self.rx_buf as usize]);
            let head = self.rx.post(&self.mem, &[wo(addr, self.rx_buf)], false);
            self.rx_bufs.insert(head, addr);
        }
    }

    /// Write `hdr` and `frame` to the transmit area; the chain that carries them.
    fn tx_chain(&self, hdr: &[u8; NET_HDR], frame: &[u8], shape: Shape) -> (Vec<Desc>, bool) {
        let base = self.tx_area();
        put(&self.mem, base, hdr);
        put(&self.mem, base + NET_HDR as u64, frame);
        let len = frame.len() as u32;
        let f = base + NET_HDR as u64;
        let half = len / 2;
        let split = vec![
            ro(base, NET_HDR as u32),
            ro(f, half),
            ro(f + u64::from(half), len - half),
        ];
        match shape {
            Shape::Split => (split, false),
            Shape::Indirect => (split, true),
            Shape::Joined => (vec![ro(base, NET_HDR as u32 + len)], false),
        }
    }

    /// Transmit `frame` (zero virtio-net header) and wait until the switch returned the
    /// chain, with a call.
    fn send(&mut self, frame: &[u8], shape: Shape) {
        let (chain, indirect) = self.tx_chain(&[0; NET_HDR], frame, shape);
        self.submit(&chain, indirect);
    }

    /// Submit a transmit chain and wait for it to come back: used length 0, nothing written.
    fn submit(&mut self, chain: &[Desc], indirect: bool) {
        let len = self.tx.submit(&self.mem, chain, indirect);
        assert_eq!(len, 0, "port {}: a transmit chain's used length", self.name);
    }

    /// Transmit `frame` without asking for a call (the ring's used_event and flags are left
    /// as they are); wait for the chain to come back and the kicks to be re-enabled, so any
    /// call for it has been made.
    fn send_quiet(&mut self, frame: &[u8]) {
        let (chain, indirect) = self.tx_chain(&[0; NET_HDR], frame, Shape::Split);
        self.tx.post(&self.mem, &chain, indirect);
        self.tx.kick();
        self.tx.wait_used(&self.mem, 1);
        self.tx.wait_rearmed(&self.mem);
    }

    /// The frames delivered since the last call, reassembled from their receive chains.
    fn receive(&mut self) -> Vec<Received> {
        let used = self.rx.take_used(&self.mem);
        let mut out = Vec::new();
        let mut i = 0;
        while i < used.len() {
            let mut bytes = Vec::new();
            let mut n = 1;
            let mut k = 0;
            while k < n {
                let Some(&(id, len)) = used.get(i + k) else {
                    panic!(
                        "port {}: num_buffers {n} but only {} used entries: {used:?}",
                        self.name,
                        used.len() - i
                    );
                };
                let addr = *self.rx_bufs.get(&(id as u16)).unwrap_or_else(|| {
                    panic!("port {}: used id {id} names no posted buffer", self.name)
                });
                assert!(
                    len <= self.rx_buf && (k > 0 || len as usize >= NET_HDR),
                    "port {}: used length {len} of a {}-byte receive buffer",
                    self.name,
                    self.rx_buf
                );
                bytes.extend(get(&self.mem, addr, len as usize));
                if k == 0 {
                    n = usize::from(le16(&bytes, 10)).max(1);
                }
                k += 1;
            }
            out.push(Received {
                hdr: bytes[..NET_HDR].to_vec(),
                frame: bytes[NET_HDR..].to_vec(),
                chains: n,
            });
            i += n;
        }
        out
    }
}

fn check_config(fe: &mut Frontend, def: &PortDef) {
    let c = config_space(fe, CONFIG_LEN);
    let mac = if def.configured_mac { def.mac } else { [0; 6] };
    assert_eq!(c[..6], mac, "port {}: config mac", def.name);
    assert_eq!(
        le16(&c, 6),
        VIRTIO_NET_S_LINK_UP as u16,
        "port {}: config status must be LINK_UP",
        def.name
    );
    assert_eq!(
        le16(&c, 10),
        def.mtu,
        "port {}: config mtu must be the port's mtu",
        def.name
    );
}

// ---------------------------------------------------------------------------------------------
// The switch and its four guests

struct Lab {
    sw: Switch,
    guests: Vec<Option<Guest>>,
    stats: HashMap<String, Counters>,
}

fn index(name: &str) -> usize {
    PORTS
        .iter()
        .position(|p| p.name == name)
        .unwrap_or_else(|| panic!("test bug: no port {name}"))
}

impl Lab {
    /// Start the switch and connect a guest to each port, with `rx_posted[i]` receive
    /// buffers on port i.
    fn start(rx_posted: [u16; 4]) -> Lab {
        Lab::with_switch("", rx_posted)
    }

    /// [`Lab::start`] with `extra` keys in the `[switch]` table.
    fn with_switch(extra: &str, rx_posted: [u16; 4]) -> Lab {
        let defs: Vec<(&str, &str)> = PORTS.iter().map(|p| (p.name, p.keys)).collect();
        let sw = Switch::with_config(extra, &defs);
        let guests = PORTS
            .iter()
            .zip(LAYOUTS)
            .zip(rx_posted)
            .map(|((def, layout), n)| Some(Guest::connect(&sw, def, layout, n)))
            .collect();
        let stats = sw.stats();
        Lab { sw, guests, stats }
    }

    fn g(&mut self, name: &str) -> &mut Guest {
        self.guests[index(name)]
            .as_mut()
            .unwrap_or_else(|| panic!("test bug: port {name} has no guest"))
    }

    /// Check what every connected guest received since the last check: `want` lists the
    /// frames of the ports that must have received some; all others must have none.
    #[track_caller]
    fn expect_rx(&mut self, what: &str, want: &[(&str, Vec<Vec<u8>>)]) -> Vec<Received> {
        let mut all = Vec::new();
        for g in self.guests.iter_mut().flatten() {
            let frames: &[Vec<u8>] = want
                .iter()
                .find(|(n, _)| *n == g.name)
                .map(|(_, f)| f.as_slice())
                .unwrap_or(&[]);
            let got = g.receive();
            assert_eq!(
                got.len(),
                frames.len(),
                "{what}: port {} must receive {} frames, got {}",
                g.name,
                frames.len(),
                got.len()
            );
            for (k, (r, f)) in got.iter().zip(frames).enumerate() {
                assert!(
                    r.hdr[..10].iter().all(|&b| b == 0),
                    "{what}: port {} frame {k}: the virtio-net header must be all zero but \
                     num_buffers: {:?}",
                    g.name,
                    r.hdr
                );
                if r.frame != *f {
                    let at = r.frame.iter().zip(f).position(|(x, y)| x != y);
                    panic!(
                        "{what}: port {} frame {k}: {} bytes received, {} expected, first \
                         difference at {at:?}\n got {:02x?}\nwant {:02x?}",
                        g.name,
                        r.frame.len(),
                        f.len(),
                        &r.frame[..r.frame.len().min(24)],
                        &f[..f.len().min(24)]
                    );
                }
                assert_eq!(
                    usize::from(r.num_buffers()),
                    r.chains,
                    "{what}: port {}: num_buffers must count the chains the frame took",
                    g.name
                );
            }
            all.extend(got);
        }
        all
    }

    /// Check which packet counters (bytes left out) moved since the last check.
    #[track_caller]
    fn expect_counters(&mut self, what: &str, want: &[(&str, &str, u64)]) {
        let now = self.sw.stats();
        let mut moved = BTreeMap::new();
        for (port, c) in &now {
            for (k, v) in c {
                let before = self.stats.get(port).map(|b| counter(b, k)).unwrap_or(0);
                if *v != before && !k.ends_with("_bytes") {
                    moved.insert(format!("{port}.{k}"), v - before);
                }
            }
        }
        let want: BTreeMap<String, u64> = want
            .iter()
            .map(|(p, k, v)| (format!("{p}.{k}"), *v))
            .collect();
        assert_eq!(
            moved, want,
            "{what}: counters that moved (vswitch ctl stats)"
        );
        self.stats = now;
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

/// 1. Each port offers exactly its features and reports its MAC, link and MTU; all four
///    frontends negotiate; SIGTERM ends the switch cleanly with them attached.
#[test]
fn negotiation_and_config_space() {
    let lab = Lab::start([8; 4]);
    let Lab { sw, guests, .. } = lab;
    sw.stop();
    drop(guests);
}

/// 2. Floods stay in their VLAN, learned unicast goes to one port, tags are inserted and
///    stripped, and frames span several receive buffers with the right num_buffers.
#[test]
fn forwarding_vlans_learning_and_mergeable_rx() {
    let mut lab = Lab::start([64, 32, 32, 32]);

    // a floods a broadcast on VLAN 10: b untagged, the trunk tagged, never d.
    let f = eth(BROADCAST, MAC_A, None, 60, 1);
    lab.g("a").send(&f, Shape::Split);
    let got = lab.expect_rx(
        "broadcast from a",
        &[("b", vec![f.clone()]), ("c", vec![tagged(&f, 10)])],
    );
    assert!(got.iter().all(|r| r.num_buffers() == 1));
    lab.expect_counters(
        "broadcast from a",
        &[
            ("a", "rx_packets", 1),
            ("b", "tx_packets", 1),
            ("c", "tx_packets", 1),
        ],
    );

    // b to a's learned MAC, header and frame in one descriptor: only a, in three of its
    // 512-byte buffers (12 + 1514 bytes).
    let f = eth(MAC_A, MAC_B, None, 1514, 2);
    lab.g("b").send(&f, Shape::Joined);
    let got = lab.expect_rx("unicast b -> a", &[("a", vec![f])]);
    assert_eq!(
        got[0].num_buffers(),
        3,
        "12 + 1514 bytes in 512-byte buffers"
    );
    lab.expect_counters(
        "unicast b -> a",
        &[("b", "rx_packets", 1), ("a", "tx_packets", 1)],
    );

    // a to b, through an indirect table: only b.
    let f = eth(MAC_B, MAC_A, None, 100, 3);
    lab.g("a").send(&f, Shape::Indirect);
    lab.expect_rx("indirect unicast a -> b", &[("b", vec![f])]);
    lab.expect_counters(
        "indirect unicast a -> b",
        &[("a", "rx_packets", 1), ("b", "tx_packets", 1)],
    );

    // The num_buffers boundary: 12 + 500 bytes fill one 512-byte buffer exactly, one byte
    // more takes two.
    for (len, chains) in [(500, 1), (501, 2), (1012, 2), (1013, 3)] {
        let f = eth(MAC_A, MAC_B, None, len, len as u8);
        lab.g("b").send(&f, Shape::Split);
        let got = lab.expect_rx(&format!("{len}-byte frame to a"), &[("a", vec![f])]);
        assert_eq!(
            usize::from(got[0].num_buffers()),
            chains,
            "a {len}-byte frame in 512-byte buffers"
        );
    }
    lab.expect_counters(
        "frames at the buffer boundary",
        &[("b", "rx_packets", 4), ("a", "tx_packets", 4)],
    );

    // The trunk sends on VLAN 10, tagged and full-size: a gets it untagged, in 3 buffers.
    let f = eth(MAC_A, MAC_C, Some(10), 1518, 4);
    lab.g("c").send(&f, Shape::Split);
    let got = lab.expect_rx("tagged VLAN 10 c -> a", &[("a", vec![untagged(&f)])]);
    assert_eq!(got[0].num_buffers(), 3);
    lab.expect_counters(
        "tagged VLAN 10 c -> a",
        &[("c", "rx_packets", 1), ("a", "tx_packets", 1)],
    );

    // A VLAN 20 broadcast from the trunk reaches d only, untagged, in one buffer (d did
    // not ack MRG_RXBUF: num_buffers is 1).
    let f = eth(BROADCAST, MAC_C, Some(20), 200, 5);
    lab.g("c").send(&f, Shape::Indirect);
    let got = lab.expect_rx("VLAN 20 broadcast from c", &[("d", vec![untagged(&f)])]);
    assert_eq!(got[0].num_buffers(), 1);
    lab.expect_counters(
        "VLAN 20 broadcast from c",
        &[("c", "rx_packets", 1), ("d", "tx_packets", 1)],
    );

    // d answers c (learned on VLAN 20): the trunk gets it tagged 20.
    let f = eth(MAC_C, MAC_D, None, 1414, 6);
    lab.g("d").send(&f, Shape::Joined);
    lab.expect_rx("unicast d -> c", &[("c", vec![tagged(&f, 20)])]);
    lab.expect_counters(
        "unicast d -> c",
        &[("d", "rx_packets", 1), ("c", "tx_packets", 1)],
    );

    // d to a's MAC: a is known on VLAN 10 only, so on VLAN 20 it is unknown unicast,
    // flooded to the trunk alone.
    let f = eth(MAC_A, MAC_D, None, 64, 7);
    lab.g("d").send(&f, Shape::Split);
    lab.expect_rx("d -> a's MAC on VLAN 20", &[("c", vec![tagged(&f, 20)])]);
    lab.expect_counters(
        "d -> a's MAC on VLAN 20",
        &[("d", "rx_packets", 1), ("c", "tx_packets", 1)],
    );

    // Wrong tagging: untagged on a trunk without a native VLAN, tagged on an access port,
    // a VLAN the trunk does not carry.
    let f = eth(BROADCAST, MAC_C, None, 64, 8);
    lab.g("c").send(&f, Shape::Split);
    let f = eth(BROADCAST, MAC_A, Some(10), 64, 9);
    lab.g("a").send(&f, Shape::Split);
    let f = eth(BROADCAST, MAC_C, Some(30), 64, 10);
    lab.g("c").send(&f, Shape::Split);
    lab.expect_rx("wrongly tagged frames", &[]);
    lab.expect_counters(
        "wrongly tagged frames",
        &[("c", "drop_vlan", 2), ("a", "drop_vlan", 1)],
    );
    lab.sw.stop();
}

/// 3. Hostile transmit chains are dropped, counted and returned; the switch goes on.
#[test]
fn hostile_transmit_chains() {
    let mut lab = Lab::start([32; 4]);
    let good = eth(BROADCAST, MAC_B, None, 60, 1);
    let b = lab.g("b");
    let (hole, data_end) = (b.layout.hole, b.layout.data_end);
    let hdr = b.tx_area();
    let frame = hdr + NET_HDR as u64;
    put(&b.mem, hdr, &[0; NET_HDR]);
    put(&b.mem, frame, &good);
    let gso = {
        let mut h = [0u8; NET_HDR];
        h[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        h
    };

    let chains: Vec<(&str, Vec<Desc>)> = vec![
        (
            "a descriptor in a hole of guest memory",
            vec![ro(hdr, 12), ro(hole, 60)],
        ),
        (
            "a descriptor running off the end of a region",
            vec![ro(hdr, 12), ro(data_end - 30, 60)],
        ),
        (
            "a device-writable descriptor",
            vec![ro(hdr, 12), wo(frame, 60)],
        ),
        (
            "a frame shorter than an Ethernet header",
            vec![ro(hdr, 12), ro(frame, 13)],
        ),
        (
            "a chain shorter than the virtio-net header",
            vec![ro(hdr, 8)],
        ),
    ];
    for (what, chain) in &chains {
        lab.g("b").submit(chain, false);
        lab.expect_counters(what, &[("b", "drop_malformed", 1)]);
    }

    // Raw descriptors: a loop, a next index past the table, indirect tables with a bad
    // length and with an indirect descriptor inside.
    let next = VRING_DESC_F_NEXT as u16;
    let ind = VRING_DESC_F_INDIRECT as u16;
    let b = lab.g("b");
    let raw: Vec<(&str, u16)> = {
        let (mem, tx) = (&b.mem, &mut b.tx);
        let mut v = Vec::new();
        let h = tx.alloc_descs(2);
        let h1 = (h + 1) % QUEUE_SIZE;
        write_raw_desc(mem, tx.desc, h, (hdr, 12, next, h1));
        write_raw_desc(mem, tx.desc, h1, (frame, 60, next, h));
        v.push(("a descriptor loop", h));
        let h = tx.alloc_descs(1);
        write_raw_desc(mem, tx.desc, h, (hdr, 12, next, QUEUE_SIZE + 3));
        v.push(("a next index past the queue size", h));
        let h = tx.alloc_descs(1);
        let table = tx.indirect_table(h);
        write_raw_desc(mem, table, 0, (hdr, 12, next, 1));
        write_raw_desc(mem, table, 1, (frame, 60, 0, 0));
        write_raw_desc(mem, tx.desc, h, (table, 20, ind, 0));
        v.push(("an indirect table of 20 bytes", h));
        let h = tx.alloc_descs(1);
        let table = tx.indirect_table(h);
        let inner = table + 0x80;
        write_raw_desc(mem, inner, 0, (hdr, 72, 0, 0));
        write_raw_desc(mem, table, 0, (inner, 16, ind, 0));
        write_raw_desc(mem, tx.desc, h, (table, 16, ind, 0));
        v.push(("an indirect descriptor inside an indirect table", h));
        let h = tx.alloc_descs(1);
        write_raw_desc(mem, tx.desc, h, (hole, 32, ind, 0));
        v.push(("an indirect table outside guest memory", h));
        v
    };
    for (what, head) in raw {
        let b = lab.g("b");
        let len = b.tx.submit_head(&b.mem, head);
        assert_eq!(len, 0, "{what}: used length");
        lab.expect_counters(what, &[("b", "drop_malformed", 1)]);
    }

    // A segmentation request without the checksum request it needs (and on a frame that
    // is not TCP).
    let b = lab.g("b");
    let (chain, _) = b.tx_chain(&gso, &good, Shape::Split);
    b.submit(&chain, false);
    lab.expect_counters("a GSO header", &[("b", "drop_malformed", 1)]);

    // Over the MTU by one byte: dropped; exactly the MTU: forwarded.
    let big = eth(BROADCAST, MAC_B, None, 1515, 2);
    lab.g("b").send(&big, Shape::Split);
    lab.expect_counters("a frame over the MTU", &[("b", "drop_mtu", 1)]);
    lab.expect_rx("hostile chains", &[]);
    let full = eth(BROADCAST, MAC_B, None, 1514, 3);
    lab.g("b").send(&full, Shape::Split);
    lab.expect_rx(
        "a frame of exactly the MTU",
        &[("a", vec![full.clone()]), ("c", vec![tagged(&full, 10)])],
    );
    lab.expect_counters(
        "a frame of exactly the MTU",
        &[
            ("b", "rx_packets", 1),
            ("a", "tx_packets", 1),
            ("c", "tx_packets", 1),
        ],
    );

    // An avail entry naming a descriptor past the table: counted, and not returned (no
    // used entry can name it); the good chain after it is.
    let b = lab.g("b");
    b.tx.make_available(&b.mem, QUEUE_SIZE + 7);
    let (chain, _) = b.tx_chain(&[0; NET_HDR], &good, Shape::Joined);
    b.submit(&chain, false);
    lab.expect_rx(
        "a good frame after an avail entry past the table",
        &[("a", vec![good.clone()]), ("c", vec![tagged(&good, 10)])],
    );
    lab.expect_counters(
        "an avail entry past the table, then a good frame",
        &[
            ("b", "drop_malformed", 1),
            ("b", "rx_packets", 1),
            ("a", "tx_packets", 1),
            ("c", "tx_packets", 1),
        ],
    );

    // A bogus avail index on b's transmit ring (more than the queue size ahead): the switch
    // neither hangs nor crashes, other ports forward, and b works again once it is fixed.
    let b = lab.g("b");
    let real = b.tx.next_avail();
    b.tx.set_avail_idx(&b.mem, real.wrapping_add(QUEUE_SIZE + 44));
    b.tx.kick();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab
        .sw
        .log()
        .lines()
        .any(|l| l.contains("unusable transmit ring") && l.contains("port=b"))
    {
        lab.sw.assert_alive("a bogus avail index");
        assert!(
            Instant::now() < deadline,
            "the switch did not report b's bogus avail index:\n{}",
            lab.sw.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    lab.sw.assert_alive("a bogus avail index");
    let f = eth(BROADCAST, MAC_A, None, 80, 4);
    lab.g("a").send(&f, Shape::Split);
    lab.expect_rx(
        "a broadcast while b's transmit ring is broken",
        &[("b", vec![f.clone()]), ("c", vec![tagged(&f, 10)])],
    );
    let b = lab.g("b");
    b.tx.set_avail_idx(&b.mem, real);
    let f = eth(MAC_A, MAC_B, None, 90, 5);
    lab.g("b").send(&f, Shape::Split);
    lab.expect_rx("b after its avail index is fixed", &[("a", vec![f])]);
    lab.expect_counters(
        "a bogus avail index on b's transmit ring",
        &[
            ("b", "ring_errors", 1),
            ("a", "rx_packets", 1),
            ("b", "tx_packets", 1),
            ("c", "tx_packets", 1),
            ("b", "rx_packets", 1),
            ("a", "tx_packets", 1),
        ],
    );

    // A bogus avail index on b's receive ring: frames for b are dropped for b alone.
    let b = lab.g("b");
    let real = b.rx.next_avail();
    b.rx.set_avail_idx(&b.mem, real.wrapping_add(QUEUE_SIZE + 1));
    let f = eth(BROADCAST, MAC_A, None, 70, 6);
    lab.g("a").send(&f, Shape::Split);
    lab.expect_rx(
        "a broadcast while b's receive ring is broken",
        &[("c", vec![tagged(&f, 10)])],
    );
    lab.expect_counters(
        "a bogus avail index on b's receive ring",
        &[
            ("a", "rx_packets", 1),
            ("b", "drop_no_rx_buffer", 1),
            ("c", "tx_packets", 1),
        ],
    );
    let b = lab.g("b");
    b.rx.set_avail_idx(&b.mem, real);
    lab.g("a").send(&f, Shape::Split);
    lab.expect_rx(
        "b's receive ring fixed",
        &[("b", vec![f.clone()]), ("c", vec![tagged(&f, 10)])],
    );
    lab.sw.assert_alive("hostile chains");
    lab.sw.stop();
}

/// A guest that sends nothing but bad chains gets one log line a second for that cause,
/// with the count held back, however many it sends; the counter has them all.
#[test]
fn a_flood_of_bad_chains_is_logged_once_a_second() {
    let mut lab = Lab::start([32; 4]);
    let b = lab.g("b");
    let hdr = b.tx_area();
    put(&b.mem, hdr, &[0; NET_HDR]);
    const FLOOD: u64 = 1000;
    let started = Instant::now();
    for _ in 0..FLOOD {
        lab.g("b").submit(&[ro(hdr, 8)], false);
    }
    let secs = started.elapsed().as_secs();
    lab.expect_counters("a flood of short chains", &[("b", "drop_malformed", FLOOD)]);
    let lines = lab
        .sw
        .log()
        .lines()
        .filter(|l| l.contains("dropped a frame") && l.contains("port=b"))
        .count() as u64;
    assert!(
        (1..=secs + 1).contains(&lines),
        "{FLOOD} bad chains in {secs} s logged {lines} lines:\n{}",
        lab.sw.log()
    );
    lab.sw.stop();
}

/// A guest that rewrites its frame's header while the switch forwards it (a double fetch:
/// checked in guest memory, copied from it later) must not get out anything other than
/// what was checked. b (access VLAN 10) sends broadcasts while a thread of "its" flips the
/// header, byte by byte, to a unicast for a, tagged for VLAN 20. The access port a must
/// never receive a tagged frame, and the trunk c never a tag inside VLAN 10's tag nor a
/// frame for a (whose MAC the switch knows).
#[test]
fn a_guest_racing_its_own_header_gets_out_only_what_was_checked() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut lab = Lab::start([64; 4]);
    // a's MAC is learned, so a frame for it goes to a alone.
    let hello = eth(MAC_B, MAC_A, None, 60, 1);
    lab.g("a").send(&hello, Shape::Joined);
    lab.expect_rx(
        "a says hello",
        &[("b", vec![hello.clone()]), ("c", vec![tagged(&hello, 10)])],
    );
    let good = eth(BROADCAST, MAC_B, None, 60, 2);
    let mut evil = good.clone();
    evil[..6].copy_from_slice(&MAC_A);
    evil[12..16].copy_from_slice(&[0x81, 0x00, 0x00, 20]);
    let b = lab.g("b");
    let at = host_addr(&b.mem, b.tx_area() + NET_HDR as u64) as usize;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, good, evil) = (stop.clone(), good.clone(), evil.clone());
        std::thread::spawn(move || {
            let p = at as *mut u8;
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for src in [&evil, &good] {
                    for (i, &byte) in src[..16].iter().enumerate() {
                        // SAFETY: b's transmit area, mapped for as long as the lab lives,
                        // which outlives this thread (joined below).
                        unsafe { p.add(i).write_volatile(byte) };
                    }
                }
                flips += 1;
            }
            flips
        })
    };
    const FRAMES: usize = 3000;
    let (mut at_a, mut at_c) = (0, 0);
    for n in 0..FRAMES {
        lab.g("b").send(&good, Shape::Joined);
        if n % 16 != 15 && n != FRAMES - 1 {
            continue;
        }
        for name in ["a", "c", "d"] {
            let g = lab.g(name);
            let got = g.receive();
            let chains: usize = got.iter().map(|r| r.chains).sum();
            g.post_rx(chains as u16);
            for r in &got {
                let f = &r.frame;
                match name {
                    "a" => {
                        at_a += 1;
                        assert_ne!(
                            f[12..14],
                            [0x81, 0x00],
                            "a tagged frame reached access port a"
                        );
                    }
                    "c" => {
                        at_c += 1;
                        assert_eq!(f[12..16], [0x81, 0x00, 0x00, 10], "c: VLAN 10's tag");
                        assert_ne!(f[16..18], [0x81, 0x00], "c: a tag inside VLAN 10's");
                        assert_ne!(f[..6], MAC_A, "c: a frame for a, which the switch knows");
                    }
                    _ => panic!("VLAN 20's port d received a frame: {:02x?}", &f[..18]),
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().expect("flipper");
    lab.sw.assert_alive("a racing guest");
    assert!(
        flips > FRAMES as u64,
        "the header flipped only {flips} times"
    );
    // Both forms went through (or the race was never run).
    assert!(at_a > 0 && at_c > 0, "a received {at_a}, c {at_c}");
    lab.sw.stop();
}

/// A guest that sends from ever new source MACs fills the forwarding table; other ports'
/// stations must still be learned (before, a full table refused every port), and its
/// flood must not push them out.
#[test]
fn a_port_flooding_source_macs_does_not_crowd_out_the_others() {
    let mut lab = Lab::with_switch("mac_table_size = 64", [64; 4]);
    const FLOOD: u32 = 500;
    let flood = |lab: &mut Lab, from: u32| {
        for i in from..from + FLOOD {
            let src = [0x02, 0xbb, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            let f = eth(MAC_C, src, None, 60, 3);
            lab.g("b").send(&f, Shape::Joined);
            // Floods to a and c (MAC_C is unknown at first); keep their rings supplied.
            if i % 32 == 31 {
                for name in ["a", "c"] {
                    let g = lab.g(name);
                    let chains: usize = g.receive().iter().map(|r| r.chains).sum();
                    g.post_rx(chains as u16);
                }
            }
        }
        for name in ["a", "c"] {
            let g = lab.g(name);
            let chains: usize = g.receive().iter().map(|r| r.chains).sum();
            g.post_rx(chains as u16);
        }
    };
    flood(&mut lab, 0);
    // a speaks once in the full table: it is learned, so a frame for it reaches a alone.
    let hello = eth(BROADCAST, MAC_A, None, 60, 4);
    lab.g("a").send(&hello, Shape::Joined);
    lab.expect_rx(
        "a's broadcast",
        &[("b", vec![hello.clone()]), ("c", vec![tagged(&hello, 10)])],
    );
    // b floods on; a's entry, seen less often than b's newest, must survive all the same.
    flood(&mut lab, FLOOD);
    let to_a = eth(MAC_A, MAC_B, None, 60, 5);
    lab.g("b").send(&to_a, Shape::Joined);
    lab.expect_rx("a frame for a", &[("a", vec![to_a])]);
    let stats = lab.sw.stats();
    assert_eq!(
        counter(&stats["a"], "fdb_full"),
        1,
        "a learned into a full table"
    );
    assert!(counter(&stats["b"], "fdb_evicted") >= u64::from(2 * FLOOD - 64));
    assert_eq!(counter(&stats["a"], "fdb_evicted"), 0, "a's entry kept");
    let fdb = lab.sw.ctl_json(&["fdb"]);
    let entries = fdb["fdb"].as_array().expect("ctl fdb: an fdb array");
    assert!(
        (60..=64).contains(&entries.len()),
        "the table holds {} entries",
        entries.len()
    );
    assert!(entries
        .iter()
        .any(|e| e["mac"] == "52:54:00:00:00:0a" && e["port"] == "a"));
    lab.sw.stop();
}

/// 4. A port without receive buffers loses frames alone; the sender never stalls.
#[test]
fn no_receive_buffers() {
    let mut lab = Lab::start([32, 0, 128, 8]);
    // 40 broadcasts from a in one go (more than a transmit batch).
    let f = eth(BROADCAST, MAC_A, None, 60, 1);
    let a = lab.g("a");
    let (chain, _) = a.tx_chain(&[0; NET_HDR], &f, Shape::Split);
    for _ in 0..40 {
        a.tx.post(&a.mem, &chain, false);
    }
    a.tx.kick();
    let used = a.tx.wait_used(&a.mem, 40);
    assert!(
        used.iter().all(|&(_, len)| len == 0),
        "transmit used lengths"
    );
    lab.expect_rx(
        "40 broadcasts, b without buffers",
        &[("c", vec![tagged(&f, 10); 40])],
    );
    lab.expect_counters(
        "40 broadcasts, b without buffers",
        &[
            ("a", "rx_packets", 40),
            ("b", "drop_no_rx_buffer", 40),
            ("c", "tx_packets", 40),
        ],
    );

    // b posts 7 buffers: of 10 more broadcasts it gets 7.
    let b = lab.g("b");
    b.post_rx(7);
    b.rx.kick();
    let a = lab.g("a");
    for _ in 0..10 {
        a.tx.post(&a.mem, &chain, false);
    }
    a.tx.kick();
    a.tx.wait_used(&a.mem, 10);
    lab.expect_rx(
        "10 broadcasts, b with 7 buffers",
        &[("b", vec![f.clone(); 7]), ("c", vec![tagged(&f, 10); 10])],
    );
    lab.expect_counters(
        "10 broadcasts, b with 7 buffers",
        &[
            ("a", "rx_packets", 10),
            ("b", "tx_packets", 7),
            ("b", "drop_no_rx_buffer", 3),
            ("c", "tx_packets", 10),
        ],
    );

    // With buffers again, delivery resumes.
    let b = lab.g("b");
    b.post_rx(4);
    b.rx.kick();
    // (b has sent nothing, so its MAC is unknown and the frame floods.)
    let f = eth(MAC_B, MAC_A, None, 300, 2);
    lab.g("a").send(&f, Shape::Split);
    lab.expect_rx(
        "after b posted buffers",
        &[("b", vec![f.clone()]), ("c", vec![tagged(&f, 10)])],
    );
    lab.expect_counters(
        "after b posted buffers",
        &[
            ("a", "rx_packets", 1),
            ("b", "tx_packets", 1),
            ("c", "tx_packets", 1),
        ],
    );
    lab.sw.stop();
}

/// 5. Calls follow used_event with EVENT_IDX, and VRING_AVAIL_F_NO_INTERRUPT without.
#[test]
fn interrupt_suppression() {
    let mut lab = Lab::start([32; 4]);
    for g in lab.guests.iter().flatten() {
        g.rx.called();
        g.tx.called();
    }
    let f = eth(BROADCAST, MAC_A, None, 60, 1);

    // a's transmit ring (EVENT_IDX): used_event two ahead; the call comes with the third.
    let a = lab.g("a");
    let seen = a.tx.used_seen();
    a.tx.set_used_event(&a.mem, seen.wrapping_add(2));
    for (k, want) in [false, false, true].into_iter().enumerate() {
        a.send_quiet(&f);
        assert_eq!(
            a.tx.called(),
            want,
            "EVENT_IDX: frame {k} after used_event = used + 2: a call only when the used \
             index passes used_event"
        );
    }
    // used_event far ahead: no calls.
    let seen = a.tx.used_seen();
    a.tx.set_used_event(&a.mem, seen.wrapping_add(100));
    for k in 0..4 {
        a.send_quiet(&f);
        assert!(
            !a.tx.called(),
            "EVENT_IDX: frame {k} with used_event 100 ahead must not call"
        );
    }

    // b's receive ring (EVENT_IDX): far ahead, no call; at the next entry, a call.
    let b = lab.g("b");
    assert_eq!(b.receive().len(), 7, "b received a's broadcasts");
    b.rx.called();
    let seen = b.rx.used_seen();
    b.rx.set_used_event(&b.mem, seen.wrapping_add(100));
    for _ in 0..3 {
        lab.g("a").send_quiet(&f);
    }
    let b = lab.g("b");
    assert!(
        !b.rx.called(),
        "EVENT_IDX: receive ring with used_event 100 ahead must not call"
    );
    assert_eq!(b.receive().len(), 3);
    b.rx.set_used_event(&b.mem, b.rx.used_seen());
    lab.g("a").send_quiet(&f);
    let b = lab.g("b");
    assert!(
        b.rx.called(),
        "EVENT_IDX: receive ring must call when the used index passes used_event"
    );
    assert_eq!(b.receive().len(), 1);

    // d (no EVENT_IDX): NO_INTERRUPT suppresses calls on its transmit ring, clear flags
    // bring them back.
    let f20 = eth(BROADCAST, MAC_D, None, 60, 2);
    let d = lab.g("d");
    d.tx.set_avail_flags(&d.mem, VRING_AVAIL_F_NO_INTERRUPT as u16);
    for k in 0..3 {
        d.send_quiet(&f20);
        assert!(
            !d.tx.called(),
            "no EVENT_IDX: frame {k} with VRING_AVAIL_F_NO_INTERRUPT must not call"
        );
    }
    d.tx.set_avail_flags(&d.mem, 0);
    d.send_quiet(&f20);
    assert!(
        d.tx.called(),
        "no EVENT_IDX: clear avail flags must bring a call"
    );

    // ... and on its receive ring.
    let t20 = eth(BROADCAST, MAC_C, Some(20), 60, 3);
    let d = lab.g("d");
    d.rx.set_avail_flags(&d.mem, VRING_AVAIL_F_NO_INTERRUPT as u16);
    lab.g("c").send_quiet(&t20);
    let d = lab.g("d");
    assert!(
        !d.rx.called(),
        "no EVENT_IDX: receive ring with VRING_AVAIL_F_NO_INTERRUPT must not call"
    );
    d.rx.set_avail_flags(&d.mem, 0);
    lab.g("c").send_quiet(&t20);
    let d = lab.g("d");
    assert!(
        d.rx.called(),
        "no EVENT_IDX: receive ring with clear flags must call"
    );
    assert_eq!(d.receive().len(), 2);

    // The switch never waits for receive buffers (a full ring drops the frame), so the
    // first receive kick turns further ones off: a polling driver such as DPDK's, which
    // does not negotiate EVENT_IDX, would otherwise make a syscall per refill.
    let d = lab.g("d");
    d.post_rx(1);
    d.rx.kick();
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.rx.used_flags(&d.mem) & VRING_USED_F_NO_NOTIFY as u16 == 0 {
        assert!(
            Instant::now() < deadline,
            "no EVENT_IDX: a receive kick must set VRING_USED_F_NO_NOTIFY"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    lab.g("c").send_quiet(&t20);
    assert_eq!(lab.g("d").receive().len(), 1, "d still receives");
    lab.sw.stop();
}

/// 6. One port's frontend goes away and a new one comes, while the others forward.
#[test]
fn reconnect_while_others_forward() {
    let mut lab = Lab::start([32; 4]);
    let fa = eth(BROADCAST, MAC_A, None, 60, 1);
    let fb = eth(BROADCAST, MAC_B, None, 60, 2);
    for _ in 0..3 {
        lab.g("b").send(&fb, Shape::Split);
    }
    for _ in 0..2 {
        lab.g("a").send(&fa, Shape::Split);
    }
    lab.expect_rx(
        "before the reconnect",
        &[
            ("a", vec![fb.clone(); 3]),
            ("b", vec![fa.clone(); 2]),
            (
                "c",
                [vec![tagged(&fb, 10); 3], vec![tagged(&fa, 10); 2]].concat(),
            ),
        ],
    );

    // GET_VRING_BASE: the next avail index of each ring (3 frames sent, 2 buffers used).
    let b = lab.g("b");
    let tx_base = b.fe.get_vring_base(TX).expect("GET_VRING_BASE of b's TX");
    let rx_base = b.fe.get_vring_base(RX).expect("GET_VRING_BASE of b's RX");
    assert_eq!(
        (tx_base, rx_base),
        (3, 2),
        "GET_VRING_BASE must return the next avail index: 3 frames sent, 2 buffers filled"
    );
    lab.guests[index("b")] = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab.sw.guest_connected("b") {
        assert!(
            Instant::now() < deadline,
            "b's frontend is gone but the switch still has its receive ring"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    lab.stats = lab.sw.stats();

    // Without b, a still reaches the trunk; b's copy is dropped for b.
    lab.g("a").send(&fa, Shape::Joined);
    lab.expect_rx("b disconnected", &[("c", vec![tagged(&fa, 10)])]);
    lab.expect_counters(
        "b disconnected",
        &[
            ("a", "rx_packets", 1),
            ("b", "drop_no_rx_buffer", 1),
            ("c", "tx_packets", 1),
        ],
    );

    // A new frontend on b, with other memory: negotiation is checked again.
    let g = Guest::connect(&lab.sw, &PORTS[index("b")], B_AGAIN, 16);
    lab.guests[index("b")] = Some(g);
    lab.stats = lab.sw.stats();
    // b's MAC was forgotten with its guest: a frame for it floods.
    let f = eth(MAC_B, MAC_A, None, 700, 3);
    lab.g("a").send(&f, Shape::Indirect);
    lab.expect_rx(
        "unicast to b after the reconnect (unknown: flooded)",
        &[("b", vec![f.clone()]), ("c", vec![tagged(&f, 10)])],
    );
    let f = eth(MAC_A, MAC_B, None, 1000, 4);
    lab.g("b").send(&f, Shape::Split);
    lab.expect_rx("b -> a after the reconnect", &[("a", vec![f])]);
    let f = eth(MAC_B, MAC_A, None, 64, 5);
    lab.g("a").send(&f, Shape::Split);
    lab.expect_rx("a -> b, learned again", &[("b", vec![f])]);
    lab.expect_counters(
        "after the reconnect",
        &[
            ("a", "rx_packets", 2),
            ("b", "rx_packets", 1),
            ("a", "tx_packets", 1),
            ("b", "tx_packets", 2),
            ("c", "tx_packets", 1),
        ],
    );
    let b = lab.g("b");
    let tx_base = b.fe.get_vring_base(TX).expect("GET_VRING_BASE of b's TX");
    assert_eq!(tx_base, 1, "the new session's transmit ring started at 0");
    lab.sw.stop();
}

/// 7. A port's guest is never handed a frame larger than the MTU its config space
///    advertises (virtio 1.x, 5.1.4.1: with VIRTIO_NET_F_MTU negotiated "the device MUST NOT
///    pass received packets that exceed mtu (plus low level ethernet header length) size").
///    The trunk c has MTU 9000, d has 1400 and a 1500.
#[test]
fn egress_respects_destination_mtu() {
    let mut lab = Lab::start([64, 32, 32, 32]);
    // Exactly d's MTU: delivered.
    let f = eth(BROADCAST, MAC_C, Some(20), 1418, 1);
    lab.g("c").send(&f, Shape::Split);
    lab.expect_rx("a frame of d's MTU", &[("d", vec![untagged(&f)])]);
    // One byte over d's MTU (well within c's): not for d.
    let f = eth(BROADCAST, MAC_C, Some(20), 1419, 2);
    lab.g("c").send(&f, Shape::Split);
    lab.expect_rx("a frame one byte over d's MTU", &[]);
    // A jumbo frame on VLAN 10: not for a or b (MTU 1500).
    let f = eth(BROADCAST, MAC_C, Some(10), 9018, 3);
    lab.g("c").send(&f, Shape::Split);
    lab.expect_rx("a 9000-byte frame to ports of MTU 1500", &[]);
    lab.sw.stop();
}

/// 8. A receive chain the switch cannot use (its buffer lies outside guest memory) is
///    returned on its own, with length 0, and is no part of a frame: the frame goes to the
///    next chains, with num_buffers counting only those, on a port with MRG_RXBUF (b) and
///    on one without (d).
#[test]
fn malformed_receive_chain_is_returned_alone() {
    let mut lab = Lab::start([32, 0, 32, 0]);
    for (port, sender, frame) in [
        ("b", "a", eth(BROADCAST, MAC_A, None, 100, 1)),
        ("d", "c", eth(BROADCAST, MAC_C, Some(20), 100, 2)),
    ] {
        let g = lab.g(port);
        let hole = g.layout.hole;
        let bad = g.rx.post(&g.mem, &[wo(hole, 512)], false);
        g.post_rx(2);
        g.rx.kick();
        lab.g(sender).send(&frame, Shape::Split);
        let g = lab.g(port);
        let used = g.rx.take_used(&g.mem);
        assert_eq!(
            used.first().copied(),
            Some((u32::from(bad), 0)),
            "port {port}: the malformed receive chain must come back first, with length 0 \
             (used ring {used:?})"
        );
        assert_eq!(
            used.len(),
            2,
            "port {port}: then the frame in one buffer (used ring {used:?})"
        );
        let (id, len) = used[1];
        let addr = g.rx_bufs[&(id as u16)];
        let got = get(&g.mem, addr, len as usize);
        assert_eq!(
            le16(&got, 10),
            1,
            "port {port}: num_buffers must count only the chain that holds the frame"
        );
        let want = if port == "d" { untagged(&frame) } else { frame };
        assert!(got[NET_HDR..] == want[..], "port {port}: frame content");
    }
    lab.sw.stop();
}

/// 9. IN_ORDER: receive buffers come back in the order they were posted, an unusable
///    one between two good ones included.
#[test]
fn receive_buffers_are_used_in_ring_order() {
    let mut lab = Lab::start([32, 0, 32, 0]);
    let g = lab.g("b");
    g.post_rx(1);
    let hole = g.layout.hole;
    let bad = g.rx.post(&g.mem, &[wo(hole, 512)], false);
    g.post_rx(1);
    g.rx.kick();
    let frames = [
        eth(BROADCAST, MAC_A, None, 100, 1),
        eth(BROADCAST, MAC_A, None, 100, 2),
    ];
    // Both in one transmit batch, so that one delivery takes all three receive chains.
    let a = lab.g("a");
    for (k, f) in frames.iter().enumerate() {
        let at = a.tx_area() + 0x1000 * k as u64;
        put(&a.mem, at, &[0; NET_HDR]);
        put(&a.mem, at + NET_HDR as u64, f);
        a.tx.post(&a.mem, &[ro(at, (NET_HDR + f.len()) as u32)], false);
    }
    a.tx.kick();
    a.tx.wait_used(&a.mem, 2);
    let g = lab.g("b");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut used = Vec::new();
    while used.len() < 3 && Instant::now() < deadline {
        used.extend(g.rx.take_used(&g.mem));
        std::thread::sleep(Duration::from_millis(5));
    }
    let ids: Vec<u32> = used.iter().map(|&(id, _)| id).collect();
    let (first, last) = (ids.first().copied(), ids.last().copied());
    assert_eq!(
        ids.len(),
        3,
        "two frames and the unusable chain (used ring {used:?})"
    );
    assert_eq!(
        used[1],
        (u32::from(bad), 0),
        "the unusable chain comes back second, where it was posted (used ring {used:?})"
    );
    for (k, id) in [first, last].into_iter().enumerate() {
        let id = id.expect("an id") as u16;
        let addr = g.rx_bufs[&id];
        let len = used[if k == 0 { 0 } else { 2 }].1 as usize;
        let got = get(&g.mem, addr, len);
        assert!(
            got[NET_HDR..] == frames[k][..],
            "frame {k} in the {} good buffer",
            if k == 0 { "first" } else { "second" }
        );
    }
    lab.sw.stop();
}
