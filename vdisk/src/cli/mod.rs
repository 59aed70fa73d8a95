//! Offline command-line tools: `vdisk image ...` and `vdisk snapshot ...`.

pub mod image;
