//! Crash consistency, point by point: an operation runs once with every change to the
//! file recorded ([`Journaled`]); then every state a kill -9 (or a power cut) could leave
//! is rebuilt and checked. A crash after change `k` leaves everything up to the last sync
//! before `k` on disk, and any subset of the changes after that sync (each 4 KiB page of
//! each write on its own: the page cache writes pages back in any order).
//!
//! Each state must open, read as before or after the operation, pass `check` with no
//! refcount below its references, no structural corruption and no COPIED flag on a
//! shared cluster, keep every snapshot it lists intact after the guest overwrites the
//! whole disk, and give `qemu-img check` nothing worse than leaks and stale COPIED flags
//! (see [`qemu_check_allows`]).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::Path;

use rand::{Rng, SeedableRng};

use super::io::Journaled;
use super::*;

const CS: u64 = 4096;
const PAGE: u64 = 4096;

/// Random subsets of the unsynced changes tried at each point, besides none and all.
const SUBSETS: usize = 3;

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<u8>() | 1).collect()
}

fn read_all(img: &mut Qcow2) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read(0, &mut buf).expect("read");
    buf
}

fn apply(file: &mut Vec<u8>, op: &Journaled, keep: &mut dyn FnMut() -> bool) {
    match op {
        Journaled::Write { offset, data } => {
            let end = *offset as usize + data.len();
            let mut at = *offset;
            while at < end as u64 {
                let piece_end = ((at / PAGE + 1) * PAGE).min(end as u64);
                if keep() {
                    if file.len() < piece_end as usize {
                        file.resize(piece_end as usize, 0);
                    }
                    let (a, b) = ((at - offset) as usize, (piece_end - offset) as usize);
                    file[at as usize..piece_end as usize].copy_from_slice(&data[a..b]);
                }
                at = piece_end;
            }
        }
        Journaled::Punch { offset, len } => {
            if keep() {
                let a = (*offset as usize).min(file.len());
                let b = ((offset + len) as usize).min(file.len());
                file[a..b].fill(0);
            }
        }
        Journaled::Sync => {}
    }
}

/// Every distinct state a crash during `ops` can leave, starting from `base`.
fn crash_states(base: &[u8], ops: &[Journaled], seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut durable = base.to_vec();
    let mut synced = 0;
    for k in 0..=ops.len() {
        if k > 0 && matches!(ops[k - 1], Journaled::Sync) {
            for op in &ops[synced..k] {
                apply(&mut durable, op, &mut || true);
            }
            synced = k;
        }
        for variant in 0..SUBSETS + 2 {
            let mut state = durable.clone();
            for op in &ops[synced..k] {
                match variant {
                    0 => {}
                    1 => apply(&mut state, op, &mut || true),
                    _ => apply(&mut state, op, &mut || rng.random_bool(0.5)),
                }
            }
            let mut h = std::collections::hash_map::DefaultHasher::new();
            state.hash(&mut h);
            if seen.insert(h.finish()) {
                out.push((
                    format!("crash after change {k} of {}, variant {variant}", ops.len()),
                    state,
                ));
            }
        }
    }
    out
}

fn plain() -> OpenOptions {
    OpenOptions {
        // Tiny caches: tables go to disk (and to the journal) as often as they can.
        l2_cache_bytes: 0,
        refcount_cache_bytes: 0,
        ..OpenOptions::default()
    }
}

/// Run `op` on the image at `path` with the journal on; returns the file before and the
/// changes `op` made (a final flush included).
fn record(
    path: &Path,
    opts: &OpenOptions,
    op: impl FnOnce(&mut Qcow2),
) -> (Vec<u8>, Vec<Journaled>) {
    let base = std::fs::read(path).expect("read the image");
    let mut img = Qcow2::open(path, opts).expect("open");
    img.io.journal = Some(Vec::new());
    op(&mut img);
    img.flush().expect("flush");
    let ops = img.io.journal.take().expect("journal");
    drop(img);
    (base, ops)
}

/// What `qemu-img check` says of `path`, if it is installed: besides a clean image, only
/// leaks (exit 3) and COPIED flags that disagree with the stored refcount (exit 2, with
/// those lines only). A flag and a refcount live in different clusters, so a crash
/// between their updates leaves one of them stale whatever the order (QEMU's own updates
/// have the same window); the order makes sure the stale one is harmless: never a flag
/// set on a cluster that more than one path reaches, which `check`'s `copied_shared`
/// rules out in `verify_state`.
fn qemu_check_allows(path: &Path, what: &str) {
    let Ok(out) = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-img is missing in CI"
        );
        return;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) | Some(3) => {}
        Some(2) => {
            for line in text.lines().filter(|l| l.starts_with("ERROR")) {
                assert!(
                    line.starts_with("ERROR OFLAG_COPIED"),
                    "{what}: qemu-img check: {line}\n{text}"
                );
            }
        }
        other => panic!("{what}: qemu-img check exit {other:?}:\n{text}"),
    }
}

