//! Who gets in: trusted CAs, the verdict on a certificate, and the reasons for a refusal.

pub mod cert;
pub mod issue;
pub mod revocation;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{HashAlg, PublicKey};

pub use cert::verify;

/// Longest bench name accepted as an SSH user name.
pub const MAX_BENCH_NAME_BYTES: usize = 128;

/// Whether `name` is a bench name: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
pub fn is_bench_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.len() <= MAX_BENCH_NAME_BYTES
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One reason to refuse a login. Variants mirror the checks OpenSSH's sshd makes for
/// `TrustedUserCAKeys`, plus benchgate's stricter ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The SSH user name is not a valid bench name.
    InvalidUser,
    /// A plain public key was offered; only certificates are accepted.
    NotCertificate,
    /// The certificate is signed by a key that is not a configured CA.
    UntrustedCa,
    /// The CA signature does not verify.
    BadSignature,
    /// The CA signed with SHA-1 `ssh-rsa`.
    Sha1Signature,
    /// A host certificate was offered as a user certificate.
    NotUserCertificate,
    /// `now < valid_after`.
    NotYetValid,
    /// `now >= valid_before`.
    Expired,
    /// Rejected by the SSH library before benchgate saw it: outside its validity window.
    /// The library does not say which edge.
    OutsideValidity,
    /// `valid_before - valid_after` exceeds `auth.max_cert_lifetime`.
    LifetimeTooLong,
    /// The certificate names no principal (OpenSSH would read that as "anyone").
    NoPrincipals,
    /// No principal equals the bench name.
    PrincipalMismatch,
    /// A critical option benchgate does not enforce.
    UnknownCriticalOption(String),
    /// The certificate, its key or its CA's key is in the revocation list.
    Revoked,
    /// The revocation list cannot be read: every login is refused until it is fixed.
    RevocationUnavailable,
    /// The `source-address` option does not parse.
    BadSourceAddress,
    /// The client address is outside the `source-address` option.
    SourceAddressMismatch,
    /// The certificate's key holds `server.max_connections_per_key` connections already.
    TooManyConnections,
}

impl Rejection {
    /// The bounded metric and audit label of this reason.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidUser => "invalid_user",
            Self::NotCertificate => "not_certificate",
            Self::UntrustedCa => "untrusted_ca",
            Self::BadSignature => "bad_signature",
            Self::Sha1Signature => "sha1_signature",
            Self::NotUserCertificate => "not_user_certificate",
            Self::NotYetValid => "not_yet_valid",
            Self::Expired => "expired",
            Self::OutsideValidity => "outside_validity",
            Self::LifetimeTooLong => "lifetime_too_long",
            Self::NoPrincipals => "no_principals",
            Self::PrincipalMismatch => "principal_mismatch",
            Self::UnknownCriticalOption(_) => "unknown_critical_option",
            Self::Revoked => "revoked",
            Self::RevocationUnavailable => "revocation_unavailable",
            Self::BadSourceAddress => "bad_source_address",
            Self::SourceAddressMismatch => "source_address_mismatch",
            Self::TooManyConnections => "too_many_connections",
        }
    }

    /// Every label, so metrics can start at zero for each.
    pub const LABELS: [&'static str; 18] = [
        "invalid_user",
        "not_certificate",
        "untrusted_ca",
        "bad_signature",
        "sha1_signature",
        "not_user_certificate",
        "not_yet_valid",
        "expired",
        "outside_validity",
        "lifetime_too_long",
        "no_principals",
        "principal_mismatch",
        "unknown_critical_option",
        "revoked",
        "revocation_unavailable",
        "bad_source_address",
        "source_address_mismatch",
        "too_many_connections",
    ];
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUser => f.write_str("the user name is not a valid bench name"),
            Self::NotCertificate => f.write_str("a plain key was offered, not a certificate"),
            Self::UntrustedCa => f.write_str("the certificate is not signed by a trusted CA"),
            Self::BadSignature => f.write_str("the CA signature on the certificate is invalid"),
            Self::Sha1Signature => f.write_str("the CA signed with SHA-1 (ssh-rsa)"),
            Self::NotUserCertificate => f.write_str("it is a host certificate, not a user one"),
            Self::NotYetValid => f.write_str("the certificate is not valid yet"),
            Self::Expired => f.write_str("the certificate has expired"),
            Self::OutsideValidity => f.write_str("the certificate is expired or not yet valid"),
            Self::LifetimeTooLong => f.write_str("the certificate's lifetime exceeds the limit"),
            Self::NoPrincipals => f.write_str("the certificate names no principal"),
            Self::PrincipalMismatch => {
                f.write_str("no principal of the certificate names the bench")
            }
            Self::UnknownCriticalOption(name) => {
                write!(f, "unsupported critical option {}", bounded(name))
            }
            Self::Revoked => f.write_str("the certificate has been revoked"),
            Self::RevocationUnavailable => {
                f.write_str("the revocation list cannot be read, so no certificate is accepted")
            }
            Self::BadSourceAddress => f.write_str("the source-address option is malformed"),
            Self::SourceAddressMismatch => {
                f.write_str("the client address is not allowed by source-address")
            }
            Self::TooManyConnections => f.write_str(
                "the certificate's key has server.max_connections_per_key connections open",
            ),
        }
    }
}

