//! `walship replicate`: run the daemon for one database until SIGTERM/SIGINT.

use super::source::{Source, Usage};
use super::ReplicateArgs;
use crate::replicate;
use crate::systemd::Notifier;
use anyhow::Result;
use std::process::ExitCode;

const USAGE: Usage = Usage {
    incomplete: "replicate: give --config FILE, or a database and replica URLs (see --help)",
    no_db: None,
    no_urls: Some("replicate: give at least one replica URL after the database"),
};

pub(super) fn run(a: ReplicateArgs) -> Result<ExitCode> {
    let settings = Source {
        config: a.config,
        db: a.db,
        urls: a.urls,
        url_flags: a.url_flags,
        state_dir: a.state_dir,
    }
    .settings(&USAGE)?;
    let notifier = Notifier::from_env();
    Ok(match replicate::run(&settings, &notifier)? {
        replicate::Stopped::Shipped => ExitCode::SUCCESS,
        replicate::Stopped::Behind => ExitCode::from(replicate::Stopped::EXIT_BEHIND),
    })
}
