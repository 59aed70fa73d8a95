//! Claiming a listening unix socket path safely.
//!
//! A live daemon holds an exclusive `flock` on `SOCKET.lock` for as long as it runs, so a
//! second daemon pointed at the same path is refused without disturbing the first (a probe
//! connection would look like a frontend to it). A lock that can be taken means whoever
//! made the socket is gone; if nothing answers a connect either, the socket is stale and is
//! replaced.
//!
//! The socket is created with the configured mode, owner and group before it listens, so
//! no connection is possible while it has the umask's permissions; the lock file is opened
//! without following symlinks and must be a regular file.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use tracing::info;
use vhost::vhost_user::Listener;

use crate::access::SocketPerms;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket {0} is in use by a live daemon")]
    InUse(PathBuf),
    #[error("{0} exists and is not a unix socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("lock file {0} is not a regular file (a symlink?); refusing to use it")]
    BadLock(PathBuf),
    #[error("cannot inspect {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot give socket {path} its owner, group and mode: {source}")]
    Perms { path: PathBuf, source: io::Error },
}

/// A listening socket that this process owns. Dropping it removes the socket and its lock
/// file.
pub struct ClaimedSocket {
    pub listener: Listener,
    path: PathBuf,
    lock_path: PathBuf,
    // Held for the flock; closing the file releases it.
    _lock: File,
}

impl ClaimedSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files to remove at exit, for a shutdown path that ends the process without
    /// running destructors.
    pub fn files(&self) -> SocketFiles {
        SocketFiles {
            socket: self.path.clone(),
            lock: self.lock_path.clone(),
        }
    }
}

impl Drop for ClaimedSocket {
    fn drop(&mut self) {
        self.files().remove();
    }
}

/// The socket and lock file paths of a [`ClaimedSocket`].
#[derive(Clone, Debug)]
pub struct SocketFiles {
    pub socket: PathBuf,
    pub lock: PathBuf,
}

impl SocketFiles {
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.lock);
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Bind `path` with `perms`, replacing a stale socket and refusing one a live daemon
/// holds.
pub fn claim(path: &Path, perms: &SocketPerms) -> Result<ClaimedSocket, SocketError> {
    let lock_path = lock_path(path);
    // O_NOFOLLOW: whoever can write the directory must not point our lock (created or
    // truncated as root) at another file.
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&lock_path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => SocketError::BadLock(lock_path.clone()),
            _ => SocketError::Lock {
                path: lock_path.clone(),
                source,
            },
        })?;
    match lock.metadata() {
        Ok(m) if m.file_type().is_file() => {}
        Ok(_) => return Err(SocketError::BadLock(lock_path)),
        Err(source) => {
            return Err(SocketError::Lock {
                path: lock_path,
                source,
            })
        }
    }
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        return Err(SocketError::Lock {
            path: lock_path,
            source: err,
        });
    }

    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(SocketError::NotASocket(path.to_path_buf()));
            }
            // Another kind of server (not one of ours) may be listening without the lock.
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
            info!(socket = %path.display(), "replaced stale socket");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    }

    let listener = listen(path, perms)?;
    Ok(ClaimedSocket {
        listener: Listener::from(listener),
        path: path.to_path_buf(),
        lock_path,
        _lock: lock,
    })
}

/// Create a listening socket at `path` whose file has exactly `perms`, before it accepts
/// any connection: a connect to a bound socket that does not listen yet is refused.
fn listen(path: &Path, perms: &SocketPerms) -> Result<UnixListener, SocketError> {
    let bind_err = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let addr = sockaddr(path.as_os_str()).map_err(bind_err)?;
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a socket we just created and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // The file bind creates takes the socket inode's mode less the umask: never more than
    // asked for, even for a moment.
    // SAFETY: fchmod on a descriptor we own; no memory is involved.
    if unsafe { libc::fchmod(fd.as_raw_fd(), perms.mode) } != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: `addr` is a valid sockaddr_un of the length given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    let perms_err = |source| SocketError::Perms {
        path: path.to_path_buf(),
        source,
    };
    if perms.owner.is_some() || perms.group.is_some() {
        std::os::unix::fs::lchown(path, perms.owner, perms.group).map_err(perms_err)?;
    }
    // The umask may have taken bits the config asks for. chmod follows symlinks, so check
    // that the path is still the socket bind made.
    let meta = std::fs::symlink_metadata(path).map_err(perms_err)?;
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    std::fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(perms.mode),
    )
    .map_err(perms_err)?;
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        let err = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(bind_err(err));
    }
    Ok(UnixListener::from(fd))
}

