//! The forwarding threads. Like OVS-DPDK's PMD threads, each owns some ports' transmit
//! queues and busy-polls them while traffic flows, with the guests' kicks suppressed, so a
//! frame costs no system call on either side. Unlike them, a thread that found nothing for
//! `poll` (the idle window) turns the kicks back on and sleeps until one arrives: an idle
//! switch uses no CPU.
//!
//! A kick reaches the port's vhost-user worker (the library's epoll thread), which only
//! marks the queue pending and wakes the queue's forwarding thread ([`Pmds::kick`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;

use crate::config::PmdSettings;
use crate::datapath::ingress::{self, Pass, TX_BATCH};
use crate::switch::Switch;

/// Frames per pass, in buckets: 1, 2-7, 8-31, 32-63, a full batch.
const BATCH_BUCKETS: [(usize, &str); 5] = [
    (1, "1"),
    (7, "2-7"),
    (31, "8-31"),
    (TX_BATCH as usize - 1, "32-63"),
    (TX_BATCH as usize, "64"),
];

/// A port's transmit queue, as its forwarding thread sees it.
pub struct TxQueue {
    port: usize,
    /// Its index among the port's transmit queues.
    index: usize,
    vring: VringRwLock,
    /// The queue needs its thread while the thread is not polling it: a kick, or the
    /// rate-limit timer.
    pending: AtomicBool,
    frames: AtomicU64,
    /// Time in passes that took frames.
    busy_ns: AtomicU64,
}

/// What a forwarding thread has done, for `vswitch ctl pmd`.
#[derive(Default)]
struct PmdStats {
    /// Polling iterations that forwarded frames, and the time they took.
    busy_ns: AtomicU64,
    /// Polling iterations that found nothing.
    idle_ns: AtomicU64,
    sleep_ns: AtomicU64,
    wakeups: AtomicU64,
    passes: AtomicU64,
    frames: AtomicU64,
    batches: [AtomicU64; BATCH_BUCKETS.len()],
}

/// One forwarding thread, as the other threads reach it.
struct Pmd {
    core: Option<usize>,
    /// Its queues; `generation` moves on each change and `seen` follows once the thread
    /// has taken the change (it no longer touches a queue removed before).
    queues: Mutex<Vec<Arc<TxQueue>>>,
    generation: AtomicU64,
    seen: AtomicU64,
    thread: OnceLock<Thread>,
    stats: PmdStats,
}

impl Pmd {
    fn queues(&self) -> MutexGuard<'_, Vec<Arc<TxQueue>>> {
        match self.queues.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// A port's transmit queue and the index of the thread it was given to.
type Assigned = Option<(usize, Arc<TxQueue>)>;

/// The forwarding threads, and which one serves each port.
pub struct Pmds {
    pmds: Vec<Arc<Pmd>>,
    /// Per port, per transmit queue: its thread and queue, once its guest kicked it.
    by_port: Mutex<Vec<Vec<Assigned>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PmdError {
    #[error("cannot start forwarding thread {index}: {source}")]
    Spawn {
        index: usize,
        source: std::io::Error,
    },
}

/// How long [`Pmds::remove`] waits for a thread to let go of a queue before it reports it.
const REMOVE_WARN: Duration = Duration::from_secs(5);

impl Pmds {
    pub fn start(switch: Arc<Switch>, cfg: &PmdSettings) -> Result<Arc<Pmds>, PmdError> {
        let cores: Vec<Option<usize>> = if cfg.cores.is_empty() {
            vec![None; cfg.threads.max(1)]
        } else {
            cfg.cores.iter().copied().map(Some).collect()
        };
        let mut pmds = Vec::new();
        for (index, core) in cores.into_iter().enumerate() {
            let pmd = Arc::new(Pmd {
                core,
                queues: Mutex::new(Vec::new()),
                generation: AtomicU64::new(0),
                seen: AtomicU64::new(0),
                thread: OnceLock::new(),
                stats: PmdStats::default(),
            });
            let (p, sw, poll) = (pmd.clone(), switch.clone(), cfg.poll);
            let handle = std::thread::Builder::new()
                .name(format!("pmd{index}"))
                .spawn(move || run(index, &p, &sw, poll))
                .map_err(|source| PmdError::Spawn { index, source })?;
            let _ = pmd.thread.set(handle.thread().clone());
            pmds.push(pmd);
        }
        Ok(Arc::new(Pmds {
            pmds,
            by_port: Mutex::new(
                switch
                    .ports
                    .iter()
                    .map(|p| vec![None; usize::from(p.spec.queues.max(1))])
                    .collect(),
            ),
        }))
    }

