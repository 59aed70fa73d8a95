//! The virtio-blk device model: features, the config space, and the state every queue
//! shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::image::{Format, RawImage};
use crate::request::{Limits, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE};
use crate::stats::Stats;

/// Largest single data segment the guest may use.
const SIZE_MAX: u32 = 1 << 20;
/// 2 GiB per discard / write-zeroes segment.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEG: u32 = 32;

/// Offsets into `struct virtio_blk_config` (virtio 1.2, 5.2.4).
mod cfg {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const MIN_IO_SIZE: usize = 26;
    pub const OPT_IO_SIZE: usize = 28;
    pub const WRITEBACK: usize = 32;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    pub const LEN: usize = 60;
}

pub struct Device {
    /// The image file, which the engines read and write.
    pub image: Arc<RawImage>,
    /// Where guest offsets live in it.
    pub format: Format,
    pub limits: Limits,
    pub stats: Stats,
    /// Write-back cache on (the default) or write-through, as the guest set CONFIG_WCE.
    pub writeback: AtomicBool,
    pub event_idx: AtomicBool,
    pub serial: [u8; ID_BYTES],
    pub num_queues: u16,
    pub queue_size: u16,
    /// How long a queue thread keeps polling after its last activity (0: never).
    pub poll: std::time::Duration,
}

impl Device {
    pub fn new(
        image: Arc<RawImage>,
        format: Format,
        num_queues: u16,
        queue_size: u16,
        serial: &str,
        poll: std::time::Duration,
    ) -> Device {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let size = match &format {
            Format::Raw => image.size(),
            Format::Qcow2(q) => crate::translate::lock(q).virtual_size(),
        };
        let limits = Limits {
            capacity_sectors: size >> SECTOR_SHIFT,
            read_only: image.read_only(),
            max_segments: u32::from(queue_size) - 2,
            max_segment_len: SIZE_MAX,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        };
        Device {
            image,
            format,
            limits,
            stats: Stats::default(),
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            serial: id,
            num_queues,
            queue_size,
            poll,
        }
    }

    /// Make everything completed so far durable: the file's data, and for qcow2 its
    /// metadata (which stays in write-back caches until then).
    pub fn flush(&self) -> Result<(), String> {
        match &self.format {
            Format::Raw => self.image.sync().map_err(|e| e.to_string()),
            Format::Qcow2(q) => crate::translate::flush(q).map_err(|e| e.to_string()),
        }
    }

    /// [`Device::flush`], and for qcow2 what a clean close keeps besides (the dedupe
    /// index, for the next serve).
    pub fn shutdown_flush(&self) -> Result<(), String> {
        match &self.format {
            Format::Raw => self.flush(),
            Format::Qcow2(q) => crate::translate::shutdown(q).map_err(|e| e.to_string()),
        }
    }

    pub fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
        if self.limits.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// Without CONFIG_WCE the cache mode follows FLUSH: write-back if the driver can
    /// flush, write-through if it cannot.
    pub fn acked_features(&self, features: u64) {
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.writeback.store(flush, Ordering::Relaxed);
    }

    pub fn config_space(&self) -> [u8; cfg::LEN] {
        let mut c = [0u8; cfg::LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(cfg::CAPACITY, &self.limits.capacity_sectors.to_le_bytes());
        put(cfg::SIZE_MAX, &SIZE_MAX.to_le_bytes());
        put(cfg::SEG_MAX, &u32::from(self.queue_size - 2).to_le_bytes());
        put(cfg::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
        put(cfg::MIN_IO_SIZE, &1u16.to_le_bytes());
        put(cfg::OPT_IO_SIZE, &0u32.to_le_bytes());
        put(
            cfg::WRITEBACK,
            &[u8::from(self.writeback.load(Ordering::Relaxed))],
        );
        put(cfg::NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(
            cfg::MAX_DISCARD_SECTORS,
            &self.limits.max_discard_sectors.to_le_bytes(),
        );
        put(
            cfg::MAX_DISCARD_SEG,
            &self.limits.max_discard_seg.to_le_bytes(),
        );
        put(cfg::DISCARD_SECTOR_ALIGNMENT, &1u32.to_le_bytes());
        put(
            cfg::MAX_WRITE_ZEROES_SECTORS,
            &self.limits.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            cfg::MAX_WRITE_ZEROES_SEG,
            &self.limits.max_write_zeroes_seg.to_le_bytes(),
        );
        put(cfg::WRITE_ZEROES_MAY_UNMAP, &[1]);
        c
    }

    /// `size` bytes of the config space from `offset`; bytes past its end read as zero.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(c.len());
        let end = (offset as usize).saturating_add(size as usize).min(c.len());
        out[..end - start].copy_from_slice(&c[start..end]);
        out
    }

    /// The driver may write only the `writeback` byte. Writes to read-only fields are
    /// ignored, as QEMU's virtio-blk does: with vhost-user an error reply would end the
    /// whole session over a harmless driver mistake.
    pub fn write_config(&self, offset: u32, buf: &[u8]) {
        if offset as usize == cfg::WRITEBACK && buf.len() == 1 {
            let wb = buf[0] != 0;
            self.writeback.store(wb, Ordering::Relaxed);
            tracing::info!(writeback = wb, "guest changed the cache mode");
            return;
        }
        let n = common::counters::bump(&self.stats.err_config_write, 1);
        if let Some(suppressed) = self.stats.may_log(&self.stats.err_config_write) {
            tracing::warn!(
                offset,
                len = buf.len(),
                count = n,
                suppressed,
                "ignored a config write outside the writeback field"
            );
        }
    }
}
