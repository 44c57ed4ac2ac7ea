//! Pipelined publication of segments while a checkpoint chases a writer: a thread of its own
//! saves each segment's state and publishes it (fsync, rename, directory fsync), in the order
//! capture finished them, while capture encodes the next step.
//!
//! Why: a bulk load's capture thread spent most of its wall time waiting for the disk (the
//! segment's fsync, the state file's, the rename's directory fsync), about 370 ms per 200 MiB,
//! and the writer waited for capture whenever the WAL was full.
//!
//! Invariants:
//! - The on-disk sequence is the same as a synchronous publish: segment by segment, the state
//!   naming the positions before and after it, then the segment. Nothing reorders; a crash
//!   leaves what a crash during a synchronous publish leaves.
//! - A failure stops the pipeline: the segments queued after it are dropped (their temporary
//!   files removed, an append cut off), never published after a gap, and the failure is
//!   returned by the next [`Publisher::settle`]; capture is then poisoned (memory is ahead).
//! - Capture may let the WAL restart only over frames whose segments are published: before a
//!   pin that may let the WAL restart, a checkpoint under the write lock, or returning from a
//!   checkpoint, it settles (see `capture::checkpoint`). Pins that cannot let the WAL restart
//!   (`Db::rotate_pin_behind`) need no settling.
//! - At most [`DEPTH`] segments wait, besides the one being published: capture does not run
//!   further ahead of the disk.
//!
//! **A chase's segments are published without a sync** (no fsync of the file or of its
//! directory, no early write-back: [`Spool::publish_volatile`]). Behind a bulk load they are
//! shipped and removed within about 100 ms, so their bytes need not reach this disk at all,
//! where they slowed the application's own WAL syncs (over sftp, a 200 MiB load took ~10%
//! longer than with the spool on a tmpfs: docs/PERFORMANCE.md, twenty-ninth session). What
//! makes it safe is the machine's boot id ([`boot_id`]): a file only in the page cache is
//! lost exactly when the machine restarts, and a process that dies (walship, killed) loses
//! none of it.
//! - Before the first such file, the mark ([`VolatileMark`]: boot id, generation, first txid)
//!   is saved durably in the state directory; it is removed durably only once every file it
//!   covers was synced or removed, after the capture state saved since is written through
//!   ([`Capture::settle_volatile`], from the main loop between capture steps). A file is
//!   synced once [`VOLATILE_MAX_AGE`] old (the main loop looks every quarter of that while a
//!   mark is set; not during a chase, which holds the main loop), and all of them at a clean
//!   stop.
//! - A start that finds the mark of the same boot resumes as usual: the page cache holds what
//!   the spool published; its files count as unsynced again.
//! - A start that finds the mark of another boot (or cannot read it) removes the marked
//!   generation's spool files from the mark's txid on (any of them may have lost bytes or its
//!   name, and a replica may hold them) and starts a new generation if that is the saved
//!   state's: capturing the same txids again could name other commits (an application at
//!   `synchronous=NORMAL` loses its last commits in a power cut), the replica would hold
//!   both, and restore refuses such a replica. The mark goes once the new generation's
//!   snapshot is spooled (durably, as always). So a power cut during a chase costs a new
//!   generation (a snapshot), never a replica that does not restore.
//! - Without a readable boot id, or while a mark of another generation is set, segments are
//!   synced as before. Files published live (big commits, snapshots) and appends to the tail
//!   are always synced.

use super::Capture;
use crate::durable::lock;
use crate::layout::names::{FileName, GenerationId};
use crate::replicate::spool::{Spool, SpoolWriter};
use crate::replicate::state::{boot_id, SavedCapture, StateDir, VolatileMark};
use anyhow::{anyhow, Result};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// How long a chase's segment may stay in the spool without a sync (see the module doc).
pub(crate) const VOLATILE_MAX_AGE: Duration = Duration::from_secs(1);

impl Capture {
    /// Whether a chase's segments of the current generation may be published without a sync
    /// (see the module doc): the boot id can be read, and no mark is set for another
    /// generation or boot.
    pub(super) fn volatile_allowed(&self) -> bool {
        let Some(boot) = boot_id() else {
            return false;
        };
        self.volatile
            .borrow()
            .as_ref()
            .is_none_or(|m| m.boot == boot && m.generation == self.at.generation)
    }

    /// Whether the segment `name` of a chase is published without a sync; sets the mark
    /// durably first if none is set (a mark that cannot be written, on a full disk say,
    /// only means a synced segment).
    pub(super) fn mark_volatile(&self, name: &FileName) -> bool {
        let Some(boot) = boot_id() else {
            return false;
        };
        let mut mark = self.volatile.borrow_mut();
        if let Some(m) = mark.as_ref() {
            return m.boot == boot && m.generation == self.at.generation;
        }
        let m = VolatileMark {
            boot: boot.to_owned(),
            generation: self.at.generation,
            from: name.first_txid(),
        };
        if let Err(e) = self.state.mark_volatile(&m) {
            tracing::debug!("{e:#}: the segment is synced");
            return false;
        }
        tracing::debug!(generation = %m.generation, from = m.from, "publishing a chase's segments without a sync until replicas hold them");
        *mark = Some(m);
        true
    }