    fn by_port(&self) -> MutexGuard<'_, Vec<Vec<Assigned>>> {
        match self.by_port.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Transmit queue `index` (`vring`) of port `port` has work: a kick. The first kick of
    /// a session gives the queue to the thread with the fewest, so a port's queues spread
    /// over the threads.
    pub fn kick(&self, port: usize, index: usize, vring: &VringRwLock) {
        let mut by_port = self.by_port();
        let Some(slot) = by_port.get_mut(port).and_then(|p| p.get_mut(index)) else {
            return;
        };
        let (pmd, queue) = match slot {
            Some((pmd, queue)) => (*pmd, queue.clone()),
            None => {
                let Some(pmd) = (0..self.pmds.len()).min_by_key(|&i| self.pmds[i].queues().len())
                else {
                    return;
                };
                let queue = Arc::new(TxQueue {
                    port,
                    index,
                    vring: vring.clone(),
                    pending: AtomicBool::new(false),
                    frames: AtomicU64::new(0),
                    busy_ns: AtomicU64::new(0),
                });
                let p = &self.pmds[pmd];
                p.queues().push(queue.clone());
                p.generation.fetch_add(1, Ordering::Release);
                *slot = Some((pmd, queue.clone()));
                (pmd, queue)
            }
        };
        drop(by_port);
        queue.pending.store(true, Ordering::Release);
        self.pmds[pmd].wake();
    }

    /// Port `port`'s rate-limit timer fired: its throttled queues may send again.
    pub fn resume(&self, port: usize) {
        let queues: Vec<(usize, Arc<TxQueue>)> = self
            .by_port()
            .get(port)
            .map(|p| p.iter().flatten().cloned().collect())
            .unwrap_or_default();
        for (pmd, queue) in queues {
            queue.pending.store(true, Ordering::Release);
            self.pmds[pmd].wake();
        }
    }

