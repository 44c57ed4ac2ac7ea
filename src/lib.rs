//! walship: continuous, verifiable replication of SQLite databases by shipping their WAL.
//!
//! Module map (the seams are narrow on purpose):
//! - [`cli`]: the clap definition (help, man pages, completions) and what each command does.
//! - [`config`]: the TOML file of one database, validated into `Settings` (exit 78 on errors).
//! - [`url`]: replica URLs, `file:///PATH` and `sftp://USER@HOST[:PORT]/PATH`.
//! - [`backend`]: the storage seam, `trait Backend` and its implementations (`file://`, `sftp://`,
//!   with `known_hosts` checking for the latter).
//! - [`wal`]: the SQLite WAL format, pure: header, frames, salts, the checksum chain.
//! - [`layout`]: the on-replica format, pure: names, snapshot and segment encoding, whole-database
//!   checksums, and planning restores, compaction and retention from a listing.
//! - [`db`]: the capture side's connections to the user's database: the pin protocol, raw WAL
//!   and page reads, checkpoints.
//! - [`replicate`]: the daemon: watch, capture into the local spool, ship to every replica.
//! - [`restore`]: rebuild a database from a replica (pipelined, checksummed, atomic), verify.
//! - [`systemd`]: sd_notify (`READY`/`STATUS`/`WATCHDOG`/`STOPPING`), journald-aware logging,
//!   credentials from `LoadCredential=`.
//! - [`generator`]: the systemd generator writing a sandbox drop-in per `/etc/walship/NAME.toml`.
pub mod backend;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod durable;
pub mod generator;
pub mod layout;
pub mod replicate;
pub mod restore;
pub mod systemd;
pub mod url;
pub mod wal;

/// Property-test case counts: `default` in the normal suite, or `WALSHIP_FUZZ_CASES` when set
/// (`bench/fuzz.sh` runs the format parsers' properties with many more cases).
#[cfg(test)]
pub(crate) fn fuzz_cases(default: u32) -> u32 {
    std::env::var("WALSHIP_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
