//! Processes in a bench container: create, attach, resize, exit code, and teardown of
//! everything a session started (found by a marker in its environment).

use std::sync::Arc;
use std::time::Duration;

use bollard::models::ExecConfig;
use bollard::query_parameters::ResizeExecOptions;
use serde_json::json;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf,
    WriteHalf,
};

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
            cmd: Some(spec.cmd.clone()),
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

/// Ends every process of one session: see the comment at the top of `end.sh`.
const END_SCRIPT: &str = include_str!("end.sh");

/// The session wrapper: see `wrapper.sh` and [`cleaning_up_after`].
const WRAPPER_SCRIPT: &str = include_str!("wrapper.sh");

/// `cmd` run under a wrapper that, once `cmd` exits, ends whatever it left behind (background
/// jobs) and exits with `cmd`'s status. This spares the engine a second exec after every
/// session that ends normally; any other end needs [`terminate`].
///
/// Anything left behind is an orphan: a process that became a child of the container's init
/// (PID 1) while `cmd` ran and started after the wrapper. The wrapper notes init's children
/// before `cmd` and looks at the new ones after it with shell builtins only (init's
/// `children` files and `stat` files; no process is started, no environment is read), which
/// is the whole cost when there are none. A new child is not this session's when it is in
/// init's session, or in the session of another exec's main process (a live process whose
/// parent is outside the container); every exec is a session leader, and a process of this
/// session that called `setsid` leads a session whose leader's parent is inside. A new child
/// that vanished or died during a look may have handed off to a child of its own, so the
/// wrapper looks again, up to three times. Otherwise — something found, still moving, a
/// `stat` it cannot parse, no `children` file, or the host's PID namespace (the wrapper's
/// parent is then visible, and orphans may go elsewhere) — it starts the end script in the
/// background, without the marker, with its output closed so the stream ends at once,
/// ignoring the SIGHUP the terminal sends when the wrapper, its session leader, exits. (A
/// leftover that reuses the PID of one of init's earlier children is missed: that takes the
/// container's PIDs wrapping around during the session.) Under an init that never reaps, its
/// children only ever grow at the end of the list, so only the new end is looked at.
///
/// With `size` (columns, rows), the wrapper first waits, bounded, until its terminal has that
/// size: for engines without `console_size`, where the size is set after the start.
///
/// Leftovers are ended (TERM, then KILL), or with `hangup` sent SIGHUP once, as a terminal
/// hangup would; either way the person is told on stderr how many, and which.
pub fn cleaning_up_after(cmd: Vec<String>, size: Option<(u32, u32)>, hangup: bool) -> Vec<String> {
    let size = size.map_or_else(String::new, |(cols, rows)| format!("{rows} {cols}"));
    let leftovers = if hangup { "hangup" } else { "end" };
    [
        "sh",
        "-c",
        WRAPPER_SCRIPT,
        "benchgate-session",
        END_SCRIPT,
        &size,
        leftovers,
    ]
    .into_iter()
    .map(String::from)
    .chain(cmd)
    .collect()
}

/// Ends every process in `container` whose environment holds `MARKER_VAR=marker` (see
/// `end.sh`), through a separate exec as the session's `user`, so it works for remote
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
    let finished = tokio::time::timeout(END_SCRIPT_WAIT, stream.read_to_end(&mut sink)).await;
    let code = match finished {
        Ok(_) => exit_code(endpoint, &created.id).await?,
        Err(_) => None,
    };
    match code {
        Some(0) => Ok(()),
        code => Err(Error::Api {
            endpoint: endpoint.url.clone(),
            op: "exec_teardown",
            reason: code.map_or_else(
                || "the end script did not finish".to_owned(),
                |c| format!("the end script exited {c}: processes are left"),
            ),
        }),
    }
}

/// How long the end script may take (it gives up after about 3 s of looking).
const END_SCRIPT_WAIT: Duration = Duration::from_secs(10);

/// Largest write to the client: one SSH data packet of the usual 32 KiB maximum.
pub const CHUNK_BYTES: usize = 32 * 1024;

