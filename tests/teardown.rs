//! The session wrapper and the end script, run straight through `docker exec` (no SSH): which
//! path the wrapper took (fast: nothing left; end/hangup: leftovers found, said and ended), and
//! that nothing is left running, for hand-offs, double forks, zombies, the host's PIDs and a
//! container out of PIDs. `BENCHGATE_TRACE` makes the wrapper say its path on stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Output;
use std::time::Duration;

use support::Container;

const WRAPPER: &str = include_str!("../src/docker/wrapper.sh");
const END: &str = include_str!("../src/docker/end.sh");

/// Runs `command` (with `sh -c`) in `container` under the wrapper, as a session with marker
/// `marker` would, leftovers handled as `leftovers` says ("end" or "hangup").
fn wrapped(container: &Container, marker: &str, leftovers: &str, command: &str) -> Output {
    wrapped_in(&container.name, marker, leftovers, command)
}

fn wrapped_in(container: &str, marker: &str, leftovers: &str, command: &str) -> Output {
    let env = format!("BENCHGATE_SESSION={marker}");
    std::process::Command::new("docker")
        .args(["exec", "-e", &env, "-e", "BENCHGATE_TRACE=1", container])
        .args(["sh", "-c", WRAPPER, "benchgate-session", END, "", leftovers])
        .args(["sh", "-c", command])
        .output()
        .unwrap()
}

/// The path the wrapper said it took.
fn path(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("benchgate-trace: "))
        .unwrap_or_else(|| panic!("no trace in {stderr:?}"))
        .to_owned()
}

/// Whether a live (not zombie) process whose command line holds `needle` runs in `container`.
fn running(container: &Container, needle: &str) -> bool {
    let out = support::run(
        "docker",
        &["exec", &container.name, "ps", "-o", "stat,args"],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains(needle) && !l.trim_start().starts_with('Z') && !l.contains("ps -o"))
}

