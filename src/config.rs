//! The TOML configuration: schema, defaults, typed values and errors that name file and line.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where `serve` and `check-config` look when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/benchgate/benchgate.toml";

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: listeners, host keys and connection limits.
    pub server: Server,
    /// `[auth]`: certificate trust and policy.
    pub auth: Auth,
    /// `[docker]`: the engines and how benches are found on them.
    pub docker: Docker,
    /// `[session]`: what a session runs inside the bench container.
    pub session: Session,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: Metrics,
    /// `[log]`: log format and audit trail.
    pub log: Log,
    /// `[admin]`: the admin socket (`benchgate sessions`).
    pub admin: Admin,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Addresses to accept SSH connections on.
    pub listen: NonEmpty<SocketAddr>,
    /// Host private keys; a missing one is created (ed25519, mode 0600).
    pub host_keys: NonEmpty<PathBuf>,
    /// The whole pre-authentication phase, banner included.
    pub login_grace_time: Span,
    /// Failed authentication attempts before the connection is closed.
    pub max_auth_tries: NonZeroU32,
    /// Unauthenticated connections at once.
    pub max_startups: NonZeroU32,
    /// Unauthenticated connections at once from one source address.
    pub max_startups_per_source: NonZeroU32,
    /// Connections at once, authenticated or not.
    pub max_connections: NonZeroU32,
    /// Authenticated connections at once with one certificate key: one person cannot hold
    /// every place of `max_connections`.
    pub max_connections_per_key: NonZeroU32,
    /// Channels one connection may have open at once.
    pub max_sessions_per_connection: NonZeroU32,
    /// Interval of SSH keepalives to a silent client; 0 = off.
    pub keepalive_interval: Span,
    /// End sessions with no traffic either way for this long; 0 = off.
    pub idle_timeout: Span,
    /// How long shutdown waits for sessions to finish.
    pub shutdown_grace: Span,
    /// How long a daemon that handed its listeners over (`serve --takeover`) keeps serving its
    /// live sessions before it ends them; 0 = no limit.
    pub drain_limit: Span,
    /// Expect PROXY protocol headers from a load balancer.
    pub proxy_protocol: bool,
    /// Addresses or networks ("10.0.0.0/8") allowed to send PROXY headers.
    pub trusted_proxies: Vec<Net>,
    /// Client input held for one session's process before the client is slowed down.
    pub input_buffer_per_channel: Size,
    /// The same for all sessions of one connection.
    pub input_buffer_per_connection: Size,
    /// The same for all connections.
    pub input_buffer_total: Size,
    /// End a connection holding a channel's budget of input that has not moved for this long.
    pub stuck_timeout: Span,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: NonEmpty(vec![SocketAddr::from(([0, 0, 0, 0], 2222))]),
            host_keys: NonEmpty(vec![PathBuf::from(
                "/var/lib/benchgate/ssh_host_ed25519_key",
            )]),
            login_grace_time: Span::secs(20),
            max_auth_tries: nonzero(6),
            max_startups: nonzero(64),
            max_startups_per_source: nonzero(8),
            max_connections: nonzero(10_000),
            max_connections_per_key: nonzero(64),
            max_sessions_per_connection: nonzero(10),
            keepalive_interval: Span::secs(30),
            idle_timeout: Span::secs(0),
            shutdown_grace: Span::secs(30),
            drain_limit: Span::secs(6 * 3600),
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            input_buffer_per_channel: Size(2 << 20),
            input_buffer_per_connection: Size(4 << 20),
            input_buffer_total: Size(256 << 20),
            stuck_timeout: Span::secs(300),
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Files of OpenSSH public keys of the CAs whose user certificates are accepted.
    pub trusted_user_ca_keys: NonEmpty<PathBuf>,
    /// Revocation list: an OpenSSH KRL or a file of public keys; "" = none.
    pub revoked_keys: Optional<PathBuf>,
    /// Longest accepted certificate validity span; 0 = no limit.
    pub max_cert_lifetime: Span,
    /// End the connection when its certificate expires.
    pub disconnect_on_expiry: bool,
    /// Lead times before expiry at which open sessions are warned.
    pub expiry_warnings: Vec<Span>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            trusted_user_ca_keys: NonEmpty(vec![PathBuf::from("/etc/benchgate/user_ca.pub")]),
            revoked_keys: Optional(None),
            max_cert_lifetime: Span::secs(0),
            disconnect_on_expiry: true,
            expiry_warnings: vec![Span::secs(600), Span::secs(60)],
        }
    }
}

