//! The russh handler: one per connection, deciding authentication, refusing requests and
//! handing session channels to [`super::channel`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, Certificate};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::channel::{self, Pty, Request};
use super::ledger::{reject, Ledger};
use super::lifetime::{Ended, Link};
use super::server::StartupSlot;
use crate::app::App;
use crate::audit::{Event, Kind};
use crate::auth::{self, Attempt, Grant, Rejection};
use crate::flow::{Flow, Inbox};
use crate::limits::Place;
use crate::metrics;
use crate::policy::{self, Refused};

/// The russh handler of one connection.
pub struct Handler {
    app: Arc<App>,
    peer: SocketAddr,
    accepted_at: Instant,
    ledger: Arc<Ledger>,
    link: Arc<Link>,
    startup: Option<StartupSlot>,
    on_auth: Option<oneshot::Sender<Grant>>,
    grant: Option<Grant>,
    /// Session channels that have not started a process yet.
    pending: HashMap<ChannelId, Opened>,
    /// What clients sent on each session channel, started or not, until it closes.
    inboxes: HashMap<ChannelId, Arc<Inbox>>,
    /// Client input held by this connection.
    flow: Arc<Flow>,
    /// One permit per session channel open now, started or not; a started session holds
    /// its permit until its task ends (russh reports no close for channels the server closed).
    channel_permits: Arc<Semaphore>,
    /// The connection's span: russh runs the handler in a task of its own, outside it.
    span: tracing::Span,
    /// This connection's place among its certificate key's connections.
    key_place: Option<Place<KeyData>>,
    /// Requests refused so far.
    refusals: Mutex<Refusals>,
}

/// What a connection was refused, for the audit trail.
#[derive(Debug, Default)]
struct Refusals {
    /// Variables outside `env_allow` (part of a session's set-up, not counted to the close).
    env: u32,
    /// Everything else.
    other: u32,
    /// Whether one event already counted them all.
    summarized: bool,
}

/// Refused requests of one connection that are audited and logged one by one.
const AUDITED_REFUSALS: u32 = 10;
/// Refused requests after which the connection is closed: no client asks this often by
/// mistake (OpenSSH asks for agent and X11 forwarding once per session, and gives up on a
/// refused port forward). Variables not allowed (`SendEnv LC_*` may send dozens) do not
/// count: they are part of a session's set-up.
const MAX_REFUSALS: u32 = 100;

impl Drop for Handler {
    /// The connection is over: refusals past those audited one by one are counted in one
    /// event, unless the close at [`MAX_REFUSALS`] already did.
    fn drop(&mut self) {
        let refusals = self.refusals.get_mut().unwrap_or_else(|p| p.into_inner());
        if !refusals.summarized
            && (refusals.env > AUDITED_REFUSALS || refusals.other > AUDITED_REFUSALS)
        {
            let total = refusals.env + refusals.other;
            self.app.audit.record(
                &self
                    .refused_event("many")
                    .count(total)
                    .reason("more refused requests than were audited one by one"),
            );
        }
    }
}

/// A session channel between its opening and its `shell` or `exec` request.
struct Opened {
    to_client: ChannelWriteHalf<Msg>,
    inbox: Arc<Inbox>,
    permit: OwnedSemaphorePermit,
    pty: Option<Pty>,
    env: Vec<(String, String)>,
}

impl Handler {
    /// A handler for a connection from `peer`, holding its pre-auth `startup` slot until it
    /// authenticates, then sending its grant on `on_auth`; client input is counted in `flow`.
    pub fn new(
        app: Arc<App>,
        peer: SocketAddr,
        ledger: Arc<Ledger>,
        link: Arc<Link>,
        flow: Arc<Flow>,
        startup: StartupSlot,
        on_auth: oneshot::Sender<Grant>,
    ) -> Self {
        let max_channels = app.server.max_sessions_per_connection.get() as usize;
        Self {
            app,
            peer,
            accepted_at: Instant::now(),
            ledger,
            link,
            startup: Some(startup),
            on_auth: Some(on_auth),
            grant: None,
            pending: HashMap::new(),
            inboxes: HashMap::new(),
            flow,
            span: tracing::Span::current(),
            channel_permits: Arc::new(Semaphore::new(max_channels)),
            refusals: Mutex::default(),
            key_place: None,
        }
    }

