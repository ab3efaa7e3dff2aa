//! The command line (DESIGN.md, "Command line") and what each command does.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH, Purpose};
use crate::control::{self, NotRunning, Request};
use crate::store::query::Db;

#[derive(Debug, Parser)]
#[command(name = "rufus-gateway", version, about = "Race-timing RFID reader → RUFUS Cloud gateway")]
pub struct Cli {
    /// The configuration file.
    #[arg(short, long, global = true, env = "RUFUS_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (what systemd runs).
    Run,
    /// Load and validate the config; print a summary with secrets masked.
    CheckConfig,
    /// Ask the running daemon for its state.
    Status {
        /// The whole status as JSON (the same as `GET /api/status`), for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Open, close or list timing sessions.
    Session {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Passings (or raw reads) as CSV; works without the daemon.
    Export {
        /// Only this session (its id, from `session list`); every session by default.
        #[arg(long)]
        session: Option<i64>,
        /// The raw reads instead of the passings.
        #[arg(long)]
        reads: bool,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Follow the running daemon: one line per read as it is stored (time, chip, bib or
    /// "unmapped", antenna, RSSI, passing #N or repeat) and a summary every 10 s. Ctrl-C ends it.
    Watch {
        /// One JSON object per line: reads as {"at", "chip", "bib", "antenna", "rssi",
        /// "passing"}, summaries with "summary": true.
        #[arg(long)]
        json: bool,
    },
    /// Bind this box as a RUFUS device.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// Run the whole pipeline against a simulated reader and a stand-in API.
    Demo {
        /// How long the simulated race runs, in seconds.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Take the API down for a while in the middle.
        #[arg(long)]
        outage: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SessionAction {
    /// Open a new session now (offline or not).
    Start {
        /// The session's name at RUFUS (default: `session.alias`); up to 64 characters.
        #[arg(long)]
        alias: Option<String>,
        /// A chip check: a local test session, stored and shown like any other, never sent to
        /// RUFUS. Refused while a race session is open; a race `session start` ends it.
        #[arg(long)]
        test: bool,
    },
    /// Close the open session (its queue drains, then it is closed remotely).
    Close,
    /// Open a new session and move into it what remotely closed sessions could not deliver.
    Resend {
        /// The new session's name at RUFUS (default: `session.alias`).
        #[arg(long)]
        alias: Option<String>,
    },
    /// Every session with its counts.
    List {
        /// As JSON, one object per session.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceAction {
    /// Register this box with RUFUS and print the deviceid for the config.
    Bind {
        /// The reader's model, as RUFUS lists it.
        #[arg(long)]
        model: String,
        /// This box's serial number (any stable, unique text).
        #[arg(long)]
        serial_number: String,
        /// A name for the device at RUFUS.
        #[arg(long)]
        alias: Option<String>,
    },
}

/// Exit codes of DESIGN.md: 78 bad config, 69 daemon unreachable, 1 anything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<ConfigError>()) {
        78
    } else if e.chain().any(|c| c.is::<NotRunning>()) {
        69
    } else {
        1
    }
}

pub fn execute(cli: Cli) -> anyhow::Result<()> {
    let path = cli.config;
    match cli.command {
        Command::Run => run_daemon(Config::load(&path, Purpose::Daemon)?, &path),
        Command::CheckConfig => {
            let cfg = Config::load(&path, Purpose::Daemon)?;
            println!("{} is valid\n\n{}", path.display(), cfg.summary());
            for warning in
                crate::config::config_file_warning(&path, &cfg).into_iter().chain(crate::config::warnings(&cfg))
            {
                println!("\nWARNING: {warning}");
            }
            Ok(())
        }
        Command::Status { json } => {
            let cfg = Config::load(&path, Purpose::Local)?;
            let value = control::request(&cfg.control.socket, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let status: crate::status::Status = serde_json::from_value(value)?;
                print!("{}", status.human());
            }
            Ok(())
        }
        Command::Session { action } => session(action, &Config::load(&path, Purpose::Local)?),
        Command::Export { session, reads, output } => {
            let cfg = Config::load(&path, Purpose::Local)?;
            let db = open_db(&cfg)?;
            let out: Box<dyn std::io::Write> = match &output {
                Some(p) => Box::new(std::fs::File::create(p)?),
                None => Box::new(std::io::stdout().lock()),
            };
            let n = if reads {
                crate::export::reads(&db, session, out)?
            } else {
                crate::export::passings(&db, session, out)?
            };
            if let Some(p) = output {
                eprintln!("wrote {n} rows to {}", p.display());
            }
            Ok(())
        }
        Command::Watch { json } => {
            let cfg = Config::load(&path, Purpose::Local)?;
            crate::control::watch(&cfg.control.socket, json)
        }
        Command::Device { action: DeviceAction::Bind { model, serial_number, alias } } => {
            let cfg = Config::load(&path, Purpose::DeviceBind)?;
            bind(&cfg, &model, &serial_number, alias.as_deref())
        }
        Command::Demo { duration, outage } => {
            runtime()?.block_on(crate::demo::run(Duration::from_secs(duration), outage))
        }
    }
}

/// Well under the unit's `TasksMax=64`, with the reader, store and main threads beside them.
const BLOCKING_THREADS: usize = 16;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One worker: the async side (uplink, control socket) is light; blocking work has its own threads.
    // Blocking work (SQLite reads for status, the uplink's batches, the dashboard) waits for one
    // of a bounded set of threads rather than growing without limit under many clients: the unit
    // caps the service's tasks (`TasksMax=`), and a thread it refuses would abort the process.
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(BLOCKING_THREADS).build()?)
}

fn open_db(cfg: &Config) -> anyhow::Result<Db> {
    if !cfg.storage.path.exists() {
        anyhow::bail!(
            "no database at {} (storage.path): the daemon has not run with this config yet",
            cfg.storage.path.display()
        );
    }
    Ok(Db::open_readonly(&cfg.storage.path)?)
}

fn run_daemon(cfg: Config, path: &std::path::Path) -> anyhow::Result<()> {
    limit_malloc_arenas();
    let log = crate::logging::init(&cfg.log)?;
    info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), port = cfg.reader.port.as_deref().unwrap_or(""), "rufus-gateway starting");
    for warning in crate::config::config_file_warning(path, &cfg).into_iter().chain(crate::config::warnings(&cfg)) {
        warn!("{warning}");
    }
    // What systemd kept for this unit (the reader's port, open across the restart).
    let mut kept = crate::fdstore::Inherited::take();
    let kept_port = kept.named(crate::fdstore::READER);
    kept.forget_rest();
    runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        let options =
            crate::app::Options { config_path: Some(path.to_path_buf()), log: Some(log), signals: true, kept_port };
        let running = crate::app::start(&cfg, options, cancel)?;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        info!("ready");
        running.wait().await
    })
}

