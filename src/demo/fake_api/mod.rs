//! An in-process stand-in for the RUFUS Cloud API on loopback, for the demo and the tests.
//!
//! It keeps sessions and passings the way the real service is documented to (one active session
//! per device; a new session closes the other; resent `num_passing` values count as duplicates),
//! checks every request strictly (no unlisted field, the timestamp format). In test builds it can
//! be scripted to misbehave (`faults.rs`): fail with a status, drop the connection before or after
//! committing, hang, refuse a chip, close a session on its own; any build can stop listening.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[cfg(any(test, feature = "test-support"))]
mod faults;
#[cfg(any(test, feature = "test-support"))]
pub use faults::{Fault, RequestLog};

/// Which requests a call (and, in test builds, a scripted fault) is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Any route but `ActiveSession` (a look-up the gateway makes before creating a session).
    Any,
    ActiveSession,
    CreateSession,
    Passings,
    CloseSession,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePassing {
    pub bib: String,
    pub chip: Option<String>,
    pub timestamp: String,
    /// When the fake received it first.
    pub received_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone)]
pub struct FakeSession {
    pub token: String,
    pub deviceid: String,
    pub alias: String,
    pub active: bool,
    pub passings: BTreeMap<i64, FakePassing>,
    /// Passings received again with a `num_passing` the session already had.
    pub duplicates: u64,
    /// Duplicates whose content differed from the first copy (would be a gateway bug).
    pub conflicts: u64,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub api_key: String,
    pub envelope: bool,
    pub devices: BTreeMap<String, (String, String)>,
    pub sessions: Vec<FakeSession>,
    #[cfg(any(test, feature = "test-support"))]
    pub faults: std::collections::VecDeque<(Route, Fault)>,
    #[cfg(any(test, feature = "test-support"))]
    pub hang_all: bool,
    pub refused_chips: HashSet<String>,
    #[cfg(any(test, feature = "test-support"))]
    pub requests: Vec<RequestLog>,
    pub violations: Vec<String>,
}

impl FakeState {
    pub fn total_passings(&self) -> usize {
        self.sessions.iter().map(|s| s.passings.len()).sum()
    }
}

/// A running fake. Dropping it stops the server.
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    stop: Mutex<CancellationToken>,
}

pub const FAKE_KEY: &str = "ror-0123456789abcdef0123";

impl FakeApi {
    /// Start on `127.0.0.1:0` with one bound device; returns the fake and that device's id.
    pub async fn start() -> anyhow::Result<(FakeApi, String)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(FakeState { api_key: FAKE_KEY.into(), ..Default::default() }));
        let deviceid = hex_id(&format!("device-{addr}"));
        state.lock().unwrap().devices.insert(deviceid.clone(), ("SIM".into(), "0001".into()));
        let fake = FakeApi { addr, state, stop: Mutex::new(CancellationToken::new()) };
        fake.serve(listener);
        Ok((fake, deviceid))
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v0", self.addr)
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop listening: new connections are refused until `resume`.
    pub fn stop_listening(&self) {
        self.stop.lock().unwrap().cancel();
    }

    /// Listen again on the same address.
    pub async fn resume(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        *self.stop.lock().unwrap() = CancellationToken::new();
        self.serve(listener);
        Ok(())
    }

    /// Wait until `cond` holds, polling the state, or fail after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&FakeState) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(&self.state()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!("timed out after {timeout:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn serve(&self, listener: TcpListener) {
        let stop = self.stop.lock().unwrap().clone();
        let app = Router::new()
            .route("/v0/devices", post(bind_device))
            .route("/v0/sessions", post(create_session))
            .route("/v0/sessions/device/{deviceid}/active", get(active_session))
            .route("/v0/sessions/close/{token}", patch(close_session))
            .route("/v0/passings", post(insert_passings))
            .with_state(self.state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        });
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

type Shared = State<Arc<Mutex<FakeState>>>;

fn lock(state: &Arc<Mutex<FakeState>>) -> MutexGuard<'_, FakeState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A 64-hex-character id, as the API's examples show.
fn hex_id(seed: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..4 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(seed.as_bytes());
        h.write_u32(i);
        out.push_str(&format!("{:016X}", h.finish()));
    }
    out
}

fn reply(state: &FakeState, status: StatusCode, body: Value) -> Response {
    let body = if state.envelope { json!({ "body": body }) } else { body };
    (status, axum::Json(body)).into_response()
}

/// A response whose body fails mid-way: the client sees the connection die.
fn dropped() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("dropped by the fake"))
    });
    Response::builder().status(200).body(Body::from_stream(stream)).unwrap()
}