/// The checks every crash state gets. `active` lists what the disk may read as; `snap`
/// what snapshot "s" must read as, wherever the state lists it; `must_have_snap` whether
/// it must be listed.
fn verify_state(
    path: &Path,
    what: &str,
    active: &[&[u8]],
    snap: Option<&[u8]>,
    must_have_snap: bool,
) {
    qemu_check_allows(path, what);
    let mut img = Qcow2::open(path, &plain()).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let data = read_all(&mut img);
    assert!(
        active.iter().any(|a| *a == data),
        "{what}: the disk reads as neither before nor after"
    );
    let r = img.check(false, &mut |_, _| {}).expect("check");
    assert!(
        r.refcount_errors == 0 && r.corruptions.is_empty() && r.copied_shared == 0,
        "{what}: {r:?}"
    );
    let has_snap = img.list_snapshots().iter().any(|s| s.name == "s");
    assert!(has_snap || !must_have_snap, "{what}: snapshot s is gone");
    // The guest rewrites its whole disk: writes that go in place must not reach any
    // snapshot's clusters.
    let size = img.virtual_size();
    let fresh = pattern(0xf00d, size);
    img.write(0, &fresh).expect("overwrite");
    img.flush().expect("flush");
    assert_eq!(read_all(&mut img), fresh, "{what}: the overwrite");
    if has_snap {
        let want = snap.expect("test bug: a snapshot no reference describes");
        img.revert_snapshot("s").expect("revert");
        assert!(read_all(&mut img) == want, "{what}: snapshot s changed");
    }
    let r = img.check(false, &mut |_, _| {}).expect("check");
    assert!(
        r.refcount_errors == 0 && r.corruptions.is_empty() && r.copied_shared == 0,
        "{what}: after the overwrite: {r:?}"
    );
    img.close().expect("close");
}

/// Every crash state of `ops`, written to a scratch file and handed to `check`.
fn for_each_state(
    dir: &Path,
    base: &[u8],
    ops: &[Journaled],
    mut check: impl FnMut(&Path, &str),
) -> usize {
    let states = crash_states(base, ops, 7);
    let path = dir.join("crashed.qcow2");
    for (what, state) in &states {
        std::fs::write(&path, state).expect("write a crash state");
        check(&path, what);
    }
    states.len()
}

/// A 1 MiB image whose clusters are half written with `seed`'s data: the model.
fn image_with_data(path: &Path, seed: u64) -> Vec<u8> {
    let mut img = Qcow2::create(path, 256 * CS, CS, None).expect("create");
    let mut model = vec![0u8; (256 * CS) as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for c in 0..256u64 {
        if rng.random_bool(0.5) {
            let d = pattern(seed ^ c, CS);
            img.write(c * CS, &d).expect("write");
            model[(c * CS) as usize..((c + 1) * CS) as usize].copy_from_slice(&d);
        }
    }
    img.close().expect("close");
    model
}

/// Before: the snapshot table became durable before the active tree's COPIED flags were
/// cleared, so a crash between the two left flags that sent later writes in place, into
/// the snapshot's clusters.
#[test]
fn snapshot_create_survives_a_crash_anywhere() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let a = image_with_data(&path, 1);
    let (base, ops) = record(&path, &plain(), |img| {
        img.create_snapshot("s").expect("snapshot")
    });
    let n = for_each_state(d.path(), &base, &ops, |p, what| {
        verify_state(p, what, &[&a], Some(&a), false)
    });
    assert!(n > 4, "only {n} states");
}

#[test]
fn snapshot_delete_survives_a_crash_anywhere() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let a = image_with_data(&path, 2);
    let mut img = Qcow2::open(&path, &plain()).expect("open");
    img.create_snapshot("s").expect("snapshot");
    let b = pattern(3, 64 * CS);
    img.write(32 * CS, &b).expect("write");
    let after = read_all(&mut img);
    img.close().expect("close");
    let (base, ops) = record(&path, &plain(), |img| {
        img.delete_snapshot("s", &mut |_, _| {}).expect("delete")
    });
    let n = for_each_state(d.path(), &base, &ops, |p, what| {
        verify_state(p, what, &[&after], Some(&a), false)
    });
    assert!(n > 4, "only {n} states");
}

#[test]
fn snapshot_revert_survives_a_crash_anywhere() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let a = image_with_data(&path, 4);
    let mut img = Qcow2::open(&path, &plain()).expect("open");
    img.create_snapshot("s").expect("snapshot");
    img.write(100 * CS, &pattern(5, 80 * CS)).expect("write");
    let after = read_all(&mut img);
    img.close().expect("close");
    let (base, ops) = record(&path, &plain(), |img| {
        img.revert_snapshot("s").expect("revert")
    });
    let n = for_each_state(d.path(), &base, &ops, |p, what| {
        verify_state(p, what, &[&after, &a], Some(&a), true)
    });
    assert!(n > 4, "only {n} states");
}

