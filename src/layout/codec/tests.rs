//! Round trips, and every decoder error from a constructed bad file.

use super::*;
use proptest::prelude::*;

const PS: u32 = 512;

fn page(byte: u8) -> Vec<u8> {
    vec![byte; PS as usize]
}

fn commit(txid: u64, time_ms: u64, db_pages: u32) -> Commit {
    Commit {
        txid,
        time_ms,
        db_pages,
        db_checksum: txid.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    }
}

/// An owned record, to compare decoded output.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    P(u32, Vec<u8>),
    C(Commit),
}

fn encode(kind: Kind, recs: &[Rec]) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new(), kind, PS, 3).unwrap();
    for r in recs {
        match r {
            Rec::P(n, d) => e.page(*n, d).unwrap(),
            Rec::C(c) => e.commit(c).unwrap(),
        }
    }
    e.finish().unwrap()
}

fn decode(bytes: &[u8], kind: Kind) -> Result<Vec<Rec>, LayoutError> {
    let mut d = Decoder::new(bytes, kind)?;
    let mut out = Vec::new();
    while let Some(r) = d.next()? {
        out.push(match r {
            Record::Page { pgno, data } => Rec::P(pgno, data.to_vec()),
            Record::Commit(c) => Rec::C(c),
        });
    }
    Ok(out)
}

fn segment_records() -> Vec<Rec> {
    vec![
        Rec::P(3, page(3)),
        Rec::P(1, page(1)),
        Rec::C(commit(7, 1000, 3)),
        Rec::C(commit(8, 1000, 3)),
        Rec::P(9, page(9)),
        Rec::C(commit(9, 1005, 9)),
    ]
}

fn snapshot_records() -> Vec<Rec> {
    vec![
        Rec::P(1, page(1)),
        Rec::P(2, page(2)),
        Rec::P(3, page(0)),
        Rec::C(commit(5, 42, 3)),
    ]
}

#[test]
fn round_trips() {
    for (kind, recs) in [
        (Kind::Segment, segment_records()),
        (Kind::Snapshot, snapshot_records()),
    ] {
        let bytes = encode(kind, &recs);
        assert_eq!(decode(&bytes, kind).unwrap(), recs);
        let d = Decoder::new(&bytes[..], kind).unwrap();
        assert_eq!(d.page_size(), PS);
    }
}

/// An encoder on a context handed on by another (whatever that one's kind, level and content)
/// writes the bytes an encoder on a new context writes: nothing of the earlier file is kept.
#[test]
fn a_compressor_handed_on_writes_what_a_new_one_writes() {
    let write = |c: Compressor, kind: Kind, level: i32, recs: &[Rec]| {
        let mut e = Encoder::with_compressor(Vec::new(), kind, PS, level, c).unwrap();
        for r in recs {
            match r {
                Rec::P(n, d) => e.page(*n, d).unwrap(),
                Rec::C(c) => e.commit(c).unwrap(),
            }
        }
        e.finish_keep().unwrap()
    };
    let fresh = |kind, level, recs: &[Rec]| write(Compressor::new().unwrap(), kind, level, recs).0;
    let mut c = Compressor::new().unwrap();
    for (kind, level, recs) in [
        (Kind::Segment, 1, segment_records()),
        (Kind::Snapshot, 3, snapshot_records()),
        (Kind::Segment, -1, segment_records()),
        (Kind::Segment, 1, segment_records()),
    ] {
        let (bytes, next) = write(c, kind, level, &recs);
        assert_eq!(
            bytes,
            fresh(kind, level, &recs),
            "{kind:?} at level {level}"
        );
        assert_eq!(decode(&bytes, kind).unwrap(), recs);
        c = next;
    }
}

#[test]
fn raw_bytes_counts_decompressed_bytes() {
    let mut e = Encoder::new(Vec::new(), Kind::Segment, PS, 1).unwrap();
    assert_eq!(e.raw_bytes(), 0);
    e.page(1, &page(1)).unwrap();
    assert_eq!(e.raw_bytes(), 5 + u64::from(PS));
    e.commit(&commit(1, 1, 1)).unwrap();
    assert_eq!(e.raw_bytes(), 5 + u64::from(PS) + 29);
}

