//! Helpers shared by the end-to-end tests: locating the built daemons, starting them on a
//! socket in a temp dir, and the "missing tool" policy (skip on a laptop, fail in CI).

pub mod blk;
pub mod crash;
pub mod frontend;
pub mod guest;
pub mod testpmd;
pub mod vswitch;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when running under CI (`CI` set to anything but "false"/"0").
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v != "false" && v != "0")
        .unwrap_or(false)
}

/// Called when a test cannot run because something outside the project is missing.
/// In CI that is a failure (CI installs everything); elsewhere the test is skipped loudly.
/// Returns `false` so callers can `if !require(..) { return; }`.
pub fn require(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if in_ci() {
        panic!("{what} is required in CI but missing: .ci/run must install it");
    }
    eprintln!("SKIP: {what} is missing (run `make setup` to install it)");
    false
}

/// True if `prog` is found on PATH.
pub fn have_program(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(prog).is_file()))
        .unwrap_or(false)
}

/// The workspace's target directory for the profile these tests were built with.
pub fn target_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary sits in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary (`vdisk`, `vswitch`), built by `cargo build` before the tests.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --workspace --bins` before the tests (make test does)",
        p.display()
    );
    p
}

/// vdisk's control socket for the vhost-user socket `socket` (its default: `SOCKET.ctl`).
pub fn control_socket(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// `vdisk ctl --socket SOCKET.ctl --json stats`: the counters of the vdisk serving
/// `socket`.
pub fn vdisk_stats(socket: &Path) -> serde_json::Value {
    let out = Command::new(bin("vdisk"))
        .arg("ctl")
        .arg("--socket")
        .arg(control_socket(socket))
        .args(["--json", "stats"])
        .output()
        .expect("run vdisk ctl");
    assert!(out.status.success(), "vdisk ctl stats failed: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ctl stats JSON");
    v["counters"].clone()
}

/// Wait until `path` exists and accepts a connection.
pub fn wait_for_socket(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "socket {} did not come up within {timeout:?}",
        path.display()
    );
}

/// A running daemon that is killed (SIGKILL) if the test drops it without stopping it.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    /// Start `vdisk serve --image IMAGE --socket SOCKET EXTRA...` and wait for the socket.
    pub fn vdisk(image: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let mut cmd = Command::new(bin("vdisk"));
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().expect("spawn vdisk");
        let mut d = Daemon {
            child,
            socket: socket.to_path_buf(),
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("daemon exited early with {status}");
            }
            if self.socket.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon socket {} never appeared", self.socket.display());
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill() with a pid we own and a valid signal number has no memory effects.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM for 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
