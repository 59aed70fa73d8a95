//! Consistency check and repair: recompute every cluster's refcount from the metadata
//! (header, L1 tables of the active state and of every snapshot, L2 tables, refcount
//! table and blocks, snapshot table) and compare with the stored refcounts; check the
//! COPIED flags of the active tree; detect entries past the end of the file, unaligned
//! entries and metadata clusters used twice.
//!
//! Memory: three bytes per cluster of the file (48 MiB for a 1 TiB file of 64 KiB
//! clusters).

use super::error::Result;
use super::map::{referenced_clusters, COMPRESSED, COPIED, OFFSET_MASK};
use super::Qcow2;

/// The outcome of [`Qcow2::check`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Clusters whose stored refcount is higher than their references (or referenced by
    /// nothing at all): wasted space, harmless.
    pub leaks: u64,
    /// Clusters whose stored refcount is lower than their references: dangerous, the
    /// allocator could hand them out again.
    pub refcount_errors: u64,
    /// COPIED flags of the active tree that disagree with the refcount.
    pub copied_errors: u64,
    /// Of those, COPIED flags on clusters that more than one path reaches: a write there
    /// would go in place and change what a snapshot or another entry reads. Dangerous.
    /// (A flag on a cluster whose refcount is only over-counted, as a crash between a
    /// refcount update and the flag's can leave, is wrong but harmless.)
    pub copied_shared: u64,
    /// Structural problems (entries past EOF, unaligned, overlapping metadata...).
    pub corruptions: Vec<String>,
    /// Problems fixed by the repair.
    pub fixed: u64,
    /// Corruption the repair could not fix.
    pub unrepaired: u64,
    pub total_clusters: u64,
    pub referenced_clusters: u64,
}

impl CheckReport {
    /// Whether the image still has problems other than leaks.
    pub fn corruptions_remaining(&self) -> bool {
        self.unrepaired > 0
    }