/// Common prologue: the scripted faults (in test builds), then authentication. `Err` is the
/// response to give now; `Ok(true)`: do the work, then drop the connection (the lost reply).
async fn prologue(
    shared: &Arc<Mutex<FakeState>>,
    headers: &HeaderMap,
    route: Route,
    method: &'static str,
    path: String,
    batch: usize,
) -> Result<bool, Response> {
    #[cfg(any(test, feature = "test-support"))]
    let scripted = faults::scripted(shared, route, method, &path, batch).await?;
    #[cfg(not(any(test, feature = "test-support")))]
    let _ = (route, method, path, batch);
    let key_ok = headers.get("api_key").and_then(|v| v.to_str().ok()) == Some(lock(shared).api_key.as_str());
    if !key_ok {
        #[cfg(any(test, feature = "test-support"))]
        faults::log(shared, method, &path, 403, batch);
        return Err(reply(
            &lock(shared),
            StatusCode::FORBIDDEN,
            json!({ "description": "Forbidden: invalid api key" }),
        ));
    }
    #[cfg(any(test, feature = "test-support"))]
    return Ok(scripted.finish(shared, method, &path, batch));
    #[cfg(not(any(test, feature = "test-support")))]
    Ok(false)
}

fn check_fields(obj: &Value, allowed: &[&str], what: &str, violations: &mut Vec<String>) -> bool {
    let Some(map) = obj.as_object() else {
        violations.push(format!("{what}: not an object"));
        return false;
    };
    let extra: Vec<_> = map.keys().filter(|k| !allowed.contains(&k.as_str())).cloned().collect();
    if !extra.is_empty() {
        violations.push(format!("{what}: unlisted fields {extra:?}"));
        return false;
    }
    true
}

async fn bind_device(State(shared): Shared, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    if let Err(r) = prologue(&shared, &headers, Route::Any, "POST", "/devices".into(), 0).await {
        return r;
    }
    let mut s = lock(&shared);
    let mut v = std::mem::take(&mut s.violations);
    let ok = check_fields(&body, &["model", "serial_number", "type", "alias", "firmware"], "POST /devices", &mut v);
    s.violations = v;
    let (Some(model), Some(serial)) = (body["model"].as_str(), body["serial_number"].as_str()) else {
        return reply(&s, StatusCode::BAD_REQUEST, json!({ "description": "Missing parameters" }));
    };
    if !ok || body.get("type").is_none() {
        return reply(&s, StatusCode::BAD_REQUEST, json!({ "description": "Invalid parameters" }));
    }
    if let Some(existing) = s.devices.iter().find(|(_, (_, sn))| sn == serial).map(|(id, _)| id.clone()) {
        return reply(
            &s,
            StatusCode::CONFLICT,
            json!({ "description": "Device already binded", "deviceid": existing }),
        );
    }
    let id = hex_id(&format!("{model}/{serial}"));
    s.devices.insert(id.clone(), (model.into(), serial.into()));
    reply(&s, StatusCode::OK, json!({ "description": "Device binded succesfully", "deviceid": id }))
}

/// The documented shape: `result` an array of at most one session; "Sessions not found" without.
async fn active_session(State(shared): Shared, headers: HeaderMap, Path(deviceid): Path<String>) -> Response {
    let path = format!("/sessions/device/{deviceid}/active");
    let lose_reply = match prologue(&shared, &headers, Route::ActiveSession, "GET", path, 0).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let s = lock(&shared);
    if lose_reply {
        return dropped();
    }
    match s.sessions.iter().find(|x| x.deviceid == deviceid && x.active) {
        Some(active) => reply(
            &s,
            StatusCode::OK,
            json!({ "description": "Success", "result": [{
                "token_session": active.token,
                "alias": active.alias,
                "active": true,
                "passings": active.passings.len(),
            }] }),
        ),
        None => reply(&s, StatusCode::NOT_FOUND, json!({ "description": "Sessions not found", "deviceid": deviceid })),
    }
}

async fn create_session(State(shared): Shared, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    let lose_reply = match prologue(&shared, &headers, Route::CreateSession, "POST", "/sessions".into(), 0).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let mut s = lock(&shared);
    let mut v = std::mem::take(&mut s.violations);
    let ok = check_fields(&body, &["deviceid", "alias"], "POST /sessions", &mut v);
    s.violations = v;
    let Some(deviceid) = body["deviceid"].as_str().filter(|_| ok) else {
        return reply(&s, StatusCode::BAD_REQUEST, json!({ "description": "Missing parameters" }));
    };
    if !s.devices.contains_key(deviceid) {
        return reply(&s, StatusCode::NOT_FOUND, json!({ "description": "Device not found", "deviceid": deviceid }));
    }
    let token = hex_id(&format!("{deviceid}/{}", s.sessions.len()));
    for other in s.sessions.iter_mut().filter(|x| x.deviceid == deviceid) {
        other.active = false;
    }
    let alias = body["alias"].as_str().unwrap_or("").to_string();
    s.sessions.push(FakeSession {
        token: token.clone(),
        deviceid: deviceid.into(),
        alias,
        active: true,
        passings: BTreeMap::new(),
        duplicates: 0,
        conflicts: 0,
    });
    if lose_reply {
        return dropped();
    }
    reply(&s, StatusCode::OK, json!({ "description": "Session inserted succesfully", "token_session": token }))
}

