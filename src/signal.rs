//! The box speaks to a person next to it: a LED and a beeper, through the Linux LED class
//! (`/sys/class/leds/<name>/{brightness,trigger,max_brightness}`), which covers the Raspberry
//! Pi's own ACT/PWR LEDs and any LED or buzzer on a GPIO pin (the `gpio-led` overlay).
//!
//! | LED | meaning |
//! |---|---|
//! | steady on | all well: reader connected, a session open, uplink online or idle, clock synchronised |
//! | fast blink (4 Hz) | the reader is disconnected, or storage fails |
//! | slow blink (1 Hz) | needs attention: passings wait over a minute for the API, the key is refused, the clock is not synchronised, an antenna is silent, the backup cannot be written, or no session is open |
//! | a short blip | a passing |
//! | off | the daemon is stopped (its trigger is given back) |
//!
//! The beeper beeps once per passing (in a test session by default, `beep_on_passing`) and three
//! times, every 30 s, while the reader is lost during a race session.
//!
//! Optional and isolated: a thread of its own, and a LED that cannot be written is a line in the
//! journal and in `status.signal`, never a stop.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{BeepOn, SignalConfig};

/// Half a period of the fast blink (4 Hz).
const FAST: Duration = Duration::from_millis(125);
/// Half a period of the slow blink (1 Hz).
const SLOW: Duration = Duration::from_millis(500);
/// A passing's blip: the LED inverted this long.
const BLIP: Duration = Duration::from_millis(60);
/// A beep, and the silence after it before the next one (passings close together still beep
/// once each, up to `BEEPS_QUEUED` waiting).
const BEEP: Duration = Duration::from_millis(60);
const BEEP_GAP: Duration = Duration::from_millis(80);
const BEEPS_QUEUED: u32 = 4;
/// The reader-lost alarm: three beeps of this length, this far apart, repeated every `ALARM_EVERY`.
const ALARM_BEEP: Duration = Duration::from_millis(150);
const ALARM_EVERY: Duration = Duration::from_secs(30);
/// How often the state is looked at again.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// Passings waiting longer than this for the API ask for attention.
pub const PENDING_TOO_LONG: Duration = Duration::from_secs(60);

/// What the LED shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    Steady,
    Fast,
    Slow,
    Off,
}

impl Pattern {
    /// On or off at `t` since the pattern's epoch.
    pub fn level(self, t: Duration) -> bool {
        match self {
            Pattern::Steady => true,
            Pattern::Off => false,
            Pattern::Fast => (t.as_millis() / FAST.as_millis()).is_multiple_of(2),
            Pattern::Slow => (t.as_millis() / SLOW.as_millis()).is_multiple_of(2),
        }
    }

    /// When the level next changes, after `t`.
    fn next_edge(self, t: Duration) -> Option<Duration> {
        let half = match self {
            Pattern::Fast => FAST,
            Pattern::Slow => SLOW,
            Pattern::Steady | Pattern::Off => return None,
        };
        let n = t.as_millis() / half.as_millis() + 1;
        Some(half * n as u32)
    }
}

/// What the LED and the beeper are to show of the state (see `Status::health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub pattern: Pattern,
    /// The reader is disconnected while a race session is open (the beeper's alarm).
    pub reader_lost_in_race: bool,
}

/// `status.signal`: what the LED shows and whether the devices can be driven.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SignalStatus {
    pub led: Option<String>,
    pub beeper: Option<String>,
    pub led_pattern: Option<Pattern>,
    pub beeps_total: u64,
    pub error: Option<String>,
}

/// One LED-class device: its brightness for "on", and the trigger to give back.
struct Device {
    name: String,
    dir: PathBuf,
    on: String,
    trigger: Option<String>,
    level: Option<bool>,
}

