//! Per-worker circuit breaker: after `threshold` consecutive failures the worker gets no traffic for
//! `open_for`; then one probe request is let through (half-open) and its outcome closes or re-opens it.
//!
//! Time is passed in, so the state machine is tested without sleeping.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

#[derive(Debug)]
pub struct CircuitBreaker {
    state: BreakerState,
    threshold: u32,
    open_for: Duration,
    /// How many times it has opened (exported as a metric).
    pub opened_count: u64,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self { state: BreakerState::Closed { failures: 0 }, threshold: threshold.max(1), open_for, opened_count: 0 }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether routing may consider this worker now (does not take the half-open probe slot).
    pub fn is_available(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } => now >= until,
            BreakerState::HalfOpen { probe_in_flight } => !probe_in_flight,
        }
    }

    /// Claim the right to send one request; in half-open state only one probe is admitted.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { probe_in_flight: true };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probe_in_flight: false } => {
                self.state = BreakerState::HalfOpen { probe_in_flight: true };
                true
            }
            BreakerState::HalfOpen { probe_in_flight: true } => false,
        }
    }

    pub fn record_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    pub fn record_failure(&mut self, now: Instant) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.threshold => {
                BreakerState::Closed { failures: failures + 1 }
            }
            BreakerState::Open { until } => BreakerState::Open { until },
            _ => {
                self.opened_count += 1;
                BreakerState::Open { until: now + self.open_for }
            }
        };
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, BreakerState::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(3, Duration::from_secs(10));
        b.record_failure(t0);
        b.record_failure(t0);
        assert!(b.try_acquire(t0), "two failures of three keep it closed");
        b.record_success();
        b.record_failure(t0);
        b.record_failure(t0);
        assert!(b.try_acquire(t0), "a success resets the count");
        b.record_failure(t0);
        assert!(!b.try_acquire(t0), "third consecutive failure opens it");
        assert!(!b.is_available(t0 + Duration::from_secs(9)));
        assert_eq!(b.opened_count, 1);
    }

    #[test]
    fn half_open_admits_one_probe_and_its_outcome_decides() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(1, Duration::from_secs(10));
        b.record_failure(t0);
        let later = t0 + Duration::from_secs(11);
        assert!(b.is_available(later));
        assert!(b.try_acquire(later), "first request after the timeout is the probe");
        assert!(!b.try_acquire(later), "a second concurrent request is refused while the probe runs");
        b.record_failure(later);
        assert!(!b.is_available(later + Duration::from_secs(5)), "failed probe re-opens");
        let much_later = later + Duration::from_secs(11);
        assert!(b.try_acquire(much_later));
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert!(b.try_acquire(much_later) && b.try_acquire(much_later));
        assert_eq!(b.opened_count, 2);
    }
}
