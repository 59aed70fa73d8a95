//! Inline dedupe against a model: random sequences of unique, duplicate, zero and
//! partial writes, discards, snapshots (create, delete, revert) and reopens. After every
//! step the image reads as the model; every few steps and at the end `check` finds every
//! refcount equal to its references and every COPIED flag exact; at the end `qemu-img
//! check` is clean and QEMU's driver reads the same bytes (`qemu-img compare`).

mod util;

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use util::{ok, qemu_check, require, s};
use vdisk::qcow2::{DedupeStats, OpenOptions, Qcow2};

const CS: u64 = 4096;
const CLUSTERS: u64 = 256;
const SIZE: u64 = CS * CLUSTERS;
/// Distinct non-zero cluster contents the duplicate writes draw from.
const PATTERNS: u8 = 6;

fn pattern(k: u8) -> Vec<u8> {
    (0..CS)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(k) | 1)
        .collect()
}

fn opts(index_bytes: u64, tiny_caches: bool) -> OpenOptions {
    let mut o = OpenOptions {
        dedupe_index_bytes: index_bytes,
        ..OpenOptions::default()
    };
    if tiny_caches {
        o.l2_cache_bytes = 0;
        o.refcount_cache_bytes = 0;
    }
    o
}

fn assert_exact(img: &mut Qcow2, what: &str) {
    let r = img.check(false, &mut |_, _| {}).expect("check");
    assert!(
        r.leaks == 0 && r.refcount_errors == 0 && r.copied_errors == 0 && r.corruptions.is_empty(),
        "{what}: {r:?}"
    );
}

fn assert_reads(img: &mut Qcow2, model: &[u8], what: &str) {
    let mut buf = vec![0u8; model.len()];
    img.read(0, &mut buf).expect("read");
    if buf != model {
        let c = buf
            .chunks(CS as usize)
            .zip(model.chunks(CS as usize))
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!("{what}: guest cluster {c} differs from the model");
    }
}

struct Run {
    rng: StdRng,
    model: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
    next_snap: u32,
}

impl Run {
    fn cluster_data(&mut self) -> Vec<u8> {
        match self.rng.random_range(0..10) {
            0..=5 => pattern(self.rng.random_range(0..PATTERNS)),
            6..=7 => (0..CS).map(|_| self.rng.random()).collect(),
            _ => vec![0; CS as usize],
        }
    }

    /// One random operation on `img`, mirrored in the model. Returns a description.
    fn step(&mut self, img: &mut Qcow2) -> String {
        let op = self.rng.random_range(0..100);
        match op {
            0..=54 => {
                let n = if op < 45 {
                    1
                } else {
                    self.rng.random_range(2..=4)
                };
                let first = self.rng.random_range(0..=CLUSTERS - n);
                let mut data = Vec::new();
                for _ in 0..n {
                    let d = self.cluster_data();
                    data.extend_from_slice(&d);
                }
                let off = first * CS;
                img.write(off, &data).expect("write");
                self.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                format!("write {n} clusters at {first}")
            }
            55..=66 => {
                let len = self.rng.random_range(1..2 * CS);
                let off = self.rng.random_range(0..=SIZE - len);
                let data: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                img.write(off, &data).expect("partial write");
                self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
                format!("partial write {off}+{len}")
            }
            67..=76 => {
                let first = self.rng.random_range(0..CLUSTERS);
                let n = self.rng.random_range(1..=8).min(CLUSTERS - first);
                img.discard(first * CS, n * CS).expect("discard");
                let (a, b) = ((first * CS) as usize, ((first + n) * CS) as usize);
                self.model[a..b].fill(0);
                format!("discard {n} clusters at {first}")
            }
            77..=81 => {
                img.flush().expect("flush");
                "flush".into()
            }
            82..=86 if self.snaps.len() < 4 => {
                let name = format!("s{}", self.next_snap);
                self.next_snap += 1;
                img.create_snapshot(&name).expect("snapshot");
                self.snaps.push((name.clone(), self.model.clone()));
                format!("snapshot {name}")
            }
            87..=90 if !self.snaps.is_empty() => {
                let i = self.rng.random_range(0..self.snaps.len());
                let (name, _) = self.snaps.remove(i);
                img.delete_snapshot(&name, &mut |_, _| {})
                    .expect("delete snapshot");
                format!("delete snapshot {name}")
            }
            91..=93 if !self.snaps.is_empty() => {
                let i = self.rng.random_range(0..self.snaps.len());
                let (name, content) = self.snaps[i].clone();
                img.revert_snapshot(&name).expect("revert");
                self.model = content;
                format!("revert to {name}")
            }
            _ => "nothing".into(),
        }
    }
}

