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

/// Writes `mib` MiB into `db` in 1 MiB transactions of 64 KiB random blobs (16 MiB of them,
/// made before the load and used in turn), as fast as SQLite goes (a bulk load), with a 5 s
/// busy timeout and `synchronous=NORMAL`, as `bench/loader.py` loads.
fn bulk_load(db: &Path, mib: u32) {
    let script = "import os, sqlite3, sys\n\
        c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
        c.execute('pragma busy_timeout=5000')\n\
        c.execute('pragma synchronous=NORMAL')\n\
        blobs = [(os.urandom(65536),) for _ in range(256)]\n\
        for i in range(int(sys.argv[2])):\n\
        \x20   c.execute('begin')\n\
        \x20   c.executemany('insert into t(payload) values (?)', blobs[i % 16 * 16:][:16])\n\
        \x20   c.execute('commit')\n";
    python(script, db, &mib.to_string());
}

/// Runs a Python `script` with `db` and `arg` as its arguments; returns what it printed.
fn python(script: &str, db: &Path, arg: &str) -> String {
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(db)
        .arg(arg)
        .output()
        .expect("run python3");
    assert!(
        o.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A new database in `sb` and walship replicating it to the sandbox's replica, logging at
/// debug level.
fn debug_daemon(sb: &Sandbox) -> Daemon {
    sb.create_db();
    Daemon::replicate(
        &[sb.db().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    )
    .env("WALSHIP_LOG", "walship=debug")
    .start()
}

/// Stops `d` and checks that the replica restores to a copy of the database.
fn stop_and_restore(sb: &Sandbox, mut d: Daemon) {
    d.stop();
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&sb.db(), &out);
}

/// The value of `key=` in a debug line of walship's log.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(&format!(" {key}=")).nth(1)?.split(' ').next()
}

/// The `log=` (frames in the WAL) of each checkpoint walship ran under SQLite's write lock,
/// from its debug log.
fn locked_checkpoints(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(" checkpoint ") && l.contains("locked_ms="))
        .filter_map(|l| log_field(l, "log")?.parse().ok())
        .collect()
}

/// One "the WAL is full" debug line: when capture decided to hold the writer back.
#[derive(Debug)]
struct FullWal {
    /// Frames in the WAL.
    wal: u64,
    /// How many of them capture had not taken.
    behind: u64,
    /// How many it had not taken before its last step past the full WAL (-1: no such step).
    was: i64,
    /// Whether the governor held the writer already.
    governor: bool,
}

fn full_wal_decisions(log: &str) -> Vec<FullWal> {
    log.lines()
        .filter(|l| l.contains("the WAL is full: taking the write lock"))
        .filter_map(|l| {
            Some(FullWal {
                wal: log_field(l, "wal")?.parse().ok()?,
                behind: log_field(l, "behind")?.parse().ok()?,
                was: log_field(l, "was")?.parse().ok()?,
                governor: log_field(l, "governor")? == "true",
            })
        })
        .collect()
}

