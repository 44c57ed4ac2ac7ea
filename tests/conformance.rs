//! The conformance suite that every storage target must pass. Each target's test calls
//! [`run`] with a fresh, empty target; the suite checks the invariants documented on
//! `walship::backend::Backend`.

use std::io::Read;
use walship::backend::{Backend, ErrorKind};
use walship::durable::TEMP_PREFIX;

fn read_all(t: &dyn Backend, path: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    t.read(path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    buf
}

/// Runs every conformance check against `t`, which must be empty.
pub fn run(t: &dyn Backend) {
    // An empty or missing directory lists as empty.
    assert!(
        t.list("").expect("list root").is_empty(),
        "target must start empty"
    );
    assert!(t.list("no/such/dir").expect("list missing dir").is_empty());

    // Missing files are NotFound; deleting them succeeds.
    let e = t
        .read("missing")
        .err()
        .expect("reading a missing file must fail");
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    t.delete("missing")
        .expect("deleting a missing file succeeds");

    // Writes create parent directories and round-trip exactly, including large bodies.
    let small = b"hello walship".to_vec();
    let n = t
        .write_atomic("a/b/small", &mut &small[..])
        .expect("write small");
    assert_eq!(n, small.len() as u64);
    assert_eq!(read_all(t, "a/b/small"), small);
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    t.write_atomic("a/big", &mut &big[..]).expect("write big");
    assert_eq!(read_all(t, "a/big"), big);
    let empty: Vec<u8> = Vec::new();
    t.write_atomic("a/empty", &mut &empty[..])
        .expect("write empty");
    assert_eq!(read_all(t, "a/empty"), empty);

    // Listings are sorted, carry sizes, mark directories, and hide temporary files.
    let l = t.list("a").expect("list a");
    let names: Vec<_> = l.iter().map(|e| (e.name.as_str(), e.is_dir)).collect();
    assert_eq!(names, vec![("b", true), ("big", false), ("empty", false)]);
    assert_eq!(l[1].size, big.len() as u64);

    // Overwriting replaces the content atomically.
    t.write_atomic("a/b/small", &mut &b"v2"[..])
        .expect("overwrite");
    assert_eq!(read_all(t, "a/b/small"), b"v2");

    // A failing reader leaves nothing behind under the final name, and no visible temp file.
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

    // Bad paths are refused before any I/O.
    for bad in ["../escape", "/abs", "a/../../x", "a//b", ".walship-tmp-x"] {
        assert!(
            t.write_atomic(bad, &mut &b"x"[..]).is_err(),
            "{bad} must be refused"
        );
        assert!(t.read(bad).is_err(), "{bad} must be refused");
        assert!(t.delete(bad).is_err(), "{bad} must be refused");
    }

    // Delete and remove_dir.
    t.delete("a/b/small").expect("delete");
    assert_eq!(
        t.read("a/b/small").err().map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
    t.remove_dir("a").expect("non-empty dir is left alone");
    assert!(!t.list("a").expect("list").is_empty());
    t.remove_dir("a/b").expect("remove empty dir");
    assert!(t.list("a").expect("list").iter().all(|e| e.name != "b"));
    t.remove_dir("a/b")
        .expect("removing a missing dir succeeds");
}
