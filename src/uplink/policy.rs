//! What the uplink does after each step, decided without I/O: an outcome goes in, the next
//! move (go on, sleep, retry after a wait, record a refusal), the state to show and the next
//! batch size come out. The loop in `mod.rs` performs what this decides; the rules that keep
//! every passing on its way (retry forever, isolate a refused passing by halving, pause on a
//! configuration error) are tested here with a table.

use std::time::Duration;

use super::api::{ApiError, Call};
use super::backoff::Backoff;
use super::status::UplinkState;

/// The first retry waits up to this long; each failure doubles it, up to `api.retry_max_delay`.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// A wrong key or device will not fix itself quickly: retry slowly, never hammer.
pub const CONFIG_RETRY: Duration = Duration::from_secs(60);
/// Idle, with deliveries the store has yet to record: look again this soon.
pub const STORE_RETRY: Duration = Duration::from_secs(2);
/// Even with nothing signalled, look at the store this often (belt and braces).
pub const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// What one step came to.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Nothing to send; `unrecorded` when deliveries still wait to be recorded by the store.
    Idle { unrecorded: bool },
    /// The request was accepted (or its effect recorded: a refused passing, a session gone),
    /// with `sent` passings in it (0 for a session call).
    Done { sent: usize },
    /// The request failed; `sent` passings were in it (0 for a session call), and
    /// `passing_id` names the passing when it was alone.
    Failed { call: Call, error: &'a ApiError, sent: usize, passing_id: Option<i64> },
}

/// The move after an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Go on at once: after a success, or with a smaller batch (`limit`) after a refusal.
    Go,
    /// Nothing to do: sleep until work is signalled, at most this long.
    Sleep(Duration),
    /// Retry after this long (a reload or a stop ends the wait early).
    Retry(Duration),
    /// The API refused this passing alone: record it as undeliverable, then go on.
    Undeliverable(i64),
    /// The remote session is gone: record it (as closed remotely while sending; as closed when
    /// closing, which is what was wanted), then go on.
    SessionGone { closing: bool },
}

/// What the loop should say about an outcome, beyond what `Next` implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    Nothing,
    /// The first success after failures.
    BackOnline {
        after_failures: u32,
    },
    /// A failure: loudly the first time (and on every configuration error), quietly on repeats.
    Failure {
        loud: bool,
    },
    /// A batch was refused and is halved.
    Split {
        batch: usize,
        next: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub next: Next,
    pub say: Say,
}

#[derive(Debug, Clone)]
pub struct Policy {
    batch_size: usize,
    limit: usize,
    backoff: Backoff,
    state: UplinkState,
    failing: bool,
    succeeded: bool,
    /// While a refused passing is being isolated: how many passings of the first refused batch
    /// are still to go. Batches stay small until then, so each refusal halves the search (at most
    /// log2(batch_size) + 1 refusals) instead of starting again at full size after every success.
    isolating: usize,
}

impl Policy {
    pub fn new(batch_size: usize, retry_max_delay: Duration) -> Self {
        Self {
            batch_size,
            limit: batch_size,
            backoff: Backoff::new(BACKOFF_BASE, retry_max_delay),
            state: UplinkState::Idle,
            failing: false,
            succeeded: false,
            isolating: 0,
        }
    }

    /// New `[api]` settings (perhaps the fix for a refused key): full batches, a fresh backoff.
    pub fn reload(&mut self, batch_size: usize, retry_max_delay: Duration) {
        self.batch_size = batch_size;
        self.limit = batch_size;
        self.isolating = 0;
        self.backoff = Backoff::new(BACKOFF_BASE, retry_max_delay);
        if self.state == UplinkState::AuthFailed {
            self.state = UplinkState::Idle;
        }
    }

    /// How many passings the next batch may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The batch size that will apply if a request with `sent` passings is accepted (to read the
    /// next batch ahead while it is in flight).
    pub fn limit_if_accepted(&self, sent: usize) -> usize {
        if self.isolating > sent { self.limit } else { self.batch_size }
    }

    pub fn state(&self) -> UplinkState {
        self.state
    }

