//! The admin socket and `benchgate sessions`, with the real OpenSSH client into real
//! containers: list, end, watch, who may ask, and bad requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{bench_and_bastion, run, Bastion};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

/// A client kept running in the background, its output collected as it comes.
struct Client {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Client {
    fn spawn(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("cannot run the client");
        let collect = |mut from: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let into = Arc::new(Mutex::new(Vec::new()));
            let sink = into.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = from.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            into
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// `ssh` as `user` with `key` and `extra` options, running `command` (a shell when empty).
    fn ssh(bastion: &Bastion, user: &str, key: &Path, extra: &[&str], command: &str) -> Self {
        let mut cmd = Command::new("ssh");
        cmd.args(bastion.client_options(key))
            .args(["-p", &bastion.addr.port().to_string()])
            .args(extra)
            .arg(format!("{user}@127.0.0.1"));
        if !command.is_empty() {
            cmd.arg(command);
        }
        Self::spawn(cmd)
    }

    /// `benchgate sessions watch id` against `bastion`.
    fn watch(bastion: &Bastion, id: &str) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_benchgate"));
        cmd.arg("sessions")
            .arg("--config")
            .arg(bastion.path("benchgate.toml"))
            .args(["watch", id]);
        Self::spawn(cmd)
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits (bounded, 10 s) until `what` shows in stdout (`out`) or stderr.
    async fn wait_for(&self, out: bool, what: &str) {
        for _ in 0..100 {
            let text = if out { self.stdout() } else { self.stderr() };
            if text.contains(what) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{what:?} never came; stdout: {:?} stderr: {:?}",
            self.stdout(),
            self.stderr()
        );
    }

    /// Waits (bounded, 15 s) for the client to exit; its exit code.
    async fn exit(&mut self) -> Option<i32> {
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("the client did not exit within 15 s")
            .unwrap()
            .code()
    }
}

fn id_of<'a>(sessions: &'a [serde_json::Value], field: &str, value: &str) -> &'a str {
    sessions
        .iter()
        .find(|s| s[field] == value)
        .and_then(|s| s["id"].as_str())
        .unwrap_or_else(|| panic!("no session with {field} = {value}: {sessions:?}"))
}

