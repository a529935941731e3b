//! Certificate parsing (the wire form russh hands over, and the OpenSSH text form) and the
//! whole verdict: `verify`, `rejections`, `still_valid`, and the source-address check.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, LazyLock};

use benchgate::auth::cert::{rejections, source_allows, still_valid, verify, SOURCE_ADDRESS};
use benchgate::auth::revocation::{Revocation, Revocations};
use benchgate::auth::{Attempt, Trust};
use libfuzzer_sys::fuzz_target;
use russh::keys::ssh_key::{Certificate, PublicKey};

/// The CA that signed the seed certificates, and a KRL that revokes one of them, so that
/// mutations of real certificates reach the signature and revocation checks.
static TRUST: LazyLock<Trust> = LazyLock::new(|| {
    let ca = PublicKey::from_openssh(include_str!("../seeds/ca.pub")).expect("seed CA");
    let list = Revocations::parse(include_bytes!("../seeds/krl/revoked.krl")).expect("seed KRL");
    Trust::new([ca.key_data().clone()], Some(6 * 3600)).with_revocation(Revocation::Loaded {
        path: "revoked.krl".into(),
        stamp: None,
        list: Arc::new(list),
    })
});

fuzz_target!(|data: &[u8]| {
    let cert = match std::str::from_utf8(data) {
        Ok(text) if text.contains("-cert-v01@openssh.com ") => Certificate::from_openssh(text),
        _ => Certificate::from_bytes(data),
    };
    let Ok(cert) = cert else {
        return;
    };
    let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    let first = cert.valid_principals().first().cloned().unwrap_or_default();
    for bench in [first.as_str(), "not-a-principal"] {
        for now in [cert.valid_after(), cert.valid_before().saturating_sub(1)] {
            let attempt = Attempt {
                bench,
                group: Some("team"),
                peer,
                now,
            };
            let verdict = verify(&cert, &attempt, &TRUST);
            assert_eq!(
                verdict.is_ok(),
                rejections(&cert, &attempt, &TRUST).is_empty()
            );
            let Ok(grant) = verdict else {
                continue;
            };
            // What an accepted certificate must be, checked again independently.
            assert!(cert.cert_type().is_user());
            assert!(TRUST.ca(cert.signature_key()).is_some());
            assert!(cert.verify_signature().is_ok());
            assert!(cert.valid_after() <= now && now < cert.valid_before());
            assert!(cert
                .valid_principals()
                .iter()
                .any(|p| p == bench || p == "team"));
            assert_eq!(grant.bench, bench);
            assert_eq!(
                grant.via_group.is_some(),
                !cert.valid_principals().iter().any(|p| p == bench)
            );
            assert!(still_valid(&cert, &TRUST).is_ok());
        }
    }
    if let Some(list) = cert.critical_options().get(SOURCE_ADDRESS) {
        let _ = source_allows(list, peer);
    }
});
