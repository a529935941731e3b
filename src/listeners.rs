//! Where the listening sockets come from: bound from the config, inherited from systemd
//! (socket activation), or taken over from the running daemon through its admin socket
//! (`SCM_RIGHTS`); and the running daemon's side of that handover.
//!
//! A takeover, on the admin socket:
//! ```text
//! new -> {"op":"takeover","listen":["127.0.0.1:2222"],"metrics":"127.0.0.1:9102"}
//! old -> {"ok":true,"handed":{...}}            with the sockets attached (SSH, then metrics)
//! new -> {"accepting":true}                    once ready to serve
//! old -> {"ok":true}                           and stops accepting, drains, exits 0
//!        (the new daemon starts accepting; connections meanwhile wait in the queues)
//! ```
//! Until the last line the old daemon serves as before: a new daemon that dies or says
//! anything else aborts the takeover and nothing changes.

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context as _};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::admin::{Reply, Request};
use crate::config::Config;

/// How long each step of a handover may take.
const STEP_LIMIT: Duration = Duration::from_secs(30);
/// Most sockets one handover carries.
const MAX_SOCKETS: usize = 16;
/// Longest line of a handover.
const MAX_LINE: usize = 64 * 1024;
/// Longest answer of a new daemon (`{"accepting":true}`).
const MAX_ANSWER: usize = 64;

/// The daemon's listening sockets.
#[derive(Debug)]
pub struct Listeners {
    /// SSH.
    pub ssh: Vec<TcpListener>,
    /// `/metrics` and `/health`.
    pub metrics: Option<TcpListener>,
}

/// What the old daemon handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    /// The old daemon's process id.
    pub pid: u32,
    /// The SSH listeners' addresses, in the order of the sockets.
    pub ssh: Vec<SocketAddr>,
    /// The metrics listener's address, its socket last.
    pub metrics: Option<SocketAddr>,
}

impl Listeners {
    /// Binds what `config` names.
    pub fn bind(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            ssh: config
                .server
                .listen
                .0
                .iter()
                .map(|addr| bind(addr, "server.listen"))
                .collect::<anyhow::Result<_>>()?,
            metrics: bind_metrics(config)?,
        })
    }

    /// The SSH listeners systemd passed (`LISTEN_FDS`, `LISTEN_PID`), if it passed any; the
    /// metrics listener is bound from `config`. `server.listen` is then not used.
    pub fn from_systemd(config: &Config) -> anyhow::Result<Option<Self>> {
        let mut fds = listenfd::ListenFd::from_env();
        if fds.len() == 0 {
            return Ok(None);
        }
        let mut ssh = Vec::new();
        for index in 0..fds.len() {
            match fds.take_tcp_listener(index) {
                Ok(Some(listener)) => ssh.push(listener),
                Ok(None) => {}
                Err(e) => bail!("socket activation: socket {index} is not a TCP listener: {e}"),
            }
        }
        Ok(Some(Self {
            ssh,
            metrics: bind_metrics(config)?,
        }))
    }

    /// Takes the listening sockets of the daemon serving the admin socket `config` names; it
    /// must listen where `config` says. Returns them and the connection to finish the
    /// handover on once they accept ([`finish_takeover`]).
    pub fn take_over(config: &Config) -> anyhow::Result<(Self, Handed, UnixStream)> {
        let Some(path) = &config.admin.socket.0 else {
            bail!("--takeover needs the admin socket ([admin] socket is off)");
        };
        let mut stream = UnixStream::connect(path).with_context(|| {
            format!(
                "--takeover: cannot reach the running daemon at {}",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(STEP_LIMIT))?;
        stream.set_write_timeout(Some(STEP_LIMIT))?;
        let request = Request::Takeover {
            listen: config.server.listen.0.clone(),
            metrics: config.metrics.listen.0,
        };
        write_line(&mut stream, &request)?;
        let (line, fds) = receive(&stream)?;
        let reply: Reply = serde_json::from_slice(&line).with_context(|| {
            format!(
                "--takeover: unreadable answer: {}",
                String::from_utf8_lossy(&line)
            )
        })?;
        if let Some(error) = reply.error {
            bail!("--takeover refused by the running daemon: {error}");
        }
        let handed = reply
            .handed
            .context("--takeover: the running daemon handed nothing over")?;
        let expected = handed.ssh.len() + usize::from(handed.metrics.is_some());
        if fds.len() != expected {
            bail!(
                "--takeover: {} sockets came, {expected} were announced",
                fds.len()
            );
        }
        let mut sockets = fds.into_iter().map(TcpListener::from);
        let ssh: Vec<TcpListener> = sockets.by_ref().take(handed.ssh.len()).collect();
        let metrics = sockets.next();
        for (listener, addr) in ssh.iter().zip(&handed.ssh) {
            if listener.local_addr()? != *addr {
                bail!("--takeover: a socket is not the listener {addr} it was announced as");
            }
        }
        Ok((Self { ssh, metrics }, handed, stream))
    }
}

fn bind(addr: &SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("{key}: cannot bind {addr}"))
}

