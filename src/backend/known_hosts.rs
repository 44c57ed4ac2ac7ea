//! Host-key verification against an OpenSSH `known_hosts` file, done by walship itself.
//!
//! Why not libssh2's own check: it treats an entry without a port as matching every port, while
//! OpenSSH (and therefore every admin's expectation) matches such an entry on port 22 only. This
//! module follows OpenSSH:
//! - the name looked up is `host` for port 22 and `[host]:port` otherwise (host lower-cased);
//! - a line's host field is a comma list of patterns (`*` and `?` wildcards, `!` negation) or one
//!   hashed entry `|1|base64(salt)|base64(HMAC-SHA1(salt, name))`;
//! - `@revoked` lines refuse their key for every host they match; `@cert-authority` lines are
//!   ignored (walship does not accept host certificates); unparsable lines are skipped.
//!
//! Invariants: a key is [`Verdict::Known`] only if a non-revoked line matching the host carries
//! exactly the same key blob; a missing file means every host is unknown; the file is only ever
//! rewritten atomically (temporary file, fsync, rename) by [`add_host_key`].

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Digest as _;
use std::io;
use std::path::Path;

/// A server's public host key, as sent in the SSH handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    /// The key's type name, e.g. `ssh-ed25519`, `ecdsa-sha2-nistp256`, `ssh-rsa`.
    pub key_type: String,
    /// The public key blob in SSH wire format (what `known_hosts` stores in base64).
    pub blob: Vec<u8>,
}

impl HostKey {
    /// Builds a key from its wire blob, reading the type name from the blob itself.
    ///
    /// # Errors
    /// A message if the blob does not start with a plausible SSH string (type name).
    pub(crate) fn from_blob(blob: Vec<u8>) -> Result<HostKey, String> {
        let len = blob
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("host key blob too short")?;
        let name = blob
            .get(4..4 + len.min(64))
            .filter(|_| len <= 64)
            .ok_or("host key blob has a bad type name")?;
        let key_type = std::str::from_utf8(name)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|c| c.is_ascii_graphic()))
            .ok_or("host key blob has a bad type name")?
            .to_owned();
        Ok(HostKey { key_type, blob })
    }

    /// The SHA256 fingerprint as `ssh-keygen -lf` prints it: `SHA256:` + base64 without padding.
    pub fn fingerprint(&self) -> String {
        let digest = sha2::Sha256::digest(&self.blob);
        let b64 = STANDARD.encode(digest);
        format!("SHA256:{}", b64.trim_end_matches('='))
    }

    /// The key in `known_hosts` form: `<type> <base64 blob>`.
    pub fn to_openssh(&self) -> String {
        format!("{} {}", self.key_type, STANDARD.encode(&self.blob))
    }
}

/// The name under which OpenSSH looks a host up: `host` for port 22, else `[host]:port`.
pub(crate) fn lookup_name(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// What `known_hosts` says about a host's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A line for this host carries exactly this key.
    Known,
    /// No line matches this host.
    Unknown,
    /// Lines match this host but none carries this key: the keys they do carry.
    Changed(Vec<HostKey>),
    /// The key is listed under `@revoked`.
    Revoked,
}

/// One parsed, usable line of a `known_hosts` file.
#[derive(Debug, Clone)]
struct Line {
    /// `Some("revoked")` etc.
    marker: Option<String>,
    /// The host field (comma list of patterns, or one hashed entry).
    hosts: String,
    /// The key on this line.
    key: HostKey,
}

fn parse_line(raw: &str) -> Option<Line> {
    let s = raw.trim();
    if s.is_empty() || s.starts_with('#') {
        return None;
    }
    let mut fields = s.split_whitespace();
    let mut first = fields.next()?;
    let mut marker = None;
    if let Some(m) = first.strip_prefix('@') {
        marker = Some(m.to_owned());
        first = fields.next()?;
    }
    let key_type = fields.next()?;
    let blob = STANDARD.decode(fields.next()?).ok()?;
    let key = HostKey::from_blob(blob).ok()?;
    if key.key_type != key_type {
        return None;
    }
    Some(Line {
        marker,
        hosts: first.to_owned(),
        key,
    })
}

