//! `dpdk-testpmd` as a traffic peer: a DPDK process whose `net_virtio_user` ports are real
//! virtio-net drivers speaking vhost-user to a backend socket (a vswitch port).
//!
//! Each [`Testpmd`] is one interactive (`-i`) testpmd driven over its stdin: a command is
//! sent, and its output is everything up to the next `testpmd> ` prompt. That allows what a
//! fixed command line cannot, such as changing a port's MAC (the source address txonly
//! frames carry) between bursts. The process is killed if dropped; every failure panics
//! with the command, the reason and the last lines testpmd printed.
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

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{have_program, require};

/// The testpmd binary (Debian package dpdk-dev).
pub const TESTPMD: &str = "dpdk-testpmd";

/// Hugepage memory each testpmd takes (`--socket-mem`), in MiB.
pub const SOCKET_MEM_MB: u32 = 128;

/// Mbufs in each testpmd's pool: enough for a few ports' rings and bursts.
pub const MBUFS: u32 = 4096;

/// The broadcast address, for `set_eth_peer` floods.
pub const BROADCAST: &str = "ff:ff:ff:ff:ff:ff";

const HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
const HUGEPAGE_MB: u32 = 2;
const PROMPT: &str = "testpmd> ";
/// Startup: EAL init, hugepage allocation, vhost-user negotiation of every port.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// One command, including `port stop`/`port start` (a vhost-user renegotiation).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
const TAIL_LINES: usize = 40;

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

/// Per-port counters from `show port stats all`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_missed: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub rx_nombuf: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_bytes: u64,
}

/// Parse the `NIC statistics for port N` blocks of `show port stats all` (or of a
/// `--stats-period` report): the counters of each port, by port id.
pub fn parse_port_stats(text: &str) -> Vec<(u16, PortStats)> {
    const MARK: &str = "NIC statistics for port ";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        rest = &rest[at + MARK.len()..];
        let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(id) = id.parse::<u16>() else { continue };
        let block = &rest[..rest.find(MARK).unwrap_or(rest.len())];
        let field = |name: &str| -> u64 {
            let key = format!("{name}:");
            block
                .find(&key)
                .and_then(|i| block[i + key.len()..].split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.push((
            id,
            PortStats {
                rx_packets: field("RX-packets"),
                rx_missed: field("RX-missed"),
                rx_bytes: field("RX-bytes"),
                rx_errors: field("RX-errors"),
                rx_nombuf: field("RX-nombuf"),
                tx_packets: field("TX-packets"),
                tx_errors: field("TX-errors"),
                tx_bytes: field("TX-bytes"),
            },
        ));
    }
    out
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
        // testpmd prints through stdio, which a pipe makes fully buffered, while the
        // command line writes its prompt straight to the descriptor: unbuffer stdout (stdbuf)
        // and send stderr down the same pipe, so replies come before their prompt, in order.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("exec stdbuf -o0 -e0 {TESTPMD} \"$@\" 2>&1"))
            .arg(TESTPMD)
            .args(["-l", "0,1", "--main-lcore"])
            .arg((1 - self.forward_lcore).to_string())
            .args(["--no-pci", "--in-memory", "--single-file-segments"])
            .arg(format!("--file-prefix={prefix}"))
            .arg(format!("--socket-mem={SOCKET_MEM_MB}"));
        for (i, v) in self.vdevs.iter().enumerate() {
            cmd.arg("--vdev").arg(format!(
                "net_virtio_user{i},path={},queues=1,mac={}",
                v.socket.display(),
                v.mac
            ));
        }
        cmd.arg("--")
            .arg("-i")
            .arg("--nb-cores=1")
            .arg(format!("--total-num-mbufs={MBUFS}"))
            .arg("--port-topology=loop")
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let line = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {TESTPMD}: {e}"));
        let out = Arc::new(Output::default());
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let out = out.clone();
            readers.push(std::thread::spawn(move || out.pump(stdout)));
        }
        let stdin = child.stdin.take();
        let mut t = Testpmd {
            name: self.name,
            child,
            stdin,
            out,
            readers,
            mark: 0,
            ports: self.vdevs.len(),
        };
        t.wait_prompt(START_TIMEOUT, &format!("startup ({line})"));
        // Startup prints `Port N: AA:BB:...` for each port: check the ids map to our vdevs.
        let text = t.out.text().clone();
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

#[derive(Default)]
struct Output {
    text: Mutex<String>,
    changed: Condvar,
    /// testpmd's output reached end of file.
    closed: Mutex<bool>,
}

impl Output {
    fn text(&self) -> MutexGuard<'_, String> {
        self.text.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pump(&self, mut stream: impl Read) {
        let mut buf = [0u8; 16384];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.text().push_str(&String::from_utf8_lossy(&buf[..n]));
                    self.changed.notify_all();
                }
            }
        }
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }
}

