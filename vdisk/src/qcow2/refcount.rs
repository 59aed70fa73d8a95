//! Refcount table and refcount blocks (16-bit refcounts): lookup, cluster allocation,
//! creation of refcount blocks and growth of the refcount table, and the deferred
//! decrements that keep a freed cluster from being reused while a durable mapping may
//! still point at it.
//!
//! Ordering: increments land in the block cache (dirty) and are written by
//! [`Refcounts::writeback`], which the owner calls (and follows with fdatasync) before it
//! writes any L1/L2 entry. A new refcount block is written at once, but the table entry
//! that points at it only by the next writeback, after a sync that makes the blocks
//! durable first: one sync for all the blocks created since, instead of one each. Decrements are queued with [`Refcounts::queue_free`] and only
//! applied by [`Refcounts::apply_pending`], which the owner calls after the mapping change
//! that dropped the reference is durable; until then the cluster keeps its refcount, so the
//! allocator cannot hand it out again.

use std::sync::Arc;

use super::cache::MetaCache;
use super::error::Result;
use super::io::ImageFile;
use super::pins::Pins;

/// QEMU's own limit on the refcount table.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const ENTRY_RESERVED: u64 = 0x1ff;

#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u32,
    cache: MetaCache<u16>,
    /// No free cluster lies below this index.
    free_hint: u64,
    pending: Vec<u64>,
    /// Table entries of new refcount blocks not yet written (see the module doc).
    new_entries: Vec<u64>,
    pub allocated_clusters: u64,
    pub freed_clusters: u64,
    /// Free clusters that reads still read: not to be handed out (see `pins`).
    pub pins: Arc<Pins>,
}

