//! Checkpoint policy: walship checkpoints only what it captured, normally without any lock the
//! application waits for (PASSIVE, pinned), under the write lock only to bound the WAL of a
//! writer that outruns it, and it backs off while a reader keeps checkpoints from progressing
//! and yields while an application's own checkpoint waits.
//!
//! A writer that outruns walship (a bulk load) is chased without any lock: capture and a
//! PASSIVE copy up to walship's pin, again and again, while the writer goes on in parallel.
//! Only once the WAL holds [`LOCK_AT`] times `checkpoint-pages` frames does walship take the
//! write lock, to capture and copy what the last round of the chase left so that the next
//! commit restarts the WAL. Taking the lock as soon as the writer was ahead made the writer
//! wait for the capture and the copy of its whole backlog, one after the other: a 200 MiB
//! load took twice as long as without walship. Behind a writer of big commits, a full WAL is
//! still chased without the lock while capture is more than half a checkpoint behind its
//! end and not falling further behind, up to [`CATCH_UP_BELOW`] times `checkpoint-pages`: the
//! lock is then taken for a few hundred frames, not thousands.
//!
//! The checkpoint under the write lock is the first to copy the whole WAL, so SQLite syncs the
//! database file there, with every page the application's checkpoints copied during the
//! chase: each step of a chase of big commits starts that write-back without waiting
//! (`Db::start_writeback`), and the sync under the lock took ~12 ms instead of ~26. The
//! segments' own syncs at publication are shorter the same way: a spool file's write-back
//! starts every megabyte while capture writes it (`spool::WRITEBACK_EVERY`), and the rest as
//! it is handed to the publisher; the median hold behind a 200 MiB load over sftp fell from
//! 18-37 to 9-21 ms (three runs).
//!
//! Under the write lock, what the chase left is captured in steps of a full segment
//! (`segment-size`), not of `checkpoint-pages` frames: each segment costs the publisher three
//! syncs before the checkpoint may copy, and behind a disk busy with other writes those syncs,
//! not capture, made the hold run out of its budget; the writer then went on unbounded (a
//! 200 MiB load beside a process writing and syncing 256 MiB files: the WAL passed 64 MiB
//! in 10 of 14 loads, up to 204 MiB, then in 7 of 18, up to 88 MiB; on a journaled ext4
//! alone the load took 1.3-1.5x instead of 1.4-2.3x).
//!
//! Behind a writer of big commits, SQLite's copy of the WAL into the database (and its sync of
//! the database) runs on a thread of its own while capture takes what the chase left
//! (`Db::copy_behind`), instead of after it: the hold is the longer of the two, not their sum
//! (mean hold 43 -> 37 ms, 90th percentile 83 -> 51 ms, in ten 200 MiB loads each). The pin
//! first moves to the WAL's end, above slot 0, so no writer can restart the WAL before
//! capture holds every frame, even if the hold runs out of its budget.
//!
//! Capture looks at the WAL's size only between its steps, and a step can take tens of
//! milliseconds (its own checkpoint's fsync of the database, a publish behind a journal
//! commit) while a bulk writer appends ~1 MiB a millisecond: the WAL of a 200 MiB load on a
//! journaled ext4 reached 62-70 MiB in 4 of 30 runs. So a chase arms the governor
//! (`db::governor`), a thread that takes the write lock itself once the WAL holds
//! [`GOVERNOR_AT`] times `checkpoint-pages` frames; capture takes the lock over at its next
//! look and goes on as if it had taken it (at most 56 MiB in 88 such runs).
//!
//! While it chases a writer of small commits, walship also keeps SQLite's checkpointer lock
//! (never the write lock) between its own copies, so that the application's autocheckpoint
//! returns at once instead of copying, in the writer's thread, the few frames each step of the
//! chase let through. It keeps it between its rounds too, as long as the main loop chases
//! such a writer ([`Capture::keep_checkpoints`]): in the gaps (between two chases, and from
//! each restart of the WAL to the next chase) a max-rate single-row writer still ran 300-430
//! checkpoints of its own in 4 s, each with an fsync in its thread; with the lock kept,
//! 50-125. SQLite lets go of that lock whenever one of walship's own checkpoints ends, and
//! such a writer, which tries to checkpoint after every commit, took it in that gap 22-27
//! times in 4 s; so such a chase copies only once capture is at the WAL's end, and before the
//! write lock ([`Capture::copies_now`]): the writer took it no more.
//!
//! Invariant: walship holds that lock only within one of its own checkpoints (any checkpoint
//! starts as a chase, see [`Capture::checkpoint_now`]) or while the main loop chases a writer
//! of small commits, and lets go of it within one look of the main loop once that chase is
//! over. Meanwhile an application's own checkpoint, of any mode, returns `SQLITE_BUSY` at
//! once (as it did within a chase before). walship holds no lock at all that could make an
//! application's commit fail, and the write lock only within [`LOCK_BUDGET`] plus one step
//! (531-707 ms measured).
//!
//! Before it takes the write lock behind a writer of small commits, walship copies what it
//! captured, captures once more and syncs the WAL and the database
//! ([`Capture::before_the_write_lock`]), so that the hold is left a few hundred frames to
//! capture, copy and sync: SQLite's busy handler makes such a writer wait 3 ms for a hold
//! under 3 ms, 8 ms for one just over (most holds took 3 ms before, 2 ms now).
//!
//! While it chases a writer of big commits, capture does not wait for the disk: each segment's
//! state record, fsync and rename are done by the publisher thread (`publish`), in order, while
//! capture encodes the next step (a 200 MiB load: 1.3x its time alone instead of 1.5x). The
//! pin then moves only where the WAL cannot restart; before a pin that could let it restart,
//! before the checkpoint under the write lock, and before a checkpoint returns, capture waits
//! until every segment is published, so the WAL never restarts over frames the spool does not
//! hold, as when segments were published before the step returned.

