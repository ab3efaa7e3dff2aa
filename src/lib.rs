//! rufus-gateway: race-timing RFID reader → SQLite → RUFUS Cloud API.
//!
//! # Layout
//!
//! ```text
//! serial/TCP ─► reader ──Read──► store ──"new work"──► uplink ──HTTP──► RUFUS API
//!               (thread)  bounded (thread, the only     (task: replays the store
//!                         channel  SQLite writer)        in order, retries forever)
//!                                    ▲   ▲
//!                  control socket ───┘   └── uplink outcomes (delivered, refused, …)
//! ```
//!
//! - [`reader`]: port open/reopen (serial or TCP, [`reader::transport`]); one connection's pump
//!   in `reader::connection`; framed records, parsed reads and rejects in [`reader::record`] (a
//!   leaf); one file per family in [`reader::format`], holding its framer, parser and commands
//!   (the Elite's control port in [`reader::elite`]); reader times through [`timestamp`];
//!   [`reader::talk`] measures and sets the clock and rewinds after a reconnect;
//!   reads per antenna and silent antennas in [`antennas`].
//! - [`store`]: group commit, de-duplication ([`dedup`]), `num_passing`, sessions, retention; the
//!   read side in [`store::query`].
//! - [`uplink`]: the RUFUS client ([`uplink::api`]), the pure decision after each outcome
//!   ([`uplink::policy`]), deliveries awaiting their record ([`uplink::ledger`]), and the replay loop.
//! - [`control`]: the Unix socket the CLI talks to; [`status`] is what it reports; [`watch`]
//!   streams the reads through it.
//! - [`http`] (dashboard, JSON API, [`metrics`]) and [`feed`] (passings as TCP lines): optional
//!   listeners ([`optional`]); every listener's bounds (caps, deadlines, bounded lines) are in
//!   [`limits`]. [`export`] writes CSV; every CSV cell follows [`csv_cell`].
//! - For a person next to the box, optional threads of their own: [`signal`] (a LED and a
//!   beeper through the Linux LED class) and [`backup`] (a live CSV copy on a USB stick).
//! - [`app`] wires the actors together; [`cli`] is the command line; [`supervisor`] handles the
//!   signals and the watchdog (fed by [`liveness`]), [`reload`] a SIGHUP; [`fdstore`] keeps the
//!   reader's port in systemd's descriptor store; [`clock`] stamps and watches synchronisation;
//!   [`logging`] goes to journald or stderr; [`panics`] aborts on a panic, except in the one
//!   guarded place (a reader record's parsing).
//! - [`demo`], with [`demo::fake_api`] and [`demo::pty`]: the self-contained demo and the test doubles it shares
//!   with the test suite.

// `unsafe` is denied, and allowed (with its reason, `SAFETY:`) in five functions only: two libc
// calls with no safe wrapper (`adjtimex` in clock.rs, `mallopt` in cli.rs), and two descriptor
// hand-overs whose APIs give raw descriptors (systemd's `LISTEN_FDS` in fdstore.rs; serialport's
// `TTYPort`, adopted and lent, in reader/transport.rs). The pty and tty ioctls use rustix.
#![deny(unsafe_code)]
// The layout above is for whoever works on the crate, whose modules are private: read it with
// `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

// Modules are private: the binary's surface is the two items below, so rustc reports every item
// nothing uses. The test suite and the benches (through the `test-support` feature, which the
// dev-dependency on this crate turns on, and a release build never does) see the modules as
// public.
macro_rules! modules {
    ($($name:ident),* $(,)?) => {
        $(
            #[cfg(feature = "test-support")]
            pub mod $name;
            #[cfg(not(feature = "test-support"))]
            mod $name;
        )*
    };
}

modules!(
    antennas, app, backup, cli, clock, config, control, csv_cell, dedup, demo, export, fdstore, feed, http, limits,
    liveness, logging, metrics, optional, panics, reader, reload, signal, status, store, supervisor, timestamp, uplink,
    watch,
);

pub use cli::{Cli, execute, exit_code};
pub use panics::abort_unless_caught;
