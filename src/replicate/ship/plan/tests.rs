//! Every decision of the shipper's planner, one case (or a few) per decision.

use super::*;

const G1: GenerationId = GenerationId { ms: 100, rand: 1 };
const G2: GenerationId = GenerationId { ms: 200, rand: 0 };

fn snap(g: GenerationId, txid: u64) -> SpoolFile {
    SpoolFile {
        generation: g,
        name: FileName::Snapshot {
            txid,
            time_ms: txid * 10,
        },
        size: 100,
    }
}

/// A level-0 segment of txids first..=last of `size` bytes.
fn seg_sized(g: GenerationId, first: u64, last: u64, size: u64) -> SpoolFile {
    SpoolFile {
        generation: g,
        name: FileName::Segment {
            level: 0,
            first,
            last,
            first_ms: first * 10,
            last_ms: last * 10,
        },
        size,
    }
}

fn seg(g: GenerationId, first: u64, last: u64) -> SpoolFile {
    seg_sized(g, first, last, 100)
}

fn key(f: &SpoolFile) -> Key {
    f.key()
}

fn view(files: Vec<SpoolFile>) -> View {
    let head = files.last().map(SpoolFile::key);
    View {
        files,
        head,
        live: None,
    }
}

const RUN: Shutdown = Shutdown {
    stopping: false,
    deadline: None,
};

/// A planner at `pos` that already prepared the replica and listed `remote` files of the
/// position's generation, at `t0`.
fn settled(pos: &SpoolFile, remote: Vec<FileName>, t0: Instant) -> Planner {
    let mut p = Planner::new(Some(key(pos)), t0);
    p.prepared = true;
    p.listed(pos.generation, remote);
    p
}

/// Runs one idle round of `p` at `now` (nothing spooled past its position, head at it),
/// reporting `compacted(false)` for a compaction; returns the actions.
fn idle_round(p: &mut Planner, now: Instant, head_moved: Option<Instant>) -> Vec<Action> {
    let head = p.pos;
    assert_eq!(
        p.begin(View {
            files: Vec::new(),
            head,
            live: None
        }),
        None
    );
    let mut out = Vec::new();
    loop {
        let a = p.next(RUN, head_moved, now);
        out.push(a.clone());
        match a {
            Action::Compact => p.compacted(false),
            Action::Wait(_) | Action::Continue { .. } | Action::Stop { .. } => return out,
            _ => {}
        }
    }
}

#[test]
fn the_next_segment_continues_the_position() {
    let t = Instant::now();
    let (a, b) = (seg(G1, 1, 5), seg(G1, 6, 7));
    let mut p = Planner::new(Some(key(&a)), t);
    p.prepared = true;
    assert_eq!(p.begin(view(vec![a, b.clone()])), None);
    assert_eq!(p.next(RUN, None, t), Action::Upload(vec![b]));
}

#[test]
fn a_grown_tail_continues_a_replica_holding_its_start() {
    let t = Instant::now();
    // The replica holds 1..=5; the spool's tail grew from 3..=5 to 3..=9 since.
    let (held, grown, next) = (seg(G1, 1, 5), seg(G1, 3, 9), seg(G1, 10, 11));
    let mut p = Planner::new(Some(key(&held)), t);
    p.prepared = true;
    assert_eq!(p.begin(view(vec![grown.clone(), next.clone()])), None);
    assert_eq!(p.next(RUN, None, t), Action::Upload(vec![grown, next]));
    // One that starts after the position still leaves a gap.
    let mut p = Planner::new(Some(key(&held)), t);
    p.prepared = true;
    assert!(p.begin(view(vec![seg(G1, 7, 9)])).is_some());
}

#[test]
fn a_snapshot_starts_a_replica_without_position() {
    let t = Instant::now();
    let s = snap(G1, 3);
    let mut p = Planner::new(None, t);
    assert_eq!(p.begin(view(vec![s.clone(), seg(G1, 4, 4)])), None);
    assert_eq!(p.next(RUN, None, t), Action::Prepare(None));
    // A snapshot is never merged with the segments after it.
    assert_eq!(p.next(RUN, None, t), Action::Upload(vec![s]));
}

