//! The operator's commands tell the truth (issue #11, day-one operations), run as the real
//! binary against replicas that `walship replicate` wrote:
//!
//! - `list --json` states the facts the text states (generations, snapshot and segment txids,
//!   times, sizes), and both give the replica's restorable range, which a restore confirms.
//! - A replica root that does not exist is an error (one line, exit 1), for file:// and
//!   sftp://; an existing empty directory is "(empty)".
//! - `restore --config` and `verify` refuse another database's replica, naming both.
//! - `--timestamp` takes RFC 3339 with any offset and restores the same commit as the equal UTC
//!   time; a time without a zone is refused; errors print times as RFC 3339, not milliseconds.

use crate::util::*;
use serde_json::Value;
use std::fs;
use std::path::Path;
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

fn start(db: &Path, url: &str, state: &Path) -> Daemon {
    Daemon::start(&[db.as_os_str(), url.as_ref()], state)
}

/// `n` commits of one row each.
fn commit_rows(db: &Path, n: u32, tag: &str) {
    let c = rusqlite::Connection::open(db).expect("open db");
    c.busy_timeout(5 * SEC).expect("busy timeout");
    for i in 0..n {
        c.execute(
            "INSERT INTO t(writer, seq, payload) VALUES (?1, ?2, randomblob(3000))",
            rusqlite::params![tag, i],
        )
        .expect("insert");
    }
}

