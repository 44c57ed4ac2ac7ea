//! Capture: turns new commits in the WAL into segment files in the spool, takes snapshots,
//! and checkpoints once frames are safe.
//!
//! Invariants:
//! - Every commit gets the next txid of the generation, and its segment record carries the
//!   whole-database checksum after it, maintained incrementally in [`PageHashes`]; a snapshot
//!   recomputes it from scratch and must agree (a disagreement starts a new generation).
//! - Before a segment is published, the state file records the positions before (`prev-*`) and
//!   after it; on restart the spool and the replicas' positions tell which one holds, so a
//!   crash between the two redoes the step. A spool that is ahead of both, or a newer
//!   generation in the spool, starts a new generation rather than guessing.
//! - A new generation begins with a snapshot, and nothing is captured on top of it until that
//!   snapshot is spooled. A restart resumes the generation only when continuity is proven: the
//!   same WAL still holds the frames after the saved position; or page hashes saved at a clean
//!   stop let exactly the changed pages ship as one commit; or the database's checksum equals
//!   the saved one.
//! - A step that fails half-way (memory ahead of the spool) poisons the capture: the next
//!   round starts a new generation.
//! - One failure is one failure: a snapshot that cannot be written (walship's disk is full,
//!   say) is tried again with a backoff of 1 s doubling up to 15 s, returning the same error
//!   meanwhile; a new generation's snapshot is retried under the same generation id as long as
//!   nothing of that generation was published (spooled or on a replica).
//! - Snapshots, a resume's one commit and any commit of at least a segment's size are spooled
//!   *live* (named before they are written, their time being when their capture began), so
//!   that replicas receive them while they are compressed; replicas finish them only once
//!   they are published in the spool (for a segment, after the state above is saved).

use super::spool::{Key, Spool, SpoolWriter};
use super::state::{CaptureState, Captured, SavedCapture, StateDir};
use crate::clock::now_ms;
use crate::db::{Db, WalChange, WalCommit, WalPos, WalState};
use crate::layout::checksum::PageHashes;
use crate::layout::codec::{Commit, Encoder, Kind};
use crate::layout::names::{FileName, GenerationId};
use anyhow::{anyhow, bail, Result};
use std::io::BufWriter;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Longest walship holds SQLite's write lock to capture a backlog (a checkpoint's own copy
/// comes on top, bounded by the WAL that was captured): far below any sane busy timeout.
const LOCK_BUDGET: Duration = Duration::from_millis(500);

/// zstd level for segments and snapshots: fast, still ~2-4x on typical pages.
const ZSTD_LEVEL: i32 = 1;

/// How long a checkpoint chases a writer without any lock (see `checkpoint_unlocked`).
const UNLOCKED_CHECKPOINT_BUDGET: Duration = Duration::from_millis(250);

/// First and longest pause of checkpoints while a reader keeps them from copying the WAL.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A commit this big (and at least a segment's size) is spooled live (see `spool`).
const LIVE_MIN_BYTES: u64 = 4 << 20;

/// The capture engine for one database.
pub struct Capture {
    db: Db,
    spool: Arc<Spool>,
    state: StateDir,
    segment_size: u64,
    /// Where capture stands (generation, txid, checksum).
    pub at: Captured,
    page_size: u32,
    /// Position in the WAL after the last captured commit; `None` until a WAL is seen.
    pos: Option<WalPos>,
    hashes: PageHashes,
    /// The WAL position at the last checkpoint (no new one until frames were added).
    checkpointed_at: Option<WalPos>,
    /// Set when a step failed half-way (memory ahead of the spool): the next step starts a
    /// new generation instead of guessing.
    poisoned: bool,
    /// While an application's read transaction keeps checkpoints from copying the whole WAL:
    /// no checkpoint (and no capture under the write lock) before this instant, and the
    /// next back-off. Retaking the write lock for a checkpoint that cannot progress would
    /// only hold the application's writers back.
    checkpoint_backoff: Option<(std::time::Instant, Duration)>,
    /// The last snapshot failed (a full disk, say): when to try again, and in which generation.
    retry: Option<Retry>,
}

/// First wait before a failed snapshot is tried again; it doubles with every failure...
const RETRY_FIRST: Duration = Duration::from_secs(1);

