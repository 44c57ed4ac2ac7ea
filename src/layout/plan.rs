//! Planning from a listing alone: what to fetch for a restore, what to merge, what to delete.
//!
//! Nothing here reads a file's content: every decision follows from the names (and sizes) in a
//! [`Listing`], so it can be made before any download and tested exhaustively. A segment's name
//! is a lower bound of its content (see [`super`]): a file holding more than its name says only
//! gives a reader more commits, which overlap the next file of the chain like a compacted
//! segment does (the applier skips those it applied); a plan never counts on them.
//!
//! Invariants kept:
//! - A restore plan's segments form a chain: the first contains `snapshot.txid + 1`, each next one
//!   contains the txid after the previous one's last. (Compacted segments may overlap; the applier
//!   skips commits it already applied.)
//! - Retention never deletes the current generation's newest snapshot, nor anything needed to
//!   restore a point inside the retention window.
//! - Every function terminates in O(n log n) (restore: per snapshot tried) for n files, whatever
//!   the listing holds, and never panics.

use super::names::{FileName, GenerationId, Position};
use super::LayoutError;
use std::collections::{BTreeMap, BTreeSet};

/// What a replica holds: each generation with its files and their sizes in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Listing {
    /// Generations in any order; a generation listed twice counts once with all its files.
    pub generations: Vec<(GenerationId, Vec<(FileName, u64)>)>,
}

/// What the user asks to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The newest commit of the newest generation.
    Latest,
    /// Exactly this commit.
    Position(Position),
    /// The newest commit at or before this time (ms since the Unix epoch).
    TimeMs(u64),
}

/// Where the applier stops applying commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// After the last commit of the last segment.
    Latest,
    /// After the commit with this txid.
    Txid(u64),
    /// After the last commit whose time is at or before this (ms since the Unix epoch).
    TimeMs(u64),
}

/// What to fetch and apply, in order, for a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The generation restored from.
    pub generation: GenerationId,
    /// The snapshot to start from.
    pub snapshot: FileName,
    /// The segments to apply after it, in order.
    pub segments: Vec<FileName>,
    /// Where to stop.
    pub stop: Stop,
}

/// One thing retention deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Deletion {
    /// A whole generation directory.
    Generation(GenerationId),
    /// One file of a generation.
    File(GenerationId, FileName),
}

/// A segment's fields, pulled out of its name.
#[derive(Debug, Clone, Copy)]
struct Seg {
    level: u8,
    first: u64,
    last: u64,
    first_ms: u64,
    name: FileName,
}

fn seg(f: &FileName) -> Option<Seg> {
    match *f {
        FileName::Segment {
            level,
            first,
            last,
            first_ms,
            ..
        } => Some(Seg {
            level,
            first,
            last,
            first_ms,
            name: *f,
        }),
        FileName::Snapshot { .. } => None,
    }
}

/// A snapshot's (txid, time_ms).
fn snap(f: &FileName) -> Option<(u64, u64)> {
    match *f {
        FileName::Snapshot { txid, time_ms } => Some((txid, time_ms)),
        FileName::Segment { .. } => None,
    }
}

/// The listing as generation -> distinct files.
fn by_generation(listing: &Listing) -> BTreeMap<GenerationId, BTreeSet<FileName>> {
    let mut map: BTreeMap<GenerationId, BTreeSet<FileName>> = BTreeMap::new();
    for (g, files) in &listing.generations {
        map.entry(*g)
            .or_default()
            .extend(files.iter().map(|(f, _)| *f));
    }
    map
}

/// Snapshots as (txid, time_ms, name), ascending.
fn snapshots(files: &BTreeSet<FileName>) -> Vec<(u64, u64, FileName)> {
    let mut v: Vec<_> = files
        .iter()
        .filter_map(|f| snap(f).map(|(t, m)| (t, m, *f)))
        .collect();
    v.sort();
    v
}

/// Chains segments greedily from `from + 1`: among the segments containing the next txid, the one
/// reaching furthest (tie: higher level). Stops when `done(covered)` or nothing continues the
/// chain. Returns the chain and the last txid it covers (`from` if empty).
fn chain(segs: &[Seg], from: u64, done: impl Fn(u64) -> bool) -> (Vec<FileName>, u64) {
    let mut sorted: Vec<&Seg> = segs.iter().collect();
    sorted.sort_by_key(|s| (s.first, s.last, s.level));
    let mut out = Vec::new();
    let mut covered = from;
    let mut i = 0;
    // Best (last, level, name) among segments with first <= next.
    let mut best: Option<&Seg> = None;
    while !done(covered) {
        let Some(next) = covered.checked_add(1) else {
            break;
        };
        while let Some(s) = sorted.get(i).filter(|s| s.first <= next) {
            best = match best {
                Some(b) if (b.last, b.level) >= (s.last, s.level) => Some(b),
                _ => Some(s),
            };
            i += 1;
        }
        match best {
            Some(b) if b.last >= next => {
                out.push(b.name);
                covered = b.last;
            }
            _ => break,
        }
    }
    (out, covered)
}

