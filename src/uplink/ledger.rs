//! The deliveries the uplink has made but the store has not confirmed recording.
//!
//! A delivered batch is recorded without waiting (the commit's fsync overlaps the next request),
//! so its outcome is looked at later, in order. A delivery the store could not record (disk
//! full, read-only storage) is kept here and offered again, merged with its neighbours into as
//! few ranges as possible; it is never sent again meanwhile, as the cursor is past it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::store::Reply;

/// Passings `first..=last` of a session, delivered under its remote token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Delivery {
    pub session_id: i64,
    pub first: i64,
    pub last: i64,
    pub token: String,
}

#[derive(Debug, Default)]
pub struct Ledger {
    /// Submitted to the store; the outcome not looked at yet (oldest first).
    recording: VecDeque<(Delivery, oneshot::Receiver<Reply>)>,
    /// Refused by the store: to be offered again.
    unrecorded: Vec<Delivery>,
    /// Unrecorded deliveries are offered again no sooner than this.
    retry_at: Option<tokio::time::Instant>,
}

impl Ledger {
    /// A delivery was submitted to the store; `rx` will carry its outcome.
    pub fn submitted(&mut self, delivery: Delivery, rx: oneshot::Receiver<Reply>) {
        self.recording.push_back((delivery, rx));
    }

    /// A delivery the store could not take at all.
    pub fn unrecorded(&mut self, delivery: Delivery) {
        self.unrecorded.push(delivery);
    }

    /// Look at the outcomes given so far, in order, without waiting. Returns the first delivery
    /// that failed while none was failing before (the one worth a warning).
    pub fn collect(&mut self) -> Option<Delivery> {
        let mut first_failure = None;
        while let Some((_, rx)) = self.recording.front_mut() {
            let recorded = match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => break,
                Ok(Ok(_)) => true,
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => false,
            };
            let Some((delivery, _)) = self.recording.pop_front() else { break };
            if !recorded {
                if self.unrecorded.is_empty() && first_failure.is_none() {
                    first_failure = Some(delivery.clone());
                }
                self.unrecorded.push(delivery);
            }
        }
        first_failure
    }

    /// Whether anything still waits to be recorded (submitted or refused).
    pub fn is_pending(&self) -> bool {
        !self.unrecorded.is_empty() || !self.recording.is_empty()
    }

    /// The refused deliveries, merged, when it is time to offer them again (at most once per
    /// `every`); none otherwise.
    pub fn due(&mut self, now: tokio::time::Instant, every: Duration) -> Vec<Delivery> {
        if self.unrecorded.is_empty() || self.retry_at.is_some_and(|at| now < at) {
            return Vec::new();
        }
        self.retry_at = Some(now + every);
        merge(std::mem::take(&mut self.unrecorded))
    }

    /// At a stop: wait up to `grace` for each outstanding outcome; returns how many deliveries
    /// remain unrecorded (they are sent again at the next start, with the same numbers).
    pub async fn settle(&mut self, grace: Duration) -> usize {
        while let Some((delivery, rx)) = self.recording.pop_front() {
            if !matches!(tokio::time::timeout(grace, rx).await, Ok(Ok(Ok(_)))) {
                self.unrecorded.push(delivery);
            }
        }
        self.unrecorded.len()
    }
}

/// Merge ranges of the same session and token that touch or overlap; sorted.
pub fn merge(mut ranges: Vec<Delivery>) -> Vec<Delivery> {
    ranges.sort_unstable();
    let mut merged: Vec<Delivery> = Vec::with_capacity(ranges.len());
    for d in ranges {
        match merged.last_mut() {
            Some(m) if m.session_id == d.session_id && m.token == d.token && d.first <= m.last + 1 => {
                m.last = m.last.max(d.last)
            }
            _ => merged.push(d),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    fn d(session_id: i64, first: i64, last: i64, token: &str) -> Delivery {
        Delivery { session_id, first, last, token: token.into() }
    }

    #[test]
    fn merges_touching_and_overlapping_ranges_only() {
        let merged = merge(vec![
            d(1, 11, 20, "A"),
            d(1, 1, 10, "A"),
            d(1, 15, 25, "A"),
            d(1, 27, 30, "A"),
            d(2, 1, 5, "B"),
            d(1, 31, 31, "A"),
            // Same id, another token: a database since replaced; kept apart.
            d(1, 26, 26, "Z"),
        ]);
        assert_eq!(merged, [d(1, 1, 25, "A"), d(1, 26, 26, "Z"), d(1, 27, 31, "A"), d(2, 1, 5, "B")]);
        assert!(merge(Vec::new()).is_empty());
    }

    #[test]
    fn outcomes_are_read_in_order_and_failures_kept() {
        let mut ledger = Ledger::default();
        let mut senders = Vec::new();
        for (first, last) in [(1, 10), (11, 20), (21, 30)] {
            let (tx, rx) = oneshot::channel();
            ledger.submitted(d(1, first, last, "A"), rx);
            senders.push(tx);
        }
        assert!(ledger.is_pending());
        let mut senders = senders.into_iter();
        let (ok, failed, later) = (senders.next().unwrap(), senders.next().unwrap(), senders.next().unwrap());
        // The second answers first: nothing is read past the unanswered first.
        failed.send(Err(StoreError::Storage("disk full".into()))).unwrap();
        assert_eq!(ledger.collect(), None);
        ok.send(Ok(Some(1))).unwrap();
        assert_eq!(ledger.collect(), Some(d(1, 11, 20, "A")), "the first failure is reported once");
        // A store that went away counts as a failure too; not reported again while one is kept.
        drop(later);
        assert_eq!(ledger.collect(), None);
        assert!(ledger.is_pending());
        let now = tokio::time::Instant::now();
        let every = Duration::from_secs(2);
        assert_eq!(ledger.due(now, every), [d(1, 11, 30, "A")], "offered again, merged");
        ledger.unrecorded(d(1, 31, 40, "A"));
        assert!(ledger.due(now + Duration::from_secs(1), every).is_empty(), "not sooner than `every`");
        assert_eq!(ledger.due(now + every, every), [d(1, 31, 40, "A")]);
        assert!(!ledger.is_pending());
    }

    #[tokio::test]
    async fn settle_waits_for_answers_and_counts_the_rest() {
        let mut ledger = Ledger::default();
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel::<Reply>();
        ledger.submitted(d(1, 1, 10, "A"), rx1);
        ledger.submitted(d(1, 11, 20, "A"), rx2);
        tx1.send(Ok(None)).unwrap();
        drop(tx2);
        assert_eq!(ledger.settle(Duration::from_secs(5)).await, 1);
    }
}