#[test]
fn a_segment_never_starts_a_replica() {
    let t = Instant::now();
    let mut p = Planner::new(None, t);
    p.prepared = true;
    let gap = p.begin(view(vec![seg(G1, 4, 4)]));
    assert_eq!(
        gap,
        Some(Gap::WantSnapshot(
            "replica is missing files that are no longer spooled"
        ))
    );
    assert_eq!(p.next(RUN, None, t), Action::Wait(None));
}

#[test]
fn missed_files_skip_to_a_spooled_snapshot() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let s = snap(G1, 9);
    let mut p = Planner::new(Some(key(&at)), t);
    p.prepared = true;
    let gap = p.begin(view(vec![seg(G1, 8, 9), s.clone(), seg(G1, 10, 10)]));
    assert_eq!(gap, Some(Gap::Resync(s.name)));
    assert_eq!(p.next(RUN, None, t), Action::Upload(vec![s]));
}

#[test]
fn missed_files_without_snapshot_ask_for_one_and_send_nothing() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    let gap = p.begin(view(vec![seg(G1, 8, 9)]));
    assert_eq!(
        gap,
        Some(Gap::WantSnapshot(
            "replica is missing files that are no longer spooled"
        ))
    );
    assert_eq!(p.next(RUN, None, t), Action::Compact);
}

#[test]
fn the_next_txid_in_another_generation_is_a_gap() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = Planner::new(Some(key(&at)), t);
    let gap = p.begin(view(vec![seg(G2, 6, 6)]));
    assert!(matches!(gap, Some(Gap::WantSnapshot(_))), "{gap:?}");
}

#[test]
fn behind_the_head_with_nothing_spooled_asks_for_a_snapshot() {
    let t = Instant::now();
    let behind = Some(Gap::WantSnapshot(
        "replica is behind and nothing newer is spooled",
    ));
    let at = seg(G1, 1, 5);
    let cases = [
        (Some(key(&at)), Some(key(&seg(G1, 6, 9))), behind),
        (Some(key(&at)), Some(key(&snap(G2, 1))), behind),
        (None, Some(key(&at)), behind),
        (Some(key(&at)), Some(key(&at)), None),
        (Some(key(&at)), None, None),
        (None, None, None),
    ];
    for (pos, head, want) in cases {
        let mut p = Planner::new(pos, t);
        let got = p.begin(View {
            files: Vec::new(),
            head,
            live: None,
        });
        assert_eq!(got, want, "pos {pos:?} head {head:?}");
    }
}

#[test]
fn consecutive_segments_of_one_generation_are_batched() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let run = vec![seg(G1, 6, 7), seg(G1, 8, 8), seg(G1, 9, 12)];
    let cases = [
        // Stops at a hole, at another generation, at a snapshot.
        seg(G1, 14, 14),
        seg(G2, 13, 13),
        snap(G1, 12),
    ];
    for stop in cases {
        let mut files = run.clone();
        files.push(stop.clone());
        let mut p = Planner::new(Some(key(&at)), t);
        p.prepared = true;
        p.begin(view(files));
        assert_eq!(
            p.next(RUN, None, t),
            Action::Upload(run.clone()),
            "{stop:?}"
        );
    }
}

#[test]
fn a_batch_holds_at_most_batch_files() {
    let t = Instant::now();
    let at = seg(G1, 1, 1);
    let files: Vec<SpoolFile> = (2..BATCH_FILES as u64 + 10)
        .map(|i| seg_sized(G1, i, i, 1))
        .collect();
    let mut p = Planner::new(Some(key(&at)), t);
    p.prepared = true;
    p.begin(view(files.clone()));
    assert_eq!(
        p.next(RUN, None, t),
        Action::Upload(files[..BATCH_FILES].to_vec())
    );
}

