//! The daemon: watch the database, capture commits into the local spool, ship them to every
//! replica, checkpoint, snapshot, and report.
//!
//! Threads: the main loop (this module) owns the database and the spool's producer side; one
//! [`ship::Shipper`] thread per replica consumes the spool. The main loop wakes only for file
//! events on the database or its WAL (inotify), replica progress, signals, and timers that are
//! due (watchdog, snapshot interval; for 2 s after each change, a 20 ms look for an application's
//! checkpoint waiting on walship): an idle database costs no work.
//!
//! One replicator per database ([`dblock`]: a flock on the database file, whatever the state
//! directory) and one writer per replica ([`owner`]: the newest claim owns it).
//!
//! Start-up waits for the database to exist, and for a lock another process holds on it
//! (`locking_mode=EXCLUSIVE`) to go, saying at once in the log and the status what it waits
//! for; SIGTERM ends either wait within a second.
//!
//! Invariants: the application is never waited on (capture reads files, checkpoints are
//! PASSIVE, under a short write lock only while a writer outruns capture); local disk use is bounded by `spool-limit` (past it the
//! oldest spooled files are dropped and lagging replicas resynchronise from a snapshot); what
//! `status` reports as replicated is what a replica durably holds.
//!
//! A database file replaced (renamed over) or deleted under the daemon is noticed on the
//! directory's inotify event: what its WAL still held is captured, every handle on the old
//! file is closed, and its `-wal`/`-shm` are removed once no other process uses them (SQLite
//! leaves them behind for a moved file, and would read them over the new one). Only then is
//! the new file opened, always as a new generation: nothing of the old file is ever read as,
//! or checkpointed into, the new one.

pub mod capture;
pub mod dblock;
pub mod owner;
pub mod ship;
pub mod spool;
pub mod state;

use crate::clock::now_ms;
use crate::config::Settings;
use crate::db::WalChange;
use crate::db::{ensure_wal_mode, Db};
use crate::systemd::Notifier;
use anyhow::{anyhow, bail, Context, Result};
use capture::{Capture, Captured, Step};
use dblock::DbLock;
use notify::{EventKind, RecursiveMode, Watcher};
use ship::{ReplicaStatus, Shared, Shipper};
use spool::Spool;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// Messages that wake the main loop.
#[derive(Debug)]
pub enum Msg {
    /// The database or its WAL changed.
    Changed,
    /// A replica made progress or changed health.
    Progress,
    /// SIGTERM / SIGINT.
    Stop,
}

/// How long after a change to the database the main loop keeps looking, every
/// [`CHECKPOINTER_POLL`], for an application's checkpoint waiting for walship's read lock.
const CHECKPOINTER_WATCH: Duration = Duration::from_secs(2);
const CHECKPOINTER_POLL: Duration = Duration::from_millis(20);

/// How long shutdown waits for replicas to receive what is spooled.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// The identity written into replica markers: `host:/path/of.db`.
pub fn identity(db: &Path) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", db.display())
}

fn lock_state_dir(dir: &Path) -> Result<std::fs::File> {
    let p = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { nix::libc::flock(f.as_raw_fd(), nix::libc::LOCK_EX | nix::libc::LOCK_NB) };
    if rc != 0 {
        return Err(anyhow!(
            "another walship is already replicating with state directory {} (lock held)",
            dir.display()
        ));
    }
    Ok(f)
}

