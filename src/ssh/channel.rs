//! One SSH session channel <-> one process in the bench container: start, pumps both ways,
//! window changes, exit status, and teardown of everything the session started.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::server::Msg;
use russh::ChannelWriteHalf;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast;

use super::lifetime::{Ended, Link, Notice, Touching};
use crate::app::App;
use crate::audit::{Event, Kind};
use crate::auth::{self, Grant};
use crate::config::Leftovers;
use crate::docker::exec;
use crate::docker::{short, Bench, Lookup, Plan, Session};
use crate::flow::{Inbox, Input};
use crate::live::{About, Live};
use crate::metrics;
use crate::recording::Recorder;

/// Runs an interactive shell when the config names none: bash if the image has it.
const DEFAULT_SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash --login; else exec sh -l; fi";

/// A terminal requested with `pty-req`.
#[derive(Debug, Clone)]
pub struct Pty {
    /// Sanitised terminal type.
    pub term: String,
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
}

/// Everything a channel asked for before `shell` or `exec`.
#[derive(Debug, Clone)]
pub struct Request {
    /// Who and what for.
    pub grant: Grant,
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's command; `None` = a shell.
    pub command: Option<String>,
    /// The terminal, if any.
    pub pty: Option<Pty>,
    /// Allowed client environment variables.
    pub env: Vec<(String, String)>,
    /// The connection's notices and activity clock.
    pub link: Arc<Link>,
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match (&self.command, &self.grant.force_command) {
            (None, None) => "shell",
            _ => "exec",
        }
    }
}

/// How long one write to the client may wait (a notice, the exit status, EOF and close):
/// a client that does not read for that long loses the write, and the ladder goes on.
const WRITE_LIMIT: Duration = Duration::from_secs(1);

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command exited; the client was given this status.
    Code(u32),
    /// The client closed the channel or the connection.
    ClientGone,
    /// The server ended it.
    EndedByServer(Ended),
    /// An operator ended it (`benchgate sessions end`).
    EndedByOperator,
}

impl Exit {
    /// The `outcome` of `benchgate_sessions_total`.
    fn outcome(self) -> &'static str {
        match self {
            Self::Code(0) => "ok",
            Self::Code(_) => "error",
            Self::ClientGone => "client_closed",
            Self::EndedByServer(_) => "ended_by_server",
            Self::EndedByOperator => "ended_by_operator",
        }
    }

    /// The audit's `reason`.
    fn reason(self) -> &'static str {
        match self {
            Self::Code(_) => "exited",
            Self::ClientGone => "client_closed",
            Self::EndedByServer(why) => why.label(),
            Self::EndedByOperator => "operator",
        }
    }
}

/// Writes `message` as one stderr line, then exit status 1, EOF and close, waiting for the
/// client no longer than `link`'s connection lasts.
pub async fn refuse(to_client: &ChannelWriteHalf<Msg>, message: &str, tty: bool, link: &Link) {
    say(to_client, message, tty).await;
    finish(to_client, 1, link.ended()).await;
}

/// Writes `message` as one line on the client's stderr (bounded by [`WRITE_LIMIT`]).
async fn say(to_client: &ChannelWriteHalf<Msg>, message: &str, tty: bool) {
    let mut stderr = to_client.make_writer_ext(Some(1));
    let ending = if tty { "\r\n" } else { "\n" };
    let line = format!("{message}{ending}");
    let _ = tokio::time::timeout(WRITE_LIMIT, async {
        let _ = stderr.write_all(line.as_bytes()).await;
        let _ = stderr.flush().await;
    })
    .await;
}

/// Sends the exit status, EOF and close, giving up when `until` resolves. After a normal end
/// that is the connection ending: a client that reads gets them however slow its link (russh
/// queues them behind the output), and one that reads nothing is cut by the socket's own write
/// deadline. When the server ends the session, [`WRITE_LIMIT`].
async fn finish(to_client: &ChannelWriteHalf<Msg>, status: u32, until: impl Future<Output = ()>) {
    tokio::select! {
        () = async {
            let _ = to_client.exit_status(status).await;
            let _ = to_client.eof().await;
            let _ = to_client.close().await;
        } => {}
        () = until => {}
    }
}

