//! `benchgate sessions`: the admin socket's client. Lists live sessions as a table or JSON,
//! ends them, and watches a terminal session's output.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::terminal::Allowed;
use super::{read_line, Line, Reply, Request, Select, SessionInfo, Status, WatchFrame};
use crate::auth::bounded;

/// Longest reply line the client reads (a long session list).
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;
/// How long a reply may take.
const REPLY_WAIT: Duration = Duration::from_secs(30);

/// The daemon found no live session matching the request (exit status 1, as grep's).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoMatch(String);

/// What `benchgate sessions` was asked to do.
#[derive(Debug, Clone)]
pub enum Command {
    /// List the sessions `select` names, as a table or JSON.
    List { select: Select, json: bool },
    /// End the sessions `select` names, telling each person `reason`.
    End {
        select: Select,
        reason: String,
        json: bool,
    },
    /// Copy session `id`'s terminal output to stdout until it ends or Ctrl-C.
    Watch { id: String },
}

/// Runs `command` against the daemon listening on `socket`; the text to print goes to stdout
/// as it comes. An error reply (nothing matched, not allowed) is an error.
pub async fn run(socket: &Path, command: Command) -> anyhow::Result<()> {
    let request = match &command {
        Command::List { select, .. } => Request::Sessions {
            select: select.clone(),
        },
        Command::End { select, reason, .. } => Request::End {
            select: select.clone(),
            reason: reason.clone(),
        },
        Command::Watch { id } => Request::Watch { id: id.clone() },
    };
    let (reply, (mut reader, _writer)) = ask(socket, &request).await?;
    let mut stdout = tokio::io::stdout();
    let text = match command {
        Command::List { json: true, .. } => json(&reply.sessions.unwrap_or_default())?,
        Command::List { select, .. } => match reply.sessions.unwrap_or_default() {
            sessions if sessions.is_empty() && select.is_everything() => {
                "no live sessions\n".to_owned()
            }
            sessions if sessions.is_empty() => {
                format!("no live session matches {}\n", select.spoken())
            }
            sessions => table(&sessions),
        },
        Command::End { json: true, .. } => json(&reply.ended.unwrap_or_default())?,
        Command::End { .. } => {
            let mut text = String::new();
            for ended in reply.ended.unwrap_or_default() {
                let s = &ended.session;
                let _ = writeln!(
                    text,
                    "{}: {} (bench {}, key id {}, serial {}, from {})",
                    ended.state, s.id, s.bench, s.key_id, s.serial, s.peer
                );
            }
            text
        }
        Command::Watch { .. } => {
            let session = reply
                .watching
                .context("the daemon's reply names no session")?;
            return watch(&session, &mut reader, &mut stdout).await;
        }
    };
    stdout.write_all(text.as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

/// The two halves of a connection to the daemon (dropping the writer tells it we are gone).
type Connection = (
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
);

/// Sends `request` to the daemon on `socket`; its reply (an error reply is an error) and
/// the connection, for what follows it.
async fn ask(socket: &Path, request: &Request) -> anyhow::Result<(Reply, Connection)> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is benchgate running with this config's [admin] socket?)"
            }
            std::io::ErrorKind::PermissionDenied => {
                " (run as root, as benchgate's user, or as a member of [admin] group)"
            }
            _ => "",
        };
        anyhow!(
            "cannot reach the admin socket {}: {e}{hint}",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // A refusal may come (and the daemon close) before the request is written: read it anyway.
    let written = write.write_all(&line).await;
    let reply = tokio::time::timeout(REPLY_WAIT, next::<Reply>(&mut reader))
        .await
        .map_err(|_| anyhow!("the daemon did not answer within 30 seconds"))
        .and_then(|reply| reply);
    let reply = match (written, reply) {
        (_, Ok(reply)) => reply,
        (Err(e), Err(_)) => bail!("admin socket {}: {e}", socket.display()),
        (Ok(()), Err(e)) => return Err(e),
    };
    // The daemon's words are escaped like everything else it sends.
    if let Some(error) = &reply.error {
        let error = bounded(error);
        if reply.no_match {
            return Err(NoMatch(error).into());
        }
        bail!("{error}");
    }
    Ok((reply, (reader, write)))
}

/// What the daemon on `socket` is.
pub async fn status(socket: &Path) -> anyhow::Result<Status> {
    let (reply, _) = ask(socket, &Request::Status).await?;
    reply.status.context("the daemon's reply has no status")
}

