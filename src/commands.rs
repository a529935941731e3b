//! The one-shot operator commands: `issue` signs a certificate as the dashboard does, `explain`
//! says whether a certificate would get into a bench now, and every reason why not.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey};

use crate::auth::{self, cert, issue, Attempt};
use crate::clock::unix_now;
use crate::config::Config;
use crate::docker;
use crate::settings::Settings;

/// Where `ssh` looks for the certificate of the key whose public half is `public`:
/// `id_ed25519.pub` -> `id_ed25519-cert.pub`.
pub fn cert_path(public: &Path) -> PathBuf {
    let name = public
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".pub").unwrap_or(&name);
    public.with_file_name(format!("{stem}-cert.pub"))
}

/// What `issue` needs.
#[derive(Debug, Clone)]
pub struct IssueArgs {
    /// The CA private key file.
    pub ca: PathBuf,
    /// The principal (bench or group).
    pub principal: String,
    /// Validity from now.
    pub validity: Duration,
    /// Key ID; default `<principal>-<unix time>`.
    pub identity: Option<String>,
    /// Serial; default random.
    pub serial: Option<u64>,
    /// The user's public key file.
    pub public_key: PathBuf,
    /// The bastion's host name for the printed `ssh` command.
    pub host: String,
    /// The bastion's port.
    pub port: u16,
}

/// Signs, writes `<key>-cert.pub`, and returns what to tell the user.
pub fn issue(args: &IssueArgs) -> anyhow::Result<String> {
    const YEAR: Duration = Duration::from_secs(366 * 24 * 3600);
    if args.validity.is_zero() || args.validity > YEAR {
        anyhow::bail!("--validity must be more than 0 and at most a year (the platform issues 6h)");
    }
    let ca = PrivateKey::read_openssh_file(&args.ca)
        .with_context(|| format!("CA key {}", args.ca.display()))?;
    let subject = PublicKey::read_openssh_file(&args.public_key)
        .with_context(|| format!("public key {}", args.public_key.display()))?;
    let now = unix_now();
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}-{now}", args.principal));
    let request = issue::Request {
        principal: &args.principal,
        validity: args.validity,
        identity: &identity,
        serial: args.serial.unwrap_or_else(rand::random),
        now,
    };
    let certificate = issue::sign(&ca, &subject, &request)?;
    let text = certificate
        .to_openssh()
        .context("cannot encode the certificate")?;
    let path = cert_path(&args.public_key);
    std::fs::write(&path, format!("{text}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(instructions(&certificate, &text, &path, args))
}

/// The paste-ready commands for Linux/macOS and Windows PowerShell.
fn instructions(certificate: &Certificate, text: &str, path: &Path, args: &IssueArgs) -> String {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = file.strip_suffix("-cert.pub").unwrap_or(&file).to_owned();
    let hours = args.validity.as_secs_f64() / 3600.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Wrote {} (key ID {:?}, serial {}, valid {hours:.1} h, principal {:?}, permit-pty only).",
        path.display(),
        certificate.key_id(),
        certificate.serial(),
        args.principal
    );
    let _ = writeln!(
        out,
        "\n# Linux / macOS (bash, zsh): save the certificate next to the key, then connect"
    );
    let _ = writeln!(out, "cat > ~/.ssh/{file} <<'EOF'\n{text}\nEOF");
    let _ = writeln!(
        out,
        "ssh -i ~/.ssh/{key} -p {} {}@{}",
        args.port, args.principal, args.host
    );
    let _ = write!(out, "{}", ssh_config_blocks(certificate, &key, args));
    let _ = writeln!(out, "\n# Windows PowerShell (writes UTF-8 without a BOM)");
    let _ = writeln!(
        out,
        "[System.IO.File]::WriteAllText(\"$env:USERPROFILE\\.ssh\\{file}\", \"{text}`n\")"
    );
    let _ = writeln!(
        out,
        "ssh -i \"$env:USERPROFILE\\.ssh\\{key}\" -p {} {}@{}",
        args.port, args.principal, args.host
    );
    out
}

