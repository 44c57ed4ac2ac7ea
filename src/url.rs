//! Replica URLs: `file:///PATH` and `sftp://USER@HOST[:PORT]/PATH`, parsed strictly (the sftp
//! form by [`SftpUrl::parse`], the one parser for it).
//!
//! Invariant: a parsed URL always has a non-empty path and, for sftp, a user and a host; its
//! `Display` form round-trips through [`ReplicaUrl::parse`].

use crate::target::sftp::SftpUrl;
use std::fmt;
use std::path::PathBuf;

/// Where a replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUrl {
    /// A directory on this machine.
    File(PathBuf),
    /// A directory on an SFTP server, as the server sees it.
    Sftp(SftpUrl),
}

impl ReplicaUrl {
    /// Parses a replica URL.
    ///
    /// # Errors
    /// A one-line description of what is wrong with `s`.
    pub fn parse(s: &str) -> Result<ReplicaUrl, String> {
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(format!(
                    "invalid replica URL {s:?}: a file URL needs an absolute path (file:///srv/replica)"
                ));
            }
            let p = rest.trim_end_matches('/');
            if p.is_empty() {
                return Err(format!(
                    "invalid replica URL {s:?}: the root directory cannot be a replica"
                ));
            }
            return Ok(ReplicaUrl::File(PathBuf::from(p)));
        }
        if s.starts_with("sftp://") {
            return SftpUrl::parse(s).map(ReplicaUrl::Sftp);
        }
        Err(format!(
            "invalid replica URL {s:?}: expected file:///PATH or sftp://USER@HOST[:PORT]/PATH"
        ))
    }
}

impl fmt::Display for ReplicaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaUrl::File(p) => write!(f, "file://{}", p.display()),
            ReplicaUrl::Sftp(u) => u.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        for s in [
            "file:///srv/replica/fruits",
            "sftp://replicator@alpha/db",
            "sftp://replicator@alpha:2222/db/fruits",
            "sftp://r@[::1]:2222/db",
        ] {
            let u = ReplicaUrl::parse(s).expect(s);
            assert_eq!(u.to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_urls() {
        for s in [
            "file://relative",
            "file:///",
            "http://x/y",
            "sftp://alpha/db",
            "sftp://r@alpha",
            "sftp://r@alpha/",
            "sftp://r@alpha:0/db",
            "sftp://r@alpha:99999/db",
            "sftp://r@/db",
            "sftp://r@[::1/db",
            "/srv/replica",
        ] {
            assert!(ReplicaUrl::parse(s).is_err(), "{s} must be refused");
        }
    }
}
