//! The local spool: finished snapshot and segment files waiting to reach every replica.
//!
//! Layout: `<state>/spool/<generation>/<file name as on the replica>`. Invariants: a file
//! appears under its final name only when complete and durable (temp, fsync, rename, dir
//! fsync); files are ordered by [`Key`], which is the order replicas must receive them in
//! (within a generation: by last txid, a snapshot after the segment that ends at its txid).
//!
//! A big file (a snapshot, a resume's one commit, a huge transaction) can be *live*: while
//! capture still writes it, shippers may already stream its bytes to their replicas
//! ([`LiveFile`]), so that compressing, spooling and uploading overlap instead of running one
//! after the other. A live reader sees only bytes whose `write` has returned, and reaches its
//! end only once the file is published (durable under its final name in the spool, which for
//! a segment is after capture saved its state): a replica never holds a file that the spool
//! does not, so a crash cannot make walship write a different file under that position.
//!
//! A stream of small commits does not create a file per capture: the newest level-0 segment
//! file this process published is the spool's *tail*, and capture appends its next segment to
//! it while it is small and young ([`TAIL_MAX_BYTES`], [`TAIL_MAX_AGE`]): the new segment's
//! bytes (a whole segment file, see `layout::codec`: a segment file may be several one after
//! the other) are written after the tail's end, fsynced, and the tail is renamed to its new
//! range, which is its publication (the directory is not fsynced, see
//! `Spool::publish_append`). Until then the listing keeps the old name and size, so
//! shippers read only what is published; an append that fails is cut off
//! again. Where each appended part starts is kept in memory ([`Spool::piece`]), so that a
//! replica holding the start of a tail receives only the rest. A crash between an append and
//! its rename (or a power cut that lost the rename, which is not synced) leaves bytes past the
//! named range: [`Spool::open`] keeps the complete parts, renaming the file to their range (a
//! replica may have received them), and cuts off an incomplete one. The tail stays
//! in the spool once shipped (capture appends to it next); it goes once a newer file replaced
//! it as the tail.
//!
//! The spool keeps its own listing in memory: only this process writes in it (it holds the
//! state directory's lock), every file is published and removed through [`Spool`], so
//! [`Spool::list`], which capture and every shipper call on every round, reads no directory.
//! The listing is read from disk once, at [`Spool::open`].
//!
//! A chase's segments may be published without a sync ([`Spool::publish_volatile`], see
//! `capture::publish` for what makes that safe): the spool remembers them until they are
//! synced ([`Spool::sync_volatile`]) or removed, and none becomes the tail.
//!
//! A file's write-back to the disk starts every [`WRITEBACK_EVERY`] bytes while it is written,
//! without waiting for it: its fsync at publication then finds most of it written. Behind a
//! bulk load, the publication of what a chase left runs under SQLite's write lock, and the
//! sync of its megabytes was about a third of that hold.
//!
//! A removed file is renamed at once to a temporary name in the spool's own directory, and a
//! thread of the spool's unlinks it there ([`Spool::remove`]): on a file system that discards
//! freed blocks as it frees them (ext4 mounted `discard`), an unlink waits for the device, about
//! 1 ms per file measured here, and the main loop removed some twenty shipped files in a row
//! after each checkpoint of a bulk load while the writer went on. A crash between the rename
//! and the unlink leaves a temporary file, which [`Spool::open`] sweeps.

use crate::durable::{fsync_dir, lock, remove_temp_files, start_writeback, temp_name};
use crate::layout::names::{FileName, GenerationId};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};
use tracing::warn;

/// Starts the thread that unlinks removed spool files (see the module doc); it ends when the
/// spool is dropped.
fn start_reaper() -> Result<std::sync::mpsc::Sender<PathBuf>> {
    let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
    std::thread::Builder::new()
        .name("spool-gc".into())
        .spawn(move || {
            for p in rx {
                if let Err(e) = fs::remove_file(&p) {
                    if e.kind() != io::ErrorKind::NotFound {
                        warn!(
                            "cannot remove {}: {e} (removed at the next start)",
                            p.display()
                        );
                    }
                }
            }
        })
        .context("cannot start the spool's cleanup thread")?;
    Ok(tx)
}

/// Fsyncs directory `d` unless it is gone (a generation directory removed with its last
/// file).
fn fsync_dir_if_present(d: &Path) -> Result<()> {
    match fsync_dir(d) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot sync {}", d.display()))
        }
        _ => Ok(()),
    }
}

/// Largest spool tail capture appends to (see the module doc).
const TAIL_MAX_BYTES: u64 = 1 << 20;

/// Oldest spool tail capture appends to: about one new spool file a second under a stream.
const TAIL_MAX_AGE: Duration = Duration::from_secs(1);

/// The spool file capture appends its next segment to (see the module doc).
#[derive(Debug)]
struct Tail {
    generation: GenerationId,
    /// Its name now (its published range).
    name: FileName,
    /// Its published size.
    len: u64,
    /// When it was created.
    started: Instant,
    /// Open for writing; `None` while a [`SpoolWriter`] appends with it.
    file: Option<File>,
}

/// Where a part of a spool file starts (see [`Spool::piece`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    /// Its first txid.
    first: u64,
    /// That commit's capture time.
    first_ms: u64,
    /// Its offset in the file.
    start: u64,
}

/// The order of files within the spool and on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The generation.
    pub generation: GenerationId,
    /// The last txid the file contains.
    pub last: u64,
    /// 0 for a segment, 1 for a snapshot (a snapshot at T follows the segment ending at T).
    pub rank: u8,
}

impl Key {
    /// The key of `name` in `generation`.
    pub(crate) fn of(generation: GenerationId, name: &FileName) -> Key {
        Key {
            generation,
            last: name.last_txid(),
            rank: u8::from(matches!(name, FileName::Snapshot { .. })),
        }
    }
}

/// One spooled file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpoolFile {
    /// Its generation.
    pub generation: GenerationId,
    /// Its name (the same as on the replica).
    pub name: FileName,
    /// Size in bytes.
    pub size: u64,
}

impl SpoolFile {
    /// Its ordering key.
    pub(crate) fn key(&self) -> Key {
        Key::of(self.generation, &self.name)
    }
}

