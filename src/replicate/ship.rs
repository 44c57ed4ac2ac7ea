//! Shipping: one thread per replica uploads spooled files in order, then compacts and prunes
//! what is on the replica.
//!
//! Invariants:
//! - A replica receives files in [`Key`] order; its position (the key of the last file it
//!   holds durably) is saved only after `write_atomic` returned, so a crash re-sends at most
//!   one file, under the same name (idempotent).
//! - A gap (spooled files dropped by the spool limit, or a replica that never had the
//!   generation's snapshot) is never papered over: the replica skips to a snapshot, or asks
//!   capture for a fresh one and waits for it.
//! - Errors never stop the thread but one: they are recorded in the replica's status, logged
//!   when they change, and retried with exponential backoff capped at [`MAX_BACKOFF`] (plus
//!   jitter) so catch-up starts within a few seconds of the replica's return. The exception is
//!   [`TakenOver`]: another instance claimed the replica after this one (see `owner`), so this
//!   shipper writes and deletes nothing more there, reports it, and ends (retired: its position
//!   no longer holds spooled files back).
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

use super::owner::{Ownership, TakenOver};
use super::spool::{Key, LiveFile, Spool, SpoolFile};
use super::state::{ReplicaPosition, StateDir};
use crate::backend::{Backend, ErrorKind};
use crate::clock::now_ms;
use crate::durable::RemoveOnDrop;
use crate::layout::codec::{Decoder, Encoder, Kind, Record};
use crate::layout::names::{
    file_path, generation_dir, FileName, GenerationId, Marker, GENERATIONS_DIR, MARKER_FILE,
};
use crate::layout::owner::InstanceId;
use crate::layout::plan::{plan_compaction, plan_retention, redundant_segments, Deletion, Listing};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufWriter, Read};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// Longest wait between two attempts against a failing replica.
pub const MAX_BACKOFF: Duration = Duration::from_millis(3000);

/// How often an idle shipper sweeps the replica for temporary files (see `remove_temps`).
pub const TEMP_SWEEP: Duration = Duration::from_secs(60);
/// Least time between two heap trims after bursts.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// How long the database must go without new commits before a replica is compacted...
pub const COMPACT_WHEN_QUIET: Duration = Duration::from_secs(1);

/// ...but a database that is never quiet still gets compacted this often.
pub const COMPACT_MAX_DEFER: Duration = Duration::from_secs(10);

/// What the rest of walship knows about one replica.
#[derive(Debug, Clone, Default)]
pub struct ReplicaStatus {
    /// The replica's name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// Key of the last file it holds.
    pub position: Option<Key>,
    /// Capture time of the newest commit it holds.
    pub time_ms: u64,
    /// The last error, while failing.
    pub error: Option<String>,
    /// Set when the shipper stopped for good (another instance took the replica over): its
    /// position no longer holds spooled files back.
    pub retired: bool,
}

/// State shared between capture (main loop) and the shippers.
#[derive(Debug, Default)]
pub struct Shared {
    /// The mutable part.
    pub inner: Mutex<Inner>,
    /// Signalled when the spool gets new files, or on stop.
    pub cv: Condvar,
}

/// See [`Shared`].
#[derive(Debug, Default)]
pub struct Inner {
    /// Set when shutting down: shippers finish what is spooled, then exit.
    pub stopping: bool,
    /// Shippers give up at this instant even if not caught up.
    pub deadline: Option<Instant>,
    /// A shipper found a gap and needs a fresh snapshot.
    pub snapshot_wanted: bool,
    /// Per replica.
    pub replicas: Vec<ReplicaStatus>,
    /// Bumped whenever the spool changes.
    pub version: u64,
    /// The newest captured position (set before shippers start, updated after each capture
    /// round, always after the files it covers were spooled).
    pub head: Option<Key>,
    /// When `head` last moved: compaction waits until the database has been quiet for
    /// [`COMPACT_WHEN_QUIET`], so that it never competes with capture for CPU and disk.
    pub head_moved: Option<Instant>,
}

