//! The command line: one clap definition from which `--help`, the man pages and the shell
//! completions are all generated, so they never disagree.
//!
//! Invariants: every command either succeeds (exit 0) or returns an error that `main` prints
//! as one line `walship: <what failed>: <why>`; configuration errors carry
//! [`crate::config::ConfigError`] so that `main` exits 78 (EX_CONFIG) and systemd does not
//! restart-loop on them.

mod commands;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub use commands::run;

/// Continuous, verifiable replication of SQLite databases by shipping their WAL.
///
/// walship watches a database, ships every commit to one or more replicas (file:// or sftp://)
/// within milliseconds, and restores it — byte for byte, to any point in time — after a
/// disaster. Every file on a replica is checksummed, and every commit carries a checksum of the
/// whole database, so a restore proves itself.
#[derive(Debug, Parser)]
#[command(
    name = "walship",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). WALSHIP_LOG / RUST_LOG override.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the database and its replicas are described.
#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// Config file, or an instance name NAME meaning /etc/walship/NAME.toml.
    #[arg(short, long, env = "WALSHIP_CONFIG", value_name = "FILE|NAME")]
    pub config: Option<String>,
}

/// Flags that stand in for a `[[replica]]` table when a URL is given on the command line.
#[derive(Debug, Args, Clone, Default)]
pub struct UrlFlags {
    /// Private key for sftp:// URLs.
    #[arg(long, value_name = "FILE")]
    pub key_path: Option<PathBuf>,
    /// OpenSSH known_hosts file for sftp:// URLs [default: /etc/walship/known_hosts].
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replicate a database continuously (runs until SIGTERM/SIGINT, then ships what is pending).
    ///
    /// Either `--config FILE` (or an instance name), or a database and one or more replica URLs:
    ///
    ///   walship replicate fruits.db file:///srv/replica/fruits
    ///
    ///   walship replicate /var/data/db/fruits.db sftp://replicator@alpha/db/fruits --key-path /etc/walship/replicator.key
    ///
    /// A database in rollback-journal mode is switched to WAL mode first (logged).
    ///
    /// One replicator per database: walship holds an exclusive flock(2) on the database file
    /// while it runs, and a second `walship replicate` of the same file (whatever its state
    /// directory, config or user) exits at once with status 75 (EX_TEMPFAIL), naming the pid
    /// of the first. Configuration errors exit 78 (EX_CONFIG), other failures 1.
    Replicate {
        #[command(flatten)]
        config: ConfigArg,
        /// The database (without --config).
        #[arg(value_name = "DB", conflicts_with = "config")]
        db: Option<PathBuf>,
        /// Replica URLs: file:///PATH or sftp://USER@HOST[:PORT]/PATH.
        #[arg(value_name = "URL", requires = "db")]
        urls: Vec<String>,
        /// State directory [default: $STATE_DIRECTORY, else /var/lib/walship/<db path>].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        url_flags: UrlFlags,
    },
    /// Rebuild a database from its replica (latest, or a point in time).
    ///
    ///   walship restore --config fruits                       # to the configured db path
    ///
    ///   walship restore -o fruits.db file:///srv/replica/fruits
    ///
    ///   walship restore -o old.db --timestamp 2026-11-24T10:00:00Z file:///srv/replica/fruits
    ///
    /// The result is written to a temporary file, checked (checksum at every commit, PRAGMA
    /// integrity_check), fsynced and renamed into place. With several replicas, the next one is
    /// tried when one is unreachable or damaged.
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// Output file [default: the configured db].
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replica URL (without --config), or an instance NAME for /etc/walship/NAME.toml.
        #[arg(value_name = "URL|NAME", conflicts_with = "config")]
        url: Option<String>,
        /// Newest commit at or before this time (RFC 3339, e.g. 2026-11-24T10:00:00Z).
        #[arg(long, value_name = "RFC3339", conflicts_with = "position")]
        timestamp: Option<String>,
        /// Exactly this commit, as GENERATION/TXID (see `walship list`).
        #[arg(long, value_name = "GEN/TXID")]
        position: Option<String>,
        /// Use only this replica (by name) from the config.
        #[arg(long, value_name = "NAME")]
        replica: Option<String>,
        /// Overwrite the output file if it exists (only ever a regular file: a symlink,
        /// directory, device, FIFO or socket is refused).
        #[arg(long)]
        force: bool,
        /// Do nothing (exit 0) if the output file already exists (a regular file, or a symlink
        /// to one); anything else there is an error.
        #[arg(long)]
        if_db_not_exists: bool,
        /// Do nothing (exit 0) if no replica holds any data.
        #[arg(long)]
        if_replica_exists: bool,
        #[command(flatten)]
        url_flags: UrlFlags,
    },
    /// Prove that the replica restores to exactly the source database (exit 0 if so).
    ///
    /// Restores the latest state to a temporary file (all checksums verified) and compares it
    /// page by page with the database. Run it when writes are quiet and replication is caught
    /// up; otherwise the source is simply ahead.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// The database (without --config); alone, an instance NAME for /etc/walship/NAME.toml.
        #[arg(value_name = "DB|NAME", conflicts_with = "config")]
        db: Option<PathBuf>,
        /// The replica URL (without --config).
        #[arg(value_name = "URL", requires = "db")]
        url: Option<String>,
        #[command(flatten)]
        url_flags: UrlFlags,
    },
    /// Show a replica's generations, snapshots and segments, with times and sizes.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// The replica URL (without --config), or an instance NAME for /etc/walship/NAME.toml.
        #[arg(value_name = "URL|NAME", conflicts_with = "config")]
        url: Option<String>,
        #[command(flatten)]
        url_flags: UrlFlags,
    },
    /// Show the replication status kept by the running daemon: position, lag, errors.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The daemon's state directory (without --config).
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        state_dir: Option<PathBuf>,
    },
    /// Show an sftp target's host key and add it to known_hosts once confirmed.
    ///
    ///   walship trust sftp://replicator@alpha/db                     # shows the fingerprint
    ///
    ///   walship trust sftp://replicator@alpha/db --fingerprint SHA256:...
    Trust {
        /// The sftp URL.
        #[arg(value_name = "URL")]
        url: String,
        /// Use the known-hosts file of this config's replicas.
        #[command(flatten)]
        config: ConfigArg,
        /// known_hosts file [default: /etc/walship/known_hosts].
        #[arg(long, value_name = "FILE", conflicts_with = "config")]
        known_hosts: Option<PathBuf>,
        /// Add the key only if its fingerprint is this one.
        #[arg(long, value_name = "SHA256:...")]
        fingerprint: Option<String>,
        /// Add the key without checking its fingerprint (also replaces a changed key).
        #[arg(long, conflicts_with = "fingerprint")]
        yes: bool,
    },
    /// (systemd) Write sandbox drop-ins for every /etc/walship/NAME.toml.
    #[command(hide = true)]
    SystemdGenerator {
        /// normal, early and late output directories.
        dirs: Vec<PathBuf>,
    },
    /// (packaging) Write man pages and shell completions into DIR.
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory.
        dir: PathBuf,
    },
}
