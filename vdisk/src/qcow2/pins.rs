//! Clusters that planned reads have yet to read.
//!
//! A qcow2 read is mapped under the image's lock and done afterwards by the queue's
//! engine, without it. Meanwhile a discard, an overwrite that dedupe or copy-on-write
//! sends elsewhere, or a snapshot deletion can drop the cluster's last reference, and an
//! allocation can hand it to another guest offset (or the hole punch can zero it): the
//! read would return bytes that were never at its offset. So a read pins the clusters it
//! maps until it is done ([`ReadPins`] unpins when dropped); the allocator passes over
//! pinned clusters, and a cluster freed while pinned has its hole punched only once its
//! last pin is gone ([`Pins::take_unpinned_frees`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A run of clusters, first and last.
type Run = (u64, u64);

#[derive(Debug, Default)]
struct State {
    /// Pins per run of clusters: one per extent a read maps, however long, so a read of
    /// a GiB costs what a read of a page does.
    runs: HashMap<Run, u32>,
    /// Clusters freed while pinned: still to punch, and not to reuse until then.
    freed: HashSet<u64>,
}

impl State {
    fn pinned(&self, cluster: u64) -> bool {
        self.runs.keys().any(|&(a, b)| a <= cluster && cluster <= b)
    }
}

#[derive(Debug, Default)]
pub struct Pins {
    state: Mutex<State>,
    /// Entries in `runs` and `freed` together: lets the allocator skip the lock when
    /// nothing is pinned.
    entries: AtomicUsize,
}

impl Pins {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            // The state is a few counters; a panic elsewhere cannot leave them torn.
            Err(p) => p.into_inner(),
        }
    }

    fn recount(&self, s: &State) {
        self.entries
            .store(s.runs.len() + s.freed.len(), Ordering::Release);
    }

    fn add(&self, run: Run) {
        let mut s = self.lock();
        *s.runs.entry(run).or_insert(0) += 1;
        self.recount(&s);
    }

    /// Pin clusters `first..=last` (a read is about to read them) until the returned
    /// guard drops.
    pub fn pin(self: &Arc<Self>, first: u64, last: u64) -> ReadPins {
        self.add((first, last));
        ReadPins {
            pins: self.clone(),
            runs: vec![(first, last)],
        }
    }

    fn unpin(&self, runs: &[Run]) {
        let mut s = self.lock();
        for r in runs {
            if let Some(n) = s.runs.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    s.runs.remove(r);
                }
            }
        }
        self.recount(&s);
    }

    /// Whether the allocator must pass over `cluster` (whose refcount is 0): a read
    /// still has to read it, or its hole is still to punch.
    pub fn blocks(&self, cluster: u64) -> bool {
        if self.entries.load(Ordering::Acquire) == 0 {
            return false;
        }
        let s = self.lock();
        s.freed.contains(&cluster) || s.pinned(cluster)
    }

    /// Of `freed` (clusters whose refcount just reached 0), those free to punch now; the
    /// pinned ones are kept back until their last read is done.
    pub fn release(&self, freed: &[u64]) -> Vec<u64> {
        if self.entries.load(Ordering::Acquire) == 0 {
            return freed.to_vec();
        }
        let mut s = self.lock();
        let mut now = Vec::with_capacity(freed.len());
        for &c in freed {
            if s.pinned(c) {
                s.freed.insert(c);
            } else {
                now.push(c);
            }
        }
        self.recount(&s);
        now
    }

    /// Clusters freed while pinned whose pins are all gone: punch them, and they are
    /// the allocator's again.
    pub fn take_unpinned_frees(&self) -> Vec<u64> {
        if self.entries.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut s = self.lock();
        if s.freed.is_empty() {
            return Vec::new();
        }
        let done: Vec<u64> = s.freed.iter().copied().filter(|&c| !s.pinned(c)).collect();
        for c in &done {
            s.freed.remove(c);
        }
        self.recount(&s);
        done
    }

    /// Runs of clusters pinned now.
    #[cfg(test)]
    pub fn pinned(&self) -> usize {
        self.lock().runs.len()
    }
}

/// The pins of one planned read; dropping it (the read is done, failed, or was never
/// submitted) unpins.
#[derive(Debug)]
pub struct ReadPins {
    pins: Arc<Pins>,
    runs: Vec<Run>,
}

impl ReadPins {
    /// Pin clusters `first..=last` too, for the same read.
    pub fn add(&mut self, first: u64, last: u64) {
        self.pins.add((first, last));
        self.runs.push((first, last));
    }
}

impl Drop for ReadPins {
    fn drop(&mut self) {
        self.pins.unpin(&self.runs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_pinned_cluster_waits_for_its_last_read() {
        let pins = Arc::new(Pins::default());
        assert!(!pins.blocks(5));
        let a = pins.pin(5, 6);
        let b = pins.pin(5, 5);
        assert!(pins.blocks(5) && pins.blocks(6) && !pins.blocks(7));
        assert_eq!(pins.release(&[5, 7]), vec![7], "5 is pinned, 7 is not");
        assert!(pins.take_unpinned_frees().is_empty());
        drop(a);
        assert!(pins.blocks(5), "b still reads 5");
        assert!(!pins.blocks(6));
        drop(b);
        assert!(pins.blocks(5), "freed, not punched yet");
        assert_eq!(pins.take_unpinned_frees(), vec![5]);
        assert!(!pins.blocks(5));
        assert_eq!(pins.entries.load(Ordering::Relaxed), 0);
        assert_eq!(pins.pinned(), 0);
    }
}
