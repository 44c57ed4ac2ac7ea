//! walship: continuous, verifiable replication of SQLite databases by shipping their WAL.
//!
//! Module map (the seams are narrow on purpose):
//! - [`target`]: the storage seam, `trait Target` and its implementations (`file://`, `sftp://`,
//!   with `known_hosts` checking for the latter).
pub mod target;