/// Copies Docker's multiplexed stream (8-byte frame headers: stream, 0, 0, 0, u32 length)
/// to `stdout` and `stderr`, returning the payload bytes copied. Reads are buffered and
/// consecutive frames of one stream are joined into writes of up to [`CHUNK_BYTES`] (the
/// engine often frames 4-20 KiB at a time, and every write becomes an SSH packet); what is
/// gathered is written out before waiting for more input, so nothing is held back.
pub async fn demux(
    input: impl AsyncRead + Unpin,
    mut stdout: impl AsyncWrite + Unpin,
    mut stderr: impl AsyncWrite + Unpin,
) -> std::io::Result<u64> {
    let mut input = BufReader::with_capacity(2 * CHUNK_BYTES, input);
    let (mut header, mut header_len) = ([0u8; 8], 0usize);
    let (mut stream, mut left) = (1u8, 0usize);
    let mut gathered: Vec<u8> = Vec::with_capacity(CHUNK_BYTES);
    let mut total = 0u64;
    loop {
        if input.buffer().is_empty() && !gathered.is_empty() {
            write_out(&mut gathered, stream, &mut stdout, &mut stderr).await?;
        }
        let available = input.fill_buf().await?;
        if available.is_empty() {
            write_out(&mut gathered, stream, &mut stdout, &mut stderr).await?;
            if header_len > 0 || left > 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            return Ok(total);
        }
        let used = if left == 0 {
            let n = (8 - header_len).min(available.len());
            header[header_len..header_len + n].copy_from_slice(&available[..n]);
            header_len += n;
            if header_len == 8 {
                header_len = 0;
                left = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
                let next = if header[0] == 2 { 2 } else { 1 };
                if next != stream {
                    write_out(&mut gathered, stream, &mut stdout, &mut stderr).await?;
                    stream = next;
                }
            }
            n
        } else {
            let n = left.min(available.len()).min(CHUNK_BYTES - gathered.len());
            gathered.extend_from_slice(&available[..n]);
            left -= n;
            total += n as u64;
            n
        };
        input.consume(used);
        if gathered.len() == CHUNK_BYTES {
            write_out(&mut gathered, stream, &mut stdout, &mut stderr).await?;
        }
    }
}

/// Writes and flushes what `demux` gathered of `stream`, and empties it.
async fn write_out(
    gathered: &mut Vec<u8>,
    stream: u8,
    stdout: &mut (impl AsyncWrite + Unpin),
    stderr: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<()> {
    if gathered.is_empty() {
        return Ok(());
    }
    if stream == 2 {
        stderr.write_all(gathered).await?;
        stderr.flush().await?;
    } else {
        stdout.write_all(gathered).await?;
        stdout.flush().await?;
    }
    gathered.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_gets_the_end_script_then_the_command() {
        assert!(END_SCRIPT.contains(&format!("\"{MARKER_VAR}=$1\"")));
        assert!(WRAPPER_SCRIPT.contains(&format!("marker=${MARKER_VAR}\nunset {MARKER_VAR}\n")));
        let wrapped = cleaning_up_after(vec!["true".into()], Some((80, 24)), true);
        assert_eq!(wrapped[2], WRAPPER_SCRIPT);
        assert_eq!(wrapped[4], END_SCRIPT);
        assert_eq!(wrapped[5], "24 80");
        assert_eq!(wrapped[6], "hangup");
        assert_eq!(wrapped.last().map(String::as_str), Some("true"));
    }

    #[test]
    fn the_scripts_parse() {
        for script in ["wrapper.sh", "end.sh"] {
            let path = format!("{}/src/docker/{script}", env!("CARGO_MANIFEST_DIR"));
            let out = std::process::Command::new("sh")
                .args(["-n", &path])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
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
    async fn demux_joins_small_frames_into_chunks_and_keeps_streams_apart() {
        let mut input = Vec::new();
        for i in 0..20u8 {
            input.extend(frame(1, &[i; 4096]));
        }
        input.extend(frame(2, b"late"));
        input.extend(frame(1, b"tail"));
        // A writer that records each write it gets.
        let (mut writes, mut err) = (Vec::<Vec<u8>>::new(), Vec::new());
        struct Writes<'a>(&'a mut Vec<Vec<u8>>);
        impl AsyncWrite for Writes<'_> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                self.0.push(buf.to_vec());
                std::task::Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        let total = demux(&input[..], Writes(&mut writes), &mut err)
            .await
            .unwrap();
        assert_eq!(total, 20 * 4096 + 8);
        assert_eq!(err, b"late");
        // 21 frames on stdout, written in a few writes of at most one chunk (the buffer runs
        // dry every 64 KiB, which flushes what was gathered).
        let sizes: Vec<usize> = writes.iter().map(Vec::len).collect();
        assert!(sizes.len() <= 5, "{sizes:?}");
        assert!(sizes.iter().all(|n| *n <= CHUNK_BYTES), "{sizes:?}");
        assert_eq!(sizes[0], CHUNK_BYTES);
        let joined: Vec<u8> = writes.concat();
        assert_eq!(&joined[..20 * 4096], &input_payload()[..]);
        assert_eq!(&joined[20 * 4096..], b"tail");

        fn input_payload() -> Vec<u8> {
            (0..20u8).flat_map(|i| [i; 4096]).collect()
        }
    }

    #[tokio::test]
    async fn demux_reports_a_truncated_frame() {
        let mut input = frame(1, b"hello");
        input.truncate(10);
        assert!(demux(&input[..], Vec::new(), Vec::new()).await.is_err());
    }
}
