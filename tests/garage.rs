//! A real Garage cluster (S3-compatible, distributed object store) on loopback, for the S3
//! backend's conformance, end-to-end and fault tests; and the self-tests proving it works.
//!
//! [`Garage::start`] runs `n` `garage server` processes from the binary [`garage_bin`] finds,
//! each with its own config, metadata and data directories in one temp dir per cluster, its
//! own free loopback ports (RPC and S3 API) and one shared random `rpc_secret`. Node 0 connects
//! to the others, a layout giving every node 1 GB in zone `dc1` is applied, and once every node
//! reports the cluster healthy a key and a bucket (both named `walship-test`) are created; the
//! key may read, write and own the bucket. `start` returns only when a signed `HEAD` of the
//! bucket answers 200 through every node's S3 API.
//!
//! Invariants: every wait is bounded ([`WAIT`]) and panics naming what did not happen, with
//! the tail of the nodes' logs; a node is either running (its child process is held) or
//! killed and reaped; dropping a [`Garage`] SIGKILLs and reaps every node and removes the temp
//! dir. The harness talks to Garage only through its own CLI (`garage -c CONF ...`, which
//! speaks RPC to the node named by CONF) and its S3 API through `curl --aws-sigv4`; missing
//! prerequisites (the garage binary, curl) make tests fail loudly, never skip.
//!
//! What Garage 2.5.0 does here (measured by the self-tests): a 3-node cluster is ready in
//! ~1.5-2.5 s; a node uses ~25-30 MB RSS; the first PUT after a node is SIGKILLed takes either
//! ~60 ms or 7.5-8.5 s (about half the runs: node 0 notices the dead peer only when a send to
//! it fails), later ones are quick; a restarted node is not counted up by its peers until
//! they retry (every 30 s), so [`Garage::restart`] has them dial it, and the cluster is
//! healthy again in ~1.3 s; `If-None-Match: *` on PUT is ignored (the second PUT overwrites).

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The bound on every wait of the harness (a node starting, the cluster becoming healthy...).
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// The key's and the bucket's name.
const NAME: &str = "walship-test";

/// The bound on one `garage` CLI command (and one curl request).
pub(crate) const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// How many lines of a node's log a failure message quotes.
const LOG_TAIL_LINES: usize = 40;

/// The garage binary: `$WALSHIP_GARAGE` if set, else what `script/install-garage` prints
/// (it builds Garage once per machine, then only prints the cached binary's path).
pub(crate) fn garage_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("WALSHIP_GARAGE") {
            return PathBuf::from(p);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("script/install-garage");
        let out = Command::new(&script)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}); set WALSHIP_GARAGE to a garage binary to skip the build",
            script.display(),
            out.status
        );
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            Path::new(&path).is_file(),
            "{} printed {path:?}, which is not a file",
            script.display()
        );
        PathBuf::from(path)
    })
    .clone()
}

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap_or_else(|e| panic!("cannot read /dev/urandom: {e}"));
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last `lines` lines of the file at `path` (or why it cannot be read).
fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Writes the config of each of `n` nodes under `dir/node<i>/` (with free ports and one
/// shared random `rpc_secret`) and returns the nodes, not started.
fn write_configs(dir: &Path, n_nodes: usize) -> Vec<Node> {
    let secret = random_hex(32);
    let replication = n_nodes.min(3);
    // All ports are picked while every listener is still bound, so none repeats.
    let listeners: Vec<TcpListener> = (0..2 * n_nodes)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"))
        })
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .unwrap_or_else(|e| panic!("cannot read a bound listener's address: {e}"))
        })
        .collect();
    drop(listeners);
    let mut nodes = Vec::with_capacity(n_nodes);
    for i in 0..n_nodes {
        let node_dir = dir.join(format!("node{i}"));
        for sub in ["meta", "data"] {
            let d = node_dir.join(sub);
            fs::create_dir_all(&d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
        }
        let (rpc_port, s3_port) = (ports[2 * i], ports[2 * i + 1]);
        let conf = node_dir.join("garage.toml");
        let text = format!(
            "metadata_dir = \"{meta}\"\n\
             data_dir = \"{data}\"\n\
             db_engine = \"sqlite\"\n\
             replication_factor = {replication}\n\
             rpc_secret = \"{secret}\"\n\
             rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
             \n\
             [s3_api]\n\
             s3_region = \"garage\"\n\
             api_bind_addr = \"127.0.0.1:{s3_port}\"\n",
            meta = node_dir.join("meta").display(),
            data = node_dir.join("data").display(),
        );
        fs::write(&conf, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
        nodes.push(Node {
            conf,
            log: node_dir.join("garage.log"),
            rpc_port,
            s3_port,
            id: String::new(),
            child: None,
        });
    }
    nodes
}

/// One `garage server` process and its files.
struct Node {
    conf: PathBuf,
    log: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    /// `<full node id>@127.0.0.1:<rpc port>`, known once the node has started.
    id: String,
    /// `None` once killed.
    child: Option<Child>,
}

/// The cluster's state as one node's admin API reports it (`GetClusterHealth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Health {
    /// `healthy`, `degraded` or `unavailable`.
    pub status: String,
    pub connected_nodes: u64,
    pub storage_nodes: u64,
    pub storage_nodes_up: u64,
    pub partitions: u64,
    pub partitions_all_ok: u64,
}