impl Shared {
    /// Locks the inner state (a poisoned lock is recovered: the data stays consistent
    /// because every update is a plain field assignment).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One replica's shipping thread.
pub struct Shipper {
    /// Index in `Inner::replicas`.
    pub idx: usize,
    /// The storage target.
    pub target: Box<dyn Backend>,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The spool.
    pub spool: Arc<Spool>,
    /// The state directory, which records this replica's position.
    pub state: StateDir,
    /// Identity written in the marker ("host:/path").
    pub identity: String,
    /// This instance (its state directory), for the replica's owner claim.
    pub instance: InstanceId,
    /// Compaction fan-out.
    pub fanout: usize,
    /// Retention window.
    pub retention: Duration,
    /// Wakes the main loop after progress.
    pub wake: Sender<super::Msg>,
}

impl Shipper {
    fn name(&self) -> String {
        self.shared.lock().replicas[self.idx].name.clone()
    }

    fn set_error(&self, msg: Option<String>) {
        let name = self.name();
        let mut g = self.shared.lock();
        let st = &mut g.replicas[self.idx];
        if st.error != msg {
            match &msg {
                Some(m) => {
                    error!(replica = %name, error_kind = "replica", "replica {name} failing: {m}")
                }
                None => info!(replica = %name, "replica {name} is healthy again"),
            }
            st.error = msg;
        }
    }

