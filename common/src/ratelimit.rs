//! Token-bucket rate limiting: vswitch's TX backpressure, RX policing and storm control,
//! and vdisk's IOPS and bandwidth limits.
//!
//! The model is firecracker's `rate_limiter`: a [`RateLimiter`] holds up to two
//! [`TokenBucket`]s, one counting bytes and one counting operations (frames, requests).
//! A missing bucket means "no limit" on that axis. When a request does not fit, the
//! limiter says how long until it will, and the event loop arms a [`Timer`] (a timerfd)
//! for that long instead of polling.
//!
//! # Arithmetic
//!
//! Everything is integer and exact, so a bucket keeps its rate over any interval without
//! drift. A bucket refills at `rate` tokens per `period`; internally its credit is kept in
//! units of `1 / period_ns` of a token, so every elapsed nanosecond adds exactly `rate`
//! units, and a token costs `period_ns` units. Any rate that is a ratio of integers, such
//! as 100 Mbit/s counted in bytes (100e6 bytes per 8 s), is therefore represented exactly.
//! Waits are rounded up to the nanosecond; a bucket with room for a few requests banks
//! that rounding, one with room for exactly one request loses under 1 ns per request.
//!
//! # Requests larger than the burst
//!
//! A request for more tokens than the bucket can ever hold (a 9000-byte jumbo frame
//! against a 1500-byte burst) is **allowed once the bucket is full**: it succeeds with
//! [`Reduce::OverConsumption`], and the excess is carried as debt that the refill repays
//! before anything else passes. Refusing such requests forever would wedge a TX ring
//! behind a frame that can never pass; granting them early would exceed the rate. With
//! debt, the long-run rate is exact whatever the request sizes.
//!
//! # One-time burst
//!
//! An optional one-time burst (firecracker's `one_time_burst`) is a stock of extra tokens
//! spent before the regular bucket and never refilled, e.g. to let a guest boot quickly.
//!
//! # Using it from an event loop
//!
//! ```no_run
//! use std::time::Duration;
//! use common::ratelimit::{RateLimiter, Timer, TokenBucketConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // 100 Mbit/s with a 64 KiB burst, and at most 100 000 frames/s with a burst of 64.
//! let bytes = TokenBucketConfig::bytes_for_bits_per_second(100_000_000, 65_536)?;
//! let ops = TokenBucketConfig::per_second(100_000, 64)?;
//! let mut limiter = RateLimiter::new(Some(bytes), Some(ops));
//! let mut timer = Timer::new()?; // register timer.as_raw_fd() with epoll
//!
//! let frame_len = 1514;
//! match limiter.consume(frame_len, 1) {
//!     Ok(()) => { /* forward the frame */ }
//!     Err(retry_after) => {
//!         // Put the descriptor back, stop draining the TX ring, and come back when the
//!         // timer fires (then call `timer.clear()` and drain again).
//!         timer.arm(retry_after)?;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vmm_sys_util::errno;
use vmm_sys_util::timerfd::TimerFd;

/// The longest refill period a bucket accepts. It bounds the internal arithmetic; any
/// useful rate can be written with a period of at most a day.
pub const MAX_PERIOD: Duration = Duration::from_secs(86_400);

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A bucket configuration that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the burst size must be at least 1")]
    ZeroCapacity,
    #[error("the rate must be at least 1")]
    ZeroRate,
    #[error("the refill period must be longer than zero")]
    ZeroPeriod,
    #[error("the refill period {0:?} is longer than the maximum of {MAX_PERIOD:?}")]
    PeriodTooLong(Duration),
}

/// A timerfd operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} the rate limiter's timerfd: {source}")]
pub struct TimerError {
    op: &'static str,
    source: errno::Error,
}

// ---------------------------------------------------------------------------------------
// Clocks

/// A monotonic clock in nanoseconds since an arbitrary origin.
pub trait Clock {
    /// Nanoseconds since this clock's origin. Never decreases.
    fn now_ns(&self) -> u64;

    /// [`Clock::now_ns`] as a `Duration`.
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_ns())
    }
}

