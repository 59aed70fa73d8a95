//! What frames are made of and where they live: guest memory, the virtio rings, the
//! virtio-net header and its offloads, Ethernet headers, and the copy between guests. Nothing here knows
//! about ports or policy.

pub mod copy;
pub mod frame;
pub mod gso;
pub mod guest;
pub mod ring;
pub mod vnet;
