//! The drain yardstick of docs/PERFORMANCE.md: a bare client in a process of its own (as the
//! gateway is) that opens a session and posts `n` passings in batches, one request at a time,
//! with the gateway's HTTP stack and encoder. No storage, no bookkeeping: the time it takes is
//! what the network and the server cost. Prints the seconds from the first request to the last
//! answer, and the CPU seconds the process used meanwhile.
//!
//! Run by the load tool: `bare-client BASE_URL API_KEY DEVICEID N BATCH`.

use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, key, device, n, batch] = args.as_slice() else {
        anyhow::bail!("usage: bare-client BASE_URL API_KEY DEVICEID N BATCH");
    };
    let (n, batch): (i64, usize) = (n.parse()?, batch.parse()?);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let http = reqwest::Client::new();
    rt.block_on(async {
        let reply: serde_json::Value = http
            .post(format!("{base}/sessions"))
            .header("api_key", key.as_str())
            .json(&serde_json::json!({ "deviceid": device, "alias": "BARE" }))
            .send()
            .await?
            .json()
            .await?;
        let token = reply["token_session"].as_str().unwrap_or_default().to_string();
        let passings: Vec<rufus_gateway::store::query::Outgoing> = (0..n)
            .map(|i| rufus_gateway::store::query::Outgoing {
                id: i,
                num_passing: i + 1,
                bib: format!("{:08X}", 0xB000_0000u32 as i64 + i),
                chip: format!("{:08X}", 0xB000_0000u32 as i64 + i),
                timestamp_us: rufus_gateway::clock::now_us(),
                held: None,
            })
            .collect();
        let (start, cpu) = (Instant::now(), cpu_seconds());
        for chunk in passings.chunks(batch) {
            let body = rufus_gateway::uplink::api::batch_body(&token, chunk);
            let r = http
                .post(format!("{base}/passings"))
                .header("api_key", key.as_str())
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "answer {}", r.status());
            r.bytes().await?;
        }
        println!("{:.6} {:.6}", start.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        Ok(())
    })
}

/// User and system CPU time of this process, all threads.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
