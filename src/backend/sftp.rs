//! The `sftp://USER@HOST[:PORT]/PATH` target: a replica on an SSH server (typically a chrooted,
//! SFTP-only OpenSSH account), reached with the `ssh2` crate (libssh2).
//!
//! Invariants and decisions:
//! - **Never hangs.** `Session::set_timeout` is always set, so every blocking libssh2 call
//!   (handshake, auth, each SFTP request) fails with a timeout after [`SftpOptions::timeout`];
//!   the TCP connect has the same bound. A connection-class failure (timeout, reset, EOF) marks
//!   the session broken and shuts its socket down, so later clean-up calls fail at once instead
//!   of waiting again; the next operation connects afresh. Nothing here sleeps or backs off: the
//!   engine above does. The one exception to "fail and let the caller retry": a *reused* session
//!   that turns out dead (socket error, not a timeout) is replaced once, immediately, before the
//!   operation has consumed any input, because an idle session going stale (server restarted,
//!   NAT expiry) is normal and not an outage.
//! - **One session per target**, created lazily and reused; operations on one target are
//!   serialized by a mutex. A reader returned by [`Backend::read`] keeps its own handle on the
//!   session and does not hold that mutex (ssh2 serializes the underlying calls).
//! - **Host keys are verified by walship itself** against an OpenSSH `known_hosts` file (see
//!   [`super::known_hosts`]; libssh2's own check gets port semantics wrong).
//! - **Atomic, durable writes**: the body goes to `dir/.walship-tmp-...` with large writes (libssh2
//!   pipelines only within one write call), is fsynced with `fsync@openssh.com`, and renamed to
//!   the final name. OpenSSH speaks SFTP v3, whose rename fails onto an existing name (uploads
//!   do not use the second channel's `posix-rename@openssh.com`, see below: their names are
//!   new). So an overwrite is: try the rename; if it fails and the final name exists, unlink
//!   it and rename again. Crash window: between that unlink and that rename (one round trip)
//!   the final name is missing and the new content sits in the
//!   temporary file, which [`Backend::cleanup`] would later remove. walship's engine never
//!   overwrites (every file name is unique), so only callers that overwrite are exposed.
//!   After the rename the directory itself is fsynced: OpenSSH's sftp-server opens a directory
//!   with `open(2)` when asked to open it as a file, and `fsync@openssh.com` on that handle is
//!   `fsync(2)` of the directory, which makes the rename durable on Linux. A server that refuses
//!   this only costs durability of the name, and is logged once per session at debug level.
//! - **Appends and renames** ([`Backend::append`], [`Backend::rename`], per commit on a
//!   growing file) go over a second SFTP channel that walship speaks itself ([`sftp_raw`]):
//!   libssh2 waits for each request's reply before it sends the next, and ssh2 does not
//!   expose `posix-rename@openssh.com`. The file last appended to stays open there, and an
//!   append sends its writes and its `fsync@openssh.com` together: one round trip, where
//!   libssh2 took two (three per commit with the rename; at 100 commits/s that round trip was
//!   ~7% of walship's CPU). The handle follows the file through a rename; it is closed when
//!   the next append is to another file, after an error (unless the session is given up), and
//!   when its name is written or deleted, and it dies with the session (a reconnect reopens
//!   the file). `rename` sends `posix-rename@openssh.com` (rename(2) on the server: atomic,
//!   replacing the target). A server that refuses the second channel gets the two-step
//!   overwrite described above for renames, and after one failed append, a new file per
//!   upload (`can_append` turns false).
//! - **Hostile servers**: names from listings containing `/`, NUL or control characters, `.`,
//!   `..`, or that are not UTF-8 are skipped and logged; symlinks and special files are skipped;
//!   sizes are only numbers reported back. Paths sent to the server are built only from
//!   [`check_path`]-checked components.

use super::known_hosts::{self, HostKey, Verdict};
use super::sftp_raw::{self, RawSftp};
use super::{check_path, split_parent, Backend, BackendError, Entry, ErrorKind, Result};
use crate::durable::{temp_name, TEMP_PREFIX};
use crate::url::SftpUrl;
use ssh2::{ErrorCode, FileType, MethodType, OpenFlags, OpenType, Session, Sftp};
use std::collections::HashSet;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Default for [`SftpOptions::timeout`].
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Size of each write call on an upload: libssh2 pipelines SFTP writes only within one call.
const WRITE_CHUNK: usize = 1024 * 1024;

/// Buffer in front of downloads, so small caller reads still become large pipelined requests.
const READ_BUF: usize = 1024 * 1024;

/// Interval (seconds) for SSH keepalives; libssh2 sends one from the next call after it elapses.
const KEEPALIVE_SECS: u32 = 15;

// libssh2 numeric codes used below (from libssh2.h / libssh2_sftp.h).
const LIBSSH2_ERROR_FILE: i32 = -16;
const LIBSSH2_ERROR_TIMEOUT: i32 = -9;
const LIBSSH2_ERROR_AUTHENTICATION_FAILED: i32 = -18;
const LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED: i32 = -19;
const FX_NO_SUCH_FILE: i32 = 2;
const FX_PERMISSION_DENIED: i32 = 3;
const FX_FAILURE: i32 = 4;
const FX_NO_CONNECTION: i32 = 6;
const FX_CONNECTION_LOST: i32 = 7;
const FX_OP_UNSUPPORTED: i32 = 8;
const FX_NO_SUCH_PATH: i32 = 10;
const FX_FILE_ALREADY_EXISTS: i32 = 11;
const FX_WRITE_PROTECT: i32 = 12;
const FX_NO_SPACE: i32 = 14;
const FX_QUOTA_EXCEEDED: i32 = 15;
const FX_DIR_NOT_EMPTY: i32 = 18;

/// How to reach and authenticate to an SFTP replica.
#[derive(Debug, Clone)]
pub struct SftpOptions {
    /// Where the replica lives.
    pub url: SftpUrl,
    /// The private key (OpenSSH or PEM format: ed25519, RSA, ECDSA) used to log in.
    pub key_path: PathBuf,
    /// A file whose first line is the key's passphrase, if the key is encrypted.
    pub passphrase_file: Option<PathBuf>,
    /// The OpenSSH-format file that host keys are checked against (missing = nothing trusted).
    pub known_hosts: PathBuf,
    /// Try the keys of a running ssh-agent (`SSH_AUTH_SOCK`) before `key_path`.
    pub use_agent: bool,
    /// Bound on connecting and on every single network operation.
    pub timeout: Duration,
}

