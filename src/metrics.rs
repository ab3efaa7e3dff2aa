//! `GET /metrics`: the status in the Prometheus text exposition format.

use std::fmt::Write;

use crate::status::Status;

/// The Prometheus text exposition format.
pub fn render_metrics(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let plain = |v: f64| vec![(String::new(), v)];
    metric("rufus_reads_total", "counter", "Tag reads parsed since start.", &plain(s.reader.reads_total as f64));
    let rejected: Vec<(String, f64)> =
        s.reader.rejected.iter().map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), *n as f64)).collect();
    metric("rufus_rejected_total", "counter", "Reader records rejected since start, by reason.", &rejected);
    metric(
        "rufus_reader_connected",
        "gauge",
        "1 when the reader port is open.",
        &plain(s.reader.connected as u8 as f64),
    );
    let antenna = |f: &dyn Fn(&crate::antennas::AntennaStatus) -> f64| -> Vec<(String, f64)> {
        s.reader.antennas.iter().map(|a| (format!("{{antenna=\"{}\"}}", a.antenna), f(a))).collect()
    };
    metric(
        "rufus_antenna_reads_total",
        "counter",
        "Tag reads since start, by antenna (formats that carry one).",
        &antenna(&|a| a.reads_total as f64),
    );
    metric(
        "rufus_antenna_silent",
        "gauge",
        "1 while an antenna has been silent for reader.antenna_silence and the others read.",
        &antenna(&|a| a.silent as u8 as f64),
    );
    let offset: Vec<(String, f64)> =
        s.reader.clock.clock_offset_ms.map(|ms| (String::new(), ms as f64 / 1000.0)).into_iter().collect();
    metric(
        "rufus_reader_clock_offset_seconds",
        "gauge",
        "The reader clock minus the host clock, last measured (positive: the reader is fast).",
        &offset,
    );
    metric(
        "rufus_rewind_reads_total",
        "counter",
        "Reads the reader replayed in rewinds, taken in since start.",
        &plain(s.reader.rewind.reads_total as f64),
    );
    metric(
        "rufus_rewind_outside_total",
        "counter",
        "Replayed reads not taken since start: outside what a rewind asked for, or flagged while none ran.",
        &plain(s.reader.rewind.outside_total as f64),
    );
    metric(
        "rufus_reader_retimed_total",
        "counter",
        "Live reads since start whose reader time was further than reader.max_skew from the host clock (kept with the host's time).",
        &plain(s.reader.retimed_total as f64),
    );
    metric(
        "rufus_rewinds_total",
        "counter",
        "Rewinds finished (or ended early) since start.",
        &plain(s.reader.rewind.rewinds_total as f64),
    );
    metric(
        "rufus_rewind_running",
        "gauge",
        "1 while the reader replays what it stored.",
        &plain((s.reader.rewind.state == crate::reader::talk::RewindState::Running) as u8 as f64),
    );
    let q = &s.queue;
    let by_state =
        [("pending", q.pending), ("delivered", q.delivered), ("undeliverable", q.undeliverable), ("held", q.held)];
    let passings: Vec<(String, f64)> =
        by_state.iter().map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v as f64)).collect();
    metric(
        "rufus_passings",
        "gauge",
        "Passings in the store, by state (held: of remotely closed sessions).",
        &passings,
    );
    metric("rufus_queue_depth", "gauge", "Passings waiting to be sent.", &plain((q.pending - q.held) as f64));
    let oldest = q
        .oldest_pending_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(0.0);
    metric(
        "rufus_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest passing still waiting.",
        &plain(oldest.max(0.0)),
    );
    let u = &s.uplink;
    let requests = vec![
        ("{outcome=\"ok\"}".to_string(), u.requests_ok as f64),
        ("{outcome=\"failed\"}".to_string(), u.requests_failed as f64),
    ];
    metric("rufus_uplink_requests_total", "counter", "Requests to the RUFUS API, by outcome.", &requests);
    let states = ["idle", "online", "offline", "backing_off", "auth_failed"];
    let state: Vec<(String, f64)> =
        states.iter().map(|k| (format!("{{state=\"{k}\"}}"), (u.state.as_str() == *k) as u8 as f64)).collect();
    metric("rufus_uplink_state", "gauge", "1 for the uplink's current state.", &state);
    metric(
        "rufus_clock_synchronized",
        "gauge",
        "1 when the system clock is synchronised.",
        &plain(s.clock.synchronized as u8 as f64),
    );
    let refused: Vec<(String, f64)> =
        s.listening.refused.iter().map(|(k, n)| (format!("{{listener=\"{k}\"}}"), *n as f64)).collect();
    metric(
        "rufus_connections_refused_total",
        "counter",
        "Connections refused because a listener had all the clients it takes.",
        &refused,
    );
    metric(
        "rufus_storage_buffered_reads",
        "gauge",
        "Reads held in memory because the database refuses writes.",
        &plain(s.storage.buffered_reads as f64),
    );
    out
}
