//! Restore and verify: rebuild a database from a replica, proving it correct on the way.
//!
//! The pipeline: a reader thread fetches the planned files in order and decodes them
//! (network and decompression), handing chunks of records (~1 MiB) to the applier, which keeps
//! per-page hashes and writes the pages, through a small write-back cache, into a temporary
//! file beside the output.
//!
//! Invariants:
//! - Nothing is written outside the temporary file and, at the very end, the output path: the
//!   temporary file is fsynced, checked (whole-database checksum at every commit,
//!   `PRAGMA integrity_check`), then renamed over the output and the directory fsynced. The
//!   output is only ever created or, when forced, a regular file replaced (never a symlink,
//!   directory, device, FIFO or socket), and no failure leaves the temporary file behind.
//! - A restore stops exactly at a commit boundary; a file whose content disagrees with its
//!   name, a checksum mismatch, or a gap is an error naming the file.
//! - A segment file's name is a lower bound of its content (see [`crate::layout`]): the named
//!   range must be there, complete and valid (any damage in it is an error naming the file);
//!   whole parts after it are real commits, which a latest restore (and `verify`, and the
//!   follower) applies and reports as its position, while a point-in-time restore stops where
//!   asked; a torn or damaged part after the named range ends the file ([`ends_content`]).
//!   The reader hands the applier such a part's records only once the part's end record is
//!   verified ([`HELD_BYTES`] at most are held for it): the applier writes pages as they come
//!   and cannot take back those of a commit that never completes (each commit's checksum is
//!   verified, but pages of a torn commit after the last one would be left in the file).
//!   Plans stay from names: a file that held more simply overlaps the next one, whose commits
//!   already applied are skipped.
//! - A "latest" restore follows the replica's owner: generations newer than the one its newest
//!   claim names were written by an instance that was taken over, and are left out (see
//!   `owners_view`). Point-in-time restores (`--timestamp`, `--position`) see every generation.
//! - A live replica (one that a running walship compacts and prunes while it is read) restores
//!   like a quiet one: a planned segment merged away is followed into the merged segment, and
//!   a failure while the replica changed is retried from a new listing (see [`restore_into`]);
//!   only a failure on a replica that did not change is final.
//! - "Nothing there" is told apart from "empty": a replica root that does not exist is an error
//!   naming the URL (where the target can tell, see [`Backend::root_exists`]), and a restore
//!   for a configured database refuses a replica whose marker names another database path
//!   ([`check_database`]); the marker's host is not compared (a new host restores its
//!   predecessor's replica).
//! - An encrypted replica is read only through an identity, a plaintext one only without
//!   encryption settings: [`check_encryption`] compares the marker with how the replica was
//!   opened before anything else is read.
//! - Times in messages are RFC 3339 ([`crate::clock::rfc3339`]), never bare milliseconds.
//! - Memory is bounded: a few chunks in flight, `WRITE_BACK_BYTES` of held pages, up to
//!   [`HELD_BYTES`] of one part beyond a file's name until it is verified, 8 bytes of hash per
//!   page, and a database size limit of `MAX_DB_BYTES` against hostile metadata.
//!
//! [`follow`] (`restore --follow`) reuses this reader (and its following of merged segments)
//! to keep a restored database up to date as a warm standby; its applier writes through
//! SQLite rather than into a temporary file (see its module doc).

pub(crate) mod follow;
pub(crate) mod follow_state;

use crate::backend::encrypted::check_marker;
use crate::backend::Backend;
use crate::clock::rfc3339;
use crate::durable::{fsync_dir, temp_name, RemoveOnDrop};
use crate::layout::checksum::PageHashes;
use crate::layout::codec::{ends_past_name, Commit, Decoder, Kind, Record};
use crate::layout::names::{
    file_path, generation_dir, FileName, GenerationId, Marker, Position, GENERATIONS_DIR,
    MARKER_FILE,
};
use crate::layout::plan::{plan_continuation, plan_restore, Listing, Plan, Stop, Want};
use crate::layout::LayoutError;
use anyhow::{anyhow, bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use tracing::{debug, info, warn};

/// The largest database a restore will build (protects against hostile sizes).
pub(crate) const MAX_DB_BYTES: u64 = 256 << 30;

/// What a restore produced.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The replica's URL.
    pub(crate) url: String,
    /// The commit restored.
    pub(crate) position: Position,
    /// Its capture time.
    pub(crate) time_ms: u64,
    /// Pages in the database.
    pub(crate) db_pages: u32,
    /// Page size.
    pub(crate) page_size: u32,
    /// Whole-database checksum (verified).
    pub(crate) db_checksum: u64,
    /// Files read.
    pub(crate) files: usize,
}

/// Lists a replica strictly: unknown names are skipped with a warning.
///
/// # Errors
/// Backend errors.
pub(crate) fn list_replica(t: &dyn Backend) -> Result<Listing> {
    let mut gens = Vec::new();
    for e in t.list(GENERATIONS_DIR)? {
        let Ok(g) = e.name.parse::<GenerationId>() else {
            warn!(
                "ignoring unexpected entry {}/{GENERATIONS_DIR}/{}",
                t.url(),
                e.name
            );
            continue;
        };
        let mut files = Vec::new();
        for f in t.list(&generation_dir(&g))? {
            match FileName::parse(&f.name) {
                Ok(n) if !f.is_dir => files.push((n, f.size)),
                _ => warn!(
                    "ignoring unexpected entry {}/{}/{}",
                    t.url(),
                    generation_dir(&g),
                    f.name
                ),
            }
        }
        gens.push((g, files));
    }
    Ok(Listing { generations: gens })
}

/// The database a replica belongs to, as its marker ([`MARKER_FILE`]) records it
/// (`host:/abs/path`); `None` when the replica has no marker (nothing was ever replicated
/// there, or an older walship's replica).
///
/// # Errors
/// The marker cannot be read or is invalid.
pub(crate) fn replica_database(t: &dyn Backend) -> Result<Option<String>> {
    Ok(read_marker(t)?.map(|m| m.database))
}