/// The spool directory.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    /// Every published file and its size, in [`Key`] order (see the module doc).
    files: Mutex<BTreeMap<(Key, FileName), u64>>,
    /// The newest generation with a directory in the spool: its directory stays when its
    /// files are all shipped (capture writes the next one there at once), older ones go.
    newest: Mutex<Option<GenerationId>>,
    /// The file capture is writing live, if any (see the module doc).
    live: Mutex<Weak<LiveFile>>,
    /// Called when a live file starts (wakes idle shippers).
    on_live: Mutex<Option<Hook>>,
    /// The file capture appends to next, if any (see the module doc).
    tail: Mutex<Option<Tail>>,
    /// For the files appended to in this process: where each part starts.
    parts: Mutex<HashMap<(GenerationId, FileName), Vec<Part>>>,
    /// Sends removed files (renamed, see the module doc) to the thread that unlinks them.
    reaper: std::sync::mpsc::Sender<PathBuf>,
    /// The files published without a sync (see [`Spool::publish_volatile`]), and since when.
    volatile: Mutex<BTreeMap<(GenerationId, FileName), Instant>>,
    /// When capture last took a step of a chase of big commits (see [`Spool::bulk_load`]).
    bulk_step: Mutex<Option<Instant>>,
}

/// A callback; `Debug` so that [`Spool`] can derive it.
struct Hook(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl Spool {
    /// Opens (creating) the spool in `dir` and removes leftover temporary files.
    ///
    /// # Errors
    /// I/O errors with the path.
    pub(crate) fn open(dir: &Path) -> Result<Spool> {
        let dir = dir.to_path_buf();
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create spool directory {}", dir.display()))?;
        remove_temp_files(&dir)
            .with_context(|| format!("cannot remove temporary files in {}", dir.display()))?;
        let spool = Spool {
            reaper: start_reaper()?,
            dir,
            files: Mutex::new(BTreeMap::new()),
            newest: Mutex::new(None),
            live: Mutex::new(Weak::new()),
            on_live: Mutex::new(None),
            tail: Mutex::new(None),
            parts: Mutex::new(HashMap::new()),
            volatile: Mutex::new(BTreeMap::new()),
            bulk_step: Mutex::new(None),
        };
        for g in spool.generations()? {
            let gdir = spool.dir.join(g.to_string());
            remove_temp_files(&gdir)
                .with_context(|| format!("cannot remove temporary files in {}", gdir.display()))?;
        }
        let mut found = spool.scan()?;
        spool.settle_unpublished_appends(&mut found)?;
        *lock(&spool.files) = found
            .into_iter()
            .map(|f| ((f.key(), f.name), f.size))
            .collect();
        if let Some(&g) = spool.generations()?.last() {
            *lock(&spool.newest) = Some(g);
            spool.remove_empty_before(&g)?;
        }
        Ok(spool)
    }

    fn generations(&self) -> Result<Vec<GenerationId>> {
        let mut out = Vec::new();
        for ent in fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?
        {
            let ent = ent?;
            if let Some(g) = ent.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(g);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every spooled file, in [`Key`] order (from memory, see the module doc).
    ///
    /// # Errors
    /// None: it returns a `Result` for callers written when it listed directories.
    pub(crate) fn list(&self) -> Result<Vec<SpoolFile>> {
        Ok(lock(&self.files)
            .iter()
            .map(|(&(key, name), &size)| SpoolFile {
                generation: key.generation,
                name,
                size,
            })
            .collect())
    }

    /// The bytes of every spooled file (from memory).
    pub(crate) fn bytes(&self) -> u64 {
        lock(&self.files).values().sum()
    }

    /// Capture took a step of a chase of big commits: an application's bulk load outruns
    /// it (see [`Spool::bulk_load`]).
    pub(crate) fn note_bulk_step(&self) {
        *lock(&self.bulk_step) = Some(Instant::now());
    }

    /// Whether capture took a step of a chase of big commits within `within`: a bulk load
    /// goes on (shippers defer their uploads meanwhile, see `ship::BULK_DEFER_MAX`).
    pub(crate) fn bulk_load(&self, within: Duration) -> bool {
        lock(&self.bulk_step).is_some_and(|t| t.elapsed() < within)
    }

    /// Every spooled file on disk, in [`Key`] order.
    fn scan(&self) -> Result<Vec<SpoolFile>> {
        let mut out = Vec::new();
        for g in self.generations()? {
            let gdir = self.dir.join(g.to_string());
            let entries =
                fs::read_dir(&gdir).with_context(|| format!("cannot list {}", gdir.display()))?;
            for ent in entries {
                let ent = ent.with_context(|| format!("cannot list {}", gdir.display()))?;
                let Some(name) = ent
                    .file_name()
                    .to_str()
                    .and_then(|s| FileName::parse(s).ok())
                else {
                    continue;
                };
                let size = ent.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(SpoolFile {
                    generation: g,
                    name,
                    size,
                });
            }
        }
        out.sort_by_key(SpoolFile::key);
        Ok(out)
    }

    /// Opens the spooled file `f` for reading its `f.size` published bytes, wherever it is
    /// now: a tail that grew since `f` was listed was renamed to its new range, and its first
    /// `f.size` bytes are unchanged (see the module doc).
    ///
    /// # Errors
    /// `NotFound` when it was removed (shipped, or dropped by the spool limit).
    pub(crate) fn open_file(&self, f: &SpoolFile) -> io::Result<File> {
        let mut name = f.name;
        // A rename may land between the lookup and the open: look again.
        for _ in 0..5 {
            match File::open(self.path(&f.generation, &name)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => return other,
            }
            // An append being published holds the tail until the listing has its new name.
            let _published = lock(&self.tail);
            let grown = lock(&self.files).keys().find_map(|&(k, n)| {
                let same = k.generation == f.generation
                    && matches!(n, FileName::Segment { level: 0, .. })
                    && n.first_txid() == f.name.first_txid()
                    && n.last_txid() >= f.name.last_txid();
                same.then_some(n)
            });
            match grown {
                Some(n) if n != name => name = n,
                _ => break,
            }
        }
        File::open(self.path(&f.generation, &name))
    }

    /// Path of a spooled file.
    pub(crate) fn path(&self, generation: &GenerationId, name: &FileName) -> PathBuf {
        self.dir.join(generation.to_string()).join(name.to_string())
    }

    /// Settles what a crash left past the named range of each generation's newest segment (an
    /// append written, then perhaps published by a rename that a power cut lost, see the
    /// module doc): the complete parts stay and the file is renamed to their range, since a
    /// replica may hold them already; an incomplete part is cut off. `found` gets the new
    /// names and sizes.
    fn settle_unpublished_appends(&self, found: &mut [SpoolFile]) -> Result<()> {
        let mut newest: BTreeMap<GenerationId, usize> = BTreeMap::new();
        for (i, f) in found.iter().enumerate() {
            if matches!(f.name, FileName::Segment { level: 0, .. }) {
                newest.insert(f.generation, i);
            }
        }
        for i in newest.into_values() {
            let f = &mut found[i];
            let path = self.path(&f.generation, &f.name);
            let read = |len: u64| -> Result<Vec<u8>> {
                let mut data = Vec::new();
                File::open(&path)
                    .and_then(|file| file.take(len).read_to_end(&mut data))
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Ok(data)
            };
            // An append starts only at a published end below TAIL_MAX_BYTES (see
            // `Spool::append`), but may be of any size: the named range is looked for in the
            // first TAIL_MAX_BYTES, and the whole file is read only when bytes follow it.
            let head = read(TAIL_MAX_BYTES)?;
            let Some(named) = named_end(&head, f.name.last_txid()) else {
                if f.size <= TAIL_MAX_BYTES {
                    warn!("spool file {} does not end its named range at a part boundary; shipped as it is", path.display());
                }
                continue;
            };
            if named == f.size {
                continue;
            }
            let data = read(f.size)?;
            let (end, last) = complete_parts(&data, named);
            let name = match (f.name, last) {
                (
                    FileName::Segment {
                        level: 0,
                        first,
                        first_ms,
                        ..
                    },
                    Some((last, last_ms)),
                ) => FileName::Segment {
                    level: 0,
                    first,
                    last,
                    first_ms,
                    last_ms,
                },
                _ => f.name,
            };
            let dest = self.path(&f.generation, &name);
            if end < data.len() as u64 {
                warn!("cutting {} bytes of an incomplete segment that an interrupted capture left after the last commit of spool file {}", data.len() as u64 - end, path.display());
            }
            if name != f.name {
                warn!("keeping txids {}-{} that a capture appended to spool file {} before a crash (a replica may hold them already): the file is now {}", f.name.last_txid() + 1, name.last_txid(), path.display(), name);
            }
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|file| {
                    file.set_len(end)?;
                    file.sync_all()
                })
                .and_then(|()| fs::rename(&path, &dest))
                .and_then(|()| fsync_dir(dest.parent().unwrap_or(&self.dir)))
                .with_context(|| format!("cannot settle spool file {}", path.display()))?;
            f.name = name;
            f.size = end;
        }
        Ok(())
    }

    /// Starts appending the next segment of `generation`, which follows txid `after`, to the
    /// spool's tail, if that is where it goes (see the module doc); `None`: a new file.
    pub(crate) fn append(&self, generation: &GenerationId, after: u64) -> Option<SpoolWriter> {
        let mut tail = lock(&self.tail);
        let t = tail.as_mut()?;
        if t.generation != *generation
            || t.name.last_txid() != after
            || t.len >= TAIL_MAX_BYTES
            || t.started.elapsed() >= TAIL_MAX_AGE
        {
            return None;
        }
        let file = t.file.take()?;
        Some(SpoolWriter {
            tmp: self.path(generation, &t.name),
            file,
            append: Some(Appending { start: t.len }),
            live: None,
            published: false,
            end: t.len,
            written_back: t.len,
            writeback: true,
        })
    }

    /// Whether `f` is the spool's tail, which stays once shipped (see the module doc).
    pub(crate) fn is_tail(&self, f: &SpoolFile) -> bool {
        lock(&self.tail)
            .as_ref()
            .is_some_and(|t| t.generation == f.generation && t.name == f.name)
    }

    /// Where the part of spooled file `f` that starts with txid `first` begins, and that
    /// commit's time, if `f` was appended to in this process and a part starts there (see
    /// the module doc): a replica holding `first - 1` takes the file from there.
    pub(crate) fn piece(&self, f: &SpoolFile, first: u64) -> Option<(u64, u64)> {
        lock(&self.parts)
            .get(&(f.generation, f.name))?
            .iter()
            .find(|p| p.first == first)
            .map(|p| (p.start, p.first_ms))
    }

    /// Capture time of the first commit that a replica at `pos` lacks among `files` (the
    /// spool's listing), `None` if it lacks none of them: the first file after `pos`, from
    /// where `pos` ends inside it if it holds `pos` (a tail, see [`Spool::piece`]).
    pub(crate) fn first_missing_ms(&self, files: &[SpoolFile], pos: Option<Key>) -> Option<u64> {
        let f = files.iter().find(|f| pos.is_none_or(|p| f.key() > p))?;
        let inside = pos.filter(|p| {
            p.generation == f.generation && p.rank == 0 && f.name.first_txid() <= p.last
        });
        Some(
            inside
                .and_then(|p| self.piece(f, p.last + 1))
                .map_or_else(|| f.name.first_ms(), |(_, ms)| ms),
        )
    }

    /// Creates a temporary file for a new spool file of `generation`.
    ///
    /// # Errors
    /// I/O errors with the path.
    pub(crate) fn create_temp(&self, generation: &GenerationId) -> Result<(PathBuf, File)> {
        let gdir = self.dir.join(generation.to_string());
        // The directory may be removed concurrently when its last file is shipped: retry.
        // Created when missing only: looking first would cost a stat on every segment.
        let mut attempts = 0;
        loop {
            let tmp = gdir.join(temp_name());
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => return Ok((tmp, f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 5 => {
                    attempts += 1;
                    fs::create_dir_all(&gdir)
                        .with_context(|| format!("cannot create {}", gdir.display()))?;
                    fsync_dir(&self.dir)
                        .with_context(|| format!("cannot sync {}", self.dir.display()))?;
                }
                // Named by its directory: the temporary name differs on every attempt, and
                // a lasting failure must read the same each time to be logged once.
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot create a spool file in {}", gdir.display())
                    })
                }
            }
        }
    }

    /// Starts a new spool file of `generation`. With `live`, the name it will be published
    /// under, shippers may stream it while it is written (see the module doc).
    ///
    /// # Errors
    /// I/O errors with the path.
    pub(crate) fn create(
        &self,
        generation: &GenerationId,
        live: Option<FileName>,
    ) -> Result<SpoolWriter> {
        let (tmp, file) = self.create_temp(generation)?;
        let live = match live {
            Some(name) => {
                let l = Arc::new(LiveFile {
                    generation: *generation,
                    name,
                    path: tmp.clone(),
                    state: Mutex::new(LiveState::default()),
                    cv: Condvar::new(),
                });
                *lock(&self.live) = Arc::downgrade(&l);
                if let Some(h) = lock(&self.on_live).as_ref() {
                    (h.0)();
                }
                Some(l)
            }
            None => None,
        };
        Ok(SpoolWriter {
            tmp,
            file,
            append: None,
            live,
            published: false,
            end: 0,
            written_back: 0,
            writeback: true,
        })
    }

    /// Sets what to call whenever a live file starts.
    pub(crate) fn on_live(&self, f: impl Fn() + Send + Sync + 'static) {
        *lock(&self.on_live) = Some(Hook(Box::new(f)));
    }

    /// The file capture is writing live, unless there is none or it has ended.
    pub(crate) fn live(&self) -> Option<Arc<LiveFile>> {
        lock(&self.live)
            .upgrade()
            .filter(|l| lock(&l.state).end.is_none())
    }

    /// Makes a finished spool file durable under its final name `name` (which must be the one
    /// it was created live for); a live file's readers reach their end only now. A segment
    /// appended to the tail ([`Spool::append`]) is named `name` (its own range) by capture:
    /// the tail is published under the range it has now. Returns the size published.
    ///
    /// # Errors
    /// I/O errors with the path; the temporary file is removed (and live readers fail), an
    /// append is cut off again.
    pub(crate) fn publish(
        &self,
        w: SpoolWriter,
        generation: &GenerationId,
        name: &FileName,
    ) -> Result<u64> {
        self.publish_as(w, generation, name, true)
    }

    /// [`Spool::publish`] without a sync of the file or of its directory: a segment of a
    /// chase, which every replica may hold before it would have reached this disk (see
    /// `capture::publish` for when that is safe). It is made durable later
    /// ([`Spool::sync_volatile`]) unless it is removed first; until then it is never the tail.
    /// An append or a live file is published durably.
    ///
    /// # Errors
    /// As [`Spool::publish`].
    pub(crate) fn publish_volatile(
        &self,
        w: SpoolWriter,
        generation: &GenerationId,
        name: &FileName,
    ) -> Result<u64> {
        let durable = w.append.is_some() || w.live.is_some();
        self.publish_as(w, generation, name, durable)
    }

    fn publish_as(
        &self,
        mut w: SpoolWriter,
        generation: &GenerationId,
        name: &FileName,
        durable: bool,
    ) -> Result<u64> {
        if w.append.is_some() {
            return self.publish_append(w, generation, name);
        }
        let dest = self.path(generation, name);
        if let Some(l) = &w.live {
            anyhow::ensure!(
                l.generation == *generation && l.name == *name,
                "internal: live spool file {} published as {}",
                l.name,
                name
            );
        }
        let r = (|| -> std::io::Result<u64> {
            if durable {
                w.file.sync_all()?;
            }
            let len = w.file.metadata()?.len();
            fs::rename(&w.tmp, &dest)?;
            if durable {
                fsync_dir(dest.parent().unwrap_or(&self.dir))?;
            }
            Ok(len)
        })();
        let len = r.with_context(|| format!("cannot write spool file {}", dest.display()))?;
        if !durable {
            lock(&self.volatile).insert((*generation, *name), Instant::now());
        }
        lock(&self.files).insert((Key::of(*generation, name), *name), len);
        let newer = {
            let mut newest = lock(&self.newest);
            let newer = newest.is_none_or(|n| n < *generation);
            if newer {
                *newest = Some(*generation);
            }
            newer
        };
        if newer {
            self.remove_empty_before(generation)?;
        }
        // Published: nothing to remove on drop; live readers may finish.
        w.published = true;
        let tail = match (w.live.take(), *name) {
            (Some(l), _) => {
                l.end(Some(len));
                None
            }
            (
                None,
                FileName::Segment {
                    level: 0,
                    first,
                    first_ms,
                    ..
                },
            ) if durable => {
                let file = w.file.try_clone().ok();
                lock(&self.parts).insert(
                    (*generation, *name),
                    vec![Part {
                        first,
                        first_ms,
                        start: 0,
                    }],
                );
                file.map(|file| Tail {
                    generation: *generation,
                    name: *name,
                    len,
                    started: Instant::now(),
                    file: Some(file),
                })
            }
            (None, _) => None,
        };
        *lock(&self.tail) = tail;
        Ok(len)
    }

    /// [`Spool::publish`] of a segment appended to the tail: fsync, then the rename to the
    /// tail's new range, then the directory's fsync.
    fn publish_append(
        &self,
        mut w: SpoolWriter,
        generation: &GenerationId,
        part: &FileName,
    ) -> Result<u64> {
        let Some(a) = w.append else {
            bail!("internal: not an append");
        };
        // Held until the listing has the new name: a shipper that finds the old name gone
        // waits for it (see `open_file`).
        let mut tail = lock(&self.tail);
        let (old, started) = match tail.as_ref() {
            Some(t) if t.generation == *generation && t.len == a.start => (t.name, t.started),
            _ => bail!("internal: the spool tail changed during an append"),
        };
        let FileName::Segment {
            level: 0,
            first,
            first_ms,
            ..
        } = old
        else {
            bail!("internal: the spool tail is not a level-0 segment");
        };
        let name = FileName::Segment {
            level: 0,
            first,
            last: part.last_txid(),
            first_ms,
            last_ms: part.last_ms(),
        };
        let src = self.path(generation, &old);
        let dest = self.path(generation, &name);
        let failed = |e: io::Error| {
            anyhow::Error::new(e).context(format!("cannot write spool file {}", dest.display()))
        };
        w.file.sync_data().map_err(failed)?;
        // The directory is not fsynced: a rename lost to a power cut leaves the appended part,
        // synced, past the old name, and the next start renames the file again
        // (`settle_unpublished_appends`). It must not capture the part again instead: a
        // replica may hold it, and the WAL may have lost its commits since (an application at
        // synchronous=NORMAL), so the same txids would name other commits. The next new spool
        // file's directory fsync makes the rename durable.
        fs::rename(&src, &dest).map_err(failed)?;
        let len = w.end;
        {
            let mut files = lock(&self.files);
            files.remove(&(Key::of(*generation, &old), old));
            files.insert((Key::of(*generation, &name), name), len);
        }
        {
            let mut parts = lock(&self.parts);
            let mut p = parts.remove(&(*generation, old)).unwrap_or_default();
            p.push(Part {
                first: part.first_txid(),
                first_ms: part.first_ms(),
                start: a.start,
            });
            parts.insert((*generation, name), p);
        }
        w.published = true;
        *tail = w.file.try_clone().ok().map(|file| Tail {
            generation: *generation,
            name,
            len,
            started,
            file: Some(file),
        });
        Ok(len)
    }

    /// Makes durable the files published without a sync ([`Spool::publish_volatile`]) for at
    /// least `age` (every one with a zero `age`): an fsync of each, then of their
    /// directories. Returns how many are left.
    ///
    /// # Errors
    /// I/O errors with the path (the file stays volatile, to be tried again).
    pub(crate) fn sync_volatile(&self, age: Duration) -> Result<usize> {
        let due: Vec<(GenerationId, FileName)> = lock(&self.volatile)
            .iter()
            .filter(|(_, t)| t.elapsed() >= age)
            .map(|(k, _)| *k)
            .collect();
        let mut dirs = std::collections::BTreeSet::new();
        for (g, name) in &due {
            let path = self.path(g, name);
            match File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Removed meanwhile (shipped): nothing left to make durable.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot sync {}", path.display())),
            }
            dirs.insert(*g);
        }
        for g in dirs {
            fsync_dir_if_present(&self.dir.join(g.to_string()))?;
        }
        let mut v = lock(&self.volatile);
        for k in &due {
            v.remove(k);
        }
        Ok(v.len())
    }

    /// Counts the files of `generation` that hold txid `from` or later as published without a
    /// sync: at a start after a crash of walship alone (the machine did not restart), whose
    /// page cache still holds them, not necessarily its disk.
    pub(crate) fn adopt_volatile(&self, generation: &GenerationId, from: u64) {
        let now = Instant::now();
        let adopted: Vec<FileName> = lock(&self.files)
            .keys()
            .filter(|(k, _)| k.generation == *generation && k.last >= from)
            .map(|&(_, n)| n)
            .collect();
        let mut v = lock(&self.volatile);
        for n in adopted {
            v.insert((*generation, n), now);
        }
    }

    /// Removes the files of `generation` that hold txid `from` or later: at a start after
    /// the machine restarted while they were published without a sync, when any of them may
    /// have lost bytes, or its name. Returns how many were removed.
    ///
    /// # Errors
    /// I/O errors with the path.
    pub(crate) fn drop_from(&self, generation: &GenerationId, from: u64) -> Result<usize> {
        let doomed: Vec<SpoolFile> = self
            .list()?
            .into_iter()
            .filter(|f| f.generation == *generation && f.key().last >= from)
            .collect();
        for f in &doomed {
            self.remove(f)?;
        }
        if !doomed.is_empty() {
            // Removed for good before the caller goes on (see `Spool::remove`: renamed into
            // the spool's own directory first).
            fsync_dir_if_present(&self.dir.join(generation.to_string()))?;
            fsync_dir_if_present(&self.dir)?;
        }
        Ok(doomed.len())
    }

    /// Deletes a spooled file (and its generation directory once no file of it is left, unless
    /// it is the newest generation's).
    ///
    /// # Errors
    /// I/O errors with the path.
    pub(crate) fn remove(&self, f: &SpoolFile) -> Result<()> {
        {
            let mut tail = lock(&self.tail);
            if tail
                .as_ref()
                .is_some_and(|t| t.generation == f.generation && t.name == f.name)
            {
                *tail = None;
            }
        }
        lock(&self.parts).remove(&(f.generation, f.name));
        lock(&self.volatile).remove(&(f.generation, f.name));
        let p = self.path(&f.generation, &f.name);
        let gone = self.dir.join(temp_name());
        // Unlinked here if it cannot be handed to the thread (a generation directory on
        // another file system, the thread gone).
        let here = match fs::rename(&p, &gone) {
            Ok(()) => match self.reaper.send(gone) {
                Ok(()) => None,
                Err(std::sync::mpsc::SendError(gone)) => Some(gone),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => Some(p),
        };
        if let Some(p) = here {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
            }
        }
        let last_of_generation = {
            let mut files = lock(&self.files);
            files.remove(&(f.key(), f.name));
            !files.keys().any(|(k, _)| k.generation == f.generation)
        };
        let older = lock(&self.newest).is_some_and(|n| f.generation < n);
        if !(last_of_generation && older) {
            return Ok(());
        }
        let gdir = self.dir.join(f.generation.to_string());
        if fs::remove_dir(&gdir).is_ok() {
            fsync_dir(&self.dir).with_context(|| format!("cannot sync {}", self.dir.display()))?;
        }
        Ok(())
    }

    /// Removes the directories of generations older than `g` that hold no spooled file.
    fn remove_empty_before(&self, g: &GenerationId) -> Result<()> {
        let empty: Vec<GenerationId> = {
            let files = lock(&self.files);
            self.generations()?
                .into_iter()
                .filter(|o| o < g && !files.keys().any(|(k, _)| k.generation == *o))
                .collect()
        };
        let mut removed = false;
        for o in empty {
            // A shipper's temporary file may still be there: the directory goes at the next
            // start, or when a newer generation is published.
            removed |= fs::remove_dir(self.dir.join(o.to_string())).is_ok();
        }
        if removed {
            fsync_dir(&self.dir).with_context(|| format!("cannot sync {}", self.dir.display()))?;
        }
        Ok(())
    }
}