    /// Runs until stopped.
    pub fn run(self) {
        let name = self.name();
        let mut pos = match self
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
        let mut prepared = false;
        let mut owner = Ownership::new(self.instance, self.identity.clone());
        let mut failures: u32 = 0;
        let mut remote: Option<(GenerationId, Vec<FileName>)> = None;
        let mut last_retention = Instant::now() - Duration::from_secs(3600);
        let mut last_sweep = Instant::now();
        // Set while compaction waits for the database to be quiet, and since when it waits.
        let mut compact_after: Option<Instant> = None;
        let mut deferred_since: Option<Instant> = None;
        // Set by a burst (a merged backlog, a compaction, a failure): the heap is trimmed once
        // the replica is caught up again, at most every TRIM_EVERY (trimmed pages fault in
        // again when reused).
        let mut trim_due = false;
        let mut last_trim = Instant::now();
        loop {
            // Work out the next file, or wait.
            // The head is read before listing the spool, so that every file it covers is in
            // the listing (files are spooled before the head moves); so is the live file, so
            // that every file published before it is in the listing too.
            let live = self.spool.live();
            let head_before = self.shared.lock().head;
            let files = match self.spool.list() {
                Ok(f) => f,
                Err(e) => {
                    self.set_error(Some(format!("{e:#}")));
                    Vec::new()
                }
            };
            let next = self.next_file(pos.map(|p| p.0), &files, head_before);
            let version = {
                let g = self.shared.lock();
                if g.stopping && (next.is_none() || g.deadline.is_some_and(|d| Instant::now() >= d))
                {
                    drop(g);
                    if prepared && next.is_none() {
                        let swept = owner
                            .verify_if_stale(self.target.as_ref())
                            .and_then(|()| self.remove_temps());
                        if let Err(e) = swept {
                            debug!(replica = %self.name(), "temporary files not swept at stop: {e:#}");
                        }
                    }
                    return;
                }
                g.version
            };
            let result = (|| -> Result<bool> {
                if !prepared {
                    self.prepare(&mut owner, pos.map(|p| p.0.generation))?;
                    prepared = true;
                }
                // Nothing spooled to send: the file capture is writing may be next.
                let mut streamed = false;
                let next = match (next, live.filter(|l| live_follows(pos.map(|p| p.0), l))) {
                    (None, Some(l)) => {
                        owner.before_write(self.target.as_ref(), l.generation)?;
                        match self.upload_live(&l)? {
                            Some(f) => {
                                streamed = true;
                                Some(f)
                            }
                            // Abandoned, or published meanwhile: look again.
                            None => return Ok(true),
                        }
                    }
                    (next, _) => next,
                };
                let Some(f) = next else {
                    if trim_due && last_trim.elapsed() >= TRIM_EVERY {
                        super::trim_heap();
                        trim_due = false;
                        last_trim = Instant::now();
                    }
                    // Idle: housekeeping on the replica's current generation.
                    if remote.is_none() {
                        if let Some((k, _)) = pos {
                            remote = Some((k.generation, self.remote_files(&k.generation)?));
                        }
                    }
                    if last_sweep.elapsed() > TEMP_SWEEP {
                        last_sweep = Instant::now();
                        owner.verify_if_stale(self.target.as_ref())?;
                        self.remove_temps()?;
                    }
                    // Compaction waits for the database to be quiet, but not for ever: a
                    // database that is never quiet is compacted at least every
                    // COMPACT_MAX_DEFER.
                    let now = Instant::now();
                    let since = *deferred_since.get_or_insert(now);
                    let quiet_at = self
                        .shared
                        .lock()
                        .head_moved
                        .map(|t| t + COMPACT_WHEN_QUIET);
                    if let Some(q) = quiet_at.filter(|q| *q > now) {
                        if now < since + COMPACT_MAX_DEFER {
                            compact_after = Some(q.min(since + COMPACT_MAX_DEFER));
                            return Ok(false);
                        }
                    }
                    compact_after = None;
                    if let Some((g, files)) = remote.as_mut() {
                        owner.verify_if_stale(self.target.as_ref())?;
                        if self.compact(g, files)? {
                            trim_due = true;
                            // More may be due (once overdue, compaction goes on until done);
                            // new spooled files still come first.
                            return Ok(true);
                        }
                        if last_retention.elapsed() > Duration::from_secs(600) {
                            last_retention = Instant::now();
                            owner.verify_if_stale(self.target.as_ref())?;
                            self.retain(g)?;
                        }
                    }
                    deferred_since = None;
                    return Ok(false);
                };
                let (batch, sent) = if streamed {
                    (vec![f.clone()], f.name)
                } else {
                    owner.before_write(self.target.as_ref(), f.generation)?;
                    let batch = self.batch_after(&f, &files);
                    let sent = self.upload_batch(&batch)?;
                    (batch, sent)
                };
                trim_due |= batch.len() > 1;
                let last = batch.last().unwrap_or(&f);
                let time_ms = last.name.last_ms();
                pos = Some((last.key(), time_ms));
                let at = ReplicaPosition {
                    key: last.key(),
                    time_ms,
                    received_ms: Some(crate::clock::now_ms()),
                };
                self.state.save_position(&name, &at)?;
                {
                    let mut g = self.shared.lock();
                    g.replicas[self.idx].position = Some(last.key());
                    g.replicas[self.idx].time_ms = time_ms;
                }
                match remote.as_mut() {
                    Some((g, files)) if *g == last.generation => files.push(sent),
                    _ => {
                        if matches!(f.name, FileName::Snapshot { .. }) {
                            last_retention = Instant::now() - Duration::from_secs(3600);
                        }
                        remote = Some((last.generation, self.remote_files(&last.generation)?));
                    }
                }
                let _ = self.wake.send(super::Msg::Progress);
                Ok(true)
            })();
            match result {
                Ok(true) => {
                    failures = 0;
                    self.set_error(None);
                    continue;
                }
                Ok(false) => {
                    failures = 0;
                    self.set_error(None);
                    let g = self.shared.lock();
                    if g.version == version && !g.stopping {
                        let timeout = compact_after.map_or(Duration::from_secs(300), |t| {
                            t.saturating_duration_since(Instant::now())
                        });
                        let _ = self
                            .shared
                            .cv
                            .wait_timeout(g, timeout)
                            .map(|(g, _)| drop(g));
                    }
                }
                Err(e) if e.downcast_ref::<TakenOver>().is_some() => {
                    // Permanent: the other instance owns the replica now. Nothing more is
                    // written or deleted there; the error stays in the status until restart.
                    self.set_error(Some(format!("{e:#}")));
                    self.shared.lock().replicas[self.idx].retired = true;
                    let _ = self.wake.send(super::Msg::Progress);
                    return;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    trim_due = true;
                    // Whatever failed, the replica may not be what we think: look again.
                    prepared = false;
                    remote = None;
                    self.set_error(Some(format!("{e:#}")));
                    let _ = self.wake.send(super::Msg::Progress);
                    let base = 100u64.saturating_mul(1 << failures.min(5));
                    let jitter = rand::random::<u64>() % (base / 4 + 1);
                    let until =
                        Instant::now() + Duration::from_millis(base + jitter).min(MAX_BACKOFF);
                    // Sleep the whole backoff: new spooled files must not shorten it.
                    let mut g = self.shared.lock();
                    loop {
                        if g.stopping && g.deadline.is_some_and(|d| Instant::now() >= d) {
                            return;
                        }
                        let now = Instant::now();
                        if now >= until {
                            break;
                        }
                        g = match self.shared.cv.wait_timeout(g, until - now) {
                            Ok((g, _)) => g,
                            Err(p) => p.into_inner().0,
                        };
                    }
                }
            }
        }
    }