/// The replica's marker, `None` when it has none.
///
/// # Errors
/// The marker cannot be read or is invalid.
pub(crate) fn read_marker(t: &dyn Backend) -> Result<Option<Marker>> {
    use std::io::Read;
    let url = t.url();
    let mut r = match t.read(MARKER_FILE) {
        Ok(r) => r,
        Err(e) if e.kind == crate::backend::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut text = String::new();
    r.by_ref()
        .take(64 << 10)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {url}/{MARKER_FILE}"))?;
    let m = Marker::parse(&text).map_err(|e| anyhow!("{url}/{MARKER_FILE}: {e}"))?;
    Ok(Some(m))
}

/// Checks, before any file is read, that `t` is opened as its marker says it is stored
/// (encrypted or plaintext, [`check_marker`]) and that an encrypted one has an identity.
///
/// # Errors
/// The replica is encrypted and `t` is not, or the reverse, or no identity was given (each
/// message says what to give). A marker that cannot be read is only warned about.
pub(crate) fn check_encryption(t: &dyn Backend) -> Result<()> {
    match read_marker(t) {
        Ok(marker) => check_marker(t, marker.as_ref().and_then(|m| m.encryption.as_deref()))?,
        // A damaged marker does not stop a restore (`--allow-other-db` reads past it): each
        // file's header still tells an age file from a plaintext one, and a file of the wrong
        // kind is refused by name.
        Err(e) => warn!("{e:#}: cannot tell from the marker whether the replica is encrypted; each file's header will"),
    }
    t.readable().map_err(|e| anyhow!(e))
}

/// Whether two database paths name the same file: the same text, or the same file (or, for
/// a file that does not exist, the same name in the same directory) once symlinks resolve.
fn same_database(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    let resolve = |p: &Path| {
        std::fs::canonicalize(p).ok().or_else(|| {
            let dir = std::fs::canonicalize(p.parent()?).ok()?;
            Some(dir.join(p.file_name()?))
        })
    };
    matches!((resolve(a), resolve(b)), (Some(x), Some(y)) if x == y)
}

/// Checks that `t` holds the replica of database `db`: its marker's path must name `db`. The
/// marker's host is not compared: restoring onto a new host is what a restore is for. A
/// replica without a marker passes (it holds nothing a restore could use, or predates markers).
///
/// # Errors
/// The replica belongs to another database (the message names both), or its marker cannot be
/// read.
pub(crate) fn check_database(t: &dyn Backend, db: &Path) -> Result<()> {
    let marker = replica_database(t).context(
        "cannot tell which database the replica belongs to (--allow-other-db skips the check)",
    )?;
    let Some(ident) = marker else {
        return Ok(());
    };
    // `host:/path`: host names hold no ':', paths may.
    let path = ident.split_once(':').map_or(ident.as_str(), |(_, p)| p);
    if !same_database(Path::new(path), db) {
        bail!(
            "{} holds the replica of database {ident}, not of {}: refusing it (--allow-other-db to use it anyway)",
            t.url(),
            db.display()
        );
    }
    Ok(())
}

/// What a replica can restore, for `walship list`: from the oldest snapshot of any generation
/// (a point-in-time restore at or after it finds a snapshot) to the end of what a "latest"
/// restore reaches, with the replica's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Restorable {
    /// The oldest snapshot's time (ms since the Unix epoch).
    pub(crate) earliest_ms: u64,
    /// The time of the commit a "latest" restore ends at.
    pub(crate) latest_ms: u64,
    /// That commit.
    pub(crate) latest: Position,
    /// Generations listed (with or without a snapshot).
    pub(crate) generations: usize,
    /// Files listed.
    pub(crate) files: usize,
    /// Their bytes.
    pub(crate) bytes: u64,
}

/// The restorable range of `t` as `listing` shows it (planned from names alone, as a restore
/// plans; the files are not read), or `None` when no generation holds a snapshot. The latest
/// point follows the replica's owner as a "latest" restore does.
pub(crate) fn restorable(t: &dyn Backend, listing: &Listing) -> Option<Restorable> {
    let earliest_ms = listing
        .generations
        .iter()
        .flat_map(|(_, files)| files)
        .filter_map(|(f, _)| match *f {
            FileName::Snapshot { time_ms, .. } => Some(time_ms),
            FileName::Segment { .. } => None,
        })
        .min()?;
    let plan = plan_restore(&owners_view(t, listing.clone()), &Want::Latest).ok()?;
    let (latest_txid, latest_ms) = match plan.segments.last().unwrap_or(&plan.snapshot) {
        FileName::Snapshot { txid, time_ms } => (*txid, *time_ms),
        FileName::Segment { last, last_ms, .. } => (*last, *last_ms),
    };
    let gens: std::collections::BTreeSet<_> = listing.generations.iter().map(|g| g.0).collect();
    Some(Restorable {
        earliest_ms,
        latest_ms,
        latest: Position {
            generation: plan.generation,
            txid: latest_txid,
        },
        generations: gens.len(),
        files: listing.generations.iter().map(|g| g.1.len()).sum(),
        bytes: listing
            .generations
            .iter()
            .flat_map(|g| &g.1)
            .map(|f| f.1)
            .sum(),
    })
}

/// The error for a replica root that does not exist: a wrong URL, or nothing replicated yet.
pub(crate) fn missing_root(t: &dyn Backend) -> anyhow::Error {
    anyhow!(
        "{} does not exist (a wrong URL, or nothing was ever replicated there)",
        t.url()
    )
}

/// One decoded record, as handed from the reader to the applier.
enum Item {
    /// A new file begins, with its page size.
    File(FileName, u32),
    /// A page: its number and where its bytes start in [`Chunk::data`] (a page-size run).
    Page(u32, usize),
    Commit(Commit),
}

/// A run of decoded records handed over as one message: one channel hand-off per ~1 MiB of
/// pages or [`CHUNK_ITEMS`] records rather than per commit (with one message per commit, the
/// two threads spent most of a long replay waking each other).
#[derive(Default)]
struct Chunk {
    items: Vec<Item>,
    data: Vec<u8>,
}

