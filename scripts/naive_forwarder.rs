//! The yardstick of docs/PERFORMANCE.md: a naive forwarder, written the obvious way — every read
//! committed on its own (SQLite, synchronous=FULL), a loop posting what is unsent in batches. It
//! is what the gateway's CPU, disk writes and drain time are compared against; it is not part of
//! the product.
//!
//! Run by the load tool: `naive-forwarder PORT DB BASE_URL API_KEY DEVICEID`.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use rusqlite::{Connection, params};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, db, base, key, device] = args.as_slice() else {
        anyhow::bail!("usage: naive-forwarder PORT DB BASE_URL API_KEY DEVICEID");
    };
    let conn = Connection::open(db)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS reads (id INTEGER PRIMARY KEY, chip TEXT NOT NULL, at TEXT NOT NULL, sent INTEGER NOT NULL DEFAULT 0);",
    )?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let token: String = rt.block_on(async {
        let reply: serde_json::Value = http
            .post(format!("{base}/sessions"))
            .header("api_key", key.as_str())
            .json(&serde_json::json!({ "deviceid": device, "alias": "NAIVE" }))
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(reply["token_session"].as_str().unwrap_or_default().to_string())
    })?;

    // Reader thread: one INSERT, one COMMIT, per line.
    let port_path = port.clone();
    let db_path = db.clone();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let conn = Connection::open(&db_path)?;
        conn.execute_batch("PRAGMA synchronous = FULL;")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let port = std::fs::File::open(&port_path)?;
        for line in BufReader::new(port).lines() {
            let line = line?;
            let chip = line.trim();
            if chip.is_empty() {
                continue;
            }
            let at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
            conn.execute("INSERT INTO reads (chip, at) VALUES (?1, ?2)", params![chip, at])?;
        }
        Ok(())
    });

    // Uplink: every 100 ms, post what is unsent, 200 at a time.
    conn.busy_timeout(Duration::from_secs(5))?;
    rt.block_on(async {
        loop {
            let batch: Vec<(i64, String, String)> = conn
                .prepare("SELECT id, chip, at FROM reads WHERE sent = 0 ORDER BY id LIMIT 200")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let list: Vec<serde_json::Value> = batch
                .iter()
                .map(|(id, chip, at)| serde_json::json!({ "bib": chip, "chip": chip, "num_passing": id, "timestamp": at }))
                .collect();
            let ok = http
                .post(format!("{base}/passings"))
                .header("api_key", key.as_str())
                .json(&serde_json::json!({ "token_session": token, "passings_list": list }))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                for (id, _, _) in &batch {
                    conn.execute("UPDATE reads SET sent = 1 WHERE id = ?1", [id])?;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    })
}
