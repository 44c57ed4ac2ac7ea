//! Shared helpers for the end-to-end tests: a sandbox of temp dirs, the `walship replicate`
//! daemon as a guard (the one harness for every test that runs a daemon: [`DaemonBuilder`] adds
//! a notification socket, environment, a log file, a wrapper such as a mount namespace), real
//! writer processes (`tests/writer.py`, python3's own SQLite), running the CLI, and comparing
//! databases page by page.
//!
//! Invariants: every daemon gets a per-test `--state-dir`; every child process is killed on
//! drop; failures panic with context (the daemon's log, the command's stderr).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use walship::replicate::state::{StateDir, StatusFile};

/// The walship binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_walship");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A per-test directory: `db` (the source database), `replica` (a file replica root),
/// `state` (walship's state dir), and logs.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("walship-e2e-")
            .tempdir()
            .expect("tempdir");
        fs::create_dir_all(dir.path().join("data")).expect("mkdir data");
        Sandbox { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The source database.
    pub fn db(&self) -> PathBuf {
        self.path("data/app.db")
    }

    /// The file replica's root directory.
    pub fn replica(&self) -> PathBuf {
        self.path("replica")
    }

    /// `file://` URL of the replica.
    pub fn replica_url(&self) -> String {
        format!("file://{}", self.replica().display())
    }

    /// walship's state directory.
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// Creates the source database with table `t` (rollback journal, as a user would).
    pub fn create_db(&self) {
        create_table(&self.db());
    }
}

/// Creates `t(id INTEGER PRIMARY KEY, writer, seq, payload)` in `db` (rollback journal mode).
pub fn create_table(db: &Path) {
    let c = rusqlite::Connection::open(db).expect("open db");
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, writer TEXT, seq INTEGER, payload BLOB);",
    )
    .expect("create table");
}

/// Output of a finished walship command.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub cmd: String,
}

