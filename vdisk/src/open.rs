//! Opening images and the files they name.
//!
//! An image is opened once ([`open_image`]); its format is probed, its qcow2 metadata read
//! and its data moved through that one open file description (dups of it), so nothing can
//! be swapped in between. A backing file must be a regular file inside one of the
//! directories allowed for backing files, checked on the descriptor that is then used
//! ([`open_confined`]).
//!
//! Every file is locked the way QEMU's file-posix driver locks it ([`lock`]), so that
//! QEMU, qemu-img, qemu-storage-daemon and other vdisks see our use and we see theirs.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error(
        "{path} resolves to {resolved}, outside the directories backing files may live in \
         ({allowed}); if it is meant to be used, allow its directory with --backing-dir \
         (serve.backing_dirs in the config file)"
    )]
    Outside {
        path: PathBuf,
        resolved: PathBuf,
        allowed: String,
    },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} was replaced while it was being opened")]
    Replaced { path: PathBuf },
    #[error("backing directory {dir}: {what}")]
    BadDir { dir: PathBuf, what: String },
    #[error("image {path} is {kind}, not a regular file or a block device")]
    NotAnImage { path: PathBuf, kind: &'static str },
    #[error(
        "image {path} is locked by another process (QEMU, qemu-img or another vdisk?), which \
         {conflict}"
    )]
    Locked { path: PathBuf, conflict: String },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> OpenError + 'a {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The directories backing files may live in, canonical: `image`'s own, and `extra`.
pub fn allowed_dirs(image: &Path, extra: &[PathBuf]) -> Result<Vec<PathBuf>, OpenError> {
    let own = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut dirs = Vec::with_capacity(1 + extra.len());
    for dir in std::iter::once(own).chain(extra.iter().map(PathBuf::as_path)) {
        let canonical = std::fs::canonicalize(dir).map_err(|e| OpenError::BadDir {
            dir: dir.to_path_buf(),
            what: e.to_string(),
        })?;
        if !canonical.is_dir() {
            return Err(OpenError::BadDir {
                dir: dir.to_path_buf(),
                what: "not a directory".into(),
            });
        }
        dirs.push(canonical);
    }
    Ok(dirs)
}

fn fstat(fd: &impl AsRawFd, path: &Path) -> Result<libc::stat, OpenError> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `struct stat` into the buffer, which we own, and only
    // reads the descriptor.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io_err(path, "fstat")(io::Error::last_os_error()));
    }
    // SAFETY: fstat succeeded, so it initialised the buffer.
    Ok(unsafe { st.assume_init() })
}

fn kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => "a FIFO",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFSOCK => "a socket",
        _ => "not a regular file",
    }
}

/// Open `path` (a backing file, already resolved against the naming image's directory)
/// read-only, if it is a regular file inside one of `allowed` (canonical directories).
/// Returns the file and its canonical path.
///
/// The path is canonicalized and checked, then opened with O_PATH (which does not open
/// the object itself: a FIFO cannot block us, a device driver's open never runs), and the
/// descriptor is checked: a regular file, still at the canonical path (its /proc/self/fd
/// link). Only then is it opened for reading, through that descriptor, so the file read is
/// the file checked even if the directories change meanwhile.
pub fn open_confined(path: &Path, allowed: &[PathBuf]) -> Result<(File, PathBuf), OpenError> {
    let canonical = std::fs::canonicalize(path).map_err(io_err(path, "resolve"))?;
    if !allowed.iter().any(|d| canonical.starts_with(d)) {
        let allowed = allowed
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(OpenError::Outside {
            path: path.to_path_buf(),
            resolved: canonical,
            allowed,
        });
    }
    let c = CString::new(canonical.as_os_str().as_bytes()).map_err(|_| OpenError::Io {
        path: path.to_path_buf(),
        op: "open",
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path holds a NUL byte"),
    })?;
    // SAFETY: a NUL-terminated path that outlives the call; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io_err(path, "open")(io::Error::last_os_error()));
    }
    // SAFETY: open returned a new descriptor that nothing else owns.
    let pinned = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(&pinned, path)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(OpenError::NotRegular {
            path: path.to_path_buf(),
            kind: kind(st.st_mode),
        });
    }
    let link = PathBuf::from(format!("/proc/self/fd/{}", pinned.as_raw_fd()));
    let now_at = std::fs::read_link(&link).map_err(io_err(path, "read /proc/self/fd"))?;
    if now_at != canonical {
        return Err(OpenError::Replaced {
            path: path.to_path_buf(),
        });
    }
    // Reopening the /proc link opens the inode `pinned` holds, not whatever the path
    // names now. O_NONBLOCK only guards against a kernel surprise: a regular file never
    // blocks in open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&link)
        .map_err(io_err(path, "open"))?;
    let opened = fstat(&file, path)?;
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) {
        return Err(OpenError::Replaced {
            path: path.to_path_buf(),
        });
    }
    clear_nonblock(&file, path)?;
    Ok((file, canonical))
}

