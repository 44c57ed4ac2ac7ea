//! The `walship` binary: parse the command line, set up logging, run, and turn errors into one
//! line on stderr and an exit code (78 for configuration errors, 64 for bad arguments, 75 when
//! another replicator already holds the database).

use clap::Parser;
use std::process::ExitCode;
use walship::cli::{run, Cli};
use walship::config::ConfigError;
use walship::replicate::dblock::AlreadyReplicated;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "walship: {} (see walship --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(64);
        }
    };
    match cli.command {
        walship::cli::Command::SystemdGenerator { .. } => {}
        // The daemon logs what it does; one-shot commands print results, and log only
        // warnings unless asked (-v).
        walship::cli::Command::Replicate { .. } => {
            walship::systemd::init_logging(cli.verbose, cli.quiet)
        }
        _ => walship::systemd::init_logging(cli.verbose, cli.quiet || cli.verbose == 0),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("walship: {msg}");
            if e.chain().any(|c| c.downcast_ref::<ConfigError>().is_some()) {
                ExitCode::from(78)
            } else if e
                .chain()
                .any(|c| c.downcast_ref::<AlreadyReplicated>().is_some())
            {
                ExitCode::from(AlreadyReplicated::EXIT_CODE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
