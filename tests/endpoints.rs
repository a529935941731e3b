//! Several Docker endpoints: one down, one over plain TCP, one over TLS (socat proxies to the
//! real engine), and an engine that stalls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::Path;
use std::time::Duration;

use benchgate::config::{Endpoint, NonEmpty, Optional, Span};
use support::{bench_and_bastion, run, Bastion, Container};

fn engine_socket() -> String {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => host.trim_start_matches("unix://").to_owned(),
        _ => "/var/run/docker.sock".to_owned(),
    }
}

/// A proxy from a local port to the engine's socket (socat for TCP, stunnel for mutual TLS:
/// socat cannot resume TLS sessions with client certificates), stopped when dropped.
struct Proxy {
    child: std::process::Child,
    port: u16,
}

impl Proxy {
    async fn tcp() -> Self {
        let port = free_port();
        let child = std::process::Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(format!("UNIX-CONNECT:{}", engine_socket()))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("socat is required: bash scripts/setup.sh installs it");
        Self::ready(child, port).await
    }

    /// Mutual TLS with the certificates [`tls_files`] made in `dir`.
    async fn tls(dir: &Path) -> Self {
        let port = free_port();
        let config = dir.join("stunnel.conf");
        let f = |name: &str| dir.join(name).display().to_string();
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\n[docker]\naccept = 127.0.0.1:{port}\nconnect = {}\n\
                 cert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                engine_socket(),
                f("server.pem"),
                f("server.key"),
                f("ca.pem")
            ),
        )
        .unwrap();
        let child = std::process::Command::new("stunnel")
            .arg(&config)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("stunnel is required: bash scripts/setup.sh installs it");
        Self::ready(child, port).await
    }

    async fn ready(child: std::process::Child, port: u16) -> Self {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self { child, port };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the proxy never listened on {port}");
    }

    /// Sends `signal` to the proxy and every connection process it forked.
    fn signal(&self, signal: &str) {
        let parent = self.child.id().to_string();
        let _ = std::process::Command::new("pkill")
            .args([signal, "-P", &parent])
            .status();
        let _ = std::process::Command::new("kill")
            .args([signal, &parent])
            .status();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

fn endpoint(url: String) -> Endpoint {
    Endpoint {
        url,
        tls_ca: Optional(None),
        tls_cert: Optional(None),
        tls_key: Optional(None),
    }
}

/// A CA, and a server (localhost) and client certificate it signed, as PEM files in `dir`.
fn tls_files(dir: &Path) {
    let d = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    let (ca_key, ca_pem) = (d("ca.key"), d("ca.pem"));
    ca.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-days",
        "1",
        "-subj",
        "/CN=benchgate-test-ca",
    ]);
    run("openssl", &ca);
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let (key, csr, pem, ext) = (
            d(&format!("{name}.key")),
            d(&format!("{name}.csr")),
            d(&format!("{name}.pem")),
            d(&format!("{name}.ext")),
        );
        std::fs::write(
            &ext,
            format!("subjectAltName=DNS:localhost\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
        run("openssl", &req);
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &ext,
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_endpoint_does_not_stop_the_others() {
    let proxy = Proxy::tcp().await;
    let (bastion, container, key) = bench_and_bastion(&[], &["-V", "-5m:+1h"], |dir, config| {
        let dead = format!("unix://{}", dir.join("no-such-docker.sock").display());
        let tcp = format!("tcp://127.0.0.1:{}", proxy.port);
        config.docker.endpoints = NonEmpty(vec![endpoint(dead), endpoint(tcp)]);
    })
    .await;
    let run = bastion
        .exec(&container.bench, &key, &[], "echo via-tcp", b"")
        .await;
    assert_eq!(run.stdout_text(), "via-tcp\n", "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_endpoint_serves_sessions() {
    let container = Container::start(&[]);
    let certs = tempfile::tempdir().unwrap();
    tls_files(certs.path());
    let c = |name: &str| certs.path().join(name);
    let proxy = Proxy::tls(certs.path()).await;
    let bastion = Bastion::start(|_, config| {
        config.docker.endpoints = NonEmpty(vec![Endpoint {
            url: format!("tcp://localhost:{}", proxy.port),
            tls_ca: Optional(Some(c("ca.pem"))),
            tls_cert: Optional(Some(c("client.pem"))),
            tls_key: Optional(Some(c("client.key"))),
        }]);
    })
    .await;
    let key = bastion.user_with_cert("user", "ca", &["-n", &container.bench, "-V", "-5m:+1h"]);
    bastion.wait_for_bench(&container.bench).await;
    let run = bastion
        .exec(&container.bench, &key, &["-tt"], "echo via-tls", b"")
        .await;
    assert_eq!(run.stdout_text(), "via-tls\r\n", "{run:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_engine_gives_a_clear_error_within_the_request_timeout() {
    let proxy = Proxy::tcp().await;
    let (bastion, container, key) = bench_and_bastion(&[], &["-V", "-5m:+1h"], |_, config| {
        config.docker.request_timeout = Span(Duration::from_secs(2));
        config.docker.endpoints =
            NonEmpty(vec![endpoint(format!("tcp://127.0.0.1:{}", proxy.port))]);
    })
    .await;
    proxy.signal("-STOP");
    let started = std::time::Instant::now();
    let run = bastion
        .exec(&container.bench, &key, &[], "echo never", b"")
        .await;
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("is unavailable"), "{run:?}");
    // Bounded by request_timeout (2 s per Docker call), with room for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    proxy.signal("-CONT");
    // Once the engine answers again, sessions work again.
    let mut last = String::new();
    for _ in 0..50 {
        let run = bastion
            .exec(&container.bench, &key, &[], "echo back", b"")
            .await;
        if run.stdout_text() == "back\n" {
            return;
        }
        last = run.stderr;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("sessions never worked again: {last}");
}

/// Rewrites the daemon's config as `original` with `endpoints` and sends SIGHUP; waits for the
/// reload's log line (`reloaded` or `reload failed`, the `count`th of them).
async fn reload_with(
    bastion: &Bastion,
    original: &benchgate::config::Config,
    endpoints: Vec<Endpoint>,
    count: usize,
) -> String {
    let mut config = original.clone();
    config.docker.endpoints = NonEmpty(endpoints);
    std::fs::write(bastion.path("benchgate.toml"), config.to_toml()).unwrap();
    bastion.signal("-HUP");
    for _ in 0..100 {
        let log = bastion.log();
        let reloads: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("reloaded:") || l.contains("reload failed"))
            .collect();
        if reloads.len() >= count {
            return reloads[count - 1].to_owned();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no reload line: {}", bastion.log());
}

/// SIGHUP adds and removes engines: a session running through a removed engine runs on, new
/// sessions to its benches are refused as for any unknown bench, and adding it back restores
/// them; a config without engines is refused as a whole.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_removes_and_adds_engines_and_live_sessions_run_on() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let container = Container::start(&[]);
    let proxy = Proxy::tcp().await;
    let through_proxy = format!("tcp://127.0.0.1:{}", proxy.port);
    let dead = format!("tcp://127.0.0.1:{}", free_port());
    let bastion = Bastion::spawn(|_, config| {
        config.docker.endpoints = NonEmpty(vec![endpoint(through_proxy.clone())]);
    })
    .await;
    let original = benchgate::config::Config::load(&bastion.path("benchgate.toml")).unwrap();
    let bench = container.bench.as_str();
    let key = bastion.user_with_cert("user", "ca", &["-n", bench]);
    let ok = bastion.exec(bench, &key, &[], "echo ok", b"").await;
    assert_eq!(ok.stdout_text(), "ok\n", "{ok:?}");

    // A live session through the engine about to be removed.
    let mut live = tokio::process::Command::new("ssh")
        .args(bastion.client_options(&key))
        .args(["-p", &bastion.addr.port().to_string()])
        .arg(format!("{bench}@127.0.0.1"))
        .arg("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut to_cat = live.stdin.take().unwrap();
    let mut from_cat = tokio::io::BufReader::new(live.stdout.take().unwrap()).lines();
    let mut echo = async |line: &str| {
        to_cat
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), from_cat.next_line())
            .await
            .expect("cat answered within 10 s")
            .unwrap()
    };
    assert_eq!(echo("before").await.as_deref(), Some("before"));

    let line = reload_with(&bastion, &original, vec![endpoint(dead.clone())], 1).await;
    assert!(
        line.contains(&format!("added {dead}; removed {through_proxy}; kept none")),
        "{line}"
    );
    // check-config compares a file with the running daemon's engines.
    let mut proposed = original.clone();
    proposed.docker.endpoints = NonEmpty(vec![endpoint(through_proxy.clone())]);
    std::fs::write(bastion.path("proposed.toml"), proposed.to_toml()).unwrap();
    let checked = run(
        env!("CARGO_BIN_EXE_benchgate"),
        &[
            "check-config",
            "--config",
            bastion.path("proposed.toml").to_str().unwrap(),
        ],
    );
    let checked = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.contains(&format!(
            "SIGHUP would add Docker endpoints {through_proxy}; remove {dead}; keep none"
        )),
        "{checked}"
    );
    let refused = bastion.exec(bench, &key, &[], "echo no", b"").await;
    assert!(
        refused
            .stderr
            .contains("is not running (status: no such bench)"),
        "{refused:?}"
    );
    assert_eq!(
        echo("after removal").await.as_deref(),
        Some("after removal")
    );

    // No engines at all: refused, nothing changes.
    let line = reload_with(&bastion, &original, Vec::new(), 2).await;
    assert!(line.contains("reload failed"), "{line}");

    let line = reload_with(
        &bastion,
        &original,
        vec![endpoint(dead.clone()), endpoint(through_proxy.clone())],
        3,
    )
    .await;
    assert!(
        line.contains(&format!("added {through_proxy}; removed none; kept {dead}")),
        "{line}"
    );
    let mut back = bastion.exec(bench, &key, &[], "echo back", b"").await;
    for _ in 0..50 {
        if back.code == Some(0) {
            break;
        }
        // The added engine is listed in the background.
        tokio::time::sleep(Duration::from_millis(100)).await;
        back = bastion.exec(bench, &key, &[], "echo back", b"").await;
    }
    assert_eq!(back.stdout_text(), "back\n", "{back:?}");
    assert_eq!(echo("still here").await.as_deref(), Some("still here"));
    drop(to_cat);
    let _ = live.wait().await;
}
