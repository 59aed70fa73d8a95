//! qcow2 version 3, a declared subset, read and written by our own code.
//!
//! Supported: L1/L2 tables, 16-bit refcounts (refcount_order 4), cluster sizes 4 KiB to
//! 2 MiB (64 KiB by default), zero clusters, internal snapshots, a read-only backing
//! chain (raw or qcow2, at most [`MAX_BACKING_DEPTH`] deep, loops refused), the dirty
//! bit. Refused at open with an error naming the feature: version 2, incompatible feature
//! bits other than dirty (corrupt, external data file, compression type, extended L2),
//! encryption, refcount widths other than 16 bits. Compressed clusters are not refused at
//! open (finding them would mean reading every L2 table): a read, write or map that meets
//! one fails with [`Qcow2Error::Compressed`]; discard and snapshots handle them.
//!
//! # On-disk ordering (crash safety)
//! 1. Refcount increments reach the file and are fdatasync'ed before any L1/L2 entry that
//!    references the new cluster is written: every L2 write-back (eviction or flush) and
//!    every L1 write is preceded by a refcount write-back and an fdatasync.
//! 2. Guest data (and the copy-on-write fill) of a new cluster is written before its L2
//!    entry is installed ([`Qcow2::prepare_write`] allocates and fills, the caller writes
//!    the data, [`Qcow2::commit_write`] installs), and the fdatasync of rule 1 makes the
//!    data durable before the L2 table is written. New L2 tables are written and synced
//!    before the L1 entry pointing at them.
//! 3. Decrements are queued and applied only in [`Qcow2::flush`], after the L2/L1 change
//!    that dropped the reference is durable; until then the cluster keeps its refcount
//!    and cannot be reallocated. Clusters whose refcount reaches zero get their blocks
//!    punched out of the file (PUNCH_HOLE | KEEP_SIZE).
//!
//! A crash may leak clusters (refcount higher than the references); `check --repair`
//! reclaims them. It never leaves a mapping pointing at unwritten data or at a reused
//! cluster.
//!
//! # The dirty bit
//! Refcounts are kept exact (QEMU's behaviour with lazy refcounts off), so we never set
//! the dirty bit. An image QEMU left dirty (lazy refcounts) opens: read-only with a warning
//! that `vdisk image check --repair` is recommended, writable after the refcounts are
//! rebuilt by a repair (as QEMU does), which then clears the bit.
//!
//! # Caches
//! L2 tables and refcount blocks go through bounded write-back caches, sized to the image
//! by default as QEMU sizes its own ([`AUTO_CACHE_BYTES`]: L2 tables for the whole virtual
//! size, 1 to 32 MiB; refcount blocks a quarter of that, at least 256 KiB). Each cache
//! holds at least 4 tables whatever the byte budget. The L1 table and the refcount table
//! stay in memory (both are bounded: 32 MiB and 8 MiB, QEMU's limits).
//!
//! # Concurrency
//! One `Qcow2` is driven by one thread. Between `prepare_write` and `commit_write` the
//! caller must not issue another write or discard overlapping the same clusters, nor
//! create, delete or revert snapshots.

mod backing;
mod cache;
mod check;
mod dedupe;
mod error;
mod header;
mod io;
mod map;
mod pins;
mod refcount;
mod snapshot;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use self::backing::Backing;
pub use self::check::CheckReport;
pub use self::dedupe::{side_header, side_path, DedupeStats, SideHeader, DEFAULT_INDEX_BYTES};
pub use self::error::{Qcow2Error, Result};
pub use self::header::{Header, MAGIC};
pub use self::map::{Extent, ExtentKind};
pub use self::pins::ReadPins;
pub use self::snapshot::Snapshot;

use self::cache::MetaCache;
use self::dedupe::Dedupe;
use self::io::{io_err, ImageFile};
use self::map::{Entry, COPIED, OFFSET_MASK, ZERO};
use self::refcount::Refcounts;
use crate::open::Access;

pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;
pub const MIN_CLUSTER_SIZE: u64 = 4 << 10;
pub const MAX_CLUSTER_SIZE: u64 = 2 << 20;
pub const DEFAULT_L2_CACHE_BYTES: u64 = 1 << 20;
pub const DEFAULT_REFCOUNT_CACHE_BYTES: u64 = 256 << 10;
/// A cache budget meaning "sized to the image" (the default), as QEMU does: L2 tables
/// for the whole virtual size, from [`DEFAULT_L2_CACHE_BYTES`] up to
/// [`MAX_AUTO_L2_CACHE_BYTES`]; refcount blocks a quarter of that, at least
/// [`DEFAULT_REFCOUNT_CACHE_BYTES`].
pub const AUTO_CACHE_BYTES: u64 = u64::MAX;
/// QEMU's default ceiling for the L2 cache on Linux.
pub const MAX_AUTO_L2_CACHE_BYTES: u64 = 32 << 20;
const MIN_CACHE_TABLES: u64 = 4;
/// QEMU's limit on the L1 table: 32 MiB.
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
pub const MAX_BACKING_DEPTH: usize = 16;
/// Queued decrements past 1 GiB of clusters (at least 4096 of them) trigger a flush: that
/// bounds the memory they take (8 bytes each, 2 MiB at 4 KiB clusters) and what a crash
/// can leak. Every deduplicated write over a mapped cluster queues one, and a forced flush
/// costs an fdatasync of all the file's dirty data: with 4096 it came every 4096
/// duplicate writes.
const PENDING_FREES_BYTES: u64 = 1 << 30;
const MIN_PENDING_FREES: usize = 4096;

#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Budget of the L2 table cache; [`AUTO_CACHE_BYTES`] sizes it to the image.
    pub l2_cache_bytes: u64,
    /// Budget of the refcount block cache; [`AUTO_CACHE_BYTES`] sizes it to the image.
    pub refcount_cache_bytes: u64,
    /// Memory budget of the dedupe index, for images marked for dedupe.
    pub dedupe_index_bytes: u64,
    /// Directories besides the image's own where its backing files may live.
    pub backing_dirs: Vec<PathBuf>,
    /// The format was probed (`--format auto`), not given: an image that names a backing
    /// file is refused and the file is never opened. A guest can write a qcow2 header into
    /// a raw disk it was given; it must not choose host files for us to read.
    pub format_probed: bool,
    /// A read-only open that tolerates writers (QEMU's `-U`): no lock keeps them out.
    pub force_share: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            l2_cache_bytes: AUTO_CACHE_BYTES,
            refcount_cache_bytes: AUTO_CACHE_BYTES,
            dedupe_index_bytes: DEFAULT_INDEX_BYTES,
            backing_dirs: Vec::new(),
            format_probed: false,
            force_share: false,
        }
    }
}

impl OpenOptions {
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            ..Default::default()
        }
    }
}

/// Counters of what the image did since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Clusters allocated (data, L2 tables, other metadata).
    pub allocated_clusters: u64,
    /// Clusters whose refcount dropped to zero.
    pub freed_clusters: u64,
    /// Copy-on-write copies of shared data clusters or L2 tables.
    pub cow_clusters: u64,
    pub l2_cache_misses: u64,
    /// Dirty L2 tables written back because the cache was full.
    pub l2_writebacks: u64,
    pub syncs: u64,
}

/// One piece of a planned write: write `len` guest bytes at `host_offset` in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSegment {
    pub guest_offset: u64,
    pub host_offset: u64,
    pub len: u64,
}

#[derive(Debug)]
struct Install {
    guest_cluster: u64,
    old_entry: u64,
    new_entry: u64,
    /// Clusters the old entry referenced, to free once the new entry is durable.
    free: std::ops::Range<u64>,
}

/// The result of [`Qcow2::prepare_write`]: where the guest data goes. Write every
/// segment, then hand the plan to [`Qcow2::commit_write`].
#[derive(Debug)]
#[must_use = "a prepared write must be committed"]
pub struct WritePlan {
    segments: Vec<WriteSegment>,
    installs: Vec<Install>,
}

impl WritePlan {
    pub fn segments(&self) -> &[WriteSegment] {
        &self.segments
    }
}

pub struct Qcow2 {
    io: ImageFile,
    read_only: bool,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    l1: Vec<u64>,
    /// Dirty 512-byte sectors of the L1 table (64 entries each).
    l1_dirty: BTreeSet<usize>,
    l2_cache: MetaCache<u64>,
    rc: Refcounts,
    snapshots: Vec<Snapshot>,
    backing: Option<Box<Backing>>,
    counters: Counters,
    /// Inline dedupe state: images marked for dedupe, opened writable.
    dedupe: Option<Box<Dedupe>>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.io.path())
            .field("size", &self.header.size)
            .field("cluster_size", &self.cluster_size)
            .finish_non_exhaustive()
    }
}

