//! `walship list`: a replica's database, owner, restorable range, generations, snapshots and
//! segments, with times and sizes; as text for people or, with `--json`, one object for scripts.
//!
//! Invariants: the text and the JSON are printed from one examination of each replica, so they
//! state the same facts (JSON times as RFC 3339 and Unix ms, text times as RFC 3339); a
//! replica that cannot be listed (unreachable, or a file:// or sftp:// root that does not
//! exist) is never shown as empty: the command exits 1 naming it, after listing the others
//! (in the JSON, as that replica's `error`). The restorable range is planned from names, as a
//! restore plans it; no file is read.

use super::source::{instance_name, targets, Source, Usage};
use super::ListArgs;
use crate::backend::Backend;
use crate::clock::rfc3339;
use crate::layout::names::{FileName, GenerationId};
use crate::layout::owner::Claim;
use crate::restore::{
    check_encryption, list_replica, missing_root, read_marker, restorable, Restorable,
};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: Usage = Usage::just("list: give --config FILE or a replica URL");

pub(super) fn run(a: ListArgs) -> Result<ExitCode> {
    let (config, url) = instance_name(a.config, a.url);
    let settings = Source {
        config,
        // A replica URL alone needs no database: a placeholder stands for it.
        db: Some(PathBuf::from("/list")),
        urls: url.into_iter().collect(),
        url_flags: a.url_flags,
        state_dir: None,
    }
    .settings(&USAGE)?;
    let mut settings = settings;
    a.identity.apply(&mut settings);
    let mut out = std::io::stdout().lock();
    let mut failures = Vec::new();
    let mut objects = Vec::new();
    for (name, t) in targets(&settings.replicas, None)? {
        match examine(t.as_ref()) {
            Ok(x) if a.json => objects.push(x.to_json(&name, &t.url())),
            Ok(x) => x.print(&name, &t.url(), &mut out)?,
            Err(e) => {
                if a.json {
                    objects.push(json!({"name": name, "url": t.url(), "error": format!("{e:#}")}));
                }
                failures.push(format!("replica {name}: {e:#}"));
            }
        }
    }
    if a.json {
        serde_json::to_writer_pretty(&mut out, &json!({ "replicas": objects }))?;
        writeln!(out)?;
    }
    out.flush()?;
    if !failures.is_empty() {
        bail!("cannot list {}", failures.join(" | "));
    }
    Ok(ExitCode::SUCCESS)
}

/// What one replica holds, as listed once.
struct Examined {
    /// The database its marker names (`host:/path`), or why the marker cannot be read.
    database: Result<Option<String>, String>,
    /// How the files are encrypted as the marker says (`"age"`), `None` for plaintext.
    encryption: Option<String>,
    /// The newest owner claim, or why it cannot be read.
    owner: Result<Option<Claim>, String>,
    /// Generations oldest first, each one's files in txid order.
    generations: Vec<(GenerationId, Vec<(FileName, u64)>)>,
    /// What a restore can reach.
    restorable: Option<Restorable>,
}

/// Lists `t`: a root that does not exist is an error, not an empty replica.
fn examine(t: &dyn Backend) -> Result<Examined> {
    // Names and sizes need no key; encryption settings given for the wrong kind of replica,
    // or an unusable identity, are still errors.
    if t.encryption().is_some() {
        check_encryption(t)?;
    }
    let listing = list_replica(t)?;
    if listing.generations.is_empty() && !t.root_exists()? {
        return Err(missing_root(t));
    }
    let restorable = restorable(t, &listing);
    let mut generations = listing.generations;
    generations.sort_by_key(|g| g.0);
    for (g, files) in &mut generations {
        files.sort_by_key(|(f, _)| crate::replicate::spool::Key::of(*g, f));
    }
    let marker = read_marker(t);
    Ok(Examined {
        encryption: marker
            .as_ref()
            .ok()
            .and_then(|m| m.as_ref()?.encryption.clone()),
        database: marker
            .map(|m| m.map(|m| m.database))
            .map_err(|e| format!("{e:#}")),
        owner: crate::replicate::owner::newest_claim(t)
            .map(|c| c.map(|(_, c)| c))
            .map_err(|e| format!("{e:#}")),
        generations,
        restorable,
    })
}

