//! The real `walship replicate` under a simulated service manager: a [`NotifySocket`] plays
//! systemd's notification socket, `WATCHDOG_USEC=2000000` arms the watchdog (so the daemon
//! must ping at least every second), and the `WALSHIP_FAILPOINT_STALL` hook hangs the work
//! loop on demand.
//!
//! Invariants checked: `READY=1` only once the replica holds a restorable first snapshot;
//! `STATUS=` follows the position; `WATCHDOG=1` comes from the work loop only (a stalled loop
//! stops pinging, the process stays alive, pinging resumes after the stall); `SIGTERM` sends
//! `STOPPING=1`, ships what is pending and exits 0; no notification socket and a journal stream
//! without journald are harmless; a bad config exits 78 with one `file:line:column` line.
//!
//! `WATCHDOG_PID` is left unset: the child's pid is only known after spawning it, and an unset
//! `WATCHDOG_PID` means the watchdog applies to whoever reads `WATCHDOG_USEC`.

use crate::notify::NotifySocket;
use crate::util::{Daemon, BIN};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// systemd's watchdog timeout for the daemon, in microseconds (the daemon pings every half).
const WATCHDOG_USEC: &str = "2000000";
/// Longest wait for anything that should come promptly (generous: 2 shared cores).
const WAIT: Duration = Duration::from_secs(10);

/// A scratch directory with a database (`create table t(x)`; [`Scratch::without_db`]: not
/// yet), a replica directory, a state directory and a file for the daemon's stderr. Shared
/// with `lifecycle`, which adds its own methods.
pub(crate) struct Scratch {
    _dir: tempfile::TempDir,
    pub(crate) root: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let s = Scratch::without_db();
        s.create_db();
        s
    }

    /// The directories, without the database.
    pub(crate) fn without_db() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical tempdir");
        fs::create_dir(root.join("replica")).expect("mkdir replica");
        Scratch { _dir: dir, root }
    }

    /// Creates `app.db` with `create table t(x)`.
    pub(crate) fn create_db(&self) {
        let conn = rusqlite::Connection::open(self.db()).expect("create the database");
        conn.execute_batch("create table t(x)")
            .expect("create table");
    }

    pub(crate) fn db(&self) -> PathBuf {
        self.root.join("app.db")
    }

    pub(crate) fn replica(&self) -> PathBuf {
        self.root.join("replica")
    }

    fn replica_url(&self) -> String {
        format!("file://{}", self.replica().display())
    }

    fn stall_file(&self) -> PathBuf {
        self.root.join("stall")
    }

    /// Inserts `n` rows in one transaction from this (test) process: a separate connection,
    /// closed before returning.
    pub(crate) fn insert(&self, n: usize) {
        let mut conn = rusqlite::Connection::open(self.db()).expect("open the database");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        let tx = conn.transaction().expect("begin");
        for i in 0..n {
            tx.execute("insert into t(x) values (?1)", [i as i64])
                .expect("insert");
        }
        tx.commit().expect("commit");
    }

    /// The snapshot files the replica holds (`generations/*/snap-*`).
    fn replica_snapshots(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(gens) = fs::read_dir(self.replica().join("generations")) else {
            return out;
        };
        for g in gens.flatten() {
            let Ok(files) = fs::read_dir(g.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name();
                let name = name.to_string_lossy();
                if name.starts_with("snap-") && name.ends_with(".wsnap") {
                    out.push(f.path());
                }
            }
        }
        out
    }

    /// Restores the replica into a fresh file (removing what an earlier call left under that
    /// name, so a caller may poll) and returns the number of rows in `t`.
    pub(crate) fn restore_count(&self, name: &str) -> i64 {
        let out = self.root.join(name);
        for suffix in ["", "-wal", "-shm"] {
            let mut p = out.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
        let o = Command::new(BIN)
            .args(["restore", "-o"])
            .arg(&out)
            .arg(self.replica_url())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .output()
            .expect("run walship restore");
        assert!(
            o.status.success(),
            "walship restore failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        let conn = rusqlite::Connection::open(&out).expect("open the restored database");
        conn.query_row("select count(*) from t", [], |r| r.get(0))
            .expect("count rows in the restored database")
    }
}

/// `walship replicate ARGS --state-dir STATE` under the simulated service manager:
/// `NOTIFY_SOCKET=notify` (or none), `WATCHDOG_USEC` set, `WATCHDOG_PID` unset, the stall hook
/// armed, no log settings or journal stream inherited from the test, and `extra` environment
/// variables; its output goes to `daemon.stderr` in the scratch directory. Returns as soon as
/// it is spawned (the tests watch its notifications, not its status file).
fn start(
    s: &Scratch,
    args: &[OsString],
    notify: Option<&Path>,
    extra: &[(&str, String)],
) -> Daemon {
    let mut b = Daemon::replicate(args, &s.root.join("state"))
        .log(&s.root.join("daemon.stderr"))
        .no_wait()
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env("WALSHIP_FAILPOINT_STALL", s.stall_file())
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .env_remove("WALSHIP_LOG")
        .env_remove("RUST_LOG")
        .env_remove("STATE_DIRECTORY")
        .env_remove("NOTIFY_SOCKET");
    if let Some(p) = notify {
        b = b.notify_socket(p);
    }
    for (k, v) in extra {
        b = b.env(k, v);
    }
    b.start()
}

/// `walship replicate DB file:///REPLICA`, started as [`start`] says.
fn spawn(s: &Scratch, notify: Option<&Path>, extra: &[(&str, String)]) -> Daemon {
    let args = [s.db().into_os_string(), OsString::from(s.replica_url())];
    start(s, &args, notify, extra)
}

/// `walship replicate --config CONFIG`, started as [`start`] says.
fn spawn_config(s: &Scratch, config: &Path, notify: Option<&Path>) -> Daemon {
    start(s, &[OsString::from("--config"), config.into()], notify, &[])
}

/// A parsed `STATUS=replicated to OK/N replicas, lag X ms, position GEN/TXID[, ...]`.
#[derive(Debug)]
struct Status {
    ok: u32,
    of: u32,
    lag_ms: u64,
    generation: String,
    txid: u64,
}

fn parse_status(line: &str) -> Option<Status> {
    let status = line.strip_prefix("STATUS=")?.parse().ok()?;
    let walship::replicate::state::Status::Replicating(p) = status else {
        return None;
    };
    Some(Status {
        ok: u32::try_from(p.ok).ok()?,
        of: u32::try_from(p.total).ok()?,
        lag_ms: p.lag_ms,
        generation: p.generation.to_string(),
        txid: p.txid,
    })
}

/// Receives for `span` and returns every line with its arrival time.
fn collect(sock: &NotifySocket, span: Duration) -> Vec<(Instant, String)> {
    let deadline = Instant::now() + span;
    let mut out = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if let Some(msg) = sock.recv_timeout(left) {
            let at = Instant::now();
            out.extend(msg.lines().map(|l| (at, l.to_owned())));
        }
    }
    out
}

