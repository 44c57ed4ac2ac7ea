//! Capture steps: new commits in the WAL become segments in the spool, each saved as state
//! before it is published (the `prev-*` protocol of the parent module), big ones spooled live.

use super::{Capture, Step, ZSTD_LEVEL};
use crate::clock::now_ms;
use crate::db::{WalChange, WalCommit, WalPos, WalState};
use crate::layout::codec::{Commit, Compressor, Encoder, Kind};
use crate::layout::names::FileName;
use crate::replicate::spool::SpoolWriter;
use crate::replicate::state::{CaptureState, SavedCapture};
use anyhow::{anyhow, Result};
use std::io::BufWriter;

/// A commit this big (and at least a segment's size) is spooled live (see `spool`).
const LIVE_MIN_BYTES: u64 = 4 << 20;

/// A segment being written to the spool (see [`Capture::begin_segment`]).
pub(super) struct PendingSegment {
    pub(super) enc: Encoder<BufWriter<SpoolWriter>>,
    prev: CaptureState,
}

impl Capture {
    /// Starts a segment in the spool, remembering the state before it; `live` names a big
    /// segment that shippers may stream while it is written.
    pub(super) fn begin_segment(&self, live: Option<FileName>) -> Result<PendingSegment> {
        if live.is_some() {
            // Live files are streamed one at a time, in order: the previous ones first.
            self.publisher.settle()?;
        }
        let prev = self.state();
        let appended = match live {
            None => self.spool.append(&self.at.generation, self.at.txid),
            Some(_) => None,
        };
        let mut w = match appended {
            Some(w) => w,
            None => self.spool.create(&self.at.generation, live)?,
        };
        if self.pipelined && !self.small_commits && self.volatile_allowed() {
            // Likely published without a sync (see `publish`): its bytes need not reach the
            // disk at all if every replica holds them before it is removed.
            w.skip_writeback();
        }
        let compressor = match self.compressor.take() {
            Some(c) => c,
            None => Compressor::new()?,
        };
        let enc = Encoder::with_compressor(
            BufWriter::with_capacity(256 << 10, w),
            Kind::Segment,
            self.page_size,
            ZSTD_LEVEL,
            compressor,
        )?;
        Ok(PendingSegment { enc, prev })
    }

    /// Finishes a segment: saves the state naming the positions before (`prev-*`) and after
    /// it, then publishes it (see [`Capture::write_segments`] for why in that order).
    /// Within a checkpoint's chase of a writer of big commits, the publisher does both while
    /// capture goes on (see `publish`). Small commits are published at once: their steps are
    /// short and a pin move follows each, so handing them over only added two thread switches
    /// per step (a max-rate single-row writer ran at 0.81x instead of 0.84x).
    pub(super) fn publish_segment(&self, seg: PendingSegment, name: &FileName) -> Result<()> {
        let (w, compressor) = seg.enc.finish_keep()?;
        self.compressor.set(Some(compressor));
        let mut w = w
            .into_inner()
            .map_err(|e| anyhow!("cannot write segment: {}", e.error()))?;
        let saved = SavedCapture {
            cur: self.state(),
            prev: Some(seg.prev),
        };
        if self.pipelined && !self.small_commits {
            w.finish_writeback();
            let volatile = self.mark_volatile(name);
            return self
                .publisher
                .publish(w, saved, self.at.generation, *name, volatile);
        }
        // In capture's order: after any segment handed over before this one (a chase whose
        // commits turned small meanwhile).
        self.publisher.settle()?;
        self.state.save_capture_to_publish(&saved)?;
        self.spool.publish(w, &self.at.generation, name)?;
        Ok(())
    }

    /// Captures every complete new commit into segments.
    ///
    /// # Errors
    /// I/O and SQLite errors; a break in continuity is a [`WalChange::Broken`] error, on which the
    /// caller starts a new generation.
    pub(crate) fn step(&mut self) -> Result<Step> {
        self.step_limited(None).map(|(s, _)| s)
    }

    /// Like [`Capture::step`], but captures at most about `max_frames` frames (whole commits,
    /// at least one); the flag says whether complete commits remain after what was captured.
    ///
    /// # Errors
    /// As [`Capture::step`].
    pub(crate) fn step_limited(&mut self, max_frames: Option<u64>) -> Result<(Step, bool)> {
        let r = self.step_limited_inner(max_frames);
        if let Ok((_, more)) = r {
            self.behind = more;
        }
        r
    }

    fn step_limited_inner(&mut self, max_frames: Option<u64>) -> Result<(Step, bool)> {
        if self.poisoned {
            return Err(WalChange::Broken("an earlier capture step failed half-way".into()).into());
        }
        let state = match self.pos {
            Some(p) => self.db.scan_limited(&p, max_frames)?,
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
    pub(super) fn write_segments(
        &mut self,
        from: &WalPos,
        commits: &[WalCommit],
        end: &WalPos,
        per_commit: bool,
    ) -> Result<()> {
        self.poison_on_err(|c| c.write_segments_inner(from, commits, end, per_commit))
    }

    pub(super) fn write_segments_inner(
        &mut self,
        from: &WalPos,
        commits: &[WalCommit],
        end: &WalPos,
        per_commit: bool,
    ) -> Result<()> {
        let ps = self.page_size;
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
                    let (fh, page) = self.db.read_next(&mut cursor)?;
                    enc.page(fh.pgno, page)?;
                    if per_commit {
                        self.hashes.set(fh.pgno, page);
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
}
