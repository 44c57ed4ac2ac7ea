//! walship: continuous, verifiable replication of SQLite databases by shipping their WAL.
//!
//! Module map (the seams are narrow on purpose):
//! - [`target`]: the storage seam, `trait Target` and its implementations (`file://`, `sftp://`).
//! - [`wal`]: the SQLite WAL format, pure: header, frames, salts, the checksum chain.
//! - [`layout`]: the on-replica format, pure: names, snapshot and segment encoding, whole-database
//!   checksums, and planning restores, compaction and retention from a listing.
pub mod layout;
pub mod target;
pub mod wal;
