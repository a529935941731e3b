//! The bench index: containers by label across every endpoint, kept current from each
//! engine's events stream with a periodic resync, so a login costs no Docker listing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Endpoint, Error};
use crate::config;

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
    /// Exactly one live container across every endpoint, and it runs.
    Running(Bench),
    /// Two or more live (running, paused or restarting) containers carry the name: refused,
    /// never guessed, since whoever can start a container with a bench's label would
    /// otherwise capture its sessions.
    Ambiguous(Vec<Bench>),
    /// Known, but its one live container is paused or restarting, or none is live; the state
    /// says why.
    NotRunning(Bench),
    /// No container carries that label value.
    Unknown,
}

/// Benches across all endpoints.
pub struct Index {
    /// One per endpoint ever configured, in order; a removed endpoint's slot stays empty, so
    /// the index of every other keeps its meaning.
    slots: RwLock<Vec<Option<Slot>>>,
    bench_label: String,
    group_label: String,
    /// Put in front of a group label's value to make the principal that grants it.
    group_prefix: String,
    /// Conflicts already logged (so a resync does not repeat them).
    reported: Mutex<HashSet<String>>,
    /// Per slot: bench name -> containers.
    benches: RwLock<Vec<HashMap<String, Vec<Bench>>>>,
    /// Set by [`Index::watch`]: endpoints added later are followed until then too.
    shutdown: OnceLock<CancellationToken>,
}

/// One configured endpoint and what stops following it.
struct Slot {
    config: config::Endpoint,
    endpoint: Arc<Endpoint>,
    stop: CancellationToken,
}

/// What a reload did to the endpoints (their URLs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Connected and indexed from now on.
    pub added: Vec<String>,
    /// Serving no new session; their live sessions run on.
    pub removed: Vec<String>,
    /// Unchanged, keeping their event streams.
    pub kept: Vec<String>,
}

impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |urls: &[String]| match urls {
            [] => "none".to_owned(),
            urls => urls.join(", "),
        };
        write!(
            f,
            "added {}; removed {}; kept {}",
            list(&self.added),
            list(&self.removed),
            list(&self.kept)
        )
    }
}

/// Label conflicts, one readable line each (naming containers and engines).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Conflicts {
    /// Bench names that two or more live containers carry: their sessions are refused.
    pub ambiguous: Vec<String>,
    /// Group labels whose principal is also a bench's name: not honoured.
    pub ignored_groups: Vec<String>,
}

/// Endpoints for a reload, made before anything changes (making one can fail).
pub struct Plan {
    new: Vec<(config::Endpoint, Option<Arc<Endpoint>>)>,
}

/// Whether a container in Docker's `state` is or will soon be running again (paused, or
/// restarting after a crash): two such containers with one bench name make it ambiguous, so
/// a second container cannot take over sessions while the real one is paused or restarting.
/// Exited and created ones do not count (a redeploy leaves the old one exited).
fn is_live(state: &str) -> bool {
    matches!(state, "running" | "paused" | "restarting")
}

/// The 12-character short form of a container ID, as `docker ps` shows it.
pub fn short(container: &str) -> &str {
    container.get(..12).unwrap_or(container)
}

