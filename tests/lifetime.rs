//! Session lifetime: expiry warnings and disconnect, revocation lists (KRLs from
//! `ssh-keygen -k`), SIGHUP reload, idle timeout and SIGTERM, with the real client, the real
//! daemon and real containers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::Duration;

use benchgate::config::{Optional, Span};
use support::{keygen, run, Bastion, Container, Run};

/// Runs `sleep 1000` in `bench` (ssh options `extra`) as a session that the test expects the server to end, while
/// `during` runs once the process is up. Returns what the client saw.
async fn ended_session(
    bastion: &Bastion,
    bench: &Container,
    key: &Path,
    extra: &[&str],
    during: impl std::future::Future<Output = ()>,
) -> Run {
    let session = bastion.exec(&bench.bench, key, extra, "sleep 1000", b"");
    let action = async {
        for _ in 0..100 {
            if bench.processes().iter().any(|p| p.contains("sleep 1000")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        during.await;
    };
    let (run, ()) = tokio::join!(session, action);
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn expiring_certificate_is_warned_then_disconnected() {
    let container = Container::start(&[]);
    let bastion = Bastion::start(|_, config| {
        config.auth.expiry_warnings = vec![Span(Duration::from_secs(8))];
    })
    .await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &container.bench, "-V", "-1m:+15s"]);
    bastion.wait_for_bench(&container.bench).await;
    // An interactive (terminal) session, as a person would have open.
    let run = ended_session(&bastion, &container, &key, &["-tt"], async {}).await;
    assert!(
        run.stderr
            .contains("benchgate: your certificate expires in 8 seconds\r\n"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("your certificate has expired"),
        "{run:?}"
    );
    assert_ne!(run.code, Some(0));
    container.wait_gone("sleep 1000").await;
    let events = bastion.audit_after_closed(1).await;
    let closed = events
        .iter()
        .find(|e| e["event"] == "connection.closed")
        .unwrap();
    assert_eq!(closed["reason"], "expired");
}

/// Config edit: an empty revocation list at `revoked.krl` in the test's directory.
fn empty_revocation_list(dir: &Path, config: &mut benchgate::config::Config) {
    std::fs::write(dir.join("revoked.krl"), "").unwrap();
    config.auth.revoked_keys = Optional(Some(dir.join("revoked.krl")));
}

/// A KRL at `path` built with `ssh-keygen -k` from `spec` lines, scoped to `ca_pub`.
fn write_krl(path: &Path, ca_pub: &Path, spec: &str) {
    let spec_file = path.with_extension("spec");
    std::fs::write(&spec_file, spec).unwrap();
    let staging = path.with_extension("new");
    let _ = std::fs::remove_file(&staging);
    run(
        "ssh-keygen",
        &[
            "-q",
            "-k",
            "-f",
            staging.to_str().unwrap(),
            "-s",
            ca_pub.to_str().unwrap(),
            spec_file.to_str().unwrap(),
        ],
    );
    // Replace atomically, as an operator's deploy would.
    std::fs::rename(&staging, path).unwrap();
}

fn public_key(key: &Path) -> String {
    std::fs::read_to_string(format!("{}.pub", key.display()))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn krl_revokes_by_serial_key_id_key_fingerprint_and_ca_key() {
    let container = Container::start(&[]);
    let bastion = Bastion::start(|dir, config| {
        keygen(dir, "ca2", "ed25519");
        config.auth.trusted_user_ca_keys.0.push(dir.join("ca2.pub"));
        empty_revocation_list(dir, config);
    })
    .await;
    let bench = container.bench.as_str();
    let valid = ["-n", bench, "-V", "-5m:+1h"];
    let sign = |name: &str, ca: &str, extra: &[&str]| {
        let mut args = valid.to_vec();
        args.extend_from_slice(extra);
        bastion.user_with_cert(name, ca, &args)
    };
    let by_serial = sign("by_serial", "ca", &["-z", "1505"]);
    // ssh-keygen writes serials 1-3 as a bitmap and 100-1100 as a range.
    let by_bitmap = sign("by_bitmap", "ca", &["-z", "2"]);
    let by_range = sign("by_range", "ca", &["-z", "500"]);
    let by_id = sign("by_id", "ca", &["-I", "leaked-laptop"]);
    let by_key = sign("by_key", "ca", &[]);
    let by_ca = sign("by_ca", "ca2", &[]);
    let by_sha1 = sign("by_sha1", "ca", &[]);
    let by_sha256 = sign("by_sha256", "ca", &[]);
    let serial_zero = sign("serial_zero", "ca", &["-z", "0"]);
    let good = sign("good", "ca", &["-z", "2006"]);
    let spec = format!(
        "serial: 1-3\nserial: 100-1100\nserial: 1505\nid: leaked-laptop\nkey: {}\nkey: {}\nsha1: {}\nsha256: {}\n",
        public_key(&by_key),
        public_key(&bastion.path("ca2")),
        public_key(&by_sha1),
        public_key(&by_sha256)
    );
    write_krl(&bastion.path("revoked.krl"), &bastion.path("ca.pub"), &spec);
    bastion.wait_for_bench(bench).await;
    // The file is re-read within a second or so of the change.
    for key in [
        &by_serial, &by_bitmap, &by_range, &by_id, &by_key, &by_ca, &by_sha1, &by_sha256,
    ] {
        bastion.eventually_refused_for(bench, key, "revoked").await;
    }
    for key in [&good, &serial_zero] {
        let run = bastion.exec(bench, key, &[], "echo fine", b"").await;
        assert_eq!(run.stdout_text(), "fine\n", "{key:?}: {run:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_live_session_ends_it_and_others_keep_working() {
    let container = Container::start(&[]);
    let bastion = Bastion::start(empty_revocation_list).await;
    let bench = container.bench.as_str();
    let doomed =
        bastion.user_with_cert("doomed", "ca", &["-n", bench, "-V", "-5m:+1h", "-z", "42"]);
    let good = bastion.user_with_cert("good", "ca", &["-n", bench, "-V", "-5m:+1h", "-z", "43"]);
    bastion.wait_for_bench(bench).await;
    let started = std::time::Instant::now();
    let (krl, ca) = (bastion.path("revoked.krl"), bastion.path("ca.pub"));
    let run = ended_session(&bastion, &container, &doomed, &[], async {
        write_krl(&krl, &ca, "serial: 42\n");
    })
    .await;
    assert!(
        run.stderr.contains("your certificate has been revoked"),
        "{run:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    container.wait_gone("sleep 1000").await;
    let run = bastion
        .exec(bench, &good, &[], "echo still-fine", b"")
        .await;
    assert_eq!(run.stdout_text(), "still-fine\n", "{run:?}");
    let events = bastion.audit_after_closed(2).await;
    assert!(events
        .iter()
        .any(|e| e["event"] == "connection.closed" && e["reason"] == "revoked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_revocation_list_refuses_every_login_until_fixed() {
    let container = Container::start(&[]);
    let bastion = Bastion::start(empty_revocation_list).await;
    let bench = container.bench.as_str();
    let key = bastion.user_with_cert("user", "ca", &["-n", bench, "-V", "-5m:+1h", "-z", "7"]);
    bastion.wait_for_bench(bench).await;
    let (krl, ca) = (bastion.path("revoked.krl"), bastion.path("ca.pub"));
    write_krl(&krl, &ca, "serial: 1000-2000\n");
    let good_bytes = std::fs::read(&krl).unwrap();
    let truncated = bastion.path("truncated.krl");
    std::fs::write(&truncated, &good_bytes[..good_bytes.len() - 5]).unwrap();
    std::fs::rename(&truncated, &krl).unwrap();
    bastion
        .eventually_refused_for(bench, &key, "revocation_unavailable")
        .await;
    std::fs::write(bastion.path("fixed.krl"), &good_bytes).unwrap();
    std::fs::rename(bastion.path("fixed.krl"), &krl).unwrap();
    for _ in 0..50 {
        let run = bastion.exec(bench, &key, &[], "echo restored", b"").await;
        if run.stdout_text() == "restored\n" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("logins never came back after the list was fixed");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_end_with_a_message() {
    let container = Container::start(&[]);
    let bastion = Bastion::start(|_, config| {
        config.server.idle_timeout = Span(Duration::from_secs(2));
    })
    .await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &container.bench, "-V", "-5m:+1h"]);
    bastion.wait_for_bench(&container.bench).await;
    // Output keeps a session alive...
    let run = bastion
        .exec(
            &container.bench,
            &key,
            &[],
            "for i in 1 2 3 4; do echo $i; sleep 1; done",
            b"",
        )
        .await;
    assert_eq!(run.stdout_text(), "1\n2\n3\n4\n", "{run:?}");
    // ...silence does not.
    let run = ended_session(&bastion, &container, &key, &[], async {}).await;
    assert!(run.stderr.contains("no activity for too long"), "{run:?}");
    container.wait_gone("sleep 1000").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one() {
    let container = Container::start(&[]);
    let bastion = Bastion::spawn(|dir, config| {
        keygen(dir, "ca2", "ed25519");
        config.auth.trusted_user_ca_keys.0.push(dir.join("ca2.pub"));
    })
    .await;
    let bench = container.bench.as_str();
    let from_ca2 = bastion.user_with_cert("from_ca2", "ca2", &["-n", bench, "-V", "-5m:+1h"]);
    let from_ca = bastion.user_with_cert("from_ca", "ca", &["-n", bench, "-V", "-5m:+1h"]);
    let config_path = bastion.path("benchgate.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();

    // A broken file changes nothing.
    std::fs::write(&config_path, "[server\nthis is not toml").unwrap();
    bastion.signal("-HUP");
    for _ in 0..50 {
        if bastion.log().contains("reload failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bastion.log().contains("reload failed"), "{}", bastion.log());
    let run = bastion
        .exec(bench, &from_ca2, &[], "echo still-trusted", b"")
        .await;
    assert_eq!(run.stdout_text(), "still-trusted\n", "{run:?}");

    // Dropping ca2 ends its live session and refuses it afterwards; ca keeps working.
    let without_ca2 = original.replace(&format!(", \"{}\"", bastion.path("ca2.pub").display()), "");
    assert_ne!(
        without_ca2, original,
        "the test could not remove ca2 from the config"
    );
    let run = ended_session(&bastion, &container, &from_ca2, &[], async {
        std::fs::write(&config_path, &without_ca2).unwrap();
        bastion.signal("-HUP");
    })
    .await;
    assert!(run.stderr.contains("CA is no longer trusted"), "{run:?}");
    let reasons = bastion.rejection_reasons(bench, &from_ca2, &[]).await;
    assert!(reasons.contains(&"untrusted_ca".to_owned()), "{reasons:?}");
    let run = bastion.exec(bench, &from_ca, &[], "echo ok", b"").await;
    assert_eq!(run.stdout_text(), "ok\n", "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_tells_sessions_and_exits_cleanly() {
    let container = Container::start(&[]);
    let mut bastion = Bastion::spawn(|_, config| {
        config.server.shutdown_grace = Span(Duration::from_secs(2));
    })
    .await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &container.bench, "-V", "-5m:+1h"]);
    let run = ended_session(&bastion, &container, &key, &[], async {
        bastion.signal("-TERM");
    })
    .await;
    assert!(
        run.stderr.contains("the bastion is shutting down"),
        "{run:?}"
    );
    assert_ne!(run.code, Some(0));
    let mut process = bastion.process.take().unwrap();
    let status = tokio::task::spawn_blocking(move || process.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", bastion.log());
    container.wait_gone("sleep 1000").await;
}
