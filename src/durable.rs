//! Durable local files: every file walship writes on this machine goes through here.
//!
//! Invariants: [`write_file_atomic`] writes to a temporary name in the destination directory,
//! fsyncs it, renames it over the final name and fsyncs the directory, so after a power cut the
//! final name holds either the old complete file or the new one. Temporary names all start with
//! [`TEMP_PREFIX`] (which no final name of walship's uses), so [`remove_temp_files`] can sweep
//! what a crash left behind. [`RemoveOnDrop`] removes a temporary file on every error path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Prefix of every temporary file name; final names never start with it.
pub const TEMP_PREFIX: &str = ".walship-tmp-";

/// A unique temporary name (for the directory of a final file) that [`Backend::cleanup`]
/// recognises.
pub(crate) fn temp_name() -> String {
    // The pid once: `std::process::id` is a system call, and several temporary files are
    // named per commit.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!(
        "{TEMP_PREFIX}{}-{:016x}",
        PID.get_or_init(std::process::id),
        rand::random::<u64>()
    )
}

/// Removes a (temporary) file when dropped, unless [`RemoveOnDrop::keep`] says it was moved
/// into place: every error path, and a panic, leave no temporary file behind.
#[derive(Debug)]
pub(crate) struct RemoveOnDrop {
    path: PathBuf,
    armed: bool,
}

impl RemoveOnDrop {
    /// Guards `path` (which may not exist yet).
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            armed: true,
        }
    }

    /// The guarded path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file was renamed into place (or must stay): do not remove it.
    pub(crate) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d)?.sync_all()
}

/// Writes `data` to `dest` through a temporary file in the same directory: write, fsync,
/// rename, fsync the directory. Used for every local file walship writes.
///
/// # Errors
/// Any I/O failure; the temporary file is removed on failure.
pub(crate) fn write_file_atomic(dest: &Path, data: &mut dyn Read, mode: u32) -> io::Result<u64> {
    write_via_temp(dest, data, mode, true)
}

/// Replaces `dest` with `data` through a temporary file and a rename, without fsync: readers
/// never see a torn file, but after a power loss it may hold an older version or nothing. Only
/// for files rewritten at once on start that lose nothing when stale (walship's `status` file,
/// rewritten with every commit: two fsyncs per commit for nothing).
///
/// # Errors
/// Any I/O failure; the temporary file is removed on failure.
pub(crate) fn replace_file(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_via_temp(dest, &mut &data[..], mode, false).map(|_| ())
}

fn write_via_temp(dest: &Path, data: &mut dyn Read, mode: u32, durable: bool) -> io::Result<u64> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(temp_name());
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        let n = io::copy(data, &mut f)?;
        f.flush()?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, dest)?;
        if durable {
            fsync_dir(dir)?;
        }
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files (named by [`temp_name`]) that an interrupted
/// [`write_file_atomic`] left in `dir` (not below it), then fsyncs `dir`; a missing `dir` has
/// none. Only for directories no other live process writes into (walship holds the state
/// directory's lock; a replica's temp files are swept when nothing uploads).
///
/// # Errors
/// Listing, removing or syncing failed.
pub(crate) fn remove_temp_files(dir: &Path) -> io::Result<usize> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for ent in rd {
        let ent = ent?;
        if ent
            .file_name()
            .to_str()
            .is_some_and(|s| s.starts_with(TEMP_PREFIX))
        {
            fs::remove_file(ent.path())?;
            n += 1;
        }
    }
    if n > 0 {
        fsync_dir(dir)?;
    }
    Ok(n)
}

/// Takes the exclusive `flock` on `dir/lock` (created if missing) that marks `dir` as owned by
/// one live process, then removes the temporary files a killed predecessor left there. The
/// lock lasts as long as the returned file is open (the kernel drops it when the process dies,
/// so a stale lock cannot exist).
///
/// # Errors
/// The lock file cannot be opened, another process holds the lock (`held` says who should not
/// be there, with what to do), or the sweep failed.
pub(crate) fn lock_dir(dir: &Path, held: &str) -> anyhow::Result<File> {
    use anyhow::Context as _;
    let p = dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    if !flock(&f, nix::libc::LOCK_EX) {
        anyhow::bail!("{held}");
    }
    remove_temp_files(dir)
        .with_context(|| format!("cannot remove temporary files in {}", dir.display()))?;
    Ok(f)
}

/// Whether a live process holds [`lock_dir`]'s lock on `dir` now.
pub(crate) fn lock_held(dir: &Path) -> bool {
    OpenOptions::new()
        .write(true)
        .open(dir.join("lock"))
        .is_ok_and(|f| !flock(&f, nix::libc::LOCK_SH))
}

/// `flock(f, how | LOCK_NB)`; whether it was granted.
fn flock(f: &File, how: i32) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    unsafe { nix::libc::flock(f.as_raw_fd(), how | nix::libc::LOCK_NB) == 0 }
}
