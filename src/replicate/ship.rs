//! Shipping: one thread per replica uploads spooled files in order, then compacts and prunes
//! what is on the replica. What to do next is decided by the pure `plan::Planner`; this
//! module executes its actions.
//!
//! Invariants:
//! - A replica receives files in [`Key`] order; its position (the key of the last file it
//!   holds durably) is saved only after the upload returned, so a crash re-sends at most one
//!   file. On targets that can append, small uploads grow the replica's newest segment file
//!   in place instead of each creating one ([`Tail`]); a crash or failure between an append
//!   and the position's save re-sends that batch as a new file, which overlaps what the grown
//!   file holds past its name (readers skip commits they applied, see `layout::codec`). The
//!   tail's rename is not durable: before anything is sent, a start renames a tail that holds
//!   more than its name says when the saved position says so ([`Shipper::repair_tail`]).
//! - A batch of spooled files is sent as one file, their bytes one after the other (a
//!   multi-part segment file, see `layout::codec`), never decoded and compressed again.
//! - A spooled file whose start the replica holds (the spool's tail grew since it was
//!   shipped, see `spool`) is sent from where the replica's position ends inside it.
//! - A gap (spooled files dropped by the spool limit, or a replica that never had the
//!   generation's snapshot) is never papered over: the replica skips to a snapshot, or asks
//!   capture for a fresh one and waits for it.
//! - Errors never stop the thread but one: they are recorded in the replica's status, logged
//!   when they change, and retried with exponential backoff capped at `plan::MAX_BACKOFF` (plus
//!   jitter) so catch-up starts within a few seconds of the replica's return. The exception is
//!   [`TakenOver`]: another instance claimed the replica after this one (see `owner`), so this
//!   shipper writes and deletes nothing more there, reports it, and retires (its position no
//!   longer holds spooled files back; it only repeats the error until the daemon stops).
//! - Errors that time does not cure ([`needs_operator`]: the target refused the operation
//!   (`ErrorKind::Other`: permission denied, credentials, host key, space), a replica of another
//!   database ([`ForeignReplica`]), a takeover) are permanent: the status says
//!   `<replica>: permanent: <error> (needs an operator: <what to do>)` ([`PERMANENT`]), and the
//!   log says so at ERROR when it starts, when what to do changes, and every
//!   [`PERMANENT_REPEAT`] while it lasts, never on every retry. They are retried all the same
//!   (but for a takeover), so the replica resumes on its own once the operator fixed it.
//! - One writer per replica: every upload, sweep, compaction and retention runs only while this
//!   instance's claim was found to be the newest within `owner::CLAIM_CHECK`, and the first file
//!   of a generation is preceded by a claim naming it.
//! - A file that capture is still writing live (a snapshot, a big commit) is streamed when it
//!   is the replica's next file; its upload completes only once it is published, and an
//!   abandoned one leaves nothing on the replica (see `spool`).
//! - Compaction uploads the merged file before deleting its inputs; retention only deletes
//!   what [`plan_retention`] allows. A crash in between leaves redundant files, never a gap.
//!   Retention runs only for the replica's owner and never deletes a generation newer than the
//!   owner's current one, so another instance's newer generations are never touched; older
//!   generations (a previous owner's included) age out by the retention policy.
//! - No empty generation directory stays on a replica: a failed upload of a generation's
//!   snapshot (its first file) removes the directory it left empty, and every sweep of
//!   temporary files removes generation directories that hold no file.
//! - Shippers yield the CPU: each thread runs at a nice value 10 above the daemon's
//!   (`SHIP_NICE` in the parent module). Capture is what keeps the application's WAL bounded
//!   and the application's writes unblocked; shipping drains the spool and may lag behind
//!   it for a moment when the CPU is short (a bulk load), never when it is idle.
//! - While an application's bulk load outruns capture, uploads wait for the load to end, at
//!   most [`BULK_DEFER_MAX`] in all until the replica was caught up again (a sustained load
//!   is shipped as it goes, at most that much later), and only while the spool holds less
//!   than half its limit ([`Shipper::defer_for_bulk_load`]). An upload's CPU (its encryption
//!   here, the server's on a shared host) was taken from the load even at nice 10: a 200 MiB
//!   load over sftp took a median 1.25x as long as without walship, against 1.13x deferring
//!   (everything was on the replica 0.26-0.36 s after the load ended instead of
//!   0.04-0.15 s; docs/PERFORMANCE.md, thirty-second session). Small commits, at any rate,
//!   are never held back.

mod plan;

use super::owner::{Ownership, TakenOver};
use super::spool::{Key, LiveFile, Spool, SpoolFile};
use super::state::{ReplicaPosition, StateDir, PERMANENT};
use crate::backend::encrypted::check_marker;
use crate::backend::{Backend, BackendError, ErrorKind};
use crate::clock::now_ms;
use crate::durable::RemoveOnDrop;
use crate::layout::codec::{ends_past_name, Decoder, Encoder, Kind, Record};
use crate::layout::names::{
    file_path, generation_dir, FileName, GenerationId, Marker, GENERATIONS_DIR, MARKER_FILE,
};
use crate::layout::owner::InstanceId;
use crate::layout::plan::{plan_compaction, plan_retention, redundant_segments, Deletion, Listing};
use anyhow::{anyhow, bail, Context, Result};
use plan::{past_deadline, Action, Gap, Planner, Shutdown, View, IDLE_WAIT};
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// How a round goes on after an action (see [`Shipper::execute`]).
enum Flow {
    /// With the planner's next action.
    Step,
    /// It is over: the next round starts at once.
    Done,
    /// It is over, idle: the next starts when the spool changes or at this instant (`None`:
    /// [`IDLE_WAIT`]).
    Idle(Option<Instant>),
    /// The thread ends.
    End,
}

/// What the rest of walship knows about one replica.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplicaStatus {
    /// The replica's name.
    pub name: String,
    /// Key of the last file it holds.
    pub position: Option<Key>,
    /// Capture time of the newest commit it holds.
    pub time_ms: u64,
    /// The last error, while failing.
    pub error: Option<String>,
    /// Set when the shipper stopped for good (another instance took the replica over): its
    /// position no longer holds spooled files back.
    pub retired: bool,
    /// Uploads and failures counted for the metrics.
    pub(crate) metrics: crate::metrics::ReplicaCounters,
    /// While the error is permanent: what to do about it, and when the log last said so.
    pub permanent_logged: Option<(String, Instant)>,
}

/// How often the log repeats a permanent error while it lasts.
pub(crate) const PERMANENT_REPEAT: Duration = Duration::from_secs(300);

/// The replica's marker names another database: a permanent error.
#[derive(Debug, thiserror::Error)]
#[error("{url} holds the replica of {theirs}, not of {ours}: refusing to mix two databases")]
pub(crate) struct ForeignReplica {
    /// The replica.
    pub url: String,
    /// The database its marker names.
    pub theirs: String,
    /// This database's identity.
    pub ours: String,
}

