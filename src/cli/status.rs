//! `walship status`: whether replication is healthy, from what the daemon keeps in its state
//! directory, for people and for monitors (`--json`, and an exit code per state).
//!
//! Where the state is: `--state-dir`, else the config's `state-dir`, whose default for an
//! instance NAME (`walship status NAME`, or `--config /etc/walship/NAME.toml`) is the unit's
//! `/var/lib/walship/NAME` (see `config::default_state_dir`); a database path is looked up
//! among the instance configs, so it finds the service's state too.
//!
//! With `--follow`, the warm standby's follower instead (module `follow`): its own state
//! directory (`config::default_follow_state_dir`, `/var/lib/walship-follow/NAME` for an
//! instance), never the daemon's.
//!
//! Invariants: the daemon's own lock says whether it runs, never the age of a file; the status
//! file of a daemon that is not running is never shown as current (no lag is claimed for it):
//! only when it was written, what each replica durably holds, and what is known to be on no
//! replica. The exit code is the worst state found, in the order of [`Health`]: a lag above
//! `--max-lag` is worse than a failing replica, since it is what a monitor's bound is about.

use super::source;
use super::{StatusArgs, UsageError};
use crate::clock::{now_ms, rfc3339};
use crate::config::{self, Settings};
use crate::db::WalPos;
use crate::replicate::state::{
    Captured, ReplicaPosition, SavedCapture, StateDir, Status, PERMANENT,
};
use crate::wal::{WalHeader, FRAME_HEADER_SIZE, WAL_HEADER_SIZE};
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The states a monitor tells apart, worst first; each has its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Health {
    /// No daemon holds the state directory's lock (exit 3).
    NotRunning,
    /// The lag is above `--max-lag`, whatever the cause (exit 5).
    Lagging,
    /// Something fails, a replica or reading the database, with the lag within bounds (exit 4).
    Failing,
    /// The daemon runs, and waits for the database file to be created (exit 7). Apart from
    /// "starting": it may last (a mistyped `db` path waits forever), so a monitor should see it.
    WaitingForDb,
    /// The daemon runs but is not replicating yet (exit 6).
    Starting,
    /// Running, nothing failing, lag within bounds (exit 0).
    Healthy,
}

impl Health {
    /// The state, first that applies: not running, lag above `max_lag_ms`, something failing,
    /// waiting for the database, not replicating yet (no progress reported), healthy.
    fn of(
        running: bool,
        lag_ms: Option<u64>,
        max_lag_ms: Option<u64>,
        failing: bool,
        status: Option<&Status>,
    ) -> Health {
        if !running {
            Health::NotRunning
        } else if lag_ms.zip(max_lag_ms).is_some_and(|(l, m)| l > m) {
            Health::Lagging
        } else if failing {
            Health::Failing
        } else if matches!(status, Some(Status::WaitingForDb(_))) {
            Health::WaitingForDb
        } else if !matches!(status, Some(Status::Replicating(_))) {
            Health::Starting
        } else {
            Health::Healthy
        }
    }

    /// The exit code of this state (documented in `walship status --help`).
    pub(crate) fn exit_code(self) -> u8 {
        match self {
            Health::Healthy => 0,
            Health::NotRunning => 3,
            Health::Failing => 4,
            Health::Lagging => 5,
            Health::Starting => 6,
            Health::WaitingForDb => 7,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::NotRunning => "not running",
            Health::Failing => "failing",
            Health::Lagging => "lagging",
            Health::Starting => "starting",
            Health::WaitingForDb => "waiting for the database",
        }
    }
}

/// The `--json` object; field names are a stable interface (listed in `--help`).
#[derive(Debug, Serialize)]
struct Report {
    health: Health,
    exit_code: u8,
    daemon_running: bool,
    state_dir: PathBuf,
    db: Option<PathBuf>,
    /// The status file's line, as the daemon last wrote it (stale when it is not running).
    last_status: Option<String>,
    last_status_ms: Option<u64>,
    /// The daemon's own words while starting.
    starting: Option<String>,
    /// The database file the daemon waits for (it does not exist yet).
    waiting_for_db: Option<PathBuf>,
    /// Age of the oldest commit some replica lacks, now; only while the daemon runs.
    lag_ms: Option<u64>,
    max_lag_ms: Option<u64>,
    replicas_ok: Option<usize>,
    replicas_total: Option<usize>,
    /// The newest captured commit.
    generation: Option<String>,
    txid: Option<u64>,
    captured_ms: Option<u64>,
    failing: Vec<String>,
    replicas: Vec<ReplicaReport>,
    /// Captured commits that some replica does not hold (they wait in the spool).
    unshipped: Option<bool>,
    /// Commits in the database's WAL that walship never captured (checked while it is not
    /// running; `null`: cannot tell cheaply).
    uncaptured_commits: Option<bool>,
}

