//! A fault-injecting wrapper for any target: [`Faulty`] passes every operation to the target it
//! wraps, except those a [`Fault`] picks (by operation and a substring of the path), which fail
//! with the error kind the fault names, for its first N matches or while a [`Switch`] is on.
//! A fault may also act when it fires (move a file away, as a running walship's compaction
//! would), so that what the target holds afterwards matches the error.
//!
//! Invariants: an injected failure never reaches the wrapped target (nothing is read, written or
//! deleted), and its error names the operation, the target's URL and the path; every call is
//! counted, injected or not ([`Faulty::calls`]).

use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use walship::backend::{Backend, BackendError, Entry, ErrorKind, Result};

/// A target operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    List,
    Read,
    Write,
    Delete,
    RemoveDir,
    Cleanup,
    Append,
    Rename,
}

/// A switch that arms the faults made with [`Fault::while_on`]; starts off.
#[derive(Debug, Clone, Default)]
pub struct Switch(Arc<AtomicBool>);

impl Switch {
    pub fn new() -> Switch {
        Switch::default()
    }
    pub fn on(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn off(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

type Action = Box<dyn FnMut(&str) + Send>;

/// Which calls fail, how, and how often.
pub struct Fault {
    op: Op,
    pattern: String,
    kind: ErrorKind,
    /// Failures left; `None`: no limit.
    left: Option<usize>,
    switch: Option<Switch>,
    action: Option<Action>,
}

impl Fault {
    /// Fails every `op` on a path containing `pattern` ("" matches every path) with `kind`.
    pub fn new(op: Op, pattern: &str, kind: ErrorKind) -> Fault {
        Fault {
            op,
            pattern: pattern.to_owned(),
            kind,
            left: None,
            switch: None,
            action: None,
        }
    }

    /// Only the first `n` matching calls fail (those made while the switch is off, if any, do
    /// not count).
    pub fn times(mut self, n: usize) -> Fault {
        self.left = Some(n);
        self
    }

    /// Only while `switch` is on.
    pub fn while_on(mut self, switch: &Switch) -> Fault {
        self.switch = Some(switch.clone());
        self
    }

    /// Runs `action(path)` each time the fault fires, before the error is returned.
    pub fn on_fire(mut self, action: impl FnMut(&str) + Send + 'static) -> Fault {
        self.action = Some(Box::new(action));
        self
    }

    /// Whether the call fires this fault (and counts it).
    fn fires(&mut self, op: Op, path: &str) -> bool {
        if op != self.op
            || !path.contains(&self.pattern)
            || self.switch.as_ref().is_some_and(|s| !s.is_on())
            || self.left == Some(0)
        {
            return false;
        }
        if let Some(n) = self.left.as_mut() {
            *n -= 1;
        }
        if let Some(a) = self.action.as_mut() {
            a(path);
        }
        true
    }
}

/// Any target, with [`Fault`]s injected.
pub struct Faulty {
    inner: Box<dyn Backend>,
    faults: Mutex<Vec<Fault>>,
    calls: Mutex<Vec<(Op, String, bool)>>,
}

impl fmt::Debug for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faulty")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Faulty {
    /// Wraps `inner`, with no fault yet.
    pub fn new(inner: impl Backend + 'static) -> Faulty {
        Faulty::boxed(Box::new(inner))
    }

    /// Wraps an already boxed target (as `walship::backend::open` returns it).
    pub fn boxed(inner: Box<dyn Backend>) -> Faulty {
        Faulty {
            inner,
            faults: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
        }
    }

    /// Adds `fault` (builder form).
    pub fn with(self, fault: Fault) -> Faulty {
        self.add(fault);
        self
    }

    /// Adds `fault` to a wrapper in use; the first fault that matches a call decides it.
    pub fn add(&self, fault: Fault) {
        self.faults.lock().expect("faults lock").push(fault);
    }

    /// Calls of `op` on paths containing `pattern` so far, injected or passed on.
    pub fn calls(&self, op: Op, pattern: &str) -> usize {
        self.count(|(o, p, _)| *o == op && p.contains(pattern))
    }

    /// Failures injected so far.
    pub fn injected(&self) -> usize {
        self.count(|(_, _, injected)| *injected)
    }

    fn count(&self, pred: impl Fn(&(Op, String, bool)) -> bool) -> usize {
        self.calls
            .lock()
            .expect("calls lock")
            .iter()
            .filter(|c| pred(c))
            .count()
    }

    /// Records the call; the injected error if a fault fires.
    fn check(&self, op: Op, path: &str) -> Result<()> {
        let kind = self
            .faults
            .lock()
            .expect("faults lock")
            .iter_mut()
            .find_map(|f| f.fires(op, path).then_some(f.kind));
        self.calls
            .lock()
            .expect("calls lock")
            .push((op, path.to_owned(), kind.is_some()));
        match kind {
            None => Ok(()),
            Some(kind) => Err(BackendError::new(
                kind,
                format!(
                    "injected fault: {op:?} {}/{path} failed ({kind:?})",
                    self.inner.url()
                ),
            )),
        }
    }
}

impl Backend for Faulty {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        self.check(Op::List, dir)?;
        self.inner.list(dir)
    }
    fn read(&self, path: &str) -> Result<Box<dyn Read + Send>> {
        self.check(Op::Read, path)?;
        self.inner.read(path)
    }
    fn write_atomic(&self, path: &str, data: &mut dyn Read) -> Result<u64> {
        self.check(Op::Write, path)?;
        self.inner.write_atomic(path, data)
    }
    fn delete(&self, path: &str) -> Result<()> {
        self.check(Op::Delete, path)?;
        self.inner.delete(path)
    }
    fn remove_dir(&self, dir: &str) -> Result<()> {
        self.check(Op::RemoveDir, dir)?;
        self.inner.remove_dir(dir)
    }
    fn cleanup(&self, dir: &str) -> Result<usize> {
        self.check(Op::Cleanup, dir)?;
        self.inner.cleanup(dir)
    }
    fn can_append(&self) -> bool {
        self.inner.can_append()
    }
    fn append(&self, path: &str, at: u64, data: &[u8]) -> Result<()> {
        self.check(Op::Append, path)?;
        self.inner.append(path, at, data)
    }
    /// Faults match `from`.
    fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.check(Op::Rename, from)?;
        self.inner.rename(from, to)
    }
}