#[test]
fn decoder_returns_none_again_and_error_after_error() {
    let bytes = encode(Kind::Segment, &segment_records());
    let mut d = Decoder::new(&bytes[..], Kind::Segment).unwrap();
    while d.next().unwrap().is_some() {}
    assert!(d.next().unwrap().is_none());
    let mut d = Decoder::new(&bytes[..bytes.len() - 1], Kind::Segment).unwrap();
    let err = loop {
        match d.next() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("truncated file accepted"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, LayoutError::Truncated(_)), "{err}");
    assert!(matches!(d.next(), Err(LayoutError::AfterError)));
}

#[test]
fn encoder_refuses_what_the_decoder_refuses() {
    let mut e = Encoder::new(Vec::new(), Kind::Segment, PS, 1).unwrap();
    let kind = |r: std::io::Result<()>| r.unwrap_err().kind();
    use std::io::ErrorKind::InvalidInput;
    assert_eq!(kind(e.page(1, &[0; 511])), InvalidInput);
    assert_eq!(kind(e.page(0, &page(0))), InvalidInput);
    assert_eq!(kind(e.page((1 << 31) + 1, &page(0))), InvalidInput);
    assert_eq!(kind(e.commit(&commit(1, 1, 0))), InvalidInput);
    e.commit(&commit(1, 10, 1)).unwrap();
    assert_eq!(kind(e.commit(&commit(3, 10, 1))), InvalidInput);
    assert_eq!(kind(e.commit(&commit(2, 9, 1))), InvalidInput);
    e.page(1 << 31, &page(0)).unwrap();
    assert_eq!(e.finish().unwrap_err().kind(), InvalidInput);
    let e = Encoder::new(Vec::new(), Kind::Segment, PS, 1).unwrap();
    assert_eq!(e.finish().unwrap_err().kind(), InvalidInput);
    assert!(Encoder::new(Vec::new(), Kind::Segment, 1000, 1).is_err());
    let mut s = Encoder::new(Vec::new(), Kind::Snapshot, PS, 1).unwrap();
    assert_eq!(kind(s.page(2, &page(0))), InvalidInput);
}

// ---- hand-built files, to reach every decoder check ----

fn p(pgno: u32, byte: u8) -> Vec<u8> {
    let mut v = vec![b'P'];
    v.extend_from_slice(&pgno.to_be_bytes());
    v.extend_from_slice(&page(byte));
    v
}

fn c(txid: u64, time_ms: u64, db_pages: u32) -> Vec<u8> {
    let mut v = vec![b'C'];
    v.extend_from_slice(&txid.to_be_bytes());
    v.extend_from_slice(&time_ms.to_be_bytes());
    v.extend_from_slice(&db_pages.to_be_bytes());
    v.extend_from_slice(&0u64.to_be_bytes());
    v
}

fn e_rec(count: u64, hash: u64) -> Vec<u8> {
    let mut v = vec![b'E'];
    v.extend_from_slice(&count.to_be_bytes());
    v.extend_from_slice(&hash.to_be_bytes());
    v
}

/// The records, then a correct end record.
fn content(records: &[Vec<u8>]) -> Vec<u8> {
    let mut v: Vec<u8> = records.concat();
    let hash = xxhash_rust::xxh3::xxh3_64(&v);
    v.extend(e_rec(records.len() as u64, hash));
    v
}

fn header(kind: u8, version: u8, page_size: u32) -> Vec<u8> {
    let mut v = b"WALSHIP\0".to_vec();
    v.extend_from_slice(&[kind, version, 0, 0]);
    v.extend_from_slice(&page_size.to_be_bytes());
    v
}

fn zstd_frame(content: &[u8], checksum: bool) -> Vec<u8> {
    let mut z = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    z.include_checksum(checksum).unwrap();
    z.write_all(content).unwrap();
    z.finish().unwrap()
}

fn file(kind: u8, content: &[u8]) -> Vec<u8> {
    let mut v = header(kind, 1, PS);
    v.extend(zstd_frame(content, true));
    v
}

fn seg_err(content: &[u8]) -> String {
    decode(&file(b'G', content), Kind::Segment)
        .unwrap_err()
        .to_string()
}

