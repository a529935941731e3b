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
