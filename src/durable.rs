//! Durable local files: every file walship writes on this machine goes through here.
//!
//! Invariants: [`write_file_atomic`] writes to a temporary name in the destination directory,
//! fsyncs it, renames it over the final name and fsyncs the directory, so after a power cut the
//! final name holds either the old complete file or the new one. Temporary names all start with
//! [`TEMP_PREFIX`] (which no final name of walship's uses), so [`remove_temp_files`] can sweep
//! what a crash left behind. [`RemoveOnDrop`] removes a temporary file on every error path.
//!
//! A [`RecordFile`] (a small value saved often, through [`RecordFiles`]) is the exception to
//! rewriting by rename: created once through [`write_file_atomic`], it is then rewritten in
//! place with `pwrite` and `fdatasync` (no new file, no directory fsync per save; or less, see
//! [`Durability`]). It is two
//! slots of [`RECORD_SLOT`] bytes, so its size never changes after creation; a slot is the
//! magic `WSRECv1\0`, a u64 sequence, a u32 payload length (little endian), the payload and
//! the xxh3_64 of all that, zeros to its end. The record with sequence `n` goes in slot
//! `n % 2`, so a save overwrites the record before the newest one: after a power cut or a torn
//! write the valid slot with the highest sequence holds the new value or the one before it,
//! and a reader racing a save (as `walship status` does) sees one of the two, never a torn
//! value (checksums); it rereads in the rare case it caught both slots mid-write. A file that
//! is not two slots long and does not start with the magic is a plain file of walship's from
//! before record files, read whole; its next save replaces it with a record file.

use anyhow::{bail, Context as _};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Prefix of every temporary file name; final names never start with it.
pub const TEMP_PREFIX: &str = ".walship-tmp-";

/// A unique temporary name (for the directory of a final file) that [`Backend::cleanup`]
/// recognises.
pub(crate) fn temp_name() -> String {
    // The pid once: `std::process::id` is a system call, and several temporary files are
    // named per commit.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!(
        "{TEMP_PREFIX}{}-{:016x}",
        PID.get_or_init(std::process::id),
        rand::random::<u64>()
    )
}

/// Removes a (temporary) file when dropped, unless [`RemoveOnDrop::keep`] says it was moved
/// into place: every error path, and a panic, leave no temporary file behind.
#[derive(Debug)]
pub(crate) struct RemoveOnDrop {
    path: PathBuf,
    armed: bool,
}

impl RemoveOnDrop {
    /// Guards `path` (which may not exist yet).
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            armed: true,
        }
    }

    /// The guarded path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file was renamed into place (or must stay): do not remove it.
    pub(crate) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d)?.sync_all()
}

/// Writes `data` to `dest` through a temporary file in the same directory: write, fsync,
/// rename, fsync the directory. Used for every local file walship writes whole (and to create
/// record files).
///
/// # Errors
/// Any I/O failure; the temporary file is removed on failure.
pub(crate) fn write_file_atomic(dest: &Path, data: &mut dyn Read, mode: u32) -> io::Result<u64> {
    // In chunks of COPY_CHUNK: behind a `dyn Read`, `io::copy` alone reads 8 KiB at a time,
    // two system calls per 8 KiB of every segment uploaded to a file replica.
    write_via_temp(dest, mode, true, |f| {
        io::copy(&mut io::BufReader::with_capacity(COPY_CHUNK, data), f)
    })
    .map(|(n, _)| n)
}

/// Replaces `dest` with `data` through a temporary file and a rename, without fsync: readers
/// never see a torn file, but after a power loss it may hold an older version or nothing. Only
/// for files rewritten at once on start that lose nothing when stale (walship's `status` file,
/// rewritten with every commit: two fsyncs per commit for nothing).
///
/// # Errors
/// Any I/O failure; the temporary file is removed on failure.
pub(crate) fn replace_file(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_via_temp(dest, mode, false, |f| write_all(f, data)).map(|_| ())
}

