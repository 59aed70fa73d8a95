//! SIGINT/SIGTERM turn into a flag the measurement loops poll, so an interrupted run still
//! stops its daemons and removes its image (Drop does both) instead of dying on the spot.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Install the handlers. A second signal gets the default action (a stuck run can still be
/// killed with a second Ctrl-C).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a valid handler and SA_RESETHAND is a valid argument;
        // the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// True once SIGINT or SIGTERM arrived.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// An error if the run was interrupted.
pub fn check() -> Result<(), String> {
    if stopped() {
        Err("interrupted".to_string())
    } else {
        Ok(())
    }
}
