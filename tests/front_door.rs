//! The certificate front door, end to end: the real OpenSSH client with `ssh-keygen -s`
//! certificates against the real daemon, each decision checked in the audit trail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use benchgate::config::Span;
use support::{keygen, Bastion, BENCH};

const SIX_HOURS: &str = "-5m:+6h";

async fn bastion() -> Bastion {
    Bastion::start(|_, _| {}).await
}

async fn assert_rejected_for(bastion: &Bastion, sign_args: &[&str], reason: &str) {
    let key = bastion.user_with_cert("user", "ca", sign_args);
    let reasons = bastion.rejection_reasons(BENCH, &key, &[]).await;
    assert!(
        reasons.iter().any(|r| r == reason),
        "expected {reason}, got {reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_cert_authenticates_and_is_audited() {
    let bastion = bastion().await;
    let key = bastion.user_with_cert("user", "ca", &["-n", BENCH, "-V", SIX_HOURS]);
    bastion.ssh(BENCH, &key, &[]).await.assert_authenticated();
    let events = bastion.audit_after_closed(1).await;
    let accepted: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "auth.accepted")
        .collect();
    assert_eq!(accepted.len(), 1, "{events:#?}");
    let event = accepted[0];
    assert_eq!(event["bench"], BENCH);
    assert_eq!(event["key_id"], "key-id-of-test");
    assert_eq!(event["serial"], 77);
    assert!(event["ca"].as_str().unwrap().starts_with("SHA256:"));
    assert!(event["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    // The bare key the client offers first is expected and not reported on success.
    assert!(
        !events.iter().any(|e| e["event"] == "auth.rejected"),
        "{events:#?}"
    );
    bastion.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_cert_is_rejected() {
    let bastion = bastion().await;
    assert_rejected_for(
        &bastion,
        &["-n", BENCH, "-V", "20200101:20200102"],
        "outside_validity",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn not_yet_valid_cert_is_rejected() {
    let bastion = bastion().await;
    assert_rejected_for(
        &bastion,
        &["-n", BENCH, "-V", "+1h:+7h"],
        "outside_validity",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_ca_is_rejected() {
    let bastion = bastion().await;
    keygen(bastion.dir.path(), "other_ca", "ed25519");
    assert_rejected_for_ca(&bastion, "other_ca", "untrusted_ca").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn self_signed_cert_is_rejected() {
    let bastion = bastion().await;
    let key = keygen(bastion.dir.path(), "user", "ed25519");
    bastion.sign(&key, "user", &["-n", BENCH, "-V", SIX_HOURS]);
    let reasons = bastion.rejection_reasons(BENCH, &key, &[]).await;
    assert!(reasons.contains(&"untrusted_ca".to_owned()), "{reasons:?}");
}

async fn assert_rejected_for_ca(bastion: &Bastion, ca: &str, reason: &str) {
    let key = bastion.user_with_cert("user", ca, &["-n", BENCH, "-V", SIX_HOURS]);
    let reasons = bastion.rejection_reasons(BENCH, &key, &[]).await;
    assert!(
        reasons.iter().any(|r| r == reason),
        "expected {reason}, got {reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_principals_are_rejected() {
    let bastion = bastion().await;
    assert_rejected_for(&bastion, &["-V", SIX_HOURS], "no_principals").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn principal_must_match_byte_for_byte() {
    let bastion = bastion().await;
    for principal in ["Shop", "shop ", "*", "sho?", "other"] {
        let key = bastion.user_with_cert(
            &format!("user{}", principal.len()),
            "ca",
            &["-n", principal, "-V", SIX_HOURS],
        );
        let reasons = bastion.rejection_reasons(BENCH, &key, &[]).await;
        assert!(
            reasons.contains(&"principal_mismatch".to_owned()),
            "{principal:?}: {reasons:?}"
        );
        std::fs::remove_file(&key).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_key_without_cert_is_rejected() {
    let bastion = bastion().await;
    let key = keygen(bastion.dir.path(), "user", "ed25519");
    let reasons = bastion.rejection_reasons(BENCH, &key, &[]).await;
    assert_eq!(reasons, ["not_certificate"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_critical_option_is_rejected() {
    let bastion = bastion().await;
    assert_rejected_for(
        &bastion,
        &["-n", BENCH, "-V", SIX_HOURS, "-O", "verify-required"],
        "unknown_critical_option",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn source_address_is_judged_on_the_client_address() {
    let bastion = bastion().await;
    let key = bastion.user_with_cert(
        "user",
        "ca",
        &[
            "-n",
            BENCH,
            "-V",
            SIX_HOURS,
            "-O",
            "source-address=127.0.0.2/32",
        ],
    );
    bastion
        .ssh(BENCH, &key, &["-b", "127.0.0.2"])
        .await
        .assert_authenticated();
    let reasons = bastion
        .rejection_reasons(BENCH, &key, &["-b", "127.0.0.1"])
        .await;
    assert!(
        reasons.contains(&"source_address_mismatch".to_owned()),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sha1_ca_signature_is_rejected() {
    let bastion = Bastion::start(|dir, config| {
        keygen(dir, "rsa_ca", "rsa");
        config
            .auth
            .trusted_user_ca_keys
            .0
            .push(dir.join("rsa_ca.pub"));
    })
    .await;
    let key = bastion.user_with_cert(
        "user",
        "rsa_ca",
        &["-n", BENCH, "-V", SIX_HOURS, "-t", "ssh-rsa"],
    );
    let reasons = bastion.rejection_reasons(BENCH, &key, &[]).await;
    assert!(
        reasons.contains(&"sha1_signature".to_owned()),
        "{reasons:?}"
    );
    // The same CA signing with rsa-sha2-512 is fine.
    let good = bastion.user_with_cert(
        "user2",
        "rsa_ca",
        &["-n", BENCH, "-V", SIX_HOURS, "-t", "rsa-sha2-512"],
    );
    bastion.ssh(BENCH, &good, &[]).await.assert_authenticated();
}

#[tokio::test(flavor = "multi_thread")]
async fn lifetime_over_the_limit_is_rejected() {
    let bastion = Bastion::start(|_, config| {
        config.auth.max_cert_lifetime = Span(std::time::Duration::from_secs(3600));
    })
    .await;
    assert_rejected_for(
        &bastion,
        &["-n", BENCH, "-V", SIX_HOURS],
        "lifetime_too_long",
    )
    .await;
    let key = bastion.user_with_cert("short", "ca", &["-n", BENCH, "-V", "-5m:+50m"]);
    bastion.ssh(BENCH, &key, &[]).await.assert_authenticated();
}

#[tokio::test(flavor = "multi_thread")]
async fn user_name_outside_the_pattern_is_rejected() {
    let bastion = bastion().await;
    let key = bastion.user_with_cert("user", "ca", &["-n", "../x", "-V", SIX_HOURS]);
    let reasons = bastion.rejection_reasons("../x", &key, &[]).await;
    assert!(reasons.contains(&"invalid_user".to_owned()), "{reasons:?}");
    let long = "a".repeat(129);
    let reasons = bastion.rejection_reasons(&long, &key, &[]).await;
    assert!(reasons.contains(&"invalid_user".to_owned()), "{reasons:?}");
}

/// OpenSSH never offers a host certificate for user authentication; a russh client does.
#[tokio::test(flavor = "multi_thread")]
async fn host_cert_offered_as_user_cert_is_rejected() {
    use russh::keys::{Certificate, PrivateKey, PublicKeyOrCertificate};

    struct PinnedHost(russh::keys::PublicKey);
    impl russh::client::Handler for PinnedHost {
        type Error = russh::Error;
        async fn check_server_key(
            &mut self,
            key: &PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(
                matches!(key, PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.0.key_data()),
            )
        }
    }

    let bastion = bastion().await;
    let key_path = bastion.user_with_cert("host", "ca", &["-h", "-n", BENCH, "-V", SIX_HOURS]);
    let key = PrivateKey::read_openssh_file(&key_path).unwrap();
    let cert = Certificate::read_file(&bastion.path("host-cert.pub")).unwrap();
    let host = PrivateKey::read_openssh_file(bastion.path("host_key")).unwrap();
    let config = Arc::new(russh::client::Config::default());
    let mut client =
        russh::client::connect(config, bastion.addr, PinnedHost(host.public_key().clone()))
            .await
            .unwrap();
    let result = client
        .authenticate_openssh_cert(BENCH, Arc::new(key), cert)
        .await
        .unwrap();
    assert!(!result.success());
    drop(client);
    let events = bastion.audit_after_closed(1).await;
    let reasons: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "auth.rejected")
        .map(|e| &e["reason"])
        .collect();
    assert_eq!(reasons, ["not_user_certificate"], "{events:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_cheap_key_exchange_methods_are_offered() {
    let bastion = bastion().await;
    let key = bastion.user_with_cert("user", "ca", &["-n", BENCH, "-V", SIX_HOURS]);
    // Finite-field groups above 14 and group exchange cost 100 ms to 1 s of CPU each (DHEat).
    for method in [
        "diffie-hellman-group18-sha512",
        "diffie-hellman-group16-sha512",
        "diffie-hellman-group-exchange-sha256",
        "diffie-hellman-group14-sha256",
        "diffie-hellman-group14-sha1",
        "diffie-hellman-group1-sha1",
    ] {
        let kex = format!("KexAlgorithms={method}");
        let result = bastion.ssh(BENCH, &key, &["-o", &kex]).await;
        assert!(
            result
                .stderr
                .contains("no matching key exchange method found"),
            "{method}: {result:?}"
        );
    }
    for method in [
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "ecdh-sha2-nistp256",
        "ecdh-sha2-nistp384",
        "ecdh-sha2-nistp521",
    ] {
        let kex = format!("KexAlgorithms={method}");
        let result = bastion.ssh(BENCH, &key, &["-o", &kex]).await;
        assert!(
            !result.stderr.contains("no matching key exchange method"),
            "{method}: {result:?}"
        );
        assert!(
            !result.stderr.contains("Permission denied"),
            "{method}: {result:?}"
        );
    }
}
