//! Configuration: one TOML file per database, turned into validated [`Settings`].
//!
//! Invariants: unknown keys, wrong types and bad values are errors that name the file, line and
//! column ([`ConfigError`], exit code 78); every tuning key has a documented default
//! ([`Settings`] field docs are the reference, mirrored in the README); a [`Settings`] value is
//! always complete and valid, so nothing downstream re-checks it.

use crate::url::ReplicaUrl;
use serde::Deserialize;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Directory of per-instance configs: `--config NAME` means `<dir>/NAME.toml`.
pub(crate) const DEFAULT_CONFIG_DIR: &str = "/etc/walship";
/// Default known_hosts file for sftp replicas.
pub(crate) const DEFAULT_KNOWN_HOSTS: &str = "/etc/walship/known_hosts";

/// A configuration error; the CLI exits with 78 (EX_CONFIG) on it so systemd does not restart.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub(crate) String);

/// Validated settings for one database.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The database file (`db`), absolute.
    pub(crate) db: PathBuf,
    /// walship's state for this database (`state-dir`); default: `$STATE_DIRECTORY` when
    /// systemd sets it, else for the config of an instance NAME (`<config dir>/NAME.toml`)
    /// `/var/lib/walship/NAME`, the unit's `StateDirectory=`, so that a command run by hand
    /// finds the service's state; else `/var/lib/walship/<db path with / as ->` for root, else
    /// `$XDG_STATE_HOME/walship/...` (`~/.local/state/walship/...`).
    pub(crate) state_dir: PathBuf,
    /// Whether `state-dir` was set (in the config, or by `--state-dir`) rather than defaulted.
    pub(crate) state_dir_explicit: bool,
    /// How often a fresh snapshot is taken (`snapshot-interval`, default 24h).
    pub(crate) snapshot_interval: Duration,
    /// How long history stays restorable (`retention`, default 72h).
    pub(crate) retention: Duration,
    /// Most bytes of segments kept locally for replicas that are behind (`spool-limit`,
    /// default 256MiB). Past it, walship lets checkpoints proceed and the lagging replica is
    /// resynchronised with a fresh snapshot.
    pub(crate) spool_limit: u64,
    /// A segment is cut once it holds this many uncompressed bytes (`segment-size`, default
    /// 16MiB); under heavy load many commits share one segment.
    pub(crate) segment_size: u64,
    /// Segments merged into one of the next level (`compaction-fanout`, default 16), which
    /// keeps the number of files a restore reads logarithmic in the history.
    pub(crate) compaction_fanout: usize,
    /// WAL size in pages above which walship checkpoints once frames are shipped
    /// (`checkpoint-pages`, default 1000, SQLite's own autocheckpoint threshold).
    pub(crate) checkpoint_pages: u32,
    /// Where the daemon serves Prometheus metrics over HTTP, `GET /metrics`
    /// (`metrics-listen`, `HOST:PORT`; default: not served). See `metrics`.
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
    /// A file the daemon rewrites with its Prometheus metrics every 10 s and at shutdown, for
    /// node_exporter's textfile collector (`metrics-textfile`, absolute, ending in `.prom`;
    /// default: none). See `metrics`.
    pub(crate) metrics_textfile: Option<PathBuf>,
    /// How long a stop (SIGTERM) waits for replicas to receive what is captured
    /// (`shutdown-timeout`, default 20s); a second signal ends the wait at once.
    pub(crate) shutdown_timeout: Duration,
    /// The replicas, in order of preference for restore.
    pub replicas: Vec<ReplicaSettings>,
}

