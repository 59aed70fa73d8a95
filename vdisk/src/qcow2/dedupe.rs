//! Inline deduplication of full-cluster writes.
//!
//! A deduplicated cluster is an ordinary qcow2 data cluster with a refcount above one, so
//! `qemu-img check` and QEMU's driver see a valid image. Three structures do the work:
//!
//! - [`Index`], content hash to guest cluster: a cache, bounded by a byte budget,
//!   lossy. It never decides anything on its own: a candidate is used only after its L2
//!   entry has been read and the bytes of its host cluster compared with the new data
//!   (VDO's approach). A stale entry (the cluster was rewritten, discarded or freed)
//!   fails that comparison and costs one read. Slots are 4 bytes: the bucket holds the
//!   low bits of the hash, the slot a few more bits of it (a tag) and the guest cluster.
//! - [`Shared`], host cluster to the active guest clusters that reference it, for every
//!   host cluster the active tree references two or more times (only dedupe makes such
//!   clusters). Exact, rebuilt from the L2 tables at every writable open. When a shared
//!   cluster loses its second-to-last active reference, the last one must become a
//!   private copy: its refcount will soon be one and its COPIED flag must say so, and a
//!   copy makes every intermediate on-disk state a leak at worst, never a wrong flag.
//!   Only a count and the XOR of the referencing guest clusters are kept per cluster:
//!   when the count reaches one, the XOR is the guest cluster that is left.
//! - [`DedupeStats`]: counters for `vdisk ctl stats` and `vdisk image info`.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::cache::OffsetHash;
use super::error::{Qcow2Error, Result};
use super::map::{data_cluster, referenced_clusters, Entry, COPIED, OFFSET_MASK};
use super::Qcow2;

/// Header extension that marks an image for inline dedupe ("vddp"). QEMU keeps unknown
/// header extensions and otherwise ignores them. Its data: a u32 version (1).
pub const EXT_DEDUPE: u32 = 0x7664_6470;
pub const EXT_DEDUPE_VERSION: u32 = 1;

/// Default memory budget of the index: 64 MiB, 16 Mi entries, 64 GiB of unique 4 KiB
/// clusters.
pub const DEFAULT_INDEX_BYTES: u64 = 64 << 20;
/// Slots per bucket: one 32-byte line.
const BUCKET: usize = 8;
/// Fewer tag bits than this would make most lookups read a wrong candidate.
const MIN_TAG_BITS: u32 = 4;

pub fn hash(data: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(data)
}

/// Why an image cannot be deduplicated.
pub fn unsupported_reason(guest_clusters: u64) -> Option<String> {
    let bits = guest_bits(guest_clusters);
    (bits > 32 - MIN_TAG_BITS).then(|| {
        format!(
            "dedupe supports at most {} guest clusters (1 TiB of 4 KiB clusters, 16 TiB of \
             64 KiB ones); this image has {guest_clusters}",
            (1u64 << (32 - MIN_TAG_BITS)) - 1
        )
    })
}

/// Bits a slot needs for a guest cluster number plus one (0 marks an empty slot).
fn guest_bits(guest_clusters: u64) -> u32 {
    64 - guest_clusters.leading_zeros()
}

/// The content index: hash -> guest cluster, in buckets of [`BUCKET`] 4-byte slots,
/// most recently used first; a full bucket drops its oldest slot.
#[derive(Debug)]
pub struct Index {
    slots: Vec<u32>,
    bucket_mask: u64,
    guest_bits: u32,
    entries: u64,
}

impl Index {
    /// An index of at most `budget` bytes (at least one bucket) for an image of
    /// `guest_clusters` clusters.
    pub fn new(budget: u64, guest_clusters: u64) -> Index {
        let buckets = (budget / (BUCKET as u64 * 4)).max(1);
        let buckets = 1u64 << (63 - buckets.leading_zeros());
        Index {
            slots: vec![0; (buckets as usize) * BUCKET],
            bucket_mask: buckets - 1,
            guest_bits: guest_bits(guest_clusters),
            entries: 0,
        }
    }

    fn bucket(&self, h: u64) -> usize {
        ((h & self.bucket_mask) as usize) * BUCKET
    }

    fn tag(&self, h: u64) -> u32 {
        let tag_bits = 32 - self.guest_bits;
        ((h >> 40) as u32) & ((1u32 << tag_bits) - 1)
    }

    fn encode(&self, h: u64, guest: u64) -> u32 {
        (self.tag(h) << self.guest_bits) | (guest as u32 + 1)
    }

    /// Guest clusters whose content may hash to `h`, most recent first.
    pub fn candidates(&self, h: u64, out: &mut Vec<u64>) {
        out.clear();
        let b = self.bucket(h);
        let tag = self.tag(h);
        let mask = (1u32 << self.guest_bits) - 1;
        for &s in &self.slots[b..b + BUCKET] {
            if s != 0 && s >> self.guest_bits == tag {
                out.push(u64::from((s & mask) - 1));
            }
        }
    }

