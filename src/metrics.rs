//! Metric names, help texts and the typed helpers that record them.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::Rejection;
use crate::policy::Refused;

/// Connections by how they ended or why they were turned away.
pub const CONNECTIONS_TOTAL: &str = "benchgate_connections_total";
/// Connections open now.
pub const CONNECTIONS_ACTIVE: &str = "benchgate_connections_active";
/// Authentication decisions.
pub const AUTH_TOTAL: &str = "benchgate_auth_total";
/// Requests refused by policy.
pub const REFUSED_REQUESTS_TOTAL: &str = "benchgate_refused_requests_total";
/// Connections the server ended.
pub const DISCONNECTS_TOTAL: &str = "benchgate_disconnects_total";
/// Why the server ends connections: the `reason` labels of [`DISCONNECTS_TOTAL`].
pub const DISCONNECT_REASONS: [&str; 11] = [
    "login_grace_time",
    "expired",
    "revoked",
    "ca_removed",
    "idle",
    "shutdown",
    "stuck",
    "protocol_violation",
    "unresponsive",
    "upgraded",
    "too_many_refusals",
];
/// How sessions end: the `outcome` labels of [`SESSIONS_TOTAL`].
pub const SESSION_OUTCOMES: [&str; 6] = [
    "ok",
    "error",
    "ambiguous",
    "client_closed",
    "ended_by_server",
    "ended_by_operator",
];
/// Requests on the admin socket, by request and result.
pub const ADMIN_REQUESTS_TOTAL: &str = "benchgate_admin_requests_total";
/// The `request` labels of [`ADMIN_REQUESTS_TOTAL`] (`other`: not a request, or not read).
pub const ADMIN_REQUESTS: [&str; 6] = ["sessions", "end", "watch", "status", "takeover", "other"];
/// The `result` labels of [`ADMIN_REQUESTS_TOTAL`].
pub const ADMIN_RESULTS: [&str; 3] = ["ok", "error", "refused"];
/// Bench names in the index.
pub const BENCHES_KNOWN: &str = "benchgate_benches_known";
/// Terminal resizes (`window-change`) dropped because a later one replaced them in time.
pub const RESIZES_DROPPED_TOTAL: &str = "benchgate_resizes_dropped_total";
/// Label conflicts in the index now, by kind (`ambiguous`: a bench name on two or more
/// running containers; `group_names_bench`: a group label equal to a bench name).
pub const LABEL_CONFLICTS: &str = "benchgate_label_conflicts";
/// Docker API failures by operation.
pub const DOCKER_ERRORS_TOTAL: &str = "benchgate_docker_errors_total";
/// Sessions open now.
pub const SESSIONS_ACTIVE: &str = "benchgate_sessions_active";
/// Sessions by kind and outcome.
pub const SESSIONS_TOTAL: &str = "benchgate_sessions_total";
/// Time from a shell/exec request to the process running.
pub const EXEC_START_SECONDS: &str = "benchgate_exec_start_seconds";
/// Session lengths.
pub const SESSION_DURATION_SECONDS: &str = "benchgate_session_duration_seconds";
/// Bytes through sessions.
pub const BYTES_TOTAL: &str = "benchgate_bytes_total";
/// Session recordings that failed (the session went on without one).
pub const RECORDING_FAILURES_TOTAL: &str = "benchgate_recording_failures_total";
/// Configuration reloads by result.
pub const CONFIG_RELOADS_TOTAL: &str = "benchgate_config_reloads_total";
/// Time from accept to successful authentication.
pub const HANDSHAKE_SECONDS: &str = "benchgate_handshake_seconds";
/// Seconds left on certificates at login.
pub const CERT_REMAINING_SECONDS: &str = "benchgate_cert_remaining_seconds";

/// The `op` values of [`DOCKER_ERRORS_TOTAL`].
const DOCKER_OPS: [&str; 9] = [
    "connect",
    "version",
    "list",
    "inspect",
    "exec_create",
    "exec_start",
    "exec_resize",
    "exec_inspect",
    "exec_teardown",
];

