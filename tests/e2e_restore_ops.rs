//! Restores by operators against live replicas and odd output paths (issue #10).
//!
//! - A replica that a running walship keeps compacting and pruning lists, restores and
//!   verifies every time: listings tolerate entries and directories vanishing, and restore
//!   follows files that compaction merged away.
//! - `restore -o` only ever replaces a regular file: a device, symlink, directory, FIFO or
//!   socket is refused before anything is written, and no failure leaves a temporary file.

use crate::util::*;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use walship::backend::Backend;

/// Lists `dir` of `t` again and again for `dur` while another thread creates and removes
/// files (and a subdirectory with files) in `local`, the same directory on this machine, as
/// fast as it can, for at least `dur` (up to 8 times as long on a busy machine, until there
/// were 200 listings and 5000 removals). Every listing must succeed and hold the files that
/// exist throughout. Returns (listings, files removed meanwhile).
fn list_under_churn(t: &dyn Backend, dir: &str, local: &Path, dur: Duration) -> (usize, usize) {
    fs::create_dir_all(local).expect("mkdir");
    for i in 0..200 {
        fs::write(local.join(format!("keep-{i:03}")), b"k").expect("write keep");
    }
    let stop = AtomicBool::new(false);
    let removed = AtomicUsize::new(0);
    let mut listings = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            let sub = local.join("sub");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A burst of files, then remove them: entries vanish while being listed.
                for j in 0..64 {
                    fs::write(local.join(format!("churn-{i}-{j}")), b"c").expect("create");
                }
                for j in 0..64 {
                    fs::remove_file(local.join(format!("churn-{i}-{j}"))).expect("remove");
                    removed.fetch_add(1, Ordering::Relaxed);
                }
                // A whole directory comes and goes, as a generation under retention does.
                fs::create_dir(&sub).expect("mkdir sub");
                for j in 0..16 {
                    fs::write(sub.join(format!("f{j}")), b"s").expect("create in sub");
                }
                for j in 0..16 {
                    fs::remove_file(sub.join(format!("f{j}"))).expect("remove in sub");
                }
                fs::remove_dir(&sub).expect("rmdir sub");
                i += 1;
            }
        });
        // At least `dur`, and on a busy machine on until there was churn enough (bounded).
        let start = Instant::now();
        let enough = |listings: usize| {
            let t = start.elapsed();
            t >= dur * 8 || (t >= dur && listings >= 200 && removed.load(Ordering::Relaxed) >= 5000)
        };
        let sub = format!("{dir}/sub");
        let result = (|| {
            while !enough(listings) {
                let l = t
                    .list(dir)
                    .map_err(|e| format!("listing {dir} while files come and go: {e}"))?;
                let keep = l.iter().filter(|e| e.name.starts_with("keep-")).count();
                if keep != 200 {
                    return Err(format!(
                        "a listing lost files that never changed: {keep}/200"
                    ));
                }
                t.list(&sub)
                    .map_err(|e| format!("listing {sub} while it comes and goes: {e}"))?;
                listings += 1;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        if let Err(e) = result {
            panic!("{e} (after {listings} good listings)");
        }
    });
    (listings, removed.load(Ordering::Relaxed))
}

/// `list` of the file target while entries vanish between readdir and stat, and while a
/// directory is removed: never an error (it was `failed to list ...: No such file`).
#[test]
fn file_list_tolerates_vanishing_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = walship::backend::file::FileBackend::new(dir.path());
    let (n, removed) = list_under_churn(&t, "g", &dir.path().join("g"), Duration::from_secs(1));
    eprintln!(
        "file_list_tolerates_vanishing_entries: {n} listings, {removed} files removed meanwhile"
    );
    assert!(
        n > 50 && removed > 1000,
        "too little churn to mean anything"
    );
}

/// The same for the sftp target against a real OpenSSH server. Its sftp-server stats each
/// entry itself and leaves out one that vanished, so this pins an invariant the target keeps
/// by its server (it held before issue #10 too), should listing ever stat on its own.
#[test]
fn sftp_list_tolerates_vanishing_entries() {
    let sshd = crate::sshd::Sshd::start();
    let dir = crate::sshd::TestDir::new("churn");
    let t = sshd.target(&dir.remote);
    let (n, removed) = list_under_churn(&t, "g", &dir.local.join("g"), Duration::from_secs(1));
    eprintln!(
        "sftp_list_tolerates_vanishing_entries: {n} listings, {removed} files removed meanwhile"
    );
    assert!(
        n > 10 && removed > 1000,
        "too little churn to mean anything"
    );
}