/// Refuses a session that cannot start: logged, counted, and `message` told to the person.
async fn unavailable(request: &Request, to_client: &ChannelWriteHalf<Msg>, message: &str) {
    tracing::info!(peer = %request.peer, bench = %request.grant.bench, reason = message, "session not started");
    metrics::session_ended(request.kind(), "error", Duration::ZERO, 0, 0);
    refuse(to_client, message, request.pty.is_some(), &request.link).await;
}

/// Runs `request` until the process ends, the client goes away or the server ends it; the
/// client's input comes from `inbox`, output goes to `to_client`.
pub async fn run(
    app: Arc<App>,
    request: Request,
    inbox: Arc<Inbox>,
    to_client: ChannelWriteHalf<Msg>,
) {
    session(&app, &request, &inbox, &to_client).await;
    // The handler forgets the channel; input still arriving is dropped.
    inbox.close();
}

async fn session(
    app: &Arc<App>,
    request: &Request,
    inbox: &Inbox,
    to_client: &ChannelWriteHalf<Msg>,
) {
    let tty = request.pty.is_some();
    let bench_name = request.grant.bench.clone();
    let bench = match app.benches.lookup(&bench_name) {
        Lookup::Running(bench) => bench,
        Lookup::NotRunning(bench) => {
            let message = format!(
                "benchgate: bench '{bench_name}' is not running (status: {})",
                bench.state
            );
            return unavailable(request, to_client, &message).await;
        }
        Lookup::Unknown => {
            let message =
                format!("benchgate: bench '{bench_name}' is not running (status: no such bench)");
            return unavailable(request, to_client, &message).await;
        }
        Lookup::Ambiguous(containers) => {
            let list: Vec<String> = containers
                .iter()
                .map(|b| {
                    let engine = app.benches.endpoint(b.endpoint);
                    let url = engine.as_ref().map_or("a removed engine", |e| &e.url);
                    format!("{} on {url}", short(&b.container))
                })
                .collect();
            tracing::error!(
                peer = %request.peer, bench = %bench_name, containers = %list.join(", "),
                "session refused: bench is ambiguous, two or more live containers carry its label"
            );
            metrics::session_ended(request.kind(), "ambiguous", Duration::ZERO, 0, 0);
            let message = format!(
                "benchgate: bench '{bench_name}' is ambiguous: {} containers carry its label",
                containers.len()
            );
            return refuse(to_client, &message, tty, &request.link).await;
        }
    };
    // Access through a group holds only while the bench's container carries that group.
    if let Some(group) = &request.grant.via_group {
        if app.benches.group_principal(&bench).as_ref() != Some(group) {
            let message =
                format!("benchgate: your certificate no longer grants bench '{bench_name}'");
            return unavailable(request, to_client, &message).await;
        }
    }
    let Some(_slot) = app.bench_slots.claim(&bench_name) else {
        let message = format!("benchgate: too many sessions into bench '{bench_name}'");
        return unavailable(request, to_client, &message).await;
    };
    // Its engine may have been removed by a reload since the lookup.
    let Some(endpoint) = app.benches.endpoint(bench.endpoint) else {
        let message =
            format!("benchgate: bench '{bench_name}' is not running (status: no such bench)");
        return unavailable(request, to_client, &message).await;
    };
    let started = Instant::now();
    let plan = plan(app, request, &bench);
    let endpoint_url = endpoint.url.clone();
    let (processes, streams) = match Session::start(endpoint, &bench.container, plan, &app.tracker)
        .await
    {
        Ok(started) => started,
        Err(e) => {
            metrics::docker_error(e.op());
            tracing::warn!(bench = %bench_name, container = %bench.container, error = %e, "cannot start session");
            let message = format!("benchgate: bench '{bench_name}' is unavailable: its Docker engine did not start the session");
            return unavailable(request, to_client, &message).await;
        }
    };
    let kind = request.kind();
    metrics::exec_started(started.elapsed());
    let _active = metrics::ActiveSession::open(kind);
    let (listed, mut told) = app
        .live
        .add(about(request, &bench, &endpoint_url, processes.tag()));
    let live = listed.live().clone();
    tracing::info!(peer = %request.peer, bench = %bench_name, container = %bench.container, kind, session = %live.about.id, "session started");
    app.audit
        .record(&Event::about_session(Kind::SessionStart, &live).request(kind));

    let exec::Exec {
        output, mut input, ..
    } = streams;
    let link = request.link.clone();
    let _running = link.session();
    let mut notices = link.subscribe();
    let stdout = Touching::new(to_client.make_writer(), link.clone(), live.clone());
    let stderr = Touching::new(
        to_client.make_writer_ext(Some(1)),
        link.clone(),
        live.clone(),
    );
    let recorder = record(app, request, processes.tag());
    let teed = Teed {
        inner: stdout,
        recorder: recorder.clone(),
        live: live.clone(),
    };
    // The pumps borrow the session's processes; they are gone once the loop has its exit.
    let exit = {
        // Output to the client waits for the client's window: backpressure, not buffering. Once
        // it has ended, the exit status is looked up (bounded Docker calls).
        let pump_out = async {
            let _ = if tty {
                copy_flushed(output, teed).await
            } else {
                exec::demux(output, teed, stderr).await
            };
            exit_status(&processes, to_client, tty).await
        };
        // Input waits for the process to read it; the client meanwhile is held back by its window
        // (see crate::flow), never russh's connection loop.
        let pump_in = async {
            let mut stdin_open = true;
            loop {
                match inbox.next().await {
                    Input::Data(data) => {
                        link.touch();
                        live.received(data.len());
                        // A process that closed its stdin: the rest of the input is dropped.
                        if stdin_open && input.write_all(&data).await.is_err() {
                            stdin_open = false;
                        }
                    }
                    // With a terminal, EOF is a ^D the client types, sent as data; a channel EOF
                    // (`ssh -tt < /dev/null`) must not end the attach, which Docker would treat as
                    // the end of the session. Without one, it is the command's stdin closing.
                    Input::Eof if !tty => {
                        let _ = input.shutdown().await;
                    }
                    Input::Eof => {}
                    Input::Resize(cols, rows) => {
                        if let Some(recorder) = &recorder {
                            lock(recorder).resize(cols, rows);
                        }
                        live.resized(cols, rows);
                        let _ = processes.resize(cols, rows).await;
                    }
                    Input::Closed => return,
                }
            }
        };
        tokio::pin!(pump_out, pump_in);
        loop {
            tokio::select! {
                status = &mut pump_out => {
                    // The recording is complete before the client learns the session is over.
                    if let Some(recorder) = &recorder {
                        lock(recorder).finish();
                    }
                    finish(to_client, status, link.ended()).await;
                    break Exit::Code(status);
                }
                () = &mut pump_in => break Exit::ClientGone,
                () = inbox.closed() => break Exit::ClientGone,
                () = link.closed() => break Exit::ClientGone,
                why = link.ending() => {
                    say(to_client, why.message(), tty).await;
                    finish(to_client, 255, tokio::time::sleep(WRITE_LIMIT)).await;
                    break Exit::EndedByServer(why);
                }
                reason = live.ended_by_operator() => {
                    let message = match reason.as_str() {
                        "" => "benchgate: your session was ended by an operator".to_owned(),
                        reason => format!("benchgate: your session was ended by an operator: {reason}"),
                    };
                    say(to_client, &message, tty).await;
                    finish(to_client, 255, tokio::time::sleep(WRITE_LIMIT)).await;
                    break Exit::EndedByOperator;
                }
                Some(line) = told.recv() => say(to_client, &line, tty).await,
                notice = notices.recv() => match notice {
                    // Warnings are for people at a terminal; a script's stderr is left alone.
                    Ok(Notice::Warn(text)) if tty => say(to_client, &text, tty).await,
                    Ok(Notice::Warn(_)) => {}
                    Ok(Notice::Tell(text)) => say(to_client, &text, tty).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break Exit::ClientGone,
                },
            }
        }
    };
    listed.ended(exit.reason());
    let (bytes_in, bytes_out) = live.bytes();
    metrics::session_ended(kind, exit.outcome(), started.elapsed(), bytes_in, bytes_out);
    tracing::info!(peer = %request.peer, bench = %bench_name, session = %live.about.id, reason = exit.reason(), "session ended");
    let mut event = Event::about_session(Kind::SessionEnd, &live)
        .reason(exit.reason())
        .bytes(bytes_in, bytes_out)
        .duration_ms(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    if let Exit::Code(code) = exit {
        event = event.exit_status(code);
        if let Some(count) = leftovers_reported(&live.tail()) {
            event = event.leftovers(count);
        }
    }
    app.audit.record(&event);
    // Whatever the session left running (background jobs, a process the client abandoned)
    // ends with it.
    let status = match exit {
        Exit::Code(code) => Some(code),
        Exit::ClientGone | Exit::EndedByServer(_) | Exit::EndedByOperator => None,
    };
    // Listed until its processes are gone: an operator who ended it sees when they are.
    if let Some(teardown) = processes.end(status, &app.tracker) {
        app.tracker.spawn(async move {
            if !teardown.await.unwrap_or(false) {
                listed.left_running();
            }
            drop(listed);
        });
    }
}

/// The exit status to report once the output has ended; tells the user when the container
/// itself went away.
async fn exit_status(processes: &Session, to_client: &ChannelWriteHalf<Msg>, tty: bool) -> u32 {
    let code = processes.exit_code().await.ok().flatten();
    // A normal exit needs no more Docker calls; a kill may be the container going down, which
    // Docker reports a moment after the exec's end.
    if let Some(code) = code.filter(|c| (0..128).contains(c)) {
        return code as u32;
    }
    let mut state = String::new();
    for _ in 0..10 {
        state = processes.container_state().await.unwrap_or_default();
        if state != "running" {
            let message = format!(
                "benchgate: the bench container stopped during the session (status: {state})"
            );
            say(to_client, &message, tty).await;
            return code.filter(|c| *c != 0).map_or(255, |c| c as u32);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::debug!(%state, "killed process in a running container");
    code.map_or(255, |c| (c & 0xff) as u32)
}

/// A recording of this PTY session when `session.record_dir` is set; a failure to start one
/// is logged and counted, and the session goes on.
fn record(app: &App, request: &Request, tag: &str) -> Option<Arc<Mutex<Recorder>>> {
    let settings = app.settings();
    let (Some(dir), Some(pty)) = (&settings.session.record_dir.0, &request.pty) else {
        return None;
    };
    let title = format!(
        "{} {}",
        request.grant.bench,
        auth::bounded(&request.grant.key_id)
    );
    match Recorder::create(
        dir,
        &request.grant.bench,
        tag,
        pty.cols,
        pty.rows,
        &pty.term,
        &title,
    ) {
        Ok(recorder) => Some(Arc::new(Mutex::new(recorder))),
        Err(e) => {
            metrics::recording_failed();
            tracing::warn!(dir = %dir.display(), error = %e, "cannot start session recording");
            None
        }
    }
}

fn lock(recorder: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    recorder.lock().unwrap_or_else(|p| p.into_inner())
}

/// A writer that also hands what it writes to the session's recording and its watchers.
struct Teed<W> {
    inner: W,
    recorder: Option<Arc<Mutex<Recorder>>>,
    live: Arc<Live>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Teed<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &written {
            if let Some(recorder) = &self.recorder {
                lock(recorder).output(&buf[..*n]);
            }
            self.live.output(&buf[..*n]);
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies terminal output as it comes, in reads of up to one SSH packet (tokio's `copy`
/// reads 8 KiB at a time, four packets where one would do).
async fn copy_flushed(
    from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> std::io::Result<u64> {
    let mut from = tokio::io::BufReader::with_capacity(exec::CHUNK_BYTES, from);
    let copied = tokio::io::copy_buf(&mut from, &mut to).await?;
    to.flush().await?;
    Ok(copied)
}

/// What to run for `request` in `bench`.
fn plan(app: &App, request: &Request, bench: &Bench) -> Plan {
    let settings = app.settings();
    let session = &settings.session;
    let cmd = match (&request.grant.force_command, &request.command) {
        (Some(forced), _) => vec!["sh".to_owned(), "-c".to_owned(), forced.clone()],
        (None, Some(command)) => vec!["sh".to_owned(), "-c".to_owned(), command.clone()],
        (None, None) if !session.shell.is_empty() => session.shell.clone(),
        (None, None) => vec!["sh".to_owned(), "-c".to_owned(), DEFAULT_SHELL.to_owned()],
    };
    let mut env: Vec<String> = request
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if let Some(pty) = &request.pty {
        env.push(format!("TERM={}", pty.term));
    }
    if let (Some(_), Some(original)) = (&request.grant.force_command, &request.command) {
        env.push(format!("SSH_ORIGINAL_COMMAND={original}"));
    }
    // Escaped and cut: the key ID is the CA's text, and one variable over 128 KiB fails
    // every exec with E2BIG.
    env.push(format!(
        "BENCHGATE_KEY_ID={}",
        auth::bounded(&request.grant.key_id)
    ));
    env.push(format!("BENCHGATE_SERIAL={}", request.grant.serial));
    env.push(format!("BENCHGATE_BENCH={}", request.grant.bench));
    Plan {
        argv: cmd,
        user: bench.user.clone().unwrap_or_else(|| session.user.clone()),
        workdir: bench
            .workdir
            .clone()
            .unwrap_or_else(|| session.working_dir.clone()),
        env,
        tty: request.pty.as_ref().map(|p| (p.cols, p.rows)),
        hangup: session.leftovers == Leftovers::Hangup,
    }
}

/// How many leftovers the wrapper said it ended or hung up, from the end of the output (its
/// line comes last). The command could print the same words: the count is the person's own
/// account of their session, never a decision.
fn leftovers_reported(tail: &[u8]) -> Option<u32> {
    let text = String::from_utf8_lossy(tail);
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let rest = line
        .strip_prefix("benchgate: ended ")
        .or_else(|| line.strip_prefix("benchgate: sent a hangup to "))?;
    let (count, rest) = rest.split_once(' ')?;
    rest.starts_with("background process")
        .then(|| count.parse().ok())?
}

/// What the admin socket lists about the session `request` started in `bench`.
fn about(request: &Request, bench: &Bench, endpoint: &str, id: &str) -> About {
    let grant = &request.grant;
    About {
        id: id.to_owned(),
        bench: grant.bench.clone(),
        container: bench.container.clone(),
        endpoint: endpoint.to_owned(),
        key_id: grant.key_id.clone(),
        serial: grant.serial,
        ca: grant.ca.clone(),
        peer: request.peer,
        kind: request.kind(),
        command: grant.force_command.clone().or(request.command.clone()),
        tty: request.pty.as_ref().map(|pty| (pty.cols, pty.rows)),
        started: std::time::SystemTime::now(),
        valid_before: grant.valid_before,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrappers_leftovers_line_is_counted_when_it_comes_last() {
        let said = |text: &str| leftovers_reported(text.as_bytes());
        assert_eq!(
            said("out\nbenchgate: ended 2 background processes left by this session (sleep)\n"),
            Some(2)
        );
        assert_eq!(
            said("benchgate: sent a hangup to 1 background process left by this session (x)\r\n"),
            Some(1)
        );
        assert_eq!(
            said("benchgate: ended 2 background processes left\nmore output\n"),
            None
        );
        assert_eq!(said("benchgate: ended many background processes\n"), None);
        assert_eq!(said(""), None);
    }
}