#[tokio::test]
async fn live_sessions_are_listed_with_their_fields_and_ended_ones_are_not() {
    let (bastion, container, key) = bench_and_bastion(&[], &[], |_, _| {}).await;
    let bench = container.bench.as_str();
    // A third session, over before the listing.
    let done = bastion.exec(bench, &key, &[], "true", b"").await;
    assert_eq!(done.code, Some(0), "{done:?}");
    let exec = Client::ssh(&bastion, bench, &key, &[], "sleep 600");
    let shell = Client::ssh(&bastion, bench, &key, &["-tt"], "");
    let sessions = bastion.wait_for_sessions(2).await;

    let container_id = run("docker", &["inspect", "-f", "{{.Id}}", &container.name]);
    let container_id = String::from_utf8_lossy(&container_id.stdout)
        .trim()
        .to_owned();
    for session in &sessions {
        assert_eq!(session["bench"], bench, "{session}");
        assert_eq!(session["container"], container_id.as_str(), "{session}");
        assert_eq!(session["key_id"], "key-id-of-test", "{session}");
        assert_eq!(session["serial"], 77, "{session}");
        assert!(
            session["ca"].as_str().unwrap().starts_with("SHA256:"),
            "{session}"
        );
        assert!(
            session["endpoint"].as_str().unwrap().starts_with("unix://"),
            "{session}"
        );
        assert!(
            session["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{session}"
        );
        assert_eq!(session["id"].as_str().unwrap().len(), 12, "{session}");
        for time in ["started", "valid_before"] {
            humantime::parse_rfc3339(session[time].as_str().unwrap()).expect(time);
        }
        assert!(session["idle_seconds"].as_u64().is_some(), "{session}");
    }
    let exec_id = id_of(&sessions, "kind", "exec");
    let shell_id = id_of(&sessions, "kind", "shell");
    let by_id = |id: &str| sessions.iter().find(|s| s["id"] == id).unwrap().clone();
    assert_eq!(by_id(exec_id)["command"], "sleep 600");
    assert!(by_id(exec_id)["tty"].is_null());
    assert!(by_id(shell_id)["command"].is_null());
    assert!(by_id(shell_id)["tty"].is_array());

    let table = bastion.sessions(&[]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    let text = table.stdout_text();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.starts_with("ID "), "{text}");
    for id in [exec_id, shell_id] {
        assert!(text.contains(id), "{text}");
    }
    let filtered = bastion.sessions(&["--json", "--bench", "other"]).await;
    assert_eq!(filtered.stdout_text().trim(), "[]");
    let none = bastion.sessions(&["--serial", "1"]).await;
    assert_eq!(none.code, Some(0));
    assert_eq!(none.stdout_text(), "no live session matches --serial 1\n");
    drop((exec, shell));
    bastion.wait_for_sessions(0).await;
}

#[tokio::test]
async fn ending_by_key_id_ends_only_that_certificates_sessions() {
    let (bastion, container, _) = bench_and_bastion(&[], &[], |_, _| {}).await;
    let bench = container.bench.as_str();
    let alice = bastion.user_with_cert("alice", "ca", &["-n", bench, "-I", "alice"]);
    let bob = bastion.user_with_cert("bob", "ca", &["-n", bench, "-I", "bob"]);
    let mut alices = Client::ssh(&bastion, bench, &alice, &[], "sleep 1234");
    let _bobs = Client::ssh(&bastion, bench, &bob, &[], "sleep 1235");
    let sessions = bastion.wait_for_sessions(2).await;
    let alice_id = id_of(&sessions, "key_id", "alice").to_owned();
    let bob_id = id_of(&sessions, "key_id", "bob").to_owned();

    let ended = bastion
        .sessions(&["end", "--key-id", "alice", "--reason", "maintenance window"])
        .await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    let text = ended.stdout_text();
    assert!(
        text.starts_with(&format!("ended: {alice_id} (bench {bench}, key id alice")),
        "{text}"
    );
    assert!(!text.contains(&bob_id), "{text}");

    assert_eq!(alices.exit().await, Some(255));
    assert!(
        alices
            .stderr()
            .contains("benchgate: your session was ended by an operator: maintenance window"),
        "{}",
        alices.stderr()
    );
    container.wait_gone("sleep 1234").await;
    assert!(container
        .processes()
        .iter()
        .any(|p| p.contains("sleep 1235")));
    let left = bastion.wait_for_sessions(1).await;
    assert_eq!(left[0]["id"], bob_id.as_str());

    let events = bastion.audit();
    let by_operator: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "session.ended_by_operator")
        .collect();
    assert_eq!(by_operator.len(), 1, "{events:?}");
    assert_eq!(by_operator[0]["uid"], 0);
    assert_eq!(by_operator[0]["session"], alice_id.as_str());
    assert_eq!(by_operator[0]["key_id"], "alice");
    assert_eq!(by_operator[0]["reason"], "maintenance window");
    assert!(events.iter().any(|e| e["event"] == "session.end"
        && e["session"] == alice_id.as_str()
        && e["reason"] == "operator"));
    assert!(events
        .iter()
        .any(|e| e["event"] == "admin.request" && e["request"] == "end" && e["uid"] == 0));

    // Nothing matched: exit 1 (2 for a request that names nothing) and a reason, nothing else
    // ended.
    for (args, code, says) in [
        (
            &["end", "--key-id", "alice"][..],
            1,
            "no live session matches --key-id alice",
        ),
        (&["end"][..], 2, "say which sessions to end"),
        (
            &["end", "0123456789ab"][..],
            1,
            "no live session has id 0123456789ab",
        ),
        (
            &["end", &bob_id, "--bench", "other"][..],
            1,
            "no live session matches",
        ),
        (
            &["--bench", "other", "end", &bob_id][..],
            1,
            "no live session matches",
        ),
        (
            &["watch", &bob_id, "--key-id", "bob"][..],
            2,
            "takes a session id only",
        ),
    ] {
        let run = bastion.sessions(args).await;
        assert_eq!(run.code, Some(code), "{args:?}: {run:?}");
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
    }
    assert_eq!(bastion.wait_for_sessions(1).await[0]["id"], bob_id.as_str());
}

