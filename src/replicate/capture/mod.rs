//! Capture: turns new commits in the WAL into segment files in the spool, takes snapshots,
//! and checkpoints once frames are safe.
//!
//! Invariants:
//! - Every commit gets the next txid of the generation, and its segment record carries the
//!   whole-database checksum after it, maintained incrementally in [`PageHashes`]; a snapshot
//!   recomputes it from scratch and must agree (a disagreement starts a new generation).
//! - Before a segment is published, the state file records the positions before (`prev-*`) and
//!   after it; on restart the spool and the replicas' positions tell which one holds, so a
//!   crash between the two redoes the step. The state is durable once the segment's fsync in
//!   the spool returns, which flushes the device's cache for both (see
//!   `StateDir::save_capture_to_publish`). A spool that is ahead of both, or a newer
//!   generation in the spool, starts a new generation rather than guessing. Within a chase of
//!   big commits a thread of its own does both, in the same order, and without syncing the
//!   segment, under a mark that makes a start after a reboot begin a new generation (see
//!   `publish`).
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

mod checkpoint;
mod publish;
pub(crate) use publish::{volatile_on_open, VolatileAtStart, VOLATILE_MAX_AGE};
mod resume;
mod segments;

use super::spool::{Key, Spool};
use super::state::{CaptureState, Captured, SavedCapture, StateDir};
use crate::clock::now_ms;
use crate::db::{Db, WalChange, WalPos};
use crate::layout::checksum::PageHashes;
use crate::layout::codec::{Commit, Compressor, Encoder, Kind};
use crate::layout::names::{FileName, GenerationId};
use crate::metrics::GenerationReason;
use anyhow::{anyhow, bail, Result};
use std::io::BufWriter;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// zstd level for segments and snapshots: fast, still ~2-4x on typical pages.
const ZSTD_LEVEL: i32 = 1;

/// The capture engine for one database.
pub(crate) struct Capture {
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
    /// The last checkpoint could not copy the whole WAL: checkpoints back off if the next one
    /// cannot either (see `Capture::note_checkpoint`).
    stopped_short: bool,
    /// Whether the commits of the last step of a chase were small (see
    /// `checkpoint::HOLD_BELOW`): the next chase keeps checkpoints to itself from its first step.
    small_commits: bool,
    /// Whether walship keeps SQLite's checkpointer lock between rounds (see
    /// [`Capture::keep_checkpoints`]).
    keeping_checkpoints: bool,
    /// The last step left complete commits it did not capture (a step limited to some
    /// frames): until a step captures to the end of the WAL, the pin moves only where it
    /// cannot let the WAL restart (see `Capture::rotate_pin`).
    behind: bool,
    /// The last snapshot failed (a full disk, say): when to try again, and in which generation.
    retry: Option<Retry>,
    /// Publishes segments on a thread of its own while a checkpoint chases a writer.
    publisher: publish::Publisher,
    /// Whether segments go to the publisher (within [`Capture::checkpoint_now`] only) rather
    /// than being published before the step returns.
    pipelined: bool,
    /// When [`Capture::rotate_pin`] last moved the pin to what capture holds (see
    /// `Capture::rotate_pin_between`).
    pin_moved: Option<Instant>,
    /// The zstd context of the last segment, for the next one (see `codec::Compressor`).
    compressor: std::cell::Cell<Option<Compressor>>,
    /// The mark under which a chase's segments are published without a sync, while it is set
    /// (see `publish`).
    volatile: std::cell::RefCell<Option<super::state::VolatileMark>>,
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
pub(crate) enum Step {
    /// Nothing new.
    Idle,
    /// This many commits were captured into the spool.
    Captured(u64),
}

impl Capture {
    /// Opens capture for `db`: resumes the saved generation when continuity is proven, else
    /// starts a new one with a snapshot. With `fresh` (why the database file was replaced under
    /// the running walship), a new generation starts whatever the saved state says.
    ///
    /// # Errors
    /// Database, WAL or spool errors.
    pub(crate) fn start(
        db: Db,
        spool: Arc<Spool>,
        state: &StateDir,
        segment_size: u64,
        fresh: Option<&str>,
        volatile: VolatileAtStart,
    ) -> Result<Capture> {
        let saved = state.load_capture()?;
        let publisher = publish::Publisher::start(spool.clone(), state.clone())?;
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
            stopped_short: false,
            small_commits: false,
            keeping_checkpoints: false,
            behind: false,
            retry: None,
            publisher,
            pipelined: false,
            compressor: std::cell::Cell::new(None),
            pin_moved: None,
            volatile: std::cell::RefCell::new(None),
        };
        let lost = cap.volatile_at_start(volatile);
        match (fresh, saved) {
            (Some(why), _) => cap.new_generation(GenerationReason::DbReplaced, why)?,
            (None, None) => {
                cap.new_generation(GenerationReason::NoPreviousState, "no previous state")?;
            }
            (None, Some(saved)) if lost == Some(saved.cur.at.generation) => {
                cap.new_generation(
                    GenerationReason::SpoolLostInReboot,
                    "the machine restarted while spool files of this generation were not on its disk yet (a bulk load was being chased): they were dropped",
                )?;
            }
            (None, Some(saved)) => {
                if let Err(e) = cap.try_resume(saved) {
                    cap.new_generation(
                        GenerationReason::CannotResume,
                        &format!("cannot resume: {e:#}"),
                    )?;
                }
            }
        }
        Ok(cap)
    }

