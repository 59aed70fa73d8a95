//! Per-port counters, named from the switch's side as OVS does: `rx` is what the port's
//! guest sent into the switch, `tx` what the switch delivered to the guest. `fdb_full`
//! counts the addresses of this port's guest learned into a full table (each took another
//! entry's place), `fdb_evicted` this port's entries that made that room.

common::counters!(PortStats {
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
    fdb_evicted,
    ring_errors,
});
