//! The state directory: everything walship keeps on this machine about one database, behind
//! one type, [`StateDir`], with typed values that `Display` and `FromStr`.
//!
//! Files (all under the state directory):
//! - `lock`: flocked exclusively by the running daemon; `walship status` asks it whether a
//!   daemon runs.
//! - `status`: `<unix ms> <status line>` ([`StatusFile`], [`Status`]), replaced without fsync
//!   (it loses nothing when stale) when it changes; while commits stream, a new position alone
//!   is written at most once a second (see `main_loop`'s `STATUS_EVERY`).
//! - `capture.state`: where capture stands, and where it stood before the last segment
//!   ([`SavedCapture`]); a record file. Saved ahead of a segment's publication, it is written
//!   to the device without a flush of its own, and the publication's fsync flushes it
//!   ([`StateDir::save_capture_to_publish`]).
//! - `pagehashes`: the per-page hashes of the captured state, saved at a clean stop.
//! - `replica-<name>.state`: what replica `<name>` durably holds, and since when
//!   ([`ReplicaPosition`]); a record file, saved without `fdatasync` (a power cut may set it
//!   back, which only makes the next start send some commits again).
//! - `instance`: this installation's instance id, named in its owner claims on replicas.
//! - `volatile`: present while spool files of a chase may not be on the disk yet
//!   ([`VolatileMark`], see `capture::publish`): written and removed durably (temp, fsync,
//!   rename, directory fsync; unlink, directory fsync).
//! - `spool/`: captured files waiting for replicas (see `spool`).
//!
//! Invariants: `capture.state` and `replica-<name>.state`, saved on every capture and every
//! upload, are record files ([`RecordFile`]): created once through [`write_file_atomic`], then
//! rewritten in place (two checksummed slots, `pwrite` + `fdatasync`: no new file per commit),
//! kept open by the daemon between saves (recreated if removed or replaced under it). After a
//! crash they hold the previous or the new value, and `walship status` reading them while the
//! daemon saves sees one of the two. A plain text file of the same name (written before record
//! files) still reads, and its next save replaces it with a record file. `pagehashes` is
//! replaced only through [`write_file_atomic`] (temp, fsync, rename, directory fsync). Reading
//! is strict (a missing key or a bad number is an error naming the file).
//!
//! [`RecordFile`]: crate::durable::RecordFile

use super::spool::Key;
use crate::db::WalPos;
use crate::durable::{
    lock_dir, lock_held, read_record, replace_file, write_file_atomic, Durability, RecordFiles,
};
use crate::layout::checksum::PageHashes;
use crate::layout::names::GenerationId;
use crate::layout::owner::InstanceId;
use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use tracing::warn;

/// The state directory of one database. Clones share the record files kept open for saving.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
    records: RecordFiles,
    /// Whether the spool is on this directory's file system (see
    /// [`StateDir::save_capture_to_publish`]), looked up at the first save.
    spool_shares_fs: Arc<OnceLock<bool>>,
}

