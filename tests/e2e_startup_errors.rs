//! What an operator sees when walship cannot get at the database or its own disk: start-up
//! against an application holding the database with `locking_mode=EXCLUSIVE`, errors on
//! databases that are not databases or cannot be written (each must name the file and say
//! why), and walship's own state directory running full. Real binary, real holder and writer
//! processes, real permission checks (a service user, a read-only mount).

use crate::util::*;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// The unprivileged user the permission cases run walship as (`nobody`).
const NOBODY: u32 = 65534;

fn start(sb: &Sandbox) -> Daemon {
    Daemon::start(
        &[sb.db().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    )
}

/// An application (python3's sqlite3) that sets `PRAGMA locking_mode=EXCLUSIVE` and writes a
/// row, so it holds the database's exclusive lock until released.
struct Holder(Option<Child>);

impl Holder {
    const SCRIPT: &'static str = "
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute('PRAGMA locking_mode=EXCLUSIVE')
c.execute(\"INSERT INTO t(writer, seq, payload) VALUES ('holder', 1, randomblob(3000))\")
print('holding', flush=True)
sys.stdin.read()
c.close()
";

    fn start(db: &Path) -> Holder {
        let mut c = Command::new("python3")
            .args(["-c", Self::SCRIPT])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read the holder's stdout");
        assert_eq!(line.trim(), "holding", "the holder did not start");
        Holder(Some(c))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// Closes its stdin: it closes the database (releasing the lock) and exits.
    fn release(&mut self) {
        if let Some(mut c) = self.0.take() {
            drop(c.stdin.take());
            let st = c.wait().expect("wait holder");
            assert!(st.success(), "the holder failed: {st}");
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn locked_lines(d: &Daemon) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| l.contains("db-locked"))
        .map(str::to_owned)
        .collect()
}

/// walship starts while an application holds the database with `locking_mode=EXCLUSIVE`
/// (issue #10: it was silent for ~100 s, ignored SIGTERM, then failed without naming the
/// file). Now it says within a second, in the log and the status, which database is locked
/// and by which process; SIGTERM ends the wait at once; it repeats itself rarely, not on
/// every retry; and once the holder is gone it replicates by itself, restore equal to source.
#[test]
fn e2e_exclusive_lock_holder_at_start() {
    let sb = Sandbox::new();
    sb.create_db();
    let mut holder = Holder::start(&sb.db());
    let t0 = Instant::now();
    let mut d = start(&sb);
    let line = poll("the log to say what blocks start-up", 10 * SEC, || {
        locked_lines(&d).first().cloned()
    });
    let said = t0.elapsed();
    eprintln!("said after {said:?}: {line}");
    assert!(said < 2 * SEC, "took {said:?} to say what blocks start-up");
    let db = sb.db().display().to_string();
    for want in [
        db.as_str(),
        "database is locked",
        "locking_mode=EXCLUSIVE",
        &format!("process {} (python3)", holder.pid()),
    ] {
        assert!(line.contains(want), "{want:?} missing from {line:?}");
    }
    let status = fs::read_to_string(sb.state().join("status")).expect("status");
    assert!(
        status.contains(&db) && status.contains("locked"),
        "the status file should say what blocks start-up: {status:?}"
    );
    // SIGTERM while waiting: a prompt, clean exit.
    let t = Instant::now();
    d.stop();
    let stopped = t.elapsed();
    eprintln!("stopped {stopped:?} after SIGTERM");
    assert!(stopped < 2 * SEC, "took {stopped:?} to exit on SIGTERM");

    // Started again while the holder stays: it waits, and says so once, not every second.
    d.restart();
    poll("the second start to say it waits", 5 * SEC, || {
        (locked_lines(&d).len() >= 2).then_some(())
    });
    std::thread::sleep(3 * SEC);
    d.assert_running();
    assert_eq!(
        locked_lines(&d).len(),
        2,
        "the wait is logged once per start:\n{}",
        d.log_text()
    );
    // The holder goes away: walship replicates by itself.
    holder.release();
    let freed = Instant::now();
    let mut w = Writer::spawn(
        &sb.db(),
        "after",
        WriterOpts {
            commits: 20,
            rate: 0.0,
            big_every: 5,
        },
        9,
    );
    w.wait();
    d.wait_caught_up(20 * SEC);
    eprintln!("caught up {:?} after the holder left", freed.elapsed());
    d.stop();
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&sb.db(), &out);
    let mut want = w.committed();
    want.push(("holder".into(), 1));
    assert_contains_all(&rows(&out), &want, "restore after the holder left");
}

/// Replicate and expect failure; returns the error line after checking it names `db`.
fn fails_naming(out: Out, db: &Path, why: &[&str]) -> String {
    let out = out.fails();
    let line = out.error_line().to_owned();
    eprintln!("{}: {line}", out.cmd);
    let db = db.display().to_string();
    assert!(line.contains(&db), "{line:?} does not name {db}");
    for w in why {
        assert!(line.contains(w), "{line:?} does not say {w:?}");
    }
    line
}

fn replicate_once(sb: &Sandbox) -> Out {
    walship([
        "replicate".into(),
        sb.db().into_os_string(),
        sb.replica_url().into(),
        "--state-dir".into(),
        sb.state().into_os_string(),
    ])
}

/// Makes `p` and its parents up to the sandbox traversable by everyone (tempdirs are 0700).
fn open_up(sb: &Sandbox, dirs: &[&Path]) {
    fs::set_permissions(sb.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    for d in dirs {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

/// Every error about the user's database names the file and says why (issue #10: `file is
/// not a database`, `attempt to write a readonly database`, `unable to open database file`
/// were printed bare): a file of random bytes, a damaged one, a database the service user
/// cannot write, a directory where it cannot create `-wal`/`-shm`, a read-only mount; for
/// `replicate`, `verify` and `restore`.
#[test]
fn e2e_errors_name_the_database() {
    let sb = Sandbox::new();
    // A replica of a real database, for `verify` and `restore`.
    sb.create_db();
    let c = rusqlite::Connection::open(sb.db()).expect("open");
    c.execute_batch("INSERT INTO t(writer, seq, payload) VALUES ('w', 1, randomblob(5000));")
        .expect("insert");
    drop(c);
    let mut d = start(&sb);
    d.wait_caught_up(10 * SEC);
    d.stop();
    // Back to a rollback journal, as the user's walkthrough creates it.
    let c = rusqlite::Connection::open(sb.db()).expect("open");
    c.pragma_update(None, "journal_mode", "delete")
        .expect("delete");
    drop(c);
    let good = fs::read(sb.db()).expect("read db");

    // Random bytes.
    let mut junk = vec![0u8; 64 << 10];
    rand::fill(&mut junk[..]);
    fs::write(sb.db(), &junk).expect("write junk");
    for side in ["-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{side}", sb.db().display()));
    }
    let t = Instant::now();
    fails_naming(
        replicate_once(&sb),
        &sb.db(),
        &["not a database", "not SQLite's header"],
    );
    assert!(t.elapsed() < 10 * SEC, "took {:?} to fail", t.elapsed());
    let v = walship([
        "verify".into(),
        sb.db().into_os_string(),
        sb.replica_url().into(),
    ]);
    fails_naming(v, &sb.db(), &["not a database"]);
    // SQLite's header, then damage.
    let mut damaged = good.clone();
    rand::fill(&mut damaged[100..]);
    fs::write(sb.db(), &damaged).expect("write damaged");
    fails_naming(replicate_once(&sb), &sb.db(), &["malformed", "damaged"]);

    // The service user may not write the database (root's, 0644, rollback journal).
    fs::write(sb.db(), &good).expect("write db");
    let data = sb.db().parent().expect("data dir").to_owned();
    open_up(&sb, &[&data]);
    fs::set_permissions(sb.db(), fs::Permissions::from_mode(0o644)).expect("chmod");
    let state = sb.path("state-nobody");
    fs::create_dir(&state).expect("mkdir");
    nix::unistd::chown(&state, Some(NOBODY.into()), Some(NOBODY.into())).expect("chown");
    let as_nobody = |cmd: &str| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![cmd.into(), sb.db().into()];
        a.push(sb.replica_url().into());
        if cmd == "replicate" {
            a.extend(["--state-dir".into(), state.clone().into()]);
        }
        a
    };
    let uid = format!("uid {NOBODY}");
    fails_naming(
        walship_as(NOBODY, &as_nobody("replicate")),
        &sb.db(),
        &["readonly database", "not writable", &uid],
    );
    // The same in WAL mode, for `replicate` and `verify`.
    let c = rusqlite::Connection::open(sb.db()).expect("open");
    c.pragma_update(None, "journal_mode", "wal").expect("wal");
    drop(c);
    assert!(!Path::new(&format!("{}-shm", sb.db().display())).exists());
    for cmd in ["replicate", "verify"] {
        fails_naming(
            walship_as(NOBODY, &as_nobody(cmd)),
            &sb.db(),
            &["readonly database", "the file is not writable by", &uid],
        );
    }
    // The file is writable, but its directory is not, and a WAL database needs -wal and -shm.
    fs::set_permissions(sb.db(), fs::Permissions::from_mode(0o666)).expect("chmod");
    fails_naming(
        walship_as(NOBODY, &as_nobody("replicate")),
        &sb.db(),
        &[
            &format!("the directory {} is not writable by {uid}", data.display()),
            "app.db-shm",
        ],
    );
    // Restore into a directory the user may not write: said before downloading anything.
    let out = data.join("restored.db");
    let r = walship_as(
        NOBODY,
        &[
            "restore".into(),
            "-o".into(),
            out.clone().into_os_string(),
            sb.replica_url().into(),
        ],
    );
    fails_naming(
        r,
        &out,
        &[&format!(
            "the directory {} is not writable by {uid}",
            data.display()
        )],
    );

    // A read-only mount, as root: no permission check to hide behind.
    let ro = sb.path("ro");
    let disk = Tmpfs::mount(&ro, "4m");
    let db = ro.join("app.db");
    fs::write(&db, &good).expect("write db");
    let wal_db = ro.join("wal.db");
    fs::write(&wal_db, &good).expect("write db");
    let c = rusqlite::Connection::open(&wal_db).expect("open");
    c.pragma_update(None, "journal_mode", "wal").expect("wal");
    drop(c);
    let st = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&ro)
        .status()
        .expect("remount");
    assert!(st.success(), "remount {} read-only", ro.display());
    let read_only = format!(
        "the filesystem holding {} is mounted read-only",
        ro.display()
    );
    for (db, why) in [
        (&db, "attempt to write a readonly database"),
        (&wal_db, "unable to open database file"),
    ] {
        let r = walship([
            "replicate".into(),
            db.clone().into_os_string(),
            sb.replica_url().into(),
            "--state-dir".into(),
            sb.state().into_os_string(),
        ]);
        fails_naming(r, db, &[why, &read_only]);
    }
    let out = ro.join("restored.db");
    let r = restore(&out, &sb.replica_url(), &[]);
    fails_naming(r, &out, &[&read_only]);
    drop(disk);
}

/// Generation directories on a file replica: (name, number of files in it).
fn replica_generations(root: &Path) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = fs::read_dir(root.join("generations"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let n = fs::read_dir(e.path()).map_or(0, |rd| rd.count());
            (e.file_name().to_string_lossy().into_owned(), n)
        })
        .collect();
    out.sort();
    out
}

/// walship's state directory stays full for seconds while the application writes on (issue
/// #10: every retry started a new generation, ~65 a second, and left hundreds of empty
/// generation directories on the replica). One failure is one failure: the snapshot of the
/// one new generation is retried with backoff, the error is logged a handful of times, not
/// hundreds; stopped while still failing, walship leaves no empty generation directory; the
/// replica holds at most the original generation and one new one; once space returns walship
/// recovers by itself and restore equals the source.
#[test]
fn e2e_state_dir_full_for_seconds() {
    let sb = Sandbox::new();
    sb.create_db();
    let disk = Tmpfs::mount(&sb.state(), "256k");
    let mut d = start(&sb);
    d.wait_caught_up(10 * SEC);
    let mut rep = Report::new("walship's own disk full for 8 s (256 KiB tmpfs)");
    rep.rounds = 1;
    let mut w = Writer::filler(&sb.db(), 300, 6);
    w.wait();
    poll("the log to report the full disk", 20 * SEC, || {
        d.log_text().contains("No space left").then_some(())
    });
    // The disk stays full while the application goes on writing.
    let mut during = Writer::spawn(
        &sb.db(),
        "during",
        WriterOpts {
            commits: 0,
            rate: 50.0,
            big_every: 0,
        },
        7,
    );
    std::thread::sleep(8 * SEC);
    during.stop();
    d.assert_running();
    // Stopped while it still fails: nothing half-made stays on the replica, and the exit
    // status says that the replica lacks the new generation (69).
    d.sigterm();
    let st = d.wait_exit(30 * SEC).expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(69), "log:\n{}", d.log_text());
    let while_full = d.log_text();
    let gens_full = replica_generations(&sb.replica());
    disk.resize("256m");
    let freed = Instant::now();
    d.restart();
    let mut after = Writer::spawn(
        &sb.db(),
        "after",
        WriterOpts {
            commits: 5,
            rate: 0.0,
            big_every: 0,
        },
        8,
    );
    after.wait();
    d.wait_caught_up(30 * SEC);
    rep.recovered(freed.elapsed());
    let mut done = w.committed();
    done.extend(during.committed());
    done.extend(after.committed());
    d.stop();
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    rep.end(&d, &out, &done, &[&sb.replica(), &sb.state()]);
    let count = |text: &str, what: &str| text.lines().filter(|l| l.contains(what)).count();
    let new_gens = count(&while_full, "starting a new generation");
    let errors = count(&while_full, " ERROR ");
    let gens = replica_generations(&sb.replica());
    eprintln!(
        "while full: {new_gens} new generation(s) started, {errors} ERROR line(s), replica at stop {gens_full:?}; after recovery {gens:?} (recovered in {:?})",
        freed.elapsed()
    );
    assert!(
        gens_full.iter().chain(&gens).all(|(_, n)| *n > 0),
        "empty generation directories on the replica: at the stop while full {gens_full:?}, after recovery {gens:?}"
    );
    assert!(
        gens.len() <= 2,
        "generations on the replica (at most the original and one new): {gens:?}"
    );
    // The first start, and the one generation after the failed write.
    assert!(
        new_gens <= 2,
        "{new_gens} generations started while the disk was full:\n{while_full}"
    );
    assert!(
        errors <= 6,
        "{errors} ERROR lines while the disk was full for 8 s:\n{while_full}"
    );
    assert_same_db(&sb.db(), &out);
    assert_contains_all(&rows(&out), &done, "restore after walship's disk was full");
    drop(disk);
}
