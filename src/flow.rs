//! Client input on its way to a container process, held by us instead of russh's queues:
//! bounded per channel, per connection and in total, and the window throttle that keeps it so.
//!
//! russh re-opens a channel's window as data arrives, not as it is consumed, and awaits a
//! bounded queue per channel from its only connection loop. We take every message out of
//! russh in its handler callbacks (never blocking) into an [`Inbox`]; when input held is over
//! budget, [`Flow::window_target`] shrinks the window russh grants on its next adjust, so a
//! well-behaved client stops sending. One that keeps sending past what it was granted is a
//! protocol violation: [`Inbox::push`] refuses it and the connection ends.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The window russh grants each channel (its default), and what a throttled connection is
/// topped up with instead (a trickle that lets russh ask again soon).
pub const WINDOW_BYTES: u32 = 2 * 1024 * 1024;
const THROTTLED_WINDOW: u32 = 2;
/// What a client may have sent beyond the budget by the time it is throttled: what was left
/// of its window and one more full window granted before the throttle took effect (measured
/// peaks stay near budget + 3 MiB). Twice that, plus packets on the way, is never reached by
/// a client that keeps to its window (a tighter bound was hit once in a loaded test run, cause
/// not found); a client that ignores its window reaches it at once.
const GRANTED_BEYOND_BUDGET: usize = 4 * WINDOW_BYTES as usize + 1024 * 1024;

/// Terminal resizes are passed on at most once per this interval per session (each is a
/// Docker API call); the latest size within it wins, the others are dropped and counted.
pub const RESIZE_INTERVAL: Duration = Duration::from_millis(250);

/// Byte budgets for client input held, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// Per session channel.
    pub per_channel: usize,
    /// Per connection, all its channels.
    pub per_connection: usize,
    /// In all connections.
    pub total: usize,
    /// A session whose held input is over budget and has not moved for this long is stuck.
    pub stuck_after: Duration,
}

/// Input held in all connections.
#[derive(Debug)]
pub struct Pool {
    held: AtomicUsize,
    budgets: Budgets,
}

impl Pool {
    /// An empty pool under `budgets`.
    pub fn new(budgets: Budgets) -> Self {
        Self {
            held: AtomicUsize::new(0),
            budgets,
        }
    }

    /// Bytes held now in all connections.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Input held in one connection, and whether it is throttled.
#[derive(Debug)]
pub struct Flow {
    held: AtomicUsize,
    pool: Arc<Pool>,
    /// The last window target given to russh was the trickle.
    throttled: AtomicBool,
    /// When input was last taken from any of this connection's inboxes (ms since `start`).
    taken_ms: AtomicU64,
    start: Instant,
}

/// How long a throttled connection's input may sit untaken before it counts as stalled.
const STALLED_AFTER: Duration = Duration::from_millis(100);

impl Flow {
    /// A connection's share of `pool`.
    pub fn new(pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            pool,
            throttled: AtomicBool::new(false),
            taken_ms: AtomicU64::new(0),
            start: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the connection is throttled and its input has not moved for a while. Each
    /// trickle top-up of a throttled window costs a round trip with the client; while
    /// nothing moves, the socket slows its writes (see `ssh::connection`) so that those round
    /// trips stay few instead of spinning at the speed of the link.
    pub fn stalled(&self) -> bool {
        self.throttled.load(Ordering::Relaxed)
            && self.held.load(Ordering::Relaxed) > 0
            && self.untaken_for() >= STALLED_AFTER
    }

    /// How long since input was last taken from this connection's inboxes.
    fn untaken_for(&self) -> Duration {
        let ms = self
            .now_ms()
            .saturating_sub(self.taken_ms.load(Ordering::Relaxed));
        Duration::from_millis(ms)
    }

    fn add(&self, n: usize) {
        self.held.fetch_add(n, Ordering::Relaxed);
        self.pool.held.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
        self.pool.held.fetch_sub(n, Ordering::Relaxed);
    }

    fn budgets(&self) -> &Budgets {
        &self.pool.budgets
    }

    /// Whether this connection holds more than its budget, or all of them hold more than
    /// theirs and this one holds some of it (one that holds nothing, an interactive user's,
    /// is not slowed for others' floods).
    fn over_budget(&self) -> bool {
        let held = self.held.load(Ordering::Relaxed);
        held >= self.budgets().per_connection
            || (held > 0 && self.pool.held() >= self.budgets().total)
    }

    /// Whether this connection holds a channel's budget or more and none of it has moved for
    /// `stuck_after`: a process that never reads, or input sent to a channel that never
    /// started one.
    pub fn stuck(&self) -> bool {
        self.held.load(Ordering::Relaxed) >= self.budgets().per_channel
            && self.untaken_for() >= self.budgets().stuck_after
    }

    /// The window russh should top channels up to next (the `adjust_window` hook): the full
    /// window, or a trickle while `inboxes` (this connection's) hold too much.
    pub fn window_target<'a>(&self, mut inboxes: impl Iterator<Item = &'a Inbox>) -> u32 {
        let throttled = self.over_budget() || inboxes.any(Inbox::over_budget);
        self.throttled.store(throttled, Ordering::Relaxed);
        if throttled {
            THROTTLED_WINDOW
        } else {
            WINDOW_BYTES
        }
    }
}

/// What a session takes from its inbox, in the order the client sent it.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// The client's terminal is now this size (columns, rows): at most one per
    /// [`RESIZE_INTERVAL`], the latest sent meanwhile; it comes before data when it is due.
    Resize(u32, u32),
    /// Bytes for the process's stdin.
    Data(Bytes),
    /// The client closed its side (after all its data).
    Eof,
    /// The client closed the channel (after all its data).
    Closed,
}

