//! Unit tests of the format code: round trips against an in-memory model, snapshots,
//! discard, the on-disk ordering rules, and hostile images built byte by byte.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

use super::*;

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn small_cache() -> OpenOptions {
    OpenOptions {
        read_only: false,
        l2_cache_bytes: 0,
        refcount_cache_bytes: 0,
        ..OpenOptions::default()
    }
}

fn read_all(img: &mut Qcow2) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read(0, &mut buf).expect("read");
    buf
}

fn assert_clean(img: &mut Qcow2) {
    let r = img.check(false, &mut |_, _| {}).expect("check");
    assert_eq!(r.leaks, 0, "{r:?}");
    assert_eq!(r.refcount_errors, 0, "{r:?}");
    assert_eq!(r.copied_errors, 0, "{r:?}");
    assert!(r.corruptions.is_empty(), "{r:?}");
}

/// Random writes (varied offsets and lengths, partial clusters, across boundaries)
/// mirrored in a model.
fn random_writes(img: &mut Qcow2, model: &mut [u8], seed: u64, n: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = model.len() as u64;
    for _ in 0..n {
        let len = rng.random_range(1..=3 * img.cluster_size()).min(size);
        let off = rng.random_range(0..=size - len);
        let byte: u8 = rng.random();
        let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
        img.write(off, &data).expect("write");
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}

#[test]
fn round_trip_with_tiny_caches_and_reopen() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    Qcow2::create(&path, 24 * MIB, 4096, None)
        .expect("create")
        .close()
        .expect("close");
    let mut img = Qcow2::open(&path, &small_cache()).expect("open");
    let mut model = vec![0u8; 24 * MIB as usize];
    random_writes(&mut img, &mut model, 1, 300);
    assert!(
        img.counters().l2_writebacks > 0,
        "the tiny cache must evict dirty tables"
    );
    assert!(read_all(&mut img) == model);
    img.flush().expect("flush");
    assert_clean(&mut img);
    img.close().expect("close");
    let mut img = Qcow2::open(&path, &OpenOptions::read_only()).expect("reopen");
    assert!(read_all(&mut img) == model);
    assert_clean(&mut img);
}

/// Rule 1 at an arbitrary instant (no flush): every data cluster an L2 table on disk
/// points to already has a nonzero refcount on disk.
#[test]
fn evicted_l2_tables_only_reference_counted_clusters() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    Qcow2::create(&path, 64 * MIB, 4096, None)
        .expect("create")
        .close()
        .expect("close");
    let mut img = Qcow2::open(&path, &small_cache()).expect("open");
    let mut model = vec![0u8; 64 * MIB as usize];
    random_writes(&mut img, &mut model, 7, 200);
    let f = std::fs::File::open(&path).expect("open raw");
    let cs = 4096u64;
    let table_off = img.rc.table_offset();
    let mut checked = 0;
    for &l1e in &img.l1.clone() {
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 || img.l2_cache.is_dirty(l2) {
            continue;
        }
        let mut raw = vec![0u8; cs as usize];
        if f.read_exact_at(&mut raw, l2).is_err() {
            continue;
        }
        for c in raw.chunks_exact(8) {
            let e = u64::from_be_bytes(c.try_into().expect("8 bytes"));
            let host = e & OFFSET_MASK;
            if host == 0 {
                continue;
            }
            let cl = host / cs;
            let block_idx = cl / (cs / 2);
            let mut ent = [0u8; 8];
            f.read_exact_at(&mut ent, table_off + block_idx * 8)
                .expect("reftable");
            let block = u64::from_be_bytes(ent);
            assert_ne!(
                block, 0,
                "on-disk L2 entry {e:#x} has no refcount block on disk"
            );
            let mut rc = [0u8; 2];
            f.read_exact_at(&mut rc, block + (cl % (cs / 2)) * 2)
                .expect("refblock");
            assert_ne!(
                u16::from_be_bytes(rc),
                0,
                "on-disk L2 entry {e:#x} has refcount 0"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no L2 table reached the disk");
}

#[test]
fn two_phase_write_through_the_file() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 8 * MIB, 65536, None).expect("create");
    img.write(65536 * 3, &[0x11; 65536]).expect("write");
    // A write that covers half of an allocated cluster and half of a new one.
    let plan = img
        .prepare_write(65536 * 3 + 32768, 65536)
        .expect("prepare");
    assert!(!plan.segments().is_empty());
    let data = vec![0x22u8; 65536];
    let mut at = 0usize;
    for s in plan.segments() {
        img.file()
            .write_all_at(&data[at..at + s.len as usize], s.host_offset)
            .expect("pwrite");
        at += s.len as usize;
    }
    img.commit_write(plan).expect("commit");
    let mut buf = vec![0u8; 3 * 65536];
    img.read(65536 * 3, &mut buf).expect("read");
    assert!(buf[..32768].iter().all(|&b| b == 0x11));
    assert!(buf[32768..32768 + 65536].iter().all(|&b| b == 0x22));
    assert!(buf[32768 + 65536..].iter().all(|&b| b == 0));
    let e = img.map(65536 * 4, 65536).expect("map");
    assert!(matches!(e.kind, ExtentKind::Data { copied: true, .. }));
    let e = img.map(65536 * 6, 2 * MIB).expect("map");
    assert_eq!((e.kind, e.len), (ExtentKind::Unallocated, 2 * MIB));
    img.flush().expect("flush");
    assert_clean(&mut img);
    assert!(
        img.write(8 * MIB - 1, &[1, 2]).is_err(),
        "writes past the end fail"
    );
}

