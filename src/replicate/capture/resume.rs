//! Resuming a generation at start-up (see the parent module's invariants): the saved state
//! is trusted only when continuity is proven, by the same WAL, by page hashes saved at a clean
//! stop, by an unchanged database checksum, or by a database file that holds exactly the
//! saved state under a WAL restarted since; otherwise a new generation starts.

use super::Capture;
use crate::clock::now_ms;
use crate::db::{WalCommit, WalPos, WalState};
use crate::layout::checksum::PageHashes;
use crate::layout::codec::Commit;
use crate::layout::names::FileName;
use crate::metrics::GenerationReason;
use crate::replicate::state::{CaptureState, SavedCapture};
use anyhow::Result;
use tracing::info;

impl Capture {
    /// Tries to resume from saved state; on a proven continuation returns true, otherwise
    /// starts a new generation itself and returns false.
    pub(super) fn try_resume(&mut self, saved: SavedCapture) -> Result<bool> {
        let Some(chosen) = self.choose_saved(saved)? else {
            return Ok(false);
        };
        let CaptureState { at, page_size, pos } = chosen;
        self.at = at;
        self.page_size = page_size;
        if let Some(p) = pos {
            if let Some(resumed) = self.resume_same_wal(&p, at.db_checksum)? {
                return Ok(resumed);
            }
        }
        self.resume_by_comparison(at.db_checksum)
    }

    /// Which saved state to resume from, checked against the spool and the replicas; `None`
    /// (after starting a new generation) when neither can be trusted.
    fn choose_saved(&mut self, saved: SavedCapture) -> Result<Option<CaptureState>> {
        let SavedCapture { cur, prev } = saved;
        let spool = self.spool.list()?;
        if spool.iter().any(|f| f.generation > cur.at.generation) {
            self.new_generation(
                GenerationReason::InterruptedStart,
                "the spool holds a generation newer than the saved state (interrupted start)",
            )?;
            return Ok(None);
        }
        let newest = spool
            .iter()
            .filter(|f| f.generation == cur.at.generation)
            .map(|f| f.key().last)
            .max();
        if newest.is_some_and(|n| n > cur.at.txid) {
            self.new_generation(
                GenerationReason::InterruptedStart,
                "the spool is ahead of the saved state",
            )?;
            return Ok(None);
        }
        // The state is saved before its segment is published: if neither the spool nor any
        // replica has the saved txid, that segment never existed and the step is redone from
        // the position before it.
        let replicated = self
            .state
            .positions()
            .into_iter()
            .map(|(_, p)| p.key)
            .filter(|k| k.generation == cur.at.generation)
            .map(|k| k.last)
            .max();
        let published = newest >= Some(cur.at.txid) || replicated >= Some(cur.at.txid);
        Ok(Some(match prev {
            Some(p) if !published => {
                info!(txid = cur.at.txid, "the last capture step was interrupted before its segment was spooled: capturing it again");
                p
            }
            _ => cur,
        }))
    }

    /// Case 1: the same WAL still holds everything after the saved position `p`. `None` when
    /// it does not.
    fn resume_same_wal(&mut self, p: &WalPos, saved_checksum: u64) -> Result<Option<bool>> {
        let WalState::Same { commits, end } = self.db.scan(p)? else {
            return Ok(None);
        };
        let db_pages = commits.last().map_or(0, |c| c.db_pages);
        if commits.is_empty() {
            self.rescan(end.frames, self.at.db_pages)?;
            if self.hashes.db_checksum() != saved_checksum {
                self.new_generation(
                    GenerationReason::ChangedWhileStopped,
                    "the database differs from the saved state",
                )?;
                return Ok(Some(false));
            }
            self.pos = Some(end);
            self.save_state()?;
        } else {
            // The page hashes saved at a clean stop describe the state at `p`: the backlog's
            // frames update them, so the database is not read again.
            let saved = self.load_hashes();
            let saved_hashes = saved.is_some();
            match saved {
                Some(h) => self.hashes = h,
                None => self.rescan(end.frames, db_pages)?,
            }
            self.write_merged(p, &end, db_pages, saved_hashes)?;
        }
        info!(generation = %self.at.generation, txid = self.at.txid, "resumed the generation: the WAL is continuous");
        Ok(Some(true))
    }

    /// Case 2: no WAL continuity; the current state is compared with the saved one.
    fn resume_by_comparison(&mut self, saved_checksum: u64) -> Result<bool> {
        let (generation, txid, page_size) = (self.at.generation, self.at.txid, self.page_size);
        let (end, end_pages, now_page_size) = self.db.current_end()?;
        if now_page_size != page_size {
            // No page-for-page difference exists across page sizes: diffing 8 KiB pages
            // against 4 KiB hashes would ship a corrupt database.
            self.new_generation(GenerationReason::PageSizeChanged, &format!(
                "the page size changed from {page_size} to {now_page_size} while walship was stopped"
            ))?;
            return Ok(false);
        }
        // With the page hashes saved at the last clean stop, ship exactly the pages that
        // differ: correct whatever happened to the WAL meanwhile.
        if let Some(saved) = self.load_hashes() {
            self.pos = end;
            let changed = self.write_diff(&saved, end_pages)?;
            info!(generation = %generation, txid = self.at.txid, "resumed the generation: {changed} page(s) changed while walship was stopped");
            self.state.remove_page_hashes();
            return Ok(true);
        }
        self.rescan(end.map_or(0, |e| e.frames), end_pages)?;
        if self.hashes.db_checksum() == saved_checksum && self.hashes.len() == end_pages {
            self.pos = end;
            self.at.db_pages = end_pages;
            info!(generation = %generation, txid, "resumed the generation: the database is unchanged");
            self.save_state()?;
            return Ok(true);
        }
        if let Some(end) = end {
            if self.resume_restarted_wal(&end, end_pages, saved_checksum)? {
                info!(generation = %generation, txid = self.at.txid, "resumed the generation: the WAL was restarted after the saved position, and the database file holds the saved state");
                return Ok(true);
            }
        }
        self.new_generation(
            GenerationReason::ChangedWhileStopped,
            "the WAL was reset while walship was stopped and the database changed",
        )?;
        Ok(false)
    }

