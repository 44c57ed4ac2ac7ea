//! Client-side encryption (`encrypt-to`, `identity-file`, `--identity`): the conformance suite
//! over the encrypting target on file and on sftp (real sshd), and end to end with the real
//! daemon and concurrent writers: the replica holds only age files and no row content, restore
//! with the identity equals the source, a missing or wrong identity is one clear error, and a
//! replica is never read or written the other way (plain vs encrypted, mixed files).

use crate::conformance::{conformance_suite, Fixture};
use crate::sshd::{Sshd, TestDir};
use crate::util::*;
use age::secrecy::ExposeSecret;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use walship::backend::encrypted::Encrypted;
use walship::backend::file::FileBackend;
use walship::backend::Backend;

const SEC: Duration = Duration::from_secs(1);
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// An age key pair: the identity file written in `dir`, and the public recipient.
struct Keys {
    identity: PathBuf,
    recipient: String,
}

fn keys(dir: &Path, name: &str) -> Keys {
    let id = age::x25519::Identity::generate();
    let identity = dir.join(format!("{name}.agekey"));
    fs::write(
        &identity,
        format!(
            "# created: by the test\n# public key: {}\n{}\n",
            id.to_public(),
            id.to_string().expose_secret()
        ),
    )
    .expect("write identity file");
    Keys {
        identity,
        recipient: id.to_public().to_string(),
    }
}

fn encrypting(inner: Box<dyn Backend>, dir: &Path) -> Encrypted {
    let k = keys(dir, "conformance");
    let r = k.recipient.parse().expect("recipient");
    Encrypted::new(inner, vec![r], Some(k.identity))
}

conformance_suite!(conformance_encrypted_file, |_case: &str| {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = encrypting(
        Box::new(FileBackend::new(dir.path().join("replica"))),
        dir.path(),
    );
    Fixture::new(t, dir)
});

conformance_suite!(conformance_encrypted_sftp, |case: &str| {
    let sshd = Sshd::start();
    let dir = TestDir::new(&format!("conformance-enc-{case}"));
    let keys = tempfile::tempdir().expect("tempdir");
    let t = encrypting(Box::new(sshd.target(&dir.remote)), keys.path());
    Fixture::new(t, (dir, sshd, keys))
});

/// The files below `generations/` of a replica rooted at `root`.
fn data_files(root: &Path) -> Vec<PathBuf> {
    let g = root.join("generations");
    walk(&g).into_iter().map(|p| g.join(p)).collect()
}

/// 48-byte windows of random payloads (at least 500 bytes long) the writers committed: row
/// content that must not appear on an encrypted replica. zstd stores incompressible literals
/// as they are, so on a plaintext replica they do appear (checked in
/// `encryption_mismatches_are_refused`).
fn row_samples(db: &Path) -> Vec<Vec<u8>> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open source");
    let mut st = c
        .prepare("SELECT payload FROM t WHERE length(payload) >= 500 ORDER BY id LIMIT 40")
        .expect("prepare");
    let v: Vec<Vec<u8>> = st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .expect("query")
        .map(|r| r.expect("row"))
        .map(|p| p[200..248].to_vec())
        .collect();
    assert!(v.len() >= 10, "too few large rows: {}", v.len());
    v
}

/// How many of `samples` occur in any of `files`.
fn samples_found(files: &[PathBuf], samples: &[Vec<u8>]) -> usize {
    let contents: Vec<Vec<u8>> = files
        .iter()
        .map(|f| fs::read(f).unwrap_or_default())
        .collect();
    samples
        .iter()
        .filter(|s| {
            contents
                .iter()
                .any(|c| c.windows(s.len()).any(|w| w == &s[..]))
        })
        .count()
}

/// Every data file of the replica at `root` is an age file, none a walship file,
/// no row content is in any, and the marker says `encryption = "age"`.
fn assert_only_ciphertext(root: &Path, db: &Path) {
    let files = data_files(root);
    assert!(files.len() >= 2, "too few files on the replica: {files:?}");
    for f in &files {
        let b = fs::read(f).expect("read replica file");
        assert!(
            b.starts_with(AGE_MAGIC),
            "{} is not an age file: {:?}",
            f.display(),
            &b[..b.len().min(16)]
        );
        assert!(!b.starts_with(b"WALSHIP\0"), "{}", f.display());
    }
    assert_eq!(
        samples_found(&files, &row_samples(db)),
        0,
        "row content found on the encrypted replica"
    );
    let marker = fs::read_to_string(root.join("walship-replica.toml")).expect("marker");
    assert!(marker.contains("encryption = \"age\""), "{marker}");
}