fn sockaddr(path: &OsStr) -> io::Result<libc::sockaddr_un> {
    // SAFETY: an all-zero sockaddr_un is valid (an empty path).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    // A leading NUL would make an abstract socket, which any process in the network
    // namespace can reach whatever its permissions.
    if bytes.is_empty() || bytes.contains(&0) || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a socket path must be 1 to 107 bytes, without NUL",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(addr)
}

/// A connection from this process to itself through a listener nobody else can reach,
/// for a library that only accepts on a [`Listener`]: the socket is made in a fresh
/// 0700 directory, connected to once, and unlinked before the listener is handed over,
/// so the connection it accepts can only be ours.
pub fn private_connection() -> io::Result<(Listener, UnixStream)> {
    let mut base = std::env::temp_dir();
    // Room for "/vswitch-XXXXXX/s" within sun_path.
    if base.as_os_str().len() > 80 {
        base = PathBuf::from("/tmp");
    }
    let mut template = base.join("vhost-XXXXXX").into_os_string().into_vec();
    template.push(0);
    // SAFETY: `template` is NUL-terminated and writable; mkdtemp rewrites the X's in place
    // and creates the directory 0700.
    let dir = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    template.pop();
    let dir = PathBuf::from(std::ffi::OsString::from_vec(template));
    let path = dir.join("s");
    let result = listen(&path, &SocketPerms::default())
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|l| Ok((l, UnixStream::connect(&path)?)));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (listener, stream) = result?;
    Ok((Listener::from(listener), stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        // A bound-then-dropped listener leaves a socket file nobody answers.
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let claimed = claim(&path, &SocketPerms::default()).expect("stale socket must be replaced");
        assert!(UnixStream::connect(claimed.path()).is_ok());
    }

    #[test]
    fn live_socket_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let _first = claim(&path, &SocketPerms::default()).expect("first claim");
        match claim(&path, &SocketPerms::default()) {
            Err(SocketError::InUse(p)) => assert_eq!(p, path),
            other => panic!("expected InUse, got {:?}", other.err()),
        }
    }

    #[test]
    fn foreign_listener_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let _other = UnixListener::bind(&path).expect("bind");
        assert!(matches!(
            claim(&path, &SocketPerms::default()),
            Err(SocketError::InUse(_))
        ));
    }

    #[test]
    fn regular_file_is_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"data").expect("write");
        assert!(matches!(
            claim(&path, &SocketPerms::default()),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).expect("read"), b"data");
    }

    #[test]
    fn socket_gets_the_mode_asked_for() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        for mode in [0o600, 0o640, 0o666] {
            let path = dir.path().join(format!("{mode:o}.sock"));
            let perms = SocketPerms {
                mode,
                ..SocketPerms::default()
            };
            let _c = claim(&path, &perms).expect("claim");
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            assert_eq!(meta.permissions().mode() & 0o7777, mode);
            let lock = std::fs::symlink_metadata(lock_path(&path)).expect("stat lock");
            assert_eq!(lock.permissions().mode() & 0o077, 0, "lock file is private");
        }
    }

    #[test]
    fn symlinked_lock_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        std::os::unix::fs::symlink(&victim, lock_path(&path)).expect("symlink");
        assert!(matches!(
            claim(&path, &SocketPerms::default()),
            Err(SocketError::BadLock(_))
        ));
        assert_eq!(std::fs::read(&victim).expect("read"), b"keep");
        assert!(!path.exists());
    }

    #[test]
    fn private_connection_leaves_nothing_to_connect_to() {
        let before: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .expect("temp dir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| n.to_string_lossy().starts_with("vhost-"))
            .collect();
        let (listener, mut ours) = private_connection().expect("private connection");
        let mut theirs = listener.accept().expect("accept").expect("a connection");
        std::io::Write::write_all(&mut ours, b"x").expect("write");
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut theirs, &mut b).expect("read");
        assert_eq!(&b, b"x");
        let after: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .expect("temp dir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| n.to_string_lossy().starts_with("vhost-"))
            .filter(|n| !before.contains(n))
            .collect();
        assert!(after.is_empty(), "left behind: {after:?}");
    }

    #[test]
    fn drop_removes_socket_and_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        drop(claim(&path, &SocketPerms::default()).expect("claim"));
        assert!(!path.exists());
        assert!(!lock_path(&path).exists());
    }
}
