//! End-to-end with `dpdk-testpmd` virtio-user ports (real DPDK virtio-net drivers) on
//! vswitch ports: a broadcast flood stays in its VLAN, anti-spoofing drops frames from any
//! MAC but the port's own, and a port's MAC limit stops frames from new source MACs.
//!
//! Each test starts its own vswitch with a config in a temp dir. After each burst it waits
//! until the switch has accounted for every frame the sender's port sent (`vswitch ctl
//! stats`: forwarded or dropped for a reason), checks where the switch put them, then waits
//! until the receiving testpmd has counted exactly the frames the switch delivered to it.
//! So no check depends on timing, and a zero is a real zero.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::testpmd::{self, Testpmd, BROADCAST};
use e2e::vswitch::{get, Counters, Switch};

/// How long each burst lasts: many thousand frames even on a busy 2-core machine.
const BURST: Duration = Duration::from_millis(700);
/// Time allowed for the switch, then the receiver, to account for a burst.
const SETTLE: Duration = Duration::from_secs(15);

/// The counters that account for a frame a port's driver sent: forwarded (`rx_packets`,
/// named from the switch's side) or dropped on ingress for one of these reasons.
const INGRESS: [&str; 7] = [
    "rx_packets",
    "drop_spoof",
    "drop_vlan",
    "drop_mac_limit",
    "drop_mtu",
    "drop_malformed",
    "drop_storm",
];

/// Wait until the switch has accounted for all `sent` frames `port`'s driver has sent
/// (see [`INGRESS`]); then every port's counters.
fn wait_ingress(switch: &Switch, port: &str, sent: u64) -> HashMap<String, Counters> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let all = switch.stats();
        let c = &all[port];
        let seen: u64 = INGRESS.iter().map(|k| get(c, k)).sum();
        assert!(
            seen <= sent,
            "the switch accounts for {seen} frames from {port}, whose driver sent {sent}: {c:?}"
        );
        if seen == sent {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "after {SETTLE:?} the switch accounts for only {seen} of the {sent} frames \
             {port}'s driver sent: {c:?}\n{}",
            switch.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The learned addresses of `port`, as `vlan mac` strings.
fn fdb_of(switch: &Switch, port: &str) -> Vec<String> {
    let text = switch.ctl(&["fdb"]);
    let mut macs: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3 && w[2] == port).then(|| format!("{} {}", w[0], w[1]))
        })
        .collect();
    macs.sort();
    macs
}

/// `key` of `port`, now minus before.
fn grew(
    now: &HashMap<String, Counters>,
    before: &HashMap<String, Counters>,
    port: &str,
    key: &str,
) -> u64 {
    get(&now[port], key) - get(&before[port], key)
}

