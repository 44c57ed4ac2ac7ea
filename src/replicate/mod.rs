//! The daemon: watch the database, capture commits into the local spool, ship them to every
//! replica, checkpoint, snapshot, and report.
//!
//! Threads: the main loop (this module) owns the database and the spool's producer side; one
//! [`ship::Shipper`] thread per replica consumes the spool; `metrics` (when configured) serves
//! or writes figures copied from their shared state. The main loop wakes only for file
//! events on the database or its WAL (inotify), replica progress, signals, and timers that are
//! due (watchdog, snapshot interval; for 2 s after each change, a 20 ms look for an application's
//! checkpoint waiting on walship; the end of a group-commit window, a status write put off while
//! the replicas keep up, see `main_loop`): an idle database costs no work.
//!
//! One replicator per database ([`dblock`]: a flock on the database file, whatever the state
//! directory) and one writer per replica ([`owner`]: the newest claim owns it).
//!
//! Start-up waits for the database to exist, and for a lock another process holds on it
//! (`locking_mode=EXCLUSIVE`) to go, saying at once in the log and the status what it waits
//! for; SIGTERM ends either wait within a second. A missing database is a normal state, not a
//! failed start: `READY=1` goes out at once, with the status [`Status::WaitingForDb`].
//!
//! Stop: SIGTERM/SIGINT captures the last commits and gives the replicas `shutdown-timeout` to
//! receive them; a second signal ends that wait at once. [`Stopped`] says whether every replica
//! holds everything captured (exit 0) or not (exit 69, `EX_UNAVAILABLE`, after a last log line
//! naming the replicas behind and what they miss).
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

pub(crate) mod capture;
pub mod dblock;
mod main_loop;
pub(crate) mod owner;
mod replaced;
pub(crate) mod ship;
pub(crate) mod spool;
pub mod state;
mod watch;

use crate::config::Settings;
use crate::db::Db;
use crate::systemd::Notifier;
use anyhow::{Context, Result};
use capture::Capture;
use dblock::DbLock;
use main_loop::MainLoop;
use ship::{ReplicaStatus, Shared, Shipper};
use spool::Spool;
use state::{StateDir, Status};
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{info, warn};
use watch::watch;
pub(crate) use watch::ChangeGate;

/// Messages that wake the main loop.
#[derive(Debug)]
pub(crate) enum Msg {
    /// The database or its WAL changed.
    Changed,
    /// A replica made progress or changed health.
    Progress,
    /// SIGTERM / SIGINT.
    Stop,
}

/// How the daemon ended; `walship replicate` exits 0 or [`Stopped::EXIT_BEHIND`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every replica holds everything captured (or nothing was captured).
    Shipped,
    /// Some replica lacks captured commits (they stay in the spool and ship at the next
    /// start); the log's last line names the replicas and what they miss.
    Behind,
}

impl Stopped {
    /// The exit code of [`Stopped::Behind`]: 69, `EX_UNAVAILABLE`.
    pub const EXIT_BEHIND: u8 = 69;
}

/// The identity written into replica markers: `host:/path/of.db`.
pub fn identity(db: &Path) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", db.display())
}

