//! Guest-to-host mapping: L1/L2 entry decoding, L2 table loading through the bounded
//! cache (with write-back ordering on eviction), copy-on-write of shared L2 tables, and
//! the extent lookup the read path uses.

use super::error::{Qcow2Error, Result};
use super::Qcow2;

/// Bits 9..=55 of L1 and L2 entries: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: the table or cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// Standard cluster descriptor bit 0: the cluster reads as zeros.
pub const ZERO: u64 = 1;

/// What an L2 entry says about one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Unallocated,
    /// Reads as zeros; may keep a preallocated host cluster.
    Zero {
        host: Option<u64>,
        copied: bool,
    },
    Data {
        host: u64,
        copied: bool,
    },
    Compressed,
}

/// Where a contiguous piece of the guest range lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// In this image's file at `host_offset`. `copied`: refcount 1, safe to overwrite in
    /// place.
    Data { host_offset: u64, copied: bool },
    /// Reads as zeros.
    Zero,
    /// Not in this image: read from the backing chain at the same guest offset, or zeros
    /// when there is no backing file.
    Unallocated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub guest_offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// The host cluster of a data entry (not zero, not compressed, not unallocated).
pub fn data_cluster(entry: u64, cluster_bits: u32) -> Option<u64> {
    let host = entry & OFFSET_MASK;
    (entry & (COMPRESSED | ZERO) == 0 && host != 0).then_some(host >> cluster_bits)
}

/// The host clusters an L2 entry holds a reference to (for refcounting).
pub fn referenced_clusters(entry: u64, cluster_bits: u32) -> std::ops::Range<u64> {
    if entry & COMPRESSED != 0 {
        // Offset in the low x bits, then the count of additional 512-byte sectors.
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry & !COPIED & !COMPRESSED) >> x) + 1;
        let end = (offset & !511).saturating_add(sectors * 512);
        return (offset >> cluster_bits)..((end - 1) >> cluster_bits) + 1;
    }
    let host = entry & OFFSET_MASK;
    if host == 0 {
        return 0..0;
    }
    let c = host >> cluster_bits;
    c..c + 1
}

impl Qcow2 {
    pub(crate) fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    pub(crate) fn split(&self, guest_cluster: u64) -> (usize, usize) {
        let l1 = guest_cluster >> self.l2_bits();
        let l2 = guest_cluster & ((1 << self.l2_bits()) - 1);
        (usize::try_from(l1).unwrap_or(usize::MAX), l2 as usize)
    }

    /// A metadata cluster offset (L2 table, from an L1 entry) must be aligned, past the
    /// header and inside the file.
    pub(crate) fn check_table_offset(&self, off: u64, what: &str) -> Result<()> {
        let cs = self.cluster_size;
        if !off.is_multiple_of(cs)
            || off < cs
            || off.checked_add(cs).is_none_or(|e| e > self.io.len())
        {
            return Err(self.io.corrupt(format!(
                "{what} at {off:#x} is unaligned, overlaps the header or lies past the end of \
                 the file"
            )));
        }
        Ok(())
    }

    pub(crate) fn decode(&self, entry: u64, guest_cluster: u64) -> Result<Entry> {
        if entry & COMPRESSED != 0 {
            return Ok(Entry::Compressed);
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        let guest = guest_cluster << self.cluster_bits;
        if !host.is_multiple_of(self.cluster_size) {
            return Err(self.io.corrupt(format!(
                "L2 entry for guest offset {guest:#x} points to unaligned host offset {host:#x}"
            )));
        }
        if host == 0 {
            return Ok(if entry & ZERO != 0 {
                Entry::Zero { host: None, copied }
            } else {
                Entry::Unallocated
            });
        }
        // A preallocated zero cluster is written in place like a data cluster, so its
        // host offset is held to the same bounds.
        if host < self.cluster_size || host >= self.io.len() {
            return Err(self.io.corrupt(format!(
                "L2 entry for guest offset {guest:#x} points to host offset {host:#x}, which \
                 overlaps the header or lies past the end of the file"
            )));
        }
        if entry & ZERO != 0 {
            return Ok(Entry::Zero {
                host: Some(host),
                copied,
            });
        }
        Ok(Entry::Data { host, copied })
    }

    /// Write an L2 table to the file, after making refcounts and data durable (rules 1
    /// and 2 of the module doc).
    pub(crate) fn write_l2_ordered(&mut self, offset: u64, data: &[u64]) -> Result<()> {
        self.rc.writeback(&mut self.io)?;
        self.io.sync()?;
        let raw: Vec<u8> = data.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.io.write(offset, &raw, "L2 table")
    }

    /// Bring an L2 table into the cache.
    /// A copy of the L2 table at `offset`, loaded into the cache first if need be: for
    /// walks that change tables while they go through them.
    pub(crate) fn l2_table_copy(&mut self, offset: u64) -> Result<Vec<u64>> {
        self.load_l2(offset)?;
        Ok(self
            .l2_cache
            .peek(offset)
            .map(|t| t.to_vec())
            .unwrap_or_default())
    }

    pub(crate) fn load_l2(&mut self, offset: u64) -> Result<()> {
        if self.l2_cache.contains(offset) {
            return Ok(());
        }
        self.counters.l2_cache_misses += 1;
        self.make_room_l2()?;
        let mut raw = vec![0u8; self.cluster_size as usize];
        self.io.read_meta(offset, &mut raw, "L2 table")?;
        let table: Box<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        self.l2_cache.insert(offset, table, false);
        Ok(())
    }

    fn make_room_l2(&mut self) -> Result<()> {
        if let Some(ev) = self.l2_cache.evict() {
            if ev.dirty {
                self.counters.l2_writebacks += 1;
                self.write_l2_ordered(ev.offset, &ev.data)?;
                // The sync before that write made every other dirty table's refcounts
                // and data durable too: write them all now, so that the next evictions
                // find clean tables instead of paying a sync each.
                for off in self.l2_cache.dirty_offsets() {
                    if let Some(t) = self.l2_cache.peek(off) {
                        let raw: Vec<u8> = t.iter().flat_map(|e| e.to_be_bytes()).collect();
                        self.io.write(off, &raw, "L2 table")?;
                        self.counters.l2_writebacks += 1;
                    }
                    self.l2_cache.mark_clean(off);
                }
            }
        }
        Ok(())
    }

    /// Raw L2 entry of a guest cluster (0 when its L2 table is not allocated).
    pub(crate) fn l2_entry(&mut self, guest_cluster: u64) -> Result<u64> {
        let (l1i, l2i) = self.split(guest_cluster);
        let l2_off = self.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(0);
        }
        self.load_l2(l2_off)?;
        Ok(self
            .l2_cache
            .get(l2_off)
            .and_then(|t| t.get(l2i).copied())
            .unwrap_or(0))
    }

