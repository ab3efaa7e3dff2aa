//! Capped exponential backoff with full jitter: the delay before attempt n+1 is uniform in
//! [0, min(cap, base·2ⁿ)]. Pure: the random source is a parameter.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, failures: 0 }
    }

    /// The next delay, given a uniform sample in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let exp = self.base.saturating_mul(1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX));
        exp.min(self.cap)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let c = b.ceiling().as_millis() as u64;
                b.next_delay(0.5);
                c
            })
            .collect();
        assert_eq!(ceilings, vec![500, 1000, 2000, 4000, 8000, 15000, 15000, 15000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        assert_eq!(b.next_delay(0.999_999).as_millis(), 1999);
        for _ in 0..100 {
            b.next_delay(1.0);
        }
        assert_eq!(b.next_delay(1.0), Duration::from_secs(60));
    }
}