impl Out {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Panics with the whole output unless the command exited 0.
    pub fn assert_ok(self) -> Out {
        assert!(
            self.status.success(),
            "`{}` failed ({}):\nstdout: {}\nstderr: {}",
            self.cmd,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless the command failed; returns it for further checks.
    pub fn fails(self) -> Out {
        assert!(
            !self.status.success(),
            "`{}` should have failed but exited 0:\nstdout: {}\nstderr: {}",
            self.cmd,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The final `walship: ...` line of a failed command's stderr (log lines may precede it);
    /// asserts no panic.
    pub fn error_line(&self) -> &str {
        let last = self
            .stderr
            .trim_end_matches('\n')
            .lines()
            .last()
            .unwrap_or("");
        assert!(
            last.starts_with("walship: ") && !self.stderr.contains("panicked"),
            "`{}`: stderr does not end with a `walship: ...` line:\n{:?}",
            self.cmd,
            self.stderr
        );
        last
    }

    /// Asserts the contract for errors: exactly one line on stderr, starting `walship: `,
    /// no panic or backtrace.
    pub fn one_error_line(&self) -> &str {
        let e = self.stderr.trim_end_matches('\n');
        assert!(
            !e.contains('\n') && e.starts_with("walship: "),
            "`{}`: expected exactly one `walship: ...` line on stderr, got:\n{:?}",
            self.cmd,
            self.stderr
        );
        assert!(
            !e.contains("panicked") && !e.contains("RUST_BACKTRACE"),
            "`{}` panicked: {}",
            self.cmd,
            self.stderr
        );
        e
    }
}

/// Runs `walship ARGS` to completion (60 s limit).
pub fn walship<I, S>(args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut c = Command::new(BIN);
    c.args(&args);
    run_to_end(c, format!("walship {}", shell_words(&args)))
}

fn shell_words<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `c` (named `cmd` in messages) with no stdin to completion, 60 s at most, collecting
/// its output.
fn run_to_end(mut c: Command, cmd: String) -> Out {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    // Read in threads so a chatty command cannot block on a full pipe.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let to = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut so, &mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut se, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{cmd}` did not finish within 60 s; stderr: {}",
                te.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Out {
        status,
        stdout: to.join().unwrap_or_default(),
        stderr: te.join().unwrap_or_default(),
        cmd,
    }
}

/// `walship restore -o OUT EXTRA... URL`.
pub fn restore(out: &Path, url: &str, extra: &[&str]) -> Out {
    let mut a: Vec<OsString> = vec!["restore".into(), "-o".into(), out.into()];
    a.extend(extra.iter().map(OsString::from));
    a.push(url.into());
    walship(a)
}

/// The parsed `status` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub line: String,
    pub written_ms: u64,
    pub ok: u32,
    pub total: u32,
    pub lag_ms: u64,
    /// `GEN/TXID`.
    pub position: String,
    pub generation: String,
    pub txid: u64,
    pub failing: Option<String>,
}

impl Status {
    /// Every replica holds everything captured, and none is failing.
    pub fn caught_up(&self) -> bool {
        self.ok == self.total && self.failing.is_none()
    }

    /// Parses `<unix ms> replicated to N/M replicas, lag X ms, position GEN/TXID[, failing: ...]`
    /// with walship's own parser (`StatusFile`); `None` for anything else.
    pub fn parse(text: &str) -> Option<Status> {
        let line = text.lines().next()?.to_owned();
        let file: StatusFile = text.parse().ok()?;
        let walship::replicate::state::Status::Replicating(p) = file.status else {
            return None;
        };
        Some(Status {
            written_ms: file.written_ms,
            ok: u32::try_from(p.ok).ok()?,
            total: u32::try_from(p.total).ok()?,
            lag_ms: p.lag_ms,
            position: format!("{}/{}", p.generation, p.txid),
            generation: p.generation.to_string(),
            txid: p.txid,
            failing: p.failing,
            line,
        })
    }
}

/// A replica's position as walship's `replica-<name>.state` records it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReplicaPos {
    pub generation: String,
    pub last: u64,
    pub time_ms: u64,
}

impl ReplicaPos {
    pub fn position(&self) -> String {
        format!("{}/{}", self.generation, self.last)
    }
}

/// Every replica's recorded position in `state_dir` (walship's own reader, `StateDir`).
pub fn replica_positions(state_dir: &Path) -> Vec<(String, ReplicaPos)> {
    StateDir::new(state_dir)
        .positions()
        .into_iter()
        .map(|(name, p)| {
            let pos = ReplicaPos {
                generation: p.key.generation.to_string(),
                last: p.key.last,
                time_ms: p.time_ms,
            };
            (name, pos)
        })
        .collect()
}

/// A `walship` daemon (`walship replicate`, as a rule); killed on drop. Started by
/// [`Daemon::start`] and [`Daemon::start_raw`], or configured first through [`Daemon::replicate`]
/// or [`Daemon::raw`] (a [`DaemonBuilder`]: a notification socket, environment, a log file of
/// the test's choosing, a wrapper command such as a mount namespace, not waiting for the status
/// file).
pub struct Daemon {
    child: Option<Child>,
    launch: DaemonBuilder,
    /// How it exited, once it did (see [`Daemon::wait_exit`]).
    exit: Option<ExitStatus>,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// `walship replicate ARGS... --state-dir STATE`, stderr (and stdout) appended to a log
    /// beside the state dir; waits until the `status` file exists.
    pub fn start<S: AsRef<OsStr>>(args: &[S], state: &Path) -> Daemon {
        Daemon::replicate(args, state).start()
    }

    /// `walship replicate --config CONF` for the sandbox `sb` (its state dir is the one the
    /// config names), logging to `daemon.log` in the sandbox.
    pub fn start_config(sb: &Sandbox, conf: &Path) -> Daemon {
        Daemon::raw(
            vec!["replicate".into(), "--config".into(), conf.into()],
            &sb.state(),
        )
        .log(&sb.path("daemon.log"))
        .start()
    }

    /// `walship ARGS` with `state` as the state dir the config names.
    pub fn start_raw(args: Vec<OsString>, state: &Path) -> Daemon {
        Daemon::raw(args, state).start()
    }

    fn spawn(&mut self) {
        let _ = fs::remove_file(self.state.join("status"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let l = &self.launch;
        let mut cmd = match l.wrapper.split_first() {
            None => Command::new(BIN),
            Some((program, wrapper_args)) => {
                let mut c = Command::new(program);
                c.args(wrapper_args).arg(BIN);
                c
            }
        };
        cmd.args(&l.args).env(
            "RUST_LOG",
            std::env::var("WALSHIP_TEST_LOG").unwrap_or("info".into()),
        );
        for (k, v) in &l.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        self.child = Some(child);
        self.exit = None;
        if !self.launch.wait_for_status {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.state.join("status").exists() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "walship replicate exited early ({st}); its log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "walship replicate wrote no status file within 15 s; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts it again with the same arguments (after `kill9` or `stop`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running daemon");
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the daemon exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            self.child = None;
            panic!(
                "walship replicate exited unexpectedly ({st}); its log:\n{}",
                self.log_text()
            );
        }
        assert!(self.child.is_some(), "walship replicate is not running");
    }

    /// The current `status` file, parsed (panics on a malformed one).
    pub fn status(&self) -> Option<Status> {
        let text = fs::read_to_string(self.state.join("status")).ok()?;
        // Empty, or written while starting (before the first snapshot): nothing to report yet.
        if text.trim().is_empty()
            || text
                .split_once(' ')
                .is_some_and(|(_, r)| r.starts_with("starting: "))
        {
            return None;
        }
        Some(Status::parse(&text).unwrap_or_else(|| {
            panic!(
                "malformed status file {:?}; log:\n{}",
                text,
                self.log_text()
            )
        }))
    }

    /// Polls `status` until `pred` holds; panics with the log after `timeout`.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last status: {:?}; log:\n{}",
                    self.status().map(|s| s.line),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every replica holds everything captured and the position has been stable
    /// for 300 ms (no writers should be running).
    pub fn wait_caught_up(&mut self, timeout: Duration) -> Status {
        let deadline = Instant::now() + timeout;
        let mut last: Option<(String, Instant)> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let s = self.wait_status("1/1 replicated, nothing failing", left, Status::caught_up);
            match &last {
                Some((p, since)) if *p == s.position => {
                    if since.elapsed() >= Duration::from_millis(300) {
                        return s;
                    }
                }
                _ => last = Some((s.position.clone(), Instant::now())),
            }
            assert!(
                Instant::now() < deadline,
                "position did not settle within {timeout:?}: {}\nlog:\n{}",
                s.line,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait (30 s); asserts exit 0.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            panic!("stop: walship replicate is not running");
        };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = c.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "walship replicate did not exit within 30 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            st.success(),
            "walship replicate exited with {st} after SIGTERM; log:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- walship replicate log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A writer process (`tests/writer.py`).
pub struct Writer {
    child: Option<Child>,
    pub name: String,
    pub out: PathBuf,
    err: PathBuf,
}

/// Options for a writer.
#[derive(Clone, Copy)]
pub struct WriterOpts {
    /// Commits to make; 0: until stopped.
    pub commits: u32,
    /// Commits per second; 0: flat out.
    pub rate: f64,
    /// Every Nth commit is a big transaction (0: never).
    pub big_every: u32,
}

impl Writer {
    /// A writer that fills a disk: `commits` commits as fast as it can, every second one
    /// with a big row.
    pub fn filler(db: &Path, commits: u32, seed: u64) -> Writer {
        let o = WriterOpts {
            commits,
            rate: 0.0,
            big_every: 2,
        };
        Writer::spawn(db, "fill", o, seed)
    }

    pub fn spawn(db: &Path, name: &str, o: WriterOpts, seed: u64) -> Writer {
        Writer::spawn_args(db, name, o, seed, &[])
    }

    /// [`Writer::spawn`] with more arguments for `tests/writer.py` (`--synchronous NORMAL`).
    pub fn spawn_args(db: &Path, name: &str, o: WriterOpts, seed: u64, args: &[&str]) -> Writer {
        let dir = db.parent().expect("db dir").parent().expect("sandbox");
        let out = dir.join(format!("writer-{name}.txt"));
        let err = dir.join(format!("writer-{name}.err"));
        let child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/writer.py"))
            .arg("--db")
            .arg(db)
            .args(["--writer", name])
            .args(["--commits", &o.commits.to_string()])
            .args(["--rate", &o.rate.to_string()])
            .args(["--big-every", &o.big_every.to_string()])
            .args(["--seed", &seed.to_string()])
            .arg("--out")
            .arg(&out)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err).expect("writer err file"))
            .process_group(0)
            .spawn()
            .expect("spawn python3 tests/writer.py");
        Writer {
            child: Some(child),
            name: name.to_owned(),
            out,
            err,
        }
    }

    fn finish(&mut self, st: ExitStatus) {
        self.child = None;
        let err = fs::read_to_string(&self.err).unwrap_or_default();
        assert!(
            st.success(),
            "writer {} failed ({st}) — an application write failed while walship ran:\n{err}",
            self.name
        );
    }

    /// Waits for it to finish its commits; asserts success (no SQLITE_BUSY).
    pub fn wait(&mut self) {
        if let Some(mut c) = self.child.take() {
            let st = c.wait().expect("wait writer");
            self.finish(st);
        }
    }

    /// SIGTERM (it finishes the current commit) and wait; asserts success.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let st = c.wait().expect("wait writer");
            self.finish(st);
        }
    }

    /// SIGKILL and reap, whatever it was doing (a power cut); its commits so far stay recorded.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it still runs; panics if it exited with an error.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(st))) => {
                self.finish(st);
                false
            }
            Some(Err(e)) => panic!("wait writer {}: {e}", self.name),
            None => false,
        }
    }