fn json_of(out: &Out) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`{}` printed no JSON ({e}):\n{}", out.cmd, out.stdout))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// Two generations (a second daemon with a fresh state directory cannot prove continuity and
/// starts one), listed as text and as JSON: the same generations, files, txids and times, the
/// totals of the files on disk, and a summary whose ends a restore confirms.
#[test]
fn list_json_and_summary_match_the_replica() {
    let sb = Sandbox::new();
    sb.create_db();
    let url = sb.replica_url();
    let mut d = start(&sb.db(), &url, &sb.state());
    commit_rows(&sb.db(), 20, "a");
    let s1 = d.wait_caught_up(10 * SEC);
    d.stop();
    let mut d = start(&sb.db(), &url, &sb.path("state2"));
    commit_rows(&sb.db(), 10, "b");
    let s2 = d.wait_caught_up(10 * SEC);
    d.stop();
    assert_ne!(s1.generation, s2.generation, "expected two generations");

    let text = walship(["list", &url]).assert_ok().stdout;
    let out = walship(["list", "--json", &url]).assert_ok();
    let j = json_of(&out);
    let reps = j["replicas"].as_array().expect("replicas array");
    assert_eq!(reps.len(), 1, "{j}");
    let r = &reps[0];
    assert!(r["error"].is_null(), "{r}");
    assert_eq!(s(&r["url"]), url);
    let db = sb.db();
    assert!(
        s(&r["database"]).ends_with(&format!(":{}", db.display())),
        "database {} is not {}",
        r["database"],
        db.display()
    );
    assert!(
        text.contains(&format!("  database: {}\n", s(&r["database"]))),
        "{text}"
    );
    assert!(text.contains(&format!("owner: instance {} ", s(&r["owner"]["instance"]))));

    // The same generations, in the same order, with the same files.
    let gens = r["generations"].as_array().expect("generations");
    let names: Vec<&str> = gens.iter().map(|g| s(&g["name"])).collect();
    assert_eq!(names, [s1.generation.as_str(), s2.generation.as_str()]);
    let text_gens: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("  generation "))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(text_gens, names, "{text}");
    let (mut files, mut bytes, mut snaps) = (0u64, 0u64, Vec::new());
    for g in gens {
        let name = s(&g["name"]);
        assert_eq!(s(&g["started"]), rfc3339_ms(u(&g["started_ms"])));
        for sn in g["snapshots"].as_array().expect("snapshots") {
            let (txid, ms) = (u(&sn["txid"]), u(&sn["time_ms"]));
            assert_eq!(s(&sn["time"]), rfc3339_ms(ms));
            assert!(
                text.contains(&format!("snapshot  {name}/{txid:<10}  {}", s(&sn["time"]))),
                "snapshot {name}/{txid} not in the text:\n{text}"
            );
            let on_disk = sb
                .replica()
                .join("generations")
                .join(name)
                .join(s(&sn["name"]));
            assert_eq!(
                fs::metadata(&on_disk).expect("snapshot file").len(),
                u(&sn["size"])
            );
            snaps.push(ms);
        }
        let mut prev_first = 0;
        for sg in g["segments"].as_array().expect("segments") {
            let (first, last) = (u(&sg["first_txid"]), u(&sg["last_txid"]));
            assert_eq!(s(&sg["first_time"]), rfc3339_ms(u(&sg["first_ms"])));
            assert_eq!(s(&sg["last_time"]), rfc3339_ms(u(&sg["last_ms"])));
            let line = format!(
                "segment   L{} txid {first}..{last}  {} .. {}",
                u(&sg["level"]),
                s(&sg["first_time"]),
                s(&sg["last_time"])
            );
            assert!(text.contains(&line), "{line:?} not in the text:\n{text}");
            let on_disk = sb
                .replica()
                .join("generations")
                .join(name)
                .join(s(&sg["name"]));
            assert_eq!(
                fs::metadata(&on_disk).expect("segment file").len(),
                u(&sg["size"])
            );
            assert!(
                first >= prev_first && last >= first,
                "segments in txid order: {g}"
            );
            prev_first = first;
        }
        files += u(&g["files"]);
        bytes += u(&g["bytes"]);
    }
    // Totals: every file under generations/ on disk, counted once.
    let disk: Vec<_> = walk(&sb.replica().join("generations"));
    let disk_bytes: u64 = disk
        .iter()
        .map(|p| {
            fs::metadata(sb.replica().join("generations").join(p))
                .expect("stat")
                .len()
        })
        .sum();
    assert_eq!((files, bytes), (disk.len() as u64, disk_bytes));

    // The summary: from the oldest snapshot to the last commit replicated.
    let rs = &r["restorable"];
    assert_eq!(u(&rs["generations"]), 2);
    assert_eq!((u(&rs["files"]), u(&rs["bytes"])), (files, bytes));
    assert_eq!(
        u(&rs["earliest_ms"]),
        *snaps.iter().min().expect("a snapshot")
    );
    assert_eq!(s(&rs["latest_position"]), s2.position);
    assert_eq!(s(&rs["earliest"]), rfc3339_ms(u(&rs["earliest_ms"])));
    assert_eq!(s(&rs["latest"]), rfc3339_ms(u(&rs["latest_ms"])));
    let summary = format!(
        "  restorable from {} to {} (2 generations, {files} files, ",
        s(&rs["earliest"]),
        s(&rs["latest"])
    );
    let line = text
        .lines()
        .find(|l| l.starts_with(&summary))
        .unwrap_or_else(|| panic!("no summary line {summary:?} in:\n{text}"));
    assert!(
        line.ends_with(&format!("), latest position {}", s2.position)),
        "{line}"
    );

    // Its ends are what a restore reaches: the latest time gives the latest position, the
    // earliest time the first generation's snapshot, a millisecond earlier nothing.
    let o = restore(
        &sb.path("late.db"),
        &url,
        &["--timestamp", s(&rs["latest"])],
    )
    .assert_ok();
    assert!(
        o.stdout.contains(&format!("position {} ", s2.position)),
        "{}",
        o.stdout
    );
    let o = restore(
        &sb.path("early.db"),
        &url,
        &["--timestamp", s(&rs["earliest"])],
    )
    .assert_ok();
    assert!(
        o.stdout.contains(&format!("position {}/", s1.generation)),
        "{}",
        o.stdout
    );
    let before = rfc3339_ms(u(&rs["earliest_ms"]) - 1);
    let o = restore(&sb.path("none.db"), &url, &["--timestamp", &before]).fails();
    let e = o.one_error_line();
    assert!(
        e.contains(&format!("nothing to restore at or before {before}"))
            && e.contains(&format!("the oldest snapshot is at {}", s(&rs["earliest"]))),
        "the error should give both times in RFC 3339: {e}"
    );
    assert!(!e.contains(&u(&rs["earliest_ms"]).to_string()), "{e}");
}

/// A file:// root that does not exist is an error with one line and exit 1, in text and
/// JSON, and for restore; the same directory, once it exists and is empty, is "(empty)".
#[test]
fn list_of_a_missing_root_is_an_error_and_an_empty_one_is_empty() {
    let sb = Sandbox::new();
    let missing = sb.path("no/such/replica");
    let url = format!("file://{}", missing.display());
    let o = walship(["list", &url]).fails();
    assert_eq!(o.code(), 1);
    let e = o.one_error_line();
    assert!(e.contains(&format!("{url} does not exist")), "{e}");
    assert!(o.stdout.is_empty(), "nothing listed: {}", o.stdout);

    let o = walship(["list", "--json", &url]).fails();
    assert_eq!(o.code(), 1);
    assert!(o.one_error_line().contains("does not exist"));
    let j = json_of(&o);
    assert!(
        s(&j["replicas"][0]["error"]).contains(&format!("{url} does not exist")),
        "{j}"
    );

    let o = restore(&sb.path("out.db"), &url, &[]).fails();
    assert_eq!(o.code(), 1);
    assert!(o
        .one_error_line()
        .contains(&format!("{url} does not exist")));
    let o = restore(&sb.path("out.db"), &url, &["--if-replica-exists"]).assert_ok();
    assert!(o.stdout.contains("nothing to restore"), "{}", o.stdout);

    fs::create_dir_all(&missing).expect("mkdir");
    let o = walship(["list", &url]).assert_ok();
    assert!(o.stdout.contains("  (empty)"), "{}", o.stdout);
    let j = json_of(&walship(["list", "--json", &url]).assert_ok());
    let r = &j["replicas"][0];
    assert!(r["error"].is_null() && r["restorable"].is_null(), "{r}");
    assert_eq!(r["generations"].as_array().map(Vec::len), Some(0), "{r}");
}

