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
