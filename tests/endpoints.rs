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
