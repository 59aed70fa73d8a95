//! Internal snapshots: the snapshot table (parsing with limits, writing), and create,
//! delete and revert as copy-on-write at cluster granularity.
//!
//! Refcounts count paths: a cluster's refcount is the number of (L1 table, L2 entry)
//! paths that reach it, as `qemu-img check` computes them. Creating a snapshot therefore
//! adds one to every L2 table and every data cluster the active L1 reaches; deleting one
//! subtracts the same; the COPIED flags of the active tree are then recomputed.

use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{Qcow2Error, Result};
use super::header::Header;
use super::io::ImageFile;
use super::map::{referenced_clusters, COMPRESSED, COPIED, OFFSET_MASK};
use super::{read_be64s, Qcow2, MAX_L1_ENTRIES};

/// QEMU's limits.
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
const MAX_EXTRA: u32 = 1024;
/// Extra data we write: vm_state_size (u64) and disk_size (u64).
const OUR_EXTRA: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Extra data past the fields we know, kept verbatim.
    extra_rest: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Read and validate the snapshot table.
pub fn load(io: &ImageFile, header: &Header) -> Result<Vec<Snapshot>> {
    let n = header.nb_snapshots;
    if n == 0 {
        return Ok(Vec::new());
    }
    let cs = header.cluster_size();
    if n > MAX_SNAPSHOTS {
        return Err(io.corrupt(format!("{n} snapshots (at most {MAX_SNAPSHOTS} supported)")));
    }
    let mut off = header.snapshots_offset;
    if !off.is_multiple_of(cs) || off < cs {
        return Err(io.corrupt(format!(
            "snapshot table offset {off:#x} is unaligned or overlaps the header"
        )));
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut total = 0u64;
    for i in 0..n {
        let mut fixed = [0u8; 40];
        io.read_meta(off, &mut fixed, "snapshot table entry")?;
        let id_len = usize::from(be16(&fixed, 12));
        let name_len = usize::from(be16(&fixed, 14));
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(io.corrupt(format!(
                "snapshot {i} has {extra_len} bytes of extra data (at most {MAX_EXTRA})"
            )));
        }
        let var = extra_len as usize + id_len + name_len;
        let entry_len = (40 + var as u64).next_multiple_of(8);
        total += entry_len;
        if total > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(io.corrupt(format!(
                "snapshot table is larger than {} MiB",
                MAX_SNAPSHOT_TABLE_BYTES >> 20
            )));
        }
        let mut rest = vec![0u8; var];
        io.read_meta(off + 40, &mut rest, "snapshot table entry")?;
        let extra = &rest[..extra_len as usize];
        let id = String::from_utf8_lossy(&rest[extra_len as usize..extra_len as usize + id_len])
            .into_owned();
        let name = String::from_utf8_lossy(&rest[extra_len as usize + id_len..]).into_owned();
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        if u64::from(l1_size) > MAX_L1_ENTRIES {
            return Err(io.corrupt(format!(
                "snapshot {name:?} has an L1 table of {l1_size} entries (at most \
                 {MAX_L1_ENTRIES})"
            )));
        }
        let l1_end = l1_table_offset.checked_add(u64::from(l1_size) * 8);
        if l1_size > 0
            && (!l1_table_offset.is_multiple_of(cs)
                || l1_table_offset < cs
                || l1_end.is_none_or(|e| e > io.len()))
        {
            return Err(io.corrupt(format!(
                "snapshot {name:?} L1 table at {l1_table_offset:#x} is unaligned, overlaps \
                 the header or lies past the end of the file"
            )));
        }
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(be32(&fixed, 32))
        };
        let disk_size = if extra.len() >= 16 {
            be64(extra, 8)
        } else {
            header.size
        };
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size,
            extra_rest: extra.get(OUR_EXTRA..).unwrap_or(&[]).to_vec(),
        });
        off += entry_len;
    }
    // Every snapshot has an L1 table of its own. Refusing shared or overlapping ones also
    // bounds what walking all of them costs (check) by the size of the file: otherwise a
    // few MiB naming one table from thousands of snapshots cost gigabytes.
    let mut l1s: Vec<(u64, u64)> = out
        .iter()
        .filter(|s| s.l1_size > 0)
        .map(|s| (s.l1_table_offset, u64::from(s.l1_size) * 8))
        .collect();
    l1s.sort_unstable();
    for w in l1s.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(io.corrupt(format!(
                "snapshot L1 tables at {:#x} and {:#x} overlap",
                w[0].0, w[1].0
            )));
        }
    }
    Ok(out)
}