impl Health {
    /// Every one of `n` storage nodes up and every partition fully replicated.
    fn all_ok(&self, n: usize) -> bool {
        self.status == "healthy"
            && self.storage_nodes == n as u64
            && self.storage_nodes_up == n as u64
            && self.partitions > 0
            && self.partitions_all_ok == self.partitions
    }
}

/// An S3 request's outcome as curl saw it.
#[derive(Debug)]
pub(crate) struct S3Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A running Garage cluster with a key allowed to read, write and own one bucket.
pub(crate) struct Garage {
    dir: tempfile::TempDir,
    bin: PathBuf,
    nodes: Vec<Node>,
    key_id: String,
    secret: String,
    credentials: OnceLock<PathBuf>,
}

impl Garage {
    /// Starts an `n_nodes` cluster (replication factor 3, or `n_nodes` when fewer) and waits
    /// until it is healthy and its bucket is reachable through every node.
    pub(crate) fn start(n_nodes: usize) -> Garage {
        assert!(n_nodes >= 1, "a Garage cluster needs at least one node");
        let bin = garage_bin();
        let dir = tempfile::Builder::new()
            .prefix("walship-garage-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for the Garage cluster: {e}"));
        let nodes = write_configs(dir.path(), n_nodes);
        let mut g = Garage {
            dir,
            bin,
            nodes,
            key_id: String::new(),
            secret: String::new(),
            credentials: OnceLock::new(),
        };
        for i in 0..n_nodes {
            g.spawn(i);
        }
        for i in 0..n_nodes {
            g.nodes[i].id = g.wait_node_id(i);
        }
        for i in 1..n_nodes {
            let id = g.nodes[i].id.clone();
            g.retry_cli(
                0,
                &["node", "connect", &id],
                &format!("node 0 connects to node {i}"),
            );
        }
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        let ids: Vec<String> = g.nodes.iter().map(|n| n.id_hex().to_owned()).collect();
        assign.extend(ids.iter().map(String::as_str));
        g.cli(&assign);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.wait_healthy();
        g.create_key_and_bucket();
        for i in 0..n_nodes {
            g.wait_bucket_reachable(i);
        }
        g
    }

    /// `http://127.0.0.1:PORT` of node `i`'s S3 API.
    pub(crate) fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// The S3 region every node answers for.
    pub(crate) fn region(&self) -> &'static str {
        "garage"
    }

    pub(crate) fn bucket(&self) -> &'static str {
        NAME
    }

    pub(crate) fn key_id(&self) -> &str {
        &self.key_id
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    /// How many nodes the cluster has (running or killed).
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The cluster's temp dir (node `i`'s files are under `node<i>/`).
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A file (mode 0600, in the temp dir, written on first call) holding the key as
    /// walship's S3 credentials file format wants it.
    pub(crate) fn credentials_file(&self) -> PathBuf {
        self.credentials
            .get_or_init(|| {
                let path = self.dir.path().join("s3-credentials");
                let text = format!(
                    "access-key-id = \"{}\"\nsecret-access-key = \"{}\"\n",
                    self.key_id, self.secret
                );
                fs::write(&path, text)
                    .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o600)))
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
                path
            })
            .clone()
    }

    /// Runs `garage ARGS` against node 0 and returns its stdout; panics with the output and
    /// node 0's log if it fails.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        self.cli_on(0, args)
    }

    /// Runs `garage ARGS` against node `i` and returns its stdout, or panics.
    pub(crate) fn cli_on(&self, i: usize, args: &[&str]) -> String {
        let out = self.run_cli(i, args);
        if !out.status.success() {
            panic!(
                "`garage {}` against node {i} failed ({}; 137: killed after {CLI_TIMEOUT:?}):\n{}{}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(i)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The cluster's health as node `i` sees it.
    pub(crate) fn health(&self, i: usize) -> Health {
        let out = self.cli_on(i, &["json-api", "GetClusterHealth"]);
        parse_health(&out).unwrap_or_else(|e| {
            panic!("cannot parse `garage json-api GetClusterHealth` output ({e}):\n{out}")
        })
    }

    /// Whether node `i` is running (not killed).
    pub(crate) fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Node `i`'s process id (panics if it was killed).
    pub(crate) fn pid(&self, i: usize) -> u32 {
        self.nodes[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("garage node {i} is not running"))
            .id()
    }

    /// Node `i`'s resident memory in KiB (`VmRSS` of /proc/PID/status).
    pub(crate) fn rss_kib(&self, i: usize) -> u64 {
        let path = format!("/proc/{}/status", self.pid(i));
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        text.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS line in {path}:\n{text}"))
    }

    /// SIGKILLs node `i` and reaps it.
    pub(crate) fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("garage node {i} is already killed"));
        kill_child(&mut child);
    }

    /// Starts node `i` again (same config, ports and data) and waits until every node sees
    /// the cluster healthy again and node `i`'s S3 API serves the bucket.
    pub(crate) fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "garage node {i} is still running");
        self.spawn(i);
        let id = self.wait_node_id(i);
        assert_eq!(
            id, self.nodes[i].id,
            "garage node {i} changed identity on restart"
        );
        // Left alone, a node retries a lost peer every 30 s (and gives up after 10 tries), and
        // does not count the peer up on the peer's own reconnection: each running node is
        // told to dial the restarted one, as an operator would, so tests stay short.
        for j in (0..self.nodes.len()).filter(|&j| j != i && self.is_running(j)) {
            self.retry_cli(
                j,
                &["node", "connect", &id],
                &format!("node {j} connects to restarted node {i}"),
            );
        }
        if (0..self.nodes.len()).all(|j| self.is_running(j)) {
            self.wait_healthy();
        } else {
            self.wait_up();
        }
        self.wait_bucket_reachable(i);
    }

    /// Waits until every node reports all nodes up and every partition fully replicated
    /// (every node must be running).
    pub(crate) fn wait_healthy(&self) {
        let n = self.nodes.len();
        let running: Vec<usize> = (0..n).filter(|&i| self.is_running(i)).collect();
        assert_eq!(
            running.len(),
            n,
            "wait_healthy with a killed node: restart it first"
        );
        self.wait_health(&running, "healthy", |h| h.all_ok(n));
    }

    /// Waits until every running node sees exactly the running nodes up (some are killed, so
    /// partitions cannot all be fully replicated).
    fn wait_up(&self) {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .collect();
        let up = running.len() as u64;
        self.wait_health(&running, &format!("{up} nodes up"), |h| {
            h.storage_nodes_up == up
        });
    }

    /// Polls the health every node of `running` reports until `ok` holds for all of them.
    fn wait_health(&self, running: &[usize], what: &str, ok: impl Fn(&Health) -> bool) {
        let mut last = String::new();
        let done = self.poll(WAIT, || {
            for &i in running {
                self.check_alive(i);
                let out = self.run_cli(i, &["json-api", "GetClusterHealth"]);
                let health = match out.status.success() {
                    true => parse_health(&String::from_utf8_lossy(&out.stdout)),
                    false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
                };
                match health {
                    Ok(h) if ok(&h) => {}
                    Ok(h) => {
                        last = format!("node {i} reports {h:?}");
                        return false;
                    }
                    Err(e) => {
                        last = format!("node {i}: {e}");
                        return false;
                    }
                }
            }
            true
        });
        if !done {
            panic!(
                "the Garage cluster did not become {what} within {WAIT:?}; last: {last}\n{}",
                self.all_log_tails()
            );
        }
    }

    /// Sends one signed S3 request through node `i`: `METHOD /bucket/KEY` (`key` may carry a
    /// query string; `""` addresses the bucket), with `body` and extra `headers`
    /// (`"Name: value"`). Panics only if curl itself cannot run or reach the node.
    pub(crate) fn s3(
        &self,
        i: usize,
        method: &str,
        key: &str,
        body: Option<&[u8]>,
        headers: &[&str],
    ) -> S3Reply {
        self.s3_as(i, (&self.key_id, &self.secret), method, key, body, headers)
    }

    /// [`Garage::s3`] signed with another `(key id, secret)`.
    pub(crate) fn s3_as(
        &self,
        i: usize,
        (key_id, secret): (&str, &str),
        method: &str,
        key: &str,
        body: Option<&[u8]>,
        headers: &[&str],
    ) -> S3Reply {
        let url = format!("{}/{}/{}", self.endpoint(i), NAME, key);
        let scratch = tempfile::Builder::new()
            .prefix("curl-")
            .tempdir_in(self.dir.path())
            .unwrap_or_else(|e| panic!("cannot create a scratch dir for curl: {e}"));
        let out_file = scratch.path().join("body");
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time"])
            .arg(CLI_TIMEOUT.as_secs().to_string())
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", self.region()))
            .arg("--user")
            .arg(format!("{key_id}:{secret}"))
            .arg("-o")
            .arg(&out_file)
            .args(["-w", "%{http_code}"]);
        match method {
            "HEAD" => cmd.arg("-I"),
            m => cmd.args(["-X", m]),
        };
        for h in headers {
            cmd.args(["-H", h]);
        }
        // Garage requires the payload's hash; curl signs the header as given.
        let hash = sha256_hex(body.unwrap_or_default());
        cmd.arg("-H").arg(format!("x-amz-content-sha256: {hash}"));
        if let Some(body) = body {
            let in_file = scratch.path().join("upload");
            fs::write(&in_file, body)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", in_file.display()));
            cmd.args(["-H", "Content-Type: application/octet-stream"])
                .arg("--data-binary")
                .arg(format!("@{}", in_file.display()));
        }
        cmd.arg(&url);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run curl (install it: script/setup): {e}"));
        let code = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {method} {url} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(i)
        );
        let status = code
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl {method} {url}: not an HTTP status: {code:?}"));
        S3Reply {
            status,
            body: fs::read(&out_file).unwrap_or_default(),
        }
    }

    /// `PUT` of `body` at `key` through node `i`; panics unless Garage answers 200.
    pub(crate) fn put(&self, i: usize, key: &str, body: &[u8]) {
        let r = self.s3(i, "PUT", key, Some(body), &[]);
        assert_eq!(
            r.status,
            200,
            "PUT {key} through node {i}: {}\n{}",
            String::from_utf8_lossy(&r.body),
            self.log_tail(i)
        );
    }

    /// `GET` of `key` through node `i`; panics unless Garage answers 200.
    pub(crate) fn get(&self, i: usize, key: &str) -> Vec<u8> {
        let r = self.s3(i, "GET", key, None, &[]);
        assert_eq!(
            r.status,
            200,
            "GET {key} through node {i}: {}\n{}",
            String::from_utf8_lossy(&r.body),
            self.log_tail(i)
        );
        r.body
    }

    /// The tail of node `i`'s log, headed by its path.
    pub(crate) fn log_tail(&self, i: usize) -> String {
        let log = &self.nodes[i].log;
        format!(
            "---- garage node {i} log ({}), last {LOG_TAIL_LINES} lines ----\n{}",
            log.display(),
            tail(log, LOG_TAIL_LINES)
        )
    }

    fn all_log_tails(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.log_tail(i))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Creates the key and the bucket (both named [`NAME`]); the key may read, write, own it.
    fn create_key_and_bucket(&mut self) {
        let created = self.cli(&["key", "create", NAME]);
        self.key_id = table_value(&created, "Key ID:")
            .unwrap_or_else(|| panic!("no 'Key ID:' in `garage key create` output:\n{created}"));
        self.secret = table_value(&created, "Secret key:").unwrap_or_else(|| {
            panic!("no 'Secret key:' in `garage key create` output:\n{created}")
        });
        assert!(
            self.key_id.starts_with("GK") && !self.secret.is_empty() && self.secret != "(redacted)",
            "unexpected key in `garage key create` output:\n{created}"
        );
        self.cli(&["bucket", "create", NAME]);
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", NAME, "--key", NAME,
        ]);
    }

    /// Starts node `i`'s `garage server`, output appended to its log.
    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", node.log.display()));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate {}: {e}", node.log.display()));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&node.conf)
            .arg("server")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        // The node dies with the thread that started it, so that a cluster shared by a whole
        // test binary (never dropped) does not outlive it.
        // SAFETY: prctl(2) is async-signal-safe, as code between fork and exec must be.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} server: {e}", self.bin.display()));
        self.nodes[i].child = Some(child);
    }

    /// Panics with node `i`'s log if its process has exited.
    fn check_alive(&self, i: usize) {
        let Some(child) = self.nodes[i].child.as_ref() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        // A zombie still answers signal 0; its state in /proc tells it apart.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if kill(pid, None).is_err() || state == Some("Z") {
            panic!("garage node {i} exited\n{}", self.log_tail(i));
        }
    }

    /// Waits until node `i` answers RPC and returns its `<id>@127.0.0.1:<port>`.
    fn wait_node_id(&self, i: usize) -> String {
        let mut id = String::new();
        let mut last = String::new();
        let ok = self.poll(WAIT, || {
            self.check_alive(i);
            let out = self.run_cli(i, &["node", "id", "-q"]);
            if !out.status.success() {
                last = String::from_utf8_lossy(&out.stderr).into_owned();
                return false;
            }
            id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            // The key file exists before the node listens: ask the node itself over RPC.
            let out = self.run_cli(i, &["json-api", "GetClusterHealth"]);
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            out.status.success()
        });
        if !ok {
            panic!(
                "garage node {i} did not answer RPC within {WAIT:?}; last error: {last}\n{}",
                self.log_tail(i)
            );
        }
        assert!(
            id.ends_with(&format!("@127.0.0.1:{}", self.nodes[i].rpc_port)),
            "unexpected `garage node id -q` output for node {i}: {id:?}"
        );
        id
    }

    /// Runs `garage ARGS` against node `from` until it succeeds (bounded).
    fn retry_cli(&self, from: usize, args: &[&str], what: &str) -> String {
        let mut last = String::new();
        let mut stdout = String::new();
        let ok = self.poll(WAIT, || {
            let out = self.run_cli(from, args);
            stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            last = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
            out.status.success()
        });
        if !ok {
            panic!(
                "{what}: `garage {}` kept failing for {WAIT:?}; last: {last}\n{}",
                args.join(" "),
                self.all_log_tails()
            );
        }
        stdout
    }

    /// Waits until a signed `HEAD` of the bucket through node `i` answers 200.
    fn wait_bucket_reachable(&self, i: usize) {
        let mut last = 0;
        let ok = self.poll(WAIT, || {
            last = self.s3(i, "HEAD", "", None, &[]).status;
            last == 200
        });
        if !ok {
            panic!(
                "bucket {NAME} not reachable through node {i}'s S3 API ({}) within {WAIT:?}: \
                 HEAD answered {last}\n{}",
                self.endpoint(i),
                self.log_tail(i)
            );
        }
    }

    /// Runs `garage -c CONF(i) ARGS`, killed after [`CLI_TIMEOUT`] (a stopped node accepts
    /// connections and never answers) with exit status 137.
    fn run_cli(&self, i: usize, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-s", "KILL"])
            .arg(format!("{}s", CLI_TIMEOUT.as_secs()))
            .arg(&self.bin)
            .arg("-c")
            .arg(&self.nodes[i].conf)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run timeout {}: {e}", self.bin.display()))
    }

    /// Calls `f` every 100 ms until it returns true (then true) or `timeout` passes (false).
    fn poll(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Node {
    /// The full hexadecimal node id (without the address).
    fn id_hex(&self) -> &str {
        self.id.split('@').next().unwrap_or(&self.id)
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                kill_child(&mut child);
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.all_log_tails());
        }
    }
}

