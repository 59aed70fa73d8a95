//! The load generator: libblkio's virtio-blk-vhost-user driver with one thread per queue, each
//! keeping `qd` requests in flight and (by default) busy-polling its queue for completions.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};

use super::{Data, Op, Pattern, Workload, DUP_POOL};
use crate::signals;

/// A queue that has had no completion for this long means the daemon is hung or gone.
const STALL: Duration = Duration::from_secs(10);

/// One libblkio connection with its queues and one shared buffer region.
pub struct Client {
    // Drop order: queues, then the driver, then (inside libblkio) the region.
    queues: Vec<Blkioq>,
    _blkio: Blkio,
    region: MemoryRegion,
    capacity: u64,
    max_segment_len: usize,
    poll: bool,
    socket: PathBuf,
    region_len: usize,
}

/// What one measured window produced.
pub struct Load {
    /// Operations completed in the measured window.
    pub ops: u64,
    /// Operations completed in the whole run: warm-up, window and drain.
    pub total_ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Per-request latencies (submission to completion seen), ns, sorted.
    pub lat_ns: Vec<u64>,
    /// The window ended early: a queue of a [`Pattern::Stride`] workload had written its
    /// whole share of the device.
    pub exhausted: bool,
}

fn err(what: &str, socket: &Path) -> impl Fn(blkio::Error) -> String {
    let what = what.to_string();
    let socket = socket.display().to_string();
    move |e| format!("libblkio {what} on {socket}: {e} ({})", e.errno())
}