/// `[docker]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Docker {
    /// A container with this label is the bench named by the label's value.
    pub bench_label: String,
    /// A principal equal to `group_principal_prefix` + this label's value also grants the
    /// bench; "" = off.
    pub group_label: String,
    /// Required in front of group principals, so that bench and group names never meet
    /// (e.g. "group:"); "" = a group principal is the label's value alone.
    pub group_principal_prefix: String,
    /// Bound on every Docker API request (not on a session's output stream).
    pub request_timeout: Span,
    /// The Docker engines to serve benches from.
    pub endpoints: NonEmpty<Endpoint>,
}

impl Default for Docker {
    fn default() -> Self {
        let url = std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned());
        Self {
            bench_label: "benchgate.bench".to_owned(),
            group_label: "benchgate.group".to_owned(),
            group_principal_prefix: String::new(),
            request_timeout: Span::secs(10),
            endpoints: NonEmpty(vec![Endpoint {
                url,
                tls_ca: Optional(None),
                tls_cert: Optional(None),
                tls_key: Optional(None),
            }]),
        }
    }
}

/// `[[docker.endpoints]]`: one Docker engine.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `unix:///path/to/docker.sock` or `tcp://host:port`.
    pub url: String,
    /// CA that signed the engine's TLS certificate (tcp only; all three or none).
    #[serde(default)]
    pub tls_ca: Optional<PathBuf>,
    /// Client certificate for TLS.
    #[serde(default)]
    pub tls_cert: Optional<PathBuf>,
    /// Client key for TLS.
    #[serde(default)]
    pub tls_key: Optional<PathBuf>,
}

/// `[session]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Session {
    /// User inside the container; the container label `benchgate.user` overrides it.
    pub user: String,
    /// Working directory; the container label `benchgate.workdir` overrides it.
    pub working_dir: String,
    /// Shell command for interactive sessions; empty = `bash --login` if present, else `sh -l`.
    pub shell: Vec<String>,
    /// Client environment variables passed on (`*` at the end matches a prefix).
    pub env_allow: Vec<String>,
    /// Sessions at once into one bench.
    pub max_sessions_per_bench: NonZeroU32,
    /// Directory for asciicast recordings of PTY sessions; "" = off.
    pub record_dir: Optional<PathBuf>,
    /// What happens to processes a session leaves running when its command exits.
    pub leftovers: Leftovers,
}

/// `session.leftovers`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Leftovers {
    /// Ended (TERM, then KILL), and the person told which.
    #[default]
    End,
    /// Sent SIGHUP, as a terminal hangup under sshd; what ignores it runs on.
    Hangup,
}

impl Default for Session {
    fn default() -> Self {
        Self {
            user: "frappe".to_owned(),
            working_dir: "/home/frappe/frappe-bench".to_owned(),
            shell: Vec::new(),
            env_allow: vec!["LANG".to_owned(), "LC_*".to_owned(), "TZ".to_owned()],
            max_sessions_per_bench: nonzero(32),
            record_dir: Optional(None),
            leftovers: Leftovers::End,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Address of the `/metrics` and `/health` endpoint; "" = off.
    pub listen: Optional<SocketAddr>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            listen: Optional(Some(SocketAddr::from(([127, 0, 0, 1], 9102)))),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// The admin socket `benchgate sessions` talks to; "" = off.
    pub socket: Optional<PathBuf>,
    /// A group whose members may use it too (the socket is then mode 0660); "" = root and
    /// the daemon's user only (0600).
    pub group: String,
    /// Tell a person, once, when support staff start watching their session.
    pub announce_watch: bool,
}

/// Where the admin socket is unless `[admin] socket` says otherwise (systemd's
/// `RuntimeDirectory=benchgate`).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/benchgate/admin.sock";

impl Default for Admin {
    fn default() -> Self {
        Self {
            socket: Optional(Some(PathBuf::from(DEFAULT_ADMIN_SOCKET))),
            group: String::new(),
            announce_watch: true,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// Main log format.
    pub format: LogFormat,
    /// File for JSON-lines audit events; "" = the main log.
    pub audit_file: Optional<PathBuf>,
}

/// Main log format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A duration written like "20s", "6h" or "1h 30m".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Span(pub Duration);

impl Span {
    const fn secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// `None` for zero, which means "off" or "no limit" in this file.
    pub fn nonzero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

/// Longest duration accepted anywhere in the file (longer ones are typos, and would overflow
/// clock arithmetic).
const MAX_SPAN: Duration = Duration::from_secs(366 * 24 * 3600);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let span = humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))?;
        if span > MAX_SPAN {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} is longer than a year"
            )));
        }
        Ok(Span(span))
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A number of bytes written like "4MiB", "512KiB", "1GiB" or "65536".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub usize);