/// The `~/.ssh/config` blocks for the two ways a key is held. In an agent (`ssh-add` loads
/// the key and the certificate beside it), accepting only the `-cert-v01` algorithms makes
/// OpenSSH offer the certificate alone: one signature per login (one prompt with
/// `ssh-add -c`, one touch of a FIDO key) where it would otherwise also offer the bare key and
/// sign twice. Without an agent the same setting makes OpenSSH skip the private key file, so
/// that block leaves it out.
fn ssh_config_blocks(certificate: &Certificate, key: &str, args: &IssueArgs) -> String {
    use russh::keys::ssh_key::Algorithm;
    let algorithms = match certificate.public_key().algorithm() {
        Algorithm::Ed25519 => "ssh-ed25519-cert-v01@openssh.com",
        Algorithm::Ecdsa { curve } => match curve.as_str() {
            "nistp384" => "ecdsa-sha2-nistp384-cert-v01@openssh.com",
            "nistp521" => "ecdsa-sha2-nistp521-cert-v01@openssh.com",
            _ => "ecdsa-sha2-nistp256-cert-v01@openssh.com",
        },
        Algorithm::SkEd25519 => "sk-ssh-ed25519-cert-v01@openssh.com",
        Algorithm::SkEcdsaSha2NistP256 => "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
        _ => "rsa-sha2-512-cert-v01@openssh.com,rsa-sha2-256-cert-v01@openssh.com",
    };
    let host = |extra: &str| {
        format!(
            "Host {}\n  Port {}\n  User {}\n{extra}",
            args.host, args.port, args.principal
        )
    };
    format!(
        "\n# ~/.ssh/config, with the key in an agent (ssh-add ~/.ssh/{key} loads the certificate too):\n# the certificate alone is offered, so each login signs once\n{}\n# ~/.ssh/config, with the key in a file and no agent (`ssh {}` then connects)\n{}",
        host(&format!("  PubkeyAcceptedAlgorithms {algorithms}\n")),
        args.host,
        host(&format!(
            "  IdentityFile ~/.ssh/{key}\n  CertificateFile ~/.ssh/{key}-cert.pub\n  IdentitiesOnly yes\n"
        )),
    )
}