/// What an operator must do about `e`, when retrying cannot cure it; `None` for errors that
/// time may cure (unreachable, timed out, a local problem such as the spool).
pub(crate) fn needs_operator(e: &anyhow::Error) -> Option<String> {
    if let Some(t) = e.downcast_ref::<TakenOver>() {
        return Some(format!(
            "another walship ({}) claimed this replica at {}: stop one of the two, then restart this one (it writes nothing more there until restarted)",
            t.who, t.at
        ));
    }
    if e.downcast_ref::<ForeignReplica>().is_some() {
        return Some(format!(
            "point this replica at another path, or delete {MARKER_FILE} there if the database moved"
        ));
    }
    let refused = e
        .chain()
        .filter_map(|c| c.downcast_ref::<BackendError>())
        .find(|b| b.kind == ErrorKind::Other)?;
    if refused.msg.to_lowercase().contains("permission denied") {
        Some(format!(
            "give the user walship runs as (uid {}) write access there, walship retries meanwhile",
            nix::unistd::getuid()
        ))
    } else {
        Some("fix the cause above (access rights, credentials, host key, free space), walship retries meanwhile".into())
    }
}

/// State shared between capture (main loop) and the shippers.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The mutable part.
    pub(crate) inner: Mutex<Inner>,
    /// Signalled when the spool gets new files, or on stop.
    pub(crate) cv: Condvar,
    /// File events not yet looked at by capture (see [`super::ChangeGate`]).
    pub(crate) changes: super::ChangeGate,
}

/// See [`Shared`].
#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// Set when shutting down: shippers finish what is spooled, then exit.
    pub(crate) stopping: bool,
    /// Shippers give up at this instant even if not caught up.
    pub(crate) deadline: Option<Instant>,
    /// A shipper found a gap and needs a fresh snapshot.
    pub(crate) snapshot_wanted: bool,
    /// Per replica.
    pub(crate) replicas: Vec<ReplicaStatus>,
    /// Bumped whenever the spool changes.
    pub(crate) version: u64,
    /// The newest captured position (set before shippers start, updated after each capture
    /// round, always after the files it covers were spooled).
    pub(crate) head: Option<Key>,
    /// When `head` last moved: compaction waits until the database has been quiet for
    /// [`plan::COMPACT_WHEN_QUIET`], so that it never competes with capture for CPU and disk.
    pub(crate) head_moved: Option<Instant>,
    /// What the main loop's last report saw, for the metrics (see [`Shared::sample`]).
    pub(crate) observed: Option<Observed>,
    /// While the main loop sleeps until a capture that is due: when (see
    /// [`Shared::round_due_soon`]); `None` while it runs a round, or sleeps for anything else.
    pub(crate) round_due: Option<Instant>,
    /// The daemon said it is ready (its replicas caught up after the start, or it gave up
    /// waiting): until then no upload waits for a bulk load (see
    /// [`Shipper::defer_for_bulk_load`]).
    pub(crate) ready: bool,
}

/// A replica's progress wakes the main loop unless a round of its runs within this anyway:
/// the status may then show that progress this late.
const PROGRESS_LATE: Duration = Duration::from_millis(100);

/// Longest a shipper defers an upload while an application's bulk load goes on (see
/// [`Shipper::defer_for_bulk_load`]): a load of up to about this long is shipped after it.
const BULK_DEFER_MAX: Duration = Duration::from_secs(1);

/// A bulk load goes on while capture took a step of its chase within this (steps come every
/// few milliseconds, a round of the main loop between two chases).
const BULK_GAP: Duration = Duration::from_millis(30);

/// How often a shipper that defers an upload looks whether the bulk load is over.
const BULK_POLL: Duration = Duration::from_millis(5);

/// What the main loop's last report saw (see [`Shared::observe`]).
#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// The last commit captured.
    captured_txid: u64,
    /// Bytes in the spool.
    spool_bytes: u64,
    /// Per replica: capture time (Unix ms) of the oldest commit it lacks; `None` when it holds
    /// everything captured.
    behind_since_ms: Vec<Option<u64>>,
}

impl Shared {
    /// Whether the main loop sleeps until a round due within [`PROGRESS_LATE`], which will
    /// see what a shipper recorded before asking (under the same lock): the shipper need not
    /// wake it for a finished upload. While commits stream, captures are due every group
    /// window, and a wake per upload ran a round that captured nothing (the window was not
    /// over) to write nothing (the status waits, see `main_loop::STATUS_EVERY`): 4-8% of
    /// walship's CPU at 100 commits/s over SFTP.
    fn round_due_soon(&self) -> bool {
        self.lock()
            .round_due
            .is_some_and(|t| t <= Instant::now() + PROGRESS_LATE)
    }

    /// Records for the metrics where capture stands and what is `spooled` (after the spool's
    /// maintenance). A replica's lag is measured as `status` measures it: from the capture
    /// time of the first spooled file it lacks (or of the last commit, once no such file is
    /// left).
    pub(crate) fn observe(
        &self,
        at: &super::state::Captured,
        spool: &Spool,
        spooled: &[SpoolFile],
    ) {
        let head = at.key();
        let mut g = self.lock();
        let behind_since_ms = g
            .replicas
            .iter()
            .map(|r| {
                let caught_up = r
                    .position
                    .is_some_and(|p| p.generation == head.generation && p.last >= head.last);
                (!caught_up).then(|| {
                    spool
                        .first_missing_ms(spooled, r.position)
                        .unwrap_or(at.time_ms)
                })
            })
            .collect();
        g.observed = Some(Observed {
            captured_txid: at.txid,
            spool_bytes: spooled.iter().map(|f| f.size).sum(),
            behind_since_ms,
        });
    }

