//! The `walship` binary: parse the command line, set up logging, run, and turn errors into one
//! line on stderr and an exit code.
//!
//! Exit codes (the EXIT STATUS section of walship(1) lists them for users):
//! - 64 (EX_USAGE) for a command line that cannot work: clap's own errors, a
//!   [`walship::cli::UsageError`] found after parsing, and `walship` with no command at all
//!   (after printing the help to stderr);
//! - 78 (EX_CONFIG) for errors in a configuration file ([`ConfigError`]), so that systemd does
//!   not restart-loop on them;
//! - 75 (EX_TEMPFAIL) when another replicator already holds the database;
//! - 141 (128 + SIGPIPE, what a shell reports for a tool killed by SIGPIPE) when the reader
//!   of stdout went away (`walship list URL | head -1`): nothing is printed, no panic.
//!   SIGPIPE itself stays ignored (Rust's default) so that a peer closing an sftp or S3
//!   connection is an error the daemon handles, never a silent death.

use clap::Parser;
use std::process::ExitCode;
use walship::cli::{run, stdout_closed, Cli, UsageError, STDOUT_CLOSED_EXIT};
use walship::config::ConfigError;
use walship::replicate::dblock::AlreadyReplicated;

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    return match e.print() {
                        Err(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                            ExitCode::from(STDOUT_CLOSED_EXIT)
                        }
                        _ => ExitCode::SUCCESS,
                    };
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    // `walship` alone: the help (on stderr), but it did nothing it was asked.
                    let _ = e.print();
                    return ExitCode::from(UsageError::EXIT_CODE);
                }
                _ => {}
            }
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "walship: {} (see walship --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(UsageError::EXIT_CODE);
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
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe && stdout_closed() {
                return ExitCode::from(STDOUT_CLOSED_EXIT);
            }
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("walship: {msg}");
            if e.chain().any(|c| c.downcast_ref::<UsageError>().is_some()) {
                ExitCode::from(UsageError::EXIT_CODE)
            } else if e.chain().any(|c| c.downcast_ref::<ConfigError>().is_some()) {
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

/// `println!` panics when stdout's reader is gone (SIGPIPE being ignored, the write fails
/// with EPIPE): exit quietly with [`STDOUT_CLOSED_EXIT`] then, as a tool killed by SIGPIPE
/// would; every other panic is reported as usual.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if payload.starts_with("failed printing to stdout") && stdout_closed() {
            std::process::exit(i32::from(STDOUT_CLOSED_EXIT));
        }
        default(info);
    }));
}
