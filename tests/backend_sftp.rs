//! The `sftp://` target against a real, chrooted OpenSSH server (see `sshd.rs`): conformance,
//! host-key verification and `trust`, authentication and permission errors, and behaviour when
//! the server freezes, dies mid-upload or restarts.

use crate::conformance::{conformance_suite, Fixture};
use crate::sshd::{fingerprint, keygen, Sshd, TestDir};
use std::io::Read;
use std::time::{Duration, Instant};
use walship::backend::sftp::{scan_host_key, trust, SftpBackend};
use walship::backend::{Backend, ErrorKind};
use walship::durable::TEMP_PREFIX;

fn err_of<T>(r: walship::backend::Result<T>) -> walship::backend::BackendError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

// Each case on a server of its own, in a directory of its own.
conformance_suite!(conformance_sftp, |case: &str| {
    let sshd = Sshd::start();
    let dir = TestDir::new(&format!("conformance-{case}"));
    Fixture::new(sshd.target(&dir.remote), (dir, sshd))
});

#[test]
fn sftp_host_keys_and_trust() {
    let sshd = Sshd::start();
    let dir = TestDir::new("hostkeys");
    let fp = fingerprint(&sshd.host_pub);
    let scanned = scan_host_key("127.0.0.1", sshd.port, Duration::from_secs(5)).expect("scan");
    assert_eq!(scanned.key_type, "ssh-ed25519");
    assert_eq!(scanned.fingerprint(), fp, "same as ssh-keygen -lf");

    // Unknown: a missing known_hosts file trusts nothing.
    let kh = sshd.dir.path().join("etc/walship/known_hosts");
    let mut o = sshd.options(&dir.remote, Duration::from_secs(5));
    o.known_hosts = kh.clone();
    let e = err_of(SftpBackend::new(o.clone()).list(""));
    assert_eq!(e.kind, ErrorKind::Other, "{e}");
    assert!(
        e.msg.contains(&fp) && e.msg.contains("walship trust"),
        "{e}"
    );
    assert!(!e.msg.contains('\n'), "one line: {e}");

    // Port semantics: an entry without a port is for port 22 only.
    std::fs::create_dir_all(kh.parent().expect("parent")).expect("mkdir");
    std::fs::write(&kh, format!("127.0.0.1 {}", scanned.to_openssh())).expect("write");
    let e = err_of(SftpBackend::new(o.clone()).list(""));
    assert!(e.msg.contains("not trusted"), "{e}");

    // trust: no confirmation, then a wrong fingerprint, are refused and change nothing.
    let url = sshd.url(&dir.remote);
    let mut out = Vec::new();
    let e = trust(&url, &kh, None, false, &mut out).expect_err("needs confirmation");
    let printed = String::from_utf8_lossy(&out).to_string();
    assert!(
        printed.contains(&fp) && printed.contains("ssh-ed25519"),
        "{printed}"
    );
    assert!(printed.contains("--fingerprint"), "{printed}");
    assert!(e.to_string().contains("not trusted"), "{e}");
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let e = trust(&url, &kh, Some(wrong), true, &mut Vec::new()).expect_err("wrong fp");
    assert!(e.to_string().contains("does not match"), "{e}");
    assert!(SftpBackend::new(o.clone()).list("").is_err());

    // The right fingerprint adds `[127.0.0.1]:port`, mode 0644; then it works.
    trust(&url, &kh, Some(&fp), false, &mut Vec::new()).expect("trust");
    let text = std::fs::read_to_string(&kh).expect("read");
    assert!(
        text.contains(&format!("[127.0.0.1]:{} ssh-ed25519 ", sshd.port)),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&kh).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    SftpBackend::new(o.clone())
        .check_connection()
        .expect("trusted now");
    let mut out = Vec::new();
    trust(&url, &kh, None, false, &mut out).expect("already trusted is ok");
    assert!(String::from_utf8_lossy(&out).contains("already trusted"));

    // Changed key: refused loudly, showing both fingerprints; trust refuses without --yes.
    let other = sshd.dir.path().join("other_host");
    keygen(&other, "ed25519", "");
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).expect("pub");
    let mut f = other_pub.split_whitespace();
    let (t, b) = (f.next().expect("t"), f.next().expect("b"));
    std::fs::write(&kh, format!("[127.0.0.1]:{} {t} {b}\n", sshd.port)).expect("write");
    let e = err_of(SftpBackend::new(o.clone()).list(""));
    assert!(
        e.msg.contains("CHANGED") && e.msg.contains("man-in-the-middle"),
        "{e}"
    );
    assert!(e.msg.contains(&fp), "{e}");
    assert!(
        e.msg.contains(&fingerprint(&other.with_extension("pub"))),
        "{e}"
    );
    let e = trust(&url, &kh, Some(&fp), false, &mut Vec::new()).expect_err("changed");
    assert!(e.to_string().contains("DIFFERENT"), "{e}");
    trust(&url, &kh, Some(&fp), true, &mut Vec::new()).expect("replace with --yes");
    let text = std::fs::read_to_string(&kh).expect("read");
    assert!(!text.contains(b), "old key replaced: {text}");
    SftpBackend::new(o).check_connection().expect("works again");
}

