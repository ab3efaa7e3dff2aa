//! Typed configuration: one TOML file, then `RUFUS_GATEWAY__SECTION__KEY` environment overrides.
//!
//! Defaults live in the `Default` impls below and nowhere else. `Config::load` parses, then
//! `validate` checks what serde cannot (required keys, ranges, https, time zones) and names the key
//! and the fix in every error, because the person reading it is editing a file on a field.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::timestamp::TimestampFormat;

mod check;
mod reader;

#[cfg(feature = "test-support")]
pub use check::ALIAS_MAX;
pub use check::{alias_or_default, config_file_warning, warnings};
pub use reader::*;

/// Where the config lives unless `-c` or `RUFUS_GATEWAY_CONFIG` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rufus-gateway/config.toml";

/// An invalid configuration: the process exits 78 (`EX_CONFIG`) and systemd does not restart it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration {path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// A string that must never be printed: `Debug` and `Display` show a mask.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// A hint that lets an operator recognise the value without revealing it.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// `ror-ae4f…` style: enough to tell two keys apart, not enough to use one.
pub fn mask(value: &str) -> String {
    let shown: String = value.chars().take(6).collect();
    if value.chars().count() <= 8 { "****".to_string() } else { format!("{shown}…") }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub api: ApiConfig,
    pub reader: ReaderConfig,
    pub passings: PassingsConfig,
    pub session: SessionConfig,
    pub clock: ClockConfig,
    pub storage: StorageConfig,
    pub control: ControlConfig,
    pub http: HttpConfig,
    pub feed: FeedConfig,
    pub signal: SignalConfig,
    pub backup: BackupConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub base_url: String,
    #[serde(deserialize_with = "empty_is_none")]
    pub api_key: Option<Secret>,
    #[serde(deserialize_with = "empty_is_none")]
    pub api_key_file: Option<PathBuf>,
    #[serde(deserialize_with = "empty_is_none")]
    pub deviceid: Option<String>,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    pub batch_size: usize,
    /// Cap of the exponential backoff between retries of transient failures.
    #[serde(deserialize_with = "duration")]
    pub retry_max_delay: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.runonrufus.com/v0".into(),
            api_key: None,
            api_key_file: None,
            deviceid: None,
            timeout: Duration::from_secs(15),
            batch_size: 200,
            retry_max_delay: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupKeep {
    First,
    Strongest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChipEncoding {
    Hex,
    Ascii,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmapped {
    Chip,
    Skip,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PassingsConfig {
    #[serde(deserialize_with = "duration")]
    pub dedup_window: Duration,
    pub dedup_keep: DedupKeep,
    pub chip_encoding: ChipEncoding,
    #[serde(deserialize_with = "empty_is_none")]
    pub bib_map: Option<PathBuf>,
    pub unmapped: Unmapped,
}

impl Default for PassingsConfig {
    fn default() -> Self {
        Self {
            dedup_window: Duration::from_secs(3),
            dedup_keep: DedupKeep::First,
            chip_encoding: ChipEncoding::Hex,
            bib_map: None,
            unmapped: Unmapped::Chip,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    pub alias: String,
    pub auto_start: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self { alias: "GATEWAY".into(), auto_start: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockSource {
    Auto,
    Timesyncd,
    Adjtimex,
    Trust,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    pub source: ClockSource,
    pub timesyncd_flag: PathBuf,
    #[serde(deserialize_with = "duration")]
    pub max_hold: Duration,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            source: ClockSource::Auto,
            timesyncd_flag: "/run/systemd/timesync/synchronized".into(),
            max_hold: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub path: PathBuf,
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// Longest a read waits in memory before its transaction commits (the crash-loss bound).
    #[serde(deserialize_with = "duration")]
    pub commit_interval: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: "/var/lib/rufus-gateway/gateway.db".into(),
            retention: Duration::from_secs(30 * 86_400),
            commit_interval: Duration::from_millis(50),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self { socket: "/run/rufus-gateway/control.sock".into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(deserialize_with = "empty_is_none")]
    pub listen: Option<String>,
    #[serde(deserialize_with = "empty_is_none")]
    pub token: Option<Secret>,
    /// Extra `Host` names the dashboard answers to, besides its own address and `localhost`
    /// (a name in the tent's DNS, `rufus-box.local`). Any other `Host` is refused: DNS rebinding.
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    #[serde(deserialize_with = "empty_is_none")]
    pub listen: Option<String>,
}

/// A LED and a beeper for a person next to the box (`signal.rs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalConfig {
    /// A LED-class device under `leds_dir` ("ACT", "PWR", a gpio-led label); empty: none.
    pub led: String,
    /// A LED-class device wired to a buzzer; empty: none.
    pub beeper: String,
    pub beep_on_passing: BeepOn,
    pub leds_dir: PathBuf,
}

impl Default for SignalConfig {
    fn default() -> Self {
        Self {
            led: String::new(),
            beeper: String::new(),
            beep_on_passing: BeepOn::Test,
            leds_dir: PathBuf::from("/sys/class/leds"),
        }
    }
}

/// A live copy of the passings on a USB stick (`backup.rs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Where the stick is mounted (e.g. "/media/rufus-backup"); empty: no backup.
    #[serde(deserialize_with = "empty_is_none")]
    pub dir: Option<PathBuf>,
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Write only when `dir` is a mount point, so a missing stick never fills the SD card.
    pub require_mount: bool,
    /// Also keep the raw reads there.
    pub reads: bool,
    /// Whether the shipped udev rule may mount an ext4 stick (`packaging/mount-backup` asks
    /// `check-config`): ext4 brings owners, modes and the kernel's ext4 parser on an untrusted
    /// image, so FAT and exFAT only unless this is true.
    pub allow_ext4: bool,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self { dir: None, interval: Duration::from_secs(5), require_mount: true, reads: false, allow_ext4: false }
    }
}

/// When the beeper beeps for a passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BeepOn {
    /// In a test session (chip check) only.
    Test,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Auto,
    Journald,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub target: LogTarget,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), target: LogTarget::Auto }
    }
}

/// What a command needs from the config: `device bind` runs before a deviceid exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Daemon,
    DeviceBind,
    /// Commands that only talk to the daemon or read the database.
    Local,
}

