//! One interactive (`-i`) `dpdk-testpmd` driven over its stdin: the traffic peer of the
//! end-to-end tests (`e2e::testpmd` builds its command line and panics on errors) and the
//! generator and "switch" of the network benchmark.
//!
//! A command is written to stdin and its reply is everything printed up to the next
//! `testpmd> ` prompt. testpmd prints through stdio, which a pipe makes fully buffered,
//! while its command line writes the prompt straight to the descriptor, so testpmd runs
//! under `stdbuf -o0 -e0` with stderr sent down the stdout pipe: replies come before their
//! prompt, in order. Everything it prints is kept (and copied to a log file if asked).
//! The process leads its own process group with PR_SET_PDEATHSIG ([`contain`]), is
//! asked to `quit` by [`Testpmd::quit`], and its group is killed if it is dropped before.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{contain, kill_group};

/// The testpmd binary (Debian package dpdk-dev).
pub const TESTPMD: &str = "dpdk-testpmd";

const PROMPT: &str = "testpmd> ";
/// Startup: EAL init, hugepage allocation, vhost-user negotiation of every port.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// One command, including `port stop`/`port start` (a vhost-user renegotiation), or `quit`.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of output an error message ends with.
const TAIL_LINES: usize = 40;

/// What testpmd 22.11 prints for a command it refuses.
const REFUSALS: [&str; 7] = [
    "Bad arguments",
    "Command not found",
    "Invalid port",
    "Error:",
    "error: (",
    "Please stop",
    "Please remove",
];

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
    /// testpmd's own receive rate since the previous `show port stats` (0 if not shown).
    pub rx_pps: u64,
}

/// The `CPU cycles/packet` line of `show fwd stats all` (with `--record-core-cycles`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdCycles {
    /// Cycles of the forwarding iterations that received packets (empty polls excluded).
    pub busy_cycles: u64,
    pub packets: u64,
    /// The TSC frequency testpmd measured.
    pub mhz: u64,
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

    fn closed(&self) -> bool {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pump(&self, mut stream: impl Read, mut log: Option<File>) {
        let mut buf = [0u8; 16384];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(f) = log.as_mut() {
                        let _ = f.write_all(&buf[..n]);
                    }
                    self.text().push_str(&String::from_utf8_lossy(&buf[..n]));
                    self.changed.notify_all();
                }
            }
        }
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }
}

/// A running interactive testpmd; its process group is killed when dropped.
pub struct Testpmd {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Output>,
    reader: Option<JoinHandle<()>>,
    /// Offset in the output just after the last prompt a command waited for.
    mark: usize,
    /// How many `--vdev` ports the command line creates.
    ports: usize,
}

