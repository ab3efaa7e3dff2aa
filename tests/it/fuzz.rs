//! Fuzz targets, bounded in time (a fixed number of cases each; `PROPTEST_CASES` raises it for a
//! longer run): arbitrary bytes into the framing and every parser, and into the request readers
//! of the feed, the control socket and the dashboard. Nothing may panic, nothing may buffer more
//! than its bound, and whatever comes out as a chip or an alias is inside its alphabet.

use proptest::prelude::*;
use rufus_gateway::config::{ALIAS_MAX, ChipEncoding, Format, ReaderConfig, alias_or_default};
use rufus_gateway::control::Request;
use rufus_gateway::limits::{LineError, read_line};
use rufus_gateway::reader::format::{Framer, Parser};
use rufus_gateway::reader::record::{CHIP_MAX, Framed, Parsed, is_safe_chip};

/// 512 cases a target; 32 under emulation (qemu runs the debug build some 20 times slower).
fn cases() -> u32 {
    if std::env::var_os("RUFUS_GATEWAY_EMULATED").is_some() { 32 } else { 512 }
}

const FORMATS: [Format; 5] = [Format::Regex, Format::Ipico, Format::Chafon, Format::Ultra, Format::ImpinjJson];

fn parser(format: Format, encoding: ChipEncoding) -> Parser {
    let mut cfg = ReaderConfig { format, timezone: chrono_tz::Tz::Europe__Madrid, ..Default::default() };
    if format == Format::Regex {
        // A permissive user pattern: the alphabet check, not the pattern, must keep chips clean.
        cfg.pattern = r"^(?P<chip>[^;]*);?(?P<bib>.*)$".into();
    }
    Parser::from_config(&cfg, encoding).unwrap()
}

