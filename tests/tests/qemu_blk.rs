//! End to end with a real guest: QEMU (TCG) boots a Linux guest whose virtio-blk disks are
//! vhost-user-blk-pci devices served by `vdisk serve`. The guest's busybox `dd` does the I/O;
//! the host checks the image file (and the guest checks what the host wrote).
//!
//! Each test boots once (the reboot test three times, in two QEMU runs): 5-10 s a boot under TCG.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::guest::{self, Guest};
use e2e::Daemon;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(150);

/// A region of the disk: a name the guest script uses, a byte offset (sector aligned) and
/// the data that belongs there.
struct Region {
    name: &'static str,
    offset: u64,
    data: Vec<u8>,
}

impl Region {
    fn new(name: &'static str, offset: u64, len: usize, seed: u64) -> Region {
        let mut data = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
        Region { name, offset, data }
    }

    fn sector(&self) -> u64 {
        assert_eq!(self.offset % 512, 0);
        self.offset / 512
    }

    fn sectors(&self) -> usize {
        assert_eq!(self.data.len() % 512, 0);
        self.data.len() / 512
    }
}

/// The regions the tests move between host and guest: a 4 KiB block at the start, a
/// sector-aligned but not 4K-aligned odd size, a 1 MiB run (many segments, several
/// requests) and the last 4 KiB of the disk.
fn regions(seed: u64) -> Vec<Region> {
    vec![
        Region::new("head", 0, 4096, seed),
        Region::new("odd", MIB + 512, 3 * 512, seed + 1),
        Region::new("big", 5 * MIB, MIB as usize, seed + 2),
        Region::new("tail", IMAGE_SIZE - 4096, 4096, seed + 3),
    ]
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::Builder::new()
                .prefix("qemu-blk-")
                .tempdir()
                .expect("create temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sparse raw image of IMAGE_SIZE bytes.
    fn image(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        File::create(&p)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create raw image");
        p
    }
}

fn serve(image: &Path, socket: &Path, extra: &[&str]) -> Daemon {
    Daemon::vdisk(image, socket, extra)
}

/// Stop the daemon as an operator would and check the contract: exit 0, socket removed.
fn stop(daemon: Daemon) {
    let socket = daemon.socket.clone();
    let status = daemon.terminate();
    assert!(status.success(), "vdisk exited with {status} after SIGTERM");
    assert!(
        !socket.exists(),
        "vdisk left its socket {} behind",
        socket.display()
    );
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).expect("open image");
    f.seek(SeekFrom::Start(offset)).expect("seek image");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read image");
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    f.seek(SeekFrom::Start(offset)).expect("seek image");
    f.write_all(data).expect("write image");
    f.sync_all().expect("sync image");
}

/// sha256 in hex, by the host's coreutils (the guest uses busybox's `sha256sum`).
fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("sha256sum stdin")
        .write_all(data)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum printed a hash")
        .to_string()
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Shell helpers every guest script starts with.
const PRELUDE: &str = r#"set -e
# rd DEV SECTOR COUNT: sha256 of COUNT sectors at SECTOR, read with O_DIRECT.
rd() { dd if="$1" bs=512 skip="$2" count="$3" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }
"#;