#[test]
fn a_batch_holds_at_most_batch_bytes() {
    let t = Instant::now();
    let at = seg(G1, 1, 1);
    let half = BATCH_BYTES / 2;
    let files = vec![
        seg_sized(G1, 2, 2, half),
        seg_sized(G1, 3, 3, BATCH_BYTES - half),
        seg_sized(G1, 4, 4, 1),
    ];
    let mut p = Planner::new(Some(key(&at)), t);
    p.prepared = true;
    p.begin(view(files.clone()));
    // Exactly BATCH_BYTES fit; one byte more does not.
    assert_eq!(p.next(RUN, None, t), Action::Upload(files[..2].to_vec()));
}

#[test]
fn the_live_file_is_streamed_only_when_it_follows_and_nothing_is_spooled() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let cases = [
        (Some(at.clone()), seg(G1, 6, 6), true),
        (Some(at.clone()), seg(G1, 7, 7), false),
        (Some(at.clone()), seg(G2, 6, 6), false),
        (Some(at.clone()), snap(G2, 1), true),
        (Some(at.clone()), snap(G1, 5), true),
        (Some(at.clone()), snap(G1, 4), false),
        (None, snap(G1, 1), true),
        (None, seg(G1, 1, 1), false),
    ];
    for (pos, live, streamed) in cases {
        let mut p = Planner::new(pos.as_ref().map(key), t);
        p.prepared = true;
        p.begin(View {
            files: Vec::new(),
            head: pos.as_ref().map(key),
            live: Some((live.generation, live.name)),
        });
        let a = p.next(RUN, None, t);
        assert_eq!(a == Action::StreamLive, streamed, "{pos:?} {live:?}: {a:?}");
    }
}

#[test]
fn a_spooled_file_goes_before_the_live_one() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let next = seg(G1, 6, 6);
    let mut p = Planner::new(Some(key(&at)), t);
    p.prepared = true;
    // A snapshot follows any older position.
    let live = snap(G1, 9);
    p.begin(View {
        files: vec![next.clone()],
        head: Some(key(&next)),
        live: Some((live.generation, live.name)),
    });
    assert_eq!(p.next(RUN, None, t), Action::Upload(vec![next]));
}

#[test]
fn a_live_file_not_sent_ends_the_round_without_waking() {
    let t = Instant::now();
    let live = snap(G1, 1);
    let mut p = Planner::new(None, t);
    p.prepared = true;
    p.begin(View {
        files: Vec::new(),
        head: None,
        live: Some((live.generation, live.name)),
    });
    assert_eq!(p.next(RUN, None, t), Action::StreamLive);
    p.not_streamed();
    assert_eq!(p.next(RUN, None, t), Action::Continue { wake: false });
}

#[test]
fn stopping_ends_once_caught_up_sweeping_only_a_prepared_replica() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let stop = Shutdown {
        stopping: true,
        deadline: None,
    };
    for prepared in [false, true] {
        let mut p = Planner::new(Some(key(&at)), t);
        p.prepared = prepared;
        p.begin(view(vec![at.clone()]));
        assert_eq!(p.next(stop, None, t), Action::Stop { sweep: prepared });
    }
}

#[test]
fn stopping_with_files_left_sends_them_until_the_deadline() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let next = seg(G1, 6, 6);
    let before = Shutdown {
        stopping: true,
        deadline: Some(t + Duration::from_millis(1)),
    };
    let mut p = Planner::new(Some(key(&at)), t);
    p.prepared = true;
    p.begin(view(vec![next.clone()]));
    assert_eq!(p.next(before, None, t), Action::Upload(vec![next.clone()]));
    let past = Shutdown {
        stopping: true,
        deadline: Some(t),
    };
    let mut p = Planner::new(Some(key(&at)), t);
    p.prepared = true;
    p.begin(view(vec![next]));
    // Past the deadline nothing is swept: files are still due.
    assert_eq!(p.next(past, None, t), Action::Stop { sweep: false });
}

