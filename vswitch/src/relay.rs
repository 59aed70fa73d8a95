//! A message relay between a frontend and the vhost-user library, for two QEMU quirks.
//!
//! QEMU's virtio-net sends SET_VRING_ENABLE as soon as the NIC is created, before
//! SET_FEATURES. The vhost crate treats that as a protocol error and drops the
//! connection, and without protocol features QEMU 7.2 crashes when the guest starts the
//! NIC (its MSI-X config-interrupt path needs VHOST_USER_PROTOCOL_F_CONFIG). So each
//! frontend connection passes through this relay, which answers a SET_VRING_ENABLE that
//! comes before SET_FEATURES itself and forwards everything else, file descriptors
//! included. QEMU enables the rings again after SET_FEATURES when it starts the device.
//!
//! QEMU drives a multiqueue NIC as one vhost device per queue pair over the one socket,
//! and QEMU 7.2 sends each memory region once per device with ADD_MEM_REG (and removes it
//! once per device). The library refuses a region that overlaps one it has, so the relay
//! forwards the first ADD_MEM_REG of a region and the last REM_MEM_REG, and answers the
//! repeats itself ([`Regions`]).

use std::collections::HashMap;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use tracing::debug;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR_LEN: usize = 12;
/// The most descriptors one vhost-user message carries (SET_MEM_TABLE: 8 regions).
const MAX_FDS: usize = 32;
/// No vhost-user request body is anywhere near this; a larger size means a broken peer.
const MAX_BODY: usize = 1 << 16;
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Relay between `frontend` and `backend` until either side closes.
pub fn run(frontend: UnixStream, backend: UnixStream) -> io::Result<()> {
    let (fe_read, be_write) = (frontend.try_clone()?, backend.try_clone()?);
    let mut be_read = backend;
    let mut fe_write = frontend;
    let replies = std::thread::Builder::new()
        .name("relay-replies".into())
        .spawn(move || {
            // Backend to frontend: replies only, never descriptors.
            let _ = io::copy(&mut be_read, &mut fe_write);
            let _ = fe_write.shutdown(Shutdown::Both);
            let _ = be_read.shutdown(Shutdown::Both);
        })?;
    let result = requests(&fe_read, &be_write);
    let _ = be_write.shutdown(Shutdown::Both);
    let _ = fe_read.shutdown(Shutdown::Both);
    let _ = replies.join();
    result
}

/// A region as ADD_MEM_REG and REM_MEM_REG name it (after 8 bytes of padding): guest
/// address, size, frontend address, mmap offset. The descriptor is not part of it: each
/// message carries its own.
type RegionKey = [u8; 32];

/// How many of the frontend's vhost devices hold each region the backend has.
#[derive(Default)]
struct Regions {
    held: HashMap<RegionKey, u32>,
}

impl Regions {
    /// Whether to forward `request` with `body`; false: the relay answers it.
    fn forward(&mut self, request: u32, body: &[u8]) -> bool {
        let key = || -> Option<RegionKey> { body.get(8..40)?.try_into().ok() };
        match request {
            SET_MEM_TABLE => {
                self.held.clear();
                true
            }
            ADD_MEM_REG => match key() {
                Some(k) => {
                    let n = self.held.entry(k).or_insert(0);
                    *n += 1;
                    *n == 1
                }
                None => true,
            },
            REM_MEM_REG => match key().and_then(|k| self.held.get_mut(&k).map(|n| (k, n))) {
                Some((_, n)) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some((k, _)) => {
                    self.held.remove(&k);
                    true
                }
                // Not added through here: the backend answers for itself.
                None => true,
            },
            _ => true,
        }
    }
}