fn write_config(sb: &Sandbox, name: &str, replica: &str) -> PathBuf {
    let conf = sb.path(name);
    fs::write(
        &conf,
        format!(
            "db = \"{}\"\nstate-dir = \"{}\"\n[[replica]]\n{replica}\n",
            sb.db().display(),
            sb.state().display()
        ),
    )
    .expect("write config");
    conf
}

/// Three concurrent writers for about two seconds, one row per commit, some rows larger than
/// a page.
fn writers(sb: &Sandbox, prefix: &str) -> Vec<Writer> {
    let o = WriterOpts {
        commits: 200,
        rate: 100.0,
        big_every: 0,
    };
    spawn_writers(&sb.db(), prefix, 3, o, 7)
}

/// Restores `url` with `extra` flags into a fresh path in `sb`.
fn restore_to(sb: &Sandbox, name: &str, url: &str, extra: &[OsString]) -> (PathBuf, Out) {
    let out = sb.path(name);
    let mut a: Vec<OsString> = vec!["restore".into(), "-o".into(), out.clone().into()];
    a.extend(extra.iter().cloned());
    a.push(url.into());
    (out, walship(a))
}

fn identity_flag(k: &Keys) -> Vec<OsString> {
    vec!["--identity".into(), k.identity.clone().into()]
}

#[test]
fn encrypted_file_replica_end_to_end() {
    let sb = Sandbox::new();
    sb.create_db();
    let k = keys(sb.dir.path(), "ops");
    let wrong = keys(sb.dir.path(), "stranger");
    let conf = write_config(
        &sb,
        "enc.toml",
        &format!(
            "url = \"{}\"\nencrypt-to = [\"{}\"]",
            sb.replica_url(),
            k.recipient
        ),
    );
    let mut d = Daemon::start_config(&sb, &conf);
    let mut ws = writers(&sb, "encfile");
    wait_all(&mut ws);
    d.wait_caught_up(60 * SEC);
    assert!(
        d.log_text().contains("encrypted to public keys only"),
        "{}",
        d.log_text()
    );
    d.stop();
    assert_only_ciphertext(&sb.replica(), &sb.db());

    // With the identity: equal to the source, by restore and by verify.
    let (out, r) = restore_to(&sb, "restored.db", &sb.replica_url(), &identity_flag(&k));
    r.assert_ok();
    assert_same_db(&sb.db(), &out);
    assert_contains_all(&rows(&out), &committed(&ws), "restored");
    let conf_id = write_config(
        &sb,
        "enc-id.toml",
        &format!(
            "url = \"{}\"\nencrypt-to = [\"{}\"]\nidentity-file = \"{}\"",
            sb.replica_url(),
            k.recipient,
            k.identity.display()
        ),
    );
    walship([OsString::from("verify"), "--config".into(), conf_id.into()]).assert_ok();

    // Without an identity: one clear error saying what to give.
    let (out2, r) = restore_to(&sb, "nokey.db", &sb.replica_url(), &[]);
    let r = r.fails();
    let line = r.one_error_line();
    assert!(
        line.contains("is encrypted") && line.contains("--identity FILE"),
        "{line}"
    );
    assert!(!out2.exists());
    // The daemon's own config (public keys only) cannot restore either.
    let r = walship([
        OsString::from("restore"),
        "--config".into(),
        conf.clone().into(),
        "-o".into(),
        sb.path("conf.db").into(),
    ])
    .fails();
    assert!(
        r.one_error_line()
            .contains("give --identity FILE or identity-file"),
        "{}",
        r.stderr
    );

    // The wrong identity: named, no key material printed.
    let (_, r) = restore_to(&sb, "wrong.db", &sb.replica_url(), &identity_flag(&wrong));
    let r = r.fails();
    let line = r.one_error_line();
    assert!(
        line.contains("no matching key") && line.contains(&wrong.identity.display().to_string()),
        "{line}"
    );
    assert!(!r.stderr.contains("AGE-SECRET-KEY"), "{}", r.stderr);
    // An identity file that is not one: named with its line, not its content.
    let bad = sb.path("bad.agekey");
    fs::write(&bad, "AGE-SECRET-KEY-1NOTAKEY\n").expect("write");
    let (_, r) = restore_to(
        &sb,
        "bad.db",
        &sb.replica_url(),
        &["--identity".into(), bad.clone().into()],
    );
    let r = r.fails();
    assert!(
        r.one_error_line()
            .contains(&format!("identity file {}, line 1", bad.display()))
            && !r.stderr.contains("NOTAKEY"),
        "{}",
        r.stderr
    );

    // list needs no key and says the replica is encrypted.
    let l = walship([OsString::from("list"), sb.replica_url().into()]).assert_ok();
    assert!(l.stdout.contains("encryption: age"), "{}", l.stdout);
}