/// Wait until receiver port `port` has counted `want` frames in all, then check it is
/// exactly that many.
fn wait_rx(rx: &mut Testpmd, port: usize, want: u64) -> u64 {
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = rx.stats()[port].rx_packets;
        assert!(
            got <= want,
            "receiver port {port} counted {got} frames, the switch delivered {want}"
        );
        if got == want {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "receiver port {port} counted {got} of the {want} frames the switch delivered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A receiver: rxonly on every port, forwarding on core 0.
fn receiver(ports: &[(&Path, &str)]) -> Testpmd {
    let mut b = Testpmd::builder("rx").forward_lcore(0);
    for (sock, mac) in ports {
        b = b.port(sock, mac);
    }
    let mut rx = b.spawn();
    rx.set_fwd("rxonly");
    rx.start();
    rx
}

/// A sender: txonly of 64-byte broadcast frames on every port, forwarding on core 1;
/// not started.
fn sender(ports: &[(&Path, &str)]) -> Testpmd {
    let mut b = Testpmd::builder("tx").forward_lcore(1).arg("--txpkts=64");
    for (sock, mac) in ports {
        b = b.port(sock, mac);
    }
    let mut tx = b.spawn();
    tx.set_fwd("txonly");
    for port in 0..ports.len() as u16 {
        tx.set_eth_peer(port, BROADCAST);
    }
    tx
}

#[test]
fn broadcast_flood_stays_in_its_vlan() {
    if !testpmd::require_testpmd(2) {
        return;
    }
    let started = Instant::now();
    let switch = Switch::start(&[
        ("a10", "vlan = 10"),
        ("b10", "vlan = 10"),
        ("a20", "vlan = 20"),
        ("b20", "vlan = 20"),
    ]);
    let sock = |n: &str| switch.socket(n);
    let (a10, b10, a20, b20) = (sock("a10"), sock("b10"), sock("a20"), sock("b20"));
    // Receiver port 0 is b10 and port 1 b20; sender port 0 is a10 and port 1 a20.
    let mut rx = receiver(&[(&b10, "02:00:00:00:10:02"), (&b20, "02:00:00:00:20:02")]);
    let mut tx = sender(&[(&a10, "02:00:00:00:10:01"), (&a20, "02:00:00:00:20:01")]);

    let mut before = switch.stats();
    let mut received = [0u64; 2];
    let mut sent = [0u64; 2];
    // (sending port, its switch port, same-VLAN receiver, other-VLAN receiver, other-VLAN sender)
    let floods = [
        (0usize, "a10", (0usize, "b10"), (1usize, "b20"), "a20"),
        (1, "a20", (1, "b20"), (0, "b10"), "a10"),
    ];
    for (port, from, (same, same_name), (other, other_name), other_sender) in floods {
        tx.set_portlist(&[port as u16]);
        tx.run_for(BURST);
        let t = tx.stats();
        let burst = t[port].tx_packets - sent[port];
        assert!(burst > 0, "{from} sent nothing: {t:?}");
        assert_eq!(
            t[1 - port].tx_packets,
            sent[1 - port],
            "only {from} should have sent"
        );
        sent[port] = t[port].tx_packets;
        let now = wait_ingress(&switch, from, sent[port]);
        let grew = |p: &str, k: &str| grew(&now, &before, p, k);
        assert_eq!(grew(from, "rx_packets"), burst, "{from}: {:?}", now[from]);
        // Flooded to exactly the other port of its VLAN: into its ring or dropped there
        // for want of receive buffers (the receiver polls on a shared core).
        let delivered = grew(same_name, "tx_packets");
        assert_eq!(
            delivered + grew(same_name, "drop_no_rx_buffer"),
            burst,
            "{same_name}, the other port of {from}'s VLAN, must get each of its {burst} frames: {:?}",
            now[same_name]
        );
        assert!(delivered > 0, "{same_name} got none of {from}'s frames");
        for p in [other_name, other_sender] {
            assert_eq!(
                (grew(p, "tx_packets"), grew(p, "drop_no_rx_buffer")),
                (0, 0),
                "{p} is on the other VLAN: the switch must not even try to deliver {from}'s flood to it: {:?}",
                now[p]
            );
        }
        received[same] = wait_rx(&mut rx, same, received[same] + delivered);
        let r = rx.stats();
        assert_eq!(
            r[other].rx_packets, received[other],
            "{other_name} received frames of the other VLAN's flood"
        );
        before = now;
    }
    tx.quit();
    rx.quit();
    switch.stop();
    eprintln!(
        "flood: VLAN 10 sent {} and received {}, VLAN 20 sent {} and received {}; {:.1?}",
        sent[0],
        received[0],
        sent[1],
        received[1],
        started.elapsed()
    );
}

#[test]
fn anti_spoof_passes_only_the_port_mac() {
    if !testpmd::require_testpmd(2) {
        return;
    }
    let started = Instant::now();
    const OWN: &str = "02:00:00:00:0a:01";
    const SPOOFED: &str = "02:00:00:00:0b:ad";
    let switch = Switch::start(&[
        (
            "vm",
            "vlan = 10\nmac = \"02:00:00:00:0a:01\"\nanti_spoof = true",
        ),
        ("peer", "vlan = 10"),
    ]);
    let (vm, peer) = (switch.socket("vm"), switch.socket("peer"));
    let mut rx = receiver(&[(&peer, "02:00:00:00:0a:02")]);
    // The driver claims another MAC than the port's: every frame it sends is spoofed.
    let mut tx = sender(&[(&vm, SPOOFED)]);
    let before = switch.stats();
    tx.run_for(BURST);
    let spoofed = tx.stats()[0].tx_packets;
    assert!(spoofed > 0, "the sender sent nothing");
    let now = wait_ingress(&switch, "vm", spoofed);
    assert_eq!(
        grew(&now, &before, "vm", "drop_spoof"),
        spoofed,
        "every frame from {SPOOFED} on a port whose MAC is {OWN} is dropped and counted: {:?}",
        now["vm"]
    );
    for k in ["tx_packets", "drop_no_rx_buffer"] {
        assert_eq!(
            grew(&now, &before, "peer", k),
            0,
            "peer {k}: {:?}",
            now["peer"]
        );
    }
    assert_eq!(rx.stats()[0].rx_packets, 0, "peer received spoofed frames");
    assert_eq!(
        fdb_of(&switch, "vm"),
        Vec::<String>::new(),
        "a spoofed MAC was learned"
    );

    // The same port sending from its own MAC goes through.
    tx.set_mac(0, OWN);
    let before = now;
    tx.run_for(BURST);
    let own = tx.stats()[0].tx_packets - spoofed;
    assert!(own > 0, "the sender sent nothing from {OWN}");
    let now = wait_ingress(&switch, "vm", spoofed + own);
    assert_eq!(
        grew(&now, &before, "vm", "rx_packets"),
        own,
        "frames from the port's own MAC are forwarded: {:?}",
        now["vm"]
    );
    let delivered = grew(&now, &before, "peer", "tx_packets");
    assert_eq!(
        delivered + grew(&now, &before, "peer", "drop_no_rx_buffer"),
        own,
        "peer: {:?}",
        now["peer"]
    );
    assert!(
        delivered > 0,
        "peer got none of the {own} frames from {OWN}"
    );
    let received = wait_rx(&mut rx, 0, delivered);
    assert_eq!(fdb_of(&switch, "vm"), [format!("10 {OWN}")]);
    tx.quit();
    rx.quit();
    switch.stop();
    eprintln!(
        "anti-spoof: {spoofed} frames from {SPOOFED} dropped, {own} from {OWN} sent and \
         {received} received; {:.1?}",
        started.elapsed()
    );
}

#[test]
fn mac_limit_drops_frames_from_new_macs() {
    if !testpmd::require_testpmd(2) {
        return;
    }
    let started = Instant::now();
    let switch = Switch::start(&[("vm", "vlan = 10\nmac_limit = 2"), ("peer", "vlan = 10")]);
    let (vm, peer) = (switch.socket("vm"), switch.socket("peer"));
    let mut rx = receiver(&[(&peer, "02:00:00:00:0c:02")]);
    // testpmd sends from its port's MAC only, so the port's MAC changes between bursts:
    // (source MAC, whether the switch may learn it with a limit of 2).
    let (m1, m2) = ("02:00:00:00:0c:01", "02:00:00:00:0c:11");
    let steps = [
        (m1, true),
        (m2, true),
        ("02:00:00:00:0c:12", false),
        ("02:00:00:00:0c:13", false),
        // A MAC learned before the limit was reached still passes.
        (m1, true),
    ];
    let mut tx = sender(&[(&vm, m1)]);
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut passed, mut refused) = (0u64, 0u64);
    let mut before = switch.stats();
    for (i, &(mac, allowed)) in steps.iter().enumerate() {
        if i > 0 {
            tx.set_mac(0, mac);
        }
        tx.run_for(BURST);
        let burst = tx.stats()[0].tx_packets - sent;
        sent += burst;
        assert!(burst > 0, "step {i}: nothing sent from {mac}");
        let now = wait_ingress(&switch, "vm", sent);
        let grew = |p: &str, k: &str| grew(&now, &before, p, k);
        let delivered = grew("peer", "tx_packets");
        if allowed {
            assert_eq!(
                grew("vm", "rx_packets"),
                burst,
                "step {i}: frames from {mac}, within the limit, are forwarded: {:?}",
                now["vm"]
            );
            assert_eq!(
                delivered + grew("peer", "drop_no_rx_buffer"),
                burst,
                "step {i}: {:?}",
                now["peer"]
            );
            assert!(delivered > 0, "step {i}: peer got none of {mac}'s frames");
            passed += burst;
        } else {
            assert_eq!(
                grew("vm", "drop_mac_limit"),
                burst,
                "step {i}: frames from {mac}, a third MAC on a port with mac_limit = 2, \
                 are dropped and counted: {:?}",
                now["vm"]
            );
            assert_eq!(
                (delivered, grew("peer", "drop_no_rx_buffer")),
                (0, 0),
                "step {i}: frames from {mac} reached peer: {:?}",
                now["peer"]
            );
            refused += burst;
        }
        received = wait_rx(&mut rx, 0, received + delivered);
        before = now;
    }
    let mut learned = vec![format!("10 {m1}"), format!("10 {m2}")];
    learned.sort();
    assert_eq!(fdb_of(&switch, "vm"), learned, "vm's learned MACs");
    tx.quit();
    rx.quit();
    switch.stop();
    eprintln!(
        "mac limit: {passed} frames from 2 MACs passed ({received} received), {refused} \
         from 2 more dropped; {:.1?}",
        started.elapsed()
    );
}

/// Sends 1518-byte frames as fast as testpmd can through a port limited to `bps` and
/// checks the rate the switch let through over a measured window, and that nothing was
/// dropped: the limit holds the frames in the sender's ring (backpressure).
fn tx_rate_limit(bps: u64) {
    if !testpmd::require_testpmd(2) {
        return;
    }
    // The port table outlives the test's switch; leaking one short string is fine here.
    let qos: &'static str = format!("vlan = 10\nqos = {{ tx_rate_bps = {bps} }}").leak();
    let switch = Switch::start(&[("a", qos), ("b", "vlan = 10")]);
    let (a, b) = (switch.socket("a"), switch.socket("b"));
    let mut rx = receiver(&[(&b, "02:00:00:00:10:02")]);
    let mut b_tx = Testpmd::builder("tx")
        .forward_lcore(1)
        .arg("--txpkts=1514")
        .port(&a, "02:00:00:00:10:01")
        .spawn();
    b_tx.set_fwd("txonly");
    b_tx.set_eth_peer(0, "02:00:00:00:10:02");
    b_tx.start();
    // Let the burst allowance drain, then measure over a window.
    std::thread::sleep(Duration::from_millis(600));
    let (t0, c0) = (Instant::now(), switch.stats());
    std::thread::sleep(Duration::from_secs(3));
    let (t1, c1) = (Instant::now(), switch.stats());
    b_tx.stop();
    let bytes = grew(&c1, &c0, "a", "rx_bytes");
    let measured = bytes as f64 * 8.0 / t1.duration_since(t0).as_secs_f64();
    let ratio = measured / bps as f64;
    eprintln!("limit {bps} bit/s: measured {measured:.0} bit/s ({ratio:.3})");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "limit {bps} bit/s, measured {measured:.0} bit/s ({ratio:.3} of the limit): {:?}",
        c1["a"]
    );
    for k in INGRESS.iter().filter(|k| **k != "rx_packets") {
        assert_eq!(
            get(&c1["a"], k),
            0,
            "{k} on the limited port: {:?}",
            c1["a"]
        );
    }
    assert!(
        get(&c1["a"], "tx_throttled") > 0,
        "the limit never held the ring back: {:?}",
        c1["a"]
    );
    // Everything the switch took from the sender went to the receiver's ring, or was
    // counted there when that ring was full (the receiving testpmd shares a core).
    let sent = b_tx.stats()[0].tx_packets;
    let all = wait_ingress(&switch, "a", sent);
    let delivered = get(&all["b"], "tx_packets");
    assert_eq!(
        delivered + get(&all["b"], "drop_no_rx_buffer"),
        sent,
        "frames unaccounted for between the ports: {:?}",
        all["b"]
    );
    wait_rx(&mut rx, 0, delivered);
    drop(b_tx);
    drop(rx);
    switch.stop();
}

