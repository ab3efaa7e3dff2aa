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

/// What the LED and the beeper do, as a pure function of what happened and when: the thread
/// feeds it health and passings with the time, and performs what it answers. Nothing here reads
/// a clock or a file.
#[derive(Debug, Clone)]
struct Policy {
    has_led: bool,
    has_beeper: bool,
    beep_on: BeepOn,
    pattern: Pattern,
    /// When the pattern began (its blinks count from here).
    epoch: Instant,
    blip_until: Option<Instant>,
    beep_until: Option<Instant>,
    /// Beeps asked for and not begun yet; the next may begin at `beep_next`.
    beeps_waiting: u32,
    beep_next: Instant,
    /// The reader-lost alarm: when its current round started.
    alarm: Option<Instant>,
    lost_in_race: bool,
}

/// Something the policy is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Health(Health),
    Passing { test: bool },
    /// Only time passed.
    Tick,
}

/// What to show now, and when to ask again at the latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Output {
    led: bool,
    beeper: bool,
    /// A beep began now (counted in `status.signal.beeps_total`).
    beep_began: bool,
    /// The next moment something can change without being told (`None`: nothing will).
    wake_at: Option<Instant>,
}

/// How often the alarm's beeps are looked at while it sounds.
const ALARM_TICK: Duration = Duration::from_millis(25);

impl Policy {
    fn new(has_led: bool, has_beeper: bool, beep_on: BeepOn, now: Instant) -> Self {
        Self {
            has_led,
            has_beeper,
            beep_on,
            pattern: Pattern::Off,
            epoch: now,
            blip_until: None,
            beep_until: None,
            beeps_waiting: 0,
            beep_next: now,
            alarm: None,
            lost_in_race: false,
        }
    }

    fn on(&mut self, input: Input, now: Instant) -> Output {
        match input {
            Input::Health(h) => {
                if h.pattern != self.pattern {
                    self.pattern = h.pattern;
                    self.epoch = now;
                }
                if h.reader_lost_in_race && !self.lost_in_race {
                    self.alarm = Some(now);
                }
                if !h.reader_lost_in_race {
                    self.alarm = None;
                }
                self.lost_in_race = h.reader_lost_in_race;
            }
            Input::Passing { test } => {
                if self.has_led {
                    self.blip_until = Some(now + BLIP);
                }
                let wanted = match self.beep_on {
                    BeepOn::Always => true,
                    BeepOn::Test => test,
                    BeepOn::Never => false,
                };
                if wanted && self.has_beeper {
                    self.beeps_waiting = (self.beeps_waiting + 1).min(BEEPS_QUEUED);
                }
            }
            Input::Tick => {}
        }
        // The LED: the pattern, inverted during a blip.
        let blip = self.blip_until.is_some_and(|t| now < t);
        let led = self.pattern.level(now - self.epoch) != blip;
        // The beeper: a passing's beep, or the alarm's three beeps.
        let alarm_on = self.alarm.is_some_and(|start| {
            let t = (now - start).as_millis() % ALARM_EVERY.as_millis();
            let slot = t / ALARM_BEEP.as_millis();
            slot < 6 && slot.is_multiple_of(2)
        });
        let beep_began = self.beeps_waiting > 0 && now >= self.beep_next;
        if beep_began {
            self.beeps_waiting -= 1;
            self.beep_until = Some(now + BEEP);
            self.beep_next = now + BEEP + BEEP_GAP;
        }
        let beeper = self.beep_until.is_some_and(|t| now < t) || alarm_on;
        // The next thing that can change.
        let queued = (self.beeps_waiting > 0).then_some(self.beep_next);
        let edge = self.pattern.next_edge(now - self.epoch).map(|e| self.epoch + e);
        let alarm = self.alarm.map(|_| now + ALARM_TICK);
        let wake_at = [self.blip_until, self.beep_until, queued]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .chain(edge)
            .chain(alarm)
            .min();
        Output { led, beeper, beep_began, wake_at }
    }
}

