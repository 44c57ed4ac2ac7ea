//! The daemon's life cycle as an operator and systemd see it (issue #11): starting before the
//! database exists, stopping with a replica that refuses writes, and replica errors that need
//! an operator. Real `walship replicate` processes, real SQLite files, file:// replicas made
//! unwritable for a daemon that runs as an unprivileged user (root ignores modes).
//!
//! Invariants checked:
//! - A missing database: `READY=1` within about a second with `STATUS=waiting for DB to be
//!   created`; `walship status` says so (exit 7, `waiting-for-db`); once the file is created,
//!   its commits replicate and restore.
//! - Stop: healthy, exit 0; a replica that refuses writes, exit 69 after `shutdown-timeout`
//!   (not before, not much after) with a last line naming the replica and what it misses; a
//!   second SIGTERM ends the wait within a second; an sftp replica that hangs (server frozen
//!   with SIGSTOP, an upload blocked inside its 10 s I/O timeout) does not hold the stop past
//!   `shutdown-timeout`.
//! - Permanent errors (permission denied, a replica of another database): the status (file,
//!   `STATUS=` and `walship status`) carries `permanent:` and what to do, and the log line is
//!   not repeated on every retry.

use crate::daemon_notify::Scratch;
use crate::notify::NotifySocket;
use crate::util::{poll, walship, Daemon};
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// The unprivileged user the stop tests run the daemon as (`nobody`).
const NOBODY: u32 = 65534;

/// `daemon_notify`'s scratch directory (`Scratch::without_db`: `app.db` not created,
/// `replica/`), with `state/`, `daemon.log` and what the stop tests need.
impl Scratch {
    fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    fn log(&self) -> PathBuf {
        self.root.join("daemon.log")
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// A config with a file:// replica named `file` and `shutdown-timeout`.
    fn config(&self, shutdown_timeout: &str) -> PathBuf {
        let p = self.root.join("app.toml");
        fs::write(
            &p,
            format!(
                "db = \"{}\"\nshutdown-timeout = \"{shutdown_timeout}\"\n[[replica]]\nname = \"file\"\nurl = \"file://{}\"\n",
                self.db().display(),
                self.replica().display()
            ),
        )
        .expect("write the config");
        p
    }

    /// `walship status [--config CONFIG] --state-dir STATE [--json]` (the config when one was
    /// written): exit code and output.
    fn status(&self, json: bool) -> (i32, String) {
        let mut args: Vec<OsString> = vec!["status".into(), "--state-dir".into()];
        args.push(self.state().into());
        let config = self.root.join("app.toml");
        if config.exists() {
            args.push("--config".into());
            args.push(config.into());
        }
        if json {
            args.push("--json".into());
        }
        let o = walship(&args);
        (o.code(), o.stdout)
    }

    fn status_json(&self) -> (i32, Value) {
        let (code, out) = self.status(true);
        let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {out:?}: {e}"));
        (code, v)
    }

    /// The status file's line (without its time).
    fn status_line(&self) -> String {
        let text = fs::read_to_string(self.state().join("status")).unwrap_or_default();
        text.split_once(' ')
            .map(|(_, l)| l.trim_end().to_owned())
            .unwrap_or_default()
    }

    /// Gives every file and directory to `uid` (the daemon's user).
    fn chown_all(&self, uid: u32) {
        let st = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{uid}"))
            .arg(&self.root)
            .status()
            .expect("run chown");
        assert!(st.success(), "chown -R {}", self.root.display());
    }

    /// Sets the mode of the replica's directories (its files keep theirs).
    fn chmod_replica_dirs(&self, mode: u32) {
        fn walk(d: &Path, mode: u32) {
            for e in fs::read_dir(d).expect("read_dir").flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), mode);
                }
            }
            fs::set_permissions(d, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        walk(&self.replica(), mode);
    }
}

