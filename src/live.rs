//! Live sessions: what each running session is, its traffic, and the handles operators use
//! through the admin socket to end it or watch its terminal.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::Activity;

/// How much recent terminal output a session keeps for a watcher's first screen.
pub const RECENT_BYTES: usize = 64 * 1024;
/// Frames queued for one watcher; past that, output to it is dropped (and counted) rather
/// than slowing the session.
const WATCH_QUEUE: usize = 64;
/// Lines told to the person by the admin side, waiting for the session to write them.
const NOTES_QUEUE: usize = 4;
/// Sequences after which a terminal's screen is drawn anew: clear screen, reset, and the
/// switch to the alternate screen full-screen programs make.
const SCREEN_STARTS: [&[u8]; 4] = [b"\x1b[2J", b"\x1bc", b"\x1b[?1049h", b"\x1b[?47h"];
/// How many of the last bytes written a session keeps for its end (the wrapper's last line).
const TAIL_BYTES: usize = 512;

/// What a session is, fixed when it starts.
#[derive(Debug, Clone)]
pub struct About {
    /// The session's id (also in its recording's file name and in the audit).
    pub id: String,
    /// The bench.
    pub bench: String,
    /// The container's full ID.
    pub container: String,
    /// The Docker endpoint's URL.
    pub endpoint: String,
    /// The certificate's key ID (untrusted text).
    pub key_id: String,
    /// The certificate's serial.
    pub serial: u64,
    /// The CA's fingerprint.
    pub ca: String,
    /// The client's address.
    pub peer: SocketAddr,
    /// "shell" or "exec".
    pub kind: &'static str,
    /// The command run, if the client or the certificate named one (untrusted text).
    pub command: Option<String>,
    /// The terminal's size, for a terminal session.
    pub tty: Option<(u32, u32)>,
    /// When it started.
    pub started: SystemTime,
    /// The certificate's `valid_before`, Unix seconds.
    pub valid_before: u64,
}

