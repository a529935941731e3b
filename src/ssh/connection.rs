//! One connection: the SSH handshake under the login grace, the grant, supervision until it
//! ends, and the ladder that ends it (tell, end sessions, disconnect, cut).

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use russh::Disconnect;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::handler::Handler;
use super::ledger::Ledger;
use super::lifetime::{self, Ended, Link, Notice};
use super::prechecks::{Sink, Watch};
use super::server::{Gate, StartupSlot};
use crate::audit::{Event, Kind};
use crate::metrics::{self, Outcome};

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
    let stream = Guarded::new(stream, kill.clone(), Watch::new(&sink));
    let link = Arc::new(Link::default());
    let (on_auth, mut authenticated) = oneshot::channel();
    let handler = Handler::new(
        app.clone(),
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
        russh::server::run_stream(gate.ssh.clone(), stream, handler),
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
            end = lifetime::supervise(app, grant, &link, closed, &gate.shutdown).await;
            finished = end == Ended::Closed;
            if end == Ended::Shutdown {
                let grace = app.shutdown_grace();
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
