//! `Backend::append` and `Backend::rename` under faults (the conformance suite checks them on
//! healthy targets): an SFTP server killed between two appends.

use crate::sshd::{Sshd, TestDir};
use std::time::{Duration, Instant};
use walship::backend::sftp::SftpBackend;
use walship::backend::{Backend, ErrorKind};

fn read_all(t: &dyn Backend, path: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut t.read(path).expect("open"), &mut buf).expect("read");
    buf
}

/// sshd killed between two appends: the next append fails as Unavailable, quickly, and leaves
/// the file as it was; once sshd is back the next append (at the size left) works on a new
/// session, without the handle of the dead one (also when another operation saw the session
/// die), and so do renames and appends after them.
#[test]
fn sftp_append_across_a_killed_server() {
    let sshd = Sshd::start();
    let dir = TestDir::new("append-killed");
    let t = SftpBackend::new(sshd.options(&dir.remote, Duration::from_secs(2)));
    let local = dir.local.join("g/tail");
    t.write_atomic("g/tail", &mut &b"head"[..]).expect("write");
    t.append("g/tail", 4, b"-one").expect("append");

    sshd.kill();
    let start = Instant::now();
    let e = t.append("g/tail", 8, b"-lost").expect_err("server is down");
    eprintln!("append with sshd killed: {e} (after {:?})", start.elapsed());
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(std::fs::read(&local).expect("read"), b"head-one");
    let e = t.append("g/tail", 8, b"-lost").expect_err("still down");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");

    sshd.restart();
    t.append("g/tail", 8, b"-two")
        .expect("the first append after the restart");
    assert_eq!(std::fs::read(&local).expect("read"), b"head-one-two");

    // The session dies under another operation, the append handle left open in it.
    sshd.kill();
    let e = t.list("g").expect_err("server is down");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    sshd.restart();
    t.append("g/tail", 12, b"+")
        .expect("the first append after the restart");
    assert_eq!(std::fs::read(&local).expect("read"), b"head-one-two+");

    t.rename("g/tail", "g/seg-1").expect("rename");
    t.append("g/seg-1", 13, b"-three").expect("append");
    assert_eq!(read_all(&t, "g/seg-1"), b"head-one-two+-three");
    assert_eq!(
        t.list("g")
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect::<Vec<_>>(),
        vec!["seg-1"]
    );
}