/// Matches `name` against one glob `pattern` (`*` any run, `?` one character), ASCII
/// case-insensitively, as OpenSSH's `match_pattern` does.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let (mut star_p, mut star_n) = (usize::MAX, 0);
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p].eq_ignore_ascii_case(&name[n])) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star_p = p;
            star_n = n;
            p += 1;
        } else if star_p != usize::MAX {
            p = star_p + 1;
            star_n += 1;
            n = star_n;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// True if the hashed entry `|1|salt|hash` is the HMAC-SHA1 of `name`.
fn hashed_matches(entry: &str, name: &str) -> bool {
    let mut parts = entry.split('|');
    let (Some(""), Some("1"), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (STANDARD.decode(salt), STANDARD.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// True if the host field `hosts` of a line matches the lookup `name` (see [`lookup_name`]).
fn hosts_match(hosts: &str, name: &str) -> bool {
    if hosts.starts_with('|') {
        return hashed_matches(hosts, name);
    }
    let mut matched = false;
    for pat in hosts.split(',') {
        if let Some(neg) = pat.strip_prefix('!') {
            if glob(neg.as_bytes(), name.as_bytes()) {
                return false;
            }
        } else if glob(pat.as_bytes(), name.as_bytes()) {
            matched = true;
        }
    }
    matched
}

/// Reads `path`; a missing file is empty.
fn read_or_empty(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// Checks `key` for `host`:`port` against the contents of a `known_hosts` file.
pub(crate) fn check_text(text: &str, host: &str, port: u16, key: &HostKey) -> Verdict {
    let name = lookup_name(host, port);
    let mut others = Vec::new();
    let mut known = false;
    for line in text.lines().filter_map(parse_line) {
        if !hosts_match(&line.hosts, &name) {
            continue;
        }
        match line.marker.as_deref() {
            Some("revoked") if line.key.blob == key.blob => return Verdict::Revoked,
            Some(_) => {}
            None if line.key.blob == key.blob => known = true,
            None => others.push(line.key),
        }
    }
    if known {
        Verdict::Known
    } else if others.is_empty() {
        Verdict::Unknown
    } else {
        Verdict::Changed(others)
    }
}

/// Checks `key` for `host`:`port` against the file at `path` (missing file: [`Verdict::Unknown`]).
///
/// # Errors
/// The file exists but can't be read.
pub(crate) fn check(path: &Path, host: &str, port: u16, key: &HostKey) -> io::Result<Verdict> {
    Ok(check_text(&read_or_empty(path)?, host, port, key))
}

/// The key types that `known_hosts` at `path` lists for `host`:`port` (so the handshake can
/// prefer them), in file order, without duplicates. Unreadable files give an empty list.
pub(crate) fn known_key_types(path: &Path, host: &str, port: u16) -> Vec<String> {
    let name = lookup_name(host, port);
    let mut out: Vec<String> = Vec::new();
    for line in read_or_empty(path)
        .unwrap_or_default()
        .lines()
        .filter_map(parse_line)
    {
        if line.marker.is_none()
            && hosts_match(&line.hosts, &name)
            && !out.contains(&line.key.key_type)
        {
            out.push(line.key.key_type);
        }
    }
    out
}

/// Adds `key` for `host`:`port` to the `known_hosts` file at `path` (created with its parent
/// directory if missing) as OpenSSH writes it (`host` or `[host]:port`, not hashed). With
/// `replace`, lines whose only host pattern is exactly this host and whose key differs are
/// dropped; other lines are kept byte for byte. The file is replaced atomically (temporary
/// file, fsync, rename, directory fsync) and left with mode 0644.
///
/// # Errors
/// Any I/O failure reading or writing the file.
pub(crate) fn add_host_key(
    path: &Path,
    host: &str,
    port: u16,
    key: &HostKey,
    replace: bool,
) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let name = lookup_name(host, port);
    let old = read_or_empty(path)?;
    let mut new = String::with_capacity(old.len() + 128);
    for raw in old.lines() {
        let drop = replace
            && parse_line(raw).is_some_and(|l| {
                l.marker.is_none()
                    && l.key.blob != key.blob
                    && !l.hosts.contains(',')
                    && (l.hosts.eq_ignore_ascii_case(&name)
                        || (l.hosts.starts_with('|') && hashed_matches(&l.hosts, &name)))
            });
        if !drop {
            new.push_str(raw);
            new.push('\n');
        }
    }
    new.push_str(&format!("{name} {}\n", key.to_openssh()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::durable::write_file_atomic(path, &mut new.as_bytes(), 0o644)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, body: &[u8]) -> HostKey {
        let mut blob = (t.len() as u32).to_be_bytes().to_vec();
        blob.extend_from_slice(t.as_bytes());
        blob.extend_from_slice(body);
        HostKey::from_blob(blob).expect("blob")
    }

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        // The exact value is checked against `ssh-keygen -lf` in the sshd integration tests.
        let b = STANDARD
            .decode("AAAAC3NzaC1lZDI1NTE5AAAAIGLZm1IdRJtR6WbZ3XHhhYPQe1Gq4n3B3tNpSV1zGJjv")
            .expect("b64");
        let k = HostKey::from_blob(b).expect("key");
        assert_eq!(k.key_type, "ssh-ed25519");
        assert!(k.fingerprint().starts_with("SHA256:"));
        assert!(!k.fingerprint().ends_with('='));
    }

    #[test]
    fn port_semantics_follow_openssh() {
        let k = key("ssh-ed25519", b"A");
        let line = format!("127.0.0.1 {}\n", k.to_openssh());
        assert_eq!(check_text(&line, "127.0.0.1", 22, &k), Verdict::Known);
        assert_eq!(check_text(&line, "127.0.0.1", 2222, &k), Verdict::Unknown);
        let line = format!("[127.0.0.1]:2222 {}\n", k.to_openssh());
        assert_eq!(check_text(&line, "127.0.0.1", 2222, &k), Verdict::Known);
        assert_eq!(check_text(&line, "127.0.0.1", 22, &k), Verdict::Unknown);
    }

    #[test]
    fn patterns_lists_negation_and_case() {
        let k = key("ssh-ed25519", b"A");
        let line = format!(
            "a.example,*.Corp.example,!bad.corp.example {}",
            k.to_openssh()
        );
        assert_eq!(check_text(&line, "A.example", 22, &k), Verdict::Known);
        assert_eq!(check_text(&line, "x.corp.example", 22, &k), Verdict::Known);
        assert_eq!(
            check_text(&line, "bad.corp.example", 22, &k),
            Verdict::Unknown
        );
        let line = format!("[*.example]:2?22 {}", k.to_openssh());
        assert_eq!(check_text(&line, "h.example", 2222, &k), Verdict::Known);
    }

    #[test]
    fn hashed_entries() {
        // Built the way `ssh-keygen -H` hashes "[127.0.0.1]:2222" (HMAC-SHA1 keyed by the salt).
        let k = key("ssh-ed25519", b"A");
        let salt = [1u8; 20];
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).expect("hmac");
        mac.update(b"[127.0.0.1]:2222");
        let h = format!(
            "|1|{}|{}",
            STANDARD.encode(salt),
            STANDARD.encode(mac.finalize().into_bytes())
        );
        let line = format!("{h} {}", k.to_openssh());
        assert_eq!(check_text(&line, "127.0.0.1", 2222, &k), Verdict::Known);
        assert_eq!(check_text(&line, "127.0.0.1", 22, &k), Verdict::Unknown);
    }

    #[test]
    fn changed_revoked_and_markers() {
        let k = key("ssh-ed25519", b"A");
        let other = key("ssh-ed25519", b"B");
        let text = format!("h {}\n", other.to_openssh());
        assert_eq!(
            check_text(&text, "h", 22, &k),
            Verdict::Changed(vec![other.clone()])
        );
        let text = format!("h {}\n@revoked * {}\n", k.to_openssh(), k.to_openssh());
        assert_eq!(check_text(&text, "h", 22, &k), Verdict::Revoked);
        let text = format!("@cert-authority * {}\ngarbage\n# c\n", k.to_openssh());
        assert_eq!(check_text(&text, "h", 22, &k), Verdict::Unknown);
    }

    #[test]
    fn add_writes_openssh_form_and_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/known_hosts");
        let k1 = key("ssh-ed25519", b"A");
        let k2 = key("ssh-ed25519", b"B");
        add_host_key(&p, "::1", 2222, &k1, false).expect("add");
        let text = std::fs::read_to_string(&p).expect("read");
        assert_eq!(text, format!("[::1]:2222 {}\n", k1.to_openssh()));
        add_host_key(&p, "other", 22, &k1, false).expect("add");
        add_host_key(&p, "::1", 2222, &k2, true).expect("replace");
        let text = std::fs::read_to_string(&p).expect("read");
        assert_eq!(check_text(&text, "::1", 2222, &k2), Verdict::Known);
        assert!(matches!(
            check_text(&text, "::1", 2222, &k1),
            Verdict::Changed(_)
        ));
        assert_eq!(check_text(&text, "other", 22, &k1), Verdict::Known);
    }
}
