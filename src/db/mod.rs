//! The capture side: walship's connections to the user's database and raw reads of its WAL.
//!
//! How the WAL is kept from moving under walship (the *pin* protocol):
//! - walship always holds at least one read transaction ("pin") on one of two connections; a
//!   new pin begins before the old one ends ([`Db::rotate_pin`]). A reader that uses the WAL
//!   blocks WAL restarts; a reader that began on a fully checkpointed WAL ("slot 0") blocks the
//!   checkpointer from copying any frame. Either way, no frame walship has not read can be
//!   overwritten, and at most one restart can happen while only a slot-0 pin is held, and only
//!   after every frame of the old WAL was already captured. So a WAL whose salt-1 is exactly one
//!   more than the one walship knows is a continuation; anything else breaks continuity.
//!   This holds only if no pin begins on a fully copied WAL with frames walship has not
//!   captured: a restart would lose them, unseen. A pin moves freely once capture holds every
//!   frame up to the old pin's read mark; short of that, only to a pin that provably cannot
//!   be such a reader ([`Db::rotate_pin_behind`]).
//!   That one restart does overwrite frames walship already captured: reads of the whole state
//!   ([`Db::for_each_page`], for snapshots) check every frame's salts and the header afterwards
//!   and report [`WalChange::Moved`]; capture encodes the very bytes a scan verified ([`Kept`]),
//!   and verifies again any frame it has to read a second time.
//! - walship checkpoints only after capturing, and normally without any lock the application
//!   waits for: a PASSIVE checkpoint copies up to walship's pin, and when the whole WAL was
//!   captured and copied the pin moves onto the fully copied WAL (slot 0), so the next writer
//!   restarts it. Only when a writer outruns capture does walship take SQLite's WAL write lock
//!   ([`Db::lock_writes`]: the tail is captured, pins are dropped, a PASSIVE checkpoint runs, a
//!   new pin begins, the lock is released); writers wait only for that short window. The
//!   write lock is the `-shm` byte SQLite's unix VFS uses for it (offset 120), taken with
//!   `fcntl(F_SETLK)` polled every 50 µs: SQLite's own busy handler sleeps for milliseconds
//!   and loses every race against a writer that commits back to back, and walship must win
//!   one to bound the WAL. No connection of walship's ever takes that lock through SQLite, so
//!   the two never mix. The governor (`governor`), a thread of its own, takes the same byte
//!   once the WAL reaches a hard limit while capture is busy elsewhere; capture adopts it.
//!   While it chases such a writer, walship may also hold the checkpointer byte (offset 121,
//!   [`Db::hold_checkpoints`]): its own checkpoints still run (POSIX locks do not conflict
//!   within a process), and release it when they end; walship takes it again after each.
//! - An application's own FULL/RESTART/TRUNCATE checkpoint waits for every reader, walship's
//!   pin included. Seen from its locks (write and checkpointer bytes held by another process),
//!   walship captures to the end and lets go of its pin until that checkpoint is done
//!   ([`Db::yield_to_checkpointer`]); nothing can be appended meanwhile, the checkpointer holds
//!   the write lock.
//! - SQLite's commit counter (the wal-index's `iChange`, one more per commit, kept across WAL
//!   restarts) is recorded at walship's position whenever a scan can tie the two together.
//!   Across any WAL reset it decides continuity: it must have moved by exactly the commits of
//!   the new WAL (then no commit went unseen), or continuity is broken. Only without that
//!   proof does the pin protocol above (salt-1 one more, pinned throughout) decide. A WAL
//!   restarted by a TRUNCATE and then written by a connection that never restarted one itself
//!   carries random salts: only the counter tells that case apart.
//! - The database and `-shm` files are read or locked through handles kept open for the life
//!   of [`Db`]: closing any descriptor of a file drops every POSIX lock the process holds on it,
//!   SQLite's included.
//!
//! Walship's connections never write and have autocheckpoint off; they never change the schema.
//!
//! Every SQLite error on the user's database is a [`DbError`] that names the file and, where
//! it can be found out, why: a file that is not a database, a read-only mount, a file, `-wal`,
//! `-shm` or directory the user may not write, or the process holding the lock.

mod governor;

use crate::durable::lock;
use crate::wal::{FrameHeader, WalHeader, FRAME_HEADER_SIZE, WAL_HEADER_SIZE};
use anyhow::{anyhow, bail, Context, Result};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where capture stands in the WAL: just after the last captured commit frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalPos {
    /// Salts of the WAL generation being read.
    pub salt1: u32,
    /// Second salt.
    pub salt2: u32,
    /// Number of valid frames consumed (all up to and including a commit frame).
    pub frames: u64,
    /// Running checksum after the last consumed frame (the header's for `frames == 0`).
    pub running: [u32; 2],
    /// Page size of the WAL.
    pub page_size: u32,
}

/// SQLite's view of the WAL from its wal-index (see [`Db::wal_index`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalIndexHint {
    /// Valid frames in the WAL (`mxFrame`).
    pub frames: u32,
    /// Salts of the WAL those frames belong to (as [`WalPos`] holds them).
    pub salt1: u32,
    /// Second salt.
    pub salt2: u32,
    /// Frames already copied into the database (`nBackfill`).
    pub backfilled: u32,
    /// SQLite's count of committed transactions (`iChange`): one more with every commit, and
    /// unchanged by a WAL restart, while any connection keeps the wal-index open.
    pub changes: u32,
}

impl WalPos {
    /// The position at the start of a WAL with header `h`.
    pub(crate) fn start(h: &WalHeader) -> Self {
        Self {
            salt1: h.salt1,
            salt2: h.salt2,
            frames: 0,
            running: h.checksum,
            page_size: h.page_size,
        }
    }
}

/// Offset in `-shm` of SQLite's WAL write lock byte (`UNIX_SHM_BASE` + `WAL_WRITE_LOCK`).
const SHM_WRITE_LOCK: i64 = 120;

/// Offset in `-shm` of SQLite's checkpointer lock byte (`WAL_CKPT_LOCK`).
const SHM_CKPT_LOCK: i64 = 121;

/// Longest walship waits, without a read lock, for an application's checkpoint it let
/// through: SQLite's busy handler retries within 100 ms.
const YIELD_WAIT: Duration = Duration::from_millis(300);

/// One commit found in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalCommit {
    /// Frame count just after the commit frame.
    pub frames_end: u64,
    /// Database size in pages after the commit.
    pub db_pages: u32,
    /// Running checksum just after the commit frame.
    pub running: [u32; 2],
}

/// What the WAL says relative to a known position.
#[derive(Debug)]
pub(crate) enum WalState {
    /// No WAL header yet (missing or empty file): nothing to read.
    Empty,
    /// Same WAL as `pos`; `commits` are new commits after it (possibly none).
    Same {
        /// New commits, in order.
        commits: Vec<WalCommit>,
        /// The position after the last new commit.
        end: WalPos,
    },
    /// A new WAL follows `pos` without a commit lost (SQLite's commit count proves it, or
    /// salt-1 is one more under the pin protocol); `commits` are from its start.
    Restarted {
        /// Commits from the start of the new WAL.
        commits: Vec<WalCommit>,
        /// The position after the last of them.
        end: WalPos,
    },
    /// The WAL changed in a way that breaks continuity; the reason says how.
    Broken(String),
}

/// Position of a verified sequential read of WAL frames (see [`Db::read_next`]).
#[derive(Debug)]
pub(crate) struct FrameCursor {
    header: WalHeader,
    running: [u32; 2],
    next: u64,
    chunk: Chunk,
    /// The scan whose kept frames this cursor reads first (see [`Kept`]).
    kept: Option<u64>,
}

/// How long a checkpoint under the write lock waits for an application's checkpoint to end.
const CHECKPOINT_BUSY_WAIT: Duration = Duration::from_millis(250);

/// The fewest and the most frames [`Chunk`] reads at once.
const CHUNK_MIN_FRAMES: usize = 4;
const CHUNK_MAX_FRAMES: usize = 64;

/// WAL frames read a run at a time, one `pread` for up to [`CHUNK_MAX_FRAMES`]: a bulk load's
/// capture made two system calls per 4 KiB frame read, a fifth of its CPU. A run starts at
/// [`CHUNK_MIN_FRAMES`] and doubles each time a read is used up, so a scan after a one-row
/// commit reads little past the end (what lies there, stale frames of an earlier WAL or a
/// commit being written, fails its checks as before). The bytes are what the file held at
/// that read: a chunk lives for one scan or one cursor, both of which run under a pin.
#[derive(Debug, Default)]
struct Chunk {
    buf: Vec<u8>,
    /// The first frame held (0: the one after the WAL header).
    first: u64,
    /// Whole frames held.
    frames: u64,
    /// Frames the next read asks for.
    want: usize,
}

impl Chunk {
    /// Frame `n` (its header, then its page), read with those after it if not held; `None`
    /// where the file ends before the frame does.
    fn frame(&mut self, f: &File, frame_size: usize, n: u64) -> std::io::Result<Option<&[u8]>> {
        if !(self.first..self.first + self.frames).contains(&n) {
            self.want = if self.frames > 0 && n == self.first + self.frames {
                (self.want * 2).min(CHUNK_MAX_FRAMES)
            } else {
                CHUNK_MIN_FRAMES
            };
            self.buf.resize(self.want * frame_size, 0);
            let off = WAL_HEADER_SIZE as u64 + n * frame_size as u64;
            let got = read_full_at(f, &mut self.buf, off)?;
            self.first = n;
            self.frames = (got / frame_size) as u64;
            if self.frames == 0 {
                return Ok(None);
            }
        }
        // `n - first` < `frames` <= CHUNK_MAX_FRAMES.
        let at = (n - self.first) as usize * frame_size;
        Ok(self.buf.get(at..at + frame_size))
    }
}