#[derive(Debug, Serialize)]
struct ReplicaReport {
    name: String,
    generation: Option<String>,
    txid: Option<u64>,
    /// When the newest commit it holds was captured.
    commit_ms: Option<u64>,
    /// When it last durably received a file (`null` if recorded by an older walship).
    received_ms: Option<u64>,
    /// Whether it holds the newest captured commit.
    caught_up: Option<bool>,
    error: Option<String>,
    /// Whether `error` needs an operator rather than time (see `state::PERMANENT`).
    permanent: bool,
}

pub(super) fn run(a: StatusArgs) -> Result<ExitCode> {
    let max_lag = a
        .max_lag
        .as_deref()
        .map(config::parse_duration)
        .transpose()
        .map_err(UsageError)?;
    if a.follow {
        return follow::run(a, max_lag);
    }
    let (config, target) = source::instance_name(a.config, a.target);
    let found = match target {
        Some(db) => Some(for_db(Path::new(&db))?),
        None => source::load(&config)?.map(|s| {
            let names = s.replicas.iter().map(|r| r.name.clone()).collect();
            (s.state_dir, s.db, names)
        }),
    };
    let (state_dir, db, replicas) =
        match (found, a.state_dir) {
            (Some((dir, db, names)), d) => (d.unwrap_or(dir), Some(db), names),
            (None, Some(d)) => (d, None, Vec::new()),
            (None, None) => return Err(UsageError(
                "status: give an instance NAME, --config FILE, a database path or --state-dir DIR"
                    .into(),
            )
            .into()),
        };
    let report = gather(&state_dir, db, &replicas, max_lag)?;
    let mut out = std::io::stdout().lock();
    let written = if a.json {
        serde_json::to_writer(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        print_human(&mut out, &report)
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r.context("cannot write to stdout")?,
    }
    Ok(ExitCode::from(report.exit_code))
}

/// The state directory, database and replica names for a database named by its path: those
/// of the instance config in the config directory that replicates it (so its state is the
/// service's), else the default for a database replicated by hand (`walship replicate DB URL`).
fn for_db(db: &Path) -> Result<(PathBuf, PathBuf, Vec<String>)> {
    let db = std::path::absolute(db)
        .with_context(|| format!("invalid database path {}", db.display()))?;
    let same = |p: &Path| match (std::fs::canonicalize(p), std::fs::canonicalize(&db)) {
        (Ok(a), Ok(b)) => a == b,
        _ => p == db,
    };
    let mut found: Vec<Settings> = std::fs::read_dir(config::config_dir())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| config::load(&p).ok())
        .filter(|s| same(&s.db))
        .collect();
    match (found.pop(), found.is_empty()) {
        (Some(s), true) => {
            let names = s.replicas.iter().map(|r| r.name.clone()).collect();
            Ok((s.state_dir, s.db, names))
        }
        _ => Ok((config::default_state_dir(&db, None), db, Vec::new())),
    }
}

