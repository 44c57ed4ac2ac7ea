//! Planner cases for each want, compaction, retention, and arbitrary listings.

use super::*;
use proptest::prelude::*;

const G1: GenerationId = GenerationId { ms: 100, rand: 1 };
const G2: GenerationId = GenerationId { ms: 200, rand: 0 };
const G3: GenerationId = GenerationId { ms: 300, rand: 0 };

fn snap(txid: u64, time_ms: u64) -> FileName {
    FileName::Snapshot { txid, time_ms }
}

/// A level-`level` segment of txids first..=last whose commit times are 10 * txid.
fn seg(level: u8, first: u64, last: u64) -> FileName {
    FileName::Segment {
        level,
        first,
        last,
        first_ms: first * 10,
        last_ms: last * 10,
    }
}

fn listing(gens: &[(GenerationId, Vec<FileName>)]) -> Listing {
    Listing {
        generations: gens
            .iter()
            .map(|(g, fs)| (*g, fs.iter().map(|f| (*f, 100)).collect()))
            .collect(),
    }
}

fn pos(generation: GenerationId, txid: u64) -> Want {
    Want::Position(Position { generation, txid })
}

#[test]
fn latest_takes_newest_generation_with_a_snapshot_and_longest_chain() {
    let l = listing(&[
        (
            G2,
            vec![
                snap(1, 10),
                snap(5, 50),
                seg(0, 2, 5),
                seg(0, 6, 7),
                seg(0, 8, 9),
            ],
        ),
        (G1, vec![snap(1, 1)]),
        (G3, vec![seg(0, 1, 3)]), // newest, but no snapshot
    ]);
    let p = plan_restore(&l, &Want::Latest).unwrap();
    assert_eq!(p.generation, G2);
    assert_eq!(p.snapshot, snap(5, 50));
    assert_eq!(p.segments, vec![seg(0, 6, 7), seg(0, 8, 9)]);
    assert_eq!(p.stop, Stop::Latest);
}

#[test]
fn latest_prefers_compacted_segments_and_stops_at_a_gap() {
    let l = listing(&[(
        G1,
        vec![
            snap(0, 0),
            seg(0, 1, 2),
            seg(0, 3, 4),
            seg(1, 1, 4),
            seg(0, 5, 5),
            seg(1, 3, 5), // overlaps: fine
            seg(0, 7, 8), // after a gap: unreachable
        ],
    )]);
    let p = plan_restore(&l, &Want::Latest).unwrap();
    assert_eq!(p.snapshot, snap(0, 0));
    assert_eq!(p.segments, vec![seg(1, 1, 4), seg(1, 3, 5)]);
    // Same range at two levels: the higher level wins.
    let l = listing(&[(G1, vec![snap(0, 0), seg(0, 1, 4), seg(2, 1, 4)])]);
    assert_eq!(
        plan_restore(&l, &Want::Latest).unwrap().segments,
        vec![seg(2, 1, 4)]
    );
}

/// A restore that applied txids up to 4 and finds its next segment (5..6) merged away into
/// 3..8 goes on with the merged one; a gap, or segments ending before the target, give None.
#[test]
fn continuation_follows_a_merged_segment() {
    let now = [
        snap(0, 0),
        seg(1, 1, 2),
        seg(1, 3, 8),
        seg(0, 9, 9),
        seg(0, 10, 12),
    ];
    assert_eq!(plan_continuation(&now, 4, 8), Some(vec![seg(1, 3, 8)]));
    assert_eq!(
        plan_continuation(&now, 4, 11),
        Some(vec![seg(1, 3, 8), seg(0, 9, 9), seg(0, 10, 12)])
    );
    assert_eq!(plan_continuation(&now, 12, 12), Some(vec![]));
    assert_eq!(
        plan_continuation(&now, 4, 13),
        None,
        "ends before the target"
    );
    let gap = [snap(0, 0), seg(0, 1, 4), seg(0, 6, 8)];
    assert_eq!(plan_continuation(&gap, 4, 8), None, "txid 5 is missing");
    assert_eq!(plan_continuation(&[], 4, 8), None, "the generation is gone");
}

