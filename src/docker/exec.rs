//! Processes in a bench container: create, attach, resize, exit code, and teardown of
//! everything a session started (found by a marker in its environment).

use std::sync::Arc;
use std::time::Duration;

use bollard::models::ExecConfig;
use bollard::query_parameters::ResizeExecOptions;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::endpoint::{Endpoint, Io};
use super::Error;

/// Environment variable whose value marks every process of one session.
pub const MARKER_VAR: &str = "BENCHGATE_SESSION";
/// How long to wait for Docker to report an exit code after the output ended.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// argv.
    pub cmd: Vec<String>,
    /// User inside the container.
    pub user: String,
    /// Working directory.
    pub workdir: String,
    /// `NAME=value` entries, the session marker included.
    pub env: Vec<String>,
    /// Terminal size (columns, rows) for a TTY; `None` = pipes.
    pub tty: Option<(u32, u32)>,
}

/// A started process with its attached streams.
pub struct Exec {
    endpoint: Arc<Endpoint>,
    id: String,
    /// Raw output: the terminal for a TTY, else Docker's multiplexed frames (see [`demux`]).
    pub output: Box<dyn AsyncRead + Unpin + Send>,
    /// The process's stdin; shut it down to send EOF.
    pub input: WriteHalf<Box<dyn Io>>,
}