fn kill_child(child: &mut Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.wait();
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value after `label` on the line of a `garage` table that starts with it.
fn table_value(output: &str, label: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Parses `garage json-api GetClusterHealth` output.
fn parse_health(json: &str) -> Result<Health, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let num = |f: &str| {
        v.get(f)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("no number {f}"))
    };
    Ok(Health {
        status: v
            .get("status")
            .and_then(serde_json::Value::as_str)
            .ok_or("no status")?
            .to_owned(),
        connected_nodes: num("connectedNodes")?,
        storage_nodes: num("storageNodes")?,
        storage_nodes_up: num("storageNodesUp")?,
        partitions: num("partitions")?,
        partitions_all_ok: num("partitionsAllOk")?,
    })
}

/// Bytes no two tests share, so a stale or misrouted object cannot pass for the right one.
fn payload(tag: &str, len: usize) -> Vec<u8> {
    let seed = format!("{tag}-{}", random_hex(16));
    seed.bytes().cycle().take(len).collect()
}

#[test]
fn garage_put_through_one_node_get_through_another() {
    let t0 = Instant::now();
    let g = Garage::start(3);
    eprintln!("garage: 3-node cluster started in {:?}", t0.elapsed());
    for i in 0..3 {
        eprintln!("garage: node {i} rss {} KiB", g.rss_kib(i));
    }
    let body = payload("cross-node", 300_000);
    g.put(0, "dir/object.bin", &body);
    assert_eq!(g.get(2, "dir/object.bin"), body, "GET through node 2");
    let missing = g.s3(2, "GET", "dir/absent.bin", None, &[]);
    assert_eq!(missing.status, 404, "GET of an absent key through node 2");
    let creds = fs::read_to_string(g.credentials_file()).expect("read the credentials file");
    assert_eq!(
        creds,
        format!(
            "access-key-id = \"{}\"\nsecret-access-key = \"{}\"\n",
            g.key_id(),
            g.secret()
        )
    );
    // A request signed with another secret must be refused, or nothing above proved signing.
    let wrong = "0".repeat(g.secret().len());
    let refused = g.s3_as(0, (g.key_id(), &wrong), "GET", "dir/object.bin", None, &[]);
    assert_eq!(refused.status, 403, "GET with a wrong secret");
}

