//! One writer per replica: this instance's id, and its claim on each replica (see
//! [`crate::layout::owner`] for the format).
//!
//! An instance is a state directory: its random id is kept in `<state-dir>/instance`, so a
//! restart (same state directory) is the same instance, and a state directory moved to a new
//! host carries its id along. When a shipper first reaches its replica it claims it, always: the
//! most recently started instance owns the replica, and an instance whose claim is no longer
//! the newest stops writing there ([`TakenOver`]).
//!
//! Invariants:
//! - Before any upload, and before a temporary-file sweep, a compaction or retention deletes
//!   anything, the shipper's claim was found to be the newest at most [`CLAIM_CHECK`] earlier;
//!   a file of a generation other than the one its claim names is preceded by a new claim naming
//!   it, so the newest claim always names the generation its owner writes (restore's "latest"
//!   relies on that).
//! - A taken-over instance deletes nothing of the new owner's: it stops at the check.
//! - Claims are new files (names never reused); an instance deletes only its own older claims.

use crate::backend::Backend;
use crate::clock::{now_ms, rfc3339};
use crate::layout::names::GenerationId;
use crate::layout::owner::{Claim, ClaimName, InstanceId, CLAIM_MAX_BYTES};
use anyhow::{anyhow, Context, Result};
use std::io::Read;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How old a successful ownership check may be when the shipper writes or deletes.
pub(crate) const CLAIM_CHECK: Duration = Duration::from_secs(5);

/// Another instance claimed the replica after this one: a permanent error for this shipper.
#[derive(Debug, thiserror::Error)]
#[error("replica {url} was taken over by instance {by} ({who}) at {at}; stopping")]
pub(crate) struct TakenOver {
    /// The replica.
    pub url: String,
    /// The new owner.
    pub by: InstanceId,
    /// `host H, pid P`, or why that is unknown.
    pub who: String,
    /// When it claimed the replica (RFC 3339).
    pub at: String,
}

/// The [`TakenOver`] error for the newer claim `newest`, with its host and pid when readable.
fn taken_over(t: &dyn Backend, newest: &ClaimName) -> anyhow::Error {
    let (who, at) = match read_claim(t, newest) {
        Ok(c) => (format!("host {}, pid {}", c.host, c.pid), c.claimed_ms),
        Err(e) => (format!("unreadable claim: {e:#}"), newest.ms),
    };
    TakenOver {
        url: t.url(),
        by: newest.instance,
        who,
        at: rfc3339(at),
    }
    .into()
}

/// This instance's claim on one replica.
#[derive(Debug)]
pub(crate) struct Ownership {
    /// This instance.
    instance: InstanceId,
    /// The database identity written into claims.
    identity: String,
    /// Our newest claim, and the generation it names; `None` until the first claim.
    claimed: Option<(ClaimName, Option<GenerationId>)>,
    /// When the claim was last found to be the newest.
    checked: Option<Instant>,
}

fn claims_on(t: &dyn Backend) -> Result<Vec<ClaimName>> {
    let entries = t.list("")?;
    Ok(ClaimName::all(
        entries
            .iter()
            .filter(|e| !e.is_dir)
            .map(|e| e.name.as_str()),
    ))
}

/// Reads and parses the claim `name` (at most [`CLAIM_MAX_BYTES`]).
///
/// # Errors
/// Backend errors, an oversized or invalid claim; the message names the file.
pub(crate) fn read_claim(t: &dyn Backend, name: &ClaimName) -> Result<Claim> {
    let path = name.to_string();
    let mut text = String::new();
    t.read(&path)?
        .take(CLAIM_MAX_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}/{path}", t.url()))?;
    if text.len() as u64 > CLAIM_MAX_BYTES {
        return Err(anyhow!(
            "{}/{path}: larger than {CLAIM_MAX_BYTES} bytes",
            t.url()
        ));
    }
    Claim::parse(&text).map_err(|e| anyhow!("{}/{path}: {e}", t.url()))
}

