//! The command line: one clap definition from which `--help`, the man pages and the shell
//! completions are all generated, so they never disagree, and [`run`], which hands each command
//! to its own module (`replicate`, `restore`, ...); `source` turns a config or the command-line
//! forms that stand in for one into settings, the same way for every command.
//!
//! Invariants: every command either succeeds (exit 0) or returns an error that `main` prints
//! as one line `walship: <what failed>: <why>`; errors in a configuration file carry
//! [`crate::config::ConfigError`] so that `main` exits 78 (EX_CONFIG) and systemd does not
//! restart-loop on them; a command line that cannot work (missing or conflicting arguments
//! that clap cannot see, a malformed URL or value given as an argument) carries
//! [`UsageError`], exit 64 (EX_USAGE), like clap's own errors.

mod generate_docs;
mod list;
mod replicate;
mod restore;
mod source;
mod status;
mod systemd_generator;
mod trust;
mod verify;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// A command line that cannot work, found after clap parsed it: missing or conflicting
/// arguments, a malformed URL, time or duration given as an argument. `main` exits
/// [`UsageError::EXIT_CODE`]; an error in a configuration file is a
/// [`crate::config::ConfigError`] instead (78).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    /// EX_USAGE from sysexits.h.
    pub const EXIT_CODE: u8 = 64;
}

/// The exit status when stdout's reader went away (`walship list URL | head -1`): 141, what a
/// shell reports for a tool killed by SIGPIPE, so `set -o pipefail` scripts see walship as
/// they see `cat` or `grep`.
pub const STDOUT_CLOSED_EXIT: u8 = 141;

/// True when stdout is a pipe or socket whose reading end is closed (poll reports POLLERR
/// or POLLHUP), i.e. an EPIPE seen while printing came from stdout and not from a replica's
/// connection.
#[must_use]
pub fn stdout_closed() -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
}

/// Runs the parsed command line.
///
/// Invariant: commands print results to stdout and nothing else; diagnostics go through
/// `tracing` to stderr (or the journal), and failures are returned as errors for `main`.
///
/// # Errors
/// Whatever the command failed on.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Replicate(a) => replicate::run(a),
        Command::Restore(a) => restore::run(a),
        Command::Verify(a) => verify::run(a),
        Command::List(a) => list::run(a),
        Command::Status(a) => status::run(a),
        Command::Trust(a) => trust::run(a),
        Command::SystemdGenerator(a) => systemd_generator::run(a),
        Command::GenerateDocs(a) => generate_docs::run(a),
    }
}

/// Continuous, verifiable replication of SQLite databases by shipping their WAL.
///
/// walship watches a database, ships every commit to one or more replicas (file://, sftp://
/// or s3://) within milliseconds, and restores it (byte for byte, to any point in time) after
/// a disaster. Every file on a replica is checksummed, and every commit carries a checksum of
/// the whole database, so a restore proves itself.
#[derive(Debug, Parser)]
#[command(
    name = "walship",
    version,
    propagate_version = true,
    max_term_width = 100,
    after_help = CLI_AFTER_HELP
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

/// Where the rest of the documentation is (`walship --help`, and the end of walship(1)'s
/// description).
const CLI_AFTER_HELP: &str = "\
Each command has its own --help (walship help COMMAND). Manuals: man walship, walship-COMMAND(1)
(e.g. man walship-restore), walship.toml(5) for the configuration file, and the runbook in
/usr/share/doc/walship/. The packages install the manuals and the bash, zsh and fish
completions; from a source build, `walship generate-docs DIR` writes them into DIR/man and
DIR/completions.

Exit status: 0 success, 1 failure, 64 bad arguments, 78 configuration error, 75 database
already replicated by another walship, 69 replicate stopped with commits not yet on every
replica, 141 stdout closed early; walship status also 3, 4, 5, 6 (walship status --help).";

/// Where the database and its replicas are described.
#[derive(Debug, Args, Clone)]
pub(crate) struct ConfigArg {
    /// Config file, or an instance name NAME meaning /etc/walship/NAME.toml.
    #[arg(short, long, env = "WALSHIP_CONFIG", value_name = "FILE|NAME")]
    pub(crate) config: Option<String>,
}