    /// Panics if it already exited with an error.
    pub fn assert_alive_or_ok(&mut self) {
        if let Some(st) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            self.finish(st);
        }
    }

    /// Commits made so far: (writer, seq) as recorded after each commit returned.
    pub fn committed(&self) -> Vec<(String, i64)> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (w, s) = l.split_once(' ')?;
                Some((w.to_owned(), s.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `n` writers named `PREFIX0`, `PREFIX1`... seeded `seed0`, `seed0 + 1`...
pub fn spawn_writers(db: &Path, prefix: &str, n: usize, o: WriterOpts, seed0: u64) -> Vec<Writer> {
    (0..n)
        .map(|i| Writer::spawn(db, &format!("{prefix}{i}"), o, seed0 + i as u64))
        .collect()
}

/// Every row the writers committed.
pub fn committed(ws: &[Writer]) -> Vec<(String, i64)> {
    ws.iter().flat_map(Writer::committed).collect()
}

/// Stops all writers, asserting that none failed.
pub fn stop_all(ws: &mut [Writer]) {
    for w in ws.iter_mut() {
        w.stop();
    }
}

/// Waits for all writers, asserting that none failed.
pub fn wait_all(ws: &mut [Writer]) {
    for w in ws.iter_mut() {
        w.wait();
    }
}

/// The logical content of a database file as pages: copies `db` (and its `-wal`) to a temp
/// dir, checkpoints the copy (TRUNCATE) and returns the file's bytes. The source is not
/// touched. `db` must not be written meanwhile.
pub fn logical_bytes(db: &Path) -> Vec<u8> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("copy.db");
    // A read transaction pins the WAL, so that a concurrent checkpoint (walship's) cannot
    // reset or truncate it between copying the database and copying the WAL.
    let pin = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    pin.execute_batch("BEGIN; SELECT count(*) FROM sqlite_schema;")
        .expect("pin");
    fs::copy(db, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", db.display()));
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    if wal.exists() {
        fs::copy(&wal, tmp.path().join("copy.db-wal")).expect("copy wal");
    }
    drop(pin);
    {
        let c = rusqlite::Connection::open(&copy).expect("open copy");
        let (busy, _, _): (i64, i64, i64) = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("checkpoint copy");
        assert_eq!(busy, 0, "checkpoint of a private copy was busy");
    }
    fs::read(&copy).expect("read copy")
}

/// The page size from a database header.
fn page_size(bytes: &[u8]) -> usize {
    assert!(bytes.len() >= 100, "not a database: {} bytes", bytes.len());
    match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65536,
        n => n as usize,
    }
}

/// Asserts that two databases hold identical pages (after checkpointing copies) and that the
/// restored one passes `PRAGMA integrity_check`.
pub fn assert_same_db(source: &Path, restored: &Path) {
    let a = logical_bytes(source);
    let b = logical_bytes(restored);
    assert_integrity(restored);
    let ps = page_size(&a);
    assert_eq!(ps, page_size(&b), "page sizes differ");
    let diff: Vec<usize> = a
        .chunks(ps)
        .zip(b.chunks(ps))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i + 1)
        .collect();
    assert!(
        a.len() == b.len() && diff.is_empty(),
        "restored {} differs from source {}: {} vs {} pages; differing pages (1-based): {:?}",
        restored.display(),
        source.display(),
        a.len() / ps,
        b.len() / ps,
        &diff[..diff.len().min(20)]
    );
}

