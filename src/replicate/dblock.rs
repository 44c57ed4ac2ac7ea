//! One replicator per database: an exclusive `flock` on the database file itself.
//!
//! The state directory's lock only keeps apart two daemons that share a state directory; two
//! daemons with different state directories (the unit's `/var/lib/walship/NAME` and a hand-run
//! `walship replicate` whose state directory is derived from the database path) would both
//! replicate one database, and the one stopped last would leave the newer generation on the
//! replica, stale. [`DbLock`] ties the lock to the database's inode instead, whatever the state
//! directory, configuration or user.
//!
//! Why `flock` cannot disturb the application: SQLite's default unix VFS locks with `fcntl`
//! (POSIX record locks), and on Linux `flock` and `fcntl` locks are independent, so no
//! application connection ever sees `SQLITE_BUSY` because of this lock (checked with writers
//! using `busy_timeout` 0, in rollback-journal and WAL mode, `locking_mode=EXCLUSIVE` included).
//! The one exception is an application that opens the database through SQLite's `unix-flock`
//! VFS (not built by default): its locks would conflict with this one, so walship must not be
//! used with such an application.
//!
//! Invariants:
//! - The lock lives exactly as long as the [`DbLock`] (its descriptor). Closing any descriptor
//!   of a file drops every POSIX lock this process holds on it, SQLite's included, so a
//!   [`DbLock`] must outlive every SQLite connection of this process to the same inode: hold it
//!   from before the first connection opens until after the last one closed.
//! - When the lock is held elsewhere, [`DbLock::acquire`] fails at once (never waits) with an
//!   [`AlreadyReplicated`] error naming the holder's pid (from `/proc/locks`) when it can be
//!   found, and `main` exits with [`AlreadyReplicated::EXIT_CODE`] (a temporary failure: under
//!   systemd the unit is restarted and starts once the other replicator is gone).