#[test]
fn discard_and_write_zeroes_free_clusters() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 16 * MIB, 65536, None).expect("create");
    img.write(0, &vec![0x5a; 8 * MIB as usize]).expect("write");
    img.flush().expect("flush");
    let before = img.allocated_bytes().expect("st_blocks");
    let host = match img.map(MIB, 65536).expect("map").kind {
        ExtentKind::Data { host_offset, .. } => host_offset,
        k => panic!("expected data, got {k:?}"),
    };
    img.discard(MIB, 4 * MIB).expect("discard");
    assert_eq!(
        img.refcount(host).expect("rc"),
        1,
        "not freed before the flush"
    );
    img.flush().expect("flush");
    assert_eq!(img.refcount(host).expect("rc"), 0);
    let after = img.allocated_bytes().expect("st_blocks");
    assert!(
        after + 3 * MIB < before,
        "{before} -> {after}: no holes punched"
    );
    // Zeroes without unmap keep the allocation, and read as zeros.
    img.write_zeroes(6 * MIB, 65536, false).expect("zeroes");
    // A partial-cluster write_zeroes writes zeros.
    img.write_zeroes(7 * MIB + 100, 1000, true).expect("zeroes");
    let mut model = vec![0x5au8; 8 * MIB as usize];
    model.resize(16 * MIB as usize, 0);
    model[MIB as usize..5 * MIB as usize].fill(0);
    model[6 * MIB as usize..6 * MIB as usize + 65536].fill(0);
    model[7 * MIB as usize + 100..7 * MIB as usize + 1100].fill(0);
    assert!(read_all(&mut img) == model);
    assert!(matches!(
        img.l2_entry(6 * MIB / 65536).map(|e| e & (ZERO | COPIED)),
        Ok(x) if x == ZERO | COPIED
    ));
    // Writing into a preallocated zero cluster reuses it and zero-fills the rest.
    img.write(6 * MIB + 10, &[7; 10]).expect("write");
    model[6 * MIB as usize + 10..6 * MIB as usize + 20].fill(7);
    assert!(read_all(&mut img) == model);
    img.flush().expect("flush");
    assert_clean(&mut img);
}

