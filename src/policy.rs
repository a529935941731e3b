//! What is refused inside a connection, and the words the person sees.

/// Shown for sftp, scp and rsync, whichever way they ask.
pub const FILE_TRANSFER: &str =
    "benchgate: file transfer (sftp/scp) is not available through this bastion";
/// Reason given when a forwarding channel is refused.
pub const FORWARDING: &str = "benchgate: forwarding is not available through this bastion";
/// Shown when the connection has `max_sessions_per_connection` open already.
pub const TOO_MANY_SESSIONS: &str = "benchgate: too many sessions on this connection";
/// Longest accepted command, in bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Most environment variables one channel may set.
pub const MAX_ENV_VARS: usize = 64;
/// Longest accepted environment variable value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 4096;

/// A request refused by policy: the `request` label of metrics and audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// A session channel past `max_sessions_per_connection`.
    Session,
    /// A `pty-req` without `permit-pty`.
    Pty,
    /// An `env` request outside `env_allow`, or malformed.
    Env,
    /// An `exec` of the server side of scp, rsync or sftp.
    FileTransferExec,
    /// An `exec` with control bytes, invalid UTF-8 or too long.
    MalformedExec,
    /// A `subsystem` request (sftp or any other).
    Subsystem,
    /// `x11-req`.
    X11,
    /// An `x11` channel.
    X11Channel,
    /// `auth-agent-req@openssh.com`.
    Agent,
    /// `direct-tcpip` (ssh -L, -D, -W).
    DirectTcpip,
    /// `direct-streamlocal@openssh.com`.
    DirectStreamlocal,
    /// `tcpip-forward` (ssh -R).
    TcpipForward,
    /// `streamlocal-forward@openssh.com`.
    StreamlocalForward,
}

impl Refused {
    /// Every variant, so metrics can start at zero for each.
    pub const ALL: [Refused; 13] = [
        Self::Session,
        Self::Pty,
        Self::Env,
        Self::FileTransferExec,
        Self::MalformedExec,
        Self::Subsystem,
        Self::X11,
        Self::X11Channel,
        Self::Agent,
        Self::DirectTcpip,
        Self::DirectStreamlocal,
        Self::TcpipForward,
        Self::StreamlocalForward,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Pty => "pty-req",
            Self::Env => "env",
            Self::FileTransferExec => "exec-file-transfer",
            Self::MalformedExec => "exec-malformed",
            Self::Subsystem => "subsystem",
            Self::X11 => "x11-req",
            Self::X11Channel => "x11",
            Self::Agent => "auth-agent-req",
            Self::DirectTcpip => "direct-tcpip",
            Self::DirectStreamlocal => "direct-streamlocal",
            Self::TcpipForward => "tcpip-forward",
            Self::StreamlocalForward => "streamlocal-forward",
        }
    }
}

/// Why a command is not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandRefusal {
    /// It is the server side of sftp, scp or rsync.
    FileTransfer,
    /// NUL or other control bytes, invalid UTF-8, or too long.
    Malformed,
}

/// The command text, when it may be run.
pub fn check_command(raw: &[u8]) -> Result<&str, CommandRefusal> {
    if raw.len() > MAX_COMMAND_BYTES {
        return Err(CommandRefusal::Malformed);
    }
    let text = std::str::from_utf8(raw).map_err(|_| CommandRefusal::Malformed)?;
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(CommandRefusal::Malformed);
    }
    if is_file_transfer(text) {
        return Err(CommandRefusal::FileTransfer);
    }
    Ok(text)
}