    /// Decide the next move. `unit` is a uniform sample in [0, 1) for the backoff's jitter.
    pub fn decide(&mut self, outcome: Outcome<'_>, unit: f64) -> Decision {
        match outcome {
            Outcome::Idle { unrecorded } => {
                if self.state != UplinkState::AuthFailed {
                    self.state = if self.succeeded { UplinkState::Online } else { UplinkState::Idle };
                }
                let recheck = if unrecorded { STORE_RETRY } else { IDLE_RECHECK };
                Decision { next: Next::Sleep(recheck), say: Say::Nothing }
            }
            Outcome::Done { sent } => {
                let say = if self.failing {
                    Say::BackOnline { after_failures: self.backoff.failures() }
                } else {
                    Say::Nothing
                };
                self.failing = false;
                self.succeeded = true;
                self.backoff.reset();
                self.isolating = self.isolating.saturating_sub(sent);
                if self.isolating == 0 {
                    self.limit = self.batch_size;
                }
                self.state = UplinkState::Online;
                Decision { next: Next::Go, say }
            }
            Outcome::Failed { call, error, sent, passing_id } => match error {
                ApiError::SessionGone { .. } if call == Call::PostPassings => {
                    Decision { next: Next::SessionGone { closing: false }, say: Say::Nothing }
                }
                ApiError::SessionGone { .. } if call == Call::CloseSession => {
                    Decision { next: Next::SessionGone { closing: true }, say: Say::Nothing }
                }
                ApiError::Refused { .. } if sent > 1 => {
                    // Halve until the refused passing is alone; the rest flows meanwhile.
                    if self.isolating == 0 {
                        self.isolating = sent;
                    }
                    self.limit = sent.div_ceil(2);
                    Decision { next: Next::Go, say: Say::Split { batch: sent, next: self.limit } }
                }
                ApiError::Refused { .. } if passing_id.is_some() => {
                    Decision { next: Next::Undeliverable(passing_id.unwrap_or_default()), say: Say::Nothing }
                }
                error => {
                    let (state, delay) = match error {
                        ApiError::Config { .. } => (UplinkState::AuthFailed, CONFIG_RETRY.max(self.backoff.ceiling())),
                        ApiError::Transient { offline, retry_after, .. } => {
                            let jitter = self.backoff.next_delay(unit);
                            let delay = retry_after.map_or(jitter, |r| r.max(jitter));
                            (if *offline { UplinkState::Offline } else { UplinkState::BackingOff }, delay)
                        }
                        _ => (UplinkState::BackingOff, self.backoff.next_delay(unit)),
                    };
                    let loud = !self.failing || state == UplinkState::AuthFailed;
                    self.failing = true;
                    self.state = state;
                    Decision { next: Next::Retry(delay), say: Say::Failure { loud } }
                }
            },
        }
    }

    /// A refused passing was recorded as undeliverable (or its session is gone): full batches again.
    pub fn refusal_recorded(&mut self) {
        self.isolating = 0;
        self.limit = self.batch_size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::api::{classify, field};
    use serde_json::{Value, json};

    const CAP: Duration = Duration::from_secs(300);

    /// One answer the API may give, as `rufus-api.md` documents it or DESIGN.md expects it.
    enum Answer {
        /// A 2xx with this reply.
        Ok(Value),
        /// A non-2xx status with this body and `Retry-After`.
        Status(u16, Value, Option<u64>),
        /// No answer at all (as the client reports it).
        Transport(ApiError),
    }

    /// What the policy must do with it.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Want {
        Go(usize),
        Retry { state: UplinkState, at_least: Duration, at_most: Duration },
        Undeliverable,
        Gone { closing: bool },
    }

    fn offline(reason: &str) -> ApiError {
        ApiError::Transient { reason: reason.into(), retry_after: None, offline: true }
    }

    fn garbled(reason: &str) -> ApiError {
        ApiError::Transient { reason: reason.into(), retry_after: None, offline: false }
    }