fn gather(
    dir: &Path,
    db: Option<PathBuf>,
    configured: &[String],
    max_lag: Option<Duration>,
) -> Result<Report> {
    let state = StateDir::new(dir);
    let running = state.daemon_running();
    let file = state.read_status()?;
    let capture = state.load_capture().ok().flatten();
    let positions = state.positions();
    let now = now_ms();
    let max_lag_ms = max_lag.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));

    let head = capture.as_ref().map(|c| c.cur.at);
    let progress = match file.as_ref().map(|f| &f.status) {
        Some(Status::Replicating(p)) => Some(p),
        _ => None,
    };
    let failing: Vec<String> = progress
        .and_then(|p| p.failing.as_deref())
        .map(|f| f.split("; ").map(str::to_owned).collect())
        .unwrap_or_default();
    let replicas = replica_reports(configured, &positions, &failing, running, head);
    let unshipped = head.map(|_| replicas.iter().any(|r| r.caught_up == Some(false)));
    // While the daemon runs the status file is rewritten whenever the lag changes from 0 (within
    // 150 ms while it stays below that, see the main loop's `report`), so a positive
    // lag has grown since by the file's age.
    let lag_ms = match (running, progress, &file) {
        (true, Some(p), Some(f)) if p.lag_ms > 0 => {
            Some(p.lag_ms.saturating_add(now.saturating_sub(f.written_ms)))
        }
        (true, Some(_), Some(_)) => Some(0),
        _ => None,
    };
    let uncaptured_commits = match (&db, &capture) {
        (Some(db), Some(c)) if !running => uncaptured(db, c),
        _ => None,
    };
    let health = Health::of(
        running,
        lag_ms,
        max_lag_ms,
        !failing.is_empty(),
        file.as_ref().map(|f| &f.status),
    );
    Ok(Report {
        health,
        exit_code: health.exit_code(),
        daemon_running: running,
        state_dir: dir.to_owned(),
        db,
        last_status: file.as_ref().map(|f| f.status.to_string()),
        last_status_ms: file.as_ref().map(|f| f.written_ms),
        starting: match file.as_ref().map(|f| &f.status) {
            Some(Status::Starting(s)) => Some(s.clone()),
            _ => None,
        },
        waiting_for_db: match file.as_ref().map(|f| &f.status) {
            Some(Status::WaitingForDb(p)) if running => Some(p.clone()),
            _ => None,
        },
        lag_ms,
        max_lag_ms,
        replicas_ok: progress.filter(|_| running).map(|p| p.ok),
        replicas_total: progress.filter(|_| running).map(|p| p.total),
        generation: head
            .map(|h| h.generation.to_string())
            .or_else(|| progress.map(|p| p.generation.to_string())),
        txid: head.map(|h| h.txid).or_else(|| progress.map(|p| p.txid)),
        captured_ms: head.map(|h| h.time_ms),
        failing: if running { failing } else { Vec::new() },
        replicas,
        unshipped,
        uncaptured_commits,
    })
}