#[test]
fn snapshots_copy_on_write_revert_delete() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 8 * MIB, 65536, None).expect("create");
    let mut v1 = vec![0u8; 8 * MIB as usize];
    random_writes(&mut img, &mut v1, 3, 40);
    img.create_snapshot("one").expect("snapshot");
    assert_clean(&mut img);
    assert!(
        img.create_snapshot("one").is_err(),
        "duplicate names are refused"
    );
    let mut v2 = v1.clone();
    random_writes(&mut img, &mut v2, 4, 40);
    assert!(img.counters().cow_clusters > 0);
    img.flush().expect("flush");
    assert_clean(&mut img);
    assert!(read_all(&mut img) == v2);
    img.create_snapshot("two").expect("snapshot");
    img.revert_snapshot("one").expect("revert");
    assert_clean(&mut img);
    assert!(read_all(&mut img) == v1);
    img.revert_snapshot("2").expect("revert by id");
    assert!(read_all(&mut img) == v2);
    let len_before = img.list_snapshots().len();
    img.delete_snapshot("one", &mut |_, _| {}).expect("delete");
    assert_eq!(img.list_snapshots().len(), len_before - 1);
    assert_clean(&mut img);
    img.delete_snapshot("two", &mut |_, _| {}).expect("delete");
    assert_clean(&mut img);
    // With no snapshot left every active cluster is private again.
    let e = img.map(0, 65536).expect("map");
    if let ExtentKind::Data { copied, .. } = e.kind {
        assert!(copied);
    }
    assert!(read_all(&mut img) == v2);
    assert!(matches!(
        img.delete_snapshot("nope", &mut |_, _| {}),
        Err(Qcow2Error::SnapshotNotFound { .. })
    ));
    img.close().expect("close");
    let mut img = Qcow2::open(&path, &OpenOptions::read_only()).expect("reopen");
    assert!(read_all(&mut img) == v2);
}

#[test]
fn refcount_table_grows() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 8 * MIB, 4096, None).expect("create");
    img.write(0, &[1; 10000]).expect("write");
    // 4 KiB clusters: one table cluster covers 512 blocks of 2048 clusters (4 GiB).
    let far = 3 * 512 * 2048;
    img.rc.ensure_covered(&mut img.io, far).expect("grow");
    assert!(img.rc.table_clusters() > 1);
    img.write(MIB, &[2; 5000]).expect("write");
    img.flush().expect("flush");
    assert_clean(&mut img);
    img.close().expect("close");
    let mut img = Qcow2::open(&path, &OpenOptions::read_only()).expect("reopen");
    let mut b = [0u8; 3];
    img.read(MIB + 4998, &mut b).expect("read");
    assert_eq!(b, [2, 2, 0]);
    assert_clean(&mut img);
}

#[test]
fn backing_file_reads_and_copy_on_write() {
    let d = tmp();
    let base = d.path().join("base.raw");
    let pattern: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&base, &pattern).expect("base");
    let top = d.path().join("top.qcow2");
    let mut img = Qcow2::create(&top, 4 * MIB, 65536, Some(&base)).expect("create");
    assert_eq!(img.backing().map(|b| b.format()), Some("raw"));
    assert!(read_all(&mut img) == pattern);
    let mut model = pattern.clone();
    img.write(100_000, &[9; 10]).expect("write");
    model[100_000..100_010].fill(9);
    img.discard(2 * MIB, MIB).expect("discard");
    model[2 * MIB as usize..3 * MIB as usize].fill(0);
    assert!(read_all(&mut img) == model);
    img.close().expect("close");
    // A qcow2 layer on top of the qcow2 overlay.
    let top2 = d.path().join("top2.qcow2");
    let mut img2 = Qcow2::create(&top2, 4 * MIB, 4096, Some(&top)).expect("create");
    assert!(read_all(&mut img2) == model);
    assert_eq!(
        std::fs::read(&base).expect("base"),
        pattern,
        "base untouched"
    );
}

// ---- hostile images ----

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open raw");
    f.write_all_at(bytes, at).expect("patch");
}

