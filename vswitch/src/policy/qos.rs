//! Per-port QoS state: the TX limiter (backpressure on the guest's transmit ring), RX
//! policing (drops), and storm control (drops of flooded frames the guest sends).

use common::ratelimit::{self, RateLimiter, Timer, TokenBucketConfig};

use crate::config::QosConfig;

#[derive(Debug, thiserror::Error)]
pub enum QosError {
    #[error("{key}: {source}")]
    Bucket {
        key: &'static str,
        source: ratelimit::ConfigError,
    },
    #[error(transparent)]
    Timer(#[from] ratelimit::TimerError),
}

pub struct PortQos {
    /// Guest → switch: bits/s and packets/s. When it refuses, the port stops taking
    /// frames from the TX ring until `timer` fires.
    pub tx: RateLimiter,
    /// Switch → guest: frames over the rate are dropped.
    pub rx: RateLimiter,
    /// Broadcast, multicast and unknown unicast from the guest, packets/s.
    pub storm: RateLimiter,
    pub timer: Timer,
}

fn bytes(
    bps: Option<u64>,
    burst: Option<u64>,
    key: &'static str,
) -> Result<Option<TokenBucketConfig>, QosError> {
    match (bps, burst) {
        (Some(bps), Some(burst)) => TokenBucketConfig::bytes_for_bits_per_second(bps, burst)
            .map(Some)
            .map_err(|source| QosError::Bucket { key, source }),
        _ => Ok(None),
    }
}

fn packets(
    limit: Option<crate::config::Limit>,
    key: &'static str,
) -> Result<Option<TokenBucketConfig>, QosError> {
    match limit {
        Some(l) => TokenBucketConfig::per_second(l.rate, l.burst)
            .map(Some)
            .map_err(|source| QosError::Bucket { key, source }),
        None => Ok(None),
    }
}

/// The bucket configurations for `q`: (tx bytes, tx packets, rx bytes, storm packets).
type Buckets = (
    Option<TokenBucketConfig>,
    Option<TokenBucketConfig>,
    Option<TokenBucketConfig>,
    Option<TokenBucketConfig>,
);

fn buckets(q: &QosConfig) -> Result<Buckets, QosError> {
    Ok((
        bytes(q.tx_rate_bps, q.tx_bytes().map(|l| l.burst), "tx_rate_bps")?,
        packets(q.tx_packets(), "tx_rate_pps")?,
        bytes(q.rx_rate_bps, q.rx_bytes().map(|l| l.burst), "rx_rate_bps")?,
        packets(q.storm_packets(), "storm_pps")?,
    ))
}

impl PortQos {
    pub fn new(q: &QosConfig) -> Result<PortQos, QosError> {
        let (txb, txp, rxb, storm) = buckets(q)?;
        Ok(PortQos {
            tx: RateLimiter::new(txb, txp),
            rx: RateLimiter::new(rxb, None),
            storm: RateLimiter::new(None, storm),
            timer: Timer::new()?,
        })
    }

    /// Apply new settings at runtime; fill levels carry over, capped to the new bursts.
    pub fn update(&mut self, q: &QosConfig) -> Result<(), QosError> {
        let (txb, txp, rxb, storm) = buckets(q)?;
        self.tx.update(txb, txp);
        self.rx.update(rxb, None);
        self.storm.update(None, storm);
        Ok(())
    }
}