/// One `[[replica]]`.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// A short name for logs and `--replica` (`name`, default: `file` / the sftp host, made
    /// unique with a number).
    pub(crate) name: String,
    /// Where it lives (`url`).
    pub(crate) url: ReplicaUrl,
    /// Private key for sftp (`key-path`).
    pub(crate) key_path: Option<PathBuf>,
    /// File holding the key's passphrase, if any (`passphrase-file`).
    pub(crate) passphrase_file: Option<PathBuf>,
    /// OpenSSH known_hosts file (`known-hosts`, default /etc/walship/known_hosts).
    pub(crate) known_hosts: PathBuf,
    /// Also try keys from ssh-agent (`use-agent`, default false).
    pub(crate) use_agent: bool,
    /// Connect and I/O timeout (`timeout`, default 10s).
    pub(crate) timeout: Duration,
    /// S3 only: the endpoint (`endpoint`, default `https://s3.REGION.amazonaws.com`).
    pub(crate) endpoint: Option<String>,
    /// S3 only: the region requests are signed for (`region`, default `us-east-1`).
    pub(crate) region: String,
    /// S3 only: bucket in the URL path rather than the host name (`path-style`, default true
    /// with an `endpoint`, false for AWS).
    pub(crate) path_style: bool,
    /// S3 only: file holding the access key (`credentials-file`; default: the environment's
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`).
    pub(crate) credentials_file: Option<PathBuf>,
    /// age X25519 recipients (`age1...`) every snapshot and segment is encrypted to
    /// (`encrypt-to`, any replica kind; default: none, plaintext). See `backend::encrypted`.
    pub(crate) encrypt_to: Vec<age::x25519::Recipient>,
    /// age identity file that decrypts the replica for restore, verify and list
    /// (`identity-file`; `--identity` overrides it; default: none).
    pub(crate) identity_file: Option<PathBuf>,
}

impl ReplicaSettings {
    /// How to log in to this replica. A key, a passphrase and S3 credentials that systemd passes
    /// as credentials (`walship-key-<name>`, `walship-passphrase-<name>`, `walship-s3-<name>`,
    /// wired by the systemd generator) are preferred over the configured paths.
    pub(crate) fn access(&self) -> crate::backend::Access {
        let cred =
            |prefix: &str| crate::systemd::credential_path(&format!("{prefix}{}", self.name));
        crate::backend::Access {
            key_path: cred(crate::systemd::KEY_CREDENTIAL_PREFIX).or_else(|| self.key_path.clone()),
            passphrase_file: cred(crate::systemd::PASSPHRASE_CREDENTIAL_PREFIX)
                .or_else(|| self.passphrase_file.clone()),
            known_hosts: self.known_hosts.clone(),
            use_agent: self.use_agent,
            timeout: self.timeout,
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            credentials_file: cred(crate::systemd::S3_CREDENTIAL_PREFIX)
                .or_else(|| self.credentials_file.clone()),
            encrypt_to: self.encrypt_to.clone(),
            identity_file: self.identity_file.clone(),
        }
    }

    /// Opens this replica's backend.
    pub(crate) fn open(&self) -> Box<dyn crate::backend::Backend> {
        crate::backend::open(&self.url, &self.access())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawConfig {
    db: Spanned<String>,
    state_dir: Option<Spanned<String>>,
    snapshot_interval: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
    spool_limit: Option<Spanned<String>>,
    segment_size: Option<Spanned<String>>,
    compaction_fanout: Option<Spanned<i64>>,
    checkpoint_pages: Option<Spanned<i64>>,
    metrics_listen: Option<Spanned<String>>,
    metrics_textfile: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    #[serde(default)]
    replica: Vec<RawReplica>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawReplica {
    name: Option<Spanned<String>>,
    url: Spanned<String>,
    key_path: Option<Spanned<String>>,
    passphrase_file: Option<Spanned<String>>,
    known_hosts: Option<Spanned<String>>,
    use_agent: Option<Spanned<bool>>,
    timeout: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    path_style: Option<Spanned<bool>>,
    credentials_file: Option<Spanned<String>>,
    encrypt_to: Option<Spanned<Vec<Spanned<String>>>>,
    identity_file: Option<Spanned<String>>,
}

impl Settings {
    /// Makes every replica decrypt with the identity file `path` (`--identity`, which
    /// overrides `identity-file`).
    pub(crate) fn set_identity(&mut self, path: &Path) {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        for r in &mut self.replicas {
            r.identity_file = Some(path.clone());
        }
    }
}

/// Extra settings that the ad-hoc command-line form (`DB URL...`) takes as flags.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdHoc {
    /// `--key-path`.
    pub(crate) key_path: Option<PathBuf>,
    /// `--endpoint` (s3).
    pub(crate) endpoint: Option<String>,
    /// `--region` (s3).
    pub(crate) region: Option<String>,
    /// `--credentials-file` (s3).
    pub(crate) credentials_file: Option<PathBuf>,
    /// `--known-hosts`.
    pub(crate) known_hosts: Option<PathBuf>,
    /// `--state-dir`.
    pub(crate) state_dir: Option<PathBuf>,
}

/// Resolves `--config` values: a bare instance name (no `/`, no `.toml`) means
/// `$WALSHIP_CONFIG_DIR/NAME.toml` (default `/etc/walship/NAME.toml`).
pub(crate) fn resolve_config_path(arg: &str) -> PathBuf {
    if arg.contains('/') || arg.ends_with(".toml") {
        PathBuf::from(arg)
    } else {
        config_dir().join(format!("{arg}.toml"))
    }
}

/// The directory of instance configs: `$WALSHIP_CONFIG_DIR`, default `/etc/walship`.
pub(crate) fn config_dir() -> PathBuf {
    std::env::var_os("WALSHIP_CONFIG_DIR")
        .unwrap_or_else(|| DEFAULT_CONFIG_DIR.into())
        .into()
}

/// Reads and validates a config file.
///
/// # Errors
/// [`ConfigError`] naming the file (and line:column where it applies).
///
/// A file in the config directory, `<dir>/NAME.toml`, is the config of instance NAME (the
/// unit `walship@NAME`): its default state directory is the unit's (see
/// [`Settings::state_dir`]).
pub(crate) fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    parse_instance(
        &text,
        &path.display().to_string(),
        instance_of(path).as_deref(),
    )
}

/// The instance NAME whose config `path` is: `<config dir>/NAME.toml`, where the config
/// directory is `$WALSHIP_CONFIG_DIR` (default `/etc/walship`).
pub(crate) fn instance_of(path: &Path) -> Option<String> {
    let path = std::path::absolute(path).ok()?;
    let dir = std::path::absolute(config_dir()).ok()?;
    if path.parent()? != dir || path.extension()? != "toml" {
        return None;
    }
    let name = path.file_stem()?.to_str()?;
    (!name.is_empty() && !name.starts_with('.')).then(|| name.to_owned())
}

/// Parses config text; `origin` names it in errors.
///
/// # Errors
/// [`ConfigError`] with `origin:line:column: message`.
pub fn parse(text: &str, origin: &str) -> Result<Settings, ConfigError> {
    parse_instance(text, origin, None)
}

/// [`parse`] for the config of `instance`, if it is one.
fn parse_instance(
    text: &str,
    origin: &str,
    instance: Option<&str>,
) -> Result<Settings, ConfigError> {
    let src = Text { text, origin };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().replace('\n', " ");
        src.at(e.span(), &msg)
    })?;
    let db = PathBuf::from(raw.db.get_ref());
    if !db.is_absolute() {
        return Err(src.at(sp(&raw.db), &"`db` must be an absolute path"));
    }
    let tuning = tuning(&src, &raw)?;
    if raw.replica.is_empty() {
        return Err(src.at(
            None,
            &"no [[replica]] configured: add at least one, e.g. [[replica]] url = \"file:///srv/replica/NAME\"",
        ));
    }
    let mut replicas = Vec::new();
    for r in &raw.replica {
        let replica = replica(&src, r, &replicas)?;
        replicas.push(replica);
    }
    let explicit = src.absolute_path(&raw.state_dir, "state-dir")?;
    let state_dir_explicit = explicit.is_some();
    let state_dir = explicit.unwrap_or_else(|| default_state_dir(&db, instance));
    let (metrics_listen, metrics_textfile) = metrics(&src, &raw)?;
    Ok(Settings {
        db,
        state_dir,
        state_dir_explicit,
        snapshot_interval: tuning.snapshot_interval,
        retention: tuning.retention,
        spool_limit: tuning.spool_limit,
        segment_size: tuning.segment_size,
        compaction_fanout: tuning.compaction_fanout,
        checkpoint_pages: tuning.checkpoint_pages,
        metrics_listen,
        metrics_textfile,
        shutdown_timeout: tuning.shutdown_timeout,
        replicas,
    })
}

/// `metrics-listen` (an IP address and port: no host name, which would make the address
/// depend on name resolution at start) and `metrics-textfile`.
fn metrics(
    src: &Text,
    raw: &RawConfig,
) -> Result<(Option<std::net::SocketAddr>, Option<PathBuf>), ConfigError> {
    let listen = match &raw.metrics_listen {
        None => None,
        Some(s) => Some(s.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
            src.at(
                sp(s),
                &format!(
                    "`metrics-listen` must be an IP address and port, such as \"127.0.0.1:9810\" or \"[::1]:9810\", not {:?}",
                    s.get_ref()
                ),
            )
        })?),
    };
    let textfile = src.absolute_path(&raw.metrics_textfile, "metrics-textfile")?;
    if let (Some(p), Some(s)) = (&textfile, &raw.metrics_textfile) {
        if p.extension().is_none_or(|e| e != "prom") || p.file_name().is_none() {
            return Err(src.at(
                sp(s),
                &"`metrics-textfile` must end in `.prom` (node_exporter's textfile collector reads only those)",
            ));
        }
    }
    Ok((listen, textfile))
}

/// Config text and where it came from, for errors that point into it.
struct Text<'a> {
    text: &'a str,
    origin: &'a str,
}

fn sp(s: &Spanned<String>) -> Option<Range<usize>> {
    Some(s.span())
}

impl Text<'_> {
    /// An error at `span` (`origin:line:column: msg`), or about the whole text.
    fn at(&self, span: Option<Range<usize>>, msg: &dyn fmt::Display) -> ConfigError {
        match span {
            Some(s) => {
                let (line, col) = line_col(self.text, s.start);
                ConfigError(format!("{}:{line}:{col}: {msg}", self.origin))
            }
            None => ConfigError(format!("{}: {msg}", self.origin)),
        }
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(parse_duration(default).unwrap_or_default()),
            Some(s) => {
                parse_duration(s.get_ref()).map_err(|e| self.at(sp(s), &format!("`{key}`: {e}")))
            }
        }
    }

    fn size(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: u64,
    ) -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => {
                parse_size(s.get_ref()).map_err(|e| self.at(sp(s), &format!("`{key}`: {e}")))
            }
        }
    }

    fn int(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        default: i64,
        (min, max): (i64, i64),
    ) -> Result<i64, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if (min..=max).contains(n.get_ref()) => Ok(*n.get_ref()),
            Some(n) => Err(self.at(
                Some(n.span()),
                &format!("`{key}` must be between {min} and {max}"),
            )),
        }
    }

    fn absolute_path(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<PathBuf>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) if Path::new(s.get_ref()).is_absolute() => Ok(Some(PathBuf::from(s.get_ref()))),
            Some(s) => Err(self.at(sp(s), &format!("`{key}` must be an absolute path"))),
        }
    }
}

/// The global tuning keys of a config, validated.
struct Tuning {
    snapshot_interval: Duration,
    retention: Duration,
    spool_limit: u64,
    segment_size: u64,
    compaction_fanout: usize,
    checkpoint_pages: u32,
    shutdown_timeout: Duration,
}

fn tuning(src: &Text, raw: &RawConfig) -> Result<Tuning, ConfigError> {
    let snapshot_interval = src.duration(&raw.snapshot_interval, "snapshot-interval", "24h")?;
    let retention = src.duration(&raw.retention, "retention", "72h")?;
    if snapshot_interval < Duration::from_secs(60) {
        return Err(src.at(
            raw.snapshot_interval.as_ref().map(Spanned::span),
            &"`snapshot-interval` must be at least 1m",
        ));
    }
    let spool_limit = src.size(&raw.spool_limit, "spool-limit", 256 << 20)?;
    let segment_size = src.size(&raw.segment_size, "segment-size", 16 << 20)?;
    if !(64 << 10..=1 << 30).contains(&segment_size) {
        return Err(src.at(
            raw.segment_size.as_ref().map(Spanned::span),
            &"`segment-size` must be between 64KiB and 1GiB",
        ));
    }
    let fanout = src.int(&raw.compaction_fanout, "compaction-fanout", 16, (2, 1024))?;
    let checkpoint = src.int(
        &raw.checkpoint_pages,
        "checkpoint-pages",
        1000,
        (1, 1 << 24),
    )?;
    let shutdown_timeout = src.duration(&raw.shutdown_timeout, "shutdown-timeout", "20s")?;
    Ok(Tuning {
        shutdown_timeout,
        snapshot_interval,
        retention,
        spool_limit,
        segment_size,
        compaction_fanout: fanout as usize,
        checkpoint_pages: checkpoint as u32,
    })
}

/// One `[[replica]]`, validated; `before` are the replicas above it, whose names and URLs it
/// must not repeat.
fn replica(
    src: &Text,
    r: &RawReplica,
    before: &[ReplicaSettings],
) -> Result<ReplicaSettings, ConfigError> {
    let url = ReplicaUrl::parse(r.url.get_ref()).map_err(|e| src.at(sp(&r.url), &e))?;
    let key_path = src.absolute_path(&r.key_path, "key-path")?;
    let passphrase_file = src.absolute_path(&r.passphrase_file, "passphrase-file")?;
    let known_hosts = src
        .absolute_path(&r.known_hosts, "known-hosts")?
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KNOWN_HOSTS));
    let timeout = src.duration(&r.timeout, "timeout", "10s")?;
    if timeout < Duration::from_millis(100) {
        return Err(src.at(
            r.timeout.as_ref().map(Spanned::span),
            &"`timeout` must be at least 100ms",
        ));
    }
    check_access_keys(src, r, &url)?;
    let name = replica_name(src, r, &url, before)?;
    if before.iter().any(|x| x.url == url) {
        return Err(src.at(sp(&r.url), &"the same replica URL is configured twice"));
    }
    let use_agent = r.use_agent.as_ref().is_some_and(|b| *b.get_ref());
    if matches!(url, ReplicaUrl::Sftp(_)) && key_path.is_none() && !use_agent {
        return Err(src.at(
            sp(&r.url),
            &"an sftp replica needs `key-path` (or `use-agent = true`)",
        ));
    }
    let endpoint = s3_endpoint(src, r)?;
    let region = match &r.region {
        Some(reg) if valid_region(reg.get_ref()) => reg.get_ref().clone(),
        Some(reg) => {
            return Err(src.at(
                sp(reg),
                &"`region` must be 1-64 characters of a-z, 0-9, '-', '_'",
            ))
        }
        None => DEFAULT_S3_REGION.to_owned(),
    };
    Ok(ReplicaSettings {
        name,
        url,
        key_path,
        passphrase_file,
        known_hosts,
        use_agent,
        timeout,
        path_style: r
            .path_style
            .as_ref()
            .map_or(endpoint.is_some(), |b| *b.get_ref()),
        endpoint,
        region,
        credentials_file: src.absolute_path(&r.credentials_file, "credentials-file")?,
        encrypt_to: encrypt_to(src, r)?,
        identity_file: src.absolute_path(&r.identity_file, "identity-file")?,
    })
}

/// `encrypt-to`: a non-empty list of age X25519 recipients; a bad one is named.
fn encrypt_to(src: &Text, r: &RawReplica) -> Result<Vec<age::x25519::Recipient>, ConfigError> {
    let Some(list) = &r.encrypt_to else {
        return Ok(Vec::new());
    };
    if list.get_ref().is_empty() {
        return Err(src.at(
            Some(list.span()),
            &"`encrypt-to` is empty: list age recipients (age1...), or remove the key",
        ));
    }
    list.get_ref()
        .iter()
        .map(|s| {
            crate::backend::encrypted::parse_recipient(s.get_ref()).map_err(|e| {
                let shown: String = s.get_ref().chars().take(80).collect();
                let shown = if shown.starts_with("AGE-SECRET-KEY-") {
                    "AGE-SECRET-KEY-...".to_owned()
                } else {
                    shown
                };
                src.at(Some(s.span()), &format!("`encrypt-to` {shown:?}: {e}"))
            })
        })
        .collect()
}

/// The region of an S3 replica without `region`.
pub(crate) const DEFAULT_S3_REGION: &str = "us-east-1";

fn valid_region(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The `endpoint` of an S3 replica: an `http://` or `https://` URL with a host and nothing
/// after the path.
fn s3_endpoint(src: &Text, r: &RawReplica) -> Result<Option<String>, ConfigError> {
    let Some(e) = &r.endpoint else {
        return Ok(None);
    };
    let text = e.get_ref().trim_end_matches('/');
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(['?', '#', '@', ' ']) => {
            Ok(Some(text.to_owned()))
        }
        _ => Err(src.at(
            sp(e),
            &"`endpoint` must be an http:// or https:// URL (https://s3.example.com:9000)",
        )),
    }
}