/// The client sent more than it was ever granted.
#[derive(Debug, thiserror::Error)]
#[error("the client sent {held} bytes on a channel that was granted about {granted}")]
pub struct Violation {
    held: usize,
    granted: usize,
}

#[derive(Debug)]
struct Held {
    chunks: VecDeque<Bytes>,
    bytes: usize,
    eof: bool,
    eof_taken: bool,
    closed: bool,
    size: Option<(u32, u32)>,
    /// When the next resize may be passed on.
    resize_at: Option<Instant>,
}

/// One session channel's input, from the handler to the session.
#[derive(Debug)]
pub struct Inbox {
    held: Mutex<Held>,
    ready: Notify,
    flow: Arc<Flow>,
    closed: CancellationToken,
}

impl Inbox {
    /// An empty inbox counted in `flow`.
    pub fn new(flow: Arc<Flow>) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::new(Held {
                chunks: VecDeque::new(),
                bytes: 0,
                eof: false,
                eof_taken: false,
                closed: false,
                size: None,
                resize_at: None,
            }),
            ready: Notify::new(),
            flow,
            closed: CancellationToken::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `data` from the client; refuses it when the client sent more than it was granted.
    pub fn push(&self, data: &[u8]) -> Result<(), Violation> {
        let mut held = self.lock();
        let limit = self.flow.budgets().per_channel + GRANTED_BEYOND_BUDGET;
        if held.bytes + data.len() > limit {
            return Err(Violation {
                held: held.bytes + data.len(),
                granted: limit,
            });
        }
        if held.closed || data.is_empty() {
            return Ok(());
        }
        held.chunks.push_back(Bytes::copy_from_slice(data));
        held.bytes += data.len();
        self.flow.add(data.len());
        drop(held);
        self.ready.notify_one();
        Ok(())
    }

    /// The client sent EOF.
    pub fn eof(&self) {
        self.lock().eof = true;
        self.ready.notify_one();
    }

    /// The client closed the channel: the session ends.
    /// What it still held is dropped (the session is over) and no longer counts.
    pub fn close(&self) {
        let mut held = self.lock();
        held.closed = true;
        held.chunks.clear();
        self.flow.sub(std::mem::take(&mut held.bytes));
        drop(held);
        self.closed.cancel();
        self.ready.notify_one();
    }

    /// The client's terminal is now `cols` x `rows` (the latest size wins).
    pub fn resize(&self, cols: u32, rows: u32) {
        if self.lock().size.replace((cols, rows)).is_some() {
            crate::metrics::resize_dropped();
        }
        self.ready.notify_one();
    }

