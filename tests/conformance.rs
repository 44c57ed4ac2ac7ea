//! The conformance suite that every storage target must pass, as named cases: each case is a
//! function here taking a fresh, empty target, and [`conformance_suite!`] makes one `#[test]`
//! per case for a target, so a failure names both (`backend_sftp::conformance_sftp::list_sorted`).
//! A new target is one macro call in its test module. The cases check the invariants documented
//! on `walship::backend::Backend`; the append and rename cases run on targets whose
//! `can_append()` is true, and on the others check that both are refused.
//!
//! Invariant: every case function is listed in the macro (an unlisted one is dead code, which
//! `clippy -D warnings` refuses), and no case depends on another having run.

use std::any::Any;
use std::io::Read;
use walship::backend::{Backend, ErrorKind};
use walship::durable::TEMP_PREFIX;

/// A fresh, empty target for one case, with whatever must outlive it (a temp dir, an sshd),
/// dropped after the target.
pub struct Fixture {
    backend: Box<dyn Backend>,
    _keep: Box<dyn Any>,
}

impl Fixture {
    pub fn new(backend: impl Backend + 'static, keep: impl Any) -> Fixture {
        Fixture {
            backend: Box::new(backend),
            _keep: Box::new(keep),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }
}

/// `conformance_suite!(MODULE, MAKE)`: a module `MODULE` with one `#[test]` per conformance
/// case, each on a target from `MAKE(case_name) -> Fixture` (the name keeps the cases' remote
/// directories apart).
macro_rules! conformance_suite {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance::conformance_suite!(@cases $make;
                empty_and_missing_dirs_list_empty,
                missing_file_is_not_found_and_deletes,
                write_round_trips_with_parents,
                list_sorted_with_sizes_and_dirs,
                overwrite_replaces,
                failed_write_leaves_nothing,
                big_write_round_trips,
                failed_big_write_leaves_nothing,
                bad_paths_refused,
                delete_makes_not_found,
                remove_dir_only_when_empty,
                append_grows_a_file,
                append_at_a_shorter_offset_cuts,
                rename_replaces_and_appends_follow,
                append_and_rename_missing_are_not_found,
                append_and_rename_check_paths,
                append_refused_where_unsupported,
            );
        }
    };
    (@cases $make:expr; $($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                let make = $make;
                let fixture: $crate::conformance::Fixture = make(stringify!($case));
                $crate::conformance::$case(fixture.backend());
            }
        )+
    };
}
pub(crate) use conformance_suite;

/// Checks a listed `size` of a file written with `plain` bytes: equal, or on an encrypting
/// target within age's overhead.
fn assert_size(t: &dyn Backend, size: u64, plain: u64) {
    if t.encryption().is_some() {
        let (lo, hi) = walship::backend::encrypted::stored_size_bounds(plain);
        assert!(
            (lo..=hi).contains(&size),
            "{size} bytes listed for {plain} encrypted"
        );
    } else {
        assert_eq!(size, plain);
    }
}