impl Config {
    /// Load `path`, apply environment overrides, and validate for `purpose`.
    pub fn load(path: &Path, purpose: Purpose) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError { path: path.display().to_string(), message };
        if !path.exists() {
            return Err(err(format!(
                "the file does not exist; copy the commented example (config/config.toml, installed as {DEFAULT_CONFIG_PATH}) and edit it, or pass -c PATH"
            )));
        }
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(config::Environment::with_prefix("RUFUS_GATEWAY").prefix_separator("__").separator("__"))
            .build()
            .map_err(|e| err(e.to_string()))?;
        let unset = |key: &str| raw.get_string(key).is_err();
        let (path_unset, socket_unset) = (unset("storage.path"), unset("control.socket"));
        let mut cfg: Config = raw.try_deserialize().map_err(|e| err(explain_serde(&e.to_string())))?;
        cfg.instance_defaults(path, path_unset, socket_unset);
        cfg.resolve_api_key().map_err(err)?;
        cfg.validate(purpose).map_err(err)?;
        Ok(cfg)
    }

    /// Several readers on one box (`rufus-gateway@NAME`, config `/etc/rufus-gateway/NAME.toml`):
    /// unless the file says otherwise, each instance gets its own database and socket,
    /// `/var/lib/rufus-gateway/NAME/gateway.db` and `/run/rufus-gateway/NAME/control.sock`, so the
    /// CLI finds the instance from its config file alone.
    fn instance_defaults(&mut self, path: &Path, path_unset: bool, socket_unset: bool) {
        let Some(name) = path.file_stem().and_then(|s| s.to_str()).filter(|s| *s != "config") else { return };
        if path_unset {
            self.storage.path = Path::new("/var/lib/rufus-gateway").join(name).join("gateway.db");
        }
        if socket_unset {
            self.control.socket = Path::new("/run/rufus-gateway").join(name).join("control.sock");
        }
    }

    fn resolve_api_key(&mut self) -> Result<(), String> {
        if self.api.api_key.is_none()
            && let Some(file) = &self.api.api_key_file
        {
            let text = std::fs::read_to_string(file).map_err(|e| {
                format!("api.api_key_file: cannot read {}: {e}; fix the path or its permissions", file.display())
            })?;
            let key = text.trim();
            if key.is_empty() {
                return Err(format!("api.api_key_file: {} is empty; put the API key in it", file.display()));
            }
            self.api.api_key = Some(Secret::new(key));
        }
        Ok(())
    }

    pub fn deviceid(&self) -> &str {
        self.api.deviceid.as_deref().unwrap_or("")
    }
}

