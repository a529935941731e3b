//! The bench index: containers by label across every endpoint, kept current from each
//! engine's events stream with a periodic resync, so a login costs no Docker listing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Endpoint, Error};

/// Label that overrides `session.user` for one container.
pub const USER_LABEL: &str = "benchgate.user";
/// Label that overrides `session.working_dir` for one container.
pub const WORKDIR_LABEL: &str = "benchgate.workdir";
/// Full resync interval, in case an event was missed.
const RESYNC: Duration = Duration::from_secs(60);
/// Longest wait between reconnection attempts to an engine that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One bench container as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bench {
    /// Index of its endpoint.
    pub endpoint: usize,
    /// Full container ID (from Docker, never from a user).
    pub container: String,
    /// Docker's state: running, exited, paused, restarting...
    pub state: String,
    /// Value of the group label, if any.
    pub group: Option<String>,
    /// `benchgate.user` label.
    pub user: Option<String>,
    /// `benchgate.workdir` label.
    pub workdir: Option<String>,
}

/// What the index says about a bench name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A running container.
    Running(Bench),
    /// Known, but not running; the state says why.
    NotRunning(Bench),
    /// No container carries that label value.
    Unknown,
}

/// Benches across all endpoints.
pub struct Index {
    endpoints: Vec<Arc<Endpoint>>,
    bench_label: String,
    group_label: String,
    /// Per endpoint: bench name -> containers.
    benches: RwLock<Vec<HashMap<String, Vec<Bench>>>>,
}

impl Index {
    /// An empty index over `endpoints`; [`Index::watch`] fills it.
    pub fn new(endpoints: Vec<Arc<Endpoint>>, bench_label: String, group_label: String) -> Self {
        let empty = vec![HashMap::new(); endpoints.len()];
        Self {
            endpoints,
            bench_label,
            group_label,
            benches: RwLock::new(empty),
        }
    }

    /// An empty index over the engines `config` names (nothing is contacted yet).
    pub fn from_config(config: &crate::config::Docker) -> Result<Self, Error> {
        let endpoints = config
            .endpoints
            .0
            .iter()
            .map(|e| Endpoint::new(e, config.request_timeout.0).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(
            endpoints,
            config.bench_label.clone(),
            config.group_label.clone(),
        ))
    }

    /// The endpoint at `index`.
    pub fn endpoint(&self, index: usize) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(index)
    }

    /// The bench named `name`: a running container if any endpoint has one.
    pub fn lookup(&self, name: &str) -> Lookup {
        let benches = self.benches.read().unwrap_or_else(|p| p.into_inner());
        let mut found: Option<&Bench> = None;
        for bench in benches
            .iter()
            .filter_map(|by_name| by_name.get(name))
            .flatten()
        {
            if bench.state == "running" {
                return Lookup::Running(bench.clone());
            }
            found = found.or(Some(bench));
        }
        found.map_or(Lookup::Unknown, |b| Lookup::NotRunning(b.clone()))
    }

    /// The group label value of the running container of bench `name`, if it has one (a
    /// stopped container's label grants nothing).
    pub fn group(&self, name: &str) -> Option<String> {
        match self.lookup(name) {
            Lookup::Running(b) => b.group,
            Lookup::NotRunning(_) | Lookup::Unknown => None,
        }
    }

    /// How many bench names are known.
    pub fn len(&self) -> usize {
        let benches = self.benches.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = benches.iter().flat_map(|m| m.keys()).collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }

    /// Whether no bench is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps every endpoint's part of the index current until `shutdown`: a full listing,
    /// then the events stream, with reconnection and backoff while an engine is down.
    pub fn watch(self: &Arc<Self>, shutdown: CancellationToken) {
        for index in 0..self.endpoints.len() {
            let this = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = this.follow(index) => {}
                }
            });
        }
    }

    /// Negotiates with and lists every endpoint once; returns the failures (the index keeps
    /// what it had for those).
    pub async fn sync_all(&self) -> Vec<Error> {
        let mut errors = Vec::new();
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            if let Err(e) = async {
                endpoint.negotiate().await?;
                self.sync(index).await
            }
            .await
            {
                errors.push(e);
            }
        }
        errors
    }

    async fn follow(&self, index: usize) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.follow_once(index).await {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(e) => {
                    crate::metrics::docker_error(e.op());
                    tracing::warn!(endpoint = %self.endpoints[index].url, error = %e, retry_in = ?backoff, "docker endpoint unavailable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Negotiates, lists, then applies events until the stream ends or the resync timer fires.
    async fn follow_once(&self, index: usize) -> Result<(), Error> {
        let endpoint = &self.endpoints[index];
        endpoint.negotiate().await?;
        // Only lifecycle events change the index; exec_* events (every session makes several)
        // must not cost a listing each.
        let lifecycle = [
            "create", "start", "die", "destroy", "pause", "unpause", "rename", "update",
        ];
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("label".to_owned(), vec![self.bench_label.clone()]),
            (
                "event".to_owned(),
                lifecycle.iter().map(|e| e.to_string()).collect(),
            ),
        ]);
        let api = endpoint.api()?;
        let mut events = api.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        self.sync(index).await?;
        let resync = tokio::time::sleep(RESYNC);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                _ = &mut resync => return Ok(()),
                event = events.next() => match event {
                    Some(Ok(_)) => self.sync(index).await?,
                    Some(Err(e)) => return Err(Error::Unreachable { endpoint: endpoint.url.clone(), reason: e.to_string() }),
                    None => return Err(Error::Unreachable { endpoint: endpoint.url.clone(), reason: "events stream ended".into() }),
                },
            }
        }
    }

    /// Replaces endpoint `index`'s part of the index with a fresh listing.
    async fn sync(&self, index: usize) -> Result<(), Error> {
        let endpoint = &self.endpoints[index];
        let filters = HashMap::from([("label".to_owned(), vec![self.bench_label.clone()])]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let containers = endpoint
            .bounded("list", endpoint.api()?.list_containers(Some(options)))
            .await?;
        let mut by_name: HashMap<String, Vec<Bench>> = HashMap::new();
        for container in containers {
            let labels = container.labels.unwrap_or_default();
            let (Some(name), Some(id)) = (labels.get(&self.bench_label), container.id) else {
                continue;
            };
            let label = |key: &str| labels.get(key).filter(|v| !v.is_empty()).cloned();
            by_name.entry(name.clone()).or_default().push(Bench {
                endpoint: index,
                container: id,
                state: container.state.map(|s| s.to_string()).unwrap_or_default(),
                group: if self.group_label.is_empty() {
                    None
                } else {
                    label(&self.group_label)
                },
                user: label(USER_LABEL),
                workdir: label(WORKDIR_LABEL),
            });
        }
        let mut benches = self.benches.write().unwrap_or_else(|p| p.into_inner());
        benches[index] = by_name;
        let known = benches
            .iter()
            .flat_map(|m| m.keys())
            .collect::<std::collections::HashSet<_>>()
            .len();
        drop(benches);
        crate::metrics::benches_known(known);
        Ok(())
    }
}