fn bind_metrics(config: &Config) -> anyhow::Result<Option<TcpListener>> {
    config
        .metrics
        .listen
        .0
        .as_ref()
        .map(|addr| bind(addr, "metrics.listen"))
        .transpose()
}

/// Tells the old daemon that the new one accepts on the sockets: it stops accepting.
pub fn finish_takeover(mut stream: UnixStream) -> anyhow::Result<()> {
    write_line(&mut stream, &Accepting { accepting: true })?;
    let (line, _) = receive(&stream)?;
    let reply: Reply = serde_json::from_slice(&line).context("unreadable answer")?;
    match reply.error {
        None => Ok(()),
        Some(error) => bail!("{error}"),
    }
}

/// The new daemon's last line of a takeover.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Accepting {
    accepting: bool,
}

fn write_line(stream: &mut UnixStream, message: &impl Serialize) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

/// One line (sent in one message), with the sockets attached to it.
fn receive(stream: &UnixStream) -> anyhow::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    while !line.contains(&b'\n') {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if received.bytes == 0 {
            bail!("the other daemon closed the connection");
        }
        line.extend_from_slice(&buf[..received.bytes]);
        if line.len() > MAX_LINE {
            bail!("the other daemon's line is too long");
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    line.truncate(end);
    Ok((line, fds))
}

/// Where a daemon is in handing its sockets over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    HandingOver,
    Draining,
}

/// The running daemon's side of a takeover: its listening sockets (duplicates, to hand over),
/// and what stops its accept loops once the new daemon accepts.
#[derive(Debug)]
pub struct Handover {
    held: Mutex<Option<(Handed, Vec<OwnedFd>)>>,
    phase: Mutex<Phase>,
    /// Cancelled once the listeners are handed over: accept loops end, the daemon drains.
    pub stop_accepting: CancellationToken,
}

