//! One writer per database, one writer per replica (issue #10, defect 2), against the real
//! binary with real writers:
//! - a second `walship replicate` of a database that a daemon already replicates is refused at
//!   once, whatever its state directory or config, naming the first daemon's pid, and the first
//!   goes on replicating;
//! - when the database lock cannot see the first daemon (two databases at the same path in two
//!   mount namespaces, hence the same replica identity `host:/path`), the replica's owner claim
//!   makes the later daemon take the replica over and the earlier one stop writing to it, so a
//!   latest restore gives the database of the newest owner, never a stale generation.

use crate::util::*;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

    // The first daemon replicates on: new commits reach the replica, nothing fails.
    let before = a.status().expect("status").txid;
    a.wait_status("new commits replicated", 10 * SEC, |s| {
        s.caught_up() && s.txid > before + 10
    });
    w.stop();
    let done = w.committed();
    a.wait_caught_up(10 * SEC);
    let out = sb.path("restored.db");
    restore(&out, &sb.replica_url(), &[]).ok();
    assert_same_db(&db, &out);
    assert_contains_all(&rows(&out), &done, "latest restore");
    assert!(
        !a.log_text().contains(" ERROR "),
        "the first daemon logged errors:\n{}",
        a.log_text()
    );
    a.stop();
}
