//! `walship verify`: restore the latest state of every replica to a temporary file and compare
//! it page by page with the source database.
//!
//! Invariant: a replica whose marker names another database path is reported as such
//! ("URL holds the replica of database X, not of Y") before anything is restored, never as a
//! page mismatch (unless `--allow-other-db`).

use super::restore::remove_temps_on_signal;
use super::source::{instance_name, targets, Source, Usage};
use super::VerifyArgs;
use crate::backend::Backend;
use crate::durable::RemoveOnDrop;
use crate::layout::plan::Want;
use crate::restore;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: Usage = Usage::just("verify: give --config FILE, or a database and a replica URL");

pub(super) fn run(a: VerifyArgs) -> Result<ExitCode> {
    let (config, db) = match (a.db, &a.url) {
        (Some(d), None) => {
            let (c, rest) = instance_name(a.config, Some(d.display().to_string()));
            (c, rest.map(PathBuf::from))
        }
        (db, _) => (a.config, db),
    };
    let settings = Source {
        config,
        db,
        urls: a.url.into_iter().collect(),
        url_flags: a.url_flags,
        state_dir: None,
    }
    .settings(&USAGE)?;
    let mut settings = settings;
    a.identity.apply(&mut settings);
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
        let r = if a.allow_other_db {
            Ok(())
        } else {
            restore::check_database(t.as_ref(), &settings.db)
        };
        match r.and_then(|()| verify_one(&settings.db, t.as_ref())) {
            Ok(msg) => println!("{name}: {msg}"),
            Err(e) => failures.push(format!("{name}: {e:#}")),
        }
    }
    if !failures.is_empty() {
        bail!("verification failed: {}", failures.join(" | "));
    }
    Ok(ExitCode::SUCCESS)
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
