//! Open vSwitch with DPDK as a private instance: its own database, run directory, logs and
//! vhost-user sockets in the run's temp dir (OVS_RUNDIR and friends), so it never touches a
//! system OVS in /var/run/openvswitch. ovsdb-server and ovs-vswitchd run as our children
//! (no --detach): they die with the runner, and [`Ovs`]'s Drop stops them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::blk::daemon::{self, run_tool as run, DaemonProc};
use crate::signals;

/// ovs-vswitchd linked with DPDK (Debian's openvswitch-switch-dpdk), used directly, so a run
/// does not depend on where the ovs-vswitchd alternative points.
pub const VSWITCHD_DPDK: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";
pub const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

pub struct Ovs {
    dir: PathBuf,
    db_sock: PathBuf,
    vswitchd_ctl: PathBuf,
    ovsdb_ctl: PathBuf,
    ovsdb: Option<DaemonProc>,
    vswitchd: Option<DaemonProc>,
}

/// Where ovs-vswitchd's DPDK threads run and how much hugepage memory it takes.
pub struct OvsLayout {
    /// Core of ovs-vswitchd's main (non-PMD) threads.
    pub main_cpu: usize,
    /// Core of the one PMD thread.
    pub pmd_cpu: usize,
    pub socket_mem_mb: u32,
    pub file_prefix: String,
    /// `userspace-tso-enable`: the vhost-user ports keep the guests' TSO and checksum
    /// offloads (OVS turns them off otherwise).
    pub tso: bool,
}

/// The interesting part of `dpif-netdev/pmd-stats-show`, summed over PMD threads.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PmdStats {
    pub packets: u64,
    pub idle_cycles: u64,
    pub processing_cycles: u64,
}

impl PmdStats {
    pub fn processing_cycles_per_packet(&self) -> Option<f64> {
        (self.packets > 0).then(|| self.processing_cycles as f64 / self.packets as f64)
    }

    pub fn busy_fraction(&self) -> Option<f64> {
        let total = self.idle_cycles + self.processing_cycles;
        (total > 0).then(|| self.processing_cycles as f64 / total as f64)
    }
}

