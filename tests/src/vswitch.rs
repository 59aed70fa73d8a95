//! A `vswitch serve` process for a test: its configuration generated in a temp dir, its log
//! in a file (printed if the test fails), and `vswitch ctl` against its control socket.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bin;

/// One port of the switch under test: its name and the rest of its `[[port]]` table.
pub type PortDef<'a> = (&'a str, &'a str);

/// One port's counters, by name (`vswitch ctl stats`).
pub type Counters = HashMap<String, u64>;

/// A counter, 0 if the switch does not report it.
pub fn get(c: &Counters, key: &str) -> u64 {
    c.get(key).copied().unwrap_or(0)
}

pub struct Switch {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Switch {
    /// Start a switch with `ports`, each listening on `NAME.sock` in a temp dir, and wait for
    /// every socket.
    pub fn start(ports: &[PortDef<'_>]) -> Switch {
        Switch::with_config("", ports)
    }

    /// [`Switch::start`] with `extra` TOML after the `[switch]` table (`[[vlan]]` tables,
    /// say). A port with `mode = "client"` connects to `NAME.sock` (a QEMU listening
    /// there) instead of creating it.
    pub fn with_config(extra: &str, ports: &[PortDef<'_>]) -> Switch {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = format!(
            "[switch]\ncontrol_socket = \"{}\"\n{extra}\n",
            dir.path().join("ctl.sock").display()
        );
        for (name, keys) in ports {
            let socket = dir.path().join(format!("{name}.sock"));
            let socket = socket.display();
            write!(
                config,
                "\n[[port]]\nname = \"{name}\"\nsocket = \"{socket}\"\n{keys}\n"
            )
            .expect("format");
        }
        let config_path = dir.path().join("switch.toml");
        std::fs::write(&config_path, &config).expect("write the config");
        let log = dir.path().join("vswitch.log");
        let child = Command::new(bin("vswitch"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log"))
            .spawn()
            .expect("spawn vswitch");
        let mut switch = Switch { child, dir, log };
        // Wait for the socket files rather than connect: a probe would be a session.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut paths: Vec<PathBuf> = ports
            .iter()
            .filter(|(_, keys)| !keys.contains("mode = \"client\""))
            .map(|(n, _)| switch.socket(n))
            .collect();
        paths.push(switch.dir.path().join("ctl.sock"));
        for path in paths {
            while !path.exists() {
                switch.assert_alive("start");
                assert!(
                    Instant::now() < deadline,
                    "vswitch did not create {} within 20 s:\n{}",
                    path.display(),
                    switch.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        switch
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir holding the config, the log and the sockets.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn socket(&self, port: &str) -> PathBuf {
        self.dir.path().join(format!("{port}.sock"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panic (with the log) if the process has exited.
    #[track_caller]
    pub fn assert_alive(&mut self, after: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "vswitch exited with {status} after {after}:\n{}",
                self.log()
            );
        }
    }

    /// `vswitch ctl --socket ... ARGS`, its output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(bin("vswitch"))
            .arg("ctl")
            .arg("--socket")
            .arg(self.dir.path().join("ctl.sock"))
            .args(args)
            .output()
            .expect("run vswitch ctl");
        assert!(
            out.status.success(),
            "vswitch ctl {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `vswitch ctl --json ARGS`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.ctl(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {text}"))
    }

    /// Every port's counters (`vswitch ctl --json stats`).
    pub fn stats(&self) -> HashMap<String, Counters> {
        let v = self.ctl_json(&["stats"]);
        let ports = v["stats"].as_array().expect("ctl stats: a stats array");
        ports
            .iter()
            .map(|p| {
                let name = p["name"].as_str().expect("ctl stats: port name");
                let counters = p["counters"]
                    .as_object()
                    .expect("ctl stats: counters")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().expect("ctl stats: a number")))
                    .collect();
                (name.to_string(), counters)
            })
            .collect()
    }

    /// Whether a guest's receive ring is attached to `port` (`vswitch ctl --json ports`).
    pub fn guest_connected(&self, port: &str) -> bool {
        let v = self.ctl_json(&["ports"]);
        let ports = v["ports"].as_array().expect("ctl ports: a ports array");
        let p = ports
            .iter()
            .find(|p| p["name"] == port)
            .unwrap_or_else(|| panic!("ctl ports: no port {port}"));
        p["guest_connected"].as_bool() == Some(true)
    }

    /// SIGTERM; the switch must exit 0.
    pub fn stop(mut self) {
        // SAFETY: kill() on a child we own, with a valid signal; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "vswitch exit status {status}\n{}",
                    self.log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "vswitch ignored SIGTERM\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- vswitch log ---\n{}\n---", self.log());
        }
    }
}
