//! The systemd generator: per configured database, a drop-in for `walship@NAME.service` (and the
//! same for the standby unit `walship-follow@NAME.service`) that opens exactly that database's
//! directory in the sandbox and runs the service as its owner.
//!
//! Why: the unit is sandboxed (`ProtectSystem=strict`, `ProtectHome=yes`, no capabilities), but
//! only `/etc/walship/NAME.toml` knows where the database lives. systemd runs generators at boot
//! and on every `systemctl daemon-reload`, before it loads units, so the generated drop-in is
//! always as current as the configs (see `docs/systemd.md`).
//!
//! Invariants:
//! - A generator must never break the boot: nothing here panics, a bad or unreadable config gets
//!   no drop-in and a warning (the unit then runs without one and `walship` itself exits 78 with
//!   the config error, so systemd does not restart it), and only [`generate`]'s own I/O failures
//!   are errors.
//! - Drop-ins are written atomically (temporary file, fsync, rename, directory fsync).
//! - No user-database (NSS) lookups: generators run before most services, so `User=`/`Group=`
//!   are numeric ids taken from `stat`.
//! - A path that cannot be written into a unit file unambiguously (whitespace, quotes,
//!   backslashes, control characters, not UTF-8) is refused with a warning, never mangled; `%`
//!   is escaped as `%%`.
//! - A database, explicit state directory or file:// replica under `/tmp` or `/var/tmp` gets a
//!   warning and a drop-in whose `ExecStart=` prints why and exits 78 (so systemd does not
//!   restart it): the unit's `PrivateTmp=yes` gives the service an empty `/tmp` and `/var/tmp`
//!   of its own, where it would wait forever for a database it cannot see.

use crate::config::{self, Settings};
use crate::systemd::{KEY_CREDENTIAL_PREFIX, PASSPHRASE_CREDENTIAL_PREFIX, S3_CREDENTIAL_PREFIX};
use crate::url::ReplicaUrl;
use anyhow::Context;
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// File name of the generated drop-in inside `walship@NAME.service.d/`. Admin overrides from
/// `systemctl edit` (`override.conf`) sort after it and win.
pub const DROP_IN_NAME: &str = "50-walship-generated.conf";

/// Writes `<out_dir>/walship@NAME.service.d/50-walship-generated.conf` (and the same in
/// `walship-follow@NAME.service.d/`) for every
/// `<config_dir>/NAME.toml` whose NAME is a valid instance name (`valid_instance_name`) and
/// whose config loads. Returns warnings (one line each) for what it skipped or could not
/// fully wire; the caller prints them and still exits 0.
///
/// A missing `config_dir` means nothing is configured: no drop-ins, no warnings.
///
/// # Errors
/// `config_dir` exists but cannot be listed, or a drop-in cannot be written to `out_dir`.
pub fn generate(config_dir: &Path, out_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    let entries = match std::fs::read_dir(config_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(warnings),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", config_dir.display())),
    };
    let mut configs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", config_dir.display()))?;
        let path = entry.path();
        if path.extension() != Some(std::ffi::OsStr::new("toml")) {
            continue;
        }
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if !valid_instance_name(name) {
            warnings.push(format!(
                "{}: ignored: {name:?} is not a valid instance name (use letters, digits, '-', '_', '.')",
                path.display()
            ));
            continue;
        }
        configs.push((name.to_owned(), path));
    }
    configs.sort();

    for (name, path) in configs {
        let unit = format!("walship@{name}.service");
        let settings = match config::load(&path) {
            Ok(s) => s,
            Err(e) => {
                warnings.push(format!(
                    "{unit}: no drop-in generated, the unit will exit 78: {e}"
                ));
                continue;
            }
        };
        // The standby unit needs the same sandbox openings (it writes the configured db);
        // its warnings would repeat the replicator's, so only those are reported.
        let follow = format!("walship-follow@{name}.service");
        for (unit, report) in [(&unit, true), (&follow, false)] {
            let mut w = Vec::new();
            let text = match render(unit, &path, &settings, &mut w) {
                Ok(t) => t,
                Err(e) => {
                    w.push(format!(
                        "{unit}: no drop-in generated ({}): {e}",
                        path.display()
                    ));
                    if report {
                        warnings.extend(w);
                    }
                    continue;
                }
            };
            if report {
                warnings.extend(w);
            }
            let dir = out_dir.join(format!("{unit}.d"));
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let dest = dir.join(DROP_IN_NAME);
            crate::durable::write_file_atomic(&dest, &mut text.as_bytes(), 0o644)
                .with_context(|| format!("cannot write {}", dest.display()))?;
        }
    }
    Ok(warnings)
}

