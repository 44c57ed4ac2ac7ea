//! End to end: what applications and operators do around a running walship (issue #10): a
//! file moved over the database, an application's own checkpoints, long read transactions,
//! writers with no busy timeout. Real SQLite writers, the real binary, a file:// replica.

use crate::util::*;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

fn start(sb: &Sandbox) -> Daemon {
    Daemon::start(
        &[sb.db().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    )
}

/// Restores the latest state until it equals `db` (the status may be a moment ahead of what a
/// replica lists), then compares page by page.
fn restored_equals(sb: &Sandbox, db: &Path, name: &str) {
    let out = sb.path(name);
    let want = logical_bytes(db);
    poll(
        &format!("a restore equal to {}", db.display()),
        15 * SEC,
        || {
            let _ = fs::remove_file(&out);
            let r = restore(&out, &sb.replica_url(), &[]);
            (r.status.success() && logical_bytes(&out) == want).then_some(())
        },
    );
    assert_same_db(db, &out);
}

/// `mv new.db app.db` while walship runs and the application is stopped: the old WAL and
/// wal-index (kept alive only by walship's connections) must not be paired with the new file.
/// The application must read the new file's content at once, walship must start a new
/// generation saying why, and nothing of the old database may ever be written into the new
/// file (not by walship's checkpoints, not when it stops).
#[test]
fn e2e_file_moved_over_the_database() {
    let sb = Sandbox::new();
    let db = sb.db();
    sqlite3(
        &db,
        "pragma journal_mode=wal; create table t(id integer primary key, v);",
    );
    let mut d = start(&sb);
    // The old database's last commits stay in its WAL (walship checkpoints only past
    // checkpoint-pages frames): that WAL is what must not reach the new file.
    for i in 0..20 {
        sqlite3(&db, &format!("insert into t(v) values ('old {i}');"));
    }
    let before = d.wait_caught_up(10 * SEC);
    let wal = sb.path("data/app.db-wal");
    assert!(
        wal.exists(),
        "the old database has no WAL: the test proves nothing"
    );

    let new = sb.path("data/new.db");
    sqlite3(
        &new,
        "pragma journal_mode=wal; create table t(id integer primary key, v); \
         insert into t(v) values ('new 1'), ('new 2');",
    );
    assert!(!Path::new(&format!("{}-wal", new.display())).exists());
    fs::rename(&new, &db).expect("mv new.db over the database");
    // An application opening the database a moment later sees the new file, not the old
    // WAL's pages over it.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sqlite3(&db, "select group_concat(v) from t"),
        "new 1,new 2",
        "the new file was read with the old database's WAL; walship's log:\n{}",
        d.log_text()
    );
    let s = d.wait_status("a new generation for the moved file", 10 * SEC, |s| {
        s.generation != before.generation && s.caught_up()
    });
    assert!(s.txid >= 1);
    let log = d.log_text();
    assert!(
        log.contains("replaced"),
        "the log does not say the file was replaced:\n{log}"
    );
    assert!(
        !log.contains("resumed the generation"),
        "a replaced file must not resume the old generation:\n{log}"
    );
    restored_equals(&sb, &db, "a.db");
    sqlite3(&db, "insert into t(v) values ('new 3');");
    restored_equals(&sb, &db, "b.db");
    d.stop();
    assert_eq!(
        sqlite3(&db, "select group_concat(v) from t"),
        "new 1,new 2,new 3",
        "walship's stop wrote another database into the file"
    );
    assert_integrity(&db);
}

