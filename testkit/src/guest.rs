//! Boot a real Linux guest under QEMU (TCG) with vhost-user devices and a test script.
//!
//! The guest is the small kernel + busybox initramfs that `scripts/build-guest.sh` puts in
//! `target/guest/`. Its `/init` loads the virtio (and ext4) modules, prints
//! `GUEST-INIT: ready ...`, runs `/test.sh` if there is one (printing `GUEST-TEST: start` and
//! `GUEST-TEST: exit RC` around it) and powers off. [`Guest`] supplies `/test.sh` (and any
//! other files) in a second cpio archive appended to the base initramfs, so nothing is
//! rebuilt per test. Scripts report to the host with lines `RESULT <key> <value...>`,
//! read back with [`GuestOutput::result`].
//!
//! ```no_run
//! use testkit::guest::Guest;
//! # let sock = std::path::Path::new("/tmp/x.sock");
//! let out = Guest::new("echo RESULT size $(blockdev --getsize64 /dev/vda)")
//!     .blk(sock)
//!     .run();
//! out.assert_ok();
//! assert_eq!(out.result("size"), Some("67108864"));
//! ```
//!
//! [`Guest::net`] adds a virtio-net-pci NIC on a vhost-user netdev the same way.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The QEMU binary the guests run under.
pub const QEMU: &str = "qemu-system-x86_64";

/// Guest RAM in MiB unless a test asks for more. It is shared with the vhost-user backends
/// (memory-backend-memfd, share=on), which is what vhost-user requires.
pub const DEFAULT_MEMORY_MIB: u32 = 512;

/// Time allowed for one QEMU run (all boots included) unless a test asks otherwise. A boot
/// takes 3-7 s under TCG on an idle machine; CI runs several tests at once on two cores.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// Kernel command line: serial console, quiet enough that kernel messages rarely interleave
/// with the script's output, and a panic reboots at once (so with `-no-reboot` QEMU exits
/// instead of waiting for the timeout).
pub const BASE_CMDLINE: &str = "console=ttyS0 loglevel=4 panic=-1 edd=off";

/// Where `scripts/build-guest.sh` puts the guest: `$GUEST_DIR` if set (the script honours it
/// too), else `<workspace>/target/guest`.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or(manifest)
        .join("target")
        .join("guest")
}

/// The guest kernel and base initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// The built guest, or `None` if `scripts/build-guest.sh` has not run.
    pub fn locate() -> Option<GuestImage> {
        let dir = guest_dir();
        let image = GuestImage {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
        };
        (image.kernel.is_file() && image.initramfs.is_file()).then_some(image)
    }
}

/// One QEMU guest to boot: devices, files for the initramfs, and the test script.
#[derive(Debug, Clone)]
pub struct Guest {
    script: String,
    files: Vec<(String, Vec<u8>, u32)>,
    devices: Vec<Vec<OsString>>,
    extra_args: Vec<OsString>,
    cmdline: String,
    memory_mib: u32,
    timeout: Duration,
    allow_reboot: bool,
    boot_counter: bool,
    console_log: Option<PathBuf>,
}

impl Guest {
    /// A guest that runs `script` (busybox `sh`) as `/test.sh`, then powers off.
    pub fn new(script: impl Into<String>) -> Guest {
        Guest {
            script: script.into(),
            files: Vec::new(),
            devices: Vec::new(),
            extra_args: Vec::new(),
            cmdline: String::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            timeout: DEFAULT_TIMEOUT,
            allow_reboot: false,
            boot_counter: false,
            console_log: None,
        }
    }

    /// Add a vhost-user-blk-pci disk whose backend listens on `socket`. Disks appear in the
    /// guest in the order they are added: /dev/vda, /dev/vdb, ...
    pub fn blk(self, socket: impl AsRef<Path>) -> Guest {
        self.blk_with(socket, "")
    }

    /// Like [`Guest::blk`] with extra `-device` properties, e.g. `"num-queues=2"`.
    pub fn blk_with(mut self, socket: impl AsRef<Path>, device_props: &str) -> Guest {
        let n = self.devices.len();
        let mut chardev = OsString::from(format!("socket,id=vublk{n},path="));
        chardev.push(socket.as_ref().as_os_str());
        let mut device = format!("vhost-user-blk-pci,chardev=vublk{n},id=vublkdev{n}");
        if !device_props.is_empty() {
            device.push(',');
            device.push_str(device_props);
        }
        self.devices.push(vec![
            "-chardev".into(),
            chardev,
            "-device".into(),
            device.into(),
        ]);
        self
    }