fn fresh(d: &tempfile::TempDir, name: &str) -> PathBuf {
    let path = d.path().join(name);
    let mut img = Qcow2::create(&path, 8 * MIB, 65536, None).expect("create");
    img.write(0, &[1; 4096]).expect("write");
    img.close().expect("close");
    path
}

fn open_err(path: &Path) -> String {
    Qcow2::open(path, &OpenOptions::default())
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn hostile_metadata_is_refused() {
    let d = tmp();
    let cs = 65536u64;
    let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
        // (name, offset, bytes, expected message part)
        (
            "l1-past-eof",
            40,
            (1u64 << 40).to_be_bytes().to_vec(),
            "L1 table",
        ),
        (
            "l1-unaligned",
            40,
            (3 * cs + 8).to_be_bytes().to_vec(),
            "L1 table offset",
        ),
        (
            "l1-absurd",
            36,
            u32::MAX.to_be_bytes().to_vec(),
            "L1 table of",
        ),
        ("l1-too-small", 36, 0u32.to_be_bytes().to_vec(), "needed"),
        (
            "reftable-past-eof",
            48,
            (1u64 << 40).to_be_bytes().to_vec(),
            "past the end",
        ),
        (
            "reftable-unaligned",
            48,
            (cs + 512).to_be_bytes().to_vec(),
            "refcount table",
        ),
        (
            "reftable-huge",
            56,
            100_000u32.to_be_bytes().to_vec(),
            "refcount table of",
        ),
        // A refcount table entry pointing past EOF, at the header, at the table itself.
        (
            "refblock-past-eof",
            cs,
            (1u64 << 40).to_be_bytes().to_vec(),
            "past the end",
        ),
        (
            "refblock-header",
            cs,
            0x200u64.to_be_bytes().to_vec(),
            "refcount block 0",
        ),
        (
            "refblock-loop",
            cs,
            cs.to_be_bytes().to_vec(),
            "overlaps the refcount table",
        ),
        (
            "refblock-dup",
            cs + 8,
            (2 * cs).to_be_bytes().to_vec(),
            "two refcount table",
        ),
        (
            "refblock-on-l1",
            cs,
            (3 * cs).to_be_bytes().to_vec(),
            "overlaps the L1 table",
        ),
        (
            "l1-on-reftable",
            40,
            cs.to_be_bytes().to_vec(),
            "overlaps the refcount table",
        ),
        // An L1 entry pointing at the header / past EOF / unaligned.
        (
            "l2-on-reftable",
            3 * cs,
            ((1u64 << 63) | cs).to_be_bytes().to_vec(),
            "L2 table",
        ),
        (
            "l2-on-l1",
            3 * cs,
            (3 * cs).to_be_bytes().to_vec(),
            "L2 table",
        ),
        (
            "l2-past-eof",
            3 * cs,
            (1u64 << 45).to_be_bytes().to_vec(),
            "L2 table",
        ),
        (
            "l2-unaligned",
            3 * cs,
            (5 * cs + 512).to_be_bytes().to_vec(),
            "L2 table",
        ),
        (
            "snapshots-absurd",
            60,
            1_000_000u32.to_be_bytes().to_vec(),
            "snapshots",
        ),
        (
            "snapshots-past-eof",
            60,
            1u32.to_be_bytes().to_vec(),
            "snapshot table",
        ),
    ];
    for (name, at, bytes, want) in cases {
        let path = fresh(&d, &format!("{name}.qcow2"));
        if name == "snapshots-past-eof" {
            patch(&path, 64, &(1u64 << 40).to_be_bytes());
        }
        patch(&path, at, &bytes);
        let err = open_err(&path);
        assert!(err.contains(want), "{name}: {err}");
        assert!(
            err.contains(&format!("{name}.qcow2")),
            "{name}: error names the file"
        );
    }
}

