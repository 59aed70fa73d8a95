//! End-to-end with real QEMU guests on virtio-net-pci NICs whose vhost-user backends are
//! vswitch ports: guests on VLAN 10 reach each other, a guest on VLAN 20 sees none of
//! their frames; a guest reboots inside its QEMU and its traffic resumes without disturbing
//! the other port; a client-mode port follows its QEMU across restarts.

use std::collections::HashMap;
use std::time::Duration;

use e2e::guest::{self, wait_console, Guest, GuestOutput};
use e2e::vswitch::{get, Counters, Switch};

/// VLAN 10 with the switch's own address, the guests' gateway.
const VLAN10: &str = "[[vlan]]\nid = 10\nservice_ip = \"10.0.10.254/24\"\n";

/// A guest script: bring eth0 up with `ip`, ping `peers` until they answer (they boot at
/// their own pace), report, then stay up long enough for the others to finish.
fn pinger(ip: &str, peers: &[&str], attempts: u32, linger_s: u32) -> String {
    let mut s = format!(
        "ip link set eth0 up\nip addr add {ip}/24 dev eth0\necho RESULT mac $(cat /sys/class/net/eth0/address)\n"
    );
    for peer in peers {
        s.push_str(&format!(
            "ok=1\nfor i in $(seq 1 {attempts}); do if ping -c 1 -W 1 {peer} >/dev/null 2>&1; then ok=0; break; fi; done\n\
             echo RESULT ping-{peer} $ok\n"
        ));
    }
    s.push_str(&format!(
        "sleep {linger_s}\necho RESULT rx_packets $(cat /sys/class/net/eth0/statistics/rx_packets)\n"
    ));
    s
}

#[test]
fn vlan_isolation_between_guests() {
    if !guest::require_guest() {
        return;
    }
    let switch = Switch::with_config(
        VLAN10,
        &[
            ("vm1", "vlan = 10"),
            ("vm2", "vlan = 10"),
            ("vm3", "vlan = 20"),
        ],
    );
    let (s1, s2, s3) = (
        switch.socket("vm1"),
        switch.socket("vm2"),
        switch.socket("vm3"),
    );

    // vm3 sits on VLAN 20 with an address in the same subnet: only the VLAN keeps it apart.
    let run = |script: String, socket: std::path::PathBuf, mac: &'static str| {
        std::thread::spawn(move || -> GuestOutput {
            Guest::new(script)
                .net(&socket, mac)
                .timeout(Duration::from_secs(240))
                .run()
        })
    };
    // 10.0.10.254 is the switch's own service address on VLAN 10 (ARP and ping).
    let g1 = run(
        pinger("10.0.10.1", &["10.0.10.2", "10.0.10.254"], 40, 25),
        s1.clone(),
        "02:00:00:00:10:01",
    );
    let g2 = run(
        pinger("10.0.10.2", &["10.0.10.1", "10.0.10.254"], 40, 25),
        s2.clone(),
        "02:00:00:00:10:02",
    );
    let g3 = run(
        pinger("10.0.10.3", &["10.0.10.1", "10.0.10.254"], 12, 0),
        s3.clone(),
        "02:00:00:00:20:03",
    );
    let (o1, o2, o3) = (
        g1.join().expect("guest 1"),
        g2.join().expect("guest 2"),
        g3.join().expect("guest 3"),
    );
    for o in [&o1, &o2, &o3] {
        o.assert_ok();
    }
    assert_eq!(
        o1.result("ping-10.0.10.2"),
        Some("0"),
        "vm1 must reach vm2 on VLAN 10:\n{}",
        o1.describe()
    );
    assert_eq!(
        o2.result("ping-10.0.10.1"),
        Some("0"),
        "vm2 must reach vm1 on VLAN 10:\n{}",
        o2.describe()
    );
    assert_eq!(
        o3.result("ping-10.0.10.1"),
        Some("1"),
        "vm3 on VLAN 20 must not reach VLAN 10:\n{}",
        o3.describe()
    );
    for (o, name) in [(&o1, "vm1"), (&o2, "vm2")] {
        assert_eq!(
            o.result("ping-10.0.10.254"),
            Some("0"),
            "{name} must reach VLAN 10's service IP:\n{}",
            o.describe()
        );
    }
    assert_eq!(
        o3.result("ping-10.0.10.254"),
        Some("1"),
        "vm3 on VLAN 20 must not reach VLAN 10's service IP:\n{}",
        o3.describe()
    );
    assert_eq!(
        o3.result("rx_packets"),
        Some("0"),
        "vm3 must receive none of VLAN 10's frames:\n{}",
        o3.describe()
    );
    switch.stop();
}

