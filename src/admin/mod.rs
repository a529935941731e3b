//! The admin socket: a unix socket speaking line-delimited JSON, one request per line (several
//! may be pipelined on one connection), one reply line each. `benchgate sessions` is its
//! client. A `watch` request turns the rest of the connection into a stream of frames.
//!
//! ```text
//! {"op":"sessions","select":{"bench":"shop"}}            -> {"ok":true,"sessions":[...]}
//! {"op":"end","select":{"key_id":"alice"},"reason":"x"}  -> {"ok":true,"ended":[...]}
//! {"op":"watch","id":"3f2a9c0d41b7"}                     -> {"ok":true,"watching":{...}}
//!                                                           {"output":"<base64>"} ...
//!                                                           {"ended":"exited"}
//! anything else                                          -> {"ok":false,"error":"..."}
//! ```

pub mod client;
pub mod server;
pub mod terminal;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::listeners::Handed;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Which live sessions a request is about: those matching every field given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Select {
    /// The session's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The bench.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bench: Option<String>,
    /// The certificate's key ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The certificate's serial.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<u64>,
    /// The fingerprint of the certificate's CA (serials are unique per CA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl Select {
    /// Nothing chosen: every session.
    pub fn is_everything(&self) -> bool {
        *self == Self::default()
    }

    /// How an operator would have written it, for messages: `id 3f2a, --key-id alice`.
    pub fn spoken(&self) -> String {
        let mut parts = Vec::new();
        if let Some(id) = &self.id {
            parts.push(format!("id {id}"));
        }
        if let Some(bench) = &self.bench {
            parts.push(format!("--bench {bench}"));
        }
        if let Some(key_id) = &self.key_id {
            parts.push(format!("--key-id {key_id}"));
        }
        if let Some(serial) = self.serial {
            parts.push(format!("--serial {serial}"));
        }
        if let Some(ca) = &self.ca {
            parts.push(format!("--ca {ca}"));
        }
        crate::auth::bounded(&parts.join(", "))
    }
}

/// A request on the admin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// List live sessions.
    Sessions {
        /// Which.
        #[serde(default)]
        select: Select,
    },
    /// End live sessions through their ladder, telling each person `reason`.
    End {
        /// Which (at least one field).
        select: Select,
        /// Told to the person; may be empty.
        #[serde(default)]
        reason: String,
    },
    /// Watch a terminal session's output, read-only.
    Watch {
        /// The session's id.
        id: String,
    },
    /// What this daemon is: pid, listeners, engines, whether it drains.
    Status,
    /// Hand the listening sockets over to a new daemon (see [`crate::listeners`]).
    Takeover {
        /// Where the new daemon's config says to listen.
        listen: Vec<SocketAddr>,
        /// Its metrics address.
        #[serde(default)]
        metrics: Option<SocketAddr>,
    },
}

impl Request {
    /// The `request` label of the admin metrics and audit.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Sessions { .. } => "sessions",
            Self::End { .. } => "end",
            Self::Watch { .. } => "watch",
            Self::Status => "status",
            Self::Takeover { .. } => "takeover",
        }
    }
}

/// One live session as the admin socket lists it. Untrusted text (key ID, command) is
/// escaped and bounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session's id.
    pub id: String,
    /// The bench.
    pub bench: String,
    /// The container's full ID.
    pub container: String,
    /// The Docker endpoint's URL.
    pub endpoint: String,
    /// The certificate's key ID.
    pub key_id: String,
    /// The certificate's serial.
    pub serial: u64,
    /// The CA's fingerprint.
    pub ca: String,
    /// The client's address.
    pub peer: String,
    /// "shell" or "exec".
    pub kind: String,
    /// "running", or "ending (REASON)" while its processes are being ended.
    pub state: String,
    /// The command, when one was given.
    pub command: Option<String>,
    /// The terminal's size (columns, rows), for a terminal session.
    pub tty: Option<(u32, u32)>,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// Seconds since bytes last went either way.
    pub idle_seconds: u64,
    /// Bytes from the client.
    pub bytes_in: u64,
    /// Bytes to the client.
    pub bytes_out: u64,
    /// The certificate's `valid_before` (RFC 3339, UTC).
    pub valid_before: String,
}