/// A running interactive testpmd; killed when dropped.
pub struct Testpmd {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Output>,
    readers: Vec<JoinHandle<()>>,
    /// Offset in the output just after the last prompt a command waited for.
    mark: usize,
    ports: usize,
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
        }
    }

    /// Everything testpmd printed so far.
    pub fn output(&self) -> String {
        self.out.text().clone()
    }

    /// The last `n` lines testpmd printed.
    pub fn tail(&self, n: usize) -> String {
        let text = self.out.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    #[track_caller]
    fn fail(&mut self, what: &str, why: &str) -> ! {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("exited with {s}"),
            _ => "still running".to_string(),
        };
        panic!(
            "testpmd {} ({status}): {what}: {why}\n--- last {TAIL_LINES} lines of its output ---\n{}\n---",
            self.name,
            self.tail(TAIL_LINES)
        );
    }

    /// Wait for a prompt after `self.mark`; move the mark past it and return what came
    /// before it.
    #[track_caller]
    fn wait_prompt(&mut self, timeout: Duration, what: &str) -> String {
        let deadline = Instant::now() + timeout;
        let out = self.out.clone();
        let mut text = out.text();
        loop {
            if let Some(at) = text[self.mark..].find(PROMPT) {
                let reply = text[self.mark..self.mark + at].to_string();
                self.mark += at + PROMPT.len();
                return reply;
            }
            let closed = *out.closed.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if closed || now >= deadline {
                drop(text);
                let why = match closed {
                    true => "testpmd exited".to_string(),
                    false => format!("no prompt within {timeout:?}"),
                };
                self.fail(what, &why);
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            text = out
                .changed
                .wait_timeout(text, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Run one interactive command and return its output (up to the next prompt). Panics
    /// if testpmd does not know the command or rejects its arguments.
    #[track_caller]
    pub fn cmd(&mut self, line: &str) -> String {
        let sent = self.stdin.as_mut().map(|s| {
            s.write_all(format!("{line}\n").as_bytes())
                .and_then(|()| s.flush())
        });
        match sent {
            Some(Ok(())) => {}
            Some(Err(e)) => self.fail(line, &format!("cannot write the command: {e}")),
            None => self.fail(line, "stdin already closed"),
        }
        let reply = self.wait_prompt(COMMAND_TIMEOUT, line);
        // What testpmd 22.11 prints for a command it refuses.
        for bad in [
            "Bad arguments",
            "Command not found",
            "Invalid port",
            "Error:",
            "error: (",
            "Please stop",
            "Please remove",
        ] {
            if reply.contains(bad) {
                self.fail(line, &format!("testpmd answered \"{bad}\""));
            }
        }
        reply
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
        let reply = self.cmd("show port stats all");
        let parsed = parse_port_stats(&reply);
        let ids: Vec<u16> = parsed.iter().map(|(id, _)| *id).collect();
        if ids != (0..self.ports as u16).collect::<Vec<_>>() {
            self.fail(
                "show port stats all",
                &format!("expected ports 0..{}, parsed {ids:?}", self.ports),
            );
        }
        parsed.into_iter().map(|(_, s)| s).collect()
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
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"quit\n");
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => self.fail("quit", &format!("still running after {COMMAND_TIMEOUT:?}")),
                Err(e) => self.fail("quit", &format!("cannot wait: {e}")),
            }
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if !status.success() {
            self.fail("quit", &format!("exit status {status}"));
        }
        self.output()
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "show port stats all

  ######################## NIC statistics for port 0  ########################
  RX-packets: 12         RX-missed: 1          RX-bytes:  768
  RX-errors: 0
  RX-nombuf:  3         
  TX-packets: 396757     TX-errors: 0          TX-bytes:  25392448

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 5          TX-errors: 2          TX-bytes:  320
  ############################################################################
";

    #[test]
    fn parses_port_stats() {
        let s = parse_port_stats(SHOW);
        assert_eq!(s.len(), 2);
        let want0 = PortStats {
            rx_packets: 12,
            rx_missed: 1,
            rx_bytes: 768,
            rx_nombuf: 3,
            tx_packets: 396757,
            tx_bytes: 25392448,
            ..PortStats::default()
        };
        assert_eq!(s[0], (0, want0));
        let want1 = PortStats {
            tx_packets: 5,
            tx_errors: 2,
            tx_bytes: 320,
            ..PortStats::default()
        };
        assert_eq!(s[1], (1, want1));
        assert!(parse_port_stats("no stats here").is_empty());
    }
}
