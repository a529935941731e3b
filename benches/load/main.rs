//! Load harness: benchgate against OpenSSH `sshd` (the usual bastion: certificates, a forced
//! `docker exec`) and the floor (the same exec straight through the Docker API), in one run
//! on one machine. Prints a table with ratios and the targets of issue 6, and writes
//! `target/load/results.{json,md,svg}`.
//!
//! `scripts/bench.sh` sets the machine up and runs it; `--smoke` makes every figure tiny (CI
//! uses it to check that the harness still works, never how fast).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod drive;
mod lab;
mod report;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use drive::{Ssh, Target};
use lab::{Lab, BENCH};
use report::{Figure, Goal, Who};

/// How much of each figure to measure.
struct Plan {
    rounds: usize,
    handshakes: usize,
    sessions: usize,
    bulk_bytes: u64,
    /// Bytes sent through `cat` (and back) per session.
    cat_bytes: u64,
    keys: usize,
    idle: usize,
    idle_sshd: usize,
    /// Handshakes per key exchange method whose CPU cost is measured.
    kex: usize,
    /// One group of figures only (for profiling), from [`GROUPS`].
    only: Option<String>,
}

/// The groups of figures, in the order they are measured.
const GROUPS: [&str; 6] = [
    "handshakes",
    "kex",
    "sessions",
    "throughput",
    "echo",
    "idle",
];

impl Plan {
    fn wants(&self, group: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == group)
    }
}

impl Plan {
    fn full() -> Self {
        Self {
            rounds: 3,
            handshakes: 200,
            sessions: 64,
            bulk_bytes: 1 << 30,
            cat_bytes: 256 << 20,
            keys: 1000,
            idle: 500,
            idle_sshd: 100,
            kex: 100,
            only: None,
        }
    }

    fn smoke() -> Self {
        Self {
            rounds: 1,
            handshakes: 4,
            sessions: 4,
            bulk_bytes: 1 << 20,
            cat_bytes: 1 << 20,
            keys: 10,
            idle: 4,
            idle_sshd: 4,
            kex: 2,
            only: None,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut plan = if args.iter().any(|a| a == "--smoke") {
        Plan::smoke()
    } else {
        Plan::full()
    };
    if let Some(at) = args.iter().position(|a| a == "--only") {
        let group = args.get(at + 1).context("--only needs a group")?;
        ensure!(
            GROUPS.contains(&group.as_str()),
            "--only takes one of {GROUPS:?}"
        );
        plan.only = Some(group.clone());
    }
    // The tests' and CI's working directory is the package root; so is cargo bench's.
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let lab = runtime.block_on(Lab::new());
    let figures = runtime.block_on(measure(&lab, &plan))?;
    let table = report::table(&figures);
    println!("\n{table}");
    let dir = lab::results_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("results.md"), &table)?;
    std::fs::write(dir.join("results.svg"), report::chart(&figures))?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&report::json(&figures))?,
    )?;
    println!("written: {}/results.{{md,json,svg}}", dir.display());
    eprintln!("load: removing the lab");
    drop(lab);
    Ok(())
}

async fn measure(lab: &Lab, plan: &Plan) -> anyhow::Result<Vec<Figure>> {
    let ssh = |addr, user: &str| {
        Target::Ssh(Arc::new(Ssh::new(
            addr,
            lab.key.clone(),
            lab.cert.clone(),
            user,
        )))
    };
    let targets = [
        (Who::Benchgate, ssh(lab.benchgate.addr, BENCH)),
        (Who::Sshd, ssh(lab.sshd.addr, "root")),
        (
            Who::Floor,
            Target::Floor {
                endpoint: lab.floor.clone(),
                container: lab.container.clone(),
            },
        ),
    ];
    for (who, target) in &targets {
        check(target).await.with_context(|| {
            format!(
                "{who:?} does not work; logs:\n{}\n{}",
                lab.log("benchgate.log"),
                lab.log("sshd.log")
            )
        })?;
    }
    eprintln!("load: every target runs commands with exit status and output; measuring");
    let mut figures = Vec::new();
    if plan.wants("handshakes") {
        figures.extend(handshakes(&targets, plan).await?);
    }
    if plan.wants("kex") {
        figures.extend(kex_cost(lab, plan).await?);
    }
    if plan.wants("sessions") {
        figures.extend(sessions(&targets, plan).await?);
    }
    if plan.wants("throughput") {
        figures.push(throughput(&targets, plan).await?);
        figures.push(cat_throughput(&targets, plan).await?);
    }
    if plan.wants("echo") {
        figures.push(echo(&targets, plan).await?);
    }
    if plan.wants("idle") {
        figures.push(idle(lab, &targets, plan).await?);
    }
    Ok(figures)
}

