//! The QEMU test guest (`testkit::guest`, shared with the benchmarks), and what a test does
//! when it is missing.

pub use testkit::guest::*;

use crate::{have_program, require};

/// Check that QEMU and the guest image are there: skips the test locally (returns false),
/// fails it in CI. Use as `if !require_guest() { return; }`.
pub fn require_guest() -> bool {
    require(
        "qemu-system-x86_64 (Debian package qemu-system-x86)",
        have_program(QEMU),
    ) && require(
        &format!(
            "the test guest in {} (built by scripts/build-guest.sh)",
            guest_dir().display()
        ),
        GuestImage::locate().is_some(),
    )
}