impl SftpOptions {
    /// Options logging in with `key_path` and checking host keys against `known_hosts`, with
    /// no passphrase, no agent and [`DEFAULT_TIMEOUT`].
    pub fn new(
        url: SftpUrl,
        key_path: impl Into<PathBuf>,
        known_hosts: impl Into<PathBuf>,
    ) -> SftpOptions {
        SftpOptions {
            url,
            key_path: key_path.into(),
            passphrase_file: None,
            known_hosts: known_hosts.into(),
            use_agent: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// One live SSH session with its SFTP channel.
struct Conn {
    /// The SFTP subsystem channel (dropped before the session).
    sftp: Sftp,
    /// The SSH session, kept for keepalives.
    sess: Session,
    /// A clone of the TCP socket, to shut it down when the session is given up.
    sock: TcpStream,
    /// Set once a connection-class error was seen: the session must not be reused.
    broken: AtomicBool,
    /// Directories known to exist on the server (full remote paths), to skip mkdir round trips.
    dirs: Mutex<HashSet<String>>,
    /// Whether fsync of a directory handle worked (cleared the first time the server refuses).
    dir_fsync: AtomicBool,
    /// The second SFTP channel, for appends and renames (see [`sftp_raw`]), with the file last
    /// appended to.
    raw: Mutex<RawChannel>,
}

/// The session's second SFTP channel (opened by the first append or rename; `None` once the
/// server refused it) and the file last appended to, kept open there for the next append
/// (see [`Backend::append`]). Both live and die with the session: a reconnect never reuses a
/// handle of the old one.
#[derive(Default)]
struct RawChannel {
    tried: bool,
    sftp: Option<RawSftp>,
    tail: Option<RemoteTail>,
}

/// An open remote file being appended to.
struct RemoteTail {
    /// Its full remote path now (updated by a rename).
    full: String,
    handle: sftp_raw::Handle,
    /// Its size as the last append left it.
    len: u64,
}

impl RawChannel {
    /// The channel, opened now if it was not tried yet; `None` if the server refuses it. Only
    /// a connection-class failure is an error.
    fn open(
        &mut self,
        sess: &Session,
        url: &SftpUrl,
    ) -> std::result::Result<Option<&mut RawSftp>, ssh2::Error> {
        if !self.tried {
            match RawSftp::open(sess) {
                Ok(r) => self.sftp = Some(r),
                Err(e) if !sftp_raw::refused(&e) => return Err(e),
                Err(e) => tracing::debug!(target = %url,
                    "cannot open a second SFTP channel ({e}): renames replace an existing name \
                     in two steps, and uploads are never appended to"),
            }
            self.tried = true;
        }
        Ok(self.sftp.as_mut())
    }

    /// Closes the open tail's handle (while the server answers: after a connection-class
    /// error the session, and its handles with it, is given up anyway).
    fn close_tail(&mut self) {
        if let (Some(t), Some(r)) = (self.tail.take(), self.sftp.as_mut()) {
            let _ = r.close(t.handle);
        }
    }
}

impl Conn {
    /// Marks the session dead and shuts its socket so that pending clean-up fails fast.
    fn give_up(&self) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            let _ = self.sock.shutdown(Shutdown::Both);
        }
    }

    fn dirs(&self) -> MutexGuard<'_, HashSet<String>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raw(&self) -> MutexGuard<'_, RawChannel> {
        self.raw.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the open tail if it is `full`, whose name is about to hold another file.
    fn forget_tail(&self, full: &str) {
        let mut raw = self.raw();
        if raw.tail.as_ref().is_some_and(|t| t.full == full) {
            raw.close_tail();
        }
    }
}

/// True for errors after which the session can't be trusted (timeouts, socket errors).
fn is_conn_err(e: &ssh2::Error) -> bool {
    match e.code() {
        ErrorCode::Session(_) => true,
        ErrorCode::SFTP(c) => c == FX_NO_CONNECTION || c == FX_CONNECTION_LOST,
    }
}

fn sftp_code(e: &ssh2::Error) -> Option<i32> {
    match e.code() {
        ErrorCode::SFTP(c) => Some(c),
        ErrorCode::Session(_) => None,
    }
}

/// A replica directory on an SFTP server. See the module documentation for its guarantees.
pub struct SftpBackend {
    opts: SftpOptions,
    /// The current session, if any; `None` until the first operation or after a failure.
    conn: Mutex<Option<Arc<Conn>>>,
    /// Cleared once a session found that the server cannot append (no second SFTP channel,
    /// or no `fsync@openssh.com`): uploads then create a file each.
    appends: AtomicBool,
}

impl fmt::Debug for SftpBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SftpBackend")
            .field("url", &self.opts.url.to_string())
            .finish_non_exhaustive()
    }
}

/// A failure inside one operation, before it is turned into a [`BackendError`].
enum Fail {
    /// An ssh2 error from the server or the session.
    Ssh(ssh2::Error),
    /// A finished error (connect, host key, source reader...).
    Done(BackendError),
}

impl From<ssh2::Error> for Fail {
    fn from(e: ssh2::Error) -> Fail {
        Fail::Ssh(e)
    }
}

impl From<BackendError> for Fail {
    fn from(e: BackendError) -> Fail {
        Fail::Done(e)
    }
}

type OpResult<T> = std::result::Result<T, Fail>;

impl SftpBackend {
    /// A target for `opts`; nothing is contacted until the first operation.
    pub fn new(opts: SftpOptions) -> SftpBackend {
        SftpBackend {
            opts,
            conn: Mutex::new(None),
            appends: AtomicBool::new(true),
        }
    }

    /// The full remote path of a checked relative path (`""` is the replica root).
    fn remote(&self, rel: &str) -> String {
        if rel.is_empty() {
            format!("/{}", self.opts.url.path)
        } else {
            format!("/{}/{rel}", self.opts.url.path)
        }
    }

