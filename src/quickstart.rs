//! `benchgate quickstart`: a demo on one machine — a CA, a host key, a demo bench container
//! from a locally built image, a user key and certificate, and the config to serve them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use russh::keys::ssh_key::{LineEnding, PrivateKey};

use crate::auth::issue;
use crate::config::{Config, NonEmpty, Optional};
use crate::ssh::keys::{self, Missing};

/// The demo bench's name (the SSH user name).
pub const BENCH: &str = "demo";
/// The demo container's name.
pub const CONTAINER: &str = "benchgate-quickstart";
/// Builds the image from Debian's busybox-static with `docker import` (no registry).
const IMAGE_SCRIPT: &str = include_str!("../scripts/bench-image.sh");

/// Prepares everything in `dir` for a daemon on `listen`; returns the config file to serve
/// and what to tell the person.
pub fn prepare(dir: &Path, listen: SocketAddr) -> anyhow::Result<(PathBuf, String)> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    docker(&["info", "--format", "{{.ServerVersion}}"])
        .context("quickstart needs a running Docker engine")?;
    if !Path::new("/bin/busybox").exists() {
        bail!("quickstart builds its demo image from /bin/busybox: install it with `apt-get install busybox-static`");
    }
    let image = build_image()?;
    // Replace an earlier demo, but never someone else's container of that name.
    if let Ok(label) = docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"benchgate.bench\"}}",
        CONTAINER,
    ]) {
        if label.trim() != BENCH {
            bail!("a container named {CONTAINER} exists and is not a benchgate demo; remove or rename it");
        }
        docker(&["rm", "-f", CONTAINER])?;
    }
    docker(&[
        "run",
        "-d",
        "--name",
        CONTAINER,
        "--label",
        &format!("benchgate.bench={BENCH}"),
        &image,
        "sleep",
        "2147483647",
    ])
    .context("cannot start the demo container")?;

    let ca = PrivateKey::random(&mut rand::rng(), russh::keys::ssh_key::Algorithm::Ed25519)?;
    write_private(&dir.join("user_ca"), &ca)?;
    std::fs::write(
        dir.join("user_ca.pub"),
        format!("{}\n", ca.public_key().to_openssh()?),
    )?;
    let user = PrivateKey::random(&mut rand::rng(), russh::keys::ssh_key::Algorithm::Ed25519)?;
    write_private(&dir.join("user"), &user)?;
    std::fs::write(
        dir.join("user.pub"),
        format!("{}\n", user.public_key().to_openssh()?),
    )?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let request = issue::Request {
        principal: BENCH,
        validity: Duration::from_secs(6 * 3600),
        identity: "quickstart-user",
        serial: 1,
        now,
    };
    let cert = issue::sign(&ca, user.public_key(), &request)?;
    std::fs::write(
        dir.join("user-cert.pub"),
        format!("{}\n", cert.to_openssh()?),
    )?;

    let host_key_path = dir.join("ssh_host_ed25519_key");
    let host_keys = keys::load(std::slice::from_ref(&host_key_path), Missing::Create)?.keys;
    let host = host_keys
        .first()
        .context("no host key")?
        .public_key()
        .to_openssh()?;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[{}]:{} {host}\n", listen.ip(), listen.port()),
    )?;

    let mut config = Config::default();
    config.server.listen = NonEmpty(vec![listen]);
    config.server.host_keys = NonEmpty(vec![host_key_path]);
    config.auth.trusted_user_ca_keys = NonEmpty(vec![dir.join("user_ca.pub")]);
    config.metrics.listen = Optional(None);
    config.log.audit_file = Optional(Some(dir.join("audit.log")));
    config.admin.socket = Optional(Some(dir.join("admin.sock")));
    let config_path = dir.join("benchgate.toml");
    std::fs::write(&config_path, config.to_toml())?;

    let ssh = format!(
        "ssh -i {} -o UserKnownHostsFile={} -p {} {BENCH}@{}",
        dir.join("user").display(),
        known_hosts.display(),
        listen.port(),
        listen.ip()
    );
    let mut text = String::new();
    let _ = writeln!(
        text,
        "benchgate quickstart: everything is in {}",
        dir.display()
    );
    let _ = writeln!(text, "  CA {}/user_ca, a 6-hour certificate for bench {BENCH:?}, container {CONTAINER} ({image})", dir.display());
    let _ = writeln!(
        text,
        "Connect from another terminal:\n  {ssh}\n  {ssh} 'id; pwd'"
    );
    let _ = writeln!(
        text,
        "Try what is refused:  sftp -i {} -o UserKnownHostsFile={} -P {} {BENCH}@{}",
        dir.join("user").display(),
        known_hosts.display(),
        listen.port(),
        listen.ip()
    );
    let _ = writeln!(
        text,
        "Live sessions: benchgate sessions --config {} (then `sessions watch ID`, `sessions end ID`)",
        config_path.display()
    );
    let _ = writeln!(text, "Audit trail: {}/audit.log. Stop with Ctrl-C; remove the demo with `docker rm -f {CONTAINER}`.", dir.display());
    Ok((config_path, text))
}

fn write_private(path: &Path, key: &PrivateKey) -> anyhow::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(key.to_openssh(LineEnding::LF)?.as_bytes())?;
    Ok(())
}

fn build_image() -> anyhow::Result<String> {
    let out = Command::new("bash")
        .args(["-c", IMAGE_SCRIPT])
        .output()
        .context("cannot run bash")?;
    if !out.status.success() {
        bail!(
            "cannot build the demo image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("cannot run the docker command")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