/// Makes every thread of the daemon allocate from glibc's one main arena. By default glibc
/// gives threads arenas of their own (up to 8 per core), and memory freed in one of them is
/// seldom returned to the system, so a daemon whose threads come and go (shippers
/// reconnecting) keeps growing (docs/PERFORMANCE.md has the soak figures).
/// walship's threads allocate little and rarely at the same moment, so the shared lock costs
/// nothing measurable. Must run before any thread is spawned.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; no thread exists yet to race with it.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// How much lower than the daemon's a shipper thread's CPU priority is (its nice value).
///
/// Capture is what keeps the application's WAL bounded: a writer that outruns capture is held
/// back under SQLite's write lock until capture has caught up (see `capture::checkpoint`).
/// Shipping only empties the spool, which may lag behind within its limit. When the CPU is
/// short, the scheduler should therefore serve the application and capture before the
/// shippers. A 200 MiB bulk load beside an sftp shipper (its SSH encryption, and a loopback
/// sshd on the same two cores) took a median 1.39x as long as without walship with the
/// shippers at nice 10, against 1.58x without (15 runs each, docs/PERFORMANCE.md); the
/// load was on the replica 0.3-0.6 s after it ended instead of 0.06-0.3 s. An idle CPU serves
/// a niced thread at once: at 100 commits/s the lag did not change, not even beside two busy
/// loops at nice 0 (p50 42-43 ms, p99 79-81 ms, against 40-41 and 79-81).
const SHIP_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority by `by` nice levels (at most to 19). Best effort:
/// a sandbox that forbids `setpriority` (a seccomp filter) leaves it as it was, said at debug
/// level. Raising it back would need a privilege walship does not ask for.
fn lower_priority(by: i32) {
    use nix::errno::Errno;
    use nix::libc::{getpriority, setpriority, PRIO_PROCESS};
    // On Linux, PRIO_PROCESS with id 0 names the calling thread, not the whole process.
    Errno::clear();
    // SAFETY: getpriority reads the calling thread's nice value; -1 is told apart by errno.
    let now = unsafe { getpriority(PRIO_PROCESS, 0) };
    if now == -1 && Errno::last_raw() != 0 {
        tracing::debug!("cannot read this thread's CPU priority: {}", Errno::last());
        return;
    }
    let to = now.saturating_add(by).min(19);
    // SAFETY: setpriority changes only the calling thread's nice value.
    if unsafe { setpriority(PRIO_PROCESS, 0, to) } != 0 {
        tracing::debug!(
            "cannot lower this thread's CPU priority to nice {to}: {}",
            Errno::last()
        );
    }
}

/// Gives the allocator's free memory back to the system (glibc's `malloc_trim`). After a
/// burst (a backlog shipped after an outage, a compaction, a snapshot) the heap keeps freed
/// buffers between live ones, which only this returns (without it, memory stays higher after
/// each outage). Called when a burst ends, never on a timer; it takes microseconds
/// on walship's small heap.
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it is thread-safe.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Waits for the database file to exist (an application may create it after boot). A missing
/// database is not a failed start: when it is missing, `READY=1` goes out at once, with the
/// status saying what walship waits for (in `STATUS=` and the status file), so that
/// `systemctl start` returns and the unit is active. Returns `None` when stopped meanwhile,
/// else whether `READY=1` was sent.
fn wait_for_db(
    db: &Path,
    state: &StateDir,
    stop: &std::sync::mpsc::Receiver<Msg>,
    notifier: &Notifier,
) -> Option<bool> {
    if db.exists() {
        return Some(false);
    }
    let waiting = Status::WaitingForDb(db.to_owned());
    info!(db = %db.display(), "{waiting}: replication starts when it appears");
    notifier.status(&waiting.to_string());
    state.write_status(&waiting);
    notifier.ready();
    while !db.exists() {
        notifier.watchdog();
        if let Ok(Msg::Stop) = stop.recv_timeout(DB_POLL) {
            info!(db = %db.display(), "stopped while waiting for {} to be created", db.display());
            return None;
        }
    }
    info!(db = %db.display(), "{} was created: starting", db.display());
    Some(true)
}

/// How often start-up looks whether a missing database was created.
const DB_POLL: Duration = Duration::from_millis(250);

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
    state: &StateDir,
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
                    state.write_status(&Status::Starting(line));
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