/// `reach HOST TRIES`: ping HOST once a try (1 s timeout each) until it answers.
const REACH: &str = "reach() { i=0; while [ $i -lt $2 ]; do \
                     ping -c 1 -W 1 $1 >/dev/null 2>&1 && return 0; i=$((i+1)); done; return 1; }\n";

/// vm1 of the reboot test: reaches vm2, waits until vm2 has seen it (vm2 adds 10.0.10.12),
/// reboots with `reboot -f`; on its second boot adds 10.0.10.11 (what vm2 waits for),
/// reaches vm2 and the gateway again, and waits until vm2 has seen it (10.0.10.13).
fn rebooting_guest() -> String {
    format!(
        "{REACH}\
         ip link set eth0 up\n\
         ip addr add 10.0.10.1/24 dev eth0\n\
         case $BOOT in\n\
         1)\n\
         \x20 reach 10.0.10.2 120; echo RESULT ping-vm2-boot1 $?\n\
         \x20 reach 10.0.10.12 120; echo RESULT vm2-saw-boot1 $?\n\
         \x20 echo RESULT rebooting now\n\
         \x20 reboot -f\n\
         \x20 sleep 60\n\
         \x20 ;;\n\
         2)\n\
         \x20 ip addr add 10.0.10.11/24 dev eth0\n\
         \x20 reach 10.0.10.2 120; echo RESULT ping-vm2-boot2 $?\n\
         \x20 reach 10.0.10.254 30; echo RESULT ping-gw-boot2 $?\n\
         \x20 reach 10.0.10.13 120; echo RESULT vm2-saw-boot2 $?\n\
         \x20 ;;\n\
         *)\n\
         \x20 exit 1\n\
         \x20 ;;\n\
         esac\n"
    )
}

/// vm2 of the reboot test: reaches vm1, says so (10.0.10.12), then while vm1 reboots pings
/// the gateway until vm1's second boot answers on 10.0.10.11, says so (10.0.10.13), stays
/// up until vm1 is gone, and reports its link.
fn steady_guest() -> String {
    format!(
        "{REACH}\
         ip link set eth0 up\n\
         ip addr add 10.0.10.2/24 dev eth0\n\
         reach 10.0.10.1 120; echo RESULT ping-vm1-boot1 $?\n\
         echo RESULT carrier-changes-before $(cat /sys/class/net/eth0/carrier_changes)\n\
         ip addr add 10.0.10.12/24 dev eth0\n\
         ok=1; gw=0; n=0\n\
         while [ $n -lt 150 ]; do\n\
         \x20 if ping -c 1 -W 1 10.0.10.11 >/dev/null 2>&1; then ok=0; break; fi\n\
         \x20 ping -c 1 -W 1 10.0.10.254 >/dev/null 2>&1 && gw=$((gw+1))\n\
         \x20 n=$((n+1))\n\
         done\n\
         echo RESULT ping-vm1-boot2 $ok\n\
         echo RESULT gw-while-waiting $gw\n\
         ip addr add 10.0.10.13/24 dev eth0\n\
         n=0; miss=0\n\
         while [ $n -lt 60 ] && [ $miss -lt 3 ]; do\n\
         \x20 if ping -c 1 -W 1 10.0.10.11 >/dev/null 2>&1; then miss=0; sleep 1; else miss=$((miss+1)); fi\n\
         \x20 n=$((n+1))\n\
         done\n\
         echo RESULT carrier $(cat /sys/class/net/eth0/carrier)\n\
         echo RESULT carrier-changes-after $(cat /sys/class/net/eth0/carrier_changes)\n"
    )
}

