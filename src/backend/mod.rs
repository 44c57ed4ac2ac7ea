//! The storage seam: where replica files live.
//!
//! A [`Backend`] is a flat-ish namespace of files addressed by relative, `/`-separated paths below
//! the replica's root (for example `generations/0193a1b2c3d4e5f60708/seg-0-...`). Every target
//! keeps these invariants, which the conformance suite in `tests/` checks for each of them:
//! - [`Backend::write_atomic`] is all-or-nothing and durable when it returns: the bytes go to a
//!   temporary name, are fsynced, renamed to the final name, and the directory is fsynced. A
//!   crash leaves either nothing or a temporary file that [`Backend::cleanup`] removes later;
//!   readers never see a partial file under a final name.
//! - [`Backend::list`] returns final names only, never temporary ones, sorted by name, and
//!   tolerates entries and directories vanishing while it lists.
//! - On targets that can ([`Backend::can_append`]: `file://`, `sftp://`), [`Backend::append`]
//!   writes at a given offset of an existing file and is durable, not atomic, when it returns
//!   (a crash leaves the old content and a prefix of the new bytes), and [`Backend::rename`]
//!   is atomic. Both are cheap enough to run per commit: the last file appended to stays open.
//! - Paths are checked by [`check_path`] before any I/O, so a bad name can never reach outside
//!   the replica's root.
//!
//! A replica with `encrypt-to` (or read with an identity) is opened as its target wrapped in
//! [`encrypted::Encrypted`], which encrypts and decrypts the files below the root: the one place
//! where encryption happens.

pub mod encrypted;
pub mod file;
pub(crate) mod known_hosts;
pub mod s3;
pub mod sftp;
mod sftp_raw;
#[cfg(test)]
mod ssh_cipher;

use crate::url::ReplicaUrl;
use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

/// One file in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The file's name within the listed directory (no `/`).
    pub name: String,
    /// Size in bytes as the target reports it.
    pub size: u64,
    /// True for a directory.
    pub is_dir: bool,
}

/// How an operation failed, so that callers know whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file or directory does not exist.
    NotFound,
    /// The target cannot be reached or timed out; retrying later may work.
    Unavailable,
    /// Anything else (permission denied, disk full, bad data): retrying as is will not help
    /// until someone acts.
    Other,
}

/// An error from a target, carrying what was attempted and where.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct BackendError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// A complete one-line message: operation, path, target, cause.
    pub msg: String,
}

impl BackendError {
    /// Builds an error of `kind` with a full message.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Self {
            kind,
            msg: msg.into(),
        }
    }

    /// Maps an I/O error from operation `op` on `path` of target `target` to a [`BackendError`].
    pub(crate) fn io(op: &str, path: &str, target: &str, err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::TimedOut
            | K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::Interrupted
            | K::WouldBlock => ErrorKind::Unavailable,
            _ => ErrorKind::Other,
        };
        let sep = if path.is_empty() { "" } else { "/" };
        Self::new(kind, format!("failed to {op} {target}{sep}{path}: {err}"))
    }
}

/// Result of a target operation.
pub type Result<T> = std::result::Result<T, BackendError>;

/// A place that holds replica files. Implementations must be usable from several threads.
pub trait Backend: Send + Sync + fmt::Debug {
    /// The target's URL for messages (never contains secrets).
    fn url(&self) -> String;

    /// Lists the directory `dir` (relative, `""` for the root), sorted by name. A missing
    /// directory is an empty listing, not an error. Temporary files are not listed. The
    /// directory may change while it is listed (a running walship compacts and prunes it): an
    /// entry removed meanwhile is left out, and a directory removed meanwhile lists as empty;
    /// neither is an error.
    ///
    /// # Errors
    /// `Unavailable` when the target can't be reached, `Other` for anything else.
    fn list(&self, dir: &str) -> Result<Vec<Entry>>;

    /// Opens the file at `path` for streaming reads.
    ///
    /// # Errors
    /// `NotFound` if there is no such file.
    fn read(&self, path: &str) -> Result<Box<dyn Read + Send>>;

    /// Writes the whole of `data` to `path` atomically and durably (see the module invariants),
    /// creating missing parent directories, and returns the number of bytes written. An existing
    /// file at `path` is replaced.
    ///
    /// # Errors
    /// Any failure leaves no file at `path` that was not there before.
    fn write_atomic(&self, path: &str, data: &mut dyn Read) -> Result<u64>;