/// A bulk load is chased without holding the application back, and held back (SQLite's
/// write lock) only once its WAL holds 8 × `checkpoint-pages` frames (8000 by default), to
/// restart it. Taking the lock as soon as the writer was ahead (2 × `checkpoint-pages` frames
/// not captured) made the writer wait while walship captured and copied its whole backlog: a
/// 200 MiB load took about twice as long as without walship (see docs/PERFORMANCE.md).
#[test]
fn a_bulk_load_is_held_back_only_once_its_wal_is_full() {
    let sb = Sandbox::new();
    let mut d = debug_daemon(&sb);
    let start = d.wait_caught_up(15 * SEC).txid;
    let loaded = |d: &mut Daemon, txns: u64| {
        d.wait_status("the load replicated", 60 * SEC, |s| {
            s.caught_up() && s.txid >= start + txns
        });
    };
    // 24 MiB: ~6200 frames, well past 2 × 1000 but short of 8 × 1000.
    bulk_load(&sb.db(), 24);
    loaded(&mut d, 24);
    let log = d.log_text();
    assert_eq!(
        locked_checkpoints(&log),
        Vec::<u64>::new(),
        "a WAL short of 8 x checkpoint-pages held the writer back:\n{log}"
    );
    // 96 MiB more: the WAL passes 8000 frames, twice or more.
    bulk_load(&sb.db(), 96);
    loaded(&mut d, 120);
    let log = d.log_text();
    let locked = locked_checkpoints(&log);
    assert!(
        !locked.is_empty(),
        "a 48 MiB load was never held back to restart its WAL:\n{log}"
    );
    assert!(
        locked.iter().all(|&frames| frames >= 8000),
        "held back with fewer than 8 x checkpoint-pages frames in the WAL: {locked:?}"
    );
    eprintln!("WAL frames at each checkpoint under the write lock: {locked:?}");
    // Meanwhile uploads waited for the load (their CPU went to it), each at most a second:
    // whenever capture chased it (a slow machine's capture can keep up with the load, and
    // then nothing is deferred; a chase of big commits publishes its segments unsynced).
    let waits: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("an upload waited for a bulk load"))
        .filter_map(|l| log_field(l, "waited_ms")?.parse().ok())
        .collect();
    let chased = log.contains("publishing a chase's segments without a sync");
    eprintln!("chased: {chased}; uploads that waited, ms: {waits:?}");
    assert!(
        !chased || !waits.is_empty(),
        "no upload waited for the load:\n{log}"
    );
    assert!(
        waits.iter().all(|&ms| ms <= 1_100),
        "an upload waited more than a second: {waits:?}"
    );
    // Before it holds the writer back, capture catches up without the lock, so that the hold
    // is left little to capture: within half a checkpoint (500 frames) of the WAL's end, or
    // the WAL reached 10 x checkpoint-pages, or capture lost half a checkpoint or more to the
    // writer in its last step, or the governor already held the writer.
    let full = full_wal_decisions(&log);
    assert!(!full.is_empty(), "no full WAL was logged:\n{log}");
    for f in &full {
        let lost_ground = f.was >= 0 && f.behind as i64 >= f.was + 500;
        assert!(
            f.behind <= 500 || f.wal >= 10_000 || lost_ground || f.governor,
            "the writer was held back with capture far behind: {f:?} (all: {full:?})"
        );
    }
    // After the chase, a lone commit is seen and replicated as ever.
    sqlite3(&sb.db(), "insert into t(payload) values ('after')");
    d.wait_status("a commit after the load replicated", 5 * SEC, |s| {
        s.caught_up() && s.txid >= start + 121
    });
    stop_and_restore(&sb, d);
}

/// A bulk load that goes on for `secs` seconds in 1 MiB transactions of random blobs (one every
/// 20 ms at most), each also deleting what lies 10 MiB behind (the database stays small while
/// its WAL churns); prints the transactions committed.
const ROLLING_LOAD: &str = "import os, sqlite3, sys, time\n\
    c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
    c.execute('pragma busy_timeout=5000')\n\
    end = time.monotonic() + float(sys.argv[2]); n = 0\n\
    while time.monotonic() < end:\n\
    \x20   c.execute('begin')\n\
    \x20   c.executemany('insert into t(payload) values (?)', [(os.urandom(65536),) for _ in range(16)])\n\
    \x20   c.execute('delete from t where rowid <= (select max(rowid) from t) - 160')\n\
    \x20   c.execute('commit'); n += 1\n\
    \x20   time.sleep(0.02)\n\
    print(n)\n";