/// The real monotonic clock (`CLOCK_MONOTONIC`, through `Instant`). All instances share one
/// origin, fixed the first time any of them is read.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let elapsed = ORIGIN.get_or_init(Instant::now).elapsed();
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to, for tests (in this crate and others). Clones
/// share the same time, so a test keeps one and hands clones to the buckets.
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    /// A clock at time zero.
    pub fn new() -> FakeClock {
        FakeClock::default()
    }

    /// Move the clock forward by `by` (saturating at `u64::MAX` nanoseconds).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update cannot fail with a closure that always returns Some.
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(by))
            });
    }

    /// Move the clock forward by `ns` nanoseconds.
    pub fn advance_ns(&self, ns: u64) {
        self.advance(Duration::from_nanos(ns));
    }

    /// Set the clock to an absolute time. Setting it backwards is allowed, to test that
    /// users of the clock cope; buckets treat it as no time passing.
    pub fn set(&self, to: Duration) {
        let to = u64::try_from(to.as_nanos()).unwrap_or(u64::MAX);
        self.0.store(to, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// Configuration

/// A validated token-bucket configuration: a burst of `capacity` tokens, refilled at `rate`
/// tokens per `period`, plus an optional one-time burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucketConfig {
    capacity: u64,
    rate: u64,
    period_ns: u64,
    one_time_burst: u64,
}

impl TokenBucketConfig {
    /// A bucket holding at most `capacity` tokens, refilled at `rate` tokens per `period`.
    pub fn new(capacity: u64, rate: u64, period: Duration) -> Result<Self, ConfigError> {
        if capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        if rate == 0 {
            return Err(ConfigError::ZeroRate);
        }
        if period.is_zero() {
            return Err(ConfigError::ZeroPeriod);
        }
        if period > MAX_PERIOD {
            return Err(ConfigError::PeriodTooLong(period));
        }
        // MAX_PERIOD is far below u64::MAX nanoseconds.
        let period_ns =
            u64::try_from(period.as_nanos()).map_err(|_| ConfigError::PeriodTooLong(period))?;
        Ok(TokenBucketConfig {
            capacity,
            rate,
            period_ns,
            one_time_burst: 0,
        })
    }

    /// `rate` tokens per second with a burst of `burst` tokens.
    pub fn per_second(rate: u64, burst: u64) -> Result<Self, ConfigError> {
        Self::new(burst, rate, Duration::from_secs(1))
    }

    /// A byte bucket for a rate given in bits per second, exact for any integer rate
    /// (it refills `bits_per_sec` bytes every 8 s), with a burst of `burst_bytes`.
    pub fn bytes_for_bits_per_second(
        bits_per_sec: u64,
        burst_bytes: u64,
    ) -> Result<Self, ConfigError> {
        Self::new(burst_bytes, bits_per_sec, Duration::from_secs(8))
    }

    /// Firecracker's form: a bucket of `size` tokens that refills completely from empty in
    /// `refill_time`.
    pub fn from_refill_time(size: u64, refill_time: Duration) -> Result<Self, ConfigError> {
        Self::new(size, size, refill_time)
    }

    /// The same bucket with a one-time burst of `tokens`: spent before the regular bucket
    /// and never refilled.
    pub fn with_one_time_burst(mut self, tokens: u64) -> Self {
        self.one_time_burst = tokens;
        self
    }

    /// The burst size: the most tokens the regular bucket holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Tokens added per [`TokenBucketConfig::period`].
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The period over which [`TokenBucketConfig::rate`] tokens are added.
    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.period_ns)
    }

    /// The one-time burst, 0 when there is none.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// The rate in tokens per second, rounded down (for display and counters).
    pub fn tokens_per_second(&self) -> u64 {
        let per_sec =
            u128::from(self.rate) * u128::from(NANOS_PER_SEC) / u128::from(self.period_ns);
        u64::try_from(per_sec).unwrap_or(u64::MAX)
    }
}

// ---------------------------------------------------------------------------------------
// Token bucket

/// The result of [`TokenBucket::reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// The tokens were taken.
    Success,
    /// Not enough tokens: nothing was taken. [`TokenBucket::time_until`] says how long to
    /// wait.
    Failure,
    /// A request larger than the burst was granted on a full bucket and left it in debt:
    /// nothing else passes for this long.
    OverConsumption(Duration),
}

impl Reduce {
    /// Whether the tokens were taken (`Success` or `OverConsumption`).
    pub fn granted(self) -> bool {
        !matches!(self, Reduce::Failure)
    }
}

/// A token bucket on clock `C` (the real monotonic clock unless a test says otherwise).
/// It starts full, one-time burst included.
#[derive(Debug, Clone)]
pub struct TokenBucket<C: Clock = MonotonicClock> {
    config: TokenBucketConfig,
    /// Regular credit in units of `1 / period_ns` token; negative while in debt.
    credit: i128,
    /// What is left of the one-time burst, in tokens.
    one_time_burst: u64,
    /// The clock reading `credit` was last brought up to date at.
    last_ns: u64,
    clock: C,
}

impl TokenBucket<MonotonicClock> {
    /// A full bucket on the real clock.
    pub fn new(config: TokenBucketConfig) -> Self {
        Self::with_clock(config, MonotonicClock)
    }
}