    /// Every outcome of `shared/rufus-api.md` (and the undocumented ones it says to expect), for a
    /// batch of `sent` passings at a fresh policy with batch size 100.
    #[test]
    fn every_api_outcome() {
        use Answer::*;
        use Call::*;
        use UplinkState::*;
        let gone = json!({"description": "Session not found or closed"});
        let gone_env = json!({"body": {"description": "Session not found or closed"}});
        let device = json!({"description": "Device not found", "deviceid": "X"});
        let null_env = json!({"body": null});
        let half = Duration::from_millis(500);
        let backoff = |state| Want::Retry { state, at_least: Duration::ZERO, at_most: half };
        let config = Want::Retry { state: AuthFailed, at_least: CONFIG_RETRY, at_most: CONFIG_RETRY };
        let rows: Vec<(&str, Call, Answer, usize, Want)> = vec![
            // Successes, flat and enveloped, with and without the counts.
            (
                "create, flat",
                CreateSession,
                Ok(json!({"description": "Session inserted succesfully", "token_session": "T"})),
                0,
                Want::Go(100),
            ),
            ("create, envelope", CreateSession, Ok(json!({"body": {"token_session": "T"}})), 0, Want::Go(100)),
            (
                "insert with counts",
                PostPassings,
                Ok(json!({"inserted_count": 10, "duplicate_count": 2})),
                10,
                Want::Go(100),
            ),
            (
                "insert, no counts",
                PostPassings,
                Ok(json!({"description": "Passings inserted succesfully"})),
                10,
                Want::Go(100),
            ),
            ("close", CloseSession, Ok(json!({"description": "Session closed succesfully"})), 0, Want::Go(100)),
            ("active session", ActiveSession, Ok(json!({"result": []})), 0, Want::Go(100)),
            ("bind", BindDevice, Ok(json!({"deviceid": "D"})), 0, Want::Go(100)),
            // Documented errors.
            ("400 on a batch: split", PostPassings, Status(400, Value::Null, None), 10, Want::Go(5)),
            (
                "400 on one passing",
                PostPassings,
                Status(400, json!({"description": "bad bib"}), None),
                1,
                Want::Undeliverable,
            ),
            ("413 on a batch: split", PostPassings, Status(413, Value::Null, None), 7, Want::Go(4)),
            ("422 on one passing", PostPassings, Status(422, Value::Null, None), 1, Want::Undeliverable),
            ("403 wrong key", PostPassings, Status(403, Value::Null, None), 10, config),
            ("401", CreateSession, Status(401, Value::Null, None), 0, config),
            ("404 unknown device", CreateSession, Status(404, device.clone(), None), 0, config),
            ("404 wrong base url", PostPassings, Status(404, Value::Null, None), 10, config),
            ("session gone (404)", PostPassings, Status(404, gone.clone(), None), 10, Want::Gone { closing: false }),
            ("session gone (400)", PostPassings, Status(400, gone.clone(), None), 1, Want::Gone { closing: false }),
            ("session gone, envelope", PostPassings, Status(409, gone_env, None), 10, Want::Gone { closing: false }),
            ("close of a closed session", CloseSession, Status(404, gone, None), 0, Want::Gone { closing: true }),
            ("close, 404 no body", CloseSession, Status(404, Value::Null, None), 0, Want::Gone { closing: true }),
            ("400 on create", CreateSession, Status(400, Value::Null, None), 0, backoff(BackingOff)),
            // Undocumented, expected anyway.
            ("408", PostPassings, Status(408, Value::Null, None), 10, backoff(BackingOff)),
            ("409 without a reason", PostPassings, Status(409, Value::Null, None), 10, backoff(BackingOff)),
            (
                "429 with Retry-After",
                PostPassings,
                Status(429, Value::Null, Some(7)),
                10,
                Want::Retry { state: BackingOff, at_least: Duration::from_secs(7), at_most: Duration::from_secs(7) },
            ),
            ("500, envelope null", PostPassings, Status(500, null_env, None), 10, backoff(BackingOff)),
            (
                "503 with Retry-After",
                CloseSession,
                Status(503, Value::Null, Some(3)),
                0,
                Want::Retry { state: BackingOff, at_least: Duration::from_secs(3), at_most: Duration::from_secs(3) },
            ),
            ("no connection", PostPassings, Transport(offline("connection refused")), 10, backoff(Offline)),
            ("timeout", PostPassings, Transport(offline("timed out")), 10, backoff(Offline)),
            ("garbled reply", PostPassings, Transport(garbled("not JSON")), 10, backoff(BackingOff)),
            ("reply over 1 MiB", PostPassings, Transport(garbled("reply too large")), 10, backoff(BackingOff)),
            (
                "redirect",
                PostPassings,
                Transport(ApiError::Config { status: 301, description: "redirected to https://elsewhere".into() }),
                10,
                config,
            ),
        ];
        for (name, call, answer, sent, want) in rows {
            let mut policy = Policy::new(100, CAP);
            let error = match answer {
                Ok(reply) => {
                    // The fields the uplink reads are found flat or in the envelope.
                    if call == CreateSession {
                        assert_eq!(field(&reply, "token_session").and_then(Value::as_str), Some("T"), "{name}");
                    }
                    None
                }
                Status(status, body, retry) => Some(classify(call, status, &body, retry.map(Duration::from_secs))),
                Transport(e) => Some(e),
            };
            let decision = match &error {
                None => policy.decide(Outcome::Done { sent }, 0.999),
                Some(error) => {
                    let passing_id = (sent == 1).then_some(42);
                    policy.decide(Outcome::Failed { call, error, sent, passing_id }, 0.999)
                }
            };
            let got = match decision.next {
                Next::Go => Want::Go(policy.limit()),
                Next::Retry(delay) => {
                    assert!(
                        matches!(decision.say, Say::Failure { loud: true }),
                        "{name}: a first failure is said loudly"
                    );
                    match want {
                        Want::Retry { state: _, at_least, at_most } if delay >= at_least && delay <= at_most => {
                            Want::Retry { state: policy.state(), at_least, at_most }
                        }
                        _ => Want::Retry { state: policy.state(), at_least: delay, at_most: delay },
                    }
                }
                Next::Undeliverable(id) => {
                    assert_eq!(id, 42, "{name}");
                    Want::Undeliverable
                }
                Next::SessionGone { closing } => Want::Gone { closing },
                Next::Sleep(_) => panic!("{name}: a request never sleeps"),
            };
            assert_eq!(got, want, "{name}: {error:?}");
        }
    }