/// Most bytes of pages a scan keeps (see [`Kept`]), allocated once. A chase's step is
/// `checkpoint-pages` frames (4 MiB by default), and the frames past this are read again, and
/// verified again. Keeping 8 MiB (whole steps) saved ~8% more of walship's CPU behind a
/// max-rate writer than 1 MiB, but raised its peak RSS from 13 to 22 MiB (2 MiB: 16 MiB;
/// 1 MiB: 14.5-15.1 MiB, `bench/rss.sh`; #12 allows 16).
const KEEP_MAX: usize = 1 << 20;

/// The frames the last scan verified, kept so that capture encodes them without reading and
/// verifying them again (see [`Db::read_next`]): reading the WAL twice was about a fifth of
/// capture's CPU under a bulk load or a max-rate writer (`perf`, sixteenth session in
/// docs/PERFORMANCE.md). Invariant: it holds consecutive frames from `first`, each verified
/// by the scan (salts, and the checksum chain from `start_running`), exactly as that scan read
/// them; `scan` (a counter) changes with every scan, so a cursor never mixes two scans.
#[derive(Debug, Default)]
struct Kept {
    scan: u64,
    salts: (u32, u32),
    first: u64,
    start_running: [u32; 2],
    page_size: usize,
    /// Each frame's header, and the running checksum after it.
    frames: Vec<(FrameHeader, [u32; 2])>,
    /// Their pages, one after the other. Every page has the same size, so once one does not
    /// fit in [`KEEP_MAX`], none after it does: the frames kept are always consecutive.
    pages: Vec<u8>,
}

impl Kept {
    /// Starts over for a scan of the WAL with header `h` from `pos`.
    fn reset(&mut self, h: &WalHeader, pos: &WalPos) {
        self.scan = self.scan.wrapping_add(1);
        self.salts = (h.salt1, h.salt2);
        self.first = pos.frames;
        self.start_running = pos.running;
        self.page_size = h.page_size as usize;
        self.frames.clear();
        self.pages.clear();
    }

    /// Whether a scan from `pos` in the WAL with header `h` can go on keeping frames after
    /// these: `pos` is one of them or just after them. Frames past `pos` are let go (the
    /// scan reads them again).
    fn resume(&mut self, h: &WalHeader, pos: &WalPos) -> bool {
        let Some(n) = pos
            .frames
            .checked_sub(self.first)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= self.frames.len())
        else {
            return false;
        };
        let running = match n.checked_sub(1) {
            None => self.start_running,
            Some(i) => match self.frames.get(i) {
                Some(f) => f.1,
                None => return false,
            },
        };
        if self.salts != (h.salt1, h.salt2)
            || self.page_size != h.page_size as usize
            || running != pos.running
        {
            return false;
        }
        self.frames.truncate(n);
        self.pages.truncate(n * self.page_size);
        self.scan = self.scan.wrapping_add(1);
        true
    }

    /// Keeps the next verified frame, if there is room.
    fn push(&mut self, fh: FrameHeader, running: [u32; 2], page: &[u8]) {
        if self.pages.len() + page.len() > KEEP_MAX {
            return;
        }
        if self.pages.capacity() == 0 {
            // Once, and never more: the buffer is reused by every scan.
            self.pages.reserve_exact(KEEP_MAX);
        }
        self.frames.push((fh, running));
        self.pages.extend_from_slice(page);
    }

    /// Whether a cursor from `start` in the WAL with header `h` begins on these frames.
    fn begins(&self, h: &WalHeader, start: &WalPos) -> bool {
        self.salts == (h.salt1, h.salt2)
            && self.page_size == h.page_size as usize
            && (self.first, self.start_running) == (start.frames, start.running)
    }

    /// Whether frame `n` is kept.
    fn holds(&self, n: u64) -> bool {
        self.frame(n).is_some()
    }

    /// Frame `n`'s header, the running checksum after it, and its page; `None` if it is not
    /// kept.
    fn frame(&self, n: u64) -> Option<(FrameHeader, [u32; 2], &[u8])> {
        let i = usize::try_from(n.checked_sub(self.first)?).ok()?;
        let (fh, running) = *self.frames.get(i)?;
        let at = i.checked_mul(self.page_size)?;
        Some((fh, running, self.pages.get(at..at + self.page_size)?))
    }
}

/// walship's handle on one database.
pub(crate) struct Db {
    // Field order matters: connections drop before `file` (see the module comment).
    pins: [Connection; 2],
    /// Which of `pins` currently holds a read transaction (`None` while unpinned).
    active: Option<usize>,
    /// walship's checkpoints; shared with the thread that copies while capture works under
    /// the write lock (see [`Db::copy_behind`]).
    ckpt: Arc<Mutex<Connection>>,
    file: File,
    /// The `-shm` file, for the wal-index and the locks (see the module comment); shared with
    /// the governor's thread.
    shm: Arc<File>,
    /// SQLite's WAL write lock, as capture and the governor share it.
    write_lock: Arc<governor::WriteLock>,
    governor: governor::Governor,
    wal: Option<File>,
    /// The WAL header seen by the last scan.
    last_header: Option<WalHeader>,
    /// The frames the last scan verified (see [`Kept`]).
    kept: Kept,
    /// SQLite's wal-index as the last scan read it, before its frames (see
    /// [`Db::commits_accounted`]).
    scan_hint: Option<WalIndexHint>,
    /// Set when walship was left without a pin: continuity across a WAL restart can then no
    /// longer be proven, so the next restart seen is treated as a break.
    lost_pin: bool,
    /// SQLite's commit count (the wal-index's `iChange`) at a position in the WAL (salts,
    /// frames), when a scan could tie the two together: across any WAL reset, it proves
    /// whether every commit was seen (see [`Db::scan`]).
    known: Option<Known>,
    path: PathBuf,
    wal_path: PathBuf,
    identity: (u64, u64),
}

/// How long walship's connections wait for a lock held by the application.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// How long one attempt to switch to WAL mode waits for a lock: short, so that a start-up
/// blocked by another process says so at once and stays responsive to SIGTERM.
const WAL_SWITCH_BUSY: Duration = Duration::from_millis(100);

/// First byte of the range of SQLite's locks in the database file (`PENDING_BYTE`), and the
/// length of that range (pending, reserved, and the 510 shared bytes).
const LOCK_RANGE: (i64, i64) = (0x4000_0000, 512);

/// A SQLite error on the user's database, explained: which file, what walship tried, and the
/// likely reason, found by looking at the file, its directory, its filesystem and its locks.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub(crate) struct DbError {
    /// SQLite's primary result code.
    pub code: rusqlite::ErrorCode,
    /// The whole message: operation, path, SQLite's text, and the reason found.
    msg: String,
}

impl DbError {
    /// True if another connection's lock kept walship out (`SQLITE_BUSY`, `SQLITE_LOCKED`).
    pub(crate) fn is_locked(&self) -> bool {
        matches!(
            self.code,
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
        )
    }
}

/// The path of one of SQLite's files beside the database `db`: `suffix` is `-wal` or `-shm`.
pub(crate) fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// True if `e` says, anywhere in its chain, that another process holds the database locked.
pub(crate) fn is_locked(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<DbError>().is_some_and(DbError::is_locked))
}

/// Turns a SQLite error from `what` (`"open database"`, `"read"`, ...) on `path` into a
/// [`DbError`] that names the file and says why, as far as it can be found out.
pub(crate) fn explain(path: &Path, what: &str, e: rusqlite::Error) -> anyhow::Error {
    explain_as(path, format!("cannot {what} {}", path.display()), e)
}

/// Like [`explain`], with the whole description of what failed (naming `path`) given.
fn explain_as(path: &Path, failed: String, e: rusqlite::Error) -> anyhow::Error {
    let rusqlite::Error::SqliteFailure(f, text) = &e else {
        return anyhow::Error::new(e).context(failed);
    };
    let text = text
        .clone()
        .unwrap_or_else(|| rusqlite::ffi::code_to_str(f.extended_code).to_owned());
    let mut msg = format!("{failed}: {text}");
    if let Some(h) = hint(path, f.code) {
        msg.push_str(&format!(" ({h})"));
    }
    DbError { code: f.code, msg }.into()
}

