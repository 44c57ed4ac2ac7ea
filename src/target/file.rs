//! The `file://` target: a replica in a local (or locally mounted) directory.
//!
//! Invariants: every write goes to a temporary file in the destination directory, is fsynced,
//! renamed over the final name, and the directory is fsynced, so after a power cut a final name
//! holds either the old complete file or the new complete file. Directories created on the way
//! are fsynced into their parents too. A listing is taken while a running walship may compact
//! and prune the same directory: an entry removed between `readdir` and its `stat`, or a
//! directory removed while it is read, is simply not listed (as with OpenSSH's sftp-server).

use super::{check_path, split_parent, temp_name, Entry, Result, Target, TargetError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A replica stored in a directory of the local filesystem.
#[derive(Debug, Clone)]
pub struct FileTarget {
    root: PathBuf,
}

impl FileTarget {
    /// A target rooted at `root` (created on first write if missing).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn abs(&self, path: &str) -> PathBuf {
        if path.is_empty() {
            self.root.clone()
        } else {
            self.root.join(path)
        }
    }

    fn err(&self, op: &str, path: &str, e: &io::Error) -> TargetError {
        TargetError::io(op, path, &self.url(), e)
    }

    /// Creates `dir` and any missing parents, fsyncing each new directory's parent.
    fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.ensure_dir(parent)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }
}

/// Removes a (temporary) file when dropped, unless [`RemoveOnDrop::keep`] says it was moved
/// into place: every error path, and a panic, leave no temporary file behind.
#[derive(Debug)]
pub struct RemoveOnDrop {
    path: PathBuf,
    armed: bool,
}

impl RemoveOnDrop {
    /// Guards `path` (which may not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            armed: true,
        }
    }

    /// The guarded path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file was renamed into place (or must stay): do not remove it.
    pub fn keep(mut self) {
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
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
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
pub fn write_file_atomic(dest: &Path, data: &mut dyn Read, mode: u32) -> io::Result<u64> {
    write_via_temp(dest, data, mode, true)
}

/// Replaces `dest` with `data` through a temporary file and a rename, without fsync: readers
/// never see a torn file, but after a power loss it may hold an older version or nothing. Only
/// for files rewritten at once on start that lose nothing when stale (walship's `status` file,
/// rewritten with every commit: two fsyncs per commit for nothing).
///
/// # Errors
/// Any I/O failure; the temporary file is removed on failure.
pub fn replace_file(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
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
pub fn remove_temp_files(dir: &Path) -> io::Result<usize> {
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
            .is_some_and(|s| s.starts_with(super::TEMP_PREFIX))
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

impl Target for FileTarget {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        check_path(dir, true)?;
        let rd = match fs::read_dir(self.abs(dir)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.err("list", dir, &e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = match ent {
                Ok(ent) => ent,
                // The directory itself was removed while being read (retention): it is gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(self.err("list", dir, &e)),
            };
            let Some(name) = ent.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(super::TEMP_PREFIX) {
                continue;
            }
            // DirEntry::metadata does not follow symlinks: a planted link is never followed.
            let md = match ent.metadata() {
                Ok(md) => md,
                // Removed between readdir and stat (compaction or retention by a running
                // walship): a listing taken a moment later would not hold it either.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err("list", dir, &e)),
            };
            out.push(Entry {
                name,
                size: md.len(),
                is_dir: md.is_dir(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn read(&self, path: &str) -> Result<Box<dyn Read + Send>> {
        check_path(path, false)?;
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(self.abs(path))
            .map_err(|e| self.err("read", path, &e))?;
        Ok(Box::new(f))
    }

    fn write_atomic(&self, path: &str, data: &mut dyn Read) -> Result<u64> {
        check_path(path, false)?;
        let dest = self.abs(path);
        let (parent, _) = split_parent(path);
        self.ensure_dir(&self.abs(parent))
            .map_err(|e| self.err("create directory", parent, &e))?;
        write_file_atomic(&dest, data, 0o644).map_err(|e| self.err("write", path, &e))
    }

    fn delete(&self, path: &str) -> Result<()> {
        check_path(path, false)?;
        match fs::remove_file(self.abs(path)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.err("delete", path, &e)),
        }
        let (parent, _) = split_parent(path);
        fsync_dir(&self.abs(parent)).map_err(|e| self.err("sync directory", parent, &e))
    }

    fn remove_dir(&self, dir: &str) -> Result<()> {
        check_path(dir, false)?;
        match fs::remove_dir(self.abs(dir)) {
            Ok(()) => {
                let (parent, _) = split_parent(dir);
                fsync_dir(&self.abs(parent)).map_err(|e| self.err("sync directory", parent, &e))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.err("remove directory", dir, &e)),
        }
    }

    fn cleanup(&self, dir: &str) -> Result<usize> {
        check_path(dir, true)?;
        remove_temp_files(&self.abs(dir))
            .map_err(|e| self.err("remove temporary files in", dir, &e))
    }
}