    /// Record that `guest` holds content hashing to `h` (or was just found to): it moves
    /// to the front of its bucket.
    pub fn insert(&mut self, h: u64, guest: u64) {
        let b = self.bucket(h);
        let v = self.encode(h, guest);
        let bucket = &mut self.slots[b..b + BUCKET];
        let end = match bucket.iter().position(|&s| s == v || s == 0) {
            Some(i) => {
                if bucket[i] == 0 {
                    self.entries += 1;
                }
                i
            }
            None => BUCKET - 1,
        };
        bucket.copy_within(0..end, 1);
        bucket[0] = v;
    }

    /// Whether hashes `a` and `b` land in the same bucket with the same tag, so that one
    /// slot cannot tell them apart.
    pub fn same_slot(&self, a: u64, b: u64) -> bool {
        self.bucket(a) == self.bucket(b) && self.tag(a) == self.tag(b)
    }

    /// Forget that `guest` holds content hashing to `h`.
    pub fn remove(&mut self, h: u64, guest: u64) {
        let b = self.bucket(h);
        let v = self.encode(h, guest);
        let bucket = &mut self.slots[b..b + BUCKET];
        if let Some(i) = bucket.iter().position(|&s| s == v) {
            bucket.copy_within(i + 1.., i);
            bucket[BUCKET - 1] = 0;
            self.entries -= 1;
        }
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn capacity(&self) -> u64 {
        self.slots.len() as u64
    }

    pub fn memory_bytes(&self) -> u64 {
        self.slots.len() as u64 * 4
    }

    /// Write the index and the running totals `stats` to `path` (through a temporary
    /// file and a rename, so that a reader sees a whole file or none). Not synced: losing
    /// it loses matches and totals only.
    pub fn save(&self, path: &Path, stats: &DedupeStats) -> std::io::Result<()> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let tmp = side_tmp(path);
        // A new file of our own: a leftover (or a planted symlink) is unlinked, never
        // followed or truncated.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let mut head = Vec::with_capacity(SIDE_TABLE_OFFSET as usize);
        head.extend_from_slice(SIDE_MAGIC);
        head.extend_from_slice(&self.guest_bits.to_le_bytes());
        for v in [
            self.slots.len() as u64,
            self.entries,
            stats.hits,
            stats.misses,
            stats.zero_clusters,
            stats.logical_bytes_written,
            stats.physical_bytes_written,
        ] {
            head.extend_from_slice(&v.to_le_bytes());
        }
        f.write_all_at(&head, 0)?;
        // Empty pages of the table stay holes: a large, sparsely filled index costs
        // little disk and little time.
        let mut page = Vec::with_capacity(SIDE_PAGE_SLOTS * 4);
        for (i, chunk) in self.slots.chunks(SIDE_PAGE_SLOTS).enumerate() {
            if chunk.iter().all(|&s| s == 0) {
                continue;
            }
            page.clear();
            for s in chunk {
                page.extend_from_slice(&s.to_le_bytes());
            }
            f.write_all_at(&page, SIDE_TABLE_OFFSET + (i * SIDE_PAGE_SLOTS * 4) as u64)?;
        }
        f.set_len(SIDE_TABLE_OFFSET + self.slots.len() as u64 * 4)?;
        drop(f);
        std::fs::rename(&tmp, path)
    }

    /// Load what [`Index::save`] wrote: the totals, and the index if it was saved for the
    /// same image geometry and budget (else `None`: the index starts empty).
    pub fn load(
        path: &Path,
        budget: u64,
        guest_clusters: u64,
    ) -> std::io::Result<Option<(Option<Index>, SideHeader)>> {
        let Some(file) = open_side(path)? else {
            return Ok(None);
        };
        let len = file.metadata()?.len();
        let mut f = std::io::BufReader::new(file);
        let mut idx = Index::new(budget, guest_clusters);
        let Some(head) = read_side_header(&mut f)? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a dedupe index (bad magic)",
            ));
        };
        if head.guest_bits != idx.guest_bits || head.slots != idx.slots.len() as u64 {
            return Ok(Some((None, head)));
        }
        // What save() writes, to the byte; the table is read into memory sized by our
        // own budget, never by the file.
        if len != SIDE_TABLE_OFFSET + idx.slots.len() as u64 * 4 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{len} bytes, not what an index of {} slots takes",
                    head.slots
                ),
            ));
        }
        let mut pad = vec![0u8; SIDE_TABLE_OFFSET as usize - SIDE_HEADER_BYTES];
        let mut raw = vec![0u8; idx.slots.len() * 4];
        if f.read_exact(&mut pad).is_err() || f.read_exact(&mut raw).is_err() {
            return Ok(None);
        }
        for (s, c) in idx.slots.iter_mut().zip(raw.chunks_exact(4)) {
            *s = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        idx.entries = idx.slots.iter().filter(|&&s| s != 0).count() as u64;
        Ok(Some((Some(idx), head)))
    }
}

const SIDE_MAGIC: &[u8; 8] = b"VDDEDUP2";

