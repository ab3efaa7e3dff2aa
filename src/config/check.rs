//! What serde cannot check: required keys, ranges, https, time zones, token length, aliases;
//! the warnings `check-config` prints; and the summary it shows (secrets masked). Every error
//! names the key and the fix.

use super::*;

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

/// The reader's port is the kernel's console? On a Raspberry Pi `/dev/serial0` (`ttyS0` or
/// `ttyAMA0`) carries the login console by default: a getty and kernel messages would share the
/// reader's bytes. Says what to do about it, or `None` when the port is not a console.
pub fn console_warning(reader: &ReaderConfig) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    console_warning_for(reader.port.as_deref()?, &cmdline, Path::new("/dev"))
}

/// The config file at `path` holds the API key and any user of the box can read it.
pub fn config_file_warning(path: &Path, cfg: &Config) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if cfg.api.api_key.is_none() || cfg.api.api_key_file.is_some() {
        return None;
    }
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o004 != 0).then(|| {
        format!(
            "api.api_key: {} holds the API key and any user of this box can read it (mode {mode:o}). \
             Run `chgrp rufus-gateway {0} && chmod 640 {0}`, or move the key to api.api_key_file",
            path.display()
        )
    })
}

/// What is valid but unwise: printed by `check-config`, logged at start.
pub fn warnings(cfg: &Config) -> Vec<String> {
    let mut out: Vec<String> = console_warning(&cfg.reader).into_iter().collect();
    if cfg.reader.elite_control.is_some() {
        out.push(
            "reader.elite_control: an IPICO Elite's control and replay ports are known from one program only \
             (no capture): check its clock and a rewind on your reader before race day"
                .into(),
        );
    } else if cfg.reader.rewind && cfg.reader.format == Format::Ipico {
        out.push(
            "reader.rewind: an IPICO Lite is rewound by its stored-read download, known only from captures of \
             later firmware (not in the 2007 serial spec): try it on your reader before race day"
                .into(),
        );
    }
    if cfg.reader.rewind && cfg.reader.clock_mode() == ClockMode::Ignore {
        match cfg.reader.format {
            Format::Ipico => out.push(
                "reader.rewind: with reader.clock = \"ignore\" no rewind is run: an IPICO's stored reads are told \
                 from live ones (and an Elite's replay is bounded) by the reader's clock, measured at each connect. \
                 Use reader.clock = \"measure\""
                    .into(),
            ),
            Format::Ultra => out.push(
                "reader.rewind: with reader.clock = \"ignore\" an Ultra is rewound by log index only (when a live \
                 read shows the gap), never by time. Use reader.clock = \"measure\""
                    .into(),
            ),
            _ => {}
        }
    }
    if cfg.reader.clock_mode() == ClockMode::Set && cfg.reader.format == Format::Ultra {
        out.push(
            "reader.clock: setting an Ultra's clock is known from one source only, and only while it is not \
             reading: check the reader's clock after the first connect"
                .into(),
        );
    }
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

pub(super) fn console_warning_for(port: &str, cmdline: &str, dev: &Path) -> Option<String> {
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

/// Plain http is allowed only to a loopback address (tests, a local proxy): the key travels in a header.
pub(super) fn validate_base_url(url: &str) -> Result<(), String> {
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

impl Config {
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
        match (self.reader.clock_mode(), self.reader.format) {
            (ClockMode::Measure, Format::Regex | Format::Chafon) => {
                return Err(format!(
                    "reader.clock: a {:?} reader cannot tell its time; use \"ignore\" (measure works with ipico, ultra and impinj-json)",
                    self.reader.format
                ));
            }
            (ClockMode::Set, Format::Regex | Format::Chafon | Format::ImpinjJson) => {
                return Err(format!(
                    "reader.clock: the gateway cannot set a {:?} reader's clock; use \"measure\" or \"ignore\" (set works with ipico and ultra)",
                    self.reader.format
                ));
            }
            _ => {}
        }
        if let Some(control) = &self.reader.elite_control {
            if self.reader.format != Format::Ipico {
                return Err("reader.elite_control: only for an IPICO Elite (reader.format = \"ipico\")".into());
            }
            if control.strip_prefix("tcp://").and_then(|a| a.rsplit_once(':')).is_none() {
                return Err(format!(
                    "reader.elite_control: \"{control}\" is not tcp://host:port, e.g. \"tcp://192.168.1.50:9999\""
                ));
            }
        }
        for (key, name) in [("signal.led", &self.signal.led), ("signal.beeper", &self.signal.beeper)] {
            if name.contains(['/', '\0']) || name == "." || name == ".." {
                return Err(format!(
                    "{key}: \"{name}\" is a path, not a name; give the LED's name as `ls {}` lists it (e.g. \"ACT\")",
                    self.signal.leds_dir.display()
                ));
            }
        }
        if self.reader.max_skew < Duration::from_secs(60) {
            return Err("reader.max_skew: must be at least a minute, e.g. \"24h\"".into());
        }
        if self.reader.clock_tolerance.is_zero() {
            return Err("reader.clock_tolerance: must be more than 0, e.g. \"1s\"".into());
        }
        if self.reader.rewind && !matches!(self.reader.format, Format::Ipico | Format::Ultra) {
            return Err(format!(
                "reader.rewind: a {:?} reader cannot replay its reads (ipico and ultra can); set rewind = false",
                self.reader.format
            ));
        }
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
            format!(
                "rdr clock  {} (checked every {}, tolerance {}), rewind {}",
                self.reader.clock_mode().as_str(),
                humantime::format_duration(self.reader.clock_check),
                humantime::format_duration(self.reader.clock_tolerance),
                if self.reader.rewind { "on" } else { "off" }
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
            // `packaging/mount-backup` looks for "ext4 sticks allowed" on this line.
            format!(
                "backup     {}",
                self.backup.dir.as_ref().map_or_else(
                    || "off".to_string(),
                    |dir| format!(
                        "{} every {} (mount point {}, reads {}), ext4 sticks {}",
                        dir.display(),
                        humantime::format_duration(self.backup.interval),
                        if self.backup.require_mount { "required" } else { "not required" },
                        if self.backup.reads { "too" } else { "not kept" },
                        if self.backup.allow_ext4 { "allowed" } else { "refused" }
                    )
                )
            ),
            format!("log        {} to {:?}", self.log.level, self.log.target),
        ]
        .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `packaging/mount-backup` mounts an ext4 stick only if a config's summary has a line
    /// starting "backup " and ending "ext4 sticks allowed".
    #[test]
    fn the_summary_says_whether_ext4_sticks_are_allowed() {
        let line = |dir: Option<&str>, allow_ext4| {
            let config = Config {
                backup: BackupConfig { dir: dir.map(PathBuf::from), allow_ext4, ..BackupConfig::default() },
                ..Config::default()
            };
            config.summary().lines().find(|l| l.starts_with("backup ")).unwrap().to_string()
        };
        let allowed = line(Some("/media/rufus-backup"), true);
        assert!(allowed.ends_with("ext4 sticks allowed"), "{allowed}");
        assert!(allowed.contains("/media/rufus-backup every 5s"), "{allowed}");
        let refused = line(Some("/media/rufus-backup"), false);
        assert!(refused.ends_with("ext4 sticks refused"), "{refused}");
        // No backup, no stick: allow_ext4 alone opens nothing.
        assert_eq!(line(None, true), "backup     off");
    }

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
    fn the_reader_clock_and_rewind_fit_the_format() {
        let reader = |format, clock, rewind| Config {
            reader: ReaderConfig { format, clock, rewind, ..ReaderConfig::default() },
            ..Config::default()
        };
        for (format, default) in [
            (Format::Ipico, ClockMode::Measure),
            (Format::Ultra, ClockMode::Measure),
            (Format::ImpinjJson, ClockMode::Measure),
            (Format::Chafon, ClockMode::Ignore),
            (Format::Regex, ClockMode::Ignore),
        ] {
            assert_eq!(reader(format, None, false).reader.clock_mode(), default, "{format:?}");
            assert_eq!(reader(format, None, false).validate(Purpose::Local), Ok(()), "{format:?}");
        }
        let refused = [
            (Format::Chafon, Some(ClockMode::Measure), false, "reader.clock: a Chafon reader cannot tell its time"),
            (Format::ImpinjJson, Some(ClockMode::Set), false, "reader.clock: the gateway cannot set"),
            (Format::Regex, None, true, "reader.rewind: a Regex reader cannot replay"),
            (Format::ImpinjJson, None, true, "reader.rewind"),
        ];
        for (format, clock, rewind, error) in refused {
            let e = reader(format, clock, rewind).validate(Purpose::Local).unwrap_err();
            assert!(e.starts_with(error), "{e}");
        }
        assert_eq!(reader(Format::Ultra, Some(ClockMode::Set), true).validate(Purpose::Local), Ok(()));
        let warned = warnings(&reader(Format::Ipico, None, true));
        assert!(warned.iter().any(|w| w.starts_with("reader.rewind: an IPICO Lite")), "{warned:?}");
        let mut short = reader(Format::Ultra, None, false);
        short.reader.max_skew = Duration::from_secs(10);
        assert!(short.validate(Purpose::Local).unwrap_err().starts_with("reader.max_skew"));
        for format in [Format::Ipico, Format::Ultra] {
            let warned = warnings(&reader(format, Some(ClockMode::Ignore), true));
            assert!(warned.iter().any(|w| w.contains("reader.clock = \"ignore\"")), "{format:?}: {warned:?}");
        }
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