/// Writes all of `data` to `f`; returns its length.
fn write_all(f: &mut File, data: &[u8]) -> io::Result<u64> {
    f.write_all(data)?;
    Ok(data.len() as u64)
}

/// Bytes [`write_file_atomic`] reads and writes at a time.
const COPY_CHUNK: usize = 256 << 10;

/// [`write_file_atomic`] (`durable`) or [`replace_file`], the temporary file filled by `write`;
/// returns the bytes written and the file, still open for writing.
fn write_via_temp(
    dest: &Path,
    mode: u32,
    durable: bool,
    write: impl FnOnce(&mut File) -> io::Result<u64>,
) -> io::Result<(u64, File)> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(temp_name());
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        let n = write(&mut f)?;
        f.flush()?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, dest)?;
        if durable {
            fsync_dir(dir)?;
        }
        Ok((n, f))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files (named by [`temp_name`]) that an interrupted
/// [`write_file_atomic`] left in `dir` (not below it), then fsyncs `dir`; a missing `dir` has
/// none. Only for directories no other live process writes into (walship holds the state
/// directory's lock; a replica's temp files are swept when nothing uploads).
///
/// # Errors
/// Listing, removing or syncing failed.
pub(crate) fn remove_temp_files(dir: &Path) -> io::Result<usize> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for ent in rd {
        let ent = ent?;
        if ent
            .file_name()
            .to_str()
            .is_some_and(|s| s.starts_with(TEMP_PREFIX))
        {
            fs::remove_file(ent.path())?;
            n += 1;
        }
    }
    if n > 0 {
        fsync_dir(dir)?;
    }
    Ok(n)
}

/// Takes the exclusive `flock` on `dir/lock` (created if missing) that marks `dir` as owned by
/// one live process, then removes the temporary files a killed predecessor left there. The
/// lock lasts as long as the returned file is open (the kernel drops it when the process dies,
/// so a stale lock cannot exist).
///
/// # Errors
/// The lock file cannot be opened, another process holds the lock (`held` says who should not
/// be there, with what to do), or the sweep failed.
pub(crate) fn lock_dir(dir: &Path, held: &str) -> anyhow::Result<File> {
    use anyhow::Context as _;
    let p = dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    if !flock(&f, nix::libc::LOCK_EX) {
        anyhow::bail!("{held}");
    }
    remove_temp_files(dir)
        .with_context(|| format!("cannot remove temporary files in {}", dir.display()))?;
    Ok(f)
}

/// Whether a live process holds [`lock_dir`]'s lock on `dir` now.
pub(crate) fn lock_held(dir: &Path) -> bool {
    OpenOptions::new()
        .write(true)
        .open(dir.join("lock"))
        .is_ok_and(|f| !flock(&f, nix::libc::LOCK_SH))
}

/// `flock(f, how | LOCK_NB)`; whether it was granted.
fn flock(f: &File, how: i32) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    unsafe { nix::libc::flock(f.as_raw_fd(), how | nix::libc::LOCK_NB) == 0 }
}

/// Size of one slot of a [`RecordFile`]; the file is exactly two slots long.
pub(crate) const RECORD_SLOT: usize = 4096;
/// How a record slot starts.
const RECORD_MAGIC: &[u8; 8] = b"WSRECv1\0";
/// Magic, sequence (u64 LE), payload length (u32 LE).
const RECORD_HEADER: usize = 8 + 8 + 4;
/// The largest payload a record holds (the slot less its header and its xxh3_64).
pub(crate) const RECORD_MAX_PAYLOAD: usize = RECORD_SLOT - RECORD_HEADER - 8;
/// How often a reader rereads a record file in which it found no valid slot: a reader can
/// catch both slots mid-write only if two saves ran during its read.
const RECORD_READ_TRIES: u32 = 5;

