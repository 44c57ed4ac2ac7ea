//! The `s3://` target against a real 3-node Garage cluster (see `garage.rs`): conformance (with
//! multipart uploads), listings over several pages, incomplete uploads aborted by `cleanup`,
//! and one clear error for each thing a user gets wrong (secret, bucket, region, clock,
//! credentials file, endpoint).
//!
//! The conformance cases and most tests share a cluster (each under a prefix of its own) while
//! one of them runs: [`shared`] hands out the running one, and the last test to drop it stops
//! it, so no cluster idles under the rest of the suite (its background work was measured to
//! stall an unrelated latency test's writer by up to a second). Its nodes are started from a
//! thread that lives as long as the test process: they die with it (`PR_SET_PDEATHSIG`) even
//! if a test leaks the cluster, and not with the test thread that asked for it.

use crate::conformance::{conformance_suite, Fixture};
use crate::garage::Garage;
use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use walship::backend::s3::{S3Backend, S3Options};
use walship::backend::{Backend, ErrorKind};
use walship::url::S3Url;

/// The cluster the tests running now share, started if none runs.
pub(crate) fn shared() -> Arc<Garage> {
    static CURRENT: Mutex<Weak<Garage>> = Mutex::new(Weak::new());
    let mut current = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(g) = current.upgrade() {
        return g;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Garage::start(3));
        loop {
            std::thread::park();
        }
    });
    let g = Arc::new(
        rx.recv()
            .expect("the Garage cluster failed to start (see above)"),
    );
    *current = Arc::downgrade(&g);
    g
}

/// Options for the replica `prefix` of `g`'s bucket through node `node`.
pub(crate) fn options(g: &Garage, node: usize, prefix: &str) -> S3Options {
    let url = S3Url {
        bucket: g.bucket().to_owned(),
        prefix: prefix.to_owned(),
    };
    let mut o = S3Options::new(url, Some(g.endpoint(node)), g.region());
    o.credentials_file = Some(g.credentials_file());
    o.timeout = Duration::from_secs(5);
    o
}

fn err_of<T>(r: walship::backend::Result<T>) -> walship::backend::BackendError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

// Parts of 5 MiB (S3's smallest) so that the big cases upload three parts.
conformance_suite!(conformance_s3, |case: &str| {
    let cluster = shared();
    let mut o = options(&cluster, 0, &format!("conformance/{case}"));
    o.part_size = 5 << 20;
    Fixture::new(S3Backend::new(o), cluster)
});