/// What a verified certificate allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The bench the session is for.
    pub bench: String,
    /// The certificate's key ID (untrusted text: escape before display).
    pub key_id: String,
    /// The certificate's serial.
    pub serial: u64,
    /// SHA256 fingerprint of the CA key that signed it.
    pub ca: String,
    /// Unix seconds at which the certificate stops being valid.
    pub valid_before: u64,
    /// The `force-command` critical option, which replaces whatever the client asks to run.
    pub force_command: Option<String>,
    /// Whether the certificate carries the `permit-pty` extension.
    pub permit_pty: bool,
    /// The group label value that granted access, when no principal names the bench itself:
    /// sessions check that the bench still carries it.
    pub via_group: Option<String>,
    /// The certificate itself, to check again when trust or revocations change.
    pub certificate: std::sync::Arc<russh::keys::ssh_key::Certificate>,
}

/// The facts about a login attempt that are not in the certificate.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The bench named by the SSH user name.
    pub bench: &'a str,
    /// The bench's group label value, if it has one: a principal equal to it also grants.
    pub group: Option<&'a str>,
    /// The real client address.
    pub peer: IpAddr,
    /// Unix seconds now.
    pub now: u64,
}

/// A CA key users' certificates may be signed by.
#[derive(Debug, Clone)]
pub struct TrustedCa {
    /// The CA's public key.
    pub key: KeyData,
    /// Its SHA256 fingerprint, as in audit events.
    pub fingerprint: String,
}

/// The set of trusted user CAs and the policy limits that apply to their certificates.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Trusted CA keys.
    pub cas: Vec<TrustedCa>,
    /// Longest accepted validity span in seconds; `None` = no limit.
    pub max_lifetime_seconds: Option<u64>,
    /// What is revoked.
    pub revocation: revocation::Revocation,
}

/// Why a CA key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not an OpenSSH public key.
    #[error("{path}:{line}: not an OpenSSH public key: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The cause.
        source: russh::keys::ssh_key::Error,
    },
    /// None of the files holds a key.
    #[error("no CA key found in {0}")]
    Empty(String),
}

impl Trust {
    /// A trust set holding exactly `keys`.
    pub fn new(keys: impl IntoIterator<Item = KeyData>, max_lifetime_seconds: Option<u64>) -> Self {
        let cas = keys
            .into_iter()
            .map(|key| TrustedCa {
                fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
                key,
            })
            .collect();
        Self {
            cas,
            max_lifetime_seconds,
            revocation: revocation::Revocation::Off,
        }
    }

    /// The same trust with `revocation` in force.
    pub fn with_revocation(self, revocation: revocation::Revocation) -> Self {
        Self { revocation, ..self }
    }

