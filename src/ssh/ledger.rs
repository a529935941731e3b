//! Login refusals of one connection that wait to be audited: russh's own (from
//! `prechecks`), and the plain key OpenSSH offers before its certificate.

use std::net::SocketAddr;
use std::sync::Mutex;

use russh::keys::ssh_key::Certificate;

use super::prechecks::Sink;
use crate::app::App;
use crate::audit::{Event, Kind};
use crate::auth::{self, cert::ca_fingerprint, Rejection};
use crate::metrics;

/// What one connection has been refused so far that is not yet audited.
#[derive(Debug, Default)]
pub struct Ledger(Mutex<Pending>);

#[derive(Debug, Default)]
struct Pending {
    /// The user name of the latest attempt.
    user: Option<String>,
    /// A plain key was proven: reported at the end if no certificate got in.
    plain_key: bool,
    /// Rejections russh made itself, reported at the next decision or at the end.
    library: Vec<Rejection>,
    /// The invalid user name already reported, so each is reported once.
    reported_invalid_user: Option<String>,
}

impl Sink for Ledger {
    fn library_rejected(&self, reason: Rejection) {
        self.lock().library.push(reason);
    }
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes `user` as the latest attempt's; refuses, and reports once, a name that is no
    /// bench name.
    pub fn admit_user(&self, app: &App, peer: SocketAddr, user: &str) -> bool {
        let mut pending = self.lock();
        pending.user = Some(user.to_owned());
        if auth::is_bench_name(user) {
            return true;
        }
        if pending.reported_invalid_user.as_deref() != Some(user) {
            pending.reported_invalid_user = Some(user.to_owned());
            drop(pending);
            reject(app, peer, Some(user), None, &Rejection::InvalidUser);
        }
        false
    }

    /// A plain key was proven on this connection.
    pub fn note_plain_key(&self) {
        self.lock().plain_key = true;
    }

    /// Audits the rejections russh made since the last call.
    pub fn flush_library(&self, app: &App, peer: SocketAddr) {
        let (user, library) = {
            let mut pending = self.lock();
            (pending.user.clone(), std::mem::take(&mut pending.library))
        };
        for reason in library {
            reject(app, peer, user.as_deref(), None, &reason);
        }
    }

    /// Audits what is still pending when the connection ends. A proven plain key is reported
    /// only when no certificate got in: OpenSSH clients offer it before the certificate.
    pub fn finish(&self, app: &App, peer: SocketAddr, authenticated: bool) {
        self.flush_library(app, peer);
        let pending = self.lock();
        if pending.plain_key && !authenticated {
            let user = pending.user.clone();
            drop(pending);
            reject(app, peer, user.as_deref(), None, &Rejection::NotCertificate);
        }
    }
}

/// Logs, counts and audits one refused login attempt.
pub fn reject(
    app: &App,
    peer: SocketAddr,
    user: Option<&str>,
    cert: Option<&Certificate>,
    reason: &Rejection,
) {
    metrics::auth_rejected(reason);
    let mut event = Event::new(Kind::AuthRejected, peer).reason(reason.label());
    if let Some(user) = user {
        event = event.bench(user);
    }
    if let Some(cert) = cert {
        event = event.certificate(cert.key_id(), cert.serial(), ca_fingerprint(cert));
        tracing::warn!(
            %peer, bench = %user.map(auth::bounded).unwrap_or_default(), key_id = %auth::bounded(cert.key_id()),
            serial = cert.serial(), reason = reason.label(), "auth rejected: {reason}"
        );
    } else {
        tracing::warn!(%peer, bench = %user.map(auth::bounded).unwrap_or_default(), reason = reason.label(), "auth rejected: {reason}");
    }
    app.audit.record(&event);
}
