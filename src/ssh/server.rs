//! The accept loop: connection and pre-auth limits, the login grace deadline, orderly shutdown.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use russh::keys::ssh_key::{Algorithm, PrivateKey};
use russh::server::Config as SshConfig;
use russh::{Disconnect, MethodKind, MethodSet, Preferred, SshId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::channel::BenchSlots;
use super::ledger::Ledger;
use super::lifetime::{self, Ended, Link, Notice};
use super::prechecks::{Sink, Watch};
use super::session::Connection;
use crate::audit::{Audit, Event, Kind};
use crate::config::{Config, Net};
use crate::docker::Index;
use crate::metrics::{self, Outcome};
use crate::proxy_protocol;
use crate::settings::Settings;

/// Everything connections share: policy, audit sink, SSH settings and limits.
pub struct Shared {
    /// Settings that SIGHUP and the revocation file replace.
    pub settings: watch::Sender<Arc<Settings>>,
    /// Where audit events go.
    pub audit: Audit,
    /// The bench index across Docker endpoints.
    pub benches: Arc<Index>,
    /// Sessions per bench.
    pub bench_slots: BenchSlots,
    /// Channels one connection may have open.
    pub max_sessions_per_connection: usize,
    /// Load balancers allowed to send PROXY headers, when the protocol is on.
    pub trusted_proxies: Option<Vec<Net>>,
    /// Background work (session teardown) that shutdown waits for.
    pub tracker: TaskTracker,
    ssh: Arc<SshConfig>,
    login_grace: Duration,
    shutdown_grace: Duration,
    max_startups: u32,
    max_startups_per_source: u32,
    max_connections: u32,
}

/// How long a rejected authentication attempt is answered after, at the least.
const AUTH_REJECTION_TIME: Duration = Duration::from_millis(20);

impl Shared {
    /// Why this bastion cannot serve logins now, if it cannot (for `/health`).
    pub fn health(&self) -> Option<String> {
        match &self.settings().trust.revocation {
            crate::auth::revocation::Revocation::Unavailable { reason, .. } => Some(format!(
                "revocation list unavailable, every login is refused: {reason}"
            )),
            _ => None,
        }
    }

    /// The settings in force now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

    /// Shared state for a server run by `config`, with its trust set, audit sink and host keys.
    pub fn new(
        config: &Config,
        settings: watch::Sender<Arc<Settings>>,
        audit: Audit,
        host_keys: Vec<PrivateKey>,
        benches: Arc<Index>,
    ) -> Self {
        let server = &config.server;
        let defaults = Preferred::default();
        let preferred = Preferred {
            // Never advertise SHA-1 `ssh-rsa` as a host key algorithm.
            key: defaults
                .key
                .iter()
                .filter(|a| **a != Algorithm::Rsa { hash: None })
                .cloned()
                .collect(),
            ..defaults
        };
        let ssh = SshConfig {
            server_id: SshId::Standard(
                concat!("SSH-2.0-benchgate_", env!("CARGO_PKG_VERSION")).into(),
            ),
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            auth_rejection_time: AUTH_REJECTION_TIME,
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: host_keys,
            max_auth_attempts: server.max_auth_tries.get() as usize,
            // Idle shells are ended by keepalives and idle_timeout, not by russh's default.
            inactivity_timeout: None,
            keepalive_interval: server.keepalive_interval.nonzero(),
            keepalive_max: 3,
            preferred,
            ..SshConfig::default()
        };
        Self {
            settings,
            audit,
            benches,
            bench_slots: BenchSlots::new(config.session.max_sessions_per_bench.get() as usize),
            max_sessions_per_connection: server.max_sessions_per_connection.get() as usize,
            trusted_proxies: server
                .proxy_protocol
                .then(|| server.trusted_proxies.clone()),
            tracker: TaskTracker::new(),
            ssh: Arc::new(ssh),
            login_grace: server.login_grace_time.0,
            shutdown_grace: server.shutdown_grace.0,
            max_startups: server.max_startups.get(),
            max_startups_per_source: server.max_startups_per_source.get(),
            max_connections: server.max_connections.get(),
        }
    }
}

/// Serves SSH on `listeners` until `shutdown` is cancelled and every connection has ended.
pub async fn serve(shared: Arc<Shared>, listeners: Vec<TcpListener>, shutdown: CancellationToken) {
    let gate = Arc::new(Gate {
        connections: Arc::new(Semaphore::new(shared.max_connections as usize)),
        startups: Arc::new(Startups {
            global: Arc::new(Semaphore::new(shared.max_startups as usize)),
            per_source: Mutex::default(),
            per_source_max: shared.max_startups_per_source,
        }),
        tracker: TaskTracker::new(),
        shared,
        shutdown,
    });
    let mut accepts = tokio::task::JoinSet::new();
    for listener in listeners {
        accepts.spawn(accept_loop(gate.clone(), listener));
    }
    while accepts.join_next().await.is_some() {}
    gate.tracker.close();
    gate.tracker.wait().await;
    // Sessions and teardowns still running (they end the sessions' container processes); each
    // Docker call is bounded, so this is too, but never wait forever on shutdown.
    gate.shared.tracker.close();
    let limit = gate.shared.shutdown_grace + Duration::from_secs(30);
    if tokio::time::timeout(limit, gate.shared.tracker.wait())
        .await
        .is_err()
    {
        tracing::error!("session teardown did not finish in time; exiting anyway");
    }
}

struct Gate {
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    startups: Arc<Startups>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

async fn accept_loop(gate: Arc<Gate>, listener: TcpListener) {
    let mut next_conn: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = gate.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // russh sets TCP_NODELAY only on sockets it accepts itself; without it every
        // handshake and session start waits out delayed ACKs (about 40 ms each time).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        // Connections turned away are closed before the SSH version exchange.
        let Ok(permit) = gate.connections.clone().try_acquire_owned() else {
            turn_away(peer, Outcome::MaxConnections);
            continue;
        };
        next_conn += 1;
        let span = tracing::info_span!("conn", conn = next_conn, %peer);
        let gate2 = gate.clone();
        gate.tracker.spawn(
            async move {
                let accepted = Instant::now();
                let (mut stream, mut peer) = (stream, peer);
                if let Some(trusted) = &gate2.shared.trusted_proxies {
                    match client_behind_proxy(&mut stream, peer, trusted, gate2.shared.login_grace)
                        .await
                    {
                        Ok(client) => peer = client,
                        Err(outcome) => return turn_away(peer, outcome),
                    }
                }
                match gate2.startups.claim(peer.ip()) {
                    Ok(slot) => connection(&gate2, stream, peer, slot, accepted).await,
                    Err(outcome) => turn_away(peer, outcome),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// The real client address from the PROXY header a trusted load balancer sends first; a
/// header that names none (a health check) leaves the balancer's own address.
async fn client_behind_proxy(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &[Net],
    limit: Duration,
) -> Result<SocketAddr, Outcome> {
    if !trusted.iter().any(|net| net.contains(peer.ip())) {
        return Err(Outcome::UntrustedProxy);
    }
    match tokio::time::timeout(limit, proxy_protocol::read_header(stream)).await {
        Ok(Ok(client)) => Ok(client.unwrap_or(peer)),
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "bad PROXY header");
            Err(Outcome::ProxyHeader)
        }
        Err(_) => Err(Outcome::ProxyHeader),
    }
}

fn turn_away(peer: SocketAddr, outcome: Outcome) {
    tracing::warn!(%peer, reason = outcome.label(), "connection turned away");
    metrics::connection(outcome);
}

/// Serves one connection from `peer` (the real client, behind a proxy too), accepted at
/// `started`: the login grace counts from then.
async fn connection(
    gate: &Gate,
    stream: TcpStream,
    peer: SocketAddr,
    slot: StartupSlot,
    started: Instant,
) {
    let shared = &gate.shared;
    let _active = metrics::ActiveConnection::open();
    let deadline = started + shared.login_grace;
    let ledger = Arc::new(Ledger::default());
    let sink: Arc<dyn Sink> = ledger.clone();
    let kill = CancellationToken::new();
    let stream = Guarded::new(stream, kill.clone(), Watch::new(&sink));
    let link = Arc::new(Link::default());
    let (on_auth, mut authenticated) = oneshot::channel();
    let handler = Connection::new(
        shared.clone(),
        peer,
        ledger.clone(),
        link.clone(),
        slot,
        on_auth,
    );

    let mut end = Ended::Closed;
    let mut grant = None;
    let start = tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(shared.ssh.clone(), stream, handler),
    );
    let running = tokio::select! {
        started = start => match started {
            Ok(Ok(running)) => Some(running),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "ssh version exchange failed");
                None
            }
            Err(_) => {
                end = Ended::LoginGrace;
                None
            }
        },
        _ = gate.shutdown.cancelled() => {
            end = Ended::Shutdown;
            None
        }
    };
    if let Some(running) = running {
        let handle = running.handle();
        tokio::pin!(running);
        // `running` must not be polled again once it has finished.
        let mut finished = tokio::select! {
            _ = &mut running => true,
            Ok(g) = &mut authenticated => {
                grant = Some(g);
                false
            }
            _ = tokio::time::sleep_until(deadline) => {
                end = Ended::LoginGrace;
                false
            }
            _ = gate.shutdown.cancelled() => {
                end = Ended::Shutdown;
                false
            }
        };
        // Both may be ready at once; the grant is sent before the session can end.
        if grant.is_none() {
            grant = authenticated.try_recv().ok();
        }
        if let (Some(grant), false) = (&grant, finished) {
            let closed = async {
                let _ = (&mut running).await;
            };
            end = lifetime::supervise(shared, grant, &link, closed, &gate.shutdown).await;
            finished = end == Ended::Closed;
            if end == Ended::Shutdown {
                let grace = shared.shutdown_grace;
                link.tell(Notice::Tell(format!(
                    "benchgate: the bastion is shutting down; this connection ends within {}",
                    lifetime::spoken(grace)
                )));
                finished = tokio::time::timeout(grace, &mut running).await.is_ok();
            }
            if !finished {
                // Sessions print the reason and close their channels, then the connection goes.
                link.tell(Notice::End(end.message().to_owned()));
                link.sessions_done(Duration::from_secs(2)).await;
                let _ = handle
                    .disconnect(
                        Disconnect::ByApplication,
                        end.message().to_owned(),
                        "en".into(),
                    )
                    .await;
                finished = tokio::time::timeout(Duration::from_secs(2), &mut running)
                    .await
                    .is_ok();
            }
        }
        if !finished {
            // Whatever is left is cut: a dead stream ends russh's session within moments.
            kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut running).await;
        }
    }

    link.close();
    ledger.finish(shared, peer, grant.is_some());
    let outcome = match (&grant, end) {
        (Some(_), _) => Outcome::Authenticated,
        (None, Ended::LoginGrace) => Outcome::LoginTimeout,
        (None, _) => Outcome::Unauthenticated,
    };
    metrics::connection(outcome);
    if end != Ended::Closed {
        metrics::disconnect(end.label());
    }
    tracing::info!(
        reason = end.label(),
        outcome = outcome.label(),
        "connection closed"
    );
    let mut event = Event::new(Kind::ConnectionClosed, peer)
        .reason(end.label())
        .duration_ms(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    if let Some(grant) = &grant {
        event =
            event
                .bench(&grant.bench)
                .certificate(&grant.key_id, grant.serial, grant.ca.clone());
    }
    shared.audit.record(&event);
}

/// Unauthenticated connections, in all and per source address.
struct Startups {
    global: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    per_source_max: u32,
}

/// One unauthenticated connection's place in `max_startups`; freed on drop.
pub struct StartupSlot {
    _permit: OwnedSemaphorePermit,
    startups: Arc<Startups>,
    ip: IpAddr,
}

impl Startups {
    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.per_source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn claim(self: &Arc<Self>, ip: IpAddr) -> Result<StartupSlot, Outcome> {
        let ip = ip.to_canonical();
        let mut sources = self.sources();
        let count = sources.entry(ip).or_insert(0);
        if *count >= self.per_source_max {
            return Err(Outcome::MaxStartupsPerSource);
        }
        let permit = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| Outcome::MaxStartups)?;
        *count += 1;
        Ok(StartupSlot {
            _permit: permit,
            startups: self.clone(),
            ip,
        })
    }
}

impl Drop for StartupSlot {
    fn drop(&mut self) {
        let mut sources = self.startups.sources();
        if let Some(count) = sources.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

/// A TCP stream that fails every read and write once its kill token is cancelled, so a
/// connection can be cut whatever state russh is in, and that tells the precheck watch which
/// tasks drive it.
struct Guarded {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    watch: Watch,
}

impl Guarded {
    fn new(inner: TcpStream, kill: CancellationToken, watch: Watch) -> Self {
        Self {
            inner,
            killed: Box::pin(kill.cancelled_owned()),
            watch,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.watch.note_task();
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection cut by benchgate",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

use std::future::Future as _;

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
