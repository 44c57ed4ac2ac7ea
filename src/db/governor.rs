//! The governor: a thread that holds an application's writers back once the WAL reaches a hard
//! limit while walship's capture thread is busy elsewhere, so that the WAL's bound does not
//! depend on how long any one thing capture does takes.
//!
//! Capture takes SQLite's write lock itself once the WAL is full (see
//! `replicate::capture::checkpoint`), but it looks only between its own steps. A step can
//! take tens of milliseconds (its own checkpoint's fsync of the database, a publish on a
//! journaled file system whose journal is flushing the application's writes), and a bulk
//! writer whose checkpoints walship holds off appends ~1 MiB a millisecond meanwhile: the WAL
//! of a 200 MiB load was seen at 62-70 MiB on a journaled ext4 (4 runs of 30), 64 MiB being
//! the bound #12 sets.
//!
//! Invariants:
//! - The governor acts only while capture has armed it (for a while after each chase of a
//!   writer), never while checkpoints back off for a reader, and only on a WAL that holds at
//!   least its hard limit of frames, not all of them copied.
//! - The write lock is one byte of `-shm`, and POSIX locks belong to the process: the
//!   governor's lock and capture's are the same lock. Who holds it is kept in [`WriteLock`],
//!   and every `fcntl` on that byte happens under its mutex: capture adopts a lock the
//!   governor holds (taking it again all the same: it trusts the kernel, not the
//!   bookkeeping) and then releases it as its own; the governor never takes one capture
//!   holds or is trying to take, and releases only its own.
//! - The governor holds the lock at most [`HOLD_BUDGET`]: if capture has not taken it over by
//!   then (a snapshot, a stalled disk), it lets go and stays quiet until capture arms it again.
//!   Nor does it take the lock again in a WAL in which capture let go of it (see [`over`]).
//!   An application's commit must never fail on walship's account, so the bound yields to
//!   that.

use super::{fcntl_lock, read_wal_index, SHM_WRITE_LOCK};
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often an armed governor reads the wal-index: a bulk writer appends about 2 MiB in that
/// time on these machines. Each look costs ~17 µs of CPU (1.8% of a core at 1 ms).
const POLL: Duration = Duration::from_millis(2);

/// How long the governor tries, without sleeping, to win the lock between two transactions of
/// a writer that commits back to back (as [`super::Db::lock_writes`] does).
const SPIN: Duration = Duration::from_millis(20);

/// Longest the governor holds the write lock without capture taking it over.
const HOLD_BUDGET: Duration = Duration::from_millis(500);

/// Who in walship holds SQLite's WAL write lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Nobody,
    /// The governor, since then.
    Governor(Instant),
    /// Capture (see [`super::Db::lock_writes`]).
    Capture,
}

/// SQLite's WAL write lock, as walship's threads share it (see the module doc).
pub(super) struct WriteLock {
    shm: Arc<File>,
    state: Mutex<State>,
    /// Capture is trying to take the lock.
    wanted: std::sync::atomic::AtomicBool,
}