fn snap_err(content: &[u8]) -> String {
    decode(&file(b'S', content), Kind::Snapshot)
        .unwrap_err()
        .to_string()
}

#[test]
fn hand_built_good_file_decodes() {
    let good = content(&[p(1, 1), c(1, 5, 1)]);
    assert_eq!(decode(&file(b'G', &good), Kind::Segment).unwrap().len(), 2);
}

#[test]
fn record_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            content(&[p(1, 1), vec![b'X'], c(1, 5, 1)]),
            "unknown record tag 0x58",
        ),
        (
            content(&[p(0, 1), c(1, 5, 1)]),
            "page number 0 is out of range",
        ),
        (
            content(&[p((1 << 31) + 1, 1), c(1, 5, 1)]),
            "page number 2147483649 is out of range",
        ),
        (
            content(&[p(1, 1), c(1, 5, 0)]),
            "commit 1 says the database has 0 pages",
        ),
        (
            content(&[c(1, 5, 1), c(3, 5, 1)]),
            "commit txid 3 does not follow txid 1",
        ),
        (
            content(&[c(1, 5, 1), c(1, 5, 1)]),
            "commit txid 1 does not follow txid 1",
        ),
        (
            content(&[c(u64::MAX, 5, 1), c(0, 5, 1)]),
            "does not follow txid 18446744073709551615",
        ),
        (
            content(&[c(1, 5, 1), c(2, 4, 1)]),
            "commit 2 time 4 ms is before the previous commit's 5 ms",
        ),
        (
            content(&[c(1, 5, 1), p(1, 1)]),
            "pages after the last commit",
        ),
        (content(&[]), "file has no commit"),
        (content(&[p(1, 1)]), "file has no commit"),
        (
            [c(1, 5, 1), e_rec(2, 0)].concat(),
            "end record counts 2 records, file has 1",
        ),
        (
            {
                let r = c(1, 5, 1);
                let h = xxhash_rust::xxh3::xxh3_64(&r) ^ 1;
                [r, e_rec(1, h)].concat()
            },
            "content hash mismatch",
        ),
        (
            [content(&[c(1, 5, 1)]), vec![0]].concat(),
            "trailing data after the end record",
        ),
        (c(1, 5, 1), "truncated: no end record"),
        (p(1, 1)[..100].to_vec(), "truncated: page record cut short"),
        (p(1, 1)[..3].to_vec(), "truncated: page record cut short"),
        (
            c(1, 5, 1)[..20].to_vec(),
            "truncated: commit record cut short",
        ),
        (
            content(&[c(1, 5, 1)])[..40].to_vec(),
            "truncated: end record cut short",
        ),
    ];
    for (bytes, want) in cases {
        let got = seg_err(&bytes);
        assert!(got.contains(want), "want {want:?}, got {got:?}");
    }
}

#[test]
fn snapshot_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            content(&[p(1, 1), p(3, 1), c(1, 5, 3)]),
            "snapshot page 3 where page 2 was expected",
        ),
        (
            content(&[p(2, 1), c(1, 5, 1)]),
            "snapshot page 2 where page 1 was expected",
        ),
        (
            content(&[p(1, 1), p(1, 1), c(1, 5, 2)]),
            "snapshot page 1 where page 2 was expected",
        ),
        (
            content(&[p(1, 1), p(2, 1), c(1, 5, 3)]),
            "snapshot commit says 3 pages, file holds 2",
        ),
        (
            content(&[p(1, 1), c(1, 5, 1), c(2, 5, 1)]),
            "snapshot has records after its commit",
        ),
        (
            content(&[p(1, 1), c(1, 5, 1), p(1, 1)]),
            "snapshot has records after its commit",
        ),
        (content(&[]), "file has no commit"),
    ];
    for (bytes, want) in cases {
        let got = snap_err(&bytes);
        assert!(got.contains(want), "want {want:?}, got {got:?}");
    }
}

