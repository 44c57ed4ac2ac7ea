//! Watching the database's directory (inotify) for what capture must look at: a write to the
//! database or its WAL, and either name created, deleted, renamed or changed (a file moved
//! over the database, see `replaced`).
//!
//! Two inotify instances watch the same directory, because a mask belongs to a watch:
//! - *names* (create, delete, move, attributes): always armed, every event on the database's
//!   or the WAL's name is reported;
//! - *writes* (`IN_MODIFY`): the watcher disarms it (a mask no write raises) as soon as it
//!   reads a write to the database or its WAL, so the application's next writes cost it
//!   nothing, until capture looks again ([`ChangeGate::looking`]) and arms it again. Writes
//!   to other files of the directory leave it armed.
//!
//! Why: SQLite writes each WAL frame with two `write` calls, and a watch that asks
//! for every write makes the kernel queue (or merge into the last queued one) an event for
//! each: 100,000 events for a 200 MiB bulk load, allocated and freed in the application's
//! own `write`. Such a watch (the `notify` crate's mask is fixed, and asks for every write,
//! open and close) cost that load 5-10% of its time, with nothing reading the events; a watch
//! for names only cost it nothing measurable (docs/PERFORMANCE.md, twenty-second session).
//! Before, walship's watcher stopped *reading* events until capture looked (the kernel then
//! merged them), but the application still paid for each.
//!
//! Invariants:
//! - While the writes watch is disarmed, a capture that will read the WAL is due: the watcher
//!   reported a change (`Msg::Changed`), or the main loop set one due at the end of its
//!   group window while commits stream ([`ChangeGate::look_later`]); capture arms the watch
//!   again *before* it reads ([`ChangeGate::looking`]). Otherwise the watcher arms it again
//!   itself before its last look at the WAL. A write after the watch was armed is an event; a
//!   write before is read by the look that follows. So no commit waits for more than the
//!   group window.
//! - A write that adds nothing past what capture holds (see
//!   [`WalMark::holds_all`](crate::wal::WalMark::holds_all)) is not reported. Such stale
//!   writes come behind a bulk load: its checkpoints write the database after capture looked.
//!   Each ran a whole round of the main loop, back to back: ~10,000 rounds for a 200 MiB load.
//! - The mark never claims more than capture holds (it is set from capture's position after
//!   a round, cleared when there is none).

use super::Msg;
use crate::durable::lock;
use anyhow::{Context, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing::warn;

/// The names watch: what can replace or remove the database or its WAL.
const NAMES: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_ONLYDIR);

/// The writes watch, armed: any write to a file of the directory.
const WRITES: AddWatchFlags = AddWatchFlags::IN_MODIFY.union(AddWatchFlags::IN_ONLYDIR);

/// The writes watch, disarmed: the directory itself deleted (a mask cannot be empty), which
/// no write raises.
const DISARMED: AddWatchFlags = AddWatchFlags::IN_DELETE_SELF.union(AddWatchFlags::IN_ONLYDIR);

/// How often the watcher's thread looks whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(500);

/// The watcher's thread; it stops within [`STOP_POLL`] once this is dropped (without
/// waiting for it).
pub(crate) struct Watcher {
    stop: Arc<AtomicBool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts watching the directory of `db` for `shared.changes`, which sends [`Msg::Changed`] on
/// `tx`.
///
/// # Errors
/// inotify cannot be set up (no more instances or watches: `fs.inotify.max_user_*`), or the
/// directory cannot be watched.
pub(crate) fn watch(db: &Path, tx: Sender<Msg>, shared: Arc<super::Shared>) -> Result<Watcher> {
    let dir = db
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let base = db.file_name().map(|s| s.to_owned()).unwrap_or_default();
    let mut wal = base.clone();
    wal.push("-wal");
    let wal_path = dir.join(&wal);
    let init = || Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC);
    let names = init().context("cannot start inotify")?;
    let writes = Arc::new(init().context("cannot start inotify")?);
    names
        .add_watch(&dir, NAMES)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    let changes = &shared.changes;
    // Armed before the first round of the main loop reads the WAL.
    if changes
        .writes
        .set(Arm {
            inotify: writes.clone(),
            dir: dir.clone(),
        })
        .is_err()
    {
        anyhow::bail!("{} is watched already", dir.display());
    }
    changes
        .arm()
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let ours = [base, wal];
    std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            let w = WatchThread {
                names,
                writes,
                ours,
                wal_path,
                tx,
            };
            w.run(&shared.changes, &stopped);
        })
        .context("cannot start the watcher's thread")?;
    Ok(Watcher { stop })
}