/// Asserts `PRAGMA integrity_check` = ok (on a copy).
pub fn assert_integrity(db: &Path) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("copy.db");
    fs::copy(db, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", db.display()));
    let c = rusqlite::Connection::open(&copy).expect("open copy");
    let r: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(r, "ok", "integrity_check of {}", db.display());
}

/// The (writer, seq) pairs in `t`.
pub fn rows(db: &Path) -> BTreeSet<(String, i64)> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    let mut st = c.prepare("SELECT writer, seq FROM t").expect("prepare");
    let r = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    r
}

/// Each writer commits its seqs in order, so at any commit boundary its rows are 0..k.
pub fn assert_prefixes(rows: &BTreeSet<(String, i64)>, what: &str) {
    let mut next: std::collections::BTreeMap<&str, i64> = Default::default();
    for (w, s) in rows {
        let n = next.entry(w.as_str()).or_insert(0);
        assert_eq!(
            *s, *n,
            "{what}: writer {w} has a hole before seq {s}: not a commit boundary"
        );
        *n += 1;
    }
}

/// Restores each position of `reported` from `sb`'s replica and asserts that it restores (it
/// was reported replicated before a `fault`), passes `integrity_check`, and holds each writer's
/// rows up to a commit boundary; `more` checks each restore's rows further.
pub fn assert_reported_positions_restore(
    sb: &Sandbox,
    d: &Daemon,
    reported: &[String],
    fault: &str,
    mut more: impl FnMut(&str, &BTreeSet<(String, i64)>),
) {
    for (i, pos) in reported.iter().enumerate() {
        let out = sb.path(&format!("reported-{i}.db"));
        let o = restore(&out, &sb.replica_url(), &["--position", pos]);
        assert!(
            o.status.success(),
            "position {pos} was reported replicated before a {fault} but cannot be restored: {}\nlog:\n{}",
            o.stderr,
            d.log_text()
        );
        assert_integrity(&out);
        let r = rows(&out);
        assert_prefixes(&r, &format!("restore at {pos}"));
        more(pos, &r);
        let _ = fs::remove_file(&out);
    }
}