#[test]
fn hostile_snapshot_entry() {
    let d = tmp();
    let path = fresh(&d, "snap.qcow2");
    let mut img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
    img.create_snapshot("s").expect("snapshot");
    let table = img.header().snapshots_offset;
    img.close().expect("close");
    // extra_data_size far beyond the limit.
    patch(&path, table + 36, &0x10_0000u32.to_be_bytes());
    assert!(open_err(&path).contains("extra data"));
    patch(&path, table + 36, &16u32.to_be_bytes());
    // An absurd L1 size in the snapshot.
    patch(&path, table + 8, &u32::MAX.to_be_bytes());
    assert!(open_err(&path).contains("L1 table of"));
}

#[test]
fn data_cluster_past_eof_is_an_error_not_a_panic() {
    let d = tmp();
    let path = fresh(&d, "data.qcow2");
    let img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
    let l2 = img.l1[0] & OFFSET_MASK;
    img.close().expect("close");
    patch(&path, l2, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    let mut img = Qcow2::open(&path, &OpenOptions::read_only()).expect("open");
    let mut b = [0u8; 16];
    let err = img.read(0, &mut b).expect_err("refused").to_string();
    assert!(err.contains("past the end"), "{err}");
    let r = img.check(false, &mut |_, _| {}).expect("check runs");
    assert!(r.corruptions_remaining(), "{r:?}");
    // Compressed clusters are refused by name.
    let path = fresh(&d, "compressed.qcow2");
    patch(&path, l2, &((1u64 << 62) | (5 * 65536)).to_be_bytes());
    let mut img = Qcow2::open(&path, &OpenOptions::read_only()).expect("open");
    let err = img.read(0, &mut b).expect_err("refused").to_string();
    assert!(err.contains("compressed"), "{err}");
}

#[test]
fn backing_chain_loops_and_depth_are_refused() {
    let d = tmp();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![0u8; MIB as usize]).expect("base");
    Qcow2::create(&a, MIB, 65536, Some(&base))
        .expect("a")
        .close()
        .expect("close");
    Qcow2::create(&b, MIB, 65536, Some(&a))
        .expect("b")
        .close()
        .expect("close");
    // Point a's backing name ("…/base.raw") at b: same length needed, so rename b.
    let a_hdr = Qcow2::open(&a, &OpenOptions::read_only()).expect("a");
    let name = a_hdr.header().backing_file.clone().expect("name");
    drop(a_hdr);
    let loop_target = d
        .path()
        .join("b".repeat(name.len() - d.path().to_string_lossy().len() - 1));
    std::fs::rename(&b, &loop_target).expect("rename");
    let mut first = vec![0u8; 65536];
    std::fs::File::open(&a)
        .expect("a")
        .read_exact_at(&mut first, 0)
        .expect("read");
    let pos = first
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .expect("name in header");
    patch(&a, pos as u64, loop_target.to_string_lossy().as_bytes());
    // a's format extension says raw; make it qcow2 ("raw" -> "qcow2" does not fit), so
    // drop the extension by probing instead: overwrite its type with an unknown one.
    let fmt_pos = first
        .windows(4)
        .position(|w| w == header::EXT_BACKING_FORMAT.to_be_bytes())
        .expect("format extension");
    patch(&a, fmt_pos as u64, &0x7777_7777u32.to_be_bytes());
    let err = open_err(&a);
    assert!(err.contains("loop"), "{err}");

    // Depth: a chain of 18 qcow2 images over a raw base.
    let mut prev = base.clone();
    for i in 0..18 {
        let p = d.path().join(format!("c{i}.qcow2"));
        match Qcow2::create(&p, MIB, 65536, Some(&prev)) {
            Ok(img) => img.close().expect("close"),
            Err(e) => {
                assert!(i >= 15, "chain refused too early at {i}: {e}");
                assert!(e.to_string().contains("deeper"), "{e}");
                return;
            }
        }
        prev = p;
    }
    panic!("a chain of 18 images was accepted");
}