    /// The figures a metrics scrape exports.
    pub(crate) fn sample(&self) -> crate::metrics::Sample {
        let now = now_ms();
        let g = self.lock();
        let replicas = g
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| crate::metrics::ReplicaSample {
                name: r.name.clone(),
                txid: r.position.map(|p| p.last),
                lag_seconds: g.observed.as_ref().map(|o| {
                    o.behind_since_ms
                        .get(i)
                        .copied()
                        .flatten()
                        .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0)
                }),
                up: r.error.is_none(),
                counters: r.metrics.clone(),
            })
            .collect();
        crate::metrics::Sample {
            replicas,
            captured_txid: g.observed.as_ref().map(|o| o.captured_txid),
            spool_bytes: g.observed.as_ref().map(|o| o.spool_bytes),
        }
    }

    /// Locks the inner state (a poisoned lock is recovered: the data stays consistent
    /// because every update is a plain field assignment).
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One replica's shipping thread.
pub(crate) struct Shipper {
    /// Index in `Inner::replicas`.
    pub(crate) idx: usize,
    /// The storage target.
    pub(crate) target: Box<dyn Backend>,
    /// Shared state.
    pub(crate) shared: Arc<Shared>,
    /// The spool.
    pub(crate) spool: Arc<Spool>,
    /// The state directory, which records this replica's position.
    pub(crate) state: StateDir,
    /// Identity written in the marker ("host:/path").
    pub(crate) identity: String,
    /// This instance (its state directory), for the replica's owner claim.
    pub(crate) instance: InstanceId,
    /// Compaction fan-out.
    pub(crate) fanout: usize,
    /// Retention window.
    pub(crate) retention: Duration,
    /// Wakes the main loop after progress.
    pub(crate) wake: Sender<super::Msg>,
    /// The replica's growing tail segment, if the next upload may append to it (see [`Tail`]).
    pub(crate) tail: std::cell::Cell<Option<Tail>>,
    /// Whether [`Shipper::repair_tail`] ran in this process.
    pub(crate) tail_repaired: std::cell::Cell<bool>,
    /// Spool bytes from which uploads are not deferred for a bulk load: half the spool's limit
    /// (see [`Shipper::defer_for_bulk_load`]).
    pub(crate) defer_below: u64,
    /// Whether the next upload may wait for a bulk load (see [`Shipper::defer_for_bulk_load`]).
    pub(crate) deferral: std::cell::Cell<Deferral>,
}

/// Where a shipper stands with deferring uploads for a bulk load (see
/// [`Shipper::defer_for_bulk_load`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deferral {
    /// Uploads go at once until the replica is caught up with the daemon ready: from the start
    /// (a start catches up first), and once a deferral took [`BULK_DEFER_MAX`].
    Spent,
    /// The replica was caught up since: the next upload during a bulk load may wait.
    Ready,
    /// Uploads wait for the bulk load until [`BULK_DEFER_MAX`] after this.
    Since(Instant),
}

/// Largest tail segment appended to: a reader (a follower) reads a tail again after each
/// append, so this bounds what it reads twice.
const TAIL_MAX_BYTES: u64 = 1 << 20;

/// Oldest tail segment appended to: under a stream of commits, about one new file per
/// second on the replica.
const TAIL_MAX_AGE: Duration = Duration::from_secs(1);

/// A level-0 segment this shipper wrote to its replica in this run, which later uploads grow
/// in place on targets that can append (file://, sftp://) instead of each creating a file:
/// the spooled files' bytes are appended as they are (a segment file may be several whole
/// segment files one after the other, see `layout::codec`), made durable, then the file is
/// renamed to its new range. That rename is not durable ([`Backend::rename`]): a power cut
/// there may leave the old name on the grown content while this replica's saved position
/// names the new end, which [`Shipper::repair_tail`] puts right at the next start before
/// anything is sent. A file never written in this run is never appended to, so a
/// torn append a crash left is never written after; a new file is started at every
/// snapshot, gap, failure, compaction, and when the tail reaches [`TAIL_MAX_BYTES`] or
/// [`TAIL_MAX_AGE`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tail {
    generation: GenerationId,
    /// Its name on the replica now.
    name: FileName,
    /// Its size on the replica.
    len: u64,
    /// When it was created.
    started: Instant,
}

impl Shipper {
    fn name(&self) -> String {
        self.shared.lock().replicas[self.idx].name.clone()
    }

    /// Records a transient error (`Some`) or health (`None`); logged when it changes, and
    /// the main loop woken then, so that the status shows it (see [`Shipper::wake_main_loop`]).
    fn set_error(&self, msg: Option<String>) {
        let name = self.name();
        let mut g = self.shared.lock();
        let st = &mut g.replicas[self.idx];
        st.permanent_logged = None;
        if st.error != msg {
            match &msg {
                Some(m) => {
                    error!(replica = %name, error_kind = "replica", "replica {name} failing: {m}")
                }
                None => info!(replica = %name, "replica {name} is healthy again"),
            }
            st.error = msg;
            drop(g);
            self.wake_main_loop();
        }
    }

    /// Wakes the main loop: what this replica's status shows changed, or it needs the loop.
    /// The status is written only in a round, and an idle main loop runs none until a message
    /// comes (a replica healthy again after the wake for its last upload, sent before the
    /// round ends, stayed "failing" in the status until the next commit).
    fn wake_main_loop(&self) {
        let _ = self.wake.send(super::Msg::Progress);
    }

    /// Runs until stopped: rounds of the planner's actions (see `plan`).
    pub(crate) fn run(self) {
        let name = self.name();
        let pos = match self
            .state
            .load_position(&name)
            .map(|p| p.map(|p| (p.key, p.time_ms)))
        {
            Ok(p) => p,
            Err(e) => {
                warn!(replica = %name, "ignoring unreadable position file: {e:#}");
                None
            }
        };
        {
            let mut g = self.shared.lock();
            g.replicas[self.idx].position = pos.map(|p| p.0);
            g.replicas[self.idx].time_ms = pos.map_or(0, |p| p.1);
        }
        if self.target.encryption().is_some() && self.target.readable().is_err() {
            info!(replica = %name, "replica {name} is encrypted to public keys only: its segments are not compacted (restores read one segment per upload since the last snapshot; a shorter snapshot-interval bounds that)");
        }
        let mut owner = Ownership::new(self.instance, self.identity.clone());
        let mut plan = Planner::new(pos.map(|p| p.0), Instant::now());
        while self.round(&mut plan, &mut owner) {}
    }

    /// One round: looks at the spool, then executes the planner's actions until the round
    /// ends. Returns false when the thread must end.
    fn round(&self, plan: &mut Planner, owner: &mut Ownership) -> bool {
        // The head is read before listing the spool, so that every file it covers is in the
        // listing (files are spooled before the head moves); so is the live file, so that
        // every file published before it is in the listing too.
        let live = self.spool.live();
        let head = self.shared.lock().head;
        let files = match self.spool.list() {
            Ok(f) => f,
            Err(e) => {
                self.set_error(Some(format!("{e:#}")));
                Vec::new()
            }
        };
        let live_name = live.as_ref().map(|l| (l.generation, l.name));
        match plan.begin(View {
            files,
            head,
            live: live_name,
        }) {
            Some(Gap::Resync(s)) => {
                warn!(replica = %self.name(), "replica missed spooled files (spool limit or a new replica); resynchronising from snapshot {s}")
            }
            Some(Gap::WantSnapshot(why)) => self.want_snapshot(why),
            None => {}
        }
        let (shutdown, version) = {
            let g = self.shared.lock();
            let shutdown = Shutdown {
                stopping: g.stopping,
                deadline: g.deadline,
            };
            (shutdown, g.version)
        };
        loop {
            let head_moved = self.shared.lock().head_moved;
            let action = plan.next(shutdown, head_moved, Instant::now());
            match self.execute(action, plan, owner, live.as_ref()) {
                Ok(Flow::Step) => {}
                Ok(Flow::Done) => {
                    self.set_error(None);
                    return true;
                }
                Ok(Flow::Idle(until)) => {
                    self.set_error(None);
                    // Caught up: the next bulk load may hold uploads back again, once the
                    // daemon is ready (a shipper is idle for a moment while a start catches
                    // up behind a load, and deferring then delayed the start by a second).
                    if self.shared.lock().ready {
                        self.deferral.set(Deferral::Ready);
                    }
                    self.wait(version, until);
                    return true;
                }
                Ok(Flow::End) => return false,
                Err(e) => return self.fail(plan, e),
            }
        }
    }

