//! Time for `benchgate::auth::verify` to judge one user certificate (ed25519 and RSA-3072 CAs,
//! 1 or 10 trusted CAs, a refusal), and to parse one from OpenSSH text.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::net::Ipv4Addr;

use benchgate::auth::{verify, Attempt, Rejection, Trust};
use criterion::{criterion_group, criterion_main, Criterion};
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::RsaKeypair;
use russh::keys::ssh_key::{Algorithm, Certificate, HashAlg, PrivateKey};

const NOW: u64 = 1_800_000_000;

fn ed25519_key() -> PrivateKey {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("ed25519 key")
}

/// A 6-hour user certificate for the bench "shop", signed by `ca`.
fn cert(ca: &PrivateKey) -> Certificate {
    let user = ed25519_key().public_key().key_data().clone();
    let mut builder = Builder::new([7u8; 32], user, NOW - 60, NOW + 6 * 3600).expect("builder");
    builder.cert_type(CertType::User).expect("type");
    builder.key_id("alice@example").expect("key id");
    builder.serial(42).expect("serial");
    builder.valid_principal("shop").expect("principal");
    builder.extension("permit-pty", "").expect("ext");
    builder.sign(ca).expect("sign")
}

fn benches(c: &mut Criterion) {
    let ca = ed25519_key();
    // rsa-sha2-512 is what an RSA `PrivateKey` signs with; generate the 3072-bit key once.
    let rsa_ca = PrivateKey::from(RsaKeypair::random(&mut rand::rng(), 3072).expect("rsa key"));
    let (ed_cert, rsa_cert) = (cert(&ca), cert(&rsa_ca));
    let rsa_sha512 = Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    };
    assert_eq!(rsa_cert.signature().algorithm(), rsa_sha512);
    let trust_of = |key: &PrivateKey| Trust::new([key.public_key().key_data().clone()], None);
    let ten_cas = (0..9)
        .map(|_| ed25519_key())
        .chain([ca.clone()])
        .map(|key| key.public_key().key_data().clone());
    let (trust_1, trust_10, trust_rsa) =
        (trust_of(&ca), Trust::new(ten_cas, None), trust_of(&rsa_ca));
    let shop = Attempt {
        bench: "shop",
        group: None,
        peer: Ipv4Addr::new(192, 0, 2, 7).into(),
        now: NOW,
    };
    let other = Attempt {
        bench: "other",
        ..shop
    };

    let mut group = c.benchmark_group("verify");
    for (name, cert, attempt, trust, refusal) in [
        ("ed25519_1_ca", &ed_cert, &shop, &trust_1, None),
        ("ed25519_10_cas_last", &ed_cert, &shop, &trust_10, None),
        (
            "ed25519_principal_mismatch",
            &ed_cert,
            &other,
            &trust_1,
            Some(Rejection::PrincipalMismatch),
        ),
        ("rsa3072_sha512_1_ca", &rsa_cert, &shop, &trust_rsa, None),
    ] {
        assert_eq!(verify(cert, attempt, trust).err(), refusal, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| verify(black_box(cert), black_box(attempt), black_box(trust)))
        });
    }
    group.finish();

    let text = ed_cert.to_openssh().expect("encode");
    c.bench_function("parse/ed25519_from_openssh", |b| {
        b.iter(|| Certificate::from_openssh(black_box(&text)).expect("parse"))
    });
}

criterion_group!(cert_verify, benches);
criterion_main!(cert_verify);