/// Serials are unique per CA only: a serial that two CAs' certificates carry ends nothing
/// until the CA is named too.
#[tokio::test]
async fn a_serial_alone_does_not_choose_between_cas() {
    use benchgate::config::NonEmpty;
    let (bastion, container, _) = bench_and_bastion(&[], &[], |dir, config| {
        support::keygen(dir, "ca2", "ed25519");
        config.auth.trusted_user_ca_keys = NonEmpty(vec![dir.join("ca.pub"), dir.join("ca2.pub")]);
    })
    .await;
    let bench = container.bench.as_str();
    let alice = bastion.user_with_cert("alice", "ca", &["-n", bench, "-I", "alice", "-z", "5"]);
    let bob = bastion.user_with_cert("bob", "ca2", &["-n", bench, "-I", "bob", "-z", "5"]);
    let mut alices = Client::ssh(&bastion, bench, &alice, &[], "sleep 1236");
    let _bobs = Client::ssh(&bastion, bench, &bob, &[], "sleep 1237");
    let sessions = bastion.wait_for_sessions(2).await;
    let ambiguous = bastion.sessions(&["end", "--serial", "5"]).await;
    assert_eq!(ambiguous.code, Some(2), "{ambiguous:?}");
    assert!(
        ambiguous
            .stderr
            .contains("serial 5 names certificates of 2 CAs"),
        "{}",
        ambiguous.stderr
    );
    let alice_ca = sessions.iter().find(|s| s["key_id"] == "alice").unwrap()["ca"]
        .as_str()
        .unwrap()
        .to_owned();
    // Selectors may come before the subcommand too.
    let ended = bastion
        .sessions(&["--serial", "5", "--ca", &alice_ca, "end"])
        .await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    assert_eq!(alices.exit().await, Some(255));
    assert_eq!(bastion.wait_for_sessions(1).await[0]["key_id"], "bob");
}

