//! The local web side (`[http] listen`): the dashboard page, its JSON API, session actions behind
//! a bearer token, and `/metrics` for Prometheus. Everything is served from the binary itself.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Secret;
use crate::limits::{
    AcceptPause, ConnectionCap, HTTP_CONNECTIONS, HTTP_PER_HOST, LOG_EVERY, RESERVED_FOR_THIS_BOX, Throttle,
};
use crate::status::{Status, StatusSource};
use crate::store::query::{SessionState, SharedDb};
use crate::store::{Op, StoreError, StoreHandle};

const DASHBOARD: &str = include_str!("dashboard/index.html");
/// Most passings one `/api/passings` answer carries (the page asks again for the rest).
const PASSINGS_PAGE: i64 = 500;
/// The chip check: its latest reads, and the chips counted (most recently read first).
const CHIP_CHECK_READS: i64 = 50;
const CHIP_CHECK_CHIPS: i64 = 500;
/// A client has this long to send a request's headers (and an idle keep-alive connection this
/// long to start its next request).
pub const HEADER_WAIT: Duration = Duration::from_secs(10);
/// The most a connection buffers while reading a request head (hyper's minimum is 8 KiB).
pub const HEAD_MAX: usize = 16 * 1024;
/// A request, body included, is answered (or refused with 408) within this.
pub const REQUEST_WAIT: Duration = Duration::from_secs(15);
/// The largest request body (a session start's `{"alias": …}` is a few dozen bytes).
pub const BODY_MAX: usize = 4096;
/// At a stop, requests in flight get this long to finish; then their connections are dropped.
pub const STOP_GRACE: Duration = Duration::from_secs(1);
/// The longest a connection is kept, however often it asks: one host cannot hold slots for ever
/// with a request now and then (the dashboard polls; its browser just opens another).
pub const CONNECTION_LIFE: Duration = Duration::from_secs(60);
/// How long a status answer is reused: 200 pollers cost what one does.
const STATUS_FRESH: Duration = Duration::from_millis(250);
/// Wrong tokens a client may send per [`FAILURE_WINDOW`] before it is refused with 429 until
/// the window ends.
const FAILURES_ALLOWED: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Clients whose failures are remembered at once (the oldest are forgotten beyond it).
const FAILURE_CLIENTS: usize = 1024;

/// The page's one inline script, allowed by its hash (no `unsafe-inline` for scripts), and the
/// rest of the policy: nothing from elsewhere, never inside another site's frame.
static PAGE_POLICY: LazyLock<String> = LazyLock::new(|| {
    use base64::Engine as _;
    let script = DASHBOARD
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(script, _)| script)
        .unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, script.as_bytes());
    let hash = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    format!(
        "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'sha256-{hash}'; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
});

struct Shared {
    status: StatusSource,
    store: StoreHandle,
    token: Option<Secret>,
    default_alias: String,
    /// Names (lower case, no port) a request's `Host` may carry besides an IP address.
    hosts: Vec<String>,
    /// The last status answer and when it was made; the lock also makes concurrent pollers wait
    /// for one snapshot instead of taking one each.
    status_cache: tokio::sync::Mutex<Option<(Instant, Arc<Status>)>>,
    /// One read connection for every query the page makes.
    db: SharedDb,
    /// Wrong-token attempts per client address: (window start, count).
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    refused_log: Throttle,
    host_log: Throttle,
    bibs: Arc<std::sync::RwLock<crate::store::Bibs>>,
}

/// What the dashboard needs from the rest of the gateway.
pub struct HttpOptions {
    pub token: Option<Secret>,
    pub hosts: Vec<String>,
    pub default_alias: String,
    /// The bib map in use, for the chip check.
    pub bibs: Arc<std::sync::RwLock<crate::store::Bibs>>,
}

pub struct HttpServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    cap: ConnectionCap,
}

