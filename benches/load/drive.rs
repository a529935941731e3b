//! What the harness does to each target: an SSH login (russh client, certificate auth), a
//! command to its exit status, a bulk read, keystrokes in a terminal, an idle shell; and the
//! same work done straight through the Docker API (the floor).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use benchgate::docker::exec::{self, Exec, Spec};
use benchgate::docker::Endpoint;
use russh::client::{self, Handle};
use russh::keys::{Certificate, PrivateKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::lab::BENCH;

/// Accepts any host key: the harness measures, it does not protect a login.
pub struct Client;

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// A way in to the bench: an SSH bastion, or the Docker API itself.
#[derive(Clone)]
pub enum Target {
    Ssh(Arc<Ssh>),
    Floor {
        endpoint: Arc<Endpoint>,
        container: String,
    },
}

/// An SSH bastion and the certificate to log in with.
pub struct Ssh {
    pub addr: SocketAddr,
    pub user: String,
    pub key: Arc<PrivateKey>,
    pub cert: Certificate,
    pub config: Arc<client::Config>,
}

/// An open terminal session: keystrokes in, output out (read by a task of its own, the
/// same for every target).
pub struct Terminal {
    input: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    output: tokio::sync::mpsc::Receiver<Vec<u8>>,
    _connection: Option<Handle<Client>>,
}

impl Ssh {
    pub fn new(addr: SocketAddr, key: Arc<PrivateKey>, cert: Certificate, user: &str) -> Self {
        let config = client::Config {
            nodelay: true,
            inactivity_timeout: None,
            ..Default::default()
        };
        Self {
            addr,
            user: user.to_owned(),
            key,
            cert,
            config: Arc::new(config),
        }
    }

    /// Key exchange and certificate authentication.
    pub async fn login(&self) -> anyhow::Result<Handle<Client>> {
        let mut handle = client::connect(self.config.clone(), self.addr, Client)
            .await
            .context("connect")?;
        let auth = handle
            .authenticate_openssh_cert(&self.user, self.key.clone(), self.cert.clone())
            .await
            .context("authenticate")?;

        if !auth.success() {
            bail!("certificate refused by {}", self.addr);
        }
        Ok(handle)
    }
}

async fn disconnect(handle: Handle<Client>) {
    let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
}

fn spec(command: &str, tty: bool) -> Spec {
    Spec {
        cmd: vec!["sh".into(), "-c".into(), command.into()],
        user: "frappe".into(),
        workdir: "/home/frappe/frappe-bench".into(),
        env: vec![format!("BENCHGATE_BENCH={BENCH}")],
        tty: tty.then_some((80, 24)),
    }
}

impl Target {
    /// Logs in and out again; the floor has no login.
    pub async fn handshake(&self) -> anyhow::Result<()> {
        match self {
            Target::Ssh(ssh) => {
                disconnect(ssh.login().await?).await;
                Ok(())
            }
            Target::Floor { .. } => bail!("the floor has no handshake"),
        }
    }

    /// Runs `command` without a terminal; returns its exit status and the output bytes seen.
    pub async fn run(&self, command: &str) -> anyhow::Result<(u32, u64)> {
        match self {
            Target::Ssh(ssh) => {
                let handle = ssh.login().await?;
                let mut channel = handle.channel_open_session().await?;
                channel.exec(true, command).await?;
                let (mut status, mut bytes) = (None, 0u64);
                while let Some(message) = channel.wait().await {
                    match message {
                        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                            bytes += data.len() as u64
                        }
                        ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                        ChannelMsg::Failure => bail!("exec refused"),
                        ChannelMsg::Close => break,
                        _ => {}
                    }
                }
                disconnect(handle).await;
                Ok((status.context("no exit status")?, bytes))
            }
            Target::Floor {
                endpoint,
                container,
            } => {
                let started =
                    Exec::start(endpoint.clone(), container, &spec(command, false)).await?;
                let (endpoint, id) = started.id();
                let bytes =
                    exec::demux(started.output, tokio::io::sink(), tokio::io::sink()).await?;
                let code = exec::exit_code(&endpoint, &id)
                    .await?
                    .context("no exit code")?;
                Ok((code as u32, bytes))
            }
        }
    }

    /// Sends `bytes` zeros through `cat` (stdin in, stdout out, at once); returns the bytes
    /// that came back.
    pub async fn cat(&self, bytes: u64) -> anyhow::Result<u64> {
        async fn feed(
            mut input: impl tokio::io::AsyncWrite + Unpin,
            bytes: u64,
        ) -> anyhow::Result<()> {
            let block = vec![0u8; 32 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                input.write_all(&block[..n]).await?;
                left -= n as u64;
            }
            input.shutdown().await?;
            Ok(())
        }
        match self {
            Target::Ssh(ssh) => {
                let handle = ssh.login().await?;
                let channel = handle.channel_open_session().await?;
                channel.exec(true, "cat").await?;
                let (mut read, write) = channel.split();
                let writer = tokio::spawn(feed(write.make_writer(), bytes));
                let mut seen = 0u64;
                while let Some(message) = read.wait().await {
                    match message {
                        ChannelMsg::Data { data } => seen += data.len() as u64,
                        ChannelMsg::Close | ChannelMsg::Eof => break,
                        _ => {}
                    }
                }
                writer.await??;
                disconnect(handle).await;
                Ok(seen)
            }
            Target::Floor {
                endpoint,
                container,
            } => {
                let started = Exec::start(endpoint.clone(), container, &spec("cat", false)).await?;
                let writer = tokio::spawn(feed(started.input, bytes));
                let seen =
                    exec::demux(started.output, tokio::io::sink(), tokio::io::sink()).await?;
                writer.await??;
                Ok(seen)
            }
        }
    }

    /// Starts `command` (a login shell when `None`) with an 80x24 terminal.
    pub async fn terminal(&self, command: Option<&str>) -> anyhow::Result<Terminal> {
        let (tx, output) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        match self {
            Target::Ssh(ssh) => {
                let handle = ssh.login().await?;
                let channel = handle.channel_open_session().await?;
                channel
                    .request_pty(true, "xterm", 80, 24, 0, 0, &[])
                    .await?;
                match command {
                    Some(command) => channel.exec(true, command).await?,
                    None => channel.request_shell(true).await?,
                }
                let (mut read, write) = channel.split();
                tokio::spawn(async move {
                    while let Some(message) = read.wait().await {
                        match message {
                            ChannelMsg::Data { data } if tx.send(data.to_vec()).await.is_err() => {
                                break
                            }
                            ChannelMsg::Close | ChannelMsg::Eof => break,
                            _ => {}
                        }
                    }
                });
                Ok(Terminal {
                    input: Box::new(write.make_writer()),
                    output,
                    _connection: Some(handle),
                })
            }
            Target::Floor {
                endpoint,
                container,
            } => {
                let command = command.unwrap_or("exec sh -l");
                let started =
                    Exec::start(endpoint.clone(), container, &spec(command, true)).await?;
                let mut read = started.output;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = read.read(&mut buf).await {
                        if tx.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                });
                Ok(Terminal {
                    input: Box::new(started.input),
                    output,
                    _connection: None,
                })
            }
        }
    }
}