/// The daemon's exclusive lock on a state directory; released when dropped.
#[derive(Debug)]
pub(crate) struct StateLock(#[allow(dead_code)] File);

impl StateDir {
    /// The state directory at `dir` (nothing is created yet).
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir {
            dir: dir.into(),
            records: RecordFiles::default(),
            spool_shares_fs: Arc::default(),
        }
    }

    /// Where the spool lives.
    pub(crate) fn spool_dir(&self) -> PathBuf {
        self.dir.join("spool")
    }

    /// The id of the instance that owns this state directory, created on first use. A file
    /// that is not exactly 16 lowercase hex digits is replaced by a new id (logged): a new id only
    /// means a new claim, which wins anyway.
    ///
    /// # Errors
    /// The file cannot be read or written.
    pub(crate) fn instance_id(&self) -> Result<InstanceId> {
        let p = self.dir.join("instance");
        match std::fs::read(&p) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                if let Ok(id) = text.trim_end_matches('\n').parse::<InstanceId>() {
                    return Ok(id);
                }
                warn!(
                    "{} does not hold an instance id: making a new one",
                    p.display()
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
        let id = InstanceId(rand::random::<u64>());
        // Durably: a power cut soon after the first start would otherwise leave an empty
        // file, and every start after it a new id (and a warning).
        crate::durable::write_file_atomic(&p, &mut format!("{id}\n").as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", p.display()))?;
        Ok(id)
    }

    /// Creates the directory, takes the daemon's lock, and removes the temporary files a killed
    /// predecessor left (nobody else writes here).
    ///
    /// # Errors
    /// The directory cannot be created or cleaned, or another walship holds the lock.
    pub(crate) fn lock(&self) -> Result<StateLock> {
        let dir = self.dir.display();
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create state directory {dir}"))?;
        let f = lock_dir(
            &self.dir,
            &format!(
                "another walship is already replicating with state directory {dir} (lock held)"
            ),
        )?;
        Ok(StateLock(f))
    }

    /// Whether a daemon holds the lock now.
    pub(crate) fn daemon_running(&self) -> bool {
        lock_held(&self.dir)
    }

    fn status_path(&self) -> PathBuf {
        self.dir.join("status")
    }

    /// Replaces the status file with `status`, stamped now. Failures are only logged: the
    /// status is a report, never state.
    pub(crate) fn write_status(&self, status: &Status) {
        let p = self.status_path();
        let text = StatusFile {
            written_ms: crate::clock::now_ms(),
            status: status.clone(),
        }
        .to_string();
        if let Err(e) = replace_file(&p, text.as_bytes(), 0o644) {
            tracing::debug!("cannot write {}: {e}", p.display());
        }
    }

    /// The status file; `None` if there is none.
    ///
    /// # Errors
    /// It cannot be read or is malformed (the message names it).
    pub(crate) fn read_status(&self) -> Result<Option<StatusFile>> {
        let p = self.status_path();
        read_typed(&p)
    }

    fn capture_path(&self) -> PathBuf {
        self.dir.join("capture.state")
    }

    /// The saved capture state, if any.
    ///
    /// # Errors
    /// Unreadable or malformed (the message names the file).
    pub(crate) fn load_capture(&self) -> Result<Option<SavedCapture>> {
        read_state(&self.capture_path())
    }

    /// Saves the capture state durably.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub(crate) fn save_capture(&self, c: &SavedCapture) -> Result<()> {
        self.save_record(&self.capture_path(), &c.to_string(), Durability::Synced)
    }

    /// Saves the capture state ahead of publishing its segment in the spool: durable once the
    /// publication's fsync returns, which is before the segment can reach a replica. The state
    /// is written to the device without a cache flush of its own ([`Durability::Written`]),
    /// and the spool file's fsync flushes it; the order the protocol needs (state durable
    /// before the segment is published) holds. If the power goes before that fsync returns,
    /// the state may be the one before while the spool holds the segment's bytes past its
    /// published name, which the next start cuts off: the step is redone, as when the segment
    /// was not written at all. With the spool on another file system than the state (its
    /// directory mounted elsewhere), this saves durably ([`StateDir::save_capture`]).
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub(crate) fn save_capture_to_publish(&self, c: &SavedCapture) -> Result<()> {
        let durability = if *self.spool_shares_fs.get_or_init(|| self.spool_on_same_fs()) {
            Durability::Written
        } else {
            Durability::Synced
        };
        self.save_record(&self.capture_path(), &c.to_string(), durability)
    }

    /// Whether the spool directory is on the state directory's file system (unknown: no).
    fn spool_on_same_fs(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (
            std::fs::metadata(&self.dir),
            std::fs::metadata(self.spool_dir()),
        ) {
            (Ok(a), Ok(b)) => a.dev() == b.dev(),
            _ => false,
        }
    }

    fn volatile_path(&self) -> PathBuf {
        self.dir.join("volatile")
    }

    /// The mark saying that spool files may not be durable, if one is set.
    ///
    /// # Errors
    /// Unreadable or malformed (the message names the file).
    pub(crate) fn load_volatile(&self) -> Result<Option<VolatileMark>> {
        read_state(&self.volatile_path())
    }

    /// Sets the mark durably, before the first spool file it covers is published.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub(crate) fn mark_volatile(&self, m: &VolatileMark) -> Result<()> {
        let p = self.volatile_path();
        crate::durable::write_file_atomic(&p, &mut m.to_string().as_bytes(), 0o640)
            .map(|_| ())
            .with_context(|| format!("cannot write {}", p.display()))
    }

    /// Removes the mark durably, once the files it covered are durable or gone: first the
    /// capture state saved since it was set is written to the device (the removal's
    /// directory fsync then flushes the device's cache before the removal is recorded).
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub(crate) fn clear_volatile(&self) -> Result<()> {
        self.records.write_through_all()?;
        let p = self.volatile_path();
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", p.display())),
        }
        crate::durable::fsync_dir(&self.dir)
            .with_context(|| format!("cannot sync {}", self.dir.display()))
    }

    fn hashes_path(&self) -> PathBuf {
        self.dir.join("pagehashes")
    }

    /// Saves the page hashes of the captured state `at` (with `page_size`) durably.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub(crate) fn save_page_hashes(
        &self,
        at: &Captured,
        page_size: u32,
        hashes: &PageHashes,
    ) -> Result<()> {
        let hs = hashes.as_slice();
        let mut buf = hashes_header(at, page_size).into_bytes();
        buf.push(b'\n');
        buf.reserve(hs.len() * 8);
        for h in hs {
            buf.extend_from_slice(&h.to_le_bytes());
        }
        let p = self.hashes_path();
        write_file_atomic(&p, &mut buf.as_slice(), 0o640)
            .map(|_| ())
            .with_context(|| format!("cannot write {}", p.display()))
    }

    /// The saved page hashes if they describe exactly the state `at` with `page_size`.
    pub(crate) fn load_page_hashes(&self, at: &Captured, page_size: u32) -> Option<PageHashes> {
        let data = std::fs::read(self.hashes_path()).ok()?;
        let nl = data.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&data[..nl]).ok()?;
        let body = &data[nl + 1..];
        if header != hashes_header(at, page_size) || body.len() % 8 != 0 {
            return None;
        }
        let hashes: Vec<u64> = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let ph = PageHashes::from_hashes(page_size, hashes);
        (ph.db_checksum() == at.db_checksum).then_some(ph)
    }

    /// Removes the saved page hashes (once used: they describe a state that is gone).
    pub(crate) fn remove_page_hashes(&self) {
        let _ = std::fs::remove_file(self.hashes_path());
    }

    fn position_path(&self, replica: &str) -> PathBuf {
        self.dir.join(format!("replica-{replica}.state"))
    }

    /// What replica `replica` durably holds, as recorded; `None` if nothing is.
    ///
    /// # Errors
    /// Unreadable or malformed (the message names the file).
    pub(crate) fn load_position(&self, replica: &str) -> Result<Option<ReplicaPosition>> {
        read_state(&self.position_path(replica))
    }

    /// Records durably that replica `replica` holds `pos`.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub(crate) fn save_position(&self, replica: &str, pos: &ReplicaPosition) -> Result<()> {
        // Not fsynced: the replica holds the files durably already, and a position that a
        // power cut set back only makes the next start send some commits again (files that
        // overlap what the replica holds; readers skip what they applied), as long as the
        // spool still holds them: it removes none before the positions that let it are
        // written through (`write_through_positions`). One fdatasync less per upload.
        self.save_record(
            &self.position_path(replica),
            &pos.to_string(),
            Durability::Cached,
        )
    }

    /// Makes the replicas' recorded positions durable (written to the device; the file
    /// system's next journal commit flushes its cache before it records anything done after
    /// this returns). Before spooled files are removed because replicas hold them: a power
    /// cut that kept the removal but set a position back left a replica behind files that
    /// are gone, and it was sent a whole new snapshot.
    ///
    /// # Errors
    /// I/O errors, with the path.
    pub(crate) fn write_through_positions(&self) -> Result<()> {
        self.records.write_through_all()
    }

    /// Saves `text` as the value of the record file `path`, as durable as `durability` says.
    fn save_record(&self, path: &Path, text: &str, durability: Durability) -> Result<()> {
        self.records.save(path, text.as_bytes(), 0o640, durability)
    }

    /// Every replica's recorded position, by replica name; unreadable records are left out.
    pub fn positions(&self) -> Vec<(String, ReplicaPosition)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<(String, ReplicaPosition)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let name = n.strip_prefix("replica-")?.strip_suffix(".state")?;
                let pos = self.load_position(name).ok().flatten()?;
                Some((name.to_owned(), pos))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