/// Histogram buckets for latencies, in seconds.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram buckets for certificate validity left at login, in seconds (1 min to 1 day).
const REMAINING_BUCKETS: &[f64] = &[
    60.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0, 43200.0, 86400.0,
];

/// How a connection ended, or why it was turned away: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It authenticated.
    Authenticated,
    /// It closed without authenticating.
    Unauthenticated,
    /// `login_grace_time` ran out before authentication.
    LoginTimeout,
    /// Turned away: `max_connections`.
    MaxConnections,
    /// Turned away: `max_startups`.
    MaxStartups,
    /// Turned away: `max_startups_per_source`.
    MaxStartupsPerSource,
    /// Turned away: PROXY protocol expected from an address not in `trusted_proxies`.
    UntrustedProxy,
    /// Turned away: no valid PROXY header.
    ProxyHeader,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Self::Authenticated,
        Self::Unauthenticated,
        Self::LoginTimeout,
        Self::MaxConnections,
        Self::MaxStartups,
        Self::MaxStartupsPerSource,
        Self::UntrustedProxy,
        Self::ProxyHeader,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Authenticated => "authenticated",
            Self::Unauthenticated => "unauthenticated",
            Self::LoginTimeout => "login_timeout",
            Self::MaxConnections => "max_connections",
            Self::MaxStartups => "max_startups",
            Self::MaxStartupsPerSource => "max_startups_per_source",
            Self::UntrustedProxy => "untrusted_proxy",
            Self::ProxyHeader => "proxy_header",
        }
    }
}

/// Installs the Prometheus recorder (process-wide, once) and describes every metric with its
/// label values at zero. Serve what it records with [`serve`].
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(CERT_REMAINING_SECONDS.into()),
            REMAINING_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Longest HTTP request head read on the metrics endpoint.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// What `/health` reports: `None` when healthy, else why not (answered with 503).
