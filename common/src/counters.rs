//! Counters both daemons keep: a struct of relaxed atomics per device or port, bumped on
//! the data path and read by the control socket and the logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// A struct of `AtomicU64` counters with a `snapshot()` of (name, value) pairs.
#[macro_export]
macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name { $(pub $field: ::std::sync::atomic::AtomicU64,)* }

        impl $name {
            /// (name, value) pairs, for logs and the control socket.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((
                    stringify!($field),
                    self.$field.load(::std::sync::atomic::Ordering::Relaxed),
                ),)*]
            }
        }
    };
}

/// Add `n` and return the new value.
pub fn bump(counter: &AtomicU64, n: u64) -> u64 {
    counter.fetch_add(n, Ordering::Relaxed) + n
}

/// Log the first few occurrences of a guest error, then only every power of two, so a
/// hostile guest cannot flood the log while each reason stays visible with its count.
pub fn should_log(count: u64) -> bool {
    count <= 8 || count.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    counters!(
        /// Two counters.
        Pair { a, b }
    );

    #[test]
    fn snapshot_names_and_log_points() {
        let p = Pair::default();
        assert_eq!(bump(&p.b, 3), 3);
        assert_eq!(p.snapshot(), vec![("a", 0), ("b", 3)]);
        let logged: Vec<u64> = (1..=40).filter(|&n| should_log(n)).collect();
        assert_eq!(logged, vec![1, 2, 3, 4, 5, 6, 7, 8, 16, 32]);
    }
}