use super::{Capture, Step};
use anyhow::Result;
use std::time::Duration;

/// Longest walship holds SQLite's write lock to capture a backlog (a checkpoint's own copy
/// comes on top, bounded by the WAL that was captured): far below any sane busy timeout.
const LOCK_BUDGET: Duration = Duration::from_millis(500);

/// Longest a pin stays behind what capture holds between the main loop's captures (see
/// [`Capture::rotate_pin_between`]): at 100 commits/s a capture comes every 85 ms, and a pin
/// move after one in six of them. The application's checkpoints then stop up to that far
/// behind capture, and a copied WAL restarts up to that much later (at that rate ~100 frames).
const PIN_EVERY: Duration = Duration::from_millis(500);

/// How long a checkpoint chases a writer without any lock (see `checkpoint_unlocked`).
const UNLOCKED_CHECKPOINT_BUDGET: Duration = Duration::from_millis(250);

/// Average frames per commit up to which a chase keeps SQLite's checkpointer lock (see
/// `checkpoint_unlocked`).
const HOLD_BELOW: u64 = 8;

/// Longest wait between two steps of a chase for half `checkpoint-pages` new frames (see
/// `checkpoint_unlocked`).
const CHASE_PACE: Duration = Duration::from_millis(10);

/// The WAL size, in `checkpoint-pages`, from which a writer that outruns walship is held back
/// (see the module doc): 32 MiB of 4 KiB pages by default, so that the WAL stays well under
/// 64 MiB while the lock is waited for and what the chase left is captured.
const LOCK_AT: u32 = 8;

/// The WAL size, in `checkpoint-pages`, from which the governor holds writers back while
/// capture is busy elsewhere (see `db::governor`): 44 MiB of 4 KiB pages by default, so that
/// the WAL stays near 50 MiB whatever a step of capture waits for (the governor wins the lock
/// a few of a bulk writer's transactions later).
const GOVERNOR_AT: u32 = 11;

/// The WAL size, in `checkpoint-pages`, up to which a full WAL's writer of big commits is
/// still chased without any lock while capture is behind its end (see
/// `Capture::catching_up`): 40 MiB of 4 KiB pages by default, between [`LOCK_AT`] and
/// [`GOVERNOR_AT`].
const CATCH_UP_BELOW: u32 = 10;

/// How long the governor stays armed after a chase took a second step (a writer went on):
/// rounds follow each other closely while a writer outruns capture, and each such chase arms
/// it again.
const GOVERNOR_FOR: Duration = Duration::from_secs(1);

/// How a checkpoint without any lock ended (see `checkpoint_unlocked`).
enum Unlocked {
    /// The whole WAL was captured and copied: the next commit restarts it.
    Copied,
    /// The WAL reached the size at which the writer is held back.
    Full,
    /// Anything else: a reader's frames, a busy checkpointer, the time budget.
    Stopped,
}