fn hashes_header(at: &Captured, page_size: u32) -> String {
    format!(
        "walship-pagehashes 1 {} {} {page_size} {:016x}",
        at.generation, at.txid, at.db_checksum
    )
}

/// Reads and parses the record file `path` (or a plain file written before record files);
/// `None` if it does not exist.
fn read_state<T: FromStr<Err = anyhow::Error>>(path: &Path) -> Result<Option<T>> {
    let Some(data) = read_record(path)? else {
        return Ok(None);
    };
    std::str::from_utf8(&data)
        .map_err(|e| anyhow!("not text: {e}"))
        .and_then(str::parse)
        .map(Some)
        .with_context(|| format!("state file {} is malformed", path.display()))
}

/// Reads and parses `path`; `None` if it does not exist.
fn read_typed<T: FromStr<Err = anyhow::Error>>(path: &Path) -> Result<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read state file {}", path.display()))
        }
    };
    text.parse()
        .map(Some)
        .with_context(|| format!("state file {} is malformed", path.display()))
}

/// An ordered set of `key value` lines: the text form of the state files.
#[derive(Debug, Default, Clone)]
struct Kv(BTreeMap<String, String>);

impl Kv {
    fn set(&mut self, key: &str, v: impl fmt::Display) -> &mut Self {
        self.0.insert(key.to_owned(), v.to_string());
        self
    }

