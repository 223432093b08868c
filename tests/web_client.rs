//! The web client (`static/`) end to end in a real headless Chromium: runs
//! `tests/web/run.sh` (Playwright tests under Node's test runner) against this build's
//! `pigeon` binary. Needs Node.js and Chromium (`.ci/run` installs them); without them it
//! says it was skipped, and fails when `CI` is set.
use std::path::Path;
use std::process::Command;

#[test]
fn web_client_in_headless_chromium() {
    let chromium = std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !Path::new(&chromium).exists() || !node {
        eprintln!("SKIPPED: the web client tests need Chromium at {chromium} and Node.js");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the web client tests"
        );
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let status = Command::new("bash")
        .arg(Path::new(root).join("tests/web/run.sh"))
        .env("PIGEON_BIN", env!("CARGO_BIN_EXE_pigeon"))
        .env("CHROMIUM_PATH", &chromium)
        .current_dir(root)
        .status()
        .expect("cannot run tests/web/run.sh");
    assert!(status.success(), "web client tests failed: {status}");
}
