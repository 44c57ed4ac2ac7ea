//! Snapshot and segment files: streaming encoder and decoder, bounded memory both ways.
//!
//! A *part* is a 16-byte plain header — magic `b"WALSHIP\0"`, kind (`b'S'` snapshot, `b'G'`
//! segment), format version ([`CODEC_VERSION`]), two zero bytes, page size (u32 big-endian) —
//! followed by exactly one zstd frame with its content checksum on. The frame's content is a
//! sequence of records, each a 1-byte tag then big-endian integers:
//! - `P`: u32 pgno (1..=2^31), then exactly page-size bytes of page content;
//! - `C`: u64 txid, u64 time_ms, u32 db_pages (>= 1), u64 db_checksum: commits the pages since the
//!   previous `C`;
//! - `E`: u64 count of the part's `P` and `C` records before it, u64 xxh3_64 of all the part's
//!   content bytes before this `E` tag. Nothing may follow it in the frame.
//!
//! A snapshot file is exactly one part. A segment file is one or more whole parts, one after the
//! other (what the encoder writes is one part; appending another encoder's output to a segment
//! file makes a longer one): after a part's frame, either the input ends or the next part's
//! header follows, with the same kind, format version and page size. Each part's `E` record
//! checks that part alone; the record rules below run across parts as if they were one.
//!
//! Invariants kept, by encoder and decoder alike (one private set of rules checks both):
//! commit txids in a file increase by exactly 1 and their times never go back, across parts
//! too; every page belongs to a commit of its part (no pages after a part's last commit); every
//! part has at least one commit; a snapshot holds one commit and pages 1..=db_pages, each once,
//! in order. The decoder holds one page buffer plus one zstd window (at most 2^27 bytes; a
//! part's frame is dropped before the next one starts), whatever the input says; it never
//! panics on any input. It reports the last commit of the last part it verified to the end
//! ([`Decoder::last_complete`]): a caller that needs commits only up to some txid can tell a
//! torn or damaged part after them (a reader raced an append, a crash cut it) from damage
//! inside them.

use super::LayoutError;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
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
    /// P and C records accepted so far in the current part.
    records: u64,
    /// The last commit accepted (in any part: the rules carry over from part to part).
    last: Option<Commit>,
    /// Whether the current part has a commit.
    part_commit: bool,
    /// Pages accepted since the last commit.
    pending_pages: u32,
}

impl Rules {
    fn new(kind: Kind) -> Self {
        Rules {
            kind,
            records: 0,
            last: None,
            part_commit: false,
            pending_pages: 0,
        }
    }

    /// A new part of the file begins (after a complete one: no pages pending).
    fn next_part(&mut self) {
        self.records = 0;
        self.part_commit = false;
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
        self.part_commit = true;
        self.pending_pages = 0;
        self.records = self.records.saturating_add(1);
        Ok(())
    }

