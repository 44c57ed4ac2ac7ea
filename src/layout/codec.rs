//! Snapshot and segment files: streaming encoder and decoder, bounded memory both ways.
//!
//! A file is a 16-byte plain header — magic `b"WALSHIP\0"`, kind (`b'S'` snapshot, `b'G'`
//! segment), format version ([`CODEC_VERSION`]), two zero bytes, page size (u32 big-endian) —
//! followed by exactly one zstd frame with its content checksum on. The frame's content is a
//! sequence of records, each a 1-byte tag then big-endian integers:
//! - `P`: u32 pgno (1..=2^31), then exactly page-size bytes of page content;
//! - `C`: u64 txid, u64 time_ms, u32 db_pages (>= 1), u64 db_checksum: commits the pages since the
//!   previous `C`;
//! - `E`: u64 count of the `P` and `C` records before it, u64 xxh3_64 of all content bytes before
//!   this `E` tag. Nothing may follow it, neither in the frame nor after the frame.
//!
//! Invariants kept, by encoder and decoder alike (one private set of rules checks both):
//! commit txids in a file increase by exactly 1 and their times never go back; every page belongs
//! to a commit (no pages after the last one); a file has at least one commit; a snapshot holds one
//! commit and pages 1..=db_pages, each once, in order. The decoder holds one page buffer plus
//! zstd's window (at most 2^27 bytes), whatever the input says; it never panics on any input.

use super::LayoutError;
use std::fmt;
use std::io::{self, BufRead, BufReader, Chain, Cursor, Read, Write};
use xxhash_rust::xxh3::Xxh3;

/// The version of the file format this build writes and the newest it reads.
pub(crate) const CODEC_VERSION: u8 = 1;
/// The magic at the start of every snapshot and segment file.
const MAGIC: &[u8; 8] = b"WALSHIP\0";
/// Size of the plain header before the zstd frame.
pub(crate) const HEADER_SIZE: usize = 16;
const TAG_PAGE: u8 = b'P';
const TAG_COMMIT: u8 = b'C';
const TAG_END: u8 = b'E';
/// Highest page number a page record may carry.
const MAX_PGNO: u32 = 1 << 31;
/// Largest zstd window the decoder accepts (2^27 = 128 MiB, what level 22 uses at most).
const WINDOW_LOG_MAX: u32 = 27;
/// zstd frame magic, little-endian on the wire.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Bit of the zstd frame header descriptor that says a content checksum follows the frame.
const ZSTD_CHECKSUM_FLAG: u8 = 0x04;
/// Bits of that descriptor that zstd leaves unused or reserved (it writes them as 0; a decoder
/// ignores the unused one, so a flipped bit there would go unnoticed without this check).
const ZSTD_UNUSED_FLAGS: u8 = 0x18;

/// Which of the two file kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The whole database at one commit.
    Snapshot,
    /// A run of consecutive commits.
    Segment,
}

impl Kind {
    /// The kind byte in the header.
    fn byte(self) -> u8 {
        match self {
            Kind::Snapshot => b'S',
            Kind::Segment => b'G',
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            b'S' => Some(Kind::Snapshot),
            b'G' => Some(Kind::Segment),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Snapshot => "snapshot",
            Kind::Segment => "segment",
        })
    }
}

/// A commit record: the transaction `txid` ends here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Commit {
    /// The transaction's id, counting commits within a generation.
    pub txid: u64,
    /// When it was captured, ms since the Unix epoch.
    pub time_ms: u64,
    /// Database size in pages after the commit (>= 1).
    pub db_pages: u32,
    /// The whole-database checksum after the commit (see [`super::checksum`]).
    pub db_checksum: u64,
}

/// One decoded record. A page's data is borrowed from the decoder's single page buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    /// The content of page `pgno` (exactly page-size bytes).
    Page {
        /// The page number, 1..=2^31.
        pgno: u32,
        /// The page content.
        data: &'a [u8],
    },
    /// The end of a transaction.
    Commit(Commit),
}

