//! The storage seam: where replica files live.
//!
//! A [`Target`] is a flat-ish namespace of files addressed by relative, `/`-separated paths below
//! the replica's root (for example `generations/0193a1b2c3d4e5f60708/seg-0-...`). Every target
//! keeps these invariants, which the conformance suite in `tests/` checks for each of them:
//! - [`Target::write_atomic`] is all-or-nothing and durable when it returns: the bytes go to a
//!   temporary name, are fsynced, renamed to the final name, and the directory is fsynced. A
//!   crash leaves either nothing or a temporary file that [`Target::cleanup`] removes later;
//!   readers never see a partial file under a final name.
//! - [`Target::list`] returns final names only, never temporary ones, sorted by name, and
//!   tolerates entries and directories vanishing while it lists.
//! - Paths are checked by [`check_path`] before any I/O, so a bad name can never reach outside
//!   the replica's root.

pub mod file;
pub mod known_hosts;
pub mod sftp;

use std::fmt;
use std::io::Read;

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
pub struct TargetError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// A complete one-line message: operation, path, target, cause.
    pub msg: String,
}

impl TargetError {
    /// Builds an error of `kind` with a full message.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Self {
            kind,
            msg: msg.into(),
        }
    }

    /// Maps an I/O error from operation `op` on `path` of target `target` to a [`TargetError`].
    pub fn io(op: &str, path: &str, target: &str, err: &std::io::Error) -> Self {
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
pub type Result<T> = std::result::Result<T, TargetError>;

/// A place that holds replica files. Implementations must be usable from several threads.
pub trait Target: Send + Sync + fmt::Debug {
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

    /// Removes temporary files that an interrupted [`Target::write_atomic`] left in `dir`, and
    /// returns how many it removed.
    ///
    /// # Errors
    /// `Unavailable` or `Other` when the target fails.
    fn cleanup(&self, dir: &str) -> Result<usize>;
}

/// Prefix of every temporary file name; final names never start with it.
pub const TEMP_PREFIX: &str = ".walship-tmp-";

/// Checks that `path` is a relative path made of plain names: no empty, `.` or `..` component,
/// no leading `/`, no backslash or NUL, and no temporary-file prefix. `""` (the root) is allowed
/// only where `allow_root` says so.
///
/// # Errors
/// An `Other` error naming the bad path.
pub fn check_path(path: &str, allow_root: bool) -> Result<()> {
    let bad = |why: &str| {
        Err(TargetError::new(
            ErrorKind::Other,
            format!("refusing replica path {path:?}: {why}"),
        ))
    };
    if path.is_empty() {
        return if allow_root { Ok(()) } else { bad("empty") };
    }
    if path.len() > 1024 {
        return bad("too long");
    }
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return bad("not a plain relative path");
        }
        if comp.contains(['\\', '\0']) || comp.chars().any(char::is_control) {
            return bad("contains a forbidden character");
        }
        if comp.starts_with(TEMP_PREFIX) {
            return bad("uses the temporary-file prefix");
        }
    }
    Ok(())
}

/// A unique temporary name (for the directory of a final file) that [`Target::cleanup`]
/// recognises.
pub fn temp_name() -> String {
    format!(
        "{TEMP_PREFIX}{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

/// Splits `path` into its parent directory (`""` for the root) and its file name.
pub fn split_parent(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Opens the sftp target for a replica, preferring a key (and passphrase) that systemd passes
/// as a credential (`walship-key-<name>`, `walship-passphrase-<name>`) over the configured paths.
///
/// # Errors
/// A replica that is not sftp, or an sftp replica without a key.
pub fn open_sftp(r: &crate::config::ReplicaSettings) -> anyhow::Result<Box<dyn Target>> {
    let crate::url::ReplicaUrl::Sftp(url) = &r.url else {
        anyhow::bail!("{} is not an sftp URL", r.url);
    };
    let cred = |name: String| {
        std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|d| std::path::Path::new(&d).join(name))
            .filter(|p| p.exists())
    };
    let key_path = cred(format!("walship-key-{}", r.name))
        .or_else(|| r.key_path.clone())
        .unwrap_or_default();
    let passphrase_file =
        cred(format!("walship-passphrase-{}", r.name)).or_else(|| r.passphrase_file.clone());
    Ok(Box::new(sftp::SftpTarget::new(sftp::SftpOptions {
        url: url.clone(),
        key_path,
        passphrase_file,
        known_hosts: r.known_hosts.clone(),
        use_agent: r.use_agent,
        timeout: r.timeout,
    })))
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
