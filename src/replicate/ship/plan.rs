//! The shipper's decisions, without any I/O: what one replica's thread does next.
//!
//! [`Planner`] holds what the shipper remembers between rounds (the replica's position, whether
//! the replica was prepared, what it is known to hold, failures, when housekeeping last ran)
//! and turns it into one [`Action`] at a time. The shipper executes each action and reports
//! what came of it ([`Planner::sent`], [`Planner::not_streamed`], [`Planner::listed`],
//! [`Planner::compacted`], [`Planner::failed`]); time is always passed in, so every decision
//! is a function of its arguments and is unit-tested (`plan/tests.rs`).
//!
//! A round starts from one [`View`] of the spool ([`Planner::begin`], which names the gap to
//! report, if any) and ends with [`Action::Continue`] (progress: look again at once),
//! [`Action::Wait`] (idle), [`Action::Stop`], or a failure. Within a round the order is fixed:
//! gap, stop check, prepare, then either the next file
//! (streamed live or uploaded from the spool, then the replica's listing when the generation
//! changed) or, idle, heap trim, listing, temporary-file sweep, compaction (deferred while the
//! database is busy) and retention.
//!
//! Invariants kept (see `ship` for why):
//! - Files are sent in [`Key`] order; a gap is never papered over: the next file continues the
//!   position, or is a snapshot (skipping to it is reported), or a fresh snapshot is asked for.
//! - Compaction waits until the database has been quiet for [`COMPACT_WHEN_QUIET`], but never
//!   longer than [`COMPACT_MAX_DEFER`]; retention runs at most every [`RETAIN_EVERY`], and at
//!   once after a new generation's snapshot.
//! - After a failure everything about the replica is looked at again (prepare, listing), and
//!   the next attempt waits an exponential backoff capped at [`MAX_BACKOFF`] plus jitter.

use crate::layout::names::{FileName, GenerationId};
use crate::replicate::spool::{Key, SpoolFile};
use std::time::{Duration, Instant};

/// Longest wait between two attempts against a failing replica.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_millis(3000);

/// How often an idle shipper sweeps the replica for temporary files.
pub(crate) const TEMP_SWEEP: Duration = Duration::from_secs(60);

/// Least time between two heap trims after bursts.
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(5);

/// How long the database must go without new commits before a replica is compacted...
pub(crate) const COMPACT_WHEN_QUIET: Duration = Duration::from_secs(1);

/// ...but a database that is never quiet still gets compacted this often.
pub(crate) const COMPACT_MAX_DEFER: Duration = Duration::from_secs(10);

/// Least time between two runs of the retention policy on one generation.
pub(crate) const RETAIN_EVERY: Duration = Duration::from_secs(600);

/// Longest idle wait when nothing is scheduled: the spool wakes the shipper on news anyway.
pub(crate) const IDLE_WAIT: Duration = Duration::from_secs(300);

/// Most spooled files sent as one upload.
pub(crate) const BATCH_FILES: usize = 1024;

/// Most compressed bytes sent as one upload.
pub(crate) const BATCH_BYTES: u64 = 32 << 20;

/// What the shipper saw of the spool at the start of a round.
#[derive(Debug, Clone, Default)]
pub(crate) struct View {
    /// The spooled files, in key order.
    pub(crate) files: Vec<SpoolFile>,
    /// The newest captured position, read before listing the spool.
    pub(crate) head: Option<Key>,
    /// The file capture is writing live (its generation and name), read before the listing.
    pub(crate) live: Option<(GenerationId, FileName)>,
}

/// Whether walship is shutting down, read once a round (after its gap was reported).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Shutdown {
    /// Shutting down: finish what is spooled, then stop.
    pub(crate) stopping: bool,
    /// Shutting down gives up at this instant.
    pub(crate) deadline: Option<Instant>,
}

/// Why the replica cannot simply take the next spooled file (see [`Planner::begin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gap {
    /// It missed spooled files and skips to this snapshot (which is sent next).
    Resync(FileName),
    /// It needs a fresh snapshot from capture, for this reason; nothing is sent meanwhile.
    WantSnapshot(&'static str),
}

