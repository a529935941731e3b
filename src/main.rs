//! The `benchgate` command line: parses arguments and hands off to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use benchgate::config::{self, Config};
use benchgate::notify::{notify, State};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// An SSH bastion that admits OpenSSH user certificates into Docker bench containers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground. Its SSH listeners come from systemd when it passes
    /// sockets (LISTEN_FDS), else from server.listen.
    Serve {
        /// Config file [default: /etc/benchgate/benchgate.toml if present, else built-in defaults]
        #[arg(long)]
        config: Option<PathBuf>,
        /// Take the listening sockets of the daemon running with this config (through its
        /// admin socket) instead of binding them: it stops accepting, serves its live sessions
        /// to their end (at most server.drain_limit) and exits. No connection is refused.
        /// `if-running`: bind as usual when no daemon answers (for systemd instances).
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "always")]
        takeover: Option<Takeover>,
    },
    /// Parse and validate the config, load the keys it names, print the effective config.
    CheckConfig {
        /// Config file [default: /etc/benchgate/benchgate.toml if present, else built-in defaults]
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Sign a user certificate as the platform's dashboard does (only permit-pty), write
    /// <key>-cert.pub next to PUBKEY and print the commands a user pastes.
    Issue {
        /// The CA private key.
        #[arg(long)]
        ca: PathBuf,
        /// The bench (or group) the certificate is for.
        #[arg(long)]
        principal: String,
        /// How long it is valid, like "6h" or "30m".
        #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
        validity: std::time::Duration,
        /// Key ID recorded in logs and audit [default: <principal>-<unix time>]
        #[arg(long)]
        identity: Option<String>,
        /// Serial number, what revocation lists revoke by [default: random]
        #[arg(long)]
        serial: Option<u64>,
        /// Bastion host name for the printed ssh command.
        #[arg(long, default_value = "bastion.example.com")]
        host: String,
        /// Bastion port for the printed ssh command.
        #[arg(long, default_value_t = 2222)]
        port: u16,
        /// The user's public key (.pub).
        pubkey: PathBuf,
    },
    /// A demo on one machine: a CA, a host key, a demo bench container, a user key and
    /// certificate; then serves on 127.0.0.1:2222 and prints the ssh command.
    Quickstart {
        /// Where to put the demo's keys, config and audit log.
        #[arg(long, default_value = "benchgate-quickstart")]
        dir: PathBuf,
        /// Address to serve on.
        #[arg(long, default_value = "127.0.0.1:2222")]
        listen: std::net::SocketAddr,
    },
    /// List the live sessions (through the running daemon's admin socket); `end` and `watch`
    /// act on them.
    Sessions {
        /// Config file naming the admin socket [default: /etc/benchgate/benchgate.toml if
        /// present, else built-in defaults]
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        select: SelectArgs,
        #[command(subcommand)]
        action: Option<SessionsAction>,
    },
    /// Say whether CERT would be accepted for bench NAME right now, and every reason why not.
    Explain {
        /// Config file [default: /etc/benchgate/benchgate.toml if present, else built-in defaults]
        #[arg(long)]
        config: Option<PathBuf>,
        /// The bench (SSH user name).
        #[arg(long)]
        bench: String,
        /// The client address, to check a source-address option.
        #[arg(long)]
        from: Option<std::net::IpAddr>,
        /// The certificate (-cert.pub).
        cert: PathBuf,
    },
}

/// When `serve` takes a running daemon's sockets.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Takeover {
    /// Always; fail when no daemon answers on the admin socket.
    Always,
    /// When a daemon answers on the admin socket; else bind.
    IfRunning,
}

/// Which sessions: those matching every option given (before or after `end`).
#[derive(clap::Args)]
struct SelectArgs {
    /// Only sessions into this bench.
    #[arg(long, global = true)]
    bench: Option<String>,
    /// Only sessions of certificates with this key ID (as given, or as listed).
    #[arg(long, global = true)]
    key_id: Option<String>,
    /// Only sessions of certificates with this serial.
    #[arg(long, global = true)]
    serial: Option<u64>,
    /// Only sessions of certificates from this CA (its SHA256: fingerprint).
    #[arg(long, global = true)]
    ca: Option<String>,
}

impl SelectArgs {
    fn with_id(self, id: Option<String>) -> benchgate::admin::Select {
        benchgate::admin::Select {
            id,
            bench: self.bench,
            key_id: self.key_id,
            serial: self.serial,
            ca: self.ca,
        }
    }
}