/// ...up to this.
const RETRY_MAX: Duration = Duration::from_secs(15);

/// A snapshot that could not be written, and when to try again (see [`Capture::new_generation`]).
struct Retry {
    /// The new generation the failed snapshot began (`None` for a snapshot within the current
    /// generation). The next attempt reuses it as long as nothing of it was published.
    generation: Option<GenerationId>,
    /// Failures in a row.
    failures: u32,
    /// No attempt before this.
    at: Instant,
    /// The failure, returned as it is until `at`: the main loop logs an error when it changes,
    /// so a failure that lasts is logged once.
    error: String,
}

/// What one capture step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing new.
    Idle,
    /// This many commits were captured into the spool.
    Captured(u64),
}

impl Capture {
    /// Opens capture for `db`: resumes the saved generation when continuity is proven, else
    /// starts a new one with a snapshot. With `fresh` (the reason: the file was replaced under
    /// a running walship, say), a new generation starts whatever the saved state says.
    ///
    /// # Errors
    /// Database, WAL or spool errors.
    pub fn start(
        db: Db,
        spool: Arc<Spool>,
        state: &StateDir,
        segment_size: u64,
        fresh: Option<&str>,
    ) -> Result<Capture> {
        let saved = state.load_capture()?;
        let mut cap = Capture {
            db,
            spool,
            state: state.clone(),
            segment_size,
            at: Captured {
                generation: GenerationId { ms: 0, rand: 0 },
                txid: 0,
                time_ms: 0,
                db_checksum: 0,
                db_pages: 0,
            },
            page_size: 0,
            pos: None,
            hashes: PageHashes::new(4096),
            checkpointed_at: None,
            poisoned: false,
            checkpoint_backoff: None,
            retry: None,
        };
        match (fresh, saved) {
            (Some(why), _) => cap.new_generation(why)?,
            (None, None) => cap.new_generation("no previous state")?,
            (None, Some(saved)) => {
                if let Err(e) = cap.try_resume(saved) {
                    cap.new_generation(&format!("cannot resume: {e:#}"))?;
                }
            }
        }
        Ok(cap)
    }

