//! Fuzz target: the qcow2 open and metadata paths on a hostile image (see exercise.rs).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

mod exercise;

/// A directory of this process's own: $VDISK_FUZZ_DIR/vdisk-fuzz-PID (scripts/fuzz.sh
/// points VDISK_FUZZ_DIR at a tmpfs directory it removes afterwards), else under /dev/shm
/// or the temp dir, left behind.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = match std::env::var_os("VDISK_FUZZ_DIR") {
            Some(d) => PathBuf::from(d),
            None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        let d = base.join(format!("vdisk-fuzz-{}", std::process::id()));
        exercise::prepare_dir(&d);
        d
    })
}

fuzz_target!(|data: &[u8]| {
    exercise::run(dir(), data);
});
