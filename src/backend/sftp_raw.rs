//! SFTP (version 3, with two OpenSSH extensions) spoken at the packet level on a channel of its
//! own, for the two requests of the per-commit path that libssh2 cannot serve well: an append
//! (the WRITE requests and an `fsync@openssh.com` sent together, their replies read after: one
//! round trip, where libssh2 waits for each request's reply before it sends the next) and
//! `posix-rename@openssh.com` (rename(2) on the server; libssh2 has it, the `ssh2` crate does
//! not expose it).
//!
//! Invariants:
//! - Every call reads the replies to all the requests it sent before it returns, so that no
//!   reply is ever left for a later call. A reply whose id was not asked for, a malformed
//!   packet or an end of the channel is a connection-class error (an `ssh2` session error): the
//!   caller gives the session up.
//! - An append reports success only if every WRITE and the fsync succeeded. The server runs
//!   requests on one handle in the order they were sent (SFTP requires it; OpenSSH's
//!   sftp-server runs every request in order), so the fsync covers the writes before it. A
//!   failed WRITE fails the append even though the fsync ran: the caller then renames nothing.
//! - Nothing the server sends is trusted as a size: a reply longer than [`MAX_REPLY`] is refused
//!   before it is read.
//! - Errors are `ssh2::Error`s like libssh2's own: a server's status is `ErrorCode::SFTP(code)`,
//!   anything else a session error, so that callers handle both paths alike.

use ssh2::{Channel, Error, ErrorCode, ExtendedData, Session};
use std::collections::HashSet;
use std::io::{self, Read, Write};

const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_WRITE: u8 = 6;
const FXP_FSTAT: u8 = 8;
const FXP_FSETSTAT: u8 = 10;
const FXP_STATUS: u8 = 101;
const FXP_HANDLE: u8 = 102;
const FXP_ATTRS: u8 = 105;
const FXP_EXTENDED: u8 = 200;
const FXP_EXTENDED_REPLY: u8 = 201;

const FXF_WRITE: u32 = 0x02;
const ATTR_SIZE: u32 = 0x01;
const FX_OK: u32 = 0;
const FX_OP_UNSUPPORTED: i32 = 8;

/// The extensions used here, as the server's VERSION packet names them.
pub(super) const FSYNC: &str = "fsync@openssh.com";
pub(super) const POSIX_RENAME: &str = "posix-rename@openssh.com";
const FSTATVFS: &str = "fstatvfs@openssh.com";

/// Largest reply accepted: OpenSSH's own limit on an SFTP message is 256 KiB.
const MAX_REPLY: usize = 256 << 10;

/// Data per WRITE request: well under every server's message limit.
const WRITE_CHUNK: usize = 32 << 10;

/// libssh2's codes for a timeout and for a peer that went away (libssh2.h).
const LIBSSH2_ERROR_TIMEOUT: i32 = -9;
const LIBSSH2_ERROR_SOCKET_DISCONNECT: i32 = -13;
/// libssh2's code for "the server broke the protocol" (`LIBSSH2_ERROR_PROTO`).
const LIBSSH2_ERROR_PROTO: i32 = -14;
/// libssh2's codes for a refused channel and a refused subsystem request.
const LIBSSH2_ERROR_CHANNEL_FAILURE: i32 = -21;
const LIBSSH2_ERROR_CHANNEL_REQUEST_DENIED: i32 = -22;

/// An open remote file handle (the server's opaque bytes).
pub(super) struct Handle(Vec<u8>);

/// An SFTP channel of its own on a session.
pub(super) struct RawSftp {
    sess: Session,
    chan: Channel,
    next_id: u32,
    extensions: HashSet<String>,
}

