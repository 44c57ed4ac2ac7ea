//! Names of everything on a replica: generations, snapshot and segment files, positions, the
//! marker file.
//!
//! Invariants kept: every name is fixed-width lowercase hex, so lexical order is numeric order and
//! a listing sorts by time; parsing is strict (exact lengths, lowercase hex only, ranges ordered),
//! so a parsed name always prints back to the same string and can never contain `/` or `..`.

use super::LayoutError;
use std::fmt;
use std::str::FromStr;

/// The name of the marker file at the replica root.
pub const MARKER_FILE: &str = "walship-replica.toml";
/// The directory, under the replica root, that holds one directory per generation.
pub(crate) const GENERATIONS_DIR: &str = "generations";
/// The replica format this build writes and the newest it reads (the marker's `format`).
pub const FORMAT_VERSION: u32 = 1;

/// Times (ms since the Unix epoch) are written as 12 hex digits: they must be below 2^48.
pub(super) const TIME_LIMIT: u64 = 1 << 48;

/// A generation: an unbroken history of the database, started whenever continuity with the
/// replica cannot be proven. Ordered by start time, then by the random part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenerationId {
    /// When the generation started, ms since the Unix epoch; below 2^48.
    pub ms: u64,
    /// Random bits that keep two generations started in the same millisecond apart.
    pub rand: u32,
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012x}{:08x}", self.ms, self.rand)
    }
}

/// Parses exactly `s.len()` lowercase hex digits; `None` if any other byte is present.
pub(super) fn hex(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut v: u64 = 0;
    for b in s.bytes() {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

pub(super) fn bad_name(name: &str, reason: &'static str) -> LayoutError {
    // A hostile listing may hold huge names: keep the message short.
    let shown: String = name.chars().take(100).collect();
    LayoutError::InvalidName {
        name: shown,
        reason,
    }
}

impl FromStr for GenerationId {
    type Err = LayoutError;

    /// Exactly 20 lowercase hex digits: 12 for the time, 8 for the random part.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 20 {
            return Err(bad_name(s, "a generation is 20 lowercase hex digits"));
        }
        let (ms, rand) = match (s.get(..12).and_then(hex), s.get(12..).and_then(hex)) {
            (Some(ms), Some(rand)) => (ms, rand),
            _ => return Err(bad_name(s, "a generation is 20 lowercase hex digits")),
        };
        let rand =
            u32::try_from(rand).map_err(|_| bad_name(s, "generation random part too large"))?;
        Ok(GenerationId { ms, rand })
    }
}

/// The directory of a generation, relative to the replica root: `generations/<id>`.
pub(crate) fn generation_dir(g: &GenerationId) -> String {
    format!("{GENERATIONS_DIR}/{g}")
}

/// A file inside a generation directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum FileName {
    /// The whole database as of commit `txid`.
    Snapshot {
        /// The commit the snapshot holds.
        txid: u64,
        /// That commit's time, ms since the Unix epoch (below 2^48).
        time_ms: u64,
    },
    /// The commits `first..=last`, possibly merged from lower-level segments.
    Segment {
        /// Compaction level: 0 as shipped, n+1 when merged from level-n segments (0..=9).
        level: u8,
        /// The first commit's txid.
        first: u64,
        /// The last commit's txid (>= first).
        last: u64,
        /// The first commit's time, ms since the Unix epoch (below 2^48).
        first_ms: u64,
        /// The last commit's time (>= first_ms).
        last_ms: u64,
    },
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileName::Snapshot { txid, time_ms } => {
                write!(f, "snap-{txid:016x}-{time_ms:012x}.wsnap")
            }
            FileName::Segment {
                level,
                first,
                last,
                first_ms,
                last_ms,
            } => write!(
                f,
                "seg-{level}-{first:016x}-{last:016x}-{first_ms:012x}-{last_ms:012x}.wseg"
            ),
        }
    }
}