/// Make `path` (a fresh image of ours, no backing file) name `name` as its backing file,
/// with no format extension: what a hostile header looks like.
fn name_backing(path: &Path, name: &str) {
    const AT: u64 = 0x2000;
    patch(path, 8, &AT.to_be_bytes());
    patch(path, 16, &(name.len() as u32).to_be_bytes());
    patch(path, AT, name.as_bytes());
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Run `f` on another thread; fail if it does not return within 10 s (an open of a FIFO
/// without a writer blocks forever).
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: blocked for 10 s (opened a FIFO?)"))
}

#[test]
fn backing_files_outside_the_allowed_dirs_or_not_regular_are_refused() {
    let d = tmp();
    let vm = d.path().join("vm");
    let golden = d.path().join("golden");
    std::fs::create_dir_all(&vm).expect("mkdir");
    std::fs::create_dir_all(&golden).expect("mkdir");
    let secret = d.path().join("secret.raw");
    std::fs::write(&secret, vec![0x5e; MIB as usize]).expect("secret");
    std::os::unix::fs::symlink(&secret, vm.join("link.raw")).expect("symlink");
    mkfifo(&vm.join("pipe.raw"));
    let img = |n: &str| {
        let p = vm.join(n);
        Qcow2::create(&p, MIB, 65536, None)
            .expect("create")
            .close()
            .expect("close");
        p
    };
    let secret_abs = secret.to_str().expect("utf-8").to_string();
    for (n, name, needle) in [
        ("dotdot.qcow2", "../secret.raw", "outside"),
        ("absolute.qcow2", secret_abs.as_str(), "outside"),
        ("symlink.qcow2", "link.raw", "outside"),
        ("fifo.qcow2", "pipe.raw", "a FIFO"),
        ("zero.qcow2", "/dev/zero", "outside"),
        ("dir.qcow2", ".", "a directory"),
    ] {
        let p = img(n);
        name_backing(&p, name);
        let e = within_10s(name, move || {
            Qcow2::open(&p, &OpenOptions::read_only()).map(|_| ())
        })
        .expect_err(name)
        .to_string();
        assert!(e.contains(needle), "{name}: {e}");
    }
    // A device inside an allowed directory is still not a regular file.
    let p = img("zero-allowed.qcow2");
    name_backing(&p, "/dev/zero");
    let opts = OpenOptions {
        backing_dirs: vec!["/dev".into()],
        ..OpenOptions::read_only()
    };
    let e = Qcow2::open(&p, &opts).expect_err("device").to_string();
    assert!(e.contains("a character device"), "{e}");

    // Legitimate ones: relative in the same directory, and in an allowed extra one, by
    // absolute and by relative name.
    let pattern: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
    std::fs::write(vm.join("base.raw"), &pattern).expect("base");
    std::fs::write(golden.join("gold.raw"), &pattern).expect("gold");
    let gold_abs = golden.join("gold.raw").to_str().expect("utf-8").to_string();
    let with_golden = OpenOptions {
        backing_dirs: vec![golden.clone()],
        ..OpenOptions::read_only()
    };
    for (n, name, opts) in [
        ("same.qcow2", "base.raw", OpenOptions::read_only()),
        ("gold-abs.qcow2", gold_abs.as_str(), with_golden.clone()),
        ("gold-rel.qcow2", "../golden/gold.raw", with_golden.clone()),
    ] {
        let p = img(n);
        name_backing(&p, name);
        let mut q = Qcow2::open(&p, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(read_all(&mut q) == pattern, "{name}: reads the base");
    }
    let p = img("gold-denied.qcow2");
    name_backing(&p, &gold_abs);
    let e = Qcow2::open(&p, &OpenOptions::read_only())
        .expect_err("not allowed without the extra dir")
        .to_string();
    assert!(e.contains("--backing-dir"), "{e}");
    // Creating a clone checks the same way.
    let e = Qcow2::create(&vm.join("new.qcow2"), MIB, 65536, Some(&secret))
        .expect_err("create over a base outside")
        .to_string();
    assert!(e.contains("outside"), "{e}");
    Qcow2::create_with(
        &vm.join("new.qcow2"),
        MIB,
        65536,
        Some(&golden.join("gold.raw")),
        std::slice::from_ref(&golden),
    )
    .expect("create over an allowed base");
}

/// A probed image (`--format auto`) that names a backing file is refused before the name
/// is even resolved: a FIFO there would block the open, a regular file would be read.
#[test]
fn probed_images_naming_a_backing_file_are_refused_unopened() {
    let d = tmp();
    mkfifo(&d.path().join("pipe.raw"));
    std::fs::write(d.path().join("base.raw"), vec![1u8; MIB as usize]).expect("base");
    let probed = OpenOptions {
        format_probed: true,
        ..OpenOptions::default()
    };
    for name in ["pipe.raw", "base.raw"] {
        let p = fresh(&d, &format!("{name}.qcow2"));
        name_backing(&p, name);
        let opts = probed.clone();
        let e = within_10s(name, move || Qcow2::open(&p, &opts).map(|_| ()))
            .expect_err(name)
            .to_string();
        assert!(
            e.contains("--format qcow2") && e.contains(name),
            "{name}: {e}"
        );
    }
    // Without a backing file, a probed qcow2 image opens.
    let p = fresh(&d, "plain.qcow2");
    Qcow2::open(&p, &probed).expect("probed, no backing file");
}

#[test]
fn dirty_bit_is_repaired_on_writable_open() {
    let d = tmp();
    let path = fresh(&d, "dirty.qcow2");
    // Set the dirty bit and leak a refcount, as a crash under lazy refcounts could.
    patch(&path, 79, &[1]);
    let ro = Qcow2::open(&path, &OpenOptions::read_only()).expect("read-only open");
    assert!(ro.is_dirty());
    drop(ro);
    let mut img = Qcow2::open(&path, &OpenOptions::default()).expect("writable open");
    assert!(!img.is_dirty());
    assert_clean(&mut img);
}

/// A guest cluster mapped (COPIED, so in place) onto the image's own refcount table, L1
/// table or a cached L2 table: the write is refused and the metadata stays intact. (An
/// entry pointing at offset 0, the header, reads as unallocated.)
#[test]
fn writes_onto_metadata_are_refused() {
    let d = tmp();
    let path = fresh(&d, "overlap.qcow2");
    let img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
    let (l1, l2) = (img.header.l1_table_offset, img.l1[0] & OFFSET_MASK);
    let rt = img.header.refcount_table_offset;
    img.close().expect("close");
    for (what, target) in [("refcount table", rt), ("L1 table", l1), ("L2 table", l2)] {
        // Guest cluster 1's entry, second in the L2 table.
        patch(&path, l2 + 8, &(COPIED | target).to_be_bytes());
        let before = std::fs::read(&path).expect("read");
        let mut img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
        let err = img
            .write(65536, &[0xee; 512])
            .expect_err("must not write over metadata")
            .to_string();
        assert!(err.contains("own metadata"), "{what}: {err}");
        drop(img);
        let after = std::fs::read(&path).expect("read");
        assert_eq!(
            &before[target as usize..target as usize + 512],
            &after[target as usize..target as usize + 512],
            "{what} unchanged"
        );
        patch(&path, l2 + 8, &0u64.to_be_bytes());
    }
}

/// A new refcount block's table entry reaches the file only at the next writeback, after
/// a sync (one for all the blocks created since), so no entry on disk points at a block
/// that may not be on disk yet.
#[test]
fn new_refcount_blocks_are_entered_in_the_table_at_writeback() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 64 * MIB, 4096, None).expect("create");
    // 4 KiB clusters: a refcount block covers 2048 clusters (8 MiB of file).
    let far = 3 * 2048 + 5;
    img.rc.ensure_covered(&mut img.io, far).expect("cover");
    let entry_on_disk = |img: &Qcow2| {
        let f = std::fs::File::open(&path).expect("open raw");
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, img.rc.table_offset() + 3 * 8)
            .expect("read table");
        u64::from_be_bytes(e)
    };
    assert_eq!(entry_on_disk(&img), 0, "written before a sync");
    let syncs = img.io.syncs();
    img.rc.writeback(&mut img.io).expect("writeback");
    assert_eq!(img.io.syncs(), syncs + 1, "one sync before the entries");
    assert_eq!(entry_on_disk(&img), 3 * 2048 * 4096);
    img.close().expect("close");
    let mut img = Qcow2::open(&path, &OpenOptions::default()).expect("reopen");
    assert_clean(&mut img);
}