/// What the side file's header says: the index's geometry, and the running totals of
/// the dedupe counters up to the clean close that wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SideHeader {
    pub guest_bits: u32,
    pub slots: u64,
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
    pub zero_clusters: u64,
    pub logical_bytes_written: u64,
    pub physical_bytes_written: u64,
}

const SIDE_HEADER_BYTES: usize = 12 + 7 * 8;
/// The table starts at the second page of the side file.
const SIDE_TABLE_OFFSET: u64 = 4096;
const SIDE_PAGE_SLOTS: usize = 1024;

fn read_side_header(f: &mut impl Read) -> std::io::Result<Option<SideHeader>> {
    let mut raw = [0u8; SIDE_HEADER_BYTES];
    if f.read_exact(&mut raw).is_err() || &raw[..8] != SIDE_MAGIC {
        return Ok(None);
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[12 + 8 * i..20 + 8 * i]);
        u64::from_le_bytes(b)
    };
    Ok(Some(SideHeader {
        guest_bits: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
        slots: u64_at(0),
        entries: u64_at(1),
        hits: u64_at(2),
        misses: u64_at(3),
        zero_clusters: u64_at(4),
        logical_bytes_written: u64_at(5),
        physical_bytes_written: u64_at(6),
    }))
}

/// The header of the index side file of `image`, if there is a readable one.
pub fn side_header(image: &Path) -> Option<SideHeader> {
    let mut f = open_side(&side_path(image)).ok().flatten()?;
    read_side_header(&mut f).ok().flatten()
}

/// Open a side file for reading: `None` if there is none. It sits next to the image, where
/// others may be able to write: a symlink is not followed, a FIFO does not block, and
/// anything but a regular file is refused.
fn open_side(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a symlink; not followed",
            ))
        }
        Err(e) => return Err(e),
    };
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(Some(f))
}

/// Where the index of `image` is kept while the image is closed: `IMAGE.dedupe`.
pub fn side_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".dedupe");
    PathBuf::from(s)
}

fn side_tmp(side: &Path) -> PathBuf {
    let mut s = side.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// The active references of one shared host cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refs {
    pub count: u32,
    /// XOR of the guest cluster numbers that reference it.
    pub xor: u64,
}

/// Host clusters referenced two or more times by the active tree.
pub type Shared = HashMap<u64, Refs, OffsetHash>;

/// Bytes a [`Shared`] map of `n` clusters takes, roughly (key, value and control byte,
/// at hashbrown's load factor).
pub fn shared_bytes(n: usize) -> u64 {
    (n as u64 * (8 + 16 + 1)) * 8 / 7
}

/// Build the shared map from `(host cluster, guest cluster)` pairs of the active tree's
/// entries that are not COPIED (the only ones that can share a cluster).
pub fn shared_from_pairs(mut pairs: Vec<(u64, u64)>) -> Shared {
    pairs.sort_unstable();
    let mut out = Shared::default();
    for run in pairs.chunk_by(|a, b| a.0 == b.0) {
        if run.len() >= 2 {
            let xor = run.iter().fold(0, |x, p| x ^ p.1);
            out.insert(
                run[0].0,
                Refs {
                    count: run.len() as u32,
                    xor,
                },
            );
        }
    }
    out
}

/// Bytes of recently matched shared clusters kept in memory ([`Hot`]).
pub const HOT_BYTES: u64 = 4 << 20;

/// The contents of the shared clusters matched most recently, so that matching them again
/// compares bytes in memory instead of reading the cluster: a shared cluster is never
/// written in place (its entries are not COPIED), so its bytes cannot change while it is
/// shared. An entry leaves when its cluster stops being shared.
#[derive(Debug, Default)]
pub struct Hot {
    map: HashMap<u64, Box<[u8]>, OffsetHash>,
    order: std::collections::VecDeque<u64>,
    capacity: usize,
}

impl Hot {
    pub fn new(capacity: usize) -> Hot {
        Hot {
            capacity: capacity.max(1),
            ..Hot::default()
        }
    }

    pub fn get(&self, host: u64) -> Option<&[u8]> {
        self.map.get(&host).map(|b| &b[..])
    }

    pub fn insert(&mut self, host: u64, bytes: &[u8]) {
        if self.map.contains_key(&host) {
            return;
        }
        while self.map.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(host, bytes.into());
        self.order.push_back(host);
        // Keys removed out of order stay in `order` until they reach its front; keep it
        // from growing past a few times the capacity.
        if self.order.len() > 4 * self.capacity {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }

    pub fn remove(&mut self, host: u64) {
        self.map.remove(&host);
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }
}

/// Counters of the dedupe path (running totals over clean closes: a crash loses the
/// counts since the last one), and the state of the active tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DedupeStats {
    /// Bytes the guest wrote.
    pub logical_bytes_written: u64,
    /// Bytes of guest data written to the file (cluster copies included).
    pub physical_bytes_written: u64,
    /// Data the active image maps: what it would store without dedupe.
    pub logical_bytes: u64,
    /// Distinct data clusters the active image maps, in bytes.
    pub physical_bytes: u64,
    /// Full-cluster writes stored by reference to an existing cluster.
    pub hits: u64,
    /// Full-cluster writes with no identical cluster found.
    pub misses: u64,
    /// Full-cluster writes of zeros, stored as zero clusters.
    pub zero_clusters: u64,
    /// Index candidates whose bytes differed (stale entries, hash collisions).
    pub verify_mismatches: u64,
    /// Last references of shared clusters given a private copy.
    pub relocations: u64,
    pub index_entries: u64,
    pub index_capacity: u64,
    pub index_bytes: u64,
    pub shared_clusters: u64,
    pub shared_map_bytes: u64,
}

