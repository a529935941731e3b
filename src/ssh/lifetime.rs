//! What ends an authenticated connection besides the client: certificate expiry (with
//! warnings before it), revocation or a removed CA, idleness, and shutdown.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::auth::{cert::still_valid, Grant, Rejection};
use crate::clock::Activity;
use crate::flow::Flow;
use crate::live::Live;
use crate::settings::Settings;

/// How often idleness and stuck input are checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a draining daemon keeps a connection that holds no session.
const DRAIN_IDLE: Duration = Duration::from_secs(10);

/// A message from the connection to its sessions, which carry on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Print this line at a terminal (scripts' stderr is left alone).
    Warn(String),
    /// Print this line in every session.
    Tell(String),
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it (not the server's doing).
    Closed,
    /// `login_grace_time` passed before authentication.
    LoginGrace,
    /// The certificate expired.
    Expired,
    /// The certificate, its key or its CA was revoked.
    Revoked,
    /// Its CA is no longer trusted (removed by a reload).
    CaRemoved,
    /// No traffic for `idle_timeout`.
    Idle,
    /// The bastion is shutting down.
    Shutdown,
    /// Input held for the connection's sessions did not move for `stuck_timeout`.
    Stuck,
    /// The client sent more than its window allowed.
    ProtocolViolation,
    /// The client read nothing for longer than its keepalives allow.
    Unresponsive,
    /// The daemon handed its listeners to a new one and the connection had no session.
    Upgraded,
    /// The client kept asking for what is refused (forwarding, file transfer...).
    TooManyRefusals,
}

impl Ended {
    /// The `reason` of the audit event and of `benchgate_disconnects_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::LoginGrace => "login_grace_time",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::CaRemoved => "ca_removed",
            Self::Idle => "idle",
            Self::Shutdown => "shutdown",
            Self::Stuck => "stuck",
            Self::ProtocolViolation => "protocol_violation",
            Self::Upgraded => "upgraded",
            Self::TooManyRefusals => "too_many_refusals",
            Self::Unresponsive => "unresponsive",
        }
    }

    /// What the person is told.
    pub fn message(self) -> &'static str {
        match self {
            Self::Closed => "benchgate: connection closed",
            Self::LoginGrace => "benchgate: authentication took too long",
            Self::Expired => "benchgate: your certificate has expired; closing the connection",
            Self::Revoked => "benchgate: your certificate has been revoked; closing the connection",
            Self::CaRemoved => {
                "benchgate: your certificate's CA is no longer trusted; closing the connection"
            }
            Self::Idle => "benchgate: no activity for too long; closing the connection",
            Self::Shutdown => "benchgate: the bastion is shutting down; closing the connection",
            Self::Stuck => {
                "benchgate: the session's command stopped reading its input while more kept arriving; closing the connection"
            }
            Self::ProtocolViolation => {
                "benchgate: the client sent more data than it was allowed to; closing the connection"
            }
            Self::Unresponsive => "benchgate: the client stopped reading; closing the connection",
            Self::Upgraded => "benchgate: the bastion was upgraded; connect again",
            Self::TooManyRefusals => {
                "benchgate: too many refused requests (forwarding, agent, X11 and file transfer are not available here); closing the connection"
            }
        }
    }
}

