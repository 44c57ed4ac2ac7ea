//! Living under systemd: readiness and watchdog notifications, journald-aware logging, and
//! credentials passed in by the unit (`LoadCredential=`).
//!
//! Invariants:
//! - Outside systemd everything here is silent: a [`Notifier`] without a socket does nothing, and
//!   logging goes to stderr. Nothing in this module can make walship fail: a notification that
//!   cannot be sent is logged at debug level and forgotten (systemd notices a missing `READY=1` or
//!   `WATCHDOG=1` by itself, which is exactly the signal it needs).
//! - `WATCHDOG_USEC` is honoured only when `WATCHDOG_PID` is unset or names this process, so a
//!   child that inherited the environment never pings on behalf of its parent (the `sd-notify`
//!   crate reads both). Notifications go through one socket created at start, not one per
//!   message as `sd_notify::notify` does: the status changes with every commit.
//! - Notifications are single datagrams of `KEY=VALUE` lines; a `STATUS=` text never carries a
//!   newline (it would be read as a new key).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where notifications go: a socket path, or a Linux abstract socket name (`@name` in
/// `NOTIFY_SOCKET`, stored without the `@`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

#[derive(Debug)]
struct Inner {
    /// The unbound datagram socket we send from.
    socket: UnixDatagram,
    /// systemd's notification socket.
    address: Address,
}

/// Sends `sd_notify(3)` messages to the service manager.
///
/// Cheap to clone and safe to share between threads. Every method is a silent no-op when
/// walship does not run under a service manager that asked for notifications.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    /// `None` when there is nowhere to send to (no `NOTIFY_SOCKET`, or the socket could not be
    /// created).
    inner: Option<Arc<Inner>>,
    /// The watchdog timeout systemd enforces (`WATCHDOG_USEC`), if any applies to us.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier configured from the environment systemd sets for `Type=notify` services:
    /// `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), `WATCHDOG_USEC` and
    /// `WATCHDOG_PID` (read by `sd_notify::watchdog_enabled`). No socket disables notifications;
    /// a missing or malformed `WATCHDOG_USEC`, or a `WATCHDOG_PID` naming another process,
    /// disables the watchdog.
    pub(crate) fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from);
        Notifier::new(socket, sd_notify::watchdog_enabled())
    }

    /// A notifier sending to `socket` (a path, or `@name` for an abstract socket), with the
    /// watchdog timeout `watchdog`. Tests bind their own socket and pass its path here.
    pub fn new(socket: Option<PathBuf>, watchdog: Option<Duration>) -> Notifier {
        let inner = socket.and_then(|path| {
            let bytes = path.as_os_str().as_encoded_bytes();
            let address = match bytes.strip_prefix(b"@") {
                Some(name) if !name.is_empty() => Address::Abstract(name.to_vec()),
                _ if bytes.is_empty() => return None,
                _ => Address::Path(path.clone()),
            };
            match UnixDatagram::unbound() {
                Ok(socket) => Some(Arc::new(Inner { socket, address })),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot create the sd_notify socket");
                    None
                }
            }
        });
        Notifier {
            inner,
            watchdog: watchdog.filter(|d| !d.is_zero()),
        }
    }

    /// True when notifications are sent somewhere (walship runs as a `Type=notify` service).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// How often to call [`Notifier::watchdog`]: half of systemd's timeout, as `sd_watchdog_enabled(3)`
    /// recommends; `None` when no watchdog applies to this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// `READY=1`: startup is complete (the database is open and the first sync is done).
    pub fn ready(&self) {
        self.notify("READY=1");
    }

    /// `STATUS=...`: a one-line status that `systemctl status` shows. Newlines are replaced by
    /// spaces.
    pub fn status(&self, status: &str) {
        if self.enabled() {
            let line: String = status
                .chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                .collect();
            self.notify(&format!("STATUS={line}"));
        }
    }

    /// `WATCHDOG=1`: the work loop is alive. Call it from the loop that does the work, every
    /// [`Notifier::watchdog_interval`], so that a hung loop gets the process killed. Sent only
    /// when a watchdog applies to this process.
    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.notify("WATCHDOG=1");
        }
    }

    /// `STOPPING=1`: shutdown has begun (pending data is being shipped).
    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }

    /// `RELOADING=1`: the configuration is being reloaded; send [`Notifier::ready`] when done.
    /// (No `MONOTONIC_USEC=`: that is needed only for `Type=notify-reload`, which the unit does
    /// not use.)
    pub fn reloading(&self) {
        self.notify("RELOADING=1");
    }

    /// `EXTEND_TIMEOUT_USEC=...`: asks systemd for `extra` more time than the unit's
    /// `TimeoutStartSec=`/`TimeoutStopSec=` from now, e.g. while a first snapshot or the final
    /// flush is still making progress. Repeat it before it runs out.
    pub fn extend_timeout(&self, extra: Duration) {
        self.notify(&format!("EXTEND_TIMEOUT_USEC={}", extra.as_micros()));
    }

    /// Sends raw `KEY=VALUE` lines (one datagram). Errors are logged at debug level only.
    pub(crate) fn notify(&self, state: &str) {
        let Some(inner) = &self.inner else { return };
        let sent = match &inner.address {
            Address::Path(p) => inner.socket.send_to(state.as_bytes(), p),
            Address::Abstract(name) => send_abstract(&inner.socket, name, state.as_bytes()),
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, state, "sd_notify failed");
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(socket: &UnixDatagram, name: &[u8], buf: &[u8]) -> std::io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(buf, &addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> std::io::Result<usize> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist on Linux only",
    ))
}

