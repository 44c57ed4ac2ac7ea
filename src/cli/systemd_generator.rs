//! `walship systemd-generator`: systemd runs it (as `walship-generator`) at boot and on every
//! `daemon-reload`; see [`crate::generator`].
//!
//! Its warnings, and a failure to generate, are printed as `walship-generator: ...` lines (the
//! name systemd runs it under), and a failure exits 1; only a missing output directory (a
//! misuse) is an ordinary error, a [`UsageError`] (exit 64).

use super::{SystemdGeneratorArgs, UsageError};
use crate::config;
use anyhow::Result;
use std::path::Path;
use std::process::ExitCode;

pub(super) fn run(a: SystemdGeneratorArgs) -> Result<ExitCode> {
    let normal = a
        .dirs
        .first()
        .ok_or_else(|| UsageError("systemd-generator: missing output directory".into()))?;
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
