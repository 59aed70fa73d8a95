//! The daemon core shared by `vdisk` and `vswitch`: logging, claiming the listening
//! socket, the accept/serve/reaccept loop around `vhost-user-backend`, orderly shutdown on
//! SIGINT/SIGTERM, the control socket, counters, and the token-bucket rate limiter.

pub mod access;
pub mod control;
pub mod counters;
pub mod logging;
pub mod memory;
pub mod ratelimit;
pub mod server;
pub mod shutdown;
pub mod socket;
pub mod vring;
