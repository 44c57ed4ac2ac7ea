//! Prometheus metrics of the replication daemon: the counters the daemon keeps, their text
//! exposition (format 0.0.4), and the two ways to publish it, both optional and both allowed
//! at once: `GET /metrics` over HTTP on `metrics-listen`, and a file for node_exporter's
//! textfile collector on `metrics-textfile`. docs/METRICS.md lists every metric.
//!
//! Invariants:
//! - Publishing never holds the daemon up: the HTTP server is one thread of its own that
//!   serves one connection at a time, reads at most [`MAX_REQUEST`] bytes of a request within
//!   [`CLIENT_TIMEOUT`] (a slow or silent client is dropped, never waited on longer), answers
//!   HTTP/1.0-style and closes; a scrape takes the daemon's shared lock only to copy a
//!   [`Sample`].
//! - A bind failure is a start-up error naming the address; a bad address is a configuration
//!   error (see `config`).
//! - The textfile is replaced atomically and durably (`durable::write_file_atomic`), so the
//!   collector never reads half a file, every [`TEXTFILE_INTERVAL`] and once more at shutdown.
//! - Counters only grow for the life of the process (Prometheus handles the reset at a
//!   restart); label values are escaped as the format requires.
//!
//! This module knows nothing of the daemon's internals: `replicate` fills a [`Sample`] from
//! its shared state and counts into [`ReplicaCounters`], [`checkpointed`] and
//! [`generation_started`].

use crate::backend::{BackendError, ErrorKind};
use crate::config::Settings;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// How often the textfile is rewritten.
pub(crate) const TEXTFILE_INTERVAL: Duration = Duration::from_secs(10);
/// A client has this long to send its request, and to take the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a request that is read (the request line and headers).
const MAX_REQUEST: usize = 8 << 10;
/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The classes of replica errors, in the order of [`ReplicaCounters::errors`].
const ERROR_KINDS: [&str; 4] = ["unavailable", "not_found", "other", "taken_over"];

/// What one replica's shipper counts (kept in its status, under the daemon's shared lock).
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplicaCounters {
    /// Bytes of spooled files the replica durably received.
    pub(crate) uploaded_bytes: u64,
    /// Uploads the replica durably received (a batch of segments sent as one file is one).
    pub(crate) uploaded_files: u64,
    /// Failed attempts by class ([`ERROR_KINDS`]).
    pub(crate) errors: [u64; 4],
    /// When the replica last durably received a file (Unix ms).
    pub(crate) last_success_ms: Option<u64>,
}

impl ReplicaCounters {
    /// Counts an upload of `bytes` that the replica now holds.
    pub(crate) fn uploaded(&mut self, bytes: u64, at_ms: u64) {
        self.uploaded_files += 1;
        self.uploaded_bytes += bytes;
        self.last_success_ms = Some(at_ms);
    }

    /// Counts a failed attempt, by the class of the target's error in `e`'s chain
    /// (`taken_over`: another instance claimed the replica).
    pub(crate) fn failed(&mut self, e: &anyhow::Error, taken_over: bool) {
        let kind = if taken_over {
            3
        } else {
            match e
                .chain()
                .find_map(|c| c.downcast_ref::<BackendError>())
                .map(|b| b.kind)
            {
                Some(ErrorKind::Unavailable) => 0,
                Some(ErrorKind::NotFound) => 1,
                Some(ErrorKind::Other) | None => 2,
            }
        };
        self.errors[kind] += 1;
    }
}

/// Checkpoints walship completed (process-wide: one daemon replicates one database).
static CHECKPOINTS: AtomicU64 = AtomicU64::new(0);
/// Generations started, by [`GenerationReason::label`].
static GENERATIONS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts a checkpoint that copied the whole WAL into the database.
pub(crate) fn checkpointed() {
    CHECKPOINTS.fetch_add(1, Ordering::Relaxed);
}

