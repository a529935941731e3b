//! What every connection shares: settings, audit sink, bench index, limits and the background
//! work shutdown waits for.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::PrivateKey;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;
use crate::config::{self, Config, Net};
use crate::docker::benches::Changes;
use crate::docker::Index;
use crate::flow::{Budgets, Pool};
use crate::limits::Quota;
use crate::listeners::Handover;
use crate::live::Registry;
use crate::settings::{self, Settings};

/// The daemon's shared state.
pub struct App {
    /// Settings that SIGHUP and the revocation file replace.
    pub settings: watch::Sender<Arc<Settings>>,
    /// Where audit events go.
    pub audit: Audit,
    /// The bench index across Docker endpoints.
    pub benches: Arc<Index>,
    /// Sessions per bench.
    pub bench_slots: Quota<String>,
    /// Authenticated connections per certificate key.
    pub key_connections: Quota<KeyData>,
    /// Load balancers allowed to send PROXY headers, when the protocol is on.
    pub trusted_proxies: Option<Vec<Net>>,
    /// Background work (session teardown) that shutdown waits for.
    pub tracker: TaskTracker,
    /// The `[server]` section: listeners' limits, deadlines, keepalives.
    pub server: config::Server,
    /// The host keys.
    pub host_keys: Vec<PrivateKey>,
    /// Client input held in all connections.
    pub input: Arc<Pool>,
    /// The sessions running now.
    pub live: Registry,
    /// The `[admin]` section.
    pub admin: config::Admin,
    /// The listening sockets, for a takeover; what stops accepting once handed over.
    pub handover: Handover,
}

impl App {
    /// Shared state for a server run by `config`, with its settings, audit sink and host keys.
    pub fn new(
        config: &Config,
        settings: watch::Sender<Arc<Settings>>,
        audit: Audit,
        host_keys: Vec<PrivateKey>,
        benches: Arc<Index>,
    ) -> Self {
        let server = &config.server;
        Self {
            settings,
            audit,
            benches,
            bench_slots: Quota::new(config.session.max_sessions_per_bench.get()),
            key_connections: Quota::new(config.server.max_connections_per_key.get()),
            trusted_proxies: server
                .proxy_protocol
                .then(|| server.trusted_proxies.clone()),
            tracker: TaskTracker::new(),
            server: server.clone(),
            host_keys,
            input: Arc::new(Pool::new(Budgets {
                per_channel: server.input_buffer_per_channel.0,
                per_connection: server.input_buffer_per_connection.0,
                total: server.input_buffer_total.0,
                stuck_after: server.stuck_timeout.0,
            })),
            live: Registry::default(),
            admin: config.admin.clone(),
            handover: Handover::default(),
        }
    }

    /// Why this bastion cannot serve logins now, if it cannot (for `/health`).
    pub fn health(&self) -> Option<String> {
        if self.handover.draining() {
            return Some("draining: the listeners were handed over to a new process".to_owned());
        }
        match &self.settings().trust.revocation {
            crate::auth::revocation::Revocation::Unavailable { reason, .. } => Some(format!(
                "revocation list unavailable, every login is refused: {reason}"
            )),
            _ => None,
        }
    }

    /// SIGHUP: re-reads the config at `path` and applies its trust, revocations, session and
    /// lifetime settings and its Docker endpoints together, or, when anything in it is wrong,
    /// nothing.
    pub fn reload(&self, path: &Path) -> anyhow::Result<Changes> {
        let config = Config::load(path)?;
        settings::prepare(&config)?;
        let settings = Settings::load(&config)?;
        let plan = self
            .benches
            .plan(&config.docker)
            .context("docker.endpoints")?;
        self.settings.send_replace(Arc::new(settings));
        Ok(self.benches.apply(plan))
    }

    /// The settings in force now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

    /// The pre-authentication deadline.
    pub fn login_grace(&self) -> Duration {
        self.server.login_grace_time.0
    }

    /// How long shutdown waits for sessions.
    pub fn shutdown_grace(&self) -> Duration {
        self.server.shutdown_grace.0
    }
}