/// The same move while an application still has the old database open: its `-wal` and `-shm`
/// are in use, and SQLite would read them over the new file. walship says what it waits for,
/// and replicates the new file once that application lets go.
#[test]
fn e2e_file_moved_while_the_old_one_is_open() {
    let sb = Sandbox::new();
    let db = sb.db();
    sqlite3(
        &db,
        "pragma journal_mode=wal; create table t(id integer primary key, v);",
    );
    let mut d = start(&sb);
    sqlite3(&db, "insert into t(v) values ('old');");
    let before = d.wait_caught_up(10 * SEC);
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             c.execute('select count(*) from t').fetchall(); print('open', flush=True); \
             sys.stdin.read()",
        ])
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start python3");
    {
        use std::io::BufRead;
        let mut line = String::new();
        let out = holder.stdout.take().expect("holder stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("holder ready");
        assert_eq!(line.trim(), "open");
    }
    let new = sb.path("data/new.db");
    sqlite3(
        &new,
        "create table t(id integer primary key, v); insert into t(v) values ('new');",
    );
    fs::rename(&new, &db).expect("mv new.db over the database");
    let s = d.wait_status(
        "walship waits for the old database's holder",
        5 * SEC,
        |s| s.line.contains("still in use"),
    );
    assert_eq!(s.generation, before.generation, "{}", s.line);
    drop(holder.stdin.take());
    let _ = holder.wait();
    d.wait_status("a new generation once the holder closed", 10 * SEC, |s| {
        s.generation != before.generation && s.caught_up()
    });
    assert_eq!(sqlite3(&db, "select group_concat(v) from t"), "new");
    restored_equals(&sb, &db, "a.db");
    d.stop();
    assert_eq!(sqlite3(&db, "select group_concat(v) from t"), "new");
}

/// What `tests/app.py write` reports.
#[derive(Debug, Default)]
struct AppRun {
    commits: u64,
    busy: u64,
    max_ms: f64,
    p99_ms: f64,
    checkpoints: u64,
    checkpoints_busy: u64,
    checkpoint_max_ms: f64,
}

/// Runs `tests/app.py write DB ARGS...` to its end and parses its report.
fn app_write(db: &Path, args: &[&str]) -> AppRun {
    let o = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/app.py"))
        .arg("write")
        .arg(db)
        .args(args)
        .output()
        .expect("run python3 tests/app.py");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "app.py write failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let field = |k: &str| -> f64 {
        let pat = format!("\"{k}\": ");
        out.split(&pat)
            .nth(1)
            .and_then(|r| r.split([',', '}']).next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("app.py printed no {k}: {out}"))
    };
    AppRun {
        commits: field("commits") as u64,
        busy: field("busy") as u64,
        max_ms: field("max_ms"),
        p99_ms: field("p99_ms"),
        checkpoints: field("checkpoints") as u64,
        checkpoints_busy: field("checkpoints_busy") as u64,
        checkpoint_max_ms: field("checkpoint_max_ms"),
    }
}