/// Bytes that look a little like each format's records, with arbitrary bytes mixed in.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        "[ -~]{0,40}\r?\n".prop_map(String::into_bytes),
        "aa[0-9a-f]{0,40}\r\n".prop_map(String::into_bytes),
        "\\{\"epc\":\"[ -~\\\\n]{0,30}\",\"antennaPort\":1\\}\n".prop_map(String::into_bytes),
        "0,[ -~]{0,20},[0-9]{1,10},[0-9]{1,3},1,1,0,[0-9]{1,5}\r\n".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 4..40).prop_map(|mut v| {
            v[0] = (v.len() - 1) as u8; // a Chafon length byte that fits
            v
        }),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn framing_and_parsers_take_any_bytes(bytes in stream(), cut in 1usize..97) {
        let today = chrono::NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
        for format in FORMATS {
            for encoding in [ChipEncoding::Hex, ChipEncoding::Ascii] {
                let parser = parser(format, encoding);
                let mut framer = Framer::<u32>::for_format(format);
                let mut frames = Vec::new();
                for chunk in bytes.chunks(cut) {
                    framer.push(chunk, 0, &mut frames);
                }
                for frame in frames {
                    let Framed::Record { bytes, .. } = frame else { continue };
                    prop_assert!(bytes.len() <= 4096, "a record beyond the 4 KiB cap");
                    let reads = match parser.parse(&bytes, today) {
                        Parsed::Read(r) => vec![r],
                        Parsed::Reads(rs) => rs,
                        Parsed::Skip | Parsed::Reject(_) => vec![],
                    };
                    for r in reads {
                        prop_assert!(is_safe_chip(&r.chip, true) && r.chip.len() <= CHIP_MAX, "{format:?}: chip {:?}", r.chip);
                        prop_assert!(!r.chip.starts_with(' ') && !r.chip.contains([',', '\n', '"', '=']));
                    }
                }
            }
        }
    }

    /// The line reader under the feed's first line and the control socket: never more than its
    /// bound, whatever the bytes and however they are cut.
    #[test]
    fn bounded_lines_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..20_000), max in 1usize..5000) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut input: &[u8] = &bytes;
            let mut consumed = 0usize;
            loop {
                let before = input.len();
                match read_line(&mut input, max).await {
                    Ok(Some(line)) => {
                        prop_assert!(line.len() <= max);
                        prop_assert!(!line.contains(&b'\n'));
                    }
                    Ok(None) => break,
                    Err(LineError::TooLong(m)) => {
                        prop_assert_eq!(m, max);
                        prop_assert_eq!(before - input.len(), max + 1, "reads exactly max + 1 bytes, no more");
                        break;
                    }
                    Err(LineError::Io(e)) => return Err(TestCaseError::fail(e.to_string())),
                }
                consumed += before - input.len();
                prop_assert!(consumed <= bytes.len());
            }
            Ok(())
        })?;
    }

    /// The feed's first line: a number or nothing, from at most 32 bytes.
    #[test]
    fn feed_hello_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let mut input: &[u8] = &bytes;
        let since = runtime.block_on(rufus_gateway::feed::hello(&mut input));
        prop_assert!(bytes.len() - input.len() <= rufus_gateway::feed::HELLO_MAX + 1);
        // The oracle: a first line of at most 32 bytes, as text, trimmed, read as a number.
        let expected = bytes
            .iter()
            .position(|b| *b == b'\n')
            .filter(|end| *end <= rufus_gateway::feed::HELLO_MAX)
            .or_else(|| (bytes.len() <= rufus_gateway::feed::HELLO_MAX && !bytes.is_empty()).then_some(bytes.len()))
            .and_then(|end| std::str::from_utf8(&bytes[..end]).ok())
            .and_then(|line| line.trim().parse::<i64>().ok());
        prop_assert_eq!(since, expected, "{:?}", String::from_utf8_lossy(&bytes));
    }

    /// Control requests: any line is a request or a refusal; a session alias that gets through is
    /// inside its alphabet and length.
    #[test]
    fn control_requests_and_aliases_from_any_text(line in ".{0,200}", alias in ".{0,100}") {
        let _ = serde_json::from_str::<Request>(&line);
        let request = serde_json::to_string(&Request::SessionStart { alias: Some(alias.clone()), test: false }).unwrap();
        let parsed: Request = serde_json::from_str(&request).unwrap();
        let Request::SessionStart { alias: Some(given), test: false } = parsed else { panic!("round trip") };
        if let Ok(accepted) = alias_or_default(Some(&given), "GATEWAY") {
            prop_assert!(!accepted.is_empty() && accepted.chars().count() <= ALIAS_MAX);
            prop_assert!(!accepted.chars().any(|c| c.is_control() || "\"<>=@;\\".contains(c)), "{accepted:?}");
        }
    }

    /// The dashboard's Host check: any header value is answered, never a panic; names are only
    /// allowed when listed.
    #[test]
    fn host_check_from_any_text(host in ".{0,80}") {
        let names = vec!["localhost".to_string()];
        if rufus_gateway::http::host_allowed(&host, &names) {
            let name = host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n);
            prop_assert!(
                host.is_empty()
                    || host.starts_with('[')
                    || name.parse::<std::net::Ipv4Addr>().is_ok()
                    || name.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
                "{host:?}"
            );
        }
    }

    /// Every format with extreme numbers where its numbers and times go (`i64::MIN/MAX`,
    /// `u64::MAX`, `-1`, years ±262143): a rejection or a read whose time is inside the years a
    /// reader may name, never a panic.
    #[test]
    fn extreme_numbers_in_every_format(
        a in extreme(), b in extreme(), c in extreme(), d in extreme(), year in extreme_year(),
    ) {
        let today = chrono::NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
        let records: Vec<(Format, String)> = vec![
            (Format::Ultra, format!("0,1234,{a},{b},{c},{d},0,1,1,0000000000000000,0,{a}")),
            (Format::Ultra, format!("0,1234,{a},0,1,-60,{b},{c},1,0000000000000000,0,{d}")),
            (Format::ImpinjJson, format!("{{\"epc\":\"E200\",\"antennaPort\":{a},\"peakRssi\":{b},\"firstSeenTimestamp\":\"{year}-01-01T00:00:00Z\"}}")),
            (Format::ImpinjJson, format!("{{\"epc\":\"E200\",\"antennaPort\":1,\"peakRssi\":{c}e300,\"firstSeenTimestamp\":\"{year}-12-31T23:59:59.999999Z\"}}")),
            (Format::Ipico, ipico_with_date(&format!("{:02}", year.trim_start_matches(['+', '-']).len() % 100))),
        ];
        for (format, record) in records {
            let parser = parser(format, ChipEncoding::Hex);
            if let Parsed::Read(r) = parser.parse(record.as_bytes(), today)
                && let Some(t) = r.reader_time
            {
                prop_assert!(rufus_gateway::timestamp::READER_YEARS.contains(&chrono::Datelike::year(&t)), "{record}");
            }
        }
        for timestamp_format in ["unix", "unix_ms", "rfc3339", "%Y-%m-%d %H:%M:%S"] {
            let mut cfg = ReaderConfig { format: Format::Regex, timezone: chrono_tz::Tz::Pacific__Kiritimati, ..Default::default() };
            cfg.pattern = r"^(?P<chip>[0-9A-F]+),(?P<timestamp>.*)$".into();
            cfg.timestamp_format = rufus_gateway::config::TimestampFormat::parse(timestamp_format).unwrap();
            let parser = Parser::from_config(&cfg, ChipEncoding::Hex).unwrap();
            for t in [a.clone(), format!("{year}-01-01T00:00:00"), format!("{year}-12-31 23:59:59"), format!("{a}.{b}")] {
                if let Parsed::Read(r) = parser.parse(format!("ABCD,{t}").as_bytes(), today)
                    && let Some(t) = r.reader_time
                {
                    prop_assert!(rufus_gateway::timestamp::READER_YEARS.contains(&chrono::Datelike::year(&t)));
                }
            }
        }
    }

    /// The conversation with a reader that answers with extreme clocks and sends extreme times:
    /// every family, clock mode and a zone at each end of the day, driven for a minute.
    #[test]
    fn the_conversation_takes_extreme_clocks_and_times(year in extreme_year(), t in any::<i64>(), index in any::<u64>()) {
        use rufus_gateway::clock::Stamp;
        use rufus_gateway::config::ClockMode;
        use rufus_gateway::reader::talk::{Recall, Shared, Talk};
        for (format, elite) in [(Format::Ipico, false), (Format::Ipico, true), (Format::Ultra, false), (Format::ImpinjJson, false)] {
            for mode in [ClockMode::Measure, ClockMode::Set] {
                for zone in [chrono_tz::Tz::Pacific__Kiritimati, chrono_tz::Tz::Pacific__Pago_Pago] {
                    let cfg = ReaderConfig {
                        format,
                        clock: Some(mode),
                        rewind: true,
                        timezone: zone,
                        elite_control: elite.then(|| "tcp://127.0.0.1:9".to_string()),
                        ..Default::default()
                    };
                    let recall = Recall { reader_time_us: Some(t), ultra_index: Some(index), holes: vec![(index, index)] };
                    let mut talk = Talk::new(&cfg, recall, std::sync::Arc::new(Shared::default()));
                    let at = |ms: i64| Stamp { utc_us: 1_780_000_000_000_000 + ms * 1000, monotonic_us: 1_000_000 + ms * 1000 };
                    talk.connected(at(0), true);
                    for step in 0..60i64 {
                        let now = at(step * 1000);
                        talk.poll(now, true);
                        talk.take_elite();
                        let _ = talk.reply(format!("0:0:0 1-1-{year} (0)").as_bytes(), now);
                        talk.elite_line(&format!("date.Wed Jan  1 00:00:00 UTC {year}"), now);
                        let line = format!("0,1234,1,0,1,-60,{},1,1,0000000000000000,0,{}", step % 2, index.wrapping_add(step as u64));
                        talk.admit(Some(t), line.as_bytes(), now, true, step % 3 == 0);
                        talk.admit(Some(i64::MIN), b"", now, step % 2 == 0, false);
                        talk.admit(Some(i64::MAX), b"", now, true, true);
                    }
                    talk.disconnected(at(61_000));
                }
            }
        }
    }
}

fn extreme() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(i64::MAX.to_string()),
        Just(i64::MIN.to_string()),
        Just(u64::MAX.to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("99999999999999".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn extreme_year() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("+262143".to_string()),
        Just("-262143".to_string()),
        Just("+262142".to_string()),
        Just("9999".to_string()),
        Just("1969".to_string()),
        Just("0000".to_string()),
        (-300_000i32..300_000).prop_map(|y| format!("{y:+}")),
    ]
}

/// An IPICO record (valid checksum) dated in year `yy` of the century.
fn ipico_with_date(yy: &str) -> String {
    let body = format!("00123456789012ffff{yy}0101235959");
    let line = format!("aa{body}00");
    let sum = rufus_gateway::reader::format::ipico::checksum(&line[2..]);
    format!("{line}{sum}")
}
