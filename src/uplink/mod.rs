//! The uplink actor: replays the store to the RUFUS API in order, one request at a time.
//!
//! It holds nothing the store has not committed: each step reads the next piece of work from
//! SQLite (create the oldest unfinished session → send its pending passings in `num_passing`
//! order → close it), performs it, and asks the store to record the outcome. A crash anywhere
//! repeats at most the request in flight, with the same `num_passing` values (idempotent).

pub mod api;
pub mod backoff;
mod status;

pub use status::{UplinkState, UplinkStatus};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{ApiConfig, Config};
use crate::store::query::{Db, Outgoing, Work};
use crate::store::{Op, StoreHandle};
use api::{ApiError, RufusClient, short_token};
use backoff::Backoff;

const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// A wrong key or device will not fix itself quickly: retry slowly, never hammer.
const CONFIG_RETRY: Duration = Duration::from_secs(60);
/// Added to every promised wait before the watchdog counts the uplink as stuck.
const LIVENESS_SLACK: Duration = Duration::from_secs(10);
/// After the database refused to record an outcome.
const STORE_RETRY: Duration = Duration::from_secs(2);
/// Even with nothing signalled, look at the store this often (belt and braces).
const IDLE_RECHECK: Duration = Duration::from_secs(30);

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
    backoff: Backoff,
    /// The read-side connection (used from blocking threads), with the writer's generation it
    /// was opened at: reopened when the writer reopens the database.
    db: Arc<Mutex<Option<(u64, Db)>>>,
    /// The next piece of work, read (and a batch encoded) while the previous request was in flight.
    prefetched: Option<Prefetched>,
    /// The last (session, num_passing) delivered: the next batch starts after it.
    sent: Option<(i64, String, i64)>,
    /// Deliveries the store could not record yet (disk full, read-only storage), as
    /// (session, first, last): recorded again later, never resent (the cursor is past them).
    unrecorded: Vec<Delivery>,
    /// Deliveries submitted to the store whose outcome has not been looked at: checked without
    /// waiting at the top of the loop, so a batch costs the store no wake-up of this task.
    recording: std::collections::VecDeque<(Delivery, oneshot::Receiver<crate::store::Reply>)>,
    /// The writer's generation the cursor belongs to: a reopened database is read from the start.
    generation: u64,
    /// Unrecorded deliveries are offered to the store again no sooner than this.
    record_retry_at: tokio::time::Instant,
}

/// Passings `first..=last` of a session, delivered under its remote token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Delivery {
    session_id: i64,
    first: i64,
    last: i64,
    token: String,
}

/// Work read ahead on a blocking thread; a batch with nothing held for the clock comes encoded,
/// so the request that follows an accepted one goes out at once.
struct Prefetched {
    work: Work,
    body: Option<Vec<u8>>,
}

