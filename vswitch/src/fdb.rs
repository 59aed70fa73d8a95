//! The forwarding database: which port a (VLAN, MAC) was last seen on.

use std::collections::HashMap;
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

pub struct Fdb {
    entries: HashMap<(u16, Mac), Entry>,
    per_port: Vec<u32>,
    port_limits: Vec<Option<u32>>,
    capacity: usize,
    aging: Duration,
}

impl Fdb {
    pub fn new(capacity: usize, aging: Duration, port_limits: Vec<Option<u32>>) -> Fdb {
        Fdb {
            entries: HashMap::with_capacity(capacity.min(1 << 16)),
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
        let key = (vlan, mac);
        if let Some(e) = self.entries.get(&key).copied() {
            if e.port == port {
                if let Some(e) = self.entries.get_mut(&key) {
                    e.last_seen = now;
                }
                return Learned::Refreshed;
            }
            if !self.has_room_on(port) {
                return Learned::PortLimit;
            }
            self.per_port[e.port] -= 1;
            self.per_port[port] += 1;
            self.entries.insert(
                key,
                Entry {
                    port,
                    last_seen: now,
                },
            );
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
        self.per_port[port] += 1;
        self.entries.insert(
            key,
            Entry {
                port,
                last_seen: now,
            },
        );
        Learned::New
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
            .get(&(vlan, mac))
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
            .map(|(&(vlan, mac), e)| {
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