impl Testpmd {
    /// Start `dpdk-testpmd ARGS -i` (EAL arguments, `--`, application arguments) and wait
    /// for its first prompt. `name` names it in error messages. Its output is also written
    /// to `log` if given. `watch` is polled meanwhile: a reason from it (a peer died, the
    /// run was interrupted) ends the wait with an error.
    pub fn spawn(
        name: &str,
        args: &[String],
        log: Option<&Path>,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<Testpmd, String> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("exec stdbuf -o0 -e0 {TESTPMD} \"$@\" 2>&1"))
            .arg(TESTPMD)
            .args(args)
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        contain(&mut cmd);
        let logf = match log {
            Some(path) => {
                let mut f =
                    File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
                let _ = writeln!(f, "# {TESTPMD} {} -i", args.join(" "));
                Some(f)
            }
            None => None,
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {TESTPMD} ({name}): {e}"))?;
        let out = Arc::new(Output::default());
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let reader = {
            let out = out.clone();
            std::thread::spawn(move || out.pump(stdout, logf))
        };
        let stdin = child.stdin.take();
        let mut t = Testpmd {
            name: name.to_string(),
            child,
            stdin,
            out,
            reader: Some(reader),
            mark: 0,
            ports: args.iter().filter(|a| *a == "--vdev").count(),
        };
        t.wait_prompt(START_TIMEOUT, "startup", watch)?;
        Ok(t)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// An error message: the name, whether it still runs, what failed and why, and the
    /// last lines it printed.
    pub fn error(&mut self, what: &str, why: &str) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("exited with {s}"),
            _ => "still running".to_string(),
        };
        format!(
            "testpmd {} ({status}): {what}: {why}\n--- last {TAIL_LINES} lines of its output ---\n{}\n---",
            self.name,
            self.tail(TAIL_LINES)
        )
    }

    /// Wait for a prompt after `self.mark`; move the mark past it and return what came
    /// before it.
    fn wait_prompt(
        &mut self,
        timeout: Duration,
        what: &str,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let out = self.out.clone();
        let mut text = out.text();
        loop {
            if let Some(at) = text[self.mark..].find(PROMPT) {
                let reply = text[self.mark..self.mark + at].to_string();
                self.mark += at + PROMPT.len();
                return Ok(reply);
            }
            let why = if out.closed() {
                Some("testpmd exited".to_string())
            } else if let Some(why) = watch() {
                Some(why)
            } else if Instant::now() >= deadline {
                Some(format!("no prompt within {timeout:?}"))
            } else {
                None
            };
            if let Some(why) = why {
                drop(text);
                return Err(self.error(what, &why));
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            text = out
                .changed
                .wait_timeout(text, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Run one interactive command and return its reply (the output up to the next
    /// prompt). An error if testpmd does not answer, does not know the command or rejects
    /// its arguments.
    pub fn cmd(&mut self, line: &str) -> Result<String, String> {
        let sent = self.stdin.as_mut().map(|s| {
            s.write_all(format!("{line}\n").as_bytes())
                .and_then(|()| s.flush())
        });
        match sent {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(self.error(line, &format!("cannot write the command: {e}"))),
            None => return Err(self.error(line, "stdin already closed")),
        }
        let reply = self.wait_prompt(COMMAND_TIMEOUT, line, &mut || None)?;
        if let Some(bad) = REFUSALS.iter().find(|bad| reply.contains(*bad)) {
            return Err(self.error(line, &format!("testpmd answered \"{bad}\"")));
        }
        Ok(reply)
    }

    /// Every port's counters (`show port stats all`), indexed by port id.
    pub fn port_stats(&mut self) -> Result<Vec<PortStats>, String> {
        let reply = self.cmd("show port stats all")?;
        let parsed = parse_port_stats(&reply);
        let ids: Vec<u16> = parsed.iter().map(|(id, _)| *id).collect();
        if ids != (0..self.ports as u16).collect::<Vec<_>>() {
            return Err(self.error(
                "show port stats all",
                &format!("expected ports 0..{}, parsed {ids:?}", self.ports),
            ));
        }
        Ok(parsed.into_iter().map(|(_, s)| s).collect())
    }

    /// Forwarding cycles since the last `clear fwd stats all` (None without packets, or
    /// without `--record-core-cycles`).
    pub fn fwd_cycles(&mut self) -> Result<Option<FwdCycles>, String> {
        let reply = self.cmd("show fwd stats all")?;
        Ok(parse_fwd_cycles(&reply))
    }

    /// `quit`, then end of input, and wait for the exit (its final statistics are then in
    /// [`Testpmd::output`]). After [`COMMAND_TIMEOUT`] the group is killed: an error.
    pub fn quit(&mut self) -> Result<ExitStatus, String> {
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
                Ok(None) => {
                    kill_group(self.child.id());
                    let _ = self.child.wait();
                    return Err(self.error(
                        "quit",
                        &format!("still running after {COMMAND_TIMEOUT:?} (killed)"),
                    ));
                }
                Err(e) => return Err(self.error("quit", &format!("cannot wait: {e}"))),
            }
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(status)
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // Not once reaped: the pid (and group id) may belong to someone else by then.
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            kill_group(self.child.id());
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
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
                rx_pps: field("Rx-pps"),
            },
        ));
    }
    out
}

/// Parse `CPU cycles/packet=X (total cycles=Y / total io packets=Z) at M MHz Clock`.
pub fn parse_fwd_cycles(out: &str) -> Option<FwdCycles> {
    let line = out.lines().find(|l| l.contains("CPU cycles/packet="))?;
    let num_after = |key: &str| -> Option<u64> {
        line.split(key)
            .nth(1)?
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some(FwdCycles {
        busy_cycles: num_after("total cycles=")?,
        packets: num_after("packets=")?,
        mhz: num_after(" at ")?,
    })
}

/// The generator's TX-dropped total from the `Accumulated forward statistics` block that
/// `stop` and `show fwd stats all` print: frames it received but could not send on.
pub fn parse_fwd_tx_dropped(out: &str) -> Option<u64> {
    let acc = out.split("Accumulated forward statistics").nth(1)?;
    acc.split("TX-dropped:")
        .nth(1)?
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
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
  Rx-pps:      2504857          Rx-bps:   1282487064
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
            rx_pps: 2504857,
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

    #[test]
    fn parses_accumulated_tx_dropped() {
        let out = "  ------- Forward statistics for port 0  -------
  RX-packets: 10             RX-dropped: 0             RX-total: 10
  TX-packets: 9              TX-dropped: 1             TX-total: 10

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 20             RX-dropped: 0             RX-total: 20
  TX-packets: 17             TX-dropped: 3             TX-total: 20
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
";
        assert_eq!(parse_fwd_tx_dropped(out), Some(3));
        assert_eq!(parse_fwd_tx_dropped("TX-dropped: 1"), None);
    }

    #[test]
    fn parses_fwd_cycles() {
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