    fn str(&self, key: &str) -> Result<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("missing key {key:?}"))
    }

    fn num<T: FromStr>(&self, key: &str) -> Result<T> {
        let s = self.str(key)?;
        s.parse()
            .map_err(|_| anyhow!("bad number {s:?} for {key:?}"))
    }

    fn hex(&self, key: &str) -> Result<u64> {
        let s = self.str(key)?;
        u64::from_str_radix(s, 16).map_err(|_| anyhow!("bad hex number {s:?} for {key:?}"))
    }

    fn hex32(&self, key: &str) -> Result<u32> {
        Ok(u32::try_from(self.hex(key)?)?)
    }

    fn generation(&self, key: &str) -> Result<GenerationId> {
        let s = self.str(key)?;
        s.parse()
            .map_err(|e| anyhow!("bad generation {s:?} for {key:?}: {e}"))
    }
}

impl fmt::Display for Kv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.0 {
            writeln!(f, "{k} {v}")?;
        }
        Ok(())
    }
}

impl FromStr for Kv {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Kv> {
        let mut kv = Kv::default();
        for (i, line) in text.lines().enumerate() {
            let (k, v) = line
                .split_once(' ')
                .ok_or_else(|| anyhow!("line {} is malformed", i + 1))?;
            kv.0.insert(k.to_owned(), v.to_owned());
        }
        Ok(kv)
    }
}

/// Spool files of `generation` from txid `from` on may have been published without a sync,
/// during boot `boot` of this machine (see `capture::publish`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolatileMark {
    /// The machine's boot id when the mark was set ([`boot_id`]).
    pub boot: String,
    /// The generation of the files.
    pub generation: GenerationId,
    /// The first txid they may hold.
    pub from: u64,
}

impl fmt::Display for VolatileMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kv = Kv::default();
        kv.set("boot", &self.boot)
            .set("generation", self.generation)
            .set("from", self.from);
        kv.fmt(f)
    }
}

impl FromStr for VolatileMark {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<VolatileMark> {
        let kv: Kv = s.parse()?;
        Ok(VolatileMark {
            boot: kv.str("boot")?.to_owned(),
            generation: kv.generation("generation")?,
            from: kv.num("from")?,
        })
    }
}

/// This machine's boot id (`/proc/sys/kernel/random/boot_id`), new at every boot: a spool
/// file that was only in the page cache is lost exactly when it changed. `None` if it cannot
/// be read (spool files are then always synced). Test hook: `WALSHIP_FAILPOINT_BOOT_ID_FILE` names
/// another file to read it from, so that a test can simulate a reboot.
pub(crate) fn boot_id() -> Option<&'static str> {
    static BOOT: OnceLock<Option<String>> = OnceLock::new();
    BOOT.get_or_init(|| {
        let path = std::env::var_os("WALSHIP_FAILPOINT_BOOT_ID_FILE").map_or_else(
            || PathBuf::from("/proc/sys/kernel/random/boot_id"),
            PathBuf::from,
        );
        let id = std::fs::read_to_string(path).ok()?.trim().to_owned();
        (!id.is_empty() && !id.contains(char::is_whitespace)).then_some(id)
    })
    .as_deref()
}