/// kill -9 while walship chases a bulk load, which is when segments are published by a thread
/// of their own behind capture (`capture::publish`): after every restart walship goes on, and
/// after the last the restore equals the source, with no temporary file left anywhere.
#[test]
fn kill9_while_a_bulk_load_is_chased() {
    use rand::RngExt;
    let sb = Sandbox::new();
    sb.create_db();
    // A small checkpoint threshold: every transaction (over 256 frames) makes the writer outrun
    // capture, which chases it a transaction per step, each a segment the publisher thread
    // publishes behind capture.
    let conf = sb.path("walship.toml");
    let text = format!(
        "db = {:?}\nstate-dir = {:?}\ncheckpoint-pages = 100\n[[replica]]\nname = \"a\"\nurl = {:?}\n",
        sb.db().display().to_string(),
        sb.state().display().to_string(),
        sb.replica_url(),
    );
    std::fs::write(&conf, text).expect("write config");
    let mut d = Daemon::raw(
        vec!["replicate".into(), "--config".into(), conf.into()],
        &sb.state(),
    )
    .env("WALSHIP_LOG", "walship=debug")
    .start();
    d.wait_caught_up(15 * SEC);
    let db = sb.db();
    let loader = std::thread::spawn(move || python(ROLLING_LOAD, &db, "10"));
    let mut rng = rand::rng();
    let mut kills = 0;
    let ready = |d: &Daemon| d.log_text().matches(" ready: ").count();
    while !loader.is_finished() {
        // Killed once started, while it chases the load (not in its start-up snapshot).
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        d.assert_running();
        d.kill9();
        kills += 1;
        let before = ready(&d);
        d.restart();
        poll("walship ready after kill -9", 60 * SEC, || {
            (ready(&d) > before).then_some(())
        });
    }
    let commits: u64 = loader
        .join()
        .expect("the loader thread")
        .trim()
        .parse()
        .expect("the loader's count");
    d.wait_caught_up(60 * SEC);
    let log = d.log_text();
    let chased = log
        .lines()
        .filter(|l| l.contains(" checkpoint ") && l.contains("frames="))
        .count()
        + locked_checkpoints(&log).len();
    eprintln!("{commits} transactions, {kills} kills, {chased} checkpoints of a chase");
    assert!(kills >= 5, "only {kills} kills during the load");
    assert!(commits >= 50, "only {commits} transactions loaded");
    assert!(chased > 0, "walship never chased the load:\n{log}");
    d.stop();
    let mut rep = Report::new("kill -9 while a bulk load is chased");
    let mut temps = rep.temp_files_in(&sb.replica());
    temps.extend(rep.temp_files_in(&sb.state()));
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&sb.db(), &out);
}

/// Commits one row at a time as fast as SQLite goes for `secs` seconds (5 s busy timeout,
/// autocheckpoint as by default). Returns the commits and the longest one in ms.
fn max_rate_writer(db: &Path, secs: u32) -> (u64, f64) {
    let script = "import os, sqlite3, sys, time\n\
        c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
        c.execute('pragma busy_timeout=5000')\n\
        c.execute('pragma synchronous=NORMAL')\n\
        row = os.urandom(50)\n\
        end = time.monotonic() + float(sys.argv[2])\n\
        n = 0; worst = 0.0\n\
        while time.monotonic() < end:\n\
        \x20   t = time.monotonic()\n\
        \x20   c.execute('insert into t(payload) values (?)', (row,))\n\
        \x20   worst = max(worst, time.monotonic() - t); n += 1\n\
        print(n, worst * 1000)\n";
    let out = python(script, db, &secs.to_string());
    let mut v = out.split_whitespace();
    let (Some(n), Some(ms)) = (v.next(), v.next()) else {
        panic!("writer output: {out}");
    };
    (n.parse().expect("commits"), ms.parse().expect("ms"))
}

