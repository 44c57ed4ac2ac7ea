//! sd_notify: a test-side notification socket ([`NotifySocket`], reusable by daemon tests that
//! set `NOTIFY_SOCKET` for a real `walship replicate`), and the tests of
//! `walship::systemd::Notifier` against it.
//!
//! Invariant: a [`NotifySocket`] lives in its own temporary directory (path well below the
//! 108-byte `sun_path` limit) and keeps every line it has received, so a test can both wait for
//! one message and check what came before it.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use walship::systemd::Notifier;

/// A bound `AF_UNIX` datagram socket that plays systemd's notification socket.
pub struct NotifySocket {
    /// Keeps the directory (and the socket file) alive.
    _dir: tempfile::TempDir,
    /// The socket's path: pass it as `NOTIFY_SOCKET` or to `Notifier::new`.
    path: PathBuf,
    /// The bound socket.
    socket: UnixDatagram,
    /// Every `KEY=VALUE` line received so far, in order.
    seen: Mutex<Vec<String>>,
}

#[allow(dead_code)] // Shared with the daemon tests; not every helper is used everywhere.
impl NotifySocket {
    /// Binds a fresh socket in a new temporary directory.
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir for the notify socket");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            _dir: dir,
            path,
            socket,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives one datagram (all its lines, joined by `\n`), or `None` after `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<String> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("set_read_timeout");
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.socket.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        self.seen
            .lock()
            .expect("seen lock")
            .extend(text.lines().map(str::to_owned));
        Some(text)
    }

    /// Waits up to `timeout` for a line starting with `prefix` (e.g. `"READY=1"`, `"STATUS="`)
    /// and returns that line. Lines received on the way are kept in [`NotifySocket::seen`].
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let msg = self.recv_timeout(left)?;
            if let Some(line) = msg.lines().find(|l| l.starts_with(prefix)) {
                return Some(line.to_owned());
            }
        }
    }

    /// Every line received so far, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("seen lock").clone()
    }
}

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn notifier_sends_each_state() {
    let sock = NotifySocket::bind();
    let n = Notifier::new(
        Some(sock.path().to_path_buf()),
        Some(Duration::from_secs(30)),
    );
    assert!(n.enabled());
    assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
    n.ready();
    n.status("replicated to 1/1 replicas,\nlag 12 ms");
    n.watchdog();
    n.extend_timeout(Duration::from_secs(90));
    n.reloading();
    n.stopping();
    assert_eq!(sock.wait_for("READY=", WAIT).as_deref(), Some("READY=1"));
    assert_eq!(
        sock.wait_for("STATUS=", WAIT).as_deref(),
        Some("STATUS=replicated to 1/1 replicas, lag 12 ms"),
        "newlines in a status become spaces"
    );
    assert_eq!(
        sock.wait_for("WATCHDOG=", WAIT).as_deref(),
        Some("WATCHDOG=1")
    );
    assert_eq!(
        sock.wait_for("EXTEND_TIMEOUT_USEC=", WAIT).as_deref(),
        Some("EXTEND_TIMEOUT_USEC=90000000")
    );
    assert_eq!(
        sock.wait_for("RELOADING=", WAIT).as_deref(),
        Some("RELOADING=1")
    );
    assert_eq!(
        sock.wait_for("STOPPING=", WAIT).as_deref(),
        Some("STOPPING=1")
    );
    assert_eq!(sock.seen().len(), 6, "one line per call: {:?}", sock.seen());
}

#[test]
fn watchdog_is_silent_without_a_timeout() {
    let sock = NotifySocket::bind();
    let n = Notifier::new(Some(sock.path().to_path_buf()), None);
    assert_eq!(n.watchdog_interval(), None);
    n.watchdog();
    n.ready();
    assert_eq!(sock.recv_timeout(WAIT).as_deref(), Some("READY=1"));
}

#[test]
fn notifier_reaches_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("walship-test-{}-{:?}", std::process::id(), Instant::now());
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
    let server = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
    server
        .set_read_timeout(Some(WAIT))
        .expect("set_read_timeout");
    Notifier::new(Some(PathBuf::from(format!("@{name}"))), None).ready();
    let mut buf = [0u8; 64];
    let n = server
        .recv(&mut buf)
        .expect("READY=1 on the abstract socket");
    assert_eq!(&buf[..n], b"READY=1");
}

#[test]
fn without_a_socket_nothing_happens_and_nothing_fails() {
    let n = Notifier::new(None, Some(Duration::from_secs(30)));
    assert!(!n.enabled());
    n.ready();
    n.status("x");
    n.watchdog();
    n.stopping();
    n.reloading();
    n.extend_timeout(Duration::from_secs(1));

    // A socket that is gone: send errors are swallowed.
    let dir = tempfile::tempdir().expect("tempdir");
    let n = Notifier::new(Some(dir.path().join("missing.sock")), None);
    assert!(n.enabled());
    n.ready();
    n.stopping();
}
