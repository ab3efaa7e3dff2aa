//! Throughput of the pure stages, in records per second: parsing per format, framing of input
//! split into small chunks, de-duplication, and encoding of upload batches.
//!
//! Run: `cargo bench --bench pipeline` (figures in README.md, "Performance").

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rufus_gateway::config::{ChipEncoding, Format, ReaderConfig};
use rufus_gateway::dedup::{Candidate, Dedup, Strongest};
use rufus_gateway::reader::format::{Framer, Parser, chafon, ipico};
use rufus_gateway::store::query::Outgoing;

const N: usize = 1000;

fn records(format: Format) -> Vec<Vec<u8>> {
    let base = chrono::NaiveDate::from_ymd_opt(2026, 6, 1).unwrap().and_hms_milli_opt(9, 0, 0, 0).unwrap();
    (0..N)
        .map(|i| {
            let t = base + chrono::Duration::milliseconds(i as i64 * 37);
            let chip = format!("{:012X}", 0x5800_0000 + (i % 50));
            match format {
                Format::Ipico => format!("{}\r\n", ipico::encode(1, &chip, t)).into_bytes(),
                Format::Regex => format!("{chip},{},2,-61\n", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")).into_bytes(),
                Format::Ultra => format!("0,{chip},1170518701,{},1,-71,0,2,1,0000000000000000,0,{i}\n", i % 1000).into_bytes(),
                Format::ImpinjJson => format!(
                    "{{\"antennaPort\":1,\"epc\":\"{chip}\",\"firstSeenTimestamp\":\"{}\",\"peakRssi\":-51,\"isHeartBeat\":false}}\n",
                    t.format("%Y-%m-%dT%H:%M:%S%.6fZ")
                )
                .into_bytes(),
                Format::Chafon => {
                    let epc: Vec<u8> = (0..12).map(|k| if k == 11 { (i % 50) as u8 } else { 0 }).collect();
                    let mut f = vec![0, 0, 0xEE, 0, 1, 12];
                    f.extend(epc);
                    f.push(0x60);
                    f[0] = (f.len() + 1) as u8;
                    chafon::with_crc(f)
                }
            }
        })
        .collect()
}

fn config(format: Format) -> ReaderConfig {
    let mut cfg = ReaderConfig { format, ..Default::default() };
    if format == Format::Regex {
        cfg.pattern = r"^(?P<chip>[0-9A-F]+),(?P<timestamp>[^,]+),(?P<antenna>\d+),(?P<rssi>-?\d+)$".into();
    }
    cfg
}

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(N as u64));
    let today = chrono::NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
    for format in [Format::Ipico, Format::Chafon, Format::Ultra, Format::ImpinjJson, Format::Regex] {
        let parser = Parser::from_config(&config(format), ChipEncoding::Hex).unwrap();
        let recs = records(format);
        let recs: Vec<&[u8]> =
            recs.iter().map(|r| r.strip_suffix(b"\r\n").or(r.strip_suffix(b"\n")).unwrap_or(r)).collect();
        group.bench_function(format!("{format:?}"), |b| {
            b.iter(|| {
                for r in &recs {
                    black_box(parser.parse(r, today));
                }
            })
        });
    }
    group.finish();
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_7_byte_chunks");
    group.throughput(Throughput::Elements(N as u64));
    for format in [Format::Ipico, Format::Chafon] {
        let stream: Vec<u8> = records(format).concat();
        group.bench_function(format!("{format:?}"), |b| {
            b.iter(|| {
                let mut framer = Framer::<u32>::for_format(format);
                let mut out = Vec::with_capacity(N);
                for chunk in stream.chunks(7) {
                    framer.push(chunk, 0, &mut out);
                }
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn dedup(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedup");
    group.throughput(Throughput::Elements(N as u64));
    let chips: Vec<String> = (0..N).map(|i| format!("{:012X}", i % 50)).collect();
    group.bench_function("first", |b| {
        b.iter(|| {
            let mut d = Dedup::new(Duration::from_secs(3));
            for (i, chip) in chips.iter().enumerate() {
                black_box(d.accept(chip, i as i64 * 10_000, i as i64 * 10_000));
            }
        })
    });
    group.bench_function("strongest", |b| {
        b.iter(|| {
            let mut s = Strongest::new(Duration::from_secs(3));
            for (i, chip) in chips.iter().enumerate() {
                let c = Candidate {
                    read_id: i as i64,
                    chip: chip.clone(),
                    bib: chip.clone(),
                    timestamp_us: i as i64 * 10_000,
                    rssi: Some((i % 90) as i64),
                    unsynced: false,
                };
                black_box(s.offer(c, i as i64 * 10_000));
            }
            black_box(s.due(i64::MAX).len())
        })
    });
    group.finish();
}

fn batch_encoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_batch");
    let batch: Vec<Outgoing> = (0..200)
        .map(|i| Outgoing {
            id: i,
            num_passing: i + 1,
            bib: format!("{}", 100 + i),
            chip: format!("{:024X}", i),
            timestamp_us: 1_780_000_000_000_000 + i * 1000,
            held: None,
        })
        .collect();
    group.throughput(Throughput::Elements(batch.len() as u64));
    let token = "2A19294BB886C3D5C7783309BBC6E385515C843893A6BC126FECE3904C6E2B25";
    group.bench_function("200_passings", |b| {
        b.iter(|| black_box(rufus_gateway::uplink::api::batch_body(token, &batch).len()))
    });
    group.finish();
}

criterion_group!(benches, parsing, framing, dedup, batch_encoding);
criterion_main!(benches);