/// Answer `request` as the backend would have: a u64 status of 0 (REPLY_ACK).
fn ack(fe: &UnixStream, request: u32) -> io::Result<()> {
    let mut reply = [0u8; HDR_LEN + 8];
    reply[0..4].copy_from_slice(&request.to_le_bytes());
    reply[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
    (&*fe).write_all(&reply)
}

fn requests(fe: &UnixStream, be: &UnixStream) -> io::Result<()> {
    let mut features_set = false;
    let mut regions = Regions::default();
    // Ring enable states QEMU asked for before SET_FEATURES, applied right after it.
    let mut early: Vec<[u8; 8]> = Vec::new();
    let mut body = vec![0u8; MAX_BODY];
    loop {
        let mut hdr = [0u8; HDR_LEN];
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: HDR_LEN,
        }];
        // SAFETY: the iovec points at `hdr`, which outlives the call; received descriptors
        // are written into `raw` and taken over below.
        let (n, nfds) = unsafe { fe.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let fds: Vec<OwnedFd> = raw[..nfds]
            .iter()
            // SAFETY: these descriptors were just received and belong to nobody else.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return Ok(());
        }
        (&*fe).read_exact(&mut hdr[n..])?;
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_BODY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user request {request} with a {size}-byte body"),
            ));
        }
        (&*fe).read_exact(&mut body[..size])?;
        tracing::trace!(request, flags, size, fds = nfds, "frontend request");
        match request {
            SET_FEATURES => features_set = true,
            SET_VRING_ENABLE if !features_set && size == 8 => {
                debug!("answered a SET_VRING_ENABLE sent before SET_FEATURES");
                let mut state = [0u8; 8];
                state.copy_from_slice(&body[..8]);
                early.retain(|s| s[..4] != state[..4]);
                early.push(state);
                if flags & FLAG_NEED_REPLY != 0 {
                    ack(fe, request)?;
                }
                continue;
            }
            _ => {}
        }
        // The frontend waits for each reply before its next request, so an answer from
        // here never interleaves with one of the backend's.
        if !regions.forward(request, &body[..size]) {
            debug!(request, "answered a repeated memory region message");
            if flags & FLAG_NEED_REPLY != 0 {
                ack(fe, request)?;
            }
            continue;
        }
        let raw_fds: Vec<RawFd> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let sent = be
            .send_with_fds(&[&hdr[..], &body[..size]], &raw_fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // A stream socket may take less than asked; the descriptors went with the first byte.
        let mut rest = sent;
        for part in [&hdr[..], &body[..size]] {
            if rest >= part.len() {
                rest -= part.len();
            } else {
                (&*be).write_all(&part[rest..])?;
                rest = 0;
            }
        }
        // Our copies of the descriptors close here; the backend has its own.
        drop(fds);
        if request == SET_FEATURES {
            for state in early.drain(..) {
                let mut msg = [0u8; HDR_LEN + 8];
                msg[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                msg[4..8].copy_from_slice(&FLAG_VERSION_1.to_le_bytes());
                msg[8..12].copy_from_slice(&8u32.to_le_bytes());
                msg[12..].copy_from_slice(&state);
                (&*be).write_all(&msg)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(gpa: u64, size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        for v in [gpa, size, 0x7f00_0000_0000 + gpa, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn repeated_regions_reach_the_backend_once() {
        let mut r = Regions::default();
        let (a, b) = (region(0, 1 << 30), region(1 << 32, 1 << 30));
        // Two vhost devices add the same two regions.
        assert!(r.forward(ADD_MEM_REG, &a));
        assert!(r.forward(ADD_MEM_REG, &b));
        assert!(!r.forward(ADD_MEM_REG, &a));
        assert!(!r.forward(ADD_MEM_REG, &b));
        // The region goes once the last device removes it.
        assert!(!r.forward(REM_MEM_REG, &a));
        assert!(r.forward(REM_MEM_REG, &a));
        assert!(r.forward(ADD_MEM_REG, &a), "added again after its removal");
        // A new table replaces everything.
        assert!(r.forward(SET_MEM_TABLE, &[]));
        assert!(r.forward(ADD_MEM_REG, &b));
        // What the relay cannot read or never saw goes to the backend, which judges it.
        assert!(r.forward(ADD_MEM_REG, &[0; 4]));
        assert!(r.forward(REM_MEM_REG, &region(7, 7)));
        assert!(r.forward(SET_FEATURES, &[0; 8]));
    }
}
