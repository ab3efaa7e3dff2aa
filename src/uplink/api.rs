//! The RUFUS Cloud API client (rufus-api.md), and the classification of every answer into what
//! the uplink does next. Replies may be flat or wrapped in `{"body": …}`: both are accepted.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::config::{ApiConfig, Secret, mask};
use crate::store::query::Outgoing;

/// The longest `Retry-After` obeyed; a server asking for more is retried sooner.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// The largest reply read: RUFUS answers with a few hundred bytes; more is not an answer.
pub const REPLY_MAX: usize = 1024 * 1024;

/// What went wrong, sorted by what the uplink must do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Retry with backoff, forever: no connection, timeouts, 408, 429, 5xx, garbled replies.
    #[error("{reason}")]
    Transient { reason: String, retry_after: Option<Duration>, offline: bool },
    /// The server refuses the data (400, 413, 422 on a batch): isolate the passing at fault.
    #[error("refused ({status}): {description}")]
    Refused { status: u16, description: String },
    /// "Session not found or closed": the session is gone remotely.
    #[error("session gone ({status}): {description}")]
    SessionGone { status: u16, description: String },
    /// The configuration is wrong (401, 403, unknown device, wrong URL): pause, say what to fix.
    #[error("{description} ({status})")]
    Config { status: u16, description: String },
}

impl ApiError {
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Transient { offline: true, .. } => "offline",
            ApiError::Transient { .. } => "transient",
            ApiError::Refused { .. } => "refused",
            ApiError::SessionGone { .. } => "session_gone",
            ApiError::Config { .. } => "config",
        }
    }
}

/// Which call an answer belongs to: the same status means different things on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    BindDevice,
    ActiveSession,
    CreateSession,
    PostPassings,
    CloseSession,
}

/// Decide what a non-2xx answer means. Pure, so it is tested with a table.
pub fn classify(call: Call, status: u16, body: &Value, retry_after: Option<Duration>) -> ApiError {
    let description = field(body, "description").and_then(Value::as_str).unwrap_or("").to_string();
    let lower = description.to_ascii_lowercase();
    let described = if description.is_empty() { format!("HTTP {status}") } else { description.clone() };
    if (400..500).contains(&status) && lower.contains("session not found") {
        return ApiError::SessionGone { status, description: described };
    }
    match status {
        408 | 429 | 500..=599 => ApiError::Transient {
            reason: format!("server answered {status}: {described}"),
            retry_after,
            offline: false,
        },
        401 | 403 => ApiError::Config {
            status,
            description: format!(
                "the API refused the key: {described}; check api.api_key (a WRITE or READ_WRITE key) and api.deviceid"
            ),
        },
        404 if lower.contains("device not found") => ApiError::Config {
            status,
            description: format!(
                "{described}: api.deviceid is not bound to this key; run `rufus-gateway device bind` and paste the new deviceid"
            ),
        },
        404 if call == Call::CloseSession => ApiError::SessionGone { status, description: described },
        404 => {
            ApiError::Config { status, description: format!("{described}: check api.base_url (it should end in /v0)") }
        }
        400 | 413 | 422 if call == Call::PostPassings => ApiError::Refused { status, description: described },
        _ => ApiError::Transient {
            reason: format!("unexpected answer {status}: {described}"),
            retry_after,
            offline: false,
        },
    }
}

/// A field at the top level, or inside a `body` object (the newer envelope).
pub fn field<'a>(reply: &'a Value, name: &str) -> Option<&'a Value> {
    reply.get(name).or_else(|| reply.get("body").filter(|b| b.is_object()).and_then(|b| b.get(name)))
}

/// A remote session as `GET /sessions/device/{id}/active` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSession {
    pub token: String,
    pub alias: String,
    /// How many passings it holds, when the reply says (a count, or the list itself).
    pub passings: Option<u64>,
}

/// `result` is documented as an array of at most one item; an object alone is accepted too,
/// and so are flat and enveloped replies.
pub fn parse_active_session(reply: &Value) -> Option<RemoteSession> {
    let result = field(reply, "result")?;
    let item = match result {
        Value::Array(items) => items.first()?,
        Value::Object(_) => result,
        _ => return None,
    };
    let token = item.get("token_session")?.as_str().filter(|t| !t.is_empty())?.to_string();
    let alias = item.get("alias").and_then(Value::as_str).unwrap_or_default().to_string();
    let passings = item.get("passings").and_then(|p| p.as_u64().or_else(|| p.as_array().map(|a| a.len() as u64)));
    Some(RemoteSession { token, alias, passings })
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        (at.with_timezone(&chrono::Utc) - now).to_std().unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostReply {
    pub inserted: Option<u64>,
    pub duplicates: Option<u64>,
}

/// The body of `POST /passings`: only the listed fields (the API forbids others).
pub fn batch_body(token: &str, passings: &[Outgoing]) -> Vec<u8> {
    let list: Vec<PassingBody<'_>> = passings
        .iter()
        .map(|p| PassingBody {
            bib: &p.bib,
            num_passing: p.num_passing,
            timestamp: crate::clock::api_timestamp(p.timestamp_us),
            chip: &p.chip,
        })
        .collect();
    serde_json::to_vec(&BatchBody { token_session: token, passings_list: list }).expect("plain data serialises")
}

#[derive(Serialize)]
struct BatchBody<'a> {
    token_session: &'a str,
    passings_list: Vec<PassingBody<'a>>,
}

