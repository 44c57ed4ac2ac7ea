//! Client-side encryption of a replica: a [`Backend`] wrapper that encrypts every file below the
//! replica's root directory with [age](https://age-encryption.org/v1) to X25519 recipients
//! (`encrypt-to`) as it is written, and decrypts it with the identities of an identity file
//! (`identity-file`, `--identity`) as it is read.
//!
//! What the storage host sees: the marker (`walship-replica.toml`: format, the database's
//! `host:/path`, creation time, `encryption = "age"`) and the owner claims (`owner-*.toml`:
//! instance id, host name, pid, claim time, generation) stay plaintext, because the daemon must
//! read them back with public keys only. Every file below `generations/` is one age file:
//! its name (generation id and start time; snapshot txid and time; segment level, txid range and
//! first/last commit times) and its size (the compressed size plus age's fixed overhead: a
//! header of about 200 bytes per recipient and 16 bytes per 64 KiB chunk) are visible, so the
//! host learns when and roughly how much the database changed, never a page of it.
//!
//! Invariants:
//! - Only public keys are needed to write: a compromised database host cannot decrypt the
//!   history already shipped. A writer without recipients never writes plaintext below the root.
//! - Encryption and decryption stream in 64 KiB chunks (no whole-file buffering): a snapshot
//!   of many GiB costs no more memory than a small one.
//! - A file is never silently read as the wrong kind: below the root, a file that does not
//!   start with age's header is refused, naming it (a plaintext file in an encrypted replica),
//!   and [`check_marker`] refuses a replica whose marker disagrees with how it was opened
//!   (encrypted vs plaintext), so the two never mix in one replica.
//! - Secret key material is never printed: errors name the identity file and line, not its
//!   content.

use super::{check_path, split_parent, Backend, BackendError, Entry, ErrorKind, Result};
use age::x25519;
use std::cell::RefCell;
use std::fmt;
use std::io::{self, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The first bytes of every age file.
pub(crate) const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";
/// What a marker's `encryption` says for an age-encrypted replica.
pub(crate) const ENCRYPTION_AGE: &str = "age";
/// Plaintext bytes fed to the encryptor at a time (age's own chunk size).
const CHUNK: usize = 64 << 10;

/// Parses one `encrypt-to` entry, an age X25519 recipient (`age1...`).
///
/// # Errors
/// Why it is not one (the entry itself is public: callers may print it).
pub(crate) fn parse_recipient(s: &str) -> std::result::Result<x25519::Recipient, String> {
    s.parse::<x25519::Recipient>().map_err(|e| {
        if s.starts_with("AGE-SECRET-KEY-") {
            "this is a secret key, not a recipient: give its public key (age-keygen -y)".into()
        } else {
            format!("not an age X25519 recipient (age1...): {e}")
        }
    })
}

/// Reads the X25519 identities (`AGE-SECRET-KEY-1...` lines; `#` comments and blank lines
/// are skipped) of an age identity file, as `age-keygen` writes it.
///
/// # Errors
/// A message naming the file (and the line of a bad entry, never its content).
pub(crate) fn load_identities(path: &Path) -> std::result::Result<Vec<x25519::Identity>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read identity file {}: {e}", path.display()))?;
    let mut ids = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let id = line.parse::<x25519::Identity>().map_err(|_| {
            format!(
                "identity file {}, line {}: not an age X25519 identity (AGE-SECRET-KEY-1...)",
                path.display(),
                i + 1
            )
        })?;
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(format!(
            "identity file {} holds no age identity (AGE-SECRET-KEY-1...)",
            path.display()
        ));
    }
    Ok(ids)
}

/// A target whose files below the root are age-encrypted (see the module docs).
pub struct Encrypted {
    inner: Box<dyn Backend>,
    recipients: Vec<x25519::Recipient>,
    identity_file: Option<PathBuf>,
    /// The identities, or why there are none usable.
    identities: std::result::Result<Vec<x25519::Identity>, String>,
}

impl fmt::Debug for Encrypted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the identities: they are secret.
        f.debug_struct("Encrypted")
            .field("inner", &self.inner)
            .field("recipients", &self.recipients)
            .field("identity_file", &self.identity_file)
            .finish_non_exhaustive()
    }
}