/// How long walship held SQLite's write lock each time its debug log says so.
fn locked_ms(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| {
            l.split("locked_ms=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A writer of one-row commits as fast as SQLite goes outruns capture (here, walship's debug
/// build, by far): walship holds it back only for about its lock budget at a time (500 ms
/// plus one step of `checkpoint-pages` frames). Each capture step used to scan the WAL to its
/// end to take 1000 frames of it, so a step cost more the further behind walship was, and
/// under the write lock one step took 3.5 s: the writer stalled for seconds, near its busy
/// timeout. Everything is replicated and restores equal to the source.
#[test]
fn a_max_rate_writer_is_never_held_back_for_long() {
    let sb = Sandbox::new();
    let mut d = debug_daemon(&sb);
    let start = d.wait_caught_up(15 * SEC).txid;
    let (commits, worst_ms) = max_rate_writer(&sb.db(), 5);
    d.wait_status("the writer's commits replicated", 120 * SEC, |s| {
        s.caught_up() && s.txid >= start + commits
    });
    let log = d.log_text();
    let locked = locked_ms(&log);
    eprintln!("{commits} commits, the longest {worst_ms:.0} ms; write lock held (ms): {locked:?}");
    assert!(
        !locked.is_empty(),
        "the writer never outran walship:\n{log}"
    );
    assert!(
        locked.iter().all(|&ms| ms < 1500) && worst_ms < 2000.0,
        "the writer was held back for seconds: a commit took {worst_ms:.0} ms, locks held {locked:?} ms"
    );
    stop_and_restore(&sb, d);
}

/// The newest level-0 segment in the spool of the state directory `state`, as
/// (directory, name).
fn spool_tail(state: &Path) -> Option<(std::path::PathBuf, String)> {
    let mut best: Option<(std::path::PathBuf, String)> = None;
    for g in std::fs::read_dir(state.join("spool")).ok()?.flatten() {
        for f in std::fs::read_dir(g.path()).ok()?.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            // seg-0-<first>-<last>-...: hex of fixed width, so names sort by range.
            if name.starts_with("seg-0-") && best.as_ref().is_none_or(|(_, b)| name > *b) {
                best = Some((g.path(), name));
            }
        }
    }
    best
}

/// `cp -a SRC... DEST`.
fn copy_all(srcs: &[std::path::PathBuf], dest: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .args(srcs)
        .arg(dest)
        .status()
        .expect("run cp");
    assert!(st.success(), "cp -a {srcs:?} {} failed", dest.display());
}

/// `seg-0-<first>-`: what a tail's name keeps while appends rename it.
fn tail_stem(name: &str) -> String {
    name.splitn(4, '-').take(3).collect::<Vec<_>>().join("-") + "-"
}

/// Capture writes its state without a flush of its own before appending to the spool's tail,
/// whose fsync flushes both (`StateDir::save_capture_to_publish`, one device flush per capture
/// less). A power cut during that fsync may keep the appended bytes and lose the state; the
/// tail's rename (its publication) comes after the fsync, so it is lost too, and no replica
/// received the commits. Here that disk is made by hand: the state, the replica and its
/// position are put back as they were before a second batch of commits, and the tail (grown by
/// that batch) gets its old name back. The next start must keep the appended commits (the
/// rename alone may be what the cut lost, and a replica may hold them: see
/// `Spool::settle_unpublished_appends`), find the spool ahead of its state and start a new
/// generation, and the replica must restore to the database.
#[test]
fn a_power_cut_that_kept_an_append_but_lost_the_state_before_it() {
    let sb = Sandbox::new();
    let mut d = debug_daemon(&sb);
    d.wait_caught_up(15 * SEC);
    let (state, replica) = (sb.state(), sb.replica());
    let saved = sb.path("before");
    // The capture state and the replica's position.
    let records: Vec<String> = std::fs::read_dir(&state)
        .expect("read the state directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_state_record(std::ffi::OsStr::new(n)))
        .collect();
    assert_eq!(records.len(), 2, "state records: {records:?}");
    let insert = |writer: &str, seq: usize| {
        sqlite3(
            &sb.db(),
            &format!("INSERT INTO t(writer, seq) VALUES ('{writer}', {seq});"),
        )
    };
    let mut appended = None;
    for attempt in 0..5 {
        insert("first", attempt);
        d.wait_caught_up(15 * SEC);
        // Idle now: what the disk would hold if the power went before the next capture.
        let (dir, tail) = spool_tail(&state).expect("a spool tail after a commit");
        let _ = std::fs::remove_dir_all(&saved);
        std::fs::create_dir_all(&saved).expect("mkdir");
        let mut what = vec![replica.clone()];
        what.extend(records.iter().map(|f| state.join(f)));
        copy_all(&what, &saved);
        // The next commits are appended to that tail while it is young (1 s).
        for i in 0..3 {
            insert("second", i);
        }
        d.wait_caught_up(15 * SEC);
        let (dir2, grown) = spool_tail(&state).expect("a spool tail");
        if dir2 == dir && grown != tail && tail_stem(&grown) == tail_stem(&tail) {
            appended = Some((dir, tail, grown));
            break;
        }
    }
    let Some((dir, tail, grown)) = appended else {
        panic!(
            "the second batch never went to the spool's tail; log:\n{}",
            d.log_text()
        );
    };
    d.kill9();
    // The power cut: the append's bytes stayed, its state and its rename did not, and the
    // replica never got it.
    std::fs::rename(dir.join(&grown), dir.join(&tail)).expect("rename the tail back");
    for f in &records {
        std::fs::copy(saved.join(f), state.join(f)).expect("put the state back");
    }
    std::fs::remove_dir_all(&replica).expect("rm replica");
    copy_all(&[saved.join("replica")], &replica);
    d.restart();
    d.wait_caught_up(30 * SEC);
    let log = d.log_text();
    assert!(
        log.contains("keeping txids") && log.contains("the spool is ahead of the saved state"),
        "the unpublished append was not kept, or walship resumed a generation its state is behind; log:\n{log}"
    );
    stop_and_restore(&sb, d);
}