    pub fn summary(&self) -> String {
        format!(
            "{} leaked clusters, {} refcount errors, {} COPIED flag errors ({} on shared \
             clusters), {} corruptions, {} fixed, {} unrepaired",
            self.leaks,
            self.refcount_errors,
            self.copied_errors,
            self.copied_shared,
            self.corruptions.len(),
            self.fixed,
            self.unrepaired
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Use {
    Free = 0,
    /// Header, L1 tables, refcount table and blocks, snapshot table: one owner only.
    Unique,
    L2,
    Data,
}

/// What the walk found, per cluster of the file. Both vectors start as zeros, which the
/// allocator hands out as untouched pages: a sparse hostile image claiming a huge file
/// costs address space, not memory, beyond the clusters its tables really name.
struct Tally {
    counts: Vec<u16>,
    /// `Use` as bytes (0 is `Free`).
    uses: Vec<u8>,
    cluster_bits: u32,
    corruptions: Vec<String>,
}

impl Tally {
    fn add(&mut self, cluster: u64, kind: Use, what: &str) {
        let Some(i) = usize::try_from(cluster)
            .ok()
            .filter(|&i| i < self.counts.len())
        else {
            self.corruptions.push(format!(
                "{what} at {:#x} lies past the end of the file",
                cluster << self.cluster_bits
            ));
            return;
        };
        let prev = match self.uses[i] {
            0 => Use::Free,
            1 => Use::Unique,
            2 => Use::L2,
            _ => Use::Data,
        };
        let clash = match (prev, kind) {
            (Use::Free, _) => false,
            (Use::Unique, _) | (_, Use::Unique) => true,
            (a, b) => a != b,
        };
        if clash {
            self.corruptions.push(format!(
                "{what} at {:#x} overlaps other metadata or data",
                cluster << self.cluster_bits
            ));
        }
        if prev == Use::Free || kind == Use::Unique {
            self.uses[i] = kind as u8;
        }
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    fn add_range(&mut self, offset: u64, bytes: u64, kind: Use, what: &str) {
        let first = offset >> self.cluster_bits;
        let n = bytes.div_ceil(1 << self.cluster_bits).max(1);
        for c in first..first.saturating_add(n) {
            self.add(c, kind, what);
        }
    }
}

impl Qcow2 {
    /// Walk one L1 table and its L2 tables into the tally.
    fn tally_tree(
        &mut self,
        t: &mut Tally,
        l1: &[u64],
        done: &mut u64,
        total: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let cs = self.cluster_size;
        for (i, &l1e) in l1.iter().enumerate() {
            *done += 1;
            progress(*done, total);
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if !l2_off.is_multiple_of(cs) || l2_off < cs || l2_off >= self.io.len() {
                t.corruptions.push(format!(
                    "L1 entry {i} points to an invalid L2 table offset {l2_off:#x}"
                ));
                continue;
            }
            t.add(l2_off >> self.cluster_bits, Use::L2, "L2 table");
            let mut raw = vec![0u8; cs as usize];
            if let Err(e) = self.io.read_meta(l2_off, &mut raw, "L2 table") {
                t.corruptions.push(e.to_string());
                continue;
            }
            for (j, c) in raw.chunks_exact(8).enumerate() {
                let e = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                let e = e & !COPIED;
                if e & COMPRESSED == 0 && !(e & OFFSET_MASK).is_multiple_of(cs) {
                    t.corruptions.push(format!(
                        "L2 table at {l2_off:#x} entry {j}: unaligned host offset {e:#x}"
                    ));
                    continue;
                }
                for hc in referenced_clusters(e, self.cluster_bits) {
                    if hc == 0 {
                        t.corruptions.push(format!(
                            "L2 table at {l2_off:#x} entry {j} points to the header"
                        ));
                        continue;
                    }
                    t.add(hc, Use::Data, "data cluster");
                }
            }
        }
        Ok(())
    }

    /// Check the image; with `repair`, set every refcount to its computed value (freeing
    /// leaked clusters), fix COPIED flags and clear the dirty bit. `progress(done, total)`
    /// is called as the walk advances.
    pub fn check(
        &mut self,
        repair: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        let repair = repair && !self.read_only;
        self.flush()?;
        let cs = self.cluster_size;
        let file_clusters = self.io.len().div_ceil(cs);
        let n = usize::try_from(file_clusters)
            .ok()
            .filter(|&n| n <= 1 << 32)
            .ok_or_else(|| self.io.corrupt("the file is too large to check".into()))?;
        let mut t = Tally {
            counts: vec![0; n],
            uses: vec![0; n],
            cluster_bits: self.cluster_bits,
            corruptions: Vec::new(),
        };
        t.add(0, Use::Unique, "header");
        // Each snapshot's L1 table is read when its turn comes: up to 65536 of 32 MiB each
        // would not fit in memory at once.
        let snap_l1_entries: u64 = self.snapshots.iter().map(|s| u64::from(s.l1_size)).sum();
        // Clusters to compare: the file's, and those past its end that an existing
        // refcount block describes (a stored refcount there is a leak).
        let per_block_bits = self.cluster_bits - 1;
        let mut beyond: Vec<std::ops::Range<u64>> = Vec::new();
        for (i, &b) in self.rc.table().iter().enumerate() {
            let start = (i as u64) << per_block_bits;
            let end = start + (1 << per_block_bits);
            if b != 0 && end > file_clusters {
                beyond.push(start.max(file_clusters)..end);
            }
        }
        let covered = file_clusters + beyond.iter().map(|r| r.end - r.start).sum::<u64>();
        let total = self.l1.len() as u64 + snap_l1_entries + covered;
        let mut done = 0u64;
        if !self.l1.is_empty() {
            t.add_range(
                self.header.l1_table_offset,
                self.l1.len() as u64 * 8,
                Use::Unique,
                "L1 table",
            );
        }
        let l1 = self.l1.clone();
        self.tally_tree(&mut t, &l1, &mut done, total, progress)?;
        for s in self.snapshots.clone().iter() {
            let l1 = self.read_l1_at(s.l1_table_offset, s.l1_size)?;
            if s.l1_size > 0 {
                t.add_range(
                    s.l1_table_offset,
                    u64::from(s.l1_size) * 8,
                    Use::Unique,
                    "snapshot L1 table",
                );
            }
            self.tally_tree(&mut t, &l1, &mut done, total, progress)?;
        }
        if self.header.nb_snapshots > 0 {
            let bytes = super::snapshot::table_bytes(&self.snapshots);
            t.add_range(
                self.header.snapshots_offset,
                bytes,
                Use::Unique,
                "snapshot table",
            );
        }
        t.add_range(
            self.rc.table_offset(),
            u64::from(self.rc.table_clusters()) * cs,
            Use::Unique,
            "refcount table",
        );
        for &b in self.rc.table().to_vec().iter() {
            if b != 0 {
                t.add(b >> self.cluster_bits, Use::Unique, "refcount block");
            }
        }

        let mut report = CheckReport {
            total_clusters: file_clusters,
            ..Default::default()
        };
        report.referenced_clusters = t.counts.iter().filter(|&&c| c > 0).count() as u64;
        report.unrepaired = t.corruptions.len() as u64;
        let mut freed = Vec::new();
        for c in (0..file_clusters).chain(beyond.into_iter().flatten()) {
            done += 1;
            if c % 4096 == 0 {
                progress(done, total);
            }
            let stored = self.rc.get(&mut self.io, c)?;
            let computed = t.counts.get(c as usize).copied().unwrap_or(0);
            if stored == computed {
                continue;
            }
            if stored > computed {
                report.leaks += 1;
            } else {
                report.refcount_errors += 1;
            }
            if !repair {
                if stored < computed {
                    report.unrepaired += 1;
                }
                continue;
            }
            let idx = c >> (self.cluster_bits - 1);
            let have_block = self.rc.table().get(idx as usize).is_some_and(|&b| b != 0);
            if !have_block {
                // Creating a block would need a free cluster we cannot vouch for.
                report.unrepaired += 1;
                t.corruptions.push(format!(
                    "no refcount block covers referenced cluster at {:#x}",
                    c << self.cluster_bits
                ));
                continue;
            }
            let delta = i32::from(computed) - i32::from(stored);
            self.rc.adjust(&mut self.io, c, delta)?;
            if computed == 0 {
                freed.push(c);
            }
            report.fixed += 1;
        }
        progress(total, total);

        // COPIED flags of the active tree, against the (repaired) refcounts.
        (report.copied_errors, report.copied_shared) = self.count_copied_errors(&t.counts)?;
        if repair {
            self.rc.writeback(&mut self.io)?;
            self.io.sync()?;
            self.release(&freed);
            report.fixed += self.fix_copied()?;
            self.flush()?;
            self.rebuild_dedupe()?;
            if report.unrepaired == 0 && self.header.dirty() {
                self.header.incompatible &= !super::header::INCOMPAT_DIRTY;
                self.write_header()?;
                self.io.sync()?;
            }
        } else {
            // A stale flag on a cluster only one path reaches is as harmless as a leak
            // (a write there copies needlessly, or goes in place where only it reads);
            // one on a shared cluster is corruption.
            report.unrepaired += report.copied_shared;
        }
        report.corruptions = t.corruptions;
        Ok(report)
    }

    /// (flags that disagree with the stored refcount, flags set where `counts`, the
    /// references found, says more than one path reaches the cluster).
    fn count_copied_errors(&mut self, counts: &[u16]) -> Result<(u64, u64)> {
        let (mut errors, mut shared) = (0, 0);
        let reached = |c: u64| counts.get(c as usize).copied().unwrap_or(0);
        for i in 0..self.l1.len() {
            let l1e = self.l1[i];
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 || self.check_table_offset(l2_off, "L2 table").is_err() {
                continue;
            }
            let rc = self.rc.get(&mut self.io, l2_off >> self.cluster_bits)?;
            if (l1e & COPIED != 0) != (rc == 1) {
                errors += 1;
            }
            if l1e & COPIED != 0 && reached(l2_off >> self.cluster_bits) > 1 {
                shared += 1;
            }
            let table = self.l2_table_copy(l2_off)?;
            for e in table {
                let host = e & OFFSET_MASK;
                if e & COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let rc = self.rc.get(&mut self.io, host >> self.cluster_bits)?;
                if (e & COPIED != 0) != (rc == 1) {
                    errors += 1;
                }
                if e & COPIED != 0 && reached(host >> self.cluster_bits) > 1 {
                    shared += 1;
                }
            }
        }
        Ok((errors, shared))
    }
}