/// The longest gap between consecutive `WATCHDOG=1` lines, counting from `from` to the first
/// and from the last to `to`.
fn longest_watchdog_gap(lines: &[(Instant, String)], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut gap = Duration::ZERO;
    for (at, l) in lines {
        if l == "WATCHDOG=1" {
            gap = gap.max(at.duration_since(last));
            last = *at;
        }
    }
    gap.max(to.duration_since(last))
}

/// Starts a daemon on a fresh database and waits for `READY=1`; asserts that by then the
/// replica holds the first snapshot and that the status sent before READY said so.
fn start_ready(s: &Scratch, sock: &NotifySocket) -> (Daemon, Status) {
    let mut d = spawn(s, Some(sock.path()), &[]);
    let ready = sock.wait_for("READY=", WAIT);
    let snaps = s.replica_snapshots();
    assert_eq!(ready.as_deref(), Some("READY=1"), "seen: {:?}", sock.seen());
    assert!(d.alive(), "the daemon exited before READY");
    assert!(
        !snaps.is_empty(),
        "READY=1 arrived before the replica held a snapshot (seen: {:?})",
        sock.seen()
    );
    let seen = sock.seen();
    let status = seen
        .iter()
        .rev()
        .find(|l| l.starts_with("STATUS="))
        .and_then(|l| parse_status(l))
        .unwrap_or_else(|| panic!("no parsable STATUS= before READY=1: {seen:?}"));
    assert_eq!(
        (status.ok, status.of),
        (1, 1),
        "READY=1 before every replica caught up: {seen:?}"
    );
    (d, status)
}

