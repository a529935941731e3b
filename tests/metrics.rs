//! Metrics over HTTP: a session's life and each rejection move their own series, scraped from
//! `/metrics` and parsed as Prometheus text; `/health` answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;

use support::{bench_and_bastion, BENCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The process-wide recorder, served on a local port by a thread of its own (so it outlives
/// any one test's runtime); installed once per test binary.
fn endpoint() -> SocketAddr {
    static ADDR: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = benchgate::metrics::install().unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                benchgate::metrics::serve(
                    listener,
                    handle,
                    std::sync::Arc::new(|| None),
                    tokio_util::sync::CancellationToken::new(),
                )
                .await;
            });
        });
        addr
    })
}

async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// Every sample line, `name{labels}` -> value.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l}"));
            (
                series.to_owned(),
                value.parse().unwrap_or_else(|_| panic!("bad value: {l}")),
            )
        })
        .collect()
}

async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    parse(&body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_and_rejections_move_their_metrics() {
    let addr = endpoint();
    let (status, body) = get(addr, "/health").await;
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("HTTP/1.1 200 OK", "ok\n")
    );
    assert_eq!(get(addr, "/other").await.0, "HTTP/1.1 404 Not Found");

    let before = scrape(addr).await;
    // Every reason and outcome is there from the start, at zero or more.
    for series in [
        r#"benchgate_auth_total{result="rejected",reason="principal_mismatch"}"#,
        r#"benchgate_auth_total{result="rejected",reason="revocation_unavailable"}"#,
        r#"benchgate_refused_requests_total{request="subsystem"}"#,
        r#"benchgate_sessions_total{kind="exec",outcome="ok"}"#,
        r#"benchgate_disconnects_total{reason="expired"}"#,
        r#"benchgate_docker_errors_total{op="exec_create"}"#,
        r#"benchgate_config_reloads_total{result="error"}"#,
        r#"benchgate_sessions_total{kind="exec",outcome="ambiguous"}"#,
        r#"benchgate_label_conflicts{kind="ambiguous"}"#,
        r#"benchgate_label_conflicts{kind="group_names_bench"}"#,
        "benchgate_resizes_dropped_total",
        "benchgate_connections_active",
        "benchgate_benches_known",
        "benchgate_recording_failures_total",
        "benchgate_handshake_seconds_count",
        "benchgate_exec_start_seconds_count",
        "benchgate_session_duration_seconds_count",
        "benchgate_cert_remaining_seconds_count",
    ] {
        assert!(before.contains_key(series), "{series} missing");
    }

    let (bastion, container, key) = bench_and_bastion(&[], &["-V", "-5m:+1h"], |_, _| {}).await;
    let run = bastion
        .exec(&container.bench, &key, &[], "echo measured", b"")
        .await;
    assert_eq!(run.stdout_text(), "measured\n");
    let stranger = bastion.user_with_cert("stranger", "ca", &["-n", "elsewhere", "-V", "-5m:+1h"]);
    bastion.rejection_reasons(BENCH, &stranger, &[]).await;
    bastion.audit_after_closed(2).await;

    let after = scrape(addr).await;
    let grew = |series: &str, by: f64| {
        let (b, a) = (
            before.get(series).copied().unwrap_or(0.0),
            after.get(series).copied().unwrap_or(0.0),
        );
        assert!(a - b >= by, "{series}: {b} -> {a}");
    };
    grew(
        r#"benchgate_auth_total{result="accepted",reason="ok"}"#,
        1.0,
    );
    grew(
        r#"benchgate_auth_total{result="rejected",reason="principal_mismatch"}"#,
        1.0,
    );
    grew(
        r#"benchgate_auth_total{result="rejected",reason="not_certificate"}"#,
        1.0,
    );
    grew(
        r#"benchgate_connections_total{outcome="authenticated"}"#,
        1.0,
    );
    grew(
        r#"benchgate_connections_total{outcome="unauthenticated"}"#,
        1.0,
    );
    grew(r#"benchgate_sessions_total{kind="exec",outcome="ok"}"#, 1.0);
    grew(
        r#"benchgate_bytes_total{direction="out"}"#,
        "measured\n".len() as f64,
    );
    grew("benchgate_exec_start_seconds_count", 1.0);
    grew("benchgate_handshake_seconds_count", 1.0);
    assert!(after
        .keys()
        .any(|k| k.starts_with("benchgate_session_duration_seconds_bucket{le=")));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_answers_within_a_second_while_300_idle_connections_are_held() {
    let addr = endpoint();
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Half of them start a request and stop.
        if i % 2 == 0 {
            stream.write_all(b"GET /hea").await.unwrap();
        }
        idle.push(stream);
    }
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(1), get(addr, "/health"))
        .await
        .expect("/health did not answer within a second");
    assert_eq!(answer.0, "HTTP/1.1 200 OK");
    eprintln!(
        "/health answered in {:?} with 300 idle connections",
        started.elapsed()
    );
    // The idle ones are closed before long, giving their places back.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), idle[1].read(&mut buf))
        .await
        .expect("an idle connection was kept open");
    assert_eq!(closed.unwrap(), 0);
}