type Targets = [(Who, Target); 3];

/// The targets, starting with a different one each round, so that none is always measured
/// right after another's leftovers or always last in a drifting engine.
fn in_turn(targets: &Targets, round: usize) -> impl Iterator<Item = &(Who, Target)> {
    targets
        .iter()
        .cycle()
        .skip(round % targets.len())
        .take(targets.len())
}

/// Logins and logouts per second, no session.
async fn handshakes(targets: &Targets, plan: &Plan) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for concurrency in [1, 16] {
        let total = plan.handshakes * concurrency.min(2);
        let mut rates =
            Figure::median(format!("auth-only handshakes/s, concurrency {concurrency}"))
                .goal(Goal::TimesSshd(3.0));
        for round in 0..plan.rounds {
            for (who, target) in in_turn(targets, round).filter(|(w, _)| *w != Who::Floor) {
                settle().await;
                let target = target.clone();
                let batch = load(total, concurrency, move || {
                    let target = target.clone();
                    async move { target.handshake().await }
                })
                .await?;
                rates.add(*who, batch.rate());
            }
        }
        figures.push(rates);
    }
    Ok(figures)
}

/// Every key exchange method russh's client speaks (so both daemons are asked the same way),
/// to measure what each costs a daemon before authentication.
const KEX_METHODS: [russh::kex::Name; 9] = [
    russh::kex::CURVE25519,
    russh::kex::MLKEM768X25519_SHA256,
    russh::kex::ECDH_SHA2_NISTP256,
    russh::kex::ECDH_SHA2_NISTP384,
    russh::kex::ECDH_SHA2_NISTP521,
    russh::kex::DH_G14_SHA256,
    russh::kex::DH_G16_SHA512,
    russh::kex::DH_G18_SHA512,
    russh::kex::DH_GEX_SHA256,
];

/// The daemon's CPU milliseconds per key exchange of each method: `plan.kex` connections
/// (fewer, at least 5, for a method that takes over 15 s) that exchange keys and disconnect, and the daemon's CPU time (its exited children
/// included: sshd forks one per connection) read from `/proc` before and after. A method a
/// daemon does not offer has no figure.
async fn kex_cost(lab: &Lab, plan: &Plan) -> anyhow::Result<Vec<Figure>> {
    fn cpu_ms(pid: u32) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // utime, stime, cutime, cstime: the 14th to 17th fields, after "pid (comm) state".
        let fields: Vec<f64> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .skip(11)
            .take(4)
            .filter_map(|f| f.parse().ok())
            .collect();
        fields.iter().sum::<f64>() * 10.0 // USER_HZ is 100 on Linux
    }
    let mut figures = Vec::new();
    for method in KEX_METHODS {
        let mut figure = Figure::median(format!("CPU ms per key exchange, {}", method.as_ref()))
            .lower_is_better();
        let preferred = russh::Preferred {
            kex: vec![
                method,
                russh::kex::EXTENSION_SUPPORT_AS_CLIENT,
                russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
            ]
            .into(),
            ..Default::default()
        };
        let config = Arc::new(russh::client::Config {
            preferred,
            ..Default::default()
        });
        for (who, daemon) in [(Who::Benchgate, &lab.benchgate), (Who::Sshd, &lab.sshd)] {
            settle().await;
            let pid = daemon.process.id();
            let before = cpu_ms(pid);
            let (mut offered, mut done, started) = (true, 0, Instant::now());
            // The slow methods stop early (the client pays as much as the daemon).
            while done < plan.kex && (done < 5 || started.elapsed() < Duration::from_secs(15)) {
                done += 1;
                match russh::client::connect(config.clone(), daemon.addr, drive::Client).await {
                    Ok(handle) => {
                        let _ = handle
                            .disconnect(russh::Disconnect::ByApplication, "", "en")
                            .await;
                    }
                    Err(russh::Error::NoCommonAlgo { .. }) => {
                        offered = false;
                        break;
                    }
                    Err(e) => anyhow::bail!("{who:?} {}: {e}", method.as_ref()),
                }
            }
            if offered {
                tokio::time::sleep(Duration::from_millis(300)).await;
                figure.add(who, (cpu_ms(pid) - before) / done as f64);
            }
        }
        figures.push(figure);
    }
    Ok(figures)
}

