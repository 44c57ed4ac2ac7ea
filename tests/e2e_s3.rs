//! End to end over S3 against a real 3-node Garage cluster (`garage.rs`): concurrent writers
//! replicated to `s3://`, restored and verified through another node; and the fault the issue
//! names: nodes killed during writes, one (the cluster keeps its write quorum) and then a second
//! (it loses it), restarted; nothing is lost, the restore equals the source, and catch-up starts
//! within 5 s of the quorum's return.

use crate::backend_s3::shared;
use crate::garage::Garage;
use crate::util::*;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

fn s3_url(g: &Garage, prefix: &str) -> String {
    format!("s3://{}/{prefix}", g.bucket())
}

/// `--endpoint E --region R --credentials-file F` for node `node` of `g`.
fn s3_flags(g: &Garage, node: usize) -> Vec<OsString> {
    vec![
        "--endpoint".into(),
        g.endpoint(node).into(),
        "--region".into(),
        g.region().into(),
        "--credentials-file".into(),
        g.credentials_file().into(),
    ]
}

fn restore_s3(g: &Garage, node: usize, out: &Path, url: &str) -> Out {
    let mut a: Vec<OsString> = vec!["restore".into(), "-o".into(), out.into()];
    a.extend(s3_flags(g, node));
    a.push(url.into());
    walship(a)
}

fn writers(db: &Path, n: usize, o: WriterOpts) -> Vec<Writer> {
    spawn_writers(db, "s", n, o, 3000)
}

/// No multipart upload left incomplete under `prefix` (the whole bucket's list is asked for:
/// curl's SigV4 and Garage disagree on how to sign a `/` in the query).
fn assert_no_incomplete_uploads(g: &Garage, prefix: &str) {
    let r = g.s3(0, "GET", "?uploads=", None, &[]);
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 200, "{body}");
    assert!(
        !body.contains(&format!("<Key>{prefix}/")),
        "incomplete uploads left: {body}"
    );
}

#[test]
fn e2e_s3_writers() {
    let t0 = Instant::now();
    let cluster = shared();
    let g = &*cluster;
    let url = s3_url(g, "e2e-writers");
    let sb = Sandbox::new();
    sb.create_db();
    let mut args: Vec<OsString> = vec![sb.db().into(), url.clone().into()];
    args.extend(s3_flags(g, 0));
    let mut d = Daemon::start(&args, &sb.state());
    let mut ws = writers(
        &sb.db(),
        3,
        WriterOpts {
            commits: 400,
            rate: 0.0,
            big_every: 60,
        },
    );
    wait_all(&mut ws);
    let done = committed(&ws);
    d.wait_caught_up(20 * SEC);
    d.stop();
    let out = sb.path("restored.db");
    // Through another node than the one walship wrote to.
    restore_s3(g, 2, &out, &url).assert_ok();
    assert_same_db(&sb.db(), &out);
    let have = rows(&out);
    assert_contains_all(&have, &done, "restore from s3");
    assert_eq!(have.len(), done.len());
    let mut v: Vec<OsString> = vec!["verify".into(), sb.db().into()];
    v.extend(s3_flags(g, 1));
    v.push(url.into());
    walship(v).assert_ok();
    assert_no_incomplete_uploads(g, "e2e-writers");
    eprintln!("e2e_s3_writers: {} rows, {:?}", done.len(), t0.elapsed());
}

#[test]
fn e2e_s3_nodes_killed() {
    let t0 = Instant::now();
    let mut g = Garage::start(3);
    let url = s3_url(&g, "e2e-nodes");
    let sb = Sandbox::new();
    sb.create_db();
    // A short timeout, so that requests the cluster cannot answer fail fast.
    let config = sb.path("s3.toml");
    std::fs::write(
        &config,
        format!(
            "db = \"{}\"\nstate-dir = \"{}\"\n[[replica]]\nurl = \"{url}\"\nendpoint = \"{}\"\n\
             region = \"{}\"\ncredentials-file = \"{}\"\ntimeout = \"2s\"\n",
            sb.db().display(),
            sb.state().display(),
            g.endpoint(0),
            g.region(),
            g.credentials_file().display()
        ),
    )
    .expect("write config");
    let mut d = Daemon::start_raw(
        vec!["replicate".into(), "--config".into(), config.into()],
        &sb.state(),
    );
    d.wait_caught_up(10 * SEC);
    let mut ws = writers(
        &sb.db(),
        2,
        WriterOpts {
            commits: 0,
            rate: 80.0,
            big_every: 30,
        },
    );
    std::thread::sleep(SEC);

    // One node down: 2 of 3 still make a quorum, replication goes on.
    g.kill(1);
    std::thread::sleep(3 * SEC);
    let s = d.wait_status("replication with one node down", 10 * SEC, |s| {
        s.failing.is_none() && s.lag_ms < 1000
    });
    let before = s.txid;
    std::thread::sleep(3 * SEC);
    let s = d.wait_status("replication going on with one node down", 10 * SEC, |s| {
        s.failing.is_none() && s.txid > before + 100
    });
    eprintln!("one node down: {}", s.line);

    // A second node down: no quorum, uploads fail; writers go on.
    g.kill(2);
    let s = d.wait_status("the replica failing without a quorum", 30 * SEC, |s| {
        s.failing.is_some()
    });
    eprintln!("quorum lost: {}", s.line);
    std::thread::sleep(5 * SEC);
    for w in ws.iter_mut() {
        w.assert_alive_or_ok();
    }

    g.restart(1);
    let back = Instant::now();
    let s = d.wait_status("catch-up after the quorum returned", 30 * SEC, |s| {
        s.failing.is_none() && s.lag_ms < 1000
    });
    let took = back.elapsed();
    eprintln!("quorum back: caught up after {took:?}: {}", s.line);
    assert!(
        took <= 5 * SEC,
        "catch-up took {took:?} after the quorum returned (bound: 5 s)"
    );
    g.restart(2);

    stop_all(&mut ws);
    let done = committed(&ws);
    d.wait_caught_up(20 * SEC);
    d.stop();
    let out = sb.path("restored.db");
    restore_s3(&g, 1, &out, &url).assert_ok();
    assert_same_db(&sb.db(), &out);
    let have = rows(&out);
    assert_contains_all(&have, &done, "restore after nodes were killed");
    assert_eq!(have.len(), done.len(), "nothing lost, nothing invented");
    assert_no_incomplete_uploads(&g, "e2e-nodes");
    eprintln!(
        "e2e_s3_nodes_killed: {} rows, {:?}",
        done.len(),
        t0.elapsed()
    );
}
