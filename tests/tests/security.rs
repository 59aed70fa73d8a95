//! The daemons against other local users (docs/security.md): nothing reachable through an
//! abstract socket, sockets created with the configured mode whatever the umask, and
//! control sockets that serve only the users they allow and cannot be held up by one
//! slow client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e::vswitch::Switch;
use e2e::{bin, Daemon};

/// A uid and a gid no account on the test machine has.
const STRANGER: u32 = 4242;
/// What `control_users` allows in these tests.
const FRIEND: u32 = 1234;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn lock_of(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    p.into()
}

/// The inodes of the unix sockets process `pid` holds.
fn socket_inodes(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The names of the abstract unix sockets among `inodes` (`/proc/net/unix` shows them
/// with a leading `@`).
fn abstract_names(inodes: &[u64]) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode: u64 = f.get(6)?.parse().ok()?;
            let path = f.get(7)?;
            (inodes.contains(&inode) && path.starts_with('@')).then(|| path.to_string())
        })
        .collect()
}

fn connect_abstract(name: &str) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    UnixStream::connect_addr(&addr)
}

/// `vswitch ctl` run as `uid`/`gid`.
fn ctl_as(program: &str, socket: &Path, uid: u32, args: &[&str]) -> Output {
    Command::new(bin(program))
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap_or_else(|e| panic!("run {program} ctl as uid {uid}: {e}"))
}

/// Let other users reach the sockets in `dir` (a temp dir is 0700), so that the socket
/// files' own modes and the peer check are what decide.
fn open_dir(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
}

fn raw_image(dir: &Path) -> PathBuf {
    let image = dir.join("disk.raw");
    let f = std::fs::File::create(&image).expect("create image");
    f.set_len(1 << 20).expect("size image");
    image
}

/// Before: each port's backend listened on the abstract socket `vswitch-PID-INDEX`, so any
/// local process could connect to it first and own the port, guest memory included.
#[test]
fn a_port_has_no_second_door() {
    let sw = Switch::start(&[("vm1", "vlan = 10"), ("vm2", "vlan = 10")]);
    // A frontend session makes the switch connect the port's backend.
    let session = UnixStream::connect(sw.socket("vm1")).expect("connect to vm1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sw.log().contains("frontend connected") {
        assert!(Instant::now() < deadline, "no session:\n{}", sw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let names = abstract_names(&socket_inodes(sw.pid()));
    assert!(names.is_empty(), "abstract sockets: {names:?}");
    for index in 0..2 {
        let name = format!("vswitch-{}-{index}", sw.pid());
        assert!(
            connect_abstract(&name).is_err(),
            "@{name} takes connections"
        );
    }
    drop(session);
    sw.stop();
}

/// Before: sockets took the umask's permissions, so under umask 0 any local user could
/// connect to a port (and get a guest's memory) or to the control socket.
#[test]
fn sockets_are_private_whatever_the_umask() {
    // SAFETY: umask has no memory effects; nextest runs each test in its own process.
    unsafe { libc::umask(0) };
    let sw = Switch::start(&[("vm1", "vlan = 10")]);
    let ctl = sw.dir().join("ctl.sock");
    for socket in [sw.socket("vm1"), ctl] {
        assert_eq!(mode(&socket), 0o600, "{}", socket.display());
        assert_eq!(mode(&lock_of(&socket)), 0o600, "{}", socket.display());
    }
    sw.stop();

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vdisk.sock");
    let d = Daemon::vdisk(&raw_image(dir.path()), &socket, &[]);
    let ctl = e2e::control_socket(&socket);
    e2e::wait_for_socket(&ctl, Duration::from_secs(10));
    for s in [&socket, &ctl] {
        assert_eq!(mode(s), 0o600, "{}", s.display());
        assert_eq!(mode(&lock_of(s)), 0o600, "{}", s.display());
    }
    assert!(d.terminate().success());
}

#[test]
fn socket_mode_owner_and_group_come_from_the_config() {
    let sw = Switch::with_config(
        &format!("socket_mode = \"0660\"\nsocket_group = \"{STRANGER}\""),
        &[
            ("vm1", "vlan = 10"),
            (
                "vm2",
                &format!("vlan = 10\nsocket_mode = \"0600\"\nsocket_owner = \"{FRIEND}\""),
            ),
        ],
    );
    let m1 = std::fs::metadata(sw.socket("vm1")).expect("stat vm1");
    assert_eq!(
        (mode(&sw.socket("vm1")), m1.uid(), m1.gid()),
        (0o660, 0, STRANGER)
    );
    let m2 = std::fs::metadata(sw.socket("vm2")).expect("stat vm2");
    assert_eq!(
        (mode(&sw.socket("vm2")), m2.uid(), m2.gid()),
        (0o600, FRIEND, STRANGER)
    );
    sw.stop();

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vdisk.sock");
    let group = STRANGER.to_string();
    let d = Daemon::vdisk(
        &raw_image(dir.path()),
        &socket,
        &["--socket-mode", "0640", "--socket-group", &group],
    );
    let m = std::fs::metadata(&socket).expect("stat");
    assert_eq!((mode(&socket), m.gid()), (0o640, STRANGER));
    assert!(d.terminate().success());
}

/// Before: the control socket served whoever could connect, and one client at a time, so a
/// client that never sent a line held it for everyone.
#[test]
fn control_sockets_serve_only_allowed_users() {
    let sw = Switch::with_config(
        &format!("control_users = [\"{FRIEND}\"]"),
        &[("vm1", "vlan = 10")],
    );
    open_dir(sw.dir());
    let ctl = sw.dir().join("ctl.sock");
    // A client that connects and says nothing holds up nobody.
    let _silent = UnixStream::connect(&ctl).expect("connect");
    let started = Instant::now();
    let ok = ctl_as("vswitch", &ctl, FRIEND, &["stats"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let refused = ctl_as("vswitch", &ctl, STRANGER, &["stats"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("not allowed"),
        "{err}"
    );
    assert!(sw.log().contains("refused a client"), "{}", sw.log());
    sw.stop();

    // Without control_users only root and the daemon's user get in.
    let sw = Switch::start(&[("vm1", "vlan = 10")]);
    open_dir(sw.dir());
    let refused = ctl_as("vswitch", &sw.dir().join("ctl.sock"), FRIEND, &["stats"]);
    assert!(!refused.status.success());
    sw.stop();

    let dir = tempfile::tempdir().expect("tempdir");
    open_dir(dir.path());
    let socket = dir.path().join("vdisk.sock");
    let friend = FRIEND.to_string();
    let d = Daemon::vdisk(
        &raw_image(dir.path()),
        &socket,
        &["--control-user", &friend],
    );
    let ctl = e2e::control_socket(&socket);
    e2e::wait_for_socket(&ctl, Duration::from_secs(10));
    let ok = ctl_as("vdisk", &ctl, FRIEND, &["info"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = ctl_as("vdisk", &ctl, STRANGER, &["info"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("not allowed"),
        "{err}"
    );
    // An over-long request is refused, not buffered.
    let mut s = UnixStream::connect(&ctl).expect("connect");
    let _ = s.write_all(&vec![b'x'; 1 << 20]);
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).expect("reply");
    assert!(reply.contains("longer than"), "{reply}");
    assert!(d.terminate().success());
}