impl Encrypted {
    /// Wraps `inner`: files are encrypted to `recipients` (none: this target can only read)
    /// and decrypted with the identities in `identity_file` (none: it can only write). The
    /// identity file is read here; a problem with it is reported by the first read.
    pub fn new(
        inner: Box<dyn Backend>,
        recipients: Vec<x25519::Recipient>,
        identity_file: Option<PathBuf>,
    ) -> Self {
        let identities = match &identity_file {
            Some(p) => load_identities(p),
            None => Err(format!(
                "replica {} is encrypted: give --identity FILE or identity-file",
                inner.url()
            )),
        };
        Self {
            inner,
            recipients,
            identity_file,
            identities,
        }
    }

    fn other(msg: String) -> BackendError {
        BackendError::new(ErrorKind::Other, msg)
    }

    /// The identity file's name for messages.
    fn identity_name(&self) -> String {
        self.identity_file
            .as_ref()
            .map_or_else(|| "(none)".into(), |p| p.display().to_string())
    }
}

/// Bounds of the size on the target of `plain` bytes encrypted to one X25519 recipient: age's
/// header (168 bytes) and a random "grease" stanza that age adds to every header (13 to 200
/// bytes), the nonce (16), and a 16-byte tag per 64 KiB chunk (at least one chunk). Listings of
/// an encrypted replica show these sizes.
pub fn stored_size_bounds(plain: u64) -> (u64, u64) {
    let chunks = plain.div_ceil(CHUNK as u64).max(1);
    let base = 168 + 16 + plain + 16 * chunks;
    (base + 13, base + 200)
}

/// Files at the root (marker, owner claims) stay plaintext; everything below is encrypted.
fn is_sealed(path: &str) -> bool {
    !split_parent(path).0.is_empty()
}

