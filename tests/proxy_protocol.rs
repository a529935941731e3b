//! Behind a load balancer: PROXY protocol v2 headers from a trusted proxy give the real client
//! address, which `source-address`, audit and limits then use.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;

use benchgate::config::Net;
use support::{Bastion, BENCH};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay to `bastion` that first sends a PROXY v2 header naming `client` (its port
/// advanced for each connection) as the source, like HAProxy with `send-proxy-v2`.
async fn relay(bastion: SocketAddr, client: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = client;
        while let Ok((mut inbound, _)) = listener.accept().await {
            client.set_port(client.port() + 1);
            let mut outbound = TcpStream::connect(bastion).await.unwrap();
            outbound.write_all(&header(client, bastion)).await.unwrap();
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

fn header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(source), SocketAddr::V4(destination)) = (source, destination) else {
        panic!("IPv4 only here");
    };
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0, 12]);
    out.extend_from_slice(&source.ip().octets());
    out.extend_from_slice(&destination.ip().octets());
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// A bastion expecting PROXY headers from `trusted` (a network).
async fn behind_proxies(trusted: &str) -> Bastion {
    Bastion::start(|_, config| {
        config.server.proxy_protocol = true;
        config.server.trusted_proxies = vec![Net(trusted.parse().unwrap())];
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn source_address_is_judged_on_the_address_in_the_header() {
    let mut bastion = behind_proxies("127.0.0.0/8").await;
    let real_client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let relay = relay(bastion.addr, real_client).await;
    bastion.reach_via(relay);

    let allowed = bastion.user_with_cert(
        "allowed",
        "ca",
        &[
            "-n",
            BENCH,
            "-V",
            "-5m:+1h",
            "-O",
            "source-address=198.51.100.0/24",
        ],
    );
    bastion
        .ssh(BENCH, &allowed, &[])
        .await
        .assert_authenticated();
    let loopback = bastion.user_with_cert(
        "loopback",
        "ca",
        &[
            "-n",
            BENCH,
            "-V",
            "-5m:+1h",
            "-O",
            "source-address=127.0.0.1",
        ],
    );
    let reasons = bastion.rejection_reasons(BENCH, &loopback, &[]).await;
    assert!(
        reasons.contains(&"source_address_mismatch".to_owned()),
        "{reasons:?}"
    );
    let events = bastion.audit();
    assert!(
        events
            .iter()
            .all(|e| e["peer"].as_str().unwrap().starts_with("198.51.100.7:")),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_without_a_header_is_closed() {
    let bastion = behind_proxies("127.0.0.0/8").await;
    let key = bastion.user_with_cert("user", "ca", &["-n", BENCH, "-V", "-5m:+1h"]);
    let result = bastion.ssh(BENCH, &key, &[]).await;
    assert_eq!(result.code, Some(255), "{result:?}");
    assert!(!result.stderr.contains("Permission denied"), "{result:?}");
    assert!(bastion
        .audit()
        .iter()
        .all(|e| e["event"] != "auth.accepted"));
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_from_untrusted_addresses_are_refused() {
    let mut bastion = behind_proxies("10.9.9.9/32").await;
    let relay = relay(bastion.addr, "198.51.100.7:40000".parse().unwrap()).await;
    bastion.reach_via(relay);
    let key = bastion.user_with_cert("user", "ca", &["-n", BENCH, "-V", "-5m:+1h"]);
    let result = bastion.ssh(BENCH, &key, &[]).await;
    assert_eq!(result.code, Some(255), "{result:?}");
    assert!(bastion
        .audit()
        .iter()
        .all(|e| e["event"] != "auth.accepted"));
}