/// Who holds the lock, and where capture last let go of it.
struct State {
    holder: Holder,
    /// The salts of the WAL in which capture last let go of the lock (see [`over`]).
    released_in: Option<(u32, u32)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WriteLock {
    pub(super) fn new(shm: Arc<File>) -> WriteLock {
        WriteLock {
            shm,
            state: Mutex::new(State {
                holder: Holder::Nobody,
                released_in: None,
            }),
            wanted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes the lock for capture without waiting, or adopts the governor's; false if an
    /// application writer holds it.
    pub(super) fn take_for_capture(&self) -> std::io::Result<bool> {
        let mut st = lock(&self.state);
        // Taken again even when walship holds it (a no-op then): capture relies on the lock,
        // so it trusts the kernel, not the bookkeeping.
        if !fcntl_lock(&self.shm, nix::libc::F_WRLCK as i16, SHM_WRITE_LOCK)? {
            return Ok(false);
        }
        if let Holder::Governor(since) = st.holder {
            tracing::debug!(
                held_ms = since.elapsed().as_millis() as u64,
                "capture took over the write lock the governor held"
            );
        }
        st.holder = Holder::Capture;
        Ok(true)
    }

    /// Says whether capture is trying to take the lock (see [`super::Db::lock_writes`]): the
    /// governor does not compete with it meanwhile, for a CPU the writer needs to finish the
    /// transaction both wait for.
    pub(super) fn set_wanted(&self, wanted: bool) {
        self.wanted
            .store(wanted, std::sync::atomic::Ordering::Relaxed);
    }

    /// Releases the lock if capture holds it.
    pub(super) fn release_capture(&self) {
        let mut st = lock(&self.state);
        if st.holder == Holder::Capture {
            unlock(&self.shm);
            st.holder = Holder::Nobody;
            st.released_in = read_wal_index(&self.shm).map(|i| (i.salt1, i.salt2));
        }
    }

    /// Whether the governor holds the lock.
    pub(super) fn governor_holds(&self) -> bool {
        matches!(lock(&self.state).holder, Holder::Governor(_))
    }

    /// Takes the lock for the governor without waiting, if nobody in walship holds it.
    fn take_for_governor(&self) -> std::io::Result<bool> {
        let mut st = lock(&self.state);
        if st.holder != Holder::Nobody
            || !fcntl_lock(&self.shm, nix::libc::F_WRLCK as i16, SHM_WRITE_LOCK)?
        {
            return Ok(false);
        }
        st.holder = Holder::Governor(Instant::now());
        Ok(true)
    }

    /// Releases the governor's lock if it was held at least `after`; true if it did.
    fn release_governor(&self, after: Duration) -> bool {
        let mut st = lock(&self.state);
        match st.holder {
            Holder::Governor(since) if since.elapsed() >= after => {
                unlock(&self.shm);
                st.holder = Holder::Nobody;
                true
            }
            _ => false,
        }
    }
}

fn unlock(shm: &File) {
    if let Err(e) = fcntl_lock(shm, nix::libc::F_UNLCK as i16, SHM_WRITE_LOCK) {
        tracing::error!("cannot release the WAL write lock: {e}");
    }
}

/// What capture asks of the governor.
#[derive(Debug, Default)]
struct Arm {
    /// Armed until then.
    until: Option<Instant>,
    /// The hard limit: frames in the WAL (see [`Governor::arm`]).
    frames: u32,
    /// Held the lock for [`HOLD_BUDGET`] without capture taking it over: idle until armed again.
    quiet: bool,
    stop: bool,
}

struct Shared {
    lock: Arc<WriteLock>,
    arm: Mutex<Arm>,
    cv: Condvar,
}

/// The governor of one database (see the module doc); its thread starts when first armed.
pub(super) struct Governor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Governor {
    pub(super) fn new(lock: Arc<WriteLock>) -> Governor {
        Governor {
            shared: Arc::new(Shared {
                lock,
                arm: Mutex::new(Arm::default()),
                cv: Condvar::new(),
            }),
            thread: None,
        }
    }

    /// Arms the governor for `period`: writers are held back whenever the WAL holds at least
    /// `frames` frames, not all copied.
    pub(super) fn arm(&mut self, frames: u32, period: Duration) {
        if self.thread.is_none() {
            let shared = self.shared.clone();
            match std::thread::Builder::new()
                .name("wal-governor".into())
                .spawn(move || run(&shared))
            {
                Ok(t) => self.thread = Some(t),
                Err(e) => {
                    tracing::warn!("cannot start the WAL governor thread: {e}");
                    return;
                }
            }
        }
        let mut a = lock(&self.shared.arm);
        a.until = Some(Instant::now() + period);
        a.frames = frames.max(1);
        a.quiet = false;
        self.shared.cv.notify_all();
    }

    /// Disarms the governor and releases the lock if it holds it.
    pub(super) fn disarm(&self) {
        lock(&self.shared.arm).until = None;
        self.shared.lock.release_governor(Duration::ZERO);
    }
}

impl Drop for Governor {
    fn drop(&mut self) {
        lock(&self.shared.arm).stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.lock.release_governor(Duration::ZERO);
    }
}

/// The governor's thread.
fn run(s: &Shared) {
    loop {
        let Some(frames) = wait_armed(s) else {
            return;
        };
        if s.lock.release_governor(HOLD_BUDGET) {
            lock(&s.arm).quiet = true;
            tracing::warn!(
                "held the application's writers back for {} ms without capture taking over: letting go (the WAL may grow past its bound)",
                HOLD_BUDGET.as_millis()
            );
            continue;
        }
        if over(s, frames) {
            let t0 = Instant::now();
            while t0.elapsed() < SPIN && over(s, frames) {
                match s.lock.take_for_governor() {
                    Ok(true) => {
                        tracing::debug!(
                            limit = frames,
                            frames = read_wal_index(&s.lock.shm).map_or(0, |h| h.frames),
                            waited_us = t0.elapsed().as_micros() as u64,
                            "the WAL reached the governor's limit while capture was busy: writers held back"
                        );
                        break;
                    }
                    // The writer is in a transaction: let it run if it waits for a CPU.
                    Ok(false) => std::thread::yield_now(),
                    Err(e) => {
                        tracing::error!("the WAL governor cannot take the write lock: {e}");
                        break;
                    }
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until the governor is armed (and not quiet); its limit in frames, `None` to stop.
fn wait_armed(s: &Shared) -> Option<u32> {
    let mut a = lock(&s.arm);
    loop {
        if a.stop {
            return None;
        }
        let now = Instant::now();
        match a.until {
            Some(until) if now < until && !a.quiet => return Some(a.frames),
            Some(until) if now < until => {
                a =
                    s.cv.wait_timeout(a, until - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
            }
            _ => {
                a.until = None;
                // Disarmed: nothing of the governor's may stay held.
                s.lock.release_governor(Duration::ZERO);
                a =
                    s.cv.wait(a)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }
}

/// Whether the WAL holds at least `frames` frames, not all copied, and nobody in walship
/// holds the write lock or is trying to take it.
///
/// Not in the WAL in which capture last let go of the lock: after its checkpoint that WAL is
/// copied and the writer's next commit restarts it; if capture let go without that (its
/// budget spent on a backlog it cannot catch up with), taking the lock again at once would
/// starve the writer, whose busy handler sleeps up to 100 ms between tries while the governor
/// looks every few milliseconds.
fn over(s: &Shared, frames: u32) -> bool {
    if s.lock.wanted.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let Some(h) = read_wal_index(&s.lock.shm) else {
        return false;
    };
    let st = lock(&s.lock.state);
    st.holder == Holder::Nobody
        && st.released_in != Some((h.salt1, h.salt2))
        && h.frames >= frames
        && h.backfilled < h.frames
}

#[cfg(test)]
mod tests {
    use crate::db::tests::{python, wal_app};
    use crate::db::Db;
    use anyhow::Result;
    use std::time::{Duration, Instant};

    /// Whether another process can begin a write transaction at once.
    fn other_can_write(db: &std::path::Path) -> Result<bool> {
        let out = python(
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)\ntry:\n    c.execute('begin immediate'); c.execute('rollback'); print('yes')\nexcept sqlite3.OperationalError:\n    print('no')",
            db,
        )?;
        Ok(out == "yes")
    }

    fn wait_for(what: impl Fn() -> bool, at_most: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < at_most {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// A writer in another process that commits as fast as it can is held back once the WAL
    /// reaches the armed limit, and let go after the hold budget even though capture never
    /// came: its commits fail only because its busy timeout is 0, and resume.
    #[test]
    fn a_writer_is_held_at_the_limit_and_let_go_after_the_budget() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (p, _app) = wal_app(dir.path())?;
        let mut db = Db::open(&p)?;
        db.arm_governor(400, Duration::from_secs(10));
        // Prints the WAL's frames at the first failed commit, how long commits failed, and
        // the commits made in all (at most 4 s, ending once it could commit again).
        let out = python(
            "import os, sqlite3, sys, time\n\
             db = sys.argv[1]\n\
             c = sqlite3.connect(db, timeout=0, isolation_level=None)\n\
             first = None; held = None; n = 0\n\
             t0 = time.monotonic()\n\
             while time.monotonic() - t0 < 4:\n\
             \x20   try:\n\
             \x20       c.execute('insert into t values (randomblob(100))'); n += 1\n\
             \x20       if first is not None:\n\
             \x20           held = time.monotonic() - first[1]; break\n\
             \x20   except sqlite3.OperationalError:\n\
             \x20       if first is None:\n\
             \x20           first = ((os.path.getsize(db + '-wal') - 32) // 4120, time.monotonic())\n\
             print(first[0] if first else -1, held if held is not None else -1, n)",
            &p,
        )?;
        let v: Vec<f64> = out
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let [frames, held, commits] = v[..] else {
            anyhow::bail!("unexpected output {out:?}");
        };
        assert!(
            (400.0..1400.0).contains(&frames),
            "first held back at {frames} frames (limit 400; {commits} commits in all)"
        );
        assert!(
            (0.4..2.0).contains(&held),
            "held back for {held} s (budget {:?})",
            super::HOLD_BUDGET
        );
        Ok(())
    }

    /// Capture adopts the lock the governor holds, and releases it as its own once the WAL is
    /// copied; disarming releases the governor's; a lock capture let go of without a
    /// checkpoint is not taken again in the same WAL.
    #[test]
    fn capture_takes_over_the_governors_lock() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (p, app) = wal_app(dir.path())?;
        let mut db = Db::open(&p)?;
        for _ in 0..20 {
            app.execute("insert into t values (randomblob(5000))", [])?;
        }
        db.arm_governor(10, Duration::from_secs(10));
        assert!(
            wait_for(|| db.governor_holds(), Duration::from_secs(2)),
            "the governor did not hold writers back past its limit"
        );
        assert!(!other_can_write(&p)?, "a writer got past the governor");
        assert!(
            db.lock_writes(Duration::ZERO)?,
            "capture could not adopt the lock"
        );
        assert!(!db.governor_holds(), "the governor still holds it");
        db.checkpoint_locked()?;
        assert!(
            other_can_write(&p)?,
            "the lock outlived capture's checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !db.governor_holds(),
            "the governor held writers back on a copied WAL"
        );
        drop(db);
        // Disarming lets go at once.
        let mut db = Db::open(&p)?;
        for _ in 0..20 {
            app.execute("insert into t values (randomblob(5000))", [])?;
        }
        db.arm_governor(10, Duration::from_secs(10));
        assert!(wait_for(|| db.governor_holds(), Duration::from_secs(2)));
        db.disarm_governor();
        assert!(
            other_can_write(&p)?,
            "the lock outlived the governor's disarming"
        );
        // Capture letting go without a checkpoint (its budget spent on a backlog): the WAL
        // is as full as before, and the writer must get its turn.
        // (The other process's close copied the WAL: fill it again.)
        for _ in 0..20 {
            app.execute("insert into t values (randomblob(5000))", [])?;
        }
        db.arm_governor(10, Duration::from_secs(10));
        assert!(wait_for(|| db.governor_holds(), Duration::from_secs(2)));
        assert!(db.lock_writes(Duration::ZERO)?);
        db.unlock_writes();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !db.governor_holds(),
            "the governor took the lock again in the WAL capture let go of it in"
        );
        assert!(other_can_write(&p)?, "the writer did not get its turn");
        Ok(())
    }
}
