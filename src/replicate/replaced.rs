//! A database file replaced (renamed over) or deleted under the running daemon.
//!
//! Invariant: nothing of the old file is ever read as, or checkpointed into, the new one. The
//! old file's handles are all closed at once; its `-wal`/`-shm` are removed once no other
//! process uses them (SQLite leaves them behind for a moved file and would read them over the
//! new one); only then is the new file opened, locked first, always as a new generation.

use super::capture::Capture;
use super::dblock::DbLock;
use super::spool::Spool;
use super::state::StateDir;
use crate::config::Settings;
use crate::db::{ensure_wal_mode, Db, StaleSidecars};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A database file replaced (renamed over) or deleted under the running daemon, whose old
/// file walship has closed. The new file is opened once it exists and the old file's `-wal`
/// and `-shm` are gone (walship removes them once no other process uses them: SQLite would
/// read them over the new file), and it always starts a new generation.
pub(crate) struct Replaced {
    /// "replaced by another file" or "deleted".
    pub(crate) how: &'static str,
    stale: StaleSidecars,
    /// The old database's sidecar still in use by another process, if any.
    in_use: Option<PathBuf>,
    /// The last error logged while reopening (each is logged once).
    pub(crate) last_error: String,
}

impl Replaced {
    pub(crate) fn close(cap: Capture, db: &Path) -> Replaced {
        let how = if db.exists() {
            "replaced by another file"
        } else {
            "deleted"
        };
        Replaced {
            how,
            stale: cap.close_replaced(),
            in_use: None,
            last_error: String::new(),
        }
    }

    /// What walship waits for before it opens the new file.
    pub(crate) fn waiting(&self) -> String {
        match &self.in_use {
            Some(p) => format!(
                "waiting until no process holds the old database (its {} is still in use)",
                p.display()
            ),
            // Another walship holds the new file's lock, say (see `dblock`).
            None if !self.last_error.is_empty() => {
                format!("cannot open the new file, retrying: {}", self.last_error)
            }
            None => "waiting for the new file".into(),
        }
    }

    /// Opens the new file, locked first (a [`DbLock`] on its inode: another walship may
    /// replicate the file that was moved in, and then this fails until it lets go).
    pub(crate) fn reopen(
        &mut self,
        spool: &Arc<Spool>,
        state: &StateDir,
        settings: &Settings,
    ) -> Result<Option<(Capture, DbLock)>> {
        let db = settings.db.as_path();
        self.in_use = self.stale.remove()?.map(Path::to_path_buf);
        if let Some(p) = &self.in_use {
            bail!(
                "{} of the old database is still open in another process (an application still using the file that was {}); opening the new file now would read the old WAL over it: waiting until that process closes it",
                p.display(),
                self.how
            );
        }
        if !db.exists() {
            return Ok(None);
        }
        let lock = DbLock::acquire(db)?;
        ensure_wal_mode(db)?;
        let d = Db::open(db)?;
        let why = format!("the database file was {} while walship ran", self.how);
        // The mark of this process's own unsynced files, if any (the same boot).
        let volatile = super::capture::volatile_on_open(state, spool)?;
        let mut c = Capture::start(
            d,
            spool.clone(),
            state,
            settings.segment_size,
            Some(&why),
            volatile,
        )?;
        c.rotate_pin()?;
        Ok(Some((c, lock)))
    }
}
