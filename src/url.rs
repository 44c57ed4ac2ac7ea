//! Replica URLs: `file:///PATH`, `sftp://USER@HOST[:PORT]/PATH` and `s3://BUCKET[/PREFIX]`,
//! parsed strictly (the sftp form by [`SftpUrl::parse`], the s3 form by [`S3Url::parse`], the
//! one parser for each).
//!
//! Invariant: a parsed file or sftp URL always has a non-empty path and, for sftp, a user and a
//! host; an s3 URL has a valid bucket name and a prefix of plain names (possibly empty: the
//! whole bucket). Every `Display` form round-trips through [`ReplicaUrl::parse`].

use std::fmt;
use std::path::PathBuf;

/// Where a replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplicaUrl {
    /// A directory on this machine.
    File(PathBuf),
    /// A directory on an SFTP server, as the server sees it.
    Sftp(SftpUrl),
    /// A prefix in an S3 bucket.
    S3(S3Url),
}

impl ReplicaUrl {
    /// Parses a replica URL.
    ///
    /// # Errors
    /// A one-line description of what is wrong with `s`.
    pub(crate) fn parse(s: &str) -> Result<ReplicaUrl, String> {
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
        if s.starts_with("s3://") {
            return S3Url::parse(s).map(ReplicaUrl::S3);
        }
        Err(format!(
            "invalid replica URL {s:?}: expected file:///PATH, sftp://USER@HOST[:PORT]/PATH or \
             s3://BUCKET/PREFIX"
        ))
    }
}

impl fmt::Display for ReplicaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaUrl::File(p) => write!(f, "file://{}", p.display()),
            ReplicaUrl::Sftp(u) => u.fmt(f),
            ReplicaUrl::S3(u) => u.fmt(f),
        }
    }
}

/// A parsed `s3://BUCKET[/PREFIX]` URL.
///
/// Invariants: `bucket` is a valid S3 bucket name (3-63 characters of `a-z`, `0-9`, `.`, `-`,
/// starting and ending with a letter or digit); `prefix` is empty (the whole bucket) or a
/// `/`-separated relative path of plain names, without leading or trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The key prefix of the replica's objects, without a trailing `/`.
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/PREFIX]` strictly.
    ///
    /// # Errors
    /// A one-line message saying what is wrong and showing the expected form.
    pub fn parse(s: &str) -> Result<S3Url, String> {
        const FORM: &str = "expected s3://BUCKET/PREFIX";
        let bad = |why: &str| Err(format!("invalid s3 URL {s:?}: {why} ({FORM})"));
        let Some(rest) = s.strip_prefix("s3://") else {
            return bad("it must start with s3://");
        };
        if rest.contains(['?', '#', '%', '@']) {
            return bad("queries, fragments, credentials and percent-encoding are not supported");
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
        if !(3..=63).contains(&bucket.len())
            || !bucket.chars().all(valid_char)
            || !bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
        {
            return bad("the bucket name must be 3-63 characters of a-z, 0-9, '.' and '-'");
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() && plain_relative_path(prefix).is_err() {
            return bad("the prefix must be plain names separated by '/' (no '.', '..' or '//')");
        }
        Ok(S3Url {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A parsed `sftp://USER@HOST[:PORT]/PATH` URL.
///
/// Invariants: `user` and `host` are non-empty, `port` is not 0, `path` is a non-empty,
/// `/`-separated relative path of plain names (no leading `/`, no `.`/`..`/empty parts). The path
/// is resolved as the server sees it: in a chroot, `db/x` and `/db/x` are the same place, so both
/// URL spellings give `path == "db/x"`, and walship always sends `/db/x`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SftpUrl {
    /// Login name on the server.
    pub user: String,
    /// Host name or address; an IPv6 address without its brackets.
    pub host: String,
    /// TCP port (22 unless given).
    pub port: u16,
    /// The replica directory on the server, relative to its root (see the type's doc).
    pub path: String,
}

