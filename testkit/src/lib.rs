//! Shared by the end-to-end tests (`tests/`, crate `e2e`) and the benchmarks (`benches/`):
//! the [`testpmd`] driver, the QEMU test [`guest`], and how both start the processes they
//! must not leave behind.

pub mod guest;
pub mod testpmd;

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Make `cmd` safe to leave running: its own process group (a Ctrl-C in the terminal reaches
/// the runner only, which then stops its children in order) and SIGKILL when the thread that
/// spawned it dies (PR_SET_PDEATHSIG).
pub fn contain(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (setpgid, prctl, getppid).
    unsafe {
        cmd.pre_exec(|| {
            libc::setpgid(0, 0);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The runner may already have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// SIGKILL the process group led by `pid` (a [`contain`]ed child leads its own group), and
/// the process itself in case it left the group.
pub fn kill_group(pid: u32) {
    let pid = pid as libc::pid_t;
    if pid <= 1 {
        return;
    }
    // SAFETY: kill() has no memory effects; pid is a child of ours that leads its own group.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}