/// Reads up to `n` bytes, fewer only at the end of the stream.
fn read_prefix(r: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    let mut got = 0;
    while got < n {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

impl Backend for Encrypted {
    fn url(&self) -> String {
        self.inner.url()
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        self.inner.list(dir)
    }

    fn read(&self, path: &str) -> Result<Box<dyn Read + Send>> {
        let mut r = self.inner.read(path)?;
        if !is_sealed(path) {
            return Ok(r);
        }
        let url = self.url();
        let prefix = read_prefix(&mut r, AGE_MAGIC.len())
            .map_err(|e| BackendError::io("read", path, &url, &e))?;
        if prefix != AGE_MAGIC {
            return Err(Self::other(format!(
                "{url}/{path} is not age-encrypted, but the replica is: refusing to read a plaintext file from an encrypted replica (a replica holds encrypted files only; remove the file or restore without encryption settings)"
            )));
        }
        let ids = self
            .identities
            .as_ref()
            .map_err(|e| Self::other(e.clone()))?;
        let input = Cursor::new(prefix).chain(r);
        let dec = age::Decryptor::new(input).map_err(|e| {
            Self::other(format!(
                "cannot decrypt {url}/{path}: invalid age header: {e}"
            ))
        })?;
        let out = dec
            .decrypt(ids.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| {
                let why = match e {
                    age::DecryptError::NoMatchingKeys => "no matching key".to_owned(),
                    other => other.to_string(),
                };
                Self::other(format!(
                    "cannot decrypt {url}/{path} with identity {}: {why}",
                    self.identity_name()
                ))
            })?;
        Ok(Box::new(out))
    }

    /// Returns the plaintext bytes written (the file on the target is larger, see
    /// [`stored_size_bounds`]).
    fn write_atomic(&self, path: &str, data: &mut dyn Read) -> Result<u64> {
        if !is_sealed(path) {
            return self.inner.write_atomic(path, data);
        }
        let url = self.url();
        if self.recipients.is_empty() {
            return Err(Self::other(format!(
                "cannot write {url}/{path}: the replica is encrypted but `encrypt-to` is not set (refusing to write plaintext)"
            )));
        }
        let mut sealing = Sealing::new(data, &self.recipients)
            .map_err(|e| Self::other(format!("cannot encrypt {url}/{path}: {e}")))?;
        self.inner.write_atomic(path, &mut sealing)?;
        Ok(sealing.consumed)
    }

    /// Never: an age file cannot grow by appending bytes (see [`Backend::can_append`]).
    fn can_append(&self) -> bool {
        false
    }

    fn append(&self, path: &str, _at: u64, _data: &[u8]) -> Result<()> {
        check_path(path, false)?;
        Err(Self::other(format!(
            "failed to append to {}/{path}: the files of an encrypted replica are whole age \
             files and cannot be appended to",
            self.url()
        )))
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        check_path(from, false)?;
        check_path(to, false)?;
        Err(Self::other(format!(
            "failed to rename {}/{from} to {to}: an encrypted replica does not rename files",
            self.url()
        )))
    }

    fn delete(&self, path: &str) -> Result<()> {
        self.inner.delete(path)
    }

    fn remove_dir(&self, dir: &str) -> Result<()> {
        self.inner.remove_dir(dir)
    }

    fn cleanup(&self, dir: &str) -> Result<usize> {
        self.inner.cleanup(dir)
    }

    fn root_exists(&self) -> Result<bool> {
        self.inner.root_exists()
    }

    fn encryption(&self) -> Option<&'static str> {
        Some(ENCRYPTION_AGE)
    }

    fn readable(&self) -> std::result::Result<(), String> {
        self.identities.as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

/// Where the encryptor writes: a buffer the [`Sealing`] reader drains.
#[derive(Clone, Default)]
struct Shared(Rc<RefCell<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `Read` of the age encryption of another `Read`, produced chunk by chunk: age's writer
/// is fed one chunk of plaintext at a time and its output handed on before the next.
struct Sealing<'a> {
    src: &'a mut dyn Read,
    writer: Option<age::stream::StreamWriter<Shared>>,
    out: Shared,
    /// Bytes of `out` already handed on.
    pos: usize,
    chunk: Vec<u8>,
    /// Plaintext bytes read from `src`.
    consumed: u64,
}

impl<'a> Sealing<'a> {
    fn new(src: &'a mut dyn Read, recipients: &[x25519::Recipient]) -> io::Result<Self> {
        let enc =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(io::Error::other)?;
        let out = Shared::default();
        let writer = enc.wrap_output(out.clone())?;
        Ok(Self {
            src,
            writer: Some(writer),
            out,
            pos: 0,
            chunk: vec![0; CHUNK],
            consumed: 0,
        })
    }
}

impl Read for Sealing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let out = self.out.0.borrow();
                if self.pos < out.len() {
                    let n = buf.len().min(out.len() - self.pos);
                    buf[..n].copy_from_slice(&out[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            self.out.0.borrow_mut().clear();
            self.pos = 0;
            let Some(w) = self.writer.as_mut() else {
                return Ok(0);
            };
            let n = loop {
                match self.src.read(&mut self.chunk) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => break r?,
                }
            };
            if n == 0 {
                if let Some(w) = self.writer.take() {
                    w.finish()?;
                }
            } else {
                w.write_all(&self.chunk[..n])?;
                self.consumed += n as u64;
            }
        }
    }
}

/// Checks that a replica's marker (its `encryption` key, `marker`) agrees with how `t` was
/// opened, so that encrypted and plaintext files never mix in one replica.
///
/// # Errors
/// An `Other` error naming the replica and what to configure.
pub(crate) fn check_marker(t: &dyn Backend, marker: Option<&str>) -> Result<()> {
    let url = t.url();
    match (marker, t.encryption()) {
        (None, None) => Ok(()),
        (Some(m), Some(ours)) if m == ours => Ok(()),
        (Some(ENCRYPTION_AGE), None) => Err(BackendError::new(
            ErrorKind::Other,
            format!(
                "replica {url} is encrypted (age): give --identity FILE or identity-file to read it, encrypt-to to replicate to it"
            ),
        )),
        (Some(m), _) => Err(BackendError::new(
            ErrorKind::Other,
            format!("replica {url} uses encryption {m:?}, which this walship does not know"),
        )),
        (None, Some(_)) => Err(BackendError::new(
            ErrorKind::Other,
            format!(
                "replica {url} is not encrypted, but encryption is configured (encrypt-to/identity-file/--identity): refusing to mix encrypted and plaintext files (encrypt into a new replica directory)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::file::FileBackend;

    fn pair() -> (x25519::Identity, x25519::Recipient) {
        let id = x25519::Identity::generate();
        let r = id.to_public();
        (id, r)
    }

    #[test]
    fn round_trip_streams_and_hides_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let (id, r) = pair();
        let idf = dir.path().join("id.txt");
        std::fs::write(
            &idf,
            format!(
                "# key\n{}\n",
                age::secrecy::ExposeSecret::expose_secret(&id.to_string())
            ),
        )
        .unwrap();
        let t = Encrypted::new(
            Box::new(FileBackend::new(dir.path().join("r"))),
            vec![r],
            Some(idf),
        );
        // Several chunks and a ragged end.
        let plain: Vec<u8> = (0..(3 * CHUNK + 123))
            .map(|i| b"PLAINTEXT-ROW-"[i % 14])
            .collect();
        let n = t.write_atomic("g/x", &mut plain.as_slice()).unwrap();
        let raw = std::fs::read(dir.path().join("r/g/x")).unwrap();
        assert_eq!(n, plain.len() as u64);
        let within = |plain: u64, stored: usize| {
            let (lo, hi) = stored_size_bounds(plain);
            (lo..=hi).contains(&(stored as u64))
        };
        assert!(within(n, raw.len()), "{n} -> {}", raw.len());
        for len in [0, 1, CHUNK, CHUNK + 1] {
            for _ in 0..20 {
                t.write_atomic("g/s", &mut vec![1; len].as_slice()).unwrap();
                let raw = std::fs::read(dir.path().join("r/g/s")).unwrap();
                assert!(within(len as u64, raw.len()), "{len} -> {}", raw.len());
            }
        }
        assert!(raw.starts_with(AGE_MAGIC));
        assert!(!raw.windows(14).any(|w| w == b"PLAINTEXT-ROW-"));
        let mut back = Vec::new();
        t.read("g/x").unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, plain);
        // The root stays plaintext.
        t.write_atomic("m", &mut &b"hello"[..]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("r/m")).unwrap(), b"hello");
    }

    #[test]
    fn wrong_or_missing_identity_and_plaintext_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, r) = pair();
        let (other, _) = pair();
        let idf = dir.path().join("other.txt");
        std::fs::write(
            &idf,
            age::secrecy::ExposeSecret::expose_secret(&other.to_string()),
        )
        .unwrap();
        let root = dir.path().join("r");
        let w = Encrypted::new(Box::new(FileBackend::new(&root)), vec![r], None);
        w.write_atomic("g/x", &mut &b"data"[..]).unwrap();
        let e = w.read("g/x").err().unwrap().msg;
        assert!(e.contains("is encrypted: give --identity FILE"), "{e}");
        let wrong = Encrypted::new(Box::new(FileBackend::new(&root)), vec![], Some(idf.clone()));
        let e = wrong.read("g/x").err().unwrap().msg;
        assert!(
            e.contains("no matching key") && e.contains("other.txt"),
            "{e}"
        );
        assert!(!e.contains("AGE-SECRET"), "{e}");
        std::fs::write(root.join("g/y"), b"WALSHIP\0plain").unwrap();
        let e = wrong.read("g/y").err().unwrap().msg;
        assert!(e.contains("g/y is not age-encrypted"), "{e}");
        let e = wrong.write_atomic("g/z", &mut &b"p"[..]).unwrap_err().msg;
        assert!(e.contains("`encrypt-to` is not set"), "{e}");
    }

    #[test]
    fn bad_recipients_and_identity_files() {
        assert!(parse_recipient("age1nope").is_err());
        let (id, r) = pair();
        assert!(parse_recipient(&r.to_string()).is_ok());
        let secret = age::secrecy::ExposeSecret::expose_secret(&id.to_string()).to_owned();
        let e = parse_recipient(&secret).unwrap_err();
        assert!(e.contains("secret key"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("id");
        std::fs::write(&f, "# nothing\n").unwrap();
        assert!(load_identities(&f)
            .err()
            .unwrap()
            .contains("holds no age identity"));
        std::fs::write(&f, "AGE-SECRET-KEY-1BAD\n").unwrap();
        let e = load_identities(&f).err().unwrap();
        assert!(e.contains("line 1") && !e.contains("BAD"), "{e}");
    }
}
