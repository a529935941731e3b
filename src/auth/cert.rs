//! The certificate verdict: a pure function of the certificate, the attempt and the trust set.

use std::net::IpAddr;

use ipnet::IpNet;
use russh::keys::ssh_key::{Algorithm, Certificate};

use super::revocation::Revocation;
use super::{is_bench_name, Attempt, Grant, Rejection, Trust};

/// Critical option that replaces the command the client asks for.
pub const FORCE_COMMAND: &str = "force-command";
/// Critical option that limits the client addresses a certificate is good from.
pub const SOURCE_ADDRESS: &str = "source-address";
/// Extension that allows a PTY.
pub const PERMIT_PTY: &str = "permit-pty";

/// Accepts `cert` for `attempt` or returns the first reason to refuse it.
///
/// Checks what OpenSSH's sshd checks for `TrustedUserCAKeys`, and more: the exact CA key, the
/// CA signature itself (independent of what the SSH library did), no SHA-1 signature, user
/// type, the half-open window `valid_after <= now < valid_before`, the lifetime limit, a
/// non-empty principal list with one principal byte-equal to the bench or its group, and only critical
/// options that are enforced.
pub fn verify(
    cert: &Certificate,
    attempt: &Attempt<'_>,
    trust: &Trust,
) -> Result<Grant, Rejection> {
    match rejections(cert, attempt, trust).into_iter().next() {
        Some(rejection) => Err(rejection),
        None => Ok(grant(cert, attempt)),
    }
}

/// Every reason to refuse `cert` for `attempt`, most fundamental first; empty = accepted.
pub fn rejections(cert: &Certificate, attempt: &Attempt<'_>, trust: &Trust) -> Vec<Rejection> {
    let mut reasons = Vec::new();
    if !is_bench_name(attempt.bench) {
        reasons.push(Rejection::InvalidUser);
    }
    if !cert.cert_type().is_user() {
        reasons.push(Rejection::NotUserCertificate);
    }
    if trust.ca(cert.signature_key()).is_none() {
        reasons.push(Rejection::UntrustedCa);
    }
    match &trust.revocation {
        Revocation::Off => {}
        Revocation::Loaded { list, .. } if list.check(cert).is_some() => {
            reasons.push(Rejection::Revoked)
        }
        Revocation::Loaded { .. } => {}
        Revocation::Unavailable { .. } => reasons.push(Rejection::RevocationUnavailable),
    }
    if cert.signature().algorithm() == (Algorithm::Rsa { hash: None }) {
        reasons.push(Rejection::Sha1Signature);
    }
    // ssh-key 0.7.0-rc.11 panics verifying a certificate whose key type has an empty name
    // before "-cert-v01" (found by fuzzing); no key type benchgate accepts is "other".
    if matches!(cert.algorithm(), Algorithm::Other(_)) || cert.verify_signature().is_err() {
        reasons.push(Rejection::BadSignature);
    }
    if attempt.now < cert.valid_after() {
        reasons.push(Rejection::NotYetValid);
    }
    if attempt.now >= cert.valid_before() {
        reasons.push(Rejection::Expired);
    }
    if let Some(max) = trust.max_lifetime_seconds {
        if cert.valid_before().saturating_sub(cert.valid_after()) > max {
            reasons.push(Rejection::LifetimeTooLong);
        }
    }
    let principals = cert.valid_principals();
    if principals.is_empty() {
        reasons.push(Rejection::NoPrincipals);
    } else if !principals.iter().any(|p| {
        p.as_bytes() == attempt.bench.as_bytes()
            || attempt.group.is_some_and(|g| p.as_bytes() == g.as_bytes())
    }) {
        reasons.push(Rejection::PrincipalMismatch);
    }
    for (name, value) in cert.critical_options().iter() {
        match name.as_str() {
            FORCE_COMMAND => {}
            SOURCE_ADDRESS => match source_allows(value, attempt.peer) {
                Some(true) => {}
                Some(false) => reasons.push(Rejection::SourceAddressMismatch),
                None => reasons.push(Rejection::BadSourceAddress),
            },
            other => reasons.push(Rejection::UnknownCriticalOption(other.to_owned())),
        }
    }
    reasons
}

