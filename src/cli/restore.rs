//! `walship restore`: rebuild a database from its replicas, to the latest commit or a point in
//! time, into the configured path or `-o FILE`.

use super::source::{instance_name, targets, Source, Usage};
use super::{RestoreArgs, UsageError};
use crate::backend::Backend;
use crate::layout::names::Position;
use crate::layout::plan::Want;
use crate::restore::{self, list_replica, RestoreOptions};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: Usage = Usage {
    incomplete: "restore: give --config FILE, or -o OUTPUT and a replica URL (see --help)",
    no_db: Some("restore: give -o OUTPUT with a URL"),
    no_urls: None,
};

pub(super) fn run(a: RestoreArgs) -> Result<ExitCode> {
    let (config, url) = instance_name(a.config, a.url);
    // With a config, the replicas must hold its database; a URL alone names no database.
    let from_config = config.config.is_some();
    let instance = config
        .config
        .as_deref()
        .and_then(|c| crate::config::instance_of(&crate::config::resolve_config_path(c)));
    let settings = Source {
        config,
        // The replica URL form needs an output, which stands for the database.
        db: a.output.clone(),
        urls: url.into_iter().collect(),
        url_flags: a.url_flags,
        state_dir: None,
    }
    .settings(&USAGE)?;
    let mut settings = settings;
    a.identity.apply(&mut settings);
    let out = a.output.unwrap_or_else(|| settings.db.clone());
    if a.if_db_not_exists && database_exists(&out)? {
        return Ok(ExitCode::SUCCESS);
    }
    let want = wanted(a.timestamp, a.position)?;
    let ts = targets(&settings.replicas, a.replica.as_deref())?;
    if a.if_replica_exists && !any_holds_data(&ts) {
        println!("no replica holds data: nothing to restore");
        return Ok(ExitCode::SUCCESS);
    }
    if a.follow {
        let state_dir = a.state_dir.clone().unwrap_or_else(|| {
            crate::config::default_follow_state_dir(
                &std::path::absolute(&out).unwrap_or_else(|_| out.clone()),
                instance.as_deref(),
            )
        });
        return follow(
            &ts,
            &out,
            restore::follow::FollowOptions {
                interval: a.interval,
                force: a.force,
                database: (from_config && !a.allow_other_db).then(|| settings.db.clone()),
                state_dir,
            },
        );
    }
    remove_temps_on_signal(match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    });
    let r = restore::restore(
        &ts,
        &RestoreOptions {
            want,
            force: a.force,
            database: (from_config && !a.allow_other_db).then(|| settings.db.clone()),
        },
        &out,
    )?;
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

/// `--follow`: restore, then follow the replica until SIGTERM/SIGINT (see
/// [`restore::follow`]). A signal during the initial restore removes its temporary file and
/// exits as a plain restore does; afterwards it stops following at a commit boundary.
fn follow(
    ts: &[(String, Box<dyn Backend>)],
    out: &Path,
    opts: restore::follow::FollowOptions,
) -> Result<ExitCode> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let following = Arc::new(AtomicBool::new(false));
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
            .map_err(|e| anyhow::anyhow!("cannot handle signals: {e}"))?;
        let (stop, following) = (stop.clone(), following.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if following.load(Ordering::SeqCst) {
                    tracing::info!("signal {sig}: stopping at the next commit boundary");
                    stop.store(true, Ordering::SeqCst);
                    continue;
                }
                let removed = remove_own_temps(&dir);
                eprintln!(
                    "walship: interrupted by signal {sig} ({removed} temporary file(s) removed from {})",
                    dir.display()
                );
                std::process::exit(128 + sig);
            }
        });
    }
    let notifier = crate::systemd::Notifier::from_env();
    let f = restore::follow::follow(ts, &opts, out, &stop, &notifier, &following)?;
    println!(
        "stopped following: {} at position {} ({}), checksum {:016x} verified, integrity ok, {} commit(s) applied while following",
        out.display(),
        f.position,
        crate::clock::rfc3339(f.time_ms),
        f.db_checksum,
        f.commits
    );
    Ok(ExitCode::SUCCESS)
}

/// For `--if-db-not-exists`: true, said on stdout, when a database is at `out`.
///
/// A database there (a regular file, or a symlink to one, as SQLite would open it) means
/// nothing to do. Anything else can neither be restored over nor pass for a database: an
/// error, not a silent success.
fn database_exists(out: &Path) -> Result<bool> {
    match restore::inspect_output(out)? {
        restore::Output::Missing => Ok(false),
        restore::Output::RegularFile => {
            println!("{} exists: nothing to restore", out.display());
            Ok(true)
        }
        restore::Output::Other(what) => {
            if std::fs::metadata(out).is_ok_and(|m| m.is_file()) {
                println!("{} exists ({what}): nothing to restore", out.display());
                return Ok(true);
            }
            bail!(
                "cannot restore to {}: it is {what}, not a database (--if-db-not-exists)",
                out.display()
            );
        }
    }
}

/// The state `--timestamp` or `--position` asks for (clap allows one at most), else the latest.
fn wanted(timestamp: Option<String>, position: Option<String>) -> Result<Want> {
    Ok(match (timestamp, position) {
        (Some(t), _) => Want::TimeMs(
            crate::clock::parse_rfc3339(&t)
                .map_err(|e| UsageError(format!("invalid --timestamp {t:?}: {e}")))?,
        ),
        (None, Some(p)) => Want::Position(p.parse::<Position>().map_err(|e| {
            UsageError(format!(
                "invalid --position {p:?}: {e} (use GENERATION/TXID from `walship list`)"
            ))
        })?),
        (None, None) => Want::Latest,
    })
}

/// For `--if-replica-exists`: whether any replica lists a file (one that cannot be listed
/// counts as holding nothing).
fn any_holds_data(ts: &[(String, Box<dyn Backend>)]) -> bool {
    ts.iter().any(|(_, t)| {
        list_replica(t.as_ref()).is_ok_and(|l| l.generations.iter().any(|g| !g.1.is_empty()))
    })
}

/// Makes an interrupted restore or verify (SIGINT, SIGTERM, SIGHUP) remove the temporary
/// files this process made in `dir` before it exits: the default action would end it at once
/// and leave a partial database beside the output. Exits 128 + the signal's number.
pub(super) fn remove_temps_on_signal(dir: PathBuf) {
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
        let removed = remove_own_temps(&dir);
        eprintln!(
            "walship: interrupted by signal {sig} ({removed} temporary file(s) removed from {})",
            dir.display()
        );
        std::process::exit(128 + sig);
    });
}

/// Removes the temporary files this process made in `dir`; returns how many.
fn remove_own_temps(dir: &Path) -> usize {
    let prefix = format!("{}{}-", crate::durable::TEMP_PREFIX, std::process::id());
    let mut removed = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
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
    removed
}
