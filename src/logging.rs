//! Log output: text or JSON lines to stderr, plus the layer that reads russh's own verdicts.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
use crate::ssh::prechecks;

/// Default filter when `RUST_LOG` is unset: russh's own warnings repeat what benchgate logs
/// with more context.
pub const DEFAULT_FILTER: &str = "info,russh=error";

/// Installs the global subscriber; a second call (as in tests) keeps the first one.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let output = match format {
        // Colour only for a person at a terminal: never into files or the journal.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // A panic ends only its task (a connection or a session); say so in the log, with where.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "a task panicked; its connection or session ended");
    }));
    let _ = tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .with(prechecks::layer())
        .try_init();
}
