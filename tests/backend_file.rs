//! The `file://` target passes the conformance suite, and cleans up stale temporary files.

use crate::conformance::{conformance_suite, Fixture};
use walship::backend::{file::FileBackend, Backend};
use walship::durable::TEMP_PREFIX;

conformance_suite!(conformance_file, |_case: &str| {
    let dir = tempfile::tempdir().expect("tempdir");
    Fixture::new(FileBackend::new(dir.path().join("replica")), dir)
});

#[test]
fn file_target_cleanup_removes_stale_temp_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = FileBackend::new(dir.path());
    t.write_atomic("g/x", &mut &b"1"[..]).expect("write");
    std::fs::write(
        dir.path().join("g").join(format!("{TEMP_PREFIX}99-1")),
        b"partial",
    )
    .expect("plant");
    assert_eq!(t.list("g").expect("list").len(), 1, "temp files are hidden");
    assert_eq!(t.cleanup("g").expect("cleanup"), 1);
    assert_eq!(
        std::fs::read_dir(dir.path().join("g")).expect("rd").count(),
        1
    );
}
