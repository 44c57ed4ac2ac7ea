//! Prometheus metrics of `walship replicate` (issue #11): the real daemon, real writers, a
//! `file://` replica, scraped over plain HTTP (`metrics-listen`) and read from the
//! node_exporter textfile (`metrics-textfile`); what the figures say against the status file
//! the daemon writes, a replica made to fail, a silent client that must not hold scrapes up,
//! and the start-up errors of a bad or busy address.

use crate::util::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// A config at `<sandbox>/walship.toml`: the sandbox's database, state dir and replica (named
/// `a`), a small checkpoint threshold (so that the writers' commits cause checkpoints), and
/// `extra` top-level keys.
fn config(sb: &Sandbox, extra: &str) -> PathBuf {
    let text = format!(
        "db = {:?}\nstate-dir = {:?}\ncheckpoint-pages = 20\n{extra}\n[[replica]]\nname = \"a\"\nurl = {:?}\n",
        sb.db().display().to_string(),
        sb.state().display().to_string(),
        sb.replica_url(),
    );
    let p = sb.path("walship.toml");
    fs::write(&p, text).expect("write config");
    p
}

/// A loopback port nothing listens on (bound by the kernel's choice, then let go).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// `request` sent to 127.0.0.1:`port`; the response read to its end (the server closes):
/// status line, headers (lower-case names), body.
fn http(port: u16, request: &str) -> (String, BTreeMap<String, String>, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(10 * SEC)).expect("timeout");
    s.write_all(request.as_bytes()).expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {raw:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// One sample: metric name and labels.
type Series = (String, BTreeMap<String, String>);

/// Parses the text exposition format strictly: every sample's family was declared by HELP
/// and TYPE lines; label values unescaped.
fn parse(text: &str) -> Vec<(Series, f64)> {
    let mut typed = BTreeMap::new();
    let mut helped = Vec::new();
    let mut out = Vec::new();
    for l in text.lines() {
        if let Some(r) = l.strip_prefix("# HELP ") {
            helped.push(r.split(' ').next().unwrap_or_default().to_owned());
            continue;
        }
        if let Some(r) = l.strip_prefix("# TYPE ") {
            let (name, kind) = r.split_once(' ').unwrap_or_else(|| panic!("bad TYPE {l}"));
            assert!(["gauge", "counter"].contains(&kind), "{l}");
            typed.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        let (series, value) = l
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {l:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {l:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((n, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in {l:?}"));
                (n.to_owned(), labels(body, l))
            }
        };
        assert!(typed.contains_key(&name), "{name} has no TYPE line");
        assert!(helped.contains(&name), "{name} has no HELP line");
        if typed[&name] == "counter" {
            assert!(name.ends_with("_total"), "counter {name} lacks _total");
        }
        out.push(((name, labels), value));
    }
    out
}

/// `a="x",b="y\"z"` as a map (values unescaped).
fn labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (k, r) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label in {line:?}"));
        let mut v = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => v.push('\n'),
                    Some((_, c)) => v.push(c),
                    None => panic!("bad escape in {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => v.push(c),
                None => panic!("unterminated label in {line:?}"),
            }
        };
        m.insert(k.to_owned(), v);
        rest = r[end + 1..].strip_prefix(',').unwrap_or(&r[end + 1..]);
    }
    m
}

/// The parsed metrics and a way to read one value.
struct Metrics(Vec<(Series, f64)>);

impl Metrics {
    /// The value of `name` whose labels include `want`; panics if there is none or several.
    fn get(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let hits: Vec<f64> = self
            .0
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(hits.len(), 1, "{name} {want:?} in {:?}", self.0);
        hits[0]
    }

    /// The sum of `name` over every series with labels including `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
            })
            .map(|(_, v)| *v)
            .sum()
    }
}

