//! Warm standby: `walship restore --follow` restores a database, then keeps applying the
//! replica's new commits to it, so that a standby host holds a copy seconds behind the primary
//! that it can promote at once.
//!
//! How new commits get into a file that readers have open: SQLite writes them. The standby is
//! an ordinary SQLite database in WAL mode, held open by one read-write connection; each batch
//! of whole, verified source commits becomes one SQLite transaction that writes raw pages
//! through the `sqlite_dbpage` virtual table (`INSERT INTO sqlite_dbpage(pgno, data)`; a
//! shrinking commit ends its transaction with `INSERT ... VALUES(db_pages + 1, NULL)`, which
//! truncates the database when the transaction commits). Readers (opened read-only or not)
//! therefore get SQLite's own locking and snapshot isolation: they see the standby at the end
//! of some SQLite transaction, which is always the end of some source commit, and a crash or
//! `kill -9` in the middle of a batch is rolled back by SQLite. The bundled SQLite is compiled
//! with `SQLITE_ENABLE_DBPAGE_VTAB` for this (`.cargo/config.toml` sets `LIBSQLITE3_FLAGS` for
//! every cargo build of the repository, package builds included); without it, following
//! refuses to start with a message saying so.
//!
//! Page 1 is written as the source had it. Its bytes 18-19 say WAL mode (walship replicates
//! WAL-mode databases only), so the standby stays in WAL mode and readers never block the
//! applier; a standby that SQLite does not open in WAL mode is refused. One thing SQLite does
//! itself: whenever a commit writes page 1, it stamps its own file change counter (bytes
//! 24-27), "version-valid-for" (92-95) and library version (96-99) into it, as the source's
//! SQLite did. These 12 bytes of bookkeeping are therefore the standby's own (SQLite reads
//! neither to interpret content, and in WAL mode not for cache validity either); every other
//! byte of every page is the source's. Verification reads page 1 with those bytes taken from
//! the source's last page 1 image ([`PAGE1_OWN_BYTES`]) and the rest must match.
//!
//! Invariants:
//! - The standby is at a commit boundary of the source at every SQLite commit: only whole
//!   commits whose whole-database checksum (see [`crate::layout::checksum`]) matched go into a
//!   transaction, and a failure in the middle of a batch rolls the whole batch back (the
//!   per-page hashes go back to the last SQLite commit with it). After every SQLite commit the
//!   standby's page count must equal the last commit's; at start (after the initial restore)
//!   and at stop the standby is read back through `sqlite_dbpage` and its checksum compared
//!   with the last applied commit's, and at stop `PRAGMA integrity_check` must pass. A
//!   mismatch is an error naming the file, never a silently wrong standby.
//! - Planning is incremental: each poll lists the replica (two listings merged, as restore
//!   does), takes the owner's view (`owners_view`), and applies the segments after the applied
//!   txid in the same generation (merged segments that start before it are read and their
//!   already-applied commits skipped), to the end of their content: a segment file may hold
//!   whole parts beyond what its name says, which are applied (a torn or damaged part there
//!   ends the file, see `super::ends_content`); the next poll skips them as applied. When the
//!   replica's latest generation is newer than the standby's, or the segments after the applied txid are gone (retention), the latest
//!   snapshot and its segments are applied as one replacement (all pages, then truncation).
//! - Replica outages and failures of one poll (network, a file merged away while read) never
//!   stop following: they are logged once per distinct error, shown in the status, and retried
//!   at the next poll, from the last SQLite commit. Checksum mismatches, a page size change and
//!   SQLite write errors stop following with an error (exit 1).
//! - New files are noticed by polling every `interval` (every backend), and on file://
//!   replicas also by inotify on the replica's root, which triggers a poll at once (at most one
//!   per `MIN_POLL_GAP`); a poll lists the replica, so an event is only ever a hint.
//! - SIGTERM/SIGINT stop at the next commit boundary (the current batch is committed), verify
//!   the standby as above and return `Ok`: the command exits 0.
//! - Under systemd (`Type=notify`): `READY=1` after the initial restore, `STATUS=` with the
//!   position, the lag behind the source (0 when the last listing showed nothing newer, else now
//!   minus the last applied commit's capture time) and the time since the replica was last
//!   listed successfully, `WATCHDOG=1` from the loop (at most once a second).
//! - The follower reports itself in its own state directory (`--state-dir`, by default
//!   `config::default_follow_state_dir`, apart from the daemon's; see [`super::follow_state`]):
//!   its lock is held while it runs, and the `status` file (state restoring, following or
//!   stopped, position, last commit time, lag as in `STATUS=`, last successful listing, last
//!   error) is rewritten where `STATUS=` is sent, and at start and stop. A second follower
//!   with the same state directory is refused.
//! - An existing output is refused without `--force` (which rebuilds the standby from the
//!   replica); following does not resume into a file it cannot prove. The standby holds the
//!   same exclusive `flock` as `walship replicate` holds on its database
//!   ([`crate::replicate::dblock`]): a follower never replaces (even with `--force`) a
//!   database that a walship replicates, and a `walship replicate` of the standby, or a second
//!   follower, is refused while it is followed (exit 75).