/// The likely reason for an error `code` on `path`.
fn hint(path: &Path, code: rusqlite::ErrorCode) -> Option<String> {
    use rusqlite::ErrorCode as C;
    match code {
        C::NotADatabase | C::DatabaseCorrupt => Some(not_a_database(path)),
        C::DatabaseBusy | C::DatabaseLocked => Some(lock_hint(path)),
        C::CannotOpen | C::ReadOnly | C::PermissionDenied | C::SystemIoFailure => access_hint(path),
        C::DiskFull => Some(format!(
            "the filesystem holding {} is full",
            parent_dir(path).display()
        )),
        _ => None,
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Runs `f` on a descriptor of `path` that stays open for the life of the process. Closing any
/// descriptor of a file drops every POSIX lock the process holds on it, SQLite's included: a
/// diagnosis inside the daemon, whose connections hold locks on the very file, must never
/// open and close it. One descriptor is kept per file (device and inode).
fn with_kept_file<T>(path: &Path, f: impl FnOnce(&File) -> T) -> std::io::Result<T> {
    use std::sync::{Mutex, OnceLock};
    static KEPT: OnceLock<Mutex<HashMap<(u64, u64), File>>> = OnceLock::new();
    let md = std::fs::metadata(path)?;
    let mut kept = KEPT
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let file = match kept.entry((md.dev(), md.ino())) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(File::open(path)?),
    };
    Ok(f(file))
}

fn not_a_database(path: &Path) -> String {
    let mut head = [0u8; 16];
    match with_kept_file(path, |f| read_exact_at(f, &mut head, 0)) {
        Ok(Ok(true)) if &head == b"SQLite format 3\0" => {
            "it starts with SQLite's header but the rest is damaged".into()
        }
        Ok(Ok(_)) => {
            "its first bytes are not SQLite's header: it is not an SQLite database, or it is encrypted".into()
        }
        _ => "it is not an SQLite database".into(),
    }
}

/// Says what keeps `path` from being opened or written: a missing file, a read-only
/// filesystem, or a file or directory walship's user may not write.
fn access_hint(path: &Path) -> Option<String> {
    use nix::unistd::{access, geteuid, AccessFlags};
    let uid = geteuid();
    let dir = parent_dir(path);
    if !path.exists() {
        return Some("it does not exist".into());
    }
    if nix::sys::statvfs::statvfs(dir)
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
    {
        return Some(format!(
            "the filesystem holding {} is mounted read-only",
            dir.display()
        ));
    }
    for (flag, what) in [
        (AccessFlags::R_OK, "readable"),
        (AccessFlags::W_OK, "writable"),
    ] {
        if access(path, flag).is_err() {
            return Some(format!("the file is not {what} by uid {uid}"));
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in ["-wal", "-shm"] {
        let side = dir.join(format!("{name}{suffix}"));
        if side.exists() {
            if access(&side, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
                return Some(format!(
                    "{} is not both readable and writable by uid {uid}",
                    side.display()
                ));
            }
        } else if access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
            return Some(format!(
                "the directory {} is not writable by uid {uid}, and SQLite must create {name}-wal and {name}-shm there",
                dir.display()
            ));
        }
    }
    None
}

/// Names the process holding SQLite's locks on `path`, and what kind of lock it holds.
fn lock_hint(path: &Path) -> String {
    let who = |pid: i32| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        match comm.trim() {
            "" => format!("process {pid}"),
            c => format!("process {pid} ({c})"),
        }
    };
    // A read lock conflicts only with a writer's lock; a write lock with any lock.
    let holder = |kind: i16| lock_holder(path, kind).ok().flatten();
    if let Some(pid) = holder(nix::libc::F_RDLCK as i16) {
        return format!(
            "{} holds it write-locked: an application using PRAGMA locking_mode=EXCLUSIVE, or one in a long write transaction",
            who(pid)
        );
    }
    if let Some(pid) = holder(nix::libc::F_WRLCK as i16) {
        return format!(
            "{} holds a read lock on it: an application using PRAGMA locking_mode=EXCLUSIVE, or one in a long transaction",
            who(pid)
        );
    }
    "another connection holds it locked: an application using PRAGMA locking_mode=EXCLUSIVE, or one in a long transaction".into()
}

/// The pid of a process whose lock on SQLite's lock bytes of `path` conflicts with a lock of
/// `kind` (`F_GETLK`; walship's own locks never conflict with its own).
fn lock_holder(path: &Path, kind: i16) -> std::io::Result<Option<i32>> {
    with_kept_file(path, |f| lock_holder_of(f, kind))?
}

fn lock_holder_of(f: &File, kind: i16) -> std::io::Result<Option<i32>> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain fcntl on a descriptor we own, with a fully initialised flock.
    let mut fl: nix::libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = nix::libc::SEEK_SET as i16;
    fl.l_start = LOCK_RANGE.0;
    fl.l_len = LOCK_RANGE.1;
    // SAFETY: as above; F_GETLK only writes into `fl`.
    let rc = unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_GETLK, &mut fl) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fl.l_type != nix::libc::F_UNLCK as i16).then_some(fl.l_pid))
}

fn open_conn(path: &Path, busy: Duration) -> Result<Connection> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| explain(path, "open database", e))?;
    let setup = || -> rusqlite::Result<()> {
        // First: rusqlite opens with a 5 s timeout, and setting cache_size reads the schema.
        c.busy_timeout(busy)?;
        c.pragma_update(None, "wal_autocheckpoint", 0)?;
        // walship reads pages from the files directly; its connections need almost no cache.
        c.pragma_update(None, "cache_size", -64)
    };
    setup().map_err(|e| explain(path, "open database", e))?;
    Ok(c)
}

