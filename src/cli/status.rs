//! `walship status`: what the running daemon last wrote to its state directory.

use super::source::Source;
use super::StatusArgs;
use crate::replicate::state::StateDir;
use anyhow::{anyhow, Result};
use std::path::Path;
use std::process::ExitCode;

pub(super) fn run(a: StatusArgs) -> Result<ExitCode> {
    let dir = Source::of_state(a.config, a.state_dir)
        .state_dir("status: give --config FILE or --state-dir DIR")?;
    print_status(&dir)?;
    Ok(ExitCode::SUCCESS)
}

fn print_status(dir: &Path) -> Result<()> {
    let state = StateDir::new(dir);
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