/// Records per [`Chunk`] at most (a commit record is ~30 bytes: this bounds a chunk of
/// page-less commits).
const CHUNK_ITEMS: usize = 8192;
/// Page bytes per [`Chunk`] before it is handed over.
const CHUNK_BYTES: usize = 1 << 20;

/// How often one restore attempt lists a generation again to follow segments that compaction
/// merged away while it ran (each time, the merged segment continues the chain).
const FOLLOW_LIMIT: u32 = 64;

/// Opens a planned segment; if it is gone (merged away by a running walship's compaction),
/// lists the generation again and replaces the rest of the plan (`rest`, `f` first) with the
/// segments that carry the restore on from `covered` to `target`, then opens the first of
/// them. Errors with the original `NotFound` when nothing continues the chain (retention, a
/// new generation): [`restore_into`] then starts over from a new listing.
fn open_following(
    t: &dyn Backend,
    g: &GenerationId,
    rest: &mut std::collections::VecDeque<FileName>,
    covered: u64,
    target: u64,
    follows: &mut u32,
) -> Result<Option<(FileName, Box<dyn std::io::Read + Send>)>> {
    loop {
        let Some(f) = rest.pop_front() else {
            return Ok(None);
        };
        let err = match t.read(&file_path(g, &f)) {
            Ok(src) => return Ok(Some((f, src))),
            Err(e) => e,
        };
        let is_segment = matches!(f, FileName::Segment { .. });
        if err.kind != crate::backend::ErrorKind::NotFound
            || !is_segment
            || *follows >= FOLLOW_LIMIT
        {
            return Err(err.into());
        }
        *follows += 1;
        let files: Vec<FileName> = t
            .list(&generation_dir(g))?
            .into_iter()
            .filter_map(|e| FileName::parse(&e.name).ok())
            .collect();
        let Some(next) = plan_continuation(&files, covered, target) else {
            return Err(err.into());
        };
        info!(
            "{}/{}: gone (merged by compaction?); going on from txid {covered} with {} file(s) listed again",
            t.url(),
            file_path(g, &f),
            next.len()
        );
        *rest = next.into();
    }
}

