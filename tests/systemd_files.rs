//! The operating-system files, checked with the real tools: the unit with `systemd-analyze`
//! (verify and security), sysusers.d and tmpfiles.d with `systemd-sysusers`/`systemd-tmpfiles`
//! into a scratch root, and the sshd drop-in with `sshd -t`/`sshd -T` under Debian's and
//! Fedora's default `sshd_config` layouts.
//!
//! Invariant: a missing tool fails the test loudly, naming the Debian package to install; no
//! test touches the host's configuration (only `/run/sshd`, which sshd itself insists on, is
//! created if missing).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A file of this repository.
fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Finds `name` on `PATH` or in the sbin directories, or fails naming the Debian package.
pub fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: install the Debian package `{package}`"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A scratch root for `systemd-analyze --root`: the host's own system units (for the targets the
/// unit depends on), a stand-in `/usr/bin/walship`, and our unit under `/etc/systemd/system`.
pub fn analyze_root(drop_in: Option<&str>) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists())
        .expect("the host's systemd units: install the Debian package `systemd`");
    fs::create_dir_all(r.join("usr/lib/systemd")).expect("mkdir");
    run(Command::new("cp")
        .arg("-a")
        .arg(host_units)
        .arg(r.join("usr/lib/systemd/system")));
    fs::create_dir_all(r.join("usr/bin")).expect("mkdir");
    let bin = r.join("usr/bin/walship");
    fs::write(&bin, "#!/bin/sh\nexit 0\n").expect("stand-in binary");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod");
    let etc = r.join("etc/systemd/system");
    fs::create_dir_all(&etc).expect("mkdir");
    fs::copy(
        repo("systemd/walship@.service"),
        etc.join("walship@.service"),
    )
    .expect("copy unit");
    if let Some(text) = drop_in {
        let d = etc.join("walship@test.service.d");
        fs::create_dir_all(&d).expect("mkdir");
        fs::write(d.join(walship::generator::DROP_IN_NAME), text).expect("drop-in");
    }
    root
}

