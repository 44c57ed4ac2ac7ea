//! `walship status --follow`: a warm standby reports its lag and errors (issue: "the standby
//! reports its lag"), read from the follower's own state directory. The real daemon, real
//! writers, the real follower: following (exit 0, position, small lag, `--json` fields), the
//! replica made unavailable (exit 4 naming the error; 5 with a tight `--max-lag`), stopped
//! (exit 3); the default state directory that `restore --follow` and `status --follow DB`
//! agree on, apart from the daemon's. And following an encrypted file replica (`encrypt-to` on
//! the daemon, `--identity` on the follower) to a standby equal to the source.

use crate::e2e_follow::assert_same_pages;
use crate::util::*;
use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

/// `walship restore --follow --interval 100ms -o OUT EXTRA... URL`; waits for the initial
/// restore.
fn start_follower(sb: &Sandbox, out: &Path, url: &str, extra: &[OsString]) -> Daemon {
    let mut a: Vec<OsString> = vec![
        "restore".into(),
        "--follow".into(),
        "--interval".into(),
        "100ms".into(),
        "-o".into(),
        out.into(),
    ];
    a.extend(extra.iter().cloned());
    a.push(url.into());
    let mut d = Daemon::raw(a, &sb.path("follower-state"))
        .no_wait()
        .log(&sb.path("follower.log"))
        .start();
    poll("the follower's initial restore", 30 * SEC, || {
        assert!(d.alive(), "the follower exited early:\n{}", d.log_text());
        d.log_text().contains("; following (every").then_some(())
    });
    d
}

/// `walship status --follow --json ARGS`: the exit code and the object (whose `exit_code`
/// must agree).
fn json<S: AsRef<OsStr>>(args: &[S]) -> (i32, Value) {
    let mut a: Vec<OsString> = vec!["status".into(), "--follow".into(), "--json".into()];
    a.extend(args.iter().map(|s| s.as_ref().to_owned()));
    let out = walship(&a);
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

/// `walship status --follow ARGS` (text): the exit code and stdout.
fn human<S: AsRef<OsStr>>(args: &[S]) -> (i32, String) {
    let mut a: Vec<OsString> = vec!["status".into(), "--follow".into()];
    a.extend(args.iter().map(|s| s.as_ref().to_owned()));
    let out = walship(&a);
    (out.code(), out.stdout)
}

/// Inserts `n` rows, one commit each.
fn write_rows(db: &Path, n: u32) {
    let c = rusqlite::Connection::open(db).expect("open source");
    c.busy_timeout(10 * SEC).expect("busy timeout");
    for i in 0..n {
        c.execute(
            "INSERT INTO t(writer, seq, payload) VALUES ('fs', ?1, randomblob(300))",
            [i],
        )
        .expect("insert");
    }
}

/// Removes a directory when dropped (the default state directory is under /var/lib).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Following: exit 0 with the position the daemon captured and a small lag, as text and as
/// JSON with every field; `status --follow STANDBY` finds the state directory `restore
/// --follow` chose by default (/var/lib/walship-follow/<path>, not the daemon's). The replica
/// made unavailable (a file where its directory was): exit 4 naming the replica's path, exit
/// 5 with `--max-lag 1ms`; back: exit 0 again. Stopped by SIGTERM: exit 3, state stopped.
#[test]
fn follow_status_following_failing_stopped() {
    let sb = Sandbox::new();
    sb.create_db();
    write_rows(&sb.db(), 5);
    let mut d = Daemon::start(
        &[OsString::from(sb.db()), sb.replica_url().into()],
        &sb.state(),
    );
    d.wait_caught_up(15 * SEC);
    let standby = sb.path("standby.db");
    let leaf = standby
        .display()
        .to_string()
        .trim_start_matches('/')
        .replace('/', "-");
    let default_dir = Path::new("/var/lib/walship-follow").join(leaf);
    let _cleanup = RemoveOnDrop(default_dir.clone());
    let mut f = start_follower(&sb, &standby, &sb.replica_url(), &[]);
    write_rows(&sb.db(), 20);
    let captured = d.wait_caught_up(15 * SEC);
    let sb_arg = [standby.as_os_str()];

    // Following, caught up.
    let v = poll(
        "status --follow to show the daemon's position",
        15 * SEC,
        || {
            let (code, v) = json(&sb_arg);
            (code == 0 && v["txid"].as_u64() == Some(captured.txid)).then_some(v)
        },
    );
    assert_eq!(v["health"], "healthy", "{v}");
    assert_eq!(v["running"], true, "{v}");
    assert_eq!(v["state"], "following", "{v}");
    assert_eq!(v["generation"], captured.generation.as_str(), "{v}");
    assert_eq!(v["state_dir"], default_dir.display().to_string(), "{v}");
    assert_eq!(v["db"], standby.display().to_string(), "{v}");
    assert!(v["lag_ms"].as_u64().is_some_and(|l| l < 2000), "{v}");
    assert!(v["error"].is_null(), "{v}");
    for k in ["pid", "commit_ms", "listed_ms", "written_ms"] {
        assert!(v[k].as_u64().is_some(), "no {k} in {v}");
    }
    assert!(
        default_dir.join("status").is_file(),
        "the follower's status is not in {}",
        default_dir.display()
    );
    let (code, text) = human(&sb_arg);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("health:     healthy (exit 0)"), "{text}");
    assert!(
        text.contains(&format!("position:   {}", captured.position)),
        "{text}"
    );
    assert!(text.contains("lag:        "), "{text}");

    // The replica unavailable: a file where its directory was.
    let away = sb.path("replica.away");
    fs::rename(sb.replica(), &away).expect("rename the replica away");
    fs::write(sb.replica(), b"not a directory").expect("file in its place");
    let v = poll("status --follow to say failing", 15 * SEC, || {
        let (code, v) = json(&sb_arg);
        (code == 4).then_some(v)
    });
    assert_eq!(v["health"], "failing", "{v}");
    let e = v["error"].as_str().unwrap_or_default();
    assert!(
        e.contains(&sb.replica().display().to_string()),
        "the error does not name the replica: {v}"
    );
    let (code, text) = human(&sb_arg);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("failing:    "), "{text}");
    let (code, v) = json(&[
        OsStr::new("--max-lag"),
        OsStr::new("1ms"),
        standby.as_os_str(),
    ]);
    assert_eq!(code, 5, "{v}");
    assert_eq!(v["health"], "lagging", "{v}");

    // Back.
    fs::remove_file(sb.replica()).expect("remove the file");
    fs::rename(&away, sb.replica()).expect("rename the replica back");
    poll("status --follow to be healthy again", 15 * SEC, || {
        (json(&sb_arg).0 == 0).then_some(())
    });

    // Stopped.
    f.sigterm();
    let st = f.wait_exit(30 * SEC).expect("the follower did not exit");
    assert!(st.success(), "{st}:\n{}", f.log_text());
    let (code, v) = json(&sb_arg);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["health"], "not-running", "{v}");
    assert_eq!(v["running"], false, "{v}");
    assert_eq!(v["state"], "stopped", "{v}");
    assert!(v["lag_ms"].is_null(), "{v}");
    let (code, text) = human(&sb_arg);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("not running"), "{text}");
    d.stop();
}