#[test]
fn encrypted_sftp_replica_end_to_end() {
    let sshd = Sshd::start();
    let dir = TestDir::new("enc-e2e");
    let url = format!(
        "sftp://replicator@{}:{}/{}",
        sshd.addr, sshd.port, dir.remote
    );
    let sb = Sandbox::new();
    sb.create_db();
    let k = keys(sb.dir.path(), "ops");
    let access = format!(
        "key-path = \"{}\"\nknown-hosts = \"{}\"",
        sshd.client_key.display(),
        sshd.known_hosts.display()
    );
    let conf = write_config(
        &sb,
        "enc.toml",
        &format!(
            "url = \"{url}\"\n{access}\nencrypt-to = [\"{}\"]",
            k.recipient
        ),
    );
    let mut d = Daemon::start_config(&sb, &conf);
    let mut ws = writers(&sb, "encsftp");
    wait_all(&mut ws);
    d.wait_caught_up(60 * SEC);
    d.stop();
    assert_only_ciphertext(&dir.local, &sb.db());

    let mut flags: Vec<OsString> = vec![
        "--key-path".into(),
        sshd.client_key.clone().into(),
        "--known-hosts".into(),
        sshd.known_hosts.clone().into(),
    ];
    let (_, r) = restore_to(&sb, "nokey.db", &url, &flags);
    assert!(
        r.fails().one_error_line().contains("--identity FILE"),
        "restore without identity"
    );
    flags.extend(identity_flag(&k));
    let (out, r) = restore_to(&sb, "restored.db", &url, &flags);
    r.assert_ok();
    assert_same_db(&sb.db(), &out);
    assert_contains_all(&rows(&out), &committed(&ws), "restored");
}

#[test]
fn encryption_mismatches_are_refused() {
    // A plaintext replica, and an encrypted one, of the same database.
    let sb = Sandbox::new();
    sb.create_db();
    let k = keys(sb.dir.path(), "ops");
    let plain_root = sb.path("plain");
    let plain_url = format!("file://{}", plain_root.display());
    let enc_url = sb.replica_url();
    let plain_conf = write_config(
        &sb,
        "plain.toml",
        &format!("name = \"plain\"\nurl = \"{plain_url}\""),
    );
    let enc_conf = write_config(
        &sb,
        "enc.toml",
        &format!(
            "name = \"enc\"\nurl = \"{enc_url}\"\nencrypt-to = [\"{}\"]",
            k.recipient
        ),
    );
    let mut d = Daemon::start_config(&sb, &plain_conf);
    let mut ws = writers(&sb, "plain");
    wait_all(&mut ws);
    d.wait_caught_up(60 * SEC);
    d.stop();
    // The search finds row content where it is in plaintext.
    let samples = row_samples(&sb.db());
    assert!(
        samples_found(&data_files(&plain_root), &samples) > 0,
        "the row-content search finds nothing even on a plaintext replica"
    );
    let mut d = Daemon::start_config(&sb, &enc_conf);
    let mut ws2 = writers(&sb, "enc");
    wait_all(&mut ws2);
    d.wait_caught_up(60 * SEC);
    d.stop();

    // An encrypting daemon pointed at the plaintext replica, and a plain one at the encrypted.
    let mixed_conf = write_config(
        &sb,
        "mixed.toml",
        &format!(
            "name = \"mixed\"\nurl = \"{plain_url}\"\nencrypt-to = [\"{}\"]",
            k.recipient
        ),
    );
    let mut d = Daemon::start_config(&sb, &mixed_conf);
    let s = d.wait_status("the refusal of the plaintext replica", 30 * SEC, |s| {
        s.failing.is_some()
    });
    let f = s.failing.unwrap_or_default();
    assert!(
        f.contains("is not encrypted, but encryption is configured"),
        "{f}"
    );
    // It cannot ship what it captured: a stop would wait for that and exit 69.
    d.kill9();
    let plain_on_enc = write_config(
        &sb,
        "plain-on-enc.toml",
        &format!("name = \"plainonenc\"\nurl = \"{enc_url}\""),
    );
    let mut d = Daemon::start_config(&sb, &plain_on_enc);
    let s = d.wait_status("the refusal of the encrypted replica", 30 * SEC, |s| {
        s.failing.is_some()
    });
    let f = s.failing.unwrap_or_default();
    assert!(f.contains("is encrypted (age)"), "{f}");
    d.kill9();
    // Neither daemon wrote anything the other way.
    assert_only_ciphertext(&sb.replica(), &sb.db());
    for f in data_files(&plain_root) {
        let b = fs::read(&f).expect("read");
        assert!(b.starts_with(b"WALSHIP\0"), "{}", f.display());
    }

    // Restore: an identity for the plaintext replica is refused, and no identity for the
    // encrypted one.
    let (_, r) = restore_to(&sb, "a.db", &plain_url, &identity_flag(&k));
    assert!(
        r.fails().one_error_line().contains("is not encrypted"),
        "identity on a plaintext replica"
    );
    let (_, r) = restore_to(&sb, "b.db", &enc_url, &[]);
    assert!(r.fails().one_error_line().contains("is encrypted (age)"));

    // A plaintext file dropped into the encrypted replica: refused, named. Every data file
    // is replaced, so that whichever the restore reads first is one.
    let plain_seg = data_files(&plain_root)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "wseg"))
        .expect("a plaintext segment");
    let enc_files = data_files(&sb.replica());
    let enc_sample = fs::read(&enc_files[0]).expect("read an encrypted file");
    for f in &enc_files {
        fs::copy(&plain_seg, f).expect("plant a plaintext file");
    }
    let (_, r) = restore_to(&sb, "c.db", &enc_url, &identity_flag(&k));
    let r = r.fails();
    let line = r.one_error_line();
    assert!(
        line.contains("is not age-encrypted") && names_one_of(line, &enc_files),
        "{line}"
    );
    // And an age file dropped into the plaintext replica.
    let plain_files = data_files(&plain_root);
    for f in &plain_files {
        fs::write(f, &enc_sample).expect("plant an age file");
    }
    let (_, r) = restore_to(&sb, "d.db", &plain_url, &[]);
    let r = r.fails();
    let line = r.one_error_line();
    assert!(
        line.contains("age-encrypted") && names_one_of(line, &plain_files),
        "{line}"
    );
}