impl Refcounts {
    /// Load and validate the refcount table.
    pub fn load(
        io: &ImageFile,
        cluster_bits: u32,
        table_offset: u64,
        table_clusters: u32,
        cache_tables: usize,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        if table_offset == 0 || !table_offset.is_multiple_of(cs) {
            return Err(io.corrupt(format!(
                "refcount table offset {table_offset:#x} is zero or not cluster aligned"
            )));
        }
        let bytes = u64::from(table_clusters) << cluster_bits;
        if table_clusters == 0 || bytes > MAX_REFTABLE_BYTES {
            return Err(io.corrupt(format!(
                "refcount table of {table_clusters} clusters is empty or larger than {} MiB",
                MAX_REFTABLE_BYTES >> 20
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        io.read_meta(table_offset, &mut raw, "refcount table")?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let table_end = table_offset + bytes;
        let mut seen = std::collections::HashSet::new();
        for (i, &e) in table.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let bad = if e & ENTRY_RESERVED != 0 || e % cs != 0 {
                Some("is not cluster aligned")
            } else if e.checked_add(cs).is_none_or(|end| end > io.len()) {
                Some("lies past the end of the file")
            } else if e < cs {
                Some("overlaps the header")
            } else if e >= table_offset && e < table_end {
                Some("overlaps the refcount table")
            } else if !seen.insert(e) {
                Some("is used by two refcount table entries")
            } else {
                None
            };
            if let Some(why) = bad {
                return Err(io.corrupt(format!("refcount block {i} at {e:#x} {why}")));
            }
        }
        Ok(Refcounts {
            cluster_bits,
            table,
            table_offset,
            table_clusters,
            cache: MetaCache::new(cache_tables),
            free_hint: 0,
            pending: Vec::new(),
            new_entries: Vec::new(),
            allocated_clusters: 0,
            freed_clusters: 0,
            pins: Arc::new(Pins::default()),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block, as a shift.
    fn block_bits(&self) -> u32 {
        self.cluster_bits - 1
    }

    /// Whether the refcount block at `offset` is in the cache.
    pub fn caches_block(&self, offset: u64) -> bool {
        self.cache.contains(offset)
    }

    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    pub fn table_clusters(&self) -> u32 {
        self.table_clusters
    }

    /// Offsets of the refcount blocks (0 for missing ones), by table index.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    fn load_block(&mut self, io: &mut ImageFile, offset: u64) -> Result<()> {
        if self.cache.contains(offset) {
            return Ok(());
        }
        if let Some(ev) = self.cache.evict() {
            if ev.dirty {
                write_block(io, ev.offset, &ev.data)?;
            }
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        io.read_meta(offset, &mut raw, "refcount block")?;
        let block: Box<[u16]> = raw
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        self.cache.insert(offset, block, false);
        Ok(())
    }

    /// The refcount of host cluster `cluster` (0 where no block covers it).
    pub fn get(&mut self, io: &mut ImageFile, cluster: u64) -> Result<u16> {
        let idx = cluster >> self.block_bits();
        let Some(&block) = self.table.get(idx as usize) else {
            return Ok(0);
        };
        if block == 0 {
            return Ok(0);
        }
        self.load_block(io, block)?;
        let i = (cluster & ((1 << self.block_bits()) - 1)) as usize;
        Ok(self.cache.get(block).map_or(0, |b| b[i]))
    }

    /// Set a refcount; the block must exist ([`Refcounts::ensure_covered`]).
    fn set(&mut self, io: &mut ImageFile, cluster: u64, value: u16) -> Result<()> {
        let idx = (cluster >> self.block_bits()) as usize;
        let block = self.table.get(idx).copied().unwrap_or(0);
        if block == 0 {
            return Err(io.corrupt(format!(
                "no refcount block covers cluster {cluster} (host offset {:#x})",
                cluster << self.cluster_bits
            )));
        }
        self.load_block(io, block)?;
        let i = (cluster & ((1 << self.block_bits()) - 1)) as usize;
        if let Some(b) = self.cache.get_mut(block) {
            b[i] = value;
        }
        Ok(())
    }

    /// Add `delta` to a refcount now. Callers use negative deltas only once the mapping
    /// change that dropped the reference is durable. Returns the new refcount.
    pub fn adjust(&mut self, io: &mut ImageFile, cluster: u64, delta: i32) -> Result<u16> {
        // Only an increment needs a block: a cluster no block covers has refcount 0, so a
        // decrement there fails below instead of creating a block (and growing the file)
        // for a cluster a corrupt entry named.
        if delta > 0 {
            self.ensure_covered(io, cluster)?;
        }
        let old = self.get(io, cluster)?;
        let new = i64::from(old) + i64::from(delta);
        let new = u16::try_from(new).map_err(|_| {
            io.corrupt(format!(
                "refcount of cluster at {:#x} would become {new}",
                cluster << self.cluster_bits
            ))
        })?;
        self.set(io, cluster, new)?;
        if new == 0 && old != 0 {
            self.free_hint = self.free_hint.min(cluster);
            self.freed_clusters += 1;
        }
        Ok(new)
    }

    /// `cluster` (refcount 0) may be allocated again: the allocator may have passed over
    /// it while a read held it, and must look again from there.
    pub fn note_free(&mut self, cluster: u64) {
        self.free_hint = self.free_hint.min(cluster);
    }

    /// Queue a decrement to apply once the current mapping changes are durable.
    pub fn queue_free(&mut self, cluster: u64) {
        self.pending.push(cluster);
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Apply the queued decrements. Returns the clusters whose refcount reached zero.
    pub fn apply_pending(&mut self, io: &mut ImageFile) -> Result<Vec<u64>> {
        let pending = std::mem::take(&mut self.pending);
        let mut freed = Vec::new();
        for c in pending {
            if self.adjust(io, c, -1)? == 0 {
                freed.push(c);
            }
        }
        Ok(freed)
    }

    /// Write every dirty refcount block, then the table entries of new blocks (after a
    /// sync, if there are any, so that no entry on disk points at an unwritten block).
    /// The caller syncs afterwards.
    pub fn writeback(&mut self, io: &mut ImageFile) -> Result<()> {
        for off in self.cache.dirty_offsets() {
            if let Some(data) = self.cache.peek(off) {
                write_block(io, off, data)?;
            }
            self.cache.mark_clean(off);
        }
        if !self.new_entries.is_empty() {
            io.sync()?;
            for idx in std::mem::take(&mut self.new_entries) {
                let offset = self.table.get(idx as usize).copied().unwrap_or(0);
                io.write(
                    self.table_offset + idx * 8,
                    &offset.to_be_bytes(),
                    "refcount table entry",
                )?;
            }
        }
        Ok(())
    }

    /// Make sure a refcount block covers `cluster`, growing the table and creating the
    /// block as needed. A new block is placed at the first cluster of the range it
    /// describes (free by definition, since no block counted it), written and synced
    /// before the table entry pointing at it is written.
    pub fn ensure_covered(&mut self, io: &mut ImageFile, cluster: u64) -> Result<()> {
        let idx = cluster >> self.block_bits();
        while idx >= self.table.len() as u64 {
            self.grow(io, idx)?;
        }
        if self.table[idx as usize] != 0 {
            return Ok(());
        }
        if idx == 0 {
            return Err(io.corrupt("refcount block 0 (covering the header) is missing".into()));
        }
        let first = idx << self.block_bits();
        let offset = first << self.cluster_bits;
        let table_end = self.table_offset + (u64::from(self.table_clusters) << self.cluster_bits);
        if offset >= self.table_offset && offset < table_end {
            return Err(io.corrupt(format!(
                "refcount block {idx} would overlap the refcount table"
            )));
        }
        let mut block = vec![0u16; 1 << self.block_bits()].into_boxed_slice();
        block[0] = 1;
        write_block(io, offset, &block)?;
        self.table[idx as usize] = offset;
        self.new_entries.push(idx);
        if let Some(ev) = self.cache.evict() {
            if ev.dirty {
                write_block(io, ev.offset, &ev.data)?;
            }
        }
        self.cache.insert(offset, block, false);
        Ok(())
    }

    /// Move the refcount table to a bigger one that has an entry for block `need`. The
    /// new table and a new refcount block describing it (and itself) go at the start of
    /// the first range the old table could not describe. New structures are written and
    /// synced, then the header is switched and synced, then the old table is freed.
    fn grow(&mut self, io: &mut ImageFile, need: u64) -> Result<()> {
        let cs = self.cluster_size();
        let old_len = self.table.len() as u64;
        let want = need
            .checked_add(1)
            .and_then(|n| n.max(old_len.saturating_mul(2)).checked_mul(8))
            .ok_or_else(|| io.corrupt("refcount table size overflows".into()))?;
        let new_clusters = want.div_ceil(cs);
        if new_clusters * cs > MAX_REFTABLE_BYTES || new_clusters + 1 > 1 << self.block_bits() {
            return Err(io.corrupt(format!(
                "the image needs a refcount table larger than {} MiB",
                MAX_REFTABLE_BYTES >> 20
            )));
        }
        let first = old_len << self.block_bits();
        let block_offset = first << self.cluster_bits;
        let table_offset = block_offset + cs;
        let mut block = vec![0u16; 1 << self.block_bits()].into_boxed_slice();
        for e in block.iter_mut().take(new_clusters as usize + 1) {
            *e = 1;
        }
        let mut table = self.table.clone();
        table.resize((new_clusters * cs / 8) as usize, 0);
        table[old_len as usize] = block_offset;
        write_block(io, block_offset, &block)?;
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        io.write(table_offset, &raw, "refcount table")?;
        io.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(new_clusters as u32).to_be_bytes());
        io.write(48, &hdr, "header (refcount table location)")?;
        io.sync()?;
        let old_offset = self.table_offset;
        let old_clusters = u64::from(self.table_clusters);
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = new_clusters as u32;
        if let Some(ev) = self.cache.evict() {
            if ev.dirty {
                write_block(io, ev.offset, &ev.data)?;
            }
        }
        self.cache.insert(block_offset, block, false);
        for c in 0..old_clusters {
            let cluster = (old_offset >> self.cluster_bits) + c;
            if self.adjust(io, cluster, -1)? == 0 {
                io.punch_hole(cluster << self.cluster_bits, cs);
            }
        }
        tracing::debug!(
            "{}: refcount table grown to {new_clusters} clusters at {table_offset:#x}",
            io.path().display()
        );
        Ok(())
    }

    /// Allocate `n` contiguous free clusters, set their refcounts to 1 (in the cache) and
    /// return the host offset of the first.
    pub fn alloc(&mut self, io: &mut ImageFile, n: u64) -> Result<u64> {
        let mut c = self.free_hint.max(1);
        let mut start = c;
        let mut run = 0u64;
        let mut first_free = None;
        let limit = 1u64 << (56 - self.cluster_bits);
        // In a sound image only a few clusters past the end of the file have a refcount
        // (allocated just before a crash, or new metadata). Hostile refcount blocks can
        // claim all of them: give up then, rather than scan up to the 64 PiB limit.
        let give_up = (io.len() >> self.cluster_bits)
            .saturating_add(n)
            .saturating_add(ALLOC_SCAN_PAST_EOF);
        while run < n {
            if c >= limit {
                return Err(io.corrupt("the image file has no room left below 64 PiB".into()));
            }
            if c > give_up && run == 0 {
                return Err(io.corrupt(format!(
                    "the refcounts claim every cluster up to {ALLOC_SCAN_PAST_EOF} past the \
                     end of the file; no cluster to allocate (run `vdisk image check --repair`)"
                )));
            }
            self.ensure_covered(io, c)?;
            if self.get(io, c)? == 0 && !self.pins.blocks(c) {
                if run == 0 {
                    start = c;
                }
                first_free.get_or_insert(c);
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        for k in start..start + n {
            self.set(io, k, 1)?;
        }
        self.free_hint = match first_free {
            Some(f) if f < start => f,
            _ => start + n,
        };
        self.allocated_clusters += n;
        Ok(start << self.cluster_bits)
    }
}

/// Clusters past the end of the file the allocator looks at before it calls the
/// refcounts corrupt.
const ALLOC_SCAN_PAST_EOF: u64 = 1 << 16;

fn write_block(io: &mut ImageFile, offset: u64, block: &[u16]) -> Result<()> {
    let raw: Vec<u8> = block.iter().flat_map(|e| e.to_be_bytes()).collect();
    io.write(offset, &raw, "refcount block")
}
