//! `walship status`: what the running daemon last wrote to its state directory.

use super::source::Source;
use super::StatusArgs;
use crate::replicate;
use anyhow::{anyhow, Context, Result};
use std::path::Path;
use std::process::ExitCode;

pub(super) fn run(a: StatusArgs) -> Result<ExitCode> {
    let dir = Source::of_state(a.config, a.state_dir)
        .state_dir("status: give --config FILE or --state-dir DIR")?;
    print_status(&dir)?;
    Ok(ExitCode::SUCCESS)
}

fn print_status(dir: &Path) -> Result<()> {
    let status = dir.join("status");
    let line = std::fs::read_to_string(&status).with_context(|| {
        format!(
            "no status in {} (has walship replicated this database yet?)",
            dir.display()
        )
    })?;
    let (ms, text) = line
        .trim()
        .split_once(' ')
        .ok_or_else(|| anyhow!("malformed {}", status.display()))?;
    let running = match std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("lock"))
    {
        Ok(f) => {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor we own.
            let rc =
                unsafe { nix::libc::flock(f.as_raw_fd(), nix::libc::LOCK_SH | nix::libc::LOCK_NB) };
            rc != 0
        }
        Err(_) => false,
    };
    println!(
        "daemon:   {}",
        if running { "running" } else { "not running" }
    );
    println!("status:   {text}");
    println!(
        "updated:  {}",
        crate::clock::rfc3339(ms.parse().unwrap_or(0))
    );
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("replica-")
                .and_then(|s| s.strip_suffix(".state"))
                .map(|s| (s.to_owned(), e.path()))
        })
        .collect();
    entries.sort();
    for (name, p) in entries {
        if let Some(kv) = replicate::state::Kv::load(&p)? {
            println!(
                "replica {name}: generation {} txid {} ({})",
                kv.str("generation").unwrap_or("?"),
                kv.str("last").unwrap_or("?"),
                crate::clock::rfc3339(kv.u64("time-ms").unwrap_or(0))
            );
        }
    }
    Ok(())
}