/// The cache budgets for an image of `size` bytes: `opts`' own, or sized to the image.
fn cache_budgets(opts: &OpenOptions, size: u64, cluster_bits: u32) -> (u64, u64) {
    // One 8-byte L2 entry per cluster, in whole tables.
    let cs = 1u64 << cluster_bits;
    let whole = (size >> cluster_bits)
        .saturating_mul(8)
        .next_multiple_of(cs);
    let l2 = match opts.l2_cache_bytes {
        AUTO_CACHE_BYTES => whole.clamp(DEFAULT_L2_CACHE_BYTES, MAX_AUTO_L2_CACHE_BYTES),
        b => b,
    };
    let rc = match opts.refcount_cache_bytes {
        AUTO_CACHE_BYTES => (l2 / 4).max(DEFAULT_REFCOUNT_CACHE_BYTES),
        b => b,
    };
    (l2, rc)
}

fn cache_tables(bytes: u64, cluster_size: u64) -> usize {
    usize::try_from((bytes / cluster_size).max(MIN_CACHE_TABLES)).unwrap_or(usize::MAX)
}

/// L1 entries needed to map `size` bytes.
fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let per_l1 = 1u64 << (cluster_bits + cluster_bits - 3);
    size.div_ceil(per_l1)
}

fn read_be64s(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

impl Qcow2 {
    /// Open an image, locked as QEMU locks it: writable, nobody else may write it or hold
    /// it writable; read-only, nobody else may hold it writable (unless
    /// `opts.force_share`). The backing chain is opened read-only and locked likewise.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        let file = crate::open::open_image(path, !opts.read_only)?;
        let access = match (opts.read_only, opts.force_share) {
            (false, _) => Access::Write,
            (true, false) => Access::Read,
            (true, true) => Access::ReadShared,
        };
        crate::open::lock(&file, path, access)?;
        Qcow2::from_file(file, path, opts)
    }

    /// Open the image `file` holds (opened with [`crate::open::open_image`] and locked by
    /// the caller): its metadata is read through it.
    pub fn from_file(file: File, path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        let mut chain = backing::Chain::new(path, &opts.backing_dirs)?;
        Qcow2::open_in_chain(file, path, opts, &mut chain)
    }

    pub(crate) fn open_in_chain(
        file: File,
        path: &Path,
        opts: &OpenOptions,
        chain: &mut backing::Chain,
    ) -> Result<Qcow2> {
        let io = ImageFile::new(file, path)?;
        let mut start = vec![0u8; io.len().min(104) as usize];
        io.file()
            .read_exact_at(&mut start, 0)
            .map_err(|e| io_err(path, "read header", e))?;
        let cluster_bits = Header::peek_cluster_bits(&start, path)?;
        let cs = 1u64 << cluster_bits;
        let mut first = vec![0u8; io.len().min(cs) as usize];
        io.read_meta(0, &mut first, "header")?;
        let header = Header::parse(&first, path)?;

        // The L1 table.
        let needed = l1_entries_for(header.size, cluster_bits);
        let l1_size = u64::from(header.l1_size);
        if l1_size > MAX_L1_ENTRIES || l1_size < needed {
            return Err(io.corrupt(format!(
                "L1 table of {l1_size} entries: {needed} needed for a virtual size of {} \
                 bytes, at most {MAX_L1_ENTRIES} supported",
                header.size
            )));
        }
        let l1_off = header.l1_table_offset;
        let l1_bytes = l1_size * 8;
        if l1_size > 0 && (l1_off % cs != 0 || l1_off < cs) {
            return Err(io.corrupt(format!(
                "L1 table offset {l1_off:#x} is not cluster aligned or overlaps the header"
            )));
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        io.read_meta(l1_off, &mut raw, "L1 table")?;
        let l1 = read_be64s(&raw);

        let (l2_budget, rc_budget) = cache_budgets(opts, header.size, cluster_bits);
        let rc = Refcounts::load(
            &io,
            cluster_bits,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            cache_tables(rc_budget, cs),
        )?;
        let rt = (
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cs,
        );
        if l1_size > 0 && overlaps((l1_off, l1_bytes.next_multiple_of(cs)), rt) {
            return Err(io.corrupt("the L1 table overlaps the refcount table".into()));
        }
        for &b in rc.table() {
            if b != 0 && l1_size > 0 && overlaps((b, cs), (l1_off, l1_bytes)) {
                return Err(io.corrupt(format!("refcount block at {b:#x} overlaps the L1 table")));
            }
        }
        let snapshots = snapshot::load(&io, &header)?;

        let mut img = Qcow2 {
            read_only: opts.read_only,
            cluster_bits,
            cluster_size: cs,
            l1,
            l1_dirty: BTreeSet::new(),
            l2_cache: MetaCache::new(cache_tables(l2_budget, cs)),
            rc,
            snapshots,
            backing: None,
            counters: Counters::default(),
            dedupe: None,
            header,
            io,
        };
        let l1_range = (l1_off, l1_bytes.next_multiple_of(cs));
        for i in 0..img.l1.len() {
            let off = img.l1[i] & OFFSET_MASK;
            if off != 0 {
                img.check_table_offset(off, &format!("L2 table of L1 entry {i}"))?;
                if overlaps((off, cs), rt) || overlaps((off, cs), l1_range) {
                    return Err(img.io.corrupt(format!(
                        "L2 table of L1 entry {i} at {off:#x} overlaps the L1 or refcount table"
                    )));
                }
            }
        }
        if let (true, Some(name)) = (opts.format_probed, &img.header.backing_file) {
            return Err(Qcow2Error::ProbedWithBacking {
                path: path.to_path_buf(),
                backing: name.clone(),
            });
        }
        img.backing = backing::open(path, &img.header, chain)?.map(Box::new);

        if img.header.dirty() {
            if img.read_only {
                tracing::warn!(
                    "{}: the dirty bit is set (refcounts may be stale); run \
                     `vdisk image check --repair`",
                    path.display()
                );
            } else {
                tracing::warn!(
                    "{}: the dirty bit is set; rebuilding refcounts before writing",
                    path.display()
                );
                let report = img.check(true, &mut |_, _| {})?;
                if report.corruptions_remaining() {
                    return Err(img.io.corrupt(format!(
                        "dirty image could not be repaired: {}",
                        report.summary()
                    )));
                }
            }
        }
        if !img.read_only && img.header.autoclear != 0 {
            // We do not maintain bitmaps or any other auto-clear feature.
            img.header.autoclear = 0;
            img.write_header()?;
            img.io.sync()?;
        }
        if !img.read_only && img.dedupe_marked() {
            img.start_dedupe(opts.dedupe_index_bytes)?;
        }
        Ok(img)
    }

    /// Create a new image (refusing to overwrite an existing file) and open it writable.
    /// `size` is rounded up to a multiple of 512. The backing file's format (raw or
    /// qcow2) is detected and recorded in the backing-format header extension; the name
    /// is stored as given (relative names are relative to the new image's directory). The
    /// backing file must live in the new image's directory.
    pub fn create(
        path: &Path,
        size: u64,
        cluster_size: u64,
        backing_file: Option<&Path>,
    ) -> Result<Qcow2> {
        Qcow2::create_with(path, size, cluster_size, backing_file, &[])
    }

    /// [`Qcow2::create`], with the backing file allowed in `backing_dirs` too.
    pub fn create_with(
        path: &Path,
        size: u64,
        cluster_size: u64,
        backing_file: Option<&Path>,
        backing_dirs: &[PathBuf],
    ) -> Result<Qcow2> {
        let invalid = |what: String| Qcow2Error::Invalid {
            path: path.to_path_buf(),
            what,
        };
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
        {
            return Err(invalid(format!(
                "cluster size {cluster_size} is not a power of two from 4 KiB to 2 MiB"
            )));
        }
        let size = size
            .checked_next_multiple_of(512)
            .filter(|&s| s <= 1 << 56)
            .ok_or_else(|| invalid(format!("virtual size {size} is too large")))?;
        let cluster_bits = cluster_size.trailing_zeros();
        let l1_entries = l1_entries_for(size, cluster_bits);
        if l1_entries > MAX_L1_ENTRIES {
            return Err(invalid(format!(
                "virtual size {size} needs an L1 table of {l1_entries} entries; use a larger \
                 cluster size"
            )));
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cluster_size).max(1);
        let meta_clusters = 3 + l1_clusters;
        if meta_clusters > cluster_size / 2 {
            return Err(invalid(format!(
                "virtual size {size} is too large for {cluster_size}-byte clusters"
            )));
        }
        let mut header = Header::new(cluster_bits, size);
        if let Some(b) = backing_file {
            let name = b
                .to_str()
                .ok_or_else(|| invalid("backing file name is not UTF-8".into()))?;
            // Open the chain now, so that a bad backing file fails the create.
            let mut chain = backing::Chain::new(path, backing_dirs)?;
            let base = backing::open_named(path, name, None, &mut chain)?;
            header.backing_file = Some(name.to_string());
            header.backing_format = Some(base.format().to_string());
        }
        header.refcount_table_offset = cluster_size;
        header.refcount_table_clusters = 1;
        header.l1_table_offset = 3 * cluster_size;
        header.l1_size = l1_entries as u32;
        let hdr = header.serialize(path)?;

        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_err(path, "create", e))?;
        crate::open::lock(&file, path, Access::Write)?;
        let mut io = ImageFile::new(file, path)?;
        let cs = cluster_size as usize;
        let mut table = vec![0u8; cs];
        table[..8].copy_from_slice(&(2 * cluster_size).to_be_bytes());
        io.write(cluster_size, &table, "refcount table")?;
        let mut block = vec![0u8; cs];
        for i in 0..meta_clusters as usize {
            block[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        io.write(2 * cluster_size, &block, "refcount block")?;
        let zeros = vec![0u8; cs];
        for i in 0..l1_clusters {
            io.write((3 + i) * cluster_size, &zeros, "L1 table")?;
        }
        io.sync()?;
        io.write(0, &hdr, "header")?;
        io.sync()?;
        drop(io);
        let opts = OpenOptions {
            backing_dirs: backing_dirs.to_vec(),
            ..OpenOptions::default()
        };
        Qcow2::open(path, &opts)
    }

    /// Virtual size of `backing` (raw or qcow2), named as it would be from `image`, which
    /// may name backing files in its own directory and in `backing_dirs`.
    pub fn backing_size(image: &Path, backing: &Path, backing_dirs: &[PathBuf]) -> Result<u64> {
        let name = backing.to_str().ok_or_else(|| Qcow2Error::Invalid {
            path: image.to_path_buf(),
            what: "backing file name is not UTF-8".into(),
        })?;
        let mut chain = backing::Chain::new(image, backing_dirs)?;
        Ok(backing::open_named(image, name, None, &mut chain)?.size())
    }

    pub fn path(&self) -> &Path {
        self.io.path()
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn is_dirty(&self) -> bool {
        self.header.dirty()
    }

    /// Bytes of storage the image file occupies (st_blocks * 512).
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.io.allocated_bytes()
    }

    pub fn file_len(&self) -> u64 {
        self.io.len()
    }

    pub fn counters(&self) -> Counters {
        Counters {
            allocated_clusters: self.rc.allocated_clusters,
            freed_clusters: self.rc.freed_clusters,
            syncs: self.io.syncs(),
            ..self.counters
        }
    }

    /// The image file, for an I/O engine that writes the planned segments itself.
    pub fn file(&self) -> &File {
        self.io.file()
    }

    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_deref()
    }

    /// Refcount of the host cluster holding `host_offset`.
    pub fn refcount(&mut self, host_offset: u64) -> Result<u16> {
        self.rc.get(&mut self.io, host_offset >> self.cluster_bits)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.header.size) {
            return Err(Qcow2Error::OutOfRange {
                path: self.io.path().to_path_buf(),
                offset,
                len,
                size: self.header.size,
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly {
                path: self.io.path().to_path_buf(),
            });
        }
        Ok(())
    }

    pub(crate) fn write_header(&mut self) -> Result<()> {
        self.header.refcount_table_offset = self.rc.table_offset();
        self.header.refcount_table_clusters = self.rc.table_clusters();
        let bytes = self.header.serialize(self.io.path())?;
        self.io.write(0, &bytes, "header")
    }

    /// Read from the backing chain at `offset` (zeros where there is none or past its end).
    pub fn read_backing(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.backing.as_deref_mut() {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(b) => b.read(offset, buf),
        }
    }

    /// Read guest data.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let ext = self.map(pos, (buf.len() - done) as u64)?;
            let n = ext.len as usize;
            let piece = &mut buf[done..done + n];
            match ext.kind {
                ExtentKind::Data { host_offset, .. } => self.io.read_data(host_offset, piece)?,
                ExtentKind::Zero => piece.fill(0),
                ExtentKind::Unallocated => self.read_backing(pos, piece)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Fill the parts of new cluster `new_host` outside `[keep_from, keep_to)` with what
    /// the guest cluster read as before: the old cluster, zeros, or the backing chain.
    /// A cluster past the end the file had before it was allocated (`fresh`) already
    /// reads as zeros, whether the file ends inside it or not (reads past the end are
    /// zeros, here and in QEMU): when zeros are what it needs, nothing is written, which
    /// spares the first write of every cluster a cluster-sized write.
    fn cow_fill(
        &mut self,
        guest_cluster: u64,
        old: Entry,
        new_host: u64,
        fresh: bool,
        keep_from: u64,
        keep_to: u64,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let reads_as_zeros = match old {
            Entry::Zero { .. } => true,
            Entry::Unallocated => self.backing.is_none(),
            Entry::Data { .. } | Entry::Compressed => false,
        };
        if fresh && reads_as_zeros {
            return Ok(());
        }
        let guest_base = guest_cluster << self.cluster_bits;
        for (a, b) in [(0, keep_from), (keep_to, cs)] {
            if b <= a {
                continue;
            }
            let mut buf = vec![0u8; (b - a) as usize];
            match old {
                Entry::Data { host, .. } => self.io.read_data(host + a, &mut buf)?,
                Entry::Unallocated => self.read_backing(guest_base + a, &mut buf)?,
                Entry::Zero { .. } | Entry::Compressed => {}
            }
            self.io.write(new_host + a, &buf, "copy-on-write fill")?;
        }
        Ok(())
    }

    /// Whether the cluster at host offset `host` holds metadata this image knows of
    /// without reading anything: the header, the L1 table, the refcount table, the
    /// snapshot table, or an L2 table or refcount block in the caches. A hostile image can
    /// map a guest cluster onto its own metadata; an in-place write there would corrupt
    /// the image. (`check` finds every overlap; this catches the ones a write would make
    /// worst, at the cost of a few compares.)
    pub(crate) fn is_metadata(&self, host: u64) -> bool {
        let cs = self.cluster_size;
        let cluster = host & !(cs - 1);
        let within = |start: u64, bytes: u64| {
            let end = start.saturating_add(bytes.max(1));
            cluster < end && start < cluster + cs
        };
        cluster == 0
            || within(
                self.header.l1_table_offset,
                u64::from(self.header.l1_size) * 8,
            )
            || within(
                self.rc.table_offset(),
                u64::from(self.rc.table_clusters()) * cs,
            )
            || (self.header.nb_snapshots > 0
                && within(
                    self.header.snapshots_offset,
                    snapshot::table_bytes(self.list_snapshots()),
                ))
            || self.l2_cache.contains(cluster)
            || self.rc.caches_block(cluster)
    }

    /// Plan a write of `len` bytes at `guest_offset`: allocate the clusters it needs
    /// (refcounts set in the cache) and fill the parts of new clusters it does not cover
    /// (from the old cluster, the backing chain, or zeros). The caller writes the data at
    /// the returned segments, then calls [`Qcow2::commit_write`].
    pub fn prepare_write(&mut self, guest_offset: u64, len: u64) -> Result<WritePlan> {
        self.check_writable()?;
        self.check_range(guest_offset, len)?;
        let cs = self.cluster_size;
        let mut plan = WritePlan {
            segments: Vec::new(),
            installs: Vec::new(),
        };
        let end = guest_offset + len;
        let mut pos = guest_offset;
        while pos < end {
            let gc = pos >> self.cluster_bits;
            let within = pos & (cs - 1);
            let n = (cs - within).min(end - pos);
            let raw = self.l2_entry(gc)?;
            let entry = self.decode(raw, gc)?;
            let host = match entry {
                Entry::Data { host, copied: true } => {
                    self.forget_hot(host);
                    if self.is_metadata(host) {
                        return Err(self.io.corrupt(format!(
                            "guest offset {pos:#x} maps onto the image's own metadata at \
                             {host:#x}; refusing to write there (run `vdisk image check`)"
                        )));
                    }
                    host
                }
                Entry::Compressed => {
                    return Err(Qcow2Error::Compressed {
                        path: self.io.path().to_path_buf(),
                        guest_offset: pos,
                    })
                }
                Entry::Zero {
                    host: Some(h),
                    copied: true,
                } => {
                    // A preallocated zero cluster of ours: reuse it, zero-filling the rest.
                    self.cow_fill(gc, entry, h, false, within, within + n)?;
                    plan.installs.push(Install {
                        guest_cluster: gc,
                        old_entry: raw,
                        new_entry: h | COPIED,
                        free: 0..0,
                    });
                    h
                }
                _ => {
                    // Make the L2 table private first, so that its allocation does not
                    // land between this write's data clusters.
                    let (l1i, _) = self.split(gc);
                    self.ensure_l2_writable(l1i)?;
                    // Clusters at or past this offset have never been written.
                    let end_of_file = self.io.len();
                    let new = self.rc.alloc(&mut self.io, 1)?;
                    if matches!(entry, Entry::Data { .. }) {
                        self.counters.cow_clusters += 1;
                    }
                    let fresh = new >= end_of_file;
                    self.cow_fill(gc, entry, new, fresh, within, within + n)?;
                    plan.installs.push(Install {
                        guest_cluster: gc,
                        old_entry: raw,
                        new_entry: new | COPIED,
                        free: map::referenced_clusters(raw, self.cluster_bits),
                    });
                    new
                }
            };
            let seg = WriteSegment {
                guest_offset: pos,
                host_offset: host + within,
                len: n,
            };
            match plan.segments.last_mut() {
                Some(last)
                    if last.host_offset + last.len == seg.host_offset
                        && last.guest_offset + last.len == seg.guest_offset =>
                {
                    last.len += n;
                }
                _ => plan.segments.push(seg),
            }
            pos += n;
        }
        Ok(plan)
    }

    /// Install the L2 entries of a planned write whose data has been written.
    pub fn commit_write(&mut self, plan: WritePlan) -> Result<()> {
        self.check_writable()?;
        let end = plan
            .segments
            .iter()
            .map(|s| s.host_offset + s.len)
            .max()
            .unwrap_or(0);
        self.io.note_written(end);
        for ins in plan.installs {
            let now = self.l2_entry(ins.guest_cluster)?;
            if now != ins.old_entry {
                // Someone changed the mapping meanwhile: drop our cluster, keep theirs.
                for c in map::referenced_clusters(ins.new_entry, self.cluster_bits) {
                    if ins.new_entry & OFFSET_MASK != ins.old_entry & OFFSET_MASK {
                        self.rc.queue_free(c);
                    }
                }
                return Err(Qcow2Error::PlanConflict {
                    path: self.io.path().to_path_buf(),
                    guest_offset: ins.guest_cluster << self.cluster_bits,
                });
            }
            self.set_l2_entry(ins.guest_cluster, ins.new_entry)?;
            for c in ins.free {
                self.rc.queue_free(c);
            }
        }
        self.settle_dedupe()?;
        self.maybe_flush_frees()
    }

    fn maybe_flush_frees(&mut self) -> Result<()> {
        let limit = usize::try_from(PENDING_FREES_BYTES >> self.cluster_bits)
            .unwrap_or(usize::MAX)
            .max(MIN_PENDING_FREES);
        if self.rc.pending_len() > limit {
            self.flush()?;
        }
        Ok(())
    }

    /// Write guest data: with dedupe, cluster by cluster through [`Qcow2::write_dedupe`];
    /// otherwise prepare, write, commit.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if self.dedupe.is_some() {
            return self.write_dedupe(offset, data);
        }
        self.write_plain(offset, data)
    }

    pub(crate) fn write_plain(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let plan = self.prepare_write(offset, data.len() as u64)?;
        for s in plan.segments() {
            let a = (s.guest_offset - offset) as usize;
            self.io
                .write(s.host_offset, &data[a..a + s.len as usize], "guest data")?;
        }
        self.commit_write(plan)
    }

    /// Deallocate whole clusters in the range (partial clusters at the ends are left
    /// alone): zero clusters when there is a backing file, unallocated otherwise.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, true, false)
    }

    /// Make the range read as zeros. Whole clusters become zero clusters (keeping their
    /// allocation when `unmap` is false and they are ours alone); partial clusters get
    /// zeros written.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.zero_or_discard(offset, len, unmap, true)
    }

    pub(crate) fn zero_or_discard(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        zero: bool,
    ) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cs = self.cluster_size;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos >> self.cluster_bits;
            let base = gc << self.cluster_bits;
            let cluster_end = (base + cs).min(self.header.size);
            let n = cluster_end.min(end) - pos;
            if pos != base || pos + n != cluster_end {
                if zero {
                    let zeros = vec![0u8; n as usize];
                    self.write(pos, &zeros)?;
                }
                pos += n;
                continue;
            }
            let raw = self.l2_entry(gc)?;
            let entry = self.decode(raw, gc)?;
            let new = match entry {
                Entry::Data { host, copied: true } if zero && !unmap => host | ZERO | COPIED,
                Entry::Zero {
                    host: Some(_),
                    copied: true,
                } if zero && !unmap => raw,
                _ if self.backing.is_some() => ZERO,
                _ => 0,
            };
            if new != raw {
                self.set_l2_entry(gc, new)?;
                if new & OFFSET_MASK != raw & OFFSET_MASK {
                    for c in map::referenced_clusters(raw, self.cluster_bits) {
                        self.rc.queue_free(c);
                    }
                }
            }
            pos += n;
            self.settle_dedupe()?;
            self.maybe_flush_frees()?;
        }
        Ok(())
    }

    /// Make everything done so far durable, in the order of the module doc, then apply
    /// the queued refcount decrements and punch out freed clusters.
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Clusters freed while a read held them, whose reads are done since.
        self.release(&[]);
        self.rc.writeback(&mut self.io)?;
        self.io.sync()?;
        let dirty = self.l2_cache.dirty_offsets();
        for off in &dirty {
            if let Some(t) = self.l2_cache.peek(*off) {
                let raw: Vec<u8> = t.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.io.write(*off, &raw, "L2 table")?;
            }
            self.l2_cache.mark_clean(*off);
        }
        if !dirty.is_empty() {
            self.io.sync()?;
        }
        if !self.l1_dirty.is_empty() {
            let sectors = std::mem::take(&mut self.l1_dirty);
            for s in sectors {
                let a = s * 64;
                let b = (a + 64).min(self.l1.len());
                let raw: Vec<u8> = self.l1[a..b].iter().flat_map(|e| e.to_be_bytes()).collect();
                self.io
                    .write(self.header.l1_table_offset + a as u64 * 8, &raw, "L1 table")?;
            }
            self.io.sync()?;
        }
        if self.rc.pending_len() > 0 {
            let freed = self.rc.apply_pending(&mut self.io)?;
            self.release(&freed);
            self.rc.writeback(&mut self.io)?;
            self.io.sync()?;
        }
        Ok(())
    }

    /// Clusters whose refcount reached zero: drop stale cached tables, punch holes (not
    /// yet in those a planned read still reads: see `pins`).
    fn release(&mut self, freed: &[u64]) {
        for &c in freed {
            self.l2_cache.remove(c << self.cluster_bits);
        }
        let mut now = self.rc.pins.release(freed);
        now.extend(self.rc.pins.take_unpinned_frees());
        for c in now {
            self.io
                .punch_hole(c << self.cluster_bits, self.cluster_size);
            self.rc.note_free(c);
        }
    }

    /// Pin the clusters of the file range `host_offset..+len`, which a read mapped and is
    /// about to read, until `pins` drops (see `pins`).
    pub fn pin_read(&self, host_offset: u64, len: u64, pins: &mut Option<ReadPins>) {
        if len == 0 {
            return;
        }
        let (first, last) = (
            host_offset >> self.cluster_bits,
            (host_offset + len - 1) >> self.cluster_bits,
        );
        match pins {
            Some(p) => p.add(first, last),
            None => *pins = Some(self.rc.pins.pin(first, last)),
        }
    }

    /// Flush and close. Clears the dirty bit if it is set.
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        self.save_dedupe_index();
        if !self.read_only && self.header.dirty() {
            self.header.incompatible &= !header::INCOMPAT_DIRTY;
            self.write_header()?;
            self.io.sync()?;
        }
        Ok(())
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;