/// First and longest pause of checkpoints while a reader keeps them from copying the WAL.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Capture {
    /// Frames in the current WAL (what a checkpoint would reclaim).
    pub(crate) fn wal_frames(&self) -> u64 {
        self.pos.map_or(0, |p| p.frames)
    }

    /// Moves the pin forward after a step (see `db` module docs). After a step that left
    /// complete commits uncaptured (limited to some frames, in a chase or under the write
    /// lock), it moves only to a pin that cannot let the WAL restart (see
    /// [`Db::rotate_pin_behind`](crate::db::Db::rotate_pin_behind)), and only for a writer of
    /// big commits (a bulk load, whose own checkpoints then copy in parallel with capture);
    /// otherwise it stays. A writer of small commits is better off with a pin that stays:
    /// each move lets its autocheckpoint copy a few frames, with two fsyncs, in its own thread
    /// (a max-rate single-row writer ran at 0.81-0.87x with those moves, 0.95-0.98x without,
    /// interleaved in the same hour).
    ///
    /// Invariant: the WAL never restarts over frames capture does not hold. A new pin that
    /// begins on a fully copied WAL is a "slot 0" reader, which lets the application's next
    /// commit restart the WAL; the pin protocol accepts that restart as a continuation. An
    /// application's autocheckpoint may copy frames up to the old pin's read mark (beyond what
    /// a limited step captured), so a pin moved blindly after a limited step could be such a
    /// reader with frames uncaptured: the restart then lost them, silently (a bulk load
    /// replicated with a commit's pages missing; the restore's integrity check failed).
    /// Keeping the pin still whenever capture was behind was safe too, but it kept every
    /// checkpoint behind the old mark until capture caught up: the WAL of a bulk load grew to
    /// the size at which the writer is held back, and the load took 1.4x as long.
    ///
    /// # Errors
    /// SQLite errors.
    pub(crate) fn rotate_pin(&mut self) -> Result<()> {
        match (self.behind, self.pos) {
            (false, _) => {
                // This pin may let the WAL restart: only over published frames.
                self.settle()?;
                self.db.rotate_pin()?;
                self.pin_moved = Some(std::time::Instant::now());
                Ok(())
            }
            (true, Some(pos)) if !self.small_commits => self.db.rotate_pin_behind(&pos),
            (true, _) => Ok(()),
        }
    }

    /// [`Capture::rotate_pin`] after a capture of the main loop's (not within a checkpoint):
    /// a pin that capture moved less than [`PIN_EVERY`] ago stays where it is. A pin move is
    /// a read transaction begun and one ended (7% of walship's CPU at 100 commits/s when it
    /// came after every capture, docs/PERFORMANCE.md). Safe for the same reason any pin is:
    /// an older pin only stops the application's checkpoints further back. walship's own
    /// checkpoint, due once the WAL holds `checkpoint-pages` frames, moves it as before (its
    /// chase captures and moves the pin before it copies).
    ///
    /// # Errors
    /// SQLite errors.
    pub(crate) fn rotate_pin_between(&mut self) -> Result<()> {
        let recent = self.pin_moved.is_some_and(|t| t.elapsed() < PIN_EVERY);
        if recent && !self.behind && self.db.pinned() {
            return Ok(());
        }
        self.rotate_pin()
    }

    /// Checkpoints if the WAL holds at least `threshold` frames: write lock, capture the
    /// tail, PASSIVE checkpoint, release. Returns true if a checkpoint ran.
    ///
    /// # Errors
    /// Capture or SQLite errors.
    pub(crate) fn maybe_checkpoint(&mut self, threshold: u32) -> Result<bool> {
        if self.wal_frames() < u64::from(threshold)
            || self.checkpointed_at == self.pos
            || self.backing_off()
        {
            return Ok(false);
        }
        self.checkpoint_now(threshold)
    }

    /// True while checkpoints wait for a reader that kept the last one from copying the WAL.
    pub(super) fn backing_off(&self) -> bool {
        self.checkpoint_backoff
            .is_some_and(|(until, _)| std::time::Instant::now() < until)
    }

    /// Whether an application's checkpoint waits for walship's read lock (see
    /// [`Capture::yield_to_checkpointer`]).
    pub(crate) fn checkpointer_waiting(&self) -> bool {
        self.db.checkpointer_waiting()
    }

    /// Lets an application's FULL/RESTART/TRUNCATE checkpoint through if one waits: captures
    /// everything (the checkpointer holds the write lock: nothing more can be appended), then
    /// lets go of the read lock until it is done (see [`Db::yield_to_checkpointer`]). Returns
    /// true if it did.
    ///
    /// # Errors
    /// Capture or SQLite errors.
    pub(crate) fn yield_to_checkpointer(&mut self) -> Result<bool> {
        if !self.checkpointer_waiting() {
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
    /// round should chase it (see the module doc) rather than wait for more commits.
    ///
    /// A poisoned capture is never hot: it cannot capture, so the lock would be held for
    /// nothing.
    pub(crate) fn is_hot(&self, threshold: u32) -> bool {
        if self.poisoned || self.backing_off() {
            return false;
        }
        let Some(h) = self.db.wal_index() else {
            return false;
        };
        h.frames >= threshold.saturating_mul(2) && h.backfilled < h.frames && !self.holds(&h)
    }

    /// True if the capture position is at the end of the WAL SQLite's wal-index describes.
    pub(super) fn holds(&self, h: &crate::db::WalIndexHint) -> bool {
        self.pos.is_some_and(|p| {
            (p.salt1, p.salt2) == (h.salt1, h.salt2) && p.frames >= u64::from(h.frames)
        })
    }

    /// True when the WAL holds at least [`LOCK_AT`] times `threshold` frames, some of them
    /// not yet copied, or the governor already holds the writer back (see [`GOVERNOR_AT`]):
    /// the writer is held back until the WAL restarts.
    fn is_full(&self, threshold: u32) -> bool {
        self.db.governor_holds()
            || self.db.wal_index().is_some_and(|h| {
                h.frames >= threshold.saturating_mul(LOCK_AT) && h.backfilled < h.frames
            })
    }

    /// Checkpoints whatever the WAL's size (see [`Capture::maybe_checkpoint`]): without any
    /// lock the application waits for, chasing a writer that goes on appending; once the WAL
    /// is full (see the module doc), what is left is captured and copied under SQLite's write
    /// lock.
    ///
    /// # Errors
    /// Capture or SQLite errors.
    pub(crate) fn checkpoint_now(&mut self, threshold: u32) -> Result<bool> {
        // Segments are published behind capture while it chases (see `publish`), and all of
        // them before this returns.
        self.pipelined = true;
        let r = self.checkpoint_pipelined(threshold);
        self.pipelined = false;
        let settled = self.settle();
        let r = r?;
        settled?;
        Ok(r)
    }

    fn checkpoint_pipelined(&mut self, threshold: u32) -> Result<bool> {
        match self.checkpoint_unlocked(threshold)? {
            Unlocked::Copied => return Ok(true),
            Unlocked::Full => {}
            Unlocked::Stopped if self.is_full(threshold) && !self.backing_off() => {}
            Unlocked::Stopped => return Ok(false),
        }
        // Waiting for the lock as long as a busy writer needs to leave a gap.
        if !self.db.lock_writes(Duration::from_millis(2000))? {
            return Ok(false);
        }
        // Capture under the lock in chunks of a full segment (see `lock_chunk`), and give the
        // lock back after LOCK_BUDGET even if frames remain (a large backlog, a slow machine):
        // the application must never wait anywhere near its busy timeout. What was captured
        // stays captured; the next round goes on from there.
        let t0 = std::time::Instant::now();
        let from = self.wal_frames();
        // Behind a writer of big commits, SQLite copies the WAL into the database while
        // capture takes what is left (see `Db::copy_behind`): the hold is the longer of the
        // two, not their sum.
        let mut copier = match self.pos {
            Some(pos) if !self.small_commits => match self.db.copy_behind(&pos) {
                Ok(c) => c,
                Err(e) => {
                    self.db.unlock_writes();
                    return Err(e);
                }
            },
            _ => None,
        };
        let chunk = self.lock_chunk(threshold);
        loop {
            match self.step_limited(Some(chunk)) {
                Ok((_, false)) => break,
                Ok((_, true)) if t0.elapsed() < LOCK_BUDGET => {}
                Ok((_, true)) => {
                    self.copied(&mut copier);
                    self.db.unlock_writes();
                    tracing::debug!(
                        locked_ms = t0.elapsed().as_millis() as u64,
                        "released the write lock before the backlog was captured"
                    );
                    return Ok(false);
                }
                Err(e) => {
                    self.copied(&mut copier);
                    self.db.unlock_writes();
                    return Err(e);
                }
            }
        }
        let stepped_ms = t0.elapsed().as_millis() as u64;
        // The checkpoint lets the next commit restart the WAL: only over published frames.
        let settled = self.settle();
        self.copied(&mut copier);
        if let Err(e) = settled {
            self.db.unlock_writes();
            return Err(e);
        }
        let captured_ms = t0.elapsed().as_millis() as u64;
        let (log, done) = self.db.checkpoint_locked()?;
        if self.keeps_checkpoints() {
            // SQLite let go of it as the checkpoint ended.
            self.db.hold_checkpoints()?;
        }
        self.checkpointed_at = self.pos;
        crate::metrics::checkpointed();
        self.note_checkpoint(log, done);
        tracing::debug!(
            log,
            done,
            tail = self.wal_frames().saturating_sub(from),
            stepped_ms,
            captured_ms,
            locked_ms = t0.elapsed().as_millis() as u64,
            "checkpoint"
        );
        Ok(true)
    }

    /// Waits for the copy started under the write lock, if any (see `Db::copy_behind`).
    fn copied(&mut self, copier: &mut Option<crate::db::Copier>) {
        if let Some(c) = copier.take() {
            self.db.copied(c);
        }
    }

    /// Frames captured per step under the write lock: as many as fill a segment
    /// (`segment-size`), at least `threshold`. Each segment costs the publisher three syncs
    /// (the state file, the segment, its directory), all before the checkpoint under the lock
    /// may copy; behind a disk busy with other writes each took tens of milliseconds, and
    /// steps of `threshold` frames (a segment each) made the hold wait for a dozen segments'
    /// syncs instead of three or four (see docs/PERFORMANCE.md, twenty-first session).
    fn lock_chunk(&self, threshold: u32) -> u64 {
        let page = u64::from(self.page_size).max(512);
        u64::from(threshold.max(1)).max(self.segment_size / page)
    }

    /// A checkpoint that holds nothing an application writer waits for: capture everything
    /// and move the pin to the end, copy the WAL with a PASSIVE checkpoint (it stops at the
    /// pin), and, if the writer appended nothing meanwhile (the whole WAL is then captured
    /// and copied), move the pin once more: it now begins on a fully copied WAL (SQLite's
    /// read slot 0), so the application's next commit restarts the WAL, and that one restart
    /// comes after every frame of the old WAL was captured (the pin protocol, see `db`). A
    /// writer that appended meanwhile is chased for at most [`UNLOCKED_CHECKPOINT_BUDGET`],
    /// and until the WAL is full (see [`Capture::is_full`]).
    ///
    /// The chase goes in steps of at least half `threshold` new frames or [`CHASE_PACE`].
    /// While the writer's commits are small (at most [`HOLD_BELOW`] frames each on average),
    /// each step is captured and pinned by walship, which keeps SQLite's checkpointer lock
    /// (see [`Db::hold_checkpoints`](crate::db::Db::hold_checkpoints)), and copied only once
    /// capture is at the WAL's end (see [`Capture::copies_now`]). Such a writer's
    /// autocheckpoint runs after every commit while the WAL holds more than its limit, and
    /// copied, with two fsyncs in the writer's own thread, whatever each move of walship's pin
    /// let through; steps as fast as capture could go (~40 frames) meant hundreds of such
    /// copies a second, and a max-rate single-row writer at 0.66x its speed without walship.
    /// A writer of big commits (a bulk load) keeps copying what walship captured, in parallel
    /// with the next step: walship copying it all alone let its WAL grow past 64 MiB.
    fn checkpoint_unlocked(&mut self, threshold: u32) -> Result<Unlocked> {
        let r = self.chase(threshold);
        if !self.keeps_checkpoints() {
            self.db.release_checkpoints();
        }
        r
    }

    /// Keeps SQLite's checkpointer lock between rounds while `hot` (the main loop chases a
    /// writer that outran capture, see its `HOT_FOR`) and that writer's commits are small,
    /// and lets go of it otherwise (see the module doc). Called at every wake-up of the main
    /// loop: walship's own checkpoints let go of the lock as they end, and a hold that is no
    /// longer wanted ends within one look.
    ///
    /// # Errors
    /// fcntl errors other than "held by another process".
    pub(crate) fn keep_checkpoints(&mut self, hot: bool) -> Result<()> {
        let want = hot && self.small_commits && !self.poisoned && !self.backing_off();
        let held = want && self.db.hold_checkpoints()?;
        if self.keeping_checkpoints && !held {
            self.db.release_checkpoints();
        }
        self.keeping_checkpoints = held;
        Ok(())
    }

    /// Whether walship keeps the checkpointer lock past its own checkpoints (see
    /// [`Capture::keep_checkpoints`]); a chase that found big commits ends it.
    fn keeps_checkpoints(&self) -> bool {
        self.keeping_checkpoints && self.small_commits
    }

    /// The loop of [`Capture::checkpoint_unlocked`]; may return holding the checkpointer lock.
    fn chase(&mut self, threshold: u32) -> Result<Unlocked> {
        let t0 = std::time::Instant::now();
        let step = u64::from(threshold.max(1));
        let mut first = true;
        // How far behind the WAL's end capture was when it last went on past a full WAL.
        let mut gap = None;
        while t0.elapsed() < UNLOCKED_CHECKPOINT_BUDGET {
            if !first {
                // A writer goes on: the governor bounds its WAL while a step takes long.
                self.db
                    .arm_governor(threshold.saturating_mul(GOVERNOR_AT), GOVERNOR_FOR);
                self.wait_for_frames(step.div_ceil(2), CHASE_PACE);
            }
            first = false;
            // Taken again each step: SQLite lets go of it when walship's own copy ends.
            let held = self.small_commits && self.db.hold_checkpoints()?;
            // In steps of `threshold` frames, so that a full WAL is seen soon.
            let before = self.pos;
            let (captured, more) = self.step_limited(Some(step))?;
            if let (Step::Captured(commits), Some(a), Some(b)) = (captured, before, self.pos) {
                if (a.salt1, a.salt2) == (b.salt1, b.salt2) {
                    self.small_commits =
                        b.frames.saturating_sub(a.frames) <= commits.saturating_mul(HOLD_BELOW);
                }
            }
            self.rotate_pin()?;
            if !self.small_commits {
                self.spool.note_bulk_step();
                // What the application's checkpoints copied meanwhile goes to disk now, not
                // under the write lock (see `Db::start_writeback`).
                if let Err(e) = self.db.start_writeback() {
                    tracing::debug!("cannot start the database's write-back: {e}");
                }
            }
            if self.is_full(threshold) {
                let lag = self.lag();
                if !self.small_commits && self.catching_up(lag, gap, threshold) {
                    gap = lag.map(|(_, behind)| behind);
                    continue;
                }
                if let Some((wal, behind)) = lag {
                    tracing::debug!(
                        wal,
                        behind,
                        was = gap.map_or(-1, |g| g as i64),
                        governor = self.db.governor_holds(),
                        "the WAL is full: taking the write lock"
                    );
                }
                if held && self.small_commits && !self.db.governor_holds() {
                    self.before_the_write_lock(step)?;
                }
                return Ok(Unlocked::Full);
            }
            if !self.copies_now(held, more) {
                if held {
                    // So that the copy before the write lock has little WAL left to sync
                    // (see `copies_now`).
                    if let Err(e) = self.db.start_wal_writeback() {
                        tracing::debug!("cannot start the WAL's write-back: {e:#}");
                    }
                }
                continue;
            }
            let t = std::time::Instant::now();
            let Some((log, done)) = self.db.checkpoint_passive()? else {
                return Ok(Unlocked::Stopped);
            };
            if held {
                // SQLite let go of it as walship's copy ended: taken again at once, or the
                // application's commits run checkpoints of their own until the next step (one
                // lock attempt, at best, per commit; their `fcntl` calls per commit fell
                // from 8.2 to 7.8, against 6.0 alone).
                self.db.hold_checkpoints()?;
            }
            if more {
                continue;
            }
            let (Some(pos), Some(h)) = (self.pos, self.db.wal_index()) else {
                return Ok(Unlocked::Stopped);
            };
            tracing::trace!(ms = t.elapsed().as_millis() as u64, log, done, "passive");
            if (h.salt1, h.salt2) != (pos.salt1, pos.salt2) {
                return Ok(Unlocked::Stopped);
            }
            if u64::from(h.frames) == pos.frames && h.backfilled == h.frames {
                self.rotate_pin()?;
                self.checkpointed_at = self.pos;
                crate::metrics::checkpointed();
                self.note_checkpoint(log, done);
                tracing::debug!(frames = h.frames, "checkpoint");
                return Ok(Unlocked::Copied);
            }
            if u64::from(h.backfilled) < pos.frames {
                // Frames walship holds no pin before were not copied: a reader's.
                self.note_checkpoint(i64::from(h.frames), i64::from(h.backfilled));
                return Ok(Unlocked::Stopped);
            }
            // Everything walship captured was copied: no reader held any of it.
            self.stopped_short = false;
        }
        Ok(Unlocked::Stopped)
    }

    /// Whether a step of a chase copies what it captured now (`held`: walship keeps SQLite's
    /// checkpointer lock for a writer of small commits; `more`: the step left frames behind).
    ///
    /// Behind a writer of big commits, once a step took all it found: the writer's own
    /// checkpoints copy alongside, and walship's copy lets the WAL restart if it was the last.
    ///
    /// Behind a writer of small commits, only once capture is at the WAL's end, where the copy
    /// may let the WAL restart; otherwise the chase starts the WAL's write-back. SQLite lets
    /// go of the checkpointer lock as each of walship's copies ends, and such a writer tries
    /// to checkpoint after every commit: in that gap of microseconds a max-rate single-row
    /// writer took the lock 22-27 times in 4 s, each time for a checkpoint of its own with
    /// ~9 ms of fsyncs in its thread (and walship's copies, each step, were what kept the
    /// WAL's sync short before the write lock: the write-back now does that). Copying once,
    /// before the write lock, it took the lock no more, and made 0.93-0.99x its commits
    /// without walship instead of 0.83-0.86x (medians, over sftp and to `file://`:
    /// docs/PERFORMANCE.md, thirty-second session).
    fn copies_now(&self, held: bool, more: bool) -> bool {
        if held {
            self.lag().is_some_and(|(_, behind)| behind == 0)
        } else {
            !more
        }
    }

    /// Behind a writer of small commits, whose WAL is full: copies what capture holds,
    /// captures what came meanwhile and syncs the WAL and the database, all before the write
    /// lock is taken, so that the checkpoint under the lock is left a few hundred frames to
    /// capture, copy and sync. The writer's busy handler sleeps 1 ms, then 2, then 5: a hold
    /// of just over 3 ms (most of them before this) cost the writer 8 ms, one under 3 ms
    /// costs it 3.
    fn before_the_write_lock(&mut self, step: u64) -> Result<()> {
        self.db.checkpoint_passive()?;
        // SQLite let go of it as walship's copy ended.
        self.db.hold_checkpoints()?;
        self.step_limited(Some(step))?;
        self.rotate_pin()?;
        if let Err(e) = self.db.sync_files() {
            tracing::debug!("before the write lock: {e:#}");
        }
        Ok(())
    }

    /// Whether a chase whose WAL is full goes on a step without the lock (`lag` from
    /// [`Capture::lag`], `gap` what it was behind before the last such step, if any): capture
    /// is more than half `threshold` frames behind the WAL's end, it is gaining on the writer
    /// (not half `threshold` frames or more further behind than before the last step: one
    /// step, or one transaction more or less, is noise), the WAL holds fewer than
    /// [`CATCH_UP_BELOW`] times `threshold` frames, and the governor does not hold the writer.
    /// Capture went about twice as fast as a bulk writer on these machines, so each such step
    /// halves what the write lock is then taken for: what is left under the lock is captured,
    /// and published, while the writer waits. Taking the lock at once, capture was often
    /// thousands of frames behind: holds of 26-34 ms (medians), which SQLite's busy handler
    /// makes a wait of 33 ms; now a few hundred frames, 12 ms, a wait of 18 (see
    /// docs/PERFORMANCE.md, twenty-sixth session). Where capture falls further behind, the
    /// lock is taken at the next look, as before.
    fn catching_up(&self, lag: Option<(u64, u64)>, gap: Option<u64>, threshold: u32) -> bool {
        let cap = u64::from(threshold).saturating_mul(u64::from(CATCH_UP_BELOW));
        let half = u64::from(threshold / 2);
        lag.is_some_and(|(wal, behind)| {
            wal < cap && behind > half && gap.is_none_or(|g| behind < g.saturating_add(half))
        }) && !self.db.governor_holds()
    }

    /// The frames in the WAL and how many of them capture has not taken yet; `None` if the
    /// WAL is not the one capture is in.
    fn lag(&self) -> Option<(u64, u64)> {
        let (p, h) = (self.pos?, self.db.wal_index()?);
        ((h.salt1, h.salt2) == (p.salt1, p.salt2)).then(|| {
            let wal = u64::from(h.frames);
            (wal, wal.saturating_sub(p.frames))
        })
    }

    /// Waits until the WAL holds `frames` frames past the capture position, or it moved to
    /// a new WAL, or `at_most` passed.
    fn wait_for_frames(&self, frames: u64, at_most: Duration) {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < at_most {
            match (self.pos, self.db.wal_index()) {
                (Some(p), Some(h))
                    if (h.salt1, h.salt2) == (p.salt1, p.salt2)
                        && u64::from(h.frames) < p.frames.saturating_add(frames) => {}
                _ => return,
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Backs checkpoints off while a reader keeps them from copying the whole WAL (`done`
    /// of `log` frames copied), and ends the back-off once one did.
    ///
    /// The back-off starts with the second checkpoint in a row that stops short: a checkpoint
    /// can stop short of the WAL's end for a moment with no reader that stays (measured behind
    /// a max-rate single-row writer: 2-3 times in 3 s, a few hundred frames short of what
    /// walship had captured, the next checkpoint copying everything). Each of those used to
    /// stop checkpoints for 100 ms, the write lock included, and the WAL grew up to 40 MiB
    /// past the size at which the writer is held back. A reader that stays, or readers that
    /// come one after the other so that no checkpoint copies everything, stop the next one
    /// short too.
    pub(super) fn note_checkpoint(&mut self, log: i64, done: i64) {
        if done >= log {
            self.checkpoint_backoff = None;
            self.stopped_short = false;
            return;
        }
        if !self.stopped_short {
            tracing::debug!(
                log,
                done,
                "a checkpoint stopped short of the WAL's end: the next one tries again"
            );
            self.stopped_short = true;
            return;
        }
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
        self.checkpoint_backoff = Some((std::time::Instant::now() + next, next));
        // Holding writers back cannot let this WAL restart.
        self.db.disarm_governor();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use crate::layout::names::FileName;
    use crate::replicate::spool::Spool;
    use crate::replicate::state::StateDir;
    use std::sync::Arc;

    /// An application's database in `dir` (WAL mode, no autocheckpoint) and a capture of it,
    /// pinned.
    fn captured_app(dir: &std::path::Path) -> Result<(rusqlite::Connection, Capture)> {
        captured_app_segments(dir, 1 << 30)
    }

    /// [`captured_app`] with segments of `segment_size` bytes.
    fn captured_app_segments(
        dir: &std::path::Path,
        segment_size: u64,
    ) -> Result<(rusqlite::Connection, Capture)> {
        let (p, app) = crate::db::tests::wal_app(dir)?;
        let state = StateDir::new(dir.join("state"));
        std::fs::create_dir_all(state.spool_dir())?;
        let spool = Arc::new(Spool::open(&state.spool_dir())?);
        let mut cap = Capture::start(
            Db::open(&p)?,
            spool,
            &state,
            segment_size,
            None,
            super::super::VolatileAtStart::default(),
        )?;
        cap.rotate_pin()?;
        Ok((app, cap))
    }

    /// Each segment's zstd context is kept for the next (see `codec::Compressor`), and the
    /// segments written on a context handed on are whole.
    #[test]
    fn a_segment_hands_its_zstd_context_to_the_next() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (app, mut cap) = captured_app(dir.path())?;
        for i in 0..3 {
            app.execute("insert into t values (?1)", [i])?;
            cap.step()?;
            let kept = cap.compressor.take();
            assert!(kept.is_some(), "segment {i} did not keep its zstd context");
            cap.compressor.set(kept);
        }
        use crate::layout::codec::{Decoder, Kind, Record};
        let mut commits = 0;
        for f in cap.spool.list()? {
            if matches!(f.name, FileName::Segment { .. }) {
                let file = std::io::BufReader::new(cap.spool.open_file(&f)?);
                let mut dec = Decoder::new(file, Kind::Segment)?;
                while let Some(rec) = dec.next()? {
                    commits += usize::from(matches!(rec, Record::Commit(_)));
                }
            }
        }
        assert_eq!(
            commits, 3,
            "the spooled segments hold {commits} of 3 commits"
        );
        Ok(())
    }

    /// Between the main loop's captures the pin moves at most every `PIN_EVERY` (the
    /// application's checkpoint copies only up to the old pin meanwhile); walship's own
    /// checkpoint copies all it captured whatever the pin's age.
    #[test]
    fn between_captures_the_pin_moves_at_most_every_pin_every() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (app, mut cap) = captured_app(dir.path())?;
        let commits = |n: usize| -> Result<()> {
            for _ in 0..n {
                app.execute("insert into t values (randomblob(100))", [])?;
            }
            Ok(())
        };
        // What the application's own PASSIVE checkpoint copies: up to walship's pin.
        let copied = || -> Result<i64> {
            Ok(app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(2))?)
        };
        commits(3)?;
        cap.step()?;
        cap.rotate_pin()?;
        let first = cap.wal_frames();
        assert_eq!(copied()?, i64::try_from(first)?);
        commits(3)?;
        cap.step()?;
        cap.rotate_pin_between()?;
        assert!(cap.wal_frames() > first);
        assert_eq!(
            copied()?,
            i64::try_from(first)?,
            "the pin moved within PIN_EVERY of its last move"
        );
        std::thread::sleep(PIN_EVERY);
        commits(1)?;
        cap.step()?;
        cap.rotate_pin_between()?;
        let second = cap.wal_frames();
        assert_eq!(
            copied()?,
            i64::try_from(second)?,
            "the pin stayed past PIN_EVERY"
        );
        // walship's own checkpoint copies everything it captured, whatever the pin's age.
        commits(3)?;
        cap.step()?;
        cap.rotate_pin_between()?;
        assert!(cap.checkpoint_now(1_000)?, "no checkpoint");
        let h = anyhow::Context::context(cap.db.wal_index(), "no wal-index")?;
        assert_eq!(u64::from(h.backfilled), cap.wal_frames());
        Ok(())
    }

    /// Under the write lock, what the chase left is captured in steps of a full segment, not
    /// of `threshold` frames: each segment costs the publisher three syncs before the
    /// checkpoint under the lock may copy.
    #[test]
    fn under_the_write_lock_the_backlog_is_captured_in_full_segments() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (app, mut cap) = captured_app_segments(dir.path(), 16 << 20)?;
        // Twelve commits of ~65 frames: a chase in steps of 64 frames takes one at a time,
        // the WAL is full (`LOCK_AT` x 64 = 512 frames) after the first.
        for _ in 0..12 {
            app.execute("insert into t values (randomblob(262144))", [])?;
        }
        assert!(cap.checkpoint_now(64)?, "no checkpoint");
        let h = anyhow::Context::context(cap.db.wal_index(), "no wal-index")?;
        assert!(cap.holds(&h), "the backlog was not captured");
        let segments = cap
            .spool
            .list()?
            .iter()
            .filter(|f| matches!(f.name, FileName::Segment { .. }))
            .count();
        // One for the chase's step, one for the rest (spool files of more than 1 MiB take no
        // appends); a step per 64 frames made twelve.
        assert!(
            segments <= 3,
            "the backlog under the lock went into {segments} spool files"
        );
        Ok(())
    }

    /// While the main loop chases a writer of small commits, walship keeps SQLite's
    /// checkpointer lock between its rounds, through its own checkpoints (a chase's and one
    /// under the write lock: SQLite lets go of the lock as each ends). It is not kept while not
    /// hot, for a writer of big commits, or for a capture that cannot capture.
    #[test]
    fn the_checkpointer_lock_is_kept_only_while_small_commits_are_chased() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (app, mut cap) = captured_app(dir.path())?;
        let db = cap.db.path().to_owned();
        let other_busy = || crate::db::tests::other_checkpoint_busy(&db);
        let commits = |n: usize| -> Result<()> {
            for _ in 0..n {
                app.execute("insert into t values (1)", [])?;
            }
            Ok(())
        };
        cap.small_commits = false;
        cap.keep_checkpoints(true)?;
        assert!(!other_busy()?, "kept for a writer of big commits");
        cap.small_commits = true;
        cap.keep_checkpoints(false)?;
        assert!(!other_busy()?, "kept while no writer was chased");
        cap.keep_checkpoints(true)?;
        assert!(
            other_busy()?,
            "not kept while a writer of small commits was chased"
        );
        // A chase that copies everything without the write lock...
        commits(3)?;
        assert!(cap.checkpoint_now(1_000)?);
        assert!(other_busy()?, "let go after a chase");
        // ...and one that reaches the size at which the writer is held back (`LOCK_AT` times
        // one frame) and copies the rest under the write lock.
        commits(20)?;
        assert!(cap.checkpoint_now(1)?);
        assert!(cap.small_commits, "one-frame commits taken for big ones");
        assert!(
            other_busy()?,
            "let go after a checkpoint under the write lock"
        );
        cap.poisoned = true;
        cap.keep_checkpoints(true)?;
        assert!(!other_busy()?, "kept by a capture that cannot capture");
        cap.poisoned = false;
        cap.keep_checkpoints(true)?;
        assert!(other_busy()?);
        cap.keep_checkpoints(false)?;
        assert!(!other_busy()?, "kept once the chase was over");
        Ok(())
    }

    /// A chase's step behind a writer of small commits copies only once capture is at the
    /// WAL's end (each copy lets go of the checkpointer lock, see `Capture::copies_now`);
    /// behind big commits, once the step took all it found.
    #[test]
    fn behind_small_commits_a_chase_copies_only_at_the_end_of_the_wal() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (app, mut cap) = captured_app(dir.path())?;
        for _ in 0..10 {
            app.execute("insert into t values (1)", [])?;
        }
        let (_, more) = cap.step_limited(Some(3))?;
        assert!(more, "3 frames took the whole WAL");
        assert!(
            !cap.copies_now(true, more),
            "copied while behind the writer"
        );
        assert!(
            !cap.copies_now(false, more),
            "copied a step that left frames behind"
        );
        let (_, more) = cap.step_limited(None)?;
        assert!(!more);
        assert!(cap.copies_now(true, more), "no copy at the WAL's end");
        assert!(cap.copies_now(false, more));
        app.execute("insert into t values (2)", [])?;
        assert!(
            !cap.copies_now(true, false),
            "copied while the writer was a commit ahead"
        );
        assert!(cap.copies_now(false, false));
        Ok(())
    }

    /// Before the write lock, behind a writer of small commits: what capture held is copied,
    /// and what came since is captured, so that little is left for the hold.
    #[test]
    fn before_the_write_lock_what_capture_holds_is_copied_and_the_rest_captured() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (app, mut cap) = captured_app(dir.path())?;
        for _ in 0..5 {
            app.execute("insert into t values (1)", [])?;
        }
        cap.step()?;
        cap.rotate_pin()?;
        let held = cap.wal_frames();
        for _ in 0..3 {
            app.execute("insert into t values (2)", [])?;
        }
        cap.before_the_write_lock(1_000)?;
        let h = anyhow::Context::context(cap.db.wal_index(), "no wal-index")?;
        assert!(
            u64::from(h.backfilled) >= held,
            "{} frames copied of the {held} capture held",
            h.backfilled
        );
        assert!(
            cap.holds(&h),
            "what came meanwhile was not captured: {:?} of {} frames",
            cap.pos,
            h.frames
        );
        Ok(())
    }

    /// A checkpoint that stops short of the WAL's end is tried again at once; the next one
    /// stopping short too starts the back-off (longer each time), and one that copies
    /// everything ends it.
    #[test]
    fn checkpoints_back_off_from_the_second_that_stops_short() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_app, mut cap) = captured_app(dir.path())?;
        cap.note_checkpoint(3497, 2325);
        assert!(
            !cap.backing_off(),
            "one checkpoint stopped short: backing off"
        );
        cap.note_checkpoint(3600, 3600);
        cap.note_checkpoint(3700, 3500);
        assert!(
            !cap.backing_off(),
            "one stopped short after a full copy: backing off"
        );
        cap.note_checkpoint(3800, 3500);
        let first = cap.checkpoint_backoff.map(|(_, b)| b);
        assert_eq!(first, Some(MIN_BACKOFF), "two stopped short in a row");
        cap.note_checkpoint(3900, 3600);
        let second = cap.checkpoint_backoff.map(|(_, b)| b);
        assert_eq!(
            second,
            Some(MIN_BACKOFF * 2),
            "a third: the back-off did not grow"
        );
        cap.note_checkpoint(4000, 4000);
        assert!(
            !cap.backing_off(),
            "a checkpoint copied everything: backing off"
        );
        cap.note_checkpoint(4100, 4000);
        assert!(
            !cap.backing_off(),
            "a short stop after a full copy: backing off"
        );
        Ok(())
    }

    /// After a step that left commits uncaptured, the pin moves while the WAL is not fully
    /// copied (the application's checkpoint then copies past what walship captured), and stays
    /// once it is. A pin moved there would begin on a fully copied WAL (slot 0): the
    /// application's next commit restarted the WAL, and the commits walship had not captured
    /// were gone, with the restart taken for a continuation.
    #[test]
    fn a_limited_step_moves_the_pin_only_where_the_wal_cannot_restart() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (app, mut cap) = captured_app(dir.path())?;
        let before = cap.at.txid;
        for _ in 0..4 {
            app.execute("insert into t values (randomblob(3000))", [])?;
        }
        let checkpoint = || {
            app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
        };
        let (_, more) = cap.step_limited(Some(1))?;
        assert!(more, "a step of one frame left no commit");
        cap.rotate_pin()?;
        let (log, done) = checkpoint()?;
        assert_eq!(
            done, log,
            "the pin did not move past the captured commit: {done} of {log} frames copied"
        );
        let (_, more) = cap.step_limited(Some(1))?;
        assert!(more, "a step of one frame left no commit");
        cap.rotate_pin()?;
        app.execute("insert into t values (2)", [])?;
        cap.step()?;
        assert_eq!(
            cap.at.txid,
            before + 5,
            "five commits, {} captured",
            cap.at.txid - before
        );
        Ok(())
    }

    /// A writer commits as fast as it can, checkpointing after every commit, while capture
    /// goes in steps of one frame and moves its pin after each: every commit is captured, and
    /// none is lost to a restart. This is the race of the test above left to chance: with
    /// the pin moved blindly, 3 of 6 runs of this test lost commits (205 to 1,301).
    #[test]
    fn limited_steps_against_a_checkpointing_writer_capture_every_commit() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (app, mut cap) = captured_app(dir.path())?;
        app.pragma_update(None, "wal_autocheckpoint", 1)?;
        let before = cap.at.txid;
        const COMMITS: u64 = 3000;
        let writer = std::thread::spawn(move || -> rusqlite::Result<()> {
            for i in 0..COMMITS as i64 {
                app.execute("insert into t values (randomblob(?1))", [100 + i % 3000])?;
                if i % 4 == 0 {
                    // A gap in which a checkpoint can copy the whole WAL before the next pin.
                    std::thread::sleep(std::time::Duration::from_micros(1000));
                }
            }
            Ok(())
        });
        let mut limited = 0u64;
        while !writer.is_finished() {
            let (_, more) = cap.step_limited(Some(1))?;
            limited += u64::from(more);
            cap.rotate_pin()?;
        }
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        cap.step()?;
        assert!(limited > 10, "only {limited} steps left commits behind");
        assert_eq!(
            cap.at.txid - before,
            COMMITS,
            "{COMMITS} commits, {} captured",
            cap.at.txid - before
        );
        Ok(())
    }
}
