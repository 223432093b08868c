//! WebSocket conformance: Autobahn|Testsuite's fuzzingclient against Pigeon's test-only
//! echo route, through `.ci/autobahn.sh` with this build's binary. The script fails on any
//! case that is not OK / NON-STRICT / INFORMATIONAL / UNIMPLEMENTED, and loudly when
//! Python 2.7 is missing. Set `PIGEON_SKIP_AUTOBAHN=1` to leave it out of a local run
//! (never in CI).
use std::path::Path;
use std::process::Command;

#[test]
fn autobahn_fuzzingclient_against_the_echo_route() {
    if std::env::var_os("PIGEON_SKIP_AUTOBAHN").is_some() {
        eprintln!("SKIPPED: PIGEON_SKIP_AUTOBAHN is set");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the Autobahn suite"
        );
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let status = Command::new("bash")
        .arg(Path::new(root).join(".ci/autobahn.sh"))
        .arg(env!("CARGO_BIN_EXE_pigeon"))
        .current_dir(root)
        .status()
        .expect("cannot run .ci/autobahn.sh");
    assert!(status.success(), "Autobahn conformance failed: {status}");
}