    /// Make the L2 table for `l1i` private to the active L1 (refcount 1), allocating an
    /// empty one or copying a shared one. Returns its offset.
    pub(crate) fn ensure_l2_writable(&mut self, l1i: usize) -> Result<u64> {
        let Some(&l1e) = self.l1.get(l1i) else {
            return Err(self.io.corrupt(format!("L1 index {l1i} is out of range")));
        };
        let old = l1e & OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok(old);
        }
        let new = self.rc.alloc(&mut self.io, 1)?;
        let table: Box<[u64]> = if old == 0 {
            vec![0u64; 1 << self.l2_bits()].into_boxed_slice()
        } else {
            self.load_l2(old)?;
            if self.l2_cache.is_dirty(old) {
                if let Some(t) = self.l2_cache.peek(old).map(|t| t.to_vec()) {
                    self.write_l2_ordered(old, &t)?;
                }
            }
            let t = self
                .l2_cache
                .remove(old)
                .map(|e| e.data)
                .ok_or_else(|| self.io.corrupt("L2 table vanished from the cache".into()))?;
            // The active L1 drops its reference to the shared table once the new L1 entry
            // is durable.
            self.rc.queue_free(old >> self.cluster_bits);
            self.counters.cow_clusters += 1;
            t
        };
        self.make_room_l2()?;
        self.l2_cache.insert(new, table, true);
        self.set_l1(l1i, new | COPIED);
        Ok(new)
    }

    pub(crate) fn set_l1(&mut self, l1i: usize, entry: u64) {
        if let Some(e) = self.l1.get_mut(l1i) {
            *e = entry;
            self.l1_dirty.insert(l1i / 64);
        }
    }

    /// Set the L2 entry of a guest cluster in the cache, making its table writable first.
    pub(crate) fn set_l2_entry(&mut self, guest_cluster: u64, entry: u64) -> Result<()> {
        let (l1i, l2i) = self.split(guest_cluster);
        let l2_off = self.ensure_l2_writable(l1i)?;
        self.load_l2(l2_off)?;
        let mut old = entry;
        if let Some(slot) = self.l2_cache.get_mut(l2_off).and_then(|t| t.get_mut(l2i)) {
            old = std::mem::replace(slot, entry);
        }
        self.note_remap(guest_cluster, old, entry);
        Ok(())
    }

    fn extent_kind(&mut self, guest_cluster: u64) -> Result<ExtentKind> {
        let raw = self.l2_entry(guest_cluster)?;
        Ok(match self.decode(raw, guest_cluster)? {
            Entry::Unallocated => ExtentKind::Unallocated,
            Entry::Zero { .. } => ExtentKind::Zero,
            Entry::Data { host, copied } => ExtentKind::Data {
                host_offset: host,
                copied,
            },
            Entry::Compressed => {
                return Err(Qcow2Error::Compressed {
                    path: self.io.path().to_path_buf(),
                    guest_offset: guest_cluster << self.cluster_bits,
                })
            }
        })
    }

    /// The first contiguous extent of `[guest_offset, guest_offset + len)`: adjacent
    /// clusters of the same kind (and, for data, adjacent on the host with the same
    /// COPIED state) are merged. Errors on compressed clusters, which are not supported.
    pub fn map(&mut self, guest_offset: u64, len: u64) -> Result<Extent> {
        self.check_range(guest_offset, len)?;
        let cs = self.cluster_size;
        let first = guest_offset >> self.cluster_bits;
        let within = guest_offset & (cs - 1);
        let kind = self.extent_kind(first)?;
        let mut got = (cs - within).min(len);
        let mut gc = first + 1;
        while got < len {
            let next = self.extent_kind(gc)?;
            let continues = match (kind, next) {
                (
                    ExtentKind::Data {
                        host_offset: h0,
                        copied: c0,
                    },
                    ExtentKind::Data {
                        host_offset: h1,
                        copied: c1,
                    },
                ) => c0 == c1 && h1 == h0 - within + (gc - first) * cs,
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            got = (got + cs).min(len);
            gc += 1;
        }
        let kind = match kind {
            ExtentKind::Data {
                host_offset,
                copied,
            } => ExtentKind::Data {
                host_offset: host_offset + within,
                copied,
            },
            k => k,
        };
        Ok(Extent {
            guest_offset,
            len: got,
            kind,
        })
    }
}
