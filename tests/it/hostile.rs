//! Hostile networks and hostile tags, against the real binary: one test per row of the attack
//! table (issue "bound every input"). Each asserts the bound (memory, threads, connections,
//! time to stop, what another host received) and that reads keep being stored and delivered while
//! the attack goes on. The measured figures are printed (`--nocapture` shows them).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;
use rufus_gateway::control::{Request, request};
use rufus_gateway::demo::fake_api::{Fault, Route};
use serde_json::Value;

/// 31 characters: long enough for a network listen.
const TOKEN: &str = "hostile-test-token-0123456789ab";

fn extra(more: &str) -> String {
    format!(
        "reader.pattern = '^(?P<chip>[0-9A-F]{{8}})$'\nsession.auto_start = true\nhttp.listen = \"127.0.0.1:0\"\nhttp.token = \"{TOKEN}\"\nfeed.listen = \"127.0.0.1:0\"\n{more}"
    )
}

fn address(gw: &Gateway, what: &str) -> String {
    gw.status()["listening"][what].as_str().unwrap_or_else(|| panic!("{what} address in status")).to_string()
}

/// Write `chips` on the reader and wait until the fake API holds `total` passings.
async fn reads_flow(
    gw: &Gateway,
    pty: &mut rufus_gateway::demo::pty::Pty,
    fake: &rufus_gateway::demo::fake_api::FakeApi,
    chips: &[String],
    total: usize,
) {
    write_lines(pty, chips);
    wait_fake(fake, gw, &format!("{total} passings delivered"), |s| s.total_passings() == total).await;
}

/// Under qemu (`packaging/cross.sh --test`) the resident size is the emulator's, which grows as it
/// translates code: memory bounds are asserted natively only. Everything else holds under both.
fn emulated() -> bool {
    std::env::var_os("RUFUS_GATEWAY_EMULATED").is_some()
}

