use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// Log to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests, embedding) keeps the first subscriber; that is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// A command's outcome as its exit status: a failure is logged and printed on stderr,
/// prefixed with the program's name.
pub fn exit_status(
    program: &str,
    result: Result<std::process::ExitCode, String>,
) -> std::process::ExitCode {
    result.unwrap_or_else(|e| {
        tracing::error!("{e}");
        eprintln!("{program}: {e}");
        std::process::ExitCode::FAILURE
    })
}

/// The shortest time between two lines of one cause that a guest or another local user can
/// set off (a bad descriptor, a refused control client).
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// One cause's log limit: a line at most every [`LOG_INTERVAL`], the next one saying how
/// many were held back, so a hostile guest cannot flood the log and each cause stays
/// visible. Lock-free, for the data path's error branches.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// When the last line was let through, in ms since [`epoch`] plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms())
    }

    fn check_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let interval = LOG_INTERVAL.as_millis() as u64;
        if last != 0 && now.saturating_sub(last) < interval
            || self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_held_back() {
        let l = LogLimit::new();
        assert_eq!(l.check_at(5000), Some(0));
        for t in 5001..5999 {
            assert_eq!(l.check_at(t), None);
        }
        assert_eq!(l.check_at(6000), Some(998));
        assert_eq!(l.check_at(6001), None);
        assert_eq!(l.check_at(9000), Some(1));
    }
}