#[derive(Serialize)]
struct PassingBody<'a> {
    bib: &'a str,
    num_passing: i64,
    timestamp: String,
    chip: &'a str,
}

pub struct RufusClient {
    http: reqwest::Client,
    base: String,
    key: Secret,
}

impl RufusClient {
    pub fn new(cfg: &ApiConfig) -> anyhow::Result<Self> {
        // ring, not aws-lc-rs: the latter fails to cross-compile for ARM (see README).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("rufus-gateway/", env!("CARGO_PKG_VERSION")))
            // The key goes to api.base_url and nowhere else: a redirect is an answer to report,
            // never followed (it could lead to another host, or from https to http).
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            base: cfg.base_url.trim_end_matches('/').to_string(),
            key: cfg.api_key.clone().unwrap_or_default(),
        })
    }

    pub async fn create_session(&self, deviceid: &str, alias: &str) -> Result<String, ApiError> {
        let body = serde_json::json!({ "deviceid": deviceid, "alias": alias });
        let reply =
            self.send(Call::CreateSession, self.http.post(format!("{}/sessions", self.base)).json(&body)).await?;
        match field(&reply, "token_session").and_then(Value::as_str) {
            Some(token) if !token.is_empty() => Ok(token.to_string()),
            _ => Err(ApiError::Transient {
                reason: "session created but the reply has no token_session".into(),
                retry_after: None,
                offline: false,
            }),
        }
    }

    /// The device's active remote session, if it has one (`GET /sessions/device/{id}/active`).
    pub async fn active_session(&self, deviceid: &str) -> Result<Option<RemoteSession>, ApiError> {
        let url = format!("{}/sessions/device/{deviceid}/active", self.base);
        Ok(parse_active_session(&self.send(Call::ActiveSession, self.http.get(url)).await?))
    }

    /// `POST /passings` with a batch encoded by [`batch_body`].
    pub async fn post_passings(&self, body: Vec<u8>) -> Result<PostReply, ApiError> {
        let request =
            self.http.post(format!("{}/passings", self.base)).header("content-type", "application/json").body(body);
        let reply = self.send(Call::PostPassings, request).await?;
        let count = |name| field(&reply, name).and_then(Value::as_u64);
        Ok(PostReply { inserted: count("inserted_count"), duplicates: count("duplicate_count") })
    }

    pub async fn close_session(&self, token: &str) -> Result<(), ApiError> {
        self.send(Call::CloseSession, self.http.patch(format!("{}/sessions/close/{token}", self.base)))
            .await
            .map(|_| ())
    }

    /// `POST /devices`. Returns the deviceid, and whether the serial number was bound already
    /// (undocumented: a 409, or any 4xx whose body still names the device, is taken as that).
    pub async fn bind_device(
        &self,
        model: &str,
        serial_number: &str,
        alias: Option<&str>,
    ) -> Result<(String, bool), ApiError> {
        let mut body = serde_json::json!({ "model": model, "serial_number": serial_number, "type": "RFID" });
        if let Some(alias) = alias {
            body["alias"] = Value::from(alias);
        }
        let response = self
            .http
            .post(format!("{}/devices", self.base))
            .header("api_key", self.key.expose())
            .json(&body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        if let Some(redirect) = redirected(&response) {
            return Err(redirect);
        }
        let reply: Value = serde_json::from_slice(&read_capped(response).await?).unwrap_or(Value::Null);
        let deviceid = field(&reply, "deviceid").and_then(Value::as_str).filter(|d| !d.is_empty()).map(String::from);
        match (status, deviceid) {
            (200..=299, Some(id)) => Ok((id, false)),
            (400..=499, Some(id)) if status != 401 && status != 403 => Ok((id, true)),
            _ => Err(classify(Call::BindDevice, status, &reply, None)),
        }
    }

    async fn send(&self, call: Call, request: reqwest::RequestBuilder) -> Result<Value, ApiError> {
        let response = request.header("api_key", self.key.expose()).send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        if let Some(redirect) = redirected(&response) {
            return Err(redirect);
        }
        let bytes = read_capped(response).await?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            if body.is_null() && call != Call::CloseSession {
                return Err(ApiError::Transient {
                    reason: format!("answer {status} without a JSON body"),
                    retry_after,
                    offline: false,
                });
            }
            return Ok(body);
        }
        Err(classify(call, status, &body, retry_after))
    }
}