pub type Health = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Connections the endpoint holds at once; more wait for a place. Each costs a task and a
/// file descriptor, so hundreds of idle connections (a scanner, a misconfigured prober) must
/// not keep a load balancer's `/health` from an answer.
const MAX_REQUESTS: usize = 1024;
/// How long a connection has to send its request head: an idle one gives its place back
/// soon.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the answer may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` (Prometheus text) and `GET /health` on `listener` until `stop` (the
/// listener went to a new daemon) or the process ends; anything else gets 404.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Health,
    stop: tokio_util::sync::CancellationToken,
) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_REQUESTS));
    loop {
        let Ok(place) = places.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (handle, health) = (handle.clone(), health.clone());
        tokio::spawn(async move {
            let _ = answer(stream, &handle, &health).await;
            drop(place);
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    health: &Health,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    };
    tokio::time::timeout(HEAD_TIMEOUT, read_head).await??;
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, kind, body) = match line {
        b"GET /metrics HTTP/1.1" | b"GET /metrics HTTP/1.0" => {
            ("200 OK", "text/plain; version=0.0.4", handle.render())
        }
        b"GET /health HTTP/1.1" | b"GET /health HTTP/1.0" => match health() {
            None => ("200 OK", "text/plain", "ok\n".to_owned()),
            Some(problem) => (
                "503 Service Unavailable",
                "text/plain",
                format!("{problem}\n"),
            ),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write).await?
}

fn describe() {
    describe_counter!(CONNECTIONS_TOTAL, "SSH connections by outcome");
    describe_gauge!(CONNECTIONS_ACTIVE, "SSH connections open now");
    describe_counter!(AUTH_TOTAL, "Authentication decisions by result and reason");
    describe_counter!(
        REFUSED_REQUESTS_TOTAL,
        "Requests refused by policy, by request"
    );
    describe_counter!(
        DISCONNECTS_TOTAL,
        "Connections ended by the server, by reason"
    );
    describe_histogram!(HANDSHAKE_SECONDS, "Seconds from accept to authentication");
    describe_histogram!(CERT_REMAINING_SECONDS, "Certificate validity left at login");
    describe_gauge!(BENCHES_KNOWN, "Bench names in the index");
    describe_counter!(
        RESIZES_DROPPED_TOTAL,
        "Terminal resizes dropped for a later one (at most 4 are passed on per second)"
    );
    describe_gauge!(
        LABEL_CONFLICTS,
        "Label conflicts in the bench index (ambiguous benches are refused)"
    );
    describe_counter!(DOCKER_ERRORS_TOTAL, "Docker API failures by operation");
    describe_gauge!(SESSIONS_ACTIVE, "Sessions open now, by kind");
    describe_counter!(SESSIONS_TOTAL, "Sessions by kind and outcome");
    describe_histogram!(
        EXEC_START_SECONDS,
        "Seconds from a shell or exec request to the process running"
    );
    describe_histogram!(SESSION_DURATION_SECONDS, "Session lengths in seconds");
    describe_counter!(BYTES_TOTAL, "Bytes through sessions, by direction");
    describe_counter!(
        RECORDING_FAILURES_TOTAL,
        "Session recordings that failed; the session went on"
    );
    counter!(RECORDING_FAILURES_TOTAL).absolute(0);
    for outcome in Outcome::ALL {
        counter!(CONNECTIONS_TOTAL, "outcome" => outcome.label()).absolute(0);
    }
    gauge!(CONNECTIONS_ACTIVE).set(0.0);
    counter!(AUTH_TOTAL, "result" => "accepted", "reason" => "ok").absolute(0);
    for reason in Rejection::LABELS {
        counter!(AUTH_TOTAL, "result" => "rejected", "reason" => reason).absolute(0);
    }
    for request in Refused::ALL {
        counter!(REFUSED_REQUESTS_TOTAL, "request" => request.label()).absolute(0);
    }
    for kind in ["shell", "exec"] {
        gauge!(SESSIONS_ACTIVE, "kind" => kind).set(0.0);
        for outcome in SESSION_OUTCOMES {
            counter!(SESSIONS_TOTAL, "kind" => kind, "outcome" => outcome).absolute(0);
        }
    }
    for direction in ["in", "out"] {
        counter!(BYTES_TOTAL, "direction" => direction).absolute(0);
    }
    for op in DOCKER_OPS {
        counter!(DOCKER_ERRORS_TOTAL, "op" => op).absolute(0);
    }
    for reason in DISCONNECT_REASONS {
        counter!(DISCONNECTS_TOTAL, "reason" => reason).absolute(0);
    }
    gauge!(BENCHES_KNOWN).set(0.0);
    counter!(RESIZES_DROPPED_TOTAL).absolute(0);
    label_conflicts(0, 0);
    // Registering a histogram exports its (empty) buckets before the first observation.
    for name in [
        HANDSHAKE_SECONDS,
        EXEC_START_SECONDS,
        SESSION_DURATION_SECONDS,
        CERT_REMAINING_SECONDS,
    ] {
        let _ = histogram!(name);
    }
    describe_counter!(
        ADMIN_REQUESTS_TOTAL,
        "Requests on the admin socket, by request and result"
    );
    for request in ADMIN_REQUESTS {
        for result in ADMIN_RESULTS {
            counter!(ADMIN_REQUESTS_TOTAL, "request" => request, "result" => result).absolute(0);
        }
    }
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Configuration reloads (SIGHUP) by result"
    );
    for result in ["ok", "error"] {
        counter!(CONFIG_RELOADS_TOTAL, "result" => result).absolute(0);
    }
}

/// A connection ended or was turned away.
pub fn connection(outcome: Outcome) {
    counter!(CONNECTIONS_TOTAL, "outcome" => outcome.label()).increment(1);
}

/// Tracks one open connection in [`CONNECTIONS_ACTIVE`] until dropped.
#[derive(Debug)]
pub struct ActiveConnection(());