/// The ordering rules of a file's records, checked by the encoder and the decoder alike.
#[derive(Debug)]
struct Rules {
    kind: Kind,
    /// P and C records accepted so far.
    records: u64,
    /// The last commit accepted.
    last: Option<Commit>,
    /// Pages accepted since the last commit.
    pending_pages: u32,
}

impl Rules {
    fn new(kind: Kind) -> Self {
        Rules {
            kind,
            records: 0,
            last: None,
            pending_pages: 0,
        }
    }

    fn page(&mut self, pgno: u32) -> Result<(), LayoutError> {
        if pgno == 0 || pgno > MAX_PGNO {
            return Err(LayoutError::BadPgno(pgno));
        }
        if self.kind == Kind::Snapshot {
            if self.last.is_some() {
                return Err(LayoutError::SnapshotAfterCommit);
            }
            let expected = self.pending_pages.saturating_add(1);
            if pgno != expected {
                return Err(LayoutError::SnapshotPageOrder {
                    expected,
                    found: pgno,
                });
            }
        }
        self.pending_pages = self.pending_pages.saturating_add(1);
        self.records = self.records.saturating_add(1);
        Ok(())
    }

    fn commit(&mut self, c: &Commit) -> Result<(), LayoutError> {
        if c.db_pages == 0 {
            return Err(LayoutError::ZeroDbPages(c.txid));
        }
        if let Some(prev) = self.last {
            if self.kind == Kind::Snapshot {
                return Err(LayoutError::SnapshotAfterCommit);
            }
            if prev.txid.checked_add(1) != Some(c.txid) {
                return Err(LayoutError::TxidNotConsecutive {
                    prev: prev.txid,
                    found: c.txid,
                });
            }
            if c.time_ms < prev.time_ms {
                return Err(LayoutError::TimeWentBack {
                    txid: c.txid,
                    prev: prev.time_ms,
                    found: c.time_ms,
                });
            }
        }
        if self.kind == Kind::Snapshot && c.db_pages != self.pending_pages {
            return Err(LayoutError::SnapshotSize {
                db_pages: c.db_pages,
                pages: self.pending_pages,
            });
        }
        self.last = Some(*c);
        self.pending_pages = 0;
        self.records = self.records.saturating_add(1);
        Ok(())
    }

    fn end(&self) -> Result<(), LayoutError> {
        if self.last.is_none() {
            return Err(LayoutError::NoCommit);
        }
        if self.pending_pages > 0 {
            return Err(LayoutError::PagesAfterLastCommit);
        }
        Ok(())
    }
}

fn valid_page_size(n: u32) -> bool {
    crate::wal::valid_page_size(n)
}