/// The rows of writer `w` in a restored database: how many, asserting they are 0..n (a commit
/// boundary) and that the database passes `PRAGMA integrity_check`.
fn restored_rows(db: &Path) -> usize {
    assert_integrity(db);
    let rows = rows(db);
    for (i, (w, seq)) in rows.iter().enumerate() {
        assert!(
            w == "w" && *seq == i as i64,
            "{}: row {i} is ({w}, {seq}): not a commit boundary of the writer",
            db.display()
        );
    }
    rows.len()
}

/// A real walship daemon replicates a database that a writer changes continuously, to a
/// file:// replica compacted as often as the settings allow (fanout 2, 64 KiB segments,
/// retention 1s); every other cycle walship is restarted after the application reset its WAL,
/// so new generations begin and retention deletes old ones. Meanwhile `walship restore` runs
/// in a loop, and `walship verify` whenever the writer pauses and the replica has caught up
/// (compaction runs exactly then, once the database is quiet). Every restore and verify must succeed; each restored database passes
/// integrity_check, holds the writer's rows 0..n (a commit boundary), never fewer than the
/// restore before it, never more than were committed; no temporary file is left.
#[test]
fn e2e_restore_and_verify_during_compaction() {
    let t0 = Instant::now();
    let sb = Sandbox::new();
    sb.create_db();
    let cfg = sb.path("live.toml");
    fs::write(
        &cfg,
        format!(
            "db = \"{}\"\nstate-dir = \"{}\"\nsnapshot-interval = \"1m\"\nretention = \"1s\"\n\
             segment-size = \"64KiB\"\ncompaction-fanout = 2\n[[replica]]\nurl = \"{}\"\n",
            sb.db().display(),
            sb.state().display(),
            sb.replica_url()
        ),
    )
    .expect("write config");
    let mut d = Daemon::start_raw(
        vec!["replicate".into(), "--config".into(), cfg.clone().into()],
        &sb.state(),
    );
    // The first snapshot is on the replica before anyone restores.
    d.wait_caught_up(Duration::from_secs(20));

    let committed = AtomicUsize::new(0);
    let pause = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let restores = AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    // Runs that followed a merged segment / planned again from a new listing (their logs).
    let followed = AtomicUsize::new(0);
    let replanned = AtomicUsize::new(0);
    let note = |o: &Out| {
        if o.stderr.contains("going on from txid") {
            followed.fetch_add(1, Ordering::SeqCst);
        }
        if o.stderr.contains("planning again") {
            replanned.fetch_add(1, Ordering::SeqCst);
        }
    };
    let mut verifies = 0;
    let mut restarts = 0;
    let outdir = sb.path("restored");
    fs::create_dir(&outdir).expect("mkdir restored");
    let run_for = Duration::from_secs(30);

    std::thread::scope(|s| {
        // The application: one row per commit, flat out but for short sleeps, with pauses.
        let writer = s.spawn(|| {
            let c = rusqlite::Connection::open(sb.db()).expect("open db");
            c.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                if pause.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                c.execute_batch(&format!(
                    "BEGIN IMMEDIATE; INSERT INTO t(writer, seq, payload) VALUES ('w', {n}, randomblob(120)); COMMIT;"
                ))
                .unwrap_or_else(|e| panic!("the application's commit {n} failed: {e}"));
                n += 1;
                committed.store(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        // An operator restoring the latest state over and over.
        let restorer = s.spawn(|| {
            let mut prev = 0usize;
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let out = outdir.join(format!("r{i}.db"));
                let o = restore(&out, &sb.replica_url(), &["-v"]);
                note(&o);
                let after = committed.load(Ordering::SeqCst);
                restores.fetch_add(1, Ordering::SeqCst);
                if !o.status.success() {
                    failures.lock().expect("lock").push(format!(
                        "restore: {}",
                        o.stderr.trim().lines().last().unwrap_or("")
                    ));
                    continue;
                }
                let n = restored_rows(&out);
                assert!(
                    n >= prev,
                    "restore {i} holds {n} rows, the one before held {prev}: an older state"
                );
                // One commit may be replicated before the writer counts it.
                assert!(
                    n <= after + 1,
                    "restore {i} holds {n} rows, only {after} were committed"
                );
                prev = n;
                fs::remove_file(&out).expect("remove restored");
            }
            prev
        });
        let deadline = Instant::now() + run_for;
        let mut cycle = 0;
        while Instant::now() < deadline {
            cycle += 1;
            std::thread::sleep(Duration::from_millis(2500));
            if cycle % 2 == 0 {
                // walship is killed; the application commits and resets its WAL meanwhile,
                // so that walship starts a new generation, and from the second one on,
                // retention (1s) deletes the generation before the previous one, file by file.
                d.kill9();
                std::thread::sleep(Duration::from_millis(300));
                pause.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                let c = rusqlite::Connection::open(sb.db()).expect("open db");
                c.busy_timeout(Duration::from_secs(5))
                    .expect("busy timeout");
                c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .expect("checkpoint");
                drop(c);
                pause.store(false, Ordering::SeqCst);
                d.restart();
                restarts += 1;
            }
            // The application pauses; once the replica holds everything, verify until the
            // pause ends (compaction runs now: the database is quiet).
            pause.store(true, Ordering::SeqCst);
            d.wait_caught_up(Duration::from_secs(20));
            let until = Instant::now() + Duration::from_millis(2000);
            while Instant::now() < until {
                let o = walship([
                    "-v".as_ref(),
                    "verify".as_ref(),
                    "--config".as_ref(),
                    cfg.as_os_str(),
                ]);
                verifies += 1;
                note(&o);
                if !o.status.success() {
                    failures.lock().expect("lock").push(format!(
                        "verify: {}",
                        o.stderr.trim().lines().last().unwrap_or("")
                    ));
                }
            }
            pause.store(false, Ordering::SeqCst);
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().expect("writer thread");
        restorer.join().expect("restorer thread");
    });
    let total = committed.load(Ordering::SeqCst);
    d.wait_caught_up(Duration::from_secs(20));
    // Compaction goes on now that the database is quiet.
    let last = outdir.join("last.db");
    let o = restore(&last, &sb.replica_url(), &[]);
    if !o.status.success() {
        failures
            .lock()
            .expect("lock")
            .push(format!("final restore: {}", o.stderr.trim()));
    }
    let files = walk(&sb.replica());
    let compacted = files
        .iter()
        .filter(|p| !p.to_string_lossy().contains("seg-0-"))
        .count();
    let failures = failures.into_inner().expect("lock");
    let restores = restores.load(Ordering::SeqCst);
    eprintln!(
        "e2e_restore_and_verify_during_compaction: {restores} restores and {verifies} verifies during compaction, {} failed; {total} commits; {} files on the replica at the end, {compacted} of them not level 0; {} runs followed a merged segment, {} planned again; {:?}",
        failures.len(),
        files.len(),
        followed.load(Ordering::SeqCst),
        replanned.load(Ordering::SeqCst),
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {restores} restores and {verifies} verifies failed on a live replica, e.g.:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    assert!(
        restores >= 40 && verifies >= 20,
        "too few runs to mean anything"
    );
    assert_eq!(
        restored_rows(&last),
        total,
        "the final restore holds every commit"
    );
    assert_same_db(&sb.db(), &last);
    d.stop();
    let log = d.log_text();
    let generations = log.matches("retention removed generation").count();
    eprintln!("{restarts} restarts, {generations} generations removed by retention meanwhile");
    assert!(
        generations >= 1,
        "retention never removed a generation; log:\n{log}"
    );
    let temps: Vec<_> = [outdir, sb.db().with_file_name(""), sb.replica()]
        .iter()
        .flat_map(|d| walk(d))
        .filter(|p| p.to_string_lossy().contains(walship::durable::TEMP_PREFIX))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
}

/// Names in `dir` (sorted), to prove a refused restore wrote nothing there.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Temporary files (walship's prefix) anywhere under `dir`.
fn temps_under(dir: &Path) -> Vec<std::path::PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(walship::durable::TEMP_PREFIX))
        .collect()
}

/// `restore -o` only ever replaces a regular file. A character device (a /dev/null of our
/// own, made with mknod), a symlink, a directory, a FIFO and a socket at `-o` are refused at
/// once, with and without --force: one `walship: ...` line naming the path and what it is,
/// exit non-zero, the thing unchanged, nothing written in its directory. --if-db-not-exists
/// skips a database (a file or a symlink to one) and refuses the rest. A restore that fails
/// midway (a corrupt segment) leaves no temporary file and the forced-over file unchanged;
/// --force over a regular file still restores.
#[test]
fn e2e_restore_output_only_replaces_regular_files() {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    let sb = Sandbox::new();
    sb.create_db();
    let mut d = Daemon::start(
        &[sb.db().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    );
    for round in 0..2 {
        let mut w = Writer::spawn(
            &sb.db(),
            &format!("o{round}"),
            WriterOpts {
                commits: 40,
                rate: 0.0,
                big_every: 8,
            },
            round,
        );
        w.wait();
        d.wait_caught_up(Duration::from_secs(10));
    }
    d.stop();
    let url = sb.replica_url();

    let dir = sb.path("out");
    fs::create_dir(&dir).expect("mkdir out");
    let target_file = dir.join("real.db");
    fs::write(&target_file, b"not walship's to touch").expect("write real.db");
    let dev = dir.join("null");
    mknod(
        &dev,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .expect("mknod");
    let link = dir.join("link.db");
    std::os::unix::fs::symlink(&target_file, &link).expect("symlink");
    let dangling = dir.join("dangling.db");
    std::os::unix::fs::symlink(dir.join("nowhere.db"), &dangling).expect("symlink");
    let subdir = dir.join("dir.db");
    fs::create_dir(&subdir).expect("mkdir");
    fs::write(subdir.join("inside"), b"x").expect("write inside");
    let fifo = dir.join("fifo.db");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let sock = dir.join("sock.db");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind socket");
    let before = names_in(&dir);

    let cases: [(&Path, &str); 6] = [
        (&dev, "a character device"),
        (&link, "a symbolic link"),
        (&dangling, "a symbolic link"),
        (&subdir, "a directory"),
        (&fifo, "a FIFO"),
        (&sock, "a socket"),
    ];
    for (path, what) in cases {
        for extra in [&["--force"][..], &[][..]] {
            let t = Instant::now();
            let o = restore(path, &url, extra).fails();
            let e = o.one_error_line();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(what),
                "{extra:?}: the error must name {} and say it is {what}: {e}",
                path.display()
            );
            assert!(t.elapsed() < Duration::from_secs(10), "refused at once");
        }
        assert_eq!(
            names_in(&dir),
            before,
            "nothing written beside {}",
            path.display()
        );
    }
    assert!(
        fs::symlink_metadata(&dev)
            .expect("lstat dev")
            .file_type()
            .is_char_device()
            && fs::symlink_metadata(&dev).expect("lstat dev").rdev() == makedev(1, 3),
        "the device is still the same device"
    );
    assert_eq!(
        fs::read_link(&link).expect("readlink"),
        target_file,
        "the link is still a link"
    );
    assert_eq!(
        fs::read(&target_file).expect("read"),
        b"not walship's to touch"
    );
    assert!(fs::symlink_metadata(&dangling)
        .expect("lstat")
        .file_type()
        .is_symlink());
    assert_eq!(names_in(&subdir), ["inside"], "the directory is unchanged");
    assert!(fs::symlink_metadata(&fifo)
        .expect("lstat")
        .file_type()
        .is_fifo());
    assert!(fs::symlink_metadata(&sock)
        .expect("lstat")
        .file_type()
        .is_socket());

    // --if-db-not-exists: a database there (a file, or a symlink to one) means nothing to do;
    // what cannot be a database is an error, not a silent success.
    for skip in [&target_file, &link] {
        let o = restore(skip, &url, &["--if-db-not-exists"]).assert_ok();
        assert!(o.stdout.contains("nothing to restore"), "{}", o.stdout);
    }
    for (path, what) in [
        (&subdir, "a directory"),
        (&dev, "a character device"),
        (&dangling, "a symbolic link"),
    ] {
        let o = restore(path, &url, &["--if-db-not-exists"]).fails();
        let e = o.one_error_line();
        assert!(
            e.contains(&path.display().to_string()) && e.contains(what),
            "{e}"
        );
    }
    assert_eq!(fs::read_link(&link).expect("readlink"), target_file);
    assert_eq!(
        fs::read(&target_file).expect("read"),
        b"not walship's to touch"
    );
    assert_eq!(names_in(&dir), before);
    assert!(temps_under(&dir).is_empty());

    // A restore that fails midway: the newest segment of a copy of the replica is corrupt.
    let bad = sb.path("bad-replica");
    fs::create_dir(&bad).expect("mkdir");
    for rel in walk(&sb.replica()) {
        let to = bad.join(&rel);
        fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        fs::copy(sb.replica().join(&rel), &to).expect("copy");
    }
    let newest = segments(&bad)
        .into_iter()
        .max_by_key(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            let last = name.split('-').nth(3).unwrap_or("0").to_owned();
            u64::from_str_radix(&last, 16).unwrap_or(0)
        })
        .expect("a segment");
    let mut b = fs::read(&newest).expect("read segment");
    let i = b.len() / 2;
    b[i] ^= 0x40;
    fs::write(&newest, b).expect("corrupt segment");
    let bad_url = format!("file://{}", bad.display());
    let fresh = dir.join("fresh.db");
    let o = restore(&fresh, &bad_url, &[]).fails();
    assert!(
        o.one_error_line().contains("seg-"),
        "names the segment: {}",
        o.stderr
    );
    let o = restore(&target_file, &bad_url, &["--force"]).fails();
    assert!(
        o.one_error_line().contains("seg-"),
        "names the segment: {}",
        o.stderr
    );
    assert_eq!(
        fs::read(&target_file).expect("read"),
        b"not walship's to touch"
    );
    assert!(
        temps_under(&dir).is_empty(),
        "temporary files left: {:?}",
        temps_under(&dir)
    );
    assert_eq!(names_in(&dir), before);

    // --force over a regular file still works, and a symlink to it is left alone.
    restore(&target_file, &url, &["--force"]).assert_ok();
    assert_same_db(&sb.db(), &target_file);
    assert_eq!(fs::read_link(&link).expect("readlink"), target_file);
    assert!(temps_under(&dir).is_empty());
}

/// An operator interrupts a long restore (SIGINT, as Ctrl-C; SIGTERM, as a timeout would):
/// the partial temporary file beside the output is removed, the output is not created, and
/// the command fails with one `walship: interrupted ...` line.
#[test]
fn e2e_interrupted_restore_leaves_no_temp_file() {
    use nix::sys::signal::{kill, Signal};
    use std::process::{Command, Stdio};

    let sb = Sandbox::new();
    sb.create_db();
    let mut d = Daemon::start(
        &[sb.db().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    );
    let mut w = Writer::spawn(
        &sb.db(),
        "big",
        WriterOpts {
            commits: 300,
            rate: 0.0,
            big_every: 2,
        },
        7,
    );
    w.wait();
    d.wait_caught_up(Duration::from_secs(30));
    d.stop();
    let dir = sb.path("out");
    fs::create_dir(&dir).expect("mkdir out");
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let out = dir.join(format!("{sig}.db"));
        let child = Command::new(BIN)
            .args(["restore", "-o"])
            .arg(&out)
            .arg(sb.replica_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn walship restore");
        // Interrupt it while its temporary file is being written.
        let seen = (0..20_000).any(|_| {
            std::thread::sleep(Duration::from_micros(500));
            !temps_under(&dir).is_empty()
        });
        assert!(
            seen,
            "the restore finished before it could be interrupted: make the database bigger"
        );
        kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("kill");
        let o = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{sig}: exit 0 after interruption: {stderr}"
        );
        // Rarely the signal lands after the rename: then the output is complete.
        if out.exists() {
            assert_same_db(&sb.db(), &out);
            eprintln!("{sig}: landed after the rename");
            continue;
        }
        eprintln!("{sig}: interrupted mid-restore: {}", stderr.trim());
        assert!(
            temps_under(&dir).is_empty(),
            "{sig}: temporary file left: {:?}",
            temps_under(&dir)
        );
        assert!(
            stderr.trim().lines().count() == 1 && stderr.starts_with("walship: interrupted"),
            "{sig}: one `walship: interrupted ...` line, got {stderr:?}"
        );
    }
}