/// A guest reboots inside its QEMU (`reboot -f`: QEMU resets the machine, the vhost-user
/// device is stopped and set up again over the same connection) while another guest on the
/// same VLAN keeps running: the rebooted guest's traffic resumes both ways, and the other
/// guest keeps its link and its traffic through the switch the whole time.
#[test]
fn guest_reboot_resumes_traffic_and_spares_the_other_port() {
    if !guest::require_guest() {
        return;
    }
    let switch = Switch::with_config(VLAN10, &[("vm1", "vlan = 10"), ("vm2", "vlan = 10")]);
    let (s1, s2) = (switch.socket("vm1"), switch.socket("vm2"));
    let dir = tempfile::tempdir().expect("tempdir");

    let console1 = dir.path().join("vm1.console");
    let timeout = Duration::from_secs(360);
    let vm1 = {
        let (s1, console1) = (s1.clone(), console1.clone());
        std::thread::spawn(move || {
            Guest::new(rebooting_guest())
                .net(&s1, "02:00:00:00:10:01")
                .allow_reboot()
                .boot_counter()
                .console_log(console1)
                .timeout(timeout)
                .run()
        })
    };
    let vm2 = std::thread::spawn(move || {
        Guest::new(steady_guest())
            .net(&s2, "02:00:00:00:10:02")
            .timeout(timeout)
            .run()
    });

    // vm1 is down from its "rebooting" line until its init comes up a second time.
    let running = || !vm1.is_finished();
    let rebooting = wait_console(&console1, "RESULT rebooting now", 1, timeout, running);
    let before = switch.stats();
    let rebooted = rebooting && wait_console(&console1, "GUEST-INIT: ready", 2, timeout, running);
    let during = switch.stats();
    let (o1, o2) = (vm1.join().expect("vm1"), vm2.join().expect("vm2"));
    let after = switch.stats();
    switch.stop();

    o1.assert_ok();
    o2.assert_ok();
    assert!(
        rebooting && rebooted,
        "vm1 did not reboot (rebooting line: {rebooting}, second boot: {rebooted}):\n{}",
        o1.describe()
    );
    assert_eq!(o1.boots(), 2, "vm1 must boot twice:\n{}", o1.describe());
    assert_eq!(o1.result_all("boot"), ["1", "2"], "{}", o1.describe());
    let expect = |o: &GuestOutput, who: &str, key: &str, want: &str| {
        assert_eq!(
            o.result(key),
            Some(want),
            "{who}: RESULT {key} must be {want}:\n{}",
            o.describe()
        );
    };
    expect(&o1, "vm1", "ping-vm2-boot1", "0");
    expect(&o1, "vm1", "vm2-saw-boot1", "0");
    expect(&o2, "vm2", "ping-vm1-boot1", "0");
    // Traffic resumes after the reboot, both ways, and to the gateway.
    expect(&o1, "vm1", "ping-vm2-boot2", "0");
    expect(&o1, "vm1", "ping-gw-boot2", "0");
    expect(&o2, "vm2", "ping-vm1-boot2", "0");
    expect(&o1, "vm1", "vm2-saw-boot2", "0");
    // vm2 kept its link and reached the gateway while vm1 was rebooting.
    expect(&o2, "vm2", "carrier", "1");
    assert_eq!(
        o2.result("carrier-changes-after"),
        Some(o2.expect_result("carrier-changes-before")),
        "vm2's link went down or up while vm1 rebooted:\n{}",
        o2.describe()
    );
    let gw: u32 = o2
        .expect_result("gw-while-waiting")
        .parse()
        .expect("a count");
    assert!(
        gw >= 1,
        "vm2 never reached the gateway while vm1 rebooted:\n{}",
        o2.describe()
    );
    // The switch saw it too: vm2's port forwarded both ways while vm1 was down, and vm1's
    // port carried traffic again after its second boot.
    let grew = |a: &HashMap<String, Counters>, b: &HashMap<String, Counters>, port, key| {
        let (a, b) = (get(&a[port], key), get(&b[port], key));
        assert!(b > a, "{port} {key} did not grow: {a} -> {b}");
    };
    for key in ["rx_packets", "tx_packets"] {
        grew(&before, &during, "vm2", key);
        grew(&during, &after, "vm1", key);
    }
}

/// A port in client mode connects to QEMU's socket, and connects again to the next QEMU
/// after the first one exits: traffic resumes.
#[test]
fn client_mode_port_reconnects_to_a_new_qemu() {
    if !guest::require_guest() {
        return;
    }
    let switch = Switch::with_config(
        "[[vlan]]\nid = 30\nservice_ip = \"10.0.30.254/24\"\n",
        &[("vm1", "mode = \"client\"\nvlan = 30")],
    );
    // QEMU listens where the client-mode port connects.
    let qemu_sock = switch.socket("vm1");
    for round in 1..=2 {
        let out = Guest::new(pinger("10.0.30.1", &["10.0.30.254"], 40, 0))
            .net_server(&qemu_sock, "02:00:00:00:30:01")
            .timeout(Duration::from_secs(180))
            .run();
        out.assert_ok();
        assert_eq!(
            out.result("ping-10.0.30.254"),
            Some("0"),
            "QEMU #{round}: the guest must reach the service IP through a client-mode port:\n{}",
            out.describe()
        );
    }
    switch.stop();
}