    /// Port `port`'s guest went away: take its queues from their threads, and return once
    /// the threads no longer touch them.
    pub fn remove(&self, port: usize) {
        let taken: Vec<(usize, Arc<TxQueue>)> = match self.by_port().get_mut(port) {
            Some(p) => p.iter_mut().filter_map(Option::take).collect(),
            None => return,
        };
        for (pmd, queue) in taken {
            let p = &self.pmds[pmd];
            let generation = {
                let mut queues = p.queues();
                queues.retain(|q| !Arc::ptr_eq(q, &queue));
                p.generation.fetch_add(1, Ordering::AcqRel) + 1
            };
            p.wake();
            let start = Instant::now();
            let mut warned = false;
            while p.seen.load(Ordering::Acquire) < generation {
                if !warned && start.elapsed() > REMOVE_WARN {
                    error!(
                        pmd,
                        "forwarding thread has not let go of a removed queue after {REMOVE_WARN:?}"
                    );
                    warned = true;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// The threads, their queues and what they did, for `vswitch ctl pmd`.
    pub fn show(&self, switch: &Switch) -> serde_json::Value {
        let threads: Vec<serde_json::Value> = self
            .pmds
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let s = &p.stats;
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let busy = get(&s.busy_ns);
                let polling = busy + get(&s.idle_ns);
                let queues: Vec<serde_json::Value> = p
                    .queues()
                    .iter()
                    .map(|q| {
                        let name = switch.ports.get(q.port).map(|p| p.spec.name.as_str());
                        let qbusy = get(&q.busy_ns);
                        serde_json::json!({
                            "port": name,
                            "queue": format!("tx{}", q.index),
                            "frames": get(&q.frames),
                            "busy_ns": qbusy,
                            "usage_pct": percent(qbusy, busy),
                        })
                    })
                    .collect();
                let batches: serde_json::Map<String, serde_json::Value> = BATCH_BUCKETS
                    .iter()
                    .zip(&s.batches)
                    .map(|((_, name), n)| (name.to_string(), get(n).into()))
                    .collect();
                let (passes, frames) = (get(&s.passes), get(&s.frames));
                serde_json::json!({
                    "id": i,
                    "core": p.core,
                    "queues": queues,
                    "busy_ns": busy,
                    "idle_ns": get(&s.idle_ns),
                    "sleep_ns": get(&s.sleep_ns),
                    "busy_pct": percent(busy, polling + get(&s.sleep_ns)),
                    "wakeups": get(&s.wakeups),
                    "passes": passes,
                    "frames": frames,
                    "avg_batch": if passes == 0 { 0.0 } else { frames as f64 / passes as f64 },
                    "batches": batches,
                })
            })
            .collect();
        serde_json::json!({ "pmds": threads })
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 1000.0 / whole as f64).round() / 10.0
    }
}

/// A queue in its thread's hands.
struct Polled {
    queue: Arc<TxQueue>,
    /// Polled on every iteration, its kicks off; else left until `pending`.
    polling: bool,
}

fn pin(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data, all zeroes a valid empty set; CPU_SET writes inside
    // it (core is checked against its size); sched_setaffinity reads it for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if core >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn set_kicks(queue: &TxQueue, on: bool) -> bool {
    let mut state = queue.vring.get_mut();
    if !state.get_queue().ready() {
        // Its addresses may be stale: nothing may be written through them.
        return false;
    }
    let r = if on {
        state.enable_notification()
    } else {
        state.disable_notification().map(|()| false)
    };
    match r {
        Ok(more) => more,
        Err(e) => {
            warn!(port = queue.port, "cannot switch transmit kicks: {e}");
            false
        }
    }
}

fn run(index: usize, pmd: &Pmd, switch: &Switch, poll: Duration) {
    if let Some(core) = pmd.core {
        match pin(core) {
            Ok(()) => info!(pmd = index, core, "forwarding thread pinned"),
            Err(e) => error!(pmd = index, core, "cannot pin the forwarding thread: {e}"),
        }
    }
    let mut scratch = ingress::Scratch::default();
    let mut queues: Vec<Polled> = Vec::new();
    let mut generation = 0;
    let stats = &pmd.stats;
    let mut mark = Instant::now();
    let mut last_work = mark;
    loop {
        let g = pmd.generation.load(Ordering::Acquire);
        if g != generation {
            let now: Vec<Arc<TxQueue>> = pmd.queues().clone();
            queues.retain(|p| now.iter().any(|q| Arc::ptr_eq(q, &p.queue)));
            for q in now {
                if !queues.iter().any(|p| Arc::ptr_eq(&p.queue, &q)) {
                    queues.push(Polled {
                        queue: q,
                        polling: false,
                    });
                }
            }
            generation = g;
            pmd.seen.store(g, Ordering::Release);
        }
        let mut took = 0;
        for p in &mut queues {
            if !p.polling {
                if !p.queue.pending.swap(false, Ordering::AcqRel) {
                    continue;
                }
                p.polling = true;
                set_kicks(&p.queue, false);
            }
            let pass = ingress::pass(switch, p.queue.port, &p.queue.vring, &mut scratch);
            let n = match pass {
                Pass::Took(n) => n,
                Pass::Throttled(n) => {
                    // Kicks stay off; the rate-limit timer makes it pending again.
                    p.polling = false;
                    n
                }
                Pass::Unusable => {
                    p.polling = false;
                    set_kicks(&p.queue, true);
                    0
                }
            };
            if n > 0 {
                took += n;
                let now = Instant::now();
                p.queue.frames.fetch_add(n as u64, Ordering::Relaxed);
                p.queue
                    .busy_ns
                    .fetch_add((now - mark).as_nanos() as u64, Ordering::Relaxed);
                stats.passes.fetch_add(1, Ordering::Relaxed);
                let bucket = BATCH_BUCKETS
                    .iter()
                    .position(|&(max, _)| n <= max)
                    .unwrap_or(BATCH_BUCKETS.len() - 1);
                stats.batches[bucket].fetch_add(1, Ordering::Relaxed);
            }
        }
        let now = Instant::now();
        let spent = (now - mark).as_nanos() as u64;
        mark = now;
        if took > 0 {
            stats.frames.fetch_add(took as u64, Ordering::Relaxed);
            stats.busy_ns.fetch_add(spent, Ordering::Relaxed);
            last_work = now;
            continue;
        }
        stats.idle_ns.fetch_add(spent, Ordering::Relaxed);
        if now - last_work < poll {
            std::hint::spin_loop();
            continue;
        }
        // Idle for the whole window: give the queues back to their kicks, unless a frame
        // slipped in meanwhile.
        let mut more = false;
        for p in queues.iter_mut().filter(|p| p.polling) {
            if set_kicks(&p.queue, true) {
                set_kicks(&p.queue, false);
                more = true;
            } else {
                p.polling = false;
            }
        }
        if more {
            last_work = now;
            continue;
        }
        if pmd.generation.load(Ordering::Acquire) == generation {
            // A kick, a timer or a queue change after this point unparks at once.
            std::thread::park();
            stats.wakeups.fetch_add(1, Ordering::Relaxed);
        }
        let now = Instant::now();
        stats
            .sleep_ns
            .fetch_add((now - mark).as_nanos() as u64, Ordering::Relaxed);
        mark = now;
        last_work = now;
    }
}