#[test]
fn garage_survives_one_node_down_and_heals_after_restart() {
    let mut g = Garage::start(3);
    let before = payload("before", 10_000);
    g.put(0, "before.bin", &before);

    g.kill(1);
    // Right away: node 0 may still believe node 1 up (this PUT then takes ~8 s), and must
    // settle for 2 of 3 writes.
    let during = payload("during", 10_000);
    let t0 = Instant::now();
    g.put(0, "during.bin", &during);
    eprintln!(
        "garage: PUT right after a node's death took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        g.get(2, "during.bin"),
        during,
        "GET through node 2, node 1 just killed"
    );
    assert_eq!(
        g.get(2, "before.bin"),
        before,
        "GET through node 2, node 1 just killed"
    );

    // Node 0 must notice (it takes a few seconds): proves the health checks below are real.
    let t0 = Instant::now();
    let ok = g.poll(WAIT, || g.health(0).storage_nodes_up == 2);
    assert!(ok, "node 0 never saw node 1 down: {:?}", g.health(0));
    eprintln!("garage: node 0 saw node 1 down after {:?}", t0.elapsed());
    let degraded = g.health(0);
    assert_eq!(degraded.status, "degraded", "{degraded:?}");
    let (healthy, status) = healthy_section(&g);
    assert!(
        !healthy.contains(&g.nodes[1].id_hex()[..16]),
        "killed node 1 among the healthy nodes of `garage status`:\n{status}"
    );
    let known_down = payload("known-down", 10_000);
    g.put(0, "known-down.bin", &known_down);
    assert_eq!(
        g.get(2, "known-down.bin"),
        known_down,
        "GET through node 2, node 1 down"
    );

    let t0 = Instant::now();
    g.restart(1);
    eprintln!(
        "garage: node 1 restarted and cluster healthy in {:?}",
        t0.elapsed()
    );
    for i in 0..3 {
        let h = g.health(i);
        assert!(h.all_ok(3), "node {i} after the restart: {h:?}");
    }
    let (healthy, status) = healthy_section(&g);
    for (i, node) in g.nodes.iter().enumerate() {
        let short = &node.id_hex()[..16];
        assert!(
            healthy.contains(short),
            "node {i} ({short}) not among the healthy nodes of `garage status`:\n{status}"
        );
    }
    assert_eq!(
        g.get(1, "during.bin"),
        during,
        "GET through the restarted node"
    );
}

