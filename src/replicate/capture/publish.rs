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

use crate::durable::lock;
use crate::layout::names::{FileName, GenerationId};
use crate::replicate::spool::{Spool, SpoolWriter};
use crate::replicate::state::{SavedCapture, StateDir};
use anyhow::{anyhow, Result};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

/// Segments that may wait for the publisher, besides the one it is publishing.
const DEPTH: usize = 2;

/// One segment to publish.
struct Job {
    w: SpoolWriter,
    saved: SavedCapture,
    generation: GenerationId,
    name: FileName,
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
                        state
                            .save_capture_to_publish(&job.saved)
                            .and_then(|()| spool.publish(job.w, &job.generation, &job.name))
                            .map(|_| ())
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
    /// positions before and after it.
    ///
    /// # Errors
    /// The thread is gone (the segment is then not published).
    pub(super) fn publish(
        &self,
        w: SpoolWriter,
        saved: SavedCapture,
        generation: GenerationId,
        name: FileName,
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

        p.publish(spool.create(&g, None)?, saved(g, 1), g, seg(1))?;
        p.settle()?;
        assert_eq!(names(&spool)?, [seg(1)]);
        assert_eq!(state.load_capture()?, Some(saved(g, 1)));

        // Created live for txid 2 but published under another name: refused.
        p.publish(spool.create(&g, Some(seg(2)))?, saved(g, 2), g, seg(3))?;
        p.publish(spool.create(&g, None)?, saved(g, 3), g, seg(3))?;
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

        p.publish(spool.create(&g, None)?, saved(g, 2), g, seg(2))?;
        p.settle()?;
        assert_eq!(names(&spool)?, [seg(1), seg(2)]);
        assert_eq!(state.load_capture()?, Some(saved(g, 2)));
        Ok(())
    }
}
