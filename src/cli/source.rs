//! Where a command finds its database, replicas and state directory: a config file (or an
//! instance name standing for one), or else what the command line names instead (a database,
//! replica URLs with `--key-path`/`--known-hosts`, a `--state-dir`).
//!
//! Invariants: a config, when given, is the whole description of the database and its
//! replicas (clap refuses a database or URL beside it; `restore -o` then names only the
//! output), and its errors come first (a [`crate::config::ConfigError`], exit 78); an incomplete command
//! line is a [`UsageError`] (exit 64) worded by the command's [`Usage`], and so is anything
//! wrong in the URLs and flags that stand in for a config.

use super::{ConfigArg, UrlFlags, UsageError};
use crate::backend::Backend;
use crate::config::{self, ReplicaSettings, Settings};
use anyhow::Result;
use std::path::PathBuf;

/// What a command was given to describe its database and replicas.
pub(super) struct Source {
    /// `--config FILE|NAME`.
    pub(super) config: ConfigArg,
    /// The database named on the command line (for `restore`, the output file).
    pub(super) db: Option<PathBuf>,
    /// Replica URLs named on the command line.
    pub(super) urls: Vec<String>,
    /// What a `[[replica]]` table would say about those URLs.
    pub(super) url_flags: UrlFlags,
    /// `--state-dir`, which overrides the config's.
    pub(super) state_dir: Option<PathBuf>,
}

/// A command's errors for an incomplete command line.
pub(super) struct Usage {
    /// Neither a config nor a complete command-line form.
    pub(super) incomplete: &'static str,
    /// Replica URLs without a database (else `incomplete`).
    pub(super) no_db: Option<&'static str>,
    /// A database without replica URLs (else `incomplete`).
    pub(super) no_urls: Option<&'static str>,
}

impl Usage {
    /// Only the one error for anything incomplete.
    pub(super) const fn just(incomplete: &'static str) -> Self {
        Usage {
            incomplete,
            no_db: None,
            no_urls: None,
        }
    }
}

impl Source {
    /// The config's settings (with `--state-dir` applied), else settings made from the
    /// database and replica URLs on the command line.
    ///
    /// # Errors
    /// The config's errors, an ad-hoc URL's, or `usage`'s for an incomplete command line.
    pub(super) fn settings(self, usage: &Usage) -> Result<Settings> {
        let missing = |m: Option<&str>| UsageError(m.unwrap_or(usage.incomplete).to_owned());
        match (load(&self.config)?, self.db, self.urls.is_empty()) {
            (Some(mut s), _, true) => {
                if let Some(d) = self.state_dir {
                    s.state_dir = d;
                    s.state_dir_explicit = true;
                }
                Ok(s)
            }
            (None, Some(db), false) => Ok(config::ad_hoc(
                &db,
                &self.urls,
                &config::AdHoc {
                    key_path: self.url_flags.key_path,
                    known_hosts: self.url_flags.known_hosts,
                    state_dir: self.state_dir,
                    endpoint: self.url_flags.endpoint,
                    region: self.url_flags.region,
                    credentials_file: self.url_flags.credentials_file,
                },
            )
            .map_err(|e| UsageError(e.0))?),
            (None, None, false) => Err(missing(usage.no_db).into()),
            (None, Some(_), true) => Err(missing(usage.no_urls).into()),
            _ => Err(missing(None).into()),
        }
    }
}

/// The config's settings, if a config is given.
///
/// # Errors
/// The config cannot be read or is invalid.
pub(super) fn load(c: &ConfigArg) -> Result<Option<Settings>> {
    match &c.config {
        None => Ok(None),
        Some(arg) => Ok(Some(config::load(&config::resolve_config_path(arg))?)),
    }
}

/// A lone positional argument that is neither a URL nor a path (`walship restore fruits`)
/// names an instance: it stands for `--config fruits`, i.e. /etc/walship/fruits.toml.
pub(super) fn instance_name(config: ConfigArg, arg: Option<String>) -> (ConfigArg, Option<String>) {
    match arg {
        Some(a) if config.config.is_none() && !a.contains('/') && !a.is_empty() => {
            (ConfigArg { config: Some(a) }, None)
        }
        other => (config, other),
    }
}

/// Opens the replicas, or only the one named `only`.
///
/// # Errors
/// No replica is named `only` (a [`UsageError`] listing the configured names).
pub(super) fn targets(
    replicas: &[ReplicaSettings],
    only: Option<&str>,
) -> Result<Vec<(String, Box<dyn Backend>)>> {
    let chosen: Vec<&ReplicaSettings> = replicas
        .iter()
        .filter(|r| only.is_none_or(|n| r.name == n))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
        return Err(UsageError(format!(
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