impl DedupeStats {
    /// Logical over physical bytes of the active image (1 when empty).
    pub fn ratio(&self) -> f64 {
        if self.physical_bytes == 0 {
            1.0
        } else {
            self.logical_bytes as f64 / self.physical_bytes as f64
        }
    }
}

/// The dedupe state of an open, writable image.
#[derive(Debug)]
pub struct Dedupe {
    pub index: Index,
    pub shared: Shared,
    /// Active data entries (logical clusters).
    pub mapped: u64,
    /// Last references of shared clusters to give a private copy: (guest cluster, host
    /// cluster it still references).
    pub relocations: Vec<(u64, u64)>,
    pub stats: DedupeStats,
    pub side_file: PathBuf,
    pub candidates: Vec<u64>,
    pub scratch: Vec<u8>,
    pub hot: Hot,
}

impl Dedupe {
    /// The guest cluster `guest` no longer references host cluster `host`.
    pub fn drop_ref(&mut self, guest: u64, host: u64) {
        let Some(r) = self.shared.get_mut(&host) else {
            return;
        };
        r.count -= 1;
        r.xor ^= guest;
        if r.count <= 1 {
            let last = *r;
            self.shared.remove(&host);
            self.hot.remove(host);
            if last.count == 1 {
                self.relocations.push((last.xor, host));
            }
        }
    }

    /// Counts for the active tree: `mapped` data clusters, of which the shared ones are
    /// counted once each.
    pub fn distinct(&self) -> u64 {
        let extra: u64 = self.shared.values().map(|r| u64::from(r.count) - 1).sum();
        self.mapped.saturating_sub(extra)
    }
}

impl Qcow2 {
    /// A cluster about to be written in place: COPIED, so never shared, so never kept in
    /// [`Hot`]; unless a hostile image marks a cluster it references twice as COPIED.
    pub(crate) fn forget_hot(&mut self, host: u64) {
        let bits = self.cluster_bits;
        if let Some(d) = self.dedupe.as_deref_mut() {
            d.hot.remove(host >> bits);
        }
    }

    /// Whether writes are being deduplicated (a marked image, open writable).
    pub fn dedupe_on(&self) -> bool {
        self.dedupe.is_some()
    }

    /// Whether the image is marked for dedupe (the [`EXT_DEDUPE`] header extension).
    pub fn dedupe_marked(&self) -> bool {
        self.header
            .other_extensions
            .iter()
            .any(|(t, _)| *t == EXT_DEDUPE)
    }

    /// Mark the image for dedupe (kept in its header) and start deduplicating writes.
    pub fn enable_dedupe(&mut self, index_bytes: u64) -> Result<()> {
        self.check_writable()?;
        if self.dedupe.is_some() {
            return Ok(());
        }
        let guest_clusters = self.header.size.div_ceil(self.cluster_size);
        if let Some(why) = unsupported_reason(guest_clusters) {
            return Err(self.invalid(why));
        }
        if !self.dedupe_marked() {
            self.header
                .other_extensions
                .push((EXT_DEDUPE, EXT_DEDUPE_VERSION.to_be_bytes().to_vec()));
            self.write_header()?;
            self.io.sync()?;
        }
        self.start_dedupe(index_bytes)
    }

    fn invalid(&self, what: String) -> Qcow2Error {
        Qcow2Error::Invalid {
            path: self.io.path().to_path_buf(),
            what,
        }
    }

