//! The daemon's side of the admin socket: a safe place for the socket file, who may connect
//! (`SO_PEERCRED`), and the requests, each audited with the caller's uid.

use std::ffi::CString;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::{read_line, EndedInfo, Line, Reply, Request, Select, SessionInfo, Status, WatchFrame};
use crate::app::App;
use crate::audit::{Event, Kind};
use crate::auth::bounded;
use crate::config;
use crate::live::{Frame, Live};
use crate::metrics;

/// Admin connections at once (watchers included); more are told to come back later.
const MAX_CONNECTIONS: usize = 64;
/// Longest request line.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long a connection may take to send its next whole request.
const REQUEST_WAIT: Duration = Duration::from_secs(30);
/// How long one reply (or watch frame) may wait for the peer to read.
const WRITE_LIMIT: Duration = Duration::from_secs(5);
/// How long an `end` waits for the sessions it ended to be gone (their processes ended)
/// before it replies.
const END_WAIT: Duration = Duration::from_secs(10);
/// How long a user database lookup (group membership) may take.
const LOOKUP_LIMIT: Duration = Duration::from_secs(2);
/// Watches at once, within [`MAX_CONNECTIONS`]: the rest stay free for `sessions` and `end`.
const MAX_WATCHES: usize = 16;
/// What a watched person is told, once per session, when `[admin] announce_watch` is on.
pub const WATCH_NOTICE: &str = "benchgate: support staff are now watching this session (read-only)";

/// Who may use the socket: root, the daemon's own user, and the members of `[admin] group`.
#[derive(Debug, Clone)]
struct Access {
    daemon: u32,
    group: Option<(String, u32)>,
}

impl Access {
    /// Root, the daemon's user (this process's), and `[admin] group` if it names a group.
    fn from_config(admin: &config::Admin) -> anyhow::Result<Self> {
        let group = match admin.group.as_str() {
            "" => None,
            name => {
                let group = nix::unistd::Group::from_name(name)
                    .ok()
                    .flatten()
                    .with_context(|| format!("admin.group: no group named {name:?}"))?;
                Some((name.to_owned(), group.gid.as_raw()))
            }
        };
        Ok(Self {
            daemon: nix::unistd::geteuid().as_raw(),
            group,
        })
    }

    /// Whether `uid` (with primary group `gid`) may use the socket. Group membership comes
    /// from the user database, which may be remote (LDAP, sssd): looked up off the runtime's
    /// threads, and refused when it does not answer in time.
    async fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || uid == self.daemon {
            return true;
        }
        let Some((_, group)) = self.group.clone() else {
            return false;
        };
        if gid == group {
            return true;
        }
        let lookup = tokio::task::spawn_blocking(move || groups_of(uid).contains(&group));
        matches!(
            tokio::time::timeout(LOOKUP_LIMIT, lookup).await,
            Ok(Ok(true))
        )
    }

    fn who(&self) -> String {
        match &self.group {
            None => "root and the daemon's user".to_owned(),
            Some((name, _)) => format!("root, the daemon's user and members of group {name}"),
        }
    }
}

/// The groups of the account `uid` (from the system's user database).
fn groups_of(uid: u32) -> Vec<u32> {
    use nix::unistd::{getgrouplist, User};
    let Ok(Some(user)) = User::from_uid(uid.into()) else {
        return Vec::new();
    };
    let Ok(name) = CString::new(user.name) else {
        return Vec::new();
    };
    getgrouplist(&name, user.gid)
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default()
}

/// The bound admin socket; its file is removed when this is dropped (if it is still ours).
#[derive(Debug)]
pub struct Socket {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
    access: Access,
    /// Where [`Socket::publish`] moves it (a takeover's socket, bound beside the old one).
    published: Option<PathBuf>,
}

