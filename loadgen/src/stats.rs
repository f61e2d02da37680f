//! Latency bookkeeping. Deliveries are too many to keep one by one (hundreds of thousands a
//! second), so they go into a shared histogram of 1 ms buckets updated with relaxed atomics;
//! request round trips are few enough to keep exactly.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// 1 ms buckets from 0 to `LIMIT_MS`; anything slower lands in the last bucket (its exact
/// value still reaches `max`).
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
    count: AtomicU64,
}

const LIMIT_MS: usize = 120_000;

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            buckets: (0..=LIMIT_MS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records a latency in ms (negative values, from clock steps, count as 0).
    pub fn record(&self, ms: i64) {
        let v = ms.max(0) as u64;
        self.buckets[(v as usize).min(LIMIT_MS)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn summary(&self) -> Percentiles {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let at = |q: f64| -> Option<f64> {
            if total == 0 {
                return None;
            }
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (ms, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Some(ms as f64);
                }
            }
            None
        };
        Percentiles {
            count: total,
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: (total > 0).then(|| self.max.load(Ordering::Relaxed) as f64),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// Exact percentiles of a small sample (ms), rounded to 0.1 ms.
pub fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(round1(v[rank - 1]))
    };
    Percentiles {
        count: v.len() as u64,
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: v.last().copied().map(round1),
    }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A well-mixed 64-bit hash of a reading id (SplitMix64 finaliser; ids are decimal integers,
/// other strings are folded byte by byte first). Sums of these per client, compared with the
/// sum over the readings posted, tell "each reading exactly once" from "right count, wrong set".
pub fn id_hash(id: &str) -> u64 {
    let base = id.parse::<u64>().unwrap_or_else(|_| {
        id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    });
    let mut z = base.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles() {
        let h = Histogram::new();
        for ms in 1..=100 {
            h.record(ms);
        }
        let s = h.summary();
        assert_eq!(
            (s.p50, s.p99, s.max, s.count),
            (Some(50.0), Some(99.0), Some(100.0), 100)
        );
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p95, p.max), (Some(50.0), Some(95.0), Some(100.0)));
    }

    #[test]
    fn hashes_differ() {
        assert_ne!(id_hash("1"), id_hash("2"));
        assert_ne!(
            id_hash("1").wrapping_add(id_hash("1")),
            id_hash("1").wrapping_add(id_hash("2"))
        );
    }
}
