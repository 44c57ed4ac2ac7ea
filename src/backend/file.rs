//! The `file://` target: a replica in a local (or locally mounted) directory.
//!
//! Invariants: every write goes to a temporary file in the destination directory, is fsynced,
//! renamed over the final name, and the directory is fsynced, so after a power cut a final name
//! holds either the old complete file or the new complete file. Directories created on the way
//! are fsynced into their parents too. A listing is taken while a running walship may compact
//! and prune the same directory: an entry removed between `readdir` and its `stat`, or a
//! directory removed while it is read, is simply not listed (as with OpenSSH's sftp-server).
//!
//! [`Backend::append`] is `pwrite` + `fdatasync` on a descriptor kept open from one append to
//! the next (the file a daemon grows by a few hundred bytes per commit), so a cached append is
//! two system calls. The cache follows the file through [`Backend::rename`] (a descriptor
//! follows its inode) and is dropped when the name is written, deleted or renamed over, and
//! after any error, so an append never lands in a file that no longer has the name asked for.
//! A rename does not fsync the directory: by [`Backend::rename`]'s contract a power cut may
//! undo it (the next file written there, or a deletion, makes it durable with its own
//! directory fsync).

use super::{check_path, split_parent, Backend, BackendError, Entry, Result};
use crate::durable::{fsync_dir, remove_temp_files, write_file_atomic, TEMP_PREFIX};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The file last appended to, kept open for the next append.
#[derive(Debug)]
struct Tail {
    /// Its relative path now (updated by a rename).
    path: String,
    file: File,
    /// Its size as the last append left it.
    len: u64,
}

/// A replica stored in a directory of the local filesystem.
#[derive(Debug)]
pub struct FileBackend {
    root: PathBuf,
    /// See the module documentation.
    tail: Mutex<Option<Tail>>,
}

impl FileBackend {
    /// A target rooted at `root` (created on first write if missing).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            tail: Mutex::new(None),
        }
    }

    fn tail(&self) -> MutexGuard<'_, Option<Tail>> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the open tail if it is `path`, which is about to get other content.
    fn forget_tail(&self, path: &str) {
        let mut t = self.tail();
        if t.as_ref().is_some_and(|t| t.path == path) {
            *t = None;
        }
    }

    /// The open tail for `path`: the cached one, or `path` opened now (with its size).
    fn open_tail<'a>(&self, cache: &'a mut Option<Tail>, path: &str) -> io::Result<&'a mut Tail> {
        if cache.as_ref().is_none_or(|t| t.path != path) {
            *cache = None;
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(self.abs(path))?;
            let len = file.metadata()?.len();
            *cache = Some(Tail {
                path: path.to_owned(),
                file,
                len,
            });
        }
        cache
            .as_mut()
            .ok_or_else(|| io::Error::other("no open file"))
    }

    fn abs(&self, path: &str) -> PathBuf {
        if path.is_empty() {
            self.root.clone()
        } else {
            self.root.join(path)
        }
    }

    fn err(&self, op: &str, path: &str, e: &io::Error) -> BackendError {
        BackendError::io(op, path, &self.url(), e)
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

impl Backend for FileBackend {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn root_exists(&self) -> Result<bool> {
        match fs::metadata(&self.root) {
            Ok(md) if md.is_dir() => Ok(true),
            Ok(_) => Err(BackendError::new(
                super::ErrorKind::Other,
                format!("{} is not a directory", self.url()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err("examine", "", &e)),
        }
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
            if name.starts_with(TEMP_PREFIX) {
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
        self.forget_tail(path);
        write_file_atomic(&dest, data, 0o644).map_err(|e| self.err("write", path, &e))
    }

    fn can_append(&self) -> bool {
        true
    }

    fn append(&self, path: &str, at: u64, data: &[u8]) -> Result<()> {
        check_path(path, false)?;
        let mut cache = self.tail();
        let r = (|| {
            let t = self.open_tail(&mut cache, path)?;
            if t.len < at {
                return Err(io::Error::other(format!(
                    "the file holds {} bytes, fewer than the {at} expected",
                    t.len
                )));
            }
            // Cut first: a crash after this leaves the first `at` bytes, never what followed.
            if t.len > at {
                t.file.set_len(at)?;
            }
            t.len = at;
            t.file.write_all_at(data, at)?;
            t.file.sync_data()?;
            t.len = at + data.len() as u64;
            Ok(())
        })();
        if r.is_err() {
            *cache = None;
        }
        r.map_err(|e| self.err("append to", path, &e))
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        check_path(from, false)?;
        check_path(to, false)?;
        super::check_same_dir(&self.url(), from, to)?;
        let mut cache = self.tail();
        if cache.as_ref().is_some_and(|t| t.path == to) {
            *cache = None;
        }
        if let Err(e) = fs::rename(self.abs(from), self.abs(to)) {
            let url = self.url();
            return Err(BackendError::io(
                &format!("rename {url}/{from} to"),
                to,
                &url,
                &e,
            ));
        }
        if let Some(t) = cache.as_mut().filter(|t| t.path == from) {
            t.path = to.to_owned();
        }
        Ok(())
    }

    fn delete(&self, path: &str) -> Result<()> {
        check_path(path, false)?;
        self.forget_tail(path);
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