#[test]
fn header_errors() {
    let body = zstd_frame(&content(&[c(1, 5, 1)]), true);
    let with = |h: Vec<u8>| [h, body.clone()].concat();
    let err = |bytes: Vec<u8>| match Decoder::new(&bytes[..], Kind::Segment) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let mut bad_magic = header(b'G', 1, PS);
    bad_magic[0] = b'w';
    let mut reserved = header(b'G', 1, PS);
    reserved[11] = 1;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "truncated: file header"),
        (header(b'G', 1, PS)[..15].to_vec(), "truncated: file header"),
        (header(b'G', 1, PS), "truncated: no compressed data"),
        (with(bad_magic), "not a walship file (bad magic)"),
        (
            with(header(b'S', 1, PS)),
            "expected a segment file, found snapshot",
        ),
        (
            with(header(b'Q', 1, PS)),
            "expected a segment file, found unknown kind 0x51",
        ),
        (
            with(header(b'G', 2, PS)),
            "file format version 2 is newer than this walship supports (1)",
        ),
        (
            with(header(b'G', 0, PS)),
            "invalid file header: format version 0",
        ),
        (
            with(reserved),
            "invalid file header: reserved bytes are not zero",
        ),
        (with(header(b'G', 1, 1000)), "invalid page size 1000"),
        (with(header(b'G', 1, 256)), "invalid page size 256"),
        (with(header(b'G', 1, 1 << 17)), "invalid page size 131072"),
        (
            [header(b'G', 1, PS), b"hello, world".to_vec()].concat(),
            "invalid file header: not a zstd frame",
        ),
        (
            [
                header(b'G', 1, PS),
                zstd_frame(&content(&[c(1, 5, 1)]), false),
            ]
            .concat(),
            "invalid file header: the zstd frame has no content checksum",
        ),
    ];
    for (bytes, want) in cases {
        let got = err(bytes);
        assert_eq!(got, want);
    }
}

/// After a snapshot's frame, nothing may follow; after a segment part's frame, only a whole
/// next part: anything else is an error, after which the first part is reported complete.
#[test]
fn data_after_the_frame_is_an_error() {
    let good = encode(Kind::Snapshot, &snapshot_records());
    let second = encode(Kind::Snapshot, &snapshot_records());
    for extra in [vec![0u8], b"junk".to_vec(), good[16..].to_vec(), second] {
        let bytes = [good.clone(), extra].concat();
        let got = decode(&bytes, Kind::Snapshot).unwrap_err().to_string();
        assert_eq!(got, "trailing data after the end record");
    }
    let good = encode(Kind::Segment, &segment_records());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0u8], "truncated: part header cut short"),
        (b"junk".to_vec(), "truncated: part header cut short"),
        (good[16..].to_vec(), "not a walship file (bad magic)"),
        (vec![0u8; 64], "not a walship file (bad magic)"),
        (header(b'G', 1, PS), "truncated: no compressed data"),
    ];
    for (extra, want) in cases {
        let bytes = [good.clone(), extra].concat();
        let (recs, last, err) = decode_parts(&bytes, Kind::Segment);
        assert_eq!(recs, segment_records());
        assert_eq!(err.map(|e| e.to_string()).as_deref(), Some(want));
        assert_eq!(last.map(|c| c.txid), Some(9));
    }
}