impl Default for Handover {
    fn default() -> Self {
        Self {
            held: Mutex::new(None),
            phase: Mutex::new(Phase::Serving),
            stop_accepting: CancellationToken::new(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Handover {
    /// Keeps duplicates of `listeners` to hand over later.
    pub fn hold(&self, listeners: &Listeners) -> std::io::Result<()> {
        let mut fds = Vec::new();
        let mut ssh = Vec::new();
        for listener in &listeners.ssh {
            ssh.push(listener.local_addr()?);
            fds.push(listener.as_fd().try_clone_to_owned()?);
        }
        let metrics = match &listeners.metrics {
            Some(listener) => {
                fds.push(listener.as_fd().try_clone_to_owned()?);
                Some(listener.local_addr()?)
            }
            None => None,
        };
        let handed = Handed {
            pid: std::process::id(),
            ssh,
            metrics,
        };
        *lock(&self.held) = Some((handed, fds));
        Ok(())
    }

    /// Whether the listeners were handed over and the daemon is draining.
    pub fn draining(&self) -> bool {
        *lock(&self.phase) == Phase::Draining
    }

    /// Hands the sockets over on `stream` to a new daemon that listens on `listen` and
    /// `metrics`, then waits for it to accept; `Ok` once this daemon must stop accepting
    /// (the caller cancels [`Handover::stop_accepting`] once it has recorded it). Blocking:
    /// run it off the runtime.
    pub fn give(
        &self,
        mut stream: UnixStream,
        listen: &[SocketAddr],
        metrics: Option<SocketAddr>,
    ) -> Result<(), String> {
        {
            let mut phase = lock(&self.phase);
            match *phase {
                Phase::Serving => *phase = Phase::HandingOver,
                Phase::HandingOver => {
                    return refuse(&mut stream, "a takeover is already under way")
                }
                Phase::Draining => {
                    return refuse(
                        &mut stream,
                        "this daemon has handed its listeners over already",
                    )
                }
            }
        }
        let result = self.exchange(&mut stream, listen, metrics);
        let mut phase = lock(&self.phase);
        match &result {
            Ok(()) => {
                *phase = Phase::Draining;
                // The new daemon has its own; these must not keep the ports open here.
                *lock(&self.held) = None;
            }
            Err(_) => *phase = Phase::Serving,
        }
        result
    }

    fn exchange(
        &self,
        stream: &mut UnixStream,
        listen: &[SocketAddr],
        metrics: Option<SocketAddr>,
    ) -> Result<(), String> {
        let fail = |e: std::io::Error| e.to_string();
        stream.set_read_timeout(Some(STEP_LIMIT)).map_err(fail)?;
        stream.set_write_timeout(Some(STEP_LIMIT)).map_err(fail)?;
        let held = lock(&self.held);
        let Some((handed, fds)) = held.as_ref() else {
            drop(held);
            return refuse(stream, "this daemon holds no listeners to hand over");
        };
        if handed.ssh != listen || handed.metrics != metrics {
            let error = format!(
                "a takeover needs the same listeners: this daemon listens on {:?} (metrics {:?}), the new config on {listen:?} (metrics {metrics:?})",
                handed.ssh, handed.metrics
            );
            drop(held);
            return refuse(stream, &error);
        }
        let reply = Reply {
            ok: true,
            handed: Some(handed.clone()),
            ..Reply::default()
        };
        let mut line = serde_json::to_vec(&reply).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
            drop(held);
            return refuse(stream, "too many listeners to hand over");
        }
        let sent = sendmsg(
            &*stream,
            &[IoSlice::new(&line)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| e.to_string())?;
        drop(held);
        if sent != line.len() {
            return Err("the handover line was cut".to_owned());
        }
        // The new daemon says it is ready to accept on them (it accepts once answered). One
        // deadline for the whole answer: a peer trickling bytes cannot hold the handover.
        let deadline = std::time::Instant::now() + STEP_LIMIT;
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\n") && answer.len() < MAX_ANSWER {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                return Err("the new daemon did not say it accepts in time".to_owned());
            }
            match stream.read(&mut byte) {
                Ok(0) => return Err("the new daemon went away before it accepted".to_owned()),
                Ok(_) => answer.push(byte[0]),
                Err(e) => return Err(format!("the new daemon did not say it accepts: {e}")),
            }
        }
        match serde_json::from_slice::<Accepting>(answer.trim_ascii_end()) {
            Ok(Accepting { accepting: true }) => {
                let _ = write_line(
                    stream,
                    &Reply {
                        ok: true,
                        ..Reply::default()
                    },
                );
                Ok(())
            }
            _ => Err("the new daemon did not say it accepts".to_owned()),
        }
    }
}

/// Answers `error` on `stream` and returns it.
fn refuse(stream: &mut UnixStream, error: &str) -> Result<(), String> {
    let _ = write_line(stream, &Reply::error(error));
    Err(error.to_owned())
}
