//! A flood of terminal resizes (`window-change`): each would be a Docker API call, so they
//! are passed on a few times a second and the last size wins. Alone in its test binary, so
//! that the engine's CPU time is this test's only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::{bench_and_bastion, cpu_seconds};

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_window_changes_cost_the_engine_little_and_the_last_size_wins() {
    let (bastion, bench, key) = bench_and_bastion(&[], &["-V", "-5m:+6h"], |_, _| {}).await;
    let dockerd = support::run("pidof", &["dockerd"]);
    let dockerd: u32 = String::from_utf8_lossy(&dockerd.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let before = cpu_seconds(dockerd);
    let out =
        support::python_client(&bastion, "asyncssh_resize.py", &bench.bench, &key, "20000").await;
    let engine = cpu_seconds(dockerd) - before;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout_text().trim(), "45 123", "{out:?}");
    // Unthrottled, 20,000 resizes cost the engine about 20 s of CPU.
    assert!(engine < 3.0, "dockerd used {engine:.2} CPU-s");
    eprintln!("dockerd CPU for 20,000 window changes: {engine:.2} s");
}
