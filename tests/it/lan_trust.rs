//! What a stick, a phone or a laptop on the tent LAN, or a reader, can make the box do: the rows
//! of the stick-and-LAN issue that are done, each through the real binary.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::*;

const VALID: &str = r#"
[api]
api_key = "ror-ae4fc6c19681a20fad30"
deviceid = "65A1B2"
[reader]
port = "/dev/ttyUSB0"
"#;

fn check_config(path: &std::path::Path) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).arg("-c").arg(path).arg("check-config").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Row 8: a regex `bib` group capturing ESC/OSC/BEL bytes was printed raw by `watch` and sent to
/// the API. Now such a record is refused (`bad_bib`), and the reads around it flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bib_with_escape_sequences_is_refused_and_reads_flow() {
    let (fake, device) = fake().await;
    let mut pty = pty();
    let extra = "reader.pattern = '^(?P<chip>[0-9A-F]+);(?P<bib>.*)$'\nsession.auto_start = true";
    let mut gw = Gateway::new(&fake, &device, &pty.path.display().to_string(), extra);
    gw.start().await;
    write_lines(
        &mut pty,
        &["ABC1;B11".into(), "ABC2;\u{1b}]0;pwned\u{7}\u{1b}[2J".into(), "ABC3;\u{202e}12".into(), "ABC4;B14".into()],
    );
    wait_fake(&fake, &gw, "2 passings", |s| s.total_passings() >= 2).await;
    let s = gw.wait_status("2 bibs refused", |s| s["reader"]["rejected"]["bad_bib"] == 2).await;
    let bibs: Vec<String> =
        fake.state().sessions.iter().flat_map(|s| s.passings.values().map(|p| p.bib.clone())).collect();
    assert_eq!(bibs, ["B11", "B14"]);
    eprintln!(
        "lan row 8: bibs with escapes refused ({} bad_bib), the others sent: {bibs:?}",
        s["reader"]["rejected"]["bad_bib"]
    );
}

/// Row 9: `signal.led = "../elsewhere"` or an absolute path wrote outside `leds_dir`. Now a name
/// that is a path is refused by `check-config` (exit 78) and at start.
#[test]
fn led_and_beeper_are_names_not_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    for (key, value) in [("led", "../elsewhere"), ("led", "/tmp/x"), ("beeper", ".."), ("beeper", "a/b")] {
        std::fs::write(&path, format!("{VALID}[signal]\n{key} = \"{value}\"\n")).unwrap();
        let (code, _, stderr) = check_config(&path);
        assert_eq!(code, Some(78), "{key} = {value}: {stderr}");
        assert!(stderr.contains(&format!("signal.{key}")), "{stderr}");
    }
    std::fs::write(&path, format!("{VALID}[signal]\nled = \"ACT\"\n")).unwrap();
    assert_eq!(check_config(&path).0, Some(0));
}

/// Row 10: a config holding `api_key` that any user can read was not warned about.
#[test]
fn a_world_readable_config_with_the_api_key_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, VALID).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stdout, _) = check_config(&path);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("WARNING: api.api_key:") && stdout.contains("mode 644"), "{stdout}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (_, stdout, _) = check_config(&path);
    assert!(!stdout.contains("WARNING: api.api_key:"), "{stdout}");
}