#[test]
fn sftp_auth_and_permission_errors() {
    let sshd = Sshd::start();
    let dir = TestDir::new("auth");

    // A key the server does not know.
    let stranger = sshd.dir.path().join("stranger");
    keygen(&stranger, "ed25519", "");
    let mut o = sshd.options(&dir.remote, Duration::from_secs(5));
    o.key_path = stranger;
    let e = err_of(SftpBackend::new(o).list(""));
    assert_eq!(e.kind, ErrorKind::Other, "{e}");
    assert!(
        e.msg.contains("refused key") && e.msg.contains("replicator"),
        "{e}"
    );

    // RSA and ECDSA keys, the latter with a passphrase from a file.
    let rsa = sshd.dir.path().join("client_rsa");
    keygen(&rsa, "rsa", "");
    let ecdsa = sshd.dir.path().join("client_ecdsa");
    keygen(&ecdsa, "ecdsa", "s3cret pass");
    sshd.authorize(&rsa.with_extension("pub"));
    sshd.authorize(&ecdsa.with_extension("pub"));
    let mut o = sshd.options(&dir.remote, Duration::from_secs(5));
    o.key_path = rsa;
    SftpBackend::new(o.clone()).check_connection().expect("rsa");
    o.key_path = ecdsa;
    let e = err_of(SftpBackend::new(o.clone()).check_connection());
    assert!(e.msg.contains("passphrase"), "{e}");
    let pf = sshd.dir.path().join("passphrase");
    std::fs::write(&pf, "s3cret pass\n").expect("write");
    o.passphrase_file = Some(pf);
    SftpBackend::new(o)
        .check_connection()
        .expect("ecdsa with passphrase");

    // The chroot root is not writable: a clear permission error naming the directory.
    let t = sshd.target("x");
    let e = err_of(t.write_atomic("a", &mut &b"x"[..]));
    let want = format!(
        "failed to create directory sftp://replicator@127.0.0.1:{}/x: permission denied",
        sshd.port
    );
    assert_eq!(e.msg, want);
    assert_eq!(e.kind, ErrorKind::Other);
    assert!(t.list("").expect("missing dir lists empty").is_empty());
}

