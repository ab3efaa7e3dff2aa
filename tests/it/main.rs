//! The integration suite, one crate: each module drives the real binary (`CARGO_BIN_EXE_…`)
//! through the interfaces a timer or systemd would use. One crate links axum, reqwest and
//! SQLite once, instead of once per file. Run one module with a filter, e.g.
//! `cargo test --test it -- hostile::`.

mod common;

mod backup;
mod booted;
mod config;
mod crash;
mod dashboard;
mod demo;
mod faults;
mod field;
mod formats;
mod fuzz;
mod hostile;
mod lan_trust;
mod layout;
mod operations;
mod pipeline;
mod reader_trust;
mod screenless;
mod systemd;
mod talk;
mod upgrade;