/// An age key pair: the identity file written in `dir`, and the public recipient.
fn keys(dir: &Path) -> (PathBuf, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let identity = dir.join("standby.agekey");
    fs::write(
        &identity,
        format!(
            "# public key: {}\n{}\n",
            id.to_public(),
            id.to_string().expose_secret()
        ),
    )
    .expect("write identity file");
    (identity, id.to_public().to_string())
}

/// Following an encrypted file replica (the daemon with `encrypt-to`, the follower with
/// `--identity`) while writers write: the standby ends equal to the source, and its status
/// shows the daemon's last position.
#[test]
fn follow_encrypted_file_replica() {
    let sb = Sandbox::new();
    sb.create_db();
    let (identity, recipient) = keys(sb.dir.path());
    let conf = sb.path("enc.toml");
    fs::write(
        &conf,
        format!(
            "db = \"{}\"\nstate-dir = \"{}\"\n[[replica]]\nurl = \"{}\"\nencrypt-to = [\"{recipient}\"]\n",
            sb.db().display(),
            sb.state().display(),
            sb.replica_url()
        ),
    )
    .expect("write config");
    write_rows(&sb.db(), 5);
    let mut d = Daemon::start_config(&sb, &conf);
    d.wait_caught_up(30 * SEC);
    let standby = sb.path("standby.db");
    let fstate = sb.path("fstate");
    let mut f = start_follower(
        &sb,
        &standby,
        &sb.replica_url(),
        &[
            "--identity".into(),
            identity.into(),
            "--state-dir".into(),
            fstate.clone().into(),
        ],
    );
    let o = WriterOpts {
        commits: 150,
        rate: 100.0,
        big_every: 10,
    };
    let mut ws = spawn_writers(&sb.db(), "encf", 2, o, 11);
    wait_all(&mut ws);
    let captured = d.wait_caught_up(60 * SEC);
    let sd = [OsStr::new("--state-dir"), fstate.as_os_str()];
    poll(
        "the standby to reach the daemon's position",
        30 * SEC,
        || {
            assert!(f.alive(), "the follower exited:\n{}", f.log_text());
            let (code, v) = json(&sd);
            (code == 0 && v["txid"].as_u64() == Some(captured.txid)).then_some(())
        },
    );
    f.sigterm();
    let st = f.wait_exit(30 * SEC).expect("the follower did not exit");
    assert!(st.success(), "{st}:\n{}", f.log_text());
    d.stop();
    let replica_file = walk(&sb.replica().join("generations"))
        .into_iter()
        .next()
        .expect("a replica file");
    let bytes = fs::read(sb.replica().join("generations").join(replica_file)).expect("read");
    assert!(
        bytes.starts_with(b"age-encryption.org/v1\n"),
        "the replica is not encrypted"
    );
    assert_same_pages(&sb.db(), &standby);
}