impl HttpServer {
    /// Bind now (inside the runtime), so that readiness means the dashboard answers.
    pub fn bind(
        listen: &str,
        options: &HttpOptions,
        status: StatusSource,
        store: StoreHandle,
        cap: ConnectionCap,
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = listen.parse()?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        info!(listen = %listener.local_addr()?, "dashboard listening");
        let mut hosts = vec!["localhost".to_string()];
        hosts.extend(options.hosts.iter().map(|h| h.trim_end_matches('.').to_ascii_lowercase()));
        let shared = Shared {
            db: SharedDb::new(&status.db_path),
            status,
            store,
            token: options.token.clone(),
            default_alias: options.default_alias.clone(),
            hosts,
            status_cache: tokio::sync::Mutex::new(None),
            failures: Mutex::new(HashMap::new()),
            refused_log: Throttle::new(LOG_EVERY),
            host_log: Throttle::new(LOG_EVERY),
            bibs: options.bibs.clone(),
        };
        Ok(Self { listener, shared: Arc::new(shared), cap })
    }

    /// The cap every dashboard listener of this process shares (`status.listening.refused.http`).
    pub fn cap(listening: Arc<Mutex<crate::status::Listening>>) -> ConnectionCap {
        ConnectionCap::new(crate::status::Listener::Http, HTTP_CONNECTIONS, listening).with_shares(HTTP_PER_HOST, RESERVED_FOR_THIS_BOX)
    }

    pub fn local_addr(&self) -> Option<String> {
        self.listener.local_addr().ok().map(|a| a.to_string())
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/api/status", get(status))
            .route("/api/passings", get(passings))
            .route("/api/reads-per-minute", get(reads_per_minute))
            .route("/api/chipcheck", get(chip_check))
            .route("/api/session/start", post(session_start))
            .route("/api/session/close", post(session_close))
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(BODY_MAX))
            .layer(middleware::from_fn_with_state(self.shared.clone(), guard))
            .with_state(self.shared.clone())
    }

    /// Serve until cancelled. Each connection holds a slot of the cap; at a stop, requests in
    /// flight get [`STOP_GRACE`] and then every connection is dropped, whatever its client does.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let router = self.router();
        let mut pause = AcceptPause::new(crate::status::Listener::Http);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        pause.accepted();
                        let Some(slot) = self.cap.admit_from(peer.ip()) else { continue };
                        let (router, cancel) = (router.clone(), cancel.clone());
                        connections.spawn(async move {
                            let _slot = slot;
                            serve_connection(stream, peer, router, cancel).await;
                        });
                    }
                    Err(e) => pause.failed(&e).await,
                }
            }
        }
        let _ = tokio::time::timeout(STOP_GRACE, async { while connections.join_next().await.is_some() {} }).await;
        connections.shutdown().await;
        Ok(())
    }
}

/// One connection: HTTP/1.1 with a header deadline and a bounded buffer, each request within
/// [`REQUEST_WAIT`], the client's address available to the handlers.
async fn serve_connection(stream: TcpStream, peer: SocketAddr, router: Router, cancel: CancellationToken) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        async move {
            let answer = tokio::time::timeout(REQUEST_WAIT, tower_service::Service::call(&mut router, request)).await;
            Ok::<_, Infallible>(match answer {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => error(StatusCode::REQUEST_TIMEOUT, "the request took too long"),
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_WAIT).max_buf_size(HEAD_MAX);
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(STOP_GRACE, connection).await;
        }
        // Kept alive by a request now and then, a connection would hold its slot for ever: after
        // its time it ends (after the request in flight, if any) and the browser opens another.
        _ = tokio::time::sleep(CONNECTION_LIFE) => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(STOP_GRACE, connection).await;
        }
    }
}

