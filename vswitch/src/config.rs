//! `vswitch serve --config FILE`: the TOML file parsed into a checked [`SwitchConfig`].
//!
//! The file has an optional `[switch]` table, optional `[[vlan]]` entries and one
//! `[[port]]` entry per guest NIC; `configs/vswitch-*.toml` show every key. Unknown keys
//! are errors, and every error names the file, the entry (`[[port]] #2 "vm2" (line 9)`)
//! and the key. Relative paths are taken from the working directory, as in vdisk's config.
//!
//! Decisions where the issue is silent:
//! - `vlan` is required: a port joins no VLAN by accident.
//! - A trunk's `native` VLAN is implicitly allowed (as in OVS): [`VlanMode::Trunk`]'s
//!   `allowed` includes it, whether or not it is listed. Frames on it leave untagged, and
//!   tagged ones with its id are accepted too. Without `native`, untagged frames are dropped.
//! - Two ports may not share a `mac` on a common VLAN, nor a socket path; the control
//!   socket is not a port socket. A `service_ip` on a VLAN no port uses is allowed.
//! - QoS: a rate of 0 or absent is unlimited. A burst of 0 or absent defaults to 10 ms at
//!   the rate, at least [`MIN_DEFAULT_BURST_BYTES`] or [`MIN_DEFAULT_BURST_PACKETS`]. A byte
//!   burst must hold the largest frame (`mtu` + 18), or such a frame could never pass; a
//!   burst without its rate is refused.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use common::access::{PeerPolicy, SocketPerms};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::{Spanned, Table, Value};

use crate::wire::frame::Mac;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/vswitch/ctl.sock";
pub const DEFAULT_MAC_AGING_SECS: u32 = 300;
pub const DEFAULT_MAC_TABLE_SIZE: u32 = 8192;
const MAX_MAC_AGING_SECS: i64 = 86_400;
const MAX_MAC_TABLE_SIZE: i64 = 1 << 20;
/// A forwarding thread polls this long after its last frame before it sleeps: long enough
/// that request/response traffic (a ping-pong, an RPC) stays on the polling path, short
/// enough that an idle switch uses well under 1% of a core.
pub const DEFAULT_POLL_US: u32 = 1000;
const MAX_POLL_US: i64 = 1_000_000;
const MAX_PMD_THREADS: i64 = 64;
/// CPU_SETSIZE: what sched_setaffinity can name.
const MAX_CORE: i64 = 1023;
pub const DEFAULT_MTU: u16 = 1500;
/// Queue pairs a port may offer: as many as QEMU's vhost-user-net takes in practice, and
/// more than the forwarding threads of any machine this runs on.
pub const MAX_QUEUE_PAIRS: u16 = 16;
pub const MIN_MTU: u16 = 68;
pub const MAX_MTU: u16 = 9000;
/// Ethernet header plus one VLAN tag: a frame is at most `mtu + FRAME_OVERHEAD` bytes.
pub const FRAME_OVERHEAD: u64 = 18;
pub const MIN_DEFAULT_BURST_BYTES: u64 = 64 * 1024;
pub const MIN_DEFAULT_BURST_PACKETS: u64 = 32;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
const MAX_NAME: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchConfig {
    pub switch: SwitchSettings,
    pub vlans: Vec<VlanSettings>,
    pub ports: Vec<PortConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchSettings {
    pub control_socket: PathBuf,
    /// Who may use the control socket besides root and the switch's own user.
    pub control_access: PeerPolicy,
    /// The port sockets' permissions unless a port sets its own.
    pub socket_perms: SocketPerms,
    pub mac_aging: Duration,
    /// Global FDB limit (entries over all VLANs).
    pub mac_table_size: usize,
    pub pmd: PmdSettings,
}

/// The forwarding threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmdSettings {
    /// One thread per core, pinned to it; empty: `threads` threads, unpinned.
    pub cores: Vec<usize>,
    pub threads: usize,
    /// How long a thread polls without finding a frame before it sleeps; zero: it sleeps
    /// as soon as its queues are empty (one wakeup per kick).
    pub poll: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanSettings {
    pub id: u16,
    pub service_ip: Option<ServiceIp>,
}

/// The address the switch answers ARP and ICMP echo on, in a VLAN: `A.B.C.D/LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceIp {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub name: String,
    pub socket: PathBuf,
    /// The listening socket's mode, owner and group (server mode).
    pub socket_perms: SocketPerms,
    pub mode: PortMode,
    pub vlan: VlanMode,
    pub mac: Option<Mac>,
    pub anti_spoof: bool,
    pub mac_limit: Option<u32>,
    pub mtu: u16,
    /// Queue pairs offered to the guest (VIRTIO_NET_F_MQ when more than one).
    pub queues: u16,
    /// Offer checksum and TCP segmentation offloads (default on).
    pub offloads: bool,
    pub qos: QosConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortMode {
    /// Listen on `socket`; the frontend (QEMU `server=off`) connects.
    #[default]
    Server,
    /// Connect to a frontend listening on `socket` (QEMU `server=on`), reconnecting.
    Client,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VlanMode {
    /// Untagged frames belong to this VLAN; tagged frames arriving are dropped.
    Access(u16),
    /// `allowed` is sorted, deduplicated and includes `native`.
    Trunk {
        allowed: Vec<u16>,
        native: Option<u16>,
    },
}

impl VlanMode {
    /// Every VLAN the port carries, sorted.
    pub fn vlans(&self) -> &[u16] {
        match self {
            VlanMode::Access(id) => std::slice::from_ref(id),
            VlanMode::Trunk { allowed, .. } => allowed,
        }
    }

    pub fn carries(&self, vid: u16) -> bool {
        self.vlans().binary_search(&vid).is_ok()
    }
}

impl FromStr for ServiceIp {
    type Err = String;

    fn from_str(s: &str) -> Result<ServiceIp, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("\"{s}\" is not A.B.C.D/LEN (the prefix length is needed)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("\"{a}\" is not an IPv4 address"))?;
        let prefix_len = match l.parse::<u8>() {
            Ok(n @ 1..=32) => n,
            _ => return Err(format!("prefix length \"{l}\" is not between 1 and 32")),
        };
        if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast()
        {
            return Err(format!("{addr} cannot be a host address"));
        }
        let host_mask = u32::MAX.checked_shr(prefix_len.into()).unwrap_or(0);
        let host_bits = u32::from(addr) & host_mask;
        if prefix_len <= 30 && (host_bits == 0 || host_bits == host_mask) {
            return Err(format!("{s} is the subnet's network or broadcast address"));
        }
        Ok(ServiceIp { addr, prefix_len })
    }
}