    /// The URL of a relative path, for messages.
    fn where_(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.opts.url.to_string()
        } else {
            format!("{}/{rel}", self.opts.url)
        }
    }

    /// Human cause and kind for an ssh2 error.
    fn describe(&self, e: &ssh2::Error) -> (ErrorKind, String) {
        let t = self.opts.timeout;
        match e.code() {
            ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT) => (
                ErrorKind::Unavailable,
                format!("timed out after {t:?} (server not responding)"),
            ),
            ErrorCode::Session(c) => (
                ErrorKind::Unavailable,
                format!("connection failed: {} (libssh2 error {c})", e.message()),
            ),
            ErrorCode::SFTP(c) => {
                let kind = match c {
                    FX_NO_SUCH_FILE | FX_NO_SUCH_PATH => ErrorKind::NotFound,
                    FX_NO_CONNECTION | FX_CONNECTION_LOST => ErrorKind::Unavailable,
                    _ => ErrorKind::Other,
                };
                let why = match c {
                    FX_NO_SUCH_FILE | FX_NO_SUCH_PATH => "no such file or directory".to_owned(),
                    FX_PERMISSION_DENIED => "permission denied".to_owned(),
                    FX_NO_CONNECTION | FX_CONNECTION_LOST => "connection lost".to_owned(),
                    FX_OP_UNSUPPORTED => "operation not supported by the server".to_owned(),
                    FX_FILE_ALREADY_EXISTS => "file already exists".to_owned(),
                    FX_WRITE_PROTECT => "read-only file system".to_owned(),
                    FX_NO_SPACE => "no space left on the server".to_owned(),
                    FX_QUOTA_EXCEEDED => "quota exceeded".to_owned(),
                    FX_FAILURE => "the server reported a failure".to_owned(),
                    _ => format!("{} (SFTP status {c})", e.message()),
                };
                (kind, why)
            }
        }
    }

    /// Turns a failure of `op` on the remote path shown as `shown` into a [`BackendError`].
    fn error(&self, op: &str, shown: &str, f: Fail) -> BackendError {
        match f {
            Fail::Done(e) => e,
            Fail::Ssh(e) => {
                let (kind, why) = self.describe(&e);
                BackendError::new(kind, format!("failed to {op} {shown}: {why}"))
            }
        }
    }

    /// Forgets the session's open append handle if it is `full` (see [`Conn::forget_tail`]).
    fn forget_tail(&self, full: &str) {
        if let Some(c) = self.lock().as_ref() {
            c.forget_tail(full);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Arc<Conn>>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with a live session, connecting if needed. A connection-class error drops the
    /// session. If a reused session fails with a socket error (not a timeout) while `retryable`
    /// says nothing irreversible happened yet, `f` runs once more on a fresh session.
    fn with_conn<T>(
        &self,
        mut f: impl FnMut(&Arc<Conn>) -> OpResult<T>,
        retryable: impl Fn() -> bool,
    ) -> OpResult<T> {
        let mut guard = self.lock();
        let mut fresh = false;
        loop {
            let conn = match guard.as_ref() {
                Some(c) if !c.broken.load(Ordering::SeqCst) => Arc::clone(c),
                _ => {
                    *guard = None;
                    let c = Arc::new(self.connect()?);
                    fresh = true;
                    *guard = Some(Arc::clone(&c));
                    c
                }
            };
            let _ = conn.sess.keepalive_send();
            match f(&conn) {
                Ok(v) => return Ok(v),
                Err(Fail::Ssh(e)) if is_conn_err(&e) => {
                    conn.give_up();
                    *guard = None;
                    let timeout = e.code() == ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT);
                    if fresh || timeout || !retryable() {
                        return Err(Fail::Ssh(e));
                    }
                    tracing::debug!(target = %self.opts.url, "stale SFTP session, reconnecting: {e}");
                    // One immediate retry on a new session (`fresh` prevents a third attempt).
                    fresh = true;
                    *guard = Some(Arc::new(self.connect()?));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens a session: TCP connect, handshake, host-key check, public-key auth, SFTP channel.
    fn connect(&self) -> std::result::Result<Conn, BackendError> {
        let o = &self.opts;
        let url = &o.url;
        let fail = |kind, why: String| {
            BackendError::new(kind, format!("failed to connect to {url}: {why}"))
        };
        let (sess, sock) = open_session(&url.host, url.port, o.timeout, &o.known_hosts)
            .map_err(|(k, why)| fail(k, why))?;
        let key = session_host_key(&sess).map_err(|why| fail(ErrorKind::Other, why))?;
        self.verify_host_key(&key)?;
        self.authenticate(&sess)?;
        sess.set_keepalive(false, KEEPALIVE_SECS);
        let sftp = sess.sftp().map_err(|e| {
            let (kind, why) = self.describe(&e);
            fail(kind, format!("could not start the SFTP subsystem: {why}"))
        })?;
        tracing::debug!(
            target = %url,
            cipher = sess.methods(MethodType::CryptCs).unwrap_or("?"),
            "SFTP session established"
        );
        Ok(Conn {
            sftp,
            sess,
            sock,
            broken: AtomicBool::new(false),
            dirs: Mutex::new(HashSet::new()),
            dir_fsync: AtomicBool::new(true),
            raw: Mutex::new(RawChannel::default()),
        })
    }

    fn verify_host_key(&self, key: &HostKey) -> std::result::Result<(), BackendError> {
        let o = &self.opts;
        let url = &o.url;
        let kh = o.known_hosts.display();
        let verdict =
            known_hosts::check(&o.known_hosts, &url.host, url.port, key).map_err(|e| {
                BackendError::new(
                    ErrorKind::Other,
                    format!("failed to connect to {url}: cannot read known_hosts file {kh}: {e}"),
                )
            })?;
        let fp = key.fingerprint();
        match verdict {
            Verdict::Known => Ok(()),
            Verdict::Unknown => Err(BackendError::new(
                ErrorKind::Other,
                format!(
                    "failed to connect to {url}: host key of {} is not trusted: the server offered \
                     {} key {fp}, which is not in {kh}; after checking that fingerprint with the \
                     server's admin, run: walship trust {url} --known-hosts {kh} --fingerprint {fp}",
                    url.host_port(),
                    key.key_type
                ),
            )),
            Verdict::Changed(old) => {
                let old: Vec<String> = old
                    .iter()
                    .map(|k| format!("{} {}", k.key_type, k.fingerprint()))
                    .collect();
                Err(BackendError::new(
                    ErrorKind::Other,
                    format!(
                        "failed to connect to {url}: WARNING: THE HOST KEY OF {} HAS CHANGED \
                         (possible man-in-the-middle attack): {kh} has {}, the server offered {} \
                         {fp}; refusing to connect. If the server's key was replaced on purpose, \
                         verify the new fingerprint and run: walship trust {url} --known-hosts {kh} \
                         --fingerprint {fp} --yes",
                        url.host_port(),
                        old.join(", "),
                        key.key_type
                    ),
                ))
            }
            Verdict::Revoked => Err(BackendError::new(
                ErrorKind::Other,
                format!(
                    "failed to connect to {url}: the host key {} {fp} of {} is marked @revoked \
                     in {kh}; refusing to connect",
                    key.key_type,
                    url.host_port()
                ),
            )),
        }
    }

    fn authenticate(&self, sess: &Session) -> std::result::Result<(), BackendError> {
        let o = &self.opts;
        let url = &o.url;
        let fail = |kind, why: String| {
            BackendError::new(kind, format!("failed to connect to {url}: {why}"))
        };
        let conn_fail = |e: &ssh2::Error| {
            let (k, why) = self.describe(e);
            fail(k, format!("authentication did not complete: {why}"))
        };
        if o.use_agent {
            match sess.userauth_agent(&url.user) {
                Ok(()) if sess.authenticated() => return Ok(()),
                Ok(()) => {}
                Err(e) if e.code() == ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT) => {
                    return Err(conn_fail(&e))
                }
                Err(e) => tracing::debug!(target = %url, "ssh-agent authentication failed: {e}"),
            }
        }
        let key = &o.key_path;
        if let Err(e) = std::fs::File::open(key) {
            return Err(fail(
                ErrorKind::Other,
                format!("cannot read private key {}: {e}", key.display()),
            ));
        }
        let passphrase = match &o.passphrase_file {
            None => None,
            Some(p) => {
                let s = std::fs::read_to_string(p).map_err(|e| {
                    fail(
                        ErrorKind::Other,
                        format!("cannot read passphrase file {}: {e}", p.display()),
                    )
                })?;
                Some(s.lines().next().unwrap_or("").to_owned())
            }
        };
        match sess.userauth_pubkey_file(&url.user, None, key, passphrase.as_deref()) {
            Ok(()) if sess.authenticated() => Ok(()),
            Ok(()) => Err(fail(
                ErrorKind::Other,
                "the server wants more than a public key to log in".to_owned(),
            )),
            Err(e) => match e.code() {
                ErrorCode::Session(
                    LIBSSH2_ERROR_AUTHENTICATION_FAILED | LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED,
                ) => Err(fail(
                    ErrorKind::Other,
                    format!(
                        "the server refused key {} for user {} (is its public key in the \
                         server's authorized keys for that user?)",
                        key.display(),
                        url.user
                    ),
                )),
                ErrorCode::Session(LIBSSH2_ERROR_FILE) => Err(fail(
                    ErrorKind::Other,
                    format!(
                        "cannot use private key {}: {} (wrong or missing passphrase, or an \
                         unsupported key format)",
                        key.display(),
                        e.message()
                    ),
                )),
                _ if is_conn_err(&e) => Err(conn_fail(&e)),
                _ => Err(fail(
                    ErrorKind::Other,
                    format!("public key authentication failed: {}", e.message()),
                )),
            },
        }
    }

    /// Makes sure the remote directory `full` exists, creating missing components below the
    /// server's root. Components already known to exist are skipped.
    /// On failure returns the directory that could not be created and the server's error
    /// (`None`: a non-directory is in the way).
    fn ensure_dir(
        &self,
        c: &Conn,
        full: &str,
    ) -> std::result::Result<(), (String, Option<ssh2::Error>)> {
        if c.dirs().contains(full) {
            return Ok(());
        }
        // Fast path: it usually exists already.
        if let Ok(st) = c.sftp.stat(Path::new(full)) {
            if st.is_dir() {
                c.dirs().insert(full.to_owned());
                return Ok(());
            }
        }
        let mut cur = String::new();
        for comp in full.split('/').filter(|s| !s.is_empty()) {
            cur.push('/');
            cur.push_str(comp);
            if c.dirs().contains(&cur) {
                continue;
            }
            match c.sftp.mkdir(Path::new(&cur), 0o755) {
                // Make the new directory's name durable in its parent.
                Ok(()) => {
                    let parent = split_parent(&cur).0;
                    let parent = if parent.is_empty() { "/" } else { parent };
                    Self::fsync_dir(c, parent).map_err(|e| (cur.clone(), Some(e)))?;
                }
                Err(e) if is_conn_err(&e) => return Err((cur, Some(e))),
                Err(e) => match c.sftp.stat(Path::new(&cur)) {
                    Ok(st) if st.is_dir() => {}
                    Ok(_) => return Err((cur, None)),
                    Err(se) if is_conn_err(&se) => return Err((cur, Some(se))),
                    // Report the mkdir error (e.g. permission denied), not the stat's.
                    Err(_) => return Err((cur, Some(e))),
                },
            }
            c.dirs().insert(cur.clone());
        }
        Ok(())
    }

    /// The URL form of a full remote path, for messages.
    fn shown_full(&self, full: &str) -> String {
        let u = &self.opts.url;
        let host = if u.host.contains(':') {
            format!("[{}]", u.host)
        } else {
            u.host.clone()
        };
        let port = if u.port == 22 {
            String::new()
        } else {
            format!(":{}", u.port)
        };
        format!("sftp://{}@{host}{port}{full}", u.user)
    }

    /// fsyncs the directory `full` (see the module doc); failures only cost durability.
    fn fsync_dir(c: &Conn, full: &str) -> std::result::Result<(), ssh2::Error> {
        if !c.dir_fsync.load(Ordering::Relaxed) {
            return Ok(());
        }
        let r = c
            .sftp
            .open_mode(Path::new(full), OpenFlags::READ, 0, OpenType::File)
            .and_then(|mut d| {
                d.fsync()?;
                d.close()
            });
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_conn_err(&e) => Err(e),
            Err(e) => {
                c.dir_fsync.store(false, Ordering::Relaxed);
                tracing::debug!(
                    "the server cannot fsync directories ({e}); renames are atomic but may not \
                     survive a power cut on the server"
                );
                Ok(())
            }
        }
    }

    /// The body of `write_atomic` on one session. `consumed` is set once `data` was read from.
    fn upload(
        &self,
        c: &Conn,
        path: &str,
        data: &mut dyn Read,
        consumed: &AtomicBool,
    ) -> OpResult<u64> {
        let (parent, _) = split_parent(path);
        let dir = self.remote(parent);
        self.upload_dir(c, &dir)?;
        let tmp = format!("{dir}/{}", temp_name());
        let fin = self.remote(path);
        let mut file = Self::create_temp(c, &tmp)?;
        let total = match self.write_body(c, &mut file, path, data, consumed) {
            Ok(t) => t,
            Err(f) => {
                drop(file);
                if !matches!(&f, Fail::Ssh(e) if is_conn_err(e)) {
                    let _ = c.sftp.unlink(Path::new(&tmp));
                }
                return Err(f);
            }
        };
        if let Err(e) = self.rename_over(c, &tmp, &fin) {
            if !is_conn_err(&e) {
                let _ = c.sftp.unlink(Path::new(&tmp));
            }
            return Err(Fail::Ssh(e));
        }
        Self::fsync_dir(c, &dir)?;
        Ok(total)
    }

    /// Makes sure the upload's directory `dir` (a full remote path) exists.
    fn upload_dir(&self, c: &Conn, dir: &str) -> OpResult<()> {
        let Err((at, e)) = self.ensure_dir(c, dir) else {
            return Ok(());
        };
        let shown = self.shown_full(&at);
        Err(match e {
            Some(e) if is_conn_err(&e) => Fail::Ssh(e),
            Some(e) => Fail::Done(self.error("create directory", &shown, Fail::Ssh(e))),
            None => Fail::Done(BackendError::new(
                ErrorKind::Other,
                format!("failed to create directory {shown}: a file is in the way"),
            )),
        })
    }

    /// Creates the temporary file `tmp` (a full remote path), which must not exist yet.
    fn create_temp(c: &Conn, tmp: &str) -> OpResult<ssh2::File> {
        match c.sftp.open_mode(
            Path::new(tmp),
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
            0o644,
            OpenType::File,
        ) {
            Ok(f) => Ok(f),
            Err(e) if sftp_code(&e) == Some(FX_NO_SUCH_FILE) => {
                // Someone removed the directory behind our back: forget what we knew.
                c.dirs().clear();
                Err(Fail::Ssh(e))
            }
            Err(e) => Err(Fail::Ssh(e)),
        }
    }

    /// Copies `data` into the open temporary `file` in [`WRITE_CHUNK`] writes, then fsyncs and
    /// closes it; returns the bytes written. `path` (the final relative path) names the upload
    /// in errors.
    fn write_body(
        &self,
        c: &Conn,
        file: &mut ssh2::File,
        path: &str,
        data: &mut dyn Read,
        consumed: &AtomicBool,
    ) -> OpResult<u64> {
        let mut buf = vec![0u8; WRITE_CHUNK];
        let mut total = 0u64;
        loop {
            let n = self.fill(&mut buf, path, data, consumed)?;
            if n == 0 {
                break;
            }
            if let Err(e) = file.write_all(&buf[..n]) {
                if !matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::TimedOut) {
                    if let Some(full) = self.no_space(file, path) {
                        c.give_up();
                        return Err(Fail::Done(full));
                    }
                }
                return Err(self.io_fail(c, || format!("upload {path} to {}", self.opts.url), &e));
            }
            total += n as u64;
            if n < buf.len() {
                break;
            }
        }
        for step in [ssh2::File::fsync, ssh2::File::close] {
            if let Err(e) = step(file) {
                if sftp_code(&e) == Some(FX_FAILURE) {
                    if let Some(full) = self.no_space(file, path) {
                        return Err(Fail::Done(full));
                    }
                }
                return Err(Fail::Ssh(e));
            }
        }
        Ok(total)
    }

    /// Reads from `data` until `buf` is full or the source ends; returns the bytes read (0 at
    /// the end). Sets `consumed` before the first read.
    fn fill(
        &self,
        buf: &mut [u8],
        path: &str,
        data: &mut dyn Read,
        consumed: &AtomicBool,
    ) -> OpResult<usize> {
        let mut n = 0;
        while n < buf.len() {
            consumed.store(true, Ordering::SeqCst);
            match data.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Fail::Done(BackendError::new(
                        ErrorKind::Other,
                        format!(
                            "failed to upload {path} to {}: reading the source failed: {e}",
                            self.opts.url
                        ),
                    )))
                }
            }
        }
        Ok(n)
    }

    /// OpenSSH's sftp-server reports a full disk (ENOSPC) as a bare "failure": after a failed
    /// write, fsync or close, this asks the server how much space is left on the file's file
    /// system (`statvfs@openssh.com`) and, if it is (nearly) none, returns the error to show.
    fn no_space(&self, file: &mut ssh2::File, path: &str) -> Option<BackendError> {
        let st = file.statvfs().ok()?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        (free < WRITE_CHUNK as u64).then(|| {
            BackendError::new(
                ErrorKind::Other,
                format!(
                    "failed to upload {path} to {}: no space left on the server ({free} bytes free)",
                    self.opts.url
                ),
            )
        })
    }

    /// Maps an I/O error from an ssh2 file handle (which keeps only a kind and a message) to a
    /// failure; anything but "not found" or a timeout gives the session up, since its state is
    /// unknown. `what` says what failed (`upload x to sftp://...`).
    fn io_fail(&self, c: &Conn, what: impl FnOnce() -> String, e: &io::Error) -> Fail {
        match e.kind() {
            io::ErrorKind::NotFound => Fail::Ssh(ssh2::Error::new(
                ErrorCode::SFTP(FX_NO_SUCH_FILE),
                "no such file",
            )),
            io::ErrorKind::TimedOut => Fail::Ssh(ssh2::Error::new(
                ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT),
                "timed out",
            )),
            _ => {
                c.give_up();
                Fail::Done(BackendError::new(
                    ErrorKind::Unavailable,
                    format!("failed to {}: write failed: {e}", what()),
                ))
            }
        }
    }

    /// Renames `tmp` to `fin`, replacing an existing `fin` (see the module doc for the window).
    fn rename_over(&self, c: &Conn, tmp: &str, fin: &str) -> std::result::Result<(), ssh2::Error> {
        let (tmp, fin) = (Path::new(tmp), Path::new(fin));
        match c.sftp.rename(tmp, fin, None) {
            Ok(()) => Ok(()),
            Err(e) if is_conn_err(&e) => Err(e),
            Err(e) => match c.sftp.lstat(fin) {
                Ok(st) if !st.is_dir() => {
                    c.sftp.unlink(fin)?;
                    c.sftp.rename(tmp, fin, None)
                }
                Ok(_) => Err(e),
                Err(se) if is_conn_err(&se) => Err(se),
                Err(_) => Err(e),
            },
        }
    }

    /// The body of `append` on one session: write `data` at `at` of `full` through the open
    /// handle on the second channel (opened now if it is another file), cutting what lies
    /// past `at` first; the writes and the fsync go in one round trip (see [`sftp_raw`]). Any
    /// failure closes the handle. `shown` names the file in errors.
    fn append_on(&self, c: &Conn, full: &str, at: u64, data: &[u8], shown: &str) -> OpResult<()> {
        let mut raw = c.raw();
        let r = self.append_raw(c, &mut raw, full, at, data, shown);
        match &r {
            Ok(()) => {}
            Err(Fail::Ssh(e)) if is_conn_err(e) => raw.tail = None,
            Err(_) => raw.close_tail(),
        }
        r
    }

    fn append_raw(
        &self,
        c: &Conn,
        raw: &mut RawChannel,
        full: &str,
        at: u64,
        data: &[u8],
        shown: &str,
    ) -> OpResult<()> {
        if raw.tail.as_ref().is_some_and(|t| t.full != full) {
            raw.close_tail();
        }
        if !raw
            .open(&c.sess, &self.opts.url)?
            .is_some_and(|r| r.has(sftp_raw::FSYNC))
        {
            self.appends.store(false, Ordering::Relaxed);
            return Err(Fail::Done(BackendError::new(
                ErrorKind::Other,
                format!(
                    "failed to append to {shown}: the server offers no second SFTP channel with \
                     fsync@openssh.com (uploads create a file each from now on)"
                ),
            )));
        }
        let RawChannel {
            sftp: Some(sftp),
            tail,
            ..
        } = raw
        else {
            return Err(Fail::Done(BackendError::new(
                ErrorKind::Other,
                format!("failed to append to {shown}: internal: no SFTP channel"),
            )));
        };
        let t = match tail {
            Some(t) => t,
            None => {
                let handle = sftp.open_write(full)?;
                // A server that does not say the size gets the file cut to `at` below.
                let len = match sftp.size(&handle) {
                    Ok(len) => len.unwrap_or(u64::MAX),
                    Err(e) => {
                        let _ = sftp.close(handle);
                        return Err(Fail::Ssh(e));
                    }
                };
                tail.insert(RemoteTail {
                    full: full.to_owned(),
                    handle,
                    len,
                })
            }
        };
        if t.len < at {
            return Err(Fail::Done(BackendError::new(
                ErrorKind::Other,
                format!(
                    "failed to append to {shown}: the file holds {} bytes, fewer than the {at} \
                     expected",
                    t.len
                ),
            )));
        }
        // Cut first: a crash after this leaves the first `at` bytes, never what followed.
        let r = if t.len > at {
            sftp.truncate(&t.handle, at)
        } else {
            Ok(())
        }
        .and_then(|()| sftp.write_fsync(&t.handle, at, data));
        if let Err(e) = r {
            // OpenSSH reports a full disk as a bare failure: ask how much space is left.
            if sftp_code(&e) == Some(FX_FAILURE) {
                if let Some(free) = sftp
                    .free_bytes(&t.handle)
                    .filter(|f| *f < WRITE_CHUNK as u64)
                {
                    return Err(Fail::Done(BackendError::new(
                        ErrorKind::Other,
                        format!(
                            "failed to append to {shown}: no space left on the server ({free} \
                             bytes free)"
                        ),
                    )));
                }
            }
            return Err(Fail::Ssh(e));
        }
        t.len = at + data.len() as u64;
        Ok(())
    }

    /// The body of `rename` on one session: `posix-rename@openssh.com` (rename(2) on the
    /// server: atomic, replaces `to`) on the second channel, or where the server lacks it,
    /// [`Self::rename_over`]. The open append handle follows the file.
    fn rename_on(&self, c: &Conn, from: &str, to: &str) -> OpResult<()> {
        let mut raw = c.raw();
        if raw.tail.as_ref().is_some_and(|t| t.full == to) {
            raw.close_tail();
        }
        let r = match raw.open(&c.sess, &self.opts.url)? {
            Some(p) if p.has(sftp_raw::POSIX_RENAME) => p.posix_rename(from, to),
            _ => {
                tracing::debug!(target = %self.opts.url,
                    "the server lacks posix-rename@openssh.com on a second channel; renames \
                     replace an existing name in two steps");
                self.rename_over(c, from, to)
            }
        };
        if let Err(e) = r {
            if is_conn_err(&e) {
                raw.tail = None;
            }
            return Err(Fail::Ssh(e));
        }
        if let Some(t) = raw.tail.as_mut().filter(|t| t.full == from) {
            t.full = to.to_owned();
        }
        Ok(())
    }

    /// Reads the directory `full` with strict name checks; `None` if it does not exist, or
    /// stopped existing while it was read (retention by a running walship). OpenSSH's
    /// sftp-server stats each entry itself and leaves out one that vanished before its stat,
    /// so a listing taken during compaction holds only names that existed.
    fn read_dir(&self, c: &Conn, full: &str) -> OpResult<Option<Vec<(String, ssh2::FileStat)>>> {
        let mut d = match c.sftp.opendir(Path::new(full)) {
            Ok(d) => d,
            Err(e) if matches!(sftp_code(&e), Some(FX_NO_SUCH_FILE | FX_NO_SUCH_PATH)) => {
                return Ok(None)
            }
            Err(e) => return Err(Fail::Ssh(e)),
        };
        let mut out = Vec::new();
        loop {
            let (name, st) = match d.readdir() {
                Ok(x) => x,
                Err(e) if e.code() == ErrorCode::Session(LIBSSH2_ERROR_FILE) => break,
                Err(e) if matches!(sftp_code(&e), Some(FX_NO_SUCH_FILE | FX_NO_SUCH_PATH)) => {
                    return Ok(None)
                }
                Err(e) => return Err(Fail::Ssh(e)),
            };
            let raw = name.as_os_str().as_encoded_bytes();
            if raw == b"." || raw == b".." {
                continue;
            }
            let ok = std::str::from_utf8(raw).ok().filter(|s| {
                !s.is_empty() && !s.contains(['/', '\\']) && !s.chars().any(char::is_control)
            });
            let Some(name) = ok else {
                tracing::warn!(
                    target = %self.opts.url,
                    dir = full,
                    name = ?String::from_utf8_lossy(raw),
                    "skipping a file name from the server that is not a plain name"
                );
                continue;
            };
            out.push((name.to_owned(), st));
        }
        Ok(Some(out))
    }

    /// Connects (if needed) and checks the host key and login, without touching any file.
    ///
    /// # Errors
    /// As for any operation: `Unavailable` if the server can't be reached, `Other` for host-key
    /// or authentication problems.
    pub fn check_connection(&self) -> Result<()> {
        self.with_conn(|_| Ok(()), || true)
            .map_err(|f| self.error("connect to", &self.where_(""), f))
    }
}

