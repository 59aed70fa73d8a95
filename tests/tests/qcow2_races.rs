//! Requests racing on the same blocks of a qcow2 image from several queues at once, with a
//! real vhost-user client (libblkio): reads are mapped under the image's lock and done by
//! io_uring after it, so a discard, an overwrite or a dedupe remap on another queue, and
//! the flush that frees the old cluster for reuse, can come in between. A read must still
//! return bytes that were at its offset at some point: never another block's.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::blk::{BatchOp, Blk, Options};
use e2e::crash::{content, dup_content, identify, Rng, DUP_BASE, ZEROES};
use e2e::Daemon;

const BLOCK: usize = 4096;
/// The blocks every queue works on: few, so that the queues collide all the time.
const HOT: u64 = 12;
const QUEUES: usize = 4;
const BATCH: usize = 8;
const DUPS: u64 = 3;

/// Everything each block ever held (or may hold: recorded before the write is issued).
struct History {
    seen: Mutex<HashMap<u64, HashSet<u64>>>,
    generation: Mutex<u64>,
}

impl History {
    fn record(&self, offset: u64, what: u64) {
        let mut seen = self.seen.lock().expect("history");
        seen.entry(offset).or_default().insert(what);
    }

    fn next_generation(&self) -> u64 {
        let mut g = self.generation.lock().expect("generation");
        *g += 1;
        *g
    }

    /// Whether `data`, read at `offset` while writes to it were in flight, is made of
    /// pieces of what the block held: a read racing a write to the same block may see
    /// part of each (the device promises nothing for overlapping requests), but every
    /// 8-byte word must come from a write to this block, never from another's.
    fn torn_from_held(&self, offset: u64, data: &[u8]) -> bool {
        let seen = self.seen.lock().expect("history");
        let Some(held) = seen.get(&offset) else {
            return false;
        };
        let candidates: Vec<Vec<u8>> = held
            .iter()
            .map(|&w| match w {
                w if w >= DUP_BASE => dup_content(w - DUP_BASE, BLOCK),
                g => content(offset, g, BLOCK),
            })
            .chain(std::iter::once(vec![0u8; BLOCK]))
            .collect();
        data.chunks(8).enumerate().all(|(i, word)| {
            candidates
                .iter()
                .any(|c| &c[i * 8..i * 8 + word.len()] == word)
        })
    }

    fn held(&self, offset: u64, what: u64) -> bool {
        what == ZEROES
            || self
                .seen
                .lock()
                .expect("history")
                .get(&offset)
                .is_some_and(|s| s.contains(&what))
    }
}

/// Before: a read could come back with the bytes of another block, written into the
/// cluster a discard or a remap had freed while the read waited for io_uring.
#[test]
fn reads_racing_frees_and_remaps_return_only_their_own_blocks() {
    if !e2e::require(
        "qemu-img (package qemu-utils)",
        e2e::have_program("qemu-img"),
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    let status = Command::new(e2e::bin("vdisk"))
        .args(["image", "create", "--size", "16M", "--dedupe"])
        .arg(&image)
        .status()
        .expect("run vdisk image create");
    assert!(status.success());
    let socket = dir.path().join("vdisk.sock");
    let queues = QUEUES.to_string();
    let daemon = Daemon::vdisk(&image, &socket, &["--num-queues", &queues]);
    let mut blk = Blk::connect(
        &socket,
        &Options {
            num_queues: QUEUES,
            ..Options::default()
        },
    )
    .expect("connect");
    let history = History {
        seen: Mutex::new(HashMap::new()),
        generation: Mutex::new(0),
    };
    for p in 0..DUPS {
        for b in 0..HOT {
            history.record(b * BLOCK as u64, DUP_BASE + p);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(6);
    let bad = Mutex::new(Vec::<String>::new());
    let reads = Mutex::new(0u64);
    let torn = Mutex::new(0u64);
    std::thread::scope(|s| {
        for (qi, mut q) in blk.queues().into_iter().enumerate() {
            let (history, bad, reads, torn) = (&history, &bad, &reads, &torn);
            s.spawn(move || {
                let mut rng = Rng::new(0x5eed + qi as u64);
                while Instant::now() < deadline {
                    let ops: Vec<BatchOp> = (0..BATCH)
                        .map(|_| {
                            let offset = rng.below(HOT) * BLOCK as u64;
                            match rng.below(16) {
                                0..=6 => BatchOp::Read { offset, len: BLOCK },
                                7..=9 => {
                                    let g = history.next_generation();
                                    history.record(offset, g);
                                    BatchOp::Write {
                                        offset,
                                        data: content(offset, g, BLOCK),
                                    }
                                }
                                10..=12 => BatchOp::Write {
                                    offset,
                                    data: dup_content(rng.below(DUPS), BLOCK),
                                },
                                13..=14 => BatchOp::Discard {
                                    offset,
                                    len: BLOCK as u64,
                                },
                                _ => BatchOp::Flush,
                            }
                        })
                        .collect();
                    let results = q.batch(&ops);
                    for (op, r) in ops.iter().zip(results) {
                        let data = match r {
                            Ok(d) => d,
                            Err(e) => {
                                bad.lock().expect("bad").push(format!("{op:?}: {e}"));
                                continue;
                            }
                        };
                        let BatchOp::Read { offset, .. } = op else {
                            continue;
                        };
                        *reads.lock().expect("reads") += 1;
                        match identify(*offset, &data) {
                            Ok(what) if history.held(*offset, what) => {}
                            Ok(what) => bad
                                .lock()
                                .expect("bad")
                                .push(format!("block {offset:#x}: {what:#x}, never written there")),
                            Err(_) if history.torn_from_held(*offset, &data) => {
                                *torn.lock().expect("torn") += 1;
                            }
                            Err(e) => bad.lock().expect("bad").push(e),
                        }
                    }
                }
            });
        }
    });
    let bad = bad.into_inner().expect("bad");
    let reads = reads.into_inner().expect("reads");
    eprintln!(
        "{reads} reads; {} saw a racing write to their own block in part",
        torn.into_inner().expect("torn")
    );
    assert!(
        bad.is_empty(),
        "{} of {reads} reads were wrong; the first: {:#?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(reads > 1000, "only {reads} reads");
    drop(blk);
    assert!(daemon.terminate().success(), "vdisk exit status");
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&image)
        .output()
        .expect("qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
