//! One session's processes in a bench container, and the one owner of their end. The command
//! runs under the session wrapper (`wrapper.sh`) with a marker in its environment; when the
//! command exits, the wrapper ends what it left behind and exits with the command's status
//! (below 128: nothing more to do); every other end (the client gone, the server ending it, a
//! start that failed halfway) needs a teardown exec that ends every process with the marker
//! (`end.sh`), retried in the background.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use super::exec::{self, Exec, Spec, MARKER_VAR};
use super::{Endpoint, Error};

/// How often teardown is tried before giving up (each Docker call is bounded).
const TEARDOWN_ATTEMPTS: u32 = 3;

/// What a session runs, before benchgate adds its wrapper and marker.
#[derive(Debug, Clone)]
pub struct Plan {
    /// argv.
    pub argv: Vec<String>,
    /// User inside the container.
    pub user: String,
    /// Working directory.
    pub workdir: String,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    /// Terminal size (columns, rows) for a TTY; `None` = pipes.
    pub tty: Option<(u32, u32)>,
    /// Leftovers get SIGHUP (`session.leftovers = "hangup"`) instead of being ended.
    pub hangup: bool,
}

/// A running session's handle on its processes.
pub struct Session {
    endpoint: Arc<Endpoint>,
    container: String,
    user: String,
    marker: String,
    exec: String,
}

/// A session's streams: raw output (a terminal's, or Docker's multiplexed frames, see
/// [`exec::demux`]) and the process's stdin.
pub type Streams = Exec;

impl Session {
    /// Starts `plan` in `container`. When the start fails, the process may have started all
    /// the same: it is ended in the background on `tracker`.
    pub async fn start(
        endpoint: Arc<Endpoint>,
        container: &str,
        plan: Plan,
        tracker: &TaskTracker,
    ) -> Result<(Self, Streams), Error> {
        let marker = new_marker();
        let mut env = plan.env;
        env.push(format!("{MARKER_VAR}={marker}"));
        // Engines without console_size set the size after the start: the wrapper waits for it.
        let wait_for_size = plan.tty.filter(|_| !endpoint.has_console_size());
        let spec = Spec {
            cmd: exec::cleaning_up_after(plan.argv, wait_for_size, plan.hangup),
            user: plan.user,
            workdir: plan.workdir,
            env,
            tty: plan.tty,
        };
        let mut session = Self {
            endpoint: endpoint.clone(),
            container: container.to_owned(),
            user: spec.user.clone(),
            marker,
            exec: String::new(),
        };
        match Exec::start(endpoint, container, &spec).await {
            Ok(started) => {
                session.exec = started.id().1;
                Ok((session, started))
            }
            Err(e) => {
                // Nothing waits for this teardown: the session never started.
                drop(session.end(None, tracker));
                Err(e)
            }
        }
    }

    /// A short tag that names this session: its id on the admin socket and in the audit, and
    /// in its recording's file name (48 random bits).
    pub fn tag(&self) -> &str {
        &self.marker[..12]
    }

    /// Sets the terminal size.
    pub async fn resize(&self, cols: u32, rows: u32) -> Result<(), Error> {
        exec::resize(&self.endpoint, &self.exec, cols, rows).await
    }

    /// The command's exit code once its output has ended (polled, bounded).
    pub async fn exit_code(&self) -> Result<Option<i64>, Error> {
        exec::exit_code(&self.endpoint, &self.exec).await
    }

    /// The state of the session's container ("running", "exited"...).
    pub async fn container_state(&self) -> Result<String, Error> {
        exec::container_state(&self.endpoint, &self.container).await
    }

    /// Ends what the session left running. `status` is the wrapper's exit status when the
    /// command exited: below 128 the wrapper has done it (`None` is returned). Otherwise a
    /// teardown exec runs in the background on `tracker`, retried; its task says whether the
    /// processes were ended.
    pub fn end(self, status: Option<u32>, tracker: &TaskTracker) -> Option<JoinHandle<bool>> {
        if status.is_some_and(|code| code < 128) {
            return None;
        }
        Some(tracker.spawn(async move {
            let container = &self.container;
            // An engine hiccup must not leave the session's processes running: retry, bounded.
            for attempt in 1..=TEARDOWN_ATTEMPTS {
                match exec::terminate(&self.endpoint, container, &self.user, &self.marker).await {
                    Ok(()) => return true,
                    Err(e) => {
                        crate::metrics::docker_error(e.op());
                        tracing::warn!(%container, attempt, error = %e, "session teardown failed");
                    }
                }
                tokio::time::sleep(Duration::from_secs(attempt.into())).await;
            }
            tracing::error!(%container, "session processes may still be running: teardown gave up");
            false
        }))
    }
}

/// A fresh marker: 128 random bits in hex.
fn new_marker() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