/// Starts `tests/app.py read DB --secs S` and returns once it holds its read transaction.
fn app_reader(db: &Path, secs: u32) -> std::process::Child {
    let mut c = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/app.py"))
        .arg("read")
        .arg(db)
        .args(["--secs", &secs.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run python3 tests/app.py read");
    let mut line = String::new();
    let out = c.stdout.take().expect("reader stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
        .expect("reader ready");
    assert_eq!(line.trim(), "reading");
    c
}

/// A WAL database with table `t(id, v)` replicated by a running walship, caught up.
fn replicated_app_db() -> (Sandbox, std::path::PathBuf, Daemon) {
    let sb = Sandbox::new();
    let db = sb.db();
    sqlite3(
        &db,
        "pragma journal_mode=wal; create table t(id integer primary key, v);",
    );
    let mut d = start(&sb);
    d.wait_caught_up(10 * SEC);
    (sb, db, d)
}

/// Waits until walship caught up, checks the replica restores to the database, stops it.
fn caught_up_and_restorable(sb: &Sandbox, db: &Path, d: &mut Daemon) {
    d.wait_caught_up(10 * SEC);
    restored_equals(sb, db, "a.db");
    d.stop();
}

/// An application that runs `pragma wal_checkpoint(TRUNCATE)` (and RESTART) itself: each
/// completes at once instead of waiting out its busy timeout on walship's read lock, the
/// application's commits stay fast, and walship keeps its generation (it saw every frame).
#[test]
fn e2e_app_checkpoints() {
    let (sb, db, mut d) = replicated_app_db();
    let before = d.status().expect("status");
    for mode in ["TRUNCATE", "RESTART"] {
        let r = app_write(
            &db,
            &[
                "--rate",
                "50",
                "--secs",
                "4",
                "--checkpoint-every",
                "10",
                "--checkpoint-mode",
                mode,
            ],
        );
        eprintln!("e2e_app_checkpoints: {mode}: {r:?}");
        assert_eq!(r.busy, 0, "{mode}: commits failed: {r:?}");
        assert_eq!(
            r.checkpoints_busy, 0,
            "{mode}: checkpoints returned busy: {r:?}"
        );
        assert!(r.checkpoints >= 15, "{r:?}");
        assert!(
            r.checkpoint_max_ms < 250.0,
            "{mode}: a checkpoint took {} ms: {r:?}",
            r.checkpoint_max_ms
        );
        assert!(
            r.max_ms < 500.0,
            "{mode}: a commit took {} ms: {r:?}",
            r.max_ms
        );
    }
    let s = d.wait_caught_up(10 * SEC);
    assert_eq!(
        s.generation,
        before.generation,
        "an application's checkpoint cost a new generation:\n{}",
        d.log_text()
    );
    restored_equals(&sb, &db, "a.db");
    d.stop();
}

/// An application holding a read transaction for seconds: walship cannot checkpoint past
/// it, and must not take SQLite's write lock again and again meanwhile; writers' commits stay
/// in the milliseconds.
#[test]
fn e2e_long_reader_does_not_stall_writers() {
    // The page cache's write-back of earlier tests (the S3 suite writes hundreds of MB) must
    // not throttle this writer: flush it first.
    nix::unistd::sync();
    let (sb, db, mut d) = replicated_app_db();
    let mut reader = app_reader(&db, 6);
    // ~3 frames a commit: the WAL passes walship's checkpoint threshold (checkpoint-pages,
    // 1000) twice over while the reader holds it.
    let r = app_write(
        &db,
        &["--rate", "100000", "--secs", "5", "--row-bytes", "6000"],
    );
    let _ = reader.wait();
    eprintln!("e2e_long_reader_does_not_stall_writers: {r:?}");
    assert_eq!(r.busy, 0, "{r:?}");
    // Without walship on this machine: p99 ~15 ms, max ~40 ms; walship retaking the write
    // lock for checkpoints that could not progress: p99 ~57 ms, max up to seconds. A single
    // stall of ~1 s was seen in full-suite runs (7-180 ms alone), so the max bound is loose
    // and the p99 is what tells the two apart.
    assert!(
        r.max_ms < 1500.0 && r.p99_ms < 40.0,
        "writers stalled behind walship's checkpoints while a reader held the WAL: {r:?}"
    );
    caught_up_and_restorable(&sb, &db, &mut d);
}

/// An application with no busy timeout at all (the sqlite3 CLI's default) writing 100 commits
/// a second: walship's locks must never make one of its commits fail.
#[test]
fn e2e_writer_without_busy_timeout() {
    let (sb, db, mut d) = replicated_app_db();
    // ~6 frames a commit: walship checkpoints every couple of seconds meanwhile.
    let r = app_write(
        &db,
        &[
            "--rate",
            "100",
            "--secs",
            "6",
            "--busy-ms",
            "0",
            "--row-bytes",
            "20000",
        ],
    );
    eprintln!("e2e_writer_without_busy_timeout: {r:?}");
    assert!(r.commits + r.busy >= 550, "{r:?}");
    assert_eq!(r.busy, 0, "commits failed with SQLITE_BUSY: {r:?}");
    caught_up_and_restorable(&sb, &db, &mut d);
}