const SIZE_UNITS: [(&str, usize); 4] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("", 1),
];

impl FromStr for Size {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let (number, unit) = SIZE_UNITS
            .iter()
            .find_map(|(suffix, unit)| Some((trimmed.strip_suffix(suffix)?, *unit)))
            .unwrap_or((trimmed, 1));
        number
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .filter(|n| *n > 0)
            .map(Size)
            .ok_or_else(|| {
                format!("invalid size {text:?}: write it like \"4MiB\", \"512KiB\" or \"65536\"")
            })
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (suffix, unit) = SIZE_UNITS
            .iter()
            .find(|(_, unit)| self.0.is_multiple_of(*unit))
            .copied()
            .unwrap_or(("", 1));
        serializer.collect_str(&format_args!("{}{suffix}", self.0 / unit))
    }
}

/// An IP network ("10.0.0.0/8"), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net(pub ipnet::IpNet);

impl Net {
    /// Whether `ip` is inside.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(|net| Net(net.trunc()))
            .map_err(|_| serde::de::Error::custom(format!("invalid address or network {text:?}")))
    }
}

impl Serialize for Net {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// A list that must hold at least one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonEmpty<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NonEmpty<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let items = Vec::<T>::deserialize(deserializer)?;
        if items.is_empty() {
            return Err(serde::de::Error::custom("must list at least one item"));
        }
        Ok(Self(items))
    }
}

/// A value where the empty string means "none".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Optional<T>(pub Option<T>);

impl<'de, T: FromStr> Deserialize<'de> for Optional<T>
where
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() {
            return Ok(Self(None));
        }
        text.parse()
            .map(|value| Self(Some(value)))
            .map_err(|e| serde::de::Error::custom(format!("invalid value {text:?}: {e}")))
    }
}

impl<T: Serialize> Serialize for Optional<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(value) => value.serialize(serializer),
            None => serializer.serialize_str(""),
        }
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// A configuration problem, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct Error {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong, naming the key.
    pub message: String,
}

impl Error {
    /// An error about `path` at the line where `needle` first appears in `text`.
    pub fn at(path: &Path, text: &str, needle: &str, message: impl Into<String>) -> Self {
        let line = text.lines().position(|l| l.contains(needle)).map(|i| i + 1);
        Self {
            path: path.to_owned(),
            line,
            message: message.into(),
        }
    }
}

