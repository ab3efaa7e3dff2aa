//! Scripted misbehaviour of the stand-in API, for the test suite only (never in a release
//! build, so never in the demo): faults per route, a request log, sessions closed "remotely".

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::{FakeApi, FakeSession, FakeState, Route, dropped, lock, reply};

#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and `Retry-After`, when given) without doing anything.
    Status { code: u16, retry_after: Option<String> },
    /// Drop the connection without doing anything.
    Drop,
    /// Do the work, then drop the connection instead of answering (the lost reply).
    CommitThenDrop,
    /// Never answer (the client's timeout fires).
    Hang,
    /// Wait this long, then answer normally (a slow request, still in flight).
    Delay(Duration),
    /// Answer `307 Temporary Redirect` to this URL (another host, or plain http).
    Redirect(String),
    /// Answer 200 with a body of this many bytes (streamed: the fake holds 64 KiB of it).
    Huge(u64),
}

#[derive(Debug, Clone)]
pub struct RequestLog {
    pub method: &'static str,
    pub path: String,
    pub status: u16,
    pub at: Instant,
    pub batch: usize,
}

impl FakeState {
    pub fn session_by_alias(&self, alias: &str) -> Vec<&FakeSession> {
        self.sessions.iter().filter(|s| s.alias == alias).collect()
    }

    fn take_fault(&mut self, route: Route) -> Option<Fault> {
        let i =
            self.faults.iter().position(|(r, _)| *r == route || (*r == Route::Any && route != Route::ActiveSession))?;
        self.faults.remove(i).map(|(_, f)| f)
    }
}

impl FakeApi {
    pub fn push_fault(&self, route: Route, fault: Fault) {
        self.state().faults.push_back((route, fault));
    }

    /// Close a session as if from the RUFUS web app (or another device's new session).
    pub fn close_remotely(&self, token: &str) {
        for s in self.state().sessions.iter_mut().filter(|s| s.token == token) {
            s.active = false;
        }
    }
}

pub(super) fn log(shared: &Arc<Mutex<FakeState>>, method: &'static str, path: &str, status: u16, batch: usize) {
    lock(shared).requests.push(RequestLog { method, path: path.to_string(), status, at: Instant::now(), batch });
}

/// A refused chip: the request log holds what passed the fault layer, so the refusal is recorded
/// there (the gateway sends one request at a time, so the last POST is this one).
pub(super) fn refused(s: &mut FakeState) {
    if let Some(logged) = s.requests.iter_mut().rev().find(|r| r.path == "/passings") {
        logged.status = 400;
    }
}

/// The fault scripted for this request, if any.
pub(super) struct Scripted(Option<Fault>);

impl Scripted {
    /// The request was answered normally: logged (unless its fault logged it already); `true`
    /// when the reply is to be lost.
    pub(super) fn finish(self, shared: &Arc<Mutex<FakeState>>, method: &'static str, path: &str, batch: usize) -> bool {
        if !matches!(self.0, Some(Fault::CommitThenDrop | Fault::Delay(_))) {
            log(shared, method, path, 200, batch);
        }
        matches!(self.0, Some(Fault::CommitThenDrop))
    }
}

/// Apply the fault scripted for this route (or the hang of every request): `Err` is the
/// response to give now.
pub(super) async fn scripted(
    shared: &Arc<Mutex<FakeState>>,
    route: Route,
    method: &'static str,
    path: &str,
    batch: usize,
) -> Result<Scripted, Response> {
    let (fault, hang) = {
        let mut s = lock(shared);
        (s.take_fault(route), s.hang_all)
    };
    let log = |status: u16| log(shared, method, path, status, batch);
    if hang {
        log(0);
        std::future::pending::<()>().await;
    }
    match fault {
        Some(Fault::Status { code, retry_after }) => {
            log(code);
            let mut r =
                reply(&lock(shared), StatusCode::from_u16(code).unwrap(), json!({ "description": "scripted failure" }));
            if let Some(v) = retry_after {
                r.headers_mut().insert("retry-after", v.parse().unwrap());
            }
            return Err(r);
        }
        Some(Fault::Drop) => {
            log(0);
            return Err(dropped());
        }
        Some(Fault::Hang) => {
            log(0);
            std::future::pending::<()>().await;
        }
        Some(Fault::CommitThenDrop) => {
            log(0);
        }
        Some(Fault::Delay(d)) => {
            log(200);
            tokio::time::sleep(d).await;
        }
        Some(Fault::Redirect(to)) => {
            log(307);
            let r = Response::builder().status(307).header("location", to).body(Body::empty()).unwrap();
            return Err(r);
        }
        Some(Fault::Huge(size)) => {
            log(200);
            let chunk = Bytes::from(vec![b' '; 64 * 1024]);
            let chunks = size.div_ceil(chunk.len() as u64);
            let stream = futures_util::stream::iter((0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
            let r = Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from_stream(stream))
                .unwrap();
            return Err(r);
        }
        None => {}
    }
    Ok(Scripted(fault))
}
