//! The forwarding database: which port a (VLAN, MAC) was last seen on.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::wire::frame::Mac;

#[derive(Clone, Copy, Debug)]
struct Entry {
    port: u32,
    /// Which of the port's queue items stands for this entry: items from before a move or
    /// a re-learn carry an older one.
    gen: u32,
    /// Seen again since eviction last passed it (the CLOCK algorithm's reference bit).
    referenced: bool,
    last_seen: Instant,
}

/// What learning a source address did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// Already known on this port; its age was refreshed.
    Refreshed,
    New,
    /// New, in a full table: the least recently seen entry of the port holding the most
    /// made room.
    Evicted {
        victim: usize,
    },
    /// Known on another port before: the station moved.
    Moved {
        from: usize,
    },
    /// Not learned: the port has as many addresses as it may.
    PortLimit,
}

/// Queue items each learn looks at to age entries out: aging costs a bounded amount per
/// new address, never a scan of the table on the forwarding path.
const SWEEP_PER_LEARN: usize = 2;

/// (VLAN, MAC) packed into one word: the key is hashed for every frame, twice.
fn key(vlan: u16, mac: Mac) -> u64 {
    let m = mac.0;
    u64::from(vlan) << 48 | u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]])
}

fn unkey(k: u64) -> (u16, Mac) {
    let b = k.to_be_bytes();
    ((k >> 48) as u16, Mac([b[2], b[3], b[4], b[5], b[6], b[7]]))
}

/// A one-multiply hash of a packed key, seeded per process so that guests cannot aim
/// their addresses at one bucket (SipHash would cost more than the rest of the lookup).
#[derive(Clone, Copy)]
struct KeyHash {
    seed: u64,
}

impl KeyHash {
    fn new() -> KeyHash {
        KeyHash {
            seed: std::collections::hash_map::RandomState::new().hash_one(0u64) | 1,
        }
    }
}

struct KeyHasher {
    seed: u64,
    h: u64,
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        // Folded multiply: every input bit reaches both the high bits hashbrown uses for
        // its tags and the low bits it uses for the bucket.
        let full = u128::from(self.h ^ x) * u128::from(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        self.h = (full as u64) ^ (full >> 64) as u64;
    }

    fn finish(&self) -> u64 {
        self.h
    }
}

impl BuildHasher for KeyHash {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            seed: self.seed,
            h: self.seed.rotate_left(29),
        }
    }
}

/// The table, with each port's entries in a queue in the order they were learned. When the
/// table is full, a new address takes the place of the least recently seen entry (CLOCK:
/// an entry seen since the last pass gets a second chance) of the port that holds the
/// most, so a port that floods addresses churns its own entries, not its neighbours'.
pub struct Fdb {
    entries: HashMap<u64, Entry, KeyHash>,
    /// (key, gen) in learning order, per port; items whose entry moved or went are skipped
    /// when they come up.
    queues: Vec<VecDeque<(u64, u32)>>,
    per_port: Vec<u32>,
    port_limits: Vec<Option<u32>>,
    capacity: usize,
    aging: Duration,
    gen: u32,
    /// The port whose queue the next sweep looks at.
    sweep_port: usize,
}

impl Fdb {
    pub fn new(capacity: usize, aging: Duration, port_limits: Vec<Option<u32>>) -> Fdb {
        Fdb {
            entries: HashMap::with_capacity_and_hasher(capacity.min(1 << 16), KeyHash::new()),
            queues: vec![VecDeque::new(); port_limits.len()],
            per_port: vec![0; port_limits.len()],
            port_limits,
            capacity,
            aging,
            gen: 0,
            sweep_port: 0,
        }
    }