/// Streams the plan's files as chunks of records, ending early when the applier hangs up
/// (it reached the stop txid). A planned segment that vanished before it was opened is
/// followed into what compaction merged it into (see [`open_following`]).
fn reader(
    t: &dyn Backend,
    g: GenerationId,
    files: Vec<FileName>,
    target: u64,
    tx: SyncSender<Result<Chunk>>,
    free: Receiver<Chunk>,
) {
    let next = || free.try_recv().unwrap_or_default();
    let mut chunk = next();
    let mut rest: std::collections::VecDeque<FileName> = files.into();
    // The last txid of the files read so far: where a continuation starts.
    let mut covered = 0u64;
    let mut follows = 0u32;
    loop {
        let (f, src) = match open_following(t, &g, &mut rest, covered, target, &mut follows) {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Ok(std::mem::take(&mut chunk)));
                let _ = tx.send(Err(e));
                return;
            }
        };
        let path = file_path(&g, &f);
        let label = format!("{}/{path}", t.url());
        let mut reached = f.last_txid();
        let r = (|| -> Result<bool> {
            let kind = match f {
                FileName::Snapshot { .. } => Kind::Snapshot,
                FileName::Segment { .. } => Kind::Segment,
            };
            let mut dec = Decoder::new(std::io::BufReader::with_capacity(1 << 20, src), kind)
                .map_err(|e| anyhow!("{label}: {e}"))?;
            chunk.items.push(Item::File(f, dec.page_size()));
            // Records of a part after the file's named range, held back until its end record
            // is verified: only whole parts are applied there (a torn one is not an error, and
            // the applier cannot take back pages it wrote).
            let mut held = Chunk::default();
            let mut seen = None;
            loop {
                let (rec, done) = match dec.next_placed() {
                    Ok(Some(x)) => x,
                    Ok(None) => {
                        // The input's end, right after a verified part.
                        release(&mut chunk, &mut held);
                        let end = dec.last_complete().map_or(0, |c| c.txid);
                        if end < f.last_txid() {
                            bail!(
                                "{label}: the file ends at txid {end}, its name says it holds up to txid {}",
                                f.last_txid()
                            );
                        }
                        reached = reached.max(end);
                        break;
                    }
                    Err(e) => {
                        let done = dec.last_complete();
                        if done != seen {
                            release(&mut chunk, &mut held);
                            reached = reached.max(done.map_or(0, |c| c.txid));
                        }
                        ends_content(&f, done, &label, e)?;
                        break;
                    }
                };
                if done != seen {
                    seen = done;
                    release(&mut chunk, &mut held);
                    reached = reached.max(done.map_or(0, |c| c.txid));
                }
                let beyond = matches!(f, FileName::Segment { last, .. } if done.is_some_and(|c| c.txid >= last));
                let to = if beyond { &mut held } else { &mut chunk };
                match rec {
                    Record::Page { pgno, data } => {
                        to.items.push(Item::Page(pgno, to.data.len()));
                        to.data.extend_from_slice(data);
                    }
                    Record::Commit(c) => to.items.push(Item::Commit(c)),
                }
                // Records count too (a part of commits without pages holds no page bytes).
                if held.data.len() + held.items.len() * 64 > HELD_BYTES {
                    warn!(
                        "{label}: a part after txid {} (the end of the file's name) holds over {HELD_BYTES} bytes: not applied",
                        f.last_txid()
                    );
                    break;
                }
                if (chunk.data.len() >= CHUNK_BYTES || chunk.items.len() >= CHUNK_ITEMS)
                    && tx.send(Ok(std::mem::replace(&mut chunk, next()))).is_err()
                {
                    return Ok(false);
                }
            }
            Ok(true)
        })();
        match r {
            Ok(true) => covered = covered.max(reached),
            Ok(false) => return,
            Err(e) => {
                // What was decoded before the error is applied first, so that the error is
                // reported where it happened (and a stop txid before it still succeeds).
                let _ = tx.send(Ok(std::mem::take(&mut chunk)));
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
    if !chunk.items.is_empty() {
        let _ = tx.send(Ok(chunk));
    }
}

/// Bytes of one part after a file's named range (pages, and 64 per record) that the reader
/// holds until the part is verified; a larger part is left out (the name is a lower bound:
/// what it promises is applied all the same).
const HELD_BYTES: usize = 64 << 20;

/// Moves the records held back in `held` (parts now verified) to the end of `chunk`.
fn release(chunk: &mut Chunk, held: &mut Chunk) {
    let base = chunk.data.len();
    chunk.items.extend(held.items.drain(..).map(|i| match i {
        Item::Page(pgno, start) => Item::Page(pgno, base + start),
        other => other,
    }));
    chunk.data.append(&mut held.data);
}

/// What an error `e` while reading file `f` (named `label`) means, given `done`, the last
/// commit of the parts of the file verified before it. In a segment whose parts up to its
/// name's last txid were verified, a part after them that is torn (a reader raced an append,
/// or a crash cut it) or damaged ends the file's content: not an error (logged at debug and
/// warn level). Anything else is an error naming the file: damage inside the named range, a
/// read error (which says nothing about the file), a snapshot with anything after it.
///
/// # Errors
/// `e`, with the file's name, when it is not the end of a segment's content.
pub(crate) fn ends_content(
    f: &FileName,
    done: Option<Commit>,
    label: &str,
    e: LayoutError,
) -> Result<()> {
    let (Some(torn), Some(done)) = (ends_past_name(f, done, &e), done) else {
        return Err(anyhow!("{label}: {e}"));
    };
    if torn {
        debug!(
            "{label}: the part after txid {} is incomplete ({e}): the file ends there for now",
            done.txid
        );
    } else {
        warn!(
            "{label}: ignoring the part after txid {} (the file's name ends at txid {}): {e}",
            done.txid,
            f.last_txid()
        );
    }
    Ok(())
}

/// The txid a plan stops at, resolving a time to the newest commit at or before it.
fn stop_txid(t: &dyn Backend, plan: &Plan) -> Result<u64> {
    let chain_end = plan.segments.last().unwrap_or(&plan.snapshot).last_txid();
    match plan.stop {
        Stop::Latest => Ok(chain_end),
        Stop::Txid(x) => Ok(x),
        Stop::TimeMs(ms) => {
            let mut best = plan.snapshot.last_txid();
            for s in &plan.segments {
                if let FileName::Segment {
                    first_ms,
                    last_ms,
                    last,
                    ..
                } = *s
                {
                    if last_ms <= ms {
                        best = best.max(last);
                    } else if first_ms <= ms {
                        // Straddles the time: read its commits.
                        let path = file_path(&plan.generation, s);
                        let mut dec = Decoder::new(t.read(&path)?, Kind::Segment)
                            .map_err(|e| anyhow!("{}/{path}: {e}", t.url()))?;
                        while let Some(rec) =
                            dec.next().map_err(|e| anyhow!("{}/{path}: {e}", t.url()))?
                        {
                            if let Record::Commit(c) = rec {
                                // The named range only: the plan reaches no further.
                                if c.time_ms <= ms && c.txid <= last {
                                    best = best.max(c.txid);
                                }
                                if c.time_ms > ms || c.txid >= last {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            Ok(best)
        }
    }
}

/// The listing as the replica's owner left it, for a "latest" restore: the newest owner claim
/// (see [`crate::layout::owner`]) names the generation its instance writes; generations newer
/// than that one were written by an instance that had been taken over (it stops at its next
/// check, up to `replicate::owner::CLAIM_CHECK` later) and are left out, with a warning. The
/// listing is returned whole when there is no claim (a replica of an older walship), when the
/// claim names no generation or one without a snapshot, or when it cannot be read (claims
/// only choose among generations; every file restored is still verified).
fn owners_view(t: &dyn Backend, listing: Listing) -> Listing {
    owners_view_told(t, listing, &mut |m| warn!("{m}"))
}

/// [`owners_view`], with its warnings handed to `warn` (a follower repeats the view every poll
/// and says each warning once).
fn owners_view_told(
    t: &dyn Backend,
    mut listing: Listing,
    warn: &mut dyn FnMut(String),
) -> Listing {
    let (name, claim) = match crate::replicate::owner::newest_claim(t) {
        Ok(Some(c)) => c,
        Ok(None) => return listing,
        Err(e) => {
            warn(format!("ignoring the replica's owner claim: {e:#}"));
            return listing;
        }
    };
    let Some(owned) = claim.generation else {
        return listing;
    };
    let has_snapshot = listing.generations.iter().any(|(g, files)| {
        *g == owned
            && files
                .iter()
                .any(|(f, _)| matches!(f, FileName::Snapshot { .. }))
    });
    if !has_snapshot {
        warn(format!(
            "{}/{name}: the owner's generation {owned} has no snapshot; restoring the newest generation that has one",
            t.url()
        ));
        return listing;
    }
    listing.generations.retain(|(g, _)| {
        let keep = *g <= owned;
        if !keep {
            warn(format!(
                "{}: ignoring generation {g}, newer than generation {owned} of the replica's owner (instance {}, host {}): written by an instance that was taken over",
                t.url(),
                claim.instance,
                claim.host
            ));
        }
        keep
    });
    listing
}

/// Refuses to call a restore "latest" when the replica holds newer data the plan cannot reach:
/// a newer generation without a snapshot, or segments beyond a gap.
fn check_latest_complete(t: &dyn Backend, listing: &Listing, plan: &Plan, end: u64) -> Result<()> {
    if let Some((g, _)) = listing
        .generations
        .iter()
        .filter(|(g, files)| *g > plan.generation && !files.is_empty())
        .max_by_key(|(g, _)| *g)
    {
        bail!(
            "{}/{}: this newer generation has no snapshot (missing file?): refusing to restore the older generation {} as the latest",
            t.url(),
            generation_dir(g),
            plan.generation
        );
    }
    let files = listing
        .generations
        .iter()
        .find(|(g, _)| *g == plan.generation)
        .map(|(_, f)| f.as_slice())
        .unwrap_or_default();
    let beyond = files
        .iter()
        .filter_map(|(f, _)| match *f {
            FileName::Segment { first, last, .. } if last > end => Some((first, last)),
            _ => None,
        })
        .min();
    if let Some((first, last)) = beyond {
        let path = generation_dir(&plan.generation);
        if first > end + 1 {
            bail!(
                "{}/{path}: segments for txids {}..{} are missing (the replica continues at {first}..{last}): refusing to restore an older state as the latest",
                t.url(),
                end + 1,
                first - 1
            );
        }
        bail!(
            "{}/{path}: the replica holds txids up to {last} but they cannot be chained after txid {end}",
            t.url()
        );
    }
    Ok(())
}

/// How many times a restore plans from a new listing when an attempt failed while the replica
/// changed under it.
const ATTEMPTS: u32 = 8;

/// Restores from one replica into `tmp` (which must not exist). Returns what was restored.
///
/// A replica that a running walship keeps compacting and pruning changes while it is read:
/// a listing is not a snapshot of one moment (it may miss both a merged segment written while
/// it ran and the inputs deleted meanwhile: plans use two listings merged, [`list_settled`]),
/// and a planned file may be gone when it is read.
/// A vanished segment is followed into the segment it was merged into; any other failure is
/// final only if the replica did not change meanwhile (a new listing equals the one planned
/// from): otherwise the restore starts over from the new listing, up to `ATTEMPTS` times.
/// A file missing from a replica that does not change is a gap, reported at once.
///
/// # Errors
/// Any fetch, decode, checksum or consistency error, naming the file.
pub fn restore_into(t: &dyn Backend, want: &Want, tmp: &Path) -> Result<Restored> {
    check_encryption(t)?;
    let mut listing = list_settled(t)?;
    if listing.generations.is_empty() && !t.root_exists()? {
        return Err(missing_root(t));
    }
    let mut attempt = 1;
    loop {
        let e = match restore_once(t, want, tmp, &listing) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        let _ = std::fs::remove_file(tmp);
        if attempt >= ATTEMPTS {
            return Err(e);
        }
        // A listing that fails now says nothing about the first error: report that one.
        let Ok(fresh) = list_settled(t) else {
            return Err(e);
        };
        if fresh == listing {
            return Err(e);
        }
        info!("{e:#}: the replica changed while restoring (compaction or retention by a running walship); planning again from a new listing");
        // Let a burst of compaction or retention finish.
        std::thread::sleep(std::time::Duration::from_millis(20 * u64::from(attempt)));
        listing = fresh;
        attempt += 1;
    }
}

/// Two listings of `t` taken one after the other, merged: every generation and file that
/// either shows. One listing is not a picture of one moment: `readdir` may miss both a segment
/// that compaction wrote while it ran and the inputs deleted meanwhile, and a plan from it
/// would silently end earlier than the replica did (a "latest" restore older than the one
/// before it). The second listing, taken after, shows the merged segment (or what it was
/// merged into). A file the first showed and that is gone by the time it is read is followed
/// or re-planned as any vanished file (see [`restore_into`]).
///
/// # Errors
/// Backend errors.
fn list_settled(t: &dyn Backend) -> Result<Listing> {
    let first = list_replica(t)?;
    let second = list_replica(t)?;
    let mut merged: std::collections::BTreeMap<
        GenerationId,
        std::collections::BTreeMap<FileName, u64>,
    > = std::collections::BTreeMap::new();
    for (g, files) in first.generations.into_iter().chain(second.generations) {
        merged.entry(g).or_default().extend(files);
    }
    Ok(Listing {
        generations: merged
            .into_iter()
            .map(|(g, files)| (g, files.into_iter().collect()))
            .collect(),
    })
}

fn restore_once(t: &dyn Backend, want: &Want, tmp: &Path, listing: &Listing) -> Result<Restored> {
    let owned;
    let listing = if matches!(want, Want::Latest) {
        owned = owners_view(t, listing.clone());
        &owned
    } else {
        listing
    };
    let plan = plan_restore(listing, want).map_err(|e| match e {
        LayoutError::TooEarly { want, oldest } => anyhow!(
            "{}: nothing to restore at or before {}: the oldest snapshot is at {}",
            t.url(),
            rfc3339(want),
            rfc3339(oldest)
        ),
        e => anyhow!("{}: {e}", t.url()),
    })?;
    let target_txid = stop_txid(t, &plan)?;
    // A latest restore applies what the files hold, which may go beyond their names.
    let exact = !matches!(plan.stop, Stop::Latest);
    if !exact {
        check_latest_complete(t, listing, &plan, target_txid)?;
    }
    let mut files = vec![plan.snapshot];
    files.extend(plan.segments.iter().copied());
    let nfiles = files.len();
    info!(
        "restoring {} from {} file(s) of generation {} up to txid {target_txid}",
        t.url(),
        nfiles,
        plan.generation
    );
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let (tx, rx) = sync_channel::<Result<Chunk>>(2);
    // Applied chunks go back to the reader for reuse: no allocation (and page faults) per chunk.
    let (free_tx, free_rx) = sync_channel::<Chunk>(4);
    let g = plan.generation;
    let restored = std::thread::scope(|s| {
        s.spawn(|| reader(t, g, files, target_txid, tx, free_rx));
        let r = apply(&rx, &free_tx, &out, target_txid, exact, &t.url(), &g);
        drop(rx);
        r
    })?;
    out.sync_all()
        .with_context(|| format!("cannot sync {}", tmp.display()))?;
    Ok(Restored {
        url: t.url(),
        files: nfiles,
        ..restored
    })
}

/// Bytes of pages the applier holds before writing them out.
const WRITE_BACK_BYTES: usize = 2 << 20;
/// Buffers per `pwritev` (Linux accepts 1024).
const IOV_MAX: usize = 512;

/// The applier's pages on their way to the restored file: the newest version of each page is
/// held, and all are written, in page order, a run of consecutive pages per `pwritev`, when
/// [`WRITE_BACK_BYTES`] are held and at the end. A replay rewrites the same pages commit after
/// commit (an append-only table rewrites its last leaf page with every row); only the last
/// version of each needs to reach the file. Nothing here is durable until the caller's fsync.
struct WriteBack<'a> {
    out: &'a File,
    page_size: usize,
    pages: std::collections::HashMap<u32, Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

impl<'a> WriteBack<'a> {
    fn new(out: &'a File) -> Self {
        WriteBack {
            out,
            page_size: 0,
            pages: std::collections::HashMap::new(),
            spare: Vec::new(),
        }
    }

    /// Holds `data` as page `pgno` (all pages have one size, checked by the caller).
    fn put(&mut self, pgno: u32, data: &[u8]) -> std::io::Result<()> {
        self.page_size = data.len();
        if let Some(b) = self.pages.get_mut(&pgno) {
            b.clear();
            b.extend_from_slice(data);
            return Ok(());
        }
        if (self.pages.len() + 1) * self.page_size > WRITE_BACK_BYTES {
            self.flush()?;
        }
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(data);
        self.pages.insert(pgno, b);
        Ok(())
    }

    /// Writes every held page and forgets them.
    fn flush(&mut self) -> std::io::Result<()> {
        let mut held: Vec<(u32, Vec<u8>)> = self.pages.drain().collect();
        held.sort_unstable_by_key(|(pgno, _)| *pgno);
        let mut i = 0;
        while i < held.len() {
            let first = held[i].0;
            let mut n = 1;
            while i + n < held.len() && n < IOV_MAX && held[i + n].0 == first + n as u32 {
                n += 1;
            }
            let mut iov: Vec<IoSlice> = held[i..i + n]
                .iter()
                .map(|(_, b)| IoSlice::new(b))
                .collect();
            let off = u64::from(first - 1) * self.page_size as u64;
            pwritev_all(self.out, &mut iov, off)?;
            i += n;
        }
        self.spare.extend(held.into_iter().map(|(_, b)| b));
        Ok(())
    }
}

/// `pwritev` until every byte of `bufs` is written at `off`.
fn pwritev_all(out: &File, mut bufs: &mut [IoSlice], mut off: u64) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let off_t = i64::try_from(off).map_err(|_| std::io::Error::other("offset overflow"))?;
        match nix::sys::uio::pwritev(out, bufs, off_t) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                off += n as u64;
                IoSlice::advance_slices(&mut bufs, n);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Applies the reader's chunks to `out` up to commit `target` (`exact`), or to the end of the
/// files but at least to `target` (a latest restore: a file may hold more than its name says),
/// checking every commit's whole-database checksum; applied chunks go back on `free` for reuse.
fn apply(
    rx: &Receiver<Result<Chunk>>,
    free: &SyncSender<Chunk>,
    out: &File,
    target: u64,
    exact: bool,
    url: &str,
    g: &GenerationId,
) -> Result<Restored> {
    let mut a = Applier::new(out, url, g);
    'chunks: for chunk in rx.iter() {
        let mut chunk = chunk?;
        for item in chunk.items.drain(..) {
            match item {
                Item::File(f, ps) => a.file(f, ps)?,
                Item::Page(pgno, start) => a.page(pgno, &chunk.data, start)?,
                Item::Commit(c) => {
                    if a.commit(c)? && exact && c.txid >= target {
                        break 'chunks;
                    }
                }
            }
        }
        chunk.data.clear();
        let _ = free.try_send(chunk);
    }
    a.finish(out, target, exact)
}

/// The applier's state: the pages and their hashes so far, the last commit applied, and
/// where it is in the current file. Files overlap where compaction merged segments: commits
/// already applied are skipped with their pages.
struct Applier<'a> {
    url: &'a str,
    g: &'a GenerationId,
    pages: WriteBack<'a>,
    hashes: Option<PageHashes>,
    page_size: u32,
    applied: Option<u64>,
    last_commit: Option<Commit>,
    current: Option<FileName>,
    next_in_file: u64,
    skipping: bool,
}

impl<'a> Applier<'a> {
    fn new(out: &'a File, url: &'a str, g: &'a GenerationId) -> Self {
        Applier {
            url,
            g,
            pages: WriteBack::new(out),
            hashes: None,
            page_size: 0,
            applied: None,
            last_commit: None,
            current: None,
            next_in_file: 0,
            skipping: false,
        }
    }

    /// The replica path of `f`, for errors ("" before the first file).
    fn label(&self, f: Option<FileName>) -> String {
        f.map_or_else(String::new, |f| {
            format!("{}/{}", self.url, file_path(self.g, &f))
        })
    }

    /// A new file begins: it must have the snapshot's page size and continue the commits.
    fn file(&mut self, f: FileName, ps: u32) -> Result<()> {
        if self.page_size != 0 && ps != self.page_size {
            bail!(
                "{}: page size {ps} differs from the snapshot's {}",
                self.label(Some(f)),
                self.page_size
            );
        }
        self.page_size = ps;
        let first = f.first_txid();
        if let Some(a) = self.applied {
            if first > a + 1 {
                bail!(
                    "{}: gap in the replica: txids {}..{} are missing",
                    self.label(Some(f)),
                    a + 1,
                    first - 1
                );
            }
        }
        self.current = Some(f);
        self.next_in_file = first;
        self.skipping = self.applied.is_some_and(|a| self.next_in_file <= a);
        self.hashes.get_or_insert_with(|| PageHashes::new(ps));
        Ok(())
    }

    /// Page `pgno`, whose bytes start at `start` in `data`.
    fn page(&mut self, pgno: u32, data: &[u8], start: usize) -> Result<()> {
        if self.skipping {
            return Ok(());
        }
        let page_size = self.page_size;
        let h = self
            .hashes
            .as_mut()
            .ok_or_else(|| anyhow!("internal: pages before a file"))?;
        let data = data
            .get(start..start + page_size as usize)
            .ok_or_else(|| anyhow!("internal: page beyond its chunk"))?;
        let off = u64::from(pgno - 1) * u64::from(page_size);
        if off + u64::from(page_size) > MAX_DB_BYTES {
            bail!(
                "{}: page {pgno} is beyond the {MAX_DB_BYTES}-byte limit",
                self.label(self.current)
            );
        }
        self.pages
            .put(pgno, data)
            .context("cannot write the restored database")?;
        h.set(pgno, data);
        Ok(())
    }

    /// A commit: the next one the file's name promises. Returns whether it was applied (not
    /// skipped), after checking the database checksum it records.
    fn commit(&mut self, c: Commit) -> Result<bool> {
        if c.txid != self.next_in_file {
            bail!(
                "{}: commit txid {} where {} was expected from the file name",
                self.label(self.current),
                c.txid,
                self.next_in_file
            );
        }
        self.next_in_file += 1;
        if self.skipping {
            self.skipping = self.applied.is_some_and(|a| self.next_in_file <= a);
            return Ok(false);
        }
        if u64::from(c.db_pages) * u64::from(self.page_size) > MAX_DB_BYTES {
            bail!(
                "{}: database size of {} pages is beyond the limit",
                self.label(self.current),
                c.db_pages
            );
        }
        let h = self
            .hashes
            .as_mut()
            .ok_or_else(|| anyhow!("internal: commit before a file"))?;
        h.set_size(c.db_pages);
        let sum = h.db_checksum();
        if sum != c.db_checksum {
            bail!(
                "{}: checksum mismatch at txid {}: the restored database hashes to {sum:016x}, the replica recorded {:016x}",
                self.label(self.current),
                c.txid,
                c.db_checksum
            );
        }
        self.applied = Some(c.txid);
        self.last_commit = Some(c);
        Ok(true)
    }

    /// Checks that the restore reached `target` (exactly, or at least), writes the held pages
    /// and sizes `out`.
    fn finish(mut self, out: &File, target: u64, exact: bool) -> Result<Restored> {
        let url = self.url;
        let c = self
            .last_commit
            .ok_or_else(|| anyhow!("{url}: nothing was restored"))?;
        if c.txid < target || (exact && c.txid != target) {
            bail!("{url}: the replica ends at txid {} but txid {target} was planned (missing or truncated files)", c.txid);
        }
        self.pages
            .flush()
            .context("cannot write the restored database")?;
        out.set_len(u64::from(c.db_pages) * u64::from(self.page_size))
            .context("cannot size the restored database")?;
        Ok(Restored {
            url: url.to_owned(),
            position: Position {
                generation: *self.g,
                txid: c.txid,
            },
            time_ms: c.time_ms,
            db_pages: c.db_pages,
            page_size: self.page_size,
            db_checksum: c.db_checksum,
            files: 0,
        })
    }
}

/// Runs `PRAGMA integrity_check` on a restored file without creating files beside it.
///
/// # Errors
/// The check fails or reports problems.
pub(crate) fn integrity_check(path: &Path) -> Result<()> {
    let uri = format!("file:{}?immutable=1", path.display());
    let c = rusqlite::Connection::open_with_flags(
        &uri,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )
    .with_context(|| format!("cannot open restored database {}", path.display()))?;
    let mut stmt = c.prepare("PRAGMA integrity_check")?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()
        .with_context(|| format!("integrity check of {} failed", path.display()))?;
    if rows != ["ok"] {
        bail!(
            "integrity check of the restored database failed: {}",
            rows.join("; ")
        );
    }
    Ok(())
}

/// Options of `walship restore`.
#[derive(Debug, Clone)]
pub(crate) struct RestoreOptions {
    /// Which state to restore.
    pub(crate) want: Want,
    /// Overwrite an existing output.
    pub(crate) force: bool,
    /// The database the replicas must belong to (see [`check_database`]); `None` restores
    /// whatever they hold.
    pub(crate) database: Option<PathBuf>,
}

/// What is at a restore's output path (not following a symlink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    /// Nothing: the restore creates it.
    Missing,
    /// A regular file: replaced only with `--force`.
    RegularFile,
    /// Anything else, described for messages ("a symbolic link to /x", "a directory"...):
    /// a restore never replaces it.
    Other(String),
}

/// Looks at `path` with `lstat`: a symlink is reported as one, never followed.
///
/// # Errors
/// `path` cannot be examined (other than not existing).
pub(crate) fn inspect_output(path: &Path) -> Result<Output> {
    use std::os::unix::fs::FileTypeExt;
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Output::Missing),
        Err(e) => return Err(e).with_context(|| format!("cannot examine {}", path.display())),
    };
    let ft = md.file_type();
    Ok(if ft.is_file() {
        Output::RegularFile
    } else if ft.is_symlink() {
        match std::fs::read_link(path) {
            Ok(to) => Output::Other(format!("a symbolic link to {}", to.display())),
            Err(_) => Output::Other("a symbolic link".into()),
        }
    } else if ft.is_dir() {
        Output::Other("a directory".into())
    } else if ft.is_char_device() {
        Output::Other("a character device".into())
    } else if ft.is_block_device() {
        Output::Other("a block device".into())
    } else if ft.is_fifo() {
        Output::Other("a FIFO".into())
    } else if ft.is_socket() {
        Output::Other("a socket".into())
    } else {
        Output::Other("not a regular file".into())
    })
}

/// The error for an output path that a restore never replaces.
fn not_replaceable(path: &Path, what: &str) -> anyhow::Error {
    anyhow!(
        "cannot restore to {}: it is {what}; restore only creates a new file or replaces a regular file (with --force)",
        path.display()
    )
}

/// SQLite's files beside a database: a restore removes stale ones before its rename.
fn siblings(out: &Path) -> Vec<PathBuf> {
    ["-wal", "-shm", "-journal"]
        .iter()
        .map(|suffix| {
            let mut p = out.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        })
        .collect()
}

/// Checks that a restore may write `out`: nothing there, or a regular file and `force`; and
/// SQLite's files beside it, which the restore removes, are regular files if they exist.
///
/// # Errors
/// Anything else at `out` or beside it, named with what it is; an existing file without force.
fn check_output(out: &Path, force: bool) -> Result<()> {
    match inspect_output(out)? {
        Output::Missing => {}
        Output::RegularFile if force => {}
        Output::RegularFile => bail!(
            "{} already exists: refusing to overwrite it (use --force)",
            out.display()
        ),
        Output::Other(what) => return Err(not_replaceable(out, &what)),
    }
    for p in siblings(out) {
        if let Output::Other(what) = inspect_output(&p)? {
            return Err(not_replaceable(&p, &what));
        }
    }
    Ok(())
}

/// Restores into `out` from the first replica that works, trying the next on failure.
///
/// `out` is only ever created or, with `force`, replaced when it is a regular file: a symlink,
/// directory, device, FIFO or socket there fails at once, before anything is read or written
/// (and again just before the final rename, should one appear meanwhile). The temporary file
/// is removed on every failure.
///
/// # Errors
/// The output exists (without force) or is not a regular file, or every replica failed (each
/// reason listed).
pub(crate) fn restore(
    targets: &[(String, Box<dyn Backend>)],
    opts: &RestoreOptions,
    out: &Path,
) -> Result<Restored> {
    check_output(out, opts.force)?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot restore to {}: directory {} does not exist",
            out.display(),
            dir.display()
        );
    }
    // Said before anything is downloaded: the temporary file and the rename need it.
    match nix::unistd::access(
        &dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    ) {
        Ok(()) => {}
        Err(nix::errno::Errno::EROFS) => bail!(
            "cannot restore to {}: the filesystem holding {} is mounted read-only",
            out.display(),
            dir.display()
        ),
        Err(e) => bail!(
            "cannot restore to {}: the directory {} is not writable by uid {} ({})",
            out.display(),
            dir.display(),
            nix::unistd::geteuid(),
            e.desc()
        ),
    }
    let mut errors = Vec::new();
    for (name, t) in targets {
        let tmp = RemoveOnDrop::new(dir.join(temp_name()));
        let r = opts
            .database
            .as_deref()
            .map_or(Ok(()), |db| check_database(t.as_ref(), db))
            .and_then(|()| restore_into(t.as_ref(), &opts.want, tmp.path()))
            .and_then(|r| {
                integrity_check(tmp.path())?;
                Ok(r)
            });
        match r {
            Ok(r) => {
                check_output(out, opts.force)?;
                install(tmp, out, &dir)?;
                return Ok(r);
            }
            Err(e) => {
                drop(tmp);
                if targets.len() > 1 {
                    warn!(
                        "replica {name} ({}) failed: {e:#}; trying the next one",
                        t.url()
                    );
                }
                errors.push(format!("{e:#}"));
            }
        }
    }
    match errors.len() {
        0 => bail!("no replica configured"),
        1 => Err(anyhow!(errors.remove(0))),
        _ => bail!("every replica failed: {}", errors.join(" | ")),
    }
}