/// (a) The guest writes known data at several offsets; the host finds it in the image.
#[test]
fn guest_writes_reach_the_image() {
    if !guest::require_guest() {
        return;
    }
    let s = Setup::new();
    let image = s.image("disk.img");
    let socket = s.path("vdisk.sock");
    let daemon = serve(&image, &socket, &[]);

    let regions = regions(1);
    let mut script = String::from(PRELUDE);
    script.push_str(
        "echo RESULT size $(blockdev --getsize64 /dev/vda)\n\
         echo RESULT ro $(blockdev --getro /dev/vda)\n",
    );
    for r in &regions {
        if r.name == "big" {
            // One O_DIRECT pass in 64 KiB requests straight from user memory...
            script.push_str(&format!(
                "dd if=/data/{n}.bin of=/dev/vda bs=65536 seek={o} oflag=seek_bytes,direct conv=notrunc 2>/dev/null\n",
                n = r.name,
                o = r.offset
            ));
        } else {
            // ...and the others through the page cache, made durable by fsync (FLUSH).
            script.push_str(&format!(
                "dd if=/data/{n}.bin of=/dev/vda bs=512 seek={s} conv=notrunc,fsync 2>/dev/null\n",
                n = r.name,
                s = r.sector()
            ));
        }
        // Read back from the device, bypassing the guest's cache.
        script.push_str(&format!(
            "echo RESULT readback-{n} $(rd /dev/vda {s} {c})\n",
            n = r.name,
            s = r.sector(),
            c = r.sectors()
        ));
    }
    script.push_str("sync\necho RESULT done yes\n");
    let mut guest = Guest::new(script).blk(&socket).timeout(TIMEOUT);
    for r in &regions {
        guest = guest.file(&format!("/data/{}.bin", r.name), r.data.clone());
    }
    let out = guest.run();
    out.assert_ok();
    assert_eq!(out.expect_result("size"), IMAGE_SIZE.to_string());
    assert_eq!(out.expect_result("ro"), "0");
    assert_eq!(out.expect_result("done"), "yes");

    // Checked while vdisk still runs: flushed writes must already be in the file.
    for r in &regions {
        let want = sha256_hex(&r.data);
        assert_eq!(
            out.expect_result(&format!("readback-{}", r.name)),
            want,
            "guest read back something else than it wrote in region {}",
            r.name
        );
        let got = read_at(&image, r.offset, r.data.len());
        assert!(
            got == r.data,
            "image region {} (offset {}) does not hold what the guest wrote",
            r.name,
            r.offset
        );
    }
    // Nothing was written outside the regions: spot-check a gap.
    assert!(read_at(&image, 2 * MIB, 4096).iter().all(|&b| b == 0));
    stop(daemon);
}

/// (b) The host writes data into the images before boot; the guest reads it back (sha256 and
/// a hex prefix). A second, read-only disk must be seen read-only and refuse writes.
#[test]
fn guest_reads_what_the_host_wrote() {
    if !guest::require_guest() {
        return;
    }
    let s = Setup::new();
    let image = s.image("disk.img");
    let ro_image = s.image("ro.img");
    let regions = regions(100);
    for r in &regions {
        write_at(&image, r.offset, &r.data);
    }
    let ro_data = Region::new("ro", 3 * MIB, 8192, 200);
    write_at(&ro_image, ro_data.offset, &ro_data.data);

    let socket = s.path("vdisk.sock");
    let ro_socket = s.path("vdisk-ro.sock");
    let daemon = serve(&image, &socket, &[]);
    let ro_daemon = serve(&ro_image, &ro_socket, &["--readonly"]);

    let mut script = String::from(PRELUDE);
    for r in &regions {
        script.push_str(&format!(
            "echo RESULT sha-{n} $(rd /dev/vda {s} {c})\n\
             echo RESULT hex-{n} $(dd if=/dev/vda bs=512 skip={s} count=1 2>/dev/null | head -c 16 | xxd -p)\n",
            n = r.name,
            s = r.sector(),
            c = r.sectors()
        ));
    }
    script.push_str(&format!(
        "echo RESULT sha-ro $(rd /dev/vdb {s} {c})\n\
         echo RESULT vdb-size $(blockdev --getsize64 /dev/vdb)\n\
         echo RESULT vdb-ro $(blockdev --getro /dev/vdb)\n\
         if echo overwrite | dd of=/dev/vdb bs=512 seek={s} conv=sync,notrunc,fsync 2>/dev/null; then\n\
         \x20 echo RESULT vdb-write accepted\n\
         else\n\
         \x20 echo RESULT vdb-write refused\n\
         fi\n",
        s = ro_data.sector(),
        c = ro_data.sectors()
    ));

    let out = Guest::new(script)
        .blk(&socket)
        .blk(&ro_socket)
        .timeout(TIMEOUT)
        .run();
    out.assert_ok();
    for r in &regions {
        assert_eq!(
            out.expect_result(&format!("sha-{}", r.name)),
            sha256_hex(&r.data),
            "guest read wrong data in region {}",
            r.name
        );
        assert_eq!(
            out.expect_result(&format!("hex-{}", r.name)),
            hex(&r.data[..16]),
            "first bytes of region {}",
            r.name
        );
    }
    assert_eq!(out.expect_result("sha-ro"), sha256_hex(&ro_data.data));
    assert_eq!(out.expect_result("vdb-size"), IMAGE_SIZE.to_string());
    assert_eq!(
        out.expect_result("vdb-ro"),
        "1",
        "--readonly disk not read-only"
    );
    assert_eq!(out.expect_result("vdb-write"), "refused");
    assert!(
        read_at(&ro_image, ro_data.offset, ro_data.data.len()) == ro_data.data,
        "the read-only image changed"
    );
    stop(ro_daemon);
    stop(daemon);
}