/// TCP connect (bounded by `timeout`) and SSH handshake, preferring the host-key types that
/// `known_hosts` lists for this host. Errors are (kind, cause).
fn open_session(
    host: &str,
    port: u16,
    timeout: Duration,
    known_hosts: &Path,
) -> std::result::Result<(Session, TcpStream), (ErrorKind, String)> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            (
                ErrorKind::Unavailable,
                format!("cannot resolve {host}: {e}"),
            )
        })?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(tcp) = tcp else {
        let why = last.map_or_else(|| "no address".to_owned(), |e| e.to_string());
        return Err((
            ErrorKind::Unavailable,
            format!("cannot reach {host} port {port}: {why}"),
        ));
    };
    let _ = tcp.set_nodelay(true);
    let sock = tcp
        .try_clone()
        .map_err(|e| (ErrorKind::Unavailable, format!("socket error: {e}")))?;
    let mut sess =
        Session::new().map_err(|e| (ErrorKind::Other, format!("cannot start libssh2: {e}")))?;
    sess.set_timeout(
        u32::try_from(timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1),
    );
    sess.set_tcp_stream(tcp);
    let known = known_hosts::known_key_types(known_hosts, host, port);
    if !known.is_empty() {
        if let Ok(supported) = sess.supported_algs(MethodType::HostKey) {
            let mut pref: Vec<&str> = Vec::new();
            for t in &known {
                let one = [t.as_str()];
                let algs: &[&str] = if t == "ssh-rsa" {
                    &["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
                } else {
                    &one
                };
                for a in algs {
                    if supported.contains(a) && !pref.contains(a) {
                        pref.push(a);
                    }
                }
            }
            for a in &supported {
                if !pref.contains(a) {
                    pref.push(a);
                }
            }
            let _ = sess.method_pref(MethodType::HostKey, &pref.join(","));
        }
    }
    if let Err(e) = sess.handshake() {
        let _ = sock.shutdown(Shutdown::Both);
        let why = if e.code() == ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT) {
            format!("SSH handshake timed out after {timeout:?} (server not responding)")
        } else {
            format!("SSH handshake failed: {}", e.message())
        };
        return Err((ErrorKind::Unavailable, why));
    }
    Ok((sess, sock))
}