/// The wrapper itself: faults fire for the chosen operation and paths only, N times or while
/// switched on, with the chosen kind, and never touch the wrapped target.
#[test]
fn faulty_fails_what_it_is_told_to() {
    use walship::backend::file::FileBackend;
    let dir = tempfile::tempdir().expect("tempdir");
    let switch = Switch::new();
    let t = Faulty::new(FileBackend::new(dir.path()))
        .with(Fault::new(Op::Read, "/seg-", ErrorKind::NotFound).times(2))
        .with(Fault::new(Op::Write, "", ErrorKind::Unavailable).while_on(&switch));
    t.write_atomic("g/seg-1", &mut &b"1"[..]).expect("write");
    t.write_atomic("g/snap-1", &mut &b"s"[..]).expect("write");
    for _ in 0..2 {
        let e = t.read("g/seg-1").err().expect("injected");
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.to_string().contains("g/seg-1"), "{e}");
    }
    t.read("g/seg-1").expect("the third read passes");
    t.read("g/snap-1").expect("another path passes");
    switch.on();
    let e = t.write_atomic("g/x", &mut &b"x"[..]).expect_err("injected");
    assert_eq!(e.kind, ErrorKind::Unavailable);
    assert!(!dir.path().join("g/x").exists(), "an injected write wrote");
    switch.off();
    t.write_atomic("g/x", &mut &b"x"[..]).expect("switched off");
    assert_eq!((t.calls(Op::Read, "/seg-"), t.injected()), (3, 3));
}