/// Each access key applies to one kind of replica only; setting it on another is an error
/// rather than silently ignored.
fn check_access_keys(src: &Text, r: &RawReplica, url: &ReplicaUrl) -> Result<(), ConfigError> {
    let sftp = matches!(url, ReplicaUrl::Sftp(_));
    let s3 = matches!(url, ReplicaUrl::S3(_));
    let keys = [
        ("key-path", sftp, "sftp", sp_opt(&r.key_path)),
        ("passphrase-file", sftp, "sftp", sp_opt(&r.passphrase_file)),
        ("known-hosts", sftp, "sftp", sp_opt(&r.known_hosts)),
        ("use-agent", sftp, "sftp", sp_opt(&r.use_agent)),
        ("endpoint", s3, "s3", sp_opt(&r.endpoint)),
        ("region", s3, "s3", sp_opt(&r.region)),
        ("path-style", s3, "s3", sp_opt(&r.path_style)),
        ("credentials-file", s3, "s3", sp_opt(&r.credentials_file)),
    ];
    for (key, applies, kind, at) in keys {
        if let (Some(at), false) = (at, applies) {
            return Err(src.at(
                Some(at),
                &format!("`{key}` applies to {kind} replicas only"),
            ));
        }
    }
    Ok(())
}

/// Where an optional key was set, if it was.
fn sp_opt<T>(v: &Option<Spanned<T>>) -> Option<Range<usize>> {
    v.as_ref().map(Spanned::span)
}