/// Where capture stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Captured {
    /// The generation.
    pub generation: GenerationId,
    /// The last captured txid.
    pub txid: u64,
    /// When it was captured.
    pub time_ms: u64,
    /// Database checksum after it.
    pub db_checksum: u64,
    /// Database size in pages after it.
    pub db_pages: u32,
}

impl Captured {
    /// The spool key of this state.
    pub(crate) fn key(&self) -> Key {
        Key {
            generation: self.generation,
            last: self.txid,
            rank: 0,
        }
    }
}

/// A captured state as saved: where capture stands and where in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CaptureState {
    /// Generation, txid, checksum.
    pub at: Captured,
    /// The database's page size.
    pub page_size: u32,
    /// The WAL position after the captured state (`None`: no WAL).
    pub pos: Option<WalPos>,
}

impl CaptureState {
    fn write(&self, kv: &mut Kv, prefix: &str) {
        let k = |s: &str| format!("{prefix}{s}");
        let at = &self.at;
        kv.set(&k("generation"), at.generation)
            .set(&k("txid"), at.txid)
            .set(&k("time-ms"), at.time_ms)
            .set(&k("db-checksum"), format!("{:016x}", at.db_checksum))
            .set(&k("db-pages"), at.db_pages)
            .set(&k("page-size"), self.page_size);
        match self.pos {
            None => kv.set(&k("wal"), "none"),
            Some(p) => kv
                .set(&k("wal"), "yes")
                .set(&k("salt1"), format!("{:08x}", p.salt1))
                .set(&k("salt2"), format!("{:08x}", p.salt2))
                .set(&k("frames"), p.frames)
                .set(&k("running0"), format!("{:08x}", p.running[0]))
                .set(&k("running1"), format!("{:08x}", p.running[1])),
        };
    }

    fn read(kv: &Kv, prefix: &str) -> Result<CaptureState> {
        let k = |s: &str| format!("{prefix}{s}");
        let page_size = kv.num(&k("page-size"))?;
        let pos = match kv.str(&k("wal"))? {
            "none" => None,
            _ => Some(WalPos {
                salt1: kv.hex32(&k("salt1"))?,
                salt2: kv.hex32(&k("salt2"))?,
                frames: kv.num(&k("frames"))?,
                running: [kv.hex32(&k("running0"))?, kv.hex32(&k("running1"))?],
                page_size,
            }),
        };
        Ok(CaptureState {
            at: Captured {
                generation: kv.generation(&k("generation"))?,
                txid: kv.num(&k("txid"))?,
                time_ms: kv.num(&k("time-ms"))?,
                db_checksum: kv.hex(&k("db-checksum"))?,
                db_pages: kv.num(&k("db-pages"))?,
            },
            page_size,
            pos,
        })
    }
}

/// `capture.state`: the captured state, and the one before the last segment (saved before
/// that segment is published, so a start that finds neither the spool nor a replica holding
/// `cur` redoes the step from `prev`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SavedCapture {
    /// The newest captured state.
    pub cur: CaptureState,
    /// The state before the newest segment, if one was being published.
    pub prev: Option<CaptureState>,
}

impl fmt::Display for SavedCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kv = Kv::default();
        self.cur.write(&mut kv, "");
        if let Some(p) = &self.prev {
            p.write(&mut kv, "prev-");
        }
        kv.fmt(f)
    }
}

impl FromStr for SavedCapture {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<SavedCapture> {
        let kv: Kv = s.parse()?;
        Ok(SavedCapture {
            cur: CaptureState::read(&kv, "")?,
            prev: CaptureState::read(&kv, "prev-").ok(),
        })
    }
}

/// `replica-<name>.state`: the newest file a replica durably holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReplicaPosition {
    /// The spool key of that file (generation, last txid, rank).
    pub key: Key,
    /// When its last commit was captured (Unix ms).
    pub time_ms: u64,
    /// When the replica durably received that file (Unix ms): when this record was written.
    /// `None` in records written before walship kept it.
    pub received_ms: Option<u64>,
}

impl fmt::Display for ReplicaPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kv = Kv::default();
        kv.set("generation", self.key.generation)
            .set("last", self.key.last)
            .set("rank", self.key.rank)
            .set("time-ms", self.time_ms);
        if let Some(ms) = self.received_ms {
            kv.set("received-ms", ms);
        }
        kv.fmt(f)
    }
}

