//! What keeping a terminal session watchable costs on its output path: `Live::output` (the
//! recent-output ring and the redraw scan) per 32 KiB chunk of terminal output, with no watcher
//! and with one, against copying the chunk once (the floor of any output path).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::SystemTime;

use benchgate::live::{About, Registry};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// 32 KiB of coloured log lines, like a terminal session's bulk output.
fn chunk() -> Vec<u8> {
    let line =
        b"\x1b[32mINFO\x1b[0m 2026-12-06 19:30:00 worker-3 job done in 12ms (queue: default)\r\n";
    line.iter().copied().cycle().take(32 * 1024).collect()
}

fn about() -> About {
    About {
        id: "3f2a9c0d41b7".into(),
        bench: "shop".into(),
        container: "c".into(),
        endpoint: "unix:///var/run/docker.sock".into(),
        key_id: "alice".into(),
        serial: 1,
        ca: "SHA256:x".into(),
        peer: "127.0.0.1:1".parse().unwrap(),
        kind: "shell",
        command: None,
        tty: Some((80, 24)),
        started: SystemTime::now(),
        valid_before: 0,
    }
}

fn output(c: &mut Criterion) {
    let chunk = chunk();
    let mut group = c.benchmark_group("terminal output, 32 KiB chunks");
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    group.bench_function("copy once (floor)", |b| {
        let mut into = Vec::with_capacity(chunk.len());
        b.iter(|| {
            into.clear();
            into.extend_from_slice(black_box(&chunk));
            black_box(&into);
        })
    });
    let registry = Registry::default();
    let (listed, _) = registry.add(about());
    group.bench_function("Live::output, no watcher", |b| {
        b.iter(|| listed.live().output(black_box(&chunk)))
    });
    let mut watching = listed.live().watch().unwrap();
    group.bench_function("Live::output, one watcher reading", |b| {
        b.iter(|| {
            listed.live().output(black_box(&chunk));
            while watching.frames.try_recv().is_ok() {}
        })
    });
    group.finish();
}

criterion_group!(benches, output);
criterion_main!(benches);