/// The replica's `name`, or its default, unique among the replicas `before` it.
fn replica_name(
    src: &Text,
    r: &RawReplica,
    url: &ReplicaUrl,
    before: &[ReplicaSettings],
) -> Result<String, ConfigError> {
    let name = match &r.name {
        Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
        Some(n) => {
            return Err(src.at(
                sp(n),
                &"`name` must be 1-32 characters of a-z, 0-9, '-', '_'",
            ))
        }
        None => default_name(url),
    };
    if before.iter().any(|x| x.name == name) {
        let what = if r.name.is_some() {
            "duplicate replica name"
        } else {
            "two replicas get the same default name: set `name`"
        };
        return Err(src.at(
            r.name.as_ref().map(Spanned::span).or(sp(&r.url)),
            &format!("{what} {name:?}"),
        ));
    }
    Ok(name)
}

/// Settings for the ad-hoc form `walship replicate DB URL [URL...]`.
///
/// # Errors
/// [`ConfigError`] for a bad URL or database path.
pub(crate) fn ad_hoc(db: &Path, urls: &[String], extra: &AdHoc) -> Result<Settings, ConfigError> {
    let db = std::path::absolute(db)
        .map_err(|e| ConfigError(format!("invalid database path {}: {e}", db.display())))?;
    let mut text = format!("db = {}\n", toml_str(&db.display().to_string()));
    if let Some(s) = &extra.state_dir {
        let s = std::path::absolute(s).unwrap_or_else(|_| s.clone());
        text += &format!("state-dir = {}\n", toml_str(&s.display().to_string()));
    }
    for u in urls {
        text += &format!("[[replica]]\nurl = {}\n", toml_str(u));
        if u.starts_with("sftp://") {
            if let Some(k) = &extra.key_path {
                let k = std::path::absolute(k).unwrap_or_else(|_| k.clone());
                text += &format!("key-path = {}\n", toml_str(&k.display().to_string()));
            }
            if let Some(k) = &extra.known_hosts {
                let k = std::path::absolute(k).unwrap_or_else(|_| k.clone());
                text += &format!("known-hosts = {}\n", toml_str(&k.display().to_string()));
            }
        }
        if u.starts_with("s3://") {
            for (key, v) in [("endpoint", &extra.endpoint), ("region", &extra.region)] {
                if let Some(v) = v {
                    text += &format!("{key} = {}\n", toml_str(v));
                }
            }
            if let Some(k) = &extra.credentials_file {
                let k = std::path::absolute(k).unwrap_or_else(|_| k.clone());
                text += &format!(
                    "credentials-file = {}\n",
                    toml_str(&k.display().to_string())
                );
            }
        }
    }
    parse(&text, "command line").map_err(|e| {
        // Line numbers of the synthesised text mean nothing to the user: keep the message.
        ConfigError(match e.0.split_once(": ") {
            Some((_, m)) if e.0.starts_with("command line:") => m.to_owned(),
            _ => e.0,
        })
    })
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn valid_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn default_name(url: &ReplicaUrl) -> String {
    match url {
        ReplicaUrl::File(_) => "file".to_owned(),
        ReplicaUrl::S3(u) => u.bucket.replace('.', "-").chars().take(32).collect(),
        ReplicaUrl::Sftp(u) => {
            let host = &u.host;
            let n: String = host
                .to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .take(32)
                .collect();
            if n.is_empty() {
                "sftp".into()
            } else {
                n
            }
        }
    }
}

/// Where the unit `walship@NAME` keeps its state (`StateDirectory=walship/%i`).
pub(crate) const INSTANCE_STATE_ROOT: &str = "/var/lib/walship";

/// Where the unit `walship-follow@NAME` keeps the follower's status
/// (`StateDirectory=walship-follow/%i`): apart from the daemon's, so that a follower and a
/// replicator of the same NAME on one host never share a file.
pub(crate) const FOLLOW_STATE_ROOT: &str = "/var/lib/walship-follow";

/// The default state directory for `db`, configured as `instance` if it is one (see
/// [`Settings::state_dir`]).
pub(crate) fn default_state_dir(db: &Path, instance: Option<&str>) -> PathBuf {
    state_dir_under(db, instance, INSTANCE_STATE_ROOT, "walship")
}

/// The default state directory of `walship restore --follow` into `db` (configured as
/// `instance` if it is one): as [`default_state_dir`], under `walship-follow` instead of
/// `walship` (`$STATE_DIRECTORY`, else `/var/lib/walship-follow/NAME` for an instance, else
/// `/var/lib/walship-follow/<db path with '/' as '-'>` as root,
/// `$XDG_STATE_HOME/walship-follow/...` or `~/.local/state/walship-follow/...` otherwise).
pub(crate) fn default_follow_state_dir(db: &Path, instance: Option<&str>) -> PathBuf {
    state_dir_under(db, instance, FOLLOW_STATE_ROOT, "walship-follow")
}

/// `$STATE_DIRECTORY`'s first entry, else `<system>/<instance>`, else a directory named after
/// `db`'s path under `<system>` (root) or `<root>` in the user's state directory.
fn state_dir_under(db: &Path, instance: Option<&str>, system: &str, root: &str) -> PathBuf {
    if let Some(dirs) = std::env::var_os("STATE_DIRECTORY") {
        if let Some(first) = dirs
            .to_string_lossy()
            .split(':')
            .next()
            .filter(|s| !s.is_empty())
        {
            return PathBuf::from(first);
        }
    }
    let system = PathBuf::from(system);
    if let Some(name) = instance {
        return system.join(name);
    }
    let leaf: String = db
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '-' } else { c })
        .collect();
    let base = if nix::unistd::geteuid().is_root() {
        system
    } else if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
        Path::new(&x).join(root)
    } else if let Some(h) = std::env::var_os("HOME") {
        Path::new(&h).join(".local/state").join(root)
    } else {
        system
    };
    base.join(leaf)
}

