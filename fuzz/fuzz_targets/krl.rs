//! The revocation list parser (OpenSSH KRL or a list of public keys), and checking a real
//! certificate against whatever it parsed.
#![no_main]

use std::sync::LazyLock;

use benchgate::auth::revocation::Revocations;
use libfuzzer_sys::fuzz_target;
use russh::keys::ssh_key::Certificate;

static CERT: LazyLock<Certificate> = LazyLock::new(|| {
    Certificate::from_openssh(include_str!("../seeds/cert/user-cert.pub")).expect("seed cert")
});

fuzz_target!(|data: &[u8]| {
    if let Ok(list) = Revocations::parse(data) {
        let _ = list.check(&CERT);
        let _ = list.len();
    }
});