use super::follow_state::{FollowState, FollowStateDir, FollowStatus};
use super::{
    check_database, check_output, list_settled, owners_view_told, reader, restore, stop_txid,
    Chunk, Item, RestoreOptions,
};
use crate::backend::Backend;
use crate::clock::rfc3339;
use crate::layout::checksum::PageHashes;
use crate::layout::codec::Commit;
use crate::layout::names::{FileName, GenerationId, Position};
use crate::layout::plan::{plan_continuation, plan_restore, Plan, Want};
use crate::replicate::dblock::DbLock;
use crate::systemd::Notifier;
use anyhow::{anyhow, bail, Context, Result};
use rusqlite::{Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Options of `walship restore --follow`.
#[derive(Debug, Clone)]
pub(crate) struct FollowOptions {
    /// How often the replica is listed for new files.
    pub(crate) interval: Duration,
    /// Replace an existing output with a fresh restore.
    pub(crate) force: bool,
    /// The database the replicas must belong to (see [`check_database`]).
    pub(crate) database: Option<PathBuf>,
    /// Where the follower reports itself (see [`super::follow_state`]).
    pub(crate) state_dir: PathBuf,
}

/// Where following stopped.
#[derive(Debug, Clone)]
pub(crate) struct Followed {
    /// The last commit applied.
    pub(crate) position: Position,
    /// Its capture time.
    pub(crate) time_ms: u64,
    /// Its whole-database checksum, verified against the standby at stop.
    pub(crate) db_checksum: u64,
    /// Commits applied after the initial restore.
    pub(crate) commits: u64,
}

/// An error after which following stops (the standby stays at its last commit boundary):
/// anything that says the replica or the standby is wrong rather than unreachable.
#[derive(Debug)]
struct Fatal(String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

fn fatal(msg: String) -> anyhow::Error {
    Fatal(msg).into()
}

/// The byte ranges of page 1 that SQLite rewrites on every commit that writes page 1 (file
/// change counter, version-valid-for, SQLite version number): the standby's own, not the
/// source's (see the module doc).
pub(crate) const PAGE1_OWN_BYTES: [std::ops::Range<usize>; 2] = [24..28, 92..100];

/// `standby_page1` with its [`PAGE1_OWN_BYTES`] replaced by the source's.
fn as_source_page1(standby_page1: &[u8], source_page1: &[u8]) -> Vec<u8> {
    let mut p = standby_page1.to_vec();
    for r in PAGE1_OWN_BYTES {
        if let (Some(dst), Some(src)) = (p.get_mut(r.clone()), source_page1.get(r)) {
            dst.copy_from_slice(src);
        }
    }
    p
}

/// Bytes of pages written into one SQLite transaction before it is committed (at the next
/// commit boundary): bounds what a crash rolls back and what SQLite spills into its WAL.
const BATCH_BYTES: usize = 16 << 20;

/// Restores `out` from the first replica that works and follows it until `stop` is set;
/// `following` is set once the initial restore is in place (a signal then means "stop").
/// The state directory says "restoring" meanwhile, and "stopped" (with the error, if any) at
/// the end.
///
/// # Errors
/// The state directory cannot be locked, the output exists (without force), the initial
/// restore fails, the standby cannot be opened for following, or a fatal error while
/// following (see the module doc).
pub(crate) fn follow(
    targets: &[(String, Box<dyn Backend>)],
    opts: &FollowOptions,
    out: &Path,
    stop: &AtomicBool,
    notifier: &Notifier,
    following: &AtomicBool,
) -> Result<Followed> {
    let dir = FollowStateDir::new(&opts.state_dir);
    let _lock = dir.lock()?;
    let report = std::cell::RefCell::new(FollowStatus::new(FollowState::Restoring));
    dir.write(&report.borrow());
    let r = follow_reporting(targets, opts, out, stop, notifier, following, &dir, &report);
    let mut last = report.borrow().clone();
    last.state = FollowState::Stopped;
    if let Err(e) = &r {
        last.error = Some(format!("{e:#}"));
    }
    dir.write(&last);
    r
}

/// [`follow`], reporting into `dir`; `report` holds what was written last.
#[allow(clippy::too_many_arguments)]
fn follow_reporting(
    targets: &[(String, Box<dyn Backend>)],
    opts: &FollowOptions,
    out: &Path,
    stop: &AtomicBool,
    notifier: &Notifier,
    following: &AtomicBool,
    dir: &FollowStateDir,
    report: &std::cell::RefCell<FollowStatus>,
) -> Result<Followed> {
    check_output(out, opts.force).map_err(|e| {
        anyhow!("{e:#} (--follow builds a new standby; it does not resume into an existing file)")
    })?;
    let locked = |e: anyhow::Error| {
        e.context(format!(
            "cannot follow into {}: a standby never replaces a database that a walship replicates or follows",
            out.display()
        ))
    };
    if out.is_file() {
        // Probed, then released: the restore replaces the file (a new inode).
        drop(DbLock::acquire(out).map_err(locked)?);
    }
    let r = restore(
        targets,
        &RestoreOptions {
            want: Want::Latest,
            force: opts.force,
            database: opts.database.clone(),
        },
        out,
    )?;
    let lock = DbLock::acquire(out).map_err(locked)?;
    let mut s = Standby::open(out, r.page_size, lock)?;
    if s.hashes.db_checksum() != r.db_checksum || s.hashes.len() != r.db_pages {
        bail!(
            "standby {} hashes to {:016x} ({} pages) after restoring position {}, which has {:016x} ({} pages)",
            out.display(),
            s.hashes.db_checksum(),
            s.hashes.len(),
            r.position,
            r.db_checksum,
            r.db_pages
        );
    }
    s.position = r.position;
    s.last = Some(Commit {
        txid: r.position.txid,
        time_ms: r.time_ms,
        db_pages: r.db_pages,
        db_checksum: r.db_checksum,
    });
    s.saved = s.hashes.clone();
    println!(
        "restored {} from {}: position {} ({}); following (every {})",
        out.display(),
        r.url,
        r.position,
        rfc3339(r.time_ms),
        humantime::format_duration(opts.interval)
    );
    info!(
        "standby {} at position {}: following {} replica(s)",
        out.display(),
        r.position,
        targets.len()
    );
    following.store(true, Ordering::SeqCst);
    notifier.ready();
    let mut f = Follower {
        s,
        stop,
        notifier,
        checked: Some(Instant::now()),
        listed_ms: Some(crate::clock::now_ms()),
        dir,
        report,
        error: None,
        commits: 0,
        status_sent: None,
        pinged: None,
        warned: std::collections::BTreeSet::new(),
        caught_up: true,
    };
    f.status();
    let result = f.run(targets, opts);
    notifier.stopping();
    let s = f.s;
    let last = s
        .last
        .ok_or_else(|| anyhow!("internal: no commit applied"))?;
    // Whatever happened, the standby must be at a verified commit boundary.
    s.verify_all()?;
    result?;
    Ok(Followed {
        position: s.position,
        time_ms: last.time_ms,
        db_checksum: last.db_checksum,
        commits: f.commits,
    })
}

/// The standby database: the connection that writes it and what has been applied.
struct Standby {
    path: PathBuf,
    conn: Connection,
    page_size: u32,
    /// Per-page hashes of the standby as applied so far (including an open transaction).
    hashes: PageHashes,
    /// `hashes` as of the last SQLite commit.
    saved: PageHashes,
    /// The generation and last txid committed into the standby.
    position: Position,
    /// The last commit committed into the standby.
    last: Option<Commit>,
    /// The source's page 1 as of the last SQLite commit (see [`PAGE1_OWN_BYTES`]).
    page1: Vec<u8>,
    /// The source's page 1 written in the open transaction, if any.
    page1_pending: Option<Vec<u8>>,
    /// The standby's exclusive `flock` (see [`DbLock`]): a `walship replicate` or another
    /// follower of the same file is refused while this one runs. Declared after `conn` so
    /// that it is dropped after it (closing it earlier would drop SQLite's POSIX locks).
    _lock: DbLock,
}

impl Standby {
    /// Opens the restored file `path` for following: WAL mode, `sqlite_dbpage` available, and
    /// the per-page hashes read back from it.
    fn open(path: &Path, page_size: u32, lock: DbLock) -> Result<Standby> {
        let name = path.display();
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open standby database {name}"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .with_context(|| format!("cannot set a busy timeout on {name}"))?;
        let has_dbpage: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM pragma_module_list WHERE name = 'sqlite_dbpage'",
                [],
                |r| r.get(0),
            )
            .optional()
            .with_context(|| format!("cannot query SQLite's modules on {name}"))?;
        if has_dbpage.is_none() {
            bail!("this walship was built without SQLite's sqlite_dbpage table (LIBSQLITE3_FLAGS=-DSQLITE_ENABLE_DBPAGE_VTAB, see .cargo/config.toml): --follow cannot write {name}");
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .with_context(|| format!("cannot read the journal mode of {name}"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("standby {name} opens in journal mode {mode:?}, not WAL (its source was not in WAL mode): cannot follow it");
        }
        let mut s = Standby {
            path: path.to_owned(),
            conn,
            page_size,
            hashes: PageHashes::new(page_size),
            saved: PageHashes::new(page_size),
            position: Position {
                generation: GenerationId { ms: 0, rand: 0 },
                txid: 0,
            },
            last: None,
            page1: Vec::new(),
            page1_pending: None,
            _lock: lock,
        };
        // Just restored by pwrite: page 1 is byte for byte the source's.
        s.page1 = s
            .conn
            .query_row("SELECT data FROM sqlite_dbpage WHERE pgno = 1", [], |r| {
                r.get(0)
            })
            .with_context(|| format!("cannot read page 1 of {name}"))?;
        s.hashes = s.read_hashes()?;
        Ok(s)
    }

    /// The per-page hashes of the standby as SQLite shows it now.
    fn read_hashes(&self) -> Result<PageHashes> {
        let name = self.path.display();
        let mut h = PageHashes::new(self.page_size);
        let mut stmt = self
            .conn
            .prepare("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
            .with_context(|| format!("cannot read the pages of {name}"))?;
        let mut rows = stmt
            .query([])
            .with_context(|| format!("cannot read the pages of {name}"))?;
        while let Some(row) = rows
            .next()
            .with_context(|| format!("cannot read the pages of {name}"))?
        {
            let pgno: u32 = row.get(0)?;
            let data = row.get_ref(1)?.as_blob()?;
            if data.len() != self.page_size as usize {
                bail!(
                    "standby {name}: page {pgno} has {} bytes, not {}",
                    data.len(),
                    self.page_size
                );
            }
            if pgno == 1 {
                h.set(1, &as_source_page1(data, &self.page1));
            } else {
                h.set(pgno, data);
            }
        }
        Ok(h)
    }

    /// Reads the whole standby back and checks it against the last applied commit, then runs
    /// `PRAGMA integrity_check`.
    fn verify_all(&self) -> Result<()> {
        let name = self.path.display();
        let Some(c) = self.last else {
            bail!("standby {name}: nothing applied");
        };
        let h = self.read_hashes()?;
        if h.db_checksum() != c.db_checksum || h.len() != c.db_pages {
            bail!(
                "standby {name} hashes to {:016x} ({} pages), but position {} has {:016x} ({} pages): it does not equal the source",
                h.db_checksum(),
                h.len(),
                self.position,
                c.db_checksum,
                c.db_pages
            );
        }
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()
            .with_context(|| format!("integrity check of standby {name} failed"))?;
        if rows != ["ok"] {
            bail!(
                "integrity check of standby {name} failed: {}",
                rows.join("; ")
            );
        }
        Ok(())
    }

    /// The standby's page count as SQLite sees it (inside an open transaction too).
    fn page_count(&self) -> Result<u32> {
        self.conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .with_context(|| format!("cannot read the page count of {}", self.path.display()))
    }
}

/// What one poll found to do.
enum Work {
    /// Segments of the standby's generation after the applied txid, up to `target`.
    Continue(Vec<FileName>, u64),
    /// Replace the standby with this plan (a newer generation, or a resync from a snapshot).
    Replace(Plan, u64),
}

struct Follower<'a> {
    s: Standby,
    stop: &'a AtomicBool,
    notifier: &'a Notifier,
    /// When the replica was last listed successfully.
    checked: Option<Instant>,
    /// The same, as a wall-clock time (Unix ms), for the status file.
    listed_ms: Option<u64>,
    /// The follower's state directory, and what its status file says.
    dir: &'a FollowStateDir,
    report: &'a std::cell::RefCell<FollowStatus>,
    /// The last poll's error, if it failed (logged once per distinct message).
    error: Option<String>,
    commits: u64,
    /// What the last `STATUS=` said (position, error) and when.
    status_sent: Option<((Position, Option<String>), Instant)>,
    /// When `WATCHDOG=1` was last sent.
    pinged: Option<Instant>,
    /// The owner-view warnings of the last poll: said once while they last.
    warned: std::collections::BTreeSet<String>,
    /// Whether the last successful poll found the standby at the replica's end.
    caught_up: bool,
}

impl Follower<'_> {
    fn run(&mut self, targets: &[(String, Box<dyn Backend>)], opts: &FollowOptions) -> Result<()> {
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        let _watchers = watch_file_replicas(targets, &wake_tx);
        let mut next_poll = Instant::now();
        let mut last_poll = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            self.alive();
            let now = Instant::now();
            if now < next_poll {
                let wait = (next_poll - now).min(Duration::from_millis(50));
                if wake_rx.recv_timeout(wait).is_ok() {
                    while wake_rx.try_recv().is_ok() {}
                    next_poll = next_poll.min((last_poll + MIN_POLL_GAP).max(now));
                }
                continue;
            }
            last_poll = now;
            next_poll = now + opts.interval;
            let mut errors = Vec::new();
            let mut done = false;
            for (_, t) in targets {
                match self.poll(t.as_ref(), opts) {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(e) if e.downcast_ref::<Fatal>().is_some() => return Err(e),
                    Err(e) => errors.push(format!("{e:#}")),
                }
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            if done {
                if let Some(e) = self.error.take() {
                    info!(
                        "following again at position {} (after: {e})",
                        self.s.position
                    );
                }
            } else if !errors.is_empty() {
                let e = errors.join(" | ");
                if self.error.as_deref() != Some(e.as_str()) {
                    warn!(
                        "cannot follow the replica (retrying every {}): {e}",
                        humantime::format_duration(opts.interval)
                    );
                }
                self.error = Some(e);
            }
            self.status();
        }
        Ok(())
    }

    /// `WATCHDOG=1`, at most once a second (the loop turns every 50 ms at most).
    fn alive(&mut self) {
        if self
            .pinged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.notifier.watchdog();
            self.pinged = Some(Instant::now());
        }
    }

    /// One-line status (`STATUS=`) and the status file: position, lag, replica check, error;
    /// sent and written when the position or the error changed, else once a second.
    fn status(&mut self) {
        let key = (self.s.position, self.error.clone());
        if self
            .status_sent
            .as_ref()
            .is_some_and(|(k, at)| *k == key && at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.status_sent = Some((key, Instant::now()));
        let now = crate::clock::now_ms();
        let time = self.s.last.map_or(0, |c| c.time_ms);
        // At the replica's end, the standby is as current as the replica shows: no lag (the
        // source may simply be idle). Otherwise, or when the replica cannot be listed, the lag
        // is the age of the last commit applied.
        let at_end = self.caught_up && self.error.is_none();
        let lag_ms = if at_end { 0 } else { now.saturating_sub(time) };
        let lag = if at_end {
            "lag 0.0s (at the replica's end)".to_owned()
        } else {
            format!("lag {:.1}s", lag_ms as f64 / 1000.0)
        };
        let checked = self.checked.map_or_else(
            || "never".to_owned(),
            |t| format!("{:.1}s ago", t.elapsed().as_secs_f64()),
        );
        let mut line = format!(
            "following: position {} ({}), {lag}, replica checked {checked}",
            self.s.position,
            rfc3339(time),
        );
        if let Some(e) = &self.error {
            line.push_str(&format!(", error: {e}"));
        }
        self.notifier.status(&line);
        let st = FollowStatus {
            written_ms: now,
            pid: std::process::id(),
            state: FollowState::Following,
            position: Some((self.s.position.generation, self.s.position.txid)),
            commit_ms: self.s.last.map(|c| c.time_ms),
            lag_ms: Some(lag_ms),
            listed_ms: self.listed_ms,
            error: self.error.clone(),
        };
        self.dir.write(&st);
        *self.report.borrow_mut() = st;
    }

    /// Lists `t`, plans what is new and applies it.
    fn poll(&mut self, t: &dyn Backend, opts: &FollowOptions) -> Result<()> {
        if let Some(db) = &opts.database {
            check_database(t, db)?;
        }
        let mut warned = std::collections::BTreeSet::new();
        let listing = owners_view_told(t, list_settled(t)?, &mut |m| {
            if !self.warned.contains(&m) {
                warn!("{m}");
            }
            warned.insert(m);
        });
        self.warned = warned;
        self.checked = Some(Instant::now());
        self.listed_ms = Some(crate::clock::now_ms());
        let plan =
            plan_restore(&listing, &Want::Latest).map_err(|e| anyhow!("{}: {e}", t.url()))?;
        let end = stop_txid(t, &plan)?;
        let cur = self.s.position;
        let work = if plan.generation == cur.generation {
            if end <= cur.txid {
                self.caught_up = true;
                return Ok(());
            }
            let files: Vec<FileName> = listing
                .generations
                .iter()
                .filter(|(g, _)| *g == cur.generation)
                .flat_map(|(_, f)| f.iter().map(|x| x.0))
                .collect();
            match plan_continuation(&files, cur.txid, end) {
                Some(segs) => Work::Continue(segs, end),
                None if plan.snapshot.last_txid() > cur.txid => {
                    info!(
                        "{}: the segments after txid {} are gone; resyncing from snapshot txid {}",
                        t.url(),
                        cur.txid,
                        plan.snapshot.last_txid()
                    );
                    Work::Replace(plan, end)
                }
                None => bail!(
                    "{}: generation {}: nothing continues the standby's txid {} (the replica holds up to {end})",
                    t.url(),
                    cur.generation,
                    cur.txid
                ),
            }
        } else if plan.generation > cur.generation {
            info!(
                "{}: new generation {} (the standby is at {}): applying its snapshot",
                t.url(),
                plan.generation,
                cur
            );
            Work::Replace(plan, end)
        } else {
            bail!(
                "{}: the replica's latest generation {} is older than the standby's {}: waiting",
                t.url(),
                plan.generation,
                cur.generation
            );
        };
        self.caught_up = false;
        self.apply(t, work)?;
        self.caught_up = !self.stop.load(Ordering::SeqCst);
        Ok(())
    }

    /// Streams `work`'s files and applies their commits in SQLite transactions.
    fn apply(&mut self, t: &dyn Backend, work: Work) -> Result<()> {
        let (g, files, target, replace) = match work {
            Work::Continue(segs, end) => (self.s.position.generation, segs, end, false),
            Work::Replace(plan, end) => {
                let mut f = vec![plan.snapshot];
                f.extend(plan.segments);
                (plan.generation, f, end, true)
            }
        };
        let (tx, rx) = sync_channel::<Result<Chunk>>(2);
        let (free_tx, free_rx) = sync_channel::<Chunk>(4);
        let url = t.url();
        let r = std::thread::scope(|scope| {
            scope.spawn(|| reader(t, g, files, target, tx, free_rx));
            let mut a = Apply::new(self, &url, g, replace);
            let r = a.run(&rx, &free_tx);
            drop(rx);
            r
        });
        r
    }
}

/// The shortest time between two polls that inotify events ask for (a replicator writing
/// continuously sends a stream of them).
const MIN_POLL_GAP: Duration = Duration::from_millis(25);

/// For file:// replicas: an inotify watch on the replica's root (recursive: new generation
/// directories included) that wakes the follow loop when a file is created, renamed into
/// place or removed there. Polling every `--interval` stays the fallback (and the only way
/// for remote replicas); a watch that cannot be set up is logged and left out.
fn watch_file_replicas(
    targets: &[(String, Box<dyn Backend>)],
    wake: &std::sync::mpsc::Sender<()>,
) -> Vec<notify::RecommendedWatcher> {
    use notify::event::ModifyKind;
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut watchers = Vec::new();
    for (_, t) in targets {
        let url = t.url();
        let Some(root) = url.strip_prefix("file://") else {
            continue;
        };
        let tx = wake.clone();
        let w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let Ok(ev) = ev else { return };
            if matches!(
                ev.kind,
                EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(ModifyKind::Name(_))
            ) {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| {
            w.watch(Path::new(root), RecursiveMode::Recursive)
                .map(|()| w)
        });
        match w {
            Ok(w) => watchers.push(w),
            Err(e) => warn!("cannot watch {url} with inotify ({e}): polling it only"),
        }
    }
    watchers
}

/// One poll's application: commits of generation `g` from the reader's chunks.
struct Apply<'a, 'b> {
    f: &'a mut Follower<'b>,
    url: &'a str,
    g: GenerationId,
    /// Commits up to this txid are already in the standby (`None` for a replacement).
    applied: Option<u64>,
    current: Option<FileName>,
    next_in_file: u64,
    skipping: bool,
    /// Whether a SQLite transaction is open, and the page bytes written in it.
    in_txn: bool,
    txn_bytes: usize,
    /// The standby's page count inside the open transaction (the highest page it may hold).
    pages_now: u32,
    /// The last commit verified in the open transaction.
    pending: Option<Commit>,
    /// Pages were written after the last verified commit (the transaction is mid-commit).
    dirty: bool,
}

impl<'a, 'b> Apply<'a, 'b> {
    fn new(f: &'a mut Follower<'b>, url: &'a str, g: GenerationId, replace: bool) -> Self {
        let applied = (!replace).then_some(f.s.position.txid);
        if replace {
            f.s.hashes = PageHashes::new(f.s.page_size);
        }
        Apply {
            f,
            url,
            g,
            applied,
            current: None,
            next_in_file: 0,
            skipping: false,
            in_txn: false,
            txn_bytes: 0,
            pages_now: 0,
            pending: None,
            dirty: false,
        }
    }

    fn label(&self) -> String {
        self.current.map_or_else(
            || self.url.to_owned(),
            |f| {
                format!(
                    "{}/{}",
                    self.url,
                    crate::layout::names::file_path(&self.g, &f)
                )
            },
        )
    }

    fn run(
        &mut self,
        rx: &std::sync::mpsc::Receiver<Result<Chunk>>,
        free: &std::sync::mpsc::SyncSender<Chunk>,
    ) -> Result<()> {
        let r = (|| -> Result<()> {
            'chunks: for chunk in rx.iter() {
                let mut chunk = chunk?;
                for item in chunk.items.drain(..) {
                    match item {
                        Item::File(f, ps) => self.file(f, ps)?,
                        Item::Page(pgno, start) => self.page(pgno, &chunk.data, start)?,
                        Item::Commit(c) => {
                            // No stop at the plan's end: the files' content may go
                            // beyond their names, in whole verified parts (see `reader`).
                            if self.commit(c)? && self.f.stop.load(Ordering::SeqCst) {
                                self.end_txn()?;
                                break 'chunks;
                            }
                        }
                    }
                }
                // A chunk's end at a commit boundary: readers see progress now.
                if self.at_boundary() {
                    self.end_txn()?;
                }
                chunk.data.clear();
                let _ = free.try_send(chunk);
            }
            if self.at_boundary() {
                self.end_txn()?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            self.rollback();
            return Err(e);
        }
        if self.in_txn {
            // Pages of an unfinished commit (the stream ended early): not a boundary.
            self.rollback();
            bail!("{}: the replica ended inside a commit", self.label());
        }
        Ok(())
    }

    /// Whether the open transaction ends at a verified commit (nothing written after it).
    fn at_boundary(&self) -> bool {
        self.in_txn && self.pending.is_some() && !self.dirty
    }

    fn begin(&mut self) -> Result<()> {
        if !self.in_txn {
            self.f
                .s
                .conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(|e| {
                    fatal(format!(
                        "cannot begin a transaction on standby {}: {e}",
                        self.f.s.path.display()
                    ))
                })?;
            self.in_txn = true;
            self.txn_bytes = 0;
            self.pages_now = self.f.s.page_count().map_err(|e| fatal(format!("{e:#}")))?;
        }
        Ok(())
    }

    /// A new file begins: same page size as the standby, no gap after what is applied.
    fn file(&mut self, f: FileName, ps: u32) -> Result<()> {
        self.current = Some(f);
        if ps != self.f.s.page_size {
            return Err(fatal(format!(
                "{}: page size {ps} differs from the standby's {} (the source changed its page size: restore the standby anew)",
                self.label(),
                self.f.s.page_size
            )));
        }
        let first = f.first_txid();
        if let Some(a) = self.applied {
            if first > a + 1 {
                bail!(
                    "{}: gap in the replica: txids {}..{} are missing",
                    self.label(),
                    a + 1,
                    first - 1
                );
            }
        } else if !matches!(f, FileName::Snapshot { .. }) {
            bail!("{}: a replacement must start with a snapshot", self.label());
        }
        self.next_in_file = first;
        self.skipping = self.applied.is_some_and(|a| first <= a);
        Ok(())
    }

    /// Page `pgno`, whose bytes start at `start` in `data`: written into the transaction.
    fn page(&mut self, pgno: u32, data: &[u8], start: usize) -> Result<()> {
        if self.skipping {
            return Ok(());
        }
        if self.current.is_none() {
            bail!("internal: pages before a file");
        }
        let ps = self.f.s.page_size as usize;
        let data = data
            .get(start..start + ps)
            .ok_or_else(|| anyhow!("internal: page beyond its chunk"))?;
        if u64::from(pgno) * u64::from(self.f.s.page_size) > super::MAX_DB_BYTES {
            return Err(fatal(format!(
                "{}: page {pgno} is beyond the {}-byte limit",
                self.label(),
                super::MAX_DB_BYTES
            )));
        }
        self.begin()?;
        self.f
            .s
            .conn
            .prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")
            .and_then(|mut st| st.execute(rusqlite::params![pgno, data]))
            .map_err(|e| {
                fatal(format!(
                    "cannot write page {pgno} into standby {}: {e}",
                    self.f.s.path.display()
                ))
            })?;
        self.f.s.hashes.set(pgno, data);
        if pgno == 1 {
            self.f.s.page1_pending = Some(data.to_vec());
        }
        self.pages_now = self.pages_now.max(pgno);
        self.txn_bytes += ps;
        self.dirty = true;
        Ok(())
    }

    /// A commit record: verified against the hashes; returns whether it was applied (not
    /// skipped). A shrinking commit, or a full batch, ends the transaction here.
    fn commit(&mut self, c: Commit) -> Result<bool> {
        if c.txid != self.next_in_file {
            bail!(
                "{}: commit txid {} where {} was expected from the file name",
                self.label(),
                c.txid,
                self.next_in_file
            );
        }
        self.next_in_file += 1;
        if self.skipping {
            self.skipping = self.applied.is_some_and(|a| self.next_in_file <= a);
            return Ok(false);
        }
        if u64::from(c.db_pages) * u64::from(self.f.s.page_size) > super::MAX_DB_BYTES {
            return Err(fatal(format!(
                "{}: database size of {} pages is beyond the limit",
                self.label(),
                c.db_pages
            )));
        }
        self.begin()?;
        let h = &mut self.f.s.hashes;
        h.set_size(c.db_pages);
        let sum = h.db_checksum();
        if sum != c.db_checksum {
            return Err(fatal(format!(
                "{}: checksum mismatch at txid {}: the standby {} would hash to {sum:016x}, the replica recorded {:016x}",
                self.label(),
                c.txid,
                self.f.s.path.display(),
                c.db_checksum
            )));
        }
        self.applied = Some(c.txid);
        self.pending = Some(c);
        self.dirty = false;
        if c.db_pages < self.pages_now {
            // Truncation applies when the transaction commits, and a later page write in the
            // same transaction would cancel it: commit right here.
            self.f
                .s
                .conn
                .execute(
                    "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, NULL)",
                    [c.db_pages + 1],
                )
                .map_err(|e| {
                    fatal(format!(
                        "cannot truncate standby {} to {} pages: {e}",
                        self.f.s.path.display(),
                        c.db_pages
                    ))
                })?;
            self.end_txn()?;
        } else if self.txn_bytes >= BATCH_BYTES {
            self.end_txn()?;
        }
        Ok(true)
    }

    /// Commits the open transaction (which ends at a verified commit) and checks the size.
    fn end_txn(&mut self) -> Result<()> {
        if !self.in_txn {
            return Ok(());
        }
        let Some(c) = self.pending else {
            bail!("internal: committing a transaction without a verified commit");
        };
        let name = self.f.s.path.display().to_string();
        self.f
            .s
            .conn
            .execute_batch("COMMIT")
            .map_err(|e| fatal(format!("cannot commit into standby {name}: {e}")))?;
        self.in_txn = false;
        self.pending = None;
        let pages = self.f.s.page_count().map_err(|e| fatal(format!("{e:#}")))?;
        if pages != c.db_pages {
            return Err(fatal(format!(
                "standby {name} has {pages} pages after txid {}, which has {}",
                c.txid, c.db_pages
            )));
        }
        self.f.s.saved.clone_from(&self.f.s.hashes);
        if let Some(p) = self.f.s.page1_pending.take() {
            self.f.s.page1 = p;
        }
        let from = self.f.s.position;
        self.f.s.position = Position {
            generation: self.g,
            txid: c.txid,
        };
        self.f.commits += if from.generation == self.g {
            c.txid.saturating_sub(from.txid)
        } else {
            1
        };
        self.f.s.last = Some(c);
        self.f.alive();
        tracing::debug!("standby {name} at position {}", self.f.s.position);
        Ok(())
    }

    /// Rolls back the open transaction and the hashes with it.
    fn rollback(&mut self) {
        if self.in_txn {
            if let Err(e) = self.f.s.conn.execute_batch("ROLLBACK") {
                warn!(
                    "cannot roll back on standby {}: {e}",
                    self.f.s.path.display()
                );
            }
            self.in_txn = false;
        }
        self.pending = None;
        self.f.s.page1_pending = None;
        self.f.s.hashes.clone_from(&self.f.s.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only SQLite's own bytes of page 1 are taken from the source's image; a difference
    /// anywhere else stays.
    #[test]
    fn page1_takes_only_sqlites_own_bytes_from_the_source() {
        let source: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8).collect();
        let mut standby = source.clone();
        for r in PAGE1_OWN_BYTES {
            for b in &mut standby[r] {
                *b = b.wrapping_add(1);
            }
        }
        assert_eq!(as_source_page1(&standby, &source), source);
        standby[28] ^= 1; // the in-header database size is content
        assert_ne!(as_source_page1(&standby, &source), source);
    }
}