/// The part of a spool file's `data` that starts at byte `at`, if it is complete (it decodes
/// whole, its checksums right): where it ends, and the txid and time of its last commit.
fn part_at(data: &[u8], at: usize) -> Option<(usize, Option<(u64, u64)>)> {
    use crate::layout::codec::{Decoder, Kind, Record, HEADER_SIZE};
    let frame = data.get(at + HEADER_SIZE..)?;
    let size = zstd::zstd_safe::find_frame_compressed_size(frame).ok()?;
    let end = at + HEADER_SIZE + size;
    let mut dec = Decoder::new(data.get(at..end)?, Kind::Segment).ok()?;
    let mut last = None;
    while let Some(r) = dec.next().ok()? {
        if let Record::Commit(c) = r {
            last = Some((c.txid, c.time_ms));
        }
    }
    Some((end, last))
}

/// The end of the complete parts of a spool file's `data` from byte `from` on, and the txid
/// and time of the last commit they hold.
fn complete_parts(data: &[u8], from: u64) -> (u64, Option<(u64, u64)>) {
    let mut at = usize::try_from(from).unwrap_or(usize::MAX);
    let mut last = None;
    while let Some((end, Some(l))) = part_at(data, at) {
        at = end;
        last = Some(l);
    }
    (at.min(data.len()) as u64, last)
}