/// Whole sessions (login, `exec true`, exit status) per second, and their latency.
async fn sessions(targets: &Targets, plan: &Plan) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for concurrency in [1, 16] {
        let total = plan.sessions * concurrency.min(2);
        let mut rates =
            Figure::median(format!("sessions/s (exec true), concurrency {concurrency}"));
        let mut latency = Figure::latency(format!("session latency, concurrency {concurrency}"));
        if concurrency == 16 {
            rates = rates.goal(Goal::TimesSshd(3.0));
            latency = latency.goal(Goal::WithinFloorMs(2.0));
        }
        for round in 0..plan.rounds {
            for (who, target) in in_turn(targets, round) {
                settle().await;
                let target = target.clone();
                let batch = load(total, concurrency, move || {
                    let target = target.clone();
                    async move {
                        let (status, _) = target.run("true").await?;
                        ensure!(status == 0, "exit status {status}");
                        Ok(())
                    }
                })
                .await?;
                rates.add(*who, batch.rate());
                latency.add_samples(*who, &batch.latencies);
            }
        }
        figures.push(rates);
        figures.push(latency);
    }
    Ok(figures)
}

/// `head -c` of `plan.bulk_bytes` from the container to the client, MB/s.
async fn throughput(targets: &Targets, plan: &Plan) -> anyhow::Result<Figure> {
    let mut throughput = Figure::median(format!(
        "throughput, {} MiB from head -c, MB/s",
        plan.bulk_bytes >> 20
    ))
    .goal(Goal::ShareOfFloorAndSshd(0.9));
    for round in 0..plan.rounds {
        for (who, target) in in_turn(targets, round) {
            settle().await;
            let started = Instant::now();
            let (status, bytes) = target
                .run(&format!("head -c {} /dev/zero", plan.bulk_bytes))
                .await?;
            let elapsed = started.elapsed();
            ensure!(
                status == 0 && bytes == plan.bulk_bytes,
                "{who:?}: bulk read ended with status {status} after {bytes} bytes"
            );
            throughput.add(*who, bytes as f64 / elapsed.as_secs_f64() / 1e6);
        }
    }
    Ok(throughput)
}

/// `plan.cat_bytes` through `cat`, in and out at once, MB/s each way.
async fn cat_throughput(targets: &Targets, plan: &Plan) -> anyhow::Result<Figure> {
    let mut figure = Figure::median(format!(
        "cat both ways, {} MiB in and out, MB/s",
        plan.cat_bytes >> 20
    ))
    .goal(Goal::ShareOfFloorAndSshd(0.9));
    for round in 0..plan.rounds {
        for (who, target) in in_turn(targets, round) {
            settle().await;
            let started = Instant::now();
            let seen = target.cat(plan.cat_bytes).await?;
            let elapsed = started.elapsed();
            ensure!(
                seen == plan.cat_bytes,
                "{who:?}: cat gave back {seen} of {} bytes",
                plan.cat_bytes
            );
            figure.add(*who, seen as f64 / elapsed.as_secs_f64() / 1e6);
        }
    }
    Ok(figure)
}

/// A key typed into `cat` in a terminal, until its echo is back.
async fn echo(targets: &Targets, plan: &Plan) -> anyhow::Result<Figure> {
    let mut echo = Figure::latency(format!("PTY echo latency, {} keys", plan.keys))
        .goal(Goal::WithinFloorMs(0.3));
    for round in 0..plan.rounds {
        for (who, target) in in_turn(targets, round) {
            settle().await;
            let mut terminal = target.terminal(Some("echo ready; exec cat")).await?;
            terminal.wait_for(b"ready").await?;
            for _ in 0..20 {
                terminal.echo(b'w').await?;
            }
            let mut samples = Vec::with_capacity(plan.keys);
            for i in 0..plan.keys {
                samples.push(terminal.echo(b'a' + (i % 26) as u8).await?);
            }
            echo.add_samples(*who, &samples);
        }
    }
    Ok(echo)
}