/// Plans a restore from a listing: which snapshot, which segments, where to stop.
///
/// - `Latest`: the newest generation that has a snapshot; its latest snapshot; then the longest
///   chain of segments from it.
/// - `Position`: that generation only; the latest snapshot at or before the txid, then segments
///   until one reaches the txid.
/// - `TimeMs(t)`: generations newest first; in the first with a snapshot at or before `t`, the
///   latest such snapshot, then segments whose first commit is at or before `t`.
pub(crate) fn plan_restore(listing: &Listing, want: &Want) -> Result<Plan, LayoutError> {
    let gens = by_generation(listing);
    if !gens.values().any(|f| f.iter().any(|f| snap(f).is_some())) {
        return Err(LayoutError::NoSnapshot);
    }
    let segs_of = |files: &BTreeSet<FileName>| files.iter().filter_map(seg).collect::<Vec<_>>();
    match *want {
        Want::Latest => {
            for (g, files) in gens.iter().rev() {
                if let Some(&(txid, _, snapshot)) = snapshots(files).last() {
                    let (segments, _) = chain(&segs_of(files), txid, |_| false);
                    return Ok(Plan {
                        generation: *g,
                        snapshot,
                        segments,
                        stop: Stop::Latest,
                    });
                }
            }
            Err(LayoutError::NoSnapshot)
        }
        Want::Position(want) => {
            let files = gens
                .get(&want.generation)
                .ok_or(LayoutError::NoGeneration(want.generation))?;
            let snaps = snapshots(files);
            let segs = segs_of(files);
            let target = want.txid;
            let Some(&(first, _, _)) = snaps.first() else {
                return Err(LayoutError::GenerationWithoutSnapshot(want.generation));
            };
            // A later snapshot's chain always reaches at least as far as an earlier one's (the
            // segment holding the later snapshot's txid + 1 continues both), so the latest
            // snapshot at or before the target is the only one worth trying.
            if let Some(&(txid, _, snapshot)) = snaps.iter().rev().find(|s| s.0 <= target) {
                let (segments, covered) = chain(&segs, txid, |c| c >= target);
                if covered >= target {
                    return Ok(Plan {
                        generation: want.generation,
                        snapshot,
                        segments,
                        stop: Stop::Txid(target),
                    });
                }
            }
            let newest = snaps.last().map_or(first, |s| s.0);
            let (_, last) = chain(&segs, newest, |_| false);
            Err(LayoutError::Unreachable { want, first, last })
        }
        Want::TimeMs(t) => {
            for (g, files) in gens.iter().rev() {
                let snaps = snapshots(files);
                let Some(&(txid, _, snapshot)) = snaps.iter().rev().find(|s| s.1 <= t) else {
                    continue;
                };
                let segs: Vec<Seg> = segs_of(files)
                    .into_iter()
                    .filter(|s| s.first_ms <= t)
                    .collect();
                let (segments, _) = chain(&segs, txid, |_| false);
                return Ok(Plan {
                    generation: *g,
                    snapshot,
                    segments,
                    stop: Stop::TimeMs(t),
                });
            }
            let oldest = gens
                .values()
                .flat_map(|f| f.iter().filter_map(snap))
                .map(|(_, ms)| ms)
                .min()
                .unwrap_or(0);
            Err(LayoutError::TooEarly { want: t, oldest })
        }
    }
}

/// The segments that carry a restore on from txid `from` (already applied) to `target`, chosen
/// from `files` (one generation's, listed again), or `None` if they cannot reach `target`.
/// A restore of a replica that a running walship compacts follows this when a planned segment
/// was merged away meanwhile: the merged segment continues the chain (it may start before
/// `from + 1`; the applier skips commits it already applied).
pub(crate) fn plan_continuation(
    files: &[FileName],
    from: u64,
    target: u64,
) -> Option<Vec<FileName>> {
    let segs = distinct_segments(files);
    let (chain, covered) = chain(&segs, from, |c| c >= target);
    (covered >= target).then_some(chain)
}