    /// Notes `user` for later reports; refuses (and reports once) a name that is no bench name.
    fn admit_user(&mut self, user: &str) -> bool {
        self.ledger.flush_library(&self.app, self.peer);
        self.ledger.admit_user(&self.app, self.peer, user)
    }

    /// Replies success to `shell`/`exec` on `channel` and starts its process.
    fn start(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let (Some(pending), Some(grant)) = (self.pending.remove(&channel), self.grant.clone())
        else {
            // A second shell/exec on a channel, or one that is not a session channel.
            self.refuse_request(Refused::Session);
            session.channel_failure(channel)?;
            return Ok(());
        };
        session.channel_success(channel)?;
        let request = Request {
            grant,
            peer: self.peer,
            command,
            pty: pending.pty,
            env: pending.env,
            link: self.link.clone(),
        };
        let app = self.app.clone();
        let permit = pending.permit;
        self.app.tracker.spawn(
            async move {
                channel::run(app, request, pending.inbox, pending.to_client).await;
                drop(permit);
            }
            .instrument(self.span.clone()),
        );
        Ok(())
    }

    /// Replies success (so the client shows the message), then writes `message` on stderr,
    /// exit status 1, EOF and close.
    fn refuse_in_channel(
        &mut self,
        channel: ChannelId,
        request: Refused,
        message: &'static str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        self.refuse_request(request);
        let Some(pending) = self.pending.remove(&channel) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        session.channel_success(channel)?;
        let tty = pending.pty.is_some();
        let permit = pending.permit;
        let link = self.link.clone();
        self.app.tracker.spawn(
            async move {
                channel::refuse(&pending.to_client, message, tty, &link).await;
                pending.inbox.close();
                drop(permit);
            }
            .instrument(self.span.clone()),
        );
        Ok(())
    }

    /// Counts, logs and audits a refusal: the first [`AUDITED_REFUSALS`] of each kind (not
    /// allowed variables, everything else) one by one; at [`MAX_REFUSALS`] of everything else
    /// the connection is closed with one event that counts them all, and a connection that
    /// ends with more refused than were audited gets that event at its end (see `Drop`).
    fn refuse_request(&self, request: Refused) {
        metrics::refused(request);
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let count = if request == Refused::Env {
            refusals.env += 1;
            refusals.env
        } else {
            refusals.other += 1;
            refusals.other
        };
        if count <= AUDITED_REFUSALS {
            tracing::info!(peer = %self.peer, request = request.label(), "request refused");
            self.app.audit.record(&self.refused_event(request.label()));
        }
        if request != Refused::Env && count == MAX_REFUSALS {
            tracing::warn!(
                peer = %self.peer, refused = refusals.env + refusals.other,
                "the client keeps asking for refused requests; closing the connection"
            );
            self.app.audit.record(
                &self
                    .refused_event(request.label())
                    .count(refusals.env + refusals.other)
                    .reason("too many refused requests; closing the connection"),
            );
            refusals.summarized = true;
            self.link.request_end(Ended::TooManyRefusals);
        }
    }

    /// A `request.refused` event for `request` on this connection.
    fn refused_event(&self, request: &str) -> Event {
        let mut event = Event::new(Kind::RequestRefused, self.peer).request(request);
        if let Some(grant) = &self.grant {
            event = event.bench(&grant.bench).certificate(
                &grant.key_id,
                grant.serial,
                grant.ca.clone(),
            );
        }
        event
    }

    async fn refuse_channel(&self, request: Refused, reply: ChannelOpenHandle, message: &str) {
        self.span.in_scope(|| self.refuse_request(request));
        reply
            .reject(ChannelOpenFailure::Other {
                code: ChannelOpenFailure::AdministrativelyProhibited.code(),
                reason: message.to_owned(),
            })
            .await;
    }
}