impl Exec {
    /// Creates and starts `spec` in `container` on `endpoint`.
    pub async fn start(
        endpoint: Arc<Endpoint>,
        container: &str,
        spec: &Spec,
    ) -> Result<Self, Error> {
        let config = ExecConfig {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(spec.tty.is_some()),
            console_size: spec
                .tty
                .map(|(cols, rows)| vec![rows as usize, cols as usize]),
            env: Some(spec.env.clone()),
            cmd: Some(
                ["sh", "-c", &session_script(), "benchgate-session"]
                    .into_iter()
                    .map(String::from)
                    .chain(spec.cmd.iter().cloned())
                    .collect(),
            ),
            user: Some(spec.user.clone()),
            working_dir: Some(spec.workdir.clone()),
            ..Default::default()
        };
        // console_size needs API 1.42; older engines get a resize right after the start.
        let old_api = !endpoint.has_console_size();
        let config = if old_api {
            ExecConfig {
                console_size: None,
                ..config
            }
        } else {
            config
        };
        let created = endpoint
            .bounded(
                "exec_create",
                endpoint.api()?.create_exec(container, config),
            )
            .await?;
        let body = json!({ "Detach": false, "Tty": spec.tty.is_some() }).to_string();
        let (prefix, stream) = endpoint
            .upgrade(&format!("/exec/{}/start", created.id), &body)
            .await?;
        let (read, input): (ReadHalf<Box<dyn Io>>, _) = tokio::io::split(stream);
        let output = Box::new(std::io::Cursor::new(prefix).chain(read));
        if let (Some((cols, rows)), true) = (spec.tty, old_api) {
            // The process may not exist yet right after the start; retry briefly, as the
            // docker CLI does.
            for _ in 0..10 {
                if resize(&endpoint, &created.id, cols, rows).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(Self {
            endpoint,
            id: created.id,
            output,
            input,
        })
    }

    /// A handle for reading the exit code after the streams are gone.
    pub fn id(&self) -> (Arc<Endpoint>, String) {
        (self.endpoint.clone(), self.id.clone())
    }
}

/// Sets the terminal size of exec `id`.
pub async fn resize(endpoint: &Endpoint, id: &str, cols: u32, rows: u32) -> Result<(), Error> {
    let options = ResizeExecOptions {
        w: cols.clamp(1, 10_000) as i32,
        h: rows.clamp(1, 10_000) as i32,
    };
    endpoint
        .bounded("exec_resize", endpoint.api()?.resize_exec(id, options))
        .await
}

/// The exit code of exec `id`, polled until Docker says it is no longer running (bounded).
pub async fn exit_code(endpoint: &Endpoint, id: &str) -> Result<Option<i64>, Error> {
    let deadline = tokio::time::Instant::now() + EXIT_CODE_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        let inspect = endpoint
            .bounded("exec_inspect", endpoint.api()?.inspect_exec(id))
            .await?;
        if inspect.running != Some(true) {
            return Ok(inspect.exit_code);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        // The engine usually catches up within a millisecond or two.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The state of `container` ("running", "exited"...), by its full ID.
pub async fn container_state(endpoint: &Endpoint, container: &str) -> Result<String, Error> {
    let inspect = endpoint
        .bounded(
            "inspect",
            endpoint.api()?.inspect_container(container, None),
        )
        .await?;
    Ok(inspect
        .state
        .and_then(|s| s.status)
        .map(|s| s.to_string())
        .unwrap_or_default())
}

/// Ends every process whose environment holds `MARKER_VAR=$1`: SIGTERM, up to two seconds'
/// grace, then SIGKILL. One `grep -z` over `/proc/*/environ` where grep has it, else a `tr`
/// and a `grep` per process. Run as the session's user: root in a container lacks
/// CAP_SYS_PTRACE and cannot read other users' environments. No single quotes, so that
/// [`session_script`] can carry it.
const END_SCRIPT: &str = r#"m="BENCHGATE_SESSION=$1"
if printf "x\0" | grep -qzx x 2>/dev/null; then
pids() { for f in $(grep -lzxF "$m" /proc/[0-9]*/environ 2>/dev/null); do p=${f#/proc/}; p=${p%/environ}; [ "$p" = "$$" ] || echo "$p"; done; }
else
pids() { for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = "$$" ] && continue; tr "\0" "\n" < "$d/environ" 2>/dev/null | grep -qxF "$m" && echo "$p"; done; }
fi
p=$(pids); [ -z "$p" ] && exit 0
kill -TERM $p 2>/dev/null
i=0; while [ $i -lt 20 ]; do sleep 0.1 2>/dev/null || sleep 1; p=$(pids); [ -z "$p" ] && exit 0; i=$((i+1)); done
kill -KILL $p 2>/dev/null; exit 0"#;

/// Runs the session's command (its arguments), then ends whatever the command left behind
/// (background jobs) in a process of its own, without the marker and with its output closed
/// so the stream ends at once, and exits with the command's status. Terminal signals are
/// caught (not ignored, so the command gets them as usual) to make sure the cleanup runs; the
/// cleanup ignores the SIGHUP the terminal sends when this wrapper, its session leader, exits.
/// This spares the Docker engine a second exec after every session that ends normally; a
/// session ended any other way is ended by [`terminate`].
fn session_script() -> String {
    format!(
        r#"e='{END_SCRIPT}'
trap : INT QUIT
"$@"
s=$?
trap "" HUP
m=${MARKER_VAR}
unset {MARKER_VAR}
sh -c "$e" benchgate-end "$m" </dev/null >/dev/null 2>&1 &
exit $s"#
    )
}

/// Whether an exit code says the session's own cleanup ran: the wrapper exited normally.
pub fn cleaned_up_after(exit_code: u32) -> bool {
    exit_code < 128
}

/// Ends every process in `container` whose environment holds `MARKER_VAR=marker` (see
/// [`END_SCRIPT`]), through a separate exec as the session's `user`, so it works for remote
/// engines too; needs only a POSIX `sh` with `grep` in the image.
pub async fn terminate(
    endpoint: &Endpoint,
    container: &str,
    user: &str,
    marker: &str,
) -> Result<(), Error> {
    // Never closed, so acquiring only waits.
    let _permit = endpoint.teardowns.acquire().await;
    let config = ExecConfig {
        cmd: Some(vec![
            "sh".into(),
            "-c".into(),
            END_SCRIPT.into(),
            "benchgate-teardown".into(),
            marker.into(),
        ]),
        user: Some(user.into()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    let created = endpoint
        .bounded(
            "exec_create",
            endpoint.api()?.create_exec(container, config),
        )
        .await?;
    let body = json!({ "Detach": false, "Tty": false }).to_string();
    let (_, mut stream) = endpoint
        .upgrade(&format!("/exec/{}/start", created.id), &body)
        .await?;
    // Wait for the script to finish: its (empty) output stream closes when it exits.
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
    Ok(())
}

/// Copies Docker's multiplexed stream (8-byte frame headers: stream, 0, 0, 0, u32 length)
/// to `stdout` and `stderr`, returning the bytes copied.
pub async fn demux(
    mut input: impl AsyncRead + Unpin,
    mut stdout: impl AsyncWrite + Unpin,
    mut stderr: impl AsyncWrite + Unpin,
) -> std::io::Result<u64> {
    let mut header = [0u8; 8];
    let mut buf = vec![0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        match input.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(total),
            Err(e) => return Err(e),
        }
        let mut left = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        while left > 0 {
            let want = left.min(buf.len());
            input.read_exact(&mut buf[..want]).await?;
            match header[0] {
                2 => stderr.write_all(&buf[..want]).await?,
                _ => stdout.write_all(&buf[..want]).await?,
            }
            left -= want;
            total += want as u64;
        }
        stdout.flush().await?;
        stderr.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_script_carries_the_end_script_whole() {
        assert!(END_SCRIPT.contains(&format!("\"{MARKER_VAR}=$1\"")));
        assert!(
            !END_SCRIPT.contains('\''),
            "single quotes would end e='...'"
        );
        assert!(session_script().contains(END_SCRIPT));
    }

    fn frame(stream: u8, data: &[u8]) -> Vec<u8> {
        let mut out = vec![stream, 0, 0, 0];
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    #[tokio::test]
    async fn demux_splits_streams_byte_exact() {
        let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let mut input = frame(1, &payload);
        input.extend(frame(2, b"\x00\x01\x02err"));
        input.extend(frame(1, b""));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let total = demux(&input[..], &mut out, &mut err).await.unwrap();
        assert_eq!(out, payload);
        assert_eq!(err, b"\x00\x01\x02err");
        assert_eq!(total, 70_006);
    }

    #[tokio::test]
    async fn demux_reports_a_truncated_frame() {
        let mut input = frame(1, b"hello");
        input.truncate(10);
        assert!(demux(&input[..], Vec::new(), Vec::new()).await.is_err());
    }
}