/// What an `end` request did to one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedInfo {
    /// The session.
    pub session: SessionInfo,
    /// "ended" (its processes are gone), "ending" (still on its way when the reply was sent),
    /// "already ending" (an earlier request ended it), or "ended, but..." when its teardown
    /// gave up.
    pub state: String,
}

/// The reply to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Not carried out because no live session matched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_match: bool,
    /// `sessions`: the sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<SessionInfo>>,
    /// `end`: what was ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Vec<EndedInfo>>,
    /// `watch`: the session watched; frames follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watching: Option<SessionInfo>,
    /// `status`: what the daemon is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// `takeover`: the sockets handed over (attached to this line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed: Option<Handed>,
}

/// What a running daemon is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Its process id.
    pub pid: u32,
    /// Its Docker endpoints, in configuration order.
    pub endpoints: Vec<crate::config::Endpoint>,
    /// Whether it has handed its listeners over and is draining.
    pub draining: bool,
    /// Label conflicts in its bench index (ambiguous benches, group labels not honoured).
    #[serde(default)]
    pub conflicts: Vec<String>,
}

impl Reply {
    /// A refusal saying `error`.
    pub fn error(error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::default()
        }
    }

    /// A refusal because no live session matched, saying `error`.
    pub fn no_match(error: impl Into<String>) -> Self {
        Self {
            no_match: true,
            ..Self::error(error)
        }
    }
}

/// What follows a `watch` reply, one per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchFrame {
    /// Terminal output, base64.
    Output(String),
    /// Bytes of output not copied because this watcher fell behind.
    Dropped(u64),
    /// The terminal's new size (columns, rows).
    Resized(u32, u32),
    /// The session ended, for this reason.
    Ended(String),
}

/// One line read by [`read_line`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, without its newline.
    Whole(Vec<u8>),
    /// The peer closed the connection between lines.
    Closed,
    /// The peer closed the connection in the middle of a line.
    Cut,
    /// The line goes on past the limit.
    TooLong,
}

/// Reads one newline-terminated line of at most `limit` bytes.
pub async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    limit: usize,
) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                Line::Closed
            } else {
                Line::Cut
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > limit + usize::from(done) {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            line.pop();
            return Ok(Line::Whole(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let parse = |text: &str| serde_json::from_str::<Request>(text);
        assert_eq!(
            parse(r#"{"op":"sessions"}"#).expect("sessions"),
            Request::Sessions {
                select: Select::default()
            }
        );
        assert_eq!(
            parse(r#"{"op":"end","select":{"key_id":"alice"},"reason":"x"}"#).expect("end"),
            Request::End {
                select: Select {
                    key_id: Some("alice".into()),
                    ..Select::default()
                },
                reason: "x".into()
            }
        );
        assert!(parse(r#"{"op":"watch","id":"a"}"#).is_ok());
        for bad in [
            r#"{"op":"end"}"#,
            r#"{"op":"watch"}"#,
            r#"{"op":"reboot"}"#,
            r#"{"op":"sessions","select":{"user":"x"}}"#,
            r#"{"op":"sessions","extra":1}"#,
            "[]",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn lines_are_bounded_and_cut_lines_reported() {
        let read = |text: &'static [u8], limit| async move {
            let mut reader = tokio::io::BufReader::with_capacity(4, text);
            let mut lines = Vec::new();
            loop {
                let line = read_line(&mut reader, limit).await.expect("read");
                let last = !matches!(line, Line::Whole(_));
                lines.push(line);
                if last {
                    return lines;
                }
            }
        };
        assert_eq!(
            read(b"abc\nde\n", 3).await,
            [
                Line::Whole(b"abc".to_vec()),
                Line::Whole(b"de".to_vec()),
                Line::Closed
            ]
        );
        assert_eq!(read(b"abcd\n", 3).await, [Line::TooLong]);
        assert_eq!(read(b"abcdefgh", 3).await, [Line::TooLong]);
        assert_eq!(
            read(b"ab\nc", 3).await,
            [Line::Whole(b"ab".to_vec()), Line::Cut]
        );
    }
}