/// `systemd-analyze verify`: exits 0 even on unknown keys, so any output is a failure.
pub fn verify(root: &Path) {
    let sa = tool("systemd-analyze", "systemd");
    let out = run(Command::new(sa)
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg("walship@test.service"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}

/// The overall exposure `systemd-analyze security --offline=true` reports.
fn exposure(args: &[&str]) -> f64 {
    let sa = tool("systemd-analyze", "systemd");
    let out = run(Command::new(sa)
        .args(["security", "--offline=true"])
        .args(args));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line in:\n{text}"));
    line.rsplit_once(": ")
        .and_then(|(_, v)| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse exposure from {line:?}"))
}

#[test]
fn unit_verifies_without_a_word() {
    let root = analyze_root(None);
    verify(root.path());
}

#[test]
fn unit_exposure_is_at_most_2() {
    let unit = repo("systemd/walship@.service");
    let e = exposure(&[unit.to_str().expect("utf-8 path")]);
    assert!(e <= 2.0, "exposure {e} > 2.0");
}

#[test]
fn unit_with_generated_drop_in_verifies_and_stays_confined() {
    let t = crate::generator::Tree::new();
    let (text, _) = crate::generator::generated_drop_in(&t);
    let root = analyze_root(Some(&text));
    verify(root.path());
    let e = exposure(&[
        &format!("--root={}", root.path().display()),
        "walship@test.service",
    ]);
    assert!(e <= 2.0, "exposure {e} > 2.0 with {text}");
}

/// `name:x:uid:gid:gecos:home:shell` from `<root>/etc/passwd`.
fn passwd_entry(root: &Path, name: &str) -> Vec<String> {
    let passwd = fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    passwd
        .lines()
        .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
        .find(|f| f[0] == name)
        .unwrap_or_else(|| panic!("no {name} in passwd:\n{passwd}"))
}

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn alpha_sysusers_and_tmpfiles_make_the_replicator_chroot() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    fs::create_dir(r.join("etc")).expect("mkdir");
    run(Command::new(tool("systemd-sysusers", "systemd"))
        .arg(format!("--root={}", r.display()))
        .arg(repo("sysusers.d/walship-replicator.conf")));
    let user = passwd_entry(r, "replicator");
    let (uid, gid): (u32, u32) = (user[2].parse().expect("uid"), user[3].parse().expect("gid"));
    assert!(uid > 0 && uid < 1000, "a system uid: {user:?}");
    assert_eq!(user[5], "/var/data/replicator");
    assert_eq!(user[6], "/usr/sbin/nologin");
    let group = fs::read_to_string(r.join("etc/group")).expect("group");
    assert!(
        group
            .lines()
            .any(|l| l.starts_with(&format!("replicator:x:{gid}:"))),
        "{group}"
    );
    let shadow = fs::read_to_string(r.join("etc/shadow")).expect("shadow");
    assert!(
        shadow.lines().any(|l| l.starts_with("replicator:!")),
        "locked: {shadow}"
    );

    run(Command::new(tool("systemd-tmpfiles", "systemd"))
        .arg(format!("--root={}", r.display()))
        .arg("--create")
        .arg(repo("tmpfiles.d/walship-replicator.conf")));
    assert_eq!(mode_owner(&r.join("var/data")), (0o755, 0, 0));
    assert_eq!(mode_owner(&r.join("var/data/replicator")), (0o755, 0, 0));
    assert_eq!(
        mode_owner(&r.join("var/data/replicator/db")),
        (0o700, uid, gid)
    );
    let keys = r.join("etc/ssh/authorized_keys_replicator");
    assert_eq!(mode_owner(&keys), (0o644, 0, 0));
    assert_eq!(fs::metadata(&keys).expect("keys").len(), 0);

    // Filled by the admin: a second run never truncates it.
    fs::write(&keys, "ssh-ed25519 AAAA test\n").expect("fill");
    run(Command::new(tool("systemd-tmpfiles", "systemd"))
        .arg(format!("--root={}", r.display()))
        .arg("--create")
        .arg(repo("tmpfiles.d/walship-replicator.conf")));
    assert_eq!(
        fs::read_to_string(&keys).expect("keys"),
        "ssh-ed25519 AAAA test\n"
    );
}

#[test]
fn bravo_tmpfiles_make_state_and_config_dirs_and_lock_keys() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    // The database host needs no account (instances run as their database's owner).
    assert!(!repo("sysusers.d/walship.conf").exists());
    fs::create_dir_all(r.join("etc/walship")).expect("mkdir");
    let key = r.join("etc/walship/replicator.key");
    let conf = r.join("etc/walship/fruits.toml");
    fs::write(&key, "secret").expect("key");
    fs::write(&conf, "db = \"/x\"").expect("config");
    for f in [&key, &conf] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    run(Command::new(tool("systemd-tmpfiles", "systemd"))
        .arg(format!("--root={}", r.display()))
        .arg("--create")
        .arg(repo("tmpfiles.d/walship.conf")));
    assert_eq!(mode_owner(&r.join("var/lib/walship")), (0o755, 0, 0));
    assert_eq!(mode_owner(&r.join("etc/walship")), (0o755, 0, 0));
    assert_eq!(mode_owner(&key), (0o600, 0, 0));
    assert_eq!(mode_owner(&conf).0, 0o644, "configs stay readable");
}

/// Debian 12's `/etc/ssh/sshd_config`, minus comments: the Include comes first, then directives
/// that must keep applying to everyone (`X11Forwarding yes` is the leak probe: a Match block
/// leaking out of the drop-in would swallow it).
const DEBIAN_MAIN: &str = "Include {D}/*.conf\n\
KbdInteractiveAuthentication no\n\
UsePAM yes\n\
X11Forwarding yes\n\
PrintMotd no\n\
AcceptEnv LANG LC_*\n\
Subsystem\tsftp\t/usr/lib/openssh/sftp-server\n\
MaxAuthTries 4\n";

/// Fedora's layout: comments, the Include near the top, its own settings after it (with
/// `AuthorizedKeysFile` as the leak probe), no active Match block; the distribution's settings
/// in `50-redhat.conf`, which sorts before our drop-in.
const FEDORA_MAIN: &str = "# $OpenBSD: sshd_config,v 1.104 2021/07/02 05:11:21 dtucker Exp $\n\
# To modify the system-wide sshd configuration, create a  *.conf  file under\n\
#  /etc/ssh/sshd_config.d/  which will be automatically included below\n\
Include {D}/*.conf\n\
#Port 22\n\
AuthorizedKeysFile\t.ssh/authorized_keys\n\
Subsystem\tsftp\t/usr/libexec/openssh/sftp-server\n\
MaxAuthTries 4\n\
# Example of overriding settings on a per-user basis\n\
#Match User anoncvs\n\
#\tX11Forwarding no\n";

const FEDORA_REDHAT: &str = "SyslogFacility AUTHPRIV\n\
KbdInteractiveAuthentication no\n\
GSSAPIAuthentication yes\n\
GSSAPICleanupCredentials no\n\
UsePAM yes\n\
X11Forwarding yes\n\
PrintMotd no\n";

/// A temporary sshd configuration: main file from `main` (with `{D}` the drop-in directory),
/// our drop-in, `extra` drop-ins, a fresh host key.
fn sshd_setup(main: &str, extra: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("sshd_config.d");
    fs::create_dir(&d).expect("mkdir");
    fs::copy(
        repo("packaging/sshd_config.d/walship-replicator.conf"),
        d.join("walship-replicator.conf"),
    )
    .expect("copy drop-in");
    for (name, text) in extra {
        fs::write(d.join(name), text).expect("extra drop-in");
    }
    let key = dir.path().join("host_ed25519");
    run(Command::new(tool("ssh-keygen", "openssh-client"))
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key));
    let config = dir.path().join("sshd_config");
    fs::write(
        &config,
        format!(
            "{}HostKey {}\n",
            main.replace("{D}", &d.display().to_string()),
            key.display()
        ),
    )
    .expect("sshd_config");
    // sshd -t/-T refuse to run without their privilege separation directory.
    if !Path::new("/run/sshd").is_dir() {
        fs::create_dir_all("/run/sshd").expect("sshd needs /run/sshd: create it (as root)");
        fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let sshd = tool("sshd", "openssh-server");
    let out = run(Command::new(&sshd).arg("-t").arg("-f").arg(&config));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.trim().is_empty(), "sshd -t:\n{said}");
    (dir, config)
}