/// Open an image (the file `--image` names, or one a `vdisk image` command works on):
/// a regular file or a block device, read-only or read-write. O_NONBLOCK keeps a FIFO
/// given by mistake from blocking the open; it goes once the type is known.
pub fn open_image(path: &Path, writable: bool) -> Result<File, OpenError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err(path, "open"))?;
    let st = fstat(&file, path)?;
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt != libc::S_IFREG && fmt != libc::S_IFBLK {
        return Err(OpenError::NotAnImage {
            path: path.to_path_buf(),
            kind: kind(st.st_mode),
        });
    }
    clear_nonblock(&file, path)?;
    Ok(file)
}

/// A second open file description of the inode `file` holds, for the I/O engines (with
/// O_DIRECT for `--direct`, while the metadata keeps going through the page cache).
/// Opened through /proc/self/fd, so it cannot be another file than the one checked and
/// locked. It holds no locks: io_uring keeps its registered files until its teardown,
/// which the kernel finishes asynchronously after the process exits, and the locks must
/// not outlive the process.
pub fn reopen(file: &File, path: &Path, writable: bool, direct: bool) -> Result<File, OpenError> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(flags)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(io_err(path, "reopen"))
}

/// How a file is used, in QEMU's permission terms (include/block/block-common.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Written (a writable export, `check --repair`, snapshots, a new image): consistent
    /// read, write and resize held; write and resize not shared. What QEMU holds on the
    /// file of a writable qcow2 or raw disk.
    Write,
    /// Read and relied on (a read-only export, a backing file, `vdisk image info`):
    /// consistent read held; write and resize not shared. What QEMU holds for a read-only
    /// disk and for a backing file (bdrv_default_perms_for_cow).
    Read,
    /// Read, tolerating writers (`info --force-share`, QEMU's `-U`): consistent read held,
    /// everything shared.
    ReadShared,
}

const PERM_CONSISTENT_READ: u32 = 0x1;
const PERM_WRITE: u32 = 0x2;
const PERM_WRITE_UNCHANGED: u32 = 0x4;
const PERM_RESIZE: u32 = 0x8;
const PERM_NAMES: [(u32, &str); 4] = [
    (PERM_CONSISTENT_READ, "consistent read"),
    (PERM_WRITE, "write"),
    (PERM_WRITE_UNCHANGED, "write unchanged"),
    (PERM_RESIZE, "resize"),
];
/// block/file-posix.c: byte 100 + bit for each permission held, byte 200 + bit for each
/// permission not shared, each a shared (F_RDLCK) OFD lock.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

impl Access {
    fn held(self) -> u32 {
        match self {
            Access::Write => PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
            Access::Read | Access::ReadShared => PERM_CONSISTENT_READ,
        }
    }

    fn unshared(self) -> u32 {
        match self {
            Access::Write | Access::Read => PERM_WRITE | PERM_RESIZE,
            Access::ReadShared => 0,
        }
    }
}

fn flock_at(l_type: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        // OFD locks require 0.
        l_pid: 0,
    }
}

/// Take the lock bytes `access` implies on `file`, then check that no other open file
/// description holds bytes that conflict, as QEMU's raw_apply_lock_bytes and
/// raw_check_lock_bytes do (lock first, then check, so two openers racing both see each
/// other). The locks live as long as the open file description: every dup of `file`
/// keeps them, and they go when the last one closes or the process dies.
pub fn lock(file: &File, path: &Path, access: Access) -> Result<(), OpenError> {
    let fd = file.as_raw_fd();
    let bytes = PERM_NAMES
        .iter()
        .enumerate()
        .filter(|(_, (p, _))| access.held() & p != 0)
        .map(|(i, _)| LOCK_PERM_BASE + i as i64)
        .chain(
            PERM_NAMES
                .iter()
                .enumerate()
                .filter(|(_, (p, _))| access.unshared() & p != 0)
                .map(|(i, _)| LOCK_SHARED_BASE + i as i64),
        );
    for byte in bytes {
        let fl = flock_at(libc::F_RDLCK, byte);
        // SAFETY: fcntl reads the flock struct, which lives across the call.
        if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } != 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                return Err(OpenError::Locked {
                    path: path.to_path_buf(),
                    conflict: format!("holds an exclusive lock on byte {byte}"),
                });
            }
            return Err(io_err(path, "lock (F_OFD_SETLK)")(e));
        }
    }
    for (i, (perm, name)) in PERM_NAMES.iter().enumerate() {
        let checks = [
            (access.held(), LOCK_SHARED_BASE, "does not share"),
            (access.unshared(), LOCK_PERM_BASE, "holds"),
        ];
        for (mask, base, verb) in checks {
            if mask & perm == 0 {
                continue;
            }
            // Would a write lock fit? Only another open file description's read lock
            // stops it: our own never conflict with us.
            let mut fl = flock_at(libc::F_WRLCK, base + i as i64);
            // SAFETY: fcntl reads and writes the flock struct, which lives across the call.
            if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } != 0 {
                return Err(io_err(path, "test lock (F_OFD_GETLK)")(
                    io::Error::last_os_error(),
                ));
            }
            if i32::from(fl.l_type) != libc::F_UNLCK {
                return Err(OpenError::Locked {
                    path: path.to_path_buf(),
                    conflict: format!("{verb} {name} access"),
                });
            }
        }
    }
    Ok(())
}