impl Client {
    /// Connect to `socket` with `queues` queues: poll queues if `poll`, else interrupt-driven.
    pub fn connect(
        socket: &Path,
        queues: usize,
        poll: bool,
        region_len: usize,
    ) -> Result<Client, String> {
        let path = socket.to_str().ok_or("socket path is not UTF-8")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut b = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err("new", socket))?;
            b.set_str("path", path).map_err(err("set path", socket))?;
            match b.connect() {
                Ok(()) => break b,
                Err(e) if e.errno() == Errno::CONNREFUSED && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(err("connect", socket)(e)),
            }
        };
        let capacity = b.get_u64("capacity").map_err(err("get capacity", socket))?;
        let max_segment_len = b
            .get_i32("max-segment-len")
            .map_err(err("get max-segment-len", socket))?
            .max(0) as usize;
        let (nq, npq) = if poll { (0, queues) } else { (queues, 0) };
        b.set_i32("num-queues", nq as i32)
            .map_err(err("set num-queues", socket))?;
        b.set_i32("num-poll-queues", npq as i32)
            .map_err(err("set num-poll-queues", socket))?;
        let started = b.start().map_err(err("start", socket))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(err("get mem-region-alignment", socket))?
            .max(4096) as usize;
        let region_len = region_len.div_ceil(align) * align;
        let region = b
            .alloc_mem_region(region_len)
            .map_err(err("alloc_mem_region", socket))?;
        // Non-zero data so that no layer can shortcut writes of zeros.
        // SAFETY: the region is a fresh read-write mapping of region.len bytes.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a, region.len) };
        b.map_mem_region(&region)
            .map_err(err("map_mem_region", socket))?;
        let queues = if poll {
            started.poll_queues
        } else {
            started.queues
        };
        Ok(Client {
            queues,
            _blkio: b,
            region,
            capacity,
            max_segment_len,
            poll,
            socket: socket.to_path_buf(),
            region_len,
        })
    }

    /// Disconnect and connect again with the same settings (after a failed window, whose
    /// requests may still be in flight).
    pub fn reconnect(self) -> Result<Client, String> {
        let (socket, queues, poll, region_len) = (
            self.socket.clone(),
            self.queues.len(),
            self.poll,
            self.region_len,
        );
        drop(self);
        Client::connect(&socket, queues, poll, region_len)
    }

    /// Run `wl` with `threads` load threads (the queues dealt out among them): `warmup`,
    /// then a measured window of `duration` bracketed by `on_start` and `on_stop` (which sample
    /// the daemon's CPU time), then drain every request.
    pub fn run(
        &mut self,
        wl: &Workload,
        threads: usize,
        warmup: Duration,
        duration: Duration,
        on_start: &mut dyn FnMut() -> Result<(), String>,
        on_stop: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Load, String> {
        if wl.queues > self.queues.len() {
            return Err(format!(
                "workload needs {} queues, the connection has {}",
                wl.queues,
                self.queues.len()
            ));
        }
        let per_queue = self.region.len / wl.queues;
        if wl.qd * wl.bs > per_queue {
            return Err(format!(
                "buffer region too small: {} queues x QD{} x {} bytes",
                wl.queues, wl.qd, wl.bs
            ));
        }
        // An interrupt-driven thread blocks on one queue at a time: give each queue its own.
        let threads = if self.poll {
            threads.clamp(1, wl.queues)
        } else {
            wl.queues
        };
        let measuring = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let exhausted = AtomicBool::new(false);
        let ctx = WorkerCtx {
            wl,
            capacity: self.capacity,
            max_segment_len: self.max_segment_len,
            poll: self.poll,
            measuring: &measuring,
            stop: &stop,
            exhausted: &exhausted,
        };
        // Queue i goes to thread i % threads, with its own slice of the region.
        let base = self.region.addr;
        let mut groups: Vec<Vec<(usize, &mut Blkioq, usize)>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, q) in self.queues[..wl.queues].iter_mut().enumerate() {
            groups[i % threads].push((i, q, base + i * per_queue));
        }
        std::thread::scope(|s| {
            let workers: Vec<_> = groups
                .into_iter()
                .map(|group| {
                    let ctx = &ctx;
                    s.spawn(move || ctx.work(group))
                })
                .collect();

            let control = (|| {
                if sleep_checked(warmup, &stop, &exhausted)? {
                    return Err(format!(
                        "the device ({} bytes) ran out of fresh blocks during the warm-up: \
                         it is too small for this workload",
                        ctx.capacity
                    ));
                }
                on_start()?;
                let t0 = Instant::now();
                measuring.store(true, Ordering::SeqCst);
                sleep_checked(duration, &stop, &exhausted)?;
                measuring.store(false, Ordering::SeqCst);
                let elapsed = t0.elapsed();
                on_stop()?;
                Ok::<_, String>(elapsed)
            })();
            stop.store(true, Ordering::SeqCst);

            let mut load = Load {
                ops: 0,
                total_ops: 0,
                bytes: 0,
                elapsed: Duration::ZERO,
                lat_ns: Vec::new(),
                exhausted: exhausted.load(Ordering::SeqCst),
            };
            let mut first_err = None;
            for w in workers {
                match w.join() {
                    Ok(Ok((stats, total))) => {
                        load.ops += stats.len() as u64;
                        load.total_ops += total;
                        load.lat_ns.extend(stats);
                    }
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert("load thread panicked".to_string());
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            load.elapsed = control?;
            load.bytes = load.ops * wl.bs as u64;
            load.lat_ns.sort_unstable();
            Ok(load)
        })
    }
}

/// Sleep for `d` unless a worker failed (`stop`) or the run was interrupted; returns early
/// with true once `exhausted` is set.
fn sleep_checked(d: Duration, stop: &AtomicBool, exhausted: &AtomicBool) -> Result<bool, String> {
    let end = Instant::now() + d;
    loop {
        signals::check()?;
        if exhausted.load(Ordering::SeqCst) {
            return Ok(true);
        }
        if stop.load(Ordering::Relaxed) {
            return Err("a load thread stopped early".to_string());
        }
        let now = Instant::now();
        if now >= end {
            return Ok(false);
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

struct WorkerCtx<'a> {
    wl: &'a Workload,
    capacity: u64,
    max_segment_len: usize,
    poll: bool,
    measuring: &'a AtomicBool,
    stop: &'a AtomicBool,
    exhausted: &'a AtomicBool,
}

/// xorshift64*: plenty for picking offsets, and cheap enough not to show in the profile.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A pseudo-random permutation of `0..n`: a bijection on the smallest power of two that holds
/// `n` (odd multiplications and xor-shifts, each invertible modulo 2^bits), walked until it
/// lands below `n`.
struct Permutation {
    n: u64,
    bits: u32,
    mask: u64,
    keys: [u64; 3],
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Permutation {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(1);
        let mut rng = XorShift(seed | 1);
        Permutation {
            n,
            bits,
            mask: if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            },
            keys: [rng.next() | 1, rng.next() | 1, rng.next()],
        }
    }

    fn apply(&self, i: u64) -> u64 {
        let shift = (self.bits / 2).max(1);
        let mut x = i;
        loop {
            x = x.wrapping_mul(self.keys[0]) & self.mask;
            x ^= x >> shift;
            x = (x ^ (self.keys[2] & self.mask)).wrapping_mul(self.keys[1]) & self.mask;
            x ^= x >> shift;
            if x < self.n {
                return x;
            }
        }
    }
}

/// One queue as a load thread drives it: its request slots and where the next offset comes from.
struct QueueLoad<'q> {
    q: &'q mut Blkioq,
    /// Per slot: the buffer's iovecs (split at SIZE_MAX) and when it was last submitted.
    slots: Vec<(Vec<blkio::iovec>, Instant)>,
    rng: XorShift,
    /// Next block (stride for [`Pattern::Stride`]) of a sequential pattern.
    cursor: u64,
    /// This queue's share of a [`Pattern::Stride`] device: strides `start..end`, in the
    /// order of `shuffle` if the pattern is shuffled.
    start: u64,
    end: u64,
    shuffle: Option<Permutation>,
    in_flight: usize,
    /// Writes since this queue's last flush ([`Workload::flush_every`]).
    since_flush: u64,
}

impl WorkerCtx<'_> {
    /// Drive `queues`; returns the latencies (ns) of the requests completed in the window,
    /// and how many completed in all.
    fn work(&self, queues: Vec<(usize, &mut Blkioq, usize)>) -> Result<(Vec<u64>, u64), String> {
        let r = self.work_inner(queues);
        if r.is_err() {
            // Tell the controller and the other workers at once.
            self.stop.store(true, Ordering::SeqCst);
        }
        r
    }

    /// The next request's offset; None once a stride pattern has covered the queue's share.
    fn next_offset(&self, ql: &mut QueueLoad<'_>) -> Option<u64> {
        let bs = self.wl.bs as u64;
        let blocks = self.capacity / bs;
        Some(match self.wl.pattern {
            Pattern::Random => (ql.rng.next() % blocks) * bs,
            Pattern::Sequential => {
                let o = ql.cursor * bs;
                ql.cursor = (ql.cursor + 1) % blocks;
                o
            }
            Pattern::Stride { stride, .. } => {
                if ql.cursor >= ql.end {
                    return None;
                }
                let i = ql.cursor;
                ql.cursor += 1;
                match &ql.shuffle {
                    // A random block within the stride, too.
                    Some(p) => {
                        (ql.start + p.apply(i - ql.start)) * stride
                            + (ql.rng.next() % (stride / bs)) * bs
                    }
                    None => i * stride,
                }
            }
        })
    }

    /// Submit the next request in `slot`; false (nothing submitted) once the pattern is
    /// exhausted.
    fn submit(&self, ql: &mut QueueLoad<'_>, slot: usize, now: Instant) -> bool {
        if self.wl.op == Op::Write && self.wl.flush_every > 0 {
            if ql.since_flush >= self.wl.flush_every {
                ql.since_flush = 0;
                ql.slots[slot].1 = now;
                ql.q.flush(slot, ReqFlags::empty());
                return true;
            }
            ql.since_flush += 1;
        }
        let Some(off) = self.next_offset(ql) else {
            self.exhausted.store(true, Ordering::SeqCst);
            return false;
        };
        if self.wl.op == Op::Write && self.wl.data != Data::AsIs {
            let dup = match self.wl.data {
                Data::Duplicate => true,
                Data::Mixed(pct) => ql.rng.next() % 100 < u64::from(pct),
                Data::Unique | Data::AsIs => false,
            };
            // Pool blocks are stamped 0..DUP_POOL, unique ones with the top bit set.
            let stamp = if dup {
                ql.rng.next() % DUP_POOL
            } else {
                ql.rng.next() | 1 << 63
            };
            let iov = &ql.slots[slot].0;
            if let Some(first) = iov.first().filter(|v| v.iov_len >= 8) {
                // SAFETY: the slot's buffer lies in our region and is not in flight (its
                // request completed, or it was never submitted); 8 bytes fit in it.
                unsafe {
                    std::ptr::write_unaligned(first.iov_base.cast::<u64>(), stamp.to_le());
                }
            }
        }
        let (iov, submitted) = &mut ql.slots[slot];
        *submitted = now;
        let (p, n) = (iov.as_ptr(), iov.len() as u32);
        match self.wl.op {
            Op::Read => ql.q.readv(off, p, n, slot, ReqFlags::empty()),
            Op::Write => ql.q.writev(off, p, n, slot, ReqFlags::empty()),
        }
        true
    }

    fn work_inner(
        &self,
        queues: Vec<(usize, &mut Blkioq, usize)>,
    ) -> Result<(Vec<u64>, u64), String> {
        let wl = self.wl;
        let bs = wl.bs;
        let blocks = self.capacity / bs as u64;
        if blocks == 0 {
            return Err(format!(
                "device ({} bytes) smaller than one block",
                self.capacity
            ));
        }
        let seg = if self.max_segment_len > 0 {
            self.max_segment_len.min(bs)
        } else {
            bs
        };
        if let Pattern::Stride { stride, .. } = wl.pattern {
            if stride < bs as u64 || stride > self.capacity {
                return Err(format!(
                    "stride {stride}: not between the block size {bs} and the capacity {}",
                    self.capacity
                ));
            }
        }
        let nq = wl.queues as u64;
        let indexes: Vec<u64> = queues.iter().map(|(i, _, _)| *i as u64).collect();
        let now = Instant::now();
        let mut loads: Vec<QueueLoad<'_>> = queues
            .into_iter()
            .map(|(index, q, buf)| QueueLoad {
                q,
                slots: (0..wl.qd)
                    .map(|i| {
                        let start = buf + i * bs;
                        let iov = (0..bs)
                            .step_by(seg)
                            .map(|o| blkio::iovec {
                                iov_base: (start + o) as *mut libc::c_void,
                                iov_len: seg.min(bs - o),
                            })
                            .collect();
                        (iov, now)
                    })
                    .collect(),
                rng: XorShift(0x9e37_79b9_7f4a_7c15 ^ ((index as u64 + 1) << 32) ^ bs as u64),
                cursor: (index as u64 * blocks / nq) % blocks,
                start: 0,
                end: 0,
                shuffle: None,
                in_flight: wl.qd,
                since_flush: 0,
            })
            .collect();
        if let Pattern::Stride { stride, shuffle } = wl.pattern {
            // Each queue writes its own contiguous share of the strides.
            let strides = self.capacity / stride;
            for (ql, index) in loads.iter_mut().zip(indexes) {
                ql.start = index * strides / nq;
                ql.end = (index + 1) * strides / nq;
                ql.cursor = ql.start;
                if shuffle {
                    ql.shuffle = Some(Permutation::new(ql.end - ql.start, ql.rng.next()));
                }
            }
        }
        if wl.op == Op::Write && wl.data != Data::AsIs {
            // The same non-zero bytes in every buffer: blocks with the same stamp are then
            // identical, whichever slot wrote them.
            for ql in loads.iter() {
                for (iov, _) in &ql.slots {
                    let mut at = 0usize;
                    for v in iov {
                        // SAFETY: each iovec covers part of this slot's buffer in our
                        // region, nothing is in flight yet.
                        let bytes = unsafe {
                            std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                        };
                        for b in bytes.iter_mut() {
                            *b = (at as u8).wrapping_mul(31).wrapping_add(7) | 1;
                            at += 1;
                        }
                    }
                }
            }
        }
        for ql in loads.iter_mut() {
            for slot in 0..wl.qd {
                if !self.submit(ql, slot, now) {
                    ql.in_flight -= 1;
                }
            }
        }

        let mut lat = Vec::with_capacity(1 << 20);
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..wl.qd).map(|_| MaybeUninit::uninit()).collect();
        let started = Instant::now();
        let mut last_progress = started;
        let mut idle_rounds = 0u32;
        let mut completed = 0u64;
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            // Once its pattern is exhausted a queue drains and stays idle until the stop.
            if loads.iter().all(|ql| ql.in_flight == 0) {
                if stopping {
                    return Ok((lat, completed));
                }
                std::thread::sleep(Duration::from_millis(1));
                last_progress = Instant::now();
                continue;
            }
            let mut progress = false;
            for ql in loads.iter_mut() {
                if ql.in_flight == 0 {
                    continue;
                }
                let n = self.reap(ql.q, &mut completions)?;
                if n == 0 {
                    continue;
                }
                progress = true;
                completed += n as u64;
                let now = Instant::now();
                let measuring = self.measuring.load(Ordering::Relaxed);
                for c in &completions[..n] {
                    // SAFETY: do_io initialised the first n completions.
                    let c = unsafe { c.assume_init_read() };
                    if c.ret != 0 {
                        return Err(format!(
                            "{:?} request failed: {}",
                            wl.op,
                            std::io::Error::from_raw_os_error(-c.ret)
                        ));
                    }
                    let slot = c.user_data;
                    if slot >= ql.slots.len() {
                        return Err(format!("completion for unknown request {slot}"));
                    }
                    if measuring {
                        lat.push((now - ql.slots[slot].1).as_nanos() as u64);
                    }
                    if stopping || !self.submit(ql, slot, now) {
                        ql.in_flight -= 1;
                    }
                }
            }
            if progress {
                idle_rounds = 0;
                last_progress = Instant::now();
            } else {
                idle_rounds += 1;
                if (idle_rounds & 4095 == 0 || !self.poll) && last_progress.elapsed() > STALL {
                    let in_flight: usize = loads.iter().map(|ql| ql.in_flight).sum();
                    return Err(format!(
                        "no completion for {STALL:?} with {in_flight} requests in flight, after \
                         {completed} completions in {:.1?}: the daemon is hung or gone",
                        last_progress - started
                    ));
                }
            }
        }
    }

    /// Collect what has completed: without waiting on a poll queue, up to 100 ms on an
    /// interrupt-driven one.
    fn reap(
        &self,
        q: &mut Blkioq,
        completions: &mut [MaybeUninit<Completion>],
    ) -> Result<usize, String> {
        let r = if self.poll {
            q.do_io(completions, 0, None, None)
        } else {
            let mut t = Duration::from_millis(100);
            match q.do_io(completions, 1, Some(&mut t), None) {
                Err(e) if e.errno() == Errno::TIME => Ok(0),
                r => r,
            }
        };
        r.map_err(|e| format!("libblkio do_io: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 1000, 4096, 16384, 65537] {
            let p = Permutation::new(n, 42);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let x = p.apply(i);
                assert!(x < n && !seen[x as usize], "n={n} i={i} -> {x}");
                seen[x as usize] = true;
            }
            if n >= 1000 {
                // Not the identity: most elements move.
                let fixed = (0..n).filter(|&i| p.apply(i) == i).count() as u64;
                assert!(fixed < n / 10, "n={n}: {fixed} fixed points");
            }
        }
    }
}
