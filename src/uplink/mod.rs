//! The uplink actor: replays the store to the RUFUS API in order, one request at a time.
//!
//! It holds nothing the store has not committed: each step reads the next piece of work from
//! SQLite (create the oldest unfinished session → send its pending passings in `num_passing`
//! order → close it), performs it, and asks the store to record the outcome. A crash anywhere
//! repeats at most the request in flight, with the same `num_passing` values (idempotent).

pub mod api;
pub mod backoff;
pub mod ledger;
pub mod policy;
mod status;

pub use status::{UplinkState, UplinkStatus};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{ApiConfig, Config};
use crate::store::query::{Cursor, Db, Outgoing, Work};
use crate::store::{Op, StoreHandle};
use api::{ApiError, Call, RufusClient, short_token};
use ledger::{Delivery, Ledger};
use policy::{Next, Outcome, Policy, STORE_RETRY, Say};

/// Added to every promised wait before the watchdog counts the uplink as stuck.
const LIVENESS_SLACK: Duration = Duration::from_secs(10);

pub struct Uplink {
    client: RufusClient,
    /// New `[api]` settings after a reload.
    api: watch::Receiver<ApiConfig>,
    db_path: PathBuf,
    deviceid: String,
    batch_size: usize,
    max_hold: Duration,
    boot_id: String,
    store: StoreHandle,
    notify: Arc<Notify>,
    status: Arc<Mutex<UplinkStatus>>,
    /// Proof of life for the watchdog.
    pub live: Arc<crate::liveness::Liveness>,
    timeout: Duration,
    /// What to do after each step (batch size, backoff, state).
    policy: Policy,
    /// The read-side connection (used from blocking threads), with the writer's generation it
    /// was opened at: reopened when the writer reopens the database.
    db: Arc<Mutex<Option<(u64, Db)>>>,
    /// The next piece of work, read (and a batch encoded) while the previous request was in flight.
    prefetched: Option<Prefetched>,
    /// The last passing delivered: the next batch starts after it.
    cursor: Option<Cursor>,
    /// Deliveries whose recording the store has not confirmed.
    ledger: Ledger,
    /// The writer's generation the cursor belongs to: a reopened database is read from the start.
    generation: u64,
}

/// Work read ahead on a blocking thread; a batch with nothing held for the clock comes encoded,
/// so the request that follows an accepted one goes out at once.
struct Prefetched {
    work: Work,
    body: Option<Vec<u8>>,
}

/// What one step did, when it did not fail.
enum Step {
    /// Accepted, with `sent` passings (0 for a session call).
    Done {
        sent: usize,
    },
    Idle,
}

/// Why a step did not end in `Done`.
enum Failure {
    /// The API answered otherwise (or not at all), about this session (and batch, from
    /// `first`, of `sent` passings; `passing_id` when one was alone): the policy decides.
    Api { call: Call, session_id: i64, first: i64, sent: usize, passing_id: Option<i64>, error: ApiError },
    /// The store could not record the outcome.
    Store(anyhow::Error),
}

/// The batch read ahead while a request was in flight, if it was read: a query thread that
/// failed, or a database that refused, leaves nothing, and the next batch is read the usual way.
async fn read_ahead(next: tokio::task::JoinHandle<anyhow::Result<rusqlite::Result<Prefetched>>>) -> Option<Prefetched> {
    next.await.ok()?.ok()?.ok()
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Failure::Store(e.into())
    }
}

