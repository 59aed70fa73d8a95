//! The virtio-net header in front of every frame in both directions.

/// virtio_net_hdr_v1: 12 bytes whenever VERSION_1 is negotiated.
pub const NET_HDR_LEN: usize = 12;

/// The header the switch writes before each frame it delivers: no offloads, and
/// `num_buffers`, how many receive chains the frame spans.
#[inline(always)]
pub fn header(num_buffers: u16) -> [u8; NET_HDR_LEN] {
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    hdr
}