/// Why a new generation (a new snapshot and history) starts: the `reason` label of
/// `walship_generations_started_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GenerationReason {
    /// The first start with this state directory.
    NoPreviousState,
    /// The saved state could not be resumed (it names why).
    CannotResume,
    /// A start that was interrupted before its generation was saved.
    InterruptedStart,
    /// The database or its WAL changed while walship was stopped.
    ChangedWhileStopped,
    /// The page size changed while walship was stopped.
    PageSizeChanged,
    /// The database file was replaced or moved while walship ran.
    DbReplaced,
    /// Continuity broke while running (a WAL reset walship did not see, a failed step).
    WalBroken,
    /// The machine restarted while spool files of the generation were not on its disk yet
    /// (see `capture::publish`).
    SpoolLostInReboot,
}

impl GenerationReason {
    /// Every reason, exported at 0 until it happens.
    const ALL: [GenerationReason; 8] = [
        GenerationReason::NoPreviousState,
        GenerationReason::CannotResume,
        GenerationReason::InterruptedStart,
        GenerationReason::ChangedWhileStopped,
        GenerationReason::PageSizeChanged,
        GenerationReason::DbReplaced,
        GenerationReason::WalBroken,
        GenerationReason::SpoolLostInReboot,
    ];

    /// The label value.
    fn label(self) -> &'static str {
        match self {
            GenerationReason::NoPreviousState => "no_previous_state",
            GenerationReason::CannotResume => "cannot_resume",
            GenerationReason::InterruptedStart => "interrupted_start",
            GenerationReason::ChangedWhileStopped => "changed_while_stopped",
            GenerationReason::PageSizeChanged => "page_size_changed",
            GenerationReason::DbReplaced => "db_replaced",
            GenerationReason::WalBroken => "wal_broken",
            GenerationReason::SpoolLostInReboot => "spool_lost_in_reboot",
        }
    }
}

/// Counts a new generation started for `reason`.
pub(crate) fn generation_started(reason: GenerationReason) {
    let mut g = GENERATIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *g.entry(reason.label()).or_default() += 1;
}

/// One replica's figures at the moment of a scrape.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplicaSample {
    /// Its name.
    pub(crate) name: String,
    /// The txid of the last commit it holds.
    pub(crate) txid: Option<u64>,
    /// How far behind capture it is (seconds; 0 when it holds everything captured); `None`
    /// before the daemon's first report.
    pub(crate) lag_seconds: Option<f64>,
    /// False while its last attempt failed.
    pub(crate) up: bool,
    /// Its counters.
    pub(crate) counters: ReplicaCounters,
}

/// The daemon's figures at the moment of a scrape.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    /// Per replica, in configuration order.
    pub(crate) replicas: Vec<ReplicaSample>,
    /// The txid of the last commit captured; `None` before the first report.
    pub(crate) captured_txid: Option<u64>,
    /// Bytes in the local spool (what some replica still lacks).
    pub(crate) spool_bytes: Option<u64>,
}

/// Where the daemon's figures come from, once it runs (see [`Exporter::attach`]).
type Source = Box<dyn Fn() -> Sample + Send + Sync>;

/// The metrics of one database: what `render` needs besides a [`Sample`].
struct Registry {
    db: PathBuf,
    source: OnceLock<Source>,
}

impl Registry {
    fn render(&self) -> String {
        let sample = self.source.get().map(|s| s()).unwrap_or_default();
        let wal = crate::db::sidecar(&self.db, "-wal");
        let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
        let generations = GENERATIONS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        render(
            &self.db.display().to_string(),
            &sample,
            wal_bytes,
            CHECKPOINTS.load(Ordering::Relaxed),
            &generations,
        )
    }
}

/// Publishes the metrics of the daemon of `settings` (HTTP and/or textfile, as configured).
pub(crate) struct Exporter {
    registry: Arc<Registry>,
    textfile: Option<Textfile>,
}