#[test]
fn s3_listing_spans_pages_and_nodes() {
    let cluster = shared();
    let g = &*cluster;
    let mut o = options(g, 0, "paging");
    o.page_size = 3;
    let t = S3Backend::new(o);
    let mut want = Vec::new();
    for i in 0..10 {
        let name = format!("f{i:02}");
        t.write_atomic(&format!("d/{name}"), &mut name.as_bytes())
            .expect("write");
        want.push((name, false));
    }
    for sub in ["sub1", "sub2"] {
        t.write_atomic(&format!("d/{sub}/x"), &mut &b"x"[..])
            .expect("write");
        want.push((sub.to_owned(), true));
    }
    // Through another node, with pages of 3: 12 entries need 4 continuation tokens.
    let mut o2 = options(g, 2, "paging");
    o2.page_size = 3;
    let got: Vec<_> = S3Backend::new(o2)
        .list("d")
        .expect("list")
        .into_iter()
        .map(|e| (e.name, e.is_dir))
        .collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn s3_cleanup_aborts_incomplete_uploads() {
    let cluster = shared();
    let g = &*cluster;
    let t = S3Backend::new(options(g, 0, "orphans"));
    // What a crash mid-upload leaves: multipart uploads started and never completed.
    for key in ["orphans/dir/a", "orphans/dir/b", "orphans/other/c"] {
        let r = g.s3(0, "POST", &format!("{key}?uploads="), None, &[]);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(t.cleanup("dir").expect("cleanup"), 2);
    assert_eq!(
        t.cleanup("dir").expect("cleanup again"),
        0,
        "aborted for good"
    );
    assert_eq!(t.cleanup("other").expect("cleanup other"), 1);
    // Garage's listing of uploads can show an abort a moment late (one full run of the suite
    // found the last one still listed right after it): it must show every one within seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = g.s3(0, "GET", "?uploads=", None, &[]);
        let body = String::from_utf8_lossy(&left.body).into_owned();
        if !body.contains("<Upload>") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "uploads left: {body}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn s3_errors_say_what_to_fix() {
    let cluster = shared();
    let g = &*cluster;
    let ok = S3Backend::new(options(g, 0, "errors"));
    ok.write_atomic("x", &mut &b"x"[..]).expect("write");

    let e = err_of(ok.read("missing"));
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad-secret");
    std::fs::write(
        &bad,
        format!(
            "access-key-id = \"{}\"\nsecret-access-key = \"{}\"\n",
            g.key_id(),
            "0".repeat(64)
        ),
    )
    .expect("write");
    let mut o = options(g, 0, "errors");
    o.credentials_file = Some(bad.clone());
    let fixed_later = S3Backend::new(o);
    let e = err_of(fixed_later.list(""));
    assert_eq!(e.kind, ErrorKind::Other);
    assert!(
        e.to_string().contains("access denied")
            && e.to_string().contains(&bad.display().to_string()),
        "{e}"
    );

    // The admin fixes the file: the running backend reads it again after the refusal.
    std::fs::copy(g.credentials_file(), &bad).expect("fix the credentials file");
    fixed_later
        .list("")
        .expect("list with the fixed credentials");

    let mut o = options(g, 0, "errors");
    o.url.bucket = "no-such-bucket".into();
    let e = err_of(S3Backend::new(o).list(""));
    assert_eq!(e.kind, ErrorKind::Other);
    assert!(
        e.to_string()
            .contains("bucket no-such-bucket does not exist"),
        "{e}"
    );

    let mut o = options(g, 0, "errors");
    o.region = "eu-west-1".into();
    let e = err_of(S3Backend::new(o).list(""));
    assert_eq!(e.kind, ErrorKind::Other);
    assert!(e.to_string().contains("wrong region"), "{e}");

    let mut o = options(g, 0, "errors");
    o.credentials_file = Some(dir.path().join("absent"));
    let e = err_of(S3Backend::new(o).list(""));
    assert!(
        e.to_string().contains("cannot read S3 credentials file"),
        "{e}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let mut o = options(g, 0, "errors");
    o.endpoint = Some(format!("http://127.0.0.1:{port}"));
    let e = err_of(S3Backend::new(o).list(""));
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("cannot reach"), "{e}");

    // A clock an hour behind: the store refuses the request's date.
    let out = std::process::Command::new("faketime")
        .args([
            "-f",
            "-1h",
            env!("CARGO_BIN_EXE_walship"),
            "list",
            "--endpoint",
        ])
        .arg(g.endpoint(0))
        .args(["--region", g.region(), "--credentials-file"])
        .arg(g.credentials_file())
        .arg(format!("s3://{}/errors", g.bucket()))
        .output()
        .expect("run faketime (install it: script/setup)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("clock"), "{stderr}");
}

#[test]
fn s3_writes_survive_one_node_down() {
    // A cluster of its own: a node is killed.
    let mut g = Garage::start(3);
    let t = S3Backend::new(options(&g, 0, "down"));
    g.kill(2);
    let body: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
    t.write_atomic("big", &mut &body[..])
        .expect("a quorum of 2 of 3 accepts writes");
    g.restart(2);
    let mut back = Vec::new();
    S3Backend::new(options(&g, 2, "down"))
        .read("big")
        .expect("read through the restarted node")
        .read_to_end(&mut back)
        .expect("read");
    assert!(back == body);
}

/// A TLS front (stunnel) for node 0 with a certificate for 127.0.0.1 signed by a CA of the
/// test's own; returns the `https://` endpoint, the CA file, and what must outlive the test.
fn tls_front(g: &Garage) -> (String, std::path::PathBuf, (tempfile::TempDir, KillOnDrop)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=walship test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(p("ext"), "subjectAltName = IP:127.0.0.1\n").expect("write ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext",
        "-out",
        "server.pem",
    ]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let backend = g.endpoint(0).trim_start_matches("http://").to_owned();
    std::fs::write(
        p("stunnel.conf"),
        format!(
            "foreground = yes\npid =\n[s3]\naccept = 127.0.0.1:{port}\nconnect = {backend}\n\
             cert = {}\nkey = {}\n",
            p("server.pem").display(),
            p("server.key").display()
        ),
    )
    .expect("write stunnel.conf");
    let child = std::process::Command::new("stunnel")
        .arg(p("stunnel.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run stunnel (install it: script/setup)");
    let guard = KillOnDrop(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "stunnel did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (
        format!("https://127.0.0.1:{port}"),
        p("ca.pem"),
        (dir, guard),
    )
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn s3_https_is_checked_against_the_system_ca_store() {
    let cluster = shared();
    let g = &*cluster;
    let (endpoint, ca, _keep) = tls_front(g);
    let list = |ca_file: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_walship"));
        c.args([
            "list",
            "--endpoint",
            &endpoint,
            "--region",
            g.region(),
            "--credentials-file",
        ])
        .arg(g.credentials_file())
        .arg(format!("s3://{}/tls", g.bucket()))
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
        if let Some(f) = ca_file {
            // OpenSSL's default store, as an admin who installed the CA would have it.
            c.env("SSL_CERT_FILE", f);
        }
        c.output().expect("run walship")
    };
    // Not in the store: refused, saying why.
    let out = list(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown CA must be refused");
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
    // In the store: the replica (empty) lists.
    let out = list(Some(&ca));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("(empty)"));
    let t = {
        let mut o = options(g, 0, "tls");
        o.endpoint = Some(endpoint.clone());
        S3Backend::new(o)
    };
    // The same through the library, with the CA only in this process's default store, fails
    // the same way: nothing trusts the test CA unless the store has it.
    let e = err_of(t.list(""));
    assert_eq!(e.kind, ErrorKind::Other, "{e}");
}