/// Waits (bounded, 5 s) until nothing live matches `needle`.
async fn gone(container: &Container, needle: &str) {
    for _ in 0..50 {
        if !running(container, needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{needle:?} still running 5 s later: {:?}",
        container.processes()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_left_takes_the_fast_path() {
    let c = Container::start(&[]);
    let out = wrapped(&c, "m1", "end", "echo hi; exit 3");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(path(&out), "fast");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_job_is_said_and_ended() {
    let c = Container::start(&[]);
    let out = wrapped(&c, "m2", "end", "sleep 1101 & exit 4");
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(path(&out), "end 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Named as they are at the look (a job may still be its shell, or mid-exec).
    assert!(
        stderr.contains("benchgate: ended 1 background process left by this session ("),
        "{stderr}"
    );
    gone(&c, "sleep 1101").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_off_during_the_look_is_caught() {
    let c = Container::start(&[]);
    // The middle shell forks and exits while the wrapper looks.
    let out = wrapped(&c, "m3", "end", "sh -c 'sleep 1102 & exit' & exit 0");
    assert!(path(&out).starts_with("end "), "{}", path(&out));
    gone(&c, "sleep 1102").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_double_forked_daemon_in_its_own_session_is_ended() {
    let c = Container::start(&[]);
    let out = wrapped(
        &c,
        "m4",
        "end",
        "setsid sh -c 'sleep 1103 </dev/null >/dev/null 2>&1 & exit' </dev/null >/dev/null 2>&1",
    );
    assert_eq!(path(&out), "end 1");
    gone(&c, "sleep 1103").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn zombies_under_an_init_that_never_reaps_are_not_leftovers() {
    let c = Container::start(&[]);
    // `true` is orphaned and dies: a zombie child of init (a `sleep`, which never reaps).
    let out = wrapped(&c, "m5", "end", "(true &); sleep 0.2");
    assert_eq!(path(&out), "fast");
    let out = wrapped(&c, "m6", "end", "(true &); sleep 0.2; sleep 1104 &");
    assert_eq!(path(&out), "end 1");
    gone(&c, "sleep 1104").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn in_the_hosts_pid_namespace_the_wrapper_looks_by_marker() {
    let c = Container::start_with(&["--pid=host"], &[]);
    let out = wrapped(&c, "m7", "end", "true");
    assert_eq!(path(&out), "end 0");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("benchgate: ended"));
    let out = wrapped(&c, "m8", "end", "sleep 1105 >/dev/null 2>&1 & exit 0");
    assert_eq!(path(&out), "end 1");
    gone(&c, "sleep 1105").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_holding_every_pid_are_still_ended() {
    // An init that reaps, so that ended leftovers give their PIDs back.
    let c = Container::start_with(&["--pids-limit", "12", "--init"], &[]);
    // The loop fails once the container is out of PIDs; the wrapper cannot fork either.
    let out = wrapped(
        &c,
        "m9",
        "end",
        "i=0; while [ $i -lt 12 ]; do sleep 1106 & i=$((i+1)); done; exit 0",
    );
    // The jobs get SIGTERM from the shell's builtin before anything is forked.
    assert!(path(&out).starts_with("end "), "{}", path(&out));
    gone(&c, "sleep 1106").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hangup_spares_what_ignores_it() {
    let c = Container::start(&[]);
    let out = wrapped(
        &c,
        "m10",
        "hangup",
        "(trap '' HUP; exec sleep 1107) & sleep 1108 & exit 0",
    );
    assert_eq!(path(&out), "hangup 2");
    gone(&c, "sleep 1108").await;
    assert!(running(&c, "sleep 1107"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_end_script_ends_a_session_that_ignores_term() {
    let c = Container::start(&[]);
    support::run(
        "docker",
        &[
            "exec",
            "-d",
            "-e",
            "BENCHGATE_SESSION=m11",
            &c.name,
            "sh",
            "-c",
            "env -i sleep 1113 & sleep 1109 & trap '' TERM; sleep 1110",
        ],
    );
    // Another session's process, not marked: left alone.
    other_session(&c, "sleep 1114");
    for _ in 0..50 {
        if running(&c, "sleep 1110") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // As benchgate's teardown runs it: a separate exec, by marker.
    let out = std::process::Command::new("docker")
        .args([
            "exec",
            &c.name,
            "sh",
            "-c",
            END,
            "benchgate-teardown",
            "m11",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!running(&c, "sleep 1109"));
    assert!(!running(&c, "sleep 1110"));
    assert!(!running(&c, "trap"));
    // Its environment cleared, but in the session's session.
    assert!(!running(&c, "sleep 1113"));
    assert!(running(&c, "sleep 1114"));
}

/// Starts `command` in `container` as another session (its own exec, its own marker).
fn other_session(container: &Container, command: &str) {
    support::run(
        "docker",
        &[
            "exec",
            "-d",
            "-e",
            "BENCHGATE_SESSION=other",
            &container.name,
            "sh",
            "-c",
            command,
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_orphan_of_another_live_session_is_not_a_leftover() {
    let c = Container::start(&[]);
    // While this session runs, another one (whose main process lives on) orphans a job.
    let name = c.name.clone();
    let mine = std::thread::spawn(move || wrapped_in(&name, "m12", "end", "sleep 1"));
    std::thread::sleep(Duration::from_millis(300));
    other_session(&c, "(sleep 1111 &); sleep 30");
    let out = mine.join().unwrap();
    assert_eq!(path(&out), "fast");
    assert!(running(&c, "sleep 1111"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_process_orphaned_during_the_session_is_not_a_leftover() {
    let c = Container::start(&[]);
    // Started before this session; its parent exits (and its session leader with it) while
    // the session runs.
    other_session(&c, "sleep 1112 & sleep 1; exit");
    std::thread::sleep(Duration::from_millis(300));
    let out = wrapped(&c, "m13", "end", "sleep 2");
    assert_eq!(path(&out), "fast");
    assert!(running(&c, "sleep 1112"));
}