/// The verdict of `explain`: the report, and whether the certificate would be accepted.
pub async fn explain(
    config: &Config,
    bench: &str,
    certificate: &Path,
    from: Option<IpAddr>,
) -> anyhow::Result<(String, bool)> {
    let text = std::fs::read_to_string(certificate)
        .with_context(|| format!("certificate {}", certificate.display()))?;
    let cert = Certificate::from_openssh(text.trim())
        .with_context(|| format!("{} is not an OpenSSH certificate", certificate.display()))?;
    let settings = Settings::load(config)?;
    let facts = bench_facts(config, bench).await;
    let now = unix_now();
    let peer = from.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let attempt = Attempt {
        bench,
        group: facts.as_ref().ok().and_then(|f| f.group.as_deref()),
        peer,
        now,
    };
    let mut reasons = cert::rejections(&cert, &attempt, &settings.trust);
    // Without --from, the client address is unknown: say what source-address requires instead.
    let source = cert.critical_options().get(cert::SOURCE_ADDRESS).cloned();
    if from.is_none() {
        reasons.retain(|r| *r != auth::Rejection::SourceAddressMismatch);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "certificate: key ID {:?}, serial {}, CA {}",
        cert.key_id(),
        cert.serial(),
        cert::ca_fingerprint(&cert)
    );
    let _ = writeln!(out, "principals: {:?}", cert.valid_principals());
    let time = |unix: u64| match UNIX_EPOCH.checked_add(Duration::from_secs(unix)) {
        Some(t) if unix < u64::MAX => humantime::format_rfc3339_seconds(t).to_string(),
        _ => "forever".to_owned(),
    };
    let _ = writeln!(
        out,
        "valid: {} to {} (now {})",
        time(cert.valid_after()),
        time(cert.valid_before()),
        time(now)
    );
    let mut ambiguous = false;
    match &facts {
        Ok(facts) => {
            let _ = writeln!(out, "bench {bench:?}: {}", facts.state);
            ambiguous = matches!(facts.lookup, docker::Lookup::Ambiguous(_));
            for conflict in &facts.conflicts {
                let _ = writeln!(out, "warning: {conflict}");
            }
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "bench {bench:?}: unknown ({e}); only the bench name was considered"
            );
        }
    }
    if let (Some(list), None) = (&source, from) {
        let _ = writeln!(out, "note: source-address {list:?}: the client must connect from there (use --from IP to check)");
    }
    let accepted = reasons.is_empty() && !ambiguous;
    if ambiguous {
        let _ = writeln!(
            out,
            "REFUSED for bench {bench:?}: the bench is ambiguous, so every session into it is refused"
        );
    } else if accepted {
        let grant = cert::verify(&cert, &attempt, &settings.trust);
        let pty = grant.as_ref().map(|g| g.permit_pty).unwrap_or(false);
        let _ = writeln!(
            out,
            "ACCEPTED for bench {bench:?} (terminal: {})",
            if pty { "yes" } else { "no, commands only" }
        );
        if let Some(forced) = cert.critical_options().get(cert::FORCE_COMMAND) {
            let _ = writeln!(out, "only this command runs: {forced:?}");
        }
    } else {
        let _ = writeln!(out, "REFUSED for bench {bench:?}:");
        for reason in &reasons {
            let _ = writeln!(out, "  - {reason} [{}]", reason.label());
        }
    }
    Ok((out, accepted))
}

/// What the engines say about a bench, for `explain`.
struct BenchFacts {
    lookup: docker::Lookup,
    /// The principal that grants it through its group label.
    group: Option<String>,
    /// One line on its state and group.
    state: String,
    /// The index's label conflicts that concern it.
    conflicts: Vec<String>,
}

/// Asks the configured engines (bounded) about `bench`.
async fn bench_facts(config: &Config, bench: &str) -> anyhow::Result<BenchFacts> {
    let index = docker::Index::from_config(&config.docker)?;
    let errors = index.sync_all().await;
    let lookup = index.lookup(bench);
    if let (Some(first), docker::Lookup::Unknown) = (errors.first(), &lookup) {
        anyhow::bail!("{first}");
    }
    let group = index.group(bench);
    let state = match &lookup {
        docker::Lookup::Running(b) => match (&b.group, &group) {
            (None, _) => "running, no group label".to_owned(),
            (Some(label), Some(principal)) => {
                format!("running, group {label:?} (granted by principal {principal:?})")
            }
            (Some(label), None) => {
                format!("running, group {label:?} NOT honoured: it is also a bench's name")
            }
        },
        docker::Lookup::Ambiguous(list) => format!(
            "AMBIGUOUS: {} live containers carry its label; every session is refused",
            list.len()
        ),
        docker::Lookup::NotRunning(b) => format!("not running (status: {})", b.state),
        docker::Lookup::Unknown => "no such bench".to_owned(),
    };
    let quoted = format!("{bench:?}");
    let docker::Conflicts {
        ambiguous,
        ignored_groups,
    } = index.conflicts();
    let conflicts = ambiguous
        .into_iter()
        .chain(ignored_groups)
        .filter(|c| c.contains(&quoted))
        .collect();
    Ok(BenchFacts {
        lookup,
        group,
        state,
        conflicts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_lands_next_to_its_key() {
        assert_eq!(
            cert_path(Path::new("/h/.ssh/id_ed25519.pub")),
            PathBuf::from("/h/.ssh/id_ed25519-cert.pub")
        );
        assert_eq!(cert_path(Path::new("key")), PathBuf::from("key-cert.pub"));
    }
}