/// Every request: the `Host` must be one this box answers to (an IP address, `localhost`, or a
/// name in `http.hosts`), so a page on another site cannot reach the dashboard through DNS
/// rebinding; every answer says "never sniff, never frame".
async fn guard(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let mut response = if host_allowed(host, &shared.hosts) {
        next.run(request).await
    } else {
        if let Some(count) = shared.host_log.hit() {
            warn!(host = %host.chars().take(100).collect::<String>(), refused = count, "request for an unknown Host refused; add the name to http.hosts if it is ours");
        }
        error(
            StatusCode::MISDIRECTED_REQUEST,
            "this dashboard answers to its IP address, localhost and the names in http.hosts only",
        )
    };
    let too_large = response.status() == StatusCode::PAYLOAD_TOO_LARGE;
    let headers = response.headers_mut();
    if too_large {
        // The rest of the body is not read: the connection cannot carry another request, and
        // the client must be told so, or it reuses it and loses its next request.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// `Host` (with or without a port) is an IP address, or one of `names`. A missing `Host`
/// (HTTP/1.0 tools) is allowed: browsers always send one, and only browsers can be rebound.
pub fn host_allowed(host: &str, names: &[String]) -> bool {
    if host.is_empty() {
        return true;
    }
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => return rest.split_once(']').is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map_or(host, |(name, _)| name),
    };
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    names.contains(&name)
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
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY.as_str()),
        ],
        DASHBOARD,
    )
        .into_response()
}

/// The status, at most [`STATUS_FRESH`] old; concurrent callers share one snapshot.
async fn snapshot(shared: &Shared) -> anyhow::Result<Arc<Status>> {
    let mut cache = shared.status_cache.lock().await;
    if let Some((at, status)) = cache.as_ref()
        && at.elapsed() < STATUS_FRESH
    {
        return Ok(status.clone());
    }
    let source = shared.status.clone();
    let status = Arc::new(tokio::task::spawn_blocking(move || source.snapshot()).await??);
    *cache = Some((Instant::now(), status.clone()));
    Ok(status)
}

async fn status(State(shared): AppState) -> Response {
    match snapshot(&shared).await {
        Ok(s) => axum::Json(&*s).into_response(),
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
    let result = shared
        .db
        .run(move |db| {
            let Some(session) =
                db.open_session()?.or(db.sessions()?.into_iter().rev().find(|s| s.state == SessionState::Closing))
            else {
                return Ok(json!({ "session": null, "passings": [] }));
            };
            let list = db.passings_since(session.id, q.since, PASSINGS_PAGE)?;
            Ok(json!({ "session": session.id, "alias": session.alias, "passings": list }))
        })
        .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => internal(e),
    }
}

async fn reads_per_minute(State(shared): AppState) -> Response {
    match shared.db.run(|db| Ok(db.reads_per_minute(crate::clock::now_us(), 60)?)).await {
        Ok(v) => axum::Json(json!({ "minutes": v })).into_response(),
        Err(e) => internal(e),
    }
}

/// The open test session's latest reads and a count per chip, with bibs from the bib map (null:
/// not in it); `{"test": false}` when no test session is open.
async fn chip_check(State(shared): AppState) -> Response {
    let bibs = shared.bibs.read().map(|b| b.clone()).unwrap_or_default();
    let result = shared
        .db
        .run(move |db| {
            let Some(session) = db.open_session()?.filter(|s| s.test) else { return Ok(json!({ "test": false })) };
            let mut reads = db.chip_check_reads(&session, CHIP_CHECK_READS)?;
            let mut chips = db.chip_check_counts(&session, CHIP_CHECK_CHIPS)?;
            reads.iter_mut().for_each(|r| r.bib = bibs.get(&r.chip).cloned());
            chips.iter_mut().for_each(|c| c.bib = bibs.get(&c.chip).cloned());
            Ok(json!({ "test": true, "session": session.id, "alias": session.alias, "reads": reads, "chips": chips }))
        })
        .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => internal(e),
    }
}