    /// Build the dedupe state of a writable open: the shared map from the active tree,
    /// the index from the side file a clean close left (else empty).
    pub(crate) fn start_dedupe(&mut self, index_bytes: u64) -> Result<()> {
        let guest_clusters = self.header.size.div_ceil(self.cluster_size);
        if let Some(why) = unsupported_reason(guest_clusters) {
            return Err(self.invalid(why));
        }
        let started = std::time::Instant::now();
        let (mapped, pairs) = self.walk_active()?;
        let shared = shared_from_pairs(pairs);
        let side_file = side_path(self.io.path());
        let (index, totals) = match Index::load(&side_file, index_bytes, guest_clusters) {
            Ok(Some((idx, head))) => (idx, Some(head)),
            Ok(None) => (None, None),
            Err(e) => {
                tracing::warn!(
                    "{}: dedupe index ignored ({e}); starting empty",
                    side_file.display()
                );
                (None, None)
            }
        };
        let index = index.unwrap_or_else(|| Index::new(index_bytes, guest_clusters));
        let stats = totals.map_or_else(DedupeStats::default, |h| DedupeStats {
            hits: h.hits,
            misses: h.misses,
            zero_clusters: h.zero_clusters,
            logical_bytes_written: h.logical_bytes_written,
            physical_bytes_written: h.physical_bytes_written,
            ..DedupeStats::default()
        });
        // The side file describes the image as it was closed; from now on it would go
        // stale, and a crash must not leave it behind as if it were current. (A stale
        // index would still be safe, every candidate is compared byte for byte, but it
        // would waste reads.)
        if let Err(e) = std::fs::remove_file(&side_file) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("{}: cannot remove ({e})", side_file.display());
            }
        }
        tracing::info!(
            image = %self.io.path().display(),
            index_entries = index.entries(),
            index_bytes = index.memory_bytes(),
            shared_clusters = shared.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "dedupe on"
        );
        self.dedupe = Some(Box::new(Dedupe {
            index,
            shared,
            mapped,
            relocations: Vec::new(),
            stats,
            side_file,
            candidates: Vec::new(),
            scratch: vec![0; self.cluster_size as usize],
            hot: Hot::new((HOT_BYTES / self.cluster_size) as usize),
        }));
        Ok(())
    }

    /// After a change of the whole active tree (revert, repair): recount it.
    pub(crate) fn rebuild_dedupe(&mut self) -> Result<()> {
        if self.dedupe.is_none() {
            return Ok(());
        }
        let (mapped, pairs) = self.walk_active()?;
        if let Some(d) = self.dedupe.as_deref_mut() {
            d.mapped = mapped;
            d.shared = shared_from_pairs(pairs);
            d.hot.clear();
            d.relocations.clear();
        }
        Ok(())
    }

    /// Data entries of the active tree, and the (host cluster, guest cluster) pairs of
    /// those that are not COPIED.
    fn walk_active(&mut self) -> Result<(u64, Vec<(u64, u64)>)> {
        let mut mapped = 0u64;
        let mut pairs = Vec::new();
        let l2_bits = self.l2_bits();
        for i in 0..self.l1.len() {
            let l2_off = self.l1[i] & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.check_table_offset(l2_off, &format!("L2 table of L1 entry {i}"))?;
            let table = self.l2_table_copy(l2_off)?;
            for (j, &e) in table.iter().enumerate() {
                if let Some(host) = data_cluster(e, self.cluster_bits) {
                    mapped += 1;
                    if e & COPIED == 0 {
                        pairs.push((host, ((i as u64) << l2_bits) + j as u64));
                    }
                }
            }
        }
        Ok((mapped, pairs))
    }

    /// Keep the dedupe state in step with a change of one active L2 entry.
    pub(crate) fn note_remap(&mut self, guest_cluster: u64, old: u64, new: u64) {
        let bits = self.cluster_bits;
        let Some(d) = self.dedupe.as_deref_mut() else {
            return;
        };
        let (o, n) = (data_cluster(old, bits), data_cluster(new, bits));
        if o == n {
            return;
        }
        if let Some(host) = o {
            d.mapped = d.mapped.saturating_sub(1);
            d.drop_ref(guest_cluster, host);
        }
        if n.is_some() {
            d.mapped += 1;
        }
    }

    /// Write guest data on a dedupe image: whole clusters are looked up, partial ones
    /// written as usual.
    pub(crate) fn write_dedupe(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let within = pos & (cs - 1);
            let n = ((cs - within) as usize).min(data.len() - done);
            let chunk = &data[done..done + n];
            if n as u64 == cs {
                self.write_cluster_dedupe(pos >> self.cluster_bits, chunk)?;
            } else {
                self.write_plain(pos, chunk)?;
                self.dedupe_stats_mut(|s| s.physical_bytes_written += n as u64);
            }
            done += n;
        }
        self.dedupe_stats_mut(|s| s.logical_bytes_written += data.len() as u64);
        self.settle_dedupe()
    }

    fn dedupe_stats_mut(&mut self, f: impl FnOnce(&mut DedupeStats)) {
        if let Some(d) = self.dedupe.as_deref_mut() {
            f(&mut d.stats);
        }
    }

    fn write_cluster_dedupe(&mut self, gc: u64, chunk: &[u8]) -> Result<()> {
        let pos = gc << self.cluster_bits;
        if is_zero(chunk) {
            self.zero_or_discard(pos, self.cluster_size, true, true)?;
            self.dedupe_stats_mut(|s| s.zero_clusters += 1);
            return Ok(());
        }
        let h = hash(chunk);
        if self.dedupe_hit(gc, h, chunk)? {
            self.dedupe_stats_mut(|s| s.hits += 1);
            return Ok(());
        }
        self.write_plain(pos, chunk)?;
        let cs = self.cluster_size;
        if let Some(d) = self.dedupe.as_deref_mut() {
            d.index.insert(h, gc);
            d.stats.misses += 1;
            d.stats.physical_bytes_written += cs;
        }
        Ok(())
    }

    /// Store guest cluster `gc` (content `chunk`, hash `h`) by reference to an identical
    /// cluster, if the index knows one. Returns whether it did.
    fn dedupe_hit(&mut self, gc: u64, h: u64, chunk: &[u8]) -> Result<bool> {
        let Some(d) = self.dedupe.as_deref_mut() else {
            return Ok(false);
        };
        let mut cands = std::mem::take(&mut d.candidates);
        let mut scratch = std::mem::take(&mut d.scratch);
        d.index.candidates(h, &mut cands);
        let mut result = Ok(false);
        for &cand in &cands {
            match self.try_share(gc, cand, h, chunk, &mut scratch) {
                Ok(false) => continue,
                other => {
                    result = other;
                    break;
                }
            }
        }
        if let Some(d) = self.dedupe.as_deref_mut() {
            d.candidates = cands;
            d.scratch = scratch;
        }
        result
    }

    /// Share the cluster of guest cluster `cand` with `gc` if it holds `chunk`.
    fn try_share(
        &mut self,
        gc: u64,
        cand: u64,
        h: u64,
        chunk: &[u8],
        scratch: &mut [u8],
    ) -> Result<bool> {
        let bits = self.cluster_bits;
        let stale = |img: &mut Qcow2| {
            if let Some(d) = img.dedupe.as_deref_mut() {
                d.index.remove(h, cand);
            }
            Ok(false)
        };
        if (cand << bits) >= self.header.size {
            return stale(self);
        }
        let raw = self.l2_entry(cand)?;
        let Ok(Entry::Data { host, copied }) = self.decode(raw, cand) else {
            return stale(self);
        };
        let host_cluster = host >> bits;
        if self.is_metadata(host) {
            return stale(self);
        }
        // A refcount at its limit cannot take one more reference: store a new copy.
        if self.rc.get(&mut self.io, host_cluster)? >= u16::MAX - 1 {
            return Ok(false);
        }
        let in_memory = self.dedupe.as_deref().is_some_and(|d| {
            d.shared.contains_key(&host_cluster)
                && d.hot.get(host_cluster).is_some_and(|b| b == chunk)
        });
        if !in_memory {
            self.verify_by_reading(cand, host, h, chunk, scratch, copied)?;
        }
        if !in_memory && scratch != chunk {
            return Ok(false);
        }
        let mine = self.l2_entry(gc)?;
        if data_cluster(mine, bits) == Some(host_cluster) {
            // The same bytes again, where they already are.
            return Ok(true);
        }
        let cs = self.cluster_size;
        if copied {
            // The candidate is private (refcount 1, COPIED). Sharing it in place would
            // mean clearing its COPIED flag and raising its refcount, two writes to two
            // tables with a crash window between them where the flag is wrong. A new
            // cluster with refcount 2 for both is never wrong on disk: until both
            // entries point at it, it is only leaked, and so is the old one after.
            self.ensure_l2_writable(self.split(gc).0)?;
            self.ensure_l2_writable(self.split(cand).0)?;
            let shared = self.rc.alloc(&mut self.io, 1)?;
            self.rc.adjust(&mut self.io, shared >> bits, 1)?;
            self.io.write(shared, chunk, "deduplicated cluster")?;
            if let Some(d) = self.dedupe.as_deref_mut() {
                d.shared.insert(
                    shared >> bits,
                    Refs {
                        count: 2,
                        xor: gc ^ cand,
                    },
                );
                d.stats.physical_bytes_written += cs;
                d.hot.insert(shared >> bits, chunk);
            }
            self.remap(gc, mine, shared)?;
            self.remap(cand, raw, shared)?;
        } else {
            // Already shared (by dedupe, or with a snapshot): one more reference. Its
            // entries are not COPIED, so nothing else changes.
            if let Some(d) = self.dedupe.as_deref_mut() {
                let refs = d.shared.entry(host_cluster).or_insert(Refs {
                    count: 1,
                    xor: cand,
                });
                refs.count += 1;
                refs.xor ^= gc;
            }
            self.rc.adjust(&mut self.io, host_cluster, 1)?;
            self.remap(gc, mine, host)?;
        }
        if let Some(d) = self.dedupe.as_deref_mut() {
            d.index.insert(h, cand);
        }
        Ok(true)
    }

    /// Read the candidate's cluster into `scratch` and compare: on a mismatch, count it
    /// and drop the index entry if the cluster no longer hashes to its slot (it was
    /// rewritten); on a match of a shared cluster, keep its bytes in memory.
    fn verify_by_reading(
        &mut self,
        cand: u64,
        host: u64,
        h: u64,
        chunk: &[u8],
        scratch: &mut [u8],
        copied: bool,
    ) -> Result<()> {
        self.io.read_data(host, scratch)?;
        let host_cluster = host >> self.cluster_bits;
        let Some(d) = self.dedupe.as_deref_mut() else {
            return Ok(());
        };
        if scratch != chunk {
            d.stats.verify_mismatches += 1;
            if !d.index.same_slot(hash(scratch), h) {
                d.index.remove(h, cand);
            }
        } else if !copied && d.shared.contains_key(&host_cluster) {
            d.hot.insert(host_cluster, scratch);
        }
        Ok(())
    }

    /// Point guest cluster `gc` (entry `old`) at shared cluster `host` (its refcount
    /// already counts this reference) and drop what `old` referenced.
    fn remap(&mut self, gc: u64, old: u64, host: u64) -> Result<()> {
        self.set_l2_entry(gc, host)?;
        for c in referenced_clusters(old, self.cluster_bits) {
            self.rc.queue_free(c);
        }
        Ok(())
    }

    /// Give each shared cluster's last active reference a private copy (see the module
    /// doc), so that the COPIED flags stay exact as the refcounts drop.
    pub(crate) fn settle_dedupe(&mut self) -> Result<()> {
        let bits = self.cluster_bits;
        loop {
            let Some(d) = self.dedupe.as_deref_mut() else {
                return Ok(());
            };
            let Some((g, host)) = d.relocations.pop() else {
                break;
            };
            if d.shared.contains_key(&host) {
                continue;
            }
            let raw = self.l2_entry(g)?;
            if data_cluster(raw, bits) != Some(host) || raw & COPIED != 0 {
                continue;
            }
            self.ensure_l2_writable(self.split(g).0)?;
            let copy = self.rc.alloc(&mut self.io, 1)?;
            let mut buf = vec![0u8; self.cluster_size as usize];
            self.io.read_data(host << bits, &mut buf)?;
            self.io
                .write(copy, &buf, "copy of a deduplicated cluster")?;
            self.set_l2_entry(g, copy | COPIED)?;
            self.rc.queue_free(host);
            let cs = self.cluster_size;
            self.dedupe_stats_mut(|s| {
                s.relocations += 1;
                s.physical_bytes_written += cs;
            });
        }
        Ok(())
    }

    /// The dedupe counters and the state of the active tree, for an image opened
    /// writable with dedupe on.
    pub fn dedupe_stats(&self) -> Option<DedupeStats> {
        let d = self.dedupe.as_deref()?;
        let cs = self.cluster_size;
        Some(DedupeStats {
            logical_bytes: d.mapped * cs,
            physical_bytes: d.distinct() * cs,
            index_entries: d.index.entries(),
            index_capacity: d.index.capacity(),
            index_bytes: d.index.memory_bytes(),
            shared_clusters: d.shared.len() as u64,
            shared_map_bytes: shared_bytes(d.shared.len()),
            ..d.stats
        })
    }

    /// Logical and physical bytes of the active tree, by a walk of its L2 tables (for
    /// `vdisk image info` on any image).
    pub fn scan_sharing(&mut self) -> Result<(u64, u64)> {
        let (mapped, pairs) = self.walk_active()?;
        let shared = shared_from_pairs(pairs);
        let extra: u64 = shared.values().map(|r| u64::from(r.count) - 1).sum();
        let cs = self.cluster_size;
        Ok((mapped * cs, mapped.saturating_sub(extra) * cs))
    }

    /// Keep the index for the next open (clean shutdown). Failing loses matches only.
    pub fn save_dedupe_index(&mut self) {
        let Some(d) = self.dedupe.as_deref() else {
            return;
        };
        match d.index.save(&d.side_file, &d.stats) {
            Ok(()) => tracing::info!(
                file = %d.side_file.display(),
                entries = d.index.entries(),
                "dedupe index saved"
            ),
            Err(e) => tracing::warn!(
                "{}: cannot save the dedupe index ({e}); the next open starts empty",
                d.side_file.display()
            ),
        }
    }
}

fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_finds_what_it_holds_and_drops_the_oldest() {
        let mut idx = Index::new(64, 1 << 20);
        assert_eq!(idx.capacity(), 16);
        let mut out = Vec::new();
        // Nine entries into one bucket (same low bits, different tags).
        let h = |i: u64| (i << 40) | 1;
        for i in 0..9 {
            idx.insert(h(i), i);
        }
        assert_eq!(idx.entries(), 8);
        idx.candidates(h(0), &mut out);
        assert!(out.is_empty(), "the oldest entry was dropped: {out:?}");
        idx.candidates(h(8), &mut out);
        assert_eq!(out, vec![8]);
        // Re-inserting moves an entry to the front without duplicating it.
        idx.insert(h(1), 1);
        assert_eq!(idx.entries(), 8);
        idx.insert(h(9), 9);
        idx.candidates(h(1), &mut out);
        assert_eq!(out, vec![1], "refreshed, so kept");
        idx.candidates(h(2), &mut out);
        assert!(out.is_empty(), "now the oldest, dropped");
        idx.remove(h(9), 9);
        idx.candidates(h(9), &mut out);
        assert!(out.is_empty());
        assert_eq!(idx.entries(), 7);
    }

    #[test]
    fn guest_cluster_zero_and_the_largest_fit() {
        let n = (1u64 << 28) - 1;
        assert!(unsupported_reason(n).is_none());
        assert!(unsupported_reason(n + 1).is_some());
        let mut idx = Index::new(1 << 10, n);
        let mut out = Vec::new();
        for g in [0, n - 1] {
            idx.insert(g.wrapping_mul(0x9e37_79b9_7f4a_7c15), g);
            idx.candidates(g.wrapping_mul(0x9e37_79b9_7f4a_7c15), &mut out);
            assert_eq!(out, vec![g]);
        }
    }

    #[test]
    fn side_file_round_trip_and_mismatch() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("x.dedupe");
        let mut idx = Index::new(1 << 12, 1000);
        for g in 0..100u64 {
            idx.insert(hash(&g.to_le_bytes()), g);
        }
        let stats = DedupeStats {
            hits: 7,
            physical_bytes_written: 9,
            ..DedupeStats::default()
        };
        idx.save(&p, &stats).expect("save");
        let (back, head) = Index::load(&p, 1 << 12, 1000)
            .expect("load")
            .expect("a file");
        let back = back.expect("fits");
        assert_eq!(back.slots, idx.slots);
        assert_eq!(back.entries(), idx.entries());
        assert_eq!((head.hits, head.physical_bytes_written), (7, 9));
        let (other, head) = Index::load(&p, 1 << 13, 1000)
            .expect("load")
            .expect("a file");
        assert!(other.is_none(), "another budget");
        assert_eq!(head.hits, 7, "the totals survive a new budget");
        let (other, _) = Index::load(&p, 1 << 12, 1 << 20)
            .expect("load")
            .expect("a file");
        assert!(other.is_none(), "another geometry");
        // Corrupt: an error, which the caller logs before starting with an empty index.
        std::fs::write(&p, b"short").expect("write");
        assert!(Index::load(&p, 1 << 12, 1000).is_err());
    }

    #[test]
    fn shared_map_keeps_the_last_reference() {
        let mut shared = shared_from_pairs(vec![(5, 10), (7, 1), (5, 11), (5, 12)]);
        assert_eq!(shared.len(), 1, "cluster 7 has one reference only");
        assert_eq!(
            shared.get(&5),
            Some(&Refs {
                count: 3,
                xor: 10 ^ 11 ^ 12
            })
        );
        shared.insert(
            9,
            Refs {
                count: 2,
                xor: 3 ^ 4,
            },
        );
        let mut d = Dedupe {
            index: Index::new(64, 100),
            shared,
            mapped: 5,
            relocations: Vec::new(),
            stats: DedupeStats::default(),
            side_file: PathBuf::new(),
            candidates: Vec::new(),
            scratch: Vec::new(),
            hot: Hot::new(4),
        };
        assert_eq!(d.distinct(), 5 - 2 - 1);
        d.drop_ref(11, 5);
        assert!(d.relocations.is_empty());
        d.drop_ref(10, 5);
        assert_eq!(d.relocations, vec![(12, 5)], "guest cluster 12 is left");
        assert!(!d.shared.contains_key(&5));
        d.drop_ref(4, 9);
        assert_eq!(d.relocations, vec![(12, 5), (3, 9)]);
    }

    /// The side file sits next to the image, where others may write: what they plant
    /// there is neither followed nor blocked on, and a planted temporary file is never
    /// written through.
    #[test]
    fn planted_side_files_are_refused_not_followed() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("x.dedupe");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep me").expect("write victim");
        let idx = Index::new(1 << 12, 1000);
        let stats = DedupeStats::default();

        // A symlink where the temporary file goes: unlinked, the victim untouched.
        symlink(&victim, side_tmp(&p)).expect("symlink tmp");
        idx.save(&p, &stats).expect("save");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"keep me");
        assert!(std::fs::symlink_metadata(&p)
            .expect("saved")
            .file_type()
            .is_file());

        // A symlink to a valid index: not followed.
        let real = d.path().join("real.dedupe");
        std::fs::rename(&p, &real).expect("rename");
        symlink(&real, &p).expect("symlink");
        assert!(Index::load(&p, 1 << 12, 1000).is_err());
        assert!(side_header(&p.with_extension("")).is_none());
        std::fs::remove_file(&p).expect("rm");

        // A FIFO with no writer: refused at once, not waited on.
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(Index::load(&p, 1 << 12, 1000).is_err());
        std::fs::remove_file(&p).expect("rm");

        // A truncated or padded index: refused as a whole.
        idx.save(&p, &stats).expect("save");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open");
        f.set_len(SIDE_TABLE_OFFSET + 8).expect("truncate");
        assert!(Index::load(&p, 1 << 12, 1000).is_err());
        std::fs::write(&p, b"garbage, not an index").expect("write");
        assert!(Index::load(&p, 1 << 12, 1000).is_err());
    }
}
