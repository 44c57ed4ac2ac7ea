//! Who writes a replica: owner claims at the replica root, pure (names and content).
//!
//! A replica has one writer. The marker ties a replica to a database identity (`host:/path`),
//! but two walship instances can carry the same identity: two state directories replicating one
//! database that the database lock cannot keep apart (another mount namespace, another host with
//! the same name and path, a state directory copied to a new host). Each instance (one state
//! directory, see `replicate::owner`) claims the replica when it starts by writing a claim file
//! with a new name, `owner-<ms>-<instance>.toml`, that sorts after every claim already there.
//! The newest claim owns the replica: an instance whose claim is no longer the newest was taken
//! over and stops writing; a restore's "latest" follows the generation the newest claim names.
//!
//! Invariants kept:
//! - Names are never reused or overwritten (SFTP v3 cannot rename over a file): a claim's name
//!   holds its time, bumped past the newest claim seen, and the instance id; a newer claim is a
//!   new file, older claims of the same instance are deleted after it is written.
//! - Parsing is strict, as for every name and file read from a replica: exact widths, lowercase
//!   hex, bounded content ([`CLAIM_MAX_BYTES`]) with bounded fields, unknown keys refused.
//! - Nothing here does I/O or reads a clock.

use super::names::{bad_name, fields, hex, line_column, GenerationId, TIME_LIMIT};
use super::LayoutError;
use std::fmt;
use std::str::FromStr;

/// The most bytes of a claim file anyone reads.
pub(crate) const CLAIM_MAX_BYTES: u64 = 64 << 10;

/// Longest host or database text a claim may carry.
const FIELD_MAX_CHARS: usize = 1024;

/// A walship instance: the random id its state directory keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct InstanceId(pub u64);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for InstanceId {
    type Err = LayoutError;

    /// Exactly 16 lowercase hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match hex(s) {
            Some(v) if s.len() == 16 => Ok(InstanceId(v)),
            _ => Err(bad_name(s, "an instance id is 16 lowercase hex digits")),
        }
    }
}

/// The name of a claim file at the replica root. Ordered by time, then instance: the greatest
/// claim owns the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ClaimName {
    /// When it was claimed, ms since the Unix epoch (bumped past the newest earlier claim, so
    /// a host whose clock is behind still claims after the others); below 2^48.
    pub ms: u64,
    /// The claiming instance.
    pub instance: InstanceId,
}

impl fmt::Display for ClaimName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "owner-{:012x}-{}.toml", self.ms, self.instance)
    }
}

impl ClaimName {
    /// Parses `owner-<12 hex>-<16 hex>.toml`, strictly.
    ///
    /// # Errors
    /// Anything else.
    pub(crate) fn parse(name: &str) -> Result<ClaimName, LayoutError> {
        let bad = || bad_name(name, "not owner-<12 hex>-<16 hex>.toml");
        let body = name
            .strip_prefix("owner-")
            .and_then(|r| r.strip_suffix(".toml"))
            .ok_or_else(bad)?;
        let [ms, instance] = fields(body, [12, 16]).ok_or_else(bad)?;
        let (Some(ms), Ok(instance)) = (hex(ms), instance.parse::<InstanceId>()) else {
            return Err(bad());
        };
        Ok(ClaimName { ms, instance })
    }

    /// The claims among `names` (other names are skipped), oldest first.
    pub(crate) fn all<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<ClaimName> {
        let mut v: Vec<ClaimName> = names
            .into_iter()
            .filter_map(|n| ClaimName::parse(n).ok())
            .collect();
        v.sort();
        v
    }

    /// The name of a new claim by `instance` at `now_ms`: after every claim in `existing`, even
    /// when this host's clock is behind theirs.
    pub(crate) fn next(existing: &[ClaimName], now_ms: u64, instance: InstanceId) -> ClaimName {
        let after = existing
            .iter()
            .map(|c| c.ms.saturating_add(1))
            .max()
            .unwrap_or(0);
        ClaimName {
            ms: now_ms.max(after).min(TIME_LIMIT - 1),
            instance,
        }
    }
}

/// The content of a claim file: who claimed the replica, for messages and for restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    /// The claiming instance (the same as in the file's name).
    pub instance: InstanceId,
    /// The claimer's host name.
    pub host: String,
    /// The claimer's process id.
    pub pid: u32,
    /// The database identity (`host:/path`), as in the marker.
    pub database: String,
    /// The claimer's clock when it claimed, ms since the Unix epoch.
    pub claimed_ms: u64,
    /// The generation the claimer writes to, when it knows (a fresh replica: not yet).
    pub generation: Option<GenerationId>,
}

/// The TOML form of [`Claim`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawClaim {
    instance: String,
    host: String,
    pid: u32,
    database: String,
    claimed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<String>,
}

impl Claim {
    /// The claim as TOML text.
    pub(crate) fn to_toml(&self) -> String {
        let raw = RawClaim {
            instance: self.instance.to_string(),
            host: self.host.clone(),
            pid: self.pid,
            database: self.database.clone(),
            claimed_ms: self.claimed_ms,
            generation: self.generation.map(|g| g.to_string()),
        };
        // Serializing plain strings and integers cannot fail; never panic if it ever did.
        toml::to_string(&raw).unwrap_or_else(|_| {
            format!(
                "instance = {:?}\nhost = {:?}\npid = {}\ndatabase = {:?}\nclaimed-ms = {}\n",
                raw.instance, raw.host, raw.pid, raw.database, raw.claimed_ms
            )
        })
    }