    /// Saves the per-page hashes of the captured state (at a clean stop), so that the next
    /// start can resume by difference even if the WAL was reset meanwhile.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn save_hashes(&self) -> Result<()> {
        self.state
            .save_page_hashes(&self.at, self.page_size, &self.hashes)
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
    pub(crate) fn new_generation(&mut self, reason: GenerationReason, why: &str) -> Result<()> {
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
                crate::metrics::generation_started(reason);
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
            self.behind = false;
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
        // A snapshot keeps the pin where it is: holding writers back meanwhile would not let
        // the WAL restart, only make them wait.
        self.db.disarm_governor();
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
        // Compressed on this thread: zstd workers made a 1 GiB snapshot no faster (reading and
        // hashing the pages is the bound) and added 3 MiB to the peak RSS (docs/PERFORMANCE.md).
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
    pub(crate) fn snapshot(&mut self) -> Result<()> {
        self.retry_due()?;
        let mut attempt = 0;
        loop {
            self.step()?;
            match self.write_snapshot() {
                Err(e) if WalChange::is_moved(&e) && attempt < 5 => attempt += 1,
                other => {
                    // The snapshot's buffers are free now.
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

    /// Runs `f`; if it fails, memory may be ahead of the spool, so the capture is poisoned.
    fn poison_on_err<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Waits until every segment handed to the publisher is published; a failure poisons the
    /// capture (see `publish`).
    fn settle(&mut self) -> Result<()> {
        self.poison_on_err(|c| c.publisher.settle())
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

    /// True if the database file was replaced or deleted under walship.
    pub(crate) fn db_replaced(&self) -> bool {
        self.db.replaced()
    }

    /// Ends capture of a database whose file was replaced or deleted: every handle on the old
    /// file is closed (see [`Db::close_replaced`]). What was captured stays in the spool.
    pub(crate) fn close_replaced(self) -> crate::db::StaleSidecars {
        self.db.close_replaced()
    }

    /// Where capture stands in the WAL (see [`ChangeGate`](crate::replicate::ChangeGate));
    /// `None` before the first step or after a failed one.
    pub(crate) fn wal_mark(&self) -> Option<crate::wal::WalMark> {
        if self.poisoned {
            return None;
        }
        let p = self.pos?;
        crate::wal::WalMark::after(p.salt1, p.salt2, p.page_size, p.frames)
    }

    /// The spool key of the newest captured state.
    pub(crate) fn key(&self) -> Key {
        self.at.key()
    }
}