/// Peak resident memory of this process (each test runs in its own under nextest).
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

/// Before: `check` read every snapshot's L1 table into memory before walking any, so an
/// image whose snapshots each claim a 32 MiB L1 table in a sparse file took 32 MiB per
/// snapshot at once (and a hostile one with 65536 of them, 2 TiB). Now one at a time.
#[test]
fn checking_a_sparse_image_with_huge_snapshot_tables_stays_small() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 4 * MIB, 4096, None).expect("create");
    const SNAPS: u64 = 48;
    for i in 0..SNAPS {
        img.create_snapshot(&format!("s{i:02}")).expect("snapshot");
    }
    let table = img.header.snapshots_offset;
    img.close().expect("close");
    // Point every snapshot at its own 32 MiB L1 table, in holes past the end of the file.
    let l1_bytes = MAX_L1_ENTRIES * 8;
    let base = 64 * MIB;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open raw");
    f.set_len(base + SNAPS * l1_bytes).expect("extend");
    let mut at = table;
    for i in 0..SNAPS {
        let mut fixed = [0u8; 40];
        f.read_exact_at(&mut fixed, at).expect("entry");
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra = u64::from(u32::from_be_bytes([
            fixed[36], fixed[37], fixed[38], fixed[39],
        ]));
        f.write_all_at(&(base + i * l1_bytes).to_be_bytes(), at)
            .expect("l1 offset");
        f.write_all_at(&(MAX_L1_ENTRIES as u32).to_be_bytes(), at + 8)
            .expect("l1 size");
        at += (40 + extra + id_len + name_len).next_multiple_of(8);
    }
    drop(f);
    let mut img = Qcow2::open(&path, &OpenOptions::read_only()).expect("open");
    let before = peak_rss_bytes();
    let r = img.check(false, &mut |_, _| {}).expect("check");
    let grew = peak_rss_bytes().saturating_sub(before);
    // The tables are holes: nothing is referenced from them, but the L1 clusters are
    // unaccounted for in the refcounts.
    assert!(r.refcount_errors > 0, "{r:?}");
    assert!(
        grew < 256 * MIB,
        "check grew the peak RSS by {} MiB",
        grew / MIB
    );
}

