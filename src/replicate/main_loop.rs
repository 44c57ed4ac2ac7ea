//! The daemon's main loop: one round per wake-up captures what the database gained, notices
//! a replaced database file, snapshots when due, trims the spool, and reports.
//!
//! Invariants: the loop wakes only for file events on the database or its WAL, replica
//! progress (an upload's only when no capture is due within 100 ms, whose round shows it:
//! `Shared::round_due_soon`), signals, and timers that are due (watchdog, snapshot interval; for
//! [`CHECKPOINTER_WATCH`] after each change, while no capture is due, a look every
//! [`CHECKPOINTER_POLL`] for an application's checkpoint waiting on walship, which runs a
//! round only if it finds one; the end of a [`GROUP_WINDOW`]; a status put off for
//! [`STATUS_EVERY`]); an idle database costs no work. Errors of a round are logged when they
//! change, not on every retry, and the round is tried again.
//!
//! Group commit: a change is captured at once when nothing was captured for [`GROUP_WINDOW`]
//! (an idle database's commit never waits), else when that window since the start of the last
//! capture ends, so that commits arriving in a stream share one capture, one append to the
//! spool, one upload and one position save instead of each paying for its own (walship's cost
//! per commit is per capture, mostly its fsyncs, not per byte). The window adapts: once two
//! captures in a row came within twice [`GROUP_WINDOW_STREAM`] of each other (a stream), it is
//! [`GROUP_WINDOW_STREAM`], until the stream stops. A commit waits at most
//! [`GROUP_WINDOW_STREAM`] for this. While commits stream, a capture that found commits sets
//! the next one due at the end of the window, and the watcher reports nothing until it looks
//! (`ChangeGate::look_later`): the application's next write then raises no inotify event, and
//! walship is not woken for it (an event per window woke walship's main thread ~15% more
//! often at 100 commits/s). A writer that outruns capture (a bulk load, a writer
//! committing as fast as it can) gets the short [`HOT_WINDOW`] for [`HOT_FOR`]: its commits
//! are big or many, and the stream window let its WAL grow tens of MiB; no window at all meant
//! a capture, its fsyncs and a pin move (each a copy with two fsyncs in the application's
//! autocheckpoint) for every ~40 frames. Meanwhile, if that writer's commits are small,
//! walship keeps SQLite's checkpointer lock between its rounds (see `capture::checkpoint`);
//! every wake-up looks whether it still should.
//! Every durability step of a capture and an upload stays as it was; only how many commits one
//! capture holds changes. After such a capture the pin moves only if it last moved 500 ms ago
//! or more (`Capture::rotate_pin_between`).

use super::capture::{Capture, Step, VOLATILE_MAX_AGE};
use super::dblock::DbLock;
use super::replaced::Replaced;
use super::ship::Shared;
use super::spool::{self, Spool};
use super::state::{Captured, Progress, StateDir, Status};
use super::{Msg, Stopped};
use crate::clock::now_ms;
use crate::config::Settings;
use crate::db::WalChange;
use crate::systemd::Notifier;
use anyhow::Result;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// How long after a change to the database the main loop keeps looking, every
/// [`CHECKPOINTER_POLL`], for an application's checkpoint waiting for walship's read lock.
const CHECKPOINTER_WATCH: Duration = Duration::from_secs(2);
const CHECKPOINTER_POLL: Duration = Duration::from_millis(20);

/// Captures that found something are at least this far apart while commits keep coming (see
/// the module doc), counted from their start...
pub(crate) const GROUP_WINDOW: Duration = Duration::from_millis(25);

/// ...and this far apart in a stream: at 100 commits/s, 8-9 commits per capture instead of
/// 1, for ~42 ms more lag on average (lag p50 ~44 ms, p99 ~86 ms at that rate, within the
/// 50 / 250 ms that #12 allows; each capture's fsyncs and each upload's round trips are most
/// of walship's CPU). 75 ms had p50 ~39 ms and 13% more captures; 90 ms had p50 47-49 ms,
/// too close to 50 on a busy machine.
pub(crate) const GROUP_WINDOW_STREAM: Duration = Duration::from_millis(85);

/// How long after a writer outran capture (see `Capture::is_hot`) captures come after
/// [`HOT_WINDOW`] instead of the usual window...
const HOT_FOR: Duration = Duration::from_secs(1);