/// Splits `s` into fields separated by single `-`, checking each field's exact width.
pub(super) fn fields<const N: usize>(s: &str, widths: [usize; N]) -> Option<[&str; N]> {
    let mut out = [""; N];
    let mut parts = s.split('-');
    for (slot, width) in out.iter_mut().zip(widths) {
        let part = parts.next()?;
        if part.len() != width {
            return None;
        }
        *slot = part;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(out)
}

impl FileName {
    /// The name of a level-0 segment holding the one commit `txid`, captured at `time_ms`.
    pub(crate) fn one_commit(txid: u64, time_ms: u64) -> FileName {
        FileName::Segment {
            level: 0,
            first: txid,
            last: txid,
            first_ms: time_ms,
            last_ms: time_ms,
        }
    }

    /// Parses a snapshot or segment file name, strictly: exact lengths, lowercase hex only,
    /// `first <= last`, `first_ms <= last_ms`, level one decimal digit.
    pub(crate) fn parse(name: &str) -> Result<FileName, LayoutError> {
        if let Some(body) = name
            .strip_prefix("snap-")
            .and_then(|r| r.strip_suffix(".wsnap"))
        {
            let [txid, time] = fields(body, [16, 12])
                .ok_or_else(|| bad_name(name, "not snap-<16 hex>-<12 hex>.wsnap"))?;
            let (Some(txid), Some(time_ms)) = (hex(txid), hex(time)) else {
                return Err(bad_name(name, "not lowercase hex"));
            };
            return Ok(FileName::Snapshot { txid, time_ms });
        }
        if let Some(body) = name
            .strip_prefix("seg-")
            .and_then(|r| r.strip_suffix(".wseg"))
        {
            let [level, first, last, first_ms, last_ms] = fields(body, [1, 16, 16, 12, 12])
                .ok_or_else(|| {
                    bad_name(
                        name,
                        "not seg-<level>-<16 hex>-<16 hex>-<12 hex>-<12 hex>.wseg",
                    )
                })?;
            let level = match level.as_bytes() {
                [d @ b'0'..=b'9'] => d - b'0',
                _ => return Err(bad_name(name, "level is not a decimal digit")),
            };
            let (Some(first), Some(last), Some(first_ms), Some(last_ms)) =
                (hex(first), hex(last), hex(first_ms), hex(last_ms))
            else {
                return Err(bad_name(name, "not lowercase hex"));
            };
            if first > last {
                return Err(bad_name(name, "first txid after last txid"));
            }
            if first_ms > last_ms {
                return Err(bad_name(name, "first time after last time"));
            }
            return Ok(FileName::Segment {
                level,
                first,
                last,
                first_ms,
                last_ms,
            });
        }
        Err(bad_name(name, "not a snapshot or segment file name"))
    }

    /// The first txid the file holds (a snapshot holds just its own).
    pub(crate) fn first_txid(&self) -> u64 {
        match *self {
            FileName::Snapshot { txid, .. } => txid,
            FileName::Segment { first, .. } => first,
        }
    }

    /// The last txid the file holds: the state it leaves the database in.
    pub(crate) fn last_txid(&self) -> u64 {
        match *self {
            FileName::Snapshot { txid, .. } => txid,
            FileName::Segment { last, .. } => last,
        }
    }

    /// Capture time of the first commit the file holds.
    pub(crate) fn first_ms(&self) -> u64 {
        match *self {
            FileName::Snapshot { time_ms, .. } => time_ms,
            FileName::Segment { first_ms, .. } => first_ms,
        }
    }

    /// Capture time of the last commit the file holds.
    pub(crate) fn last_ms(&self) -> u64 {
        match *self {
            FileName::Snapshot { time_ms, .. } => time_ms,
            FileName::Segment { last_ms, .. } => last_ms,
        }
    }

    /// Whether every field fits its fixed width (times below 2^48, level <= 9), i.e. whether
    /// `parse(&self.to_string())` gives `self` back.
    #[cfg(test)]
    pub(crate) fn is_valid(&self) -> bool {
        match *self {
            FileName::Snapshot { time_ms, .. } => time_ms < TIME_LIMIT,
            FileName::Segment {
                level,
                first,
                last,
                first_ms,
                last_ms,
            } => level <= 9 && first <= last && first_ms <= last_ms && last_ms < TIME_LIMIT,
        }
    }
}

impl FromStr for FileName {
    type Err = LayoutError;

    /// Same as [`FileName::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FileName::parse(s)
    }
}

/// The path of a file relative to the replica root: `generations/<id>/<name>`.
pub(crate) fn file_path(g: &GenerationId, f: &FileName) -> String {
    format!("{}/{f}", generation_dir(g))
}

/// A replication position: a commit within a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The generation the commit belongs to.
    pub generation: GenerationId,
    /// The commit's txid within that generation.
    pub txid: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.generation, self.txid)
    }
}

impl FromStr for Position {
    type Err = LayoutError;

    /// `<generation>/<txid>`, the txid in decimal without sign or leading zeros.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| {
            let text: String = s.chars().take(100).collect();
            LayoutError::InvalidPosition { text, reason }
        };
        let (g, t) = s
            .split_once('/')
            .ok_or_else(|| bad("expected <generation>/<txid>"))?;
        let generation = g
            .parse::<GenerationId>()
            .map_err(|_| bad("the generation is not 20 lowercase hex digits"))?;
        let digits_only = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits_only || (t.len() > 1 && t.starts_with('0')) {
            return Err(bad("the txid is not a decimal number"));
        }
        let txid = t.parse::<u64>().map_err(|_| bad("the txid is too large"))?;
        Ok(Position { generation, txid })
    }
}