#[test]
fn tx_rate_limit_100_mbit() {
    tx_rate_limit(100_000_000);
}

#[test]
fn tx_rate_limit_1_gbit() {
    tx_rate_limit(1_000_000_000);
}

/// Storm control caps the broadcast a port may send, and counts what it drops.
#[test]
fn storm_control_caps_broadcast() {
    if !testpmd::require_testpmd(2) {
        return;
    }
    let switch = Switch::start(&[
        ("a", "vlan = 10\nqos = { storm_pps = 1000 }"),
        ("b", "vlan = 10"),
    ]);
    let (a, b) = (switch.socket("a"), switch.socket("b"));
    let rx = receiver(&[(&b, "02:00:00:00:10:02")]);
    let mut tx = sender(&[(&a, "02:00:00:00:10:01")]);
    let before = switch.stats();
    tx.start();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    tx.stop();
    let elapsed = t0.elapsed().as_secs_f64();
    let sent = tx.stats()[0].tx_packets;
    let now = wait_ingress(&switch, "a", sent);
    let passed = grew(&now, &before, "a", "rx_packets");
    let dropped = grew(&now, &before, "a", "drop_storm");
    // 1000 pps for the time the sender ran, plus the bucket's 32-packet allowance.
    let allowed = 1000.0 * (elapsed + 0.2) + 32.0;
    assert!(
        dropped > 0,
        "a flood of {sent} frames must hit storm control"
    );
    assert!(
        (passed as f64) <= allowed,
        "{passed} broadcasts passed in {elapsed:.2} s, storm_pps = 1000 allows {allowed:.0}"
    );
    assert!(
        passed as f64 >= 1000.0 * elapsed * 0.8,
        "only {passed} broadcasts passed in {elapsed:.2} s at storm_pps = 1000"
    );
    let delivered =
        grew(&now, &before, "b", "tx_packets") + grew(&now, &before, "b", "drop_no_rx_buffer");
    assert_eq!(
        delivered, passed,
        "what passed storm control is flooded to b"
    );
    drop(tx);
    drop(rx);
    switch.stop();
}

