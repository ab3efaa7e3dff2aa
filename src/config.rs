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
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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
pub enum Parity {
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    None,
    Software,
    Hardware,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Regex,
    Ipico,
    Chafon,
    Ultra,
    ImpinjJson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestampSource {
    Host,
    Reader,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReaderConfig {
    #[serde(deserialize_with = "empty_is_none")]
    pub port: Option<String>,
    pub baud_rate: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub flow_control: FlowControl,
    pub format: Format,
    pub pattern: String,
    pub timestamps: TimestampSource,
    pub timestamp_format: String,
    pub timezone: String,
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            port: None,
            baud_rate: 115_200,
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
            flow_control: FlowControl::None,
            format: Format::Regex,
            pattern: "^(?P<chip>[0-9A-Fa-f]+)$".into(),
            timestamps: TimestampSource::Host,
            timestamp_format: "rfc3339".into(),
            timezone: "UTC".into(),
            poll_interval: Duration::ZERO,
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

/// The shortest `http.token` accepted for a listen address reachable from the network.
pub const TOKEN_MIN: usize = 24;
/// The longest session alias, in characters.
pub const ALIAS_MAX: usize = 64;

/// The alias a session start asked for (checked by [`check_alias`]), or the configured one.
pub fn alias_or_default(given: Option<&str>, default: &str) -> Result<String, String> {
    match given.filter(|a| !a.trim().is_empty()) {
        Some(alias) => check_alias(alias).map_err(|e| format!("alias refused: {e}")),
        None => Ok(default.to_string()),
    }
}

/// A session alias as given (trimmed), or why it is refused: 1 to [`ALIAS_MAX`] characters,
/// letters (any script), digits, spaces and `- _ . , : / ( ) # & + ' !`. It is shown on the RUFUS
/// side, in logs and in CSV files; nothing else is needed for "FINISH", "Meta 10K" or "Línea 2".
pub fn check_alias(alias: &str) -> Result<String, String> {
    let alias = alias.trim();
    if alias.is_empty() {
        return Err("the alias is empty, e.g. \"FINISH\"".into());
    }
    if alias.chars().count() > ALIAS_MAX {
        return Err(format!("the alias is longer than {ALIAS_MAX} characters"));
    }
    if let Some(bad) = alias.chars().find(|c| !(c.is_alphanumeric() || " -_.,:/()#&+'!".contains(*c))) {
        return Err(format!(
            "the alias may hold letters, digits, spaces and - _ . , : / ( ) # & + ' ! only, not {:?}",
            bad.escape_default().to_string()
        ));
    }
    Ok(alias.to_string())
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    #[serde(deserialize_with = "empty_is_none")]
    pub listen: Option<String>,
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

    /// Checks serde cannot express. Each message starts with the key, then says how to fix it.
    pub fn validate(&self, purpose: Purpose) -> Result<(), String> {
        validate_base_url(&self.api.base_url)?;
        if purpose != Purpose::Local && self.api.api_key.is_none() {
            return Err("api.api_key: missing; set api_key = \"ror-…\" in [api] (or api_key_file)".into());
        }
        if purpose == Purpose::Daemon && self.api.deviceid.is_none() {
            return Err("api.deviceid: missing; run `rufus-gateway device bind --model M --serial-number S` and paste the deviceid it prints into [api]".into());
        }
        if self.api.timeout.is_zero() {
            return Err("api.timeout: must be more than 0s, e.g. \"15s\"".into());
        }
        if !(1..=5000).contains(&self.api.batch_size) {
            return Err(format!(
                "api.batch_size: {} is out of range; use 1 to 5000 (200 is a good default)",
                self.api.batch_size
            ));
        }
        if self.api.retry_max_delay < Duration::from_millis(100) {
            return Err("api.retry_max_delay: must be at least 100ms, e.g. \"15s\"".into());
        }
        if purpose == Purpose::Daemon && self.reader.port.is_none() {
            return Err(
                "reader.port: missing; set port = \"/dev/serial/by-id/…\" (or \"tcp://host:port\") in [reader]".into(),
            );
        }
        if let Some(port) = &self.reader.port
            && let Some(addr) = port.strip_prefix("tcp://")
            && addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none()
        {
            return Err(format!("reader.port: \"{port}\" needs a port number, e.g. \"tcp://192.168.1.50:23\""));
        }
        if self.reader.baud_rate == 0 {
            return Err("reader.baud_rate: must be more than 0, e.g. 115200".into());
        }
        if !(5..=8).contains(&self.reader.data_bits) {
            return Err(format!("reader.data_bits: {} is not 5, 6, 7 or 8", self.reader.data_bits));
        }
        if !(1..=2).contains(&self.reader.stop_bits) {
            return Err(format!("reader.stop_bits: {} is not 1 or 2", self.reader.stop_bits));
        }
        if self.reader.format == Format::Regex {
            let re = regex::Regex::new(&self.reader.pattern)
                .map_err(|e| format!("reader.pattern: not a valid regular expression: {e}"))?;
            if !re.capture_names().any(|n| n == Some("chip")) {
                return Err("reader.pattern: needs a named group (?P<chip>…) that captures the chip code".into());
            }
        }
        crate::timestamp::TimestampFormat::parse(&self.reader.timestamp_format)
            .map_err(|e| format!("reader.timestamp_format: {e}"))?;
        self.reader.timezone.parse::<chrono_tz::Tz>().map_err(|_| {
            format!(
                "reader.timezone: \"{}\" is not an IANA time zone name; use e.g. \"UTC\" or \"Europe/Madrid\"",
                self.reader.timezone
            )
        })?;
        if self.passings.dedup_keep == DedupKeep::Strongest && self.passings.dedup_window.is_zero() {
            return Err(
                "passings.dedup_keep: \"strongest\" needs a window; set passings.dedup_window, e.g. \"3s\"".into()
            );
        }
        if let Some(map) = &self.passings.bib_map
            && purpose == Purpose::Daemon
            && !map.exists()
        {
            return Err(format!("passings.bib_map: {} does not exist; fix the path or remove the key", map.display()));
        }
        check_alias(&self.session.alias).map_err(|e| format!("session.alias: {e}"))?;
        if self.storage.commit_interval.is_zero() || self.storage.commit_interval > Duration::from_secs(1) {
            return Err("storage.commit_interval: use a value between 1ms and 1s (default \"50ms\")".into());
        }
        if let Some(listen) = &self.http.listen {
            let addr: std::net::SocketAddr = listen
                .parse()
                .map_err(|_| format!("http.listen: \"{listen}\" is not an address:port, e.g. \"127.0.0.1:8080\""))?;
            if !addr.ip().is_loopback() {
                match &self.http.token {
                    None => {
                        return Err(format!(
                            "http.token: required because http.listen = \"{listen}\" is reachable from the network; set a random token of {TOKEN_MIN} characters or more (e.g. from `openssl rand -hex 16`)"
                        ));
                    }
                    Some(token) if token.expose().chars().count() < TOKEN_MIN => {
                        return Err(format!(
                            "http.token: too short for http.listen = \"{listen}\", which is reachable from the network: use {TOKEN_MIN} characters or more (e.g. from `openssl rand -hex 16`)"
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(bad) = self.http.hosts.iter().find(|h| h.is_empty() || h.contains(['/', ' ', '@'])) {
            return Err(format!("http.hosts: \"{bad}\" is not a host name, e.g. \"rufus-box.local\""));
        }
        if let Some(listen) = &self.feed.listen {
            listen
                .parse::<std::net::SocketAddr>()
                .map_err(|_| format!("feed.listen: \"{listen}\" is not an address:port, e.g. \"0.0.0.0:3097\""))?;
        }
        self.log.level.parse::<tracing_subscriber::filter::EnvFilter>().map_err(|e| {
            format!(
                "log.level: \"{}\" is not a level or filter ({e}); use error, warn, info, debug or trace",
                self.log.level
            )
        })?;
        Ok(())
    }

    pub fn deviceid(&self) -> &str {
        self.api.deviceid.as_deref().unwrap_or("")
    }

    /// The secrets-masked summary printed by `check-config`.
    pub fn summary(&self) -> String {
        let key = self.api.api_key.as_ref().map(Secret::masked).unwrap_or_else(|| "(unset)".into());
        let token = if self.http.token.is_some() { "(set)" } else { "(unset)" };
        let or_off = |v: &Option<String>| v.clone().unwrap_or_else(|| "off".into());
        [
            format!(
                "api        {} (key {key}, device {})",
                self.api.base_url,
                self.api.deviceid.as_deref().map(mask).unwrap_or_else(|| "(unset)".into())
            ),
            format!(
                "           timeout {}, batch {}",
                humantime::format_duration(self.api.timeout),
                self.api.batch_size
            ),
            format!(
                "reader     {} {:?} {} {}{}{} ({:?} time, zone {})",
                self.reader.port.as_deref().unwrap_or("(unset)"),
                self.reader.format,
                self.reader.baud_rate,
                self.reader.data_bits,
                match self.reader.parity {
                    Parity::None => "N",
                    Parity::Odd => "O",
                    Parity::Even => "E",
                },
                self.reader.stop_bits,
                self.reader.timestamps,
                self.reader.timezone
            ),
            format!(
                "passings   dedup {} ({:?}), bib map {}",
                humantime::format_duration(self.passings.dedup_window),
                self.passings.dedup_keep,
                self.passings
                    .bib_map
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none (bib = chip)".into())
            ),
            format!("session    alias {}, auto start {}", self.session.alias, self.session.auto_start),
            format!("clock      {:?}", self.clock.source),
            format!(
                "storage    {} (retention {})",
                self.storage.path.display(),
                humantime::format_duration(self.storage.retention)
            ),
            format!("control    {}", self.control.socket.display()),
            format!("http       {} (token {token})", or_off(&self.http.listen)),
            format!("feed       {}", or_off(&self.feed.listen)),
            format!("log        {} to {:?}", self.log.level, self.log.target),
        ]
        .join("\n")
    }
}

/// Plain http is allowed only to a loopback address (tests, a local proxy): the key travels in a header.
/// The reader's port is the kernel's console? On a Raspberry Pi `/dev/serial0` (`ttyS0` or
/// `ttyAMA0`) carries the login console by default: a getty and kernel messages would share the
/// reader's bytes. Says what to do about it, or `None` when the port is not a console.
pub fn console_warning(reader: &ReaderConfig) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    console_warning_for(reader.port.as_deref()?, &cmdline, Path::new("/dev"))
}

/// What is valid but unwise: printed by `check-config`, logged at start.
pub fn warnings(cfg: &Config) -> Vec<String> {
    let mut out: Vec<String> = console_warning(&cfg.reader).into_iter().collect();
    if let Some(file) = &cfg.api.api_key_file
        && let Ok(meta) = std::fs::metadata(file)
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            out.push(format!(
                "api.api_key_file: {} can be read by others than its owner (mode {:o}): members of the \
                 rufus-gateway group may use the control socket, but should not read the API key. \
                 Run `chown rufus-gateway: {0} && chmod 600 {0}`",
                file.display(),
                meta.permissions().mode() & 0o777
            ));
        }
    }
    out
}

fn console_warning_for(port: &str, cmdline: &str, dev: &Path) -> Option<String> {
    if port.starts_with("tcp://") {
        return None;
    }
    // The device a name finally points at (`/dev/serial0` -> `ttyS0`), as a bare name.
    let device = |path: &Path| -> Option<String> {
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        real.file_name().map(|n| n.to_string_lossy().into_owned())
    };
    let port_device = device(Path::new(port))?;
    cmdline.split_whitespace().filter_map(|arg| arg.strip_prefix("console=")).find_map(|value| {
        let name = value.split(',').next().unwrap_or_default();
        (!name.is_empty() && device(&dev.join(name)).as_deref() == Some(port_device.as_str())).then(|| {
            format!(
                "reader.port {port} is the kernel's console (console={value} in /proc/cmdline): a login prompt and \
                 kernel messages share this port with the reader. Turn the console off: on a Raspberry Pi, \
                 `raspi-config` > Interface Options > Serial Port: login shell No, hardware Yes (or remove \
                 console={value} from /boot/firmware/cmdline.txt and `systemctl disable --now serial-getty@{port_device}`), then reboot"
            )
        })
    })
}

fn validate_base_url(url: &str) -> Result<(), String> {
    let fix = "use https://…, or http:// only to 127.0.0.1, ::1 or localhost";
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("api.base_url: \"{url}\" is not a URL ({e}); {fix}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
                Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(format!("api.base_url: plain http to a non-loopback host sends the API key in clear; {fix}"))
            }
        }
        other => Err(format!("api.base_url: scheme \"{other}\" is not supported; {fix}")),
    }
}

/// serde's messages name the field but not always the section; add the hint a person needs.
fn explain_serde(message: &str) -> String {
    if message.contains("unknown field") {
        format!("{message}; remove or correct the key (see the commented example config)")
    } else if let Some(choices) = enum_choices(message) {
        // The config crate says "enum Parity does not have variant constructor x for key …":
        // name the values that are accepted instead.
        format!("{message}; expected {choices}")
    } else {
        message.to_string()
    }
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
    fn a_reader_on_the_kernel_console_is_warned_about() {
        let dev = tempfile::tempdir().unwrap();
        let tty = dev.path().join("ttyS0");
        std::fs::write(&tty, "").unwrap();
        std::os::unix::fs::symlink(&tty, dev.path().join("serial0")).unwrap();
        std::fs::write(dev.path().join("ttyUSB0"), "").unwrap();
        let serial0 = dev.path().join("serial0").display().to_string();
        let usb = dev.path().join("ttyUSB0").display().to_string();
        let pi = "coherent_pool=1M console=serial0,115200 console=tty1 root=PARTUUID=1 rootwait";
        let kernel = "console=ttyS0,115200 root=/dev/mmcblk0p2";
        // Through the symlink, either way round (the firmware may rewrite serial0 to ttyS0).
        for cmdline in [pi, kernel] {
            let warning = console_warning_for(&serial0, cmdline, dev.path()).expect(cmdline);
            assert!(warning.contains("kernel's console") && warning.contains("serial-getty@ttyS0"), "{warning}");
        }
        assert!(console_warning_for(&tty.display().to_string(), pi, dev.path()).is_some());
        assert_eq!(console_warning_for(&usb, pi, dev.path()), None);
        assert_eq!(console_warning_for(&serial0, "console=tty1 quiet", dev.path()), None);
        assert_eq!(console_warning_for("tcp://192.0.2.1:23", pi, dev.path()), None);
    }

    #[test]
    fn mask_hides_most_of_a_key() {
        assert_eq!(mask("ror-ae4fc6c19681a20fad30"), "ror-ae…");
        assert_eq!(mask("short"), "****");
        assert_eq!(format!("{:?}", Secret::new("ror-ae4fc6c19681a20fad30")), "ror-ae…");
    }

    #[test]
    fn base_url_rules() {
        for ok in
            ["https://api.runonrufus.com/v0", "http://127.0.0.1:9000/v0", "http://localhost/v0", "http://[::1]:80/"]
        {
            assert!(validate_base_url(ok).is_ok(), "{ok}");
        }
        for bad in ["http://api.runonrufus.com/v0", "http://192.168.1.2/", "ftp://x/", "nonsense"] {
            let e = validate_base_url(bad).unwrap_err();
            assert!(e.starts_with("api.base_url"), "{e}");
        }
    }
}
