//! What each command does, on top of the library.
//!
//! Invariant: commands print results to stdout and nothing else; diagnostics go through
//! `tracing` to stderr (or the journal), and failures are returned as errors for `main`.

use super::{Cli, Command, ConfigArg, UrlFlags};
use crate::backend::Backend;
use crate::config::{self, ConfigError, ReplicaSettings, Settings};
use crate::durable::RemoveOnDrop;
use crate::layout::names::{FileName, Position};
use crate::layout::plan::Want;
use crate::replicate;
use crate::restore::{self, list_replica, RestoreOptions};
use crate::systemd::Notifier;
use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn load(c: &ConfigArg) -> Result<Option<Settings>> {
    match &c.config {
        None => Ok(None),
        Some(arg) => Ok(Some(config::load(&config::resolve_config_path(arg))?)),
    }
}

fn ad_hoc(
    db: &Path,
    urls: &[String],
    flags: &UrlFlags,
    state_dir: Option<PathBuf>,
) -> Result<Settings> {
    Ok(config::ad_hoc(
        db,
        urls,
        &config::AdHoc {
            key_path: flags.key_path.clone(),
            known_hosts: flags.known_hosts.clone(),
            state_dir,
        },
    )?)
}

fn targets(
    replicas: &[ReplicaSettings],
    only: Option<&str>,
) -> Result<Vec<(String, Box<dyn Backend>)>> {
    let chosen: Vec<&ReplicaSettings> = replicas
        .iter()
        .filter(|r| only.is_none_or(|n| r.name == n))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
        return Err(ConfigError(format!(
            "no replica named {:?} (configured: {})",
            only.unwrap_or(""),
            names.join(", ")
        ))
        .into());
    }
    chosen
        .into_iter()
        .map(|r| Ok((r.name.clone(), r.open())))
        .collect()
}

