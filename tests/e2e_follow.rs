//! Warm standby (`walship restore --follow`) end to end: a real `walship replicate` daemon,
//! real writers, the real follower process, and a reader that opens the standby read-only
//! while the follower applies commits.
//!
//! What "the standby equals the source at some commit" means here: a counter writer (in this
//! test) ends every transaction by recording the table's count, max and payload total in a
//! one-row `total` table, and keeps the list of those triples after each commit returned. A
//! standby state is a source commit if its `total` row matches what its `c` table holds and
//! the triple is one the writer committed; every check also runs `PRAGMA quick_check` in the
//! same read transaction. The final comparison is page by page, except the 12 bytes of page 1
//! that SQLite stamps on the standby's own commits (change counter, version-valid-for, SQLite
//! version: see `src/restore/follow.rs`).
//!
//! Invariant: every test here fails if following is broken (no flag, no transactions, wrong
//! pages, no new generation, an outage that kills the follower).

use crate::notify::NotifySocket;
use crate::sshd::{Sshd, TestDir};
use crate::util::*;
use rusqlite::{Connection, OpenFlags};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// A source commit's logical state: (rows in `c`, max n, total payload bytes).
type State = (i64, i64, i64);

/// A writer thread: every transaction inserts into `c` (payloads up to 6000 bytes: overflow
/// pages) and ends by recording `c`'s state in `total`; every 150 commits it deletes a third of
/// the rows and runs VACUUM (the database shrinks: the standby must truncate).
struct CounterWriter {
    stop: Arc<AtomicBool>,
    states: Arc<Mutex<Vec<State>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

const SET_TOTAL: &str = "UPDATE total SET cnt = (SELECT count(*) FROM c), \
     mx = (SELECT coalesce(max(n), 0) FROM c), \
     bytes = (SELECT coalesce(sum(length(pad)), 0) FROM c)";

impl CounterWriter {
    /// Creates the tables (before the daemon starts, so that every restore has them).
    fn create(db: &Path) {
        let c = Connection::open(db).expect("open source");
        c.busy_timeout(5 * SEC).expect("busy timeout");
        c.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS c(n INTEGER PRIMARY KEY, pad BLOB);
             CREATE TABLE IF NOT EXISTS total(cnt INTEGER, mx INTEGER, bytes INTEGER);
             INSERT INTO total SELECT 0, 0, 0 WHERE NOT EXISTS (SELECT 1 FROM total);
             {SET_TOTAL};"
        ))
        .expect("create counter tables");
    }

    fn start(db: &Path, rate: u32) -> CounterWriter {
        Self::create(db);
        let c = Connection::open(db).expect("open source");
        // Generous: this writer checks the standby, not walship's effect on writers (other
        // modules do), and a loaded 2-core machine can stall a lock holder for seconds.
        c.busy_timeout(30 * SEC).expect("busy timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let states = Arc::new(Mutex::new(vec![state_of(&c)]));
        let (s2, st2) = (stop.clone(), states.clone());
        let handle = std::thread::spawn(move || {
            let mut i: u64 = 0;
            let t0 = Instant::now();
            while !s2.load(Ordering::SeqCst) {
                i += 1;
                let size = 50 + (i * 7919) % 6000;
                let sql = if i.is_multiple_of(150) {
                    format!("DELETE FROM c WHERE n % 3 = 0; {SET_TOTAL};")
                } else {
                    format!("INSERT INTO c(pad) VALUES (randomblob({size})); {SET_TOTAL};")
                };
                commit(&c, &sql, &st2, i);
                if i.is_multiple_of(150) {
                    c.execute_batch("VACUUM").expect("counter writer: VACUUM");
                }
                let due = t0 + Duration::from_secs_f64(i as f64 / f64::from(rate));
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            // A last insert: the final state is one no earlier commit had (a VACUUM keeps the
            // logical state of the commit before it).
            let last = format!("INSERT INTO c(pad) VALUES (randomblob(10)); {SET_TOTAL};");
            commit(&c, &last, &st2, i + 1);
        });
        CounterWriter {
            stop,
            states,
            handle: Some(handle),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("counter writer panicked");
        }
    }

    fn states(&self) -> BTreeSet<State> {
        self.states
            .lock()
            .expect("states")
            .iter()
            .copied()
            .collect()
    }

    fn last(&self) -> State {
        *self.states.lock().expect("states").last().expect("a state")
    }
}

impl Drop for CounterWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Runs `sql` as one transaction and records the state it commits (read inside the
/// transaction: another writer may commit right after it).
fn commit(c: &Connection, sql: &str, states: &Mutex<Vec<State>>, i: u64) {
    let t = Instant::now();
    let r = c
        .execute_batch(&format!("BEGIN IMMEDIATE; {sql}"))
        .and_then(|()| {
            let st = state_of(c);
            c.execute_batch("COMMIT")?;
            states.lock().expect("states").push(st);
            Ok(())
        });
    if let Err(e) = r {
        panic!("counter writer: commit {i}: {e} (after {:?})", t.elapsed());
    }
}

fn state_of(c: &Connection) -> State {
    c.query_row("SELECT cnt, mx, bytes FROM total", [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .expect("read total")
}

/// One read-only look at the standby, in one read transaction: `total` must agree with `c`
/// (the state is a commit boundary, not a torn one) and `PRAGMA quick_check` must pass.
fn look(standby: &Path) -> Result<State, String> {
    let c = Connection::open_with_flags(standby, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("open: {e}"))?;
    c.busy_timeout(5 * SEC).map_err(|e| e.to_string())?;
    c.execute_batch("BEGIN").map_err(|e| e.to_string())?;
    let recorded: State = c
        .query_row("SELECT cnt, mx, bytes FROM total", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(|e| format!("read total: {e}"))?;
    let actual: State = c
        .query_row(
            "SELECT count(*), coalesce(max(n), 0), coalesce(sum(length(pad)), 0) FROM c",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(|e| format!("read c: {e}"))?;
    let qc: String = c
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| format!("quick_check: {e}"))?;
    c.execute_batch("COMMIT").map_err(|e| e.to_string())?;
    if qc != "ok" {
        return Err(format!("quick_check: {qc}"));
    }
    if recorded != actual {
        return Err(format!(
            "torn state: total says {recorded:?}, table c holds {actual:?}"
        ));
    }
    Ok(actual)
}

/// A thread that looks at the standby every few ms while the follower runs.
struct Reader {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Result<State, String>>>>,
}

impl Reader {
    fn start(standby: &Path) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let path = standby.to_owned();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s2.load(Ordering::SeqCst) {
                seen.push(look(&path));
                std::thread::sleep(Duration::from_millis(15));
            }
            seen
        });
        Reader {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops it; asserts that every look was a commit the writer made, and that it saw at
    /// least `min_states` distinct states.
    fn check(&mut self, states: &BTreeSet<State>, min_states: usize) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let seen = self
            .handle
            .take()
            .expect("reader")
            .join()
            .expect("reader panicked");
        let mut distinct = BTreeSet::new();
        for (i, r) in seen.iter().enumerate() {
            let st = r
                .as_ref()
                .unwrap_or_else(|e| panic!("look {i} at the standby failed: {e}"));
            assert!(
                states.contains(st),
                "look {i}: the standby's state {st:?} is no commit of the source"
            );
            distinct.insert(*st);
        }
        assert!(
            distinct.len() >= min_states,
            "the reader saw only {} distinct standby states in {} looks: the standby did not follow while read",
            distinct.len(),
            seen.len()
        );
        seen.len()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `walship restore --follow --interval 100ms -o OUT EXTRA... URL` as a process; waits until
/// the initial restore is in place.
fn start_follower(sb: &Sandbox, out: &Path, url: &str, extra: &[OsString]) -> Daemon {
    start_follower_with(sb, out, url, extra, |b| b)
}

fn start_follower_with(
    sb: &Sandbox,
    out: &Path,
    url: &str,
    extra: &[OsString],
    f: impl FnOnce(DaemonBuilder) -> DaemonBuilder,
) -> Daemon {
    let mut a: Vec<OsString> = vec![
        "restore".into(),
        "--follow".into(),
        "--interval".into(),
        "100ms".into(),
        "-o".into(),
        out.into(),
    ];
    a.extend(extra.iter().cloned());
    // The follower's own state directory, per standby (not /var/lib/walship-follow).
    if !extra.iter().any(|x| x == "--state-dir") {
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        a.push("--state-dir".into());
        a.push(sb.path(&format!("follower-state-{name}")).into());
    }
    a.push(url.into());
    let log = sb.path("follower.log");
    let mut d = f(Daemon::raw(a, &sb.path("follower-state"))
        .no_wait()
        .log(&log))
    .start();
    poll("the follower's initial restore", 30 * SEC, || {
        assert!(d.alive(), "the follower exited early:\n{}", d.log_text());
        d.log_text().contains("; following (every").then_some(())
    });
    d
}

/// Waits until the standby holds `want` (the source's last state).
fn wait_standby(d: &mut Daemon, standby: &Path, want: State, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    poll("the standby to catch up", timeout, || {
        assert!(d.alive(), "the follower exited:\n{}", d.log_text());
        (look(standby).ok() == Some(want)).then_some(())
    });
    t0.elapsed()
}

/// SIGTERM; asserts exit 0 and the final report line.
fn stop_follower(d: &mut Daemon) {
    d.sigterm();
    let st = d
        .wait_exit(30 * SEC)
        .expect("the follower did not exit within 30 s");
    assert!(
        st.success(),
        "the follower exited with {st} after SIGTERM:\n{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("stopped following:"),
        "no final report:\n{}",
        d.log_text()
    );
}

/// The source's pages and the standby's are equal, but for SQLite's own bytes of page 1.
pub(crate) fn assert_same_pages(source: &Path, standby: &Path) {
    let mut a = logical_bytes(source);
    let mut b = logical_bytes(standby);
    assert_integrity(standby);
    let ps = usize::from(u16::from_be_bytes([a[16], a[17]]));
    // A file may run past the database's end (a shrinking commit checkpointed while a reader
    // kept SQLite from truncating the file): the database is the header's page count.
    for x in [&mut a, &mut b] {
        let pages = u32::from_be_bytes([x[28], x[29], x[30], x[31]]) as usize;
        assert!(x[24..28] == x[92..96], "stale in-header size");
        x.truncate(pages * ps);
    }
    for r in [24..28, 92..100] {
        b[r.clone()].copy_from_slice(&a[r]);
    }
    let diff: Vec<usize> = a
        .chunks(ps)
        .zip(b.chunks(ps))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i + 1)
        .collect();
    assert!(
        a.len() == b.len() && diff.is_empty(),
        "standby {} differs from source {}: {} vs {} pages, differing pages {:?}",
        standby.display(),
        source.display(),
        a.len() / ps,
        b.len() / ps,
        &diff[..diff.len().min(20)]
    );
}

/// A source replicating to a file:// replica, with a counter writer running.
fn replicating(sb: &Sandbox) -> (Daemon, CounterWriter) {
    sb.create_db();
    CounterWriter::create(&sb.db());
    let mut d = Daemon::start(
        &[OsString::from(sb.db()), sb.replica_url().into()],
        &sb.state(),
    );
    d.wait_caught_up(15 * SEC);
    let w = CounterWriter::start(&sb.db(), 150);
    (d, w)
}

/// Following a file:// replica while a counter writer writes (150 commits/s, overflow pages,
/// deletes, VACUUM): every
/// read-only look at the standby during apply is a commit of the source; after the writers
/// stop, it catches up, SIGTERM exits 0, the pages equal the source's; then promote: the
/// standby opens read-write, takes writes and stays intact. Under a notify socket: READY=1
/// after the restore and STATUS= with position and lag.
#[test]
fn follow_file_replica_while_writing_then_promote() {
    let sb = Sandbox::new();
    let (mut d, mut w) = replicating(&sb);
    std::thread::sleep(SEC);
    let standby = sb.path("standby.db");
    let sock = Arc::new(NotifySocket::bind());
    let mut f = start_follower_with(&sb, &standby, &sb.replica_url(), &[], |b| {
        b.notify_socket(sock.path()).env("WATCHDOG_USEC", "4000000")
    });
    sock.wait_for("READY=1", 10 * SEC)
        .expect("READY=1 after the initial restore");
    let status = sock
        .wait_for("STATUS=following: position", 10 * SEC)
        .expect("STATUS= while following");
    assert!(status.contains("lag "), "{status}");
    // systemd reads every notification: so does the test (a full socket blocks the sender).
    let drain_stop = Arc::new(AtomicBool::new(false));
    let drain = {
        let (sock, stop) = (sock.clone(), drain_stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                sock.recv_timeout(Duration::from_millis(100));
            }
        })
    };
    let mut r = Reader::start(&standby);
    std::thread::sleep(8 * SEC);
    w.stop();
    d.wait_caught_up(20 * SEC);
    let took = wait_standby(&mut f, &standby, w.last(), 20 * SEC);
    let looks = r.check(&w.states(), 10);
    eprintln!("follow: standby caught up {took:?} after the source's catch-up; {looks} looks");
    stop_follower(&mut f);
    drain_stop.store(true, Ordering::SeqCst);
    drain.join().expect("drain");
    let seen = sock.seen();
    assert!(
        seen.iter().any(|l| l == "STOPPING=1"),
        "no STOPPING=1 at SIGTERM"
    );
    let pings = seen.iter().filter(|l| *l == "WATCHDOG=1").count();
    assert!(
        pings >= 5,
        "{pings} WATCHDOG=1 in ~10 s under WATCHDOG_USEC=4s"
    );
    d.stop();
    assert_same_pages(&sb.db(), &standby);

    // Promote: the standby is an ordinary database now.
    let c = Connection::open(&standby).expect("open the promoted standby");
    c.execute_batch(&format!(
        "BEGIN; INSERT INTO c(pad) VALUES (randomblob(3000)); {SET_TOTAL}; COMMIT;"
    ))
    .expect("write to the promoted standby");
    drop(c);
    let (cnt, mx, _) = look(&standby).expect("look at the promoted standby");
    assert_eq!((cnt, mx), (w.last().0 + 1, w.last().1 + 1));
    assert_integrity(&standby);
}

/// The primary's walship is killed (-9) during writes and restarted; the follower keeps
/// following whatever it resumes or starts (a new generation if continuity is not proven).
#[test]
fn follow_survives_primary_kill9() {
    let sb = Sandbox::new();
    let (mut d, mut w) = replicating(&sb);
    let standby = sb.path("standby.db");
    let mut f = start_follower(&sb, &standby, &sb.replica_url(), &[]);
    let mut r = Reader::start(&standby);
    for _ in 0..2 {
        std::thread::sleep(2 * SEC);
        d.kill9();
        std::thread::sleep(SEC);
        d.restart();
    }
    std::thread::sleep(2 * SEC);
    w.stop();
    d.wait_caught_up(20 * SEC);
    wait_standby(&mut f, &standby, w.last(), 30 * SEC);
    r.check(&w.states(), 5);
    stop_follower(&mut f);
    d.stop();
    assert_same_pages(&sb.db(), &standby);
}

/// A new generation: the primary is stopped, its database replaced by another one (different
/// content, smaller), and replication restarted without its state. The follower applies the new generation's
/// snapshot and ends equal to the new database.
#[test]
fn follow_new_generation() {
    let sb = Sandbox::new();
    let (mut d, mut w) = replicating(&sb);
    let standby = sb.path("standby.db");
    let mut f = start_follower(&sb, &standby, &sb.replica_url(), &[]);
    let mut r = Reader::start(&standby);
    std::thread::sleep(3 * SEC);
    w.stop();
    d.wait_caught_up(20 * SEC);
    wait_standby(&mut f, &standby, w.last(), 20 * SEC);
    d.stop();
    // Another database at the same path: a few rows only (the standby must shrink).
    for s in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{s}", sb.db().display()));
    }
    sb.create_db();
    CounterWriter::create(&sb.db());
    // Without its state, walship cannot prove continuity: a new generation.
    fs::remove_dir_all(sb.state()).expect("remove the state dir");
    let mut d = Daemon::start(
        &[OsString::from(sb.db()), sb.replica_url().into()],
        &sb.state(),
    );
    let mut w2 = CounterWriter::start(&sb.db(), 100);
    std::thread::sleep(2 * SEC);
    w2.stop();
    d.wait_caught_up(20 * SEC);
    wait_standby(&mut f, &standby, w2.last(), 30 * SEC);
    let mut both = w.states();
    both.extend(w2.states());
    r.check(&both, 5);
    assert!(
        f.log_text().contains("new generation"),
        "the follower did not report a new generation:\n{}",
        f.log_text()
    );
    stop_follower(&mut f);
    d.stop();
    assert_same_pages(&sb.db(), &standby);
}

/// An sftp replica whose sshd is killed for 5 s while the primary writes: the follower keeps
/// running, reports the outage, and catches up once sshd is back.
#[test]
fn follow_sftp_survives_sshd_outage() {
    let sshd = Sshd::start();
    let dir = TestDir::new("follow-outage");
    let url = format!(
        "sftp://replicator@{}:{}/{}",
        sshd.addr, sshd.port, dir.remote
    );
    let keys: Vec<OsString> = vec![
        "--key-path".into(),
        sshd.client_key.clone().into(),
        "--known-hosts".into(),
        sshd.known_hosts.clone().into(),
    ];
    let sb = Sandbox::new();
    sb.create_db();
    CounterWriter::create(&sb.db());
    let mut a: Vec<OsString> = vec![sb.db().into(), url.clone().into()];
    a.extend(keys.iter().cloned());
    let mut d = Daemon::start(&a, &sb.state());
    d.wait_caught_up(15 * SEC);
    let mut w = CounterWriter::start(&sb.db(), 100);
    let standby = sb.path("standby.db");
    let mut f = start_follower(&sb, &standby, &url, &keys);
    let mut r = Reader::start(&standby);
    std::thread::sleep(2 * SEC);
    sshd.kill();
    std::thread::sleep(5 * SEC);
    assert!(f.alive(), "the follower died with sshd:\n{}", f.log_text());
    assert!(
        f.log_text().contains("cannot follow the replica"),
        "the outage was not reported:\n{}",
        f.log_text()
    );
    sshd.restart();
    std::thread::sleep(2 * SEC);
    w.stop();
    d.wait_caught_up(30 * SEC);
    let took = wait_standby(&mut f, &standby, w.last(), 30 * SEC);
    eprintln!("follow over sftp: caught up {took:?} after the source's replica did");
    r.check(&w.states(), 5);
    stop_follower(&mut f);
    d.stop();
    assert_same_pages(&sb.db(), &standby);
}

/// An existing output is refused without --force (the message says why), and left alone; a
/// database that walship replicates is refused even with --force (exit 75, untouched), and a
/// followed standby cannot be replicated by a `walship replicate` meanwhile (exit 75).
#[test]
fn follow_refuses_an_existing_output() {
    let sb = Sandbox::new();
    sb.create_db();
    let mut d = Daemon::start(
        &[OsString::from(sb.db()), sb.replica_url().into()],
        &sb.state(),
    );
    d.wait_caught_up(15 * SEC);
    let out: PathBuf = sb.path("standby.db");
    fs::write(&out, b"precious").expect("write");
    let o = walship([
        OsString::from("restore"),
        "--follow".into(),
        "--state-dir".into(),
        sb.path("follower-state-refused").into(),
        "-o".into(),
        out.clone().into(),
        sb.replica_url().into(),
    ])
    .fails();
    assert!(
        o.error_line().contains("already exists")
            && o.error_line().contains("--force")
            && o.error_line().contains("does not resume"),
        "{}",
        o.error_line()
    );
    assert_eq!(fs::read(&out).expect("read"), b"precious");

    // Not even --force replaces a database that walship replicates (the primary's own).
    let before = logical_bytes(&sb.db());
    let inode = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(sb.db()).expect("stat db"));
    let ino = inode();
    let o = walship([
        OsString::from("restore"),
        "--follow".into(),
        "--force".into(),
        "--state-dir".into(),
        sb.path("follower-state-refused").into(),
        "-o".into(),
        sb.db().into(),
        sb.replica_url().into(),
    ]);
    assert_eq!(o.code(), 75, "{}", o.error_line());
    assert!(
        o.error_line().contains("already replicated by walship"),
        "{}",
        o.error_line()
    );
    assert_eq!(inode(), ino, "the source was replaced");
    assert_eq!(logical_bytes(&sb.db()), before, "the source was touched");

    // And a followed standby cannot be replicated meanwhile.
    let standby = sb.path("standby2.db");
    let mut f = start_follower(&sb, &standby, &sb.replica_url(), &[]);
    let o = walship([
        OsString::from("replicate"),
        standby.clone().into(),
        format!("file://{}", sb.path("other-replica").display()).into(),
        "--state-dir".into(),
        sb.path("other-state").into(),
    ]);
    assert_eq!(o.code(), 75, "{}", o.error_line());
    stop_follower(&mut f);
    d.stop();
}

