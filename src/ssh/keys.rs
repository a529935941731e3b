//! Host keys: load them, or create a missing one, and refuse keys others can read.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::{Algorithm, LineEnding, PrivateKey};

/// Why a host key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The file cannot be read or written.
    #[error("host key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Group or others may read or write it.
    #[error(
        "host key {path}: permissions {mode:04o} are too open; it must be accessible only by \
         its owner (chmod 600)"
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It is not an unencrypted OpenSSH private key.
    #[error("host key {path}: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What to do about a host key file that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Create an ed25519 key there (mode 0600).
    Create,
    /// Leave it; report it through the returned list.
    Report,
}

/// What [`load`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The keys, in configuration order.
    pub keys: Vec<PrivateKey>,
    /// Paths that are missing (with [`Missing::Report`]).
    pub missing: Vec<PathBuf>,
    /// One warning per RSA key (see [`rsa_warning`]).
    pub warnings: Vec<String>,
}

/// Why an RSA host key is a risk: russh signs with the `rsa` crate, whose private-key
/// operations are not constant-time (RUSTSEC-2023-0071, the Marvin attack), so someone who
/// can time many handshakes may learn the key. Loud, not fatal: clients pin host keys, and a
/// bastion that stops starting on upgrade is worse; the README says how to move to ed25519.
pub fn rsa_warning(path: &Path) -> String {
    format!(
        "host key {} is RSA: its signatures are not constant-time (RUSTSEC-2023-0071, Marvin) and may leak it to a patient attacker; replace it with an ed25519 key (ssh-keygen -t ed25519) and tell clients the new fingerprint",
        path.display()
    )
}

/// Loads every host key; missing ones are created or reported as `missing` says.
pub fn load(paths: &[PathBuf], missing: Missing) -> Result<Loaded, HostKeyError> {
    let mut keys = Vec::new();
    let mut absent = Vec::new();
    let mut warnings = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(HostKeyError::TooOpen {
                        path: path.clone(),
                        mode,
                    });
                }
                let key = read(path)?;
                if matches!(key.algorithm(), Algorithm::Rsa { .. }) {
                    warnings.push(rsa_warning(path));
                }
                keys.push(key);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match missing {
                Missing::Create => keys.push(create(path)?),
                Missing::Report => absent.push(path.clone()),
            },
            Err(source) => {
                return Err(HostKeyError::Io {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
    Ok(Loaded {
        keys,
        missing: absent,
        warnings,
    })
}

fn read(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let io = |source| HostKeyError::Io {
        path: path.to_owned(),
        source,
    };
    let invalid = |reason: String| HostKeyError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let key = PrivateKey::from_openssh(&text)
        .map_err(|e| invalid(format!("not an OpenSSH private key: {e}")))?;
    if key.is_encrypted() {
        return Err(invalid(
            "is encrypted; host keys must not have a passphrase".into(),
        ));
    }
    Ok(key)
}

fn create(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let io = |source| HostKeyError::Io {
        path: path.to_owned(),
        source,
    };
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(|e| {
        HostKeyError::Invalid {
            path: path.to_owned(),
            reason: format!("cannot generate: {e}"),
        }
    })?;
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| HostKeyError::Invalid {
            path: path.to_owned(),
            reason: format!("cannot encode: {e}"),
        })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(pem.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    tracing::info!(path = %path.display(), fingerprint = %key.public_key().fingerprint(Default::default()), "created host key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_key_is_created_private_and_reloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/host_key");
        let created = load(std::slice::from_ref(&path), Missing::Create)
            .expect("create")
            .keys;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load(std::slice::from_ref(&path), Missing::Create)
            .expect("reload")
            .keys;
        assert_eq!(created[0].public_key(), again[0].public_key());
    }

    #[test]
    fn missing_key_is_reported_when_not_creating() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host_key");
        let loaded = load(std::slice::from_ref(&path), Missing::Report).expect("report");
        assert!(loaded.keys.is_empty() && loaded.warnings.is_empty());
        assert_eq!(loaded.missing, std::slice::from_ref(&path));
        assert!(!path.exists());
    }

    #[test]
    fn readable_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host_key");
        load(std::slice::from_ref(&path), Missing::Create).expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load(std::slice::from_ref(&path), Missing::Create).expect_err("too open");
        assert!(err.to_string().contains("0644"), "{err}");
    }

    #[test]
    fn garbage_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host_key");
        std::fs::write(&path, "not a key").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            load(&[path], Missing::Create),
            Err(HostKeyError::Invalid { .. })
        ));
    }
}