    /// Add a virtio-net-pci NIC with MAC `mac` whose vhost-user backend listens on `socket`.
    /// NICs appear in the guest in the order they are added: eth0, eth1, ...
    pub fn net(mut self, socket: impl AsRef<Path>, mac: &str) -> Guest {
        let n = self.devices.len();
        let mut chardev = OsString::from(format!("socket,id=vunet{n},path="));
        chardev.push(socket.as_ref().as_os_str());
        self.devices.push(vec![
            "-chardev".into(),
            chardev,
            "-netdev".into(),
            format!("vhost-user,id=vunetdev{n},chardev=vunet{n}").into(),
            "-device".into(),
            format!("virtio-net-pci,netdev=vunetdev{n},mac={mac},romfile=,vectors=0").into(),
        ]);
        self
    }

    /// Like [`Guest::net`], with `queues` queue pairs (`mq=on`).
    pub fn net_mq(mut self, socket: impl AsRef<Path>, mac: &str, queues: u16) -> Guest {
        self = self.net(socket, mac);
        if let Some(dev) = self.devices.last_mut() {
            dev[3].push(format!(",queues={queues}"));
            dev[5].push(",mq=on");
        }
        self
    }

    /// Like [`Guest::net`], but QEMU listens on `socket` (`server=on,wait=off`) and the
    /// backend connects to it: a vswitch port in client mode.
    pub fn net_server(mut self, socket: impl AsRef<Path>, mac: &str) -> Guest {
        self = self.net(socket, mac);
        if let Some(dev) = self.devices.last_mut() {
            dev[1].push(",server=on,wait=off");
        }
        self
    }