fn session_host_key(sess: &Session) -> std::result::Result<HostKey, String> {
    let (blob, _) = sess
        .host_key()
        .ok_or("the server sent no host key".to_owned())?;
    HostKey::from_blob(blob.to_vec()).map_err(|e| format!("bad host key from the server: {e}"))
}

/// Connects to `host`:`port`, completes the SSH handshake and returns the server's host key,
/// without authenticating (what `walship trust` shows). The key is NOT verified.
///
/// # Errors
/// `Unavailable` if the server can't be reached or does not answer within `timeout`.
pub fn scan_host_key(host: &str, port: u16, timeout: Duration) -> Result<HostKey> {
    let shown = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let fail = |kind, why: String| {
        BackendError::new(
            kind,
            format!("failed to get the host key of {shown}: {why}"),
        )
    };
    let (sess, sock) =
        open_session(host, port, timeout, Path::new("")).map_err(|(k, w)| fail(k, w))?;
    let key = session_host_key(&sess).map_err(|w| fail(ErrorKind::Other, w));
    let _ = sess.disconnect(None, "walship trust: host key scanned", None);
    let _ = sock.shutdown(Shutdown::Both);
    key
}

/// `walship trust`: shows the host key of `url`'s server and adds it to `known_hosts`.
///
/// Prints the host, key type and fingerprint to `out`. The key is added (as `host` or
/// `[host]:port`, atomically, mode 0644, parent directory created) only when `fingerprint`
/// equals the server's fingerprint or `yes` is set; otherwise it prints the command to run and
/// fails. A key already trusted is reported and succeeds. A *different* key already listed for
/// the host is refused unless `yes` (then the host's old single-host lines are replaced).
///
/// # Errors
/// The server can't be reached, the fingerprint does not match, confirmation is missing, or
/// `known_hosts` can't be read or written.
pub fn trust(
    url: &SftpUrl,
    known_hosts: &Path,
    fingerprint: Option<&str>,
    yes: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use anyhow::{bail, Context as _};
    let key = scan_host_key(&url.host, url.port, DEFAULT_TIMEOUT)?;
    let fp = key.fingerprint();
    let name = known_hosts::lookup_name(&url.host, url.port);
    let kh = known_hosts.display();
    writeln!(out, "host:        {name}")?;
    writeln!(out, "key type:    {}", key.key_type)?;
    writeln!(out, "fingerprint: {fp}")?;
    let verdict = known_hosts::check(known_hosts, &url.host, url.port, &key)
        .with_context(|| format!("cannot read known_hosts file {kh}"))?;
    if let Some(want) = fingerprint {
        if want.trim() != fp {
            bail!(
                "the server's host key fingerprint {fp} does not match the expected {}: \
                 refusing to trust it (wrong host, or a man-in-the-middle?)",
                want.trim()
            );
        }
    }
    let replace = match verdict {
        Verdict::Known => {
            writeln!(out, "this key is already trusted in {kh}")?;
            return Ok(());
        }
        Verdict::Revoked => bail!("this host key is marked @revoked in {kh}: refusing to trust it"),
        Verdict::Changed(old) => {
            let old: Vec<String> = old.iter().map(HostKey::fingerprint).collect();
            if !yes {
                bail!(
                    "WARNING: {kh} already has a DIFFERENT key for {name} ({}); the server now \
                     offers {fp}. This may be a man-in-the-middle attack. If the key was replaced \
                     on purpose, run: walship trust {url} --known-hosts {kh} --fingerprint {fp} --yes",
                    old.join(", ")
                );
            }
            writeln!(
                out,
                "replacing the previous key(s) for {name}: {}",
                old.join(", ")
            )?;
            true
        }
        Verdict::Unknown => {
            if fingerprint.is_none() && !yes {
                writeln!(
                    out,
                    "not added: check the fingerprint with the server's admin \
                     (ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub), then run:\n  walship trust \
                     {url} --known-hosts {kh} --fingerprint {fp}",
                    key.key_type
                        .trim_start_matches("ssh-")
                        .split('-')
                        .next()
                        .unwrap_or("")
                )?;
                bail!(
                    "host key of {name} not trusted: confirm it with --fingerprint {fp} (or --yes)"
                );
            }
            false
        }
    };
    known_hosts::add_host_key(known_hosts, &url.host, url.port, &key, replace)
        .with_context(|| format!("failed to update known_hosts file {kh}"))?;
    writeln!(out, "added {name} {} {fp} to {kh}", key.key_type)?;
    Ok(())
}