/// The next thing the shipper does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// End the thread (stopping, and caught up or past the deadline); `sweep`: first remove
    /// temporary files from the replica (errors only logged).
    Stop {
        /// Whether to sweep.
        sweep: bool,
    },
    /// Check the marker, claim the replica (naming this generation) or check the claim, and
    /// sweep temporary files.
    Prepare(Option<GenerationId>),
    /// Stream the live file to the replica (after checking the claim for its generation), then
    /// report [`Planner::sent`] or [`Planner::not_streamed`].
    StreamLive,
    /// Upload these spooled files, as one multi-part segment file if more than one (after
    /// checking the claim for their generation), save the position, then report
    /// [`Planner::sent`].
    Upload(Vec<SpoolFile>),
    /// List what the replica holds in this generation, then report [`Planner::listed`].
    ListRemote(GenerationId),
    /// Give freed memory back to the system.
    TrimHeap,
    /// Remove temporary files from the replica (after checking the claim).
    SweepTemps,
    /// Compact the listed generation (after checking the claim), then report
    /// [`Planner::compacted`].
    Compact,
    /// Apply the retention policy, keeping this generation and newer ones (after checking the
    /// claim).
    Retain(GenerationId),
    /// The round made progress: start the next one at once; `wake`: tell the main loop first.
    Continue {
        /// Whether to wake the main loop.
        wake: bool,
    },
    /// Idle: wait until the spool changes, or until this instant (`None`: [`IDLE_WAIT`]).
    Wait(Option<Instant>),
    /// Another instance took the replica over: report it and end the thread for good.
    Retire,
    /// A failure: wait this long (whatever the spool does), then start a round.
    Backoff(Duration),
}

/// Where the current round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Before [`Planner::begin`].
    Begin,
    /// The round began: check whether to stop.
    StopCheck,
    /// Prepare the replica if needed.
    Prepare,
    /// Send the next file, or go idle.
    Send,
    /// Waiting for [`Planner::sent`] or [`Planner::not_streamed`].
    Sending,
    /// A file was sent and the position saved: list the replica's new generation first, if
    /// it changed (`snapshot`: with a snapshot, which makes retention due).
    Sent {
        list: Option<GenerationId>,
        snapshot: bool,
    },
    /// Idle housekeeping before compaction.
    Idle,
    /// Waiting for [`Planner::compacted`].
    Compacting,
    /// Compaction had nothing to do: retention, if due.
    Retention,
    /// The round ends with this.
    End(Ending),
}

/// How a round ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Progress: [`Action::Continue`].
    Continue { wake: bool },
    /// Compaction waits for the database to be quiet: [`Action::Wait`] until then.
    Deferred,
    /// Housekeeping done: [`Action::Wait`].
    Idle,
}

/// The shipper's memory and decisions (see the module doc).
#[derive(Debug)]
pub(crate) struct Planner {
    /// Key of the last file the replica holds durably.
    pos: Option<Key>,
    /// The marker and the claim were checked since the last failure.
    prepared: bool,
    /// Consecutive failed rounds.
    failures: u32,
    /// The generation of the replica's position and the files it holds there, once listed.
    remote: Option<(GenerationId, Vec<FileName>)>,
    /// When retention last ran (`None`: due).
    last_retention: Option<Instant>,
    /// When temporary files were last swept.
    last_sweep: Instant,
    /// While compaction waits for the database to be quiet: until when.
    compact_after: Option<Instant>,
    /// Since when compaction has been waiting.
    deferred_since: Option<Instant>,
    /// A burst (a merged backlog, a compaction, a failure) asks for a heap trim once idle, at
    /// most every [`TRIM_EVERY`] (trimmed pages fault in again when reused).
    trim_due: bool,
    /// When the heap was last trimmed.
    last_trim: Instant,
    /// A trim was handed out: the next call's time is when it ended.
    trimming: bool,
    /// The round's spooled files.
    files: Vec<SpoolFile>,
    /// The round's next spooled file, decided when it began.
    next: Option<SpoolFile>,
    /// The round's live file follows the position: it is streamed if no spooled file is next.
    live_follows: bool,
    /// Where the round stands.
    step: Step,
}

