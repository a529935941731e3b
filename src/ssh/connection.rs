//! One connection: the SSH handshake under the login grace, the grant, supervision until it
//! ends, and the ladder that ends it (tell, end sessions, disconnect, cut).

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Fuse, FusedFuture, FutureExt as _};
use russh::server::{Handle, RunningSession};
use russh::Disconnect;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::handler::Handler;
use super::ledger::Ledger;
use super::lifetime::{self, Ended, Link, Notice};
use super::prechecks::{Sink, Watch};
use super::server::{Gate, StartupSlot, KEEPALIVE_MAX};
use crate::audit::{Event, Kind};
use crate::auth::Grant;
use crate::clock::unix_now;
use crate::flow::Flow;
use crate::metrics::{self, Outcome};

/// How long the sessions of an ending connection get to tell the person and close their
/// channels (each of their writes is bounded by a second or so).
const SESSIONS_LIMIT: Duration = Duration::from_secs(3);
/// How long the disconnect message may wait to be queued.
const DISCONNECT_LIMIT: Duration = Duration::from_secs(1);
/// How long russh gets to send it and end after it.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);
/// How long russh's task gets to notice its socket was cut.
const CUT_LIMIT: Duration = Duration::from_secs(3);
/// How long a write to a client that reads nothing may wait when keepalives are off.
const STALL_LIMIT_WITHOUT_KEEPALIVES: Duration = Duration::from_secs(300);

/// Where a connection is in its life once the handshake is over.
enum Phase {
    /// Authenticated: sessions may run until something ends the connection.
    Authenticated(Grant),
    /// Ending for this reason.
    Ending(Ended),
}

/// Serves one connection from `peer` (the real client, behind a proxy too), accepted at
/// `started`: the login grace counts from then.
pub(super) async fn run(
    gate: &Gate,
    stream: TcpStream,
    peer: SocketAddr,
    slot: StartupSlot,
    started: Instant,
) {
    let app = &gate.app;
    let _active = metrics::ActiveConnection::open();
    let deadline = started + app.login_grace();
    let ledger = Arc::new(Ledger::default());
    let sink: Arc<dyn Sink> = ledger.clone();
    let kill = CancellationToken::new();
    let link = Arc::new(Link::default());
    // A client that reads nothing for as long as its keepalives may go unanswered is gone.
    let stall_limit = app
        .server
        .keepalive_interval
        .nonzero()
        .map_or(STALL_LIMIT_WITHOUT_KEEPALIVES, |interval| {
            interval * KEEPALIVE_MAX
        });
    let flow = Flow::new(app.input.clone());
    let silence = app.server.keepalive_interval.nonzero().map(|interval| {
        let limit = interval * (KEEPALIVE_MAX + 1);
        (limit, Box::pin(tokio::time::sleep(limit)))
    });
    let stream = Guarded {
        inner: stream,
        killed: Box::pin(kill.clone().cancelled_owned()),
        watch: Watch::new(&sink),
        stall_limit,
        stalled: None,
        silence,
        link: link.clone(),
        flow: flow.clone(),
        pause: None,
    };
    let (on_auth, mut authenticated) = oneshot::channel();
    let handler = Handler::new(
        app.clone(),
        peer,
        ledger.clone(),
        link.clone(),
        flow.clone(),
        slot,
        on_auth,
    );

    let start = tokio::time::timeout_at(
        deadline,
        russh::server::run_stream(gate.ssh.clone(), stream, handler),
    );
    let running = tokio::select! {
        started = start => match started {
            Ok(Ok(running)) => Ok(running),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "ssh version exchange failed");
                Err(Ended::Closed)
            }
            Err(_) => Err(Ended::LoginGrace),
        },
        _ = gate.shutdown.cancelled() => Err(Ended::Shutdown),
    };
    let mut grant = None;
    let end = match running {
        Err(end) => end,
        Ok(running) => {
            let handle = running.handle();
            let mut running = running.fuse();
            let mut phase = tokio::select! {
                _ = &mut running => Phase::Ending(Ended::Closed),
                Ok(g) = &mut authenticated => Phase::Authenticated(g),
                _ = tokio::time::sleep_until(deadline) => Phase::Ending(Ended::LoginGrace),
                _ = gate.shutdown.cancelled() => Phase::Ending(Ended::Shutdown),
            };
            // Both may be ready at once; the grant is sent before the session can end.
            if let (Phase::Ending(Ended::Closed), Ok(g)) = (&phase, authenticated.try_recv()) {
                phase = Phase::Authenticated(g);
            }
            let why = match phase {
                Phase::Ending(why) => why,
                Phase::Authenticated(g) => {
                    // A fused future stays pending once done: russh may have ended already.
                    let closed = async {
                        if !running.is_terminated() {
                            let _ = (&mut running).await;
                        }
                    };
                    let why = lifetime::supervise(
                        app,
                        &g,
                        &link,
                        closed,
                        &gate.shutdown,
                        &flow,
                        unix_now(),
                    )
                    .await;
                    grant = Some(g);
                    if why == Ended::Shutdown && !running.is_terminated() {
                        let grace = app.shutdown_grace();
                        link.tell(Notice::Tell(format!(
                            "benchgate: the bastion is shutting down; this connection ends within {}",
                            lifetime::spoken(grace)
                        )));
                        let _ = tokio::time::timeout(grace, &mut running).await;
                    }
                    why
                }
            };
            ladder(why, &link, &handle, &mut running, &kill).await;
            why
        }
    };

    link.close();
    ledger.finish(app, peer, grant.is_some());
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
    app.audit.record(&event);
}