/// A QEMU NIC with two queue pairs on a port with `queues = 2`: QEMU takes the backend's
/// MQ (GET_QUEUE_NUM, a vhost device per pair), the guest's driver negotiates it, and
/// traffic flows through the pair it uses.
#[test]
fn multiqueue_nic_in_a_qemu_guest() {
    if !guest::require_guest() {
        return;
    }
    let switch = Switch::with_config(VLAN10, &[("vm1", "vlan = 10\nqueues = 2")]);
    let script = format!(
        // The driver's features, one character per bit: VIRTIO_NET_F_MQ is bit 22. (With
        // one vCPU it uses one pair of the two.)
        "{}echo RESULT mq $(cut -c23 /sys/class/net/eth0/device/features)\n",
        pinger("10.0.10.1", &["10.0.10.254"], 40, 0)
    );
    let out = Guest::new(script)
        .net_mq(switch.socket("vm1"), "02:00:00:00:10:01", 2)
        .timeout(Duration::from_secs(240))
        .run();
    out.assert_ok();
    assert_eq!(
        out.result("mq"),
        Some("1"),
        "the guest's driver negotiated VIRTIO_NET_F_MQ:\n{}\n{}",
        out.describe(),
        switch.log()
    );
    assert_eq!(
        out.result("ping-10.0.10.254"),
        Some("0"),
        "the guest reaches the service IP through its multiqueue NIC:\n{}\n{}",
        out.describe(),
        switch.log()
    );
    switch.stop();
}

/// MiB one guest sends the other over TCP in the offload test.
const TCP_MIB: u32 = 64;

/// Two guests stream TCP through the switch, once with the ports offering checksum and
/// segmentation offloads and once without. With them, the sender's 64 KiB segments cross
/// the switch whole (counted on both ports) and the receiver takes them whole; without,
/// every frame is MTU-sized. Every byte arrives both ways (TCP checks each segment's
/// checksum). The throughput of each run is printed; the comparison is a benchmark's job.
#[test]
fn tcp_between_guests_with_and_without_offloads() {
    if !guest::require_guest() {
        return;
    }
    let mut rates = Vec::new();
    for offloads in [true, false] {
        let port = format!("vlan = 10\noffloads = {offloads}");
        let switch = Switch::with_config(VLAN10, &[("vm1", &port), ("vm2", &port)]);
        let (s1, s2) = (switch.socket("vm1"), switch.socket("vm2"));
        let rx = std::thread::spawn(move || {
            Guest::new(guest::tcp_receiver_script("10.0.10.2", 5001))
                .net(&s2, "02:00:00:00:10:02")
                .timeout(Duration::from_secs(300))
                .run()
        });
        let tx = Guest::new(guest::tcp_sender_script(
            "10.0.10.1",
            "10.0.10.2",
            5001,
            TCP_MIB,
        ))
        .net(&s1, "02:00:00:00:10:01")
        .timeout(Duration::from_secs(300))
        .run();
        let rx = rx.join().expect("receiver");
        tx.assert_ok();
        rx.assert_ok();
        let want = if offloads { "1111" } else { "0000" };
        for (o, name) in [(&tx, "sender"), (&rx, "receiver")] {
            assert_eq!(
                o.result("features"),
                Some(want),
                "the {name} negotiated CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4 (offloads = \
                 {offloads}):\n{}",
                o.describe()
            );
        }
        assert_eq!(tx.result("sent"), Some("0"), "{}", tx.describe());
        let bytes = u64::from(TCP_MIB) << 20;
        assert_eq!(
            rx.result("bytes").and_then(|b| b.parse().ok()),
            Some(bytes),
            "every byte arrives (offloads = {offloads}):\n{}\n{}",
            rx.describe(),
            switch.log()
        );
        let stats = switch.stats();
        let (vm1, vm2) = (&stats["vm1"], &stats["vm2"]);
        // (A frame flooded to a guest still booting counts as drop_no_rx_buffer: not
        // checked.)
        for key in ["drop_malformed", "drop_mtu"] {
            assert_eq!(get(vm1, key) + get(vm2, key), 0, "{key}: {stats:?}");
        }
        if offloads {
            // Each one reached vm2 whole, but for those that found its receive ring full.
            let (sent, delivered) = (get(vm1, "rx_gso"), get(vm2, "tx_gso"));
            assert!(
                delivered > 0 && delivered + get(vm2, "drop_no_rx_buffer") >= sent,
                "the sender's segments were carried whole: {stats:?}"
            );
            assert_eq!(get(vm2, "tx_sw_offload"), 0, "{stats:?}");
        } else {
            assert_eq!(get(vm1, "rx_gso") + get(vm2, "tx_gso"), 0, "{stats:?}");
        }
        let elapsed: f64 = rx
            .expect_result("seconds")
            .parse::<f64>()
            .unwrap_or(0.0)
            .max(0.001);
        let mbit = bytes as f64 * 8.0 / elapsed / 1e6;
        eprintln!("offloads = {offloads}: {TCP_MIB} MiB in {elapsed:.2} s, {mbit:.0} Mbit/s");
        rates.push(mbit);
        switch.stop();
    }
    eprintln!("with offloads / without: {:.2}x", rates[0] / rates[1]);
}