    /// The run of spooled files to send in one upload, starting at `first`: consecutive
    /// segments of one generation are merged (at most [`BATCH_FILES`] files or
    /// [`BATCH_BYTES`]), so a replica that fell behind catches up in a few round trips.
    fn batch_after(&self, first: &SpoolFile, files: &[SpoolFile]) -> Vec<SpoolFile> {
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

    /// Uploads one file, or a merged segment for a batch; returns the name sent.
    fn upload_batch(&self, batch: &[SpoolFile]) -> Result<FileName> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            bail!("internal: empty batch");
        };
        if batch.len() == 1 {
            self.upload(first)?;
            return Ok(first.name);
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
            bail!("internal: a batch holds only segments");
        };
        let name = FileName::Segment {
            level: 0,
            first: a,
            last: b,
            first_ms,
            last_ms,
        };
        let inputs: Vec<String> = batch
            .iter()
            .map(|f| {
                self.spool
                    .path(&f.generation, &f.name)
                    .display()
                    .to_string()
            })
            .collect();
        let (tmp, file) = self.spool.create_temp(&first.generation)?;
        let _cleanup = RemoveOnDrop::new(&tmp);
        merge_segments(
            &inputs,
            |p| {
                let f = std::fs::File::open(p).with_context(|| format!("cannot open {p}"))?;
                Ok(Box::new(f) as Box<dyn Read + Send>)
            },
            file,
            1,
        )
        .with_context(|| merge_failed(&tmp))?;
        let mut file = std::fs::File::open(&tmp)
            .with_context(|| format!("cannot reopen {}", tmp.display()))?;
        let dest = file_path(&first.generation, &name);
        self.target
            .write_atomic(&dest, &mut file)
            .map_err(|e| upload_error(e.into(), &dest))?;
        Ok(name)
    }