/// True for names that make `walship@NAME.service` a valid unit name needing no escaping, and
/// `/etc/walship/NAME.toml` a plain file name: 1-64 ASCII letters, digits, `-`, `_`, `.`, not
/// starting with `.` or `-`.
pub(crate) fn valid_instance_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The drop-in text for one instance. Non-fatal problems are pushed onto `warnings`.
fn render(
    unit: &str,
    config_path: &Path,
    s: &Settings,
    warnings: &mut Vec<String>,
) -> Result<String, String> {
    let db_dir =
        s.db.parent()
            .ok_or_else(|| format!("`db` {} has no directory", s.db.display()))?;
    if db_dir
        .canonicalize()
        .unwrap_or_else(|_| db_dir.to_path_buf())
        == Path::new("/")
    {
        return Err(format!(
            "`db` {} lies in /, and opening / for writing would undo the sandbox: \
             move the database into a directory of its own",
            s.db.display()
        ));
    }
    if let Some(path) = private_tmp_path(s) {
        let why = format!(
            "{} lies under /tmp or /var/tmp, which this service does not see: its \
             PrivateTmp=yes gives it an empty /tmp and /var/tmp of its own. Move it out of \
             both and run systemctl daemon-reload",
            path.display()
        );
        warnings.push(format!("{unit}: the unit will exit 78: {why}"));
        return refusal(unit, config_path, &why);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by walship-generator from {}: do not edit.\n\
         # Rewritten at boot and on `systemctl daemon-reload`; override with `systemctl edit {unit}`.\n\
         [Service]",
        config_path.display()
    );
    render_owner(&mut out, unit, &s.db, db_dir, warnings);
    render_writable(&mut out, unit, s, db_dir, warnings)?;
    render_credentials(&mut out, unit, s, warnings)?;
    Ok(out)
}

/// The first of the database, an explicit state directory and the file:// replicas that lies
/// under `/tmp` or `/var/tmp` (as written, or once symlinks are resolved).
fn private_tmp_path(s: &Settings) -> Option<PathBuf> {
    let under_tmp = |p: &Path| {
        let real = p.canonicalize().ok().or_else(|| {
            p.parent()
                .and_then(|d| d.canonicalize().ok())
                .map(|d| d.join(p.file_name().unwrap_or_default()))
        });
        std::iter::once(p.to_path_buf())
            .chain(real)
            .any(|q| q.starts_with("/tmp") || q.starts_with("/var/tmp"))
    };
    let mut paths = vec![s.db.clone()];
    if s.state_dir_explicit {
        paths.push(s.state_dir.clone());
    }
    for r in &s.replicas {
        if let ReplicaUrl::File(p) = &r.url {
            paths.push(p.clone());
        }
    }
    paths.into_iter().find(|p| under_tmp(p))
}

/// A drop-in that makes the unit fail at once, saying `why` in the journal and in
/// `systemctl status`, with exit status 78 (`RestartPreventExitStatus=78`: no restart loop).
fn refusal(unit: &str, config_path: &Path, why: &str) -> Result<String, String> {
    // `why` is inside single quotes for sh, inside double quotes for systemd: a path was
    // already checked free of quotes and backslashes by `unit_path`; `$` and `%` would be
    // expanded by systemd.
    let text = format!("walship: {unit}: {why}");
    if text.contains(['"', '\'', '\\']) || text.chars().any(char::is_control) {
        return Err(format!("cannot quote {text:?} for a unit file"));
    }
    let quoted = text.replace('$', "$$").replace('%', "%%");
    Ok(format!(
        "# Generated by walship-generator from {}: do not edit.\n\
         # The service would not see its files (PrivateTmp=yes): it fails at once, saying why.\n\
         [Service]\n\
         ExecStart=\n\
         ExecStart=/bin/sh -c \"echo '{quoted}' >&2; exit 78\"\n",
        unit_path(config_path)?
    ))
}

/// Who runs the service: the identity SQLite itself acts as for this database.
fn render_owner(
    out: &mut String,
    unit: &str,
    db: &Path,
    db_dir: &Path,
    warnings: &mut Vec<String>,
) {
    let owner = std::fs::metadata(db)
        .map(|m| (m, db))
        .or_else(|_| std::fs::metadata(db_dir).map(|m| (m, db_dir)));
    match owner {
        Ok((m, what)) => {
            let _ = writeln!(
                out,
                "# The owner of {}.\nUser={}\nGroup={}",
                what.display(),
                m.uid(),
                m.gid()
            );
        }
        Err(_) => {
            warnings.push(format!(
                "{unit}: {} does not exist (yet): the service runs as root without capabilities; \
                 create it and run `systemctl daemon-reload`",
                db_dir.display()
            ));
            let _ = writeln!(
                out,
                "# {} did not exist: running as root; `systemctl daemon-reload` once it does.",
                db_dir.display()
            );
        }
    }
}