/// Ends a connection for `why`, one bounded rung after the other, the last always reached:
/// tell the person and end the sessions (each says why, closes its channel and ends its
/// container processes), disconnect with the reason, cut the socket.
async fn ladder(
    why: Ended,
    link: &Link,
    handle: &Handle,
    running: &mut Fuse<RunningSession<Handler>>,
    kill: &CancellationToken,
) {
    if why != Ended::Closed {
        link.end_sessions(why);
        link.sessions_done(SESSIONS_LIMIT).await;
    }
    if !running.is_terminated() {
        let reason = why.message().to_owned();
        let _ = tokio::time::timeout(
            DISCONNECT_LIMIT,
            handle.disconnect(Disconnect::ByApplication, reason, "en".into()),
        )
        .await;
        let _ = tokio::time::timeout(CLOSE_LIMIT, &mut *running).await;
    }
    if !running.is_terminated() {
        // The socket fails every read and write from now on, so russh's task ends.
        kill.cancel();
        if tokio::time::timeout(CUT_LIMIT, &mut *running)
            .await
            .is_err()
        {
            tracing::error!("the connection's task did not end after its socket was cut");
        }
    }
}

/// A TCP stream that fails every read and write once its kill token is cancelled, so a
/// connection can be cut whatever state russh is in; that fails a write the client has not
/// made room for within `stall_limit` (asking the connection to end as unresponsive: russh's
/// keepalives cannot fire while its loop waits on that write); that spaces its writes while
/// the connection's input is stalled (see [`Flow::stalled`]); and that tells the precheck
/// watch which tasks drive it.
struct Guarded {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    watch: Watch,
    stall_limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    /// With keepalives on, a live client sends something at least every keepalive interval:
    /// reads that see nothing for longer than keepalives may go unanswered fail (russh, once
    /// it has sent a disconnect, would otherwise wait for the client's EOF for good).
    silence: Option<(Duration, Pin<Box<Sleep>>)>,
    link: Arc<Link>,
    flow: Arc<Flow>,
    pause: Option<Pin<Box<Sleep>>>,
}

/// How long each write waits while the connection's input is stalled.
const STALLED_WRITE_PAUSE: Duration = Duration::from_millis(10);

impl Guarded {
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

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        let this = &mut *self;
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some((limit, silence)) = &mut this.silence {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    silence.as_mut().reset(tokio::time::Instant::now() + *limit);
                }
                Poll::Pending if silence.as_mut().poll(cx).is_ready() => {
                    this.link.request_end(Ended::Unresponsive);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing for longer than its keepalives allow",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        let this = &mut *self;
        if this.pause.is_some() || this.flow.stalled() {
            let pause = this
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(STALLED_WRITE_PAUSE)));
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => {
                let limit = this.stall_limit;
                let stalled = this
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if stalled.as_mut().poll(cx).is_ready() {
                    this.link.request_end(Ended::Unresponsive);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    )));
                }
                Poll::Pending
            }
            ready => {
                this.stalled = None;
                this.pause = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