    fn end(&self) -> Result<(), LayoutError> {
        if !self.part_commit {
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

/// A zstd compression context, handed from one file's [`Encoder`] to the next. A new context
/// per file is an allocation of its tables and their clearing, and at 100 one-row commits/s
/// every capture writes a segment: kept by capture, walship's CPU per commit fell by 3-5%, and
/// its resident memory grew by 0.5-0.9 MiB (twenty-ninth session in docs/PERFORMANCE.md). An
/// encoder starts a new session on it: nothing of the previous file reaches the next one,
/// whose bytes are those a new context would write.
pub(crate) struct Compressor(zstd::stream::raw::Encoder<'static>);

impl Compressor {
    /// A new context.
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Compressor(zstd::stream::raw::Encoder::new(0)?))
    }
}

/// Writes one snapshot or segment file to a stream. Refuses (with `InvalidInput`) anything the
/// decoder would refuse. After any error the encoder must be dropped: the file is unusable.
pub(crate) struct Encoder<W: Write> {
    z: zstd::stream::zio::Writer<W, zstd::stream::raw::Encoder<'static>>,
    page_size: u32,
    rules: Rules,
    hasher: Xxh3,
    raw: u64,
}

impl<W: Write> Encoder<W> {
    /// Writes the plain header and starts the zstd frame at `zstd_level`.
    pub(crate) fn new(w: W, kind: Kind, page_size: u32, zstd_level: i32) -> io::Result<Self> {
        Self::with_compressor(w, kind, page_size, zstd_level, Compressor::new()?)
    }

    /// [`Encoder::new`] on a context that an earlier encoder gave back
    /// ([`Encoder::finish_keep`]).
    pub(crate) fn with_compressor(
        mut w: W,
        kind: Kind,
        page_size: u32,
        zstd_level: i32,
        c: Compressor,
    ) -> io::Result<Self> {
        use zstd::stream::raw::Operation;
        use zstd::zstd_safe::CParameter;
        let mut z = c.0;
        // A new session: of the last file only the parameters stay, and they are set again.
        z.reinit()?;
        z.set_parameter(CParameter::CompressionLevel(zstd_level))?;
        z.set_parameter(CParameter::ChecksumFlag(true))?;
        if !valid_page_size(page_size) {
            return Err(invalid_input(LayoutError::BadPageSize(page_size)));
        }
        let mut header = [0u8; HEADER_SIZE];
        header[..8].copy_from_slice(MAGIC);
        header[8] = kind.byte();
        header[9] = CODEC_VERSION;
        header[12..].copy_from_slice(&page_size.to_be_bytes());
        w.write_all(&header)?;
        Ok(Encoder {
            z: zstd::stream::zio::Writer::new(w, z),
            page_size,
            rules: Rules::new(kind),
            hasher: Xxh3::new(),
            raw: 0,
        })
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
    pub(crate) fn finish(self) -> io::Result<W> {
        Ok(self.finish_keep()?.0)
    }

    /// [`Encoder::finish`], and the compression context for the next file.
    pub(crate) fn finish_keep(mut self) -> io::Result<(W, Compressor)> {
        self.rules.end().map_err(invalid_input)?;
        let mut rec = [0u8; 17];
        rec[0] = TAG_END;
        rec[1..9].copy_from_slice(&self.rules.records.to_be_bytes());
        rec[9..17].copy_from_slice(&self.hasher.digest().to_be_bytes());
        self.z.write_all(&rec)?;
        self.z.finish()?;
        let (w, z) = self.z.into_inner();
        Ok((w, Compressor(z)))
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

/// The input of one part's zstd frame: the frame's first bytes (read to check them), then the
/// rest of the stream. Handed back when the frame ends, for the next part.
struct Input<R> {
    head: [u8; 5],
    at: usize,
    inner: BufReader<Source<R>>,
}

impl<R: Read> Read for Input<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let avail = self.fill_buf()?;
            let n = avail.len().min(buf.len());
            if let (Some(d), Some(s)) = (buf.get_mut(..n), avail.get(..n)) {
                d.copy_from_slice(s);
            }
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for Input<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self.head.get(self.at..) {
            Some(rest) if !rest.is_empty() => Ok(rest),
            _ => self.inner.fill_buf(),
        }
    }

    fn consume(&mut self, n: usize) {
        if self.at < self.head.len() {
            self.at = (self.at + n).min(self.head.len());
        } else {
            self.inner.consume(n);
        }
    }
}

type Frame<R> = zstd::stream::read::Decoder<'static, Input<R>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Done,
    Failed,
}

/// What one step of decoding produced (`None` for the end of the file).
enum Step {
    Page(u32),
    Commit(Commit),
}

/// Reads one snapshot or segment file from a stream, checking everything.
///
/// A segment file may hold several parts (see the module doc); the decoder reads them as one
/// run of records and tells where it stands: [`Decoder::last_complete`] is the last commit of
/// the last part whose end record was verified, so a caller can tell a damaged or torn part
/// after the ones it needs from damage inside them.
pub(crate) struct Decoder<R: Read> {
    /// The current part's frame; `None` only between parts (and after the end).
    z: Option<Frame<R>>,
    kind: Kind,
    version: u8,
    page_size: u32,
    page: Vec<u8>,
    rules: Rules,
    /// The hash of the current part's content so far.
    hasher: Xxh3,
    state: State,
    /// Parts whose end record (and frame checksum) was verified.
    parts_complete: u64,
    /// The last commit of the last complete part.
    last_complete: Option<Commit>,
}

/// Reads exactly `buf.len()` bytes from a stream that is not zstd; EOF is truncation.
fn read_plain<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), LayoutError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => LayoutError::Truncated(what),
        _ => LayoutError::Io(e),
    })
}