/// The offset in `data` (a segment file, possibly of several parts) where the part holding
/// commit `last` ends, or `None` if no part ends with it (or a part cannot be read).
fn named_end(data: &[u8], last: u64) -> Option<u64> {
    let mut at = 0usize;
    while at < data.len() {
        let (end, part_last) = part_at(data, at)?;
        if part_last.map(|(txid, _)| txid) == Some(last) {
            return Some(end as u64);
        }
        at = end;
    }
    None
}

/// A spool file being written: counts what reached the file for live readers, and removes
/// the temporary file (failing live readers) if dropped before [`Spool::publish`]. Appending
/// to the tail ([`Spool::append`]), it writes after the tail's published end, and cuts what it
/// wrote off again if dropped before [`Spool::publish`].
#[derive(Debug)]
pub(crate) struct SpoolWriter {
    /// The temporary file, or the tail appended to.
    tmp: PathBuf,
    file: File,
    append: Option<Appending>,
    live: Option<Arc<LiveFile>>,
    published: bool,
    /// The end of what this writer wrote (where an append writes next), and of the last
    /// write-back it started (see [`WRITEBACK_EVERY`]).
    end: u64,
    written_back: u64,
    /// Whether write-back starts while it is written (see [`SpoolWriter::skip_writeback`]).
    writeback: bool,
}