    /// Deletes the file at `path`; deleting a missing file succeeds.
    ///
    /// # Errors
    /// `Unavailable` or `Other` when the file exists but can't be removed.
    fn delete(&self, path: &str) -> Result<()>;

    /// Removes the directory `dir` if it is empty; a missing or non-empty directory is not an
    /// error (it is left alone).
    ///
    /// # Errors
    /// `Unavailable` or `Other` when the target fails.
    fn remove_dir(&self, dir: &str) -> Result<()>;

    /// Removes temporary files that an interrupted [`Backend::write_atomic`] left in `dir`, and
    /// returns how many it removed.
    ///
    /// # Errors
    /// `Unavailable` or `Other` when the target fails.
    fn cleanup(&self, dir: &str) -> Result<usize>;

    /// Whether [`Backend::append`] and [`Backend::rename`] work on this target: `true` for
    /// `file://` and `sftp://`; `false` (the default) for S3 and the encrypting wrapper (whose
    /// files are whole age streams), where both return an `Other` error.
    fn can_append(&self) -> bool {
        false
    }

    /// Writes `data` at byte `at` of the existing file `path` and makes the file's content and
    /// size durable before returning. `at` is the file's size as this process last left it (a
    /// caller appends only to files it wrote itself); if the file is longer (a torn earlier
    /// append), what lies past `at + data.len()` is cut off. Not atomic: after a crash the file
    /// holds its first `at` bytes and any prefix of `data`, never anything else. Meant for a
    /// file that grows by many small appends: targets keep the last file appended to open.
    ///
    /// # Errors
    /// `NotFound` if there is no such file; `Other` on a target that cannot append
    /// ([`Backend::can_append`]) or if the file is shorter than `at`.
    fn append(&self, path: &str, at: u64, data: &[u8]) -> Result<()> {
        let _ = (at, data);
        check_path(path, false)?;
        Err(cannot_append("append to", &self.url(), path))
    }

    /// Renames the file `from` to `to` in the same directory, replacing an existing `to`,
    /// atomically: a reader sees either name, never both nor neither. **Not durable**: a power
    /// cut on the target may undo it (`file://` does not fsync the directory, which would cost
    /// a device flush per call; SFTP has no directory fsync request, see [`sftp`]). It is
    /// meant for renames the caller can redo: the shipper's growing tail segment, whose name a
    /// new start repairs from its content (see `replicate::ship`).
    ///
    /// # Errors
    /// `NotFound` if there is no file `from`; `Other` on a target that cannot rename
    /// ([`Backend::can_append`]) or for paths in different directories.
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        check_path(from, false)?;
        check_path(to, false)?;
        Err(cannot_append("rename", &self.url(), from))
    }

    /// Whether the replica's root directory exists, so that a wrong URL is told apart from an
    /// empty replica. A target without directories answers `true`: on S3 a prefix holding no
    /// object cannot be told from one that never held any.
    ///
    /// # Errors
    /// `Unavailable` when the target can't be reached, `Other` for anything else (the root is
    /// not a directory, permission denied).
    fn root_exists(&self) -> Result<bool> {
        Ok(true)
    }

    /// The encryption this target applies to the files below the root (`Some("age")`, see
    /// [`encrypted`]), `None` for a plaintext target. The replica's marker must agree
    /// ([`encrypted::check_marker`]).
    fn encryption(&self) -> Option<&'static str> {
        None
    }

    /// Whether files can be read back: `Err(why)` for an encrypted target opened without a
    /// usable identity (the message names what to give).
    ///
    /// # Errors
    /// Why reading cannot work.
    fn readable(&self) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Checks that `path` is a relative path made of plain names: no empty, `.` or `..` component,
/// no leading `/`, no backslash or NUL, and no temporary-file prefix. `""` (the root) is allowed
/// only where `allow_root` says so.
///
/// # Errors
/// An `Other` error naming the bad path.
pub(crate) fn check_path(path: &str, allow_root: bool) -> Result<()> {
    if path.is_empty() && allow_root {
        return Ok(());
    }
    crate::url::plain_relative_path(path).map_err(|why| {
        BackendError::new(
            ErrorKind::Other,
            format!("refusing replica path {path:?}: {why}"),
        )
    })
}