impl FromStr for ReplicaPosition {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<ReplicaPosition> {
        let kv: Kv = s.parse()?;
        Ok(ReplicaPosition {
            key: Key {
                generation: kv.generation("generation")?,
                last: kv.num("last")?,
                rank: kv.num("rank")?,
            },
            time_ms: kv.num("time-ms")?,
            received_ms: kv
                .0
                .contains_key("received-ms")
                .then(|| kv.num("received-ms"))
                .transpose()?,
        })
    }
}

/// The daemon's one-line status (the `status` file and sd_notify's `STATUS=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The database file does not exist yet: `waiting for <path> to be created`. The daemon
    /// has told systemd it is ready (a missing database is not a failed start) and starts
    /// replicating as soon as the file appears.
    WaitingForDb(PathBuf),
    /// Not replicating yet: `starting: <what it does or waits for>`.
    Starting(String),
    /// Replicating: `replicated to OK/N replicas, lag X ms, position GEN/TXID[, failing: ...]`.
    Replicating(Progress),
}

/// How far the replicas are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Replicas holding everything captured.
    pub ok: usize,
    /// Replicas configured.
    pub total: usize,
    /// Age of the oldest commit some replica lacks (ms); 0 when all hold everything.
    pub lag_ms: u64,
    /// The captured generation.
    pub generation: GenerationId,
    /// The last captured txid.
    pub txid: u64,
    /// What fails, `; `-separated (`database: ...`, `<replica>: ...`), if anything. A
    /// replica's error that retrying cannot cure starts with [`PERMANENT`].
    pub failing: Option<String>,
}

/// How a replica's error in [`Progress::failing`] starts when it needs an operator (permission
/// denied, a replica of another database, taken over by another instance) rather than time:
/// `<replica>: permanent: <error> (needs an operator: <what to do>)`.
pub const PERMANENT: &str = "permanent: ";

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::WaitingForDb(p) => write!(f, "waiting for {} to be created", p.display()),
            Status::Starting(s) => write!(f, "starting: {s}"),
            Status::Replicating(p) => {
                write!(
                    f,
                    "replicated to {}/{} replicas, lag {} ms, position {}/{}",
                    p.ok, p.total, p.lag_ms, p.generation, p.txid
                )?;
                match &p.failing {
                    Some(x) => write!(f, ", failing: {x}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl FromStr for Status {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Status> {
        if let Some(what) = s.strip_prefix("starting: ") {
            return Ok(Status::Starting(what.to_owned()));
        }
        if let Some(path) = s
            .strip_prefix("waiting for ")
            .and_then(|r| r.strip_suffix(" to be created"))
        {
            return Ok(Status::WaitingForDb(PathBuf::from(path)));
        }
        let bad = || anyhow!("not a status line: {s:?}");
        let rest = s.strip_prefix("replicated to ").ok_or_else(bad)?;
        let (ratio, rest) = rest.split_once(" replicas, lag ").ok_or_else(bad)?;
        let (ok, total) = ratio.split_once('/').ok_or_else(bad)?;
        let (lag, rest) = rest.split_once(" ms, position ").ok_or_else(bad)?;
        let (position, failing) = match rest.split_once(", failing: ") {
            Some((p, f)) => (p, Some(f.to_owned())),
            None => (rest, None),
        };
        let (generation, txid) = position.split_once('/').ok_or_else(bad)?;
        Ok(Status::Replicating(Progress {
            ok: ok.parse().map_err(|_| bad())?,
            total: total.parse().map_err(|_| bad())?,
            lag_ms: lag.parse().map_err(|_| bad())?,
            generation: generation.parse().map_err(|_| bad())?,
            txid: txid.parse().map_err(|_| bad())?,
            failing,
        }))
    }
}

/// The `status` file: when it was written, and the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusFile {
    /// When it was written (Unix ms).
    pub written_ms: u64,
    /// The status then.
    pub status: Status,
}

impl fmt::Display for StatusFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} {}", self.written_ms, self.status)
    }
}

