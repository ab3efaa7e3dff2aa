//! Liveness: how the store writer and the uplink tell the watchdog (in `supervisor`) that
//! they are still making progress. A module of its own so that the actors depend on it, not on
//! the supervisor (which depends on them through the reload).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// An actor's promise to show progress again within a stated time. The watchdog pings systemd
/// only while every actor keeps its promise, so a stuck actor gets the unit restarted.
#[derive(Debug, Default)]
pub struct Liveness {
    until_mono_us: AtomicI64,
}

impl Liveness {
    /// "I am making progress, and will be back within `next`."
    pub fn beat(&self, next: Duration) {
        let until = crate::clock::monotonic_us() + next.as_micros() as i64;
        self.until_mono_us.store(until, Ordering::Relaxed);
    }

    /// Overdue by more than `grace`?
    pub fn alive(&self, grace: Duration) -> bool {
        let until = self.until_mono_us.load(Ordering::Relaxed);
        until == 0 || crate::clock::monotonic_us() <= until + grace.as_micros() as i64
    }
}