/// Holds the replica's first sync: the replica's marker file is a FIFO, so the shipper blocks
/// in `open()` on it until [`open_gate`] lets it through with a valid marker.
fn close_gate(s: &Scratch) -> PathBuf {
    let marker = s.replica().join(walship::layout::names::MARKER_FILE);
    nix::unistd::mkfifo(&marker, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .expect("mkfifo the replica marker");
    marker
}

/// Unblocks the shipper waiting in `open()` on the FIFO from [`close_gate`], removes the FIFO
/// and hands the shipper a valid marker for the database.
fn open_gate(s: &Scratch, fifo: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: fails (ENXIO) unless the shipper is already waiting to read.
    let mut w = fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(fifo)
        .expect("the shipper is blocked reading the marker FIFO");
    fs::remove_file(fifo).expect("remove the marker FIFO");
    let marker = walship::layout::names::Marker {
        format: walship::layout::names::FORMAT_VERSION,
        database: walship::replicate::identity(&s.db()),
        created_ms: 1,
        encryption: None,
    };
    w.write_all(marker.to_toml().as_bytes())
        .expect("write the marker into the FIFO");
}

#[test]
fn ready_after_first_sync_then_status_follows_position() {
    let s = Scratch::new();
    let sock = NotifySocket::bind();
    // The replica is reachable but slow: its first sync cannot finish while the gate is shut.
    let fifo = close_gate(&s);
    let mut d = spawn(&s, Some(sock.path()), &[]);
    let held = collect(&sock, Duration::from_millis(1500));
    assert!(d.alive(), "the daemon exited while its replica was held");
    assert!(
        !held.iter().any(|(_, l)| l.starts_with("READY=")),
        "READY=1 before the replica's first sync: {held:?}"
    );
    assert!(s.replica_snapshots().is_empty());
    let statuses: Vec<&str> = held
        .iter()
        .map(|(_, l)| l.as_str())
        .filter(|l| l.starts_with("STATUS="))
        .collect();
    // Start-up says what it does before the first snapshot; then the replication status.
    assert!(
        statuses
            .first()
            .is_some_and(|l| l.starts_with("STATUS=starting: ")),
        "the first status should say walship is starting: {statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .skip(1)
            .all(|l| parse_status(l).is_some_and(|st| st.ok == 0 && st.of == 1)),
        "while held the status says 0/1: {statuses:?}"
    );
    assert!(
        held.iter().any(|(_, l)| l == "WATCHDOG=1"),
        "the work loop pings while waiting for the replica: {held:?}"
    );

    open_gate(&s, &fifo);
    let ready = sock.wait_for("READY=", WAIT);
    let snaps = s.replica_snapshots();
    assert_eq!(ready.as_deref(), Some("READY=1"), "seen: {:?}", sock.seen());
    assert!(
        !snaps.is_empty(),
        "READY=1 arrived before the replica held a snapshot (seen: {:?})",
        sock.seen()
    );
    let seen = sock.seen();
    let first = seen
        .iter()
        .rev()
        .find(|l| l.starts_with("STATUS="))
        .and_then(|l| parse_status(l))
        .unwrap_or_else(|| panic!("no parsable STATUS= before READY=1: {seen:?}"));
    assert_eq!((first.ok, first.of), (1, 1), "status at READY: {seen:?}");
    // What READY promised: the replica restores to the database as it was.
    assert_eq!(s.restore_count("at-ready.db"), 0);

    s.insert(10);
    let deadline = Instant::now() + WAIT;
    let later = loop {
        let line = sock
            .wait_for(
                "STATUS=",
                deadline.saturating_duration_since(Instant::now()),
            )
            .unwrap_or_else(|| {
                panic!(
                    "no STATUS= with a position past {} after inserting rows: {:?}",
                    first.txid,
                    sock.seen()
                )
            });
        let st = parse_status(&line).unwrap_or_else(|| panic!("unparsable status {line:?}"));
        if st.txid > first.txid && st.ok == 1 {
            break st;
        }
    };
    assert_eq!(later.generation, first.generation, "same generation");
    assert_eq!(later.of, 1);
    assert!(
        later.lag_ms < 60_000,
        "a caught-up replica reports a small lag: {later:?}"
    );
    assert!(d.alive());
    assert!(
        !sock.seen().iter().any(|l| l == "STOPPING=1"),
        "no STOPPING=1 while running"
    );
}

#[test]
fn watchdog_pings_from_the_work_loop_only() {
    let s = Scratch::new();
    let sock = NotifySocket::bind();
    let (mut d, _) = start_ready(&s, &sock);

    // Healthy and idle: a ping at least every half of WATCHDOG_USEC (1 s, some slack for a
    // loaded machine; systemd would kill only after 2 s).
    let from = Instant::now();
    let lines = collect(&sock, Duration::from_millis(2500));
    let to = Instant::now();
    let pings = lines.iter().filter(|(_, l)| l == "WATCHDOG=1").count();
    let gap = longest_watchdog_gap(&lines, from, to);
    assert!(pings >= 2, "only {pings} WATCHDOG=1 in 2.5 s: {lines:?}");
    assert!(
        gap <= Duration::from_millis(1500),
        "watchdog gap {gap:?} while idle (timeout 2 s): {lines:?}"
    );

    // Stall the loop. The iteration under way (if it already passed the stall check) may still
    // ping once; after that: silence for at least 3 s (systemd would kill it after 2 s).
    // Measured from the last ping, not from a fixed settle time, so a slow machine cannot
    // make a sound daemon fail; a daemon that pings from anywhere but the loop pings again.
    const SILENCE: Duration = Duration::from_millis(3200);
    fs::write(s.stall_file(), b"").expect("create the stall file");
    let stalled_at = Instant::now();
    let give_up = stalled_at + Duration::from_secs(8);
    let mut since = stalled_at;
    let mut after_stall = Vec::new();
    while since.elapsed() < SILENCE {
        assert!(
            Instant::now() < give_up,
            "WATCHDOG=1 keeps coming while the work loop is stalled: {after_stall:?}"
        );
        let left = SILENCE.saturating_sub(since.elapsed());
        if let Some(msg) = sock.recv_timeout(left) {
            let at = Instant::now();
            for l in msg.lines() {
                after_stall.push((at.duration_since(stalled_at), l.to_owned()));
                if l == "WATCHDOG=1" {
                    since = at;
                }
            }
            let pings = after_stall
                .iter()
                .filter(|(_, l)| l == "WATCHDOG=1")
                .count();
            assert!(
                pings <= 1,
                "{pings} WATCHDOG=1 after the loop was told to stall (at most the iteration under way may ping): {after_stall:?}"
            );
        }
    }
    assert!(
        d.alive(),
        "a stalled daemon must stay alive (systemd kills it)"
    );

    // Unstall: pings resume promptly.
    let resumed_from = Instant::now();
    fs::remove_file(s.stall_file()).expect("remove the stall file");
    let ping = sock.wait_for("WATCHDOG=", Duration::from_secs(3));
    assert_eq!(
        ping.as_deref(),
        Some("WATCHDOG=1"),
        "pings did not resume after the stall: {:?}",
        sock.seen()
    );
    assert!(resumed_from.elapsed() < Duration::from_millis(2500));
    let lines = collect(&sock, Duration::from_millis(1500));
    assert!(
        lines.iter().any(|(_, l)| l == "WATCHDOG=1"),
        "pings stopped again after resuming: {lines:?}"
    );
    assert!(d.alive());
}

#[test]
fn sigterm_sends_stopping_and_ships_what_is_pending() {
    let s = Scratch::new();
    let sock = NotifySocket::bind();
    let (mut d, _) = start_ready(&s, &sock);

    // Commits right before SIGTERM: the daemon may not even have seen their inotify events.
    s.insert(100);
    s.insert(23);
    d.sigterm();
    assert_eq!(
        sock.wait_for("STOPPING=", WAIT).as_deref(),
        Some("STOPPING=1"),
        "seen: {:?}",
        sock.seen()
    );
    let st = d
        .wait_exit(Duration::from_secs(20))
        .expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st}");
    assert!(
        d.log_text().contains("stopped"),
        "no stop line on stderr: {}",
        d.log_text()
    );
    assert_eq!(
        s.restore_count("after-stop.db"),
        123,
        "rows committed before SIGTERM are on the replica"
    );
}