/// True if [`RawSftp::open`] failed because the server refused the channel or the SFTP
/// subsystem on it, or spoke no SFTP there (the session itself is fine).
pub(super) fn refused(e: &Error) -> bool {
    matches!(
        e.code(),
        ErrorCode::Session(
            LIBSSH2_ERROR_CHANNEL_FAILURE
                | LIBSSH2_ERROR_CHANNEL_REQUEST_DENIED
                | LIBSSH2_ERROR_PROTO
        )
    )
}

fn proto(msg: &'static str) -> Error {
    Error::new(ErrorCode::Session(LIBSSH2_ERROR_PROTO), msg)
}

fn status_error(code: u32) -> Error {
    Error::from_errno(ErrorCode::SFTP(i32::try_from(code).unwrap_or(i32::MAX)))
}

/// A packet being built: `u32` length (filled in by [`Packet::finish`]), type, fields.
struct Packet(Vec<u8>);

impl Packet {
    fn new(kind: u8, id: Option<u32>) -> Packet {
        let mut p = Packet(vec![0, 0, 0, 0, kind]);
        if let Some(id) = id {
            p.u32(id);
        }
        p
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        // Every field sent here is far below 4 GiB (paths, handles, WRITE_CHUNK).
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(b);
        self
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        let len = u32::try_from(self.0.len() - 4).unwrap_or(u32::MAX);
        self.0[..4].copy_from_slice(&len.to_be_bytes());
        out.append(&mut self.0);
    }
}