fn read_all(t: &dyn Backend, path: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    t.read(path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    buf
}

/// A body of 3 MB that is not a repeated pattern.
fn big_body() -> Vec<u8> {
    (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// Writes `a/b/small`, `a/big` and `a/empty` (the tree the later cases work on).
fn populate(t: &dyn Backend) {
    t.write_atomic("a/b/small", &mut &b"hello walship"[..])
        .expect("write small");
    t.write_atomic("a/big", &mut &big_body()[..])
        .expect("write big");
    t.write_atomic("a/empty", &mut &b""[..])
        .expect("write empty");
}

/// An empty or missing directory lists as empty.
pub fn empty_and_missing_dirs_list_empty(t: &dyn Backend) {
    assert!(
        t.list("").expect("list root").is_empty(),
        "target must start empty"
    );
    assert!(t.list("no/such/dir").expect("list missing dir").is_empty());
}

/// Missing files are NotFound; deleting them succeeds.
pub fn missing_file_is_not_found_and_deletes(t: &dyn Backend) {
    let e = t
        .read("missing")
        .err()
        .expect("reading a missing file must fail");
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    t.delete("missing")
        .expect("deleting a missing file succeeds");
}

/// Writes create parent directories and round-trip exactly, including large and empty bodies.
pub fn write_round_trips_with_parents(t: &dyn Backend) {
    let small = b"hello walship".to_vec();
    let n = t
        .write_atomic("a/b/small", &mut &small[..])
        .expect("write small");
    assert_eq!(n, small.len() as u64);
    assert_eq!(read_all(t, "a/b/small"), small);
    let big = big_body();
    t.write_atomic("a/big", &mut &big[..]).expect("write big");
    assert_eq!(read_all(t, "a/big"), big);
    let empty: Vec<u8> = Vec::new();
    t.write_atomic("a/empty", &mut &empty[..])
        .expect("write empty");
    assert_eq!(read_all(t, "a/empty"), empty);
}

/// Listings are sorted, carry sizes, mark directories, and hide temporary files.
pub fn list_sorted_with_sizes_and_dirs(t: &dyn Backend) {
    populate(t);
    let l = t.list("a").expect("list a");
    let names: Vec<_> = l.iter().map(|e| (e.name.as_str(), e.is_dir)).collect();
    assert_eq!(names, vec![("b", true), ("big", false), ("empty", false)]);
    assert_size(t, l[1].size, big_body().len() as u64);
}

/// Overwriting replaces the content atomically.
pub fn overwrite_replaces(t: &dyn Backend) {
    populate(t);
    t.write_atomic("a/b/small", &mut &b"v2"[..])
        .expect("overwrite");
    assert_eq!(read_all(t, "a/b/small"), b"v2");
}

/// A reader that gives `.0` bytes, then fails.
struct Failing(usize);

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Err(std::io::Error::other("source broke"));
        }
        let n = buf.len().min(self.0).min(65536);
        buf[..n].fill(7);
        self.0 -= n;
        Ok(n)
    }
}