fn invalid_input(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// Writes one snapshot or segment file to a stream. Refuses (with `InvalidInput`) anything the
/// decoder would refuse. After any error the encoder must be dropped: the file is unusable.
pub(crate) struct Encoder<W: Write> {
    z: zstd::stream::write::Encoder<'static, W>,
    page_size: u32,
    rules: Rules,
    hasher: Xxh3,
    raw: u64,
}

impl<W: Write> Encoder<W> {
    /// Writes the plain header and starts the zstd frame at `zstd_level`.
    pub(crate) fn new(mut w: W, kind: Kind, page_size: u32, zstd_level: i32) -> io::Result<Self> {
        if !valid_page_size(page_size) {
            return Err(invalid_input(LayoutError::BadPageSize(page_size)));
        }
        let mut header = [0u8; HEADER_SIZE];
        header[..8].copy_from_slice(MAGIC);
        header[8] = kind.byte();
        header[9] = CODEC_VERSION;
        header[12..].copy_from_slice(&page_size.to_be_bytes());
        w.write_all(&header)?;
        let mut z = zstd::stream::write::Encoder::new(w, zstd_level)?;
        z.include_checksum(true)?;
        Ok(Encoder {
            z,
            page_size,
            rules: Rules::new(kind),
            hasher: Xxh3::new(),
            raw: 0,
        })
    }

    /// Compresses with `n` worker threads (for large files: snapshots); the output is the same
    /// format, one zstd frame.
    pub(crate) fn workers(&mut self, n: u32) -> io::Result<()> {
        self.z.multithread(n)?;
        // Small jobs keep the workers' buffers (and so walship's peak RSS) small.
        self.z
            .set_parameter(zstd::stream::raw::CParameter::JobSize(512 << 10))
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.z.write_all(bytes)?;
        self.hasher.update(bytes);
        self.raw = self.raw.saturating_add(bytes.len() as u64);
        Ok(())
    }

    /// Adds page `pgno`; `data.len()` must equal the page size (`InvalidInput` otherwise).
    pub(crate) fn page(&mut self, pgno: u32, data: &[u8]) -> io::Result<()> {
        if data.len() != self.page_size as usize {
            return Err(invalid_input(format!(
                "page {pgno} has {} bytes, the page size is {}",
                data.len(),
                self.page_size
            )));
        }
        self.rules.page(pgno).map_err(invalid_input)?;
        let mut head = [0u8; 5];
        head[0] = TAG_PAGE;
        head[1..].copy_from_slice(&pgno.to_be_bytes());
        self.put(&head)?;
        self.put(data)
    }

    /// Commits the pages added since the previous commit.
    pub(crate) fn commit(&mut self, c: &Commit) -> io::Result<()> {
        self.rules.commit(c).map_err(invalid_input)?;
        let mut rec = [0u8; 29];
        rec[0] = TAG_COMMIT;
        rec[1..9].copy_from_slice(&c.txid.to_be_bytes());
        rec[9..17].copy_from_slice(&c.time_ms.to_be_bytes());
        rec[17..21].copy_from_slice(&c.db_pages.to_be_bytes());
        rec[21..29].copy_from_slice(&c.db_checksum.to_be_bytes());
        self.put(&rec)
    }

    /// Writes the end record, ends the zstd frame and returns the stream (not flushed or synced).
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.rules.end().map_err(invalid_input)?;
        let mut rec = [0u8; 17];
        rec[0] = TAG_END;
        rec[1..9].copy_from_slice(&self.rules.records.to_be_bytes());
        rec[9..17].copy_from_slice(&self.hasher.digest().to_be_bytes());
        self.z.write_all(&rec)?;
        self.z.finish()
    }

    /// Decompressed bytes written so far (the caller cuts segments by size).
    pub(crate) fn raw_bytes(&self) -> u64 {
        self.raw
    }
}

/// The underlying reader, remembering whether it failed (to tell read errors from corruption).
struct Source<R> {
    inner: R,
    failed: bool,
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.inner.read(buf);
        if matches!(&r, Err(e) if e.kind() != io::ErrorKind::Interrupted) {
            self.failed = true;
        }
        r
    }
}

/// The zstd frame's first bytes (read to check them), then the rest of the stream.
type Framed<R> = BufReader<Chain<Cursor<[u8; 5]>, Source<R>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Done,
    Failed,
}

/// What one step of decoding produced.
enum Step {
    Page(u32),
    Commit(Commit),
    End,
}

/// Reads one snapshot or segment file from a stream, checking everything.
pub(crate) struct Decoder<R: Read> {
    z: zstd::stream::read::Decoder<'static, Framed<R>>,
    page_size: u32,
    page: Vec<u8>,
    rules: Rules,
    hasher: Xxh3,
    state: State,
}

/// Reads exactly `buf.len()` bytes from a stream that is not zstd; EOF is truncation.
fn read_plain<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), LayoutError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => LayoutError::Truncated(what),
        _ => LayoutError::Io(e),
    })
}

