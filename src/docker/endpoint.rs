//! One Docker engine: its API client, and the raw connection an attached exec needs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bollard::{Docker, API_DEFAULT_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::rustls::{self, pki_types};

use super::Error;
use crate::config;

/// A byte stream to an engine.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How to open a raw connection to the engine.
enum Dial {
    Unix(PathBuf),
    Tcp(String),
    Tls {
        addr: String,
        server_name: pki_types::ServerName<'static>,
        connector: tokio_rustls::TlsConnector,
    },
}

/// How to build the API client (bollard refuses to build one for a missing unix socket, so
/// this waits until the engine is first reached).
enum Client {
    Unix,
    Http,
    Tls {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

/// One Docker engine.
pub struct Endpoint {
    /// The configured URL, as logs and errors name it.
    pub url: String,
    client: Client,
    api: RwLock<Option<Docker>>,
    dial: Dial,
    timeout: Duration,
    /// Teardown execs in flight; see [`MAX_TEARDOWNS`].
    pub teardowns: tokio::sync::Semaphore,
}

/// Teardown execs one engine runs at once. A burst of disconnects (a load balancer restart,
/// hundreds of sessions closed together) otherwise becomes hundreds of concurrent execs into
/// one container, which wedged Docker 20.10's exec path for good in the load harness.
const MAX_TEARDOWNS: usize = 4;

/// Longest HTTP response head accepted when attaching to an exec.
const MAX_RESPONSE_HEAD_BYTES: usize = 16 * 1024;

impl Endpoint {
    /// An endpoint for `endpoint` whose every request is bounded by `timeout`. Does not
    /// connect; fails only on unusable TLS files.
    pub fn new(endpoint: &config::Endpoint, timeout: Duration) -> Result<Self, Error> {
        let url = endpoint.url.clone();
        let config_error = |reason: String| Error::Config {
            endpoint: url.clone(),
            reason,
        };
        let (client, dial) = if let Some(path) = url.strip_prefix("unix://") {
            (Client::Unix, Dial::Unix(PathBuf::from(path)))
        } else {
            let addr = url
                .trim_start_matches("tcp://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned();
            match (
                &endpoint.tls_ca.0,
                &endpoint.tls_cert.0,
                &endpoint.tls_key.0,
            ) {
                (Some(ca), Some(cert), Some(key)) => {
                    let host = addr
                        .rsplit_once(':')
                        .map_or(addr.as_str(), |(host, _)| host)
                        .to_owned();
                    let server_name = pki_types::ServerName::try_from(host)
                        .map_err(|e| config_error(e.to_string()))?;
                    let connector = tls_connector(ca, cert, key).map_err(config_error)?;
                    let client = Client::Tls {
                        ca: ca.clone(),
                        cert: cert.clone(),
                        key: key.clone(),
                    };
                    (
                        client,
                        Dial::Tls {
                            addr,
                            server_name,
                            connector,
                        },
                    )
                }
                _ => (Client::Http, Dial::Tcp(addr)),
            }
        };
        Ok(Self {
            url,
            client,
            api: RwLock::new(None),
            dial,
            timeout,
            teardowns: tokio::sync::Semaphore::new(MAX_TEARDOWNS),
        })
    }

    fn connect(&self) -> Result<Docker, Error> {
        let secs = self.timeout.as_secs().max(1);
        let url = &self.url;
        let client = match &self.client {
            Client::Unix => Docker::connect_with_unix(url, secs, API_DEFAULT_VERSION),
            Client::Http => Docker::connect_with_http(url, secs, API_DEFAULT_VERSION),
            Client::Tls { ca, cert, key } => {
                Docker::connect_with_ssl(url, key, cert, ca, secs, API_DEFAULT_VERSION)
            }
        };
        client.map_err(|e| Error::Unreachable {
            endpoint: url.clone(),
            reason: e.to_string(),
        })
    }

    /// Connects if needed and agrees on an API version with the engine (bollard's default is
    /// newer than many engines accept).
    pub async fn negotiate(&self) -> Result<(), Error> {
        let api = self
            .bounded("version", self.connect()?.negotiate_version())
            .await?;
        *self.api.write().unwrap_or_else(|p| p.into_inner()) = Some(api);
        Ok(())
    }

    /// The API client, at the negotiated version; an error until the engine was first reached.
    pub fn api(&self) -> Result<Docker, Error> {
        self.api
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::Unreachable {
                endpoint: self.url.clone(),
                reason: "not reached yet".into(),
            })
    }

    /// Whether exec creation takes `ConsoleSize` (API 1.42 and later).
    pub fn has_console_size(&self) -> bool {
        let Ok(api) = self.api() else {
            return false;
        };
        let v = api.client_version();
        (v.major_version, v.minor_version) >= (1, 42)
    }

    /// The negotiated API version, as in request paths ("1.41").
    pub fn version(&self) -> String {
        let Ok(api) = self.api() else {
            return "1.41".to_owned();
        };
        let v = api.client_version();
        format!("{}.{}", v.major_version, v.minor_version)
    }

    /// Runs one API request under `docker.request_timeout`, mapping its failure.
    pub async fn bounded<T>(
        &self,
        op: &'static str,
        request: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.timeout, request).await {
            Err(_) => Err(Error::Timeout {
                endpoint: self.url.clone(),
                op,
            }),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.api_error(op, e)),
        }
    }

