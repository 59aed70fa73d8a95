//! SIGINT/SIGTERM handling: the daemon's own drain-and-exit routine runs once, on a
//! dedicated thread, whatever the main thread is blocked in (usually `accept`).

use std::io;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::info;

/// Run `on_signal` on the first SIGINT or SIGTERM. It is expected to end the process.
pub fn on_termination<F>(on_signal: F) -> io::Result<()>
where
    F: FnOnce(i32) + Send + 'static,
{
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                info!(signal = sig, "termination requested, draining");
                on_signal(sig);
            }
        })?;
    Ok(())
}
