//! The settings that change without a restart — trust (CA keys, lifetime limit, revocation
//! list), session settings, expiry and idle policy — and how SIGHUP and the revocation file
//! replace them atomically.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::revocation::{Revocation, Stamp};
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
}

impl Settings {
    /// Loads what `config` names. A missing or corrupt revocation list is not an error here:
    /// it is kept as unavailable, which refuses every login.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let revoked_keys = config.auth.revoked_keys.0.as_deref();
        let revocation = revoked_keys.map_or(Revocation::Off, Revocation::load);
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
        })
    }
}

fn report(revocation: &Revocation) {
    match revocation {
        Revocation::Off => {}
        Revocation::Loaded { path, list, .. } => {
            tracing::info!(path = %path.display(), entries = list.len(), "revocation list loaded");
        }
        Revocation::Unavailable { path, reason, .. } => tracing::error!(
            path = %path.display(), %reason,
            "revocation list unavailable: every login is refused until it is fixed"
        ),
    }
}

/// Creates the directories the settings write to (the recordings'), mode 0700. For the
/// daemon only: `explain` loads settings too and must not create anything.
pub fn prepare(config: &Config) -> anyhow::Result<()> {
    if let Some(dir) = &config.session.record_dir.0 {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("session.record_dir {}", dir.display()))?;
    }
    Ok(())
}

/// Re-reads the revocation list whenever its file changes (an atomic replace included) until
/// `shutdown`, replacing the settings with the new list.
pub async fn follow_revocations(
    settings: watch::Sender<Arc<Settings>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REVOCATION_POLL) => {}
        }
        let current = settings.borrow().clone();
        let Some((path, seen)) = current.trust.revocation.source() else {
            continue;
        };
        if Stamp::of(path).as_ref() == seen {
            continue;
        }
        let revocation = Revocation::load(path);
        // A file rewritten in place while it was read is read again on the next poll.
        if revocation.source().and_then(|(_, stamp)| stamp).cloned() != Stamp::of(path) {
            continue;
        }
        report(&revocation);
        let compared = current
            .trust
            .revocation
            .source()
            .map(|(p, s)| (p.to_owned(), s.cloned()));
        settings.send_if_modified(|latest| {
            // A SIGHUP reload in the meantime wins: install only over what was compared.
            let now = latest
                .trust
                .revocation
                .source()
                .map(|(p, s)| (p.to_owned(), s.cloned()));
            if now != compared {
                return false;
            }
            let mut next = Settings::clone(latest);
            next.trust = next.trust.clone().with_revocation(revocation);
            *latest = Arc::new(next);
            true
        });
    }
}