/// The thread: asks for health once a second, tells the policy, and performs what it answers.
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
    let mut policy = Policy::new(led.is_some(), beeper.is_some(), cfg.beep_on_passing, Instant::now());
    let mut next_health = Instant::now();
    let mut failed_write = false;
    let mut input = Input::Tick;
    loop {
        let now = Instant::now();
        if now >= next_health {
            next_health = now + HEALTH_EVERY;
            if let Some(h) = health() {
                policy.on(Input::Health(h), now);
                update(&|st| st.led_pattern = Some(h.pattern));
            }
        }
        let out = policy.on(std::mem::replace(&mut input, Input::Tick), now);
        if out.beep_began {
            update(&|s| s.beeps_total += 1);
        }
        let mut result = Ok(());
        if let Some(d) = led.as_mut() {
            result = result.and(d.set(out.led));
        }
        if let Some(d) = beeper.as_mut() {
            result = result.and(d.set(out.beeper));
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
        let wake = out.wake_at.map_or(next_health, |t| t.min(next_health));
        match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(Event::Passing { test }) => input = Input::Passing { test },
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

    /// The policy as a table: at each time (ms), what it is told, and what it answers (LED,
    /// beeper, when to ask again).
    #[test]
    fn the_policy_as_a_table() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let health = |pattern, lost| Input::Health(Health { pattern, reader_lost_in_race: lost });
        let mut p = Policy::new(true, true, BeepOn::Test, t0);
        #[rustfmt::skip]
        let table: &[(u64, Input, bool, bool, Option<u64>)] = &[
            // All well: steady, nothing to wake for.
            (0, health(Pattern::Steady, false), true, false, None),
            // A test passing: a blip (inverted) and a beep, both 60 ms.
            (100, Input::Passing { test: true }, false, true, Some(160)),
            (160, Input::Tick, true, false, None),
            // A race passing with beep_on_passing = test: a blip, no beep.
            (200, Input::Passing { test: false }, false, false, Some(260)),
            // Three test passings at once: the beeps queue, 60 on and 80 off each.
            (300, Input::Passing { test: true }, false, true, Some(360)),
            (301, Input::Passing { test: true }, false, true, Some(360)),
            (302, Input::Passing { test: true }, false, true, Some(360)),
            (362, Input::Tick, true, false, Some(440)),
            (440, Input::Tick, true, true, Some(500)),
            (500, Input::Tick, true, false, Some(580)),
            (580, Input::Tick, true, true, Some(640)),
            (640, Input::Tick, true, false, None),
            // The reader is lost in a race: fast blink from now, and the alarm's beeps.
            (1000, health(Pattern::Fast, true), true, true, Some(1025)),
            (1125, Input::Tick, false, true, Some(1150)),
            (1150, Input::Tick, false, false, Some(1175)),
            (1300, Input::Tick, true, true, Some(1325)),
            (1450, Input::Tick, false, false, Some(1475)),
            // After the three beeps, silence until the next round 30 s after the first.
            (1900, Input::Tick, false, false, Some(1925)),
            (31_000, Input::Tick, true, true, Some(31_025)),
            // Back: slow blink, no alarm; the next edge is half a second after the change.
            (31_100, health(Pattern::Slow, false), true, false, Some(31_600)),
            (31_600, Input::Tick, false, false, Some(32_100)),
        ];
        for (ms, input, led, beeper, wake) in table {
            let out = p.on(*input, at(*ms));
            assert_eq!(
                (out.led, out.beeper, out.wake_at),
                (*led, *beeper, wake.map(at)),
                "at {ms} ms, told {input:?}"
            );
        }
        // No LED, no beeper: a passing changes nothing.
        let mut quiet = Policy::new(false, false, BeepOn::Always, t0);
        quiet.on(health(Pattern::Steady, false), t0);
        let out = quiet.on(Input::Passing { test: true }, at(1));
        assert_eq!((out.led, out.beeper, out.wake_at, out.beep_began), (true, false, None, false));
    }
}