impl Planner {
    /// A planner for a replica at `pos`, starting at `now`.
    pub(crate) fn new(pos: Option<Key>, now: Instant) -> Planner {
        Planner {
            pos,
            prepared: false,
            failures: 0,
            remote: None,
            last_retention: None,
            last_sweep: now,
            compact_after: None,
            deferred_since: None,
            trim_due: false,
            last_trim: now,
            trimming: false,
            files: Vec::new(),
            next: None,
            live_follows: false,
            step: Step::Begin,
        }
    }

    /// Key of the last file the replica holds durably.
    pub(crate) fn position(&self) -> Option<Key> {
        self.pos
    }

    /// The replica's listed generation and files (what [`Action::Compact`] works on).
    pub(crate) fn remote_mut(&mut self) -> Option<&mut (GenerationId, Vec<FileName>)> {
        self.remote.as_mut()
    }

    /// Starts a round from `view`: decides the file to send next. Returns the gap on the
    /// replica's way, to report (log a resynchronisation, or ask capture for a fresh snapshot)
    /// before asking for [`Planner::next`] actions.
    pub(crate) fn begin(&mut self, view: View) -> Option<Gap> {
        let (next, gap) = next_file(self.pos, &view.files, view.head);
        self.live_follows = view
            .live
            .is_some_and(|(g, name)| live_follows(self.pos, g, &name));
        self.next = next;
        self.files = view.files;
        self.step = Step::StopCheck;
        gap
    }

    /// The next action of the round; `shutdown` as read after [`Planner::begin`], `head_moved`
    /// is when capture last moved the head.
    pub(crate) fn next(
        &mut self,
        shutdown: Shutdown,
        head_moved: Option<Instant>,
        now: Instant,
    ) -> Action {
        if std::mem::take(&mut self.trimming) {
            self.last_trim = now;
        }
        loop {
            let (step, action) = match self.step {
                Step::StopCheck => self.stop_check(shutdown, now),
                Step::Prepare => self.prepare(),
                Step::Send => self.send(),
                Step::Sent { list, snapshot } => {
                    if snapshot {
                        // A new generation: apply retention to the old ones soon.
                        self.last_retention = None;
                    }
                    let action = list.map(Action::ListRemote);
                    (Step::End(Ending::Continue { wake: true }), action)
                }
                Step::Idle => self.idle(head_moved, now),
                Step::Retention => self.retention(now),
                Step::End(e) => (Step::Begin, Some(self.end(e))),
                // Not begun, or an action's report never came (a bug): end the round.
                Step::Begin | Step::Sending | Step::Compacting => {
                    (Step::End(Ending::Continue { wake: false }), None)
                }
            };
            self.step = step;
            if let Some(a) = action {
                return a;
            }
        }
    }

    fn stop_check(&mut self, shutdown: Shutdown, now: Instant) -> (Step, Option<Action>) {
        let idle = self.next.is_none();
        if shutdown.stopping && (idle || shutdown.deadline.is_some_and(|d| now >= d)) {
            let sweep = self.prepared && idle;
            return (Step::Begin, Some(Action::Stop { sweep }));
        }
        (Step::Prepare, None)
    }

    fn prepare(&mut self) -> (Step, Option<Action>) {
        if self.prepared {
            return (Step::Send, None);
        }
        // A failure of the action resets this (see `failed`).
        self.prepared = true;
        (
            Step::Send,
            Some(Action::Prepare(self.pos.map(|p| p.generation))),
        )
    }

    fn send(&mut self) -> (Step, Option<Action>) {
        if let Some(f) = self.next.take() {
            let batch = batch_after(&f, &self.files);
            return (Step::Sending, Some(Action::Upload(batch)));
        }
        if self.live_follows {
            return (Step::Sending, Some(Action::StreamLive));
        }
        (Step::Idle, None)
    }

    /// After [`Action::StreamLive`] or [`Action::Upload`] sent nothing: capture abandoned the
    /// live file, or published it before it could be opened, or the spool limit dropped the
    /// file (the next round looks again; the position stays).
    pub(crate) fn not_streamed(&mut self) {
        self.step = Step::End(Ending::Continue { wake: false });
    }