impl SpoolWriter {
    /// Starts no write-back while the file is written: for a file likely published without a
    /// sync ([`Spool::publish_volatile`]), whose bytes need not reach the disk at all if every
    /// replica holds them before it is removed.
    pub(crate) fn skip_writeback(&mut self) {
        self.writeback = false;
    }

    /// Starts the write-back of what was written since the last one, without waiting for it.
    /// A failure is left for the fsync at publication to report.
    fn start_writeback(&mut self) {
        let _ = start_writeback(&self.file, self.written_back, self.end - self.written_back);
        self.written_back = self.end;
    }

    /// Starts the write-back of the rest of a big file (one that started one before), which
    /// is about to wait for its publication.
    pub(crate) fn finish_writeback(&mut self) {
        let first = self.append.map_or(0, |a| a.start);
        if self.writeback && self.written_back > first && self.end > self.written_back {
            self.start_writeback();
        }
    }
}

/// A spool file's write-back to the disk starts each time this much more of it was written
/// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`, see the module doc: it allocates blocks
/// and submits the writes, ~0.3 ms a call measured, and does not wait for the disk). A stream
/// of small commits never writes this much in one file: its per-commit path makes no extra
/// system call. Durability never relies on it.
const WRITEBACK_EVERY: u64 = 1 << 20;