/// Flags that stand in for a `[[replica]]` table when a URL is given on the command line.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct UrlFlags {
    /// Private key for sftp:// URLs.
    #[arg(long, value_name = "FILE")]
    pub(crate) key_path: Option<PathBuf>,
    /// OpenSSH known_hosts file for sftp:// URLs [default: /etc/walship/known_hosts].
    #[arg(long, value_name = "FILE")]
    pub(crate) known_hosts: Option<PathBuf>,
    /// S3 endpoint for s3:// URLs, e.g. http://127.0.0.1:3900 (path-style) [default: AWS].
    #[arg(long, value_name = "URL")]
    pub(crate) endpoint: Option<String>,
    /// S3 region for s3:// URLs [default: us-east-1].
    #[arg(long, value_name = "REGION")]
    pub(crate) region: Option<String>,
    /// S3 credentials file for s3:// URLs [default: $AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY].
    #[arg(long, value_name = "FILE")]
    pub(crate) credentials_file: Option<PathBuf>,
}

/// `--identity`: how restore, verify and list decrypt an encrypted replica.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct IdentityArg {
    /// age identity file (AGE-SECRET-KEY-1... lines, as age-keygen writes) that decrypts an
    /// encrypted replica (one with encrypt-to); overrides the config's identity-file.
    #[arg(long, value_name = "FILE")]
    pub(crate) identity: Option<PathBuf>,
}

impl IdentityArg {
    /// Applies `--identity`, if given, to every replica of `s`.
    pub(crate) fn apply(&self, s: &mut crate::config::Settings) {
        if let Some(p) = &self.identity {
            s.set_identity(p);
        }
    }
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
    ///
    /// A database that does not exist yet is waited for (under systemd, READY=1 is sent at
    /// once with STATUS=waiting for DB to be created). On SIGTERM/SIGINT, what is captured is
    /// shipped for at most `shutdown-timeout` (default 20s; a second signal stops at once); the
    /// exit status is then 0 if every replica holds everything captured, else 69
    /// (EX_UNAVAILABLE), after a log line naming the replicas behind and what they miss.
    Replicate(ReplicateArgs),
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
    ///
    /// With --config, a replica whose marker (walship-replica.toml) names another database
    /// path than the configured db is refused (--allow-other-db overrides); the marker's host
    /// is not compared, so a new host restores its predecessor's replica. A replica root that
    /// does not exist is an error (exit 1), not an empty replica.
    ///
    /// With --follow, a warm standby: after the restore, new commits are applied as they reach
    /// the replica (listed every --interval), each batch of whole verified commits as one
    /// SQLite transaction, so the file can be read meanwhile (read-only) and is always at a
    /// commit of the source. A new generation is followed; replica outages are retried.
    /// SIGTERM/SIGINT stop at a commit boundary, verify the standby (checksum, PRAGMA
    /// integrity_check) and exit 0; then the file can be opened read-write (promoted).
    /// Under systemd (walship-follow@NAME.service): READY=1 after the restore, STATUS= with
    /// the position and lag.
    ///
    ///   walship restore --follow --config fruits
    Restore(RestoreArgs),
    /// Prove that the replica restores to exactly the source database (exit 0 if so).
    ///
    /// Restores the latest state to a temporary file (all checksums verified) and compares it
    /// page by page with the database. Run it when writes are quiet and replication is caught
    /// up; otherwise the source is simply ahead. A replica whose marker names another database
    /// path is refused ("URL holds the replica of database X, not of Y"; --allow-other-db
    /// compares anyway). Failures exit 1.
    Verify(VerifyArgs),
    /// Show a replica's generations, snapshots and segments, with times and sizes.
    ///
    /// Per replica, a summary first: "restorable from T1 to T2 (N generations, M files, SIZE),
    /// latest position GEN/TXID", T1 the oldest snapshot (a --timestamp before it restores nothing), T2 the last commit a
    /// latest restore reaches. An existing empty replica lists as "(empty)"; a file:// or
    /// sftp:// replica root that does not exist is an error (exit 1). On s3:// an empty prefix
    /// cannot be told from a missing one: it lists as "(empty)".
    List(ListArgs),
    /// Show whether replication is healthy: daemon, lag, each replica's position and errors.
    ///
    /// With --follow, the same for a warm standby (`walship restore --follow`, the service
    /// walship-follow@NAME): its position, lag and last error, from the follower's own state
    /// directory (never the daemon's: a host may run both for one NAME).
    ///
    ///   walship status fruits                      # the service walship@fruits
    ///
    ///   walship status --follow fruits             # the service walship-follow@fruits
    ///
    ///   walship status --max-lag 1m --json /var/data/db/fruits.db
    Status(StatusArgs),
    /// Show an sftp target's host key and add it to known_hosts once confirmed.
    ///
    ///   walship trust sftp://replicator@alpha/db                     # shows the fingerprint
    ///
    ///   walship trust sftp://replicator@alpha/db --fingerprint SHA256:...
    Trust(TrustArgs),
    /// (systemd) Write sandbox drop-ins for every /etc/walship/NAME.toml.
    #[command(hide = true)]
    SystemdGenerator(SystemdGeneratorArgs),
    /// (packaging) Write man pages and shell completions into DIR.
    #[command(hide = true)]
    GenerateDocs(GenerateDocsArgs),
}