/// Switches `path` to WAL mode if it is not already; returns true if it switched. SQLite
/// refuses the switch while another connection uses the file (an application creating the
/// database, say): that is retried for about a second before it counts as a failure.
///
/// # Errors
/// Says why the switch is impossible (read-only file, an exclusive lock holder, ...), naming
/// the file; [`is_locked`] tells a lock held by another process from the rest.
pub(crate) fn ensure_wal_mode(path: &Path) -> Result<bool> {
    let mut attempt = 0;
    loop {
        match try_wal_mode(path) {
            Err(e) if attempt < 10 => {
                tracing::debug!("{e:#}; retrying");
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// One attempt of [`ensure_wal_mode`]: waits at most a tenth of a second for a lock.
///
/// # Errors
/// As [`ensure_wal_mode`].
pub(crate) fn try_wal_mode(path: &Path) -> Result<bool> {
    let c = open_conn(path, WAL_SWITCH_BUSY)?;
    // Closed at once, this is the only connection when nothing else has the database open (a
    // start after a crash or a power cut, before the application): SQLite's last connection
    // checkpoints the whole WAL into the database and deletes it on close, which destroyed
    // the continuity a resume proves from the WAL, so every such start began a new
    // generation (a whole snapshot). The WAL stays where it is.
    c.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(|e| explain(path, "open database", e))?;
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(|e| explain(path, "read the journal mode of", e))?;
    if mode.eq_ignore_ascii_case("wal") {
        return Ok(false);
    }
    let new: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| {
            let failed = format!(
                "cannot switch {} from journal_mode={mode} to WAL",
                path.display()
            );
            explain_as(path, failed, e)
        })?;
    if !new.eq_ignore_ascii_case("wal") {
        bail!(
            "cannot switch {} from journal_mode={mode} to WAL (SQLite kept {new}: another connection may hold it in exclusive locking mode, or the file is read-only)",
            path.display()
        );
    }
    Ok(true)
}

impl Db {
    /// Opens walship's connections to a database already in WAL mode and takes the first pin.
    ///
    /// # Errors
    /// The database can't be opened, isn't in WAL mode, or is not a database.
    pub(crate) fn open(path: &Path) -> Result<Db> {
        let file =
            File::open(path).with_context(|| format!("cannot open database {}", path.display()))?;
        let md = file
            .metadata()
            .with_context(|| format!("cannot open database {}", path.display()))?;
        let pins = [
            open_conn(path, BUSY_TIMEOUT)?,
            open_conn(path, BUSY_TIMEOUT)?,
        ];
        let ckpt = open_conn(path, BUSY_TIMEOUT)?;
        // Checkpoints never wait: a busy checkpoint is tried again next round.
        ckpt.busy_timeout(Duration::ZERO)
            .map_err(|e| explain(path, "open database", e))?;
        let mode: String = ckpt
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|e| explain(path, "read the journal mode of", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!(
                "{} is not in WAL mode (journal_mode={mode})",
                path.display()
            );
        }
        let wal_path = sidecar(path, "-wal");
        let shm_path = sidecar(path, "-shm");
        let shm = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&shm_path)
                .with_context(|| format!("cannot open {}", shm_path.display()))?,
        );
        let write_lock = Arc::new(governor::WriteLock::new(shm.clone()));
        let mut db = Db {
            pins,
            active: None,
            ckpt: Arc::new(Mutex::new(ckpt)),
            file,
            shm,
            governor: governor::Governor::new(write_lock.clone()),
            write_lock,
            last_header: None,
            kept: Kept::default(),
            scan_hint: None,
            lost_pin: false,
            known: None,
            wal: None,
            path: path.to_owned(),
            wal_path,
            identity: (md.dev(), md.ino()),
        };
        db.begin_pin(0)?;
        Ok(db)
    }

    /// The database path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn begin_pin(&mut self, i: usize) -> Result<()> {
        let c = &self.pins[i];
        // Cached statements: a pin moves every few captures (see `Capture::rotate_pin_between`).
        c.prepare_cached("BEGIN")
            .and_then(|mut s| s.execute([]))
            .map_err(|e| explain(&self.path, "read", e))?;
        c.prepare_cached("SELECT count(*) FROM sqlite_master")
            .and_then(|mut s| s.query_row([], |_| Ok(())))
            .map_err(|e| explain(&self.path, "read", e))?;
        self.active = Some(i);
        Ok(())
    }

    fn end_pin(&mut self, i: usize) -> Result<()> {
        if self.pins[i].is_autocommit() {
            return Ok(());
        }
        self.pins[i].prepare_cached("COMMIT")?.execute([])?;
        Ok(())
    }

    /// Whether walship holds a pin (none after a failure until the next move).
    pub(crate) fn pinned(&self) -> bool {
        self.active.is_some()
    }

    /// Moves the pin forward: a new read transaction begins before the old one ends.
    ///
    /// # Errors
    /// SQLite errors.
    pub(crate) fn rotate_pin(&mut self) -> Result<()> {
        if self.active.is_none() {
            // No pin since a failure: whatever happened meanwhile is judged by the next scan.
            self.lost_pin = true;
        }
        let old = self.active.unwrap_or(1);
        let new = 1 - old;
        self.begin_pin(new)?;
        self.end_pin(old)?;
        Ok(())
    }

    /// Moves the pin forward while capture is short of the WAL's end (`pos`, after a step
    /// limited to some frames), but only to a pin that cannot let the WAL restart over frames
    /// walship has not captured; otherwise the old pin stays.
    ///
    /// The new pin begins while the old one is held, then the wal-index is read: the new pin
    /// is kept only if the WAL (still the one `pos` is in) is not fully copied. Why that is
    /// enough, from SQLite's WAL locking: a writer restarts the WAL only if its own read
    /// transaction began on a fully copied WAL (`nBackfill == mxFrame`) and no reader holds
    /// a read slot above 0.
    /// - A new pin in a slot above 0 blocks any restart while it is held.
    /// - A new pin in slot 0 freezes `nBackfill` (copying needs slot 0 exclusively) from the
    ///   moment it began, before the wal-index is read; `mxFrame` only grows while the old pin
    ///   blocks restarts. Seen not fully copied then, the WAL can never become fully copied
    ///   while this pin is held, so no writer can restart it.
    /// - Seen fully copied (or unreadable, or restarted), the new pin might be a slot-0 reader
    ///   with uncaptured frames: it is dropped, the old one kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub(crate) fn rotate_pin_behind(&mut self, pos: &WalPos) -> Result<()> {
        let Some(old) = self.active else {
            return Ok(());
        };
        let new = 1 - old;
        self.begin_pin(new)?;
        let safe = self.wal_index().is_some_and(|h| {
            (h.salt1, h.salt2) == (pos.salt1, pos.salt2) && h.backfilled < h.frames
        });
        if safe {
            self.end_pin(old)?;
        } else {
            self.active = Some(old);
            self.end_pin(new)?;
        }
        Ok(())
    }

    /// What SQLite's wal-index says of the current WAL, read without any lock: a hint for
    /// deciding how to capture, never used for what is captured. `None` when the two header
    /// copies disagree (a writer is updating them) or the index cannot be read.
    pub(crate) fn wal_index(&self) -> Option<WalIndexHint> {
        read_wal_index(&self.shm)
    }

    /// Takes SQLite's WAL write lock, polling (without sleeping for the first 20 ms, then every
    /// 50 µs) for at most `wait`; false if an application writer kept it.
    ///
    /// # Errors
    /// fcntl errors other than "held by another process".
    pub(crate) fn lock_writes(&mut self, wait: Duration) -> Result<bool> {
        self.write_lock.set_wanted(true);
        let r = self.lock_writes_polled(wait);
        self.write_lock.set_wanted(false);
        r
    }

    fn lock_writes_polled(&mut self, wait: Duration) -> Result<bool> {
        let started = std::time::Instant::now();
        let deadline = started + wait;
        loop {
            if self
                .write_lock
                .take_for_capture()
                .context("cannot take the WAL write lock")?
            {
                return Ok(true);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            // A writer committing back to back leaves gaps of tens of microseconds: poll
            // without sleeping for the first 20 ms (only a hot writer makes us wait that long).
            if now >= started + Duration::from_millis(20) {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// With the write lock held and the tail captured: drops the pins, runs a PASSIVE
    /// checkpoint, pins again, releases the write lock. Returns (frames in WAL, frames
    /// checkpointed) as SQLite reports them.
    ///
    /// # Errors
    /// SQLite errors; the write lock is released in every case.
    pub(crate) fn checkpoint_locked(&mut self) -> Result<(i64, i64)> {
        let result = (|| {
            for i in 0..2 {
                self.end_pin(i)?;
            }
            self.active = None;
            let r = checkpoint_all(&lock(&self.ckpt));
            if let Err(e) = self.begin_pin(0) {
                // Unpinned once the write lock goes: a restart seen later proves nothing.
                self.lost_pin = true;
                return Err(e);
            }
            r
        })();
        self.unlock_writes();
        result
    }

    /// With the write lock held and capture short of the WAL's end (`pos`, in the WAL being
    /// written): moves the pin to the WAL's end if that pin cannot let the WAL restart (see
    /// [`Db::rotate_pin_behind`]), and starts copying the whole WAL into the database on a
    /// thread of its own, so that SQLite's copy and its sync of the database overlap with the
    /// capture of what is left (the application's writer waits for both meanwhile, and
    /// leaves a core idle). `None` if the pin did not move (nothing would be copied past the
    /// old one) or no thread could start; [`Db::checkpoint_locked`] then copies it all.
    ///
    /// Safe because no frame can be overwritten meanwhile: the write lock keeps writers out,
    /// and the new pin, above slot 0 on a WAL not fully copied, keeps any writer from
    /// restarting the WAL until capture moves it again, even if the lock is given back before
    /// capture is done (see [`Db::rotate_pin_behind`]). Copying frames into the database
    /// before they are captured changes nothing that capture reads.
    ///
    /// # Errors
    /// SQLite errors while moving the pin.
    pub(crate) fn copy_behind(&mut self, pos: &WalPos) -> Result<Option<Copier>> {
        let old = self.active;
        self.rotate_pin_behind(pos)?;
        if self.active == old {
            return Ok(None);
        }
        let ckpt = self.ckpt.clone();
        let copier = std::thread::Builder::new()
            .name("wal-copy".into())
            .spawn(move || checkpoint_all(&lock(&ckpt)).map(|_| ()));
        match copier {
            Ok(h) => Ok(Some(Copier(h))),
            Err(e) => {
                tracing::debug!("cannot start the thread that copies the WAL: {e}");
                Ok(None)
            }
        }
    }

    /// Waits for the copy [`Db::copy_behind`] started. Its outcome is only logged: the
    /// checkpoint under the write lock that follows copies whatever it did not.
    pub(crate) fn copied(&self, copier: Copier) {
        match copier.0.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("copying the WAL under the write lock: {e:#}"),
            Err(_) => tracing::debug!("the thread copying the WAL under the write lock panicked"),
        }
    }

    /// A PASSIVE checkpoint that waits on nothing: copies what the pins allow. Returns
    /// (frames in WAL, frames checkpointed), `None` if another checkpoint was running.
    ///
    /// # Errors
    /// SQLite errors other than busy.
    pub(crate) fn checkpoint_passive(&self) -> Result<Option<(i64, i64)>> {
        match lock(&self.ckpt).query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        }) {
            Ok((0, log, done)) => Ok(Some((log, done))),
            Ok(_) => Ok(None),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("checkpoint failed"),
        }
    }

    /// Releases the write lock if held.
    pub(crate) fn unlock_writes(&mut self) {
        self.write_lock.release_capture();
    }

    /// Arms the governor (see `governor`) for `period`: while capture is busy elsewhere, it
    /// holds writers back once the WAL holds `frames` frames, not all copied.
    pub(crate) fn arm_governor(&mut self, frames: u32, period: Duration) {
        self.governor.arm(frames, period);
    }

    /// Disarms the governor (checkpoints back off for a reader, a snapshot is taken).
    pub(crate) fn disarm_governor(&self) {
        self.governor.disarm();
    }

    /// Whether the governor holds writers back, waiting for capture to take over.
    pub(crate) fn governor_holds(&self) -> bool {
        self.write_lock.governor_holds()
    }

    /// Takes SQLite's checkpointer lock byte without waiting; false if another process holds
    /// it (an application's checkpoint is running). While walship holds it, an application's
    /// checkpoint returns `SQLITE_BUSY` at once: SQLite never waits for that lock, not even
    /// with a busy handler. walship's own checkpoints still run (POSIX locks do not conflict
    /// within a process), and SQLite releases the byte when one of them ends: take it again
    /// after each.
    ///
    /// # Errors
    /// fcntl errors other than "held by another process".
    pub(crate) fn hold_checkpoints(&self) -> Result<bool> {
        fcntl_lock(&self.shm, nix::libc::F_WRLCK as i16, SHM_CKPT_LOCK)
            .context("cannot take the WAL checkpointer lock")
    }

    /// Starts the write-back of the database file's dirty pages without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a hint to the kernel, which durability never
    /// relies on (SQLite's checkpoints fsync the file as before).
    ///
    /// While walship chases a bulk writer, the application's checkpoints copy frames into the
    /// database but stop at walship's pin, and SQLite syncs the file only after a checkpoint
    /// that copies the whole WAL: the one walship runs under the write lock, which then wrote
    /// back everything the load had copied meanwhile. Started after each step of the chase,
    /// that write-back is mostly done by then: the sync under the lock fell from ~26 to
    /// ~12 ms per hold on this machine's root ext4 (no change on a journaled one).
    ///
    /// # Errors
    /// The system call's.
    pub(crate) fn start_writeback(&self) -> std::io::Result<()> {
        crate::durable::start_writeback(&self.file, 0, 0)
    }

    /// Starts the write-back of the WAL's dirty pages without waiting for it, as
    /// [`Db::start_writeback`] does for the database file: while walship chases a writer of
    /// small commits without copying (see `Capture::copies_now`), SQLite's sync of the WAL
    /// before the next copy then has little left to write. A hint; durability never relies on
    /// it.
    ///
    /// # Errors
    /// Opening the WAL, or the system call.
    pub(crate) fn start_wal_writeback(&mut self) -> Result<()> {
        if let Some(wal) = self.wal_file()? {
            crate::durable::start_writeback(wal, 0, 0)
                .context("cannot start the WAL's write-back")?;
        }
        Ok(())
    }

    /// Syncs the WAL and the database file (`fdatasync` on walship's read-only handles): what
    /// the application appended and what checkpoints copied are on disk before SQLite's own
    /// syncs under the write lock, which then have little left to write. Durability never
    /// relies on it.
    ///
    /// # Errors
    /// The system calls'.
    pub(crate) fn sync_files(&mut self) -> Result<()> {
        if let Some(wal) = self.wal_file()? {
            wal.sync_data().context("cannot sync the WAL")?;
        }
        self.file.sync_data().context("cannot sync the database")
    }

    /// Releases the checkpointer lock byte if walship holds it (see
    /// [`Db::hold_checkpoints`]).
    pub(crate) fn release_checkpoints(&self) {
        if let Err(e) = fcntl_lock(&self.shm, nix::libc::F_UNLCK as i16, SHM_CKPT_LOCK) {
            tracing::error!("cannot release the WAL checkpointer lock: {e}");
        }
    }

    /// True if another process holds both SQLite's WAL write lock and its checkpointer lock:
    /// an application's FULL, RESTART or TRUNCATE checkpoint, which may be waiting for
    /// walship's read lock (it would wait out its whole busy timeout, holding every writer
    /// off meanwhile).
    pub(crate) fn checkpointer_waiting(&self) -> bool {
        shm_held(&self.shm, SHM_WRITE_LOCK) && shm_held(&self.shm, SHM_CKPT_LOCK)
    }

    /// Lets an application's checkpoint through: with every frame of the WAL captured (`pos`
    /// at the end SQLite's wal-index shows), walship ends its read transactions, waits (at
    /// most `YIELD_WAIT`) for the checkpointer to finish, and pins again. Meanwhile the
    /// checkpointer holds the write lock, so nothing is appended; whatever happens after it
    /// lets go is judged by the next scan: SQLite's commit count, saved here, must account
    /// for every commit of a restarted WAL, or continuity is broken. Returns false (and does
    /// nothing) unless `pos` is the end of the WAL.
    ///
    /// # Errors
    /// SQLite errors; when no pin could be taken again, continuity is no longer proven.
    pub(crate) fn yield_to_checkpointer(&mut self, pos: &WalPos) -> Result<bool> {
        let Some(h) = self.wal_index() else {
            return Ok(false);
        };
        if (h.salt1, h.salt2) != (pos.salt1, pos.salt2) || u64::from(h.frames) != pos.frames {
            return Ok(false);
        }
        self.known = Some(Known {
            salts: (pos.salt1, pos.salt2),
            frames: pos.frames,
            changes: h.changes,
        });
        for i in 0..2 {
            self.end_pin(i)?;
        }
        self.active = None;
        let deadline = std::time::Instant::now() + YIELD_WAIT;
        while shm_held(&self.shm, SHM_CKPT_LOCK) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Err(e) = self.begin_pin(0) {
            self.lost_pin = true;
            return Err(e);
        }
        Ok(true)
    }

    /// Whether exactly the commits of the new WAL (`h`, `commits`) were made since SQLite's
    /// commit count was `changes` (then no commit of the old WAL went unseen); `None` while
    /// SQLite's index does not yet show a commit the scan found. A wal-index rebuilt by
    /// SQLite's recovery counts from 0 again, and proves nothing: the caller does not ask
    /// while the index shows 0.
    ///
    /// The index is the one the last scan read before its frames: SQLite shows a commit in it
    /// only once its frames are written, so the scan found every commit that index counts.
    /// Read after the scan, it was often ahead of it behind a writer committing without a
    /// pause, and the proof was tried again and again (each time scanning the whole new WAL).
    fn commits_accounted(
        &self,
        changes: u32,
        h: &WalHeader,
        commits: &[WalCommit],
    ) -> Option<bool> {
        let ix = self.scan_hint?;
        let frames = u64::from(ix.frames);
        if (ix.salt1, ix.salt2) != (h.salt1, h.salt2)
            || (frames != 0 && !commits.iter().any(|c| c.frames_end == frames))
        {
            return None;
        }
        let seen = commits.iter().filter(|c| c.frames_end <= frames).count() as u32;
        Some(changes.wrapping_add(seen) == ix.changes)
    }

    /// True if the path no longer names the file walship has open (replaced or deleted).
    pub(crate) fn replaced(&self) -> bool {
        file_id(&self.path) != Some(self.identity)
    }

    /// Closes every handle on a database whose path now names another file (or none), without
    /// ever touching the new one. SQLite's close does not checkpoint a moved or deleted file,
    /// so the old `-wal` and `-shm` stay under their names: their identities are returned, for
    /// [`StaleSidecars::remove`].
    pub(crate) fn close_replaced(mut self) -> StaleSidecars {
        let id = |f: &File| f.metadata().ok().map(|m| (m.dev(), m.ino()));
        let shm_path = sidecar(&self.path, "-shm");
        let stale = StaleSidecars {
            wal: self
                .wal
                .as_ref()
                .and_then(id)
                .map(|i| (self.wal_path.clone(), i)),
            shm: id(&self.shm).map(|i| (shm_path, i)),
        };
        for i in 0..2 {
            let _ = self.end_pin(i);
        }
        self.unlock_writes();
        drop(self);
        stale
    }

    fn wal_file(&mut self) -> Result<Option<&File>> {
        if self.wal.is_none() {
            match File::open(&self.wal_path) {
                Ok(f) => self.wal = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot open {}", self.wal_path.display()))
                }
            }
        }
        Ok(self.wal.as_ref())
    }

    /// Reads and validates the WAL header; `None` if there is none yet.
    ///
    /// # Errors
    /// I/O errors, or a header that is present but invalid.
    pub(crate) fn wal_header(&mut self) -> Result<Option<WalHeader>> {
        let path = self.wal_path.clone();
        let Some(f) = self.wal_file()? else {
            return Ok(None);
        };
        let mut buf = [0u8; WAL_HEADER_SIZE];
        match read_exact_at(f, &mut buf, 0) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
        if buf.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        WalHeader::parse(&buf)
            .map(Some)
            .map_err(|e| anyhow!("invalid WAL header in {}: {e}", path.display()))
    }

    /// Compares the WAL with `pos` and lists the complete commits after it.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn scan(&mut self, pos: &WalPos) -> Result<WalState> {
        self.scan_limited(pos, None)
    }

    /// [`Db::scan`], which in the same WAL as `pos` may stop once it listed at least two
    /// commits and more than `limit` frames: a capture that takes `limit` frames at a time
    /// then reads the WAL once in all, not once per step to its end (with a writer that
    /// outruns it, a step scanned tens of MiB to capture 4, and the steps fell further
    /// behind). A new WAL is always scanned whole: its commits prove continuity.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn scan_limited(&mut self, pos: &WalPos, limit: Option<u64>) -> Result<WalState> {
        let Some(h) = self.wal_header()? else {
            return Ok(WalState::Empty);
        };
        if h.page_size != pos.page_size {
            return Ok(WalState::Broken(format!(
                "page size changed from {} to {}",
                pos.page_size, h.page_size
            )));
        }
        let lost_pin = std::mem::take(&mut self.lost_pin);
        if (h.salt1, h.salt2) == (pos.salt1, pos.salt2) {
            let (commits, end) = self.scan_from(&h, pos, limit, false)?;
            return Ok(WalState::Same { commits, end });
        }
        // A new WAL. Continuity holds if SQLite's commit count moved by exactly the commits
        // of the new WAL since the position (an application's TRUNCATE checkpoint, after which
        // a connection that never restarted a WAL itself writes one with random salts); or,
        // failing that proof, under the pin protocol (salt-1 one more, pinned throughout).
        let known = self.known.take().filter(|k| k.at(pos));
        let mut attempt = 0;
        let (mut commits, mut end) = self.scan_from(&h, &WalPos::start(&h), None, false)?;
        let (commits, end) = loop {
            let Some(k) = known else {
                break (commits, end);
            };
            // A wal-index that SQLite's recovery rebuilt counts from 0 again: its count proves
            // nothing either way, and the pin protocol below judges. After walship and the
            // application had both crashed, the first WAL restart found the count at 0 (no
            // commit yet), which was taken for lost commits: a new generation every time.
            if self
                .scan_hint
                .is_some_and(|ix| ix.changes == 0 && (ix.salt1, ix.salt2) == (h.salt1, h.salt2))
            {
                break (commits, end);
            }
            match self.commits_accounted(k.changes, &h, &commits) {
                Some(true) => return Ok(WalState::Restarted { commits, end }),
                Some(false) => {
                    return Ok(WalState::Broken(
                        "commits were made in the old WAL after the last one walship captured, and the WAL was reset before walship could read them".into(),
                    ))
                }
                // A commit is landing (its frames are written before SQLite's index shows
                // it): read again shortly; with nothing complete yet, judge next round.
                None if attempt < 50 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_micros(200));
                    if self.wal_header()? == Some(h) {
                        // The frames scanned stay as they were (the WAL is pinned): read only
                        // what came after them. Scanning the whole new WAL again at every
                        // attempt read it ~10 times over behind a max-rate writer.
                        let (more, e) = self.scan_from(&h, &end, None, true)?;
                        commits.extend(more);
                        end = e;
                    } else {
                        (commits, end) = self.scan_from(&h, &WalPos::start(&h), None, false)?;
                    }
                }
                None if commits.is_empty() => {
                    self.known = known;
                    return Ok(WalState::Empty);
                }
                None => break (commits, end),
            }
        };
        tracing::debug!(
            ?known,
            ?pos,
            index = ?self.wal_index(),
            commits = commits.len(),
            "SQLite's commit count does not prove continuity across the WAL reset"
        );
        if lost_pin {
            return Ok(WalState::Broken(
                "the WAL was reset while walship held no read lock on it".into(),
            ));
        }
        if h.salt1 == pos.salt1.wrapping_add(1) {
            return Ok(WalState::Restarted { commits, end });
        }
        Ok(WalState::Broken(format!(
            "the WAL was reset behind walship's back (salt-1 {:08x} -> {:08x})",
            pos.salt1, h.salt1
        )))
    }

    /// Walks valid frames from `pos`, returning complete commits and the position after the
    /// last one. Frames after the last commit frame (a transaction in progress) are left.
    /// `more`: this scan goes on from where the last one listed its last commit, and the
    /// frames that one kept stay kept (see [`Kept::resume`]).
    fn scan_from(
        &mut self,
        h: &WalHeader,
        pos: &WalPos,
        limit: Option<u64>,
        more: bool,
    ) -> Result<(Vec<WalCommit>, WalPos)> {
        self.last_header = Some(*h);
        // Read before the frames: the commit count it shows belongs to a commit the scan
        // then finds (frames are only appended while the WAL is pinned).
        let hint = self.wal_index();
        self.scan_hint = hint;
        let frame_size = h.frame_size();
        let path = self.wal_path.clone();
        let mut kept = std::mem::take(&mut self.kept);
        if !(more && kept.resume(h, pos)) {
            kept.reset(h, pos);
        }
        let Some(f) = self.wal_file()? else {
            self.kept = kept;
            return Ok((Vec::new(), *pos));
        };
        let mut chunk = Chunk::default();
        let mut running = pos.running;
        let mut n = pos.frames;
        let mut commits = Vec::new();
        let mut end = *pos;
        loop {
            let Some(frame) = chunk
                .frame(f, frame_size, n)
                .with_context(|| format!("cannot read {}", path.display()))?
            else {
                break;
            };
            let (fh, page) = frame.split_at(FRAME_HEADER_SIZE);
            let Some((frame, next)) = h.check_frame(running, fh, page) else {
                break;
            };
            running = next;
            kept.push(frame, running, page);
            n += 1;
            if frame.is_commit() {
                commits.push(WalCommit {
                    frames_end: n,
                    db_pages: frame.commit_size,
                    running,
                });
                end = WalPos {
                    salt1: h.salt1,
                    salt2: h.salt2,
                    frames: n,
                    running,
                    page_size: h.page_size,
                };
                if commits.len() >= 2 && limit.is_some_and(|l| n - pos.frames > l) {
                    break;
                }
            }
        }
        self.kept = kept;
        if let Some(ix) = hint.filter(|ix| (ix.salt1, ix.salt2) == (h.salt1, h.salt2)) {
            let at = u64::from(ix.frames);
            if at == pos.frames || commits.iter().any(|c| c.frames_end == at) {
                let after = commits.iter().filter(|c| c.frames_end > at).count() as u32;
                self.known = Some(Known {
                    salts: (h.salt1, h.salt2),
                    frames: end.frames,
                    changes: ix.changes.wrapping_add(after),
                });
            }
        }
        Ok((commits, end))
    }

    /// Reads the next frame of a cursor: its header and its page. They come from the frames
    /// the last scan kept (the very bytes it verified, see [`Kept`]) when the cursor began on
    /// them, else from the file, verifying its salts and checksum again: a frame that changed
    /// since [`Db::scan`] validated it (which the pin protocol should make impossible) is an
    /// error, never silently captured.
    ///
    /// # Errors
    /// I/O errors, a short file, or a frame that no longer verifies.
    pub(crate) fn read_next<'a>(
        &'a mut self,
        cur: &'a mut FrameCursor,
    ) -> Result<(FrameHeader, &'a [u8])> {
        if cur.kept == Some(self.kept.scan) {
            if self.kept.holds(cur.next) {
                let (fh, running, page) = self
                    .kept
                    .frame(cur.next)
                    .ok_or_else(|| anyhow!("internal: a kept frame is missing"))?;
                cur.running = running;
                cur.next += 1;
                return Ok((fh, page));
            }
            // Past the kept frames: from the file, verified again.
            cur.kept = None;
        }
        let path = self.wal_path.clone();
        let f = self
            .wal_file()?
            .ok_or_else(|| anyhow!("{} disappeared", path.display()))?;
        let frame = cur
            .chunk
            .frame(f, cur.header.frame_size(), cur.next)
            .with_context(|| format!("cannot read {}", path.display()))?
            .ok_or_else(|| anyhow!("{} is shorter than expected", path.display()))?;
        let (fh, page) = frame.split_at(FRAME_HEADER_SIZE);
        let Some((h, running)) = cur.header.check_frame(cur.running, fh, page) else {
            return Err(WalChange::Broken(format!(
                "WAL frame {} of {} changed while walship read it",
                cur.next + 1,
                path.display()
            ))
            .into());
        };
        cur.running = running;
        cur.next += 1;
        Ok((h, page))
    }

    /// The WAL header seen by the last [`Db::scan`].
    pub(crate) fn last_header(&self) -> Option<WalHeader> {
        self.last_header
    }

    /// A cursor reading frames after `start`, verified against the WAL header of the last
    /// [`Db::scan`].
    ///
    /// # Errors
    /// No scan has seen a header.
    pub(crate) fn cursor(&self, start: &WalPos) -> Result<FrameCursor> {
        let header = self
            .last_header
            .ok_or_else(|| anyhow!("internal: no WAL header scanned"))?;
        Ok(FrameCursor {
            header,
            running: start.running,
            next: start.frames,
            chunk: Chunk::default(),
            kept: self.kept.begins(&header, start).then_some(self.kept.scan),
        })
    }

    /// The current state of the database as WAL and file show it now: the position after the
    /// last complete commit of the whole WAL (`None` without a WAL), the database size in pages
    /// and the page size. Must run under a pin.
    ///
    /// # Errors
    /// I/O errors, an invalid header, or a WAL that changed while being read.
    pub(crate) fn current_end(&mut self) -> Result<(Option<WalPos>, u32, u32)> {
        match self.wal_header()? {
            Some(h) => {
                let WalState::Same { commits, end } = self.scan(&WalPos::start(&h))? else {
                    bail!("the WAL changed while reading it");
                };
                let pages = match commits.last() {
                    Some(c) => c.db_pages,
                    None => self.file_geometry()?.1,
                };
                Ok((Some(end), pages, h.page_size))
            }
            None => {
                let (ps, pages) = self.file_geometry()?;
                Ok((None, pages, ps))
            }
        }
    }

    /// Page size and page count of the database file itself (used when the WAL is empty).
    ///
    /// # Errors
    /// I/O errors or an invalid header.
    pub(crate) fn file_geometry(&self) -> Result<(u32, u32)> {
        let mut hdr = [0u8; 100];
        if !read_exact_at(&self.file, &mut hdr, 0)? {
            return Ok((0, 0));
        }
        if &hdr[..16] != b"SQLite format 3\0" {
            bail!("{} is not an SQLite database", self.path.display());
        }
        let raw = u16::from_be_bytes([hdr[16], hdr[17]]);
        let ps = if raw == 1 { 65536 } else { u32::from(raw) };
        if !(512..=65536).contains(&ps) || !ps.is_power_of_two() {
            bail!("{} has an invalid page size {raw}", self.path.display());
        }
        let len = self.file.metadata()?.len();
        let counter = &hdr[24..28];
        let valid_for = &hdr[92..96];
        let in_header = u32::from_be_bytes([hdr[28], hdr[29], hdr[30], hdr[31]]);
        let pages = if counter == valid_for && in_header > 0 {
            in_header
        } else {
            u32::try_from(len / u64::from(ps)).unwrap_or(u32::MAX)
        };
        Ok((ps, pages))
    }

    /// Calls `f(pgno, content)` for every page 1..=db_pages of the database as of WAL frame
    /// count `frames` (the database file overlaid with the newest frame of each page among the
    /// first `frames`). Must run under the pin that validated those frames.
    ///
    /// A pin that began on a fully checkpointed WAL ("slot 0") still lets one WAL restart
    /// happen, and a restart overwrites frames from the start of the file: so every frame used
    /// must carry the salts of the WAL header seen by the last scan, and that header must be
    /// the same once all pages were read. Otherwise the pages are not a consistent state and
    /// [`WalChange::Moved`] is returned: the caller captures the new frames and reads again.
    ///
    /// # Errors
    /// I/O errors, [`WalChange::Moved`], or an error from `f`.
    pub(crate) fn for_each_page(
        &mut self,
        page_size: u32,
        frames: u64,
        db_pages: u32,
        mut f: impl FnMut(u32, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let ps = page_size as usize;
        let mut latest: HashMap<u32, u64> = HashMap::new();
        let mut fh = [0u8; FRAME_HEADER_SIZE];
        let frame_size = (FRAME_HEADER_SIZE + ps) as u64;
        let expect = if frames > 0 {
            let h = self
                .last_header
                .ok_or_else(|| anyhow!("internal: no WAL header scanned"))?;
            let path = self.wal_path.clone();
            let wal = self
                .wal_file()?
                .ok_or_else(|| anyhow!("{} disappeared", path.display()))?;
            for i in 0..frames {
                if !read_exact_at(wal, &mut fh, WAL_HEADER_SIZE as u64 + i * frame_size)? {
                    return Err(WalChange::Moved.into());
                }
                let salts = (
                    u32::from_be_bytes([fh[8], fh[9], fh[10], fh[11]]),
                    u32::from_be_bytes([fh[12], fh[13], fh[14], fh[15]]),
                );
                if salts != (h.salt1, h.salt2) {
                    return Err(WalChange::Moved.into());
                }
                latest.insert(u32::from_be_bytes([fh[0], fh[1], fh[2], fh[3]]), i);
            }
            Some(h)
        } else {
            None
        };
        let mut page = vec![0u8; ps];
        for pgno in 1..=db_pages {
            if let Some(&i) = latest.get(&pgno) {
                let wal = self.wal.as_ref().ok_or_else(|| anyhow!("WAL closed"))?;
                let off = WAL_HEADER_SIZE as u64 + i * frame_size + FRAME_HEADER_SIZE as u64;
                if !read_exact_at(wal, &mut page, off)? {
                    return Err(WalChange::Moved.into());
                }
            } else {
                let off = u64::from(pgno - 1) * ps as u64;
                if !read_exact_at(&self.file, &mut page, off)? {
                    page.fill(0);
                }
            }
            f(pgno, &page)?;
        }
        if let Some(h) = expect {
            let now = self.wal_header()?;
            if now.map(|n| (n.salt1, n.salt2)) != Some((h.salt1, h.salt2)) {
                return Err(WalChange::Moved.into());
            }
        }
        Ok(())
    }
}

