//! The accept/serve loop: one `VhostUserDaemon` per frontend connection, so that after a
//! guest reboot or a VMM restart the next frontend is accepted by the same process, with
//! the device state (the open image, counters) carried over in the backend.

use tracing::{info, warn};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot set up the vhost-user device: {0}")]
    Setup(String),
    #[error("cannot accept a frontend on {socket}: {reason}")]
    Accept { socket: String, reason: String },
}

/// What a device does around each frontend session.
pub trait SessionHooks<B: VhostUserBackend> {
    /// Called with a fresh daemon before it accepts: register extra event fds here.
    fn attach(&self, daemon: &VhostUserDaemon<B>) -> Result<(), String>;
    /// Called after the session ended and its worker threads were joined.
    fn detached(&self);
}

/// Serve frontends one after another, forever: `start` connects each fresh daemon to its
/// frontend (`VhostUserDaemon::start` on a listener, say).
pub fn serve_forever<B, H>(
    name: &str,
    socket: &str,
    mut start: impl FnMut(&mut VhostUserDaemon<B>) -> Result<(), String>,
    backend: B,
    hooks: &H,
) -> Result<(), ServerError>
where
    B: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    B::Vring: Clone + Send + Sync,
    H: SessionHooks<B>,
{
    loop {
        let mut daemon = VhostUserDaemon::new(
            name.to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServerError::Setup(e.to_string()))?;
        hooks.attach(&daemon).map_err(ServerError::Setup)?;
        info!(socket, "waiting for a frontend");
        start(&mut daemon).map_err(|reason| ServerError::Accept {
            socket: socket.to_string(),
            reason,
        })?;
        info!(socket, "frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!(socket, "frontend disconnected"),
            Err(e) => warn!(socket, "frontend session ended: {e}"),
        }
        // Dropping the daemon stops and joins its vring worker threads.
        drop(daemon);
        hooks.detached();
    }
}