#[test]
fn sftp_frozen_server_times_out_and_recovers() {
    let sshd = Sshd::start();
    let dir = TestDir::new("frozen");
    let t = SftpBackend::new(sshd.options(&dir.remote, Duration::from_secs(2)));
    t.write_atomic("f", &mut &b"before"[..]).expect("write");

    // An established session.
    sshd.stop();
    let start = Instant::now();
    let e = err_of(t.list(""));
    let took = start.elapsed();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    eprintln!("frozen server: Unavailable after {took:?}");
    assert!(took < Duration::from_millis(3500), "took {took:?}: {e}");
    // A new connection (handshake) against the frozen server.
    let t2 = SftpBackend::new(sshd.options(&dir.remote, Duration::from_secs(2)));
    let start = Instant::now();
    let e = err_of(t2.list(""));
    let took = start.elapsed();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    eprintln!("frozen server: Unavailable after {took:?}");
    assert!(took < Duration::from_millis(3500), "took {took:?}: {e}");

    sshd.cont();
    assert_eq!(t.list("").expect("works after SIGCONT").len(), 1);
    t.write_atomic("g", &mut &b"after"[..]).expect("write");
    assert_eq!(t2.list("").expect("new target too").len(), 2);
}

#[test]
fn sftp_killed_mid_upload_and_restart() {
    let sshd = Sshd::start();
    let dir = TestDir::new("killed");
    let t = SftpBackend::new(sshd.options(&dir.remote, Duration::from_secs(2)));
    t.write_atomic("g/first", &mut &b"1"[..]).expect("write");

    // Idle session, server restarted: the next operation reconnects by itself.
    sshd.restart();
    assert_eq!(t.list("g").expect("list after restart").len(), 1);

    // Kill sshd once 8 MiB of a 64 MiB body were handed over.
    struct KillingReader<'a> {
        sshd: &'a Sshd,
        sent: usize,
        killed: bool,
    }
    impl Read for KillingReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.sent >= 64 << 20 {
                return Ok(0);
            }
            if self.sent >= 8 << 20 && !self.killed {
                self.killed = true;
                self.sshd.kill();
            }
            let n = buf.len().min((64 << 20) - self.sent);
            buf[..n].fill(0x5a);
            self.sent += n;
            Ok(n)
        }
    }
    let start = Instant::now();
    let e = err_of(t.write_atomic(
        "g/big",
        &mut KillingReader {
            sshd: &sshd,
            sent: 0,
            killed: false,
        },
    ));
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(e.msg.contains("g/big"), "{e}");
    eprintln!("killed mid-upload: error after {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(5));
    let leftovers = || {
        std::fs::read_dir(dir.local.join("g"))
            .expect("read dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
            .count()
    };
    assert_eq!(leftovers(), 1, "the killed upload left its temp file");

    // While down: Unavailable, quickly.
    let e = err_of(t.list("g"));
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");

    sshd.restart();
    assert_eq!(
        t.read("g/big").err().map(|e| e.kind),
        Some(ErrorKind::NotFound)
    );
    let names: Vec<_> = t
        .list("g")
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["first"]);
    assert_eq!(t.cleanup("g").expect("cleanup"), 1);
    assert_eq!(leftovers(), 0);
}

#[test]
fn sftp_hostile_names_are_skipped() {
    let sshd = Sshd::start();
    let dir = TestDir::new("hostile");
    let t = sshd.target(&dir.remote);
    t.write_atomic("d/ok", &mut &b"fine"[..]).expect("write");
    let d = dir.local.join("d");
    std::fs::write(d.join("bad\nname"), b"x").expect("plant");
    std::fs::write(d.join("tab\tname"), b"x").expect("plant");
    std::os::unix::fs::symlink("/etc/passwd", d.join("link")).expect("symlink");
    let names: Vec<_> = t
        .list("d")
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["ok"]);
}

/// Descriptors open in the server's processes (the listener and its sessions).
fn server_fds(sshd: &Sshd) -> usize {
    sshd.tree()
        .iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .map(Iterator::count)
        .sum()
}

