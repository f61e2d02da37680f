//! Per-socket rate limit on client events: a token bucket for the normal rate and burst, plus
//! an abuse counter so a client that keeps hammering after being refused is disconnected.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    abuse_limit: usize,
    refusals: VecDeque<Instant>,
}

impl RateLimiter {
    pub fn new(per_second: u32, burst: u32, abuse_limit: u32, now: Instant) -> Self {
        RateLimiter {
            rate: per_second as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
            abuse_limit: abuse_limit as usize,
            refusals: VecDeque::new(),
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        while self
            .refusals
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > ABUSE_WINDOW)
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

    #[test]
    fn allows_the_burst_then_refuses_then_refills() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(5, 3, 100, t0);
        assert_eq!(l.check(t0), Verdict::Allow);
        assert_eq!(l.check(t0), Verdict::Allow);
        assert_eq!(l.check(t0), Verdict::Allow);
        assert_eq!(l.check(t0), Verdict::Refuse);
        // 5 per second: one token back after 200 ms.
        assert_eq!(l.check(t0 + Duration::from_millis(210)), Verdict::Allow);
        assert_eq!(l.check(t0 + Duration::from_millis(220)), Verdict::Refuse);
    }

    #[test]
    fn sustained_abuse_disconnects_and_old_refusals_expire() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, 1, 3, t0);
        assert_eq!(l.check(t0), Verdict::Allow);
        for _ in 0..3 {
            assert_eq!(l.check(t0), Verdict::Refuse);
        }
        assert_eq!(l.check(t0), Verdict::Disconnect);

        let mut l = RateLimiter::new(1, 1, 3, t0);
        assert_eq!(l.check(t0), Verdict::Allow);
        for _ in 0..3 {
            assert_eq!(l.check(t0), Verdict::Refuse);
        }
        // Eleven seconds later the old refusals no longer count (and a token is back).
        let later = t0 + Duration::from_secs(11);
        assert_eq!(l.check(later), Verdict::Allow);
        assert_eq!(l.check(later), Verdict::Refuse);
    }
}
