//! The command line without a cluster: configuration checks, refusals, exit codes.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env_remove("TANDEM_CONFIG")
        .output()
        .unwrap()
}

fn example() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/tandem.toml"),
    )
    .unwrap()
}

#[test]
fn config_check_accepts_the_example() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tandem.toml");
    std::fs::write(&path, example()).unwrap();
    let output = tandem(&["config", "check", path.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid"));
}

#[test]
fn config_check_and_daemon_reject_bad_files_with_file_line_key_and_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = example().replace("default_primary = \"none\"", "default_primary = \"node3\"");
    assert_ne!(text, example(), "the example must set default_primary");
    std::fs::write(&path, &text).unwrap();
    let line = text
        .lines()
        .position(|line| line.contains("\"node3\""))
        .unwrap()
        + 1;
    let file = path.to_str().unwrap();
    for args in [
        vec!["config", "check", file],
        vec!["--config", file, "daemon"],
    ] {
        let output = tandem(&args);
        assert_eq!(output.status.code(), Some(10), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("{file}:{line}:")),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("module[0].default_primary"), "{stderr}");
        assert!(
            stderr.contains("\"none\", \"last\", \"node1\", \"node2\""),
            "{stderr}"
        );
    }
}

#[test]
fn unknown_keys_and_syntax_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        example().replace("[heartbeat]\n", "[heartbeat]\npulze = \"1s\"\n"),
    )
    .unwrap();
    let output = tandem(&["config", "check", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(10));
    assert!(
        stderr.contains("heartbeat.pulze") && stderr.contains("pulse"),
        "{stderr}"
    );
    std::fs::write(&path, "[cluster\nname = 1").unwrap();
    let output = tandem(&["config", "check", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&output.stderr).contains(":1:"));
}

#[test]
fn client_commands_without_a_daemon_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tandem.toml");
    let socket = dir.path().join("none.sock");
    std::fs::write(
        &path,
        example().replace(
            "socket = \"/run/tandem/tandem.sock\"",
            &format!("socket = {:?}", socket.display().to_string()),
        ),
    )
    .unwrap();
    let output = tandem(&["--config", path.to_str().unwrap(), "status"]);
    assert_eq!(output.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the tandem daemon"));
}

#[test]
fn secrets_are_random_and_accepted() {
    let first = String::from_utf8(tandem(&["secret"]).stdout).unwrap();
    let second = String::from_utf8(tandem(&["secret"]).stdout).unwrap();
    assert_ne!(first, second);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tandem.toml");
    let text: String = example()
        .lines()
        .map(|line| {
            if line.starts_with("secret = ") {
                format!("secret = {:?}", first.trim())
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, text).unwrap();
    assert!(
        tandem(&["config", "check", path.to_str().unwrap()])
            .status
            .success()
    );
}