/// `after` stays within `mb` MB of `before` (natively; see [`emulated`]).
fn assert_rss_within(before: &Usage, after: &Usage, mb: u64) {
    if !emulated() {
        assert!(after.rss_kb < before.rss_kb + mb * 1024, "RSS {before:?} -> {after:?}");
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Row 1: a feed client's first line is read up to 32 bytes, however much it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_first_feed_line_is_not_buffered() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let feed = address(&gw, "feed");
    reads_flow(&gw, &mut pty, &fake, &chips(0..5), 5).await;
    let before = usage(gw.pid());

    // 100 MB of digits and a newline as the "replay from" line; the writer stops when the
    // gateway stops taking data (a 2 s write stall).
    let stream = TcpStream::connect(&feed).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        writer.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let chunk = vec![b'9'; 1 << 20];
        let mut sent = 0usize;
        for _ in 0..100 {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => return sent,
            }
        }
        let _ = writer.write(b"\n");
        sent
    });
    let sent = flood.join().unwrap();
    // Meanwhile the pipeline goes on; the flooding client is dropped, a polite one is served.
    reads_flow(&gw, &mut pty, &fake, &chips(5..10), 10).await;
    let after = usage(gw.pid());
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = Vec::new();
    let dropped = match (&stream).read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    let mut polite = TcpStream::connect(&feed).unwrap();
    polite.write_all(b"8\n").unwrap();
    polite.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut first = String::new();
    BufReader::new(&polite).read_line(&mut first).unwrap();
    println!(
        "row 1: the client got {:.1} MB in before the gateway stopped reading and dropped it; RSS {:.1} -> {:.1} MB; a polite client's first line {first:?}",
        sent as f64 / 1e6,
        mb(before.rss_kb),
        mb(after.rss_kb)
    );
    assert!(sent < 40 << 20, "the gateway kept reading the first line: {sent} bytes");
    assert!(dropped, "the flooding client is dropped");
    assert_rss_within(&before, &after, 10);
    assert!(first.starts_with("9,"), "replay after 8: {first:?}");
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Row 2: request heads are bounded in size (16 KiB) and time (10 s); a stop never waits on a
/// client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_huge_request_heads_are_cut_off() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let http = address(&gw, "http");
    let before = usage(gw.pid());

    // 200 connections, each sending 400 KB of headers and never finishing.
    let mut floods = Vec::new();
    for i in 0..200 {
        let http = http.clone();
        floods.push(std::thread::spawn(move || -> (bool, usize) {
            let Ok(mut s) = TcpStream::connect(&http) else { return (true, 0) };
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut sent = 0;
            if s.write_all(format!("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fill-{i}: ").as_bytes()).is_ok() {
                let fill = vec![b'a'; 4096];
                for _ in 0..100 {
                    match s.write(&fill) {
                        Ok(n) => sent += n,
                        Err(_) => break,
                    }
                }
            }
            // Closed by the gateway (EOF or reset), never left hanging until our deadline.
            let mut sink = Vec::new();
            let closed = match s.read_to_end(&mut sink) {
                Ok(_) => true,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
            };
            (closed, sent)
        }));
    }
    let mut peak = before;
    let mut results = Vec::new();
    for f in floods {
        peak = if usage(gw.pid()).rss_kb > peak.rss_kb { usage(gw.pid()) } else { peak };
        results.push(f.join().unwrap());
    }
    let closed = results.iter().filter(|(c, _)| *c).count();
    let status = gw.status();
    println!(
        "row 2: 200 connections x 400 KB of headers: {closed} closed by the gateway, {} refused at the cap; RSS {:.1} -> peak {:.1} MB",
        status["listening"]["refused"]["http"],
        mb(before.rss_kb),
        mb(peak.rss_kb)
    );
    assert_eq!(closed, 200, "every connection closed by the gateway");
    assert_rss_within(&before, &peak, 20);
    reads_flow(&gw, &mut pty, &fake, &chips(0..10), 10).await;

    // Slowloris: a header byte every 200 ms, never the end. The header deadline closes them.
    let slow = |http: String| {
        std::thread::spawn(move || -> Option<Duration> {
            let mut s = TcpStream::connect(&http).ok()?;
            let start = Instant::now();
            s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").ok()?;
            while start.elapsed() < Duration::from_secs(60) {
                if s.write_all(b"a").is_err() {
                    return Some(start.elapsed());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            None
        })
    };
    let slowloris: Vec<_> = (0..3).map(|_| slow(http.clone())).collect();
    let cut: Vec<Option<Duration>> = slowloris.into_iter().map(|t| t.join().unwrap()).collect();
    println!("row 2: slowloris connections cut after {cut:?}");
    assert!(cut.iter().all(|c| c.is_some_and(|d| d < Duration::from_secs(20))), "{cut:?}");

    // Three more slow clients, then a stop: it does not wait for them.
    let _held: Vec<_> = (0..3).map(|_| slow(http.clone())).collect();
    gw.wait_status("3 slow clients connected", |_| true).await;
    let start = Instant::now();
    let code = gw.terminate().await.code();
    let stop = start.elapsed();
    println!("row 2: stopped in {stop:?} with 3 slow clients connected");
    assert_eq!(code, Some(0));
    assert!(stop < Duration::from_secs(10), "stop waited on clients: {stop:?}");
}

/// Row 3a: 1,100 idle feed clients: the cap (64) bites, not the descriptor limit; the rest are
/// refused and counted, and everything else goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_feed_clients_beyond_the_cap_are_refused() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let feed = address(&gw, "feed");
    raise_own_descriptor_limit(2048);
    let before = usage(gw.pid());
    let clients: Vec<TcpStream> = (0..1100).filter_map(|_| TcpStream::connect(&feed).ok()).collect();
    assert_eq!(clients.len(), 1100);
    let status = gw
        .wait_status("1,036 feed clients refused", |s| s["listening"]["refused"]["feed"].as_u64() == Some(1036))
        .await;
    let held = usage(gw.pid());
    std::thread::sleep(Duration::from_secs(2));
    let idle = usage(gw.pid());
    reads_flow(&gw, &mut pty, &fake, &chips(0..20), 20).await;
    let metrics = http_client()
        .get(format!("http://{}/metrics", address(&gw, "http")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    println!(
        "row 3: 1,100 idle feed clients: {} refused; descriptors {} -> {}; CPU over 2 s idle {} ticks; RSS {:.1} -> {:.1} MB",
        status["listening"]["refused"]["feed"],
        before.fds,
        held.fds,
        idle.cpu_ticks - held.cpu_ticks,
        mb(before.rss_kb),
        mb(idle.rss_kb)
    );
    assert!(held.fds <= before.fds + 64 + 4, "descriptors {before:?} -> {held:?}");
    assert!(held.threads <= before.threads + 4, "threads {before:?} -> {held:?}");
    assert!(idle.cpu_ticks - held.cpu_ticks < 50, "the gateway spins: {held:?} -> {idle:?}");
    assert!(metrics.contains("rufus_connections_refused_total{listener=\"feed\"} 1036"), "{metrics}");
    let warnings = gw.logs().matches("connection refused: too many clients").count();
    assert!(warnings <= 2, "{warnings} refusal warnings: logged at most once a minute");
    drop(clients);
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// This test process needs a descriptor per client it opens.
#[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on 32-bit ARM
fn raise_own_descriptor_limit(want: u64) {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && (l.rlim_cur as u64) < want {
            l.rlim_cur = (want as libc::rlim_t).min(l.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Row 3b: out of descriptors (a limit far below the cap), the accept loop pauses instead of
/// spinning, and the gateway comes back by itself when clients leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_pauses() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.nofile = Some(64);
    gw.start().await;
    let feed = address(&gw, "feed");
    reads_flow(&gw, &mut pty, &fake, &chips(0..5), 5).await;
    // Connect until the gateway can take no more (the kernel still completes the handshakes).
    // Once the backlog is full too, a connect would wait for minutes: a short timeout ends it.
    let feed_addr: std::net::SocketAddr = feed.parse().unwrap();
    let clients: Vec<TcpStream> =
        (0..200).map_while(|_| TcpStream::connect_timeout(&feed_addr, Duration::from_millis(500)).ok()).collect();
    let deadline = Instant::now() + DEADLINE;
    while !gw.logs().contains("accept failed; pausing") {
        assert!(Instant::now() < deadline, "never ran out of descriptors; log:\n{}", gw.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = usage(gw.pid());
    // Reads keep being stored while no descriptor is free.
    write_lines(&mut pty, &chips(5..15));
    std::thread::sleep(Duration::from_secs(3));
    let end = usage(gw.pid());
    let failures = gw.logs().matches("accept failed; pausing").count();
    println!(
        "row 3: at the descriptor limit ({} open): CPU {} ticks in 3 s, {failures} accept warnings",
        end.fds,
        end.cpu_ticks - start.cpu_ticks
    );
    assert!(end.cpu_ticks - start.cpu_ticks < 100, "the accept loop spins: {start:?} -> {end:?}");
    assert!(failures <= 3, "{failures} accept warnings: logged at most once a minute");
    drop(clients);
    // Back by itself: the reads written meanwhile are delivered.
    wait_fake(&fake, &gw, "15 passings delivered", |s| s.total_passings() == 15).await;
    gw.wait_status("status answers again", |s| s["queue"]["pending"] == 0).await;
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Row 4: the API answers 307 to another host: not followed, the other host gets nothing, and
/// status says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_never_followed() {
    let (fake, device) = fake().await;
    let (other, _) = rufus_gateway::demo::fake_api::FakeApi::start().await.unwrap();
    for _ in 0..50 {
        fake.push_fault(
            Route::ActiveSession,
            Fault::Redirect(format!("{}/sessions/device/x/active", other.base_url())),
        );
        fake.push_fault(Route::Any, Fault::Redirect(format!("{}/sessions", other.base_url())));
    }
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    write_lines(&mut pty, &chips(0..10));
    let status = gw
        .wait_status("the redirect reported", |s| {
            s["uplink"]["last_error"].as_str().is_some_and(|e| e.contains("redirect")) && s["queue"]["pending"] == 10
        })
        .await;
    let error = status["uplink"]["last_error"].as_str().unwrap();
    println!(
        "row 4: {} requests reached the other host; uplink: {} ({error})",
        other.state().requests.len(),
        status["uplink"]["state"]
    );
    assert!(other.state().requests.is_empty(), "the other host received {:?}", other.state().requests);
    assert_eq!(status["uplink"]["state"], "auth_failed");
    let origin = other.base_url().trim_end_matches("/v0").to_string();
    assert!(error.contains(&origin) && !error.contains("/sessions"), "{error}");
    assert!(fake.state().requests.iter().any(|r| r.status == 307));
    assert_eq!(gw.db().queue().unwrap().pending, 10, "the reads are stored");
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Row 5: tags anyone can program cannot forge a feed line, shift CSV fields or plant a formula;
/// a bib map's formula is neutralised in every CSV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_cannot_forge_lines_or_formulas() {
    // Impinj: an epc holding a line end and a forged record.
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(
        &fake,
        &device,
        &pty.path.display().to_string(),
        "reader.format = \"impinj-json\"\nsession.auto_start = true\nfeed.listen = \"127.0.0.1:0\"",
    );
    gw.start().await;
    let mut feed = TcpStream::connect(address(&gw, "feed")).unwrap();
    feed.write_all(b"0\n").unwrap();
    let forged = r#"{"epc":"E200\n999,FORGED-BIB,E200,2026-01-01T00:00:00.000Z","antennaPort":1,"firstSeenTimestamp":"2026-03-07T10:00:00.000000Z"}"#;
    let good =
        r#"{"epc":"E2000017221101441890AB01","antennaPort":1,"firstSeenTimestamp":"2026-03-07T10:00:01.000000Z"}"#;
    write_lines(&mut pty, &[forged.to_string(), good.to_string()]);
    wait_fake(&fake, &gw, "the good read delivered", |s| s.total_passings() == 1).await;
    let status = gw.wait_status("the forged read rejected", |s| s["reader"]["rejected"]["bad_chip"] == 1).await;
    feed.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut line = String::new();
    BufReader::new(&feed).read_line(&mut line).unwrap();
    assert!(line.starts_with("1,E2000017221101441890AB01,E2000017221101441890AB01,"), "{line:?}");
    assert!(
        !fake
            .state()
            .sessions
            .iter()
            .flat_map(|s| s.passings.values())
            .any(|p| p.chip.as_deref().is_some_and(|c| c.contains("FORGED")))
    );
    println!("row 5: impinj epc with a line end: rejected ({}), feed line {line:?}", status["reader"]["rejected"]);
    gw.terminate().await;

    // ASCII chips: "208" is fine; ",9" and "=1+1" are not chips. A bib map holds formulas.
    let (fake, device) = crate::common::fake().await;
    let mut pty = crate::common::pty();
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("bibs.csv");
    std::fs::write(&map, "chip,bib\n208,\"=HYPERLINK(\"\"http://x.example\"\")\"\n209,-1+2\n").unwrap();
    let mut gw = Gateway::new(
        &fake,
        &device,
        &pty.path.display().to_string(),
        &format!(
            "reader.pattern = '^(?P<chip>[0-9A-F]+)$'\npassings.chip_encoding = \"ascii\"\nsession.auto_start = true\nfeed.listen = \"127.0.0.1:0\"\npassings.bib_map = \"{}\"",
            map.display()
        ),
    );
    gw.start().await;
    let mut feed = TcpStream::connect(address(&gw, "feed")).unwrap();
    feed.write_all(b"0\n").unwrap();
    // "208", ",9", "=1+1", "209"
    write_lines(&mut pty, &["323038".into(), "2C39".into(), "3D312B31".into(), "323039".into()]);
    wait_fake(&fake, &gw, "two passings", |s| s.total_passings() == 2).await;
    gw.wait_status("two rejected", |s| s["reader"]["rejected"]["bad_chip"] == 2).await;
    // The API gets the bib as it is (JSON needs no neutralising).
    let bibs: Vec<String> =
        fake.state().sessions.iter().flat_map(|s| s.passings.values().map(|p| p.bib.clone())).collect();
    assert_eq!(bibs, ["=HYPERLINK(\"http://x.example\")", "-1+2"]);
    // The feed and the export: one record per line, formulas neutralised.
    feed.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(&feed);
    let mut lines = Vec::new();
    for _ in 0..2 {
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        lines.push(l);
    }
    let cells = |text: &str| -> Vec<Vec<String>> {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(text.as_bytes())
            .records()
            .map(|r| r.unwrap().iter().map(String::from).collect())
            .collect()
    };
    let feed_rows = cells(&lines.concat());
    assert_eq!(feed_rows[0][1], "'=HYPERLINK(\"http://x.example\")", "{lines:?}");
    assert_eq!(feed_rows[1][1], "'-1+2", "{lines:?}");
    let export = gw.cli_ok(&["export"]);
    let rows = cells(&export);
    assert_eq!(rows.len(), 3, "{export}");
    assert_eq!((rows[1][3].as_str(), rows[1][4].as_str()), ("'=HYPERLINK(\"http://x.example\")", "208"));
    assert_eq!(rows[2][3], "'-1+2");
    println!("row 5: ascii chips ',9' and '=1+1' rejected; feed {lines:?}");
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Rows 6 and 8: 3,000 POSTs without a token cost the journal one line; a client that keeps
/// guessing is throttled; a short token is refused for a network listen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guessing_is_throttled_and_quiet() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let url = format!("http://{}", address(&gw, "http"));
    let http = http_client();
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    let start = Instant::now();
    // Fewer under emulation, so that all of them fall inside one minute's window there too.
    let n = if emulated() { 600 } else { 3000 };
    let mut posts = posts_without_token(&http, &url, n, 20).await;
    for code in posts.drain(..) {
        *codes.entry(code).or_default() += 1;
    }
    let elapsed = start.elapsed();
    reads_flow(&gw, &mut pty, &fake, &chips(0..10), 10).await;
    let warnings = gw.logs().matches("session action refused").count();
    println!("row 6: {n} POSTs without a token in {elapsed:?}: answers {codes:?}; {warnings} log lines");
    assert_eq!(codes.get(&401), Some(&5), "five tries, then throttled: {codes:?}");
    assert_eq!(codes.get(&429), Some(&(n - 5)), "{codes:?}");
    assert_eq!(warnings, 1, "logged at most once a minute");
    assert!(fake.state().sessions.len() == 1, "nothing started but the auto-started session");

    // Row 8: a short token with a network listen is refused by check-config (and `run`).
    let weak = Gateway::new(&fake, &device, "/dev/null", "http.listen = \"0.0.0.0:0\"\nhttp.token = \"x\"");
    let out = weak.cli(&["check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("row 8: check-config with http.token = \"x\": exit {:?}: {stderr}", out.status.code());
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr.contains("http.token") && stderr.contains("24 characters"), "{stderr}");
    let strong =
        Gateway::new(&fake, &device, "/dev/null", &format!("http.listen = \"0.0.0.0:0\"\nhttp.token = \"{TOKEN}\""));
    assert!(strong.cli(&["check-config"]).status.success());
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// `n` POSTs without a token, `parallel` at a time; their status codes.
async fn posts_without_token(http: &reqwest::Client, url: &str, n: usize, parallel: usize) -> Vec<u16> {
    let mut codes = Vec::new();
    let mut left = n;
    while left > 0 {
        let batch = left.min(parallel);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (http, url) = (http.clone(), url.to_string());
            set.spawn(
                async move { http.post(format!("{url}/api/session/start")).send().await.unwrap().status().as_u16() },
            );
        }
        while let Some(code) = set.join_next().await {
            codes.push(code.unwrap());
        }
        left -= batch;
    }
    codes
}

/// Row 7: 200 clients polling `/api/status` cost about what one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_status_pollers() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let url = format!("http://{}/api/status", address(&gw, "http"));
    reads_flow(&gw, &mut pty, &fake, &chips(0..5), 5).await;
    let before = usage(gw.pid());
    let db_files = |pid: i32| -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter(|t| t.to_string_lossy().contains("gateway.db"))
                    .count()
            })
            .unwrap_or(0)
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let mut pollers = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (http, url, stop) = (reqwest::Client::new(), url.clone(), stop.clone());
        pollers.spawn(async move {
            let mut ok = 0u32;
            while !stop.is_cancelled() {
                if http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                    ok += 1;
                }
            }
            ok
        });
    }
    let (mut peak, mut peak_db) = (before, 0);
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut written = 5;
    while Instant::now() < deadline {
        let u = usage(gw.pid());
        peak.threads = peak.threads.max(u.threads);
        peak.rss_kb = peak.rss_kb.max(u.rss_kb);
        peak_db = peak_db.max(db_files(gw.pid()));
        write_lines(&mut pty, &chips(written..written + 1));
        written += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let mut answered = 0;
    while let Some(n) = pollers.join_next().await {
        answered += n.unwrap();
    }
    wait_fake(&fake, &gw, "every read delivered", |s| s.total_passings() == written as usize).await;
    println!(
        "row 7: 200 pollers, {answered} answers in 4 s: threads {} -> peak {}, RSS {:.1} -> peak {:.1} MB, database descriptors at most {peak_db}",
        before.threads,
        peak.threads,
        mb(before.rss_kb),
        mb(peak.rss_kb)
    );
    assert!(answered > if emulated() { 20 } else { 200 }, "the pollers were answered: {answered}");
    assert!(peak.threads <= before.threads + 4, "threads {before:?} -> {peak:?}");
    assert_rss_within(&before, &peak, 24);
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Row 9: DNS rebinding (a foreign `Host`) is refused; the page cannot be framed or sniffed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sites_cannot_reach_or_frame_the_dashboard() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw =
        Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra("http.hosts = [\"rufus-box.local\"]"));
    gw.start().await;
    let addr = address(&gw, "http");
    let port = addr.rsplit_once(':').unwrap().1;
    let get = |host: &str, path: &str| {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    let rebound = get(&format!("attacker.example:{port}"), "/api/status");
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    assert!(!rebound.contains("\"queue\""), "no status for a foreign Host");
    for host in [addr.clone(), format!("localhost:{port}"), format!("rufus-box.local:{port}")] {
        assert!(get(&host, "/api/status").starts_with("HTTP/1.1 200"), "{host}");
    }
    let page = get(&addr, "/").to_ascii_lowercase();
    let csp = page.lines().find(|l| l.starts_with("content-security-policy:")).unwrap_or_default().to_string();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.contains("script-src 'unsafe-inline'"), "{csp}");
    assert!(page.contains("x-frame-options: deny") && page.contains("x-content-type-options: nosniff"), "{page}");
    let status = get(&addr, "/api/status").to_ascii_lowercase();
    assert!(status.contains("x-content-type-options: nosniff"));
    // A rebound page holding the token still cannot act.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "POST /api/session/start HTTP/1.1\r\nHost: attacker.example\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    // The pipeline went on meanwhile.
    reads_flow(&gw, &mut pty, &fake, &chips(0..5), 5).await;
    println!("row 9: Host attacker.example -> {}; page CSP: {csp}", rebound.lines().next().unwrap_or(""));
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Row 10: a 200 MB control request is cut at 4 KiB; a regular file at the socket path is left
/// alone, and the pipeline runs without the socket until the path is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_is_bounded_and_replaces_only_sockets() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let before = usage(gw.pid());
    let mut s = std::os::unix::net::UnixStream::connect(&gw.socket).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    for _ in 0..200 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    let after = usage(gw.pid());
    println!(
        "row 10: 200 MB control line: {:.1} MB taken, answer {answer:?}, RSS {:.1} -> {:.1} MB",
        sent as f64 / 1e6,
        mb(before.rss_kb),
        mb(after.rss_kb)
    );
    assert!(answer.contains("longer than 4096 bytes"), "{answer:?}");
    assert_rss_within(&before, &after, 10);
    reads_flow(&gw, &mut pty, &fake, &chips(0..5), 5).await;
    gw.terminate().await;

    // A regular file where the socket should be.
    std::fs::write(&gw.socket, "not a socket").unwrap();
    gw.spawn();
    reads_flow(&gw, &mut pty, &fake, &chips(5..10), 10).await;
    assert_eq!(std::fs::read_to_string(&gw.socket).unwrap(), "not a socket", "the file is left alone");
    assert!(gw.logs().contains("is not a socket; it is left alone"), "the reason is logged");
    // Freed: the socket appears by itself (retried with backoff), and says what happened.
    std::fs::remove_file(&gw.socket).unwrap();
    let status = gw.wait_status("the control socket is back", |s| s["listening"]["control"].is_string()).await;
    println!("row 10: regular file at the socket path: left alone; socket back after removal: {}", status["listening"]);
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Row 11: an API reply of any size is read up to 1 MiB; the batch is retried and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_replies_are_bounded() {
    let (fake, device) = fake().await;
    fake.push_fault(Route::Passings, Fault::Huge(200 << 20));
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let before = usage(gw.pid());
    reads_flow(&gw, &mut pty, &fake, &chips(0..10), 10).await;
    let after = usage(gw.pid());
    let logs = gw.logs();
    println!(
        "row 11: a 200 MB reply: RSS {:.1} -> {:.1} MB, then delivered on retry",
        mb(before.rss_kb),
        mb(after.rss_kb)
    );
    assert!(logs.contains("larger than 1024 KiB"), "the oversized reply is reported");
    assert_rss_within(&before, &after, 10);
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Row 12: aliases are bounded in length and alphabet everywhere; the Bearer scheme is
/// case-insensitive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_are_bounded_and_bearer_is_case_insensitive() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(
        &fake,
        &device,
        &pty.path.display().to_string(),
        &extra("").replace("session.auto_start = true", "session.auto_start = false"),
    );
    gw.start().await;
    let huge = "A".repeat(1_900_000);
    let control =
        |alias: &str| request(&gw.socket, &Request::SessionStart { alias: Some(alias.to_string()), test: false });
    // The command line refuses to send it; the daemon would cut it at 4 KiB (row 10).
    let e = control(&huge).unwrap_err().to_string();
    assert!(e.contains("longer than the daemon takes"), "{e}");
    let e = control(&"B".repeat(65)).unwrap_err().to_string();
    assert!(e.contains("longer than 64 characters"), "{e}");
    let e = control("FINISH\nFORGED").unwrap_err().to_string();
    assert!(e.contains("letters, digits"), "{e}");

    let url = format!("http://{}/api/session/start", address(&gw, "http"));
    let http = http_client();
    let post = |body: String, auth: &str| {
        http.post(&url).header("Authorization", auth).header("content-type", "application/json").body(body).send()
    };
    let bearer = format!("Bearer {TOKEN}");
    // The server answers 413 after 4 KiB and closes: a client still sending the rest may see the
    // connection reset before it reads the answer (TCP discards it). Either way it was refused.
    let big = match post(serde_json::json!({ "alias": huge }).to_string(), &bearer).await {
        Ok(big) => {
            assert_eq!(big.status(), 413);
            // The rest of the body is not read: the connection is not for another request.
            assert_eq!(big.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
            "413".to_string()
        }
        Err(e) => {
            assert!(e.is_request(), "refused by closing the connection: {e}");
            "connection closed after 4 KiB".to_string()
        }
    };
    let long = post(serde_json::json!({ "alias": "C".repeat(65) }).to_string(), &bearer).await.unwrap().status();
    assert_eq!(long.as_u16(), 400);
    let lower =
        post(serde_json::json!({ "alias": "Meta 10K" }).to_string(), &format!("bearer  {TOKEN}")).await.unwrap();
    assert_eq!(lower.status(), 200, "the scheme is case-insensitive");
    wait_fake(&fake, &gw, "the session exists remotely", |s| s.sessions.iter().any(|x| x.alias == "Meta 10K")).await;
    assert_eq!(fake.state().sessions.len(), 1, "no refused alias reached the API");
    reads_flow(&gw, &mut pty, &fake, &chips(0..5), 5).await;
    let logs = gw.logs();
    assert!(!logs.contains(&"A".repeat(100)) && !logs.contains("FORGED"), "a refused alias is not logged");
    println!("row 12: 1.9 MB alias refused (control: too long; http: {big}); 65 characters: {long}; `bearer` accepted");
    let _: Value = request(&gw.socket, &Request::Status).unwrap();
    assert_eq!(gw.terminate().await.code(), Some(0));
}

/// Fuzz through the real binary: garbage, truncated and malformed requests on the dashboard, the
/// feed and the control socket, each connection ended within its deadline; afterwards every
/// listener still answers and the reads written meanwhile are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_listener() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let (http, feed) = (address(&gw, "http"), address(&gw, "feed"));
    // A fixed seed: the same 300 inputs every run (FUZZ_SEED picks others).
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_2026);
    let mut rng = fastrand::Rng::with_seed(seed);
    let prefixes: [&[u8]; 8] = [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        b"POST /api/session/start HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{",
        b"GET /api/passings?since=-99999999999999999999 HTTP/1.1\r\n\r\n",
        b"GET /api/passings?since=1e9&since=2 HTTP/1.0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /%00%ff/../../etc/passwd HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
        b"{\"command\":\"session_start\",\"alias\":",
        b"",
    ];
    let started = Instant::now();
    for i in 0..300 {
        let mut input = prefixes[rng.usize(..prefixes.len())].to_vec();
        input.extend((0..rng.usize(..600)).map(|_| rng.u8(..)));
        if rng.bool() {
            input.extend_from_slice(b"\r\n\r\n");
        }
        match i % 3 {
            // The dashboard: the bytes, then end of input (a truncated request); it answers or
            // closes, never hangs.
            0 => {
                let mut s = TcpStream::connect(&http).unwrap();
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                let _ = s.write_all(&input);
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut sink = Vec::new();
                let ended = match s.read_to_end(&mut sink) {
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                };
                assert!(ended, "the dashboard left connection {i} hanging");
            }
            1 => {
                let mut s = TcpStream::connect(&feed).unwrap();
                let _ = s.write_all(&input);
            }
            _ => {
                let mut s = std::os::unix::net::UnixStream::connect(&gw.socket).unwrap();
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                let _ = s.write_all(&input);
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                assert!(answer.is_empty() || answer.starts_with("{\"ok\":"), "{answer:?}");
            }
        }
        if i % 50 == 0 {
            write_lines(&mut pty, &chips(i as u32..i as u32 + 1));
        }
    }
    let elapsed = started.elapsed();
    wait_fake(&fake, &gw, "6 passings delivered", |s| s.total_passings() == 6).await;
    let status = http_client().get(format!("http://{http}/api/status")).send().await.unwrap();
    assert_eq!(status.status(), 200);
    let mut polite = TcpStream::connect(&feed).unwrap();
    polite.write_all(b"0\n").unwrap();
    polite.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut first = String::new();
    BufReader::new(&polite).read_line(&mut first).unwrap();
    assert!(first.starts_with("1,"), "{first:?}");
    println!("fuzz: 300 garbage connections (seed {seed:#x}) in {elapsed:?}; every listener still answers");
    assert_eq!(gw.terminate().await.code(), Some(0));
}