/// (c) The guest writes, reboots (`reboot -f`: a device reset, the frontend stays
/// connected), reads its data back on the second boot through the same vdisk, then powers off.
/// Then a new QEMU process (a new frontend connection) boots on the same vdisk and finds it all.
#[test]
fn guest_reboot_and_new_frontend_are_served() {
    if !guest::require_guest() {
        return;
    }
    let s = Setup::new();
    let image = s.image("disk.img");
    let socket = s.path("vdisk.sock");
    let daemon = serve(&image, &socket, &[]);

    let data = Region::new("data", 8 * MIB, 64 * 1024, 300);
    const MARKER_SECTOR: u64 = 100;
    let script = format!(
        "{PRELUDE}\
         marker=$(dd if=/dev/vda bs=512 skip={m} count=1 2>/dev/null | tr -d '\\000')\n\
         case \"$marker\" in\n\
         BOOT-ONE*)\n\
         \x20 echo RESULT boot 2\n\
         \x20 echo RESULT data-after-reboot $(rd /dev/vda {s} {c})\n\
         \x20 printf BOOT-TWO | dd of=/dev/vda bs=512 seek={m} conv=sync,notrunc,fsync 2>/dev/null\n\
         \x20 ;;\n\
         *)\n\
         \x20 echo RESULT boot 1\n\
         \x20 dd if=/data.bin of=/dev/vda bs=512 seek={s} conv=notrunc,fsync 2>/dev/null\n\
         \x20 printf BOOT-ONE | dd of=/dev/vda bs=512 seek={m} conv=sync,notrunc,fsync 2>/dev/null\n\
         \x20 echo RESULT rebooting now\n\
         \x20 reboot -f\n\
         \x20 sleep 30\n\
         \x20 ;;\n\
         esac\n",
        m = MARKER_SECTOR,
        s = data.sector(),
        c = data.sectors()
    );
    let out = Guest::new(script)
        .file("/data.bin", data.data.clone())
        .blk(&socket)
        .allow_reboot()
        .timeout(TIMEOUT)
        .run();
    out.assert_ok();
    assert_eq!(out.boots(), 2, "expected exactly two boots");
    assert_eq!(out.result_all("boot"), vec!["1", "2"]);
    assert_eq!(out.expect_result("rebooting"), "now");
    assert_eq!(
        out.expect_result("data-after-reboot"),
        sha256_hex(&data.data)
    );
    assert!(read_at(&image, data.offset, data.data.len()) == data.data);
    assert_eq!(&read_at(&image, MARKER_SECTOR * 512, 8), b"BOOT-TWO");

    // QEMU has exited and disconnected: vdisk must accept the next frontend.
    let script = format!(
        "{PRELUDE}\
         echo RESULT marker $(dd if=/dev/vda bs=512 skip={m} count=1 2>/dev/null | tr -d '\\000')\n\
         echo RESULT data $(rd /dev/vda {s} {c})\n",
        m = MARKER_SECTOR,
        s = data.sector(),
        c = data.sectors()
    );
    let out = Guest::new(script).blk(&socket).timeout(TIMEOUT).run();
    out.assert_ok();
    assert_eq!(out.expect_result("marker"), "BOOT-TWO");
    assert_eq!(out.expect_result("data"), sha256_hex(&data.data));
    stop(daemon);
}

