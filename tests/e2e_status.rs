//! `walship status` as a monitor uses it (issue #11): the real daemon, real writers, and the
//! exit code, human output and `--json` object in each state: healthy (0), not running (3),
//! a replica failing (4), lag above `--max-lag` (5), starting (6); and `status NAME` finding
//! the state where the unit keeps it, /var/lib/walship/NAME.

use crate::util::*;
use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

/// A config at `<sandbox>/walship.toml` with `state-dir` and one file replica per
/// `(name, path)`.
fn config(sb: &Sandbox, replicas: &[(&str, PathBuf)]) -> PathBuf {
    let mut text = format!(
        "db = {:?}\nstate-dir = {:?}\n",
        sb.db().display().to_string(),
        sb.state().display().to_string()
    );
    for (name, path) in replicas {
        text += &format!(
            "[[replica]]\nname = {name:?}\nurl = {:?}\n",
            format!("file://{}", path.display())
        );
    }
    let p = sb.path("walship.toml");
    fs::write(&p, text).expect("write config");
    p
}

/// `walship status ARGS --json`: the exit code and the parsed object (asserting one object on
/// stdout and a code that agrees with its `exit_code`).
fn json<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &OsStr)]) -> (i32, Value) {
    let mut a: Vec<OsString> = vec!["status".into(), "--json".into()];
    a.extend(args.iter().map(|s| s.as_ref().to_owned()));
    let out = walship_env(&a, env);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`{}`: stdout is not one JSON object ({e}):\n{}\nstderr: {}",
            out.cmd, out.stdout, out.stderr
        )
    });
    assert_eq!(
        v["exit_code"].as_i64(),
        Some(i64::from(out.code())),
        "`{}`: {v}",
        out.cmd
    );
    (out.code(), v)
}

/// `walship status ARGS` (text): the exit code and stdout.
fn human<S: AsRef<OsStr>>(args: &[S]) -> (i32, String) {
    let mut a: Vec<OsString> = vec!["status".into()];
    a.extend(args.iter().map(|s| s.as_ref().to_owned()));
    let out = walship(&a);
    (out.code(), out.stdout)
}

fn replica<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["replicas"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no replica {name:?} in {v}"))
}

fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"))
}