/// The error of [`Backend::append`] and [`Backend::rename`] on a target that cannot do them.
pub(crate) fn cannot_append(op: &str, url: &str, path: &str) -> BackendError {
    BackendError::new(
        ErrorKind::Other,
        format!("failed to {op} {url}/{path}: this target cannot append to or rename files"),
    )
}

/// Checks that `from` and `to` (checked paths) name files in the same directory, as
/// [`Backend::rename`] requires.
///
/// # Errors
/// An `Other` error naming both paths.
pub(crate) fn check_same_dir(url: &str, from: &str, to: &str) -> Result<()> {
    if split_parent(from).0 == split_parent(to).0 {
        return Ok(());
    }
    Err(BackendError::new(
        ErrorKind::Other,
        format!("failed to rename {url}/{from} to {to}: not in the same directory"),
    ))
}

/// Splits `path` into its parent directory (`""` for the root) and its file name.
pub(crate) fn split_parent(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// What opening a replica needs besides its URL: how to log in to it (sftp and s3 use their
/// own fields; `file://` none). Credentials passed by systemd are already resolved here (see
/// [`crate::config::ReplicaSettings::access`]).
#[derive(Debug, Clone)]
pub(crate) struct Access {
    /// Private key for sftp.
    pub key_path: Option<PathBuf>,
    /// File whose first line is the key's passphrase.
    pub passphrase_file: Option<PathBuf>,
    /// OpenSSH known_hosts file host keys are checked against.
    pub known_hosts: PathBuf,
    /// Also try the keys of a running ssh-agent.
    pub use_agent: bool,
    /// Bound on connecting and on every network operation.
    pub timeout: Duration,
    /// S3 endpoint (`None`: AWS).
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: String,
    /// S3 path-style addressing.
    pub path_style: bool,
    /// S3 credentials file (`None`: the environment).
    pub credentials_file: Option<PathBuf>,
    /// age X25519 recipients the files are encrypted to (`encrypt-to`).
    pub encrypt_to: Vec<age::x25519::Recipient>,
    /// age identity file the files are decrypted with (`identity-file`, `--identity`).
    pub identity_file: Option<PathBuf>,
}

/// Opens the replica at `url`: the one place that maps a URL scheme to its backend, and
/// wraps it in [`encrypted::Encrypted`] when `access` has recipients or an identity file.
pub(crate) fn open(url: &ReplicaUrl, access: &Access) -> Box<dyn Backend> {
    let inner = open_plain(url, access);
    if access.encrypt_to.is_empty() && access.identity_file.is_none() {
        return inner;
    }
    Box::new(encrypted::Encrypted::new(
        inner,
        access.encrypt_to.clone(),
        access.identity_file.clone(),
    ))
}

fn open_plain(url: &ReplicaUrl, access: &Access) -> Box<dyn Backend> {
    match url {
        ReplicaUrl::File(path) => Box::new(file::FileBackend::new(path)),
        ReplicaUrl::Sftp(url) => Box::new(sftp::SftpBackend::new(sftp::SftpOptions {
            url: url.clone(),
            key_path: access.key_path.clone().unwrap_or_default(),
            passphrase_file: access.passphrase_file.clone(),
            known_hosts: access.known_hosts.clone(),
            use_agent: access.use_agent,
            timeout: access.timeout,
        })),
        ReplicaUrl::S3(url) => {
            let mut o = s3::S3Options::new(url.clone(), access.endpoint.clone(), &access.region);
            o.path_style = access.path_style;
            o.credentials_file = access.credentials_file.clone();
            o.timeout = access.timeout;
            Box::new(s3::S3Backend::new(o))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_path_refuses_escapes() {
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a\\b",
            "a\0b",
            ".walship-tmp-1-2",
            "",
        ] {
            assert!(check_path(bad, false).is_err(), "{bad:?} must be refused");
        }
        for good in ["a", "generations/0193/seg-0-1", "walship-replica.toml"] {
            assert!(check_path(good, false).is_ok(), "{good:?} must be allowed");
        }
        assert!(check_path("", true).is_ok());
    }

    #[test]
    fn split_parent_works() {
        assert_eq!(split_parent("a/b/c"), ("a/b", "c"));
        assert_eq!(split_parent("c"), ("", "c"));
    }
}