impl<R: Read> Decoder<R> {
    /// Reads and validates the header: magic, version (newer is a clear error), kind, reserved
    /// bytes, page size (a power of two in 512..=65536), and that the zstd frame carries a content
    /// checksum.
    pub(crate) fn new(r: R, expected: Kind) -> Result<Self, LayoutError> {
        let mut src = Source {
            inner: r,
            failed: false,
        };
        let mut header = [0u8; HEADER_SIZE];
        read_plain(&mut src, &mut header, "file header")?;
        let [m0, m1, m2, m3, m4, m5, m6, m7, kind, version, r0, r1, p0, p1, p2, p3] = header;
        if [m0, m1, m2, m3, m4, m5, m6, m7] != *MAGIC {
            if header.starts_with(b"age-encr") {
                return Err(LayoutError::Encrypted);
            }
            return Err(LayoutError::BadMagic);
        }
        if version > CODEC_VERSION {
            return Err(LayoutError::VersionTooNew(version));
        }
        if version == 0 {
            return Err(LayoutError::InvalidHeader("format version 0"));
        }
        match Kind::from_byte(kind) {
            Some(k) if k == expected => {}
            Some(k) => {
                return Err(LayoutError::WrongKind {
                    expected,
                    found: k.to_string(),
                })
            }
            None => {
                return Err(LayoutError::WrongKind {
                    expected,
                    found: format!("unknown kind 0x{kind:02x}"),
                })
            }
        }
        if [r0, r1] != [0, 0] {
            return Err(LayoutError::InvalidHeader("reserved bytes are not zero"));
        }
        let page_size = u32::from_be_bytes([p0, p1, p2, p3]);
        if !valid_page_size(page_size) {
            return Err(LayoutError::BadPageSize(page_size));
        }
        let mut zhead = [0u8; 5];
        read_plain(&mut src, &mut zhead, "no compressed data")?;
        let [z0, z1, z2, z3, fhd] = zhead;
        if u32::from_le_bytes([z0, z1, z2, z3]) != ZSTD_MAGIC {
            return Err(LayoutError::InvalidHeader("not a zstd frame"));
        }
        if fhd & ZSTD_UNUSED_FLAGS != 0 {
            return Err(LayoutError::InvalidHeader(
                "the zstd frame header has unused bits set",
            ));
        }
        if fhd & ZSTD_CHECKSUM_FLAG == 0 {
            return Err(LayoutError::InvalidHeader(
                "the zstd frame has no content checksum",
            ));
        }
        let framed = BufReader::new(Cursor::new(zhead).chain(src));
        let mut z = zstd::stream::read::Decoder::with_buffer(framed)
            .map_err(|e| LayoutError::Corrupt(e.to_string()))?
            .single_frame();
        z.window_log_max(WINDOW_LOG_MAX)
            .map_err(|e| LayoutError::Corrupt(e.to_string()))?;
        Ok(Decoder {
            z,
            page_size,
            page: vec![0; page_size as usize],
            rules: Rules::new(expected),
            hasher: Xxh3::new(),
            state: State::Running,
        })
    }