/// For each segment, whether another segment of a higher level covers its whole range.
fn covered_by_higher(segs: &[Seg]) -> Vec<bool> {
    // Per level: segments sorted by first, with the running maximum of last.
    let mut levels: BTreeMap<u8, Vec<(u64, u64)>> = BTreeMap::new();
    for s in segs {
        levels.entry(s.level).or_default().push((s.first, s.last));
    }
    for v in levels.values_mut() {
        v.sort_unstable();
        let mut max = 0;
        for e in v.iter_mut() {
            max = max.max(e.1);
            e.1 = max;
        }
    }
    segs.iter()
        .map(|s| {
            levels
                .range(s.level.saturating_add(1)..)
                .filter(|(l, _)| **l > s.level)
                .any(|(_, v)| {
                    let n = v.partition_point(|&(first, _)| first <= s.first);
                    n > 0
                        && v.get(n - 1)
                            .is_some_and(|&(_, max_last)| max_last >= s.last)
                })
        })
        .collect()
}

fn distinct_segments(files: &[FileName]) -> Vec<Seg> {
    let set: BTreeSet<FileName> = files.iter().copied().collect();
    set.iter().filter_map(seg).collect()
}

/// The oldest run of `fanout` contiguous segments (each first == previous last + 1) of the lowest
/// level that has one, to be merged into one segment of level+1. None if nothing to do. Segments
/// covered by another segment of a higher level are ignored here.
///
/// Returns the level of the merged segment (the run's level + 1) and the run, oldest first.
/// Level 9 is never merged (levels are one digit), and a `fanout` below 2 plans nothing.
pub(crate) fn plan_compaction(files: &[FileName], fanout: usize) -> Option<(u8, Vec<FileName>)> {
    if fanout < 2 {
        return None;
    }
    let segs = distinct_segments(files);
    let covered = covered_by_higher(&segs);
    let mut live: Vec<&Seg> = segs
        .iter()
        .zip(covered)
        .filter(|(_, c)| !c)
        .map(|(s, _)| s)
        .collect();
    live.sort_by_key(|s| (s.level, s.first, s.last));
    for level in 0..9u8 {
        let mut run: Vec<&Seg> = Vec::new();
        for s in live.iter().filter(|s| s.level == level) {
            let continues = run
                .last()
                .is_some_and(|p| p.last.checked_add(1) == Some(s.first));
            if !continues {
                run.clear();
            }
            run.push(s);
            if run.len() == fanout {
                return Some((level + 1, run.iter().map(|s| s.name).collect()));
            }
        }
    }
    None
}

/// Segments whose range lies entirely inside another segment's range of a higher level (left over
/// when a crash interrupted a compaction): safe to delete. Sorted, without duplicates.
pub(crate) fn redundant_segments(files: &[FileName]) -> Vec<FileName> {
    let segs = distinct_segments(files);
    let covered = covered_by_higher(&segs);
    segs.iter()
        .zip(covered)
        .filter(|(_, c)| *c)
        .map(|(s, _)| s.name)
        .collect()
}

/// What retention may delete so that every point in [now_ms - retention_ms, now] stays
/// restorable. Current generation: keep the newest snapshot with time_ms <= now-retention (the
/// base; if none, the oldest snapshot) and everything newer; delete older snapshots and segments
/// with last <= base.txid. Never touch the current generation's newest snapshot. An older
/// generation is deleted whole once a newer generation has a snapshot with time_ms <=
/// now-retention.
///
/// Generations newer than `current` are never deleted. The result is sorted.
pub(crate) fn plan_retention(
    listing: &Listing,
    current: &GenerationId,
    now_ms: u64,
    retention_ms: u64,
) -> Vec<Deletion> {
    let cutoff = now_ms.saturating_sub(retention_ms);
    let gens = by_generation(listing);
    let mut out = Vec::new();
    // Walking newest first: whether some newer generation has a snapshot at or before the cutoff.
    let mut newer_covers = false;
    for (g, files) in gens.iter().rev() {
        if g < current && newer_covers {
            out.push(Deletion::Generation(*g));
        }
        if files.iter().filter_map(snap).any(|(_, ms)| ms <= cutoff) {
            newer_covers = true;
        }
    }
    if let Some(files) = gens.get(current) {
        let snaps = snapshots(files);
        let base = snaps
            .iter()
            .rev()
            .find(|s| s.1 <= cutoff)
            .or_else(|| snaps.first());
        if let Some(&base) = base {
            for s in snaps.iter().filter(|s| **s < base) {
                out.push(Deletion::File(*current, s.2));
            }
            for s in files.iter().filter_map(seg).filter(|s| s.last <= base.0) {
                out.push(Deletion::File(*current, s.name));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests;
