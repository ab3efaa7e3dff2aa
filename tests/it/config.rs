//! Configuration through the real binary: exit codes, messages that name the key, the example.

use std::path::Path;
use std::process::Command;

use rufus_gateway::config::{Config, Purpose};

const BIN: &str = env!("CARGO_BIN_EXE_rufus-gateway");

const VALID: &str = r#"
[api]
api_key = "ror-ae4fc6c19681a20fad30"
deviceid = "65A1B2"
[reader]
port = "/dev/ttyUSB0"
"#;

fn check(dir: &Path, text: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).arg("-c").arg(&path).arg("check-config").envs(env.iter().copied()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn invalid_configs_exit_78_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, String, &str)] = &[
        ("missing deviceid", VALID.replace("deviceid = \"65A1B2\"", ""), "api.deviceid"),
        ("missing api_key", VALID.replace("api_key = \"ror-ae4fc6c19681a20fad30\"", ""), "api.api_key"),
        ("missing port", VALID.replace("port = \"/dev/ttyUSB0\"", ""), "reader.port"),
        ("unknown key", format!("{VALID}baud = 9600\n"), "baud"),
        ("unknown section", format!("{VALID}[readr]\nport = \"x\"\n"), "readr"),
        ("bad duration", format!("{VALID}[passings]\ndedup_window = \"3 fortnights\"\n"), "passings.dedup_window"),
        (
            "plain http off loopback",
            VALID.replace("[api]", "[api]\nbase_url = \"http://api.runonrufus.com/v0\""),
            "api.base_url",
        ),
        ("bad enum", VALID.replace("[reader]", "[reader]\nparity = \"sometimes\""), "parity"),
        ("bad zone", VALID.replace("[reader]", "[reader]\ntimezone = \"Mars/Olympus\""), "reader.timezone"),
        ("pattern without chip", VALID.replace("[reader]", "[reader]\npattern = '^(?P<tag>\\d+)$'"), "reader.pattern"),
        ("http off loopback without token", format!("{VALID}[http]\nlisten = \"0.0.0.0:8080\"\n"), "http.token"),
        ("batch too big", VALID.replace("[api]", "[api]\nbatch_size = 100000"), "api.batch_size"),
    ];
    for (what, text, key) in cases {
        let (code, _, stderr) = check(dir.path(), text, &[]);
        assert_eq!(code, Some(78), "{what}: {stderr}");
        assert!(stderr.contains(key), "{what}: message should name {key}: {stderr}");
    }
    let missing = Command::new(BIN).args(["-c", "/nonexistent/config.toml", "check-config"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(78));
}

#[test]
fn a_valid_config_prints_a_summary_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = check(dir.path(), VALID, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("ror-ae…"), "{stdout}");
    assert!(!stdout.contains("ror-ae4fc6c19681a20fad30"), "the key is masked: {stdout}");
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let without_device = VALID.replace("deviceid = \"65A1B2\"", "");
    let (code, stdout, stderr) = check(
        dir.path(),
        &without_device,
        &[("RUFUS_GATEWAY__API__DEVICEID", "FROMENV"), ("RUFUS_GATEWAY__API__BATCH_SIZE", "7")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("batch 7"), "{stdout}");
    let (code, _, stderr) = check(dir.path(), VALID, &[("RUFUS_GATEWAY__API__TIMEOUT", "soon")]);
    assert_eq!(code, Some(78));
    assert!(stderr.contains("api.timeout"), "{stderr}");
}

#[test]
fn the_commented_example_config_loads() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/config.toml");
    let cfg = Config::load(&example, Purpose::Daemon).expect("the shipped example is valid");
    assert_eq!(cfg.api.batch_size, 200);
    assert_eq!(cfg.passings.dedup_window, std::time::Duration::from_secs(3));
    assert_eq!(cfg.http.listen.as_deref(), Some("127.0.0.1:8080"));
    assert_eq!(cfg.storage.path, Path::new("/var/lib/rufus-gateway/gateway.db"));
}