#[test]
fn sigterm_waits_for_a_slow_replica_to_receive_everything() {
    let s = Scratch::new();
    let sock = NotifySocket::bind();
    let fifo = close_gate(&s);
    let mut d = spawn(&s, Some(sock.path()), &[]);
    // The loop runs (it reports 0/1) while the replica cannot take anything.
    let line = sock
        .wait_for("STATUS=replicated to ", WAIT)
        .unwrap_or_else(|| panic!("no STATUS=replicated: {:?}", sock.seen()));
    assert!(parse_status(&line).is_some_and(|st| st.ok == 0), "{line}");
    s.insert(40);
    s.insert(2);
    d.sigterm();
    assert_eq!(
        sock.wait_for("STOPPING=", WAIT).as_deref(),
        Some("STOPPING=1"),
        "seen: {:?}",
        sock.seen()
    );
    // Everything is still pending: the daemon must wait (up to its grace period), not exit.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        d.alive(),
        "exited with data pending for a reachable replica: {:?}",
        d.wait_exit(Duration::ZERO)
    );
    assert!(s.replica_snapshots().is_empty());
    open_gate(&s, &fifo);
    let st = d
        .wait_exit(Duration::from_secs(20))
        .expect("exit once shipped");
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st}");
    assert_eq!(
        s.restore_count("after-slow-stop.db"),
        42,
        "rows committed before SIGTERM reached the slow replica"
    );
}