/// The replica's owner: its newest claim, read. `None` when there is no claim (a replica
/// written by an older walship).
///
/// # Errors
/// Backend errors, an invalid newest claim.
pub(crate) fn newest_claim(t: &dyn Backend) -> Result<Option<(ClaimName, Claim)>> {
    let Some(newest) = claims_on(t)?.pop() else {
        return Ok(None);
    };
    let claim = read_claim(t, &newest)?;
    if claim.instance != newest.instance {
        return Err(anyhow!(
            "{}/{newest}: the claim names instance {}",
            t.url(),
            claim.instance
        ));
    }
    Ok(Some((newest, claim)))
}

impl Ownership {
    /// No claim yet.
    pub(crate) fn new(instance: InstanceId, identity: String) -> Ownership {
        Ownership {
            instance,
            identity,
            claimed: None,
            checked: None,
        }
    }

    /// Whether this instance has claimed the replica (in this process).
    pub(crate) fn has_claimed(&self) -> bool {
        self.claimed.is_some()
    }

    /// Writes a new claim naming `generation`, newer than every claim on the replica, then
    /// deletes this instance's older claims. Once this instance has claimed the replica, a
    /// newer claim of another one found in the same listing is a takeover, not outbid.
    ///
    /// # Errors
    /// [`TakenOver`]; target errors.
    pub(crate) fn claim(
        &mut self,
        t: &dyn Backend,
        generation: Option<GenerationId>,
    ) -> Result<()> {
        let existing = claims_on(t)?;
        if let Some((ours, _)) = self.claimed {
            if let Some(newer) = existing.last().filter(|n| **n > ours) {
                return Err(taken_over(t, newer));
            }
        }
        let name = ClaimName::next(&existing, now_ms(), self.instance);
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        let claim = Claim {
            instance: self.instance,
            host,
            pid: std::process::id(),
            database: self.identity.clone(),
            claimed_ms: now_ms(),
            generation,
        };
        t.write_atomic(&name.to_string(), &mut claim.to_toml().as_bytes())?;
        let first = self.claimed.is_none();
        self.claimed = Some((name, generation));
        self.checked = Some(Instant::now());
        for old in existing
            .iter()
            .filter(|c| c.instance == self.instance && **c < name)
        {
            t.delete(&old.to_string())?;
        }
        if first {
            if let Some(prev) = existing.last().filter(|c| c.instance != self.instance) {
                info!(
                    "claimed replica {} as instance {} (it was instance {}'s)",
                    t.url(),
                    self.instance,
                    prev.instance
                );
            }
        }
        Ok(())
    }

    /// Checks that this instance's claim is still the newest.
    ///
    /// # Errors
    /// [`TakenOver`] when a newer claim exists; target errors.
    pub(crate) fn verify(&mut self, t: &dyn Backend) -> Result<()> {
        let Some((ours, generation)) = self.claimed else {
            return self.claim(t, None);
        };
        let claims = claims_on(t)?;
        match claims.last() {
            Some(newest) if *newest == ours => {
                self.checked = Some(Instant::now());
                Ok(())
            }
            Some(newest) if *newest > ours => Err(taken_over(t, newest)),
            // Our claim is gone and nobody claimed after it (deleted by hand?): claim again.
            _ => {
                warn!(
                    "the claim {ours} on replica {} is gone: claiming it again",
                    t.url()
                );
                self.claim(t, generation)
            }
        }
    }

    /// [`Ownership::verify`] unless that succeeded less than [`CLAIM_CHECK`] ago.
    ///
    /// # Errors
    /// As [`Ownership::verify`].
    pub(crate) fn verify_if_stale(&mut self, t: &dyn Backend) -> Result<()> {
        if self.checked.is_some_and(|c| c.elapsed() < CLAIM_CHECK) {
            return Ok(());
        }
        self.verify(t)
    }

