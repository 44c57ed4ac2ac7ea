//! Tests on real WAL files written by SQLite (bundled with rusqlite).

use super::*;
use proptest::prelude::*;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Walks `wal` frame by frame; returns the header and every valid frame.
fn walk(wal: &[u8]) -> Result<(WalHeader, Vec<FrameHeader>), WalError> {
    let header = WalHeader::parse(wal)?;
    let mut running = header.checksum;
    let mut frames = Vec::new();
    let mut off = WAL_HEADER_SIZE;
    loop {
        let fh = wal.get(off..off + FRAME_HEADER_SIZE);
        let page = wal.get(off + FRAME_HEADER_SIZE..off + header.frame_size());
        let (Some(fh), Some(page)) = (fh, page) else {
            break;
        };
        match header.check_frame(running, fh, page) {
            Some((frame, next)) => {
                frames.push(frame);
                running = next;
            }
            None => break,
        }
        off += header.frame_size();
    }
    Ok((header, frames))
}

/// Opens a WAL-mode database that never checkpoints on its own.
fn open(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.execute_batch("PRAGMA wal_autocheckpoint=0;").unwrap();
    conn
}

fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Number of frames SQLite says its WAL holds (from a passive checkpoint's "log" column).
fn sqlite_frame_count(conn: &Connection) -> i64 {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .unwrap()
}

const INSERTS: usize = 10;

/// A real WAL: CREATE TABLE + `INSERTS` one-row commits + one multi-page commit.
/// Returns (wal bytes, commits, frames SQLite counts).
fn real_wal() -> &'static (Vec<u8>, usize, i64) {
    static WAL: OnceLock<(Vec<u8>, usize, i64)> = OnceLock::new();
    WAL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let conn = open(&db);
        conn.execute_batch("CREATE TABLE t(x INTEGER PRIMARY KEY, y BLOB)")
            .unwrap();
        for i in 0..INSERTS {
            conn.execute("INSERT INTO t(y) VALUES (?1)", [vec![i as u8; 100]])
                .unwrap();
        }
        conn.execute("INSERT INTO t(y) VALUES (zeroblob(20000))", [])
            .unwrap();
        let bytes = std::fs::read(wal_path(&db)).unwrap();
        let frames = sqlite_frame_count(&conn);
        (bytes, INSERTS + 2, frames)
    })
}

#[test]
fn header_of_a_real_wal_parses() {
    let (wal, _, _) = real_wal();
    let h = WalHeader::parse(wal).unwrap();
    assert_eq!(h.page_size, 4096);
    assert_eq!(h.big_endian_checksums, cfg!(target_endian = "big"));
    assert_eq!(h.frame_size(), 4096 + 24);
}

#[test]
fn walk_finds_every_frame_and_commit() {
    let (wal, commits, frames) = real_wal();
    let (h, found) = walk(wal).unwrap();
    assert_eq!(found.len() as i64, *frames);
    assert_eq!(found.iter().filter(|f| f.is_commit()).count(), *commits);
    assert!(found.last().unwrap().is_commit());
    assert_eq!(wal.len(), WAL_HEADER_SIZE + found.len() * h.frame_size());
}

#[test]
fn flipped_bit_in_a_page_stops_the_walk_there() {
    let (wal, _, _) = real_wal();
    let (h, all) = walk(wal).unwrap();
    for k in [0, 3, all.len() - 1] {
        let mut bad = wal.clone();
        let at = WAL_HEADER_SIZE + k * h.frame_size() + FRAME_HEADER_SIZE + 100;
        bad[at] ^= 0x10;
        let (_, found) = walk(&bad).unwrap();
        assert_eq!(found.len(), k, "flip in frame {k}");
    }
}

#[test]
fn header_rejections() {
    let (wal, _, _) = real_wal();
    let h = &wal[..WAL_HEADER_SIZE];
    assert_eq!(WalHeader::parse(&h[..31]), Err(WalError::TooShort(31)));
    let mut bad = h.to_vec();
    bad[3] = 0x84;
    assert_eq!(WalHeader::parse(&bad), Err(WalError::BadMagic(0x377f_0684)));
    let mut bad = h.to_vec();
    bad[7] ^= 1;
    assert!(matches!(
        WalHeader::parse(&bad),
        Err(WalError::BadVersion(_))
    ));
    let mut bad = h.to_vec();
    bad[8..12].copy_from_slice(&1000u32.to_be_bytes());
    assert_eq!(WalHeader::parse(&bad), Err(WalError::BadPageSize(1000)));
    let mut bad = h.to_vec();
    bad[17] ^= 1; // salt1
    assert_eq!(WalHeader::parse(&bad), Err(WalError::HeaderChecksum));
    assert_eq!(
        WalError::HeaderChecksum.to_string(),
        "wal header checksum mismatch"
    );
}