/// `walship replicate ARGS --state-dir STATE`, logging to `daemon.log`, optionally with a
/// notification socket, as `uid` if given (through `setpriv`, which execs walship: the pid
/// is the daemon's).
fn start(s: &Scratch, args: &[OsString], notify: Option<&Path>, uid: Option<u32>) -> Daemon {
    let mut b = Daemon::replicate(args, &s.state())
        .log(&s.log())
        .no_wait()
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .env_remove("STATE_DIRECTORY")
        .env("RUST_LOG", "walship=info");
    if let Some(p) = notify {
        b = b.notify_socket(p);
    }
    if let Some(uid) = uid {
        b = b.wrapper(
            "setpriv".to_owned(),
            &[
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_owned(),
            ],
        );
    }
    b.start()
}

/// Waits until the status file says every replica holds everything, nothing failing.
fn wait_caught_up(s: &Scratch, d: &mut Daemon, timeout: Duration) {
    poll("every replica caught up", timeout, || {
        assert!(d.alive(), "the daemon exited; log:\n{}", s.log_text());
        let l = s.status_line();
        (l.starts_with("replicated to 1/1 replicas, lag 0 ms") && !l.contains("failing"))
            .then_some(())
    });
}

/// SIGTERM, then the exit code and how long it took.
fn stop(d: &mut Daemon, s: &Scratch, second_after: Option<Duration>) -> (i32, Duration) {
    let t0 = Instant::now();
    d.sigterm();
    if let Some(after) = second_after {
        std::thread::sleep(after);
        assert!(
            d.alive(),
            "exited before the second signal; log:\n{}",
            s.log_text()
        );
        d.sigterm();
    }
    let st = d
        .wait_exit(60 * SEC)
        .unwrap_or_else(|| panic!("no exit within 60 s of SIGTERM; log:\n{}", s.log_text()));
    let took = t0.elapsed();
    let code = st
        .code()
        .unwrap_or_else(|| panic!("killed by a signal ({st}); log:\n{}", s.log_text()));
    (code, took)
}

#[test]
fn missing_database_is_ready_at_once_and_replicates_once_created() {
    let s = Scratch::without_db();
    let sock = NotifySocket::bind();
    let args = [
        s.db().into_os_string(),
        format!("file://{}", s.replica().display()).into(),
    ];
    let t0 = Instant::now();
    let mut d = start(&s, &args, Some(sock.path()), None);
    let ready = sock.wait_for("READY=", 10 * SEC);
    let took = t0.elapsed();
    eprintln!("READY after {took:?} with the database missing");
    assert_eq!(
        ready.as_deref(),
        Some("READY=1"),
        "seen: {:?}; log:\n{}",
        sock.seen(),
        s.log_text()
    );
    assert!(
        took < Duration::from_millis(1500),
        "READY took {took:?} while the database is missing"
    );
    let want = format!("waiting for {} to be created", s.db().display());
    assert!(
        sock.seen().contains(&format!("STATUS={want}")),
        "STATUS= should say {want:?}: {:?}",
        sock.seen()
    );
    assert_eq!(s.status_line(), want);

    let (code, v) = s.status_json();
    assert_eq!(code, 7, "{v}");
    assert_eq!(v["health"], "waiting-for-db", "{v}");
    assert_eq!(v["waiting_for_db"], s.db().display().to_string(), "{v}");
    let (code, text) = s.status(false);
    assert_eq!(code, 7, "{text}");
    assert!(
        text.contains("waiting for the database")
            && text.contains(&format!("for {} to be created", s.db().display())),
        "{text}"
    );
    // Still waiting, still alive: no new READY, no exit.
    std::thread::sleep(SEC);
    assert!(d.alive(), "the daemon exited; log:\n{}", s.log_text());
    assert!(!s.replica().join("generations").exists());

    s.create_db();
    s.insert(10);
    wait_caught_up(&s, &mut d, 20 * SEC);
    s.insert(5);
    poll("the 15 rows on the replica", 20 * SEC, || {
        (s.restore_count("restored.db") == 15).then_some(())
    });
    let (code, v) = s.status_json();
    assert_eq!((code, &v["health"]), (0, &Value::from("healthy")), "{v}");
    let (code, took) = stop(&mut d, &s, None);
    eprintln!("healthy stop: exit {code} after {took:?}");
    assert_eq!(code, 0, "log:\n{}", s.log_text());
}

