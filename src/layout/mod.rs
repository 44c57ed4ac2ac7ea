//! The on-replica format, pure: what walship writes to a replica and how it reads it back.
//!
//! A replica directory holds a marker file ([`names::MARKER_FILE`]), the owner claims of the instances
//! that wrote it (`owner-<ms>-<instance>.toml`, the newest one owns the replica), and one
//! directory per generation (`generations/<id>/`), each holding snapshot files (a whole database
//! at one commit) and segment files (a run of consecutive commits). This module names those files
//! ([`names`], [`owner`]), encodes and decodes them ([`codec`]), carries the whole-database
//! checksum ([`checksum`]), and decides from a listing alone what to restore, compact or delete
//! ([`plan`]).
//!
//! Invariants kept:
//! - Nothing here does I/O other than through the `Read`/`Write` streams handed in; no clock, no
//!   randomness: the same input always gives the same output.
//! - Everything read from a replica (names, headers, records) is parsed strictly: a name that
//!   [`names::FileName::parse`] accepts is a plain file name (no `/`, no `..`) and prints back to itself;
//!   decoding never panics and never allocates more than one page plus the zstd window, whatever
//!   the input.
//! - Every byte of a snapshot or segment is covered by a checksum that the decoder checks.
//! - A segment file's name is a lower bound of its content: the file holds at least the commits
//!   `first..=last` its name says, as whole parts (see [`codec`]), and may hold more complete
//!   parts after them (the name lags an append until the rename that follows it). Plans
//!   ([`plan`]) use the names only; readers use the content: damage inside the named range is an
//!   error, a torn or damaged part after it ends the file's content.

#![deny(missing_docs)]

pub(crate) mod checksum;
pub(crate) mod codec;
pub mod names;
pub(crate) mod owner;
pub mod plan;

use codec::{Kind, CODEC_VERSION};
use names::{GenerationId, Position, FORMAT_VERSION};