impl ActiveConnection {
    /// Counts a connection as open.
    pub fn open() -> Self {
        gauge!(CONNECTIONS_ACTIVE).increment(1.0);
        Self(())
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        gauge!(CONNECTIONS_ACTIVE).decrement(1.0);
    }
}

/// A certificate was accepted `handshake` after accept, with `remaining` validity.
pub fn auth_accepted(handshake: Duration, remaining_seconds: u64) {
    counter!(AUTH_TOTAL, "result" => "accepted", "reason" => "ok").increment(1);
    histogram!(HANDSHAKE_SECONDS).record(handshake.as_secs_f64());
    histogram!(CERT_REMAINING_SECONDS).record(remaining_seconds as f64);
}

/// A login attempt was refused.
pub fn auth_rejected(reason: &Rejection) {
    counter!(AUTH_TOTAL, "result" => "rejected", "reason" => reason.label()).increment(1);
}

/// A request was refused by policy.
pub fn refused(request: Refused) {
    counter!(REFUSED_REQUESTS_TOTAL, "request" => request.label()).increment(1);
}

/// The server ended a connection.
pub fn disconnect(reason: &'static str) {
    counter!(DISCONNECTS_TOTAL, "reason" => reason).increment(1);
}

/// The index knows `count` bench names.
pub fn benches_known(count: usize) {
    gauge!(BENCHES_KNOWN).set(count as f64);
}

/// A terminal resize was dropped: a later one replaced it before it was due.
pub fn resize_dropped() {
    counter!(RESIZES_DROPPED_TOTAL).increment(1);
}

/// The label conflicts in the index now.
pub fn label_conflicts(ambiguous: usize, group_names_bench: usize) {
    gauge!(LABEL_CONFLICTS, "kind" => "ambiguous").set(ambiguous as f64);
    gauge!(LABEL_CONFLICTS, "kind" => "group_names_bench").set(group_names_bench as f64);
}

/// A Docker API operation failed.
pub fn docker_error(op: &'static str) {
    counter!(DOCKER_ERRORS_TOTAL, "op" => op).increment(1);
}

/// A session's process started `elapsed` after it was requested.
pub fn exec_started(elapsed: Duration) {
    histogram!(EXEC_START_SECONDS).record(elapsed.as_secs_f64());
}

/// Tracks one open session in [`SESSIONS_ACTIVE`] until dropped.
#[derive(Debug)]
pub struct ActiveSession(&'static str);

impl ActiveSession {
    /// Counts a session of `kind` ("shell" or "exec") as open.
    pub fn open(kind: &'static str) -> Self {
        gauge!(SESSIONS_ACTIVE, "kind" => kind).increment(1.0);
        Self(kind)
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        gauge!(SESSIONS_ACTIVE, "kind" => self.0).decrement(1.0);
    }
}

/// A session of `kind` ended: `outcome` is one of [`SESSION_OUTCOMES`].
pub fn session_ended(
    kind: &'static str,
    outcome: &'static str,
    duration: Duration,
    bytes_in: u64,
    bytes_out: u64,
) {
    counter!(SESSIONS_TOTAL, "kind" => kind, "outcome" => outcome).increment(1);
    histogram!(SESSION_DURATION_SECONDS).record(duration.as_secs_f64());
    counter!(BYTES_TOTAL, "direction" => "in").increment(bytes_in);
    counter!(BYTES_TOTAL, "direction" => "out").increment(bytes_out);
}

/// A SIGHUP reload succeeded or failed.
pub fn config_reload(ok: bool) {
    counter!(CONFIG_RELOADS_TOTAL, "result" => if ok { "ok" } else { "error" }).increment(1);
}

/// A request on the admin socket was answered (`result`: "ok", "error" or "refused").
pub fn admin_request(request: &'static str, result: &'static str) {
    counter!(ADMIN_REQUESTS_TOTAL, "request" => request, "result" => result).increment(1);
}

/// A session recording failed.
pub fn recording_failed() {
    counter!(RECORDING_FAILURES_TOTAL).increment(1);
}