/// Whether `line` names one of `files` (by file name).
fn names_one_of(line: &str, files: &[PathBuf]) -> bool {
    files.iter().any(|f| {
        f.file_name()
            .is_some_and(|n| line.contains(&*n.to_string_lossy()))
    })
}

/// The levels of the segments on the replica at `root`.
fn levels(root: &Path) -> Vec<u8> {
    data_files(root)
        .iter()
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?;
            n.strip_prefix("seg-")?.bytes().next().map(|b| b - b'0')
        })
        .collect()
}

/// A daemon holding public keys only does not compact (it cannot read its segments back); one
/// given an identity file does, and the merged segments are encrypted and restore.
#[test]
fn encrypted_replicas_compact_only_with_an_identity() {
    let sb = Sandbox::new();
    sb.create_db();
    let k = keys(sb.dir.path(), "ops");
    let tuning = "compaction-fanout = 2\n";
    let conf = |name: &str, extra: &str| {
        let c = write_config(
            &sb,
            name,
            &format!(
                "url = \"{}\"\nencrypt-to = [\"{}\"]\n{extra}",
                sb.replica_url(),
                k.recipient
            ),
        );
        let text = fs::read_to_string(&c).expect("read config");
        fs::write(&c, format!("{tuning}{text}")).expect("write config");
        c
    };
    let public_only = conf("public.toml", "");
    let mut d = Daemon::start_config(&sb, &public_only);
    let mut ws = writers(&sb, "pub");
    wait_all(&mut ws);
    d.wait_caught_up(60 * SEC);
    // Past the quiet time after which compaction runs: it must not even try (and fail).
    std::thread::sleep(3 * SEC);
    let st = d.wait_caught_up(10 * SEC);
    assert!(st.failing.is_none(), "{}", st.line);
    let log = d.log_text();
    assert!(!log.contains("failing"), "{log}");
    d.stop();
    let l = levels(&sb.replica());
    assert!(l.len() >= 4, "too few segments: {l:?}");
    assert!(l.iter().all(|&x| x == 0), "compacted without a key: {l:?}");

    let with_key = conf(
        "with-key.toml",
        &format!("identity-file = \"{}\"", k.identity.display()),
    );
    let mut d = Daemon::start_config(&sb, &with_key);
    let mut ws2 = writers(&sb, "key");
    wait_all(&mut ws2);
    d.wait_caught_up(60 * SEC);
    poll("merged segments", 30 * SEC, || {
        levels(&sb.replica()).iter().any(|&x| x > 0).then_some(())
    });
    d.stop();
    assert_only_ciphertext(&sb.replica(), &sb.db());
    let (out, r) = restore_to(&sb, "restored.db", &sb.replica_url(), &identity_flag(&k));
    r.assert_ok();
    assert_same_db(&sb.db(), &out);
}