/// Asserts every pair in `want` is in `have`; names the first missing ones.
pub fn assert_contains_all(have: &BTreeSet<(String, i64)>, want: &[(String, i64)], what: &str) {
    let missing: Vec<_> = want.iter().filter(|p| !have.contains(*p)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} committed rows are missing, e.g. {:?}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(10)]
    );
}

/// Polls `f` every 10 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lists every file under `dir`, relative paths.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).expect("prefix").to_owned());
            }
        }
    }
    out.sort();
    out
}

/// Segment files (`*.wseg`) under a file replica root.
pub fn segments(root: &Path) -> Vec<PathBuf> {
    walk(root)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "wseg"))
        .map(|p| root.join(p))
        .collect()
}

/// A timestamp in RFC 3339 (UTC, milliseconds) for unix ms.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, sod) = (secs / 86400, secs % 86400);
    // civil_from_days (Howard Hinnant).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms % 1000
    )
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// One fault scenario's figures for the campaign table of issue #6: what was done (rounds,
/// commits written), what it cost (commits lost, recovery time), and what it left (temporary
/// files, errors and warnings walship logged). `finish` prints one `REPORT` line and, when
/// `WALSHIP_REPORT` names a file, appends the figures to it as one JSON object per line, which
/// `bench/campaign.sh` turns into the table of docs/RELIABILITY.md.
///
/// Tests call `finish` before asserting on the same figures, so a failing scenario is still
/// reported with what it measured.
pub struct Report {
    scenario: &'static str,
    t0: Instant,
    pub rounds: usize,
    pub commits: usize,
    pub lost: usize,
    recovery: Vec<Duration>,
    pub temp_files: usize,
    errors: usize,
    warnings: usize,
    messages: BTreeSet<String>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            t0: Instant::now(),
            rounds: 0,
            commits: 0,
            lost: 0,
            recovery: Vec::new(),
            temp_files: 0,
            errors: 0,
            warnings: 0,
            messages: BTreeSet::new(),
        }
    }

    /// Counts what `want` (committed by writers) holds, and which of it `have` lacks.
    pub fn commits(&mut self, have: &BTreeSet<(String, i64)>, want: &[(String, i64)]) {
        self.commits = want.len();
        self.lost = want.iter().filter(|p| !have.contains(*p)).count();
    }

    /// One recovery: from the end of a fault until walship had caught up again.
    pub fn recovered(&mut self, took: Duration) {
        self.recovery.push(took);
    }

    /// Counts the ERROR and WARN lines of a daemon's log (every start of it, if restarted),
    /// and keeps the distinct error messages with numbers, hex and paths blanked.
    pub fn log(&mut self, d: &Daemon) {
        for line in d.log_text().lines() {
            let Some((level, msg)) = [" ERROR ", " WARN "]
                .iter()
                .find_map(|l| line.split_once(l).map(|(_, m)| (*l, m)))
            else {
                continue;
            };
            if level == " WARN " {
                self.warnings += 1;
                continue;
            }
            self.errors += 1;
            let mut m = String::new();
            for w in msg.split_whitespace() {
                if w.contains('=') {
                    break; // structured fields follow the message
                }
                if !m.is_empty() {
                    m.push(' ');
                }
                if w.contains('/') {
                    m.push_str("<path>");
                } else {
                    // A run of digits (a port, an errno, an address part) becomes one N.
                    let mut digits = false;
                    for c in w.chars() {
                        if !c.is_ascii_digit() {
                            m.push(c);
                        } else if !digits {
                            m.push('N');
                        }
                        digits = c.is_ascii_digit();
                    }
                }
            }
            self.messages.insert(m);
        }
    }

    /// Adds the temporary files (`.walship-tmp-*`) left anywhere under `dir`; returns them.
    pub fn temp_files_in(&mut self, dir: &Path) -> Vec<PathBuf> {
        let temps: Vec<PathBuf> = walk(dir)
            .into_iter()
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy()
                        .starts_with(walship::durable::TEMP_PREFIX)
                })
            })
            .map(|p| dir.join(p))
            .collect();
        self.temp_files += temps.len();
        temps
    }

    /// The usual end of a scenario: the commits of `done` that `restored` lacks, the
    /// temporary files left under `dirs`, the daemon's log; then `finish`.
    pub fn end(&mut self, d: &Daemon, restored: &Path, done: &[(String, i64)], dirs: &[&Path]) {
        self.commits(&rows(restored), done);
        self.end_without_rows(d, dirs);
    }

    /// The end of a scenario whose writers' rows are not counted: temporary files under
    /// `dirs`, the daemon's log; then `finish`.
    pub fn end_without_rows(&mut self, d: &Daemon, dirs: &[&Path]) {
        for dir in dirs {
            self.temp_files_in(dir);
        }
        self.log(d);
        self.finish();
    }

    pub fn finish(&self) {
        let max_recovery = self.recovery.iter().max().map(|d| d.as_millis());
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let json = format!(
            "{{\"scenario\":{},\"rounds\":{},\"commits\":{},\"lost\":{},\"recoveries\":{},\
             \"recovery_max_ms\":{},\"temp_files\":{},\"errors\":{},\"warnings\":{},\
             \"error_messages\":[{}],\"seconds\":{:.1}}}",
            q(self.scenario),
            self.rounds,
            self.commits,
            self.lost,
            self.recovery.len(),
            max_recovery.map_or("null".to_string(), |m| m.to_string()),
            self.temp_files,
            self.errors,
            self.warnings,
            self.messages
                .iter()
                .map(|m| q(m))
                .collect::<Vec<_>>()
                .join(","),
            self.t0.elapsed().as_secs_f64()
        );
        eprintln!("REPORT {json}");
        if let Some(path) = std::env::var_os("WALSHIP_REPORT") {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open WALSHIP_REPORT {path:?}: {e}"));
            writeln!(f, "{json}").expect("append to WALSHIP_REPORT");
        }
    }
}