#[tokio::test]
async fn a_terminal_session_is_watched_live_and_its_person_told_once() {
    let (bastion, container, key) = bench_and_bastion(&[], &[], |_, _| {}).await;
    let bench = container.bench.as_str();
    // A clipboard write and a cursor position request first: the customer chooses the output.
    let ticking = r"printf '\033]52;c;cm0gLXJm\007\033[6n'; i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done";
    let mut watched = Client::ssh(&bastion, bench, &key, &["-tt"], ticking);
    let plain = Client::ssh(&bastion, bench, &key, &[], "sleep 600");
    bastion.wait_for_sessions(2).await;
    watched.wait_for(true, "tick 3").await;
    let sessions = bastion.wait_for_sessions(2).await;
    let with_tty = |tty: bool| {
        sessions
            .iter()
            .find(|s| s["tty"].is_array() == tty)
            .unwrap()
            .clone()
    };
    let id = with_tty(true)["id"].as_str().unwrap().to_owned();
    assert!(with_tty(true)["bytes_out"].as_u64().unwrap() > 0);

    let first = Client::watch(&bastion, &id);
    // The screen so far comes first, then what the session writes from now on.
    first.wait_for(true, "tick 0").await;
    let last_tick = |text: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("tick ")?.parse::<u32>().ok())
            .max()
            .unwrap_or(0)
    };
    let seen = last_tick(&first.stdout());
    first.wait_for(true, &format!("tick {}", seen + 5)).await;
    first
        .wait_for(false, &format!("watching session {id} (bench {bench}"))
        .await;
    // The watched person's terminal got them; the watcher's gets neither.
    assert!(
        watched.stdout().contains("\x1b]52;c;"),
        "{:?}",
        watched.stdout()
    );
    assert!(!first.stdout().contains("\x1b]"), "{:?}", first.stdout());
    assert!(!first.stdout().contains("\x1b[6n"), "{:?}", first.stdout());
    watched
        .wait_for(false, "support staff are now watching")
        .await;

    let second = Client::watch(&bastion, &id);
    second.wait_for(true, "tick").await;
    let now = last_tick(&second.stdout());
    second.wait_for(true, &format!("tick {}", now + 3)).await;
    assert_eq!(
        watched
            .stderr()
            .matches("support staff are now watching")
            .count(),
        1,
        "told once: {}",
        watched.stderr()
    );

    // Ctrl-C stops a watcher; the session and the other watcher go on.
    let mut third = Client::watch(&bastion, &id);
    third.wait_for(true, "tick").await;
    run("kill", &["-INT", &third.child.id().unwrap().to_string()]);
    assert_eq!(third.exit().await, Some(0), "{}", third.stderr());
    assert!(
        third.stderr().contains("stopped watching"),
        "{}",
        third.stderr()
    );
    let now = last_tick(&second.stdout());
    second.wait_for(true, &format!("tick {}", now + 2)).await;

    // Without a terminal there is nothing to watch.
    let plain_id = with_tty(false)["id"].as_str().unwrap().to_owned();
    let refused = bastion.sessions(&["watch", &plain_id]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("has no terminal"),
        "{}",
        refused.stderr
    );
    drop(plain);

    // The session ends: both watchers are told and exit.
    let ended = bastion.sessions(&["end", &id, "--reason", "done"]).await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    assert_eq!(watched.exit().await, Some(255));
    for mut watcher in [first, second] {
        assert_eq!(watcher.exit().await, Some(0), "{}", watcher.stderr());
        assert!(
            watcher.stderr().contains("the session ended (operator)"),
            "{}",
            watcher.stderr()
        );
    }
    let events = bastion.audit();
    let watches = events
        .iter()
        .filter(|e| e["event"] == "admin.request" && e["request"] == "watch")
        .filter(|e| e["session"] == id.as_str() && e["reason"] == "ok")
        .count();
    assert_eq!(watches, 3, "{events:?}");
}

/// `nobody` cannot reach the socket through its mode, and when the mode is opened up by
/// mistake, `SO_PEERCRED` still refuses it (audited with its uid).
#[tokio::test]
async fn a_uid_that_is_not_an_admin_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let bastion = Bastion::start(|_, _| {}).await;
    let open = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(bastion.dir.path(), 0o755);
    open(&bastion.path("benchgate.toml"), 0o644);
    let as_nobody = || async {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_benchgate"))
            .args(["sessions", "--config"])
            .arg(bastion.path("benchgate.toml"));
        support::run_client(cmd, b"").await
    };
    let denied = as_nobody().await;
    assert_eq!(denied.code, Some(2), "{denied:?}");
    assert!(
        denied.stderr.contains("Permission denied"),
        "{}",
        denied.stderr
    );

    open(&bastion.path("admin.sock"), 0o666);
    let refused = as_nobody().await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(
        refused.stderr.contains(
            "uid 65534 may not use the admin socket (allowed: root and the daemon's user)"
        ),
        "{}",
        refused.stderr
    );
    assert!(bastion
        .audit()
        .iter()
        .any(|e| e["event"] == "admin.request" && e["uid"] == 65534));
    // Root still may.
    assert_eq!(bastion.sessions(&[]).await.code, Some(0));
}