// `walship replicate`: its help is the doc comment of `Command::Replicate`.
#[derive(Debug, Args)]
pub struct ReplicateArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArg,
    /// The database (without --config).
    #[arg(value_name = "DB", conflicts_with = "config")]
    pub(crate) db: Option<PathBuf>,
    /// Replica URLs: file:///PATH, sftp://USER@HOST[:PORT]/PATH or s3://BUCKET/PREFIX.
    #[arg(value_name = "URL", requires = "db")]
    pub(crate) urls: Vec<String>,
    /// State directory [default: $STATE_DIRECTORY, else /var/lib/walship/<db path>].
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) url_flags: UrlFlags,
}

// `walship restore`: its help is the doc comment of `Command::Restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArg,
    /// Output file [default: the configured db].
    #[arg(short, long, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Replica URL (without --config), or an instance NAME for /etc/walship/NAME.toml.
    #[arg(value_name = "URL|NAME", conflicts_with = "config")]
    pub(crate) url: Option<String>,
    /// Newest commit at or before this time: RFC 3339 with Z or an offset, e.g.
    /// 2026-11-24T10:00:00Z, 2026-11-24T11:00:00+01:00, fractional seconds allowed. A time
    /// without Z or an offset is refused (never guessed to be UTC or local time).
    #[arg(long, value_name = "RFC3339", conflicts_with = "position")]
    pub(crate) timestamp: Option<String>,
    /// Exactly this commit, as GENERATION/TXID (see `walship list`).
    #[arg(long, value_name = "GEN/TXID")]
    pub(crate) position: Option<String>,
    /// Use only this replica (by name) from the config.
    #[arg(long, value_name = "NAME")]
    pub(crate) replica: Option<String>,
    /// Overwrite the output file if it exists (only ever a regular file: a symlink,
    /// directory, device, FIFO or socket is refused).
    #[arg(long)]
    pub(crate) force: bool,
    /// Do nothing (exit 0) if the output file already exists (a regular file, or a symlink
    /// to one); anything else there is an error.
    #[arg(long)]
    pub(crate) if_db_not_exists: bool,
    /// Do nothing (exit 0) if no replica holds any data.
    #[arg(long)]
    pub(crate) if_replica_exists: bool,
    /// With --config: restore even from a replica whose marker names another database than
    /// the configured db path (by default such a replica is refused).
    #[arg(long)]
    pub(crate) allow_other_db: bool,
    #[command(flatten)]
    pub(crate) identity: IdentityArg,
    #[command(flatten)]
    pub(crate) url_flags: UrlFlags,
    /// Warm standby: after the restore, keep applying new commits from the replica until
    /// SIGTERM/SIGINT (latest state only; an existing output needs --force, which rebuilds it).
    #[arg(long, conflicts_with_all = ["timestamp", "position", "if_db_not_exists"])]
    pub(crate) follow: bool,
    /// With --follow: how often the replica is listed for new commits.
    #[arg(long, value_name = "DURATION", default_value = "1s", requires = "follow", value_parser = crate::config::parse_duration)]
    pub(crate) interval: std::time::Duration,
    /// With --follow: where the follower reports its state for `walship status --follow`
    /// [default: $STATE_DIRECTORY, else /var/lib/walship-follow/NAME for an instance, else
    /// /var/lib/walship-follow/<output path> (as root; else under $XDG_STATE_HOME or
    /// ~/.local/state)]. Never the replicating daemon's state directory (the config's
    /// state-dir is the daemon's and is not used).
    #[arg(long, value_name = "DIR", requires = "follow")]
    pub(crate) state_dir: Option<PathBuf>,
}