/// What one step did, for the loop's bookkeeping.
enum Step {
    Done,
    Idle,
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
            backoff: Backoff::new(BACKOFF_BASE, cfg.api.retry_max_delay),
            sent: None,
            unrecorded: Vec::new(),
            recording: std::collections::VecDeque::new(),
            generation: 0,
            record_retry_at: tokio::time::Instant::now(),
            db: Arc::default(),
            prefetched: None,
        })
    }

    pub async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut limit = self.batch_size;
        let mut failing = false;
        let mut queue_failing = false;
        while !cancel.is_cancelled() {
            // A request takes at most the timeout (plus a store write); waits promise their own time.
            self.live.beat(self.timeout + LIVENESS_SLACK);
            if self.api.has_changed().unwrap_or(false) {
                let api = self.api.borrow_and_update().clone();
                self.apply(&api)?;
                limit = self.batch_size;
                self.update(|s| {
                    if s.state == UplinkState::AuthFailed {
                        s.state = UplinkState::Idle;
                    }
                });
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
                None => self.query(limit, self.sent.clone(), false).await?,
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
            let sent = match &work {
                Work::Send { passings, .. } => passings.len(),
                _ => 0,
            };
            match self.step(work, body).await {
                Ok(Step::Idle) => {
                    self.update(|s| {
                        if s.state != UplinkState::AuthFailed {
                            s.state = if s.requests_ok > 0 { UplinkState::Online } else { UplinkState::Idle };
                        }
                    });
                    // Deliveries waiting to be recorded are offered again soon, not after a long idle.
                    let recheck = if self.has_unrecorded() { STORE_RETRY } else { IDLE_RECHECK };
                    self.live.beat(recheck + LIVENESS_SLACK);
                    tokio::select! {
                        _ = self.notify.notified() => {}
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(recheck) => {}
                    }
                }
                Ok(Step::Done) => {
                    if failing {
                        info!(after_failures = self.backoff.failures(), "uplink back online");
                    }
                    failing = false;
                    self.backoff.reset();
                    limit = self.batch_size;
                    let now = crate::clock::rfc3339(crate::clock::now_us());
                    self.update(|s| {
                        s.state = UplinkState::Online;
                        s.last_success_at = Some(now);
                        s.retry_at = None;
                        s.requests_ok += 1;
                    });
                }
                Err(Failure::Refused { session_id, passing_id, description }) => {
                    self.update(|s| s.requests_failed += 1);
                    if sent > 1 {
                        // Halve until the refused passing is alone; the rest flows meanwhile.
                        limit = sent.div_ceil(2);
                        debug!(batch = sent, next = limit, "batch refused; splitting");
                    } else if let Some(id) = passing_id {
                        warn!(session_id, passing_id = id, reason = %description, "passing refused by the API; marked undeliverable");
                        match self
                            .store
                            .call(Op::Undeliverable { session_id, passing_id: id, reason: description })
                            .await
                        {
                            Ok(_) => limit = self.batch_size,
                            Err(e) => self.store_failed(e.into(), &cancel).await?,
                        }
                    }
                }
                Err(Failure::Api(e)) => {
                    self.update(|s| s.requests_failed += 1);
                    let (state, delay) = match &e {
                        ApiError::Config { .. } => (UplinkState::AuthFailed, CONFIG_RETRY.max(self.backoff.ceiling())),
                        ApiError::Transient { offline, retry_after, .. } => {
                            let jitter = self.backoff.next_delay(fastrand::f64());
                            let delay = retry_after.map_or(jitter, |r| r.max(jitter));
                            (if *offline { UplinkState::Offline } else { UplinkState::BackingOff }, delay)
                        }
                        _ => (UplinkState::BackingOff, self.backoff.next_delay(fastrand::f64())),
                    };
                    let text = e.to_string();
                    if !failing || state == UplinkState::AuthFailed {
                        warn!(error = %text, kind = e.kind(), retry_in_ms = delay.as_millis() as u64, "uplink request failed; retrying");
                    } else {
                        debug!(error = %text, kind = e.kind(), retry_in_ms = delay.as_millis() as u64, "uplink request failed again");
                    }
                    failing = true;
                    let now = crate::clock::now_us();
                    self.update(|s| {
                        s.state = state;
                        s.last_error = Some(text);
                        s.last_error_at = Some(crate::clock::rfc3339(now));
                        s.retry_at = Some(crate::clock::rfc3339(now + delay.as_micros() as i64));
                    });
                    self.wait(delay, &cancel).await;
                }
                Err(Failure::Store(e)) => self.store_failed(e, &cancel).await?,
            }
        }
        // The store answers what it was given before it stops (it outlives the uplink).
        while let Some((range, rx)) = self.recording.pop_front() {
            if !matches!(tokio::time::timeout(STORE_RETRY, rx).await, Ok(Ok(Ok(_)))) {
                self.unrecorded.push(range);
            }
        }
        let unrecorded = self.unrecorded.len();
        if unrecorded > 0 {
            warn!(
                batches = unrecorded,
                "stopping with deliveries the database could not record; they are sent again at the next start (same numbers: the API counts them as duplicates)"
            );
        }
        info!("uplink stopped");
        Ok(())
    }

    async fn step(&mut self, work: Work, body: Option<Vec<u8>>) -> Result<Step, Failure> {
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
                    Err(e @ ApiError::Transient { offline: true, .. }) => return Err(e.into()),
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
                    None => self.client.create_session(&self.deviceid, &alias).await?,
                };
                info!(session_id, alias = %alias, token = %short_token(&token), "remote session created");
                self.store.call(Op::RemoteOpened { session_id, token }).await?;
                Ok(Step::Done)
            }
            Work::Send { session_id, token, passings } => {
                let first = passings.first().map(|p| p.num_passing).unwrap_or(0);
                let last = passings.last().map(|p| p.num_passing).unwrap_or(0);
                // Read the batch after this one while the request is in flight (used only if
                // this one is accepted): the database round trip overlaps the network's.
                let next = self.spawn_query(self.batch_size, Some((session_id, token.clone(), last)), true);
                let body = body.unwrap_or_else(|| api::batch_body(&token, &passings));
                match self.client.post_passings(body).await {
                    Ok(reply) => {
                        if let Ok(Ok(Ok(ahead))) = next.await {
                            self.prefetched = Some(ahead);
                        }
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
                        self.record_delivered(Delivery { session_id, first, last, token: token.clone() });
                        self.sent = Some((session_id, token.clone(), last));
                        Ok(Step::Done)
                    }
                    Err(ApiError::Refused { description, .. }) => Err(Failure::Refused {
                        session_id,
                        passing_id: (passings.len() == 1).then(|| passings[0].id),
                        description,
                    }),
                    Err(ApiError::SessionGone { description, .. }) => {
                        error!(
                            session_id, from_num = first, reason = %description,
                            "REMOTE SESSION CLOSED: the API no longer accepts this session's passings; they are kept. Export them, or run `rufus-gateway session resend` to send them in a new session"
                        );
                        self.store.call(Op::ClosedRemotely { session_id, reason: description }).await?;
                        Ok(Step::Done)
                    }
                    Err(e) => Err(Failure::Api(e)),
                }
            }
            Work::Close { session_id, token } => {
                match self.client.close_session(&token).await {
                    Ok(()) => info!(session_id, "remote session closed"),
                    // Already closed remotely: the goal is reached.
                    Err(ApiError::SessionGone { .. }) => info!(session_id, "remote session was already closed"),
                    Err(e) => return Err(Failure::Api(e)),
                }
                self.store.call(Op::RemoteClosed { session_id }).await?;
                Ok(Step::Done)
            }
        }
    }

    /// Read the next piece of work on a blocking thread; with `encode`, a batch that can go as
    /// it is (nothing held for the clock) is encoded there too.
    fn spawn_query(
        &self,
        limit: usize,
        sent: Option<(i64, String, i64)>,
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
            Ok(db.next_work(limit, sent.as_ref().map(|(s, t, n)| (*s, t.as_str(), *n))).map(|work| {
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
        sent: Option<(i64, String, i64)>,
        encode: bool,
    ) -> anyhow::Result<rusqlite::Result<Prefetched>> {
        self.spawn_query(limit, sent, encode).await?
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
            Ok(rx) => self.recording.push_back((d, rx)),
            Err(_) => self.unrecorded.push(d),
        }
    }

    /// Look at the outcomes the store has given so far, in order, without waiting.
    fn collect_records(&mut self) {
        while let Some((range, rx)) = self.recording.front_mut() {
            let recorded = match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return,
                Ok(Ok(_)) => true,
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => false,
            };
            let range = range.clone();
            self.recording.pop_front();
            if !recorded {
                if self.unrecorded.is_empty() {
                    let Delivery { session_id, first, last, .. } = range;
                    warn!(
                        session_id,
                        first,
                        last,
                        "a delivery could not be recorded in the database; recording it again later (nothing is resent meanwhile)"
                    );
                }
                self.unrecorded.push(range);
            }
        }
    }

    fn has_unrecorded(&self) -> bool {
        !self.unrecorded.is_empty() || !self.recording.is_empty()
    }

    /// Offer the store the deliveries it could not record, merged into as few ranges as possible.
    fn retry_unrecorded(&mut self) {
        let now = tokio::time::Instant::now();
        if now < self.record_retry_at || self.unrecorded.is_empty() {
            return;
        }
        self.record_retry_at = now + STORE_RETRY;
        let mut ranges = std::mem::take(&mut self.unrecorded);
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
        debug!(ranges = merged.len(), "recording earlier deliveries again");
        for d in merged {
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
        self.backoff = Backoff::new(BACKOFF_BASE, api.retry_max_delay);
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

enum Failure {
    Api(ApiError),
    Refused { session_id: i64, passing_id: Option<i64>, description: String },
    Store(anyhow::Error),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Store(e)
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Failure::Store(e.into())
    }
}
