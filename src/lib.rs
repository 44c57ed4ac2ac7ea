//! walship: continuous, verifiable replication of SQLite databases by shipping their WAL.
//!
//! Module map, in dependency order: each module uses only modules listed after it (true when
//! written; what `script/check-module-cycles`, run by `script/test`, enforces is weaker: no
//! cycle between sibling modules).
//! - [`cli`]: the clap definition (help, man pages, completions) and one file per command;
//!   `cli::source` turns a config, or the URLs and flags that stand in for one, into settings.
//! - [`generator`]: the systemd generator writing a sandbox drop-in per `/etc/walship/NAME.toml`.
//! - [`restore`]: rebuild a database from a replica (pipelined, checksummed, atomic), verify;
//!   `restore::follow` keeps a warm standby (`restore --follow`) applying new commits through SQLite.
//! - [`replicate`]: the daemon. `run` starts it; `main_loop` wakes on file events; `capture`
//!   turns commits into spooled segments (`resume`, `segments`, `checkpoint`); `ship` sends
//!   the spool to each replica; `spool` holds what replicas lack; `state` is the state
//!   directory, one typed `StateDir`; `dblock` and `owner` keep one replicator per database and
//!   one writer per replica; `replaced` handles a database file moved or deleted under it.
//! - [`metrics`]: Prometheus metrics of the daemon: counters, the text format, `GET /metrics`
//!   on `metrics-listen` and the node_exporter textfile; `replicate` feeds it.
//! - [`config`]: the TOML file of one database, validated into `Settings` (exit 78 on errors).
//! - [`backend`]: the storage seam: `trait Backend`, the one `backend::open(url, access)`, and
//!   the `file://` and `sftp://` backends (with `known_hosts` checking for the latter), and
//!   `encrypted`, the age wrapper `open` puts around any of them for `encrypt-to`. A new
//!   backend is one new file and one match arm in `open`.
//! - [`db`]: the capture side's connections to the user's database: the pin protocol, raw WAL
//!   and page reads, checkpoints, and the WAL changes capture must react to (`WalChange`).
//! - [`layout`]: the on-replica format, pure: names, snapshot and segment encoding, whole-database
//!   checksums, owner claims, and planning restores, compaction and retention from a listing.
//! - [`wal`]: the SQLite WAL format, pure: header, frames, salts, the checksum chain.
//! - [`url`]: replica URLs, `file:///PATH` and `sftp://USER@HOST[:PORT]/PATH`, and the one rule
//!   for replica paths.
//! - [`systemd`]: sd_notify (`READY`/`STATUS`/`WATCHDOG`/`STOPPING`), journald-aware logging,
//!   credentials from `LoadCredential=`.
//! - [`durable`]: every local file write (temp, fsync, rename, directory fsync) and temp files.
//! - [`clock`]: wall-clock milliseconds and their RFC 3339 form.
// Module docs explain invariants to contributors and link the private items that keep them:
// read them with `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod backend;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod durable;
pub mod generator;
pub mod layout;
pub mod metrics;
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