/// A streaming download: a buffered SFTP file handle that keeps its session alive and marks it
/// broken on connection errors.
struct SftpReader {
    file: BufReader<ssh2::File>,
    conn: Arc<Conn>,
    shown: String,
    timeout: Duration,
}

impl Read for SftpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // ssh2 keeps only a kind and a message in its io::Error: any failure but "not found"
        // gives the session up, since its state is unknown.
        self.file.read(buf).map_err(|e| {
            let (kind, why) = match e.kind() {
                io::ErrorKind::TimedOut => (
                    io::ErrorKind::TimedOut,
                    format!("timed out after {:?} (server not responding)", self.timeout),
                ),
                io::ErrorKind::NotFound => (io::ErrorKind::NotFound, e.to_string()),
                _ => (io::ErrorKind::ConnectionAborted, e.to_string()),
            };
            if kind != io::ErrorKind::NotFound {
                self.conn.give_up();
            }
            io::Error::new(kind, format!("failed to read {}: {why}", self.shown))
        })
    }
}

impl Backend for SftpBackend {
    fn url(&self) -> String {
        self.opts.url.to_string()
    }

    fn root_exists(&self) -> Result<bool> {
        let full = self.remote("");
        let st = self
            .with_conn(
                |c| match c.sftp.stat(Path::new(&full)) {
                    Ok(st) => Ok(Some(st)),
                    Err(e) if matches!(sftp_code(&e), Some(FX_NO_SUCH_FILE | FX_NO_SUCH_PATH)) => {
                        Ok(None)
                    }
                    Err(e) => Err(Fail::Ssh(e)),
                },
                || true,
            )
            .map_err(|f| self.error("examine", &self.where_(""), f))?;
        match st {
            None => Ok(false),
            Some(st) if st.perm.is_none() || st.is_dir() => Ok(true),
            Some(_) => Err(BackendError::new(
                ErrorKind::Other,
                format!("{} is not a directory", self.where_("")),
            )),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        check_path(dir, true)?;
        let full = self.remote(dir);
        let listing = self
            .with_conn(|c| self.read_dir(c, &full), || true)
            .map_err(|f| self.error("list", &self.where_(dir), f))?;
        let mut out = Vec::new();
        for (name, st) in listing.unwrap_or_default() {
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let is_dir = match st.perm.map(|_| st.file_type()) {
                Some(FileType::Directory) => true,
                Some(FileType::RegularFile) | None => false,
                Some(_) => {
                    let mode = format!("{:o}", st.perm.unwrap_or(0));
                    tracing::warn!(target = %self.opts.url, dir, name, mode,
                        "skipping a non-regular file in the replica");
                    continue;
                }
            };
            out.push(Entry {
                name,
                size: if is_dir { 0 } else { st.size.unwrap_or(0) },
                is_dir,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn read(&self, path: &str) -> Result<Box<dyn Read + Send>> {
        check_path(path, false)?;
        let full = self.remote(path);
        let (file, conn) = self
            .with_conn(
                |c| Ok((c.sftp.open(Path::new(&full))?, Arc::clone(c))),
                || true,
            )
            .map_err(|f| self.error("read", &self.where_(path), f))?;
        Ok(Box::new(SftpReader {
            file: BufReader::with_capacity(READ_BUF, file),
            conn,
            shown: self.where_(path),
            timeout: self.opts.timeout,
        }))
    }

    fn write_atomic(&self, path: &str, data: &mut dyn Read) -> Result<u64> {
        check_path(path, false)?;
        self.forget_tail(&self.remote(path));
        let consumed = AtomicBool::new(false);
        self.with_conn(
            |c| self.upload(c, path, data, &consumed),
            || !consumed.load(Ordering::SeqCst),
        )
        .map_err(|f| match f {
            Fail::Done(e) => e,
            Fail::Ssh(e) => {
                let (kind, why) = self.describe(&e);
                BackendError::new(
                    kind,
                    format!("failed to upload {path} to {}: {why}", self.opts.url),
                )
            }
        })
    }

    fn can_append(&self) -> bool {
        self.appends.load(Ordering::Relaxed)
    }

    fn append(&self, path: &str, at: u64, data: &[u8]) -> Result<()> {
        check_path(path, false)?;
        let full = self.remote(path);
        let shown = self.where_(path);
        // Writing at `at` again after a failure is harmless: a retry on a fresh session is fine.
        self.with_conn(|c| self.append_on(c, &full, at, data, &shown), || true)
            .map_err(|f| self.error("append to", &shown, f))
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        check_path(from, false)?;
        check_path(to, false)?;
        super::check_same_dir(&self.url(), from, to)?;
        let (f, t) = (self.remote(from), self.remote(to));
        // No retry on a fresh session: the rename may have happened before the old one died,
        // and a retry would then report the missing `from` instead of "unavailable".
        self.with_conn(|c| self.rename_on(c, &f, &t), || false)
            .map_err(|e| {
                let shown = format!("{} to {}", self.where_(from), self.where_(to));
                self.error("rename", &shown, e)
            })
    }

    fn delete(&self, path: &str) -> Result<()> {
        check_path(path, false)?;
        let full = self.remote(path);
        self.forget_tail(&full);
        self.with_conn(
            |c| match c.sftp.unlink(Path::new(&full)) {
                Err(e) if matches!(sftp_code(&e), Some(FX_NO_SUCH_FILE | FX_NO_SUCH_PATH)) => {
                    Ok(())
                }
                r => r.map_err(Fail::Ssh),
            },
            || true,
        )
        .map_err(|f| self.error("delete", &self.where_(path), f))
    }

    fn remove_dir(&self, dir: &str) -> Result<()> {
        check_path(dir, false)?;
        let full = self.remote(dir);
        self.with_conn(
            |c| {
                c.dirs()
                    .retain(|d| !(d == &full || d.starts_with(&format!("{full}/"))));
                match c.sftp.rmdir(Path::new(&full)) {
                    Ok(()) => Ok(()),
                    Err(e) if is_conn_err(&e) => Err(Fail::Ssh(e)),
                    Err(e) => match sftp_code(&e) {
                        Some(FX_NO_SUCH_FILE | FX_NO_SUCH_PATH | FX_DIR_NOT_EMPTY) => Ok(()),
                        // SFTP v3 has no "not empty" status: OpenSSH says FAILURE. If the
                        // directory is still there and readable, it was not empty.
                        Some(FX_FAILURE) => match c.sftp.stat(Path::new(&full)) {
                            Ok(st) if st.is_dir() => Ok(()),
                            Err(se) if is_conn_err(&se) => Err(Fail::Ssh(se)),
                            _ => Err(Fail::Ssh(e)),
                        },
                        _ => Err(Fail::Ssh(e)),
                    },
                }
            },
            || true,
        )
        .map_err(|f| self.error("remove directory", &self.where_(dir), f))
    }

    fn cleanup(&self, dir: &str) -> Result<usize> {
        check_path(dir, true)?;
        let full = self.remote(dir);
        self.with_conn(
            |c| {
                let mut n = 0;
                for (name, st) in self.read_dir(c, &full)?.unwrap_or_default() {
                    if !name.starts_with(TEMP_PREFIX) || st.is_dir() {
                        continue;
                    }
                    match c.sftp.unlink(Path::new(&format!("{full}/{name}"))) {
                        Ok(()) => n += 1,
                        Err(e) if sftp_code(&e) == Some(FX_NO_SUCH_FILE) => {}
                        Err(e) => return Err(Fail::Ssh(e)),
                    }
                }
                Ok(n)
            },
            || true,
        )
        .map_err(|f| self.error("remove temporary files in", &self.where_(dir), f))
    }
}