/// Runs the daemon until SIGTERM/SIGINT. Returns after shipping what is pending, or after
/// `shutdown-timeout`, or at once on a second signal; says whether everything was shipped.
///
/// # Errors
/// Start-up failures (state directory, database, configuration of replicas).
pub(crate) fn run(settings: &Settings, notifier: &Notifier) -> Result<Stopped> {
    limit_malloc_arenas();
    let (tx, rx) = channel::<Msg>();
    spawn_signal_thread(tx.clone())?;
    let state = StateDir::new(&settings.state_dir);
    let _lock = state.lock()?;
    let metrics = crate::metrics::Exporter::start(settings)?;
    let Some(ready) = wait_for_db(&settings.db, &state, &rx, notifier) else {
        return Ok(Stopped::Shipped);
    };
    // Before any connection opens: the lock must outlive them all (see `dblock`).
    let db_lock = DbLock::acquire(&settings.db)?;
    let Some(switched) = wait_for_wal_mode(settings, &state, &rx, notifier)? else {
        return Ok(Stopped::Shipped);
    };
    if switched {
        info!(db = %settings.db.display(), "switched {} to WAL mode (journal_mode=WAL)", settings.db.display());
    }
    let spool = Arc::new(Spool::open(&state.spool_dir())?);
    // Before shippers read the spool (see `capture::publish`).
    let volatile = capture::volatile_on_open(&state, &spool)?;
    // Shippers first: they connect to their replicas while the first snapshot is written.
    let (shared, shippers) = start_shippers(settings, &state, &spool, &tx)?;
    let sampled = shared.clone();
    metrics.attach(move || sampled.sample());
    // The first snapshot of a large database takes a while: say so meanwhile.
    let starting = Status::Starting(format!(
        "resuming or snapshotting {}",
        settings.db.display()
    ));
    notifier.status(&starting.to_string());
    state.write_status(&starting);
    let mut cap = Capture::start(
        Db::open(&settings.db)?,
        spool.clone(),
        &state,
        settings.segment_size,
        None,
        volatile,
    )?;
    cap.rotate_pin()?;
    main_loop::kick_head(&shared, &cap);
    let watcher = watch(&settings.db, tx, shared.clone())?;
    info!(db = %settings.db.display(), generation = %cap.at.generation, position = %format!("{}/{}", cap.at.generation, cap.at.txid), "replicating to {} replica(s)", settings.replicas.len());
    let mut main = MainLoop::new(settings, notifier, state, shared, spool, rx, cap, db_lock);
    main.ready = ready;
    main.run();
    let stopped = main.shutdown(shippers);
    metrics.finish();
    drop(watcher);
    Ok(stopped)
}

/// Starts one [`Shipper`] thread per replica.
fn start_shippers(
    settings: &Settings,
    state: &StateDir,
    spool: &Arc<Spool>,
    tx: &Sender<Msg>,
) -> Result<(Arc<Shared>, Vec<JoinHandle<()>>)> {
    let shared = Arc::new(Shared::default());
    let woken = Arc::downgrade(&shared);
    spool.on_live(move || {
        if let Some(s) = woken.upgrade() {
            main_loop::kick(&s);
        }
    });
    let ident = identity(&settings.db);
    let instance = state.instance_id()?;
    let mut threads = Vec::new();
    for (idx, r) in settings.replicas.iter().enumerate() {
        let target = r.open();
        shared.lock().replicas.push(ReplicaStatus {
            name: r.name.clone(),
            ..ReplicaStatus::default()
        });
        let s = Shipper {
            idx,
            target,
            shared: shared.clone(),
            spool: spool.clone(),
            state: state.clone(),
            identity: ident.clone(),
            instance,
            fanout: settings.compaction_fanout,
            retention: settings.retention,
            wake: tx.clone(),
            tail: std::cell::Cell::new(None),
            tail_repaired: std::cell::Cell::new(false),
            defer_below: settings.spool_limit / 2,
            deferral: std::cell::Cell::new(ship::Deferral::Spent),
        };
        let h = std::thread::Builder::new()
            .name(format!("ship-{}", r.name))
            .spawn(move || {
                lower_priority(SHIP_NICE);
                s.run()
            })
            .context("cannot start shipper thread")?;
        threads.push(h);
    }
    Ok((shared, threads))
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