#[test]
fn the_replica_is_prepared_once_then_again_after_a_failure() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let next = seg(G1, 6, 6);
    let mut p = Planner::new(Some(key(&at)), t);
    p.begin(view(vec![next.clone()]));
    assert_eq!(p.next(RUN, None, t), Action::Prepare(Some(G1)));
    assert_eq!(p.next(RUN, None, t), Action::Upload(vec![next.clone()]));
    assert!(matches!(p.failed(false, 0), Action::Backoff(_)));
    p.begin(view(vec![next.clone()]));
    assert_eq!(p.next(RUN, None, t), Action::Prepare(Some(G1)));
    assert_eq!(p.next(RUN, None, t), Action::Upload(vec![next.clone()]));
    p.sent(std::slice::from_ref(&next), next.name);
    assert_eq!(p.next(RUN, None, t), Action::ListRemote(G1));
    p.listed(G1, vec![next.name]);
    assert_eq!(p.next(RUN, None, t), Action::Continue { wake: true });
    p.begin(view(vec![next]));
    assert_eq!(p.next(RUN, None, t), Action::Compact);
}

#[test]
fn a_file_sent_into_a_new_generation_is_followed_by_its_listing() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let s = snap(G2, 1);
    let mut p = settled(&at, vec![at.name], t);
    p.begin(view(vec![s.clone()]));
    assert_eq!(p.next(RUN, None, t), Action::Upload(vec![s.clone()]));
    p.sent(std::slice::from_ref(&s), s.name);
    assert_eq!(p.next(RUN, None, t), Action::ListRemote(G2));
    p.listed(G2, vec![s.name]);
    assert_eq!(p.next(RUN, None, t), Action::Continue { wake: true });
    assert_eq!(p.pos, Some(key(&s)));
}

#[test]
fn a_file_sent_into_the_listed_generation_is_added_to_the_listing() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let batch = vec![seg(G1, 6, 6), seg(G1, 7, 8)];
    let merged = seg(G1, 6, 8).name;
    let mut p = settled(&at, vec![at.name], t);
    p.begin(view(batch.clone()));
    assert_eq!(p.next(RUN, None, t), Action::Upload(batch.clone()));
    p.sent(&batch, merged);
    assert_eq!(p.next(RUN, None, t), Action::Continue { wake: true });
    assert_eq!(p.remote_mut(), Some(&mut (G1, vec![at.name, merged])));
    assert_eq!(p.pos, Some(key(&batch[1])));
}

#[test]
fn idle_lists_the_replica_when_its_files_are_unknown() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = Planner::new(Some(key(&at)), t);
    p.prepared = true;
    p.begin(view(vec![at.clone()]));
    assert_eq!(p.next(RUN, None, t), Action::ListRemote(G1));
    p.listed(G1, vec![at.name]);
    assert_eq!(p.next(RUN, None, t), Action::Compact);
    // Without a position there is nothing to list nor compact.
    let mut p = Planner::new(None, t);
    p.prepared = true;
    p.begin(view(Vec::new()));
    assert_eq!(p.next(RUN, None, t), Action::Wait(None));
}

#[test]
fn idle_trims_the_heap_after_a_burst_at_most_every_trim_every() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let batch = vec![seg(G1, 6, 6), seg(G1, 7, 7)];
    let mut p = settled(&at, vec![at.name], t);
    p.begin(view(batch.clone()));
    p.next(RUN, None, t);
    p.sent(&batch, seg(G1, 6, 7).name);
    p.next(RUN, None, t);
    // Due, but the last trim (the start) was less than TRIM_EVERY ago.
    let soon = t + TRIM_EVERY - Duration::from_millis(1);
    assert!(!idle_round(&mut p, soon, None).contains(&Action::TrimHeap));
    let later = t + TRIM_EVERY;
    assert_eq!(idle_round(&mut p, later, None)[0], Action::TrimHeap);
    // Done: not again until the next burst.
    let much_later = later + TRIM_EVERY * 2;
    assert!(!idle_round(&mut p, much_later, None).contains(&Action::TrimHeap));
}

#[test]
fn a_trim_counts_from_when_it_ended() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    p.trim_due = true;
    let start = t + TRIM_EVERY;
    p.begin(view(Vec::new()));
    assert_eq!(p.next(RUN, None, start), Action::TrimHeap);
    let ended = start + Duration::from_secs(2);
    p.next(RUN, None, ended);
    assert_eq!(p.last_trim, ended);
}