#[test]
fn usage_errors_exit_2_and_an_absent_daemon_exits_69() {
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{VALID}[control]\nsocket = \"{}\"\n", dir.path().join("none.sock").display());
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    for args in [&["status"][..], &["status", "--json"], &["session", "start"], &["session", "close"]] {
        let out = Command::new(BIN).arg("-c").arg(dir.path().join("c.toml")).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(69), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not running"), "{args:?}");
    }
}

#[test]
fn an_instance_config_gets_its_own_database_and_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("finish.toml");
    std::fs::write(&path, VALID).unwrap();
    let out = Command::new(BIN).arg("-c").arg(&path).arg("check-config").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("/var/lib/rufus-gateway/finish/gateway.db"), "{stdout}");
    assert!(stdout.contains("/run/rufus-gateway/finish/control.sock"), "{stdout}");
    // Explicit keys win.
    std::fs::write(&path, format!("{VALID}[storage]\npath = \"/srv/x.db\"\n")).unwrap();
    let out = Command::new(BIN).arg("-c").arg(&path).arg("check-config").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("/srv/x.db"));
}

/// The example's comments list the choices of each enumerated key (`# a | b | c`): every listed
/// choice must load, and where the code names what it accepts ("expected `a`, `b` or `c`"), the
/// two lists must be the same, so the comments can neither promise a choice that does not exist
/// nor hide one that does.
#[test]
fn the_example_lists_exactly_the_choices_the_code_accepts() {
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/config.toml")).unwrap();
    let token =
        |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let load = |section: &str, key: &str, value: &str| {
        // VALID has [api] and [reader]; a key of another section goes in a section of its own.
        let text = if VALID.contains(&format!("[{section}]\n")) {
            VALID.replace(&format!("[{section}]\n"), &format!("[{section}]\n{key} = \"{value}\"\n"))
        } else {
            format!("{VALID}[{section}]\n{key} = \"{value}\"\n")
        };
        std::fs::write(&path, text).unwrap();
        Config::load(&path, Purpose::Daemon).map(|_| ()).map_err(|e| format!("{e:#}"))
    };
    let (mut section, mut listed_keys, mut compared) = (String::new(), 0, Vec::new());
    for line in example.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            section = name.to_string();
            continue;
        }
        let Some((assignment, comment)) = line.split_once('#') else { continue };
        let Some((key, _)) = assignment.split_once('=') else { continue };
        let key = key.trim();
        // The choices: the comment up to its first parenthesis, if it is `a | b | …` and nothing else.
        let head = comment.split('(').next().unwrap_or_default();
        let listed: Vec<&str> = head.split('|').map(str::trim).collect();
        if listed.len() < 2 || !listed.iter().all(|t| token(t)) {
            continue;
        }
        listed_keys += 1;
        for choice in &listed {
            assert_eq!(load(&section, key, choice), Ok(()), "{section}.{key} = \"{choice}\" is listed but refused");
        }
        // A free-form key (log.level takes any tracing filter) has nothing more to compare.
        let Err(refused) = load(&section, key, "no-such-choice") else { continue };
        if let Some(expected) = refused.split("; expected ").nth(1) {
            let mut accepted: Vec<&str> = expected.split('`').filter(|t| token(t)).collect();
            let mut listed = listed.clone();
            accepted.sort_unstable();
            listed.sort_unstable();
            assert_eq!(
                listed, accepted,
                "{section}.{key}: the comment lists {listed:?}, the code accepts {accepted:?}"
            );
            compared.push(format!("{section}.{key}"));
        }
    }
    // parity, flow_control, format, timestamps, dedup_keep, chip_encoding, unmapped, clock.source,
    // log.target are enumerations; log.level is a filter (checked for acceptance only).
    assert!(listed_keys >= 10, "only {listed_keys} keys with listed choices found");
    assert_eq!(compared.len(), 9, "enumerations compared: {compared:?}");
}
