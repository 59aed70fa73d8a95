//! vdisk: a vhost-user-blk daemon serving disk images to QEMU and other VMMs.
//!
//! The library holds everything the `vdisk` binary runs (the daemon and the image CLI) so
//! that tests and fuzz targets can drive the image formats directly.

pub mod backend;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod device;
pub mod engine;
pub mod image;
pub mod open;
pub mod qcow2;
pub mod queue;
pub mod request;
pub mod serve;
pub mod stats;
pub mod translate;