impl Config {
    /// Parses `text`, read from `path`, and checks what the types cannot.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // A span at the very end (after the last newline) belongs to the last line.
            let line = e.span().map(|span| {
                let newlines = text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                (1 + newlines).min(text.lines().count().max(1))
            });
            let snippet = line
                .and_then(|l| text.lines().nth(l - 1))
                .map(|l| format!(" (in `{}`)", l.trim()))
                .unwrap_or_default();
            Error {
                path: path.to_owned(),
                line,
                message: format!("{}{snippet}", e.message()),
            }
        })?;
        if config.server.proxy_protocol && config.server.trusted_proxies.is_empty() {
            return Err(Error::at(
                path,
                text,
                "proxy_protocol",
                "server.proxy_protocol: list the load balancers' addresses in server.trusted_proxies",
            ));
        }
        let prefix = &config.docker.group_principal_prefix;
        if !prefix.is_empty()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(Error::at(
                path,
                text,
                "group_principal_prefix",
                format!("docker.group_principal_prefix {prefix:?}: it must contain a character bench names cannot have (such as ':'), so that no bench name is ever read as a group"),
            ));
        }
        for endpoint in &config.docker.endpoints.0 {
            let tls = [&endpoint.tls_ca, &endpoint.tls_cert, &endpoint.tls_key];
            let set = tls.iter().filter(|t| t.0.is_some()).count();
            let scheme_ok = endpoint.url.starts_with("unix://")
                || endpoint.url.starts_with("tcp://")
                || endpoint.url.starts_with("http://");
            let problem = if !scheme_ok {
                Some("must start with unix:// or tcp://")
            } else if set != 0 && set != 3 {
                Some("tls_ca, tls_cert and tls_key go together")
            } else if set == 3 && endpoint.url.starts_with("unix://") {
                Some("TLS applies to tcp:// endpoints only")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(Error::at(
                    path,
                    text,
                    &endpoint.url,
                    format!("docker.endpoints {:?}: {problem}", endpoint.url),
                ));
            }
        }
        Ok(config)
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            path: path.to_owned(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// The configuration as TOML, defaults filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn a_group_prefix_must_set_groups_apart_from_bench_names() {
        let error = parse("[docker]\ngroup_principal_prefix = \"team-\"\n").unwrap_err();
        assert_eq!(error.line, Some(2), "{error}");
        let config = parse("[docker]\ngroup_principal_prefix = \"group:\"\n").unwrap();
        assert_eq!(config.docker.group_principal_prefix, "group:");
    }

    #[test]
    fn an_error_at_the_end_of_the_file_names_its_last_line() {
        let error = parse("[server]\nlisten\n").unwrap_err();
        assert_eq!(error.line, Some(2), "{error}");
        assert!(error.message.contains("(in `listen`)"), "{error}");
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let config = parse("").expect("defaults");
        assert_eq!(config.server.login_grace_time.0, Duration::from_secs(20));
        assert_eq!(config.server.max_startups_per_source.get(), 8);
        assert_eq!(
            config.auth.expiry_warnings,
            [Span::secs(600), Span::secs(60)]
        );
        assert_eq!(
            config.metrics.listen.0,
            Some("127.0.0.1:9102".parse().expect("addr"))
        );
        assert_eq!(config.log.audit_file.0, None);
    }

    #[test]
    fn durations_and_empty_strings_parse() {
        let config = parse(
            "[server]\nlogin_grace_time = \"1m 30s\"\n[metrics]\nlisten = \"\"\n[log]\naudit_file = \"/a\"\n",
        )
        .expect("parse");
        assert_eq!(config.server.login_grace_time.0, Duration::from_secs(90));
        assert_eq!(config.metrics.listen.0, None);
        assert_eq!(config.log.audit_file.0, Some(PathBuf::from("/a")));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("[server]\nmax_startups = 3\nbogus = 1\n").expect_err("unknown key");
        assert_eq!(err.line, Some(3));
        let text = err.to_string();
        assert!(text.starts_with("test.toml:3: "), "{text}");
        assert!(text.contains("bogus"), "{text}");
    }

    #[test]
    fn bad_values_are_located() {
        for (text, line) in [
            ("[server]\n\nlogin_grace_time = \"soon\"\n", 3),
            ("[server]\nlogin_grace_time = \"300000000y\"\n", 2),
            ("[server]\nmax_auth_tries = 0\n", 2),
            ("[server]\nlisten = []\n", 2),
            ("[server]\nlisten = [\"nowhere\"]\n", 2),
            ("[log]\nformat = \"xml\"\n", 2),
            ("[auth]\nrevoked_key = \"/x\"\n", 2),
            ("[server]\nproxy_protocol = true\n", 2),
            ("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n", 2),
            ("[server]\ninput_buffer_per_channel = \"lots\"\n", 2),
        ] {
            let err = parse(text).expect_err(text);
            assert_eq!(err.line, Some(line), "{text}: {err}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        for (text, bytes) in [
            ("4MiB", 4 << 20),
            ("512KiB", 512 << 10),
            ("1GiB", 1 << 30),
            ("65536", 65536),
            (" 2 MiB ", 2 << 20),
        ] {
            assert_eq!(text.parse::<Size>(), Ok(Size(bytes)), "{text}");
        }
        for bad in ["", "0", "4MB", "-1KiB", "1.5MiB", "99999999999999999999GiB"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
        let config = parse("[server]\ninput_buffer_total = \"3MiB\"\n").expect("parse");
        assert_eq!(config.server.input_buffer_total, Size(3 << 20));
        assert_eq!(
            parse(&config.to_toml())
                .expect("reparse")
                .server
                .input_buffer_total,
            Size(3 << 20)
        );
    }

    #[test]
    fn effective_config_round_trips() {
        let config = parse("[server]\nidle_timeout = \"90s\"\n").expect("parse");
        let again = parse(&config.to_toml()).expect("reparse");
        assert_eq!(again.server.idle_timeout.0, Duration::from_secs(90));
        assert_eq!(again.metrics.listen, config.metrics.listen);
    }
}