/// The HEALTHY NODES section of `garage status` (against node 0), and the whole output.
fn healthy_section(g: &Garage) -> (String, String) {
    let status = g.cli(&["status"]);
    let healthy = status
        .split("==== HEALTHY NODES ====")
        .nth(1)
        .unwrap_or_else(|| panic!("no HEALTHY NODES section in `garage status`:\n{status}"));
    let healthy = healthy.split("====").next().unwrap_or(healthy).to_owned();
    (healthy, status)
}

/// Garage 2.5.0 ignores `If-None-Match: *` on PUT: the second PUT overwrites (200, not 412).
/// walship does not rely on conditional PUTs; this pins down what Garage does so that a
/// change of behaviour is noticed.
#[test]
fn garage_put_ignores_if_none_match() {
    let g = Garage::start(3);
    let first = payload("first", 1000);
    let second = payload("second", 1000);
    let r1 = g.s3(0, "PUT", "once.bin", Some(&first), &["If-None-Match: *"]);
    assert_eq!(
        r1.status,
        200,
        "first PUT: {}",
        String::from_utf8_lossy(&r1.body)
    );
    let r2 = g.s3(0, "PUT", "once.bin", Some(&second), &["If-None-Match: *"]);
    assert_eq!(
        r2.status,
        200,
        "second PUT: {}",
        String::from_utf8_lossy(&r2.body)
    );
    assert_eq!(
        g.get(1, "once.bin"),
        second,
        "the second PUT overwrote the first"
    );
}
