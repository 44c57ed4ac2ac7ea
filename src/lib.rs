//! walship: continuous, verifiable replication of SQLite databases by shipping their WAL.
//!
//! Module map (the seams are narrow on purpose):
//! - [`config`]: the TOML file of one database, validated into `Settings` (exit 78 on errors).
//! - [`url`]: replica URLs, `file:///PATH` and `sftp://USER@HOST[:PORT]/PATH`.
//! - [`target`]: the storage seam, `trait Target` and its implementations (`file://`, `sftp://`).
//! - [`systemd`]: sd_notify (`READY`/`STATUS`/`WATCHDOG`/`STOPPING`), journald-aware logging,
//!   credentials from `LoadCredential=`.
//! - [`generator`]: the systemd generator writing a sandbox drop-in per `/etc/walship/NAME.toml`.
pub mod config;
pub mod generator;
pub mod systemd;
pub mod target;
pub mod url;
