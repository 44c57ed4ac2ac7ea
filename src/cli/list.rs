//! `walship list`: a replica's owner, generations, snapshots and segments, with times and sizes.

use super::source::{instance_name, targets, Source, Usage};
use super::ListArgs;
use crate::backend::Backend;
use crate::layout::names::FileName;
use crate::restore::list_replica;
use anyhow::Result;
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
    let mut out = std::io::stdout().lock();
    for (name, t) in targets(&settings.replicas, None)? {
        list_one(&name, t.as_ref(), &mut out)?;
    }
    Ok(ExitCode::SUCCESS)
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

fn fmt_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
