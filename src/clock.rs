//! Wall-clock time as walship records it: milliseconds since the Unix epoch, their RFC 3339
//! form for people, and the RFC 3339 times people give (`restore --timestamp`). A clock before
//! 1970 reads as 0; one past u64 milliseconds saturates.
//!
//! Invariant: a time given by a person names one instant or is refused: it must carry `Z` or
//! an offset (`+01:00`, `-05:00`, `-00:00`); a time without one is never guessed to be UTC or
//! local time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `ms` (since the Unix epoch) as RFC 3339 UTC with milliseconds.
pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Parses an RFC 3339 time with `Z` or an offset (`2026-11-24T10:00:00+01:00`, `-00:00`,
/// fractional seconds; a space for the `T` is accepted) into milliseconds since the Unix
/// epoch, rounded down (a commit at that millisecond is at or before the time).
///
/// # Errors
/// A message saying what is wrong: no zone (add `Z` or an offset), not a time, before 1970.
pub(crate) fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let ts: jiff::Timestamp = match text.trim().parse() {
        Ok(ts) => ts,
        Err(e) => {
            if text.trim().parse::<jiff::civil::DateTime>().is_ok() {
                return Err(
                    "the time has no zone: add Z for UTC or an offset such as +01:00 \
                     (e.g. 2026-11-24T10:00:00Z)"
                        .into(),
                );
            }
            return Err(format!(
                "{e} (use RFC 3339, e.g. 2026-11-24T10:00:00Z or 2026-11-24T11:00:00+01:00)"
            ));
        }
    };
    u64::try_from(ts.as_millisecond()).map_err(|_| "the time is before 1970".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_offsets_name_one_instant() {
        let utc = parse_rfc3339("2026-11-24T10:00:00Z").expect("Z");
        assert_eq!(utc, 1_795_514_400_000);
        for same in [
            "2026-11-24T11:00:00+01:00",
            "2026-11-24T05:00:00-05:00",
            "2026-11-24T10:00:00-00:00",
            "2026-11-24T10:00:00+00:00",
            "2026-11-24t10:00:00z",
            "2026-11-24 10:00:00Z",
            " 2026-11-24T10:00:00Z ",
        ] {
            assert_eq!(parse_rfc3339(same), Ok(utc), "{same}");
        }
        assert_eq!(parse_rfc3339("2026-11-24T10:00:00.1239Z"), Ok(utc + 123));
        assert_eq!(parse_rfc3339("2026-11-24T11:00:00.5+01:00"), Ok(utc + 500));
        assert_eq!(parse_rfc3339(&rfc3339(utc + 42)), Ok(utc + 42));
    }

    #[test]
    fn rfc3339_without_zone_or_garbage_is_refused() {
        for zoneless in [
            "2026-11-24T10:00:00",
            "2026-11-24T10:00:00.5",
            "2026-11-24 10:00",
        ] {
            let e = parse_rfc3339(zoneless).expect_err(zoneless);
            assert!(e.contains("add Z"), "{zoneless}: {e}");
        }
        for bad in [
            "yesterday",
            "",
            "2026-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
        ] {
            let e = parse_rfc3339(bad).expect_err(bad);
            assert!(!e.contains("add Z"), "{bad}: {e}");
        }
        assert!(parse_rfc3339("1969-12-31T23:59:59Z")
            .expect_err("1969")
            .contains("before 1970"));
    }
}
