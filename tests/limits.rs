//! Pre-authentication limits: the login grace deadline, `max_startups_per_source` and
//! `max_startups`, with silent TCP connections and the real OpenSSH client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use benchgate::config::Span;
use support::{Bastion, BENCH};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// A connection from `source` that never sends anything.
async fn silent(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Everything the server sends until it closes (bounded by 30 s).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut received))
        .await
        .expect("server did not close the connection")
        .ok();
    received
}

/// Reads until the server's version line has arrived.
async fn read_banner(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 256];
    while !received.contains(&b'\n') {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("no banner")
            .unwrap();
        assert!(n > 0, "closed before the banner");
        received.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connection_is_closed_at_login_grace_time() {
    let bastion = Bastion::start(|_, config| {
        config.server.login_grace_time = Span(Duration::from_secs(1));
    })
    .await;
    let mut stream = silent([127, 0, 0, 1], bastion.addr).await;
    assert!(read_banner(&mut stream)
        .await
        .starts_with("SSH-2.0-benchgate"));
    read_to_close(&mut stream).await;
    let events = bastion.audit_after_closed(1).await;
    let closed = events
        .iter()
        .find(|e| e["event"] == "connection.closed")
        .unwrap();
    assert_eq!(closed["reason"], "login_grace_time");
}

#[tokio::test(flavor = "multi_thread")]
async fn per_source_limit_turns_away_only_that_source() {
    let bastion = Bastion::start(|_, config| {
        config.server.max_startups_per_source = NonZeroU32::new(2).unwrap();
        config.server.login_grace_time = Span(Duration::from_secs(20));
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = silent([127, 0, 0, 1], bastion.addr).await;
        read_banner(&mut stream).await;
        held.push(stream);
    }
    // The third from the same source is closed before the version exchange.
    let mut third = silent([127, 0, 0, 1], bastion.addr).await;
    assert_eq!(read_to_close(&mut third).await, b"");
    // Another source still gets in while those two are held.
    let key = bastion.user_with_cert("user", "ca", &["-n", BENCH, "-V", "-5m:+6h"]);
    bastion
        .ssh(BENCH, &key, &["-b", "127.0.0.2"])
        .await
        .assert_authenticated();
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_past_max_startups_is_closed_before_key_exchange() {
    let bastion = Bastion::start(|_, config| {
        config.server.max_startups = NonZeroU32::new(3).unwrap();
        config.server.login_grace_time = Span(Duration::from_secs(20));
    })
    .await;
    let mut held = Vec::new();
    for source in 1..=3u8 {
        let mut stream = silent([127, 0, 0, source], bastion.addr).await;
        read_banner(&mut stream).await;
        held.push(stream);
    }
    let mut fourth = silent([127, 0, 0, 4], bastion.addr).await;
    assert_eq!(read_to_close(&mut fourth).await, b"");
    // Freeing a slot lets the next one in.
    drop(held.pop());
    let key = bastion.user_with_cert("user", "ca", &["-n", BENCH, "-V", "-5m:+6h"]);
    for _ in 0..50 {
        let result = bastion.ssh(BENCH, &key, &[]).await;
        if !result.stderr.contains("kex_exchange_identification") {
            result.assert_authenticated();
            return;
        }
        // The freed slot is released when the server notices the close.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("a freed startup slot was never reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_keeps_asking_for_refused_things_is_closed_with_one_summary() {
    let (bastion, bench, key) =
        support::bench_and_bastion(&[], &["-V", "-5m:+6h"], |_, _| {}).await;
    let out = support::python_client(
        &bastion,
        "asyncssh_refusals.py",
        &bench.bench,
        &key,
        "20000",
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let said = out.stdout_text();
    let (refused, closed) = said.trim().split_once(' ').unwrap();
    assert_eq!(closed, "True", "the connection was not closed: {out:?}");
    let refused: u32 = refused.parse().unwrap();
    assert!(refused >= 100, "{said}");
    let events = bastion.audit_after_closed(1).await;
    let refusals: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "request.refused")
        .collect();
    // Ten one by one, then one that counts them all.
    assert_eq!(refusals.len(), 11, "{refusals:#?}");
    let summary = refusals.last().unwrap();
    assert_eq!(summary["count"], 100, "{summary}");
    let closing = events
        .iter()
        .find(|e| e["event"] == "connection.closed")
        .unwrap();
    assert_eq!(closing["reason"], "too_many_refusals", "{closing}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_certificate_key_holds_at_most_max_connections_per_key() {
    let (bastion, bench, key) = support::bench_and_bastion(&[], &["-V", "-5m:+6h"], |_, config| {
        config.server.max_connections_per_key = NonZeroU32::new(2).unwrap();
    })
    .await;
    let hold = || {
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(bastion.client_options(&key))
            .args(["-N", "-p", &bastion.addr.port().to_string()])
            .arg(format!("{}@127.0.0.1", bench.bench))
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.spawn().unwrap()
    };
    let first = hold();
    let _second = hold();
    let accepted = || {
        bastion
            .audit()
            .iter()
            .filter(|e| e["event"] == "auth.accepted")
            .count()
    };
    for _ in 0..100 {
        if accepted() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepted(), 2);
    let reasons = bastion.rejection_reasons(&bench.bench, &key, &[]).await;
    assert!(
        reasons.iter().any(|r| r == "too_many_connections"),
        "{reasons:?}"
    );
    // Another person's key is not affected.
    let other = bastion.user_with_cert("other", "ca", &["-n", &bench.bench, "-V", "-5m:+6h"]);
    let run = bastion
        .exec(&bench.bench, &other, &[], "echo in", b"")
        .await;
    assert_eq!(run.stdout_text(), "in\n", "{run:?}");
    // A place is given back when its connection ends.
    drop(first);
    for _ in 0..100 {
        let run = bastion
            .exec(&bench.bench, &key, &[], "echo back", b"")
            .await;
        if run.stdout_text() == "back\n" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the key never got its place back");
}