/// ...which is short: a bulk load writes ~2 MiB in 10 ms on these machines. A max-rate
/// single-row writer ran at 0.84-0.95x its speed alone with 10 ms (and the chase's pace, see
/// `capture::checkpoint`), 0.65-0.80x with none.
const HOT_WINDOW: Duration = Duration::from_millis(10);

/// A lag below this, after a status that showed none, is not worth a new status at once (see
/// [`MainLoop::report`])...
const STATUS_SETTLE: Duration = Duration::from_millis(150);

/// ...nor is a new position while the replicas keep up: while commits stream, such a status
/// is written this much later, with what holds then (see [`MainLoop::status_due_at`]).
/// Without this, every capture rewrote the status twice (captured, then shipped), a file
/// created each time; at 150 ms, while commits streamed, the status file was still ~7% of
/// walship's CPU.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// READY is sent at the latest this long after start-up, caught up or not.
const READY_AT_THE_LATEST: Duration = Duration::from_secs(30);

/// The running daemon's main loop and what it keeps between rounds.
pub(crate) struct MainLoop<'a> {
    pub(crate) settings: &'a Settings,
    pub(crate) notifier: &'a Notifier,
    pub(crate) state: StateDir,
    pub(crate) shared: Arc<Shared>,
    pub(crate) spool: Arc<Spool>,
    pub(crate) rx: Receiver<Msg>,
    /// The database being captured; `None` from the moment its file was replaced or deleted
    /// until the new file is opened (see [`Replaced`]).
    pub(crate) cap: Option<Capture>,
    /// Where capture stands (kept while `cap` is `None`).
    pub(crate) at: Captured,
    /// The lock on the database file (see `dblock`); `None` while the file was replaced and
    /// the new one is not open yet.
    pub(crate) db_lock: Option<DbLock>,
    replaced: Option<Replaced>,
    /// SIGTERM/SIGINT drained with other messages in the last round (two: stop at once).
    signals: u32,
    /// Whether `READY=1` was sent (start-up sends it early when the database is missing).
    pub(crate) ready: bool,
    started: Instant,
    last_snapshot: Instant,
    last_change: Instant,
    /// When the last round began (see [`MainLoop::only_looking`]).
    last_round: Instant,
    /// When a capture round last captured commits (see [`GROUP_WINDOW`]), and the one before.
    last_captured: Option<Instant>,
    prev_captured: Option<Instant>,
    /// Until when captures follow each other after [`HOT_WINDOW`] only: a writer outran
    /// capture lately (see [`HOT_FOR`]).
    hot_until: Option<Instant>,
    /// A change on the database not captured yet: capture is due at this instant.
    capture_due: Option<Instant>,
    status: Option<Status>,
    /// A status not written yet (see [`MainLoop::report`]) is written at this instant.
    status_due: Option<Instant>,
    failing_since: Option<Instant>,
    last_capture_error: String,
    last_snapshot_error: String,
}