impl Ovs {
    /// Create a database, start ovsdb-server and ovs-vswitchd (DPDK initialised), and add a
    /// netdev bridge `br0` with one `dpdkvhostuser` port per name, all on access VLAN `vlan`.
    /// The bridge keeps its default flow (`actions=NORMAL`).
    pub fn start(dir: &Path, layout: &OvsLayout, ports: &[&str], vlan: u16) -> Result<Ovs, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let db = dir.join("conf.db");
        let mut ovs = Ovs {
            dir: dir.to_path_buf(),
            db_sock: dir.join("db.sock"),
            vswitchd_ctl: dir.join("ovs-vswitchd.ctl"),
            ovsdb_ctl: dir.join("ovsdb-server.ctl"),
            ovsdb: None,
            vswitchd: None,
        };
        run(ovs
            .env(Command::new("ovsdb-tool"))
            .arg("create")
            .arg(&db)
            .arg(SCHEMA))?;
        let mut c = ovs.env(Command::new("ovsdb-server"));
        c.arg(&db)
            .arg(format!("--remote=punix:{}", ovs.db_sock.display()))
            .arg(format!("--unixctl={}", ovs.ovsdb_ctl.display()))
            .arg(format!(
                "--pidfile={}",
                dir.join("ovsdb-server.pid").display()
            ))
            .arg("-vconsole:off")
            .arg(format!(
                "--log-file={}",
                dir.join("ovsdb-server.log").display()
            ));
        ovs.ovsdb = Some(DaemonProc::spawn(
            "ovsdb-server",
            c,
            &ovs.db_sock,
            &dir.join("ovsdb-server.out"),
        )?);
        ovs.vsctl(&["--no-wait", "init"])?;
        let cpu_mask = |cpu: usize| format!("{:#x}", 1u64 << cpu);
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:dpdk-init=true",
            &format!("other_config:dpdk-socket-mem={}", layout.socket_mem_mb),
            &format!("other_config:dpdk-socket-limit={}", layout.socket_mem_mb),
            &format!("other_config:dpdk-lcore-mask={}", cpu_mask(layout.main_cpu)),
            &format!("other_config:pmd-cpu-mask={}", cpu_mask(layout.pmd_cpu)),
            // --in-memory: no runtime files in /var/run/dpdk or /dev/hugepages to clean up.
            &format!(
                "other_config:dpdk-extra=--no-pci --in-memory --file-prefix={}",
                layout.file_prefix
            ),
            &format!("other_config:userspace-tso-enable={}", layout.tso),
        ])?;
        let mut c = ovs.env(Command::new(VSWITCHD_DPDK));
        c.arg(format!("unix:{}", ovs.db_sock.display()))
            .arg(format!("--unixctl={}", ovs.vswitchd_ctl.display()))
            .arg(format!(
                "--pidfile={}",
                dir.join("ovs-vswitchd.pid").display()
            ))
            .arg("-vconsole:off")
            .arg(format!(
                "--log-file={}",
                dir.join("ovs-vswitchd.log").display()
            ));
        ovs.vswitchd = Some(DaemonProc::spawn(
            "ovs-vswitchd",
            c,
            &ovs.vswitchd_ctl,
            &dir.join("ovs-vswitchd.out"),
        )?);
        ovs.vsctl(&[
            "--timeout=60",
            "add-br",
            "br0",
            "--",
            "set",
            "bridge",
            "br0",
            "datapath_type=netdev",
        ])?;
        for p in ports {
            ovs.vsctl(&[
                "--timeout=60",
                "add-port",
                "br0",
                p,
                &format!("tag={vlan}"),
                "--",
                "set",
                "Interface",
                p,
                "type=dpdkvhostuser",
            ])?;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in ports {
            let sock = ovs.socket(p);
            while !sock.exists() {
                signals::check()?;
                if Instant::now() > deadline {
                    return Err(format!(
                        "ovs-vswitchd did not create {} within 20 s; its log:\n{}",
                        sock.display(),
                        ovs.log_tail()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(ovs)
    }

    fn env(&self, mut c: Command) -> Command {
        c.env("OVS_RUNDIR", &self.dir)
            .env("OVS_DBDIR", &self.dir)
            .env("OVS_LOGDIR", &self.dir)
            .env("OVS_SYSCONFDIR", &self.dir);
        c
    }

    /// Add a `dpdkvhostuserclient` port `name` on access VLAN `vlan`: OVS connects to the
    /// vhost-user socket a frontend listens on at `path` (and reconnects to it). OVS 3.1 keeps
    /// the guests' TSO and checksum offloads (`tso`) on such ports only.
    pub fn add_vhost_client(&self, name: &str, path: &Path, vlan: u16) -> Result<(), String> {
        self.vsctl(&[
            "--timeout=60",
            "add-port",
            "br0",
            name,
            &format!("tag={vlan}"),
            "--",
            "set",
            "Interface",
            name,
            "type=dpdkvhostuserclient",
            &format!("options:vhost-server-path={}", path.display()),
        ])
        .map(|_| ())
    }

    /// The vhost-user socket of port `name` (OVS puts it in its run directory).
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn vswitchd_pid(&self) -> Option<u32> {
        self.vswitchd.as_ref().map(|d| d.pid())
    }

    pub fn exited(&mut self) -> Option<String> {
        self.vswitchd.as_mut().and_then(|d| d.exited())
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("ovs-vswitchd.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn vsctl(&self, args: &[&str]) -> Result<String, String> {
        let mut c = self.env(Command::new("ovs-vsctl"));
        c.arg(format!("--db=unix:{}", self.db_sock.display()))
            .args(args);
        run(&mut c)
    }

    pub fn appctl(&self, args: &[&str]) -> Result<String, String> {
        let mut c = self.env(Command::new("ovs-appctl"));
        c.arg("-t").arg(&self.vswitchd_ctl).args(args);
        run(&mut c)
    }

    pub fn pmd_stats_clear(&self) -> Result<(), String> {
        self.appctl(&["dpif-netdev/pmd-stats-clear"]).map(|_| ())
    }

    pub fn pmd_stats(&self) -> Result<(PmdStats, String), String> {
        let out = self.appctl(&["dpif-netdev/pmd-stats-show"])?;
        Ok((parse_pmd_stats(&out), out))
    }

    /// Per-interface drop counters (`statistics` of the Interface rows), non-zero only.
    pub fn drops(&self, ports: &[&str]) -> Vec<String> {
        let mut v = Vec::new();
        for p in ports {
            let Ok(s) = self.vsctl(&["get", "Interface", p, "statistics"]) else {
                continue;
            };
            for kv in s.trim().trim_matches(|c| c == '{' || c == '}').split(", ") {
                if let Some((k, n)) = kv.split_once('=') {
                    if (k.contains("drop") || k.contains("error"))
                        && n.trim().parse::<u64>().is_ok_and(|n| n > 0)
                    {
                        v.push(format!("{p} {k}={}", n.trim()));
                    }
                }
            }
        }
        v
    }

    /// `ovs-appctl exit` to each daemon, then SIGTERM (and SIGKILL after 10 s) to those
    /// still there.
    pub fn stop(mut self) -> Vec<String> {
        let mut notes = Vec::new();
        for (name, d, ctl) in [
            (
                "ovs-vswitchd",
                self.vswitchd.take(),
                self.vswitchd_ctl.clone(),
            ),
            ("ovsdb-server", self.ovsdb.take(), self.ovsdb_ctl.clone()),
        ] {
            let Some(d) = d else { continue };
            let mut c = self.env(Command::new("ovs-appctl"));
            c.arg("-t").arg(&ctl).arg("exit");
            let _ = run(&mut c);
            // `exit` may already have ended ovs-vswitchd: give it a moment first.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut d = d;
            let mut gone = None;
            while Instant::now() < deadline {
                if let Some(why) = d.exited() {
                    gone = Some(why);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            match gone {
                Some(why) => notes.push(format!(
                    "{} on `ovs-appctl exit`",
                    why.split("; log:").next().unwrap_or("")
                )),
                None => match d.stop() {
                    Ok(s) => notes.push(format!("{name} exited with {s} on SIGTERM")),
                    Err(e) => notes.push(e),
                },
            }
        }
        notes
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        // Dropping the DaemonProcs kills them; vswitchd first.
        self.vswitchd.take();
        self.ovsdb.take();
    }
}

/// True if the OVS-DPDK binaries are installed.
pub fn available() -> Result<(), String> {
    let missing: Vec<&str> = ["ovsdb-tool", "ovsdb-server", "ovs-vsctl", "ovs-appctl"]
        .into_iter()
        .filter(|p| !daemon::on_path(p))
        .chain((!Path::new(VSWITCHD_DPDK).is_file()).then_some(VSWITCHD_DPDK))
        .chain((!Path::new(SCHEMA).is_file()).then_some(SCHEMA))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Open vSwitch with DPDK is not installed (missing {}): run scripts/setup-bench.sh \
             (or leave it out with --targets vswitch,vhost-pmd)",
            missing.join(", ")
        ))
    }
}

/// Sum the `pmd thread` blocks of `dpif-netdev/pmd-stats-show` (the main thread's block is
/// not a PMD and is skipped).
pub fn parse_pmd_stats(out: &str) -> PmdStats {
    let mut s = PmdStats::default();
    let mut in_pmd = false;
    for line in out.lines() {
        if !line.starts_with(' ') {
            in_pmd = line.starts_with("pmd thread");
            continue;
        }
        if !in_pmd {
            continue;
        }
        let Some((key, val)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(n) = val
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        match key {
            "packets received" => s.packets += n,
            "idle cycles" => s.idle_cycles += n,
            "processing cycles" => s.processing_cycles += n,
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmd_stats_parse() {
        let out = "pmd thread numa_id 0 core_id 1:
  packets received: 5918688
  packet recirculations: 0
  avg. datapath passes per packet: 1.00
  emc hits: 5918688
  idle cycles: 2550837394 (48.87%)
  processing cycles: 2668280912 (51.13%)
  avg cycles per packet: 881.80 (5219118306/5918688)
  avg processing cycles per packet: 450.82 (2668280912/5918688)
main thread:
  packets received: 7
  idle cycles: 1 (0%)
";
        let s = parse_pmd_stats(out);
        assert_eq!(s.packets, 5918688);
        assert_eq!(s.idle_cycles, 2550837394);
        assert_eq!(s.processing_cycles, 2668280912);
        let c = s.processing_cycles_per_packet().expect("packets");
        assert!((c - 450.82).abs() < 0.01);
        let b = s.busy_fraction().expect("cycles");
        assert!((b - 0.5113).abs() < 0.001);
    }
}