    /// Case 3: the WAL was restarted after the saved position (a crash between the restart
    /// and the capture of the new WAL's first commits, or a TRUNCATE checkpoint while walship
    /// was stopped). SQLite
    /// restarts a WAL only once a checkpoint copied all of it into the database file, so if
    /// the file itself (read without the WAL) is exactly the saved state, no commit went unseen
    /// before the restart, and the new WAL's commits, up to `end`, follow the saved state.
    /// A checkpoint of the new WAL's frames into the file makes the file differ: no resume.
    fn resume_restarted_wal(
        &mut self,
        end: &WalPos,
        end_pages: u32,
        saved_checksum: u64,
    ) -> Result<bool> {
        let Some(h) = self.db.wal_header()? else {
            return Ok(false);
        };
        let start = WalPos::start(&h);
        if (start.salt1, start.salt2) != (end.salt1, end.salt2) || end.frames == 0 {
            return Ok(false);
        }
        let (_, file_pages) = self.db.file_geometry()?;
        if file_pages != self.at.db_pages {
            return Ok(false);
        }
        self.rescan(0, file_pages)?;
        if self.hashes.db_checksum() != saved_checksum || self.hashes.len() != file_pages {
            return Ok(false);
        }
        self.write_merged(&start, end, end_pages, true)?;
        Ok(true)
    }

    /// The saved page hashes if they describe exactly the resumed state.
    pub(super) fn load_hashes(&self) -> Option<PageHashes> {
        self.state.load_page_hashes(&self.at, self.page_size)
    }

    /// Writes one commit holding every page of the current state (at `self.pos`) whose hash
    /// differs from `saved`, following the same save-then-publish protocol as segments.
    /// Returns the number of pages shipped.
    pub(super) fn write_diff(&mut self, saved: &PageHashes, db_pages: u32) -> Result<u64> {
        self.poison_on_err(|c| c.write_diff_inner(saved, db_pages))
    }

    pub(super) fn write_diff_inner(&mut self, saved: &PageHashes, db_pages: u32) -> Result<u64> {
        let ps = self.page_size;
        let frames = self.pos.map_or(0, |p| p.frames);
        // First without a segment: most starts after a clean stop find nothing changed, and a
        // live segment begun for nothing had shippers start streaming it, then abort when it
        // was abandoned. The pages are read a second time only when some changed.
        self.rescan(frames, db_pages)?;
        if self.hashes.as_slice() == saved.as_slice() {
            self.save_state()?;
            return Ok(0);
        }
        // One commit, named before it is written so that shippers can stream it live (its time
        // is that of the read it comes from).
        let txid = self.at.txid + 1;
        let time_ms = now_ms().max(self.at.time_ms);
        let name = FileName::one_commit(txid, time_ms);
        let mut seg = self.begin_segment(Some(name))?;
        let enc = &mut seg.enc;
        let mut hashes = PageHashes::new(ps);
        let mut changed = 0u64;
        let old = saved.as_slice();
        self.db.for_each_page(ps, frames, db_pages, |pgno, data| {
            hashes.set(pgno, data);
            if old.get(pgno as usize - 1) != hashes.as_slice().get(pgno as usize - 1) {
                enc.page(pgno, data)?;
                changed += 1;
            }
            Ok(())
        })?;
        hashes.set_size(db_pages);
        self.hashes = hashes;
        self.at.txid = txid;
        self.at.time_ms = time_ms;
        self.at.db_pages = db_pages;
        self.at.db_checksum = self.hashes.db_checksum();
        enc.commit(&Commit {
            txid,
            time_ms,
            db_pages,
            db_checksum: self.at.db_checksum,
        })?;
        self.publish_segment(seg, &name)?;
        Ok(changed)
    }

    /// Recomputes all page hashes for the state after WAL frame `frames`.
    pub(super) fn rescan(&mut self, frames: u64, db_pages: u32) -> Result<()> {
        let mut hashes = PageHashes::new(self.page_size);
        self.db
            .for_each_page(self.page_size, frames, db_pages, |pgno, data| {
                hashes.set(pgno, data);
                Ok(())
            })?;
        hashes.set_size(db_pages);
        self.hashes = hashes;
        Ok(())
    }

    /// One merged commit for frames after `from` up to `end` (used when resuming). The page
    /// hashes are either those of the state at `from` (`update_hashes`: each frame updates
    /// them) or already those of the end state.
    pub(super) fn write_merged(
        &mut self,
        from: &WalPos,
        end: &WalPos,
        db_pages: u32,
        update_hashes: bool,
    ) -> Result<()> {
        let commit = WalCommit {
            frames_end: end.frames,
            db_pages,
            running: end.running,
        };
        self.write_segments(from, &[commit], end, update_hashes)
    }
}