impl Examined {
    fn print(&self, name: &str, url: &str, out: &mut dyn Write) -> Result<()> {
        writeln!(out, "replica {name}: {url}")?;
        match &self.database {
            Ok(Some(d)) => writeln!(out, "  database: {d}")?,
            Ok(None) => {}
            Err(e) => writeln!(out, "  database: unknown ({e})")?,
        }
        if let Some(e) = &self.encryption {
            writeln!(
                out,
                "  encryption: {e} (snapshots and segments are encrypted)"
            )?;
        }
        // The owner: the instance whose claim is the newest (a "latest" restore follows it).
        match &self.owner {
            Ok(Some(c)) => writeln!(
                out,
                "  owner: instance {} (host {}, pid {}) since {}{}",
                c.instance,
                c.host,
                c.pid,
                rfc3339(c.claimed_ms),
                c.generation
                    .map_or(String::new(), |g| format!(", writing generation {g}"))
            )?,
            Ok(None) => {}
            Err(e) => writeln!(out, "  owner: unknown ({e})")?,
        }
        if self.generations.is_empty() {
            writeln!(out, "  (empty)")?;
            return Ok(());
        }
        match &self.restorable {
            Some(r) => writeln!(
                out,
                "  restorable from {} to {} ({}, {}, {}), latest position {}",
                rfc3339(r.earliest_ms),
                rfc3339(r.latest_ms),
                plural(r.generations, "generation"),
                plural(r.files, "file"),
                fmt_size(r.bytes),
                r.latest
            )?,
            None => writeln!(out, "  nothing restorable: no generation holds a snapshot")?,
        }
        for (g, files) in &self.generations {
            let bytes: u64 = files.iter().map(|f| f.1).sum();
            writeln!(
                out,
                "  generation {g}  started {}  {} file(s), {}",
                rfc3339(g.ms),
                files.len(),
                fmt_size(bytes)
            )?;
            for (f, size) in files {
                match *f {
                    FileName::Snapshot { txid, time_ms } => writeln!(
                        out,
                        "    snapshot  {g}/{txid:<10}  {}  {}",
                        rfc3339(time_ms),
                        fmt_size(*size)
                    )?,
                    FileName::Segment {
                        level,
                        first,
                        last,
                        first_ms,
                        last_ms,
                    } => writeln!(
                        out,
                        "    segment   L{level} txid {first}..{last}  {} .. {}  {}",
                        rfc3339(first_ms),
                        rfc3339(last_ms),
                        fmt_size(*size)
                    )?,
                }
            }
        }
        Ok(())
    }

    fn to_json(&self, name: &str, url: &str) -> Value {
        let owner = match &self.owner {
            Ok(Some(c)) => json!({
                "instance": c.instance.to_string(),
                "host": c.host,
                "pid": c.pid,
                "claimed": rfc3339(c.claimed_ms),
                "claimed_ms": c.claimed_ms,
                "generation": c.generation.map(|g| g.to_string()),
            }),
            _ => Value::Null,
        };
        let restorable = self.restorable.as_ref().map_or(Value::Null, |r| {
            json!({
                "earliest": rfc3339(r.earliest_ms),
                "earliest_ms": r.earliest_ms,
                "latest": rfc3339(r.latest_ms),
                "latest_ms": r.latest_ms,
                "latest_position": r.latest.to_string(),
                "generations": r.generations,
                "files": r.files,
                "bytes": r.bytes,
            })
        });
        let generations: Vec<Value> = self
            .generations
            .iter()
            .map(|(g, files)| {
                let mut snapshots = Vec::new();
                let mut segments = Vec::new();
                for (f, size) in files {
                    match *f {
                        FileName::Snapshot { txid, time_ms } => snapshots.push(json!({
                            "name": f.to_string(),
                            "txid": txid,
                            "time": rfc3339(time_ms),
                            "time_ms": time_ms,
                            "size": size,
                        })),
                        FileName::Segment {
                            level,
                            first,
                            last,
                            first_ms,
                            last_ms,
                        } => segments.push(json!({
                            "name": f.to_string(),
                            "level": level,
                            "first_txid": first,
                            "last_txid": last,
                            "first_time": rfc3339(first_ms),
                            "first_ms": first_ms,
                            "last_time": rfc3339(last_ms),
                            "last_ms": last_ms,
                            "size": size,
                        })),
                    }
                }
                json!({
                    "name": g.to_string(),
                    "started": rfc3339(g.ms),
                    "started_ms": g.ms,
                    "files": files.len(),
                    "bytes": files.iter().map(|f| f.1).sum::<u64>(),
                    "snapshots": snapshots,
                    "segments": segments,
                })
            })
            .collect();
        let mut o = json!({
            "name": name,
            "url": url,
            "error": Value::Null,
            "database": self.database.as_ref().ok().cloned().flatten(),
            "encryption": self.encryption,
            "owner": owner,
            "restorable": restorable,
            "generations": generations,
        });
        if let (Err(e), Some(m)) = (&self.owner, o.as_object_mut()) {
            m.insert("owner_error".into(), Value::from(e.as_str()));
        }
        if let (Err(e), Some(m)) = (&self.database, o.as_object_mut()) {
            m.insert("database_error".into(), Value::from(e.as_str()));
        }
        o
    }
}

/// "1 generation", "2 generations".
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn fmt_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