/// `raw` as text safe to put in an environment variable: at most [`MAX_COMMAND_BYTES`],
/// invalid UTF-8 and control characters other than tab and newline replaced.
pub fn printable(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(&raw[..raw.len().min(MAX_COMMAND_BYTES)]);
    text.chars()
        .map(|c| {
            if c.is_control() && !matches!(c, '\t' | '\n') {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// Whether `command` is what sftp, scp (`scp -O`) or rsync run on the server side.
pub fn is_file_transfer(command: &str) -> bool {
    let mut words = command
        .split_whitespace()
        .skip_while(|w| w.contains('=') && !w.starts_with('-'));
    let Some(program) = words.next() else {
        return false;
    };
    let name = program.rsplit('/').next().unwrap_or(program);
    let args: Vec<&str> = words.collect();
    match name {
        "scp" => args.iter().any(|a| {
            a.starts_with('-') && !a.starts_with("--") && (a.contains('t') || a.contains('f'))
        }),
        "rsync" => args.contains(&"--server"),
        "sftp-server" | "internal-sftp" => true,
        _ => false,
    }
}

/// Whether the client may set `name=value`: `name` matches `allow` (exact, or a prefix
/// before a trailing `*`), is a plain identifier, and the value is bounded and printable.
pub fn env_allowed(name: &str, value: &str, allow: &[String]) -> bool {
    let identifier = name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let value_ok =
        value.len() <= MAX_ENV_VALUE_BYTES && !value.chars().any(|c| c.is_control() && c != '\t');
    let listed = allow.iter().any(|pattern| match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    });
    identifier && value_ok && listed && !name.starts_with("BENCHGATE_")
}

/// `term` if it is a sane terminal type, else "xterm".
pub fn terminal_type(term: &str) -> &str {
    let sane = !term.is_empty()
        && term.len() <= 64
        && term
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if sane {
        term
    } else {
        "xterm"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_transfer_commands_are_recognised() {
        for cmd in [
            "scp -t /tmp",
            "scp -f file",
            "scp -r -t .",
            "scp -pt dir",
            "/usr/bin/scp -f x",
            "rsync --server -vlogDtpre.iLsfxC . /tmp",
            "/usr/lib/openssh/sftp-server",
            "internal-sftp",
            "LC_ALL=C scp -t /x",
        ] {
            assert!(is_file_transfer(cmd), "{cmd}");
            assert_eq!(
                check_command(cmd.as_bytes()),
                Err(CommandRefusal::FileTransfer)
            );
        }
        for cmd in [
            "bench restart",
            "rsync --version",
            "echo scp -t",
            "scp --help",
            "ls -t",
            "",
        ] {
            assert!(!is_file_transfer(cmd), "{cmd}");
        }
    }

    #[test]
    fn malformed_commands_are_refused() {
        assert_eq!(check_command(b"echo \0hi"), Err(CommandRefusal::Malformed));
        assert_eq!(
            check_command(b"echo \x1b[2J"),
            Err(CommandRefusal::Malformed)
        );
        assert_eq!(check_command(&[0xff, 0xfe]), Err(CommandRefusal::Malformed));
        assert_eq!(
            check_command(&vec![b'a'; MAX_COMMAND_BYTES + 1]),
            Err(CommandRefusal::Malformed)
        );
        assert_eq!(
            check_command(b"for i in 1 2; do\n\techo $i\ndone"),
            Ok("for i in 1 2; do\n\techo $i\ndone")
        );
    }

    #[test]
    fn printable_strips_nul_and_bounds() {
        assert_eq!(printable(b"a\0b\tc\nd\x1b"), "a\u{fffd}b\tc\nd\u{fffd}");
        assert_eq!(
            printable(&vec![b'x'; MAX_COMMAND_BYTES * 2]).len(),
            MAX_COMMAND_BYTES
        );
    }

    #[test]
    fn env_follows_the_allow_list() {
        let allow = vec!["LANG".to_owned(), "LC_*".to_owned()];
        assert!(env_allowed("LANG", "C.UTF-8", &allow));
        assert!(env_allowed("LC_ALL", "C", &allow));
        assert!(!env_allowed("LANGUAGE", "x", &allow));
        assert!(!env_allowed("PATH", "/x", &allow));
        assert!(!env_allowed("LC_X", "a\nb", &allow));
        assert!(!env_allowed(
            "LC_X",
            &"v".repeat(MAX_ENV_VALUE_BYTES + 1),
            &allow
        ));
        assert!(!env_allowed("LC-X", "v", &allow));
        assert!(!env_allowed("BENCHGATE_SESSION", "x", &["*".to_owned()]));
    }

    #[test]
    fn terminal_types_are_sanitised() {
        assert_eq!(terminal_type("xterm-256color"), "xterm-256color");
        assert_eq!(terminal_type("screen.xterm+x"), "screen.xterm+x");
        assert_eq!(terminal_type("evil\n"), "xterm");
        assert_eq!(terminal_type(""), "xterm");
        assert_eq!(terminal_type(&"x".repeat(65)), "xterm");
    }
}