/// A 3xx answer, as the configuration error it is (where it pointed: scheme, host and port only,
/// as the path could carry a token).
fn redirected(response: &reqwest::Response) -> Option<ApiError> {
    let status = response.status();
    if !status.is_redirection() {
        return None;
    }
    let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let target = url::Url::parse(location)
        .ok()
        .map(|u| u.origin().ascii_serialization())
        .filter(|o| o != "null")
        .unwrap_or_else(|| "another address".into());
    Some(ApiError::Config {
        status: status.as_u16(),
        description: format!(
            "the API answered with a redirect to {target}, which is not followed (the API key goes to api.base_url only); \
             set api.base_url to the address the API really answers at"
        ),
    })
}

/// The reply's body, up to [`REPLY_MAX`] bytes; a longer one is a transient error.
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > REPLY_MAX {
            return Err(ApiError::Transient {
                reason: format!("the reply is larger than {} KiB; not an API answer", REPLY_MAX / 1024),
                retry_after: None,
                offline: false,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn transport_error(e: reqwest::Error) -> ApiError {
    let offline = e.is_connect() || e.is_timeout();
    let what = if e.is_timeout() {
        "no answer in time (api.timeout)"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "connection lost"
    };
    // reqwest's Display includes the URL, which may carry a session token in its path.
    let mut source = std::error::Error::source(&e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    let reason = if detail.is_empty() { what.to_string() } else { format!("{what}: {detail}") };
    ApiError::Transient { reason, retry_after: None, offline }
}

/// For logs: a token shown only by its first characters.
pub fn short_token(token: &str) -> String {
    mask(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_flat_or_enveloped() {
        let flat = json!({"description": "Session inserted succesfully", "token_session": "AB"});
        let wrapped = json!({"body": {"description": "Session inserted succesfully", "token_session": "AB"}});
        assert_eq!(field(&flat, "token_session"), Some(&json!("AB")));
        assert_eq!(field(&wrapped, "token_session"), Some(&json!("AB")));
        assert_eq!(field(&json!({"body": null}), "token_session"), None);
    }

    #[test]
    fn the_active_session_in_every_shape() {
        let one = json!({"token_session": "T1", "alias": "FINISH", "active": true, "passings": 0});
        let expected = Some(RemoteSession { token: "T1".into(), alias: "FINISH".into(), passings: Some(0) });
        assert_eq!(parse_active_session(&json!({"description": "Success", "result": [one.clone()]})), expected);
        assert_eq!(parse_active_session(&json!({"body": {"result": [one.clone()]}})), expected);
        assert_eq!(parse_active_session(&json!({"result": one})), expected);
        let listed = json!({"result": [{"token_session": "T2", "alias": "A", "passings": [{}, {}]}]});
        assert_eq!(parse_active_session(&listed).unwrap().passings, Some(2));
        let unknown = json!({"result": [{"token_session": "T3", "alias": "A"}]});
        assert_eq!(parse_active_session(&unknown).unwrap().passings, None);
        assert_eq!(parse_active_session(&json!({"result": []})), None);
        assert_eq!(parse_active_session(&json!({"description": "Sessions not found", "deviceid": "X"})), None);
    }

    #[test]
    fn classification_table() {
        use ApiError::*;
        let none = Value::Null;
        let gone = json!({"description": "Session not found or closed"});
        let gone_env = json!({"body": {"description": "Session not found or closed"}});
        let device = json!({"description": "Device not found", "deviceid": "X"});
        let cases: Vec<(Call, u16, &Value, &str)> = vec![
            (Call::PostPassings, 503, &none, "transient"),
            (Call::PostPassings, 500, &none, "transient"),
            (Call::PostPassings, 429, &none, "transient"),
            (Call::PostPassings, 408, &none, "transient"),
            (Call::PostPassings, 400, &none, "refused"),
            (Call::PostPassings, 413, &none, "refused"),
            (Call::PostPassings, 422, &none, "refused"),
            (Call::PostPassings, 404, &gone, "session_gone"),
            (Call::PostPassings, 400, &gone, "session_gone"),
            (Call::PostPassings, 409, &gone_env, "session_gone"),
            (Call::PostPassings, 401, &none, "config"),
            (Call::PostPassings, 403, &none, "config"),
            (Call::CreateSession, 404, &device, "config"),
            (Call::CreateSession, 400, &none, "transient"),
            (Call::CloseSession, 404, &none, "session_gone"),
            (Call::PostPassings, 404, &none, "config"),
            (Call::PostPassings, 409, &none, "transient"),
        ];
        for (call, status, body, want) in cases {
            let got = classify(call, status, body, None);
            assert_eq!(got.kind(), want, "{call:?} {status} {body}: {got:?}");
        }
        match classify(Call::PostPassings, 429, &none, Some(Duration::from_secs(7))) {
            Transient { retry_after, .. } => assert_eq!(retry_after, Some(Duration::from_secs(7))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Sat, 28 Nov 2026 10:00:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sat, 28 Nov 2026 09:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