#[test]
fn position_cases() {
    let l = listing(&[
        (
            G1,
            vec![
                snap(1, 10),
                seg(0, 2, 4),
                snap(4, 40),
                seg(0, 5, 6),
                seg(0, 7, 9),
            ],
        ),
        (G2, vec![seg(0, 1, 2)]),
    ]);
    let p = plan_restore(&l, &pos(G1, 6)).unwrap();
    assert_eq!((p.snapshot, p.stop), (snap(4, 40), Stop::Txid(6)));
    assert_eq!(p.segments, vec![seg(0, 5, 6)]);
    let p = plan_restore(&l, &pos(G1, 4)).unwrap();
    assert_eq!((p.snapshot, p.segments.len()), (snap(4, 40), 0));
    let p = plan_restore(&l, &pos(G1, 3)).unwrap();
    assert_eq!((p.snapshot, p.segments), (snap(1, 10), vec![seg(0, 2, 4)]));
    let p = plan_restore(&l, &pos(G1, 8)).unwrap();
    assert_eq!(p.segments, vec![seg(0, 5, 6), seg(0, 7, 9)]);

    let err = |w| plan_restore(&l, &w).unwrap_err().to_string();
    assert_eq!(
        err(pos(G1, 10)),
        format!("position {G1}/10 cannot be restored: generation {G1} holds txids 1..=9")
    );
    assert_eq!(
        err(pos(G1, 0)),
        format!("position {G1}/0 cannot be restored: generation {G1} holds txids 1..=9")
    );
    assert_eq!(err(pos(G2, 1)), format!("generation {G2} has no snapshot"));
    assert_eq!(
        err(pos(G3, 1)),
        format!("generation {G3} is not in the replica")
    );
}

#[test]
fn position_uses_an_overlapping_compacted_segment() {
    // Snapshot 4 is inside the compacted segment 2..=8: the applier skips txids 2..=4.
    let l = listing(&[(G1, vec![snap(1, 10), snap(4, 40), seg(1, 2, 8)])]);
    let p = plan_restore(&l, &pos(G1, 6)).unwrap();
    assert_eq!((p.snapshot, p.segments), (snap(4, 40), vec![seg(1, 2, 8)]));
}

#[test]
fn time_cases() {
    let l = listing(&[
        (G1, vec![snap(1, 10), seg(0, 2, 5)]),
        (
            G2,
            vec![snap(3, 30), seg(0, 4, 6), seg(0, 7, 9), snap(7, 70)],
        ),
    ]);
    let p = plan_restore(&l, &Want::TimeMs(55)).unwrap();
    assert_eq!((p.generation, p.snapshot), (G2, snap(3, 30)));
    assert_eq!(p.segments, vec![seg(0, 4, 6)]);
    assert_eq!(p.stop, Stop::TimeMs(55));
    let p = plan_restore(&l, &Want::TimeMs(75)).unwrap();
    assert_eq!(
        (p.snapshot, p.segments.clone()),
        (snap(7, 70), vec![seg(0, 7, 9)])
    );
    let p = plan_restore(&l, &Want::TimeMs(70)).unwrap();
    assert_eq!(
        (p.snapshot, p.segments.clone()),
        (snap(7, 70), vec![seg(0, 7, 9)])
    );
    // Before G2's first snapshot: the older generation.
    let p = plan_restore(&l, &Want::TimeMs(25)).unwrap();
    assert_eq!((p.generation, p.snapshot), (G1, snap(1, 10)));
    assert_eq!(p.segments, vec![seg(0, 2, 5)]);
    let p = plan_restore(&l, &Want::TimeMs(10)).unwrap();
    assert_eq!((p.generation, p.segments.len()), (G1, 0));
    assert_eq!(
        plan_restore(&l, &Want::TimeMs(9)).unwrap_err().to_string(),
        "nothing to restore at or before 9 ms: the oldest snapshot is at 10 ms"
    );
}

#[test]
fn no_snapshot_anywhere() {
    for l in [
        listing(&[]),
        listing(&[(G1, vec![]), (G2, vec![seg(0, 1, 2)])]),
    ] {
        for w in [Want::Latest, Want::TimeMs(5), pos(G1, 1)] {
            assert_eq!(
                plan_restore(&l, &w).unwrap_err().to_string(),
                "replica has no snapshot"
            );
        }
    }
}

