//! Restores by operators against live replicas and odd output paths (issue #10).
//!
//! - A replica that a running walship keeps compacting and pruning lists, restores and
//!   verifies every time: listings tolerate entries and directories vanishing, and restore
//!   follows files that compaction merged away.
//! - `restore -o` only ever replaces a regular file: a device, symlink, directory, FIFO or
//!   socket is refused before anything is written, and no failure leaves a temporary file.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use walship::target::Target;

/// Lists `dir` of `t` again and again for `dur` while another thread creates and removes
/// files (and a subdirectory with files) in `local`, the same directory on this machine, as
/// fast as it can. Every listing must succeed and hold the files that exist throughout.
/// Returns (listings, files removed meanwhile).
fn list_under_churn(t: &dyn Target, dir: &str, local: &Path, dur: Duration) -> (usize, usize) {
    fs::create_dir_all(local).expect("mkdir");
    for i in 0..200 {
        fs::write(local.join(format!("keep-{i:03}")), b"k").expect("write keep");
    }
    let stop = AtomicBool::new(false);
    let removed = AtomicUsize::new(0);
    let mut listings = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            let sub = local.join("sub");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A burst of files, then remove them: entries vanish while being listed.
                for j in 0..64 {
                    fs::write(local.join(format!("churn-{i}-{j}")), b"c").expect("create");
                }
                for j in 0..64 {
                    fs::remove_file(local.join(format!("churn-{i}-{j}"))).expect("remove");
                    removed.fetch_add(1, Ordering::Relaxed);
                }
                // A whole directory comes and goes, as a generation under retention does.
                fs::create_dir(&sub).expect("mkdir sub");
                for j in 0..16 {
                    fs::write(sub.join(format!("f{j}")), b"s").expect("create in sub");
                }
                for j in 0..16 {
                    fs::remove_file(sub.join(format!("f{j}"))).expect("remove in sub");
                }
                fs::remove_dir(&sub).expect("rmdir sub");
                i += 1;
            }
        });
        let deadline = Instant::now() + dur;
        let sub = format!("{dir}/sub");
        let result = (|| {
            while Instant::now() < deadline {
                let l = t
                    .list(dir)
                    .map_err(|e| format!("listing {dir} while files come and go: {e}"))?;
                let keep = l.iter().filter(|e| e.name.starts_with("keep-")).count();
                if keep != 200 {
                    return Err(format!(
                        "a listing lost files that never changed: {keep}/200"
                    ));
                }
                t.list(&sub)
                    .map_err(|e| format!("listing {sub} while it comes and goes: {e}"))?;
                listings += 1;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        if let Err(e) = result {
            panic!("{e} (after {listings} good listings)");
        }
    });
    (listings, removed.load(Ordering::Relaxed))
}

/// `list` of the file target while entries vanish between readdir and stat, and while a
/// directory is removed: never an error (it was `failed to list ...: No such file`).
#[test]
fn file_list_tolerates_vanishing_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = walship::target::file::FileTarget::new(dir.path());
    let (n, removed) = list_under_churn(&t, "g", &dir.path().join("g"), Duration::from_secs(2));
    eprintln!(
        "file_list_tolerates_vanishing_entries: {n} listings, {removed} files removed meanwhile"
    );
    assert!(
        n > 50 && removed > 1000,
        "too little churn to mean anything"
    );
}

/// The same for the sftp target against a real OpenSSH server. Its sftp-server stats each
/// entry itself and leaves out one that vanished, so this pins an invariant the target keeps
/// by its server (it held before issue #10 too), should listing ever stat on its own.
#[test]
fn sftp_list_tolerates_vanishing_entries() {
    let sshd = crate::sshd::Sshd::start();
    let dir = crate::sshd::TestDir::new("churn");
    let t = sshd.target(&dir.remote);
    let (n, removed) = list_under_churn(&t, "g", &dir.local.join("g"), Duration::from_secs(2));
    eprintln!(
        "sftp_list_tolerates_vanishing_entries: {n} listings, {removed} files removed meanwhile"
    );
    assert!(
        n > 10 && removed > 1000,
        "too little churn to mean anything"
    );
}
