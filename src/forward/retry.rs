//! When to try a failed write again: capped exponential backoff with full jitter, and the
//! server's `Retry-After`.
//!
//! Full jitter (a uniformly random wait between zero and the exponential bound) rather than
//! a fixed schedule, so that gateways that lost the same TSDB at the same moment do not all
//! come back in the same millisecond when it returns. When the server says how long to wait
//! (`Retry-After` on 429 / 503, RFC 9110 §10.2.3) that is the wait, plus a little jitter
//! for the same reason, never less; a value beyond [`Backoff::max_retry_after`] is capped
//! there, so a misconfigured proxy cannot park the forwarder for a day.

use std::time::{Duration, SystemTime};

/// The retry schedule (`ForwarderSettings` holds one; tests shorten it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The bound of the first retry's wait; it doubles per consecutive failure.
    pub base: Duration,
    /// The bound never grows past this.
    pub cap: Duration,
    /// Longest `Retry-After` obeyed as given.
    pub max_retry_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (1 for the first retry): uniform in
    /// `[0, min(cap, base · 2^(attempt-1))]`, or `Retry-After` (capped) plus up to `base`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, rng: &mut Rng) -> Duration {
        match retry_after {
            Some(after) => after.min(self.max_retry_after) + rng.below(self.base),
            None => {
                let shift = attempt.saturating_sub(1).min(31);
                let bound = self
                    .base
                    .checked_mul(1u32 << shift)
                    .unwrap_or(self.cap)
                    .min(self.cap);
                rng.below(bound)
            }
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
/// A date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A small non-cryptographic generator (SplitMix64) for jitter; seeded per forwarder.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the clock and the process id: distinct across gateways restarted together.
    pub fn from_entropy() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(nanos ^ (u64::from(std::process::id()) << 32))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, bound]` at nanosecond resolution.
    pub fn below(&mut self, bound: Duration) -> Duration {
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % nanos.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_doubling_bound_and_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(60),
        };
        let mut rng = Rng::new(7);
        for (attempt, bound_ms) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1600),
            (6, 2000),
            (40, 2000),
        ] {
            let delays: Vec<Duration> = (0..2000)
                .map(|_| b.delay(attempt, None, &mut rng))
                .collect();
            let max = delays.iter().max().unwrap();
            let min = delays.iter().min().unwrap();
            assert!(
                *max <= Duration::from_millis(bound_ms),
                "attempt {attempt}: {max:?}"
            );
            // Jitter really spreads over the whole range (full, not "equal" jitter).
            assert!(
                *max > Duration::from_millis(bound_ms * 9 / 10),
                "attempt {attempt}: {max:?}"
            );
            assert!(
                *min < Duration::from_millis(bound_ms / 10),
                "attempt {attempt}: {min:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_and_is_capped() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(60),
        };
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let d = b.delay(9, Some(Duration::from_secs(5)), &mut rng);
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_millis(5100),
                "{d:?}"
            );
            let d = b.delay(1, Some(Duration::from_secs(86_400)), &mut rng);
            assert!(
                d >= Duration::from_secs(60) && d <= Duration::from_millis(60_100),
                "{d:?}"
            );
        }
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
    }

    #[test]
    fn rng_is_deterministic_per_seed_and_below_is_inclusive_bounded() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_eq!(Rng::new(3).below(Duration::ZERO), Duration::ZERO);
        let mut r = Rng::new(5);
        assert!((0..100).all(|_| r.below(Duration::from_nanos(1)) <= Duration::from_nanos(1)));
    }
}