#[test]
fn a_single_file_asks_for_no_trim() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let next = seg(G1, 6, 6);
    let mut p = settled(&at, vec![at.name], t);
    p.begin(view(vec![next.clone()]));
    p.next(RUN, None, t);
    p.sent(std::slice::from_ref(&next), next.name);
    p.next(RUN, None, t);
    assert!(!idle_round(&mut p, t + TRIM_EVERY * 2, None).contains(&Action::TrimHeap));
}

#[test]
fn idle_sweeps_temporary_files_every_temp_sweep() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    assert!(!idle_round(&mut p, t + TEMP_SWEEP, None).contains(&Action::SweepTemps));
    let later = t + TEMP_SWEEP + Duration::from_millis(1);
    assert_eq!(
        idle_round(&mut p, later, None)[0],
        Action::SweepTemps,
        "sweep first"
    );
    assert!(!idle_round(&mut p, later + TEMP_SWEEP, None).contains(&Action::SweepTemps));
}

#[test]
fn compaction_waits_for_a_quiet_database() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    // The head moved just now: wait until it has been quiet for COMPACT_WHEN_QUIET.
    let moved = t;
    assert_eq!(
        idle_round(&mut p, t, Some(moved)),
        vec![Action::Wait(Some(moved + COMPACT_WHEN_QUIET))]
    );
    let quiet = moved + COMPACT_WHEN_QUIET;
    assert_eq!(idle_round(&mut p, quiet, Some(moved))[0], Action::Compact);
}

#[test]
fn compaction_is_deferred_at_most_compact_max_defer() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    // The database is never quiet: the head always moved just now.
    assert_eq!(
        idle_round(&mut p, t, Some(t)),
        vec![Action::Wait(Some(t + COMPACT_WHEN_QUIET))]
    );
    let near = t + COMPACT_MAX_DEFER - Duration::from_millis(300);
    assert_eq!(
        idle_round(&mut p, near, Some(near)),
        vec![Action::Wait(Some(t + COMPACT_MAX_DEFER))],
        "the wait ends at the deferral limit"
    );
    let over = t + COMPACT_MAX_DEFER;
    assert_eq!(idle_round(&mut p, over, Some(over))[0], Action::Compact);
    // A finished idle round ends the deferral: the next one counts afresh.
    let next = over + Duration::from_millis(1);
    assert_eq!(
        idle_round(&mut p, next, Some(next)),
        vec![Action::Wait(Some(next + COMPACT_WHEN_QUIET))]
    );
}

#[test]
fn a_compaction_that_did_something_goes_on_in_the_next_round() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    p.begin(view(Vec::new()));
    assert_eq!(p.next(RUN, None, t), Action::Compact);
    p.compacted(true);
    assert_eq!(p.next(RUN, None, t), Action::Continue { wake: false });
    assert!(p.trim_due, "a compaction is a burst");
    // The deferral goes on: it ends only once compaction is done.
    assert_eq!(p.deferred_since, Some(t));
}

#[test]
fn retention_runs_after_compaction_at_most_every_retain_every() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    assert_eq!(
        idle_round(&mut p, t, None),
        vec![Action::Compact, Action::Retain(G1), Action::Wait(None)]
    );
    let soon = t + RETAIN_EVERY;
    assert!(!idle_round(&mut p, soon, None).contains(&Action::Retain(G1)));
    let later = t + RETAIN_EVERY + Duration::from_millis(1);
    assert!(idle_round(&mut p, later, None).contains(&Action::Retain(G1)));
}

/// A settled, idle planner in G1 that has just sent G2's first snapshot: returns it and
/// the snapshot.
fn sent_a_new_generation_s_snapshot(t: Instant) -> (Planner, SpoolFile) {
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    idle_round(&mut p, t, None);
    let s = snap(G2, 1);
    p.begin(view(vec![s.clone()]));
    p.next(RUN, None, t);
    p.sent(std::slice::from_ref(&s), s.name);
    (p, s)
}