/// Where an append to the tail started (it stands at the writer's `end`).
#[derive(Debug, Clone, Copy)]
struct Appending {
    start: u64,
}

impl Write for SpoolWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = match self.append {
            Some(_) => self.file.write_at(buf, self.end),
            None => self.file.write(buf),
        };
        let n = r.map_err(|e| {
            let dir = self.tmp.parent().unwrap_or(&self.tmp);
            io::Error::new(
                e.kind(),
                format!("cannot write a spool file in {}: {e}", dir.display()),
            )
        })?;
        if let Some(l) = &self.live {
            let mut st = lock(&l.state);
            st.written += n as u64;
            l.cv.notify_all();
        }
        self.end += n as u64;
        if self.writeback && self.end - self.written_back >= WRITEBACK_EVERY {
            self.start_writeback();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if !self.published {
            match self.append {
                // The tail is left to a new file: the listing still has its published size,
                // and a crash's leftovers are cut at the next start.
                Some(a) => {
                    let _ = self.file.set_len(a.start);
                }
                None => {
                    let _ = fs::remove_file(&self.tmp);
                }
            }
        }
        if let Some(l) = self.live.take() {
            l.end(None);
        }
    }
}

/// A spool file that capture is still writing (see the module doc).
#[derive(Debug)]
pub(crate) struct LiveFile {
    /// Its generation.
    pub generation: GenerationId,
    /// The name it will be published under.
    pub name: FileName,
    path: PathBuf,
    state: Mutex<LiveState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct LiveState {
    /// Bytes whose `write` returned.
    written: u64,
    /// `None` while written; then `Some(Some(size))` once published, `Some(None)` if abandoned.
    end: Option<Option<u64>>,
}

impl LiveFile {
    /// Its size once published.
    pub(crate) fn published(&self) -> Option<u64> {
        lock(&self.state).end.flatten()
    }

    /// True when capture gave the file up (an error, or nothing to write after all).
    pub(crate) fn abandoned(&self) -> bool {
        matches!(lock(&self.state).end, Some(None))
    }

    fn end(&self, size: Option<u64>) {
        lock(&self.state).end = Some(size);
        self.cv.notify_all();
    }