/// The daemon answers a session command with the session's row.
fn session_row(answer: serde_json::Value) -> anyhow::Result<crate::store::query::SessionRow> {
    serde_json::from_value(answer).map_err(|e| anyhow::anyhow!("unexpected answer from the daemon: {e}"))
}

fn session(action: SessionAction, cfg: &Config) -> anyhow::Result<()> {
    match action {
        SessionAction::Start { alias, test } => {
            let s = session_row(control::request(&cfg.control.socket, &Request::SessionStart { alias, test })?)?;
            if s.test {
                println!(
                    "test session #{} \"{}\" open: a chip check, never sent to RUFUS; follow it with `rufus-gateway watch`, end it with `rufus-gateway session close`",
                    s.id, s.alias
                );
            } else {
                println!(
                    "session #{} \"{}\" open (remote: {}); reads are assigned to it from now on",
                    s.id, s.alias, s.remote_state
                );
            }
            Ok(())
        }
        SessionAction::Resend { alias } => {
            let s = session_row(control::request(&cfg.control.socket, &Request::SessionResend { alias })?)?;
            println!(
                "session #{} \"{}\" open with {} passings moved into it (numbered from 1); they are sent once the queue ahead drains",
                s.id, s.alias, s.passings
            );
            Ok(())
        }
        SessionAction::Close => {
            let s = session_row(control::request(&cfg.control.socket, &Request::SessionClose)?)?;
            println!(
                "session #{} closing: no more reads assigned; {} passings still to send, then it is closed remotely",
                s.id, s.pending
            );
            Ok(())
        }
        SessionAction::List { json } => {
            let sessions = open_db(cfg)?.sessions()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
                return Ok(());
            }
            println!(
                "{:>4}  {:<16} {:<8} {:<16} {:>8} {:>8} {:>9} {:>13}",
                "id", "alias", "state", "remote_state", "passings", "pending", "delivered", "undeliverable"
            );
            for s in sessions {
                println!(
                    "{:>4}  {:<16} {:<8} {:<16} {:>8} {:>8} {:>9} {:>13}",
                    s.id, s.alias, s.state, s.remote_state, s.passings, s.pending, s.delivered, s.undeliverable
                );
            }
            Ok(())
        }
    }
}

fn bind(cfg: &Config, model: &str, serial: &str, alias: Option<&str>) -> anyhow::Result<()> {
    let client = crate::uplink::api::RufusClient::new(&cfg.api)?;
    let (id, already) = runtime()?.block_on(client.bind_device(model, serial, alias))?;
    if already {
        println!("serial number {serial} was already bound: deviceid {id}");
    } else {
        println!("bound: deviceid {id}");
    }
    println!(
        "\nput this line in the [api] section of {}, then `sudo systemctl restart rufus-gateway`:\ndeviceid = \"{id}\"",
        DEFAULT_CONFIG_PATH
    );
    Ok(())
}

/// glibc gives every thread that allocates its own malloc arena (megabytes each, kept); a daemon
/// with a handful of mostly idle threads on a 512 MB Pi needs one (two cost 0.1–0.2 MB more,
/// idle and at the peak of a flood, and saved no CPU). Measured in docs/PERFORMANCE.md.
#[allow(unsafe_code)] // mallopt: a libc call with no safe wrapper
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `--help` describes every command and every option.
    #[test]
    fn help_is_complete() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() {
                missing.push(format!("{path}: no description"));
            }
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && !["help", "version"].contains(&arg.get_id().as_str()) {
                    missing.push(format!("{path} --{}: no description", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }
}