/// A failing reader leaves nothing behind under the final name, and no visible temp file.
pub fn failed_write_leaves_nothing(t: &dyn Backend) {
    populate(t);
    let e = t
        .write_atomic("a/broken", &mut Failing(200_000))
        .expect_err("must fail");
    assert!(
        e.to_string().contains("a/broken"),
        "error must name the file: {e}"
    );
    assert_eq!(
        t.read("a/broken").err().map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
    assert!(t
        .list("a")
        .expect("list")
        .iter()
        .all(|e| !e.name.starts_with(TEMP_PREFIX)));
    t.cleanup("a").expect("cleanup");
}

/// A body of 13 MB, more than two S3 parts of 5 MiB: bigger than one upload on every
/// target, and read back whole.
fn huge_body() -> Vec<u8> {
    (0..13_000_000u32)
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect()
}

/// A body bigger than one upload (an S3 multipart upload) is written whole and read back.
pub fn big_write_round_trips(t: &dyn Backend) {
    let body = huge_body();
    let n = t
        .write_atomic("big/file", &mut &body[..])
        .expect("write huge");
    assert_eq!(n, body.len() as u64);
    assert!(read_all(t, "big/file") == body, "content differs");
    let listed = t.list("big").expect("list");
    assert_eq!(listed.len(), 1);
    assert_size(t, listed[0].size, body.len() as u64);
}

/// A reader failing after several parts leaves nothing readable, and `cleanup` finds nothing
/// left over (S3: the multipart upload was aborted, not left for cleanup).
pub fn failed_big_write_leaves_nothing(t: &dyn Backend) {
    let e = t
        .write_atomic("big/broken", &mut Failing(12_000_000))
        .expect_err("must fail");
    assert!(
        e.to_string().contains("big/broken"),
        "error must name the file: {e}"
    );
    assert_eq!(
        t.read("big/broken").err().map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
    assert!(t.list("big").expect("list").is_empty());
    assert_eq!(
        t.cleanup("big").expect("cleanup"),
        0,
        "nothing left to clean"
    );
}

/// Bad paths are refused before any I/O.
pub fn bad_paths_refused(t: &dyn Backend) {
    for bad in ["../escape", "/abs", "a/../../x", "a//b", ".walship-tmp-x"] {
        assert!(
            t.write_atomic(bad, &mut &b"x"[..]).is_err(),
            "{bad} must be refused"
        );
        assert!(t.read(bad).is_err(), "{bad} must be refused");
        assert!(t.delete(bad).is_err(), "{bad} must be refused");
    }
}

/// A deleted file reads as NotFound.
pub fn delete_makes_not_found(t: &dyn Backend) {
    populate(t);
    t.delete("a/b/small").expect("delete");
    assert_eq!(
        t.read("a/b/small").err().map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
}

/// `remove_dir` leaves a non-empty directory alone, removes an empty one, and succeeds on a
/// missing one.
pub fn remove_dir_only_when_empty(t: &dyn Backend) {
    populate(t);
    t.delete("a/b/small").expect("delete");
    t.remove_dir("a").expect("non-empty dir is left alone");
    assert!(!t.list("a").expect("list").is_empty());
    t.remove_dir("a/b").expect("remove empty dir");
    assert!(t.list("a").expect("list").iter().all(|e| e.name != "b"));
    t.remove_dir("a/b")
        .expect("removing a missing dir succeeds");
}

fn names(t: &dyn Backend, dir: &str) -> Vec<String> {
    t.list(dir)
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .into_iter()
        .map(|e| e.name)
        .collect()
}

fn append(t: &dyn Backend, path: &str, at: u64, data: &[u8]) {
    t.append(path, at, data)
        .unwrap_or_else(|e| panic!("append {} bytes at {at} to {path}: {e}", data.len()));
}

/// Appends go at the given offset, one after the other, and read back as the concatenation
/// (also after switching to another file and back); the listed size follows.
pub fn append_grows_a_file(t: &dyn Backend) {
    if !t.can_append() {
        return;
    }
    t.write_atomic("g/tail", &mut &b"head-"[..]).expect("write");
    append(t, "g/tail", 5, b"one-");
    append(t, "g/tail", 9, b"two");
    assert_eq!(read_all(t, "g/tail"), b"head-one-two");
    t.write_atomic("g/other", &mut &b"x"[..]).expect("write");
    append(t, "g/other", 1, b"y");
    let big = big_body();
    append(t, "g/tail", 12, &big);
    append(t, "g/tail", 12 + big.len() as u64, b"-end");
    let mut want = b"head-one-two".to_vec();
    want.extend_from_slice(&big);
    want.extend_from_slice(b"-end");
    assert!(read_all(t, "g/tail") == want, "content differs");
    assert_eq!(read_all(t, "g/other"), b"xy");
    let l = t.list("g").expect("list");
    assert_eq!(
        l.iter()
            .map(|e| (e.name.as_str(), e.size))
            .collect::<Vec<_>>(),
        vec![("other", 2), ("tail", want.len() as u64)]
    );
}

/// An append at an offset short of the file's end (a torn earlier append) cuts what lay
/// beyond: on a file just opened, and on the one appended to last.
pub fn append_at_a_shorter_offset_cuts(t: &dyn Backend) {
    if !t.can_append() {
        return;
    }
    t.write_atomic("g/a", &mut &b"0123456789"[..])
        .expect("write");
    append(t, "g/a", 4, b"ab");
    assert_eq!(read_all(t, "g/a"), b"0123ab");
    append(t, "g/a", 6, b"cdef");
    append(t, "g/a", 8, b"X");
    assert_eq!(read_all(t, "g/a"), b"0123abcdX");
    append(t, "g/a", 9, b"");
    assert_eq!(read_all(t, "g/a"), b"0123abcdX");
    let l = t.list("g").expect("list");
    assert_eq!(l[0].size, 9);
    // An offset beyond the end would leave a hole: refused, nothing written.
    let e = t.append("g/a", 20, b"hole").expect_err("beyond the end");
    assert!(
        e.to_string().contains("g/a"),
        "error must name the file: {e}"
    );
    assert_eq!(read_all(t, "g/a"), b"0123abcdX");
}

/// A rename replaces an existing target, the old name is gone, and appends go on under the
/// new name; a name written or renamed over gets its new file, never the old one appended to.
pub fn rename_replaces_and_appends_follow(t: &dyn Backend) {
    if !t.can_append() {
        return;
    }
    t.write_atomic("g/a", &mut &b"aaa"[..]).expect("write");
    t.write_atomic("g/b", &mut &b"old b"[..]).expect("write");
    append(t, "g/a", 3, b"+1");
    t.rename("g/a", "g/b").expect("rename over b");
    assert_eq!(names(t, "g"), vec!["b"]);
    assert_eq!(
        t.read("g/a").err().map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(read_all(t, "g/b"), b"aaa+1");
    append(t, "g/b", 5, b"+2");
    t.rename("g/b", "g/c").expect("rename to a new name");
    append(t, "g/c", 7, b"+3");
    assert_eq!(names(t, "g"), vec!["c"]);
    assert_eq!(read_all(t, "g/c"), b"aaa+1+2+3");

    // The file appended to last is replaced by a rename, then by a write.
    t.write_atomic("g/x", &mut &b"new"[..]).expect("write");
    t.rename("g/x", "g/c").expect("rename over c");
    append(t, "g/c", 3, b"!");
    assert_eq!(read_all(t, "g/c"), b"new!");
    t.write_atomic("g/c", &mut &b"fresh"[..])
        .expect("overwrite");
    append(t, "g/c", 5, b"?");
    assert_eq!(read_all(t, "g/c"), b"fresh?");
    assert_eq!(names(t, "g"), vec!["c"]);
}

/// Append and rename on a missing file are NotFound and create nothing, also for a file
/// deleted after it was appended to.
pub fn append_and_rename_missing_are_not_found(t: &dyn Backend) {
    if !t.can_append() {
        return;
    }
    let kind = |r: walship::backend::Result<()>| r.err().map(|e| e.kind);
    assert_eq!(kind(t.append("g/none", 0, b"x")), Some(ErrorKind::NotFound));
    t.write_atomic("g/y", &mut &b"y"[..]).expect("write");
    assert_eq!(kind(t.append("g/none", 0, b"x")), Some(ErrorKind::NotFound));
    assert_eq!(kind(t.rename("g/none", "g/z")), Some(ErrorKind::NotFound));
    assert_eq!(kind(t.rename("h/none", "h/z")), Some(ErrorKind::NotFound));
    let e = t.rename("g/none", "g/z").expect_err("missing");
    assert!(
        e.to_string().contains("g/none"),
        "error must name the file: {e}"
    );
    append(t, "g/y", 1, b"1");
    t.delete("g/y").expect("delete");
    assert_eq!(kind(t.append("g/y", 2, b"2")), Some(ErrorKind::NotFound));
    assert!(names(t, "g").is_empty());
}

/// Bad paths are refused before any I/O, and so is a rename to another directory.
pub fn append_and_rename_check_paths(t: &dyn Backend) {
    t.write_atomic("a/x", &mut &b"x"[..]).expect("write");
    for bad in [
        "../escape",
        "/abs",
        "a/../../x",
        "a//b",
        ".walship-tmp-x",
        "",
    ] {
        assert!(t.append(bad, 0, b"x").is_err(), "{bad:?} must be refused");
        assert!(t.rename(bad, "a/y").is_err(), "{bad:?} must be refused");
        assert!(t.rename("a/x", bad).is_err(), "{bad:?} must be refused");
    }
    assert!(t.rename("a/x", "b/x").is_err(), "another directory");
    assert_eq!(names(t, "a"), vec!["x"]);
    assert!(t.list("b").expect("list").is_empty());
    assert_eq!(read_all(t, "a/x"), b"x");
}

/// A target that cannot append refuses append and rename with an `Other` error naming the
/// file, and writes nothing.
pub fn append_refused_where_unsupported(t: &dyn Backend) {
    if t.can_append() {
        return;
    }
    t.write_atomic("g/f", &mut &b"data"[..]).expect("write");
    let e = t.append("g/f", 4, b"more").expect_err("cannot append");
    assert_eq!(e.kind, ErrorKind::Other, "{e}");
    assert!(
        e.to_string().contains("g/f"),
        "error must name the file: {e}"
    );
    let e = t.rename("g/f", "g/h").expect_err("cannot rename");
    assert_eq!(e.kind, ErrorKind::Other, "{e}");
    assert!(
        e.to_string().contains("g/f"),
        "error must name the file: {e}"
    );
    assert_eq!(names(t, "g"), vec!["f"]);
    assert_eq!(read_all(t, "g/f"), b"data");
}
