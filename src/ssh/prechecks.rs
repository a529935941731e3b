//! Rejections russh makes before any handler runs (validity window, CA signature), read from
//! its log and tied to their connection through the tokio task that logged them.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::filter::{Filtered, LevelFilter};
use tracing_subscriber::layer::{Context, Layer};

use crate::auth::Rejection;

/// Receives the rejections russh made for one connection.
pub trait Sink: Send + Sync {
    /// russh refused a certificate for `reason` before the handler saw it.
    fn library_rejected(&self, reason: Rejection);
}

type Registry = Mutex<HashMap<tokio::task::Id, Weak<dyn Sink>>>;

static TASKS: LazyLock<Registry> = LazyLock::new(Default::default);

fn tasks() -> std::sync::MutexGuard<'static, HashMap<tokio::task::Id, Weak<dyn Sink>>> {
    TASKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Ties the tasks that drive one connection to its sink until dropped.
pub struct Watch {
    sink: Weak<dyn Sink>,
    seen: Vec<tokio::task::Id>,
}

impl Watch {
    /// Watches for russh rejections on behalf of `sink`.
    pub fn new(sink: &Arc<dyn Sink>) -> Self {
        Self {
            sink: Arc::downgrade(sink),
            seen: Vec::new(),
        }
    }

    /// Records the current task as one of this connection's; cheap when already known.
    pub fn note_task(&mut self) {
        let Some(id) = tokio::task::try_id() else {
            return;
        };
        if !self.seen.contains(&id) {
            self.seen.push(id);
            tasks().insert(id, self.sink.clone());
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut tasks = tasks();
        for id in &self.seen {
            tasks.remove(id);
        }
    }
}

/// The tracing layer that reads russh's warnings; install it with the subscriber.
pub fn layer<S>() -> Filtered<Prechecks, LevelFilter, S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    Prechecks.with_filter(LevelFilter::WARN)
}

/// See [`layer`].
#[derive(Debug, Clone, Copy)]
pub struct Prechecks;

impl<S: Subscriber> Layer<S> for Prechecks {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if *meta.level() != Level::WARN || !meta.target().starts_with("russh::server") {
            return;
        }
        let mut message = Message::default();
        event.record(&mut message);
        let reason = match message.0.as_str() {
            "Certificate is expired or not yet valid" => Rejection::OutsideValidity,
            "Certificate signature is invalid" => Rejection::BadSignature,
            _ => return,
        };
        let Some(id) = tokio::task::try_id() else {
            return;
        };
        let sink = tasks().get(&id).and_then(Weak::upgrade);
        if let Some(sink) = sink {
            sink.library_rejected(reason);
        }
    }
}

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
