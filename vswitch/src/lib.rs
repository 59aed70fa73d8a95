//! vswitch: a vhost-user-net L2 switch. Each port is a vhost-user-net backend; frames go
//! from one guest's TX ring to other guests' RX rings with one copy, by VLAN and MAC.
//!
//! The modules, in the order a frame meets them:
//! - `serve`, `relay`, `backend`: sessions with QEMU; each port a vhost-user device whose
//!   kicks wake its forwarding thread;
//! - `pmd`: the forwarding threads, which poll the transmit queues;
//! - `datapath`: `ingress` (out of the sender's ring), `forward` (the decision), `egress`
//!   (into each receiver's ring);
//! - `policy`: VLANs, the forwarding database, QoS, the service endpoint;
//! - `switch`, `port`: the shared state those consult;
//! - `wire`: guest memory, rings, headers and the copy, knowing nothing above them.
//!
//! `config` and `ctl` set it up and report on it.

pub mod backend;
pub mod config;
pub mod ctl;
pub mod datapath;
pub mod pmd;
pub mod policy;
pub mod port;
pub mod relay;
pub mod serve;
pub mod switch;
pub mod wire;
