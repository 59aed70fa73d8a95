//! A bounded write-back cache of cluster-sized metadata tables (L2 tables as `u64`
//! entries, refcount blocks as `u16` entries), keyed by the table's host offset.
//!
//! The cache knows nothing about I/O or ordering: when it is full, [`MetaCache::evict`]
//! hands the caller the victim, and the caller writes it back in the order the on-disk
//! rules demand (for L2 tables: refcounts and data made durable first). Clean tables are
//! evicted before dirty ones so that eviction rarely costs a write or a sync; among equals
//! the least recently used goes first.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// Keys are table offsets or cluster numbers in the image file, looked up on every
/// request: one folded multiply hashes them, where SipHash cost more than the rest of the
/// lookup. They come from the image: offsets crafted to collide would cost lookup time,
/// never a wrong answer.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct OffsetHash;

pub(super) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let full = u128::from(x) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (full as u64) ^ (full >> 64) as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl BuildHasher for OffsetHash {
    type Hasher = OffsetHasher;

    fn build_hasher(&self) -> OffsetHasher {
        OffsetHasher(0)
    }
}

#[derive(Debug)]
struct Slot<T> {
    offset: u64,
    data: Box<[T]>,
    dirty: bool,
    last_used: u64,
}

/// A table leaving the cache. `dirty` tables must be written back by the caller.
#[derive(Debug)]
pub struct Evicted<T> {
    pub offset: u64,
    pub data: Box<[T]>,
    pub dirty: bool,
}

#[derive(Debug)]
pub struct MetaCache<T> {
    slots: Vec<Slot<T>>,
    index: HashMap<u64, usize, OffsetHash>,
    capacity: usize,
    clock: u64,
}

impl<T: Copy> MetaCache<T> {
    /// A cache holding up to `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> MetaCache<T> {
        let capacity = capacity.max(2);
        MetaCache {
            slots: Vec::with_capacity(capacity),
            index: HashMap::with_capacity_and_hasher(capacity, OffsetHash),
            capacity,
            clock: 0,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.index.contains_key(&offset)
    }

    fn touch(&mut self, i: usize) {
        self.clock += 1;
        self.slots[i].last_used = self.clock;
    }

    pub fn get(&mut self, offset: u64) -> Option<&[T]> {
        let i = *self.index.get(&offset)?;
        self.touch(i);
        Some(&self.slots[i].data)
    }

    /// Mutable access; the table becomes dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [T]> {
        let i = *self.index.get(&offset)?;
        self.touch(i);
        self.slots[i].dirty = true;
        Some(&mut self.slots[i].data)
    }

    pub fn is_dirty(&self, offset: u64) -> bool {
        self.index
            .get(&offset)
            .is_some_and(|&i| self.slots[i].dirty)
    }

    /// When the cache is full, remove and return the entry to evict: the least recently
    /// used clean table, or the least recently used dirty one when all are dirty.
    pub fn evict(&mut self) -> Option<Evicted<T>> {
        if self.slots.len() < self.capacity {
            return None;
        }
        let victim = self
            .slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| (s.dirty, s.last_used))
            .map(|(i, _)| i)?;
        let offset = self.slots[victim].offset;
        self.remove(offset)
    }

    /// Insert (or replace) a table. Call [`MetaCache::evict`] first to make room; an
    /// insert into a full cache grows it by one rather than losing a dirty table.
    pub fn insert(&mut self, offset: u64, data: Box<[T]>, dirty: bool) {
        self.clock += 1;
        let slot = Slot {
            offset,
            data,
            dirty,
            last_used: self.clock,
        };
        if let Some(&i) = self.index.get(&offset) {
            self.slots[i] = slot;
        } else {
            self.index.insert(offset, self.slots.len());
            self.slots.push(slot);
        }
    }

    pub fn remove(&mut self, offset: u64) -> Option<Evicted<T>> {
        let i = self.index.remove(&offset)?;
        let slot = self.slots.swap_remove(i);
        if i < self.slots.len() {
            let moved = self.slots[i].offset;
            self.index.insert(moved, i);
        }
        Some(Evicted {
            offset: slot.offset,
            data: slot.data,
            dirty: slot.dirty,
        })
    }

    /// Offsets of the dirty tables, in ascending order (sequential write-back).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.dirty)
            .map(|s| s.offset)
            .collect();
        v.sort_unstable();
        v
    }

    /// A dirty table's contents, for writing back, without touching its recency.
    pub fn peek(&self, offset: u64) -> Option<&[T]> {
        self.index.get(&offset).map(|&i| &*self.slots[i].data)
    }

    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(&i) = self.index.get(&offset) {
            self.slots[i].dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(v: u64) -> Box<[u64]> {
        vec![v; 4].into_boxed_slice()
    }

    #[test]
    fn evicts_clean_lru_before_dirty() {
        let mut c: MetaCache<u64> = MetaCache::new(3);
        c.insert(0x1000, table(1), true);
        c.insert(0x2000, table(2), false);
        c.insert(0x3000, table(3), false);
        assert!(c.get(0x2000).is_some()); // 0x3000 is now the clean LRU
        let e = c.evict().expect("ok");
        assert_eq!((e.offset, e.dirty), (0x3000, false));
        c.insert(0x4000, table(4), true);
        let e = c.evict().expect("ok");
        assert_eq!((e.offset, e.dirty), (0x2000, false));
        c.insert(0x5000, table(5), true);
        // All dirty: the least recently used dirty one goes, with its data.
        let e = c.evict().expect("ok");
        assert_eq!((e.offset, e.dirty, e.data[0]), (0x1000, true, 1));
        assert!(!c.contains(0x1000));
        assert_eq!(c.dirty_offsets(), vec![0x4000, 0x5000]);
    }

    #[test]
    fn no_eviction_below_capacity_and_mark_clean() {
        let mut c: MetaCache<u16> = MetaCache::new(2);
        c.insert(7, vec![0u16; 2].into_boxed_slice(), false);
        assert!(c.evict().is_none());
        c.get_mut(7).expect("ok")[1] = 9;
        assert!(c.is_dirty(7));
        c.mark_clean(7);
        assert!(!c.is_dirty(7));
        assert_eq!(c.peek(7).expect("ok")[1], 9);
        c.insert(8, vec![0u16; 2].into_boxed_slice(), false);
        c.insert(9, vec![0u16; 2].into_boxed_slice(), false);
        assert_eq!(c.len(), 3); // insert never drops a table on its own
        assert!(c.remove(8).is_some());
        assert_eq!(c.peek(9).expect("ok").len(), 2);
    }
}