impl Uplink {
    pub fn new(
        cfg: &Config,
        api: watch::Receiver<ApiConfig>,
        store: StoreHandle,
        notify: Arc<Notify>,
        status: Arc<Mutex<UplinkStatus>>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: RufusClient::new(&cfg.api)?,
            api,
            db_path: cfg.storage.path.clone(),
            deviceid: cfg.deviceid().to_string(),
            batch_size: cfg.api.batch_size,
            max_hold: cfg.clock.max_hold,
            boot_id: crate::clock::boot_id(),
            store,
            notify,
            status,
            live: Arc::default(),
            timeout: cfg.api.timeout,
            policy: Policy::new(cfg.api.batch_size, cfg.api.retry_max_delay),
            cursor: None,
            ledger: Ledger::default(),
            generation: 0,
            db: Arc::default(),
            prefetched: None,
        })
    }

    pub async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut queue_failing = false;
        while !cancel.is_cancelled() {
            // A request takes at most the timeout (plus a store write); waits promise their own time.
            self.live.beat(self.timeout + LIVENESS_SLACK);
            if self.api.has_changed().unwrap_or(false) {
                let api = self.api.borrow_and_update().clone();
                self.apply(&api)?;
                let state = self.policy.state();
                self.update(|s| s.state = state);
            }
            self.collect_records();
            self.retry_unrecorded();
            let generation = self.store.generation();
            if generation != self.generation {
                // The database was opened again (perhaps a different file): nothing read from the
                // old one is used. The cursor stays, as it names its session by token too.
                self.generation = generation;
                self.prefetched = None;
            }
            let work = match self.prefetched.take() {
                Some(ahead) => Ok(ahead),
                None => self.query(self.policy.limit(), self.cursor.clone(), false).await?,
            };
            let Prefetched { work, mut body } = match work {
                Ok(w) => {
                    if queue_failing {
                        info!("the queue can be read again");
                    }
                    queue_failing = false;
                    w
                }
                Err(e) => {
                    if !queue_failing {
                        error!(error = %e, "cannot read the queue from the database; retrying");
                    }
                    queue_failing = true;
                    self.prefetched = None;
                    self.wait(Duration::from_secs(1), &cancel).await;
                    continue;
                }
            };
            let work = match work {
                Work::Send { session_id, token, passings } => {
                    let read = passings.len();
                    match self.hold_for_clock(passings, &cancel).await? {
                        Some(passings) => {
                            if passings.len() != read {
                                body = None;
                            }
                            Work::Send { session_id, token, passings }
                        }
                        None => continue,
                    }
                }
                other => other,
            };
            let outcome = self.step(work, body).await;
            self.after(outcome, &cancel).await?;
        }
        // The store answers what it was given before it stops (it outlives the uplink).
        let unrecorded = self.ledger.settle(STORE_RETRY).await;
        if unrecorded > 0 {
            warn!(
                batches = unrecorded,
                "stopping with deliveries the database could not record; they are sent again at the next start (same numbers: the API counts them as duplicates)"
            );
        }
        info!("uplink stopped");
        Ok(())
    }

    /// Do what the policy decides after a step: go on, sleep, wait out a backoff, or record a
    /// refused passing or a session gone (which then counts as done).
    async fn after(&mut self, outcome: Result<Step, Failure>, cancel: &CancellationToken) -> anyhow::Result<()> {
        let (call, session_id, first, sent, passing_id, error) = match outcome {
            Ok(Step::Done { sent }) => return self.done(sent),
            Ok(Step::Idle) => {
                let decision = self.policy.decide(Outcome::Idle { unrecorded: self.ledger.is_pending() }, 0.0);
                let state = self.policy.state();
                self.update(|s| s.state = state);
                if let Next::Sleep(recheck) = decision.next {
                    self.live.beat(recheck + LIVENESS_SLACK);
                    tokio::select! {
                        _ = self.notify.notified() => {}
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(recheck) => {}
                    }
                }
                return Ok(());
            }
            Err(Failure::Store(e)) => return self.store_failed(e, cancel).await,
            Err(Failure::Api { call, session_id, first, sent, passing_id, error }) => {
                (call, session_id, first, sent, passing_id, error)
            }
        };
        let decision = self.policy.decide(Outcome::Failed { call, error: &error, sent, passing_id }, fastrand::f64());
        match decision.next {
            Next::Go => {
                self.update(|s| s.requests_failed += 1);
                if let Say::Split { batch, next } = decision.say {
                    debug!(batch, next, "batch refused; splitting");
                }
            }
            Next::Undeliverable(passing_id) => {
                self.update(|s| s.requests_failed += 1);
                let reason = match &error {
                    ApiError::Refused { description, .. } => description.clone(),
                    other => other.to_string(),
                };
                warn!(session_id, passing_id, reason = %reason, "passing refused by the API; marked undeliverable");
                match self.store.call(Op::Undeliverable { session_id, passing_id, reason }).await {
                    Ok(_) => self.policy.refusal_recorded(),
                    Err(e) => self.store_failed(e.into(), cancel).await?,
                }
            }
            Next::SessionGone { closing } => {
                let description = match &error {
                    ApiError::SessionGone { description, .. } => description.clone(),
                    other => other.to_string(),
                };
                let recorded = if closing {
                    info!(session_id, "remote session was already closed");
                    self.store.call(Op::RemoteClosed { session_id }).await
                } else {
                    error!(
                        session_id, from_num = first, reason = %description,
                        "REMOTE SESSION CLOSED: the API no longer accepts this session's passings; they are kept. Export them, or run `rufus-gateway session resend` to send them in a new session"
                    );
                    self.store.call(Op::ClosedRemotely { session_id, reason: description }).await
                };
                match recorded {
                    Ok(_) => {
                        self.policy.refusal_recorded();
                        self.done(0)?
                    }
                    Err(e) => self.store_failed(e.into(), cancel).await?,
                }
            }
            Next::Retry(delay) => {
                let text = error.to_string();
                let loud = matches!(decision.say, Say::Failure { loud: true });
                if loud {
                    warn!(error = %text, kind = error.kind(), retry_in_ms = delay.as_millis() as u64, "uplink request failed; retrying");
                } else {
                    debug!(error = %text, kind = error.kind(), retry_in_ms = delay.as_millis() as u64, "uplink request failed again");
                }
                let now = crate::clock::now_us();
                let state = self.policy.state();
                self.update(|s| {
                    s.requests_failed += 1;
                    s.state = state;
                    s.last_error = Some(text);
                    s.last_error_at = Some(crate::clock::rfc3339(now));
                    s.retry_at = Some(crate::clock::rfc3339(now + delay.as_micros() as i64));
                });
                self.wait(delay, cancel).await;
            }
            Next::Sleep(_) => {}
        }
        Ok(())
    }

    /// A request with `sent` passings was accepted (or its effect recorded).
    fn done(&mut self, sent: usize) -> anyhow::Result<()> {
        if let Say::BackOnline { after_failures } = self.policy.decide(Outcome::Done { sent }, 0.0).say {
            info!(after_failures, "uplink back online");
        }
        let now = crate::clock::rfc3339(crate::clock::now_us());
        self.update(|s| {
            s.state = UplinkState::Online;
            s.last_success_at = Some(now);
            s.retry_at = None;
            s.requests_ok += 1;
        });
        Ok(())
    }

    async fn step(&mut self, work: Work, body: Option<Vec<u8>>) -> Result<Step, Failure> {
        let failed =
            |call, session_id, error| Failure::Api { call, session_id, first: 0, sent: 0, passing_id: None, error };
        match work {
            Work::Idle => Ok(Step::Idle),
            Work::Create { session_id, alias } => {
                // A create whose reply was lost (the link dropped, or the gateway died before
                // storing the token) made the session all the same; creating again would leave
                // an empty twin. The device's active session is that one when it has this alias
                // and no passings yet (a new session is made only once the one before is closed
                // remotely, so no other of ours can be active).
                let adopted = match self.client.active_session(&self.deviceid).await {
                    Ok(Some(active)) if active.alias == alias && active.passings == Some(0) => Some(active.token),
                    Ok(_) => None,
                    // Offline: the create would fail the same way; retry both later.
                    Err(e @ ApiError::Transient { offline: true, .. }) => {
                        return Err(failed(Call::ActiveSession, session_id, e));
                    }
                    // The key may not read (a WRITE-only key), or the call is unknown: create.
                    Err(e) => {
                        debug!(error = %e, "cannot ask for the device's active session; creating one");
                        None
                    }
                };
                let token = match adopted {
                    Some(token) => {
                        info!(session_id, alias = %alias, token = %short_token(&token), "remote session taken over: made by an earlier attempt whose reply was lost");
                        token
                    }
                    None => self
                        .client
                        .create_session(&self.deviceid, &alias)
                        .await
                        .map_err(|e| failed(Call::CreateSession, session_id, e))?,
                };
                info!(session_id, alias = %alias, token = %short_token(&token), "remote session created");
                self.store.call(Op::RemoteOpened { session_id, token }).await?;
                Ok(Step::Done { sent: 0 })
            }
            Work::Send { session_id, token, passings } => {
                let first = passings.first().map(|p| p.num_passing).unwrap_or(0);
                let last = passings.last().map(|p| p.num_passing).unwrap_or(0);
                let cursor = Cursor { session_id, token, last };
                // Read the batch after this one while the request is in flight (used only if
                // this one is accepted): the database round trip overlaps the network's.
                let next = self.spawn_query(self.policy.limit_if_accepted(passings.len()), Some(cursor.clone()), true);
                let body = body.unwrap_or_else(|| api::batch_body(&cursor.token, &passings));
                match self.client.post_passings(body).await {
                    Ok(reply) => {
                        self.prefetched = read_ahead(next).await;
                        let duplicates = reply.duplicates.unwrap_or(0);
                        debug!(session_id, first, last, inserted = reply.inserted, duplicates, "passings delivered");
                        if duplicates > 0 {
                            info!(
                                session_id,
                                first,
                                last,
                                duplicates,
                                "server already had some passings (a resend after a lost reply)"
                            );
                            self.update(|s| s.duplicates_reported += duplicates);
                        }
                        // Recorded without waiting: the next batch starts after this one (the
                        // cursor), so the commit's fsync overlaps the next request.
                        self.record_delivered(Delivery { session_id, first, last, token: cursor.token.clone() });
                        self.cursor = Some(cursor);
                        Ok(Step::Done { sent: passings.len() })
                    }
                    Err(error) => Err(Failure::Api {
                        call: Call::PostPassings,
                        session_id,
                        first,
                        sent: passings.len(),
                        passing_id: (passings.len() == 1).then(|| passings[0].id),
                        error,
                    }),
                }
            }
            Work::Close { session_id, token } => {
                self.client.close_session(&token).await.map_err(|e| failed(Call::CloseSession, session_id, e))?;
                info!(session_id, "remote session closed");
                self.store.call(Op::RemoteClosed { session_id }).await?;
                Ok(Step::Done { sent: 0 })
            }
        }
    }

    /// Read the next piece of work on a blocking thread; with `encode`, a batch that can go as
    /// it is (nothing held for the clock) is encoded there too.
    fn spawn_query(
        &self,
        limit: usize,
        cursor: Option<Cursor>,
        encode: bool,
    ) -> tokio::task::JoinHandle<anyhow::Result<rusqlite::Result<Prefetched>>> {
        let (db, path, generation) = (self.db.clone(), self.db_path.clone(), self.store.generation());
        tokio::task::spawn_blocking(move || {
            let mut db = db.lock().map_err(|_| anyhow::anyhow!("database lock poisoned"))?;
            if db.as_ref().is_none_or(|(g, _)| *g != generation) {
                *db = None;
                match Db::open_readonly(&path) {
                    Ok(opened) => *db = Some((generation, opened)),
                    Err(e) => return Ok(Err(e)),
                }
            }
            let (_, db) = db.as_ref().expect("opened above");
            Ok(db.next_work(limit, cursor.as_ref()).map(|work| {
                let body = match &work {
                    Work::Send { token, passings, .. } if encode && passings.iter().all(|p| p.held.is_none()) => {
                        Some(api::batch_body(token, passings))
                    }
                    _ => None,
                };
                Prefetched { work, body }
            }))
        })
    }

    async fn query(
        &self,
        limit: usize,
        cursor: Option<Cursor>,
        encode: bool,
    ) -> anyhow::Result<rusqlite::Result<Prefetched>> {
        self.spawn_query(limit, cursor, encode).await?
    }

    /// Passings stamped by the host before its clock synchronised wait (in order, so everything
    /// behind them waits too) until the store corrects them, at most `clock.max_hold`; then they
    /// go as they are, with a warning. Returns what may be sent now, or None to look again.
    async fn hold_for_clock(
        &mut self,
        mut passings: Vec<Outgoing>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<Outgoing>>> {
        match passings.iter().position(|p| p.held.is_some()) {
            None => return Ok(Some(passings)),
            Some(i) if i > 0 => {
                passings.truncate(i);
                return Ok(Some(passings));
            }
            Some(_) => {}
        }
        let now = crate::clock::monotonic_us();
        let max_hold = self.max_hold.as_micros() as i64;
        // Another boot's monotonic time cannot be related to this one: it will never be corrected.
        let expired =
            |p: &Outgoing| p.held.as_ref().is_some_and(|(boot, mono)| *boot != self.boot_id || now - mono >= max_hold);
        let release: Vec<i64> = passings.iter().take_while(|p| expired(p)).map(|p| p.id).collect();
        if !release.is_empty() {
            warn!(
                count = release.len(),
                max_hold_s = self.max_hold.as_secs(),
                "clock not synchronised in time (clock.max_hold): sending passings with uncorrected host timestamps"
            );
            if let Err(e) = self.store.call(Op::ReleaseUnsynced { passing_ids: release }).await {
                self.store_failed(e.into(), cancel).await?;
            }
            return Ok(None);
        }
        let (_, mono) = passings[0].held.clone().unwrap_or_default();
        let wait = Duration::from_micros((mono + max_hold - now).max(0) as u64);
        debug!(wait_s = wait.as_secs(), "holding passings until the clock synchronises");
        self.live.beat(wait + LIVENESS_SLACK);
        tokio::select! {
            _ = self.notify.notified() => {}
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        Ok(None)
    }

    /// Record a delivery without waiting for the store: it applies changes in order, so this
    /// lands before anything the uplink asks for next. If the write fails (disk full, read-only
    /// storage), the range is kept and offered again later; the server already has it.
    fn record_delivered(&mut self, d: Delivery) {
        let op = Op::Delivered { session_id: d.session_id, token: d.token.clone(), first: d.first, last: d.last };
        match self.store.submit(op) {
            Ok(rx) => self.ledger.submitted(d, rx),
            Err(_) => self.ledger.unrecorded(d),
        }
    }

    /// Look at the outcomes the store has given so far, in order, without waiting.
    fn collect_records(&mut self) {
        if let Some(Delivery { session_id, first, last, .. }) = self.ledger.collect() {
            warn!(
                session_id,
                first,
                last,
                "a delivery could not be recorded in the database; recording it again later (nothing is resent meanwhile)"
            );
        }
    }

    /// Offer the store the deliveries it could not record, merged into as few ranges as possible.
    fn retry_unrecorded(&mut self) {
        let due = self.ledger.due(tokio::time::Instant::now(), STORE_RETRY);
        if !due.is_empty() {
            debug!(ranges = due.len(), "recording earlier deliveries again");
        }
        for d in due {
            self.record_delivered(d);
        }
    }

    /// The outcome could not be recorded (disk full, read-only storage): the request will simply be
    /// repeated later (same numbers, so harmless). Only a stopped store ends the uplink.
    async fn store_failed(&mut self, e: anyhow::Error, cancel: &CancellationToken) -> anyhow::Result<()> {
        if matches!(e.downcast_ref::<crate::store::StoreError>(), Some(crate::store::StoreError::Stopped)) {
            return Err(e);
        }
        warn!(error = %format!("{e:#}"), "cannot record the upload in the database; will repeat it");
        self.wait(STORE_RETRY, cancel).await;
        Ok(())
    }

    /// New `[api]` settings: a new client (key, URL, timeout), batch size, backoff cap.
    fn apply(&mut self, api: &ApiConfig) -> anyhow::Result<()> {
        self.client = RufusClient::new(api)?;
        self.timeout = api.timeout;
        self.deviceid = api.deviceid.clone().unwrap_or_default();
        self.batch_size = api.batch_size;
        self.policy.reload(api.batch_size, api.retry_max_delay);
        info!(batch_size = api.batch_size, "uplink settings reloaded; retrying now");
        Ok(())
    }

    fn update(&self, f: impl FnOnce(&mut UplinkStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Wait out a backoff; a reload (perhaps the fix) or cancellation ends it early.
    async fn wait(&mut self, delay: Duration, cancel: &CancellationToken) {
        self.live.beat(delay + LIVENESS_SLACK);
        let mut api = self.api.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => {}
            _ = api.changed() => {}
        }
    }
}