/// Whether a certificate accepted earlier may keep its connection under `trust` as it is now:
/// its CA is still trusted and it is not revoked. An unreadable revocation list refuses new
/// logins but does not end live sessions.
pub fn still_valid(cert: &Certificate, trust: &Trust) -> Result<(), Rejection> {
    if trust.ca(cert.signature_key()).is_none() {
        return Err(Rejection::UntrustedCa);
    }
    match &trust.revocation {
        Revocation::Loaded { list, .. } if list.check(cert).is_some() => Err(Rejection::Revoked),
        _ => Ok(()),
    }
}

fn grant(cert: &Certificate, attempt: &Attempt<'_>) -> Grant {
    Grant {
        bench: attempt.bench.to_owned(),
        key_id: cert.key_id().to_owned(),
        serial: cert.serial(),
        ca: ca_fingerprint(cert),
        valid_before: cert.valid_before(),
        force_command: cert.critical_options().get(FORCE_COMMAND).cloned(),
        permit_pty: cert.extensions().contains_key(PERMIT_PTY),
        via_group: attempt
            .group
            .filter(|_| !cert.valid_principals().iter().any(|p| p == attempt.bench))
            .map(str::to_owned),
        certificate: std::sync::Arc::new(cert.clone()),
    }
}

/// SHA256 fingerprint of the key that signed `cert`, trusted or not.
pub fn ca_fingerprint(cert: &Certificate) -> String {
    cert.signature_key()
        .fingerprint(russh::keys::ssh_key::HashAlg::Sha256)
        .to_string()
}

