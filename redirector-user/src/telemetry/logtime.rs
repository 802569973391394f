//! The log's timestamps: RFC 3339 in UTC with microseconds, the format
//! tracing's default timer writes (`2026-11-27T15:03:01.123456Z`), with the
//! date and time of day formatted once per second per thread instead of
//! for every line. Under a connection per request each agent writes an
//! access line per connection, and the calendar arithmetic and padded
//! formatting of the default timer were about 1% of the agent's CPU.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

#[derive(Debug, Clone, Copy, Default)]
pub struct LogTime;

thread_local! {
    /// The second last formatted and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for LogTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_time(w, SystemTime::now())
    }
}

fn write_time(w: &mut impl fmt::Write, at: SystemTime) -> fmt::Result {
    let Ok(since) = at.duration_since(UNIX_EPOCH) else {
        // Before 1970: not worth a cache.
        return write!(w, "{}", tracing_time(at));
    };
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            cached.1.clear();
            match time::OffsetDateTime::from_unix_timestamp(secs as i64) {
                Ok(t) if t.year() <= 9999 => write_second(&mut cached.1, t)?,
                _ => return write!(w, "{}", tracing_time(at)),
            }
            cached.0 = secs;
        }
        w.write_str(&cached.1)?;
        let mut frac = *b".000000Z";
        let mut micros = since.subsec_micros();
        for d in frac[1..7].iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        w.write_str(std::str::from_utf8(&frac).unwrap_or(".000000Z"))
    })
}

/// `YYYY-MM-DDTHH:MM:SS` of `t`.
fn write_second(w: &mut impl fmt::Write, t: time::OffsetDateTime) -> fmt::Result {
    write!(
        w,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The same format without the cache, for the instants it does not cover.
fn tracing_time(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    let mut s = String::new();
    let _ = write_second(&mut s, t);
    let _ = write!(s, ".{:06}Z", t.microsecond());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ours(at: SystemTime) -> String {
        let mut s = String::new();
        write_time(&mut s, at).unwrap();
        s
    }

    #[test]
    fn formats_rfc3339_with_micros_across_seconds() {
        assert_eq!(ours(UNIX_EPOCH + Duration::from_micros(1_500_042)), "1970-01-01T00:00:01.500042Z");
        let base = UNIX_EPOCH + Duration::from_secs(1_798_329_781);
        assert_eq!(ours(base), "2026-12-27T00:03:01.000000Z");
        assert_eq!(ours(base + Duration::from_micros(999_999)), "2026-12-27T00:03:01.999999Z");
        assert_eq!(ours(base + Duration::from_micros(1_000_007)), "2026-12-27T00:03:02.000007Z");
        assert_eq!(ours(base + Duration::from_hours(120) + Duration::from_micros(42)), "2027-01-01T00:03:01.000042Z");
        // Back to a cached second after another one.
        assert_eq!(ours(base + Duration::from_micros(5)), "2026-12-27T00:03:01.000005Z");
        assert_eq!(tracing_time(base + Duration::from_micros(5)), "2026-12-27T00:03:01.000005Z");
    }

    /// The same text tracing's default timer writes for the same second.
    #[test]
    fn matches_tracings_default_timer() {
        for _ in 0..3 {
            let mut theirs = String::new();
            tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut theirs)).unwrap();
            let mut mine = String::new();
            LogTime.format_time(&mut Writer::new(&mut mine)).unwrap();
            assert_eq!(mine.len(), theirs.len(), "{mine} vs {theirs}");
            if mine[..19] == theirs[..19] {
                assert_eq!(mine.as_bytes()[19], b'.');
                assert!(mine.ends_with('Z'));
                return;
            }
            // A second boundary fell between the two: try again.
        }
        panic!("three second boundaries in a row");
    }
}