#[derive(Subcommand)]
enum SessionsAction {
    /// End sessions: the person is told why, the session's processes end, the operator's uid is
    /// audited. Exits 1 when nothing matched.
    End {
        /// The session's id (from `benchgate sessions`).
        id: Option<String>,
        /// Told to the person: "your session was ended by an operator: REASON".
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Watch a terminal session's output, read-only, starting with its current screen; Ctrl-C
    /// stops. Exits 1 when no such terminal session is live.
    Watch {
        /// The session's id (from `benchgate sessions`).
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, takeover } => serve(config.as_deref(), takeover),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Issue {
            ca,
            principal,
            validity,
            identity,
            serial,
            host,
            port,
            pubkey,
        } => {
            let args = benchgate::commands::IssueArgs {
                ca,
                principal,
                validity,
                identity,
                serial,
                public_key: pubkey,
                host,
                port,
            };
            benchgate::commands::issue(&args).and_then(|text| print_all(&text))
        }
        Command::Quickstart { dir, listen } => benchgate::quickstart::prepare(&dir, listen)
            .and_then(|(config, text)| {
                print_all(&text)?;
                serve(Some(&config), None)
            }),
        Command::Sessions {
            config,
            json,
            select,
            action,
        } => {
            use benchgate::admin::client::Command as Admin;
            let select = select.with_id(None);
            let command = match action {
                None => Admin::List { select, json },
                Some(SessionsAction::End { id, reason }) => Admin::End {
                    select: benchgate::admin::Select { id, ..select },
                    reason,
                    json,
                },
                Some(SessionsAction::Watch { id }) if select.is_everything() => Admin::Watch { id },
                Some(SessionsAction::Watch { .. }) => {
                    eprintln!("benchgate: `sessions watch` takes a session id only");
                    return ExitCode::from(2);
                }
            };
            // 1: nothing matched (as grep); 2: anything else went wrong.
            return match sessions(config.as_deref(), command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("benchgate: {e:#}");
                    match e.downcast_ref::<benchgate::admin::client::NoMatch>() {
                        Some(_) => ExitCode::FAILURE,
                        None => ExitCode::from(2),
                    }
                }
            };
        }
        Command::Explain {
            config,
            bench,
            from,
            cert,
        } => match explain(config.as_deref(), &bench, &cert, from) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The given file, else the default file when present, else the built-in defaults.
fn load_config(path: Option<&Path>) -> Result<(Config, String), config::Error> {
    let default = Path::new(config::DEFAULT_PATH);
    match path {
        Some(path) => Ok((Config::load(path)?, path.display().to_string())),
        None if default.exists() => Ok((Config::load(default)?, default.display().to_string())),
        None => Ok((Config::default(), "built-in defaults".to_owned())),
    }
}

/// Prints the verdict; `Ok(false)` when the certificate would be refused.
fn explain(
    path: Option<&Path>,
    bench: &str,
    cert: &Path,
    from: Option<std::net::IpAddr>,
) -> anyhow::Result<bool> {
    let (config, _) = load_config(path)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let (report, accepted) =
        runtime.block_on(benchgate::commands::explain(&config, bench, cert, from))?;
    print_all(&report)?;
    Ok(accepted)
}

/// `benchgate sessions`: talks to the admin socket the config names.
fn sessions(path: Option<&Path>, command: benchgate::admin::client::Command) -> anyhow::Result<()> {
    let (config, source) = load_config(path)?;
    let Some(socket) = config.admin.socket.0 else {
        anyhow::bail!("the admin socket is off in {source} ([admin] socket = \"\")");
    };
    block_on(benchgate::admin::client::run(&socket, command))
}

fn check_config(path: Option<&Path>) -> anyhow::Result<()> {
    let (config, source) = load_config(path)?;
    let trust = benchgate::auth::Trust::load(&config.auth.trusted_user_ca_keys.0, None)
        .context("auth.trusted_user_ca_keys")?;
    let host_keys = benchgate::ssh::keys::load(
        &config.server.host_keys.0,
        benchgate::ssh::keys::Missing::Report,
    )
    .context("server.host_keys")?;
    let mut report = format!("# {source}: OK\n");
    if let Some(path) = &config.auth.revoked_keys.0 {
        match benchgate::auth::revocation::Revocation::load(path) {
            // Not fatal: the daemon starts and refuses every login until the list is fixed.
            benchgate::auth::revocation::Revocation::Unavailable { reason, .. } => {
                report += &format!(
                    "# WARNING: revocation list {}: {reason}; every login is refused until it is fixed\n",
                    path.display()
                )
            }
            _ => report += &format!("# revocation list {} loaded\n", path.display()),
        }
    }
    report += &format!("# {}\n", benchgate::admin::server::describe(&config.admin)?);
    report += &describe_groups(&config.docker);
    report += &compare_with_running(&config);
    for ca in &trust.cas {
        report += &format!("# trusted user CA {}\n", ca.fingerprint);
    }
    for warning in &host_keys.warnings {
        report += &format!("# WARNING: {warning}\n");
    }
    for path in host_keys.missing {
        report += &format!(
            "# host key {} is missing and will be created at start\n",
            path.display()
        );
    }
    report += &config.to_toml();
    print_all(&report)
}

/// How a certificate reaches a bench through its group label.
fn describe_groups(docker: &benchgate::config::Docker) -> String {
    if docker.group_label.is_empty() {
        return "# groups: off (docker.group_label is empty)\n".to_owned();
    }
    match docker.group_principal_prefix.as_str() {
        "" => format!(
            "# groups: principal = the value of label {:?}; a value that is also a bench's name is not honoured. Set docker.group_principal_prefix (e.g. \"group:\") so bench and group names never meet\n",
            docker.group_label
        ),
        prefix => format!(
            "# groups: principal = {prefix:?} + the value of label {:?}; a value that is also a bench's name is not honoured\n",
            docker.group_label
        ),
    }
}

/// What SIGHUP would change in the daemon answering on `config`'s admin socket, if one does.
fn compare_with_running(config: &Config) -> String {
    let Some(socket) = config.admin.socket.0.as_deref().filter(|s| s.exists()) else {
        return String::new();
    };
    let status = block_on(benchgate::admin::client::status(socket));
    let status = match status {
        Ok(status) => status,
        Err(e) => return format!("# no running daemon to compare with: {e:#}\n"),
    };
    // Entries compare whole (URL and TLS files), as a reload compares them.
    let wanted = &config.docker.endpoints.0;
    let running = &status.endpoints;
    let list = |entries: Vec<&benchgate::config::Endpoint>| match entries.is_empty() {
        true => "none".to_owned(),
        false => entries
            .iter()
            .map(|e| e.url.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let added = wanted.iter().filter(|e| !running.contains(e)).collect();
    let removed = running.iter().filter(|e| !wanted.contains(e)).collect();
    let kept = running.iter().filter(|e| wanted.contains(e)).collect();
    let mut report = format!(
        "# the daemon running (pid {}{}): SIGHUP would add Docker endpoints {}; remove {}; keep {}\n",
        status.pid,
        if status.draining { ", draining" } else { "" },
        list(added),
        list(removed),
        list(kept)
    );
    for conflict in &status.conflicts {
        report += &format!("# WARNING: {conflict}\n");
    }
    report
}

/// Runs one client's `work` on a runtime of its own (one thread: it waits on one socket).
fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn print_all(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn serve(path: Option<&Path>, takeover: Option<Takeover>) -> anyhow::Result<()> {
    use benchgate::listeners::Listeners;
    let (config, source) = load_config(path)?;
    let takeover = match takeover {
        None => false,
        Some(Takeover::Always) => true,
        Some(Takeover::IfRunning) => config
            .admin
            .socket
            .0
            .as_ref()
            .is_some_and(|path| std::os::unix::net::UnixStream::connect(path).is_ok()),
    };
    // Before any thread starts: listenfd takes LISTEN_* out of the environment. A takeover
    // takes the running daemon's sockets once this one is ready to serve.
    let bound = match takeover {
        true => None,
        false => Some(match Listeners::from_systemd(&config)? {
            Some(inherited) => inherited,
            None => Listeners::bind(&config)?,
        }),
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        benchgate::logging::init(config.log.format);
        // The recorder first, so start-up (the first bench listing) is counted too.
        let recorder = match config.metrics.listen.0 {
            Some(_) => {
                Some(benchgate::metrics::install().context("cannot install the metrics recorder")?)
            }
            None => None,
        };
        // Set once serving: /health says "starting" until then.
        let serving = Arc::new(std::sync::OnceLock::<Arc<benchgate::app::App>>::new());
        let metrics_stop = CancellationToken::new();
        let metrics = |listener: Option<std::net::TcpListener>| -> anyhow::Result<()> {
            let (Some(listener), Some(handle)) = (listener, recorder.clone()) else {
                return Ok(());
            };
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let serving = serving.clone();
            let health: benchgate::metrics::Health = Arc::new(move || match serving.get() {
                None => Some("starting".to_owned()),
                Some(app) => app.health(),
            });
            tokio::spawn(benchgate::metrics::serve(
                listener,
                handle,
                health,
                metrics_stop.clone(),
            ));
            Ok(())
        };
        // Served now (a duplicate: the original is kept to hand over), so /health says
        // "starting" during start-up.
        if let Some(listener) = bound.as_ref().and_then(|b| b.metrics.as_ref()) {
            metrics(Some(listener.try_clone()?))?;
        }
        let shutdown = CancellationToken::new();
        let app = benchgate::start(&config, shutdown.clone()).await?;
        let config_path = (source != "built-in defaults").then(|| PathBuf::from(&source));
        tokio::spawn(signals(shutdown.clone(), config_path, app.clone()));
        let (mut listeners, admin) = match bound {
            Some(mut bound) => {
                app.handover.hold(&bound)?;
                bound.metrics = None;
                let admin = benchgate::admin::server::bind(&config.admin, false).await?;
                (bound, admin)
            }
            None => take_over(&config, &app).await?,
        };
        let _ = serving.set(app.clone());
        metrics(listeners.metrics.take())?;
        let stop = app.handover.stop_accepting.clone();
        let metrics_stop = metrics_stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            metrics_stop.cancel();
            // systemd shows the instance as deactivating while it drains.
            notify(State::Stopping);
        });
        if let Some(socket) = admin {
            tokio::spawn(benchgate::admin::server::serve(app.clone(), socket));
        }
        let mut ssh = Vec::new();
        for listener in listeners.ssh {
            listener.set_nonblocking(true)?;
            ssh.push(tokio::net::TcpListener::from_std(listener)?);
        }
        let addresses: Vec<_> = ssh.iter().filter_map(|l| l.local_addr().ok()).collect();
        tracing::info!(config = %source, listen = ?addresses, "benchgate ready");
        notify(State::Ready);
        benchgate::ssh::server::serve(app, ssh, shutdown).await;
        tracing::info!("benchgate stopped");
        Ok(())
    })
}

/// Takes the running daemon's listening sockets (see [`benchgate::listeners`]); the admin
/// socket is bound at a path of its own and replaces the old one's only once the old daemon
/// confirmed, so a takeover that fails leaves it reachable. Nothing is accepted before: the
/// connections arriving meanwhile wait in the sockets' queues.
async fn take_over(
    config: &Config,
    app: &benchgate::app::App,
) -> anyhow::Result<(
    benchgate::listeners::Listeners,
    Option<benchgate::admin::server::Socket>,
)> {
    use benchgate::listeners::{self, Listeners};
    let owned = config.clone();
    let (taken, handed, stream) =
        tokio::task::spawn_blocking(move || Listeners::take_over(&owned)).await??;
    tracing::info!(from = handed.pid, listen = ?handed.ssh, "taking over");
    app.handover.hold(&taken)?;
    let mut admin = benchgate::admin::server::bind(&config.admin, true).await?;
    match tokio::task::spawn_blocking(move || listeners::finish_takeover(stream)).await? {
        Ok(()) => tracing::info!(
            from = handed.pid,
            "took over: the previous daemon stopped accepting and drains"
        ),
        Err(e) if Path::new(&format!("/proc/{}", handed.pid)).exists() => {
            return Err(e.context("the running daemon did not confirm the takeover and serves on"));
        }
        Err(e) => tracing::warn!(
            error = %format!("{e:#}"),
            "the previous daemon died during the takeover; serving"
        ),
    }
    if let Some(admin) = &mut admin {
        admin.publish()?;
    }
    Ok((taken, admin))
}

/// SIGHUP: replaces the settings and the Docker endpoints from the file at `path`, telling
/// systemd and the metrics.
fn reload(path: Option<&Path>, app: &benchgate::app::App) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: running on built-in defaults, nothing to reload");
        return;
    };
    notify(State::Reloading);
    let result = app.reload(path);
    notify(State::Ready);
    benchgate::metrics::config_reload(result.is_ok());
    match result {
        Ok(changes) => tracing::info!(
            config = %path.display(),
            docker_endpoints = %changes,
            "reloaded: trust, revocations, session and lifetime settings, Docker endpoints \
             (listeners, host keys and limits need a restart)"
        ),
        Err(e) => tracing::error!(
            config = %path.display(), error = %format!("{e:#}"),
            "reload failed; the previous settings stay in force"
        ),
    }
}

/// SIGTERM and SIGINT start an orderly shutdown. SIGHUP reloads the settings from `path`
/// (the old ones stay when the new file is bad); without a config file there is nothing to
/// reload.
async fn signals(
    shutdown: CancellationToken,
    path: Option<PathBuf>,
    app: Arc<benchgate::app::App>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(path.as_deref(), &app),
        }
    }
    tracing::info!("shutting down");
    notify(State::Stopping);
    shutdown.cancel();
}