fn fmt_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Runs the parsed command line.
///
/// # Errors
/// Whatever the command failed on.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Replicate {
            config,
            db,
            urls,
            state_dir,
            url_flags,
        } => {
            let settings = match (load(&config)?, db) {
                (Some(mut s), None) => {
                    if let Some(d) = state_dir {
                        s.state_dir = d;
                    }
                    s
                }
                (None, Some(db)) => {
                    if urls.is_empty() {
                        return Err(ConfigError(
                            "replicate: give at least one replica URL after the database".into(),
                        )
                        .into());
                    }
                    ad_hoc(&db, &urls, &url_flags, state_dir)?
                }
                _ => return Err(ConfigError(
                    "replicate: give --config FILE, or a database and replica URLs (see --help)"
                        .into(),
                )
                .into()),
            };
            let notifier = Notifier::from_env();
            replicate::run(&settings, &notifier)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            config,
            output,
            url,
            timestamp,
            position,
            replica,
            force,
            if_db_not_exists,
            if_replica_exists,
            url_flags,
        } => {
            let (config, url) = instance_name(config, url);
            let (out, replicas) = match (load(&config)?, url) {
                (Some(s), None) => (output.unwrap_or_else(|| s.db.clone()), s.replicas),
                (None, Some(u)) => {
                    let out = output
                        .ok_or_else(|| ConfigError("restore: give -o OUTPUT with a URL".into()))?;
                    (out.clone(), ad_hoc(&out, &[u], &url_flags, None)?.replicas)
                }
                _ => {
                    return Err(ConfigError(
                        "restore: give --config FILE, or -o OUTPUT and a replica URL (see --help)"
                            .into(),
                    )
                    .into())
                }
            };
            if if_db_not_exists {
                // A database there (a regular file, or a symlink to one, as SQLite would open
                // it) means nothing to do. Anything else can neither be restored over nor
                // pass for a database: an error, not a silent success.
                match restore::inspect_output(&out)? {
                    restore::Output::Missing => {}
                    restore::Output::RegularFile => {
                        println!("{} exists: nothing to restore", out.display());
                        return Ok(ExitCode::SUCCESS);
                    }
                    restore::Output::Other(what) => {
                        if std::fs::metadata(&out).is_ok_and(|m| m.is_file()) {
                            println!("{} exists ({what}): nothing to restore", out.display());
                            return Ok(ExitCode::SUCCESS);
                        }
                        bail!(
                            "cannot restore to {}: it is {what}, not a database (--if-db-not-exists)",
                            out.display()
                        );
                    }
                }
            }
            let want = match (timestamp, position) {
                (Some(t), _) => {
                    let ts = humantime::parse_rfc3339_weak(&t).map_err(|e| {
                        ConfigError(format!(
                            "invalid --timestamp {t:?}: {e} (use e.g. 2026-11-24T10:00:00Z)"
                        ))
                    })?;
                    let ms = ts
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_err(|_| {
                            ConfigError(format!("invalid --timestamp {t:?}: before 1970"))
                        })?
                        .as_millis();
                    Want::TimeMs(u64::try_from(ms).unwrap_or(u64::MAX))
                }
                (None, Some(p)) => Want::Position(p.parse::<Position>().map_err(|e| {
                    ConfigError(format!(
                        "invalid --position {p:?}: {e} (use GENERATION/TXID from `walship list`)"
                    ))
                })?),
                (None, None) => Want::Latest,
            };
            let ts = targets(&replicas, replica.as_deref())?;
            if if_replica_exists {
                let mut any = false;
                for (_, t) in &ts {
                    if list_replica(t.as_ref())
                        .is_ok_and(|l| l.generations.iter().any(|g| !g.1.is_empty()))
                    {
                        any = true;
                        break;
                    }
                }
                if !any {
                    println!("no replica holds data: nothing to restore");
                    return Ok(ExitCode::SUCCESS);
                }
            }
            remove_temps_on_signal(match out.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            });
            let r = restore::restore(&ts, &RestoreOptions { want, force }, &out)?;
            println!(
                "restored {} from {}: position {} ({}), {} pages of {} bytes, checksum {:016x} verified, {} file(s) read",
                out.display(),
                r.url,
                r.position,
                crate::clock::rfc3339(r.time_ms),
                r.db_pages,
                r.page_size,
                r.db_checksum,
                r.files
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            config,
            db,
            url,
            url_flags,
        } => {
            let (config, db) = match (db, &url) {
                (Some(d), None) => {
                    let (c, rest) = instance_name(config, Some(d.display().to_string()));
                    (c, rest.map(PathBuf::from))
                }
                (db, _) => (config, db),
            };
            let settings = match (load(&config)?, db, url) {
                (Some(s), None, None) => s,
                (None, Some(db), Some(u)) => ad_hoc(&db, &[u], &url_flags, None)?,
                _ => {
                    return Err(ConfigError(
                        "verify: give --config FILE, or a database and a replica URL".into(),
                    )
                    .into())
                }
            };
            if !settings.db.exists() {
                bail!(
                    "cannot verify: database {} does not exist",
                    settings.db.display()
                );
            }
            let ts = targets(&settings.replicas, None)?;
            remove_temps_on_signal(std::env::temp_dir());
            let mut failures = Vec::new();
            for (name, t) in &ts {
                match verify_one(&settings.db, t.as_ref()) {
                    Ok(msg) => println!("{name}: {msg}"),
                    Err(e) => failures.push(format!("{name}: {e:#}")),
                }
            }
            if !failures.is_empty() {
                bail!("verification failed: {}", failures.join(" | "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List {
            config,
            url,
            url_flags,
        } => {
            let (config, url) = instance_name(config, url);
            let replicas = match (load(&config)?, url) {
                (Some(s), None) => s.replicas,
                (None, Some(u)) => ad_hoc(Path::new("/list"), &[u], &url_flags, None)?.replicas,
                _ => {
                    return Err(
                        ConfigError("list: give --config FILE or a replica URL".into()).into(),
                    )
                }
            };
            let mut out = std::io::stdout().lock();
            for (name, t) in targets(&replicas, None)? {
                list_one(&name, t.as_ref(), &mut out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config, state_dir } => {
            let dir = match (load(&config)?, state_dir) {
                (Some(s), None) => s.state_dir,
                (None, Some(d)) => d,
                _ => {
                    return Err(
                        ConfigError("status: give --config FILE or --state-dir DIR".into()).into(),
                    )
                }
            };
            print_status(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Trust {
            url,
            config,
            known_hosts,
            fingerprint,
            yes,
        } => {
            let parsed = crate::url::SftpUrl::parse(&url).map_err(ConfigError)?;
            let kh = match (load(&config)?, known_hosts) {
                (Some(s), _) => s
                    .replicas
                    .iter()
                    .find(|r| matches!(&r.url, crate::url::ReplicaUrl::Sftp(u) if u.host == parsed.host && u.port == parsed.port))
                    .map(|r| r.known_hosts.clone())
                    .unwrap_or_else(|| PathBuf::from(config::DEFAULT_KNOWN_HOSTS)),
                (None, Some(k)) => k,
                (None, None) => PathBuf::from(config::DEFAULT_KNOWN_HOSTS),
            };
            let mut out = std::io::stdout().lock();
            crate::backend::sftp::trust(&parsed, &kh, fingerprint.as_deref(), yes, &mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SystemdGenerator { dirs } => {
            let normal = dirs
                .first()
                .ok_or_else(|| anyhow!("systemd-generator: missing output directory"))?;
            match crate::generator::generate(Path::new(config::DEFAULT_CONFIG_DIR), normal) {
                Ok(ws) => {
                    for w in ws {
                        eprintln!("walship-generator: {w}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("walship-generator: {e:#}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::GenerateDocs { dir } => {
            generate_docs(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A lone positional argument that is neither a URL nor a path (`walship restore fruits`)
/// names an instance: it stands for `--config fruits`, i.e. /etc/walship/fruits.toml.
fn instance_name(config: ConfigArg, arg: Option<String>) -> (ConfigArg, Option<String>) {
    match arg {
        Some(a) if config.config.is_none() && !a.contains('/') && !a.is_empty() => {
            (ConfigArg { config: Some(a) }, None)
        }
        other => (config, other),
    }
}

/// Makes an interrupted restore or verify (SIGINT, SIGTERM, SIGHUP) remove the temporary
/// files this process made in `dir` before it exits: the default action would end it at once
/// and leave a partial database beside the output. Exits 128 + the signal's number.
fn remove_temps_on_signal(dir: PathBuf) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot handle signals ({e}): an interrupted restore may leave a temporary file in {}", dir.display());
            return;
        }
    };
    std::thread::spawn(move || {
        let Some(sig) = signals.forever().next() else {
            return;
        };
        let prefix = format!("{}{}-", crate::durable::TEMP_PREFIX, std::process::id());
        let mut removed = 0;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let ours = e
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&prefix));
                if ours && std::fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        eprintln!(
            "walship: interrupted by signal {sig} ({removed} temporary file(s) removed from {})",
            dir.display()
        );
        std::process::exit(128 + sig);
    });
}

/// Restores the latest state into a temporary file and compares it with the database.
fn verify_one(db: &Path, t: &dyn Backend) -> Result<String> {
    let tmp = std::env::temp_dir().join(crate::durable::temp_name());
    let _guard = RemoveOnDrop::new(&tmp);
    let r = restore::restore_into(t, &Want::Latest, &tmp)?;
    restore::integrity_check(&tmp)?;
    let restored =
        std::fs::File::open(&tmp).with_context(|| format!("cannot open {}", tmp.display()))?;
    let mut d = crate::db::Db::open(db)?;
    let (end, pages, _) = d.current_end()?;
    let frames = end.map_or(0, |e| e.frames);
    let ps = r.page_size;
    let mut differ = 0u64;
    let mut buf = vec![0u8; ps as usize];
    use std::os::unix::fs::FileExt;
    d.for_each_page(ps, frames, pages, |pgno, data| {
        let off = u64::from(pgno - 1) * u64::from(ps);
        if pgno > r.db_pages || restored.read_exact_at(&mut buf, off).is_err() || buf != data {
            differ += 1;
        }
        Ok(())
    })?;
    if differ > 0 || pages != r.db_pages {
        bail!(
            "the replica differs from {}: {differ} page(s) differ, {} pages in the source vs {} restored (replica at {} from {}; is walship running and caught up?)",
            db.display(),
            pages,
            r.db_pages,
            r.position,
            crate::clock::rfc3339(r.time_ms)
        );
    }
    Ok(format!(
        "verified: {} at {} ({}) equals {} page for page ({} pages, checksum {:016x})",
        r.url,
        r.position,
        crate::clock::rfc3339(r.time_ms),
        db.display(),
        pages,
        r.db_checksum
    ))
}

fn list_one(name: &str, t: &dyn Backend, out: &mut dyn Write) -> Result<()> {
    let l = list_replica(t)?;
    writeln!(out, "replica {name}: {}", t.url())?;
    // The owner: the instance whose claim is the newest (a "latest" restore follows it).
    match crate::replicate::owner::newest_claim(t) {
        Ok(Some((_, c))) => writeln!(
            out,
            "  owner: instance {} (host {}, pid {}) since {}{}",
            c.instance,
            c.host,
            c.pid,
            crate::clock::rfc3339(c.claimed_ms),
            c.generation
                .map_or(String::new(), |g| format!(", writing generation {g}"))
        )?,
        Ok(None) => {}
        Err(e) => writeln!(out, "  owner: unknown ({e:#})")?,
    }
    if l.generations.is_empty() {
        writeln!(out, "  (empty)")?;
    }
    for (g, files) in &l.generations {
        let mut files = files.clone();
        files.sort_by_key(|(f, _)| crate::replicate::spool::Key::of(*g, f));
        let bytes: u64 = files.iter().map(|f| f.1).sum();
        writeln!(
            out,
            "  generation {g}  started {}  {} file(s), {}",
            crate::clock::rfc3339(g.ms),
            files.len(),
            fmt_size(bytes)
        )?;
        for (f, size) in &files {
            match *f {
                FileName::Snapshot { txid, time_ms } => {
                    writeln!(
                        out,
                        "    snapshot  {g}/{txid:<10}  {}  {}",
                        crate::clock::rfc3339(time_ms),
                        fmt_size(*size)
                    )?;
                }
                FileName::Segment {
                    level,
                    first,
                    last,
                    first_ms,
                    last_ms,
                } => {
                    writeln!(
                        out,
                        "    segment   L{level} txid {first}..{last}  {} .. {}  {}",
                        crate::clock::rfc3339(first_ms),
                        crate::clock::rfc3339(last_ms),
                        fmt_size(*size)
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn print_status(dir: &Path) -> Result<()> {
    let state = replicate::state::StateDir::new(dir);
    let file = state.read_status()?.ok_or_else(|| {
        anyhow!(
            "no status in {} (has walship replicated this database yet?)",
            dir.display()
        )
    })?;
    let running = state.daemon_running();
    println!(
        "daemon:   {}",
        if running { "running" } else { "not running" }
    );
    println!("status:   {}", file.status);
    println!("updated:  {}", crate::clock::rfc3339(file.written_ms));
    for (name, p) in state.positions() {
        println!(
            "replica {name}: generation {} txid {} ({})",
            p.key.generation,
            p.key.last,
            crate::clock::rfc3339(p.time_ms)
        );
    }
    Ok(())
}

fn generate_docs(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let comp = dir.join("completions");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    std::fs::create_dir_all(&comp).with_context(|| format!("cannot create {}", comp.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man).context("cannot write man pages")?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "walship", &comp)
            .context("cannot write completions")?;
    }
    Ok(())
}