/// io_uring fails requests on O_NONBLOCK files with EAGAIN instead of waiting, so the flag
/// goes once the file type is known.
fn clear_nonblock(file: &File, path: &Path) -> Result<(), OpenError> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io_err(path, "fcntl F_GETFL")(io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io_err(path, "fcntl F_SETFL")(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn regular_files_inside_open_and_the_rest_is_refused() {
        let d = tmp();
        let vm = d.path().join("vm");
        let golden = d.path().join("golden");
        std::fs::create_dir_all(&vm).expect("mkdir");
        std::fs::create_dir_all(&golden).expect("mkdir");
        std::fs::write(vm.join("base.raw"), b"inside").expect("write");
        std::fs::write(golden.join("gold.raw"), b"gold").expect("write");
        std::fs::write(d.path().join("secret"), b"secret").expect("write");
        std::os::unix::fs::symlink(d.path().join("secret"), vm.join("out.lnk")).expect("ln");
        std::os::unix::fs::symlink("base.raw", vm.join("in.lnk")).expect("ln");
        let allowed = allowed_dirs(&vm.join("top.qcow2"), &[]).expect("dirs");

        let (f, at) = open_confined(&vm.join("base.raw"), &allowed).expect("inside");
        assert_eq!(
            std::fs::read_to_string(format!("/proc/self/fd/{}", f.as_raw_fd())).expect("read"),
            "inside"
        );
        assert!(at.ends_with("vm/base.raw"), "{}", at.display());
        // A symlink that stays inside is the file it points at.
        let (_, at) = open_confined(&vm.join("in.lnk"), &allowed).expect("inside link");
        assert!(at.ends_with("vm/base.raw"), "{}", at.display());

        for (name, needle) in [
            (vm.join("../secret"), "outside"),
            (d.path().join("secret"), "outside"),
            (vm.join("out.lnk"), "outside"),
            (golden.join("gold.raw"), "outside"),
            (vm.join("missing.raw"), "resolve"),
        ] {
            let e = open_confined(&name, &allowed)
                .expect_err("refused")
                .to_string();
            assert!(e.contains(needle), "{}: {e}", name.display());
        }
        let allowed =
            allowed_dirs(&vm.join("top.qcow2"), std::slice::from_ref(&golden)).expect("dirs");
        open_confined(&golden.join("gold.raw"), &allowed).expect("an allowed extra dir");
        open_confined(&vm.join("../golden/gold.raw"), &allowed).expect("relative into it");
    }

    #[test]
    fn fifos_and_devices_are_refused_without_being_opened() {
        let d = tmp();
        let fifo = d.path().join("pipe");
        let c = CString::new(fifo.as_os_str().as_bytes()).expect("path");
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let allowed =
            allowed_dirs(&d.path().join("top.qcow2"), &[PathBuf::from("/dev")]).expect("dirs");
        // Opening a FIFO without a writer for reading would block this test forever.
        let e = open_confined(&fifo, &allowed)
            .expect_err("FIFO")
            .to_string();
        assert!(e.contains("a FIFO"), "{e}");
        let e = open_confined(Path::new("/dev/zero"), &allowed)
            .expect_err("device")
            .to_string();
        assert!(e.contains("a character device"), "{e}");
        let e = open_confined(d.path(), &allowed)
            .expect_err("dir")
            .to_string();
        assert!(e.contains("a directory"), "{e}");
    }

    /// Each open is its own open file description, so one process stands in for two.
    #[test]
    fn locks_conflict_as_qemu_permissions_do() {
        let d = tmp();
        let path = d.path().join("img");
        std::fs::write(&path, [0u8; 512]).expect("write");
        let open = || open_image(&path, true).expect("open");
        let try_lock = |access| {
            let f = open();
            lock(&f, &path, access).map(|()| f)
        };
        use Access::*;
        for (first, second, ok) in [
            (Write, Write, false),
            (Write, Read, false),
            (Read, Write, false),
            (Read, Read, true),
            (Write, ReadShared, true),
            (ReadShared, Write, true),
        ] {
            let held = try_lock(first).expect("first lock");
            let r = try_lock(second);
            assert_eq!(r.is_ok(), ok, "{first:?} then {second:?}: {r:?}");
            if let Err(e) = &r {
                let e = e.to_string();
                assert!(e.contains("img is locked by another process"), "{e}");
            }
            drop((held, r));
            try_lock(second).expect("free once the first closes");
        }
    }

    #[test]
    fn a_missing_backing_dir_is_named() {
        let d = tmp();
        let e = allowed_dirs(&d.path().join("x.qcow2"), &[d.path().join("nope")])
            .expect_err("missing")
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
