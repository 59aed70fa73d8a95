//! The qcow2 header (first cluster): parsing with every field range-checked, the
//! supported-feature checks, header extensions, and serialization.

use std::path::Path;

use super::error::{Qcow2Error, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
pub const VERSION: u32 = 3;
/// Length of the version 3 header up to and including `header_length`.
pub const V3_HEADER_LEN: usize = 104;
pub const MIN_CLUSTER_BITS: u32 = 12;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const REFCOUNT_ORDER: u32 = 4;
pub const MAX_BACKING_NAME: usize = 1023;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The feature name table we write, as QEMU does: (type, bit, name).
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    /// Bytes between the 104-byte v3 header and `header_length` (for example QEMU's
    /// compression_type field), kept verbatim when the header is rewritten.
    pub extra_fields: Vec<u8>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Header extensions we do not interpret, kept verbatim (type, data).
    pub other_extensions: Vec<(u32, Vec<u8>)>,
    /// The image's own feature name table, for naming unknown feature bits.
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Round up to a multiple of 8, None on overflow.
fn pad8(n: usize) -> Option<usize> {
    n.checked_add(7).map(|v| v & !7)
}

impl Header {
    /// A new empty image's header.
    pub fn new(cluster_bits: u32, size: u64) -> Header {
        Header {
            cluster_bits,
            size,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            other_extensions: Vec::new(),
            feature_names: Vec::new(),
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }

    /// Cluster bits read from the start of a header, to know how much to read next.
    /// `buf` holds at least the first 24 bytes.
    pub fn peek_cluster_bits(buf: &[u8], path: &Path) -> Result<u32> {
        if buf.len() < 24 || buf[0..4] != MAGIC {
            return Err(Qcow2Error::NotQcow2 {
                path: path.to_path_buf(),
            });
        }
        let bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(unsupported(
                path,
                format!(
                    "cluster_bits {bits} (cluster sizes from 4 KiB to 2 MiB are supported, \
                     bits {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
                ),
            ));
        }
        Ok(bits)
    }

    /// Parse the first cluster of an image (`buf` may be shorter when the file is).
    /// Refuses anything outside the supported subset with an error naming the feature.
    pub fn parse(buf: &[u8], path: &Path) -> Result<Header> {
        let cluster_bits = Header::peek_cluster_bits(buf, path)?;
        let corrupt = |what: String| Qcow2Error::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        if buf.len() < 72 {
            return Err(corrupt("the header is truncated".into()));
        }
        let version = be32(buf, 4);
        if version != VERSION {
            return Err(unsupported(
                path,
                format!("qcow2 version {version} (only version 3 is supported)"),
            ));
        }
        if buf.len() < V3_HEADER_LEN {
            return Err(corrupt("the header is truncated".into()));
        }
        let cluster_size = 1usize << cluster_bits;
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let size = be64(buf, 24);
        let crypt_method = be32(buf, 32);
        let l1_size = be32(buf, 36);
        let l1_table_offset = be64(buf, 40);
        let refcount_table_offset = be64(buf, 48);
        let refcount_table_clusters = be32(buf, 56);
        let nb_snapshots = be32(buf, 60);
        let snapshots_offset = be64(buf, 64);
        let incompatible = be64(buf, 72);
        let compatible = be64(buf, 80);
        let autoclear = be64(buf, 88);
        let refcount_order = be32(buf, 96);
        let header_length = be32(buf, 100) as usize;

        if crypt_method != 0 {
            return Err(unsupported(
                path,
                format!("encryption (crypt_method {crypt_method})"),
            ));
        }
        let mut header = Header {
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible,
            compatible,
            autoclear,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            other_extensions: Vec::new(),
            feature_names: Vec::new(),
        };
        if header_length < V3_HEADER_LEN
            || !header_length.is_multiple_of(8)
            || header_length > buf.len().min(cluster_size)
        {
            return Err(corrupt(format!(
                "header_length {header_length} is not a multiple of 8 between {V3_HEADER_LEN} \
                 and the cluster size"
            )));
        }
        header.extra_fields = buf[V3_HEADER_LEN..header_length].to_vec();
        header.parse_extensions(buf, header_length, cluster_size, path)?;

        let unknown = incompatible & !INCOMPAT_DIRTY;
        if unknown != 0 {
            let bit = unknown.trailing_zeros() as u8;
            let name = header.feature_name(0, bit);
            return Err(unsupported(
                path,
                format!("incompatible feature bit {bit} ({name})"),
            ));
        }
        if refcount_order != REFCOUNT_ORDER {
            return Err(unsupported(
                path,
                format!(
                    "refcount_order {refcount_order} ({}-bit refcounts; only 16-bit refcounts, \
                     refcount_order 4, are supported)",
                    1u64.checked_shl(refcount_order).unwrap_or(0)
                ),
            ));
        }
        if backing_file_offset != 0 {
            let len = backing_file_size as usize;
            if len == 0 || len > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name length {len} is outside 1..={MAX_BACKING_NAME}"
                )));
            }
            let start = usize::try_from(backing_file_offset)
                .ok()
                .filter(|&s| s >= header_length)
                .and_then(|s| s.checked_add(len).map(|e| (s, e)))
                .filter(|&(_, e)| e <= buf.len().min(cluster_size));
            let Some((start, end)) = start else {
                return Err(corrupt(format!(
                    "backing file name at {backing_file_offset:#x}+{len} is outside the \
                     first cluster"
                )));
            };
            let name = std::str::from_utf8(&buf[start..end])
                .map_err(|_| corrupt("backing file name is not UTF-8".into()))?;
            header.backing_file = Some(name.to_string());
        }
        Ok(header)
    }

    fn parse_extensions(
        &mut self,
        buf: &[u8],
        start: usize,
        cluster_size: usize,
        path: &Path,
    ) -> Result<()> {
        let limit = buf.len().min(cluster_size);
        let corrupt = |what: String| Qcow2Error::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let mut off = start;
        loop {
            if off.checked_add(8).is_none_or(|e| e > limit) {
                return Err(corrupt(
                    "header extensions run past the end of the first cluster".into(),
                ));
            }
            let typ = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            if typ == EXT_END {
                return Ok(());
            }
            let data_start = off + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= limit)
                .ok_or_else(|| {
                    corrupt(format!(
                        "header extension {typ:#010x} of {len} bytes runs past the first cluster"
                    ))
                })?;
            let data = &buf[data_start..data_end];
            match typ {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| corrupt("backing format name is not UTF-8".into()))?;
                    self.backing_format = Some(s.to_string());
                }
                EXT_FEATURE_NAMES => {
                    for entry in data.chunks_exact(48) {
                        let name_bytes = &entry[2..];
                        let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
                        self.feature_names.push((entry[0], entry[1], name));
                    }
                }
                EXT_CRYPTO => {
                    return Err(unsupported(
                        path,
                        "encryption (crypto header extension)".into(),
                    ))
                }
                EXT_DATA_FILE => {
                    return Err(unsupported(path, "external data file".into()));
                }
                _ => self.other_extensions.push((typ, data.to_vec())),
            }
            off = pad8(data_end).ok_or_else(|| corrupt("header extension overflow".into()))?;
        }
    }

    /// The name of a feature bit: the image's own table first, then the ones we know.
    pub fn feature_name(&self, kind: u8, bit: u8) -> String {
        if let Some((_, _, n)) = self
            .feature_names
            .iter()
            .find(|(k, b, _)| *k == kind && *b == bit)
        {
            return n.clone();
        }
        FEATURE_NAMES
            .iter()
            .find(|(k, b, _)| *k == kind && *b == bit)
            .map(|(_, _, n)| n.to_string())
            .unwrap_or_else(|| "unknown".to_string())
    }

    /// Serialize header, extensions and backing file name. Fails when they do not fit in
    /// the first cluster.
    pub fn serialize(&self, path: &Path) -> Result<Vec<u8>> {
        let header_length = pad8(V3_HEADER_LEN + self.extra_fields.len()).unwrap_or(usize::MAX);
        let mut out = vec![0u8; header_length];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..8].copy_from_slice(&VERSION.to_be_bytes());
        out[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        out[24..32].copy_from_slice(&self.size.to_be_bytes());
        out[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        out[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        out[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        out[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        out[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        out[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
        out[80..88].copy_from_slice(&self.compatible.to_be_bytes());
        out[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
        out[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        out[100..104].copy_from_slice(&(header_length as u32).to_be_bytes());
        out[V3_HEADER_LEN..V3_HEADER_LEN + self.extra_fields.len()]
            .copy_from_slice(&self.extra_fields);

        let push_ext = |out: &mut Vec<u8>, typ: u32, data: &[u8]| {
            out.extend_from_slice(&typ.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(pad8(out.len()).unwrap_or(usize::MAX), 0);
        };
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut out, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        let mut names = Vec::with_capacity(FEATURE_NAMES.len() * 48);
        for (kind, bit, name) in FEATURE_NAMES {
            let mut entry = [0u8; 48];
            entry[0] = *kind;
            entry[1] = *bit;
            entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
            names.extend_from_slice(&entry);
        }
        push_ext(&mut out, EXT_FEATURE_NAMES, &names);
        for (typ, data) in &self.other_extensions {
            push_ext(&mut out, *typ, data);
        }
        push_ext(&mut out, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            if name.is_empty() || name.len() > MAX_BACKING_NAME {
                return Err(Qcow2Error::Invalid {
                    path: path.to_path_buf(),
                    what: format!("backing file name must be 1..={MAX_BACKING_NAME} bytes"),
                });
            }
            let off = out.len() as u64;
            out[8..16].copy_from_slice(&off.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(Qcow2Error::Invalid {
                path: path.to_path_buf(),
                what: "header, extensions and backing file name do not fit in one cluster".into(),
            });
        }
        Ok(out)
    }
}

fn unsupported(path: &Path, feature: String) -> Qcow2Error {
    Qcow2Error::Unsupported {
        path: path.to_path_buf(),
        feature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::new(16, 1 << 30);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h.backing_file = Some("base.img".into());
        h.backing_format = Some("raw".into());
        h
    }

    fn p() -> &'static Path {
        Path::new("test.qcow2")
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let bytes = h.serialize(p()).expect("ok");
        let back = Header::parse(&bytes, p()).expect("ok");
        assert_eq!(back.size, 1 << 30);
        assert_eq!(back.backing_file.as_deref(), Some("base.img"));
        assert_eq!(back.backing_format.as_deref(), Some("raw"));
        assert_eq!(back.l1_table_offset, 0x30000);
        assert_eq!(back.feature_name(0, 4), "extended L2 entries");
        // Re-serializing what we parsed is stable.
        assert_eq!(back.serialize(p()).expect("ok"), bytes);
    }

    fn err_of(bytes: &[u8]) -> String {
        Header::parse(bytes, p())
            .expect_err("must fail")
            .to_string()
    }

    fn patch(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = sample().serialize(p()).expect("ok");
        b.resize(4096, 0);
        f(&mut b);
        b
    }

    #[test]
    fn hostile_fields() {
        assert!(err_of(b"QFI").contains("not a qcow2"));
        assert!(err_of(&patch(|b| b[0] = b'X')).contains("not a qcow2"));
        assert!(err_of(&patch(|b| b[7] = 2)).contains("version 2"));
        assert!(err_of(&patch(|b| b[23] = 9)).contains("cluster_bits 9"));
        assert!(err_of(&patch(|b| b[23] = 22)).contains("cluster_bits 22"));
        assert!(err_of(&patch(|b| b[35] = 2)).contains("encryption"));
        assert!(err_of(&patch(|b| b[79] = 1 << 1)).contains("corrupt bit"));
        assert!(err_of(&patch(|b| b[79] = 1 << 2)).contains("external data file"));
        assert!(err_of(&patch(|b| b[79] = 1 << 4)).contains("extended L2"));
        assert!(err_of(&patch(|b| b[72] = 0x80)).contains("bit 63"));
        assert!(err_of(&patch(|b| b[99] = 5)).contains("refcount_order 5"));
        assert!(err_of(&patch(|b| b[103] = 100)).contains("header_length"));
        assert!(err_of(&patch(|b| b[102] = 0x7f)).contains("header_length"));
        // Backing name past the cluster / too long.
        assert!(err_of(&patch(|b| b[14] = 0xff)).contains("backing file name"));
        assert!(err_of(&patch(|b| b[18] = 0x10)).contains("backing file name"));
        // An extension whose length runs off the cluster.
        assert!(err_of(&patch(|b| {
            b[104..108].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            b[108..112].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        }))
        .contains("runs past"));
        assert!(err_of(&patch(|b| {
            b[104..108].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        }))
        .contains("external data file"));
        // Dirty is accepted.
        let h = Header::parse(&patch(|b| b[79] = 1), p()).expect("ok");
        assert!(h.dirty());
    }

    #[test]
    fn unknown_extensions_are_kept() {
        let mut h = sample();
        h.other_extensions.push((0x1234_5678, vec![1, 2, 3]));
        let bytes = h.serialize(p()).expect("ok");
        let back = Header::parse(&bytes, p()).expect("ok");
        assert_eq!(back.other_extensions, vec![(0x1234_5678, vec![1, 2, 3])]);
    }
}