use anyhow::{Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// An exclusive `flock` on a database file, released on drop.
#[derive(Debug)]
pub(crate) struct DbLock {
    /// The descriptor holding the lock: kept open, never read (closing it releases the lock).
    #[allow(dead_code)]
    file: File,
}

/// Another process holds the database's lock: a second replicator was refused.
#[derive(Debug, thiserror::Error)]
#[error("{} is already replicated by {holder}; refusing to start a second replicator", path.display())]
pub struct AlreadyReplicated {
    /// The database.
    pub path: PathBuf,
    /// Who holds the lock, e.g. `walship (pid 1234)`, or `another process` when unknown.
    pub holder: String,
    /// The holder's pid, when `/proc/locks` shows it.
    pub pid: Option<u32>,
}

impl AlreadyReplicated {
    /// The exit code of `walship replicate` when refused: EX_TEMPFAIL (75). Not 78: the
    /// condition is transient, so systemd's `Restart=on-failure` may try again later.
    pub const EXIT_CODE: u8 = 75;
}

impl DbLock {
    /// Takes the exclusive lock on the database at `path`, without waiting.
    ///
    /// # Errors
    /// [`AlreadyReplicated`] when another process holds it; an error naming the file when it
    /// cannot be opened or locked.
    pub(crate) fn acquire(path: &Path) -> Result<DbLock> {
        // Read-only is enough for flock, and works where walship may not write the file.
        let file = File::open(path)
            .with_context(|| format!("cannot open database {} to lock it", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc =
            unsafe { nix::libc::flock(file.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(nix::libc::EWOULDBLOCK) {
                return Err(err)
                    .with_context(|| format!("cannot lock database {}", path.display()));
            }
            let meta = file
                .metadata()
                .with_context(|| format!("cannot stat database {}", path.display()))?;
            let pid = std::fs::read_to_string("/proc/locks")
                .ok()
                .and_then(|t| flock_holder(&t, meta.dev(), meta.ino()));
            return Err(AlreadyReplicated {
                path: path.to_owned(),
                holder: describe(pid),
                pid,
            }
            .into());
        }
        Ok(DbLock { file })
    }
}

/// `walship (pid N)`, `<command> (pid N)`, or `another process` when the pid is unknown.
fn describe(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return "another process".into();
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if comm.is_empty() {
        format!("another process (pid {pid})")
    } else {
        format!("{comm} (pid {pid})")
    }
}

/// The pid holding a `FLOCK ... WRITE` lock on the inode `dev`/`ino`, from the text of
/// `/proc/locks`: lines like `3: FLOCK  ADVISORY  WRITE 1234 fe:00:10011325 0 EOF` (the device
/// as hex major:minor, the inode in decimal); waiters (`3: -> FLOCK ...`) are skipped.
fn flock_holder(text: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::libc::major(dev),
        nix::libc::minor(dev)
    );
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            // A holder in another pid namespace shows as pid 0: unknown.
            [_, "FLOCK", _, "WRITE", pid, id, ..] if *id == want => {
                pid.parse().ok().filter(|p| *p != 0)
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `lock` is on the file now at `path` (false once it was replaced or deleted).
    fn is_on(lock: &DbLock, path: &Path) -> bool {
        match (lock.file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    #[test]
    fn finds_the_flock_holder() {
        let text = "1: POSIX  ADVISORY  READ 77 fe:00:42 1073741826 1073742335\n\
                    2: FLOCK  ADVISORY  WRITE 1234 fe:00:42 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 99 fe:00:42 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 555 fe:00:4242 0 EOF\n";
        let dev = nix::libc::makedev(0xfe, 0);
        assert_eq!(flock_holder(text, dev, 42), Some(1234));
        assert_eq!(flock_holder(text, dev, 4242), Some(555));
        assert_eq!(flock_holder(text, dev, 7), None);
        assert_eq!(flock_holder(text, nix::libc::makedev(8, 1), 42), None);
    }

    #[test]
    fn second_lock_is_refused_and_names_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        std::fs::write(&db, b"").unwrap();
        let held = DbLock::acquire(&db).unwrap();
        assert!(is_on(&held, &db));
        // flock locks belong to the open file description: a second open conflicts even
        // within one process.
        let err = DbLock::acquire(&db).unwrap_err();
        let refused = err.downcast_ref::<AlreadyReplicated>().unwrap();
        assert_eq!(refused.pid, Some(std::process::id()));
        assert!(
            err.to_string()
                .contains("refusing to start a second replicator"),
            "{err}"
        );
        drop(held);
        let again = DbLock::acquire(&db).unwrap();
        std::fs::rename(dir.path().join("x.db"), dir.path().join("y.db")).unwrap();
        std::fs::write(&db, b"").unwrap();
        assert!(!is_on(&again, &db));
    }

    /// The claim the module rests on, by experiment: while the lock is held, another process
    /// writing with busy_timeout 0 (python3's own SQLite, default unix VFS) never gets
    /// SQLITE_BUSY, in rollback-journal mode, in WAL mode (with checkpoints), and with
    /// `locking_mode=EXCLUSIVE`.
    #[test]
    fn application_writers_never_see_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t(x)")
            .unwrap();
        let _held = DbLock::acquire(&db).unwrap();
        let script = r#"
import sqlite3, sys
db = sys.argv[1]
c = sqlite3.connect(db, timeout=0, isolation_level=None)
for i in range(200):
    c.execute("INSERT INTO t VALUES (?)", (i,))
assert c.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
for i in range(200):
    c.execute("INSERT INTO t VALUES (?)", (i,))
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
c.execute("PRAGMA locking_mode=EXCLUSIVE")
c.execute("BEGIN EXCLUSIVE"); c.execute("INSERT INTO t VALUES (1)"); c.execute("COMMIT")
c.close()
c = sqlite3.connect(db, timeout=0, isolation_level=None)
assert c.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
c.execute("INSERT INTO t VALUES (2)")
print(c.execute("SELECT count(*) FROM t").fetchone()[0])
"#;
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&db)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "a writer failed while walship's flock was held: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "402");
    }
}