// `walship verify`: its help is the doc comment of `Command::Verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArg,
    /// The database (without --config); alone, an instance NAME for /etc/walship/NAME.toml.
    #[arg(value_name = "DB|NAME", conflicts_with = "config")]
    pub(crate) db: Option<PathBuf>,
    /// The replica URL (without --config).
    #[arg(value_name = "URL", requires = "db")]
    pub(crate) url: Option<String>,
    /// Compare even a replica whose marker names another database (by default refused
    /// with "URL holds the replica of database X, not of Y").
    #[arg(long)]
    pub(crate) allow_other_db: bool,
    #[command(flatten)]
    pub(crate) identity: IdentityArg,
    #[command(flatten)]
    pub(crate) url_flags: UrlFlags,
}

// `walship list`: its help is the doc comment of `Command::List`.
#[derive(Debug, Args)]
#[command(after_help = LIST_AFTER_HELP)]
pub struct ListArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArg,
    /// The replica URL (without --config), or an instance NAME for /etc/walship/NAME.toml.
    #[arg(value_name = "URL|NAME", conflicts_with = "config")]
    pub(crate) url: Option<String>,
    /// One JSON object on stdout instead of text (fields below).
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) identity: IdentityArg,
    #[command(flatten)]
    pub(crate) url_flags: UrlFlags,
}