    fn api_error(&self, op: &'static str, error: bollard::errors::Error) -> Error {
        use bollard::errors::Error as B;
        match error {
            B::DockerResponseServerError { message, .. } => Error::Api {
                endpoint: self.url.clone(),
                op,
                reason: message,
            },
            B::RequestTimeoutError => Error::Timeout {
                endpoint: self.url.clone(),
                op,
            },
            other => Error::Unreachable {
                endpoint: self.url.clone(),
                reason: with_causes(&other),
            },
        }
    }

    /// POSTs `body` to `path` asking for a connection upgrade, as
    /// `/exec/{id}/start` wants, and returns the raw stream with any bytes read past the head.
    pub async fn upgrade(&self, path: &str, body: &str) -> Result<(Vec<u8>, Box<dyn Io>), Error> {
        let attach = async {
            let mut stream = self.dial().await?;
            let request = format!(
                "POST /v{}{path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
                 Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: {}\r\n\r\n{body}",
                self.version(),
                body.len()
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| self.unreachable(e))?;
            let (head, rest) = read_head(&mut stream)
                .await
                .map_err(|e| self.unreachable(e))?;
            let status = head.lines().next().unwrap_or_default();
            if status.starts_with("HTTP/1.1 101")
                || status.starts_with("HTTP/1.1 200")
                || status.starts_with("HTTP/1.0 200")
            {
                Ok((rest, stream))
            } else {
                let reason = String::from_utf8_lossy(&rest)
                    .trim()
                    .chars()
                    .take(300)
                    .collect::<String>();
                Err(Error::Api {
                    endpoint: self.url.clone(),
                    op: "exec_start",
                    reason: format!("{status} {reason}"),
                })
            }
        };
        match tokio::time::timeout(self.timeout, attach).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                endpoint: self.url.clone(),
                op: "exec_start",
            }),
        }
    }

    async fn dial(&self) -> Result<Box<dyn Io>, Error> {
        let stream: Box<dyn Io> = match &self.dial {
            Dial::Unix(path) => Box::new(
                UnixStream::connect(path)
                    .await
                    .map_err(|e| self.unreachable(e))?,
            ),
            Dial::Tcp(addr) => Box::new(
                TcpStream::connect(addr)
                    .await
                    .map_err(|e| self.unreachable(e))?,
            ),
            Dial::Tls {
                addr,
                server_name,
                connector,
            } => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                Box::new(
                    connector
                        .connect(server_name.clone(), tcp)
                        .await
                        .map_err(|e| self.unreachable(e))?,
                )
            }
        };
        Ok(stream)
    }

    fn unreachable(&self, e: std::io::Error) -> Error {
        Error::Unreachable {
            endpoint: self.url.clone(),
            reason: e.to_string(),
        }
    }
}

/// Reads an HTTP response head; returns it and the bytes that followed it.
async fn read_head(stream: &mut Box<dyn Io>) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_RESPONSE_HEAD_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "engine closed the connection",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn tls_connector(ca: &Path, cert: &Path, key: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    use pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // bollard's TLS client looks its key provider up process-wide.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("tls_ca {}: {e}", ca.display()))?
    {
        let cert = cert.map_err(|e| format!("tls_ca {}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("tls_ca {}: {e}", ca.display()))?;
    }
    let chain = pki_types::CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls_cert {}: {e}", cert.display()))?;
    let key = pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("tls_key {}: {e}", key.display()))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `error` and its chain of causes, as one line: hyper's errors say little on their own.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
