//! Per-port counters, named from the switch's side as OVS does: `rx` is what the port's
//! guest sent into the switch, `tx` what the switch delivered to the guest.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($name:ident { $($field:ident),* $(,)? }) => {
        #[derive(Debug, Default)]
        pub struct $name { $(pub $field: AtomicU64,)* }

        impl $name {
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(PortStats {
    rx_packets,
    rx_bytes,
    tx_packets,
    tx_bytes,
    drop_no_rx_buffer,
    drop_qos,
    drop_storm,
    tx_throttled,
    drop_vlan,
    drop_spoof,
    drop_mtu,
    drop_malformed,
    drop_mac_limit,
    fdb_full,
});

/// Add `n` and return the new value.
pub fn bump(c: &AtomicU64, n: u64) -> u64 {
    c.fetch_add(n, Ordering::Relaxed) + n
}

/// First few occurrences, then powers of two: every reason stays visible without letting
/// a guest flood the log.
pub fn should_log(count: u64) -> bool {
    count <= 8 || count.is_power_of_two()
}