impl Device {
    /// Take the device over: remember its trigger, set "none" (so only we drive it), turn it off.
    fn open(leds_dir: &Path, name: &str) -> Result<Device, String> {
        let dir = leds_dir.join(name);
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).map(|s| s.trim().to_string());
        let max = read("max_brightness").map_err(|e| format!("{}: {e}", dir.join("max_brightness").display()))?;
        // The selected trigger is the one in brackets: "none [mmc0] timer".
        let trigger = read("trigger").ok().and_then(|t| {
            t.split_whitespace().find(|w| w.starts_with('[')).map(|w| w.trim_matches(['[', ']']).to_string())
        });
        let mut device = Device {
            name: name.to_string(),
            dir,
            on: max.parse::<u32>().unwrap_or(1).max(1).to_string(),
            trigger,
            level: None,
        };
        device.write("trigger", "none")?;
        device.set(false)?;
        Ok(device)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        // As `echo value > file` does (sysfs ignores the truncation; a stand-in file needs it).
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{value}\n").as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    fn set(&mut self, on: bool) -> Result<(), String> {
        if self.level == Some(on) {
            return Ok(());
        }
        self.level = Some(on);
        self.write("brightness", if on { &self.on } else { "0" })
    }

    /// Off, and the trigger it had given back (a clean stop).
    fn release(&mut self) {
        let _ = self.set(false);
        if let Some(trigger) = self.trigger.as_deref().filter(|t| *t != "none")
            && let Err(e) = self.write("trigger", trigger)
        {
            warn!(device = %self.name, error = %e, "cannot give the LED its trigger back");
        }
    }
}

/// Something to tell the signal thread.
pub enum Event {
    /// A passing was committed (of a test session or not).
    Passing {
        test: bool,
    },
    Stop,
}

