//! The README's first command: the demo runs the whole pipeline and ends with everything delivered.

#[test]
fn the_demo_delivers_everything_even_through_an_outage() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rufus-gateway"))
        .args(["demo", "--duration", "5", "--outage"])
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("API DOWN") && stdout.contains("API BACK"), "{stdout}");
    assert!(stdout.contains("delivered to RUFUS           60 in 1 remote session(s)"), "{stdout}");
    assert!(stdout.ends_with("every passing was delivered, none twice.\n"), "{stdout}");
}