    /// Whether a mark is set (the main loop then settles it: [`Capture::settle_volatile`]).
    pub(crate) fn has_volatile(&self) -> bool {
        self.volatile.borrow().is_some()
    }

    /// Syncs the segments published without a sync at least `age` ago and not removed yet,
    /// and removes the mark once none is left (with a new generation begun, if the mark's
    /// generation was lost in a reboot). Between capture steps only: no publication is in
    /// flight then.
    ///
    /// # Errors
    /// I/O errors (the mark stays).
    pub(crate) fn settle_volatile(&mut self, age: Duration) -> Result<()> {
        let Some(m) = self.volatile.borrow().clone() else {
            return Ok(());
        };
        if self.spool.sync_volatile(age)? > 0 {
            return Ok(());
        }
        let lost = boot_id() != Some(m.boot.as_str());
        if lost && (self.poisoned || self.at.generation == m.generation) {
            return Ok(());
        }
        self.state.clear_volatile()?;
        *self.volatile.borrow_mut() = None;
        Ok(())
    }
}

/// The mark a previous process left, as found at start ([`volatile_on_open`]).
#[derive(Debug, Default)]
pub(crate) struct VolatileAtStart {
    mark: Option<VolatileMark>,
    /// The marked generation, when the machine restarted since: it cannot be resumed.
    lost: Option<GenerationId>,
}

/// At start, before any shipper reads the spool: the mark a previous process left. Within
/// the same boot the page cache still holds what it published, so its files only count as
/// unsynced again, to be synced or removed as usual. After a reboot any of them may have lost
/// bytes or its name, and a shipper must never send one over the whole copy a replica holds:
/// they are removed, and their generation is not resumed.
///
/// # Errors
/// The files cannot be removed.
pub(crate) fn volatile_on_open(state: &StateDir, spool: &Spool) -> Result<VolatileAtStart> {
    let m = match state.load_volatile() {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(VolatileAtStart::default()),
        Err(e) => {
            // Unreadable (it is written atomically: a damaged disk): what it covered is
            // unknown, so the saved generation is taken as lost, whole.
            let generation = match state.load_capture() {
                Ok(Some(c)) => c.cur.at.generation,
                _ => GenerationId { ms: 0, rand: 0 },
            };
            warn!("{e:#}: taking generation {generation} as lost");
            VolatileMark {
                boot: String::new(),
                generation,
                from: 0,
            }
        }
    };
    let same_boot = boot_id() == Some(m.boot.as_str());
    info!(generation = %m.generation, from = m.from, same_boot, "found the mark of spool files published without a sync");
    let lost = if same_boot {
        spool.adopt_volatile(&m.generation, m.from);
        None
    } else {
        let n = spool.drop_from(&m.generation, m.from)?;
        warn!(generation = %m.generation, from = m.from, "the machine restarted while spool files of generation {} from txid {} were not on its disk yet: dropped {n} spool file(s) that may have lost bytes", m.generation, m.from);
        Some(m.generation)
    };
    Ok(VolatileAtStart {
        mark: Some(m),
        lost,
    })
}

impl Capture {
    /// Takes over the mark found at start; returns the generation that cannot be resumed.
    pub(super) fn volatile_at_start(&mut self, found: VolatileAtStart) -> Option<GenerationId> {
        *self.volatile.borrow_mut() = found.mark;
        found.lost
    }
}

/// Segments that may wait for the publisher, besides the one it is publishing.
const DEPTH: usize = 2;

/// One segment to publish.
struct Job {
    w: SpoolWriter,
    saved: SavedCapture,
    generation: GenerationId,
    name: FileName,
    /// Published without a sync (see the module doc).
    volatile: bool,
}

#[derive(Default)]
struct Progress {
    /// Jobs handed over and not yet done (published or dropped).
    pending: usize,
    /// The first failure since the last settle.
    failed: Option<anyhow::Error>,
}