/// serde's messages name the field but not always the section; add the hint a person needs, and
/// put the key first (as every other config error does).
fn explain_serde(message: &str) -> String {
    let explained = if message.contains("unknown field") {
        format!("{message}; remove or correct the key (see the commented example config)")
    } else if let Some(choices) = enum_choices(message) {
        // The config crate says "enum Parity does not have variant constructor x for key …":
        // name the values that are accepted instead.
        format!("{message}; expected {choices}")
    } else {
        message.to_string()
    };
    key_first(&explained)
}

/// "X for key `reader.timezone`; Y" → "reader.timezone: X; Y".
fn key_first(message: &str) -> String {
    let Some((what, rest)) = message.split_once(" for key `") else { return message.to_string() };
    let Some((key, tail)) = rest.split_once('`') else { return message.to_string() };
    format!("{key}: {what}{tail}")
}

/// The accepted values of the enumeration a config error names, as serde's derive lists them
/// ("`none`, `odd`, `even`"), so the list can never differ from what is accepted.
fn enum_choices(message: &str) -> Option<String> {
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error, StrDeserializer};
    let name = message.strip_prefix("enum ")?.split_whitespace().next()?;
    let probe: StrDeserializer<'_, Error> = "\u{0}".into_deserializer();
    let refused = match name {
        "Parity" => Parity::deserialize(probe).err(),
        "FlowControl" => FlowControl::deserialize(probe).err(),
        "Format" => Format::deserialize(probe).err(),
        "TimestampSource" => TimestampSource::deserialize(probe).err(),
        "DedupKeep" => DedupKeep::deserialize(probe).err(),
        "ChipEncoding" => ChipEncoding::deserialize(probe).err(),
        "Unmapped" => Unmapped::deserialize(probe).err(),
        "ClockSource" => ClockSource::deserialize(probe).err(),
        "LogTarget" => LogTarget::deserialize(probe).err(),
        _ => None,
    }?;
    refused.to_string().split("expected ").nth(1).map(str::to_string)
}

/// `reader.timezone`: an IANA zone name.
fn zone<'de, D: Deserializer<'de>>(d: D) -> Result<chrono_tz::Tz, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "\"{text}\" is not an IANA time zone name; use e.g. \"UTC\" or \"Europe/Madrid\""
        ))
    })
}

/// `reader.timestamp_format`: rfc3339, unix, unix_ms or a strftime pattern.
fn timestamp_format<'de, D: Deserializer<'de>>(d: D) -> Result<TimestampFormat, D::Error> {
    TimestampFormat::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// Durations are strings such as "250ms", "3s", "30d" (humantime).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "\"{text}\" is not a duration ({e}); write e.g. \"250ms\", \"3s\", \"10m\", \"30d\""
        ))
    })
}

/// The documented config writes `""` for "unset"; the code uses `Option`.
fn empty_is_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: From<String>,
{
    let text = String::deserialize(d)?;
    Ok(if text.trim().is_empty() { None } else { Some(T::from(text)) })
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_errors_put_the_key_first() {
        assert_eq!(key_first("\"x\" is bad for key `reader.timezone`; hint"), "reader.timezone: \"x\" is bad; hint");
        assert_eq!(key_first("no key here"), "no key here");
    }

    #[test]
    fn mask_hides_most_of_a_key() {
        assert_eq!(mask("ror-ae4fc6c19681a20fad30"), "ror-ae…");
        assert_eq!(mask("short"), "****");
        assert_eq!(format!("{:?}", Secret::new("ror-ae4fc6c19681a20fad30")), "ror-ae…");
    }
}