/// CPU time (ns) all of process `pid`'s threads have run, from each thread's schedstat.
fn cpu_ns(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the threads");
    tasks
        .filter_map(|t| {
            let path = t.ok()?.path().join("schedstat");
            let text = std::fs::read_to_string(path).ok()?;
            text.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// The CPUs thread `name` of process `pid` may run on (`Cpus_allowed_list`).
fn thread_cpus(pid: u32, name: &str) -> Option<String> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).ok()?;
        return status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string());
    }
    None
}

/// The forwarding thread polls while frames flow, pinned to its core, and is seen doing so
/// by `vswitch ctl pmd`; once the traffic stops it goes to sleep, so the whole switch uses
/// under 1% of a core from a second after the last frame.
#[test]
fn forwarding_threads_poll_then_sleep() {
    if !testpmd::require_testpmd(2) {
        return;
    }
    let switch = Switch::with_config(
        "pmd_cores = [0]\npoll_us = 1000",
        &[("a", "vlan = 10"), ("b", "vlan = 10")],
    );
    let (a, b) = (switch.socket("a"), switch.socket("b"));
    let rx = receiver(&[(&b, "02:00:00:00:0d:02")]);
    let mut tx = sender(&[(&a, "02:00:00:00:0d:01")]);
    tx.run_for(BURST);
    let sent = tx.stats()[0].tx_packets;
    assert!(sent > 0, "the sender sent nothing");
    wait_ingress(&switch, "a", sent);

    let pmd = switch.ctl_json(&["pmd"]);
    let threads = pmd["pmds"].as_array().expect("pmds");
    assert_eq!(threads.len(), 1, "one thread per pmd_cores entry: {pmd}");
    let t = &threads[0];
    assert_eq!(t["core"], 0, "{pmd}");
    let queues = t["queues"].as_array().expect("queues");
    let qa = queues
        .iter()
        .find(|q| q["port"] == "a")
        .unwrap_or_else(|| panic!("port a's queue is not on the thread: {pmd}"));
    assert_eq!(
        qa["frames"].as_u64(),
        Some(sent),
        "the thread took every frame a sent: {pmd}"
    );
    assert!(t["busy_ns"].as_u64() > Some(0), "{pmd}");
    assert!(
        t["passes"].as_u64() > Some(0) && t["frames"].as_u64() >= Some(sent),
        "{pmd}"
    );
    assert_eq!(
        thread_cpus(switch.pid(), "pmd0").as_deref(),
        Some("0"),
        "pmd0 is pinned to core 0"
    );
    let text = switch.ctl(&["pmd"]);
    assert!(
        text.contains("pmd thread 0 (core 0)") && text.contains("port: a "),
        "ctl pmd: {text}"
    );

    // The sender stays connected, its queues empty: nothing to poll for.
    std::thread::sleep(Duration::from_secs(1));
    let window = Duration::from_secs(2);
    let before = cpu_ns(switch.pid());
    std::thread::sleep(window);
    let used = cpu_ns(switch.pid()) - before;
    assert!(
        (used as f64) < 0.01 * window.as_nanos() as f64,
        "idle, the switch used {:.2}% of a core: {}",
        used as f64 * 100.0 / window.as_nanos() as f64,
        switch.ctl(&["pmd"])
    );
    eprintln!(
        "pmd: {sent} frames, then {:.3}% of a core idle",
        used as f64 * 100.0 / window.as_nanos() as f64
    );
    tx.quit();
    rx.quit();
    switch.stop();
}