/// Healthy while running (exit 0, lag 0 as a duration, when each replica last received);
/// after a clean stop: exit 3, the last report with its time and no lag claimed; commits made
/// while walship is down are reported as on no replica.
#[test]
fn e2e_status_healthy_then_not_running() {
    let sb = Sandbox::new();
    sb.create_db();
    let conf = config(&sb, &[("a", sb.replica())]);
    let mut d = Daemon::start_config(&sb, &conf);
    let t0 = now_ms();
    let mut w = Writer::spawn(
        &sb.db(),
        "w",
        WriterOpts {
            commits: 40,
            rate: 0.0,
            big_every: 0,
        },
        1,
    );
    w.wait();
    let s = d.wait_caught_up(30 * SEC);

    let c: &[&OsStr] = &["--config".as_ref(), conf.as_os_str()];
    let (code, v) = json(c, &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["health"], "healthy");
    assert_eq!(v["daemon_running"], true);
    assert_eq!(v["lag_ms"], 0);
    assert_eq!(v["replicas_ok"], 1);
    assert_eq!(v["replicas_total"], 1);
    assert_eq!(v["failing"].as_array().map(Vec::len), Some(0));
    assert_eq!(v["state_dir"], sb.state().display().to_string());
    assert_eq!(
        format!("{}/{}", v["generation"].as_str().unwrap_or(""), v["txid"]),
        s.position
    );
    let a = replica(&v, "a");
    assert_eq!(a["caught_up"], true);
    assert_eq!(a["txid"], v["txid"]);
    let received = a["received_ms"].as_u64().expect("received_ms recorded");
    assert!(
        (t0..=now_ms()).contains(&received),
        "received_ms {received} not in this test's time"
    );
    let (code, text) = human(&[
        "--config".as_ref(),
        conf.as_os_str(),
        "--max-lag".as_ref(),
        "1m".as_ref(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(line(&text, "health:"), "health:     healthy (exit 0)");
    assert_eq!(line(&text, "lag:"), "lag:        0s (max 1m)");
    assert!(
        line(&text, "replica a:").contains("; last received "),
        "{text}"
    );

    d.stop();
    let (code, v) = json(c, &[]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["health"], "not-running");
    assert_eq!(v["daemon_running"], false);
    assert_eq!(
        v["lag_ms"],
        Value::Null,
        "no lag claimed for a stopped daemon"
    );
    assert_eq!(v["replicas_ok"], Value::Null);
    assert_eq!(v["unshipped"], false);
    assert!(v["last_status_ms"].as_u64().is_some(), "{v}");
    assert_eq!(replica(&v, "a")["caught_up"], true);
    let (code, text) = human(c);
    assert_eq!(code, 3, "{text}");
    assert_eq!(line(&text, "daemon:"), "daemon:     not running");
    assert!(line(&text, "last seen:").contains("not current"), "{text}");
    assert!(
        !text.contains("lag"),
        "a stopped daemon's lag is unknown:\n{text}"
    );
    assert!(!text.contains("uncaptured"), "{text}");

    // An application writes while walship is down, keeping its connection (and WAL) open.
    let app = rusqlite::Connection::open(sb.db()).expect("open db");
    app.execute_batch("INSERT INTO t(writer, seq, payload) VALUES ('late', 1, 'x')")
        .expect("write while walship is down");
    let (code, v) = json(c, &[]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["uncaptured_commits"], true, "{v}");
    let (_, text) = human(c);
    assert!(
        line(&text, "uncaptured:").contains("no replica holds them"),
        "{text}"
    );
    drop(app);
}

/// A replica whose path lies under a regular file (refused even to root): exit 4 with the
/// error named while the lag is within `--max-lag`, exit 5 once writes continue past it, and
/// after the daemon dies exit 3 with the commits that replica lacks reported as unshipped.
#[test]
fn e2e_status_failing_replica_then_lag_above_max() {
    let sb = Sandbox::new();
    sb.create_db();
    fs::write(sb.path("blocker"), "a regular file").expect("write blocker");
    let conf = config(
        &sb,
        &[("good", sb.replica()), ("bad", sb.path("blocker/replica"))],
    );
    let mut d = Daemon::start_config(&sb, &conf);
    let mut w = Writer::spawn(
        &sb.db(),
        "w",
        WriterOpts {
            commits: 0,
            rate: 20.0,
            big_every: 0,
        },
        2,
    );
    let c = |extra: &[&str]| -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--config".into(), conf.clone().into()];
        a.extend(extra.iter().map(OsString::from));
        a
    };
    // The bad replica may fail before the good one received its first upload: wait for both.
    let (_, v) = poll("status to say the replica fails", 30 * SEC, || {
        let (code, v) = json(&c(&["--max-lag", "1h"]), &[]);
        (code == 4 && replica(&v, "good")["received_ms"].is_u64()).then_some((code, v))
    });
    assert_eq!(v["health"], "failing");
    assert_eq!(v["daemon_running"], true);
    let failing: Vec<&str> = v["failing"]
        .as_array()
        .expect("failing")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        failing.iter().any(|f| f.starts_with("bad: ")),
        "{failing:?}"
    );
    assert!(
        !failing.iter().any(|f| f.starts_with("good: ")),
        "{failing:?}"
    );
    assert!(replica(&v, "bad")["error"].is_string(), "{v}");
    assert_eq!(replica(&v, "bad")["txid"], Value::Null, "{v}");
    assert!(replica(&v, "good")["received_ms"].is_u64(), "{v}");
    assert!(v["lag_ms"].as_u64().is_some(), "{v}");

    // Writes go on, the bad replica holds none of them: the lag passes 2 s.
    let (_, v) = poll("the lag to pass --max-lag 2s", 30 * SEC, || {
        let (code, v) = json(&c(&["--max-lag", "2s"]), &[]);
        (code == 5).then_some((code, v))
    });
    assert_eq!(v["health"], "lagging");
    assert!(v["lag_ms"].as_u64().is_some_and(|l| l > 2000), "{v}");
    assert_eq!(v["max_lag_ms"], 2000);
    let (code, text) = human(&c(&["--max-lag", "2s"]));
    assert_eq!(code, 5, "{text}");
    let lag = line(&text, "lag:");
    let shown = lag
        .trim_start_matches("lag:")
        .trim()
        .trim_end_matches(" (max 2s)");
    let shown = humantime::parse_duration(shown)
        .unwrap_or_else(|e| panic!("lag {shown:?} is not a duration: {e}"));
    assert!(shown > 2 * SEC, "{text}");
    assert!(
        line(&text, "failing:").starts_with("failing:    bad: "),
        "{text}"
    );
    // Without a threshold, the failing replica is what is wrong.
    assert_eq!(json(&c(&[]), &[]).0, 4);

    w.stop();
    d.kill9();
    let (code, v) = json(&c(&["--max-lag", "2s"]), &[]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["unshipped"], true, "{v}");
    assert_eq!(replica(&v, "bad")["caught_up"], false, "{v}");
    assert_eq!(v["failing"].as_array().map(Vec::len), Some(0), "{v}");
    let (code, text) = human(&c(&[]));
    assert_eq!(code, 3, "{text}");
    assert!(line(&text, "unshipped:").contains("bad"), "{text}");
    assert!(!text.contains("lag"), "{text}");
}

/// An application holding the database with `locking_mode=EXCLUSIVE` keeps the daemon
/// starting: exit 6, and what it waits for.
#[test]
fn e2e_status_starting() {
    let sb = Sandbox::new();
    sb.create_db();
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('PRAGMA locking_mode=EXCLUSIVE')\n\
             c.execute(\"INSERT INTO t(writer, seq, payload) VALUES ('holder', 1, 'x')\")\n\
             print('holding', flush=True)\n\
             sys.stdin.read()\n",
        ])
        .arg(sb.db())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let mut said = String::new();
    BufReader::new(holder.stdout.as_mut().expect("stdout"))
        .read_line(&mut said)
        .expect("read the holder");
    assert_eq!(said.trim(), "holding");
    let conf = config(&sb, &[("a", sb.replica())]);
    let mut d = Daemon::start_config(&sb, &conf);
    let c: &[&OsStr] = &["--config".as_ref(), conf.as_os_str()];
    let (code, v) = poll("status to say it is starting", 10 * SEC, || {
        let (code, v) = json(c, &[]);
        v["starting"].is_string().then_some((code, v))
    });
    assert_eq!(code, 6, "{v}");
    assert_eq!(v["health"], "starting");
    assert!(
        v["starting"].as_str().is_some_and(|s| s.contains("locked")),
        "{v}"
    );
    let (code, text) = human(c);
    assert_eq!(code, 6, "{text}");
    assert!(line(&text, "starting:").contains("locked"), "{text}");
    stop_child(&mut holder);
    d.wait_caught_up(30 * SEC);
    assert_eq!(json(c, &[]).0, 0);
}