impl FromStr for StatusFile {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<StatusFile> {
        let line = s.lines().next().unwrap_or_default();
        let (ms, status) = line
            .split_once(' ')
            .ok_or_else(|| anyhow!("not a status line: {line:?}"))?;
        Ok(StatusFile {
            written_ms: ms
                .parse()
                .map_err(|_| anyhow!("bad time {ms:?} in status line"))?,
            status: status.parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation() -> GenerationId {
        GenerationId {
            ms: 0x0193_a1b2_c3d4,
            rand: 0xe5f6_0708,
        }
    }

    #[test]
    fn values_round_trip_through_their_text() {
        let at = Captured {
            generation: generation(),
            txid: 42,
            time_ms: 1_700_000_000_123,
            db_checksum: 0xdead_beef_0000_0001,
            db_pages: 7,
        };
        let cur = CaptureState {
            at,
            page_size: 4096,
            pos: Some(WalPos {
                salt1: 1,
                salt2: 0xffff_ffff,
                frames: 9,
                running: [3, 4],
                page_size: 4096,
            }),
        };
        let prev = CaptureState { pos: None, ..cur };
        for c in [
            SavedCapture { cur, prev: None },
            SavedCapture {
                cur,
                prev: Some(prev),
            },
        ] {
            assert_eq!(c.to_string().parse::<SavedCapture>().unwrap(), c);
        }
        let pos = ReplicaPosition {
            key: at.key(),
            time_ms: 5,
            received_ms: Some(6),
        };
        assert_eq!(pos.to_string().parse::<ReplicaPosition>().unwrap(), pos);
        // A record written before `received-ms` existed still reads.
        let old = format!("generation {}\nlast 42\nrank 0\ntime-ms 5\n", generation());
        let old: ReplicaPosition = old.parse().unwrap();
        assert_eq!(
            old,
            ReplicaPosition {
                received_ms: None,
                ..pos
            }
        );
        let progress = Progress {
            ok: 1,
            total: 2,
            lag_ms: 30,
            generation: generation(),
            txid: 42,
            failing: None,
        };
        for s in [
            Status::Starting("waiting (3 s so far), retrying every 1 s: locked".into()),
            Status::WaitingForDb(PathBuf::from("/var/data/db/a b.db")),
            Status::Replicating(progress.clone()),
            Status::Replicating(Progress {
                failing: Some("b: down; database: locked".into()),
                ..progress.clone()
            }),
            Status::Replicating(Progress {
                failing: Some(format!(
                    "b: {PERMANENT}permission denied (needs an operator: x)"
                )),
                ..progress
            }),
        ] {
            let f = StatusFile {
                written_ms: 9,
                status: s,
            };
            assert_eq!(f.to_string().parse::<StatusFile>().unwrap(), f);
        }
    }

    #[test]
    fn waiting_for_the_database_reads_as_it_is_shown() {
        let s = Status::WaitingForDb(PathBuf::from("/srv/db/app.db"));
        assert_eq!(s.to_string(), "waiting for /srv/db/app.db to be created");
        assert_eq!(
            "waiting for /srv/db/app.db to be created"
                .parse::<Status>()
                .unwrap(),
            s
        );
    }

    #[test]
    fn malformed_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        std::fs::write(dir.path().join("replica-a.state"), "generation x\n").unwrap();
        let e = format!("{:#}", s.load_position("a").unwrap_err());
        assert!(e.contains("replica-a.state"), "{e}");
        assert!(s.load_position("b").unwrap().is_none());
        assert!(s.positions().is_empty());
        std::fs::write(dir.path().join("status"), "12 hello\n").unwrap();
        assert!(s.read_status().is_err());
    }

    #[test]
    fn the_lock_is_exclusive_and_visible() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path().join("state"));
        assert!(!s.daemon_running());
        let lock = s.lock().unwrap();
        assert!(s.daemon_running());
        let e = format!("{:#}", s.lock().unwrap_err());
        assert!(e.contains("lock held"), "{e}");
        drop(lock);
        assert!(!s.daemon_running());
    }

