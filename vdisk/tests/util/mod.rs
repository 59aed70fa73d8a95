//! What the qcow2 integration tests share: finding QEMU's tools under the workspace
//! policy, running them, and `qemu-img check` as the oracle.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::Path;
use std::process::{Command, Output};

pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// The workspace policy, copied: the e2e crate depends on vdisk, so vdisk cannot use it.
pub fn require(what: &str) -> bool {
    if have(what) {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required in CI but missing: .ci/run must install it");
    }
    eprintln!("SKIP: {what} is missing (run `make setup` to install it)");
    false
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    out
}

pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub fn qemu_check(img: &Path) {
    let out = ok("qemu-img", &["check", s(img)]);
    assert!(out.contains("No errors were found"), "{out}");
}