#[test]
fn wrong_slice_lengths_and_page_zero_are_refused() {
    let (wal, _, _) = real_wal();
    let h = WalHeader::parse(wal).unwrap();
    let fh = &wal[32..56];
    let page = &wal[56..56 + 4096];
    assert!(h.check_frame(h.checksum, fh, page).is_some());
    assert!(h.check_frame(h.checksum, &fh[..23], page).is_none());
    assert!(h.check_frame(h.checksum, fh, &page[..4095]).is_none());
    assert!(h.check_frame([1, 2], fh, page).is_none());
    let mut zero = fh.to_vec();
    zero[..4].copy_from_slice(&[0; 4]);
    assert!(h.check_frame(h.checksum, &zero, page).is_none());
}

#[test]
fn stale_frames_after_a_wal_restart_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let conn = open(&db);
    conn.execute_batch("CREATE TABLE t(x INTEGER PRIMARY KEY, y BLOB)")
        .unwrap();
    for i in 0..20 {
        conn.execute("INSERT INTO t(y) VALUES (?1)", [vec![i as u8; 3000]])
            .unwrap();
    }
    let before = std::fs::read(wal_path(&db)).unwrap();
    let (old, old_frames) = walk(&before).unwrap();
    // Copy every frame into the database, so the next writer restarts the WAL.
    let (busy, log, done): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((busy, log), (0, done));
    conn.execute("INSERT INTO t(y) VALUES (x'01')", []).unwrap();
    let after = std::fs::read(wal_path(&db)).unwrap();
    assert_eq!(
        after.len(),
        before.len(),
        "the restarted WAL reuses the file"
    );
    let (new, new_frames) = walk(&after).unwrap();
    assert_eq!(new.salt1, old.salt1.wrapping_add(1));
    assert_ne!(new.salt2, old.salt2);
    assert!(new_frames.len() < old_frames.len());
    assert_eq!(new_frames.iter().filter(|f| f.is_commit()).count(), 1);
    assert_eq!(new_frames.len() as i64, sqlite_frame_count(&conn));
    // The old frames are still in the file, but the new header refuses them.
    let off = WAL_HEADER_SIZE + new_frames.len() * new.frame_size();
    let stale = &after[off..off + new.frame_size()];
    assert_eq!(stale, &before[off..off + new.frame_size()]);
}

#[test]
fn checksum_matches_known_values() {
    assert_eq!(checksum(false, [0, 0], &[]), [0, 0]);
    let data = [1, 0, 0, 0, 2, 0, 0, 0];
    assert_eq!(checksum(false, [0, 0], &data), [1, 3]);
    assert_eq!(checksum(true, [0, 0], &data), [0x0100_0000, 0x0300_0000]);
    // Trailing bytes are ignored, never a panic.
    assert_eq!(checksum(false, [0, 0], &data[..7]), [0, 0]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::fuzz_cases(256), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = walk(&bytes);
        let mut with_magic = MAGIC_LE.to_be_bytes().to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = walk(&with_magic);
    }

    #[test]
    fn mutated_real_wal_never_panics(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let (wal, _, _) = real_wal();
        let full = walk(wal).unwrap().1.len();
        let mut bad = wal.clone();
        for (at, x) in flips {
            let i = at % bad.len();
            bad[i] ^= x;
        }
        bad.truncate(cut % (bad.len() + 1));
        if let Ok((_, frames)) = walk(&bad) {
            prop_assert!(frames.len() <= full);
        }
    }
}

/// A mark after every frame of a real WAL holds all of it; a mark one frame short, a WAL
/// restarted with other salts, or a header cut short do not.
#[test]
fn a_mark_holds_a_wal_only_up_to_its_end() {
    let (wal, _, _) = real_wal();
    let (h, frames) = walk(wal).expect("valid wal");
    let n = frames.len() as u64;
    let mark = |frames| WalMark::after(h.salt1, h.salt2, h.page_size, frames).expect("fits");
    let end = mark(n);
    assert_eq!(
        end.next as usize,
        wal.len(),
        "the real WAL ends after its last frame"
    );
    assert!(end.holds_all(wal, at_of(wal, end)));
    let short = mark(n - 1);
    assert!(
        !short.holds_all(wal, at_of(wal, short)),
        "a frame past the mark"
    );
    // Leftovers of an older WAL (other salts) past the mark are not frames of this one.
    let mut old = wal[..usize::try_from(short.next).expect("fits")].to_vec();
    let mut stale = wal[usize::try_from(short.next).expect("fits")..].to_vec();
    stale[8] ^= 0xff;
    old.extend_from_slice(&stale);
    assert!(short.holds_all(&old, at_of(&old, short)));
    // A restarted WAL: the header has new salts.
    let mut restarted = wal.clone();
    restarted[16] ^= 0xff;
    assert!(!end.holds_all(&restarted, at_of(&restarted, end)));
    assert!(!end.holds_all(&wal[..20], &[]), "a header cut short");
    assert!(
        end.holds_all(wal, &at_of(wal, end)[..0]),
        "the file ends at the mark"
    );
}

/// The bytes of `wal` from the mark's offset on.
fn at_of(wal: &[u8], m: WalMark) -> &[u8] {
    wal.get(usize::try_from(m.next).expect("fits")..)
        .unwrap_or(&[])
}
