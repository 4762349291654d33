//! systemd's readiness protocol: with `Type=notify`, systemd starts the units ordered after a
//! node only once it says `READY=1`, and shows `STATUS=` in `systemctl status`. The manager
//! names a datagram socket in `NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace); without it (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use crate::service::{Context, Result, Service};

/// Send `state` (`KEY=VALUE` lines) to the service manager, if there is one. Failing to is
/// logged, never fatal: the node works the same without a manager listening.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        tracing::warn!(
            "cannot tell the service manager '{}' through NOTIFY_SOCKET={}: {e}",
            state.replace('\n', " "),
            socket.to_string_lossy()
        );
    }
}

fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    let bytes = socket.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        return send_abstract(&sender, name, state);
    }
    sender.send_to(state.as_bytes(), socket)?;
    Ok(())
}

/// `@name`: a socket in Linux's abstract namespace.
#[cfg(target_os = "linux")]
fn send_abstract(sender: &UnixDatagram, name: &[u8], state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sender.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets (NOTIFY_SOCKET=@...) exist only on Linux",
    ))
}

/// Whether the node is ready, and if not, why not.
pub type ReadyCheck = Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

/// Says `READY=1` once `ready` first holds, and `STOPPING=1` when the node begins to stop.
pub struct Notifier {
    /// Whether the node is ready yet.
    pub ready: ReadyCheck,
    /// What `systemctl status` shows once ready.
    pub status: String,
}

impl Service for Notifier {
    async fn on_start(&mut self, ctx: &Context) -> Result<()> {
        let (ready, status, c) = (self.ready.clone(), self.status.clone(), ctx.clone());
        ctx.spawn("notify-ready", async move {
            let mut said = String::new();
            loop {
                match ready() {
                    Ok(()) => {
                        notify(&format!("READY=1\nSTATUS={status}"));
                        return Ok(());
                    }
                    Err(why) if why != said => {
                        notify(&format!("STATUS=starting: {why}"));
                        said = why;
                    }
                    Err(_) => {}
                }
                if !c.sleep(Duration::from_millis(100)).await {
                    return Ok(());
                }
            }
        });
        Ok(())
    }

    async fn on_stop(&mut self, _ctx: &Context) -> Result<()> {
        notify("STOPPING=1\nSTATUS=stopping");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("mode-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("mode-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
