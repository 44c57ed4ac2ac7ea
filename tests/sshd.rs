//! A real OpenSSH server for tests: `/usr/sbin/sshd -D -e -f <own config>` on a free loopback
//! port, with its own ed25519 host key and the ALPHA layout built the way the
//! `walship-replicator` package builds it (`systemd-sysusers` and `systemd-tmpfiles --create` on
//! the repository's own files, and the repository's sshd drop-in `Include`d verbatim).
//!
//! Invariants: the machine's own sshd, its configuration and port 22 are never touched. The
//! one substitution: `AuthorizedKeysFile` points at a root-owned per-harness directory under
//! `/run/walship-test-sshd/` instead of the machine's `/etc/ssh/authorized_keys_replicator`
//! (sshd's StrictModes refuses world-writable parents such as `/tmp`); it is set in a
//! `Match User replicator` block placed before the `Include`, and sshd keeps the first value it
//! obtains. The account and the chroot directories are left in place (as the package leaves
//! them); everything else the harness created (processes, keys, config, authorized keys) is
//! removed on drop. Missing prerequisites (root, sshd, ssh-keygen, systemd-sysusers) make tests
//! fail loudly, never skip.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use walship::backend::sftp::{SftpBackend, SftpOptions};
use walship::url::SftpUrl;

/// The chroot's writable directory as seen from the host.
pub const DB_DIR: &str = "/var/data/replicator/db";

static LAYOUT: Once = Once::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates the replicator account and chroot as the package does (once per test binary).
fn layout() {
    LAYOUT.call_once(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the sshd tests must run as root (they create the replicator account and chroot)"
        );
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "/usr/sbin/sshd is missing: install openssh-server"
        );
        run(Command::new("systemd-sysusers")
            .arg(repo().join("sysusers.d/walship-replicator.conf")));
        run(Command::new("systemd-tmpfiles")
            .arg("--create")
            .arg(repo().join("tmpfiles.d/walship-replicator.conf")));
        // sshd's privilege-separation directory (Debian's service creates it at boot).
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
    });
}

/// Generates an OpenSSH key pair at `path` (`path.pub` for the public half).
pub fn keygen(path: &Path, kind: &str, passphrase: &str) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args([
        "-q",
        "-t",
        kind,
        "-N",
        passphrase,
        "-C",
        "walship-test",
        "-f",
    ])
    .arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    run(&mut cmd);
}

/// `ssh-keygen -lf <pub>`'s SHA256 fingerprint.
pub fn fingerprint(pubkey: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pubkey)
        .output()
        .expect("ssh-keygen -lf");
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    s.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no fingerprint in {s:?}"))
        .to_owned()
}

/// A running test sshd.
pub struct Sshd {
    /// The port it listens on.
    pub port: u16,
    /// The address it listens on: 127.0.0.1, or its namespace's end of the link.
    pub addr: String,
    /// The network namespace it runs in ([`Sshd::start_in_netns`]), removed after sshd.
    /// Holds config, keys, known_hosts and the log.
    pub dir: tempfile::TempDir,
    /// The client private key authorized for `replicator`.
    pub client_key: PathBuf,
    /// A known_hosts file that trusts this server's host key.
    pub known_hosts: PathBuf,
    /// The server's public host key.
    pub host_pub: PathBuf,
    /// Root-owned directory holding `authorized_keys_replicator`.
    auth_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
    pub netns: Option<crate::netns::Netns>,
}

impl Sshd {
    /// Starts sshd on a free loopback port; panics with sshd's log if it does not come up.
    pub fn start() -> Sshd {
        Sshd::start_at(None)
    }

    /// Starts sshd inside a network namespace of its own (ALPHA behind a veth link the test
    /// can cut, blackhole, make lossy or slow through [`Sshd::netns`]).
    pub fn start_in_netns() -> Sshd {
        Sshd::start_at(Some(crate::netns::Netns::new()))
    }

    fn start_at(netns: Option<crate::netns::Netns>) -> Sshd {
        layout();
        let addr = netns
            .as_ref()
            .map_or_else(|| "127.0.0.1".to_owned(), |n| n.ns_ip.clone());
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        keygen(&d.join("host_ed25519"), "ed25519", "");
        keygen(&d.join("client_ed25519"), "ed25519", "");
        let auth_dir = PathBuf::from(format!(
            "/run/walship-test-sshd/{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&auth_dir).expect("create authorized keys dir");
        for p in [Path::new("/run/walship-test-sshd"), auth_dir.as_path()] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = d.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {addr}\nHostKey {host}\nPidFile none\nUsePAM yes\n\
                 LogLevel VERBOSE\nSubsystem sftp internal-sftp\nMaxStartups 100\n\
                 Match User replicator\n\tAuthorizedKeysFile {auth}/authorized_keys_%u\n\
                 Include {dropin}\n",
                host = d.join("host_ed25519").display(),
                auth = auth_dir.display(),
                dropin = repo()
                    .join("packaging/sshd_config.d/walship-replicator.conf")
                    .display(),
            ),
        )
        .expect("write sshd_config");
        let known_hosts = d.join("known_hosts");
        let host_pub = d.join("host_ed25519.pub");
        let pubkey = fs::read_to_string(&host_pub).expect("host pub");
        let mut it = pubkey.split_whitespace();
        let (t, b) = (it.next().expect("type"), it.next().expect("blob"));
        fs::write(&known_hosts, format!("[{addr}]:{port} {t} {b}\n")).expect("known_hosts");
        let s = Sshd {
            port,
            addr,
            netns,
            client_key: d.join("client_ed25519"),
            known_hosts,
            host_pub,
            log: d.join("sshd.log"),
            dir,
            auth_dir,
            config,
            child: Mutex::new(None),
        };
        s.authorize(&s.client_key.with_extension("pub"));
        s.spawn();
        s
    }

