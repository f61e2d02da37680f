//! Per-socket rate limit on client events: `governor`'s token bucket (GCRA) for the normal rate
//! and burst, plus an abuse counter so a client that keeps hammering after being refused is
//! disconnected (the counter is not a token bucket: it remembers refusals for 10 s).

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Bucket};

/// What to do with one client event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse this event (`rate_limited`).
    Refuse,
    /// Refused too often: disconnect the socket.
    Disconnect,
}

const ABUSE_WINDOW: Duration = Duration::from_secs(10);

/// `per_second` sustained with a burst of `burst`. Configuration rejects zeros; a zero from
/// elsewhere counts as one rather than panicking.
pub fn quota(per_second: u32, burst: u32) -> Quota {
    let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nz(per_second)).allow_burst(nz(burst))
}

pub struct RateLimiter<C: Clock = DefaultClock> {
    bucket: Bucket<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    abuse_limit: usize,
    refusals: VecDeque<C::Instant>,
}

impl RateLimiter {
    pub fn new(per_second: u32, burst: u32, abuse_limit: u32) -> Self {
        Self::with_clock(per_second, burst, abuse_limit, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    pub fn with_clock(per_second: u32, burst: u32, abuse_limit: u32, clock: C) -> Self {
        RateLimiter {
            bucket: Bucket::direct_with_clock(quota(per_second, burst), clock.clone()),
            clock,
            abuse_limit: abuse_limit as usize,
            refusals: VecDeque::new(),
        }
    }

    /// Takes a token for one event, or counts a refusal.
    pub fn check(&mut self) -> Verdict {
        match self.bucket.check() {
            Ok(()) => Verdict::Allow,
            Err(_) => self.refuse(),
        }
    }

    /// Counts a refusal decided elsewhere (e.g. too many events already waiting) without taking
    /// a token: it weighs towards a disconnect like one the bucket refused.
    pub fn refuse(&mut self) -> Verdict {
        let now = self.clock.now();
        while self
            .refusals
            .front()
            .is_some_and(|t| Duration::from(now.duration_since(*t)) > ABUSE_WINDOW)
        {
            self.refusals.pop_front();
        }
        self.refusals.push_back(now);
        if self.refusals.len() > self.abuse_limit {
            Verdict::Disconnect
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn allows_the_burst_then_refuses_then_refills() {
        let clock = FakeRelativeClock::default();
        let mut l = RateLimiter::with_clock(5, 3, 100, clock.clone());
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Refuse);
        // 5 per second: one token back after 200 ms.
        clock.advance(Duration::from_millis(210));
        assert_eq!(l.check(), Verdict::Allow);
        clock.advance(Duration::from_millis(10));
        assert_eq!(l.check(), Verdict::Refuse);
    }

    #[test]
    fn sustained_abuse_disconnects_and_old_refusals_expire() {
        let clock = FakeRelativeClock::default();
        let mut l = RateLimiter::with_clock(1, 1, 3, clock.clone());
        assert_eq!(l.check(), Verdict::Allow);
        for _ in 0..3 {
            assert_eq!(l.check(), Verdict::Refuse);
        }
        assert_eq!(l.check(), Verdict::Disconnect);

        let mut l = RateLimiter::with_clock(1, 1, 3, clock.clone());
        assert_eq!(l.check(), Verdict::Allow);
        for _ in 0..3 {
            assert_eq!(l.check(), Verdict::Refuse);
        }
        // Eleven seconds later the old refusals no longer count (and a token is back).
        clock.advance(Duration::from_secs(11));
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Refuse);
    }

    #[test]
    fn refusals_decided_elsewhere_count_without_taking_a_token() {
        let clock = FakeRelativeClock::default();
        let mut l = RateLimiter::with_clock(1, 1, 2, clock);
        assert_eq!(l.refuse(), Verdict::Refuse);
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.refuse(), Verdict::Refuse);
        assert_eq!(l.refuse(), Verdict::Disconnect);
    }
}