/// Appends switching from one file to another close the handle they leave, also when that
/// file was renamed or written over meanwhile: after 200 switches the server holds as many
/// descriptors as after 4 (a handle left open at every switch, about one a second under a
/// stream of commits, would run the session out of descriptors within the hour). The content
/// is every append, in order.
#[test]
fn sftp_appends_leave_no_handle_open() {
    let sshd = Sshd::start();
    let dir = TestDir::new("append-handles");
    let t = sshd.target(&dir.remote);
    let mut names = [String::from("a0"), String::from("b0")];
    for n in &names {
        t.write_atomic(n, &mut &b"x"[..]).expect("write");
    }
    let mut len = [1u64, 1];
    let mut before = None;
    for i in 0..200usize {
        let k = i % 2;
        t.append(&names[k], len[k], b"y")
            .unwrap_or_else(|e| panic!("append {i}: {e}"));
        len[k] += 1;
        if i % 10 == 9 {
            // The tail's name follows its content, as the shipper renames it.
            let next = format!("{}{}", &names[k][..1], i);
            t.rename(&names[k], &next).expect("rename");
            names[k] = next;
        }
        if i == 3 {
            before = Some(server_fds(&sshd));
        }
    }
    let (before, after) = (before.unwrap_or(0), server_fds(&sshd));
    assert!(
        after <= before + 2,
        "the server's descriptors grew from {before} to {after} over 200 appends"
    );
    for (k, n) in names.iter().enumerate() {
        let mut body = Vec::new();
        t.read(n)
            .unwrap_or_else(|e| panic!("open {n}: {e}"))
            .read_to_end(&mut body)
            .unwrap_or_else(|e| panic!("read {n}: {e}"));
        assert_eq!(body.len() as u64, len[k], "{n}");
        assert!(
            body[0] == b'x' && body[1..].iter().all(|b| *b == b'y'),
            "{n}"
        );
    }
}

/// Throughput of `SftpBackend` against OpenSSH's own `sftp` client on the same sshd. Run by
/// `bench/sftp-throughput.sh` (release build); `WALSHIP_BENCH_MIB` sets the size (default 256).
#[test]
#[ignore = "benchmark: run bench/sftp-throughput.sh"]
fn sftp_throughput_vs_openssh() {
    use std::process::Command;
    let mib: usize = std::env::var("WALSHIP_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let sshd = Sshd::start();
    let dir = TestDir::new("bench");
    let body: Vec<u8> = (0..mib << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let src = sshd.dir.path().join("body");
    std::fs::write(&src, &body).expect("write body");
    let t = sshd.target(&dir.remote);
    t.write_atomic("warmup", &mut &b"x"[..]).expect("warm up");
    let mbs = |d: Duration| (mib as f64) * 1.048_576 / d.as_secs_f64();

    let start = Instant::now();
    t.write_atomic("ours", &mut std::fs::File::open(&src).expect("open"))
        .expect("upload");
    let put_ours = mbs(start.elapsed());
    let start = Instant::now();
    let mut got = Vec::with_capacity(body.len());
    t.read("ours")
        .expect("open")
        .read_to_end(&mut got)
        .expect("download");
    let get_ours = mbs(start.elapsed());
    assert!(got == body, "download differs");

    let openssh = |batch: &str| {
        let start = Instant::now();
        let st = Command::new("sftp")
            .args(["-q", "-b", "-", "-P", &sshd.port.to_string(), "-i"])
            .arg(&sshd.client_key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
            .args(["-o", "BatchMode=yes", "replicator@127.0.0.1"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(batch.as_bytes())?;
                c.wait()
            })
            .expect("run sftp");
        assert!(st.success(), "sftp {batch}: {st}");
        mbs(start.elapsed())
    };
    let put_ssh = openssh(&format!("put {} /{}/theirs\n", src.display(), dir.remote));
    let back = sshd.dir.path().join("back");
    let get_ssh = openssh(&format!("get /{}/theirs {}\n", dir.remote, back.display()));
    println!(
        "{mib} MiB: upload walship {put_ours:.0} MB/s, OpenSSH sftp put {put_ssh:.0} MB/s, \
         ratio {:.2}",
        put_ours / put_ssh
    );
    println!(
        "{mib} MiB: download walship {get_ours:.0} MB/s, OpenSSH sftp get {get_ssh:.0} MB/s, \
         ratio {:.2}",
        get_ours / get_ssh
    );
}
