//! Starting, watching and stopping the daemons under measurement.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::signals;

/// A daemon started for the run: killed when dropped, and (through PR_SET_PDEATHSIG) when the
/// runner dies without dropping it.
pub struct DaemonProc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

pub use testkit::contain;

impl DaemonProc {
    /// Spawn `cmd` with its output in `log`, and wait until it listens on `socket`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        socket: &Path,
        log: &Path,
    ) -> Result<DaemonProc, String> {
        let out = File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("dup {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        contain(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {name} ({:?}): {e}", cmd.get_program()))?;
        let mut d = DaemonProc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            signals::check()?;
            if let Some(status) = d.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!(
                    "{name} exited at start with {status}; its log ({}):\n{}",
                    d.log.display(),
                    d.log_tail()
                ));
            }
            if socket.exists() {
                // Bound; the client retries the short window until listen().
                return Ok(d);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} did not listen on {} within 20 s; its log:\n{}",
                    socket.display(),
                    d.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the daemon's output.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// None while running, else a description of how it ended.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(s)) => Some(format!(
                "{} exited with {s}; log:\n{}",
                self.name,
                self.log_tail()
            )),
            Err(e) => Some(format!("{}: wait: {e}", self.name)),
        }
    }

    /// User + system CPU time of the whole process (all threads), from /proc/PID/stat.
    pub fn cpu_time(&self) -> Result<Duration, String> {
        cpu_time(self.pid())
    }

    /// SIGTERM, then wait up to 10 s (SIGKILL after that).
    pub fn stop(mut self) -> Result<ExitStatus, String> {
        // SAFETY: kill() on our own child's pid has no memory effects.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!("{} ignored SIGTERM for 10 s (killed)", self.name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of process `pid` (all its threads, live and exited).
pub fn cpu_time(pid: u32) -> Result<Duration, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let tick = |i: usize| -> Result<u64, String> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("{path}: field {i} missing"))
    };
    let ticks = tick(14)? + tick(15)?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Run a command to completion and return its stdout; an error with its output if it fails.
pub fn run_tool(c: &mut Command) -> Result<String, String> {
    c.stdin(Stdio::null());
    let desc = format!("{c:?}");
    let out = c.output().map_err(|e| format!("{desc}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{desc} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True if `prog` is an executable file on PATH.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(prog).is_file()))
        .unwrap_or(false)
}

/// First line of `prog --version`, for the report.
pub fn version(prog: &Path) -> String {
    Command::new(prog)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown version".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_parses() {
        let t0 = cpu_time(std::process::id()).expect("own /proc stat");
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let t1 = cpu_time(std::process::id()).expect("own /proc stat");
        assert!(t1 > t0, "CPU time did not advance: {t0:?} -> {t1:?}");
    }
}
