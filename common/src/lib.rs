//! The daemon core shared by `vdisk` and `vswitch`: logging, claiming the listening
//! socket, the accept/serve/reaccept loop around `vhost-user-backend`, and orderly
//! shutdown on SIGINT/SIGTERM.

pub mod logging;
pub mod server;
pub mod shutdown;
pub mod socket;