struct WatchThread {
    names: Inotify,
    writes: Arc<Inotify>,
    ours: [OsString; 2],
    wal_path: PathBuf,
    tx: Sender<Msg>,
}

impl WatchThread {
    fn run(&self, gate: &ChangeGate, stop: &AtomicBool) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut failed = false;
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [
                PollFd::new(self.names.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.writes.as_fd(), PollFlags::POLLIN),
            ];
            let timeout = PollTimeout::try_from(STOP_POLL).unwrap_or(PollTimeout::MAX);
            let r = poll(&mut fds, timeout).and_then(|n| {
                if n == 0 {
                    return Ok(());
                }
                self.read(&self.names, |e| self.on_name(gate, e))?;
                self.read(&self.writes, |e| self.on_write(gate, e))
            });
            match r {
                Ok(()) => failed = false,
                Err(e) => {
                    // Events may be lost: capture looks, and the next failure in a row is
                    // not logged again.
                    if !failed {
                        warn!("cannot read file events of the database's directory: {e}");
                    }
                    failed = true;
                    gate.changed(&self.tx);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Handles the events queued on `fd` (none is not an error). One read per poll: another
    /// process writing a file of the directory without pause must not keep the thread on the
    /// writes instance while a file moved over the database waits on the names one.
    fn read(&self, fd: &Inotify, each: impl FnMut(&InotifyEvent)) -> nix::Result<()> {
        match fd.read_events() {
            Ok(events) => {
                events.iter().for_each(each);
                Ok(())
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn ours(&self, e: &InotifyEvent) -> bool {
        e.name.as_ref().is_some_and(|n| self.ours.contains(n))
    }

    fn on_name(&self, gate: &ChangeGate, e: &InotifyEvent) {
        // An overflow lost events: look.
        if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) || self.ours(e) {
            gate.changed(&self.tx);
        }
    }

    fn on_write(&self, gate: &ChangeGate, e: &InotifyEvent) {
        if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            gate.changed(&self.tx);
        } else if e.mask.contains(AddWatchFlags::IN_MODIFY) && self.ours(e) {
            gate.written(&self.tx, &self.wal_path);
        }
    }
}

/// The writes instance and the directory it watches: what [`ChangeGate::arm`] needs.
#[derive(Debug)]
struct Arm {
    inotify: Arc<Inotify>,
    dir: PathBuf,
}

/// Where the watcher and capture stand (see [`ChangeGate`]).
#[derive(Debug, Default)]
struct Gate {
    /// A change was reported and capture has not looked since.
    pending: bool,
    /// The writes watch is armed (its mask asks for writes).
    armed: bool,
    /// Events of the writes watch, for tests.
    fired: u64,
}

/// Coalesces file events between the watcher's thread and capture: at most one
/// [`Msg::Changed`] until capture looks, and no event at all for the application's writes
/// meanwhile (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct ChangeGate {
    gate: Mutex<Gate>,
    mark: Mutex<Option<crate::wal::WalMark>>,
    /// Set once the watcher starts (none in tests of the gate alone).
    writes: OnceLock<Arm>,
}

impl ChangeGate {
    /// What capture holds of the WAL now (`None`: unknown, every write is reported).
    pub(crate) fn captured(&self, mark: Option<crate::wal::WalMark>) {
        *lock(&self.mark) = mark;
    }

    /// Capture is about to read the database: changes from now on are reported again, and
    /// the writes watch is armed again (before the read: a write after it is an event).
    pub(crate) fn looking(&self) {
        lock(&self.gate).pending = false;
        if let Err(e) = self.arm() {
            // Only a removed directory makes this fail; its events were read (the names
            // watch) or capture's own look finds the database gone.
            tracing::debug!("cannot watch the database's directory for writes: {e}");
        }
    }

    /// A capture is due anyway (commits stream, see `main_loop`): until it looks, the watcher
    /// reports no change, and the writes watch is not armed again once it fired.
    pub(crate) fn look_later(&self) {
        lock(&self.gate).pending = true;
    }

    /// Arms the writes watch unless it is armed.
    fn arm(&self) -> nix::Result<()> {
        self.set_armed(true)
    }

    /// Arms or disarms the writes watch. The watch's mask changes under the lock that guards
    /// `armed`, so the two always agree.
    fn set_armed(&self, armed: bool) -> nix::Result<()> {
        let mut g = lock(&self.gate);
        if g.armed == armed {
            return Ok(());
        }
        if let Some(a) = self.writes.get() {
            a.inotify
                .add_watch(&a.dir, if armed { WRITES } else { DISARMED })?;
        }
        g.armed = armed;
        Ok(())
    }

    /// An event that is not a write (a name, a lost event): reported unless a report is
    /// pending.
    fn changed(&self, tx: &Sender<Msg>) {
        let mut g = lock(&self.gate);
        if !g.pending {
            g.pending = true;
            let _ = tx.send(Msg::Changed);
        }
    }

    /// The writes watch saw a write to the database or its WAL (at `wal`): it is reported
    /// only if the WAL holds something past the mark. (A write to another file of the
    /// directory changes nothing: the watch stays armed, and the kernel merges such events
    /// while they wait to be read.)
    fn written(&self, tx: &Sender<Msg>, wal: &Path) {
        // Disarmed at once: the writes queued meanwhile are a few, not one per write until
        // capture looks. (Not `IN_ONESHOT`: the kernel drops such a watch after it queued the
        // event, and a watch added again in between was dropped with it, for good.)
        if self.set_armed(false).is_err() {
            return self.changed(tx);
        }
        {
            let mut g = lock(&self.gate);
            g.fired += 1;
            if g.pending {
                // Capture arms the watch again when it looks.
                return;
            }
        }
        if self.holds_all(wal) {
            // Armed again before the last look: a write after it is an event, one before
            // it is seen by the look.
            if self.arm().is_err() {
                return self.changed(tx);
            }
            if self.holds_all(wal) {
                return;
            }
        }
        self.changed(tx);
    }

    /// True if the WAL at `wal` has nothing past the mark; false when that cannot be told.
    fn holds_all(&self, wal: &Path) -> bool {
        let Some(mark) = *lock(&self.mark) else {
            return false;
        };
        let read = || -> std::io::Result<bool> {
            let f = std::fs::File::open(wal)?;
            let mut header = [0u8; crate::wal::WAL_HEADER_SIZE];
            let mut frame = [0u8; crate::wal::FRAME_HEADER_SIZE];
            let h = crate::db::read_full_at(&f, &mut header, 0)?;
            let n = crate::db::read_full_at(&f, &mut frame, mark.next)?;
            Ok(mark.holds_all(&header[..h], &frame[..n]))
        };
        read().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{WalHeader, WalMark, FRAME_HEADER_SIZE, WAL_HEADER_SIZE};
    use std::sync::mpsc::{channel, Receiver};

    /// The mark after every frame of the WAL at `wal`.
    fn end_of(wal: &Path) -> Result<WalMark> {
        let bytes = std::fs::read(wal)?;
        let h = WalHeader::parse(&bytes)?;
        let frames = (bytes.len() - WAL_HEADER_SIZE) / (FRAME_HEADER_SIZE + h.page_size as usize);
        WalMark::after(h.salt1, h.salt2, h.page_size, frames as u64).context("a mark past 64 bits")
    }

    /// A write whose WAL holds nothing past capture's mark is not reported; a commit past the
    /// mark, a restarted WAL, an unknown mark and an event that is not a write are.
    #[test]
    fn writes_are_reported_only_past_what_capture_holds() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (db, app) = crate::db::tests::wal_app(dir.path())?;
        let wal = crate::db::sidecar(&db, "-wal");
        let gate = ChangeGate::default();
        let (tx, rx) = channel();
        let reported = |written: Option<&Path>| -> bool {
            gate.looking();
            match written {
                Some(w) => gate.written(&tx, w),
                None => gate.changed(&tx),
            }
            rx.try_recv().is_ok()
        };
        assert!(reported(Some(&wal)), "no mark: every write is reported");
        gate.captured(Some(end_of(&wal)?));
        assert!(!reported(Some(&wal)), "a stale write was reported");
        assert!(reported(None), "an event that is not a write");
        app.execute("insert into t values (2)", [])?;
        assert!(reported(Some(&wal)), "a commit past the mark");
        gate.captured(Some(end_of(&wal)?));
        assert!(!reported(Some(&wal)));
        app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        assert!(reported(Some(&wal)), "a truncated WAL");
        app.execute("insert into t values (3)", [])?;
        assert!(reported(Some(&wal)), "a restarted WAL");
        gate.captured(None);
        assert!(reported(Some(&wal)), "a mark cleared");
        Ok(())
    }

    /// Waits up to 2 s for a report.
    fn reported(rx: &Receiver<Msg>) -> bool {
        matches!(rx.recv_timeout(Duration::from_secs(2)), Ok(Msg::Changed))
    }

    fn fired(shared: &super::super::Shared) -> u64 {
        lock(&shared.changes.gate).fired
    }

    /// With the real watcher: a commit is reported once; the application's writes until
    /// capture looks raise no event at all (the writes watch is disarmed); after
    /// capture looks, the next commit is reported; a stale write arms the watch again by
    /// itself, so the commit after it is reported without capture looking; while a capture is
    /// due anyway (`look_later`) nothing is reported; a write to another file is not
    /// reported, a file renamed over the database is.
    #[test]
    fn the_watcher_sees_each_change_and_no_write_until_capture_looks() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (db, app) = crate::db::tests::wal_app(dir.path())?;
        let wal = crate::db::sidecar(&db, "-wal");
        let shared = Arc::new(super::super::Shared::default());
        let (tx, rx) = channel();
        let _w = watch(&db, tx, shared.clone())?;
        let gate = &shared.changes;

        app.execute("insert into t values (10)", [])?;
        assert!(reported(&rx), "a commit was not reported");
        // The commit's writes queued before the watch was disarmed are read meanwhile.
        std::thread::sleep(Duration::from_millis(50));
        let before = fired(&shared);
        for i in 0..200 {
            app.execute("insert into t values (?1)", [100 + i])?;
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            rx.try_recv().is_err(),
            "reported twice before capture looked"
        );
        let raised = fired(&shared) - before;
        assert!(
            raised == 0,
            "200 commits raised {raised} events before capture looked"
        );

        gate.looking();
        app.execute("insert into t values (11)", [])?;
        assert!(
            reported(&rx),
            "a commit after capture looked was not reported"
        );

        // Capture holds everything: a write to the database file (a checkpoint) is stale.
        gate.looking();
        gate.captured(Some(end_of(&wal)?));
        let before = fired(&shared);
        app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            fired(&shared) > before,
            "the checkpoint's write raised no event"
        );
        assert!(rx.try_recv().is_err(), "a stale write was reported");
        app.execute("insert into t values (12)", [])?;
        assert!(
            reported(&rx),
            "a commit after a stale write was not reported"
        );

        // A capture due anyway (commits stream): nothing is reported until it looks.
        gate.looking();
        gate.look_later();
        for i in 0..50 {
            app.execute("insert into t values (?1)", [1000 + i])?;
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            rx.try_recv().is_err(),
            "reported while a capture was due anyway"
        );
        gate.looking();
        app.execute("insert into t values (13)", [])?;
        assert!(
            reported(&rx),
            "a commit after the due capture looked was not reported"
        );

        // A write to another file is not reported, a file renamed over the database is.
        gate.looking();
        let other = dir.path().join("other.db");
        std::fs::write(&other, b"x")?;
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            rx.try_recv().is_err(),
            "a write to another file was reported"
        );
        std::fs::rename(&other, &db)?;
        assert!(
            reported(&rx),
            "a file renamed over the database was not reported"
        );
        Ok(())
    }

    /// Beside another process's writes to a file of the same directory (events that are not
    /// the database's, each disarming and arming the writes watch again), every commit after
    /// capture looked is still reported: the watch is never left disarmed with nothing due.
    /// (A one-shot watch failed this: the kernel dropped it after its event, and dropped with
    /// it the same watch armed again meanwhile; walship then never heard of the WAL again.)
    #[test]
    fn commits_are_reported_beside_another_file_written_without_pause() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (db, app) = crate::db::tests::wal_app(dir.path())?;
        let shared = Arc::new(super::super::Shared::default());
        let (tx, rx) = channel();
        let _w = watch(&db, tx, shared.clone())?;
        let stop = Arc::new(AtomicBool::new(false));
        let noise = {
            let (stop, path) = (stop.clone(), dir.path().join("noise"));
            std::thread::spawn(move || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(path)?;
                while !stop.load(Ordering::Relaxed) {
                    f.write_all(&[0u8; 512])?;
                }
                Ok(())
            })
        };
        let mut missed = 0;
        for i in 0..300 {
            shared.changes.looking();
            app.execute("insert into t values (?1)", [i])?;
            if !reported(&rx) {
                missed += 1;
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = noise.join();
        assert_eq!(missed, 0, "a commit was never reported");
        Ok(())
    }
}