/// SQLite's commit count at a position in the WAL.
#[derive(Debug, Clone, Copy)]
struct Known {
    salts: (u32, u32),
    frames: u64,
    changes: u32,
}

impl Known {
    fn at(&self, pos: &WalPos) -> bool {
        self.salts == (pos.salt1, pos.salt2) && self.frames == pos.frames
    }
}

/// The `-wal` and `-shm` of a database walship closed because its path was replaced.
#[derive(Debug)]
pub(crate) struct StaleSidecars {
    wal: Option<(PathBuf, (u64, u64))>,
    shm: Option<(PathBuf, (u64, u64))>,
}

/// Offset in `-shm` of the byte every SQLite connection holds a shared lock on while it has
/// the wal-index open (`UNIX_SHM_DMS`).
const SHM_DMS_LOCK: i64 = 128;

impl StaleSidecars {
    /// Removes the old database's `-wal` and `-shm` if they are still there under their names
    /// (SQLite leaves them when its database file was moved: its close does not checkpoint a
    /// moved file) and no other process has them open. Left there, SQLite would pair them with
    /// the new file and read the old pages over it. Returns `None` once the names are free of
    /// them, or the one still in use by another process (which holds the old database open):
    /// the new file must not be opened until that process lets go.
    ///
    /// Race-free against an application opening the new file meanwhile: the removal happens
    /// under an exclusive lock on the wal-index's DMS byte, which every SQLite connection
    /// takes (shared) before it uses the wal-index, so none can be using or opening them.
    ///
    /// # Errors
    /// I/O errors other than "not found".
    pub(crate) fn remove(&self) -> Result<Option<&Path>> {
        let wal = self.wal.as_ref().filter(|(p, id)| file_id(p) == Some(*id));
        let shm = self.shm.as_ref().filter(|(p, id)| file_id(p) == Some(*id));
        let unlink = |p: &Path| match std::fs::remove_file(p) {
            Ok(()) => {
                tracing::info!("removed {} of the replaced database", p.display());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
        };
        let Some((shm_path, shm_id)) = shm else {
            // Without its wal-index nobody can be using the old WAL.
            if let Some((p, _)) = wal {
                unlink(p)?;
            }
            return Ok(None);
        };
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(shm_path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", shm_path.display())),
        };
        if f.metadata().ok().map(|m| (m.dev(), m.ino())) != Some(*shm_id) {
            return Ok(None);
        }
        if !fcntl_lock(&f, nix::libc::F_WRLCK as i16, SHM_DMS_LOCK)
            .with_context(|| format!("cannot lock {}", shm_path.display()))?
        {
            return Ok(Some(shm_path.as_path()));
        }
        if let Some((p, _)) = wal {
            unlink(p)?;
        }
        unlink(shm_path)?;
        // Closing `f` releases the lock.
        Ok(None)
    }
}

/// What SQLite's wal-index in `shm` says of the current WAL, read without any lock (see
/// [`Db::wal_index`]).
fn read_wal_index(shm: &File) -> Option<WalIndexHint> {
    // Two copies of the 48-byte header, then the checkpoint info (nBackfill first); all in
    // native byte order.
    let mut b = [0u8; 100];
    if !read_exact_at(shm, &mut b, 0).ok()? || b[..48] != b[48..96] {
        return None;
    }
    let u = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    // The salts are the WAL header's bytes, copied as they are (big-endian).
    let be = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    Some(WalIndexHint {
        frames: u(16),
        salt1: be(32),
        salt2: be(36),
        backfilled: u(96),
        changes: u(8),
    })
}

/// True if another process holds a lock on byte `offset` of `f` (`F_GETLK`).
fn shm_held(f: &File, offset: i64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain fcntl on a descriptor we own, with a fully initialised flock.
    let mut fl: nix::libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = nix::libc::F_WRLCK as i16;
    fl.l_whence = nix::libc::SEEK_SET as i16;
    fl.l_start = offset;
    fl.l_len = 1;
    // SAFETY: as above; F_GETLK only fills `fl`.
    let rc = unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_GETLK, &mut fl) };
    rc == 0 && fl.l_type != nix::libc::F_UNLCK as i16
}