/// The running signal thread.
pub struct Signal {
    tx: SyncSender<Event>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Signal {
    /// Start driving the configured LED and beeper; None when neither is configured.
    /// `health` is called once a second (a status snapshot; it may block on SQLite).
    pub fn start(
        cfg: &SignalConfig,
        health: impl Fn() -> Option<Health> + Send + 'static,
        shown: Arc<Mutex<SignalStatus>>,
    ) -> anyhow::Result<Option<Signal>> {
        if cfg.led.is_empty() && cfg.beeper.is_empty() {
            return Ok(None);
        }
        // Passings beyond what the thread has taken are dropped: a blip more or less.
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new().name("signal".into()).spawn(move || run(&cfg, rx, health, &shown))?;
        Ok(Some(Signal { tx, thread: Some(thread) }))
    }

    pub fn sender(&self) -> SyncSender<Event> {
        self.tx.clone()
    }

    /// Turn everything off, give the triggers back, and wait for the thread.
    pub fn stop(mut self) {
        let _ = self.tx.send(Event::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(cfg: &SignalConfig, rx: Receiver<Event>, health: impl Fn() -> Option<Health>, shown: &Mutex<SignalStatus>) {
    let update = |f: &dyn Fn(&mut SignalStatus)| {
        if let Ok(mut s) = shown.lock() {
            f(&mut s);
        }
    };
    let open = |name: &str| -> Option<Device> {
        if name.is_empty() {
            return None;
        }
        match Device::open(&cfg.leds_dir, name) {
            Ok(d) => {
                info!(device = name, "driving LED-class device");
                Some(d)
            }
            Err(e) => {
                warn!(device = name, error = %e, "cannot drive the LED-class device; carrying on without it");
                update(&|s| s.error = Some(e.clone()));
                None
            }
        }
    };
    update(&|s| {
        s.led = (!cfg.led.is_empty()).then(|| cfg.led.clone());
        s.beeper = (!cfg.beeper.is_empty()).then(|| cfg.beeper.clone());
    });
    let mut led = open(&cfg.led);
    let mut beeper = open(&cfg.beeper);
    let mut pattern = Pattern::Off;
    let mut epoch = Instant::now();
    let mut next_health = Instant::now();
    let mut blip_until: Option<Instant> = None;
    let mut beep_until: Option<Instant> = None;
    // Beeps asked for and not begun yet; the next may begin at `beep_next`.
    let mut beeps_waiting = 0u32;
    let mut beep_next = Instant::now();
    // The alarm: when the current round started, and when the next one is due.
    let mut alarm: Option<Instant> = None;
    let mut lost_in_race = false;
    let mut failed_write = false;
    loop {
        let now = Instant::now();
        if now >= next_health {
            next_health = now + HEALTH_EVERY;
            if let Some(h) = health() {
                if h.pattern != pattern {
                    pattern = h.pattern;
                    epoch = now;
                }
                let lost = h.reader_lost_in_race;
                if lost && !lost_in_race {
                    alarm = Some(now);
                }
                if !lost {
                    alarm = None;
                }
                lost_in_race = lost;
                update(&|st| st.led_pattern = Some(pattern));
            }
        }
        // The LED: the pattern, inverted during a blip.
        let blip = blip_until.is_some_and(|t| now < t);
        let mut level = pattern.level(now - epoch);
        if blip {
            level = !level;
        }
        // The beeper: a passing's beep, or the alarm's three beeps.
        let alarm_on = alarm.is_some_and(|start| {
            let t = (now - start).as_millis() % ALARM_EVERY.as_millis();
            let slot = t / ALARM_BEEP.as_millis();
            slot < 6 && slot.is_multiple_of(2)
        });
        if beeps_waiting > 0 && now >= beep_next {
            beeps_waiting -= 1;
            beep_until = Some(now + BEEP);
            beep_next = now + BEEP + BEEP_GAP;
            update(&|s| s.beeps_total += 1);
        }
        let beep = beep_until.is_some_and(|t| now < t) || alarm_on;
        let mut result = Ok(());
        if let Some(d) = led.as_mut() {
            result = result.and(d.set(level));
        }
        if let Some(d) = beeper.as_mut() {
            result = result.and(d.set(beep));
        }
        match result {
            Err(e) if !failed_write => {
                warn!(error = %e, "cannot drive the LED or beeper; retrying quietly");
                failed_write = true;
                update(&|s| s.error = Some(e.clone()));
            }
            Ok(()) if failed_write => {
                failed_write = false;
                update(&|s| s.error = None);
            }
            _ => {}
        }
        // Sleep until the next thing that can change.
        let mut wake = next_health;
        let queued = (beeps_waiting > 0).then_some(beep_next);
        for t in [blip_until, beep_until, queued].into_iter().flatten().filter(|t| *t > now) {
            wake = wake.min(t);
        }
        if let Some(edge) = pattern.next_edge(now - epoch) {
            wake = wake.min(epoch + edge);
        }
        if alarm.is_some() {
            wake = wake.min(now + Duration::from_millis(25));
        }
        match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(Event::Passing { test }) => {
                let at = Instant::now();
                if led.is_some() {
                    blip_until = Some(at + BLIP);
                }
                let wanted = match cfg.beep_on_passing {
                    BeepOn::Always => true,
                    BeepOn::Test => test,
                    BeepOn::Never => false,
                };
                if wanted && beeper.is_some() {
                    beeps_waiting = (beeps_waiting + 1).min(BEEPS_QUEUED);
                }
            }
            Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    for d in [led.as_mut(), beeper.as_mut()].into_iter().flatten() {
        d.release();
    }
    update(&|s| s.led_pattern = Some(Pattern::Off));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_blink_at_their_rates() {
        let edges = |p: Pattern| {
            (0..2000).filter(|ms| p.level(Duration::from_millis(*ms)) != p.level(Duration::from_millis(ms + 1))).count()
        };
        assert_eq!(edges(Pattern::Fast), 16, "4 Hz: 8 on-off cycles in 2 s");
        assert_eq!(edges(Pattern::Slow), 4, "1 Hz: 2 cycles in 2 s");
        assert_eq!(edges(Pattern::Steady), 0);
        assert!(Pattern::Steady.level(Duration::from_secs(7)) && !Pattern::Off.level(Duration::ZERO));
        assert_eq!(Pattern::Fast.next_edge(Duration::from_millis(130)), Some(Duration::from_millis(250)));
        assert_eq!(Pattern::Steady.next_edge(Duration::ZERO), None);
    }

    #[test]
    fn a_device_is_taken_over_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let led = dir.path().join("ACT");
        std::fs::create_dir(&led).unwrap();
        std::fs::write(led.join("max_brightness"), "255\n").unwrap();
        std::fs::write(led.join("trigger"), "none [mmc0] timer heartbeat\n").unwrap();
        std::fs::write(led.join("brightness"), "0\n").unwrap();
        let mut d = Device::open(dir.path(), "ACT").unwrap();
        assert_eq!(std::fs::read_to_string(led.join("trigger")).unwrap(), "none\n");
        d.set(true).unwrap();
        assert_eq!(std::fs::read_to_string(led.join("brightness")).unwrap(), "255\n");
        d.release();
        assert_eq!(std::fs::read_to_string(led.join("brightness")).unwrap(), "0\n");
        assert_eq!(std::fs::read_to_string(led.join("trigger")).unwrap(), "mmc0\n");
        let missing = Device::open(dir.path(), "nope").err().unwrap();
        assert!(missing.contains("nope/max_brightness"), "{missing}");
    }
}
