//! The `file://` target: a replica in a local (or locally mounted) directory.
//!
//! Invariants: every write goes to a temporary file in the destination directory, is fsynced,
//! renamed over the final name, and the directory is fsynced, so after a power cut a final name
//! holds either the old complete file or the new complete file. Directories created on the way
//! are fsynced into their parents too. A listing is taken while a running walship may compact
//! and prune the same directory: an entry removed between `readdir` and its `stat`, or a
//! directory removed while it is read, is simply not listed (as with OpenSSH's sftp-server).

use super::{check_path, split_parent, Backend, BackendError, Entry, Result};
use crate::durable::{fsync_dir, remove_temp_files, write_file_atomic, TEMP_PREFIX};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A replica stored in a directory of the local filesystem.
#[derive(Debug, Clone)]
pub struct FileBackend {
    root: PathBuf,
}

impl FileBackend {
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
