//! `[reader]`: the port, its settings, the format, and what to ask of the reader.

use super::*;

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
    /// Parsed once, here: a bad value is a config error naming the key.
    #[serde(deserialize_with = "timestamp_format")]
    pub timestamp_format: TimestampFormat,
    #[serde(deserialize_with = "zone")]
    pub timezone: chrono_tz::Tz,
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// Antennas that must read, even if never seen yet; others are tracked once seen.
    pub antennas: Vec<i64>,
    /// An antenna silent this long while the others read is a problem ("0s": never).
    #[serde(deserialize_with = "duration")]
    pub antenna_silence: Duration,
    /// What to do with the reader's clock; `None`: `measure` where the format can, else `ignore`
    /// (see [`ReaderConfig::clock_mode`]).
    pub clock: Option<ClockMode>,
    /// How often the reader clock's offset is measured.
    #[serde(deserialize_with = "duration")]
    pub clock_check: Duration,
    /// An offset beyond this is a problem.
    #[serde(deserialize_with = "duration")]
    pub clock_tolerance: Duration,
    /// After each (re)connect, ask the reader to replay what was missed.
    pub rewind: bool,
    /// The Ultra's rewind command: ChronoKeep's `600…\n` or PikaTimer's `6␀␀…\r`.
    pub ultra_rewind_form: UltraRewindForm,
    /// An IPICO Elite's text control port (`tcp://host:9999`): its clock is asked and set there
    /// (`getdate`, `setdate.`), and a rewind is a `replay_start` to `elite_replay_port`. Empty: an
    /// IPICO Lite, talked to on its stream.
    #[serde(deserialize_with = "empty_is_none")]
    pub elite_control: Option<String>,
    /// The port an Elite replays to (on the control port's host).
    pub elite_replay_port: u16,
    /// A reader time further than this from a synchronised host clock is not believed: a live
    /// read keeps the host's time instead (counted as `retimed`), a replayed one is refused.
    #[serde(deserialize_with = "duration")]
    pub max_skew: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    Ignore,
    Measure,
    Set,
}

impl ClockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ClockMode::Ignore => "ignore",
            ClockMode::Measure => "measure",
            ClockMode::Set => "set",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UltraRewindForm {
    Ascii,
    Binary,
}

impl ReaderConfig {
    /// The clock mode in force: the configured one, else `measure` for formats whose reader
    /// can tell its time (IPICO and Ultra on request, Impinj in every read), else `ignore`.
    pub fn clock_mode(&self) -> ClockMode {
        match (self.clock, self.format) {
            (Some(mode), _) => mode,
            (None, Format::Ipico | Format::Ultra | Format::ImpinjJson) => ClockMode::Measure,
            (None, _) => ClockMode::Ignore,
        }
    }
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
            timestamp_format: TimestampFormat::Rfc3339,
            timezone: chrono_tz::Tz::UTC,
            poll_interval: Duration::ZERO,
            antennas: Vec::new(),
            antenna_silence: Duration::from_secs(300),
            clock: None,
            clock_check: Duration::from_secs(300),
            clock_tolerance: Duration::from_secs(1),
            rewind: false,
            ultra_rewind_form: UltraRewindForm::Ascii,
            elite_control: None,
            elite_replay_port: 10300,
            max_skew: Duration::from_secs(24 * 3600),
        }
    }
}