/// Allocating writes that add L2 tables and grow the refcount structures, and discards
/// that free clusters a snapshot still holds and clusters nothing else does: each guest
/// cluster reads as before or after, whole.
#[test]
fn allocation_and_discard_survive_a_crash_anywhere() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    // 64 MiB: more clusters than one refcount block covers, L2 tables to add.
    let size = 16384 * CS;
    let mut img = Qcow2::create(&path, size, CS, None).expect("create");
    img.write(0, &pattern(6, 16 * CS)).expect("write");
    img.create_snapshot("s").expect("snapshot");
    let snap = read_all(&mut img);
    img.close().expect("close");
    let mut after = snap.clone();
    let writes: Vec<(u64, Vec<u8>)> = (0..12u64)
        .map(|i| ((i * 1361 + 3) % 16384 * CS, pattern(100 + i, CS)))
        .collect();
    let (base, ops) = record(&path, &plain(), |img| {
        for (off, data) in &writes {
            img.write(*off, data).expect("write");
        }
        img.discard(0, 8 * CS).expect("discard");
    });
    for (off, data) in &writes {
        after[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    after[..(8 * CS) as usize].fill(0);
    let n = for_each_state(d.path(), &base, &ops, |p, what| {
        qemu_check_allows(p, what);
        let mut img = Qcow2::open(p, &plain()).unwrap_or_else(|e| panic!("{what}: open: {e}"));
        let data = read_all(&mut img);
        for c in 0..size / CS {
            let r = (c * CS) as usize..((c + 1) * CS) as usize;
            assert!(
                data[r.clone()] == snap[r.clone()] || data[r.clone()] == after[r],
                "{what}: cluster {c} is neither before nor after"
            );
        }
        let r = img.check(false, &mut |_, _| {}).expect("check");
        assert!(
            r.refcount_errors == 0 && r.corruptions.is_empty() && r.copied_shared == 0,
            "{what}: {r:?}"
        );
        img.revert_snapshot("s").expect("revert");
        assert!(read_all(&mut img) == snap, "{what}: snapshot s changed");
        img.close().expect("close");
    });
    assert!(n > 4, "only {n} states");
}

/// Dedupe sharing a private cluster (a new shared copy, both entries remapped) and
/// unsharing it on overwrite: the two guest clusters never end up sharing bytes they
/// should not, and a write to one never shows in the other.
#[test]
fn dedupe_remaps_survive_a_crash_anywhere() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("a.qcow2");
    let mut img = Qcow2::create(&path, 256 * CS, CS, None).expect("create");
    img.enable_dedupe(1 << 16).expect("dedupe");
    let p = pattern(9, CS);
    img.write(0, &p).expect("write");
    img.close().expect("close");
    let (base, ops) = record(&path, &plain(), |img| {
        img.enable_dedupe(1 << 16).expect("dedupe");
        img.write(5 * CS, &p).expect("duplicate");
        img.write(9 * CS, &p).expect("duplicate");
        img.write(5 * CS, &pattern(10, CS))
            .expect("overwrite one copy");
    });
    let n = for_each_state(d.path(), &base, &ops, |path, what| {
        qemu_check_allows(path, what);
        let mut img = Qcow2::open(path, &plain()).unwrap_or_else(|e| panic!("{what}: open: {e}"));
        let data = read_all(&mut img);
        let cluster = |c: u64| &data[(c * CS) as usize..((c + 1) * CS) as usize];
        assert!(
            cluster(0) == p.as_slice(),
            "{what}: cluster 0 lost its data"
        );
        let zero = vec![0u8; CS as usize];
        for (c, may) in [
            (5, vec![zero.clone(), p.clone(), pattern(10, CS)]),
            (9, vec![zero, p.clone()]),
        ] {
            assert!(
                may.iter().any(|m| cluster(c) == m.as_slice()),
                "{what}: cluster {c}"
            );
        }
        let r = img.check(false, &mut |_, _| {}).expect("check");
        assert!(
            r.refcount_errors == 0 && r.corruptions.is_empty() && r.copied_shared == 0,
            "{what}: {r:?}"
        );
        // Distinct bytes everywhere: whatever was shared must come apart.
        for c in 0..256u64 {
            img.write(c * CS, &pattern(1000 + c, CS)).expect("write");
        }
        for c in 0..256u64 {
            let mut back = vec![0u8; CS as usize];
            img.read(c * CS, &mut back).expect("read");
            assert!(
                back == pattern(1000 + c, CS),
                "{what}: cluster {c} after the rewrite"
            );
        }
        img.close().expect("close");
    });
    assert!(n > 4, "only {n} states");
}