/// Parses a duration such as `24h`, `90s`, `1h30m`, `250ms`.
///
/// # Errors
/// A description of what is wrong.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. \"90s\", \"24h\", \"3d\""))
}

/// Parses a byte size such as `256MiB`, `1GiB`, `64KiB`, `4096` (bytes); `MB`/`GB` are decimal.
///
/// # Errors
/// A description of what is wrong.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" | "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("invalid size {s:?}; use e.g. \"256MiB\", \"1GiB\"")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}; use e.g. \"256MiB\", \"1GiB\""))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, "t.toml").expect_err("must fail").0
    }

    #[test]
    fn full_config_parses() {
        let s = parse(
            "db = \"/var/data/db/fruits.db\"\nretention = \"48h\"\nspool-limit = \"1GiB\"\n\
             [[replica]]\nurl = \"sftp://replicator@alpha/db\"\nkey-path = \"/etc/walship/k\"\n\
             [[replica]]\nurl = \"file:///srv/r\"\n",
            "t.toml",
        )
        .expect("valid");
        assert_eq!(s.retention, Duration::from_secs(48 * 3600));
        assert_eq!(s.spool_limit, 1 << 30);
        assert_eq!(s.replicas.len(), 2);
        assert_eq!(s.replicas[0].name, "alpha");
        assert_eq!(
            s.replicas[0].known_hosts,
            PathBuf::from(DEFAULT_KNOWN_HOSTS)
        );
        assert_eq!(s.replicas[1].name, "file");
        assert_eq!(s.snapshot_interval, Duration::from_secs(86400));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(20));
    }

    #[test]
    fn errors_name_line_and_column() {
        assert_eq!(
            err("db = \"/x.db\"\nbogus = 1\n[[replica]]\nurl = \"file:///r\"\n"),
            "t.toml:2:1: unknown field `bogus`, expected one of `db`, `state-dir`, `snapshot-interval`, `retention`, `spool-limit`, `segment-size`, `compaction-fanout`, `checkpoint-pages`, `metrics-listen`, `metrics-textfile`, `shutdown-timeout`, `replica`"
        );
        assert!(err("db = \"x.db\"\n[[replica]]\nurl = \"file:///r\"\n")
            .starts_with("t.toml:1:6: `db` must be an absolute path"));
        assert!(
            err("db = \"/x.db\"\nretention = \"soon\"\n[[replica]]\nurl = \"file:///r\"\n")
                .starts_with("t.toml:2:13: `retention`: invalid duration")
        );
        assert!(err("db = \"/x.db\"\n[[replica]]\nurl = \"ftp://r\"\n")
            .starts_with("t.toml:3:7: invalid replica URL"));
        assert!(err("db = \"/x.db\"\n").contains("no [[replica]] configured"));
        assert!(err("db = 5\n").starts_with("t.toml:1:6: invalid type"));
        assert!(
            err("db = \"/x.db\"\n[[replica]]\nurl = \"sftp://r@h/db\"\n")
                .contains("needs `key-path`")
        );
        assert!(err(
            "db = \"/x.db\"\n[[replica]]\nurl = \"file:///r\"\n[[replica]]\nurl = \"file:///s\"\n"
        )
        .contains("same default name"));
        assert!(
            err("db = \"/x.db\"\ncompaction-fanout = 1\n[[replica]]\nurl = \"file:///r\"\n")
                .starts_with("t.toml:2:21:")
        );
        assert!(
            err("db = \"/x.db\"\n[[replica]]\nurl = \"file:///r\"\nkey-path = \"/k\"\n")
                .contains("sftp replicas only")
        );
        assert!(
            err("db = \"/x.db\"\n[[replica]]\nurl = \"file:///r\"\nwat = 1\n")
                .starts_with("t.toml:4:1: unknown field `wat`")
        );
    }

    #[test]
    fn metrics_keys() {
        let conf =
            |keys: &str| format!("db = \"/x.db\"\n{keys}\n[[replica]]\nurl = \"file:///r\"\n");
        let s = parse(&conf(""), "t.toml").expect("valid");
        assert_eq!((s.metrics_listen, s.metrics_textfile), (None, None));
        let s = parse(
            &conf("metrics-listen = \"[::1]:9810\"\nmetrics-textfile = \"/t/w.prom\""),
            "t.toml",
        )
        .expect("valid");
        assert_eq!(s.metrics_listen, Some("[::1]:9810".parse().expect("addr")));
        assert_eq!(s.metrics_textfile, Some(PathBuf::from("/t/w.prom")));
        for (keys, msg) in [
            (
                "metrics-listen = \"localhost:9810\"",
                "t.toml:2:18: `metrics-listen` must be an IP address and port",
            ),
            (
                "metrics-listen = \"127.0.0.1\"",
                "t.toml:2:18: `metrics-listen`",
            ),
            (
                "metrics-textfile = \"w.prom\"",
                "t.toml:2:20: `metrics-textfile` must be an absolute path",
            ),
            (
                "metrics-textfile = \"/t/w.txt\"",
                "t.toml:2:20: `metrics-textfile` must end in `.prom`",
            ),
        ] {
            let e = parse(&conf(keys), "t.toml").expect_err(keys).0;
            assert!(e.starts_with(msg), "{keys}: {e}");
        }
    }

    #[test]
    fn s3_keys_apply_to_s3_replicas_only() {
        let s = parse(
            "db = \"/d.db\"\n[[replica]]\nurl = \"s3://walship/fruits\"\n\
             endpoint = \"http://127.0.0.1:3900/\"\nregion = \"garage\"\n\
             credentials-file = \"/etc/walship/s3\"\n[[replica]]\nurl = \"s3://aws-bucket/x\"\n",
            "t.toml",
        )
        .expect("valid");
        let (garage, aws) = (&s.replicas[0], &s.replicas[1]);
        assert_eq!(garage.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert!(garage.path_style, "an endpoint means path-style by default");
        assert_eq!(garage.region, "garage");
        assert_eq!(garage.name, "walship", "named after the bucket");
        assert_eq!((aws.endpoint.as_ref(), aws.path_style), (None, false));
        assert_eq!(aws.region, DEFAULT_S3_REGION);
        for (keys, msg) in [
            (
                "key-path = \"/k\"",
                "t.toml:5:12: `key-path` applies to sftp replicas only",
            ),
            (
                "use-agent = true",
                "t.toml:5:13: `use-agent` applies to sftp replicas only",
            ),
            (
                "endpoint = \"ftp://x\"",
                "t.toml:5:12: `endpoint` must be an http:// or https:// URL",
            ),
            (
                "region = \"EU West\"",
                "t.toml:5:10: `region` must be 1-64 characters",
            ),
        ] {
            let e = err(&format!(
                "db = \"/d.db\"\n\n[[replica]]\nurl = \"s3://b-1/x\"\n{keys}\n"
            ));
            assert!(e.starts_with(msg), "{keys}: {e}");
        }
        for (url, keys, msg) in [
            (
                "file:///r",
                "endpoint = \"http://x\"",
                "`endpoint` applies to s3 replicas only",
            ),
            (
                "sftp://u@h/d",
                "credentials-file = \"/c\"",
                "`credentials-file` applies to s3",
            ),
        ] {
            let e = err(&format!(
                "db = \"/d.db\"\n[[replica]]\nurl = \"{url}\"\n{keys}\n"
            ));
            assert!(e.contains(msg), "{url} {keys}: {e}");
        }
    }

    #[test]
    fn encryption_keys() {
        let conf = |keys: &str| {
            format!(
                "db = \"/x.db\"\n[[replica]]\nurl = \"sftp://u@h/r\"\nkey-path = \"/k\"\n{keys}\n"
            )
        };
        let id = age::x25519::Identity::generate();
        let r = id.to_public().to_string();
        let s = parse(
            &conf(&format!(
                "encrypt-to = [\"{r}\"]\nidentity-file = \"/etc/walship/id.txt\""
            )),
            "c",
        )
        .unwrap();
        assert_eq!(s.replicas[0].encrypt_to.len(), 1);
        assert_eq!(
            s.replicas[0].identity_file.as_deref(),
            Some(Path::new("/etc/walship/id.txt"))
        );
        let e = err(&conf(&format!("encrypt-to = [\"{r}\", \"age1bogus\"]")));
        assert!(
            e.starts_with("t.toml:5:") && e.contains("\"age1bogus\""),
            "{e}"
        );
        let secret = age::secrecy::ExposeSecret::expose_secret(&id.to_string()).to_owned();
        let e = err(&conf(&format!("encrypt-to = [\"{secret}\"]")));
        assert!(e.contains("secret key") && !e.contains(&secret), "{e}");
        assert!(err(&conf("encrypt-to = []")).contains("`encrypt-to` is empty"));
        assert!(err(&conf("identity-file = \"id.txt\"")).contains("absolute"));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn instance_names_resolve_under_etc() {
        assert_eq!(resolve_config_path("./x.toml"), PathBuf::from("./x.toml"));
        assert_eq!(resolve_config_path("/a/b"), PathBuf::from("/a/b"));
    }

    /// The unit `walship@NAME` keeps its state in /var/lib/walship/NAME (StateDirectory=);
    /// the config of instance NAME defaults to the same place without systemd, so `status`
    /// and a `replicate` run by hand find the service's state. (The test process has neither
    /// $STATE_DIRECTORY nor $WALSHIP_CONFIG_DIR.)
    #[test]
    fn an_instance_config_defaults_to_the_units_state_directory() {
        let etc = Path::new(DEFAULT_CONFIG_DIR);
        assert_eq!(
            instance_of(&etc.join("fruits.toml")).as_deref(),
            Some("fruits")
        );
        assert_eq!(instance_of(Path::new("/srv/fruits.toml")), None);
        assert_eq!(instance_of(&etc.join("sub/fruits.toml")), None);
        assert_eq!(instance_of(&etc.join("fruits.conf")), None);
        let text = "db = \"/d/f.db\"\n[[replica]]\nurl = \"file:///r\"\n";
        let s = parse_instance(text, "t.toml", Some("fruits")).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/walship/fruits"));
        assert!(!s.state_dir_explicit);
        assert_ne!(parse(text, "t.toml").unwrap().state_dir, s.state_dir);
        let text = format!("state-dir = \"/s\"\n{text}");
        let s = parse_instance(&text, "t.toml", Some("fruits")).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/s"));
        assert!(s.state_dir_explicit);
        let unit = include_str!("../systemd/walship@.service");
        assert!(unit.contains("StateDirectory=walship/%i\n"), "{unit}");
        assert_eq!(INSTANCE_STATE_ROOT, "/var/lib/walship");
        assert_eq!(
            default_follow_state_dir(Path::new("/x.db"), Some("fruits")),
            Path::new(FOLLOW_STATE_ROOT).join("fruits")
        );
    }
}
