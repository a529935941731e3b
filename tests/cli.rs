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
fn an_rsa_host_key_is_warned_about_loudly_and_the_log_file_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "ca", "ed25519");
    keygen(dir.path(), "host_key", "rsa");
    let config = config_in(dir.path());
    let out = benchgate(&["check-config", "--config", &config]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        report.contains("# WARNING: host key") && report.contains("RUSTSEC-2023-0071"),
        "{report}"
    );
    // The daemon says so at every start, in a log that is a file: plain text, no escapes.
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_benchgate"))
        .args(["serve", "--config", &config])
        .stderr(log)
        .spawn()
        .unwrap();
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
        if text.contains("benchgate ready") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(text.contains("ERROR") && text.contains("is RSA"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in the log file: {text:?}"
    );
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

#[tokio::test(flavor = "multi_thread")]
async fn issued_certificate_authenticates_and_prints_paste_commands() {
    let bastion = support::Bastion::start(|_, _| {}).await;
    let key = keygen(bastion.dir.path(), "alice", "ed25519");
    let ca = bastion.path("ca");
    let public = format!("{}.pub", key.display());
    let out = benchgate(&[
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--principal",
        support::BENCH,
        "--identity",
        "alice@example",
        "--serial",
        "4242",
        &public,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.contains("cat > ~/.ssh/alice-cert.pub <<'EOF'"),
        "{printed}"
    );
    assert!(
        printed.contains("[System.IO.File]::WriteAllText("),
        "{printed}"
    );
    assert!(!printed.contains('\u{feff}'), "no BOM");
    let listed = support::run(
        "ssh-keygen",
        &["-L", "-f", bastion.path("alice-cert.pub").to_str().unwrap()],
    );
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains("Serial: 4242")
            && listed.contains("permit-pty")
            && !listed.contains("permit-port-forwarding"),
        "{listed}"
    );
    bastion
        .ssh(support::BENCH, &key, &[])
        .await
        .assert_authenticated();
    let events = bastion.audit_after_closed(1).await;
    let accepted = events
        .iter()
        .find(|e| e["event"] == "auth.accepted")
        .unwrap();
    assert_eq!(
        (accepted["key_id"].as_str(), accepted["serial"].as_u64()),
        (Some("alice@example"), Some(4242))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn issue_prints_ssh_config_that_signs_once_with_an_agent_and_works_with_a_file() {
    let (bastion, bench, _) = support::bench_and_bastion(&[], &["-V", "-5m:+6h"], |_, _| {}).await;
    let dir = bastion.dir.path();
    let key = keygen(dir, "carol", "ed25519");
    let out = benchgate(&[
        "issue",
        "--ca",
        bastion.path("ca").to_str().unwrap(),
        "--principal",
        &bench.bench,
        "--host",
        "127.0.0.1",
        "--port",
        &bastion.addr.port().to_string(),
        &format!("{}.pub", key.display()),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    // The two blocks, with ~/.ssh/ pointed at the test's directory.
    let blocks: Vec<String> = printed
        .split("\n# ~/.ssh/config, ")
        .skip(1)
        .map(|b| {
            let block: String = b
                .lines()
                .skip_while(|l| !l.starts_with("Host "))
                .take_while(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            block.replace("~/.ssh/", &format!("{}/", dir.display()))
        })
        .collect();
    assert_eq!(blocks.len(), 2, "{printed}");
    assert!(
        blocks[0].contains("PubkeyAcceptedAlgorithms ssh-ed25519-cert-v01@openssh.com"),
        "{}",
        blocks[0]
    );
    let connect = |block: &str, agent: Option<&Path>| {
        let config = dir.join("ssh_config");
        std::fs::write(&config, format!("{block}\n")).unwrap();
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg(&config).args([
            "-v",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ]);
        cmd.arg("-o").arg(format!(
            "UserKnownHostsFile={}",
            bastion.path("known_hosts").display()
        ));
        match agent {
            Some(socket) => cmd.env("SSH_AUTH_SOCK", socket),
            None => cmd
                .env_remove("SSH_AUTH_SOCK")
                .args(["-o", "IdentityAgent=none"]),
        };
        cmd.args(["127.0.0.1", "echo in"]).output().unwrap()
    };
    // In an agent: the certificate alone is offered, so the login signs once.
    let socket = dir.join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&added.stderr).contains("Certificate added"),
        "{added:?}"
    );
    let out = connect(&blocks[0], Some(&socket));
    let _ = agent.kill();
    let _ = agent.wait();
    let said = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    let offers: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("Offering public key"))
        .collect();
    assert_eq!(offers.len(), 1, "{offers:?}");
    assert!(offers[0].contains("CERT"), "{offers:?}");
    let events = bastion.audit_after_closed(1).await;
    assert!(
        !events.iter().any(|e| e["reason"] == "not_certificate"),
        "{events:#?}"
    );
    // A key in a file, no agent: the other block logs in.
    let out = connect(&blocks[1], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The agent block without an agent does not: that is why there are two.
    let out = connect(&blocks[0], None);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn explain_names_every_reason() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path(), "ca", "ed25519");
    keygen(dir.path(), "other_ca", "ed25519");
    let config = dir.path().join("benchgate.toml");
    let text = format!(
        "[auth]\ntrusted_user_ca_keys = [\"{}\"]\n",
        dir.path().join("ca.pub").display()
    );
    std::fs::write(&config, text).unwrap();
    let cert = |name: &str, ca: &str, args: &[&str]| {
        let key = keygen(dir.path(), name, "ed25519");
        let (ca, public) = (dir.path().join(ca), format!("{}.pub", key.display()));
        let mut all = vec!["-q", "-s", ca.to_str().unwrap(), "-I", name];
        all.extend_from_slice(args);
        all.push(&public);
        support::run("ssh-keygen", &all);
        dir.path()
            .join(format!("{name}-cert.pub"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let explain = |bench: &str, cert: &str| {
        let out = benchgate(&[
            "explain",
            "--config",
            config.to_str().unwrap(),
            "--bench",
            bench,
            cert,
        ]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let good = cert("good", "ca", &["-n", "shop", "-V", "-5m:+1h"]);
    let (code, said) = explain("shop", &good);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("ACCEPTED"), "{said}");
    let (code, said) = explain("other", &good);
    assert_eq!(code, Some(1));
    assert!(
        said.contains("no principal of the certificate names the bench"),
        "{said}"
    );
    let expired = cert(
        "expired",
        "other_ca",
        &["-n", "elsewhere", "-V", "20200101:20200102"],
    );
    let (code, said) = explain("shop", &expired);
    assert_eq!(code, Some(1));
    for reason in [
        "the certificate has expired",
        "not signed by a trusted CA",
        "no principal",
    ] {
        assert!(said.contains(reason), "{reason}: {said}");
    }
    let future = cert("future", "ca", &["-n", "shop", "-V", "+1h:+2h"]);
    let (_, said) = explain("shop", &future);
    assert!(said.contains("the certificate is not valid yet"), "{said}");
}

#[test]
fn systemd_unit_verifies_and_is_well_sandboxed() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/benchgate@.service"
    ))
    .unwrap();
    // verify wants the binaries to exist: point it at the one just built.
    let unit = unit.replace("/usr/local/bin/benchgate", env!("CARGO_BIN_EXE_benchgate"));
    // An instance of the template, as `systemctl start benchgate@a` makes it.
    let path = dir.path().join("benchgate@a.service");
    std::fs::write(&path, unit).unwrap();
    let socket = dir.path().join("benchgate.socket");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/benchgate.socket"),
        &socket,
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap(), socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", stderr(&verify));
    let security = Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=yes",
            "--no-pager",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for benchgate@a.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure in: {report}"));
    assert!(exposure <= 2.0, "exposure {exposure}: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_serves_a_demo_bench() {
    use tokio::io::AsyncBufReadExt;
    struct Demo(tokio::process::Child);
    impl Drop for Demo {
        fn drop(&mut self) {
            let _ = self.0.start_kill();
            let _ = Command::new("docker")
                .args(["rm", "-f", benchgate::quickstart::CONTAINER])
                .output();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut demo = Demo(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_benchgate"))
            .args([
                "quickstart",
                "--dir",
                dir.path().join("demo").to_str().unwrap(),
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    );
    let mut lines = tokio::io::BufReader::new(demo.0.stdout.take().unwrap()).lines();
    let mut command = None;
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(std::time::Duration::from_secs(120), lines.next_line()).await
    {
        if let Some(ssh) = line
            .trim()
            .strip_prefix("ssh -i ")
            .filter(|l| !l.contains('\''))
        {
            command = Some(ssh.to_owned());
            break;
        }
    }
    let command = command.expect("quickstart printed no ssh command");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The printed command, as a person would paste it, plus what a test needs.
    let mut ssh = tokio::process::Command::new("ssh");
    ssh.args([
        "-F",
        "none",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentityAgent=none",
        "-i",
    ])
    .args(command.split_whitespace())
    .arg("echo hello from $BENCHGATE_BENCH as $(id -un)");
    let run = support::run_client(ssh, b"").await;
    assert_eq!(run.stdout_text(), "hello from demo as frappe\n", "{run:?}");
}