    /// Executes one action (see [`Action`]), reporting its outcome to `plan`.
    fn execute(
        &self,
        action: Action,
        plan: &mut Planner,
        owner: &mut Ownership,
        live: Option<&Arc<LiveFile>>,
    ) -> Result<Flow> {
        let target = self.target.as_ref();
        match action {
            Action::Stop { sweep } => {
                if sweep {
                    let swept = owner
                        .verify_if_stale(target)
                        .and_then(|()| self.remove_temps());
                    if let Err(e) = swept {
                        debug!(replica = %self.name(), "temporary files not swept at stop: {e:#}");
                    }
                }
                return Ok(Flow::End);
            }
            Action::Prepare(generation) => self.prepare(owner, generation)?,
            Action::StreamLive => self.stream(plan, owner, live)?,
            Action::Upload(batch) => {
                let f = batch
                    .first()
                    .ok_or_else(|| anyhow!("internal: empty batch"))?;
                owner.before_write(target, f.generation)?;
                self.defer_for_bulk_load();
                match self.upload_batch(&batch, plan.position())? {
                    Some((sent, replaced)) => {
                        if let Some(old) = replaced {
                            plan.replaced(f.generation, old);
                        }
                        self.sent(plan, &batch, sent)?;
                    }
                    // Dropped by the spool limit meanwhile: the next round sees the gap.
                    None => plan.not_streamed(),
                }
            }
            Action::ListRemote(g) => plan.listed(g, self.remote_files(&g)?),
            Action::TrimHeap => super::trim_heap(),
            Action::SweepTemps => {
                owner.verify_if_stale(target)?;
                self.remove_temps()?;
            }
            Action::Compact => {
                // Compaction may merge the tail away: the next upload starts a new file.
                self.tail.set(None);
                owner.verify_if_stale(target)?;
                let did = match plan.remote_mut() {
                    Some((g, files)) => self.compact(g, files)?,
                    None => false,
                };
                plan.compacted(did);
            }
            Action::Retain(g) => {
                self.tail.set(None);
                owner.verify_if_stale(target)?;
                self.retain(&g)?;
            }
            Action::Continue { wake } => {
                if wake && !self.shared.round_due_soon() {
                    self.wake_main_loop();
                }
                return Ok(Flow::Done);
            }
            Action::Wait(until) => return Ok(Flow::Idle(until)),
            Action::Retire | Action::Backoff(_) => bail!("internal: {action:?} outside a failure"),
        }
        Ok(Flow::Step)
    }

    /// Streams the live file, which the planner found to follow the replica's position.
    fn stream(
        &self,
        plan: &mut Planner,
        owner: &mut Ownership,
        live: Option<&Arc<LiveFile>>,
    ) -> Result<()> {
        let l = live.ok_or_else(|| anyhow!("internal: no live file to stream"))?;
        self.tail.set(None);
        owner.before_write(self.target.as_ref(), l.generation)?;
        match self.upload_live(l)? {
            Some(f) => self.sent(plan, std::slice::from_ref(&f), f.name),
            None => {
                plan.not_streamed();
                Ok(())
            }
        }
    }

    /// Records that the replica holds `batch` (sent as `sent`): its position, durably, then in
    /// the status.
    fn sent(&self, plan: &mut Planner, batch: &[SpoolFile], sent: FileName) -> Result<()> {
        let last = batch
            .last()
            .ok_or_else(|| anyhow!("internal: empty batch"))?;
        let time_ms = last.name.last_ms();
        plan.sent(batch, sent);
        let at = ReplicaPosition {
            key: last.key(),
            time_ms,
            received_ms: Some(now_ms()),
        };
        self.state.save_position(&self.name(), &at)?;
        {
            let mut g = self.shared.lock();
            g.replicas[self.idx].position = Some(last.key());
            g.replicas[self.idx].time_ms = time_ms;
            let bytes = batch.iter().map(|f| f.size).sum();
            g.replicas[self.idx].metrics.uploaded(bytes, now_ms());
        }
        Ok(())
    }

    /// Idle: waits until the spool changes (its version is no longer `version`), a stop, or
    /// `until` (`None`: [`IDLE_WAIT`]).
    fn wait(&self, version: u64, until: Option<Instant>) {
        let g = self.shared.lock();
        if g.version == version && !g.stopping {
            let timeout = until.map_or(IDLE_WAIT, |t| t.saturating_duration_since(Instant::now()));
            let _ = self
                .shared
                .cv
                .wait_timeout(g, timeout)
                .map(|(g, _)| drop(g));
        }
    }

    /// Records `e`: a transient error as [`Shipper::set_error`] does; a permanent one (see
    /// [`needs_operator`]) with [`PERMANENT`] and what to do, logged when it starts, when what
    /// to do changes, and every [`PERMANENT_REPEAT`], whatever its text does (a path with a
    /// temporary name changes on every retry).
    fn report(&self, e: &anyhow::Error) {
        let Some(todo) = needs_operator(e) else {
            self.set_error(Some(format!("{e:#}")));
            return;
        };
        // `; ` separates the status's failing entries.
        let text = format!("{PERMANENT}{e:#} (needs an operator: {todo})").replace("; ", ", ");
        let name = self.name();
        let mut g = self.shared.lock();
        let st = &mut g.replicas[self.idx];
        let due = st
            .permanent_logged
            .as_ref()
            .is_none_or(|(t, at)| *t != todo || at.elapsed() >= PERMANENT_REPEAT);
        if due {
            error!(replica = %name, error_kind = "replica-permanent", "replica {name} failing: {text}");
            st.permanent_logged = Some((todo, Instant::now()));
        }
        if st.error.as_ref() != Some(&text) {
            st.error = Some(text);
            drop(g);
            self.wake_main_loop();
        }
    }