/// What one connection's sessions share with it: notices, the end of the connection in its
/// two steps (sessions told to end, then the connection gone), a session's request to end the
/// connection, and when traffic last passed.
#[derive(Debug)]
pub struct Link {
    notices: broadcast::Sender<Notice>,
    activity: Activity,
    sessions: AtomicU64,
    /// Sessions end now, for this reason.
    ending: (CancellationToken, Mutex<Ended>),
    /// Asked to end the connection (a stuck session, a protocol violation).
    requested: (CancellationToken, Mutex<Option<Ended>>),
    gone: CancellationToken,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            notices: broadcast::channel(16).0,
            activity: Activity::default(),
            sessions: AtomicU64::new(0),
            ending: (CancellationToken::new(), Mutex::new(Ended::Closed)),
            requested: (CancellationToken::new(), Mutex::new(None)),
            gone: CancellationToken::new(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One running session of a connection; see [`Link::sessions_done`].
#[derive(Debug)]
pub struct SessionMark(Arc<Link>);

impl Drop for SessionMark {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Link {
    /// Notices from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Sends `notice` to every session of the connection.
    pub fn tell(&self, notice: Notice) {
        let _ = self.notices.send(notice);
    }

    /// Records traffic now.
    pub fn touch(&self) {
        self.activity.touch();
    }

    /// Asks the connection to end for `why` (the first reason asked wins).
    pub fn request_end(&self, why: Ended) {
        lock(&self.requested.1).get_or_insert(why);
        self.requested.0.cancel();
    }

    /// Why the connection was asked to end, if it was.
    pub fn requested(&self) -> Option<Ended> {
        *lock(&self.requested.1)
    }

    /// Tells every session to end now for `why`, saying so to the person.
    pub fn end_sessions(&self, why: Ended) {
        *lock(&self.ending.1) = why;
        self.ending.0.cancel();
    }

    /// Resolves with the reason once the sessions must end.
    pub async fn ending(&self) -> Ended {
        self.ending.0.cancelled().await;
        *lock(&self.ending.1)
    }

    /// Resolves once the sessions must end or the connection is over.
    pub async fn ended(&self) {
        tokio::select! {
            () = self.ending.0.cancelled() => {}
            () = self.gone.cancelled() => {}
        }
    }

    /// Marks the connection as over: sessions still running stop waiting on the client.
    pub fn close(&self) {
        self.gone.cancel();
    }

    /// Resolves once the connection is over.
    pub async fn closed(&self) {
        self.gone.cancelled().await;
    }

    /// Counts a session as running until the mark is dropped.
    pub fn session(self: &Arc<Self>) -> SessionMark {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        SessionMark(self.clone())
    }

    /// Waits (at most `limit`) until no session of the connection runs.
    pub async fn sessions_done(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.sessions.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn running_sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    fn idle_for(&self) -> Duration {
        self.activity.idle_for()
    }
}

/// A writer that records activity on `link` and what went out in the session's `live`.
pub struct Touching<W> {
    inner: W,
    link: Arc<Link>,
    live: Arc<Live>,
}

impl<W> Touching<W> {
    /// Wraps `inner`, counting what is written in `live`.
    pub fn new(inner: W, link: Arc<Link>, live: Arc<Live>) -> Self {
        Self { inner, link, live }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Touching<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        // Only bytes that went out count as activity: a write polled again while the client
        // reads nothing is not.
        if let Poll::Ready(Ok(n)) = written {
            self.link.touch();
            self.live.sent(&buf[..n]);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The instant `unix` seconds happen, on a clock that read `now` (Unix seconds) at `start`, or
/// `None` when that is too far away to matter.
fn instant_at(unix: u64, now: u64, start: Instant) -> Option<Instant> {
    const FAR: u64 = 100 * 365 * 24 * 3600;
    let wait = unix.saturating_sub(now);
    (wait < FAR).then(|| start + Duration::from_secs(wait))
}

/// "10 minutes", "1 minute", "30 seconds".
pub fn spoken(lead: Duration) -> String {
    let secs = lead.as_secs();
    let (n, unit) = if secs >= 3600 && secs.is_multiple_of(3600) {
        (secs / 3600, "hour")
    } else if secs >= 60 && secs.is_multiple_of(60) {
        (secs / 60, "minute")
    } else {
        (secs, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Why `grant` may no longer keep its connection under `settings`, if it may not.
fn recheck(grant: &Grant, settings: &Settings) -> Option<Ended> {
    match still_valid(&grant.certificate, &settings.trust) {
        Ok(()) => None,
        Err(Rejection::Revoked) => Some(Ended::Revoked),
        Err(_) => Some(Ended::CaRemoved),
    }
}

/// Watches an authenticated connection until `closed` resolves (the client or russh ended
/// it) or the server must end it, sending expiry warnings on the way. `now` is the Unix time
/// at the call; later times are measured on tokio's clock from there (so tests can pause it).
pub async fn supervise(
    app: &App,
    grant: &Grant,
    link: &Link,
    closed: impl std::future::Future<Output = ()>,
    shutdown: &CancellationToken,
    flow: &Flow,
    now: u64,
) -> Ended {
    let start = Instant::now();
    tokio::pin!(closed);
    let mut settings_changes = app.settings.subscribe();
    let settings = app.settings();
    // Trust may have changed between the login's check and this subscription.
    if let Some(ended) = recheck(grant, &settings) {
        return ended;
    }
    // Warnings whose moment has already passed at login are skipped.
    let mut warnings: Vec<Duration> = settings
        .expiry_warnings
        .iter()
        .copied()
        .filter(|lead| grant.valid_before.saturating_sub(now) > lead.as_secs())
        .collect();
    let expiry = instant_at(grant.valid_before, now, start);
    let far = Instant::now() + Duration::from_secs(3600 * 24 * 365);
    loop {
        let settings = app.settings();
        let next_warning = warnings.first().and_then(|lead| {
            instant_at(
                grant.valid_before.saturating_sub(lead.as_secs()),
                now,
                start,
            )
        });
        let idle_timeout = settings.idle_timeout;
        tokio::select! {
            _ = &mut closed => return link.requested().unwrap_or(Ended::Closed),
            _ = link.requested.0.cancelled() => return link.requested().unwrap_or(Ended::Closed),
            _ = shutdown.cancelled() => return Ended::Shutdown,
            _ = tokio::time::sleep_until(next_warning.unwrap_or(far)), if next_warning.is_some() => {
                let lead = warnings.remove(0);
                link.tell(Notice::Warn(format!("benchgate: your certificate expires in {}", spoken(lead))));
            }
            _ = tokio::time::sleep_until(expiry.unwrap_or(far)), if expiry.is_some() && settings.disconnect_on_expiry => {
                return Ended::Expired;
            }
            changed = settings_changes.changed() => {
                if changed.is_err() {
                    return Ended::Shutdown;
                }
                if let Some(ended) = recheck(grant, &app.settings()) {
                    return ended;
                }
            }
            _ = tokio::time::sleep(CHECK_INTERVAL) => {
                if idle_timeout.is_some_and(|limit| link.idle_for() >= limit) {
                    return Ended::Idle;
                }
                if flow.stuck() {
                    return Ended::Stuck;
                }
                // A draining daemon lets go of connections that hold no session (an idle
                // ControlMaster would otherwise keep it, and its old config, for the drain
                // limit); a login that just arrived gets the time to start one.
                if app.handover.draining()
                    && link.running_sessions() == 0
                    && link.idle_for() >= DRAIN_IDLE
                {
                    return Ended::Upgraded;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// supervise measures on tokio's clock from the Unix time it is given: with the clock
    /// paused, 700 seconds of a certificate's life pass at once.
    #[tokio::test(start_paused = true)]
    async fn expiry_warns_then_ends_on_tokios_clock() {
        use russh::keys::ssh_key::certificate::{Builder, CertType};
        use russh::keys::ssh_key::{Algorithm, PrivateKey};
        const NOW: u64 = 1_800_000_000;
        let mut rng = rand::rng();
        let ca = PrivateKey::random(&mut rng, Algorithm::Ed25519).expect("ca");
        let user = PrivateKey::random(&mut rng, Algorithm::Ed25519).expect("user");
        let mut builder = Builder::new(
            [1; 32],
            user.public_key().key_data().clone(),
            NOW - 60,
            NOW + 700,
        )
        .expect("builder");
        builder.cert_type(CertType::User).expect("type");
        builder.valid_principal("shop").expect("principal");
        let cert = builder.sign(&ca).expect("sign");
        let config = crate::config::Config::default();
        let settings = Settings {
            trust: crate::auth::Trust::new([ca.public_key().key_data().clone()], None),
            session: config.session.clone(),
            expiry_warnings: vec![Duration::from_secs(600), Duration::from_secs(60)],
            disconnect_on_expiry: true,
            idle_timeout: None,
        };
        let app = App::new(
            &config,
            tokio::sync::watch::Sender::new(Arc::new(settings)),
            crate::audit::Audit::open(None).expect("audit"),
            Vec::new(),
            Arc::new(crate::docker::Index::from_config(&config.docker).expect("index")),
        );
        let grant = Grant {
            bench: "shop".into(),
            key_id: "k".into(),
            serial: 1,
            ca: "ca".into(),
            valid_before: NOW + 700,
            force_command: None,
            permit_pty: true,
            via_group: None,
            certificate: Arc::new(cert),
        };
        let link = Link::default();
        let mut notices = link.subscribe();
        let started = Instant::now();
        let ended = supervise(
            &app,
            &grant,
            &link,
            std::future::pending(),
            &CancellationToken::new(),
            &Flow::new(app.input.clone()),
            NOW,
        )
        .await;
        assert_eq!(ended, Ended::Expired);
        assert_eq!(started.elapsed().as_secs(), 700);
        let warn =
            |text: &str| Notice::Warn(format!("benchgate: your certificate expires in {text}"));
        assert_eq!(notices.try_recv().ok(), Some(warn("10 minutes")));
        assert_eq!(notices.try_recv().ok(), Some(warn("1 minute")));
        assert!(notices.try_recv().is_err());
    }

    #[test]
    fn lead_times_are_spoken() {
        assert_eq!(spoken(Duration::from_secs(600)), "10 minutes");
        assert_eq!(spoken(Duration::from_secs(60)), "1 minute");
        assert_eq!(spoken(Duration::from_secs(7200)), "2 hours");
        assert_eq!(spoken(Duration::from_secs(90)), "90 seconds");
        assert_eq!(spoken(Duration::from_secs(1)), "1 second");
    }

    #[test]
    fn every_server_reason_is_a_registered_metric_label() {
        use Ended::*;
        for why in [
            LoginGrace,
            Expired,
            Revoked,
            CaRemoved,
            Idle,
            Shutdown,
            Stuck,
            ProtocolViolation,
            Unresponsive,
            Upgraded,
            TooManyRefusals,
        ] {
            assert!(
                crate::metrics::DISCONNECT_REASONS.contains(&why.label()),
                "{why:?}"
            );
        }
    }

    #[test]
    fn far_future_has_no_instant() {
        let start = Instant::now();
        assert!(instant_at(u64::MAX, 1000, start).is_none());
        assert_eq!(instant_at(0, 1000, start), Some(start));
        assert_eq!(
            instant_at(1010, 1000, start),
            Some(start + Duration::from_secs(10))
        );
    }
}