    #[test]
    fn a_refused_passing_is_isolated_by_halving() {
        let mut policy = Policy::new(100, CAP);
        let refused = ApiError::Refused { status: 400, description: "bad".into() };
        let mut sent = 100;
        let mut batches = Vec::new();
        loop {
            let passing_id = (sent == 1).then_some(7);
            let d = policy.decide(Outcome::Failed { call: Call::PostPassings, error: &refused, sent, passing_id }, 0.5);
            match d.next {
                Next::Go => {
                    assert_eq!(d.say, Say::Split { batch: sent, next: policy.limit() });
                    sent = policy.limit();
                    batches.push(sent);
                }
                Next::Undeliverable(7) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(batches, [50, 25, 13, 7, 4, 2, 1]);
        // A refusal is not a link failure: the state and backoff are untouched.
        assert_eq!(policy.state(), UplinkState::Idle);
        policy.refusal_recorded();
        assert_eq!(policy.limit(), 100);
    }

    /// A queue of 40 passings, the 13th refused by the API: what the uplink sends, batch by batch.
    fn isolate(batch_size: usize, bad: i64) -> (Vec<(i64, usize, bool)>, Vec<i64>) {
        let mut policy = Policy::new(batch_size, CAP);
        let refused = ApiError::Refused { status: 400, description: "Invalid passing".into() };
        let mut queue: Vec<i64> = (1..=40).collect();
        let (mut requests, mut delivered) = (Vec::new(), Vec::new());
        while !queue.is_empty() {
            let batch: Vec<i64> = queue.iter().copied().take(policy.limit()).collect();
            let has_bad = batch.contains(&bad);
            requests.push((batch[0], batch.len(), has_bad));
            if has_bad {
                let passing_id = (batch.len() == 1).then_some(bad);
                let d = policy.decide(
                    Outcome::Failed { call: Call::PostPassings, error: &refused, sent: batch.len(), passing_id },
                    0.5,
                );
                if d.next == Next::Undeliverable(bad) {
                    queue.retain(|n| *n != bad);
                    policy.refusal_recorded();
                }
            } else {
                let ahead = policy.limit_if_accepted(batch.len());
                policy.decide(Outcome::Done { sent: batch.len() }, 0.5);
                assert_eq!(ahead, policy.limit(), "the batch read ahead has the size that applies");
                queue.drain(..batch.len());
                delivered.extend(batch);
            }
        }
        (requests, delivered)
    }

    #[test]
    fn isolating_keeps_batches_small_until_past_the_refused_one() {
        let (requests, delivered) = isolate(16, 13);
        assert_eq!(delivered, (1..=40).filter(|n| *n != 13).collect::<Vec<_>>(), "everything else, in order");
        let refused: Vec<usize> = requests.iter().filter(|r| r.2).map(|r| r.1).collect();
        assert_eq!(refused, [16, 8, 4, 2, 1], "log2(16) + 1 refusals");
        assert_eq!(
            requests,
            [
                (1, 16, true),
                (1, 8, false),
                (9, 8, true),
                (9, 4, false),
                (13, 4, true),
                (13, 2, true),
                (13, 1, true),
                (14, 16, false),
                (30, 11, false)
            ]
        );
        // Wherever the refused passing sits.
        for bad in 1..=40 {
            let (requests, delivered) = isolate(16, bad);
            assert_eq!(delivered.len(), 39);
            assert!(requests.iter().filter(|r| r.2).count() <= 5, "passing {bad}: {requests:?}");
        }
    }

    #[test]
    fn backoff_grows_to_the_cap_and_a_success_resets_it() {
        let cap = Duration::from_secs(10);
        let mut policy = Policy::new(100, cap);
        let down = offline("connection refused");
        let fail = |p: &mut Policy| {
            p.decide(Outcome::Failed { call: Call::PostPassings, error: &down, sent: 5, passing_id: None }, 0.999)
        };
        let mut ceilings = Vec::new();
        for i in 0..8 {
            let d = fail(&mut policy);
            assert_eq!(d.say, Say::Failure { loud: i == 0 }, "only the first failure is said loudly");
            let Next::Retry(delay) = d.next else { panic!("{d:?}") };
            ceilings.push(delay.as_millis().div_ceil(100) * 100);
        }
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
        // Full jitter: a sample of 0 retries at once.
        let Next::Retry(zero) = policy
            .decide(Outcome::Failed { call: Call::PostPassings, error: &down, sent: 5, passing_id: None }, 0.0)
            .next
        else {
            panic!()
        };
        assert_eq!(zero, Duration::ZERO);
        let d = policy.decide(Outcome::Done { sent: 5 }, 0.5);
        assert_eq!(d, Decision { next: Next::Go, say: Say::BackOnline { after_failures: 9 } });
        assert_eq!(policy.state(), UplinkState::Online);
        let Next::Retry(after_reset) = fail(&mut policy).next else { panic!() };
        assert!(after_reset <= BACKOFF_BASE, "{after_reset:?}");
    }

    #[test]
    fn a_refused_key_waits_until_a_reload() {
        let mut policy = Policy::new(100, CAP);
        let key = ApiError::Config { status: 403, description: "refused".into() };
        for _ in 0..3 {
            let d = policy
                .decide(Outcome::Failed { call: Call::CreateSession, error: &key, sent: 0, passing_id: None }, 0.5);
            // Said every time: it needs a person.
            assert_eq!(d, Decision { next: Next::Retry(CONFIG_RETRY), say: Say::Failure { loud: true } });
        }
        // Idle does not hide it.
        policy.decide(Outcome::Idle { unrecorded: false }, 0.5);
        assert_eq!(policy.state(), UplinkState::AuthFailed);
        policy.reload(50, CAP);
        assert_eq!(policy.state(), UplinkState::Idle);
        assert_eq!(policy.limit(), 50);
        // A cap above a minute stretches the configuration pause too.
        let mut slow = Policy::new(100, Duration::from_secs(600));
        for _ in 0..12 {
            slow.decide(
                Outcome::Failed { call: Call::PostPassings, error: &offline("x"), sent: 1, passing_id: None },
                0.5,
            );
        }
        let d = slow.decide(Outcome::Failed { call: Call::PostPassings, error: &key, sent: 1, passing_id: None }, 0.5);
        assert_eq!(d.next, Next::Retry(Duration::from_secs(600)));
    }

    #[test]
    fn idle_is_online_once_something_was_delivered() {
        let mut policy = Policy::new(100, CAP);
        assert_eq!(policy.decide(Outcome::Idle { unrecorded: false }, 0.5).next, Next::Sleep(IDLE_RECHECK));
        assert_eq!(policy.state(), UplinkState::Idle);
        policy.decide(Outcome::Done { sent: 1 }, 0.5);
        assert_eq!(policy.decide(Outcome::Idle { unrecorded: true }, 0.5).next, Next::Sleep(STORE_RETRY));
        assert_eq!(policy.state(), UplinkState::Online);
        // An offline spell ends as idle-but-online once the queue is empty and a request passed.
        policy
            .decide(Outcome::Failed { call: Call::PostPassings, error: &offline("x"), sent: 3, passing_id: None }, 0.5);
        assert_eq!(policy.state(), UplinkState::Offline);
        policy.decide(Outcome::Idle { unrecorded: false }, 0.5);
        assert_eq!(policy.state(), UplinkState::Online);
    }
}