/// The JSON fields of `walship list --json` (in `--help` and `man walship-list`).
const LIST_AFTER_HELP: &str = "\
--json prints one object {\"replicas\": [...]}, one entry per replica, in config order. Every time
is given twice: as RFC 3339 UTC (e.g. \"time\") and as Unix milliseconds (\"time_ms\").
  name, url            the replica's name and URL
  error                why it could not be listed (null if it was; if not, the fields below are
                       absent and the exit status is 1)
  database             the database its marker (walship-replica.toml) names, host:/path, or null;
                       database_error if the marker cannot be read
  encryption           \"age\" if its marker says the replica is encrypted (encrypt-to), else null
  owner                {instance, host, pid, claimed, claimed_ms, generation} of the newest
                       owner claim, or null; owner_error if it cannot be read
  restorable           null when nothing is (no snapshot), else {earliest, earliest_ms,
                       latest, latest_ms, latest_position, generations, files, bytes}
  generations          [{name, started, started_ms, files, bytes, snapshots, segments}], oldest
                       first; snapshots [{name, txid, time, time_ms, size}]; segments [{name,
                       level, first_txid, last_txid, first_time, first_ms, last_time, last_ms,
                       size}], in txid order

Exit status: 0 when every replica was listed; 1 when one could not be (unreachable, a file:// or
sftp:// root that does not exist); 78 configuration error.";

// `walship status`: its help is the doc comment of `Command::Status`.
#[derive(Debug, Args)]
#[command(after_help = STATUS_AFTER_HELP)]
pub struct StatusArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArg,
    /// An instance NAME for /etc/walship/NAME.toml, or the database's path (with a '/').
    #[arg(value_name = "NAME|DB", conflicts_with = "config")]
    pub(crate) target: Option<String>,
    /// Look in this state directory instead (over the config's).
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Exit 5 when the lag is above this duration (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION")]
    pub(crate) max_lag: Option<String>,
    /// One JSON object on stdout instead of text (fields below).
    #[arg(long)]
    pub(crate) json: bool,
    /// Report on the warm standby (`walship restore --follow`) of NAME, FILE or DB instead of
    /// the replicating daemon (see "With --follow" below).
    #[arg(long)]
    pub(crate) follow: bool,
}

/// The exit codes and JSON fields of `walship status` (in `--help` and `man walship-status`).
const STATUS_AFTER_HELP: &str = "\
Exit status (the first that applies):
  3  the daemon is not running (no process holds the state directory's lock)
  5  the lag is above --max-lag (whatever the cause; never without --max-lag)
  4  something fails: a replica (unreachable, refusing writes, ...) or reading the database
  7  the daemon runs and waits for the database file to be created (may last: check the path)
  6  the daemon runs but is not replicating yet (starting)
  0  healthy: the daemon runs, nothing fails, the lag is within --max-lag
  1  status cannot be read; 64 bad arguments; 78 configuration error

The lag is the age of the oldest commit some replica does not hold yet. When the daemon is not
running, its last report is shown with its time, never as current: what each replica holds,
whether captured commits wait in the spool (unshipped), and whether the database's WAL holds
commits walship never captured (uncaptured).

--json prints one object with these fields (times in Unix milliseconds, null when unknown):
  health               healthy | not-running | failing | lagging | waiting-for-db | starting
  exit_code            the exit status above
  daemon_running       true | false
  state_dir, db        the paths used (db null with only --state-dir)
  last_status          the daemon's last status line (stale if not running); last_status_ms
  starting             what a starting daemon does or waits for
  waiting_for_db       the database path the daemon waits for (null otherwise)
  lag_ms, max_lag_ms   the lag now (null unless running), the threshold
  replicas_ok          replicas holding everything captured (null unless running)
  replicas_total       replicas configured (null unless running)
  generation, txid, captured_ms the newest captured commit
  failing              [\"NAME: error\", \"database: error\"] (empty unless running)
  replicas             [{name, generation, txid, commit_ms, received_ms, caught_up, error,
                       permanent}]: what each holds, when that commit was made, when it was
                       last received; permanent: its error needs an operator, not time
                       (the error then reads \"permanent: ... (needs an operator: ...)\")
  unshipped            captured commits some replica lacks
  uncaptured_commits   commits in the WAL after the captured one (checked when not running)

The state directory: --state-dir, else the config's state-dir, whose default for an instance
NAME is /var/lib/walship/NAME (the unit's StateDirectory=); a database path is looked up among
/etc/walship/*.toml ($WALSHIP_CONFIG_DIR).

With --follow: the warm standby's follower (`walship restore --follow`), from its own state
directory: --state-dir, else /var/lib/walship-follow/NAME for an instance NAME (the unit
walship-follow@NAME's StateDirectory=; a database path is looked up among the instance
configs), else /var/lib/walship-follow/<db path, each / as -> (as root; else under
$XDG_STATE_HOME or ~/.local/state), as `restore --follow` defaults it for its output.
Exit status (the first that applies):
  3  no follower is running (no process holds the state directory's lock, no status file, or
     it stopped; why, if on an error, is shown)
  5  the lag is above --max-lag
  4  the last poll of the replica failed (unreachable, ...): the error is shown
  6  the initial restore is under way (restoring)
  0  healthy: following, the last poll succeeded, the lag is within --max-lag
The lag is 0 while the last listing showed nothing newer than the standby (an idle source is no
lag), else the age of the last commit applied. --json fields:
  health               healthy | not-running | failing | lagging | starting
  exit_code            the exit status above
  running              whether a follower holds the state directory's lock
  state                restoring | following | stopped (as last written)
  state_dir, db        the paths used (db null with only --state-dir)
  pid                  the follower's process id (as last written)
  generation, txid     the standby's position; commit_ms: that commit's capture time
  lag_ms, max_lag_ms   the lag now (null unless running and following), the threshold
  listed_ms            when the replica was last listed successfully
  error                the last poll's error, or why following stopped (null if none)
  written_ms           when the follower last wrote its status";

// `walship trust`: its help is the doc comment of `Command::Trust`.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// The sftp URL.
    #[arg(value_name = "URL")]
    pub(crate) url: String,
    /// Use the known-hosts file of this config's replicas.
    #[command(flatten)]
    pub(crate) config: ConfigArg,
    /// known_hosts file [default: /etc/walship/known_hosts].
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub(crate) known_hosts: Option<PathBuf>,
    /// Add the key only if its fingerprint is this one.
    #[arg(long, value_name = "SHA256:...")]
    pub(crate) fingerprint: Option<String>,
    /// Add the key without checking its fingerprint (also replaces a changed key).
    #[arg(long, conflicts_with = "fingerprint")]
    pub(crate) yes: bool,
}

// `walship systemd-generator`: its help is the doc comment of `Command::SystemdGenerator`.
#[derive(Debug, Args)]
pub struct SystemdGeneratorArgs {
    /// normal, early and late output directories.
    pub(crate) dirs: Vec<PathBuf>,
}

// `walship generate-docs`: its help is the doc comment of `Command::GenerateDocs`.
#[derive(Debug, Args)]
pub struct GenerateDocsArgs {
    /// Output directory.
    pub(crate) dir: PathBuf,
}
