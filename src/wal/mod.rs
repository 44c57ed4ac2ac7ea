//! The SQLite write-ahead-log format (<https://www.sqlite.org/fileformat2.html#walformat>), pure.
//!
//! This module only interprets bytes handed to it: it never opens files. The capture side reads the
//! `-wal` file and asks this module which frames are valid.
//!
//! Invariants kept:
//! - A [`WalHeader`] only exists if its magic, version, page size and header checksum are valid.
//! - [`WalHeader::check_frame`] accepts a frame only if its salts equal the header's, its page
//!   number is not 0, its slices have the exact sizes, and its checksum continues the running
//!   checksum chain. The first frame it refuses is the end of the valid WAL: stale frames left over
//!   from before a WAL restart (other salts) or a torn write (bad checksum) are never accepted.
//! - No input can make these functions panic or allocate.

#![deny(missing_docs)]

/// Size of the WAL file header in bytes.
pub(crate) const WAL_HEADER_SIZE: usize = 32;
/// Size of each frame header in bytes (the page follows it).
pub(crate) const FRAME_HEADER_SIZE: usize = 24;

/// WAL magic for little-endian checksums.
const MAGIC_LE: u32 = 0x377f_0682;
/// WAL magic for big-endian checksums.
const MAGIC_BE: u32 = 0x377f_0683;
/// The only WAL format version SQLite has ever written.
const WAL_VERSION: u32 = 3_007_000;

/// The validated 32-byte header at the start of a WAL file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalHeader {
    /// Whether frame checksums read their words big-endian (magic 0x377f0683) rather than
    /// little-endian (0x377f0682). SQLite picks the machine's native order when it creates the WAL.
    pub big_endian_checksums: bool,
    /// Database page size in bytes: a power of two in 512..=65536.
    pub page_size: u32,
    /// Checkpoint sequence number; SQLite increments it on each WAL restart.
    pub checkpoint_seq: u32,
    /// Salt 1: SQLite increments it on each WAL restart; every valid frame repeats it.
    pub salt1: u32,
    /// Salt 2: a fresh random value on each WAL restart; every valid frame repeats it.
    pub salt2: u32,
    /// Checksum of the first 24 header bytes; it seeds the checksum chain of the frames.
    pub checksum: [u32; 2],
}

/// Why a WAL header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum WalError {
    /// Fewer than [`WAL_HEADER_SIZE`] bytes were given.
    #[error("wal header too short: {0} bytes, need 32")]
    TooShort(usize),
    /// The first word is neither WAL magic.
    #[error("not a wal file: bad magic 0x{0:08x}")]
    BadMagic(u32),
    /// The format version is not 3007000.
    #[error("unsupported wal format version {0}")]
    BadVersion(u32),
    /// The page size is not a power of two in 512..=65536.
    #[error("invalid wal page size {0}")]
    BadPageSize(u32),
    /// The header checksum does not match the first 24 bytes.
    #[error("wal header checksum mismatch")]
    HeaderChecksum,
}

/// The meaning of a valid frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    /// The database page this frame holds (1-based, never 0).
    pub pgno: u32,
    /// Database size in pages after this commit, 0 for a non-commit frame.
    pub commit_size: u32,
}

impl FrameHeader {
    /// Whether this frame ends a transaction.
    pub(crate) fn is_commit(&self) -> bool {
        self.commit_size != 0
    }
}

/// Reads the big-endian u32 at `at`, or `None` if `buf` is too short.
fn be32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    let arr: [u8; 4] = bytes.try_into().ok()?;
    Some(u32::from_be_bytes(arr))
}

impl WalHeader {
    /// Parses and validates the 32-byte header: magic 0x377f0682 (little-endian checksums) or
    /// 0x377f0683 (big-endian), version 3007000, page size a power of two 512..=65536, header
    /// checksum over the first 24 bytes. Bytes after the first 32 are ignored.
    pub(crate) fn parse(buf: &[u8]) -> Result<WalHeader, WalError> {
        let word = |i: usize| be32(buf, i * 4).ok_or(WalError::TooShort(buf.len()));
        if buf.len() < WAL_HEADER_SIZE {
            return Err(WalError::TooShort(buf.len()));
        }
        let big_endian_checksums = match word(0)? {
            MAGIC_LE => false,
            MAGIC_BE => true,
            other => return Err(WalError::BadMagic(other)),
        };
        let version = word(1)?;
        if version != WAL_VERSION {
            return Err(WalError::BadVersion(version));
        }
        let page_size = word(2)?;
        if !valid_page_size(page_size) {
            return Err(WalError::BadPageSize(page_size));
        }
        let header = WalHeader {
            big_endian_checksums,
            page_size,
            checkpoint_seq: word(3)?,
            salt1: word(4)?,
            salt2: word(5)?,
            checksum: [word(6)?, word(7)?],
        };
        let first24 = buf.get(..24).ok_or(WalError::TooShort(buf.len()))?;
        if checksum(big_endian_checksums, [0, 0], first24) != header.checksum {
            return Err(WalError::HeaderChecksum);
        }
        Ok(header)
    }

