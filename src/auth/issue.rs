//! Signing user certificates the way the platform's dashboard does: one principal, a short
//! validity, only `permit-pty`, no critical options.

use std::time::Duration;

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey};

use super::cert::PERMIT_PTY;

/// How far before "now" a new certificate starts, for clients whose clocks run behind.
pub const BACKDATE_SECONDS: u64 = 60;

/// What to put in a certificate.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The single principal (a bench or a group).
    pub principal: &'a str,
    /// How long it is valid from now.
    pub validity: Duration,
    /// The key ID shown in logs and audit events.
    pub identity: &'a str,
    /// The serial (what a KRL revokes by).
    pub serial: u64,
    /// Unix seconds now.
    pub now: u64,
}

/// Why a certificate cannot be signed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CA key is protected by a passphrase.
    #[error("the CA key is encrypted; decrypt a copy for signing")]
    EncryptedCa,
    /// ssh-key refused a field or the signature.
    #[error("cannot sign: {0}")]
    Sign(#[from] russh::keys::ssh_key::Error),
}

/// Signs `subject` with `ca` as `request` says.
pub fn sign(
    ca: &PrivateKey,
    subject: &PublicKey,
    request: &Request<'_>,
) -> Result<Certificate, IssueError> {
    if ca.is_encrypted() {
        return Err(IssueError::EncryptedCa);
    }
    let valid_after = request.now.saturating_sub(BACKDATE_SECONDS);
    let valid_before = request.now.saturating_add(request.validity.as_secs());
    let mut nonce = [0u8; 32];
    rand::fill(&mut nonce);
    let mut builder = Builder::new(nonce, subject.key_data().clone(), valid_after, valid_before)?;
    builder.cert_type(CertType::User)?;
    builder.key_id(request.identity)?;
    builder.serial(request.serial)?;
    builder.valid_principal(request.principal)?;
    builder.extension(PERMIT_PTY, "")?;
    Ok(builder.sign(ca)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{verify, Attempt, Trust};

    #[test]
    fn issued_certificate_passes_verification_for_its_principal_only() {
        let mut rng = rand::rng();
        let ca = PrivateKey::random(&mut rng, russh::keys::ssh_key::Algorithm::Ed25519).unwrap();
        let user = PrivateKey::random(&mut rng, russh::keys::ssh_key::Algorithm::Ed25519).unwrap();
        let now = 1_800_000_000;
        let request = Request {
            principal: "shop",
            validity: Duration::from_secs(6 * 3600),
            identity: "alice@example",
            serial: 9,
            now,
        };
        let cert = sign(&ca, user.public_key(), &request).unwrap();
        assert_eq!(
            cert.valid_before() - cert.valid_after(),
            6 * 3600 + BACKDATE_SECONDS
        );
        assert!(cert.critical_options().is_empty());
        assert_eq!(cert.extensions().keys().collect::<Vec<_>>(), [PERMIT_PTY]);
        let trust = Trust::new([ca.public_key().key_data().clone()], None);
        let attempt = |bench| Attempt {
            bench,
            group: None,
            peer: [127, 0, 0, 1].into(),
            now,
        };
        let grant = verify(&cert, &attempt("shop"), &trust).unwrap();
        assert_eq!(
            (grant.key_id.as_str(), grant.serial, grant.permit_pty),
            ("alice@example", 9, true)
        );
        assert!(verify(&cert, &attempt("other"), &trust).is_err());
    }
}