/// Decodes as far as it goes: the records read, the last complete commit, the error.
fn decode_parts(bytes: &[u8], kind: Kind) -> (Vec<Rec>, Option<Commit>, Option<LayoutError>) {
    let mut d = match Decoder::new(bytes, kind) {
        Ok(d) => d,
        Err(e) => return (Vec::new(), None, Some(e)),
    };
    let mut out = Vec::new();
    let err = loop {
        match d.next() {
            Ok(Some(Record::Page { pgno, data })) => out.push(Rec::P(pgno, data.to_vec())),
            Ok(Some(Record::Commit(c))) => out.push(Rec::C(c)),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    (out, d.last_complete(), err)
}

/// Three parts continuing one another: commits 7..=9, 10..=11, 12.
fn three_parts() -> Vec<Vec<Rec>> {
    vec![
        segment_records(),
        vec![
            Rec::P(2, page(2)),
            Rec::C(commit(10, 1005, 9)),
            Rec::P(9, page(7)),
            Rec::P(1, page(4)),
            Rec::C(commit(11, 1010, 9)),
        ],
        vec![Rec::P(12, page(12)), Rec::C(commit(12, 1020, 12))],
    ]
}

#[test]
fn multi_part_segments_decode_as_one_run() {
    let parts = three_parts();
    let bytes: Vec<u8> = parts
        .iter()
        .flat_map(|p| encode(Kind::Segment, p))
        .collect();
    let (recs, last, err) = decode_parts(&bytes, Kind::Segment);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(recs, parts.concat());
    assert_eq!(last.map(|c| c.txid), Some(12));
    let mut d = Decoder::new(&bytes[..], Kind::Segment).unwrap();
    let mut completes = Vec::new();
    while let Some(r) = d.next().unwrap() {
        if let Record::Commit(c) = r {
            completes.push((
                c.txid,
                d.parts_complete(),
                d.last_complete().map(|c| c.txid),
            ));
        }
    }
    // A part is complete once its end record is read: after its last commit was returned.
    assert_eq!(
        completes,
        [
            (7, 0, None),
            (8, 0, None),
            (9, 0, None),
            (10, 1, Some(9)),
            (11, 1, Some(9)),
            (12, 2, Some(11)),
        ]
    );
    assert_eq!(d.parts_complete(), 3);
    assert_eq!(d.last_complete().map(|c| c.txid), Some(12));
    // `next_placed` says the same for each record, pages included.
    let mut d = Decoder::new(&bytes[..], Kind::Segment).unwrap();
    let mut placed = Vec::new();
    while let Some((r, done)) = d.next_placed().unwrap() {
        let what = match r {
            Record::Page { pgno, .. } => u64::from(pgno) << 32,
            Record::Commit(c) => c.txid,
        };
        placed.push((what, done.map(|c| c.txid)));
    }
    let p = |pgno: u64| pgno << 32;
    assert_eq!(
        placed,
        [
            (p(3), None),
            (p(1), None),
            (7, None),
            (8, None),
            (p(9), None),
            (9, None),
            (p(2), Some(9)),
            (10, Some(9)),
            (p(9), Some(9)),
            (p(1), Some(9)),
            (11, Some(9)),
            (p(12), Some(11)),
            (12, Some(11)),
        ]
    );
}

#[test]
fn parts_must_continue_one_another() {
    let first = encode(Kind::Segment, &segment_records());
    let seg = |recs: &[Rec]| encode(Kind::Segment, recs);
    let mut other_ps = Encoder::new(Vec::new(), Kind::Segment, 1024, 3).unwrap();
    other_ps.page(1, &[1; 1024]).unwrap();
    other_ps.commit(&commit(10, 1005, 1)).unwrap();
    let other_ps = other_ps.finish().unwrap();
    let mut v0 = seg(&[Rec::C(commit(10, 1005, 9))]);
    v0[9] = 0;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            seg(&[Rec::C(commit(11, 1005, 9))]),
            "commit txid 11 does not follow txid 9",
        ),
        (
            seg(&[Rec::C(commit(9, 1005, 9))]),
            "commit txid 9 does not follow txid 9",
        ),
        (
            seg(&[Rec::C(commit(10, 1004, 9))]),
            "commit 10 time 1004 ms is before the previous commit's 1005 ms",
        ),
        (
            other_ps,
            "a part of the file does not continue the one before: page size 1024 after page size 512",
        ),
        (
            encode(Kind::Snapshot, &snapshot_records()),
            "expected a segment file, found snapshot",
        ),
        (v0, "invalid file header: format version 0"),
        (
            [header(b'G', 1, PS), zstd_frame(&content(&[]), true)].concat(),
            "file has no commit",
        ),
        (
            [header(b'G', 1, PS), zstd_frame(&content(&[p(1, 1)]), true)].concat(),
            "file has no commit",
        ),
        (
            [
                header(b'G', 1, PS),
                zstd_frame(&content(&[c(10, 1005, 1), p(1, 1)]), true),
            ]
            .concat(),
            "pages after the last commit",
        ),
        (
            [
                header(b'G', 1, PS),
                zstd_frame(&[c(10, 1005, 1), e_rec(2, 0)].concat(), true),
            ]
            .concat(),
            "end record counts 2 records, file has 1",
        ),
    ];
    for (second, want) in cases {
        let bytes = [first.clone(), second].concat();
        let (recs, last, err) = decode_parts(&bytes, Kind::Segment);
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, want);
        assert!(recs.starts_with(&segment_records()));
        assert_eq!(last.map(|c| c.txid), Some(9), "{want}");
    }
    // A part's end record counts its own records and hashes its own content only.
    let second = [
        header(b'G', 1, PS),
        zstd_frame(&content(&[c(10, 1005, 1), c(11, 1006, 1)]), true),
    ]
    .concat();
    let (recs, last, err) = decode_parts(&[first.clone(), second].concat(), Kind::Segment);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(recs.len(), segment_records().len() + 2);
    assert_eq!(last.map(|c| c.txid), Some(11));
}

