//! vswitch: a vhost-user-net L2 switch. Each port is a vhost-user-net backend; frames go
//! from one guest's TX ring to other guests' RX rings with one copy, by VLAN and MAC.
//!
//! Data flow: `net` (a port's TX ring) -> `frame` (headers) -> `switch` (VLAN ingress via
//! `vlan`, learning and lookup in `fdb`) -> `copy` (into each destination's RX ring, the
//! tag edited on the way) -> notify. `relay` sits between QEMU and the vhost-user library;
//! `config` and `serve` set it all up.

pub mod config;
pub mod copy;
pub mod ctl;
pub mod fdb;
pub mod frame;
pub mod net;
pub mod qos;
pub mod relay;
pub mod ring;
pub mod serve;
pub mod service;
pub mod stats;
pub mod switch;
pub mod vlan;