impl SftpUrl {
    /// Parses `sftp://USER@HOST[:PORT]/PATH` strictly.
    ///
    /// # Errors
    /// A one-line message saying what is wrong and showing the expected form.
    pub fn parse(s: &str) -> Result<SftpUrl, String> {
        const FORM: &str = "expected sftp://USER@HOST[:PORT]/PATH";
        let bad = |why: &str| Err(format!("invalid sftp URL {s:?}: {why} ({FORM})"));
        let Some(rest) = s.strip_prefix("sftp://") else {
            return bad("it must start with sftp://");
        };
        if rest.contains(['?', '#', '%']) {
            return bad("queries, fragments and percent-encoding are not supported");
        }
        if rest.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return bad("it contains a space or control character");
        }
        let Some((auth, path)) = rest.split_once('/') else {
            return bad("missing path");
        };
        let Some((user, hostport)) = auth.rsplit_once('@') else {
            return bad("missing user");
        };
        if user.is_empty() {
            return bad("missing user");
        }
        if user.contains(':') {
            return bad("passwords in URLs are not supported, use a key");
        }
        if user.contains('@') {
            return bad("invalid user");
        }
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let Some((h, after)) = h.split_once(']') else {
                return bad("unclosed '[' in host");
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return bad("only IPv6 addresses go in brackets");
            }
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
        if !host.contains(':')
            && !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        {
            return bad("invalid host name");
        }
        let port = match port {
            None => 22,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return bad("invalid port"),
            },
        };
        let path = path.trim_start_matches('/').trim_end_matches('/');
        if path.is_empty() {
            return bad("missing path (the server's root directory cannot be a replica)");
        }
        if plain_relative_path(path).is_err() {
            return bad("the path must be plain names separated by '/' (no '.', '..' or '//')");
        }
        Ok(SftpUrl {
            user: user.to_owned(),
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// `host:port` for messages (`[::1]:22` for IPv6).
    pub(crate) fn host_port(&self) -> String {
        format!("{}:{}", self.url_host(), self.port)
    }

    /// The host as written in a URL: an IPv6 address in brackets.
    fn url_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl fmt::Display for SftpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = self.url_host();
        let port = if self.port == 22 {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        write!(f, "sftp://{}@{host}{port}/{}", self.user, self.path)
    }
}

impl std::str::FromStr for SftpUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SftpUrl::parse(s)
    }
}

/// Checks that `path` is a relative path made of plain names: not empty, at most 1024 bytes, no
/// empty, `.` or `..` component, no leading `/`, no backslash, NUL or control character, and no
/// component with the temporary-file prefix. The one rule for replica paths, in URLs and in
/// every backend call.
///
/// # Errors
/// Why the path is refused, in a few words.
pub(crate) fn plain_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("empty");
    }
    if path.len() > 1024 {
        return Err("too long");
    }
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err("not a plain relative path");
        }
        if comp.contains(['\\', '\0']) || comp.chars().any(char::is_control) {
            return Err("contains a forbidden character");
        }
        if comp.starts_with(crate::durable::TEMP_PREFIX) {
            return Err("uses the temporary-file prefix");
        }
    }
    Ok(())
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
            "s3://walship-backups",
            "s3://walship-backups/fruits/db",
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
            "s3://",
            "s3://ab/x",
            "s3://Upper/x",
            "s3://-bucket/x",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "s3://bucket/x?versionId=1",
            "s3://key:secret@bucket/x",
        ] {
            assert!(ReplicaUrl::parse(s).is_err(), "{s} must be refused");
        }
    }

    #[test]
    fn parse_good_urls() {
        let u = SftpUrl::parse("sftp://replicator@alpha/db").expect("parse");
        assert_eq!(
            (u.user.as_str(), u.host.as_str(), u.port, u.path.as_str()),
            ("replicator", "alpha", 22, "db")
        );
        assert_eq!(u.to_string(), "sftp://replicator@alpha/db");
        let u = SftpUrl::parse("sftp://r@127.0.0.1:2222//db/x/").expect("parse");
        assert_eq!((u.port, u.path.as_str()), (2222, "db/x"));
        assert_eq!(u.to_string(), "sftp://r@127.0.0.1:2222/db/x");
        let u = SftpUrl::parse("sftp://r@[::1]:2200/db").expect("parse");
        assert_eq!((u.host.as_str(), u.port), ("::1", 2200));
        assert_eq!(u.to_string(), "sftp://r@[::1]:2200/db");
        assert_eq!(u.host_port(), "[::1]:2200");
    }

    #[test]
    fn parse_bad_urls() {
        for (bad, why) in [
            ("ftp://r@h/db", "sftp://"),
            ("sftp://h/db", "missing user"),
            ("sftp://@h/db", "missing user"),
            ("sftp://r:pw@h/db", "passwords"),
            ("sftp://r@h", "missing path"),
            ("sftp://r@h/", "missing path"),
            ("sftp://r@/db", "missing host"),
            ("sftp://r@h:0/db", "invalid port"),
            ("sftp://r@h:99999/db", "invalid port"),
            ("sftp://r@h:+22/db", "invalid port"),
            ("sftp://r@[::1/db", "unclosed"),
            ("sftp://r@[host]/db", "IPv6"),
            ("sftp://r@h/db/../etc", "plain names"),
            ("sftp://r@h/db//x", "plain names"),
            ("sftp://r@h/db?x=1", "queries"),
            ("sftp://r@h/d b", "space"),
            ("sftp://r@h!/db", "host name"),
        ] {
            let e = SftpUrl::parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