/// A file cut anywhere in its last part (a reader raced an append, a crash cut it): never a
/// panic, never a success, and the parts before it are reported complete.
#[test]
fn a_torn_last_part_leaves_the_complete_parts_complete() {
    let parts = three_parts();
    let enc: Vec<Vec<u8>> = parts.iter().map(|p| encode(Kind::Segment, p)).collect();
    let whole = enc.concat();
    let start = enc[0].len() + enc[1].len();
    let before: Vec<Rec> = parts[..2].concat();
    for n in start + 1..whole.len() {
        let (recs, last, err) = decode_parts(&whole[..n], Kind::Segment);
        let err = err.unwrap_or_else(|| panic!("cut at {n} of {} accepted", whole.len()));
        assert!(
            matches!(err, LayoutError::Truncated(_)),
            "cut at {n}: {err}"
        );
        assert_eq!(last.map(|c| c.txid), Some(11), "cut at {n}");
        assert!(recs.starts_with(&before), "cut at {n}");
    }
    // Cut right at the boundary, the file is the two complete parts.
    let (recs, last, err) = decode_parts(&whole[..start], Kind::Segment);
    assert!(err.is_none());
    assert_eq!(recs, before);
    assert_eq!(last.map(|c| c.txid), Some(11));
}

/// Any byte of the last part changed: the first two parts stay complete; the third is an
/// error or (rarely, see `every_bit_flip_is_an_error_or_harmless`) exactly the original.
#[test]
fn a_damaged_last_part_leaves_the_complete_parts_complete() {
    let parts = three_parts();
    let enc: Vec<Vec<u8>> = parts.iter().map(|p| encode(Kind::Segment, p)).collect();
    let whole = enc.concat();
    let start = enc[0].len() + enc[1].len();
    for i in start..whole.len() {
        let mut bad = whole.clone();
        bad[i] ^= 0x21;
        let (recs, last, err) = decode_parts(&bad, Kind::Segment);
        match err {
            Some(LayoutError::Io(e)) => panic!("byte {i}: read error {e}"),
            Some(_) => assert_eq!(last.map(|c| c.txid), Some(11), "byte {i}"),
            None => assert_eq!(recs, parts.concat(), "byte {i}"),
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    for (kind, recs) in [
        (Kind::Segment, segment_records()),
        (Kind::Snapshot, snapshot_records()),
    ] {
        let good = encode(kind, &recs);
        for n in 0..good.len() {
            match decode(&good[..n], kind) {
                Ok(_) => panic!("truncation at {n} of {} accepted", good.len()),
                Err(LayoutError::Truncated(_)) => {}
                // Cutting inside the zstd header may leave a different-looking frame.
                Err(e) => assert!(n < 16 + 18, "cut at {n}: {e}"),
            }
        }
    }
}

/// A flipped bit is an error, or (rarely) decodes to exactly the original content: zstd's window
/// size hint, or a match offset that copies identical bytes from elsewhere, can change without
/// changing the output, which both checksums verify. Never a wrong success.
#[test]
fn every_bit_flip_is_an_error_or_harmless() {
    for (kind, recs) in [
        (Kind::Segment, segment_records()),
        (Kind::Snapshot, snapshot_records()),
    ] {
        let good = encode(kind, &recs);
        let mut harmless = 0;
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                if let Ok(got) = decode(&bad, kind) {
                    assert_eq!(got, recs, "flip of bit {bit} in byte {byte}");
                    harmless += 1;
                }
            }
        }
        assert!(harmless * 50 < good.len() * 8, "{harmless} harmless flips");
    }
}

