//! What the uplink reports in `status.uplink`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UplinkState {
    Idle,
    Online,
    Offline,
    BackingOff,
    AuthFailed,
}

impl UplinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkState::Idle => "idle",
            UplinkState::Online => "online",
            UplinkState::Offline => "offline",
            UplinkState::BackingOff => "backing_off",
            UplinkState::AuthFailed => "auth_failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkStatus {
    pub state: UplinkState,
    pub last_success_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// When the next attempt is due, while backing off.
    pub retry_at: Option<String>,
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// Passings the server reported as already received (resends after lost replies).
    pub duplicates_reported: u64,
}

impl Default for UplinkStatus {
    fn default() -> Self {
        Self {
            state: UplinkState::Idle,
            last_success_at: None,
            last_error: None,
            last_error_at: None,
            retry_at: None,
            requests_ok: 0,
            requests_failed: 0,
            duplicates_reported: 0,
        }
    }
}