async fn close_session(State(shared): Shared, headers: HeaderMap, Path(token): Path<String>) -> Response {
    let lose_reply = match prologue(&shared, &headers, Route::CloseSession, "PATCH", "/sessions/close".into(), 0).await
    {
        Ok(l) => l,
        Err(r) => return r,
    };
    let mut s = lock(&shared);
    let Some(session) = s.sessions.iter_mut().find(|x| x.token == token && x.active) else {
        return reply(&s, StatusCode::NOT_FOUND, json!({ "description": "Session not found", "token_session": token }));
    };
    session.active = false;
    if lose_reply {
        return dropped();
    }
    reply(&s, StatusCode::OK, json!({ "description": "Session closed succesfully", "token_session": token }))
}

fn valid_timestamp(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 24
        && b[23] == b'Z'
        && b[19] == b'.'
        && chrono::NaiveDateTime::parse_from_str(&t[..23], "%Y-%m-%dT%H:%M:%S%.3f").is_ok()
}

async fn insert_passings(State(shared): Shared, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    let batch = body["passings_list"].as_array().map_or(0, |l| l.len());
    let lose_reply = match prologue(&shared, &headers, Route::Passings, "POST", "/passings".into(), batch).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    let mut guard = lock(&shared);
    let s = &mut *guard;
    let mut ok = check_fields(&body, &["token_session", "passings_list"], "POST /passings", &mut s.violations);
    let list = body["passings_list"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        ok = false;
        s.violations.push("POST /passings: empty passings_list".into());
    }
    let allowed = [
        "bib",
        "num_passing",
        "timestamp",
        "chip",
        "latitude",
        "longitude",
        "status",
        "participant_id",
        "timezone",
        "gender",
    ];
    for p in &list {
        ok &= check_fields(p, &allowed, "passing", &mut s.violations);
        let well_formed = p["bib"].is_string()
            && p["num_passing"].as_i64().is_some_and(|n| n >= 0)
            && p["timestamp"].as_str().is_some_and(valid_timestamp);
        if !well_formed {
            s.violations.push(format!("passing malformed: {p}"));
            ok = false;
        }
    }
    if !ok {
        return reply(s, StatusCode::BAD_REQUEST, json!({ "description": "Invalid parameters" }));
    }
    if list.iter().any(|p| p["chip"].as_str().is_some_and(|c| s.refused_chips.contains(c))) {
        #[cfg(any(test, feature = "test-support"))]
        faults::refused(s);
        return reply(s, StatusCode::BAD_REQUEST, json!({ "description": "Invalid passing" }));
    }
    let token = body["token_session"].as_str().unwrap_or("");
    let envelope = s.envelope;
    let Some(session) = s.sessions.iter_mut().find(|x| x.token == token && x.active) else {
        let body = json!({ "description": "Session not found or closed", "token_session": token });
        let body = if envelope { json!({ "body": body }) } else { body };
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    };
    let (mut inserted, mut duplicates) = (0u64, 0u64);
    let now = chrono::Utc::now();
    for p in &list {
        let num = p["num_passing"].as_i64().unwrap_or(-1);
        let incoming = FakePassing {
            bib: p["bib"].as_str().unwrap_or("").into(),
            chip: p["chip"].as_str().map(String::from),
            timestamp: p["timestamp"].as_str().unwrap_or("").into(),
            received_at: now,
        };
        match session.passings.get(&num) {
            Some(existing) => {
                duplicates += 1;
                if (&existing.bib, &existing.chip, &existing.timestamp)
                    != (&incoming.bib, &incoming.chip, &incoming.timestamp)
                {
                    session.conflicts += 1;
                }
            }
            None => {
                session.passings.insert(num, incoming);
                inserted += 1;
            }
        }
    }
    session.duplicates += duplicates;
    if lose_reply {
        return dropped();
    }
    reply(
        s,
        StatusCode::OK,
        json!({ "description": "Passings inserted succesfully", "token_session": token, "inserted_count": inserted, "duplicate_count": duplicates }),
    )
}