    /// Before uploading a file of generation `g`: the claim is checked (if stale) and, when it
    /// names another generation, checked and replaced by a claim naming `g`.
    ///
    /// # Errors
    /// As [`Ownership::verify`].
    pub(crate) fn before_write(&mut self, t: &dyn Backend, g: GenerationId) -> Result<()> {
        match self.claimed {
            Some((_, Some(named))) if named == g => self.verify_if_stale(t),
            _ => self.claim(t, Some(g)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::file::FileBackend;

    fn gen(ms: u64) -> GenerationId {
        GenerationId { ms, rand: 7 }
    }

    fn claim_files(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("owner-"))
            .collect();
        v.sort();
        v
    }

    fn taken(r: Result<()>) -> TakenOver {
        let e = r.expect_err("should be taken over");
        match e.downcast::<TakenOver>() {
            Ok(t) => t,
            Err(e) => panic!("not a takeover: {e:#}"),
        }
    }

    #[test]
    fn the_newest_claim_owns_the_replica() {
        let dir = tempfile::tempdir().unwrap();
        let t = FileBackend::new(dir.path());
        let mut a = Ownership::new(InstanceId(1), "h:/db".into());
        let mut b = Ownership::new(InstanceId(2), "h:/db".into());
        a.claim(&t, None).unwrap();
        a.before_write(&t, gen(10)).unwrap();
        a.before_write(&t, gen(11)).unwrap();
        // Each new generation is claimed anew; only the newest claim of an instance is kept.
        assert_eq!(claim_files(dir.path()).len(), 1);
        let (_, c) = newest_claim(&t).unwrap().unwrap();
        assert_eq!((c.instance, c.generation), (InstanceId(1), Some(gen(11))));
        assert_eq!(c.pid, std::process::id());

        // B starts: its claim wins; A stops at its next check, and cannot outbid B by
        // claiming a new generation either.
        b.claim(&t, Some(gen(5))).unwrap();
        let e = taken(a.verify(&t));
        assert_eq!(e.by, InstanceId(2));
        assert!(
            e.who.contains(&format!("pid {}", std::process::id())),
            "{}",
            e.who
        );
        let msg = anyhow::Error::from(e).to_string();
        assert!(
            msg.starts_with(&format!(
                "replica {} was taken over by instance 0000000000000002 (host ",
                t.url()
            )),
            "{msg}"
        );
        assert!(msg.ends_with("; stopping"), "{msg}");
        taken(a.before_write(&t, gen(12)));
        b.verify(&t).unwrap();
        b.before_write(&t, gen(5)).unwrap();
        assert_eq!(
            claim_files(dir.path()).len(),
            2,
            "A's claim stays: B deletes only its own"
        );

        // A restart of A (same instance, a new process) claims the replica back.
        let mut a2 = Ownership::new(InstanceId(1), "h:/db".into());
        a2.claim(&t, Some(gen(11))).unwrap();
        taken(b.verify(&t));
        a2.verify(&t).unwrap();
        // ...and the dead process's older claim of the same instance is gone.
        assert_eq!(claim_files(dir.path()).len(), 2);

        // A state directory copied elsewhere (same instance id, two processes): the later
        // claim wins even over the same instance's earlier one.
        let mut a3 = Ownership::new(InstanceId(1), "h:/db".into());
        a3.claim(&t, None).unwrap();
        assert_eq!(taken(a2.verify(&t)).by, InstanceId(1));
    }

    #[test]
    fn a_vanished_claim_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let t = FileBackend::new(dir.path());
        let mut a = Ownership::new(InstanceId(1), "h:/db".into());
        a.before_write(&t, gen(3)).unwrap();
        for f in claim_files(dir.path()) {
            std::fs::remove_file(dir.path().join(f)).unwrap();
        }
        a.verify(&t).unwrap();
        let (_, c) = newest_claim(&t).unwrap().unwrap();
        assert_eq!(c.generation, Some(gen(3)));
    }

    #[test]
    fn hostile_claims_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = FileBackend::new(dir.path());
        let name = "owner-000000000001-0000000000000009.toml";
        std::fs::write(
            dir.path().join(name),
            "x".repeat(CLAIM_MAX_BYTES as usize + 1),
        )
        .unwrap();
        let e = newest_claim(&t).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("larger than"), "{e}");
        // A claim whose content names another instance than its file name.
        let c = Claim {
            instance: InstanceId(8),
            host: "h".into(),
            pid: 1,
            database: "h:/db".into(),
            claimed_ms: 1,
            generation: None,
        };
        std::fs::write(dir.path().join(name), c.to_toml()).unwrap();
        let e = newest_claim(&t).unwrap_err().to_string();
        assert!(e.contains("names instance 0000000000000008"), "{e}");
        // Names that are not claims are not claims.
        std::fs::remove_file(dir.path().join(name)).unwrap();
        std::fs::write(dir.path().join("owner-1-2.toml"), c.to_toml()).unwrap();
        assert!(newest_claim(&t).unwrap().is_none());
    }
}