#[test]
fn compaction_cases() {
    let files = vec![
        snap(0, 0),
        seg(0, 1, 1),
        seg(0, 2, 3),
        seg(0, 5, 5), // gap before: starts a new run
        seg(0, 6, 6),
        seg(0, 7, 9),
        seg(0, 10, 10),
    ];
    assert_eq!(
        plan_compaction(&files, 3),
        Some((1, vec![seg(0, 5, 5), seg(0, 6, 6), seg(0, 7, 9)]))
    );
    assert_eq!(
        plan_compaction(&files, 2),
        Some((1, vec![seg(0, 1, 1), seg(0, 2, 3)]))
    );
    assert_eq!(plan_compaction(&files, 5), None);
    assert_eq!(plan_compaction(&files, 1), None);
    assert_eq!(plan_compaction(&files, 0), None);
    // Level 0 segments already merged into level 1 are ignored; then level 1 has a run.
    let files = vec![
        seg(0, 1, 1),
        seg(0, 2, 2),
        seg(1, 1, 2),
        seg(1, 3, 4),
        seg(0, 5, 5),
    ];
    assert_eq!(
        plan_compaction(&files, 2),
        Some((2, vec![seg(1, 1, 2), seg(1, 3, 4)]))
    );
    // Level 9 is never merged.
    assert_eq!(plan_compaction(&[seg(9, 1, 1), seg(9, 2, 2)], 2), None);
}

#[test]
fn redundant_segment_cases() {
    let files = vec![
        snap(0, 0),
        seg(0, 1, 1),
        seg(0, 2, 2),
        seg(0, 3, 3),
        seg(1, 1, 2),
        seg(2, 2, 3), // covers 0:2..=2 and 0:3..=3 but not 1:1..=2
        seg(0, 4, 4),
        seg(1, 4, 4),
        seg(1, 4, 4), // a duplicate counts once
    ];
    assert_eq!(
        redundant_segments(&files),
        vec![seg(0, 1, 1), seg(0, 2, 2), seg(0, 3, 3), seg(0, 4, 4)]
    );
    assert!(redundant_segments(&[seg(0, 1, 5), seg(1, 2, 5)]).is_empty());
}

#[test]
fn retention_in_the_current_generation() {
    // Window [now - retention, now] = [45, 100].
    let l = listing(&[(
        G1,
        vec![
            snap(1, 10),
            seg(0, 2, 3),
            snap(3, 30),
            seg(0, 4, 5),
            snap(6, 60),
            seg(0, 6, 8), // crosses the base: kept
            seg(0, 9, 9),
        ],
    )]);
    let d = plan_retention(&l, &G1, 100, 55);
    // Base = snapshot 3 (newest at or before 45).
    assert_eq!(
        d,
        vec![
            Deletion::File(G1, snap(1, 10)),
            Deletion::File(G1, seg(0, 2, 3)),
        ]
    );
    // Nothing old enough: the oldest snapshot is the base, nothing goes.
    assert!(plan_retention(&l, &G1, 100, 95).is_empty());
    // Everything old: only the newest snapshot and what follows it stay.
    let d = plan_retention(&l, &G1, 1000, 10);
    assert!(!d.contains(&Deletion::File(G1, snap(6, 60))));
    assert!(d.contains(&Deletion::File(G1, seg(0, 4, 5))));
    assert!(!d.contains(&Deletion::File(G1, seg(0, 6, 8))));
    // A huge retention never underflows.
    assert!(plan_retention(&l, &G1, 100, u64::MAX).is_empty());
}

#[test]
fn retention_of_older_generations() {
    let l = listing(&[
        (G1, vec![snap(1, 10)]),
        (G2, vec![snap(1, 50)]),
        (G3, vec![snap(1, 80), seg(0, 2, 3)]),
    ]);
    // Cutoff 60: G2's snapshot (50) is old enough, so G1 goes; G2 stays (G3's is at 80).
    assert_eq!(
        plan_retention(&l, &G3, 100, 40),
        vec![Deletion::Generation(G1)]
    );
    // Cutoff 90: G3 covers everything before it.
    assert_eq!(
        plan_retention(&l, &G3, 100, 10),
        vec![Deletion::Generation(G1), Deletion::Generation(G2)]
    );
    // Cutoff 20: nothing newer is old enough.
    assert!(plan_retention(&l, &G3, 100, 80).is_empty());
    // Generations newer than the current one are never deleted.
    assert_eq!(plan_retention(&l, &G1, 100, 10), vec![]);
}

fn arb_gen() -> impl Strategy<Value = GenerationId> {
    (0u64..4, 0u32..2).prop_map(|(ms, rand)| GenerationId { ms, rand })
}