/// `GET /metrics`, checked (200, the exposition format's content type) and parsed.
fn scrape(port: u16) -> Metrics {
    let (status, headers, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 200 OK", "{body}");
    assert!(
        headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{headers:?}"
    );
    assert_eq!(
        headers.get("content-length").map(String::as_str),
        Some(body.len().to_string().as_str())
    );
    Metrics(parse(&body))
}

fn commits(sb: &Sandbox, name: &str, n: u32, seed: u64) {
    Writer::spawn(
        &sb.db(),
        name,
        WriterOpts {
            commits: n,
            rate: 0.0,
            big_every: 0,
        },
        seed,
    )
    .wait();
}

/// Scraped over HTTP while writers commit: the figures agree with the status file, counters
/// grow with the commits, a replica that fails is counted and reported down (and up again
/// once it is back), other paths are 404, and a client that sends nothing does not hold the
/// next scrape up.
#[test]
fn e2e_metrics_over_http() {
    let sb = Sandbox::new();
    sb.create_db();
    let port = free_port();
    let conf = config(&sb, &format!("metrics-listen = \"127.0.0.1:{port}\""));
    let mut d = Daemon::start_config(&sb, &conf);
    let db = sb.db().display().to_string();
    let a: &[(&str, &str)] = &[("db", &db), ("replica", "a")];

    commits(&sb, "w1", 60, 1);
    let s1 = d.wait_caught_up(30 * SEC);
    let m = scrape(port);
    assert_eq!(
        m.get("walship_info", &[("db", &db)]),
        1.0,
        "walship_info: {:?}",
        m.0
    );
    assert_eq!(m.get("walship_replica_txid", a), s1.txid as f64);
    assert_eq!(
        m.get("walship_captured_txid", &[("db", &db)]),
        s1.txid as f64
    );
    assert_eq!(m.get("walship_replica_up", a), 1.0);
    assert!(m.get("walship_replica_lag_seconds", a) < 1.0);
    let files1 = m.get("walship_replica_uploaded_files_total", a);
    let bytes1 = m.get("walship_replica_uploaded_bytes_total", a);
    assert!(
        files1 > 0.0 && bytes1 > 0.0,
        "{files1} files, {bytes1} bytes"
    );
    assert_eq!(m.sum("walship_replica_errors_total", a), 0.0);
    let last = m.get("walship_replica_last_success_timestamp_seconds", a);
    assert!(
        (now_ms() as f64 / 1000.0 - last).abs() < 60.0,
        "last success {last}"
    );
    assert_eq!(
        m.get(
            "walship_generations_started_total",
            &[("db", &db), ("reason", "no_previous_state")]
        ),
        1.0
    );
    assert_eq!(
        m.sum("walship_generations_started_total", &[("db", &db)]),
        1.0
    );
    let checkpoints1 = m.get("walship_checkpoints_total", &[("db", &db)]);
    assert!(checkpoints1 > 0.0, "60 commits, checkpoint-pages = 20");
    let wal = fs::metadata(format!("{db}-wal")).map_or(0, |m| m.len());
    assert_eq!(m.get("walship_wal_bytes", &[("db", &db)]), wal as f64);
    m.get("walship_spool_bytes", &[("db", &db)]);

    commits(&sb, "w2", 60, 2);
    let s2 = d.wait_caught_up(30 * SEC);
    assert!(s2.txid > s1.txid);
    let m = scrape(port);
    assert_eq!(m.get("walship_replica_txid", a), s2.txid as f64);
    assert!(m.get("walship_replica_uploaded_files_total", a) > files1);
    assert!(m.get("walship_replica_uploaded_bytes_total", a) > bytes1);
    assert!(m.get("walship_checkpoints_total", &[("db", &db)]) > checkpoints1);

    // Other paths, other methods, garbage.
    let (status, _, _) = http(port, "GET /other HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 404 Not Found");
    let (status, _, _) = http(port, "POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 405 Method Not Allowed");
    let (status, _, _) = http(port, "hello\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 400 Bad Request");

    // A client that connects and sends nothing is dropped after the server's timeout; the
    // scrape behind it is answered meanwhile or right after.
    let silent = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let t0 = Instant::now();
    scrape(port);
    let took = t0.elapsed();
    assert!(
        took < 5 * SEC,
        "a silent client held a scrape up for {took:?}"
    );
    drop(silent);

    // The replica's directory replaced by a file: uploads fail.
    let moved = sb.path("replica.moved");
    fs::rename(sb.replica(), &moved).expect("move replica away");
    fs::write(sb.replica(), b"not a directory").expect("file in its place");
    commits(&sb, "w3", 20, 3);
    let t0 = Instant::now();
    let m = loop {
        let m = scrape(port);
        if m.get("walship_replica_up", a) == 0.0 {
            break m;
        }
        assert!(t0.elapsed() < 30 * SEC, "replica still up: {:?}", m.0);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(m.sum("walship_replica_errors_total", a) >= 1.0, "{:?}", m.0);
    assert!(m.get("walship_replica_txid", a) < m.get("walship_captured_txid", &[("db", &db)]));
    let errors1 = m.sum("walship_replica_errors_total", a);
    let t0 = Instant::now();
    loop {
        let m = scrape(port);
        if m.sum("walship_replica_errors_total", a) > errors1
            && m.get("walship_replica_lag_seconds", a) > 0.5
        {
            assert_eq!(m.get("walship_replica_up", a), 0.0);
            break;
        }
        assert!(
            t0.elapsed() < 30 * SEC,
            "errors do not grow, or no lag: {:?}",
            m.0
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Back: up again, caught up.
    fs::remove_file(sb.replica()).expect("remove the file");
    fs::rename(&moved, sb.replica()).expect("move replica back");
    let s3 = d.wait_caught_up(60 * SEC);
    let m = scrape(port);
    assert_eq!(m.get("walship_replica_up", a), 1.0);
    assert_eq!(m.get("walship_replica_txid", a), s3.txid as f64);
    assert!(m.get("walship_replica_lag_seconds", a) < 1.0);
    d.stop();
}

/// node_exporter textfile mode: the file appears at start, is rewritten while the daemon
/// runs and once more at shutdown, parses, and no temporary file stays beside it.
#[test]
fn e2e_metrics_textfile() {
    let sb = Sandbox::new();
    sb.create_db();
    let dir = sb.path("textfile");
    fs::create_dir(&dir).expect("mkdir textfile");
    let prom = dir.join("walship-app.prom");
    let conf = config(
        &sb,
        &format!("metrics-textfile = {:?}", prom.display().to_string()),
    );
    let mut d = Daemon::start_config(&sb, &conf);
    let db = sb.db().display().to_string();
    let a: &[(&str, &str)] = &[("db", &db), ("replica", "a")];
    let read = || fs::read_to_string(&prom).ok().map(|t| Metrics(parse(&t)));
    poll("the metrics textfile", 15 * SEC, read);

    commits(&sb, "w1", 40, 1);
    let s1 = d.wait_caught_up(30 * SEC);
    // Rewritten while running (every 10 s).
    poll("the textfile to show the replicated txid", 25 * SEC, || {
        read().filter(|m| {
            m.0.iter()
                .any(|((n, _), v)| n == "walship_replica_txid" && *v == s1.txid as f64)
        })
    });
    let m = read().expect("textfile");
    assert_eq!(m.get("walship_replica_up", a), 1.0);
    assert!(m.get("walship_replica_uploaded_files_total", a) > 0.0);

    // Written at shutdown: the last commits are in it at once.
    commits(&sb, "w2", 40, 2);
    let s2 = d.wait_caught_up(30 * SEC);
    d.stop();
    let m = read().expect("textfile after stop");
    assert_eq!(m.get("walship_replica_txid", a), s2.txid as f64);
    assert_eq!(
        m.get("walship_captured_txid", &[("db", &db)]),
        s2.txid as f64
    );
    let names: Vec<String> = fs::read_dir(&dir)
        .expect("list textfile dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["walship-app.prom"], "temporary files left behind");
}

/// A metrics-listen value that is no address is a configuration error (exit 78) naming the
/// key; an address in use stops start-up with one line naming it (exit 1: the config is
/// right, the port may free up, so systemd's restart may help).
#[test]
fn metrics_listen_errors() {
    let sb = Sandbox::new();
    sb.create_db();
    let conf = config(&sb, "metrics-listen = \"localhost\"");
    let out = walship(["replicate".as_ref(), "--config".as_ref(), conf.as_os_str()]).fails();
    let line = out.one_error_line().to_owned();
    assert_eq!(out.code(), 78, "{line}");
    assert!(
        line.contains("walship.toml:4:18: `metrics-listen` must be an IP address and port"),
        "{line}"
    );

    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr");
    let conf = config(&sb, &format!("metrics-listen = \"{addr}\""));
    let out = walship(["replicate".as_ref(), "--config".as_ref(), conf.as_os_str()]).fails();
    let line = out.error_line().to_owned();
    assert_eq!(out.code(), 1, "{line}");
    assert!(
        line.starts_with(&format!("walship: cannot listen for metrics on {addr}: ")),
        "{line}"
    );
    assert!(line.contains("in use"), "{line}");
}

/// The systemd generator lets the sandboxed service write the textfile's directory (the file
/// is replaced through a temporary file beside it), and only that directory.
#[test]
fn generator_makes_the_textfile_directory_writable() {
    let t = crate::generator::Tree::new();
    fs::write(t.p("data/app.db"), b"").expect("db");
    fs::create_dir(t.p("textfile")).expect("mkdir textfile");
    let r = t.root.display();
    t.config(
        "app.toml",
        &format!(
            "db = \"{r}/data/app.db\"\nmetrics-textfile = \"{r}/textfile/walship-app.prom\"\n\
             [[replica]]\nurl = \"file://{r}/replicas/app\"\n"
        ),
    );
    assert_eq!(t.generate(), Vec::<String>::new());
    let text = fs::read_to_string(t.drop_in("app")).expect("drop-in");
    let writable: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ReadWritePaths="))
        .collect();
    assert_eq!(
        writable,
        [
            format!("{r}/data"),
            format!("{r}/replicas"),
            format!("{r}/textfile")
        ],
        "{text}"
    );
}