    /// After the files of `batch` were sent (as `sent`, one file if more than one), before the
    /// position is saved: the new position, and the listing to keep up to date (listed afresh
    /// when the generation changed). If saving fails, [`Planner::failed`] forgets the listing.
    pub(crate) fn sent(&mut self, batch: &[SpoolFile], sent: FileName) {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            self.step = Step::End(Ending::Continue { wake: false });
            return;
        };
        self.trim_due |= batch.len() > 1;
        self.pos = Some(last.key());
        self.step = match self.remote.as_mut() {
            Some((g, files)) if *g == last.generation => {
                files.push(sent);
                Step::Sent {
                    list: None,
                    snapshot: false,
                }
            }
            _ => Step::Sent {
                list: Some(last.generation),
                snapshot: matches!(first.name, FileName::Snapshot { .. }),
            },
        };
    }

    /// After an upload appended to the replica's tail segment and renamed it: `old` is no
    /// longer on the replica in generation `g` (the new name comes with [`Planner::sent`]).
    pub(crate) fn replaced(&mut self, g: GenerationId, old: FileName) {
        if let Some((rg, files)) = self.remote.as_mut() {
            if *rg == g {
                files.retain(|f| *f != old);
            }
        }
    }

    /// After [`Action::ListRemote`]: what the replica holds in generation `g`.
    pub(crate) fn listed(&mut self, g: GenerationId, files: Vec<FileName>) {
        self.remote = Some((g, files));
    }

    /// Idle housekeeping, then compaction unless the database is busy.
    fn idle(&mut self, head_moved: Option<Instant>, now: Instant) -> (Step, Option<Action>) {
        if self.trim_due && now.saturating_duration_since(self.last_trim) >= TRIM_EVERY {
            self.trim_due = false;
            self.trimming = true;
            return (Step::Idle, Some(Action::TrimHeap));
        }
        if self.remote.is_none() {
            if let Some(p) = self.pos {
                return (Step::Idle, Some(Action::ListRemote(p.generation)));
            }
        }
        if now.saturating_duration_since(self.last_sweep) > TEMP_SWEEP {
            self.last_sweep = now;
            return (Step::Idle, Some(Action::SweepTemps));
        }
        // Compaction waits for the database to be quiet, but not for ever: a database that is
        // never quiet is compacted at least every COMPACT_MAX_DEFER.
        let since = *self.deferred_since.get_or_insert(now);
        let quiet_at = head_moved.map(|t| t + COMPACT_WHEN_QUIET);
        if let Some(q) = quiet_at.filter(|q| *q > now) {
            if now < since + COMPACT_MAX_DEFER {
                self.compact_after = Some(q.min(since + COMPACT_MAX_DEFER));
                return (Step::End(Ending::Deferred), None);
            }
        }
        self.compact_after = None;
        if self.remote.is_some() {
            return (Step::Compacting, Some(Action::Compact));
        }
        (Step::End(Ending::Idle), None)
    }

    /// After [`Action::Compact`]: whether it did anything. Once overdue, compaction goes on
    /// until done, but new spooled files still come first.
    pub(crate) fn compacted(&mut self, did: bool) {
        self.step = if did {
            self.trim_due = true;
            Step::End(Ending::Continue { wake: false })
        } else {
            Step::Retention
        };
    }

    fn retention(&mut self, now: Instant) -> (Step, Option<Action>) {
        let due = self
            .last_retention
            .is_none_or(|t| now.saturating_duration_since(t) > RETAIN_EVERY);
        match self.remote.as_ref() {
            Some((g, _)) if due => {
                self.last_retention = Some(now);
                (Step::End(Ending::Idle), Some(Action::Retain(*g)))
            }
            _ => (Step::End(Ending::Idle), None),
        }
    }

    fn end(&mut self, e: Ending) -> Action {
        self.failures = 0;
        match e {
            Ending::Continue { wake } => Action::Continue { wake },
            Ending::Deferred => Action::Wait(self.compact_after),
            Ending::Idle => {
                self.deferred_since = None;
                Action::Wait(self.compact_after)
            }
        }
    }

    /// After an action failed: [`Action::Retire`] if another instance took the replica over,
    /// else [`Action::Backoff`] (`random` draws the jitter), and the next round looks at the
    /// replica afresh.
    pub(crate) fn failed(&mut self, taken_over: bool, random: u64) -> Action {
        self.step = Step::Begin;
        if taken_over {
            return Action::Retire;
        }
        self.failures = self.failures.saturating_add(1);
        self.trim_due = true;
        // Whatever failed, the replica may not be what we think: look again.
        self.prepared = false;
        self.remote = None;
        Action::Backoff(backoff(self.failures, random))
    }
}