    /// Tries to resume from saved state; on a proven continuation returns true, otherwise
    /// starts a new generation itself and returns false.
    fn try_resume(&mut self, saved: SavedCapture) -> Result<bool> {
        let SavedCapture { cur, prev } = saved;
        let spool = self.spool.list()?;
        if spool.iter().any(|f| f.generation > cur.at.generation) {
            self.new_generation(
                "the spool holds a generation newer than the saved state (interrupted start)",
            )?;
            return Ok(false);
        }
        let newest = spool
            .iter()
            .filter(|f| f.generation == cur.at.generation)
            .map(|f| f.key().last)
            .max();
        if newest.is_some_and(|n| n > cur.at.txid) {
            self.new_generation("the spool is ahead of the saved state")?;
            return Ok(false);
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
        let chosen = match prev {
            Some(p) if !published => {
                info!(txid = cur.at.txid, "the last capture step was interrupted before its segment was spooled: capturing it again");
                p
            }
            _ => cur,
        };
        let CaptureState { at, page_size, pos } = chosen;
        let (generation, txid, saved_checksum) = (at.generation, at.txid, at.db_checksum);
        self.at = at;
        self.page_size = page_size;
        // Case 1: the same WAL still holds everything after the saved position.
        if let Some(p) = pos {
            if let WalState::Same { commits, end } = self.db.scan(&p)? {
                let db_pages = commits.last().map_or(0, |c| c.db_pages);
                if commits.is_empty() {
                    self.rescan(end.frames, self.at.db_pages)?;
                    if self.hashes.db_checksum() != saved_checksum {
                        self.new_generation("the database differs from the saved state")?;
                        return Ok(false);
                    }
                    self.pos = Some(end);
                    self.save_state()?;
                } else {
                    // The page hashes saved at a clean stop describe the state at `p`: the
                    // backlog's frames update them, so the database is not read again.
                    let saved = self.load_hashes();
                    let saved_hashes = saved.is_some();
                    match saved {
                        Some(h) => self.hashes = h,
                        None => self.rescan(end.frames, db_pages)?,
                    }
                    self.write_merged(&p, &end, db_pages, saved_hashes)?;
                }
                info!(generation = %generation, txid = self.at.txid, "resumed the generation: the WAL is continuous");
                return Ok(true);
            }
        }
        // Case 2: no WAL continuity; the current state is compared with the saved one.
        let (end, end_pages, now_page_size) = self.db.current_end()?;
        if now_page_size != page_size {
            // No page-for-page difference exists across page sizes (found by e2e_db_changes:
            // diffing 8 KiB pages against 4 KiB hashes shipped a corrupt database).
            self.new_generation(&format!(
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
        self.new_generation(
            "the WAL was reset while walship was stopped and the database changed",
        )?;
        Ok(false)
    }

    /// Saves the per-page hashes of the captured state (at a clean stop), so that the next
    /// start can resume by difference even if the WAL was reset meanwhile.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_hashes(&self) -> Result<()> {
        self.state
            .save_page_hashes(&self.at, self.page_size, &self.hashes)
    }

    /// The saved page hashes if they describe exactly the resumed state.
    fn load_hashes(&self) -> Option<PageHashes> {
        self.state.load_page_hashes(&self.at, self.page_size)
    }

    /// Writes one commit holding every page of the current state (at `self.pos`) whose hash
    /// differs from `saved`, following the same save-then-publish protocol as segments.
    /// Returns the number of pages shipped.
    fn write_diff(&mut self, saved: &PageHashes, db_pages: u32) -> Result<u64> {
        self.poison_on_err(|c| c.write_diff_inner(saved, db_pages))
    }

    /// Starts a segment in the spool, remembering the state before it; `live` names a big
    /// segment that shippers may stream while it is written.
    fn begin_segment(&self, live: Option<FileName>) -> Result<PendingSegment> {
        let prev = self.state();
        let w = self.spool.create(&self.at.generation, live)?;
        let enc = Encoder::new(
            BufWriter::with_capacity(256 << 10, w),
            Kind::Segment,
            self.page_size,
            ZSTD_LEVEL,
        )?;
        Ok(PendingSegment { enc, prev })
    }

    /// Finishes a segment: saves the state naming the positions before (`prev-*`) and after
    /// it, then publishes it (see [`Capture::write_segments`] for why in that order).
    fn publish_segment(&self, seg: PendingSegment, name: &FileName) -> Result<()> {
        let w = seg
            .enc
            .finish()?
            .into_inner()
            .map_err(|e| anyhow!("cannot write segment: {}", e.error()))?;
        self.state.save_capture(&SavedCapture {
            cur: self.state(),
            prev: Some(seg.prev),
        })?;
        self.spool.publish(w, &self.at.generation, name)?;
        Ok(())
    }

    fn write_diff_inner(&mut self, saved: &PageHashes, db_pages: u32) -> Result<u64> {
        let ps = self.page_size;
        let frames = self.pos.map_or(0, |p| p.frames);
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
        if changed == 0 && db_pages == saved.len() {
            self.save_state()?;
            return Ok(0);
        }
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
    fn rescan(&mut self, frames: u64, db_pages: u32) -> Result<()> {
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

    /// Starts a new generation: captures to the end of the WAL and writes a snapshot.
    ///
    /// One failure is one failure: if the snapshot cannot be written (walship's disk is
    /// full, say), the next call tries again after a backoff (until then it returns the same
    /// error at once), and with the same generation id as long as nothing of it was
    /// published, so a lasting failure starts one generation, not one per attempt.
    ///
    /// # Errors
    /// Database, WAL or spool errors.
    pub fn new_generation(&mut self, why: &str) -> Result<()> {
        // Until its snapshot is spooled, nothing may be captured on top of it.
        self.poisoned = true;
        self.retry_due()?;
        let again = self
            .retry
            .as_ref()
            .and_then(|r| r.generation)
            .filter(|g| self.unpublished(g));
        let generation = match again {
            Some(g) => {
                tracing::debug!(generation = %g, "trying the snapshot of the new generation again");
                g
            }
            None => {
                let g = GenerationId {
                    ms: now_ms(),
                    rand: rand::random(),
                };
                warn!(generation = %g, "starting a new generation: {why}");
                g
            }
        };
        let r = self.begin_generation(generation);
        self.attempted(r, Some(generation))
    }

    /// Captures to the end of the WAL and writes the snapshot that begins `generation`.
    fn begin_generation(&mut self, generation: GenerationId) -> Result<()> {
        let mut attempt = 0;
        loop {
            let (end, db_pages, page_size) = self.db.current_end()?;
            if db_pages == 0 {
                bail!(
                    "{} is empty (0 pages): nothing to replicate yet",
                    self.db.path().display()
                );
            }
            self.page_size = page_size;
            self.pos = end;
            self.at = Captured {
                generation,
                txid: 1,
                time_ms: now_ms(),
                db_checksum: 0,
                db_pages,
            };
            match self.write_snapshot() {
                // The WAL restarted under the read (a slot-0 pin allows one restart): the
                // next read, of the new WAL, cannot be disturbed again.
                Err(e) if WalChange::is_moved(&e) && attempt < 5 => attempt += 1,
                Err(e) => return Err(e),
                Ok(()) => break,
            }
        }
        self.poisoned = false;
        Ok(())
    }

    /// Writes a snapshot of the state at the current position into the spool, recomputing
    /// every page hash; a mismatch with the incremental checksum is an error.
    fn write_snapshot(&mut self) -> Result<()> {
        let frames = self.pos.map_or(0, |p| p.frames);
        let db_pages = self.at.db_pages;
        let name = FileName::Snapshot {
            txid: self.at.txid,
            time_ms: self.at.time_ms,
        };
        // Live: shippers upload the snapshot while it is compressed.
        let w = self.spool.create(&self.at.generation, Some(name))?;
        let mut enc = Encoder::new(
            BufWriter::with_capacity(1 << 20, w),
            Kind::Snapshot,
            self.page_size,
            ZSTD_LEVEL,
        )?;
        // Snapshots are large and rare: compress on every core (the database file is read on
        // this thread meanwhile).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        if cores > 1 {
            enc.workers(cores as u32)?;
        }
        let mut hashes = PageHashes::new(self.page_size);
        self.db
            .for_each_page(self.page_size, frames, db_pages, |pgno, data| {
                hashes.set(pgno, data);
                enc.page(pgno, data)?;
                Ok(())
            })?;
        hashes.set_size(db_pages);
        let checksum = hashes.db_checksum();
        if self.at.db_checksum != 0 && self.at.txid > 1 && checksum != self.at.db_checksum {
            let a = hashes.as_slice();
            let b = self.hashes.as_slice();
            let differ = (0..a.len().max(b.len()))
                .filter(|&i| a.get(i) != b.get(i))
                .count();
            // The captured history no longer provably matches the database: it must not be
            // extended. The next step starts a new generation from this consistent read.
            self.poisoned = true;
            return Err(WalChange::Broken(format!(
                "snapshot check failed: {differ} page(s) of {db_pages} differ from the captured state (checksum {checksum:016x}, captured {:016x})",
                self.at.db_checksum
            ))
            .into());
        }
        enc.commit(&Commit {
            txid: self.at.txid,
            time_ms: self.at.time_ms,
            db_pages,
            db_checksum: checksum,
        })?;
        let w = enc
            .finish()?
            .into_inner()
            .map_err(|e| anyhow!("cannot write snapshot: {}", e.error()))?;
        let size = self.spool.publish(w, &self.at.generation, &name)?;
        self.hashes = hashes;
        self.at.db_checksum = checksum;
        info!(generation = %self.at.generation, txid = self.at.txid, pages = db_pages, bytes = size, "snapshot written");
        self.save_state()
    }

    /// Takes a snapshot at the current end of the WAL (captures first).
    ///
    /// # Errors
    /// Database, WAL or spool errors.
    pub fn snapshot(&mut self) -> Result<()> {
        self.retry_due()?;
        let mut attempt = 0;
        loop {
            self.step()?;
            match self.write_snapshot() {
                Err(e) if WalChange::is_moved(&e) && attempt < 5 => attempt += 1,
                other => {
                    // The snapshot's buffers (zstd workers' among them) are free now.
                    super::trim_heap();
                    return self.attempted(other, None);
                }
            }
        }
    }

    /// The error of the last failed snapshot while it is too early to try again.
    fn retry_due(&self) -> Result<()> {
        match &self.retry {
            Some(r) if Instant::now() < r.at => Err(anyhow!("{}", r.error)),
            _ => Ok(()),
        }
    }

    /// Records the outcome of a snapshot attempt (of new generation `generation`, if any):
    /// a failure is tried again after a backoff, doubling from [`RETRY_FIRST`] up to
    /// [`RETRY_MAX`]. A break in continuity is not a failed attempt: it is acted on at once.
    fn attempted(&mut self, r: Result<()>, generation: Option<GenerationId>) -> Result<()> {
        match &r {
            Ok(()) => {
                if let Some(old) = self.retry.take() {
                    info!(generation = %self.at.generation, "snapshot written after {} failed attempt(s)", old.failures);
                }
            }
            Err(e) if WalChange::is_broken(e) => {}
            Err(e) => {
                let failures = self.retry.as_ref().map_or(0, |r| r.failures) + 1;
                let wait = RETRY_FIRST
                    .saturating_mul(1 << (failures - 1).min(8))
                    .min(RETRY_MAX);
                tracing::debug!(failures, "snapshot failed; next attempt in {wait:?}: {e:#}");
                self.retry = Some(Retry {
                    generation,
                    failures,
                    at: Instant::now() + wait,
                    error: format!("{e:#}"),
                });
            }
        }
        r
    }

    /// True if nothing of generation `g` was published: not in the spool, and no replica
    /// recorded a position in it. Only such a generation may be begun again by another
    /// snapshot (its txid 1 is then the new snapshot's, everywhere).
    fn unpublished(&self, g: &GenerationId) -> bool {
        let Ok(files) = self.spool.list() else {
            return false;
        };
        !files.iter().any(|f| f.generation == *g)
            && !self
                .state
                .positions()
                .iter()
                .any(|(_, p)| p.key.generation == *g)
    }

    /// One merged commit for frames after `from` up to `end` (used when resuming). The page
    /// hashes are either those of the state at `from` (`update_hashes`: each frame updates
    /// them) or already those of the end state.
    fn write_merged(
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

    /// Captures every complete new commit into segments.
    ///
    /// # Errors
    /// I/O and SQLite errors; a break in continuity is a [`WalChange::Broken`] error, on which the
    /// caller starts a new generation.
    pub fn step(&mut self) -> Result<Step> {
        self.step_limited(None).map(|(s, _)| s)
    }

    /// Like [`Capture::step`], but captures at most about `max_frames` frames (whole commits,
    /// at least one); the flag says whether complete commits remain after what was captured.
    ///
    /// # Errors
    /// As [`Capture::step`].
    pub fn step_limited(&mut self, max_frames: Option<u64>) -> Result<(Step, bool)> {
        if self.poisoned {
            return Err(WalChange::Broken("an earlier capture step failed half-way".into()).into());
        }
        let state = match self.pos {
            Some(p) => self.db.scan(&p)?,
            None => match self.db.wal_header()? {
                None => WalState::Empty,
                Some(h) => {
                    if h.page_size != self.page_size {
                        WalState::Broken(format!(
                            "page size changed from {} to {}",
                            self.page_size, h.page_size
                        ))
                    } else {
                        match self.db.scan(&WalPos::start(&h))? {
                            WalState::Same { commits, end } => WalState::Restarted { commits, end },
                            other => other,
                        }
                    }
                }
            },
        };
        let header = self.db.last_header();
        let restart_pos = |h: Option<crate::wal::WalHeader>| {
            h.map(|h| WalPos::start(&h))
                .ok_or_else(|| anyhow!("internal: no WAL header scanned"))
        };
        let (from, commits, end) = match state {
            WalState::Empty => return Ok((Step::Idle, false)),
            WalState::Broken(why) => return Err(WalChange::Broken(why).into()),
            WalState::Same { commits, end } => match self.pos {
                Some(p) => (p, commits, end),
                None => (restart_pos(header)?, commits, end),
            },
            WalState::Restarted { commits, end } => (restart_pos(header)?, commits, end),
        };
        if commits.is_empty() {
            if from.frames == 0 {
                self.pos = Some(end);
            }
            return Ok((Step::Idle, false));
        }
        let over = |c: &crate::db::WalCommit| {
            max_frames.is_some_and(|m| c.frames_end.saturating_sub(from.frames) > m)
        };
        let (commits, end, more) = match commits.iter().position(over) {
            Some(k) if commits.len() > 1 => {
                let k = k.max(1);
                let c = commits[k - 1];
                let cut = WalPos {
                    frames: c.frames_end,
                    running: c.running,
                    ..end
                };
                (commits[..k].to_vec(), cut, true)
            }
            _ => (commits, end, false),
        };
        let n = commits.len() as u64;
        let t0 = std::time::Instant::now();
        self.write_segments(&from, &commits, &end, true)?;
        tracing::trace!(
            commits = n,
            frames = end.frames.saturating_sub(from.frames),
            ms = t0.elapsed().as_millis() as u64,
            "captured"
        );
        Ok((Step::Captured(n), more))
    }

    /// Writes the frames from `from` through the given commits into one or more segments, cut
    /// at commit boundaries once a segment holds `segment_size` bytes. For each segment the
    /// state file is saved first, naming both the position before it (`prev-*`) and after it,
    /// and only then is the segment published: after a crash, the spool tells which of the
    /// two holds (see [`Capture::start`]). Any failure poisons the capture (memory is ahead).
    fn write_segments(
        &mut self,
        from: &WalPos,
        commits: &[WalCommit],
        end: &WalPos,
        per_commit: bool,
    ) -> Result<()> {
        self.poison_on_err(|c| c.write_segments_inner(from, commits, end, per_commit))
    }

    /// Runs `f`; if it fails, memory may be ahead of the spool, so the capture is poisoned.
    fn poison_on_err<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn write_segments_inner(
        &mut self,
        from: &WalPos,
        commits: &[WalCommit],
        end: &WalPos,
        per_commit: bool,
    ) -> Result<()> {
        let ps = self.page_size;
        let mut page = vec![0u8; ps as usize];
        let mut cursor = self.db.cursor(from)?;
        let mut frame = from.frames;
        let mut i = 0;
        while i < commits.len() {
            let first = self.at.txid + 1;
            let first_ms = now_ms().max(self.at.time_ms);
            // A commit of at least a segment's size is alone in its segment: named now (its
            // time is when its capture began), shippers can stream it while it is written.
            let big = commits[i].frames_end.saturating_sub(frame) * u64::from(ps)
                >= self.segment_size.max(LIVE_MIN_BYTES);
            let live = big.then_some(FileName::one_commit(first, first_ms));
            let mut seg = self.begin_segment(live)?;
            let enc = &mut seg.enc;
            let mut last = commits[i];
            while i < commits.len() {
                let c = commits[i];
                while frame < c.frames_end {
                    let fh = self.db.read_next(&mut cursor, &mut page)?;
                    enc.page(fh.pgno, &page)?;
                    if per_commit {
                        self.hashes.set(fh.pgno, &page);
                    }
                    frame += 1;
                }
                if per_commit {
                    self.hashes.set_size(c.db_pages);
                }
                self.at.txid += 1;
                self.at.time_ms = if big {
                    first_ms
                } else {
                    now_ms().max(self.at.time_ms)
                };
                self.at.db_pages = c.db_pages;
                self.at.db_checksum = self.hashes.db_checksum();
                enc.commit(&Commit {
                    txid: self.at.txid,
                    time_ms: self.at.time_ms,
                    db_pages: c.db_pages,
                    db_checksum: self.at.db_checksum,
                })?;
                last = c;
                i += 1;
                if big || enc.raw_bytes() >= self.segment_size {
                    break;
                }
            }
            let name = FileName::Segment {
                level: 0,
                first,
                last: self.at.txid,
                first_ms: first_ms.min(self.at.time_ms),
                last_ms: self.at.time_ms,
            };
            self.pos = Some(WalPos {
                salt1: end.salt1,
                salt2: end.salt2,
                frames: last.frames_end,
                running: last.running,
                page_size: ps,
            });
            self.publish_segment(seg, &name)?;
        }
        Ok(())
    }

    /// The captured state, as saved.
    fn state(&self) -> CaptureState {
        CaptureState {
            at: self.at,
            page_size: self.page_size,
            pos: self.pos,
        }
    }

    fn save_state(&self) -> Result<()> {
        self.state.save_capture(&SavedCapture {
            cur: self.state(),
            prev: None,
        })
    }

    /// Frames in the current WAL (what a checkpoint would reclaim).
    pub fn wal_frames(&self) -> u64 {
        self.pos.map_or(0, |p| p.frames)
    }

    /// Moves the pin forward after a step (see `db` module docs).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn rotate_pin(&mut self) -> Result<()> {
        self.db.rotate_pin()
    }

    /// Checkpoints if the WAL holds at least `threshold` frames: write lock, capture the
    /// tail, PASSIVE checkpoint, release. Returns true if a checkpoint ran.
    ///
    /// # Errors
    /// Capture or SQLite errors.
    pub fn maybe_checkpoint(&mut self, threshold: u32) -> Result<bool> {
        if self.wal_frames() < u64::from(threshold)
            || self.checkpointed_at == self.pos
            || self.backing_off()
        {
            return Ok(false);
        }
        self.checkpoint_now(threshold, false)
    }

    /// True while checkpoints wait for a reader that kept the last one from copying the WAL.
    fn backing_off(&self) -> bool {
        self.checkpoint_backoff
            .is_some_and(|(until, _)| std::time::Instant::now() < until)
    }

    /// Lets an application's FULL/RESTART/TRUNCATE checkpoint through if one waits: captures
    /// everything (the checkpointer holds the write lock: nothing more can be appended), then
    /// lets go of the read lock until it is done (see [`Db::yield_to_checkpointer`]). Returns
    /// true if it did.
    ///
    /// # Errors
    /// Capture or SQLite errors.
    pub fn yield_to_checkpointer(&mut self) -> Result<bool> {
        if !self.db.checkpointer_waiting() {
            return Ok(false);
        }
        self.step()?;
        let Some(pos) = self.pos else {
            return Ok(false);
        };
        let t = std::time::Instant::now();
        let done = self.db.yield_to_checkpointer(&pos)?;
        if done {
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                "let an application's checkpoint through"
            );
        }
        Ok(done)
    }

    /// True when the WAL holds at least twice `threshold` frames (as SQLite's wal-index says),
    /// some of them not yet captured nor checkpointed: the writer outruns capture, and this
    /// round should capture under the write lock. Deciding on the WAL's size before capturing,
    /// rather than on what the last round captured, is what bounds the WAL: an unlocked round
    /// never starts on more than `2 × threshold` frames, so the writer can add only what it
    /// writes while that much is captured.
    ///
    /// A poisoned capture is never hot: it cannot capture, so the lock would be held for
    /// nothing.
    pub fn is_hot(&self, threshold: u32) -> bool {
        if self.poisoned || self.backing_off() {
            return false;
        }
        let Some(h) = self.db.wal_index() else {
            return false;
        };
        h.frames >= threshold.saturating_mul(2) && h.backfilled < h.frames && !self.holds(&h)
    }

    /// True if the capture position is at the end of the WAL SQLite's wal-index describes.
    fn holds(&self, h: &crate::db::WalIndexHint) -> bool {
        self.pos.is_some_and(|p| {
            (p.salt1, p.salt2) == (h.salt1, h.salt2) && p.frames >= u64::from(h.frames)
        })
    }

    /// Checkpoints whatever the WAL's size (see [`Capture::maybe_checkpoint`]): without any
    /// lock the application waits for, unless `hot` or the writer outruns that, when the
    /// tail is captured and copied under SQLite's write lock.
    ///
    /// # Errors
    /// Capture or SQLite errors.
    pub fn checkpoint_now(&mut self, threshold: u32, hot: bool) -> Result<bool> {
        // Normally without any lock the application waits for (see `checkpoint_unlocked`).
        // Hot (the writer outruns capture): everything under the write lock, waiting for it
        // as long as a busy writer needs to leave a gap.
        if !hot {
            if self.checkpoint_unlocked()? {
                return Ok(true);
            }
            if !self.is_hot(threshold) {
                return Ok(false);
            }
        }
        if !self.db.lock_writes(Duration::from_millis(2000))? {
            return Ok(false);
        }
        // Capture under the lock in chunks of `threshold` frames, and give the lock back after
        // LOCK_BUDGET even if frames remain (a large backlog, a slow machine): the application
        // must never wait anywhere near its busy timeout. What was captured stays captured;
        // the next round goes on from there.
        let t0 = std::time::Instant::now();
        loop {
            match self.step_limited(Some(u64::from(threshold.max(1)))) {
                Ok((_, false)) => break,
                Ok((_, true)) if t0.elapsed() < LOCK_BUDGET => {}
                Ok((_, true)) => {
                    self.db.unlock_writes();
                    tracing::debug!(
                        locked_ms = t0.elapsed().as_millis() as u64,
                        "released the write lock before the backlog was captured"
                    );
                    return Ok(false);
                }
                Err(e) => {
                    self.db.unlock_writes();
                    return Err(e);
                }
            }
        }
        let (log, done) = self.db.checkpoint_locked()?;
        self.checkpointed_at = self.pos;
        self.note_checkpoint(log, done);
        tracing::debug!(
            log,
            done,
            locked_ms = t0.elapsed().as_millis() as u64,
            "checkpoint"
        );
        Ok(true)
    }

    /// A checkpoint that holds nothing an application writer waits for: capture everything
    /// and move the pin to the end, copy the WAL with a PASSIVE checkpoint (it stops at the
    /// pin), and, if the writer appended nothing meanwhile (the whole WAL is then captured
    /// and copied), move the pin once more: it now begins on a fully copied WAL (SQLite's
    /// read slot 0), so the application's next commit restarts the WAL, and that one restart
    /// comes after every frame of the old WAL was captured (the pin protocol, see `db`). A
    /// writer that appended meanwhile is caught up with again (each copy is only what it
    /// added) for at most [`UNLOCKED_CHECKPOINT_BUDGET`]; true once the WAL was copied whole.
    fn checkpoint_unlocked(&mut self) -> Result<bool> {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < UNLOCKED_CHECKPOINT_BUDGET {
            self.step()?;
            self.rotate_pin()?;
            let t = std::time::Instant::now();
            let Some((log, done)) = self.db.checkpoint_passive()? else {
                return Ok(false);
            };
            let (Some(pos), Some(h)) = (self.pos, self.db.wal_index()) else {
                return Ok(false);
            };
            tracing::trace!(ms = t.elapsed().as_millis() as u64, log, done, "passive");
            if (h.salt1, h.salt2) != (pos.salt1, pos.salt2) {
                return Ok(false);
            }
            if u64::from(h.frames) == pos.frames && h.backfilled == h.frames {
                self.rotate_pin()?;
                self.checkpointed_at = self.pos;
                self.note_checkpoint(log, done);
                tracing::debug!(frames = h.frames, "checkpoint");
                return Ok(true);
            }
            if u64::from(h.backfilled) < pos.frames {
                // Frames walship holds no pin before were not copied: a reader's.
                self.note_checkpoint(i64::from(h.frames), i64::from(h.backfilled));
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// Backs checkpoints off while a reader keeps them from copying the whole WAL (`done`
    /// of `log` frames copied), and ends the back-off once one did.
    fn note_checkpoint(&mut self, log: i64, done: i64) {
        self.checkpoint_backoff = if done < log {
            // A reader keeps frames from being copied: wait for it, longer each time.
            let next = self
                .checkpoint_backoff
                .map_or(MIN_BACKOFF, |(_, b)| (b * 2).min(MAX_BACKOFF));
            tracing::debug!(
                log,
                done,
                backoff_ms = next.as_millis() as u64,
                "a reader holds the WAL: checkpoints back off"
            );
            Some((std::time::Instant::now() + next, next))
        } else {
            None
        };
    }

    /// True if the database file was replaced or deleted under walship.
    pub fn db_replaced(&self) -> bool {
        self.db.replaced()
    }

    /// Ends capture of a database whose file was replaced or deleted: every handle on the old
    /// file is closed (see [`Db::close_replaced`]). What was captured stays in the spool.
    pub fn close_replaced(self) -> crate::db::StaleSidecars {
        self.db.close_replaced()
    }

    /// The spool key of the newest captured state.
    pub fn key(&self) -> Key {
        self.at.key()
    }
}

/// A segment being written to the spool (see [`Capture::begin_segment`]).
struct PendingSegment {
    enc: Encoder<BufWriter<SpoolWriter>>,
    prev: CaptureState,
}
