//! The local web side (`[http] listen`): the dashboard page, its JSON API, session actions behind
//! a bearer token, and `/metrics` for Prometheus. Everything is served from the binary itself.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Secret;
use crate::status::{Status, StatusSource};
use crate::store::query::Db;
use crate::store::{Op, StoreHandle};

const DASHBOARD: &str = include_str!("dashboard/index.html");
/// Most passings one `/api/passings` answer carries (the page asks again for the rest).
const PASSINGS_PAGE: i64 = 500;

struct Shared {
    status: StatusSource,
    store: StoreHandle,
    token: Option<Secret>,
    default_alias: String,
}

pub struct HttpServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl HttpServer {
    /// Bind now (inside the runtime), so that readiness means the dashboard answers.
    pub fn bind(
        listen: &str,
        token: Option<Secret>,
        status: StatusSource,
        store: StoreHandle,
        default_alias: String,
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = listen.parse()?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        info!(listen = %listener.local_addr()?, "dashboard listening");
        Ok(Self { listener, shared: Arc::new(Shared { status, store, token, default_alias }) })
    }

    pub fn local_addr(&self) -> Option<String> {
        self.listener.local_addr().ok().map(|a| a.to_string())
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let app = Router::new()
            .route("/", get(page))
            .route("/api/status", get(status))
            .route("/api/passings", get(passings))
            .route("/api/reads-per-minute", get(reads_per_minute))
            .route("/api/session/start", post(session_start))
            .route("/api/session/close", post(session_close))
            .route("/metrics", get(metrics))
            .with_state(self.shared);
        axum::serve(self.listener, app).with_graceful_shutdown(async move { cancel.cancelled().await }).await?;
        Ok(())
    }
}

type AppState = State<Arc<Shared>>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn internal(e: anyhow::Error) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::HeaderName::from_static("content-security-policy"),
                "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
            ),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn snapshot(shared: &Shared) -> anyhow::Result<Status> {
    let source = shared.status.clone();
    tokio::task::spawn_blocking(move || source.snapshot()).await?
}

async fn status(State(shared): AppState) -> Response {
    match snapshot(&shared).await {
        Ok(s) => axum::Json(s).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: i64,
}

/// Passings of the open session (or the one closing) with `num_passing > since`.
async fn passings(State(shared): AppState, Query(q): Query<Since>) -> Response {
    let path = shared.status.db_path.clone();
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let db = Db::open_readonly(&path)?;
        let Some(session) = db.open_session()?.or(db.sessions()?.into_iter().rev().find(|s| s.state == "closing"))
        else {
            return Ok(json!({ "session": null, "passings": [] }));
        };
        let list = db.passings_since(session.id, q.since, PASSINGS_PAGE)?;
        Ok(json!({ "session": session.id, "alias": session.alias, "passings": list }))
    })
    .await;
    match result {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e.into()),
    }
}

async fn reads_per_minute(State(shared): AppState) -> Response {
    let path = shared.status.db_path.clone();
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<i64>> {
        Ok(Db::open_readonly(&path)?.reads_per_minute(crate::clock::now_us(), 60)?)
    })
    .await;
    match result {
        Ok(Ok(v)) => axum::Json(json!({ "minutes": v })).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e.into()),
    }
}

/// Session actions need `Authorization: Bearer <http.token>`; without a configured token they
/// are refused altogether.
fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let Some(token) = &shared.token else {
        return Err((StatusCode::FORBIDDEN, "session actions are off: set http.token in the config"));
    };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => {
            warn!("session action refused: missing or wrong token");
            Err((StatusCode::UNAUTHORIZED, "wrong or missing token"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize, Default)]
struct StartBody {
    alias: Option<String>,
}

async fn session_start(State(shared): AppState, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err((code, message)) = authorize(&shared, &headers) {
        return error(code, message);
    }
    let body: StartBody = serde_json::from_slice(&body).unwrap_or_default();
    let alias = body.alias.filter(|a| !a.trim().is_empty()).unwrap_or_else(|| shared.default_alias.clone());
    match shared.store.call(Op::StartSession { alias: alias.clone() }).await {
        Ok(id) => {
            info!(session_id = id.unwrap_or_default(), alias = %alias, "session started from the dashboard");
            axum::Json(json!({ "id": id, "alias": alias })).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

async fn session_close(State(shared): AppState, headers: HeaderMap) -> Response {
    if let Err((code, message)) = authorize(&shared, &headers) {
        return error(code, message);
    }
    match shared.store.call(Op::CloseSession).await {
        Ok(id) => axum::Json(json!({ "id": id })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

async fn metrics(State(shared): AppState) -> Response {
    match snapshot(&shared).await {
        Ok(s) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render_metrics(&s)).into_response()
        }
        Err(e) => internal(e),
    }
}

/// The Prometheus text exposition format.
pub fn render_metrics(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let plain = |v: f64| vec![(String::new(), v)];
    metric("rufus_reads_total", "counter", "Tag reads parsed since start.", &plain(s.reader.reads_total as f64));
    let rejected: Vec<(String, f64)> =
        s.reader.rejected.iter().map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), *n as f64)).collect();
    metric("rufus_rejected_total", "counter", "Reader records rejected since start, by reason.", &rejected);
    metric(
        "rufus_reader_connected",
        "gauge",
        "1 when the reader port is open.",
        &plain(s.reader.connected as u8 as f64),
    );
    let q = &s.queue;
    let by_state =
        [("pending", q.pending), ("delivered", q.delivered), ("undeliverable", q.undeliverable), ("held", q.held)];
    let passings: Vec<(String, f64)> =
        by_state.iter().map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v as f64)).collect();
    metric(
        "rufus_passings",
        "gauge",
        "Passings in the store, by state (held: of remotely closed sessions).",
        &passings,
    );
    metric("rufus_queue_depth", "gauge", "Passings waiting to be sent.", &plain((q.pending - q.held) as f64));
    let oldest = q
        .oldest_pending_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(0.0);
    metric(
        "rufus_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest passing still waiting.",
        &plain(oldest.max(0.0)),
    );
    let u = &s.uplink;
    let requests = vec![
        ("{outcome=\"ok\"}".to_string(), u.requests_ok as f64),
        ("{outcome=\"failed\"}".to_string(), u.requests_failed as f64),
    ];
    metric("rufus_uplink_requests_total", "counter", "Requests to the RUFUS API, by outcome.", &requests);
    let states = ["idle", "online", "offline", "backing_off", "auth_failed"];
    let state: Vec<(String, f64)> =
        states.iter().map(|k| (format!("{{state=\"{k}\"}}"), (u.state.as_str() == *k) as u8 as f64)).collect();
    metric("rufus_uplink_state", "gauge", "1 for the uplink's current state.", &state);
    metric(
        "rufus_clock_synchronized",
        "gauge",
        "1 when the system clock is synchronised.",
        &plain(s.clock.synchronized as u8 as f64),
    );
    metric(
        "rufus_storage_buffered_reads",
        "gauge",
        "Reads held in memory because the database refuses writes.",
        &plain(s.storage.buffered_reads as f64),
    );
    out
}