/// `systemd/walship-follow@.service` with the generator's drop-in: `systemd-analyze verify`
/// says nothing, and `systemd-analyze security` rates it 2.0 or less, as walship@.service.
#[test]
fn follow_unit_verifies_and_stays_confined() {
    let t = crate::generator::Tree::new();
    let (text, _) = crate::generator::generated_drop_in(&t);
    let root = crate::systemd_files::analyze_root(None);
    let etc = root.path().join("etc/systemd/system");
    fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/systemd/walship-follow@.service"
        ),
        etc.join("walship-follow@.service"),
    )
    .expect("copy unit");
    let d = etc.join("walship-follow@test.service.d");
    fs::create_dir_all(&d).expect("mkdir");
    fs::write(d.join(walship::generator::DROP_IN_NAME), &text).expect("drop-in");
    let sa = crate::systemd_files::tool("systemd-analyze", "systemd");
    let rootarg = format!("--root={}", root.path().display());
    let out = std::process::Command::new(&sa)
        .args([
            "verify",
            "--man=no",
            &rootarg,
            "walship-follow@test.service",
        ])
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.trim().is_empty(), "systemd-analyze verify:\n{said}");
    let out = std::process::Command::new(&sa)
        .args([
            "security",
            "--offline=true",
            &rootarg,
            "walship-follow@test.service",
        ])
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let e: f64 = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.rsplit_once(": "))
        .and_then(|(_, v)| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure in:\n{text}"));
    assert!(e <= 2.0, "exposure {e} > 2.0");
    let unit = fs::read_to_string(etc.join("walship-follow@.service")).expect("read unit");
    assert!(unit.contains("ExecStart=/usr/bin/walship restore --follow"));
}

