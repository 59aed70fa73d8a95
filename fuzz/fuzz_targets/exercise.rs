//! What the `qcow2_open` fuzz target does with one input, shared with the regression
//! test that replays the corpus and the crashing inputs under `cargo test`
//! (vdisk/tests/qcow2_fuzz_corpus.rs includes this file).
//!
//! The input is an image file. It is opened read-only (map over the virtual size, reads,
//! the snapshot list, `check`), then a copy is opened writable (writes, zeroes, discards,
//! flush, snapshot create/revert/delete, `check --repair`, close). Any `Err` is fine: a
//! panic, an abort, an allocation past the fuzzer's memory limits or a timeout is a bug.
//!
//! The images live in a directory that also holds `base.raw` and `base.qcow2`
//! ([`prepare_dir`]), so inputs can name a backing file (the seed corpus does, by those
//! relative names), and an input naming `in.qcow2` or `rw.qcow2` exercises the loop
//! detection. Every operation is bounded (map lengths, number of calls, read sizes) so
//! that one input runs in milliseconds whatever virtual size its header claims.

use std::path::Path;

use vdisk::qcow2::{OpenOptions, Qcow2};

/// Cache budgets small enough that evictions (and their write-back ordering) happen.
fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        l2_cache_bytes: 16 << 10,
        refcount_cache_bytes: 16 << 10,
        ..OpenOptions::default()
    }
}

/// Create `dir` with the backing files the corpus refers to by relative name.
pub fn prepare_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("create the fuzz directory");
    let raw: Vec<u8> = (0..64 << 10).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(dir.join("base.raw"), raw).expect("write base.raw");
    let mut q =
        Qcow2::create(&dir.join("base.qcow2"), 1 << 20, 4096, None).expect("create base.qcow2");
    q.write(4096, &[0xa5; 8192]).expect("write base.qcow2");
    q.close().expect("close base.qcow2");
}

/// Run one input: `dir` was set up by [`prepare_dir`].
pub fn run(dir: &Path, data: &[u8]) {
    let ro = dir.join("in.qcow2");
    let rw = dir.join("rw.qcow2");
    std::fs::write(&ro, data).expect("write the input");
    read_only(&ro);
    std::fs::write(&rw, data).expect("write the writable copy");
    writable(&rw);
}

fn nop(_: u64, _: u64) {}

/// Walk the mapping from the start, then sample it across the whole virtual size.
fn exercise_map(img: &mut Qcow2) {
    let size = img.virtual_size();
    let cs = img.cluster_size();
    let cap = 64 * cs;
    let mut pos = 0u64;
    for _ in 0..64 {
        if pos >= size {
            break;
        }
        match img.map(pos, (size - pos).min(cap)) {
            Ok(ext) => {
                assert!(ext.len > 0 && ext.len <= (size - pos).min(cap), "{ext:?}");
                assert_eq!(ext.guest_offset, pos);
                pos += ext.len;
            }
            Err(_) => pos = pos.saturating_add(cs),
        }
    }
    for i in 0..32u64 {
        let pos = (size / 32).saturating_mul(i);
        if pos < size {
            let _ = img.map(pos, (size - pos).min(cap));
        }
    }
    // Out of range is an error, not a panic.
    assert!(img.map(size, 1).is_err());
    let _ = img.map(u64::MAX - 1, 2);
}

fn exercise_reads(img: &mut Qcow2) {
    let size = img.virtual_size();
    let cs = img.cluster_size();
    let mut buf = vec![0u8; (2 * cs).min(64 << 10) as usize];
    let n = (buf.len() as u64).min(size) as usize;
    let starts = [
        0,
        512,
        cs.saturating_sub(512),
        size / 2,
        size.saturating_sub(n as u64),
    ];
    for s in starts {
        let s = s & !511;
        if s.saturating_add(n as u64) <= size {
            let _ = img.read(s, &mut buf[..n]);
        }
    }
    assert!(img.read(size, &mut buf[..1]).is_err());
}

fn read_only(path: &Path) {
    let Ok(mut img) = Qcow2::open(path, &opts(true)) else {
        return;
    };
    exercise_map(&mut img);
    exercise_reads(&mut img);
    let _ = img.list_snapshots().len();
    let _ = img.allocated_bytes();
    let _ = img.refcount(0);
    let _ = img.check(false, &mut nop);
    assert!(
        img.write(0, &[1]).is_err(),
        "a read-only image took a write"
    );
    let _ = img.close();
}

fn writable(path: &Path) {
    let Ok(mut img) = Qcow2::open(path, &opts(false)) else {
        return;
    };
    let size = img.virtual_size();
    let cs = img.cluster_size();
    let data = vec![0x5au8; 4096];
    let small = 512.min(size) as usize;
    let _ = img.write(512.min(size - small as u64), &data[..small]);
    if size >= 2 * cs + 1024 {
        let mid = (size / 2) & !511;
        let _ = img.write(mid.min(size - 1024), &data[..1024]);
        let _ = img.write(cs - 512, &data[..1024]);
        let _ = img.write_zeroes(0, cs, false);
        let _ = img.write_zeroes(cs, cs, true);
        let _ = img.write_zeroes(512, 1024, false);
        let _ = img.discard(cs, cs.min(size - cs));
    }
    let _ = img.flush();
    exercise_map(&mut img);
    // Dedupe on a hostile tree: the walk that counts shared clusters, hits on private
    // and shared candidates, a zero cluster, copy-on-write of a shared cluster and the
    // private copy of its last reference.
    if size >= 4 * cs && img.enable_dedupe(4096).is_ok() {
        let block: Vec<u8> = (0..cs).map(|i| (i % 253) as u8 | 1).collect();
        for c in 0..3 {
            let _ = img.write(c * cs, &block);
        }
        let _ = img.write(cs, &vec![0; cs as usize]);
        let _ = img.write(0, &data[..small]);
        let _ = img.flush();
    }
    let snaps: Vec<String> = img
        .list_snapshots()
        .iter()
        .take(2)
        .map(|s| s.name.clone())
        .collect();
    let _ = img.create_snapshot("fuzz");
    let _ = img.write(0, &data[..small]);
    if let Some(s) = snaps.first() {
        let _ = img.revert_snapshot(s);
    }
    if let Some(s) = snaps.get(1) {
        let _ = img.delete_snapshot(s, &mut nop);
    }
    let _ = img.delete_snapshot("fuzz", &mut nop);
    let _ = img.check(true, &mut nop);
    exercise_reads(&mut img);
    let _ = img.close();
}