impl Socket {
    /// Moves a takeover's socket over the running daemon's path (atomically: a client reaches
    /// one or the other).
    pub fn publish(&mut self) -> anyhow::Result<()> {
        if let Some(path) = self.published.take() {
            std::fs::rename(&self.path, &path)
                .with_context(|| format!("admin.socket {}", path.display()))?;
            self.path = path;
        }
        Ok(())
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the socket `[admin]` names, if it names one. Refuses a directory others can write to,
/// a path that is something other than a socket, and a socket another process answers on; a
/// stale socket is replaced. For a `takeover` it is bound next to the running daemon's
/// (`PATH.PID`) and replaces it with [`Socket::publish`] once the takeover is confirmed. A
/// socket at the default path that cannot be bound (no `RuntimeDirectory`, not root) is
/// reported and left out: the daemon serves without it.
pub async fn bind(admin: &config::Admin, takeover: bool) -> anyhow::Result<Option<Socket>> {
    let Some(path) = &admin.socket.0 else {
        return Ok(None);
    };
    let access = Access::from_config(admin)?;
    let result = match takeover {
        false => open(path, access).await,
        true => {
            let own = PathBuf::from(format!("{}.{}", path.display(), std::process::id()));
            open(&own, access).await.map(|mut socket| {
                socket.published = Some(path.clone());
                socket
            })
        }
    };
    match result {
        Ok(socket) => Ok(Some(socket)),
        Err(e) if path.as_os_str() == config::DEFAULT_ADMIN_SOCKET => {
            tracing::warn!(
                error = %format!("{e:#}"),
                "no admin socket: `benchgate sessions` will not reach this daemon"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn open(path: &Path, access: Access) -> anyhow::Result<Socket> {
    let context = || format!("admin.socket {}", path.display());
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(dir)
            .with_context(|| {
                format!(
                    "{}: cannot create {} (run under systemd with RuntimeDirectory=benchgate, \
                     choose another path, or set it to \"\" to turn the socket off)",
                    context(),
                    dir.display()
                )
            })?;
    }
    let meta = std::fs::metadata(dir).with_context(context)?;
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{}: its directory {} is writable by others (mode {:04o}), who could replace the \
             socket; use a directory only benchgate's user can write, like /run/benchgate",
            context(),
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    if meta.uid() != 0 && meta.uid() != access.daemon {
        bail!(
            "{}: its directory {} belongs to uid {}, who could replace the socket",
            context(),
            dir.display(),
            meta.uid()
        );
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{}: the path exists and is not a socket; benchgate does not replace it",
                context()
            );
        }
        let probe = tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await;
        match probe {
            // Left by a daemon that did not get to remove it.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).with_context(context)?
            }
            Ok(Err(e)) => bail!("{}: cannot tell whether it is in use: {e}", context()),
            Ok(Ok(_)) | Err(_) => bail!(
                "{}: another process (another benchgate?) is serving on it",
                context()
            ),
        }
    }
    let listener = UnixListener::bind(path).with_context(context)?;
    let mode = if access.group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(context)?;
    let meta = std::fs::symlink_metadata(path).with_context(context)?;
    if let Some((name, gid)) = &access.group {
        // Not needed when the group is the daemon's own (the shipped unit forbids chown).
        if meta.gid() != *gid {
            nix::unistd::chown(path, None, Some((*gid).into())).with_context(|| {
                format!(
                    "{}: cannot give the socket to group {name} (under the shipped systemd \
                     unit, use the service's own group, `[admin] group = \"benchgate\"`, and \
                     add operators to it)",
                    context()
                )
            })?;
        }
    }
    Ok(Socket {
        listener,
        path: path.to_owned(),
        inode: (meta.dev(), meta.ino()),
        access,
        published: None,
    })
}

/// What `check-config` says about the admin socket: where it is and who may use it.
pub fn describe(admin: &config::Admin) -> anyhow::Result<String> {
    let access = Access::from_config(admin)?;
    Ok(match &admin.socket.0 {
        None => "admin socket off".to_owned(),
        Some(path) => format!(
            "admin socket {} for {} (`benchgate sessions`)",
            path.display(),
            access.who()
        ),
    })
}

/// Serves the admin socket for as long as the daemon runs (through a shutdown's grace too);
/// its file is removed when the task is dropped.
pub async fn serve(app: Arc<App>, socket: Socket) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let watches = Arc::new(Semaphore::new(MAX_WATCHES));
    let access = Arc::new(socket.access.clone());
    loop {
        let stream = match socket.listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (app, access, watches) = (app.clone(), access.clone(), watches.clone());
        match places.clone().try_acquire_owned() {
            Ok(place) => tokio::spawn(async move {
                connection(&app, &access, &watches, stream).await;
                drop(place);
            }),
            Err(_) => tokio::spawn(async move {
                let mut stream = stream;
                let busy = Reply::error("too many admin connections at once; try again");
                let _ = send(&mut stream, &busy).await;
            }),
        };
    }
}

/// Counts, logs and audits one request of `uid`; `error` says why it was not carried out.
fn account(app: &App, uid: u32, request: &'static str, error: Option<&str>, session: Option<&str>) {
    let result = match error {
        None => "ok",
        Some(e) if e.starts_with("uid ") => "refused",
        Some(_) => "error",
    };
    metrics::admin_request(request, result);
    tracing::info!(uid, request, result, error, session, "admin request");
    let mut event = Event::local(Kind::AdminRequest)
        .uid(uid)
        .request(request)
        .reason(error.unwrap_or("ok"));
    if let Some(id) = session {
        event = event.session(id);
    }
    app.audit.record(&event);
}

/// Answers the requests of one connection, in order.
async fn connection(app: &Arc<App>, access: &Access, watches: &Arc<Semaphore>, stream: UnixStream) {
    let Ok(cred) = stream.peer_cred() else {
        return;
    };
    let uid = cred.uid();
    let (read, mut write) = stream.into_split();
    if !access.allows(uid, cred.gid()).await {
        let error = format!(
            "uid {uid} may not use the admin socket (allowed: {})",
            access.who()
        );
        account(app, uid, "other", Some(&error), None);
        let _ = send(&mut write, &Reply::error(error)).await;
        return;
    }
    let mut reader = BufReader::new(read);
    loop {
        let line =
            match tokio::time::timeout(REQUEST_WAIT, read_line(&mut reader, MAX_REQUEST_BYTES))
                .await
            {
                Ok(Ok(Line::Whole(line))) => line,
                Ok(Ok(Line::Closed) | Err(_)) => return,
                problem => {
                    let error = match problem {
                        Ok(Ok(Line::TooLong)) => "the request is longer than 64 KiB",
                        Ok(Ok(Line::Cut)) => "the request ended before its newline",
                        _ => "no whole request line came within 30 seconds",
                    };
                    account(app, uid, "other", Some(error), None);
                    let _ = send(&mut write, &Reply::error(error)).await;
                    return;
                }
            };
        let request = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => request,
            Err(e) => {
                let error = bounded(&format!("not a request: {e}"));
                account(app, uid, "other", Some(&error), None);
                if send(&mut write, &Reply::error(error)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let label = request.label();
        let reply = match request {
            Request::Sessions { select } => Reply {
                ok: true,
                sessions: Some(matching(app, &select).iter().map(|l| info(l)).collect()),
                ..Reply::default()
            },
            Request::End { select, reason } => end(app, uid, &select, &reason).await,
            Request::Watch { id } => {
                let Ok(_place) = watches.clone().try_acquire_owned() else {
                    let error = format!("too many watchers at once ({MAX_WATCHES}); try again");
                    account(app, uid, label, Some(&error), Some(&id));
                    let _ = send(&mut write, &Reply::error(error)).await;
                    return;
                };
                return watch(app, uid, &id, reader, write).await;
            }
            Request::Status => Reply {
                ok: true,
                status: Some(Status {
                    pid: std::process::id(),
                    endpoints: app.benches.configured(),
                    draining: app.handover.draining(),
                    conflicts: {
                        let c = app.benches.conflicts();
                        c.ambiguous.into_iter().chain(c.ignored_groups).collect()
                    },
                }),
                ..Reply::default()
            },
            // Only a daemon of the bastion's own user (or root) may take its listeners.
            Request::Takeover { .. } if uid != 0 && uid != access.daemon => {
                let error = format!(
                    "uid {uid} may not take over the listeners (root and the daemon's user may)"
                );
                account(app, uid, label, Some(&error), None);
                let _ = send(&mut write, &Reply::error(error)).await;
                return;
            }
            Request::Takeover { listen, metrics } => {
                if let Ok(stream) = reader.into_inner().reunite(write) {
                    takeover(app, uid, stream, listen, metrics).await;
                }
                return;
            }
        };
        account(app, uid, label, reply.error.as_deref(), None);
        if send(&mut write, &reply).await.is_err() {
            return;
        }
    }
}

/// Hands the listeners over on `stream` to the new daemon asking for them (see
/// [`crate::listeners`]); once it accepts, this daemon stops accepting and drains.
async fn takeover(
    app: &Arc<App>,
    uid: u32,
    stream: UnixStream,
    listen: Vec<SocketAddr>,
    metrics: Option<SocketAddr>,
) {
    let Ok(stream) = stream.into_std() else {
        return;
    };
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    let handover = app.clone();
    let result =
        tokio::task::spawn_blocking(move || handover.handover.give(stream, &listen, metrics))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
    account(
        app,
        uid,
        "takeover",
        result.as_ref().err().map(String::as_str),
        None,
    );
    match result {
        Ok(()) => {
            tracing::info!(
                drain_limit = ?app.server.drain_limit.0,
                "listeners handed over to a new process: draining (live sessions run on)"
            );
            // Recorded first: with no session left, the daemon exits right after.
            app.handover.stop_accepting.cancel();
        }
        Err(error) => tracing::warn!(%error, "no takeover: serving on"),
    }
}

/// Writes `message` as one JSON line, bounded by [`WRITE_LIMIT`].
async fn send(
    to: &mut (impl AsyncWrite + Unpin),
    message: &impl serde::Serialize,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    match tokio::time::timeout(WRITE_LIMIT, to.write_all(&line)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The live sessions `select` names.
fn matching(app: &App, select: &Select) -> Vec<Arc<Live>> {
    app.live
        .all()
        .into_iter()
        .filter(|live| {
            let about = &live.about;
            select.id.as_ref().is_none_or(|id| *id == about.id)
                && select.bench.as_ref().is_none_or(|b| *b == about.bench)
                // The key ID as given, or as listed (escaped and cut).
                && select
                    .key_id
                    .as_ref()
                    .is_none_or(|k| *k == about.key_id || *k == bounded(&about.key_id))
                && select.serial.is_none_or(|s| s == about.serial)
                && select.ca.as_ref().is_none_or(|ca| *ca == about.ca)
        })
        .collect()
}

fn no_match(select: &Select) -> String {
    match select {
        Select {
            id: Some(id),
            bench: None,
            key_id: None,
            serial: None,
            ca: None,
        } => format!(
            "no live session has id {} (it may have ended; `benchgate sessions` lists them)",
            bounded(id)
        ),
        _ => format!("no live session matches {}", select.spoken()),
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A live session as the socket lists it.
fn info(live: &Live) -> SessionInfo {
    let about = &live.about;
    let (bytes_in, bytes_out) = live.bytes();
    SessionInfo {
        id: about.id.clone(),
        bench: about.bench.clone(),
        container: about.container.clone(),
        endpoint: about.endpoint.clone(),
        key_id: bounded(&about.key_id),
        serial: about.serial,
        ca: about.ca.clone(),
        peer: about.peer.to_string(),
        kind: about.kind.to_owned(),
        state: match live.ended() {
            None => "running".to_owned(),
            Some(reason) => format!("ending ({reason})"),
        },
        command: about.command.as_deref().map(bounded),
        tty: about.tty,
        started: rfc3339(about.started),
        idle_seconds: live.idle_for().as_secs(),
        bytes_in,
        bytes_out,
        valid_before: rfc3339(
            SystemTime::UNIX_EPOCH + Duration::from_secs(about.valid_before.min(253_402_300_799)),
        ),
    }
}

/// Ends the sessions `select` names, telling each person `reason`, and waits (bounded) until
/// they are gone.
async fn end(app: &App, uid: u32, select: &Select, reason: &str) -> Reply {
    if select.is_everything() {
        return Reply::error("say which sessions to end: an id, --key-id, --serial or --bench");
    }
    let matched = matching(app, select);
    if matched.is_empty() {
        return Reply::no_match(no_match(select));
    }
    // Serials are unique per CA only (and 0 when the CA gave none).
    if let (Some(serial), None) = (select.serial, &select.ca) {
        let mut cas: Vec<&str> = matched.iter().map(|l| l.about.ca.as_str()).collect();
        cas.sort_unstable();
        cas.dedup();
        if cas.len() > 1 {
            return Reply::error(format!(
                "serial {serial} names certificates of {} CAs ({}): add --ca",
                cas.len(),
                cas.join(", ")
            ));
        }
    }
    let reason = bounded(reason.trim());
    let fresh: Vec<bool> = matched
        .iter()
        .map(|live| {
            let fresh = live.end_by_operator(&reason);
            if fresh {
                tracing::info!(uid, session = %live.about.id, bench = %live.about.bench, reason = %reason, "session ended by an operator");
                app.audit.record(
                    &Event::about_session(Kind::SessionEndedByOperator, live)
                        .uid(uid)
                        .reason(reason.clone()),
                );
            }
            fresh
        })
        .collect();
    let gone = futures_util::future::join_all(
        matched
            .iter()
            .map(|live| async { tokio::time::timeout(END_WAIT, live.gone()).await.is_ok() }),
    )
    .await;
    let ended = matched
        .iter()
        .zip(fresh.into_iter().zip(gone))
        .map(|(live, (fresh, gone))| EndedInfo {
            session: info(live),
            state: match (fresh, gone) {
                (false, _) => "already ending",
                (true, true) if live.left_running() => {
                    "ended, but its processes may still run (teardown gave up)"
                }
                (true, true) => "ended",
                (true, false) => "ending",
            }
            .to_owned(),
        })
        .collect();
    Reply {
        ok: true,
        ended: Some(ended),
        ..Reply::default()
    }
}

/// Streams the terminal output of session `id` until it ends or the watcher goes away.
async fn watch(
    app: &App,
    uid: u32,
    id: &str,
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
) {
    let live = app.live.get(id);
    let watching = live.as_ref().and_then(|live| live.watch());
    let (live, mut watching) = match (live, watching) {
        (Some(live), Some(watching)) => (live, watching),
        (live, _) => {
            let error = match live {
                None => no_match(&Select {
                    id: Some(id.to_owned()),
                    ..Select::default()
                }),
                Some(_) => format!(
                    "session {} has no terminal: only terminal sessions can be watched",
                    bounded(id)
                ),
            };
            account(app, uid, "watch", Some(&error), Some(id));
            let _ = send(&mut write, &Reply::no_match(error)).await;
            return;
        }
    };
    account(app, uid, "watch", None, Some(id));
    if watching.first && app.admin.announce_watch {
        live.tell(WATCH_NOTICE.to_owned());
    }
    let reply = Reply {
        ok: true,
        watching: Some(info(&live)),
        ..Reply::default()
    };
    // The session's end must not wait on this watcher's handle.
    drop(live);
    let output =
        |bytes: &[u8]| WatchFrame::Output(base64::engine::general_purpose::STANDARD.encode(bytes));
    if send(&mut write, &reply).await.is_err()
        || send(&mut write, &output(&watching.recent)).await.is_err()
    {
        return;
    }
    loop {
        let frame = tokio::select! {
            frame = watching.frames.recv() => frame,
            // The watcher closed its end (Ctrl-C) or sent something it should not.
            _ = reader.fill_buf() => return,
        };
        let (frame, last) = match frame {
            Some(Frame::Output(bytes)) => (output(&bytes), false),
            Some(Frame::Dropped(n)) => (WatchFrame::Dropped(n), false),
            Some(Frame::Resized(cols, rows)) => (WatchFrame::Resized(cols, rows), false),
            Some(Frame::Ended(reason)) => (WatchFrame::Ended(reason), true),
            None => (WatchFrame::Ended("ended".to_owned()), true),
        };
        if send(&mut write, &frame).await.is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn root_and_the_daemons_user_are_allowed_others_only_through_the_group() {
        let alone = Access {
            daemon: 1000,
            group: None,
        };
        assert!(alone.allows(0, 0).await);
        assert!(alone.allows(1000, 1000).await);
        assert!(!alone.allows(65534, 65534).await);
        let with_group = Access {
            daemon: 1000,
            group: Some(("ops".into(), 4242)),
        };
        assert!(with_group.allows(65534, 4242).await, "primary group");
        assert!(!with_group.allows(65534, 65534).await);
    }
}
