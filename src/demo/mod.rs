//! `rufus-gateway demo`: the real pipeline, end to end, on one machine with nothing installed.
//!
//! A simulated IPICO reader writes runners' chip reads into a pseudo-terminal; the gateway reads
//! it as it would a serial port, stores everything in a temporary database, and delivers passings
//! to a built-in stand-in of the RUFUS API on loopback. With `--outage` the API goes away for a
//! while in the middle, and you watch the queue grow and drain.

pub mod fake_api;
pub mod pty;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{ClockSource, Config, Format, LogTarget, Purpose, Secret, TimestampSource};
use fake_api::{FAKE_KEY, FakeApi};
use pty::Pty;
use crate::reader::format::ipico;

const RUNNERS: u32 = 60;
const ALIAS: &str = "DEMO-FINISH";

pub async fn run(duration: Duration, outage: bool) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("rufus-gateway-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, duration.max(Duration::from_secs(5)), outage).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, duration: Duration, outage: bool) -> anyhow::Result<()> {
    let (fake, deviceid) = FakeApi::start().await?;
    let pty = Pty::open()?;
    let mut cfg = Config::default();
    cfg.api.base_url = fake.base_url();
    cfg.api.api_key = Some(Secret::new(FAKE_KEY));
    cfg.api.deviceid = Some(deviceid);
    cfg.api.timeout = Duration::from_secs(2);
    cfg.api.batch_size = 50;
    cfg.api.retry_max_delay = Duration::from_secs(2);
    cfg.reader.port = Some(pty.path.display().to_string());
    cfg.reader.format = Format::Ipico;
    cfg.reader.timestamps = TimestampSource::Reader;
    cfg.clock.source = ClockSource::Trust;
    cfg.session.alias = ALIAS.into();
    cfg.session.auto_start = true;
    cfg.storage.path = dir.join("gateway.db");
    cfg.control.socket = dir.join("control.sock");
    cfg.log.level = std::env::var("RUFUS_GATEWAY_DEMO_LOG").unwrap_or_else(|_| "error".into());
    cfg.log.target = LogTarget::Stderr;
    cfg.validate(Purpose::Daemon).map_err(anyhow::Error::msg)?;
    let _ = crate::logging::init(&cfg.log);

    println!(
        "rufus-gateway demo: {RUNNERS} runners over {}s, IPICO reader on {}",
        duration.as_secs(),
        pty.path.display()
    );
    println!("stand-in RUFUS API on {}, database {}\n", fake.base_url(), cfg.storage.path.display());

    let cancel = CancellationToken::new();
    let running = crate::app::start(&cfg, crate::app::Options::default(), cancel.clone())?;
    let mut events = running.live.passings.subscribe();
    let status = running.status.clone();
    let wait = tokio::spawn(running.wait());

    let reads_sent = Arc::new(AtomicU64::new(0));
    let sim = {
        let sent = reads_sent.clone();
        let race = duration.mul_f64(0.7);
        std::thread::spawn(move || simulate(pty, race, sent))
    };

    let started = Instant::now();
    let (outage_from, outage_to) = (duration.mul_f64(0.3), duration.mul_f64(0.6));
    let mut api_down = false;
    let mut delivered_seen = 0usize;
    let mut waiting_seen = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while started.elapsed() < duration {
        tokio::select! {
            event = events.recv() => if let Ok(p) = event {
                println!("  passing   #{:<4} bib {:<14} {}", p.num_passing, p.bib, crate::clock::api_timestamp(p.timestamp_us));
            },
            _ = tick.tick() => {
                let t = started.elapsed();
                if outage && !api_down && t >= outage_from && t < outage_to {
                    fake.stop_listening();
                    api_down = true;
                    println!("\n  !! API DOWN: the 4G link dropped; reads keep being stored\n");
                }
                if outage && api_down && t >= outage_to {
                    fake.resume().await?;
                    api_down = false;
                    println!("\n  !! API BACK: the queue drains in order\n");
                }
                let delivered = fake.state().total_passings();
                if delivered > delivered_seen {
                    println!("  delivered #{}–#{} to RUFUS", delivered_seen + 1, delivered);
                    delivered_seen = delivered;
                } else if api_down {
                    let s = status.clone();
                    if let Ok(Ok(st)) = tokio::task::spawn_blocking(move || s.snapshot()).await
                        && st.queue.pending as usize != waiting_seen
                    {
                        waiting_seen = st.queue.pending as usize;
                        println!("  offline   {} passings waiting (uplink {})", st.queue.pending, st.uplink.state.as_str());
                    }
                }
            }
        }
    }
    if api_down {
        fake.resume().await?;
    }
    let _pty = tokio::task::spawn_blocking(move || sim.join()).await;
    // Let the reader take in the last bytes before the session is closed.
    let sent = reads_sent.load(Ordering::Relaxed);
    let settle = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settle {
        let s = status.clone();
        match tokio::task::spawn_blocking(move || s.snapshot()).await {
            Ok(Ok(st)) if st.reader.reads_total + st.reader.rejected_total >= sent => break,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }

    // Close the session: the queue drains, then the remote session closes.
    let socket = cfg.control.socket.clone();
    tokio::task::spawn_blocking(move || crate::control::request(&socket, &crate::control::Request::SessionClose))
        .await??;
    fake.wait_for(Duration::from_secs(30), "the session to close remotely", |s| s.sessions.iter().all(|x| !x.active))
        .await?;
    let s = status.clone();
    let st = tokio::task::spawn_blocking(move || s.snapshot()).await??;
    cancel.cancel();
    wait.await??;

    let remote = fake.state();
    let delivered = remote.total_passings();
    println!("\nsummary");
    println!("  reads sent by the reader     {}", reads_sent.load(Ordering::Relaxed));
    println!("  reads stored                 {} ({} rejected)", st.reader.reads_total, st.reader.rejected_total);
    println!("  passings (after de-dup)      {}", st.queue.delivered + st.queue.pending + st.queue.undeliverable);
    println!("  delivered to RUFUS           {delivered} in {} remote session(s) \"{}\"", remote.sessions.len(), ALIAS);
    println!(
        "  resent after lost replies    {} (counted once by the server)",
        remote.sessions.iter().map(|s| s.duplicates).sum::<u64>()
    );
    println!("  still pending                {}", st.queue.pending);
    let ok = st.queue.pending == 0 && delivered as i64 == st.queue.delivered;
    println!(
        "\n{}",
        if ok { "every passing was delivered, none twice." } else { "NOT everything was delivered: see above." }
    );
    if !ok {
        anyhow::bail!("demo ended with undelivered passings");
    }
    Ok(())
}

/// Runners cross the mat at random moments, several at once; each crossing is a burst of
/// repeated reads over about a second, interleaved with the other runners' reads.
/// Returns the pty: closing it would hang up the line under the gateway (as a yanked cable does).
fn simulate(mut pty: Pty, race: Duration, sent: Arc<AtomicU64>) -> Pty {
    let mut reads: Vec<(Duration, u32, bool)> = Vec::new();
    for runner in 0..RUNNERS {
        let crossing = race.mul_f64(fastrand::f64());
        let burst = 8 + fastrand::u32(0..18);
        for i in 0..burst {
            reads.push((crossing + Duration::from_millis(fastrand::u64(0..1000)), 1000 + runner, i == 0));
        }
    }
    reads.sort();
    let mut announced = std::collections::HashSet::new();
    let start = Instant::now();
    for (at, bib, _) in reads {
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let tag = format!("{bib:012}");
        if announced.insert(bib) {
            println!("  read      chip {tag} (and repeats while the runner is on the mat)");
        }
        let line = format!("{}\r\n", ipico::encode(1, &tag, chrono::Utc::now().naive_utc()));
        if pty.write(line.as_bytes()).is_err() {
            break;
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    pty
}