/// The wait after `failures` consecutive failures: 100 ms doubling up to 3.2 s, plus up to a
/// quarter of that drawn from `random`, capped at [`MAX_BACKOFF`].
pub(crate) fn backoff(failures: u32, random: u64) -> Duration {
    let base = 100u64.saturating_mul(1 << failures.min(5));
    let jitter = random % (base / 4 + 1);
    Duration::from_millis(base + jitter).min(MAX_BACKOFF)
}

/// Whether a shutdown's deadline has come.
pub(crate) fn past_deadline(stopping: bool, deadline: Option<Instant>, now: Instant) -> bool {
    stopping && deadline.is_some_and(|d| now >= d)
}

/// The next file to send after `pos`, and the gap on the way if any (see the module doc).
fn next_file(
    pos: Option<Key>,
    files: &[SpoolFile],
    head: Option<Key>,
) -> (Option<SpoolFile>, Option<Gap>) {
    let later: Vec<&SpoolFile> = files
        .iter()
        .filter(|f| pos.is_none_or(|p| f.key() > p))
        .collect();
    let Some(first) = later.first().copied() else {
        // Nothing spooled after us: fine if we hold the head, else (a replica added while
        // walship was stopped, or one whose files were dropped) we need a snapshot.
        let behind = match (head, pos) {
            (Some(h), Some(p)) => p.generation != h.generation || p.last < h.last,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let gap = behind.then_some(Gap::WantSnapshot(
            "replica is behind and nothing newer is spooled",
        ));
        return (None, gap);
    };
    let continuous = match (pos, first.name) {
        (_, FileName::Snapshot { .. }) => true,
        // A spool tail grows (see `spool`): the replica may hold its start.
        (Some(p), FileName::Segment { first: a, .. }) => {
            p.generation == first.generation && a <= p.last + 1
        }
        (None, FileName::Segment { .. }) => false,
    };
    if continuous {
        return (Some(first.clone()), None);
    }
    if let Some(s) = later
        .iter()
        .find(|f| matches!(f.name, FileName::Snapshot { .. }))
    {
        return (Some((*s).clone()), Some(Gap::Resync(s.name)));
    }
    (
        None,
        Some(Gap::WantSnapshot(
            "replica is missing files that are no longer spooled",
        )),
    )
}

/// Whether the live file `name` of generation `g` is what a replica at `pos` takes next: a
/// snapshot (a start or a resynchronisation), or the segment right after `pos`.
fn live_follows(pos: Option<Key>, g: GenerationId, name: &FileName) -> bool {
    match (pos, *name) {
        (p, FileName::Snapshot { .. }) => p.is_none_or(|p| Key::of(g, name) > p),
        (Some(p), FileName::Segment { first, .. }) => p.generation == g && first == p.last + 1,
        (None, FileName::Segment { .. }) => false,
    }
}

/// The run of spooled files to send in one upload, starting at `first`: consecutive segments
/// of one generation are sent as one file (at most [`BATCH_FILES`] files or [`BATCH_BYTES`]), so a
/// replica that fell behind catches up in a few round trips.
fn batch_after(first: &SpoolFile, files: &[SpoolFile]) -> Vec<SpoolFile> {
    let mut batch = vec![first.clone()];
    let FileName::Segment { last: mut end, .. } = first.name else {
        return batch;
    };
    let mut bytes = first.size;
    for f in files.iter().filter(|f| f.key() > first.key()) {
        match f.name {
            FileName::Segment { first: a, last, .. }
                if f.generation == first.generation
                    && a == end + 1
                    && batch.len() < BATCH_FILES
                    && bytes + f.size <= BATCH_BYTES =>
            {
                end = last;
                bytes += f.size;
                batch.push(f.clone());
            }
            _ => break,
        }
    }
    batch
}

#[cfg(test)]
mod tests;
