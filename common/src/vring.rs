//! Helpers around `vhost-user-backend`'s vrings shared by the daemons.

use vhost_user_backend::VringState;
use vm_memory::GuestAddressSpace;

/// Signal the guest about new used entries if it asked to be (EVENT_IDX's used event, or
/// the NO_INTERRUPT flag). The error names what failed, for the caller's log line.
pub fn notify_guest<M: GuestAddressSpace>(state: &mut VringState<M>) -> Result<(), String> {
    match state.needs_notification() {
        Ok(true) => state
            .signal_used_queue()
            .map_err(|e| format!("cannot notify the guest: {e}")),
        Ok(false) => Ok(()),
        Err(e) => Err(format!("cannot read used event: {e}")),
    }
}
