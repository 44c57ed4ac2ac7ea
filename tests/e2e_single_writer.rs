//! One writer per database, one writer per replica (issue #10, defect 2), against the real
//! binary with real writers:
//! - a second `walship replicate` of a database that a daemon already replicates is refused at
//!   once, whatever its state directory or config, naming the first daemon's pid, and the first
//!   goes on replicating; the lock follows a file moved over the database;
//! - when the database lock cannot see the first daemon (two databases at the same path in two
//!   mount namespaces, hence the same replica identity `host:/path`), the replica's owner claim
//!   makes the later daemon take the replica over and the earlier one stop writing to it, so a
//!   latest restore gives the database of the newest owner, never a stale generation.

use crate::util::*;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// A config file for `db` replicating to `url` with state in `state`.
fn config(path: &Path, db: &Path, state: &Path, url: &str) -> PathBuf {
    fs::write(
        path,
        format!(
            "db = \"{}\"\nstate-dir = \"{}\"\n[[replica]]\nurl = \"{url}\"\n",
            db.display(),
            state.display()
        ),
    )
    .expect("write config");
    path.to_owned()
}

/// Runs `walship ARGS` and waits at most `limit` for it to exit; a process still running then
/// is killed and the test fails (a second replicator that was not refused runs for ever).
fn run_expecting_exit(args: &[OsString], limit: Duration) -> (i32, String, Duration) {
    let log = tempfile::NamedTempFile::new().expect("temp log");
    let t0 = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("reopen log"))
        .spawn()
        .expect("spawn walship");
    let st = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`walship {args:?}` was still running after {limit:?}: a second replicator of \
                 the same database was accepted; its log:\n{}",
                fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t0.elapsed();
    (
        st.code().unwrap_or(-1),
        fs::read_to_string(log.path()).unwrap_or_default(),
        took,
    )
}

/// Defect 2a: the unit runs with one state directory, an operator starts the same database by
/// hand with another state directory and config (and a third time with the ad-hoc form): both
/// are refused at once, exit 75 (EX_TEMPFAIL, not 78: systemd may restart), and name the pid of
/// the daemon holding the database. The first daemon goes on replicating undisturbed, and a
/// latest restore equals the source.
#[test]
fn e2e_second_replicator_refused() {
    let sb = Sandbox::new();
    sb.create_db();
    let db = sb.db();
    let cfg_a = config(&sb.path("unit.toml"), &db, &sb.state(), &sb.replica_url());
    let mut a = Daemon::start_raw(
        vec!["replicate".into(), "--config".into(), cfg_a.into()],
        &sb.state(),
    );
    a.wait_caught_up(10 * SEC);
    let pid = a.pid().expect("daemon pid");
    let mut w = Writer::spawn(
        &db,
        "app",
        WriterOpts {
            commits: 0,
            rate: 200.0,
            big_every: 0,
        },
        7,
    );
    std::thread::sleep(SEC / 2);

    let by_hand = config(
        &sb.path("by-hand.toml"),
        &db,
        &sb.path("state-by-hand"),
        &sb.replica_url(),
    );
    let ad_hoc_state = sb.path("state-ad-hoc").into_os_string();
    let other_replica = format!("file://{}", sb.path("other-replica").display());
    let attempts: Vec<(&str, Vec<OsString>)> = vec![
        (
            "another config and state dir",
            vec!["replicate".into(), "--config".into(), by_hand.into()],
        ),
        (
            "ad hoc, another replica",
            vec![
                "replicate".into(),
                db.clone().into(),
                other_replica.into(),
                "--state-dir".into(),
                ad_hoc_state,
            ],
        ),
    ];
    for (what, args) in attempts {
        let (code, log, took) = run_expecting_exit(&args, 10 * SEC);
        eprintln!(
            "{what}: refused in {took:?} with exit {code}: {}",
            log.trim()
        );
        assert_eq!(code, 75, "{what}: exit code; log:\n{log}");
        let last = log.trim_end().lines().last().unwrap_or("");
        assert_eq!(
            last,
            format!(
                "walship: {} is already replicated by walship (pid {pid}); refusing to start a second replicator",
                db.display()
            ),
            "{what}"
        );
        assert!(took < 5 * SEC, "{what}: refused only after {took:?}");
        w.assert_alive_or_ok();
        a.assert_running();
    }
    assert!(
        !sb.path("other-replica").exists(),
        "the refused replicator touched its replica"
    );

    // The first daemon replicates on: new commits are captured and nothing fails (while the
    // writer goes on at 200 commits/s, a status line is mostly written just after a capture,
    // before the upload: "caught up" is checked once the writer stops).
    let before = a.status().expect("status").txid;
    a.wait_status("new commits replicated", 10 * SEC, |s| {
        s.failing.is_none() && s.txid > before + 10
    });
    w.stop();
    let done = w.committed();
    a.wait_caught_up(10 * SEC);
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&db, &out);
    assert_contains_all(&rows(&out), &done, "latest restore");
    assert!(
        !a.log_text().contains(" ERROR "),
        "the first daemon logged errors:\n{}",
        a.log_text()
    );
    a.stop();
}

