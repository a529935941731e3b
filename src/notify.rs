//! systemd readiness notifications (`Type=notify`): READY, RELOADING, STOPPING, sent to
//! `$NOTIFY_SOCKET` when systemd set it, and nowhere otherwise.

use std::os::unix::net::UnixDatagram;

/// A state change to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Listeners are bound; serving.
    Ready,
    /// A SIGHUP reload started (followed by `Ready`).
    Reloading,
    /// Shutdown started.
    Stopping,
}

/// Tells systemd about `state`; does nothing outside systemd, and only logs a failure.
pub fn notify(state: State) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = match state {
        State::Ready => "READY=1\nSTATUS=serving".to_owned(),
        // Type=notify (not notify-reload), so no MONOTONIC_USEC is needed.
        State::Reloading => "RELOADING=1".to_owned(),
        State::Stopping => "STOPPING=1".to_owned(),
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket name.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)
            }
            None => socket.send_to(message.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        // The only test in this crate that touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify(State::Ready);
        notify(State::Reloading);
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"RELOADING=1");
    }
}