/// Two replicas on restart: `a` caught up in an earlier run but now failing, `b` new and held.
/// `a` is settled (caught up, and known to be down); `b` is reachable and has not synced, so
/// READY must wait for `b`. A replica that is both caught up and failing counts once.
#[test]
fn ready_waits_for_every_reachable_replica_even_when_another_is_caught_up_but_failing() {
    let s = Scratch::new();
    let a = s.root.join("replica-a");
    let b = s.replica(); // The gate lives in Scratch::replica().
    let config = s.root.join("two.toml");
    let write_config = |replicas: &[(&str, &Path)]| {
        let mut text = format!("db = \"{}\"\n", s.db().display());
        for (name, dir) in replicas {
            text.push_str(&format!(
                "\n[[replica]]\nname = \"{name}\"\nurl = \"file://{}\"\n",
                dir.display()
            ));
        }
        fs::write(&config, text).expect("write the config");
    };

    // Run 1: only `a`; it catches up, then a clean stop.
    write_config(&[("a", &a)]);
    let sock = NotifySocket::bind();
    let mut d = spawn_config(&s, &config, Some(sock.path()));
    assert_eq!(
        sock.wait_for("READY=", WAIT).as_deref(),
        Some("READY=1"),
        "run 1: {:?}",
        sock.seen()
    );
    d.sigterm();
    assert_eq!(
        d.wait_exit(WAIT).and_then(|st| st.code()),
        Some(0),
        "run 1 exit"
    );
    drop(d);

    // Run 2: `a` now refuses us (its marker names another database), `b` is held.
    let marker = walship::layout::names::Marker {
        format: walship::layout::names::FORMAT_VERSION,
        database: "elsewhere:/other.db".into(),
        created_ms: 1,
        encryption: None,
    };
    fs::write(
        a.join(walship::layout::names::MARKER_FILE),
        marker.to_toml(),
    )
    .expect("rewrite a's marker");
    let fifo = close_gate(&s);
    write_config(&[("a", &a), ("b", &b)]);
    let sock = NotifySocket::bind();
    let mut d = spawn_config(&s, &config, Some(sock.path()));
    let held = collect(&sock, Duration::from_millis(2000));
    assert!(d.alive(), "run 2 exited early");
    assert!(
        held.iter()
            .any(|(_, l)| l.starts_with("STATUS=") && l.contains("failing: a:")),
        "run 2 reports a as failing: {held:?}"
    );
    assert!(
        !held.iter().any(|(_, l)| l.starts_with("READY=")),
        "READY=1 while b, reachable, has not synced: {held:?}"
    );
    open_gate(&s, &fifo);
    s.insert(1);
    assert_eq!(
        sock.wait_for("READY=", WAIT).as_deref(),
        Some("READY=1"),
        "run 2 after b synced: {:?}",
        sock.seen()
    );
    assert!(!s.replica_snapshots().is_empty());
}