fn run_seed(dir: &Path, seed: u64, steps: usize, index_bytes: u64, tiny: bool) -> DedupeStats {
    let path = dir.join(format!("d{seed}.qcow2"));
    let mut img = Qcow2::create(&path, SIZE, CS, None).expect("create");
    img.enable_dedupe(index_bytes).expect("enable dedupe");
    img.close().expect("close");
    let o = opts(index_bytes, tiny);
    let mut img = Qcow2::open(&path, &o).expect("open");
    let mut run = Run {
        rng: StdRng::seed_from_u64(seed),
        model: vec![0; SIZE as usize],
        snaps: Vec::new(),
        next_snap: 0,
    };
    let mut total = DedupeStats::default();
    let add = |total: &mut DedupeStats, img: &Qcow2| {
        let s = img.dedupe_stats().expect("dedupe is on");
        total.hits += s.hits;
        total.misses += s.misses;
        total.zero_clusters += s.zero_clusters;
        total.relocations += s.relocations;
        total.verify_mismatches += s.verify_mismatches;
    };
    for i in 0..steps {
        let what = run.step(&mut img);
        let what = format!("seed {seed} step {i} ({what})");
        assert_reads(&mut img, &run.model, &what);
        if i % 25 == 24 {
            assert_exact(&mut img, &what);
        }
        if i % 100 == 99 {
            // A clean close keeps the index; the reopen rebuilds the shared map.
            add(&mut total, &img);
            img.close().expect("close");
            img = Qcow2::open(&path, &o).expect("reopen");
            assert_reads(&mut img, &run.model, &format!("{what}, reopened"));
        }
    }
    let st = img.dedupe_stats().expect("dedupe is on");
    assert!(
        st.physical_bytes <= st.logical_bytes,
        "seed {seed}: more stored than mapped: {st:?}"
    );
    add(&mut total, &img);
    assert_exact(&mut img, &format!("seed {seed} at the end"));
    img.close().expect("close");
    if require("qemu-img") {
        qemu_check(&path);
        let raw = dir.join(format!("d{seed}.raw"));
        std::fs::write(&raw, &run.model).expect("write model");
        ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", s(&path), s(&raw)],
        );
    }
    total
}

#[test]
fn random_operations_match_the_model() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut total = DedupeStats::default();
    for seed in 0..8 {
        // Small index budgets (a few buckets) for some seeds, so that it evicts; tiny
        // metadata caches for others, so that dirty tables are written back mid-way.
        let index_bytes = if seed % 2 == 0 { 1 << 20 } else { 256 };
        let t = run_seed(d.path(), seed, 500, index_bytes, seed % 3 == 1);
        total.hits += t.hits;
        total.misses += t.misses;
        total.zero_clusters += t.zero_clusters;
        total.relocations += t.relocations;
        total.verify_mismatches += t.verify_mismatches;
    }
    eprintln!("{total:?}");
    // The sequence must have exercised every path, or the test proves little.
    assert!(total.hits > 100, "{total:?}");
    assert!(total.misses > 100, "{total:?}");
    assert!(total.zero_clusters > 50, "{total:?}");
    assert!(total.relocations > 10, "{total:?}");
    assert!(total.verify_mismatches > 0, "{total:?}");
}

/// The same cluster written to many places is stored once; overwriting all but one
/// leaves that one with a private, COPIED cluster.
#[test]
fn duplicates_are_stored_once_and_unshared_when_overwritten() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, SIZE, CS, None).expect("create");
    img.enable_dedupe(1 << 20).expect("dedupe");
    let block = pattern(1);
    for c in 0..10 {
        img.write(c * CS, &block).expect("write");
    }
    img.flush().expect("flush");
    let s = img.dedupe_stats().expect("stats");
    assert_eq!((s.logical_bytes, s.physical_bytes), (10 * CS, CS), "{s:?}");
    assert_eq!((s.misses, s.hits), (1, 9), "{s:?}");
    assert_eq!(s.shared_clusters, 1);
    assert!((s.ratio() - 10.0).abs() < 1e-9);
    assert_exact(&mut img, "ten references");
    // Rewriting the same bytes in place changes nothing.
    img.write(3 * CS, &block).expect("rewrite");
    assert_eq!(img.dedupe_stats().expect("stats").hits, 10);
    for c in 0..9 {
        img.write(c * CS, &pattern(2 + c as u8 % 3))
            .expect("overwrite");
    }
    let s = img.dedupe_stats().expect("stats");
    assert_eq!(s.relocations, 1, "{s:?}");
    assert_exact(&mut img, "after the overwrites");
    // Zeros take no space.
    let before = img.dedupe_stats().expect("stats").physical_bytes;
    img.write(20 * CS, &vec![0; 4 * CS as usize])
        .expect("zeros");
    let s = img.dedupe_stats().expect("stats");
    assert_eq!((s.zero_clusters, s.physical_bytes), (4, before), "{s:?}");
    img.close().expect("close");
    if require("qemu-img") {
        qemu_check(&path);
    }
}