    /// The next file to send after `pos`, handling gaps (see module docs).
    fn next_file(
        &self,
        pos: Option<Key>,
        files: &[SpoolFile],
        head: Option<Key>,
    ) -> Option<SpoolFile> {
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
            if behind {
                self.want_snapshot("replica is behind and nothing newer is spooled");
            }
            return None;
        };
        let continuous = match (pos, first.name) {
            (_, FileName::Snapshot { .. }) => true,
            (Some(p), FileName::Segment { first: a, .. }) => {
                p.generation == first.generation && a == p.last + 1
            }
            (None, FileName::Segment { .. }) => false,
        };
        if continuous {
            return Some(first.clone());
        }
        if let Some(s) = later
            .iter()
            .find(|f| matches!(f.name, FileName::Snapshot { .. }))
        {
            warn!(replica = %self.name(), "replica missed spooled files (spool limit or a new replica); resynchronising from snapshot {}", s.name);
            return Some((*s).clone());
        }
        self.want_snapshot("replica is missing files that are no longer spooled");
        None
    }

    /// Asks the main loop for a fresh snapshot, and wakes it: an idle main loop sleeps until
    /// the snapshot interval, so without the wake a lagging replica would wait that long
    /// (this was a CI failure: the wake after the previous upload had already been consumed).
    fn want_snapshot(&self, why: &str) {
        let mut g = self.shared.lock();
        if g.snapshot_wanted {
            return; // asked already; the main loop has not taken it yet
        }
        warn!(replica = %g.replicas[self.idx].name, "{why}; asking for a fresh snapshot");
        g.snapshot_wanted = true;
        drop(g);
        let _ = self.wake.send(super::Msg::Progress);
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
                if m.database != self.identity {
                    bail!(
                        "{url} holds the replica of {}, not of {}: refusing to mix two databases (use another path, or delete {MARKER_FILE} there if the database moved)",
                        m.database,
                        self.identity
                    );
                }
            }
            Err(e) if e.kind == ErrorKind::NotFound => {
                let m = Marker {
                    format: 1,
                    database: self.identity.clone(),
                    created_ms: now_ms(),
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
        self.remove_temps()
    }

    /// Removes temporary files of interrupted uploads from the root and every generation. Safe
    /// whenever this shipper is not uploading and owns the replica (callers check the claim
    /// first, see `owner`): it is then the replica's only writer. Run at start, after
    /// every error, every [`TEMP_SWEEP`] while idle and at a clean stop, because a connection
    /// that was cut can still deliver an upload's first requests to the server after the
    /// reconnection's sweep (found with a blackholed link: the old TCP connection's queued
    /// data reached the old server session once the link healed).
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

    fn upload(&self, f: &SpoolFile) -> Result<()> {
        let path = self.spool.path(&f.generation, &f.name);
        let mut src = match std::fs::File::open(&path) {
            Ok(s) => s,
            // Dropped by the spool limit while we looked: the next round handles the gap.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let dest = file_path(&f.generation, &f.name);
        self.target.write_atomic(&dest, &mut src).map_err(|e| {
            self.upload_failed(&f.generation, &f.name, upload_error(e.into(), &dest))
        })?;
        Ok(())
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
        let paths: Vec<String> = inputs.iter().map(|i| file_path(g, i)).collect();
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

/// Most spooled files merged into one upload.
pub const BATCH_FILES: usize = 1024;
/// Most compressed bytes merged into one upload.
pub const BATCH_BYTES: u64 = 32 << 20;

/// Whether the live file `l` is what a replica at `pos` takes next: a snapshot (a start or a
/// resynchronisation), or the segment right after `pos`.
fn live_follows(pos: Option<Key>, l: &LiveFile) -> bool {
    match (pos, l.name) {
        (p, FileName::Snapshot { .. }) => p.is_none_or(|p| l.key() > p),
        (Some(p), FileName::Segment { first, .. }) => {
            p.generation == l.generation && first == p.last + 1
        }
        (None, FileName::Segment { .. }) => false,
    }
}

/// Decodes the segments read from `inputs` in order and writes them, re-encoded as one
/// segment, to `out` (fsynced). Every input is fully verified on the way.
fn merge_segments(
    inputs: &[String],
    open: impl Fn(&str) -> Result<Box<dyn Read + Send>>,
    out: std::fs::File,
    level: i32,
) -> Result<()> {
    let mut enc: Option<Encoder<BufWriter<std::fs::File>>> = None;
    let mut out = Some(out);
    // One input open at a time: memory stays at one decoder whatever the fan-in.
    for label in inputs {
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
        while let Some(rec) = dec.next().map_err(|e| anyhow!("{label}: {e}"))? {
            match rec {
                Record::Page { pgno, data } => e.page(pgno, data)?,
                Record::Commit(c) => e.commit(&c)?,
            }
        }
    }
    let enc = enc.ok_or_else(|| anyhow!("internal: nothing to merge"))?;
    let file = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
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
