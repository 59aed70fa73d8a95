//! The forwarding database: which port a (VLAN, MAC) was last seen on.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use crate::frame::Mac;

#[derive(Clone, Copy, Debug)]
struct Entry {
    port: usize,
    last_seen: Instant,
}

/// What learning a source address did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// Already known on this port; its age was refreshed.
    Refreshed,
    New,
    /// Known on another port before: the station moved.
    Moved {
        from: usize,
    },
    /// Not learned: the table is full.
    TableFull,
    /// Not learned: the port has as many addresses as it may.
    PortLimit,
}

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

pub struct Fdb {
    entries: HashMap<u64, Entry, KeyHash>,
    per_port: Vec<u32>,
    port_limits: Vec<Option<u32>>,
    capacity: usize,
    aging: Duration,
}

impl Fdb {
    pub fn new(capacity: usize, aging: Duration, port_limits: Vec<Option<u32>>) -> Fdb {
        Fdb {
            entries: HashMap::with_capacity_and_hasher(capacity.min(1 << 16), KeyHash::new()),
            per_port: vec![0; port_limits.len()],
            port_limits,
            capacity,
            aging,
        }
    }

    fn expired(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_seen) > self.aging
    }

    pub fn learn(&mut self, vlan: u16, mac: Mac, port: usize, now: Instant) -> Learned {
        let key = key(vlan, mac);
        if let Some(e) = self.entries.get_mut(&key) {
            if e.port == port {
                e.last_seen = now;
                return Learned::Refreshed;
            }
            let e = *e;
            if !self.has_room_on(port) {
                return Learned::PortLimit;
            }
            self.per_port[e.port] -= 1;
            self.place(key, port, now);
            return Learned::Moved { from: e.port };
        }
        if self.entries.len() >= self.capacity {
            // Make room from expired entries before giving up.
            self.age(now);
            if self.entries.len() >= self.capacity {
                return Learned::TableFull;
            }
        }
        if !self.has_room_on(port) {
            return Learned::PortLimit;
        }
        self.place(key, port, now);
        Learned::New
    }

    /// Put `key` on `port`, seen `now`, and count it there.
    fn place(&mut self, key: u64, port: usize, now: Instant) {
        self.per_port[port] += 1;
        self.entries.insert(
            key,
            Entry {
                port,
                last_seen: now,
            },
        );
    }

    fn has_room_on(&self, port: usize) -> bool {
        match self.port_limits.get(port).copied().flatten() {
            Some(limit) => self.per_port[port] < limit,
            None => true,
        }
    }

    /// The port a unicast address lives on, if known and not aged out.
    pub fn lookup(&self, vlan: u16, mac: Mac, now: Instant) -> Option<usize> {
        self.entries
            .get(&key(vlan, mac))
            .filter(|e| !self.expired(e, now))
            .map(|e| e.port)
    }

    /// Drop entries not seen for longer than the aging time.
    pub fn age(&mut self, now: Instant) {
        let aging = self.aging;
        let per_port = &mut self.per_port;
        self.entries.retain(|_, e| {
            let keep = now.saturating_duration_since(e.last_seen) <= aging;
            if !keep {
                per_port[e.port] -= 1;
            }
            keep
        });
    }

    /// Forget everything learned on `port` (its guest went away).
    pub fn flush_port(&mut self, port: usize) {
        self.entries.retain(|_, e| e.port != port);
        if let Some(n) = self.per_port.get_mut(port) {
            *n = 0;
        }
    }

    /// Live entries: (vlan, mac, port, time since last seen), sorted by VLAN and MAC.
    pub fn entries(&self, now: Instant) -> Vec<(u16, Mac, usize, Duration)> {
        let mut out: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| !self.expired(e, now))
            .map(|(&k, e)| {
                let (vlan, mac) = unkey(k);
                (
                    vlan,
                    mac,
                    e.port,
                    now.saturating_duration_since(e.last_seen),
                )
            })
            .collect();
        out.sort_by_key(|&(vlan, mac, _, _)| (vlan, mac));
        out
    }

    /// Entries in the table, aged-out ones included until the next `age`.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
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
        f.age(later);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn table_full_then_room_after_aging() {
        let t = Instant::now();
        let mut f = Fdb::new(2, Duration::from_secs(10), vec![None; 1]);
        assert_eq!(f.learn(1, mac(1), 0, t), Learned::New);
        assert_eq!(f.learn(1, mac(2), 0, t), Learned::New);
        assert_eq!(f.learn(1, mac(3), 0, t), Learned::TableFull);
        assert_eq!(f.lookup(1, mac(3), t), None);
        assert_eq!(
            f.learn(1, mac(3), 0, t + Duration::from_secs(11)),
            Learned::New
        );
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
