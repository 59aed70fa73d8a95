//! Per-device counters. Each rejected request bumps the counter for its reason, so an
//! operator can tell a misbehaving guest from a failing disk.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name { $(pub $field: AtomicU64,)* }

        impl $name {
            /// (name, value) pairs, for logs and the control socket.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(
    /// Counters shared by all queues of one device.
    Stats {
        reads,
        writes,
        flushes,
        discards,
        write_zeroes,
        get_ids,
        bytes_read,
        bytes_written,
        err_desc_out_of_bounds,
        err_wrong_direction,
        err_short_header,
        err_missing_status,
        err_beyond_capacity,
        err_bad_length,
        err_read_only,
        err_unsupported,
        err_io,
        err_config_write,
    }
);

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed) + n
    }
}

/// Log the first few occurrences of a guest error, then only every power of two, so a
/// hostile guest cannot flood the log while each reason stays visible with its count.
pub fn should_log(count: u64) -> bool {
    count <= 8 || count.is_power_of_two()
}
