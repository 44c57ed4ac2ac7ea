//! `walship generate-docs` (packaging): man pages and shell completions from the clap
//! definition, so they never disagree with `--help`.

use super::{Cli, GenerateDocsArgs};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::ExitCode;

pub(super) fn run(a: GenerateDocsArgs) -> Result<ExitCode> {
    generate_docs(&a.dir)?;
    Ok(ExitCode::SUCCESS)
}

fn generate_docs(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let comp = dir.join("completions");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    std::fs::create_dir_all(&comp).with_context(|| format!("cannot create {}", comp.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man).context("cannot write man pages")?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "walship", &comp)
            .context("cannot write completions")?;
    }
    Ok(())
}
