//! An interactive (`-i`) `dpdk-testpmd` driven over its stdin: the traffic generator of every
//! run, and the "switch" of the vhost-PMD target.
//!
//! A command is written to stdin and its output is everything printed up to the next
//! `testpmd> ` prompt. All output also goes to a log file, for the report's error messages.
//! The process lives in its own process group with PR_SET_PDEATHSIG (see
//! [`contain`](crate::blk::daemon::contain)), is asked to `quit` by [`Testpmd::quit`], and is
//! killed (the whole group) when dropped.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::blk::daemon::contain;
use crate::signals;

pub const TESTPMD: &str = "dpdk-testpmd";
const PROMPT: &str = "testpmd> ";
/// EAL init, mempool creation and the vhost-user negotiation of every port.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Output {
    /// Output not yet consumed by a command.
    text: String,
    /// Both pipes reached EOF: the process is gone.
    eof: u8,
}

type Shared = Arc<(Mutex<Output>, Condvar)>;

pub struct Testpmd {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Shared,
    readers: Vec<JoinHandle<()>>,
    log: PathBuf,
}

/// Counters of one port from `show port stats all`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_missed: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub rx_nombuf: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_bytes: u64,
    /// testpmd's own rate since the previous `show port stats`.
    pub rx_pps: u64,
}

/// The `CPU cycles/packet` line of `show fwd stats all` (with `--record-core-cycles`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FwdCycles {
    /// Cycles of the forwarding iterations that received packets (empty polls excluded).
    pub busy_cycles: u64,
    pub packets: u64,
    /// The TSC frequency testpmd measured.
    pub mhz: u64,
}