impl<'a> MainLoop<'a> {
    /// A loop over a capture that was just started.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        settings: &'a Settings,
        notifier: &'a Notifier,
        state: StateDir,
        shared: Arc<Shared>,
        spool: Arc<Spool>,
        rx: Receiver<Msg>,
        cap: Capture,
        db_lock: DbLock,
    ) -> MainLoop<'a> {
        let now = Instant::now();
        MainLoop {
            settings,
            notifier,
            state,
            shared,
            spool,
            rx,
            at: cap.at,
            cap: Some(cap),
            db_lock: Some(db_lock),
            replaced: None,
            signals: 0,
            ready: false,
            started: now,
            last_snapshot: now,
            last_change: now,
            last_round: now,
            last_captured: None,
            prev_captured: None,
            hot_until: None,
            capture_due: None,
            status: None,
            status_due: None,
            failing_since: None,
            last_capture_error: String::new(),
            last_snapshot_error: String::new(),
        }
    }

    /// Runs rounds until SIGTERM/SIGINT.
    pub(crate) fn run(&mut self) {
        loop {
            stall_failpoint();
            // Shippers need not wake a loop that will run a round for a due capture anyway
            // (see `Shared::round_due_soon`).
            self.shared.lock().round_due = self.capture_due;
            let msg = self.rx.recv_timeout(self.timeout());
            self.shared.lock().round_due = None;
            self.keep_checkpoints();
            if matches!(msg, Err(RecvTimeoutError::Timeout)) && self.only_looking() {
                continue;
            }
            let mut changed = matches!(msg, Ok(Msg::Changed));
            if matches!(msg, Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected)) {
                break;
            }
            // Drain what else is queued: events coalesce (signals do not: a second one means
            // "stop at once").
            while let Ok(m) = self.rx.try_recv() {
                match m {
                    Msg::Stop => self.signals += 1,
                    Msg::Changed => changed = true,
                    Msg::Progress => {}
                }
            }
            if changed {
                self.last_change = Instant::now();
                let window = self.window();
                self.capture_due.get_or_insert_with(|| {
                    self.last_captured
                        .map_or(self.last_change, |t| t + window)
                        .max(self.last_change)
                });
            }
            self.round();
            if self.signals > 0 {
                break;
            }
        }
    }

    /// While a writer of small commits outruns capture (for [`HOT_FOR`] after it last did),
    /// walship keeps SQLite's checkpointer lock between its rounds (see
    /// `Capture::keep_checkpoints`); looked at on every wake-up, so that it ends within one
    /// [`CHECKPOINTER_POLL`] once that time is up.
    fn keep_checkpoints(&mut self) {
        let hot = self.hot_until.is_some_and(|t| Instant::now() < t);
        if let Some(c) = self.cap.as_mut() {
            if let Err(e) = c.keep_checkpoints(hot) {
                // Only the application's own checkpoints are then left to run as they may.
                tracing::debug!("{e:#}");
            }
        }
    }

    /// The group-commit window (see the module doc): [`GROUP_WINDOW_STREAM`] while the last
    /// two captures came within twice that of each other (a capture that ends a window starts
    /// a little after it), else [`GROUP_WINDOW`].
    fn window(&self) -> Duration {
        if self.hot_until.is_some_and(|t| Instant::now() < t) {
            return HOT_WINDOW;
        }
        match (self.prev_captured, self.last_captured) {
            (Some(a), Some(b)) if b.saturating_duration_since(a) <= 2 * GROUP_WINDOW_STREAM => {
                GROUP_WINDOW_STREAM
            }
            _ => GROUP_WINDOW,
        }
    }

    /// Whether a wake-up that no message caused is only the look for a waiting checkpointer
    /// (see [`CHECKPOINTER_POLL`]) and found none: nothing else is due (a capture, a status, a
    /// snapshot, the watchdog, a retry), so no round runs. While commits stream, this look
    /// comes every [`CHECKPOINTER_POLL`]; a whole round there (the database's stat, the
    /// spool's upkeep, the status computed) was a good share of walship's CPU per commit.
    fn only_looking(&self) -> bool {
        let now = Instant::now();
        let Some(c) = self.cap.as_ref() else {
            return false;
        };
        let not_due = |due: Option<Instant>| due.is_none_or(|d| now < d);
        self.ready
            && self.failing_since.is_none()
            && self.replaced.is_none()
            && not_due(self.capture_due)
            && not_due(self.status_due_at())
            && self.last_snapshot.elapsed() < self.settings.snapshot_interval
            && self
                .notifier
                .watchdog_interval()
                .is_none_or(|i| self.last_round.elapsed() < i)
            && !c.checkpointer_waiting()
            && !c.has_volatile()
    }

    /// How long to wait for the next event.
    fn timeout(&self) -> Duration {
        // From the last round: a wake-up that ran none (see `only_looking`) sent no ping.
        let timeout = self
            .notifier
            .watchdog_interval()
            .map_or(Duration::from_secs(3600), |i| {
                i.saturating_sub(self.last_round.elapsed())
            })
            .min(
                self.settings
                    .snapshot_interval
                    .saturating_sub(self.last_snapshot.elapsed())
                    .max(Duration::from_millis(10)),
            );
        let volatile = self.cap.as_ref().is_some_and(Capture::has_volatile);
        let timeout = if self.failing_since.is_some() || !self.ready || self.cap.is_none() {
            timeout.min(Duration::from_millis(200))
        } else if volatile {
            // Spool files published without a sync are synced once VOLATILE_MAX_AGE old.
            timeout.min(VOLATILE_MAX_AGE / 4)
        } else if self.last_change.elapsed() < CHECKPOINTER_WATCH && self.capture_due.is_none() {
            // An application's checkpoint waiting for walship's read lock changes no file, so
            // no event says so: look for one for a while after each change. While a capture is
            // due, its round looks (and only a capture can let a checkpointer through then,
            // see `capture`): a stream of commits wakes no more than its captures do.
            timeout.min(CHECKPOINTER_POLL)
        } else {
            timeout
        };
        [self.capture_due, self.status_due_at()]
            .into_iter()
            .flatten()
            .fold(timeout, |t, due| {
                t.min(due.saturating_duration_since(Instant::now()))
            })
    }

    fn round(&mut self) {
        self.last_round = Instant::now();
        self.capture();
        self.notice_replaced();
        self.reopen_replaced();
        self.snapshot_if_due();
        // What capture holds now: the watcher reports no write that adds nothing past it.
        let mark = self.cap.as_ref().and_then(Capture::wal_mark);
        self.shared
            .changes
            .captured(mark.filter(|_| self.failing_since.is_none()));
        let spooled = match gc_spool(
            &self.spool,
            &self.state,
            &self.shared,
            self.settings.spool_limit,
        ) {
            Ok(files) => files,
            Err(e) => {
                warn!("spool maintenance failed: {e:#}");
                self.spool.list().unwrap_or_default()
            }
        };
        if let Some(Err(e)) = self
            .cap
            .as_mut()
            .map(|c| c.settle_volatile(VOLATILE_MAX_AGE))
        {
            warn!("spool maintenance failed: {e:#}");
        }
        self.report(&spooled);
        self.notifier.watchdog();
    }

    fn capture(&mut self) {
        // A change waits for the end of the group window (see the module doc); rounds woken
        // meanwhile (a replica's progress) leave it for then, and the watcher reports no more
        // (see `ChangeGate`): the capture then reads what came meanwhile.
        if self.cap.is_some() && self.capture_due.is_some_and(|due| Instant::now() < due) {
            return;
        }
        self.shared.changes.looking();
        let Some(c) = self.cap.as_mut() else { return };
        self.capture_due = None;
        let db = self.settings.db.display();
        let (before, began) = (c.key(), Instant::now());
        let hot = c.is_hot(self.settings.checkpoint_pages);
        let r = capture_round(c, self.settings, &self.shared, hot);
        let found = c.key() != before;
        if found {
            // From its start: a capture that takes a while (fsyncs on a busy disk) must not
            // stretch the window.
            self.prev_captured = self.last_captured.replace(began);
        }
        if hot {
            // A writer that outruns capture gets the short window for a while (see
            // [`HOT_FOR`]), even once its WAL restarted.
            self.hot_until = Some(Instant::now() + HOT_FOR);
        }
        if r.is_ok() && c.is_hot(self.settings.checkpoint_pages) {
            // ...and is chased at once (the chase paces its own steps, see `capture_round`).
            self.capture_due = Some(Instant::now());
        }
        if found {
            self.last_change = Instant::now();
            if self.capture_due.is_none() && self.window() != GROUP_WINDOW {
                // While commits stream, the next capture is due at the end of the window
                // anyway: the watcher reports nothing until then (see
                // `ChangeGate::look_later`). The application's next write then raises no
                // event, and walship is not woken up once more per window for it. A capture
                // that finds nothing goes back to waiting for an event.
                self.capture_due = Some(began + self.window());
                self.shared.changes.look_later();
            }
        }
        self.keep_checkpoints();
        match r {
            Ok(()) => {
                if self.failing_since.take().is_some() {
                    info!(db = %db, "capture works again");
                }
                self.last_capture_error.clear();
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != self.last_capture_error {
                    error!(db = %db, error_kind = "capture", "capture failed: {msg}");
                    self.last_capture_error = msg;
                }
                self.failing_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Closes every handle on a database file that was replaced or deleted: kept open, its WAL
    /// and wal-index would be paired with the new file by anyone opening it (walship included).
    fn notice_replaced(&mut self) {
        let Some(c) = self.cap.take_if(|c| c.db_replaced()) else {
            return;
        };
        let r = Replaced::close(c, &self.settings.db);
        // The old file's connections are closed: its lock can go.
        self.db_lock = None;
        warn!(db = %self.settings.db.display(), error_kind = "db-replaced", "the database file was {}: closed every handle on the old file; a new generation starts once the new file can be opened", r.how);
        self.replaced = Some(r);
    }

    fn reopen_replaced(&mut self) {
        let Some(r) = self.replaced.as_mut() else {
            return;
        };
        match r.reopen(&self.spool, &self.state, self.settings) {
            Ok(Some((c, lock))) => {
                kick_head(&self.shared, &c);
                self.cap = Some(c);
                self.db_lock = Some(lock);
                self.replaced = None;
            }
            Ok(None) => r.last_error.clear(),
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != r.last_error {
                    error!(db = %self.settings.db.display(), error_kind = "db-replaced", "cannot open the new database file: {msg}");
                    r.last_error = msg;
                }
            }
        }
    }

    fn snapshot_if_due(&mut self) {
        let Some(c) = self.cap.as_mut() else { return };
        let want = std::mem::take(&mut self.shared.lock().snapshot_wanted);
        if want || self.last_snapshot.elapsed() >= self.settings.snapshot_interval {
            let r = c.snapshot().map(|()| kick_head(&self.shared, c));
            match new_generation_if_broken(c, &self.shared, r) {
                Ok(()) => {
                    self.last_snapshot = Instant::now();
                    self.last_snapshot_error.clear();
                }
                Err(e) => {
                    // Retried with backoff (see Capture::snapshot); logged when it changes.
                    let msg = format!("{e:#}");
                    if msg != self.last_snapshot_error {
                        error!(db = %self.settings.db.display(), "snapshot failed: {msg}");
                        self.last_snapshot_error = msg;
                    }
                    self.shared.lock().snapshot_wanted = want;
                }
            }
        }
        self.at = c.at;
    }

    /// Updates the status where it changed (and what the metrics export, see
    /// `Shared::observe`), and says READY once every replica is settled (or after
    /// [`READY_AT_THE_LATEST`]).
    ///
    /// While replicas keep up, a status that differs from the one written only by its
    /// position, or by a lag below [`STATUS_SETTLE`] after a written lag of 0, is written only
    /// [`STATUS_EVERY`] later, or [`STATUS_SETTLE`] after the last change if that comes first
    /// ([`MainLoop::status_due_at`]), with what holds then: a replica [`STATUS_SETTLE`] behind
    /// or failing, a caught-up replica after a written lag, a new generation, are written at
    /// once, so the status never shows a lag that is gone, never hides one above
    /// [`STATUS_SETTLE`], and shows a position at most [`STATUS_EVERY`] old.
    fn report(&mut self, spooled: &[spool::SpoolFile]) {
        let problem = self
            .replaced
            .as_ref()
            .map(|r| format!("the file was {}, {}", r.how, r.waiting()));
        let (st, caught_up) = status(&self.at, &self.shared, &self.spool, spooled, problem);
        self.shared.observe(&self.at, &self.spool, spooled);
        if self.status.as_ref() == Some(&st) {
            self.status_due = None;
        } else if settled(self.status.as_ref(), &st)
            && self.status_due_at().is_none_or(|due| Instant::now() < due)
        {
            self.status_due
                .get_or_insert_with(|| Instant::now() + STATUS_EVERY);
        } else {
            self.notifier.status(&st.to_string());
            self.state.write_status(&st);
            self.status = Some(st);
            self.status_due = None;
        }
        if !self.ready && (caught_up || self.started.elapsed() > READY_AT_THE_LATEST) {
            self.ready = true;
            self.shared.lock().ready = true;
            self.notifier.ready();
            if let Some(st) = &self.status {
                info!("ready: {st}");
            }
        }
    }

    /// When a status put off (see [`MainLoop::report`]) is written: [`STATUS_EVERY`] after
    /// it was put off, or once no change came for [`STATUS_SETTLE`], whichever is first (a
    /// stream's end shows at once; only a stream is written once a second).
    fn status_due_at(&self) -> Option<Instant> {
        self.status_due
            .map(|due| due.min(self.last_change + STATUS_SETTLE))
    }

    /// Graceful stop: captures the last commits and gives replicas `shutdown-timeout` to
    /// receive them (a second SIGTERM/SIGINT ends the wait at once), then saves the page hashes
    /// for the next start. Says whether every replica holds everything captured; if not, the
    /// last log line names the replicas behind and what they miss.
    pub(crate) fn shutdown(mut self, shippers: Vec<JoinHandle<()>>) -> Stopped {
        let timeout = self.settings.shutdown_timeout;
        self.notifier.stopping();
        // Whatever the unit's TimeoutStopSec=, the configured wait is not cut short by SIGKILL.
        self.notifier.extend_timeout(timeout + STOP_MARGIN);
        info!(
            "stopping: shipping what is pending (at most {}; a second SIGTERM or SIGINT stops at once)",
            humantime::format_duration(timeout)
        );
        if let Some(c) = self.cap.as_mut() {
            let hot = c.is_hot(self.settings.checkpoint_pages);
            let _ = capture_round(c, self.settings, &self.shared, hot);
            self.at = c.at;
        }
        let deadline = Instant::now() + timeout;
        {
            let mut g = self.shared.lock();
            g.stopping = true;
            g.deadline = Some(deadline);
        }
        kick(&self.shared);
        self.wait_for_shippers(shippers, deadline);
        if let Some(Err(e)) = self.cap.as_mut().map(|c| c.settle_volatile(Duration::ZERO)) {
            warn!("{e:#}: the next start after a reboot may need a full snapshot");
        }
        let spooled = self.spool.list().unwrap_or_default();
        let (st, _) = status(&self.at, &self.shared, &self.spool, &spooled, None);
        self.shared.observe(&self.at, &self.spool, &spooled);
        self.state.write_status(&st);
        if let Some(Err(e)) = self.cap.as_ref().map(Capture::save_hashes) {
            warn!("{e:#}: the next start may need a full snapshot");
        }
        let behind = behind(&self.at, &self.shared);
        // Connections first, then the lock (see `dblock`).
        drop(self.cap.take());
        drop(self.db_lock.take());
        if behind.is_empty() {
            info!("stopped: {st}");
            Stopped::Shipped
        } else {
            error!(
                error_kind = "stopped-behind",
                "stopped with captured commits not on every replica: {} (kept locally, shipped at the next start)",
                behind.join("; ")
            );
            Stopped::Behind
        }
    }

    /// Waits until every shipper ended, `deadline` passed, or a second signal came; shippers
    /// still busy then (a replica that hangs) are left behind, since the process exits.
    fn wait_for_shippers(&self, mut shippers: Vec<JoinHandle<()>>, deadline: Instant) {
        if self.signals > 1 {
            warn!("second signal: stopping at once, without waiting for the replicas");
            return;
        }
        loop {
            shippers.retain(|h| !h.is_finished());
            if shippers.is_empty() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                warn!(
                    "shutdown-timeout ({}) reached with {} replica(s) still busy: not waiting longer",
                    humantime::format_duration(self.settings.shutdown_timeout),
                    shippers.len()
                );
                return;
            }
            // No WATCHDOG=1 here: systemd stops watching once the unit is deactivating.
            match self.rx.recv_timeout((deadline - now).min(STOP_POLL)) {
                Ok(Msg::Stop) => {
                    warn!("second signal: stopping at once, without waiting for the replicas");
                    return;
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(STOP_POLL),
            }
        }
    }
}

/// How often a stop looks whether the shippers are done.
const STOP_POLL: Duration = Duration::from_millis(50);

/// What a stop asks systemd for beyond `shutdown-timeout` (`EXTEND_TIMEOUT_USEC=`): time to
/// write the status and save the page hashes.
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// The replicas that lack captured commits, each as `<name> misses ...`.
fn behind(at: &Captured, shared: &Shared) -> Vec<String> {
    let head = at.key();
    let g = shared.lock();
    g.replicas
        .iter()
        .filter_map(|r| match r.position {
            Some(p) if p.generation == head.generation && p.last >= head.last => None,
            Some(p) if p.generation == head.generation => Some(format!(
                "{} misses {} commit(s) (txid {} to {} of generation {})",
                r.name,
                head.last - p.last,
                p.last + 1,
                head.last,
                head.generation
            )),
            _ => Some(format!(
                "{} misses generation {} (its snapshot and commits up to txid {})",
                r.name, head.generation, head.last
            )),
        })
        .collect()
}

pub(crate) fn kick(shared: &Shared) {
    shared.lock().version += 1;
    shared.cv.notify_all();
}

pub(crate) fn kick_head(shared: &Shared, cap: &Capture) {
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

/// Capture, pin rotation, checkpoint; a broken WAL starts a new generation. `hot`: the
/// writer outruns capture (`Capture::is_hot`, seen as the round began).
fn capture_round(cap: &mut Capture, settings: &Settings, shared: &Shared, hot: bool) -> Result<()> {
    let r = capture_round_inner(cap, settings, shared, hot);
    new_generation_if_broken(cap, shared, r)
}

/// Wherever continuity broke (a step, a checkpoint's tail, a snapshot, a failed write), a new
/// generation starts; if that fails too, the capture stays poisoned and the next round tries
/// again. Other errors pass through.
fn new_generation_if_broken(cap: &mut Capture, shared: &Shared, r: Result<()>) -> Result<()> {
    match r {
        Err(e) if WalChange::is_broken(&e) => {
            cap.new_generation(
                crate::metrics::GenerationReason::WalBroken,
                &format!("{e:#}"),
            )?;
            cap.rotate_pin()?;
            kick_head(shared, cap);
            Ok(())
        }
        other => other,
    }
}

fn capture_round_inner(
    cap: &mut Capture,
    settings: &Settings,
    shared: &Shared,
    hot: bool,
) -> Result<()> {
    // A writer that outruns capture is chased at once (and held back once the WAL is full,
    // see `capture::checkpoint`): no commits are left for a group window to gather.
    if hot {
        let before = cap.key();
        if cap.checkpoint_now(settings.checkpoint_pages)? || cap.key() != before {
            kick_head(shared, cap);
        }
        if cap.yield_to_checkpointer()? {
            kick_head(shared, cap);
        }
        return Ok(());
    }
    let r = cap.step()?;
    cap.rotate_pin_between()?;
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

/// Deletes spooled files every replica has, then enforces the spool limit; returns what is left.
fn gc_spool(
    spool: &Spool,
    state: &StateDir,
    shared: &Shared,
    limit: u64,
) -> Result<Vec<spool::SpoolFile>> {
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
    let mut positions_durable = false;
    for f in files {
        // The tail stays once shipped: capture appends to it next (see `spool`).
        if min.is_some_and(|m| f.key() <= m) && !spool.is_tail(&f) {
            if !positions_durable {
                state.write_through_positions()?;
                positions_durable = true;
            }
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

/// Whether `new` may wait [`STATUS_EVERY`] to replace the status `written` (see
/// [`MainLoop::report`]): both replicate the same generation, nothing fails, the written one
/// shows no lag, and the new one a lag below [`STATUS_SETTLE`].
fn settled(written: Option<&Status>, new: &Status) -> bool {
    let (Some(Status::Replicating(w)), Status::Replicating(n)) = (written, new) else {
        return false;
    };
    w.total == n.total
        && w.generation == n.generation
        && w.failing.is_none()
        && n.failing.is_none()
        && w.lag_ms == 0
        && Duration::from_millis(n.lag_ms) < STATUS_SETTLE
}

/// The status, and whether every replica is settled: it holds everything captured,
/// or it is known to be failing. A replica that is both counts once, so READY still waits for
/// every reachable replica that has not caught up.
/// `db_problem` says what keeps the database itself from being captured, if anything.
fn status(
    at: &Captured,
    shared: &Shared,
    spool: &Spool,
    files: &[spool::SpoolFile],
    db_problem: Option<String>,
) -> (Status, bool) {
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
            let first_missing = spool
                .first_missing_ms(files, r.position)
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
    let progress = Progress {
        ok,
        total: n,
        lag_ms: max_lag,
        generation: at.generation,
        txid: at.txid,
        failing: (!down.is_empty()).then(|| down.join("; ")),
    };
    (Status::Replicating(progress), settled >= n)
}

/// Test hook: while the file named by `WALSHIP_FAILPOINT_STALL` exists, the main loop
/// stalls (to prove that the watchdog catches a hung loop). The variable is read once: reading
/// the environment every round was 0.5% of walship's CPU at 100 commits/s.
fn stall_failpoint() {
    static STALL: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
    if let Some(p) = STALL.get_or_init(|| std::env::var_os("WALSHIP_FAILPOINT_STALL")) {
        while std::path::Path::new(p).exists() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
