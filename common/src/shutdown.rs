//! SIGINT/SIGTERM handling: the daemon's own drain-and-exit routine runs once, on a
//! dedicated thread, whatever the main thread is blocked in (usually `accept`).
//!
//! Installing the handlers and starting the routine are separate steps, so the handlers
//! can be in place before the socket appears: a signal that arrives in between is held
//! and handled as soon as the routine starts, never by the default action, which would
//! leave the socket behind.

use std::io;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::info;

/// Termination signals caught but not yet acted on.
pub struct Termination {
    signals: Signals,
}

impl Termination {
    /// Catch SIGINT and SIGTERM from now on.
    pub fn install() -> io::Result<Termination> {
        Ok(Termination {
            signals: Signals::new([SIGINT, SIGTERM])?,
        })
    }

    /// Run `on_signal` on the first SIGINT or SIGTERM, including one already received.
    /// It is expected to end the process.
    pub fn on_signal<F>(mut self, on_signal: F) -> io::Result<()>
    where
        F: FnOnce(i32) + Send + 'static,
    {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = self.signals.forever().next() {
                    info!(signal = sig, "termination requested, draining");
                    on_signal(sig);
                }
            })?;
        Ok(())
    }
}
