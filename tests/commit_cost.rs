//! Per-commit cost (issue #12): a steady stream of small commits must not cost walship files
//! per commit. Real daemon, real writer (`tests/writer.py` at a fixed rate), a `file://`
//! replica; every file created in walship's state directory and on the replica is counted
//! with inotify while the stream runs, and so are the rewrites of the `status` file and the
//! renames onto the state records (`capture.state`, `replica-<name>.state`).

use crate::util::*;
use notify::event::{EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// What happened under a directory while it was watched.
#[derive(Default)]
struct Counts {
    /// Files and directories created.
    created: AtomicUsize,
    /// Renames onto a file named `status`.
    status_written: AtomicUsize,
    /// Renames onto `capture.state` or `replica-<name>.state`.
    records_renamed: AtomicUsize,
}

/// Whether `name` is one of the state records, which are rewritten in place.
fn is_state_record(name: &std::ffi::OsStr) -> bool {
    let n = name.to_string_lossy();
    n == "capture.state" || (n.starts_with("replica-") && n.ends_with(".state"))
}

/// Counts creations (and status rewrites) under `dir`, recursively, until dropped.
fn watch(dir: &Path, counts: &Arc<Counts>) -> notify::RecommendedWatcher {
    let c = counts.clone();
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        match ev.kind {
            EventKind::Create(_) => {
                c.created.fetch_add(1, Ordering::SeqCst);
            }
            EventKind::Modify(ModifyKind::Name(_)) => {
                let named = |f: &dyn Fn(&std::ffi::OsStr) -> bool| {
                    ev.paths.iter().any(|p| p.file_name().is_some_and(f))
                };
                if named(&|n| n == "status") {
                    c.status_written.fetch_add(1, Ordering::SeqCst);
                }
                if named(&is_state_record) {
                    c.records_renamed.fetch_add(1, Ordering::SeqCst);
                }
            }
            _ => {}
        }
    })
    .expect("inotify watcher");
    w.watch(dir, RecursiveMode::Recursive)
        .unwrap_or_else(|e| panic!("watch {}: {e}", dir.display()));
    w
}

/// 200 one-row commits/s for 2 s: walship groups the commits of a stream (a capture at most
/// every 25 ms, so ~5 commits per file) and rewrites its status file every 150 ms while the
/// replica keeps up, where it used to create three to four files per commit (a spool file,
/// the capture state, the replica's position, and the status twice per capture) and one on
/// the replica. The capture state and the replica's position are rewritten in place (never
/// renamed over), so the state directory gets only the spool's files and the status file's
/// temporaries: about 0.3 per commit, where writing those two by rename made about 0.48 on a
/// quiet machine (0.70 under load). Everything still reaches the replica promptly: caught up
/// within 2 s of the last commit.
#[test]
fn a_stream_of_commits_creates_few_files() {
    let sb = Sandbox::new();
    sb.create_db();
    let mut d = Daemon::start(
        &[sb.db().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    );
    let before = d.wait_caught_up(15 * SEC);
    let state = Arc::new(Counts::default());
    let replica = Arc::new(Counts::default());
    let ws = watch(&sb.state(), &state);
    let wr = watch(&sb.replica(), &replica);
    let started = Instant::now();
    let mut w = Writer::spawn(
        &sb.db(),
        "stream",
        WriterOpts {
            commits: 400,
            rate: 200.0,
            big_every: 0,
        },
        12,
    );
    w.wait();
    let secs = started.elapsed().as_secs_f64();
    let commits = w.committed().len();
    assert_eq!(commits, 400, "the writer made its commits");
    let s = d.wait_status("the stream replicated", 2 * SEC, |s| {
        s.caught_up() && s.txid >= before.txid + 400
    });
    drop((ws, wr));
    let state_files = state.created.load(Ordering::SeqCst);
    let replica_files = replica.created.load(Ordering::SeqCst);
    let status_writes = state.status_written.load(Ordering::SeqCst);
    let records_renamed = state.records_renamed.load(Ordering::SeqCst);
    let per_commit = |n: usize| n as f64 / commits as f64;
    eprintln!(
        "{commits} commits in {secs:.2} s: {state_files} files created in the state directory \
         ({:.2} per commit), {replica_files} on the replica ({:.2} per commit), status written \
         {status_writes} times ({:.1}/s), state records renamed over {records_renamed} times; {}",
        per_commit(state_files),
        per_commit(replica_files),
        status_writes as f64 / secs,
        s.line
    );
    assert!(
        per_commit(state_files) <= 0.4,
        "{state_files} files created in the state directory for {commits} commits"
    );
    assert_eq!(
        records_renamed, 0,
        "capture.state / replica-<name>.state replaced by a rename during the stream"
    );
    assert!(
        per_commit(replica_files) <= 0.35,
        "{replica_files} files created on the replica for {commits} commits"
    );
    assert!(
        per_commit(status_writes) <= 0.5,
        "status written {status_writes} times for {commits} commits"
    );
    d.stop();
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_contains_all(&rows(&out), &w.committed(), "restored");
}
