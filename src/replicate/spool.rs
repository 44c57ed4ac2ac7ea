//! The local spool: finished snapshot and segment files waiting to reach every replica.
//!
//! Layout: `<state>/spool/<generation>/<file name as on the replica>`. Invariants: a file
//! appears under its final name only when complete and durable (temp, fsync, rename, dir
//! fsync); files are ordered by [`Key`], which is the order replicas must receive them in
//! (within a generation: by last txid, a snapshot after the segment that ends at its txid).

use crate::layout::names::{FileName, GenerationId};
use crate::target::file::{fsync_dir, remove_temp_files};
use crate::target::temp_name;
use anyhow::{Context, Result};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

/// The order of files within the spool and on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The generation.
    pub generation: GenerationId,
    /// The last txid the file contains.
    pub last: u64,
    /// 0 for a segment, 1 for a snapshot (a snapshot at T follows the segment ending at T).
    pub rank: u8,
}

impl Key {
    /// The key of `name` in `generation`.
    pub fn of(generation: GenerationId, name: &FileName) -> Key {
        Key {
            generation,
            last: name.last_txid(),
            rank: u8::from(matches!(name, FileName::Snapshot { .. })),
        }
    }
}

/// One spooled file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolFile {
    /// Its generation.
    pub generation: GenerationId,
    /// Its name (the same as on the replica).
    pub name: FileName,
    /// Size in bytes.
    pub size: u64,
}

impl SpoolFile {
    /// Its ordering key.
    pub fn key(&self) -> Key {
        Key::of(self.generation, &self.name)
    }
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// Opens (creating) the spool under `state_dir` and removes leftover temporary files.
    ///
    /// # Errors
    /// I/O errors with the path.
    pub fn open(state_dir: &Path) -> Result<Spool> {
        let dir = state_dir.join("spool");
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create spool directory {}", dir.display()))?;
        let spool = Spool { dir };
        for g in spool.generations()? {
            let gdir = spool.dir.join(g.to_string());
            remove_temp_files(&gdir)
                .with_context(|| format!("cannot remove temporary files in {}", gdir.display()))?;
        }
        Ok(spool)
    }

    fn generations(&self) -> Result<Vec<GenerationId>> {
        let mut out = Vec::new();
        for ent in fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?
        {
            let ent = ent?;
            if let Some(g) = ent.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(g);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every spooled file, in [`Key`] order.
    ///
    /// # Errors
    /// I/O errors with the path.
    pub fn list(&self) -> Result<Vec<SpoolFile>> {
        let mut out = Vec::new();
        for g in self.generations()? {
            let gdir = self.dir.join(g.to_string());
            let entries = match fs::read_dir(&gdir) {
                Ok(e) => e,
                // The main loop removes a generation every replica holds: a shipper listing
                // at that moment must not see an error (it would back off for nothing).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot list {}", gdir.display())),
            };
            for ent in entries {
                let ent = ent.with_context(|| format!("cannot list {}", gdir.display()))?;
                let Some(name) = ent
                    .file_name()
                    .to_str()
                    .and_then(|s| FileName::parse(s).ok())
                else {
                    continue;
                };
                let size = ent.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(SpoolFile {
                    generation: g,
                    name,
                    size,
                });
            }
        }
        out.sort_by_key(SpoolFile::key);
        Ok(out)
    }

    /// Path of a spooled file.
    pub fn path(&self, generation: &GenerationId, name: &FileName) -> PathBuf {
        self.dir.join(generation.to_string()).join(name.to_string())
    }

    /// Creates a temporary file for a new spool file of `generation`.
    ///
    /// # Errors
    /// I/O errors with the path.
    pub fn create_temp(&self, generation: &GenerationId) -> Result<(PathBuf, File)> {
        let gdir = self.dir.join(generation.to_string());
        // The directory may be removed concurrently when its last file is shipped: retry.
        let mut attempts = 0;
        loop {
            if !gdir.is_dir() {
                fs::create_dir_all(&gdir)
                    .with_context(|| format!("cannot create {}", gdir.display()))?;
                fsync_dir(&self.dir)?;
            }
            let tmp = gdir.join(temp_name());
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => return Ok((tmp, f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 5 => attempts += 1,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", tmp.display()))
                }
            }
        }
    }

    /// Makes a finished temporary file durable under its final name.
    ///
    /// # Errors
    /// I/O errors with the path; the temporary file is removed.
    pub fn publish(
        &self,
        tmp: &Path,
        f: File,
        generation: &GenerationId,
        name: &FileName,
    ) -> Result<u64> {
        let dest = self.path(generation, name);
        let r = (|| -> std::io::Result<u64> {
            f.sync_all()?;
            let len = f.metadata()?.len();
            drop(f);
            fs::rename(tmp, &dest)?;
            fsync_dir(dest.parent().unwrap_or(&self.dir))?;
            Ok(len)
        })();
        if r.is_err() {
            let _ = fs::remove_file(tmp);
        }
        r.with_context(|| format!("cannot write spool file {}", dest.display()))
    }

    /// Deletes a spooled file (and its generation directory once empty).
    ///
    /// # Errors
    /// I/O errors with the path.
    pub fn remove(&self, f: &SpoolFile) -> Result<()> {
        let p = self.path(&f.generation, &f.name);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
        }
        let gdir = self.dir.join(f.generation.to_string());
        if fs::remove_dir(&gdir).is_ok() {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }
}
