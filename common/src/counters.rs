//! Counters both daemons keep: a struct of relaxed atomics per device or port, bumped on
//! the data path and read by the control socket and the logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// A struct of `AtomicU64` counters with a `snapshot()` of (name, value) pairs, and a log
/// limiter per counter (`may_log`) for the lines a guest can cause.
#[macro_export]
macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug)]
        pub struct $name {
            $(pub $field: ::std::sync::atomic::AtomicU64,)*
            /// One limiter per counter, in field order.
            logs: ::std::boxed::Box<[$crate::logging::LogLimit]>,
        }

        impl ::std::default::Default for $name {
            fn default() -> Self {
                $name {
                    $($field: ::std::sync::atomic::AtomicU64::new(0),)*
                    logs: [$(stringify!($field)),*]
                        .iter()
                        .map(|_| $crate::logging::LogLimit::new())
                        .collect(),
                }
            }
        }

        impl $name {
            /// (name, value) pairs, for logs and the control socket.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((
                    stringify!($field),
                    self.$field.load(::std::sync::atomic::Ordering::Relaxed),
                ),)*]
            }

            /// Whether a line about `counter` (one of this struct's) may be logged now:
            /// at most one a second per counter, with how many were held back before it.
            pub fn may_log(&self, counter: &::std::sync::atomic::AtomicU64) -> Option<u64> {
                let fields = [$(&self.$field),*];
                let i = fields.iter().position(|f| ::std::ptr::eq(*f, counter))?;
                self.logs.get(i)?.check()
            }
        }
    };
}

/// Add `n` and return the new value.
pub fn bump(counter: &AtomicU64, n: u64) -> u64 {
    counter.fetch_add(n, Ordering::Relaxed) + n
}

#[cfg(test)]
mod tests {
    use super::*;

    counters!(
        /// Two counters.
        Pair { a, b }
    );

    #[test]
    fn snapshot_names_and_a_log_limit_per_counter() {
        let p = Pair::default();
        assert_eq!(bump(&p.b, 3), 3);
        assert_eq!(p.snapshot(), vec![("a", 0), ("b", 3)]);
        assert_eq!(p.may_log(&p.a), Some(0));
        assert_eq!(p.may_log(&p.a), None);
        // Another cause has its own second.
        assert_eq!(p.may_log(&p.b), Some(0));
        let stranger = AtomicU64::new(0);
        assert_eq!(p.may_log(&stranger), None);
    }
}