/// `prog args...` must exit 0; the panic shows its output.
fn run_ok(prog: &Path, args: &[&std::ffi::OsStr]) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", prog.display()));
    assert!(
        out.status.success(),
        "{} {args:?}: {}\n{}{}",
        prog.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (d) A qcow2 linked clone of a raw base: the guest reads the base through vdisk where the
/// overlay has nothing, writes partial and whole clusters; afterwards the base is unchanged,
/// `qemu-img check` finds the overlay clean and `qemu-img compare` finds in it the base
/// with the guest's writes.
#[test]
fn guest_writes_through_a_qcow2_overlay() {
    if !guest::require_guest()
        || !e2e::require(
            "qemu-img (package qemu-utils)",
            e2e::have_program("qemu-img"),
        )
    {
        return;
    }
    let s = Setup::new();
    let base = s.path("base.raw");
    let mut base_data = vec![0u8; IMAGE_SIZE as usize];
    rand::rngs::StdRng::seed_from_u64(400).fill(&mut base_data[..]);
    std::fs::write(&base, &base_data).expect("write base");
    let overlay = s.path("overlay.qcow2");
    run_ok(
        &e2e::bin("vdisk"),
        &[
            "image".as_ref(),
            "create".as_ref(),
            overlay.as_os_str(),
            "--backing".as_ref(),
            base.as_os_str(),
        ],
    );
    let socket = s.path("vdisk.sock");
    let daemon = serve(&overlay, &socket, &["--format", "qcow2"]);

    // The same regions as (a): a partial 64 KiB cluster at the start, 3 sectors in the
    // middle of one, 1 MiB of whole clusters, the last 4 KiB.
    let regions = regions(500);
    let mut expected = base_data.clone();
    for r in &regions {
        expected[r.offset as usize..r.offset as usize + r.data.len()].copy_from_slice(&r.data);
    }
    // What the guest must read around the regions: base data merged with its writes.
    let windows = [
        ("untouched", 3 * MIB, 128 * 1024),
        ("around-odd", MIB, 64 * 1024),
    ];
    let mut script = String::from(PRELUDE);
    script.push_str(&format!(
        "echo RESULT size $(blockdev --getsize64 /dev/vda)\n\
         echo RESULT before-untouched $(rd /dev/vda {} {})\n",
        windows[0].1 / 512,
        windows[0].2 / 512
    ));
    for r in &regions {
        if r.name == "big" {
            // O_DIRECT in 64 KiB requests: whole clusters.
            script.push_str(&format!(
                "dd if=/data/{n}.bin of=/dev/vda bs=65536 seek={o} oflag=seek_bytes,direct conv=notrunc 2>/dev/null\n",
                n = r.name,
                o = r.offset
            ));
        } else {
            // Through the page cache, made durable by fsync (FLUSH).
            script.push_str(&format!(
                "dd if=/data/{n}.bin of=/dev/vda bs=512 seek={s} conv=notrunc,fsync 2>/dev/null\n",
                n = r.name,
                s = r.sector()
            ));
        }
        script.push_str(&format!(
            "echo RESULT readback-{n} $(rd /dev/vda {s} {c})\n",
            n = r.name,
            s = r.sector(),
            c = r.sectors()
        ));
    }
    for (name, off, len) in windows {
        script.push_str(&format!(
            "echo RESULT window-{name} $(rd /dev/vda {} {})\n",
            off / 512,
            len / 512
        ));
    }
    script.push_str("sync\necho RESULT done yes\n");
    let mut guest = Guest::new(script).blk(&socket).timeout(TIMEOUT);
    for r in &regions {
        guest = guest.file(&format!("/data/{}.bin", r.name), r.data.clone());
    }
    let out = guest.run();
    out.assert_ok();
    assert_eq!(out.expect_result("size"), IMAGE_SIZE.to_string());
    assert_eq!(out.expect_result("done"), "yes");
    let slice = |off: u64, len: u64| &expected[off as usize..(off + len) as usize];
    assert_eq!(
        out.expect_result("before-untouched"),
        sha256_hex(slice(windows[0].1, windows[0].2)),
        "the guest does not see the base through the empty overlay"
    );
    for r in &regions {
        assert_eq!(
            out.expect_result(&format!("readback-{}", r.name)),
            sha256_hex(&r.data),
            "guest read back something else than it wrote in region {}",
            r.name
        );
    }
    for (name, off, len) in windows {
        assert_eq!(
            out.expect_result(&format!("window-{name}")),
            sha256_hex(slice(off, len)),
            "window {name}: base data and the guest's writes not merged right"
        );
    }
    stop(daemon);

    assert!(
        std::fs::read(&base).expect("read base") == base_data,
        "the base file changed"
    );
    let want = s.path("expected.raw");
    std::fs::write(&want, &expected).expect("write expected.raw");
    for args in [
        vec!["check", "-f", "qcow2"],
        vec!["compare", "-f", "qcow2", "-F", "raw"],
    ] {
        let mut a: Vec<&std::ffi::OsStr> = args.iter().map(|x| x.as_ref()).collect();
        a.push(overlay.as_os_str());
        if args[0] == "compare" {
            a.push(want.as_os_str());
        }
        run_ok(Path::new("qemu-img"), &a);
    }
}

fn counter(stats: &serde_json::Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {key} in {stats}"))
}

/// (e) Dedupe seen from a guest: a guest makes an ext2 filesystem (4 KiB blocks) on a
/// dedupe qcow2 image and writes a 4 MiB file; a second guest, on the same daemon, writes
/// the same bytes again as another file. The logical bytes grow by the file both times,
/// the physical bytes only the first time. Afterwards `qemu-img check` is clean and
/// `qemu-img compare` finds the same disk as vdisk's own raw conversion.
#[test]
fn guest_writing_a_file_twice_stores_it_once() {
    if !guest::require_guest()
        || !e2e::require(
            "qemu-img (package qemu-utils)",
            e2e::have_program("qemu-img"),
        )
    {
        return;
    }
    const FILE: u64 = 4 * MIB;
    let s = Setup::new();
    let image = s.path("dedupe.qcow2");
    run_ok(
        &e2e::bin("vdisk"),
        &[
            "image".as_ref(),
            "create".as_ref(),
            image.as_os_str(),
            "--size".as_ref(),
            "64M".as_ref(),
            "--dedupe".as_ref(),
        ],
    );
    let socket = s.path("vdisk.sock");
    let daemon = serve(&image, &socket, &[]);
    let mut data = vec![0u8; FILE as usize];
    rand::rngs::StdRng::seed_from_u64(600).fill(&mut data[..]);
    let boot = |script: &str| {
        let out = Guest::new(format!("set -e\n{script}echo RESULT done yes\n"))
            .blk(&socket)
            .file("/data/file.bin", data.clone())
            .timeout(TIMEOUT)
            .run();
        out.assert_ok();
        assert_eq!(out.expect_result("done"), "yes", "{}", out.describe());
        out
    };
    let before = e2e::vdisk_stats(&socket);
    boot(
        "mke2fs -F -b 4096 /dev/vda >/dev/null\n\
         mount -t ext2 /dev/vda /mnt\n\
         cp /data/file.bin /mnt/first\n\
         umount /mnt\n",
    );
    let first = e2e::vdisk_stats(&socket);
    let out = boot(
        "mount -t ext2 /dev/vda /mnt\n\
         cp /data/file.bin /mnt/second\n\
         echo RESULT same $(cmp /mnt/first /mnt/second && echo yes)\n\
         umount /mnt\n",
    );
    assert_eq!(out.expect_result("same"), "yes");
    let second = e2e::vdisk_stats(&socket);
    let grew = |a: &serde_json::Value, b: &serde_json::Value, key: &str| {
        counter(b, &format!("dedupe_{key}")) as i64 - counter(a, &format!("dedupe_{key}")) as i64
    };
    eprintln!("after the first guest: {first}\nafter the second: {second}");
    for (what, a, b) in [("first", &before, &first), ("second", &first, &second)] {
        let logical = grew(a, b, "logical_bytes");
        assert!(
            logical >= FILE as i64,
            "the {what} copy added {logical} logical bytes, less than the file"
        );
    }
    let physical_first = grew(&before, &first, "physical_bytes");
    let physical_second = grew(&first, &second, "physical_bytes");
    assert!(
        physical_first >= FILE as i64,
        "the first copy stored only {physical_first} bytes"
    );
    // The second copy may store filesystem metadata (inode, bitmaps, directory), not the
    // file's 1024 blocks again.
    assert!(
        physical_second < (FILE / 8) as i64,
        "the second copy stored {physical_second} more bytes: not deduplicated"
    );
    assert!(counter(&second, "dedupe_hits") >= FILE / 4096 - 8);
    stop(daemon);

    let raw = s.path("dedupe.raw");
    run_ok(
        &e2e::bin("vdisk"),
        &[
            "image".as_ref(),
            "convert".as_ref(),
            image.as_os_str(),
            raw.as_os_str(),
            "--to".as_ref(),
            "raw".as_ref(),
        ],
    );
    run_ok(
        Path::new("qemu-img"),
        &[
            "check".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            image.as_os_str(),
        ],
    );
    run_ok(
        Path::new("qemu-img"),
        &[
            "compare".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    );
}