/// One report per replica: the configured ones first, then any other with a recorded
/// position. Errors are the running daemon's (`<name>: <error>` in its status).
fn replica_reports(
    configured: &[String],
    positions: &[(String, ReplicaPosition)],
    failing: &[String],
    running: bool,
    head: Option<Captured>,
) -> Vec<ReplicaReport> {
    let mut names: Vec<String> = configured.to_vec();
    for (n, _) in positions {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
        .into_iter()
        .map(|name| {
            let pos = positions.iter().find(|(n, _)| *n == name).map(|(_, p)| p);
            let prefix = format!("{name}: ");
            let error = failing
                .iter()
                .find_map(|f| f.strip_prefix(&prefix))
                .filter(|_| running)
                .map(str::to_owned);
            ReplicaReport {
                generation: pos.map(|p| p.key.generation.to_string()),
                txid: pos.map(|p| p.key.last),
                commit_ms: pos.map(|p| p.time_ms),
                received_ms: pos.and_then(|p| p.received_ms),
                caught_up: head.map(|h| {
                    pos.is_some_and(|p| p.key.generation == h.generation && p.key.last >= h.txid)
                }),
                permanent: error.as_deref().is_some_and(|e| e.starts_with(PERMANENT)),
                error,
                name,
            }
        })
        .collect()
}

/// Whether the database's WAL holds commits after what walship captured: `Some(false)` only
/// when the WAL is the one it captured and ends where it stopped; `None` when that cannot be
/// told without reading the whole database (no WAL, or a new WAL without a commit yet).
fn uncaptured(db: &Path, c: &SavedCapture) -> Option<bool> {
    let mut f = File::open(crate::db::sidecar(db, "-wal")).ok()?;
    let mut hdr = [0u8; WAL_HEADER_SIZE];
    f.read_exact(&mut hdr).ok()?;
    let h = WalHeader::parse(&hdr).ok()?;
    let same: Option<WalPos> = c
        .cur
        .pos
        .filter(|p| (p.salt1, p.salt2, p.page_size) == (h.salt1, h.salt2, h.page_size));
    let (frames, mut running) = same.map_or((0, h.checksum), |p| (p.frames, p.running));
    let size = u64::try_from(h.frame_size()).ok()?;
    f.seek(SeekFrom::Start(
        u64::try_from(WAL_HEADER_SIZE).ok()? + frames.checked_mul(size)?,
    ))
    .ok()?;
    let mut fh = [0u8; FRAME_HEADER_SIZE];
    let mut page = vec![0u8; h.page_size as usize];
    while f.read_exact(&mut fh).is_ok() && f.read_exact(&mut page).is_ok() {
        let Some((frame, next)) = h.check_frame(running, &fh, &page) else {
            break;
        };
        if frame.is_commit() {
            return Some(true);
        }
        running = next;
    }
    same.map(|_| false)
}

mod follow {
    //! `walship status --follow`: the warm standby's follower, from its state directory
    //! (see `restore::follow_state`). Its lock says whether it runs; the exit codes are the
    //! daemon's, for the follower's states.

    use super::{ago, duration, source, Health, StatusArgs, UsageError};
    use crate::clock::now_ms;
    use crate::config;
    use crate::restore::follow_state::{FollowState, FollowStateDir, FollowStatus};
    use anyhow::{Context, Result};
    use serde::Serialize;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::time::Duration;

    /// The `--json` object of `status --follow`; field names are a stable interface.
    #[derive(Debug, Serialize)]
    struct Report {
        health: Health,
        exit_code: u8,
        running: bool,
        state: Option<&'static str>,
        state_dir: PathBuf,
        db: Option<PathBuf>,
        pid: Option<u32>,
        generation: Option<String>,
        txid: Option<u64>,
        commit_ms: Option<u64>,
        lag_ms: Option<u64>,
        max_lag_ms: Option<u64>,
        listed_ms: Option<u64>,
        error: Option<String>,
        written_ms: Option<u64>,
    }

    pub(super) fn run(a: StatusArgs, max_lag: Option<Duration>) -> Result<ExitCode> {
        let (config, target) = source::instance_name(a.config, a.target);
        let found: Option<(PathBuf, PathBuf)> = match (target, &config.config) {
            (Some(db), _) => Some(for_db(Path::new(&db))?),
            (None, Some(c)) => {
                let path = config::resolve_config_path(c);
                let s = config::load(&path)?;
                let instance = config::instance_of(&path);
                Some((
                    config::default_follow_state_dir(&s.db, instance.as_deref()),
                    s.db,
                ))
            }
            (None, None) => None,
        };
        let (dir, db) = match (found, a.state_dir) {
            (Some((dir, db)), d) => (d.unwrap_or(dir), Some(db)),
            (None, Some(d)) => (d, None),
            (None, None) => {
                return Err(UsageError(
                    "status --follow: give an instance NAME, --config FILE, the standby's path or --state-dir DIR"
                        .into(),
                )
                .into())
            }
        };
        let r = gather(&dir, db, max_lag)?;
        let mut out = std::io::stdout().lock();
        let written = if a.json {
            serde_json::to_writer(&mut out, &r)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out))
        } else {
            print_human(&mut out, &r)
        };
        match written.and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.context("cannot write to stdout")?,
        }
        Ok(ExitCode::from(r.exit_code))
    }

    /// The follower's state directory for the standby at `db`: that of the instance whose
    /// config names it as `db`, else the default for a standby followed by hand.
    fn for_db(db: &Path) -> Result<(PathBuf, PathBuf)> {
        let db = std::path::absolute(db)
            .with_context(|| format!("invalid database path {}", db.display()))?;
        let same = |p: &Path| match (std::fs::canonicalize(p), std::fs::canonicalize(&db)) {
            (Ok(a), Ok(b)) => a == b,
            _ => p == db,
        };
        let mut found: Vec<String> = std::fs::read_dir(config::config_dir())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .filter(|p| config::load(p).is_ok_and(|s| same(&s.db)))
            .filter_map(|p| config::instance_of(&p))
            .collect();
        let instance = match (found.pop(), found.is_empty()) {
            (Some(n), true) => Some(n),
            _ => None,
        };
        Ok((
            config::default_follow_state_dir(&db, instance.as_deref()),
            db,
        ))
    }

    fn gather(dir: &Path, db: Option<PathBuf>, max_lag: Option<Duration>) -> Result<Report> {
        let sd = FollowStateDir::new(dir);
        let running = sd.running();
        let file: Option<FollowStatus> = sd.read()?;
        let now = now_ms();
        let max_lag_ms = max_lag.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let f = file.as_ref();
        let following = running && f.is_some_and(|f| f.state == FollowState::Following);
        // A positive lag has grown since the file was written; 0 means the last listing showed
        // nothing newer, which holds until the next one.
        let lag_ms = f.filter(|_| following).and_then(|f| {
            f.lag_ms.map(|l| {
                if l > 0 {
                    l.saturating_add(now.saturating_sub(f.written_ms))
                } else {
                    0
                }
            })
        });
        let error = f.and_then(|f| f.error.clone());
        // "stopped" is written just before the lock is released: not running either way.
        let health = if !running || f.is_none_or(|f| f.state == FollowState::Stopped) {
            Health::NotRunning
        } else if lag_ms.zip(max_lag_ms).is_some_and(|(l, m)| l > m) {
            Health::Lagging
        } else if error.is_some() {
            Health::Failing
        } else if !following {
            Health::Starting
        } else {
            Health::Healthy
        };
        Ok(Report {
            health,
            exit_code: health.exit_code(),
            running,
            state: f.map(|f| match f.state {
                FollowState::Restoring => "restoring",
                FollowState::Following => "following",
                FollowState::Stopped => "stopped",
            }),
            state_dir: dir.to_owned(),
            db,
            pid: f.map(|f| f.pid),
            generation: f.and_then(|f| f.position).map(|(g, _)| g.to_string()),
            txid: f.and_then(|f| f.position).map(|(_, t)| t),
            commit_ms: f.and_then(|f| f.commit_ms),
            lag_ms,
            max_lag_ms,
            listed_ms: f.and_then(|f| f.listed_ms),
            error,
            written_ms: f.map(|f| f.written_ms),
        })
    }

    fn print_human(o: &mut impl Write, r: &Report) -> std::io::Result<()> {
        let now = now_ms();
        writeln!(o, "health:     {} (exit {})", r.health.word(), r.exit_code)?;
        match (r.running, r.state, r.pid) {
            (true, Some(s), Some(pid)) => writeln!(o, "follower:   {s} (pid {pid})")?,
            (true, _, _) => writeln!(o, "follower:   running")?,
            (false, Some(s), Some(pid)) => {
                writeln!(o, "follower:   not running (last said: {s}, pid {pid})")?
            }
            (false, _, _) => writeln!(o, "follower:   not running")?,
        }
        writeln!(o, "state:      {}", r.state_dir.display())?;
        if let Some(db) = &r.db {
            writeln!(o, "standby:    {}", db.display())?;
        }
        match (r.written_ms, r.running) {
            (None, _) => writeln!(
                o,
                "status:     none (no follower has run with this state directory)"
            )?,
            (Some(w), true) => writeln!(o, "updated:    {}", ago(now, w))?,
            (Some(w), false) => writeln!(
                o,
                "last seen:  {} (the follower's last report; not current)",
                ago(now, w)
            )?,
        }
        if let (Some(g), Some(t)) = (&r.generation, r.txid) {
            match r.commit_ms {
                Some(c) => writeln!(o, "position:   {g}/{t}, committed {}", ago(now, c))?,
                None => writeln!(o, "position:   {g}/{t}")?,
            }
        }
        if let Some(l) = r.lag_ms {
            match r.max_lag_ms {
                Some(m) => writeln!(o, "lag:        {} (max {})", duration(l), duration(m))?,
                None => writeln!(o, "lag:        {}", duration(l))?,
            }
        }
        if let Some(l) = r.listed_ms {
            writeln!(o, "listed:     replica last listed {}", ago(now, l))?;
        }
        if let Some(e) = &r.error {
            writeln!(o, "failing:    {e}")?;
        }
        Ok(())
    }
}

