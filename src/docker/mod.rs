//! The Docker side: everything that touches bollard or the Engine API lives here.

pub mod benches;
pub mod endpoint;
pub mod exec;
pub mod session;

pub use benches::{short, Bench, Conflicts, Index, Lookup};
pub use endpoint::Endpoint;
pub use session::{Plan, Session};

/// A Docker failure a session reports to its user and the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine cannot be reached or answered with a transport error.
    #[error("Docker engine {endpoint} is unreachable: {reason}")]
    Unreachable {
        /// The endpoint URL.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The engine did not answer within `docker.request_timeout`.
    #[error("Docker engine {endpoint} did not answer in time ({op})")]
    Timeout {
        /// The endpoint URL.
        endpoint: String,
        /// The operation.
        op: &'static str,
    },
    /// The engine answered with an error.
    #[error("Docker engine {endpoint} refused {op}: {reason}")]
    Api {
        /// The endpoint URL.
        endpoint: String,
        /// The operation.
        op: &'static str,
        /// Its message.
        reason: String,
    },
    /// The endpoint's configuration cannot be used.
    #[error("docker endpoint {endpoint}: {reason}")]
    Config {
        /// The endpoint URL.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// The bounded `op` label for `benchgate_docker_errors_total`.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } | Self::Config { .. } => "connect",
            Self::Timeout { op, .. } | Self::Api { op, .. } => op,
        }
    }
}