/// An instance NAME (a config in `$WALSHIP_CONFIG_DIR` whose `db` is the standby): `restore
/// --follow --config NAME` reports in /var/lib/walship-follow/NAME, never in the daemon's
/// /var/lib/walship/NAME, and `status --follow` finds it by NAME, by `--config FILE` and by
/// the standby's path.
#[test]
fn follow_status_finds_an_instance_by_name_config_or_db() {
    let sb = Sandbox::new();
    sb.create_db();
    write_rows(&sb.db(), 5);
    let mut d = Daemon::start(
        &[OsString::from(sb.db()), sb.replica_url().into()],
        &sb.state(),
    );
    let captured = d.wait_caught_up(15 * SEC);
    let etc = sb.path("etc");
    fs::create_dir_all(&etc).expect("mkdir etc");
    let name = format!("fstat{}", std::process::id());
    let standby = sb.path("standby.db");
    let conf = etc.join(format!("{name}.toml"));
    fs::write(
        &conf,
        format!(
            "db = \"{}\"\n[[replica]]\nurl = \"{}\"\n",
            standby.display(),
            sb.replica_url()
        ),
    )
    .expect("write config");
    let dir = Path::new("/var/lib/walship-follow").join(&name);
    let _cleanup = RemoveOnDrop(dir.clone());
    let a: Vec<OsString> = vec![
        "restore".into(),
        "--follow".into(),
        "--interval".into(),
        "100ms".into(),
        "--allow-other-db".into(),
        "--config".into(),
        name.clone().into(),
    ];
    let mut f = Daemon::raw(a, &sb.path("follower-state"))
        .no_wait()
        .env("WALSHIP_CONFIG_DIR", &etc)
        .env_remove("STATE_DIRECTORY")
        .log(&sb.path("follower.log"))
        .start();
    poll("the follower's initial restore", 30 * SEC, || {
        assert!(f.alive(), "the follower exited early:\n{}", f.log_text());
        f.log_text().contains("; following (every").then_some(())
    });
    let env: &[(&str, &OsStr)] = &[("WALSHIP_CONFIG_DIR", etc.as_os_str())];
    for by in [
        OsString::from(&name),
        OsString::from(standby.clone()),
        OsString::from(format!("--config={}", conf.display())),
    ] {
        let a: Vec<OsString> = vec!["status".into(), "--follow".into(), "--json".into(), by];
        let v = poll("status --follow to be healthy", 15 * SEC, || {
            let out = walship_env(&a, env);
            let v: Value = serde_json::from_str(&out.stdout)
                .unwrap_or_else(|e| panic!("`{}`: {e}:\n{}\n{}", out.cmd, out.stdout, out.stderr));
            (out.code() == 0).then_some(v)
        });
        assert_eq!(v["state_dir"], dir.display().to_string(), "{a:?}: {v}");
        assert_eq!(v["db"], standby.display().to_string(), "{a:?}: {v}");
        assert_eq!(v["txid"].as_u64(), Some(captured.txid), "{a:?}: {v}");
    }
    assert!(dir.join("status").is_file() && dir.join("lock").is_file());
    assert!(
        !Path::new("/var/lib/walship").join(&name).exists(),
        "the follower wrote into the daemon's state directory"
    );
    f.sigterm();
    let st = f.wait_exit(30 * SEC).expect("the follower did not exit");
    assert!(st.success(), "{st}:\n{}", f.log_text());
    let out = walship_env(&["status", "--follow", &name], env);
    assert_eq!(out.code(), 3, "{}", out.stdout);
    d.stop();
}