/// `walship replicate --config CONFIG` in a mount namespace of its own where `over` is
/// bind-mounted on `at`: the same path names another database file.
fn start_in_namespace(over: &Path, at: &Path, config: &Path, state: &Path) -> Daemon {
    Daemon::raw(
        vec!["replicate".into(), "--config".into(), config.into()],
        state,
    )
    .in_mount_namespace(over, at)
    .start()
}

/// Defect 2b: two databases that carry one replica identity (`host:/path`: the same path in two
/// mount namespaces, so the database lock cannot see both) replicate to one replica. The later
/// daemon claims the replica; the earlier one notices within its check interval and stops
/// writing there with a clear error naming the new owner, and it writes nothing more even when
/// its database is deleted and created anew (which starts a new generation, newer than the
/// owner's: before the fix that stale generation won a latest restore). A latest restore equals the newest
/// owner's database.
#[test]
fn e2e_replica_taken_over() {
    let sb = Sandbox::new();
    sb.create_db();
    let db = sb.db();
    let data_dir = db.parent().expect("data dir").to_owned();
    let other_dir = sb.path("other");
    fs::create_dir_all(&other_dir).expect("mkdir other");
    let other_db = other_dir.join("app.db");
    create_table(&other_db);
    let cfg_a = config(&sb.path("a.toml"), &db, &sb.state(), &sb.replica_url());
    let state_b = sb.path("state-b");
    let cfg_b = config(&sb.path("b.toml"), &db, &state_b, &sb.replica_url());
    let rate = WriterOpts {
        commits: 0,
        rate: 100.0,
        big_every: 0,
    };

    let mut a = Daemon::start_raw(
        vec!["replicate".into(), "--config".into(), cfg_a.into()],
        &sb.state(),
    );
    let mut wa = Writer::spawn(&db, "a", rate, 1);
    a.wait_status("A replicating its writer", 10 * SEC, |s| {
        s.caught_up() && s.txid > 20
    });
    let gen_a = a.status().expect("status").generation;

    // B: another file at the same path, another state directory, the same replica.
    let mut b = start_in_namespace(&other_dir, &data_dir, &cfg_b, &state_b);
    let mut wb = Writer::spawn(&other_db, "b", rate, 2);
    let gen_b = b
        .wait_status("B to catch up", 15 * SEC, Status::caught_up)
        .generation;
    assert!(
        gen_b > gen_a,
        "B's generation {gen_b} is not newer than A's {gen_a}"
    );

    // A writes on; it must notice the takeover at its next check (CLAIM_CHECK, 5 s). Not
    // asserted yet: what matters first is what a restore gives.
    let claimed = Instant::now();
    let deadline = claimed + 10 * SEC;
    let taken = loop {
        a.assert_running();
        let failing = a.status().and_then(|s| s.failing);
        if let Some(f) = failing.filter(|f| f.contains("taken over")) {
            eprintln!(
                "A reported the takeover {:?} after B caught up",
                claimed.elapsed()
            );
            break Some(f);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    wa.stop();
    // A's database deleted and created anew (with its -wal and -shm: renaming a file over a
    // database whose WAL is still open would let SQLite replay the old WAL into the new file):
    // A starts a new generation, newer than B's.
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::thread::sleep(SEC / 2);
    create_table(&db);
    rusqlite::Connection::open(&db)
        .and_then(|c| c.execute("INSERT INTO t(writer, seq) VALUES ('anew', 1)", []))
        .expect("write the new database");
    let s = a.wait_status("A's new generation", 15 * SEC, |s| s.generation != gen_a);
    let gen_a2 = s.generation;
    std::thread::sleep(2 * SEC);

    wb.stop();
    let done_b = wb.committed();
    // Settled, not just caught up: while commits streamed, the status showed a position up
    // to a second old.
    b.wait_caught_up(15 * SEC);
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&other_db, &out);
    assert_contains_all(&rows(&out), &done_b, "latest restore of the newest owner");

    // A stopped for good with a clear error naming B, wrote nothing of its new generation,
    // and deleted nothing of B's.
    let taken = taken.unwrap_or_else(|| {
        panic!(
            "A never reported that B took the replica over; A's log:\n{}",
            a.log_text()
        )
    });
    let b_instance = fs::read_to_string(state_b.join("instance")).expect("B's instance id");
    let b_instance = b_instance.trim();
    // A permanent error: the status says what happened and what to do.
    let who = format!(
        "(host {}, pid {})",
        nix::unistd::gethostname()
            .expect("hostname")
            .to_string_lossy(),
        b.pid().expect("B's pid")
    );
    let said = format!(
        "file: permanent: replica {} was taken over by instance {b_instance} {who} at ",
        sb.replica_url()
    );
    assert!(
        taken.starts_with(&said)
            && taken.contains(&format!(
                "(needs an operator: another walship {who} claimed this replica at "
            )),
        "{taken}"
    );
    assert!(
        !sb.replica().join("generations").join(&gen_a2).exists(),
        "the taken-over daemon wrote its new generation {gen_a2} to the replica"
    );
    assert!(sb.replica().join("generations").join(&gen_b).exists());
    let list = walship(["list", &sb.replica_url()]).assert_ok().stdout;
    assert!(
        list.contains(&format!("owner: instance {b_instance} ")),
        "list does not name B as the owner:\n{list}"
    );
    a.assert_running();
    assert!(b.log_text().contains("claimed replica"), "{}", b.log_text());

    // A restart of B (same state directory) is never refused and keeps the replica.
    b.stop();
    b.restart();
    b.wait_status("B to catch up", 15 * SEC, Status::caught_up);
    b.stop();
    // A's new generation is on no replica: its stop says so (exit 69).
    a.sigterm();
    let st = a.wait_exit(30 * SEC).expect("A exits after SIGTERM");
    assert_eq!(st.code(), Some(69), "A's log:\n{}", a.log_text());
}

/// The lock follows the file: a database that another walship replicates is moved over the one
/// a first walship replicates, through a hard link (so it stays the other's database too, at
/// its own path). The first must not open it while the other holds it (each would pair the
/// file with another WAL, `app.db-wal` and `other.db-wal`: a corruption); it says so in its
/// status and retries, replicates the file once the other stops, and then holds the new file's
/// lock: a third replicator of the path is refused, naming the first.
#[test]
fn e2e_lock_follows_a_moved_in_database() {
    let sb = Sandbox::new();
    sb.create_db();
    let db = sb.db();
    let mut a = Daemon::start(
        &[db.clone().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    );
    let gen_a = a.wait_caught_up(10 * SEC).generation;
    let pid_a = a.pid().expect("pid");

    // C replicates another database of the same directory, to its own replica.
    let other = sb.path("data/other.db");
    create_table(&other);
    rusqlite::Connection::open(&other)
        .and_then(|c| c.execute("INSERT INTO t(writer, seq) VALUES ('moved in', 1)", []))
        .expect("write other.db");
    let c_replica = format!("file://{}", sb.path("replica-c").display());
    let mut c = Daemon::start(
        &[other.clone().into_os_string(), c_replica.clone().into()],
        &sb.path("state-c"),
    );
    c.wait_caught_up(10 * SEC);
    let pid_c = c.pid().expect("pid");

    let link = sb.path("data/link.db");
    fs::hard_link(&other, &link).expect("ln other.db link.db");
    fs::rename(&link, &db).expect("mv link.db over the database");
    let held = a.wait_status("A to report that C holds the new file", 10 * SEC, |s| {
        s.failing
            .as_ref()
            .is_some_and(|f| f.contains(&format!("walship (pid {pid_c})")))
    });
    assert_eq!(
        held.generation, gen_a,
        "A replicated a file C holds: {}",
        held.line
    );
    c.stop();
    let s = a.wait_status("A to replicate the moved-in file", 15 * SEC, |s| {
        s.generation != gen_a && s.caught_up()
    });
    eprintln!("after C stopped: {}", s.line);
    let (code, log, _) = run_expecting_exit(
        &[
            "replicate".into(),
            db.clone().into(),
            c_replica.into(),
            "--state-dir".into(),
            sb.path("state-third").into(),
        ],
        10 * SEC,
    );
    assert_eq!(code, 75, "{log}");
    assert!(
        log.contains(&format!("already replicated by walship (pid {pid_a})")),
        "{log}"
    );
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&db, &out);
    a.stop();
}