/// The publishing thread of one capture; it ends when the publisher is dropped, after the
/// jobs already handed over.
pub(super) struct Publisher {
    tx: Option<SyncSender<Job>>,
    progress: Arc<(Mutex<Progress>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// Starts the thread that publishes into `spool`, saving capture state in `state`.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub(super) fn start(spool: Arc<Spool>, state: StateDir) -> Result<Publisher> {
        let (tx, rx) = sync_channel::<Job>(DEPTH);
        let progress = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let p = progress.clone();
        let thread = std::thread::Builder::new()
            .name("spool-publish".into())
            .spawn(move || {
                for job in rx {
                    let failed = lock(&p.0).failed.is_some();
                    let r = if failed {
                        // After a failure nothing is published past the gap: dropping the
                        // writer removes its temporary file (or cuts the append off).
                        drop(job.w);
                        Ok(())
                    } else {
                        state.save_capture_to_publish(&job.saved).and_then(|()| {
                            if job.volatile {
                                spool.publish_volatile(job.w, &job.generation, &job.name)
                            } else {
                                spool.publish(job.w, &job.generation, &job.name)
                            }
                            .map(|_| ())
                        })
                    };
                    let mut g = lock(&p.0);
                    if let Err(e) = r {
                        g.failed.get_or_insert(e);
                    }
                    g.pending -= 1;
                    p.1.notify_all();
                }
            })
            .map_err(|e| anyhow!("cannot start the spool publishing thread: {e}"))?;
        Ok(Publisher {
            tx: Some(tx),
            progress,
            thread: Some(thread),
        })
    }

    /// Hands a finished segment over (waiting while [`DEPTH`] others wait); `saved` names the
    /// positions before and after it; `volatile`: published without a sync (see the module
    /// doc).
    ///
    /// # Errors
    /// The thread is gone (the segment is then not published).
    pub(super) fn publish(
        &self,
        w: SpoolWriter,
        saved: SavedCapture,
        generation: GenerationId,
        name: FileName,
        volatile: bool,
    ) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("internal: the spool publisher has stopped"))?;
        lock(&self.progress.0).pending += 1;
        let job = Job {
            w,
            saved,
            generation,
            name,
            volatile,
        };
        if tx.send(job).is_err() {
            lock(&self.progress.0).pending -= 1;
            return Err(anyhow!("internal: the spool publishing thread has ended"));
        }
        Ok(())
    }

    /// Waits until every segment handed over is published; returns the first failure since
    /// the last settle (the segments after it were dropped).
    ///
    /// # Errors
    /// The first failure to save or publish.
    pub(super) fn settle(&self) -> Result<()> {
        let (m, cv) = &*self.progress;
        let mut g = lock(m);
        while g.pending > 0 {
            g = cv
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.failed.take().map_or(Ok(()), Err)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicate::state::{CaptureState, Captured};

    fn seg(t: u64) -> FileName {
        FileName::Segment {
            level: 0,
            first: t,
            last: t,
            first_ms: 100 + t,
            last_ms: 100 + t,
        }
    }

    /// The state saved with the segment of txid `t`: before it, and after it.
    fn saved(g: GenerationId, t: u64) -> SavedCapture {
        let at = |txid| CaptureState {
            at: Captured {
                generation: g,
                txid,
                time_ms: 100 + txid,
                db_checksum: txid,
                db_pages: 1,
            },
            page_size: 4096,
            pos: None,
        };
        SavedCapture {
            cur: at(t),
            prev: Some(at(t - 1)),
        }
    }

    /// Segments are published in order, each after its state; a failure drops what was handed
    /// over after it (no file past the gap, no temporary file left, its state not saved), is
    /// returned once by `settle`, and publishing goes on after it.
    #[test]
    fn a_failure_publishes_nothing_past_the_gap() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::new(dir.path().join("state"));
        std::fs::create_dir_all(state.spool_dir())?;
        let spool = Arc::new(Spool::open(&state.spool_dir())?);
        let g = GenerationId { ms: 1, rand: 2 };
        let p = Publisher::start(spool.clone(), state.clone())?;
        let names = |s: &Spool| -> Result<Vec<FileName>> {
            Ok(s.list()?.into_iter().map(|f| f.name).collect())
        };

        p.publish(spool.create(&g, None)?, saved(g, 1), g, seg(1), false)?;
        p.settle()?;
        assert_eq!(names(&spool)?, [seg(1)]);
        assert_eq!(state.load_capture()?, Some(saved(g, 1)));

        // Created live for txid 2 but published under another name: refused.
        p.publish(
            spool.create(&g, Some(seg(2)))?,
            saved(g, 2),
            g,
            seg(3),
            false,
        )?;
        p.publish(spool.create(&g, None)?, saved(g, 3), g, seg(3), false)?;
        let e = p.settle().expect_err("a failed publish was not reported");
        assert!(format!("{e:#}").contains("published as"), "{e:#}");
        assert_eq!(names(&spool)?, [seg(1)], "published past a failure");
        assert_eq!(
            state.load_capture()?,
            Some(saved(g, 2)),
            "the state of a segment after the failure was saved"
        );
        let files = std::fs::read_dir(state.spool_dir().join(g.to_string()))?.count();
        assert_eq!(files, 1, "temporary files left in the spool");
        p.settle()?;

        p.publish(spool.create(&g, None)?, saved(g, 2), g, seg(2), false)?;
        p.settle()?;
        assert_eq!(names(&spool)?, [seg(1), seg(2)]);
        assert_eq!(state.load_capture()?, Some(saved(g, 2)));
        Ok(())
    }
}
