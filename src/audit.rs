//! Audit events: one JSON object per line, to their own file or to the main log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::auth::bounded;
use crate::live::Live;

/// The kinds of audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// A certificate was accepted.
    #[serde(rename = "auth.accepted")]
    AuthAccepted,
    /// A login attempt was refused.
    #[serde(rename = "auth.rejected")]
    AuthRejected,
    /// A session started in a bench container.
    #[serde(rename = "session.start")]
    SessionStart,
    /// A session ended.
    #[serde(rename = "session.end")]
    SessionEnd,
    /// A request inside a connection was refused.
    #[serde(rename = "request.refused")]
    RequestRefused,
    /// A connection ended.
    #[serde(rename = "connection.closed")]
    ConnectionClosed,
    /// An operator ended a session through the admin socket.
    #[serde(rename = "session.ended_by_operator")]
    SessionEndedByOperator,
    /// A request on the admin socket, allowed or not.
    #[serde(rename = "admin.request")]
    AdminRequest,
}

/// One audit event; absent fields are left out of the line.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    ts: String,
    event: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bench: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_status: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    leftovers: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_out: Option<u64>,
}

impl Event {
    /// A new event of `kind` from `peer`, stamped now.
    pub fn new(kind: Kind, peer: SocketAddr) -> Self {
        Self {
            peer: Some(peer),
            ..Self::local(kind)
        }
    }

    /// A new event of `kind` from this machine (the admin socket), stamped now.
    pub fn local(kind: Kind) -> Self {
        Self {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event: kind,
            peer: None,
            uid: None,
            session: None,
            bench: None,
            key_id: None,
            serial: None,
            ca: None,
            reason: None,
            request: None,
            container: None,
            command: None,
            exit_status: None,
            leftovers: None,
            count: None,
            duration_ms: None,
            bytes_in: None,
            bytes_out: None,
        }
    }

    /// An event about the session `live`: its client, bench, certificate, container, id and
    /// command.
    pub fn about_session(kind: Kind, live: &Live) -> Self {
        let about = &live.about;
        let mut event = Self::new(kind, about.peer)
            .bench(&about.bench)
            .certificate(&about.key_id, about.serial, about.ca.clone())
            .container(&about.container);
        event = event.session(&about.id);
        if let Some(command) = &about.command {
            event = event.command(command);
        }
        event
    }

    /// The session's id.
    pub fn session(mut self, id: &str) -> Self {
        self.session = Some(bounded(id));
        self
    }

    /// The local user who asked (the admin socket's peer).
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// The bench (the SSH user name, untrusted until accepted).
    pub fn bench(mut self, bench: &str) -> Self {
        self.bench = Some(bounded(bench));
        self
    }

    /// The certificate's identity: key ID (untrusted), serial and CA fingerprint.
    pub fn certificate(mut self, key_id: &str, serial: u64, ca: String) -> Self {
        self.key_id = Some(bounded(key_id));
        self.serial = Some(serial);
        self.ca = Some(ca);
        self
    }

    /// Why it happened.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(bounded(&reason.into()));
        self
    }

    /// The refused request.
    pub fn request(mut self, request: &str) -> Self {
        self.request = Some(bounded(request));
        self
    }

    /// The container (full ID).
    pub fn container(mut self, id: &str) -> Self {
        self.container = Some(bounded(id));
        self
    }

    /// The command run (untrusted).
    pub fn command(mut self, command: &str) -> Self {
        self.command = Some(bounded(command));
        self
    }

    /// The exit status the client was given.
    pub fn exit_status(mut self, status: u32) -> Self {
        self.exit_status = Some(status);
        self
    }

    /// Background processes the session left, ended or hung up by its wrapper.
    pub fn leftovers(mut self, count: u32) -> Self {
        self.leftovers = Some(count);
        self
    }

    /// How many of something the event stands for (refused requests in one connection).
    pub fn count(mut self, count: u32) -> Self {
        self.count = Some(count);
        self
    }

    /// Bytes from the client and to the client.
    pub fn bytes(mut self, bytes_in: u64, bytes_out: u64) -> Self {
        self.bytes_in = Some(bytes_in);
        self.bytes_out = Some(bytes_out);
        self
    }

    /// How long the connection or session lasted.
    pub fn duration_ms(mut self, ms: u64) -> Self {
        self.duration_ms = Some(ms);
        self
    }

    /// The event as one JSON line, without the newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Where audit events go.
#[derive(Debug)]
pub enum Audit {
    /// Into the main log, as `audit` events.
    Log,
    /// Appended to a file, one `write` per line, so a crash loses no completed line.
    File(Mutex<File>),
}

impl Audit {
    /// Audit into `path` (created with mode 0600 if missing), or the main log when `None`.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        match path {
            None => Ok(Self::Log),
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)?;
                Ok(Self::File(Mutex::new(file)))
            }
        }
    }

    /// Records `event`.
    pub fn record(&self, event: &Event) {
        let line = event.to_json();
        match self {
            Self::Log => tracing::info!(target: "audit", "{line}"),
            Self::File(file) => {
                let mut bytes = line.into_bytes();
                bytes.push(b'\n');
                let result = match file.lock() {
                    Ok(mut file) => file.write_all(&bytes),
                    Err(poisoned) => poisoned.into_inner().write_all(&bytes),
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "cannot write audit event");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_single_json_lines_with_bounded_fields() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let event = Event::new(Kind::AuthRejected, peer)
            .bench("shop\nx")
            .certificate(&"k".repeat(5000), 7, "SHA256:abc".into())
            .reason("expired");
        let line = event.to_json();
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(value["event"], "auth.rejected");
        assert_eq!(value["peer"], "127.0.0.1:5000");
        assert_eq!(value["bench"], "shop\\nx");
        assert_eq!(value["serial"], 7);
        assert!(value["key_id"].as_str().expect("key id").chars().count() <= 257);
        assert!(value.get("container").is_none());
    }

    #[test]
    fn file_sink_appends_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(&path)).expect("open");
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        audit.record(&Event::new(Kind::ConnectionClosed, peer));
        audit.record(&Event::new(Kind::AuthAccepted, peer));
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
    }
}