/// With `[admin] group`, the socket is 0660 and that group's members may use it.
#[tokio::test]
async fn a_member_of_the_admin_group_may_use_the_socket() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let bastion = Bastion::start(|_, config| config.admin.group = "nogroup".into()).await;
    let meta = std::fs::metadata(bastion.path("admin.sock")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    for (path, mode) in [
        (bastion.dir.path(), 0o755),
        (&*bastion.path("benchgate.toml"), 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_benchgate"))
        .args(["sessions", "--config"])
        .arg(bastion.path("benchgate.toml"));
    let listed = support::run_client(cmd, b"").await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    assert_eq!(listed.stdout_text(), "no live sessions\n");
    // Listing, ending and watching, yes; taking the bastion's listeners, no.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "socat",
        "-",
    ])
    .arg(format!(
        "UNIX-CONNECT:{}",
        bastion.path("admin.sock").display()
    ));
    let asked = support::run_client(cmd, b"{\"op\":\"takeover\",\"listen\":[]}\n").await;
    assert!(
        asked
            .stdout_text()
            .contains("uid 65534 may not take over the listeners"),
        "{asked:?}"
    );
}

/// Reads reply lines from a raw admin connection.
async fn replies(stream: UnixStream, count: usize) -> Vec<serde_json::Value> {
    let mut lines = BufReader::new(stream).lines();
    let mut replies = Vec::new();
    for _ in 0..count {
        let line = tokio::time::timeout(Duration::from_secs(40), lines.next_line())
            .await
            .expect("no reply within 40 s")
            .unwrap()
            .expect("the daemon closed the connection");
        replies.push(serde_json::from_str(&line).expect("a JSON reply"));
    }
    replies
}

#[tokio::test]
async fn malformed_huge_and_half_sent_requests_get_errors_and_change_nothing() {
    let (bastion, container, key) = bench_and_bastion(&[], &[], |_, _| {}).await;
    let bench = container.bench.as_str();
    let _session = Client::ssh(&bastion, bench, &key, &[], "sleep 777");
    bastion.wait_for_sessions(1).await;
    let socket = bastion.path("admin.sock");
    let connect = || UnixStream::connect(&socket);

    // Pipelined: a bad line is answered and the next request still is.
    let mut stream = connect().await.unwrap();
    stream
        .write_all(
            b"not json\n{\"op\":\"reboot\"}\n{\"op\":\"end\",\"select\":{}}\n{\"op\":\"sessions\"}\n",
        )
        .await
        .unwrap();
    let answers = replies(stream, 4).await;
    assert_eq!(answers[0]["ok"], false);
    assert!(answers[0]["error"]
        .as_str()
        .unwrap()
        .starts_with("not a request"));
    assert!(answers[1]["error"]
        .as_str()
        .unwrap()
        .contains("unknown variant"));
    assert!(answers[2]["error"]
        .as_str()
        .unwrap()
        .contains("say which sessions"));
    assert_eq!(answers[3]["ok"], true);
    assert_eq!(answers[3]["sessions"].as_array().unwrap().len(), 1);

    // Huge: refused once it passes the limit.
    let mut stream = connect().await.unwrap();
    let huge = format!("{{\"op\":\"end\",\"reason\":\"{}\"", "x".repeat(200_000));
    let (reader, mut writer) = stream.split();
    let (_, answer) = tokio::join!(writer.write_all(huge.as_bytes()), async {
        let mut line = String::new();
        BufReader::new(reader).read_line(&mut line).await.unwrap();
        line
    });
    assert!(answer.contains("longer than 64 KiB"), "{answer}");

    // Half-sent: the peer stops writing before the newline.
    let mut stream = connect().await.unwrap();
    stream
        .write_all(format!("{{\"op\":\"end\",\"select\":{{\"bench\":\"{bench}\"}}").as_bytes())
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let answer = replies(stream, 1).await;
    assert!(
        answer[0]["error"]
            .as_str()
            .unwrap()
            .contains("ended before its newline"),
        "{answer:?}"
    );

    // A peer that never reads its answers holds only its own connection.
    let mut stuck = connect().await.unwrap();
    let flood = tokio::spawn(async move {
        let request = b"{\"op\":\"sessions\"}\n".repeat(50_000);
        let _ = stuck.write_all(&request).await;
        stuck
    });
    let listed = bastion.sessions(&["--json"]).await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    flood.abort();

    // Nothing was ended by any of it.
    assert_eq!(
        bastion.wait_for_sessions(1).await[0]["command"],
        "sleep 777"
    );
    assert!(container
        .processes()
        .iter()
        .any(|p| p.contains("sleep 777")));
    assert!(!bastion
        .audit()
        .iter()
        .any(|e| e["event"] == "session.ended_by_operator"));
}