impl russh::server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        let _span = self.span.clone().entered();
        self.admit_user(user);
        Ok(Auth::reject())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        let _span = self.span.clone().entered();
        self.admit_user(user);
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        let _span = self.span.clone().entered();
        if !self.admit_user(user) {
            return Ok(Auth::reject());
        }
        if *offer.algorithm == (Algorithm::Rsa { hash: None }) {
            reject(
                &self.app,
                self.peer,
                Some(user),
                None,
                &Rejection::Sha1Signature,
            );
            return Ok(Auth::reject());
        }
        // A certificate arrives here as its bare subject key, indistinguishable from a plain
        // key: accept the offer and decide once the key is proven.
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let _span = self.span.clone().entered();
        // The OpenSSH client offers the bare key before its certificate, so this is reported
        // only if no certificate gets in (see Ledger::finish).
        tracing::debug!(peer = %self.peer, bench = %auth::bounded(user), algorithm = %key.algorithm, "plain key refused");
        self.ledger.note_plain_key();
        Ok(Auth::reject())
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let _span = self.span.clone().entered();
        if !self.admit_user(user) {
            return Ok(Auth::reject());
        }
        let group = self.app.benches.group(user);
        let attempt = Attempt {
            bench: user,
            group: group.as_deref(),
            peer: self.peer.ip(),
            now: crate::clock::unix_now(),
        };
        let verdict = auth::verify(cert, &attempt, &self.app.settings().trust).and_then(|grant| {
            // Counted once accepted: refused attempts hold no place.
            self.key_place = Some(
                self.app
                    .key_connections
                    .claim(cert.public_key())
                    .ok_or(Rejection::TooManyConnections)?,
            );
            Ok(grant)
        });
        match verdict {
            Ok(grant) => {
                let remaining = grant.valid_before.saturating_sub(attempt.now);
                metrics::auth_accepted(self.accepted_at.elapsed(), remaining);
                tracing::info!(
                    peer = %self.peer, bench = %grant.bench, key_id = %auth::bounded(&grant.key_id),
                    serial = grant.serial, ca = %grant.ca, "auth accepted"
                );
                self.app.audit.record(
                    &Event::new(Kind::AuthAccepted, self.peer)
                        .bench(&grant.bench)
                        .certificate(&grant.key_id, grant.serial, grant.ca.clone()),
                );
                self.grant = Some(grant);
                Ok(Auth::Accept)
            }
            Err(reason) => {
                reject(&self.app, self.peer, Some(user), Some(cert), &reason);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.startup = None;
        if let (Some(on_auth), Some(grant)) = (self.on_auth.take(), self.grant.clone()) {
            let _ = on_auth.send(grant);
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.grant.is_none() {
            return Ok(());
        }
        let Ok(permit) = self.channel_permits.clone().try_acquire_owned() else {
            self.refuse_channel(Refused::Session, reply, policy::TOO_MANY_SESSIONS)
                .await;
            return Ok(());
        };
        let id = channel.id();
        // Everything the client sends on the channel comes through the callbacks below into
        // its inbox; dropping russh's queue for it means russh never waits on a full one.
        let (_, to_client) = channel.split();
        let inbox = Inbox::new(self.flow.clone());
        // Channels whose sessions ended (russh reports no close for channels we closed).
        self.inboxes.retain(|_, inbox| !inbox.is_closed());
        self.inboxes.insert(id, inbox.clone());
        self.pending.insert(
            id,
            Opened {
                to_client,
                inbox,
                permit,
                pty: None,
                env: Vec::new(),
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _span = self.span.clone().entered();
        let Some(inbox) = self.inboxes.get(&channel) else {
            return Ok(());
        };
        if let Err(violation) = inbox.push(data) {
            if self.link.requested().is_none() {
                tracing::warn!(peer = %self.peer, error = %violation, "client ignored its window");
            }
            self.link.request_end(Ended::ProtocolViolation);
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(inbox) = self.inboxes.get(&channel) {
            inbox.eof();
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.pending.remove(&channel);
        if let Some(inbox) = self.inboxes.remove(&channel) {
            inbox.close();
        }
        Ok(())
    }

    fn adjust_window(&mut self, _channel: ChannelId, _current: u32) -> u32 {
        // Channels whose sessions ended (russh reports no close for channels we closed).
        self.inboxes.retain(|_, inbox| !inbox.is_closed());
        self.flow
            .window_target(self.inboxes.values().map(|inbox| &**inbox))
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (cols, rows) = (col_width.clamp(1, 10_000), row_height.clamp(1, 10_000));
        if let Some(pty) = self.pending.get_mut(&channel).and_then(|p| p.pty.as_mut()) {
            (pty.cols, pty.rows) = (cols, rows);
        } else if let Some(inbox) = self.inboxes.get(&channel) {
            inbox.resize(cols, rows);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _span = self.span.clone().entered();
        let permitted = self.grant.as_ref().is_some_and(|g| g.permit_pty);
        match self.pending.get_mut(&channel) {
            Some(pending) if permitted => {
                pending.pty = Some(Pty {
                    term: policy::terminal_type(term).to_owned(),
                    cols: col_width.clamp(1, 10_000),
                    rows: row_height.clamp(1, 10_000),
                });
                session.channel_success(channel)?;
            }
            _ => {
                self.refuse_request(Refused::Pty);
                session.channel_failure(channel)?;
            }
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _span = self.span.clone().entered();
        let settings = self.app.settings();
        let allow = &settings.session.env_allow;
        match self.pending.get_mut(&channel) {
            Some(pending)
                if pending.env.len() < policy::MAX_ENV_VARS
                    && policy::env_allowed(name, value, allow) =>
            {
                pending.env.push((name.to_owned(), value.to_owned()));
                session.channel_success(channel)?;
            }
            _ => {
                tracing::debug!(peer = %self.peer, name = %auth::bounded(name), "env refused");
                self.refuse_request(Refused::Env);
                session.channel_failure(channel)?;
            }
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _span = self.span.clone().entered();
        self.start(channel, None, session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _span = self.span.clone().entered();
        let forced = self
            .grant
            .as_ref()
            .is_some_and(|g| g.force_command.is_some());
        match policy::check_command(data) {
            Ok(command) => self.start(channel, Some(command.to_owned()), session),
            // A forced command replaces whatever was asked, so it runs even then; the request
            // only reaches SSH_ORIGINAL_COMMAND, made printable and bounded.
            Err(_) if forced => self.start(channel, Some(policy::printable(data)), session),
            Err(policy::CommandRefusal::FileTransfer) => self.refuse_in_channel(
                channel,
                Refused::FileTransferExec,
                policy::FILE_TRANSFER,
                session,
            ),
            Err(policy::CommandRefusal::Malformed) => {
                self.refuse_request(Refused::MalformedExec);
                session.channel_failure(channel)?;
                Ok(())
            }
        }
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _span = self.span.clone().entered();
        self.refuse_in_channel(channel, Refused::Subsystem, policy::FILE_TRANSFER, session)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let _span = self.span.clone().entered();
        self.refuse_request(Refused::X11);
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _span = self.span.clone().entered();
        self.refuse_request(Refused::Agent);
        Ok(false)
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel(Refused::X11Channel, reply, policy::FORWARDING)
            .await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel(Refused::DirectTcpip, reply, policy::FORWARDING)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel(Refused::DirectStreamlocal, reply, policy::FORWARDING)
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _span = self.span.clone().entered();
        self.refuse_request(Refused::TcpipForward);
        Ok(false)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        _port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _span = self.span.clone().entered();
        self.refuse_request(Refused::TcpipForward);
        Ok(false)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        _socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _span = self.span.clone().entered();
        self.refuse_request(Refused::StreamlocalForward);
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        _socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _span = self.span.clone().entered();
        self.refuse_request(Refused::StreamlocalForward);
        Ok(false)
    }
}
