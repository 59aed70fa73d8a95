//! The switch's rules: where a frame may go (VLANs), where it goes (the forwarding
//! database), how much may pass (QoS), and the switch's own endpoint on each VLAN.

pub mod fdb;
pub mod qos;
pub mod service;
pub mod vlan;
