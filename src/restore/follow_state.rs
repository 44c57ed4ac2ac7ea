//! The follower's state directory: what `walship restore --follow` reports about itself, for
//! `walship status --follow` (see `cli::status`).
//!
//! Files (under the state directory, by default `config::default_follow_state_dir`, apart
//! from the replicating daemon's):
//! - `lock`: flocked exclusively by the running follower; whether a follower runs is asked of
//!   this lock, never of the pid or the age of a file (a killed follower's lock is gone at once,
//!   and a pid may be reused).
//! - `status`: `key value` lines ([`FollowStatus`]), replaced (temp file and rename, without
//!   fsync, as the daemon's `status`: it is advisory and loses nothing when stale) on every
//!   change of state, position or error, and at most once a second otherwise.
//!
//! Invariants: a write failure is only logged (the status is a report, never state); reading
//! is strict (a missing key or a bad value is an error naming the file); an error text is one
//! line (newlines become spaces).

use crate::durable::{lock_dir, lock_held, replace_file};
use crate::layout::names::GenerationId;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::PathBuf;
use std::str::FromStr;

/// What the follower is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FollowState {
    /// The initial restore is under way: the standby is not in place yet.
    Restoring,
    /// The standby is in place and new commits are applied.
    Following,
    /// Following ended (a signal, or an error, then in `error`).
    Stopped,
}

impl fmt::Display for FollowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FollowState::Restoring => "restoring",
            FollowState::Following => "following",
            FollowState::Stopped => "stopped",
        })
    }
}

impl FromStr for FollowState {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<FollowState> {
        match s {
            "restoring" => Ok(FollowState::Restoring),
            "following" => Ok(FollowState::Following),
            "stopped" => Ok(FollowState::Stopped),
            _ => bail!("unknown follower state {s:?}"),
        }
    }
}

/// The `status` file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FollowStatus {
    /// When it was written (Unix ms).
    pub(crate) written_ms: u64,
    /// The follower's process id.
    pub(crate) pid: u32,
    pub(crate) state: FollowState,
    /// The standby's position (`None` until the initial restore is in place).
    pub(crate) position: Option<(GenerationId, u64)>,
    /// The capture time of the last commit applied (Unix ms).
    pub(crate) commit_ms: Option<u64>,
    /// The lag when written: 0 at the replica's end, else the age of the last commit applied.
    pub(crate) lag_ms: Option<u64>,
    /// When the replica was last listed successfully (Unix ms).
    pub(crate) listed_ms: Option<u64>,
    /// Why the last poll (or the follower) failed, if it did.
    pub(crate) error: Option<String>,
}

impl FollowStatus {
    /// A status of this process in `state`, with nothing known yet.
    pub(crate) fn new(state: FollowState) -> FollowStatus {
        FollowStatus {
            written_ms: 0,
            pid: std::process::id(),
            state,
            position: None,
            commit_ms: None,
            lag_ms: None,
            listed_ms: None,
            error: None,
        }
    }
}

impl fmt::Display for FollowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |x| x.to_string());
        writeln!(f, "written_ms {}", self.written_ms)?;
        writeln!(f, "pid {}", self.pid)?;
        writeln!(f, "state {}", self.state)?;
        match self.position {
            Some((g, t)) => writeln!(f, "position {g}/{t}")?,
            None => writeln!(f, "position -")?,
        }
        writeln!(f, "commit_ms {}", opt(self.commit_ms))?;
        writeln!(f, "lag_ms {}", opt(self.lag_ms))?;
        writeln!(f, "listed_ms {}", opt(self.listed_ms))?;
        match &self.error {
            Some(e) => writeln!(f, "error {}", e.replace(['\n', '\r'], " ")),
            None => writeln!(f, "error -"),
        }
    }
}

