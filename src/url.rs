//! Replica URLs: `file:///PATH` and `sftp://USER@HOST[:PORT]/PATH`, parsed strictly.
//!
//! Invariant: a parsed URL always has a non-empty path and, for sftp, a user and a host; its
//! `Display` form round-trips through [`ReplicaUrl::parse`].

use std::fmt;
use std::path::PathBuf;

/// Where a replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUrl {
    /// A directory on this machine.
    File(PathBuf),
    /// A directory on an SFTP server, as the server sees it.
    Sftp {
        /// The login name.
        user: String,
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// TCP port, 22 by default.
        port: u16,
        /// The path on the server (`db/x` and `/db/x` are the same place in a chroot).
        path: String,
    },
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
        if let Some(rest) = s.strip_prefix("sftp://") {
            let bad = |why: &str| Err(format!("invalid replica URL {s:?}: {why}"));
            let Some((auth, path)) = rest.split_once('/') else {
                return bad("missing path (sftp://USER@HOST[:PORT]/PATH)");
            };
            let path = path.trim_end_matches('/');
            if path.is_empty() {
                return bad("missing path (sftp://USER@HOST[:PORT]/PATH)");
            }
            let Some((user, hostport)) = auth.split_once('@') else {
                return bad("missing user (sftp://USER@HOST[:PORT]/PATH)");
            };
            if user.is_empty() || user.contains([':', '/']) {
                return bad("invalid user");
            }
            let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
                let Some((h, after)) = h.split_once(']') else {
                    return bad("unclosed '[' in host");
                };
                match after.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None if after.is_empty() => (h, None),
                    None => return bad("unexpected text after ']'"),
                }
            } else {
                match hostport.split_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (hostport, None),
                }
            };
            if host.is_empty() {
                return bad("missing host");
            }
            let port = match port {
                None => 22,
                Some(p) => match p.parse::<u16>() {
                    Ok(n) if n > 0 => n,
                    _ => return bad("invalid port"),
                },
            };
            return Ok(ReplicaUrl::Sftp {
                user: user.to_owned(),
                host: host.to_owned(),
                port,
                path: path.to_owned(),
            });
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
            ReplicaUrl::Sftp {
                user,
                host,
                port,
                path,
            } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                let port = if *port == 22 {
                    String::new()
                } else {
                    format!(":{port}")
                };
                let path = path.trim_start_matches('/');
                write!(f, "sftp://{user}@{host}{port}/{path}")
            }
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
        assert_eq!(
            ReplicaUrl::parse("sftp://r@h//db").expect("abs"),
            ReplicaUrl::Sftp {
                user: "r".into(),
                host: "h".into(),
                port: 22,
                path: "/db".into()
            }
        );
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