    /// After a failed action: records the error, and either retires the shipper (another
    /// instance took the replica over) or backs off. Returns false when the thread must end.
    fn fail(&self, plan: &mut Planner, e: anyhow::Error) -> bool {
        // What the failed action left on the replica is unknown: start a new file.
        self.tail.set(None);
        let taken_over = e.downcast_ref::<TakenOver>().is_some();
        let action = plan.failed(taken_over, rand::random());
        self.shared.lock().replicas[self.idx]
            .metrics
            .failed(&e, taken_over);
        self.report(&e);
        match action {
            Action::Backoff(d) => {
                self.wake_main_loop();
                self.back_off(Instant::now() + d)
            }
            _ => {
                // Retired, permanently: the other instance owns the replica now. Nothing more
                // is written or deleted there; the error stays in the status, and in the log
                // every PERMANENT_REPEAT, until the daemon stops.
                self.shared.lock().replicas[self.idx].retired = true;
                self.wake_main_loop();
                while self.sleep_unless_stopping(Instant::now() + PERMANENT_REPEAT) {
                    self.report(&e);
                }
                false
            }
        }
    }

    /// While an application's bulk load outruns capture ([`Spool::bulk_load`]), waits
    /// before an upload until the load ends, and only while the spool holds less than
    /// `defer_below` bytes (see the module doc): the shipper's and the server's CPU then go to
    /// the application's load, and the spool's limit stays far. Uploads wait
    /// [`BULK_DEFER_MAX`] in all between two moments the replica was caught up, so that a
    /// sustained load is shipped as it goes, at most that much later; none waits before the
    /// daemon is ready. Returns at once when the daemon stops.
    fn defer_for_bulk_load(&self) {
        let deferring = || self.spool.bulk_load(BULK_GAP) && self.spool.bytes() < self.defer_below;
        let began = Instant::now();
        let since = match self.deferral.get() {
            Deferral::Spent => return,
            Deferral::Ready if deferring() => began,
            Deferral::Ready => return,
            Deferral::Since(t) => t,
        };
        self.deferral.set(Deferral::Since(since));
        let until = since + BULK_DEFER_MAX;
        while deferring() {
            let now = Instant::now();
            if now >= until {
                self.deferral.set(Deferral::Spent);
                break;
            }
            if !self.sleep_unless_stopping((now + BULK_POLL).min(until)) {
                break;
            }
        }
        let waited = began.elapsed();
        if waited >= BULK_POLL {
            debug!(
                waited_ms = waited.as_millis() as u64,
                spool_bytes = self.spool.bytes(),
                "an upload waited for a bulk load"
            );
        }
    }