/// A tmpfs of a given size mounted at a path (a small disk to fill), unmounted on drop.
pub struct Tmpfs(PathBuf);
impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).expect("mkdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mount tmpfs on {} (tests need root)",
            at.display()
        );
        Tmpfs(at.to_owned())
    }
    pub fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("remount");
        assert!(st.success(), "remount {}", self.0.display());
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `walship ARGS` to completion (60 s limit) as user and group `uid` (the standard
/// library drops root's supplementary groups): permission checks apply as they do to an
/// operator's service user.
pub fn walship_as<S: AsRef<OsStr>>(uid: u32, args: &[S]) -> Out {
    let mut c = Command::new(BIN);
    c.args(args).uid(uid).gid(uid);
    run_to_end(c, format!("(uid {uid}) walship {}", shell_words(args)))
}

/// Runs the sqlite3 CLI as an application would: with a busy timeout of 5 s (the CLI's own
/// default is none, and walship briefly locks a database it has just (re)opened). Returns its
/// output, trimmed; panics with its error if it fails.
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let o = Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("run the sqlite3 CLI (install sqlite3)");
    assert!(
        o.status.success(),
        "sqlite3 {} {sql:?}: {}",
        db.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// How to start a [`Daemon`]: its arguments and state dir, plus what some tests need (a
/// notification socket, environment, a log file of their own, a wrapper command, not waiting
/// for the status file). Options apply in the order given; the environment starts as the test's
/// own with `RUST_LOG=info` (or `$WALSHIP_TEST_LOG`).
#[derive(Debug, Clone)]
pub struct DaemonBuilder {
    args: Vec<OsString>,
    state: PathBuf,
    log: Option<PathBuf>,
    /// Set (`Some`) or removed (`None`), in order.
    env: Vec<(OsString, Option<OsString>)>,
    /// A command the daemon runs under: `WRAPPER... BIN ARGS...`.
    wrapper: Vec<OsString>,
    wait_for_status: bool,
}

impl Daemon {
    /// `walship replicate ARGS... --state-dir STATE`, to be configured, then [`DaemonBuilder::start`].
    pub fn replicate<S: AsRef<OsStr>>(args: &[S], state: &Path) -> DaemonBuilder {
        let mut a: Vec<OsString> = vec!["replicate".into()];
        a.extend(args.iter().map(|s| s.as_ref().to_owned()));
        a.push("--state-dir".into());
        a.push(state.into());
        Daemon::raw(a, state)
    }

    /// `walship ARGS` with `state` as the state dir the config names, to be configured.
    pub fn raw(args: Vec<OsString>, state: &Path) -> DaemonBuilder {
        DaemonBuilder {
            args,
            state: state.to_owned(),
            log: None,
            env: Vec::new(),
            wrapper: Vec::new(),
            wait_for_status: true,
        }
    }

    /// Whether it still runs; records how it exited if it did (no panic, unlike
    /// [`Daemon::assert_running`]).
    pub fn alive(&mut self) -> bool {
        let Some(c) = self.child.as_mut() else {
            return false;
        };
        match c.try_wait().expect("try_wait") {
            None => true,
            Some(st) => {
                self.exit = Some(st);
                self.child = None;
                false
            }
        }
    }

    /// Sends SIGTERM and returns at once (see [`Daemon::wait_exit`]; [`Daemon::stop`] does both
    /// and asserts exit 0).
    pub fn sigterm(&self) {
        let c = self
            .child
            .as_ref()
            .expect("sigterm: the daemon is not running");
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).expect("send SIGTERM");
    }

    /// Waits up to `timeout` for it to exit; how it exited, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.alive() {
                return self.exit;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl DaemonBuilder {
    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> DaemonBuilder {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable (also one set by default, such as `RUST_LOG`).
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> DaemonBuilder {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// `NOTIFY_SOCKET=path`: systemd's notification socket (see `notify::NotifySocket`).
    pub fn notify_socket(self, path: &Path) -> DaemonBuilder {
        self.env("NOTIFY_SOCKET", path)
    }

    /// Appends stdout and stderr to `path` (created if missing) instead of a log beside the
    /// state dir.
    pub fn log(mut self, path: &Path) -> DaemonBuilder {
        self.log = Some(path.to_owned());
        self
    }

    /// Runs the daemon as `PROGRAM ARGS... BIN DAEMON-ARGS...`; the wrapper must end by
    /// exec'ing its arguments, so that the daemon's pid is the one spawned.
    pub fn wrapper<S: AsRef<OsStr>>(mut self, program: S, args: &[S]) -> DaemonBuilder {
        self.wrapper = std::iter::once(&program)
            .chain(args)
            .map(|s| s.as_ref().to_owned())
            .collect();
        self
    }

    /// Runs the daemon in a mount namespace of its own in which `over` is bind-mounted on `at`
    /// (so the same path names another file than it does for the test); needs util-linux's
    /// `unshare`.
    pub fn in_mount_namespace(self, over: &Path, at: &Path) -> DaemonBuilder {
        self.wrapper(
            OsStr::new("unshare"),
            &[
                OsStr::new("--mount"),
                OsStr::new("--propagation"),
                OsStr::new("private"),
                OsStr::new("sh"),
                OsStr::new("-c"),
                OsStr::new(r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#),
                OsStr::new("sh"),
                over.as_os_str(),
                at.as_os_str(),
            ],
        )
    }

    /// Returns from [`DaemonBuilder::start`] as soon as the process is spawned, instead of once
    /// the `status` file exists.
    pub fn no_wait(mut self) -> DaemonBuilder {
        self.wait_for_status = false;
        self
    }

    /// Spawns the daemon; unless [`DaemonBuilder::no_wait`], waits (15 s at most) until its
    /// `status` file exists, and panics with its log if it exits first.
    pub fn start(self) -> Daemon {
        let state = self.state.clone();
        let log = self.log.clone().unwrap_or_else(|| {
            state.with_file_name(format!(
                "walship-{}-{}.log",
                state
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ))
        });
        let mut d = Daemon {
            child: None,
            launch: self,
            exit: None,
            state,
            log,
        };
        d.spawn();
        d
    }
}

/// Runs `walship ARGS` to completion (60 s limit) with `env` set on top of the test's own.
pub fn walship_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &OsStr)]) -> Out {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let mut c = Command::new(BIN);
    c.args(&args);
    for (k, v) in env {
        c.env(k, v);
    }
    run_to_end(c, format!("walship {}", shell_words(&args)))
}