/// One slot: magic, `seq`, the payload's length, the payload, then the xxh3_64 of all that;
/// zeros to the slot's end.
fn encode_slot(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut slot = Vec::with_capacity(RECORD_SLOT);
    slot.extend_from_slice(RECORD_MAGIC);
    slot.extend_from_slice(&seq.to_le_bytes());
    // The caller checked payload.len() <= RECORD_MAX_PAYLOAD, which fits a u32.
    slot.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    slot.extend_from_slice(payload);
    let hash = xxhash_rust::xxh3::xxh3_64(&slot);
    slot.extend_from_slice(&hash.to_le_bytes());
    slot.resize(RECORD_SLOT, 0);
    slot
}

/// The sequence and payload of a slot, if it is valid (not torn, not corrupt).
fn decode_slot(slot: &[u8]) -> Option<(u64, &[u8])> {
    if slot.len() < RECORD_HEADER + 8 || !slot.starts_with(RECORD_MAGIC) {
        return None;
    }
    let seq = u64::from_le_bytes(slot[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(slot[16..20].try_into().ok()?) as usize;
    if len > RECORD_MAX_PAYLOAD {
        return None;
    }
    let end = RECORD_HEADER + len;
    let hash = u64::from_le_bytes(slot.get(end..end + 8)?.try_into().ok()?);
    (xxhash_rust::xxh3::xxh3_64(&slot[..end]) == hash).then(|| (seq, &slot[RECORD_HEADER..end]))
}

/// The newest valid record in the bytes of a record file: its sequence and payload.
fn newest_record(data: &[u8]) -> Option<(u64, &[u8])> {
    data.chunks(RECORD_SLOT)
        .take(2)
        .filter_map(decode_slot)
        .max_by_key(|&(seq, _)| seq)
}

/// Whether `data` (a whole file) is a record file rather than a plain text file of the kind
/// walship wrote before record files: record files are exactly two slots long (a torn first
/// slot may have lost its magic), plain files are a few hundred bytes of text.
fn is_record_file(data: &[u8]) -> bool {
    data.len() == 2 * RECORD_SLOT || data.starts_with(RECORD_MAGIC)
}

/// Reads the value of a record file: the payload of its newest valid slot or, for a plain
/// file (one walship wrote before record files), the whole file. `None` if `path` does not
/// exist.
///
/// # Errors
/// The file cannot be read, or is a record file without a valid slot (the message names it).
pub(crate) fn read_record(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    for _ in 0..RECORD_READ_TRIES {
        let data = match fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if !is_record_file(&data) {
            return Ok(Some(data));
        }
        if let Some((_, payload)) = newest_record(&data) {
            return Ok(Some(payload.to_vec()));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    bail!(
        "{} is corrupt: neither of its two record slots is valid",
        path.display()
    )
}

/// How far a [`RecordFile`] save goes before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// `fdatasync`: durable on return.
    Synced,
    /// Written to the device and waited for, not flushed from its write cache
    /// (`sync_file_range` with `WAIT_BEFORE | WRITE | WAIT_AFTER`): durable once anything on the
    /// same file system is fsynced after the return, since a file system's `fsync` ends with a
    /// cache flush of the whole device (ext4, XFS and btrfs do, unless mounted without
    /// barriers). For a save that an fsync of another file always follows before anything
    /// relies on it: it spares the file's own inode write and cache flush. The record file's
    /// size never changes after creation, so no metadata is needed to read the slot back.
    Written,
    /// Left in the page cache: a power cut may set the file back to the record before.
    Cached,
}

/// A record file open for saving: a small value rewritten in place (see the module doc).
#[derive(Debug)]
pub(crate) struct RecordFile {
    path: PathBuf,
    file: File,
    /// Device and inode of `file`, to notice that `path` names another file now.
    id: (u64, u64),
    /// The sequence of the newest record in the file.
    seq: u64,
}

impl RecordFile {
    /// Creates (or replaces) the record file `path` holding `payload` as sequence `seq`, through
    /// [`write_file_atomic`]'s path: a new file of both slots (the other one zeros), so that
    /// its size never changes afterwards.
    ///
    /// # Errors
    /// `payload` does not fit, or I/O errors (the message names the file).
    pub(crate) fn create(path: &Path, payload: &[u8], mode: u32, seq: u64) -> anyhow::Result<Self> {
        check_fits(path, payload)?;
        let mut data = vec![0u8; 2 * RECORD_SLOT];
        let at = slot_offset(seq) as usize;
        data[at..at + RECORD_SLOT].copy_from_slice(&encode_slot(seq, payload));
        let (_, file) = write_via_temp(path, mode, true, |f| write_all(f, &data))
            .with_context(|| format!("cannot write {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        Ok(RecordFile {
            path: path.to_owned(),
            file,
            id: (meta.dev(), meta.ino()),
            seq,
        })
    }

    /// Opens the record file `path` for saving; `None` if there is none there (missing, a plain
    /// file, or one without a valid slot: [`RecordFile::create`] replaces it).
    ///
    /// # Errors
    /// I/O errors other than a missing file (the message names it).
    pub(crate) fn open(path: &Path) -> anyhow::Result<Option<Self>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if meta.len() != 2 * RECORD_SLOT as u64 {
            return Ok(None);
        }
        let mut data = vec![0u8; 2 * RECORD_SLOT];
        file.read_exact_at(&mut data, 0)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(newest_record(&data).map(|(seq, _)| RecordFile {
            path: path.to_owned(),
            file,
            id: (meta.dev(), meta.ino()),
            seq,
        }))
    }

    /// Saves `payload` as the file's new value: written over the slot that does not hold the
    /// newest record, then made as durable as `durability` says (short of synced, a power cut
    /// may leave the record before, never a torn one: the slots' checksums tell). If `path` no
    /// longer names the open file (removed or replaced under us), a new file is created there
    /// instead (synced).
    ///
    /// # Errors
    /// `payload` does not fit, or I/O errors (the message names the file). The newest record
    /// before the call is intact after a failed save, and the next save writes the same slot.
    pub(crate) fn save_with(
        &mut self,
        payload: &[u8],
        mode: u32,
        durability: Durability,
    ) -> anyhow::Result<()> {
        check_fits(&self.path, payload)?;
        let seq = self.seq.wrapping_add(1);
        match fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {}
            Ok(_) => {
                tracing::warn!(
                    "{} was replaced by another file: rewriting it",
                    self.path.display()
                );
                *self = RecordFile::create(&self.path, payload, mode, seq)?;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!("{} was removed: creating it again", self.path.display());
                *self = RecordFile::create(&self.path, payload, mode, seq)?;
                return Ok(());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot stat {}", self.path.display()))
            }
        }
        self.file
            .write_all_at(&encode_slot(seq, payload), slot_offset(seq))
            .and_then(|()| match durability {
                Durability::Synced => self.file.sync_data(),
                Durability::Written => write_through(&self.file),
                Durability::Cached => Ok(()),
            })
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.seq = seq;
        Ok(())
    }
}

/// Writes `file`'s dirty pages to the device and waits for them, without a cache flush (see
/// [`Durability::Written`]).
fn write_through(file: &File) -> io::Result<()> {
    use nix::libc::{
        SYNC_FILE_RANGE_WAIT_AFTER as AFTER, SYNC_FILE_RANGE_WAIT_BEFORE as BEFORE,
        SYNC_FILE_RANGE_WRITE as WRITE,
    };
    sync_range(file, 0, 0, BEFORE | WRITE | AFTER)
}

/// Starts the write-back of `file`'s dirty pages in `len` bytes from `from` (0: to its end)
/// without waiting for the disk (`SYNC_FILE_RANGE_WRITE`): a hint, which durability never
/// relies on. It may still block while it allocates blocks and submits the writes.
pub(crate) fn start_writeback(file: &File, from: u64, len: u64) -> io::Result<()> {
    sync_range(file, from, len, nix::libc::SYNC_FILE_RANGE_WRITE)
}

/// `sync_file_range(2)` on `file` with `flags`.
fn sync_range(file: &File, from: u64, len: u64, flags: nix::libc::c_uint) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let offset =
        |v: u64| i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (from, len) = (offset(from)?, offset(len)?);
    // SAFETY: a plain system call on a descriptor `file` keeps open.
    let rc = unsafe { nix::libc::sync_file_range(file.as_raw_fd(), from, len, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn slot_offset(seq: u64) -> u64 {
    (seq % 2) * RECORD_SLOT as u64
}

fn check_fits(path: &Path, payload: &[u8]) -> anyhow::Result<()> {
    if payload.len() > RECORD_MAX_PAYLOAD {
        bail!(
            "cannot write {}: a record of {} bytes does not fit (at most {RECORD_MAX_PAYLOAD})",
            path.display(),
            payload.len()
        );
    }
    Ok(())
}

/// The record files a process saves, kept open between saves; clones share them. Each file has
/// its own lock, so threads saving different files do not wait for each other's `fdatasync`.
#[derive(Debug, Clone, Default)]
pub(crate) struct RecordFiles(Arc<Mutex<HashMap<PathBuf, OpenRecord>>>);

/// A record file once a save opened (or created) it; `None` before.
type OpenRecord = Arc<Mutex<Option<RecordFile>>>;

impl RecordFiles {
    /// Saves `payload` as the value of the record file `path` (created with `mode` if missing;
    /// a plain file is replaced by a record file, through a rename), as durable as
    /// `durability` says (see [`RecordFile::save_with`]; a file created or upgraded is always
    /// synced).
    ///
    /// # Errors
    /// `payload` does not fit, or I/O errors (the message names the file).
    pub(crate) fn save(
        &self,
        path: &Path,
        payload: &[u8],
        mode: u32,
        durability: Durability,
    ) -> anyhow::Result<()> {
        let entry = lock(&self.0).entry(path.to_owned()).or_default().clone();
        let mut open = lock(&entry);
        if let Some(r) = open.as_mut() {
            return r.save_with(payload, mode, durability);
        }
        let r = match RecordFile::open(path)? {
            Some(mut r) => {
                r.save_with(payload, mode, durability)?;
                r
            }
            None => RecordFile::create(path, payload, mode, 0)?,
        };
        *open = Some(r);
        Ok(())
    }

    /// Makes every record saved so far through these files as durable as
    /// [`Durability::Written`]: for one that was saved [`Durability::Cached`] before something
    /// is done that a power cut must not keep without it.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub(crate) fn write_through_all(&self) -> anyhow::Result<()> {
        let open: Vec<OpenRecord> = lock(&self.0).values().cloned().collect();
        for r in open {
            if let Some(r) = lock(&r).as_ref() {
                write_through(&r.file)
                    .with_context(|| format!("cannot write {}", r.path.display()))?;
            }
        }
        Ok(())
    }
}

/// Locks `m`, also after a thread panicked holding it (for values that stay consistent: a
/// record file's state changes only after its write succeeded).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ino(p: &Path) -> u64 {
        fs::metadata(p).unwrap().ino()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The offset of the slot holding the newest record of `p`.
    fn newest_slot(p: &Path) -> u64 {
        let data = fs::read(p).unwrap();
        let (seq, _) = newest_record(&data).unwrap();
        slot_offset(seq)
    }

    fn read(p: &Path) -> Vec<u8> {
        read_record(p).unwrap().unwrap()
    }

    /// Hands out at most `piece` bytes per read, and records the largest buffer offered.
    struct Pieces<'a> {
        data: &'a [u8],
        piece: usize,
        largest: usize,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            let n = buf.len().min(self.piece).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_file_written_atomically_is_read_in_big_chunks_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("seg");
        let data: Vec<u8> = (0..COPY_CHUNK * 2 + 1234)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut src = Pieces {
            data: &data,
            piece: 100_000,
            largest: 0,
        };
        let n = write_file_atomic(&dest, &mut src, 0o644).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(fs::read(&dest).unwrap(), data);
        // Not 8 KiB at a time (two system calls per 8 KiB of an upload to a file replica).
        assert!(src.largest >= COPY_CHUNK, "largest read {}", src.largest);
        assert_eq!(names(dir.path()), vec!["seg".to_string()]);
    }

    #[test]
    fn a_record_file_is_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        let files = RecordFiles::default();
        assert!(read_record(&p).unwrap().is_none());
        files
            .save(&p, b"first\n", 0o640, Durability::Synced)
            .unwrap();
        let inode = ino(&p);
        assert_eq!(read(&p), b"first\n");
        for i in 0..20 {
            let v = format!("value {i}\n{}", "y".repeat(i * 100));
            files
                .save(&p, v.as_bytes(), 0o640, Durability::Synced)
                .unwrap();
            assert_eq!(read(&p), v.as_bytes());
        }
        // The same file all along, of a fixed size, and nothing beside it.
        assert_eq!(ino(&p), inode);
        assert_eq!(fs::metadata(&p).unwrap().len(), 2 * RECORD_SLOT as u64);
        assert_eq!(names(dir.path()), ["x.state"]);
        // Another process (a restarted daemon) carries on from the newest record.
        let other = RecordFiles::default();
        other
            .save(&p, b"after restart\n", 0o640, Durability::Synced)
            .unwrap();
        assert_eq!(ino(&p), inode);
        assert_eq!(read(&p), b"after restart\n");
        // The largest payload fits.
        let max = vec![b'm'; RECORD_MAX_PAYLOAD];
        other.save(&p, &max, 0o640, Durability::Synced).unwrap();
        assert_eq!(read(&p), max);
    }

    #[test]
    fn a_torn_or_corrupt_newest_slot_leaves_the_previous_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        let files = RecordFiles::default();
        let f = || OpenOptions::new().write(true).open(&p).unwrap();
        // A flipped payload byte.
        files.save(&p, b"a\n", 0o640, Durability::Synced).unwrap();
        files.save(&p, b"b\n", 0o640, Durability::Synced).unwrap();
        f().write_all_at(b"B", newest_slot(&p) + RECORD_HEADER as u64)
            .unwrap();
        assert_eq!(read(&p), b"a\n");
        // Torn: only the start of the slot reached the disk (zeros after it).
        files.save(&p, b"c\n", 0o640, Durability::Synced).unwrap();
        files.save(&p, b"d\n", 0o640, Durability::Synced).unwrap();
        assert_eq!(read(&p), b"d\n");
        f().write_all_at(&[0u8; RECORD_SLOT - 12], newest_slot(&p) + 12)
            .unwrap();
        assert_eq!(read(&p), b"c\n");
        // Torn the other way: the magic lost, the rest there.
        files.save(&p, b"e\n", 0o640, Durability::Synced).unwrap();
        files.save(&p, b"f\n", 0o640, Durability::Synced).unwrap();
        f().write_all_at(&[0u8; 8], newest_slot(&p)).unwrap();
        assert_eq!(read(&p), b"e\n");
        // A restarted process goes on from the valid record, writing over the bad slot only.
        let files = RecordFiles::default();
        files.save(&p, b"g\n", 0o640, Durability::Synced).unwrap();
        assert_eq!(read(&p), b"g\n");
        f().write_all_at(&[0xff; 4], newest_slot(&p) + 8).unwrap();
        assert_eq!(read(&p), b"e\n");
    }

    #[test]
    fn a_record_file_without_a_valid_slot_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        let files = RecordFiles::default();
        files.save(&p, b"one\n", 0o640, Durability::Synced).unwrap();
        files.save(&p, b"two\n", 0o640, Durability::Synced).unwrap();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"X", RECORD_HEADER as u64).unwrap();
        f.write_all_at(b"X", (RECORD_SLOT + RECORD_HEADER) as u64)
            .unwrap();
        let e = format!("{:#}", read_record(&p).unwrap_err());
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("corrupt"), "{e}");
        // A save replaces it (by a rename) with a valid record file.
        RecordFiles::default()
            .save(&p, b"three\n", 0o640, Durability::Synced)
            .unwrap();
        assert_eq!(read(&p), b"three\n");
    }

    #[test]
    fn a_plain_file_reads_whole_and_its_next_save_makes_it_a_record_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        fs::write(&p, "generation abc\nlast 42\n").unwrap();
        assert_eq!(read(&p), b"generation abc\nlast 42\n");
        let files = RecordFiles::default();
        files
            .save(&p, b"last 43\n", 0o640, Durability::Synced)
            .unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 2 * RECORD_SLOT as u64);
        assert_eq!(read(&p), b"last 43\n");
        assert_eq!(names(dir.path()), ["x.state"]);
        let inode = ino(&p);
        files
            .save(&p, b"last 44\n", 0o640, Durability::Synced)
            .unwrap();
        assert_eq!(ino(&p), inode);
        assert_eq!(read(&p), b"last 44\n");
    }

    #[test]
    fn a_payload_too_big_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        let files = RecordFiles::default();
        let big = vec![b'b'; RECORD_MAX_PAYLOAD + 1];
        let e = format!(
            "{:#}",
            files.save(&p, &big, 0o640, Durability::Synced).unwrap_err()
        );
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains("does not fit"), "{e}");
        assert!(!p.exists());
        files
            .save(&p, b"small\n", 0o640, Durability::Synced)
            .unwrap();
        let e = format!(
            "{:#}",
            files.save(&p, &big, 0o640, Durability::Synced).unwrap_err()
        );
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert_eq!(read(&p), b"small\n");
    }

    /// The value a writer saves as its `i`th: lengths vary, so that a torn read would mix
    /// values of different lengths.
    fn value(i: usize) -> Vec<u8> {
        let mut v = format!("value {i:08}\n").into_bytes();
        v.resize(
            14 + (i * 797) % (RECORD_MAX_PAYLOAD - 14),
            b'a' + (i % 26) as u8,
        );
        v
    }

    #[test]
    fn a_reader_racing_saves_sees_only_saved_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        let files = RecordFiles::default();
        files
            .save(&p, &value(0), 0o640, Durability::Synced)
            .unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (p, done) = (p.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut reads, mut last) = (0usize, 0usize);
                loop {
                    // Read once more after the last save.
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                    let got = read_record(&p)
                        .unwrap_or_else(|e| panic!("read {reads}: {e:#}"))
                        .unwrap_or_else(|| panic!("read {reads}: no file"));
                    let i: usize = std::str::from_utf8(&got[6..14])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("read {reads}: not a value: {got:?}"));
                    assert!(got == value(i), "read {reads}: value {i} torn");
                    assert!(i >= last, "read {reads}: value {i} after value {last}");
                    last = i;
                    reads += 1;
                    if finished && reads >= 5000 {
                        break;
                    }
                }
                (reads, last)
            })
        };
        let saves = 3000;
        for i in 1..=saves {
            files
                .save(&p, &value(i), 0o640, Durability::Synced)
                .unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let (reads, last) = reader.join().unwrap();
        assert!(reads >= 5000, "{reads} reads");
        assert_eq!(last, saves);
    }

    #[test]
    fn a_record_file_removed_or_replaced_under_an_open_handle_is_created_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.state");
        let files = RecordFiles::default();
        files.save(&p, b"one\n", 0o640, Durability::Synced).unwrap();
        files.save(&p, b"two\n", 0o640, Durability::Synced).unwrap();
        fs::remove_file(&p).unwrap();
        files
            .save(&p, b"three\n", 0o640, Durability::Synced)
            .unwrap();
        assert_eq!(read(&p), b"three\n");
        files
            .save(&p, b"four\n", 0o640, Durability::Synced)
            .unwrap();
        assert_eq!(read(&p), b"four\n");
        // Replaced by another file (a plain one, as an operator's restore might leave).
        let other = dir.path().join("other");
        fs::write(&other, "plain\n").unwrap();
        fs::rename(&other, &p).unwrap();
        files
            .save(&p, b"five\n", 0o640, Durability::Synced)
            .unwrap();
        assert_eq!(read(&p), b"five\n");
        assert_eq!(fs::metadata(&p).unwrap().len(), 2 * RECORD_SLOT as u64);
        assert_eq!(names(dir.path()), ["x.state"]);
    }
}
