//! benchgate: an SSH bastion that admits OpenSSH user certificates into Docker bench containers.
//!
//! `main.rs` parses the command line; [`start`] turns a [`config::Config`] into the state
//! [`ssh::server::serve`] runs on, the seam the integration tests use.

pub mod audit;
pub mod auth;
pub mod config;
pub mod logging;
pub mod metrics;
pub mod ssh;

use std::sync::Arc;

use anyhow::Context as _;

/// Loads what `config` names (CA keys, host keys, audit file) into the server's shared state,
/// creating missing host keys. Fails with one line naming the file at fault.
pub fn start(config: &config::Config) -> anyhow::Result<Arc<ssh::server::Shared>> {
    let trust = auth::Trust::load(
        &config.auth.trusted_user_ca_keys.0,
        config.auth.max_cert_lifetime.nonzero().map(|d| d.as_secs()),
    )
    .context("auth.trusted_user_ca_keys")?;
    let (host_keys, _) = ssh::keys::load(&config.server.host_keys.0, ssh::keys::Missing::Create)
        .context("server.host_keys")?;
    let audit_path = config.log.audit_file.0.as_deref();
    let audit = audit::Audit::open(audit_path).with_context(|| {
        format!(
            "log.audit_file {}",
            audit_path
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
    })?;
    Ok(Arc::new(ssh::server::Shared::new(
        config, trust, audit, host_keys,
    )))
}