/// Sets (or clears, with `F_UNLCK`) a POSIX lock on one byte without waiting; false if
/// another process holds a conflicting lock.
fn fcntl_lock(f: &File, kind: i16, offset: i64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain fcntl on a descriptor we own, with a fully initialised flock.
    let mut fl: nix::libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = nix::libc::SEEK_SET as i16;
    fl.l_start = offset;
    fl.l_len = 1;
    // SAFETY: as above.
    let rc = unsafe { nix::libc::fcntl(f.as_raw_fd(), nix::libc::F_SETLK, &fl) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(nix::libc::EAGAIN) | Some(nix::libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// The (device, inode) a path names now, if any.
fn file_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// The WAL changed under walship in a way its caller must act on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WalChange {
    /// The WAL was restarted while pages were being read from it: what was read is not one
    /// state; read again.
    #[error("the WAL was restarted while walship read the database; reading again")]
    Moved,
    /// Continuity with what was captured is broken: a new generation is needed.
    #[error("{0}")]
    Broken(String),
}

impl WalChange {
    /// Whether `e` is a [`WalChange::Moved`].
    pub(crate) fn is_moved(e: &anyhow::Error) -> bool {
        matches!(e.downcast_ref::<WalChange>(), Some(WalChange::Moved))
    }

    /// Whether `e` is a [`WalChange::Broken`].
    pub(crate) fn is_broken(e: &anyhow::Error) -> bool {
        matches!(e.downcast_ref::<WalChange>(), Some(WalChange::Broken(_)))
    }
}

/// Reads exactly `buf.len()` bytes at `off`; Ok(false) if the file ends first.
fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<bool> {
    Ok(read_full_at(f, buf, off)? == buf.len())
}

/// A checkpoint running on a thread of its own (see [`Db::copy_behind`]).
pub(crate) struct Copier(std::thread::JoinHandle<Result<()>>);

/// A PASSIVE checkpoint under walship's write lock, tried again until every frame is copied:
/// with the write lock held the WAL cannot grow, and readers of older snapshots finish within
/// their statement, so that the pin that follows is a slot-0 reader and the next writer can
/// restart the WAL. An application's own checkpoint (its autocheckpoint after a commit) makes
/// SQLite report -1: it is copying the same frames; it is waited for. Returns (frames in WAL,
/// frames checkpointed) as SQLite reports them.
fn checkpoint_all(ckpt: &Connection) -> Result<(i64, i64)> {
    let started = std::time::Instant::now();
    loop {
        let r = ckpt
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
            .context("checkpoint failed");
        let waited = started.elapsed();
        match r {
            Ok((log, done))
                if (log < 0 && waited < CHECKPOINT_BUSY_WAIT)
                    || (done < log && waited < Duration::from_millis(20)) =>
            {
                std::thread::sleep(Duration::from_micros(500));
            }
            other => break other,
        }
    }
}

/// Reads into `buf` from `off` until it is full or the file ends; returns the bytes read.
pub(crate) fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The wal-index hint agrees with the WAL itself: frame count and salts while a writer
    /// appends, `backfilled` after a checkpoint, and a restart shows as new salts.
    #[test]
    fn wal_index_hint_matches_the_wal() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("t.db");
        let app = rusqlite::Connection::open(&p)?;
        app.pragma_update(None, "journal_mode", "wal")?;
        app.pragma_update(None, "wal_autocheckpoint", 0)?;
        app.execute_batch("create table t(x); insert into t values (randomblob(5000));")?;
        let mut db = Db::open(&p)?;
        db.rotate_pin()?;
        for _ in 0..20 {
            app.execute("insert into t values (randomblob(3000))", [])?;
        }
        let (Some(end), _, _) = db.current_end()? else {
            bail!("no WAL after 21 commits");
        };
        let h = db.wal_index().context("no wal-index hint")?;
        assert_eq!(u64::from(h.frames), end.frames);
        assert_eq!((h.salt1, h.salt2), (end.salt1, end.salt2));
        assert!(h.backfilled < h.frames);
        assert!(db.lock_writes(Duration::from_secs(1))?);
        let (log, done) = db.checkpoint_locked()?;
        assert_eq!(log, done);
        let h2 = db.wal_index().context("no wal-index hint")?;
        assert_eq!((h2.frames, h2.backfilled), (h.frames, h.frames));
        // The next writer restarts the WAL from its start, with new salts.
        app.execute("insert into t values (1)", [])?;
        let h3 = db.wal_index().context("no wal-index hint")?;
        assert!(h3.frames < h.frames, "{h3:?} after {h:?}");
        assert_ne!((h3.salt1, h3.salt2), (h.salt1, h.salt2));
        Ok(())
    }

    /// Under the write lock, `copy_behind` copies the whole WAL past the old pin while capture
    /// is still short of its end, and the pin it leaves keeps the next writer from restarting
    /// the WAL over the frames capture has not read, even once the lock is given back (as when
    /// a hold runs out of its budget). A position in another WAL moves nothing.
    #[test]
    fn copying_under_the_write_lock_never_lets_the_wal_restart_over_uncaptured_frames() -> Result<()>
    {
        let dir = tempfile::tempdir()?;
        let (_p, app, mut db, start) = pinned_app(dir.path())?;
        for _ in 0..20 {
            app.execute("insert into t values (randomblob(3000))", [])?;
        }
        let h = db.wal_index().context("no wal-index hint")?;
        assert!(u64::from(h.frames) > start.frames);
        // The old pin was taken at `start`: a checkpoint copies nothing past it.
        assert_eq!(
            db.checkpoint_passive()?,
            Some((i64::from(h.frames), start.frames as i64))
        );

        let other = WalPos {
            salt1: start.salt1.wrapping_add(1),
            ..start
        };
        assert!(db.lock_writes(Duration::from_secs(1))?);
        assert!(
            db.copy_behind(&other)?.is_none(),
            "a pin moved for another WAL"
        );
        let copier = db.copy_behind(&start)?.context("no copy started")?;
        db.copied(copier);
        let copied = db.wal_index().context("no wal-index hint")?;
        assert_eq!((copied.frames, copied.backfilled), (h.frames, h.frames));
        // The lock is given back before capture read past `start`.
        db.unlock_writes();
        app.execute("insert into t values (2)", [])?;
        let after = db.wal_index().context("no wal-index hint")?;
        assert_eq!(
            (after.salt1, after.salt2),
            (h.salt1, h.salt2),
            "the WAL restarted"
        );
        assert_eq!(after.frames, h.frames + 1);
        // Nothing was lost: the frames after `start` are all still there to capture.
        match db.scan(&start)? {
            WalState::Same { commits, end } => {
                assert_eq!(commits.len(), 21);
                assert_eq!(end.frames, u64::from(after.frames));
            }
            other => bail!("{other:?}"),
        }
        Ok(())
    }

    /// An application's database `t.db` in `dir`, in WAL mode without autocheckpoints, with
    /// one commit in its WAL.
    pub(crate) fn wal_app(dir: &Path) -> Result<(PathBuf, rusqlite::Connection)> {
        let p = dir.join("t.db");
        let app = rusqlite::Connection::open(&p)?;
        app.pragma_update(None, "journal_mode", "wal")?;
        app.pragma_update(None, "wal_autocheckpoint", 0)?;
        app.execute_batch("create table t(x); insert into t values (1);")?;
        Ok((p, app))
    }

    /// [`wal_app`] with walship's [`Db`] on it, pinned, and the position after its commits.
    fn pinned_app(dir: &Path) -> Result<(PathBuf, rusqlite::Connection, Db, WalPos)> {
        let (p, app) = wal_app(dir)?;
        let mut db = Db::open(&p)?;
        db.rotate_pin()?;
        let (Some(start), _, _) = db.current_end()? else {
            bail!("no WAL after the first commit");
        };
        Ok((p, app, db, start))
    }

    /// Runs `python3 -c script db` and returns its standard output, trimmed.
    pub(crate) fn python(script: &str, db: &Path) -> Result<String> {
        let o = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(db)
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "python3: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    }

    /// Whether `PRAGMA wal_checkpoint(PASSIVE)` in another process finds SQLite's
    /// checkpointer lock taken.
    pub(crate) fn other_checkpoint_busy(db: &Path) -> Result<bool> {
        let out = python(
            "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nprint(c.execute('pragma wal_checkpoint(PASSIVE)').fetchone()[0])",
            db,
        )?;
        Ok(out == "1")
    }

    /// While walship holds the checkpointer lock, another process's checkpoint returns busy
    /// at once; walship's own checkpoint still runs, and SQLite lets go of the lock when it
    /// ends, as [`Db::release_checkpoints`] does.
    #[test]
    fn held_checkpoints_are_busy_for_other_processes_only() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (p, app) = wal_app(dir.path())?;
        let db = Db::open(&p)?;
        let other_busy = || other_checkpoint_busy(&p);
        assert!(!other_busy()?, "busy before walship held anything");
        assert!(db.hold_checkpoints()?);
        assert!(
            other_busy()?,
            "another process checkpointed while walship held the lock"
        );
        app.execute("insert into t values (2)", [])?;
        assert!(
            db.checkpoint_passive()?.is_some(),
            "walship's own checkpoint was busy"
        );
        assert!(!other_busy()?, "the lock outlived walship's own checkpoint");
        assert!(db.hold_checkpoints()?);
        assert!(other_busy()?);
        db.release_checkpoints();
        assert!(!other_busy()?, "the lock outlived its release");
        Ok(())
    }

    /// The write-back hint works on walship's read-only handle of the database.
    #[test]
    fn writeback_starts_on_the_read_only_handle() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (p, app) = wal_app(dir.path())?;
        let db = Db::open(&p)?;
        app.execute("insert into t values (randomblob(100000))", [])?;
        app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        db.start_writeback()?;
        Ok(())
    }

    /// A limited scan lists the commits of an unlimited one up to the first past the limit
    /// (at least two), so that a capture of a few frames at a time reads each frame once.
    #[test]
    fn a_limited_scan_stops_past_its_limit() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_, app, mut db, start) = pinned_app(dir.path())?;
        for i in 0..50 {
            app.execute("insert into t values (?1)", [i])?;
        }
        let WalState::Same { commits: all, .. } = db.scan(&start)? else {
            bail!("the WAL moved");
        };
        assert_eq!(all.len(), 50);
        for limit in [0u64, 1, 10, 30] {
            let WalState::Same { commits, end } = db.scan_limited(&start, Some(limit))? else {
                bail!("the WAL moved");
            };
            let k = commits.len();
            assert!(k >= 2 && k < all.len(), "limit {limit}: {k} commits");
            assert_eq!(commits[..], all[..k], "limit {limit}");
            assert_eq!(end.frames, commits[k - 1].frames_end);
            assert!(commits[k - 1].frames_end - start.frames > limit);
            if k > 2 {
                assert!(commits[k - 2].frames_end - start.frames <= limit);
            }
        }
        let WalState::Same { commits, .. } = db.scan_limited(&start, Some(1000))? else {
            bail!("the WAL moved");
        };
        assert_eq!(commits, all, "a limit past the end lists everything");
        Ok(())
    }

    /// A cursor serves the frames its scan kept as that scan verified them, without reading
    /// the file again; past them (a commit bigger than [`KEEP_MAX`]) it reads the file and
    /// verifies each frame again. Shown by changing two frames in the file after the scan:
    /// the kept one is served as it was, the other is refused.
    #[test]
    fn a_cursor_serves_kept_frames_and_verifies_the_rest_again() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (p, app, mut db, start) = pinned_app(dir.path())?;
        app.execute(
            "insert into t values (randomblob(?1))",
            [KEEP_MAX as i64 + (1 << 20)],
        )?;
        let WalState::Same { commits, end } = db.scan(&start)? else {
            bail!("the WAL moved");
        };
        assert_eq!(commits.len(), 1);
        let frames = end.frames - start.frames;
        let kept = db.kept.frames.len() as u64;
        assert!(kept > 0 && kept < frames, "{kept} of {frames} frames kept");
        let h = db.last_header().context("no header")?;
        let first_page = {
            let mut cur = db.cursor(&start)?;
            db.read_next(&mut cur)?.1.to_vec()
        };
        // Change the page of the first frame (kept) and of the last (not kept) in the file.
        let wal = std::fs::OpenOptions::new()
            .write(true)
            .open(sidecar(&p, "-wal"))?;
        let page_at =
            |n: u64| WAL_HEADER_SIZE as u64 + n * h.frame_size() as u64 + FRAME_HEADER_SIZE as u64;
        wal.write_all_at(&[0x5a; 64], page_at(start.frames))?;
        wal.write_all_at(&[0x5a; 64], page_at(end.frames - 1))?;
        let mut cur = db.cursor(&start)?;
        assert_eq!(
            db.read_next(&mut cur)?.1,
            &first_page[..],
            "a kept frame changed"
        );
        let mut read = 1;
        let err = loop {
            match db.read_next(&mut cur) {
                Ok(_) => read += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(
            read,
            frames - 1,
            "the changed frame past the kept ones was served"
        );
        assert!(
            format!("{err:#}").contains("changed while walship read it"),
            "{err:#}"
        );
        Ok(())
    }

    /// The proof of continuity across a WAL reset counts the commits SQLite's index showed
    /// before the scan read the frames: a commit made after the scan does not spoil it (the
    /// index read after the scan was ahead of it, and the proof was retried, scanning again).
    #[test]
    fn commits_are_accounted_with_the_index_read_before_the_scan() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_, app, mut db, start) = pinned_app(dir.path())?;
        let before = db.wal_index().context("no wal-index")?.changes;
        for i in 0..3 {
            app.execute("insert into t values (?1)", [i])?;
        }
        let h = db.wal_header()?.context("no WAL header")?;
        let WalState::Same { commits, .. } = db.scan(&start)? else {
            bail!("the WAL moved");
        };
        assert_eq!(commits.len(), 3);
        app.execute("insert into t values (4)", [])?;
        assert_eq!(db.commits_accounted(before, &h, &commits), Some(true));
        assert_eq!(
            db.commits_accounted(before.wrapping_sub(1), &h, &commits),
            Some(false),
            "a commit not seen"
        );
        Ok(())
    }

    /// A chunk serves every frame as the file holds it, in order and out of order, across
    /// read boundaries, with runs that grow while read in order; a frame the file ends inside
    /// is `None`.
    #[test]
    fn chunk_reads_frames_as_the_file_holds_them() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("f");
        let fs = 24 + 512;
        let n = 200u64;
        let mut bytes = vec![0xeeu8; WAL_HEADER_SIZE];
        for i in 0..n {
            bytes.extend((0..fs).map(|j| (i as usize * 7 + j) as u8));
        }
        bytes.extend(vec![1u8; fs / 2]); // a frame cut short
        std::fs::write(&p, &bytes)?;
        let f = File::open(&p)?;
        let at = |i: u64| {
            let o = WAL_HEADER_SIZE + i as usize * fs;
            bytes[o..o + fs].to_vec()
        };
        let mut c = Chunk::default();
        for i in 0..n {
            assert_eq!(
                c.frame(&f, fs, i)?.map(<[u8]>::to_vec),
                Some(at(i)),
                "frame {i}"
            );
        }
        assert_eq!(c.want, CHUNK_MAX_FRAMES, "in-order reads grow the run");
        assert_eq!(c.frame(&f, fs, n)?, None);
        for i in [150, 3, 199, 0, 77, 78] {
            assert_eq!(
                c.frame(&f, fs, i)?.map(<[u8]>::to_vec),
                Some(at(i)),
                "frame {i}"
            );
        }
        assert_eq!(c.frame(&f, fs, n + 5)?, None);
        Ok(())
    }
}