    /// Whether the channel is closed (by the client, or its session ended).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves once the client closed the channel.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// The next input, waiting for it.
    pub async fn next(&self) -> Input {
        loop {
            let resize_at = {
                let mut held = self.lock();
                let now = Instant::now();
                if held.resize_at.is_none_or(|at| at <= now) {
                    if let Some((cols, rows)) = held.size.take() {
                        held.resize_at = Some(now + RESIZE_INTERVAL);
                        return Input::Resize(cols, rows);
                    }
                }
                if let Some(chunk) = held.chunks.pop_front() {
                    held.bytes -= chunk.len();
                    self.flow.sub(chunk.len());
                    self.flow
                        .taken_ms
                        .store(self.flow.now_ms(), Ordering::Relaxed);
                    return Input::Data(chunk);
                }
                if held.eof && !held.eof_taken {
                    held.eof_taken = true;
                    return Input::Eof;
                }
                if held.closed {
                    return Input::Closed;
                }
                held.resize_at.filter(|_| held.size.is_some())
            };
            match resize_at {
                Some(at) => {
                    tokio::select! {
                        () = self.ready.notified() => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.ready.notified().await,
            }
        }
    }

    /// Whether this channel holds more than its budget.
    fn over_budget(&self) -> bool {
        self.lock().bytes >= self.flow.budgets().per_channel
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let bytes = self.lock().bytes;
        self.flow.sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> Budgets {
        Budgets {
            per_channel: 100,
            per_connection: 150,
            total: 1000,
            stuck_after: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resizes_are_passed_on_a_few_times_a_second_and_the_last_size_wins() {
        let inbox = Inbox::new(Flow::new(Arc::new(Pool::new(budgets()))));
        inbox.resize(80, 24);
        assert_eq!(inbox.next().await, Input::Resize(80, 24));
        let start = Instant::now();
        for cols in 1..=20_000 {
            inbox.resize(cols, 50);
        }
        inbox.push(b"typed").unwrap();
        // Input is not held back by a resize that is not due yet.
        assert_eq!(
            inbox.next().await,
            Input::Data(Bytes::from_static(b"typed"))
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(inbox.next().await, Input::Resize(20_000, 50));
        assert_eq!(start.elapsed(), RESIZE_INTERVAL);
        inbox.close();
        assert_eq!(inbox.next().await, Input::Closed);
    }

    #[tokio::test]
    async fn input_comes_out_in_order_and_frees_its_budget() {
        let pool = Arc::new(Pool::new(budgets()));
        let flow = Flow::new(pool.clone());
        let inbox = Inbox::new(flow.clone());
        inbox.push(b"ab").unwrap();
        inbox.resize(80, 24);
        inbox.resize(100, 30);
        inbox.eof();
        inbox.push(b"cd").unwrap();
        assert_eq!(pool.held(), 4);
        assert_eq!(inbox.next().await, Input::Resize(100, 30));
        assert_eq!(inbox.next().await, Input::Data(Bytes::from_static(b"ab")));
        assert_eq!(inbox.next().await, Input::Data(Bytes::from_static(b"cd")));
        assert_eq!(inbox.next().await, Input::Eof);
        assert_eq!(pool.held(), 0);
        inbox.close();
        assert_eq!(inbox.next().await, Input::Closed);
    }

    #[tokio::test]
    async fn closing_drops_what_was_held() {
        let pool = Arc::new(Pool::new(budgets()));
        let inbox = Inbox::new(Flow::new(pool.clone()));
        inbox.push(b"abc").unwrap();
        inbox.close();
        assert_eq!(pool.held(), 0);
        inbox.push(b"more").unwrap();
        assert_eq!(pool.held(), 0);
        assert_eq!(inbox.next().await, Input::Closed);
    }

    #[tokio::test]
    async fn the_window_shrinks_over_budget_and_comes_back() {
        let pool = Arc::new(Pool::new(budgets()));
        let flow = Flow::new(pool.clone());
        let (a, b) = (Inbox::new(flow.clone()), Inbox::new(flow.clone()));
        let target = |f: &Flow| f.window_target([&*a, &*b].into_iter());
        assert_eq!(target(&flow), WINDOW_BYTES);
        a.push(&[0; 99]).unwrap();
        assert_eq!(target(&flow), WINDOW_BYTES);
        a.push(&[0; 1]).unwrap();
        assert_eq!(target(&flow), THROTTLED_WINDOW, "channel budget");
        let _ = a.next().await;
        assert_eq!(target(&flow), WINDOW_BYTES);
        a.push(&[0; 80]).unwrap();
        b.push(&[0; 80]).unwrap();
        assert_eq!(target(&flow), THROTTLED_WINDOW, "connection budget");
        drop(b);
        assert_eq!(pool.held(), 81);
    }

    #[test]
    fn more_than_was_granted_is_a_violation() {
        let flow = Flow::new(Arc::new(Pool::new(budgets())));
        let inbox = Inbox::new(flow);
        let chunk = vec![0u8; 32 * 1024];
        let mut sent = 0;
        let refused = loop {
            match inbox.push(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(violation) => break violation,
            }
        };
        assert!(sent >= GRANTED_BEYOND_BUDGET, "{sent}");
        assert!(refused.held > 100 + GRANTED_BEYOND_BUDGET);
    }

    #[tokio::test(start_paused = true)]
    async fn held_input_that_does_not_move_is_stuck() {
        let pool = Arc::new(Pool::new(budgets()));
        let flow = Flow::new(pool);
        let inbox = Inbox::new(flow.clone());
        inbox.push(&[0; 100]).unwrap();
        assert!(!flow.stuck());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(flow.stuck());
        let _ = inbox.next().await;
        assert!(!flow.stuck());
    }

    #[test]
    fn a_full_pool_slows_only_connections_that_hold_input() {
        let pool = Arc::new(Pool::new(Budgets {
            total: 100,
            ..budgets()
        }));
        let (flooding, idle) = (Flow::new(pool.clone()), Flow::new(pool.clone()));
        let flood = Inbox::new(flooding.clone());
        flood.push(&[0; 60]).unwrap();
        let other = Inbox::new(Flow::new(pool.clone()));
        other.push(&[0; 40]).unwrap();
        assert_eq!(
            flooding.window_target([&*flood].into_iter()),
            THROTTLED_WINDOW
        );
        assert_eq!(idle.window_target(std::iter::empty()), WINDOW_BYTES);
    }
}
