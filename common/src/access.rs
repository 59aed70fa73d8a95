//! Who may reach a daemon's sockets: the file mode, owner and group a listening socket is
//! created with (whatever the umask), and the peer-credential check of control sockets.
//!
//! Other local users are untrusted. A vhost-user socket hands its peer a guest's memory
//! and rings, so it is created 0600 unless the config says otherwise; a control socket
//! can change QoS or take snapshots, so every connection's `SO_PEERCRED` is checked too.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The mode a socket gets when the config names none: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("{0:?} is not an octal file mode such as 0600 or 0660 (at most 0777)")]
    Mode(String),
    #[error("no user {0:?} on this host")]
    NoUser(String),
    #[error("no group {0:?} on this host")]
    NoGroup(String),
}

/// The permissions of a listening socket's file: connecting needs write access to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPerms {
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

impl Default for SocketPerms {
    fn default() -> Self {
        SocketPerms {
            mode: DEFAULT_SOCKET_MODE,
            owner: None,
            group: None,
        }
    }
}

impl SocketPerms {
    /// These permissions with what the config's `mode`, `owner` and `group` strings set
    /// (each optional) in their place.
    pub fn parse(
        self,
        mode: Option<&str>,
        owner: Option<&str>,
        group: Option<&str>,
    ) -> Result<SocketPerms, AccessError> {
        Ok(SocketPerms {
            mode: mode.map_or(Ok(self.mode), parse_mode)?,
            owner: owner.map(user_id).transpose()?.or(self.owner),
            group: group.map(group_id).transpose()?.or(self.group),
        })
    }
}

/// `0600`, `600` or `0o600`: permission bits only (no setuid, setgid or sticky bit, which
/// mean nothing on a socket).
pub fn parse_mode(s: &str) -> Result<u32, AccessError> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(AccessError::Mode(s.to_string())),
    }
}

/// A user name or a numeric uid.
pub fn user_id(name: &str) -> Result<u32, AccessError> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok(uid);
    }
    lookup(name, libc::_SC_GETPW_R_SIZE_MAX, |cname, buf| {
        // SAFETY: an all-zero passwd is a valid out-parameter for getpwnam_r.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the NUL-terminated name, the out
        // struct, and `buf` with its true length, which getpwnam_r fills the strings into.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        (rc, (!found.is_null()).then_some(pw.pw_uid))
    })
    .ok_or_else(|| AccessError::NoUser(name.to_string()))
}

/// A group name or a numeric gid.
pub fn group_id(name: &str) -> Result<u32, AccessError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    lookup(name, libc::_SC_GETGR_R_SIZE_MAX, |cname, buf| {
        // SAFETY: an all-zero group is a valid out-parameter for getgrnam_r.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as for getpwnam_r above.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut gr,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        (rc, (!found.is_null()).then_some(gr.gr_gid))
    })
    .ok_or_else(|| AccessError::NoGroup(name.to_string()))
}

/// Run a `get*nam_r` call, growing its buffer while it says ERANGE.
fn lookup(
    name: &str,
    size_hint: libc::c_int,
    mut call: impl FnMut(&std::ffi::CStr, &mut [u8]) -> (libc::c_int, Option<u32>),
) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: sysconf has no memory effects.
    let hint = unsafe { libc::sysconf(size_hint) };
    let mut buf = vec![0u8; usize::try_from(hint).unwrap_or(1024).clamp(1024, 1 << 16)];
    loop {
        match call(&cname, &mut buf) {
            (libc::ERANGE, _) if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            (0, id) => return id,
            _ => return None,
        }
    }
}

/// A connected peer's credentials, from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
}

/// The credentials the kernel recorded for the process at the other end of `stream`.
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let fd = stream.as_raw_fd();
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: `groups` is valid for writes of `len` bytes; the kernel writes at most that.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / 4);
            break;
        }
        let err = io::Error::last_os_error();
        // ERANGE: `len` now says how much room the list needs.
        if err.raw_os_error() == Some(libc::ERANGE) && (len as usize) / 4 > groups.len() {
            groups.resize(len as usize / 4, 0);
            continue;
        }
        return Err(err);
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups,
    })
}

/// Who may use a control socket: root and the daemon's own user always, and the users and
/// groups the config lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    pub users: Vec<u32>,
    pub groups: Vec<u32>,
}

impl PeerPolicy {
    /// From the config's user and group names (or numbers).
    pub fn parse<S: AsRef<str>>(users: &[S], groups: &[S]) -> Result<PeerPolicy, AccessError> {
        Ok(PeerPolicy {
            users: users
                .iter()
                .map(|u| user_id(u.as_ref()))
                .collect::<Result<_, _>>()?,
            groups: groups
                .iter()
                .map(|g| group_id(g.as_ref()))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn allows(&self, peer: &PeerCred) -> bool {
        // SAFETY: geteuid has no memory effects and cannot fail.
        let me = unsafe { libc::geteuid() };
        peer.uid == 0
            || peer.uid == me
            || self.users.contains(&peer.uid)
            || self.groups.contains(&peer.gid)
            || peer.groups.iter().any(|g| self.groups.contains(g))
    }

    /// The socket file's permissions that let exactly the listed peers connect where
    /// file modes can say so, and let the peer check decide where they cannot: 0600 for
    /// the daemon's user alone, 0660 with the group for one group, else 0666.
    pub fn socket_perms(&self) -> SocketPerms {
        match (self.users.as_slice(), self.groups.as_slice()) {
            ([], []) => SocketPerms::default(),
            ([], [group]) => SocketPerms {
                mode: 0o660,
                owner: None,
                group: Some(*group),
            },
            _ => SocketPerms {
                mode: 0o666,
                owner: None,
                group: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0o777"), Ok(0o777));
        for bad in ["", "0o", "888", "4755", "rw", "-1"] {
            assert_eq!(parse_mode(bad), Err(AccessError::Mode(bad.into())), "{bad}");
        }
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(user_id("root"), Ok(0));
        assert_eq!(user_id("1234"), Ok(1234));
        assert_eq!(group_id("root"), Ok(0));
        assert!(matches!(
            user_id("no-such-user-here"),
            Err(AccessError::NoUser(_))
        ));
        assert!(matches!(
            group_id("no-such-group-here"),
            Err(AccessError::NoGroup(_))
        ));
    }

    #[test]
    fn policy() {
        let p = PeerPolicy {
            users: vec![1000],
            groups: vec![50],
        };
        let peer = |uid, gid, groups: &[u32]| PeerCred {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        };
        assert!(p.allows(&peer(0, 0, &[])));
        assert!(p.allows(&peer(1000, 1000, &[])));
        assert!(p.allows(&peer(2000, 50, &[])));
        assert!(p.allows(&peer(2000, 2000, &[7, 50])));
        assert!(!p.allows(&peer(2000, 2000, &[7])));
        assert_eq!(PeerPolicy::default().socket_perms().mode, 0o600);
        let one_group = PeerPolicy {
            users: vec![],
            groups: vec![50],
        };
        assert_eq!(one_group.socket_perms().group, Some(50));
        assert_eq!(one_group.socket_perms().mode, 0o660);
        assert_eq!(p.socket_perms().mode, 0o666);
    }

    #[test]
    fn peer_cred_of_a_socketpair_is_ours() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let cred = peer_cred(&a).expect("peer cred");
        assert_eq!(cred.pid, std::process::id() as i32);
        // SAFETY: getuid has no memory effects.
        assert_eq!(cred.uid, unsafe { libc::getuid() });
    }
}