fn stop_child(c: &mut Child) {
    drop(c.stdin.take());
    let _ = c.wait();
}

/// Removes an instance's state directory under /var/lib/walship when the test ends.
struct InstanceState(PathBuf);

impl Drop for InstanceState {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `walship status NAME`, `--config <dir>/NAME.toml` and the database's path all find the
/// state of a daemon started as instance NAME (`replicate --config NAME`, no `state-dir`, no
/// $STATE_DIRECTORY) in /var/lib/walship/NAME, where the unit keeps it.
#[test]
fn e2e_status_finds_an_instance_by_name_config_or_db() {
    let sb = Sandbox::new();
    sb.create_db();
    let name = format!(
        "e2e-status-{}-{}",
        std::process::id(),
        sb.dir
            .path()
            .file_name()
            .map(|n| n
                .to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), ""))
            .unwrap_or_default()
    );
    let state = Path::new("/var/lib/walship").join(&name);
    let _cleanup = InstanceState(state.clone());
    let etc = sb.path("etc");
    fs::create_dir_all(&etc).expect("mkdir etc");
    let conf = etc.join(format!("{name}.toml"));
    fs::write(
        &conf,
        format!(
            "db = {:?}\n[[replica]]\nurl = {:?}\n",
            sb.db().display().to_string(),
            sb.replica_url()
        ),
    )
    .expect("write config");
    let mut d = Daemon::raw(
        vec!["replicate".into(), "--config".into(), name.clone().into()],
        &state,
    )
    .env("WALSHIP_CONFIG_DIR", &etc)
    .env_remove("STATE_DIRECTORY")
    .log(&sb.path("daemon.log"))
    .start();
    Writer::filler(&sb.db(), 20, 3).wait();
    d.wait_caught_up(30 * SEC);

    let env: &[(&str, &OsStr)] = &[("WALSHIP_CONFIG_DIR", etc.as_os_str())];
    let db = sb.db();
    let forms: [&[&OsStr]; 3] = [
        &[name.as_ref()],
        &["--config".as_ref(), conf.as_os_str()],
        &[db.as_os_str()],
    ];
    for args in forms {
        let (code, v) = json(args, env);
        assert_eq!(code, 0, "status {args:?}: {v}");
        assert_eq!(v["health"], "healthy", "{v}");
        assert_eq!(v["state_dir"], state.display().to_string(), "{args:?}");
        assert_eq!(v["db"], db.display().to_string(), "{args:?}");
        assert_eq!(replica(&v, "file")["caught_up"], true, "{v}");
    }
    let mut a: Vec<&OsStr> = vec!["status".as_ref(), name.as_ref()];
    let out = walship_env(&a, env);
    assert_eq!(out.code(), 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        line(&out.stdout, "state:"),
        format!("state:      {}", state.display())
    );

    d.stop();
    a.push("--json".as_ref());
    let out = walship_env(&a, env);
    assert_eq!(out.code(), 3, "{}{}", out.stdout, out.stderr);
}