    /// Size of one frame (header plus page) in bytes.
    pub(crate) fn frame_size(&self) -> usize {
        FRAME_HEADER_SIZE + self.page_size as usize
    }

    /// Checks one frame (24-byte header + page of page_size bytes) given the running checksum (the
    /// header's `checksum` for frame 1, else the previous frame's result). Returns None when the
    /// frame is not valid (salts differ from the header's, checksum mismatch, page number 0, wrong
    /// slice lengths) — i.e. the end of the valid WAL. On success returns the frame's meaning and
    /// the running checksum for the next frame.
    pub(crate) fn check_frame(
        &self,
        running: [u32; 2],
        frame_header: &[u8],
        page: &[u8],
    ) -> Option<(FrameHeader, [u32; 2])> {
        if frame_header.len() != FRAME_HEADER_SIZE || page.len() != self.page_size as usize {
            return None;
        }
        let pgno = be32(frame_header, 0)?;
        let commit_size = be32(frame_header, 4)?;
        if pgno == 0
            || be32(frame_header, 8)? != self.salt1
            || be32(frame_header, 12)? != self.salt2
        {
            return None;
        }
        let stored = [be32(frame_header, 16)?, be32(frame_header, 20)?];
        let sum = checksum(self.big_endian_checksums, running, frame_header.get(..8)?);
        let sum = checksum(self.big_endian_checksums, sum, page);
        if sum != stored {
            return None;
        }
        Some((FrameHeader { pgno, commit_size }, sum))
    }
}

/// Whether `n` is a page size SQLite can use: a power of two in 512..=65536.
pub(crate) fn valid_page_size(n: u32) -> bool {
    n.is_power_of_two() && (512..=65536).contains(&n)
}

/// SQLite's WAL checksum over `data` (length a multiple of 8) starting from `init`.
///
/// Words are read big-endian if `big_endian` is set, else little-endian. Trailing bytes beyond the
/// last multiple of 8 are ignored (SQLite never checksums such data).
pub(crate) fn checksum(big_endian: bool, init: [u32; 2], data: &[u8]) -> [u32; 2] {
    let [mut s0, mut s1] = init;
    for chunk in data.chunks_exact(8) {
        let (a, b) = chunk.split_at(4);
        let (mut x0, mut x1) = ([0u8; 4], [0u8; 4]);
        x0.copy_from_slice(a);
        x1.copy_from_slice(b);
        let (x0, x1) = if big_endian {
            (u32::from_be_bytes(x0), u32::from_be_bytes(x1))
        } else {
            (u32::from_le_bytes(x0), u32::from_le_bytes(x1))
        };
        s0 = s0.wrapping_add(x0).wrapping_add(s1);
        s1 = s1.wrapping_add(x1).wrapping_add(s0);
    }
    [s0, s1]
}

/// Where a reader stands in a WAL, in a form a file event can be checked against without
/// parsing the WAL: its salts and the offset of the first frame the reader does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalMark {
    /// Salts of the WAL the reader holds frames of.
    pub salt1: u32,
    /// Second salt.
    pub salt2: u32,
    /// Offset of the first frame the reader does not hold.
    pub next: u64,
}

impl WalMark {
    /// The mark of a reader holding the first `frames` frames of a WAL with these salts and
    /// page size; `None` if the offset does not fit in 64 bits.
    pub(crate) fn after(salt1: u32, salt2: u32, page_size: u32, frames: u64) -> Option<WalMark> {
        let frame = (FRAME_HEADER_SIZE as u64).checked_add(u64::from(page_size))?;
        let next = frames
            .checked_mul(frame)?
            .checked_add(WAL_HEADER_SIZE as u64)?;
        Some(WalMark { salt1, salt2, next })
    }

    /// True if the WAL holds nothing past the mark, judged from its first bytes (`header`) and
    /// those at the mark's offset (`frame`, shorter where the file ends): the header still has
    /// the mark's salts, and no frame header with those salts begins at the offset. A frame
    /// written past the mark, or a restarted WAL (new salts in the header), says false; so
    /// does anything unreadable (a header cut short).
    pub(crate) fn holds_all(&self, header: &[u8], frame: &[u8]) -> bool {
        let salts = |b: &[u8], at: usize| Some((be32(b, at)?, be32(b, at + 4)?));
        let mine = Some((self.salt1, self.salt2));
        salts(header, 16) == mine && salts(frame, 8) != mine
    }
}

#[cfg(test)]
mod tests;