/// Makes every thread of the daemon allocate from glibc's one main arena. By default glibc
/// gives threads arenas of their own (up to 8 per core), and memory freed in one of them is
/// seldom returned to the system: in a soak over sftp (shipper threads reconnecting, zstd
/// workers coming and going) RSS crept from 13 to 18 MiB in minutes and stayed there; with one
/// arena it moves between 14 and 16.5 MiB and comes back down. walship's threads allocate
/// little and rarely at the same moment, so the shared lock costs nothing measurable. Must run
/// before any thread is spawned.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; no thread exists yet to race with it.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// Gives the allocator's free memory back to the system (glibc's `malloc_trim`). After a
/// burst (a backlog shipped after an outage, a compaction, a snapshot) the heap keeps freed
/// buffers between live ones, which only this returns: without it RSS stayed ~3 MiB higher
/// after each sftp outage. Called when a burst ends, never on a timer; it takes microseconds
/// on walship's small heap.
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it is thread-safe.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Waits for the database file to exist (an application may create it after boot).
fn wait_for_db(
    db: &Path,
    stop: &std::sync::mpsc::Receiver<Msg>,
    notifier: &Notifier,
) -> Result<bool> {
    let mut logged = false;
    while !db.exists() {
        if !logged {
            info!(db = %db.display(), "waiting for {} to be created", db.display());
            notifier.status(&format!("waiting for {} to be created", db.display()));
            logged = true;
        }
        notifier.watchdog();
        if let Ok(Msg::Stop) = stop.recv_timeout(Duration::from_millis(500)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// How often start-up tries again while another process holds the database locked.
const LOCKED_RETRY: Duration = Duration::from_secs(1);

/// How often the log repeats that start-up still waits for a lock.
const LOCKED_REPEAT: Duration = Duration::from_secs(300);

/// Puts the database in WAL mode, waiting as long as another process holds it locked (an
/// application using `locking_mode=EXCLUSIVE`, a long transaction): the log and the status say
/// at once which process blocks it, and again every [`LOCKED_REPEAT`] while it lasts; SIGTERM
/// ends the wait at once. Returns whether it switched, or `None` when stopped meanwhile.
fn wait_for_wal_mode(
    settings: &Settings,
    stop: &std::sync::mpsc::Receiver<Msg>,
    notifier: &Notifier,
) -> Result<Option<bool>> {
    let db = &settings.db;
    let started = Instant::now();
    let mut said: Option<(String, Instant)> = None;
    loop {
        match crate::db::try_wal_mode(db) {
            Ok(switched) => {
                if said.is_some() {
                    info!(db = %db.display(), "{} is no longer locked after {} s: starting", db.display(), started.elapsed().as_secs());
                }
                return Ok(Some(switched));
            }
            Err(e) if crate::db::is_locked(&e) => {
                let why = format!("{e:#}");
                let due = said
                    .as_ref()
                    .is_none_or(|(w, at)| *w != why || at.elapsed() >= LOCKED_REPEAT);
                if due {
                    let line = format!(
                        "waiting ({} s so far), retrying every {} s: {why}",
                        started.elapsed().as_secs(),
                        LOCKED_RETRY.as_secs()
                    );
                    warn!(db = %db.display(), error_kind = "db-locked", "{line}");
                    notifier.status(&line);
                    write_status(&settings.state_dir, &format!("starting: {line}"));
                    said = Some((why, Instant::now()));
                }
            }
            Err(e) => return Err(e),
        }
        notifier.watchdog();
        if let Ok(Msg::Stop) = stop.recv_timeout(LOCKED_RETRY) {
            info!(db = %db.display(), "stopped while waiting for the lock on {}", db.display());
            return Ok(None);
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Returns after shipping what is pending (or after
/// [`SHUTDOWN_GRACE`]).
///
/// # Errors
/// Start-up failures (state directory, database, configuration of replicas).
pub fn run(settings: &Settings, notifier: &Notifier) -> Result<()> {
    limit_malloc_arenas();
    let (tx, rx) = channel::<Msg>();
    spawn_signal_thread(tx.clone())?;
    std::fs::create_dir_all(&settings.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            settings.state_dir.display()
        )
    })?;
    let _lock = lock_state_dir(&settings.state_dir)?;
    // A state file (status, replica state, page hashes) being replaced when the previous
    // instance was killed leaves its temporary file behind; nobody else writes here.
    crate::durable::remove_temp_files(&settings.state_dir).with_context(|| {
        format!(
            "cannot remove temporary files in state directory {}",
            settings.state_dir.display()
        )
    })?;
    if !wait_for_db(&settings.db, &rx, notifier)? {
        return Ok(());
    }
    // Before any connection opens: the lock must outlive them all (see `dblock`). `None` while
    // the file was replaced and the new one is not open yet.
    let mut db_lock = Some(DbLock::acquire(&settings.db)?);
    let Some(switched) = wait_for_wal_mode(settings, &rx, notifier)? else {
        return Ok(());
    };
    if switched {
        info!(db = %settings.db.display(), "switched {} to WAL mode (journal_mode=WAL)", settings.db.display());
    }
    let spool = Arc::new(Spool::open(&settings.state_dir)?);
    // Shippers first: they connect to their replicas while the first snapshot is written.
    let shared = Arc::new(Shared::default());
    let woken = Arc::downgrade(&shared);
    spool.on_live(move || {
        if let Some(s) = woken.upgrade() {
            kick(&s);
        }
    });
    let ident = identity(&settings.db);
    let instance = owner::instance_id(&settings.state_dir)?;
    let mut threads = Vec::new();
    for (idx, r) in settings.replicas.iter().enumerate() {
        let target = r.open();
        shared.lock().replicas.push(ReplicaStatus {
            name: r.name.clone(),
            url: target.url(),
            ..ReplicaStatus::default()
        });
        let s = Shipper {
            idx,
            target,
            shared: shared.clone(),
            spool: spool.clone(),
            state_path: settings.state_dir.join(format!("replica-{}.state", r.name)),
            identity: ident.clone(),
            instance,
            fanout: settings.compaction_fanout,
            retention: settings.retention,
            wake: tx.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("ship-{}", r.name))
            .spawn(move || s.run())
            .context("cannot start shipper thread")?;
        threads.push(h);
    }
    // The first snapshot of a large database takes a while: say so meanwhile.
    let line = format!(
        "starting: resuming or snapshotting {}",
        settings.db.display()
    );
    notifier.status(&line);
    write_status(&settings.state_dir, &line);
    let db = Db::open(&settings.db)?;
    let mut cap = Capture::start(
        db,
        spool.clone(),
        &settings.state_dir,
        settings.segment_size,
        None,
    )?;
    cap.rotate_pin()?;
    kick_head(&shared, &cap);

    // Watch the database's directory; only events on the database or its WAL wake us.
    let dir = settings
        .db
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let names: Vec<std::ffi::OsString> = {
        let base = settings
            .db
            .file_name()
            .map(|s| s.to_owned())
            .unwrap_or_default();
        let mut wal = base.clone();
        wal.push("-wal");
        vec![base, wal]
    };
    let wtx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if matches!(ev.kind, EventKind::Access(_) | EventKind::Other) {
            return;
        }
        if ev
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| names.iter().any(|x| x == n)))
        {
            let _ = wtx.send(Msg::Changed);
        }
    })
    .context("cannot start inotify watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;

    drop(tx);
    info!(db = %settings.db.display(), generation = %cap.at.generation, position = %position(&cap.at), "replicating to {} replica(s)", settings.replicas.len());

    let mut ready = false;
    let started = Instant::now();
    let mut last_snapshot = Instant::now();
    let mut status_line = String::new();
    let mut failing_since: Option<Instant> = None;
    let mut last_capture_error = String::new();
    let mut last_snapshot_error = String::new();
    // The database being captured; `None` from the moment its file was replaced or deleted
    // until the new file is opened (see `Replaced`).
    let mut at = cap.at;
    let mut cap = Some(cap);
    let mut replaced: Option<Replaced> = None;
    let mut last_change = Instant::now();
    let watchdog = notifier.watchdog_interval();
    loop {
        stall_failpoint();
        let timeout = watchdog.unwrap_or(Duration::from_secs(3600)).min(
            settings
                .snapshot_interval
                .saturating_sub(last_snapshot.elapsed())
                .max(Duration::from_millis(10)),
        );
        let timeout = if failing_since.is_some() || !ready || cap.is_none() {
            timeout.min(Duration::from_millis(200))
        } else if last_change.elapsed() < CHECKPOINTER_WATCH {
            // An application's checkpoint waiting for walship's read lock changes no file, so
            // no event says so: look for one for a while after each change.
            timeout.min(CHECKPOINTER_POLL)
        } else {
            timeout
        };
        let msg = rx.recv_timeout(timeout);
        if matches!(msg, Ok(Msg::Changed)) {
            last_change = Instant::now();
        }
        if matches!(msg, Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected)) {
            break;
        }
        // Drain what else is queued: events coalesce.
        let mut stop = false;
        while let Ok(m) = rx.try_recv() {
            if matches!(m, Msg::Stop) {
                stop = true;
            }
        }
        if let Some(c) = cap.as_mut() {
            match capture_round(c, settings, &shared) {
                Ok(()) => {
                    if failing_since.take().is_some() {
                        info!(db = %settings.db.display(), "capture works again");
                    }
                    last_capture_error.clear();
                }
                Err(e) => {
                    // Logged when it changes, not on every retry.
                    let msg = format!("{e:#}");
                    if msg != last_capture_error {
                        error!(db = %settings.db.display(), error_kind = "capture", "capture failed: {msg}");
                        last_capture_error = msg;
                    }
                    failing_since.get_or_insert_with(Instant::now);
                }
            }
        }
        if let Some(c) = cap.take_if(|c| c.db_replaced()) {
            // Every handle on the old file goes at once: kept open, its WAL and wal-index
            // would be paired with the new file by anyone opening it (walship included).
            let r = Replaced::close(c, &settings.db);
            // The old file's connections are closed: its lock can go.
            db_lock = None;
            warn!(db = %settings.db.display(), error_kind = "db-replaced", "the database file was {}: closed every handle on the old file; a new generation starts once the new file can be opened", r.how);
            replaced = Some(r);
        }
        if let Some(r) = replaced.as_mut() {
            match r.reopen(&settings.db, &spool, settings) {
                Ok(Some((c, lock))) => {
                    kick_head(&shared, &c);
                    cap = Some(c);
                    db_lock = Some(lock);
                    replaced = None;
                }
                Ok(None) => r.last_error.clear(),
                Err(e) => {
                    let msg = format!("{e:#}");
                    if msg != r.last_error {
                        error!(db = %settings.db.display(), error_kind = "db-replaced", "cannot open the new database file: {msg}");
                        r.last_error = msg;
                    }
                }
            }
        }
        if let Some(c) = cap.as_mut() {
            let want = std::mem::take(&mut shared.lock().snapshot_wanted);
            if want || last_snapshot.elapsed() >= settings.snapshot_interval {
                let r = c.snapshot().map(|()| kick_head(&shared, c));
                match new_generation_if_broken(c, &shared, r) {
                    Ok(()) => {
                        last_snapshot = Instant::now();
                        last_snapshot_error.clear();
                    }
                    Err(e) => {
                        // Retried with backoff (see Capture::snapshot); logged when it changes.
                        let msg = format!("{e:#}");
                        if msg != last_snapshot_error {
                            error!(db = %settings.db.display(), "snapshot failed: {msg}");
                            last_snapshot_error = msg;
                        }
                        shared.lock().snapshot_wanted = want;
                    }
                }
            }
            at = c.at;
        }
        let spooled = match gc_spool(&spool, &shared, settings.spool_limit) {
            Ok(files) => files,
            Err(e) => {
                warn!("spool maintenance failed: {e:#}");
                spool.list().unwrap_or_default()
            }
        };
        let problem = replaced
            .as_ref()
            .map(|r| format!("the file was {}, {}", r.how, r.waiting()));
        let (line, caught_up) = status(&at, &shared, &spooled, problem);
        if line != status_line {
            notifier.status(&line);
            write_status(&settings.state_dir, &line);
            status_line = line;
        }
        if !ready && (caught_up || started.elapsed() > Duration::from_secs(30)) {
            ready = true;
            notifier.ready();
            info!("ready: {status_line}");
        }
        notifier.watchdog();
        if stop {
            break;
        }
    }
    // Graceful stop: capture the last commits, give replicas time to receive them.
    notifier.stopping();
    info!("stopping: shipping what is pending");
    if let Some(c) = cap.as_mut() {
        let _ = capture_round(c, settings, &shared);
        at = c.at;
    }
    {
        let mut g = shared.lock();
        g.stopping = true;
        g.deadline = Some(Instant::now() + SHUTDOWN_GRACE);
    }
    kick(&shared);
    for h in threads {
        let _ = h.join();
    }
    let (line, _) = status(&at, &shared, &spool.list().unwrap_or_default(), None);
    write_status(&settings.state_dir, &line);
    if let Some(Err(e)) = cap.as_ref().map(Capture::save_hashes) {
        warn!("{e:#}: the next start may need a full snapshot");
    }
    info!("stopped: {line}");
    drop(watcher);
    // Connections first, then the lock (see `dblock`).
    drop(cap);
    drop(db_lock);
    Ok(())
}

/// A database file replaced (renamed over) or deleted under the running daemon, whose old
/// file walship has closed. The new file is opened once it exists and the old file's `-wal`
/// and `-shm` are gone (walship removes them once no other process uses them: SQLite would
/// read them over the new file), and it always starts a new generation.
struct Replaced {
    /// "replaced by another file" or "deleted".
    how: &'static str,
    stale: crate::db::StaleSidecars,
    /// The old database's sidecar still in use by another process, if any.
    in_use: Option<PathBuf>,
    /// The last error logged while reopening (each is logged once).
    last_error: String,
}

impl Replaced {
    fn close(cap: Capture, db: &Path) -> Replaced {
        let how = if db.exists() {
            "replaced by another file"
        } else {
            "deleted"
        };
        Replaced {
            how,
            stale: cap.close_replaced(),
            in_use: None,
            last_error: String::new(),
        }
    }

    /// What walship waits for before it opens the new file.
    fn waiting(&self) -> String {
        match &self.in_use {
            Some(p) => format!(
                "waiting until no process holds the old database (its {} is still in use)",
                p.display()
            ),
            // Another walship holds the new file's lock, say (see `dblock`).
            None if !self.last_error.is_empty() => {
                format!("cannot open the new file, retrying: {}", self.last_error)
            }
            None => "waiting for the new file".into(),
        }
    }

    /// Opens the new file, locked first (a [`DbLock`] on its inode: another walship may
    /// replicate the file that was moved in, and then this fails until it lets go).
    fn reopen(
        &mut self,
        db: &Path,
        spool: &Arc<Spool>,
        settings: &Settings,
    ) -> Result<Option<(Capture, DbLock)>> {
        self.in_use = self.stale.remove()?.map(Path::to_path_buf);
        if let Some(p) = &self.in_use {
            bail!(
                "{} of the old database is still open in another process (an application still using the file that was {}); opening the new file now would read the old WAL over it: waiting until that process closes it",
                p.display(),
                self.how
            );
        }
        if !db.exists() {
            return Ok(None);
        }
        let lock = DbLock::acquire(db)?;
        ensure_wal_mode(db)?;
        let d = Db::open(db)?;
        let why = format!("the database file was {} while walship ran", self.how);
        let mut c = Capture::start(
            d,
            spool.clone(),
            &settings.state_dir,
            settings.segment_size,
            Some(&why),
        )?;
        c.rotate_pin()?;
        Ok(Some((c, lock)))
    }
}

fn kick(shared: &Shared) {
    shared.lock().version += 1;
    shared.cv.notify_all();
}

fn kick_head(shared: &Shared, cap: &Capture) {
    {
        let mut g = shared.lock();
        let key = Some(cap.key());
        if g.head != key {
            g.head = key;
            g.head_moved = Some(Instant::now());
        }
    }
    kick(shared);
}

/// Capture, pin rotation, checkpoint; a broken WAL starts a new generation.
fn capture_round(cap: &mut Capture, settings: &Settings, shared: &Shared) -> Result<()> {
    let r = capture_round_inner(cap, settings, shared);
    new_generation_if_broken(cap, shared, r)
}

/// Wherever continuity broke (a step, a checkpoint's tail, a snapshot, a failed write), a new
/// generation starts; if that fails too, the capture stays poisoned and the next round tries
/// again. Other errors pass through.
fn new_generation_if_broken(cap: &mut Capture, shared: &Shared, r: Result<()>) -> Result<()> {
    match r {
        Err(e) if WalChange::is_broken(&e) => {
            cap.new_generation(&format!("{e:#}"))?;
            cap.rotate_pin()?;
            kick_head(shared, cap);
            Ok(())
        }
        other => other,
    }
}

fn capture_round_inner(cap: &mut Capture, settings: &Settings, shared: &Shared) -> Result<()> {
    // A writer that outruns capture is held back: this round captures under the write lock
    // and resets the WAL, which is what bounds the WAL under a bulk load.
    if cap.is_hot(settings.checkpoint_pages)
        && cap.checkpoint_now(settings.checkpoint_pages, true)?
    {
        cap.rotate_pin()?;
        kick_head(shared, cap);
        return Ok(());
    }
    let r = cap.step()?;
    cap.rotate_pin()?;
    if matches!(r, Step::Captured(_)) {
        kick_head(shared, cap);
    }
    if cap.yield_to_checkpointer()? {
        kick_head(shared, cap);
        return Ok(());
    }
    // A checkpoint may capture commits that landed meanwhile.
    let before = cap.key();
    if cap.maybe_checkpoint(settings.checkpoint_pages)? || cap.key() != before {
        kick_head(shared, cap);
    }
    Ok(())
}

fn position(at: &Captured) -> String {
    format!("{}/{}", at.generation, at.txid)
}

/// Deletes spooled files every replica has, then enforces the spool limit; returns what is left.
fn gc_spool(spool: &Spool, shared: &Shared, limit: u64) -> Result<Vec<spool::SpoolFile>> {
    // A retired replica (taken over by another instance) holds nothing back.
    let positions: Vec<Option<spool::Key>> = shared
        .lock()
        .replicas
        .iter()
        .filter(|r| !r.retired)
        .map(|r| r.position)
        .collect();
    let files = spool.list()?;
    let min = if positions.is_empty() {
        files.last().map(spool::SpoolFile::key)
    } else {
        positions.iter().copied().min().flatten()
    };
    let mut total = 0u64;
    let mut keep = Vec::new();
    let mut dropped = Vec::new();
    for f in files {
        if min.is_some_and(|m| f.key() <= m) {
            spool.remove(&f)?;
        } else {
            total += f.size;
            keep.push(f);
        }
    }
    if total > limit {
        // Keep the newest snapshot; drop the oldest files until under the limit.
        let newest_snap = keep
            .iter()
            .rev()
            .find(|f| matches!(f.name, crate::layout::names::FileName::Snapshot { .. }))
            .map(spool::SpoolFile::key);
        for f in &keep {
            if total <= limit {
                break;
            }
            if Some(f.key()) == newest_snap {
                continue;
            }
            warn!(error_kind = "spool-limit", "spool over its limit ({total} > {limit} bytes): dropping {} — lagging replicas will resynchronise from a snapshot", f.name);
            spool.remove(f)?;
            total -= f.size;
            dropped.push(f.key());
        }
    }
    keep.retain(|f| !dropped.contains(&f.key()));
    Ok(keep)
}

/// The one-line status, and whether every replica is settled: it holds everything captured,
/// or it is known to be failing. A replica that is both counts once, so READY still waits for
/// every reachable replica that has not caught up.
/// `db_problem` says what keeps the database itself from being captured, if anything.
fn status(
    at: &Captured,
    shared: &Shared,
    files: &[spool::SpoolFile],
    db_problem: Option<String>,
) -> (String, bool) {
    let now = now_ms();
    let g = shared.lock();
    let n = g.replicas.len();
    let mut ok = 0;
    let mut settled = 0;
    let mut max_lag = 0u64;
    let mut down: Vec<String> = db_problem
        .map(|p| format!("database: {p}"))
        .into_iter()
        .collect();
    let head = at.key();
    for r in &g.replicas {
        let caught_up = r
            .position
            .is_some_and(|p| p.generation == head.generation && p.last >= head.last);
        if caught_up {
            ok += 1;
        } else {
            let first_missing = files
                .iter()
                .find(|f| r.position.is_none_or(|p| f.key() > p))
                .map(|f| f.name.first_ms())
                .unwrap_or(at.time_ms);
            max_lag = max_lag.max(now.saturating_sub(first_missing));
        }
        if let Some(e) = &r.error {
            down.push(format!("{}: {e}", r.name));
        }
        if caught_up || r.error.is_some() {
            settled += 1;
        }
    }
    let mut line = format!(
        "replicated to {ok}/{n} replicas, lag {max_lag} ms, position {}",
        position(at)
    );
    if !down.is_empty() {
        line.push_str(&format!(", failing: {}", down.join("; ")));
    }
    (line, settled >= n)
}

fn write_status(dir: &Path, line: &str) {
    let p = dir.join("status");
    let text = format!("{} {}\n", now_ms(), line);
    if let Err(e) = crate::durable::replace_file(&p, text.as_bytes(), 0o644) {
        debug!("cannot write {}: {e}", p.display());
    }
}

fn spawn_signal_thread(tx: Sender<Msg>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                if tx.send(Msg::Stop).is_err() {
                    break;
                }
            }
        })
        .context("cannot start signal thread")?;
    Ok(())
}

/// Test hook: while the file named by `WALSHIP_FAILPOINT_STALL` exists, the main loop
/// stalls (to prove that the watchdog catches a hung loop).
fn stall_failpoint() {
    if let Some(p) = std::env::var_os("WALSHIP_FAILPOINT_STALL") {
        while Path::new(&p).exists() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
