//! benchgate: an SSH bastion that admits OpenSSH user certificates into Docker bench containers.
//!
//! `main.rs` parses the command line; [`start`] turns a [`config::Config`] into the state
//! [`ssh::server::serve`] runs on, the seam the integration tests use.

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod commands;
pub mod config;
pub mod docker;
pub mod flow;
pub mod limits;
pub mod listeners;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod proxy_protocol;
pub mod quickstart;
pub mod recording;
pub mod settings;
pub mod ssh;

use std::sync::Arc;

use anyhow::Context as _;

/// Loads what `config` names (CA keys, host keys, audit file) into the server's shared state,
/// creating missing host keys, and starts the bench index, which follows the Docker engines
/// until `shutdown`. Fails with one line naming the file at fault; an engine that is down is
/// reported and retried, never fatal.
pub async fn start(
    config: &config::Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Arc<app::App>> {
    settings::prepare(config)?;
    let settings = tokio::sync::watch::Sender::new(Arc::new(settings::Settings::load(config)?));
    tokio::spawn(settings::follow_revocations(
        settings.clone(),
        shutdown.clone(),
    ));
    let host_keys = ssh::keys::load(&config.server.host_keys.0, ssh::keys::Missing::Create)
        .context("server.host_keys")?;
    for warning in &host_keys.warnings {
        tracing::error!("{warning}");
    }
    let host_keys = host_keys.keys;
    let audit_path = config.log.audit_file.0.as_deref();
    let audit = audit::Audit::open(audit_path).with_context(|| {
        format!(
            "log.audit_file {}",
            audit_path
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )
    })?;
    let benches = Arc::new(docker::Index::from_config(&config.docker)?);
    for error in benches.sync_all().await {
        tracing::warn!(%error, "docker endpoint unavailable at start; retrying in the background");
    }
    benches.watch(shutdown);
    Ok(Arc::new(app::App::new(
        config, settings, audit, host_keys, benches,
    )))
}
