//! `dpdk-testpmd` as a traffic peer: a DPDK process whose `net_virtio_user` ports are real
//! virtio-net drivers speaking vhost-user to a backend socket (a vswitch port).
//!
//! Each [`Testpmd`] is one interactive (`-i`) testpmd driven over its stdin by
//! [`testkit::testpmd`] (the driver the benchmark uses too): a command is sent, and its
//! output is everything up to the next `testpmd> ` prompt. That allows what a fixed command
//! line cannot, such as changing a port's MAC (the source address txonly frames carry)
//! between bursts. This module sets up the command line and turns every failure into a
//! panic with the command, the reason and the last lines testpmd printed; the process is
//! killed if dropped.
//!
//! How the processes are set up, and why:
//! - `--in-memory` (no runtime files, hugepages taken as memfds and unlinked): nothing is
//!   left in `/dev/hugepages` or `/var/run/dpdk` when a test kills its testpmd, processes
//!   never collide, and no hugetlbfs mount is needed. Each still gets its own
//!   `--file-prefix` (`e2e-PID-N-NAME`), which matters should `--in-memory` ever go.
//! - `--single-file-segments`: a vhost-user backend maps each memory region the driver
//!   shares; without it DPDK would share one region per hugepage ("Too many memory regions").
//! - `--socket-mem` [`SOCKET_MEM_MB`] and `--total-num-mbufs` [`MBUFS`]: small, so several
//!   tests can run at once on the 2 GiB of hugepages `scripts/setup.sh` reserves.
//! - `-l 0,1 --main-lcore M`: the main lcore only reads commands; the other core forwards
//!   (`--nb-cores=1`). Give two processes different forwarding cores
//!   ([`TestpmdBuilder::forward_lcore`]) so they do not spin on the same one.
//! - `--port-topology=loop`: each port forwards to itself (txonly sends on each port, rxonly
//!   counts on each port), whatever the number of ports.
//!
//! ```no_run
//! use e2e::testpmd::{self, Testpmd};
//! # let sock = std::path::Path::new("/tmp/p0.sock");
//! if !testpmd::require_testpmd(1) { return; }
//! let mut gen = Testpmd::builder("gen")
//!     .port(sock, "02:00:00:00:00:01")
//!     .arg("--txpkts=64")
//!     .spawn();
//! gen.set_fwd("txonly");
//! gen.set_eth_peer(0, testpmd::BROADCAST);
//! gen.run_for(std::time::Duration::from_secs(1));
//! let sent = gen.stats()[0].tx_packets;
//! gen.quit();
//! ```
//!
//! What testpmd 22.11 can and cannot send, as found for these tests:
//! - txonly frames go from the port's own MAC (the vdev's `mac=`, or the one set with
//!   [`Testpmd::set_mac`]) to the port's `--eth-peer` (default `02:00:00:00:00:0N`), IPv4/UDP
//!   198.18.0.1 → 198.18.0.2 unless `--tx-ip` says otherwise. `--txonly-multi-flow` varies
//!   the IPv4 source (the UDP source port in later DPDK), and flowgen varies IP addresses:
//!   no forward mode varies the source MAC, so a test that needs several source MACs
//!   changes the port's MAC between bursts ([`Testpmd::set_mac`]).
//! - `mac_addr set` alone does not change what txonly sends: testpmd copies the port's MAC
//!   when the port starts. [`Testpmd::set_mac`] therefore restarts the port.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use testkit::testpmd::{parse_port_stats, PortStats, TESTPMD};

use crate::{have_program, require};

/// Hugepage memory each testpmd takes (`--socket-mem`), in MiB.
pub const SOCKET_MEM_MB: u32 = 128;

/// Mbufs in each testpmd's pool: enough for a few ports' rings and bursts.
pub const MBUFS: u32 = 4096;

/// The broadcast address, for `set_eth_peer` floods.
pub const BROADCAST: &str = "ff:ff:ff:ff:ff:ff";

const HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
const HUGEPAGE_MB: u32 = 2;

/// Whether testpmd tests can run here: `dpdk-testpmd` on PATH and enough free 2 MiB
/// hugepages for `processes` testpmds. As root, missing hugepages are reserved (as
/// `scripts/setup.sh` does). Otherwise [`require`]: skip locally, fail in CI.
pub fn require_testpmd(processes: u32) -> bool {
    if !require(
        "dpdk-testpmd (Debian package dpdk-dev)",
        have_program(TESTPMD),
    ) || !require("stdbuf (Debian package coreutils)", have_program("stdbuf"))
    {
        return false;
    }
    match ensure_hugepages(processes * SOCKET_MEM_MB / HUGEPAGE_MB) {
        Ok(()) => true,
        Err(why) => require(&format!("hugepages for dpdk-testpmd ({why})"), false),
    }
}

