//! The lab the harness measures: a CA and a certificate minted with `ssh-keygen -s`, one bench
//! container, benchgate (`benchgate serve`, release build), OpenSSH `sshd` set up as the usual
//! bastion, and a Docker API client for the floor. Everything lives in a temp dir and is
//! removed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use benchgate::config::{self, Config, NonEmpty, Optional};
use benchgate::docker::Endpoint;
use russh::keys::{Certificate, PrivateKey};
use tempfile::TempDir;

/// The bench the certificate names and the container carries.
pub const BENCH: &str = "loadbench";
/// Where sshd comes from (Debian's `openssh-server`).
const SSHD: &str = "/usr/sbin/sshd";
const DOCKER_SOCKET: &str = "unix:///var/run/docker.sock";

/// A daemon under test: its process and address.
pub struct Daemon {
    pub addr: SocketAddr,
    pub process: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Everything a run needs.
pub struct Lab {
    pub dir: TempDir,
    /// The bench container's full ID.
    pub container: String,
    pub key: Arc<PrivateKey>,
    pub cert: Certificate,
    pub benchgate: Daemon,
    pub sshd: Daemon,
    /// The floor: the same engine, spoken to directly.
    pub floor: Arc<Endpoint>,
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn keygen(path: &Path) {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            path.to_str().unwrap(),
        ],
    );
}

fn free_port() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

/// Starts `command` with its stderr in `log` and waits until it accepts on `addr`.
fn spawn_listening(mut command: Command, addr: SocketAddr, log: &Path) -> Daemon {
    let process = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let mut daemon = Daemon { addr, process };
    for _ in 0..400 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return daemon;
        }
        if let Ok(Some(status)) = daemon.process.try_wait() {
            panic!(
                "{command:?} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{command:?} never listened on {addr}");
}

impl Lab {
    /// Sets the lab up; panics with the reason when a part is missing.
    pub async fn new() -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: run scripts/bench.sh (it installs openssh-server)"
        );
        let image = run("bash", &["scripts/bench-image.sh"]);
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        keygen(&path("ca"));
        keygen(&path("user"));
        run(
            "ssh-keygen",
            &[
                "-q",
                "-s",
                path("ca").to_str().unwrap(),
                "-I",
                "load@bench",
                "-n",
                BENCH,
                "-V",
                "-5m:+6h",
                "-z",
                "1",
                path("user.pub").to_str().unwrap(),
            ],
        );
        let key = Arc::new(russh::keys::load_secret_key(path("user"), None).unwrap());
        let cert = Certificate::read_file(&path("user-cert.pub")).unwrap();

        // A run that was killed leaves its container, which would make the bench ambiguous.
        let stale = run(
            "docker",
            &["ps", "-aq", "--filter", "label=benchgate.load-harness=1"],
        );
        for id in stale.split_whitespace() {
            run("docker", &["rm", "-f", id]);
        }
        let container = run(
            "docker",
            &[
                "run",
                "-d",
                "--rm",
                "--label",
                &format!("benchgate.bench={BENCH}"),
                "--label",
                "benchgate.load-harness=1",
                &image,
                "sleep",
                "1000000",
            ],
        );
        let benchgate = start_benchgate(dir.path());
        let sshd = start_sshd(dir.path(), &container);
        let floor = Arc::new(Endpoint::new(&local_engine(), Duration::from_secs(30)).unwrap());
        floor.negotiate().await.unwrap();
        Self {
            dir,
            container,
            key,
            cert,
            benchgate,
            sshd,
            floor,
        }
    }

    /// The daemon's own log, for a failure message.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The daemons first: their sessions' teardowns must not race the container's removal.
        for daemon in [&mut self.benchgate, &mut self.sshd] {
            let _ = daemon.process.kill();
            let _ = daemon.process.wait();
        }
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
    }
}

fn local_engine() -> config::Endpoint {
    config::Endpoint {
        url: DOCKER_SOCKET.into(),
        tls_ca: Optional(None),
        tls_cert: Optional(None),
        tls_key: Optional(None),
    }
}

/// benchgate as an operator runs it, with the pre-auth limits raised: one load generator on
/// one address would otherwise be throttled by `max_startups_per_source`, which is the point
/// of that limit, not something to measure.
fn start_benchgate(dir: &Path) -> Daemon {
    let addr = free_port();
    let mut config = Config::default();
    config.server.listen = NonEmpty(vec![addr]);
    config.server.host_keys = NonEmpty(vec![dir.join("host_key")]);
    let many = |n: u32| std::num::NonZeroU32::new(n).unwrap();
    config.server.max_startups = many(256);
    config.server.max_startups_per_source = many(256);
    config.session.max_sessions_per_bench = many(2000);
    config.auth.trusted_user_ca_keys = NonEmpty(vec![dir.join("ca.pub")]);
    config.docker.endpoints = NonEmpty(vec![local_engine()]);
    config.metrics.listen = Optional(None);
    let file = dir.join("benchgate.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_benchgate"));
    command.args(["serve", "--config", file.to_str().unwrap()]);
    spawn_listening(command, addr, &dir.join("benchgate.log"))
}

/// OpenSSH as the usual bench bastion: `TrustedUserCAKeys`, an `AuthorizedPrincipalsFile`
/// naming the bench, and a `ForceCommand` that runs the client's command (or a login shell)
/// with `docker exec` in the bench container, with a terminal when the session has one.
/// It logs in as root because that is the one account every test machine has; the work per
/// session (a fork per connection, privilege separation, the docker CLI) is the same.
fn start_sshd(dir: &Path, container: &str) -> Daemon {
    let addr = free_port();
    keygen(&dir.join("sshd_host_key"));
    let principals = dir.join("principals");
    std::fs::write(&principals, format!("{BENCH}\n")).unwrap();
    let force = dir.join("force-command.sh");
    std::fs::write(
        &force,
        format!(
            "#!/bin/sh\nt=; [ -t 0 ] && t=-t\n\
             exec docker exec -i $t -u frappe -w /home/frappe/frappe-bench {container} \
             sh -c \"${{SSH_ORIGINAL_COMMAND:-exec sh -l}}\"\n"
        ),
    )
    .unwrap();
    run("chmod", &["755", force.to_str().unwrap()]);
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {addr}\n\
             HostKey {host_key}\n\
             TrustedUserCAKeys {ca}\n\
             AuthorizedPrincipalsFile {principals}\n\
             AuthorizedKeysFile none\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             UseDNS no\n\
             MaxStartups 1000\n\
             MaxSessions 1000\n\
             AllowTcpForwarding no\n\
             X11Forwarding no\n\
             PidFile none\n\
             LogLevel ERROR\n\
             ForceCommand {force}\n",
            host_key = dir.join("sshd_host_key").display(),
            ca = dir.join("ca.pub").display(),
            principals = principals.display(),
            force = force.display(),
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut command = Command::new(SSHD);
    command.args(["-D", "-e", "-f", config.to_str().unwrap()]);
    spawn_listening(command, addr, &dir.join("sshd.log"))
}

/// Resident and proportional set sizes (KiB) of `pid` and every process below it.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let mut tree = vec![pid];
    let mut i = 0;
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid = after.split(' ').nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    tree.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .map(|t| (field(&t, "Rss:"), field(&t, "Pss:")))
        .fold((0, 0), |(r, p), (r2, p2)| (r + r2, p + p2))
}

/// Where the harness writes its results.
pub fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/load")
}