    /// The page size from the header.
    pub(crate) fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The next record; `None` only after a valid end record at the end of the input. Any error
    /// is final: later calls return [`LayoutError::AfterError`].
    #[allow(clippy::should_implement_trait)] // records borrow the decoder: not an Iterator
    pub(crate) fn next(&mut self) -> Result<Option<Record<'_>>, LayoutError> {
        match self.state {
            State::Done => return Ok(None),
            State::Failed => return Err(LayoutError::AfterError),
            State::Running => {}
        }
        match self.step() {
            Ok(Step::Page(pgno)) => Ok(Some(Record::Page {
                pgno,
                data: &self.page,
            })),
            Ok(Step::Commit(c)) => Ok(Some(Record::Commit(c))),
            Ok(Step::End) => {
                self.state = State::Done;
                Ok(None)
            }
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// Turns an error from the zstd reader into what went wrong.
    fn zstd_error(&self, e: io::Error) -> LayoutError {
        let source_failed = self.z.get_ref().get_ref().get_ref().1.failed;
        if source_failed {
            LayoutError::Io(e)
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            LayoutError::Truncated("compressed stream ends mid-frame")
        } else {
            LayoutError::Corrupt(e.to_string())
        }
    }

    /// Fills `buf` with decompressed bytes; the end of the frame before that is truncation.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), LayoutError> {
        let mut at = 0;
        while let Some(rest) = buf.get_mut(at..).filter(|r| !r.is_empty()) {
            match self.z.read(rest) {
                Ok(0) => return Err(LayoutError::Truncated(what)),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.zstd_error(e)),
            }
        }
        Ok(())
    }

    /// Reads the page content into the page buffer.
    fn fill_page(&mut self) -> Result<(), LayoutError> {
        let mut page = std::mem::take(&mut self.page);
        let r = self.fill(&mut page, "page record cut short");
        self.page = page;
        r
    }

    fn step(&mut self) -> Result<Step, LayoutError> {
        let mut tag = [0u8; 1];
        self.fill(&mut tag, "no end record")?;
        match tag[0] {
            TAG_PAGE => {
                let mut pgno = [0u8; 4];
                self.fill(&mut pgno, "page record cut short")?;
                let n = u32::from_be_bytes(pgno);
                self.rules.page(n)?;
                self.fill_page()?;
                self.hasher.update(&tag);
                self.hasher.update(&pgno);
                self.hasher.update(&self.page);
                Ok(Step::Page(n))
            }
            TAG_COMMIT => {
                let mut rec = [0u8; 28];
                self.fill(&mut rec, "commit record cut short")?;
                self.hasher.update(&tag);
                self.hasher.update(&rec);
                let (t, rest) = rec.split_at(8);
                let (m, rest) = rest.split_at(8);
                let (p, s) = rest.split_at(4);
                let c = Commit {
                    txid: be64(t),
                    time_ms: be64(m),
                    db_pages: be32(p),
                    db_checksum: be64(s),
                };
                self.rules.commit(&c)?;
                Ok(Step::Commit(c))
            }
            TAG_END => {
                let mut rec = [0u8; 16];
                self.fill(&mut rec, "end record cut short")?;
                let (count, hash) = rec.split_at(8);
                let (count, hash) = (be64(count), be64(hash));
                self.rules.end()?;
                if count != self.rules.records {
                    return Err(LayoutError::RecordCount {
                        expected: count,
                        found: self.rules.records,
                    });
                }
                if hash != self.hasher.digest() {
                    return Err(LayoutError::ContentHash);
                }
                self.expect_end()?;
                Ok(Step::End)
            }
            other => Err(LayoutError::UnknownTag(other)),
        }
    }

    /// Checks that the zstd frame ends right here (verifying its checksum) and nothing follows.
    fn expect_end(&mut self) -> Result<(), LayoutError> {
        let mut probe = [0u8; 1];
        loop {
            match self.z.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => return Err(LayoutError::TrailingData),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.zstd_error(e)),
            }
        }
        loop {
            match self.z.get_mut().fill_buf() {
                Ok([]) => return Ok(()),
                Ok(_) => return Err(LayoutError::TrailingData),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LayoutError::Io(e)),
            }
        }
    }
}

/// Big-endian u32 from (at most) the first 4 bytes of `b`; 0-padded if shorter.
fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    for (d, s) in a.iter_mut().zip(b) {
        *d = *s;
    }
    u32::from_be_bytes(a)
}

/// Big-endian u64 from (at most) the first 8 bytes of `b`; 0-padded if shorter.
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    for (d, s) in a.iter_mut().zip(b) {
        *d = *s;
    }
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests;