/// A candidate whose cluster was rewritten in place since it was indexed is not shared.
#[test]
fn stale_index_entries_are_never_shared() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, SIZE, CS, None).expect("create");
    img.enable_dedupe(1 << 20).expect("dedupe");
    let a = pattern(1);
    img.write(0, &a).expect("write");
    // A partial in-place write: the index still names cluster 0 for `a`.
    img.write(100, &[9u8; 10]).expect("partial");
    img.write(5 * CS, &a).expect("write again");
    let s = img.dedupe_stats().expect("stats");
    assert_eq!((s.hits, s.verify_mismatches), (0, 1), "{s:?}");
    let mut back = vec![0u8; CS as usize];
    img.read(0, &mut back).expect("read");
    assert_eq!(&back[100..110], &[9u8; 10]);
    img.read(5 * CS, &mut back).expect("read");
    assert_eq!(back, a);
    // Freed and reused: discard the copy, fill the disk with other data, look again.
    img.discard(5 * CS, CS).expect("discard");
    img.flush().expect("flush");
    for c in 6..40 {
        img.write(c * CS, &pattern(2 + (c % 4) as u8))
            .expect("write");
    }
    img.write(50 * CS, &a).expect("write a third time");
    img.read(50 * CS, &mut back).expect("read");
    assert_eq!(back, a);
    assert_exact(&mut img, "stale entries");
}

fn host_of(img: &mut Qcow2, cluster: u64) -> u64 {
    match img.map(cluster * CS, CS).expect("map").kind {
        vdisk::qcow2::ExtentKind::Data { host_offset, .. } => host_offset,
        other => panic!("guest cluster {cluster} is not data: {other:?}"),
    }
}

/// A shared cluster's bytes kept in memory go with its sharing: once it is freed and
/// reused, shared again with other bytes, a stale index entry that now leads to it must
/// not match the old bytes.
#[test]
fn a_reused_shared_cluster_is_compared_with_its_new_bytes() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, SIZE, CS, None).expect("create");
    img.enable_dedupe(1 << 20).expect("dedupe");
    let (a, b) = (pattern(1), pattern(2));
    img.write(0, &a).expect("a at 0");
    img.write(CS, &a).expect("a at 1: shared");
    let s1 = host_of(&mut img, 0);
    assert_eq!(host_of(&mut img, 1), s1);
    // The flush frees the cluster `a` was first written to; `b` takes it.
    img.flush().expect("flush");
    img.write(10 * CS, &b).expect("b at 10");
    // Unshare and free the cluster holding `a`.
    img.write(0, &pattern(3)).expect("overwrite 0");
    img.write(CS, &pattern(4)).expect("overwrite 1");
    img.flush().expect("flush");
    // The first duplicate of `b` takes the lowest free cluster: the one `a` was in.
    img.write(11 * CS, &b).expect("b at 11: shared");
    assert_eq!(
        host_of(&mut img, 11),
        s1,
        "the test needs the cluster reused"
    );
    // Guest cluster 30 is indexed as holding `a`, then shares the `b` cluster.
    img.write(30 * CS, &a).expect("a at 30");
    img.write(30 * CS, &b).expect("b at 30");
    assert_eq!(host_of(&mut img, 30), s1);
    img.write(40 * CS, &a).expect("a at 40");
    let mut back = vec![0u8; CS as usize];
    img.read(40 * CS, &mut back).expect("read");
    assert!(back == a, "guest cluster 40 reads another cluster's bytes");
    assert_exact(&mut img, "after the reuse");
}