    /// Adds a public key to `replicator`'s authorized keys.
    pub fn authorize(&self, pubkey: &Path) {
        let p = self.auth_dir.join("authorized_keys_replicator");
        let mut text = fs::read_to_string(&p).unwrap_or_default();
        text.push_str(&fs::read_to_string(pubkey).expect("read pub key"));
        fs::write(&p, text).expect("write authorized keys");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    fn spawn(&self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("sshd log");
        let mut cmd = match &self.netns {
            // `ip netns exec` execs sshd: the child's pid is sshd's.
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.name, "/usr/sbin/sshd"]);
                c
            }
            None => Command::new("/usr/sbin/sshd"),
        };
        let child = cmd
            .args(["-D", "-e", "-f"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn /usr/sbin/sshd");
        *self.child.lock().expect("lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect((self.addr.as_str(), self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).is_ok() && &b == b"SSH-" {
                    return;
                }
            }
            if let Some(st) = self
                .child
                .lock()
                .expect("lock")
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("sshd exited ({st}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not come up: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// sshd's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The listener and every process it forked (connection children call setsid, so a
    /// process-group signal would miss them).
    pub fn tree(&self) -> Vec<Pid> {
        let Some(root) = self.child.lock().expect("lock").as_ref().map(Child::id) else {
            return Vec::new();
        };
        let mut parent: HashMap<u32, u32> = HashMap::new();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'.
            if let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse().ok())
            {
                parent.insert(pid, ppid);
            }
        }
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            let p = out[i];
            out.extend(parent.iter().filter(|(_, &pp)| pp == p).map(|(&c, _)| c));
            i += 1;
        }
        out.into_iter().map(|p| Pid::from_raw(p as i32)).collect()
    }

    fn signal(&self, sig: Signal) {
        for p in self.tree() {
            let _ = kill(p, sig);
        }
    }

    /// SIGKILLs sshd and all its session processes.
    pub fn kill(&self) {
        self.signal(Signal::SIGKILL);
        if let Some(mut c) = self.child.lock().expect("lock").take() {
            let _ = c.wait();
        }
    }

    /// Freezes sshd and its sessions (SIGSTOP): connections stay open but nothing answers.
    pub fn stop(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Thaws a stopped sshd (SIGCONT).
    pub fn cont(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// Kills sshd and starts it again on the same port with the same keys.
    pub fn restart(&self) {
        self.kill();
        self.spawn();
    }

    /// `sftp://replicator@127.0.0.1:<port>/<path>`.
    pub fn url(&self, path: &str) -> SftpUrl {
        SftpUrl::parse(&format!(
            "sftp://replicator@{}:{}/{path}",
            self.addr, self.port
        ))
        .expect("test URL")
    }

    /// Options for `path` with the harness's client key and known_hosts.
    pub fn options(&self, path: &str, timeout: Duration) -> SftpOptions {
        let mut o = SftpOptions::new(self.url(path), &self.client_key, &self.known_hosts);
        o.timeout = timeout;
        o
    }

    /// A target at `path` with a 5 s timeout.
    pub fn target(&self, path: &str) -> SftpBackend {
        SftpBackend::new(self.options(path, Duration::from_secs(5)))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.cont();
        self.kill();
        let _ = fs::remove_dir_all(&self.auth_dir);
    }
}

/// A unique directory `db/<name>-<pid>` in the chroot, removed (from the host side) on drop.
pub struct TestDir {
    /// The path as the server sees it, e.g. `db/conformance-1234`.
    pub remote: String,
    /// The same directory on this machine.
    pub local: PathBuf,
}

impl TestDir {
    /// Reserves `db/<name>-<pid>` (removing leftovers of an earlier run with the same pid).
    pub fn new(name: &str) -> TestDir {
        layout();
        let leaf = format!("{name}-{}", std::process::id());
        let local = Path::new(DB_DIR).join(&leaf);
        let _ = fs::remove_dir_all(&local);
        TestDir {
            remote: format!("db/{leaf}"),
            local,
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.local);
    }
}