#[test]
fn a_new_generation_s_snapshot_makes_retention_due() {
    let t = Instant::now();
    let (mut p, s) = sent_a_new_generation_s_snapshot(t);
    p.next(RUN, None, t);
    p.listed(G2, vec![s.name]);
    p.next(RUN, None, t);
    let soon = t + Duration::from_secs(1);
    assert!(idle_round(&mut p, soon, None).contains(&Action::Retain(G2)));
    // A segment of a new generation (the listing was lost) does not.
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    idle_round(&mut p, t, None);
    let next = seg(G1, 6, 6);
    p.failed(false, 0);
    p.begin(view(vec![next.clone()]));
    p.next(RUN, None, t);
    p.next(RUN, None, t);
    p.sent(std::slice::from_ref(&next), next.name);
    assert_eq!(p.next(RUN, None, t), Action::ListRemote(G1));
    p.listed(G1, vec![next.name]);
    p.next(RUN, None, t);
    assert!(!idle_round(&mut p, soon, None).contains(&Action::Retain(G1)));
}

#[test]
fn a_take_over_retires_the_shipper() {
    let t = Instant::now();
    let mut p = Planner::new(None, t);
    assert_eq!(p.failed(true, 0), Action::Retire);
    assert_eq!(p.failures, 0);
}

#[test]
fn failures_back_off_exponentially_with_jitter_up_to_max_backoff() {
    let ms = Duration::from_millis;
    assert_eq!(backoff(1, 0), ms(200));
    assert_eq!(backoff(2, 0), ms(400));
    assert_eq!(backoff(4, 0), ms(1600));
    // Jitter: up to a quarter of the base.
    assert_eq!(backoff(1, 50), ms(250));
    assert_eq!(backoff(1, 51), ms(200));
    assert_eq!(backoff(0, 25), ms(125));
    // 3200 ms and more are capped.
    assert_eq!(backoff(5, 0), MAX_BACKOFF);
    assert_eq!(backoff(40, 7), MAX_BACKOFF);
    assert_eq!(backoff(u32::MAX, u64::MAX), MAX_BACKOFF);
}

#[test]
fn failures_count_up_and_a_finished_round_resets_them() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    assert_eq!(p.failed(false, 0), Action::Backoff(backoff(1, 0)));
    assert_eq!(p.failed(false, 0), Action::Backoff(backoff(2, 0)));
    assert_eq!(p.failed(false, 0), Action::Backoff(backoff(3, 0)));
    p.begin(view(Vec::new()));
    assert_eq!(p.next(RUN, None, t), Action::Prepare(Some(G1)));
    assert_eq!(p.next(RUN, None, t), Action::ListRemote(G1), "listed again");
    p.listed(G1, vec![at.name]);
    assert!(p.trim_due, "a failure is a burst");
    idle_round(&mut p, t, None);
    assert_eq!(p.failed(false, 0), Action::Backoff(backoff(1, 0)));
}

#[test]
fn a_failure_abandons_the_round() {
    let t = Instant::now();
    let at = seg(G1, 1, 5);
    let mut p = settled(&at, vec![at.name], t);
    p.begin(view(Vec::new()));
    assert_eq!(p.next(RUN, None, t), Action::Compact);
    p.failed(false, 0);
    // The compaction's report never comes; the next round starts from the top.
    p.begin(view(Vec::new()));
    assert_eq!(p.next(RUN, None, t), Action::Prepare(Some(G1)));
}

#[test]
fn the_deadline_counts_only_when_stopping() {
    let t = Instant::now();
    assert!(past_deadline(true, Some(t), t));
    assert!(!past_deadline(true, Some(t + Duration::from_millis(1)), t));
    assert!(!past_deadline(false, Some(t), t));
    assert!(!past_deadline(true, None, t));
}

#[test]
fn a_position_not_saved_still_moves_but_makes_nothing_else_due() {
    let t = Instant::now();
    let (mut p, s) = sent_a_new_generation_s_snapshot(t);
    // Saving the position failed: the file is on the replica all the same.
    p.failed(false, 0);
    assert_eq!(p.pos, Some(key(&s)));
    assert_eq!(p.last_retention, Some(t));
    assert_eq!(p.remote, None);
}
