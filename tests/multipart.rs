//! Multi-part segment files (a growing tail on the replica): a segment file may be several
//! whole segment files one after the other, and its name is a lower bound of its content.
//!
//! A real database written by real writers is replicated by the real `walship replicate`,
//! which is then stopped; the replica's newest level-0 segments are then rewritten the way a
//! shipper that appends to a tail file leaves them (the bytes of consecutive segment files
//! concatenated into one file, renamed to the whole range; a torn part after it; a name that
//! lags its content) and read back by `walship restore`, `verify` and `restore --follow`.
//!
//! Invariant: every test here fails when readers take a segment file for exactly one part
//! (trailing data after the first part is an error there) or for exactly its name.

use crate::e2e_follow::assert_same_pages;
use crate::util::*;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

/// A segment file on the replica, from its name.
#[derive(Debug, Clone)]
struct Seg {
    path: PathBuf,
    level: u64,
    first: u64,
    last: u64,
    /// The name's two time fields, as written (hex).
    first_ms: String,
    last_ms: String,
}

impl Seg {
    fn parse(p: &Path) -> Seg {
        let n = p.file_name().expect("name").to_string_lossy().into_owned();
        let f: Vec<&str> = n.trim_end_matches(".wseg").split('-').collect();
        assert!(f.len() == 6 && f[0] == "seg", "unexpected segment name {n}");
        let h = |s: &str| u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("bad hex in {n}"));
        Seg {
            path: p.to_owned(),
            level: h(f[1]),
            first: h(f[2]),
            last: h(f[3]),
            first_ms: f[4].to_owned(),
            last_ms: f[5].to_owned(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).unwrap_or_else(|e| panic!("read {}: {e}", self.path.display()))
    }

    /// The generation id (the directory the file is in).
    fn generation(&self) -> String {
        self.path
            .parent()
            .and_then(|d| d.file_name())
            .expect("generation dir")
            .to_string_lossy()
            .into_owned()
    }
}

/// The path of a level-0 segment file beside `from`, named `from.first..=to.last`.
fn range_path(from: &Seg, to: &Seg) -> PathBuf {
    from.path.with_file_name(format!(
        "seg-0-{:016x}-{:016x}-{}-{}.wseg",
        from.first, to.last, from.first_ms, to.last_ms
    ))
}

/// `walship verify` of the sandbox's database against its replica.
fn verify(sb: &Sandbox) -> Out {
    walship([
        OsString::from("verify"),
        sb.db().into(),
        sb.replica_url().into(),
    ])
}

/// `walship replicate` of the sandbox's database to its file replica.
fn replicate(sb: &Sandbox) -> Daemon {
    Daemon::start(
        &[sb.db().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    )
}

/// A latest restore of the sandbox's replica into `name` equals the source, and `walship
/// verify` passes.
fn restores_to_source(sb: &Sandbox, name: &str) {
    let out = sb.path(name);
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&sb.db(), &out);
    verify(sb).assert_ok();
}

/// A copy of the replica as walship left it, to compare restores against; its URL.
fn pristine_copy(sb: &Sandbox) -> String {
    let pristine = sb.path("pristine");
    copy_replica(&sb.replica(), &pristine);
    format!("file://{}", pristine.display())
}

/// Replicates 6 rounds of writes (each its own segments) to a file replica, stops the daemon
/// and returns the replica's newest four level-0 segments, consecutive.
fn replicated(sb: &Sandbox) -> Vec<Seg> {
    sb.create_db();
    let mut d = replicate(sb);
    for round in 0..6u64 {
        let mut w = Writer::spawn(
            &sb.db(),
            &format!("r{round}"),
            WriterOpts {
                commits: 15,
                rate: 0.0,
                big_every: 5,
            },
            round,
        );
        w.wait();
        d.wait_caught_up(15 * SEC);
    }
    d.stop();
    let mut segs: Vec<Seg> = segments(&sb.replica())
        .iter()
        .map(|p| Seg::parse(p))
        .filter(|s| s.level == 0)
        .collect();
    segs.sort_by_key(|s| s.first);
    assert!(segs.len() >= 4, "want 4 level-0 segments, have {segs:?}");
    let last4 = segs.split_off(segs.len() - 4);
    for w in last4.windows(2) {
        assert_eq!(w[1].first, w[0].last + 1, "not consecutive: {last4:?}");
    }
    last4
}