    /// Opens a reader that follows the file as it is written.
    ///
    /// # Errors
    /// The file is gone already (published under its final name, or abandoned).
    pub(crate) fn reader(self: &Arc<Self>) -> io::Result<LiveReader> {
        Ok(LiveReader {
            file: File::open(&self.path)?,
            live: Arc::clone(self),
            pos: 0,
        })
    }
}

/// Reads a [`LiveFile`]: blocks until more bytes are written; ends when it is published; fails
/// if capture abandons it.
#[derive(Debug)]
pub(crate) struct LiveReader {
    live: Arc<LiveFile>,
    file: File,
    pos: u64,
}

impl Read for LiveReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let avail = {
            let mut st = lock(&self.live.state);
            loop {
                if st.written > self.pos {
                    break st.written - self.pos;
                }
                match st.end {
                    Some(Some(_)) => return Ok(0),
                    Some(None) => {
                        return Err(io::Error::other(format!(
                            "capture abandoned {} before publishing it",
                            self.live.name
                        )))
                    }
                    None => {}
                }
                st = match self.live.cv.wait_timeout(st, Duration::from_secs(1)) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
        };
        let want = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("live spool file {} is shorter than written", self.live.name),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn setup() -> (tempfile::TempDir, Arc<Spool>, GenerationId, FileName) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(&dir.path().join("spool")).unwrap());
        let g = GenerationId { ms: 1, rand: 2 };
        let name = FileName::Snapshot {
            txid: 1,
            time_ms: 5,
        };
        (dir, spool, g, name)
    }

    #[test]
    fn live_reader_follows_the_writer_and_ends_only_at_publish() {
        let (_dir, spool, g, name) = setup();
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w2 = woken.clone();
        spool.on_live(move || {
            w2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let mut w = spool.create(&g, Some(name)).unwrap();
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        let live = spool.live().expect("a live file");
        assert_eq!(Key::of(live.generation, &live.name), Key::of(g, &name));
        let mut r = live.reader().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = data.clone();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            (got, Instant::now(), live.published())
        });
        for chunk in data.chunks(100_000) {
            w.write_all(chunk).unwrap();
        }
        // Everything is written, but not published: the reader must still wait.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !reader.is_finished(),
            "the reader ended before the file was published"
        );
        let published_at = Instant::now();
        let size = spool.publish(w, &g, &name).unwrap();
        let (got, ended_at, seen) = reader.join().unwrap();
        assert!(ended_at >= published_at);
        assert_eq!(seen, Some(size));
        assert_eq!(got, expect);
        assert!(spool.live().is_none(), "a published file is no longer live");
        let listed = spool.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].size, expect.len() as u64);
    }

    #[test]
    fn an_abandoned_live_file_fails_its_readers_and_leaves_nothing() {
        let (dir, spool, g, name) = setup();
        let mut w = spool.create(&g, Some(name)).unwrap();
        w.write_all(b"half a snapshot").unwrap();
        let live = spool.live().unwrap();
        let mut r = live.reader().unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(r.read(&mut buf).unwrap(), 4);
        drop(w);
        assert!(live.abandoned());
        let mut rest = Vec::new();
        let e = r.read_to_end(&mut rest).unwrap_err();
        assert!(e.to_string().contains("abandoned"), "{e}");
        assert!(spool.live().is_none());
        assert!(spool.list().unwrap().is_empty());
        let gdir = dir.path().join("spool").join(g.to_string());
        assert_eq!(
            fs::read_dir(gdir).unwrap().count(),
            0,
            "temporary file left"
        );
    }

    /// Publishes an empty segment ending at `last` in `g`.
    fn segment(spool: &Spool, g: GenerationId, last: u64) -> SpoolFile {
        let name = FileName::Segment {
            level: 0,
            first: last,
            last,
            first_ms: 5,
            last_ms: 5,
        };
        let w = spool.create(&g, None).unwrap();
        let size = spool.publish(w, &g, &name).unwrap();
        SpoolFile {
            generation: g,
            name,
            size,
        }
    }

    #[test]
    fn the_newest_generation_keeps_its_directory_older_ones_go() {
        let (dir, spool, g, _) = setup();
        let gdir = |g: GenerationId| dir.path().join("spool").join(g.to_string());
        let a = segment(&spool, g, 1);
        spool.remove(&a).unwrap();
        assert!(spool.list().unwrap().is_empty());
        assert!(
            gdir(g).is_dir(),
            "the current generation's directory was removed with its last file"
        );
        let b = segment(&spool, g, 2);
        let newer = GenerationId { ms: 2, rand: 1 };
        let c = segment(&spool, newer, 1);
        assert_eq!(spool.list().unwrap(), vec![b.clone(), c.clone()]);
        spool.remove(&b).unwrap();
        assert!(
            !gdir(g).exists(),
            "an older generation's empty directory stays"
        );
        // An empty older directory (a generation that never published) goes when a newer one
        // publishes, and on open.
        let empty = GenerationId { ms: 3, rand: 0 };
        drop(spool.create(&empty, None).unwrap());
        assert!(gdir(empty).is_dir());
        let newest = GenerationId { ms: 4, rand: 0 };
        segment(&spool, newest, 1);
        assert!(!gdir(empty).exists());
        drop(
            spool
                .create(&GenerationId { ms: 3, rand: 5 }, None)
                .unwrap(),
        );
        let reopened = Spool::open(&dir.path().join("spool")).unwrap();
        assert!(!gdir(GenerationId { ms: 3, rand: 5 }).exists());
        assert_eq!(reopened.list().unwrap().len(), 2, "{:?}", reopened.list());
    }

    /// A removed file leaves its name at once and the disk soon after (unlinked by the
    /// spool's thread); a removal a crash left half-done is swept at the next open.
    #[test]
    fn removed_files_are_unlinked_and_leftovers_swept() {
        let (dir, spool, g, _) = setup();
        let root = dir.path().join("spool");
        let temps = || -> Vec<String> {
            fs::read_dir(&root)
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(crate::durable::TEMP_PREFIX))
                .collect()
        };
        let a = segment(&spool, g, 1);
        let path = spool.path(&g, &a.name);
        spool.remove(&a).unwrap();
        assert!(!path.exists(), "{} is still there", path.display());
        let t0 = Instant::now();
        while !temps().is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "removed files never unlinked: {:?}",
                temps()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let leftover = root.join(format!("{}1-0000000000000000", crate::durable::TEMP_PREFIX));
        fs::write(&leftover, b"a removed segment").unwrap();
        drop(spool);
        let _reopened = Spool::open(&root).unwrap();
        assert!(!leftover.exists(), "a half-done removal was not swept");
    }

    /// Pages of `f` that are dirty in the page cache (`cachestat(2)`, Linux 6.5).
    fn dirty_pages(f: &File) -> u64 {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            cache: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        const SYS_CACHESTAT: nix::libc::c_long = 451;
        let range = Range { off: 0, len: 0 };
        let mut st = Stat::default();
        // SAFETY: the kernel reads `range` and writes `st`, both live and of its layout.
        let rc = unsafe {
            nix::libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut Stat,
                0,
            )
        };
        assert_eq!(rc, 0, "cachestat: {}", io::Error::last_os_error());
        st.dirty
    }

    #[test]
    fn a_big_spool_file_is_written_back_while_it_is_written() {
        // On a disk (FHS), not a tmpfs, whose pages are never written back.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let g = GenerationId { ms: 1, rand: 2 };
        let mut w = spool.create(&g, None).unwrap();
        let chunk = vec![7u8; 64 << 10];
        let pages = |bytes: u64| bytes / 4096;
        for _ in 0..(4 << 20) / chunk.len() {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(&chunk[..4096 * 10]).unwrap();
        // Four write-backs were started, the last after 4 MiB: only what came after is dirty
        // (the kernel's own write-back waits 30 s for a file this young).
        let dirty = dirty_pages(&w.file);
        assert!(
            dirty <= pages(WRITEBACK_EVERY) / 8,
            "{dirty} pages of a 4 MiB spool file are dirty"
        );
        w.finish_writeback();
        assert_eq!(dirty_pages(&w.file), 0, "the rest was not written back");
        // A small file starts none: the per-commit path makes no extra system call.
        let mut small = spool.create(&g, None).unwrap();
        small.write_all(&chunk).unwrap();
        small.finish_writeback();
        assert_eq!(dirty_pages(&small.file), pages(chunk.len() as u64));
    }

    #[test]
    fn publishing_under_another_name_is_refused() {
        let (_dir, spool, g, name) = setup();
        let w = spool.create(&g, Some(name)).unwrap();
        let other = FileName::Snapshot {
            txid: 2,
            time_ms: 5,
        };
        assert!(spool.publish(w, &g, &other).is_err());
        assert!(spool.list().unwrap().is_empty());
    }

    /// A whole one-commit segment file for `txid` (one 512-byte page).
    fn part(txid: u64) -> Vec<u8> {
        use crate::layout::codec::{Commit, Encoder, Kind};
        let mut e = Encoder::new(Vec::new(), Kind::Segment, 512, 1).unwrap();
        e.page(1, &[txid as u8; 512]).unwrap();
        e.commit(&Commit {
            txid,
            time_ms: 100 + txid,
            db_pages: 1,
            db_checksum: txid,
        })
        .unwrap();
        e.finish().unwrap()
    }

    /// A whole one-commit segment file for `txid` of `pages` incompressible 512-byte pages.
    fn big_part(txid: u64, pages: u32) -> Vec<u8> {
        use crate::layout::codec::{Commit, Encoder, Kind};
        let mut e = Encoder::new(Vec::new(), Kind::Segment, 512, 1).unwrap();
        let mut x = txid | 1;
        for pgno in 1..=pages {
            let page: Vec<u8> = (0..512)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            e.page(pgno, &page).unwrap();
        }
        e.commit(&Commit {
            txid,
            time_ms: 100 + txid,
            db_pages: pages,
            db_checksum: txid,
        })
        .unwrap();
        e.finish().unwrap()
    }

    fn seg(first: u64, last: u64) -> FileName {
        FileName::Segment {
            level: 0,
            first,
            last,
            first_ms: 100 + first,
            last_ms: 100 + last,
        }
    }

    #[test]
    fn small_segments_grow_the_tail_and_a_replica_gets_only_what_it_lacks() {
        let (dir, spool, g, _) = setup();
        let mut w = spool.create(&g, None).unwrap();
        w.write_all(&part(1)).unwrap();
        let s1 = spool.publish(w, &g, &seg(1, 1)).unwrap();
        let f1 = spool.list().unwrap()[0].clone();
        assert!(spool.is_tail(&f1));
        assert!(
            spool.append(&g, 2).is_none(),
            "appended after the wrong txid"
        );
        let mut w = spool.append(&g, 1).expect("the tail takes txid 2");
        w.write_all(&part(2)).unwrap();
        let size = spool.publish(w, &g, &seg(2, 2)).unwrap();
        let files = spool.list().unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        let f = files[0].clone();
        assert_eq!((f.name, f.size), (seg(1, 2), size));
        let path = spool.path(&g, &f.name);
        assert_eq!(fs::read(&path).unwrap(), [part(1), part(2)].concat());
        assert!(!spool.path(&g, &seg(1, 1)).exists());
        assert_eq!(spool.piece(&f, 2), Some((s1, 102)));
        assert_eq!(spool.piece(&f, 1), Some((0, 101)));
        assert_eq!(spool.piece(&f, 3), None);
        let pos = Some(Key::of(g, &seg(1, 1)));
        assert_eq!(spool.first_missing_ms(&files, pos), Some(102));
        assert_eq!(spool.first_missing_ms(&files, None), Some(101));

        // An append dropped before it is published is cut off; the listing never saw it.
        let mut w = spool.append(&g, 2).expect("the tail takes txid 3");
        w.write_all(&part(3)).unwrap();
        drop(w);
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        assert_eq!(spool.list().unwrap(), files);
        assert!(
            spool.append(&g, 2).is_none(),
            "a failed append's tail was reused"
        );

        // Removing the tail (the spool limit) forgets it.
        spool.remove(&f).unwrap();
        assert!(!spool.is_tail(&f));
        assert!(spool.append(&g, 2).is_none());

        // A crash after an append's sync, its rename lost (a power cut), and another append
        // cut short: the next start keeps the complete part, under its range, and cuts off
        // the rest.
        let mut w = spool.create(&g, None).unwrap();
        w.write_all(&part(3)).unwrap();
        let size = spool.publish(w, &g, &seg(3, 3)).unwrap();
        let path = spool.path(&g, &seg(3, 3));
        let (p4, p5) = (part(4), part(5));
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&p4).unwrap();
        raw.write_all(&p5[..p5.len() / 2]).unwrap();
        drop(raw);
        let reopened = Spool::open(&dir.path().join("spool")).unwrap();
        let files = reopened.list().unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(
            (files[0].name, files[0].size),
            (seg(3, 4), size + p4.len() as u64)
        );
        assert!(!path.exists(), "the old name stayed");
        assert_eq!(
            fs::read(reopened.path(&g, &seg(3, 4))).unwrap(),
            [part(3), p4].concat()
        );

        // Bytes that are no complete part at all are only cut off.
        let path = reopened.path(&g, &seg(3, 4));
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&p5[..p5.len() - 1]).unwrap();
        drop(raw);
        let again = Spool::open(&dir.path().join("spool")).unwrap();
        assert_eq!(again.list().unwrap(), files);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            size + part(4).len() as u64
        );
    }

    /// A file published without a sync is listed and shipped like any other, is never the
    /// tail, and stays counted until it is synced or removed; a start in the same boot counts
    /// the files of the mark again, one after a reboot drops them.
    #[test]
    fn files_published_without_a_sync_are_synced_removed_or_dropped() {
        let (dir, spool, g, _) = setup();
        let mut w = spool.create(&g, None).unwrap();
        w.write_all(&part(1)).unwrap();
        spool.publish(w, &g, &seg(1, 1)).unwrap();
        for t in 2..=4 {
            let mut w = spool.create(&g, None).unwrap();
            w.skip_writeback();
            w.write_all(&big_part(t, 3000)).unwrap();
            spool.publish_volatile(w, &g, &seg(t, t)).unwrap();
        }
        let files = spool.list().unwrap();
        assert_eq!(files.len(), 4, "{files:?}");
        assert!(!spool.is_tail(&files[3]), "a volatile file became the tail");
        assert!(spool.append(&g, 4).is_none());
        assert_eq!(spool.sync_volatile(Duration::from_secs(3600)).unwrap(), 3);
        spool.remove(&files[1]).unwrap();
        assert_eq!(spool.sync_volatile(Duration::from_secs(3600)).unwrap(), 2);
        assert_eq!(spool.sync_volatile(Duration::ZERO).unwrap(), 0);
        drop(spool);

        let again = Spool::open(&dir.path().join("spool")).unwrap();
        again.adopt_volatile(&g, 3);
        assert_eq!(again.sync_volatile(Duration::from_secs(3600)).unwrap(), 2);
        assert_eq!(again.drop_from(&g, 3).unwrap(), 2);
        assert_eq!(again.sync_volatile(Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(again.list().unwrap(), files[..1]);
        assert!(!again.path(&g, &seg(3, 3)).exists());
    }

    /// An append to a small tail may be far bigger than the tail's limit (a chase step of a
    /// bulk load): a crash that lost its rename still leaves it kept under its range, never
    /// left inside a file named for less (which the next capture would then append the same
    /// txids after, or capture again).
    #[test]
    fn a_big_append_whose_rename_was_lost_is_kept() {
        let (dir, spool, g, _) = setup();
        let mut w = spool.create(&g, None).unwrap();
        w.write_all(&part(1)).unwrap();
        let size = spool.publish(w, &g, &seg(1, 1)).unwrap();
        let big = big_part(2, 6000);
        assert!(big.len() as u64 > 2 * TAIL_MAX_BYTES, "{}", big.len());
        let path = spool.path(&g, &seg(1, 1));
        let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
        raw.write_all(&big).unwrap();
        drop(raw);
        let reopened = Spool::open(&dir.path().join("spool")).unwrap();
        let files = reopened.list().unwrap();
        assert_eq!(
            files.iter().map(|f| (f.name, f.size)).collect::<Vec<_>>(),
            [(seg(1, 2), size + big.len() as u64)]
        );

        // A big file that is one piece, as named, is left as it is.
        drop(reopened);
        let again = Spool::open(&dir.path().join("spool")).unwrap();
        assert_eq!(again.list().unwrap(), files);
        let mut w = again.create(&g, None).unwrap();
        let big3 = big_part(3, 6000);
        w.write_all(&big3).unwrap();
        again.publish(w, &g, &seg(3, 3)).unwrap();
        drop(again);
        let last = Spool::open(&dir.path().join("spool")).unwrap();
        let listed = last.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(
            (listed[1].name, listed[1].size),
            (seg(3, 3), big3.len() as u64)
        );
    }
}