/// Everything that can be wrong with names, files and listings read from a replica.
///
/// Messages say what is wrong; the caller adds which file or replica it was.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file or generation name that walship did not write.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The offending name (as read, possibly hostile: printed escaped).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A replication position that is not `<generation>/<txid>`.
    #[error("invalid position {text:?}: {reason}")]
    InvalidPosition {
        /// The offending text.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The marker file is not valid TOML or does not have the expected keys.
    #[error("invalid marker at line {line}, column {column}: {message}")]
    InvalidMarker {
        /// 1-based line of the problem (1 if unknown).
        line: usize,
        /// 1-based column of the problem (1 if unknown).
        column: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// The marker names a replica format this build does not know.
    #[error("replica format {0} is newer than this walship supports ({FORMAT_VERSION})")]
    MarkerTooNew(u32),
    /// The marker's format number is 0.
    #[error("replica format 0 is not valid")]
    MarkerFormatZero,
    /// An owner claim file (see [`owner`]) is not valid TOML or has bad fields.
    #[error("invalid owner claim: {0}")]
    InvalidClaim(String),

    /// The file does not start with the walship magic.
    #[error("not a walship file (bad magic)")]
    BadMagic,
    /// The file is age-encrypted (`age-encryption.org/v1`) but was read as plaintext.
    #[error("the file is age-encrypted: give --identity FILE or identity-file to read it")]
    Encrypted,
    /// The file is a snapshot where a segment was expected, or the other way round.
    #[error("expected a {expected} file, found {found}")]
    WrongKind {
        /// What the caller asked for.
        expected: Kind,
        /// What the header says (a kind name, or the unknown byte).
        found: String,
    },
    /// The file's format version is newer than this build.
    #[error("file format version {0} is newer than this walship supports ({CODEC_VERSION})")]
    VersionTooNew(u8),
    /// Something else in the plain or zstd header is wrong.
    #[error("invalid file header: {0}")]
    InvalidHeader(&'static str),
    /// The page size in the header is not a power of two in 512..=65536.
    #[error("invalid page size {0}")]
    BadPageSize(u32),
    /// The file or a record in it ends early.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// The compressed stream is damaged (zstd said so, e.g. its content checksum).
    #[error("corrupt compressed data: {0}")]
    Corrupt(String),
    /// Reading the underlying stream failed.
    #[error("read failed: {0}")]
    Io(#[source] std::io::Error),
    /// A record starts with a byte that is no known tag.
    #[error("unknown record tag 0x{0:02x}")]
    UnknownTag(u8),
    /// A page record's page number is 0 or above 2^31.
    #[error("page number {0} is out of range (1..=2^31)")]
    BadPgno(u32),
    /// A commit record says the database has 0 pages.
    #[error("commit {0} says the database has 0 pages")]
    ZeroDbPages(u64),
    /// Commit txids in one file do not increase by exactly 1.
    #[error("commit txid {found} does not follow txid {prev}")]
    TxidNotConsecutive {
        /// The previous commit's txid.
        prev: u64,
        /// The txid found.
        found: u64,
    },
    /// A commit's time is earlier than the previous commit's.
    #[error("commit {txid} time {found} ms is before the previous commit's {prev} ms")]
    TimeWentBack {
        /// The commit's txid.
        txid: u64,
        /// The previous commit's time.
        prev: u64,
        /// The time found.
        found: u64,
    },
    /// Page records follow the last commit: an unfinished transaction.
    #[error("pages after the last commit")]
    PagesAfterLastCommit,
    /// The file holds no commit at all.
    #[error("file has no commit")]
    NoCommit,
    /// The end record's record count disagrees with the records read.
    #[error("end record counts {expected} records, file has {found}")]
    RecordCount {
        /// What the end record says.
        expected: u64,
        /// What was read.
        found: u64,
    },
    /// The end record's hash disagrees with the bytes read.
    #[error("content hash mismatch")]
    ContentHash,
    /// Bytes follow the end record (inside the zstd frame or after it).
    #[error("trailing data after the end record")]
    TrailingData,
    /// A snapshot's pages are not 1, 2, 3, ... in order.
    #[error("snapshot page {found} where page {expected} was expected")]
    SnapshotPageOrder {
        /// The page number expected next.
        expected: u32,
        /// The page number found.
        found: u32,
    },
    /// A part of a multi-part segment file does not continue the parts before it.
    #[error("a part of the file does not continue the one before: {0}")]
    PartMismatch(String),
    /// A snapshot has a record after its one commit.
    #[error("snapshot has records after its commit")]
    SnapshotAfterCommit,
    /// A snapshot's commit disagrees with the number of pages it holds.
    #[error("snapshot commit says {db_pages} pages, file holds {pages}")]
    SnapshotSize {
        /// What the commit says.
        db_pages: u32,
        /// How many pages were read.
        pages: u32,
    },
    /// `next` was called again after it returned an error.
    #[error("decoder used after an error")]
    AfterError,

    /// The replica holds no snapshot to restore from.
    #[error("replica has no snapshot")]
    NoSnapshot,
    /// The wanted generation is not in the listing.
    #[error("generation {0} is not in the replica")]
    NoGeneration(GenerationId),
    /// The wanted generation holds no snapshot.
    #[error("generation {0} has no snapshot")]
    GenerationWithoutSnapshot(GenerationId),
    /// The wanted position cannot be reached from any snapshot of its generation.
    #[error("position {want} cannot be restored: generation {} holds txids {first}..={last}", want.generation)]
    Unreachable {
        /// The position asked for.
        want: Position,
        /// Oldest snapshot txid of the generation.
        first: u64,
        /// Newest txid reachable from a snapshot of the generation.
        last: u64,
    },
    /// The wanted time is before every snapshot.
    #[error("nothing to restore at or before {want} ms: the oldest snapshot is at {oldest} ms")]
    TooEarly {
        /// The time asked for (ms since the Unix epoch).
        want: u64,
        /// The oldest snapshot time (ms since the Unix epoch).
        oldest: u64,
    },
}