impl FromStr for FollowStatus {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<FollowStatus> {
        let mut kv = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let (k, v) = line
                .split_once(' ')
                .ok_or_else(|| anyhow!("line {} is malformed", i + 1))?;
            kv.insert(k, v);
        }
        let get = |k: &str| {
            kv.get(k)
                .copied()
                .ok_or_else(|| anyhow!("missing key {k:?}"))
        };
        let num = |k: &str| -> Result<Option<u64>> {
            match get(k)? {
                "-" => Ok(None),
                v => v
                    .parse()
                    .map(Some)
                    .map_err(|_| anyhow!("bad number {v:?} for {k:?}")),
            }
        };
        let position = match get("position")? {
            "-" => None,
            p => {
                let bad = || anyhow!("bad position {p:?}");
                let (g, t) = p.split_once('/').ok_or_else(bad)?;
                Some((g.parse().map_err(|_| bad())?, t.parse().map_err(|_| bad())?))
            }
        };
        Ok(FollowStatus {
            written_ms: num("written_ms")?.ok_or_else(|| anyhow!("no written_ms"))?,
            pid: get("pid")?
                .parse()
                .map_err(|_| anyhow!("bad pid {:?}", kv.get("pid")))?,
            state: get("state")?.parse()?,
            position,
            commit_ms: num("commit_ms")?,
            lag_ms: num("lag_ms")?,
            listed_ms: num("listed_ms")?,
            error: match get("error")? {
                "-" => None,
                e => Some(e.to_owned()),
            },
        })
    }
}

/// The follower's state directory.
#[derive(Debug, Clone)]
pub(crate) struct FollowStateDir {
    dir: PathBuf,
}

/// The follower's exclusive lock on its state directory; released when dropped.
#[derive(Debug)]
pub(crate) struct FollowLock(#[allow(dead_code)] File);

impl FollowStateDir {
    pub(crate) fn new(dir: impl Into<PathBuf>) -> FollowStateDir {
        FollowStateDir { dir: dir.into() }
    }

    /// Creates the directory (mode 0700), takes the follower's lock and removes the temporary
    /// files a killed predecessor left.
    ///
    /// # Errors
    /// The directory cannot be created, or another follower holds the lock.
    pub(crate) fn lock(&self) -> Result<FollowLock> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.dir.display();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create the follower's state directory {dir}"))?;
        let f = lock_dir(
            &self.dir,
            &format!("another follower uses the state directory {dir} (lock held): give each standby its own --state-dir"),
        )?;
        Ok(FollowLock(f))
    }

    /// Whether a follower holds the lock now.
    pub(crate) fn running(&self) -> bool {
        lock_held(&self.dir)
    }

    fn status_path(&self) -> PathBuf {
        self.dir.join("status")
    }

    /// Replaces the status file with `status`, stamped now. Failures are only logged.
    pub(crate) fn write(&self, status: &FollowStatus) {
        let p = self.status_path();
        let mut s = status.clone();
        s.written_ms = crate::clock::now_ms();
        if let Err(e) = replace_file(&p, s.to_string().as_bytes(), 0o644) {
            tracing::debug!("cannot write {}: {e}", p.display());
        }
    }

    /// The status file; `None` if there is none.
    ///
    /// # Errors
    /// It cannot be read or is malformed (the message names it).
    pub(crate) fn read(&self) -> Result<Option<FollowStatus>> {
        let p = self.status_path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
        };
        text.parse()
            .map(Some)
            .with_context(|| format!("status file {} is malformed", p.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_round_trips_through_its_text() {
        let mut s = FollowStatus::new(FollowState::Restoring);
        s.written_ms = 5;
        assert_eq!(s.to_string().parse::<FollowStatus>().unwrap(), s);
        s.state = FollowState::Following;
        s.position = Some((GenerationId { ms: 7, rand: 9 }, 42));
        s.commit_ms = Some(1);
        s.lag_ms = Some(0);
        s.listed_ms = Some(3);
        s.error = Some("a\nb".into());
        let back: FollowStatus = s.to_string().parse().unwrap();
        assert_eq!(back.error.as_deref(), Some("a b"));
        assert_eq!(back.position, s.position);
        assert!("pid 1\n".parse::<FollowStatus>().is_err());
    }

    #[test]
    fn the_lock_is_exclusive_and_visible() {
        let t = tempfile::tempdir().unwrap();
        let d = FollowStateDir::new(t.path().join("f"));
        assert!(!d.running());
        assert!(d.read().unwrap().is_none());
        let l = d.lock().unwrap();
        assert!(d.running());
        assert!(d.lock().unwrap_err().to_string().contains("lock held"));
        d.write(&FollowStatus::new(FollowState::Stopped));
        assert_eq!(d.read().unwrap().unwrap().state, FollowState::Stopped);
        drop(l);
        assert!(!d.running());
    }
}
