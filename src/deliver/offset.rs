//! Offsets of organisation events: `"<ms>-<seq>"`, the form of Redis stream ids, so one node
//! and a cluster (where the Redis stream assigns them) hand clients the same kind of string.
//!
//! Clients treat offsets as opaque; the gateway compares them as `(ms, seq)` pairs. The `ms`
//! part is the wall-clock time at which the event was logged, which is what lets a replay tell
//! that an offset is older than the retention window.

use std::fmt;
use std::str::FromStr;

use serde_json::value::RawValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    pub ms: u64,
    pub seq: u64,
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for Offset {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(());
        }
        Ok(Offset {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// Hands out increasing offsets on one node, as Redis does for `XADD *`: the current time in
/// milliseconds, and a sequence number within the same millisecond (or while the clock stands
/// still or goes backwards). A restarted node starts at its own start time, so offsets of an
/// earlier process are never mistaken for its own.
#[derive(Debug, Default)]
pub struct Clock {
    last: Option<Offset>,
}

impl Clock {
    pub fn next(&mut self, now_ms: u64) -> Offset {
        let next = match self.last {
            Some(last) if now_ms <= last.ms => Offset {
                ms: last.ms,
                seq: last.seq + 1,
            },
            _ => Offset { ms: now_ms, seq: 0 },
        };
        self.last = Some(next);
        next
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The payload with `"offset": "<offset>"` as its first field, when it is a JSON object; other
/// payloads (a published event's data may be anything) go out unchanged.
pub fn stamp(payload: &RawValue, offset: Offset) -> Box<RawValue> {
    let json = payload.get().trim_start();
    let Some(rest) = json.strip_prefix('{') else {
        return payload.to_owned();
    };
    // A published object may carry its own `offset`; ours replaces it (a JSON object with the
    // key twice would leave which one a client sees to its parser).
    if json.contains("\"offset\"") {
        return restamp(payload, offset);
    }
    let rest = rest.trim_start();
    let separator = if rest.starts_with('}') { "" } else { "," };
    let stamped = format!("{{\"offset\":\"{offset}\"{separator}{rest}");
    RawValue::from_string(stamped).unwrap_or_else(|_| payload.to_owned())
}

fn restamp(payload: &RawValue, offset: Offset) -> Box<RawValue> {
    let Ok(mut object) =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(payload.get())
    else {
        return payload.to_owned();
    };
    object.insert("offset".into(), offset.to_string().into());
    serde_json::value::to_raw_value(&object).unwrap_or_else(|_| payload.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn parses_what_it_prints_and_orders_numerically() {
        let a: Offset = "1700000000000-9".parse().unwrap();
        let b: Offset = "1700000000000-10".parse().unwrap();
        assert!(a < b);
        assert_eq!(b.to_string(), "1700000000000-10");
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "1 -2",
            "+1-2",
            "99999999999999999999999-1",
        ] {
            assert!(bad.parse::<Offset>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn clock_increases_even_when_time_stands_still_or_goes_back() {
        let mut c = Clock::default();
        let a = c.next(1000);
        let b = c.next(1000);
        let d = c.next(999);
        let e = c.next(1001);
        assert!(a < b && b < d && d < e);
        assert_eq!(e, Offset { ms: 1001, seq: 0 });
    }

    #[test]
    fn stamps_objects_only() {
        let o = Offset { ms: 5, seq: 1 };
        assert_eq!(
            stamp(&raw(r#"{"a":1}"#), o).get(),
            r#"{"offset":"5-1","a":1}"#
        );
        assert_eq!(stamp(&raw("{}"), o).get(), r#"{"offset":"5-1"}"#);
        assert_eq!(stamp(&raw("[1]"), o).get(), "[1]");
        assert_eq!(stamp(&raw("\"x\""), o).get(), "\"x\"");
        let replaced: serde_json::Value =
            serde_json::from_str(stamp(&raw(r#"{"offset":7,"b":2}"#), o).get()).unwrap();
        assert_eq!(replaced, serde_json::json!({"offset": "5-1", "b": 2}));
    }
}
