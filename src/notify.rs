//! systemd's readiness protocol (`Type=notify`, sd_notify(3)) without libsystemd: one datagram
//! such as `READY=1` to the unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace). Without the variable (not started by systemd) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to `$NOTIFY_SOCKET`. Returns
/// `Ok(false)` when the variable is unset.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract NOTIFY_SOCKET needs Linux",
            ));
        }
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// [`notify`], logging a failure instead of returning it (readiness is best effort: a unit
/// with `Type=notify` times out visibly when it never arrives).
pub fn notify_logged(state: &str) {
    match notify(state) {
        Ok(true) => log::debug!("sd_notify: {}", state.replace('\n', " ")),
        Ok(false) => {}
        Err(e) => log::warn!("sd_notify {state:?} to $NOTIFY_SOCKET failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_datagram_to_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        // The variable is process-wide: only this test sets it.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1\nSTATUS=serving").unwrap());
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        assert!(!notify("READY=1").unwrap());
    }
}
