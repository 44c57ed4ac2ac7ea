//! The `s3://` target against a second, independent S3 implementation: moto's S3 server
//! (installed by `script/install-moto`), which follows AWS's rules where Garage is lenient
//! (5 MiB minimum part size, `Content-MD5` checked). The same conformance cases as every other
//! target, on one server shared by the cases (each under a prefix of its own).
//!
//! The server dies with the parked thread that started it (`PR_SET_PDEATHSIG`), so it never
//! outlives the test process.

use crate::conformance::{conformance_suite, Fixture};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use walship::backend::s3::{S3Backend, S3Options};
use walship::url::S3Url;

const BUCKET: &str = "walship-moto";

/// moto_server: `$WALSHIP_MOTO` if set, else what `script/install-moto` prints.
fn moto_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WALSHIP_MOTO") {
        return PathBuf::from(p);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/script/install-moto");
    let out = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The endpoint of the shared moto server, with the bucket created and a credentials file
/// (moto accepts any key).
fn shared() -> &'static (String, PathBuf) {
    static S: OnceLock<(String, PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(start());
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("moto_server failed to start (see above)")
    })
}

fn start() -> (String, PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = Box::leak(Box::new(tempfile::tempdir().expect("tempdir")));
    let log = std::fs::File::create(dir.path().join("moto.log")).expect("log");
    let mut cmd = Command::new(moto_bin());
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log);
    // SAFETY: prctl(2) is async-signal-safe, as code between fork and exec must be.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().expect("start moto_server");
    std::mem::forget(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Creating the bucket is also the readiness probe.
        let ok = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{endpoint}/{BUCKET}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not answer on {endpoint}: {}",
            std::fs::read_to_string(dir.path().join("moto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        "access-key-id = \"testing\"\nsecret-access-key = \"testing\"\n",
    )
    .expect("write credentials");
    (endpoint, creds)
}

// Parts of 5 MiB (AWS's smallest, which moto enforces) so that the big cases upload three.
conformance_suite!(conformance_s3_moto, |case: &str| {
    let (endpoint, creds) = shared();
    let url = S3Url {
        bucket: BUCKET.to_owned(),
        prefix: format!("conformance/{case}"),
    };
    let mut o = S3Options::new(url, Some(endpoint.clone()), "us-east-1");
    o.credentials_file = Some(creds.clone());
    o.part_size = 5 << 20;
    Fixture::new(S3Backend::new(o), ())
});
