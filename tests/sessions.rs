//! Bench sessions end to end: the real `ssh` client, the real daemon and real containers on
//! the real Docker engine (a busybox image the tests build themselves).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::{bench_and_bastion, bench_and_bastion_in, run, Bastion, Container};

const VALID: &str = "-5m:+6h";

/// A bastion, a running bench container with `labels`, and a key whose certificate names
/// the bench (plus `sign_args`).
async fn setup(labels: &[&str], sign_args: &[&str]) -> (Bastion, Container, PathBuf) {
    let mut args = vec!["-V", VALID];
    args.extend_from_slice(sign_args);
    bench_and_bastion(labels, &args, |_, _| {}).await
}

#[tokio::test(flavor = "multi_thread")]
async fn command_output_and_exit_status_reach_the_client() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let run = bastion
        .exec(
            &bench.bench,
            &key,
            &[],
            "echo hi; echo oops >&2; exit 7",
            b"",
        )
        .await;
    assert_eq!(run.stdout_text(), "hi\n");
    assert_eq!(run.stderr, "oops\n");
    assert_eq!(run.code, Some(7));
    let run = bastion
        .exec(
            &bench.bench,
            &key,
            &[],
            "id -un; pwd; echo $BENCHGATE_BENCH $BENCHGATE_SERIAL",
            b"",
        )
        .await;
    assert_eq!(
        run.stdout_text(),
        format!("frappe\n/home/frappe/frappe-bench\n{} 77\n", bench.bench)
    );
    assert_eq!(run.code, Some(0));

    let events = bastion.audit_after_closed(2).await;
    let end = events.iter().find(|e| e["event"] == "session.end").unwrap();
    assert_eq!(end["exit_status"], 7);
    assert_eq!(end["reason"], "exited");
    assert_eq!(end["bench"], bench.bench.as_str());
    assert_eq!(end["command"], "echo hi; echo oops >&2; exit 7");
    assert!(end["container"].as_str().unwrap().len() == 64, "{end}");
    assert!(events.iter().any(|e| e["event"] == "session.start"));
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_override_user_and_working_directory() {
    let (bastion, bench, key) =
        setup(&["benchgate.user=other", "benchgate.workdir=/tmp"], &[]).await;
    let run = bastion
        .exec(&bench.bench, &key, &[], "id -un; pwd", b"")
        .await;
    assert_eq!(run.stdout_text(), "other\n/tmp\n", "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_mebibyte_of_random_bytes_crosses_intact_both_ways() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let data: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    let echoed = bastion.exec(&bench.bench, &key, &[], "cat", &data).await;
    assert_eq!(echoed.code, Some(0), "{}", echoed.stderr);
    assert!(
        echoed.stdout == data,
        "client -> container -> client changed the bytes"
    );

    // Container -> client: compare with a checksum computed in the container.
    let run = bastion
        .exec(
            &bench.bench,
            &key,
            &[],
            "head -c 1048576 /dev/urandom > /tmp/r; cat /tmp/r",
            b"",
        )
        .await;
    assert_eq!(run.stdout.len(), 1 << 20);
    let sum = bastion
        .exec(&bench.bench, &key, &[], "md5sum < /tmp/r", b"")
        .await;
    let local = run_md5(&run.stdout);
    assert_eq!(
        sum.stdout_text().split_whitespace().next(),
        Some(local.as_str())
    );
}

fn run_md5(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    std::fs::write(&path, data).unwrap();
    let out = run("md5sum", &[path.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn tty_output_keeps_low_bytes_at_the_start_of_a_read() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let run = bastion
        .exec(
            &bench.bench,
            &key,
            &["-tt"],
            r"printf '\001\000\002abc'",
            b"",
        )
        .await;
    assert!(
        run.stdout.starts_with(b"\x01\x00\x02abc"),
        "{:?}",
        run.stdout
    );
    assert_eq!(run.code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_eof_reaches_a_command_without_tty() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let run = bastion
        .exec(&bench.bench, &key, &[], "wc -c", b"12345")
        .await;
    assert_eq!(run.stdout_text().trim(), "5");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_env_passes_only_when_allowed() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(bastion.client_options(&key))
        .args([
            "-p",
            &bastion.addr.port().to_string(),
            "-o",
            "SendEnv=LANG SECRET_TOKEN",
        ])
        .arg(format!("{}@127.0.0.1", bench.bench))
        .arg("echo lang=$LANG secret=$SECRET_TOKEN")
        .env("LANG", "C.UTF-8")
        .env("SECRET_TOKEN", "s3cr3t");
    let run = support::run_client(cmd, b"").await;
    assert_eq!(run.stdout_text(), "lang=C.UTF-8 secret=\n");
    let events = bastion.audit_after_closed(1).await;
    assert!(events
        .iter()
        .any(|e| e["event"] == "request.refused" && e["request"] == "env"));
}

struct Tmux(String);

impl Tmux {
    fn start(command: &str) -> Self {
        let name = format!("bg-{:x}", rand::random::<u64>());
        let args = [
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            "100",
            "-y",
            "30",
            command,
        ];
        // Tests share tmux's server, which exits with its last session: a new session can
        // race that exit ("server exited unexpectedly"). Try again, bounded.
        for _ in 0..5 {
            let out = std::process::Command::new("tmux")
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return Self(name);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        run("tmux", &args);
        Self(name)
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.0];
        args.extend_from_slice(keys);
        run("tmux", &args);
    }

    fn screen(&self) -> String {
        let out = std::process::Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (bounded, 10 s) until the screen shows `text`.
    async fn wait_for(&self, text: &str) {
        for _ in 0..100 {
            if self.screen().contains(text) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("screen never showed {text:?}:\n{}", self.screen());
    }

    fn alive(&self) -> bool {
        std::process::Command::new("tmux")
            .args(["has-session", "-t", &self.0])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn terminal_size_follows_the_client_and_ctrl_c_interrupts() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let tmux = Tmux::start(&bastion.ssh_line(&bench.bench, &key, &[], ""));
    tmux.wait_for("frappe-bench $").await;
    tmux.keys(&["stty size", "Enter"]);
    tmux.wait_for("30 100").await;
    run(
        "tmux",
        &["resize-window", "-t", &tmux.0, "-x", "120", "-y", "40"],
    );
    tmux.keys(&["clear; stty size", "Enter"]);
    tmux.wait_for("40 120").await;
    tmux.keys(&["sleep 600; echo slept", "Enter"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tmux.keys(&["C-c"]);
    tmux.keys(&["echo interrupted-$((6*7))", "Enter"]);
    tmux.wait_for("interrupted-42").await;
    assert!(
        !tmux.screen().lines().any(|l| l.trim() == "slept"),
        "{}",
        tmux.screen()
    );
    assert!(!bench.processes().iter().any(|p| p.contains("sleep 600")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_has_its_size_before_the_command_runs() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    // Debian's Docker 20.10 has no console_size: the size lands after the start, and without
    // the wrapper's wait most runs printed 0 0.
    for run in 0..20 {
        let tmux = Tmux::start(&bastion.ssh_line(
            &bench.bench,
            &key,
            &["-t"],
            "stty size; echo size-done; sleep 5",
        ));
        tmux.wait_for("size-done").await;
        let screen = tmux.screen();
        assert!(
            screen.lines().any(|l| l.trim() == "30 100"),
            "run {run}: {screen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn background_job_ends_with_the_interactive_shell() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let tmux = Tmux::start(&bastion.ssh_line(&bench.bench, &key, &[], ""));
    tmux.wait_for("frappe-bench $").await;
    tmux.keys(&["sleep 777 &", "Enter"]);
    tmux.keys(&["echo started-$((1+1))", "Enter"]);
    tmux.wait_for("started-2").await;
    assert!(bench.processes().iter().any(|p| p.contains("sleep 777")));
    tmux.keys(&["exit", "Enter"]);
    for _ in 0..100 {
        if !tmux.alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bench.wait_gone("sleep 777").await;
}

/// A command that exits normally is cleaned up after by its own wrapper (no teardown exec
/// follows it): background jobs end, and one that ignores SIGTERM gets SIGKILL.
#[tokio::test(flavor = "multi_thread")]
async fn background_jobs_of_a_finished_command_end() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let command = "sleep 555 >/dev/null 2>&1 & \
                   sh -c 'trap \"\" TERM; exec sleep 556' >/dev/null 2>&1 & \
                   echo started; exit 3";
    let run = bastion.exec(&bench.bench, &key, &[], command, b"").await;
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert_eq!(run.stdout_text(), "started\n");
    bench.wait_gone("sleep 555").await;
    bench.wait_gone("sleep 556").await;
}

/// A job that hands off to a child of its own and exits, as daemons do, while the session
/// ends: the handoff is caught however it falls against the session's own look.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_handing_off_while_the_session_ends_is_ended() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    for delay_us in [0, 300, 1000, 2000, 3000, 5000, 8000, 12000] {
        let command = format!(
            "sh -c 'usleep {delay_us}; exec sleep 56{delay_us} </dev/null >/dev/null 2>&1 & exit' \
             </dev/null >/dev/null 2>&1 & exit 0"
        );
        let run = bastion.exec(&bench.bench, &key, &[], &command, b"").await;
        assert_eq!(run.code, Some(0), "{}", run.stderr);
    }
    bench.wait_gone("sleep 56").await;
}

/// The wrapper adds nothing to what the user sees when a command is killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_command_reports_its_signal_and_nothing_else() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let run = bastion
        .exec(&bench.bench, &key, &[], "kill -9 $$", b"")
        .await;
    assert_eq!(run.code, Some(137));
    assert_eq!(run.stderr, "");
}

/// With an init that reaps (`docker run --init`), nothing dead is left to look at: a daemon
/// that `setsid`s, forks and exits leaves a process whose session leader is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_double_forked_daemon_ends_under_a_reaping_init() {
    let bench = Container::start_with(&["--init"], &[]);
    let (bastion, bench, key) = bench_and_bastion_in(bench, &["-V", VALID], |_, _| {}).await;
    let command = "setsid sh -c 'sleep 559 </dev/null >/dev/null 2>&1 & exit' \
                   </dev/null >/dev/null 2>&1; exit 0";
    let run = bastion.exec(&bench.bench, &key, &[], command, b"").await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    bench.wait_gone("sleep 559").await;
}

/// In the host's PID namespace orphans do not go to the container's init, so the wrapper
/// cannot tell that nothing was left behind: it always looks by marker.
#[tokio::test(flavor = "multi_thread")]
async fn background_jobs_end_in_a_container_sharing_the_host_pids() {
    let bench = Container::start_with(&["--pid=host"], &[]);
    let (bastion, bench, key) = bench_and_bastion_in(bench, &["-V", VALID], |_, _| {}).await;
    let command = "sleep 557 >/dev/null 2>&1 & echo started";
    let run = bastion.exec(&bench.bench, &key, &[], command, b"").await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let gone = || {
        !String::from_utf8_lossy(&run_host_ps().stdout)
            .lines()
            .any(|l| l.contains("sleep 557"))
    };
    for _ in 0..50 {
        if gone() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("sleep 557 still running 5 s later");
}

fn run_host_ps() -> std::process::Output {
    run("ps", &["-eo", "stat,args"])
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_client_leaves_nothing_running() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(bastion.client_options(&key))
        .args(["-p", &bastion.addr.port().to_string()])
        .arg(format!("{}@127.0.0.1", bench.bench))
        .arg("sleep 1000")
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    for _ in 0..100 {
        if bench.processes().iter().any(|p| p.contains("sleep 1000")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        bench.processes().iter().any(|p| p.contains("sleep 1000")),
        "the command never started"
    );
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    bench.wait_gone("sleep 1000").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_container_ends_the_session_with_a_message() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let session = bastion.exec(&bench.bench, &key, &[], "sleep 1000", b"");
    let stopper = async {
        for _ in 0..100 {
            if bench.processes().iter().any(|p| p.contains("sleep 1000")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        run("docker", &["kill", &bench.name]);
    };
    let (run, ()) = tokio::join!(session, stopper);
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("stopped during the session"), "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_and_stopped_benches_say_so() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    run("docker", &["stop", "-t", "0", &bench.name]);
    let mut said = String::new();
    for _ in 0..100 {
        let run = bastion.exec(&bench.bench, &key, &[], "true", b"").await;
        said = run.stderr;
        if said.contains("(status: exited)") {
            assert_eq!(run.code, Some(1));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        said.contains(&format!(
            "benchgate: bench '{}' is not running (status: exited)",
            bench.bench
        )),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn file_transfer_and_forwarding_are_refused_with_a_message() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let port = bastion.addr.port().to_string();
    let target = format!("{}@127.0.0.1", bench.bench);
    let options = bastion.client_options(&key);
    let local = bastion.path("upload.txt");
    std::fs::write(&local, "data").unwrap();
    let remote = format!("{target}:/tmp/upload.txt");
    let message = "file transfer (sftp/scp) is not available through this bastion";

    let mut sftp = tokio::process::Command::new("sftp");
    sftp.args(&options).args(["-P", &port, &target]);
    let mut scp = tokio::process::Command::new("scp");
    scp.args(&options)
        .args(["-P", &port, local.to_str().unwrap(), &remote]);
    let mut scp_legacy = tokio::process::Command::new("scp");
    scp_legacy
        .args(&options)
        .args(["-O", "-P", &port, local.to_str().unwrap(), &remote]);
    let mut rsync = tokio::process::Command::new("rsync");
    let rsh = format!("ssh {} -p {port}", options.join(" "));
    rsync.args(["-e", &rsh, local.to_str().unwrap(), &remote]);
    for (name, cmd) in [
        ("sftp", sftp),
        ("scp", scp),
        ("scp -O", scp_legacy),
        ("rsync", rsync),
    ] {
        let started = std::time::Instant::now();
        let run = support::run_client(cmd, b"").await;
        assert_ne!(run.code, Some(0), "{name}: {run:?}");
        assert!(run.stderr.contains(message), "{name}: {run:?}");
        assert!(started.elapsed() < Duration::from_secs(20), "{name} hung");
    }
    // Nothing was started in the container for any of them.
    let events = bastion.audit_after_closed(4).await;
    assert!(
        !events.iter().any(|e| e["event"] == "session.start"),
        "{events:#?}"
    );

    let forwarding = [
        (vec!["-W", "127.0.0.1:22"], "administratively prohibited"),
        (
            vec![
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                "0:127.0.0.1:22",
                "-N",
            ],
            "remote port forwarding failed",
        ),
    ];
    for (extra, expected) in forwarding {
        let run = bastion.exec(&bench.bench, &key, &extra, "", b"").await;
        assert_ne!(run.code, Some(0), "{extra:?}: {run:?}");
        assert!(run.stderr.contains(expected), "{extra:?}: {run:?}");
    }
    let events = bastion.audit_after_closed(6).await;
    for request in [
        "subsystem",
        "exec-file-transfer",
        "direct-tcpip",
        "tcpip-forward",
    ] {
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "request.refused" && e["request"] == request),
            "no refusal of {request}: {events:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_and_dynamic_forwards_are_refused_when_used() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (local_port, dynamic_port) = {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        )
    };
    let target = listener.local_addr().unwrap().port();
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(bastion.client_options(&key))
        .args(["-p", &bastion.addr.port().to_string(), "-N"])
        .args(["-L", &format!("{local_port}:127.0.0.1:{target}")])
        .args(["-D", &dynamic_port.to_string()])
        .arg(format!("{}@127.0.0.1", bench.bench))
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    // Use the local forward: the bastion refuses the channel, so the connection closes.
    let mut used = false;
    for _ in 0..100 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", local_port)).await {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap_or(0);
            assert_eq!(n, 0, "a forwarded connection got data");
            used = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(used, "ssh -L never listened");
    // Use the dynamic forward with a SOCKS5 connect request.
    let mut socks = tokio::net::TcpStream::connect(("127.0.0.1", dynamic_port))
        .await
        .unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        socks.write_all(&[5, 1, 0]).await.unwrap();
        let mut hello = [0u8; 2];
        socks.read_exact(&mut hello).await.unwrap();
        let mut request = vec![5, 1, 0, 1, 127, 0, 0, 1];
        request.extend_from_slice(&target.to_be_bytes());
        socks.write_all(&request).await.unwrap();
        let mut reply = [0u8; 10];
        let n = tokio::time::timeout(Duration::from_secs(10), socks.read(&mut reply))
            .await
            .unwrap()
            .unwrap_or(0);
        assert!(
            n == 0 || reply[1] != 0,
            "SOCKS connect succeeded: {reply:?}"
        );
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let events = bastion.audit_after_closed(1).await;
    let refusals = events
        .iter()
        .filter(|e| e["event"] == "request.refused" && e["request"] == "direct-tcpip")
        .count();
    assert!(refusals >= 2, "{events:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_and_x11_forwarding_are_refused() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let agent_sock = bastion.path("agent.sock");
    let agent = std::process::Command::new("ssh-agent")
        .args(["-D", "-a", agent_sock.to_str().unwrap()])
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
        }
    }
    let _agent = Kill(agent);
    for _ in 0..50 {
        if agent_sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cmd = tokio::process::Command::new("ssh");
    let mut options = bastion.client_options(&key);
    let agent_option = format!("IdentityAgent={}", agent_sock.display());
    if let Some(pos) = options.iter().position(|o| o == "IdentityAgent=none") {
        options[pos] = agent_option;
    }
    cmd.args(options)
        .args(["-p", &bastion.addr.port().to_string(), "-A", "-X"])
        .arg(format!("{}@127.0.0.1", bench.bench))
        .arg("echo agent=$SSH_AUTH_SOCK display=$DISPLAY")
        .env("DISPLAY", ":0");
    let run = support::run_client(cmd, b"").await;
    assert_eq!(run.stdout_text(), "agent= display=\n", "{run:?}");
    assert!(
        run.stderr.contains("X11 forwarding request failed"),
        "{run:?}"
    );
    let events = bastion.audit_after_closed(1).await;
    for request in ["auth-agent-req", "x11-req"] {
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "request.refused" && e["request"] == request),
            "{request}: {events:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cert_without_permit_pty_gets_no_terminal_but_can_exec() {
    let (bastion, bench, key) = setup(&[], &["-O", "no-pty"]).await;
    // With -tt the OpenSSH client itself gives up when the PTY is refused.
    let run = bastion.exec(&bench.bench, &key, &["-tt"], "tty", b"").await;
    assert!(
        run.stderr.contains("PTY allocation request failed"),
        "{run:?}"
    );
    let run = bastion
        .exec(&bench.bench, &key, &[], "tty; echo ran", b"")
        .await;
    assert_eq!(run.stdout_text(), "not a tty\nran\n", "{run:?}");
    let events = bastion.audit_after_closed(2).await;
    assert!(events
        .iter()
        .any(|e| e["event"] == "request.refused" && e["request"] == "pty-req"));
}

#[tokio::test(flavor = "multi_thread")]
async fn force_command_runs_instead_of_the_request() {
    let (bastion, bench, key) = setup(
        &[],
        &["-O", "force-command=echo forced: $SSH_ORIGINAL_COMMAND"],
    )
    .await;
    let run = bastion
        .exec(&bench.bench, &key, &[], "echo asked", b"")
        .await;
    assert_eq!(run.stdout_text(), "forced: echo asked\n");
    // Even file transfer requests get only the forced command.
    let run = bastion
        .exec(&bench.bench, &key, &[], "scp -t /tmp", b"")
        .await;
    assert_eq!(run.stdout_text(), "forced: scp -t /tmp\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn group_principal_grants_its_benches() {
    let container = Container::start(&["benchgate.group=team-blue"]);
    let bastion = Bastion::start(|_, _| {}).await;
    let key = bastion.user_with_cert("user", "ca", &["-n", "team-blue", "-V", VALID]);
    bastion.wait_for_bench(&container.bench).await;
    let run = bastion
        .exec(&container.bench, &key, &[], "echo in", b"")
        .await;
    assert_eq!(run.stdout_text(), "in\n", "{run:?}");
}

/// `benchgate explain` against `bastion`'s config: its exit status and what it printed.
fn explain(bastion: &Bastion, bench: &str, key: &std::path::Path) -> (i32, String) {
    let cert = format!("{}-cert.pub", key.display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_benchgate"))
        .args(["explain", "--config"])
        .arg(bastion.path("benchgate.toml"))
        .args(["--bench", bench, &cert])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    (code, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn container_id(container: &Container) -> String {
    let out = run("docker", &["inspect", "-f", "{{.Id}}", &container.name]);
    String::from_utf8(out.stdout).unwrap().trim()[..12].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bench_on_two_running_containers_is_refused_until_one_is_gone() {
    let first = Container::start(&[]);
    // Whoever can start a container with the bench's label must not capture its sessions.
    let second = Container::start_as(Some(&first.bench), &[], &[]);
    let bastion = Bastion::spawn(|_, _| {}).await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &first.bench, "-V", VALID]);
    let run = bastion
        .exec(&first.bench, &key, &[], "echo reached", b"")
        .await;
    let message = format!(
        "benchgate: bench '{}' is ambiguous: 2 containers carry its label",
        first.bench
    );
    assert!(run.stderr.contains(&message), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert_ne!(run.code, Some(0), "{run:?}");
    let log = bastion.log();
    let refused = log
        .lines()
        .find(|l| l.contains("session refused: bench is ambiguous"))
        .unwrap_or_else(|| panic!("no refusal line: {log}"));
    assert!(refused.contains("ERROR"), "{refused}");
    for id in [container_id(&first), container_id(&second)] {
        assert!(refused.contains(&id), "{id} not named: {refused}");
    }
    // The index reported it before anyone logged in.
    let reported = log
        .find(&format!(
            "bench {:?} is ambiguous: 2 live containers carry its label (",
            first.bench
        ))
        .unwrap_or_else(|| panic!("the index did not report it: {log}"));
    assert!(reported < log.find("session refused").unwrap(), "{log}");
    let (code, said) = explain(&bastion, &first.bench, &key);
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("AMBIGUOUS: 2 live containers"), "{said}");
    // A paused second container still makes it ambiguous: it would run again.
    support::run("docker", &["pause", &second.name]);
    for _ in 0..100 {
        let attempt = bastion
            .exec(&first.bench, &key, &[], "echo reached", b"")
            .await;
        assert!(attempt.stdout.is_empty(), "{attempt:?}");
        if attempt.stderr.contains("is ambiguous") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // With the second container gone, the bench is one container again.
    drop(second);
    for _ in 0..100 {
        let run = bastion
            .exec(&first.bench, &key, &[], "echo reached", b"")
            .await;
        if run.stdout_text() == "reached\n" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the bench never worked again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_label_that_names_a_bench_is_not_honoured() {
    let named = Container::start(&[]);
    let grouped = Container::start(&[&format!("benchgate.group={}", named.bench)]);
    let bastion = Bastion::spawn(|_, _| {}).await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &named.bench, "-V", VALID]);
    let run = bastion.exec(&named.bench, &key, &[], "echo in", b"").await;
    assert_eq!(run.stdout_text(), "in\n", "{run:?}");
    // A certificate for bench X does not open the benches grouped as X.
    let reasons = bastion.rejection_reasons(&grouped.bench, &key, &[]).await;
    assert!(
        reasons.iter().any(|r| r == "principal_mismatch"),
        "{reasons:?}"
    );
    let log = bastion.log();
    assert!(
        log.lines().any(|l| l.contains(&container_id(&grouped))
            && l.contains("names a bench; the group is not honoured")),
        "{log}"
    );
    let (code, said) = explain(&bastion, &grouped.bench, &key);
    assert_ne!(code, 0, "{said}");
    assert!(said.contains("NOT honoured"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn group_principals_need_the_prefix_when_one_is_set() {
    let container = Container::start(&["benchgate.group=team-green"]);
    let bastion = Bastion::start(|_, config| {
        config.docker.group_principal_prefix = "group:".into();
    })
    .await;
    bastion.wait_for_bench(&container.bench).await;
    let bare = bastion.user_with_cert("bare", "ca", &["-n", "team-green", "-V", VALID]);
    let reasons = bastion
        .rejection_reasons(&container.bench, &bare, &[])
        .await;
    assert!(
        reasons.iter().any(|r| r == "principal_mismatch"),
        "{reasons:?}"
    );
    let prefixed =
        bastion.user_with_cert("prefixed", "ca", &["-n", "group:team-green", "-V", VALID]);
    let run = bastion
        .exec(&container.bench, &prefixed, &[], "echo in", b"")
        .await;
    assert_eq!(run.stdout_text(), "in\n", "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200_kib_key_id_logs_in_and_reaches_the_session_escaped_and_cut() {
    use russh::keys::ssh_key::{PrivateKey, PublicKey};
    let (bastion, bench, _) = setup(&[], &[]).await;
    // ssh-keygen cannot take it: one argument is at most 128 KiB, like one variable.
    let key_id = format!(
        "{}\u{1b}[31m{}",
        "k".repeat(100 * 1024),
        "d".repeat(100 * 1024)
    );
    let user = support::keygen(bastion.dir.path(), "long", "ed25519");
    let ca = PrivateKey::read_openssh_file(bastion.path("ca")).unwrap();
    let subject = PublicKey::read_openssh_file(user.with_extension("pub")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let request = benchgate::auth::issue::Request {
        principal: &bench.bench,
        validity: Duration::from_secs(3600),
        identity: &key_id,
        serial: 5,
        now,
    };
    let cert = benchgate::auth::issue::sign(&ca, &subject, &request).unwrap();
    std::fs::write(
        format!("{}-cert.pub", user.display()),
        cert.to_openssh().unwrap(),
    )
    .unwrap();
    let run = bastion
        .exec(
            &bench.bench,
            &user,
            &[],
            "printf '%s' \"$BENCHGATE_KEY_ID\"",
            b"",
        )
        .await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let seen = run.stdout_text();
    assert_eq!(seen, format!("{}…", "k".repeat(256)));
    let accepted = bastion
        .audit()
        .into_iter()
        .find(|e| e["event"] == "auth.accepted" && e["serial"] == 5)
        .unwrap();
    assert!(accepted["key_id"].as_str().unwrap().len() < 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn container_names_and_id_prefixes_are_not_benches() {
    let (bastion, bench, _) = setup(&[], &[]).await;
    let id = container_id(&bench);
    for name in [id.as_str(), bench.name.as_str()] {
        let key = bastion.user_with_cert(
            &format!("k{}", name.len()),
            "ca",
            &["-n", name, "-V", VALID],
        );
        let run = bastion.exec(name, &key, &[], "echo reached", b"").await;
        assert!(
            run.stderr.contains("(status: no such bench)"),
            "{name}: {run:?}"
        );
        assert!(run.stdout.is_empty(), "{name}: {run:?}");
    }
}

/// Starts `sleep 30` through `bastion` and waits until it runs; the returned child is the
/// client, killed when dropped.
async fn hold_a_session(
    bastion: &Bastion,
    bench: &Container,
    key: &std::path::Path,
    extra: &[&str],
) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(bastion.client_options(key))
        .args(["-p", &bastion.addr.port().to_string()])
        .args(extra)
        .arg(format!("{}@127.0.0.1", bench.bench))
        .arg("sleep 30")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    for _ in 0..100 {
        if bench.processes().iter().any(|p| p.contains("sleep 30")) {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the held session never started");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_per_bench_are_limited_with_a_message() {
    let (bastion, container, key) = bench_and_bastion(&[], &["-V", VALID], |_, config| {
        config.session.max_sessions_per_bench = std::num::NonZeroU32::new(1).unwrap();
    })
    .await;
    let _held = hold_a_session(&bastion, &container, &key, &[]).await;
    let run = bastion
        .exec(&container.bench, &key, &[], "echo second", b"")
        .await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("too many sessions into bench"),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_per_connection_are_limited() {
    let (bastion, container, key) = bench_and_bastion(&[], &["-V", VALID], |_, config| {
        config.server.max_sessions_per_connection = std::num::NonZeroU32::new(1).unwrap();
    })
    .await;
    let socket = bastion.path("control.sock");
    let control = format!("ControlPath={}", socket.display());
    let master = ["-o", "ControlMaster=yes", "-o", control.as_str()];
    let _held = hold_a_session(&bastion, &container, &key, &master).await;
    let shared = ["-o", "ControlMaster=no", "-o", control.as_str()];
    // The multiplexing client is refused a second channel on the held connection (its master
    // prints the bastion's reason), then falls back to a connection of its own.
    let run = bastion
        .exec(&container.bench, &key, &shared, "echo second", b"")
        .await;
    assert!(
        run.stderr.contains("Session open refused by peer"),
        "{run:?}"
    );
    let events = bastion.audit();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "request.refused" && e["request"] == "session"),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_sessions_free_their_place_on_the_connection() {
    let (bastion, container, key) = bench_and_bastion(&[], &["-V", VALID], |_, config| {
        config.server.max_sessions_per_connection = std::num::NonZeroU32::new(1).unwrap();
    })
    .await;
    let control = format!("ControlPath={}", bastion.path("control.sock").display());
    let master = [
        "-o",
        "ControlMaster=auto",
        "-o",
        control.as_str(),
        "-o",
        "ControlPersist=30",
    ];
    // One after another over one multiplexed connection, as Ansible does.
    for round in 0..4 {
        let run = bastion
            .exec(
                &container.bench,
                &key,
                &master,
                &format!("echo round-{round}"),
                b"",
            )
            .await;
        assert_eq!(run.stdout_text(), format!("round-{round}\n"), "{run:?}");
        assert!(!run.stderr.contains("refused"), "{run:?}");
    }
    let _ = tokio::process::Command::new("ssh")
        .args(["-o", control.as_str(), "-O", "exit", "x"])
        .output()
        .await;
    let events = bastion.audit();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "auth.accepted")
            .count(),
        1,
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn terminal_sessions_are_recorded_as_asciicast() {
    let (bastion, container, key) = bench_and_bastion(&[], &["-V", VALID], |dir, config| {
        config.session.record_dir = benchgate::config::Optional(Some(dir.join("casts")));
    })
    .await;
    let run = bastion
        .exec(
            &container.bench,
            &key,
            &["-tt"],
            "echo recorded-$((6*7))",
            b"",
        )
        .await;
    assert!(run.stdout_text().contains("recorded-42"), "{run:?}");
    // Commands without a terminal are not recorded.
    bastion
        .exec(&container.bench, &key, &[], "echo plain", b"")
        .await;
    let casts: Vec<_> = std::fs::read_dir(bastion.path("casts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(casts.len(), 1, "{casts:?}");
    let text = std::fs::read_to_string(&casts[0]).unwrap();
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    let header = lines.next().unwrap();
    assert_eq!(header["version"], 2);
    assert!(
        header["width"].as_u64().unwrap() > 0 && header["height"].as_u64().unwrap() > 0,
        "{header}"
    );
    let output: String = lines
        .filter(|e| e[1] == "o")
        .map(|e| e[2].as_str().unwrap().to_owned())
        .collect();
    assert!(output.contains("recorded-42"), "{output:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_events_carry_the_spec_fields() {
    let (bastion, container, key) = setup(&[], &[]).await;
    bastion
        .exec(&container.bench, &key, &[], "echo audited", b"")
        .await;
    bastion
        .exec(&container.bench, &key, &["-W", "127.0.0.1:9"], "", b"")
        .await;
    let stranger = bastion.user_with_cert("stranger", "ca", &["-n", "elsewhere", "-V", VALID]);
    bastion
        .rejection_reasons(&container.bench, &stranger, &[])
        .await;
    let events = bastion.audit_after_closed(3).await;
    let find = |kind: &str| {
        events
            .iter()
            .find(|e| e["event"] == kind)
            .unwrap_or_else(|| panic!("no {kind}: {events:#?}"))
    };
    let has = |event: &serde_json::Value, fields: &[&str]| {
        for field in fields {
            assert!(!event[field].is_null(), "{field} missing in {event}");
        }
    };
    let identity = ["ts", "event", "peer", "bench", "key_id", "serial", "ca"];
    has(find("auth.accepted"), &identity);
    has(
        find("auth.rejected"),
        &["ts", "peer", "bench", "key_id", "serial", "ca", "reason"],
    );
    has(
        find("request.refused"),
        &[&identity[..], &["request"]].concat(),
    );
    has(
        find("session.start"),
        &[&identity[..], &["container", "command"]].concat(),
    );
    let end = find("session.end");
    has(
        end,
        &[
            &identity[..],
            &[
                "container",
                "command",
                "exit_status",
                "duration_ms",
                "bytes_in",
                "bytes_out",
            ],
        ]
        .concat(),
    );
    assert_eq!(end["bytes_out"], "audited\n".len());
    has(
        find("connection.closed"),
        &["ts", "peer", "reason", "duration_ms"],
    );
    assert!(events
        .iter()
        .all(|e| e["ts"].as_str().unwrap().ends_with('Z')));
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_are_ended_and_the_person_is_told() {
    let (bastion, bench, key) = setup(&[], &[]).await;
    let run = bastion
        .exec(
            &bench.bench,
            &key,
            &[],
            "sleep 555 & (trap \"\" HUP; exec sleep 556) & echo started",
            b"",
        )
        .await;
    assert_eq!(run.stdout_text(), "started\n");
    assert_eq!(run.code, Some(0));
    assert!(
        // Named as they are when the wrapper looks (a job not yet exec'd is still its shell).
        run.stderr
            .contains("benchgate: ended 2 background processes left by this session ("),
        "{run:?}"
    );
    bench.wait_gone("sleep 55").await;
    let events = bastion.audit_after_closed(1).await;
    let end = events.iter().find(|e| e["event"] == "session.end").unwrap();
    assert_eq!(end["leftovers"], 2, "{end}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hangup_keeps_nohup_jobs_and_ends_plain_ones() {
    let (bastion, bench, key) = bench_and_bastion(&[], &["-V", VALID], |_, config| {
        config.session.leftovers = benchgate::config::Leftovers::Hangup;
    })
    .await;
    // What nohup does (the test image's busybox has no nohup): SIGHUP ignored, then exec.
    let run = bastion
        .exec(
            &bench.bench,
            &key,
            &[],
            "(trap \"\" HUP; exec sleep 561) & sleep 562 & echo started",
            b"",
        )
        .await;
    assert_eq!(run.stdout_text(), "started\n");
    assert!(
        run.stderr
            .contains("benchgate: sent a hangup to 2 background processes left by this session ("),
        "{run:?}"
    );
    bench.wait_gone("sleep 562").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        bench.processes().iter().any(|p| p.contains("sleep 561")),
        "the nohup job did not survive: {:?}",
        bench.processes()
    );
}
