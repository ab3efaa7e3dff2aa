//! A database written by an earlier version is taken over as it is: what it recorded as
//! delivered stays delivered (never resent), what was pending is sent, and the counters, the
//! export and pruning agree with it.

use crate::common::*;
use rufus_gateway::demo::fake_api::FAKE_KEY;

const STRICT_CHIP: &str = r#"reader.pattern = '^(?P<chip>[0-9A-F]{8})$'"#;

/// Schema version 1 marked each delivered passing's row. Here: 1-4 and 6 delivered two days ago,
/// 5 refused, 7 pending, 8 delivered out of order (its record landed while 7's was retried),
/// 9-10 pending. The remote session is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_keeps_its_deliveries_and_sends_only_what_was_pending() {
    let (fake, device) = fake().await;
    let reply: serde_json::Value = http_client()
        .post(format!("{}/sessions", fake.base_url()))
        .header("api_key", FAKE_KEY)
        .json(&serde_json::json!({ "deviceid": device, "alias": "OLD" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = reply["token_session"].as_str().unwrap().to_string();

    let mut pty = pty();
    let mut gw = Gateway::new(
        &fake,
        &device,
        &pty.path.display().to_string(),
        &format!("{STRICT_CHIP}\nstorage.retention = \"1d\""),
    );
    let now = rufus_gateway::clock::now_us();
    let two_days_ago = now - 2 * 86_400_000_000;
    {
        let mut conn = rusqlite::Connection::open(&gw.db).unwrap();
        rufus_gateway::store::schema::migrate_to(&mut conn, 1).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO boots (id, boot_id, first_seen) VALUES (1, 'old-boot', 0)", []).unwrap();
        tx.execute(
            "INSERT INTO sessions (id, alias, state, remote_state, token, created_at, next_num, delivered, undeliverable)
             VALUES (1, 'OLD', 'open', 'open', ?1, ?2, 11, 6, 1)",
            rusqlite::params![token, two_days_ago],
        )
        .unwrap();
        for n in 1..=10i64 {
            let (state, delivered_at) = match n {
                1..=4 | 6 | 8 => ("delivered", Some(two_days_ago)),
                5 => ("undeliverable", None),
                _ => ("pending", None),
            };
            let chip = format!("{:08X}", 0xC000_0000u32 as i64 + n);
            let at = two_days_ago + n * 1_000_000;
            tx.execute(
                "INSERT INTO reads (id, received_at, monotonic_us, boot, clock_synced, chip, timestamp, raw, session_id)
                 VALUES (?1, ?2, 0, 1, 1, ?3, ?2, x'00', 1)",
                rusqlite::params![n, at, chip],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO passings (session_id, num_passing, read_id, chip, bib, timestamp, window_start, state, delivered_at)
                 VALUES (1, ?1, ?1, ?2, ?2, ?3, ?3, ?4, ?5)",
                rusqlite::params![n, chip, at, state, delivered_at],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    gw.start().await;
    wait_fake(&fake, &gw, "the 3 pending passings sent", |s| s.total_passings() == 3).await;
    let nums: Vec<i64> = fake.state().sessions[0].passings.keys().copied().collect();
    assert_eq!(nums, vec![7, 9, 10], "only what version 1 had pending is sent");
    let status = gw.wait_status("9 delivered", |s| s["queue"]["delivered"] == 9).await;
    assert_eq!((status["queue"]["pending"].as_i64(), status["queue"]["undeliverable"].as_i64()), (Some(0), Some(1)));

    // The session goes on: new reads are numbered after the old ones and delivered.
    write_lines(&mut pty, &chips(0..5));
    wait_fake(&fake, &gw, "5 new passings", |s| s.total_passings() == 8).await;
    let nums: Vec<i64> = fake.state().sessions[0].passings.keys().copied().collect();
    assert_eq!(nums, vec![7, 9, 10, 11, 12, 13, 14, 15]);
    gw.wait_status("14 delivered", |s| s["queue"]["delivered"] == 14).await;
    let state = fake.state();
    assert_eq!((state.sessions[0].duplicates, state.sessions[0].conflicts), (0, 0));
    drop(state);

    // Pruning (retention 1 day, first run at start-up) took the rows delivered two days ago and
    // nothing else; the export shows every state, with the time each delivery was recorded.
    let export = gw.cli_ok(&["export"]);
    let rows: Vec<Vec<String>> =
        export.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect::<Vec<_>>()).collect();
    let header: Vec<&str> = export.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (num, state, delivered_at) = (col("num_passing"), col("state"), col("delivered_at"));
    let summary: Vec<(i64, &str, bool)> =
        rows.iter().map(|r| (r[num].parse().unwrap(), r[state].as_str(), !r[delivered_at].is_empty())).collect();
    let mut want =
        vec![(5, "undeliverable", false), (7, "delivered", true), (9, "delivered", true), (10, "delivered", true)];
    want.extend((11..=15).map(|n| (n, "delivered", true)));
    assert_eq!(summary, want, "{export}");
    let version: i64 = gw.sql().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, rufus_gateway::store::schema::VERSION);
    let list: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["session", "list", "--json"])).unwrap();
    assert_eq!((list[0]["passings"].as_i64(), list[0]["delivered"].as_i64()), (Some(15), Some(14)));
}