/// Session actions need `Authorization: Bearer <http.token>` (the scheme in any case); without a
/// configured token they are refused altogether. A client that keeps sending wrong tokens is
/// refused with 429 for the rest of a minute, and the refusals are logged at most once a minute.
/// `None` when the request may go on; otherwise the answer that refuses it.
fn refusal(shared: &Shared, headers: &HeaderMap, peer: IpAddr) -> Option<Response> {
    let Some(token) = &shared.token else {
        return Some(error(StatusCode::FORBIDDEN, "session actions are off: set http.token in the config"));
    };
    let now = Instant::now();
    let mut failures = shared.failures.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((since, count)) = failures.get(&peer)
        && now.duration_since(*since) < FAILURE_WINDOW
        && *count >= FAILURES_ALLOWED
    {
        let wait = FAILURE_WINDOW.saturating_sub(now.duration_since(*since)).as_secs().max(1);
        let mut refused = error(StatusCode::TOO_MANY_REQUESTS, format!("too many wrong tokens; try again in {wait} s"));
        refused.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return Some(refused);
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim());
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.expose().as_bytes())) {
        failures.remove(&peer);
        return None;
    }
    if failures.len() >= FAILURE_CLIENTS && !failures.contains_key(&peer) {
        failures.retain(|_, (since, _)| now.duration_since(*since) < FAILURE_WINDOW);
        if failures.len() >= FAILURE_CLIENTS
            && let Some(oldest) = failures.iter().min_by_key(|(_, (since, _))| *since).map(|(ip, _)| *ip)
        {
            failures.remove(&oldest);
        }
    }
    let entry = failures.entry(peer).or_insert((now, 0));
    if now.duration_since(entry.0) >= FAILURE_WINDOW {
        *entry = (now, 0);
    }
    entry.1 += 1;
    drop(failures);
    if let Some(count) = shared.refused_log.hit() {
        warn!(client = %peer, refused = count, "session action refused: missing or wrong token (logged at most once a minute)");
    }
    Some(error(StatusCode::UNAUTHORIZED, "wrong or missing token"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize, Default)]
struct StartBody {
    alias: Option<String>,
    /// A test session (chip check), never sent to RUFUS.
    #[serde(default)]
    test: bool,
}

async fn session_start(
    State(shared): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = refusal(&shared, &headers, peer.ip()) {
        return refused;
    }
    let body: StartBody = serde_json::from_slice(&body).unwrap_or_default();
    let alias = match crate::config::alias_or_default(body.alias.as_deref(), &shared.default_alias) {
        Ok(alias) => alias,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match shared.store.call(Op::StartSession { alias: alias.clone(), test: body.test }).await {
        Ok(id) => {
            info!(session_id = id.unwrap_or_default(), alias = %alias, test = body.test, "session started from the dashboard");
            axum::Json(json!({ "id": id, "alias": alias, "test": body.test })).into_response()
        }
        Err(e) => store_error(e),
    }
}

/// A refusal is the user's to fix (409); storage that fails, or a store that stopped, is the
/// box's (503, and it may work later).
fn store_error(e: StoreError) -> Response {
    let status = match e {
        StoreError::Refused(_) => StatusCode::CONFLICT,
        StoreError::Storage(_) | StoreError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

async fn session_close(
    State(shared): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refusal(&shared, &headers, peer.ip()) {
        return refused;
    }
    match shared.store.call(Op::CloseSession).await {
        Ok(id) => axum::Json(json!({ "id": id })).into_response(),
        Err(e) => store_error(e),
    }
}

async fn metrics(State(shared): AppState) -> Response {
    match snapshot(&shared).await {
        Ok(s) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::render_metrics(&s))
                .into_response()
        }
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_cannot_be_rebound() {
        let names = vec!["localhost".to_string(), "rufus-box.local".to_string()];
        for ok in [
            "",
            "127.0.0.1",
            "127.0.0.1:8080",
            "192.168.1.20:8080",
            "[::1]:8080",
            "localhost:8080",
            "RUFUS-box.local.",
            "rufus-box.local:80",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for bad in
            ["attacker.example", "attacker.example:8080", "localhost.attacker.example", "[evil]:80", "127.0.0.1.nip.io"]
        {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }

    #[test]
    fn the_policy_allows_exactly_the_page_script() {
        let policy = PAGE_POLICY.as_str();
        assert!(policy.contains("script-src 'sha256-"), "{policy}");
        assert!(!policy.contains("script-src 'unsafe-inline'"));
        assert!(policy.contains("frame-ancestors 'none'"));
        assert_eq!(DASHBOARD.matches("<script>").count(), 1, "one inline script, the one hashed");
        assert!(
            !DASHBOARD.contains(" onsubmit=") && !DASHBOARD.contains(" onclick="),
            "inline handlers are not allowed by a hash"
        );
    }
}