fn lock_read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn lock_write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl Index {
    /// An empty index over the engines `config` names (nothing is contacted yet);
    /// [`Index::watch`] fills it.
    pub fn from_config(config: &config::Docker) -> Result<Self, Error> {
        let slots = config
            .endpoints
            .0
            .iter()
            .map(|e| {
                Ok(Some(Slot {
                    config: e.clone(),
                    endpoint: Arc::new(Endpoint::new(e, config.request_timeout.0)?),
                    stop: CancellationToken::new(),
                }))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            benches: RwLock::new(vec![HashMap::new(); slots.len()]),
            slots: RwLock::new(slots),
            bench_label: config.bench_label.clone(),
            group_label: config.group_label.clone(),
            group_prefix: config.group_principal_prefix.clone(),
            reported: Mutex::default(),
            shutdown: OnceLock::new(),
        })
    }

    /// The endpoint at `index`, unless it was removed.
    pub fn endpoint(&self, index: usize) -> Option<Arc<Endpoint>> {
        lock_read(&self.slots)
            .get(index)?
            .as_ref()
            .map(|slot| slot.endpoint.clone())
    }

    /// The endpoints configured now.
    pub fn configured(&self) -> Vec<config::Endpoint> {
        lock_read(&self.slots)
            .iter()
            .flatten()
            .map(|slot| slot.config.clone())
            .collect()
    }

    /// The endpoints `config` names that are not configured now, made ready (not connected);
    /// fails on unusable TLS files, changing nothing.
    pub fn plan(&self, config: &config::Docker) -> Result<Plan, Error> {
        let slots = lock_read(&self.slots);
        let configured = |e: &config::Endpoint| slots.iter().flatten().any(|s| s.config == *e);
        let new = config
            .endpoints
            .0
            .iter()
            .map(|e| {
                let made = match configured(e) {
                    true => None,
                    false => Some(Arc::new(Endpoint::new(e, config.request_timeout.0)?)),
                };
                Ok((e.clone(), made))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Plan { new })
    }

    /// Makes the endpoints those of `plan`: added ones are followed and indexed, removed
    /// ones serve no new session (sessions already running keep their engine), the others
    /// carry on untouched.
    pub fn apply(self: &Arc<Self>, plan: Plan) -> Changes {
        let mut changes = Changes::default();
        let mut slots = lock_write(&self.slots);
        let mut benches = lock_write(&self.benches);
        for (index, slot) in slots.iter_mut().enumerate() {
            let Some(current) = slot else { continue };
            if plan.new.iter().any(|(e, _)| *e == current.config) {
                changes.kept.push(current.config.url.clone());
            } else {
                current.stop.cancel();
                changes.removed.push(current.config.url.clone());
                *slot = None;
                benches[index].clear();
            }
        }
        for (config, made) in plan.new {
            let Some(endpoint) = made else { continue };
            changes.added.push(config.url.clone());
            let stop = CancellationToken::new();
            slots.push(Some(Slot {
                config,
                endpoint: endpoint.clone(),
                stop: stop.clone(),
            }));
            benches.push(HashMap::new());
            if self.shutdown.get().is_some() {
                self.spawn_follow(slots.len() - 1, endpoint, stop);
            }
        }
        drop((slots, benches));
        self.count_known();
        self.report_conflicts();
        changes
    }

    /// The bench named `name`: its one live container across every endpoint.
    pub fn lookup(&self, name: &str) -> Lookup {
        let benches = lock_read(&self.benches);
        let all: Vec<&Bench> = benches
            .iter()
            .filter_map(|by_name| by_name.get(name))
            .flatten()
            .collect();
        let mut live: Vec<Bench> = all
            .iter()
            .filter(|b| is_live(&b.state))
            .map(|b| (*b).clone())
            .collect();
        match live.len() {
            0 => all
                .first()
                .map_or(Lookup::Unknown, |b| Lookup::NotRunning((*b).clone())),
            1 if live[0].state == "running" => Lookup::Running(live.remove(0)),
            1 => Lookup::NotRunning(live.remove(0)),
            _ => Lookup::Ambiguous(live),
        }
    }

    /// The principal that grants `bench` through its group label: the configured prefix and
    /// the label's value. None without a group label, and none when that principal is also a
    /// bench's name: a certificate for bench X must not open every bench grouped as X.
    pub fn group_principal(&self, bench: &Bench) -> Option<String> {
        let principal = format!("{}{}", self.group_prefix, bench.group.as_deref()?);
        (!self.names_bench(&principal)).then_some(principal)
    }

    /// The group principal of bench `name`'s one running container (see
    /// [`Index::group_principal`]).
    pub fn group(&self, name: &str) -> Option<String> {
        match self.lookup(name) {
            Lookup::Running(b) => self.group_principal(&b),
            Lookup::Ambiguous(_) | Lookup::NotRunning(_) | Lookup::Unknown => None,
        }
    }

    fn names_bench(&self, name: &str) -> bool {
        lock_read(&self.benches)
            .iter()
            .any(|m| m.contains_key(name))
    }

    /// Every label conflict in the index, one line each.
    pub fn conflicts(&self) -> Conflicts {
        // Slots before benches, the order every writer takes them in.
        let urls: Vec<Option<String>> = lock_read(&self.slots)
            .iter()
            .map(|slot| slot.as_ref().map(|s| s.endpoint.url.clone()))
            .collect();
        let url = |b: &Bench| {
            urls.get(b.endpoint)
                .cloned()
                .flatten()
                .unwrap_or_else(|| "a removed engine".to_owned())
        };
        let benches = lock_read(&self.benches);
        let mut by_name: HashMap<&str, Vec<&Bench>> = HashMap::new();
        for (name, list) in benches.iter().flatten() {
            by_name.entry(name).or_default().extend(list);
        }
        let mut out = Conflicts::default();
        for (name, list) in &by_name {
            let running: Vec<&&Bench> = list.iter().filter(|b| is_live(&b.state)).collect();
            if running.len() > 1 {
                let where_: Vec<String> = running
                    .iter()
                    .map(|b| format!("{} on {}", short(&b.container), url(b)))
                    .collect();
                out.ambiguous.push(format!(
                    "bench {name:?} is ambiguous: {} live containers carry its label ({}); its sessions are refused",
                    running.len(),
                    where_.join(", ")
                ));
            }
            for bench in list {
                let Some(group) = bench.group.as_deref() else {
                    continue;
                };
                let principal = format!("{}{group}", self.group_prefix);
                if by_name.contains_key(principal.as_str()) {
                    out.ignored_groups.push(format!(
                        "bench {name:?}: container {} on {} has group label {group:?}, whose principal {principal:?} names a bench; the group is not honoured",
                        short(&bench.container),
                        url(bench)
                    ));
                }
            }
        }
        out.ambiguous.sort();
        out.ignored_groups.sort();
        out
    }

    /// Logs conflicts not logged before (ambiguous names at error level: their sessions are
    /// refused), and counts those in force.
    fn report_conflicts(&self) {
        let Conflicts {
            ambiguous,
            ignored_groups,
        } = self.conflicts();
        crate::metrics::label_conflicts(ambiguous.len(), ignored_groups.len());
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        for conflict in &ambiguous {
            if reported.insert(conflict.clone()) {
                tracing::error!("{conflict}");
            }
        }
        for conflict in &ignored_groups {
            if reported.insert(conflict.clone()) {
                tracing::warn!("{conflict}");
            }
        }
        reported.retain(|c| ambiguous.contains(c) || ignored_groups.contains(c));
    }

    /// How many bench names are known.
    pub fn len(&self) -> usize {
        let benches = lock_read(&self.benches);
        let mut names: Vec<&String> = benches.iter().flat_map(|m| m.keys()).collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }

    fn count_known(&self) {
        crate::metrics::benches_known(self.len());
    }

    /// Whether no bench is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps every endpoint's part of the index current until `shutdown` (or until it is
    /// removed): a full listing, then the events stream, with reconnection and backoff while
    /// an engine is down.
    pub fn watch(self: &Arc<Self>, shutdown: CancellationToken) {
        let _ = self.shutdown.set(shutdown.clone());
        let slots = lock_read(&self.slots);
        for (index, slot) in slots.iter().enumerate() {
            if let Some(slot) = slot {
                self.spawn_follow(index, slot.endpoint.clone(), slot.stop.clone());
            }
        }
    }

    /// Follows endpoint `index` until shutdown or `removed`.
    fn spawn_follow(
        self: &Arc<Self>,
        index: usize,
        endpoint: Arc<Endpoint>,
        removed: CancellationToken,
    ) {
        let this = self.clone();
        let shutdown = self.shutdown.get().cloned().unwrap_or_default();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = removed.cancelled() => {}
                _ = this.follow(index, &endpoint) => {}
            }
        });
    }

    /// Negotiates with and lists every endpoint once; returns the failures (the index keeps
    /// what it had for those).
    pub async fn sync_all(&self) -> Vec<Error> {
        let endpoints: Vec<(usize, Arc<Endpoint>)> = lock_read(&self.slots)
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| Some((i, slot.as_ref()?.endpoint.clone())))
            .collect();
        let mut errors = Vec::new();
        for (index, endpoint) in endpoints {
            if let Err(e) = async {
                endpoint.negotiate().await?;
                self.sync(index, &endpoint).await
            }
            .await
            {
                errors.push(e);
            }
        }
        errors
    }

    async fn follow(&self, index: usize, endpoint: &Arc<Endpoint>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.follow_once(index, endpoint).await {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(e) => {
                    crate::metrics::docker_error(e.op());
                    tracing::warn!(endpoint = %endpoint.url, error = %e, retry_in = ?backoff, "docker endpoint unavailable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Negotiates, lists, then applies events until the stream ends or the resync timer fires.
    async fn follow_once(&self, index: usize, endpoint: &Arc<Endpoint>) -> Result<(), Error> {
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
        self.sync(index, endpoint).await?;
        let resync = tokio::time::sleep(RESYNC);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                _ = &mut resync => return Ok(()),
                event = events.next() => match event {
                    Some(Ok(_)) => self.sync(index, endpoint).await?,
                    Some(Err(e)) => return Err(Error::Unreachable { endpoint: endpoint.url.clone(), reason: e.to_string() }),
                    None => return Err(Error::Unreachable { endpoint: endpoint.url.clone(), reason: "events stream ended".into() }),
                },
            }
        }
    }

    /// Replaces endpoint `index`'s part of the index with a fresh listing (unless it was
    /// removed meanwhile).
    async fn sync(&self, index: usize, endpoint: &Arc<Endpoint>) -> Result<(), Error> {
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
        let slots = lock_read(&self.slots);
        let current = slots
            .get(index)
            .and_then(Option::as_ref)
            .is_some_and(|slot| Arc::ptr_eq(&slot.endpoint, endpoint));
        if current {
            lock_write(&self.benches)[index] = by_name;
        }
        drop(slots);
        self.count_known();
        self.report_conflicts();
        Ok(())
    }
}