/// The next line from the daemon, parsed.
async fn next<T: serde::de::DeserializeOwned>(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> anyhow::Result<T> {
    match read_line(reader, MAX_REPLY_BYTES).await? {
        Line::Whole(line) => serde_json::from_slice(&line).with_context(|| {
            format!(
                "unreadable reply: {}",
                bounded(&String::from_utf8_lossy(&line))
            )
        }),
        Line::Closed | Line::Cut => bail!("the daemon closed the admin connection"),
        Line::TooLong => bail!("the daemon's reply is longer than 64 MiB"),
    }
}

fn json(value: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// Copies the watched terminal's output to `stdout`, filtered for this terminal (see
/// [`Allowed`]), until the session ends, Ctrl-C, SIGTERM or SIGHUP; every way out undoes
/// what the output may have left set.
async fn watch(
    session: &SessionInfo,
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    stdout: &mut tokio::io::Stdout,
) -> anyhow::Result<()> {
    let (cols, rows) = session.tty.unwrap_or_default();
    eprintln!(
        "benchgate: watching session {} (bench {}, key id {}, terminal {cols}x{rows}), read-only; Ctrl-C stops",
        session.id, session.bench, session.key_id
    );
    let stop = stop_on_signals()?;
    let mut allowed = Allowed::default();
    let ended = async {
        loop {
            let frame = tokio::select! {
                () = stop.cancelled() => return Ok(None),
                frame = next::<WatchFrame>(reader) => frame?,
            };
            match frame {
                WatchFrame::Output(text) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .context("unreadable output frame")?;
                    let clean = allowed.filter(&bytes);
                    // A paused terminal (Ctrl-S) must not keep Ctrl-C from stopping the watch.
                    tokio::select! {
                        () = stop.cancelled() => return Ok(None),
                        written = async {
                            stdout.write_all(clean).await?;
                            stdout.flush().await
                        } => written?,
                    }
                }
                WatchFrame::Dropped(n) => {
                    eprintln!(
                        "\r\nbenchgate: {n} bytes of output skipped: this watcher fell behind\r"
                    )
                }
                WatchFrame::Resized(cols, rows) => {
                    eprintln!("\r\nbenchgate: the session's terminal is now {cols}x{rows}\r")
                }
                WatchFrame::Ended(reason) => return anyhow::Ok(Some(reason)),
            }
        }
    }
    .await;
    if std::io::stdout().is_terminal() {
        use std::io::Write as _;
        let mut terminal = std::io::stdout();
        let _ = terminal.write_all(allowed.reset());
        let _ = terminal.flush();
    }
    match ended? {
        Some(reason) => eprintln!("\r\nbenchgate: the session ended ({})", bounded(&reason)),
        None => eprintln!("\r\nbenchgate: stopped watching"),
    }
    Ok(())
}

/// A token cancelled by the first SIGINT, SIGTERM or SIGHUP from now on.
fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let stop = CancellationToken::new();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let cancel = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        cancel.cancel();
    });
    Ok(stop)
}

/// The sessions as an aligned table, one line each.
pub fn table(sessions: &[SessionInfo]) -> String {
    const HEADER: [&str; 16] = [
        "ID",
        "BENCH",
        "CONTAINER",
        "ENDPOINT",
        "KEY_ID",
        "SERIAL",
        "CA",
        "PEER",
        "KIND",
        "STATE",
        "STARTED",
        "IDLE",
        "IN",
        "OUT",
        "VALID_BEFORE",
        "COMMAND",
    ];
    let rows: Vec<[String; 16]> = sessions
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.bench.clone(),
                cut(&s.container, 12, ""),
                s.endpoint.clone(),
                cut(&s.key_id, 32, "…"),
                s.serial.to_string(),
                cut(&s.ca, 15, "…"),
                s.peer.clone(),
                s.kind.clone(),
                s.state.clone(),
                s.started.clone(),
                idle(s.idle_seconds),
                size(s.bytes_in),
                size(s.bytes_out),
                s.valid_before.clone(),
                s.command
                    .as_deref()
                    .map_or("-".to_owned(), |c| cut(c, 48, "…")),
            ]
            // What the daemon sent is escaped like everything else it says.
            .map(|cell| bounded(&cell))
        })
        .collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header = HEADER.map(str::to_owned);
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        text += line.trim_end();
        text.push('\n');
    }
    text
}

/// `text` cut to `max` characters, ending with `mark` when cut.
fn cut(text: &str, max: usize, mark: &str) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    text.chars().take(max).collect::<String>() + mark
}

/// "42s", "5m", "3h".
fn idle(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// "512B", "1.5K", "20.0M".
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_print_as_an_aligned_table() {
        let session = SessionInfo {
            id: "3f2a9c0d41b7".into(),
            bench: "shop".into(),
            container: "0123456789abcdef0123".into(),
            endpoint: "unix:///var/run/docker.sock".into(),
            key_id: "alice@example.com".into(),
            serial: 42,
            ca: "SHA256:abcdefghijklmnopqrstuvwxyz".into(),
            peer: "203.0.113.7:50122".into(),
            kind: "exec".into(),
            state: "running".into(),
            command: Some("bench migrate".into()),
            tty: None,
            started: "2026-12-06T19:00:00Z".into(),
            idle_seconds: 125,
            bytes_in: 100,
            bytes_out: 3 * 1024 * 1024 / 2,
            valid_before: "2026-12-07T01:00:00Z".into(),
        };
        let text = table(&[session]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("ID            BENCH  CONTAINER"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("3f2a9c0d41b7  shop   0123456789ab "),
            "{text}"
        );
        for cell in ["SHA256:abcdefgh…", "2m", "100B", "1.5M", "bench migrate"] {
            assert!(lines[1].contains(cell), "{cell} in {text}");
        }
        // Columns line up: each header starts where its cell does.
        let at = |line: &str, cell: &str| line[..line.find(cell).expect(cell)].chars().count();
        assert_eq!(at(lines[0], "KEY_ID"), at(lines[1], "alice@"));
        assert_eq!(at(lines[0], "COMMAND"), at(lines[1], "bench migrate"));
    }

    #[test]
    fn sizes_and_idle_times_are_short() {
        assert_eq!(size(0), "0B");
        assert_eq!(size(2048), "2.0K");
        assert_eq!(size(5 << 30), "5.0G");
        assert_eq!(idle(59), "59s");
        assert_eq!(idle(7200), "2h");
    }
}
