//! Test harness: a real daemon on 127.0.0.1:0, keys and certificates minted by `ssh-keygen`,
//! and the real OpenSSH client with a pinned host key.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use benchgate::config::{Config, NonEmpty, Optional};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// The bench every test certificate is for, unless it says otherwise.
pub const BENCH: &str = "no-container-bench";

/// A running benchgate with its own CA, host key and audit file in a temp dir.
pub struct Bastion {
    pub dir: TempDir,
    pub addr: SocketAddr,
    /// The daemon's state when it runs in the test process.
    pub app: Option<Arc<benchgate::app::App>>,
    /// The daemon when it runs as `benchgate serve` (for signals).
    pub process: Option<std::process::Child>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Runs `program args`, failing the test with its stderr when it cannot run or fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Creates an unencrypted key pair `dir/name` of type `kind` ("ed25519", "rsa").
pub fn keygen(dir: &Path, name: &str, kind: &str) -> PathBuf {
    let path = dir.join(name);
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            kind,
            "-N",
            "",
            "-C",
            name,
            "-f",
            path.to_str().unwrap(),
        ],
    );
    path
}

impl Bastion {
    /// Starts a daemon trusting a fresh CA `ca`, with `edit` applied to its config.
    pub async fn start(edit: impl FnOnce(&Path, &mut Config)) -> Self {
        benchgate::logging::init(benchgate::config::LogFormat::Text);
        let (dir, config) = Self::prepare(edit);
        let shutdown = CancellationToken::new();
        let shared = benchgate::start(&config, shutdown.clone()).await.unwrap();
        if let Some(socket) = benchgate::admin::server::bind(&config.admin, false)
            .await
            .unwrap()
        {
            tokio::spawn(benchgate::admin::server::serve(shared.clone(), socket));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(benchgate::ssh::server::serve(
            shared.clone(),
            vec![listener],
            shutdown.clone(),
        ));
        pin_host_key(dir.path(), addr);
        Self {
            dir,
            addr,
            app: Some(shared),
            process: None,
            shutdown,
            task: Some(task),
        }
    }

    /// Runs `benchgate serve` as a process with the config written to `benchgate.toml` (its log
    /// in `daemon.log`), so tests can send it signals.
    pub async fn spawn(edit: impl FnOnce(&Path, &mut Config)) -> Self {
        Self::spawn_with_fd_limit(None, edit).await
    }

    /// The same, with its open files limited to `fd_limit` (as `ulimit -n` does).
    pub async fn spawn_with_fd_limit(
        fd_limit: Option<u32>,
        edit: impl FnOnce(&Path, &mut Config),
    ) -> Self {
        let (dir, mut config) = Self::prepare(edit);
        let addr: SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        config.server.listen = NonEmpty(vec![addr]);
        std::fs::write(dir.path().join("benchgate.toml"), config.to_toml()).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let limit = fd_limit.map_or("unlimited".to_owned(), |n| n.to_string());
        let process = std::process::Command::new("sh")
            .args([
                "-c",
                "[ $0 = unlimited ] || ulimit -n $0 || exit 1; exec \"$@\"",
                &limit,
                env!("CARGO_BIN_EXE_benchgate"),
                "serve",
                "--config",
                dir.path().join("benchgate.toml").to_str().unwrap(),
            ])
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok() {
                pin_host_key(dir.path(), addr);
                return Self {
                    dir,
                    addr,
                    app: None,
                    process: Some(process),
                    shutdown: CancellationToken::new(),
                    task: None,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut process = process;
        let _ = process.kill();
        let _ = process.wait();
        panic!(
            "benchgate never listened: {}",
            std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default()
        );
    }

    /// A temp dir with a CA `ca`, and a config for it with `edit` applied.
    fn prepare(edit: impl FnOnce(&Path, &mut Config)) -> (TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        keygen(dir.path(), "ca", "ed25519");
        let mut config = Config::default();
        config.server.host_keys = NonEmpty(vec![dir.path().join("host_key")]);
        config.auth.trusted_user_ca_keys = NonEmpty(vec![dir.path().join("ca.pub")]);
        config.metrics.listen = Optional(None);
        config.log.audit_file = Optional(Some(dir.path().join("audit.log")));
        config.admin.socket = Optional(Some(dir.path().join("admin.sock")));
        edit(dir.path(), &mut config);
        // For `benchgate sessions --config` (a spawned daemon's gets its listen address too).
        std::fs::write(dir.path().join("benchgate.toml"), config.to_toml()).unwrap();
        (dir, config)
    }

    /// Makes clients connect through `addr` (a relay in front of the daemon).
    pub fn reach_via(&mut self, addr: SocketAddr) {
        let known = std::fs::read_to_string(self.path("known_hosts")).unwrap();
        let known = known.replace(
            &format!("]:{} ", self.addr.port()),
            &format!("]:{} ", addr.port()),
        );
        std::fs::write(self.path("known_hosts"), known).unwrap();
        self.addr = addr;
    }

    /// Sends `signal` ("-HUP", "-TERM") to the daemon process.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .process
            .as_ref()
            .expect("a spawned daemon")
            .id()
            .to_string();
        run("kill", &[signal, &pid]);
    }

    /// The daemon process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new user key `name`, with a certificate signed by `ca` using `sign_args`
    /// (`-n`, `-V`, `-O`, `-t`... as `ssh-keygen -s` takes them). Returns the private key path.
    pub fn user_with_cert(&self, name: &str, ca: &str, sign_args: &[&str]) -> PathBuf {
        let key = keygen(self.dir.path(), name, "ed25519");
        self.sign(&key, ca, sign_args);
        key
    }

    /// Signs `key.pub` with the CA key `ca` (a file name in the temp dir), writing `key-cert.pub`.
    pub fn sign(&self, key: &Path, ca: &str, sign_args: &[&str]) {
        let ca = self.path(ca);
        let public = format!("{}.pub", key.display());
        let mut args = vec![
            "-q",
            "-s",
            ca.to_str().unwrap(),
            "-I",
            "key-id-of-test",
            "-z",
            "77",
        ];
        args.extend_from_slice(sign_args);
        args.push(&public);
        run("ssh-keygen", &args);
    }

    /// The options every OpenSSH client here gets: no config, no agent, only `key` (and its
    /// `-cert.pub`), the host key pinned.
    pub fn client_options(&self, key: &Path) -> Vec<String> {
        let known_hosts = format!("UserKnownHostsFile={}", self.path("known_hosts").display());
        [
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            &known_hosts,
            "-i",
            key.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// An `ssh` command line (for tmux) as `user` with `key`, `extra` options, then `command`.
    pub fn ssh_line(&self, user: &str, key: &Path, extra: &[&str], command: &str) -> String {
        let mut words = vec!["ssh".to_owned()];
        words.extend(self.client_options(key));
        words.extend(["-p".to_owned(), self.addr.port().to_string()]);
        words.extend(extra.iter().map(|s| s.to_string()));
        words.push(format!("{user}@127.0.0.1"));
        if !command.is_empty() {
            words.push(format!("'{command}'"));
        }
        words.join(" ")
    }

    /// Runs `ssh` as `user` with `key`, `extra` options, running `command` with `stdin`.
    pub async fn exec(
        &self,
        user: &str,
        key: &Path,
        extra: &[&str],
        command: &str,
        stdin: &[u8],
    ) -> Run {
        let mut cmd = Command::new("ssh");
        cmd.args(self.client_options(key))
            .args(["-p", &self.addr.port().to_string()])
            .args(extra)
            .arg(format!("{user}@127.0.0.1"))
            .arg(command);
        run_client(cmd, stdin).await
    }

    /// Runs the real `ssh` client as `user` with `key` (and its `-cert.pub` if present),
    /// `extra` options before the destination, running `true`.
    pub async fn ssh(&self, user: &str, key: &Path, extra: &[&str]) -> SshResult {
        let run = self.exec(user, key, extra, "true", b"").await;
        SshResult {
            code: run.code,
            stderr: run.stderr,
        }
    }

    /// Waits (bounded) until the index shows `bench` running.
    pub async fn wait_for_bench(&self, bench: &str) {
        let Some(shared) = &self.app else {
            // A daemon process knows its benches at start (the container is started first).
            return;
        };
        for _ in 0..200 {
            if matches!(
                shared.benches.lookup(bench),
                benchgate::docker::Lookup::Running(_)
            ) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("bench {bench} never showed up running in the index");
    }

    /// Audit events so far, parsed (a line still being written is left for the next look).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path("audit.log")).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        complete
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits (bounded) until `count` connections have been closed, then returns every event.
    pub async fn audit_after_closed(&self, count: usize) -> Vec<serde_json::Value> {
        for _ in 0..200 {
            let events = self.audit();
            if events
                .iter()
                .filter(|e| e["event"] == "connection.closed")
                .count()
                >= count
            {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "fewer than {count} connection.closed events after 10 s: {:#?}",
            self.audit()
        );
    }

    /// Runs `ssh` and returns the reasons of the `auth.rejected` events of that connection,
    /// asserting the client was denied.
    pub async fn rejection_reasons(&self, user: &str, key: &Path, extra: &[&str]) -> Vec<String> {
        let known = self.known_peers();
        let result = self.ssh(user, key, extra).await;
        result.assert_denied();
        self.reasons_of_last_connection(known).await
    }

    /// Retries (bounded, 10 s) until a login as `user` with `key` is refused with `reason`:
    /// for changes the daemon picks up by itself.
    pub async fn eventually_refused_for(&self, user: &str, key: &Path, reason: &str) {
        let mut last = Vec::new();
        for _ in 0..50 {
            let known = self.known_peers();
            if self
                .ssh(user, key, &[])
                .await
                .stderr
                .contains("Permission denied")
            {
                last = self.reasons_of_last_connection(known).await;
                if last.iter().any(|r| r == reason) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("never refused for {reason}; last reasons {last:?}");
    }

    /// The `auth.rejected` reasons of the one connection whose peer is not in `known`.
    async fn reasons_of_last_connection(&self, known: HashSet<String>) -> Vec<String> {
        // The new connection is the one whose peer address no earlier event mentions.
        for _ in 0..200 {
            let events = self.audit();
            let new_closed = events.iter().find(|e| {
                e["event"] == "connection.closed"
                    && !known.contains(e["peer"].as_str().unwrap_or_default())
            });
            if let Some(closed) = new_closed {
                let mine: Vec<_> = events
                    .iter()
                    .filter(|e| e["peer"] == closed["peer"])
                    .collect();
                assert!(
                    !mine.iter().any(|e| e["event"] == "auth.accepted"),
                    "unexpected acceptance: {mine:#?}"
                );
                return mine
                    .iter()
                    .filter(|e| e["event"] == "auth.rejected")
                    .map(|e| e["reason"].as_str().unwrap().to_owned())
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the new connection never closed: {:#?}", self.audit());
    }

    /// Every peer address the audit trail mentions so far.
    fn known_peers(&self) -> HashSet<String> {
        self.audit()
            .iter()
            .filter_map(|e| e["peer"].as_str().map(str::to_owned))
            .collect()
    }

    /// Runs `benchgate sessions` with this daemon's config and `args`.
    pub async fn sessions(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_benchgate"));
        cmd.arg("sessions")
            .arg("--config")
            .arg(self.path("benchgate.toml"))
            .args(args);
        run_client(cmd, b"").await
    }

    /// Waits (bounded) until `benchgate sessions --json` lists `count` sessions; returns them.
    pub async fn wait_for_sessions(&self, count: usize) -> Vec<serde_json::Value> {
        let mut listed = Vec::new();
        for _ in 0..100 {
            let run = self.sessions(&["--json"]).await;
            assert_eq!(run.code, Some(0), "{run:?}");
            listed = serde_json::from_slice(&run.stdout).expect("sessions --json");
            if listed.len() == count {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("never {count} live sessions: {listed:?}");
    }

    /// Stops the daemon and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(40), task)
                .await
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Bastion {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(process) = &mut self.process {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// Writes `known_hosts` in `dir` pinning the host key the daemon created there.
fn pin_host_key(dir: &Path, addr: SocketAddr) {
    let key = dir.join("host_key");
    for _ in 0..100 {
        if key.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let host_pub = run("ssh-keygen", &["-y", "-f", key.to_str().unwrap()]);
    let line = format!(
        "[127.0.0.1]:{} {}",
        addr.port(),
        String::from_utf8_lossy(&host_pub.stdout)
    );
    std::fs::write(dir.join("known_hosts"), line).unwrap();
}

/// What a client command did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs a client command feeding it `stdin`, with a 60 s guard against hangs.
pub async fn run_client(mut cmd: Command, stdin: &[u8]) -> Run {
    use tokio::io::AsyncWriteExt;
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("cannot run the client");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = tokio::spawn(async move {
        let _ = input.write_all(&data).await;
    });
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("client did not finish within 60 s")
        .unwrap();
    feeder.abort();
    Run {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What the `ssh` client did.
#[derive(Debug)]
pub struct SshResult {
    pub code: Option<i32>,
    pub stderr: String,
}

impl SshResult {
    /// The client authenticated and got a session, which said the bench (there is no
    /// container for it) is not running.
    pub fn assert_authenticated(&self) {
        assert!(
            self.stderr
                .contains("is not running (status: no such bench)"),
            "not authenticated: {self:?}"
        );
        assert_eq!(self.code, Some(1), "{self:?}");
    }

    /// The client was denied with nothing but OpenSSH's usual line.
    pub fn assert_denied(&self) {
        assert!(
            self.stderr.contains("Permission denied (publickey)"),
            "not denied: {self:?}"
        );
        assert_eq!(self.code, Some(255), "{self:?}");
    }
}

/// The bench image, built once per test binary by `scripts/bench-image.sh`.
pub fn bench_image() -> &'static str {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-image.sh");
        let out = std::process::Command::new("bash").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "cannot build the bench image (is a Docker engine running? `bash scripts/setup.sh` starts one): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

/// A bench container with `labels`, a bastion with `edit` applied to its config, and a key
/// "user" whose certificate from "ca" names the bench, with `sign_args` (a validity at least);
/// returns once the bastion's index shows the bench running.
pub async fn bench_and_bastion(
    labels: &[&str],
    sign_args: &[&str],
    edit: impl FnOnce(&Path, &mut Config),
) -> (Bastion, Container, PathBuf) {
    bench_and_bastion_in(Container::start(labels), sign_args, edit).await
}

/// The same for a container already started.
pub async fn bench_and_bastion_in(
    container: Container,
    sign_args: &[&str],
    edit: impl FnOnce(&Path, &mut Config),
) -> (Bastion, Container, PathBuf) {
    let bastion = Bastion::start(edit).await;
    let mut args = vec!["-n", container.bench.as_str()];
    args.extend_from_slice(sign_args);
    let key = bastion.user_with_cert("user", "ca", &args);
    bastion.wait_for_bench(&container.bench).await;
    (bastion, container, key)
}

/// A bench container for one test, removed when dropped (even on failure).
pub struct Container {
    pub name: String,
    pub bench: String,
}

impl Container {
    /// Starts a container labelled as bench `bench-<unique>`, plus `labels` ("k=v").
    pub fn start(labels: &[&str]) -> Self {
        Self::start_with(&[], labels)
    }

    /// The same, with extra `docker run` options.
    pub fn start_with(options: &[&str], labels: &[&str]) -> Self {
        Self::start_as(None, options, labels)
    }

    /// The same, labelled as bench `bench` when given (another container may carry it too).
    pub fn start_as(bench: Option<&str>, options: &[&str], labels: &[&str]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let unique = format!(
            "{}-{}-{:x}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rand::random::<u32>()
        );
        let name = format!("bg-test-{unique}");
        let bench = bench.map_or_else(|| format!("bench-{unique}"), str::to_owned);
        let mut args = vec![
            "run".to_owned(),
            "-d".to_owned(),
            "--name".to_owned(),
            name.clone(),
        ];
        args.extend(["--label".to_owned(), format!("benchgate.bench={bench}")]);
        for label in labels {
            args.extend(["--label".to_owned(), label.to_string()]);
        }
        args.extend(options.iter().map(|o| o.to_string()));
        args.extend([
            bench_image().to_owned(),
            "sleep".to_owned(),
            "1000000".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("docker", &args);
        Self { name, bench }
    }

    /// Command lines of the processes in the container other than its init `sleep`.
    pub fn processes(&self) -> Vec<String> {
        let out = run("docker", &["exec", &self.name, "ps", "-o", "pid,args"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.starts_with("1 ") && !l.contains("ps -o"))
            .collect()
    }

    /// Waits (bounded, 5 s) until no process matching `needle` is left.
    pub async fn wait_gone(&self, needle: &str) {
        for _ in 0..50 {
            if !self.processes().iter().any(|p| p.contains(needle)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{needle:?} still running 5 s later: {:?}", self.processes());
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}

/// CPU seconds (user and system) the process `pid` used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Runs the Python client `tests/clients/SCRIPT` (asyncssh) against `bastion` as `bench` with
/// `key`: its arguments are the port, the bench, the key, the pinned host keys, then `arg`.
pub async fn python_client(
    bastion: &Bastion,
    script: &str,
    bench: &str,
    key: &Path,
    arg: &str,
) -> Run {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(format!(
        "{}/tests/clients/{script}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .args([
        &bastion.addr.port().to_string(),
        bench,
        key.to_str().unwrap(),
    ])
    .arg(bastion.path("known_hosts"))
    .arg(arg);
    run_client(cmd, b"").await
}
