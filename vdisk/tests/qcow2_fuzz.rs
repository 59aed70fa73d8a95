//! The qcow2 fuzz target's findings, as ordinary tests (no fuzzing toolchain needed):
//! the seed corpus and every input the fuzzer found crashing or hanging
//! (fuzz/regressions/qcow2_open, each fixed since) replayed through the same operations
//! the target runs (fuzz/fuzz_targets/exercise.rs), and each finding rebuilt byte by byte
//! from a fresh image.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vdisk::qcow2::{OpenOptions, Qcow2};

#[path = "../../fuzz/fuzz_targets/exercise.rs"]
mod exercise;

fn inputs(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn replay(dir: &str) {
    let files = inputs(dir);
    assert!(!files.is_empty(), "no inputs in fuzz/{dir}");
    let d = tempfile::tempdir().expect("tempdir");
    let work = d.path().join("work");
    exercise::prepare_dir(&work);
    for f in files {
        let data = std::fs::read(&f).expect("read input");
        let t = Instant::now();
        exercise::run(&work, &data);
        // The fuzzer's own limit is 10 s in an instrumented build.
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} took {:?}",
            f.display(),
            t.elapsed()
        );
    }
}

#[test]
fn seed_corpus_replays() {
    replay("corpus/qcow2_open");
}

#[test]
fn fuzz_regressions_replay() {
    replay("regressions/qcow2_open");
}

const COPIED: u64 = 1 << 63;
const ZERO: u64 = 1;

fn be64_at(path: &Path, at: u64) -> u64 {
    let f = std::fs::File::open(path).expect("open");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).expect("read");
    u64::from_be_bytes(b)
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(bytes, at).expect("patch");
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

/// A 1 MiB image of 4 KiB clusters with guest cluster 0 written; returns the offset of
/// the L2 table mapping it.
fn image_with_l2(path: &Path) -> u64 {
    let mut img = Qcow2::create(path, 1 << 20, 4096, None).expect("create");
    img.write(0, &[7u8; 4096]).expect("write");
    img.close().expect("close");
    let l1 = be64_at(path, 40);
    be64_at(path, l1) & 0x00ff_ffff_ffff_fe00
}

/// A preallocated zero cluster is written in place: its host offset must be checked like
/// a data cluster's. Before the fix, a write there went to 64 GiB into the file (or onto
/// any metadata cluster the entry named).
#[test]
fn zero_cluster_with_host_offset_past_eof_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let l2 = image_with_l2(&path);
    patch(&path, l2 + 8, &(COPIED | ZERO | (64 << 30)).to_be_bytes());
    let len = file_len(&path);
    let mut img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
    let err = img.write(4096, &[1u8; 512]).expect_err("write must fail");
    assert!(err.to_string().contains("past the end"), "{err}");
    let mut buf = [1u8; 512];
    img.read(4096, &mut buf).expect_err("read must fail");
    drop(img);
    assert_eq!(file_len(&path), len);
}

/// Creating a snapshot counts a reference to every cluster the L2 tables name: one past
/// the end of the file is corruption, not a reason to grow the refcount table and create
/// refcount blocks out there (the file grew to 64 GiB before the fix, and `check` then
/// walked all of it).
#[test]
fn snapshot_of_an_entry_past_eof_does_not_grow_the_file() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let l2 = image_with_l2(&path);
    patch(&path, l2 + 8, &(64u64 << 30).to_be_bytes());
    let mut img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
    let err = img.create_snapshot("s").expect_err("snapshot must fail");
    assert!(err.to_string().contains("past the end"), "{err}");
    img.close().expect("close");
    assert!(
        file_len(&path) < 1 << 20,
        "file grew to {}",
        file_len(&path)
    );
}

/// Snapshots sharing one L1 table are refused at open: before the fix, a 3 MiB image
/// naming one 1 MiB table from 20000 snapshots made `check` allocate 20 GiB.
#[test]
fn snapshots_sharing_an_l1_table_are_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 1 << 20, 4096, None).expect("create");
    img.create_snapshot("a").expect("snapshot a");
    img.create_snapshot("b").expect("snapshot b");
    let snaps = img.list_snapshots().to_vec();
    img.close().expect("close");
    // The second entry follows the first: 40 bytes, 16 of extra data, id, name, padded.
    let table = be64_at(&path, 64);
    let first = (40 + 16 + snaps[0].id.len() + snaps[0].name.len()).next_multiple_of(8);
    patch(
        &path,
        table + first as u64,
        &snaps[0].l1_table_offset.to_be_bytes(),
    );
    let err = Qcow2::open(&path, &OpenOptions::read_only()).expect_err("open must fail");
    assert!(err.to_string().contains("overlap"), "{err}");
}