    /// Sleeps until `until`; returns false at once if the daemon is stopping.
    fn sleep_unless_stopping(&self, until: Instant) -> bool {
        let mut g = self.shared.lock();
        loop {
            if g.stopping {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            g = match self.shared.cv.wait_timeout(g, until - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Sleeps until `until` whatever the spool does: new spooled files must not shorten a
    /// backoff. Returns false if a shutdown's deadline came first.
    fn back_off(&self, until: Instant) -> bool {
        let mut g = self.shared.lock();
        loop {
            if past_deadline(g.stopping, g.deadline, Instant::now()) {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            g = match self.shared.cv.wait_timeout(g, until - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Uploads one file, or a batch as one multi-part segment file (its files one after the
    /// other), or appends the batch to the tail segment (see [`Tail`]); returns the name sent
    /// and the name it replaced on the replica,
    /// or `None` if the first file left the spool meanwhile (the spool limit dropped it).
    /// A replica at `pos` may hold the start of the batch's first file (a spool tail that grew
    /// since it was shipped): only the rest is sent when the spool knows where it starts (see
    /// [`Spool::piece`]), else the whole file (readers skip the commits they applied).
    fn upload_batch(
        &self,
        batch: &[SpoolFile],
        pos: Option<Key>,
    ) -> Result<Option<(FileName, Option<FileName>)>> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            bail!("internal: empty batch");
        };
        let piece = self.piece(first, pos);
        if let Some((name, old)) = self.append_to_tail(batch, piece)? {
            return Ok(Some((name, Some(old))));
        }
        let (
            FileName::Segment {
                first: a, first_ms, ..
            },
            FileName::Segment {
                last: b, last_ms, ..
            },
        ) = (first.name, last.name)
        else {
            // A snapshot: always alone in its batch.
            return Ok(self
                .upload(first, 0, first.name)?
                .map(|_| (first.name, None)));
        };
        let (offset, a, first_ms) = piece.unwrap_or((0, a, first_ms));
        let name = FileName::Segment {
            level: 0,
            first: a,
            last: b,
            first_ms,
            last_ms,
        };
        if batch.len() == 1 {
            let Some(len) = self.upload(first, offset, name)? else {
                return Ok(None);
            };
            self.new_tail(first.generation, name, len);
            return Ok(Some((name, None)));
        }
        // The batch's files one after the other, each a run of whole parts (the first from
        // the piece the replica lacks, each only as far as it is published: capture may be
        // appending to the last): one multi-part segment file (see `layout::codec`), sent
        // as it is in the spool, without decoding and compressing it again.
        // One file open at a time, as it is reached (a batch may hold many).
        let open = |f: &SpoolFile, from: u64| -> std::io::Result<std::io::Take<std::fs::File>> {
            let path = self.spool.path(&f.generation, &f.name);
            let named = |e: std::io::Error| {
                std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
            };
            let mut src = self.spool.open_file(f).map_err(named)?;
            src.seek(SeekFrom::Start(from)).map_err(named)?;
            Ok(src.take(f.size.saturating_sub(from)))
        };
        let head = match open(first, offset) {
            Ok(r) => r,
            // Dropped by the spool limit meanwhile: the next round sees the gap.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut rest = batch[1..].iter();
        let mut concatenated = Concatenated {
            current: head,
            next: move || rest.next().map(|f| open(f, 0)),
        };
        let dest = file_path(&first.generation, &name);
        let len = self
            .target
            .write_atomic(&dest, &mut concatenated)
            .map_err(|e| upload_error(e.into(), &dest))?;
        let want: u64 = batch.iter().map(|f| f.size).sum::<u64>() - offset;
        if len != want {
            bail!("{dest}: sent {len} bytes of the spooled {want}: a spool file shrank while it was read");
        }
        self.new_tail(first.generation, name, len);
        Ok(Some((name, None)))
    }

    /// Where in spooled file `f` the commits a replica at `pos` lacks start, if it holds the
    /// file's first commits: (offset, first txid, its time), `None` to send the whole file.
    fn piece(&self, f: &SpoolFile, pos: Option<Key>) -> Option<(u64, u64, u64)> {
        let p = pos.filter(|p| {
            p.generation == f.generation
                && f.name.first_txid() <= p.last
                && p.last < f.name.last_txid()
        })?;
        let (offset, ms) = self.spool.piece(f, p.last + 1)?;
        Some((offset, p.last + 1, ms))
    }

    /// After `name` (`len` bytes) was written to the replica: the next upload may append to
    /// it if it is a level-0 segment and the target can append.
    fn new_tail(&self, generation: GenerationId, name: FileName, len: u64) {
        let level0 = matches!(name, FileName::Segment { level: 0, .. });
        self.tail
            .set((level0 && self.target.can_append()).then(|| Tail {
                generation,
                name,
                len,
                started: Instant::now(),
            }));
    }

    /// Appends `batch` (level-0 segments; its first one from `piece`, see
    /// [`Shipper::upload_batch`]) to the tail segment if it continues it and the tail is young
    /// and small enough (see [`Tail`]): the spooled bytes, fsynced, then the tail renamed to
    /// its new range. Returns the new name and the old one, or `None` when the batch is to
    /// start a new file.
    fn append_to_tail(
        &self,
        batch: &[SpoolFile],
        piece: Option<(u64, u64, u64)>,
    ) -> Result<Option<(FileName, FileName)>> {
        let Some(t) = self.tail.take() else {
            return Ok(None);
        };
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            bail!("internal: empty batch");
        };
        let FileName::Segment {
            first: a,
            last: b,
            first_ms,
            ..
        } = t.name
        else {
            return Ok(None);
        };
        let (offset, from) = piece.map_or((0, first.name.first_txid()), |(o, t, _)| (o, t));
        let bytes: u64 = batch.iter().map(|f| f.size).sum::<u64>() - offset;
        let continues = first.generation == t.generation
            && from == b + 1
            && batch
                .iter()
                .all(|f| matches!(f.name, FileName::Segment { level: 0, .. }));
        if !continues || t.len + bytes > TAIL_MAX_BYTES || t.started.elapsed() >= TAIL_MAX_AGE {
            return Ok(None);
        }
        let mut data = Vec::with_capacity(usize::try_from(bytes).unwrap_or(0));
        for (i, f) in batch.iter().enumerate() {
            let skip = if i == 0 { offset } else { 0 };
            let path = self.spool.path(&f.generation, &f.name);
            let mut src = match self.spool.open_file(f) {
                Ok(src) => src,
                // Dropped by the spool limit meanwhile: the normal path handles it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
            };
            // Only what is published: capture may be appending to it.
            let want = f.size.saturating_sub(skip);
            let n = src
                .seek(SeekFrom::Start(skip))
                .and_then(|_| src.take(want).read_to_end(&mut data))
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n as u64 != want {
                bail!("spool file {} is shorter than spooled", path.display());
            }
        }
        let old = file_path(&t.generation, &t.name);
        self.target
            .append(&old, t.len, &data)
            .map_err(|e| upload_error(e.into(), &old))?;
        let name = FileName::Segment {
            level: 0,
            first: a,
            last: last.name.last_txid(),
            first_ms,
            last_ms: last.name.last_ms(),
        };
        let new = file_path(&t.generation, &name);
        self.target
            .rename(&old, &new)
            .map_err(|e| upload_error(e.into(), &new))?;
        self.tail.set(Some(Tail {
            name,
            len: t.len + bytes,
            ..t
        }));
        Ok(Some((name, t.name)))
    }

    /// Asks the main loop for a fresh snapshot, and wakes it: an idle main loop sleeps until
    /// the snapshot interval, so without the wake a lagging replica would wait that long (the
    /// wake after the previous upload may already have been consumed).
    fn want_snapshot(&self, why: &str) {
        let mut g = self.shared.lock();
        if g.snapshot_wanted {
            return; // asked already; the main loop has not taken it yet
        }
        warn!(replica = %g.replicas[self.idx].name, "{why}; asking for a fresh snapshot");
        g.snapshot_wanted = true;
        drop(g);
        self.wake_main_loop();
    }

    /// Checks or writes the marker, claims the replica (first time in this process: a new
    /// claim naming `generation`, the replica's position) or checks the claim (after an error),
    /// and removes temporary files an earlier run left.
    fn prepare(&self, owner: &mut Ownership, generation: Option<GenerationId>) -> Result<()> {
        let url = self.target.url();
        match self.target.read(MARKER_FILE) {
            Ok(mut r) => {
                let mut text = String::new();
                r.by_ref()
                    .take(64 << 10)
                    .read_to_string(&mut text)
                    .with_context(|| format!("cannot read {url}/{MARKER_FILE}"))?;
                let m = Marker::parse(&text).map_err(|e| anyhow!("{url}/{MARKER_FILE}: {e}"))?;
                check_marker(self.target.as_ref(), m.encryption.as_deref())?;
                if m.database != self.identity {
                    return Err(ForeignReplica {
                        url,
                        theirs: m.database,
                        ours: self.identity.clone(),
                    }
                    .into());
                }
            }
            Err(e) if e.kind == ErrorKind::NotFound => {
                let m = Marker {
                    format: 1,
                    database: self.identity.clone(),
                    created_ms: now_ms(),
                    encryption: self.target.encryption().map(str::to_owned),
                };
                self.target
                    .write_atomic(MARKER_FILE, &mut m.to_toml().as_bytes())?;
                info!(replica = %self.name(), "initialised replica {url}");
            }
            Err(e) => return Err(e.into()),
        }
        if owner.has_claimed() {
            owner.verify(self.target.as_ref())?;
        } else {
            owner.claim(self.target.as_ref(), generation)?;
        }
        if !self.tail_repaired.get() {
            self.repair_tail()?;
            self.tail_repaired.set(true);
        }
        self.remove_temps()
    }

    /// Once per process, before anything is sent: if this replica's saved position is past
    /// every name of its generation on the replica, the newest level-0 segment there may hold
    /// more than its name says (a tail's rename lost to a power cut, see [`Tail`]); it is read
    /// and renamed to the range of its last whole part. Sending on from the position without
    /// this would leave a gap between names that restores refuse. Only targets that can
    /// append grow tails.
    fn repair_tail(&self) -> Result<()> {
        if !self.target.can_append() {
            return Ok(());
        }
        let Some(pos) = self.shared.lock().replicas[self.idx].position else {
            return Ok(());
        };
        let files = self.remote_files(&pos.generation)?;
        let named_end = files.iter().map(FileName::last_txid).max();
        if named_end.is_none_or(|end| end >= pos.last) {
            return Ok(());
        }
        let Some(old) = files
            .iter()
            .filter(|f| matches!(f, FileName::Segment { level: 0, .. }))
            .max_by_key(|f| f.last_txid())
            .copied()
        else {
            return Ok(());
        };
        let FileName::Segment {
            first,
            last,
            first_ms,
            ..
        } = old
        else {
            return Ok(());
        };
        let path = file_path(&pos.generation, &old);
        let url = self.target.url();
        let mut dec = self
            .target
            .read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|r| Ok(Decoder::new(r, Kind::Segment)?))
            .with_context(|| format!("cannot read {url}/{path}"))?;
        // Whole parts only: a torn or damaged last part ends what the file holds.
        while let Ok(Some(_)) = dec.next() {}
        let Some(end) = dec.last_complete().filter(|c| c.txid > last) else {
            warn!(replica = %self.name(), "the saved position (txid {}) is past what {url}/{path} holds: sending on from the position", pos.last);
            return Ok(());
        };
        let name = FileName::Segment {
            level: 0,
            first,
            last: end.txid,
            first_ms,
            last_ms: end.time_ms,
        };
        let new = file_path(&pos.generation, &name);
        self.target
            .rename(&path, &new)
            .map_err(|e| upload_error(e.into(), &new))?;
        info!(replica = %self.name(), "renamed {url}/{path} to {new}: it holds commits up to txid {} (a rename was lost, by a power cut on the replica's host?)", end.txid);
        Ok(())
    }

    /// Removes temporary files of interrupted uploads from the root and every generation. Safe
    /// whenever this shipper is not uploading and owns the replica (callers check the claim
    /// first, see `owner`): it is then the replica's only writer. Run at start, after
    /// every error, every [`plan::TEMP_SWEEP`] while idle and at a clean stop, because a connection
    /// that was cut can still deliver an upload's first requests to the server after the
    /// reconnection's sweep (a blackholed link's queued data reaches the old server session
    /// once the link heals).
    fn remove_temps(&self) -> Result<()> {
        // The root too: owner claims and the marker are written there.
        let n = self.target.cleanup("")?;
        if n > 0 {
            info!(replica = %self.name(), "removed {n} temporary file(s) left by an interrupted claim");
        }
        for g in self.target.list(GENERATIONS_DIR)? {
            let Ok(id) = g.name.parse::<GenerationId>() else {
                continue;
            };
            if g.is_dir {
                let n = self
                    .target
                    .cleanup(&format!("{GENERATIONS_DIR}/{}", g.name))?;
                if n > 0 {
                    info!(replica = %self.name(), "removed {n} temporary file(s) left by an interrupted upload");
                }
                self.remove_if_empty(&id)?;
            }
        }
        Ok(())
    }

    /// Removes the directory of generation `g` if it holds no file: an upload that failed
    /// before a generation's first file arrived leaves one (the upload creates it), and a
    /// generation without files is of no use to anyone.
    fn remove_if_empty(&self, g: &GenerationId) -> Result<()> {
        let dir = generation_dir(g);
        if self.target.list(&dir)?.is_empty() {
            self.target.remove_dir(&dir)?;
            debug!(replica = %self.name(), "removed the empty directory of generation {g}");
        }
        Ok(())
    }

    /// After a failed upload of `name` in generation `g`: if it was a snapshot (a
    /// generation's first file), removes `g`'s directory when the failed upload left it
    /// empty, and returns `e`. A replica that cannot be reached now is swept once it can
    /// (see [`Shipper::remove_temps`]).
    fn upload_failed(&self, g: &GenerationId, name: &FileName, e: anyhow::Error) -> anyhow::Error {
        let unreachable = e.chain().any(|c| {
            c.downcast_ref::<crate::backend::BackendError>()
                .is_some_and(|t| t.kind == ErrorKind::Unavailable)
        });
        if matches!(name, FileName::Snapshot { .. }) && !unreachable {
            if let Err(re) = self.remove_if_empty(g) {
                debug!(replica = %self.name(), "empty generation {g} not removed yet: {re:#}");
            }
        }
        e
    }

    /// Uploads the spooled file `f` from byte `offset` on as `name`; returns the size written
    /// to the replica, or `None` if the file was not in the spool any more.
    fn upload(&self, f: &SpoolFile, offset: u64, name: FileName) -> Result<Option<u64>> {
        let path = self.spool.path(&f.generation, &f.name);
        let mut src = match self.spool.open_file(f) {
            Ok(s) => s,
            // Dropped by the spool limit while we looked: the next round handles the gap.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        src.seek(SeekFrom::Start(offset))
            .with_context(|| format!("cannot read {}", path.display()))?;
        let dest = file_path(&f.generation, &name);
        let len = self
            .target
            .write_atomic(&dest, &mut src.take(f.size - offset))
            .map_err(|e| self.upload_failed(&f.generation, &name, upload_error(e.into(), &dest)))?;
        Ok(Some(len))
    }

    /// Streams the file capture is writing live to the replica, finishing once it is published
    /// (see `spool`); `None` if capture abandoned it, or published it before it could be opened
    /// (the next listing has it then).
    fn upload_live(&self, l: &Arc<LiveFile>) -> Result<Option<SpoolFile>> {
        let mut reader = match l.reader() {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open live spool file {}", l.name))
            }
        };
        let dest = file_path(&l.generation, &l.name);
        info!(replica = %self.name(), "streaming {} to the replica while it is written", l.name);
        match self.target.write_atomic(&dest, &mut reader) {
            Ok(_) => {}
            Err(e) if l.abandoned() => {
                let _ = self.upload_failed(&l.generation, &l.name, e.into());
                return Ok(None);
            }
            Err(e) => {
                let e = upload_error(e.into(), &dest);
                return Err(self.upload_failed(&l.generation, &l.name, e));
            }
        }
        let size = l
            .published()
            .ok_or_else(|| anyhow!("internal: {} uploaded before it was published", l.name))?;
        Ok(Some(SpoolFile {
            generation: l.generation,
            name: l.name,
            size,
        }))
    }

    fn remote_files(&self, g: &GenerationId) -> Result<Vec<FileName>> {
        Ok(self
            .target
            .list(&generation_dir(g))?
            .into_iter()
            .filter_map(|e| FileName::parse(&e.name).ok())
            .collect())
    }

    /// Merges one run of `fanout` segments into one of the next level, then deletes the
    /// inputs. Returns true if it did anything.
    fn compact(&self, g: &GenerationId, files: &mut Vec<FileName>) -> Result<bool> {
        for r in redundant_segments(files) {
            self.target.delete(&file_path(g, &r))?;
            files.retain(|f| *f != r);
        }
        if self.target.readable().is_err() {
            // Encrypted to public keys only: merging would need to decrypt (see `run`).
            return Ok(false);
        }
        let Some((level, inputs)) = plan_compaction(files, self.fanout) else {
            return Ok(false);
        };
        let (
            Some(FileName::Segment {
                first, first_ms, ..
            }),
            Some(FileName::Segment { last, last_ms, .. }),
        ) = (inputs.first().copied(), inputs.last().copied())
        else {
            return Ok(false);
        };
        let paths: Vec<(String, FileName)> = inputs.iter().map(|i| (file_path(g, i), *i)).collect();
        let (tmp, f) = self.spool.create_temp(g)?;
        let _cleanup = RemoveOnDrop::new(&tmp);
        merge_segments(&paths, |p| Ok(self.target.read(p)?), f, 1)
            .with_context(|| merge_failed(&tmp))?;
        let mut file = std::fs::File::open(&tmp)
            .with_context(|| format!("cannot reopen {}", tmp.display()))?;
        let name = FileName::Segment {
            level,
            first,
            last,
            first_ms,
            last_ms,
        };
        self.target.write_atomic(&file_path(g, &name), &mut file)?;
        for i in &inputs {
            self.target.delete(&file_path(g, i))?;
        }
        files.retain(|f| !inputs.contains(f));
        files.push(name);
        files.sort();
        tracing::debug!(replica = %self.name(), "compacted {} segments into {name}", inputs.len());
        Ok(true)
    }

    /// Applies the retention policy to the replica (the caller has checked that this instance
    /// owns it): generations newer than `current` are kept whoever wrote them.
    fn retain(&self, current: &GenerationId) -> Result<()> {
        let mut listing = Listing {
            generations: Vec::new(),
        };
        for e in self.target.list(GENERATIONS_DIR)? {
            let Ok(g) = e.name.parse::<GenerationId>() else {
                continue;
            };
            let files = self
                .target
                .list(&generation_dir(&g))?
                .into_iter()
                .filter_map(|e| FileName::parse(&e.name).ok().map(|n| (n, e.size)))
                .collect();
            listing.generations.push((g, files));
        }
        let retention_ms = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        for d in plan_retention(&listing, current, now_ms(), retention_ms) {
            match d {
                Deletion::File(g, f) => self.target.delete(&file_path(&g, &f))?,
                Deletion::Generation(g) => {
                    for e in self.target.list(&generation_dir(&g))? {
                        if !e.is_dir {
                            self.target
                                .delete(&format!("{}/{}", generation_dir(&g), e.name))?;
                        }
                    }
                    self.target.remove_dir(&generation_dir(&g))?;
                    info!(replica = %self.name(), "retention removed generation {g}");
                }
            }
        }
        Ok(())
    }
}

/// Decodes the segments read from `inputs` (a path and the file's name) in order and writes
/// them, re-encoded as one segment, to `out` (fsynced). Exactly the named range of each input
/// is merged, fully verified on the way (to the end of the part holding its last commit): a
/// segment file may hold more than its name says (whole parts appended after it, perhaps a torn
/// one), which is left out, so the output holds exactly the run its name will say.
fn merge_segments(
    inputs: &[(String, FileName)],
    open: impl Fn(&str) -> Result<Box<dyn Read + Send>>,
    out: std::fs::File,
    level: i32,
) -> Result<()> {
    let mut enc: Option<Encoder<BufWriter<std::fs::File>>> = None;
    let mut out = Some(out);
    // One input open at a time: memory stays at one decoder whatever the fan-in.
    for (label, name) in inputs {
        let (first, last) = (name.first_txid(), name.last_txid());
        let r = open(label)?;
        let mut dec = Decoder::new(
            std::io::BufReader::with_capacity(128 << 10, r),
            Kind::Segment,
        )
        .map_err(|e| anyhow!("{label}: {e}"))?;
        if enc.is_none() {
            let file = out
                .take()
                .ok_or_else(|| anyhow!("internal: merge output"))?;
            enc = Some(Encoder::new(
                BufWriter::with_capacity(256 << 10, file),
                Kind::Segment,
                dec.page_size(),
                level,
            )?);
        }
        let e = enc
            .as_mut()
            .ok_or_else(|| anyhow!("internal: merge encoder"))?;
        // The next commit the name promises; past `last`, records of the part holding `last`
        // are read (to verify it) but not merged.
        let mut expect = first;
        loop {
            let (rec, done) = match dec.next_placed() {
                Ok(Some(x)) => x,
                Ok(None) => break,
                // A torn or damaged part after the named range is not merged (see `codec`).
                Err(err) => {
                    match ends_past_name(name, dec.last_complete(), &err) {
                        Some(torn) => {
                            debug!("{label}: not merging what follows txid {last} (torn: {torn}): {err}");
                            break;
                        }
                        None => bail!("{label}: {err}"),
                    }
                }
            };
            if done.is_some_and(|c| c.txid >= last) {
                // A part after the named range: not merged.
                break;
            }
            if expect > last {
                continue;
            }
            match rec {
                Record::Page { pgno, data } => e.page(pgno, data)?,
                Record::Commit(c) => {
                    if c.txid != expect {
                        bail!(
                            "{label}: commit txid {} where {expect} was expected from the file name",
                            c.txid
                        );
                    }
                    e.commit(&c)?;
                    expect += 1;
                }
            }
        }
        if expect <= last {
            bail!(
                "{label}: the file ends before txid {expect}, its name says it holds up to {last}"
            );
        }
    }
    let enc = enc.ok_or_else(|| anyhow!("internal: nothing to merge"))?;
    let file = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
}

/// Files read one after the other, each opened only once the one before it is read to its
/// end (`next` gives the following one, `None` after the last).
struct Concatenated<R: Read, N: FnMut() -> Option<std::io::Result<R>>> {
    current: R,
    next: N,
}

impl<R: Read, N: FnMut() -> Option<std::io::Result<R>>> Read for Concatenated<R, N> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match (self.next)() {
                None => return Ok(0),
                Some(r) => self.current = r?,
            }
        }
    }
}

/// What a failed merge into the spool file `tmp` says (its directory: the temporary name
/// changes on every attempt, and a lasting failure must read the same to be logged once).
fn merge_failed(tmp: &std::path::Path) -> String {
    let dir = tmp.parent().unwrap_or(tmp);
    format!(
        "cannot merge segments into a spool file in {}",
        dir.display()
    )
}

/// Names the file in an upload error, unless the target's own message already does.
fn upload_error(e: anyhow::Error, dest: &str) -> anyhow::Error {
    if format!("{e:#}").contains(dest) {
        e
    } else {
        e.context(format!("failed to upload {dest}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_needs_an_operator() {
        let denied: anyhow::Error = BackendError::new(
            ErrorKind::Other,
            "failed to create file:///r/x: Permission denied (os error 13)",
        )
        .into();
        let todo = needs_operator(&denied.context("failed to upload x")).expect("permanent");
        assert!(
            todo.starts_with("give the user walship runs as (uid "),
            "{todo}"
        );
        let down: anyhow::Error =
            BackendError::new(ErrorKind::Unavailable, "connection refused").into();
        assert_eq!(needs_operator(&down), None);
        assert_eq!(needs_operator(&anyhow!("cannot open spool file")), None);
        let foreign: anyhow::Error = ForeignReplica {
            url: "file:///r".into(),
            theirs: "a:/a.db".into(),
            ours: "b:/b.db".into(),
        }
        .into();
        let taken: anyhow::Error = TakenOver {
            url: "file:///r".into(),
            by: InstanceId(7),
            who: "host h, pid 1".into(),
            at: "2026-01-01T00:00:00Z".into(),
        }
        .into();
        let other: anyhow::Error = BackendError::new(ErrorKind::Other, "unknown host key").into();
        for e in [foreign, taken, other] {
            let todo = needs_operator(&e).expect("permanent");
            // `; ` separates the status's failing entries.
            assert!(!todo.contains("; "), "{todo}");
        }
    }
}