    /// Parses a claim strictly: invalid TOML, unknown or missing keys, a malformed instance or
    /// generation, and overlong or control-character fields are errors.
    ///
    /// # Errors
    /// [`LayoutError::InvalidClaim`] saying what is wrong.
    pub(crate) fn parse(text: &str) -> Result<Claim, LayoutError> {
        let invalid = |m: String| LayoutError::InvalidClaim(m);
        let raw: RawClaim = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((1, 1), |span| line_column(text, span.start));
            invalid(format!(
                "line {line}, column {column}: {}",
                e.message().trim().replace('\n', " ")
            ))
        })?;
        for (key, v) in [("host", &raw.host), ("database", &raw.database)] {
            if v.chars().count() > FIELD_MAX_CHARS || v.chars().any(char::is_control) {
                return Err(invalid(format!(
                    "{key} is longer than {FIELD_MAX_CHARS} characters or holds control characters"
                )));
            }
        }
        let instance = raw
            .instance
            .parse::<InstanceId>()
            .map_err(|e| invalid(format!("instance: {e}")))?;
        let generation = raw
            .generation
            .as_deref()
            .map(str::parse::<GenerationId>)
            .transpose()
            .map_err(|e| invalid(format!("generation: {e}")))?;
        Ok(Claim {
            instance,
            host: raw.host,
            pid: raw.pid,
            database: raw.database,
            claimed_ms: raw.claimed_ms,
            generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: InstanceId = InstanceId(0x0123_4567_89ab_cdef);

    #[test]
    fn claim_names_round_trip_and_order() {
        let c = ClaimName {
            ms: 0x0123_4567_89ab,
            instance: I,
        };
        assert_eq!(c.to_string(), "owner-0123456789ab-0123456789abcdef.toml");
        assert_eq!(ClaimName::parse(&c.to_string()).unwrap(), c);
        let later = ClaimName { ms: c.ms + 1, ..c };
        let other = ClaimName {
            ms: c.ms,
            instance: InstanceId(I.0 + 1),
        };
        assert!(later > c && other > c && later > other);
        let all = ClaimName::all([
            later.to_string().as_str(),
            "walship-replica.toml",
            "generations",
            c.to_string().as_str(),
        ]);
        assert_eq!(all, vec![c, later]);
    }

    #[test]
    fn claim_names_are_strict() {
        for bad in [
            "",
            "owner-0123456789ab-0123456789abcdef",
            "owner-0123456789ab-0123456789abcdef.toml.tmp",
            "owner-0123456789AB-0123456789abcdef.toml",
            "owner-123456789ab-0123456789abcdef.toml",
            "owner-0123456789ab-123456789abcdef.toml",
            "owner-0123456789ab-0123456789abcdef0.toml",
            "owner-0123456789ab--0123456789abcde.toml",
            "owner-0123456789ab-0123456789abcdef-.toml",
            "owner-../456789ab-0123456789abcdef.toml",
            "owner-+123456789ab-0123456789abcdef.toml",
            "walship-replica.toml",
        ] {
            assert!(ClaimName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn next_claim_sorts_after_every_other() {
        let a = ClaimName {
            ms: 5_000,
            instance: InstanceId(u64::MAX),
        };
        // A clock behind the newest claim still claims after it.
        let n = ClaimName::next(&[a], 1_000, I);
        assert_eq!(n.ms, 5_001);
        assert!(n > a);
        assert_eq!(ClaimName::next(&[a], 9_000, I).ms, 9_000);
        assert_eq!(ClaimName::next(&[], 7, I).ms, 7);
        let top = ClaimName {
            ms: TIME_LIMIT - 1,
            instance: I,
        };
        assert!(ClaimName::next(&[top], 0, I).ms < TIME_LIMIT);
    }

    #[test]
    fn claim_content_round_trip_and_errors() {
        let c = Claim {
            instance: I,
            host: "alpha".into(),
            pid: 1234,
            database: "alpha:/var/data/db/fruits.db".into(),
            claimed_ms: 1_700_000_000_000,
            generation: Some("0123456789abdeadbeef".parse().unwrap()),
        };
        let text = c.to_toml();
        assert!(text.contains("claimed-ms = 1700000000000"), "{text}");
        assert_eq!(Claim::parse(&text).unwrap(), c);
        let none = Claim {
            generation: None,
            ..c.clone()
        };
        assert_eq!(Claim::parse(&none.to_toml()).unwrap(), none);
        for (bad, why) in [
            (format!("{text}extra = 1\n"), "unknown key"),
            (
                text.replace("0123456789abcdef", "0123456789ABCDEF"),
                "instance",
            ),
            (text.replace("deadbeef", "deadbee"), "generation"),
            (text.replace("pid = 1234", "pid = -1"), "pid"),
            (text.replace("\"alpha\"", "\"al\\npha\""), "control"),
            (
                text.replace("\"alpha\"", &format!("{:?}", "a".repeat(2000))),
                "long",
            ),
            (
                "instance = \"0123456789abcdef\"\n".to_owned(),
                "missing keys",
            ),
            ("\u{0}".to_owned(), "garbage"),
        ] {
            let e = Claim::parse(&bad).expect_err(why);
            assert!(
                e.to_string().starts_with("invalid owner claim: "),
                "{why}: {e}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: crate::fuzz_cases(512),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Any text: the parsers never panic, and accepted names print back to themselves.
        #[test]
        fn arbitrary_claims_never_panic(s in "\\PC{0,80}", n in "(owner-|[0-9a-f.-]|toml){0,60}") {
            for t in [&s, &n] {
                if let Ok(c) = ClaimName::parse(t) {
                    proptest::prop_assert_eq!(&c.to_string(), t);
                }
                let _ = Claim::parse(t);
            }
        }
    }
}