/// On a file:// replica, new files wake the follower at once (inotify): with a 60 s polling
/// interval, the standby still trails the source by well under a second.
#[test]
fn follow_file_replica_wakes_on_inotify() {
    let sb = Sandbox::new();
    sb.create_db();
    CounterWriter::create(&sb.db());
    let mut d = Daemon::start(
        &[OsString::from(sb.db()), sb.replica_url().into()],
        &sb.state(),
    );
    d.wait_caught_up(15 * SEC);
    let standby = sb.path("standby.db");
    let a: Vec<OsString> = vec![
        "restore".into(),
        "--follow".into(),
        "--interval".into(),
        "60s".into(),
        "--state-dir".into(),
        sb.path("follower-state").into(),
        "-o".into(),
        standby.clone().into(),
        sb.replica_url().into(),
    ];
    let mut f = Daemon::raw(a, &sb.path("follower-state"))
        .no_wait()
        .log(&sb.path("follower.log"))
        .start();
    poll("the follower's initial restore", 30 * SEC, || {
        assert!(f.alive(), "the follower exited early:\n{}", f.log_text());
        f.log_text().contains("; following (every").then_some(())
    });
    let mut w = CounterWriter::start(&sb.db(), 50);
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(700));
        // The writer goes on: wait for the standby to reach (or pass) this commit.
        let want = w.last().1;
        let t0 = Instant::now();
        poll("the standby to reach the commit", 10 * SEC, || {
            assert!(f.alive(), "the follower exited:\n{}", f.log_text());
            look(&standby).is_ok_and(|s| s.1 >= want).then_some(())
        });
        worst = worst.max(t0.elapsed());
    }
    w.stop();
    eprintln!("inotify: the standby reached the source's state within {worst:?} (worst of 5)");
    assert!(
        worst < 5 * SEC,
        "the standby took {worst:?} to follow: no inotify wake-up?"
    );
    stop_follower(&mut f);
    d.stop();
}

/// SIGTERM while the primary writes flat out: the follower stops within seconds, exits 0, and
/// leaves the standby at a commit of the source, intact.
#[test]
fn follow_sigterm_while_writing_stops_at_a_commit() {
    let sb = Sandbox::new();
    let (mut d, mut w) = replicating(&sb);
    // A second writer flat out.
    let mut w2 = CounterWriter::start(&sb.db(), 5000);
    let standby = sb.path("standby.db");
    let mut f = start_follower(&sb, &standby, &sb.replica_url(), &[]);
    std::thread::sleep(3 * SEC);
    let t0 = Instant::now();
    stop_follower(&mut f);
    let took = t0.elapsed();
    eprintln!("SIGTERM to exit while writing: {took:?}");
    assert!(took < 10 * SEC, "stopping took {took:?}");
    w2.stop();
    w.stop();
    let st = look(&standby).expect("look at the stopped standby");
    let mut states = w.states();
    states.extend(w2.states());
    assert!(
        states.contains(&st),
        "the stopped standby's state {st:?} is no commit of the source"
    );
    assert!(st.0 > 0, "nothing was followed");
    assert_integrity(&standby);
    d.stop();
}