/// The textfile writer thread and how to stop it.
struct Textfile {
    path: PathBuf,
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Exporter {
    /// Binds `metrics-listen` and starts serving, and starts rewriting `metrics-textfile`;
    /// until [`Exporter::attach`], only the figures that need no running daemon are exported.
    ///
    /// # Errors
    /// The address cannot be bound (in use, not local, not permitted), or a thread cannot start.
    pub(crate) fn start(settings: &Settings) -> Result<Exporter> {
        let registry = Arc::new(Registry {
            db: settings.db.clone(),
            source: OnceLock::new(),
        });
        if let Some(addr) = settings.metrics_listen {
            let listener = TcpListener::bind(addr)
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            let r = registry.clone();
            std::thread::Builder::new()
                .name("metrics-http".into())
                .spawn(move || serve(&listener, &r))
                .context("cannot start the metrics thread")?;
            info!("serving metrics on http://{addr}/metrics");
        }
        let textfile = match &settings.metrics_textfile {
            None => None,
            Some(path) => {
                let (stop, rx) = channel::<()>();
                let r = registry.clone();
                let p = path.clone();
                let thread = std::thread::Builder::new()
                    .name("metrics-textfile".into())
                    .spawn(move || {
                        let mut last_error = String::new();
                        loop {
                            write_textfile(&p, &r, &mut last_error);
                            match rx.recv_timeout(TEXTFILE_INTERVAL) {
                                Err(RecvTimeoutError::Timeout) => {}
                                _ => return,
                            }
                        }
                    })
                    .context("cannot start the metrics textfile thread")?;
                Some(Textfile {
                    path: path.clone(),
                    stop,
                    thread,
                })
            }
        };
        Ok(Exporter { registry, textfile })
    }

    /// From now on, scrapes take the daemon's figures from `source`.
    pub(crate) fn attach(&self, source: impl Fn() -> Sample + Send + Sync + 'static) {
        let _ = self.registry.source.set(Box::new(source));
    }

    /// At shutdown: writes the textfile one last time (the HTTP server ends with the process).
    pub(crate) fn finish(self) {
        if let Some(t) = self.textfile {
            let _ = t.stop.send(());
            let _ = t.thread.join();
            write_textfile(&t.path, &self.registry, &mut String::new());
        }
    }
}

/// Replaces the textfile; a failure is logged when it changes (and when it ends), not at
/// every attempt.
fn write_textfile(path: &Path, r: &Registry, last_error: &mut String) {
    let text = r.render();
    match crate::durable::write_file_atomic(path, &mut text.as_bytes(), 0o644) {
        Ok(_) => {
            if !last_error.is_empty() {
                info!("metrics textfile {} written again", path.display());
                last_error.clear();
            }
        }
        Err(e) => {
            let msg = format!("cannot write metrics textfile {}: {e}", path.display());
            if msg != *last_error {
                warn!(error_kind = "metrics", "{msg}");
                *last_error = msg;
            }
        }
    }
}

/// Accepts connections forever, one at a time.
fn serve(listener: &TcpListener, r: &Registry) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = answer(stream, r) {
                    debug!("metrics request from {peer}: {e}");
                }
            }
            Err(e) => {
                // Out of file descriptors, say: do not spin.
                warn!(
                    error_kind = "metrics",
                    "cannot accept a metrics connection: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Reads one request (bounded in size and time) and answers it.
fn answer(mut s: TcpStream, r: &Registry) -> std::io::Result<()> {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let complete = loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || buf.len() >= MAX_REQUEST {
            break false;
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => break false,
            Ok(n) => buf.extend_from_slice(&chunk[..n.min(MAX_REQUEST - buf.len())]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break false
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    let (status, body, head_only) = route(&buf, complete, r);
    let ctype = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    s.write_all(&out)?;
    s.flush()?;
    let _ = s.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// The response to a request: status line, body, and whether to send the headers only.
fn route(req: &[u8], complete: bool, r: &Registry) -> (&'static str, String, bool) {
    let line = req
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if !complete
        || !version.is_some_and(|v| v.starts_with("HTTP/"))
        || parts.next().is_some()
        || !target.is_some_and(|t| t.starts_with('/'))
    {
        return ("400 Bad Request", "bad request\n".into(), false);
    }
    let path = target.unwrap_or("/").split('?').next().unwrap_or("/");
    let head_only = method == Some("HEAD");
    if !matches!(method, Some("GET" | "HEAD")) {
        return (
            "405 Method Not Allowed",
            "only GET and HEAD\n".into(),
            false,
        );
    }
    if path != "/metrics" {
        return (
            "404 Not Found",
            "not found: try /metrics\n".into(),
            head_only,
        );
    }
    ("200 OK", r.render(), head_only)
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// The text exposition of `sample` and the process-wide counters for database `db`.
fn render(
    db: &str,
    sample: &Sample,
    wal_bytes: u64,
    checkpoints: u64,
    generations: &BTreeMap<&'static str, u64>,
) -> String {
    let db = escape(db);
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "walship_info",
        "gauge",
        "Always 1; the labels say which walship serves the database.",
    );
    let _ = writeln!(
        o,
        "walship_info{{db=\"{db}\",version=\"{}\"}} 1",
        escape(env!("CARGO_PKG_VERSION"))
    );
    let replica_metric = |o: &mut String,
                          name: &str,
                          kind: &str,
                          help: &str,
                          v: &dyn Fn(&ReplicaSample) -> Option<String>| {
        family(o, name, kind, help);
        for r in &sample.replicas {
            if let Some(v) = v(r) {
                let _ = writeln!(
                    o,
                    "{name}{{db=\"{db}\",replica=\"{}\"}} {v}",
                    escape(&r.name)
                );
            }
        }
    };
    replica_metric(
        &mut o,
        "walship_replica_up",
        "gauge",
        "1 while the replica's last attempt succeeded, 0 while it is failing.",
        &|r| Some(u8::from(r.up).to_string()),
    );
    replica_metric(
        &mut o,
        "walship_replica_lag_seconds",
        "gauge",
        "How long the oldest commit the replica lacks has been captured; 0 when it holds everything captured.",
        &|r| r.lag_seconds.map(|l| format!("{l:.3}")),
    );
    replica_metric(
        &mut o,
        "walship_replica_txid",
        "gauge",
        "Transaction id of the last commit the replica holds (in the generation it holds).",
        &|r| r.txid.map(|t| t.to_string()),
    );
    replica_metric(
        &mut o,
        "walship_replica_last_success_timestamp_seconds",
        "gauge",
        "Unix time at which the replica last durably received a file.",
        &|r| {
            r.counters
                .last_success_ms
                .map(|ms| format!("{:.3}", ms as f64 / 1000.0))
        },
    );
    replica_metric(
        &mut o,
        "walship_replica_uploaded_bytes_total",
        "counter",
        "Bytes of spooled files the replica durably received since walship started.",
        &|r| Some(r.counters.uploaded_bytes.to_string()),
    );
    replica_metric(
        &mut o,
        "walship_replica_uploaded_files_total",
        "counter",
        "Files the replica durably received since walship started.",
        &|r| Some(r.counters.uploaded_files.to_string()),
    );
    family(
        &mut o,
        "walship_replica_errors_total",
        "counter",
        "Failed attempts to ship to the replica, by class: unavailable (unreachable, timed out), not_found, other (permission, disk full, bad data), taken_over (another instance claimed the replica).",
    );
    for r in &sample.replicas {
        for (i, kind) in ERROR_KINDS.iter().enumerate() {
            let _ = writeln!(
                o,
                "walship_replica_errors_total{{db=\"{db}\",replica=\"{}\",kind=\"{kind}\"}} {}",
                escape(&r.name),
                r.counters.errors[i]
            );
        }
    }
    let db_metric = |o: &mut String, name: &str, kind: &str, help: &str, v: Option<u64>| {
        family(o, name, kind, help);
        if let Some(v) = v {
            let _ = writeln!(o, "{name}{{db=\"{db}\"}} {v}");
        }
    };
    db_metric(
        &mut o,
        "walship_captured_txid",
        "gauge",
        "Transaction id of the last commit walship captured from the database.",
        sample.captured_txid,
    );
    db_metric(
        &mut o,
        "walship_wal_bytes",
        "gauge",
        "Size of the database's -wal file.",
        Some(wal_bytes),
    );
    db_metric(
        &mut o,
        "walship_spool_bytes",
        "gauge",
        "Bytes in walship's local spool: captured data some replica still lacks.",
        sample.spool_bytes,
    );
    db_metric(
        &mut o,
        "walship_checkpoints_total",
        "counter",
        "Checkpoints walship ran that copied the whole WAL into the database.",
        Some(checkpoints),
    );
    family(
        &mut o,
        "walship_generations_started_total",
        "counter",
        "New generations (each begins with a snapshot), by reason.",
    );
    for reason in GenerationReason::ALL.map(GenerationReason::label) {
        let n = generations.get(reason).copied().unwrap_or(0);
        let _ = writeln!(
            o,
            "walship_generations_started_total{{db=\"{db}\",reason=\"{reason}\"}} {n}"
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        Sample {
            replicas: vec![ReplicaSample {
                name: "a\"b".into(),
                txid: Some(42),
                lag_seconds: Some(1.5),
                up: false,
                counters: ReplicaCounters {
                    uploaded_bytes: 100,
                    uploaded_files: 2,
                    errors: [1, 0, 3, 0],
                    last_success_ms: Some(1_700_000_000_123),
                },
            }],
            captured_txid: Some(43),
            spool_bytes: Some(7),
        }
    }

    #[test]
    fn renders_the_exposition_format_with_escaped_labels() {
        let mut g = BTreeMap::new();
        g.insert("wal_broken", 2);
        let text = render("/x/\\y\n.db", &sample(), 9, 5, &g);
        let db = r#"db="/x/\\y\n.db""#;
        for want in [
            format!("walship_replica_txid{{{db},replica=\"a\\\"b\"}} 42"),
            format!("walship_replica_up{{{db},replica=\"a\\\"b\"}} 0"),
            format!("walship_replica_lag_seconds{{{db},replica=\"a\\\"b\"}} 1.500"),
            format!("walship_replica_errors_total{{{db},replica=\"a\\\"b\",kind=\"other\"}} 3"),
            format!(
                "walship_replica_last_success_timestamp_seconds{{{db},replica=\"a\\\"b\"}} 1700000000.123"
            ),
            format!("walship_generations_started_total{{{db},reason=\"wal_broken\"}} 2"),
            format!("walship_generations_started_total{{{db},reason=\"db_replaced\"}} 0"),
            format!("walship_checkpoints_total{{{db}}} 5"),
            format!("walship_wal_bytes{{{db}}} 9"),
        ] {
            assert!(text.lines().any(|l| l == want), "no line {want} in\n{text}");
        }
        // Every sample line belongs to a family declared just before with HELP and TYPE.
        let mut declared = Vec::new();
        for l in text.lines() {
            if let Some(r) = l.strip_prefix("# TYPE ") {
                declared.push(r.split(' ').next().unwrap_or_default().to_owned());
            } else if !l.starts_with('#') {
                let name = l.split('{').next().unwrap_or_default();
                assert_eq!(declared.last().map(String::as_str), Some(name), "{l}");
            }
        }
    }

    #[test]
    fn errors_are_counted_by_class() {
        let mut c = ReplicaCounters::default();
        let unavailable: anyhow::Error =
            BackendError::new(ErrorKind::Unavailable, "timed out").into();
        c.failed(&unavailable.context("failed to upload x"), false);
        c.failed(&anyhow::anyhow!("plain"), false);
        c.failed(&anyhow::anyhow!("claimed"), true);
        assert_eq!(c.errors, [1, 0, 1, 1]);
    }
}