/// The same on sftp against a real OpenSSH server: the root's absence is told by a stat.
#[test]
fn sftp_list_of_a_missing_root_is_an_error() {
    let sshd = crate::sshd::Sshd::start();
    let dir = crate::sshd::TestDir::new("cli-truths-missing");
    let url = sshd.url(&dir.remote).to_string();
    let flags = |json: bool| {
        let mut a = vec!["list".to_owned(), url.clone()];
        if json {
            a.push("--json".into());
        }
        a.push("--key-path".into());
        a.push(sshd.client_key.display().to_string());
        a.push("--known-hosts".into());
        a.push(sshd.known_hosts.display().to_string());
        a
    };
    let o = walship(flags(false)).fails();
    assert_eq!(o.code(), 1);
    let e = o.one_error_line();
    assert!(
        e.contains("does not exist") && e.contains(&dir.remote),
        "{e}"
    );
    fs::create_dir_all(&dir.local).expect("mkdir");
    let o = walship(flags(false)).assert_ok();
    assert!(o.stdout.contains("  (empty)"), "{}", o.stdout);
    let j = json_of(&walship(flags(true)).assert_ok());
    assert!(j["replicas"][0]["error"].is_null(), "{j}");
}

fn config(sb: &Sandbox, name: &str, db: &Path, url: &str) -> String {
    let p = sb.path(name);
    fs::write(
        &p,
        format!(
            "db = \"{}\"\nstate-dir = \"{}\"\n[[replica]]\nurl = \"{url}\"\n",
            db.display(),
            sb.path(&format!("{name}.state")).display()
        ),
    )
    .expect("write config");
    p.display().to_string()
}

/// A config whose db is another database than the replica's: restore refuses it (naming both)
/// unless --allow-other-db; verify says whose replica it is instead of comparing pages. The
/// database's own config, also through a symlinked directory, restores and verifies; a damaged
/// marker is reported as such (and --allow-other-db restores all the same).
#[test]
fn restore_and_verify_refuse_another_databases_replica() {
    let sb = Sandbox::new();
    sb.create_db();
    let other = sb.path("data/other.db");
    create_table(&other);
    sqlite3(&other, "PRAGMA journal_mode=WAL;");
    let url = sb.replica_url();
    let mut d = start(&sb.db(), &url, &sb.state());
    commit_rows(&sb.db(), 5, "a");
    d.wait_caught_up(10 * SEC);
    d.stop();
    let db = sb.db();

    let cfg_other = config(&sb, "other.toml", &other, &url);
    let out = sb.path("out.db");
    let o = walship([
        "restore",
        "--config",
        &cfg_other,
        "-o",
        &out.display().to_string(),
    ])
    .fails();
    assert_eq!(o.code(), 1);
    let e = o.one_error_line();
    assert!(
        e.contains(&format!("{url} holds the replica of database "))
            && e.contains(&format!(":{}, not of {}", db.display(), other.display()))
            && e.contains("--allow-other-db"),
        "{e}"
    );
    assert!(!out.exists(), "a refused restore wrote {}", out.display());
    walship([
        "restore",
        "--config",
        &cfg_other,
        "-o",
        &out.display().to_string(),
        "--allow-other-db",
    ])
    .assert_ok();
    assert_same_db(&db, &out);

    // verify, ad hoc and with the config: whose replica it is, not a page count.
    for o in [
        walship(["verify".as_ref(), other.as_os_str(), url.as_ref()]),
        walship(["verify", "--config", &cfg_other]),
    ] {
        let o = o.fails();
        assert_eq!(o.code(), 1);
        let e = o.one_error_line();
        assert!(
            e.contains(&format!("{url} holds the replica of database "))
                && e.contains(&format!("not of {}", other.display()))
                && !e.contains("differ"),
            "{e}"
        );
    }
    // With --allow-other-db, verify compares: the other database differs page for page.
    let o = walship([
        "verify".as_ref(),
        other.as_os_str(),
        url.as_ref(),
        "--allow-other-db".as_ref(),
    ])
    .fails();
    assert!(o.one_error_line().contains("differ"), "{}", o.stderr);

    // Its own database: by its path, and through a symlink to its directory.
    walship(["verify".as_ref(), db.as_os_str(), url.as_ref()]).assert_ok();
    std::os::unix::fs::symlink(sb.path("data"), sb.path("link")).expect("symlink");
    for (i, p) in [db.clone(), sb.path("link/app.db")].iter().enumerate() {
        let cfg = config(&sb, &format!("own{i}.toml"), p, &url);
        let out = sb.path(&format!("own{i}.db"));
        walship([
            "restore",
            "--config",
            &cfg,
            "-o",
            &out.display().to_string(),
        ])
        .assert_ok();
        assert_same_db(&db, &out);
        walship(["verify", "--config", &cfg]).assert_ok();
    }

    // A marker that cannot be read cannot vouch for the replica: said, and overridable.
    fs::write(sb.replica().join("walship-replica.toml"), "garbage\n").expect("damage marker");
    let cfg = config(&sb, "own.toml", &db, &url);
    let out = sb.path("damaged-marker.db");
    let o = walship([
        "restore",
        "--config",
        &cfg,
        "-o",
        &out.display().to_string(),
    ])
    .fails();
    let e = o.one_error_line();
    assert!(
        e.contains("cannot tell which database the replica belongs to")
            && e.contains("walship-replica.toml: invalid marker"),
        "{e}"
    );
    walship([
        "restore",
        "--config",
        &cfg,
        "-o",
        &out.display().to_string(),
        "--allow-other-db",
    ])
    .assert_ok();
    assert_same_db(&db, &out);
}