    #[test]
    fn the_instance_id_is_kept_in_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let id = StateDir::new(dir.path()).instance_id().unwrap();
        assert_eq!(StateDir::new(dir.path()).instance_id().unwrap(), id);
        let text = std::fs::read_to_string(dir.path().join("instance")).unwrap();
        assert_eq!(text, format!("{id}\n"));
        std::fs::write(dir.path().join("instance"), "garbage").unwrap();
        let new = StateDir::new(dir.path()).instance_id().unwrap();
        assert_eq!(StateDir::new(dir.path()).instance_id().unwrap(), new);
    }

    fn capture() -> SavedCapture {
        let cur = CaptureState {
            at: Captured {
                generation: generation(),
                txid: 42,
                time_ms: 1_700_000_000_123,
                db_checksum: 0xdead_beef_0000_0001,
                db_pages: 7,
            },
            page_size: 4096,
            pos: None,
        };
        SavedCapture {
            cur,
            prev: Some(cur),
        }
    }

    fn position(last: u64) -> ReplicaPosition {
        ReplicaPosition {
            key: Key {
                generation: generation(),
                last,
                rank: 0,
            },
            time_ms: last * 10,
            received_ms: Some(last * 10 + 1),
        }
    }

    fn ino(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().ino()
    }

    #[test]
    fn the_state_is_flushed_by_the_spool_only_on_the_same_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        // No spool directory (yet): the state is synced on its own.
        assert!(!s.spool_on_same_fs());
        std::fs::create_dir(s.spool_dir()).unwrap();
        assert!(s.spool_on_same_fs());
    }

    #[test]
    fn capture_and_positions_are_saved_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        s.save_capture(&capture()).unwrap();
        s.save_position("a", &position(1)).unwrap();
        let (cap, pos) = (
            dir.path().join("capture.state"),
            dir.path().join("replica-a.state"),
        );
        let inodes = (ino(&cap), ino(&pos));
        for n in 2..50 {
            let mut c = capture();
            c.cur.at.txid = n;
            if n % 2 == 0 {
                s.save_capture(&c).unwrap();
            } else {
                // Written through, not flushed: the same record, read back the same way.
                s.save_capture_to_publish(&c).unwrap();
            }
            // A clone (a shipper thread's) shares the open files.
            s.clone().save_position("a", &position(n)).unwrap();
            assert_eq!(s.load_capture().unwrap(), Some(c));
            assert_eq!(s.load_position("a").unwrap(), Some(position(n)));
        }
        assert_eq!((ino(&cap), ino(&pos)), inodes);
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["capture.state", "replica-a.state"]);
        assert_eq!(
            StateDir::new(dir.path()).positions(),
            [("a".into(), position(49))]
        );
    }

    #[test]
    fn state_files_written_before_record_files_read_and_are_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let (cap, pos) = (
            dir.path().join("capture.state"),
            dir.path().join("replica-a.state"),
        );
        // Exactly what the previous walship wrote (temp + rename of the text).
        std::fs::write(&cap, capture().to_string()).unwrap();
        std::fs::write(
            &pos,
            format!("generation {}\nlast 42\nrank 0\ntime-ms 5\n", generation()),
        )
        .unwrap();
        let s = StateDir::new(dir.path());
        assert_eq!(s.load_capture().unwrap(), Some(capture()));
        let old = ReplicaPosition {
            time_ms: 5,
            received_ms: None,
            ..position(42)
        };
        assert_eq!(s.load_position("a").unwrap(), Some(old));
        assert_eq!(s.positions(), [("a".into(), old)]);
        let mut c = capture();
        c.cur.at.txid = 43;
        s.save_capture(&c).unwrap();
        s.save_position("a", &position(43)).unwrap();
        for p in [&cap, &pos] {
            let data = std::fs::read(p).unwrap();
            assert!(
                data.starts_with(b"WSRECv1\0"),
                "{} not upgraded",
                p.display()
            );
            assert_eq!(data.len(), 2 * crate::durable::RECORD_SLOT);
        }
        let fresh = StateDir::new(dir.path());
        assert_eq!(fresh.load_capture().unwrap(), Some(c));
        assert_eq!(fresh.positions(), [("a".into(), position(43))]);
    }

    /// `walship status` reads the positions while the daemon's shippers save them.
    #[test]
    fn positions_read_while_saved_are_always_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        s.save_position("a", &position(1)).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (d, done) = (dir.path().to_owned(), done.clone());
            std::thread::spawn(move || {
                let (mut reads, mut last) = (0, 0);
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                    let got = StateDir::new(&d).positions();
                    let [(name, p)] = got.as_slice() else {
                        panic!("read {reads}: {got:?}");
                    };
                    assert_eq!(name, "a");
                    assert_eq!(*p, position(p.key.last), "read {reads}");
                    assert!(p.key.last >= last, "read {reads}: {p:?} after {last}");
                    last = p.key.last;
                    reads += 1;
                    if finished && reads >= 3000 {
                        return last;
                    }
                }
            })
        };
        for n in 2..=2000 {
            s.save_position("a", &position(n)).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(reader.join().unwrap(), 2000);
    }
}