/// A cluster a read pins while it is freed is neither reused nor punched until the read
/// is done; after that it is the allocator's again, even though allocations passed over
/// it meanwhile.
#[test]
fn a_pinned_free_cluster_comes_back_after_its_read() {
    let d = tmp();
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 4 * MIB, 4096, None).expect("create");
    let host_of = |img: &mut Qcow2, off: u64| match img.map(off, 4096).expect("map").kind {
        ExtentKind::Data { host_offset, .. } => host_offset,
        other => panic!("not allocated: {other:?}"),
    };
    img.write(0, &[7u8; 4096]).expect("write");
    let h = host_of(&mut img, 0);
    let mut pins = None;
    img.pin_read(h, 4096, &mut pins);
    img.discard(0, 4096).expect("discard");
    img.flush().expect("flush frees it");
    img.write(4096, &[8u8; 4096]).expect("write");
    assert_ne!(
        host_of(&mut img, 4096),
        h,
        "a pinned cluster is not handed out"
    );
    let mut back = [0u8; 4096];
    img.io
        .read_data(h, &mut back)
        .expect("read the pinned cluster");
    assert_eq!(back, [7u8; 4096], "nor punched");
    drop(pins);
    img.flush().expect("flush");
    img.write(8192, &[9u8; 4096]).expect("write");
    assert_eq!(host_of(&mut img, 8192), h, "reused once the read is done");
    img.close().expect("close");
}