impl Terminal {
    /// Types `keys`.
    pub async fn send(&mut self, keys: &[u8]) -> anyhow::Result<()> {
        self.input.write_all(keys).await?;
        Ok(self.input.flush().await?)
    }

    /// Everything the terminal shows within `window`.
    pub async fn collect(&mut self, window: Duration) -> Vec<u8> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, self.output.recv()).await {
            seen.extend(chunk);
        }
        seen
    }

    /// Types `key` and waits until the terminal has echoed it; returns how long that took.
    pub async fn echo(&mut self, key: u8) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.send(&[key]).await?;
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.output.recv())
                .await
                .context("no echo within 10 s")?
                .context("terminal closed")?;
            if chunk.contains(&key) {
                return Ok(started.elapsed());
            }
        }
    }

    /// Waits until the container's output shows `needle`: the container side is attached (an
    /// OpenSSH bastion's own terminal echoes keys itself until `docker exec` makes it raw).
    pub async fn wait_for(&mut self, needle: &[u8]) -> anyhow::Result<()> {
        let mut seen = Vec::new();
        while !seen.windows(needle.len()).any(|w| w == needle) {
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.output.recv())
                .await
                .with_context(|| {
                    format!(
                        "{:?} not shown within 10 s",
                        String::from_utf8_lossy(needle)
                    )
                })?
                .context("terminal closed")?;
            seen.extend(chunk);
        }
        Ok(())
    }
}
