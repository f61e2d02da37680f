//! Arbitrary bytes through the ingest body path exactly as `POST /api/readings/ingest` takes
//! them (`src/http/ingest.rs`): `serde_json::from_slice::<Value>`, then
//! `ingest::validate(&value, max_readings, now)`.
//!
//! Neither step may panic, and the validator's answer must hold up: an accepted body is every
//! reading of the request, each within the documented bounds (README, "Ingest"); a refused one
//! says why with at least one field error pointing inside the request.

#![no_main]

use libfuzzer_sys::fuzz_target;

// The validator and the wire types it uses are compiled in from the gateway's own sources rather
// than through the `sensorwire` crate: instrumented for coverage, the whole server's dependency
// tree (sqlx, socketioxide, fred, TLS) takes the better part of an hour to build on two cores;
// these files need only serde, chrono, ts-rs, utoipa and strum.
#[allow(dead_code)]
#[path = "../../src/wire.rs"]
mod wire;
#[allow(dead_code)]
#[path = "../../src/store/reading.rs"]
mod reading;
/// Where `validate.rs` finds the type it produces (`crate::store::NewReading` in the gateway).
mod store {
    pub use super::reading::NewReading;
}
#[allow(dead_code)]
#[path = "../../src/ingest/validate.rs"]
mod validate;

use validate::{Invalid, MAX_FUTURE_MS, validate};
use serde_json::Value;

/// A fixed clock, so a crash reproduces: 2027-01-15T08:00:00Z.
const NOW_MS: i64 = 1_800_000_000_000;
/// 2000-01-01T00:00:00Z, the validator's oldest acceptable `recordedAt`.
const MIN_TIME_MS: i64 = 946_684_800_000;
/// `MAX_READINGS_PER_REQUEST` is configurable; a small cap lets the fuzzer reach the 413 path.
const MAX_READINGS: usize = 16;

fuzz_target!(|data: &[u8]| {
    // The handler answers 400 for anything serde_json refuses; nothing more to check there.
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let items = body.get("readings").and_then(Value::as_array);
    match validate(&body, MAX_READINGS, NOW_MS) {
        Ok(readings) => {
            let items = items.expect("accepted a body without a readings array");
            assert!(!readings.is_empty(), "accepted an empty request");
            assert!(readings.len() <= MAX_READINGS, "accepted over the cap");
            assert_eq!(
                readings.len(),
                items.len(),
                "all or nothing: a reading went missing"
            );
            for (r, item) in readings.iter().zip(items) {
                let item = item
                    .as_object()
                    .expect("accepted a reading that is not an object");
                assert_eq!(
                    item.get("unitId").and_then(Value::as_str),
                    Some(r.unit_id.as_str())
                );
                assert!(
                    wire::valid_id(&r.unit_id),
                    "bad unit id {:?}",
                    r.unit_id
                );
                assert!(
                    r.temperature.is_finite() && (-273.15..=1000.0).contains(&r.temperature),
                    "temperature {} out of bounds",
                    r.temperature
                );
                assert_eq!(
                    item.get("temperature").and_then(Value::as_f64),
                    Some(r.temperature)
                );
                for (name, v) in [("humidity", r.humidity), ("battery", r.battery)] {
                    if let Some(v) = v {
                        assert!(
                            v.is_finite() && (0.0..=100.0).contains(&v),
                            "{name} {v} out of bounds"
                        );
                    }
                }
                if let Some(s) = r.signal_strength {
                    assert!(s.is_finite(), "signalStrength {s} not finite");
                }
                assert!(
                    (MIN_TIME_MS..=NOW_MS + MAX_FUTURE_MS).contains(&r.recorded_at),
                    "recordedAt {} out of bounds",
                    r.recorded_at
                );
                // What goes out on the wire must say the same instant.
                let shown = wire::format_time(r.recorded_at);
                let back = chrono::DateTime::parse_from_rfc3339(&shown)
                    .expect("format_time output is not RFC 3339");
                assert_eq!(back.timestamp_millis(), r.recorded_at, "{shown}");
                assert!(printable(&r.source, 64), "source {:?}", r.source);
                assert!(
                    r.device_id.is_empty() || printable(&r.device_id, 128),
                    "deviceId {:?}",
                    r.device_id
                );
            }
        }
        Err(Invalid::TooMany { count, max }) => {
            assert_eq!(max, MAX_READINGS);
            assert!(count > max);
            assert_eq!(items.map(Vec::len), Some(count));
        }
        Err(Invalid::Fields(errors)) => {
            assert!(!errors.is_empty(), "refused without saying why");
            let len = items.map_or(0, Vec::len);
            for e in &errors {
                assert!(!e.field.is_empty() && !e.message.is_empty());
                if let Some(i) = e.index {
                    assert!(i < len, "error index {i} outside a request of {len}");
                }
            }
        }
    }
});

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}