/// A config `name` in `dir` for `benchgate serve` with its admin socket at `socket`.
fn config_with_socket(dir: &Path, name: &str, socket: &Path) -> std::path::PathBuf {
    if !dir.join("ca").exists() {
        support::keygen(dir, "ca", "ed25519");
    }
    let path = dir.join(name);
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nhost_keys = [\"{0}/host_key\"]\n\
         [auth]\ntrusted_user_ca_keys = [\"{0}/ca.pub\"]\n[metrics]\nlisten = \"\"\n\
         [admin]\nsocket = \"{1}\"\n",
        dir.display(),
        socket.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn an_unsafe_socket_path_refuses_start_and_a_stale_socket_is_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let serve = |config: &Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_benchgate"));
        cmd.arg("serve").arg("--config").arg(config);
        cmd
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let config = config_with_socket(dir.path(), "benchgate.toml", &socket);

    std::fs::write(&socket, "not a socket").unwrap();
    let out = support::run_client(serve(&config), b"").await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("exists and is not a socket"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
    std::fs::remove_file(&socket).unwrap();

    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let config_shared = config_with_socket(dir.path(), "shared.toml", &shared.join("admin.sock"));
    let out = support::run_client(serve(&config_shared), b"").await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("is writable by others (mode 0777)"),
        "{}",
        out.stderr
    );

    // A socket left by a daemon that died is replaced; a live one is not.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut daemon = Client::spawn(serve(&config));
    for _ in 0..100 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::os::unix::net::UnixStream::connect(&socket).expect("the daemon serves the socket");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = support::run_client(serve(&config), b"").await;
    assert_eq!(second.code, Some(1), "{second:?}");
    assert!(
        second.stderr.contains("another process"),
        "{}",
        second.stderr
    );
    run("kill", &["-TERM", &daemon.child.id().unwrap().to_string()]);
    assert_eq!(daemon.exit().await, Some(0), "{}", daemon.stderr());
    assert!(
        !socket.exists(),
        "the daemon removes its socket when it stops"
    );
}

/// A watcher that stops reading (its terminal paused: the CLI stopped with SIGSTOP) never
/// slows the watched session: about 11 MB of terminal output still reaches the person in full.
#[tokio::test]
async fn a_paused_watcher_does_not_slow_the_session() {
    let (bastion, container, key) = bench_and_bastion(&[], &[], |_, _| {}).await;
    let bench = container.bench.as_str();
    let command = "sleep 2; seq 1 1500000; echo end-of-output";
    let mut watched = Client::ssh(&bastion, bench, &key, &["-tt"], command);
    let id = bastion.wait_for_sessions(1).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut watcher = Client::watch(&bastion, &id);
    watcher.wait_for(false, "watching session").await;
    let pid = watcher.child.id().unwrap().to_string();
    run("kill", &["-STOP", &pid]);
    for _ in 0..600 {
        if watched.stdout().contains("end-of-output") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(watched.exit().await, Some(0), "{}", watched.stderr());
    let out = watched.stdout();
    assert!(out.contains("\n1500000\r\n") && out.contains("end-of-output"));
    run("kill", &["-CONT", &pid]);
    // The daemon let go of it (it stopped reading) or told it the session ended.
    let code = watcher.exit().await;
    assert!(
        matches!(code, Some(0 | 2)),
        "{code:?}: {}",
        watcher.stderr()
    );
}