fn arb_file() -> impl Strategy<Value = FileName> {
    prop_oneof![
        (0u64..40, 0u64..400).prop_map(|(txid, time_ms)| FileName::Snapshot { txid, time_ms }),
        (0u8..4, 0u64..40, 0u64..8, 0u64..400, 0u64..80).prop_map(
            |(level, first, len, ms, dms)| {
                FileName::Segment {
                    level,
                    first,
                    last: first + len,
                    first_ms: ms,
                    last_ms: ms + dms,
                }
            }
        ),
        Just(FileName::Segment {
            level: 0,
            first: u64::MAX - 1,
            last: u64::MAX,
            first_ms: 0,
            last_ms: 0,
        }),
        Just(FileName::Snapshot {
            txid: u64::MAX,
            time_ms: 0,
        }),
    ]
}

fn arb_listing() -> impl Strategy<Value = Listing> {
    proptest::collection::vec(
        (
            arb_gen(),
            proptest::collection::vec((arb_file(), any::<u64>()), 0..30),
        ),
        0..4,
    )
    .prop_map(|generations| Listing { generations })
}

fn arb_want() -> impl Strategy<Value = Want> {
    prop_oneof![
        Just(Want::Latest),
        (arb_gen(), 0u64..50).prop_map(|(g, t)| pos(g, t)),
        Just(pos(GenerationId { ms: 0, rand: 0 }, u64::MAX)),
        (0u64..500).prop_map(Want::TimeMs),
    ]
}

fn range(f: &FileName) -> (u64, u64) {
    match *f {
        FileName::Segment { first, last, .. } => (first, last),
        FileName::Snapshot { .. } => panic!("a snapshot in the segment chain"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::fuzz_cases(512), ..ProptestConfig::default() })]

    #[test]
    fn restore_plans_are_contiguous_chains(l in arb_listing(), w in arb_want()) {
        let Ok(p) = plan_restore(&l, &w) else { return Ok(()); };
        let files: Vec<FileName> = l
            .generations
            .iter()
            .filter(|(g, _)| *g == p.generation)
            .flat_map(|(_, fs)| fs.iter().map(|(f, _)| *f))
            .collect();
        prop_assert!(files.contains(&p.snapshot));
        let FileName::Snapshot { txid, time_ms } = p.snapshot else {
            return Err(TestCaseError::fail("plan starts from a segment"));
        };
        let mut covered = txid;
        for s in &p.segments {
            prop_assert!(files.contains(s));
            let (first, last) = range(s);
            prop_assert!(first <= covered + 1 && covered < last, "{:?} after {}", s, covered);
            covered = last;
        }
        match (w, p.stop) {
            (Want::Latest, Stop::Latest) => {}
            (Want::Position(want), Stop::Txid(t)) => {
                prop_assert_eq!(want.generation, p.generation);
                prop_assert_eq!(want.txid, t);
                prop_assert!(txid <= t && covered >= t);
            }
            (Want::TimeMs(t), Stop::TimeMs(s)) => {
                prop_assert_eq!(t, s);
                prop_assert!(time_ms <= t);
            }
            other => return Err(TestCaseError::fail(format!("stop {other:?}"))),
        }
    }

    #[test]
    fn compaction_and_retention_never_panic(
        l in arb_listing(),
        fanout in 0usize..5,
        g in arb_gen(),
        now in 0u64..500,
        keep in 0u64..500,
    ) {
        for (_, files) in &l.generations {
            let names: Vec<FileName> = files.iter().map(|(f, _)| *f).collect();
            if let Some((level, run)) = plan_compaction(&names, fanout) {
                prop_assert_eq!(run.len(), fanout);
                for pair in run.windows(2) {
                    prop_assert_eq!(range(&pair[0]).1 + 1, range(&pair[1]).0);
                }
                for s in &run {
                    let FileName::Segment { level: l, .. } = *s else { unreachable!() };
                    prop_assert_eq!(l + 1, level);
                }
            }
            let redundant = redundant_segments(&names);
            prop_assert!(redundant.iter().all(|r| names.contains(r)));
        }
        let deletions = plan_retention(&l, &g, now, keep);
        // The current generation's newest snapshot is never deleted.
        let newest = l
            .generations
            .iter()
            .filter(|(id, _)| *id == g)
            .flat_map(|(_, fs)| fs.iter().map(|(f, _)| *f))
            .filter_map(|f| match f {
                FileName::Snapshot { txid, time_ms } => Some((txid, time_ms)),
                FileName::Segment { .. } => None,
            })
            .max();
        if let Some((txid, time_ms)) = newest {
            prop_assert!(!deletions.contains(&Deletion::File(g, snap(txid, time_ms))));
        }
        prop_assert!(!deletions.contains(&Deletion::Generation(g)));
    }
}