/// What each idle terminal session costs the bastion in memory.
async fn idle(lab: &Lab, targets: &Targets, plan: &Plan) -> anyhow::Result<Figure> {
    let mut idle = Figure::median(format!(
        "memory per idle PTY session, KiB ({} benchgate, {} sshd sessions)",
        plan.idle, plan.idle_sshd
    ))
    .lower_is_better()
    .goal(Goal::AtMost(128.0));
    for (who, target, pid, count) in [
        (
            Who::Benchgate,
            &targets[0].1,
            lab.benchgate.process.id(),
            plan.idle,
        ),
        (
            Who::Sshd,
            &targets[1].1,
            lab.sshd.process.id(),
            plan.idle_sshd,
        ),
    ] {
        settle().await;
        let before = lab::memory_kib(pid);
        let opened = Arc::new(Mutex::new(Vec::new()));
        let (target, kept) = (target.clone(), opened.clone());
        load(count, 16, move || {
            let (target, kept) = (target.clone(), kept.clone());
            async move {
                let mut terminal = target.terminal(None).await?;
                terminal.wait_for(b"$ ").await?;
                kept.lock().unwrap().push(terminal);
                Ok(())
            }
        })
        .await?;
        settle().await;
        let after = lab::memory_kib(pid);
        let held = opened.lock().unwrap().len();
        ensure!(
            held == count,
            "{who:?} held {held} of {count} idle sessions"
        );
        // RSS for benchgate (one process); PSS for sshd, whose forked processes share pages.
        let per_session = match who {
            Who::Sshd => after.1.saturating_sub(before.1),
            _ => after.0.saturating_sub(before.0),
        } as f64
            / count as f64;
        eprintln!("load: {who:?} held {held} idle sessions; memory before {before:?} after {after:?} KiB (rss, pss)");
        idle.add(who, per_session);
        drop(opened);
    }
    Ok(idle)
}

/// A target runs commands (output, exit status) and terminals whose echo comes from the
/// container: with echo off there, a key shows up only when `cat` prints its line (a bastion
/// that echoed keys itself would make the echo figure meaningless).
async fn check(target: &Target) -> anyhow::Result<()> {
    let (status, bytes) = target.run("head -c 1000 /dev/zero; exit 7").await?;
    ensure!(
        status == 7 && bytes == 1000,
        "got status {status} after {bytes} bytes"
    );
    let mut terminal = target
        .terminal(Some("stty -echo; echo ready; exec cat"))
        .await?;
    terminal.wait_for(b"ready").await?;
    terminal.send(b"q").await?;
    let early = terminal.collect(Duration::from_millis(300)).await;
    ensure!(
        !early.contains(&b'q'),
        "a key was echoed with the container's echo off"
    );
    terminal.send(b"\r").await?;
    let line = terminal.collect(Duration::from_millis(500)).await;
    ensure!(line.contains(&b'q'), "cat never printed the line: {line:?}");
    Ok(())
}

/// One batch of operations: how long it took and each operation's latency.
struct Batch {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Batch {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `op` `total` times from `concurrency` workers; any failure fails the batch.
async fn load<F, Fut>(total: usize, concurrency: usize, op: F) -> anyhow::Result<Batch>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let (op, next) = (Arc::new(op), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let began = Instant::now();
                    op().await?;
                    latencies.push(began.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for worker in workers {
        latencies.extend(worker.await??);
    }
    Ok(Batch {
        elapsed: started.elapsed(),
        latencies,
    })
}

/// Waits (at most 20 s) until the machine is quiet — under a quarter of a core busy over half
/// a second — so one target's leftovers (benchgate's teardown execs, sshd's exiting
/// processes) do not weigh on the next target's figures.
async fn settle() {
    fn busy_and_total() -> (u64, u64) {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        let total: u64 = fields.iter().take(8).sum();
        (total - idle, total)
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut share = 0.0;
    while Instant::now() < deadline {
        let (busy0, total0) = busy_and_total();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (busy1, total1) = busy_and_total();
        share = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * cores;
        if share < 0.25 {
            return;
        }
    }
    eprintln!("load: the machine is still busy ({share:.2} cores) after 20 s; measuring anyway");
}
