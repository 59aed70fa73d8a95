//! Claiming a listening unix socket path safely.
//!
//! A live daemon holds an exclusive `flock` on `SOCKET.lock` for as long as it runs, so a
//! second daemon pointed at the same path is refused without disturbing the first (a probe
//! connection would look like a frontend to it). A lock that can be taken means whoever
//! made the socket is gone; if nothing answers a connect either, the socket is stale and is
//! replaced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use tracing::info;
use vhost::vhost_user::Listener;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket {0} is in use by a live daemon")]
    InUse(PathBuf),
    #[error("{0} exists and is not a unix socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot inspect {path}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
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

/// Bind `path`, replacing a stale socket and refusing one a live daemon holds.
pub fn claim(path: &Path) -> Result<ClaimedSocket, SocketError> {
    let lock_path = lock_path(path);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| SocketError::Lock {
            path: lock_path.clone(),
            source,
        })?;
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

    let listener = Listener::new(path, false).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ClaimedSocket {
        listener,
        path: path.to_path_buf(),
        lock_path,
        _lock: lock,
    })
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
        let claimed = claim(&path).expect("stale socket must be replaced");
        assert!(UnixStream::connect(claimed.path()).is_ok());
    }

    #[test]
    fn live_socket_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let _first = claim(&path).expect("first claim");
        match claim(&path) {
            Err(SocketError::InUse(p)) => assert_eq!(p, path),
            other => panic!("expected InUse, got {:?}", other.err()),
        }
    }

    #[test]
    fn foreign_listener_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let _other = UnixListener::bind(&path).expect("bind");
        assert!(matches!(claim(&path), Err(SocketError::InUse(_))));
    }

    #[test]
    fn regular_file_is_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"data").expect("write");
        assert!(matches!(claim(&path), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).expect("read"), b"data");
    }

    #[test]
    fn drop_removes_socket_and_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        drop(claim(&path).expect("claim"));
        assert!(!path.exists());
        assert!(!lock_path(&path).exists());
    }
}
