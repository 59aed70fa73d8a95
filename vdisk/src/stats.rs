//! Per-device counters. Each rejected request bumps the counter for its reason, so an
//! operator can tell a misbehaving guest from a failing disk.

common::counters!(
    /// Counters shared by all queues of one device.
    Stats {
        reads,
        writes,
        flushes,
        discards,
        write_zeroes,
        get_ids,
        bytes_read,
        bytes_written,
        err_desc_out_of_bounds,
        err_wrong_direction,
        err_short_header,
        err_missing_status,
        err_beyond_capacity,
        err_bad_length,
        err_read_only,
        err_unsupported,
        err_io,
        err_image,
        err_config_write,
        err_ring,
    }
);
