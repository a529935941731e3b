//! The command line: `check-config` on the shipped examples and on broken files, and start-up
//! refusals that must be one clear line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use support::keygen;

fn benchgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_benchgate"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `text` with the production key directories pointed at `dir`.
fn relocated(text: &str, dir: &Path) -> String {
    let dir = dir.display().to_string();
    text.replace("/etc/benchgate", &dir)
        .replace("/var/lib/benchgate", &dir)
}

#[test]
fn check_config_accepts_every_shipped_example() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "user_ca", "ed25519");
    let mut checked = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let copy = dir.path().join(path.file_name().unwrap());
        std::fs::write(
            &copy,
            relocated(&std::fs::read_to_string(&path).unwrap(), dir.path()),
        )
        .unwrap();
        let out = benchgate(&["check-config", "--config", copy.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("trusted user CA SHA256:"), "{stdout}");
        assert!(stdout.contains("will be created"), "{stdout}");
        // check-config never creates keys.
        assert!(!dir.path().join("ssh_host_ed25519_key").exists());
        checked += 1;
    }
    assert!(checked >= 1, "no config examples found");
}

#[test]
fn unknown_key_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nmax_startups = 4\nmax_startup = 5\n").unwrap();
    let out = benchgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}:3:", path.display())), "{err}");
    assert!(err.contains("max_startup"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A config in `dir` whose CA file and host key are there too.
fn config_in(dir: &Path) -> String {
    let path = dir.join("benchgate.toml");
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhost_keys = [\"{0}/host_key\"]\n\
         [auth]\ntrusted_user_ca_keys = [\"{0}/ca.pub\"]\n[metrics]\nlisten = \"\"\n",
        dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn assert_refuses_to_start(dir: &Path, expected: &str) {
    let out = benchgate(&["serve", "--config", &config_in(dir)]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(expected), "expected {expected:?} in {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn world_readable_host_key_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "ca", "ed25519");
    let key = keygen(dir.path(), "host_key", "ed25519");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_refuses_to_start(dir.path(), "permissions 0644 are too open");
}

#[test]
fn unreadable_host_key_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "ca", "ed25519");
    std::fs::write(dir.path().join("host_key"), "garbage").unwrap();
    std::fs::set_permissions(
        dir.path().join("host_key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    assert_refuses_to_start(dir.path(), "not an OpenSSH private key");
}

#[test]
fn ca_file_without_keys_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pub"), "# no keys here\n\n").unwrap();
    assert_refuses_to_start(dir.path(), "no CA key found");
}

#[test]
fn missing_ca_file_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    assert_refuses_to_start(dir.path(), "ca.pub: No such file");
}

#[test]
fn malformed_config_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "[server\n").unwrap();
    let out = benchgate(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("broken.toml:1:"), "{}", stderr(&out));
}

#[test]
fn version_and_help() {
    let out = benchgate(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("benchgate "));
    let out = benchgate(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("serve") && help.contains("check-config"),
        "{help}"
    );
}