fn ago(now: u64, ms: u64) -> String {
    format!("{} ({} ago)", rfc3339(ms), duration(now.saturating_sub(ms)))
}

/// A duration for people: whole seconds past a minute, milliseconds below.
fn duration(ms: u64) -> String {
    let d = if ms >= 60_000 {
        Duration::from_secs(ms / 1000)
    } else {
        Duration::from_millis(ms)
    };
    humantime::format_duration(d).to_string()
}

fn print_human(o: &mut impl Write, r: &Report) -> std::io::Result<()> {
    let now = now_ms();
    writeln!(o, "health:     {} (exit {})", r.health.word(), r.exit_code)?;
    writeln!(
        o,
        "daemon:     {}",
        if r.daemon_running {
            "running"
        } else {
            "not running"
        }
    )?;
    writeln!(o, "state:      {}", r.state_dir.display())?;
    if let Some(db) = &r.db {
        writeln!(o, "database:   {}", db.display())?;
    }
    match (r.last_status_ms, r.daemon_running) {
        (None, _) => writeln!(
            o,
            "status:     none (walship has not run with this state directory)"
        )?,
        (Some(w), true) => writeln!(o, "updated:    {}", ago(now, w))?,
        (Some(w), false) => writeln!(
            o,
            "last seen:  {} (the daemon's last report; not current)",
            ago(now, w)
        )?,
    }
    if let Some(s) = &r.starting {
        writeln!(o, "starting:   {s}")?;
    }
    if let Some(p) = &r.waiting_for_db {
        writeln!(
            o,
            "waiting:    for {} to be created (replication starts when it appears)",
            p.display()
        )?;
    }
    if let (Some(g), Some(t)) = (&r.generation, r.txid) {
        match r.captured_ms {
            Some(c) => writeln!(o, "captured:   {g}/{t}, committed {}", ago(now, c))?,
            None => writeln!(o, "captured:   {g}/{t}")?,
        }
    }
    if r.daemon_running {
        if let (Some(ok), Some(total)) = (r.replicas_ok, r.replicas_total) {
            writeln!(
                o,
                "replicated: {ok}/{total} replicas hold everything captured"
            )?;
        }
        if let Some(l) = r.lag_ms {
            match r.max_lag_ms {
                Some(m) => writeln!(o, "lag:        {} (max {})", duration(l), duration(m))?,
                None => writeln!(o, "lag:        {}", duration(l))?,
            }
        }
    }
    for f in &r.failing {
        // A replica's error that needs an operator reads `NAME: permanent: ...`.
        writeln!(o, "failing:    {f}")?;
    }
    for x in &r.replicas {
        print_replica(o, x, now)?;
    }
    if r.unshipped == Some(true) {
        let behind: Vec<&str> = r
            .replicas
            .iter()
            .filter(|x| x.caught_up == Some(false))
            .map(|x| x.name.as_str())
            .collect();
        writeln!(
            o,
            "unshipped:  captured commits on no replica of {} (kept in the spool until shipped)",
            behind.join(", ")
        )?;
    }
    if r.uncaptured_commits == Some(true) {
        writeln!(
            o,
            "uncaptured: the database has commits after the last captured one: no replica holds them (they are shipped when walship starts)"
        )?;
    }
    Ok(())
}

/// One line for one replica: what it holds, whether that is all, when it last received
/// something, and its error.
fn print_replica(o: &mut impl Write, x: &ReplicaReport, now: u64) -> std::io::Result<()> {
    write!(o, "replica {}: ", x.name)?;
    match (&x.generation, x.txid) {
        (Some(g), Some(t)) => write!(o, "holds {g}/{t}")?,
        _ => write!(o, "holds nothing yet")?,
    }
    if let Some(c) = x.commit_ms {
        write!(o, " (committed {})", rfc3339(c))?;
    }
    match x.caught_up {
        Some(true) => write!(o, ", all that was captured")?,
        Some(false) => write!(o, ", behind")?,
        None => {}
    }
    if let Some(rcv) = x.received_ms {
        write!(o, "; last received {}", ago(now, rcv))?;
    }
    if let Some(e) = &x.error {
        write!(o, "; failing: {e}")?;
    }
    writeln!(o)?;
    Ok(())
}