/// Healthy stop exits 0; a replica refusing writes: exit 69 after `shutdown-timeout` with a
/// last line naming it, and the permanent error in status and log (once, not per retry); a
/// second SIGTERM stops at once.
#[test]
fn stop_exit_code_says_whether_replicas_hold_everything() {
    let s = Scratch::without_db();
    s.create_db();
    let config = s.config("5s");
    s.chown_all(NOBODY);
    let args = [OsString::from("--config"), config.into_os_string()];
    let mut d = start(&s, &args, None, Some(NOBODY));
    wait_caught_up(&s, &mut d, 20 * SEC);
    s.insert(3);
    wait_caught_up(&s, &mut d, 20 * SEC);
    let (code, took) = stop(&mut d, &s, None);
    eprintln!("healthy stop: exit {code} after {took:?}");
    assert_eq!(code, 0, "log:\n{}", s.log_text());
    assert!(took < 2 * SEC, "a healthy stop took {took:?}");

    // The replica refuses writes from now on; new commits cannot reach it.
    d.restart();
    wait_caught_up(&s, &mut d, 20 * SEC);
    s.chmod_replica_dirs(0o555);
    s.insert(7);
    let line = poll("the permanent error in the status", 20 * SEC, || {
        let l = s.status_line();
        l.contains("failing: file: permanent: ").then_some(l)
    });
    assert!(
        line.contains("ermission denied")
            && line.contains(&format!(
                "(needs an operator: give the user walship runs as (uid {NOBODY}) write access there"
            )),
        "{line}"
    );
    let (code, v) = s.status_json();
    assert_eq!((code, &v["health"]), (4, &Value::from("failing")), "{v}");
    let rep = &v["replicas"][0];
    assert_eq!(rep["permanent"], true, "{v}");
    let (_, text) = s.status(false);
    assert!(
        text.lines()
            .any(|l| l.starts_with("failing:    file: permanent: ")
                && l.contains("needs an operator")),
        "{text}"
    );
    // Retries go on (backoff: 0.1 s doubling to 3.2 s); the log says it once.
    std::thread::sleep(4 * SEC);
    let log = s.log_text();
    let said = log
        .lines()
        .filter(|l| l.contains("failing: permanent: "))
        .count();
    assert_eq!(said, 1, "the permanent error logged {said} times:\n{log}");

    let (code, took) = stop(&mut d, &s, None);
    eprintln!(
        "stop with the replica refusing writes (shutdown-timeout 5s): exit {code} after {took:?}"
    );
    assert_eq!(code, 69, "log:\n{}", s.log_text());
    assert!(
        took >= Duration::from_millis(4900) && took < Duration::from_millis(6500),
        "stop took {took:?}, shutdown-timeout is 5s"
    );
    let log = s.log_text();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains(
            "stopped with captured commits not on every replica: file misses 1 commit(s) (txid"
        ),
        "last line: {last}\nlog:\n{log}"
    );

    // A second SIGTERM one second in: out at once.
    d.restart();
    poll(
        "the restarted daemon to report the replica",
        20 * SEC,
        || s.status_line().contains("permanent: ").then_some(()),
    );
    let (code, took) = stop(&mut d, &s, Some(SEC));
    eprintln!("stop with a second SIGTERM after 1 s: exit {code} after {took:?}");
    assert_eq!(code, 69, "log:\n{}", s.log_text());
    assert!(
        took < Duration::from_millis(2000),
        "a second SIGTERM after 1 s: stopped after {took:?}"
    );
}