fn read_count(file: &str) -> Option<u32> {
    std::fs::read_to_string(Path::new(HUGEPAGES).join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// At least `pages` free 2 MiB hugepages; as root, reserve the missing ones.
fn ensure_hugepages(pages: u32) -> Result<(), String> {
    let state = || (read_count("nr_hugepages"), read_count("free_hugepages"));
    let describe = |nr: Option<u32>, free: Option<u32>| match (nr, free) {
        (Some(nr), Some(free)) => format!(
            "{free} of {nr} 2 MiB hugepages free, {pages} needed; \
             scripts/setup.sh reserves them"
        ),
        _ => format!("{HUGEPAGES} is unreadable; scripts/setup.sh reserves hugepages"),
    };
    if let (_, Some(free)) = state() {
        if free >= pages {
            return Ok(());
        }
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        let (nr, free) = state();
        return Err(describe(nr, free));
    }
    // Tests run in parallel processes: reserve under a lock, re-reading the counts inside.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("e2e-hugepages.lock"))
        .map_err(|e| format!("cannot open the hugepage lock file: {e}"))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if let (Some(nr), Some(free)) = state() {
        if free < pages {
            let want = nr + (pages - free);
            std::fs::write(Path::new(HUGEPAGES).join("nr_hugepages"), want.to_string())
                .map_err(|e| format!("cannot reserve {want} hugepages: {e}"))?;
            eprintln!("testpmd: reserved 2 MiB hugepages: nr_hugepages {nr} -> {want}");
        }
    }
    drop(lock);
    match state() {
        (_, Some(free)) if free >= pages => Ok(()),
        (nr, free) => Err(describe(nr, free)),
    }
}

/// One `net_virtio_user` port: the vhost-user socket it connects to and its MAC.
#[derive(Debug, Clone)]
struct Vdev {
    socket: PathBuf,
    mac: String,
}

/// How to start one testpmd; see [`Testpmd::builder`].
#[derive(Debug, Clone)]
pub struct TestpmdBuilder {
    name: String,
    vdevs: Vec<Vdev>,
    args: Vec<String>,
    forward_lcore: u32,
    queues: u16,
}

impl TestpmdBuilder {
    /// Add a port (port ids follow the order of the calls, from 0) connected to the
    /// vhost-user socket `socket`, with MAC `mac` (`aa:bb:cc:dd:ee:ff`).
    pub fn port(mut self, socket: impl AsRef<Path>, mac: &str) -> TestpmdBuilder {
        self.vdevs.push(Vdev {
            socket: socket.as_ref().to_path_buf(),
            mac: mac.to_ascii_lowercase(),
        });
        self
    }

    /// An extra testpmd application argument (after `--`), e.g. `--txpkts=64`,
    /// `--tx-ip=10.0.0.1,10.0.0.2`, `--eth-peer=0,ff:ff:ff:ff:ff:ff`.
    pub fn arg(mut self, arg: impl Into<String>) -> TestpmdBuilder {
        self.args.push(arg.into());
        self
    }

    /// Queue pairs per port (`queues=N` on each vdev, `--rxq` and `--txq`). Default 1.
    pub fn queues(mut self, n: u16) -> TestpmdBuilder {
        self.queues = n;
        self
    }

    /// The core (0 or 1) that forwards; the other one is the main lcore. Default 1.
    pub fn forward_lcore(mut self, core: u32) -> TestpmdBuilder {
        assert!(core <= 1, "forward_lcore is 0 or 1 on this 2-core machine");
        self.forward_lcore = core;
        self
    }

    /// Start testpmd and wait for its prompt, with every port up and its MAC checked.
    #[track_caller]
    pub fn spawn(self) -> Testpmd {
        assert!(!self.vdevs.is_empty(), "testpmd {}: no port", self.name);
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "e2e-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            self.name
        );
        let mut args: Vec<String> = vec![
            "-l".into(),
            "0,1".into(),
            "--main-lcore".into(),
            (1 - self.forward_lcore).to_string(),
            "--no-pci".into(),
            "--in-memory".into(),
            "--single-file-segments".into(),
            format!("--file-prefix={prefix}"),
            format!("--socket-mem={SOCKET_MEM_MB}"),
        ];
        for (i, v) in self.vdevs.iter().enumerate() {
            args.push("--vdev".into());
            args.push(format!(
                "net_virtio_user{i},path={},queues={},mac={}",
                v.socket.display(),
                self.queues,
                v.mac
            ));
        }
        args.extend([
            "--".into(),
            "--nb-cores=1".into(),
            format!("--total-num-mbufs={MBUFS}"),
            "--port-topology=loop".into(),
            format!("--rxq={}", self.queues),
            format!("--txq={}", self.queues),
        ]);
        args.extend(self.args);
        let inner = testkit::testpmd::Testpmd::spawn(&self.name, &args, None, &mut || None)
            .unwrap_or_else(|e| panic!("{e}\ncommand line: {TESTPMD} {}", args.join(" ")));
        let mut t = Testpmd { inner };
        // Startup prints `Port N: AA:BB:...` for each port: check the ids map to our vdevs.
        let text = t.output();
        for (i, v) in self.vdevs.iter().enumerate() {
            let want = format!("Port {i}: {}", v.mac.to_ascii_uppercase());
            if !text.contains(&want) {
                t.fail(
                    "startup",
                    &format!(
                        "no \"{want}\" line: port {i} is not the vdev on {}",
                        v.socket.display()
                    ),
                );
            }
        }
        t
    }
}

/// A running interactive testpmd; killed when dropped.
pub struct Testpmd {
    inner: testkit::testpmd::Testpmd,
}

/// The reply, or a panic with the driver's error (command, reason, output tail).
#[track_caller]
fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

impl Testpmd {
    /// A testpmd named `name` (in messages and its `--file-prefix`); add ports with
    /// [`TestpmdBuilder::port`], then [`TestpmdBuilder::spawn`].
    pub fn builder(name: &str) -> TestpmdBuilder {
        TestpmdBuilder {
            name: name.to_string(),
            vdevs: Vec::new(),
            args: Vec::new(),
            forward_lcore: 1,
            queues: 1,
        }
    }

    /// Everything testpmd printed so far.
    pub fn output(&self) -> String {
        self.inner.output()
    }

    /// The last `n` lines testpmd printed.
    pub fn tail(&self, n: usize) -> String {
        self.inner.tail(n)
    }

    #[track_caller]
    fn fail(&mut self, what: &str, why: &str) -> ! {
        panic!("{}", self.inner.error(what, why));
    }

    /// Run one interactive command and return its output (up to the next prompt). Panics
    /// if testpmd does not know the command or rejects its arguments.
    #[track_caller]
    pub fn cmd(&mut self, line: &str) -> String {
        ok(self.inner.cmd(line))
    }

    /// `set fwd MODE`: txonly, rxonly, io, mac, macswap, flowgen, ...
    #[track_caller]
    pub fn set_fwd(&mut self, mode: &str) {
        self.cmd(&format!("set fwd {mode}"));
    }

    /// Where `port`'s txonly (and mac-mode) frames go.
    #[track_caller]
    pub fn set_eth_peer(&mut self, port: u16, mac: &str) {
        self.cmd(&format!("set eth-peer {port} {mac}"));
    }

    /// Forward only on these ports (`set portlist`), e.g. to send from one port of several.
    #[track_caller]
    pub fn set_portlist(&mut self, ports: &[u16]) {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        self.cmd(&format!("set portlist {}", list.join(",")));
    }

    /// Start forwarding in the current mode.
    #[track_caller]
    pub fn start(&mut self) {
        self.cmd("start");
    }

    /// Stop forwarding (prints the forward statistics).
    #[track_caller]
    pub fn stop(&mut self) -> String {
        self.cmd("stop")
    }

    /// Forward for `duration`, then stop.
    #[track_caller]
    pub fn run_for(&mut self, duration: Duration) {
        self.start();
        std::thread::sleep(duration);
        self.stop();
    }

    /// Every port's counters (`show port stats all`), indexed by port id.
    #[track_caller]
    pub fn stats(&mut self) -> Vec<PortStats> {
        ok(self.inner.port_stats())
    }

    /// Give `port` the MAC `mac`, which txonly then sends from: `mac_addr set`, then a port
    /// restart, since testpmd reads a port's MAC for its frames when the port starts.
    /// Forwarding must be stopped.
    #[track_caller]
    pub fn set_mac(&mut self, port: u16, mac: &str) {
        self.cmd(&format!("mac_addr set {port} {mac}"));
        self.cmd(&format!("port stop {port}"));
        let reply = self.cmd(&format!("port start {port}"));
        let want = format!("Port {port}: {}", mac.to_ascii_uppercase());
        if !reply.contains(&want) {
            self.fail(
                &format!("port start {port}"),
                &format!("no \"{want}\": the MAC did not change"),
            );
        }
    }

    /// Quit (`quit`, then end of input) and wait for the exit; returns all the output,
    /// which ends with the final statistics. Panics if testpmd hangs or fails.
    #[track_caller]
    pub fn quit(mut self) -> String {
        let status = ok(self.inner.quit());
        if !status.success() {
            self.fail("quit", &format!("exit status {status}"));
        }
        self.output()
    }
}
