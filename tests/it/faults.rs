//! How the uplink behaves when the API misbehaves: one test per documented fault.

use std::time::Duration;

use crate::common::*;
use rufus_gateway::demo::fake_api::{FAKE_KEY, FakeApi, Fault, Route};

const STRICT_CHIP: &str = r#"reader.pattern = '^(?P<chip>[0-9A-F]{8})$'"#;

/// A gateway with a session already created remotely.
async fn running(extra: &str) -> (FakeApi, Gateway, rufus_gateway::demo::pty::Pty) {
    let (fake, device) = fake().await;
    let pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), &format!("{STRICT_CHIP}\n{extra}"));
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "FAULTS"]);
    wait_fake(&fake, &gw, "remote session created", |s| s.sessions.len() == 1).await;
    (fake, gw, pty)
}

/// Neither the API key nor a whole session token may appear in the log (debug level here).
fn assert_no_secrets(fake: &FakeApi, gw: &Gateway) {
    let log = gw.logs();
    assert!(!log.contains(FAKE_KEY), "API key in the log");
    for s in &fake.state().sessions {
        assert!(!log.contains(&s.token), "a whole session token in the log");
        assert!(!log.contains(&s.token[..20]), "most of a session token in the log");
    }
}

fn nums(fake: &FakeApi) -> Vec<i64> {
    fake.state().sessions[0].passings.keys().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_is_resent_with_the_same_numbers() {
    let (fake, gw, mut pty) = running("api.batch_size = 10").await;
    fake.push_fault(Route::Passings, Fault::CommitThenDrop);
    fake.push_fault(Route::Passings, Fault::CommitThenDrop);
    write_lines(&mut pty, &chips(0..30));
    let status = gw.wait_status("30 delivered", |s| s["queue"]["delivered"] == 30).await;
    assert_eq!(nums(&fake), (1..=30).collect::<Vec<_>>());
    let state = fake.state();
    assert!(state.sessions[0].duplicates >= 1, "the resend was seen as duplicates");
    assert_eq!(state.sessions[0].conflicts, 0, "a resent num_passing always carries the same passing");
    // The gateway hears of duplicates only through replies that arrived.
    let reported = status["uplink"]["duplicates_reported"].as_u64().unwrap();
    assert!(reported >= 10 && reported <= state.sessions[0].duplicates, "{reported}");
    drop(state);
    assert_no_secrets(&fake, &gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_on_429() {
    let (fake, gw, mut pty) = running("").await;
    fake.push_fault(Route::Passings, Fault::Status { code: 429, retry_after: Some("2".into()) });
    write_lines(&mut pty, &chips(0..5));
    gw.wait_status("5 delivered", |s| s["queue"]["delivered"] == 5).await;
    let state = fake.state();
    let posts: Vec<_> = state.requests.iter().filter(|r| r.path == "/passings").collect();
    assert_eq!(posts[0].status, 429);
    let gap = posts[1].at - posts[0].at;
    println!("retried {:.2} s after a 429 with Retry-After: 2", gap.as_secs_f64());
    assert!(gap >= Duration::from_millis(1950), "waited only {gap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_5xx_is_ridden_out() {
    let (fake, gw, mut pty) = running("").await;
    for code in [500, 502, 503, 503, 504, 500, 503, 502] {
        fake.push_fault(Route::Passings, Fault::Status { code, retry_after: None });
    }
    write_lines(&mut pty, &chips(0..50));
    let status = gw.wait_status("50 delivered", |s| s["queue"]["delivered"] == 50).await;
    assert_eq!(nums(&fake), (1..=50).collect::<Vec<_>>());
    assert_eq!(status["uplink"]["state"], "online");
    assert!(status["uplink"]["last_error"].as_str().unwrap().contains("50"), "{status:#}");
    assert!(status["uplink"]["requests_failed"].as_u64().unwrap() >= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_are_retried() {
    let (fake, gw, mut pty) = running("").await;
    for _ in 0..3 {
        fake.push_fault(Route::Passings, Fault::Drop);
    }
    fake.push_fault(Route::CloseSession, Fault::Drop);
    write_lines(&mut pty, &chips(0..15));
    gw.wait_status("15 delivered", |s| s["queue"]["delivered"] == 15).await;
    assert_eq!(nums(&fake), (1..=15).collect::<Vec<_>>());
    assert_eq!(fake.state().sessions[0].duplicates, 0, "nothing committed by a dropped request");
    gw.cli_ok(&["session", "close"]);
    wait_fake(&fake, &gw, "closed despite a reset", |s| !s.sessions[0].active).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_passing_is_isolated_and_the_rest_flows() {
    let (fake, gw, mut pty) = running("api.batch_size = 16").await;
    let chips = chips(0..40);
    fake.state().refused_chips.insert(chips[12].clone());
    write_lines(&mut pty, &chips);
    let status = gw
        .wait_status("39 delivered, 1 undeliverable", |s| {
            s["queue"]["delivered"] == 39 && s["queue"]["undeliverable"] == 1
        })
        .await;
    assert_eq!(status["queue"]["pending"], 0);
    let expected: Vec<i64> = (1..=40).filter(|n| *n != 13).collect();
    assert_eq!(nums(&fake), expected);
    let export = gw.cli_ok(&["export"]);
    let refused = export.lines().find(|l| l.contains(&chips[12])).unwrap();
    assert!(refused.contains("undeliverable") && refused.contains("Invalid passing"), "{refused}");
    // How many batches go out depends on how fast the reads arrive; the cost of isolating the
    // refused passing does not: each refusal halves the batch, so at most log2(16) + 1 refusals.
    let state = fake.state();
    let posts = state.requests.iter().filter(|r| r.path == "/passings").count();
    let refusals: Vec<usize> =
        state.requests.iter().filter(|r| r.path == "/passings" && r.status == 400).map(|r| r.batch).collect();
    println!(
        "{posts} POST /passings, {} refused (batches {refusals:?}), to isolate one passing among 40 (batch 16)",
        refusals.len()
    );
    assert!(refusals.len() <= 5, "{refusals:?}");
    assert!(refusals.windows(2).all(|w| w[1] <= w[0].div_ceil(2)), "each refusal at least halves: {refusals:?}");
    assert_eq!(refusals.last(), Some(&1), "the refused passing alone at last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_close_keeps_the_passings_and_stops_sending() {
    let (fake, gw, mut pty) = running("").await;
    write_lines(&mut pty, &chips(0..10));
    gw.wait_status("10 delivered", |s| s["queue"]["delivered"] == 10).await;
    let token = fake.state().sessions[0].token.clone();
    fake.close_remotely(&token);
    write_lines(&mut pty, &chips(10..20));
    let status = gw
        .wait_status("closed_remotely with 10 held", |s| {
            s["session"]["remote_state"] == "closed_remotely" && s["queue"]["held"] == 10
        })
        .await;
    assert!(status["problems"][0].as_str().unwrap().contains("CLOSED REMOTELY"), "{status:#}");
    let posts_after_close = || fake.state().requests.iter().filter(|r| r.path == "/passings").count();
    let posts = posts_after_close();
    // More reads arrive; they are kept for the session and nothing more is sent.
    write_lines(&mut pty, &chips(20..25));
    gw.wait_status("15 held", |s| s["queue"]["held"] == 15).await;
    assert_eq!(posts_after_close(), posts, "no request for a remotely closed session");
    assert_eq!(fake.state().sessions.len(), 1, "no new session opened automatically");
    assert_eq!(fake.state().total_passings(), 10);
    let human = gw.cli_ok(&["status"]);
    assert!(human.contains("CLOSED REMOTELY") && human.contains("15 passings"), "{human}");
    assert!(gw.logs().contains("REMOTE SESSION CLOSED"));
    assert_no_secrets(&fake, &gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_pauses_the_uplink_and_loses_nothing() {
    let (fake, device) = fake().await;
    fake.state().api_key = "ror-some-other-key-000".into();
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "KEY"]);
    write_lines(&mut pty, &chips(0..5));
    let status = gw.wait_status("auth_failed", |s| s["uplink"]["state"] == "auth_failed").await;
    assert!(status["problems"][0].as_str().unwrap().contains("API REFUSES"), "{status:#}");
    assert!(status["uplink"]["last_error"].as_str().unwrap().contains("api.api_key"), "says what to fix");
    let requests = fake.state().requests.len();
    write_lines(&mut pty, &chips(5..10));
    gw.wait_status("10 pending", |s| s["queue"]["pending"] == 10).await;
    assert_eq!(fake.state().requests.len(), requests, "paused: new reads do not trigger requests");

    // The operator fixes the key (here: the server accepts it again) and restarts.
    fake.state().api_key = FAKE_KEY.into();
    assert_eq!(gw.terminate().await.code(), Some(0));
    gw.start().await;
    wait_fake(&fake, &gw, "10 delivered after the fix", |s| s.total_passings() == 10).await;
    assert_eq!(nums(&fake), (1..=10).collect::<Vec<_>>());
    assert_no_secrets(&fake, &gw);
}

/// `POST /sessions` committed but its reply lost: the retry finds the session the server made
/// (the device's active one, same alias, no passings) and uses it, instead of leaving an empty
/// twin behind. A session that already holds passings is never taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_creation_reply_was_lost_is_taken_over_not_made_twice() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), STRICT_CHIP);
    fake.push_fault(Route::CreateSession, Fault::CommitThenDrop);
    gw.start().await;
    gw.cli_ok(&["session", "start", "--alias", "LOST-REPLY"]);
    write_lines(&mut pty, &chips(0..10));
    wait_fake(&fake, &gw, "10 passings", |s| s.total_passings() == 10).await;
    {
        let state = fake.state();
        assert_eq!(state.sessions.len(), 1, "a second remote session was made");
        assert!(state.requests.iter().any(|r| r.method == "POST" && r.path == "/sessions" && r.status == 0));
    }
    assert!(gw.logs().contains("remote session taken over"), "{}", gw.logs());

    // The next session, same alias: the active one now holds passings, so a new one is made.
    gw.cli_ok(&["session", "start", "--alias", "LOST-REPLY"]);
    write_lines(&mut pty, &chips(10..15));
    wait_fake(&fake, &gw, "15 passings", |s| s.total_passings() == 15).await;
    let state = fake.state();
    assert_eq!(state.sessions.len(), 2);
    assert_eq!(state.sessions[1].passings.len(), 5);
}
