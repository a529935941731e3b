//! The accept loop: connection and pre-auth limits, the PROXY gate, orderly shutdown; one
//! [`connection::run`] per accepted socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::Algorithm;
use russh::server::Config as SshConfig;
use russh::{kex, MethodKind, MethodSet, Preferred, SshId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::connection;
use crate::app::App;
use crate::config::Net;
use crate::limits::{Place, Quota};
use crate::metrics::{self, Outcome};
use crate::proxy_protocol;

/// Unanswered keepalives after which russh ends a connection.
pub(super) const KEEPALIVE_MAX: u32 = 3;
/// How long a rejected authentication attempt is answered after, at the least.
const AUTH_REJECTION_TIME: Duration = Duration::from_millis(20);

/// The key exchange methods offered: only those that cost the daemon a few milliseconds of
/// CPU before authentication (README, "Key exchange"). Finite-field Diffie-Hellman with
/// russh's big integers costs 100 ms to 1 s per connection for groups 16 and 18 and for
/// group exchange, so a handful of unauthenticated sockets could hold the CPU (DHEat).
const KEX: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::ECDH_SHA2_NISTP256,
    kex::ECDH_SHA2_NISTP384,
    kex::ECDH_SHA2_NISTP521,
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// russh's settings for `app`: publickey only, no SHA-1 host key signatures, keepalives
/// instead of an inactivity timeout.
fn ssh_config(app: &App) -> SshConfig {
    let server = &app.server;
    let defaults = Preferred::default();
    let preferred = Preferred {
        kex: KEX.into(),
        // Never advertise SHA-1 `ssh-rsa` as a host key algorithm.
        key: defaults
            .key
            .iter()
            .filter(|a| **a != Algorithm::Rsa { hash: None })
            .cloned()
            .collect(),
        ..defaults
    };
    SshConfig {
        server_id: SshId::Standard(concat!("SSH-2.0-benchgate_", env!("CARGO_PKG_VERSION")).into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: AUTH_REJECTION_TIME,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: app.host_keys.clone(),
        max_auth_attempts: server.max_auth_tries.get() as usize,
        // Idle shells are ended by keepalives and idle_timeout, not by russh's default.
        inactivity_timeout: None,
        keepalive_interval: server.keepalive_interval.nonzero(),
        keepalive_max: KEEPALIVE_MAX as usize,
        window_size: crate::flow::WINDOW_BYTES,
        preferred,
        ..SshConfig::default()
    }
}

pub async fn serve(app: Arc<App>, listeners: Vec<TcpListener>, shutdown: CancellationToken) {
    let server = &app.server;
    let gate = Arc::new(Gate {
        connections: Arc::new(Semaphore::new(server.max_connections.get() as usize)),
        startups: Startups {
            global: Arc::new(Semaphore::new(server.max_startups.get() as usize)),
            per_source: Quota::new(server.max_startups_per_source.get()),
        },
        tracker: TaskTracker::new(),
        ssh: Arc::new(ssh_config(&app)),
        app,
        shutdown,
    });
    let mut accepts = tokio::task::JoinSet::new();
    for listener in listeners {
        accepts.spawn(accept_loop(gate.clone(), listener));
    }
    while accepts.join_next().await.is_some() {}
    gate.tracker.close();
    if !gate.shutdown.is_cancelled() {
        // The listeners went to a new daemon: live connections run on until they end, the
        // drain limit passes, or SIGTERM; then what is left ends as on shutdown.
        let limit = gate.app.server.drain_limit.nonzero();
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        tokio::select! {
            () = gate.tracker.wait() => {}
            () = tokio::time::sleep(limit.unwrap_or(far)) => {
                tracing::info!(?limit, "drain limit reached: ending the remaining connections");
            }
            () = gate.shutdown.cancelled() => {}
        }
        gate.shutdown.cancel();
    }
    gate.tracker.wait().await;
    // Sessions and teardowns still running (they end the sessions' container processes); each
    // Docker call is bounded, so this is too, but never wait forever on shutdown.
    gate.app.tracker.close();
    let limit = gate.app.shutdown_grace() + Duration::from_secs(30);
    if tokio::time::timeout(limit, gate.app.tracker.wait())
        .await
        .is_err()
    {
        tracing::error!("session teardown did not finish in time; exiting anyway");
    }
}

/// What the accept loops share.
pub(super) struct Gate {
    pub app: Arc<App>,
    pub ssh: Arc<SshConfig>,
    pub shutdown: CancellationToken,
    connections: Arc<Semaphore>,
    startups: Startups,
    tracker: TaskTracker,
}

async fn accept_loop(gate: Arc<Gate>, listener: TcpListener) {
    let mut next_conn: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = gate.shutdown.cancelled() => return,
            _ = gate.app.handover.stop_accepting.cancelled() => return,
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
                if let Some(trusted) = &gate2.app.trusted_proxies {
                    match client_behind_proxy(&mut stream, peer, trusted, gate2.app.login_grace())
                        .await
                    {
                        Ok(client) => peer = client,
                        Err(outcome) => return turn_away(peer, outcome),
                    }
                }
                match gate2.startups.claim(peer.ip()) {
                    Ok(slot) => connection::run(&gate2, stream, peer, slot, accepted).await,
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

/// Unauthenticated connections, in all and per source address.
struct Startups {
    global: Arc<Semaphore>,
    per_source: Quota<IpAddr>,
}

/// One unauthenticated connection's place in `max_startups`; freed on drop.
pub struct StartupSlot {
    _global: OwnedSemaphorePermit,
    _source: Place<IpAddr>,
}

impl Startups {
    fn claim(&self, ip: IpAddr) -> Result<StartupSlot, Outcome> {
        let source = self
            .per_source
            .claim(&ip.to_canonical())
            .ok_or(Outcome::MaxStartupsPerSource)?;
        let global = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| Outcome::MaxStartups)?;
        Ok(StartupSlot {
            _global: global,
            _source: source,
        })
    }
}