#[test]
fn content_corruption_is_reported_as_corrupt() {
    let good = encode(Kind::Segment, &segment_records());
    // The last 4 bytes are zstd's content checksum.
    let mut bad = good.clone();
    let at = bad.len() - 2;
    bad[at] ^= 0x40;
    let got = decode(&bad, Kind::Segment).unwrap_err();
    assert!(matches!(got, LayoutError::Corrupt(_)), "{got}");
}

/// A reader that fails after `ok` bytes.
struct Failing<'a> {
    data: &'a [u8],
    ok: usize,
}

impl Read for Failing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ok == 0 {
            return Err(io::Error::other("network down"));
        }
        let n = buf.len().min(self.ok).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.ok -= n;
        Ok(n)
    }
}

#[test]
fn read_errors_are_reported_as_such() {
    let good = encode(Kind::Segment, &segment_records());
    for ok in [0, 10, 16, 30, good.len() - 3] {
        let r = Failing { data: &good, ok };
        let got = match Decoder::new(r, Kind::Segment) {
            Err(e) => e,
            Ok(mut d) => loop {
                match d.next() {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("accepted"),
                    Err(e) => break e,
                }
            },
        };
        assert_eq!(got.to_string(), "read failed: network down", "ok = {ok}");
    }
}

#[test]
fn large_pages_round_trip() {
    let ps = 65536;
    let mut e = Encoder::new(Vec::new(), Kind::Snapshot, ps, 3).unwrap();
    let data: Vec<u8> = (0..ps).map(|i| (i % 251) as u8).collect();
    e.page(1, &data).unwrap();
    e.page(2, &data).unwrap();
    e.commit(&commit(1, 1, 2)).unwrap();
    let bytes = e.finish().unwrap();
    assert!(bytes.len() < 2 * ps as usize);
    let mut d = Decoder::new(&bytes[..], Kind::Snapshot).unwrap();
    assert_eq!(d.page_size(), ps);
    let mut pages = 0;
    while let Some(r) = d.next().unwrap() {
        if let Record::Page { data: got, .. } = r {
            assert_eq!(got, &data[..]);
            pages += 1;
        }
    }
    assert_eq!(pages, 2);
}

/// Decodes until the end or an error; must terminate.
fn drain(bytes: &[u8], kind: Kind) -> Result<usize, LayoutError> {
    let mut d = Decoder::new(bytes, kind)?;
    let mut n = 0;
    while d.next()?.is_some() {
        n += 1;
        assert!(n <= bytes.len() + 1, "more records than bytes");
    }
    Ok(n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::fuzz_cases(256), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = drain(&bytes, Kind::Segment);
        let mut with_header = header(b'G', 1, PS);
        with_header.extend_from_slice(&bytes);
        let _ = drain(&with_header, Kind::Segment);
    }

    #[test]
    fn arbitrary_content_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..1200),
        seal in any::<bool>(),
        kind in prop_oneof![Just(Kind::Segment), Just(Kind::Snapshot)],
    ) {
        // Arbitrary records inside a valid zstd frame; sometimes with a correct end record.
        let body = if seal {
            let mut v = bytes.clone();
            v.extend(e_rec(0, xxhash_rust::xxh3::xxh3_64(&bytes)));
            v
        } else {
            bytes.clone()
        };
        let f = file(if kind == Kind::Segment { b'G' } else { b'S' }, &body);
        let _ = drain(&f, kind);
    }

    #[test]
    fn mutations_of_a_multi_part_file_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut bad: Vec<u8> = three_parts().iter().flat_map(|p| encode(Kind::Segment, p)).collect();
        for (at, x) in flips {
            let i = at % bad.len();
            bad[i] ^= x;
        }
        bad.truncate(cut % (bad.len() + 1));
        let _ = drain(&bad, Kind::Segment);
        let (_, last, _) = decode_parts(&bad, Kind::Segment);
        if let Some(c) = last {
            prop_assert!((9..=12).contains(&c.txid));
        }
    }

    #[test]
    fn mutations_of_a_good_file_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mut bad = encode(Kind::Segment, &segment_records());
        for (at, x) in flips {
            let i = at % bad.len();
            bad[i] ^= x;
        }
        let _ = drain(&bad, Kind::Segment);
    }
}
