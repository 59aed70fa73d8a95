//! The one error type of the qcow2 code. Every variant names the image file at fault.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error(transparent)]
    Open(#[from] crate::open::OpenError),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: String,
        source: io::Error,
    },
    #[error("{path} is not a qcow2 image (bad magic)")]
    NotQcow2 { path: PathBuf },
    #[error("{path} uses an unsupported qcow2 feature: {feature}")]
    Unsupported { path: PathBuf, feature: String },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: guest range {offset}+{len} is outside the virtual disk of {size} bytes")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path} is open read-only")]
    ReadOnly { path: PathBuf },
    #[error(
        "{path}: guest offset {guest_offset} is stored in a compressed cluster; \
         compressed clusters are not supported (convert the image with qemu-img first)"
    )]
    Compressed { path: PathBuf, guest_offset: u64 },
    #[error("{path}: backing file: {what}")]
    Backing { path: PathBuf, what: String },
    #[error(
        "{path} was probed as qcow2 (--format auto) and names backing file {backing:?}: a \
         guest can write such a header into a raw disk, so it is not followed; give \
         --format qcow2 if this is a linked clone you made, --format raw if it is a raw disk"
    )]
    ProbedWithBacking { path: PathBuf, backing: String },
    #[error("{path}: no snapshot named or numbered {name:?}")]
    SnapshotNotFound { path: PathBuf, name: String },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: the mapping of guest offset {guest_offset} changed between prepare_write and commit_write")]
    PlanConflict { path: PathBuf, guest_offset: u64 },
}

pub type Result<T, E = Qcow2Error> = std::result::Result<T, E>;