/// Reads the fields of a reply.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Error> {
        if self.0.len() < n {
            return Err(proto("short SFTP reply"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    fn bytes(&mut self) -> Result<&[u8], Error> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

impl RawSftp {
    /// Opens the channel and the SFTP session on it (a few round trips, once per session).
    pub(super) fn open(sess: &Session) -> Result<RawSftp, Error> {
        let mut chan = sess.channel_session()?;
        chan.handle_extended_data(ExtendedData::Ignore)?;
        chan.subsystem("sftp")?;
        let mut s = RawSftp {
            sess: sess.clone(),
            chan,
            next_id: 1,
            extensions: HashSet::new(),
        };
        let mut out = Vec::new();
        Packet::new(FXP_INIT, None).u32(3).finish(&mut out);
        s.send(&out)?;
        let body = s.read_packet()?;
        let mut f = Fields(&body);
        if f.take(1)?[0] != FXP_VERSION {
            return Err(proto("the server did not answer SFTP's INIT with VERSION"));
        }
        let _version = f.u32()?;
        while !f.0.is_empty() {
            let name = f.bytes()?.to_vec();
            let _data = f.bytes()?;
            if let Ok(name) = String::from_utf8(name) {
                s.extensions.insert(name);
            }
        }
        Ok(s)
    }

    /// Whether the server announced extension `name`.
    pub(super) fn has(&self, name: &str) -> bool {
        self.extensions.contains(name)
    }

    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// An `ssh2` error for a failed channel operation: the session's own if it has one.
    fn io_error(&self, e: &io::Error) -> Error {
        if e.kind() == io::ErrorKind::TimedOut {
            return Error::new(
                ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT),
                "timed out waiting for the SFTP server",
            );
        }
        Error::last_session_error(&self.sess).unwrap_or_else(|| {
            Error::new(
                ErrorCode::Session(LIBSSH2_ERROR_SOCKET_DISCONNECT),
                "the SFTP channel failed",
            )
        })
    }

    /// Sends `out` (libssh2 sends as it is given; its channel "flush" would discard the
    /// replies received so far, so it is never called).
    fn send(&mut self, out: &[u8]) -> Result<(), Error> {
        let r = self.chan.write_all(out);
        r.map_err(|e| self.io_error(&e))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        match self.chan.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::new(
                ErrorCode::Session(LIBSSH2_ERROR_SOCKET_DISCONNECT),
                "the SFTP server closed the channel",
            )),
            Err(e) => Err(self.io_error(&e)),
        }
    }

    /// Reads one packet: its type byte and the rest.
    fn read_packet(&mut self) -> Result<Vec<u8>, Error> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_REPLY {
            return Err(proto("SFTP reply of an invalid length"));
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body)?;
        Ok(body)
    }

    /// Reads the replies to `ids` (in any order); returns, in the order of `ids`, each reply's
    /// type and fields. Every reply is read even after a failed one.
    fn replies(&mut self, ids: &[u32]) -> Result<Vec<(u8, Vec<u8>)>, Error> {
        let mut got: Vec<Option<(u8, Vec<u8>)>> = vec![None; ids.len()];
        for _ in ids {
            let body = self.read_packet()?;
            let mut f = Fields(&body);
            let kind = f.take(1)?[0];
            let id = f.u32()?;
            let slot = ids
                .iter()
                .position(|&i| i == id)
                .and_then(|i| got.get_mut(i))
                .filter(|s| s.is_none())
                .ok_or_else(|| proto("SFTP reply to a request not sent"))?;
            *slot = Some((kind, f.0.to_vec()));
        }
        got.into_iter()
            .map(|r| r.ok_or_else(|| proto("missing SFTP reply")))
            .collect()
    }

    /// Sends `out` (requests `ids`) and checks that each got an OK status.
    fn expect_ok(&mut self, out: &[u8], ids: &[u32]) -> Result<(), Error> {
        self.send(out)?;
        let mut first_error = None;
        for (kind, fields) in self.replies(ids)? {
            let r = if kind == FXP_STATUS {
                Fields(&fields).u32().map(|code| match code {
                    FX_OK => Ok(()),
                    c => Err(status_error(c)),
                })?
            } else {
                Err(proto("SFTP reply of an unexpected type"))
            };
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A single request whose reply is of type `want` (its fields), or a status error.
    fn call(&mut self, mut p: Packet, id: u32, want: u8) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        p.finish(&mut out);
        self.send(&out)?;
        let (kind, fields) = self
            .replies(&[id])?
            .pop()
            .ok_or_else(|| proto("missing SFTP reply"))?;
        if kind == want {
            return Ok(fields);
        }
        if kind == FXP_STATUS {
            return Err(status_error(Fields(&fields).u32()?));
        }
        Err(proto("SFTP reply of an unexpected type"))
    }

    /// Opens the existing file `path` for writing.
    pub(super) fn open_write(&mut self, path: &str) -> Result<Handle, Error> {
        let id = self.id();
        let mut p = Packet::new(FXP_OPEN, Some(id));
        p.bytes(path.as_bytes()).u32(FXF_WRITE).u32(0);
        let fields = self.call(p, id, FXP_HANDLE)?;
        Ok(Handle(Fields(&fields).bytes()?.to_vec()))
    }

    /// The size of the open file, if the server says it.
    pub(super) fn size(&mut self, h: &Handle) -> Result<Option<u64>, Error> {
        let id = self.id();
        let mut p = Packet::new(FXP_FSTAT, Some(id));
        p.bytes(&h.0);
        let fields = self.call(p, id, FXP_ATTRS)?;
        let mut f = Fields(&fields);
        let flags = f.u32()?;
        Ok(if flags & ATTR_SIZE != 0 {
            Some(f.u64()?)
        } else {
            None
        })
    }

    /// Cuts the open file to `size` bytes.
    pub(super) fn truncate(&mut self, h: &Handle, size: u64) -> Result<(), Error> {
        let id = self.id();
        let mut out = Vec::new();
        Packet::new(FXP_FSETSTAT, Some(id))
            .bytes(&h.0)
            .u32(ATTR_SIZE)
            .u64(size)
            .finish(&mut out);
        self.expect_ok(&out, &[id])
    }

    /// Writes `data` at `offset` and fsyncs the file: every request sent at once, one round
    /// trip (see the module doc).
    pub(super) fn write_fsync(
        &mut self,
        h: &Handle,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Error> {
        if !self.has(FSYNC) {
            return Err(status_error(FX_OP_UNSUPPORTED as u32));
        }
        let mut out = Vec::with_capacity(data.len() + 64 * (data.len() / WRITE_CHUNK + 2));
        let mut ids = Vec::new();
        let mut at = offset;
        for chunk in data.chunks(WRITE_CHUNK) {
            let id = self.id();
            Packet::new(FXP_WRITE, Some(id))
                .bytes(&h.0)
                .u64(at)
                .bytes(chunk)
                .finish(&mut out);
            ids.push(id);
            at += chunk.len() as u64;
        }
        let id = self.id();
        Packet::new(FXP_EXTENDED, Some(id))
            .bytes(FSYNC.as_bytes())
            .bytes(&h.0)
            .finish(&mut out);
        ids.push(id);
        self.expect_ok(&out, &ids)
    }

    /// Closes a handle.
    pub(super) fn close(&mut self, h: Handle) -> Result<(), Error> {
        let id = self.id();
        let mut out = Vec::new();
        Packet::new(FXP_CLOSE, Some(id))
            .bytes(&h.0)
            .finish(&mut out);
        self.expect_ok(&out, &[id])
    }

    /// Bytes free for the account on the open file's file system (`fstatvfs@openssh.com`);
    /// `None` if the server does not say.
    pub(super) fn free_bytes(&mut self, h: &Handle) -> Option<u64> {
        if !self.has(FSTATVFS) {
            return None;
        }
        let id = self.id();
        let mut p = Packet::new(FXP_EXTENDED, Some(id));
        p.bytes(FSTATVFS.as_bytes()).bytes(&h.0);
        let fields = self.call(p, id, FXP_EXTENDED_REPLY).ok()?;
        let mut f = Fields(&fields);
        let (_bsize, frsize, _blocks, _bfree, bavail) = (
            f.u64().ok()?,
            f.u64().ok()?,
            f.u64().ok()?,
            f.u64().ok()?,
            f.u64().ok()?,
        );
        Some(bavail.saturating_mul(frsize))
    }

    /// `posix-rename@openssh.com`: renames `from` to `to`, replacing `to` (`SFTP(8)`, "op
    /// unsupported", if the server lacks it).
    pub(super) fn posix_rename(&mut self, from: &str, to: &str) -> Result<(), Error> {
        if !self.has(POSIX_RENAME) {
            return Err(status_error(FX_OP_UNSUPPORTED as u32));
        }
        let id = self.id();
        let mut out = Vec::new();
        Packet::new(FXP_EXTENDED, Some(id))
            .bytes(POSIX_RENAME.as_bytes())
            .bytes(from.as_bytes())
            .bytes(to.as_bytes())
            .finish(&mut out);
        self.expect_ok(&out, &[id])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_carry_their_length_type_and_fields() {
        let mut out = Vec::new();
        Packet::new(FXP_WRITE, Some(7))
            .bytes(b"h")
            .u64(5)
            .bytes(b"ab")
            .finish(&mut out);
        assert_eq!(
            out,
            [
                0, 0, 0, 24, FXP_WRITE, 0, 0, 0, 7, 0, 0, 0, 1, b'h', 0, 0, 0, 0, 0, 0, 0, 5, 0, 0,
                0, 2, b'a', b'b'
            ]
        );
        let mut f = Fields(&out[5..]);
        assert_eq!(f.u32().ok(), Some(7));
        assert_eq!(f.bytes().ok(), Some(&b"h"[..]));
        assert_eq!(f.u64().ok(), Some(5));
        assert_eq!(f.bytes().ok(), Some(&b"ab"[..]));
        assert!(f.u32().is_err(), "reading past the end must fail");
    }

    #[test]
    fn a_field_longer_than_the_packet_is_refused() {
        let mut f = Fields(&[0, 0, 1, 0, 1, 2]);
        assert!(f.bytes().is_err());
    }
}
