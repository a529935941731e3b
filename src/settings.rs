//! The settings that change without a restart — trust (CA keys, lifetime limit, revocation
//! list), session settings, expiry and idle policy — and how SIGHUP and the revocation file
//! replace them atomically.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::revocation::Revocation;
use crate::auth::Trust;
use crate::config::{self, Config};

/// How often the revocation file is looked at for changes.
const REVOCATION_POLL: Duration = Duration::from_secs(1);

/// Settings in force; replaced whole, never edited.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Trusted CAs, lifetime limit and revocations.
    pub trust: Trust,
    /// What sessions run.
    pub session: config::Session,
    /// Lead times before expiry at which sessions are warned, longest first.
    pub expiry_warnings: Vec<Duration>,
    /// End connections when their certificate expires.
    pub disconnect_on_expiry: bool,
    /// End connections idle this long.
    pub idle_timeout: Option<Duration>,
    /// The revocation list file, if any.
    pub revoked_keys: Option<PathBuf>,
}

impl Settings {
    /// Loads what `config` names. A missing or corrupt revocation list is not an error here:
    /// it is kept as unavailable, which refuses every login.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let revoked_keys = config.auth.revoked_keys.0.clone();
        let revocation = revoked_keys
            .as_deref()
            .map_or(Revocation::Off, Revocation::load);
        report(&revocation);
        let trust = Trust::load(
            &config.auth.trusted_user_ca_keys.0,
            config.auth.max_cert_lifetime.nonzero().map(|d| d.as_secs()),
        )
        .context("auth.trusted_user_ca_keys")?
        .with_revocation(revocation);
        let mut expiry_warnings: Vec<Duration> =
            config.auth.expiry_warnings.iter().map(|s| s.0).collect();
        expiry_warnings.sort_unstable_by(|a, b| b.cmp(a));
        expiry_warnings.dedup();
        Ok(Self {
            trust,
            session: config.session.clone(),
            expiry_warnings,
            disconnect_on_expiry: config.auth.disconnect_on_expiry,
            idle_timeout: config.server.idle_timeout.nonzero(),
            revoked_keys,
        })
    }
}

fn report(revocation: &Revocation) {
    match revocation {
        Revocation::Off => {}
        Revocation::Loaded { path, list } => {
            tracing::info!(path = %path.display(), entries = list.len(), "revocation list loaded");
        }
        Revocation::Unavailable { path, reason } => tracing::error!(
            path = %path.display(), %reason,
            "revocation list unavailable: every login is refused until it is fixed"
        ),
    }
}

/// Replaces the settings from the config file at `path`; on any error the old ones stay.
pub fn reload(path: &Path, settings: &watch::Sender<Arc<Settings>>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let new = Settings::load(&config)?;
    settings.send_replace(Arc::new(new));
    Ok(())
}

/// Re-reads the revocation list whenever its file changes (an atomic replace included) until
/// `shutdown`, replacing the settings with the new list.
pub async fn follow_revocations(
    settings: watch::Sender<Arc<Settings>>,
    shutdown: CancellationToken,
) {
    let mut seen: Option<(PathBuf, Option<Stamp>)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REVOCATION_POLL) => {}
        }
        let current = settings.borrow().revoked_keys.clone();
        let Some(path) = current else {
            seen = None;
            continue;
        };
        let stamp = stamp(&path);
        match &seen {
            Some((seen_path, seen_stamp)) if *seen_path == path && *seen_stamp == stamp => continue,
            // The first look records what the settings were loaded from.
            None => {
                seen = Some((path, stamp));
                continue;
            }
            Some(_) => {}
        }
        seen = Some((path.clone(), stamp));
        let revocation = Revocation::load(&path);
        report(&revocation);
        settings.send_modify(|current| {
            let mut next = Settings::clone(current);
            next.trust = next.trust.clone().with_revocation(revocation);
            *current = Arc::new(next);
        });
    }
}

/// What identifies one version of a file: a replaced file has a new inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}