/// Whether `peer` is inside an OpenSSH `source-address` list ("addr[/len],..."); `None` when
/// the list is malformed, which OpenSSH also treats as a refusal.
pub fn source_allows(list: &str, peer: IpAddr) -> Option<bool> {
    let peer = peer.to_canonical();
    let mut allowed = false;
    for entry in list.split(',') {
        let net = match entry.parse::<IpNet>() {
            Ok(net) if net.addr() == net.network() => net,
            Ok(_) => return None,
            Err(_) => IpNet::from(entry.parse::<IpAddr>().ok()?),
        };
        allowed |= net.contains(&peer);
    }
    Some(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::ssh_key::{HashAlg, PrivateKey};

    const NOW: u64 = 1_800_000_000;
    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    struct Keys {
        ca: PrivateKey,
        user: PrivateKey,
    }

    fn keys() -> Keys {
        let mut rng = rand::rng();
        Keys {
            ca: PrivateKey::random(&mut rng, Algorithm::Ed25519).expect("ca key"),
            user: PrivateKey::random(&mut rng, Algorithm::Ed25519).expect("user key"),
        }
    }

    /// A valid 6-hour certificate for bench "shop", with `edit` applied before signing.
    fn cert_with(
        keys: &Keys,
        signer: &impl russh::keys::ssh_key::SigningKey,
        edit: impl FnOnce(&mut Builder),
    ) -> Certificate {
        let mut builder = Builder::new(
            [7u8; 32],
            keys.user.public_key().key_data().clone(),
            NOW - 60,
            NOW + 6 * 3600,
        )
        .expect("builder");
        builder.cert_type(CertType::User).expect("type");
        builder.key_id("alice@example").expect("key id");
        builder.serial(42).expect("serial");
        builder.extension(PERMIT_PTY, "").expect("ext");
        edit(&mut builder);
        builder.sign(signer).expect("sign")
    }

    fn trust(keys: &Keys) -> Trust {
        Trust::new([keys.ca.public_key().key_data().clone()], None)
    }

    fn attempt(bench: &str) -> Attempt<'_> {
        Attempt {
            bench,
            group: None,
            peer: PEER,
            now: NOW,
        }
    }

    fn principal(b: &mut Builder, name: &str) {
        b.valid_principal(name).expect("principal");
    }

    fn check(edit: impl FnOnce(&mut Builder)) -> Result<Grant, Rejection> {
        let keys = keys();
        let cert = cert_with(&keys, &keys.ca, edit);
        verify(&cert, &attempt("shop"), &trust(&keys))
    }

    #[test]
    fn a_certificate_of_an_unnamed_key_type_is_refused_without_a_panic() {
        // Found by fuzzing: ssh-key panics verifying its signature.
        let bytes = include_bytes!("../../fuzz/seeds/cert/regression-empty-cert-type");
        let cert = Certificate::from_bytes(bytes).expect("it parses");
        let trust = Trust::new([cert.signature_key().clone()], None);
        let reasons = rejections(&cert, &attempt("shop"), &trust);
        assert!(reasons.contains(&Rejection::BadSignature), "{reasons:?}");
    }

    #[test]
    fn valid_cert_is_granted_with_its_attributes() {
        let grant = check(|b| principal(b, "shop")).expect("granted");
        assert_eq!(grant.bench, "shop");
        assert_eq!(grant.key_id, "alice@example");
        assert_eq!(grant.serial, 42);
        assert!(grant.permit_pty);
        assert_eq!(grant.force_command, None);
        assert!(grant.ca.starts_with("SHA256:"));
    }

    #[test]
    fn invalid_user_is_rejected() {
        let keys = keys();
        let cert = cert_with(&keys, &keys.ca, |b| principal(b, "../x"));
        assert_eq!(
            verify(&cert, &attempt("../x"), &trust(&keys)),
            Err(Rejection::InvalidUser)
        );
    }

    #[test]
    fn host_cert_is_rejected() {
        let keys = keys();
        let mut builder = Builder::new(
            [1u8; 16],
            keys.user.public_key().key_data().clone(),
            NOW - 1,
            NOW + 1,
        )
        .expect("builder");
        builder.cert_type(CertType::Host).expect("type");
        principal(&mut builder, "shop");
        let cert = builder.sign(&keys.ca).expect("sign");
        assert_eq!(
            verify(&cert, &attempt("shop"), &trust(&keys)),
            Err(Rejection::NotUserCertificate)
        );
    }

    #[test]
    fn untrusted_and_self_signed_certs_are_rejected() {
        let keys = keys();
        let other = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("key");
        let cert = cert_with(&keys, &other, |b| principal(b, "shop"));
        assert_eq!(
            verify(&cert, &attempt("shop"), &trust(&keys)),
            Err(Rejection::UntrustedCa)
        );
        let self_signed = cert_with(&keys, &keys.user, |b| principal(b, "shop"));
        assert_eq!(
            verify(&self_signed, &attempt("shop"), &trust(&keys)),
            Err(Rejection::UntrustedCa)
        );
    }

    /// Signs with RSA PKCS#1 v1.5 over SHA-1: the `ssh-rsa` algorithm.
    struct Sha1Signer<'a>(&'a russh::keys::ssh_key::private::RsaKeypair);

    impl signature::Signer<russh::keys::ssh_key::Signature> for Sha1Signer<'_> {
        fn try_sign(&self, message: &[u8]) -> signature::Result<russh::keys::ssh_key::Signature> {
            (self.0, None).try_sign(message)
        }
    }

    impl From<&Sha1Signer<'_>> for russh::keys::ssh_key::public::KeyData {
        fn from(signer: &Sha1Signer<'_>) -> Self {
            russh::keys::ssh_key::public::KeyData::Rsa(signer.0.into())
        }
    }

    #[test]
    fn sha1_rsa_signature_is_rejected() {
        let keys = keys();
        let rsa = PrivateKey::random(&mut rand::rng(), Algorithm::Rsa { hash: None }).expect("rsa");
        let rsa_trust = Trust::new([rsa.public_key().key_data().clone()], None);
        let keypair = rsa.key_data().rsa().expect("rsa keypair");
        let sha1 = cert_with(&keys, &Sha1Signer(keypair), |b| principal(b, "shop"));
        assert_eq!(sha1.signature().algorithm(), Algorithm::Rsa { hash: None });
        assert_eq!(
            verify(&sha1, &attempt("shop"), &rsa_trust),
            Err(Rejection::Sha1Signature)
        );
        let sha512 = cert_with(&keys, &rsa, |b| principal(b, "shop"));
        assert_eq!(
            sha512.signature().algorithm(),
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512)
            }
        );
        assert!(verify(&sha512, &attempt("shop"), &rsa_trust).is_ok());
    }

    #[test]
    fn tampered_certificate_is_rejected() {
        let keys = keys();
        let cert = cert_with(&keys, &keys.ca, |b| principal(b, "shop"));
        let mut bytes = cert.to_bytes().expect("encode");
        // The serial sits after the type string, the 32-byte nonce and the 32-byte key.
        let serial_at = 4 + "ssh-ed25519-cert-v01@openssh.com".len() + 4 + 32 + 4 + 32 + 7;
        bytes[serial_at] ^= 1;
        let tampered = Certificate::from_bytes(&bytes).expect("decode");
        assert_eq!(tampered.serial(), 43);
        assert_eq!(
            verify(&tampered, &attempt("shop"), &trust(&keys)),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn validity_window_edges_are_whole_seconds_half_open() {
        let keys = keys();
        let cert = cert_with(&keys, &keys.ca, |b| principal(b, "shop"));
        let t = trust(&keys);
        let at = |now| {
            verify(
                &cert,
                &Attempt {
                    now,
                    ..attempt("shop")
                },
                &t,
            )
        };
        assert_eq!(at(NOW - 61), Err(Rejection::NotYetValid));
        assert!(at(NOW - 60).is_ok());
        assert!(at(NOW + 6 * 3600 - 1).is_ok());
        assert_eq!(at(NOW + 6 * 3600), Err(Rejection::Expired));
    }

    #[test]
    fn lifetime_over_the_limit_is_rejected() {
        let keys = keys();
        let cert = cert_with(&keys, &keys.ca, |b| principal(b, "shop"));
        let limit = |secs| Trust::new([keys.ca.public_key().key_data().clone()], Some(secs));
        assert!(verify(&cert, &attempt("shop"), &limit(6 * 3600 + 60)).is_ok());
        assert_eq!(
            verify(&cert, &attempt("shop"), &limit(6 * 3600 + 59)),
            Err(Rejection::LifetimeTooLong)
        );
    }

    #[test]
    fn empty_principals_are_rejected() {
        assert_eq!(
            check(|b| {
                b.all_principals_valid().ok();
            }),
            Err(Rejection::NoPrincipals)
        );
    }

    #[test]
    fn principals_match_byte_for_byte() {
        for wrong in ["Shop", "shop ", "*", "sho?", "shop,other", "other"] {
            assert_eq!(
                check(|b| principal(b, wrong)),
                Err(Rejection::PrincipalMismatch),
                "{wrong:?}"
            );
        }
        assert!(check(|b| {
            principal(b, "other");
            principal(b, "shop");
        })
        .is_ok());
    }

    #[test]
    fn group_principal_grants_the_bench_exactly() {
        let keys = keys();
        let cert = cert_with(&keys, &keys.ca, |b| principal(b, "team-a"));
        let t = trust(&keys);
        let with_group = |group| Attempt {
            group,
            ..attempt("shop")
        };
        let grant = verify(&cert, &with_group(Some("team-a")), &t).expect("granted by group");
        assert_eq!(grant.via_group.as_deref(), Some("team-a"));
        let direct = cert_with(&keys, &keys.ca, |b| principal(b, "shop"));
        let grant = verify(&direct, &with_group(Some("team-a")), &t).expect("granted by name");
        assert_eq!(grant.via_group, None);
        assert_eq!(
            verify(&cert, &with_group(Some("team-ab")), &t),
            Err(Rejection::PrincipalMismatch)
        );
        assert_eq!(
            verify(&cert, &with_group(None), &t),
            Err(Rejection::PrincipalMismatch)
        );
        // A group label never turns an empty principal list into "anyone".
        let empty = cert_with(&keys, &keys.ca, |b| {
            b.all_principals_valid().ok();
        });
        assert_eq!(
            verify(&empty, &with_group(Some("")), &t),
            Err(Rejection::NoPrincipals)
        );
    }

    #[test]
    fn revoked_and_unreadable_revocation_lists_are_rejected() {
        use crate::auth::revocation::{Revocation, Revocations};
        let keys = keys();
        let cert = cert_with(&keys, &keys.ca, |b| principal(b, "shop"));
        let list = format!(
            "{}\n",
            keys.user.public_key().to_openssh().expect("openssh")
        );
        let revoked = Revocation::Loaded {
            path: "/r".into(),
            stamp: None,
            list: std::sync::Arc::new(Revocations::parse(list.as_bytes()).expect("key list")),
        };
        let t = trust(&keys).with_revocation(revoked);
        assert_eq!(verify(&cert, &attempt("shop"), &t), Err(Rejection::Revoked));
        assert_eq!(still_valid(&cert, &t), Err(Rejection::Revoked));
        let broken = Revocation::Unavailable {
            path: "/r".into(),
            stamp: None,
            reason: "truncated".into(),
        };
        let t = trust(&keys).with_revocation(broken);
        assert_eq!(
            verify(&cert, &attempt("shop"), &t),
            Err(Rejection::RevocationUnavailable)
        );
        // Live sessions are not ended by an unreadable list, only new logins refused.
        assert_eq!(still_valid(&cert, &t), Ok(()));
        assert_eq!(
            still_valid(&cert, &Trust::default()),
            Err(Rejection::UntrustedCa)
        );
    }

    #[test]
    fn unknown_critical_options_are_rejected() {
        for option in ["verify-required", "no-such-option"] {
            let result = check(|b| {
                principal(b, "shop");
                b.critical_option(option, "").expect("option");
            });
            assert_eq!(
                result,
                Err(Rejection::UnknownCriticalOption(option.to_owned()))
            );
        }
    }

    #[test]
    fn force_command_is_kept_in_the_grant() {
        let grant = check(|b| {
            principal(b, "shop");
            b.critical_option(FORCE_COMMAND, "bench restart")
                .expect("option");
        })
        .expect("granted");
        assert_eq!(grant.force_command.as_deref(), Some("bench restart"));
    }

    #[test]
    fn missing_permit_pty_is_recorded() {
        let keys = keys();
        let mut builder = Builder::new(
            [2u8; 16],
            keys.user.public_key().key_data().clone(),
            NOW - 1,
            NOW + 10,
        )
        .expect("builder");
        builder.cert_type(CertType::User).expect("type");
        principal(&mut builder, "shop");
        let cert = builder.sign(&keys.ca).expect("sign");
        let grant = verify(&cert, &attempt("shop"), &trust(&keys)).expect("granted");
        assert!(!grant.permit_pty);
    }

    #[test]
    fn source_address_is_enforced() {
        let with_source = |list: &'static str| {
            check(move |b| {
                principal(b, "shop");
                b.critical_option(SOURCE_ADDRESS, list).expect("option");
            })
        };
        assert!(with_source("192.0.2.0/24").is_ok());
        assert!(with_source("10.0.0.1,192.0.2.7").is_ok());
        assert_eq!(
            with_source("10.0.0.0/8"),
            Err(Rejection::SourceAddressMismatch)
        );
        assert_eq!(
            with_source("192.0.2.1/24"),
            Err(Rejection::BadSourceAddress)
        );
        assert_eq!(with_source("nonsense"), Err(Rejection::BadSourceAddress));
        assert_eq!(with_source("192.0.2.*"), Err(Rejection::BadSourceAddress));
    }

    #[test]
    fn source_address_matches_mapped_ipv6_peers() {
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(source_allows("192.0.2.7/32", mapped), Some(true));
        assert_eq!(
            source_allows("2001:db8::/32", "2001:db8::1".parse().expect("ip")),
            Some(true)
        );
    }

    #[test]
    fn explain_lists_every_reason() {
        let keys = keys();
        let other = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("key");
        let cert = cert_with(&keys, &other, |b| principal(b, "elsewhere"));
        let reasons = rejections(
            &cert,
            &Attempt {
                now: NOW + 7 * 3600,
                ..attempt("shop")
            },
            &trust(&keys),
        );
        assert_eq!(
            reasons,
            [
                Rejection::UntrustedCa,
                Rejection::Expired,
                Rejection::PrincipalMismatch
            ]
        );
    }
}
