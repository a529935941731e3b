//! Fleet operations with the real OpenSSH client: `serve --takeover` replaces a running daemon
//! without refusing a login or dropping a session, and systemd socket activation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use benchgate::config::{Config, NonEmpty, Optional};
use support::{Bastion, Container};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `benchgate serve` with `args`, its log in `log`.
fn daemon(args: &[&str], config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_benchgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits (bounded, 30 s) until `log` contains `what`.
async fn wait_for_log(log: &Path, what: &str) {
    for _ in 0..300 {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(what)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{what:?} never logged: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Waits (bounded, 30 s) for `child` to exit; its exit code.
async fn exit_of(child: &mut Child) -> Option<i32> {
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exited within 30 s")
        .unwrap()
        .code()
}

/// A `cat` session kept open: what is written comes back.
struct Cat {
    child: Child,
    input: tokio::process::ChildStdin,
    output: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Cat {
    fn open(ssh: &[String]) -> Self {
        let mut child = Command::new("ssh")
            .args(ssh)
            .arg("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            input,
            output,
        }
    }

    async fn echo(&mut self, line: &str) -> Option<String> {
        self.input
            .write_all(format!("{line}\n").as_bytes())
            .await
            .ok()?;
        tokio::time::timeout(Duration::from_secs(10), self.output.next_line())
            .await
            .ok()?
            .ok()?
    }
}

/// `ssh` with `options`, then `args` (before the command), running `echo ok`.
async fn echo_ok(options: &[&str], args: &[String]) -> std::process::Output {
    Command::new("ssh")
        .args(options)
        .args(args)
        .arg("echo ok")
        .output()
        .await
        .unwrap()
}

/// The `ssh` arguments (before the command) for `bench` through `bastion` with `key`.
fn ssh_args(bastion: &Bastion, key: &Path, bench: &str) -> Vec<String> {
    let mut args = bastion.client_options(key);
    args.extend([
        "-p".to_owned(),
        bastion.addr.port().to_string(),
        format!("{bench}@127.0.0.1"),
    ]);
    args
}

#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_refuses_no_login_and_the_old_daemon_drains_then_exits() {
    let container = Container::start(&[]);
    let metrics = free_addr();
    let mut old = Bastion::spawn(|_, config| {
        config.metrics.listen = Optional(Some(metrics));
    })
    .await;
    let bench = container.bench.clone();
    let key = old.user_with_cert("user", "ca", &["-n", &bench]);
    let ssh = ssh_args(&old, &key, &bench);
    let config = old.path("benchgate.toml");

    let mut before = Cat::open(&ssh);
    assert_eq!(before.echo("before").await.as_deref(), Some("before"));

    // Logins every 100 ms through both takeovers.
    let stop = tokio_util::sync::CancellationToken::new();
    let logins = tokio::spawn({
        let (ssh, stop) = (ssh.clone(), stop.clone());
        async move {
            let mut failures = Vec::new();
            let mut count = 0;
            while !stop.is_cancelled() {
                let out = echo_ok(&[], &ssh).await;
                count += 1;
                if String::from_utf8_lossy(&out.stdout) != "ok\n" {
                    failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (count, failures)
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A takeover with other listeners is refused; the running daemon is untouched.
    let mut other: Config = Config::load(&config).unwrap();
    other.server.listen = NonEmpty(vec![free_addr()]);
    let other_path = old.path("other.toml");
    std::fs::write(&other_path, other.to_toml()).unwrap();
    let mut refused = daemon(
        &["serve", "--takeover"],
        &other_path,
        &old.path("refused.log"),
    );
    assert_eq!(exit_of(&mut refused).await, Some(1));
    let said = std::fs::read_to_string(old.path("refused.log")).unwrap();
    assert!(
        said.contains("a takeover needs the same listeners"),
        "{said}"
    );

    let mut new = daemon(&["serve", "--takeover"], &config, &old.path("new.log"));
    wait_for_log(&old.path("new.log"), "took over").await;
    wait_for_log(&old.path("daemon.log"), "draining").await;
    // The new daemon answers /health on the metrics port it took over.
    let health = run_curl(metrics, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The session started before the takeover runs on in the old daemon.
    assert_eq!(before.echo("after").await.as_deref(), Some("after"));
    assert!(old.process.as_mut().unwrap().try_wait().unwrap().is_none());

    // A second takeover while the first daemon drains: the second daemon has no session
    // and exits at once.
    let mut newer = daemon(&["serve", "--takeover"], &config, &old.path("newer.log"));
    wait_for_log(&old.path("newer.log"), "took over").await;
    assert_eq!(exit_of(&mut new).await, Some(0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let (count, failures) = logins.await.unwrap();
    eprintln!(
        "{count} logins through two takeovers, {} failed",
        failures.len()
    );
    assert!(count >= 10, "only {count} logins");
    assert!(
        failures.is_empty(),
        "{} of {count} logins failed: {failures:?}",
        failures.len()
    );

    // The first daemon exits once its last session ends.
    assert_eq!(before.echo("still").await.as_deref(), Some("still"));
    drop(before.input);
    let _ = before.child.wait().await;
    let first = old.process.as_mut().unwrap();
    let code = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(status) = first.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the drained daemon exited");
    assert_eq!(code, Some(0), "{}", old.log());
    let out = echo_ok(&[], &ssh).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    drop(newer.start_kill());
}

/// `GET path` on `addr`: the whole response.
async fn run_curl(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("answered within 5 s")
        .unwrap();
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_without_a_running_daemon_says_so() {
    let bastion = Bastion::start(|_, _| {}).await;
    let mut config = Config::load(&bastion.path("benchgate.toml")).unwrap();
    config.admin.socket = Optional(Some(bastion.path("nobody-here.sock")));
    config.server.listen = NonEmpty(vec![free_addr()]);
    std::fs::write(bastion.path("alone.toml"), config.to_toml()).unwrap();
    let mut alone = daemon(
        &["serve", "--takeover"],
        &bastion.path("alone.toml"),
        &bastion.path("alone.log"),
    );
    assert_eq!(exit_of(&mut alone).await, Some(1));
    let said = std::fs::read_to_string(bastion.path("alone.log")).unwrap();
    assert!(said.contains("cannot reach the running daemon"), "{said}");
    // `if-running` (the systemd instances') binds as usual when nothing runs.
    let mut alone = daemon(
        &["serve", "--takeover=if-running"],
        &bastion.path("alone.toml"),
        &bastion.path("alone.log"),
    );
    wait_for_log(&bastion.path("alone.log"), "benchgate ready").await;
    drop(alone.start_kill());
}

/// Under `systemd-socket-activate` the daemon serves on the socket it is given.
#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_serves_on_the_inherited_socket() {
    let container = Container::start(&[]);
    let mut bastion = Bastion::start(|_, _| {}).await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &container.bench]);
    let mut config = Config::load(&bastion.path("benchgate.toml")).unwrap();
    // Not used: the listener comes from systemd.
    config.server.listen = NonEmpty(vec![free_addr()]);
    config.admin.socket = Optional(Some(bastion.path("activated.sock")));
    std::fs::write(bastion.path("activated.toml"), config.to_toml()).unwrap();
    let addr = free_addr();
    let _activated = Command::new("systemd-socket-activate")
        .args(["-l", &addr.to_string()])
        .arg(env!("CARGO_BIN_EXE_benchgate"))
        .args(["serve", "--config"])
        .arg(bastion.path("activated.toml"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(bastion.path("activated.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("systemd-socket-activate is required: bash scripts/setup.sh installs systemd");
    bastion.reach_via(addr);
    let mut run = bastion
        .exec(&container.bench, &key, &[], "echo activated", b"")
        .await;
    for _ in 0..50 {
        if run.code == Some(0) {
            break;
        }
        // The first connection starts the daemon; it may still be starting.
        tokio::time::sleep(Duration::from_millis(200)).await;
        run = bastion
            .exec(&container.bench, &key, &[], "echo activated", b"")
            .await;
    }
    assert_eq!(
        run.stdout_text(),
        "activated\n",
        "{run:?} {}",
        std::fs::read_to_string(bastion.path("activated.log")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(bastion.path("activated.log")).unwrap();
    let ready = log
        .lines()
        .find(|l| l.contains("benchgate ready"))
        .unwrap_or_default();
    assert!(ready.contains(&format!("[{addr}]")), "{log}");
}

/// Two replicas behind the real HAProxy with `deploy/haproxy.cfg` as it is: the client's
/// address crosses the balancer (PROXY v2) for `source-address`, and a dead replica costs no
/// login.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_behind_haproxy_see_the_real_client_and_survive_one_dying() {
    use benchgate::config::Net;
    let container = Container::start(&[]);
    let mut first = Bastion::spawn(|_, config| {
        config.server.proxy_protocol = true;
        config.server.trusted_proxies = vec![Net("127.0.0.1/32".parse().unwrap())];
    })
    .await;
    let bench = container.bench.clone();
    let key = first.user_with_cert(
        "user",
        "ca",
        &["-n", &bench, "-O", "source-address=127.0.0.2/32"],
    );
    // The second replica: the same config, host key and CA; its own port and admin socket.
    let mut config = Config::load(&first.path("benchgate.toml")).unwrap();
    let second_addr = free_addr();
    config.server.listen = NonEmpty(vec![second_addr]);
    config.admin.socket = Optional(Some(first.path("second.sock")));
    std::fs::write(first.path("second.toml"), config.to_toml()).unwrap();
    let _second = daemon(
        &["serve"],
        &first.path("second.toml"),
        &first.path("second.log"),
    );
    let lb = free_addr();
    let mut haproxy = Command::new("haproxy")
        .args([
            "-db",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg"),
        ])
        .env("BENCHGATE_LB_BIND", lb.to_string())
        .env("BENCHGATE_REPLICA_1", first.addr.to_string())
        .env("BENCHGATE_REPLICA_2", second_addr.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(first.path("haproxy.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy is required: bash scripts/setup.sh installs it");
    for _ in 0..100 {
        if std::net::TcpStream::connect(second_addr).is_ok()
            && std::net::TcpStream::connect(lb).is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.reach_via(lb);
    let args = ssh_args(&first, &key, &bench);
    let login = |from: &'static str| {
        let args = args.clone();
        async move { echo_ok(&["-b", from], &args).await }
    };
    let logins = |from: &'static str| async move {
        let mut outs = Vec::new();
        for _ in 0..10 {
            outs.push(login(from).await);
        }
        outs
    };
    for out in logins("127.0.0.2").await {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{out:?}");
    }
    let accepted: Vec<_> = first
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "auth.accepted")
        .collect();
    assert_eq!(accepted.len(), 10, "{accepted:?}");
    assert!(
        accepted
            .iter()
            .all(|e| e["peer"].as_str().unwrap().starts_with("127.0.0.2:")),
        "{accepted:?}"
    );
    // Round robin: both replicas served.
    assert!(std::fs::read_to_string(first.path("second.log"))
        .unwrap()
        .contains("auth accepted"));
    assert!(first.log().contains("auth accepted"));

    let refused = login("127.0.0.3").await;
    assert_eq!(refused.status.code(), Some(255), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Permission denied"));

    // One replica dies: the balancer sends every login to the other.
    let process = first.process.as_mut().unwrap();
    process.kill().unwrap();
    process.wait().unwrap();
    for out in logins("127.0.0.2").await {
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{out:?}");
    }
    let _ = haproxy.start_kill();
}

/// A draining daemon lets go of connections that hold no session (an idle ControlMaster
/// would keep it for the drain limit), then exits.
#[tokio::test(flavor = "multi_thread")]
async fn a_drained_daemon_closes_connections_without_sessions_and_exits() {
    let container = Container::start(&[]);
    let mut old = Bastion::spawn(|_, _| {}).await;
    let key = old.user_with_cert("user", "ca", &["-n", &container.bench]);
    let mut args = ssh_args(&old, &key, &container.bench);
    args.insert(0, "-N".to_owned());
    let mut idle = Command::new("ssh")
        .args(&args)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_log(&old.path("daemon.log"), "auth accepted").await;
    let mut new = daemon(
        &["serve", "--takeover"],
        &old.path("benchgate.toml"),
        &old.path("new.log"),
    );
    wait_for_log(&old.path("new.log"), "took over").await;
    let code = exit_of(&mut idle).await;
    assert_eq!(code, Some(255));
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(idle.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert!(
        stderr.contains("the bastion was upgraded; connect again"),
        "{stderr}"
    );
    let first = old.process.as_mut().unwrap();
    for _ in 0..100 {
        if first.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(first.try_wait().unwrap().and_then(|s| s.code()), Some(0));
    drop(new.start_kill());
}

/// A stand-in for a running daemon on `socket`: answers one takeover by handing `listener`
/// over as process `pid`, reads the new daemon's answer and goes away without confirming.
fn vanishing_daemon(
    socket: &Path,
    listener: std::net::TcpListener,
    pid: u32,
) -> std::thread::JoinHandle<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::io::{BufRead, IoSlice};
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;
    let server = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = server.accept().unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap();
        assert!(request.contains("\"takeover\""), "{request}");
        let reply = benchgate::admin::Reply {
            ok: true,
            handed: Some(benchgate::listeners::Handed {
                pid,
                ssh: vec![listener.local_addr().unwrap()],
                metrics: None,
            }),
            ..Default::default()
        };
        let mut line = serde_json::to_vec(&reply).unwrap();
        line.push(b'\n');
        let fds = [listener.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        sendmsg(
            &stream,
            &[IoSlice::new(&line)],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
        let mut answer = String::new();
        let _ = reader.read_line(&mut answer);
        assert!(answer.contains("accepting"), "{answer}");
    })
}

/// A takeover the running daemon does not confirm: while it lives, the new daemon gives up
/// (and leaves its admin socket in place); when it died, the new daemon serves.
#[tokio::test(flavor = "multi_thread")]
async fn an_unconfirmed_takeover_gives_up_unless_the_old_daemon_died() {
    let container = Container::start(&[]);
    let mut bastion = Bastion::start(|_, _| {}).await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &container.bench]);
    let socket = bastion.path("old.sock");
    let mut config = Config::load(&bastion.path("benchgate.toml")).unwrap();
    config.admin.socket = Optional(Some(socket.clone()));

    // The old daemon lives (this test's own pid): the new one gives up.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.server.listen = NonEmpty(vec![listener.local_addr().unwrap()]);
    std::fs::write(bastion.path("new.toml"), config.to_toml()).unwrap();
    let old = vanishing_daemon(&socket, listener, std::process::id());
    let mut new = daemon(
        &["serve", "--takeover"],
        &bastion.path("new.toml"),
        &bastion.path("gave-up.log"),
    );
    assert_eq!(exit_of(&mut new).await, Some(1));
    old.join().unwrap();
    let said = std::fs::read_to_string(bastion.path("gave-up.log")).unwrap();
    assert!(
        said.contains("did not confirm the takeover and serves on"),
        "{said}"
    );
    assert!(socket.exists(), "the old daemon's admin socket stays");
    let leftovers: Vec<_> = std::fs::read_dir(bastion.dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("old.sock."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The old daemon died after handing over (a pid that is gone): the new one serves.
    std::fs::remove_file(&socket).unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    config.server.listen = NonEmpty(vec![addr]);
    std::fs::write(bastion.path("new.toml"), config.to_toml()).unwrap();
    let old = vanishing_daemon(&socket, listener, dead);
    let mut new = daemon(
        &["serve", "--takeover"],
        &bastion.path("new.toml"),
        &bastion.path("serves.log"),
    );
    wait_for_log(&bastion.path("serves.log"), "benchgate ready").await;
    old.join().unwrap();
    assert!(std::fs::read_to_string(bastion.path("serves.log"))
        .unwrap()
        .contains("died during the takeover"));
    bastion.reach_via(addr);
    let run = bastion
        .exec(&container.bench, &key, &[], "echo served", b"")
        .await;
    assert_eq!(run.stdout_text(), "served\n", "{run:?}");
    drop(new.start_kill());
}