impl<C: Clock> TokenBucket<C> {
    /// A full bucket on `clock`.
    pub fn with_clock(config: TokenBucketConfig, clock: C) -> Self {
        let last_ns = clock.now_ns();
        TokenBucket {
            config,
            credit: full_credit(&config),
            one_time_burst: config.one_time_burst,
            last_ns,
            clock,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &TokenBucketConfig {
        &self.config
    }

    /// Take `n` tokens if they are available now; see [`Reduce`]. Asking for zero tokens
    /// always succeeds.
    pub fn reduce(&mut self, n: u64) -> Reduce {
        let now = self.clock.now_ns();
        self.reduce_at(n, now)
    }

    /// Give back `n` tokens taken earlier (a request that was charged but not carried
    /// out). They go to the regular bucket, which stays capped at its capacity, so a
    /// refund never raises the level above the burst.
    pub fn refund(&mut self, n: u64) {
        let now = self.clock.now_ns();
        self.refill(now);
        let units = i128::from(n).saturating_mul(self.unit());
        self.credit = self
            .credit
            .saturating_add(units)
            .min(full_credit(&self.config));
    }

    /// How long until `n` tokens can be taken; zero if they can be now. After waiting
    /// exactly this long (with nothing else taking tokens), [`TokenBucket::reduce`]
    /// succeeds. For `n` above what the bucket can hold, this is the time until it is full.
    pub fn time_until(&self, n: u64) -> Duration {
        self.time_until_at(n, self.clock.now_ns())
    }

    /// Whole tokens available now, one-time burst included (0 while in debt).
    pub fn available(&self) -> u64 {
        let credit = self.credit_at(self.clock.now_ns()).max(0);
        let tokens = u64::try_from(credit / self.unit()).unwrap_or(u64::MAX);
        tokens.saturating_add(self.one_time_burst)
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst_left(&self) -> u64 {
        self.one_time_burst
    }

    /// Switch to `config` at runtime. The current fill level (whole and fractional
    /// tokens, or debt) carries over, capped to the new capacity; the remaining one-time
    /// burst is capped to the new one-time burst.
    pub fn update(&mut self, config: TokenBucketConfig) {
        let now = self.clock.now_ns();
        self.refill(now);
        if config == self.config {
            return;
        }
        let old = i128::from(self.config.period_ns);
        let new = i128::from(config.period_ns);
        // Convert in two parts so the products stay far inside i128; rounding is toward
        // fewer tokens.
        let whole = self.credit.div_euclid(old);
        let frac = self.credit.rem_euclid(old);
        let credit = whole.saturating_mul(new).saturating_add(frac * new / old);
        self.credit = credit.min(full_credit(&config));
        self.one_time_burst = self.one_time_burst.min(config.one_time_burst);
        self.config = config;
    }

    fn unit(&self) -> i128 {
        i128::from(self.config.period_ns)
    }

    /// The regular credit at `now`, without changing the bucket.
    fn credit_at(&self, now: u64) -> i128 {
        let elapsed = now.saturating_sub(self.last_ns);
        let added = u128::from(self.config.rate) * u128::from(elapsed);
        let added = i128::try_from(added).unwrap_or(i128::MAX);
        self.credit
            .saturating_add(added)
            .min(full_credit(&self.config))
    }

    fn refill(&mut self, now: u64) {
        // A clock that went backwards (or another bucket's earlier reading) adds nothing.
        if now > self.last_ns {
            self.credit = self.credit_at(now);
            self.last_ns = now;
        }
    }

    /// The tokens of a request for `n` that the regular bucket has to cover, and the credit
    /// it must hold for that (the whole request, or a full bucket for an oversize one).
    fn requirement(&self, n: u64) -> (u64, i128) {
        let from_regular = n.saturating_sub(self.one_time_burst);
        let must_hold = i128::from(from_regular.min(self.config.capacity)) * self.unit();
        (from_regular, must_hold)
    }

    fn time_until_at(&self, n: u64, now: u64) -> Duration {
        let (from_regular, must_hold) = self.requirement(n);
        if from_regular == 0 {
            return Duration::ZERO;
        }
        let missing = must_hold.saturating_sub(self.credit_at(now));
        if missing <= 0 {
            return Duration::ZERO;
        }
        let rate = i128::from(self.config.rate);
        let ns = (missing + rate - 1) / rate;
        // Refill counts from `last_ns`; a reading behind it has that much longer to wait.
        let behind = self.last_ns.saturating_sub(now);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX).saturating_add(behind))
    }

    /// Whether a request for `n` would pass now (the bucket refilled up to date).
    fn has_room(&self, n: u64) -> bool {
        let (from_regular, must_hold) = self.requirement(n);
        from_regular == 0 || self.credit >= must_hold
    }

    fn reduce_at(&mut self, n: u64, now: u64) -> Reduce {
        if n == 0 {
            return Reduce::Success;
        }
        self.refill(now);
        let (from_regular, must_hold) = self.requirement(n);
        if from_regular > 0 && self.credit < must_hold {
            return Reduce::Failure;
        }
        self.one_time_burst -= n - from_regular;
        if from_regular == 0 {
            return Reduce::Success;
        }
        self.credit = self
            .credit
            .saturating_sub(i128::from(from_regular).saturating_mul(self.unit()));
        if self.credit >= 0 {
            return Reduce::Success;
        }
        let rate = i128::from(self.config.rate);
        let ns = (-self.credit + rate - 1) / rate;
        Reduce::OverConsumption(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }
}

fn full_credit(config: &TokenBucketConfig) -> i128 {
    i128::from(config.capacity) * i128::from(config.period_ns)
}

// ---------------------------------------------------------------------------------------
// Rate limiter

/// A bytes bucket and an ops bucket, each optional, charged together: a request passes
/// only if both buckets have room, and then both are charged. With neither bucket, every
/// request passes.
#[derive(Debug, Clone)]
pub struct RateLimiter<C: Clock + Clone = MonotonicClock> {
    bytes: Option<TokenBucket<C>>,
    ops: Option<TokenBucket<C>>,
    clock: C,
}

impl RateLimiter<MonotonicClock> {
    /// A limiter on the real clock; `None` leaves that axis unlimited.
    pub fn new(bytes: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) -> Self {
        Self::with_clock(bytes, ops, MonotonicClock)
    }

    /// A limiter that lets everything through (until [`RateLimiter::update`]).
    pub fn unlimited() -> Self {
        Self::new(None, None)
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    /// A limiter on `clock`; `None` leaves that axis unlimited.
    pub fn with_clock(
        bytes: Option<TokenBucketConfig>,
        ops: Option<TokenBucketConfig>,
        clock: C,
    ) -> Self {
        RateLimiter {
            bytes: bytes.map(|c| TokenBucket::with_clock(c, clock.clone())),
            ops: ops.map(|c| TokenBucket::with_clock(c, clock.clone())),
            clock,
        }
    }

    /// Charge `bytes` bytes and `ops` operations, or nothing at all. On refusal, returns
    /// how long until both buckets have room (at least 1 ns), which is what to arm the
    /// [`Timer`] with.
    ///
    /// This is firecracker's "refund the first bucket when the second refuses", done by
    /// checking both buckets at one clock reading before charging either, so a refusal
    /// leaves both exactly as they were (one-time burst included).
    pub fn consume(&mut self, bytes: u64, ops: u64) -> Result<(), Duration> {
        if self.is_unlimited() {
            // The common case on a switch's fast path: no clock read.
            return Ok(());
        }
        self.consume_at(bytes, ops, self.clock.now_ns())
    }

    /// A reading of this limiter's clock, for [`RateLimiter::consume_at`].
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// [`RateLimiter::consume`] at a clock reading taken before with
    /// [`RateLimiter::now_ns`], so that a batch of frames pays for one clock read. A reading
    /// older than one used before adds no tokens; it never takes any away.
    pub fn consume_at(&mut self, bytes: u64, ops: u64, now: u64) -> Result<(), Duration> {
        if self.is_unlimited() {
            return Ok(());
        }
        // Bringing a bucket up to `now` changes no outcome, and within a batch (one
        // reading) only the first call does it: the rest is a compare and a subtract.
        if let Some(b) = self.bytes.as_mut() {
            b.refill(now);
        }
        if let Some(o) = self.ops.as_mut() {
            o.refill(now);
        }
        let room = self.bytes.as_ref().is_none_or(|b| b.has_room(bytes))
            && self.ops.as_ref().is_none_or(|o| o.has_room(ops));
        if !room {
            return Err(self.time_until_at(bytes, ops, now));
        }
        // Both buckets were checked at `now`, so neither can refuse.
        if let Some(b) = self.bytes.as_mut() {
            b.reduce_at(bytes, now);
        }
        if let Some(o) = self.ops.as_mut() {
            o.reduce_at(ops, now);
        }
        Ok(())
    }

    /// Give back a charge made by [`RateLimiter::consume`] for work that was not done.
    pub fn refund(&mut self, bytes: u64, ops: u64) {
        if let Some(b) = self.bytes.as_mut() {
            b.refund(bytes);
        }
        if let Some(o) = self.ops.as_mut() {
            o.refund(ops);
        }
    }

    /// How long until `consume(bytes, ops)` would succeed; zero if it would now.
    pub fn time_until(&self, bytes: u64, ops: u64) -> Duration {
        self.time_until_at(bytes, ops, self.clock.now_ns())
    }

    /// Replace the configuration at runtime. A bucket that stays keeps its fill level,
    /// capped to its new capacity (see [`TokenBucket::update`]); a new bucket starts full;
    /// `None` removes that limit.
    pub fn update(&mut self, bytes: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) {
        update_bucket(&mut self.bytes, bytes, &self.clock);
        update_bucket(&mut self.ops, ops, &self.clock);
    }

    /// Whether neither axis is limited.
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// The bytes bucket, if bytes are limited.
    pub fn bytes(&self) -> Option<&TokenBucket<C>> {
        self.bytes.as_ref()
    }

    /// The ops bucket, if operations are limited.
    pub fn ops(&self) -> Option<&TokenBucket<C>> {
        self.ops.as_ref()
    }

    fn time_until_at(&self, bytes: u64, ops: u64, now: u64) -> Duration {
        // Buckets only fill while waiting, so both have room at the later of the two times.
        let b = self
            .bytes
            .as_ref()
            .map_or(Duration::ZERO, |b| b.time_until_at(bytes, now));
        let o = self
            .ops
            .as_ref()
            .map_or(Duration::ZERO, |o| o.time_until_at(ops, now));
        b.max(o)
    }
}

fn update_bucket<C: Clock + Clone>(
    slot: &mut Option<TokenBucket<C>>,
    config: Option<TokenBucketConfig>,
    clock: &C,
) {
    match (slot.as_mut(), config) {
        (Some(bucket), Some(config)) => bucket.update(config),
        (None, Some(config)) => *slot = Some(TokenBucket::with_clock(config, clock.clone())),
        (_, None) => *slot = None,
    }
}

// ---------------------------------------------------------------------------------------
// Timer

/// A one-shot timerfd for "tokens are available again". Register [`Timer::as_raw_fd`] with
/// the event loop for reading; when it fires, call [`Timer::clear`] and retry.
#[derive(Debug)]
pub struct Timer {
    fd: TimerFd,
}

impl Timer {
    /// A disarmed timer on `CLOCK_MONOTONIC`.
    pub fn new() -> Result<Timer, TimerError> {
        let fd = TimerFd::new().map_err(|source| TimerError {
            op: "create",
            source,
        })?;
        Ok(Timer { fd })
    }

    /// Fire once, `after` from now, replacing any earlier arming. A zero `after` fires
    /// after 1 ns (a zero timerfd setting would disarm it instead).
    pub fn arm(&mut self, after: Duration) -> Result<(), TimerError> {
        let after = after.max(Duration::from_nanos(1));
        self.fd
            .reset(after, None)
            .map_err(|source| TimerError { op: "arm", source })
    }

    /// Disarm the timer and discard an expiry not yet read, so the fd stops being readable
    /// (what an event handler does after the timer fired, without a blocking read).
    pub fn clear(&mut self) -> Result<(), TimerError> {
        self.fd.clear().map_err(|source| TimerError {
            op: "clear",
            source,
        })
    }

    /// Whether the timer is armed and has not fired yet.
    pub fn is_armed(&self) -> Result<bool, TimerError> {
        self.fd.is_armed().map_err(|source| TimerError {
            op: "query",
            source,
        })
    }

    /// Block until the timer fires; returns the number of expiries since the last read.
    /// Blocks forever on a disarmed timer.
    pub fn wait(&mut self) -> Result<u64, TimerError> {
        self.fd
            .wait()
            .map_err(|source| TimerError { op: "read", source })
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn bucket(capacity: u64, rate_per_sec: u64) -> (TokenBucket<FakeClock>, FakeClock) {
        let clock = FakeClock::new();
        let config = TokenBucketConfig::per_second(rate_per_sec, capacity).expect("config");
        (TokenBucket::with_clock(config, clock.clone()), clock)
    }

    /// Send `frame` bytes (1 op each) for `span` of simulated time, sleeping exactly as
    /// long as the limiter asks, like an event loop with a timerfd. Returns (bytes, frames).
    fn run_for(
        limiter: &mut RateLimiter<FakeClock>,
        clock: &FakeClock,
        frame: u64,
        span: Duration,
    ) -> (u64, u64) {
        let end = clock.now_ns() + span.as_nanos() as u64;
        let (mut bytes, mut frames) = (0u64, 0u64);
        loop {
            match limiter.consume(frame, 1) {
                Ok(()) => {
                    bytes += frame;
                    frames += 1;
                }
                Err(wait) => {
                    assert!(!wait.is_zero(), "a refusal must ask for a positive wait");
                    if clock.now_ns() + wait.as_nanos() as u64 > end {
                        return (bytes, frames);
                    }
                    clock.advance(wait);
                }
            }
        }
    }

    fn assert_within(actual: u64, expected: u64, tolerance: f64) {
        let err = (actual as f64 - expected as f64).abs() / expected as f64;
        assert!(
            err <= tolerance,
            "got {actual}, expected {expected} ± {:.3}% (off by {:.4}%)",
            tolerance * 100.0,
            err * 100.0
        );
    }

    #[test]
    fn config_validation() {
        assert_eq!(
            TokenBucketConfig::per_second(1, 0),
            Err(ConfigError::ZeroCapacity)
        );
        assert_eq!(
            TokenBucketConfig::per_second(0, 1),
            Err(ConfigError::ZeroRate)
        );
        assert_eq!(
            TokenBucketConfig::new(1, 1, Duration::ZERO),
            Err(ConfigError::ZeroPeriod)
        );
        let long = MAX_PERIOD + Duration::from_nanos(1);
        assert_eq!(
            TokenBucketConfig::new(1, 1, long),
            Err(ConfigError::PeriodTooLong(long))
        );
        let c = TokenBucketConfig::bytes_for_bits_per_second(100_000_000, 1500).expect("config");
        assert_eq!(c.tokens_per_second(), 12_500_000);
        assert_eq!(c.capacity(), 1500);
        let c = TokenBucketConfig::from_refill_time(1000, 100 * MS).expect("config");
        assert_eq!(c.tokens_per_second(), 10_000);
        assert!(ConfigError::PeriodTooLong(long)
            .to_string()
            .contains("refill period"));
    }

    #[test]
    fn starts_full_then_refills_over_time() {
        let (mut b, clock) = bucket(1000, 1000); // 1 token per ms
        assert_eq!(b.available(), 1000);
        assert_eq!(b.reduce(1000), Reduce::Success);
        assert_eq!(b.available(), 0);
        assert_eq!(b.reduce(1), Reduce::Failure);
        clock.advance(MS / 2);
        assert_eq!(b.available(), 0, "half a token is not a token");
        assert_eq!(b.reduce(1), Reduce::Failure);
        clock.advance(MS / 2);
        assert_eq!(b.available(), 1);
        clock.advance(250 * MS);
        assert_eq!(b.available(), 251);
        assert_eq!(b.reduce(251), Reduce::Success);
        assert_eq!(b.reduce(1), Reduce::Failure);
    }

    #[test]
    fn burst_passes_at_once_then_the_rate_holds() {
        let (mut b, clock) = bucket(64, 1_000_000); // 1 Mpps, burst 64
        for _ in 0..64 {
            assert_eq!(b.reduce(1), Reduce::Success);
        }
        assert_eq!(b.reduce(1), Reduce::Failure);
        assert_eq!(b.time_until(1), Duration::from_micros(1));
        clock.advance(Duration::from_micros(10));
        for _ in 0..10 {
            assert_eq!(b.reduce(1), Reduce::Success);
        }
        assert_eq!(b.reduce(1), Reduce::Failure);
    }

    #[test]
    fn idle_bucket_does_not_exceed_its_burst() {
        let (mut b, clock) = bucket(1500, 1_000_000);
        clock.advance(Duration::from_secs(3600));
        assert_eq!(b.available(), 1500);
        assert_eq!(b.reduce(1500), Reduce::Success);
        assert_eq!(b.reduce(1), Reduce::Failure);
        // Refunds are capped too.
        b.refund(1500);
        b.refund(1500);
        assert_eq!(b.available(), 1500);
        // Nothing overflows after a near-infinite idle period, even with huge numbers.
        let clock = FakeClock::new();
        let cfg = TokenBucketConfig::new(u64::MAX, u64::MAX, MAX_PERIOD).expect("config");
        let mut big = TokenBucket::with_clock(cfg, clock.clone());
        assert_eq!(big.reduce(u64::MAX), Reduce::Success);
        clock.set(Duration::from_nanos(u64::MAX));
        assert_eq!(big.available(), u64::MAX);
    }

    #[test]
    fn time_until_is_exact() {
        let (mut b, clock) = bucket(10, 3); // 3 tokens/s: 333_333_333.3 ns per token
        assert_eq!(b.time_until(10), Duration::ZERO);
        assert_eq!(b.reduce(10), Reduce::Success);
        // 1 token needs 1e9/3 ns, rounded up.
        assert_eq!(b.time_until(1), Duration::from_nanos(333_333_334));
        assert_eq!(b.time_until(3), SEC);
        for n in [1u64, 2, 5, 7, 10] {
            let (mut b, clock) = bucket(10, 3);
            assert_eq!(b.reduce(10), Reduce::Success);
            let wait = b.time_until(n);
            clock.advance(wait - Duration::from_nanos(1));
            assert_eq!(b.reduce(n), Reduce::Failure, "{n} tokens 1 ns early");
            assert_eq!(b.time_until(n), Duration::from_nanos(1));
            clock.advance(Duration::from_nanos(1));
            assert_eq!(b.time_until(n), Duration::ZERO);
            assert_eq!(b.reduce(n), Reduce::Success, "{n} tokens on time");
        }
        // Partial waits count: the fraction already accumulated is not lost.
        clock.advance(Duration::from_nanos(333_333_333));
        assert_eq!(b.time_until(1), Duration::from_nanos(1));
        // Oversize requests wait for a full bucket.
        let (mut b, _clock) = bucket(10, 10);
        assert_eq!(b.reduce(5), Reduce::Success);
        assert_eq!(b.time_until(25), Duration::from_millis(500));
    }

    #[test]
    fn oversize_requests_need_a_full_bucket_and_leave_debt() {
        let (mut b, clock) = bucket(1000, 1000); // 1 token per ms
        assert_eq!(b.reduce(1), Reduce::Success);
        assert_eq!(b.reduce(3000), Reduce::Failure, "not full");
        assert_eq!(b.time_until(3000), MS);
        clock.advance(MS);
        assert_eq!(b.reduce(3000), Reduce::OverConsumption(2 * SEC));
        assert_eq!(b.available(), 0);
        assert_eq!(b.reduce(1), Reduce::Failure);
        assert_eq!(b.time_until(1), 2 * SEC + MS);
        clock.advance(2 * SEC);
        assert_eq!(
            b.reduce(1),
            Reduce::Failure,
            "debt repaid, nothing more yet"
        );
        clock.advance(MS);
        assert_eq!(b.reduce(1), Reduce::Success);
        assert!(Reduce::OverConsumption(SEC).granted());
        assert!(!Reduce::Failure.granted());
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let clock = FakeClock::new();
        let cfg = TokenBucketConfig::per_second(100, 100)
            .expect("config")
            .with_one_time_burst(1000);
        let mut b = TokenBucket::with_clock(cfg, clock.clone());
        assert_eq!(b.available(), 1100);
        assert_eq!(b.reduce(900), Reduce::Success);
        assert_eq!(b.one_time_burst_left(), 100);
        assert_eq!(b.available(), 200);
        // Straddles the one-time burst and the regular bucket.
        assert_eq!(b.reduce(150), Reduce::Success);
        assert_eq!(b.one_time_burst_left(), 0);
        assert_eq!(b.available(), 50);
        assert_eq!(b.reduce(51), Reduce::Failure);
        assert_eq!(b.available(), 50, "a failure takes nothing");
        clock.advance(Duration::from_secs(100));
        assert_eq!(b.available(), 100);
        assert_eq!(b.one_time_burst_left(), 0);
    }

    #[test]
    fn refund_gives_tokens_back() {
        let (mut b, _clock) = bucket(1000, 1);
        assert_eq!(b.reduce(700), Reduce::Success);
        b.refund(200);
        assert_eq!(b.available(), 500);
        assert_eq!(b.reduce(500), Reduce::Success);
        assert_eq!(b.reduce(1), Reduce::Failure);
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let (mut b, clock) = bucket(10, 1000);
        clock.set(SEC);
        assert_eq!(b.reduce(10), Reduce::Success);
        clock.set(Duration::ZERO);
        assert_eq!(b.reduce(1), Reduce::Failure);
        assert_eq!(b.time_until(1), MS + SEC);
        clock.set(SEC + MS);
        assert_eq!(b.reduce(1), Reduce::Success);
    }

    #[test]
    fn unlimited_limiter_passes_everything() {
        let mut l = RateLimiter::unlimited();
        assert!(l.is_unlimited());
        for _ in 0..1000 {
            assert_eq!(l.consume(u64::MAX, u64::MAX), Ok(()));
        }
        assert_eq!(l.time_until(u64::MAX, 1), Duration::ZERO);
    }

    #[test]
    fn a_batch_at_one_clock_reading() {
        let clock = FakeClock::new();
        let ops = TokenBucketConfig::per_second(10, 3).expect("ops");
        let mut l = RateLimiter::with_clock(None, Some(ops), clock.clone());
        let now = l.now_ns();
        // Time passing after the reading is not counted for the batch.
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.consume_at(0, 1, now), Ok(()));
        assert_eq!(l.consume_at(0, 2, now), Ok(()));
        assert_eq!(l.consume_at(0, 1, now), Err(Duration::from_millis(100)));
        // A later reading refills; an older one after it adds nothing and takes nothing.
        let later = l.now_ns();
        assert_eq!(l.consume_at(0, 3, later), Ok(()));
        assert!(l.consume_at(0, 1, now).is_err());
        assert_eq!(l.ops().map(TokenBucket::available), Some(0));
    }

    #[test]
    fn a_refusal_by_one_bucket_leaves_the_other_untouched() {
        let clock = FakeClock::new();
        let bytes = TokenBucketConfig::per_second(1000, 10_000).expect("bytes");
        let ops = TokenBucketConfig::per_second(10, 2).expect("ops");
        let mut l = RateLimiter::with_clock(Some(bytes), Some(ops), clock.clone());
        let level = |l: &RateLimiter<FakeClock>| {
            (
                l.bytes().map(TokenBucket::available),
                l.ops().map(TokenBucket::available),
            )
        };
        assert_eq!(l.consume(1000, 1), Ok(()));
        assert_eq!(l.consume(1000, 1), Ok(()));
        assert_eq!(level(&l), (Some(8000), Some(0)));
        // Ops refuses: the bytes bucket must not be charged.
        assert_eq!(l.consume(1000, 1), Err(Duration::from_millis(100)));
        assert_eq!(level(&l), (Some(8000), Some(0)));
        clock.advance(Duration::from_millis(100));
        assert_eq!(level(&l), (Some(8100), Some(1)));
        // Now bytes refuses (9000 > 8100): ops must not be charged.
        assert_eq!(l.consume(9000, 1), Err(Duration::from_millis(900)));
        assert_eq!(level(&l), (Some(8100), Some(1)));
        // The wait covers both buckets, whichever is slower.
        assert_eq!(l.time_until(8100, 2), Duration::from_millis(100));
        assert_eq!(l.time_until(9000, 2), Duration::from_millis(900));
        clock.advance(Duration::from_millis(900));
        assert_eq!(level(&l), (Some(9000), Some(2)));
        assert_eq!(l.consume(9000, 1), Ok(()));
        assert_eq!(level(&l), (Some(0), Some(1)));
        // Explicit refunds.
        l.refund(4000, 1);
        assert_eq!(level(&l), (Some(4000), Some(2)));
    }

    #[test]
    fn bytes_only_and_ops_only_limiters() {
        let clock = FakeClock::new();
        let ops = TokenBucketConfig::per_second(100, 1).expect("ops");
        let mut l = RateLimiter::with_clock(None, Some(ops), clock.clone());
        assert!(!l.is_unlimited());
        assert_eq!(l.consume(1 << 40, 1), Ok(()));
        assert_eq!(l.consume(0, 1), Err(Duration::from_millis(10)));
        assert_eq!(l.consume(1 << 40, 0), Ok(()), "zero ops always fits");
        let bytes = TokenBucketConfig::per_second(100, 100).expect("bytes");
        let mut l = RateLimiter::with_clock(Some(bytes), None, clock.clone());
        assert_eq!(l.consume(100, 1 << 40), Ok(()));
        assert_eq!(l.consume(1, 0), Err(Duration::from_millis(10)));
    }

    #[test]
    fn exact_rate_100_mbit_of_1500_byte_frames_over_10_seconds() {
        let clock = FakeClock::new();
        let burst = 15_000;
        let bytes =
            TokenBucketConfig::bytes_for_bits_per_second(100_000_000, burst).expect("bytes");
        let mut l = RateLimiter::with_clock(Some(bytes), None, clock.clone());
        let (sent, frames) = run_for(&mut l, &clock, 1500, 10 * SEC);
        let expected = 100_000_000 / 8 * 10 + burst;
        assert!(
            sent <= expected && sent + 1500 > expected,
            "sent {sent}, expected {expected}"
        );
        assert_within(sent, expected, 0.001);
        assert_eq!(frames, sent / 1500);
        // With the burst excluded the measured rate is still within 0.1%.
        assert_within((sent - burst) * 8 / 10, 100_000_000, 0.001);
    }

    #[test]
    fn gigabit_and_100_megabit_examples() {
        for (bps, frame, burst) in [
            (1_000_000_000u64, 1500u64, 65_536u64),
            (1_000_000_000, 64, 65_536),
            (100_000_000, 1518, 1518),
            (100_000_000, 9000, 1500), // jumbo frames against a smaller burst: debt
            (1_000_000_000, 9000, 1500),
        ] {
            let clock = FakeClock::new();
            let bytes = TokenBucketConfig::bytes_for_bits_per_second(bps, burst).expect("bytes");
            let mut l = RateLimiter::with_clock(Some(bytes), None, clock.clone());
            let span = 2 * SEC;
            let (sent, _) = run_for(&mut l, &clock, frame, span);
            let expected = bps / 8 * 2;
            assert_within(sent, expected, 0.001);
            // Never above rate + burst (one oversize frame of debt aside).
            assert!(
                sent <= expected + burst.max(frame),
                "{bps} b/s, {frame} B: sent {sent}"
            );
        }
    }

    #[test]
    fn packets_per_second_with_small_packets() {
        let clock = FakeClock::new();
        let ops = TokenBucketConfig::per_second(1_000_000, 32).expect("ops");
        let bytes =
            TokenBucketConfig::bytes_for_bits_per_second(10_000_000_000, 1 << 20).expect("bytes");
        let mut l = RateLimiter::with_clock(Some(bytes), Some(ops), clock.clone());
        let (_, frames) = run_for(&mut l, &clock, 64, SEC);
        assert_eq!(frames, 1_000_000 + 32);
        // Storm control style: 3 pps, burst 1, over a minute. A wait is rounded up to the
        // nanosecond and a bucket this small cannot bank the excess, so each frame may come
        // up to 1 ns late: 180 frames take 60 s plus at most 180 ns.
        let clock = FakeClock::new();
        let ops = TokenBucketConfig::per_second(3, 1).expect("ops");
        let mut l = RateLimiter::with_clock(None, Some(ops), clock.clone());
        let span = Duration::from_secs(60) + Duration::from_nanos(180);
        let (_, frames) = run_for(&mut l, &clock, 60, span);
        assert_eq!(frames, 180 + 1);
    }

    #[test]
    fn policing_drops_the_excess_of_a_faster_sender() {
        // RX policing: frames arrive at 2x the rate every 10 µs; the excess is dropped.
        let clock = FakeClock::new();
        let ops = TokenBucketConfig::per_second(50_000, 10).expect("ops");
        let mut l = RateLimiter::with_clock(None, Some(ops), clock.clone());
        let (mut passed, mut dropped) = (0u64, 0u64);
        for _ in 0..100_000 {
            match l.consume(0, 1) {
                Ok(()) => passed += 1,
                Err(_) => dropped += 1,
            }
            clock.advance(Duration::from_micros(10));
        }
        assert_within(passed, 50_000, 0.001);
        assert_eq!(passed + dropped, 100_000);
    }

    #[test]
    fn update_at_runtime() {
        let clock = FakeClock::new();
        let bytes = TokenBucketConfig::per_second(1000, 1000).expect("bytes");
        let mut l = RateLimiter::with_clock(Some(bytes), None, clock.clone());
        assert_eq!(l.consume(400, 0), Ok(()));
        // Same rate, bigger bucket: the level (600) carries over, it does not jump to full.
        let bigger = TokenBucketConfig::per_second(1000, 5000).expect("bigger");
        l.update(Some(bigger), None);
        assert_eq!(l.bytes().map(TokenBucket::available), Some(600));
        // Smaller bucket: the level is capped.
        let smaller = TokenBucketConfig::per_second(1000, 100).expect("smaller");
        l.update(Some(smaller), None);
        assert_eq!(l.bytes().map(TokenBucket::available), Some(100));
        // A new rate applies from now on, with the fractional token carried over.
        assert_eq!(l.consume(100, 0), Ok(()));
        clock.advance(Duration::from_micros(1500)); // 1.5 tokens at 1000/s
        let faster = TokenBucketConfig::bytes_for_bits_per_second(80_000, 100).expect("faster"); // 10_000 B/s
        l.update(Some(faster), None);
        assert_eq!(l.bytes().map(TokenBucket::available), Some(1));
        assert_eq!(l.time_until(2, 0), Duration::from_micros(50));
        // Adding an ops limit starts it full; removing the bytes limit lifts it.
        let ops = TokenBucketConfig::per_second(1, 2).expect("ops");
        l.update(None, Some(ops));
        assert!(l.bytes().is_none());
        assert_eq!(l.consume(1 << 30, 1), Ok(()));
        assert_eq!(l.consume(1 << 30, 1), Ok(()));
        assert_eq!(l.consume(0, 1), Err(SEC));
        l.update(None, None);
        assert!(l.is_unlimited());
        assert_eq!(l.consume(0, 1), Ok(()));
    }

    #[test]
    fn update_keeps_debt_and_caps_the_one_time_burst() {
        let clock = FakeClock::new();
        let cfg = TokenBucketConfig::per_second(1000, 1000).expect("config");
        let mut b = TokenBucket::with_clock(cfg, clock.clone());
        assert_eq!(b.reduce(3000), Reduce::OverConsumption(2 * SEC));
        // Changing the configuration does not wipe the debt (2000 tokens).
        b.update(TokenBucketConfig::per_second(2000, 1000).expect("config"));
        assert_eq!(b.time_until(1), SEC + Duration::from_micros(500));
        // A one-time burst is capped by the new one and never grows back.
        let otb = TokenBucketConfig::per_second(1, 1)
            .expect("config")
            .with_one_time_burst(100);
        let mut b = TokenBucket::with_clock(otb, clock.clone());
        assert_eq!(b.reduce(40), Reduce::Success);
        b.update(otb.with_one_time_burst(50));
        assert_eq!(b.one_time_burst_left(), 50);
        b.update(otb.with_one_time_burst(500));
        assert_eq!(b.one_time_burst_left(), 50);
    }

    #[test]
    fn real_clock_holds_the_rate_loosely() {
        // 1000 ops/s with a burst of 1: 21 ops take about 20 ms.
        let ops = TokenBucketConfig::per_second(1000, 1).expect("ops");
        let mut l = RateLimiter::new(None, Some(ops));
        let start = Instant::now();
        let mut done = 0;
        while done < 21 {
            match l.consume(0, 1) {
                Ok(()) => done += 1,
                Err(wait) => std::thread::sleep(wait),
            }
        }
        let took = start.elapsed();
        assert!(took >= 19 * MS, "too fast: {took:?}");
        assert!(took < 500 * MS, "too slow: {took:?}");
        let clock = MonotonicClock;
        let a = clock.now();
        std::thread::sleep(MS);
        assert!(clock.now() >= a + MS);
    }

    #[test]
    fn timer_fires_when_tokens_are_available_again() {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

        let bytes = TokenBucketConfig::bytes_for_bits_per_second(8_000_000, 10_000).expect("bytes"); // 1 MB/s
        let mut l = RateLimiter::new(Some(bytes), None);
        assert_eq!(l.consume(10_000, 1), Ok(()));
        let wait = l.consume(10_000, 1).expect_err("the bucket is empty");
        assert!(wait <= 10 * MS, "{wait:?}");

        let mut timer = Timer::new().expect("timer");
        assert!(!timer.is_armed().expect("query"));
        let epoll = Epoll::new().expect("epoll");
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 7),
            )
            .expect("epoll add");
        let mut events = [EpollEvent::default(); 4];

        let start = Instant::now();
        timer.arm(wait).expect("arm");
        assert!(timer.is_armed().expect("query"));
        let n = epoll.wait(50, &mut events).expect("epoll wait");
        let took = start.elapsed();
        assert_eq!(n, 1, "timer did not fire within 50 ms");
        assert_eq!(events[0].data(), 7);
        assert!(took + MS >= wait, "fired early: {took:?} < {wait:?}");
        assert_eq!(l.consume(10_000, 1), Ok(()));

        // Clearing acknowledges the expiry: the fd is no longer readable.
        timer.clear().expect("clear");
        assert_eq!(epoll.wait(0, &mut events).expect("epoll wait"), 0);
        assert!(!timer.is_armed().expect("query"));

        // A zero wait still fires, and wait() returns the expiry count.
        timer.arm(Duration::ZERO).expect("arm");
        assert_eq!(timer.wait().expect("read"), 1);
        // Re-arming replaces the earlier deadline; clear disarms a pending one.
        timer.arm(SEC).expect("arm");
        timer.arm(MS).expect("re-arm");
        assert_eq!(epoll.wait(50, &mut events).expect("epoll wait"), 1);
        timer.arm(5 * MS).expect("arm");
        timer.clear().expect("clear");
        assert_eq!(epoll.wait(20, &mut events).expect("epoll wait"), 0);
    }

    #[test]
    fn fake_clock_is_shared_between_clones() {
        let a = FakeClock::new();
        let b = a.clone();
        a.advance(SEC);
        b.advance_ns(5);
        assert_eq!(a.now(), SEC + Duration::from_nanos(5));
        assert_eq!(b.now_ns(), 1_000_000_005);
    }
}