/// Copies the replica tree `from` to `to`.
fn copy_replica(from: &Path, to: &Path) {
    for rel in walk(from) {
        let dst = to.join(&rel);
        fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
        fs::copy(from.join(&rel), &dst).expect("copy");
    }
}

/// Writes `bytes` as a segment file at `path` and removes `gone` (the files it replaces).
fn rewrite(path: &Path, bytes: &[u8], gone: &[&Seg]) {
    for s in gone {
        fs::remove_file(&s.path).unwrap_or_else(|e| panic!("rm {}: {e}", s.path.display()));
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `walship restore` of `url` at `--position GEN/TXID` into `out`.
fn restore_at(out: &Path, url: &str, generation: &str, txid: u64) -> Out {
    restore(out, url, &["--position", &format!("{generation}/{txid}")])
}

/// Three consecutive segment files concatenated into one named for the whole range: a latest
/// restore equals the source, `verify` passes, a point-in-time restore inside the merged file
/// equals the same restore of the untouched replica. A torn part appended to it (the first
/// half of the next segment, which stays a file of its own) changes nothing.
#[test]
fn multipart_concatenated_segments_restore() {
    let sb = Sandbox::new();
    let s = replicated(&sb);
    let raw: Vec<Vec<u8>> = s.iter().map(Seg::bytes).collect();
    let pristine_url = pristine_copy(&sb);
    let g = s[0].generation();

    let merged = range_path(&s[0], &s[2]);
    let bytes = raw[..3].concat();
    rewrite(&merged, &bytes, &[&s[0], &s[1], &s[2]]);

    let out = sb.path("latest.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&sb.db(), &out);
    let v = verify(&sb).assert_ok();
    assert!(v.stdout.contains(&s[3].last.to_string()), "{}", v.stdout);

    // Inside the merged file: in its second part, and at the end of its first part.
    for txid in [s[1].first + (s[1].last - s[1].first) / 2, s[0].last] {
        let a = sb.path(&format!("pitr-{txid}.db"));
        let b = sb.path(&format!("pristine-{txid}.db"));
        let o = restore_at(&a, &sb.replica_url(), &g, txid).assert_ok();
        assert!(o.stdout.contains(&format!("{g}/{txid} ")), "{}", o.stdout);
        restore_at(&b, &pristine_url, &g, txid).assert_ok();
        assert_same_db(&b, &a);
    }

    // A torn part after the named range: the next segment's first half (the file holding
    // all of that segment stays): ignored, the restore still equals the source.
    let next = &raw[3];
    let torn = [bytes.clone(), next[..next.len() / 2].to_vec()].concat();
    fs::write(&merged, &torn).expect("append torn part");
    restores_to_source(&sb, "torn.db");
}

/// A file whose name lags its content (the shipper appended, then crashed before renaming):
/// a latest restore applies the content to its end and reports that position; a torn part
/// at the very end of the newest file is not applied (the restore equals the untouched
/// replica's restore at the last whole part).
#[test]
fn multipart_content_beyond_the_name() {
    let sb = Sandbox::new();
    let s = replicated(&sb);
    let raw: Vec<Vec<u8>> = s.iter().map(Seg::bytes).collect();
    let pristine_url = pristine_copy(&sb);
    let g = s[0].generation();

    // All four segments in one file named for the first two only.
    let lagging = range_path(&s[0], &s[1]);
    let all = raw.concat();
    rewrite(&lagging, &all, &[&s[0], &s[1], &s[2], &s[3]]);
    let out = sb.path("latest.db");
    let o = restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert!(
        o.stdout.contains(&format!("position {g}/{} ", s[3].last)),
        "the restore did not reach the content's end {}: {}",
        s[3].last,
        o.stdout
    );
    assert_same_db(&sb.db(), &out);
    verify(&sb).assert_ok();
    // A point-in-time restore inside the named range stops there.
    let a = sb.path("pitr.db");
    let b = sb.path("pristine-pitr.db");
    restore_at(&a, &sb.replica_url(), &g, s[1].first).assert_ok();
    restore_at(&b, &pristine_url, &g, s[1].first).assert_ok();
    assert_same_db(&b, &a);

    // Three whole parts and a torn fourth (its first half), named for the three: the torn
    // part's commits are not applied, whole or in part.
    fs::remove_file(&lagging).expect("rm");
    let three = range_path(&s[0], &s[2]);
    let s3 = raw[3].clone();
    let torn = [
        raw[0].clone(),
        raw[1].clone(),
        raw[2].clone(),
        s3[..s3.len() / 2].to_vec(),
    ];
    fs::write(&three, torn.concat()).expect("write");
    let a = sb.path("torn-end.db");
    let b = sb.path("pristine-end.db");
    let o = restore(&a, &sb.replica_url(), &[]).assert_ok();
    assert!(
        o.stdout.contains(&format!("position {g}/{} ", s[2].last)),
        "{}",
        o.stdout
    );
    restore_at(&b, &pristine_url, &g, s[2].last).assert_ok();
    assert_same_db(&b, &a);
    // The same with a damaged (complete) fourth part: ignored as well.
    let mut bad = s3.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x10;
    fs::write(
        &three,
        [raw[0].clone(), raw[1].clone(), raw[2].clone(), bad].concat(),
    )
    .expect("write");
    let a = sb.path("damaged-end.db");
    restore(&a, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&b, &a);
}

/// Damage inside a file's named range is an error naming the file, even where the damaged
/// part is followed by whole parts: a flipped byte in the middle part, and a file that ends
/// before the last txid its name says.
#[test]
fn multipart_damage_inside_the_name_is_an_error() {
    let sb = Sandbox::new();
    let s = replicated(&sb);
    let raw: Vec<Vec<u8>> = s.iter().map(Seg::bytes).collect();
    let merged = range_path(&s[0], &s[2]);
    let name = merged
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let mut middle = raw[1].clone();
    let at = middle.len() / 2;
    middle[at] ^= 0x10;
    rewrite(
        &merged,
        &[raw[0].clone(), middle, raw[2].clone()].concat(),
        &[&s[0], &s[1], &s[2]],
    );
    let out = sb.path("bad.db");
    let o = restore(&out, &sb.replica_url(), &[]).fails();
    assert!(o.stderr.contains(&name), "{}", o.stderr);
    assert!(!out.exists());
    verify(&sb).fails();

    // Two whole parts where the name says three: the third is missing, not "beyond".
    fs::write(&merged, raw[..2].concat()).expect("write");
    let o = restore(&out, &sb.replica_url(), &[]).fails();
    assert!(o.stderr.contains(&name), "{}", o.stderr);
    // And the third part torn.
    let s2 = raw[2].clone();
    fs::write(
        &merged,
        [raw[0].clone(), raw[1].clone(), s2[..s2.len() / 2].to_vec()].concat(),
    )
    .expect("write");
    let o = restore(&out, &sb.replica_url(), &[]).fails();
    assert!(o.stderr.contains(&name), "{}", o.stderr);
}

/// A follower reading a tail file that grows by appended parts and is renamed after them
/// (sometimes lagging its content, with a torn part at its end) reaches the source.
#[test]
fn multipart_follower_reads_a_growing_tail() {
    let sb = Sandbox::new();
    let s = replicated(&sb);
    let full: Vec<Vec<u8>> = s.iter().map(Seg::bytes).collect();
    // The replica as it was when only the first of the four was shipped.
    for x in &s[1..] {
        fs::remove_file(&x.path).expect("rm");
    }
    let standby = sb.path("standby.db");
    let mut f = {
        let log = sb.path("follower.log");
        let a: Vec<OsString> = vec![
            "restore".into(),
            "--follow".into(),
            "--interval".into(),
            "100ms".into(),
            "-o".into(),
            standby.clone().into(),
            "--state-dir".into(),
            sb.path("follower-state").into(),
            sb.replica_url().into(),
        ];
        let mut d = Daemon::raw(a, &sb.path("follower-state"))
            .no_wait()
            .log(&log)
            .start();
        poll("the follower's initial restore", 30 * SEC, || {
            assert!(d.alive(), "the follower exited early:\n{}", d.log_text());
            d.log_text().contains("; following (every").then_some(())
        });
        d
    };
    let count = |db: &Path| rows(db).len();
    let at_first = count(&standby);

    // The shipper's way: append a whole segment file's bytes, then rename the tail.
    let append = |tail: &Path, bytes: &[u8]| {
        use std::io::Write;
        let mut w = fs::OpenOptions::new()
            .append(true)
            .open(tail)
            .unwrap_or_else(|e| panic!("open {}: {e}", tail.display()));
        w.write_all(bytes).expect("append");
        w.sync_all().expect("fsync");
    };
    let tail = range_path(&s[0], &s[1]);
    append(&s[0].path, &full[1]);
    fs::rename(&s[0].path, &tail).expect("rename");
    poll("the follower to apply the appended part", 30 * SEC, || {
        assert!(f.alive(), "the follower exited:\n{}", f.log_text());
        (count(&standby) > at_first).then_some(())
    });
    // Two more parts and a bad one (half of the last again: it does not continue), then a
    // rename that says one of the two only: the follower applies the whole parts, to the
    // source's last commit, and ignores the bad one.
    append(&tail, &full[2]);
    append(&tail, &full[3]);
    append(&tail, &full[3][..full[3].len() / 2]);
    fs::rename(&tail, range_path(&s[0], &s[2])).expect("rename");
    let want = rows(&sb.db());
    poll("the follower to reach the source", 30 * SEC, || {
        assert!(f.alive(), "the follower exited:\n{}", f.log_text());
        (rows(&standby) == want).then_some(())
    });
    f.sigterm();
    let st = f.wait_exit(30 * SEC).expect("the follower did not exit");
    assert!(st.success(), "follower exit {st}:\n{}", f.log_text());
    assert_same_pages(&sb.db(), &standby);
}

/// A tail whose name lags its content (two more whole parts and a torn one) while the same
/// commits were shipped again as files of their own (what a shipper restarted after a crash
/// between append and rename does): a latest restore reads the overlap (each commit applied
/// once) and equals the source; compaction then merges exactly the named ranges (the tail's
/// extra parts left out, or the merge would not chain), and the result still restores.
#[test]
fn multipart_compaction_merges_exactly_the_named_ranges() {
    let sb = Sandbox::new();
    let s = replicated(&sb);
    let raw: Vec<Vec<u8>> = s.iter().map(Seg::bytes).collect();
    let torn = &raw[3][..raw[3].len() / 2];
    fs::write(&s[0].path, [raw[..3].concat(), torn.to_vec()].concat()).expect("write");
    let out = sb.path("overlap.db");
    restore(&out, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&sb.db(), &out);

    let cfg = sb.path("compact.toml");
    fs::write(
        &cfg,
        format!(
            "db = \"{}\"\nstate-dir = \"{}\"\ncompaction-fanout = 2\n[[replica]]\nurl = \"{}\"\n",
            sb.db().display(),
            sb.state().display(),
            sb.replica_url()
        ),
    )
    .expect("write config");
    let mut d = Daemon::start_config(&sb, &cfg);
    let mut w = Writer::spawn(
        &sb.db(),
        "after",
        WriterOpts {
            commits: 3,
            rate: 0.0,
            big_every: 0,
        },
        77,
    );
    w.wait();
    d.wait_caught_up(15 * SEC);
    let first = s[0].first;
    let merged = poll("compaction to merge the tail", 60 * SEC, || {
        assert!(d.alive(), "the daemon exited:\n{}", d.log_text());
        let segs: Vec<Seg> = segments(&sb.replica())
            .iter()
            .map(|p| Seg::parse(p))
            .collect();
        let level0 = segs.iter().any(|x| x.level == 0 && x.first == first);
        let above = segs
            .iter()
            .find(|x| x.level > 0 && x.first <= first && x.last >= s[3].last)
            .cloned();
        if level0 {
            None
        } else {
            above
        }
    });
    d.stop();
    assert!(!d.log_text().contains("cannot merge"), "{}", d.log_text());
    restores_to_source(&sb, "compacted.db");
    // A point-in-time restore at the merged file's last txid.
    let g = s[0].generation();
    let a = sb.path("at-merged-end.db");
    restore_at(&a, &sb.replica_url(), &g, merged.last).assert_ok();
    assert_integrity(&a);
}

/// A grown tail whose last rename was lost (a power cut on the replica's host: a tail's rename
/// is not durable), while walship's saved position names the content's end: the next start
/// renames the file to what it holds before sending on, so the chain of names has no gap and
/// a latest restore equals the source. Without the repair, the segment sent next would start
/// past the lagging name and restores would refuse the replica ("segments ... are missing").
#[test]
fn multipart_lost_tail_rename_is_repaired_at_start() {
    let sb = Sandbox::new();
    let s = replicated(&sb);
    let raw: Vec<Vec<u8>> = s.iter().map(Seg::bytes).collect();
    let positions = replica_positions(&sb.state());
    assert!(
        positions.iter().any(|(_, p)| p.last == s[3].last),
        "the saved position is not the replica's end {}: {positions:?}",
        s[3].last
    );
    // s[2] grown by s[3], still named for s[2]'s first commit only.
    let lagging = s[2].path.with_file_name(format!(
        "seg-0-{:016x}-{:016x}-{}-{}.wseg",
        s[2].first, s[2].first, s[2].first_ms, s[2].first_ms
    ));
    rewrite(
        &lagging,
        &[raw[2].clone(), raw[3].clone()].concat(),
        &[&s[2], &s[3]],
    );

    let mut d = replicate(&sb);
    let mut w = Writer::spawn(
        &sb.db(),
        "after",
        WriterOpts {
            commits: 20,
            rate: 0.0,
            big_every: 0,
        },
        7,
    );
    w.wait();
    d.wait_caught_up(15 * SEC);
    d.stop();
    let log = d.log_text();
    assert!(
        log.contains("it holds commits up to txid"),
        "no repair logged: {log}"
    );
    let repaired: Vec<Seg> = segments(&sb.replica())
        .iter()
        .map(|p| Seg::parse(p))
        .filter(|x| x.level == 0 && x.first == s[2].first)
        .collect();
    assert!(
        repaired.iter().any(|x| x.last == s[3].last) && !lagging.exists(),
        "not renamed to its content {}..{}: {repaired:?}",
        s[2].first,
        s[3].last
    );
    restores_to_source(&sb, "latest.db");
}

/// A replica that was unreachable while several spool files piled up gets the backlog as one
/// file per batch, the spooled files' bytes one after the other (several parts, not decoded
/// and compressed again), and restores equal to the source.
#[test]
fn multipart_backlog_batch_is_sent_as_its_parts() {
    let sb = Sandbox::new();
    sb.create_db();
    // A file where the replica's directory should be: every upload fails until it goes.
    fs::write(sb.replica(), b"not a directory").expect("block the replica");
    let mut d = replicate(&sb);
    let mut w = Writer::spawn(
        &sb.db(),
        "backlog",
        WriterOpts {
            commits: 250,
            rate: 100.0,
            big_every: 25,
        },
        3,
    );
    w.wait();
    let spooled = poll("several spooled segment files", 20 * SEC, || {
        let n = segments(&sb.state().join("spool")).len();
        (n >= 2).then_some(n)
    });
    fs::remove_file(sb.replica()).expect("unblock the replica");
    d.wait_caught_up(30 * SEC);
    d.stop();
    let parts = |p: &PathBuf| {
        let b = fs::read(p).expect("read segment");
        b.windows(8).filter(|w| w == b"WALSHIP\0").count()
    };
    let most = segments(&sb.replica()).iter().map(parts).max().unwrap_or(0);
    assert!(
        most >= 2,
        "{spooled} spooled files reached the replica without any file of several parts"
    );
    restores_to_source(&sb, "latest.db");
}