    /// Append one raw QEMU argument (escape hatch for netdevs, extra devices, ...).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Guest {
        self.extra_args.push(arg.into());
        self
    }

    /// Put a file into the guest's root filesystem (parent directories are created).
    pub fn file(mut self, guest_path: &str, contents: impl Into<Vec<u8>>) -> Guest {
        self.files
            .push((guest_path.to_string(), contents.into(), 0o100_644));
        self
    }

    /// Append to the kernel command line (after `console=ttyS0 ...`).
    pub fn kernel_cmdline(mut self, extra: &str) -> Guest {
        if !self.cmdline.is_empty() {
            self.cmdline.push(' ');
        }
        self.cmdline.push_str(extra);
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Guest {
        self.memory_mib = mib;
        self
    }

    /// Kill QEMU and fail if the whole run (every boot) takes longer than this.
    pub fn timeout(mut self, timeout: Duration) -> Guest {
        self.timeout = timeout;
        self
    }

    /// Let a guest `reboot -f` restart the machine (drops `-no-reboot`). The same
    /// `/test.sh` runs again on every boot; it must itself decide when to power off.
    pub fn allow_reboot(mut self) -> Guest {
        self.allow_reboot = true;
        self
    }

    /// Tell `/test.sh` which boot this is, in `$BOOT` (1, 2, ...), for a guest that reboots
    /// ([`Guest::allow_reboot`]). An initramfs forgets everything on reset, so the count
    /// lives in the first sector of a small disk on QEMU's own virtio-blk-pci (serial
    /// `bootcount`, after the test's disks), which a prelude to the script reads, increments
    /// and writes back. The prelude also prints `RESULT boot N`.
    pub fn boot_counter(mut self) -> Guest {
        self.boot_counter = true;
        self
    }

    /// Keep the serial console log at `path` (by default it lives in a temp dir).
    pub fn console_log(mut self, path: impl Into<PathBuf>) -> Guest {
        self.console_log = Some(path.into());
        self
    }

    /// Boot the guest and wait for QEMU to exit. Panics (with the console tail) if the guest
    /// image is missing, QEMU cannot be started, or the run exceeds the timeout. A QEMU that
    /// exits with an error does not panic here: check with [`GuestOutput::assert_ok`].
    pub fn run(self) -> GuestOutput {
        match self.try_run() {
            Ok(out) => {
                // The test harness shows this only when the test fails.
                eprintln!(
                    "--- guest console ({:.1?}, QEMU {}) ---\n{}\n--- end of guest console ---",
                    out.elapsed,
                    out.status.map_or("killed".to_string(), |s| s.to_string()),
                    out.console
                );
                out
            }
            Err(e) => panic!("guest run failed: {e}"),
        }
    }

    /// Like [`Guest::run`], but what would panic is an error, and nothing is printed.
    pub fn try_run(self) -> Result<GuestOutput, String> {
        self.boot().map_err(|e| e.to_string())
    }

    fn boot(self) -> Result<GuestOutput, GuestError> {
        let image = GuestImage::locate().ok_or_else(|| {
            GuestError::Setup(format!(
                "no guest image in {}: run scripts/build-guest.sh",
                guest_dir().display()
            ))
        })?;
        let dir = tempfile::Builder::new()
            .prefix("e2e-guest-")
            .tempdir()
            .map_err(|e| GuestError::Setup(format!("temp dir: {e}")))?;
        let initrd = dir.path().join("initrd");
        self.write_initrd(&image.initramfs, &initrd)
            .map_err(|e| GuestError::Setup(format!("writing {}: {e}", initrd.display())))?;
        let console = self
            .console_log
            .clone()
            .unwrap_or_else(|| dir.path().join("console.log"));
        let stderr_path = dir.path().join("qemu.stderr");
        let _ = fs::remove_file(&console);

        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-nographic", "-monitor", "none"])
        .arg("-m")
        .arg(format!("{}M", self.memory_mib))
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            self.memory_mib
        ))
        .args(["-numa", "node,memdev=mem"])
        .arg("-serial")
        .arg({
            let mut s = OsString::from("file:");
            s.push(console.as_os_str());
            s
        })
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(self.full_cmdline());
        if !self.allow_reboot {
            cmd.arg("-no-reboot");
        }
        for dev in &self.devices {
            cmd.args(dev);
        }
        if self.boot_counter {
            let disk = dir.path().join("bootcount.img");
            fs::File::create(&disk)
                .and_then(|f| f.set_len(1 << 20))
                .map_err(|e| GuestError::Setup(format!("{}: {e}", disk.display())))?;
            let mut drive = OsString::from("format=raw,if=none,id=bootcount,file=");
            drive.push(disk.as_os_str());
            cmd.arg("-drive")
                .arg(drive)
                .args(["-device", "virtio-blk-pci,drive=bootcount,serial=bootcount"]);
        }
        cmd.args(&self.extra_args);
        let stderr = fs::File::create(&stderr_path)
            .map_err(|e| GuestError::Setup(format!("{}: {e}", stderr_path.display())))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));

        let start = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| GuestError::Setup(format!("cannot start {QEMU}: {e}")))?;
        let mut qemu = KillOnDrop(child);
        let status = loop {
            match qemu.0.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(GuestError::Setup(format!("waiting for {QEMU}: {e}"))),
            }
            if start.elapsed() > self.timeout {
                let _ = qemu.0.kill();
                let _ = qemu.0.wait();
                let out = GuestOutput::read(&console, &stderr_path, None, start.elapsed());
                return Err(GuestError::Timeout(format!(
                    "QEMU killed after {:?} (timeout); {}",
                    self.timeout,
                    out.describe()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(GuestOutput::read(
            &console,
            &stderr_path,
            Some(status),
            start.elapsed(),
        ))
    }

    /// The kernel command line: base, the test's additions, then `$E2E_GUEST_CMDLINE`
    /// (for debugging, e.g. `E2E_GUEST_CMDLINE=loglevel=7`: the last value of a key wins).
    fn full_cmdline(&self) -> String {
        let env = std::env::var("E2E_GUEST_CMDLINE").unwrap_or_default();
        [BASE_CMDLINE, self.cmdline.as_str(), env.as_str()]
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Base initramfs, zero padding to a 4-byte boundary, then our own newc archive with
    /// `/test.sh` and the extra files. The kernel unpacks concatenated archives in order.
    fn write_initrd(&self, base: &Path, out: &Path) -> io::Result<()> {
        let mut data = fs::read(base)?;
        data.resize(data.len().next_multiple_of(4), 0);
        let mut archive = Newc::default();
        let mut dirs: Vec<String> = Vec::new();
        let script = if self.boot_counter {
            format!("{BOOT_COUNTER_PRELUDE}{}", self.script)
        } else {
            self.script.clone()
        };
        let mut entries: Vec<(String, &[u8], u32)> =
            vec![("test.sh".to_string(), script.as_bytes(), 0o100_755)];
        for (path, contents, mode) in &self.files {
            entries.push((path.trim_start_matches('/').to_string(), contents, *mode));
        }
        for (path, _, _) in &entries {
            let mut parent = Path::new(path).parent();
            let mut chain = Vec::new();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                chain.push(p.to_string_lossy().into_owned());
                parent = p.parent();
            }
            for d in chain.into_iter().rev() {
                if !dirs.contains(&d) {
                    archive.push(&d, 0o040_755, &[]);
                    dirs.push(d);
                }
            }
        }
        for (path, contents, mode) in &entries {
            archive.push(path, *mode, contents);
        }
        data.extend_from_slice(&archive.finish());
        let mut f = fs::File::create(out)?;
        f.write_all(&data)?;
        f.sync_all()
    }
}

/// Put before the script by [`Guest::boot_counter`]: `$BOOT` from the `bootcount` disk.
const BOOT_COUNTER_PRELUDE: &str = r#"# Guest::boot_counter: the boot number lives in the disk whose serial is "bootcount".
for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = bootcount ] && BOOT_DISK=/dev/${d##*/}
done
[ -n "$BOOT_DISK" ] || { echo "GUEST-TEST: no bootcount disk"; exit 97; }
BOOT=$(dd if="$BOOT_DISK" bs=512 count=1 2>/dev/null | tr -dc 0-9)
BOOT=$(( ${BOOT:-0} + 1 ))
echo "$BOOT" | dd of="$BOOT_DISK" bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null
echo "RESULT boot $BOOT"
"#;

/// Wait until the console log at `path` ([`Guest::console_log`]) holds `needle` at least
/// `count` times: for a test that acts on the host at a given point of a running guest.
/// False on timeout, or once `running` says the guest is gone (and the log lacks it).
pub fn wait_console(
    path: &Path,
    needle: &str,
    count: usize,
    timeout: Duration,
    running: impl Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let gone = !running();
        let seen = fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).matches(needle).count())
            .unwrap_or(0);
        if seen >= count {
            return true;
        }
        if gone || Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug)]
