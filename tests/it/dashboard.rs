//! The local dashboard's HTTP API, `/metrics`, the live feed, and (when Chromium and Node are
//! there) the page itself in a real headless browser.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

const TOKEN: &str = "tent-token-7f3a9c21";

fn extra(more: &str) -> String {
    format!(
        "reader.pattern = '^(?P<chip>[0-9A-F]{{8}})$'\nhttp.listen = \"127.0.0.1:0\"\nhttp.token = \"{TOKEN}\"\nfeed.listen = \"127.0.0.1:0\"\n{more}"
    )
}

fn base(gw: &Gateway) -> String {
    format!("http://{}", gw.status()["listening"]["http"].as_str().expect("dashboard address in status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_endpoints_and_the_token() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let url = base(&gw);
    let http = http_client();

    let page = http.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>rufus-gateway</title>"));
    assert!(!html.contains(TOKEN), "the token is never in the page");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http") && !html.contains("url(http"),
        "no external resources"
    );

    let status: serde_json::Value = http.get(format!("{url}/api/status")).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(null(&status, "session"));

    // Mutating endpoints: no token, a wrong one, then the right one.
    let start = |auth: Option<&str>| {
        let mut r = http.post(format!("{url}/api/session/start")).json(&serde_json::json!({ "alias": "WEB" }));
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    assert_eq!(start(None).await.unwrap().status(), 401);
    assert_eq!(start(Some("Bearer nope")).await.unwrap().status(), 401);
    assert_eq!(start(Some(TOKEN)).await.unwrap().status(), 401, "the Bearer scheme is required");
    assert_eq!(http.post(format!("{url}/api/session/close")).send().await.unwrap().status(), 401);
    assert!(fake.state().sessions.is_empty());
    // A refusal (nothing to close) is the user's to fix: 409, with the reason.
    let nothing = http
        .post(format!("{url}/api/session/close"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(nothing.status(), 409);
    assert_eq!(nothing.json::<serde_json::Value>().await.unwrap()["error"], "no session is open");
    let ok = start(Some(&format!("Bearer {TOKEN}"))).await.unwrap();
    assert_eq!(ok.status(), 200);
    wait_fake(&fake, &gw, "the session started from the API exists remotely", |s| {
        s.sessions.iter().any(|x| x.alias == "WEB")
    })
    .await;

    write_lines(&mut pty, &chips(0..12));
    wait_fake(&fake, &gw, "12 delivered", |s| s.total_passings() == 12).await;
    // Deliveries are recorded at the next group commit, not the moment the API answers.
    gw.wait_status("12 recorded as delivered", |s| s["queue"]["delivered"] == 12).await;
    let page: serde_json::Value =
        http.get(format!("{url}/api/passings?since=5")).send().await.unwrap().json().await.unwrap();
    let nums: Vec<i64> =
        page["passings"].as_array().unwrap().iter().map(|p| p["num_passing"].as_i64().unwrap()).collect();
    assert_eq!(nums, (6..=12).collect::<Vec<_>>());
    assert_eq!(page["passings"][0]["bib"], chips(5..6)[0]);
    let rpm: serde_json::Value =
        http.get(format!("{url}/api/reads-per-minute")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rpm["minutes"].as_array().unwrap().len(), 60);
    assert_eq!(rpm["minutes"][59], 12, "this minute's reads in the last slot");

    // /metrics in the Prometheus text format.
    // Status answers are shared for a quarter of a second: wait for one taken after the deliveries.
    let deadline = Instant::now() + DEADLINE;
    let text = loop {
        let text = http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
        if text.contains("rufus_queue_depth 0") && text.contains("\nrufus_reads_total 12\n") {
            break text;
        }
        assert!(Instant::now() < deadline, "metrics never caught up:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("{name} missing in:\n{text}"));
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("unexpected type"),
        }
    };
    assert_eq!(value("rufus_reads_total", None), 12.0);
    assert_eq!(value("rufus_passings", Some(("state", "delivered"))), 12.0);
    assert_eq!(value("rufus_queue_depth", None), 0.0);
    assert_eq!(value("rufus_reader_connected", None), 1.0);
    assert_eq!(value("rufus_uplink_state", Some(("state", "online"))), 1.0);
    assert!(value("rufus_uplink_requests_total", Some(("outcome", "ok"))) >= 1.0);
    assert_eq!(value("rufus_rejected_total", Some(("reason", "no_match"))), 0.0);

    let close = http
        .post(format!("{url}/api/session/close"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(close.status(), 200);
    wait_fake(&fake, &gw, "closed remotely", |s| s.sessions.iter().all(|x| !x.active)).await;
    assert!(!gw.logs().contains(TOKEN), "the token never appears in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_actions_are_off_without_a_token() {
    let (fake, device) = fake().await;
    let pty = pty();
    let mut gw = Gateway::new(
        &fake,
        &device,
        &pty.path.display().to_string(),
        "http.listen = \"127.0.0.1:0\"\nreader.pattern = '^(?P<chip>[0-9A-F]{8})$'",
    );
    gw.start().await;
    let url = base(&gw);
    let res = http_client()
        .post(format!("{url}/api/session/start"))
        .header("Authorization", "Bearer x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert!(fake.state().sessions.is_empty());
}

/// Read feed lines until `n` have arrived (or the deadline).
fn read_lines(reader: &mut BufReader<TcpStream>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while out.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} feed lines: {out:?}", out.len());
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => panic!("feed closed"),
            Ok(_) => out.push(line.trim_end().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{e}"),
        }
    }
    out
}

fn connect(addr: &str, since: Option<i64>) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    if let Some(n) = since {
        stream.write_all(format!("{n}\n").as_bytes()).unwrap();
    }
    BufReader::new(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_replays_from_a_number_and_slow_clients_do_not_slow_the_gateway() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "FEED"]);
    let addr = gw.status()["listening"]["feed"].as_str().unwrap().to_string();

    // A client that never reads: the gateway must not wait for it.
    let stalled = TcpStream::connect(&addr).unwrap();
    let mut first = connect(&addr, Some(0));
    write_lines(&mut pty, &chips(0..5));
    let lines = tokio::task::spawn_blocking(move || {
        let l = read_lines(&mut first, 5);
        drop(first); // the timing software goes away…
        l
    })
    .await
    .unwrap();
    assert!(lines[0].starts_with(&format!("1,{0},{0},", chips(0..1)[0])), "{lines:?}");
    assert_eq!(
        lines.iter().map(|l| l.split(',').next().unwrap().parse::<i64>().unwrap()).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );

    // …passings continue meanwhile, a flood among them…
    let many: Vec<String> = chips(5..3005);
    let writer = {
        let mut pty2 = rufus_gateway::demo::pty::Pty::from_file(pty.try_clone().unwrap(), pty.path.clone());
        std::thread::spawn(move || write_lines(&mut pty2, &many))
    };
    wait_fake(&fake, &gw, "3005 delivered despite a stalled feed client", |s| s.total_passings() == 3005).await;
    writer.join().unwrap();

    // …and it comes back with the last number it had: exactly the rest, in order.
    let mut again = connect(&addr, Some(5));
    let rest = tokio::task::spawn_blocking(move || read_lines(&mut again, 3000)).await.unwrap();
    let nums: Vec<i64> = rest.iter().map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert_eq!(nums, (6..=3005).collect::<Vec<_>>());

    // The stalled client gets everything once it reads (it lagged, then caught up from the store).
    let mut late = BufReader::new(stalled);
    late.get_ref().set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let log = gw.logs();
    let all = tokio::task::spawn_blocking(move || read_lines(&mut late, 3000)).await.unwrap_or_else(|e| {
        panic!("{e}\n{}", log.lines().filter(|l| l.contains("feed")).collect::<Vec<_>>().join("\n"))
    });
    let nums: Vec<i64> = all.iter().map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert_eq!(
        nums,
        (1..=3000).collect::<Vec<_>>(),
        "a client without a starting number gets the live stream from its connection on"
    );
}

/// The page in Debian's headless Chromium, driven by playwright-core (tests/browser/): it loads
/// without console errors, a wrong token is refused, a chip check started from the page shows its
/// reads (and reaches nobody), a session started from the page exists
/// remotely, and passings read through the pseudo-terminal appear live. Screenshots at phone and
/// laptop widths are taken (and copied to docs/screenshots/ with RUFUS_GATEWAY_UPDATE_SCREENSHOTS=1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_headless_chromium() {
    use std::io::{BufRead, Write};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let ready =
        std::path::Path::new("/usr/bin/chromium").exists() && browser_dir.join("node_modules/playwright-core").exists();
    if !ready {
        let reason = "needs Debian's chromium and `npm ci` in tests/browser (.ci/run does both)";
        assert!(
            std::env::var_os("RUFUS_GATEWAY_REQUIRE_BROWSER").is_none(),
            "browser test required but not runnable: {reason}"
        );
        println!("skipped: {reason}");
        return;
    }
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra(""));
    gw.start().await;
    let url = base(&gw);
    // Screenshots of this run go to its own directory (their sizes are checked there); the tracked
    // ones in docs/screenshots/ are replaced only on request (RUFUS_GATEWAY_UPDATE_SCREENSHOTS=1).
    let shots = gw.dir.path().join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut node = std::process::Command::new("node")
        .current_dir(&browser_dir)
        .arg("dashboard.mjs")
        .arg(&url)
        .arg(TOKEN)
        .arg(&shots)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = node.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let expect = |prefix: &str| -> String {
        let line = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("browser never said {prefix}"));
        assert!(line.starts_with(prefix), "expected {prefix}, got {line}");
        line
    };
    expect("LOADED");
    let refused = expect("REFUSED");
    assert!(refused.contains("wrong token"), "{refused}");
    assert!(fake.state().sessions.is_empty(), "nothing started with a wrong token");
    // The chip check: three reads, shown with their bibs (no bib map here: "not in bib map").
    expect("CHECKING");
    write_lines(&mut pty, &chips(100..103));
    writeln!(node.stdin.as_mut().unwrap(), "3").unwrap();
    let checked = expect("CHECKED ");
    assert_eq!(checked, "CHECKED not in bib map,not in bib map,not in bib map");
    assert!(fake.state().sessions.is_empty(), "a chip check reaches nobody");
    expect("STARTED");
    wait_fake(&fake, &gw, "the session started from the page exists remotely", |s| {
        s.sessions.iter().any(|x| x.alias == "FROM-THE-PAGE")
    })
    .await;

    let chips = chips(0..8);
    write_lines(&mut pty, &chips);
    writeln!(node.stdin.as_mut().unwrap(), "{}", chips.len()).unwrap();
    let rows = expect("ROWS ");
    let shown: Vec<&str> = rows["ROWS ".len()..].split(',').collect();
    let newest_first: Vec<&str> = chips.iter().rev().map(String::as_str).collect();
    assert_eq!(shown, newest_first, "the last passings, newest first");
    let problems = expect("PROBLEMS ");
    assert_eq!(problems, "PROBLEMS []", "no console errors");
    assert!(node.wait().unwrap().success());
    for shot in ["dashboard-phone.png", "dashboard-laptop.png", "dashboard-chipcheck.png"] {
        assert!(std::fs::metadata(shots.join(shot)).unwrap().len() > 10_000, "{shot} written by this run");
        if std::env::var_os("RUFUS_GATEWAY_UPDATE_SCREENSHOTS").is_some() {
            std::fs::copy(shots.join(shot), root.join("docs/screenshots").join(shot)).unwrap();
        }
    }
    assert!(!gw.logs().contains(TOKEN));
}

/// Only the pipeline is critical: a dashboard and a feed whose ports are taken are reported in
/// status and retried, while reads are stored and delivered as usual; once the ports are free
/// they listen, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_that_cannot_bind_never_stop_the_pipeline() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    // Someone else holds both ports.
    let taken_http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_feed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (http_addr, feed_addr) = (taken_http.local_addr().unwrap(), taken_feed.local_addr().unwrap());
    let extra = format!(
        "reader.pattern = '^(?P<chip>[0-9A-F]{{8}})$'\nsession.auto_start = true\nhttp.listen = \"{http_addr}\"\nfeed.listen = \"{feed_addr}\""
    );
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &extra);
    gw.start().await;

    let status = gw
        .wait_status("both listeners failing", |s| s["listening"]["failing"].as_object().is_some_and(|f| f.len() == 2))
        .await;
    assert!(null(&status, "listening.http") && null(&status, "listening.feed"), "{status}");
    let failing = &status["listening"]["failing"];
    assert_eq!(failing["http"]["listen"], http_addr.to_string());
    assert!(failing["http"]["error"].as_str().unwrap().contains("in use"), "{failing}");
    assert!(failing["feed"]["since"].as_str().unwrap().ends_with('Z'), "{failing}");
    let problems = status["problems"].to_string();
    assert!(problems.contains("DASHBOARD NOT LISTENING") && problems.contains("LIVE FEED NOT LISTENING"), "{problems}");

    // Reading, storing and uploading go on.
    write_lines(&mut pty, &chips(0..20));
    wait_fake(&fake, &gw, "20 passings", |s| s.total_passings() == 20).await;

    // The ports are freed: both listen again, by themselves.
    drop(taken_http);
    drop(taken_feed);
    let status = gw
        .wait_status("both listening", |s| s["listening"]["http"].is_string() && s["listening"]["feed"].is_string())
        .await;
    assert_eq!(status["listening"]["http"], http_addr.to_string());
    assert!(status["listening"]["failing"].as_object().unwrap().is_empty(), "{status}");
    let page = http_client().get(format!("http://{http_addr}/api/status")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(gw.logs().contains("cannot listen; retrying"), "the failure is logged");
    assert_eq!(gw.terminate().await.code(), Some(0));
}