/// `sshd -T` for a connection by `user`: keyword -> values (keywords repeat for some options).
fn effective(config: &Path, user: &str) -> BTreeMap<String, Vec<String>> {
    let out = run(Command::new(tool("sshd", "openssh-server"))
        .arg("-T")
        .arg("-f")
        .arg(config)
        .arg("-C")
        .arg(format!("user={user},host=x,addr=127.0.0.1")));
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        map.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    map
}

fn one<'a>(m: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    m.get(key)
        .and_then(|v| v.first())
        .map(String::as_str)
        .unwrap_or_else(|| panic!("sshd -T printed no {key}"))
}

/// The replicator is confined, everyone else is untouched, and settings that follow the
/// Include (in the main file and in later drop-ins) still apply to everyone.
fn check_sshd(config: &Path, others_authorized_keys: &str) {
    let rep = effective(config, "replicator");
    // sshd -T prints %u unexpanded (OpenSSH 9.2); accept the expanded form too.
    assert!(
        ["/var/data/%u", "/var/data/replicator"].contains(&one(&rep, "chrootdirectory")),
        "{rep:?}"
    );
    assert_eq!(one(&rep, "forcecommand"), "internal-sftp");
    assert!([
        "/etc/ssh/authorized_keys_%u",
        "/etc/ssh/authorized_keys_replicator"
    ]
    .contains(&one(&rep, "authorizedkeysfile")));
    for (k, v) in [
        ("allowtcpforwarding", "no"),
        ("allowstreamlocalforwarding", "no"),
        ("allowagentforwarding", "no"),
        ("x11forwarding", "no"),
        ("permittty", "no"),
        ("permittunnel", "no"),
        ("passwordauthentication", "no"),
        ("pubkeyauthentication", "yes"),
        ("maxauthtries", "4"),
        ("maxsessions", "7"),
    ] {
        assert_eq!(one(&rep, k), v, "replicator: {k}");
    }

    let other = effective(config, "someoneelse");
    for (k, v) in [
        ("chrootdirectory", "none"),
        ("forcecommand", "none"),
        ("x11forwarding", "yes"),
        ("permittty", "yes"),
        ("allowtcpforwarding", "yes"),
        ("authorizedkeysfile", others_authorized_keys),
        ("maxauthtries", "4"),
        ("maxsessions", "7"),
    ] {
        assert_eq!(one(&other, k), v, "someoneelse: {k}");
    }
}

/// A drop-in sorting after ours: a leaked Match block would capture it.
const LATER: (&str, &str) = ("zz-later.conf", "MaxSessions 7\n");

#[test]
fn sshd_drop_in_confines_only_the_replicator_on_debian() {
    let (_dir, config) = sshd_setup(DEBIAN_MAIN, &[LATER]);
    check_sshd(&config, ".ssh/authorized_keys .ssh/authorized_keys2");
}

#[test]
fn sshd_drop_in_confines_only_the_replicator_on_fedora() {
    let (_dir, config) = sshd_setup(FEDORA_MAIN, &[("50-redhat.conf", FEDORA_REDHAT), LATER]);
    check_sshd(&config, ".ssh/authorized_keys");
}