/// A replica directory that holds another database's replica: permanent, with what to do.
#[test]
fn replica_of_another_database_is_a_permanent_error() {
    let s = Scratch::without_db();
    s.create_db();
    let marker = walship::layout::names::Marker {
        format: walship::layout::names::FORMAT_VERSION,
        database: "otherhost:/srv/other.db".into(),
        created_ms: 1,
        encryption: None,
    };
    fs::write(
        s.replica().join(walship::layout::names::MARKER_FILE),
        marker.to_toml(),
    )
    .expect("write a foreign marker");
    let args = [OsString::from("--config"), s.config("2s").into_os_string()];
    // systemd's side: a socket read all along (an unread one would fill up and block the
    // daemon's sends, which systemd never lets happen).
    let sock = NotifySocket::bind();
    let reading = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                sock.recv_timeout(Duration::from_millis(100));
            }
        });
        // Ends the reader whichever way this body ends (a panic included: the scope waits).
        struct EndReading<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for EndReading<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _end = EndReading(&reading);
        let mut d = start(&s, &args, Some(sock.path()), None);
        let line = poll("the permanent error in the status", 20 * SEC, || {
            let l = s.status_line();
            l.contains("failing: file: permanent: ").then_some(l)
        });
        assert!(
            line.contains("holds the replica of otherhost:/srv/other.db")
                && line.contains("needs an operator: point this replica at another path"),
            "{line}"
        );
        poll("STATUS= to say it too", 10 * SEC, || {
            sock.seen()
                .iter()
                .any(|l| {
                    l.starts_with("STATUS=replicated to 0/1 replicas")
                        && l.contains("failing: file: permanent: ")
                        && l.contains("needs an operator: point this replica at another path")
                })
                .then_some(())
        });
        let (code, v) = s.status_json();
        assert_eq!(code, 4, "{v}");
        assert_eq!(v["replicas"][0]["permanent"], true, "{v}");
        std::thread::sleep(4 * SEC);
        let log = s.log_text();
        let said = log
            .lines()
            .filter(|l| l.contains("failing: permanent: "))
            .count();
        assert_eq!(said, 1, "logged {said} times:\n{log}");
        assert!(log.contains("ERROR"), "{log}");
        let (code, took) = stop(&mut d, &s, None);
        eprintln!("stop with a foreign replica (shutdown-timeout 2s): exit {code} after {took:?}");
        assert_eq!(code, 69, "log:\n{log}");
    });
}

/// An sftp replica that hangs (its server frozen with SIGSTOP: connections stay open, nothing
/// answers, so an upload blocks until the replica's I/O timeout of 10 s): the stop does not
/// wait for it past `shutdown-timeout`, and exits 69.
#[test]
fn stop_with_a_hung_sftp_replica_ends_at_shutdown_timeout() {
    let sshd = crate::sshd::Sshd::start();
    let dir = crate::sshd::TestDir::new("lifecycle-hung");
    let s = Scratch::without_db();
    s.create_db();
    let config = s.root.join("app.toml");
    fs::write(
        &config,
        format!(
            "db = \"{}\"\nshutdown-timeout = \"3s\"\n[[replica]]\nname = \"alpha\"\nurl = \"sftp://replicator@{}:{}/{}\"\nkey-path = \"{}\"\nknown-hosts = \"{}\"\n",
            s.db().display(),
            sshd.addr,
            sshd.port,
            dir.remote,
            sshd.client_key.display(),
            sshd.known_hosts.display()
        ),
    )
    .expect("write the config");
    let args = [OsString::from("--config"), config.into_os_string()];
    let mut d = start(&s, &args, None, None);
    wait_caught_up(&s, &mut d, 30 * SEC);
    sshd.stop();
    s.insert(20);
    // The shipper is inside an upload to the frozen server when the stop comes.
    std::thread::sleep(SEC);
    let (code, took) = stop(&mut d, &s, None);
    sshd.cont();
    eprintln!("stop with a frozen sftp server (shutdown-timeout 3s): exit {code} after {took:?}");
    assert_eq!(code, 69, "log:\n{}", s.log_text());
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(4500),
        "stop took {took:?}, shutdown-timeout is 3s; log:\n{}",
        s.log_text()
    );
    let log = s.log_text();
    assert!(
        log.contains("shutdown-timeout (3s) reached with 1 replica(s) still busy")
            && log
                .lines()
                .last()
                .is_some_and(|l| l.contains("alpha misses 1 commit(s)")),
        "log:\n{log}"
    );
}