/// What the service may write: the database's directory, an explicit state-dir, file://
/// replicas, and the directory of the metrics textfile. (The default state directory is the unit's StateDirectory=.)
fn render_writable(
    out: &mut String,
    unit: &str,
    s: &Settings,
    db_dir: &Path,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    let mut writable = vec![writable_path(db_dir, false)];
    if s.state_dir_explicit {
        writable.push(writable_path(&s.state_dir, true));
    }
    for r in &s.replicas {
        if let ReplicaUrl::File(p) = &r.url {
            writable.push(writable_path(p, true));
        }
    }
    // The textfile is replaced through a temporary file beside it: its directory.
    if let Some(dir) = s.metrics_textfile.as_deref().and_then(Path::parent) {
        writable.push(writable_path(dir, false));
    }
    let mut seen = Vec::new();
    let mut home = false;
    for (path, exists) in writable {
        if seen.contains(&path) {
            continue;
        }
        home |= under_home(&path);
        let prefix = if exists {
            ""
        } else {
            warnings.push(format!(
                "{unit}: {} does not exist (yet): it stays read-only to the service until \
                 `systemctl daemon-reload` after it is created",
                path.display()
            ));
            "-"
        };
        let _ = writeln!(out, "ReadWritePaths={prefix}{}", unit_path(&path)?);
        seen.push(path);
    }
    home |= s.replicas.iter().any(|r| under_home(&r.known_hosts));
    if home {
        out.push_str("ProtectHome=read-only\n");
    }
    Ok(())
}

/// Secrets: root-only files reach the unprivileged service as credentials.
fn render_credentials(
    out: &mut String,
    unit: &str,
    s: &Settings,
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    for r in &s.replicas {
        for (prefix, file) in [
            (KEY_CREDENTIAL_PREFIX, &r.key_path),
            (PASSPHRASE_CREDENTIAL_PREFIX, &r.passphrase_file),
            (S3_CREDENTIAL_PREFIX, &r.credentials_file),
        ] {
            let Some(file) = file else { continue };
            if !file.exists() {
                warnings.push(format!(
                    "{unit}: {} does not exist: not passed as credential {prefix}{}",
                    file.display(),
                    r.name
                ));
                continue;
            }
            let _ = writeln!(
                out,
                "LoadCredential={prefix}{}:{}",
                r.name,
                unit_path(file)?
            );
        }
    }
    Ok(())
}

/// The path to open for writing and whether it exists: `path` itself (canonical) if it exists;
/// for a directory walship creates itself (`create_leaf`), else its existing parent; else
/// `path` as given.
fn writable_path(path: &Path, create_leaf: bool) -> (PathBuf, bool) {
    if let Ok(p) = path.canonicalize() {
        return (p, true);
    }
    if create_leaf {
        if let Some(p) = path.parent().and_then(|p| p.canonicalize().ok()) {
            if p != Path::new("/") {
                return (p, true);
            }
        }
    }
    (path.to_path_buf(), false)
}

/// True for paths that `ProtectHome=yes` would hide.
fn under_home(path: &Path) -> bool {
    ["/home", "/root", "/run/user"]
        .iter()
        .any(|h| path.starts_with(h))
}

/// `path` as a unit-file value: `%` escaped, anything ambiguous refused.
fn unit_path(path: &Path) -> Result<String, String> {
    let s = path
        .to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", path.display()))?;
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'))
    {
        return Err(format!(
            "path {s:?} contains whitespace, quotes, backslashes or control characters, \
             which a unit file cannot carry unambiguously"
        ));
    }
    Ok(s.replace('%', "%%"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names() {
        for good in ["fruits", "app-1", "a_b.c", "X"] {
            assert!(valid_instance_name(good), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a b",
            "a@b",
            "a/b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(!valid_instance_name(bad), "{bad}");
        }
    }

    #[test]
    fn unit_paths_are_escaped_or_refused() {
        assert_eq!(unit_path(Path::new("/a/50%")).as_deref(), Ok("/a/50%%"));
        assert!(unit_path(Path::new("/a b")).is_err());
        assert!(unit_path(Path::new("/a\nb")).is_err());
        assert!(unit_path(Path::new("/a\\b")).is_err());
    }
}