impl Testpmd {
    /// Start `testpmd` with `args` (EAL args, `--`, app args; `-i` is added) and wait for its
    /// first prompt. Output goes to `log`. `watch` is polled meanwhile: a reason from it (the
    /// peer died, say) ends the wait.
    pub fn spawn(
        name: &str,
        args: &[String],
        log: &Path,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Testpmd, String> {
        // testpmd prints through stdio, which a pipe makes fully buffered, while its command
        // line writes the prompt straight to the descriptor: unbuffer stdio with stdbuf (which
        // execs testpmd, so the pid is testpmd's).
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-o0", "-e0", TESTPMD])
            .args(args)
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        contain(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {TESTPMD} ({name}): {e}"))?;
        let logf = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let _ = writeln!(&logf, "# {TESTPMD} {} -i", args.join(" "));
        let logf = Arc::new(Mutex::new(logf));
        let out: Shared = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let mut readers = Vec::new();
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().ok_or("no stdout pipe")?),
            Box::new(child.stderr.take().ok_or("no stderr pipe")?),
        ];
        for mut pipe in pipes {
            let out = out.clone();
            let logf = logf.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    let n = match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => 0,
                        Ok(n) => n,
                    };
                    let (lock, cv) = &*out;
                    let Ok(mut o) = lock.lock() else { return };
                    if n == 0 {
                        o.eof += 1;
                        cv.notify_all();
                        return;
                    }
                    if let Ok(mut f) = logf.lock() {
                        let _ = f.write_all(&buf[..n]);
                    }
                    o.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    cv.notify_all();
                }
            }));
        }
        let stdin = child.stdin.take();
        let mut t = Testpmd {
            name: name.to_string(),
            child,
            stdin,
            out,
            readers,
            log: log.to_path_buf(),
        };
        t.wait_prompt(START_TIMEOUT, "start", watch)?;
        Ok(t)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn fail(&mut self, what: &str, why: &str) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!(" (exited: {s})"),
            _ => String::new(),
        };
        format!(
            "testpmd {}{status}: {what}: {why}; last lines of {}:\n{}",
            self.name,
            self.log.display(),
            self.log_tail(15)
        )
    }

    /// Wait for the next prompt; returns the output before it and consumes both.
    fn wait_prompt(
        &mut self,
        timeout: Duration,
        what: &str,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let out = self.out.clone();
        let (lock, cv) = &*out;
        let mut o = lock
            .lock()
            .map_err(|_| "output lock poisoned".to_string())?;
        loop {
            if let Some(pos) = o.text.find(PROMPT) {
                let before = o.text[..pos].to_string();
                o.text.drain(..pos + PROMPT.len());
                return Ok(before);
            }
            if o.eof >= 2 {
                drop(o);
                let _ = self.child.wait();
                return Err(self.fail(what, "the process ended"));
            }
            if signals::stopped() {
                return Err("interrupted".to_string());
            }
            if let Some(why) = watch() {
                drop(o);
                return Err(self.fail(what, &why));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(o);
                return Err(self.fail(what, &format!("no prompt within {timeout:?}")));
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            o = cv
                .wait_timeout(o, wait)
                .map_err(|_| "output lock poisoned".to_string())?
                .0;
        }
    }

    /// Run one command and return its output.
    pub fn cmd(&mut self, line: &str) -> Result<String, String> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(self.fail(line, "stdin closed"));
        };
        if let Err(e) = stdin.write_all(format!("{line}\n").as_bytes()) {
            return Err(self.fail(line, &format!("write to stdin: {e}")));
        }
        let _ = stdin.flush();
        let out = self.wait_prompt(COMMAND_TIMEOUT, line, &mut || None)?;
        // Drop the echoed command line.
        Ok(match out.split_once(line) {
            Some((_, rest)) => rest.to_string(),
            None => out,
        })
    }

    pub fn port_stats(&mut self) -> Result<Vec<PortStats>, String> {
        let out = self.cmd("show port stats all")?;
        let stats = parse_port_stats(&out);
        if stats.is_empty() {
            return Err(self.fail("show port stats all", "no port statistics in the output"));
        }
        Ok(stats)
    }

    /// Forwarding cycles since the last `clear fwd stats all` (None without packets).
    pub fn fwd_cycles(&mut self) -> Result<Option<FwdCycles>, String> {
        let out = self.cmd("show fwd stats all")?;
        Ok(parse_fwd_cycles(&out))
    }

    /// `quit`, then SIGKILL to the group after 10 s.
    pub fn quit(mut self) -> Result<ExitStatus, String> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
            // Dropping stdin also ends testpmd's command loop (EOF).
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "testpmd {} did not quit within 10 s (killed)",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // Not once reaped: the pid (and group id) may belong to someone else by then.
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            kill_group(self.child.id());
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// SIGKILL the process group led by `pid` (our children lead their own groups, see
/// `contain`), and the process itself in case it left the group.
pub fn kill_group(pid: u32) {
    let pid = pid as libc::pid_t;
    if pid <= 1 {
        return;
    }
    // SAFETY: kill() has no memory effects; pid is a child of ours that leads its own group.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Parse the `NIC statistics for port N` blocks.
pub fn parse_port_stats(out: &str) -> Vec<PortStats> {
    let mut ports: Vec<PortStats> = Vec::new();
    let mut cur: Option<usize> = None;
    for line in out.lines() {
        if let Some(rest) = line.split("NIC statistics for port").nth(1) {
            cur = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(i) = cur {
                if ports.len() <= i {
                    ports.resize(i + 1, PortStats::default());
                }
            }
            continue;
        }
        let Some(i) = cur else { continue };
        let toks: Vec<&str> = line.split_whitespace().collect();
        for w in toks.windows(2) {
            let Some(key) = w[0].strip_suffix(':') else {
                continue;
            };
            let Ok(v) = w[1].parse::<u64>() else { continue };
            let p = &mut ports[i];
            match key {
                "RX-packets" => p.rx_packets = v,
                "RX-missed" => p.rx_missed = v,
                "RX-bytes" => p.rx_bytes = v,
                "RX-errors" => p.rx_errors = v,
                "RX-nombuf" => p.rx_nombuf = v,
                "TX-packets" => p.tx_packets = v,
                "TX-errors" => p.tx_errors = v,
                "TX-bytes" => p.tx_bytes = v,
                "Rx-pps" => p.rx_pps = v,
                _ => {}
            }
        }
    }
    ports
}

/// Parse `CPU cycles/packet=X (total cycles=Y / total io packets=Z) at M MHz Clock`.
pub fn parse_fwd_cycles(out: &str) -> Option<FwdCycles> {
    let line = out.lines().find(|l| l.contains("CPU cycles/packet="))?;
    let num_after = |key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let packets = line
        .split("packets=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(FwdCycles {
        busy_cycles: num_after("total cycles=")?,
        packets,
        mhz: num_after(" at ")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT_STATS: &str = "
  ######################## NIC statistics for port 0  ########################
  RX-packets: 1608512    RX-missed: 0          RX-bytes:  102944768
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 1608736    TX-errors: 0          TX-bytes:  102959104

  Throughput (since last show)
  Rx-pps:      2504857          Rx-bps:   1282487064
  Tx-pps:            0          Tx-bps:            0
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: 1608704    RX-missed: 3          RX-bytes:  102957056
  RX-errors: 0
  RX-nombuf:  7         
  TX-packets: 1608544    TX-errors: 0          TX-bytes:  102946816

  Throughput (since last show)
  Rx-pps:            12          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
";

    #[test]
    fn port_stats_parse() {
        let p = parse_port_stats(PORT_STATS);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].rx_packets, 1608512);
        assert_eq!(p[0].tx_bytes, 102959104);
        assert_eq!(p[0].rx_pps, 2504857);
        assert_eq!(p[1].rx_missed, 3);
        assert_eq!(p[1].rx_nombuf, 7);
        assert_eq!(p[1].rx_pps, 12);
    }

    #[test]
    fn fwd_cycles_parse() {
        let out = "  ++++\n\n  CPU cycles/packet=805.83 (total cycles=1373466182 / total io \
                   packets=1704416) at 2300 MHz Clock\n";
        assert_eq!(
            parse_fwd_cycles(out),
            Some(FwdCycles {
                busy_cycles: 1373466182,
                packets: 1704416,
                mhz: 2300
            })
        );
        assert_eq!(parse_fwd_cycles("nothing"), None);
    }
}
