//! Liveness: no client behaviour wedges a connection, and every way of ending a session ends
//! it, its container processes and its connection. The real OpenSSH client, real containers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use benchgate::config::{Optional, Span};
use support::{bench_and_bastion, cpu_seconds, run, Bastion, Container};

const VALID: &str = "-5m:+6h";

/// A bastion in this process with `edit` applied, a bench and a key for it.
async fn setup(
    edit: impl FnOnce(&Path, &mut benchgate::config::Config),
) -> (Bastion, Container, PathBuf) {
    bench_and_bastion(&[], &["-V", VALID], edit).await
}

/// Runs `script` with `sh -c`, where `$SSH` is the client's command line up to the
/// destination (`user@127.0.0.1` included); returns stdout, failing on a non-zero exit.
fn shell(bastion: &Bastion, user: &str, key: &Path, extra: &[&str], script: &str) -> String {
    let line = bastion.ssh_line(user, key, extra, "");
    let out = Command::new("sh")
        .args(["-c", script])
        .env("SSH", line)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An `ssh` client running `command`, its output discarded, so that it can be stopped.
fn client(bastion: &Bastion, user: &str, key: &Path, extra: &[&str], command: &str) -> Child {
    Command::new("ssh")
        .args(bastion.client_options(key))
        .args(["-p", &bastion.addr.port().to_string()])
        .args(extra)
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, signal: &str) {
    run("kill", &[signal, &child.id().to_string()]);
}

/// Runs `script` with `sh -c` in a process group of its own, output discarded, stderr kept.
fn pipeline(script: &str) -> Child {
    use std::os::unix::process::CommandExt as _;
    Command::new("sh")
        .args(["-c", script])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sends `signal` to every process of `group` (a [`pipeline`]).
fn signal_group(group: &Child, signal: &str) {
    run("kill", &[signal, "--", &format!("-{}", group.id())]);
}

/// Waits (bounded) until `bench` runs a process whose command line holds `needle`.
async fn wait_running(bench: &Container, needle: &str) {
    for _ in 0..100 {
        if bench.processes().iter().any(|p| p.contains(needle)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{needle:?} never started: {:?}", bench.processes());
}

/// Waits (bounded, `limit`) for an audit event `kind` with `reason`; returns it.
async fn wait_event(
    bastion: &Bastion,
    kind: &str,
    reason: &str,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(event) = bastion
            .audit()
            .into_iter()
            .find(|e| e["event"] == kind && e["reason"] == reason)
        {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} with reason {reason}: {:#?}",
            bastion.audit()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client that stopped reading (SIGSTOP) while its session's command floods it with output
/// is ended by the server for `reason` once `trigger` runs: its process goes, its bench place
/// is given back, and the end is audited.
async fn stopped_reader_is_ended(
    bastion: &Bastion,
    bench: &Container,
    key: &Path,
    extra: &[&str],
    reason: &str,
    trigger: impl std::future::Future<Output = ()>,
) {
    let mut ssh = client(bastion, &bench.bench, key, extra, "yes flood");
    wait_running(bench, "yes flood").await;
    // Let the output fill the window and the socket buffers, then stop reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&ssh, "-STOP");
    trigger.await;
    let end = wait_event(bastion, "session.end", reason, Duration::from_secs(30)).await;
    assert!(end["exit_status"].is_null(), "{end}");
    wait_event(
        bastion,
        "connection.closed",
        reason,
        Duration::from_secs(30),
    )
    .await;
    bench.wait_gone("yes flood").await;
    if let Some(app) = &bastion.app {
        assert_eq!(
            app.bench_slots.taken(&bench.bench),
            0,
            "the bench place is still taken"
        );
    }
    let _ = ssh.kill();
    let _ = ssh.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_reader_gets_64_mib_through_cat_whole() {
    let (bastion, bench, key) = setup(|_, _| {}).await;
    let out = shell(
        &bastion,
        &bench.bench,
        &key,
        &[],
        "head -c 64M /dev/zero | $SSH cat | (sleep 3; wc -c)",
    );
    assert_eq!(out.trim(), "67108864");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quarter_gigabyte_goes_through_cat_byte_exact_both_ways() {
    let (bastion, bench, key) = setup(|_, _| {}).await;
    let data = bastion.path("data");
    run(
        "sh",
        &[
            "-c",
            &format!("head -c 256M /dev/urandom > {}", data.display()),
        ],
    );
    let script = format!(
        "$SSH cat < {0} | tee {0}.out | sha256sum; sha256sum < {0}; wc -c < {0}.out",
        data.display()
    );
    let out = shell(&bastion, &bench.bench, &key, &[], &script);
    let sums: Vec<&str> = out.lines().collect();
    assert_eq!(sums.len(), 3, "{out}");
    assert_eq!(
        sums[0],
        sums[1],
        "the output ({} bytes) differs from the input: {:#?}",
        sums[2],
        bastion.audit()
    );
    let app = bastion.app.as_ref().unwrap();
    assert_eq!(app.input.held(), 0, "input still held after the session");
}

#[tokio::test(flavor = "multi_thread")]
async fn asyncssh_gets_64_mib_through_cat_byte_exact() {
    // asyncssh hung at 10 MiB through cat when russh's channel queue filled.
    let (bastion, bench, key) = setup(|_, _| {}).await;
    let out = support::python_client(&bastion, "asyncssh_cat.py", &bench.bench, &key, "64").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout_text().trim(), "67108864 True", "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_hundred_sendenv_variables_log_in_and_only_allowed_ones_pass() {
    let (bastion, bench, key) = setup(|_, config| {
        config.session.env_allow = vec!["LC_*".to_owned()];
    })
    .await;
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(bastion.client_options(&key))
        .args(["-p", &bastion.addr.port().to_string()])
        .args(["-o", "SendEnv=LC_BG_* XBG_*"])
        .arg(format!("{}@127.0.0.1", bench.bench))
        .arg("env | grep -c '^LC_BG_'; env | grep -c '^XBG_' || true");
    for i in 0..250 {
        cmd.env(format!("LC_BG_{i}"), "x");
    }
    for i in 0..50 {
        cmd.env(format!("XBG_{i}"), "y");
    }
    let out = support::run_client(cmd, b"").await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let counts: Vec<String> = out.stdout_text().lines().map(str::to_owned).collect();
    // At most policy::MAX_ENV_VARS of the allowed ones; none of the others.
    assert_eq!(counts, ["64", "0"], "{out:?}");
}

/// The daemon's resident memory in bytes.
fn rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_channel_leaves_its_sibling_working_and_memory_bounded_then_ends() {
    let bench = Container::start(&[]);
    let bastion = Bastion::spawn(|_, config| {
        config.server.stuck_timeout = Span(Duration::from_secs(8));
    })
    .await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &bench.bench, "-V", VALID]);
    let pid = bastion.process.as_ref().unwrap().id();
    let control = bastion.path("control");
    let control_opt = format!("ControlPath={}", control.display());
    let mut master = client(
        &bastion,
        &bench.bench,
        &key,
        &["-M", "-N", "-o", &control_opt],
        "",
    );
    for _ in 0..100 {
        if control.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(control.exists(), "the control master never started");
    let before = rss(pid);
    // One channel floods a process that never reads its stdin.
    let line = bastion.ssh_line(&bench.bench, &key, &["-o", &control_opt], "sleep 999");
    let mut flood = pipeline(&format!("head -c 256M /dev/zero | {line}"));
    wait_running(&bench, "sleep 999").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The sibling still gets its session, start to end.
    let started = Instant::now();
    let alive = shell(
        &bastion,
        &bench.bench,
        &key,
        &["-o", &control_opt],
        "$SSH echo alive",
    );
    assert_eq!(alive.trim(), "alive");
    let took = started.elapsed();
    let grown = rss(pid).saturating_sub(before);
    // Budget per connection (4 MiB) plus two 2 MiB windows per channel, and slack for the
    // allocator and the sibling's session.
    assert!(grown < 24 << 20, "RSS grew by {grown} bytes");
    // Held back, the flood costs the daemon next to nothing (the window's trickle top-ups
    // once spun at half a core here).
    let (cpu_before, wall) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    assert!(
        cpu < 0.25 * wall.elapsed().as_secs_f64(),
        "{cpu} CPU-s in {:?}",
        wall.elapsed()
    );
    eprintln!("sibling session took {took:?}; RSS grew by {grown} bytes; {cpu} CPU-s held back");
    // The stuck connection is ended, with a reason, and the process with it.
    let closed = wait_event(
        &bastion,
        "connection.closed",
        "stuck",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(closed["bench"], bench.bench.as_str());
    bench.wait_gone("sleep 999").await;
    let status = flood.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(flood.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("stopped reading its input"), "{stderr}");
    let _ = master.kill();
    let _ = master.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_ends_a_session_whose_client_stopped_reading() {
    let (bastion, bench, key) = setup(|dir, config| {
        std::fs::write(dir.join("revoked"), "").unwrap();
        config.auth.revoked_keys = Optional(Some(dir.join("revoked")));
    })
    .await;
    let revoke = async {
        let public = std::fs::read(format!("{}.pub", key.display())).unwrap();
        std::fs::write(bastion.path("revoked.new"), public).unwrap();
        std::fs::rename(bastion.path("revoked.new"), bastion.path("revoked")).unwrap();
    };
    stopped_reader_is_ended(&bastion, &bench, &key, &[], "revoked", revoke).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_with_a_warning_due_ends_a_paused_terminal() {
    let (bastion, bench, key) = bench_and_bastion(&[], &["-V", "-1m:+9s"], |_, config| {
        config.auth.expiry_warnings = vec![Span(Duration::from_secs(5))];
    })
    .await;
    // The warning falls due while the terminal is stopped; the expiry follows.
    stopped_reader_is_ended(&bastion, &bench, &key, &["-tt"], "expired", async {}).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_ends_a_session_whose_client_stopped_reading() {
    let (bastion, bench, key) = setup(|_, config| {
        config.server.idle_timeout = Span(Duration::from_secs(3));
    })
    .await;
    stopped_reader_is_ended(&bastion, &bench, &key, &[], "idle", async {}).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_a_flooded_stopped_client_within_the_grace() {
    let bench = Container::start(&[]);
    let grace = Duration::from_secs(2);
    let mut bastion = Bastion::spawn(|_, config| {
        config.server.shutdown_grace = Span(grace);
    })
    .await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &bench.bench, "-V", VALID]);
    // `yes` out, a flood in, and then the client stops.
    let line = bastion.ssh_line(&bench.bench, &key, &[], "yes flood");
    let mut ssh = pipeline(&format!("yes | {line}"));
    wait_running(&bench, "yes flood").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal_group(&ssh, "-STOP");
    let sent = Instant::now();
    bastion.signal("-TERM");
    let daemon = bastion.process.as_mut().unwrap();
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < grace + Duration::from_secs(15),
            "still running {:?} after SIGTERM: {}",
            sent.elapsed(),
            bastion.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{}", bastion.log());
    eprintln!("daemon exited {:?} after SIGTERM", sent.elapsed());
    bench.wait_gone("yes flood").await;
    let end = wait_event(&bastion, "session.end", "shutdown", Duration::from_secs(1)).await;
    assert!(end["exit_status"].is_null(), "{end}");
    signal_group(&ssh, "-KILL");
    let _ = ssh.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_killed_while_its_stdin_is_stuck_is_noticed() {
    let (bastion, bench, key) = setup(|_, _| {}).await;
    let line = bastion.ssh_line(&bench.bench, &key, &[], "sleep 998");
    let mut flood = pipeline(&format!("head -c 256M /dev/zero | {line}"));
    wait_running(&bench, "sleep 998").await;
    // Long enough for the input budget to fill and the client to be held back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let app = bastion.app.as_ref().unwrap();
    assert!(app.input.held() > 0, "nothing was held back");
    signal_group(&flood, "-KILL");
    let _ = flood.wait();
    wait_event(
        &bastion,
        "session.end",
        "client_closed",
        Duration::from_secs(10),
    )
    .await;
    bench.wait_gone("sleep 998").await;
    assert_eq!(app.input.held(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_hundred_stalled_connections_under_256_files_leave_the_daemon_serving() {
    let bench = Container::start(&[]);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let bastion = Bastion::spawn_with_fd_limit(Some(256), |_, config| {
        config.server.login_grace_time = Span(Duration::from_secs(2));
        config.server.max_startups = 1000.try_into().unwrap();
        config.server.max_startups_per_source = 1000.try_into().unwrap();
        config.metrics.listen = Optional(Some(metrics));
    })
    .await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &bench.bench, "-V", VALID]);
    // 300 connections that say their version and then neither send nor read; more than the
    // daemon has files for.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        if let Ok(mut stream) = std::net::TcpStream::connect(bastion.addr) {
            let _ = std::io::Write::write_all(&mut stream, b"SSH-2.0-stall\r\n");
            stalled.push(stream);
        }
    }
    // The daemon cuts them by itself (login grace) while they stay open on this side.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let login = bastion.exec(&bench.bench, &key, &[], "echo in", b"").await;
        let health = health(metrics).await;
        if login.stdout_text() == "in\n" && health.as_deref() == Some("ok") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not serving 30 s later: login {login:?}, health {health:?}: {}",
            bastion.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(stalled);
}

/// `/health`'s body, if it answers within two seconds.
async fn health(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response.split_once("\r\n\r\n")?.1.trim().to_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}