impl fmt::Display for ServiceIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A token bucket's parameters: `rate` tokens per second, at most `burst` saved up. Tokens
/// are bytes for bit rates (`rate` = bits/s / 8) and packets for packet rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub rate: u64,
    pub burst: u64,
}

/// Per-port QoS as configured; `None` is unlimited (rates) or the default (bursts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosConfig {
    /// Guest → switch, bits/s: backpressure on the TX ring, nothing dropped.
    pub tx_rate_bps: Option<u64>,
    pub tx_burst_bytes: Option<u64>,
    /// Guest → switch, packets/s: backpressure as well.
    pub tx_rate_pps: Option<u64>,
    pub tx_burst_packets: Option<u64>,
    /// Switch → guest, bits/s: policing, excess frames dropped and counted.
    pub rx_rate_bps: Option<u64>,
    pub rx_burst_bytes: Option<u64>,
    /// Broadcast, multicast and unknown unicast the port may inject, packets/s.
    pub storm_pps: Option<u64>,
}

/// (rate key, burst key, whether the rate is bits/s).
const QOS_PAIRS: [(&str, Option<&str>, bool); 4] = [
    ("tx_rate_bps", Some("tx_burst_bytes"), true),
    ("tx_rate_pps", Some("tx_burst_packets"), false),
    ("rx_rate_bps", Some("rx_burst_bytes"), true),
    ("storm_pps", None, false),
];

impl QosConfig {
    pub const KEYS: [&'static str; 7] = [
        "tx_rate_bps",
        "tx_burst_bytes",
        "tx_rate_pps",
        "tx_burst_packets",
        "rx_rate_bps",
        "rx_burst_bytes",
        "storm_pps",
    ];

    fn slot(&mut self, key: &str) -> Option<&mut Option<u64>> {
        Some(match key {
            "tx_rate_bps" => &mut self.tx_rate_bps,
            "tx_burst_bytes" => &mut self.tx_burst_bytes,
            "tx_rate_pps" => &mut self.tx_rate_pps,
            "tx_burst_packets" => &mut self.tx_burst_packets,
            "rx_rate_bps" => &mut self.rx_rate_bps,
            "rx_burst_bytes" => &mut self.rx_burst_bytes,
            "storm_pps" => &mut self.storm_pps,
            _ => return None,
        })
    }

    /// The value of `key` (one of [`Self::KEYS`]), 0 when unset.
    pub fn get(&self, key: &str) -> Option<u64> {
        let mut copy = *self;
        copy.slot(key).map(|v| v.unwrap_or(0))
    }

    /// Sets one key from text, for `vswitch ctl set-qos PORT key=value ...`: digits with
    /// optional `_` and a decimal `k`, `M` or `G` suffix (`tx_rate_bps=100M`). 0 makes a
    /// rate unlimited (and drops its burst) or a burst the default. Call [`Self::validate`]
    /// once all pairs are applied.
    pub fn apply_kv(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let setting = |why: String| ConfigError::Setting {
            key: key.into(),
            why,
        };
        let n = parse_count(value).map_err(setting)?;
        self.set(key, n).map_err(setting)
    }

    fn set(&mut self, key: &str, n: u64) -> Result<(), String> {
        if !Self::KEYS.contains(&key) {
            let keys = Self::KEYS.join(", ");
            return Err(format!("unknown QoS key, expected one of {keys}"));
        }
        let max = match key {
            k if k.ends_with("_bps") => 1_000_000_000_000,
            k if k.ends_with("_bytes") => 1 << 30,
            _ => 1_000_000_000,
        };
        let min = if key.ends_with("_bps") { 1000 } else { 1 };
        if n != 0 && !(min..=max).contains(&n) {
            return Err(format!("{n} is not 0 or between {min} and {max}"));
        }
        if let Some(slot) = self.slot(key) {
            *slot = (n != 0).then_some(n);
        }
        if let (0, Some((_, Some(burst), _))) = (n, QOS_PAIRS.iter().find(|p| p.0 == key)) {
            if let Some(slot) = self.slot(burst) {
                *slot = None;
            }
        }
        Ok(())
    }

