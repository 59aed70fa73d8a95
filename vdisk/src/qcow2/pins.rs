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

#[derive(Debug, Default)]
struct State {
    /// Pins per host cluster.
    counts: HashMap<u64, u32>,
    /// Clusters freed while pinned: still to punch, and not to reuse until then.
    freed: HashSet<u64>,
}

#[derive(Debug, Default)]
pub struct Pins {
    state: Mutex<State>,
    /// Entries in `counts` and `freed` together: lets the allocator skip the lock when
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
            .store(s.counts.len() + s.freed.len(), Ordering::Release);
    }

    /// Pin `clusters` (a read is about to read them) until the returned guard drops.
    pub fn pin(self: &Arc<Self>, clusters: impl Iterator<Item = u64>) -> ReadPins {
        let list: Vec<u64> = clusters.collect();
        let mut s = self.lock();
        for &c in &list {
            *s.counts.entry(c).or_insert(0) += 1;
        }
        self.recount(&s);
        drop(s);
        ReadPins {
            pins: self.clone(),
            clusters: list,
        }
    }

    fn unpin(&self, clusters: &[u64]) {
        let mut s = self.lock();
        for c in clusters {
            if let Some(n) = s.counts.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    s.counts.remove(c);
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
        s.counts.contains_key(&cluster) || s.freed.contains(&cluster)
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
            if s.counts.contains_key(&c) {
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
        let State { counts, freed } = &mut *s;
        let done: Vec<u64> = freed
            .iter()
            .copied()
            .filter(|c| !counts.contains_key(c))
            .collect();
        for c in &done {
            freed.remove(c);
        }
        self.recount(&s);
        done
    }

    /// Clusters pinned now.
    #[cfg(test)]
    pub fn pinned(&self) -> usize {
        self.lock().counts.len()
    }
}

/// The pins of one planned read; dropping it (the read is done, failed, or was never
/// submitted) unpins.
#[derive(Debug)]
pub struct ReadPins {
    pins: Arc<Pins>,
    clusters: Vec<u64>,
}

impl ReadPins {
    /// Pin more clusters for the same read.
    pub fn add(&mut self, clusters: impl Iterator<Item = u64>) {
        let start = self.clusters.len();
        self.clusters.extend(clusters);
        let mut s = self.pins.lock();
        for &c in &self.clusters[start..] {
            *s.counts.entry(c).or_insert(0) += 1;
        }
        self.pins.recount(&s);
    }
}

impl Drop for ReadPins {
    fn drop(&mut self) {
        self.pins.unpin(&self.clusters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_pinned_cluster_waits_for_its_last_read() {
        let pins = Arc::new(Pins::default());
        assert!(!pins.blocks(5));
        let a = pins.pin([5, 6].into_iter());
        let b = pins.pin([5].into_iter());
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
