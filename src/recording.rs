//! Session recordings: PTY output and resizes as asciicast v2 files (`asciinema play`).
//! A recording that fails is logged and counted and stops; the session goes on.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

/// Largest recording kept; past it the recording stops (a `yes` must not fill the disk).
pub const MAX_RECORDING_BYTES: u64 = 64 * 1024 * 1024;

/// One session's recording.
pub struct Recorder {
    path: PathBuf,
    file: Option<Box<dyn Write + Send>>,
    written: u64,
    started: Instant,
    /// Bytes of a UTF-8 sequence cut at the end of the last chunk.
    carry: Vec<u8>,
}

impl Recorder {
    /// Starts `<dir>/<bench>-<unix time>-<id>.cast` (mode 0600) for a `cols`x`rows` terminal.
    pub fn create(
        dir: &Path,
        bench: &str,
        id: &str,
        cols: u32,
        rows: u32,
        term: &str,
        title: &str,
    ) -> std::io::Result<Self> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let path = dir.join(format!("{bench}-{now}-{id}.cast"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Self::writing_to(
            path,
            Box::new(BufWriter::new(file)),
            now,
            cols,
            rows,
            term,
            title,
        )
    }

    /// Starts a recording written to `file` (`path` names it in logs); `now` is the Unix time
    /// in its header.
    pub fn writing_to(
        path: PathBuf,
        mut file: Box<dyn Write + Send>,
        now: u64,
        cols: u32,
        rows: u32,
        term: &str,
        title: &str,
    ) -> std::io::Result<Self> {
        let header = json!({
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": now,
            "title": title,
            "env": { "TERM": term },
        });
        writeln!(file, "{header}")?;
        Ok(Self {
            path,
            file: Some(file),
            written: 0,
            started: Instant::now(),
            carry: Vec::new(),
        })
    }

    /// Where it is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records terminal output. A UTF-8 sequence cut at the end of `bytes` is kept for the
    /// next call; invalid bytes become U+FFFD, so the text recorded is the lossy decoding of
    /// all output, however it was cut into chunks.
    pub fn output(&mut self, bytes: &[u8]) {
        self.carry.extend_from_slice(bytes);
        let mut text = String::new();
        let mut rest = &self.carry[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    text.push_str(&String::from_utf8_lossy(valid));
                    let Some(bad) = e.error_len() else {
                        // An incomplete sequence at the end: keep it for the next chunk.
                        rest = after;
                        break;
                    };
                    text.push(char::REPLACEMENT_CHARACTER);
                    rest = &after[bad..];
                }
            }
        }
        self.carry = rest.to_vec();
        self.event("o", &text);
    }

    /// Records a terminal resize.
    pub fn resize(&mut self, cols: u32, rows: u32) {
        self.event("r", &format!("{cols}x{rows}"));
    }

    /// Writes what is buffered; called at the end of the session.
    pub fn finish(&mut self) {
        if !self.carry.is_empty() {
            self.carry.clear();
            self.event("o", "\u{fffd}");
        }
        if let Some(mut file) = self.file.take() {
            if let Err(e) = file.flush() {
                self.failed(&e);
            }
        }
    }

    fn event(&mut self, kind: &str, data: &str) {
        if data.is_empty() {
            return;
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let line = json!([self.started.elapsed().as_secs_f64(), kind, data]).to_string();
        self.written += line.len() as u64 + 1;
        if let Err(e) = writeln!(file, "{line}") {
            self.file = None;
            self.failed(&e);
        } else if self.written > MAX_RECORDING_BYTES {
            // Nothing more is recorded, a cut sequence included.
            self.carry.clear();
            self.finish();
            self.failed(&std::io::Error::other("size limit reached"));
        }
    }

    fn failed(&self, e: &std::io::Error) {
        crate::metrics::recording_failed();
        tracing::warn!(path = %self.path.display(), error = %e, "session recording stopped");
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_has_header_output_and_resizes_with_utf8_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut recorder =
            Recorder::create(dir.path(), "shop", "ab12", 100, 30, "xterm", "shop alice").unwrap();
        let text = "h\u{e9}llo \u{2603}\r\n";
        let bytes = text.as_bytes();
        // Cut inside the snowman's three bytes.
        let cut = text.find('\u{2603}').unwrap() + 1;
        recorder.output(&bytes[..cut]);
        recorder.output(&bytes[cut..]);
        recorder.resize(120, 40);
        recorder.output(b"\xff\n");
        let path = recorder.path().to_owned();
        drop(recorder);
        let cast = std::fs::read_to_string(path).unwrap();
        let lines: Vec<serde_json::Value> = cast
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(
            (lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
            (Some(100), Some(30))
        );
        let output: String = lines[1..]
            .iter()
            .filter(|e| e[1] == "o")
            .map(|e| e[2].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(output, format!("{text}\u{fffd}\n"));
        assert!(lines.iter().any(|e| e[1] == "r" && e[2] == "120x40"));
    }
}