/// What a part's plain header says.
struct Header {
    kind: Kind,
    version: u8,
    page_size: u32,
}

/// Reads and validates a part's plain header (`what` names it in a truncation error) and the
/// first bytes of its zstd frame.
fn read_header<R: Read>(
    src: &mut R,
    expected: Kind,
    what: &'static str,
) -> Result<(Header, [u8; 5]), LayoutError> {
    let mut header = [0u8; HEADER_SIZE];
    read_plain(src, &mut header, what)?;
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
    let kind = match Kind::from_byte(kind) {
        Some(k) if k == expected => k,
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
    };
    if [r0, r1] != [0, 0] {
        return Err(LayoutError::InvalidHeader("reserved bytes are not zero"));
    }
    let page_size = u32::from_be_bytes([p0, p1, p2, p3]);
    if !valid_page_size(page_size) {
        return Err(LayoutError::BadPageSize(page_size));
    }
    let mut zhead = [0u8; 5];
    read_plain(src, &mut zhead, "no compressed data")?;
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
    Ok((
        Header {
            kind,
            version,
            page_size,
        },
        zhead,
    ))
}

/// Starts decompressing one part's frame.
fn open_frame<R: Read>(input: Input<R>) -> Result<Frame<R>, LayoutError> {
    let mut z = zstd::stream::read::Decoder::with_buffer(input)
        .map_err(|e| LayoutError::Corrupt(e.to_string()))?
        .single_frame();
    z.window_log_max(WINDOW_LOG_MAX)
        .map_err(|e| LayoutError::Corrupt(e.to_string()))?;
    Ok(z)
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
        let (h, head) = read_header(&mut src, expected, "file header")?;
        let input = Input {
            head,
            at: 0,
            inner: BufReader::new(src),
        };
        Ok(Decoder {
            z: Some(open_frame(input)?),
            kind: h.kind,
            version: h.version,
            page_size: h.page_size,
            page: vec![0; h.page_size as usize],
            rules: Rules::new(expected),
            hasher: Xxh3::new(),
            state: State::Running,
            parts_complete: 0,
            last_complete: None,
        })
    }

    /// The page size from the header.
    pub(crate) fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The last commit of the last part whose end record was verified (`None` before the
    /// first part is). Records read after it belong to a part that began after it: an error
    /// now is inside such a part when this is at or beyond the commit the caller needs.
    pub(crate) fn last_complete(&self) -> Option<Commit> {
        self.last_complete
    }

    /// How many parts were read and verified to their end record.
    #[cfg(test)]
    pub(crate) fn parts_complete(&self) -> u64 {
        self.parts_complete
    }

    /// The next record; `None` only after a valid end record at the end of the input. Any error
    /// is final: later calls return [`LayoutError::AfterError`].
    #[allow(clippy::should_implement_trait)] // records borrow the decoder: not an Iterator
    pub(crate) fn next(&mut self) -> Result<Option<Record<'_>>, LayoutError> {
        Ok(self.advance()?.map(|s| self.record(s)))
    }

    /// [`Decoder::next`], with what [`Decoder::last_complete`] says right after it: the last
    /// commit of the parts complete before the record's own part (records borrow the decoder).
    pub(crate) fn next_placed(
        &mut self,
    ) -> Result<Option<(Record<'_>, Option<Commit>)>, LayoutError> {
        let step = self.advance()?;
        let done = self.last_complete;
        Ok(step.map(|s| (self.record(s), done)))
    }

    /// One step, keeping the state: `None` at the end.
    fn advance(&mut self) -> Result<Option<Step>, LayoutError> {
        match self.state {
            State::Done => return Ok(None),
            State::Failed => return Err(LayoutError::AfterError),
            State::Running => {}
        }
        match self.step() {
            Ok(None) => {
                self.state = State::Done;
                Ok(None)
            }
            Ok(s) => Ok(s),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// The record a step produced.
    fn record(&self, s: Step) -> Record<'_> {
        match s {
            Step::Page(pgno) => Record::Page {
                pgno,
                data: &self.page,
            },
            Step::Commit(c) => Record::Commit(c),
        }
    }

    /// The current frame (an internal error between parts, which `step` never leaves).
    fn frame(&mut self) -> Result<&mut Frame<R>, LayoutError> {
        self.z
            .as_mut()
            .ok_or(LayoutError::Truncated("no compressed data"))
    }

    /// Turns an error from the zstd reader into what went wrong.
    fn zstd_error(&self, e: io::Error) -> LayoutError {
        let source_failed = self
            .z
            .as_ref()
            .is_some_and(|z| z.get_ref().inner.get_ref().failed);
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
            match self.frame()?.read(rest) {
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

    fn step(&mut self) -> Result<Option<Step>, LayoutError> {
        loop {
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
                    return Ok(Some(Step::Page(n)));
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
                    return Ok(Some(Step::Commit(c)));
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
                    self.expect_frame_end()?;
                    self.parts_complete = self.parts_complete.saturating_add(1);
                    self.last_complete = self.rules.last;
                    if !self.next_part()? {
                        return Ok(None);
                    }
                }
                other => return Err(LayoutError::UnknownTag(other)),
            }
        }
    }

    /// Checks that the zstd frame ends right here (verifying its checksum).
    fn expect_frame_end(&mut self) -> Result<(), LayoutError> {
        let mut probe = [0u8; 1];
        loop {
            match self.frame()?.read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(LayoutError::TrailingData),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.zstd_error(e)),
            }
        }
    }

    /// After a part's frame: `false` at the end of the input; otherwise reads the next part's
    /// header (a segment only: a snapshot is one part) and starts its frame.
    fn next_part(&mut self) -> Result<bool, LayoutError> {
        let z = self
            .z
            .take()
            .ok_or(LayoutError::Truncated("no compressed data"))?;
        let mut src = z.finish().inner;
        loop {
            match src.fill_buf() {
                Ok([]) => return Ok(false),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LayoutError::Io(e)),
            }
        }
        if self.kind == Kind::Snapshot {
            return Err(LayoutError::TrailingData);
        }
        let (h, head) = read_header(&mut src, self.kind, "part header cut short")?;
        if h.version != self.version {
            return Err(LayoutError::PartMismatch(format!(
                "format version {} after version {}",
                h.version, self.version
            )));
        }
        if h.page_size != self.page_size {
            return Err(LayoutError::PartMismatch(format!(
                "page size {} after page size {}",
                h.page_size, self.page_size
            )));
        }
        self.rules.next_part();
        self.hasher.reset();
        self.z = Some(open_frame(Input {
            head,
            at: 0,
            inner: src,
        })?);
        Ok(true)
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

/// Whether a decoding error `e` in the segment file named `f` only ends its content, given
/// `done`, the last commit of the parts verified before it (see the module doc): `None` when it
/// is an error (damage inside the named range, a read error, anything in a snapshot);
/// `Some(true)` for a part after the named range that the input ends inside (torn: a reader
/// raced an append, or a crash cut it), `Some(false)` for one that is damaged.
pub(crate) fn ends_past_name(
    f: &super::names::FileName,
    done: Option<Commit>,
    e: &LayoutError,
) -> Option<bool> {
    let super::names::FileName::Segment { last, .. } = *f else {
        return None;
    };
    done.filter(|c| c.txid >= last)?;
    match e {
        LayoutError::Io(_) | LayoutError::AfterError => None,
        LayoutError::Truncated(_) => Some(true),
        _ => Some(false),
    }
}

#[cfg(test)]
mod tests;