/// RFC 3339 with an offset (+01:00, -05:30, -00:00) or extra fractional digits restores the
/// same commit as the equal UTC time; a time without a zone is refused, saying what to add.
#[test]
fn timestamps_with_offsets_restore_the_same_point() {
    let sb = Sandbox::new();
    sb.create_db();
    let url = sb.replica_url();
    let mut d = start(&sb.db(), &url, &sb.state());
    commit_rows(&sb.db(), 7, "before");
    d.wait_caught_up(10 * SEC);
    std::thread::sleep(Duration::from_millis(30));
    let mid = now_ms();
    std::thread::sleep(Duration::from_millis(30));
    commit_rows(&sb.db(), 5, "after");
    d.wait_caught_up(10 * SEC);
    d.stop();

    let utc = rfc3339_ms(mid);
    let shifted = |by_min: i64, offset: &str| {
        let t = rfc3339_ms((mid as i64 + by_min * 60_000) as u64);
        format!("{}{offset}", t.trim_end_matches('Z'))
    };
    let base = sb.path("utc.db");
    restore(&base, &url, &["--timestamp", &utc]).assert_ok();
    let tags: Vec<String> = rows(&base).into_iter().map(|(w, _)| w).collect();
    assert!(
        tags.len() == 7 && tags.iter().all(|w| w == "before"),
        "the UTC time should restore the 7 commits before it: {tags:?}"
    );
    let want = fs::read(&base).expect("read");
    let forms = [
        shifted(60, "+01:00"),
        shifted(-330, "-05:30"),
        shifted(0, "-00:00"),
        format!("{}999Z", utc.trim_end_matches('Z')),
    ];
    for (i, ts) in forms.iter().enumerate() {
        let out = sb.path(&format!("t{i}.db"));
        restore(&out, &url, &["--timestamp", ts]).assert_ok();
        assert!(
            fs::read(&out).expect("read") == want,
            "--timestamp {ts} restored another state than {utc}"
        );
    }

    let zoneless = utc.trim_end_matches('Z');
    let o = restore(&sb.path("zoneless.db"), &url, &["--timestamp", zoneless]).fails();
    // A bad argument value, not a runtime failure: 78 as every invalid --timestamp (64 should
    // usage errors get their own code).
    assert!(matches!(o.code(), 64 | 78), "exit {}", o.code());
    let e = o.one_error_line();
    assert!(
        e.contains("has no zone: add Z for UTC or an offset such as +01:00"),
        "{e}"
    );
    assert!(!sb.path("zoneless.db").exists());
    let help = walship(["restore", "--help"]).assert_ok().stdout;
    assert!(
        help.contains("without Z or an offset is refused"),
        "--help should say so:\n{help}"
    );
}