    fn expired(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_seen) > self.aging
    }

    pub fn learn(&mut self, vlan: u16, mac: Mac, port: usize, now: Instant) -> Learned {
        let key = key(vlan, mac);
        if let Some(e) = self.entries.get_mut(&key) {
            if e.port as usize == port {
                e.last_seen = now;
                e.referenced = true;
                return Learned::Refreshed;
            }
            let from = e.port as usize;
            if !self.has_room_on(port) {
                return Learned::PortLimit;
            }
            self.per_port[from] -= 1;
            self.place(key, port, now);
            return Learned::Moved { from };
        }
        if !self.has_room_on(port) {
            return Learned::PortLimit;
        }
        self.sweep(now, SWEEP_PER_LEARN);
        let mut learned = Learned::New;
        if self.entries.len() >= self.capacity {
            match self.evict(port, now) {
                Some(victim) => learned = Learned::Evicted { victim },
                // Only with a capacity of 0, which the config refuses.
                None => return Learned::PortLimit,
            }
        }
        self.place(key, port, now);
        learned
    }

    /// Put `key` on `port`, seen `now`, count it there and queue it.
    fn place(&mut self, key: u64, port: usize, now: Instant) {
        self.gen = self.gen.wrapping_add(1);
        self.per_port[port] += 1;
        self.entries.insert(
            key,
            Entry {
                port: port as u32,
                gen: self.gen,
                referenced: false,
                last_seen: now,
            },
        );
        let q = &mut self.queues[port];
        q.push_back((key, self.gen));
        // Items of entries that moved away pile up in a queue nobody evicts from: drop
        // them once they outnumber the live ones.
        if q.len() > 2 * self.per_port[port] as usize + 64 {
            let entries = &self.entries;
            q.retain(|(k, g)| entries.get(k).is_some_and(|e| e.gen == *g));
        }
    }

    fn has_room_on(&self, port: usize) -> bool {
        match self.port_limits.get(port).copied().flatten() {
            Some(limit) => self.per_port[port] < limit,
            None => true,
        }
    }

    fn remove(&mut self, key: u64) {
        if let Some(e) = self.entries.remove(&key) {
            self.per_port[e.port as usize] -= 1;
        }
    }

    /// Make room for a new entry of `learner`: take the least recently seen entry of the
    /// port holding the most (the learner itself on a tie). Returns that port.
    fn evict(&mut self, learner: usize, now: Instant) -> Option<usize> {
        let (mut victim, mut most) = (learner, self.per_port.get(learner).copied()?);
        for (p, &n) in self.per_port.iter().enumerate() {
            if n > most {
                (victim, most) = (p, n);
            }
        }
        // Each entry is passed over at most once before its reference bit is clear, so
        // this ends; its cost is paid for by the frames that set those bits.
        while let Some((key, gen)) = self.queues[victim].pop_front() {
            let Some(e) = self.entries.get_mut(&key).filter(|e| e.gen == gen) else {
                continue;
            };
            if e.referenced && now.saturating_duration_since(e.last_seen) <= self.aging {
                e.referenced = false;
                self.queues[victim].push_back((key, gen));
                continue;
            }
            self.remove(key);
            return Some(victim);
        }
        None
    }

    /// Look at up to `budget` queue items, a port at a time: expired entries go, items
    /// of entries that moved or went are dropped, live entries go to the back.
    fn sweep(&mut self, now: Instant, budget: usize) {
        for _ in 0..budget {
            let ports = self.queues.len();
            let Some(q) = (0..ports)
                .map(|i| (self.sweep_port + i) % ports)
                .find(|&p| !self.queues[p].is_empty())
            else {
                return;
            };
            self.sweep_port = (q + 1) % ports;
            let Some((key, gen)) = self.queues[q].pop_front() else {
                return;
            };
            // One lookup: gone or moved (a stale item: dropped), expired, or live.
            match self.entries.get(&key).filter(|e| e.gen == gen) {
                None => {}
                Some(e) if self.expired(e, now) => self.remove(key),
                Some(_) => self.queues[q].push_back((key, gen)),
            }
        }
    }

    /// The port a unicast address lives on, if known and not aged out.
    pub fn lookup(&self, vlan: u16, mac: Mac, now: Instant) -> Option<usize> {
        self.entries
            .get(&key(vlan, mac))
            .filter(|e| !self.expired(e, now))
            .map(|e| e.port as usize)
    }

    /// Forget everything learned on `port` (its guest went away).
    pub fn flush_port(&mut self, port: usize) {
        self.entries.retain(|_, e| e.port as usize != port);
        if let Some(n) = self.per_port.get_mut(port) {
            *n = 0;
        }
        if let Some(q) = self.queues.get_mut(port) {
            q.clear();
        }
    }

    /// Live entries: (vlan, mac, port, time since last seen), in no particular order.
    pub fn entries(&self, now: Instant) -> Vec<(u16, Mac, usize, Duration)> {
        self.entries
            .iter()
            .filter(|(_, e)| !self.expired(e, now))
            .map(|(&k, e)| {
                let (vlan, mac) = unkey(k);
                (
                    vlan,
                    mac,
                    e.port as usize,
                    now.saturating_duration_since(e.last_seen),
                )
            })
            .collect()
    }

    /// Entries in the table, aged-out ones included until a sweep or an eviction takes
    /// them.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many entries `port` holds.
    pub fn on_port(&self, port: usize) -> u32 {
        self.per_port.get(port).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn key_round_trip() {
        for (vlan, m) in [(0, [0u8; 6]), (4095, [0xff; 6]), (10, [2, 0, 0, 0, 0, 7])] {
            assert_eq!(unkey(key(vlan, Mac(m))), (vlan, Mac(m)));
        }
    }

    #[test]
    fn learn_lookup_move() {
        let t = Instant::now();
        let mut f = Fdb::new(16, Duration::from_secs(300), vec![None; 3]);
        assert_eq!(f.learn(10, mac(1), 0, t), Learned::New);
        assert_eq!(f.learn(10, mac(1), 0, t), Learned::Refreshed);
        assert_eq!(f.lookup(10, mac(1), t), Some(0));
        // The same MAC on another VLAN is another station.
        assert_eq!(f.lookup(20, mac(1), t), None);
        assert_eq!(f.learn(10, mac(1), 2, t), Learned::Moved { from: 0 });
        assert_eq!(f.lookup(10, mac(1), t), Some(2));
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn aging() {
        let t = Instant::now();
        let mut f = Fdb::new(16, Duration::from_secs(300), vec![None; 2]);
        f.learn(10, mac(1), 0, t);
        f.learn(10, mac(2), 1, t + Duration::from_secs(200));
        let later = t + Duration::from_secs(301);
        assert_eq!(f.lookup(10, mac(1), later), None, "aged out");
        assert_eq!(f.lookup(10, mac(2), later), Some(1));
        // Learning sweeps a few queue items each time: the expired entry goes.
        f.learn(10, mac(3), 1, later);
        f.learn(10, mac(4), 1, later);
        assert_eq!(f.len(), 3);
        assert_eq!(f.on_port(0), 0);
    }

    #[test]
    fn aging_keeps_up_with_learning_without_scans() {
        let t = Instant::now();
        let mut f = Fdb::new(1 << 16, Duration::from_secs(10), vec![None; 4]);
        for i in 0..10_000u32 {
            let m = Mac([2, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1]);
            f.learn(1, m, (i % 4) as usize, t);
        }
        // Later, as many new addresses as there were: the old ones all age out on the way.
        let later = t + Duration::from_secs(11);
        for i in 0..10_000u32 {
            let m = Mac([2, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8, 2]);
            f.learn(1, m, (i % 4) as usize, later);
        }
        assert_eq!(f.len(), 10_000);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_of_one_port() {
        let t = Instant::now();
        let mut f = Fdb::new(2, Duration::from_secs(10), vec![None; 1]);
        assert_eq!(f.learn(1, mac(1), 0, t), Learned::New);
        assert_eq!(f.learn(1, mac(2), 0, t), Learned::New);
        assert_eq!(f.learn(1, mac(3), 0, t), Learned::Evicted { victim: 0 });
        assert_eq!(f.lookup(1, mac(1), t), None, "the oldest went");
        assert_eq!(f.lookup(1, mac(3), t), Some(0));
        // Seen again since: mac(2) gets a second chance, mac(3) goes.
        f.learn(1, mac(2), 0, t);
        assert_eq!(f.learn(1, mac(4), 0, t), Learned::Evicted { victim: 0 });
        assert_eq!(f.lookup(1, mac(2), t), Some(0));
        assert_eq!(f.lookup(1, mac(3), t), None);
        assert_eq!(f.len(), 2);
    }

    /// Before: a full table refused every port's new addresses, and one port flooding
    /// random source MACs filled it.
    #[test]
    fn a_flooding_port_churns_only_its_own_entries() {
        let t = Instant::now();
        let mut f = Fdb::new(100, Duration::from_secs(300), vec![None; 3]);
        let flood = |f: &mut Fdb, from: u32, n: u32| {
            for i in from..from + n {
                let m = Mac([2, 1, (i >> 16) as u8, (i >> 8) as u8, i as u8, 0]);
                f.learn(1, m, 0, t);
            }
        };
        flood(&mut f, 0, 10_000);
        assert_eq!(f.len(), 100);
        // Port 1's stations are learned in the full table: port 0 makes room.
        for n in 1..=5 {
            assert_eq!(f.learn(1, mac(n), 1, t), Learned::Evicted { victim: 0 });
        }
        // A port that is refreshing its entries keeps them too, while port 0 floods on.
        f.learn(1, mac(50), 2, t);
        flood(&mut f, 10_000, 10_000);
        for n in 1..=5 {
            assert_eq!(f.lookup(1, mac(n), t), Some(1), "station {n} of port 1");
        }
        assert_eq!(f.lookup(1, mac(50), t), Some(2));
        assert_eq!((f.on_port(0), f.on_port(1), f.on_port(2)), (94, 5, 1));
        // Moves leave stale queue items behind; they are bounded.
        for round in 0..1000 {
            f.learn(1, mac(1), 1 + round % 2, t);
        }
        assert!(f.queues.iter().map(VecDeque::len).sum::<usize>() < 400);
    }

    #[test]
    fn port_limit_and_flush() {
        let t = Instant::now();
        let mut f = Fdb::new(16, Duration::from_secs(300), vec![Some(2), None]);
        assert_eq!(f.learn(1, mac(1), 0, t), Learned::New);
        assert_eq!(f.learn(1, mac(2), 0, t), Learned::New);
        assert_eq!(f.learn(1, mac(3), 0, t), Learned::PortLimit);
        // Moving a station onto a full port is refused too.
        f.learn(1, mac(9), 1, t);
        assert_eq!(f.learn(1, mac(9), 0, t), Learned::PortLimit);
        f.flush_port(0);
        assert_eq!(f.lookup(1, mac(1), t), None);
        assert_eq!(f.learn(1, mac(3), 0, t), Learned::New);
    }
}