    /// Loads CA public keys from files of OpenSSH public key lines (`#` comments allowed).
    pub fn load(paths: &[PathBuf], max_lifetime_seconds: Option<u64>) -> Result<Self, TrustError> {
        let mut keys = Vec::new();
        for path in paths {
            keys.extend(read_public_keys(path)?);
        }
        if keys.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            return Err(TrustError::Empty(names.join(", ")));
        }
        Ok(Self::new(keys, max_lifetime_seconds))
    }

    /// The trusted CA whose key is exactly `key`.
    pub fn ca(&self, key: &KeyData) -> Option<&TrustedCa> {
        self.cas.iter().find(|ca| &ca.key == key)
    }
}

fn read_public_keys(path: &Path) -> Result<Vec<KeyData>, TrustError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrustError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut keys = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = PublicKey::from_openssh(line).map_err(|source| TrustError::Parse {
            path: path.to_owned(),
            line: index + 1,
            source,
        })?;
        keys.push(key.key_data().clone());
    }
    Ok(keys)
}

/// Longest untrusted string (key ID, user name) put in a log line or audit event.
pub const MAX_UNTRUSTED_CHARS: usize = 256;

/// `text` with control characters escaped and cut to [`MAX_UNTRUSTED_CHARS`], for logs.
pub fn bounded(text: &str) -> String {
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == MAX_UNTRUSTED_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() || is_invisible_format(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Unicode format characters that change how text shows without showing themselves
/// (bidi overrides and isolates, zero-width characters, the BOM, tags): escaped, so two
/// different untrusted strings never look the same in a log or a table.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_shows_invisible_characters() {
        assert_eq!(bounded("alice\u{202E}moc.evil"), "alice\\u{202e}moc.evil");
        assert_eq!(bounded("bob\u{200B}"), "bob\\u{200b}");
        assert_eq!(bounded("tab\there"), "tab\\there");
        assert_eq!(bounded("café"), "café");
    }

    #[test]
    fn bench_names_follow_the_pattern() {
        for good in ["a", "site1", "A.b_c-d", &"x".repeat(128)] {
            assert!(is_bench_name(good), "{good}");
        }
        for bad in [
            "",
            ".x",
            "-x",
            "_x",
            "a/b",
            "a b",
            "a\0",
            "é",
            &"x".repeat(129),
            "a:b",
        ] {
            assert!(!is_bench_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn untrusted_text_is_escaped_and_bounded() {
        assert_eq!(bounded("a\nb\u{1b}"), "a\\nb\\u{1b}");
        let long = bounded(&"y".repeat(1000));
        assert_eq!(long.chars().count(), MAX_UNTRUSTED_CHARS + 1);
    }

    #[test]
    fn labels_cover_every_variant_once() {
        use Rejection::*;
        // A new variant fails to compile here until it is listed, and then must be in LABELS.
        let every = |r: &Rejection| match r {
            InvalidUser
            | NotCertificate
            | UntrustedCa
            | BadSignature
            | Sha1Signature
            | NotUserCertificate
            | NotYetValid
            | Expired
            | OutsideValidity
            | LifetimeTooLong
            | NoPrincipals
            | PrincipalMismatch
            | UnknownCriticalOption(_)
            | Revoked
            | RevocationUnavailable
            | BadSourceAddress
            | SourceAddressMismatch
            | TooManyConnections => (),
        };
        let all = [
            InvalidUser,
            NotCertificate,
            UntrustedCa,
            BadSignature,
            Sha1Signature,
            NotUserCertificate,
            NotYetValid,
            Expired,
            OutsideValidity,
            LifetimeTooLong,
            NoPrincipals,
            PrincipalMismatch,
            UnknownCriticalOption("x".into()),
            Revoked,
            RevocationUnavailable,
            BadSourceAddress,
            SourceAddressMismatch,
            TooManyConnections,
        ];
        all.iter().for_each(every);
        let mut labels: Vec<&str> = all.iter().map(Rejection::label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all.len(), "two variants share a label");
        let mut listed = Rejection::LABELS.to_vec();
        listed.sort_unstable();
        assert_eq!(labels, listed);
    }
}