enum GuestError {
    Setup(String),
    Timeout(String),
}

impl std::fmt::Display for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestError::Setup(m) | GuestError::Timeout(m) => f.write_str(m),
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A minimal writer for the cpio "newc" format the kernel's initramfs unpacker reads.
#[derive(Default)]
struct Newc {
    buf: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn push(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("initramfs file larger than 4 GiB"),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            u32::try_from(name.len() + 1).expect("file name length"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for v in fields {
            self.buf.extend_from_slice(format!("{v:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    fn finish(mut self) -> Vec<u8> {
        self.push("TRAILER!!!", 0, &[]);
        self.buf.resize(self.buf.len().next_multiple_of(512), 0);
        self.buf
    }
}

/// Remove `\r` and the terminal escape sequences SeaBIOS prints (`ESC c`, `ESC [ ... X`).
fn strip_terminal_codes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\x1b' => {
                if chars.next() == Some('[') {
                    // Parameters and intermediates, then one final byte in '@'..='~'.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// What a guest run left behind: the serial console and QEMU's own exit status and stderr.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// Serial console output, with `\r` and terminal escape sequences removed.
    pub console: String,
    /// QEMU's stderr (connection errors to a backend show up here).
    pub qemu_stderr: String,
    /// `None` if QEMU was killed on timeout.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
}

impl GuestOutput {
    fn read(
        console: &Path,
        stderr: &Path,
        status: Option<ExitStatus>,
        elapsed: Duration,
    ) -> GuestOutput {
        let read = |p: &Path| {
            fs::read(p)
                .map(|b| strip_terminal_codes(&String::from_utf8_lossy(&b)))
                .unwrap_or_else(|e| format!("<cannot read {}: {e}>", p.display()))
        };
        GuestOutput {
            console: read(console),
            qemu_stderr: read(stderr),
            status,
            elapsed,
        }
    }

    /// All `RESULT <key> <value>` lines, in order (the value may be empty or contain spaces).
    pub fn results(&self) -> Vec<(&str, &str)> {
        self.console
            .lines()
            .filter_map(|l| l.trim().strip_prefix("RESULT "))
            .map(|rest| {
                let rest = rest.trim();
                match rest.split_once(char::is_whitespace) {
                    Some((k, v)) => (k, v.trim()),
                    None => (rest, ""),
                }
            })
            .collect()
    }

    /// The value of the last `RESULT <key> ...` line.
    pub fn result(&self, key: &str) -> Option<&str> {
        self.results()
            .into_iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The values of every `RESULT <key> ...` line, in order.
    pub fn result_all(&self, key: &str) -> Vec<&str> {
        self.results()
            .into_iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .collect()
    }

    /// Like [`GuestOutput::result`] but panics with the console tail if the key is missing.
    pub fn expect_result(&self, key: &str) -> &str {
        self.result(key)
            .unwrap_or_else(|| panic!("guest printed no 'RESULT {key}' line; {}", self.describe()))
    }

    /// How many times the guest's init came up (more than one after reboots).
    pub fn boots(&self) -> usize {
        self.console
            .lines()
            .filter(|l| l.contains("GUEST-INIT: ready"))
            .count()
    }

    /// Exit codes of `/test.sh`, one per boot that ran it to the end.
    pub fn test_exit_codes(&self) -> Vec<i32> {
        self.console
            .lines()
            .filter_map(|l| l.trim().strip_prefix("GUEST-TEST: exit "))
            .filter_map(|c| c.trim().parse().ok())
            .collect()
    }

    /// Ok if QEMU exited 0 and every completed run of `/test.sh` exited 0 (at least one
    /// must have completed); else what went wrong, with the console tail.
    pub fn ok(&self) -> Result<(), String> {
        let qemu_ok = self.status.is_some_and(|s| s.success());
        let codes = self.test_exit_codes();
        if !qemu_ok || codes.is_empty() || codes.iter().any(|&c| c != 0) {
            return Err(format!(
                "guest run failed (test.sh exit codes {codes:?}); {}",
                self.describe()
            ));
        }
        Ok(())
    }

    /// Panic with the console tail unless [`GuestOutput::ok`].
    pub fn assert_ok(&self) {
        if let Err(e) = self.ok() {
            panic!("{e}");
        }
    }

    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// A summary for failure messages: QEMU status, stderr and the console tail.
    pub fn describe(&self) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "killed on timeout".to_string(),
        };
        format!(
            "QEMU {status} after {:.1?}\n--- QEMU stderr ---\n{}\n--- guest console (last 60 lines) ---\n{}\n---",
            self.elapsed,
            self.qemu_stderr.trim_end(),
            self.tail(60)
        )
    }
}

/// The offload features a guest's NIC negotiated, as the script helpers below report them
/// (`RESULT features ...`): one character per bit of CSUM, GUEST_CSUM, GUEST_TSO4 and
/// HOST_TSO4, from /sys/class/net/eth0/device/features.
const REPORT_OFFLOADS: &str =
    "echo RESULT features $(cut -c1,2,8,12 /sys/class/net/eth0/device/features)\n";

/// A guest script that brings eth0 up at `ip`/24, takes one TCP stream on `port` with
/// `tcpblast` (tests/guest-tools, in the initramfs) and reports `RESULT bytes N` and
/// `RESULT seconds S`, timed from its first byte to its last.
pub fn tcp_receiver_script(ip: &str, port: u16) -> String {
    format!(
        "ip link set eth0 up\nip addr add {ip}/24 dev eth0\n{REPORT_OFFLOADS}\
         set -- $(tcpblast recv {port})\necho RESULT bytes $1\necho RESULT seconds $2\n"
    )
}

/// A guest script that brings eth0 up at `ip`/24 and sends `mib` MiB to `peer`:`port` with
/// `tcpblast` (which retries the connection until the receiver listens), then reports
/// `RESULT sent 0` on success.
pub fn tcp_sender_script(ip: &str, peer: &str, port: u16, mib: u32) -> String {
    format!(
        "ip link set eth0 up\nip addr add {ip}/24 dev eth0\n{REPORT_OFFLOADS}\
         tcpblast send {peer} {port} {mib} >/dev/null; echo RESULT sent $?\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut a = Newc::default();
        a.push("d", 0o040_755, &[]);
        a.push("d/f", 0o100_644, b"hello");
        let buf = a.finish();
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(buf.len() % 512, 0);
        // Second header starts 4-aligned right after "d\0" padded.
        let second = (110 + 2usize).next_multiple_of(4);
        assert_eq!(&buf[second..second + 6], b"070701");
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("hello"));
    }

    #[test]
    fn terminal_codes_are_stripped() {
        assert_eq!(
            strip_terminal_codes("\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\nGUEST-INIT: ready\r\n"),
            "SeaBIOS\nGUEST-INIT: ready\n"
        );
    }

    #[test]
    fn results_are_parsed() {
        let out = GuestOutput {
            console: "noise\nRESULT a 1\n  RESULT b two words \nRESULT a 3\nRESULT empty\nGUEST-TEST: exit 0\n"
                .to_string(),
            qemu_stderr: String::new(),
            status: None,
            elapsed: Duration::ZERO,
        };
        assert_eq!(out.result("a"), Some("3"));
        assert_eq!(out.result_all("a"), vec!["1", "3"]);
        assert_eq!(out.result("b"), Some("two words"));
        assert_eq!(out.result("empty"), Some(""));
        assert_eq!(out.result("missing"), None);
        assert_eq!(out.test_exit_codes(), vec![0]);
    }
}