/// `rx_qN_*packets` of receiver `port`, per queue (`show port xstats`).
fn rx_queue_packets(rx: &mut Testpmd, port: u16, queues: usize) -> Vec<u64> {
    let text = rx.cmd(&format!("show port xstats {port}"));
    (0..queues)
        .map(|q| {
            let names = [
                format!("rx_q{q}_good_packets:"),
                format!("rx_q{q}_packets:"),
            ];
            text.lines()
                .find_map(|l| {
                    let l = l.trim();
                    names
                        .iter()
                        .find_map(|n| l.strip_prefix(n.as_str()))
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or_else(|| panic!("no {} in xstats:\n{text}", names[0]))
        })
        .collect()
}

/// Ports with two queue pairs (VIRTIO_NET_F_MQ, testpmd's virtio-user driver with
/// `queues=2`): the sender's two transmit queues are served by two forwarding threads, and
/// its many flows are spread over both of the receiver's queues, each flow to one.
#[test]
fn multiqueue_spreads_queues_over_threads_and_flows_over_queues() {
    if !testpmd::require_testpmd(2) {
        return;
    }
    let switch = Switch::with_config(
        "pmd_threads = 2",
        &[
            ("a", "vlan = 10\nqueues = 2"),
            ("b", "vlan = 10\nqueues = 2"),
        ],
    );
    let (a, b) = (switch.socket("a"), switch.socket("b"));
    let mut rx = Testpmd::builder("rx")
        .forward_lcore(0)
        .queues(2)
        .port(&b, "02:00:00:00:0e:02")
        .spawn();
    rx.set_fwd("rxonly");
    rx.start();
    let mut tx = Testpmd::builder("tx")
        .forward_lcore(1)
        .queues(2)
        .arg("--txpkts=64")
        // A new source IP for each frame: many flows.
        .arg("--txonly-multi-flow")
        .port(&a, "02:00:00:00:0e:01")
        .spawn();
    tx.set_fwd("txonly");
    tx.set_eth_peer(0, "02:00:00:00:0e:02");
    tx.run_for(BURST);
    let sent = tx.stats()[0].tx_packets;
    assert!(sent > 0, "the sender sent nothing");
    let now = wait_ingress(&switch, "a", sent);
    let delivered = get(&now["b"], "tx_packets");
    assert_eq!(
        delivered + get(&now["b"], "drop_no_rx_buffer"),
        sent,
        "b: {:?}",
        now["b"]
    );

    let pmd = switch.ctl_json(&["pmd"]);
    let mut a_queues = Vec::new();
    for t in pmd["pmds"].as_array().expect("pmds") {
        for q in t["queues"].as_array().expect("queues") {
            if q["port"] == "a" {
                a_queues.push((t["id"].as_u64(), q["queue"].clone(), q["frames"].as_u64()));
            }
        }
    }
    a_queues.sort_by_key(|q| q.1.to_string());
    assert_eq!(
        a_queues.len(),
        2,
        "both of a's transmit queues are served: {pmd}"
    );
    assert_ne!(a_queues[0].0, a_queues[1].0, "on two threads: {pmd}");
    assert!(
        a_queues.iter().all(|q| q.2 > Some(0)),
        "both carried frames: {pmd}"
    );
    let total: u64 = a_queues.iter().filter_map(|q| q.2).sum();
    assert_eq!(total, sent, "the threads took every frame a sent: {pmd}");

    wait_rx(&mut rx, 0, delivered);
    let per_queue = rx_queue_packets(&mut rx, 0, 2);
    assert_eq!(per_queue.iter().sum::<u64>(), delivered, "{per_queue:?}");
    assert!(
        per_queue.iter().all(|&n| n > delivered / 10),
        "the flows are spread over both receive queues: {per_queue:?}"
    );
    eprintln!("multiqueue: a's queues {a_queues:?}, b's receive queues {per_queue:?}");
    tx.quit();
    rx.quit();
    switch.stop();
}