/// Sets up logging once, from `main`; later calls do nothing.
///
/// - When stderr is connected to the journal (`JOURNAL_STREAM` names stderr's device and inode),
///   events go to journald with their fields as journal fields (upper-cased, no prefix: the
///   engine's `db`, `replica`, `generation`, `position`, `error_kind` become `DB=`, `REPLICA=`,
///   ..., so `journalctl -u walship@fruits REPLICA=alpha` works). If journald's socket is
///   missing, it falls back to stderr.
/// - Otherwise human-readable lines go to stderr, with ANSI colours only when stderr is a
///   terminal and `NO_COLOR` is unset.
/// - The filter comes from `WALSHIP_LOG`, else `RUST_LOG` (`tracing_subscriber::EnvFilter`
///   syntax); without either: `walship=info,warn`, `walship=debug,warn` with `-v`,
///   `walship=trace,info` with `-vv`, `warn` with `quiet`. Dependencies stay at `warn` so
///   their debug and trace noise never shows by default.
pub fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;

    let default = if quiet {
        "warn"
    } else {
        match verbose {
            0 => "walship=info,warn",
            1 => "walship=debug,warn",
            _ => "walship=trace,info",
        }
    };
    let mut bad_filter = None;
    let filter = match ["WALSHIP_LOG", "RUST_LOG"].iter().find_map(|k| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (*k, v))
    }) {
        Some((key, spec)) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            bad_filter = Some(format!("ignoring {key}={spec:?}: {e}"));
            EnvFilter::new(default)
        }),
        None => EnvFilter::new(default),
    };

    let journald = if stderr_is_journal() {
        tracing_journald::layer()
            .map(|l| {
                l.with_field_prefix(None)
                    .with_syslog_identifier("walship".to_owned())
            })
            .ok()
    } else {
        None
    };
    let result = if let Some(layer) = journald {
        tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
    } else {
        use std::io::IsTerminal;
        let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_target(false);
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init()
    };
    if result.is_ok() {
        if let Some(msg) = bad_filter {
            tracing::warn!("{msg}");
        }
    }
}

/// True when stderr is the journal stream systemd connected us to (`JOURNAL_STREAM=dev:ino`
/// equals stderr's `fstat`), as `systemd.exec(5)` recommends checking.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream
        .to_str()
        .and_then(|s| s.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
    else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// Prefix of the credential that carries a replica's private key: `walship-key-<replica name>`.
pub(crate) const KEY_CREDENTIAL_PREFIX: &str = "walship-key-";

/// Prefix of the credential that carries a replica's key passphrase:
/// `walship-passphrase-<replica name>`.
pub(crate) const PASSPHRASE_CREDENTIAL_PREFIX: &str = "walship-passphrase-";

/// Prefix of the credential that carries an S3 replica's credentials file:
/// `walship-s3-<replica name>`.
pub(crate) const S3_CREDENTIAL_PREFIX: &str = "walship-s3-";

/// The file systemd passed as credential `name` (`LoadCredential=name:...` in the unit):
/// `$CREDENTIALS_DIRECTORY/<name>` if that variable is set and the file exists. Names with a
/// `/` or that are `.`/`..` are never looked up.
///
/// [`crate::config::ReplicaSettings::access`] prefers these credentials over the replica's
/// `key-path` and `passphrase-file`: the generator wires root-only keys in that way.
pub(crate) fn credential_path(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return None;
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = Path::new(&dir).join(name);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_half_the_timeout() {
        let n = Notifier::new(None, Some(Duration::from_secs(30)));
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        assert!(!n.enabled());
        assert_eq!(Notifier::new(None, None).watchdog_interval(), None);
    }

    #[test]
    fn credential_names_cannot_escape() {
        assert_eq!(credential_path("../etc/passwd"), None);
        assert_eq!(credential_path(".."), None);
        assert_eq!(credential_path(""), None);
    }
}