/// Moves a verified temporary file into place: owner like the directory (when root), stale
/// `-wal`/`-shm` of a forced overwrite removed first, rename, directory fsync. The temporary
/// file is gone afterwards, whatever happens.
fn install(tmp: RemoveOnDrop, out: &Path, dir: &Path) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        if let Ok(md) = std::fs::metadata(dir) {
            let _ = nix::unistd::chown(
                tmp.path(),
                Some(nix::unistd::Uid::from_raw(md.uid())),
                Some(nix::unistd::Gid::from_raw(md.gid())),
            );
        }
    }
    for p in siblings(out) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove stale {}", p.display()));
            }
        }
    }
    std::fs::rename(tmp.path(), out)
        .with_context(|| format!("cannot move the restored database to {}", out.display()))?;
    tmp.keep();
    fsync_dir(dir).with_context(|| format!("cannot sync directory {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A latest restore follows the newest claim's generation: newer generations (of an
    /// instance that was taken over) are left out; without a usable claim nothing is.
    #[test]
    fn latest_follows_the_owner() {
        use crate::layout::owner::InstanceId;
        use crate::replicate::owner::Ownership;
        let dir = tempfile::tempdir().expect("tempdir");
        let t = crate::backend::file::FileBackend::new(dir.path());
        let g = |ms| GenerationId { ms, rand: 1 };
        let snap = (
            FileName::Snapshot {
                txid: 1,
                time_ms: 1,
            },
            10,
        );
        let seg = (FileName::one_commit(2, 2), 10);
        let listing = Listing {
            generations: vec![
                (g(1), vec![snap, seg]),
                (g(2), vec![snap]),
                (g(3), vec![snap, seg]),
                (g(4), vec![seg]),
            ],
        };
        let kept = |l: &Listing| l.generations.iter().map(|x| x.0.ms).collect::<Vec<_>>();
        // No claim (an older walship's replica): everything.
        assert_eq!(kept(&owners_view(&t, listing.clone())), [1, 2, 3, 4]);
        let mut owner = Ownership::new(InstanceId(5), "h:/db".into());
        owner.before_write(&t, g(2)).expect("claim");
        assert_eq!(kept(&owners_view(&t, listing.clone())), [1, 2]);
        let plan = plan_restore(&owners_view(&t, listing.clone()), &Want::Latest).expect("plan");
        assert_eq!(plan.generation, g(2));
        // The owner's generation has no snapshot yet (claimed, not written): everything.
        owner.before_write(&t, g(4)).expect("claim");
        assert_eq!(kept(&owners_view(&t, listing.clone())), [1, 2, 3, 4]);
    }

    /// Pages put in any order, rewritten, in runs longer than one `pwritev` and past the
    /// write-back limit, land in the file exactly as the last version of each.
    #[test]
    fn write_back_writes_the_last_version_of_every_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let out = File::create(&path).expect("create");
        let ps = 4096usize;
        let npages = 3000u32; // 12 MiB: past WRITE_BACK_BYTES, runs past IOV_MAX
        let mut want = vec![0u8; npages as usize * ps];
        let mut wb = WriteBack::new(&out);
        let mut x = 12345u64;
        for round in 0..4u8 {
            for i in 0..npages {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // every page once in order per round, and a random page again
                for pgno in [i + 1, (x >> 33) as u32 % npages + 1] {
                    let fill = round.wrapping_mul(31).wrapping_add(pgno as u8);
                    let data = vec![fill; ps];
                    wb.put(pgno, &data).expect("put");
                    want[(pgno as usize - 1) * ps..pgno as usize * ps].copy_from_slice(&data);
                }
            }
        }
        wb.flush().expect("flush");
        drop(wb);
        assert!(std::fs::read(&path).expect("read") == want);
    }
}