/// A replica added to the config while the daemon was stopped, the database unchanged since:
/// the generation resumes and the spool is empty (everything went to the old replicas and was
/// deleted), so the new replica's shipper must ask for a fresh snapshot by itself.
#[test]
fn a_replica_added_on_restart_is_synced_without_new_writes() {
    let s = Scratch::new();
    let a = s.root.join("replica-a");
    let config = s.root.join("two.toml");
    let write_config = |replicas: &[(&str, &Path)]| {
        let mut text = format!("db = \"{}\"\n", s.db().display());
        for (name, dir) in replicas {
            text.push_str(&format!(
                "\n[[replica]]\nname = \"{name}\"\nurl = \"file://{}\"\n",
                dir.display()
            ));
        }
        fs::write(&config, text).expect("write the config");
    };
    write_config(&[("a", &a)]);
    let sock = NotifySocket::bind();
    let mut d = spawn_config(&s, &config, Some(sock.path()));
    assert_eq!(sock.wait_for("READY=", WAIT).as_deref(), Some("READY=1"));
    d.sigterm();
    assert_eq!(
        d.wait_exit(WAIT).and_then(|st| st.code()),
        Some(0),
        "run 1 exit"
    );
    drop(d);

    write_config(&[("a", &a), ("b", &s.replica())]);
    let sock = NotifySocket::bind();
    let _d = spawn_config(&s, &config, Some(sock.path()));
    assert_eq!(
        sock.wait_for("READY=", WAIT).as_deref(),
        Some("READY=1"),
        "the new replica b never caught up: {:?}",
        sock.seen()
    );
    assert!(!s.replica_snapshots().is_empty(), "b holds no snapshot");
}

#[test]
fn no_notify_socket_and_no_journald_still_replicates_and_logs_to_stderr() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new();
    // JOURNAL_STREAM naming the very file that is stderr: the daemon takes the journald path,
    // finds no journald socket (none on this machine, or the check below is skipped), and must
    // fall back to stderr.
    let journald_here = Path::new("/run/systemd/journal/socket").exists();
    let stderr_path = s.root.join("daemon.stderr");
    fs::File::create(&stderr_path).expect("pre-create the stderr file");
    let meta = fs::metadata(&stderr_path).expect("stat the stderr file");
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut d = spawn(&s, None, &[("JOURNAL_STREAM", stream)]);
    assert_eq!(
        fs::metadata(&stderr_path).expect("stat").ino(),
        meta.ino(),
        "the stderr file kept its inode"
    );

    let deadline = Instant::now() + WAIT;
    while s.replica_snapshots().is_empty() {
        assert!(d.alive(), "the daemon exited without a notification socket");
        assert!(Instant::now() < deadline, "no snapshot on the replica");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.insert(5);
    d.sigterm();
    let st = d
        .wait_exit(Duration::from_secs(20))
        .expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st}");
    if journald_here {
        eprintln!("journald socket present: the stderr fallback is not exercised here");
    } else {
        let err = d.log_text();
        assert!(
            err.contains("replicating to 1 replica"),
            "JOURNAL_STREAM set without journald: logs must still reach stderr, got {err:?}"
        );
    }
    assert_eq!(s.restore_count("plain.db"), 5);
}

#[test]
fn bad_config_exits_78_with_file_line_column() {
    let s = Scratch::new();
    let sock = NotifySocket::bind();
    let config = s.root.join("bad.toml");
    fs::write(
        &config,
        format!(
            "db = \"{}\"\ncolour = \"blue\"\n\n[[replica]]\nurl = \"{}\"\n",
            s.db().display(),
            s.replica_url()
        ),
    )
    .expect("write the config");
    let o = Command::new(BIN)
        .arg("replicate")
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(s.root.join("state"))
        .env("NOTIFY_SOCKET", sock.path())
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("run walship replicate --config");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(78), "exit status; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one stderr line: {err:?}");
    let at = format!("{}:2:1", config.display());
    assert!(
        lines[0].contains(&at) && lines[0].contains("colour"),
        "the line names {at} and the key: {err:?}"
    );
    assert!(o.stdout.is_empty(), "nothing on stdout");
    assert_eq!(
        sock.recv_timeout(Duration::from_millis(200)),
        None,
        "no notification from a daemon that never started"
    );
    assert!(s.replica_snapshots().is_empty());
}