fn serialize(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        let extra_len = OUR_EXTRA + s.extra_rest.len();
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(s.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&s.disk_size.to_be_bytes());
        out.extend_from_slice(&s.extra_rest);
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

impl Qcow2 {
    pub fn list_snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    fn find_snapshot(&self, key: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.name == key)
            .or_else(|| self.snapshots.iter().position(|s| s.id == key))
            .ok_or_else(|| Qcow2Error::SnapshotNotFound {
                path: self.io.path().to_path_buf(),
                name: key.to_string(),
            })
    }

    fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size).max(1)
    }

    /// Write `snaps` as the new snapshot table: new clusters, synced, then the header
    /// switch, synced, then the old table's clusters are freed.
    fn write_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<()> {
        let old_off = self.header.snapshots_offset;
        let old_len = serialize(&self.snapshots).len() as u64;
        let had_table = self.header.nb_snapshots > 0 && old_off != 0;
        let raw = serialize(&snaps);
        let new_off = if snaps.is_empty() {
            0
        } else {
            let n = self.clusters_for(raw.len() as u64);
            let off = self.rc.alloc(&mut self.io, n)?;
            let mut padded = raw.clone();
            padded.resize((n * self.cluster_size) as usize, 0);
            self.io.write(off, &padded, "snapshot table")?;
            off
        };
        self.rc.writeback(&mut self.io)?;
        self.io.sync()?;
        self.header.nb_snapshots = snaps.len() as u32;
        self.header.snapshots_offset = new_off;
        self.snapshots = snaps;
        self.write_header()?;
        self.io.sync()?;
        if had_table {
            let first = old_off >> self.cluster_bits;
            let mut freed = Vec::new();
            for c in first..first + self.clusters_for(old_len) {
                if self.rc.adjust(&mut self.io, c, -1)? == 0 {
                    freed.push(c);
                }
            }
            self.release(&freed);
        }
        Ok(())
    }

    pub(crate) fn read_l1_at(&self, offset: u64, entries: u32) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; entries as usize * 8];
        self.io.read_meta(offset, &mut raw, "snapshot L1 table")?;
        Ok(read_be64s(&raw))
    }

    /// Add `delta` to the refcount of every L2 table and data cluster `l1` reaches.
    /// Returns the clusters whose refcount reached zero.
    fn adjust_tree(
        &mut self,
        l1: &[u64],
        delta: i32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<u64>> {
        let mut freed = Vec::new();
        let total = l1.len() as u64;
        for (i, &l1e) in l1.iter().enumerate() {
            progress(i as u64, total);
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.check_table_offset(l2_off, "L2 table")?;
            let table = self.l2_table_copy(l2_off)?;
            for e in table {
                let e = e & !COPIED;
                if e & COMPRESSED == 0 && !(e & OFFSET_MASK).is_multiple_of(self.cluster_size) {
                    return Err(self.io.corrupt(format!(
                        "L2 table at {l2_off:#x} holds an unaligned entry {e:#x}"
                    )));
                }
                for c in referenced_clusters(e, self.cluster_bits) {
                    // Never count a reference to the header or past the end of the file:
                    // an increment there would create refcount blocks far out.
                    if c == 0 || c >= self.io.len().div_ceil(self.cluster_size) {
                        return Err(self.io.corrupt(format!(
                            "L2 table at {l2_off:#x} entry {e:#x} points to the header or \
                             past the end of the file"
                        )));
                    }
                    if self.rc.adjust(&mut self.io, c, delta)? == 0 {
                        freed.push(c);
                    }
                }
            }
            if self
                .rc
                .adjust(&mut self.io, l2_off >> self.cluster_bits, delta)?
                == 0
            {
                freed.push(l2_off >> self.cluster_bits);
            }
        }
        progress(total, total);
        Ok(freed)
    }

    /// Set COPIED on active L1 and L2 entries exactly where the refcount is 1.
    pub(crate) fn fix_copied(&mut self) -> Result<u64> {
        let mut fixed = 0;
        for i in 0..self.l1.len() {
            let l1e = self.l1[i];
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                if l1e & COPIED != 0 {
                    self.set_l1(i, 0);
                    fixed += 1;
                }
                continue;
            }
            let want = self.rc.get(&mut self.io, l2_off >> self.cluster_bits)? == 1;
            if (l1e & COPIED != 0) != want {
                self.set_l1(i, l1e ^ COPIED);
                fixed += 1;
            }
            let mut table = self.l2_table_copy(l2_off)?;
            let mut changed = false;
            for e in table.iter_mut() {
                let host = *e & OFFSET_MASK;
                let want = if *e & COMPRESSED != 0 || host == 0 {
                    false
                } else {
                    self.rc.get(&mut self.io, host >> self.cluster_bits)? == 1
                };
                if (*e & COPIED != 0) != want {
                    *e ^= COPIED;
                    changed = true;
                    fixed += 1;
                }
            }
            if changed {
                if let Some(t) = self.l2_cache.get_mut(l2_off) {
                    t.copy_from_slice(&table);
                }
            }
        }
        Ok(fixed)
    }

    /// Create an internal snapshot of the current state.
    pub fn create_snapshot(&mut self, name: &str) -> Result<()> {
        self.check_writable()?;
        let invalid = |what: String| Qcow2Error::Invalid {
            path: self.io.path().to_path_buf(),
            what,
        };
        if name.is_empty() || name.len() > 1024 {
            return Err(invalid("snapshot names are 1 to 1024 bytes".into()));
        }
        if self
            .snapshots
            .iter()
            .any(|s| s.name == name || s.id == name)
        {
            return Err(invalid(format!("a snapshot named {name:?} already exists")));
        }
        if self.snapshots.len() as u32 >= MAX_SNAPSHOTS {
            return Err(invalid(format!("at most {MAX_SNAPSHOTS} snapshots")));
        }
        self.flush()?;
        let l1 = self.l1.clone();
        // The order on disk, so that a crash anywhere leaves the snapshot absent or whole:
        // 1. every refcount the snapshot adds (a crash after: leaks only);
        // 2. the active tree's COPIED flags cleared (it shares everything from now on;
        //    after: still leaks only), so no later write goes in place into a cluster
        //    the snapshot will reach;
        // 3. the snapshot table and the header that points to it.
        // Before, 3 came before 2: a crash between them left COPIED flags that let writes
        // after the restart overwrite the snapshot's data.
        self.adjust_tree(&l1, 1, &mut |_, _| {})?;
        // The snapshot's own copy of the L1 table (COPIED means nothing there).
        let n = self.clusters_for(l1.len() as u64 * 8);
        let l1_off = self.rc.alloc(&mut self.io, n)?;
        let mut raw: Vec<u8> = l1
            .iter()
            .flat_map(|e| (e & !COPIED).to_be_bytes())
            .collect();
        raw.resize((n * self.cluster_size) as usize, 0);
        self.io.write(l1_off, &raw, "snapshot L1 table")?;
        let next_id = self
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut snaps = self.snapshots.clone();
        snaps.push(Snapshot {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id: next_id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: self.header.size,
            extra_rest: Vec::new(),
        });
        self.rc.writeback(&mut self.io)?;
        self.io.sync()?;
        self.fix_copied()?;
        self.flush()?;
        self.write_snapshot_table(snaps)?;
        self.flush()
    }

    /// Delete a snapshot (by name, else by id), freeing the clusters only it referenced.
    pub fn delete_snapshot(&mut self, key: &str, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.check_writable()?;
        let idx = self.find_snapshot(key)?;
        self.flush()?;
        let snap = self.snapshots[idx].clone();
        let l1 = self.read_l1_at(snap.l1_table_offset, snap.l1_size)?;
        let mut snaps = self.snapshots.clone();
        snaps.remove(idx);
        self.write_snapshot_table(snaps)?;
        let mut freed = self.adjust_tree(&l1, -1, progress)?;
        let first = snap.l1_table_offset >> self.cluster_bits;
        for c in first..first + self.clusters_for(u64::from(snap.l1_size) * 8) {
            if self.rc.adjust(&mut self.io, c, -1)? == 0 {
                freed.push(c);
            }
        }
        // Refcounts down on disk before any COPIED flag goes up: a flag may only ever be
        // set on disk where the refcount there is 1.
        self.rc.writeback(&mut self.io)?;
        self.io.sync()?;
        self.release(&freed);
        self.fix_copied()?;
        self.flush()
    }

    /// Make the snapshot's view the active one. The current state is discarded.
    pub fn revert_snapshot(&mut self, key: &str) -> Result<()> {
        self.check_writable()?;
        let idx = self.find_snapshot(key)?;
        self.flush()?;
        let snap = self.snapshots[idx].clone();
        let snap_l1 = self.read_l1_at(snap.l1_table_offset, snap.l1_size)?;
        let size = snap.disk_size;
        let needed = super::l1_entries_for(size, self.cluster_bits);
        if needed > MAX_L1_ENTRIES {
            return Err(self.io.corrupt(format!(
                "snapshot {:?} has an absurd disk size {size}",
                snap.name
            )));
        }
        self.adjust_tree(&snap_l1, 1, &mut |_, _| {})?;
        // COPIED means nothing in a snapshot's L1 table, but a hostile one may carry it:
        // the new active tree starts with every L2 table shared, as the refcounts say.
        let mut new_l1: Vec<u64> = snap_l1.iter().map(|e| e & !COPIED).collect();
        new_l1.resize(new_l1.len().max(needed as usize), 0);
        let n = self.clusters_for(new_l1.len() as u64 * 8);
        let l1_off = self.rc.alloc(&mut self.io, n)?;
        let mut raw: Vec<u8> = new_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        raw.resize((n * self.cluster_size) as usize, 0);
        self.io.write(l1_off, &raw, "L1 table")?;
        self.rc.writeback(&mut self.io)?;
        self.io.sync()?;
        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        let old_off = self.header.l1_table_offset;
        let old_size = self.header.l1_size;
        self.header.l1_table_offset = l1_off;
        self.header.l1_size = self.l1.len() as u32;
        self.header.size = size;
        self.l1_dirty.clear();
        self.write_header()?;
        self.io.sync()?;
        let mut freed = self.adjust_tree(&old_l1, -1, &mut |_, _| {})?;
        if old_size > 0 {
            let first = old_off >> self.cluster_bits;
            for c in first..first + self.clusters_for(u64::from(old_size) * 8) {
                if self.rc.adjust(&mut self.io, c, -1)? == 0 {
                    freed.push(c);
                }
            }
        }
        // As in delete: refcounts down on disk before COPIED flags go up.
        self.rc.writeback(&mut self.io)?;
        self.io.sync()?;
        self.release(&freed);
        self.fix_copied()?;
        self.rebuild_dedupe()?;
        self.flush()
    }
}

/// Bytes the snapshot table takes on disk.
pub fn table_bytes(snaps: &[Snapshot]) -> u64 {
    serialize(snaps).len() as u64
}