/// The marker file at the replica root: says this directory is a walship replica and which
/// database owns it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Marker {
    /// The replica format ([`FORMAT_VERSION`] when written by this build).
    pub format: u32,
    /// The database that owns the replica, as `host:/abs/path`, so that a second database
    /// pointed at the same directory is refused.
    pub database: String,
    /// When the replica was created, ms since the Unix epoch.
    pub created_ms: u64,
    /// How the files below the root are encrypted: `"age"` (see `backend::encrypted`), or
    /// absent for plaintext. A walship opened the other way refuses the replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

impl Marker {
    /// The marker as TOML text.
    pub fn to_toml(&self) -> String {
        // Serializing a struct of plain strings and integers cannot fail; fall back to a
        // hand-written form rather than panic if it ever did.
        toml::to_string(self).unwrap_or_else(|_| {
            let enc = self
                .encryption
                .as_ref()
                .map_or_else(String::new, |e| format!("encryption = {e:?}\n"));
            format!(
                "format = {}\ndatabase = {:?}\ncreated-ms = {}\n{enc}",
                self.format, self.database, self.created_ms
            )
        })
    }

    /// Parses a marker: invalid TOML, unknown or missing keys, and formats this build does not
    /// know are errors.
    pub(crate) fn parse(text: &str) -> Result<Marker, LayoutError> {
        let marker: Marker = toml::from_str(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => line_column(text, span.start),
                None => (1, 1),
            };
            LayoutError::InvalidMarker {
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        match marker.format {
            0 => Err(LayoutError::MarkerFormatZero),
            f if f > FORMAT_VERSION => Err(LayoutError::MarkerTooNew(f)),
            _ => Ok(marker),
        }
    }
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
pub(super) fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: GenerationId = GenerationId {
        ms: 0x0123_4567_89ab,
        rand: 0xdead_beef,
    };

    #[test]
    fn generation_round_trip() {
        assert_eq!(G.to_string(), "0123456789abdeadbeef");
        assert_eq!("0123456789abdeadbeef".parse::<GenerationId>().unwrap(), G);
        assert_eq!(generation_dir(&G), "generations/0123456789abdeadbeef");
        for bad in [
            "",
            "0123456789abdeadbee",
            "0123456789abdeadbeef0",
            "0123456789ABdeadbeef",
            "0123456789abdeadbee/",
            "../../../../../../..",
            "+123456789abdeadbeef",
            "0123456789abdeadbeé",
        ] {
            assert!(bad.parse::<GenerationId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_name_round_trip() {
        let s = FileName::Snapshot {
            txid: 42,
            time_ms: 1_700_000_000_000,
        };
        assert_eq!(s.to_string(), "snap-000000000000002a-018bcfe56800.wsnap");
        let g = FileName::Segment {
            level: 3,
            first: 1,
            last: u64::MAX,
            first_ms: 5,
            last_ms: TIME_LIMIT - 1,
        };
        assert_eq!(
            g.to_string(),
            "seg-3-0000000000000001-ffffffffffffffff-000000000005-ffffffffffff.wseg"
        );
        for f in [s, g] {
            assert!(f.is_valid());
            assert_eq!(FileName::parse(&f.to_string()).unwrap(), f);
            assert_eq!(
                file_path(&G, &f),
                format!("generations/0123456789abdeadbeef/{f}")
            );
        }
        assert!(!FileName::Snapshot {
            txid: 1,
            time_ms: TIME_LIMIT
        }
        .is_valid());
    }

    #[test]
    fn file_name_strict_rejections() {
        let good_snap = "snap-000000000000002a-018bcfe56800.wsnap";
        let good_seg = "seg-0-0000000000000001-0000000000000002-000000000005-000000000006.wseg";
        assert!(FileName::parse(good_snap).is_ok());
        assert!(FileName::parse(good_seg).is_ok());
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("snap-000000000000002A-018bcfe56800.wsnap", "uppercase hex"),
            ("snap-00000000000002a-018bcfe56800.wsnap", "short txid"),
            ("snap-0000000000000002a-018bcfe56800.wsnap", "long txid"),
            ("snap-000000000000002a-18bcfe56800.wsnap", "short time"),
            ("snap-000000000000002a-0018bcfe56800.wsnap", "long time"),
            ("snap-000000000000002a-018bcfe56800.wsnap.tmp", "suffix"),
            ("snap-000000000000002a-018bcfe56800.WSNAP", "uppercase ext"),
            ("snap-000000000000002a_018bcfe56800.wsnap", "separator"),
            ("snap-000000000000002a--018bcfe5680.wsnap", "double dash"),
            ("snap-+00000000000002a-018bcfe56800.wsnap", "sign"),
            ("snap-000000000000002a-018bcfe56800.wseg", "kind mismatch"),
            ("../snap-000000000000002a-018bcfe56800.wsnap", "traversal"),
            ("snap-000000000000002a-018bcfe5/800.wsnap", "slash"),
            ("snap-........0000002a-018bcfe56800.wsnap", "dots"),
            ("snap-000000000000002a-018bcfe5680\0.wsnap", "nul"),
            (
                "seg-a-0000000000000001-0000000000000002-000000000005-000000000006.wseg",
                "hex level",
            ),
            (
                "seg-10-0000000000000001-0000000000000002-000000000005-000000000006.wseg",
                "level 10",
            ),
            (
                "seg--0000000000000001-0000000000000002-000000000005-000000000006.wseg",
                "no level",
            ),
            (
                "seg-0-0000000000000003-0000000000000002-000000000005-000000000006.wseg",
                "first > last",
            ),
            (
                "seg-0-0000000000000001-0000000000000002-000000000007-000000000006.wseg",
                "first_ms > last_ms",
            ),
            (
                "seg-0-0000000000000001-0000000000000002-000000000005-000000000006-.wseg",
                "extra field",
            ),
            (
                "seg-0-0000000000000001-0000000000000002-000000000005.wseg",
                "missing field",
            ),
            (
                "seg-0-000000000000000f-00000000000000F2-000000000005-000000000006.wseg",
                "uppercase",
            ),
            ("walship-replica.toml", "marker"),
        ];
        for (name, why) in cases {
            let err = FileName::parse(name).expect_err(why);
            assert!(err.to_string().starts_with("invalid name "), "{why}: {err}");
        }
    }

    #[test]
    fn position_round_trip_and_rejections() {
        let p = Position {
            generation: G,
            txid: 1234,
        };
        assert_eq!(p.to_string(), "0123456789abdeadbeef/1234");
        assert_eq!(p.to_string().parse::<Position>().unwrap(), p);
        let max = format!("{G}/{}", u64::MAX);
        assert_eq!(max.parse::<Position>().unwrap().txid, u64::MAX);
        for bad in [
            "0123456789abdeadbeef",
            "0123456789abdeadbeef/",
            "0123456789abdeadbeef/01",
            "0123456789abdeadbeef/+1",
            "0123456789abdeadbeef/-1",
            "0123456789abdeadbeef/1/2",
            "0123456789abdeadbeef/18446744073709551616",
            "0123456789abdeadbeef/ 1",
            "0123456789ABDEADBEEF/1",
            "/1",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn marker_round_trip_and_errors() {
        let m = Marker {
            format: FORMAT_VERSION,
            database: "host:/var/data/db/fruits.db".into(),
            created_ms: 1_700_000_000_000,
            encryption: None,
        };
        let text = m.to_toml();
        assert!(text.contains("created-ms = 1700000000000"), "{text}");
        assert!(!text.contains("encryption"), "{text}");
        assert_eq!(Marker::parse(&text).unwrap(), m);
        let sealed = Marker {
            encryption: Some("age".into()),
            ..m.clone()
        };
        let sealed_text = sealed.to_toml();
        assert!(
            sealed_text.contains("encryption = \"age\""),
            "{sealed_text}"
        );
        assert_eq!(Marker::parse(&sealed_text).unwrap(), sealed);

        let newer = text.replace("format = 1", "format = 2");
        assert_eq!(
            Marker::parse(&newer).unwrap_err().to_string(),
            "replica format 2 is newer than this walship supports (1)"
        );
        let zero = text.replace("format = 1", "format = 0");
        assert!(matches!(
            Marker::parse(&zero),
            Err(LayoutError::MarkerFormatZero)
        ));
        let unknown = format!("{text}extra = 1\n");
        let err = Marker::parse(&unknown).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid marker at line 4, column 1: "),
            "{err}"
        );
        assert!(err.contains("extra"), "{err}");
        assert!(!err.contains('\n'));
        let garbage = Marker::parse("format = \n").unwrap_err().to_string();
        assert!(garbage.starts_with("invalid marker at line 1"), "{garbage}");
        let missing = Marker::parse("format = 1\n").unwrap_err().to_string();
        assert!(missing.contains("database"), "{missing}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: crate::fuzz_cases(512),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Any string: the name parsers return a value or an error, never panic, and what
        /// they accept prints back to the same text (names are canonical: no two spellings).
        #[test]
        fn arbitrary_names_never_panic(s in "\\PC{0,80}", hexy in "(snap|seg|[0-9a-f.-]){0,90}") {
            for t in [&s, &hexy] {
                if let Ok(f) = FileName::parse(t) {
                    proptest::prop_assert_eq!(&f.to_string(), t);
                }
                if let Ok(g) = t.parse::<GenerationId>() {
                    proptest::prop_assert_eq!(&g.to_string(), t);
                }
                let _ = t.parse::<Position>();
                let _ = Marker::parse(t);
            }
        }
    }
}