    /// Cross-key checks for a port with this `mtu`: a burst needs its rate and must hold
    /// the largest frame.
    pub fn validate(&self, mtu: u16) -> Result<(), ConfigError> {
        self.check(mtu)
            .map_err(|(key, why)| ConfigError::Setting { key, why })
    }

    fn check(&self, mtu: u16) -> Result<(), (String, String)> {
        for (rate, burst, bits) in QOS_PAIRS {
            let Some(burst) = burst else { continue };
            match (self.get(rate), self.get(burst)) {
                (_, Some(0)) => {}
                (Some(0), Some(_)) => return Err((burst.into(), format!("set without {rate}"))),
                (_, Some(b)) if bits && b < u64::from(mtu) + FRAME_OVERHEAD => {
                    let frame = u64::from(mtu) + FRAME_OVERHEAD;
                    let why = format!("{b} is smaller than the largest frame ({frame} bytes)");
                    return Err((burst.into(), why));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn limit(&self, rate: &str, burst: Option<&str>, bits: bool) -> Option<Limit> {
        let rate = self.get(rate).filter(|&r| r != 0)?;
        let (rate, floor) = match bits {
            true => (rate / 8, MIN_DEFAULT_BURST_BYTES),
            false => (rate, MIN_DEFAULT_BURST_PACKETS),
        };
        let burst = burst.and_then(|b| self.get(b)).filter(|&b| b != 0);
        Some(Limit {
            rate,
            burst: burst.unwrap_or((rate / 100).max(floor)),
        })
    }

    /// TX in bytes/s, if limited.
    pub fn tx_bytes(&self) -> Option<Limit> {
        self.limit("tx_rate_bps", Some("tx_burst_bytes"), true)
    }
    pub fn tx_packets(&self) -> Option<Limit> {
        self.limit("tx_rate_pps", Some("tx_burst_packets"), false)
    }
    /// RX policing in bytes/s, if limited.
    pub fn rx_bytes(&self) -> Option<Limit> {
        self.limit("rx_rate_bps", Some("rx_burst_bytes"), true)
    }
    pub fn storm_packets(&self) -> Option<Limit> {
        self.limit("storm_pps", None, false)
    }
}

fn parse_count(value: &str) -> Result<u64, String> {
    let digits: String = value.trim().chars().filter(|&c| c != '_').collect();
    let (num, mul) = match digits.char_indices().last() {
        Some((i, 'k' | 'K')) => (&digits[..i], 1_000),
        Some((i, 'M')) => (&digits[..i], 1_000_000),
        Some((i, 'G')) => (&digits[..i], 1_000_000_000),
        _ => (digits.as_str(), 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("\"{value}\" is not a count like 1500, 100M or 1_000_000"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax and top-level structure; the message has the line and column.
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// `place` is the table (`[switch]`, `[[port]] #2 "vm2" (line 9)`), `key` the key in it.
    #[error("config file {}: {place}: {key}: {why}", path.display())]
    Invalid {
        path: PathBuf,
        place: String,
        key: String,
        why: String,
    },
    /// A setting outside any file (`QosConfig::apply_kv`, `QosConfig::validate`).
    #[error("{key}: {why}")]
    Setting { key: String, why: String },
}

/// What went wrong inside one table: (key, why).
type Bad = (String, String);

fn bad(key: &str, why: impl Into<String>) -> Bad {
    (key.to_string(), why.into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    switch: Option<Spanned<Table>>,
    #[serde(default)]
    vlan: Vec<Spanned<Table>>,
    #[serde(default)]
    port: Vec<Spanned<Table>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSwitch {
    control_socket: Option<PathBuf>,
    #[serde(default)]
    control_users: Vec<String>,
    #[serde(default)]
    control_groups: Vec<String>,
    socket_mode: Option<String>,
    socket_owner: Option<String>,
    socket_group: Option<String>,
    mac_aging_secs: Option<i64>,
    mac_table_size: Option<i64>,
    pmd_cores: Option<Vec<i64>>,
    pmd_threads: Option<i64>,
    poll_us: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVlan {
    id: i64,
    service_ip: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePort {
    name: String,
    socket: PathBuf,
    socket_mode: Option<String>,
    socket_owner: Option<String>,
    socket_group: Option<String>,
    #[serde(default)]
    mode: PortMode,
    vlan: Value,
    mac: Option<String>,
    #[serde(default)]
    anti_spoof: bool,
    mac_limit: Option<i64>,
    mtu: Option<i64>,
    queues: Option<i64>,
    offloads: Option<bool>,
    #[serde(default)]
    qos: QosConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTrunk {
    trunk: Vec<i64>,
    native: Option<i64>,
}

/// Deserializes one table, turning serde's message into (key, why); `prefix` names the
/// key the table sits under (`vlan.`).
fn from_table<T: DeserializeOwned>(v: Value, prefix: &str) -> Result<T, Bad> {
    v.try_into().map_err(|e: toml::de::Error| {
        let msg = e.to_string();
        let msg = msg.trim_end();
        let (msg, path) = match msg.rsplit_once("\nin `") {
            Some((m, p)) => (m, p.trim_end_matches('`')),
            None => (msg, ""),
        };
        let join = |k: &str| {
            let parts: Vec<&str> = [prefix, path, k]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect();
            parts.join(".")
        };
        for (start, why) in [
            ("unknown field `", "unknown key"),
            ("missing field `", "missing"),
        ] {
            if let Some((field, rest)) = msg.strip_prefix(start).and_then(|r| r.split_once('`')) {
                return (join(field), format!("{why}{rest}"));
            }
        }
        (join(""), msg.to_string())
    })
}

fn ranged(key: &str, v: i64, lo: i64, hi: i64) -> Result<i64, Bad> {
    match (lo..=hi).contains(&v) {
        true => Ok(v),
        false => Err(bad(key, format!("{v} is not between {lo} and {hi}"))),
    }
}

fn vlan_id(key: &str, v: i64) -> Result<u16, Bad> {
    let v = ranged(key, v, 1, 4094)?;
    u16::try_from(v).map_err(|_| bad(key, "out of range"))
}

fn socket_path(key: &str, p: PathBuf) -> Result<PathBuf, Bad> {
    let len = p.as_os_str().len();
    if len == 0 {
        return Err(bad(key, "empty path"));
    }
    if len > MAX_SOCKET_PATH {
        let why = format!("{len} bytes long, over the {MAX_SOCKET_PATH}-byte unix socket limit");
        return Err(bad(key, why));
    }
    Ok(p)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

fn switch_settings(t: Table) -> Result<SwitchSettings, Bad> {
    let f: FileSwitch = from_table(Value::Table(t), "")?;
    let control = f.control_socket.unwrap_or(DEFAULT_CONTROL_SOCKET.into());
    let aging = f.mac_aging_secs.unwrap_or(DEFAULT_MAC_AGING_SECS.into());
    let size = f.mac_table_size.unwrap_or(DEFAULT_MAC_TABLE_SIZE.into());
    let size = ranged("mac_table_size", size, 1, MAX_MAC_TABLE_SIZE)?;
    let control_access =
        PeerPolicy::parse(&f.control_users, &f.control_groups).map_err(|e| match e {
            common::access::AccessError::NoGroup(_) => bad("control_groups", e.to_string()),
            _ => bad("control_users", e.to_string()),
        })?;
    Ok(SwitchSettings {
        control_socket: socket_path("control_socket", control)?,
        control_access,
        socket_perms: socket_perms(
            SocketPerms::default(),
            f.socket_mode,
            f.socket_owner,
            f.socket_group,
        )?,
        mac_aging: Duration::from_secs(
            ranged("mac_aging_secs", aging, 1, MAX_MAC_AGING_SECS)? as u64
        ),
        mac_table_size: usize::try_from(size).map_err(|_| bad("mac_table_size", "too large"))?,
        pmd: pmd_settings(f.pmd_cores, f.pmd_threads, f.poll_us)?,
    })
}

fn pmd_settings(
    cores: Option<Vec<i64>>,
    threads: Option<i64>,
    poll_us: Option<i64>,
) -> Result<PmdSettings, Bad> {
    let poll = ranged(
        "poll_us",
        poll_us.unwrap_or(DEFAULT_POLL_US.into()),
        0,
        MAX_POLL_US,
    )?;
    let poll = Duration::from_micros(poll as u64);
    let cores = match (cores, threads) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "pmd_threads",
                "set pmd_cores (pinned threads) or pmd_threads (unpinned), not both",
            ))
        }
        (Some(c), None) => c,
        (None, t) => {
            let t = ranged("pmd_threads", t.unwrap_or(1), 1, MAX_PMD_THREADS)?;
            return Ok(PmdSettings {
                cores: Vec::new(),
                threads: t as usize,
                poll,
            });
        }
    };
    if cores.is_empty() {
        return Err(bad(
            "pmd_cores",
            "empty list (leave it out for one unpinned thread)",
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(cores.len());
    for c in cores {
        let c = ranged("pmd_cores", c, 0, MAX_CORE)?;
        if !seen.insert(c) {
            return Err(bad("pmd_cores", format!("core {c} is listed twice")));
        }
        out.push(c as usize);
    }
    Ok(PmdSettings {
        threads: out.len(),
        cores: out,
        poll,
    })
}

fn vlan_settings(t: Table) -> Result<VlanSettings, Bad> {
    let f: FileVlan = from_table(Value::Table(t), "")?;
    let service_ip = match f.service_ip {
        Some(s) => Some(s.parse().map_err(|why| bad("service_ip", why))?),
        None => None,
    };
    Ok(VlanSettings {
        id: vlan_id("id", f.id)?,
        service_ip,
    })
}

fn vlan_mode(v: Value) -> Result<VlanMode, Bad> {
    let t = match v {
        Value::Integer(id) => return Ok(VlanMode::Access(vlan_id("vlan", id)?)),
        Value::Table(t) => t,
        other => {
            let why = format!(
                "{other} is neither a VLAN id nor a table like {{ trunk = [10, 20], native = 1 }}"
            );
            return Err(bad("vlan", why));
        }
    };
    let f: FileTrunk = from_table(Value::Table(t), "vlan")?;
    if f.trunk.is_empty() {
        return Err(bad(
            "vlan.trunk",
            "empty; list the VLANs (an access port is `vlan = N`)",
        ));
    }
    let native = f.native.map(|n| vlan_id("vlan.native", n)).transpose()?;
    let mut allowed = f
        .trunk
        .into_iter()
        .map(|id| vlan_id("vlan.trunk", id))
        .collect::<Result<Vec<_>, _>>()?;
    allowed.extend(native);
    allowed.sort_unstable();
    allowed.dedup();
    Ok(VlanMode::Trunk { allowed, native })
}

/// `base` with what the `socket_mode`, `socket_owner` and `socket_group` keys set.
fn socket_perms(
    base: SocketPerms,
    mode: Option<String>,
    owner: Option<String>,
    group: Option<String>,
) -> Result<SocketPerms, Bad> {
    use common::access::AccessError;
    base.parse(mode.as_deref(), owner.as_deref(), group.as_deref())
        .map_err(|e| {
            let key = match e {
                AccessError::Mode(_) => "socket_mode",
                AccessError::NoUser(_) => "socket_owner",
                AccessError::NoGroup(_) => "socket_group",
            };
            bad(key, e.to_string())
        })
}

fn port_config(t: Table, defaults: &SwitchSettings) -> Result<PortConfig, Bad> {
    let f: FilePort = from_table(Value::Table(t), "")?;
    let name_ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if f.name.is_empty() || f.name.len() > MAX_NAME || !f.name.chars().all(name_ok) {
        let why = format!("\"{}\" is not 1 to {MAX_NAME} of A-Z a-z 0-9 - _ .", f.name);
        return Err(bad("name", why));
    }
    let mac = match f.mac {
        Some(s) => {
            let mac: Mac = s.parse().map_err(|why| bad("mac", why))?;
            if mac.is_multicast() || mac.0 == [0; 6] {
                return Err(bad("mac", format!("{mac} is multicast, broadcast or zero")));
            }
            Some(mac)
        }
        None => None,
    };
    if f.anti_spoof && mac.is_none() {
        return Err(bad(
            "anti_spoof",
            "true needs `mac`, the only source MAC allowed",
        ));
    }
    let mac_limit = match f.mac_limit {
        Some(n) => Some(ranged("mac_limit", n, 1, MAX_MAC_TABLE_SIZE)? as u32),
        None => None,
    };
    let mtu = ranged(
        "mtu",
        f.mtu.unwrap_or(DEFAULT_MTU.into()),
        MIN_MTU.into(),
        MAX_MTU.into(),
    )? as u16;
    let queues = ranged("queues", f.queues.unwrap_or(1), 1, MAX_QUEUE_PAIRS.into())? as u16;
    let mut qos = QosConfig::default();
    for key in QosConfig::KEYS {
        let n = f.qos.get(key).unwrap_or(0);
        qos.set(key, n)
            .map_err(|why| bad(&format!("qos.{key}"), why))?;
    }
    qos.check(mtu)
        .map_err(|(key, why)| (format!("qos.{key}"), why))?;
    Ok(PortConfig {
        name: f.name,
        socket: socket_path("socket", f.socket)?,
        socket_perms: socket_perms(
            defaults.socket_perms,
            f.socket_mode,
            f.socket_owner,
            f.socket_group,
        )?,
        mode: f.mode,
        vlan: vlan_mode(f.vlan)?,
        mac,
        anti_spoof: f.anti_spoof,
        mac_limit,
        mtu,
        queues,
        offloads: f.offloads.unwrap_or(true),
        qos,
    })
}

pub fn load(path: &Path) -> Result<SwitchConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and checks `text`; `origin` is the file it came from, for messages.
pub fn parse(text: &str, origin: &Path) -> Result<SwitchConfig, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let fail = |place: String, (key, why): Bad| ConfigError::Invalid {
        path: origin.to_path_buf(),
        place,
        key,
        why,
    };
    let switch = match raw.switch {
        Some(t) => {
            let place = format!("[switch] (line {})", line_of(text, t.span().start));
            switch_settings(t.into_inner()).map_err(|b| fail(place, b))?
        }
        None => switch_settings(Table::new()).map_err(|b| fail("[switch]".into(), b))?,
    };

    let mut vlans: Vec<VlanSettings> = Vec::new();
    for (i, t) in raw.vlan.into_iter().enumerate() {
        let place = format!(
            "[[vlan]] #{} (line {})",
            i + 1,
            line_of(text, t.span().start)
        );
        let v = vlan_settings(t.into_inner()).map_err(|b| fail(place.clone(), b))?;
        if let Some(j) = vlans.iter().position(|o| o.id == v.id) {
            let why = format!("VLAN {} is already configured by [[vlan]] #{}", v.id, j + 1);
            return Err(fail(place, bad("id", why)));
        }
        vlans.push(v);
    }

    if raw.port.is_empty() {
        let why = "no [[port]] entries; at least one port is needed";
        return Err(fail("top level".into(), bad("port", why)));
    }
    let mut ports: Vec<PortConfig> = Vec::new();
    let mut names = HashSet::new();
    let mut sockets = HashMap::new();
    let control: PathBuf = switch.control_socket.components().collect();
    let mut macs = HashMap::new();
    for (i, t) in raw.port.into_iter().enumerate() {
        let line = line_of(text, t.span().start);
        let place = match t.get_ref().get("name").and_then(Value::as_str) {
            Some(name) => format!("[[port]] #{} \"{name}\" (line {line})", i + 1),
            None => format!("[[port]] #{} (line {line})", i + 1),
        };
        let p = port_config(t.into_inner(), &switch).map_err(|b| fail(place.clone(), b))?;
        if !names.insert(p.name.clone()) {
            let why = format!("\"{}\" is already the name of another port", p.name);
            return Err(fail(place, bad("name", why)));
        }
        let socket: PathBuf = p.socket.components().collect();
        if socket == control {
            return Err(fail(place, bad("socket", "is [switch] control_socket")));
        }
        if let Some(other) = sockets.insert(socket, p.name.clone()) {
            let why = format!(
                "{} is already the socket of port \"{other}\"",
                p.socket.display()
            );
            return Err(fail(place, bad("socket", why)));
        }
        if let Some(mac) = p.mac {
            for &vid in p.vlan.vlans() {
                if let Some(other) = macs.insert((vid, mac), p.name.clone()) {
                    let why = format!("{mac} is already the MAC of port \"{other}\" on VLAN {vid}");
                    return Err(fail(place, bad("mac", why)));
                }
            }
        }
        ports.push(p);
    }
    Ok(SwitchConfig {
        switch,
        vlans,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untagged(v: &VlanMode) -> Option<u16> {
        match v {
            VlanMode::Access(id) => Some(*id),
            VlanMode::Trunk { native, .. } => *native,
        }
    }

    const P1: &str = "[[port]]\nname = \"vm1\"\nsocket = \"/tmp/vm1.sock\"\nvlan = 10\n";

    fn ok(text: &str) -> SwitchConfig {
        parse(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The error for `text`, checked to name the file and each of `needles`.
    fn err(text: &str, needles: &[&str]) {
        let e = parse(text, Path::new("test.toml"))
            .expect_err(text)
            .to_string();
        for n in ["test.toml"].iter().chain(needles) {
            assert!(e.contains(n), "{e:?} does not name {n:?}");
        }
    }

    /// vm1, then port vm2 with `extra` lines.
    fn port2(extra: &str) -> String {
        format!("{P1}[[port]]\nname = \"vm2\"\nsocket = \"/tmp/vm2.sock\"\n{extra}\n")
    }

    fn lim(rate: u64, burst: u64) -> Option<Limit> {
        Some(Limit { rate, burst })
    }

    #[test]
    fn examples_parse() {
        let c = ok(include_str!("../../configs/vswitch-two-vlans.toml"));
        let vlans: Vec<_> = c.ports.iter().map(|p| p.vlan.clone()).collect();
        use VlanMode::Access;
        assert_eq!(vlans, [Access(10), Access(10), Access(20)]);
        assert!(c.ports.iter().all(|p| p.anti_spoof && p.mac.is_some()));
        assert_eq!(c.vlans.iter().map(|v| v.id).collect::<Vec<_>>(), [10, 20]);
        assert!(c.vlans.iter().all(|v| v.service_ip.is_some()));
        let c = ok(include_str!("../../configs/vswitch-trunk.toml"));
        assert_eq!(c.vlans.iter().map(|v| v.id).collect::<Vec<_>>(), [30]);
        assert_eq!(c.ports[1].vlan.vlans(), [1, 30, 40]);
        assert_eq!(c.ports[0].qos.tx_bytes(), lim(12_500_000, 125_000));
    }

    #[test]
    fn defaults() {
        let c = ok(P1);
        let s = &c.switch;
        assert_eq!(s.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!((s.mac_aging.as_secs(), s.mac_table_size), (300, 8192));
        let one_unpinned = PmdSettings {
            cores: vec![],
            threads: 1,
            poll: Duration::from_micros(DEFAULT_POLL_US.into()),
        };
        assert_eq!(s.pmd, one_unpinned);
        let c = ok(&format!("[switch]\npmd_cores = [3, 1]\npoll_us = 0\n{P1}"));
        let pinned = PmdSettings {
            cores: vec![3, 1],
            threads: 2,
            poll: Duration::ZERO,
        };
        assert_eq!(c.switch.pmd, pinned);
        assert_eq!(
            ok(&format!("[switch]\npmd_threads = 4\n{P1}"))
                .switch
                .pmd
                .threads,
            4
        );
        let p = &c.ports[0];
        assert_eq!((p.mode, p.mtu, p.mac), (PortMode::Server, 1500, None));
        assert_eq!((p.anti_spoof, p.mac_limit), (false, None));
        assert_eq!((p.qos, untagged(&p.vlan)), (QosConfig::default(), Some(10)));
    }

    #[test]
    fn good_ports() {
        let c = ok(&port2(
            "vlan = { trunk = [30, 10, 30], native = 5 }\nmode = \"client\"",
        ));
        let want = VlanMode::Trunk {
            allowed: vec![5, 10, 30],
            native: Some(5),
        };
        let p = &c.ports[1];
        assert_eq!((&p.vlan, p.mode), (&want, PortMode::Client));
        assert!(p.vlan.carries(5) && !p.vlan.carries(20));
        assert_eq!(
            untagged(&ok(&port2("vlan = { trunk = [10] }")).ports[1].vlan),
            None
        );
        let c = ok(&port2(
            "vlan = 10\nmac = \"52-54-00-AB-00-01\"\nanti_spoof = true",
        ));
        assert_eq!(c.ports[1].mac, Some(Mac([0x52, 0x54, 0, 0xab, 0, 1])));
        assert_eq!(
            c.ports[1].mac.map(|m| m.to_string()).as_deref(),
            Some("52:54:00:ab:00:01")
        );
        let c = ok(&port2("vlan = 1\nmtu = 9000\nmac_limit = 16"));
        assert_eq!((c.ports[1].mtu, c.ports[1].mac_limit), (9000, Some(16)));
        // The same MAC on two ports is fine when they share no VLAN.
        let mac = "\nmac = \"52:54:00:00:00:01\"\n";
        ok(&port2(&format!("vlan = 20{mac}")).replace("vlan = 10\n", &format!("vlan = 10{mac}")));
    }

    /// Every rule on a port, as "lines of port #2 => what its error must say after
    /// `[[port]] #2 "vm2" (line 6): `". Port #2 gets `name = "vm2"`,
    /// `socket = "/tmp/vm2.sock"` and `vlan = 1` unless its lines set them; port #1 is
    /// vm1 with socket /tmp/vm1.sock and MAC 52:54:00:00:00:01 on VLAN 10.
    const PORT_ERRORS: &[&str] = &[
        "vlan = 4095 => vlan: 4095 is not between 1 and 4094",
        "vlan = 0 => vlan: 0 is not between 1 and 4094",
        "vlan = { trunk = [10, 5000] } => vlan.trunk: 5000 is not between",
        "vlan = { trunk = [10], native = 0 } => vlan.native: 0 is not between",
        "vlan = { trunk = [] } => vlan.trunk: empty",
        "vlan = \"ten\" => vlan: \"ten\" is neither a VLAN id nor a table",
        "vlan = { native = 2 } => vlan.trunk: missing",
        "vlan = { trunk = [1], nativ = 2 } => vlan.nativ: unknown key",
        "name = \"vm1\" => name: \"vm1\" is already the name of another port",
        "name = \"a b\" => name: \"a b\" is not 1 to 64 of A-Z a-z 0-9 - _ .",
        "name = \"\" => name: \"\" is not 1 to 64",
        "socket = \"\" => socket: empty path",
        "anti_spoof = true => anti_spoof: true needs `mac`",
        "mac = \"52:54:00:00:01\" => mac: \"52:54:00:00:01\" is not a MAC",
        "mac = \"52:54:00:00:00:0g\" => mac: \"52:54:00:00:00:0g\" is not a MAC",
        "mac = \"5:54:00:00:00:01\" => mac: \"5:54:00:00:00:01\" is not a MAC",
        "mac = \"01:00:5e:00:00:01\" => mac: 01:00:5e:00:00:01 is multicast",
        "mac = \"ff:ff:ff:ff:ff:ff\" => mac: ff:ff:ff:ff:ff:ff is multicast",
        "mac = \"00:00:00:00:00:00\" => mac: 00:00:00:00:00:00 is multicast",
        "mtu = 67 => mtu: 67 is not between 68 and 9000",
        "queues = 0 => queues: 0 is not between 1 and 16",
        "queues = 17 => queues: 17 is not between 1 and 16",
        "mtu = 9001 => mtu: 9001 is not between 68 and 9000",
        "mtu = \"big\" => mtu: invalid type: string \"big\"",
        "mac_limit = 0 => mac_limit: 0 is not between 1",
        "mode = \"listen\" => mode: unknown variant `listen`",
        "mtuu = 1500 => mtuu: unknown key, expected one of `name`",
        "qos = { tx_rate = 1 } => qos.tx_rate: unknown key",
        "qos = { tx_burst_bytes = 9000 } => qos.tx_burst_bytes: set without tx_rate_bps",
        "qos = { tx_rate_bps = 999 } => qos.tx_rate_bps: 999 is not 0 or between 1000",
        "qos = { storm_pps = -1 } => qos.storm_pps: invalid value: integer `-1`",
        "mtu = 9000\nqos = { rx_rate_bps = 1000000, rx_burst_bytes = 9000 } => \
         qos.rx_burst_bytes: 9000 is smaller than the largest frame (9018 bytes)",
        "socket = \"/tmp/./vm1.sock\" => \
         socket: /tmp/./vm1.sock is already the socket of port \"vm1\"",
        "vlan = { trunk = [20, 10] }\nmac = \"52:54:00:00:00:01\" => \
         mac: 52:54:00:00:00:01 is already the MAC of port \"vm1\" on VLAN 10",
    ];

    #[test]
    fn port_errors_name_the_port_and_key() {
        for case in PORT_ERRORS {
            let (lines, want) = case.split_once(" => ").expect("a case");
            let mut text = format!("{P1}mac = \"52:54:00:00:00:01\"\n[[port]]\n{lines}\n");
            for (key, value) in [
                ("name", "\"vm2\""),
                ("socket", "\"/tmp/vm2.sock\""),
                ("vlan", "1"),
            ] {
                if !lines.contains(&format!("{key} =")) {
                    text += &format!("{key} = {value}\n");
                }
            }
            err(&text, &["[[port]] #2 ", &format!(" (line 6): {want}")]);
        }
        let long = port2("vlan = 1").replace("vm2.sock", &"x".repeat(110));
        err(
            &long,
            &["[[port]] #2 \"vm2\" (line 5): socket: 115 bytes long, over the 107"],
        );
    }

    /// "file text (before port vm1) => what its error must say".
    const FILE_ERRORS: &[&str] = &[
        "[switch]\nmac_aging_secs = 0 => [switch] (line 1): mac_aging_secs: 0 is not between",
        "[switch]\nmac_table_size = -1 => [switch] (line 1): mac_table_size: -1 is not",
        "\n[switch]\nmac_aging = 1 => [switch] (line 2): mac_aging: unknown key",
        "[switch]\npmd_cores = [1]\npmd_threads = 2 => pmd_threads: set pmd_cores (pinned",
        "[switch]\npmd_cores = [1, 1] => pmd_cores: core 1 is listed twice",
        "[switch]\npmd_cores = [] => pmd_cores: empty list",
        "[switch]\npmd_cores = [-1] => pmd_cores: -1 is not between 0 and 1023",
        "[switch]\npmd_threads = 0 => pmd_threads: 0 is not between 1 and 64",
        "[switch]\npoll_us = 2_000_000 => poll_us: 2000000 is not between 0 and 1000000",
        "[switch]\ncontrol_socket = \"/tmp/vm1.sock\" => \
         [[port]] #1 \"vm1\" (line 3): socket: is [switch] control_socket",
        "[[vlan]]\nid = 4095 => [[vlan]] #1 (line 1): id: 4095 is not between 1 and 4094",
        "[[vlan]]\nid = 1\nip = \"x\" => [[vlan]] #1 (line 1): ip: unknown key",
        "[[vlan]]\nid = 10\n[[vlan]]\nid = 10 => \
         [[vlan]] #2 (line 3): id: VLAN 10 is already configured by [[vlan]] #1",
        "[[vlan]]\nid = 10\nservice_ip = \"10.0.0.1\" => \
         [[vlan]] #1 (line 1): service_ip: \"10.0.0.1\" is not A.B.C.D/LEN",
        "[[vlan]]\nid = 10\nservice_ip = \"10.0.0.1/33\" => service_ip: prefix length \"33\"",
        "[[vlan]]\nid = 10\nservice_ip = \"10.0.0/24\" => service_ip: \"10.0.0\" is not an IPv4",
        "[[vlan]]\nid = 10\nservice_ip = \"10.0.0.0/24\" => service_ip: 10.0.0.0/24 is the",
        "[[vlan]]\nid = 10\nservice_ip = \"10.0.0.255/24\" => service_ip: 10.0.0.255/24 is the",
        "[[vlan]]\nid = 10\nservice_ip = \"224.0.0.1/24\" => service_ip: 224.0.0.1 cannot be",
        "[swtch] => TOML parse error at line 1, column 2",
        "[swtch] => unknown field `swtch`, expected one of `switch`, `vlan`, `port`",
        "[[port]]\nname = \"x\"\nname = \"y\" => duplicate key `name`",
        "[[port] => line 1",
        "[[port]]\nsocket = \"/tmp/x\"\nvlan = 1 => [[port]] #1 (line 1): name: missing",
        "port = [] => top level: port: no [[port]] entries; at least one port is needed",
    ];

    #[test]
    fn file_errors_name_the_place_and_key() {
        for case in FILE_ERRORS {
            let (text, want) = case.split_once(" => ").expect("a case");
            let text = match text.starts_with("port =") {
                true => text.to_string(),
                false => format!("{text}\n{P1}"),
            };
            err(&text, &[want]);
        }
        let c = ok(&format!(
            "[[vlan]]\nid = 99\nservice_ip = \"10.0.0.1/24\"\n{P1}"
        ));
        let want = ServiceIp {
            addr: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
        };
        assert_eq!(c.vlans[0].service_ip, Some(want));
        assert_eq!(want.to_string(), "10.0.0.1/24");
        ok(&format!(
            "[[vlan]]\nid = 99\nservice_ip = \"10.0.0.0/32\"\n{P1}"
        ));
    }

    #[test]
    fn qos_in_the_file() {
        let q = "vlan = 1\nqos = { tx_rate_bps = 100_000_000, tx_rate_pps = 0, \
                 rx_rate_bps = 8_000_000, rx_burst_bytes = 20000, storm_pps = 1000 }";
        let qos = ok(&port2(q)).ports[1].qos;
        assert_eq!((qos.tx_rate_pps, qos.tx_packets()), (None, None));
        assert_eq!(qos.tx_bytes(), lim(12_500_000, 125_000));
        assert_eq!(qos.rx_bytes(), lim(1_000_000, 20_000));
        assert_eq!(qos.storm_packets(), lim(1000, 32));
    }

    #[test]
    fn qos_key_value_pairs() {
        let mut q = QosConfig::default();
        q.apply_kv("tx_rate_bps", "1G").expect("valid");
        q.apply_kv("tx_burst_bytes", "1_500_000").expect("valid");
        q.apply_kv("tx_rate_pps", "2k").expect("valid");
        assert_eq!(q.tx_bytes(), lim(125_000_000, 1_500_000));
        assert_eq!(q.tx_packets(), lim(2000, 32));
        q.validate(1500).expect("valid");
        q.apply_kv("tx_rate_bps", "0").expect("valid");
        let tx = (q.tx_rate_bps, q.tx_burst_bytes, q.get("tx_rate_pps"));
        assert_eq!(tx, (None, None, Some(2000)));
        let fails = [
            (
                "tx_rate",
                "1",
                "tx_rate: unknown QoS key, expected one of tx_rate_bps, ",
            ),
            ("x_bps", "1", "x_bps: unknown QoS key"),
            ("storm_pps", "lots", "storm_pps: \"lots\" is not a count"),
            (
                "tx_rate_bps",
                "99999999999G",
                "tx_rate_bps: \"99999999999G\" is not a count",
            ),
            (
                "tx_rate_bps",
                "999",
                "tx_rate_bps: 999 is not 0 or between 1000",
            ),
        ];
        for (key, value, want) in fails {
            let e = q.apply_kv(key, value).expect_err(want).to_string();
            assert!(e.starts_with(want), "{e}");
        }
        q.apply_kv("rx_burst_bytes", "100000").expect("valid alone");
        let e = q.validate(1500).expect_err("burst without rate");
        assert_eq!(e.to_string(), "rx_burst_bytes: set without rx_rate_bps");
    }

    #[test]
    fn load_names_a_missing_file() {
        let e = load(Path::new("/nonexistent/vswitch.toml")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/vswitch.toml"), "{e}");
    }
}