/// One running session.
#[derive(Debug)]
pub struct Live {
    /// What it is.
    pub about: About,
    activity: Activity,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    tail: Mutex<Vec<u8>>,
    end: CancellationToken,
    /// The operator's reason, once an operator ended it.
    operator: Mutex<Option<String>>,
    /// Why it ended, once it has: its processes are being ended.
    ended: Mutex<Option<String>>,
    /// Its processes may have outlived it: the teardown gave up.
    left_running: AtomicBool,
    gone: CancellationToken,
    screen: Option<Mutex<Screen>>,
    notes: mpsc::Sender<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Live {
    /// Counts `n` bytes from the client.
    pub fn received(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Counts bytes that went to the client, keeping the last of them.
    pub fn sent(&self, written: &[u8]) {
        self.bytes_out
            .fetch_add(written.len() as u64, Ordering::Relaxed);
        self.touch();
        let mut tail = lock(&self.tail);
        tail.extend_from_slice(&written[written.len().saturating_sub(TAIL_BYTES)..]);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }

    /// Terminal output that went to the client: kept for new watchers and copied to those
    /// watching (never waiting for them).
    pub fn output(&self, written: &[u8]) {
        if let Some(screen) = &self.screen {
            lock(screen).output(written);
        }
    }

    /// The terminal was resized.
    pub fn resized(&self, cols: u32, rows: u32) {
        if let Some(screen) = &self.screen {
            lock(screen).resized(cols, rows);
        }
    }

    fn touch(&self) {
        self.activity.touch();
    }

    /// How long since bytes last went either way.
    pub fn idle_for(&self) -> Duration {
        self.activity.idle_for()
    }

    /// Bytes from the client, bytes to the client.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }

    /// The last bytes written to the client (at most 512).
    pub fn tail(&self) -> Vec<u8> {
        lock(&self.tail).clone()
    }

    /// Asks the session to end because an operator said so, for `reason` (told to the
    /// person); `false` when it was already asked.
    pub fn end_by_operator(&self, reason: &str) -> bool {
        let mut operator = lock(&self.operator);
        if operator.is_some() {
            return false;
        }
        *operator = Some(reason.to_owned());
        self.end.cancel();
        true
    }

    /// Resolves with the operator's reason once an operator ended the session.
    pub async fn ended_by_operator(&self) -> String {
        self.end.cancelled().await;
        lock(&self.operator).clone().unwrap_or_default()
    }

    /// Why the session ended, once it has (its processes may still be ending).
    pub fn ended(&self) -> Option<String> {
        lock(&self.ended).clone()
    }

    /// Whether the session's processes may have outlived it (its teardown gave up).
    pub fn left_running(&self) -> bool {
        self.left_running.load(Ordering::Relaxed)
    }

    /// Resolves once the session is over (no longer listed).
    pub async fn gone(&self) {
        self.gone.cancelled().await;
    }

    /// Asks the session to tell the person `line` on stderr; dropped if lines queue up.
    pub fn tell(&self, line: String) {
        let _ = self.notes.try_send(line);
    }

    /// A new watcher of the terminal: the recent output that redraws the screen, the
    /// terminal's size, and what comes from now on. `None` for a session without a terminal.
    pub fn watch(&self) -> Option<Watching> {
        let mut screen = lock(self.screen.as_ref()?);
        let (frames, receiver) = mpsc::channel(WATCH_QUEUE);
        screen.watchers.push(Watcher { frames, dropped: 0 });
        let first = !screen.watched;
        screen.watched = true;
        Some(Watching {
            recent: screen.replay(),
            size: screen.size,
            frames: receiver,
            first,
        })
    }
}

/// A new watcher's start.
#[derive(Debug)]
pub struct Watching {
    /// The recent output, from the last full redraw where one was seen.
    pub recent: Vec<u8>,
    /// The terminal's size (columns, rows).
    pub size: (u32, u32),
    /// What the session writes from now on; ends with the session.
    pub frames: mpsc::Receiver<Frame>,
    /// The session's first watcher ever.
    pub first: bool,
}

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Terminal output.
    Output(Bytes),
    /// This many bytes were not copied because the watcher fell behind.
    Dropped(u64),
    /// The terminal's new size.
    Resized(u32, u32),
    /// The session ended, for this reason.
    Ended(String),
}

#[derive(Debug)]
struct Screen {
    /// The last [`RECENT_BYTES`] of output at most, from the last redraw when one was seen.
    recent: VecDeque<u8>,
    /// Whether older output was dropped from `recent` to keep it bounded.
    cut: bool,
    size: (u32, u32),
    watchers: Vec<Watcher>,
    watched: bool,
}

#[derive(Debug)]
struct Watcher {
    frames: mpsc::Sender<Frame>,
    dropped: u64,
}

impl Watcher {
    /// Queues `frame` (of `size` bytes) without waiting; `false` once the watcher is gone.
    fn offer(&mut self, frame: Frame, size: usize) -> bool {
        use mpsc::error::TrySendError;
        if self.dropped > 0 {
            match self.frames.try_send(Frame::Dropped(self.dropped)) {
                Ok(()) => self.dropped = 0,
                Err(TrySendError::Full(_)) => {
                    self.dropped += size as u64;
                    return true;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        match self.frames.try_send(frame) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped += size as u64;
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

impl Screen {
    fn output(&mut self, written: &[u8]) {
        // From the last full redraw on, the earlier output no longer shows.
        match last_screen_start(written) {
            Some(at) => {
                self.recent.clear();
                self.cut = false;
                // The redraw may rely on a cursor moved home before it.
                self.recent.extend(b"\x1b[H");
                self.recent.extend(&written[at..]);
            }
            None => self.recent.extend(written),
        }
        if self.recent.len() > RECENT_BYTES {
            self.recent.drain(..self.recent.len() - RECENT_BYTES);
            self.cut = true;
        }
        if !self.watchers.is_empty() {
            let chunk = Bytes::copy_from_slice(written);
            self.watchers
                .retain_mut(|w| w.offer(Frame::Output(chunk.clone()), written.len()));
        }
    }

    fn resized(&mut self, cols: u32, rows: u32) {
        self.size = (cols, rows);
        self.watchers
            .retain_mut(|w| w.offer(Frame::Resized(cols, rows), 0));
    }

    fn ended(&mut self, reason: &str) {
        for mut watcher in self.watchers.drain(..) {
            watcher.offer(Frame::Ended(reason.to_owned()), 0);
        }
    }

    /// The recent output for a new watcher: when older output was dropped, from the first
    /// line's start on, so no escape sequence is cut in two.
    fn replay(&self) -> Vec<u8> {
        let (front, back) = self.recent.as_slices();
        let recent = [front, back].concat();
        match memchr::memchr(b'\n', &recent) {
            Some(at) if self.cut => recent[at + 1..].to_vec(),
            _ => recent,
        }
    }
}

/// Where the last sequence that starts a new screen begins in `output`.
fn last_screen_start(output: &[u8]) -> Option<usize> {
    memchr::memrchr_iter(0x1b, output).find(|&at| {
        SCREEN_STARTS
            .iter()
            .any(|seq| output[at..].starts_with(seq))
    })
}

type Sessions = Arc<Mutex<BTreeMap<String, Arc<Live>>>>;

/// Every live session, by id.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Sessions,
}

impl Registry {
    /// Lists a session that just started until the returned handle is dropped; the receiver
    /// gets the lines the admin side asks the session to tell the person.
    pub fn add(&self, about: About) -> (Listed, mpsc::Receiver<String>) {
        let (notes, told) = mpsc::channel(NOTES_QUEUE);
        let live = Arc::new(Live {
            screen: about.tty.map(|size| {
                Mutex::new(Screen {
                    recent: VecDeque::new(),
                    cut: false,
                    size,
                    watchers: Vec::new(),
                    watched: false,
                })
            }),
            about,
            activity: Activity::default(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            tail: Mutex::new(Vec::new()),
            end: CancellationToken::new(),
            operator: Mutex::new(None),
            ended: Mutex::new(None),
            left_running: AtomicBool::new(false),
            gone: CancellationToken::new(),
            notes,
        });
        lock(&self.sessions).insert(live.about.id.clone(), live.clone());
        (
            Listed {
                live,
                sessions: self.sessions.clone(),
            },
            told,
        )
    }

    /// The live sessions, oldest id first.
    pub fn all(&self) -> Vec<Arc<Live>> {
        lock(&self.sessions).values().cloned().collect()
    }

    /// The session with this id, if it is live.
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        lock(&self.sessions).get(id).cloned()
    }
}

/// A session's place in the [`Registry`], given up when dropped (once its processes are gone).
#[derive(Debug)]
pub struct Listed {
    live: Arc<Live>,
    sessions: Sessions,
}

impl Listed {
    /// The listed session.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The session ended for `reason` (its processes may still be ending); its watchers are
    /// told.
    pub fn ended(&self, reason: &str) {
        *lock(&self.live.ended) = Some(reason.to_owned());
        if let Some(screen) = &self.live.screen {
            lock(screen).ended(reason);
        }
    }

    /// Its teardown gave up: processes may be left.
    pub fn left_running(&self) {
        self.live.left_running.store(true, Ordering::Relaxed);
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut sessions = lock(&self.sessions);
        if sessions
            .get(&self.live.about.id)
            .is_some_and(|listed| Arc::ptr_eq(listed, &self.live))
        {
            sessions.remove(&self.live.about.id);
        }
        drop(sessions);
        if let Some(screen) = &self.live.screen {
            lock(screen).watchers.clear();
        }
        self.live.gone.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn about(id: &str, tty: bool) -> About {
        About {
            id: id.into(),
            bench: "shop".into(),
            container: "c".into(),
            endpoint: "unix:///var/run/docker.sock".into(),
            key_id: "k".into(),
            serial: 1,
            ca: "SHA256:x".into(),
            peer: "127.0.0.1:1".parse().expect("addr"),
            kind: "shell",
            command: None,
            tty: tty.then_some((80, 24)),
            started: SystemTime::now(),
            valid_before: 0,
        }
    }

    #[test]
    fn a_session_is_listed_while_its_handle_lives() {
        let registry = Registry::default();
        let (listed, _) = registry.add(about("a", false));
        assert!(registry.get("a").is_some());
        assert!(
            listed.live().watch().is_none(),
            "no terminal, nothing to watch"
        );
        drop(listed);
        assert!(registry.get("a").is_none());
        assert!(registry.all().is_empty());
    }

    #[test]
    fn recent_output_starts_at_the_last_redraw_and_is_bounded() {
        let registry = Registry::default();
        let (listed, _) = registry.add(about("a", true));
        let live = listed.live();
        live.output(b"old line\r\n");
        live.output(b"x\x1b[2Jnew screen\r\n");
        assert_eq!(
            live.watch().expect("tty").recent,
            b"\x1b[H\x1b[2Jnew screen\r\n"
        );
        let line = [b'y'; 99];
        for _ in 0..2000 {
            live.output(&line);
            live.output(b"\n");
        }
        let recent = live.watch().expect("tty").recent;
        assert!(recent.len() <= RECENT_BYTES, "{}", recent.len());
        assert!(recent.len() > RECENT_BYTES - 100, "{}", recent.len());
        assert_eq!(recent[0], b'y', "cut at a line's start");
    }

    /// A watcher that reads nothing never slows the session: output to it is dropped and
    /// counted, and it learns how much once it reads again.
    #[test]
    fn a_slow_watcher_loses_output_and_is_told() {
        let registry = Registry::default();
        let (listed, _) = registry.add(about("a", true));
        let live = listed.live();
        let mut watching = live.watch().expect("tty");
        assert!(watching.first);
        assert!(!live.watch().expect("tty").first);
        for _ in 0..WATCH_QUEUE + 10 {
            live.output(b"0123456789");
        }
        for _ in 0..WATCH_QUEUE {
            assert!(matches!(watching.frames.try_recv(), Ok(Frame::Output(_))));
        }
        assert!(watching.frames.try_recv().is_err());
        live.output(b"next");
        assert_eq!(watching.frames.try_recv(), Ok(Frame::Dropped(100)));
        assert_eq!(
            watching.frames.try_recv(),
            Ok(Frame::Output(Bytes::from_static(b"next")))
        );
        listed.ended("exited");
        assert_eq!(
            watching.frames.try_recv(),
            Ok(Frame::Ended("exited".into()))
        );
        drop(listed);
        assert!(watching.frames.try_recv().is_err());
    }

    #[tokio::test]
    async fn an_operator_end_is_asked_once() {
        let registry = Registry::default();
        let (listed, _) = registry.add(about("a", false));
        let live = listed.live().clone();
        assert!(live.end_by_operator("maintenance"));
        assert!(!live.end_by_operator("again"));
        assert_eq!(live.ended_by_operator().await, "maintenance");
        drop(listed);
        live.gone().await;
    }
}
