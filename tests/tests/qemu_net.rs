//! End-to-end with real QEMU guests on virtio-net-pci NICs whose vhost-user backends are
//! vswitch ports: guests on VLAN 10 reach each other, a guest on VLAN 20 sees none of
//! their frames.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::guest::{self, Guest, GuestOutput};
use e2e::{bin, wait_for_socket};

struct Switch {
    child: Child,
}

impl Switch {
    fn start(config: &Path, sockets: &[&Path]) -> Switch {
        let child = Command::new(bin("vswitch"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vswitch");
        for s in sockets {
            wait_for_socket(s, Duration::from_secs(20));
        }
        Switch { child }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill() on a child we own, with a valid signal; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "vswitch ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = |n: &str| dir.path().join(format!("{n}.sock"));
    let (s1, s2, s3) = (sock("vm1"), sock("vm2"), sock("vm3"));
    let config = dir.path().join("switch.toml");
    std::fs::write(
        &config,
        format!(
            "[switch]\ncontrol_socket = \"{}\"\n\n\
             [[vlan]]\nid = 10\nservice_ip = \"10.0.10.254/24\"\n\n\
             [[port]]\nname = \"vm1\"\nsocket = \"{}\"\nvlan = 10\n\n\
             [[port]]\nname = \"vm2\"\nsocket = \"{}\"\nvlan = 10\n\n\
             [[port]]\nname = \"vm3\"\nsocket = \"{}\"\nvlan = 20\n",
            dir.path().join("ctl.sock").display(),
            s1.display(),
            s2.display(),
            s3.display()
        ),
    )
    .expect("config");
    let switch = Switch::start(&config, &[&s1, &s2, &s3]);

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
    let status = switch.stop();
    assert!(status.success(), "vswitch exit status {status}");
}

/// A port in client mode connects to QEMU's socket, and connects again to the next QEMU
/// after the first one exits: traffic resumes.
#[test]
fn client_mode_port_reconnects_to_a_new_qemu() {
    if !guest::require_guest() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let qemu_sock = dir.path().join("qemu-vm1.sock");
    let config = dir.path().join("switch.toml");
    std::fs::write(
        &config,
        format!(
            "[switch]\ncontrol_socket = \"{}\"\n\n\
             [[vlan]]\nid = 30\nservice_ip = \"10.0.30.254/24\"\n\n\
             [[port]]\nname = \"vm1\"\nsocket = \"{}\"\nmode = \"client\"\nvlan = 30\n",
            dir.path().join("ctl.sock").display(),
            qemu_sock.display()
        ),
    )
    .expect("config");
    // Nothing to wait for: in client mode vswitch creates no port socket.
    let switch = Switch::start(&config, &[&dir.path().join("ctl.sock")]);
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
    let status = switch.stop();
    assert!(status.success(), "vswitch exit status {status}");
}
